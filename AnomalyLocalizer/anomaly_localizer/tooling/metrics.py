"""Detection metrics computed exactly from sorted scores (no threshold grid needed)."""

from __future__ import annotations

import numpy as np


def _sorted_counts(scores: np.ndarray, labels: np.ndarray):
    """Cumulative true/false positives at every distinct threshold, highest first."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(np.int64)
    distinct = np.nonzero(np.diff(s))[0]
    ends = np.r_[distinct, len(s) - 1]
    tp = np.cumsum(y)[ends]
    fp = (ends + 1) - tp
    return s[ends], tp, fp


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    labels = labels.astype(bool)
    npos, nneg = labels.sum(), (~labels).sum()
    if npos == 0 or nneg == 0:
        return float("nan")
    _, tp, fp = _sorted_counts(scores, labels)
    tpr = np.r_[0, tp / npos]
    fpr = np.r_[0, fp / nneg]
    return float(np.trapezoid(tpr, fpr) if hasattr(np, "trapezoid") else np.trapz(tpr, fpr))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Step-wise AP (as scikit-learn): sum over thresholds of precision x recall increment."""
    labels = labels.astype(bool)
    npos = labels.sum()
    if npos == 0:
        return float("nan")
    _, tp, fp = _sorted_counts(scores, labels)
    precision = tp / (tp + fp)
    recall = tp / npos
    return float(np.sum(np.diff(np.r_[0, recall]) * precision))


def best_dice(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Highest Dice over every threshold of the whole set, and that threshold (score > t)."""
    labels = labels.astype(bool)
    npos = labels.sum()
    thr, tp, fp = _sorted_counts(scores, labels)
    dice = 2 * tp / (2 * tp + fp + (npos - tp)).clip(min=1)
    i = int(np.argmax(dice))
    # flagged set at index i is score >= thr[i]; as a "score > t" threshold use the next value down
    t = float(thr[i + 1]) if i + 1 < len(thr) else float(thr[i]) - 1e-12
    return float(dice[i]), t


def dice_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    pred = scores > threshold
    labels = labels.astype(bool)
    denom = pred.sum() + labels.sum()
    return float(2 * (pred & labels).sum() / denom) if denom else 1.0
