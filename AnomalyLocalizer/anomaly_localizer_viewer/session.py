"""What the browser viewer does, without the page: one reader's session.

A session owns a trame-slicer :class:`~trame_slicer.core.SlicerApp` (Slicer's scene, slice
views and segment editor) and an :class:`AnomalyLocalizerLogic` on its application logic, the
same logic the Slicer module uses. Every decision lives here so that it is tested against
real Slicer classes; :mod:`.app` only wires the page to these methods.

What it promises:
- one scan in the scene at a time (opening another removes the last one and its outputs);
- a run goes to a child process (the engine's command line); :meth:`poll` reports it, the
  page never waits on it, and :meth:`cancel` ends its whole process tree;
- bad input is answered with the engine's one-line message (:class:`ViewerError`) and leaves
  the scene as it was;
- nothing on the server is written except in the session's own temporary folder (uploads,
  exports), which :meth:`close` removes: exports go to the browser as downloads.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from AnomalyLocalizerLib.geometry import imageToVolumeNode
from AnomalyLocalizerLib.logic import AnomalyLocalizerLogic

EXPORT_KINDS = {"seg.nrrd": "Slicer segmentation (.seg.nrrd)", "nii.gz": "label map (NIfTI)"}
UNDO_LIMIT = 20  # corrections that can be undone
MAX_UPLOAD_BYTES = 2 * 1024 ** 3  # a 1 mm whole head is ~30 MB; a DICOM series is uploaded as a zip


class ViewerError(Exception):
    """A one-line message for the page: what was wrong and what to do."""


@dataclass
class RunStatus:
    state: str  # idle | running | done | failed | cancelled
    progress: float = 0.0
    message: str = ""


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (the page shows one line)."""
    text = str(exc).strip() or type(exc).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def prepareSliceViews(views) -> None:
    """Slice views draw images, which multisampling does not improve; trame-slicer asks for 8x
    multisampling, which made each redraw several times slower with software OpenGL (servers
    without a GPU): three 512x512 views took 63 ms unchanged with it, 12 ms without. Call
    before the views first draw."""
    for view in views:
        view.render_window().SetMultiSamples(0)


def _series_folder(root: Path) -> Path:
    """The folder of an unpacked archive that holds the files: archives often wrap a series
    in one or more folders of their own."""
    while True:
        entries = [e for e in root.iterdir() if not e.name.startswith((".", "__MACOSX"))]
        if len(entries) != 1 or not entries[0].is_dir():
            return root
        root = entries[0]


