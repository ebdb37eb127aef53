"""Reading images and masks, and checking what the files really hold.

SimpleITK reads NIfTI, NRRD, MHA and DICOM series; its NIfTI reader silently turns NaN and
Inf into 0, so for NIfTI files the raw voxel data are checked here as well.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

# NIfTI datatype codes of floating-point voxels and their numpy types (little-endian base).
_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8", 32: "c8", 1792: "c16"}
GEOMETRY_TOLERANCE = 1e-4
MIN_SPACING_MM, MAX_SPACING_MM = 0.05, 20.0  # beyond these a header's voxel size is wrong, not a scan's


def read_image(path: str | os.PathLike, what: str = "INPUT", series: str | None = None) -> sitk.Image:
    """Read a 3D scalar image from a file or a DICOM series folder, with one-line errors.
    ``series``: the DICOM series instance UID to read from a folder holding several."""
    from .paths import check_name, check_readable_kind, undecodable_entry
    check_name(path, what)  # before any system call: SimpleITK aborts the process on such a name
    path = Path(path)
    if not path.exists():
        blocked = next((p for p in path.absolute().parents if p.exists() and not os.access(p, os.X_OK)), None)
        if blocked is not None:
            raise InputError(f"cannot reach {what} {path}: the folder {blocked} cannot be opened (permission denied)")
        raise InputError(f"{what} {path} does not exist; check the path")
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        raise InputError(f"cannot read {what} {path}: permission denied; make it readable or copy it")
    check_readable_kind(path, what)  # a FIFO would block the first open for ever
    if path.is_dir():
        odd = undecodable_entry(path)
        if odd is not None:
            raise InputError(f"{what} folder {path} holds a file whose name is not UTF-8 text ({odd}); rename it or "
                             "move it out of the folder")
    if path.is_file() and _is_nifti(path):
        problem = nifti_sform_problem(path) or nifti_type_problem(path)
        if problem:
            raise InputError(f"{what} {path}: {problem}")
    from .cstderr import quiet_c_stderr
    try:
        with quiet_c_stderr() as said:  # ITK's and its C readers' own lines: the checks below say it in words
            if path.is_dir():
                image = _read_dicom_series(path, what, series)
            else:
                image = sitk.ReadImage(str(path))
    except InputError:
        raise
    except (RuntimeError, TypeError) as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()] + said
        # ITK reports a file it could not finish reading with a stale system error ("No such
        # file or directory") although the file is there: say what it is instead.
        lines = [ln for ln in lines if "No such file or directory" not in ln] or ["the file is incomplete or corrupt"]
        reason = lines[-1].removeprefix("ITK ERROR: ")
        raise InputError(f"cannot read {what} {path} ({reason[:160]}): the file is incomplete, corrupt or not an "
                         "image; copy it again, or give a complete NIfTI, NRRD, MHA file or a DICOM series folder") \
            from exc
    check_image(image, path, what)
    if path.is_file() and _is_nifti(path):
        problem = nifti_geometry_problem(path, image)
        if problem:
            raise InputError(f"{what} {path}: {problem}")
    return image


def _nifti_sform(path: Path) -> np.ndarray | None:
    """The 3x4 sform (voxel to RAS world, mm) of a NIfTI-1 file whose sform_code is set, else None."""
    try:
        opener = gzip.open if _is_gzip(path) else open
        with opener(path, "rb") as f:
            head = f.read(348)
    except (OSError, EOFError):
        return None
    if len(head) < 348:
        return None
    endian = "<" if int(np.frombuffer(head[:4], "<i4")[0]) == 348 else ">"
    if int(np.frombuffer(head[:4], endian + "i4")[0]) != 348:
        return None
    if int(np.frombuffer(head[254:256], endian + "i2")[0]) <= 0:
        return None
    return np.frombuffer(head[280:328], endian + "f4").reshape(3, 4).astype(float)


def nifti_geometry_problem(path: Path, image: sitk.Image) -> str | None:
    """Why the grid ITK read from a NIfTI file is not the one its sform states, or None.
    ITK prefers the qform in some cases (e.g. a negative ``pixdim``, which ITK takes at face
    value): the image would be scored mirrored or shifted against what the header says, so
    the two are compared voxel axis by voxel axis."""
    sform = _nifti_sform(path)
    if sform is None or not np.all(np.isfinite(sform)):
        return None
    lps = np.diag([-1.0, -1.0, 1.0]) @ sform  # NIfTI's world is RAS, ITK's is LPS
    d = np.array(image.GetDirection()).reshape(image.GetDimension(), -1)[:3, :3]
    itk_axes = d * np.array(image.GetSpacing()[:3])[None, :]
    scale = max(1.0, float(np.abs(lps[:, :3]).max()))
    if (np.abs(itk_axes - lps[:, :3]).max() > 1e-3 * scale
            or np.abs(np.array(image.GetOrigin()[:3]) - lps[:, 3]).max() > 1e-2 * scale):
        return ("the grid read from its header (qform) is not the one its sform states (e.g. a negative pixdim); the "
                "scan would be scored mirrored or shifted. Rewrite the header so that qform and sform agree (e.g. "
                "with the tool that wrote it, or nibabel) and try again")
    return None


def nifti_type_problem(path: Path) -> str | None:
    """Why a NIfTI file's voxel type or header cannot be scored, or None: complex values
    (ITK would read their real part without a word), a negative voxel size, or a qform and
    sform that disagree (:mod:`.nifti_header`)."""
    from .nifti_header import header_problem
    head = _nifti_head(path)
    if head is None:
        return None
    endian, head = head
    problem = header_problem(head, endian)
    if problem:
        return problem
    datatype = int(np.frombuffer(head[70:72], endian + "i2")[0])
    if datatype in (32, 1792, 2048):
        return ("its voxels are complex numbers (magnitude and phase); give the magnitude image as a real-valued "
                "volume (e.g. exported as magnitude by the scanner or converted with nibabel)")
    return None


def _nifti_head(path: Path) -> tuple[str, bytes] | None:
    """(endianness, first 348 bytes) of a NIfTI-1 file, or None."""
    try:
        opener = gzip.open if _is_gzip(path) else open
        with opener(path, "rb") as f:
            head = f.read(348)
    except (OSError, EOFError):
        return None
    if len(head) < 348:
        return None
    endian = "<" if int(np.frombuffer(head[:4], "<i4")[0]) == 348 else ">"
    if int(np.frombuffer(head[:4], endian + "i4")[0]) != 348:
        return None
    return endian, head


def nifti_sform_problem(path: Path) -> str | None:
    """Why a NIfTI-1 file's sform cannot be honoured, or None. ITK represents only orthogonal
    voxel axes; given a sheared sform it silently reads the qform instead, and every output
    would then land on another grid than the one the file states."""
    try:
        opener = gzip.open if _is_gzip(path) else open
        with opener(path, "rb") as f:
            head = f.read(348)
    except (OSError, EOFError):
        return None  # the reader says what is wrong with the file
    if len(head) < 348:
        return None
    endian = "<" if int(np.frombuffer(head[:4], "<i4")[0]) == 348 else ">"
    if int(np.frombuffer(head[:4], endian + "i4")[0]) != 348:
        return None
    sform_code = int(np.frombuffer(head[254:256], endian + "i2")[0])
    if sform_code <= 0:
        return None
    m = np.frombuffer(head[280:328], endian + "f4").reshape(3, 4)[:, :3].astype(float)
    norms = np.linalg.norm(m, axis=0)
    if not np.all(np.isfinite(m)) or np.any(norms == 0):
        return "its sform (voxel-to-world matrix) is degenerate; fix the header"
    cos = m / norms
    off = np.abs(cos.T @ cos - np.eye(3)).max()
    if off > 1e-3:
        return (f"its sform (voxel-to-world matrix) has non-orthogonal axes (a shear of {np.degrees(np.arcsin(min(1.0, off))):.1f} "
                "degrees); ITK would read the image on another grid and the results would be shifted. Resample it onto "
                "an orthogonal grid (e.g. with the tool that wrote it) and try again")
    return None


def dicom_series_in(folder: Path) -> list[str]:
    """The DICOM series instance UIDs of the files directly in ``folder`` (not below it).
    ITK warns on stderr, over several lines, when a folder holds no series; callers say it
    in one line, so ITK's warning is silenced for this call."""
    from .cstderr import itk_warnings_off
    with itk_warnings_off():  # restored, and safe when threads overlap
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def dicom_series_files(folder: Path, series: str) -> list[str]:
    """The files of one series in ``folder``, in the slice order GDCM sorts them into."""
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series))


