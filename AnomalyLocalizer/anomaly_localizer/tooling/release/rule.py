"""A model package of the intensity rule (:mod:`anomaly_localizer.core.detectors.rule`) for
one contrast, calibrated like any map on healthy scans (or renderings) of that contrast."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ... import __version__
from ...core.package import ModelPackage, save_package
from ...core.volume import NORMALISATION
from ...errors import InputError
from ..data import find_subjects, split_subjects
from ..rendering import rendered_contrast


def make_rule_package(out: str | Path, contrast: str, data: str | Path, direction: str = "bright",
                      smoothing_px: float = 1.0, seed: int = 0, force: bool = False, calibrate: bool = True,
                      device: str = "cpu", progress: Callable[[str], None] | None = None,
                      meta_file: str | None = None) -> ModelPackage:
    """Write an ``intensity-rule`` package reading ``contrast`` into ``out``, with the subject
    split of ``data`` (the trainings' split for ``seed``) recorded, and calibrate it on the
    split's calibration subjects of that contrast. ``meta_file``: JSON merged into model.json
    (summary, data statement, limitations)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(f"{out} already exists; choose another folder or pass --force")
    subjects = find_subjects(data)
    split = split_subjects([s.id for s in subjects], seed, 0.1, 0.15, 0.15)
    meta = {
        "name": out.name,
        "summary": f"The {contrast.upper()} intensity rule (Meissen et al. 2021): voxels {direction}er than the "
                   "brain's median in units of its inter-quartile range, smoothed; the baseline every map must beat",
        "architecture": {"type": "intensity-rule", "slice_size": 112, "direction": direction,
                         "smoothing_px": smoothing_px, "slice_top_k": 20},
        "input_contract": {"modality": contrast, "contrasts": [contrast], "orientation": "axial", "slice_size": 112,
                           "spacing_mm": 2.0, "normalisation": NORMALISATION, "context_slices": 1},
        "recommended_method": "rule",
        "calibration": {},
        "provenance": {"engine_version": __version__, "data": str(Path(data)), "subjects": split,
                       "made": time.strftime("%Y-%m-%d")},
        "training": {"note": "no training: a fixed rule"},
    }
    if meta_file:
        from ...core.package import read_json
        extra = read_json(Path(meta_file), "metadata file", "fix the file given with --meta")
        if not isinstance(extra, dict):
            raise InputError(f"{meta_file} must hold a JSON object of model.json keys")
        meta.update({k: v for k, v in extra.items() if k not in ("architecture", "input_contract", "name",
                                                                  "calibration", "provenance")})
    package = save_package(None, meta, out)
    if calibrate:
        from .calibrate import calibrate_package
        by_id = {s.id: s for s in subjects}
        chosen = [by_id[i] for i in split["calibration"] if rendered_contrast(i) in (None, contrast)]
        if not chosen:
            raise InputError(f"no calibration subject of {data} is a {contrast} scan or rendering")
        package = calibrate_package(package, chosen, device=device, progress=progress)
    return package
