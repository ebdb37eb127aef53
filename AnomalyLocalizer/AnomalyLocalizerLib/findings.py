"""Findings of the current segmentation in the scene: the engine's list (how many, how big,
where), a markup point at each peak, and centring the slice views on one."""

from __future__ import annotations

from typing import Any

import numpy as np
import vtk
from anomaly_localizer.core.findings import apply_finding_rule, find_findings, format_ml, format_mm, rule_at

FINDINGS_ROLE = "findings"  # output role of the markups node of the peaks


def nodeGeometryLPS(volumeNode) -> tuple[tuple, tuple, tuple]:
    """Origin, spacing and direction of a volume node as SimpleITK states them (LPS)."""
    flip = np.diag([-1.0, -1.0, 1.0])
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASDirectionMatrix(m)
    directions = np.array([[m.GetElement(r, c) for c in range(3)] for r in range(3)])
    origin = flip @ np.array(volumeNode.GetOrigin(), dtype=float)
    return tuple(origin), tuple(volumeNode.GetSpacing()), tuple((flip @ directions).ravel())


MARKER_MM = 4.0  # a finding's marker: a hollow ring this wide (mm), whatever the zoom


def styleFindingMarkers(display) -> None:
    """Markers that point at a finding without hiding it: a hollow ring of MARKER_MM around
    the peak (Slicer's default is a filled sphere sized to the view, larger than a small
    finding), a small label beside it."""
    if display is None:
        return
    display.SetSelectedColor(0.1, 0.9, 1.0)
    display.SetGlyphTypeFromString("Circle2D")
    display.SetUseGlyphScale(False)
    display.SetGlyphSize(MARKER_MM)
    display.SetTextScale(1.5)


class FindingsMixin:
    """Findings of :class:`AnomalyLocalizerLogic`'s current heatmap and threshold."""

    belowFindingRule: list[dict[str, Any]] = []  # regions of the segmentation that are not findings

    def findings(self) -> list[dict[str, Any]]:
        """The findings of the segmentation at the current threshold (the engine's
        :func:`~anomaly_localizer.core.findings.find_findings`: connected regions ranked by
        peak anomaly level, with positions in RAS and LPS) that pass the map's finding rule;
        the regions below it are in ``belowFindingRule``. Updates the peaks' markup points."""
        inputVolume = self.inputVolume()
        if inputVolume is None or self._mask is None:
            return []
        origin, spacing, direction = nodeGeometryLPS(inputVolume)
        levels = self.result.maps[self.method] / self.result.levelScale[self.method]
        regions = find_findings(self._mask, levels, self.result.brainMask, origin, spacing, direction,
                                self.result.axialAxis, limit=None)
        found, self.belowFindingRule = apply_finding_rule(regions, rule_at(self.findingRule(), self.threshold))
        self._showPeaks(inputVolume, found)
        return found

    def findingRule(self) -> dict[str, Any] | None:
        """The current map's calibrated finding rule (regions smaller and fainter than healthy
        scans show are not findings; :mod:`anomaly_localizer.core.findings`), or None."""
        package = getattr(self, "_package", None)
        rule = package.calibration.findings.get(self.method) if package is not None else None
        return rule.model_dump(exclude_none=True) if rule is not None else None

    def _showPeaks(self, inputVolume, found: list[dict[str, Any]]) -> None:
        """One markup point per finding's peak, labelled with its rank and volume; the node
        is an output of the input volume like the others, reused on every update."""
        node = self.outputNode(inputVolume, FINDINGS_ROLE)
        if node is None or self.scene.GetNodeByID(node.GetID()) is None:
            if not found:
                return
            node = self._outputNode(inputVolume, FINDINGS_ROLE, "vtkMRMLMarkupsFiducialNode",
                                    f"{inputVolume.GetName()} anomaly findings", [], None)
            node.CreateDefaultDisplayNodes()
            styleFindingMarkers(node.GetDisplayNode())
        wasModifying = node.StartModify()
        try:
            node.RemoveAllControlPoints()
            for f in found:
                index = node.AddControlPoint(vtk.vtkVector3d(*f["peak_ras"]), f"#{f['rank']} {format_ml(f['volume_ml'])}")
                node.SetNthControlPointLocked(index, True)
        finally:
            node.EndModify(wasModifying)

    @staticmethod
    def findingCells(finding: dict[str, Any]) -> list[str]:
        """A finding as the panel's table shows it: rank, mL, side, peak level, peak R, A, S (mm)."""
        r, a, s = finding["peak_ras"]
        return [str(finding["rank"]), format_ml(finding["volume_ml"]).removesuffix(" mL"), finding["side"],
                f"{finding['peak_level']:.2g}", format_mm(r), format_mm(a), format_mm(s)]

    def centreOnFinding(self, finding: dict[str, Any]) -> tuple[float, float, float]:
        """Centre every slice view on a finding's peak; returns its RAS position."""
        ras = tuple(float(v) for v in finding["peak_ras"])
        col = self.scene.GetNodesByClass("vtkMRMLSliceNode")
        for i in range(col.GetNumberOfItems()):
            col.GetItemAsObject(i).JumpSliceByCentering(*ras)
        return ras
