"""Model cards: the README.md of a model package, written from its model.json and the
figures of the commands that measured it (evaluation, healthy false-positive rate)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...core.package import ALL_METHODS, CARD_FILE, ModelPackage, write_manifest

INTENDED = """## Intended use
Research and second-reader support: it shows where an adult brain T1-weighted MRI departs from
the healthy brains it was trained on. It does not diagnose, and a flagged region is not a
lesion until a radiologist says so; a region it does not flag is not proof of health.

## Not for
- Other contrasts (T2, FLAIR, contrast-enhanced T1, DWI): the model has not seen them and
  will flag normal anatomy.
- Children and adolescents (training subjects were adults, 20-82 years), non-brain images,
  scans with large resection cavities or heavy motion.
- Scans whose brain mask is wrong: whole-head scans are brain-extracted by the built-in model
  when no mask is given; always check `brainmask.nii.gz`, and pass `--mask` when it is off.
"""


def _fmt_thresholds(calib: dict[str, Any]) -> str:
    if not calib.get("pixel"):
        return "Not calibrated.\n"
    lines = ["| pixel score | 1 % FPR | 0.1 % FPR (default) | 0.01 % FPR |", "|---|---|---|---|"]
    for m, e in calib["pixel"].items():
        t = {f"{x['fpr']:g}": x["value"] for x in e["thresholds"]}
        lines.append(f"| {m} | {t.get('0.01', float('nan')):.4g} | {t.get('0.001', float('nan')):.4g} | "
                     f"{t.get('0.0001', float('nan')):.4g} |")
    return "\n".join(lines) + "\n"


def _limitations(meta: dict[str, Any]) -> str:
    items = meta.get("limitations") or []
    if not items:
        return ""
    return "## Known limitations\n" + "\n".join(f"- {x}" for x in items) + "\n\n"


def _restoration_lines(meta: dict[str, Any]) -> str:
    r = meta.get("restoration")
    if not r:
        return ""
    sel = r.get("selection", {})
    curve = ", ".join(f"{c['lambda']:g}: {c['healthy_mean_change']:.4f}" for c in sel.get("curve", []))
    return (f"- `restoration` (Chen et al. 2019): lambda = {r['lambda']:g}, chosen without labels on "
            f"{len(sel.get('subjects', []))} healthy validation subjects as the smallest lambda whose restoration changes "
            f"a healthy brain by at most {sel.get('tolerance', '?')} on average (lambda: mean change {curve}); "
            f"optimiser {r.get('optimizer')}, at most {r.get('steps')} steps, step {r.get('learning_rate')}.\n")


def _smoothing_lines(meta: dict[str, Any]) -> str:
    block = meta.get("map_smoothing")
    if not block:
        return ""
    sel = block.get("selection", {})
    curves = sel.get("curves", {})

    def edge(m: str, v: dict) -> str:
        # A width at the top of the searched grid may not be the best one: say so.
        c = curves.get(m) or []
        top = [k for k in ("through_plane_mm", "in_plane_mm") if c and v[k] > 0 and v[k] >= max(r[k] for r in c)]
        return " (largest on the grid)" if top else ""

    widths = "; ".join(f"`{m}` {v['through_plane_mm']:g} / {v['in_plane_mm']:g} mm{edge(m, v)}"
                       for m, v in block.items() if m != "selection")
    return (f"- Heatmap smoothing (Gaussian sigma across slices / in-plane, normalised inside the brain): {widths}; "
            f"chosen per method for the highest pixel AP on {sel.get('cases', '?')} synthetic anomalies (seed "
            f"{sel.get('seed', '?')}) in {len(sel.get('subjects', []))} validation subjects "
            "(`anomaly-localizer tune-smoothing`; every curve in `model.json`, `map_smoothing`). "
            "Thresholds are calibrated on the smoothed maps.\n")


def _scan_relative_lines(meta: dict[str, Any]) -> str:
    block = meta.get("scan_relative")
    if not block:
        return ""
    lines = []
    for m, sel in (block.get("selection") or {}).items():
        q = (block.get(m) or {}).get("quantile")
        ap = (sel.get("pixel_ap") or {}).get(m)
        figures = f" (pooled pixel AP on {sel.get('cases', '?')} validation cases: " + \
            ", ".join(f"{k} {v:.3f}" for k, v in ap.items()) + ")" if ap else f" ({sel.get('rule', '')})"
        real = (sel.get("real_cases_pixel_ap") or {}).get(m)
        if real:  # {candidate: {case: AP}}
            figures += "; mean pixel AP of the real cases " + ", ".join(next(iter(real.values()))) + ": " + \
                ", ".join(f"{k} {sum(v.values()) / len(v):.3f}" for k, v in real.items()) + \
                " (chosen on the mean of the two figures)"
        what = f"divided by its own {100 * q:g}th percentile over each scan's brain" if q else "absolute (not made relative)"
        lines.append(f"`{m}` {what}{figures}")
    if not lines:
        return ""
    return ("- Scan-relative maps (`anomaly-localizer scan-relative`; `model.json`, `scan_relative`): "
            + "; ".join(lines) + ". Thresholds are calibrated on the relative maps; each healthy calibration scan's "
            "reference value is kept, and a run says when a scan's map is raised overall beyond theirs. Slice "
            "scores stay absolute.\n")


def _finding_rule_lines(calib: dict[str, Any]) -> str:
    """The calibrated finding rules (:mod:`...core.findings`) and what they did on the
    calibration scans."""
    from ...core.findings import describe_rule
    rules = calib.get("findings") or {}
    if not rules:
        return ("\nFindings: no finding rule is calibrated; every region of at least 0.05 mL above the threshold is "
                "listed, and healthy brains show such regions too.\n")
    lines = ["\nFindings at the default threshold (a region of the segmentation is listed as a finding only when "
             "healthy brains rarely show one like it; the others stay in the segmentation, counted apart):"]
    for m, r in rules.items():
        lines.append(f"- `{m}`: {describe_rule(r)}; on those scans {r.get('regions_per_scan', 0):.2f} regions and "
                     f"{r.get('findings_per_scan', 0):.2f} findings per scan, "
                     f"{100 * r.get('scans_with_finding', 0):.0f} % of them with a finding.")
    return "\n".join(lines) + "\n"


def _context(contract: dict[str, Any]) -> str:
    n = int(contract.get("context_slices", 1))
    return f", each with its {n - 1} nearest neighbouring slices as input channels" if n > 1 else ""


def _family_lines(package: ModelPackage) -> str:
    """Architecture, scoring and training schedule, as the model's detector family describes them."""
    return "\n".join(package.detector.describe(package.meta))


