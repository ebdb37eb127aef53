"""The browser viewer's page in headless Chromium: ``anomaly-localizer view`` serving a phantom
with a tiny model; open, run, threshold, findings, paint, erase, undo, download, bad input,
and the look of the axial view against a reference picture."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from viewer_helpers import (Server, download, make_viewer_model, open_page, run_and_wait, view_pixels, voxels,
                            wait_for_change, write_flair_phantom, write_phantom)

REFERENCE = Path(__file__).parent / "reference"
# Mean absolute difference (0-255 scale) allowed against the reference picture: renders differ
# slightly between Mesa builds and in the streamed image's compression.
TOLERANCE = 6.0


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("viewer")
    make_viewer_model(root / "models")
    scans = root / "scans"
    scans.mkdir()
    scan = write_phantom(scans)
    server = Server([str(scan), "--model", "tiny"], models=root / "models")
    yield server, root, scans
    server.stop()


def labelled_voxels(path: Path) -> int:
    return int(np.count_nonzero(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))))


def test_the_server_says_where_it_listens_and_for_whom(served):
    server, _, _ = served
    assert server.first_line.startswith(f"AnomalyLocalizer viewer: http://127.0.0.1:{server.port}/")
    assert "this machine only" in server.first_line


def test_run_threshold_findings_paint_undo_and_download(served, browser, tmp_path):
    server, _, scans = served
    before_files = sorted(p.name for p in scans.iterdir())
    page = open_page(browser, server.url)
    assert "served to this machine only" in page.inner_text("#listening")
    # each slice view says the patient direction at its edges (axial, coronal, sagittal)
    assert [page.locator(".orientation-left").nth(i).inner_text() for i in range(3)] == ["R", "R", "A"]
    assert [page.locator(".orientation-top").nth(i).inner_text() for i in range(3)] == ["A", "S", "S"]
    blank = view_pixels(page)
    run_and_wait(page)
    start = voxels(page)
    assert start > 0
    shown = wait_for_change(page, blank)

    # the picture: the heatmap and segmentation over the phantom, as the reference shows them
    REFERENCE.mkdir(exist_ok=True)
    reference = REFERENCE / "axial-after-run.png"
    from PIL import Image
    if os.environ.get("ANOMALY_LOCALIZER_UPDATE_REFERENCE") == "1":
        Image.fromarray(shown.astype(np.uint8)).save(reference)
    assert reference.exists(), "no reference picture: run once with ANOMALY_LOCALIZER_UPDATE_REFERENCE=1 and look at it"
    expected = np.asarray(Image.open(reference).convert("RGB"), dtype=np.int16)
    assert expected.shape == shown.shape
    assert np.abs(expected - shown).mean() < TOLERANCE

    # the threshold slider: the segmentation follows it (fewer voxels higher up), and the view too
    thumb = page.locator("#threshold .v-slider-thumb")
    thumb.focus()
    for _ in range(25):
        page.keyboard.press("ArrowRight")
    page.wait_for_function(f"() => !document.querySelector('#threshold-label').innerText.includes('({start} voxels)')")
    raised = voxels(page)
    assert raised < start
    wait_for_change(page, shown)
    for _ in range(25):
        page.keyboard.press("ArrowLeft")
    page.wait_for_function(f"() => document.querySelector('#threshold-label').innerText.includes('({start} voxels)')")

    # findings: the seeded lesion is listed; a click centres the views on it
    page.locator("#findings .v-list-item").first.wait_for(timeout=20000)
    assert "mL" in page.locator("#findings .v-list-item").first.inner_text()
    page.locator("#findings .v-list-item").first.click()

    # downloads: the segmentation as shown, as NIfTI and as .seg.nrrd
    first = download(page, "#export-nii-gz", tmp_path)
    assert first.name == "phantom-anomaly.nii.gz" and labelled_voxels(first) == start
    seg = download(page, "#export-seg-nrrd", tmp_path)
    assert seg.name == "phantom-anomaly.seg.nrrd" and seg.stat().st_size > 0

    # paint a stroke across the axial view: the exported segmentation grows; undo restores it
    page.click("#tool-paint")
    area = page.locator(".remote-controlled-area").first
    box = area.bounding_box()
    y = box["y"] + 0.7 * box["height"]
    page.mouse.move(box["x"] + 0.3 * box["width"], y)
    page.mouse.down()
    for step in range(1, 11):
        page.mouse.move(box["x"] + (0.3 + 0.04 * step) * box["width"], y)
    page.mouse.up()
    page.wait_for_selector("#undo:not([disabled])")  # the stroke is applied on the server
    assert "1 correction" in page.inner_text("#corrections")
    painted = tmp_path / "painted"
    painted.mkdir()
    grown = labelled_voxels(download(page, "#export-nii-gz", painted))
    assert grown > start
    page.click("#undo")
    page.wait_for_selector("#undo[disabled]")
    undone = tmp_path / "undone"
    undone.mkdir()
    assert labelled_voxels(download(page, "#export-nii-gz", undone)) == start

    # erase over the lesion's centre: fewer voxels
    page.click("#tool-erase")
    page.locator("#findings .v-list-item").first.click()  # the views are centred on the top finding
    page.mouse.move(box["x"] + 0.5 * box["width"], box["y"] + 0.5 * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + 0.52 * box["width"], box["y"] + 0.5 * box["height"])
    page.mouse.up()
    page.wait_for_selector("#undo:not([disabled])")
    erased = tmp_path / "erased"
    erased.mkdir()
    assert labelled_voxels(download(page, "#export-nii-gz", erased)) < start
    page.click("#tool-none")

    # nothing was written next to the scan on the server
    assert sorted(p.name for p in scans.iterdir()) == before_files
    page.close()


def test_bad_input_is_answered_in_the_page_in_one_line(served, browser, tmp_path):
    server, root, scans = served
    page = open_page(browser, server.url)
    page.fill("#scan-path", str(root / "no-such-scan.nii.gz"))
    page.click("#open")
    page.wait_for_selector("#error")
    message = page.inner_text("#error")
    assert "does not exist" in message and "\n" not in message.strip()
    not_an_image = scans / "notes.txt"
    not_an_image.write_text("not an image")
    try:
        page.fill("#scan-path", str(not_an_image))
        page.click("#open")
        page.wait_for_function("() => document.querySelector('#error') && "
                               "!document.querySelector('#error').innerText.includes('does not exist')")
        assert "notes.txt" in page.inner_text("#error")
    finally:
        not_an_image.unlink()
    page.close()


def test_an_uploaded_scan_opens_and_runs(served, browser, tmp_path):
    server, _, _ = served
    sent = write_phantom(tmp_path, "sent.nrrd", seed=3)
    page = open_page(browser, server.url)
    page.locator("input#upload").set_input_files(str(sent))  # not #series-upload
    page.wait_for_function("() => document.querySelector('#message').innerText.startsWith('opened sent')")
    assert "sent" in page.inner_text("#scan-label")
    run_and_wait(page)
    assert voxels(page) > 0
    page.close()


def test_a_worklist_opens_at_its_most_anomalous_scan_and_steps_with_next_and_previous(served, browser, tmp_path):
    import subprocess
    import sys
    _, root, _ = served
    scans = tmp_path / "scans"
    scans.mkdir()
    write_phantom(scans, "calm.nrrd", lesion=False, seed=1)
    write_phantom(scans, "lesioned.nrrd", lesion=True, seed=2)
    worklist = tmp_path / "worklist"
    env = dict(os.environ, ANOMALY_LOCALIZER_MODELS=str(root / "models"))
    r = subprocess.run([sys.executable, "-m", "anomaly_localizer.cli", "screen", str(scans), "--out", str(worklist),
                        "--model", "tiny", "--workers", "1"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    server = Server([str(worklist)], models=root / "models")
    try:
        page = open_page(browser, server.url)
        page.wait_for_selector("#threshold-label")  # the worklist's results are shown, not recomputed
        assert "scan 1 of 2: lesioned" in page.inner_text("#scan-label")
        page.click("#next")
        page.wait_for_function("() => document.querySelector('#scan-label').innerText.includes('scan 2 of 2: calm')")
        page.click("#previous")
        page.wait_for_function("() => document.querySelector('#scan-label').innerText.includes('scan 1 of 2')")
        page.close()
    finally:
        server.stop()


def test_two_series_of_a_study_open_with_their_contrasts_and_run(served, browser, tmp_path):
    """Open a T1, add the FLAIR of the same study: each series' contrast is recognised and
    shown; choose another for the FLAIR; run: the T1 model reads the T1, the FLAIR is recorded
    and not used, and the page says so, with the engine's note that it looked like FLAIR."""
    server, _, scans = served
    flair = write_flair_phantom(scans, "flair.nrrd")  # a folder the server was given
    page = open_page(browser, server.url)
    page.fill("#scan-path", str(scans / "phantom.nrrd"))
    page.click("#open")
    page.wait_for_function("() => document.querySelector('#message').innerText.startsWith('opened phantom')")
    assert "T1 by its image" in page.inner_text("#series-0 .series-how")
    page.fill("#series-path", str(flair))
    page.click("#add-series")
    # reading the series and recognising its contrast: slow when other readers' servers are busy
    page.wait_for_selector("#series-1, #error", timeout=90000)
    assert page.locator("#error").count() == 0, page.inner_text("#error")
    assert page.inner_text("#series-1 .series-label") == "flair"
    assert "FLAIR by its image" in page.inner_text("#series-1 .series-how")
    # the reader chooses the second series' contrast in its list
    page.click("#series-1 .series-contrast")
    page.locator(".v-overlay-container .v-list-item", has_text="T2").first.click()
    page.wait_for_function("() => document.querySelector('#series-1 .series-how').innerText.startsWith('chosen')")
    run_and_wait(page)
    assert voxels(page) > 0
    page.wait_for_function("() => document.querySelector('#series-1 .series-how').innerText.includes('not used')")
    assert page.inner_text("#series-0 .series-how") == "read as T1 (chosen)"
    assert page.inner_text("#series-1 .series-how") == "read as T2 (chosen), recorded, not used by this model"
    notes = page.locator("#input-notes").all_inner_texts()
    assert any("looks like FLAIR" in n for n in notes) and any("recorded but not used" in n for n in notes)
    # an added series can be removed again
    page.click("#remove-series-1")
    page.wait_for_selector("#series-1", state="detached")
    page.close()
