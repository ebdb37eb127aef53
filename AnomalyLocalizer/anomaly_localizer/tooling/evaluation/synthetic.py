"""Synthetic anomalies in healthy scans, in the style of the MOOD challenge, with exact labels.

Each anomaly is a ball (soft-edged where the kind allows) inside the brain at a random
position, radius drawn in mm, seeded so that a case set is reproducible. The label is
where the image really changed (by more than 5 % of the brain's inter-quartile range),
restricted to the brain. Kinds:

- ``shift_up`` / ``shift_down``: local intensity shift (hyper-/hypo-intense);
- ``uniform``: a patch of one intensity drawn from the brain's range;
- ``noise``: a patch of Gaussian noise around the brain's median;
- ``moved``: a patch copied from another place of the same brain;
- ``sink`` / ``source``: a radial deformation pulling tissue in or pushing it out.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

KINDS = ("shift_up", "shift_down", "uniform", "noise", "moved", "sink", "source")
# kinds that move tissue rather than change its intensity: a plausible-looking warp
DEFORMATION_KINDS = ("sink", "source")
LABEL_CHANGE = 0.05  # share of the brain IQR that counts as a change


def _ball(shape, spacing_zyx, centre_zyx, radius_mm) -> np.ndarray:
    """Distance from the centre in units of the radius, for every voxel: (z,y,x)."""
    grids = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, centre_zyx, spacing_zyx)],
                        indexing="ij", sparse=True)
    return np.sqrt(sum(g ** 2 for g in grids)) / radius_mm


def _random_brain_point(mask: np.ndarray, rng: np.random.Generator, margin: np.ndarray | None = None) -> np.ndarray:
    pts = np.argwhere(mask if margin is None else margin)
    if len(pts) == 0:
        pts = np.argwhere(mask)
    return pts[rng.integers(len(pts))].astype(float)


def insert_anomaly(arr: np.ndarray, mask: np.ndarray, spacing_zyx, kind: str, rng: np.random.Generator,
                   radius_mm: tuple[float, float] = (8.0, 20.0)) -> tuple[np.ndarray, np.ndarray]:
    """Return (image with one anomaly, uint8 label). ``arr`` in the input's array order (z,y,x)."""
    if kind not in KINDS:
        raise ValueError(f"unknown anomaly kind {kind!r}; known: {', '.join(KINDS)}")
    vals = arr[mask]
    q1, med, q3 = np.percentile(vals, [25, 50, 75])
    iqr = max(q3 - q1, 1e-6)
    radius = float(rng.uniform(*radius_mm))
    # keep the centre at least half a radius inside the brain
    inner = mask
    for _ in range(max(1, int(radius / 2 / min(spacing_zyx)))):
        inner = inner & np.roll(inner, 1, 0) & np.roll(inner, -1, 0) & np.roll(inner, 1, 1) & np.roll(inner, -1, 1) \
            & np.roll(inner, 1, 2) & np.roll(inner, -1, 2)
    centre = _random_brain_point(mask, rng, inner)
    d = _ball(arr.shape, spacing_zyx, centre, radius)
    soft = np.clip(1.5 - 1.5 * d, 0, 1) if kind in ("shift_up", "shift_down") else (d <= 1).astype(float)
    out = arr.astype(np.float32).copy()
    if kind == "shift_up":
        out = out + (soft * rng.uniform(1.0, 3.0) * iqr).astype(np.float32)
    elif kind == "shift_down":
        out = out - (soft * rng.uniform(1.0, 2.0) * iqr).astype(np.float32)
    elif kind == "uniform":
        value = rng.uniform(np.percentile(vals, 1), np.percentile(vals, 99) + iqr)
        out = np.where(soft > 0, value, out).astype(np.float32)
    elif kind == "noise":
        noise = rng.normal(med, rng.uniform(0.5, 1.5) * iqr, size=arr.shape).astype(np.float32)
        out = np.where(soft > 0, noise, out)
    elif kind == "moved":
        src = _random_brain_point(mask, rng, inner)
        shift = np.round(src - centre).astype(int)
        moved = np.roll(arr, tuple(-shift), axis=(0, 1, 2)).astype(np.float32)
        out = np.where(soft > 0, moved, out)
    else:  # sink / source: sample the image along radially displaced coordinates
        strength = rng.uniform(0.5, 0.9) * (1 if kind == "sink" else -1)
        grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in arr.shape], indexing="ij")
        w = np.clip(1 - d, 0, 1) ** 2 * strength
        coords = [g + (g - c) * w.astype(np.float32) for g, c in zip(grids, centre)]
        norm = [2 * c / max(n - 1, 1) - 1 for c, n in zip(coords, arr.shape)]
        grid = torch.from_numpy(np.stack([norm[2], norm[1], norm[0]], -1)[None]).float()
        sampled = F.grid_sample(torch.from_numpy(arr.astype(np.float32))[None, None], grid, mode="bilinear",
                                padding_mode="border", align_corners=True)[0, 0].numpy()
        out = np.where(d <= 1, sampled, out)
    out = np.where(mask, out, arr).astype(arr.dtype if arr.dtype.kind == "f" else np.float32)
    label = (np.abs(out - arr) > LABEL_CHANGE * iqr) & mask
    return out, label.astype(np.uint8)


def make_case(arr: np.ndarray, mask: np.ndarray, spacing_zyx, seed: int, kinds=KINDS) -> tuple[np.ndarray, np.ndarray, str]:
    """One seeded synthetic case: (image, label, kind)."""
    rng = np.random.default_rng(seed)
    kind = kinds[int(rng.integers(len(kinds)))]
    img, label = insert_anomaly(arr, mask, spacing_zyx, kind, rng)
    return img, label, kind