def render_card(package: ModelPackage, extra_sections: str = "") -> str:
    meta = package.meta
    contract, calib = meta["input_contract"], meta.get("calibration") or {}
    prov, training = meta.get("provenance", {}), meta.get("training", {})
    subjects = prov.get("subjects", {})
    cfg = training.get("config", {})
    reads = " + ".join(c.upper() for c in package.contract.contrasts)
    optional = package.contract.optional_contrasts
    first_note = f"\n**{meta['calibration_note']}**\n" if meta.get("calibration_note") else ""
    return f"""# {package.name}

**Reads: {reads}**{f" ({', '.join(c.upper() for c in optional)} optional)" if optional else ""}. The engine
never runs it on another contrast (docs/contrasts.md).
{first_note}
{meta.get('summary', '')}

{meta.get('description', '')}

## Model
{_family_lines(package)}
- Input contract: {reads} brain MRI, {contract['orientation']} slices of
  {contract['slice_size']}x{contract['slice_size']} pixels at {contract['spacing_mm']:g} mm{_context(contract)}
  (field of view {contract['slice_size'] * contract['spacing_mm']:g} mm, centred on the brain), intensities normalised per
  volume inside the brain ({contract['normalisation']['method']}: median to {contract['normalisation'].get('median_to')},
  inter-quartile range to {contract['normalisation'].get('iqr_to')}, no clipping, 0 outside the brain).
  Any orientation and voxel size are accepted; the engine reorients and resamples, and maps
  results back onto the input's grid.
- Recommended pixel score: `{meta.get('recommended_method', 'combi')}`; methods offered: {', '.join(f'`{m}`' for m in package.methods)}.
{_restoration_lines(meta)}{_smoothing_lines(meta)}{_scan_relative_lines(meta)}
## Training data
{meta.get('data_statement', '')}
- Split by subject (seed {cfg.get('seed', '?')}): {len(subjects.get('train', []))} training,
  {len(subjects.get('val', []))} validation, {len(subjects.get('calibration', []))} calibration,
  {len(subjects.get('test', []))} held-back test subjects (lists in `model.json`, `provenance.subjects`).
- Reproduce: `{meta.get('reproduce', 'anomaly-localizer train DATA --out DIR --config config.json')}`

{INTENDED}
## Calibration
Thresholds at which the stated share of healthy brain voxels is flagged, from
{len(calib.get('subjects', []))} calibration subjects (never used for training):

{_fmt_thresholds(calib)}
The engine's default threshold is the 0.1 % one. Slice scores ({', '.join(calib.get('slice', {}) or ['none'])}) come with
their healthy distribution (`model.json`, `calibration.slice`), so a slice can be shown as a
percentile of healthy slices.
{_finding_rule_lines(calib)}
{_limitations(meta)}{extra_sections}"""


