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
Two non-learned baselines are scored on the same cases: the
robust intensity outlier |x - median| / IQR inside the brain, and the FLAIR rule (Meissen et
al. 2021: (x - median) / IQR where positive, smoothed by one voxel), on the case's FLAIR when
it is a study that has one; a method "beats the baseline" when its pixel AP is above both.

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

from ...core.imageio import as_3d, read_image, same_grid
from ...core.package import ModelPackage
from ...core.pipeline import score_volume
from ...errors import InputError
from ..data import Subject, read_study
from ..metrics import auroc, average_precision, best_dice, dice_at
from .hard_cases import SIZE_BINS
from .synthetic import DEFORMATION_KINDS, make_case

BASELINE = "baseline_intensity"
BRIGHT_RULE = "baseline_bright_rule"  # the FLAIR rule, on the case's FLAIR when it has one
SLICE_MIN_LESION = 20
INTENSITY_ONLY = "intensity anomalies (no sink/source)"


@dataclass
class Case:
    id: str
    image: sitk.Image
    mask: sitk.Image | None
    label: np.ndarray  # bool, input array order
    group: str | None = None  # e.g. the synthetic anomaly's kind, for a per-kind breakdown
    # bool maps (input array order) of the label's parts by kind and by size, for figures per
    # group; None: the whole label belongs to ``group``
    parts: dict[str, np.ndarray] | None = None
    sizes: dict[str, np.ndarray] | None = None
    # a co-registered study: each contrast's image on ``image``'s grid (``image`` is the first)
    study: dict[str, sitk.Image] | None = None


CASE_SETS = ("hard", "balls")  # hard: the default since 0.2; balls: one hard-edged ball per case (0.1's set)


def hard_cases(subjects: list[Subject], per_subject: int = 2, seed: int = 0) -> Iterator[Case]:
    """The harder set (:mod:`.hard_cases`): 1-3 ellipsoids of 6-20 mm per case, any contrast,
    soft or hard edges, labelled where the image changed at all."""
    from .hard_cases import make_hard_case
    for i, s in enumerate(subjects):
        image = as_3d(read_image(s.image))
        mask_img = as_3d(read_image(s.mask, "MASK")) if s.mask else None
        arr = sitk.GetArrayFromImage(image).astype(np.float32)
        mask = sitk.GetArrayFromImage(mask_img) > 0 if mask_img is not None else arr != 0
        for k in range(per_subject):
            img, ids, anomalies = make_hard_case(arr, mask, image.GetSpacing()[::-1], seed=seed * 1000003 + i * 101 + k)
            out = sitk.GetImageFromArray(img)
            out.CopyInformation(image)
            parts: dict[str, np.ndarray] = {}
            sizes: dict[str, np.ndarray] = {}
            for j, a in enumerate(anomalies):
                if a.voxels:
                    parts[a.kind] = parts.get(a.kind, np.zeros(ids.shape, bool)) | (ids == j + 1)
                    sizes[a.size_bin] = sizes.get(a.size_bin, np.zeros(ids.shape, bool)) | (ids == j + 1)
            kinds = "+".join(a.kind for a in anomalies)
            # a rendering's study: the anomalies are in the rendering only (its T1 unchanged)
            yield Case(f"{s.id}#{k}:{kinds}", out, mask_img, ids > 0, anomalies[0].kind, parts, sizes,
                       study=read_study(s, out))


def case_set(name: str, subjects: list[Subject], per_subject: int = 2, seed: int = 0) -> Iterator[Case]:
    """Synthetic cases of a named set (:data:`CASE_SETS`)."""
    if name == "hard":
        return hard_cases(subjects, per_subject, seed)
    if name == "balls":
        return synthetic_cases(subjects, per_subject, seed)
    raise InputError(f"unknown case set {name!r}; choose from {', '.join(CASE_SETS)}")


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


