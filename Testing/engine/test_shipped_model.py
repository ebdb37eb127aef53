"""The shipped model: it loads, its hashes check, it is calibrated, and the demo runs."""

import json
from pathlib import Path

import numpy as np
import pytest

from anomaly_localizer.core.package import load_package, sha256_file
from anomaly_localizer.core.package import SHIPPED_MODELS_DIRS, default_model_name

MODELS = Path(__file__).resolve().parents[2] / "models"


def test_index_names_the_default_and_pins_every_manifest():
    index = json.loads((MODELS / "index.json").read_text())
    assert index["default"] in index["models"]
    for name, entry in index["models"].items():
        assert sha256_file(MODELS / name / "manifest.json") == entry["manifest_sha256"]
    assert MODELS in SHIPPED_MODELS_DIRS


def test_default_model_loads_checks_and_is_calibrated():
    name = json.loads((MODELS / "index.json").read_text())["default"]
    assert default_model_name() == name
    package = load_package(MODELS / name)
    model = package.load_model()
    # A fused default loads its component models (each pinned and verified) instead of weights.
    networks = [net for _, net in model.values()] if package.detector.composite else [model]
    assert all(next(net.parameters()).dtype.is_floating_point for net in networks)
    for pkg in [comp for comp, _ in model.values()] if package.detector.composite else [package]:
        assert (pkg.path / "model.safetensors").stat().st_size < 10 * 2 ** 20  # a few MB
    calib = package.calibration
    assert len(calib["subjects"]) > 10
    method = package.meta["recommended_method"]
    value, meaning = package.default_threshold(method)
    assert value > 0 and "0.1 %" in meaning
    # calibration, training and test subjects never overlap
    subjects = package.meta["provenance"]["subjects"]
    assert not set(subjects["train"]) & (set(subjects["calibration"]) | set(subjects["test"]))
    assert set(calib["subjects"]) == set(subjects["calibration"])
    card = (MODELS / name / "README.md").read_text()
    assert "IXI" in card and "CC BY-SA 3.0" in card and "anomaly-localizer fpr" in card


def test_an_edited_shipped_manifest_is_refused(tmp_path):
    import shutil
    from anomaly_localizer.errors import PackageError
    name = json.loads((MODELS / "index.json").read_text())["default"]
    shutil.copytree(MODELS / name, tmp_path / name)
    shutil.copy(MODELS / "index.json", tmp_path / "index.json")
    meta = json.loads((tmp_path / name / "model.json").read_text())
    meta["summary"] = "edited"
    from anomaly_localizer.core.package import update_meta
    update_meta(tmp_path / name, meta)  # a consistent package, but not the one the index pins
    with pytest.raises(PackageError, match="index.json"):
        load_package(tmp_path / name)


def test_demo_scores_a_real_brain_with_and_without_a_lesion(tmp_path):
    pytest.importorskip("nilearn")
    pytest.importorskip("matplotlib")
    from anomaly_localizer.cli import main
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    for case in ("healthy", "lesion"):
        summary = json.loads((out / case / "summary.json").read_text())
        assert summary["threshold"]["source"] == "calibrated"
    assert (out / "overview.png").stat().st_size > 10_000
    import SimpleITK as sitk
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "inputs" / "lesion_truth.nii.gz"))) > 0
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "lesion" / "segmentation.nii.gz"))) > 0
    healthy = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "healthy" / "segmentation.nii.gz"))) > 0
    # the inserted lesion is found where it is: a T1 lesion darker than white matter and soft-edged is
    # faint on T1, so at the default threshold only its core is segmented, but far more of it than
    # the healthy scan's same voxels, and a finding lies on it
    assert seg[truth].mean() > 0.05 and seg[truth].mean() > 5 * healthy[truth].mean()
    findings = json.loads((out / "lesion" / "summary.json").read_text())["findings"]
    assert any(truth[tuple(f["peak_index_ijk"][::-1])] for f in findings)