def results_sections(evaluations: list[dict[str, Any]], fpr: dict[str, Any] | None,
                     package: ModelPackage | None = None) -> str:
    """Markdown for measured figures: evaluation tables and the healthy false-positive check.
    With ``package``, an evaluation that joined several models shows only this model's rows
    (its methods, its slice scores) and the baseline."""
    def own(name: str) -> bool:
        if package is None:
            return True
        slice_names = {f"slice_{k}" for k in package.calibration.slice}
        return name in package.methods or name in slice_names or not (name in ALL_METHODS or name.startswith("slice_"))

    parts = []
    if fpr:
        parts.append(f"## Healthy false-positive rate on held-back subjects\n`{fpr.get('command', 'anomaly-localizer fpr')}` "
                     f"({len(fpr['subjects'])} subjects never used for training or calibration; "
                     f"{fpr.get('machine', '')}):\n")
        levels = list(next(iter(fpr["flagged_fraction"].values())))
        parts.append("| pixel score | " + " | ".join(f"target {100 * float(k):g} %" for k in levels) + " |")
        parts.append("|---|" + "---|" * len(levels))
        for m, row in fpr["flagged_fraction"].items():
            parts.append(f"| {m} | " + " | ".join(f"{100 * v:.3f} %" for v in row.values()) + " |")
        parts.append("")
        if fpr.get("findings"):
            parts.append("Findings on the same scans at the default threshold (regions of at least 0.05 mL; findings: "
                         "those that pass the map's calibrated finding rule):\n")
            parts.append("| pixel score | regions per scan | findings per scan | scans with a finding | largest finding |")
            parts.append("|---|---|---|---|---|")
            for m, row in fpr["findings"].items():
                parts.append(f"| {m} | {row['regions_per_scan']:.2f} | {row['findings_per_scan']:.2f} | "
                             f"{100 * row['scans_with_finding']:.0f} % | {row['largest_finding_ml']:.2f} mL |")
            parts.append("")
    for ev in evaluations:
        cs = ev.get("case_set", {})
        if cs.get("kind") != "synthetic":
            what = "Cases with manual ground truth.\n"
        elif cs.get("set") == "hard":
            what = ("The harder synthetic set: 1-3 seeded anomalies per case (ellipsoids with independent semi-axes "
                    "of 6-20 mm; intensity shifts up and down, uniform and noise patches, tissue moved from elsewhere, "
                    "sink/source deformations; contrasts from barely visible to strong; hard or soft edges, the faint "
                    "rim labelled) in healthy subjects the model never saw (`tooling/evaluation/hard_cases.py`, a generator "
                    "that never trains a model).\n")
        else:
            what = ("Seeded synthetic anomalies (local intensity shifts up and down, uniform and noise patches, "
                    "patches moved from elsewhere in the brain, sink/source deformations; one ball of radius 8-20 "
                    "mm, hard edge) inserted into healthy subjects the model never saw.\n")
        parts.append(f"## Evaluation: {ev.get('title', cs.get('kind', 'cases'))}\n{what}"
                     f"`{ev.get('command', '')}`: "
                     f"{ev['cases']} cases, {ev['lesion_voxels']} lesion voxels, {ev['abnormal_slices']} abnormal and "
                     f"{ev['normal_slices']} normal slices; {_seconds(ev, package)} ({ev.get('machine', '')}).\n")
        parts.append("| score | pixel AUROC | pixel AP | best Dice | Dice at 0.1 % FPR threshold | slice AUROC | slice AP |")
        parts.append("|---|---|---|---|---|---|---|")
        f = lambda v: "-" if v is None else f"{v:.3f}"
        for m, r in ev["methods"].items():
            if not own(m):
                continue
            parts.append(f"| {m} | {f(r.get('pixel_auroc'))} | {f(r.get('pixel_ap'))} | {f(r.get('best_dice'))} | "
                         f"{f(r.get('dice_at_calibrated'))} | {f(r.get('slice_auroc'))} | {f(r.get('slice_ap'))} |")
        for group in ("kind", "size"):
            counts = ev.get(f"cases_by_{group}") or {}
            for key, what in ((f"pixel_ap_by_{group}", "Pixel AP"), (f"slice_auroc_by_{group}", "Slice AUROC")):
                if not counts or not any(r.get(key) for r in ev["methods"].values()):
                    continue
                parts.append(f"\n{what} by anomaly {group} (number of cases):\n")
                parts.append("| score | " + " | ".join(f"{k} ({n})" for k, n in counts.items()) + " |")
                parts.append("|---|" + "---|" * len(counts))
                for m, r in ev["methods"].items():
                    by = r.get(key)
                    if by and own(m):
                        parts.append(f"| {m} | " + " | ".join(f(by.get(k)) for k in counts) + " |")
        for name, rel in (ev.get("kinds_vs_training") or {}).items():
            if not rel:  # cases without synthetic kinds (e.g. real lesions): nothing to set against
                continue
            parts.append(f"\nThe kinds against the training tasks of {name}, which learned synthetic anomalies: "
                         + "; ".join(f"{k}: {v}" for k, v in rel.items())
                         + ". A kind whose nearest task was held out, or that no task makes, tests a change the "
                           "model never trained on.")
        if any(r.get("intensity_anomalies_only") for r in ev["methods"].values()):
            parts.append("\nPooled over the intensity anomalies only (every kind but the sink/source deformations):\n")
            parts.append("| score | pixel AP | slice AUROC |")
            parts.append("|---|---|---|")
            for m, r in ev["methods"].items():
                only = r.get("intensity_anomalies_only")
                if only and own(m):
                    parts.append(f"| {m} | {f(only['pixel_ap'])} | {f(only['slice_auroc'])} |")
        losers = [m for m, r in ev["methods"].items() if r.get("beats_baseline") is False and own(m)]
        parts.append("\n`baseline_intensity` is the non-learned robust intensity outlier |x - median| / IQR; "
                     + (f"{', '.join(losers)} do(es) not beat it on pixel AP." if losers else
                        "every learned pixel score beats it on pixel AP.")
                     + " Slice AUROC and AP of a pixel score rank slices by the mean of the slice's 20 highest values; "
                       "`slice_*` rows rank them by the model's slice scores.\n")
    return "\n".join(parts)


