"""The viewer's session against real Slicer classes (trame-slicer's SlicerApp with offscreen
slice views, no browser): opening, runs in a child process, cancel, worklists, uploads,
corrections with undo, downloads, and that nothing on the server is written or overwritten."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from viewer_helpers import make_viewer_model, write_flair_phantom, write_phantom


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("viewer-models")
    make_viewer_model(root)
    return root


@pytest.fixture()
def session(models, monkeypatch, tmp_path):
    monkeypatch.setenv("ANOMALY_LOCALIZER_MODELS", str(models))
    monkeypatch.setenv("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    from trame_slicer.core import SlicerApp
    from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition

    from anomaly_localizer_viewer.session import ViewerSession
    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    views = [app.view_manager.create_view(d) for d in (ViewLayoutDefinition.axial_view(),
                                                        ViewLayoutDefinition.coronal_view())]
    s = ViewerSession(app, workRoot=tmp_path)
    s.views = views
    yield s
    s.close()


def run(session, timeout: float = 120.0) -> str:
    session.start("tiny")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = session.poll()
        if status.state != "running":
            return status.state
        time.sleep(0.1)
    raise AssertionError("the run did not end")


def exported_voxels(session) -> int:
    name, data = session.export("nii.gz")
    path = Path(session._work) / f"check-{time.monotonic_ns()}-{name}"
    path.write_bytes(data)
    try:
        return int(np.count_nonzero(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))))
    finally:
        path.unlink()


def stroke(view, points) -> None:
    """A left-button drag through ``points`` (display pixels) in a slice view, as the page's
    mouse events reach it."""
    interactor = view.interactor()
    for i, (x, y) in enumerate(points):
        interactor.SetEventPosition(x, y)
        interactor.InvokeEvent("MouseMoveEvent")
        if i == 0:
            interactor.InvokeEvent("LeftButtonPressEvent")
    interactor.InvokeEvent("LeftButtonReleaseEvent")


def test_what_cannot_be_opened_is_said_in_one_line_and_changes_nothing(session, tmp_path):
    from anomaly_localizer_viewer.session import ViewerError
    nodes = session.logic.scene.GetNumberOfNodes()
    with pytest.raises(ViewerError, match="does not exist"):
        session.open(tmp_path / "missing.nii.gz")
    with pytest.raises(ViewerError, match="no path given"):
        session.open("  ")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ViewerError) as info:
        session.open(text)
    assert "\n" not in str(info.value) and "notes.txt" in str(info.value)
    with pytest.raises(ViewerError, match="open a scan first"):
        session.start("tiny")
    with pytest.raises(ViewerError, match="run the analysis first"):
        session.export("nii.gz")
    assert session.logic.scene.GetNumberOfNodes() == nodes and session.scan is None


def test_a_run_puts_its_result_in_the_scene_and_hands_the_segmentation_to_the_editor(session, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    scan = write_phantom(scans)
    assert session.open(scan).startswith("opened phantom")
    assert run(session) == "done"
    assert session.hasResult and "rec" in session.methods()
    start = session.setThreshold(session.logic.threshold)
    assert start > 0 and exported_voxels(session) == start
    assert "healthy brain voxels" in session.thresholdNote()
    findings = session.findings()
    assert findings and "mL" in findings[0]["text"]
    peak = session.centreOn(session.logic.findings()[0])
    offsets = {view.get_orientation(): view.get_slice_value() for view in session.views}
    assert offsets["Axial"] == pytest.approx(peak[2]) and offsets["Coronal"] == pytest.approx(peak[1])
    assert session.setThreshold(session.logic.threshold * 2) < start
    name, data = session.export("seg.nrrd")
    assert name == "phantom-anomaly.seg.nrrd" and len(data) > 0
    assert sorted(p.name for p in scans.iterdir()) == ["phantom.nrrd"]  # nothing written beside the scan
    assert session.logic.scene.GetNodeByID(session.slicer.segmentation_editor.active_segmentation_node.GetID())


def test_paint_erase_and_undo_change_what_is_downloaded(session, tmp_path):
    session.open(write_phantom(tmp_path))
    assert run(session) == "done"
    start = session.setThreshold(session.logic.threshold)
    view = session.views[0]
    view.render_window().SetSize(300, 300)
    view.render()
    session.setTool("paint")
    stroke(view, [(x, 80) for x in range(90, 220, 10)])
    painted = exported_voxels(session)
    assert painted > start
    session.undo()
    assert exported_voxels(session) == start
    session.redo()
    assert exported_voxels(session) == painted
    session.setThreshold(session.logic.threshold)  # the threshold's segmentation replaces corrections
    assert exported_voxels(session) == start and not session.slicer.segmentation_editor.undo_stack.can_undo()
    session.setTool("none")


def test_one_run_at_a_time_and_cancel_leaves_the_scan_as_it_was(session, tmp_path):
    from anomaly_localizer_viewer.session import ViewerError
    session.open(write_phantom(tmp_path))
    nodes = session.logic.scene.GetNumberOfNodes()
    session.start("tiny")
    with pytest.raises(ViewerError, match="in progress"):
        session.start("tiny")
    with pytest.raises(ViewerError, match="in progress"):
        session.open(write_phantom(tmp_path, "other.nrrd"))
    session.cancel()
    assert session.poll().state == "cancelled"
    assert session.logic.scene.GetNumberOfNodes() == nodes and not session.hasResult


def test_an_upload_is_kept_in_the_session_folder_which_closing_removes(session, tmp_path):
    scan = write_phantom(tmp_path, "sent.nrrd")
    assert session.openUpload("../../sent.nrrd", scan.read_bytes()).startswith("opened sent")
    kept = list(Path(session._work).rglob("sent.nrrd"))
    assert len(kept) == 1 and Path(session._work) in kept[0].parents
    work = Path(session._work)
    session.close()
    assert not work.exists()


def test_a_worklist_opens_at_its_most_anomalous_scan_and_steps_in_rank_order(session, models, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    write_phantom(scans, "a.nrrd", lesion=False, seed=1)
    write_phantom(scans, "b.nrrd", lesion=True, seed=2)
    out = tmp_path / "worklist"
    r = subprocess.run([sys.executable, "-m", "anomaly_localizer.cli", "screen", str(scans), "--out", str(out),
                        "--model", "tiny", "--workers", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "2 screened scans" in session.open(out)
    assert session.worklistPosition().startswith("scan 1 of 2: b") and session.hasResult
    first = session.scan
    assert session.stepWorklist(1).startswith("scan 2 of 2: a")
    assert session.logic.scene.GetNodeByID(first.GetID()) is None  # one scan in the scene at a time
    from anomaly_localizer_viewer.session import ViewerError
    with pytest.raises(ViewerError, match="there is no scan 3"):
        session.stepWorklist(2)


def test_the_model_list_offers_anomaly_models_only(session):
    names = [m["value"] for m in session.models()]
    assert "tiny" in names and "brain-extraction-unet" not in names


def test_the_command_refuses_what_cannot_work_before_serving(tmp_path, capsys):
    import socket

    from anomaly_localizer.cli import main
    assert main(["view", str(tmp_path / "missing.nii.gz")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["view", "--port", "70000"]) == 2
    assert "not a port number" in capsys.readouterr().err
    assert main(["view", "--host", "example.org"]) == 2
    assert "not an IP address" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["view", "--port", str(busy.getsockname()[1])]) == 2
        assert "choose another port" in capsys.readouterr().err
    assert main(["view", "--model", "no-such-model"]) == 2
    assert "not an installed model" in capsys.readouterr().err
    for flag, value in (("--max-sessions", "0"), ("--idle-timeout", "0")):
        assert main(["view", flag, value]) == 2
        assert f"{flag} 0 is out of range" in capsys.readouterr().err


def test_a_dicom_folder_and_an_uploaded_zip_of_one_open(session, tmp_path):
    import zipfile

    from phantoms import phantom_array, write_dicom_series
    series = tmp_path / "series"
    series.mkdir()
    write_dicom_series(phantom_array(lesion=True).astype("int16"), series)
    assert session.open(series).startswith("opened series")
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(series.iterdir()):
            z.write(f, f"export/{f.name}")
    assert session.openUpload("series.zip", archive.read_bytes()).startswith("opened series")
    assert session.scan.GetImageData().GetDimensions() == (40, 48, 30)


def test_a_study_of_two_series_is_scored_with_each_series_contrast(session, tmp_path):
    """A T1 and a FLAIR of one study: each contrast recognised when opened and shown; scored
    as recognised, then with a contrast chosen; the T1 model reads the T1 and records the FLAIR
    unused; an added series can be removed, and opening another study removes it."""
    from anomaly_localizer_viewer.session import ViewerError
    t1 = write_phantom(tmp_path, "t1.nrrd")
    flair = write_flair_phantom(tmp_path, "flair.nrrd")
    with pytest.raises(ViewerError, match="open a scan first"):
        session.addSeries(flair)
    assert "T1 by its image" in session.open(t1)
    assert "FLAIR by its image" in session.addSeries(flair)
    assert [(r["label"], r["contrast"]) for r in session.seriesRows()] == [("t1", "t1"), ("flair", "flair")]
    assert session.studyInputs()[1] is None  # nothing chosen: the engine recognises each, as shown
    assert run(session) == "done"
    rows = session.seriesRows()
    assert rows[0]["how"] == "read as T1 (recognised from its image)"
    assert rows[1]["how"] == "read as FLAIR (recognised from its image), recorded, not used by this model"
    assert session.inputNotes() == ["flair (flair) is recorded but not used: model tiny reads t1"]
    assert session.logic.inputVolume() is session.scan  # the maps are the first series'

    # a contrast chosen gives every series' contrast as shown; the reader's word wins, noted
    session.setContrast(1, "T2")
    assert session.studyInputs()[1] == ["t1", "t2"] and session.seriesRows()[1]["contrast"] == "t2"
    with pytest.raises(ViewerError, match="unknown contrast"):
        session.setContrast(1, "dwi")
    assert run(session) == "done"
    assert session.seriesRows()[1]["how"] == "read as T2 (chosen), recorded, not used by this model"
    assert any("was given as T2 but looks like FLAIR" in note for note in session.inputNotes())
    session.setContrast(1, None)
    assert session.seriesRows()[1]["contrast"] == "flair"

    with pytest.raises(ViewerError, match="only an added series"):
        session.removeSeries(0)
    removed = session.series[1].node
    session.removeSeries(1)
    assert session.logic.scene.GetNodeByID(removed.GetID()) is None and len(session.series) == 1
    added = session.addSeries(flair) and session.series[1].node
    session.open(t1)
    assert len(session.series) == 1 and session.logic.scene.GetNodeByID(added.GetID()) is None


def test_page_values_and_uploads_that_cannot_be_used_are_refused_in_one_line(session, tmp_path, monkeypatch):
    """A 300-character upload name is shortened and opens; a full disk during an upload, a
    worklist nested 200,000 levels deep, a threshold of -1 or "abc", an unknown map or tool
    are each refused in one line, and the threshold stays where it was."""
    import errno

    from anomaly_localizer_viewer.session import ViewerError
    scan = write_phantom(tmp_path, "sent.nrrd")
    assert session.openUpload("n" * 300 + ".nrrd", scan.read_bytes()).startswith("opened nnn")
    assert all(len(p.name) <= 100 for p in Path(session._work).rglob("*"))
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "worklist.json").write_text("[" * 200000 + "]" * 200000)
    with pytest.raises(ViewerError, match="nested too deeply"):
        session.open(deep)

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(Path, "write_bytes", full)
        with pytest.raises(ViewerError, match="No space left on device"):
            session.openUpload("other.nrrd", scan.read_bytes())
    assert run(session) == "done"
    level = session.logic.threshold
    for bad in (-1, "abc", float("nan"), None):
        with pytest.raises(ViewerError, match="positive anomaly level"):
            session.setThreshold(bad)
    assert session.logic.threshold == level
    with pytest.raises(ViewerError, match="unknown map"):
        session.setMethod("no-such-map")
    with pytest.raises(ViewerError, match="unknown tool"):
        session.setTool("scalpel")


def test_paths_open_only_from_the_given_folders_and_only_files_and_folders(models, monkeypatch, tmp_path):
    """Opening by path, with the folders the server was given: outside them (also through a
    link) refused; a FIFO refused without being opened; a zip bomb and a zip with a link
    refused before anything is unpacked beyond the bounds."""
    import os
    import zipfile

    from anomaly_localizer_viewer import limits
    from anomaly_localizer_viewer.errors import ViewerError
    given, elsewhere = tmp_path / "given", tmp_path / "elsewhere"
    given.mkdir(), elsewhere.mkdir()
    inside, outside = write_phantom(given, "in.nrrd"), write_phantom(elsewhere, "out.nrrd")
    (given / "link.nrrd").symlink_to(outside)
    folders = limits.resolved_folders([given])
    assert limits.check_allowed(inside, folders) == inside.resolve()
    for path in (outside, given / "link.nrrd", given / ".." / "elsewhere" / "out.nrrd"):
        with pytest.raises(ViewerError, match="not in a folder this viewer may open"):
            limits.check_allowed(path, folders)
    os.mkfifo(given / "pipe")
    with pytest.raises(ViewerError, match="not a regular file or a folder"):
        limits.check_openable(given / "pipe")
    with pytest.raises(ViewerError, match="holds pipe, which is not a regular file"):
        limits.check_openable(given)
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as z:
        for k in range(limits.MAX_MEMBERS + 1):
            z.writestr(f"s/{k}.dcm", b"")
    with pytest.raises(ViewerError, match="more than the 10000"):
        limits.extract_zip(many, tmp_path / "x", "many.zip")
    monkeypatch.setattr(limits, "MAX_EXTRACTED_BYTES", 1024 ** 2)
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("s/zeros.dcm", bytes(2 * 1024 ** 2))
    with pytest.raises(ViewerError, match="unpacks to 2 MB, more than the 1 MB"):
        limits.extract_zip(bomb, tmp_path / "y", "bomb.zip")
    assert not (tmp_path / "y").exists()
    assert limits.safe_upload_name("../" + "a" * 300 + ".nii.gz").endswith(".nii.gz")
    assert len(limits.safe_upload_name("a" * 300 + ".nii.gz")) == limits.MAX_NAME_CHARS


def test_an_error_while_following_a_run_is_said_and_the_page_stops_running(tmp_path, monkeypatch):
    """The follow task is the page's boundary too (issue 39): a poll that fails does not leave
    the page saying "running"."""
    import asyncio
    from trame.app import get_server
    from anomaly_localizer_viewer import app as viewer_app

    page = viewer_app.ViewerApp(get_server("follow-guard", client_type="vue3"), workRoot=tmp_path)
    try:
        def broken_poll():
            raise RuntimeError("the child's status file vanished")
        monkeypatch.setattr(page.session, "poll", broken_poll)
        monkeypatch.setattr(viewer_app, "POLL_S", 0.01)
        page.state.running = True
        # its own event loop in its own thread: another test's loop may be running in this one
        import threading
        follower = threading.Thread(target=lambda: asyncio.run(page._follow()))
        follower.start()
        follower.join(30)
        assert page.state.running is False
        assert "the child's status file vanished" in page.state.error and "\n" not in page.state.error
    finally:
        page.session.close()
