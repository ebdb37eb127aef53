"""Histogram standardisation (Nyul & Udupa 2000) of a model's input: the mean brain
landmarks (percentiles, after the median/IQR scaling) of the model's training scans become
the standard every scan is mapped onto before scoring. Meant for scans from other scanners,
whose intensity histograms differ in shape and not only in location and scale."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import SimpleITK as sitk

from ...core.imageio import as_3d, read_image
from ...core.package import ModelPackage, load_package, update_meta
from ...core.schema import Normalisation
from ...core.volume import brain_mask, normalise_intensities
from ...errors import InputError
from ..data import Subject

LANDMARK_PERCENTILES = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 98.0, 99.0)


def standard_landmarks(subjects: list[Subject], normalisation: Normalisation,
                       say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The mean landmarks of ``subjects``' brains after the model's median/IQR scaling."""
    if not subjects:
        raise InputError("no subjects to compute the standard histogram from")
    plain = normalisation.model_copy(update={"standard": None})
    rows = []
    for s in subjects:
        image = as_3d(read_image(s.image))
        mask = brain_mask(image, as_3d(read_image(s.mask, "MASK")) if s.mask else None)
        norm = normalise_intensities(sitk.GetArrayViewFromImage(image), mask, plain)
        rows.append(np.percentile(norm[mask], LANDMARK_PERCENTILES))
    values = np.mean(rows, axis=0)
    if say:
        say(f"standard histogram from {len(subjects)} subjects: " +
            ", ".join(f"p{p:g} {v:.3f}" for p, v in zip(LANDMARK_PERCENTILES, values)))
    return {"percentiles": list(LANDMARK_PERCENTILES), "values": [float(v) for v in values]}


def check_standardisable(package: ModelPackage) -> None:
    """Refuse a model without an input of its own (a fused model)."""
    if package.detector is None or package.detector.composite:
        raise InputError(f"model {package.name} has no input of its own to standardise (a fused model: standardise "
                         "its components and fuse them again)")


def standardise_package(package: ModelPackage, training: list[Subject], calibration: list[Subject],
                        device: str = "cpu", say: Callable[[str], None] | None = None) -> ModelPackage:
    """Store the standard of the ``training`` subjects in the package's input contract and
    recalibrate it on the ``calibration`` subjects (its maps change a little)."""
    from .calibrate import calibrate_package
    check_standardisable(package)
    block = standard_landmarks(training, package.contract.normalisation, say)
    meta = dict(package.meta)
    contract = dict(meta["input_contract"])
    contract["normalisation"] = {**dict(contract.get("normalisation", {})), "standard": block}
    meta["input_contract"] = contract
    update_meta(package.path, meta)
    return calibrate_package(load_package(package.path), calibration, device=device, progress=say)
