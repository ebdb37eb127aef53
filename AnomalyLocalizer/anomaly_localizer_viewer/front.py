"""The front server: the address the command prints, which hands each new page a server of
its own.

trame keeps one state and one scene per server process, shared by every page connected to it,
so readers are kept apart by processes: each new page (a browser tab) that asks the front
server for ``/?token=...`` gets a new reader's server (:mod:`.child`) on a port of its own,
with its own secret, scene, runs and session folder, and is redirected there. That server ends
when its page has been gone a few seconds (a reload within them finds it again) and removes its
folder; at most ``max_sessions`` run at once, and a page beyond that gets one line saying so.

The token in the printed address is made per start: without it the front server starts
nothing, so a page elsewhere on the web cannot start a session, and never learns a session's
secret (a redirect's target cannot be read across origins).
"""

from __future__ import annotations

import asyncio
import atexit
import html
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .child import CONFIG_ENV, SECRET_ENV

log = logging.getLogger(__name__)
START_TIMEOUT_S = 180.0  # a reader's server builds Slicer's scene and views before it listens
STOP_GRACE_S = 40.0  # a reader's server ending a run stops its process tree first


@dataclass
class Reader:
    process: subprocess.Popen
    port: int
    secret: str
    work: Path

    def alive(self) -> bool:
        return self.process.poll() is None


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def page(text: str, status: int):
    import aiohttp.web as web
    body = (f"<!doctype html><title>AnomalyLocalizer</title><p id=\"refusal\" style=\"font-family:sans-serif\">"
            f"{html.escape(text)}</p>\n")
    return web.Response(status=status, text=body, content_type="text/html")


class Front:
    """The front server's state: its token, its readers' servers and their folders."""

    def __init__(self, paths: list[str], host: str, port: int, model: str | None, allowed_folders: list[str],
                 allowed_origins: list[str], max_sessions: int, verbose: bool = False, idle_timeout: int = 15):
        self.host, self.port, self.max_sessions = host, port, max_sessions
        self.token = secrets.token_urlsafe(24)
        self.root = Path(tempfile.mkdtemp(prefix="anomaly-localizer-view-"))
        self.readers: list[Reader] = []
        self.config = {"paths": paths, "host": host, "model": model, "allowed_folders": allowed_folders,
                       "allowed_origins": allowed_origins, "verbose": verbose, "idle_timeout": idle_timeout,
                       "parent": os.getpid()}
        atexit.register(self.stop_all)

    def url(self) -> str:
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{shown}:{self.port}/?token={self.token}"

    def live(self) -> list[Reader]:
        """The readers' servers still running; the folders of those that ended are removed
        (a server killed outright could not remove its own)."""
        for reader in [r for r in self.readers if not r.alive()]:
            shutil.rmtree(reader.work, ignore_errors=True)
            self.readers.remove(reader)
        return self.readers

    def start_reader(self) -> Reader:
        port, secret = free_port(self.host), secrets.token_urlsafe(32)
        work = Path(tempfile.mkdtemp(prefix="session-", dir=self.root))
        env = dict(os.environ, WSLINK_READY_MSG="")
        env[CONFIG_ENV] = json.dumps({**self.config, "port": port, "work": str(work)})
        env[SECRET_ENV] = secret
        process = subprocess.Popen([sys.executable, "-m", "anomaly_localizer_viewer.child"], env=env,
                                   stdin=subprocess.DEVNULL)
        reader = Reader(process, port, secret, work)
        self.readers.append(reader)
        return reader

    async def listening(self, reader: Reader) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and reader.alive():
            try:
                _, writer = await asyncio.open_connection(self.host if self.host not in ("0.0.0.0", "::")
                                                          else "127.0.0.1", reader.port)
                writer.close()
                return True
            except OSError:
                await asyncio.sleep(0.25)
        return False

    async def index(self, request):
        import aiohttp.web as web

        if not secrets.compare_digest(request.query.get("token", ""), self.token):
            return page("this viewer opens from the address its command printed (with ?token=...); ask whoever "
                        "started it for that address", 403)
        if len(self.live()) >= self.max_sessions:
            return page(f"this viewer already serves {self.max_sessions} readers, the most it was started for "
                        "(--max-sessions); try again when one of them closes their page", 503)
        reader = self.start_reader()
        if not await self.listening(reader):
            reader.process.terminate()
            return page("the reader's server did not start; the viewer's log on the server says why", 500)
        host = request.url.host or "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        raise web.HTTPSeeOther(f"http://{host}:{reader.port}/index.html?secret={reader.secret}")

    def stop_all(self) -> None:
        """Ask every reader's server to stop (each ends its run and removes its folder), wait
        for them, then remove what is left."""
        for reader in self.readers:
            if reader.alive():
                reader.process.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for reader in self.readers:
            try:
                reader.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                reader.process.kill()
                reader.process.wait()
        self.readers.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def serve(self, open_browser: bool = False) -> None:
        import aiohttp.web as web

        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get("/", self.index)
        app.router.add_get("/index.html", self.index)

        async def on_cleanup(_app):
            await asyncio.get_running_loop().run_in_executor(None, self.stop_all)

        async def reap(_app):
            async def every_few_seconds():
                while True:  # a reader's server that ended is reaped and its folder removed
                    await asyncio.sleep(5)
                    self.live()
            task = asyncio.get_running_loop().create_task(every_few_seconds())
            yield
            task.cancel()

        app.cleanup_ctx.append(reap)
        app.on_cleanup.append(on_cleanup)
        if open_browser:
            import webbrowser
            app.on_startup.append(lambda _app: asyncio.get_running_loop().run_in_executor(
                None, webbrowser.open, self.url()))
        web.run_app(app, host=self.host, port=self.port, print=None, access_log=None)
