"""Stepping through a screening worklist in a real MRML scene (slicer-core): each scan in
rank order, loaded with its results on its exact grid; only the current one kept."""

import numpy as np
import pytest
import SimpleITK as sitk

from logic_helpers import engine
from AnomalyLocalizerLib.logic import AnomalyLocalizerLogic, volumeNodeToImage

from anomaly_localizer.core.results import read_results
from anomaly_localizer.tooling.release.calibrate import calibrate_package
from anomaly_localizer.tooling.data import find_subjects
from anomaly_localizer.tooling.screening.screen import ScreenOptions, run_screening

SHAPE = (24, 40, 34)


@pytest.fixture(scope="module")
def worklist(tmp_path_factory):
    root = tmp_path_factory.mktemp("worklist")
    model = calibrate_package(engine.make_tiny_dae_package(root / "tiny-dae"),
                              find_subjects(engine.healthy_folder(root / "healthy", n=2, shape=SHAPE)))
    scans = root / "scans"
    scans.mkdir()
    for i, lesion in enumerate((False, True, False)):
        img = engine.image_from(engine.phantom_array(SHAPE, lesion=lesion, seed=30 + i),
                                direction=engine.rotation(0.1 * i, 0.0, -0.1))
        sitk.WriteImage(img, str(scans / f"s{i}.nrrd"))
    engine.write_dicom_series(engine.phantom_array(SHAPE, seed=40), scans / "dicom")
    (scans / "broken.nii.gz").write_bytes(b"not an image")
    out = root / "out"
    run_screening([str(scans)], out, ScreenOptions(str(model.path), model.name, model.manifest_sha256, ("dae",)),
                  workers=1)
    return out


def test_a_worklist_is_stepped_through_in_rank_order_with_results_loaded(slicerApp, worklist):
    slicerApp.addSliceView("Red")
    logic = AnomalyLocalizerLogic(slicerApp.app)
    assert logic.openWorklist(worklist / "worklist.csv") == 4  # the broken file is not a screened scan
    rows = logic.worklistRows()
    assert [r.rank for r in rows] == [1, 2, 3, 4]
    seen = []
    node = logic.nextScan()
    while node is not None:
        row = logic.currentWorklistRow()
        seen.append(row.id)
        assert node.GetName() == row.id and logic.inputVolume() is node
        saved = read_results(worklist / row.id)
        heat = logic.outputNode(node, f"heatmap.{logic.method}")
        # The heatmap is the saved map in anomaly levels, on the scan's own grid.
        np.testing.assert_allclose(slicer_array(heat) * logic.result.levelScale["dae"], saved.maps["dae"], rtol=1e-5,
                                   atol=1e-7)
        if not row.series:
            image, original = volumeNodeToImage(node), sitk.ReadImage(row.input)
            np.testing.assert_allclose(image.GetDirection(), original.GetDirection(), atol=1e-6)
            np.testing.assert_allclose(image.GetOrigin(), original.GetOrigin(), atol=1e-4)
            np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(original))
        assert logic.outputNode(node, "segmentation") is not None
        # Only the current scan is in the scene.
        volumes = slicerApp.scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
        names = {volumes.GetItemAsObject(i).GetName() for i in range(volumes.GetNumberOfItems())}
        assert row.id in names and all(n.startswith(row.id + " ") or n == row.id for n in names)
        node = logic.nextScan()
    assert seen == [r.id for r in rows]
    back = logic.previousScan()
    assert back.GetName() == rows[-2].id


def test_the_threshold_moves_live_on_a_loaded_worklist_scan(slicerApp, worklist):
    logic = AnomalyLocalizerLogic(slicerApp.app)
    logic.openWorklist(worklist)
    logic.loadWorklistScan(0)
    saved = read_results(worklist / logic.currentWorklistRow().id)
    scale = logic.result.levelScale["dae"]
    for level in (0.01, 0.5, 1e6):
        # The segment follows the threshold: the saved map above it, inside the brain.
        expected = int(((saved.maps["dae"] > level * scale) & saved.brain_mask).sum())
        assert logic.setThreshold(level) == expected
    assert logic.setThreshold(0.01) > 0 == logic.setThreshold(1e6)


def test_a_scan_whose_results_are_gone_leaves_the_scene_as_it_was(slicerApp, worklist, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(worklist, copy)
    logic = AnomalyLocalizerLogic(slicerApp.app)
    logic.openWorklist(copy)
    first = logic.worklistRows()[0].id
    (copy / first / "brainmask.nii.gz").unlink()
    before = slicerApp.nodeCount()
    with pytest.raises(ValueError, match=f"cannot load {first}"):
        logic.loadWorklistScan(0)
    assert slicerApp.nodeCount() == before
    with pytest.raises(ValueError, match="not a screening worklist"):
        logic.openWorklist(tmp_path)


def slicer_array(node):
    from slicer import util
    return np.array(util.arrayFromVolume(node))
