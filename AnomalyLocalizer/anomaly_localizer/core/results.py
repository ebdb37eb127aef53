"""A run's results folder: written all or nothing, and read back by one reader.

Files are written into a hidden temporary folder beside DIR and moved into place only
when every file is complete, so a failed or interrupted run leaves DIR as it was. The
Slicer module's child run reads the same folder with :func:`read_results`.

``summary.json`` says what the numbers mean: the threshold as a raw score and as an
anomaly level (:mod:`core.levels`), and each map's raw score per anomaly level.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk

from .. import __version__
from ..errors import InputError
from . import levels
from .findings import (
    apply_finding_rule,
    below_rule_summary,
    rule_at,
    describe_rule,
    find_findings,
    findings_rule,
    write_findings_csv,
)
from .imageio import write_image
from .package import ModelPackage
from .paths import clean_stale_partials, new_folder, partial_prefix
from .pipeline import ScoreResult
from .relative import reference_summary
from .volume import image_like


@dataclass
class Threshold:
    """The segmentation's threshold: raw score of ``method``, and the same as an anomaly level."""

    method: str
    value: float
    level: float
    source: str  # "calibrated" | "user" (raw score) | "user level"
    meaning: str
    healthy_rate: float | None
    finding_rule: dict[str, Any] | None = None  # the map's calibrated finding rule (:mod:`.findings`)
    scale: float = 0.0  # raw score of anomaly level 1.0 (0: unknown)


def check_threshold_options(package: ModelPackage, method: str, raw: float | None, level: float | None) -> None:
    """Refuse, before any work, a threshold that cannot be used."""
    if raw is not None and not math.isfinite(raw):
        raise InputError(f"--threshold {raw} is not a finite number; give a number such as 0.5")
    if level is not None:
        levels.check_level(level)
    if raw is not None and level is not None:
        raise InputError("give --threshold (a raw score) or --threshold-level (an anomaly level), not both")
    if raw is None and level is None and package.default_threshold(method) is None:
        raise InputError(f"model {package.name} has no calibrated threshold for {method}; pass --threshold or "
                         "--threshold-level, or calibrate the model (anomaly-localizer calibrate)")


def resolve_threshold(package: ModelPackage, result: ScoreResult, method: str, raw: float | None = None,
                      level: float | None = None) -> Threshold:
    """The threshold a run segments with: given as a raw score, as a level, or the model's
    calibrated default; expressed in both units."""
    scale, _ = levels.level_scale(package.calibration, method, result.maps[method], result.brain_mask)
    if raw is not None:
        value, source, meaning = float(raw), "user", "given with --threshold (raw score)"
    elif level is not None:
        value, source, meaning = float(level) * scale, "user level", "given with --threshold-level (anomaly level)"
    else:
        default = package.default_threshold(method)
        if default is None:
            raise InputError(f"model {package.name} has no calibrated threshold for {method}; pass --threshold")
        value, meaning = default
        source = "calibrated"
    rule = package.calibration.findings.get(method)
    return Threshold(method, value, value / scale, source, meaning,
                     levels.healthy_fpr(package.calibration, method, value),
                     rule.model_dump(exclude_none=True) if rule is not None else None, scale)


