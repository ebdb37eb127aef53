"""Score one volume: the engine's main entry point, shared by the command line and Slicer.

The steps are the same for every detector family: find the brain, prepare the model's
axial slices (:mod:`core.volume`), let the family score them
(:mod:`core.detectors`), map the results back onto the input's exact grid, apply each
method's 3D smoothing (:mod:`core.smoothing`) and, where the package asks, make the map
relative to the scan's own (:mod:`core.relative`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk

from .. import __version__
from ..errors import InputError
from .detectors import ScoringContext
from .device import select_device
from .package import ALL_METHODS, ModelPackage
from .installed import check_methods
from .relative import apply_scan_relative
from .volume import PreparedVolume, brain_mask, prepare_volume

ProgressFn = Callable[[float, str], None]
VOLUME_SCORE_TOP_FRACTION = 0.1
# Shares of a run's progress: preparing (brain extraction included), scoring, mapping back.
_SCORING_STARTS, _SCORING_ENDS = 0.1, 0.85


@dataclass
class ScoreResult:
    """Everything one run produces; arrays are in the input's array order (z, y, x)."""

    maps: dict[str, np.ndarray]  # method -> float32 heatmap on the input grid (raw score), 0 outside the brain
    brain_mask: np.ndarray  # bool
    slice_scores: dict[str, np.ndarray]  # name -> (n_axial,) along the input's axial axis, NaN without brain
    brain_voxels_per_slice: np.ndarray
    volume_score: float
    axial_axis: int
    device: str
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def volume_score(per_slice: np.ndarray) -> float:
    """Mean slice score of the most anomalous 10 % of brain slices (at least one)."""
    v = np.sort(per_slice[np.isfinite(per_slice)])[::-1]
    if v.size == 0:
        return float("nan")
    k = max(1, int(round(VOLUME_SCORE_TOP_FRACTION * v.size)))
    return float(v[:k].mean())


