"""Healthy brains in contrasts we have no scans of, rendered from their anatomy.

No healthy FLAIR, T2 or T1c scan is reachable; healthy T1 scans with a parcellation are
(``../shared/data/ixi_t1_2mm``: DLMUSE, 149 regions). As in SynthSeg (Billot et al. 2023) a
contrast is learned from renderings of the label maps, but the real T1's own texture is kept:
each voxel's T1 intensity goes through a piecewise-linear map that sends the T1's own CSF,
grey-matter and white-matter medians to the target contrast's tissue intensities (drawn per
rendering in that contrast's tissue order). Partial-volume voxels between two tissues then
fall between their rendered intensities, as in a real scan of that contrast, and the map is
decreasing where the contrast reverses T1's order (T2: CSF brightest; FLAIR: grey matter
above white matter, CSF suppressed).

On top of the tissue map, what healthy scans of each contrast show and a detector must learn
is normal: per-region variation (every DLMUSE region its own small gain, smoothed across
borders), deep grey matter's own contrast (the pallidum dark on T2), on FLAIR the
periventricular caps and rim, the hippocampi and the choroid plexus brighter, on T1c
enhancing vessels in the sulci and the choroid plexus; then noise and blur. Bias fields and
global contrast changes are the trainings' own augmentation (:mod:`.training.train_dae`).

The renderings of one subject in several contrasts share its anatomy: a co-registered study.
:func:`render_folder` writes a training folder of renderings that the trainings, calibration
and evaluation read like any folder of scans (flat layout, ``<subject>~<contrast>~<k>``), so
a subject's renderings stay on one side of every split (:func:`..data.split_subjects`).
"""

from __future__ import annotations

import json
import time
from functools import lru_cache
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from ..core.contrast import CONTRASTS
from ..errors import InputError

# DLMUSE single regions by tissue (../shared/data/ixi_t1_2mm/dlmuse/MUSE_listROIs.csv).
CSF_CORTICAL = (1,)
VENTRICLES_LATERAL = (49, 50, 51, 52)  # inferior lateral and lateral ventricles
VENTRICLES_OTHER = (4, 11)
WHITE_MATTER = (40, 41, 61, 62, 81, 82, 83, 84, 85, 86, 87, 88, 89, 90, 91, 92, 93, 94, 95)
PALLIDUM = (55, 56)
DEEP_GREY = (23, 30, 36, 37, 57, 58, 59, 60, 75, 76)  # accumbens, caudate, putamen, thalamus, basal forebrain
MESIAL_TEMPORAL = (31, 32, 47, 48)  # amygdala, hippocampus: brighter on FLAIR and T2
BRAINSTEM = (35,)
SEPARATOR = "~"  # <subject>~<contrast>~<k>: the subject a rendering belongs to comes first


@dataclass(frozen=True)
class TissueRanges:
    """A contrast's tissue intensities relative to white matter (= 1), as (low, high) ranges
    one rendering draws from; ``*_gain`` multiply the tissue map in those regions."""

    csf: tuple[float, float]
    grey: tuple[float, float]
    pallidum_gain: tuple[float, float] = (1.0, 1.0)
    deep_grey_gain: tuple[float, float] = (1.0, 1.0)
    mesial_temporal_gain: tuple[float, float] = (1.0, 1.0)
    periventricular_gain: tuple[float, float] = (1.0, 1.0)  # white matter next to the lateral ventricles
    choroid: tuple[float, float] | None = None  # choroid plexus in the lateral ventricles, relative to WM
    sulcal_enhancement: tuple[float, float] | None = None  # enhancing vessels in the sulci (T1c)