def folder_cases(root: str | Path, image_name: str | list[str], label_name: str, mask_name: str | None = None,
                 contrasts: list[str] | None = None) -> Iterator[Case]:
    """Real cases with ground truth: one sub-folder per case holding ``image_name``,
    ``label_name`` (anomaly = label > 0) and optionally ``mask_name`` (the brain).
    Several image names with their ``contrasts`` make each case a co-registered study
    (later images resampled onto the first one's grid)."""
    root = Path(root)
    names = [image_name] if isinstance(image_name, str) else list(image_name)
    if contrasts is not None and len(contrasts) != len(names):
        raise InputError(f"{len(contrasts)} --contrast for {len(names)} --image-name; give one contrast per image")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and all((p / n).is_file() for n in names))
    if not folders:
        raise InputError(f"no case folder in {root} holds {', '.join(names)}; check --cases and --image-name")
    for folder in folders:
        image = as_3d(read_image(folder / names[0]))
        study = None
        if contrasts:
            study = {contrasts[0]: image}
            for c, n in zip(contrasts[1:], names[1:]):
                other = as_3d(read_image(folder / n))
                study[c] = other if same_grid(image, other) else sitk.Resample(
                    sitk.Cast(other, sitk.sitkFloat32), image, sitk.Transform(), sitk.sitkLinear, 0.0)
        label = sitk.GetArrayFromImage(as_3d(read_image(folder / label_name, "LABEL"))) > 0
        mask = as_3d(read_image(folder / mask_name, "MASK")) if mask_name and (folder / mask_name).is_file() else None
        if label.shape != sitk.GetArrayViewFromImage(image).shape:
            raise InputError(f"case {folder.name}: {label_name} is not on the grid of {image_name}; "
                             "resample the label onto the image")
        yield Case(folder.name, image, mask, label, study=study)


def bright_rule_map(image: sitk.Image, brain: np.ndarray) -> np.ndarray:
    """The FLAIR rule (Meissen et al. 2021): (x - median) / IQR inside the brain where
    positive, smoothed by a Gaussian of one voxel; on FLAIR the baseline every map must beat."""
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    q1, med, q3 = np.percentile(arr[brain], [25, 50, 75])
    z = np.where(brain, np.maximum(arr - med, 0) / max(q3 - q1, 1e-6), 0).astype(np.float32)
    smooth = sitk.DiscreteGaussian(sitk.GetImageFromArray(z), 1.0, 32, 0.01, False)
    return np.where(brain, sitk.GetArrayFromImage(smooth), 0).astype(np.float32)


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


def _slice_counts(mask: np.ndarray, ax: int) -> np.ndarray:
    return np.moveaxis(mask, ax, 0).reshape(mask.shape[ax], -1).sum(1)


