"""The viewer in a reading room (issue 37): every reader in a session of their own, the
WebSocket closed to other pages, paths only from the folders given, bounded uploads and
messages, every page error said in the page, and nothing left on the server after any exit.
Each test drives the served viewer as a browser (headless Chromium) or as a script on its
WebSocket would."""

from __future__ import annotations

import os
import struct
import time
import zipfile
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from viewer_helpers import (Server, make_viewer_model, open_page, reader_address, run_and_wait, voxels, write_phantom,
                            ws_hello)


@pytest.fixture(scope="module")
def room(tmp_path_factory):
    """A viewer allowed to open the folder ``scans`` only."""
    root = tmp_path_factory.mktemp("room")
    make_viewer_model(root / "models")
    scans = root / "scans"
    scans.mkdir()
    write_phantom(scans, "a.nrrd", seed=1)
    write_phantom(scans, "b.nrrd", seed=2)
    # a reader's server ends 3 s after its page has gone (15 by default): the tests wait for that
    server = Server(["--allow-folder", str(scans), "--model", "tiny", "--idle-timeout", "3"], models=root / "models")
    yield server, root, scans
    server.stop()


def readers_rss_mb(front_pid: int) -> float:
    """The resident memory of the front server's reader servers, in MB (Linux /proc)."""
    total = 0
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == front_pid:
                status = (stat_file.parent / "status").read_text()
                total += int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    return total / 1024


def wait_gone(page_url: str, timeout: float = 60.0) -> None:
    """Wait until the reader's server at ``page_url`` has ended (its page gone)."""
    import socket
    port = urlsplit(page_url).port
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            time.sleep(0.5)
        except OSError:
            return
    raise AssertionError("the reader's server did not end")


def open_path(page, path) -> None:
    page.fill("#scan-path", str(path))
    page.click("#open")


def test_a_foreign_origin_the_public_secret_and_a_1gb_message_are_refused(room):
    server, _, _ = room
    address = reader_address(server.url)
    parts = urlsplit(address)
    secret, own = parse_qs(parts.query)["secret"][0], f"http://{parts.netloc}"
    assert len(secret) >= 32 and secret != "wslink-secret"
    # another web page, even with the right secret, is refused at the handshake
    assert ws_hello(address, "http://evil.example", secret)["status"] == 403
    assert ws_hello(address, None, secret)["status"] == 403
    # the page's own origin with wslink's public default secret is not let in
    refused = ws_hello(address, own, "wslink-secret")
    assert refused["reply"]["error"]["message"] == "Authentication failed"
    # the page's own origin and this start's secret are
    assert "clientID" in ws_hello(address, own, secret)["reply"]["result"]
    # a frame announcing a 1 GB message: the connection is closed, no memory is taken for it
    before = readers_rss_mb(server.process.pid)
    claim = struct.pack("<III", 7, 0, 1024 ** 3) + b"x" * 64
    assert ws_hello(address, own, secret, then=claim)["closed"]
    assert readers_rss_mb(server.process.pid) - before < 200
    # the front server starts nothing without the token it printed
    import urllib.error
    import urllib.request
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(server.url.split("?")[0], timeout=30)
    assert info.value.code == 403 and b"token" in info.value.read()
    wait_gone(address)


def test_two_readers_have_their_own_scene_and_a_third_is_told_the_bound(room, browser):
    _, root, scans = room
    server = Server(["--allow-folder", str(scans), "--model", "tiny", "--max-sessions", "2", "--idle-timeout", "2"],
                    models=root / "models")
    try:
        two_readers(server, browser, scans)
    finally:
        server.stop()


def two_readers(server, browser, scans) -> None:
    a = open_page(browser, server.url)
    b = open_page(browser, server.url)
    assert urlsplit(a.url).port != urlsplit(b.url).port
    open_path(a, scans / "a.nrrd")
    a.wait_for_function("() => document.querySelector('#scan-label').innerText.includes('a')")
    open_path(b, scans / "b.nrrd")
    b.wait_for_function("() => document.querySelector('#scan-label').innerText.includes('b')")
    time.sleep(1.0)
    assert a.inner_text("#scan-label").strip() == "a" and b.inner_text("#scan-label").strip() == "b"
    # reader A's threshold is A's: B runs and moves its threshold, A's page has no result
    run_and_wait(b)
    thumb = b.locator("#threshold .v-slider-thumb")
    thumb.focus()
    start = voxels(b)
    for _ in range(10):
        b.keyboard.press("ArrowRight")
    b.wait_for_function(f"() => !document.querySelector('#threshold-label').innerText.includes('({start} voxels)')")
    assert a.locator("#threshold-label").count() == 0
    # a third reader beyond --max-sessions 2 gets one line saying so
    c = browser.new_page()
    response = c.goto(server.url)
    assert response.status == 503
    assert "already serves 2 readers" in c.inner_text("#refusal")
    c.close()
    # when a reader closes the page, their server ends and a new reader is served
    gone = b.url
    b.close()
    wait_gone(gone)
    d = open_page(browser, server.url)  # (it waits while the server that stopped listening is still ending)
    assert "Open a scan" in d.inner_text("#message")
    d.close()
    a.close()


