"""A NIfTI-1 header that contradicts itself, found before ITK reads it.

A NIfTI-1 header states the voxel-to-world geometry twice: the qform (a rotation, voxel
sizes and an offset) and the sform (a general matrix). ITK reads the sform when it is set
and ignores the qform, so a file whose two disagree (shifted, rotated) would be scored on
one of them with no trace of the other; and a negative voxel size (``pixdim``), which the
standard forbids, is taken at face value when only a qform is set, mirroring the scan.
Both are refused: the grid the results would be written on is not the one every tool
agrees on.
"""

from __future__ import annotations

import numpy as np

QFORM_SHIFT_MM = 0.1  # origins further apart than this disagree
QFORM_AXIS_TOLERANCE = 1e-3  # relative difference of voxel axes that counts as disagreeing


def qform_affine(head: bytes, endian: str) -> np.ndarray:
    """The 3x4 qform (voxel to RAS world, mm) of a NIfTI-1 header."""
    b, c, d = (float(v) for v in np.frombuffer(head[256:268], endian + "f4"))
    offset = np.frombuffer(head[268:280], endian + "f4").astype(float)
    pixdim = np.frombuffer(head[76:108], endian + "f4").astype(float)
    qfac = -1.0 if pixdim[0] < 0 else 1.0
    a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    r = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                  [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                  [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])
    scale = np.abs(pixdim[1:4]) * np.array([1.0, 1.0, qfac])
    return np.hstack([r * scale[None, :], offset[:, None]])


def header_problem(head: bytes, endian: str) -> str | None:
    """Why a NIfTI-1 header's geometry cannot be trusted (a negative voxel size; a qform
    and sform that disagree), or None."""
    ndim = int(np.frombuffer(head[40:42], endian + "i2")[0])
    pixdim = np.frombuffer(head[76:108], endian + "f4").astype(float)
    used = pixdim[1:1 + max(1, min(3, ndim))]
    if np.any(used < 0):
        return (f"its header gives a negative voxel size (pixdim {', '.join(f'{v:g}' for v in used)}), which NIfTI "
                "does not allow: readers disagree on its grid (qform vs sform) and the scan could be read mirrored. Rewrite the header with positive voxel sizes "
                "(e.g. with the tool that wrote it, or nibabel) and try again")
    qform_code = int(np.frombuffer(head[252:254], endian + "i2")[0])
    sform_code = int(np.frombuffer(head[254:256], endian + "i2")[0])
    if qform_code <= 0 or sform_code <= 0:
        return None
    q = qform_affine(head, endian)
    s = np.frombuffer(head[280:328], endian + "f4").reshape(3, 4).astype(float)
    if not (np.all(np.isfinite(q)) and np.all(np.isfinite(s))):
        return None  # a degenerate sform is said by the sform check
    scale = max(1.0, float(np.abs(s[:, :3]).max()))
    shift = float(np.linalg.norm(q[:, 3] - s[:, 3]))
    axes = float(np.abs(q[:, :3] - s[:, :3]).max())
    if shift <= QFORM_SHIFT_MM and axes <= QFORM_AXIS_TOLERANCE * scale:
        return None
    qn = q[:, :3] / np.maximum(np.linalg.norm(q[:, :3], axis=0), 1e-12)
    sn = s[:, :3] / np.maximum(np.linalg.norm(s[:, :3], axis=0), 1e-12)
    angle = float(np.degrees(np.arccos(np.clip(np.sum(qn * sn, axis=0), -1.0, 1.0))).max())
    return (f"its qform and sform (the header's two voxel-to-world matrices) disagree (origins {shift:.3g} mm apart, "
            f"axes up to {angle:.3g} degrees apart); no one can tell which grid is right. Rewrite the header so that "
            "qform and sform agree (e.g. nibabel: img.set_qform(img.get_sform())) and try again")
