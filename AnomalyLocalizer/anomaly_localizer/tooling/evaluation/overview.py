"""A PNG overview of scored volumes that a person who has read nothing else can read.

Per scan, one row: the axial slices through its findings (the top findings' peaks; for a
scan with a known lesion, the lesion's centre first), each as the plain image beside the same
slice with the map in anomaly levels and the segmentation's outline (and the true lesion's,
where known), then the findings as text. Under the rows, the scans' slice scores on one plot,
so that where they part is visible without a healthy reference that may not fit the scan.
One colour bar in anomaly levels with the threshold on it: below the threshold the map is drawn
in a pale blue that does not read as a flag, above it in red to yellow. Needs matplotlib.
"""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ...core.findings import describe_findings
from ...core.volume import axial_layout

SEGMENTATION_COLOUR = "#00ff66"  # the segmentation's outline
TRUTH_COLOUR = "#ff33ff"  # the true lesion's outline (dotted), unlike green in hue and dash
MAP_COLOURS = "autumn"  # red to yellow above the threshold: no dark end that reads as a hole in the brain
BELOW_COLOUR = "#9ecae1"  # below the threshold: pale blue, not a flag
DISPLAY_FLOOR = 0.6  # share of the threshold's level below which the map is transparent
FONT = 12


def _axial_stack(path: Path, layout=None):
    img = sitk.ReadImage(str(path))
    layout = layout or axial_layout(img)
    return layout.to_canonical(sitk.GetArrayFromImage(img)), layout


def _canonical_slice(layout, input_index: int) -> int:
    n = layout.shape[0]
    return int(np.clip(n - 1 - input_index if layout.flips[0] else input_index, 0, n - 1))


def _slices_to_show(summary: dict, layout, lab: np.ndarray | None, n_slices: int, fallback: int) -> list[int]:
    """Canonical axial slices: the lesion's centre (if known), then the peaks of the largest
    findings, at least 6 mm apart; the fallback (e.g. the middle) if there is nothing to show."""
    axis = summary["axial_axis"]
    chosen: list[int] = []
    if lab is not None and lab.any():
        chosen.append(int(np.round(np.mean(np.nonzero(lab.any(axis=(1, 2)))[0]))))
    for f in sorted(summary.get("findings", []), key=lambda f: -f["volume_ml"]):
        z = _canonical_slice(layout, f["peak_index_ijk"][axis])
        if all(abs(z - c) * layout.spacing[0] >= 6.0 for c in chosen):
            chosen.append(z)
        if len(chosen) == n_slices:
            break
    return chosen or [fallback]


def level_colours(floor: float, threshold: float, vmax: float):
    """(colormap, norm) of the map in anomaly levels from ``floor`` to ``vmax``: pale blue up to
    the threshold, then red to yellow, so that only what is flagged looks like a flag."""
    from matplotlib import colormaps, colors
    n = 256
    below = max(1, int(round(n * (threshold - floor) / max(vmax - floor, 1e-6))))
    above = colormaps[MAP_COLOURS](np.linspace(0.0, 1.0, max(1, n - below)))
    table = np.vstack([np.tile(colors.to_rgba(BELOW_COLOUR), (below, 1)), above])
    return colors.ListedColormap(table), colors.Normalize(floor, vmax)


