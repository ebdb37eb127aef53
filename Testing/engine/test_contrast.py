"""The contrast is part of the contract: models say what they read, inputs what they are,
and no map is made for a contrast its model was not made for."""

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from anomaly_localizer.cli import main
from anomaly_localizer.core.contrast import from_dicom, from_image, parse_contrast
from anomaly_localizer.core.package import PackageError, load_package, save_package, update_meta

from phantoms import make_tiny_package, make_tiny_package_reading, psr_image, write_dicom_series

# A brain of real size (the recogniser measures depth in mm): CSF at its surface, a cortical
# ribbon, white matter inside and two ventricles; intensities of each tissue per contrast.
TISSUE = {"t1": (300, 600, 900, 300), "t2": (2500, 1350, 1000, 2500), "flair": (250, 1250, 1000, 250)}


def brain_labels(shape=(70, 84, 70), spacing=2.0):
    """0 outside, 1 CSF (surface rim and ventricles), 2 grey matter, 3 white matter."""
    z, y, x = np.meshgrid(*[(np.arange(n) - n / 2) * spacing for n in shape], indexing="ij")
    r = np.sqrt((z / 60) ** 2 + (y / 75) ** 2 + (x / 62) ** 2)  # 1 at the brain's surface
    depth_mm = (1 - r) * 60  # about the distance from the surface
    labels = np.zeros(shape, np.uint8)
    labels[r < 1] = 1
    labels[(r < 1) & (depth_mm > 2.5)] = 2
    labels[(r < 1) & (depth_mm > 7.0)] = 3
    vent = ((z / 14) ** 2 + (y / 28) ** 2 + ((np.abs(x) - 9) / 6) ** 2) < 1
    labels[vent] = 1
    return labels


def rendered(contrast: str, seed: int = 0, shape=(70, 84, 70)) -> np.ndarray:
    labels = brain_labels(shape)
    rng = np.random.default_rng(seed)
    values = np.array((0,) + TISSUE[contrast][:3], np.float32)
    img = values[labels] + rng.normal(0, 30, labels.shape).astype(np.float32) * (labels > 0)
    return np.where(labels > 0, img, 0).astype(np.float32)


def image(arr, spacing=2.0):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((spacing,) * 3)
    return img


@pytest.mark.parametrize("contrast", ["t1", "t2", "flair"])
def test_each_contrast_order_is_recognised_from_the_image(contrast):
    arr = rendered(contrast)
    ev = from_image(arr, arr > 0, (2.0, 2.0, 2.0))
    assert ev.contrast == contrast and ev.source == "image" and 0.5 <= ev.confidence <= 1.0
    assert ev.detail  # says what it rests on


def test_an_image_without_tissue_order_is_not_guessed():
    rng = np.random.default_rng(0)
    labels = brain_labels()
    arr = np.where(labels > 0, rng.normal(1000, 100, labels.shape), 0).astype(np.float32)
    ev = from_image(arr, labels > 0, (2.0, 2.0, 2.0))
    assert ev.contrast is None and ev.confidence == 0.0 and "unclear" in ev.detail


@pytest.mark.parametrize("tags, expected", [
    ({"SeriesDescription": "AX T2 FLAIR"}, "flair"),
    ({"SeriesDescription": "t1_mprage_sag POST GD"}, "t1c"),
    ({"SeriesDescription": "T1 SE", "ContrastBolusAgent": "Gadovist"}, "t1c"),
    ({"SeriesDescription": "t2_tse_tra"}, "t2"),
    ({"SeriesDescription": "PD_TSE"}, "pd"),
    ({"0008|103e": "sag 3D MPRAGE"}, "t1"),
    ({"RepetitionTime": "9000", "EchoTime": "120", "InversionTime": "2500"}, "flair"),
    ({"RepetitionTime": "2300", "EchoTime": "2.98", "InversionTime": "900"}, "t1"),
    ({"RepetitionTime": "500", "EchoTime": "12"}, "t1"),
    ({"RepetitionTime": "4000", "EchoTime": "100"}, "t2"),
    ({"RepetitionTime": "3000", "EchoTime": "15"}, "pd"),
])
def test_dicom_headers_say_the_contrast(tags, expected):
    ev = from_dicom(tags)
    assert ev is not None and ev.contrast == expected and ev.source == "dicom"


def test_dicom_headers_that_say_nothing_or_another_kind_of_scan():
    assert from_dicom({}) is None
    ev = from_dicom({"SeriesDescription": "ep2d_diff DWI b1000"})
    assert ev.contrast is None and "not a structural scan" in ev.detail


