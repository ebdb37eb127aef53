"""A fused package scores itself: each component package scores the volume on its own terms
(:func:`.single.score_package`: its resolution, its 3D smoothing, the exact way back to the
input grid) with the brain found once for the run, and the fused map combines their maps in
healthy anomaly levels (:mod:`.fusion`, :mod:`.detectors.fused`). No step goes back through
:func:`.pipeline.score_volume`.

Component slice scores are kept per model and score, so two components of one family (two
VAEs, say) cannot overwrite each other: a result names a component's slice score by its own
name where only one component has it, else ``model:score``.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk

from .. import __version__
from ..errors import InputError
from .package import ModelPackage
from .relative import apply_scan_relative
from .single import SCORING_ENDS, SCORING_STARTS, ProgressFn, ScoreResult, score_package, volume_score


def score_fused(image: sitk.Image, package: ModelPackage, methods: list[str], mask_arr: np.ndarray, source: str,
                 dev, batch_size: int | None, progress: ProgressFn | None, cancel: Callable[[], bool] | None,
                 model, t0: float, bf16: bool = False, study: dict[str, sitk.Image] | None = None) -> ScoreResult:
    """A fused package (:mod:`.fusion`): each component model scores the volume with the
    brain mask found once; the fused map combines their maps in healthy anomaly levels."""
    from .fusion import combined_slice_scores, fuse_levels, top_area_slice_scores
    from .levels import level_scale

    arch = package.architecture
    comps = arch["components"]
    wanted = [c for c in comps if "fused" in methods or c["method"] in methods]
    loaded = model if model is not None else package.load_model(dev)
    scales: dict[str, float] = {}
    for c in comps if "fused" in methods else []:  # refused before any scoring
        scale, calibrated = level_scale(comp_calibration(loaded, c), c["method"])
        if not calibrated:
            raise InputError(f"model {package.name}: component {c['method']} of {c['model']} has no calibration; "
                             "calibrate it (anomaly-localizer calibrate) and rebuild the fused model")
        scales[c["method"]] = scale
    by_model: dict[str, list[str]] = {}
    for c in wanted:
        by_model.setdefault(c["model"], []).append(c["method"])
    maps: dict[str, np.ndarray] = {}
    by_part: dict[tuple[str, str], np.ndarray] = {}  # (model, score): a component's slice score
    timings: dict[str, float] = {"prepare_s": time.perf_counter() - t0}
    parts = []
    smoothers: dict = {}  # one brain smoother for every component (same mask)
    for i, (name, ms) in enumerate(by_model.items()):
        comp, net = loaded[name]
        lo, hi = SCORING_STARTS + (SCORING_ENDS - SCORING_STARTS) * i / len(by_model), \
            SCORING_STARTS + (SCORING_ENDS - SCORING_STARTS) * (i + 1) / len(by_model)
        sub = (lambda f, msg, lo=lo, hi=hi, name=name: progress(lo + (hi - lo) * f, f"{name}: {msg}")) \
            if progress else None
        t = time.perf_counter()
        res = score_package(image, comp, ms, mask_arr, source, dev, batch_size, sub, cancel, net, bf16=bf16,
                            study=study, smoothers=smoothers)
        timings[f"{name}_s"] = time.perf_counter() - t
        timings["smoothing_s"] = timings.get("smoothing_s", 0.0) + res.timings.get("smoothing_s", 0.0)
        for m in ms:
            maps[m] = res.maps[m]
        by_part.update({(name, score): values for score, values in res.slice_scores.items()})
        parts.append({"model": name, "manifest_sha256": comp.manifest_sha256[:12], "methods": ms,
                      "map_smoothing": res.info.get("map_smoothing", {}),
                      "scan_relative": res.info.get("scan_relative", {})})
        axial_axis = res.axial_axis
    info: dict[str, Any] = {"components": parts, "rule": arch["rule"]}
    slice_scores = component_slice_scores(by_part)
    if "fused" in methods:
        levels = [maps[c["method"]] / scales[c["method"]] for c in comps]
        fused = fuse_levels(levels, arch["rule"], [c.get("weight", 1.0) for c in comps])
        maps = {"fused": np.where(mask_arr, fused, 0).astype(np.float32), **maps}
        mix = (arch.get("slice_score") or {}).get("parts")
        if mix:  # a chosen mix of the components' own slice scores
            fused_slices = combined_slice_scores(by_part, mix, {p["model"]: loaded[p["model"]][0].calibration
                                                                for p in mix})
        else:  # axial_axis is SimpleITK's index axis; the arrays are in numpy (z, y, x) order.
            fused_slices = top_area_slice_scores(maps["fused"], mask_arr, 2 - axial_axis, image.GetSpacing()[::-1])
        slice_scores = {"fused": fused_slices, **slice_scores}
        info["level_scales"] = scales
    # after the fused slice scores, which stay absolute (:mod:`.relative`); the components'
    # maps were made relative (or not) by their own packages
    relative = {**{k: v for p in parts for k, v in p["scan_relative"].items()},
                **apply_scan_relative(package, maps, mask_arr, only=("fused",))}
    primary = "fused" if "fused" in slice_scores else next(iter(slice_scores))
    timings["total_s"] = time.perf_counter() - t0
    if progress:
        progress(1.0, "done")
    return ScoreResult(maps={m: maps[m] for m in methods}, brain_mask=mask_arr, slice_scores=slice_scores,
                       brain_voxels_per_slice=res.brain_voxels_per_slice,
                       volume_score=volume_score(slice_scores[primary]), axial_axis=axial_axis, device=str(dev),
                       timings=timings,
                       info={"scored_slices": res.info["scored_slices"], "fov_coverage": res.info["fov_coverage"],
                             "brain_mask_source": source, "primary_slice_score": primary,
                             "volume_score_meaning": fused_volume_meaning(arch) if primary == "fused"
                             else res.info["volume_score_meaning"],
                             "map_smoothing": {k: v for p in parts for k, v in p["map_smoothing"].items()},
                             "scan_relative": {m: relative[m] for m in methods if m in relative}, "bf16": bf16,
                             "engine_version": __version__, "fusion": info})


def component_slice_scores(by_part: dict[tuple[str, str], np.ndarray]) -> dict[str, np.ndarray]:
    """The components' slice scores as a result names them: a score's own name where one
    component has it, ``model:score`` where several do (two VAEs' ``rec``)."""
    count: dict[str, int] = {}
    for _, score in by_part:
        count[score] = count.get(score, 0) + 1
    return {(score if count[score] == 1 else f"{model}:{score}"): values for (model, score), values in by_part.items()}


def fused_volume_meaning(arch: dict[str, Any]) -> str:
    """What a fused package's volume score is, in words."""
    from .detectors.fused import slice_score_text
    return f"mean fused slice score ({slice_score_text(arch)}) of the 10 % most anomalous brain slices"


def comp_calibration(loaded: dict[str, Any], component: dict[str, Any]):
    """The calibration of a component's own package (its levels' scale)."""
    return loaded[component["model"]][0].calibration


