"""From a scanner volume to the model's axial slices, and back onto the scanner's exact grid.

The way there (:func:`prepare_volume`):

1. Find the axial axis and the in-plane axes from the direction matrix (never from array
   order) and permute/flip the voxel array into a canonical stack: slice index from
   inferior to superior, rows from anterior to posterior, columns from right to left.
   A permutation and flips are exactly invertible, so no interpolation happens here.
2. Normalise intensities per volume inside the brain with robust statistics: the brain's
   median maps to 0.5 and its inter-quartile range to 0.25 (a T1 brain then spans about
   0..1), nothing is clipped (bright or dark lesions keep their contrast), and everything
   outside the brain is 0.
3. Resample each axial slice in-plane to the model's pixel spacing and slice size, on a
   field of view centred on the brain, with a Gaussian pre-filter against aliasing.
   Slices keep the input's own axial positions: model slice k is input axial slice k.

The way back (:meth:`PreparedVolume.to_input_grid`) resamples model-space maps onto the
canonical in-plane grid and undoes the permutation, so every output has the input's size,
spacing, origin and direction.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import InputError
from .imageio import as_3d, grid_difference, same_grid
from .schema import InputContract, Normalisation

log = logging.getLogger(__name__)


class NotSkullStripped(InputError):
    """The image's non-zero region is a whole head, not a brain: brain extraction may take it
    (every other refusal of :func:`brain_mask` stands: an empty or constant image has no head)."""


# A whole head's non-zero region is several litres; a brain is about 1.0-1.8 litres.
SKULL_STRIPPED_MAX_ML = 2500.0
MASK_CHECK_MIN_ML = 500.0  # a mask filling its whole image is refused only above this (tiny test images)
# Robust statistics: a lesion can take a large share of the brain (a glioma often more than
# 5 %), which would move a 1st/99th percentile, but not the median or the quartiles. The
# defaults of what a package's input contract records (schema.Normalisation).
NORMALISATION = Normalisation().model_dump(exclude={"region", "standard"})


@dataclass(frozen=True)
class AxialLayout:
    """How the input's voxel array maps onto the canonical (slice, row, col) stack.

    ``perm`` permutes numpy array axes (z, y, x order as SimpleITK returns them);
    ``flips`` says which canonical axes are then reversed.
    """

    perm: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    spacing: tuple[float, float, float]  # mm along canonical slice, row, col
    shape: tuple[int, int, int]  # canonical shape
    axial_axis: int  # SimpleITK index axis (0=i, 1=j, 2=k) that is axial

    def to_canonical(self, arr: np.ndarray) -> np.ndarray:
        out = np.transpose(arr, self.perm)
        flip_axes = tuple(i for i, f in enumerate(self.flips) if f)
        return np.flip(out, axis=flip_axes) if flip_axes else out

    def from_canonical(self, arr: np.ndarray) -> np.ndarray:
        flip_axes = tuple(i for i, f in enumerate(self.flips) if f)
        if flip_axes:
            arr = np.flip(arr, axis=flip_axes)
        return np.ascontiguousarray(np.transpose(arr, np.argsort(self.perm)))

    def input_slice_index(self, k: int | np.ndarray) -> int | np.ndarray:
        """Index along the input's axial axis of canonical slice ``k``."""
        return self.shape[0] - 1 - k if self.flips[0] else k


def axial_layout(image: sitk.Image) -> AxialLayout:
    """Canonical layout of a 3D image from its direction matrix (LPS world coordinates)."""
    d = np.array(image.GetDirection(), dtype=float).reshape(3, 3)  # column j: direction of index axis j
    axial = int(np.argmax(np.abs(d[2, :])))
    rest = [j for j in range(3) if j != axial]
    lr = rest[int(np.argmax(np.abs(d[0, rest])))]
    ap = rest[0] if rest[1] == lr else rest[1]
    order = (axial, ap, lr)  # SimpleITK index axes for canonical slice, row, col
    # Canonical: slices go towards S (+z), rows towards P (+y), columns towards L (+x).
    flips = (d[2, axial] < 0, d[1, ap] < 0, d[0, lr] < 0)
    size, spacing = image.GetSize(), image.GetSpacing()
    return AxialLayout(perm=tuple(2 - j for j in order), flips=tuple(bool(f) for f in flips),
                       spacing=tuple(float(spacing[j]) for j in order),
                       shape=tuple(int(size[j]) for j in order), axial_axis=axial)


