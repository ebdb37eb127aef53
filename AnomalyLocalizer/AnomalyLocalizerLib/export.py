"""Exporting a run: the segmentation (.seg.nrrd or a label map) and the slice scores (CSV),
each with a record of model, method and threshold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import slicer
import vtk
from anomaly_localizer.core.levels import LEVEL_DEFINITION

from .nodes import REF_PREFIX

EXPORT_TEMPORARY = f"{REF_PREFIX}.exportTemporary"  # marks a node made only to be written


class ExportMixin:
    """Exports of :class:`AnomalyLocalizerLogic`."""

    def exportSegmentation(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the anomaly segmentation as .seg.nrrd or as a NIfTI/NRRD label map (label 1 on
        the input's grid). Both are the segmentation node as it is now: the threshold's
        segment with any corrections made in a segment editor."""
        path = Path(path)
        inputVolume = self._requireResult()
        sidecar = path.with_name(path.name + ".json")  # the record written beside it
        for target in (path, sidecar):
            if target.exists() and not overwrite:
                raise FileExistsError(f"{target} exists; choose another file name or allow overwriting")
        name = path.name.lower()
        if name.endswith(".seg.nrrd"):
            node = self.outputNode(inputVolume, "segmentation")
            storage = slicer.vtkMRMLSegmentationStorageNode()
        elif name.endswith((".nii.gz", ".nii", ".nrrd")):
            node = self._segmentationAsLabelmap(inputVolume)
            storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        else:
            raise ValueError(f"unsupported file type {path.name}; use .seg.nrrd, .nii.gz or .nrrd")
        self._recordProvenance(node)
        self.scene.AddNode(storage)
        try:
            storage.SetFileName(str(path))
            if not storage.WriteData(node):
                raise OSError(f"could not write {path}")
        finally:
            self.scene.RemoveNode(storage)
            if node.GetAttribute(EXPORT_TEMPORARY) is not None:
                self.scene.RemoveNode(node)
        sidecar.write_text(json.dumps(self.provenance(), indent=2) + "\n")
        return path

    def _segmentationAsLabelmap(self, inputVolume):
        """A temporary label map node (removed after writing) of the segmentation's segments
        on the input's grid."""
        segmentation = self.outputNode(inputVolume, "segmentation")
        labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{inputVolume.GetName()} export")
        labelmap.SetAttribute(EXPORT_TEMPORARY, "1")
        ids = vtk.vtkStringArray()
        segmentation.GetSegmentation().GetSegmentIDs(ids)
        segLogic = self.appLogic.GetModuleLogic("Segmentations")
        if not segLogic.ExportSegmentsToLabelmapNode(segmentation, ids, labelmap, inputVolume):
            self.scene.RemoveNode(labelmap)
            raise OSError("could not convert the segmentation to a label map")
        return labelmap

    def exportSliceScores(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the slice-score table as CSV, with a provenance comment line first."""
        path = Path(path)
        inputVolume = self._requireResult()
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; choose another file name or allow overwriting")
        table = self.outputNode(inputVolume, "table").GetTable()
        names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
        lines = ["# " + json.dumps(self.provenance()), ",".join(names)]
        for r in range(table.GetNumberOfRows()):
            vals = [table.GetValue(r, c).ToDouble() for c in range(len(names))]
            lines.append(",".join("" if not np.isfinite(v) else (str(int(v)) if n == "slice" else f"{v:.6g}")
                                  for n, v in zip(names, vals)))
        path.write_text("\n".join(lines) + "\n")
        return path

    def provenance(self) -> dict:
        r = self.result
        return {"model": r.summary.get("model", {}), "method": self.method, "threshold_anomaly_level": self.threshold,
                "brain_mask_source": r.summary.get("brain_mask_source"),
                "threshold_raw_score": self.threshold * r.levelScale[self.method],
                "healthy_false_positive_rate": self.healthyFalsePositiveRate(),
                "anomaly_level_definition": LEVEL_DEFINITION}

    def _recordProvenance(self, node) -> None:
        for k, v in self.provenance().items():
            node.SetAttribute(f"{REF_PREFIX}.{k}", json.dumps(v))

    def _requireResult(self):
        if self.result is None or self.inputVolume() is None:
            raise ValueError("nothing to export yet; run the analysis first")
        return self.inputVolume()
