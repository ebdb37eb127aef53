"""AnomalyLocalizerLogic: engine results as MRML nodes (no Qt; Slicer or slicer-core).

Construct it from a Slicer application logic (``slicer.app.applicationLogic()`` inside
Slicer). It turns a volume node into engine input, runs the engine (in this process for
scripts and tests, or in a child process with progress and cancel for the GUI), and turns
the results into nodes on the input's exact geometry:

- one scalar volume per heatmap method (``<input> anomaly <method>``), in "anomaly level"
  units: the raw score divided by the model's 0.01 % healthy false-positive threshold, so
  1.0 is as rare as one healthy voxel in 10,000; a heat colour table, a 0..1 window, and
  values under the current threshold transparent;
- a label map and a segmentation (segment "Anomaly") of the heatmap above the threshold;
- a table of slice scores (with their healthy percentiles) and a plot of them.

Output nodes are remembered on the input node (node references) and reused on a rerun; a
rerun's outputs replace the last run's, so heatmaps of methods it did not compute are removed.
Nothing is added to the scene until a run has succeeded, and a failure while building
nodes removes what that call added, so the scene is never left half-built.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import vtk

import slicer
from slicer import util as sutil

from . import runner

log = logging.getLogger(__name__)

REF_PREFIX = "AnomalyLocalizer"
HEAT_COLOR_NODE_NAME = "AnomalyLocalizerHeat"
SEGMENT_NAME = "Anomaly"
ANOMALY_LEVEL_FPR = 0.0001  # the calibrated threshold that defines anomaly level 1.0
SLICE_SCORE_LABELS = {"elbo": "-ELBO", "lsr": "LSR score"}


# --------------------------------------------------------------------------- geometry

def volumeNodeToImage(volumeNode) -> sitk.Image:
    """A SimpleITK image (LPS) with the node's voxels and exact geometry (RAS in Slicer)."""
    arr = sutil.arrayFromVolume(volumeNode)
    if arr is None:
        raise ValueError(f"volume {volumeNode.GetName()} has no image data; load a volume first")
    image = sitk.GetImageFromArray(np.array(arr, copy=True))
    image.SetSpacing(volumeNode.GetSpacing())
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    origin = ras_to_lps @ np.array(volumeNode.GetOrigin())
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASDirectionMatrix(m)
    direction = ras_to_lps @ np.array([[m.GetElement(r, c) for c in range(3)] for r in range(3)])
    image.SetOrigin(tuple(origin))
    image.SetDirection(tuple(direction.ravel()))
    return image


def copyGeometry(source, target) -> None:
    """Give ``target`` the IJK-to-RAS geometry and parent transform of ``source``."""
    m = vtk.vtkMatrix4x4()
    source.GetIJKToRASMatrix(m)
    target.SetIJKToRASMatrix(m)
    target.SetAndObserveTransformNodeID(source.GetTransformNodeID())


@dataclass
class RunResult:
    """Engine results for one input, kept in memory so the threshold can move live."""

    inputNodeID: str
    maps: dict[str, np.ndarray]  # raw scores, the input's array order (k, j, i)
    brainMask: np.ndarray
    sliceScores: dict[str, np.ndarray]
    axialAxis: int
    summary: dict
    levelScale: dict[str, float] = field(default_factory=dict)  # raw score per anomaly level 1.0


