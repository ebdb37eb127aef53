"""Making a model's maps relative to each scan's own (:mod:`anomaly_localizer.core.relative`),
and choosing whether and how on validation cases.

The choice scores the tuning cases of :mod:`.tune_smoothing` (the hard synthetic set, seed 1,
in the model's *validation* subjects) once with the maps absolute, and compares the pooled
pixel AP of each method's map absolute and divided by each candidate quantile of its own
brain values. Real cases with a ground truth can be given too (``real_cases``, e.g. two BraTS
tumours), and then the figure is the mean of the synthetic pooled pixel AP and the real
cases' mean pixel AP, as in ``fuse``; but a case's own AP is blind to dividing its map by one
number, so they are recorded rather than decisive. What a tumour does to the reference (it
raises its scan's high quantiles) shows at the threshold; weighing that is a next step. A quantile is kept only where it beats the absolute map, so a
method it does not help stays as it was. Test subjects, scans from other sources and real
cases not named are never used; what it does to them is measured afterwards (``fpr``,
``evaluate``).
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
                     progress: Callable[[str], None] | None = None, real_cases=None) -> dict[str, Any]:
    """Per method, the candidate quantile whose scan-relative map has the highest figure
    (pooled pixel AP on validation cases; with ``real_cases``, its mean with their mean
    pixel AP), or None when none beats the absolute map; with the record of every figure. A
    map the package already makes relative is multiplied back by the value it was divided
    by, so the package is not changed before the choice is made."""
    from ...core.device import select_device
    from ...core.pipeline import score_volume
    from ..evaluation.evaluate import case_set
    from ..metrics import average_precision

    dev = select_device(device)
    model = package.load_model(dev)
    def scored(cases):
        """Each case's brain labels and, per method, its map absolute and relative to each candidate."""
        out = []
        for case in cases:
            res = score_volume(case.image, package, methods, mask=case.mask, device=str(dev), model=model)
            brain = res.brain_mask
            maps: dict[str, dict[str, np.ndarray]] = {}
            for m in methods:
                values = res.maps[m][brain]
                if m in res.info.get("scan_relative", {}):  # back to the absolute map
                    values = values * res.info["scan_relative"][m]["scan_value"]
                maps[m] = {"absolute": values, **{f"{q:g}": relative_to_scan(values, np.ones(values.shape, bool), q)[0]
                                                  for q in candidates}}
            out.append(((case.label & brain)[brain], maps))
            if progress:
                progress(f"scored {case.id}")
        return out

    synthetic = scored(case_set("hard", subjects, per_subject=per_subject, seed=TUNING_SEED))
    if not synthetic:
        raise InputError("no validation cases to choose on")
    real = scored(real_cases) if real_cases else []
    y = np.concatenate([label for label, _ in synthetic])
    chosen: dict[str, float | None] = {}
    record: dict[str, dict[str, float]] = {}
    real_record: dict[str, dict[str, list[float]]] = {}
    for m in methods:
        keys = ["absolute"] + [f"{q:g}" for q in candidates]
        record[m] = {k: average_precision(np.concatenate([maps[m][k] for _, maps in synthetic]), y) for k in keys}
        figure = dict(record[m])
        if real:
            real_record[m] = {k: [average_precision(maps[m][k], label) for label, maps in real] for k in keys}
            figure = {k: 0.5 * (record[m][k] + float(np.mean(real_record[m][k]))) for k in keys}
        best = max(candidates, key=lambda q: figure[f"{q:g}"])
        chosen[m] = best if figure[f"{best:g}"] > figure["absolute"] + 1e-9 else None
        if progress:
            figures = ", ".join(f"{k} {v:.4f}" for k, v in figure.items())
            progress(f"{m}: figure {figures}: {'quantile ' + format(best, 'g') if chosen[m] else 'absolute'}")
    real_text = (f" and the mean pixel AP of the real cases {', '.join(c.id for c in real_cases)} (the figure: the "
                 "mean of the two)") if real else ""
    return {"chosen": chosen,
            "selection": {"rule": "per method, the brain quantile whose scan-relative map has the highest pooled "
                                  "pixel AP on synthetic anomalies in validation subjects" + real_text +
                                  ", if above the absolute map's",
                          "case_set": "hard", "seed": TUNING_SEED, "per_subject": per_subject,
                          "subjects": [s.id for s in subjects], "cases": len(synthetic),
                          "pixel_ap": record,
                          **({"real_cases_pixel_ap": {m: {k: dict(zip((c.id for c in real_cases), v))
                                                          for k, v in r.items()} for m, r in real_record.items()}}
                             if real else {})}}


def scan_relative_block(package: ModelPackage, quantiles: dict[str, float | None],
                        selection: dict[str, Any]) -> dict[str, Any]:
    """The package's new ``scan_relative`` block: its other methods' entries kept,
    ``quantiles`` set (None: absolute), the selection record of this change."""
    old = package.meta.get("scan_relative") or {}
    block = {k: v for k, v in old.items() if k != "selection" and k not in quantiles}
    block.update({m: {"quantile": q} for m, q in quantiles.items() if q is not None})
    block["selection"] = {**(old.get("selection") or {}), **{m: selection for m in quantiles}}
    return block
