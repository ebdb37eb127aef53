"""``anomaly-localizer fuse``: make a fused model package and choose its rule on validation.

Candidates are component maps of installed, calibrated packages (``model:method``). The
choice: synthetic anomalies of the harder set (:mod:`.hard_cases`, the tuning seed) in the
components' *validation* subjects are scored once by every candidate; each map becomes
healthy anomaly levels; every subset of the candidates under every rule (mean, max, and
a weighted mean over a small grid of weights) is scored by pixel AP over all cases, and the
best is kept (ties to fewer components and simpler rules). Synthetic cases alone reward what
looks like the generator; real lesions can be given for the choice too (``select_cases``:
case folders with a ground truth, e.g. two BraTS tumours), and then the figure chosen on is
the mean of the synthetic pixel AP and the real cases' mean pixel AP. Test subjects,
calibration subjects and the tumour cases not named are never used for the choice, so the
evaluation on them stays held out. The slice score is chosen on the same cases by slice
AUROC (:func:`choose_slice_score`): the chosen fused map's top area, one component's own
slice score, or a weighted mean of two or three of them in units of their healthy spread.
The fused package is then calibrated on the components' calibration subjects like any model.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ... import __version__
from ...core.detectors.fused import FusionArchitecture
from ...core.fusion import content_sha256, standardised_slice_scores
from ...core.levels import level_scale
from ...core.package import ModelPackage, save_package
from ...core.package import resolve_package
from ...errors import InputError
from .edit import building, subjects_of

RULES = ("mean", "max")
WEIGHT_GRID = (0.5, 1.0, 2.0)  # weighted-mean candidates: each weight relative to the first component's
SELECTION_SEED = 1  # the tuning seed of tune_smoothing: evaluation uses 0 on test subjects


def parse_components(specs: list[str]) -> list[tuple[ModelPackage, str]]:
    """``model:method`` strings as (package, method); each must be calibrated for its method."""
    out = []
    for spec in specs:
        model, sep, method = spec.rpartition(":")
        if not sep or not model or not method:
            raise InputError(f"component {spec!r} is not MODEL:METHOD (e.g. brain-t1-dae:dae)")
        package = resolve_package(model)
        if package.detector and package.detector.composite:
            comps = ", ".join(f"{c['model']}:{c['method']}" for c in package.architecture["components"])
            raise InputError(f"model {package.name} is itself a fused map and cannot be a component; give the models "
                             f"it combines instead ({comps})")
        if method not in package.methods:
            raise InputError(f"model {package.name} does not offer {method} (it offers {', '.join(package.methods)})")
        if not level_scale(package.calibration, method)[1]:
            raise InputError(f"model {package.name} has no calibration for {method}; calibrate it first "
                             "(anomaly-localizer calibrate)")
        out.append((package, method))
    if len({m for _, m in out}) != len(out):
        raise InputError("each method may be a component once")
    return out


def _splits_agree(components: list[tuple[ModelPackage, str]]) -> dict[str, list[str]]:
    """The subject split the components share; refused when a component trained on another
    component's calibration or validation subjects (the fused figures would not be held out)."""
    from ..rendering import source_subject  # a rendering counts as the subject it was rendered from
    splits = [p.meta.get("provenance", {}).get("subjects", {}) for p, _ in components]
    first = splits[0]
    trained = {source_subject(i) for s in splits for i in s.get("train", [])}
    for key in ("calibration", "val", "test"):
        if trained & {source_subject(i) for s in splits for i in s.get(key, [])}:
            raise InputError(f"a component was trained on subjects that are {key} subjects of "
                             f"{components[0][0].name}; fuse models trained with the same subject split")
    return first


