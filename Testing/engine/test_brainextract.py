"""Built-in brain extraction: trained on scans with reference masks, used for whole heads."""

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from anomaly_localizer.core.brainextract import extract_brain, head_mask, postprocess
from anomaly_localizer.tooling.training.brainmask import LESION_KINDS, _with_lesion
from anomaly_localizer.cli import main
from anomaly_localizer.errors import InputError
from anomaly_localizer.core.package import load_package
from anomaly_localizer.core.pipeline import score_volume

from phantoms import head_phantom, image_from, make_tiny_package

ARCH = {"slice_size": 32}


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    (root / "t1").mkdir()
    (root / "brainmask").mkdir()
    for i in range(8):
        img, brain = head_phantom((28 + i % 3, 44, 38), seed=i)
        sitk.WriteImage(image_from(img * (1 + 0.05 * i)), str(root / "t1" / f"H{i}_T1.nii.gz"))
        sitk.WriteImage(image_from(brain.astype(np.uint8)), str(root / "brainmask" / f"H{i}_brainmask.nii.gz"))
    return root


@pytest.fixture(scope="module")
def extractor(heads, tmp_path_factory):
    from anomaly_localizer.tooling.training.brainmask import train_brainmask
    out = tmp_path_factory.mktemp("bx") / "bx"
    return train_brainmask(heads, out, epochs=25, batch_size=8, learning_rate=3e-3, spacing=6.0,
                           arch={"slice_size": 32, "feature_maps": [4, 8, 16]}, progress=None, slice_step=1)


def test_head_mask_covers_the_head_not_the_air():
    img, brain = head_phantom()
    head = head_mask(image_from(img))
    assert head[brain].all() and head.mean() < 0.8 and head.mean() > 0.3


def test_trained_extractor_finds_the_brain_of_an_unseen_head(extractor):
    assert extractor.architecture["type"] == "unet-brainmask"
    img, brain = head_phantom((29, 44, 38), seed=42)
    mask = extract_brain(image_from(img), extractor)
    assert mask.shape == brain.shape
    dice = 2 * (mask & brain).sum() / (mask.sum() + brain.sum())
    assert dice > 0.85


def test_whole_head_without_mask_is_brain_extracted_when_a_model_is_given(extractor, tmp_path):
    img, brain = head_phantom((29, 44, 38), seed=43)
    pkg = make_tiny_package(tmp_path / "tiny")
    res = score_volume(image_from(img), pkg, ["rec"], brain_extraction=str(extractor.path))
    assert res.info["brain_mask_source"].startswith("brain extraction (bx")
    assert (res.maps["rec"][~res.brain_mask] == 0).all()
    with pytest.raises(InputError, match="skull-stripped"):
        score_volume(image_from(img), pkg, ["rec"], brain_extraction="off")


def test_cli_writes_the_extracted_mask_and_says_so(extractor, tmp_path):
    img, _ = head_phantom((29, 44, 38), seed=44)
    sitk.WriteImage(image_from(img), str(tmp_path / "head.nii.gz"))
    pkg = make_tiny_package(tmp_path / "tiny")
    # the phantom's coarse 4 mm "brain" has no cortex a recogniser could read (it looks like FLAIR):
    # its contrast is given, as a user gives it for a scan whose contrast the image cannot tell
    assert main(["score", str(tmp_path / "head.nii.gz"), "--out", str(tmp_path / "o"), "--model", str(pkg.path),
                 "--threshold", "1", "--brain-extraction", str(extractor.path), "--contrast", "t1", "-q"]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["brain_mask_source"].startswith("brain extraction")
    assert summary["timings_s"]["brain_extraction_s"] > 0  # timed apart from reading
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "o" / "brainmask.nii.gz")))
    assert written.sum() > 0


def test_brain_extraction_model_is_not_an_anomaly_model(extractor):
    img, _ = head_phantom()
    with pytest.raises(InputError, match="not an anomaly model"):
        score_volume(image_from(img), extractor, ["rec"])


def test_dice_command_reports_held_back_subjects(extractor, heads, tmp_path):
    assert main(["brainmask-dice", str(extractor.path), str(heads), "--subjects", "all",
                 "--json", str(tmp_path / "d.json"), "-q"]) == 0
    result = json.loads((tmp_path / "d.json").read_text())
    assert len(result["dice"]) == 8 and 0 <= result["min"] <= result["mean"] <= 1


