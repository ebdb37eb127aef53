"""A study of several volumes in a real MRML scene (slicer-core): which volume is which
contrast (DICOM header, name), the inputs a model reads and the scene's volumes suggested for
them, and runs in this process and in a child process that apply the engine's rules for a
study alike (anomaly_localizer.core.study): maps on the first input's grid, an input the model
does not read recorded and unused, a volume that looks like another contrast refused before
anything is added to the scene."""

import numpy as np
import pytest
import SimpleITK as sitk

from logic_helpers import engine, flair_phantom_array, vtk
from AnomalyLocalizerLib.logic import AnomalyLocalizerLogic

from anomaly_localizer.core.contrast import contrast_from_name
from anomaly_localizer.errors import AnomalyLocalizerError, InputError

image_from, phantom_array = engine.image_from, engine.phantom_array


def _model(folder, contrasts, optional=()):
    """A tiny calibrated model that reads ``contrasts``."""
    return engine.make_tiny_package_reading(folder, contrasts, optional)


@pytest.fixture()
def models(tmp_path, monkeypatch):
    """Installed: the T1 model "tiny" (as every shipped model today, it reads T1 only) and a
    T1 + FLAIR model (FLAIR optional); in this process only these (the shipped ones hidden)."""
    root = tmp_path / "models"
    t1 = _model(root / "tiny", ["t1"])
    both = _model(root / "tiny-t1-flair", ["t1", "flair"], optional=["flair"])
    monkeypatch.setenv("ANOMALY_LOCALIZER_MODELS", str(root))
    monkeypatch.setattr("anomaly_localizer.core.package.SHIPPED_MODELS_DIRS", ())
    monkeypatch.setattr("anomaly_localizer.core.package.USER_MODELS_DIR", tmp_path / "no-user-models")
    return t1, both


def _load(slicerApp, tmp_path, arr, name, spacing=(4.0, 4.0, 4.0)):
    """A volume node loaded from a file, as Slicer loads one."""
    img = image_from(arr, spacing=spacing, origin=(-20.0, 31.0, -7.5))
    path = tmp_path / f"{name}.nrrd"
    sitk.WriteImage(img, str(path))
    return slicerApp.loadVolume(path, name)


def _coarser(slicerApp, tmp_path, arr, name):
    """The same head on a 5 mm grid (another grid than the 4 mm T1's, over the same box)."""
    img = image_from(arr, origin=(-20.0, 31.0, -7.5))
    size = [int(round(n * 4.0 / 5.0)) for n in img.GetSize()]
    coarse = sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), (5.0, 5.0, 5.0),
                           img.GetDirection(), 0.0, sitk.sitkFloat32)
    path = tmp_path / f"{name}.nrrd"
    sitk.WriteImage(coarse, str(path))
    return slicerApp.loadVolume(path, name)


def _geometry(node):
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)]), node.GetImageData().GetDimensions()


class FakeDicomDatabase:
    """Slicer's DICOM database as the logic reads it (ctkDICOMDatabase.instanceValue)."""

    def __init__(self, headers):
        self.headers = headers  # instance UID -> {"gggg,eeee": value}

    def instanceValue(self, uid, tag):
        if uid not in self.headers:
            raise RuntimeError(f"no instance {uid}")
        return self.headers[uid].get(tag, "")


# ------------------------------------------------------------------------ which is which

@pytest.mark.parametrize("name, expected", [
    ("sub-01_ses-1_T1w", "t1"), ("IXI002-Guys-0828-T1", "t1"), ("3: AX T2 FLAIR", "flair"),
    ("BraTS20_Training_001_t1ce", "t1c"), ("t1_mprage_sag POST GD", "t1c"), ("T1-Gd", "t1c"),
    ("t2_tse_tra", "t2"), ("PD_TSE", "pd"), ("sagT1", "t1"),
    ("MRHead", None), ("MRBrainTumor1", None), ("Patient1", None), ("test1", None),
    ("ep2d_diff DWI b1000", None), ("T2*", None), ("", None),
])
def test_a_volumes_contrast_is_guessed_from_its_name(slicerApp, name, expected):
    logic = AnomalyLocalizerLogic(slicerApp.app)
    node = slicerApp.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    assert logic.guessContrast(node) == expected == contrast_from_name(name)
    guess = logic.contrastGuess(node)
    assert guess.source == ("name" if expected else None) and guess.why


