"""Join self-supervised detectors trained on different task folds into one package.

Baugh et al. (MICCAI 2023) train each fold on some task families and choose its checkpoint
on the families it held out; the shipped detector averages the folds. Each fold is a
complete training run (``train-ssl --tasks ... --held-out ...``), so folds can be trained in
different sittings and joined afterwards. The joined package is uncalibrated, like a trained
one: ``release`` calibrates it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...core.package import ModelPackage, load_package, save_package
from ...errors import InputError
from .edit import building

SAME_IN_EVERY_FOLD = ("input_contract", "ssl")


def fold_training_record(package: ModelPackage) -> dict[str, Any]:
    """What the card says of one fold: its tasks, held-out tasks, steps and chosen checkpoint."""
    training = package.meta.get("training", {})
    keep = ("config", "best_step", "best_val_figure", "steps_run", "history", "seconds_this_run", "time_note", "bf16")
    return {"source": package.name, **{k: training[k] for k in keep if k in training}}


def join_folds(sources: list[str], out: str | Path, force: bool = False) -> ModelPackage:
    """One package whose network averages the folds of ``sources`` (trained ``unet-ssl``
    packages of one architecture and input contract)."""
    if len(sources) < 2:
        raise InputError("give at least two trained folds to join")
    packages = [load_package(s) for s in sources]
    first = packages[0]
    for p in packages:
        if p.arch_type != "unet-ssl" or p.architecture.get("folds", 1) != 1:
            raise InputError(f"{p.path} is not a single self-supervised detector (architecture type unet-ssl, one "
                             "fold); join the trained folds themselves")
        if {k: v for k, v in p.architecture.items() if k != "folds"} != first.architecture:
            raise InputError(f"{p.path} has another architecture than {first.path}; folds must share it")
        for key in SAME_IN_EVERY_FOLD:
            if p.meta.get(key) != first.meta.get(key):
                raise InputError(f"{p.path} has another {key} than {first.path}; folds must share it")
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out} already exists; pass --force to replace it")

    arch = {**first.architecture, "folds": len(packages)}
    ensemble = first.detector.build_network(arch)
    for fold, package in zip(ensemble.folds, packages):
        fold.load_state_dict(package.load_model().state_dict())
    records = [fold_training_record(p) for p in packages]
    configs = [r.get("config", {}) for r in records]
    held_by_all = set.intersection(*(set(c.get("held_out", [])) for c in configs))
    meta = json.loads(json.dumps(first.meta))
    meta.update(name=out.name, architecture=arch, calibration={})
    meta["training"] = {
        # every family some fold trained on counts as trained for the ensemble (evaluate's
        # kinds-versus-training table); only a family every fold held out stays held out
        "config": {**configs[0], "tasks": sorted({t for c in configs for t in c.get("tasks", [])}),
                   "held_out": sorted(held_by_all)},
        "folds": records,
        "steps_run": sum(r.get("steps_run", 0) for r in records),
    }
    meta.setdefault("provenance", {})["folds"] = [str(s) for s in sources]
    with building(out) as tmp:
        save_package(ensemble, meta, tmp)
    return load_package(out)