def test_dice_command_with_tumour_like_lesions_reports_how_much_of_each_lesion_is_kept(extractor, heads, tmp_path):
    args = ["brainmask-dice", str(extractor.path), str(heads), "--subjects", "all", "--with-lesion", "-q"]
    assert main(args + ["--json", str(tmp_path / "a.json")]) == 0
    assert main(args + ["--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["lesions"]["per_subject"] == b["lesions"]["per_subject"]  # seeded: the same lesions
    records = a["lesions"]["per_subject"]
    assert set(records) == set(a["dice"]) and len(records) == 8
    for r in records.values():
        assert r["kind"] in LESION_KINDS and r["lesion_voxels"] > 0 and 0.0 <= r["lesion_kept"] <= 1.0
    assert a["lesions"]["lesion_kept_min"] <= a["lesions"]["lesion_kept_mean"] <= 1.0
    assert main(args + ["--lesion-seed", "1", "--json", str(tmp_path / "c.json")]) == 0
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["lesions"]["per_subject"] != records
    # the model card shows both measurements, the lesion one with how much of the lesions was kept
    assert main(["brainmask-dice", str(extractor.path), str(heads), "--subjects", "all", "-q",
                 "--json", str(tmp_path / "plain.json")]) == 0
    copy = tmp_path / "bx-copy"
    shutil.copytree(extractor.path, copy)
    assert main(["card", str(copy), "--dice", str(tmp_path / "plain.json"), "--dice", str(tmp_path / "a.json")]) == 0
    card = (copy / "README.md").read_text()
    assert "## Dice against the reference masks" in card and "synthetic tumour-like lesion" in card
    assert f"{100 * a['lesions']['lesion_kept_min']:.1f} %" in card
    load_package(copy)  # the manifest was re-hashed: the package still verifies


def test_lesion_is_inserted_inside_the_brain_only():
    img, brain = head_phantom((29, 44, 38), seed=45)
    image = image_from(img)
    lesioned, label, kind = _with_lesion(image, brain, seed=3)
    changed = sitk.GetArrayFromImage(lesioned) != sitk.GetArrayFromImage(image)
    assert kind in LESION_KINDS and label.any() and not changed[~brain].any() and not label[~brain].any()


def test_postprocess_keeps_the_largest_component_and_fills_holes():
    prob = np.zeros((20, 20, 20))
    prob[4:16, 4:16, 4:16] = 0.9
    prob[8:10, 8:10, 8:10] = 0.1  # a hole
    prob[0, 0, 0] = 0.9  # a speck
    out = postprocess(prob)
    assert out[8, 8, 8] and not out[0, 0, 0]
    with pytest.raises(InputError, match="no brain"):
        postprocess(np.zeros((5, 5, 5)))


def test_dice_command_on_case_folders_measures_the_engines_own_choice(extractor, tmp_path):
    """Case folders (BraTS layout) of z-scored skull-stripped scans: the engine keeps their
    non-background region, which matches the reference brain exactly."""
    from phantoms import phantom_array
    for i in range(2):
        arr = phantom_array(seed=i)
        brain = arr != 0
        z = np.where(brain, (arr - arr[brain].mean()) / arr[brain].std(), -arr[brain].mean() / arr[brain].std())
        case = tmp_path / f"case{i}"
        case.mkdir()
        sitk.WriteImage(image_from(z.astype(np.float32)), str(case / "t1c.nii.gz"))
        sitk.WriteImage(image_from(brain.astype(np.uint8)), str(case / "brainmask.nii.gz"))
    out = tmp_path / "d.json"
    assert main(["brainmask-dice", str(extractor.path), str(tmp_path), "--cases", "--engine-rule",
                 "--image-name", "t1c.nii.gz", "--json", str(out), "-q"]) == 0
    result = json.loads(out.read_text())
    assert sorted(result["dice"]) == ["case0", "case1"] and result["min"] == pytest.approx(1.0)


def test_on_a_fine_grid_the_head_is_found_on_coarser_blocks_with_the_same_outline():
    from anomaly_localizer.core.brainextract import _head_mask, head_mask
    img, _ = head_phantom((60, 96, 80))
    fine = image_from(img, spacing=(1.0, 1.0, 1.0))
    fast, exact = head_mask(fine), _head_mask(fine)
    assert fast.shape == exact.shape
    # The whole head, and at most a thin shell of air more (blocks straddle its surface).
    assert (exact & ~fast).sum() < 0.01 * exact.sum() and fast.sum() < 1.1 * exact.sum()
    assert np.array_equal(head_mask(image_from(img, spacing=(2.0, 2.0, 2.0))),
                          _head_mask(image_from(img, spacing=(2.0, 2.0, 2.0))))  # 2 mm: found as it is
