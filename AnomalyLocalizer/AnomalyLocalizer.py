"""AnomalyLocalizer: unsupervised anomaly localisation in brain MRI, as a 3D Slicer module.

Module, parameter node, widget and in-app test. The widget is thin: every decision lives
in AnomalyLocalizerLib.logic (Qt-free, tested headless) or in the engine
(anomaly_localizer, never imports Slicer). Torch is not imported when the module loads; it
is installed on first use, with the user's consent.
"""

import logging
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
# The engine's contrasts (anomaly_localizer.core.contrast.CONTRASTS, not imported when the
# module loads): one input selector each, shown when the chosen model reads that contrast.
CONTRASTS = ("t1", "t1c", "t2", "flair", "pd")
INPUT_PARAMETERS = {"t1": "inputT1", "t1c": "inputT1c", "t2": "inputT2", "flair": "inputFlair", "pd": "inputPd"}
FINDINGS_COLUMNS = ["#", "mL", "side", "peak level", "R", "A", "S"]


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
            "The README and docs/ folder shipped with the extension describe the models, their measured "
            "accuracy and their limits. Needs Slicer 5.8 or later; PyTorch, safetensors and pydantic are "
            "installed on first use, with your consent.")
        self.parent.acknowledgementText = (
            "Methods: the VAE scores Rec-Error, Rec-Grad, KL-Grad, ELBO-Grad and Combi, and the context-encoding "
            "VAE, of Zimmerer et al. (MICCAI 2019; arXiv 1812.05941); restoration with a normative prior of "
            "Chen, You, Tezcan and Konukoglu (Medical Image Analysis 2020); latent space restoration of Naval "
            "Marimont and Tarroni (ISBI 2021); the denoising autoencoder of Kascenas, Pugeault and O'Neil "
            "(MIDL 2022); the self-supervised detector follows Naval Marimont and Tarroni (MOOD 2022 winner; "
            "arXiv 2308.01412), Baugh et al. (MICCAI 2023) and DISYRE (Naval Marimont et al.). "
            "Training data: the IXI dataset (brain-development.org, CC BY-SA 3.0); the fused map's weights "
            "were chosen with two BraTS 2013 cases (Menze et al., IEEE TMI 2015).")


#
# Parameter node
#

