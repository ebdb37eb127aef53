"""Findings in the scene: the engine's list for the current threshold, a markup point at each
peak (updated with the threshold), and slice views centred on a finding."""

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

from logic_helpers import engine
from AnomalyLocalizerLib.logic import AnomalyLocalizerLogic


@pytest.fixture()
def model(tmp_path):
    calibration = {"default_fpr": 0.001, "pixel": {"rec": {"n_subjects": 3, "thresholds": [
        {"fpr": 0.01, "value": 0.01}, {"fpr": 0.001, "value": 0.02}, {"fpr": 0.0001, "value": 0.05}]}}}
    return engine.make_tiny_package(tmp_path / "models" / "tiny", calibration=calibration)


@pytest.mark.parametrize("direction", [None, engine.rotation(0.3, 0.1, -0.2)])
def test_findings_follow_the_threshold_with_peaks_where_the_input_has_them(slicerApp, tmp_path, model, direction):
    red = slicerApp.addSliceView("Red")
    path = tmp_path / "scan.nrrd"
    sitk.WriteImage(engine.image_from(engine.phantom_array(lesion=True), direction=direction), str(path))
    scan = slicerApp.loadVolume(path, "scan")
    logic = AnomalyLocalizerLogic(slicerApp.app)
    result = logic.run(scan, model=str(model.path), methods=["rec"])
    logic.setThreshold(0.3)
    found = logic.findings()
    assert found and [f["rank"] for f in found] == list(range(1, len(found) + 1))
    m = vtk.vtkMatrix4x4()
    scan.GetIJKToRASMatrix(m)
    levels = result.maps["rec"] / result.levelScale["rec"]
    for f in found:
        i, j, k = f["peak_index_ijk"]
        np.testing.assert_allclose(m.MultiplyPoint([i, j, k, 1.0])[:3], f["peak_ras"], atol=0.01)
        assert logic._mask[k, j, i] and levels[k, j, i] == pytest.approx(f["peak_level"])
    markups = logic.outputNode(scan, "findings")
    assert markups.GetNumberOfControlPoints() == len(found)
    assert markups.GetNthControlPointLabel(0).startswith("#1 ")
    display = markups.GetDisplayNode()  # a hollow ring of a few mm: it points at a small finding, never hides it
    assert display.GetGlyphTypeAsString() == "Circle2D" and not display.GetUseGlyphScale()
    assert display.GetGlyphSize() <= 5.0
    ras = logic.centreOnFinding(found[0])
    sliceToRAS = red.GetSliceNode().GetSliceToRAS()
    np.testing.assert_allclose([sliceToRAS.GetElement(r, 3) for r in range(3)], ras, atol=0.01)
    logic.setThreshold(1e6)
    assert logic.findings() == [] and markups.GetNumberOfControlPoints() == 0


@pytest.mark.parametrize("orientation,expected", [
    ("Axial", {"left": "R", "right": "L", "top": "A", "bottom": "P"}),
    ("Coronal", {"left": "R", "right": "L", "top": "S", "bottom": "I"}),
    ("Sagittal", {"left": "A", "right": "P", "top": "S", "bottom": "I"})])  # Slicer: the face to the left
def test_slice_views_say_the_patient_direction_at_each_screen_edge(slicerApp, orientation, expected):
    from AnomalyLocalizerLib.geometry import screenEdgeLetters
    sliceNode = slicerApp.addSliceView(f"View{orientation}", orientation).GetSliceNode()
    assert screenEdgeLetters(sliceNode) == expected
    sliceNode.SetOrientation("Axial")  # the letters follow the view, not its name
    assert screenEdgeLetters(sliceNode)["top"] == "A"