def level_block(package: ModelPackage, result: ScoreResult) -> dict[str, Any]:
    """What an anomaly level is for each map of ``result``."""
    scales = {m: levels.level_scale(package.calibration, m, v, result.brain_mask) for m, v in result.maps.items()}
    return {"definition": levels.LEVEL_DEFINITION,
            "raw_score_per_level": {m: s for m, (s, _) in scales.items()},
            "uncalibrated": sorted(m for m, (_, ok) in scales.items() if not ok)}


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse, before any work, an output folder that cannot be written or replaced: an
    existing DIR without --force, a file in its place, the current folder or one above it,
    a parent folder that is missing or not writable, a name that is not UTF-8 or too long,
    a symbolic link to nothing, another user's folder."""
    from .paths import check_out_name
    check_out_name(out)
    if out.is_symlink() and not out.exists():
        raise InputError(f"--out {out} is a symbolic link to {os.readlink(out)}, which does not exist; give a real "
                         "folder or remove the link")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder; choose another output folder")
    if out.exists() and any(out.iterdir()) and not force and _owner(out) not in (None, os.getuid()):
        raise InputError(f"output folder {out} already exists and belongs to another user ({_owner_name(out)}), "
                         "who may be filling it; choose another --out folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(f"output folder {out} already exists; pass --force to replace it or choose another folder")
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if out.exists() and (resolved == cwd or resolved in cwd.parents):
        raise InputError(f"--out {out} is the current folder or holds it; it cannot be replaced. Choose a new folder")
    parent = resolved.parent
    if not parent.is_dir():
        raise InputError(f"the folder {parent} that should hold {out.name} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write into {parent} (permission denied); choose an --out folder you can write")
    probe_folder(parent, out.name)
    if out.exists() and any(out.iterdir()) and not os.access(resolved, os.W_OK | os.X_OK):
        raise InputError(f"--force cannot replace {out}: its contents cannot be removed (permission denied); "
                         "choose another --out folder")


def _owner(path: Path) -> int | None:
    try:
        return path.stat().st_uid if hasattr(os, "getuid") else None
    except OSError:
        return None


def _owner_name(path: Path) -> str:
    uid = _owner(path)
    try:
        import pwd
        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError, TypeError):
        return f"uid {uid}"