def score_volume(image: sitk.Image, package: ModelPackage, methods: list[str] | tuple[str, ...] | None = None,
                 mask: sitk.Image | None = None, device: str = "auto", batch_size: int | None = None,
                 progress: ProgressFn | None = None, cancel: Callable[[], bool] | None = None,
                 model=None, brain_extraction: str | None = "auto",
                 smoothing: bool = True, bf16: bool = False,
                 study: dict[str, sitk.Image] | None = None) -> ScoreResult:
    """Heatmaps, slice scores and the volume score of one 3D image.

    ``methods``: default, the model's default methods (:meth:`ModelPackage.default_methods`).
    ``mask``: optional brain mask on the image's grid. Without it, a skull-stripped image's
    non-zero region is the brain, and a whole-head image is brain-extracted by
    ``brain_extraction``: "auto" (the installed brain extraction model), a model name or
    folder, or None/"off" (refuse whole-head images). ``model`` may be given to reuse an
    already loaded network of ``package``. ``smoothing``: apply the package's 3D heatmap
    smoothing (:mod:`anomaly_localizer.core.smoothing`); off only to tune it (the maps then
    also stay absolute, :mod:`.relative`). ``bf16``: run
    the networks of the families that score without input gradients (dae, ssl) under bf16
    autocast, to measure what it changes (the default is float32). ``study``: the images of a
    co-registered study by contrast, all on ``image``'s grid (:mod:`.study`); the model reads
    the one of its contrast (a fused model's components each their own), else ``image``.
    """
    from .imageio import check_image
    check_image(image, None, "the image")  # the command line's checks, for the Python API too
    if mask is not None:
        check_image(mask, None, "the brain mask")
    detector = package.detector
    if detector is None:
        raise InputError(f"model {package.name} is a {package.arch_type} model, not an anomaly "
                         "model; choose another --model")
    methods = check_methods(list(methods) if methods else package.default_methods(), package)
    timings: dict[str, float] = {}
    dev = select_device(device)  # the thread count is the caller's (the command line sets it once)
    t0 = time.perf_counter()
    if progress:
        progress(0.0, "preparing volume")
    mask_arr, source = find_brain(image, mask, brain_extraction, dev, progress)
    if detector.composite:
        return _score_fused(image, package, methods, mask_arr, source, dev, batch_size, progress, cancel, model,
                            t0, bf16, study)
    read = next((c for c in package.contract.contrasts if c in (study or {})), None)
    if read is not None:
        image = study[read]
    prepared: PreparedVolume = prepare_volume(image, mask_arr, package.contract, model_slices=True)
    if prepared.slices.shape[0] == 0:
        raise InputError(no_brain_slices_message(image, mask_arr, source))
    # the study's other contrasts this model reads, on the same model slices (same grid and mask)
    guides = {c: prepare_volume(study[c], mask_arr, package.contract, model_slices=True)
              for c in package.contract.contrasts if detector.uses_guides and study and c in study and c != read}
    timings["prepare_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    net = model if model is not None else package.load_model(dev)
    timings["load_model_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    if progress:
        progress(_SCORING_STARTS, f"scoring {prepared.slices.shape[0]} slices on {dev.type}")
    span = _SCORING_ENDS - _SCORING_STARTS
    sub = (lambda f, msg: progress(_SCORING_STARTS + span * f, msg)) if progress else None  # noqa: E731
    out = detector.score(net, prepared, package, methods, ScoringContext(dev, batch_size, sub, cancel, bf16, guides))
    timings.update(out.timings)
    timings["score_s"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    if progress:
        progress(_SCORING_ENDS, "mapping heatmaps back to the input grid")
    maps = {m: prepared.to_input_grid(out.maps[m]) for m in methods}
    smoothed = {}
    t_smooth = time.perf_counter()
    if smoothing:
        from .smoothing import BrainSmoother, smoothing_for
        smoother = BrainSmoother(mask_arr, image.GetSpacing()[::-1], 2 - prepared.layout.axial_axis)
        for m in methods:
            widths = smoothing_for(package, m)
            if widths:
                maps[m] = smoother.smooth(maps[m], *widths)
                smoothed[m] = {"through_plane_mm": widths[0], "in_plane_mm": widths[1]}
    timings["smoothing_s"] = time.perf_counter() - t_smooth
    relative = apply_scan_relative(package, maps, mask_arr) if smoothing else {}
    slice_scores = {name: prepared.to_input_slices(values) for name, values in out.slice_scores.items()}
    brain_per_input = prepared.to_input_slices(canonical=prepared.brain_voxels).astype(np.int64)
    timings["map_back_s"] = time.perf_counter() - t3
    timings["total_s"] = time.perf_counter() - t0
    if progress:
        progress(1.0, "done")
    primary = detector.primary_slice_score
    return ScoreResult(maps=maps, brain_mask=mask_arr, slice_scores=slice_scores,
                       brain_voxels_per_slice=brain_per_input, volume_score=volume_score(slice_scores[primary]),
                       axial_axis=prepared.layout.axial_axis, device=str(dev), timings=timings,
                       info={"scored_slices": int(prepared.slices.shape[0]), "fov_coverage": prepared.fov_coverage,
                             "brain_mask_source": source, "primary_slice_score": primary,
                             "volume_score_meaning": detector.volume_score_meaning,
                             "map_smoothing": smoothed, "scan_relative": relative, "bf16": bf16,
                             "engine_version": __version__, **out.info})


def no_brain_slices_message(image: sitk.Image, mask_arr: np.ndarray, source: str) -> str:
    """Why no model slice holds brain, in words: nearly always a brain region far too small."""
    ml = float(mask_arr.sum()) * float(np.prod(image.GetSpacing()[:3])) / 1000.0
    what = "the brain mask given" if source == "given" else f"the brain region found ({source})"
    return (f"{what} covers only {int(mask_arr.sum())} voxels ({ml:.2g} mL; a brain is 1000-1800 mL), too little to "
            "score any slice; give a mask of the whole brain" + ("" if source == "given" else " with --mask"))


def find_brain(image: sitk.Image, mask: sitk.Image | None, brain_extraction: str | None, dev,
               progress: ProgressFn | None) -> tuple[np.ndarray, str]:
    """The brain mask (bool, array order) and where it came from: ``mask`` when given, the
    non-zero region of a skull-stripped image, or brain extraction (see :func:`score_volume`)."""
    source = {"value": "given" if mask is not None else "non-zero region of a skull-stripped input"}

    def extractor(img: sitk.Image) -> np.ndarray:
        from .brainextract import check_brain_extraction, default_extractor, extract_brain
        ext = default_extractor() if brain_extraction == "auto" else check_brain_extraction(brain_extraction)
        if ext is None:
            raise InputError("the image does not look skull-stripped and no brain extraction model is installed; "
                             "pass a brain mask with --mask")
        if progress:
            progress(0.02, f"extracting the brain ({ext.name})")
        source["value"] = f"brain extraction ({ext.name}, manifest {ext.manifest_sha256[:12]})"
        return extract_brain(img, ext, device=str(dev))

    use_extractor = extractor if brain_extraction not in (None, "off") else None
    mask_arr = brain_mask(image, mask, use_extractor)
    return mask_arr, source["value"]


def _score_fused(image: sitk.Image, package: ModelPackage, methods: list[str], mask_arr: np.ndarray, source: str,
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
    mask_img = sitk.GetImageFromArray(mask_arr.astype(np.uint8))
    mask_img.CopyInformation(image)
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
    slice_scores: dict[str, np.ndarray] = {}
    timings: dict[str, float] = {"prepare_s": time.perf_counter() - t0}
    parts = []
    for i, (name, ms) in enumerate(by_model.items()):
        comp, net = loaded[name]
        lo, hi = _SCORING_STARTS + (_SCORING_ENDS - _SCORING_STARTS) * i / len(by_model), \
            _SCORING_STARTS + (_SCORING_ENDS - _SCORING_STARTS) * (i + 1) / len(by_model)
        sub = (lambda f, msg, lo=lo, hi=hi, name=name: progress(lo + (hi - lo) * f, f"{name}: {msg}")) \
            if progress else None
        t = time.perf_counter()
        res = score_volume(image, comp, ms, mask=mask_img, device=str(dev), batch_size=batch_size, progress=sub,
                           cancel=cancel, model=net, bf16=bf16, study=study)
        timings[f"{name}_s"] = time.perf_counter() - t
        timings["smoothing_s"] = timings.get("smoothing_s", 0.0) + res.timings.get("smoothing_s", 0.0)
        for m in ms:
            maps[m] = res.maps[m]
        slice_scores.update(res.slice_scores)
        parts.append({"model": name, "manifest_sha256": comp.manifest_sha256[:12], "methods": ms,
                      "map_smoothing": res.info.get("map_smoothing", {}),
                      "scan_relative": res.info.get("scan_relative", {})})
        axial_axis = res.axial_axis
    info: dict[str, Any] = {"components": parts, "rule": arch["rule"]}
    if "fused" in methods:
        levels = [maps[c["method"]] / scales[c["method"]] for c in comps]
        fused = fuse_levels(levels, arch["rule"], [c.get("weight", 1.0) for c in comps])
        maps = {"fused": np.where(mask_arr, fused, 0).astype(np.float32), **maps}
        mix = (arch.get("slice_score") or {}).get("parts")
        if mix:  # a chosen mix of the components' own slice scores
            fused_slices = combined_slice_scores(slice_scores, mix, {p["model"]: loaded[p["model"]][0].calibration
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


def fused_volume_meaning(arch: dict[str, Any]) -> str:
    """What a fused package's volume score is, in words."""
    from .detectors.fused import slice_score_text
    return f"mean fused slice score ({slice_score_text(arch)}) of the 10 % most anomalous brain slices"


def comp_calibration(loaded: dict[str, Any], component: dict[str, Any]):
    """The calibration of a component's own package (its levels' scale)."""
    return loaded[component["model"]][0].calibration


__all__ = ["score_volume", "ScoreResult", "ALL_METHODS", "check_methods"]