def evaluate(runs, cases: Iterator[Case], device: str = "cpu", progress=None, bf16: bool = False) -> dict:
    """Metrics of every method over ``cases``. ``runs``: a package, or a list of
    (package, methods) whose methods join one table (e.g. the VAE and the LSR model).
    ``bf16``: score under bf16 autocast where a family can (:func:`score_volume`)."""
    from ...core.device import select_device
    if isinstance(runs, ModelPackage):
        runs = [(runs, list(runs.methods))]
    loaded = [(p, list(ms), p.load_model(select_device(device))) for p, ms in runs]
    methods = [m for _, ms, _ in loaded for m in ms]
    source = {m: p for p, ms, _ in loaded for m in ms}
    names = methods + [BASELINE, BRIGHT_RULE]
    records = []  # per case: brain voxel labels and scores, per-slice scores and counts
    slice_names: list[str] = []  # the models' own slice scores, as their results name them
    seconds = {p.name: [] for p, _, _ in loaded}
    coverage: dict[str, list[int]] = {}  # method: [lesions, touched by a region, touched by a finding]
    for case in cases:
        brain = None
        maps: dict[str, np.ndarray] = {}
        case_slice_scores: dict[str, np.ndarray] = {}
        for package, ms, model in loaded:
            t0 = time.perf_counter()
            res = score_volume(case.image, package, ms, mask=case.mask, device=device, model=model, bf16=bf16,
                               study=case.study)
            seconds[package.name].append(time.perf_counter() - t0)
            if brain is None:
                brain, axial_axis = res.brain_mask, res.axial_axis
            maps.update(res.maps)
            case_slice_scores.update({f"slice_{k}": v for k, v in res.slice_scores.items()})
        slice_names = slice_names or list(case_slice_scores)
        maps[BASELINE] = baseline_map(case.image, brain)
        maps[BRIGHT_RULE] = bright_rule_map((case.study or {}).get("flair", case.image), brain)
        label = case.label & brain
        for m in dict.fromkeys(methods):  # the segmentation a reader sees: the calibrated threshold, the finding rule
            counts = _lesion_coverage(source[m], m, maps[m], brain, label, case.image)
            if counts is not None:
                coverage[m] = [a + b for a, b in zip(coverage.get(m, [0, 0, 0]), counts)]
        ax = 2 - axial_axis  # numpy axis of the axial index
        parts = case.parts if case.parts is not None else ({case.group: label} if case.group else {})
        records.append({
            "label": label[brain], "lesion_per_slice": _slice_counts(label, ax),
            "brain_per_slice": _slice_counts(brain, ax),
            "pix": {m: maps[m][brain].astype(np.float32) for m in names},
            "slice": {**{m: slice_top_mean(maps[m], brain, ax) for m in names},
                      **{k: case_slice_scores[k] for k in slice_names}},
            "groups": {g: ((part & brain)[brain], _slice_counts(part & brain, ax))
                       for g, part in {**parts, **(case.sizes or {})}.items()},
            "kinds": list(parts), "sizes": list(case.sizes or {})})
        if progress:
            took = ", ".join(f"{n} {v[-1]:.1f} s" for n, v in seconds.items())
            progress(f"{case.id}: {took}, {int(label.sum())} lesion voxels")
    if not records:
        raise InputError("no cases to evaluate")
    y = np.concatenate([r["label"] for r in records])
    table = {}
    for m in names:
        s = np.concatenate([r["pix"][m] for r in records])
        row = {"pixel_auroc": auroc(s, y), "pixel_ap": average_precision(s, y)}
        row["best_dice"], row["best_dice_threshold"] = best_dice(s, y)
        calibrated = source[m].default_threshold(m) if m in source else None
        row["dice_at_calibrated"] = dice_at(s, y, calibrated[0]) if calibrated else None
        row["healthy_voxels_flagged_at_calibrated"] = float((s[~y] > calibrated[0]).mean()) if calibrated else None
        row["slice_auroc"], row["slice_ap"] = _slice_metrics(records, m, None)
        if m in source:
            row["model"] = source[m].name
        if m in coverage:
            n, regions, findings = coverage[m]
            row["lesions_at_calibrated"] = {"lesions": n, "touched_by_a_region": regions,
                                            "touched_by_a_finding": findings,
                                            "meaning": "connected true lesions that a region of the segmentation at "
                                                       "the calibrated threshold touches, and that a finding (a "
                                                       "region passing the map's finding rule) touches"}
        table[m] = row
    for k in slice_names:
        table[k] = dict(zip(("slice_auroc", "slice_ap"), _slice_metrics(records, k, None)))
    kinds = sorted({g for r in records for g in r["kinds"]})
    sizes = [name for name, _, _ in SIZE_BINS if any(name in r["sizes"] for r in records)]
    intensity = [g for g in kinds if g not in DEFORMATION_KINDS]
    for m in names:
        for key, groups in (("by_kind", kinds), ("by_size", sizes)):
            for g in groups:
                table[m].setdefault(f"pixel_ap_{key}", {})[g] = _group_ap(records, m, [g])
                table[m].setdefault(f"slice_auroc_{key}", {})[g] = _slice_metrics(records, m, [g])[0]
        if intensity and len(intensity) < len(kinds):
            table[m]["intensity_anomalies_only"] = {"pixel_ap": _group_ap(records, m, intensity),
                                                    "slice_auroc": _slice_metrics(records, m, intensity)[0]}
    base_ap = max(table[BASELINE]["pixel_ap"], table[BRIGHT_RULE]["pixel_ap"])
    for m in methods:
        table[m]["beats_baseline"] = bool(table[m]["pixel_ap"] > base_ap)
    first = loaded[0][0]
    normal = sum(int(((r["brain_per_slice"] > 0) & (r["lesion_per_slice"] == 0)).sum()) for r in records)
    abnormal = sum(int((r["lesion_per_slice"] >= SLICE_MIN_LESION).sum()) for r in records)
    return {"model": " + ".join(p.name for p, _, _ in loaded), "model_manifest_sha256": first.manifest_sha256,
            "models": {p.name: {"manifest_sha256": p.manifest_sha256, "methods": ms,
                                "seconds_per_case": float(np.mean(seconds[p.name])) if seconds[p.name] else None}
                       for p, ms, _ in loaded},
            "cases": len(records), "lesion_voxels": int(y.sum()), "brain_voxels": int(y.size),
            "cases_by_kind": {g: sum(g in r["kinds"] for r in records) for g in kinds},
            "cases_by_size": {g: sum(g in r["sizes"] for r in records) for g in sizes},
            "abnormal_slices": abnormal, "normal_slices": normal,
            "kinds_vs_training": {p.name: rel for p in _member_packages(loaded)
                                  if (rel := kinds_vs_training(p, kinds)) is not None},
            "seconds_per_case": float(sum(np.mean(v) for v in seconds.values() if v)),
            "precision": "bf16 autocast (dae, ssl)" if bf16 else "float32", "methods": table}


