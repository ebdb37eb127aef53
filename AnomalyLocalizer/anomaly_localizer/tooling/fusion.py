"""``anomaly-localizer fuse``: make a fused model package and choose its rule on validation.

Candidates are component maps of installed, calibrated packages (``model:method``). The
choice: synthetic anomalies of the harder set (:mod:`.hard_cases`, the tuning seed) in the
components' *validation* subjects are scored once by every candidate; each map becomes
healthy anomaly levels; every subset of the candidates under every rule (mean, max) is
scored by pixel AP over all cases, and the best is kept (ties to fewer components). Test
subjects, calibration subjects and tumour cases are never used for the choice, so the
evaluation of the fused map on them stays held out. The fused package is then calibrated
on the components' calibration subjects like any model.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import __version__
from ..core.detectors.fused import FusionArchitecture
from ..core.fusion import content_sha256
from ..core.levels import level_scale
from ..core.package import ModelPackage, resolve_package, save_package
from ..errors import InputError
from .edit import subjects_of

RULES = ("mean", "max")
SELECTION_SEED = 1  # the tuning seed of tune_smoothing: evaluation uses 0 on test subjects


def parse_components(specs: list[str]) -> list[tuple[ModelPackage, str]]:
    """``model:method`` strings as (package, method); each must be calibrated for its method."""
    out = []
    for spec in specs:
        model, sep, method = spec.rpartition(":")
        if not sep or not model or not method:
            raise InputError(f"component {spec!r} is not MODEL:METHOD (e.g. brain-t1-dae:dae)")
        package = resolve_package(model)
        if method not in package.methods or (package.detector and package.detector.composite):
            raise InputError(f"model {package.name} does not offer {method} (it offers {', '.join(package.methods)})")
        if not level_scale(package.calibration, method)[1]:
            raise InputError(f"model {package.name} has no calibration for {method}; calibrate it first "
                             "(anomaly-localizer calibrate)")
        out.append((package, method))
    if len({m for _, m in out}) != len(out):
        raise InputError("each method may be a component once")
    return out


def _splits_agree(components: list[tuple[ModelPackage, str]]) -> dict[str, list[str]]:
    """The subject split the components share; refused when a component trained on another
    component's calibration or validation subjects (the fused figures would not be held out)."""
    splits = [p.meta.get("provenance", {}).get("subjects", {}) for p, _ in components]
    first = splits[0]
    trained = set().union(*(set(s.get("train", [])) for s in splits))
    for key in ("calibration", "val", "test"):
        if trained & set(first.get(key, [])):
            raise InputError(f"a component was trained on subjects that are {key} subjects of "
                             f"{components[0][0].name}; fuse models trained with the same subject split")
    return first


def fused_meta(components: list[tuple[ModelPackage, str]], rule: str, name: str,
               weights: list[float] | None = None, selection: dict[str, Any] | None = None) -> dict[str, Any]:
    """model.json of a fused package (uncalibrated)."""
    finest = min((p for p, _ in components), key=lambda p: p.contract.spacing_mm)
    arch = FusionArchitecture.model_validate({
        "type": "fusion", "rule": rule,
        "components": [{"model": p.name, "method": m, "content_sha256": content_sha256(p.files),
                        **({"weight": w} if weights else {})}
                       for (p, m), w in zip(components, weights or [1.0] * len(components))]})
    methods = ", ".join(m for _, m in components)
    return {
        "name": name,
        "summary": f"Fused default map: the {rule} of the healthy anomaly levels of {methods}",
        "architecture": arch.model_dump(),
        # The contract of the finest component: what the fused map's resolution is limited by.
        "input_contract": finest.meta["input_contract"],
        "recommended_method": "fused",
        "calibration": {},
        "provenance": {"engine_version": __version__, "subjects": _splits_agree(components),
                       "components": {p.name: p.manifest_sha256 for p, _ in components},
                       "made": time.strftime("%Y-%m-%d")},
        # The subject split's seed (the components share it), for the model card.
        "training": {"config": {"seed": components[0][0].meta.get("training", {}).get("config", {}).get("seed")},
                     "selection": (selection or {}).get("rule", "components and rule given by hand"),
                     **({"selection_record": selection} if selection else {})},
    }