def _read_dicom_series(folder: Path, what: str, wanted: str | None = None) -> sitk.Image:
    series = dicom_series_in(folder)
    if not series:
        raise InputError(f"{what} folder {folder} holds no DICOM series; give an image file or a DICOM folder")
    if wanted is not None:
        if wanted not in series:
            raise InputError(f"{what} folder {folder} no longer holds the DICOM series {wanted}; was it moved?")
        series = [wanted]
    if len(series) > 1:
        raise InputError(f"{what} folder {folder} holds {len(series)} DICOM series ({', '.join(series[:3])}...); "
                         "put the series to score in a folder of its own")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(dicom_series_files(folder, series[0]))
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    problem = uneven_slices(reader, image)
    if problem:
        raise InputError(f"{what} folder {folder}: {problem}")
    # the header fields that say the series' contrast (core.contrast.from_dicom) travel with it
    from .contrast import KEYWORDS
    for key in KEYWORDS:
        if reader.HasMetaDataKey(0, key):
            image.SetMetaData(key, reader.GetMetaData(0, key).strip())
    return image


def dicom_tags(image: sitk.Image) -> dict[str, str]:
    """The contrast-related DICOM header fields a series read by :func:`read_image` carries."""
    from .contrast import KEYWORDS
    return {key: image.GetMetaData(key) for key in KEYWORDS if image.HasMetaDataKey(key)}


