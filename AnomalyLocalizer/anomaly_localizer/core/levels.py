"""The threshold in one place: calibrated thresholds, anomaly levels, segmentation, and what
a threshold means on healthy brains. The command line, the results files and the Slicer
module all use these functions, so every interface speaks the same numbers.

Anomaly level: a map's raw score divided by the model's threshold that flags 0.01 % of
healthy brain voxels (:data:`ANOMALY_LEVEL_FPR`), so level 1.0 is as rare as one healthy
voxel in 10,000 whatever the method; one colour scale then fits every map. A map without
that calibration is scaled by its own maximum in the brain (levels then mean nothing
across scans, and say so).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np


if TYPE_CHECKING:  # numpy only at run time: the Slicer logic imports this before pydantic is installed
    from .schema import Calibration

ANOMALY_LEVEL_FPR = 0.0001  # the calibrated threshold that defines anomaly level 1.0
LEVEL_DEFINITION = f"raw score / the model's {100 * ANOMALY_LEVEL_FPR:g} % healthy false-positive threshold"
UNCALIBRATED_LEVEL = 0.5  # default threshold of an uncalibrated map: half its maximum
# The anomaly levels a user may threshold at: below MIN_LEVEL nearly every brain voxel is
# flagged (no calibration says what that means), above MAX_LEVEL no score reaches it.
MIN_LEVEL = 1e-6
MAX_LEVEL = 1e12

# A healthy scan like the model's training scans has about the calibrated share of its brain
# above a threshold. Many times more is a large lesion, or a scan unlike the training scans
# (another scanner, protocol or contrast; an average template), whose whole brain departs a
# little from the model's healthy anatomy: worth saying, because the heatmap then shows the
# difference in domain as much as any anomaly.
BROAD_FLAG_FACTOR = 20.0
BROAD_FLAG_MIN_SHARE = 0.01


def check_level(level: float, name: str = "--threshold-level") -> float:
    """An anomaly level a user gives, refused unless positive, finite and at most
    :data:`MAX_LEVEL` (0 or less would segment the whole brain; a level beyond any
    score's range makes no threshold). The one check every interface shares."""
    from ..errors import InputError
    try:
        value = float(level)
    except (TypeError, ValueError):
        raise InputError(f"{name} {level!r} is not a number; give an anomaly level such as 1") from None
    if not math.isfinite(value):
        raise InputError(f"{name} {level} is not a finite number; give an anomaly level such as 1")
    if not MIN_LEVEL <= value <= MAX_LEVEL:
        raise InputError(f"{name} {value:g} is outside the anomaly levels a threshold can have ({MIN_LEVEL:g} "
                         f"to {MAX_LEVEL:g}; 1 is the rarest healthy level); give e.g. 1")
    return value


def as_calibration(calibration: "Calibration | dict") -> "Calibration":
    """A calibration block as the typed object (a dict, e.g. written by a script, is validated)."""
    if isinstance(calibration, dict):
        from .schema import Calibration
        return Calibration.model_validate(calibration)
    return calibration


def default_threshold(calibration: "Calibration | dict", method: str) -> tuple[float, str] | None:
    """The calibrated default threshold (raw score) of a pixel method and what it means."""
    calibration = as_calibration(calibration)
    entry = calibration.pixel.get(method)
    if entry is None:
        return None
    for t in entry.thresholds:
        if abs(t.fpr - calibration.default_fpr) < 1e-12:
            meaning = (f"flags {100 * calibration.default_fpr:g} % of healthy brain voxels "
                       f"({entry.n_subjects or '?'} held-out healthy subjects)")
            return t.value, meaning
    return None


def level_scale(calibration: "Calibration | dict", method: str, raw: np.ndarray | None = None,
                brain: np.ndarray | None = None) -> tuple[float, bool]:
    """(raw score of anomaly level 1.0, calibrated?). Without the calibrated 0.01 % threshold,
    the map's maximum inside the brain (1.0 when the map is empty or has none)."""
    calibration = as_calibration(calibration)
    entry = calibration.pixel.get(method)
    for t in entry.thresholds if entry else []:
        if abs(t.fpr - ANOMALY_LEVEL_FPR) < 1e-12 and t.value > 0:
            return float(t.value), True
    top = float(raw[brain].max()) if raw is not None and brain is not None and brain.any() else 0.0
    return (top if top > 0 else 1.0), False


def segment(heatmap: np.ndarray, brain: np.ndarray, threshold: float, out: np.ndarray | None = None) -> np.ndarray:
    """bool mask: the heatmap above ``threshold`` inside the brain (into ``out`` when given,
    which keeps a live slider from allocating)."""
    if out is None:
        out = np.empty(heatmap.shape, dtype=bool)
    np.greater(heatmap, threshold, out=out)
    np.logical_and(out, brain, out=out)
    return out


def segmentation_from(heatmap: np.ndarray, mask: np.ndarray, threshold: float) -> np.ndarray:
    """uint8 label: 1 where the heatmap exceeds the threshold inside the brain."""
    return segment(heatmap, mask, threshold).astype(np.uint8)


def healthy_fpr(calibration: "Calibration | dict", method: str, threshold: float) -> float | None:
    """Share of healthy brain voxels a raw threshold flags, interpolated on the calibration
    curve (log scale); None without calibration, and None below the curve's lowest threshold
    (the calibration measured no rate there: it is only known to be higher). Above its
    highest threshold the curve's lowest rate is given (an upper bound)."""
    calibration = as_calibration(calibration)
    entry = calibration.pixel.get(method)
    if entry is None or entry.curve is None:
        return None
    values = np.asarray(entry.curve.values, dtype=float)
    log_fpr = np.log10(np.asarray(entry.curve.fpr, dtype=float))
    values, idx = np.unique(values, return_index=True)  # increasing thresholds, decreasing rates
    if not math.isfinite(threshold) or threshold < values[0]:
        return None
    return float(10 ** np.interp(threshold, values, log_fpr[idx]))


def percentile_of(calibration: "Calibration | dict", score: str, value: float) -> float:
    """Percentile (0..100) of a slice score among healthy slices: the share of healthy
    slices scoring at most ``value``. Tied quantiles (e.g. the many healthy slices whose lsr
    score is exactly 0) count at their highest level."""
    calibration = as_calibration(calibration)
    block = calibration.slice[score]
    values = np.asarray(block.values, dtype=float)
    levels = np.asarray(block.levels, dtype=float)
    uniq, last = np.unique(values[::-1], return_index=True)  # last occurrence of each value
    top = levels[::-1][last]
    if value < uniq[0]:
        return 0.0
    return float(np.interp(value, uniq, top))


def volume_percentile(calibration: "Calibration | dict", value: float) -> float | None:
    """Healthy percentile (0..100) of a scan-level score: the share of the model's healthy
    calibration scans scoring at most ``value``; None without that calibration or score."""
    calibration = as_calibration(calibration)
    healthy = calibration.volume.values if calibration.volume is not None else []
    if not healthy or value is None or not np.isfinite(value):
        return None
    return float(100.0 * np.mean(np.asarray(healthy, dtype=float) <= value))


def broad_flag_note(flagged_share: float, healthy_rate: float | None) -> str | None:
    """One line for the reader when a threshold flags far more of this brain than it flags of
    healthy brains (``healthy_rate``, from the calibration): something to act on (read the map
    with care, or recalibrate on healthy scans of the scan's source); None otherwise or
    uncalibrated. A scan-relative map raised overall is context, not this note
    (:func:`relative.reference_note`)."""
    if healthy_rate is None or healthy_rate <= 0:
        return None
    if flagged_share <= max(BROAD_FLAG_FACTOR * healthy_rate, BROAD_FLAG_MIN_SHARE):
        return None
    return (f"{100 * flagged_share:.1f} % of this brain is above the threshold, {flagged_share / healthy_rate:.0f} times "
            f"the {100 * healthy_rate:.2g} % of healthy scans: a large lesion, or a scan unlike the training scans "
            "(then recalibrate on healthy scans of its source: anomaly-localizer calibrate).")
