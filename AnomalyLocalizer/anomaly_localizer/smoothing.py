"""3D smoothing of a method's heatmap on the input grid, chosen per method on validation scans.

Every model scores axial slices one at a time, so a heatmap is smooth in-plane but jumps
from slice to slice: each slice's noise is independent, while a lesion spans several
slices. A Gaussian across slices (and optionally in-plane), in mm so that it means the same
on a 1 mm and a 2 mm scan, averages the noise away and keeps the lesion. It is a normalised
convolution inside the brain, smooth(map * brain) / smooth(brain), so voxels at the brain's
edge are not pulled towards the zeros outside it.

The widths are a property of the model and method, stored in the package's model.json as

    "map_smoothing": {"elbo_grad": {"through_plane_mm": 6.0, "in_plane_mm": 2.0}, ...,
                      "selection": {...}}

and chosen by ``anomaly-localizer tune-smoothing`` (:func:`tune_package`): synthetic
anomalies (:mod:`anomaly_localizer.synthetic`, a seed of their own) in the model's
*validation* subjects are scored once without smoothing, and for each method the widths on
a small grid that give the highest pixel-wise average precision are kept. Test subjects are
never used, so the evaluation on them stays held out. A package without the block is not
smoothed (older packages score as they did).
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import numpy as np
import torch

THROUGH_PLANE_GRID_MM = (0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0)
IN_PLANE_GRID_MM = (0.0, 2.0, 4.0, 6.0)
TUNING_SEED = 1  # evaluation uses seed 0 on test subjects; tuning its own cases on validation subjects
_TINY = 1e-6
_TRUNCATE = 3.0  # kernel radius in sigmas


def _gaussian_along(t: torch.Tensor, axis: int, sigma_vox: float) -> torch.Tensor:
    """1D Gaussian (zero padding, kernel truncated at 3 sigma and summing to 1) along ``axis``
    of a 3D tensor. Computed as a linear convolution through the FFT, padded so nothing wraps
    around: the same result as a direct convolution (to float rounding), at a cost that does
    not grow with sigma. A direct conv1d with the 12 mm widths on a 1 mm scan (73 taps) made
    smoothing slower than scoring itself."""
    if sigma_vox <= 0:
        return t
    radius = max(1, int(np.ceil(_TRUNCATE * sigma_vox)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma_vox) ** 2)
    kernel = kernel / kernel.sum()
    n = t.shape[axis]
    length = _fft_length(n + 2 * radius)  # at least the full linear convolution: no wrap-around
    spectrum = torch.fft.rfft(t, n=length, dim=axis)
    shape = [1] * t.dim()
    shape[axis] = -1
    full = torch.fft.irfft(spectrum * torch.fft.rfft(kernel, n=length).view(shape), n=length, dim=axis)
    return full.narrow(axis, radius, n).contiguous()


def _fft_length(n: int) -> int:
    """The smallest even length >= n with no prime factor above 5. Extra zero padding does not
    change a linear convolution, and FFTs of such lengths are about twice as fast as of
    lengths with a large prime factor (e.g. 222 = 2 * 3 * 37)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1 and n % 2 == 0:
            return n
        n += 1


def _gaussian(values: np.ndarray, sigma_vox: list[float]) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    with torch.no_grad():
        for axis, s in enumerate(sigma_vox):
            t = _gaussian_along(t, axis, s)
    return t.numpy()


def smoothing_for(package, method: str) -> tuple[float, float] | None:
    """(through-plane, in-plane) Gaussian sigma in mm for ``method``, or None for none."""
    block = (package.meta.get("map_smoothing") or {}).get(method)
    if not block:
        return None
    through, in_plane = float(block.get("through_plane_mm", 0.0)), float(block.get("in_plane_mm", 0.0))
    return (through, in_plane) if through > 0 or in_plane > 0 else None


class BrainSmoother:
    """Normalised Gaussian smoothing inside one brain mask (array order z,y,x): sigma in mm
    across slices (along ``axial_np_axis``) and in-plane. The brain's bounding box and the
    smoothed mask (the normaliser) are computed once per mask and per widths, so smoothing
    several methods' maps of one volume costs one filtering each."""

    def __init__(self, brain: np.ndarray, spacing_zyx, axial_np_axis: int):
        self.brain = brain
        self.shape = brain.shape
        self.spacing = [float(v) for v in spacing_zyx]
        self.axial = axial_np_axis
        # Outside the brain the weighted map and the weights are 0, so working on the brain's
        # bounding box (zero padding beyond it) gives exactly the whole-volume result, faster.
        idx = np.nonzero(brain)
        self.box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx) if idx[0].size else None
        self._den: dict[tuple[float, float], np.ndarray] = {}

    def _sigma_vox(self, through_plane_mm: float, in_plane_mm: float) -> list[float]:
        sigma = [in_plane_mm / s for s in self.spacing]
        sigma[self.axial] = through_plane_mm / self.spacing[self.axial]
        return sigma

    def smooth(self, values: np.ndarray, through_plane_mm: float, in_plane_mm: float) -> np.ndarray:
        """``values`` smoothed inside the brain; 0 outside it; float32."""
        if through_plane_mm <= 0 and in_plane_mm <= 0:
            return values.astype(np.float32, copy=False)
        out = np.zeros(self.shape, np.float32)
        if self.box is None:
            return out
        b = self.brain[self.box]
        weight = b.astype(np.float32)
        sigma = self._sigma_vox(through_plane_mm, in_plane_mm)
        key = (through_plane_mm, in_plane_mm)
        if key not in self._den:
            self._den[key] = np.maximum(_gaussian(weight, sigma), _TINY)
        num = _gaussian(values[self.box].astype(np.float32) * weight, sigma)
        out[self.box] = np.where(b, num / self._den[key], 0.0)
        return out