def background_value(arr: np.ndarray) -> float:
    """The value of a skull-stripped image's background: 0, or the constant that fills the
    volume's faces (a z-scored skull-stripped scan, e.g. BraTS, has background -mean/std)."""
    faces = np.concatenate([np.ravel(f) for f in (arr[0], arr[-1], arr[:, 0], arr[:, -1], arr[:, :, 0], arr[:, :, -1])])
    values, counts = np.unique(faces, return_counts=True)
    top = int(np.argmax(counts))
    return float(values[top]) if counts[top] >= 0.99 * faces.size else 0.0


def brain_mask(image: sitk.Image, mask: sitk.Image | None,
               extractor: "Callable[[sitk.Image], np.ndarray] | None" = None) -> np.ndarray:
    """Brain mask as a bool array in the input's array order.

    With ``mask`` given it must be on the image's grid. Without it, a skull-stripped image's
    non-background region (holes filled; background is 0 or the constant on the volume's
    faces, see :func:`background_value`) is the brain; a whole-head image goes to ``extractor``
    (the built-in brain extraction), or is refused when there is none.
    """
    if mask is not None:
        mask = as_3d(mask)
        if not same_grid(image, mask):
            raise InputError(f"the mask is on another grid than the image ({grid_difference(mask, image)}, mask vs "
                             "image); resample the mask onto the image")
        m = sitk.GetArrayFromImage(mask) > 0
        if not m.any():
            raise InputError("the brain mask is empty (no voxel > 0); give a mask that covers the brain")
        mask_ml = m.sum() * float(np.prod(image.GetSpacing()[:3])) / 1000.0
        if mask_ml > SKULL_STRIPPED_MAX_ML or (m.mean() > 0.95 and mask_ml > MASK_CHECK_MIN_ML):
            # e.g. the whole-head image given as its own mask: every voxel would be "brain"
            raise InputError(f"the brain mask covers {mask_ml:.0f} mL, {100 * m.mean():.0f} % of the image (a brain is "
                             "1000-1800 mL); it is not a brain mask. Give a mask of the brain only, or leave --mask "
                             "out to extract the brain")
        return m
    arr = sitk.GetArrayViewFromImage(image)
    background = background_value(arr)
    nonzero = sitk.GetImageFromArray((arr != background).astype(np.uint8))
    filled = sitk.GetArrayFromImage(sitk.BinaryFillhole(nonzero)) > 0
    if not filled.any():
        raise InputError("the image is all zero; there is no brain to score" if background == 0 else
                         f"the image is constant ({background:g}); there is no brain to score")
    voxel_ml = float(np.prod(image.GetSpacing()[:3])) / 1000.0
    volume_ml = filled.sum() * voxel_ml
    if volume_ml > SKULL_STRIPPED_MAX_ML or filled.mean() > 0.95:
        if extractor is not None:
            return extractor(image)
        raise NotSkullStripped(
            f"the image does not look skull-stripped (its non-zero region is {volume_ml:.0f} mL, a brain is "
            f"1000-1800 mL); pass a brain mask with --mask, or a skull-stripped image")
    return filled