@parameterNodeWrapper
class AnomalyLocalizerParameterNode:
    # the scans of one study, one per contrast the chosen model reads (the first is the grid of the outputs)
    inputT1: Optional[vtkMRMLScalarVolumeNode]
    inputT1c: Optional[vtkMRMLScalarVolumeNode]
    inputT2: Optional[vtkMRMLScalarVolumeNode]
    inputFlair: Optional[vtkMRMLScalarVolumeNode]
    inputPd: Optional[vtkMRMLScalarVolumeNode]
    brainMask: Optional[Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode]]
    device: Annotated[str, Choice(DEVICES)] = "auto"
    includeRestoration: bool = False
    threshold: Annotated[float, WithinRange(0.01, 100.0)] = 0.4  # anomaly levels; the slider's end follows the result
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
        self._findings = []
        # The findings follow the threshold once the slider rests (labelling takes longer than
        # thresholding; the segmentation itself follows every move).
        self._findingsTimer = qt.QTimer()
        self._findingsTimer.setSingleShot(True)
        self._findingsTimer.setInterval(250)
        self._findingsTimer.connect("timeout()", self.updateFindings)
        self._inputSlots = []  # the inputs the chosen model reads (AnomalyLocalizerLib.inputs.SuggestedInput)
        # volumes added to the scene fill empty inputs once added (a run's outputs are known as such only then)
        self._fillTimer = qt.QTimer()
        self._fillTimer.setSingleShot(True)
        self._fillTimer.setInterval(100)
        self._fillTimer.connect("timeout()", self.updateInputSelectors)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AnomalyLocalizer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self._uiWidget = uiWidget

        from AnomalyLocalizerLib.logic import AnomalyLocalizerLogic
        self.logic = AnomalyLocalizerLogic(slicer.app.applicationLogic())
        self.logic.dicomDatabase = getattr(slicer, "dicomDatabase", None)  # to read the DICOM header of volumes

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.thresholdSlider.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.opacitySlider.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.methodSelector.connect("currentIndexChanged(int)", self.onMethodChanged)
        self.ui.worstSliceButton.connect("clicked(bool)", self.onWorstSlice)
        self.ui.findingsTable.connect("cellClicked(int,int)", self.onFindingClicked)
        self.ui.findingsTable.setColumnCount(len(FINDINGS_COLUMNS))
        self.ui.findingsTable.setHorizontalHeaderLabels(FINDINGS_COLUMNS)
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
        self._timer.stop()
        self._findingsTimer.stop()
        self._fillTimer.stop()
        self.removeObservers()
        self._run = None
        if self.logic is not None:
            self.logic.cleanup()  # cancels a running child run (its whole process tree)

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateApplyButton)

    def onSceneStartClose(self, caller, event) -> None:
        # The logic observes the same event: it cancels a running run and forgets the result.
        self._timer.stop()
        self._fillTimer.stop()
        self._run = None
        self._inputSlots = []  # their volumes leave with the scene
        self.ui.progressBar.setVisible(False)
        self.setParameterNode(None)
        self.updateApplyButton()
        self.updateResultControls()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onNodeAdded(self, caller, event) -> None:
        self._fillTimer.start()  # restarted by each node of a load: fills once the loading is done

    def initializeParameterNode(self) -> None:
        self.setParameterNode(AnomalyLocalizerParameterNode(self._moduleLogic().getParameterNode()))
        self.updateInputSelectors()

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
            # connectParametersToGui returns its tag in every Slicer; connectGui returns none in
            # Slicer 5.8, so disconnectGui could not undo it and connectors would pile up.
            self._parameterNodeGuiTag = self._parameterNode.connectParametersToGui(self._parameterWidgets())
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateApplyButton)
            self.updateApplyButton()

    def _parameterWidgets(self) -> dict:
        """The .ui's widgets bound to parameters (their SlicerParameterName property)."""
        return {w.property("SlicerParameterName"): w for w in self._uiWidget.findChildren(qt.QWidget)
                if w.property("SlicerParameterName")}

    # -------------------------------------------------------------------- models
    def populateModels(self) -> None:
        from AnomalyLocalizerLib.install import unmet_requirements

        self.ui.modelSelector.clear()
        self._needsInstall = bool(unmet_requirements())
        models = []
        if not self._needsInstall:
            try:
                models = self.logic.availableModels()
            except Exception as e:  # a panel that does not build helps nobody: say it, stay usable
                logging.error("AnomalyLocalizer could not list its models: %s", e)
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
        self.updateInputSelectors()

    # -------------------------------------------------------------------- inputs
    def updateInputSelectors(self) -> None:
        """One selector per input the chosen model reads, labelled and filled by the logic
        (a volume already chosen stays); the others hidden."""
        if not self._parameterNode or self.logic is None:
            return
        model = self.ui.modelSelector.currentData if self.ui.modelSelector.count else None
        current = {c: getattr(self._parameterNode, INPUT_PARAMETERS[c]) for c in CONTRASTS}
        previous, self._inputSlots = self._inputSlots, []  # set again once the selectors hold the suggestion
        slots, suggested = self.logic.inputsBeforeInstall(), False
        if model and not self._needsInstall:
            try:
                slots, suggested = self.logic.suggestInputs(model, current, previous), True
            except Exception as e:  # a broken model: say it, keep the panel usable
                logging.error("AnomalyLocalizer could not read the inputs of model %s: %s", model, e)
        shown = {slot.contrast: slot for slot in slots}
        for contrast in CONTRASTS:
            label, selector = getattr(self.ui, f"{contrast}InputLabel"), getattr(self.ui, f"{contrast}InputSelector")
            label.setVisible(contrast in shown)
            selector.setVisible(contrast in shown)
            if contrast in shown:
                label.text = f"{shown[contrast].label}:"
                if suggested:
                    setattr(self._parameterNode, INPUT_PARAMETERS[contrast], shown[contrast].node)
        self._inputSlots = slots
        self.updateApplyButton()

    def selectedInputs(self) -> tuple[dict, list]:
        """The volumes chosen for the model's inputs (``{contrast: node}`` in its input order)
        and the names of the required inputs still without one."""
        selected = {c: getattr(self._parameterNode, INPUT_PARAMETERS[c]) for c in CONTRASTS}
        return self.logic.selectInputs(self._inputSlots or self.logic.inputsBeforeInstall(), selected)

    # ----------------------------------------------------------------------- run
    def updateApplyButton(self, caller=None, event=None) -> None:
        running = self._run is not None
        missing = self.selectedInputs()[1] if self._parameterNode else ["T1"]
        self.ui.inputsNoteLabel.text = self.logic.inputsNote(self._inputSlots) if self.logic else ""
        ready = bool(self._parameterNode and not missing and (self.ui.modelSelector.count or self._needsInstall))
        self.ui.applyButton.text = "Cancel" if running else "Apply"
        self.ui.applyButton.enabled = running or ready
        self.ui.applyButton.toolTip = "Stop the analysis" if running else (
            "Score the input volumes" if ready else f"Select a model and the inputs: {', '.join(missing) or 'none missing'}")

    def onApplyButton(self) -> None:
        # tryWithErrorDisplay shows an error and raises it again: the panel's state is restored
        # in `finally`, or the button would say "Cancel" after a failed start.
        try:
            if self._run is not None:
                self.logic.cancelRun()
                self._run = None
                self._timer.stop()
                self.ui.progressBar.setVisible(False)
                return
            if not self.ensurePythonPackages():
                return
            if self._needsInstall:
                self.populateModels()
                if not self.ui.modelSelector.count:
                    return
            p = self._parameterNode
            with slicer.util.tryWithErrorDisplay("Could not start the analysis.", waitCursor=True):
                model = self.ui.modelSelector.currentData
                inputs, _ = self.selectedInputs()  # each volume given as the contrast of its selector
                self._run = self.logic.startRun(inputs, model=model, mask=p.brainMask, device=p.device,
                                                methods=self.logic.methodsFor(model, p.includeRestoration))
                self.ui.progressBar.setVisible(True)
                self.ui.progressBar.value = 0
                self._timer.start()
        finally:
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
        self.ui.progressBar.setVisible(False)
        try:
            if run.state != "cancelled":
                with slicer.util.tryWithErrorDisplay("The analysis failed.", waitCursor=True):
                    result = self.logic.finishRun(run)
                    self.ui.runInputsLabel.text = self.logic.runInputsText(result.summary)
                    self.showPlot()
            else:
                run.cleanup()
        finally:  # also after a failure, which tryWithErrorDisplay shows and raises again
            self.updateApplyButton()
            self.updateResultControls()

    def ensurePythonPackages(self) -> bool:
        """Install what the engine needs beyond Slicer's own packages, with the user's consent,
        at the engine's version bounds (AnomalyLocalizerLib.install decides what and how)."""
        from AnomalyLocalizerLib.install import consent_text, install_unmet, unmet_requirements

        unmet = unmet_requirements()
        if not unmet:
            return True
        if not slicer.util.confirmOkCancelDisplay(consent_text(unmet), windowTitle="AnomalyLocalizer: first use"):
            return False
        try:
            import PyTorchUtils  # the PyTorch extension picks the build for this computer's GPU
            installTorch = lambda spec: PyTorchUtils.PyTorchUtilsLogic().installTorch(  # noqa: E731
                askConfirmation=False, torchVersionRequirement=spec)
        except ImportError:
            installTorch = None
        with slicer.util.tryWithErrorDisplay("Could not install the packages AnomalyLocalizer needs.", waitCursor=True):
            install_unmet(unmet, slicer.util.pip_install, installTorch)
            return True
        return False

    # ------------------------------------------------------------------ results
    def updateResultControls(self) -> None:
        hasResult = self.logic.result is not None
        for w in (self.ui.thresholdSlider, self.ui.opacitySlider, self.ui.methodSelector, self.ui.worstSliceButton,
                  self.ui.exportSegmentationButton, self.ui.exportTableButton, self.ui.findingsTable):
            w.enabled = hasResult
        if not hasResult:
            self._findings = []
            self.ui.findingsTable.setRowCount(0)
            self.ui.runInputsLabel.text = ""
        if hasResult and self._parameterNode:
            # The maps of the last run (whatever detector made them), the recommended one selected.
            wasBlocked = self.ui.methodSelector.blockSignals(True)
            self.ui.methodSelector.clear()
            for method in self.logic.result.maps:
                self.ui.methodSelector.addItem(method)
            self.ui.methodSelector.setCurrentText(self.logic.method)
            self.ui.methodSelector.blockSignals(wasBlocked)
            self.ui.thresholdSlider.maximum = self.logic.thresholdRange()[1]
            self._parameterNode.threshold = self.logic.threshold
            self.onThresholdChanged(self.logic.threshold)

    def onThresholdChanged(self, value: float) -> None:
        if self.logic.result is None:
            return
        voxels = self.logic.setThreshold(value)
        if self.logic.result is None:  # the scored volume left the scene
            self.updateResultControls()
            return
        self.ui.thresholdInfoLabel.text = self.logic.thresholdInfoText(voxels)
        self._findingsTimer.start()  # restarted by every move: runs when the slider rests

    def updateFindings(self) -> None:
        """The findings table (and the peaks' markup points) for the current threshold."""
        self._findings = self.logic.findings() if self.logic.result is not None else []
        table = self.ui.findingsTable
        table.setRowCount(len(self._findings))
        for row, f in enumerate(self._findings):
            for column, text in enumerate(self.logic.findingCells(f)):
                table.setItem(row, column, qt.QTableWidgetItem(text))
        table.resizeColumnsToContents()

    def onFindingClicked(self, row: int, column: int) -> None:
        if 0 <= row < len(self._findings):
            self.logic.centreOnFinding(self._findings[row])

    def onOpacityChanged(self, value: float) -> None:
        self.logic.setOpacity(value)

    def onMethodChanged(self, index: int) -> None:
        if self.logic.result is None:
            return
        method = self.ui.methodSelector.currentText
        if method in self.logic.result.maps:
            self.logic.setMethod(method)
            self.ui.thresholdSlider.maximum = self.logic.thresholdRange()[1]
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
            if node is not None:  # the scan on show becomes the model's first input
                first = self._inputSlots[0].contrast if self._inputSlots else "t1"
                setattr(self._parameterNode, INPUT_PARAMETERS[first], node)
                self.ui.runInputsLabel.text = self.logic.runInputsText(self.logic.result.summary)
                self.updateResultControls()
        self.updateWorklistControls()

    def updateWorklistControls(self) -> None:
        self.ui.nextScanButton.enabled = self.logic.worklistIndex + 1 < len(self.logic.worklistRows())
        self.ui.previousScanButton.enabled = self.logic.worklistIndex > 0
        if self.logic.currentWorklistRow() is not None:
            self.ui.worklistLabel.text = self.logic.worklistPositionText()


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
        """Load a brain tumour scan and follow the whole flow with the installed models: score,
        threshold, worst slice, export, rerun, fused components, restoration, latent space
        restoration (AnomalyLocalizerLib.selfcheck, which the logic tests also run headless)."""
        import SampleData
        from AnomalyLocalizerLib.logic import AnomalyLocalizerLogic
        from AnomalyLocalizerLib.selfcheck import wholeFlow

        self.delayDisplay("Loading sample data")
        volume = SampleData.downloadSample("MRBrainTumor1")
        wholeFlow(AnomalyLocalizerLogic(slicer.app.applicationLogic()), volume, say=self.delayDisplay)
        self.delayDisplay("Test passed")
