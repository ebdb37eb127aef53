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
    MAX_FINDINGS,
    apply_finding_rule,
    choose_finding_rule,
    describe_findings,
    describe_rule,
    find_findings,
    region_sizes_and_peaks,
    rule_at,
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
    assert first["peak_level"] == 3.0 and first["side"] == "left" and second["side"] == "right"
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
    assert len(found) == 1 and found[0]["side"] == "both"


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
        assert int(row["rank"]) == f["rank"] and row["side"] == f["side"]
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
    # k = floor(41 * 0.05) - 1 = 1 calibration scan above each bound: a new scan exceeds one with
    # probability 2/41, so at most about 10 % of new healthy scans show a finding
    assert sum(with_finding) <= 2 and rule["scans_with_finding"] == sum(with_finding) / 40 and rule["enough_scans"]
    assert rule["scans_with_region"] > 0.7 and rule["findings_per_scan"] < 0.2 < rule["regions_per_scan"]
    assert rule["min_volume_ml"] >= MIN_FINDING_ML and rule["min_peak_level"] >= 1.0
    assert "at least" in describe_rule(rule) and "no finding rule" in describe_rule(None)
    # too few scans for the rate: the bounds are the maxima, and the rule says so
    few = choose_finding_rule(scans[:10])
    assert not few["enough_scans"] and "too few calibration scans" in describe_rule(few)
    assert all(not any(v >= few["min_volume_ml"] or p >= few["min_peak_level"] for v, p in r) for r in scans[:10])
    # no region on any healthy scan: every region is a finding
    empty = choose_finding_rule([[] for _ in range(10)])
    assert empty["min_volume_ml"] == MIN_FINDING_ML and empty["scans_with_finding"] == 0


def test_below_the_calibrated_threshold_only_the_peak_bound_applies():
    rule = {"min_volume_ml": 2.0, "min_peak_level": 2.5, "threshold_level": 0.7, "n_subjects": 22,
            "false_finding_rate": 0.1}
    regions = [{"volume_ml": 5.0, "peak_level": 1.0}, {"volume_ml": 0.1, "peak_level": 3.0}]
    assert len(apply_finding_rule(regions, rule_at(rule, 0.7))[0]) == 2  # at its own level: volume or peak
    assert len(apply_finding_rule(regions, rule_at(rule, 1.5))[0]) == 2  # higher: regions only shrink
    low = rule_at(rule, 0.3)  # lower: regions grow and merge, the volume bound no longer holds
    kept, below = apply_finding_rule(regions, low)
    assert [r["peak_level"] for r in kept] == [3.0] and len(below) == 1 and "only the peak bound" in describe_rule(low)
    assert rule_at(None, 0.3) is None


def test_a_large_region_of_modest_peak_is_not_cut_before_the_rule_sees_it():
    # 150 tiny regions whose peaks (4.0-4.4) outrank the large one but stay under the peak bound:
    # cut to the 100 highest peaks first, as before, the large region would have been lost
    small = [{"volume_ml": 0.1, "peak_level": 4.4 - i * 0.002} for i in range(150)]
    large = {"volume_ml": 30.0, "peak_level": 1.0}
    kept, below = apply_finding_rule(small + [large], {"min_volume_ml": 2.0, "min_peak_level": 4.5})
    assert [r["volume_ml"] for r in kept] == [30.0] and len(below) == 150
    many = [{"volume_ml": 3.0, "peak_level": 5.0 - i * 0.001} for i in range(150)]
    assert len(apply_finding_rule(many, {"min_volume_ml": 2.0, "min_peak_level": 4.5})[0]) == MAX_FINDINGS


def test_lesions_covered_counts_what_regions_and_findings_touch():
    from anomaly_localizer.core.findings import lesions_covered
    truth = np.zeros((20, 20, 20), bool)
    truth[2:5, 2:5, 2:5] = True      # lesion 1: a large faint region touches it
    truth[12:14, 12:14, 12:14] = True  # lesion 2: a small faint region touches it
    truth[16:18, 2:4, 2:4] = True    # lesion 3: nothing touches it
    seg = np.zeros_like(truth)
    seg[1:6, 1:6, 1:6] = True
    seg[13, 13, 13] = True
    levels = np.where(seg, 1.5, 0.0)
    rule = {"min_volume_ml": 0.05, "min_peak_level": 3.0}
    assert lesions_covered(seg, levels, truth, voxel_ml=0.001, rule=rule, min_ml=0.0) == (3, 2, 1)
    assert lesions_covered(seg, levels, truth, voxel_ml=0.001, rule=None, min_ml=0.0) == (3, 2, 2)
    assert lesions_covered(np.zeros_like(seg), levels, truth, 0.001, rule) == (3, 0, 0)
