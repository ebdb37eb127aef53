"""Issue 37, the Slicer logic: what the command line refuses, the in-process run refuses too,
and an export never overwrites a record without being allowed to."""

import numpy as np
import pytest
import SimpleITK as sitk

from logic_helpers import engine
from AnomalyLocalizerLib.logic import AnomalyLocalizerLogic

from anomaly_localizer.errors import InputError


@pytest.fixture()
def model(tmp_path):
    return engine.make_tiny_package(tmp_path / "models" / "tiny", calibration=engine.TINY_CALIBRATION)


def _load(slicerApp, tmp_path, arr, name="scan"):
    path = tmp_path / f"{name}.nrrd"
    sitk.WriteImage(engine.image_from(arr), str(path))
    return slicerApp.loadVolume(path, name)


def test_run_refuses_a_single_slice_as_the_command_line_does(slicerApp, tmp_path, model):
    arr = engine.phantom_array((30, 48, 40))[14:15]  # one axial slice
    scan = _load(slicerApp, tmp_path, arr)
    before = slicerApp.scene.GetNumberOfNodes()
    logic = AnomalyLocalizerLogic(slicerApp.app)
    with pytest.raises(InputError, match="single slice"):
        logic.run(scan, model=str(model.path), methods=["rec"], contrasts=["t1"])
    assert slicerApp.scene.GetNumberOfNodes() == before and logic.result is None


def test_export_never_overwrites_an_existing_record(slicerApp, tmp_path, model):
    scan = _load(slicerApp, tmp_path, engine.phantom_array(lesion=True))
    logic = AnomalyLocalizerLogic(slicerApp.app)
    logic.run(scan, model=str(model.path), methods=["rec"])
    record = tmp_path / "anomaly.seg.nrrd.json"
    record.write_text("the reader's own notes\n")
    with pytest.raises(FileExistsError, match="anomaly.seg.nrrd.json exists"):
        logic.exportSegmentation(tmp_path / "anomaly.seg.nrrd")
    assert record.read_text() == "the reader's own notes\n" and not (tmp_path / "anomaly.seg.nrrd").exists()
    logic.exportSegmentation(tmp_path / "anomaly.seg.nrrd", overwrite=True)
    assert record.read_text() != "the reader's own notes\n"
