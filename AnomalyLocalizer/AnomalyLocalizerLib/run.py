"""Running the engine for the volume nodes of a study: in this process (scripts, tests) or in
a child process with progress and cancel (the GUI), and the models it can run. Both apply the
engine's rules for a study (:mod:`anomaly_localizer.core.study`) and record its inputs alike."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import vtk

from . import runner
from .geometry import volumeNodeToImage
from .inputs import studyVolumes

log = logging.getLogger(__name__)


def safeFileName(name: str) -> str:
    """A volume's name as a file name (the child run's input files are named after the volumes)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name or "").strip("._")[:60] or "volume"


def namedText(text: str, names: dict[str, str]) -> str:
    """``text`` from a child run with its input files called by the names of the volumes
    they were written from, as an in-process run calls them."""
    for path, name in names.items():
        text = text.replace(path, name)
    return text


def namedInputs(summary: dict, names: dict[str, str]) -> dict:
    """A child run's summary with its inputs and their notes named as in :func:`namedText`."""
    summary = dict(summary)
    for key in ("input", "mask"):  # written resolved: the work folder may be reached through a link
        if summary.get(key):
            summary[key] = namedText(str(summary[key]), {str(Path(p).resolve()): n for p, n in names.items()})
    if "inputs" in summary:
        summary["inputs"] = [{**i, "input": namedText(str(i.get("input", "")), names)} for i in summary["inputs"]]
    if "input_notes" in summary:
        summary["input_notes"] = [namedText(n, names) for n in summary["input_notes"]]
    return summary


@dataclass
class RunResult:
    """Engine results for one study, kept in memory so the threshold can move live; they
    belong to its first input volume (``inputNodeID``), on whose grid every map is."""

    inputNodeID: str
    maps: dict[str, np.ndarray]  # raw scores, the input's array order (k, j, i)
    brainMask: np.ndarray
    sliceScores: dict[str, np.ndarray]
    axialAxis: int
    summary: dict
    levelScale: dict[str, float] = field(default_factory=dict)  # raw score per anomaly level 1.0