# Tissue orders as radiology texts give them (relative to white matter): T1 CSF < GM < WM;
# T1c the same with enhancing vessels and choroid plexus; T2 WM < GM < CSF, pallidum dark;
# FLAIR CSF dark, WM < GM, caps and rim bright, hippocampi brighter; PD low contrast, CSF >= GM.
TISSUES: dict[str, TissueRanges] = {
    "t1": TissueRanges(csf=(0.22, 0.40), grey=(0.55, 0.72)),
    "t1c": TissueRanges(csf=(0.18, 0.36), grey=(0.55, 0.75), choroid=(1.1, 1.6), sulcal_enhancement=(1.0, 1.5)),
    "t2": TissueRanges(csf=(2.2, 3.6), grey=(1.25, 1.65), pallidum_gain=(0.75, 0.92), deep_grey_gain=(0.9, 1.05),
                       mesial_temporal_gain=(1.0, 1.12)),
    "flair": TissueRanges(csf=(0.12, 0.45), grey=(1.12, 1.45), pallidum_gain=(0.8, 0.95), deep_grey_gain=(0.9, 1.02),
                          mesial_temporal_gain=(1.05, 1.25), periventricular_gain=(1.08, 1.45),
                          choroid=(0.6, 1.3)),
    "pd": TissueRanges(csf=(1.05, 1.45), grey=(1.08, 1.3)),
}
WHITE_MATTER_LEVEL = 1000.0  # rendered white matter's intensity (arbitrary units, as a scanner's)


@dataclass(frozen=True)
class Rendering:
    """What one rendering drew (recorded beside the image)."""

    contrast: str
    csf: float
    grey: float
    noise: float  # Gaussian noise sigma, relative to white matter
    blur_voxels: float
    region_spread: float


