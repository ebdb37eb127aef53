"""Score one study: the engine's one use case (:func:`score_study_images`, in memory) and
its results folder (:func:`score_study`). The command line's ``score``, screening, the Python
API, the Slicer logic (in this process, and its child process through ``score``) and the
browser viewer (through the logic) all come through it; the command line is argument parsing
around it, as TorchIO's is.

Everything that can be refused is checked before any scoring and before any write, in one
order: the output folder, the contrasts given, the methods, the inputs (readable, one grid
or overlapping), the brain mask, each input's contrast, the model that reads them, the
threshold. Then the model scores, and the folder is written all or nothing
(:func:`.results.write_results`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

ProgressFn = Callable[[float, str], None]


Input = "str | Path | tuple[str, str | None]"  # a file or DICOM folder, or (DICOM folder, series UID)
Annotate = Callable[..., "tuple[dict[str, Any], Callable[[Path, np.ndarray, dict[str, Any]], None] | None]"]


def score_study(inputs: Sequence[Input], out: str | Path, contrasts: Sequence[str | None] | None = None,
                model: str | None = None, methods: Sequence[str] | None = None, mask: str | Path | None = None,
                brain_extraction: str = "auto", threshold: float | None = None, threshold_level: float | None = None,
                device: str = "auto", force: bool = False, progress: ProgressFn | None = None,
                cancel: Callable[[], bool] | None = None, network: Any = None,
                annotate: Annotate | None = None) -> dict[str, Any]:
    """Score the co-registered scans ``inputs`` of one study (files or DICOM folders; maps
    on the first one's grid) into ``out`` and return the summary as written.

    ``contrasts``: one per input (``t1``, ``t1c``, ``t2``, ``flair``, ``pd``; None for one
    to recognise), or None to have each read from its DICOM header or recognised from its
    image (:mod:`.study`). ``model``: a model name or folder, or None for the installed
    model that reads the study's contrasts. ``network``: that model's network, already
    loaded (screening loads it once per worker). ``annotate(result, package, threshold,
    study)`` returns what a caller adds to the summary and a function that adds files to the
    folder before it is published (screening: its ranking record and a thumbnail). The other
    arguments are the ``score`` command's. The scoring itself is :func:`score_study_images`,
    which the Slicer logic's in-process run calls with the scene's volumes.
    """
    from .imageio import as_3d, read_image
    from .installed import check_methods
    from .results import Segmented, check_output_dir, write_results
    from .brainextract import check_brain_extraction
    from .paths import check_force_keeps
    from .study import Study, StudyInput, check_given

    t0 = time.perf_counter()
    out = Path(out)
    if not inputs:
        raise InputError("no input given; give one or more scans of one study")
    check_output_dir(out, force)
    paths_used = [("input", p[0] if isinstance(p, tuple) else p) for p in inputs] + [("mask", mask)]
    if force:
        check_force_keeps(out, paths_used)
    check_brain_extraction(brain_extraction)
    given = check_given(contrasts, len(inputs))
    if methods:
        check_methods(list(methods))
    many = len(inputs) > 1

    def read(k: int, item) -> StudyInput:
        path, series = (item if isinstance(item, tuple) else (item, None))
        what = f"INPUT {k + 1}" if many else "INPUT"
        return StudyInput(str(path) + (f" (DICOM series {series})" if series else ""),
                          as_3d(read_image(path, what, series)))
    study = Study([read(k, p) for k, p in enumerate(inputs)])
    mask_image = as_3d(read_image(mask, "MASK")) if mask else None

    def keep_model(package) -> None:  # --force never replaces the model in use or a brain extraction named
        if force:
            extraction = check_brain_extraction(brain_extraction)
            check_force_keeps(out, [("model", package.path)] + ([("brain extraction model", extraction.path)]
                                                               if extraction is not None else []))
    first = inputs[0][0] if isinstance(inputs[0], tuple) else inputs[0]
    scored = score_study_images(study, given, mask_image, model=model, methods=methods,
                                brain_extraction=brain_extraction, threshold=threshold,
                                threshold_level=threshold_level, device=device, progress=progress, cancel=cancel,
                                network=network, input_label=str(Path(first).resolve()),
                                mask_label=str(Path(mask).resolve()) if mask else None, started=t0,
                                before_scoring=keep_model)
    extras = None
    summary = scored.summary
    if annotate is not None:
        added, extras = annotate(scored.result, scored.plan.package, scored.threshold, study)
        summary = {**summary, **added}
    segmented = Segmented(scored.segmented.segmentation, scored.segmented.findings, summary)
    return write_results(out, study.reference, scored.result, scored.threshold, summary, force=force,
                         extras=extras, segmented=segmented)


@dataclass
class ScoredStudy:
    """A study scored in memory: its plan, the engine's result, the threshold it was segmented
    at, and the summary exactly as summary.json holds it (:attr:`summary`)."""

    plan: "StudyPlan"
    result: Any  # pipeline.ScoreResult
    threshold: Any  # results.Threshold
    segmented: Any  # results.Segmented

    @property
    def summary(self) -> dict[str, Any]:
        return self.segmented.summary


def score_study_images(study, given: Sequence[str | None], mask: sitk.Image | None, model: str | None = None,
                       methods: Sequence[str] | None = None, brain_extraction: str = "auto",
                       threshold: float | None = None, threshold_level: float | None = None,
                       uncalibrated: str = "refuse", device: str = "auto", progress: ProgressFn | None = None,
                       cancel: Callable[[], bool] | None = None, network: Any = None, input_label: str = "",
                       mask_label: str | None = None, started: float | None = None,
                       before_scoring: Callable[[Any], None] | None = None) -> ScoredStudy:
    """The engine's one scoring use case: a study read into memory (:class:`.study.Study`) is
    planned (:func:`plan_study`: every refusal before any scoring), scored, segmented at its
    threshold and summarised by the one summary builder. ``score``, screening and the Slicer
    logic (in this process; its child runs ``score``) all come through here, so their
    summaries are equal.

    ``uncalibrated``: what a map without a calibrated threshold gets when no threshold is
    given: ``"refuse"`` (the command line: the user chooses one) or ``"default level"``
    (:data:`.levels.UNCALIBRATED_LEVEL`, where a slider moves it at once: Slicer, the viewer).
    ``input_label``/``mask_label``: what summary.json calls the first input and the mask.
    ``before_scoring(package)``: a caller's last check once the model is known."""

    from .hashing import one_run

    if uncalibrated not in ("refuse", "default level"):
        raise ValueError(f"uncalibrated must be 'refuse' or 'default level', not {uncalibrated!r}")
    with one_run():  # each package file hashed once, however often the run meets it
        return _score_study_images(study, given, mask, model, methods, brain_extraction, threshold, threshold_level,
                                   uncalibrated, device, progress, cancel, network, input_label, mask_label,
                                   time.perf_counter() if started is None else started, before_scoring)


def _score_study_images(study, given, mask, model, methods, brain_extraction, threshold, threshold_level,
                        uncalibrated, device, progress, cancel, network, input_label, mask_label, t0,
                        before_scoring) -> ScoredStudy:
    from .levels import UNCALIBRATED_LEVEL
    from .results import check_threshold_options, resolve_threshold, run_summary, segment_result

    plan = plan_study(study, given, mask, model, methods, brain_extraction, device, progress)
    if (uncalibrated == "default level" and threshold is None and threshold_level is None
            and plan.package.default_threshold(plan.methods[0]) is None):
        threshold_level = UNCALIBRATED_LEVEL
    check_threshold_options(plan.package, plan.methods[0], threshold, threshold_level)
    if before_scoring is not None:
        before_scoring(plan.package)
    t_read = time.perf_counter() - t0
    result = run_plan(plan, device, progress, cancel, brain_extraction, network)
    chosen = resolve_threshold(plan.package, result, plan.methods[0], threshold, threshold_level)
    summary = run_summary(plan.package, result, chosen, input=input_label, mask=mask_label)
    summary.update(plan.record())
    notes = run_notes(plan, result, chosen, reference=study.reference)
    if notes:
        summary["run_notes"] = notes
    extraction = {"brain_extraction_s": study.extraction_s} if study.extracted_on is not None else {}
    summary["timings_s"] = {"read": t_read - study.extraction_s, **extraction, **summary["timings_s"]}
    return ScoredStudy(plan, result, chosen, segment_result(study.reference, result, chosen, summary))


SMALL_MASK_ML = 200.0  # a brain mask below this is noted: a brain is 1000-1800 mL


def run_notes(plan: "StudyPlan", result, chosen, reference: sitk.Image) -> list[str]:
    """What a reader must know of how this run was scored, said on stderr and kept in
    summary.json ``run_notes``: a brain mask far smaller than a brain, a raw threshold of 0
    or below (every map is 0 or above, so it flags the whole brain)."""
    notes = []
    voxels = int(result.brain_mask.sum())
    ml = voxels * float(np.prod(reference.GetSpacing()[:3])) / 1000.0
    if ml < SMALL_MASK_ML:
        notes.append(f"the brain mask ({plan.brain_source}) covers only {voxels} voxels ({ml:.3g} mL; a brain is "
                     "1000-1800 mL): the volume and slice scores assume a whole brain and are not comparable with "
                     "healthy scans")
    if chosen.source == "user" and chosen.value <= 0:
        notes.append(f"--threshold {chosen.value:g} is 0 or below: every brain voxel scoring above it is flagged, nearly "
                     "the whole brain (the maps are 0 or above); give a positive raw score or --threshold-level")
    return notes


@dataclass
class StudyPlan:
    """A study with everything decided before scoring: its brain (and where it came from),
    each input's contrast, the model that reads them and the contrasts it uses."""

    study: Any
    brain: np.ndarray
    brain_source: str
    package: Any
    methods: list[str]
    used: list[str]

    def record(self) -> dict[str, Any]:
        """What summary.json says of the inputs (:meth:`.study.Study.record`)."""
        out: dict[str, Any] = {"inputs": self.study.record(self.used), "contrasts_read": list(self.used)}
        if self.study.notes:
            out["input_notes"] = list(self.study.notes)
        return out


def plan_study(study, given: Sequence[str | None], mask: sitk.Image | None, model: Any = None,
               methods: Sequence[str] | None = None, brain_extraction: str | None = "auto", device: str = "auto",
               progress: ProgressFn | None = None) -> StudyPlan:
    """The engine's rules for a study read into memory (:mod:`.study`), in one order: the
    contrasts given or in DICOM headers, every input on the first one's grid, the brain,
    each input's contrast (recognised where not known), the model that reads them (``model``
    given or chosen), its methods; inputs it does not read are noted. Refuses (InputError or
    PackageError) before any scoring. The Slicer logic's in-process run uses it as is."""
    from .installed import check_methods
    from .study import (
        align,
        check_extraction,
        choose_model,
        evidence_without_image,
        inputs_text,
        reads,
        recognise,
        unknown_contrast_message,
    )

    for inp, g in zip(study.inputs, given):
        inp.evidence = evidence_without_image(inp.image, g)
    align(study)
    brain, source = study_brain(study, mask, brain_extraction, device, progress)
    recognise(study, given, brain)
    check_extraction(study)
    unknown = [i for i in study.inputs if i.contrast is None]
    if unknown:
        raise InputError(unknown_contrast_message(unknown[0]))
    package = choose_model(study.contrasts, model, methods, lambda: inputs_text(study))
    chosen = check_methods(list(methods) if methods else package.default_methods(), package)
    _, used = reads(package, study.contrasts)
    for i in study.inputs:
        if i.contrast not in used:
            study.notes.append(f"{i.source} ({i.contrast}) is recorded but not used: model {package.name} reads "
                               f"{', '.join(package.contract.contrasts)}")
    return StudyPlan(study, brain, source, package, chosen, list(used))


def run_plan(plan: StudyPlan, device: str = "auto", progress: ProgressFn | None = None,
             cancel: Callable[[], bool] | None = None, brain_extraction: str | None = "auto",
             network: Any = None):
    """Score a planned study: maps on its first input's grid (:func:`.pipeline.score_volume`)."""
    from .pipeline import score_volume
    mask_img = sitk.GetImageFromArray(plan.brain.astype(np.uint8))
    mask_img.CopyInformation(plan.study.reference)
    result = score_volume(plan.study.reference, plan.package, plan.methods, mask=mask_img, device=device,
                          progress=progress, cancel=cancel, brain_extraction=brain_extraction,
                          study=plan.study.images(), model=network)
    result.info["brain_mask_source"] = plan.brain_source
    return result


def study_brain(study, mask: sitk.Image | None, brain_extraction: str | None, device: str,
                progress: ProgressFn | None) -> tuple[np.ndarray, str]:
    """The study's brain mask on the first input's grid and where it came from: the mask
    given, the first input's non-zero region when it is skull-stripped, else brain extraction
    on the study's T1 (given or from its header) or, failing one, on the first input; the
    extraction model's contrasts are checked once the contrasts are known (:func:`check_extraction`)."""
    from .device import select_device
    from .single import extract_whole_head, find_brain
    from .volume import NotSkullStripped, brain_mask

    if mask is not None:
        return brain_mask(study.reference, mask), "given"
    try:
        return brain_mask(study.reference, None, None), "non-zero region of a skull-stripped input"
    except NotSkullStripped:
        if brain_extraction in (None, "off"):
            raise
    target = next((i for i in study.inputs if i.contrast in ("t1", "t1c")), study.inputs[0])
    t0 = time.perf_counter()
    if target is study.inputs[0]:  # the first input is known to be a whole head: extract at once
        arr, source = extract_whole_head(target.image, brain_extraction, select_device(device), progress)
    else:
        arr, source = find_brain(target.image, None, brain_extraction, select_device(device), progress)
    study.extracted_on = target
    study.extraction_s = time.perf_counter() - t0
    return arr, source + (f" on {target.source}" if len(study.inputs) > 1 else "")
