"""``anomaly-localizer view``: registered with the engine's command line through the entry
point group ``anomaly_localizer.commands`` (pyproject.toml), so the engine never imports the
viewer. Importing this module is cheap; trame and Slicer's classes load only when it runs."""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import sys
from pathlib import Path

EXIT_INPUT = 2  # the engine's code for bad input (anomaly_localizer.cli.common)
MAX_SESSIONS_DEFAULT = 4  # as limits.MAX_SESSIONS (this module stays cheap to import)
NEEDED = ("trame", "trame_slicer", "slicer", "LayerDMLib")


def register(sub) -> None:
    p = sub.add_parser("view", help="open a scan or a screening worklist in the browser viewer (Slicer's slice "
                                    "views, live threshold, corrections, downloads; needs the 'viewer' extra)")
    p.add_argument("paths", nargs="?", metavar="SCAN_OR_WORKLIST",
                   help="a scan file, DICOM folder or worklist folder to open at start (the page opens others)")
    p.add_argument("--port", type=int, default=8080, help="port to serve on (default 8080)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 lets other "
                        "machines connect, with no login: use it only on a trusted network)")
    p.add_argument("--model", help="model to run (default: the installed default model); the page offers the others")
    p.add_argument("--open-browser", action="store_true", help="open the page in this machine's browser")
    p.add_argument("--allow-folder", action="append", default=[], metavar="DIR",
                   help="a folder whose scans and worklists the page may open by path (repeatable; the start "
                        "path's folder counts); anything else is refused (uploads are always allowed)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                   help="another page origin allowed on the WebSocket (e.g. https://viewer.example.org behind a "
                        "proxy; repeatable); by default only the viewer's own pages")
    p.add_argument("--max-sessions", type=int, default=MAX_SESSIONS_DEFAULT, metavar="N",
                   help=f"readers served at once, each with its own scene and server process "
                        f"(default {MAX_SESSIONS_DEFAULT}); a page beyond that is told so")
    p.add_argument("--idle-timeout", type=int, default=15, metavar="S",
                   help="seconds a reader's server waits for its page to come back (a reload) before it ends and "
                        "frees its place (default 15)")
    p.set_defaults(func=run_view)


def missing_requirements() -> list[str]:
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def port_in_use(host: str, port: int) -> str | None:
    """Why the server could not listen there (e.g. another program has the port), or None."""
    import socket
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, port))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def check_options(args: argparse.Namespace) -> str | None:
    """Why the options cannot work, in one line; None when they can."""
    if not 0 < args.port < 65536:
        return f"--port {args.port} is not a port number; give one between 1 and 65535 (e.g. 8080)"
    if args.host not in ("localhost",):
        try:
            ipaddress.ip_address(args.host)
        except ValueError:
            return f"--host {args.host} is not an IP address; give 127.0.0.1 (this machine) or 0.0.0.0 (all)"
    in_use = port_in_use(args.host, args.port)
    if in_use:
        return f"cannot listen on {args.host}:{args.port} ({in_use}); choose another port with --port"
    if args.paths and not Path(args.paths).exists():
        return f"{args.paths} does not exist; give a scan file, a DICOM folder or a worklist folder"
    for folder in args.allow_folder:
        if not Path(folder).expanduser().is_dir():
            return f"--allow-folder {folder} is not a folder; give a folder the page may open scans from"
    for origin in args.allow_origin:
        from urllib.parse import urlsplit
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/"):
            return f"--allow-origin {origin} is not an origin; give scheme://host[:port], e.g. https://viewer.example.org"
    if not 1 <= args.max_sessions <= 64:
        return f"--max-sessions {args.max_sessions} is out of range; give 1 to 64 (each reader needs about 1 GB)"
    if not 1 <= args.idle_timeout <= 3600:
        return f"--idle-timeout {args.idle_timeout} is out of range; give 1 to 3600 seconds"
    missing = missing_requirements()
    if missing:
        return (f"the browser viewer needs {', '.join(missing)}, which are not installed; install them with "
                "pip install 'anomaly-localizer[viewer]'")
    if args.model:
        from anomaly_localizer.core.installed import scan_packages
        names = [package.name for package in scan_packages()[0]]
        if args.model not in names:
            return (f"--model {args.model} is not an installed model (installed: {', '.join(names) or 'none'}); "
                    "give one of those names, or add its folder to ANOMALY_LOCALIZER_MODELS")
    return None


def run_view(args: argparse.Namespace) -> int:
    problem = check_options(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_INPUT
    import os
    if not os.environ.get("DISPLAY") and sys.platform.startswith("linux"):
        # No X server (a server, a container, CI): render offscreen with EGL instead of VTK
        # first trying X and warning about it.
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    from .front import Front
    folders = [str(Path(f).expanduser().resolve()) for f in args.allow_folder]
    if args.paths:
        start = Path(args.paths).expanduser().resolve()
        folders.append(str(start if start.is_dir() else start.parent))
    front = Front([str(Path(args.paths).resolve())] if args.paths else [], host=args.host, port=args.port,
                  model=args.model, allowed_folders=folders, allowed_origins=args.allow_origin,
                  max_sessions=args.max_sessions, verbose=args.verbose, idle_timeout=args.idle_timeout)
    local = args.host in ("127.0.0.1", "localhost", "::1")
    who = ("this machine only; --host 0.0.0.0 lets other machines connect" if local
           else "other machines can connect, with the address's token")
    print(f"AnomalyLocalizer viewer: {front.url()} ({who}; at most {args.max_sessions} readers at once, "
          f"each in their own session)", flush=True)
    front.serve(open_browser=args.open_browser)
    return 0