SLICE_GAP_TOLERANCE = 0.1  # a gap between slice positions this share beyond the others' is a missing slice


def uneven_slices(reader: sitk.ImageSeriesReader, image: sitk.Image) -> str | None:
    """Why a DICOM series' slices are not evenly spaced (a missing or repeated slice), or
    None. ITK only warns and stacks the slices as if evenly spaced, so every output would be
    on a grid whose true spacing is uneven."""
    normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
    positions = []
    for i in range(len(reader.GetFileNames())):
        if not reader.HasMetaDataKey(i, "0020|0032"):
            return None  # no positions to check (not a spatial series)
        try:
            positions.append(float(np.dot([float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")[:3]],
                                          normal)))
        except ValueError:
            return None
    gaps = np.abs(np.diff(np.sort(positions)))
    if len(gaps) < 2:
        return None
    typical = float(np.median(gaps))
    if typical <= 0 or np.abs(gaps - typical).max() > SLICE_GAP_TOLERANCE * typical:
        return (f"its slices are unevenly spaced ({gaps.min():.3g} to {gaps.max():.3g} mm apart: a slice is missing "
                "or repeated), so the volume would be distorted; export the complete series again")
    return None


def check_image(image: sitk.Image, path: Path | None = None, what: str = "INPUT") -> None:
    """Refuse images the engine cannot score: not 3D, not scalar, non-finite voxels."""
    name = f"{what} {path}" if path is not None else what
    if image.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise InputError(f"{name} has complex-valued voxels (magnitude and phase); give the magnitude image as a "
                         "real-valued volume")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel "
                         "(colour or vector image); give a single-channel MRI volume")
    dim = image.GetDimension()
    size = image.GetSize()
    if dim == 4 and size[3] == 1:
        dim = 3
    if dim != 3:
        raise InputError(f"{name} is {dim}D (size {'x'.join(map(str, size))}); give one 3D volume "
                         "(extract a single time point or echo first)")
    if min(size[:3]) < 2:
        raise InputError(f"{name} is a single slice (size {'x'.join(map(str, size))}); give a 3D volume")
    spacing = np.array(image.GetSpacing()[:3], dtype=float)
    if not np.all(np.isfinite(spacing)) or spacing.min() < MIN_SPACING_MM or spacing.max() > MAX_SPACING_MM:
        raise InputError(f"{name} has voxels of {' x '.join(f'{v:g}' for v in spacing)} mm; an MRI scan's voxels are "
                         f"{MIN_SPACING_MM:g}-{MAX_SPACING_MM:g} mm, so its header's spacing is wrong (e.g. in cm or "
                         "m); fix the header (e.g. with the tool that wrote it) and try again")
    direction = np.array(image.GetDirection()).reshape(image.GetDimension(), -1)[:3, :3]
    off = float(np.abs(direction.T @ direction - np.eye(3)).max())
    if not np.isfinite(off) or off > 1e-3:
        # Results are written on the input's grid, and no output format holds a sheared or
        # scaled direction: NIfTI writers coerce it, so every map would land elsewhere.
        raise InputError(f"{name} has a direction matrix that is not orthonormal (its voxel axes are sheared or "
                         "scaled); results could not be written on its exact grid. Resample it onto an orthogonal "
                         "grid (e.g. with the tool that wrote it) and try again")
    if path is not None and path.is_file() and _is_nifti(path):
        complete, finite = inspect_nifti(path)
        if not complete:
            raise InputError(f"cannot read {name} (the file is shorter than its header says: truncated or "
                             "corrupt); copy the file again")
        if not finite:
            raise InputError(f"{name} contains NaN or infinite voxel values; replace them (e.g. by 0) and retry")
    arr = sitk.GetArrayViewFromImage(image)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError(f"{name} contains NaN or infinite voxel values; replace them (e.g. by 0) and retry")