def test_a_dicom_header_is_believed_over_the_name(slicerApp):
    logic = AnomalyLocalizerLogic(slicerApp.app)
    scene = slicerApp.scene
    logic.dicomDatabase = FakeDicomDatabase({"1.2.3": {"0008,103e": "AX FLAIR"},
                                             "1.2.9": {"0008,103e": "ep2d_diff DWI b1000"},
                                             "1.2.5": {"0018,0080": "500", "0018,0081": "12"}})
    flair = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "T1 copy")  # a name that says otherwise
    flair.SetAttribute("DICOM.instanceUIDs", "1.2.3 1.2.4")
    guess = logic.contrastGuess(flair)
    assert (guess.contrast, guess.source) == ("flair", "dicom") and "AX FLAIR" in guess.why
    diffusion = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "T1")
    diffusion.SetAttribute("DICOM.instanceUIDs", "1.2.9")
    assert logic.guessContrast(diffusion) is None and "not a structural scan" in logic.contrastGuess(diffusion).why
    timed = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "series 5")  # only sequence times in the header
    timed.SetAttribute("DICOM.instanceUIDs", "1.2.5")
    assert logic.guessContrast(timed) == "t1"
    gone = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "FLAIR")  # its instance left the database
    gone.SetAttribute("DICOM.instanceUIDs", "9.9.9")
    assert logic.contrastGuess(gone).source == "name"
    # without a database (headless, the browser viewer) the header kept as attributes is read
    logic.dicomDatabase = None
    viewer = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "series 7")
    viewer.SetAttribute("DICOM.SeriesDescription", "t2_tse_tra")
    assert logic.guessContrast(viewer) == "t2" and logic.guessContrast(flair) == "t1"


# ------------------------------------------------------------------------ one selector per input

def test_each_input_a_model_reads_gets_a_volume_of_the_scene(slicerApp, tmp_path, models):
    t1Model, bothModel = models
    logic = AnomalyLocalizerLogic(slicerApp.app)
    slots = logic.inputContrasts(str(bothModel.path))
    assert [(s.contrast, s.optional, s.label) for s in slots] == [("t1", False, "T1"),
                                                                    ("flair", True, "FLAIR (optional)")]
    assert [s.contrast for s in logic.inputContrasts(str(t1Model.path))] == ["t1"]

    # nothing in the scene: a run is not possible, and the panel says what is missing
    empty = logic.suggestInputs(str(bothModel.path))
    assert [s.node for s in empty] == [None, None] and logic.missingInputs(empty) == ["T1"]

    unknown = _load(slicerApp, tmp_path, phantom_array(), "MRHead")
    flair = _load(slicerApp, tmp_path, flair_phantom_array(), "FLAIR_scan")
    t1 = _load(slicerApp, tmp_path, phantom_array(lesion=True), "sub-01_T1w")
    label = slicerApp.loadVolume(tmp_path / "sub-01_T1w.nrrd", "T1 label", labelmap=True)  # not an input
    slots = logic.suggestInputs(str(bothModel.path))
    assert [s.node for s in slots] == [t1, flair] and "its name" in slots[0].why
    assert logic.chosenInputs(slots) == {"t1": t1, "flair": flair} and not logic.missingInputs(slots)
    # the user's choice wins; a volume said to be FLAIR never fills the T1 input
    slots = logic.suggestInputs(str(bothModel.path), current={"t1": unknown})
    assert [s.node for s in slots] == [unknown, flair] and slots[0].why == "chosen"
    assert [s.node for s in logic.suggestInputs(str(t1Model.path))] == [t1]
    slicerApp.scene.RemoveNode(t1)
    slots = logic.suggestInputs(str(bothModel.path))
    assert [s.node for s in slots] == [unknown, flair] and "check that it is T1" in slots[0].why
    slicerApp.scene.RemoveNode(unknown)
    slots = logic.suggestInputs(str(t1Model.path))
    assert slots[0].node is None and logic.missingInputs(slots) == ["T1"]
    assert label not in logic.inputVolumeNodes()

    # a run's outputs (heatmaps are scalar volumes named after the input) are never suggested
    t1 = _load(slicerApp, tmp_path, phantom_array(lesion=True), "T1")
    logic.run(t1, model=str(t1Model.path), methods=["rec"])
    assert logic.inputVolumeNodes() == [flair, t1]


