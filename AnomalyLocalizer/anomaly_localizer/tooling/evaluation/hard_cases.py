"""The harder synthetic evaluation set (case set ``hard``, the default of ``evaluate``):
what users meet rather than what flatters a method.

Each case holds 1-3 anomalies inside the brain. Each anomaly is an ellipsoid with
independent semi-axes of 6-20 mm, randomly rotated; one of the MOOD kinds of
:mod:`.synthetic` (intensity shift up or down, a uniform patch, noise, tissue moved from
elsewhere, a sink or source deformation); a contrast drawn log-uniformly from barely visible
to strong; and a hard edge or a soft one that fades out over 20-70 % of the radius. The
label is where the image changed at all (more than 1 % of the brain's inter-quartile range),
so a soft edge's faint rim is anomalous too. Every voxel carries the index of the anomaly it
belongs to, so figures can be given per kind and per size.

This generator evaluates and tunes only (on validation subjects, with a seed of its own);
no model is ever trained on it. Training generators (e.g. of self-supervised detectors)
live elsewhere and share no code with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .synthetic import DEFORMATION_KINDS, KINDS

SEMI_AXIS_MM = (6.0, 20.0)
ANOMALIES_PER_CASE = (1, 3)
CHANGE_LABEL = 0.01  # share of the brain IQR that counts as a change
SIZE_BINS = (("small (mean semi-axis < 10 mm)", 0.0, 10.0), ("medium (10-15 mm)", 10.0, 15.0),
             ("large (> 15 mm)", 15.0, float("inf")))
# Contrast ranges, in the brain's inter-quartile range (shifts) or as a share of a full
# replacement (patches, noise, moved tissue) or of the strongest warp (deformations).
SHIFT_IQR = (0.25, 3.0)
BLEND = (0.2, 1.0)
WARP = (0.2, 0.9)


@dataclass
class Anomaly:
    kind: str
    semi_axes_mm: tuple[float, float, float]
    contrast: float
    soft: bool
    voxels: int = 0

    @property
    def mean_semi_axis_mm(self) -> float:
        return float(np.mean(self.semi_axes_mm))

    @property
    def size_bin(self) -> str:
        m = self.mean_semi_axis_mm
        return next(name for name, lo, hi in SIZE_BINS if lo <= m < hi)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _ellipsoid_distance(shape, spacing_zyx, centre, semi_axes, rot) -> np.ndarray:
    """Normalised ellipsoid distance (1 on the surface) of every voxel, (z,y,x)."""
    grids = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, centre, spacing_zyx)],
                        indexing="ij", sparse=True)
    d2 = 0.0
    for axis in range(3):
        proj = sum(rot[k, axis] * grids[k] for k in range(3))
        d2 = d2 + (proj / semi_axes[axis]) ** 2
    return np.sqrt(d2)


def _profile(d: np.ndarray, soft: bool, width: float) -> np.ndarray:
    """Weight 1 inside, fading to 0 at the surface over ``width`` (share of the radius) when soft."""
    if not soft:
        return (d <= 1).astype(np.float32)
    return np.clip((1 - d) / width, 0, 1).astype(np.float32) ** 1.5


def _inner_points(mask: np.ndarray, margin_vox: int) -> np.ndarray:
    inner = mask.copy()
    for _ in range(max(1, margin_vox)):
        inner = inner & np.roll(inner, 1, 0) & np.roll(inner, -1, 0) & np.roll(inner, 1, 1) & \
            np.roll(inner, -1, 1) & np.roll(inner, 1, 2) & np.roll(inner, -1, 2)
    pts = np.argwhere(inner)
    return pts if len(pts) else np.argwhere(mask)


def _apply(kind: str, out: np.ndarray, arr: np.ndarray, mask: np.ndarray, w: np.ndarray, d: np.ndarray,
           centre: np.ndarray, contrast: float, stats: tuple[float, float, float, float, float],
           rng: np.random.Generator, inner: np.ndarray) -> np.ndarray:
    q1, med, q3, p1, p99 = stats
    iqr = max(q3 - q1, 1e-6)
    if kind == "shift_up":
        return out + w * contrast * iqr
    if kind == "shift_down":
        return out - w * contrast * iqr
    if kind == "uniform":
        value = rng.uniform(p1, p99 + iqr)
        return out + w * contrast * (value - out)
    if kind == "noise":
        noise = rng.normal(med, rng.uniform(0.5, 1.5) * iqr, size=arr.shape).astype(np.float32)
        return out + w * contrast * (noise - out)
    if kind == "moved":
        src = inner[rng.integers(len(inner))].astype(float)
        shift = np.round(src - centre).astype(int)
        moved = np.roll(arr, tuple(-shift), axis=(0, 1, 2)).astype(np.float32)
        return out + w * contrast * (moved - out)
    # sink / source: resample along radially displaced coordinates inside the ellipsoid
    strength = contrast * (1 if kind == "sink" else -1)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in arr.shape], indexing="ij")
    pull = (np.clip(1 - d, 0, 1) ** 2 * strength).astype(np.float32)
    coords = [g + (g - c) * pull for g, c in zip(grids, centre)]
    norm = [2 * c / max(n - 1, 1) - 1 for c, n in zip(coords, arr.shape)]
    grid = torch.from_numpy(np.stack([norm[2], norm[1], norm[0]], -1)[None]).float()
    sampled = F.grid_sample(torch.from_numpy(out.astype(np.float32))[None, None], grid, mode="bilinear",
                            padding_mode="border", align_corners=True)[0, 0].numpy()
    return np.where(d <= 1, sampled, out)


def make_hard_case(arr: np.ndarray, mask: np.ndarray, spacing_zyx, seed: int) -> tuple[np.ndarray, np.ndarray,
                                                                                        list[Anomaly]]:
    """One seeded case: (image, int16 anomaly index per voxel (0 = normal), anomalies)."""
    rng = np.random.default_rng(seed)
    vals = arr[mask]
    stats = tuple(float(v) for v in np.percentile(vals, [25, 50, 75, 1, 99]))
    iqr = max(stats[2] - stats[0], 1e-6)
    out = arr.astype(np.float32).copy()
    ids = np.zeros(arr.shape, np.int16)
    anomalies: list[Anomaly] = []
    inner = _inner_points(mask, int(6.0 / min(spacing_zyx)))
    for i in range(int(rng.integers(ANOMALIES_PER_CASE[0], ANOMALIES_PER_CASE[1] + 1))):
        kind = KINDS[int(rng.integers(len(KINDS)))]
        semi = tuple(float(a) for a in rng.uniform(*SEMI_AXIS_MM, size=3))
        lo, hi = SHIFT_IQR if kind.startswith("shift") else WARP if kind in DEFORMATION_KINDS else BLEND
        contrast = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        soft = kind not in DEFORMATION_KINDS and bool(rng.random() < 0.5)
        centre = inner[rng.integers(len(inner))].astype(float)
        d = _ellipsoid_distance(arr.shape, spacing_zyx, centre, semi, _rotation(rng))
        w = _profile(d, soft, float(rng.uniform(0.2, 0.7)))
        before = out.copy()
        out = _apply(kind, out, arr, mask, w, d, centre, contrast, stats, rng, inner).astype(np.float32)
        out = np.where(mask, out, arr).astype(np.float32)
        changed = (np.abs(out - before) > CHANGE_LABEL * iqr) & mask
        ids[changed] = i + 1  # a later anomaly over an earlier one owns the overlap
        anomalies.append(Anomaly(kind, semi, contrast, soft))
    for i, a in enumerate(anomalies):
        a.voxels = int((ids == i + 1).sum())
    return out, ids, anomalies
