"""The browser page: trame widgets wired to a :class:`~.session.ViewerSession`.

Three Slicer slice views (axial, coronal, sagittal) rendered on the server by trame-slicer and
streamed to the page; a side panel to open a scan or worklist, add the other series of its
study and choose each series' contrast, run a model with progress and
cancel, choose the map, move the threshold and opacity, read and centre the findings, paint or
erase the segmentation (with undo) and download it. No decision is made here: each control
calls one session method, and any error of it becomes the red one-line message at the top
(:meth:`ViewerApp._guard`: the page-action boundary catches every exception, logs its
traceback on the server and says one line in the page).
"""

from __future__ import annotations

import asyncio
import logging

from trame.app import TrameApp
from trame.ui.vuetify3 import SinglePageWithDrawerLayout
from trame.widgets import html
from trame.widgets import vuetify3 as v3
from trame_slicer import module as trame_slicer_module
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

from AnomalyLocalizerLib.geometry import screenEdgeLetters
from AnomalyLocalizerLib.inputs import contrastName
from anomaly_localizer.core.contrast import CONTRASTS

from .errors import ViewerError, one_line
from .session import EXPORT_KINDS, ViewerSession, prepareSliceViews

log = logging.getLogger(__name__)
POLL_S = 0.25  # how often a running child run is polled (the page is never blocked by it)
FINDINGS_AFTER_S = 0.3  # findings are counted once the threshold has rested this long
LAYOUT = "anomaly"


