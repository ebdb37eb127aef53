"""Making a model's maps relative to each scan's own (:mod:`anomaly_localizer.core.relative`),
and choosing whether and how on validation cases.

The choice scores the tuning cases of :mod:`.tune_smoothing` (the hard synthetic set, seed 1,
in the model's *validation* subjects) once with the maps absolute, and compares the pooled
pixel AP of each method's map absolute and divided by each candidate quantile of its own
brain values. A quantile is kept only where it beats the absolute map, so a method it does
not help stays as it was. Test subjects and scans from other sources are never used; what it
does to them is measured afterwards (``fpr``, ``evaluate``).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ...core.package import ModelPackage
from ...core.relative import relative_to_scan
from ...errors import InputError
from .tune_smoothing import TUNING_SEED

CANDIDATE_QUANTILES = (0.5, 0.75, 0.9)  # the median first: a focal anomaly moves it least


def choose_quantiles(package: ModelPackage, subjects, methods: list[str], per_subject: int = 2,
                     device: str = "cpu", candidates=CANDIDATE_QUANTILES,
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Per method, the candidate quantile whose scan-relative map has the highest pooled
    pixel AP on validation cases, or None when none beats the absolute map; with the record
    of every figure. A map the package already makes relative is multiplied back by the
    value it was divided by, so the package is not changed before the choice is made."""
    from ...core.device import select_device
    from ...core.pipeline import score_volume
    from ..evaluation.evaluate import case_set
    from ..metrics import average_precision

    dev = select_device(device)
    model = package.load_model(dev)
    labels: list[np.ndarray] = []
    scores: dict[str, dict[str, list[np.ndarray]]] = {m: {} for m in methods}
    for case in case_set("hard", subjects, per_subject=per_subject, seed=TUNING_SEED):
        res = score_volume(case.image, package, methods, mask=case.mask, device=str(dev), model=model)
        brain = res.brain_mask
        labels.append((case.label & brain)[brain])
        for m in methods:
            values = res.maps[m][brain]
            if m in res.info.get("scan_relative", {}):  # back to the absolute map
                values = values * res.info["scan_relative"][m]["scan_value"]
            scores[m].setdefault("absolute", []).append(values)
            for q in candidates:
                scores[m].setdefault(f"{q:g}", []).append(relative_to_scan(values, np.ones(values.shape, bool), q)[0])
        if progress:
            progress(f"scored {case.id}")
    if not labels:
        raise InputError("no validation cases to choose on")
    y = np.concatenate(labels)
    chosen: dict[str, float | None] = {}
    record: dict[str, dict[str, float]] = {}
    for m in methods:
        record[m] = {k: average_precision(np.concatenate(v), y) for k, v in scores[m].items()}
        best = max(candidates, key=lambda q: record[m][f"{q:g}"])
        chosen[m] = best if record[m][f"{best:g}"] > record[m]["absolute"] + 1e-9 else None
        if progress:
            figures = ", ".join(f"{k} {v:.4f}" for k, v in record[m].items())
            progress(f"{m}: pixel AP {figures}: {'quantile ' + format(best, 'g') if chosen[m] else 'absolute'}")
    return {"chosen": chosen,
            "selection": {"rule": "per method, the brain quantile whose scan-relative map has the highest pooled "
                                  "pixel AP on synthetic anomalies in validation subjects, if above the absolute map's",
                          "case_set": "hard", "seed": TUNING_SEED, "per_subject": per_subject,
                          "subjects": [s.id for s in subjects], "cases": len(labels),
                          "pixel_ap": record}}


def scan_relative_block(package: ModelPackage, quantiles: dict[str, float | None],
                        selection: dict[str, Any]) -> dict[str, Any]:
    """The package's new ``scan_relative`` block: its other methods' entries kept,
    ``quantiles`` set (None: absolute), the selection record of this change."""
    old = package.meta.get("scan_relative") or {}
    block = {k: v for k, v in old.items() if k != "selection" and k not in quantiles}
    block.update({m: {"quantile": q} for m, q in quantiles.items() if q is not None})
    block["selection"] = {**(old.get("selection") or {}), **{m: selection for m in quantiles}}
    return block
