"""A PNG overview of scored volumes, for people who have read nothing else: per scan,
three axial slices (input, the map in anomaly levels above a display floor, the segmentation
outline and, where known, the true lesion's outline), and the slice scores as healthy
percentiles with the lesion's slices marked; a labelled colour bar and a caption line with
the flagged shares (needs matplotlib)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..core.volume import axial_layout

SEGMENTATION_COLOUR = "#00ff66"
TRUTH_COLOUR = "#33ccff"
DISPLAY_FLOOR = 0.8  # share of the threshold's level below which the map is transparent


def _axial_stack(path: Path, layout=None):
    img = sitk.ReadImage(str(path))
    layout = layout or axial_layout(img)
    return layout.to_canonical(sitk.GetArrayFromImage(img)), layout


def _percentiles(values: np.ndarray, package, score: str) -> tuple[np.ndarray, bool]:
    """Slice scores as healthy percentiles when the package has that calibration, else raw."""
    if package is None or score not in package.calibration.slice:
        return values, False
    from ..core.levels import percentile_of
    out = np.array([percentile_of(package.calibration, score, float(v)) if np.isfinite(v) else np.nan
                    for v in values])
    return out, True


def write_overview(cases: list[tuple[str, Path, Path]], png: Path, method: str | None = None,
                   slices_mm: tuple[float, ...] = (-16.0, 0.0, 16.0), truth: dict[str, Path] | None = None,
                   centre_on: Path | None = None, package=None) -> Path:
    """cases: (title, input image, score output folder). One row per case: three axial slices
    around ``centre_on``'s centre (a label image; else the case's own truth, else its most
    anomalous slice), then the slice-score plot. ``truth``: title -> label image of the true
    lesion, outlined and marked on the plot. ``package``: the model, for healthy percentiles."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors

    truth = truth or {}
    n_cols = len(slices_mm) + 1
    fig, axes = plt.subplots(len(cases), n_cols, figsize=(3.6 * len(slices_mm) + 5.0, 3.9 * len(cases) + 0.9),
                             gridspec_kw={"width_ratios": [1] * len(slices_mm) + [1.5]}, squeeze=False)
    captions, vmax_all, m = [], 3.0, method
    for row, (title, image_path, out_dir) in enumerate(cases):
        summary = json.loads((out_dir / "summary.json").read_text())
        m = method or summary["methods"][0]
        img, layout = _axial_stack(image_path)
        heat, _ = _axial_stack(out_dir / f"{m}.nii.gz", layout)
        seg, _ = _axial_stack(out_dir / "segmentation.nii.gz", layout)
        per_level = summary["anomaly_levels"]["raw_score_per_level"][m]
        levels = heat / per_level
        thr_level = summary["threshold"]["level"]
        lab = _axial_stack(truth[title], layout)[0] > 0 if title in truth else None
        spacing = layout.spacing[0]
        rows = list(csv.DictReader(open(out_dir / "slice_scores.csv")))
        score = summary.get("primary_slice_score") or "elbo"
        raw = np.array([float(r[score]) if r.get(score) else np.nan for r in rows])
        per_slice, as_pct = _percentiles(raw[layout.input_slice_index(np.arange(len(raw)))], package, score)
        ref = _axial_stack(centre_on, layout)[0] > 0 if centre_on is not None else lab
        if ref is not None and ref.any():
            centre = int(np.round(np.mean(np.nonzero(ref.any(axis=(1, 2)))[0])))
        else:
            centre = int(np.nanargmax(per_slice)) if np.isfinite(per_slice).any() else img.shape[0] // 2
        floor = DISPLAY_FLOOR * thr_level
        vmax = vmax_all = max(vmax_all, 2.0 * thr_level)
        brain = img[img != 0]
        lo, hi = (np.percentile(brain, [1, 99.5]) if brain.size else (0, 1))
        for k, off in enumerate(slices_mm):
            z = int(np.clip(centre + round(off / spacing), 0, img.shape[0] - 1))
            a = axes[row, k]
            a.imshow(img[z], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            a.imshow(np.ma.masked_less(levels[z], floor), cmap="inferno", vmin=floor, vmax=vmax, alpha=0.85,
                     interpolation="nearest")
            if seg[z].any():
                a.contour(seg[z], levels=[0.5], colors=[SEGMENTATION_COLOUR], linewidths=1.2)
            if lab is not None and lab[z].any():
                a.contour(lab[z], levels=[0.5], colors=[TRUTH_COLOUR], linewidths=1.2, linestyles="dashed")
            a.set_title(f"{title}, {off:+g} mm (slice {int(layout.input_slice_index(z))})", fontsize=10)
            a.text(0.02, 0.5, "R", color="white", transform=a.transAxes, fontsize=11, va="center", weight="bold")
            a.text(0.98, 0.5, "L", color="white", transform=a.transAxes, fontsize=11, va="center", ha="right",
                   weight="bold")
            a.axis("off")
        p = axes[row, -1]
        x_mm = np.arange(len(per_slice)) * spacing
        p.plot(x_mm, per_slice, lw=1.2, color="black")
        if lab is not None and lab.any():
            zs = np.nonzero(lab.any(axis=(1, 2)))[0]
            p.axvspan(zs.min() * spacing, zs.max() * spacing, color=TRUTH_COLOUR, alpha=0.3, label="inserted lesion")
        for off in slices_mm:
            p.axvline((centre + off / spacing) * spacing, color="grey", lw=0.6, ls=":")
        if as_pct:
            p.set_ylim(0, 101)
            p.axhline(99, color="red", lw=0.8, ls="--", label="99th healthy percentile")
        p.set_xlabel("slice position, inferior to superior (mm)", fontsize=9)
        p.set_ylabel(f"{score} slice score, healthy percentile" if as_pct else f"{score} slice score", fontsize=9)
        p.set_title(f"{title}: slice scores (dotted: the slices shown)", fontsize=10)
        p.legend(fontsize=8, loc="lower right")
        p.tick_params(labelsize=8)
        share = 100 * summary.get("segmented_brain_share", 0.0)
        extra = ""
        if lab is not None and lab.any():
            full = _axial_stack(out_dir / "segmentation.nii.gz", layout)[0] > 0
            extra = f", Dice with the inserted lesion {2 * (full & lab).sum() / max(1, full.sum() + lab.sum()):.2f}"
        captions.append(f"{title}: {share:.2f} % of the brain segmented{extra}")
    rate = summary["threshold"].get("healthy_false_positive_rate")
    meaning = f"flags {100 * rate:.2g} % of healthy brain voxels" if rate else summary["threshold"]["meaning"]
    fig.suptitle(f"Map `{m}` in anomaly levels (1 = as rare as the rarest 0.01 % of healthy voxels); green: "
                 f"segmentation at level {thr_level:.2f} ({meaning}); blue dashed: the inserted lesion's true extent.\n"
                 + "; ".join(captions), fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.93, 0.93))
    bar = fig.add_axes((0.94, 0.15, 0.012, 0.7))
    floor = DISPLAY_FLOOR * thr_level
    fig.colorbar(cm.ScalarMappable(norm=colors.Normalize(floor, vmax_all), cmap="inferno"), cax=bar)
    bar.set_ylabel(f"anomaly level (not shown below {floor:.2f})", fontsize=9)
    bar.axhline(thr_level, color=SEGMENTATION_COLOUR, lw=2)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png