def probe_folder(parent: Path, name: str) -> None:
    """Create and remove the kind of hidden folder a run writes into ``parent``: a folder
    that refuses it (a read-only or virtual file system such as /proc) is refused before
    any work, not after it."""
    try:
        Path(tempfile.mkdtemp(prefix=partial_prefix(name), dir=parent)).rmdir()
    except OSError as exc:
        raise InputError(f"cannot create folders in {parent} ({exc.strerror or exc}); choose an --out folder you "
                         "can write") from None


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished folder ``tmp`` to ``out``. Without ``force`` this never replaces a
    folder that is not empty, so of two runs into one new folder exactly one succeeds. With
    ``force`` the old folder is moved aside first and put back if the move fails."""
    try:
        os.rename(tmp, out)  # atomic; onto an empty folder it replaces it (not on Windows), onto a full one it fails
        return
    except OSError:
        if _is_empty_dir(out):  # Windows: a folder is never replaced by rename, even an empty one
            try:
                out.rmdir()  # fails if someone filled it meanwhile: then it is theirs
                os.rename(tmp, out)
                return
            except OSError:
                pass
        if not out.exists() or not force:
            if out.exists():
                raise InputError(f"output folder {out} was created by another run (or someone else) while this run "
                                 "worked; its contents were kept and nothing was written. Choose another --out") \
                    from None
            raise
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.resolve().parent))
    try:
        os.rename(out, old / out.name)
    except OSError as exc:
        old.rmdir()
        raise InputError(f"--force could not replace {out} ({exc.strerror}); nothing was written") from None
    try:
        os.rename(tmp, out)
    except OSError as exc:
        os.rename(old / out.name, out)  # put the user's folder back
        shutil.rmtree(old, ignore_errors=True)
        raise InputError(f"could not replace {out} ({exc.strerror}); it was left as it was") from None
    shutil.rmtree(old, ignore_errors=True)


def _is_empty_dir(path: Path) -> bool:
    try:
        return path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    except OSError:
        return False


class _WriteFailed(Exception):
    """A file of the results could not be written (ITK says so with a RuntimeError)."""


def _write(image: sitk.Image, path: Path) -> None:
    try:
        write_image(image, path)
    except RuntimeError as exc:
        raise _WriteFailed(str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else "write failed") from exc


def _write_all(images: list[tuple[sitk.Image, Path]]) -> None:
    """Write the images side by side: ITK compresses without holding Python's lock, so on two
    cores four 1 mm maps take about half the time (the first failure is raised)."""
    from concurrent.futures import ThreadPoolExecutor

    from .device import usable_cores
    workers = max(1, min(len(images), usable_cores(), 4))
    if workers == 1:
        for image, path in images:
            _write(image, path)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done in [pool.submit(_write, image, path) for image, path in images]:
            done.result()


def segmentation_from(heatmap: np.ndarray, mask: np.ndarray, threshold: float) -> np.ndarray:
    """uint8 label: 1 where the heatmap exceeds the threshold inside the brain."""
    return levels.segmentation_from(heatmap, mask, threshold)


def write_slice_scores(path: Path, result: ScoreResult) -> None:
    names = list(result.slice_scores)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slice", "brain_voxels", *names])
        for i in range(len(result.brain_voxels_per_slice)):
            vals = [result.slice_scores[n][i] for n in names]
            w.writerow([i, int(result.brain_voxels_per_slice[i]),
                        *("" if not np.isfinite(v) else f"{v:.6g}" for v in vals)])


def run_summary(package: ModelPackage, result: ScoreResult, threshold: Threshold, **extra: Any) -> dict[str, Any]:
    """The summary of a run: model, methods, threshold in both units, scores, timings."""
    model = {"name": package.name, "path": str(package.path.resolve()), "manifest_sha256": package.manifest_sha256}
    if package.shadows:
        model["shadows"] = package.shadows
    return {
        "engine_version": __version__,
        **extra,
        "brain_mask_source": result.info["brain_mask_source"],
        "model": model,
        "methods": list(result.maps),
        "threshold": {"method": threshold.method, "value": threshold.value, "level": threshold.level,
                      "source": threshold.source, "meaning": threshold.meaning,
                      "healthy_false_positive_rate": threshold.healthy_rate},
        "anomaly_levels": level_block(package, result),
        "volume_score": {"value": result.volume_score, "meaning": result.info["volume_score_meaning"]},
        "primary_slice_score": result.info["primary_slice_score"],
        "map_smoothing_mm": result.info["map_smoothing"],
        **({"scan_relative": reference_summary(package, result.info["scan_relative"])}
           if result.info.get("scan_relative") else {}),
        **({"fusion": fusion_block(package, result)} if "fusion" in result.info else {}),
        **({"lsr_work": result.info["lsr"]} if "lsr" in result.info else {}),
        "axial_axis": result.axial_axis,
        "scored_slices": result.info["scored_slices"],
        "brain_fraction_in_field_of_view": result.info["fov_coverage"],
        "device": result.device,
        "timings_s": dict(result.timings),
    }


def fusion_block(package: ModelPackage, result: ScoreResult) -> dict[str, Any]:
    """What a fused map combines: rule, components (model, manifest, method, level scale)."""
    info = result.info["fusion"]
    scales = info.get("level_scales", {})
    rule = {"weighted": "weighted mean", "mean": "mean", "max": "maximum"}.get(info["rule"], info["rule"])
    return {"rule": info["rule"], "meaning": f"the {rule} of the component maps' healthy anomaly levels "
                                             "(each map divided by its model's 0.01 % healthy threshold)",
            "components": [{"model": c["model"], "method": c["method"], "weight": c.get("weight", 1.0),
                            "raw_score_per_level": scales.get(c["method"])}
                           for c in package.architecture["components"]],
            "component_models": info["components"]}


@dataclass
class Segmented:
    """The segmentation at a run's threshold and what it adds to the summary."""

    segmentation: np.ndarray  # uint8, 1 where the map exceeds the threshold inside the brain
    findings: list[dict[str, Any]]
    summary: dict[str, Any]  # the run's summary with the segmentation's volume, findings and note


