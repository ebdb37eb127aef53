"""The live threshold: the segment and label map follow the slider, and what the threshold
means on healthy brains (the engine's own rule, :mod:`anomaly_localizer.core.levels`)."""

from __future__ import annotations

import numpy as np
import slicer
import vtk
from anomaly_localizer.core.levels import broad_flag_note, check_level, healthy_fpr, segment
from slicer import util as sutil

from .geometry import sameLattice

SEGMENT_NAME = "Anomaly"


SLIDER_MIN_LEVEL = 0.01  # a slider's low end: below it nearly the whole brain is flagged
SLIDER_MAX_LEVEL = 100.0  # and its high end (the parameter node's range in AnomalyLocalizer.py)


class ThresholdMixin:
    """Threshold and segment updates of :class:`AnomalyLocalizerLogic`."""

    def setThreshold(self, level: float) -> int:
        """Segment the current heatmap above ``level`` (anomaly level units); returns voxels.

        Fast enough for a slider: the cached numpy heatmap is thresholded into a reused
        buffer, which is written straight into the label map's voxels and the segment's
        internal binary labelmap (no node or image is rebuilt). A level that is not positive
        and finite (or beyond any score) is refused with the engine's message, the
        segmentation left as it was.
        """
        self.threshold = check_level(level, "threshold level")
        if self.result is None:
            return 0
        inputVolume = self.inputVolume()
        if inputVolume is None:  # the scored volume was removed: there is nothing left to segment
            self.clearResult()
            return 0
        raw = self.result.maps[self.method]
        if self._mask is None or self._mask.shape != raw.shape:
            self._mask = np.empty(raw.shape, dtype=bool)
        segment(raw, self.result.brainMask, level * self.result.levelScale[self.method], out=self._mask)
        labelmap = self.outputNode(inputVolume, "labelmap")
        voxels = sutil.arrayFromVolume(labelmap) if labelmap.GetImageData() is not None else None
        if voxels is None or voxels.shape != raw.shape or voxels.dtype != np.uint8:
            sutil.updateVolumeFromArray(labelmap, self._mask.view(np.uint8))
        else:
            voxels[...] = self._mask
            sutil.arrayFromVolumeModified(labelmap)
        self._updateSegment(self.outputNode(inputVolume, "segmentation"), labelmap)
        heat = self.outputNode(inputVolume, f"heatmap.{self.method}")
        if heat is not None and heat.GetDisplayNode() is not None:
            heat.GetDisplayNode().SetLowerThreshold(self.threshold)
            heat.GetDisplayNode().SetUpperThreshold(1e30)
        return int(np.count_nonzero(self._mask))

    def _updateSegment(self, segmentationNode, labelmap) -> None:
        """Write the current mask into segment "Anomaly" in place.

        The segment's internal labelmap is created once over the brain's bounding box
        (anomalies are never outside the brain); later updates copy that block of the mask
        into it, which is what keeps the slider fast.
        """
        segmentation = segmentationNode.GetSegmentation()
        segmentId = segmentation.GetSegmentIdBySegmentName(SEGMENT_NAME)
        block = self._segmentBlock(segmentationNode, segmentId, labelmap) if segmentId else None
        if block is None:
            segmentId = self._createSegmentOverBrain(segmentationNode, segmentId, labelmap)
            block = self._segmentBlock(segmentationNode, segmentId, labelmap)
        view, (k0, k1, j0, j1, i0, i1) = block
        value = segmentation.GetSegment(segmentId).GetLabelValue()
        np.multiply(self._mask[k0:k1, j0:j1, i0:i1], value, out=view, casting="unsafe")
        segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId).Modified()
        segmentation.GetSegment(segmentId).Modified()
        segmentationNode.Modified()

    def _segmentBlock(self, segmentationNode, segmentId, labelmap):
        """(numpy view of the segment's labelmap, its block in the input's k,j,i) or None
        when the labelmap is not on the input's lattice or does not cover the brain."""
        segmentation = segmentationNode.GetSegmentation()
        internal = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId)
        if internal is None or segmentation.GetNumberOfSegments() != 1 or not sameLattice(internal, labelmap):
            return None
        e = internal.GetExtent()
        k0, k1, j0, j1, i0, i1 = e[4], e[5] + 1, e[2], e[3] + 1, e[0], e[1] + 1
        bk, bj, bi = self._brainBox()
        if not (k0 <= bk[0] and bk[1] <= k1 and j0 <= bj[0] and bj[1] <= j1 and i0 <= bi[0] and bi[1] <= i1):
            return None
        view = sutil.arrayFromSegmentInternalBinaryLabelmap(segmentationNode, segmentId)
        return view, (k0, k1, j0, j1, i0, i1)

    def _brainBox(self):
        if self._box is not None and self._box[0] is self.result:
            return self._box[1]
        brain = self.result.brainMask
        box = []
        for axis in range(3):
            idx = np.nonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))[0]
            box.append((int(idx[0]), int(idx[-1]) + 1) if idx.size else (0, 0))
        self._box = (self.result, box)
        return box

    def _createSegmentOverBrain(self, segmentationNode, segmentId, labelmap) -> str:
        segLogic = slicer.vtkSlicerSegmentationsModuleLogic
        segmentation = segmentationNode.GetSegmentation()
        for i in reversed(range(segmentation.GetNumberOfSegments())):
            if segmentation.GetNthSegmentID(i) != segmentId:
                segmentation.RemoveSegment(segmentation.GetNthSegmentID(i))
        if not segmentId:
            segmentId = segmentation.AddEmptySegment(SEGMENT_NAME, SEGMENT_NAME, [1.0, 0.2, 0.2])
        (k0, k1), (j0, j1), (i0, i1) = self._brainBox()
        image = slicer.vtkOrientedImageData()
        image.SetExtent(i0, i1 - 1, j0, j1 - 1, k0, k1 - 1)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        m = vtk.vtkMatrix4x4()
        labelmap.GetIJKToRASMatrix(m)
        image.SetImageToWorldMatrix(m)
        from vtk.util import numpy_support
        arr = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k1 - k0, j1 - j0, i1 - i0)
        arr[...] = self.result.brainMask[k0:k1, j0:j1, i0:i1]  # the full brain keeps the extent
        segLogic.SetBinaryLabelmapToSegment(image, segmentationNode, segmentId, segLogic.MODE_REPLACE,
                                            image.GetExtent())
        if segmentationNode.GetDisplayNode() is None:
            segmentationNode.CreateDefaultDisplayNodes()
        display = segmentationNode.GetDisplayNode()
        display.SetVisibility2DFill(False)
        display.SetVisibility2DOutline(True)
        return segmentId

    def thresholdRange(self) -> tuple[float, float]:
        """The range a threshold slider offers, in anomaly levels: from SLIDER_MIN_LEVEL to
        just above the current map's highest level in the brain (at least 2, at most
        SLIDER_MAX_LEVEL), so that every voxel the map flags can be singled out."""
        top = 2.0
        if self.result is not None and self.method is not None:
            raw, brain = self.result.maps[self.method], self.result.brainMask
            if brain.any():
                top = max(top, 1.05 * float(np.nanmax(raw[brain])) / self.result.levelScale[self.method])
        return SLIDER_MIN_LEVEL, float(min(SLIDER_MAX_LEVEL, np.ceil(top * 10) / 10))

    def healthyFalsePositiveRate(self, level: float | None = None) -> float | None:
        """Share of healthy brain voxels the current (or given) threshold flags, if calibrated."""
        if self.result is None or self._package is None:
            return None
        lvl = self.threshold if level is None else level
        return healthy_fpr(self._package.calibration, self.method, lvl * self.result.levelScale[self.method])

    def healthyRateText(self) -> str:
        """What the current threshold means, in words, for a panel's label."""
        rate = self.healthyFalsePositiveRate()
        return "uncalibrated model" if rate is None else f"flags {100 * rate:.3g} % of healthy brain voxels"

    def thresholdInfoText(self, voxels: int) -> str:
        """The label under the threshold, a short line each: voxels flagged and what the level
        means on healthy brains; the note on this segmentation, if any; the scan's context (a
        scan-relative map raised overall), if any."""
        lines = [f"{voxels} voxels; {self.healthyRateText()}"]
        note, context = self.thresholdNote(), self.scanContextNote()
        lines += ([f"Note: {note}"] if note else []) + ([context] if context else [])
        return "\n".join(lines)

    def broadFlagNote(self) -> str | None:
        """A note when the current threshold flags far more of this brain than of healthy
        brains (a large lesion, or a scan unlike the model's training scans); else None."""
        if self.result is None or self._mask is None:
            return None
        return broad_flag_note(self._flaggedShare(), self.healthyFalsePositiveRate())

    def thresholdNote(self) -> str | None:
        """What to act on in the current segmentation, as ``score`` writes it into summary.json's
        ``note``: the broad-flag note; else None."""
        return self.broadFlagNote()

    def scanContextNote(self) -> str | None:
        """The shown map's scan-relative context, as summary.json's ``scan_relative`` holds it:
        one line when this scan's map is raised overall beyond healthy scans' (another scanner,
        an average template); information, not an alarm; else None."""
        if self.result is None:
            return None
        return (self.result.summary.get("scan_relative", {}).get(self.method) or {}).get("note")

    def _flaggedShare(self) -> float:
        """Share of this brain the current threshold segments."""
        return float(np.count_nonzero(self._mask)) / max(1, int(np.count_nonzero(self.result.brainMask)))