def test_contrast_names_as_users_write_them():
    assert [parse_contrast(v) for v in ("T1w", "T1-Gd", "t1ce", "T2", "FLAIR", "pd")] == \
        ["t1", "t1c", "t1c", "t2", "flair", "pd"]
    with pytest.raises(ValueError, match="unknown contrast"):
        parse_contrast("dwi")


# ----------------------------------------------------------------------- the contract

def test_packages_declare_their_contrasts_and_old_ones_read_t1(tmp_path):
    pkg = make_tiny_package(tmp_path / "old")
    assert pkg.contract.contrasts == ["t1"]
    meta = dict(pkg.meta)
    meta["input_contract"] = {**meta["input_contract"], "contrasts": ["t1", "t1"]}
    update_meta(pkg.path, meta)
    with pytest.raises(PackageError, match="contrasts must not repeat"):
        load_package(pkg.path)
    meta["input_contract"] = {**meta["input_contract"], "contrasts": ["dwi"]}
    update_meta(pkg.path, meta)
    with pytest.raises(PackageError, match="input_contract.contrasts"):
        load_package(pkg.path)


def tiny_of(folder, name, contrasts, optional=()):
    return make_tiny_package_reading(folder / name, contrasts, optional)


@pytest.fixture()
def installed(tmp_path, monkeypatch):
    """Installed: a T1 model, a FLAIR model and a T1 + FLAIR model (FLAIR optional), in a
    folder whose index prefers the T1 model; only these (the shipped ones are hidden)."""
    models = tmp_path / "models"
    tiny_of(models, "t1-model", ["t1"])
    tiny_of(models, "flair-model", ["flair"])
    tiny_of(models, "t1-flair-model", ["t1", "flair"], optional=["flair"])
    (models / "index.json").write_text(json.dumps({"default": "t1-model", "preference": ["t1-model"]}))
    monkeypatch.setenv("ANOMALY_LOCALIZER_MODELS", str(models))
    monkeypatch.setattr("anomaly_localizer.core.package.SHIPPED_MODELS_DIRS", ())
    monkeypatch.setattr("anomaly_localizer.core.package.USER_MODELS_DIR", tmp_path / "no-user-models")
    for c in ("t1", "flair", "t2"):
        sitk.WriteImage(image(rendered(c)), str(tmp_path / f"{c}.nii.gz"))
    return tmp_path


def run(*args):
    return main([str(a) for a in args])


def summary(folder):
    return json.loads((folder / "summary.json").read_text())


def test_the_model_is_chosen_by_contrast(installed):
    t = installed
    assert run("score", t / "flair.nii.gz", "--out", t / "a", "-q") == 0
    assert summary(t / "a")["model"]["name"] == "flair-model"
    assert summary(t / "a")["inputs"][0] | {"input": None} == {
        "input": None, "contrast": "flair", "source": "image", "confidence": summary(t / "a")["inputs"][0]["confidence"],
        "detail": summary(t / "a")["inputs"][0]["detail"], "looked_like": None, "resampled_onto_first": False,
        "overlap_with_first": 1.0, "used": True}
    # T1 alone: the T1 model and the T1 + FLAIR one (FLAIR optional) both read it; the index prefers t1-model
    assert run("score", t / "t1.nii.gz", "--out", t / "b", "-q") == 0
    assert summary(t / "b")["model"]["name"] == "t1-model"
    # both: the model that uses most of them
    assert run("score", t / "t1.nii.gz", t / "flair.nii.gz", "--out", t / "c", "-q") == 0
    s = summary(t / "c")
    assert s["model"]["name"] == "t1-flair-model" and s["contrasts_read"] == ["t1", "flair"]
    assert [i["contrast"] for i in s["inputs"]] == ["t1", "flair"] and all(i["used"] for i in s["inputs"])


def test_a_contrast_no_installed_model_reads_is_refused_and_writes_nothing(installed, capsys):
    t = installed
    assert run("score", t / "t2.nii.gz", "--out", t / "a") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "looks like T2" in err and "no installed model reads T2" in err
    assert not (t / "a").exists()


def test_a_t1_model_given_a_flair_never_writes_a_map_unless_told(installed, capsys):
    t = installed
    assert run("score", t / "flair.nii.gz", "--model", "t1-model", "--out", t / "a") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "model t1-model reads T1 only" in err and "looks like FLAIR" in err and "--model flair-model" in err
    assert not (t / "a").exists()
    # the user's word wins, and what the image looked like is recorded
    assert run("score", t / "flair.nii.gz", "--model", "t1-model", "--contrast", "t1", "--out", t / "b", "-q") == 0
    s = summary(t / "b")
    assert s["inputs"][0]["contrast"] == "t1" and s["inputs"][0]["source"] == "given"
    assert s["inputs"][0]["looked_like"] == "flair" and "looks like FLAIR" in s["input_notes"][0]
    assert (t / "b" / "segmentation.nii.gz").is_file()


