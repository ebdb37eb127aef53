"""The command line end to end: the output contract, and bad input that writes nothing."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from anomaly_localizer.cli import main
from anomaly_localizer.core.scores import PIXEL_METHODS

from phantoms import image_from, make_tiny_package, phantom_array, psr_image

CALIBRATION = {"default_fpr": 0.001, "pixel": {m: {"n_subjects": 3, "thresholds": [
    {"fpr": 0.01, "value": 0.01}, {"fpr": 0.001, "value": 0.02}, {"fpr": 0.0001, "value": 0.05}]}
    for m in PIXEL_METHODS}}


@pytest.fixture()
def setup(tmp_path):
    pkg = make_tiny_package(tmp_path / "models" / "tiny", calibration=CALIBRATION)
    img = psr_image(phantom_array(lesion=True))
    sitk.WriteImage(img, str(tmp_path / "scan.nii.gz"))
    return tmp_path, pkg


def run(*args):
    return main([str(a) for a in args])


def test_score_writes_the_whole_contract(setup, capsys):
    tmp, pkg = setup
    out = tmp / "out"
    assert run("score", tmp / "scan.nii.gz", "--out", out, "--model", pkg.path) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {f"{m}.nii.gz" for m in PIXEL_METHODS} | {"segmentation.nii.gz", "slice_scores.csv",
                                                             "brainmask.nii.gz", "summary.json", "findings.csv"}
    scan = sitk.ReadImage(str(tmp / "scan.nii.gz"))
    for n in names - {"slice_scores.csv", "summary.json", "findings.csv"}:
        img = sitk.ReadImage(str(out / n))
        assert img.GetSize() == scan.GetSize()
        np.testing.assert_allclose(img.GetDirection(), scan.GetDirection(), atol=1e-6)
        np.testing.assert_allclose(img.GetOrigin(), scan.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(img.GetSpacing(), scan.GetSpacing(), atol=1e-6)
    assert sitk.ReadImage(str(out / "rec.nii.gz")).GetPixelID() == sitk.sitkFloat32
    seg = sitk.ReadImage(str(out / "segmentation.nii.gz"))
    assert seg.GetPixelID() == sitk.sitkUInt8
    rec = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "rec.nii.gz")))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(seg), (rec > 0.02).astype(np.uint8))
    rows = list(csv.DictReader(open(out / "slice_scores.csv")))
    assert len(rows) == scan.GetSize()[1]  # one row per slice along the axial axis (j for P,S,R)
    assert set(rows[0]) == {"slice", "brain_voxels", "elbo", "kl", "rec"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["name"] == "tiny" and len(summary["model"]["manifest_sha256"]) == 64
    assert summary["methods"] == list(PIXEL_METHODS)
    assert summary["threshold"]["value"] == 0.02 and summary["threshold"]["source"] == "calibrated"
    assert "0.1 % of healthy brain voxels" in summary["threshold"]["meaning"]
    assert summary["axial_axis"] == 1 and summary["device"] == "cpu"
    assert {"read", "prepare_s", "score_s", "total_s"} <= set(summary["timings_s"])
    assert "PROGRESS" in capsys.readouterr().err


def test_methods_and_threshold_options(setup):
    tmp, pkg = setup
    out = tmp / "out"
    assert run("score", tmp / "scan.nii.gz", "--out", out, "--model", pkg.path, "--method", "kl_grad",
               "--method", "rec", "--threshold", "0", "-q") == 0
    assert {p.name for p in out.glob("*.nii.gz")} == {"kl_grad.nii.gz", "rec.nii.gz", "segmentation.nii.gz",
                                                       "brainmask.nii.gz"}
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "segmentation.nii.gz")))
    kl = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "kl_grad.nii.gz")))
    np.testing.assert_array_equal(seg, (kl > 0).astype(np.uint8))
    assert json.loads((out / "summary.json").read_text())["threshold"]["source"] == "user"


def test_given_mask_restricts_scores(setup):
    tmp, pkg = setup
    scan = sitk.ReadImage(str(tmp / "scan.nii.gz"))
    arr = sitk.GetArrayFromImage(scan)
    half = (arr != 0).astype(np.uint8)
    half[: half.shape[0] // 2] = 0
    m = sitk.GetImageFromArray(half)
    m.CopyInformation(scan)
    sitk.WriteImage(m, str(tmp / "mask.nrrd"))
    assert run("score", tmp / "scan.nii.gz", "--out", tmp / "o", "--model", pkg.path, "--mask", tmp / "mask.nrrd",
               "--method", "combi", "-q") == 0
    combi = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp / "o" / "combi.nii.gz")))
    assert (combi[half == 0] == 0).all() and combi[half == 1].max() > 0
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp / "o" / "brainmask.nii.gz")))
    np.testing.assert_array_equal(written, half)


def _bad_cases(tmp, pkg):
    nan = phantom_array()
    nan[5, 5, 5] = np.nan
    sitk.WriteImage(image_from(nan), str(tmp / "nan.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((9, 9), np.float32)), str(tmp / "flat.nrrd"))
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((2, 9, 9, 9), np.float32), isVector=False), str(tmp / "4d.nii.gz"))
    sitk.WriteImage(image_from(np.zeros((20, 20, 20), np.float32)), str(tmp / "zero.nii.gz"))
    sitk.WriteImage(image_from(np.zeros((30, 48, 40), np.uint8), spacing=(1.0, 1.0, 1.0)), str(tmp / "othermask.nii.gz"))
    (tmp / "corrupt.nii.gz").write_bytes(b"\x1f\x8b garbage")
    scan = tmp / "scan.nii.gz"
    return {
        "unreadable": (["score", tmp / "corrupt.nii.gz"], "cannot read"),
        "2d": (["score", tmp / "flat.nrrd"], "2D"),
        "4d": (["score", tmp / "4d.nii.gz"], "4D"),
        "nan": (["score", tmp / "nan.nii.gz"], "NaN"),
        "all zero": (["score", tmp / "zero.nii.gz"], "all zero"),
        "mask grid": (["score", scan, "--mask", tmp / "othermask.nii.gz"], "another grid"),
        "method": (["score", scan, "--method", "magic"], "unknown method magic"),
        "model": (["score", scan, "--model", "no-such-model"], "unknown model"),
        "model dir": (["score", scan, "--model", tmp / "nodir"], "does not exist"),
    }


@pytest.mark.parametrize("case", ["unreadable", "2d", "4d", "nan", "all zero", "mask grid", "method", "model",
                                  "model dir"])
def test_bad_input_exits_non_zero_with_one_line_and_writes_nothing(setup, capsys, case):
    tmp, pkg = setup
    args, message = _bad_cases(tmp, pkg)[case]
    out = tmp / "out"
    model = [] if "--model" in args else ["--model", pkg.path]
    before = sorted(p.name for p in tmp.iterdir())
    code = run(*args, "--out", out, *model, "--threshold", "0.1", "-q")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp.iterdir()) == before  # no partial or temporary files left


def test_existing_output_is_kept_unless_forced(setup, capsys):
    tmp, pkg = setup
    out = tmp / "out"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    assert run("score", tmp / "scan.nii.gz", "--out", out, "--model", pkg.path, "-q") == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "precious"
    assert run("score", tmp / "scan.nii.gz", "--out", out, "--model", pkg.path, "-q", "--force") == 0
    assert (out / "summary.json").is_file() and not (out / "mine.txt").exists()
    assert not [p for p in tmp.iterdir() if p.name.startswith(".out.")]


def test_uncalibrated_model_needs_a_threshold(tmp_path, capsys):
    pkg = make_tiny_package(tmp_path / "raw")
    sitk.WriteImage(image_from(phantom_array()), str(tmp_path / "s.nii.gz"))
    assert run("score", tmp_path / "s.nii.gz", "--out", tmp_path / "o", "--model", pkg.path) == 2
    assert "--threshold" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_installed_command_runs_and_is_deterministic(setup):
    tmp, pkg = setup
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "AnomalyLocalizer")}
    for out in ("a", "b"):
        r = subprocess.run([sys.executable, "-m", "anomaly_localizer.cli", "score", str(tmp / "scan.nii.gz"),
                            "--out", str(tmp / out), "--model", str(pkg.path), "--device", "cpu"],
                           capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
    for m in PIXEL_METHODS:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp / "a" / f"{m}.nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp / "b" / f"{m}.nii.gz")))
        np.testing.assert_array_equal(a, b)
    assert (tmp / "a" / "slice_scores.csv").read_text() == (tmp / "b" / "slice_scores.csv").read_text()


def test_a_scan_flagged_far_more_broadly_than_healthy_brains_gets_a_note(tmp_path, capsys):
    """The calibration says this threshold flags 0.01 % of healthy brain; a threshold of 0 flags
    most of this brain: summary.json and stderr (even with -q) say what that can mean."""
    curve = {"fpr": [0.01, 0.001, 0.0001], "values": [-1e9, -5e8, -1e8]}
    calib = {"default_fpr": 0.001, "pixel": {"rec": {"n_subjects": 3, "curve": curve,
                                                     "thresholds": [{"fpr": 0.001, "value": -5e8}]}}}
    pkg = make_tiny_package(tmp_path / "tiny", calibration=calib)
    sitk.WriteImage(psr_image(phantom_array()), str(tmp_path / "scan.nii.gz"))
    assert run("score", tmp_path / "scan.nii.gz", "--out", tmp_path / "broad", "--model", pkg.path,
               "--method", "rec", "--threshold", "0", "-q") == 0
    summary = json.loads((tmp_path / "broad" / "summary.json").read_text())
    assert summary["segmented_brain_share"] > 0.5
    assert "recalibrate" in summary["note"] and "note: " in capsys.readouterr().err
    assert run("score", tmp_path / "scan.nii.gz", "--out", tmp_path / "narrow", "--model", pkg.path,
               "--method", "rec", "--threshold", "1e9", "-q") == 0
    summary = json.loads((tmp_path / "narrow" / "summary.json").read_text())
    assert summary["segmented_brain_share"] == 0 and "note" not in summary
    assert "note: " not in capsys.readouterr().err


def test_broad_flag_note_fires_only_far_above_the_healthy_rate():
    from anomaly_localizer.core.levels import broad_flag_note
    assert broad_flag_note(0.115, 0.001) is not None and "115 times" in broad_flag_note(0.115, 0.001)
    assert broad_flag_note(0.015, 0.001) is None  # 15 times: within what one scan can vary
    assert broad_flag_note(0.009, 0.0001) is None  # under 1 % of the brain is never "broad"
    assert broad_flag_note(0.5, None) is None  # uncalibrated: nothing to compare with


def test_progress_estimates_the_time_left_once_there_is_enough_to_go_on():
    from anomaly_localizer.cli.common import time_left
    assert time_left(0.01, 10.0) == "" and time_left(0.5, 1.0) == "" and time_left(1.0, 50.0) == ""
    assert time_left(0.5, 10.0) == " (about 10 s left)"
    assert time_left(0.1, 60.0) == " (about 9 min left)"


def test_help_lists_what_users_run_first_then_model_making_and_measuring(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    sections = ["Reading scans:", "Making models", "Measuring models:"]
    assert [text.index(s) for s in sections] == sorted(text.index(s) for s in sections)
    reading = text[text.index("Reading scans:"):text.index("Making models")]
    import re
    listed = re.findall(r"^  (\S+)", reading, re.M)
    # view is the browser viewer's command, listed when its entry point is installed
    assert [c for c in listed if c != "view"][:4] == ["score", "screen", "models", "demo"]
    assert all(len(line) <= 100 for line in text.splitlines())


def test_a_note_is_one_short_line_on_the_terminal():
    from anomaly_localizer.core.levels import broad_flag_note
    from anomaly_localizer.core.relative import reference_note
    relative = reference_note("fused", {"healthy_max": 1.0, "times_healthy_median": 1.8, "scan_value": 2.0,
                                        "quantile": 0.75})
    broad = broad_flag_note(0.05, 0.001)
    assert relative.startswith("The fused map of this scan is 1.8 times") and "75th percentile" in relative
    assert broad.startswith("5.0 % of this brain") and "anomaly-localizer calibrate" in broad
    assert all("\n" not in n and len(n) < 240 for n in (relative, broad))
