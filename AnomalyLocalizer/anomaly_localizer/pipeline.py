"""Score one volume: the engine's main entry point, shared by the command line and Slicer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk
import torch

from . import __version__
from .device import batch_size_for, configure_threads, is_out_of_memory, select_device
from .errors import CancelledError, InputError
from .package import ALL_METHODS, ANOMALY_TYPES, ModelPackage
from .scores import PIXEL_METHODS, SLICE_SCORES, RawTerms, concat_terms, finalise_maps, raw_terms
from .volume import PreparedVolume, brain_mask, prepare_volume

log = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]
VOLUME_SCORE_TOP_FRACTION = 0.1


@dataclass
class ScoreResult:
    """Everything one run produces; arrays are in the input's array order (z, y, x)."""

    maps: dict[str, np.ndarray]  # method -> float32 heatmap on the input grid, 0 outside the brain
    brain_mask: np.ndarray  # bool
    slice_scores: dict[str, np.ndarray]  # name -> (n_axial,) along the input's axial axis, NaN without brain
    brain_voxels_per_slice: np.ndarray
    volume_score: float
    axial_axis: int
    device: str
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def check_methods(methods: list[str] | tuple[str, ...], package: ModelPackage | None = None) -> list[str]:
    """Known, distinct methods, and (given a package) ones that package offers."""
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise InputError(f"unknown method {', '.join(unknown)}; choose from {', '.join(ALL_METHODS)}")
    if not methods:
        raise InputError(f"no method given; choose from {', '.join(ALL_METHODS)}")
    if package is not None:
        missing = [m for m in methods if m not in package.methods]
        if missing:
            raise InputError(f"model {package.name} does not offer {', '.join(missing)} (it offers "
                             f"{', '.join(package.methods)}); choose a model that does (anomaly-localizer models)")
    return list(dict.fromkeys(methods))


def _bytes_per_slice(model: torch.nn.Module, slice_size: int) -> int:
    """Rough activation memory of one slice for forward + two backward passes."""
    params = sum(p.numel() for p in model.parameters())
    pixels = slice_size * slice_size
    widths = getattr(model, "encoder")[0].out_channels
    # first layer activations dominate; x4 bytes, x8 for stored activations and gradients
    return int(4 * 8 * (pixels * (1 + widths) + params / 64))


