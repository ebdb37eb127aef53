"""Running the engine for a volume node: in this process (scripts, tests) or in a child
process with progress and cancel (the GUI), and the models it can run."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import SimpleITK as sitk
import vtk

from . import runner
from .geometry import volumeNodeToImage

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """Engine results for one input, kept in memory so the threshold can move live."""

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
            cancel: Callable[[], bool] | None = None) -> RunResult:
        """Score synchronously in this process and build or update the output nodes."""
        from anomaly_localizer.core.pipeline import score_volume

        package = self.package(model, methods)
        methods = methods or package.default_methods()
        image = volumeNodeToImage(inputVolume)
        maskImage = self._maskImage(mask, inputVolume)
        res = score_volume(image, package, methods, mask=maskImage, device=device, progress=progress, cancel=cancel)
        summary = {"model": {"name": package.name, "manifest_sha256": package.manifest_sha256},
                   "methods": methods, "device": res.device, "timings_s": res.timings,
                   "volume_score": res.volume_score, "brain_mask_source": res.info["brain_mask_source"],
                   "primary_slice_score": res.info["primary_slice_score"],
                   "map_smoothing_mm": res.info["map_smoothing"]}
        if res.info.get("scan_relative"):  # what each scan-relative map was divided by, as summary.json says it
            from anomaly_localizer.core.relative import reference_summary
            summary["scan_relative"] = reference_summary(package, res.info["scan_relative"])
        if "fusion" in res.info:  # what a fused map combines, as summary.json says it
            from anomaly_localizer.core.results import fusion_block
            summary["fusion"] = fusion_block(package, res)
        result = RunResult(inputVolume.GetID(), res.maps, res.brain_mask, res.slice_scores, res.axial_axis, summary)
        self._applyResult(inputVolume, result, package)
        return result

    def startRun(self, inputVolume, model: str | None = None, methods: list[str] | None = None, mask=None,
                 device: str = "auto") -> runner.ChildRun:
        """Start the engine in a child process; poll it, then call :meth:`finishRun`."""
        package = self.package(model, methods)
        methods = methods or package.default_methods()
        work = runner.new_work_dir()
        try:
            sitk.WriteImage(volumeNodeToImage(inputVolume), str(work / "input.nrrd"))
            args = ["score", str(work / "input.nrrd"), "--out", str(work / "out"), "--model", str(package.path),
                    "--device", device]
            if package.default_threshold(methods[0]) is None:
                # The engine refuses an uncalibrated map without a threshold; the slider starts
                # at the engine's own default level for such maps.
                from anomaly_localizer.core.levels import UNCALIBRATED_LEVEL
                args += ["--threshold-level", str(UNCALIBRATED_LEVEL)]
            for m in methods:
                args += ["--method", m]
            maskImage = self._maskImage(mask, inputVolume)
            if maskImage is not None:
                sitk.WriteImage(maskImage, str(work / "mask.nrrd"))
                args += ["--mask", str(work / "mask.nrrd")]
        except BaseException:
            runner.shutil.rmtree(work, ignore_errors=True)
            raise
        self.cancelRun()  # one run at a time: a new one replaces a running one
        run = runner.ChildRun(args=args, work_dir=work, out_dir=work / "out").start()
        run.inputNodeID = inputVolume.GetID()  # type: ignore[attr-defined]
        run.inputNode = inputVolume  # type: ignore[attr-defined]  # node IDs are reused after a scene clear
        run.modelPath = str(package.path)  # type: ignore[attr-defined]
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
                raise AnomalyLocalizerError(run.error)
            inputVolume = self.scene.GetNodeByID(run.inputNodeID)  # type: ignore[attr-defined]
            if inputVolume is None or inputVolume is not run.inputNode:  # type: ignore[attr-defined]
                raise AnomalyLocalizerError("the input volume was removed from the scene during the run; "
                                            "load it and run the analysis again")
            saved = read_results(run.out_dir)
            result = RunResult(inputVolume.GetID(), saved.maps, saved.brain_mask, saved.slice_scores,
                               saved.axial_axis, saved.summary)
            self._applyResult(inputVolume, result, load_package(run.modelPath))  # type: ignore[attr-defined]
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
