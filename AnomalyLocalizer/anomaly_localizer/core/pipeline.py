"""Score one volume: the engine's main entry point, shared by the command line and Slicer.

:func:`score_volume` checks the image and the methods, finds the brain once, and hands the
volume to the package's family: a fused package scores itself from its components
(:mod:`.fused_scoring`), any other package scores with its own network or rule
(:mod:`.single`).
"""

from __future__ import annotations

import time
from typing import Callable

import SimpleITK as sitk

from ..errors import InputError
from .device import select_device
from .fused_scoring import score_fused
from .installed import check_methods
from .package import ALL_METHODS, ModelPackage
from .single import ProgressFn, ScoreResult, find_brain, no_brain_slices_message, score_package, volume_score


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
    dev = select_device(device)  # the thread count is the caller's (the command line sets it once)
    t0 = time.perf_counter()
    if progress:
        progress(0.0, "preparing volume")
    mask_arr, source = find_brain(image, mask, brain_extraction, dev, progress)
    if detector.composite:
        return score_fused(image, package, methods, mask_arr, source, dev, batch_size, progress, cancel, model,
                           t0, bf16, study)
    return score_package(image, package, methods, mask_arr, source, dev, batch_size, progress, cancel, model, t0,
                         smoothing, bf16, study)


__all__ = ["score_volume", "ScoreResult", "ALL_METHODS", "check_methods", "find_brain", "no_brain_slices_message",
           "volume_score"]