def _seconds(ev: dict[str, Any], package: ModelPackage | None) -> str:
    models = ev.get("models") or {}
    if package is not None and package.name in models and models[package.name].get("seconds_per_case") is not None:
        return f"{models[package.name]['seconds_per_case']:.2f} s per case for this model"
    return f"{ev['seconds_per_case']:.2f} s per case"


def write_card(package: ModelPackage, extra_sections: str = "") -> Path:
    path = package.path / CARD_FILE
    path.write_text(render_card(package, extra_sections))
    write_manifest(package.path)
    return path


def render_brainmask_card(package: ModelPackage, dice: list[dict[str, Any]]) -> str:
    """Model card of a brain extraction model, with its Dice on held-back subjects (one
    section per ``brainmask-dice`` JSON; one with tumour-like lesions says how much of each
    lesion the mask kept)."""
    meta = package.meta
    subjects = meta.get("provenance", {}).get("subjects", {})
    cfg = meta.get("training", {}).get("config", {})
    runs = list(dice)
    lesion_runs = [d for d in runs if d.get("lesions")]
    lines = [f"# {package.name}", "", meta.get("summary", ""), "",
             "Finds the brain in a whole-head T1-weighted MRI so that anomaly scoring works without a "
             "user-made brain mask. Used automatically by `anomaly-localizer score` and the Slicer module "
             "when no mask is given and the scan is not skull-stripped (`--brain-extraction off` disables it).",
             "", "## Model",
             f"- 2D U-Net, feature maps {meta['architecture']['feature_maps']}, axial slices of "
             f"{meta['input_contract']['slice_size']}x{meta['input_contract']['slice_size']} pixels at "
             f"{meta['input_contract']['spacing_mm']:g} mm centred on the head; intensities normalised inside the head "
             "(median to 0.5, inter-quartile range to 0.25); probability > 0.5, largest connected component, holes filled.",
             f"- Trained {cfg.get('epochs', '?')} epochs (Adam, learning rate {cfg.get('learning_rate', '?')}, cosine "
             f"schedule, left-right flips and contrast changes) on {len(subjects.get('train', []))} subjects; "
             f"{len(subjects.get('test', []))} held back (the same split as the anomaly model).",
             "", "## Training data", meta.get("data_statement", ""), "",
             "## Not for", "- Contrasts other than T1, children, non-brain images. Images with real lesions "
             + ("were not evaluated, only synthetic ones (below). " if lesion_runs
                else "were not evaluated. ")
             + "Always look at `brainmask.nii.gz`.", ""]
    for d in runs:
        vals = list(d["dice"].values())
        les = d.get("lesions")
        title = ("## Dice on held-back subjects, each with a synthetic tumour-like lesion" if les else
                 "## Dice against the reference masks on held-back subjects")
        lines += [title, f"`{d.get('command', 'anomaly-localizer brainmask-dice')}` ({d.get('machine', '')}): "
                  f"{len(vals)} subjects never used for training, mean {d['mean']:.4f}, minimum {d['min']:.4f}."]
        if les:
            worst = sorted(les["per_subject"].items(), key=lambda kv: kv[1]["lesion_kept"])[:3]
            lines.append(f"One seeded lesion per scan (radius {les['radius_mm'][0]:g}-{les['radius_mm'][1]:g} mm, "
                         f"{', '.join(les['kinds'])}; seed {les['seed']}). Share of each lesion's voxels inside the "
                         f"extracted mask: mean {100 * les['lesion_kept_mean']:.1f} %, minimum "
                         f"{100 * les['lesion_kept_min']:.1f} %; lowest: "
                         + ", ".join(f"{k} {100 * r['lesion_kept']:.1f} % ({r['kind']})" for k, r in worst) + ".")
        lines.append("")
    return "\n".join(lines) + "\n"
