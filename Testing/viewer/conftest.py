"""Fixtures of the browser viewer's tests: a tiny model, a phantom scan, a running
``anomaly-localizer view`` server, and headless Chromium driven by playwright.

Skipped as a whole without the viewer's packages; without a Chromium binary the page tests
skip too, unless ANOMALY_LOCALIZER_REQUIRE_BROWSER=1 (CI sets it, so they never skip there).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("trame_slicer", reason="the viewer extra is not installed (make test installs it)")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "Testing" / "engine"))
sys.path.insert(0, str(ROOT / "Testing" / "viewer"))


def chromium_path() -> str | None:
    """Debian's chromium (playwright's own browser download is not reachable everywhere)."""
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="session")
def browser():
    path = chromium_path()
    if path is None:
        if os.environ.get("ANOMALY_LOCALIZER_REQUIRE_BROWSER") == "1":
            pytest.fail("no Chromium found (apt install chromium, or set CHROMIUM to its path)")
        pytest.skip("no Chromium found (apt install chromium, or set CHROMIUM to its path)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()