def fused_meta(components: list[tuple[ModelPackage, str]], rule: str, name: str,
               weights: list[float] | None = None, selection: dict[str, Any] | None = None,
               slice_parts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """model.json of a fused package (uncalibrated). ``slice_parts``: its slice score as
    component slice scores (:class:`.detectors.fused.FusedSliceScore`); None: top area."""
    finest = min((p for p, _ in components), key=lambda p: p.contract.spacing_mm)
    arch = FusionArchitecture.model_validate({
        "type": "fusion", "rule": rule,
        "components": [{"model": p.name, "method": m, "content_sha256": content_sha256(p.files),
                        **({"weight": w} if weights else {})}
                       for (p, m), w in zip(components, weights or [1.0] * len(components))],
        **({"slice_score": {"parts": slice_parts}} if slice_parts else {})})
    methods = ", ".join(m for _, m in components)
    return {
        "name": name,
        "summary": f"Fused default map: the {'weighted mean' if rule == 'weighted' else rule} of the healthy anomaly "
                   f"levels of {methods}",
        "architecture": arch.model_dump(),
        # The contract of the finest component (what the fused map's resolution is limited by),
        # reading every contrast a component reads, in the components' order.
        "input_contract": {**finest.meta["input_contract"],
                           "contrasts": list(dict.fromkeys(c for p, _ in components for c in p.contract.contrasts)),
                           "optional_contrasts": []},
        "recommended_method": "fused",
        "calibration": {},
        "provenance": {"engine_version": __version__, "subjects": _splits_agree(components),
                       "components": {p.name: p.manifest_sha256 for p, _ in components},
                       "made": time.strftime("%Y-%m-%d")},
        # The subject split's seed (the components share it), for the model card.
        "training": {"config": {"seed": components[0][0].meta.get("training", {}).get("config", {}).get("seed")},
                     "selection": (selection or {}).get("rule", "components and rule given by hand"),
                     **({"selection_record": selection} if selection else {})},
    }


def component_levels(components: list[tuple[ModelPackage, str]], subjects, per_subject: int, device: str,
                     progress: Callable[[str], None] | None = None, cases_in=None) -> list[dict[str, Any]]:
    """Each case's label, brain and every candidate's map in healthy levels: synthetic cases
    of the harder set in ``subjects``, or the given ``cases_in`` (real cases)."""
    from ...core.device import select_device
    from ...core.pipeline import score_volume
    from ..evaluation.evaluate import case_set

    dev = select_device(device)
    by_model: dict[str, tuple[ModelPackage, list[str]]] = {}
    for p, m in components:
        by_model.setdefault(p.name, (p, []))[1].append(m)
    nets = {name: p.load_model(dev) for name, (p, _) in by_model.items()}
    refs = {name: p.calibration.slice for name, (p, _) in by_model.items()}
    cases = []
    source = cases_in if cases_in is not None else case_set("hard", subjects, per_subject=per_subject,
                                                            seed=SELECTION_SEED)
    for case in source:
        levels, brain, slices = {}, None, {}
        for name, (p, ms) in by_model.items():
            res = score_volume(case.image, p, ms, mask=case.mask, device=str(dev), model=nets[name],
                               study=getattr(case, "study", None))
            brain, axis = res.brain_mask, 2 - res.axial_axis  # numpy axis of the axial index
            for m in ms:
                levels[m] = (res.maps[m] / level_scale(p.calibration, m)[0]).astype(np.float32)
            slices.update({(name, k): standardised_slice_scores(v, refs[name][k].levels, refs[name][k].values)
                           for k, v in res.slice_scores.items() if k in refs[name]})
        label = case.label & brain
        cases.append({"id": case.id, "levels": levels, "brain": brain, "label": label, "slices": slices,
                      "axial_axis": axis, "spacing_zyx": case.image.GetSpacing()[::-1],
                      "lesion_per_slice": np.moveaxis(label, axis, 0).reshape(label.shape[axis], -1).sum(1),
                      "brain_per_slice": np.moveaxis(brain, axis, 0).reshape(brain.shape[axis], -1).sum(1)})
        if progress:
            progress(f"scored {case.id} with {', '.join(levels)}")
    return cases


def candidate_rules(methods: list[str]) -> list[tuple[list[str], str, list[float]]]:
    """Every (subset, rule, weights) to try: each subset under mean and max, and subsets of
    two or more under weighted means whose weights (relative to the first) come from
    :data:`WEIGHT_GRID` (the all-equal one is the mean)."""
    out: list[tuple[list[str], str, list[float]]] = []
    for k in range(1, len(methods) + 1):
        for subset in itertools.combinations(methods, k):
            out += [(list(subset), rule, [1.0] * k) for rule in (RULES if k > 1 else ("mean",))]
            if k > 1:
                for rest in itertools.product(WEIGHT_GRID, repeat=k - 1):
                    if any(w != 1.0 for w in rest):
                        out.append((list(subset), "weighted", [1.0, *rest]))
    return out


def choose_rule(cases: list[dict[str, Any]], methods: list[str], progress: Callable[[str], None] | None = None,
                real_cases: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The candidate (:func:`candidate_rules`) with the highest pixel AP over ``cases``, or,
    with ``real_cases``, the highest mean of that and the real cases' mean pixel AP."""
    from ...core.fusion import fuse_levels
    from ..metrics import average_precision

    y = np.concatenate([c["label"][c["brain"]] for c in cases])
    table, best = [], None
    for subset, rule, weights in candidate_rules(methods):
        s = np.concatenate([fuse_levels([c["levels"][m] for m in subset], rule, weights)[c["brain"]] for c in cases])
        row: dict[str, Any] = {"methods": subset, "rule": rule, "weights": weights,
                               "pixel_ap": average_precision(s, y)}
        figure = row["pixel_ap"]
        if real_cases:
            row["real_ap"] = {c["id"]: average_precision(
                fuse_levels([c["levels"][m] for m in subset], rule, weights)[c["brain"]], c["label"][c["brain"]])
                for c in real_cases}
            figure = 0.5 * (figure + float(np.mean(list(row["real_ap"].values()))))
        row["figure"] = figure
        table.append(row)
        if progress:
            progress(f"{rule} of {', '.join(subset)}{'' if rule != 'weighted' else f' {weights}'}: figure "
                     f"{figure:.4f} (synthetic pixel AP {row['pixel_ap']:.4f})")
        if best is None or figure > best["figure"] + 1e-6:
            best = row
    real = (f" and the mean pixel AP of the real cases {', '.join(c['id'] for c in real_cases)} (the figure: the mean "
            "of the two)") if real_cases else ""
    return {"chosen": best, "table": table,
            "rule": f"chosen among every subset of {', '.join(methods)} under the rules {', '.join(RULES)} and weighted "
                    f"means (weights {', '.join(f'{w:g}' for w in WEIGHT_GRID)} relative to the first) by pixel AP on "
                    f"{len(cases)} synthetic cases of the harder set in validation subjects (seed {SELECTION_SEED})"
                    f"{real}; no test or calibration subject was used"}


def slice_auroc(cases: list[dict[str, Any]], scores: list[Any]) -> float | None:
    """Slice AUROC as the evaluation counts it (:func:`.evaluate._slice_metrics`): abnormal
    with at least SLICE_MIN_LESION lesion voxels, normal with none, others left out."""
    from ..evaluation.evaluate import SLICE_MIN_LESION
    from ..metrics import auroc
    ys, ss = [], []
    for c, s in zip(cases, scores):
        pos = c["lesion_per_slice"] >= SLICE_MIN_LESION
        keep = (c["brain_per_slice"] > 0) & (pos | (c["lesion_per_slice"] == 0))
        ys.append(pos[keep])
        ss.append(np.nan_to_num(np.asarray(s, np.float64)[keep], nan=-1e9))
    y = np.concatenate(ys)
    return auroc(np.concatenate(ss), y) if 0 < y.sum() < y.size else None


def choose_slice_score(cases: list[dict[str, Any]], chosen: dict[str, Any], models: set[str],
                       progress: Callable[[str], None] | None = None,
                       real_cases: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The slice score with the highest slice AUROC over ``cases`` (with ``real_cases``: the
    mean of that and their mean slice AUROC): the top area of the fused map of the ``chosen``
    rule (:func:`choose_rule`), one component slice score, or a weighted mean of two or three
    (weights from :data:`WEIGHT_GRID` relative to the first), each standardised on its own
    model's healthy slices; only slice scores of ``models`` (those the chosen rule keeps) are
    candidates. Returns the record and ``parts`` (None for the top area)."""
    from ...core.fusion import fuse_levels, top_area_slice_scores

    def top_area(c):
        fused = fuse_levels([c["levels"][m] for m in chosen["methods"]], chosen["rule"], chosen["weights"])
        return top_area_slice_scores(np.where(c["brain"], fused, 0), c["brain"], c["axial_axis"], c["spacing_zyx"])

    groups = [cases] + ([real_cases] if real_cases else [])
    fused_slices = [[top_area(c) for c in g] for g in groups]
    names = sorted(k for k in set.intersection(*(set(c["slices"]) for g in groups for c in g)) if k[0] in models)
    candidates: list[list[tuple[tuple[str, str], float]] | None] = [None]
    for k in (1, 2, 3):
        for subset in itertools.combinations(names, k):
            for rest in itertools.product(WEIGHT_GRID, repeat=k - 1):
                candidates.append(list(zip(subset, (1.0,) + rest)))
    table, best = [], None
    for cand in candidates:
        figures = []
        for g, top in zip(groups, fused_slices):
            if cand is None:
                scores = top
            else:
                total = sum(w for _, w in cand)
                scores = [sum(w / total * c["slices"][key] for key, w in cand) for c in g]
            figures.append(slice_auroc(g, scores) if g is cases else
                           [slice_auroc([c], [s]) for c, s in zip(g, scores)])
        row: dict[str, Any] = {"slice_score": "top area of the fused map" if cand is None else
                               [{"model": m, "score": k, "weight": w} for (m, k), w in cand],
                               "slice_auroc": figures[0]}
        figure = figures[0] or 0.0
        if real_cases:
            real = [f for f in figures[1] if f is not None]
            row["real_slice_auroc"] = dict(zip((c["id"] for c in real_cases), figures[1]))
            figure = 0.5 * (figure + float(np.mean(real))) if real else figure
        row["figure"] = figure
        table.append(row)
        if best is None or figure > best["figure"] + 1e-6:
            best = row
    if progress:
        progress(f"slice score chosen: {best['slice_score']} (figure {best['figure']:.4f}, validation slice AUROC "
                 f"{best['slice_auroc']:.4f}; the fused map's top area {table[0]['slice_auroc']:.4f})")
    return {"chosen": best, "table": table,
            "rule": f"the slice score was chosen among the fused map's top area, each component slice score "
                    f"({', '.join(f'{m}:{k}' for m, k in names)}) and weighted means of two or three of them (weights "
                    f"{', '.join(f'{w:g}' for w in WEIGHT_GRID)}, each score in units of its healthy spread) by slice "
                    "AUROC on the same cases" + (" (the mean with the real cases' mean slice AUROC)" if real_cases else ""),
            "parts": None if best["slice_score"] == table[0]["slice_score"] else best["slice_score"]}


def selection_cases(folder: str, ids: list[str] | None, image_name: str, label_name: str,
                    mask_name: str | None) -> list:
    """The real cases (:func:`.evaluate.folder_cases`) named by ``ids`` in ``folder`` (all
    when None), loaded up front so a wrong name is refused before any scoring."""
    from ..evaluation.evaluate import folder_cases
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"--select-cases {folder} is not a folder of case folders")
    known = sorted(p.name for p in root.iterdir() if p.is_dir())
    missing = [i for i in ids or [] if i not in known]
    if missing:
        raise InputError(f"--select-ids {', '.join(missing)}: no such case folder in {folder} (it holds "
                         f"{', '.join(known[:8]) or 'none'})")
    cases = [c for c in folder_cases(root, image_name, label_name, mask_name) if not ids or c.id in ids]
    if not cases:
        raise InputError(f"no case of {folder} was selected; check --select-ids and --image-name")
    return cases


def make_fused(specs: list[str], out: str | Path, data: str | None, rule: str = "auto", per_subject: int = 2,
               device: str = "cpu", force: bool = False, progress: Callable[[str], None] | None = None,
               calibrate: bool = True, meta_file: str | None = None, select_cases=None,
               weights: list[float] | None = None) -> ModelPackage:
    """Build (and, with ``data``, choose and calibrate) a fused package in ``out``; nothing is
    left in ``out`` when any step fails. ``meta_file``: JSON merged into model.json
    (summary, description, data statement, limitations). ``select_cases``: real cases
    (:class:`.evaluate.Case`) the choice also weighs (rule ``auto``). ``weights``: with rule
    ``weighted``, one per component, given (e.g. the weights chosen for another fused map)."""
    from ...core.package import load_package, read_json

    say = progress or (lambda m: None)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(f"{out} already exists; pass --force to replace it")
    if rule not in RULES + ("auto", "weighted"):
        raise InputError(f"unknown rule {rule!r}; choose auto, weighted, {', '.join(RULES)}")
    if (rule == "weighted") != (weights is not None):
        raise InputError("give --weights with --rule weighted (one per component), and only then")
    if weights is not None and (len(weights) != len(specs) or not all(w > 0 for w in weights)):
        raise InputError(f"--weights {','.join(f'{w:g}' for w in weights)}: give {len(specs)} positive weights, one "
                         "per component, in the components' order")
    extra = read_json(Path(meta_file), "metadata file", "fix the file given with --meta") if meta_file else {}
    if not isinstance(extra, dict):
        raise InputError(f"{meta_file} must hold a JSON object of model.json keys")
    components = parse_components(specs)
    # renderings of any contrast a component reads (with the T1 they were rendered from, a study)
    contrasts = list(dict.fromkeys(c for p, _ in components for c in p.contract.contrasts))
    selection, slice_parts = None, None
    if rule == "auto":
        if not data:
            raise InputError("choosing the rule needs the healthy data folder (--data)")
        val = subjects_of(components[0][0], data, "val", choosable=False, contrasts=contrasts)
        cases = component_levels(components, val, per_subject, device, say)
        real = component_levels(components, [], 0, device, say, cases_in=select_cases) if select_cases else None
        selection = choose_rule(cases, [m for _, m in components], say, real)
        chosen = selection["chosen"]
        kept = {p.name for p, m in components if m in chosen["methods"]}
        slice_choice = choose_slice_score(cases, chosen, kept, say, real)
        slice_parts = slice_choice.pop("parts")
        selection["slice_score"] = slice_choice
        selection["rule"] += "; " + slice_choice.pop("rule")
        by_method = dict(zip(chosen["methods"], chosen["weights"]))
        components = [c for c in components if c[1] in by_method]
        weights = [by_method[m] for _, m in components]
        rule = chosen["rule"]
        say(f"chosen: {rule} of {', '.join(chosen['methods'])} (figure {chosen['figure']:.4f}, validation pixel AP "
            f"{chosen['pixel_ap']:.4f})")
    meta = fused_meta(components, rule, out.name, weights=weights if rule == "weighted" else None,
                      selection=selection, slice_parts=slice_parts)
    meta.update({k: v for k, v in extra.items() if k not in ("architecture", "name", "calibration")})
    with building(out) as tmp:
        package = save_package(None, meta, tmp)
        if calibrate and data:
            from .calibrate import calibrate_package
            calibration = subjects_of(components[0][0], data, "calibration", choosable=False, contrasts=contrasts)
            package = calibrate_package(package, calibration, device=device, progress=say)
    return load_package(out)


# What a rebuilt fused package keeps of the one it is like: everything that says what it is and
# how it was chosen; its architecture is rebuilt on the components as now installed, and its
# calibration, provenance and manifest are new.
KEPT_ON_REBUILD = ("summary", "description", "data_statement", "reproduce", "limitations", "scan_relative",
                   "recommended_method")


def rebuild_fused(like: str, out: str | Path, data: str | None, device: str = "cpu", force: bool = False,
                  progress: Callable[[str], None] | None = None) -> ModelPackage:
    """A fused package like ``like`` (a model name or folder), its components pinned as they
    are installed now: the same components, rule, weights, slice score, scan-relative setting
    and texts, recalibrated on ``data``. For after a component was retrained, recalibrated or
    made scan-relative: the old fused package refuses the changed component."""
    from ...core.package import load_package

    old = resolve_package(like)
    if not (old.detector and old.detector.composite):
        raise InputError(f"model {old.name} is not a fused map; --like takes a fused model")
    if not data:
        raise InputError("a rebuilt fused model is recalibrated: give the components' healthy data (--data)")
    arch = old.architecture
    components = parse_components([f"{c['model']}:{c['method']}" for c in arch["components"]])
    weights = [c.get("weight", 1.0) for c in arch["components"]] if arch["rule"] == "weighted" else None
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(f"{out} already exists; pass --force to replace it")
    record = (old.meta.get("training") or {}).get("selection_record")
    meta = fused_meta(components, arch["rule"], out.name, weights=weights, selection=record,
                      slice_parts=(arch.get("slice_score") or {}).get("parts"))
    meta.update({k: old.meta[k] for k in KEPT_ON_REBUILD if k in old.meta})
    if "reproduce" in meta and "anomaly-localizer fuse --like" not in meta["reproduce"]:
        meta["reproduce"] += (f"; after its components changed: anomaly-localizer fuse --like {old.name} --out {out.name} "
                              "--data DATA")
    meta["training"]["rebuilt_from"] = {"model": old.name, "manifest_sha256": old.manifest_sha256,
                                        "made": (old.meta.get("provenance") or {}).get("made")}
    contrasts = list(dict.fromkeys(c for p, _ in components for c in p.contract.contrasts))
    with building(out) as tmp:
        package = save_package(None, meta, tmp)
        from .calibrate import calibrate_package
        calibration = subjects_of(components[0][0], data, "calibration", choosable=False, contrasts=contrasts)
        calibrate_package(package, calibration, device=device, progress=progress)
    return load_package(out)
