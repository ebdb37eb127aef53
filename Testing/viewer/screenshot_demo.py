"""The README's picture of the browser viewer, made by driving the page as the tests do.

Run after ``make demo`` (it writes ``demo-output/``)::

    .venv/bin/python Testing/viewer/screenshot_demo.py demo-output Resources/Screenshots/viewer.png

Serves ``anomaly-localizer view`` on the demo's lesioned scan with the installed default model,
runs it in the page, centres the views on the top finding and saves the page as PNG. It also
checks, as the page tests do on a phantom, that the segmentation follows the threshold and
that both downloads work, and prints what it saw.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import chromium_path  # noqa: E402
from viewer_helpers import (Server, download, open_page, run_and_wait, view_pixels, voxels,  # noqa: E402
                            wait_for_change)


def lesioned_scan(demo: Path) -> Path:
    found = sorted((demo / "inputs").glob("*_lesion.nii*"))
    if not found:
        raise SystemExit(f"no lesioned scan in {demo / 'inputs'}; run make demo first")
    return found[0]


def main(demo: str, picture: str) -> int:
    from playwright.sync_api import sync_playwright

    scan = lesioned_scan(Path(demo))
    server = Server([str(scan)])
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(),
                                        args=["--no-sandbox", "--disable-dev-shm-usage"])
            page = open_page(browser, server.url, width=1500, height=820)
            run_and_wait(page, timeout_ms=600000)
            start = voxels(page)
            page.locator("#findings .v-list-item").first.wait_for(timeout=60000)
            top = page.locator("#findings .v-list-item").first.inner_text()
            page.wait_for_timeout(3000)  # the views have drawn the result
            coronal = view_pixels(page, 1)
            page.locator("#findings .v-list-item").first.click()
            wait_for_change(page, coronal, index=1, timeout=120)  # centred on the finding
            page.wait_for_timeout(3000)
            Path(picture).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=picture)
            with tempfile.TemporaryDirectory() as folder:
                files = [download(page, f"#export-{kind}", Path(folder)).name for kind in ("nii-gz", "seg-nrrd")]
            print(f"{scan.name}: {start} voxels segmented at the default threshold; top finding {top}; "
                  f"downloads {', '.join(files)}; picture {picture}")
            browser.close()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))