def compute_terms(model: torch.nn.Module, slices: torch.Tensor, methods: list[str], device: torch.device,
                  batch_size: int | None = None, progress: ProgressFn | None = None,
                  cancel: Callable[[], bool] | None = None) -> RawTerms:
    """Raw terms for all slices, in batches; on out-of-memory halve the batch and retry."""
    n = slices.shape[0]
    bs = batch_size or batch_size_for(device, _bytes_per_slice(model, slices.shape[-1]), max(n, 1))
    parts: list[RawTerms] = []
    start = 0
    while start < n:
        if cancel is not None and cancel():
            raise CancelledError("cancelled by the user")
        batch = slices[start:start + bs].to(device)
        try:
            t = raw_terms(model, batch, methods)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            if not is_out_of_memory(exc) or bs == 1:
                raise
            bs = max(1, bs // 2)
            log.warning("out of memory; retrying with batches of %d slices", bs)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        parts.append(RawTerms(*(None if v is None else v.cpu() for v in
                                (t.rec_pixel, t.rec_slice, t.kl_slice, t.grad_rec, t.grad_kl))))
        start += batch.shape[0]
        if progress is not None:
            progress(0.1 + 0.7 * start / n, f"scored {start}/{n} slices")
    if not parts:
        raise InputError("no axial slice contains brain; check the brain mask")
    return concat_terms(parts)


VOLUME_SCORE_MEANING = {"elbo": "mean negative ELBO of the 10 % most anomalous brain slices",
                        "lsr": "mean lsr slice score (sum of unlikely code NLLs) of the 10 % most anomalous brain slices"}


def volume_score(per_slice: np.ndarray) -> float:
    """Mean slice score of the most anomalous 10 % of brain slices (at least one)."""
    v = np.sort(per_slice[np.isfinite(per_slice)])[::-1]
    if v.size == 0:
        return float("nan")
    k = max(1, int(round(VOLUME_SCORE_TOP_FRACTION * v.size)))
    return float(v[:k].mean())


def score_volume(image: sitk.Image, package: ModelPackage, methods: list[str] | tuple[str, ...] = PIXEL_METHODS,
                 mask: sitk.Image | None = None, device: str = "auto", batch_size: int | None = None,
                 progress: ProgressFn | None = None, cancel: Callable[[], bool] | None = None,
                 model: torch.nn.Module | None = None, brain_extraction: str | None = "auto",
                 smoothing: bool = True) -> ScoreResult:
    """Heatmaps, slice scores and the volume score of one 3D image.

    ``mask``: optional brain mask on the image's grid. Without it, a skull-stripped image's
    non-zero region is the brain, and a whole-head image is brain-extracted by
    ``brain_extraction``: "auto" (the installed brain extraction model), a model name or
    folder, or None/"off" (refuse whole-head images). ``model`` may be given to reuse an
    already loaded network of ``package``. ``smoothing``: apply the package's 3D heatmap
    smoothing (:mod:`anomaly_localizer.smoothing`); off only to tune it.
    """
    if package.architecture.get("type") not in ANOMALY_TYPES:
        raise InputError(f"model {package.name} is a {package.architecture.get('type')} model, not an anomaly "
                         "model; choose another --model")
    methods = check_methods(list(methods), package)
    timings: dict[str, float] = {}
    configure_threads()
    dev = select_device(device)
    t0 = time.perf_counter()
    if progress:
        progress(0.0, "preparing volume")
    source = {"value": "given" if mask is not None else "non-zero region of a skull-stripped input"}

    def extractor(img: sitk.Image) -> np.ndarray:
        from .brainextract import default_extractor, extract_brain
        from .package import resolve_package
        ext = default_extractor() if brain_extraction == "auto" else resolve_package(brain_extraction)
        if ext is None:
            raise InputError("the image does not look skull-stripped and no brain extraction model is installed; "
                             "pass a brain mask with --mask")
        if progress:
            progress(0.02, f"extracting the brain ({ext.name})")
        source["value"] = f"brain extraction ({ext.name}, manifest {ext.manifest_sha256[:12]})"
        return extract_brain(img, ext, device=str(dev))

    use_extractor = extractor if brain_extraction not in (None, "off") else None
    mask_arr = brain_mask(image, mask, use_extractor)
    prepared: PreparedVolume = prepare_volume(image, mask_arr, package.contract)
    if prepared.slices.shape[0] == 0:
        raise InputError("no axial slice contains brain; check the brain mask")
    timings["prepare_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    net = model if model is not None else package.load_model(dev)
    timings["load_model_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    if progress:
        progress(0.1, f"scoring {prepared.slices.shape[0]} slices on {dev.type}")
    if package.architecture["type"] == "vqvae-lsr":
        maps_model, canonical_scores, extra = _score_lsr(net, prepared, package, dev, progress, cancel)
    else:
        maps_model, canonical_scores, extra = _score_vae(net, prepared, package, methods, dev, batch_size,
                                                         progress, cancel)
    timings.update(extra.pop("timings", {}))
    timings["score_s"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    if progress:
        progress(0.85, "mapping heatmaps back to the input grid")
    maps = {m: prepared.to_input_grid(maps_model[m]) for m in methods}
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
    n_ax = prepared.layout.shape[0]
    slice_scores: dict[str, np.ndarray] = {}
    order = prepared.layout.input_slice_index(np.arange(n_ax))
    for name, values in canonical_scores.items():
        canon = np.full(n_ax, np.nan)
        canon[prepared.slice_index] = values.double().cpu().numpy()
        per_input = np.empty(n_ax)
        per_input[order] = canon
        slice_scores[name] = per_input
    brain_per_input = np.empty(n_ax, dtype=np.int64)
    brain_per_input[order] = prepared.brain_voxels
    timings["map_back_s"] = time.perf_counter() - t3
    timings["total_s"] = time.perf_counter() - t0
    if progress:
        progress(1.0, "done")
    primary = package.primary_slice_score
    return ScoreResult(maps=maps, brain_mask=mask_arr, slice_scores=slice_scores,
                       brain_voxels_per_slice=brain_per_input, volume_score=volume_score(slice_scores[primary]),
                       axial_axis=prepared.layout.axial_axis, device=str(dev), timings=timings,
                       info={"scored_slices": int(prepared.slices.shape[0]), "fov_coverage": prepared.fov_coverage,
                             "brain_mask_source": source["value"], "primary_slice_score": primary,
                             "volume_score_meaning": VOLUME_SCORE_MEANING[primary],
                             "map_smoothing": smoothed,
                             "engine_version": __version__, **extra})


def _score_vae(net, prepared: PreparedVolume, package: ModelPackage, methods: list[str], dev: torch.device,
               batch_size: int | None, progress: ProgressFn | None, cancel) -> tuple[dict, dict, dict]:
    """The gradient-family maps and, if asked, restoration; slice scores elbo, kl, rec."""
    model_mask = prepared.mask[:, 0]
    grad_methods = [m for m in methods if m in PIXEL_METHODS]
    grad_progress = progress
    if progress is not None and "restoration" in methods:
        # The gradient scores take a fraction of a second, the restoration most of the run.
        grad_progress = lambda f, msg: progress(0.1 + (f - 0.1) * 2 / 7, msg)  # noqa: E731  0.1..0.8 -> 0.1..0.3
    terms = compute_terms(net, prepared.slices, grad_methods, dev, batch_size, grad_progress, cancel)
    maps = finalise_maps(terms, model_mask, grad_methods)
    extra: dict[str, Any] = {}
    if "restoration" in methods:
        from .restoration import restoration_map
        t = time.perf_counter()
        # All slices of the volume in one batch: one optimisation, and small slices make it cheap.
        sub = (lambda f: progress(0.3 + 0.5 * f, f"restoring {prepared.slices.shape[0]} slices")) if progress else None
        maps["restoration"], record = restoration_map(net, prepared.slices.to(dev), prepared.mask.to(dev),
                                                      package.meta.get("restoration"), cancel, sub)
        maps["restoration"] = maps["restoration"].cpu()
        extra["restoration"] = record
        extra["timings"] = {"restoration_s": time.perf_counter() - t}
    scores = {"rec": terms.rec_slice, "kl": terms.kl_slice, "elbo": terms.rec_slice + terms.kl_slice}
    return maps, scores, extra


def _score_lsr(net, prepared: PreparedVolume, package: ModelPackage, dev: torch.device,
               progress: ProgressFn | None, cancel) -> tuple[dict, dict, dict]:
    """Latent space restoration: the lsr map and slice score."""
    from .lsr import lsr_scores
    from .train_lsr import DEFAULT_LSR_SCORING
    params = {**DEFAULT_LSR_SCORING, **package.meta.get("lsr", {})}
    sub = (lambda f, msg: progress(0.1 + 0.7 * f, msg)) if progress else None
    res = lsr_scores(net, prepared.slices.to(dev), prepared.mask.to(dev), prepared.slice_positions().to(dev),
                     params, sub, cancel)
    return ({"lsr": res.pixel.cpu()}, {"lsr": res.slice},
            {"lsr": {"resampled_codes": res.resampled_codes, "prior_passes": res.prior_passes}})


__all__ = ["score_volume", "ScoreResult", "SLICE_SCORES", "PIXEL_METHODS", "ALL_METHODS"]
