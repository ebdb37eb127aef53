"""Choosing each method's 3D heatmap smoothing (:mod:`anomaly_localizer.core.smoothing`).

Synthetic anomalies (:mod:`anomaly_localizer.tooling.evaluation.synthetic`, a seed of their own) in the
model's *validation* subjects are scored once without smoothing, and for each method the
widths on a small grid that give the highest pixel-wise average precision are kept. Test
subjects are never used, so the evaluation on them stays held out.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ...core.smoothing import BrainSmoother
from ...errors import InputError

THROUGH_PLANE_GRID_MM = (0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0)
IN_PLANE_GRID_MM = (0.0, 2.0, 4.0, 6.0)
TUNING_SEED = 1  # evaluation uses seed 0 on test subjects; tuning its own cases on validation subjects


def choose_smoothing(raw_cases: list[dict[str, Any]], methods: list[str],
                     through_grid=THROUGH_PLANE_GRID_MM, in_grid=IN_PLANE_GRID_MM,
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Per method, the grid widths with the highest pixel AP over ``raw_cases``.

    Each case: {"maps": {method: unsmoothed map}, "brain", "label", "spacing", "axial"}.
    Ties go to the narrower smoothing (listed first), so no smoothing wins unless it loses.
    """
    from ..metrics import average_precision
    y = np.concatenate([c["label"][c["brain"]] for c in raw_cases])
    smoothers = [BrainSmoother(c["brain"], c["spacing"], c["axial"]) for c in raw_cases]
    block: dict[str, Any] = {}
    curves: dict[str, list] = {}
    for m in methods:
        best, curve = None, []
        for through in through_grid:
            for in_plane in in_grid:
                s = np.concatenate([sm.smooth(c["maps"][m], through, in_plane)[c["brain"]]
                                    for sm, c in zip(smoothers, raw_cases)])
                ap = average_precision(s, y)
                curve.append({"through_plane_mm": through, "in_plane_mm": in_plane, "pixel_ap": ap})
                if best is None or ap > best[0] + 1e-9:
                    best = (ap, through, in_plane)
                if progress:
                    progress(f"{m}: through-plane {through:g} mm, in-plane {in_plane:g} mm: pixel AP {ap:.3f}")
        block[m] = {"through_plane_mm": best[1], "in_plane_mm": best[2]}
        curves[m] = curve
    block["selection"] = {"rule": "per method, the widths with the highest pixel-wise AP on synthetic anomalies "
                                  "in validation subjects", "curves": curves}
    return block


def tune_package(package, subjects, per_subject: int = 2, device: str = "cpu",
                 progress: Callable[[str], None] | None = None, methods: list[str] | None = None,
                 cases: str = "hard") -> dict[str, Any]:
    """Score synthetic anomalies in healthy ``subjects`` without smoothing and return the
    package's new ``map_smoothing`` block. With ``methods``, only those are tuned (and
    scored, which saves the restoration's minutes when it is not among them); the other
    methods keep the widths and selection curves the package already has."""
    from ...core.device import select_device
    from ...core.pipeline import check_methods, score_volume
    from ..evaluation.evaluate import case_set

    if package.detector is not None and package.detector.composite:
        raise InputError(f"{package.name} is a fused model: its components' maps carry their own smoothing; tune "
                         "the components and make the fused model again (anomaly-localizer fuse)")
    dev = select_device(device)
    model = package.load_model(dev)
    methods = check_methods(list(methods), package) if methods else list(package.methods)
    # Methods not tuned now keep their widths, which must come from the same cases (checked
    # before any scoring, so a refusal costs nothing).
    old = package.meta.get("map_smoothing") or {}
    kept = {m: v for m, v in old.items() if m != "selection" and m not in methods}
    old_selection = old.get("selection", {})
    here = {"subjects": [s.id for s in subjects], "per_subject": per_subject, "seed": TUNING_SEED}
    if cases != "balls":  # packages tuned before the hard set record no case set: balls
        here["case_set"] = cases
    if kept and any(old_selection.get(k) != v for k, v in here.items()):
        raise InputError("the methods not tuned now were tuned on other cases (subjects, per-subject or seed "
                         "differ); tune every method together (leave out --method)")
    raw = []
    for case in case_set(cases, subjects, per_subject=per_subject, seed=TUNING_SEED):
        res = score_volume(case.image, package, methods, mask=case.mask, device=str(dev), model=model,
                           smoothing=False)
        raw.append({"maps": res.maps, "brain": res.brain_mask, "label": case.label & res.brain_mask,
                    "spacing": case.image.GetSpacing()[::-1], "axial": 2 - res.axial_axis})
        if progress:
            progress(f"scored {case.id}")
    block = choose_smoothing(raw, methods, progress=progress)
    block["selection"].update({**here, "cases": len(raw)})
    if kept:
        block["selection"]["curves"] = {**{m: c for m, c in old_selection.get("curves", {}).items() if m in kept},
                                        **block["selection"]["curves"]}
        block = {**kept, **block}
    return block