def test_shipped_brain_extraction_is_pinned_and_finds_a_head_phantoms_brain():
    index = json.loads((MODELS / "index.json").read_text())
    name = index.get("brain_extraction")
    if name is None:
        pytest.skip("no brain extraction model shipped")
    from anomaly_localizer.core.brainextract import default_extractor, extract_brain
    from phantoms import head_phantom, image_from
    package = default_extractor()
    assert package.name == name and package.architecture["type"] == "unet-brainmask"
    card = (MODELS / name / "README.md").read_text()
    assert "Dice" in card and "IXI" in card
    img, brain = head_phantom((60, 100, 90))  # 2.5 mm phantom head: not what it was trained on
    mask = extract_brain(image_from(img, spacing=(2.5, 2.5, 2.5)), package)
    assert mask.shape == brain.shape and mask.any()


def test_a_pinned_model_is_not_recalibrated_in_place(capsys):
    from anomaly_localizer.cli import main
    name = json.loads((MODELS / "index.json").read_text())["default"]
    before = (MODELS / name / "manifest.json").read_bytes()
    assert main(["calibrate", name, str(MODELS), "--in-place"]) == 2
    assert "pinned" in capsys.readouterr().err
    assert (MODELS / name / "manifest.json").read_bytes() == before


def test_demo_does_not_replace_a_users_folder(tmp_path, capsys):
    from anomaly_localizer.cli import main
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert (tmp_path / "mine.txt").read_text() == "keep"
    assert "not an earlier demo output" in capsys.readouterr().err


def test_shipped_models_offer_restoration_and_lsr_calibrated():
    """The VAE carries a tuned restoration lambda and its threshold; the LSR model is small,
    calibrated, pinned, and found by method."""
    from anomaly_localizer.core.installed import resolve_package_for
    vae = load_package(MODELS / "brain-t1-vae")
    assert 0 < vae.meta["restoration"]["lambda"] and vae.meta["restoration"]["selection"]["curve"]
    assert vae.default_threshold("restoration")[0] > 0
    lsr = load_package(MODELS / "brain-t1-lsr")
    assert lsr.methods == ("lsr",) and (MODELS / "brain-t1-lsr" / "model.safetensors").stat().st_size < 10 * 2 ** 20
    assert lsr.default_threshold("lsr")[0] > 0 and "lsr" in lsr.calibration.slice
    assert lsr.meta["provenance"]["subjects"] == vae.meta["provenance"]["subjects"]  # same split, same held-back set
    assert resolve_package_for(["lsr"]).name == "brain-t1-lsr"
    assert resolve_package_for(["restoration"]).name == "brain-t1-vae"
    card = (MODELS / "brain-t1-lsr" / "README.md").read_text()
    assert "IXI" in card and "CC BY-SA 3.0" in card and "Naval Marimont" in card


def test_shipped_lsr_weights_score_a_phantom_reproducibly_with_fewer_samples(tmp_path):
    import shutil
    from anomaly_localizer.core.package import update_meta
    from anomaly_localizer.core.pipeline import score_volume
    from phantoms import image_from, phantom_array
    img = image_from(phantom_array((12, 64, 56), lesion=True), spacing=(3.0, 3.0, 3.0))
    # the shipped weights with 3 restorations per slice instead of 15: each is a full
    # autoregressive sampling, and reproducibility does not depend on how many are averaged
    shutil.copytree(MODELS / "brain-t1-lsr", tmp_path / "brain-t1-lsr")
    meta = load_package(tmp_path / "brain-t1-lsr").meta
    update_meta(tmp_path / "brain-t1-lsr", {**meta, "lsr": {**meta["lsr"], "samples": 3}})
    lsr = load_package(tmp_path / "brain-t1-lsr")
    a = score_volume(img, lsr, ["lsr"])
    b = score_volume(img, lsr, ["lsr"])
    np.testing.assert_array_equal(a.maps["lsr"], b.maps["lsr"])
    assert np.isfinite(a.volume_score) and a.maps["lsr"].max() > 0