def test_paths_outside_the_given_folders_and_a_fifo_are_refused_in_one_line(room, browser, tmp_path):
    server, _, scans = room
    outside = write_phantom(tmp_path, "outside.nrrd")
    page = open_page(browser, server.url)
    open_path(page, outside)
    page.wait_for_selector("#error")
    assert "not in a folder this viewer may open" in page.inner_text("#error")
    link = scans / "link.nrrd"  # a link in an allowed folder to a file outside it
    link.symlink_to(outside)
    fifo = scans / "pipe.nrrd"
    os.mkfifo(fifo)
    try:
        open_path(page, link)
        page.wait_for_function("() => document.querySelector('#error').innerText.includes('link.nrrd')")
        assert "not in a folder this viewer may open" in page.inner_text("#error")
        open_path(page, fifo)
        page.wait_for_function("() => document.querySelector('#error').innerText.includes('pipe.nrrd')")
        assert "not a regular file or a folder" in page.inner_text("#error")
        assert "\n" not in page.inner_text("#error").strip()
        open_path(page, scans / "a.nrrd")  # the server was not blocked by the FIFO
        page.wait_for_function("() => document.querySelector('#message').innerText.startsWith('opened a')")
    finally:
        link.unlink()
        fifo.unlink()
    page.close()


def write_zip_bomb(path: Path, size: int = 1200 * 1024 ** 2) -> Path:
    """A zip of ~1 MB that unpacks to ``size`` bytes of zeros."""
    block = bytes(8 * 1024 ** 2)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("slices/zeros.dcm", "w", force_zip64=True) as member:
            for _ in range(size // len(block)):
                member.write(block)
    return path


def test_a_zip_bomb_a_zip_with_a_link_and_bad_page_values_are_refused_in_the_page(room, browser, tmp_path):
    server, _, scans = room
    bomb = write_zip_bomb(tmp_path / "bomb.zip")
    assert bomb.stat().st_size < 5 * 1024 ** 2
    linked = tmp_path / "linked.zip"
    with zipfile.ZipFile(linked, "w") as z:
        info = zipfile.ZipInfo("series/evil")
        info.external_attr = (0o120777 << 16)
        z.writestr(info, "/etc/passwd")
    page = open_page(browser, server.url)
    page.locator("input#upload").set_input_files(str(bomb))
    page.wait_for_selector("#error", timeout=120000)
    assert "more than the 1024 MB an uploaded zip may hold" in page.inner_text("#error")
    page.locator("input#upload").set_input_files(str(linked))
    page.wait_for_function("() => document.querySelector('#error').innerText.includes('linked.zip holds a link')")
    # a threshold of -1 or "abc" from the page is refused and the page shows the threshold in use
    open_path(page, scans / "a.nrrd")
    page.wait_for_function("() => document.querySelector('#message').innerText.startsWith('opened a')")
    run_and_wait(page)
    shown = page.inner_text("#threshold-label")
    for bad in ("-1", "'abc'"):
        page.evaluate(f"() => window.trame.state.set('threshold', {bad})")
        page.wait_for_function("() => document.querySelector('#error') && "
                               "document.querySelector('#error').innerText.includes('positive anomaly level')")
        page.wait_for_function(f"() => document.querySelector('#threshold-label').innerText === {shown!r}")
        page.evaluate("() => window.trame.state.set('error', '')")
    # an unknown map or tool is said in the page too
    page.evaluate("() => window.trame.state.set('method', 'no-such-map')")
    page.wait_for_function("() => document.querySelector('#error') && "
                           "document.querySelector('#error').innerText.includes('unknown map')")
    page.evaluate("() => window.trame.state.set('tool', 'scalpel')")
    page.wait_for_function("() => document.querySelector('#error') && "
                           "document.querySelector('#error').innerText.includes('unknown tool')")
    page.close()


def test_the_findings_follow_the_threshold_moved_by_keyboard(room, browser):
    server, _, scans = room
    page = open_page(browser, server.url)
    open_path(page, scans / "a.nrrd")
    page.wait_for_function("() => document.querySelector('#message').innerText.startsWith('opened a')")
    run_and_wait(page)
    first = page.locator("#findings .v-list-item").first
    first.wait_for(timeout=20000)
    before = first.inner_text()
    thumb = page.locator("#threshold .v-slider-thumb")
    thumb.focus()
    start = voxels(page)
    for _ in range(30):
        page.keyboard.press("ArrowRight")
    page.wait_for_function(f"() => !document.querySelector('#threshold-label').innerText.includes('({start} voxels)')")
    page.wait_for_function("(before) => { const f = document.querySelector('#findings .v-list-item'); "
                           "return !f || f.innerText !== before; }", arg=before, timeout=10000)
    page.close()


def test_nothing_is_left_on_the_server_after_sigterm_during_a_run(tmp_path, browser, room):
    _, root, scans = room
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    server = Server([str(scans / "a.nrrd"), "--model", "tiny"], models=root / "models", env={"TMPDIR": str(tmpdir)})
    try:
        page = open_page(browser, server.url)
        page.wait_for_function("() => document.querySelector('#scan-label').innerText.includes('a')")
        page.click("#run")
        page.wait_for_selector("#progress")
        # the run's files are in the reader's session folder, not beside it in TMPDIR
        assert [p.name.startswith("anomaly-localizer-view-") for p in tmpdir.iterdir()] == [True]
        assert list(tmpdir.glob("anomaly-localizer-view-*/session-*/AnomalyLocalizer-*"))
    finally:
        server.process.terminate()
        server.process.wait(90)
    assert list(tmpdir.iterdir()) == []