def _lesion_coverage(package: ModelPackage, method: str, values: np.ndarray, brain: np.ndarray, label: np.ndarray,
                     image: sitk.Image) -> tuple[int, int, int] | None:
    """(lesions, touched by a region, touched by a finding) of one case at the map's calibrated
    threshold (:func:`...core.findings.lesions_covered`); None for an uncalibrated map."""
    from ...core.findings import lesions_covered, rule_at
    from ...core.levels import level_scale
    calibrated = package.default_threshold(method)
    if calibrated is None:
        return None
    scale, _ = level_scale(package.calibration, method, values, brain)
    rule = package.calibration.findings.get(method)
    rule = rule_at(rule.model_dump(exclude_none=True), calibrated[0] / scale) if rule is not None else None
    seg = (values > calibrated[0]) & brain
    return lesions_covered(seg, values / scale, label, float(np.prod(image.GetSpacing())) / 1000.0, rule)


# The self-supervised detector's training task nearest to each evaluation kind (None: no
# task makes that kind of change). With a model's held-out tasks this says, per kind,
# whether the evaluation tests a change the model trained on, one held out, or neither.
NEAREST_TRAINING_TASK = {"shift_up": "intensity", "shift_down": "intensity", "uniform": "intensity", "noise": None,
                         "moved": "foreign", "sink": "sink", "source": "source"}


def kinds_vs_training(package: ModelPackage, kinds: list[str]) -> dict[str, str] | None:
    """Per evaluation kind: "trained (task)", "held out (task)" or "no such task", for a
    model trained on synthetic tasks; None for other models."""
    cfg = package.meta.get("training", {}).get("config", {})
    if "held_out" not in cfg:
        return None
    out = {}
    for k in kinds:
        task = NEAREST_TRAINING_TASK.get(k)
        out[k] = ("no such task" if task is None else f"held out ({task})" if task in cfg["held_out"]
                  else f"trained ({task})" if task in cfg.get("tasks", []) else "no such task")
    return out


def _member_packages(loaded) -> list[ModelPackage]:
    """The packages evaluated, a fused package's components in its place."""
    out = []
    for p, _, model in loaded:
        out += [comp for comp, _ in model.values()] if p.detector and p.detector.composite else [p]
    return out


