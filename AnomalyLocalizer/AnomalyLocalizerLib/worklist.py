"""Reading a screening worklist in Slicer: open the folder ``anomaly-localizer screen``
wrote, and step through its scans in rank order, each loaded with its results (heatmaps,
live threshold, segmentation, slice scores) as if it had just been run.

Only the current scan is kept in the scene: stepping on removes the previous scan's volume
and outputs (unless asked to keep them), so a worklist of hundreds of scans does not fill
the memory. A scan that cannot be loaded leaves the scene as it was.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .geometry import imageToVolumeNode
from .nodes import REF_PREFIX
from .run import RunResult

log = logging.getLogger(__name__)
WORKLIST_ROW_ATTRIBUTE = f"{REF_PREFIX}.worklistRow"


class WorklistMixin:
    """Worklist stepping of :class:`AnomalyLocalizerLogic`."""

    worklist = None  # anomaly_localizer.core.worklist.Worklist
    worklistIndex = -1  # position of the loaded scan among the screened rows

    def openWorklist(self, path: str | Path) -> int:
        """Open a worklist folder (or one of its worklist files); returns the number of
        screened scans. Nothing is loaded until :meth:`loadWorklistScan` or :meth:`nextScan`."""
        from anomaly_localizer.core.worklist import read_worklist
        try:
            worklist = read_worklist(path)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"cannot open the worklist {path}: {exc}") from None
        self.worklist, self.worklistIndex = worklist, -1
        return len(worklist.screened())

    def worklistRows(self) -> list:
        """The screened scans in rank order (most anomalous first)."""
        return self.worklist.screened() if self.worklist is not None else []

    def loadWorklistScan(self, index: int, keepPrevious: bool = False):
        """Load screened scan ``index`` (0 = most anomalous) with its results and show its
        most anomalous slice; returns the volume node."""
        from anomaly_localizer.core.imageio import as_3d, read_image
        from anomaly_localizer.core.results import read_results

        rows = self.worklistRows()
        if not 0 <= index < len(rows):
            raise IndexError(f"the worklist has {len(rows)} screened scans; there is no scan {index + 1}")
        row = rows[index]
        folder = self.worklist.folder / row.id
        try:
            saved = read_results(folder)
            image = as_3d(read_image(row.input, "INPUT", row.series))
        except Exception as exc:
            raise ValueError(f"cannot load {row.id} of the worklist: {exc}") from None
        package = self._worklistPackage(saved.summary)
        previous = self.inputVolume() if self.result is not None else None
        node = imageToVolumeNode(self.scene, image, row.id)
        try:
            if saved.brain_mask.shape != tuple(reversed(image.GetSize())):
                raise ValueError(f"the results of {row.id} do not fit its input ({row.input} changed after "
                                 "screening?); screen it again")
            node.SetAttribute(WORKLIST_ROW_ATTRIBUTE, row.id)
            result = RunResult(node.GetID(), saved.maps, saved.brain_mask, saved.slice_scores, saved.axial_axis,
                               saved.summary)
            self._applyResult(node, result, package)
        except BaseException:
            self.scene.RemoveNode(node)
            raise
        if previous is not None and not keepPrevious and previous.GetAttribute(WORKLIST_ROW_ATTRIBUTE):
            self.removeScan(previous)
        self.worklistIndex = index
        if row.top_slice is not None:
            self.jumpToSlice(int(row.top_slice))
        return node

    def nextScan(self, keepPrevious: bool = False):
        """Load the next scan in rank order; None after the last one."""
        if self.worklistIndex + 1 >= len(self.worklistRows()):
            return None
        return self.loadWorklistScan(self.worklistIndex + 1, keepPrevious)

    def previousScan(self, keepPrevious: bool = False):
        """Load the previous scan in rank order; None before the first one."""
        if self.worklistIndex <= 0:
            return None
        return self.loadWorklistScan(self.worklistIndex - 1, keepPrevious)

    def worklistPositionText(self) -> str:
        """'Scan 2 of 40: sub-07, healthy percentile 99.1' and the scan's note; empty without one."""
        row = self.currentWorklistRow()
        if row is None:
            return ""
        pct = "" if row.scan_percentile is None else f", healthy percentile {row.scan_percentile:.1f}"
        return f"Scan {row.rank} of {len(self.worklistRows())}: {row.id}{pct}" + (f"\nNote: {row.note}" if row.note else "")

    def currentWorklistRow(self):
        rows = self.worklistRows()
        return rows[self.worklistIndex] if 0 <= self.worklistIndex < len(rows) else None

    def _worklistPackage(self, summary: dict):
        """The model the scan was screened with: its package folder if unchanged, else an
        installed model of that name with the same manifest."""
        from anomaly_localizer.core.package import load_package
        from anomaly_localizer.core.package import resolve_package
        from anomaly_localizer.errors import AnomalyLocalizerError
        model = summary.get("model", {})
        for get in (lambda: load_package(model["path"]), lambda: resolve_package(model["name"])):
            try:
                package = get()
            except (AnomalyLocalizerError, KeyError, OSError):
                continue
            if package.manifest_sha256 == model.get("manifest_sha256"):
                return package
        raise ValueError(f"the model {model.get('name')} this worklist was screened with is not installed unchanged; "
                         "install it, or screen the scans again with an installed model")

    def removeScan(self, volume) -> None:
        """Remove a worklist scan's volume, every output node it references, and their folder."""
        sh = self.scene.GetSubjectHierarchyNode()
        folder = None
        if sh is not None and sh.GetItemByDataNode(volume):
            folder = sh.GetItemChildWithName(sh.GetItemParent(sh.GetItemByDataNode(volume)),
                                             f"{volume.GetName()} anomalies")
        for i in reversed(range(volume.GetNumberOfNodeReferenceRoles())):
            role = volume.GetNthNodeReferenceRole(i)
            if role.startswith(REF_PREFIX + "."):
                node = volume.GetNodeReference(role)
                if node is not None and self.scene.GetNodeByID(node.GetID()) is not None:
                    self.scene.RemoveNode(node)
        self.scene.RemoveNode(volume)
        if folder:
            sh.RemoveItem(folder)
