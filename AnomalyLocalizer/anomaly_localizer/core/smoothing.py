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

and chosen by ``anomaly-localizer tune-smoothing`` (:mod:`anomaly_localizer.tooling.release.tune_smoothing`)
on synthetic anomalies in the model's validation subjects. A package without the block is
not smoothed (older packages score as they did).
"""

from __future__ import annotations

import numpy as np
import torch

from .regions import bounding_box

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
    widths = package.smoothing(method)
    if widths is None:
        return None
    return (widths.through_plane_mm, widths.in_plane_mm) if widths.through_plane_mm > 0 or widths.in_plane_mm > 0 \
        else None


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
        self.box = bounding_box(brain)
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
