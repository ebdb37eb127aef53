"""Findings: the connected regions of an anomaly segmentation, with where they are.

A radiologist asks how many, how big and where. Each finding is one connected region of the
segmentation (26-connected: voxels touching by a face, an edge or a corner belong together)
of at least :data:`MIN_FINDING_ML`, ranked by its peak anomaly level, with its volume, peak and
mean level, the positions of its peak and centroid in patient coordinates (RAS as Slicer
shows them, LPS as DICOM and ITK use), its axial slice range on the input grid, and its side
of the brain. The midline is taken as the brain mask's centre of mass along the patient's
left-right axis, which is right for a brain in a usual head position and approximate for a
tilted one; a region with at least :data:`BOTH_SIDES_SHARE` of its voxels on each side is
"both".

A healthy brain has regions above any threshold too (at the default threshold 0.1 % of its
voxels), so a region is a finding only when it is unlikely on a healthy brain, as
neuroimaging does with cluster-extent thresholds: a model's calibration holds, per map, a
finding rule chosen on its healthy calibration scans (:func:`choose_finding_rule`): a region is
a finding when its volume or its peak level reaches what at most one healthy scan in twenty
shows, so that about one healthy scan in ten shows any finding (:data:`FALSE_FINDING_RATE`).
The regions below the rule stay in the segmentation and are counted apart
(:func:`apply_finding_rule`), never listed as findings.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

CONNECTIVITY = "26-connected (voxels sharing a face, an edge or a corner)"
MIN_FINDING_ML = 0.05  # smaller regions are listed nowhere (noise-sized; 50 voxels of 1 mm)
MAX_FINDINGS = 100  # the highest-peaked ones; a map flagging more regions than this is broadly raised
BOTH_SIDES_SHARE = 0.2
FALSE_FINDING_RATE = 0.1  # share of healthy calibration scans a finding rule lets show any finding
CSV_COLUMNS = ["rank", "volume_ml", "voxels", "peak_level", "mean_level",
               "peak_r", "peak_a", "peak_s", "centroid_r", "centroid_a", "centroid_s",
               "peak_lps_l", "peak_lps_p", "peak_lps_s", "axial_first", "axial_last", "side"]


def _index_to_lps(ijk: np.ndarray, origin, spacing, direction) -> np.ndarray:
    """Continuous ITK indices (n, 3; i, j, k order) to LPS millimetres (n, 3)."""
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    return np.asarray(origin, dtype=float) + (ijk * np.asarray(spacing, dtype=float)) @ d.T


def find_findings(segmentation: np.ndarray, levels: np.ndarray, brain_mask: np.ndarray, origin, spacing, direction,
                  axial_axis: int, min_ml: float = MIN_FINDING_ML, limit: int | None = MAX_FINDINGS
                  ) -> list[dict[str, Any]]:
    """The findings of a segmentation (numpy k, j, i order, like ``levels`` and the brain
    mask), ranked by peak level; geometry as SimpleITK gives it; ``axial_axis`` is the ITK
    index axis that runs foot to head."""
    seg = np.ascontiguousarray(segmentation, dtype=np.uint8)
    if not seg.any():
        return []
    voxel_ml = float(np.prod(spacing)) / 1000.0
    min_voxels = max(1, int(np.ceil(min_ml / voxel_ml)))
    components = sitk.ConnectedComponent(sitk.GetImageFromArray(seg), True)
    labels = sitk.GetArrayFromImage(sitk.RelabelComponent(components, min_voxels)).astype(np.int32)
    n = int(labels.max())
    if n == 0:
        return []
    flat_labels, flat_levels = labels.ravel(), np.asarray(levels, dtype=np.float64).ravel()
    inside = np.flatnonzero(flat_labels)
    lab, lev = flat_labels[inside], flat_levels[inside]
    counts = np.bincount(lab, minlength=n + 1)
    sums = np.bincount(lab, weights=lev, minlength=n + 1)
    # peak of each region: sort by (label, level) and take each label's last entry
    order = np.lexsort((lev, lab))
    last = np.flatnonzero(np.diff(np.append(lab[order], n + 1)))
    peak_flat = inside[order[last]]
    peak_level = flat_levels[peak_flat]
    zyx = np.stack(np.unravel_index(inside, labels.shape), axis=1).astype(np.float64)
    centroid_zyx = np.stack([np.bincount(lab, weights=zyx[:, a], minlength=n + 1) for a in range(3)], axis=1)
    centroid_zyx = centroid_zyx[1:] / counts[1:, None]
    peak_zyx = np.stack(np.unravel_index(peak_flat, labels.shape), axis=1).astype(np.float64)
    centroid_lps = _index_to_lps(centroid_zyx[:, ::-1], origin, spacing, direction)
    peak_lps = _index_to_lps(peak_zyx[:, ::-1], origin, spacing, direction)
    # the patient's left-right position of every region voxel, against the brain's midline
    brain = np.flatnonzero(np.asarray(brain_mask).ravel())
    brain_zyx = np.stack(np.unravel_index(brain, labels.shape), axis=1).astype(np.float64)
    midline_x = float(_index_to_lps(brain_zyx.mean(axis=0, keepdims=True)[:, ::-1], origin, spacing, direction)[0, 0]) \
        if brain.size else float(_index_to_lps(np.array([[0.0, 0.0, 0.0]]), origin, spacing, direction)[0, 0])
    voxel_x = _index_to_lps(zyx[:, ::-1], origin, spacing, direction)[:, 0]
    left_counts = np.bincount(lab, weights=(voxel_x > midline_x).astype(np.float64), minlength=n + 1)[1:]
    axial_np = 2 - axial_axis
    axial_first = np.full(n + 1, np.iinfo(np.int64).max)
    axial_last = np.full(n + 1, -1)
    np.minimum.at(axial_first, lab, zyx[:, axial_np].astype(np.int64))
    np.maximum.at(axial_last, lab, zyx[:, axial_np].astype(np.int64))

    found = []
    for r in range(n):
        left_share = left_counts[r] / counts[r + 1]
        side = ("left" if left_share >= 1 - BOTH_SIDES_SHARE else "right" if left_share <= BOTH_SIDES_SHARE
                else "both")
        lps, c_lps = peak_lps[r], centroid_lps[r]
        found.append({
            "volume_ml": round(float(counts[r + 1] * voxel_ml), 4), "voxels": int(counts[r + 1]),
            "peak_level": float(peak_level[r]), "mean_level": float(sums[r + 1] / counts[r + 1]),
            "peak_ras": [round(float(-lps[0]), 2), round(float(-lps[1]), 2), round(float(lps[2]), 2)],
            "centroid_ras": [round(float(-c_lps[0]), 2), round(float(-c_lps[1]), 2), round(float(c_lps[2]), 2)],
            "peak_lps": [round(float(v), 2) for v in lps], "centroid_lps": [round(float(v), 2) for v in c_lps],
            "peak_index_ijk": [int(v) for v in peak_zyx[r, ::-1]],
            "axial_slices": [int(axial_first[r + 1]), int(axial_last[r + 1])], "side": side})
    found.sort(key=lambda f: -f["peak_level"])
    found = found if limit is None else found[:limit]
    for rank, f in enumerate(found, start=1):
        f["rank"] = rank
    return [{"rank": f.pop("rank"), **f} for f in found]


def findings_rule(min_ml: float = MIN_FINDING_ML, limit: int = MAX_FINDINGS) -> dict[str, Any]:
    """How the findings were made, for summary.json."""
    return {"connectivity": CONNECTIVITY, "min_volume_ml": min_ml, "max_listed": limit,
            "ranked_by": "peak anomaly level", "coordinates": "millimetres: RAS as Slicer shows them, LPS as DICOM",
            "axial_slices": "first and last index along the input grid's foot-to-head axis",
            "side": "patient side, against the brain mask's centre of mass (midline approximate if tilted)"}


def region_sizes_and_peaks(segmentation: np.ndarray, levels: np.ndarray, voxel_ml: float,
                           min_ml: float = MIN_FINDING_ML) -> list[tuple[float, float]]:
    """(volume in mL, peak level) of each connected region of a segmentation (26-connected,
    at least ``min_ml``), as :func:`find_findings` delimits them; for calibration."""
    seg = np.ascontiguousarray(segmentation, dtype=np.uint8)
    if not seg.any():
        return []
    components = sitk.ConnectedComponent(sitk.GetImageFromArray(seg), True)
    labels = sitk.GetArrayFromImage(sitk.RelabelComponent(components, max(1, int(np.ceil(min_ml / voxel_ml)))))
    inside = labels > 0
    lab, lev = labels[inside].astype(np.int64), np.asarray(levels, dtype=np.float64)[inside]
    n = int(labels.max())
    counts = np.bincount(lab, minlength=n + 1)[1:]
    peaks = np.full(n + 1, -np.inf)
    np.maximum.at(peaks, lab, lev)
    return [(float(c * voxel_ml), float(p)) for c, p in zip(counts, peaks[1:])]


def choose_finding_rule(regions_per_scan: list[list[tuple[float, float]]], rate: float = FALSE_FINDING_RATE,
                        threshold_level: float = 1.0) -> dict[str, Any]:
    """The finding rule of a map from its healthy calibration scans' regions at the default
    threshold (one list of (volume mL, peak level) per scan): a region is a finding when its
    volume reaches ``min_volume_ml`` or its peak reaches ``min_peak_level``. Each bound is set
    above the (k+1)-th largest of the scans' largest volumes (highest peaks), with k the largest
    number for which a new healthy scan, exchangeable with the n calibration scans, exceeds it
    with probability (k+1)/(n+1) <= ``rate`` / 2; so at most ``rate`` of new healthy scans show
    any finding. With fewer than 2 / rate - 1 scans that cannot be met and the bound is the
    maximum (``enough_scans`` False). Never below :data:`MIN_FINDING_ML` or the threshold's own
    level. The figures stored with the rule are measured on the calibration scans themselves
    (in-sample: optimistic by construction)."""
    n = len(regions_per_scan)
    k = int(np.floor((n + 1) * rate / 2)) - 1
    allowed = max(k, 0)

    def bound(values: list[float], floor: float) -> float:
        top = sorted(values, reverse=True)
        # just above the (allowed + 1)-th largest scan maximum, on a 0.0001 grid (it is stored
        # rounded): only ``allowed`` calibration scans reach it
        above = float(np.floor(top[allowed] * 1e4) + 1) / 1e4 if allowed < len(top) else floor
        return max(floor, above)

    largest = [max((v for v, _ in r), default=0.0) for r in regions_per_scan]
    highest = [max((p for _, p in r), default=0.0) for r in regions_per_scan]
    rule = {"min_volume_ml": bound(largest, MIN_FINDING_ML), "min_peak_level": bound(highest, threshold_level),
            "false_finding_rate": rate, "n_subjects": n, "threshold_level": threshold_level,
            "enough_scans": k >= 0}
    shown = sum(any(is_finding(v, p, rule) for v, p in r) for r in regions_per_scan)
    rule.update(scans_with_region=sum(bool(r) for r in regions_per_scan) / max(n, 1),
                scans_with_finding=shown / max(n, 1),
                regions_per_scan=sum(len(r) for r in regions_per_scan) / max(n, 1),
                findings_per_scan=sum(is_finding(v, p, rule) for r in regions_per_scan for v, p in r) / max(n, 1))
    return rule


def rule_at(rule: dict[str, Any] | None, level: float) -> dict[str, Any] | None:
    """The finding rule as it applies at threshold ``level``. At or above the level it was
    chosen at, in full: regions only shrink there. Below it, regions grow and merge, so the
    volume bound no longer holds healthy scans to its rate; only the peak bound, which does not
    depend on the threshold, applies."""
    if not rule:
        return rule
    if level >= rule.get("threshold_level", 0.0) - 1e-9:
        return rule
    return {**rule, "min_volume_ml": float("inf"), "volume_bound_off": True}


def is_finding(volume_ml: float, peak_level: float, rule: dict[str, Any] | None) -> bool:
    """Whether a region passes a finding rule (every region does without one)."""
    if not rule:
        return True
    return volume_ml >= rule["min_volume_ml"] or peak_level >= rule["min_peak_level"]


def lesions_covered(segmentation: np.ndarray, levels: np.ndarray, truth: np.ndarray, voxel_ml: float,
                    rule: dict[str, Any] | None, min_ml: float = MIN_FINDING_ML) -> tuple[int, int, int]:
    """(true lesions, those a region of the segmentation touches, those a finding touches):
    each connected lesion of ``truth`` (26-connected, any size) counts as covered when a
    segmented region (as :func:`find_findings` delimits them), resp. one that passes ``rule``,
    shares a voxel with it. For evaluation: a finding rule must not lose what regions found."""
    seg = np.ascontiguousarray(segmentation, dtype=np.uint8)
    lesions = sitk.GetArrayFromImage(sitk.ConnectedComponent(
        sitk.GetImageFromArray(np.ascontiguousarray(truth, dtype=np.uint8)), True)).astype(np.int64)
    n = int(lesions.max())
    if n == 0 or not seg.any():
        return n, 0, 0
    regions = sitk.GetArrayFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(seg), True),
                                                           max(1, int(np.ceil(min_ml / voxel_ml))))).astype(np.int64)
    k = int(regions.max())
    if k == 0:
        return n, 0, 0
    flat, lev = regions.ravel(), np.asarray(levels, dtype=np.float64).ravel()
    inside = flat > 0
    counts = np.bincount(flat[inside], minlength=k + 1)
    peaks = np.full(k + 1, -np.inf)
    np.maximum.at(peaks, flat[inside], lev[inside])
    passes = np.array([False] + [is_finding(counts[r] * voxel_ml, peaks[r], rule) for r in range(1, k + 1)])
    pairs = np.unique(np.stack([lesions.ravel()[inside], flat[inside]], axis=1), axis=0)
    pairs = pairs[pairs[:, 0] > 0]
    touched = set(pairs[:, 0].tolist())
    by_finding = set(pairs[passes[pairs[:, 1]], 0].tolist())
    return n, len(touched), len(by_finding)


def apply_finding_rule(regions: list[dict[str, Any]], rule: dict[str, Any] | None,
                       limit: int = MAX_FINDINGS) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(findings, regions below the rule) of :func:`find_findings`'s regions (found with no
    limit, so that a large region of a modest peak is never cut before the rule sees it), each
    list ranked again from 1 by peak level; at most ``limit`` findings are kept."""
    kept = [dict(r) for r in regions if is_finding(r["volume_ml"], r["peak_level"], rule)][:limit]
    below = [dict(r) for r in regions if not is_finding(r["volume_ml"], r["peak_level"], rule)]
    for group in (kept, below):
        for rank, r in enumerate(group, start=1):
            r["rank"] = rank
    return kept, below