def _with_groups(records: list[dict], groups: list[str] | None) -> list[dict]:
    """The cases that hold an anomaly of ``groups`` (all cases for None)."""
    return records if groups is None else [r for r in records if any(g in r["groups"] for g in groups)]


def _group_ap(records: list[dict], m: str, groups: list[str]) -> float | None:
    """Pixel AP over the cases holding anomalies of ``groups``: their voxels are the
    positives, the normal brain voxels of those cases the negatives, and other anomalies'
    voxels are left out."""
    ys, ss = [], []
    for r in _with_groups(records, groups):
        pos = np.zeros_like(r["label"])
        for g in groups:
            if g in r["groups"]:
                pos |= r["groups"][g][0]
        keep = ~r["label"] | pos
        ys.append(pos[keep])
        ss.append(r["pix"][m][keep])
    if not ys:
        return None
    y = np.concatenate(ys)
    return average_precision(np.concatenate(ss), y) if y.any() else None


def _slice_metrics(records: list[dict], m: str, groups: list[str] | None) -> tuple[float | None, float | None]:
    """Slice AUROC and AP: a slice is abnormal with at least SLICE_MIN_LESION lesion voxels
    (of ``groups``, when given, over the cases that hold such anomalies), normal with none;
    others are left out."""
    ys, ss = [], []
    for r in _with_groups(records, groups):
        lesion = r["lesion_per_slice"]
        pos_count = lesion if groups is None else sum((r["groups"][g][1] for g in groups if g in r["groups"]),
                                                      np.zeros_like(lesion))
        pos = pos_count >= SLICE_MIN_LESION
        keep = (r["brain_per_slice"] > 0) & (pos | (lesion == 0))
        ys.append(pos[keep])
        ss.append(np.asarray(r["slice"][m])[keep])
    if not ys:
        return None, None
    y, s = np.concatenate(ys), np.concatenate(ss)
    if not 0 < y.sum() < y.size:
        return None, None
    return auroc(s, y), average_precision(s, y)


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
    fmt = lambda v: f"{'-' if v is None else f'{v:.3f}':>16}"  # noqa: E731
    for group, title in (("kind", "anomaly kind"), ("size", "anomaly size")):
        counts = result.get(f"cases_by_{group}") or {}
        for key, what in ((f"pixel_ap_by_{group}", "pixel AP"), (f"slice_auroc_by_{group}", "slice AUROC")):
            if counts and any(row.get(key) for row in result["methods"].values()):
                lines.append(f"{what} by {title} (cases):")
                heads = [f"{k.split(' (')[0]} ({n})" for k, n in counts.items()]
                lines.append(f"{'method':<20}" + "".join(f"{h:>16}" for h in heads))
                for m, row in result["methods"].items():
                    if row.get(key):
                        lines.append(f"{m:<20}" + "".join(fmt(row[key].get(k)) for k in counts))
    covered = {m: row["lesions_at_calibrated"] for m, row in result["methods"].items()
               if row.get("lesions_at_calibrated")}
    if covered:
        lines.append("lesions touched at the calibrated threshold (connected true lesions):")
        lines.append(f"{'method':<20}{'lesions':>10}{'by a region':>14}{'by a finding':>14}")
        for m, c in covered.items():
            lines.append(f"{m:<20}{c['lesions']:>10}{c['touched_by_a_region']:>14}{c['touched_by_a_finding']:>14}")
    for name, rel in (result.get("kinds_vs_training") or {}).items():
        lines.append(f"{name}, evaluation kinds against its training tasks: "
                     + "; ".join(f"{k} {v}" for k, v in rel.items()))
    if any(row.get("intensity_anomalies_only") for row in result["methods"].values()):
        lines.append(f"{INTENSITY_ONLY}:")
        lines.append(f"{'method':<20}{'pixel AP':>16}{'slice AUROC':>16}")
        for m, row in result["methods"].items():
            only = row.get("intensity_anomalies_only")
            if only:
                lines.append(f"{m:<20}{fmt(only['pixel_ap'])}{fmt(only['slice_auroc'])}")
    return "\n".join(lines)