def write_overview(cases: list[tuple[str, Path, Path]], png: Path, method: str | None = None,
                   truth: dict[str, Path] | None = None, scan_note: str = "", n_slices: int = 2,
                   notes: dict[str, str] | None = None) -> Path:
    """cases: (title, input image, score output folder). ``truth``: title -> label image of the
    true lesion, outlined. ``scan_note``: one line saying what the scans are; ``notes``: title
    -> a sentence under that scan's findings (e.g. why a healthy scan is not clean)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm
    from matplotlib.lines import Line2D

    truth = truth or {}
    loaded = []
    for title, image_path, out_dir in cases:
        summary = json.loads((out_dir / "summary.json").read_text())
        img, layout = _axial_stack(image_path)
        seg = _axial_stack(out_dir / "segmentation.nii.gz", layout)[0] > 0
        lab = _axial_stack(truth[title], layout)[0] > 0 if title in truth else None
        # with nothing to show, the slice with the most flagged voxels (else the middle one)
        fallback = int(np.argmax(seg.sum(axis=(1, 2)))) if seg.any() else img.shape[0] // 2
        loaded.append((title, out_dir, summary, img, layout, seg, lab,
                       _slices_to_show(summary, layout, lab, n_slices, fallback)))
    n_slices = max(len(x[-1]) for x in loaded)
    fig = plt.figure(figsize=(4.2 * 2 * n_slices + 4.5, 4.4 * len(cases) + 4.4))
    grid = fig.add_gridspec(len(cases) + 1, 2 * n_slices + 1, height_ratios=[1] * len(cases) + [0.8],
                            width_ratios=[1] * (2 * n_slices) + [1.15], hspace=0.28, wspace=0.04)
    vmax, thr_level, m, plot_rows = 3.0, 1.0, method, []
    for row, (title, out_dir, summary, img, layout, seg, lab, shown) in enumerate(loaded):
        m = method or summary["methods"][0]
        levels = _axial_stack(out_dir / f"{m}.nii.gz", layout)[0] / summary["anomaly_levels"]["raw_score_per_level"][m]
        thr_level = summary["threshold"]["level"]
        floor, vmax = DISPLAY_FLOOR * thr_level, max(vmax, 2.0 * thr_level)
        brain = img[img != 0]
        lo, hi = (np.percentile(brain, [1, 99.5]) if brain.size else (0, 1))
        for k in range(n_slices):
            plain, over = fig.add_subplot(grid[row, 2 * k]), fig.add_subplot(grid[row, 2 * k + 1])
            for a in (plain, over):
                a.axis("off")
            if k >= len(shown):
                continue
            z = shown[k]
            for a in (plain, over):
                a.imshow(img[z], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
                a.text(0.02, 0.5, "R", color="white", transform=a.transAxes, fontsize=FONT, va="center", weight="bold")
                a.text(0.98, 0.5, "L", color="white", transform=a.transAxes, fontsize=FONT, va="center", ha="right",
                       weight="bold")
            cmap, norm = level_colours(floor, thr_level, vmax)
            over.imshow(np.ma.masked_less(levels[z], floor), cmap=cmap, norm=norm, alpha=0.8, interpolation="nearest")
            if seg[z].any():
                over.contour(seg[z], levels=[0.5], colors=[SEGMENTATION_COLOUR], linewidths=1.6)
            if lab is not None and lab[z].any():
                over.contour(lab[z], levels=[0.5], colors=[TRUTH_COLOUR], linewidths=1.6, linestyles="dotted")
            where = f"axial slice {int(layout.input_slice_index(z))}"
            plain.set_title(f"{title}: {where}", fontsize=FONT)
            over.set_title("map and segmentation", fontsize=FONT)
        text = fig.add_subplot(grid[row, -1])
        text.axis("off")
        share = 100 * summary.get("segmented_brain_share", 0.0)
        found = summary.get("findings", [])
        lines = [f"{title}", f"{int(seg.sum())} voxels segmented ({share:.2f} % of the brain)", "",
                 f"findings ({len(found)}):"]
        lines += [textwrap.fill(line, 44, subsequent_indent="    ") for line in describe_findings(found).splitlines()]
        below = summary.get("below_finding_rule", {}).get("count", 0)
        if below:
            lines.append(textwrap.fill(f"{below} smaller region{'s' * (below != 1)} above the threshold that healthy "
                                       "brains show too (not findings)", 44))
        if lab is not None and lab.any():
            full = seg
            dice = 2 * (full & lab).sum() / max(1, full.sum() + lab.sum())
            lines += ["", f"overlap with the inserted lesion: Dice {dice:.2f}"]
        if (notes or {}).get(title):
            lines += [""] + textwrap.wrap(notes[title], 44)
        text.text(0.0, 1.0, "\n".join(lines), va="top", fontsize=FONT - 1)
        score = summary.get("primary_slice_score") or "elbo"
        per_slice = [float(r[score]) if r.get(score) else np.nan for r in csv.DictReader(open(out_dir / "slice_scores.csv"))]
        per_slice = np.array(per_slice)[layout.input_slice_index(np.arange(len(per_slice)))]
        plot_rows.append((title, per_slice, layout.spacing[0], lab, score))

    p = fig.add_subplot(grid[-1, : 2 * n_slices])
    for (title, values, spacing, lab, score), colour in zip(plot_rows, ("black", "tab:red", "tab:blue")):
        p.plot(np.arange(len(values)) * spacing, values, lw=1.6, color=colour, label=title)
        if lab is not None and lab.any():
            zs = np.nonzero(lab.any(axis=(1, 2)))[0]
            p.axvspan(zs.min() * spacing, zs.max() * spacing, color=TRUTH_COLOUR, alpha=0.2,
                      label="slices of the inserted lesion")
    p.set_xlabel("position from the lowest slice, foot to head (mm)", fontsize=FONT)
    p.set_ylabel(f"{plot_rows[0][4]} slice score\n(the map's raw units; higher: less healthy)", fontsize=FONT)
    p.set_title("slice scores of the scans above: where they part, the slices differ", fontsize=FONT)
    p.legend(fontsize=FONT - 1, loc="upper left")
    p.tick_params(labelsize=FONT - 1)

    key = fig.add_subplot(grid[-1, -1])
    key.axis("off")
    rate = summary.get("threshold", {}).get("healthy_false_positive_rate")
    key.legend(handles=[Line2D([], [], color=SEGMENTATION_COLOUR, lw=2.5, label="segmentation (above threshold)"),
                        Line2D([], [], color=TRUTH_COLOUR, lw=2.5, ls="dotted", label="inserted lesion (truth)")],
               loc="upper left", fontsize=FONT - 1, frameon=False)
    bar = fig.add_axes((0.77, 0.08, 0.16, 0.025))
    floor = DISPLAY_FLOOR * thr_level
    cmap, norm = level_colours(floor, thr_level, vmax)
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), cax=bar, orientation="horizontal")
    bar.axvline(thr_level, color="black", lw=2.5)
    bar.set_title(f"anomaly level (blue: below the threshold; black line: threshold {thr_level:.2f})"
                  + (f"\n(flags {100 * rate:.2g} % of healthy brain voxels)" if rate else ""), fontsize=FONT - 1)
    bar.tick_params(labelsize=FONT - 2)
    fig.suptitle(f"Where each scan departs from healthy brains (map: {m})" + (f"\n{scan_note}" if scan_note else ""),
                 fontsize=FONT + 2)
    fig.savefig(png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return png