def normalise_intensities(arr: np.ndarray, mask: np.ndarray, normalisation: Normalisation | None = None) -> np.ndarray:
    """Robust per-volume scaling inside ``mask`` (the contract's normalisation, by default
    :data:`NORMALISATION`): the median maps to ``median_to``, the inter-quartile range to
    ``iqr_to``; no clipping; ``background`` outside the mask."""
    norm = normalisation or Normalisation()
    values = arr[mask].astype(np.float64)
    if not np.isfinite(values).all():
        raise InputError(f"the brain region holds {int((~np.isfinite(values)).sum())} NaN or infinite voxel values; "
                         "replace them (e.g. by 0) and retry")
    q1, median, q3 = np.percentile(values, [25.0, 50.0, 75.0])
    if not q3 > q1:
        raise InputError("the brain region has (almost) uniform intensity; check the image and the brain mask")
    gain = norm.iqr_to / (q3 - q1)
    out = (arr.astype(np.float32) - np.float32(median)) * np.float32(gain) + np.float32(norm.median_to)
    if norm.standard is not None:
        inside = out[mask]
        out[mask] = standardise(inside, np.percentile(inside, norm.standard.percentiles),
                                np.asarray(norm.standard.values, dtype=np.float64))
    out[~mask] = norm.background
    return out


def standardise(values: np.ndarray, landmarks: np.ndarray, standard: np.ndarray) -> np.ndarray:
    """Map ``values`` piecewise linearly so that this scan's ``landmarks`` (its brain
    percentiles) land on ``standard``; beyond the outer landmarks the end segments go on
    linearly, so a lesion brighter than any healthy tissue keeps its contrast."""
    x = np.maximum.accumulate(np.asarray(landmarks, dtype=np.float64))
    x = x + np.arange(len(x)) * 1e-9  # strictly increasing even where percentiles tie
    y = np.asarray(standard, dtype=np.float64)
    v = values.astype(np.float64)
    out = np.interp(v, x, y)
    low, high = v < x[0], v > x[-1]
    out[low] = y[0] + (v[low] - x[0]) * (y[1] - y[0]) / (x[1] - x[0])
    out[high] = y[-1] + (v[high] - x[-1]) * (y[-1] - y[-2]) / (x[-1] - x[-2])
    return out.astype(np.float32)


