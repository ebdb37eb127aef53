"""AnomalyLocalizer: unsupervised anomaly localisation in brain MRI, as a 3D Slicer module.

Module, parameter node, widget and in-app test. The widget is thin: every decision lives
in AnomalyLocalizerLib.logic (Qt-free, tested headless) or in the engine
(anomaly_localizer, never imports Slicer). Torch is not imported when the module loads; it
is installed on first use, with the user's consent.
"""

import os
from typing import Annotated, Optional, Union

import qt
import slicer
import vtk
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

DEVICES = ["auto", "cpu", "cuda", "mps"]
PYTHON_REQUIREMENTS = ["torch>=2.1,<3", "safetensors>=0.4", "pydantic>=2.7,<3"]


#
# Module
#

class AnomalyLocalizer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Anomaly Localizer"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["AnomalyLocalizer contributors"]
        self.parent.helpText = (
            "Shows where a brain MRI departs from healthy anatomy, with models trained only on healthy brains: "
            "per-slice anomaly scores, per-voxel heatmaps, and a threshold that turns a heatmap into an anomaly "
            "segmentation. Research software, not for diagnosis. "
            "See <a href='https://github.com/anomaly-localizer/SlicerAnomalyLocalizer'>the documentation</a>.")
        self.parent.acknowledgementText = (
            "Methods of Zimmerer et al. (MICCAI 2019). The shipped model was trained on the IXI dataset "
            "(CC BY-SA 3.0).")


#
# Parameter node
#

@parameterNodeWrapper
class AnomalyLocalizerParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    brainMask: Optional[Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode]]
    device: Annotated[str, Choice(DEVICES)] = "auto"
    includeRestoration: bool = False
    threshold: Annotated[float, WithinRange(0.0, 2.0)] = 0.4
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6


#
# Widget
#

class AnomalyLocalizerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._needsInstall = False  # the engine's Python packages are missing (first use)
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.onPollRun)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AnomalyLocalizer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        from AnomalyLocalizerLib.logic import AnomalyLocalizerLogic
        self.logic = AnomalyLocalizerLogic(slicer.app.applicationLogic())

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.thresholdSlider.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.opacitySlider.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.methodSelector.connect("currentIndexChanged(int)", self.onMethodChanged)
        self.ui.worstSliceButton.connect("clicked(bool)", self.onWorstSlice)
        self.ui.exportSegmentationButton.connect("clicked(bool)", self.onExportSegmentation)
        self.ui.exportTableButton.connect("clicked(bool)", self.onExportTable)
        self.ui.openWorklistButton.connect("clicked(bool)", self.onOpenWorklist)
        self.ui.nextScanButton.connect("clicked(bool)", lambda: self.onStepWorklist(self.logic.nextScan))
        self.ui.previousScanButton.connect("clicked(bool)", lambda: self.onStepWorklist(self.logic.previousScan))
        self.ui.progressBar.setVisible(False)
        self.populateModels()
        self.initializeParameterNode()
        self.updateResultControls()
        self.updateWorklistControls()

    def cleanup(self) -> None:
        self.removeObservers()
        if self._run is not None:
            self._run.cancel()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateApplyButton)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(AnomalyLocalizerParameterNode(self._moduleLogic().getParameterNode()))
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    @staticmethod
    def _moduleLogic() -> ScriptedLoadableModuleLogic:
        """Slicer's module logic for the parameter node, tagged with this module's name (a bare
        ScriptedLoadableModuleLogic would tag it "ScriptedLoadableModule", shared with every
        module that does the same). The scriptable logic is AnomalyLocalizerLib.logic."""
        moduleLogic = ScriptedLoadableModuleLogic()
        moduleLogic.moduleName = "AnomalyLocalizer"
        return moduleLogic

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateApplyButton)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateApplyButton)
            self.updateApplyButton()

    # -------------------------------------------------------------------- models
    def populateModels(self) -> None:
        self.ui.modelSelector.clear()
        self._needsInstall = False
        try:
            models = self.logic.availableModels()
        except ImportError:  # the engine's packages (e.g. pydantic) come with PyTorch on first use
            self._needsInstall = True
            models = []
        for m in models:
            self.ui.modelSelector.addItem(m["name"] + (" (default)" if m["default"] else ""), m["path"])
        defaultIndex = next((i for i, m in enumerate(models) if m["default"]), 0)
        self.ui.modelSelector.setCurrentIndex(defaultIndex)
        self._models = models
        self.onModelChanged(defaultIndex)

    def onModelChanged(self, index: int) -> None:
        models = getattr(self, "_models", [])
        if self._needsInstall:
            self.ui.modelSummaryLabel.text = "The engine's Python packages are not installed yet: press Apply to install them."
        else:
            self.ui.modelSummaryLabel.text = models[index]["summary"] if 0 <= index < len(models) else \
                "No model installed: see the README, 'Models'."
        self.ui.restorationCheckBox.enabled = 0 <= index < len(models) and "restoration" in models[index]["offers"]

    # ----------------------------------------------------------------------- run
    def updateApplyButton(self, caller=None, event=None) -> None:
        running = self._run is not None
        ready = bool(self._parameterNode and self._parameterNode.inputVolume
                     and (self.ui.modelSelector.count or self._needsInstall))
        self.ui.applyButton.text = "Cancel" if running else "Apply"
        self.ui.applyButton.enabled = running or ready
        self.ui.applyButton.toolTip = "Stop the analysis" if running else (
            "Score the input volume" if ready else "Select an input volume and a model")

    def onApplyButton(self) -> None:
        if self._run is not None:
            self._run.cancel()
            return
        if not self.ensurePythonPackages():
            return
        if self._needsInstall:
            self.populateModels()
            if not self.ui.modelSelector.count:
                self.updateApplyButton()
                return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not start the analysis.", waitCursor=True):
            model = self.ui.modelSelector.currentData
            self._run = self.logic.startRun(p.inputVolume, model=model, mask=p.brainMask, device=p.device,
                                            methods=self.logic.methodsFor(model, p.includeRestoration))
            self.ui.progressBar.setVisible(True)
            self.ui.progressBar.value = 0
            self._timer.start()
        self.updateApplyButton()

    def onPollRun(self) -> None:
        run = self._run
        if run is None:
            self._timer.stop()
            return
        self.ui.progressBar.value = int(100 * run.progress)
        self.ui.progressBar.format = f"{run.message} (%p%)"
        if run.poll() == "running":
            return
        self._timer.stop()
        self._run = None
        self._needsInstall = False  # the engine's Python packages are missing (first use)
        self.ui.progressBar.setVisible(False)
        if run.state != "cancelled":
            with slicer.util.tryWithErrorDisplay("The analysis failed.", waitCursor=True):
                self.logic.finishRun(run)
                self.showPlot()
        else:
            run.cleanup()
        self.updateApplyButton()
        self.updateResultControls()

    def ensurePythonPackages(self) -> bool:
        """Install PyTorch and safetensors on first use, with the user's consent."""
        try:
            import safetensors  # noqa: F401
            import torch  # noqa: F401
            return True
        except ImportError:
            pass
        if not slicer.util.confirmOkCancelDisplay(
                "AnomalyLocalizer needs PyTorch, safetensors and pydantic, which are not installed yet. "
                "Install them now? This downloads several hundred MB and may take a few minutes."):
            return False
        with slicer.util.tryWithErrorDisplay("Could not install PyTorch.", waitCursor=True):
            try:
                import PyTorchUtils  # the PyTorch extension picks the right build for the GPU
                PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False)
                slicer.util.pip_install("safetensors pydantic")
            except ImportError:
                if hasattr(slicer, "packaging") and hasattr(slicer.packaging, "pip_ensure"):
                    slicer.packaging.pip_ensure(PYTHON_REQUIREMENTS)
                else:
                    slicer.util.pip_install(" ".join(f'"{r}"' for r in PYTHON_REQUIREMENTS))
            return True
        return False

    # ------------------------------------------------------------------ results
    def updateResultControls(self) -> None:
        hasResult = self.logic.result is not None
        for w in (self.ui.thresholdSlider, self.ui.opacitySlider, self.ui.methodSelector, self.ui.worstSliceButton,
                  self.ui.exportSegmentationButton, self.ui.exportTableButton):
            w.enabled = hasResult
        if hasResult:
            # The maps of the last run (whatever detector made them), the recommended one selected.
            wasBlocked = self.ui.methodSelector.blockSignals(True)
            self.ui.methodSelector.clear()
            for method in self.logic.result.maps:
                self.ui.methodSelector.addItem(method)
            self.ui.methodSelector.setCurrentText(self.logic.method)
            self.ui.methodSelector.blockSignals(wasBlocked)
            self._parameterNode.threshold = self.logic.threshold
            self.onThresholdChanged(self.logic.threshold)

    def onThresholdChanged(self, value: float) -> None:
        if self.logic.result is None:
            return
        voxels = self.logic.setThreshold(value)
        fpr = self.logic.healthyFalsePositiveRate()
        rate = "uncalibrated model" if fpr is None else f"flags {100 * fpr:.3g} % of healthy brain voxels"
        note = self.logic.thresholdNote()
        self.ui.thresholdInfoLabel.text = f"{voxels} voxels; {rate}" + (f"\nNote: {note}" if note else "")

    def onOpacityChanged(self, value: float) -> None:
        self.logic.setOpacity(value)

    def onMethodChanged(self, index: int) -> None:
        if self.logic.result is None:
            return
        method = self.ui.methodSelector.currentText
        if method in self.logic.result.maps:
            self.logic.setMethod(method)
            self.onThresholdChanged(self.logic.threshold)

    def onWorstSlice(self) -> None:
        k = self.logic.worstSlice()
        if k is not None:
            self.logic.jumpToSlice(k)

    def showPlot(self) -> None:
        chart = self.logic.outputNode(self.logic.inputVolume(), "plot")
        if chart is not None:
            slicer.modules.plots.logic().ShowChartInLayout(chart)

    def onExportSegmentation(self) -> None:
        path = qt.QFileDialog.getSaveFileName(self.parent, "Export anomaly segmentation", "anomaly.seg.nrrd",
                                              "Segmentation (*.seg.nrrd);;NIfTI label map (*.nii.gz)")
        if path:
            with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
                self.logic.exportSegmentation(path, overwrite=True)  # the dialog already asked

    def onExportTable(self) -> None:
        path = qt.QFileDialog.getSaveFileName(self.parent, "Export slice scores", "slice_scores.csv", "CSV (*.csv)")
        if path:
            with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
                self.logic.exportSliceScores(path, overwrite=True)

    # ------------------------------------------------------------------ worklist
    def onOpenWorklist(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(self.parent, "Open a screening worklist folder")
        if folder:
            with slicer.util.tryWithErrorDisplay("Cannot open the worklist.", waitCursor=True):
                self.logic.openWorklist(folder)
                self.onStepWorklist(self.logic.nextScan)

    def onStepWorklist(self, step) -> None:
        if not self.ensurePythonPackages():
            return
        with slicer.util.tryWithErrorDisplay("Cannot load the scan.", waitCursor=True):
            node = step()
            if node is not None:
                self._parameterNode.inputVolume = node
                self.updateResultControls()
        self.updateWorklistControls()

    def updateWorklistControls(self) -> None:
        rows, row = self.logic.worklistRows(), self.logic.currentWorklistRow()
        self.ui.nextScanButton.enabled = self.logic.worklistIndex + 1 < len(rows)
        self.ui.previousScanButton.enabled = self.logic.worklistIndex > 0
        if row is not None:
            pct = "" if row.scan_percentile is None else f", healthy percentile {row.scan_percentile:.1f}"
            self.ui.worklistLabel.text = (f"Scan {row.rank} of {len(rows)}: {row.id}{pct}"
                                          + (f"\nNote: {row.note}" if row.note else ""))


#
# Test (runs inside Slicer: Developer mode, "Reload and Test")
#

class AnomalyLocalizerTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_AnomalyLocalizer_whole_flow()

    def test_AnomalyLocalizer_whole_flow(self):
        """Load a brain tumour scan, score it with the default model, move the threshold,
        jump to the worst slice, export, and rerun without duplicating nodes."""
        import tempfile

        import numpy as np
        import SampleData
        from AnomalyLocalizerLib.logic import AnomalyLocalizerLogic

        self.delayDisplay("Loading sample data")
        volume = SampleData.downloadSample("MRBrainTumor1")
        logic = AnomalyLocalizerLogic(slicer.app.applicationLogic())
        models = logic.availableModels()
        self.assertTrue(models, "no model installed")
        # The sample is a whole head without a mask: the built-in brain extraction finds the brain.
        self.delayDisplay("Scoring")
        result = logic.run(volume, device="cpu")
        heat = logic.outputNode(volume, f"heatmap.{logic.method}")
        self.assertIsNotNone(heat)
        self.assertEqual(heat.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        nodes = slicer.mrmlScene.GetNumberOfNodes()

        low, high = logic.setThreshold(0.1), logic.setThreshold(0.9)
        self.assertGreaterEqual(low, high)
        logic.jumpToSlice(logic.worstSlice())

        with tempfile.TemporaryDirectory() as tmp:
            seg = logic.exportSegmentation(os.path.join(tmp, "anomaly.seg.nrrd"))
            table = logic.exportSliceScores(os.path.join(tmp, "scores.csv"))
            self.assertTrue(os.path.getsize(seg) > 0 and os.path.getsize(table) > 0)

        logic.run(volume, device="cpu")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes)
        self.assertTrue(np.isfinite(result.summary["volume_score"]))

        # The default fused map comes with each of its components, one click away.
        if "fusion" in result.summary:
            for component in result.summary["fusion"]["components"]:
                self.assertIsNotNone(logic.outputNode(volume, f"heatmap.{component['method']}"))
            logic.setMethod(result.summary["fusion"]["components"][0]["method"])

        # The restoration methods: restoration on request with a VAE, lsr with the LSR model.
        self.delayDisplay("Restoration and latent space restoration")
        vae = next((m for m in models if "restoration" in m["offers"]), None)
        if vae is not None:
            restored = logic.run(volume, device="cpu", model=vae["path"],
                                 methods=logic.methodsFor(vae["path"], includeRestoration=True))
            self.assertIn("restoration", restored.maps)
        if any("lsr" in m["offers"] for m in models):
            lsr = logic.run(volume, device="cpu", methods=["lsr"])
            self.assertEqual(list(lsr.maps), ["lsr"])
            self.assertIsNotNone(logic.outputNode(volume, "heatmap.lsr"))
            self.assertIsNone(logic.outputNode(volume, "heatmap.restoration"))  # a rerun replaces the last run
            logic.jumpToSlice(logic.worstSlice())
        self.delayDisplay("Test passed")
