"""Calibration on healthy subjects: thresholds with known false-positive rates.

For each pixel score, the thresholds at which 1 %, 0.1 % and 0.01 % of healthy brain
voxels are flagged; for each slice score (and the volume score), the healthy distribution
as quantiles, so a score can be shown as a percentile of healthy slices. The default
threshold of the engine is the 0.1 % one (``default_fpr``). For each pixel score, also the
finding rule (:func:`..core.findings.choose_finding_rule`): the region sizes and peaks at the
default threshold that healthy scans rarely reach.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from ...core.imageio import as_3d, read_image
from ...core.package import ModelPackage, load_package, update_meta
from ...core.pipeline import score_volume
from ...errors import InputError
from ..data import Subject, read_study

FPRS = (0.01, 0.001, 0.0001)
DEFAULT_FPR = 0.001
QUANTILE_LEVELS = np.linspace(0.0, 100.0, 201)  # every half percentile
# A finer curve of threshold against healthy false-positive rate, for showing the rate of
# any threshold (e.g. under a slider): log-spaced from 50 % down to 0.001 %.
CURVE_FPRS = tuple(float(f) for f in np.logspace(np.log10(0.5), -5, 40))


def score_subjects(package: ModelPackage, subjects: list[Subject], methods=None, device: str = "cpu",
                   progress: Callable[[str], None] | None = None):
    """Yield (subject, ScoreResult) for healthy subjects, the model loaded once (all the
    model's methods by default)."""
    from ...core.device import select_device
    methods = methods or package.methods
    model = package.load_model(select_device(device))
    for i, s in enumerate(subjects):
        image = as_3d(read_image(s.image))
        mask = as_3d(read_image(s.mask, "MASK")) if s.mask else None
        t0 = time.perf_counter()
        res = score_volume(image, package, methods, mask=mask, device=device, model=model,
                           study=read_study(s, image))
        res.info["voxel_ml"] = float(np.prod(image.GetSpacing()[:3])) / 1000.0  # for the finding rule
        if progress:
            progress(f"scored {s.id} ({i + 1}/{len(subjects)}) in {time.perf_counter() - t0:.1f} s")
        yield s, res


def compute_calibration(results) -> dict[str, Any]:
    """Calibration block of model.json from scored healthy subjects (every map and slice
    score the results hold)."""
    voxels: dict[str, list] = {}
    slices: dict[str, list] = {}
    volume_scores, ids = [], []
    references: dict[str, list[float]] = {}  # scan-relative maps: each scan's own reference value
    brains: list[tuple[np.ndarray, float]] = []  # each scan's brain and voxel mL: its maps rebuilt for the finding rule
    for s, res in results:
        ids.append(s.id)
        brains.append((res.brain_mask, float(res.info.get("voxel_ml", 0.008))))
        for m, r in res.info.get("scan_relative", {}).items():
            references.setdefault(m, []).append(float(r["scan_value"]))
        for m, v in res.maps.items():
            voxels.setdefault(m, []).append(v[res.brain_mask].astype(np.float32))
        for k, v in res.slice_scores.items():
            slices.setdefault(k, []).append(v[np.isfinite(v)])
        volume_scores.append(res.volume_score)
    pixel = {}
    for m in voxels:
        v = np.concatenate(voxels[m])
        pixel[m] = {"n_subjects": len(ids), "n_voxels": int(v.size),
                    "thresholds": [{"fpr": f, "value": float(np.quantile(v, 1 - f, method="higher"))} for f in FPRS],
                    "curve": {"fpr": list(CURVE_FPRS),
                              "values": [float(x) for x in np.quantile(v, [1 - f for f in CURVE_FPRS], method="higher")]}}
    findings = finding_rules(_rebuilt(voxels, brains), pixel, DEFAULT_FPR)
    slice_block = {k: {"levels": QUANTILE_LEVELS.tolist(),
                       "values": np.percentile(np.concatenate(v), QUANTILE_LEVELS).tolist()} for k, v in slices.items()}
    return {"default_fpr": DEFAULT_FPR, "subjects": ids, "pixel": pixel, "slice": slice_block,
            "volume": {"values": sorted(float(x) for x in volume_scores)},
            **({"scan_reference": {m: sorted(v) for m, v in references.items()}} if references else {}),
            "findings": findings, "date": time.strftime("%Y-%m-%d")}


def _rebuilt(voxels: dict[str, list[np.ndarray]], brains: list[tuple[np.ndarray, float]]):
    """Per scan, (maps, brain, voxel mL) with each map rebuilt from its brain voxels (kept for
    the thresholds anyway): the whole maps are not held for every scan at once."""
    for i, (brain, voxel_ml) in enumerate(brains):
        maps = {}
        for m, per_scan in voxels.items():
            full = np.zeros(brain.shape, np.float32)
            full[brain] = per_scan[i]
            maps[m] = full
        yield maps, brain, voxel_ml


def finding_rules(scans, pixel: dict[str, Any], default_fpr: float = DEFAULT_FPR) -> dict[str, dict[str, Any]]:
    """Per pixel method, the finding rule chosen on the healthy ``scans`` (an iterable of maps,
    brain, voxel mL) at the default threshold (``default_fpr``), in anomaly levels (1.0 = the
    0.01 % threshold)."""
    from ...core.findings import choose_finding_rule, region_sizes_and_peaks
    from ...core.levels import ANOMALY_LEVEL_FPR
    bounds = {}
    for m, entry in pixel.items():
        by_fpr = {t["fpr"]: t["value"] for t in entry["thresholds"]}
        value, unit = by_fpr.get(default_fpr), by_fpr.get(ANOMALY_LEVEL_FPR)
        if value is not None and unit and unit > 0:
            bounds[m] = (value, unit)
    regions: dict[str, list] = {m: [] for m in bounds}
    for maps, brain, voxel_ml in scans:  # one scan's maps at a time
        for m, (value, unit) in bounds.items():
            if m in maps:
                regions[m].append(region_sizes_and_peaks((maps[m] > value) & brain, maps[m] / unit, voxel_ml))
    return {m: choose_finding_rule(regions[m], threshold_level=bounds[m][0] / bounds[m][1]) for m in bounds}


def calibrate_package(package: ModelPackage, subjects: list[Subject], device: str = "cpu",
                      progress: Callable[[str], None] | None = None,
                      methods: list[str] | None = None) -> ModelPackage:
    """Score healthy subjects, store the calibration in the package and re-hash it.
    ``methods``: recalibrate only these maps' thresholds, scan references and finding rules
    (the maps a change touched, e.g. made scan-relative), keeping the others' and the slice and
    volume scores' calibration (a VAE's restoration map costs minutes per scan to compute)."""
    old = package.meta.get("calibration") or {}
    if methods and not (set(package.methods) <= set(old.get("pixel", {}))
                        and list(old.get("subjects", [])) == [s.id for s in subjects]):
        methods = None  # not calibrated on these subjects for every map yet: all of them
    calib = compute_calibration(score_subjects(package, subjects, methods, device=device, progress=progress))
    if methods:
        references = {k: v for k, v in (old.get("scan_reference") or {}).items() if k not in methods}
        references.update(calib.get("scan_reference", {}))
        calib = {**old, "pixel": {**old.get("pixel", {}), **calib["pixel"]},
                 "findings": {**{k: v for k, v in (old.get("findings") or {}).items() if k not in methods},
                              **calib["findings"]},
                 "date": calib["date"], **({"scan_reference": references} if references else {})}
        if not references:
            calib.pop("scan_reference", None)
    meta = dict(package.meta)
    meta["calibration"] = calib
    update_meta(package.path, meta)
    if progress:
        rec = calib["pixel"].get("combi") or next(iter(calib["pixel"].values()))
        progress(f"calibrated on {len(subjects)} healthy subjects ({rec['n_voxels']} brain voxels)")
    return load_package(package.path)


def calibrate_findings(package: ModelPackage, subjects: list[Subject], methods: list[str] | None = None,
                       device: str = "cpu", progress: Callable[[str], None] | None = None) -> ModelPackage:
    """Add the finding rule of ``methods`` (default: the recommended one) to a calibrated
    package, chosen on healthy ``subjects`` at its calibrated default threshold; the
    thresholds themselves are left as they are (a fused model that pins this package must be
    fused again: its model.json changes)."""
    methods = methods or [package.meta.get("recommended_method") or package.default_methods()[0]]
    missing = [m for m in methods if package.default_threshold(m) is None]
    if missing:
        raise InputError(f"model {package.name} has no calibrated threshold for {', '.join(missing)}; "
                         "calibrate it first (anomaly-localizer calibrate)")
    scans = ((res.maps, res.brain_mask, float(res.info["voxel_ml"]))
             for _, res in score_subjects(package, subjects, methods, device, progress))
    pixel = {m: package.calibration.pixel[m].model_dump() for m in methods}
    rules = finding_rules(scans, pixel, package.calibration.default_fpr)
    meta = dict(package.meta)
    meta["calibration"] = {**meta["calibration"], "findings": {**meta["calibration"].get("findings", {}), **rules}}
    update_meta(package.path, meta)
    return load_package(package.path)


def flagged_fraction(results, package: ModelPackage, methods=None) -> dict[str, dict[str, float]]:
    """Share of healthy brain voxels above each calibrated threshold, per method."""
    methods = [m for m in (methods or package.methods) if m in package.calibration.pixel]
    counts = {m: np.zeros(len(FPRS)) for m in methods}
    total = 0
    for _, res in results:
        total += int(res.brain_mask.sum())
        for m in methods:
            v = res.maps[m][res.brain_mask]
            ts = [t.value for t in package.calibration.pixel[m].thresholds]
            counts[m] += [(v > t).sum() for t in ts]
    return {m: {f"{f:g}": float(c / max(total, 1)) for f, c in zip(FPRS, counts[m])} for m in methods}


def findings_per_scan(results, package: ModelPackage, methods=None) -> dict[str, dict[str, float]]:
    """Per method, at its default threshold on healthy scans: regions and findings (regions
    that pass the calibrated finding rule) per scan, the share of scans with any, and the
    largest. Without a rule every region counts as a finding."""
    from ...core.findings import is_finding, region_sizes_and_peaks
    from ...core.levels import level_scale
    methods = [m for m in (methods or package.methods) if package.default_threshold(m) is not None]
    regions: dict[str, list[list[tuple[float, float]]]] = {m: [] for m in methods}
    for _, res in results:
        for m in methods:
            value = package.default_threshold(m)[0]
            unit, _ = level_scale(package.calibration, m)
            regions[m].append(region_sizes_and_peaks((res.maps[m] > value) & res.brain_mask, res.maps[m] / unit,
                                                     float(res.info.get("voxel_ml", 0.008))))
    table = {}
    for m, scans in regions.items():
        rule = package.calibration.findings.get(m)
        rule = rule.model_dump() if rule is not None else None
        found = [[(v, p) for v, p in r if is_finding(v, p, rule)] for r in scans]
        n = max(len(scans), 1)
        table[m] = {"scans": len(scans), "rule": bool(rule),
                    "regions_per_scan": sum(map(len, scans)) / n,
                    "scans_with_region": sum(bool(r) for r in scans) / n,
                    "findings_per_scan": sum(map(len, found)) / n,
                    "scans_with_finding": sum(bool(r) for r in found) / n,
                    "largest_finding_ml": max((v for r in found for v, _ in r), default=0.0)}
    return table