def _gaussian_matrix(n: int, sigma: float) -> torch.Tensor:
    """(n,n) Gaussian blur along one axis, edges replicated, rows summing to 1."""
    if sigma <= 0.1:
        return torch.eye(n, dtype=torch.float64)
    radius = max(1, int(math.ceil(3 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (offsets / sigma) ** 2)
    k = k / k.sum()
    g = torch.zeros(n, n, dtype=torch.float64)
    rows = torch.arange(n)[:, None].expand(n, len(offsets))
    cols = (torch.arange(n)[:, None] + offsets.long()[None]).clamp(0, n - 1)
    g.index_put_((rows, cols), k[None].expand(n, -1).clone(), accumulate=True)
    return g


def _linear_weights(positions: torch.Tensor, n: int) -> torch.Tensor:
    """(len(positions), n) linear interpolation weights; positions outside [0, n-1] get none."""
    w = torch.zeros(len(positions), n, dtype=torch.float64)
    inside = (positions >= 0) & (positions <= n - 1)
    p = positions.clamp(0, n - 1)
    lo = p.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = p - lo
    idx = torch.arange(len(positions))
    w.index_put_((idx, lo), (1 - frac) * inside, accumulate=True)
    w.index_put_((idx, hi), frac * inside, accumulate=True)
    return w


def _antialias_sigma(factor: float) -> float:
    """Gaussian sigma (in input pixels) before downsampling by ``factor`` (0 when upsampling)."""
    return 0.5 * math.sqrt(factor ** 2 - 1.0) if factor > 1.0 else 0.0


def to_model_weights(n: int, spacing: float, centre: float, S: int, m: float) -> torch.Tensor:
    """(S, n) matrix: anti-alias blur then linear interpolation onto S model pixels of m mm.

    The in-plane resampling is separable (the model grid is axis-aligned with the canonical
    stack), so a slice X (rows, cols) maps to Wr @ X @ Wc.T: two small matrix products
    instead of a blur and a grid sampling over the full-resolution slice.
    """
    positions = centre + (torch.arange(S, dtype=torch.float64) - (S - 1) / 2.0) * (m / spacing)
    return _linear_weights(positions, n) @ _gaussian_matrix(n, _antialias_sigma(m / spacing))


def to_input_weights(n: int, spacing: float, centre: float, S: int, m: float) -> torch.Tensor:
    """(n, S) matrix: linear interpolation of model pixels back onto n input pixels."""
    positions = (torch.arange(n, dtype=torch.float64) - centre) * (spacing / m) + (S - 1) / 2.0
    return _linear_weights(positions, S)


# Score slices at the model's spacing when the input's are at least this many times thinner
# (a 1 mm scan for a 2 or 3 mm model: a half or a third of the slices). Below it, every input
# slice is scored: a 2 mm scan for a 3 mm model keeps its slices, so the shipped models'
# calibrations, made on 2 mm scans, hold exactly for 2 mm scans.
THROUGH_PLANE_MIN_FACTOR = 1.75


@dataclass
class PreparedVolume:
    """The model's view of one volume.

    slices: (N,1,S,S) float32 normalised model-space slices, only axial slices with brain;
    mask: (N,1,S,S) bool brain mask in model space;
    slice_index: (N,) index of each model slice on the model's axial grid;
    brain_voxels: (n_axial,) brain voxels per canonical axial slice on the input grid.

    The model's axial grid is the input's canonical slices, or, for an input with much thinner
    slices than the model's spacing (``grid_positions`` set), slices at the model's own
    spacing: ``grid_positions`` (n_grid,) holds each one's position in canonical input slice
    units, and maps and slice scores are interpolated back onto every input slice.
    """

    slices: torch.Tensor
    mask: torch.Tensor
    slice_index: np.ndarray
    layout: AxialLayout
    centre: tuple[float, float]  # field-of-view centre, canonical (row, col) pixel coordinates
    model_spacing: float
    input_mask: np.ndarray  # bool, input array order
    brain_voxels: np.ndarray
    fov_coverage: float  # fraction of brain voxels inside the model's field of view
    grid_positions: np.ndarray | None = None

    @property
    def slice_size(self) -> int:
        return int(self.slices.shape[-1])

    @property
    def n_grid(self) -> int:
        """Slices of the model's axial grid (with and without brain)."""
        return self.layout.shape[0] if self.grid_positions is None else len(self.grid_positions)

    def _from_grid(self) -> tuple[np.ndarray, torch.Tensor]:
        """(canonical slices with brain, (len, n_grid) linear weights onto them from the grid;
        beyond the grid's ends its end slices)."""
        targets = np.nonzero(self.brain_voxels > 0)[0]
        p = self.grid_positions
        u = (targets - p[0]) / (p[1] - p[0]) if len(p) > 1 else np.zeros(len(targets))
        u = np.clip(u, 0, len(p) - 1)
        return targets, _linear_weights(torch.as_tensor(u, dtype=torch.float64), len(p))

    def slice_positions(self) -> torch.Tensor:
        """(N,) each slice's relative position in the brain's axial extent, 0 at the lowest
        slice with brain, 1 at the highest: the prior of ``lsr`` is conditioned on it. Measured
        on the brain rather than the field of view, so a scan that includes the neck gets
        the same positions as one that does not."""
        idx = torch.as_tensor(self.slice_index, dtype=torch.float32)
        if idx.numel() < 2:
            return torch.full_like(idx, 0.5)
        return (idx - idx.min()) / (idx.max() - idx.min())

    def with_context(self, context_slices: int) -> torch.Tensor:
        """(N, context_slices, S, S): each model slice with its neighbours along the axial
        axis as channels (inferior first, the slice itself in the middle). A neighbour
        without brain is background, as it is in the image."""
        if context_slices <= 1:
            return self.slices
        half = context_slices // 2
        n_ax = self.n_grid
        row_of = np.full(n_ax, -1, dtype=np.int64)
        row_of[self.slice_index] = np.arange(len(self.slice_index))
        out = torch.zeros(self.slices.shape[0], context_slices, *self.slices.shape[-2:], dtype=self.slices.dtype)
        for j, offset in enumerate(range(-half, half + 1)):
            k = self.slice_index + offset
            valid = (k >= 0) & (k < n_ax)
            rows = np.where(valid, row_of[np.clip(k, 0, n_ax - 1)], -1)
            have = np.nonzero(rows >= 0)[0]
            out[have, j] = self.slices[rows[have], 0]
        return out

    def to_input_slices(self, values=None, canonical: np.ndarray | None = None) -> np.ndarray:
        """Per-slice values along the input's axial axis: ``values`` (N,) of the model slices
        (NaN for slices without brain), or ``canonical`` (n_axial,) per canonical slice."""
        n_ax = self.layout.shape[0]
        if canonical is None:
            grid = np.full(self.n_grid, np.nan)
            grid[self.slice_index] = np.asarray(values.double().cpu() if hasattr(values, "double") else values,
                                                dtype=float)
            if self.grid_positions is None:
                canonical = grid
            else:  # interpolate between the model slices, leaving out grid slices without brain
                targets, w = self._from_grid()
                have = np.isfinite(grid)
                w = w.numpy() * have[None]
                total = w.sum(axis=1)
                canonical = np.full(n_ax, np.nan)
                ok = total > 0
                canonical[targets[ok]] = (w[ok] @ np.where(have, grid, 0.0)) / total[ok]
        per_input = np.empty(n_ax, dtype=np.asarray(canonical).dtype)
        per_input[self.layout.input_slice_index(np.arange(n_ax))] = canonical
        return per_input

    def to_input_grid(self, maps: torch.Tensor) -> np.ndarray:
        """Model-space maps (N,S,S) -> float32 array in the input's array order, 0 outside the brain."""
        n_ax, rows, cols = self.layout.shape
        _, s_row, s_col = self.layout.spacing
        S, m = self.slice_size, self.model_spacing
        wr = to_input_weights(rows, s_row, self.centre[0], S, m).float()
        wc = to_input_weights(cols, s_col, self.centre[1], S, m).float()
        out = np.zeros((n_ax, rows, cols), dtype=np.float32)
        maps = maps.detach().float().cpu()
        if self.grid_positions is None:
            targets = self.slice_index
        else:  # onto every input slice with brain, through the model's thicker slices
            grid = torch.zeros(self.n_grid, S, S)
            grid[torch.as_tensor(self.slice_index)] = maps
            targets, wz = self._from_grid()
            maps = torch.einsum("tg,grc->trc", wz.float(), grid)
        res = torch.matmul(torch.matmul(wr, maps), wc.T)
        out[targets] = res.numpy()
        arr = self.layout.from_canonical(out)
        arr[~self.input_mask] = 0.0
        return arr


def resample_to_model(canon: np.ndarray, layout: AxialLayout, centre: tuple[float, float], S: int, m: float,
                      slice_index: np.ndarray) -> torch.Tensor:
    """Canonical stack (n_axial, R, C) -> model slices (N,1,S,S) for ``slice_index``."""
    _, rows, cols = canon.shape
    _, s_row, s_col = layout.spacing
    wr = to_model_weights(rows, s_row, centre[0], S, m).float()
    wc = to_model_weights(cols, s_col, centre[1], S, m).float()
    x = torch.from_numpy(np.ascontiguousarray(canon[slice_index], dtype=np.float32))
    return torch.matmul(torch.matmul(wr, x), wc.T)[:, None]


def model_grid(lo: int, hi: int, slice_mm: float, model_mm: float) -> np.ndarray | None:
    """Positions (canonical slice units) of axial slices ``model_mm`` apart over the brain's
    slices lo..hi, centred on them; None when the input's slices are not much thinner."""
    step = model_mm / slice_mm
    if step < THROUGH_PLANE_MIN_FACTOR or hi <= lo:
        return None
    k = int(np.floor((hi - lo) / step)) + 1
    start = lo + ((hi - lo) - (k - 1) * step) / 2.0
    return start + np.arange(k) * step


def prepare_volume(image: sitk.Image, mask: np.ndarray, contract: InputContract | dict[str, Any],
                   model_slices: bool = False) -> PreparedVolume:
    """Normalise, reorient and resample a volume for a model with the given input contract.
    ``model_slices``: for an input with much thinner slices than the model's spacing, score
    slices at the model's own spacing (anti-aliased through the plane, as in the plane)
    instead of every input slice; the maps still come back onto every input voxel."""
    if not isinstance(contract, InputContract):
        contract = InputContract.model_validate(contract)
    S, m = contract.slice_size, contract.spacing_mm
    layout = axial_layout(image)
    arr = sitk.GetArrayViewFromImage(image)
    norm = normalise_intensities(arr, mask, contract.normalisation)
    canon = layout.to_canonical(norm)
    canon_mask = layout.to_canonical(mask)

    brain_voxels = canon_mask.sum(axis=(1, 2))
    slice_index = np.nonzero(brain_voxels > 0)[0]
    rows_any = np.nonzero(canon_mask.any(axis=(0, 2)))[0]
    cols_any = np.nonzero(canon_mask.any(axis=(0, 1)))[0]
    centre = ((rows_any[0] + rows_any[-1]) / 2.0, (cols_any[0] + cols_any[-1]) / 2.0)

    # Fraction of the brain inside the square field of view of S*m mm.
    _, s_row, s_col = layout.spacing
    half = (S - 1) / 2.0 * m
    rr = np.abs((np.arange(layout.shape[1]) - centre[0]) * s_row) <= half + 1e-6
    cc = np.abs((np.arange(layout.shape[2]) - centre[1]) * s_col) <= half + 1e-6
    inside = canon_mask[:, rr][:, :, cc].sum()
    coverage = float(inside / max(1, canon_mask.sum()))
    if coverage < 0.999:
        log.warning("%.1f %% of the brain lies outside the model's %g mm field of view and is not scored",
                    100 * (1 - coverage), S * m)

    grid = model_grid(int(slice_index[0]), int(slice_index[-1]), layout.spacing[0], m) if model_slices and \
        slice_index.size else None
    if grid is None:
        slices = resample_to_model(canon, layout, centre, S, m, slice_index)
        mask_model = resample_to_model(canon_mask.astype(np.float32), layout, centre, S, m, slice_index) > 0.5
    else:
        # In the plane for every slice the grid draws on, then through the plane onto the grid.
        n_ax = layout.shape[0]
        wz = to_model_weights(n_ax, 1.0, float(np.mean(grid[[0, -1]])), len(grid), float(grid[1] - grid[0])
                              if len(grid) > 1 else 1.0).float()
        used = np.nonzero(wz.abs().sum(axis=0).numpy() > 0)[0]
        wz = wz[:, torch.as_tensor(used)]
        planes = resample_to_model(canon, layout, centre, S, m, used)[:, 0]
        planes_mask = resample_to_model(canon_mask.astype(np.float32), layout, centre, S, m, used)[:, 0]
        slices = torch.einsum("gu,urc->grc", wz, planes)[:, None]
        mask_grid = torch.einsum("gu,urc->grc", wz, planes_mask)[:, None] > 0.5
        slice_index = np.nonzero(mask_grid.flatten(1).any(dim=1).numpy())[0]
        keep = torch.as_tensor(slice_index)
        slices, mask_model = slices[keep], mask_grid[keep]
    return PreparedVolume(slices=slices, mask=mask_model, slice_index=slice_index, layout=layout, centre=centre,
                          model_spacing=m, input_mask=mask, brain_voxels=brain_voxels, fov_coverage=coverage,
                          grid_positions=grid)


def image_like(arr: np.ndarray, reference: sitk.Image, pixel_type: int | None = None) -> sitk.Image:
    """An image with ``arr``'s voxels and ``reference``'s exact geometry."""
    img = sitk.GetImageFromArray(arr)
    if pixel_type is not None:
        img = sitk.Cast(img, pixel_type)
    img.CopyInformation(as_3d(reference))
    return img