def test_a_second_input_no_model_reads_is_recorded_unused(installed, capsys, monkeypatch):
    t = installed
    assert run("score", t / "t1.nii.gz", t / "t2.nii.gz", "--contrast", "t1", "--contrast", "t2",
               "--out", t / "a", "-q") == 0
    s = summary(t / "a")
    assert s["model"]["name"] == "t1-model" and s["contrasts_read"] == ["t1"]
    assert [i["used"] for i in s["inputs"]] == [True, False]
    assert "is recorded but not used" in capsys.readouterr().err


def test_contrasts_must_match_the_inputs_one_to_one(installed, capsys):
    t = installed
    assert run("score", t / "t1.nii.gz", t / "flair.nii.gz", "--contrast", "t1", "--out", t / "a") == 2
    assert "1 --contrast for 2 inputs" in capsys.readouterr().err
    assert run("score", t / "t1.nii.gz", "--contrast", "dwi", "--out", t / "a") == 2
    assert "unknown contrast 'dwi'" in capsys.readouterr().err
    assert not (t / "a").exists()


def test_a_later_input_on_another_grid_is_resampled_onto_the_first(installed):
    t = installed
    flair = image(rendered("flair"))
    coarse = sitk.Resample(flair, [35, 42, 35], sitk.Transform(), sitk.sitkLinear, flair.GetOrigin(), (4.0,) * 3,
                           flair.GetDirection(), 0.0, sitk.sitkFloat32)
    sitk.WriteImage(coarse, str(t / "flair-4mm.nii.gz"))
    assert run("score", t / "t1.nii.gz", t / "flair-4mm.nii.gz", "--out", t / "a", "-q") == 0
    s = summary(t / "a")
    assert s["inputs"][1]["resampled_onto_first"] is True and s["inputs"][1]["contrast"] == "flair"
    ref = sitk.ReadImage(str(t / "t1.nii.gz"))
    out = sitk.ReadImage(str(t / "a" / "segmentation.nii.gz"))
    assert out.GetSize() == ref.GetSize() and out.GetSpacing() == ref.GetSpacing()


def test_a_later_input_in_another_orientation_is_resampled_through_its_geometry(installed):
    t = installed
    t1_psr = psr_image(rendered("t1"), spacing_zyx=(2.0, 2.0, 2.0))  # stored P, S, R like the IXI files
    sitk.WriteImage(t1_psr, str(t / "t1-psr.nii.gz"))
    # the FLAIR of the same head stored axially (identity direction) over the same physical box
    corners = np.array([t1_psr.TransformIndexToPhysicalPoint([int(c * (n - 1)) for c, n in zip(k, t1_psr.GetSize())])
                        for k in np.ndindex(2, 2, 2)])
    low, high = corners.min(0), corners.max(0)
    size = [int(round(v)) + 1 for v in (high - low) / 2.0]
    flair_psr = psr_image(rendered("flair"), spacing_zyx=(2.0, 2.0, 2.0))
    flair_psr.CopyInformation(t1_psr)
    axial = sitk.Resample(flair_psr, size, sitk.Transform(), sitk.sitkLinear, tuple(low), (2.0, 2.0, 2.0),
                          (1, 0, 0, 0, 1, 0, 0, 0, 1), 0.0, sitk.sitkFloat32)
    sitk.WriteImage(axial, str(t / "flair-axial.nii.gz"))
    assert run("score", t / "t1-psr.nii.gz", t / "flair-axial.nii.gz", "--out", t / "a", "-q") == 0
    s = summary(t / "a")
    assert s["model"]["name"] == "t1-flair-model"
    assert [i["contrast"] for i in s["inputs"]] == ["t1", "flair"]  # recognised after the resampling
    assert s["inputs"][1]["resampled_onto_first"] is True and s["inputs"][1]["overlap_with_first"] > 0.95
    out = sitk.ReadImage(str(t / "a" / "segmentation.nii.gz"))
    assert out.GetSize() == t1_psr.GetSize() and out.GetDirection() == t1_psr.GetDirection()