def component_levels(components: list[tuple[ModelPackage, str]], subjects, per_subject: int, device: str,
                     progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Each validation case's label, brain and every candidate's map in healthy levels."""
    from ..core.device import select_device
    from ..core.pipeline import score_volume
    from .evaluate import case_set

    dev = select_device(device)
    by_model: dict[str, tuple[ModelPackage, list[str]]] = {}
    for p, m in components:
        by_model.setdefault(p.name, (p, []))[1].append(m)
    nets = {name: p.load_model(dev) for name, (p, _) in by_model.items()}
    cases = []
    for case in case_set("hard", subjects, per_subject=per_subject, seed=SELECTION_SEED):
        levels, brain = {}, None
        for name, (p, ms) in by_model.items():
            res = score_volume(case.image, p, ms, mask=case.mask, device=str(dev), model=nets[name])
            brain = res.brain_mask
            for m in ms:
                levels[m] = (res.maps[m] / level_scale(p.calibration, m)[0]).astype(np.float32)
        cases.append({"levels": levels, "brain": brain, "label": case.label & brain})
        if progress:
            progress(f"scored {case.id} with {', '.join(levels)}")
    return cases


def choose_rule(cases: list[dict[str, Any]], methods: list[str],
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The subset of ``methods`` and rule with the highest pixel AP over ``cases``."""
    from ..core.fusion import fuse_levels
    from .metrics import average_precision

    y = np.concatenate([c["label"][c["brain"]] for c in cases])
    table, best = [], None
    for k in range(1, len(methods) + 1):
        for subset in itertools.combinations(methods, k):
            for rule in RULES if k > 1 else ("mean",):
                s = np.concatenate([fuse_levels([c["levels"][m] for m in subset], rule, [1.0] * k)[c["brain"]]
                                    for c in cases])
                ap = average_precision(s, y)
                table.append({"methods": list(subset), "rule": rule, "pixel_ap": ap})
                if progress:
                    progress(f"{rule} of {', '.join(subset)}: pixel AP {ap:.4f}")
                if best is None or ap > best["pixel_ap"] + 1e-6:
                    best = table[-1]
    return {"chosen": best, "table": table,
            "rule": f"chosen among every subset of {', '.join(methods)} and the rules {', '.join(RULES)} by pixel AP "
                    f"on {len(cases)} synthetic cases of the harder set in validation subjects "
                    f"(seed {SELECTION_SEED}); no test, calibration or tumour case was used"}


def make_fused(specs: list[str], out: str | Path, data: str | None, rule: str = "auto", per_subject: int = 2,
               device: str = "cpu", force: bool = False, progress: Callable[[str], None] | None = None,
               calibrate: bool = True, meta_file: str | None = None) -> ModelPackage:
    """Build (and, with ``data``, choose and calibrate) a fused package in ``out``; nothing is
    left in ``out`` when any step fails. ``meta_file``: JSON merged into model.json
    (summary, description, data statement, limitations)."""
    import shutil

    from ..core.package import load_package, read_json

    say = progress or (lambda m: None)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(f"{out} already exists; pass --force to replace it")
    if rule not in RULES + ("auto",):
        raise InputError(f"unknown rule {rule!r}; choose auto, {', '.join(RULES)}")
    extra = read_json(Path(meta_file), "metadata file") if meta_file else {}
    if not isinstance(extra, dict):
        raise InputError(f"{meta_file} must hold a JSON object of model.json keys")
    components = parse_components(specs)
    selection = None
    if rule == "auto":
        if not data:
            raise InputError("choosing the rule needs the healthy data folder (--data)")
        val = subjects_of(components[0][0], data, "val")
        cases = component_levels(components, val, per_subject, device, say)
        selection = choose_rule(cases, [m for _, m in components], say)
        chosen = selection["chosen"]
        components = [c for c in components if c[1] in chosen["methods"]]
        rule = chosen["rule"]
        say(f"chosen: {rule} of {', '.join(chosen['methods'])} (validation pixel AP {chosen['pixel_ap']:.4f})")
    meta = fused_meta(components, rule, out.name, selection=selection)
    meta.update({k: v for k, v in extra.items() if k not in ("architecture", "name", "calibration")})
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        package = save_package(None, meta, tmp)
        if calibrate and data:
            from .calibrate import calibrate_package
            package = calibrate_package(package, subjects_of(components[0][0], data, "calibration"), device=device,
                                        progress=say)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return load_package(out)
