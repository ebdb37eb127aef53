"""What the browser viewer does, without the page: one reader's session.

A session owns a trame-slicer :class:`~trame_slicer.core.SlicerApp` (Slicer's scene, slice
views and segment editor) and an :class:`AnomalyLocalizerLogic` on its application logic, the
same logic the Slicer module uses. Every decision lives here so that it is tested against
real Slicer classes; :mod:`.app` only wires the page to these methods.

What it promises:
- one study in the scene at a time: one or more co-registered series of one patient, the first
  being the scan on show and the grid of every output (opening another study removes the
  last one and its outputs; adding a series adds it to the study on show);
- each series' contrast is shown as the engine recognises it (DICOM header, else the image,
  else a guess from its name) and can be chosen instead; a run applies the engine's rules for
  a study through the same logic as the Slicer module (a series the model does not read is
  recorded, not used, and the page says so);
- a run goes to a child process (the engine's command line); :meth:`poll` reports it, the
  page never waits on it, and :meth:`cancel` ends its whole process tree;
- bad input is answered with the engine's one-line message (:class:`ViewerError`) and leaves
  the scene as it was;
- nothing on the server is written except in the session's own temporary folder (uploads,
  exports), which :meth:`close` removes: exports go to the browser as downloads;
- paths open only inside the folders the server was given, and only regular files and folders
  (:mod:`.limits`); uploads are bounded in size, members and name.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
from pathlib import Path

from AnomalyLocalizerLib.geometry import imageToVolumeNode
from AnomalyLocalizerLib.inputs import HOW_KNOWN, setDicomTags, shortName
from AnomalyLocalizerLib.logic import AnomalyLocalizerLogic

from . import limits
from .errors import ViewerError, one_line
from .series import RunStatus, Series, prepareSliceViews, series_folder

__all__ = ["EXPORT_KINDS", "ViewerError", "ViewerSession", "RunStatus", "prepareSliceViews"]
EXPORT_KINDS = {"seg.nrrd": "Slicer segmentation (.seg.nrrd)", "nii.gz": "label map (NIfTI)"}
TOOLS = ("none", "paint", "erase")
UNDO_LIMIT = 20  # corrections that can be undone
MAX_UPLOAD_BYTES = limits.MAX_UPLOAD_BYTES


class ViewerSession:
    """One reader's scene, scan, run, threshold, edits and exports."""

    def __init__(self, slicerApp, workRoot: str | Path | None = None, allowedFolders=None):
        """``allowedFolders``: the folders whose files open by path (None: any path)."""
        self.slicer = slicerApp
        self.allowed = None if allowedFolders is None else limits.resolved_folders(allowedFolders)
        self.logic = AnomalyLocalizerLogic(slicerApp.app_logic)
        self.scan = None  # the volume node on show: the study's first series
        self.scanLabel = ""
        self.series: list[Series] = []  # the study's series, the scan on show first
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
        path = self._checkedPath(path)
        if path.is_dir() and (path / "worklist.json").is_file():
            limits.check_openable(path / "worklist.json")
            return self.openWorklist(path)
        return self.openScan(path)

    def _checkedPath(self, path) -> Path:
        """A typed path that exists, lies in an allowed folder and is a regular file or a
        folder (never read before that is known)."""
        path = Path(str(path).strip()).expanduser()
        if not path.exists():
            raise ViewerError(f"{path} does not exist; give the path of a scan file, a DICOM folder or a "
                              "worklist folder on the server")
        limits.check_allowed(path, self.allowed)
        limits.check_openable(path)
        return path

    def openScan(self, path: str | Path, label: str | None = None) -> str:
        """Open a scan file or DICOM folder as a new study (its first series)."""
        self._requireIdle()
        node, image = self._readSeries(path, label)
        self._replaceScan(node)
        self.logic.worklist, self.logic.worklistIndex = None, -1
        self.scanLabel = node.GetName()
        self.series = [Series(node, node.GetName(), self.logic.contrastGuess(node, lookAtImage=True))]
        return (f"opened {node.GetName()}: {image.GetSize()[0]}x{image.GetSize()[1]}x{image.GetSize()[2]} voxels, "
                f"{self.series[0].recognised.text}")

    def addSeries(self, path: str | Path, label: str | None = None) -> str:
        """Add a scan file or DICOM folder to the study on show as one more series (of the same
        patient, co-registered: the engine resamples it onto the first series' grid when scored
        and refuses it if they do not overlap)."""
        if self.scan is None:
            raise ViewerError("open a scan first; then add the other series of its study")
        if not str(path or "").strip():
            raise ViewerError("no path given; type the path of another series of this study on the server")
        return self._addRead(self._checkedPath(path), label)

    def _addRead(self, path: Path, label: str | None = None) -> str:
        self._requireIdle()
        node, _ = self._readSeries(path, label)
        series = Series(node, node.GetName(), self.logic.contrastGuess(node, lookAtImage=True))
        self.series.append(series)
        return f"added {series.label} to the study: {series.recognised.text}"

    def _readSeries(self, path: str | Path, label: str | None):
        """A volume node of a scan file or DICOM folder (its DICOM header's contrast fields
        kept on it) and the image read."""
        from anomaly_localizer.core.imageio import as_3d, read_image
        from anomaly_localizer.errors import AnomalyLocalizerError

        limits.check_openable(Path(path))
        try:
            image = as_3d(read_image(path, "SCAN"))
        except (AnomalyLocalizerError, OSError, RuntimeError, ValueError) as exc:
            raise ViewerError(one_line(exc)) from None
        name = label or Path(path).name.split(".")[0] or "scan"
        node = imageToVolumeNode(self.logic.scene, image, name)
        setDicomTags(node, image)
        return node, image

    # --- the study's series ----------------------------------------------------------------
    def seriesRows(self) -> list[dict]:
        """The study's series for the page: index, name, contrast (chosen or recognised;
        None: unknown) and how it is known or what the last run did with it."""
        rows = []
        for k, s in enumerate(self.series):
            if s.read:
                how = f"read as {shortName(s.read.get('contrast'))} ({HOW_KNOWN.get(s.read.get('source'), '?')})" + \
                    ("" if s.read.get("used", True) else ", recorded, not used by this model")
            elif s.chosen:
                how = f"chosen; {s.recognised.text}" if s.recognised.contrast else "chosen"
            else:
                how = s.recognised.text
            rows.append({"index": k, "label": s.label, "contrast": s.contrast, "how": how})
        return rows

    def setContrast(self, index: int, contrast: str | None) -> None:
        """Choose the contrast of series ``index``; None or "" goes back to the recognised one."""
        from anomaly_localizer.core.contrast import parse_contrast

        self._requireIdle()
        if not 0 <= int(index) < len(self.series):
            raise ViewerError(f"the study has {len(self.series)} series; there is no series {int(index) + 1}")
        try:
            chosen = parse_contrast(contrast) if contrast else None
        except ValueError as exc:
            raise ViewerError(one_line(exc)) from None
        self.series[int(index)].chosen = chosen

    def removeSeries(self, index: int) -> None:
        """Remove an added series from the study (the first one is the study: open another)."""
        self._requireIdle()
        if not 1 <= int(index) < len(self.series):
            raise ViewerError("only an added series can be removed; open another scan to change the first one")
        series = self.series.pop(int(index))
        self.logic.scene.RemoveNode(series.node)

    def studyInputs(self) -> tuple[list, list[str] | None]:
        """The run's volumes and contrasts: the series in order; their contrasts given when the
        reader chose any (then every series' as shown, which must all be known), else none,
        so that the engine reads each from its DICOM header or recognises it from its image,
        as the page showed it (the engine's rules take all contrasts or none)."""
        nodes = [s.node for s in self.series]
        if not any(s.chosen for s in self.series):
            return nodes, None
        unknown = next((s for s in self.series if s.contrast is None), None)
        if unknown is not None:
            raise ViewerError(f"choose the contrast of {unknown.label} too: a chosen contrast gives every series' "
                              "contrast as shown")
        return nodes, [s.contrast for s in self.series]

    def openUpload(self, fileName: str, content: bytes, add: bool = False) -> str:
        """A file sent from the browser: kept in the session's own folder, then opened like
        a path (a .zip is unpacked there and opened as a DICOM folder); ``add``: as one more
        series of the study on show."""
        if len(content) > MAX_UPLOAD_BYTES:
            raise ViewerError(f"{fileName} is larger than the {MAX_UPLOAD_BYTES // limits.MiB} MB an upload may be")
        if add and self.scan is None:
            raise ViewerError("open a scan first; then add the other series of its study")
        self._requireIdle()
        safe = limits.safe_upload_name(fileName)
        folder = Path(tempfile.mkdtemp(prefix="upload-", dir=self._work))
        try:
            target = folder / safe
            try:
                target.write_bytes(content)
            except OSError as exc:
                raise ViewerError(f"could not keep {safe} on the server ({exc.strerror or one_line(exc)}); "
                                  "nothing was opened") from None
            open_ = self._addRead if add else self.openScan
            if not safe.lower().endswith(".zip"):
                return open_(target, label=safe.split(".")[0])
            try:
                limits.extract_zip(target, folder / "dicom", safe)
            except OSError as exc:
                raise ViewerError(f"could not unpack {safe} on the server ({exc.strerror or one_line(exc)}); "
                                  "nothing was opened") from None
            return open_(series_folder(folder / "dicom"), label=safe[:-4])
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # a file that could not be opened is not kept
            raise

    def openWorklist(self, path: str | Path) -> str:
        self._requireIdle()
        try:
            count = self.logic.openWorklist(path)
        except RecursionError:
            raise ViewerError(f"{path}/worklist.json is nested too deeply to be a worklist; screen again into a "
                              "new folder") from None
        except (ValueError, OSError) as exc:
            raise ViewerError(one_line(exc)) from None
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
            raise ViewerError(one_line(exc)) from None
        if previous is not None and previous is not node:
            self.logic.removeScan(previous)
        self._removeAddedSeries()
        self.scan = node
        self.scanLabel = node.GetName()
        self.series = [Series(node, node.GetName(), self.logic.contrastGuess(node))]  # what it read: _afterResult
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

    def _removeAddedSeries(self) -> None:
        for series in self.series[1:]:
            if self.logic.scene.GetNodeByID(series.node.GetID()) is series.node:
                self.logic.scene.RemoveNode(series.node)
        self.series = self.series[:1]

    def _readOf(self, index: int) -> dict:
        """What the last result recorded of input ``index`` (summary.json's "inputs")."""
        inputs = (self.logic.result.summary.get("inputs") or []) if self.logic.result is not None else []
        return dict(inputs[index]) if index < len(inputs) else {}

    def _replaceScan(self, node) -> None:
        previous, self.scan = self.scan, node
        self.slicer.segmentation_editor.deactivate_effect()  # no brush on the last scan's segmentation
        self._removeAddedSeries()
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
        """Score the study on show (its series, :meth:`studyInputs`) in a child process;
        :meth:`poll` follows it."""
        from anomaly_localizer.errors import AnomalyLocalizerError

        if self.scan is None:
            raise ViewerError("open a scan first")
        self._requireIdle()
        nodes, contrasts = self.studyInputs()
        try:
            self.logic.startRun(nodes, contrasts=contrasts, model=model or None)
        except (AnomalyLocalizerError, ValueError, OSError) as exc:
            raise ViewerError(one_line(exc)) from None
        for series in self.series:
            series.read = {}  # what this run reads is said when it is done
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
            self._status = RunStatus("failed", 0.0, one_line(exc))
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
        """Show the result, say what it read of each series, and hand its segmentation to the
        segment editor (paint, erase)."""
        self.logic.showResult(self.scan)
        for k, series in enumerate(self.series):
            series.read = self._readOf(k)
        self._attachEditor()

    def inputNotes(self) -> list[str]:
        """The engine's notes on the last run's inputs (resampled, looked like another
        contrast than chosen, recorded but not used), one line each."""
        return list(self.logic.result.summary.get("input_notes") or []) if self.hasResult else []

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
        if method not in self.methods():
            raise ViewerError(f"unknown map {method!r}; choose one of {', '.join(self.methods()) or 'none (run first)'}")
        self.logic.setMethod(method)
        self._editsReplaced()

    def setThreshold(self, level: float) -> int:
        """Move the threshold (anomaly levels); returns the segmented voxel count. Manual edits
        are replaced by the threshold's segmentation (as in the Slicer module)."""
        try:
            value = float(level)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise ViewerError(f"the threshold must be a positive anomaly level (e.g. 0.5), not {str(level)[:40]!r}; "
                              "it was left where it was")
        try:
            count = self.logic.setThreshold(value)
        except (TypeError, ValueError) as exc:
            raise ViewerError(one_line(exc)) from None
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
        """Short lines under the threshold: its healthy false-positive rate, the broad-flag note
        if any, and the scan's context (a scan-relative map raised overall) if any."""
        note, context = self.logic.thresholdNote(), self.logic.scanContextNote()
        return "\n".join([self.logic.healthyRateText()] + ([f"Note: {note}"] if note else []) +
                         ([context] if context else []))

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

        if tool not in TOOLS:
            raise ViewerError(f"unknown tool {str(tool)[:40]!r}; choose one of {', '.join(TOOLS)}")
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
            raise ViewerError(one_line(exc)) from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        """End a run in progress (waiting until its process tree has ended, not in a thread
        that may die with the server), empty the views and remove the session's folder."""
        run = self.logic.activeRun
        self.logic.cleanup()
        if run is not None:
            run.wait(30)
            run.cleanup()
        try:
            self.slicer.display_manager.show_volume_in_slice_background(None)
            self.slicer.display_manager.show_volume_in_slice_foreground(None)
        finally:
            shutil.rmtree(self._work, ignore_errors=True)