def test_a_later_input_that_does_not_overlap_is_refused(installed, capsys):
    t = installed
    far = image(rendered("flair"))
    far.SetOrigin((500.0, 500.0, 500.0))
    sitk.WriteImage(far, str(t / "far.nii.gz"))
    assert run("score", t / "t1.nii.gz", t / "far.nii.gz", "--out", t / "a") == 2
    err = capsys.readouterr().err
    assert "does not overlap the first input" in err and "co-registered" in err
    assert not (t / "a").exists()


def test_a_dicom_series_is_known_by_its_header(installed, tmp_path):
    t = installed
    arr = rendered("t1").astype(np.int16)  # a T1's intensities ...
    folder = write_dicom_series(arr, tmp_path / "dicom", spacing=2.0)
    for f in sorted(folder.iterdir()):  # ... in a series whose header says FLAIR
        s = sitk.ReadImage(str(f))
        s.SetMetaData("0008|103e", "AX FLAIR")
        for tag, value in [("0020|000e", "1.2.826.0.1.3680043.2.1125.1"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1.9"),
                           ("0008|0060", "MR")]:
            s.SetMetaData(tag, value)
        w = sitk.ImageFileWriter()
        w.KeepOriginalImageUIDOn()
        w.SetFileName(str(f))
        w.Execute(s)
    assert run("score", folder, "--out", t / "a", "-q") == 0
    s = summary(t / "a")
    assert s["model"]["name"] == "flair-model"
    assert s["inputs"][0]["source"] == "dicom" and "AX FLAIR" in s["inputs"][0]["detail"]
    assert s["inputs"][0]["contrast"] == "flair"


def test_a_fused_model_must_list_its_components_contrasts(tmp_path, monkeypatch):
    from anomaly_localizer.core.fusion import content_sha256
    models = tmp_path / "models"
    comp = tiny_of(models, "flair-comp", ["flair"])
    meta = {"name": "fused", "architecture": {"type": "fusion", "rule": "max", "components": [
        {"model": "flair-comp", "method": "rec", "content_sha256": content_sha256(comp.files)}]},
        "input_contract": {**comp.meta["input_contract"], "contrasts": ["t1"]}, "calibration": {}}
    monkeypatch.setenv("ANOMALY_LOCALIZER_MODELS", str(models))
    pkg = save_package(None, meta, models / "fused")
    with pytest.raises(PackageError, match="its component flair-comp reads flair"):
        pkg.check_components()
    assert os.path.isdir(models / "fused")


# ----------------------------------------------------------------------- screening studies

def test_screening_takes_studies_from_a_csv_and_from_sub_folders(installed):
    t = installed
    (t / "list.csv").write_text("id,path,contrast,path_2,contrast_2\n"
                                "study-a,t1.nii.gz,t1,flair.nii.gz,flair\n")
    assert run("screen", t / "list.csv", "--model", "t1-flair-model", "--out", t / "w", "--workers", "1", "-q") == 0
    s = summary(t / "w" / "study-a")
    assert [i["contrast"] for i in s["inputs"]] == ["t1", "flair"] and s["contrasts_read"] == ["t1", "flair"]
    assert [i["source"] for i in s["inputs"]] == ["given", "given"] and "screening" in s
    for name in ("p1", "p2"):
        (t / "studies" / name).mkdir(parents=True)
        for c in ("t1", "flair"):
            sitk.WriteImage(image(rendered(c, seed=len(name))), str(t / "studies" / name / f"{name}_{c}.nii.gz"))
    assert run("screen", t / "studies", "--studies", "--model", "t1-flair-model", "--out", t / "w2",
               "--workers", "1", "-q") == 0
    rows = json.loads((t / "w2" / "worklist.json").read_text())["rows"]
    assert sorted(r["id"] for r in rows) == ["p1", "p2"] and all(r["status"] == "done" for r in rows)
    s = summary(t / "w2" / "p1")
    # name order: p1_flair before p1_t1; the contrasts are recognised, the FLAIR's grid is the reference
    assert [i["contrast"] for i in s["inputs"]] == ["flair", "t1"] and [i["source"] for i in s["inputs"]] == ["image"] * 2


def test_screening_a_study_the_worklist_model_does_not_read_fails_with_advice(installed):
    t = installed
    assert run("screen", t / "flair.nii.gz", "--model", "t1-model", "--out", t / "w", "--workers", "1", "-q") == 0
    rows = json.loads((t / "w" / "worklist.json").read_text())["rows"]
    assert rows[0]["status"] == "failed" and "model t1-model reads T1 only" in rows[0]["error"]
    assert "--model flair-model" in rows[0]["error"]
