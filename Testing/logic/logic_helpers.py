"""A real Slicer application logic and scene (slicer-core), set up as Slicer does, and the
engine tests' helpers (tiny model, phantoms)."""

from __future__ import annotations

import sys
from pathlib import Path

import slicer
import vtk

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "AnomalyLocalizer"))

from AnomalyLocalizerLib.headless import SlicerApp  # noqa: E402,F401


sys.path.insert(0, str(ROOT / "Testing" / "engine"))
import phantoms as engine  # noqa: E402  (the engine tests' tiny model and phantoms)

sys.path.insert(0, str(ROOT / "Testing" / "viewer"))
from viewer_helpers import flair_phantom_array  # noqa: E402,F401  (the phantom as a FLAIR shows it)


def segmentArray(app: SlicerApp, segmentationNode, segmentName: str, referenceVolume):
    """A segment as a numpy array on the reference volume's grid (slicer.util's helper needs
    slicer.mrmlScene, which only the Slicer application has)."""
    import numpy as np

    segmentId = segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(segmentName)
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segmentId)
    labelmap = app.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__temp__")
    try:
        app.logics["Segmentations"].ExportSegmentsToLabelmapNode(segmentationNode, ids, labelmap, referenceVolume)
        return np.array(slicer.util.arrayFromVolume(labelmap), copy=True)
    finally:
        app.scene.RemoveNode(labelmap)
