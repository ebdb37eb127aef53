"""A run belongs to the scene it started in: closing the scene (Slicer's "Close scene" clears
it, and node IDs start again) cancels a running child run and forgets the last result; the
opacity slider touches only views that show this module's heatmap."""

import pytest
import SimpleITK as sitk

from logic_helpers import engine
from AnomalyLocalizerLib.logic import AnomalyLocalizerLogic

from anomaly_localizer.errors import AnomalyLocalizerError


@pytest.fixture()
def model(tmp_path):
    return engine.make_tiny_package(tmp_path / "models" / "tiny")


def _load(slicerApp, tmp_path, name="scan"):
    path = tmp_path / f"{name}.nrrd"
    if not path.exists():
        sitk.WriteImage(engine.image_from(engine.phantom_array(lesion=True), spacing=(4.0, 4.0, 4.0)), str(path))
    return slicerApp.loadVolume(path, name)


def test_closing_the_scene_forgets_the_result_and_the_slider_stays_safe(slicerApp, tmp_path, model):
    scan = _load(slicerApp, tmp_path)
    logic = AnomalyLocalizerLogic(slicerApp.app)
    logic.run(scan, model=str(model.path), methods=["rec"])
    assert logic.setThreshold(0.5) > 0
    slicerApp.scene.Clear(0)
    assert logic.result is None and logic.inputVolume() is None
    again = _load(slicerApp, tmp_path, "other")
    assert logic.setThreshold(0.5) == 0  # no AttributeError, nothing segmented on the new volume
    assert logic.outputNode(again, "labelmap") is None


def test_closing_the_scene_cancels_a_running_child_run(slicerApp, tmp_path, model):
    scan = _load(slicerApp, tmp_path)
    logic = AnomalyLocalizerLogic(slicerApp.app)
    run = logic.startRun(scan, model=str(model.path), methods=["rec"])
    assert logic.activeRun is run
    slicerApp.scene.Clear(0)
    assert logic.activeRun is None and run.poll() == "cancelled"
    assert run.wait(60) == "cancelled" and run.process.poll() is not None
    with pytest.raises(AnomalyLocalizerError, match="cancelled"):
        logic.finishRun(run)


def test_a_run_never_lands_on_another_volume_that_took_its_node_id(slicerApp, tmp_path, model):
    scan = _load(slicerApp, tmp_path)
    scanID = scan.GetID()
    logic = AnomalyLocalizerLogic(slicerApp.app)
    run = logic.startRun(scan, model=str(model.path), methods=["rec"])
    slicerApp.scene.RemoveObserver(logic._closeObserver)  # as if the close went unnoticed
    slicerApp.scene.Clear(0)
    other = _load(slicerApp, tmp_path, "other")
    assert other.GetID() == scanID  # the scene clear starts node IDs again
    before = slicerApp.nodeCount()
    with pytest.raises(AnomalyLocalizerError, match="removed from the scene"):
        logic.finishRun(run)
    assert slicerApp.nodeCount() == before and logic.result is None
    assert not run.work_dir.exists()


def test_opacity_changes_only_views_that_show_the_heatmap(slicerApp, tmp_path, model):
    red, yellow = slicerApp.addSliceView("Red"), slicerApp.addSliceView("Yellow", "Sagittal")
    scan = _load(slicerApp, tmp_path)
    logic = AnomalyLocalizerLogic(slicerApp.app)
    for sliceLogic in (red, yellow):
        sliceLogic.GetSliceCompositeNode().SetForegroundOpacity(0.25)
    logic.setOpacity(0.9)  # no result yet: nothing to change
    assert red.GetSliceCompositeNode().GetForegroundOpacity() == pytest.approx(0.25)
    logic.run(scan, model=str(model.path), methods=["rec"])
    yellow.GetSliceCompositeNode().SetForegroundVolumeID(None)  # the user showed something else there
    yellow.GetSliceCompositeNode().SetForegroundOpacity(0.25)
    logic.setOpacity(0.4)
    assert red.GetSliceCompositeNode().GetForegroundOpacity() == pytest.approx(0.4)
    assert yellow.GetSliceCompositeNode().GetForegroundOpacity() == pytest.approx(0.25)


def test_cleanup_stops_observing_the_scene_and_the_run(slicerApp, tmp_path, model):
    scan = _load(slicerApp, tmp_path)
    logic = AnomalyLocalizerLogic(slicerApp.app)
    run = logic.startRun(scan, model=str(model.path), methods=["rec"])
    logic.cleanup()
    assert run.wait(60) == "cancelled" and logic.activeRun is None
    logic.run(scan, model=str(model.path), methods=["rec"])
    slicerApp.scene.Clear(0)
    assert logic.result is not None  # no longer observing: the module is gone


def test_the_threshold_slider_reaches_the_maps_highest_level(slicerApp, tmp_path, model):
    from AnomalyLocalizerLib.threshold import SLIDER_MIN_LEVEL
    scan = _load(slicerApp, tmp_path)
    logic = AnomalyLocalizerLogic(slicerApp.app)
    assert logic.thresholdRange() == (SLIDER_MIN_LEVEL, 2.0)  # no result: the default range
    result = logic.run(scan, model=str(model.path), methods=["rec"])
    low, high = logic.thresholdRange()
    top = float(result.maps["rec"][result.brainMask].max()) / result.levelScale["rec"]
    assert low == SLIDER_MIN_LEVEL and high >= min(top, 100.0) and high >= 2.0
    assert logic.setThreshold(high) == 0 or top > 100.0  # the slider's end singles out every voxel
    assert logic.setThreshold(low) > 0


def test_a_logic_dropped_without_cleanup_stops_observing_its_scene(slicerApp):
    import gc
    logic = AnomalyLocalizerLogic(slicerApp.app)
    logic.itself = logic  # a reference cycle: only the garbage collector frees it
    tag = logic._closeObserver
    assert slicerApp.scene.GetCommand(tag) is not None
    del logic
    gc.collect()
    assert slicerApp.scene.GetCommand(tag) is None  # the scene's own close or end calls nothing of it