class AnomalyLocalizerLogic:
    """Scriptable logic of the AnomalyLocalizer module; see the README's "Slicer" section."""

    def __init__(self, applicationLogic):
        self.appLogic = applicationLogic
        self.scene = applicationLogic.GetMRMLScene()
        self.result: RunResult | None = None
        self.method: str | None = None
        self.threshold = 0.5
        self.opacity = 0.6
        self._package = None  # package of the last run: calibration for false-positive rates
        self._mask: np.ndarray | None = None  # reused threshold buffer
        self._box = None  # (result, brain bounding box) cache

    # ------------------------------------------------------------------------ models
    @staticmethod
    def availableModels() -> list[dict]:
        """Installed model packages: name, path, summary, default flag (hashes checked)."""
        from anomaly_localizer.errors import AnomalyLocalizerError
        from anomaly_localizer.package import default_model_name, list_packages, load_package

        default = default_model_name()
        models = []
        for path in list_packages():
            try:
                p = load_package(path)
                models.append({"name": p.name, "path": str(path), "summary": p.meta.get("summary", ""),
                               "default": p.name == default, "methods": _default_methods(p),
                               "offers": list(p.methods)})
            except AnomalyLocalizerError as exc:
                log.warning("model %s is unusable: %s", path, exc)
        return models

    def methodsFor(self, model: str | None, includeRestoration: bool = False) -> list[str]:
        """The methods a run of ``model`` computes: its defaults, plus restoration when
        asked for and offered (restoration optimises every slice, so it is opt-in)."""
        package = self.package(model)
        methods = _default_methods(package)
        if includeRestoration and "restoration" in package.methods and "restoration" not in methods:
            methods.append("restoration")
        return methods

    def package(self, model: str | None, methods: list[str] | None = None):
        """The model package to run: ``model`` if given, else one that offers ``methods``."""
        from anomaly_localizer.package import resolve_package_for
        return resolve_package_for(methods, model)

    # --------------------------------------------------------------------------- run
    def run(self, inputVolume, model: str | None = None, methods: list[str] | None = None, mask=None,
            device: str = "auto", progress: Callable[[float, str], None] | None = None,
            cancel: Callable[[], bool] | None = None) -> RunResult:
        """Score synchronously in this process and build or update the output nodes."""
        from anomaly_localizer.pipeline import score_volume

        package = self.package(model, methods)
        methods = methods or _default_methods(package)
        image = volumeNodeToImage(inputVolume)
        maskImage = self._maskImage(mask, inputVolume)
        res = score_volume(image, package, methods, mask=maskImage, device=device, progress=progress, cancel=cancel)
        summary = {"model": {"name": package.name, "manifest_sha256": package.manifest_sha256},
                   "methods": methods, "device": res.device, "timings_s": res.timings,
                   "volume_score": res.volume_score, "brain_mask_source": res.info["brain_mask_source"],
                   "primary_slice_score": res.info["primary_slice_score"],
                   "map_smoothing_mm": res.info["map_smoothing"]}
        result = RunResult(inputVolume.GetID(), res.maps, res.brain_mask, res.slice_scores, res.axial_axis, summary)
        self._applyResult(inputVolume, result, package)
        return result

    def startRun(self, inputVolume, model: str | None = None, methods: list[str] | None = None, mask=None,
                 device: str = "auto") -> runner.ChildRun:
        """Start the engine in a child process; poll it, then call :meth:`finishRun`."""
        package = self.package(model, methods)
        methods = methods or _default_methods(package)
        work = runner.new_work_dir()
        try:
            sitk.WriteImage(volumeNodeToImage(inputVolume), str(work / "input.nrrd"))
            args = ["score", str(work / "input.nrrd"), "--out", str(work / "out"), "--model", str(package.path),
                    "--device", device, "--threshold", "0"]
            for m in methods:
                args += ["--method", m]
            maskImage = self._maskImage(mask, inputVolume)
            if maskImage is not None:
                sitk.WriteImage(maskImage, str(work / "mask.nrrd"))
                args += ["--mask", str(work / "mask.nrrd")]
        except BaseException:
            runner.shutil.rmtree(work, ignore_errors=True)
            raise
        run = runner.ChildRun(args=args, work_dir=work, out_dir=work / "out").start()
        run.inputNodeID = inputVolume.GetID()  # type: ignore[attr-defined]
        run.modelPath = str(package.path)  # type: ignore[attr-defined]
        return run

    def finishRun(self, run: runner.ChildRun) -> RunResult:
        """Read a finished child run's outputs into nodes; raise its error if it failed."""
        from anomaly_localizer.errors import AnomalyLocalizerError, CancelledError
        from anomaly_localizer.package import load_package

        try:
            state = run.wait()
            if state == "cancelled":
                raise CancelledError("cancelled by the user")
            if state != "done":
                raise AnomalyLocalizerError(run.error)
            inputVolume = self.scene.GetNodeByID(run.inputNodeID)  # type: ignore[attr-defined]
            if inputVolume is None:
                raise AnomalyLocalizerError("the input volume was removed from the scene during the run")
            summary = json.loads((run.out_dir / "summary.json").read_text())
            maps = {m: sitk.GetArrayFromImage(sitk.ReadImage(str(run.out_dir / f"{m}.nii.gz")))
                    for m in summary["methods"]}
            brain = sitk.GetArrayFromImage(sitk.ReadImage(str(run.out_dir / "brainmask.nii.gz"))) > 0
            scores = _readSliceScores(run.out_dir / "slice_scores.csv")
            result = RunResult(inputVolume.GetID(), maps, brain, scores, summary["axial_axis"], summary)
            self._applyResult(inputVolume, result, load_package(run.modelPath))  # type: ignore[attr-defined]
            return result
        finally:
            run.cleanup()

    def _maskImage(self, mask, inputVolume) -> sitk.Image | None:
        """A brain mask image on the input's grid from a label map or segmentation node."""
        if mask is None:
            return None
        if mask.IsA("vtkMRMLSegmentationNode"):
            labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
            try:
                segLogic = self.appLogic.GetModuleLogic("Segmentations")
                ids = vtk.vtkStringArray()
                mask.GetSegmentation().GetSegmentIDs(ids)
                if ids.GetNumberOfValues() == 0:
                    raise ValueError(f"the mask segmentation {mask.GetName()} has no segment; add one covering the brain")
                segLogic.ExportSegmentsToLabelmapNode(mask, ids, labelmap, inputVolume)
                return volumeNodeToImage(labelmap)
            finally:
                self.scene.RemoveNode(labelmap)
        return volumeNodeToImage(mask)

    # ---------------------------------------------------------------------- outputs
    def _applyResult(self, inputVolume, result: RunResult, package) -> None:
        """Create or update every output node; on failure remove what this call added."""
        added: list = []
        previous = (self.result, self.method, self.threshold, self._package)
        try:
            self._package = package
            calib = package.calibration
            for m, arr in result.maps.items():
                scale = _levelScale(calib, m, arr, result.brainMask)
                result.levelScale[m] = scale
                node = self._outputNode(inputVolume, f"heatmap.{m}", "vtkMRMLScalarVolumeNode",
                                        f"{inputVolume.GetName()} anomaly {m}", added)
                copyGeometry(inputVolume, node)
                sutil.updateVolumeFromArray(node, (arr / scale).astype(np.float32))
                self._styleHeatmap(node)
            labelmap = self._outputNode(inputVolume, "labelmap", "vtkMRMLLabelMapVolumeNode",
                                        f"{inputVolume.GetName()} anomaly label", added)
            copyGeometry(inputVolume, labelmap)
            segmentation = self._outputNode(inputVolume, "segmentation", "vtkMRMLSegmentationNode",
                                            f"{inputVolume.GetName()} anomaly segmentation", added)
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
            segmentation.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
            table = self._outputNode(inputVolume, "table", "vtkMRMLTableNode",
                                     f"{inputVolume.GetName()} slice scores", added)
            self._fillTable(table, result, calib)
            self._plot(inputVolume, table, added, _primary(result))
            self.result = result
            self.method = next(iter(result.maps))
            default = package.default_threshold(self.method)
            if default is not None:
                self.threshold = default[0] / result.levelScale[self.method]
            self._placeInHierarchy(inputVolume)
            self.setThreshold(self.threshold)
            self.showResult(inputVolume)
        except BaseException:
            for node in added:
                self.scene.RemoveNode(node)
            self.result, self.method, self.threshold, self._package = previous
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

    def _outputNode(self, inputVolume, role: str, className: str, name: str, added: list):
        ref = f"{REF_PREFIX}.{role}"
        node = inputVolume.GetNodeReference(ref)
        if node is None or not node.IsA(className) or self.scene.GetNodeByID(node.GetID()) is None:
            node = self.scene.AddNewNodeByClass(className, name)
            added.append(node)
            inputVolume.SetNodeReferenceID(ref, node.GetID())
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

    def _fillTable(self, table, result: RunResult, calib: dict) -> None:
        from anomaly_localizer.calibrate import percentile_of

        n = len(next(iter(result.sliceScores.values())))
        cols = {"slice": np.arange(n, dtype=float)}
        for k in result.sliceScores:  # elbo, kl, rec of a VAE; lsr of an LSR model
            cols[k] = np.asarray(result.sliceScores[k], dtype=float)
            if calib.get("slice", {}).get(k):
                cols[f"{k}_healthy_percentile"] = np.array(
                    [percentile_of(calib, k, v) if np.isfinite(v) else np.nan for v in cols[k]])
        table.RemoveAllColumns()
        for name, values in cols.items():
            arr = vtk.vtkDoubleArray()
            arr.SetName(name)
            for v in values:
                arr.InsertNextValue(float(v) if np.isfinite(v) else float("nan"))
            table.AddColumn(arr)
        table.SetAttribute(f"{REF_PREFIX}.model", result.summary.get("model", {}).get("name", ""))
        table.SetAttribute(f"{REF_PREFIX}.axialAxis", str(result.axialAxis))

    def _plot(self, inputVolume, table, added: list, primary: str = "elbo") -> None:
        label = SLICE_SCORE_LABELS.get(primary, primary)
        yColumn = f"{primary}_healthy_percentile" if table.GetTable().GetColumnByName(
            f"{primary}_healthy_percentile") else primary
        series = self._outputNode(inputVolume, "plotSeries", "vtkMRMLPlotSeriesNode",
                                  f"{inputVolume.GetName()} slice {label}", added)
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("slice")
        series.SetYColumnName(yColumn)
        series.SetPlotType(series.PlotTypeScatter)
        series.SetMarkerStyle(series.MarkerStyleNone)
        chart = self._outputNode(inputVolume, "plot", "vtkMRMLPlotChartNode",
                                 f"{inputVolume.GetName()} slice scores", added)
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

    # ------------------------------------------------------------------- live controls
    def inputVolume(self):
        return self.scene.GetNodeByID(self.result.inputNodeID) if self.result else None

    def setMethod(self, method: str) -> None:
        """Which heatmap is shown and makes the segmentation."""
        if self.result is None or method not in self.result.maps:
            raise ValueError(f"no heatmap {method!r}; run the method first")
        self.method = method
        self.setThreshold(self.threshold)
        self.showResult(self.inputVolume())

    def setThreshold(self, level: float) -> int:
        """Segment the current heatmap above ``level`` (anomaly level units); returns voxels.

        Fast enough for a slider: the cached numpy heatmap is thresholded into a reused
        buffer, which is written straight into the label map's voxels and the segment's
        internal binary labelmap (no node or image is rebuilt).
        """
        self.threshold = float(level)
        if self.result is None:
            return 0
        inputVolume = self.inputVolume()
        raw = self.result.maps[self.method]
        if self._mask is None or self._mask.shape != raw.shape:
            self._mask = np.empty(raw.shape, dtype=bool)
        np.greater(raw, level * self.result.levelScale[self.method], out=self._mask)
        np.logical_and(self._mask, self.result.brainMask, out=self._mask)
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
        if internal is None or segmentation.GetNumberOfSegments() != 1 or not _sameLattice(internal, labelmap):
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

    def setOpacity(self, opacity: float) -> None:
        self.opacity = float(opacity)
        for composite in self._compositeNodes():
            composite.SetForegroundOpacity(self.opacity)

    def healthyFalsePositiveRate(self, level: float | None = None) -> float | None:
        """Share of healthy brain voxels the current (or given) threshold flags, if calibrated."""
        from anomaly_localizer.calibrate import healthy_fpr

        if self.result is None or self._package is None:
            return None
        lvl = self.threshold if level is None else level
        return healthy_fpr(self._package.calibration, self.method, lvl * self.result.levelScale[self.method])

    def broadFlagNote(self) -> str | None:
        """A note when the current threshold flags far more of this brain than of healthy
        brains (a large lesion, or a scan unlike the model's training scans); else None."""
        from anomaly_localizer.calibrate import broad_flag_note

        if self.result is None or self._mask is None:
            return None
        share = float(np.count_nonzero(self._mask)) / max(1, int(np.count_nonzero(self.result.brainMask)))
        return broad_flag_note(share, self.healthyFalsePositiveRate())

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
        scores = np.asarray(self.result.sliceScores[_primary(self.result)], dtype=float)
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

    # ------------------------------------------------------------------------ export
    def exportSegmentation(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the anomaly segmentation as .seg.nrrd or as a NIfTI/NRRD label map."""
        path = Path(path)
        inputVolume = self._requireResult()
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; choose another file name or allow overwriting")
        name = path.name.lower()
        if name.endswith(".seg.nrrd"):
            node = self.outputNode(inputVolume, "segmentation")
            storage = slicer.vtkMRMLSegmentationStorageNode()
        elif name.endswith((".nii.gz", ".nii", ".nrrd")):
            node = self.outputNode(inputVolume, "labelmap")
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
        path.with_name(path.name + ".json").write_text(json.dumps(self.provenance(), indent=2) + "\n")
        return path

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
                "anomaly_level_definition": f"raw score / the model's {100 * ANOMALY_LEVEL_FPR:g} % healthy FPR threshold"}

    def _recordProvenance(self, node) -> None:
        for k, v in self.provenance().items():
            node.SetAttribute(f"{REF_PREFIX}.{k}", json.dumps(v))

    def _requireResult(self):
        if self.result is None or self.inputVolume() is None:
            raise ValueError("nothing to export yet; run the analysis first")
        return self.inputVolume()


def _sameLattice(orientedImage, volumeNode) -> bool:
    """True when a segment's internal labelmap indexes the volume's own voxel lattice."""
    a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    orientedImage.GetImageToWorldMatrix(a)
    volumeNode.GetIJKToRASMatrix(b)
    return all(abs(a.GetElement(r, c) - b.GetElement(r, c)) < 1e-6 for r in range(4) for c in range(4))


def _default_methods(package) -> list[str]:
    from anomaly_localizer.cli import default_methods
    return default_methods(package)


def _levelScale(calib: dict, method: str, raw: np.ndarray, brain: np.ndarray) -> float:
    """Raw score that is anomaly level 1.0: the 0.01 % healthy FPR threshold, else the map's maximum."""
    for t in calib.get("pixel", {}).get(method, {}).get("thresholds", []):
        if abs(float(t["fpr"]) - ANOMALY_LEVEL_FPR) < 1e-12 and t["value"] > 0:
            return float(t["value"])
    top = float(raw[brain].max()) if brain.any() else 0.0
    return top if top > 0 else 1.0


def _primary(result) -> str:
    """The slice score a result's model ranks slices by."""
    primary = result.summary.get("primary_slice_score")
    return primary if primary in result.sliceScores else next(iter(result.sliceScores))


def _readSliceScores(path: Path) -> dict[str, np.ndarray]:
    import csv
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    names = [k for k in (rows[0].keys() if rows else []) if k not in ("slice", "brain_voxels")]
    return {k: np.array([float(r[k]) if r[k] else np.nan for r in rows]) for k in names}