def segment_result(reference: sitk.Image, result: ScoreResult, threshold: Threshold,
                   summary: dict[str, Any]) -> Segmented:
    """Segment ``result`` at ``threshold`` and complete ``summary`` (a copy) with what the
    segmentation says: its volume and share of the brain, the findings under the map's finding
    rule and the regions below it, and a ``note`` when this scan is flagged far more broadly
    than healthy brains. The one summary builder's last step, in a results folder and in
    memory alike (:func:`.scoring.score_study_images`)."""
    seg = segmentation_from(result.maps[threshold.method], result.brain_mask, threshold.value)
    share = float(seg.sum() / max(1, result.brain_mask.sum()))
    summary = {**summary, "segmented_voxels": int(seg.sum()),
               "segmented_ml": float(seg.sum() * np.prod(reference.GetSpacing()[:3]) / 1000.0),
               "segmented_brain_share": share}
    per_level = (1.0 / threshold.scale if threshold.scale > 0 else
                 threshold.level / threshold.value if threshold.value else 1.0)
    regions = find_findings(seg, result.maps[threshold.method] * per_level, result.brain_mask,
                            reference.GetOrigin(), reference.GetSpacing()[:3], reference.GetDirection(),
                            result.axial_axis, limit=None)
    applied = rule_at(threshold.finding_rule, threshold.level)
    findings, below = apply_finding_rule(regions, applied)
    summary["findings"] = findings
    summary["findings_rule"] = {**findings_rule(), "method": threshold.method, "units": "anomaly levels",
                                "finding": describe_rule(applied),
                                **({"calibrated": threshold.finding_rule} if threshold.finding_rule else {})}
    summary["below_finding_rule"] = below_rule_summary(below)
    note = levels.broad_flag_note(share, threshold.healthy_rate)
    if note:
        summary["note"] = note
    return Segmented(seg, findings, summary)


def write_results(out: Path, reference: sitk.Image, result: ScoreResult, threshold: Threshold,
                  summary: dict[str, Any], force: bool = False,
                  extras: Callable[[Path, np.ndarray, dict[str, Any]], None] | None = None,
                  segmented: Segmented | None = None) -> dict[str, Any]:
    """Write heatmaps, segmentation, brain mask, slice scores, findings (findings.csv) and
    summary.json into ``out``; return the summary as written (``summary`` completed by
    :func:`segment_result`, or ``segmented``'s when the caller segmented already).
    ``extras(folder, segmentation, summary)`` adds files of the caller's (e.g. a thumbnail)
    before the folder is published, so they appear with the rest or not at all."""
    check_output_dir(out, force)
    if segmented is None:
        segmented = segment_result(reference, result, threshold, summary)
    seg, summary = segmented.segmentation, dict(segmented.summary)
    parent = out.resolve().parent
    clean_stale_partials(parent, out.name)  # left by a killed run into the same place
    tmp = new_folder(parent, partial_prefix(out.name))  # the user's umask applies, as to any new folder
    try:
        images = [(image_like(arr.astype(np.float32), reference), tmp / f"{method}.nii.gz")
                  for method, arr in result.maps.items()]
        images += [(image_like(seg, reference, sitk.sitkUInt8), tmp / "segmentation.nii.gz"),
                   (image_like(result.brain_mask.astype(np.uint8), reference, sitk.sitkUInt8),
                    tmp / "brainmask.nii.gz")]
        _write_all(images)
        write_slice_scores(tmp / "slice_scores.csv", result)
        write_findings_csv(tmp / "findings.csv", segmented.findings)
        if extras is not None:
            extras(tmp, seg, summary)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        _publish(tmp, out, force)
    except (OSError, _WriteFailed) as exc:  # a full disk, a vanished folder, an ITK writer error; a bug is no I/O
        shutil.rmtree(tmp, ignore_errors=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc).strip() or type(exc).__name__)
        raise InputError(f"could not write the results into {out} ({reason}); nothing was written. "
                         "Free some space or choose another --out") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


@dataclass
class SavedResult:
    """A results folder read back: raw maps, brain mask and slice scores in the input's
    array order, and the summary."""

    maps: dict[str, np.ndarray]
    brain_mask: np.ndarray
    slice_scores: dict[str, np.ndarray]
    axial_axis: int
    summary: dict[str, Any]


def read_slice_scores(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    names = [k for k in (rows[0].keys() if rows else []) if k not in ("slice", "brain_voxels")]
    return {k: np.array([float(r[k]) if r[k] else np.nan for r in rows]) for k in names}


def read_results(folder: str | Path) -> SavedResult:
    """Read a folder written by :func:`write_results`."""
    folder = Path(folder)
    summary = json.loads((folder / "summary.json").read_text())
    maps = {m: sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{m}.nii.gz"))) for m in summary["methods"]}
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "brainmask.nii.gz"))) > 0
    return SavedResult(maps, brain, read_slice_scores(folder / "slice_scores.csv"), int(summary["axial_axis"]), summary)