def below_rule_summary(below: list[dict[str, Any]], top: int = 5) -> dict[str, Any]:
    """What summary.json says of the regions below the finding rule: how many, and the largest."""
    largest = sorted(below, key=lambda r: -r["volume_ml"])[:top]
    return {"count": len(below), "total_ml": round(sum(r["volume_ml"] for r in below), 4),
            "largest": [{k: r[k] for k in ("volume_ml", "peak_level", "peak_ras", "side")} for r in largest]}


def describe_rule(rule: dict[str, Any] | None) -> str:
    """The finding rule in words, for summary.json and cards."""
    if not rule:
        return (f"every region of at least {MIN_FINDING_ML:g} mL (no finding rule calibrated for this map: healthy "
                "brains show such regions too)")
    peak = f"a peak level of at least {rule['min_peak_level']:.4g}"
    if rule.get("volume_bound_off"):
        return (f"a region with {peak} (below the threshold the rule was chosen at, level "
                f"{rule['threshold_level']:.3g}, regions grow, so only the peak bound applies)")
    return (f"a region of at least {rule['min_volume_ml']:.4g} mL or with {peak}, sizes and peaks that "
            f"{rule['n_subjects']} healthy calibration scans reach rarely enough that at most "
            f"{100 * rule['false_finding_rate']:.0f} % of healthy scans should show any finding"
            + ("" if rule.get("enough_scans", True) else " (too few calibration scans for that rate: the bounds "
               "are their maxima)"))