class RunMixin:
    """Models, runs and child runs of :class:`AnomalyLocalizerLogic`."""

    @staticmethod
    def availableModels() -> list[dict]:
        """Installed model packages: name, path, summary, default flag (hashes checked). A
        broken package is logged and skipped; the others stay usable."""
        from anomaly_localizer.core.package import default_model_name
        from anomaly_localizer.core.installed import scan_packages

        default = default_model_name()
        good, broken = scan_packages()
        for path, reason in broken:
            log.warning("model %s is unusable and was skipped: %s", path, reason)
        return [{"name": p.name, "path": str(p.path), "summary": p.meta.get("summary", ""),
                 "default": p.name == default, "methods": p.default_methods(), "offers": list(p.methods),
                 "recommended": p.default_methods()[0] if p.methods else None, "shadows": p.shadows}
                for p in good]

    def methodsFor(self, model: str | None, includeRestoration: bool = False) -> list[str]:
        """The methods a run of ``model`` computes: its defaults, plus restoration when
        asked for and offered (restoration optimises every slice, so it is opt-in)."""
        package = self.package(model)
        methods = package.default_methods()
        if includeRestoration and "restoration" in package.methods and "restoration" not in methods:
            methods.append("restoration")
        return methods

    def package(self, model: str | None, methods: list[str] | None = None):
        """The model package to run: ``model`` if given, else one that offers ``methods``."""
        from anomaly_localizer.core.installed import resolve_package_for
        return resolve_package_for(methods, model)

    def run(self, inputVolume, model: str | None = None, methods: list[str] | None = None, mask=None,
            device: str = "auto", progress: Callable[[float, str], None] | None = None,
            cancel: Callable[[], bool] | None = None, contrasts: list[str] | None = None) -> RunResult:
        """Score a study synchronously in this process and build or update the output nodes.

        ``inputVolume``: a volume node, a list of co-registered ones of one study (``contrasts``:
        one per node, or None to have each read from its DICOM header or recognised from its
        image), or ``{contrast: node}`` (:func:`.inputs.studyVolumes`). The outputs are on the
        first volume's grid and belong to it. The engine's rules decide, in the order its
        ``score`` command applies them (:func:`anomaly_localizer.core.scoring.score_study`):
        the contrasts given, each input's grid, the brain, each input's contrast, the model
        that reads them; ``model`` None is the installed model that reads the contrasts,
        using most of them. Nothing is added to the scene when any of them refuses.
        """
        from anomaly_localizer.core.imageio import check_image
        from anomaly_localizer.core.installed import check_methods
        from anomaly_localizer.core.scoring import score_study_images
        from anomaly_localizer.core.study import Study, StudyInput, check_given

        nodes, contrasts = studyVolumes(inputVolume, contrasts)
        given = check_given(contrasts, len(nodes))
        if model is not None:
            self.package(model, methods)  # an unknown model or method is refused before any work
        elif methods:
            check_methods(list(methods))
        study = Study([StudyInput(node.GetName(), self._volumeImage(node)) for node in nodes])
        for node, inp in zip(nodes, study.inputs):  # what the score command refuses (a single slice, NaN, ...)
            check_image(inp.image, None, f"the volume {node.GetName()}")
        # the engine's one use case, as its score command (and so this logic's child run) calls it
        scored = score_study_images(study, given, self._maskImage(mask, nodes[0]), model=model, methods=methods,
                                    uncalibrated="default level", device=device, progress=progress, cancel=cancel,
                                    input_label=nodes[0].GetName(), mask_label=mask.GetName() if mask else None)
        res = scored.result
        result = RunResult(nodes[0].GetID(), res.maps, res.brain_mask, res.slice_scores, res.axial_axis,
                           scored.summary)
        self._applyResult(nodes[0], result, scored.plan.package)
        return result

    def startRun(self, inputVolume, model: str | None = None, methods: list[str] | None = None, mask=None,
                 device: str = "auto", contrasts: list[str] | None = None) -> runner.ChildRun:
        """Start the engine's ``score`` command in a child process on the volumes of a study
        (as :meth:`run` takes them: each written to a file, with its DICOM header fields, and
        ``--contrast`` for each when given); poll it, then call :meth:`finishRun`, which
        reads what the engine wrote."""
        nodes, contrasts = studyVolumes(inputVolume, contrasts)
        package = self.package(model, methods) if model is not None else None
        if package is not None:
            methods = methods or package.default_methods()
        work = runner.new_work_dir()
        try:
            files = [work / f"{k + 1}-{safeFileName(node.GetName())}.nrrd" for k, node in enumerate(nodes)]
            for node, path in zip(nodes, files):
                sitk.WriteImage(self._volumeImage(node), str(path))
            args = ["score", *map(str, files), "--out", str(work / "out"), "--device", device]
            for c in contrasts or []:
                args += ["--contrast", str(c)]
            if package is not None:
                args += ["--model", str(package.path)]
                if package.default_threshold(methods[0]) is None:
                    # The engine refuses an uncalibrated map without a threshold; the slider starts
                    # at the engine's own default level for such maps.
                    from anomaly_localizer.core.levels import UNCALIBRATED_LEVEL
                    args += ["--threshold-level", str(UNCALIBRATED_LEVEL)]
            for m in methods or []:
                args += ["--method", m]
            maskImage = self._maskImage(mask, nodes[0])
            if maskImage is not None:
                sitk.WriteImage(maskImage, str(work / "mask.nrrd"))
                args += ["--mask", str(work / "mask.nrrd")]
        except BaseException:
            runner.shutil.rmtree(work, ignore_errors=True)
            raise
        self.cancelRun()  # one run at a time: a new one replaces a running one
        run = runner.ChildRun(args=args, work_dir=work, out_dir=work / "out").start()
        run.inputNodeID = nodes[0].GetID()  # type: ignore[attr-defined]
        run.inputNode = nodes[0]  # type: ignore[attr-defined]  # node IDs are reused after a scene clear
        names = {str(path): node.GetName() for path, node in zip(files, nodes)}
        if mask is not None:
            names[str(work / "mask.nrrd")] = mask.GetName()
        run.inputNames = names  # type: ignore[attr-defined]
        self.activeRun = run
        return run

    def cancelRun(self) -> None:
        """Stop the running child run, if any (its whole process tree; returns at once)."""
        run, self.activeRun = self.activeRun, None
        if run is not None:
            run.cancel()

    def finishRun(self, run: runner.ChildRun) -> RunResult:
        """Read a finished child run's results folder (the engine's own reader) into nodes;
        raise its error if it failed."""
        from anomaly_localizer.core.package import load_package
        from anomaly_localizer.core.results import read_results
        from anomaly_localizer.errors import AnomalyLocalizerError, CancelledError

        try:
            state = run.wait()
            if state == "cancelled":
                raise CancelledError("cancelled by the user")
            if state != "done":
                raise AnomalyLocalizerError(namedText(run.error, getattr(run, "inputNames", {})))
            inputVolume = self.scene.GetNodeByID(run.inputNodeID)  # type: ignore[attr-defined]
            if inputVolume is None or inputVolume is not run.inputNode:  # type: ignore[attr-defined]
                raise AnomalyLocalizerError("the input volume was removed from the scene during the run; "
                                            "load it and run the analysis again")
            saved = read_results(run.out_dir)
            summary = namedInputs(saved.summary, getattr(run, "inputNames", {}))
            result = RunResult(inputVolume.GetID(), saved.maps, saved.brain_mask, saved.slice_scores,
                               saved.axial_axis, summary)
            # the model the engine ran: the one named, or the one it chose for the study's contrasts
            self._applyResult(inputVolume, result, load_package(summary["model"]["path"]))
            return result
        finally:
            if self.activeRun is run:
                self.activeRun = None
            run.cleanup()

    def _maskImage(self, mask, inputVolume) -> sitk.Image | None:
        """A brain mask image on the input's grid from a label map or segmentation node."""
        if mask is None:
            return None
        if mask.IsA("vtkMRMLSegmentationNode"):
            labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
            try:
                segLogic = self.appLogic.GetModuleLogic("Segmentations")
                ids = vtk.vtkStringArray()
                mask.GetSegmentation().GetSegmentIDs(ids)
                if ids.GetNumberOfValues() == 0:
                    raise ValueError(f"the mask segmentation {mask.GetName()} has no segment; add one covering the brain")
                segLogic.ExportSegmentsToLabelmapNode(mask, ids, labelmap, inputVolume)
                return volumeNodeToImage(labelmap)
            finally:
                self.scene.RemoveNode(labelmap)
        return volumeNodeToImage(mask)