def smooth_map(values: np.ndarray, brain: np.ndarray, spacing_zyx, axial_np_axis: int,
               through_plane_mm: float, in_plane_mm: float) -> np.ndarray:
    """Normalised Gaussian smoothing of ``values`` inside ``brain`` (both in array order z,y,x);
    sigma ``through_plane_mm`` along ``axial_np_axis``, ``in_plane_mm`` along the other two.
    0 outside the brain, float32. (One map; :class:`BrainSmoother` for several.)"""
    return BrainSmoother(brain, spacing_zyx, axial_np_axis).smooth(values, through_plane_mm, in_plane_mm)


def choose_smoothing(raw_cases: list[dict[str, Any]], methods: list[str],
                     through_grid=THROUGH_PLANE_GRID_MM, in_grid=IN_PLANE_GRID_MM,
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Per method, the grid widths with the highest pixel AP over ``raw_cases``.

    Each case: {"maps": {method: unsmoothed map}, "brain", "label", "spacing", "axial"}.
    Ties go to the narrower smoothing (listed first), so no smoothing wins unless it loses.
    """
    from .metrics import average_precision
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
                 progress: Callable[[str], None] | None = None, methods: list[str] | None = None) -> dict[str, Any]:
    """Score synthetic anomalies in healthy ``subjects`` without smoothing and return the
    package's new ``map_smoothing`` block. With ``methods``, only those are tuned (and
    scored, which saves the restoration's minutes when it is not among them); the other
    methods keep the widths and selection curves the package already has."""
    from .device import select_device
    from .evaluate import synthetic_cases
    from .pipeline import check_methods, score_volume

    dev = select_device(device)
    model = package.load_model(dev)
    methods = check_methods(list(methods), package) if methods else list(package.methods)
    # Methods not tuned now keep their widths, which must come from the same cases (checked
    # before any scoring, so a refusal costs nothing).
    old = package.meta.get("map_smoothing") or {}
    kept = {m: v for m, v in old.items() if m != "selection" and m not in methods}
    old_selection = old.get("selection", {})
    here = {"subjects": [s.id for s in subjects], "per_subject": per_subject, "seed": TUNING_SEED}
    if kept and any(old_selection.get(k) != v for k, v in here.items()):
        from .errors import InputError
        raise InputError("the methods not tuned now were tuned on other cases (subjects, per-subject or seed "
                         "differ); tune every method together (leave out --method)")
    raw = []
    for case in synthetic_cases(subjects, per_subject=per_subject, seed=TUNING_SEED):
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


def add_parser(sub) -> None:
    from .cli import add_tuning_arguments
    r = sub.add_parser("tune-smoothing",
                       help="choose each method's 3D heatmap smoothing on synthetic anomalies in validation scans")
    r.add_argument("model", help="model name or folder")
    add_tuning_arguments(r, limit=None)
    r.add_argument("--per-subject", type=int, default=2, help="synthetic anomalies per subject (default 2)")
    r.add_argument("--method", action="append",
                   help="tune only this method (repeatable); the others keep their widths. Default: every method")
    r.set_defaults(func=_cmd)


def _cmd(args) -> int:
    from .cli import _subjects_of, changed_copy, store_and_recalibrate
    from .package import resolve_package
    from .pipeline import check_methods

    if args.method:  # refused before any copy is made, naming the model the user gave
        check_methods(args.method, resolve_package(args.model))
    with changed_copy(args.model, args.out, args.in_place) as package:
        say = None if args.quiet else (lambda m: print(m, file=sys.stderr))
        subjects = _subjects_of(package, args.data, args.subjects)
        if args.limit:
            subjects = subjects[: args.limit]
        block = tune_package(package, subjects, args.per_subject, args.device, say, methods=args.method)
        chosen = ", ".join(f"{m} {v['through_plane_mm']:g}/{v['in_plane_mm']:g} mm" for m, v in block.items()
                           if m != "selection" and (not args.method or m in args.method))
        store_and_recalibrate(package, "map_smoothing", block, args.data, args.device, say,
                              f"smoothing (through-plane/in-plane sigma) {chosen}")
    return 0