def write_findings_csv(path: Path, findings: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for x in findings:
            w.writerow([x["rank"], f"{x['volume_ml']:.4g}", x["voxels"], f"{x['peak_level']:.4g}",
                        f"{x['mean_level']:.4g}", *x["peak_ras"], *x["centroid_ras"], *x["peak_lps"],
                        *x["axial_slices"], x["side"]])


def format_ml(volume_ml: float) -> str:
    """A volume as a reader writes it: '290 mL', '12 mL', '1.4 mL', '0.06 mL' (never 2.9e+02)."""
    if volume_ml >= 10:
        return f"{volume_ml:.0f} mL"
    return f"{volume_ml:.2g} mL"


def format_mm(value: float) -> str:
    """A coordinate in whole millimetres, without a negative zero ('-0')."""
    return str(int(round(value)))


def describe_finding(f: dict[str, Any]) -> str:
    """One finding in one line: '#rank: size, side, peak position and level, axial slices'."""
    r, a, s = (format_mm(v) for v in f["peak_ras"])
    return (f"#{f['rank']}: {format_ml(f['volume_ml'])}, {f['side']}, peak at R {r} A {a} S {s} mm "
            f"(level {f['peak_level']:.2g}), axial slices {f['axial_slices'][0]}-{f['axial_slices'][1]}")


def describe_findings(findings: list[dict[str, Any]], top: int = 3) -> str:
    """One line per finding, for a terminal or a picture: 'size, side, where, peak'."""
    if not findings:
        return "no finding at this threshold"
    lines = [describe_finding(f) for f in findings[:top]]
    if len(findings) > top:
        lines.append(f"and {len(findings) - top} more")
    return "\n".join(lines)
