"""``anomaly-localizer evaluate``: how well each method finds anomalies, in numbers.

Per method, over a set of cases with ground truth: pixel-wise AUROC and average precision
inside the brain, the best Dice over one threshold for the whole set (searched exactly
over every distinct score), Dice at the model's calibrated threshold, slice-wise AUROC and
AP (a slice is abnormal with at least 20 lesion voxels, normal with none; others are left
out, as in the paper; the slice score of a pixel method is the mean of its 20 highest values
in the slice's brain, the same 20 voxels that make a slice abnormal), and seconds per case.
Synthetic cases also get a pixel AP and a slice AUROC per anomaly kind, which show what a
method misses, and both figures pooled over the intensity anomalies alone (every kind but
the sink/source deformations, which no reconstruction-based score finds: the share of the
headline figures they cost is then visible).
A non-learned baseline is scored on the same cases: the
robust intensity outlier |x - median| / IQR inside the brain.

Case sets: synthetic anomalies (:mod:`anomaly_localizer.synthetic`) inserted into healthy
subjects, seeded; or folders of real cases with ground truth (:func:`folder_cases`, e.g.
the BraTS cases in ``../shared/data``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from ..core.imageio import as_3d, read_image
from ..core.package import ModelPackage
from ..core.pipeline import score_volume
from ..errors import InputError
from .data import Subject
from .metrics import auroc, average_precision, best_dice, dice_at
from .synthetic import DEFORMATION_KINDS, make_case

BASELINE = "baseline_intensity"
SLICE_MIN_LESION = 20
INTENSITY_ONLY = "intensity anomalies (no sink/source)"


@dataclass
class Case:
    id: str
    image: sitk.Image
    mask: sitk.Image | None
    label: np.ndarray  # bool, input array order
    group: str | None = None  # e.g. the synthetic anomaly's kind, for a per-kind breakdown


def synthetic_cases(subjects: list[Subject], per_subject: int = 2, seed: int = 0) -> Iterator[Case]:
    """Seeded synthetic anomalies, ``per_subject`` cases for each healthy subject."""
    for i, s in enumerate(subjects):
        image = as_3d(read_image(s.image))
        mask_img = as_3d(read_image(s.mask, "MASK")) if s.mask else None
        arr = sitk.GetArrayFromImage(image).astype(np.float32)
        mask = sitk.GetArrayFromImage(mask_img) > 0 if mask_img is not None else arr != 0
        spacing_zyx = image.GetSpacing()[::-1]
        for k in range(per_subject):
            img, label, kind = make_case(arr, mask, spacing_zyx, seed=seed * 1000003 + i * 101 + k)
            out = sitk.GetImageFromArray(img)
            out.CopyInformation(image)
            yield Case(f"{s.id}#{k}:{kind}", out, mask_img, label.astype(bool), kind)


def folder_cases(root: str | Path, image_name: str, label_name: str, mask_name: str | None = None) -> Iterator[Case]:
    """Real cases with ground truth: one sub-folder per case holding ``image_name``,
    ``label_name`` (anomaly = label > 0) and optionally ``mask_name`` (the brain)."""
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and (p / image_name).is_file())
    if not folders:
        raise InputError(f"no case folder in {root} holds {image_name}; check --cases and --image-name")
    for folder in folders:
        image = as_3d(read_image(folder / image_name))
        label = sitk.GetArrayFromImage(as_3d(read_image(folder / label_name, "LABEL"))) > 0
        mask = as_3d(read_image(folder / mask_name, "MASK")) if mask_name and (folder / mask_name).is_file() else None
        if label.shape != sitk.GetArrayViewFromImage(image).shape:
            raise InputError(f"case {folder.name}: {label_name} is not on the grid of {image_name}; "
                             "resample the label onto the image")
        yield Case(folder.name, image, mask, label)


def baseline_map(image: sitk.Image, brain: np.ndarray) -> np.ndarray:
    """|x - median| / IQR inside the brain: the non-learned reference every method must beat."""
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    q1, med, q3 = np.percentile(arr[brain], [25, 50, 75])
    out = np.abs(arr - med) / max(q3 - q1, 1e-6)
    out[~brain] = 0
    return out


def slice_top_mean(values: np.ndarray, brain: np.ndarray, axis: int, k: int = SLICE_MIN_LESION) -> np.ndarray:
    """Per slice along numpy ``axis``: the mean of the ``k`` highest ``values`` inside the
    brain (all of them in a slice with fewer brain voxels; 0 without brain)."""
    a = np.moveaxis(np.where(brain, values, -np.inf).astype(np.float32), axis, 0)
    a = a.reshape(a.shape[0], -1)
    k = min(k, a.shape[1])
    top = np.partition(a, a.shape[1] - k, axis=1)[:, a.shape[1] - k:]
    finite = np.isfinite(top)
    return np.where(finite, top, 0).sum(1) / np.maximum(finite.sum(1), 1)


def evaluate(runs, cases: Iterator[Case], device: str = "cpu", progress=None) -> dict:
    """Metrics of every method over ``cases``. ``runs``: a package, or a list of
    (package, methods) whose methods join one table (e.g. the VAE and the LSR model)."""
    from ..core.device import select_device
    if isinstance(runs, ModelPackage):
        runs = [(runs, list(runs.methods))]
    loaded = [(p, list(ms), p.load_model(select_device(device))) for p, ms in runs]
    methods = [m for _, ms, _ in loaded for m in ms]
    source = {m: p for p, ms, _ in loaded for m in ms}
    names = methods + [BASELINE]
    pix = {m: [] for m in names}
    labels, slice_labels, groups = [], [], []
    slice_names: list[str] = []  # the models' own slice scores, as their results name them
    slice_scores: dict[str, list] = {m: [] for m in names}
    seconds = {p.name: [] for p, _, _ in loaded}
    n_cases = 0
    for case in cases:
        brain = None
        maps: dict[str, np.ndarray] = {}
        case_slice_scores: dict[str, np.ndarray] = {}
        for package, ms, model in loaded:
            t0 = time.perf_counter()
            res = score_volume(case.image, package, ms, mask=case.mask, device=device, model=model)
            seconds[package.name].append(time.perf_counter() - t0)
            if brain is None:
                brain, axial_axis = res.brain_mask, res.axial_axis
            maps.update(res.maps)
            case_slice_scores.update({f"slice_{k}": v for k, v in res.slice_scores.items()})
        maps[BASELINE] = baseline_map(case.image, brain)
        label = case.label & brain
        labels.append(label[brain])
        groups.append(case.group)
        for m in names:
            pix[m].append(maps[m][brain].astype(np.float32))
        # slices along the input's axial axis
        ax = 2 - axial_axis  # numpy axis of the axial index
        lesion_per_slice = np.moveaxis(label, ax, 0).reshape(label.shape[ax], -1).sum(1)
        brain_per_slice = np.moveaxis(brain, ax, 0).reshape(label.shape[ax], -1).sum(1)
        keep = (brain_per_slice > 0) & ((lesion_per_slice >= SLICE_MIN_LESION) | (lesion_per_slice == 0))
        slice_labels.append(lesion_per_slice[keep] >= SLICE_MIN_LESION)
        for m in names:
            slice_scores[m].append(slice_top_mean(maps[m], brain, ax)[keep])
        if not slice_names:
            slice_names = list(case_slice_scores)
            slice_scores.update({k: [] for k in slice_names})
        for k in slice_names:
            slice_scores[k].append(case_slice_scores[k][keep])
        n_cases += 1
        if progress:
            took = ", ".join(f"{n} {v[-1]:.1f} s" for n, v in seconds.items())
            progress(f"{case.id}: {took}, {int(label.sum())} lesion voxels")
    y = np.concatenate(labels)
    ys = np.concatenate(slice_labels)
    table = {}
    for m in names:
        s = np.concatenate(pix[m])
        row = {"pixel_auroc": auroc(s, y), "pixel_ap": average_precision(s, y)}
        row["best_dice"], row["best_dice_threshold"] = best_dice(s, y)
        calibrated = source[m].default_threshold(m) if m != BASELINE else None
        row["dice_at_calibrated"] = dice_at(s, y, calibrated[0]) if calibrated else None
        row["healthy_voxels_flagged_at_calibrated"] = float((s[~y] > calibrated[0]).mean()) if calibrated else None
        ss = np.concatenate(slice_scores[m])
        row["slice_auroc"], row["slice_ap"] = auroc(ss, ys), average_precision(ss, ys)
        if m != BASELINE:
            row["model"] = source[m].name
        table[m] = row
    for k in slice_names:
        ss = np.concatenate(slice_scores[k])
        table[k] = {"slice_auroc": auroc(ss, ys), "slice_ap": average_precision(ss, ys)}
    kinds = sorted({g for g in groups if g})
    subsets = [(g, [i for i, gi in enumerate(groups) if gi == g]) for g in kinds]
    if any(g in DEFORMATION_KINDS for g in kinds) and any(g not in DEFORMATION_KINDS for g in kinds):
        subsets.append((INTENSITY_ONLY, [i for i, gi in enumerate(groups) if gi and gi not in DEFORMATION_KINDS]))
    for g, idx in subsets:
        yg = np.concatenate([labels[i] for i in idx])
        ysg = np.concatenate([slice_labels[i] for i in idx])
        for m in names:
            ap = average_precision(np.concatenate([pix[m][i] for i in idx]), yg) if yg.any() else None
            sa = auroc(np.concatenate([slice_scores[m][i] for i in idx]), ysg) if 0 < ysg.sum() < ysg.size else None
            if g == INTENSITY_ONLY:
                table[m]["intensity_anomalies_only"] = {"pixel_ap": ap, "slice_auroc": sa}
            else:
                table[m].setdefault("pixel_ap_by_kind", {})[g] = ap
                table[m].setdefault("slice_auroc_by_kind", {})[g] = sa
    base_ap = table[BASELINE]["pixel_ap"]
    for m in methods:
        table[m]["beats_baseline"] = bool(table[m]["pixel_ap"] > base_ap)
    first = loaded[0][0]
    return {"model": " + ".join(p.name for p, _, _ in loaded), "model_manifest_sha256": first.manifest_sha256,
            "models": {p.name: {"manifest_sha256": p.manifest_sha256, "methods": ms,
                                "seconds_per_case": float(np.mean(seconds[p.name])) if seconds[p.name] else None}
                       for p, ms, _ in loaded},
            "cases": n_cases, "lesion_voxels": int(y.sum()), "brain_voxels": int(y.size),
            "cases_by_kind": {g: groups.count(g) for g in sorted({g for g in groups if g})},
            "abnormal_slices": int(ys.sum()), "normal_slices": int((~ys).sum()),
            "seconds_per_case": float(sum(np.mean(v) for v in seconds.values() if v)) if n_cases else None,
            "methods": table}


def format_table(result: dict) -> str:
    cols = ["pixel_auroc", "pixel_ap", "best_dice", "dice_at_calibrated", "slice_auroc", "slice_ap"]
    lines = [f"model {result['model']}: {result['cases']} cases, {result['lesion_voxels']} lesion voxels, "
             f"{result['abnormal_slices']} abnormal / {result['normal_slices']} normal slices, "
             f"{result['seconds_per_case']:.2f} s per case",
             f"{'method':<20}" + "".join(f"{c:>20}" for c in cols)]
    for m, row in result["methods"].items():
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append(f"{'-' if v is None else f'{v:.3f}':>20}")
        note = "" if row.get("beats_baseline", True) else "   (does not beat the baseline)"
        lines.append(f"{m:<20}" + "".join(cells) + note)
    kinds = result.get("cases_by_kind") or {}
    fmt = lambda v: f"{'-' if v is None else f'{v:.3f}':>16}"
    for key, what in (("pixel_ap_by_kind", "pixel AP"), ("slice_auroc_by_kind", "slice AUROC")):
        if kinds and any(row.get(key) for row in result["methods"].values()):
            lines.append(f"{what} by anomaly kind (cases):")
            lines.append(f"{'method':<20}" + "".join(f"{f'{k} ({n})':>16}" for k, n in kinds.items()))
            for m, row in result["methods"].items():
                if row.get(key):
                    lines.append(f"{m:<20}" + "".join(fmt(row[key].get(k)) for k in kinds))
    if any(row.get("intensity_anomalies_only") for row in result["methods"].values()):
        lines.append(f"{INTENSITY_ONLY}:")
        lines.append(f"{'method':<20}{'pixel AP':>16}{'slice AUROC':>16}")
        for m, row in result["methods"].items():
            only = row.get("intensity_anomalies_only")
            if only:
                lines.append(f"{m:<20}{fmt(only['pixel_ap'])}{fmt(only['slice_auroc'])}")
    return "\n".join(lines)
