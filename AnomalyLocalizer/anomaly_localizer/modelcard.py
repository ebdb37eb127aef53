"""Model cards: the README.md of a model package, written from its model.json and the
figures of the commands that measured it (evaluation, healthy false-positive rate)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .package import CARD_FILE, ModelPackage, write_manifest

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


def render_card(package: ModelPackage, extra_sections: str = "") -> str:
    meta = package.meta
    arch, contract, calib = meta["architecture"], meta["input_contract"], meta.get("calibration") or {}
    prov, training = meta.get("provenance", {}), meta.get("training", {})
    subjects = prov.get("subjects", {})
    cfg = training.get("config", {})
    return f"""# {package.name}

{meta.get('summary', '')}

{meta.get('description', '')}

## Model
- Architecture: {arch['type'].upper()} (Zimmerer et al. 2019{', context-encoding' if arch['type'] == 'cevae' else ''}),
  feature maps {arch['feature_maps']}, latent size {arch['latent_size']}, Gaussian likelihood c = {arch['likelihood_std']:g}.
- Input contract: {contract['modality']} brain MRI, {contract['orientation']} slices of
  {contract['slice_size']}x{contract['slice_size']} pixels at {contract['spacing_mm']:g} mm
  (field of view {contract['slice_size'] * contract['spacing_mm']:g} mm, centred on the brain), intensities normalised per
  volume inside the brain ({contract['normalisation']['method']}: median to {contract['normalisation'].get('median_to')},
  inter-quartile range to {contract['normalisation'].get('iqr_to')}, no clipping, 0 outside the brain).
  Any orientation and voxel size are accepted; the engine reorients and resamples, and maps
  results back onto the input's grid.
- Recommended pixel score: `{meta.get('recommended_method', 'combi')}`.

## Training data
{meta.get('data_statement', '')}
- Split by subject (seed {cfg.get('seed', '?')}): {len(subjects.get('train', []))} training,
  {len(subjects.get('val', []))} validation, {len(subjects.get('calibration', []))} calibration,
  {len(subjects.get('test', []))} held-back test subjects (lists in `model.json`, `provenance.subjects`).
- Schedule: Adam, learning rate {cfg.get('learning_rate', '?')}, divided by 10 on a validation plateau, early stop
  after {cfg.get('early_stop_patience', '?')} epochs without improvement; best epoch {training.get('best_epoch', '?')}
  of {training.get('epochs_run', '?')}; batch {cfg.get('batch_size', '?')}; augmentation: left-right flips, rotations
  up to {cfg.get('rotate_deg', '?')} degrees, scaling +-{cfg.get('scale_range', '?')}, brightness, noise.
- Reproduce: `{meta.get('reproduce', 'anomaly-localizer train DATA --out DIR --config config.json')}`

{INTENDED}
## Calibration
Thresholds at which the stated share of healthy brain voxels is flagged, from
{len(calib.get('subjects', []))} calibration subjects (never used for training):

{_fmt_thresholds(calib)}
The engine's default threshold is the 0.1 % one. Slice scores (ELBO, KL, Rec) come with
their healthy distribution (`model.json`, `calibration.slice`), so a slice can be shown as a
percentile of healthy slices.

{_limitations(meta)}{extra_sections}"""


def results_sections(evaluations: list[dict[str, Any]], fpr: dict[str, Any] | None) -> str:
    """Markdown for measured figures: evaluation tables and the healthy false-positive check."""
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
    for ev in evaluations:
        cs = ev.get("case_set", {})
        parts.append(f"## Evaluation: {ev.get('title', cs.get('kind', 'cases'))}\n"
                     "Seeded synthetic anomalies (local intensity shifts up and down, uniform and noise patches, "
                     "patches moved from elsewhere in the brain, sink/source deformations; radius 8-20 mm) inserted "
                     "into healthy subjects the model never saw.\n"
                     f"`{ev.get('command', '')}`: "
                     f"{ev['cases']} cases, {ev['lesion_voxels']} lesion voxels, {ev['abnormal_slices']} abnormal and "
                     f"{ev['normal_slices']} normal slices; {ev['seconds_per_case']:.2f} s per case ({ev.get('machine', '')}).\n")
        parts.append("| score | pixel AUROC | pixel AP | best Dice | Dice at 0.1 % FPR threshold | slice AUROC | slice AP |")
        parts.append("|---|---|---|---|---|---|---|")
        f = lambda v: "-" if v is None else f"{v:.3f}"
        for m, r in ev["methods"].items():
            parts.append(f"| {m} | {f(r.get('pixel_auroc'))} | {f(r.get('pixel_ap'))} | {f(r.get('best_dice'))} | "
                         f"{f(r.get('dice_at_calibrated'))} | {f(r.get('slice_auroc'))} | {f(r.get('slice_ap'))} |")
        losers = [m for m, r in ev["methods"].items() if r.get("beats_baseline") is False]
        parts.append("\n`baseline_intensity` is the non-learned robust intensity outlier |x - median| / IQR; "
                     + (f"{', '.join(losers)} do(es) not beat it on pixel AP." if losers else
                        "every learned pixel score beats it on pixel AP.")
                     + " `slice_*` rows rank slices by the model's slice scores.\n")
    return "\n".join(parts)


def write_card(package: ModelPackage, extra_sections: str = "") -> Path:
    path = package.path / CARD_FILE
    path.write_text(render_card(package, extra_sections))
    write_manifest(package.path)
    return path


def render_brainmask_card(package: ModelPackage, dice: dict[str, Any] | None) -> str:
    """Model card of a brain extraction model, with its Dice on held-back subjects."""
    meta = package.meta
    subjects = meta.get("provenance", {}).get("subjects", {})
    cfg = meta.get("training", {}).get("config", {})
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
             "## Not for", "- Contrasts other than T1, children, images with large lesions near the brain surface "
             "(not evaluated here), non-brain images. Always look at `brainmask.nii.gz`.", ""]
    if dice:
        vals = list(dice["dice"].values())
        lines += ["## Dice against the reference masks on held-back subjects",
                  f"`{dice.get('command', 'anomaly-localizer brainmask-dice')}` ({dice.get('machine', '')}): "
                  f"{len(vals)} subjects never used for training, mean {dice['mean']:.4f}, minimum {dice['min']:.4f}.", ""]
    return "\n".join(lines) + "\n"
