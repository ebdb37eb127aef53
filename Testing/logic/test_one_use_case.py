"""One scoring use case (issue 39): the Slicer logic's run in this process and its child run
(the engine's ``score`` command) go through the same engine function, so they give equal
summaries: the same model, threshold, findings, notes and records of the inputs."""

import math

import numpy as np
import SimpleITK as sitk

from logic_helpers import engine
from AnomalyLocalizerLib.logic import AnomalyLocalizerLogic

UNTIMED = {"timings_s"}  # how long each step took differs from run to run


def _equal(a, b, path="summary"):
    """Assert two summaries equal: numbers to float32 precision (the child's maps went through
    a float32 file), everything else exactly."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert set(a) - UNTIMED == set(b) - UNTIMED, f"{path}: keys {sorted(set(a) ^ set(b))} differ"
        for k in set(a) - UNTIMED:
            _equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{path}: {len(a)} != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _scan_and_mask(slicerApp, tmp_path):
    img = engine.image_from(engine.phantom_array(lesion=True), spacing=(4.0, 4.0, 4.0), origin=(-20.0, 31.0, -7.5))
    sitk.WriteImage(img, str(tmp_path / "scan.nrrd"))
    brain = (sitk.GetArrayFromImage(img) != 0).astype(np.uint8)
    mask = sitk.GetImageFromArray(brain)
    mask.CopyInformation(img)
    sitk.WriteImage(mask, str(tmp_path / "brain.nrrd"))
    return slicerApp.loadVolume(tmp_path / "scan.nrrd", "scan"), \
        slicerApp.loadVolume(tmp_path / "brain.nrrd", "brain", labelmap=True)


def test_an_in_process_and_a_child_run_give_equal_summaries(slicerApp, tmp_path):
    model = engine.make_tiny_package(tmp_path / "models" / "tiny", calibration=engine.TINY_CALIBRATION)
    scan, brain = _scan_and_mask(slicerApp, tmp_path)
    here = AnomalyLocalizerLogic(slicerApp.app)
    inProcess = here.run(scan, model=str(model.path), mask=brain, contrasts=["t1"])
    child = AnomalyLocalizerLogic(slicerApp.app)
    fromChild = child.finishRun(child.startRun(scan, model=str(model.path), mask=brain, contrasts=["t1"]))
    summary = inProcess.summary
    # the whole record, not a reduced one: what the run segmented at, found and read
    for key in ("threshold", "anomaly_levels", "findings", "findings_rule", "segmented_voxels", "inputs",
                "volume_score", "engine_version"):
        assert key in summary, key
    assert summary["input"] == "scan" and summary["mask"] == "brain"
    _equal(summary, fromChild.summary)
    assert here.threshold == child.threshold  # the slider starts where the engine segmented


def test_an_uncalibrated_map_starts_at_the_same_level_in_and_out_of_process(slicerApp, tmp_path):
    model = engine.make_tiny_package(tmp_path / "models" / "raw")  # no calibration
    scan, _ = _scan_and_mask(slicerApp, tmp_path)
    here = AnomalyLocalizerLogic(slicerApp.app)
    inProcess = here.run(scan, model=str(model.path), methods=["rec"])
    child = AnomalyLocalizerLogic(slicerApp.app)
    fromChild = child.finishRun(child.startRun(scan, model=str(model.path), methods=["rec"]))
    from anomaly_localizer.core.levels import UNCALIBRATED_LEVEL
    assert inProcess.summary["threshold"]["level"] == fromChild.summary["threshold"]["level"] == UNCALIBRATED_LEVEL
    assert here.threshold == child.threshold == UNCALIBRATED_LEVEL
