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


def test_below_the_threshold_the_map_is_not_drawn_as_a_flag():
    from anomaly_localizer.tooling.evaluation.overview import BELOW_COLOUR, level_colours
    from matplotlib import colors
    cmap, norm = level_colours(0.6, 1.0, 3.0)
    pale = colors.to_rgba(BELOW_COLOUR)
    assert np.allclose(cmap(norm(0.7)), pale) and np.allclose(cmap(norm(0.99)), pale)
    assert not np.allclose(cmap(norm(1.05)), pale) and cmap(norm(1.05))[0] > 0.9  # red above the threshold


def test_the_demo_lesion_is_darker_than_white_matter_irregular_and_soft_edged():
    from anomaly_localizer.tooling.evaluation.demo_lesion import insert_t1_lesion
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in (60, 72, 64)], indexing="ij")
    brain = (z / 0.9) ** 2 + (y / 0.95) ** 2 + (x / 0.9) ** 2 < 1
    rng = np.random.default_rng(0)
    t1 = np.where(brain, 1000 + rng.normal(0, 20, brain.shape), 0).astype(np.float32)  # white matter
    t1[brain & (np.sqrt(z ** 2 + y ** 2 + x ** 2) > 0.8)] = 600  # a rim of grey matter
    out, label = insert_t1_lesion(t1, brain, (1.5, 1.5, 1.5), np.random.default_rng(3))
    lesion = label > 0
    assert 500 < lesion.sum() and not (lesion & ~brain).any()
    assert np.median(out[lesion]) < 0.8 * np.median(t1[lesion])  # darker than the white matter it replaced
    changed = np.abs(out - t1) > 1.0
    assert (changed & ~lesion).sum() > 0.1 * lesion.sum()  # a soft edge fades out beyond the label
    box = np.argwhere(lesion)
    extent = box.max(0) - box.min(0) + 1
    assert lesion.sum() < 0.4 * np.prod(extent)  # irregular: fills well under its bounding box (a ball fills 52 %)
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(sitk.GetImageFromArray(lesion.astype(np.uint8)))
    assert shape.GetRoundness(1) < 0.85  # a ball's roundness is 1
