"""The overview picture: per scan, the slices through its findings (a known lesion's centre
first), plain beside overlaid, and the findings as text."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from phantoms import image_from, lesion_mask, make_tiny_package, phantom_array

from anomaly_localizer.cli import main
from anomaly_localizer.core.volume import axial_layout
from anomaly_localizer.tooling.evaluation.overview import _slices_to_show, write_overview

pytest.importorskip("matplotlib")


def test_the_picture_shows_the_lesion_centre_first_then_the_largest_findings(tmp_path):
    calibration = {"default_fpr": 0.001, "pixel": {"rec": {"n_subjects": 3, "thresholds": [
        {"fpr": 0.01, "value": 0.01}, {"fpr": 0.001, "value": 0.02}, {"fpr": 0.0001, "value": 0.05}]}}}
    pkg = make_tiny_package(tmp_path / "models" / "tiny", calibration=calibration)
    image = image_from(phantom_array(lesion=True))
    sitk.WriteImage(image, str(tmp_path / "scan.nii.gz"))
    truth = sitk.GetImageFromArray(lesion_mask().astype(np.uint8))
    truth.CopyInformation(image)
    sitk.WriteImage(truth, str(tmp_path / "truth.nii.gz"))
    assert main(["score", str(tmp_path / "scan.nii.gz"), "--out", str(tmp_path / "out"), "--model", str(pkg.path),
                 "--method", "rec", "--threshold-level", "0.3", "-q"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    layout = axial_layout(image)
    lab = layout.to_canonical(lesion_mask())
    shown = _slices_to_show(summary, layout, lab, 3, 0)
    centre = int(np.round(np.mean(np.nonzero(lab.any(axis=(1, 2)))[0])))
    assert shown[0] == centre and len(set(shown)) == len(shown)
    assert all(abs(a - b) * layout.spacing[0] >= 6.0 for i, a in enumerate(shown) for b in shown[:i])
    assert _slices_to_show({"axial_axis": 2, "findings": []}, layout, None, 2, 7) == [7]
    png = write_overview([("scan", tmp_path / "scan.nii.gz", tmp_path / "out")], tmp_path / "o.png",
                         truth={"scan": tmp_path / "truth.nii.gz"}, scan_note="a phantom")
    assert png.stat().st_size > 10_000
