"""One reader's server process, started by :mod:`.front` for each new page.

Its settings come in the environment (the secret never on a command line, where other users
of the machine could read it), and are removed from it so that the engine runs it starts do
not inherit them. Every file it writes, its runs' included, is inside its session folder:
TMPDIR points there, and the folder is removed on any exit it can see (the page gone, SIGTERM,
SIGINT, the front server gone, an error).

Run as ``python -m anomaly_localizer_viewer.child``.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

CONFIG_ENV = "ANOMALY_LOCALIZER_VIEW_CONFIG"
SECRET_ENV = "ANOMALY_LOCALIZER_VIEW_SECRET"


def _watch_parent(parent: int) -> None:
    """End this server when the front server that started it is gone (even killed)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
            return


def main() -> int:
    config = json.loads(os.environ.pop(CONFIG_ENV))
    secret = os.environ.pop(SECRET_ENV)
    work = Path(config["work"])
    work.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(work)  # the engine runs this server starts write here too
    tempfile.tempdir = str(work)
    atexit.register(shutil.rmtree, work, True)
    # Until the server's loop takes SIGTERM over (it then stops gracefully and closes the
    # session), a SIGTERM exits through atexit rather than at once.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    threading.Thread(target=_watch_parent, args=(config["parent"],), daemon=True).start()
    from .app import serve

    serve(config["paths"], host=config["host"], port=config["port"], secret=secret, model=config.get("model"),
          allowedFolders=config["allowed_folders"], allowedOrigins=config["allowed_origins"], workRoot=str(work),
          idleTimeout=config.get("idle_timeout", 15), verbose=config.get("verbose", False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