class ViewerSession:
    """One reader's scene, scan, run, threshold, edits and exports."""

    def __init__(self, slicerApp, workRoot: str | Path | None = None):
        self.slicer = slicerApp
        self.logic = AnomalyLocalizerLogic(slicerApp.app_logic)
        self.scan = None  # the volume node on show
        self.scanLabel = ""
        # corrections can be undone (trame-slicer's segment editor records them on this stack)
        from undo_stack import UndoStack
        self.slicer.segmentation_editor.set_undo_stack(UndoStack(undo_limit=UNDO_LIMIT))
        self._work = Path(tempfile.mkdtemp(prefix="anomaly-localizer-view-", dir=workRoot))
        self._status = RunStatus("idle")

    # --- opening -------------------------------------------------------------------------
    def open(self, path: str | Path) -> str:
        """Open a scan file, DICOM folder, or a screening worklist folder; returns what was
        opened, in words."""
        if not str(path or "").strip():
            raise ViewerError("no path given; type the path of a scan file, a DICOM folder or a worklist folder on "
                              "the server, or upload a scan")
        path = Path(str(path).strip()).expanduser()
        if not path.exists():
            raise ViewerError(f"{path} does not exist; give the path of a scan file, a DICOM folder or a "
                              "worklist folder on the server")
        if path.is_dir() and (path / "worklist.json").is_file():
            return self.openWorklist(path)
        return self.openScan(path)

    def openScan(self, path: str | Path, label: str | None = None) -> str:
        from anomaly_localizer.core.imageio import as_3d, read_image
        from anomaly_localizer.errors import AnomalyLocalizerError

        self._requireIdle()
        try:
            image = as_3d(read_image(path, "SCAN"))
        except (AnomalyLocalizerError, OSError, RuntimeError, ValueError) as exc:
            raise ViewerError(_one_line(exc)) from None
        name = label or Path(path).name.split(".")[0] or "scan"
        node = imageToVolumeNode(self.logic.scene, image, name)
        self._replaceScan(node)
        self.logic.worklist, self.logic.worklistIndex = None, -1
        self.scanLabel = name
        return f"opened {name}: {image.GetSize()[0]}x{image.GetSize()[1]}x{image.GetSize()[2]} voxels"

    def openUpload(self, fileName: str, content: bytes) -> str:
        """A file sent from the browser: kept in the session's own folder, then opened like
        a path (a .zip is unpacked there and opened as a DICOM folder)."""
        if len(content) > MAX_UPLOAD_BYTES:
            raise ViewerError(f"{fileName} is larger than {MAX_UPLOAD_BYTES // 1024 ** 3} GB")
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", Path(fileName).name) or "upload"
        folder = Path(tempfile.mkdtemp(prefix="upload-", dir=self._work))
        try:
            target = folder / safe
            target.write_bytes(content)
            if not safe.lower().endswith(".zip"):
                return self.openScan(target, label=safe.split(".")[0])
            import zipfile
            try:
                with zipfile.ZipFile(target) as archive:  # member paths cannot leave the folder
                    archive.extractall(folder / "dicom")
            except zipfile.BadZipFile:
                raise ViewerError(f"{fileName} is not a readable zip archive") from None
            return self.openScan(_series_folder(folder / "dicom"), label=safe[:-4])
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # a file that could not be opened is not kept
            raise

    def openWorklist(self, path: str | Path) -> str:
        self._requireIdle()
        try:
            count = self.logic.openWorklist(path)
        except ValueError as exc:
            raise ViewerError(_one_line(exc)) from None
        try:
            if count == 0:
                raise ViewerError(f"the worklist {path} has no screened scan yet; wait for screening to finish")
            self.stepWorklist(0)
        except ViewerError:
            self.logic.worklist, self.logic.worklistIndex = None, -1
            raise
        return f"opened the worklist {path}: {count} screened scans, most anomalous first"

    def stepWorklist(self, index: int) -> str:
        """Show screened scan ``index`` (0 is the most anomalous) with its results."""
        self._requireIdle()
        previous = self.scan
        try:
            node = self.logic.loadWorklistScan(index, keepPrevious=True)
        except (IndexError, ValueError) as exc:
            raise ViewerError(_one_line(exc)) from None
        if previous is not None and previous is not node:
            self.logic.removeScan(previous)
        self.scan = node
        self.scanLabel = node.GetName()
        self._afterResult()
        self.resetViews()  # fit the views to this scan, then show its most anomalous slice again
        row = self.logic.currentWorklistRow()
        if row is not None and row.top_slice is not None:
            self.logic.jumpToSlice(int(row.top_slice))
        return self.worklistPosition()

    def worklistPosition(self) -> str:
        rows = self.logic.worklistRows()
        if not rows:
            return ""
        row = rows[self.logic.worklistIndex]
        return f"scan {self.logic.worklistIndex + 1} of {len(rows)}: {row.id}"

    def _replaceScan(self, node) -> None:
        previous, self.scan = self.scan, node
        self.slicer.segmentation_editor.deactivate_effect()  # no brush on the last scan's segmentation
        if previous is not None:
            if self.logic.inputVolume() is previous:
                self.logic.clearResult()
            self.logic.removeScan(previous)
        self.slicer.display_manager.show_volume_in_slice_background(node)
        self.slicer.display_manager.show_volume_in_slice_foreground(None)
        self.resetViews()

    def resetViews(self) -> None:
        for view in self.slicer.view_manager.get_slice_views():
            view.reset_view()

    # --- running -------------------------------------------------------------------------
    def models(self) -> list[dict]:
        """Installed models a reader can pick (the default first; brain extraction is not one)."""
        models = sorted((m for m in self.logic.availableModels() if m["methods"]),
                        key=lambda m: (not m["default"], m["name"]))
        return [{"title": f"{m['name']} (default)" if m["default"] else m["name"], "value": m["name"]} for m in models]

    def start(self, model: str | None = None) -> None:
        """Score the scan on show in a child process; :meth:`poll` follows it."""
        from anomaly_localizer.errors import AnomalyLocalizerError

        if self.scan is None:
            raise ViewerError("open a scan first")
        self._requireIdle()
        try:
            self.logic.startRun(self.scan, model=model or None)
        except (AnomalyLocalizerError, ValueError, OSError) as exc:
            raise ViewerError(_one_line(exc)) from None
        self._status = RunStatus("running", 0.0, "starting")

    def poll(self) -> RunStatus:
        """The run's state; a finished run's results are put in the scene here."""
        from anomaly_localizer.errors import AnomalyLocalizerError, CancelledError

        run = self.logic.activeRun
        if run is None:
            return self._status
        state = run.poll()
        if state == "running":
            self._status = RunStatus("running", run.progress, run.message)
            return self._status
        try:
            self.logic.finishRun(run)
        except CancelledError:
            self._status = RunStatus("cancelled", 0.0, "cancelled; the scan is as it was")
            return self._status
        except (AnomalyLocalizerError, ValueError, OSError) as exc:
            self._status = RunStatus("failed", 0.0, _one_line(exc))
            return self._status
        self._afterResult()
        self._status = RunStatus("done", 1.0, "done")
        return self._status

    def cancel(self) -> None:
        if self.logic.activeRun is not None:
            self.logic.cancelRun()
            self._status = RunStatus("cancelled", 0.0, "cancelled; the scan is as it was")

    def _requireIdle(self) -> None:
        if self.logic.activeRun is not None and self.logic.activeRun.poll() == "running":
            raise ViewerError("a run is in progress; cancel it or wait for it to finish")

    def _afterResult(self) -> None:
        """Show the result and hand its segmentation to the segment editor (paint, erase)."""
        self.logic.showResult(self.scan)
        self._attachEditor()

    def _attachEditor(self) -> None:
        segmentation = self.logic.outputNode(self.scan, "segmentation")
        if segmentation is not None:
            self.slicer.segmentation_editor.set_active_segmentation(segmentation, self.scan)

    # --- reading the result ----------------------------------------------------------------
    @property
    def hasResult(self) -> bool:
        return self.logic.inputVolume() is not None and self.logic.inputVolume() is self.scan

    def methods(self) -> list[str]:
        return list(self.logic.result.maps) if self.hasResult else []

    def setMethod(self, method: str) -> None:
        self.logic.setMethod(method)
        self._editsReplaced()

    def setThreshold(self, level: float) -> int:
        """Move the threshold (anomaly levels); returns the segmented voxel count. Manual edits
        are replaced by the threshold's segmentation (as in the Slicer module)."""
        try:
            count = self.logic.setThreshold(float(level))
        except (TypeError, ValueError) as exc:
            raise ViewerError(_one_line(exc)) from None
        self._editsReplaced()
        return count

    def _editsReplaced(self) -> None:
        undo = self.slicer.segmentation_editor.undo_stack
        if undo is not None:
            undo.clear()

    def setOpacity(self, opacity: float) -> None:
        self.logic.setOpacity(max(0.0, min(1.0, float(opacity))))

    def thresholdRange(self) -> tuple[float, float]:
        return self.logic.thresholdRange()

    def thresholdNote(self) -> str:
        """The healthy false-positive rate of the threshold, and the broad-flag note if any."""
        note = self.logic.thresholdNote()
        return self.logic.healthyRateText() + (f"; {note}" if note else "")

    def findings(self) -> list[dict]:
        """The findings at the current threshold, for the page's list."""
        if not self.hasResult:
            return []
        from anomaly_localizer.core.findings import describe_finding
        return [{"rank": f["rank"], "text": describe_finding(f)} for f in self.logic.findings()]

    def centreOn(self, finding: dict) -> tuple[float, float, float]:
        return self.logic.centreOnFinding(finding)

    def colourBar(self) -> dict:
        """The heat colour table as a CSS gradient over anomaly levels 0..1 of the display
        window (the heatmaps' window is 0..1 anomaly level above the threshold's display
        floor), with the threshold's place on it."""
        colours = self.logic.heatColorNode()
        table = colours.GetLookupTable()
        n = table.GetNumberOfTableValues()
        stops = []
        for i in range(0, n, max(1, n // 16)):
            r, g, b, _ = table.GetTableValue(i)
            stops.append(f"rgb({int(255 * r)},{int(255 * g)},{int(255 * b)}) {100 * i / (n - 1):.1f}%")
        return {"css": f"linear-gradient(to right, {', '.join(stops)})"}

    # --- editing -------------------------------------------------------------------------
    def setTool(self, tool: str) -> None:
        """``paint``, ``erase`` or ``none`` on the anomaly segment."""
        from trame_slicer.segmentation import SegmentationEffectErase, SegmentationEffectPaint

        editor = self.slicer.segmentation_editor
        if tool == "none":
            editor.deactivate_effect()
            return
        if not self.hasResult:
            raise ViewerError("run the analysis first; then paint or erase on its segmentation")
        effect = {"paint": SegmentationEffectPaint, "erase": SegmentationEffectErase}[tool]
        editor.set_active_effect_type(effect)

    def undo(self) -> None:
        undo = self.slicer.segmentation_editor.undo_stack
        if undo is not None and undo.can_undo():
            undo.undo()

    def redo(self) -> None:
        undo = self.slicer.segmentation_editor.undo_stack
        if undo is not None and undo.can_redo():
            undo.redo()

    # --- exporting -----------------------------------------------------------------------
    def export(self, kind: str) -> tuple[str, bytes]:
        """The segmentation as shown (threshold and manual edits) as a file's name and bytes
        for the browser to download; written in the session's folder, never next to a scan."""
        if kind not in EXPORT_KINDS:
            raise ViewerError(f"unknown export {kind!r}; choose one of {', '.join(EXPORT_KINDS)}")
        if not self.hasResult:
            raise ViewerError("nothing to export yet; run the analysis first")
        folder = Path(tempfile.mkdtemp(prefix="export-", dir=self._work))
        name = f"{re.sub(r'[^A-Za-z0-9._-]', '_', self.scanLabel) or 'scan'}-anomaly.{kind}"
        try:
            path = self.logic.exportSegmentation(folder / name)
            return name, path.read_bytes()
        except (OSError, ValueError) as exc:
            raise ViewerError(_one_line(exc)) from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        """End a run in progress, empty the views and remove the session's folder."""
        self.logic.cleanup()
        self.slicer.display_manager.show_volume_in_slice_background(None)
        self.slicer.display_manager.show_volume_in_slice_foreground(None)
        shutil.rmtree(self._work, ignore_errors=True)
