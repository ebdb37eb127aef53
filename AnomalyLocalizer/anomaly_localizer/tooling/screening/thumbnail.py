"""A small PNG of a scan's most anomalous axial slice, for worklists: the input, the map in
anomaly levels over it, and the segmentation's outline over it, side by side.

Drawn with numpy and written by SimpleITK's PNG writer, so screening needs no plotting
library. Slices are shown as radiologists read them: anterior at the top, the patient's
right on the viewer's left; pixels are square in millimetres whatever the voxel spacing;
cropped to the brain (with a margin), not the whole head.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ...core.volume import axial_layout
from ..evaluation.overview import DISPLAY_FLOOR  # the map is drawn from this share of the threshold's level up

PANEL_HEIGHT = 160  # pixels
OUTLINE_RGB = (0, 255, 102)
MAP_ALPHA = 0.85
CROP_MARGIN_MM = 8.0


def heat_colours(t: np.ndarray) -> np.ndarray:
    """Black-red-yellow-white ramp for t in 0..1, as float RGB in 0..1."""
    t = np.clip(t, 0.0, 1.0)[..., None]
    return np.clip(np.concatenate([3 * t, 3 * t - 1, 3 * t - 2], axis=-1), 0.0, 1.0)


def _resize(panel: np.ndarray, spacing_rc: tuple[float, float], height: int) -> np.ndarray:
    """Nearest-neighbour resize to ``height`` rows with square millimetre pixels."""
    rows, cols = panel.shape[:2]
    mm_per_px = rows * spacing_rc[0] / height
    width = max(1, int(round(cols * spacing_rc[1] / mm_per_px)))
    r = np.minimum((np.arange(height) * mm_per_px / spacing_rc[0]).astype(int), rows - 1)
    c = np.minimum((np.arange(width) * mm_per_px / spacing_rc[1]).astype(int), cols - 1)
    return panel[r][:, c]


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def render_thumbnail(image: sitk.Image, level_map: np.ndarray, segmentation: np.ndarray, brain: np.ndarray,
                     input_slice: int, threshold_level: float, height: int = PANEL_HEIGHT) -> np.ndarray:
    """RGB uint8 (height, width, 3) of axial slice ``input_slice`` (index along the input's
    axial axis). ``level_map``, ``segmentation`` and ``brain`` are on the input's array grid."""
    layout = axial_layout(image)
    n = layout.shape[0]
    k = n - 1 - input_slice if layout.flips[0] else input_slice  # canonical slice index
    k = int(np.clip(k, 0, n - 1))
    grey = layout.to_canonical(sitk.GetArrayViewFromImage(image))[k].astype(np.float32)
    levels = layout.to_canonical(level_map)[k]
    seg = layout.to_canonical(segmentation)[k] > 0
    inside = layout.to_canonical(brain)[k] > 0
    spacing = layout.spacing[1:]
    # The brain's in-plane extent over the whole scan (and a margin), not the whole head.
    rows, cols = np.nonzero(layout.to_canonical(brain).any(axis=0))
    if rows.size:
        mr, mc = (int(np.ceil(CROP_MARGIN_MM / s)) for s in spacing)
        r0, r1 = max(0, rows.min() - mr), min(grey.shape[0], rows.max() + mr + 1)
        c0, c1 = max(0, cols.min() - mc), min(grey.shape[1], cols.max() + mc + 1)
        grey, levels, seg, inside = (a[r0:r1, c0:c1] for a in (grey, levels, seg, inside))
    values = grey[inside] if inside.any() else grey.ravel()
    lo, hi = np.percentile(values, [1, 99.5]) if values.size else (0.0, 1.0)
    g = np.clip((grey - lo) / max(hi - lo, 1e-6), 0, 1)
    base = np.repeat(g[..., None], 3, axis=-1)
    floor = DISPLAY_FLOOR * threshold_level
    top = max(2.0 * threshold_level, floor + 1e-6)
    shown = (levels >= floor) & inside
    heat = heat_colours((levels - floor) / (top - floor))
    over = np.where(shown[..., None], (1 - MAP_ALPHA) * base + MAP_ALPHA * heat, base)
    panels = [_resize(p, spacing, height) for p in (base, over, base)]
    outline = _outline(_resize(seg, spacing, height))
    panels[2] = panels[2].copy()
    panels[2][outline] = np.array(OUTLINE_RGB) / 255.0
    gap = np.zeros((height, 4, 3))
    rgb = np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)
    return (255 * rgb + 0.5).astype(np.uint8)


def write_png(rgb: np.ndarray, path: Path) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))
    return Path(path)
