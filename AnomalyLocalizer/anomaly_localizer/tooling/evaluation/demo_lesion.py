"""The demo's lesion: one that a T1 shows as a lesion, for the README's picture.

A lesion on T1 (a chronic infarct, a demyelinating plaque, a low-grade tumour) is darker than
the white matter around it, irregular and soft-edged. Here: a union of 3-5 overlapping
ellipsoids (7-12 mm semi-axes) in the white matter, its surface warped by smooth noise, that
fades into the tissue over a few millimetres, filled with an intensity near CSF's (the brain's
3rd-8th percentile, as a chronic infarct or a black hole shows on T1) and the tissue's own texture kept at reduced contrast.
The label is where the lesion makes up at least half of the voxel.

This generator makes the demo's picture only: no model is trained or chosen on it, and no
evaluation uses it (:mod:`.hard_cases` and :mod:`.synthetic` seed the evaluation sets).
"""

from __future__ import annotations

import numpy as np


def _smooth_noise(shape, rng: np.random.Generator, scale_vox: float) -> np.ndarray:
    """Zero-mean noise of unit spread, smooth over about ``scale_vox`` voxels."""
    import SimpleITK as sitk
    noise = sitk.GetArrayFromImage(sitk.DiscreteGaussian(sitk.GetImageFromArray(rng.standard_normal(shape)),
                                                         float(scale_vox) ** 2))
    return noise / (noise.std() + 1e-8)


def _depth_mm(brain: np.ndarray, spacing_zyx) -> np.ndarray:
    """Distance of each brain voxel from the brain's surface, in mm."""
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(brain.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    inside = sitk.SignedMaurerDistanceMap(img, insideIsPositive=True, squaredDistance=False, useImageSpacing=True)
    return np.clip(sitk.GetArrayFromImage(inside), 0, None)


def insert_t1_lesion(arr: np.ndarray, brain: np.ndarray, spacing_zyx, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(image with the lesion, uint8 label) for a T1 ``arr`` (numpy z, y, x) and its brain mask."""
    spacing = np.asarray(spacing_zyx, dtype=float)
    inside = arr[brain]
    white_level = np.percentile(inside, 80)
    # a centre deep in white matter: bright voxels at least 15 mm inside the brain
    depth = _depth_mm(brain, spacing)
    candidates = np.argwhere((arr >= white_level) & (depth >= 15.0))
    if len(candidates) == 0:
        candidates = np.argwhere(depth >= depth.max() * 0.6)
    centre = candidates[rng.integers(len(candidates))].astype(float)
    lo = np.maximum(0, (centre - 25.0 / spacing).astype(int))
    hi = np.minimum(arr.shape, (centre + 25.0 / spacing).astype(int) + 1)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    zz, yy, xx = np.meshgrid(*[np.arange(a, b) * s for a, b, s in zip(lo, hi, spacing)], indexing="ij")
    c_mm = centre * spacing
    field = np.full(zz.shape, np.inf)
    for _ in range(int(rng.integers(3, 6))):  # overlapping lobes around the centre
        offset = rng.normal(0.0, 4.0, 3)
        radii = rng.uniform(7.0, 12.0, 3)
        d = np.sqrt(((zz - c_mm[0] - offset[0]) / radii[0]) ** 2 + ((yy - c_mm[1] - offset[1]) / radii[1]) ** 2
                    + ((xx - c_mm[2] - offset[2]) / radii[2]) ** 2)
        field = np.minimum(field, d)
    field = field + 0.25 * _smooth_noise(field.shape, rng, 2.0 / spacing.min())  # an irregular surface
    edge_mm = rng.uniform(2.0, 4.0)
    weight = 1.0 / (1.0 + np.exp((field - 1.0) * 8.0 / edge_mm * 2.0))  # soft edge over a few mm
    weight *= brain[box]
    target = np.percentile(inside, rng.uniform(3, 8))
    local = arr[box].astype(np.float32)
    texture = (local - np.median(local[brain[box]])) * 0.4  # the tissue's texture at reduced contrast
    out = arr.astype(np.float32).copy()
    out[box] = local * (1 - weight) + weight * (target + texture)
    label = np.zeros(arr.shape, np.uint8)
    label[box] = (weight >= 0.5).astype(np.uint8)
    return out, label
