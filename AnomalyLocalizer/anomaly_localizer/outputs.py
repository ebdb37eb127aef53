"""Writing a run's results into an output folder, all or nothing.

Files are written into a hidden temporary folder beside DIR and moved into place only
when every file is complete, so a failed or interrupted run leaves DIR as it was.
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .calibrate import broad_flag_note
from .errors import InputError
from .imageio import write_image
from .pipeline import ScoreResult
from .volume import image_like


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse to touch an existing DIR unless --force; refuse a file in its place."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder; choose another output folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(f"output folder {out} already exists; pass --force to replace it or choose another folder")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise InputError(f"the folder {parent} that should hold {out.name} does not exist; create it first")


def segmentation_from(heatmap: np.ndarray, mask: np.ndarray, threshold: float) -> np.ndarray:
    """uint8 label: 1 where the heatmap exceeds the threshold inside the brain."""
    return ((heatmap > threshold) & mask).astype(np.uint8)


def write_slice_scores(path: Path, result: ScoreResult) -> None:
    names = list(result.slice_scores)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slice", "brain_voxels", *names])
        for i in range(len(result.brain_voxels_per_slice)):
            vals = [result.slice_scores[n][i] for n in names]
            w.writerow([i, int(result.brain_voxels_per_slice[i]),
                        *("" if not np.isfinite(v) else f"{v:.6g}" for v in vals)])


def write_results(out: Path, reference: sitk.Image, result: ScoreResult, threshold: float,
                  summary: dict[str, Any], force: bool = False, healthy_rate: float | None = None) -> dict[str, Any]:
    """Write heatmaps, segmentation, brain mask, slice scores and summary.json into ``out``;
    return the summary as written (``summary`` plus what the segmentation adds).
    ``healthy_rate``: the share of healthy brain the threshold flags (calibration), for the
    summary's ``note`` when this scan is flagged far more broadly (:func:`calibrate.broad_flag_note`)."""
    check_output_dir(out, force)
    parent = out.resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    try:
        first = next(iter(result.maps))
        for method, arr in result.maps.items():
            write_image(image_like(arr.astype(np.float32), reference), tmp / f"{method}.nii.gz")
        seg = segmentation_from(result.maps[first], result.brain_mask, threshold)
        write_image(image_like(seg, reference, sitk.sitkUInt8), tmp / "segmentation.nii.gz")
        write_image(image_like(result.brain_mask.astype(np.uint8), reference, sitk.sitkUInt8),
                    tmp / "brainmask.nii.gz")
        write_slice_scores(tmp / "slice_scores.csv", result)
        share = float(seg.sum() / max(1, result.brain_mask.sum()))
        summary = {**summary, "segmented_voxels": int(seg.sum()),
                   "segmented_ml": float(seg.sum() * np.prod(reference.GetSpacing()[:3]) / 1000.0),
                   "segmented_brain_share": share}
        note = broad_flag_note(share, healthy_rate)
        if note:
            summary["note"] = note
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
