"""Heatmaps relative to the scan's own map: a method's map divided by a quantile of the same
map over the scan's brain (its median by default), before the healthy calibration.

Why: a scan from another scanner, protocol or site departs a little from the training scans
everywhere, so a reconstruction error or a fused level is raised over the whole brain and a
threshold calibrated on the training scanner's healthy scans flags much of it (the MNI152
template and Colin27 scan had 3.5-10 % of their brain flagged at a threshold that flags
0.1 % of healthy IXI brains). Dividing by the scan's own median removes that overall rise,
and a focal anomaly, a small part of the brain, barely moves a median. What it costs: a
change over much of the brain (a large tumour, widespread disease) lowers its own
reference, so it stands out less; and the overall rise is no longer visible in the map.
That is why each scan's reference value is kept, compared with the healthy calibration
scans' (``calibration.scan_reference``), and a one-line note beside it says when a scan's map
is raised overall far beyond theirs (context, not an alarm: the map already allows for it).

A package opts in per method (``model.json`` ``scan_relative: {method: {"quantile": q}}``);
its thresholds are calibrated on relative maps like every other map's. Slice and volume
scores are not made relative (a scan raised overall still ranks high in a worklist).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:
    from .package import ModelPackage

# A scan whose reference value exceeds every healthy calibration scan's by this factor is
# raised overall beyond healthy variation (the healthy scans' medians of the fused map
# spread by about 15 %).
REFERENCE_NOTE_FACTOR = 1.2


def relative_to_scan(values: np.ndarray, brain: np.ndarray, quantile: float) -> tuple[np.ndarray, float]:
    """(``values`` divided by their ``quantile`` inside ``brain``, that reference value)."""
    inside = values[brain]
    if inside.size == 0:
        raise InputError("the brain mask is empty; check the mask")
    ref = float(np.quantile(inside, quantile))
    if not np.isfinite(ref) or ref <= 0.0:
        raise InputError(f"the heatmap's {100 * quantile:g}th percentile over the brain is {ref:g}, so a map "
                         "relative to it is undefined; check the brain mask, or use a model whose map is not "
                         "scan-relative")
    return (values / ref).astype(np.float32, copy=False), ref


def apply_scan_relative(package: "ModelPackage", maps: dict[str, np.ndarray], brain: np.ndarray,
                        only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Divide, in place in ``maps``, every map ``package`` declares scan-relative (of
    ``only``, when given) by its own brain quantile; return ``{method: {"quantile",
    "scan_value"}}`` for the run's record."""
    record: dict[str, Any] = {}
    for m in [m for m in maps if only is None or m in only]:
        q = package.scan_relative(m)
        if q is not None:
            maps[m], ref = relative_to_scan(maps[m], brain, q)
            record[m] = {"quantile": q, "scan_value": ref}
    return record


def reference_summary(package: "ModelPackage", record: dict[str, Any]) -> dict[str, Any]:
    """What each scan-relative map was divided by on this scan, against the healthy
    calibration scans' values (their median, and this scan's value as a multiple of it), with
    a one-line ``note`` when the scan's map is raised overall beyond every healthy scan's."""
    out: dict[str, Any] = {}
    for m, r in record.items():
        healthy = package.calibration.scan_reference.get(m) or []
        median = float(np.median(healthy)) if healthy else None
        out[m] = {"quantile": r["quantile"], "scan_value": r["scan_value"],
                  "healthy_median": median, "healthy_max": float(max(healthy)) if healthy else None,
                  "times_healthy_median": r["scan_value"] / median if median else None,
                  "meaning": f"the map is divided by its own {100 * r['quantile']:g}th percentile over this "
                             "scan's brain before the healthy thresholds apply"}
        note = reference_note(m, out[m])
        if note:
            out[m]["note"] = note
    return out


def reference_note(method: str, entry: dict[str, Any]) -> str | None:
    """One line when this scan's map is raised overall well beyond every healthy calibration
    scan's (an entry of :func:`reference_summary`); None otherwise or without healthy values.

    It is information, not an alarm: the map is already relative to the scan, so it flags what
    stands out within it (another scanner's scans and average templates are raised like this;
    the demo's template is 2.0 times). It is kept beside the map's scan-relative record and
    shown as the scan's context, never as the segmentation's note (:func:`levels.broad_flag_note`
    is that one, and asks for action)."""
    top, times = entry.get("healthy_max"), entry.get("times_healthy_median")
    if top is None or times is None or entry["scan_value"] <= REFERENCE_NOTE_FACTOR * top:
        return None
    q = entry.get("quantile", 0.5)
    ref = "median" if abs(q - 0.5) < 1e-9 else f"{100 * q:g}th percentile"
    return (f"The {method} map of this scan is {times:.1f} times as high overall as in the healthy training scans "
            f"(another scanner or an average template): it is shown relative to the scan's own {ref}, so a change "
            "over much of the brain stands out less.")