# ------------------------------------------------------------------------ runs

def test_a_t1_and_flair_study_scored_by_a_t1_model_records_the_flair_unused_with_maps_on_the_t1s_grid(
        slicerApp, tmp_path, models):
    t1Model, _ = models
    t1 = _load(slicerApp, tmp_path, phantom_array(lesion=True), "T1")
    flair = _coarser(slicerApp, tmp_path, flair_phantom_array(), "FLAIR")
    logic = AnomalyLocalizerLogic(slicerApp.app)
    result = logic.run({"t1": t1, "flair": flair}, model=str(t1Model.path), methods=["rec"])
    s = result.summary
    assert s["contrasts_read"] == ["t1"]
    assert [(i["input"], i["contrast"], i["source"], i["used"], i["resampled_onto_first"]) for i in s["inputs"]] == \
        [("T1", "t1", "given", True, False), ("FLAIR", "flair", "given", False, True)]
    assert s["inputs"][0]["looked_like"] == "t1"
    assert any(n == "FLAIR (flair) is recorded but not used: model tiny reads t1" for n in s["input_notes"])
    text = logic.runInputsText(s)
    assert text.startswith("Inputs: T1 is T1 (chosen); FLAIR is FLAIR (chosen).")
    assert "recorded but not used" in text
    # every output is on the T1's grid and belongs to it; the FLAIR gets none
    for role in ("heatmap.rec", "labelmap"):
        node = logic.outputNode(t1, role)
        np.testing.assert_allclose(_geometry(node)[0], _geometry(t1)[0], atol=1e-6)
        assert _geometry(node)[1] == _geometry(t1)[1]
    assert logic.outputNode(flair, "labelmap") is None and logic.inputVolume() is t1
    # the unused FLAIR changes nothing: the T1 alone, its contrast recognised, gives the same maps
    alone = AnomalyLocalizerLogic(slicerApp.app).run(t1, model=str(t1Model.path), methods=["rec"])
    np.testing.assert_array_equal(alone.maps["rec"], result.maps["rec"])
    assert [(i["contrast"], i["source"]) for i in alone.summary["inputs"]] == [("t1", "image")]
    # without contrasts each is recognised from its image, the FLAIR after its resampling
    recognised = logic.run([t1, flair], model=str(t1Model.path), methods=["rec"])
    assert [(i["contrast"], i["source"]) for i in recognised.summary["inputs"]] == [("t1", "image"),
                                                                                    ("flair", "image")]


def test_a_flair_looking_volume_given_to_the_t1_model_is_refused_and_the_scene_left_as_it_was(
        slicerApp, tmp_path, models):
    t1Model, _ = models
    flair = _load(slicerApp, tmp_path, flair_phantom_array(), "scan")
    logic = AnomalyLocalizerLogic(slicerApp.app)
    before = slicerApp.nodeCount()
    with pytest.raises(InputError) as refused:
        logic.run(flair, model=str(t1Model.path))
    assert "model tiny reads T1 only" in str(refused.value) and "scan looks like FLAIR" in str(refused.value)
    assert slicerApp.nodeCount() == before and logic.result is None and logic.outputNode(flair, "labelmap") is None
    with pytest.raises(AnomalyLocalizerError) as child:  # the engine's own words, the volume named as here
        logic.finishRun(logic.startRun(flair, model=str(t1Model.path)))
    assert "model tiny reads T1 only" in str(child.value) and "scan looks like FLAIR" in str(child.value)
    assert slicerApp.nodeCount() == before
    # the user's word wins: given as T1, it is scored, and what it looked like is recorded
    result = logic.run({"t1": flair}, model=str(t1Model.path), methods=["rec"])
    assert result.summary["inputs"][0]["looked_like"] == "flair"
    assert "looks like FLAIR" in result.summary["input_notes"][0]


