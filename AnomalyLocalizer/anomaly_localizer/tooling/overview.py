"""A PNG overview of scored volumes: input, heatmap overlay and segmentation on axial
slices, and the slice-score curve, for people to look at (needs matplotlib)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..core.volume import axial_layout


def _axial_stack(path: Path, layout=None):
    img = sitk.ReadImage(str(path))
    layout = layout or axial_layout(img)
    return layout.to_canonical(sitk.GetArrayFromImage(img)), layout


def write_overview(cases: list[tuple[str, Path, Path]], png: Path, method: str | None = None,
                   slices_mm: tuple[float, ...] = (-20.0, 0.0, 20.0), truth: dict[str, Path] | None = None) -> Path:
    """cases: (title, input image, score output folder). Rows per case; 3 axial slices
    around the most anomalous slice (or the lesion's centre when ``truth`` is given),
    then the slice-score plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(cases), len(slices_mm) * 2 + 1, figsize=(3.0 * (2 * len(slices_mm) + 1.6), 3.2 * len(cases)),
                             gridspec_kw={"width_ratios": [1] * (2 * len(slices_mm)) + [1.6]}, squeeze=False)
    for row, (title, image_path, out_dir) in enumerate(cases):
        summary = json.loads((out_dir / "summary.json").read_text())
        m = method or summary["methods"][0]
        img, layout = _axial_stack(image_path)
        heat, _ = _axial_stack(out_dir / f"{m}.nii.gz", layout)
        seg, _ = _axial_stack(out_dir / "segmentation.nii.gz", layout)
        spacing = layout.spacing[0]
        rows = list(csv.DictReader(open(out_dir / "slice_scores.csv")))
        score = summary.get("primary_slice_score") or "elbo"  # the score slices are ranked by
        per_slice = np.array([float(r[score]) if r.get(score) else np.nan for r in rows])
        canon_scores = per_slice[layout.input_slice_index(np.arange(len(per_slice)))]
        if truth and title in truth:
            lab, _ = _axial_stack(truth[title], layout)
            centre = int(np.round(np.mean(np.nonzero(lab.any(axis=(1, 2)))[0])))
        else:
            centre = int(np.nanargmax(canon_scores)) if np.isfinite(canon_scores).any() else img.shape[0] // 2
        thr = summary["threshold"]["value"]
        vmax = max(thr * 3, float(np.percentile(heat[heat > 0], 99.9)) if (heat > 0).any() else 1.0)
        brain = img[img != 0]
        lo, hi = (np.percentile(brain, [1, 99.5]) if brain.size else (0, 1))
        for k, off in enumerate(slices_mm):
            z = int(np.clip(centre + round(off / spacing), 0, img.shape[0] - 1))
            a, b = axes[row, 2 * k], axes[row, 2 * k + 1]
            a.imshow(img[z], cmap="gray", vmin=lo, vmax=hi)
            h = np.ma.masked_less_equal(heat[z], thr * 0.75)  # show what is near or above the threshold
            a.imshow(h, cmap="inferno", vmin=0, vmax=vmax, alpha=0.8)
            a.set_title(f"{title}: {m} (slice {int(layout.input_slice_index(z))})", fontsize=8)
            b.imshow(img[z], cmap="gray", vmin=lo, vmax=hi)
            if seg[z].any():
                b.contour(seg[z], levels=[0.5], colors=["#00ff66"], linewidths=1.0)
            b.set_title(f"segmentation > {thr:.3g}", fontsize=8)
            for ax in (a, b):
                ax.axis("off")
        p = axes[row, -1]
        p.plot(np.arange(len(canon_scores)) * spacing, canon_scores, lw=1)
        p.axvline(centre * spacing, color="r", lw=0.8, ls="--")
        p.set_xlabel("inferior -> superior (mm)", fontsize=8)
        p.set_ylabel(f"{score} slice score" if score != "elbo" else "-ELBO per slice", fontsize=8)
        p.set_title(f"slice scores; volume score {summary['volume_score']['value']:.3g}", fontsize=8)
        p.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png
