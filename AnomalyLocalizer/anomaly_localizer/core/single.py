"""One package's maps of one volume, on the input's exact grid.

The steps are the same for every detector family that scores with its own network (or rule):
prepare the model's axial slices (:mod:`core.volume`), let the family score them
(:mod:`core.detectors`), map the results back onto the input's exact grid, apply each
method's 3D smoothing (:mod:`core.smoothing`) and, where the package asks, make the map
relative to the scan's own (:mod:`core.relative`). The brain is found before
(:func:`find_brain`), once per run; a fused package's components each come here
(:mod:`.fused_scoring`), and :func:`.pipeline.score_volume` is the entry for both.
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
from .package import ModelPackage
from .relative import apply_scan_relative
from .volume import PreparedVolume, brain_mask, prepare_volume

ProgressFn = Callable[[float, str], None]
VOLUME_SCORE_TOP_FRACTION = 0.1
# Shares of a run's progress: preparing (brain extraction included), scoring, mapping back.
SCORING_STARTS, SCORING_ENDS = 0.1, 0.85


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


def score_package(image: sitk.Image, package: ModelPackage, methods: list[str], mask_arr: np.ndarray, source: str,
                  dev, batch_size: int | None = None, progress: ProgressFn | None = None,
                  cancel: Callable[[], bool] | None = None, model=None, t0: float | None = None,
                  smoothing: bool = True, bf16: bool = False,
                  study: dict[str, sitk.Image] | None = None, smoothers: dict | None = None) -> ScoreResult:
    """The maps of ``methods`` (checked) of one non-fused ``package`` on ``image``, whose brain
    ``mask_arr`` was found already (``source`` says how); the arguments are
    :func:`.pipeline.score_volume`'s. ``smoothers``: a dict that keeps the brain smoother (its
    bounding box and normalisers) for the next package scored with the same mask (a fused model's)."""
    detector = package.detector
    t0 = time.perf_counter() if t0 is None else t0
    timings: dict[str, float] = {}
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
        progress(SCORING_STARTS, f"scoring {prepared.slices.shape[0]} slices on {dev.type}")
    span = SCORING_ENDS - SCORING_STARTS
    sub = (lambda f, msg: progress(SCORING_STARTS + span * f, msg)) if progress else None  # noqa: E731
    out = detector.score(net, prepared, package, methods, ScoringContext(dev, batch_size, sub, cancel, bf16, guides))
    timings.update(out.timings)
    timings["score_s"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    if progress:
        progress(SCORING_ENDS, "mapping heatmaps back to the input grid")
    maps = {m: prepared.to_input_grid(out.maps[m]) for m in methods}
    smoothed = {}
    t_smooth = time.perf_counter()
    if smoothing:
        from .smoothing import BrainSmoother, smoothing_for
        key = (image.GetSpacing(), prepared.layout.axial_axis)
        smoother = (smoothers or {}).get(key) or BrainSmoother(mask_arr, image.GetSpacing()[::-1],
                                                               2 - prepared.layout.axial_axis)
        if smoothers is not None:
            smoothers[key] = smoother
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
        arr, source["value"] = extract_whole_head(img, brain_extraction, dev, progress)
        return arr

    use_extractor = extractor if brain_extraction not in (None, "off") else None
    mask_arr = brain_mask(image, mask, use_extractor)
    return mask_arr, source["value"]


def extract_whole_head(image: sitk.Image, brain_extraction: str | None, dev, progress: ProgressFn | None
                       ) -> tuple[np.ndarray, str]:
    """The brain of a whole-head ``image`` by brain extraction ("auto": the installed model,
    or a model's name or folder) and where it came from."""
    from .brainextract import check_brain_extraction, default_extractor, extract_brain
    ext = default_extractor() if brain_extraction == "auto" else check_brain_extraction(brain_extraction)
    if ext is None:
        raise InputError("the image does not look skull-stripped and no brain extraction model is installed; "
                         "pass a brain mask with --mask")
    if progress:
        progress(0.02, f"extracting the brain ({ext.name})")
    return extract_brain(image, ext, device=str(dev)), f"brain extraction ({ext.name}, manifest {ext.manifest_sha256[:12]})"