def test_a_dicom_header_reaches_the_engine_in_process_and_in_a_child_run(slicerApp, tmp_path, models):
    t1Model, _ = models
    scan = _load(slicerApp, tmp_path, phantom_array(), "series 3")  # T1 voxels ...
    scan.SetAttribute("DICOM.instanceUIDs", "1.2.3")
    logic = AnomalyLocalizerLogic(slicerApp.app)
    logic.dicomDatabase = FakeDicomDatabase({"1.2.3": {"0008,103e": "AX FLAIR"}})  # ... a header that says FLAIR
    before = slicerApp.nodeCount()
    with pytest.raises(InputError, match="is FLAIR by its DICOM header"):
        logic.run(scan, model=str(t1Model.path))
    with pytest.raises(AnomalyLocalizerError, match="is FLAIR by its DICOM header"):
        logic.finishRun(logic.startRun(scan, model=str(t1Model.path)))
    assert slicerApp.nodeCount() == before


def test_in_process_and_child_runs_record_the_same_inputs(slicerApp, tmp_path, models):
    t1Model, bothModel = models
    t1 = _load(slicerApp, tmp_path, phantom_array(lesion=True), "T1")
    flair = _coarser(slicerApp, tmp_path, flair_phantom_array(), "FLAIR")
    logic = AnomalyLocalizerLogic(slicerApp.app)
    keys = ("inputs", "contrasts_read", "input_notes")
    for inputs, contrasts, model in [([t1, flair], ["t1", "flair"], t1Model), ([t1, flair], None, bothModel)]:
        here = logic.run(inputs, contrasts=contrasts, model=str(model.path), methods=["rec"])
        child = logic.finishRun(logic.startRun(inputs, contrasts=contrasts, model=str(model.path), methods=["rec"]))
        assert {k: child.summary.get(k) for k in keys} == {k: here.summary.get(k) for k in keys}
        np.testing.assert_allclose(child.maps["rec"], here.maps["rec"], rtol=1e-5, atol=1e-7)
        assert logic.inputVolume() is t1
    assert here.summary["contrasts_read"] == ["t1", "flair"] and all(i["used"] for i in here.summary["inputs"])
    assert [i["input"] for i in child.summary["inputs"]] == ["T1", "FLAIR"]


def test_without_a_model_the_one_that_reads_most_of_the_studys_contrasts_runs(slicerApp, tmp_path, models):
    t1 = _load(slicerApp, tmp_path, phantom_array(lesion=True), "T1")
    flair = _load(slicerApp, tmp_path, flair_phantom_array(), "FLAIR")
    logic = AnomalyLocalizerLogic(slicerApp.app)
    result = logic.run({"t1": t1, "flair": flair}, methods=["rec"])
    assert result.summary["model"]["name"] == "tiny-t1-flair" and result.summary["contrasts_read"] == ["t1", "flair"]


def test_inputs_that_cannot_make_a_study_are_refused_before_any_work(slicerApp, tmp_path, models):
    t1Model, _ = models
    t1 = _load(slicerApp, tmp_path, phantom_array(), "T1")
    far = image_from(flair_phantom_array(), origin=(500.0, 500.0, 500.0))
    sitk.WriteImage(far, str(tmp_path / "far.nrrd"))
    farNode = slicerApp.loadVolume(tmp_path / "far.nrrd", "far")
    logic = AnomalyLocalizerLogic(slicerApp.app)
    before = slicerApp.nodeCount()
    for call, message in [(lambda: logic.run([t1, farNode], model=str(t1Model.path)), "does not overlap"),
                          (lambda: logic.run([t1, farNode], contrasts=["t1"]), "1 --contrast for 2 inputs"),
                          (lambda: logic.run([t1], contrasts=["dwi"]), "unknown contrast 'dwi'"),
                          (lambda: logic.run([t1, t1]), "given as two inputs"),
                          (lambda: logic.run({"t1": None}), "no input volume"),
                          (lambda: logic.startRun([t1, t1]), "given as two inputs")]:
        with pytest.raises((AnomalyLocalizerError, ValueError), match=message):
            call()
    assert slicerApp.nodeCount() == before and logic.activeRun is None
