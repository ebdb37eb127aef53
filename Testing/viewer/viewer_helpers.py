"""Shared by the viewer's tests and the README screenshot: a served viewer and a tiny model."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_phantom(folder: Path, name: str = "phantom.nrrd", lesion: bool = True, seed: int = 0) -> Path:
    from phantoms import image_from, phantom_array
    path = folder / name
    sitk.WriteImage(image_from(phantom_array(lesion=lesion, seed=seed)), str(path))
    return path


def flair_phantom_array(lesion: bool = True, seed: int = 0) -> np.ndarray:
    """The phantom (:func:`phantoms.phantom_array`) as a FLAIR shows a brain: grey matter
    brighter than white, a dark rim of CSF at the surface, the lesion bright. The engine
    recognises it as FLAIR, as it recognises the phantom itself as T1."""
    from phantoms import phantom_array
    arr = phantom_array(lesion=lesion, seed=seed)
    out = arr.copy()
    white, grey = (arr > 750) & (arr < 1200), (arr > 450) & (arr <= 750)
    out[white] = arr[white] - 100
    out[grey] = arr[grey] + 500
    brain = sitk.GetImageFromArray((arr > 0).astype(np.uint8))
    rim = (arr > 0) & (sitk.GetArrayFromImage(sitk.BinaryErode(brain, [1, 1, 1])) == 0)
    out[rim] = 250 + 0.5 * (arr[rim] - arr[rim].mean())
    return out.astype(np.float32)


def write_flair_phantom(folder: Path, name: str = "flair.nrrd", seed: int = 0) -> Path:
    from phantoms import image_from
    path = folder / name
    sitk.WriteImage(image_from(flair_phantom_array(seed=seed)), str(path))
    return path


def make_viewer_model(folder: Path) -> Path:
    """A tiny random-initialised model calibrated on healthy phantoms (as ``calibrate`` does on
    healthy scans: each rate's threshold is that quantile of the healthy brains' voxels), so
    that its default threshold flags the seeded lesion of a phantom and little else."""
    from anomaly_localizer.core.package import load_package
    from anomaly_localizer.core.pipeline import score_volume
    from phantoms import TINY_CALIBRATION, image_from, make_tiny_package, phantom_array

    make_tiny_package(folder / "draft" / "tiny", calibration=TINY_CALIBRATION)
    draft = load_package(folder / "draft" / "tiny")
    healthy = [score_volume(image_from(phantom_array(seed=seed)), draft, draft.default_methods()) for seed in (1, 2, 3)]
    rates = [0.1, 0.01, 0.001, 0.0001]
    pixel = {}
    for method in healthy[0].maps:
        voxels = np.concatenate([r.maps[method][r.brain_mask.astype(bool)] for r in healthy])
        values = [float(np.quantile(voxels, 1 - rate)) for rate in rates]
        pixel[method] = {"n_subjects": len(healthy), "thresholds": [{"fpr": r, "value": v} for r, v in
                                                                    zip(rates[1:], values[1:])],
                         "curve": {"fpr": rates, "values": values}}
    calibration = {"default_fpr": 0.001, "pixel": pixel, "slice": TINY_CALIBRATION["slice"]}
    make_tiny_package(folder / "tiny", calibration=calibration)
    return folder / "tiny"


class Server:
    """``anomaly-localizer view`` in a child process, stopped by :meth:`stop`."""

    def __init__(self, args: list[str], models: Path | None = None, timeout: float = 120.0, env: dict | None = None):
        self.port = free_port()
        env = dict(os.environ, **(env or {}))
        if models is not None:
            env["ANOMALY_LOCALIZER_MODELS"] = str(models)
        self.process = subprocess.Popen([sys.executable, "-m", "anomaly_localizer.cli", "view", *args,
                                         "--port", str(self.port)], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=env)
        self.first_line = self.process.stdout.readline().strip()
        found = re.search(r"(http://\S+)", self.first_line)
        self.url = found.group(1) if found else f"http://127.0.0.1:{self.port}/"  # with its ?token=
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the viewer stopped: {self.first_line} {self.process.stdout.read()}")
                time.sleep(0.5)
        raise RuntimeError("the viewer did not start listening")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def open_page(browser, url: str, width: int = 1400, height: int = 800):
    page = browser.new_page(viewport={"width": width, "height": height}, accept_downloads=True)
    deadline = time.monotonic() + 60
    while page.goto(url).status == 503 and time.monotonic() < deadline:
        time.sleep(2)  # as many readers as the server takes: wait for an earlier page's server to end
    page.wait_for_selector(".remote-controlled-area img.image-display-area", timeout=60000)
    return page


def voxels(page) -> int:
    """The segmented voxel count the page shows under the threshold."""
    text = page.inner_text("#threshold-label")
    return int(re.search(r"\((\d+) voxels\)", text).group(1))


def run_and_wait(page, timeout_ms: int = 120000) -> None:
    page.click("#run")
    page.wait_for_selector("#threshold-label", timeout=timeout_ms)


def view_pixels(page, index: int = 0) -> np.ndarray:
    """The pixels of slice view ``index`` (0 axial, 1 coronal, 2 sagittal) as the page shows it."""
    import io
    from PIL import Image
    png = page.locator(".remote-controlled-area").nth(index).screenshot()
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def wait_for_change(page, before: np.ndarray, index: int = 0, timeout: float = 20.0) -> np.ndarray:
    """The view's pixels once they differ from ``before`` (the server renders asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = view_pixels(page, index)
        if now.shape != before.shape or np.abs(now - before).mean() > 0.05:
            return now
        time.sleep(0.3)
    return view_pixels(page, index)


