"""Findings: each connected region of the segmentation, ranked by peak level, with where it is
(RAS and LPS millimetres, axial slices, side), in summary.json and findings.csv."""

import csv
import json

import numpy as np
import SimpleITK as sitk
from phantoms import image_from, lesion_mask, make_tiny_package, phantom_array

from anomaly_localizer.cli import main
from anomaly_localizer.core.findings import MIN_FINDING_ML, describe_findings, find_findings

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
