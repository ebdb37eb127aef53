"""Findings: each connected region of the segmentation, ranked by peak level, with where it is
(RAS and LPS millimetres, axial slices, side), in summary.json and findings.csv."""

import csv
import json

import numpy as np
import SimpleITK as sitk
from phantoms import image_from, lesion_mask, make_tiny_package, phantom_array

from anomaly_localizer.cli import main
from anomaly_localizer.core.findings import (
    MIN_FINDING_ML,
    apply_finding_rule,
    choose_finding_rule,
    describe_findings,
    describe_rule,
    find_findings,
    region_sizes_and_peaks,
)

SPACING, ORIGIN = (2.0, 2.0, 2.0), (-40.0, -50.0, -30.0)  # LPS; identity direction: i runs to the patient's left


def _geometry(shape):
    brain = np.zeros(shape, bool)
    brain[2:-2, 2:-2, 2:-2] = True
    return brain


def test_regions_ranked_by_peak_with_their_place_size_and_side():
    shape = (20, 30, 40)  # k (foot to head), j (anterior to posterior), i (right to left)
    brain = _geometry(shape)
    levels = np.zeros(shape, np.float32)
    seg = np.zeros(shape, np.uint8)
    seg[5:8, 10:14, 30:34] = 1          # on the patient's left (large i), peak 3.0
    levels[5:8, 10:14, 30:34] = 1.5
    levels[6, 12, 31] = 3.0
    seg[12:15, 20:23, 4:8] = 1          # on the right, peak 2.0
    levels[12:15, 20:23, 4:8] = 2.0
    seg[1, 1, 1] = 1                    # one voxel: below the smallest volume kept
    seg[9, 9, 9] = seg[10, 10, 10] = 1  # two voxels touching at a corner: one region (26-connected), still tiny
    found = find_findings(seg, levels, brain, ORIGIN, SPACING, (1, 0, 0, 0, 1, 0, 0, 0, 1), axial_axis=2)
    assert [f["rank"] for f in found] == [1, 2]
    first, second = found
    assert first["peak_level"] == 3.0 and first["hemisphere"] == "left" and second["hemisphere"] == "right"
    assert first["voxels"] == 3 * 4 * 4 and first["volume_ml"] == round(48 * 8 / 1000, 4)
    lps = [ORIGIN[0] + 31 * 2, ORIGIN[1] + 12 * 2, ORIGIN[2] + 6 * 2]
    assert first["peak_lps"] == lps and first["peak_ras"] == [-lps[0], -lps[1], lps[2]]
    assert first["peak_index_ijk"] == [31, 12, 6] and first["axial_slices"] == [5, 7]
    assert second["centroid_lps"] == [ORIGIN[0] + 5.5 * 2, ORIGIN[1] + 21 * 2, ORIGIN[2] + 13 * 2]
    assert 2 * 2 * 2 / 1000 < MIN_FINDING_ML  # why the tiny ones were dropped
    assert "left" in describe_findings(found) and describe_findings([]) == "no finding at this threshold"


def test_a_region_across_the_midline_is_on_both_sides():
    shape = (10, 10, 40)
    seg = np.zeros(shape, np.uint8)
    seg[4:7, 4:7, 14:26] = 1
    found = find_findings(seg, seg.astype(np.float32), np.ones(shape, bool), ORIGIN, SPACING,
                          (1, 0, 0, 0, 1, 0, 0, 0, 1), axial_axis=2)
    assert len(found) == 1 and found[0]["hemisphere"] == "both"


def test_a_seeded_lesion_is_the_top_finding_and_a_clean_map_has_none():
    brain = phantom_array() > 0
    lesion = lesion_mask() & brain
    rng = np.random.default_rng(0)
    levels = np.where(brain, rng.uniform(0, 0.5, brain.shape), 0).astype(np.float32)
    levels[lesion] += 3.0
    image = image_from(phantom_array(lesion=True))
    found = find_findings((levels > 1.0).astype(np.uint8), levels, brain, image.GetOrigin(), image.GetSpacing(),
                          image.GetDirection(), axial_axis=2)
    assert len(found) == 1 and found[0]["voxels"] == int(lesion.sum())
    assert find_findings(np.zeros(brain.shape, np.uint8), levels, brain, image.GetOrigin(), image.GetSpacing(),
                         image.GetDirection(), axial_axis=2) == []


def test_score_writes_findings_that_match_its_segmentation(tmp_path):
    calibration = {"default_fpr": 0.001, "pixel": {"rec": {"n_subjects": 3, "thresholds": [
        {"fpr": 0.01, "value": 0.01}, {"fpr": 0.001, "value": 0.02}, {"fpr": 0.0001, "value": 0.05}]}}}
    pkg = make_tiny_package(tmp_path / "models" / "tiny", calibration=calibration)
    sitk.WriteImage(image_from(phantom_array(lesion=True)), str(tmp_path / "scan.nii.gz"))
    assert main(["score", str(tmp_path / "scan.nii.gz"), "--out", str(tmp_path / "out"), "--model", str(pkg.path),
                 "--method", "rec", "--threshold-level", "0.3"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    rows = list(csv.DictReader(open(tmp_path / "out" / "findings.csv")))
    assert len(rows) == len(summary["findings"]) and summary["findings_rule"]["min_volume_ml"] == MIN_FINDING_ML
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "segmentation.nii.gz")))
    assert sum(f["voxels"] for f in summary["findings"]) <= int(seg.sum())
    peaks = [f["peak_level"] for f in summary["findings"]]
    assert peaks and peaks == sorted(peaks, reverse=True) and all(p > 0.3 for p in peaks)
    for f, row in zip(summary["findings"], rows):
        assert int(row["rank"]) == f["rank"] and row["hemisphere"] == f["hemisphere"]
        i, j, k = f["peak_index_ijk"]
        assert seg[k, j, i] == 1
    assert main(["score", str(tmp_path / "scan.nii.gz"), "--out", str(tmp_path / "none"), "--model", str(pkg.path),
                 "--method", "rec", "--threshold-level", "1e9"]) == 0
    assert json.loads((tmp_path / "none" / "summary.json").read_text())["findings"] == []
    assert open(tmp_path / "none" / "findings.csv").read().count("\n") == 1  # the header only