def download(page, selector: str, folder: Path) -> Path:
    with page.expect_download(timeout=60000) as info:
        page.click(selector)
    target = folder / info.value.suggested_filename
    info.value.save_as(target)
    return target


def reader_address(front_url: str) -> str:
    """The address of a new reader's server the front server redirects a page to (a
    ``?secret=`` in it): what a page's first request gets."""
    import urllib.error
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    try:
        urllib.request.build_opener(NoRedirect).open(front_url, timeout=240)
    except urllib.error.HTTPError as exc:
        if exc.code in (302, 303):
            return exc.headers["Location"]
        raise
    raise AssertionError("the front server did not redirect")


def ws_hello(page_url: str, origin: str | None, secret: str, then: bytes | None = None) -> dict:
    """Open the WebSocket of the reader's server at ``page_url`` as a script would, with
    ``origin`` and ``secret``, and say wslink's hello: {"status": HTTP status of the handshake
    (101 if accepted), "reply": the hello's answer, "closed": whether the server closed the
    connection after ``then`` (raw frames sent after the hello)}."""
    import asyncio
    from urllib.parse import urlsplit

    import aiohttp
    import msgpack
    from wslink.chunking import UnChunker, generate_chunks

    parts = urlsplit(page_url)
    ws_url = f"ws://{parts.netloc}/ws"

    async def go() -> dict:
        headers = {"Origin": origin} if origin else {}
        async with aiohttp.ClientSession() as http:
            try:
                ws = await http.ws_connect(ws_url, headers=headers, max_msg_size=0)
            except aiohttp.WSServerHandshakeError as exc:
                return {"status": exc.status, "reply": None, "closed": True}
            hello = msgpack.packb({"wslink": "1.0", "id": "system:c0:0", "method": "wslink.hello",
                                   "args": [{"secret": secret}], "kwargs": {}})
            for chunk in generate_chunks(hello, 4 * 1024 ** 2):
                await ws.send_bytes(bytes(chunk))
            unchunker = UnChunker()
            unchunker.set_max_message_size(64 * 1024 ** 2)
            reply = None
            while reply is None:
                msg = await ws.receive(timeout=30)
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                reply = unchunker.process_chunk(msg.data)
            closed = False
            if then is not None:
                await ws.send_bytes(then)
                try:
                    while True:
                        msg = await ws.receive(timeout=15)
                        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            closed = True
                            break
                except asyncio.TimeoutError:
                    closed = False
            await ws.close()
            return {"status": 101, "reply": reply, "closed": closed}

    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(1) as pool:  # its own event loop (playwright's sync API runs one in this thread)
        return pool.submit(lambda: asyncio.run(go())).result()
