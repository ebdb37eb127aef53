"""The output nodes of a run: heatmap volumes, label map, segmentation, slice-score table
and plot, their display, their place in the subject hierarchy, and the slice views."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import vtk
from anomaly_localizer.core.levels import as_calibration, level_scale, percentile_of
from slicer import util as sutil

from .geometry import copyGeometry

if TYPE_CHECKING:
    from .run import RunResult

REF_PREFIX = "AnomalyLocalizer"
HEAT_COLOR_NODE_NAME = "AnomalyLocalizerHeat"
SLICE_SCORE_LABELS = {"elbo": "-ELBO", "lsr": "LSR score"}


class NodesMixin:
    """Building, reusing and showing the output nodes of :class:`AnomalyLocalizerLogic`."""

    def _applyResult(self, inputVolume, result: RunResult, package) -> None:
        """Create or update every output node. Every array is prepared first; only then are
        nodes written. On a failure, nodes this call added are removed and reused nodes get
        their previous content back, so the scene still matches the last good run."""
        calib = as_calibration(package.calibration)
        levels = {}
        for m, arr in result.maps.items():
            result.levelScale[m], _ = level_scale(calib, m, arr, result.brainMask)
            levels[m] = (arr / result.levelScale[m]).astype(np.float32)
        columns = self._tableColumns(result, calib)
        added: list = []
        backups: list = []  # (reused node, copy of its content before this call)
        previous = (self.result, self.method, self.threshold, self._package, self._resultInput)
        try:
            self._package = package
            for m, level in levels.items():
                node = self._outputNode(inputVolume, f"heatmap.{m}", "vtkMRMLScalarVolumeNode",
                                        f"{inputVolume.GetName()} anomaly {m}", added, backups)
                copyGeometry(inputVolume, node)
                sutil.updateVolumeFromArray(node, level)
                self._styleHeatmap(node)
            labelmap = self._outputNode(inputVolume, "labelmap", "vtkMRMLLabelMapVolumeNode",
                                        f"{inputVolume.GetName()} anomaly label", added, backups)
            copyGeometry(inputVolume, labelmap)
            segmentation = self._outputNode(inputVolume, "segmentation", "vtkMRMLSegmentationNode",
                                            f"{inputVolume.GetName()} anomaly segmentation", added, backups)
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
            segmentation.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
            table = self._outputNode(inputVolume, "table", "vtkMRMLTableNode",
                                     f"{inputVolume.GetName()} slice scores", added, backups)
            self._fillTable(table, result, columns)
            self._plot(inputVolume, table, added, primarySliceScore(result), backups)
            self.result, self._resultInput = result, inputVolume
            self.method = next(iter(result.maps))
            # the level the engine segmented at (summary.json's threshold), else the calibrated default
            level = (result.summary.get("threshold") or {}).get("level")
            default = package.default_threshold(self.method)
            if level is not None and (result.summary["threshold"].get("method") in (None, self.method)):
                self.threshold = float(level)
            elif default is not None:
                self.threshold = default[0] / result.levelScale[self.method]
            self._placeInHierarchy(inputVolume)
            self.setThreshold(self.threshold)
            self.showResult(inputVolume)
        except BaseException:
            for node in added:
                self.scene.RemoveNode(node)
            for node, backup in backups:
                node.CopyContent(backup, True)
            self.result, self.method, self.threshold, self._package, self._resultInput = previous
            self._mask = None
            raise
        self._removeStaleHeatmaps(inputVolume, set(result.maps))

    def _removeStaleHeatmaps(self, inputVolume, methods: set[str]) -> None:
        """A rerun replaces the previous run's outputs. Heatmaps of methods this run did not
        compute (another model's, or restoration left out this time) would otherwise sit in
        the folder beside the new segmentation and table, looking current. Called only after
        a run succeeded, so a failed rerun keeps everything the last good run made."""
        prefix = f"{REF_PREFIX}.heatmap."
        roles = [inputVolume.GetNthNodeReferenceRole(i) for i in range(inputVolume.GetNumberOfNodeReferenceRoles())]
        for role in roles:
            if role.startswith(prefix) and role[len(prefix):] not in methods:
                node = inputVolume.GetNodeReference(role)
                inputVolume.RemoveNodeReferenceIDs(role)
                if node is not None and self.scene.GetNodeByID(node.GetID()) is not None:
                    self.scene.RemoveNode(node)

    def _outputNode(self, inputVolume, role: str, className: str, name: str, added: list,
                    backups: list | None = None):
        """The node of ``role``: reused from the last run (its content copied into ``backups``
        first), or new (listed in ``added``)."""
        ref = f"{REF_PREFIX}.{role}"
        node = inputVolume.GetNodeReference(ref)
        if node is None or not node.IsA(className) or self.scene.GetNodeByID(node.GetID()) is None:
            node = self.scene.AddNewNodeByClass(className, name)
            added.append(node)
            inputVolume.SetNodeReferenceID(ref, node.GetID())
        elif backups is not None:
            backup = node.CreateNodeInstance()
            backup.CopyContent(node, True)
            backups.append((node, backup))
        return node

    def outputNode(self, inputVolume, role: str):
        """The output node of a role (``heatmap.<method>``, ``labelmap``, ``segmentation``,
        ``table``, ``plot``) for an input, or None before the first run."""
        return inputVolume.GetNodeReference(f"{REF_PREFIX}.{role}")

    def heatColorNode(self):
        """A heat colour table built in code (file-based tables ship only with Slicer)."""
        node = self.scene.GetFirstNodeByName(HEAT_COLOR_NODE_NAME)
        if node is not None:
            return node
        node = self.scene.AddNewNodeByClass("vtkMRMLColorTableNode", HEAT_COLOR_NODE_NAME)
        node.SetTypeToUser()
        n = 256
        node.SetNumberOfColors(n)
        for i in range(n):
            t = i / (n - 1)
            # dark red -> red -> orange -> yellow: never white or grey, so it cannot be
            # mistaken for bright tissue of the greyscale scan underneath
            r, g, b = min(1.0, 0.35 + 1.3 * t), min(1.0, max(0.0, 2.0 * t - 0.6)), 0.0
            node.SetColor(i, f"{i}", r, g, b, 1.0)
        node.SetAttribute("Category", "AnomalyLocalizer")
        return node

    def _styleHeatmap(self, node) -> None:
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetAndObserveColorNodeID(self.heatColorNode().GetID())
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(0.0, 1.0)
        display.SetApplyThreshold(True)
        display.SetInterpolate(False)

    def _tableColumns(self, result: RunResult, calib) -> dict[str, np.ndarray]:
        """The slice-score table's columns: slice index, each slice score and, where the model
        is calibrated, its healthy percentile."""
        n = len(next(iter(result.sliceScores.values())))
        cols = {"slice": np.arange(n, dtype=float)}
        for k in result.sliceScores:  # elbo, kl, rec of a VAE; the family's own otherwise
            cols[k] = np.asarray(result.sliceScores[k], dtype=float)
            if k in calib.slice:
                cols[f"{k}_healthy_percentile"] = np.array(
                    [percentile_of(calib, k, v) if np.isfinite(v) else np.nan for v in cols[k]])
        return cols

    def _fillTable(self, table, result: RunResult, cols: dict[str, np.ndarray]) -> None:
        table.RemoveAllColumns()
        for name, values in cols.items():
            arr = vtk.vtkDoubleArray()
            arr.SetName(name)
            for v in values:
                arr.InsertNextValue(float(v) if np.isfinite(v) else float("nan"))
            table.AddColumn(arr)
        table.SetAttribute(f"{REF_PREFIX}.model", result.summary.get("model", {}).get("name", ""))
        table.SetAttribute(f"{REF_PREFIX}.axialAxis", str(result.axialAxis))

    def _plot(self, inputVolume, table, added: list, primary: str = "elbo", backups: list | None = None) -> None:
        label = SLICE_SCORE_LABELS.get(primary, primary)
        yColumn = f"{primary}_healthy_percentile" if table.GetTable().GetColumnByName(
            f"{primary}_healthy_percentile") else primary
        series = self._outputNode(inputVolume, "plotSeries", "vtkMRMLPlotSeriesNode",
                                  f"{inputVolume.GetName()} slice {label}", added, backups)
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("slice")
        series.SetYColumnName(yColumn)
        series.SetPlotType(series.PlotTypeScatter)
        series.SetMarkerStyle(series.MarkerStyleNone)
        chart = self._outputNode(inputVolume, "plot", "vtkMRMLPlotChartNode",
                                 f"{inputVolume.GetName()} slice scores", added, backups)
        chart.RemoveAllPlotSeriesNodeIDs()
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
        chart.SetTitle("Slice anomaly score")
        chart.SetXAxisTitle("axial slice")
        chart.SetYAxisTitle(f"healthy percentile of {label}" if yColumn != primary else label)

    def _placeInHierarchy(self, inputVolume) -> None:
        """Put the outputs in a folder "<input> anomalies" beside the input."""
        sh = self.scene.GetSubjectHierarchyNode()
        if sh is None:
            return

        def item(node):
            found = sh.GetItemByDataNode(node)
            # Slicer's subject hierarchy plugins add items for new nodes; without them, add one.
            return found if found else sh.CreateItem(sh.GetSceneItemID(), node)

        parent = sh.GetItemParent(item(inputVolume))
        folderName = f"{inputVolume.GetName()} anomalies"
        folder = sh.GetItemChildWithName(parent, folderName)
        if not folder:
            folder = sh.CreateFolderItem(parent, folderName)
        for i in range(inputVolume.GetNumberOfNodeReferenceRoles()):
            role = inputVolume.GetNthNodeReferenceRole(i)
            if role.startswith(REF_PREFIX + "."):
                node = inputVolume.GetNodeReference(role)
                if node is not None:
                    sh.SetItemParent(item(node), folder)

    def inputVolume(self):
        """The scored volume node; None without a result, or once that node left the scene
        (a node of the same ID added later is another volume)."""
        if self.result is None:
            return None
        node = self.scene.GetNodeByID(self.result.inputNodeID)
        return node if node is not None and node is self._resultInput else None

    def setMethod(self, method: str) -> None:
        """Which heatmap is shown and makes the segmentation."""
        if self.result is None or method not in self.result.maps:
            raise ValueError(f"no heatmap {method!r}; run the method first")
        self.method = method
        self.setThreshold(self.threshold)
        self.showResult(self.inputVolume())

    def setOpacity(self, opacity: float) -> None:
        """The heatmap's opacity, in the slice views that show one of this result's heatmaps
        (other views, and other modules' foreground layers, keep theirs)."""
        self.opacity = float(opacity)
        inputVolume = self.inputVolume()
        if inputVolume is None:
            return
        heatmaps = {node.GetID() for node in (self.outputNode(inputVolume, f"heatmap.{m}") for m in self.result.maps)
                    if node is not None}
        for composite in self._compositeNodes():
            if composite.GetForegroundVolumeID() in heatmaps:
                composite.SetForegroundOpacity(self.opacity)

    def _compositeNodes(self) -> list:
        nodes = []
        col = self.scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
        for i in range(col.GetNumberOfItems()):
            nodes.append(col.GetItemAsObject(i))
        return nodes

    def showResult(self, inputVolume) -> None:
        """Input as background, current heatmap as foreground of every slice view."""
        if inputVolume is None or self.method is None:
            return
        heat = self.outputNode(inputVolume, f"heatmap.{self.method}")
        for composite in self._compositeNodes():
            composite.SetBackgroundVolumeID(inputVolume.GetID())
            composite.SetForegroundVolumeID(heat.GetID() if heat else None)
            composite.SetForegroundOpacity(self.opacity)

    def worstSlice(self) -> int | None:
        """Index (along the input's axial axis) of the slice with the highest primary slice
        score (-ELBO for a VAE, the lsr score for an LSR model)."""
        if self.result is None:
            return None
        scores = np.asarray(self.result.sliceScores[primarySliceScore(self.result)], dtype=float)
        return int(np.nanargmax(scores)) if np.isfinite(scores).any() else None

    def jumpToSlice(self, index: int) -> tuple[float, float, float]:
        """Centre every slice view on the brain's centre in axial slice ``index``; returns RAS."""
        inputVolume = self.inputVolume()
        brain = self.result.brainMask
        ax = 2 - self.result.axialAxis  # numpy axis of the axial index
        plane = np.take(brain, index, axis=ax)
        ijk = [0.0, 0.0, 0.0]
        ijk[self.result.axialAxis] = float(index)
        others = [a for a in range(3) if a != self.result.axialAxis]
        if plane.any():
            coords = np.argwhere(plane).mean(axis=0)  # numpy order of the remaining axes (descending ijk)
            for value, axis in zip(coords, sorted(others, reverse=True)):
                ijk[axis] = float(value)
        m = vtk.vtkMatrix4x4()
        inputVolume.GetIJKToRASMatrix(m)
        ras = m.MultiplyPoint([*ijk, 1.0])[:3]
        col = self.scene.GetNodesByClass("vtkMRMLSliceNode")
        for i in range(col.GetNumberOfItems()):
            col.GetItemAsObject(i).JumpSliceByCentering(*ras)
        return tuple(ras)


def primarySliceScore(result) -> str:
    """The slice score a result's model ranks slices by."""
    primary = result.summary.get("primary_slice_score")
    return primary if primary in result.sliceScores else next(iter(result.sliceScores))