def test_the_finding_rule_lets_about_one_healthy_scan_in_ten_show_a_finding():
    rng = np.random.default_rng(0)
    # 40 healthy scans, each with a few small regions of the default threshold's level and up
    scans = [[(float(rng.gamma(1.5, 0.3)), float(1.0 + rng.gamma(1.0, 0.4))) for _ in range(rng.integers(0, 5))]
             for _ in range(40)]
    rule = choose_finding_rule(scans, rate=0.1, threshold_level=1.0)
    with_finding = [any(v >= rule["min_volume_ml"] or p >= rule["min_peak_level"] for v, p in r) for r in scans]
    assert sum(with_finding) <= 4 and rule["scans_with_finding"] == sum(with_finding) / 40
    assert rule["scans_with_region"] > 0.7 and rule["findings_per_scan"] < 0.2 < rule["regions_per_scan"]
    assert rule["min_volume_ml"] >= MIN_FINDING_ML and rule["min_peak_level"] >= 1.0
    assert "at least" in describe_rule(rule) and "no finding rule" in describe_rule(None)
    # no region on any healthy scan: every region is a finding
    empty = choose_finding_rule([[] for _ in range(10)])
    assert empty["min_volume_ml"] == MIN_FINDING_ML and empty["scans_with_finding"] == 0


def test_regions_below_the_rule_are_kept_apart_and_both_lists_ranked():
    regions = [{"rank": 1, "volume_ml": 0.2, "peak_level": 3.0}, {"rank": 2, "volume_ml": 5.0, "peak_level": 1.5},
               {"rank": 3, "volume_ml": 0.3, "peak_level": 1.2}]
    kept, below = apply_finding_rule(regions, {"min_volume_ml": 2.0, "min_peak_level": 2.5})
    assert [r["volume_ml"] for r in kept] == [0.2, 5.0] and [r["rank"] for r in kept] == [1, 2]
    assert [r["volume_ml"] for r in below] == [0.3] and below[0]["rank"] == 1
    assert apply_finding_rule(regions, None) == (regions, [])
    brain = phantom_array() > 0
    levels = np.where(lesion_mask() & brain, 2.0, 0.0)
    sizes = region_sizes_and_peaks(levels > 1.0, levels, 0.064)
    assert len(sizes) == 1 and sizes[0][1] == 2.0 and abs(sizes[0][0] - (levels > 1).sum() * 0.064) < 1e-9


def test_calibration_chooses_the_rule_and_score_lists_only_findings(tmp_path):
    from phantoms import healthy_folder, make_tiny_dae_package

    from anomaly_localizer.core.package import load_package
    from anomaly_localizer.tooling.data import find_subjects
    from anomaly_localizer.tooling.release.calibrate import calibrate_package
    data = healthy_folder(tmp_path / "healthy", n=6)
    subjects = find_subjects(data)
    pkg = calibrate_package(make_tiny_dae_package(tmp_path / "models" / "tiny"), subjects)
    rule = pkg.calibration.findings["dae"]
    assert rule.n_subjects == 6 and rule.false_finding_rate == 0.1 and rule.scans_with_finding <= 0.1
    sitk.WriteImage(image_from(phantom_array(lesion=True)), str(tmp_path / "scan.nii.gz"))
    assert main(["score", str(tmp_path / "scan.nii.gz"), "--out", str(tmp_path / "out"), "--model", str(pkg.path),
                 "-q"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["findings_rule"]["calibrated"]["min_volume_ml"] == rule.min_volume_ml
    assert "healthy calibration scans" in summary["findings_rule"]["finding"]
    below = summary["below_finding_rule"]
    assert all(f["volume_ml"] >= rule.min_volume_ml or f["peak_level"] >= rule.min_peak_level
               for f in summary["findings"])
    assert below["count"] == 0 or all(r["volume_ml"] < rule.min_volume_ml for r in below["largest"])
    # fpr reports findings per healthy scan beside the voxel rates
    assert main(["fpr", str(pkg.path), str(data), "--subjects", "all", "--json", str(tmp_path / "fpr.json"),
                 "-q"]) == 0
    row = json.loads((tmp_path / "fpr.json").read_text())["findings"]["dae"]
    assert row["rule"] and row["scans"] == 6 and row["findings_per_scan"] <= row["regions_per_scan"]
    assert row["scans_with_finding"] <= 0.1 + 1e-9  # the calibration scans themselves


def test_findings_only_calibration_keeps_the_thresholds(tmp_path):
    from phantoms import TINY_CALIBRATION, healthy_folder, make_tiny_dae_package

    from anomaly_localizer.core.package import load_package
    calibration = {"default_fpr": 0.001, "pixel": {"dae": TINY_CALIBRATION["pixel"]["rec"]}}
    pkg = make_tiny_dae_package(tmp_path / "tiny", calibration=calibration)
    data = healthy_folder(tmp_path / "healthy", n=4)
    assert main(["calibrate", str(pkg.path), str(data), "--out", str(tmp_path / "copy"), "--findings-only",
                 "-q"]) == 0
    copy = load_package(tmp_path / "copy")
    assert copy.calibration.pixel == pkg.calibration.pixel and copy.calibration.findings["dae"].n_subjects == 4
    assert load_package(pkg.path).calibration.findings == {}  # the original is untouched