class ViewerApp(TrameApp):
    """The viewer's page and its session; ``start()`` serves it."""

    def __init__(self, server=None, host: str = "127.0.0.1", allowedFolders=None, workRoot=None):
        super().__init__(server)
        self.server.enable_module(trame_slicer_module)
        self.slicerApp = SlicerApp()
        register_rca_factories(self.slicerApp.view_manager, self.server, slice_view_ui_f=self._sliceViewUi)
        self.layoutManager = LayoutManager(self.slicerApp.scene, self.slicerApp.view_manager, self.server)
        self.layoutManager.register_layout(LAYOUT, Layout(LayoutDirection.Horizontal, [
            ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.coronal_view(),
            ViewLayoutDefinition.sagittal_view()]))
        self.layoutManager.set_layout(LAYOUT)
        self.session = ViewerSession(self.slicerApp, workRoot=workRoot, allowedFolders=allowedFolders)
        self.host = host
        self._poller: asyncio.Task | None = None
        self._findingsTimer: asyncio.TimerHandle | None = None
        self._initState()
        for signal in self.slicerApp.segmentation_editor.undo_stack.signals():
            signal.connect(self._onUndoChanged)
        self._buildUi()
        self.ctrl.on_server_exited.add(lambda **_: self.session.close())

    def _sliceViewUi(self, server, view_id: str, view) -> None:
        """trame-slicer's own controls of a slice view, and the patient direction at each
        screen edge (R/L, A/P, S/I, from the view's slice-to-RAS matrix)."""
        from trame_slicer.app.ui import create_vertical_slice_view_gutter_ui
        create_vertical_slice_view_gutter_ui(server, view_id, view)
        letters = screenEdgeLetters(self.slicerApp.scene.GetNodeByID(view.get_view_node_id()))
        places = {"left": "left: 6px; top: 50%", "right": "right: 36px; top: 50%",
                  "top": "top: 4px; left: 50%", "bottom": "bottom: 28px; left: 50%"}
        for edge, letter in (letters or {}).items():
            html.Div(letter, classes=f"orientation-letter orientation-{edge}",
                     style=f"position: absolute; {places[edge]}; color: #ffd54f; font: bold 14px sans-serif; "
                           "pointer-events: none; text-shadow: 0 0 2px #000")

    # --- state ---------------------------------------------------------------------------
    def _initState(self) -> None:
        s = self.state
        s.trame__title = "AnomalyLocalizer"
        s.scan_path, s.upload, s.message, s.error = "", None, "Open a scan to begin.", ""
        s.series_path, s.series_upload, s.series, s.input_notes = "", None, [], []
        s.contrast_items = [{"title": "recognised", "value": ""}] + [
            {"title": contrastName(c), "value": c} for c in CONTRASTS]
        s.scan_label, s.worklist_position, s.is_worklist = "", "", False
        s.models = self.session.models()
        s.model = s.models[0]["value"] if s.models else None
        s.running, s.progress, s.run_message = False, 0, ""
        s.has_result, s.methods, s.method = False, [], None
        s.threshold, s.threshold_min, s.threshold_max, s.threshold_note = 1.0, 0.01, 2.0, ""
        s.segmented_voxels, s.opacity, s.findings = 0, 0.6, []
        s.tool, s.can_undo, s.can_redo, s.corrections, s.colour_bar = "none", False, False, 0, ""
        s.export_names = {k: f"anomaly.{k}" for k in EXPORT_KINDS}
        s.listening = "this machine only" if self.host in ("127.0.0.1", "localhost", "::1") else \
            f"other machines too ({self.host})"
        s.change("threshold")(self._onThreshold)
        s.change("opacity")(self._onOpacity)
        s.change("method")(self._onMethod)
        s.change("tool")(self._onTool)
        s.change("upload")(self._onUpload)
        s.change("series_upload")(self._onSeriesUpload)

    def _guard(self, action, *args, clear: bool = True):
        """Run a page action; its error, whatever it is, goes to the page in one line (and None
        comes back): a :class:`ViewerError` as it is, anything else logged with its traceback
        here and said as what failed. ``clear``: a success clears the last error (not for the
        page's own value being put back after a refusal, which would hide it)."""
        try:
            result = action(*args)
            if clear:
                self.state.error = ""
            return result
        except Exception as exc:  # noqa: BLE001 -- the page-action boundary: nothing may go unsaid
            self._say(exc, action)
        return None

    def _say(self, exc: Exception, action) -> None:
        """An action's error in the page, in one line (and its traceback in the log unless it
        is the viewer's own message)."""
        if isinstance(exc, ViewerError):
            self.state.error = one_line(exc)
            return
        name = getattr(action, "__name__", "the action").strip("<>")
        log.error("page action %s failed", name, exc_info=exc)
        self.state.error = f"{name} failed: {one_line(exc)}"[:300]

    def _opened(self, action, *args) -> None:
        """Open something (scan, upload, worklist step) and show it with its result, if any."""
        message = self._guard(action, *args)
        if message:
            self.state.message = message
            self._guard(self._refreshResult, clear=False)

    def _refreshResult(self) -> None:
        """Every result control from the session (after a run, a worklist step, a method)."""
        s, session = self.state, self.session
        s.has_result = session.hasResult
        s.scan_label = session.scanLabel
        s.worklist_position = session.worklistPosition()
        s.is_worklist = bool(s.worklist_position)
        s.export_names = {k: f"{session.scanLabel or 'scan'}-anomaly.{k}" for k in EXPORT_KINDS}
        self._refreshSeries()
        if not session.hasResult:
            s.methods, s.method, s.findings, s.threshold_note, s.tool = [], None, [], "", "none"
            return
        s.methods = session.methods()
        s.method = session.logic.method
        low, high = session.thresholdRange()
        s.threshold_min, s.threshold_max = round(low, 2), round(max(high, low + 0.01), 2)
        s.threshold = round(session.logic.threshold, 2)
        s.segmented_voxels = session.setThreshold(session.logic.threshold)
        s.colour_bar = session.colourBar()["css"]
        self._onThresholdRest()
        session.setOpacity(s.opacity)

    def _refreshSeries(self) -> None:
        """The study's series as the session states them, and the last run's notes on them."""
        self.state.series = [{**row, "contrast": row["contrast"] or ""} for row in self.session.seriesRows()]
        self.state.input_notes = self.session.inputNotes()

    # --- handlers ------------------------------------------------------------------------
    # The page sends the path as typed with the click: a click right after typing must not race
    # the text field's state update (under load it arrived after the click: "no path given").
    def openPath(self, path: str | None = None) -> None:
        self._opened(self.session.open, self.state.scan_path if path is None else path)

    def addSeriesPath(self, path: str | None = None) -> None:
        message = self._guard(self.session.addSeries, self.state.series_path if path is None else path)
        if message:
            self.state.message = message
            self._refreshSeries()

    def _onSeriesUpload(self, series_upload, **_):
        if not series_upload:
            return
        message = self._guard(self._upload, series_upload, True)
        if message:
            self.state.message = message
            self._guard(self._refreshSeries, clear=False)
        self.state.series_upload = None

    def _upload(self, upload, add: bool = False) -> str:
        """The first file the page sent: its name and bytes to the session."""
        item = (upload if isinstance(upload, list) else [upload])[0]
        if not isinstance(item, dict):
            raise ViewerError("the upload arrived without a file; choose the file again")
        content = item.get("content") or b""
        if not isinstance(content, (bytes, bytearray, memoryview)):
            raise ViewerError("the upload arrived without its content; choose the file again")
        return self.session.openUpload(str(item.get("name") or "upload"), bytes(content), add)

    def setContrast(self, index: int, contrast: str) -> None:
        self._guard(self.session.setContrast, index, contrast or None)
        self._guard(self._refreshSeries, clear=False)

    def removeSeries(self, index: int) -> None:
        self._guard(self.session.removeSeries, index)
        self._guard(self._refreshSeries, clear=False)

    def _onUpload(self, upload, **_):
        if not upload:
            return
        self._opened(self._upload, upload)
        self.state.upload = None

    def step(self, delta: int) -> None:
        self._opened(lambda: self.session.stepWorklist(self.session.logic.worklistIndex + int(delta)))

    def run(self) -> None:
        if self._guard(self.session.start, self.state.model) is None and self.state.error:
            return
        self.state.error = ""
        self.state.running, self.state.progress, self.state.run_message = True, 0, "starting"
        if self._poller is None or self._poller.done():
            self._poller = asyncio.ensure_future(self._follow())

    def cancel(self) -> None:
        self._guard(self.session.cancel)

    async def _follow(self) -> None:
        """Poll the child run until it ends; the page stays live meanwhile. Whatever goes wrong
        while following is said in the page, and the page stops saying "running"."""
        try:
            await self._followRun()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 -- the task's boundary: a page left "running" hides it
            with self.state:
                self.state.running = False
                self._say(exc, self._follow)

    async def _followRun(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            status = self.session.poll()
            with self.state:
                self.state.progress = round(100 * status.progress)
                self.state.run_message = status.message
                if status.state == "running":
                    continue
                self.state.running = False
                if status.state == "failed":
                    self.state.error = status.message
                elif status.state == "done":
                    self.state.error = ""
                    self.state.message = f"{self.session.scanLabel}: done"
                    self._refreshResult()
                else:
                    self.state.message = status.message
                return

    def _onThreshold(self, threshold, **_):
        if not self.session.hasResult or threshold is None:
            return
        count = self._guard(self.session.setThreshold, threshold, clear=False)
        if count is None:  # refused: the page shows the threshold the segmentation has
            self.state.threshold = round(self.session.logic.threshold, 2)
            return
        self.state.segmented_voxels = count
        self.state.threshold_note = self._guard(self.session.thresholdNote, clear=False) or ""
        self._findingsSoon()

    def _findingsSoon(self) -> None:
        """Count the findings once the threshold has rested (a connected-component pass per
        move would lag): whatever moved it, mouse, keyboard or another control."""
        if self._findingsTimer is not None:
            self._findingsTimer.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no server loop (opened at start): count now
            self._onThresholdRest()
            return
        self._findingsTimer = loop.call_later(FINDINGS_AFTER_S, self._findingsRested)

    def _findingsRested(self) -> None:
        self._findingsTimer = None
        with self.state:
            self._onThresholdRest()

    def _onThresholdRest(self, *_):
        """Findings are counted when the slider rests (a connected-component pass)."""
        self.state.findings = self._guard(self.session.findings, clear=False) or []

    def _onOpacity(self, opacity, **_):
        if self.session.hasResult:
            self._guard(self.session.setOpacity, opacity)

    def _onMethod(self, method, **_):
        if self.session.hasResult and method and method != self.session.logic.method:
            self._guard(self.session.setMethod, method)
            self._guard(self._refreshResult, clear=False)

    def _onTool(self, tool, **_):
        try:
            self.session.setTool(tool or "none")
        except Exception as exc:  # noqa: BLE001 -- said in the page; the page's tool goes back to none
            self._say(exc, self.session.setTool)
            self.state.tool = "none"

    def centre(self, rank: int) -> None:
        self._guard(self._centre, rank)

    def _centre(self, rank: int) -> None:
        for finding in self.session.logic.findings():
            if finding["rank"] == rank:
                self.session.centreOn(finding)

    def _onUndoChanged(self, *_):
        """Corrections (paint, erase strokes) and the undo stack change on the server: the
        page's undo and redo buttons and the count follow."""
        undo = self.slicerApp.segmentation_editor.undo_stack
        with self.state:
            self.state.can_undo, self.state.can_redo = undo.can_undo(), undo.can_redo()
            self.state.corrections = undo.index()

    def undo(self) -> None:
        self._guard(self.session.undo)

    def redo(self) -> None:
        self._guard(self.session.redo)

    def export(self, kind: str):
        """The file's bytes as a download for the page (utils.download)."""
        exported = self._guard(self.session.export, kind)
        if exported is None:
            return None
        return self.server.protocol.addAttachment(exported[1])

    # --- page ----------------------------------------------------------------------------
    def _buildUi(self) -> None:
        with SinglePageWithDrawerLayout(self.server, theme="dark") as layout:
            layout.title.set_text("AnomalyLocalizer")
            with layout.toolbar:
                v3.VSpacer()
                html.Div("{{ scan_label }} {{ worklist_position ? '(' + worklist_position + ')' : '' }}",
                         classes="text-body-2 mr-4", id="scan-label")
                html.Div("served to {{ listening }}", classes="text-caption mr-4", id="listening")
            with layout.drawer as drawer:
                drawer.width = 380
                self._panel()
            with layout.content:
                with v3.VContainer(fluid=True, classes="fill-height pa-0"):
                    self.layoutManager.initialize_layout_grid(layout)
        prepareSliceViews(self.slicerApp.view_manager.get_slice_views())

    def _panel(self) -> None:
        with v3.VContainer(classes="pa-3"):
            v3.VAlert(v_if="error", type="error", density="compact", text=("error",), id="error",
                      classes="mb-2", closable=True, click_close="error = ''")
            html.Div("{{ message }}", classes="text-caption mb-2", id="message")
            v3.VTextField(v_model=("scan_path",), label="Scan, DICOM folder or worklist on the server",
                          density="compact", hide_details=True, id="scan-path",
                          keyup_enter=(self.openPath, "[scan_path]"))
            with html.Div(classes="d-flex my-2"):
                v3.VBtn("Open", click=(self.openPath, "[scan_path]"), id="open", size="small", disabled=("running",))
                v3.VSpacer()
                v3.VBtn("Previous", click=(self.step, "[-1]"), v_if="is_worklist", size="small", id="previous")
                v3.VBtn("Next", click=(self.step, "[1]"), v_if="is_worklist", size="small", id="next")
            v3.VFileInput(v_model=("upload",), label="or upload a scan (.nii.gz, .nrrd, .mha; DICOM as .zip)",
                          density="compact", hide_details=True, id="upload", disabled=("running",))
            self._seriesPanel()
            v3.VDivider(classes="my-3")
            v3.VSelect(v_model=("model",), items=("models",), label="Model", density="compact", hide_details=True,
                       id="model", disabled=("running",))
            with html.Div(classes="d-flex my-2"):
                v3.VBtn("Run", click=self.run, disabled=("running || !scan_label",), color="primary", size="small",
                        id="run")
                v3.VBtn("Cancel", click=self.cancel, v_if="running", size="small", classes="ml-2", id="cancel")
            v3.VProgressLinear(v_if="running", model_value=("progress",), height=6, id="progress")
            html.Div("{{ run_message }}", v_if="running", classes="text-caption")
            html.Div("{{ note }}", v_for="(note, k) in input_notes", key="k", classes="text-caption text-warning",
                     id="input-notes")
            with html.Div(v_if="has_result"):
                v3.VDivider(classes="my-3")
                v3.VSelect(v_model=("method",), items=("methods",), label="Map", density="compact",
                           hide_details=True, id="method")
                html.Div("Threshold: anomaly level {{ threshold }} ({{ segmented_voxels }} voxels)",
                         classes="text-body-2 mt-3", id="threshold-label")
                with html.Div(id="threshold"):
                    v3.VSlider(v_model=("threshold",), min=("threshold_min",), max=("threshold_max",), step=0.01,
                               hide_details=True, density="compact", end=self._onThresholdRest)
                html.Div("{{ threshold_note }}", classes="text-caption", id="threshold-note",
                         style="white-space: pre-line")
                self._colourBar()
                html.Div("Heatmap opacity", classes="text-body-2 mt-3")
                with html.Div(id="opacity"):
                    v3.VSlider(v_model=("opacity",), min=0, max=1, step=0.05, hide_details=True, density="compact")
                html.Div("Findings (largest peak first; click to centre)", classes="text-body-2 mt-3")
                with v3.VList(density="compact", id="findings", classes="py-0"):
                    v3.VListItem(v_for="f in findings", key="f.rank", click=(self.centre, "[f.rank]"),
                                 classes="text-caption py-0", min_height=24, children=["{{ f.text }}"])
                html.Div("none at this threshold", v_if="!findings.length", classes="text-caption")
                html.Div("Correct the segmentation (moving the threshold replaces corrections)",
                         classes="text-body-2 mt-3")
                with html.Div(classes="d-flex align-center"):
                    with v3.VBtnToggle(v_model=("tool",), density="compact", mandatory=True, id="tool"):
                        v3.VBtn("View", value="none", size="small", id="tool-none")
                        v3.VBtn("Paint", value="paint", size="small", id="tool-paint")
                        v3.VBtn("Erase", value="erase", size="small", id="tool-erase")
                    v3.VBtn(icon="mdi-undo", click=self.undo, size="small", variant="text", id="undo",
                            disabled=("!can_undo",))
                    v3.VBtn(icon="mdi-redo", click=self.redo, size="small", variant="text", id="redo",
                            disabled=("!can_redo",))
                html.Div("{{ corrections }} correction(s) since the last threshold move", classes="text-caption",
                         id="corrections")
                html.Div("Download the segmentation", classes="text-body-2 mt-3")
                exportTrigger = self.server.trigger_name(self.export)  # the page asks for the file's bytes
                with html.Div(classes="d-flex"):
                    for kind, what in EXPORT_KINDS.items():
                        v3.VBtn(what, size="small", classes="mr-2", id=f"export-{kind.replace('.', '-')}",
                                click=f"utils.download(export_names['{kind}'], trigger('{exportTrigger}', "
                                      f"['{kind}']), 'application/octet-stream')")

    def _seriesPanel(self) -> None:
        """The study's series, each with its contrast (recognised, or chosen here), and the
        controls that add another series of the same study."""
        with html.Div(v_if="series.length", classes="mt-3", id="series"):
            html.Div("Series of this study (the first is shown; the maps are on its grid)", classes="text-body-2")
            with html.Div(v_for="s in series", key="s.index", classes="mt-2 series-row",
                          id=("`series-${s.index}`",)):
                with html.Div(classes="d-flex align-center"):
                    html.Span("{{ s.label }}", classes="text-body-2 mr-2 series-label")
                    v3.VSelect(model_value=("s.contrast",), items=("contrast_items",), label="Contrast",
                               density="compact", hide_details=True, disabled=("running",), classes="series-contrast",
                               id=("`contrast-${s.index}`",),
                               update_modelValue=(self.setContrast, "[s.index, $event]"))
                    v3.VBtn(icon="mdi-close", v_if="s.index > 0", size="small", variant="text",
                            click=(self.removeSeries, "[s.index]"), disabled=("running",),
                            id=("`remove-series-${s.index}`",))
                html.Div("{{ s.how }}", classes="text-caption series-how")
            v3.VTextField(v_model=("series_path",), label="Add another series of this study (path on the server)",
                          density="compact", hide_details=True, id="series-path", classes="mt-2",
                          keyup_enter=(self.addSeriesPath, "[series_path]"), disabled=("running",))
            with html.Div(classes="d-flex my-2"):
                v3.VBtn("Add series", click=(self.addSeriesPath, "[series_path]"), id="add-series", size="small",
                        disabled=("running",))
            v3.VFileInput(v_model=("series_upload",), label="or upload another series", density="compact",
                          hide_details=True, id="series-upload", disabled=("running",))

    def _colourBar(self) -> None:
        with html.Div(classes="mt-2", id="colour-bar"):
            html.Div(style=("{background: colour_bar, height: '12px', borderRadius: '2px'}",))
            with html.Div(classes="d-flex text-caption"):
                html.Span("0")
                v3.VSpacer()
                html.Span("anomaly level; shown from the threshold up")
                v3.VSpacer()
                html.Span("1 and above")


def serve(paths: list[str], host: str, port: int, secret: str, model: str | None = None,
          allowedFolders: list[str] | None = None, allowedOrigins: list[str] = (), workRoot: str | None = None,
          idleTimeout: int = 15, verbose: bool = False) -> None:
    """One reader's page: build it, open the given scan or worklist, and serve it until its
    page has been gone ``idleTimeout`` seconds (or the process is asked to stop). The
    WebSocket takes its own page's origin (or ``allowedOrigins``) and ``secret`` only."""
    from .wsguard import install

    install(list(allowedOrigins))  # before the server is made: it reads the message bound
    if not verbose:
        # VTK's warnings about its own deprecations in trame-slicer's views say nothing to a reader
        from vtkmodules.vtkCommonCore import vtkObject
        vtkObject.GlobalWarningDisplayOff()
    app = ViewerApp(host=host, allowedFolders=allowedFolders, workRoot=workRoot)
    if model:  # checked by the command: an installed model
        app.state.model = model
    if paths:
        app.state.scan_path = paths[0]
        app.openPath()
    app.server.cli.set_defaults(authKey=secret)  # never wslink's public default
    app.server.start(port=port, host=host, open_browser=False, show_connection_info=False, timeout=idleTimeout)