def _is_nifti(path: Path) -> bool:
    n = path.name.lower()
    return n.endswith(".nii") or n.endswith(".nii.gz") or n.endswith(".hdr")


def nifti_data_is_finite(path: Path) -> bool:
    """True unless the NIfTI file's raw voxels (read without SimpleITK) hold NaN or Inf."""
    return inspect_nifti(path)[1]


def inspect_nifti(path: Path) -> tuple[bool, bool]:
    """(complete, finite) for a NIfTI-1/2 file, from its header and raw voxel bytes.

    SimpleITK reads a truncated .nii without complaint and turns NaN/Inf into 0, so both
    are checked here. Integer datatypes are always finite.
    """
    try:
        opener = gzip.open if _is_gzip(path) else open
        with opener(path, "rb") as f:
            head = f.read(540)
            if len(head) < 348:
                return False, True
            for endian in ("<", ">"):
                sizeof_hdr = int(np.frombuffer(head[:4], dtype=endian + "i4")[0])
                if sizeof_hdr in (348, 540):
                    break
            else:
                return True, True  # not a NIfTI header we know; the reader decides
            if sizeof_hdr == 348:
                dims = np.frombuffer(head[40:56], dtype=endian + "i2").astype(np.int64)
                datatype = int(np.frombuffer(head[70:72], dtype=endian + "i2")[0])
                bitpix = int(np.frombuffer(head[72:74], dtype=endian + "i2")[0])
                vox_offset = int(np.frombuffer(head[108:112], dtype=endian + "f4")[0])
                scaling = np.frombuffer(head[112:120], dtype=endian + "f4")
            else:
                dims = np.frombuffer(head[16:80], dtype=endian + "i8")
                datatype = int(np.frombuffer(head[12:14], dtype=endian + "i2")[0])
                bitpix = int(np.frombuffer(head[14:16], dtype=endian + "i2")[0])
                vox_offset = int(np.frombuffer(head[168:176], dtype=endian + "i8")[0])
                scaling = np.frombuffer(head[176:192], dtype=endian + "f8")
            ndim = int(dims[0])
            count = int(np.prod(dims[1:1 + ndim])) if 0 < ndim <= 7 else 0
            nbytes = count * max(bitpix, 0) // 8
            if path.name.lower().endswith(".hdr"):
                img = path.with_suffix(".img")
                data = img.read_bytes() if img.is_file() else b""
            else:
                f.seek(vox_offset)  # gzip files emulate seeking by reading forward
                data = f.read(nbytes)
    except (OSError, EOFError, ValueError):
        return False, True  # a broken gzip stream is an incomplete file
    if len(data) < nbytes:
        return False, True
    finite = bool(np.isfinite(scaling).all())
    if finite and datatype in _NIFTI_FLOAT_TYPES:
        dtype = np.dtype(endian + _NIFTI_FLOAT_TYPES[datatype])
        finite = bool(np.isfinite(np.frombuffer(data[:nbytes], dtype=dtype)).all())
    return True, finite


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = GEOMETRY_TOLERANCE) -> bool:
    """True when two images share size, spacing, origin and direction (within ``tol``)."""
    return (a.GetSize()[:3] == b.GetSize()[:3]
            and np.allclose(a.GetSpacing()[:3], b.GetSpacing()[:3], rtol=tol, atol=tol)
            and np.allclose(a.GetOrigin()[:3], b.GetOrigin()[:3], rtol=tol, atol=tol * 10)
            and np.allclose(np.array(a.GetDirection()).reshape(a.GetDimension(), -1)[:3, :3],
                            np.array(b.GetDirection()).reshape(b.GetDimension(), -1)[:3, :3], atol=tol))


