"""``worklist.html``: the worklist as one self-contained page, viewable offline.

One row per scan, most anomalous first, with the thumbnail of its most anomalous slice
(input, map, outline: ``<id>/thumbnail.png`` beside the page); a click on a column header
sorts by it. No script or style is loaded from anywhere else.
"""

from __future__ import annotations

import html
import math
import time
from pathlib import Path
from typing import Any

from ...core.worklist import DONE, FAILED, THUMBNAIL, WORKLIST_HTML, Row, atomic_write

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 14px; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: middle; }
th { cursor: pointer; background: #f3f3f3; position: sticky; top: 0; }
th:hover { background: #e4e4e4; }
tr.failed td { background: #fff0f0; }
tr.pending td { color: #888; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { height: 90px; display: block; }
.note { max-width: 28em; font-size: 12px; color: #7a4b00; }
.error { max-width: 28em; font-size: 12px; color: #a00; }
"""

_SORT = """
document.querySelectorAll('th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = document.querySelector('tbody');
    var rows = Array.prototype.slice.call(body.rows);
    var up = th.dataset.dir !== 'up';
    th.dataset.dir = up ? 'up' : 'down';
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
      return up ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def _num(v: float | None, fmt: str) -> tuple[str, str]:
    """(shown text, sort value); missing values sort last in ascending order."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "", "1e300"
    return format(v, fmt), repr(float(v))


def _cell(text: str, sort: str | None = None, cls: str = "") -> str:
    attrs = f' data-v="{html.escape(sort if sort is not None else text)}"'
    if cls:
        attrs += f' class="{cls}"'
    return f"<td{attrs}>{text}</td>"


def _row(r: Row, folder: Path) -> str:
    pct, pct_v = _num(r.scan_percentile, ".1f")
    vol, vol_v = _num(r.volume_score, ".4g")
    ml, ml_v = _num(r.segmented_ml, ".2f")
    sec, sec_v = _num(r.seconds, ".1f")
    found = "" if r.findings is None else str(r.findings) + (
        f" ({r.largest_finding_ml:.2g})" if r.largest_finding_ml is not None else "")
    top = "" if r.top_slice is None else str(r.top_slice)
    if r.top_slice_percentile is not None:
        top += f" ({r.top_slice_percentile:.1f} %)"
    thumb = folder / r.id / THUMBNAIL
    img = (f'<a href="{html.escape(r.id)}/summary.json"><img src="{html.escape(r.id)}/{THUMBNAIL}" '
           f'alt="{html.escape(r.id)}: input, map, outline"></a>' if r.status == DONE and thumb.is_file() else "")
    rank = "" if r.rank is None else str(r.rank)
    detail = (f'<div class="error">{html.escape(r.error)}</div>' if r.status == FAILED
              else f'<div class="note">{html.escape(r.note)}</div>' if r.note else "")
    cells = [_cell(rank, rank or "1e300", "num"), _cell(img, r.id), _cell(html.escape(r.id), r.id),
             _cell(html.escape(r.status), r.status), _cell(pct, pct_v, "num"), _cell(vol, vol_v, "num"),
             _cell(top, "1e300" if r.top_slice is None else str(r.top_slice), "num"), _cell(ml, ml_v, "num"),
             _cell(found, "-1" if r.findings is None else str(r.findings), "num"), _cell(html.escape(r.brain_mask_source or "")), _cell(detail, r.error or r.note),
             _cell(sec, sec_v, "num"), _cell(html.escape(r.input), r.input)]
    return f'<tr class="{html.escape(r.status)}">' + "".join(cells) + "</tr>"


def render_html(folder: Path, rows: list[Row], options: dict[str, Any]) -> str:
    counts = {s: sum(r.status == s for r in rows) for s in (DONE, FAILED)}
    pending = len(rows) - counts[DONE] - counts[FAILED]
    heads = ["rank", "top finding (or most anomalous slice)", "scan", "status", "healthy percentile", "scan score",
             "slice (percentile)", "segmented mL", "findings (largest mL)", "brain mask", "note / error", "seconds", "input"]
    model = html.escape(str(options.get("model_name", "")))
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Worklist: {counts[DONE]} scans screened</title><style>{_STYLE}</style></head><body>",
        f"<h1>Screening worklist</h1><p>{counts[DONE]} screened, {counts[FAILED]} failed, {pending} not yet screened; "
        f"model <b>{model}</b>, methods {html.escape(', '.join(options.get('methods', [])))}; "
        f"written {time.strftime('%Y-%m-%d %H:%M')}.</p>",
        "<p>Ranked most anomalous first by the scan-level score; <i>healthy percentile</i>: the share of the model's "
        "healthy calibration scans scoring at most as high (100 = above every one). Thumbnails: the most anomalous "
        "axial slice as input, map in anomaly levels, and segmentation outline (green), in radiological view "
        "(the patient's right on the left). A click on a column header sorts by it; a thumbnail opens the scan's "
        "summary.json. Screening ranks scans for reading; it is not a diagnosis.</p>",
        "<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in heads) + "</tr></thead><tbody>",
        *(_row(r, folder) for r in rows),
        f"</tbody></table><script>{_SORT}</script></body></html>", ""])


def write_html(folder: Path, rows: list[Row], options: dict[str, Any]) -> Path:
    path = folder / WORKLIST_HTML
    atomic_write(path, render_html(folder, rows, options))
    return path