def tissue_medians(t1: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """The T1's own CSF (lateral ventricles, else all CSF), cortical grey and white matter medians."""
    def median_of(ids) -> float:
        v = t1[np.isin(labels, ids)]
        return float(np.median(v)) if v.size else float("nan")

    csf = median_of(VENTRICLES_LATERAL)
    if not np.isfinite(csf):
        csf = median_of(CSF_CORTICAL + VENTRICLES_OTHER)
    wm = median_of(WHITE_MATTER)
    grey_ids = [i for i in np.unique(labels) if i > 0 and i not in set(
        CSF_CORTICAL + VENTRICLES_LATERAL + VENTRICLES_OTHER + WHITE_MATTER + PALLIDUM + DEEP_GREY + BRAINSTEM)]
    gm = median_of(grey_ids)
    if not (np.isfinite(csf) and np.isfinite(gm) and np.isfinite(wm)) or not csf < gm < wm:
        raise InputError(f"the T1's tissue medians are not in T1 order (CSF {csf:.4g}, grey {gm:.4g}, white "
                         f"{wm:.4g}); is the image a T1 and the parcellation its own?")
    return csf, gm, wm


def tissue_map(t1: np.ndarray, points: tuple[float, float, float], targets: tuple[float, float, float]) -> np.ndarray:
    """Piecewise-linear map of intensities through (T1 median -> target) of CSF, grey and white
    matter, extended linearly beyond both ends (never below 2 % of white matter)."""
    x = np.asarray(points, float)
    y = np.asarray(targets, float)
    lo_slope = (y[1] - y[0]) / (x[1] - x[0])
    hi_slope = (y[2] - y[1]) / (x[2] - x[1])
    out = np.interp(t1, x, y)
    out = np.where(t1 < x[0], y[0] + (t1 - x[0]) * lo_slope, out)
    out = np.where(t1 > x[2], y[2] + (t1 - x[2]) * hi_slope, out)
    return np.maximum(out, 0.02 * y[2])


def _smooth(arr: np.ndarray, sigma_voxels: float) -> np.ndarray:
    if sigma_voxels <= 0:
        return arr
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    # variance in voxels (useImageSpacing off): the widths here are meant per voxel
    return sitk.GetArrayFromImage(sitk.DiscreteGaussian(img, [sigma_voxels ** 2] * 3, 32, 0.01, False))


def _distance_mm(mask: np.ndarray, spacing) -> np.ndarray:
    """Distance (mm) of every voxel from ``mask`` (0 inside)."""
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.SetSpacing(spacing)
    d = sitk.SignedMaurerDistanceMap(img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return np.maximum(sitk.GetArrayFromImage(d), 0.0)


def render(t1: np.ndarray, labels: np.ndarray, contrast: str, rng: np.random.Generator,
           spacing=(1.0, 1.0, 1.0)) -> tuple[np.ndarray, Rendering]:
    """One healthy rendering of a T1 volume (array, any order) in ``contrast``, on the same
    voxels, 0 outside the parcellation (``labels`` > 0). ``spacing`` in the arrays' axis
    order reversed (SimpleITK's x, y, z), for the smoothing and distances."""
    if contrast not in TISSUES:
        raise InputError(f"cannot render contrast {contrast!r}; renderable: {', '.join(TISSUES)}")
    spec = TISSUES[contrast]
    brain = labels > 0
    u = lambda r: float(rng.uniform(*r))  # noqa: E731
    csf, grey = u(spec.csf), u(spec.grey)
    points = tissue_medians(t1, labels)
    out = tissue_map(t1.astype(np.float64), points, (csf, grey, 1.0))

    # every region its own small gain, smoothed across borders; the named regions their contrast's gain
    spread = float(rng.uniform(0.02, 0.06))
    gain_of = np.exp(rng.normal(0.0, spread, int(labels.max()) + 1))
    for ids, r in ((PALLIDUM, spec.pallidum_gain), (DEEP_GREY, spec.deep_grey_gain),
                   (MESIAL_TEMPORAL, spec.mesial_temporal_gain)):
        for i in ids:
            if i < gain_of.size:
                gain_of[i] *= u(r)
    gain_of[0] = 1.0
    gain = _smooth(gain_of[labels], 1.0)

    lateral = np.isin(labels, VENTRICLES_LATERAL)
    if spec.periventricular_gain != (1.0, 1.0) and lateral.any():
        # caps and a thin rim: bright white matter within a few mm of the lateral ventricles,
        # fading with distance, thicker where the draw says (as the caps at the horns are)
        dist = _distance_mm(lateral, spacing)
        reach = float(rng.uniform(2.0, 6.0))
        rim = np.exp(-dist / reach) * np.isin(labels, WHITE_MATTER)
        patchy = _smooth(rng.uniform(0.4, 1.0, labels.shape), 2.0)
        gain = gain * (1.0 + (u(spec.periventricular_gain) - 1.0) * rim * patchy / patchy.max())
    out = out * gain

    if spec.choroid is not None and lateral.any():
        # choroid plexus: soft blobs inside the lateral ventricles
        seeds = (rng.uniform(size=labels.shape) < 0.015) & lateral
        blob = _smooth(seeds.astype(np.float32), 1.0)
        blob = np.clip(blob / max(float(blob.max()), 1e-6) * 2.5, 0, 1) * lateral
        out = out * (1 - blob) + u(spec.choroid) * blob
    if spec.sulcal_enhancement is not None:
        sulci = np.isin(labels, CSF_CORTICAL)
        seeds = (rng.uniform(size=labels.shape) < 0.03) & sulci
        vessel = np.clip(_smooth(seeds.astype(np.float32), 0.7) * 3.0, 0, 1) * sulci
        out = out * (1 - vessel) + u(spec.sulcal_enhancement) * vessel

    blur = float(rng.uniform(0.0, 0.7))
    out = _smooth(out, blur)
    noise = float(rng.uniform(0.0, 0.04))
    out = out + rng.normal(0.0, noise, out.shape)
    out = np.where(brain, np.maximum(out, 0.01), 0.0) * WHITE_MATTER_LEVEL
    return out.astype(np.float32), Rendering(contrast, csf, grey, noise, blur, spread)


@dataclass(frozen=True)
class Source:
    """A healthy T1 with its parcellation."""

    id: str
    t1: Path
    labels: Path


def find_parcellated(data: str | Path) -> list[Source]:
    """IXI-style subjects (``t1/<id>_T1.*``) that have ``dlmuse/<id>_T1_DLMUSE.*``."""
    data = Path(data)
    if not (data / "dlmuse").is_dir() or not (data / "t1").is_dir():
        raise InputError(f"{data} has no t1/ and dlmuse/ folders; rendering needs a folder of T1 scans with their "
                         "parcellations (see ../shared/data/README.md, ixi_t1_2mm)")
    out = []
    for image in sorted((data / "t1").glob("*_T1.nii*")):
        sid = image.name.split("_T1.nii")[0]
        found = sorted((data / "dlmuse").glob(f"{sid}_T1_DLMUSE.*"))
        if found:
            out.append(Source(sid, image, found[0]))
    if not out:
        raise InputError(f"no subject in {data}/t1 has a parcellation in {data}/dlmuse")
    return out


def rendering_id(subject: str, contrast: str, k: int) -> str:
    return f"{subject}{SEPARATOR}{contrast}{SEPARATOR}{k}"


def rendered_contrast(rendering: str) -> str | None:
    """The contrast of a rendering id, None for the id of a scan."""
    parts = rendering.split(SEPARATOR)
    return parts[1] if len(parts) == 3 else None


def source_subject(rendering: str) -> str:
    """The subject a rendering id (or any subject id) belongs to."""
    return rendering.split(SEPARATOR, 1)[0]


def render_folder(data: str | Path, out: str | Path, contrasts: dict[str, int], seed: int = 0,
                  subjects: list[str] | None = None, force: bool = False,
                  progress: Callable[[str], None] | None = None) -> Path:
    """Render every parcellated subject of ``data`` (or only ``subjects``) in each contrast
    (``{contrast: renderings per subject}``) into ``out``: ``<id>~<contrast>~<k>.nii.gz`` with
    ``..._brainmask.nii.gz`` beside it, and ``rendering.json`` recording every draw. A
    rendering depends only on the seed, the subject, the contrast and k."""
    import zlib

    say = progress or (lambda m: None)
    out = Path(out)
    unknown = [c for c in contrasts if c not in TISSUES]
    if unknown:
        raise InputError(f"cannot render {', '.join(unknown)}; renderable contrasts: {', '.join(TISSUES)}")
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(f"{out} already exists and is not empty; choose another folder or pass --force")
    sources = find_parcellated(data)
    if subjects is not None:
        wanted = set(subjects)
        sources = [s for s in sources if s.id in wanted]
    out.mkdir(parents=True, exist_ok=True)
    record = {"format": "anomaly-localizer-renderings/1", "source": str(Path(data).resolve()), "seed": seed,
              "contrasts": contrasts, "method": __doc__.strip().splitlines()[0], "renderings": {}}
    t0 = time.perf_counter()
    for n, s in enumerate(sources):
        image = sitk.ReadImage(str(s.t1))
        labels_img = sitk.ReadImage(str(s.labels))
        t1 = sitk.GetArrayFromImage(image).astype(np.float32)
        labels = sitk.GetArrayFromImage(labels_img).astype(np.int32)
        if labels.shape != t1.shape:
            raise InputError(f"{s.labels} is not on the grid of {s.t1}")
        mask = sitk.GetImageFromArray((labels > 0).astype(np.uint8))
        mask.CopyInformation(image)
        for contrast, count in contrasts.items():
            for k in range(count):
                rng = np.random.default_rng([seed, zlib.crc32(s.id.encode()), zlib.crc32(contrast.encode()), k])
                arr, drawn = render(t1, labels, contrast, rng, image.GetSpacing())
                img = sitk.GetImageFromArray(arr)
                img.CopyInformation(image)
                rid = rendering_id(s.id, contrast, k)
                sitk.WriteImage(img, str(out / f"{rid}.nii.gz"), True)
                sitk.WriteImage(mask, str(out / f"{rid}_brainmask.nii.gz"), True)
                record["renderings"][rid] = asdict(drawn)
        say(f"rendered {n + 1}/{len(sources)} subjects ({time.perf_counter() - t0:.0f} s)")
    (out / "rendering.json").write_text(json.dumps(record, indent=1) + "\n")
    return out


def rendered_contrasts(data: str | Path) -> list[str] | None:
    """The contrasts a folder of renderings holds (its rendering.json), None for other folders."""
    f = Path(data) / "rendering.json"
    if not f.is_file():
        return None
    try:
        found = json.loads(f.read_text()).get("contrasts", {})
    except (OSError, ValueError, AttributeError):
        return None
    return [c for c in found if c in CONTRASTS]


def rendered_from(folder: str | Path, rendering: str) -> Path | None:
    """The T1 scan a rendering in ``folder`` was rendered from (its rendering.json's source),
    None when it is not there."""
    source = _source_of(str(Path(folder).resolve()))
    if source is None:
        return None
    found = sorted((source / "t1").glob(f"{source_subject(rendering)}_T1.*")) if (source / "t1").is_dir() else []
    return found[0] if found else None


@lru_cache(maxsize=8)
def _source_of(folder: str) -> Path | None:
    try:
        return Path(json.loads((Path(folder) / "rendering.json").read_text())["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