def grid_difference(a: sitk.Image, b: sitk.Image, tol: float = GEOMETRY_TOLERANCE) -> str:
    """What differs between the grids of ``a`` and ``b`` (size, spacing, origin, direction)."""
    def fmt(values) -> str:
        return "(" + ", ".join(f"{v:g}" for v in values) + ")"
    parts = []
    if a.GetSize()[:3] != b.GetSize()[:3]:
        parts.append(f"size {fmt(a.GetSize()[:3])} vs {fmt(b.GetSize()[:3])}")
    if not np.allclose(a.GetSpacing()[:3], b.GetSpacing()[:3], rtol=tol, atol=tol):
        parts.append(f"spacing {fmt(a.GetSpacing()[:3])} vs {fmt(b.GetSpacing()[:3])} mm")
    if not np.allclose(a.GetOrigin()[:3], b.GetOrigin()[:3], rtol=tol, atol=tol * 10):
        parts.append(f"origin {fmt(np.round(a.GetOrigin()[:3], 3))} vs {fmt(np.round(b.GetOrigin()[:3], 3))} mm")
    da = np.array(a.GetDirection()).reshape(a.GetDimension(), -1)[:3, :3]
    db = np.array(b.GetDirection()).reshape(b.GetDimension(), -1)[:3, :3]
    if not np.allclose(da, db, atol=tol):
        parts.append(f"direction {fmt(np.round(da.ravel(), 3))} vs {fmt(np.round(db.ravel(), 3))}")
    return "; ".join(parts)


def as_3d(image: sitk.Image) -> sitk.Image:
    """Drop a trailing singleton 4th dimension (some NIfTI writers add one)."""
    if image.GetDimension() == 4:
        return image[:, :, :, 0]
    return image


def write_image(image: sitk.Image, path: Path, compression_level: int = 1) -> None:
    """Write an image; gzip level 1 because the default level costs seconds per volume.
    ITK's multi-line warnings are not shown: a failure raises, and callers say it in one line."""
    from .cstderr import quiet_c_stderr
    with quiet_c_stderr():
        sitk.WriteImage(image, str(path), True, compression_level)
