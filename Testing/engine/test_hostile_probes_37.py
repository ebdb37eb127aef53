"""Issue 37: what hostile probes still broke in the engine, each now refused with one line
before any work, or said plainly. Every test here failed on the branch the probes were run
against (03afe50). Tests that could kill or hang the test process then run the command in a
child process with a timeout."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from anomaly_localizer.cli import main
from anomaly_localizer.errors import InputError

from phantoms import TINY_CONTRACT, head_phantom, image_from, make_tiny_package, phantom_array, write_dicom_series
from test_reliability import CALIBRATION, ENGINE

FF = os.fsdecode(b"\xff")  # a file name byte that is not UTF-8


@pytest.fixture()
def setup(tmp_path):
    pkg = make_tiny_package(tmp_path / "models" / "tiny", calibration=CALIBRATION)
    sitk.WriteImage(image_from(phantom_array()), str(tmp_path / "scan.nii.gz"))
    return tmp_path, pkg


def score(pkg, scan, out, *extra):
    return main(["score", str(scan), "--out", str(out), "--model", str(pkg.path), "-q", "--method", "rec",
                 *map(str, extra)])


def child(*args, timeout=120):
    """The command line in a child process: (exit code, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(ENGINE)}
    p = subprocess.run([sys.executable, "-m", "anomaly_localizer.cli", *args], env=env, capture_output=True,
                       timeout=timeout)
    return p.returncode, p.stderr.decode("utf-8", "replace")


def one_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


def no_scoring(monkeypatch):
    import anomaly_localizer.core.pipeline as pipeline
    monkeypatch.setattr(pipeline, "score_volume", lambda *a, **k: pytest.fail("scored before the check"))


# ------------------------------------------------------------------ data lost or crashes

def test_force_never_removes_a_folder_holding_an_input_a_mask_or_the_model(setup, capsys, monkeypatch):
    tmp, pkg = setup
    d = tmp / "d"
    d.mkdir()
    for name in ("scan.nii.gz", "mask.nii.gz"):
        sitk.WriteImage(image_from(phantom_array()) if name == "scan.nii.gz"
                        else image_from((phantom_array() > 0).astype(np.uint8)), str(d / name))
    no_scoring(monkeypatch)
    assert score(pkg, d / "scan.nii.gz", d, "--mask", d / "mask.nii.gz", "--force") == 2
    err = capsys.readouterr().err
    assert "holds the input" in err and one_line(err)
    m = tmp / "m"
    m.mkdir()
    (d / "mask.nii.gz").rename(m / "mask.nii.gz")
    assert score(pkg, tmp / "scan.nii.gz", m, "--mask", m / "mask.nii.gz", "--force") == 2
    assert "holds the mask" in capsys.readouterr().err
    assert score(pkg, tmp / "scan.nii.gz", tmp / "models", "--force") == 2
    assert "holds the model" in capsys.readouterr().err
    assert sorted(p.name for p in d.iterdir()) == ["scan.nii.gz"] and (m / "mask.nii.gz").is_file()
    assert (pkg.path / "model.json").is_file()


@pytest.mark.parametrize("where", ["input", "out"])
def test_a_name_that_is_not_utf8_is_one_line_not_an_abort(setup, where):
    tmp, pkg = setup
    scan = tmp / "scan.nii.gz"
    if where == "input":
        scan = scan.rename(tmp / f"{FF}.nii.gz")
    out = tmp / (f"o{FF}" if where == "out" else "o")
    code, err = child("score", os.fsencode(str(scan)), "--out", os.fsencode(str(out)), "--model", str(pkg.path),
                      "--method", "rec", "-q")
    assert code == 2 and "not valid UTF-8" in err and one_line(err), err
    assert not [p for p in tmp.iterdir() if ".partial" in p.name] and not out.exists()


def test_a_dicom_folder_with_a_slice_name_that_is_not_utf8_is_one_line(tmp_path):
    from anomaly_localizer.core.imageio import read_image
    folder = write_dicom_series(phantom_array().astype(np.int16), tmp_path / "dicom")
    (folder / "003.dcm").rename(folder / f"0{FF}3.dcm")
    with pytest.raises(InputError, match=r"not UTF-8 text \(0\\xff3.dcm\)"):
        read_image(folder)


def test_screening_a_folder_with_a_name_that_is_not_utf8_records_it_as_failed(setup, tmp_path, capsys):
    _, pkg = setup
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("a.nii.gz", f"b{FF}.nii.gz"):  # SimpleITK cannot write such a name: written, then renamed
        sitk.WriteImage(image_from(phantom_array((24, 40, 34))), str(folder / "tmp.nii.gz"))
        os.rename(folder / "tmp.nii.gz", folder / name)
    assert main(["screen", str(folder), "--out", str(tmp_path / "w"), "--model", str(pkg.path), "-q",
                 "--workers", "1"]) == 0
    rows = json.loads((tmp_path / "w" / "worklist.json").read_text())["rows"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(rows) == 2 and len(failed) == 1 and "not valid UTF-8" in failed[0]["error"]
    assert "\\xff" in failed[0]["input"] and (tmp_path / "w" / "worklist.csv").is_file()


def test_a_fifo_as_input_is_refused_without_opening_it(setup):
    tmp, pkg = setup
    os.mkfifo(tmp / "pipe.nii.gz")
    code, err = child("score", str(tmp / "pipe.nii.gz"), "--out", str(tmp / "o"), "--model", str(pkg.path),
                      "--method", "rec", "-q", timeout=90)  # before: blocked for ever
    assert code == 2 and "FIFO" in err and one_line(err)


def test_an_anomaly_model_as_brain_extraction_is_refused_before_any_work(setup, capsys, monkeypatch):
    tmp, pkg = setup
    head, _ = head_phantom()
    sitk.WriteImage(image_from(head), str(tmp / "head.nii.gz"))
    no_scoring(monkeypatch)
    assert score(pkg, tmp / "head.nii.gz", tmp / "o", "--brain-extraction", pkg.path) == 2
    err = capsys.readouterr().err
    assert "not a brain extraction model" in err and one_line(err)
    assert score(pkg, tmp / "head.nii.gz", tmp / "o", "--brain-extraction", "") == 2
    assert "--brain-extraction is empty" in capsys.readouterr().err


def test_an_out_name_too_long_is_one_line(setup, capsys, monkeypatch):
    tmp, pkg = setup
    no_scoring(monkeypatch)
    assert score(pkg, tmp / "scan.nii.gz", tmp / ("x" * 300)) == 2
    err = capsys.readouterr().err
    assert "300 bytes long" in err and one_line(err)


def _nested(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "worklist.json").write_text("[" * 200_000 + "]" * 200_000)


def test_a_worklist_nested_too_deep_is_one_line(setup, tmp_path, capsys):
    _nested(tmp_path / "a")
    _nested(tmp_path / "b")
    assert main(["compare-worklists", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "nested too deeply" in err and one_line(err)
    from anomaly_localizer.core.worklist import read_worklist
    with pytest.raises(ValueError, match="nested too deeply"):
        read_worklist(tmp_path / "a")


def test_a_screening_resume_over_a_worklist_nested_too_deep_warns_and_rebuilds_it(setup, tmp_path, caplog):
    _, pkg = setup
    folder = tmp_path / "scans"
    folder.mkdir()
    sitk.WriteImage(image_from(phantom_array((24, 40, 34))), str(folder / "a.nii.gz"))
    args = ["screen", str(folder), "--out", str(tmp_path / "w"), "--model", str(pkg.path), "-q", "--workers", "1"]
    assert main(args) == 0
    (tmp_path / "w" / "worklist.json").write_text("[" * 200_000 + "]" * 200_000)  # damaged: before, RecursionError
    caplog.clear()
    assert main(args) == 0
    warned = [r.getMessage() for r in caplog.records if "nested too deeply" in r.getMessage()]
    assert len(warned) == 1 and one_line(warned[0])
    rows = json.loads((tmp_path / "w" / "worklist.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["status"] == "done"


def test_a_complex_valued_nifti_is_refused(setup, capsys, monkeypatch):
    nib = pytest.importorskip("nibabel")
    tmp, pkg = setup
    arr = phantom_array().transpose(2, 1, 0).astype(np.complex64) * (1 + 1j)
    nib.save(nib.Nifti1Image(arr, np.diag([4.0, 4.0, 4.0, 1.0])), str(tmp / "complex.nii.gz"))
    no_scoring(monkeypatch)
    assert score(pkg, tmp / "complex.nii.gz", tmp / "o") == 2
    err = capsys.readouterr().err
    assert "complex" in err and one_line(err)


def test_score_volume_refuses_what_the_command_line_refuses(setup):
    from anomaly_localizer.core.pipeline import score_volume
    _, pkg = setup
    arr = phantom_array().astype(np.float32)
    arr[15, 24, 20] = np.inf  # inside the brain
    with pytest.raises(InputError, match="NaN or infinite"):
        score_volume(image_from(arr), pkg, ["rec"], device="cpu")
    with pytest.raises(InputError, match="2D"):
        score_volume(sitk.GetImageFromArray(phantom_array()[15]), pkg, ["rec"], device="cpu")
    vector = sitk.GetImageFromArray(np.stack([phantom_array()] * 3, axis=-1), isVector=True)
    with pytest.raises(InputError, match="components per voxel"):
        score_volume(vector, pkg, ["rec"], device="cpu")


# ------------------------------------------------------------------ what the README promises

def _nifti_with(tmp, name, qform=None, sform=None, pixdim=None):
    nib = pytest.importorskip("nibabel")
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    img = nib.Nifti1Image(phantom_array().transpose(2, 1, 0).astype(np.float32), affine)
    img.set_qform(affine if qform is None else qform, code=1)
    if sform is False:
        img.set_sform(None, code=0)
    else:
        img.set_sform(affine if sform is None else sform, code=1)
    nib.save(img, str(tmp / name))
    if pixdim is not None:  # nibabel refuses to write it: patched in the bytes (pixdim[1:4] at 80)
        raw = bytearray((tmp / name).read_bytes())
        raw[80:92] = np.array(pixdim, "<f4").tobytes()
        (tmp / name).write_bytes(bytes(raw))
    return tmp / name


@pytest.mark.parametrize("how", ["shifted", "rotated"])
def test_a_nifti_whose_qform_and_sform_disagree_is_refused(setup, capsys, monkeypatch, how):
    tmp, pkg = setup
    sform = np.diag([4.0, 4.0, 4.0, 1.0])
    if how == "shifted":
        sform[0, 3] += 10.0
    else:
        sform[:3, :3] = np.array([[0, -4.0, 0], [4.0, 0, 0], [0, 0, 4.0]])
    path = _nifti_with(tmp, f"{how}.nii.gz", sform=sform)
    no_scoring(monkeypatch)
    assert score(pkg, path, tmp / "o") == 2
    err = capsys.readouterr().err
    assert "qform and sform" in err and "disagree" in err and one_line(err)


def test_a_negative_pixdim_with_only_a_qform_is_refused(setup, capsys, monkeypatch):
    tmp, pkg = setup
    path = _nifti_with(tmp, "negative.nii", sform=False, pixdim=[-4.0, 4.0, 4.0])
    no_scoring(monkeypatch)
    assert score(pkg, path, tmp / "o") == 2
    err = capsys.readouterr().err
    assert "negative voxel size" in err and one_line(err)


def test_a_tiny_mask_and_a_raw_threshold_of_zero_are_said_and_recorded(setup, capsys):
    tmp, pkg = setup
    mask = np.zeros(phantom_array().shape, np.uint8)
    mask[13:18, 24, 20] = 1  # 5 voxels
    sitk.WriteImage(image_from(mask), str(tmp / "tiny-mask.nii.gz"))
    assert score(pkg, tmp / "scan.nii.gz", tmp / "o", "--mask", tmp / "tiny-mask.nii.gz", "--contrast", "t1") == 0
    notes = json.loads((tmp / "o" / "summary.json").read_text())["run_notes"]
    assert any("covers only 5 voxels" in n for n in notes) and "covers only 5 voxels" in capsys.readouterr().err
    assert score(pkg, tmp / "scan.nii.gz", tmp / "o2", "--threshold", "0") == 0
    notes = json.loads((tmp / "o2" / "summary.json").read_text())["run_notes"]
    assert any("--threshold 0 is 0 or below" in n for n in notes)
    assert "--threshold 0 is 0 or below" in capsys.readouterr().err


# ------------------------------------------------------------------ messages

def test_c_readers_say_nothing_of_their_own(setup, capfd, monkeypatch):
    tmp, pkg = setup
    (tmp / "broken.mha").write_text("ObjectType = Image\nNDims = 3\nDimSize = 30 48 40\nElementType = MET_FLOAT\n"
                                    "ElementDataFile = missing.raw\n")
    (tmp / "short.nii").write_bytes((tmp / "scan.nii.gz").read_bytes()[:200])
    no_scoring(monkeypatch)
    for bad in ("broken.mha", "short.nii"):
        assert score(pkg, tmp / bad, tmp / "o") == 2
        err = capfd.readouterr().err
        assert one_line(err), err


def test_argparse_refuses_in_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["score"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert one_line(err) and "required" in err and "--help" in err and "usage" not in err


def test_model_messages_name_what_is_wrong(setup, capsys, monkeypatch, tmp_path):
    tmp, pkg = setup
    no_scoring(monkeypatch)
    assert main(["score", str(tmp / "scan.nii.gz"), "--out", str(tmp / "o"), "--model", "", "-q"]) == 2
    assert "the model given is empty" in capsys.readouterr().err
    bx = tiny_extractor(tmp_path / "bx" / "brain-extraction-tiny")
    assert main(["score", str(tmp / "scan.nii.gz"), "--out", str(tmp / "o"), "--model", str(bx.path), "-q"]) == 2
    err = capsys.readouterr().err
    assert "not an anomaly model" in err and "no method given" not in err


def tiny_extractor(path):
    from anomaly_localizer.core.package import build_network, save_package
    arch = {"type": "unet-brainmask", "slice_size": 32, "feature_maps": [4, 8]}
    torch.manual_seed(0)
    meta = {"name": path.name, "architecture": arch, "input_contract": TINY_CONTRACT, "calibration": {},
            "provenance": {"trained_on": "nothing (random weights, tests only)"}}
    return save_package(build_network(arch), meta, path, card="# tiny brain extraction\n")


def test_another_users_folder_is_not_met_with_pass_force(setup, capsys, monkeypatch):
    tmp, pkg = setup
    (tmp / "theirs").mkdir()
    (tmp / "theirs" / "a.nii.gz").write_bytes(b"")
    import anomaly_localizer.core.results as results
    monkeypatch.setattr(results, "_owner", lambda p: os.getuid() + 1 if p.name == "theirs" else os.getuid())
    monkeypatch.setattr(results, "_owner_name", lambda p: "someone")
    no_scoring(monkeypatch)
    assert score(pkg, tmp / "scan.nii.gz", tmp / "theirs") == 2
    err = capsys.readouterr().err
    assert "belongs to another user (someone)" in err and "--force" not in err


def test_a_dangling_symlink_out_is_refused_before_scoring(setup, capsys, monkeypatch):
    tmp, pkg = setup
    (tmp / "link").symlink_to(tmp / "nowhere")
    no_scoring(monkeypatch)
    assert score(pkg, tmp / "scan.nii.gz", tmp / "link") == 2
    err = capsys.readouterr().err
    assert "symbolic link" in err and "free some space" not in err.lower()


def test_nan_in_the_brain_is_said_as_nan():
    from anomaly_localizer.core.volume import normalise_intensities
    arr = phantom_array().astype(np.float32)
    arr[15, 24, 20] = np.nan
    with pytest.raises(InputError, match="NaN"):
        normalise_intensities(arr, phantom_array() > 0)


def test_a_broken_package_that_shadows_the_brain_extraction_model_is_said(tmp_path, monkeypatch, caplog):
    from anomaly_localizer.core.brainextract import default_extractor
    good = tiny_extractor(tmp_path / "shipped" / "brain-extraction-unet")
    (tmp_path / "shipped" / "index.json").write_text(json.dumps({"brain_extraction": "brain-extraction-unet"}))
    broken = tiny_extractor(tmp_path / "mine" / "brain-extraction-unet")
    (broken.path / "model.json").write_text("{not json")
    monkeypatch.setenv("ANOMALY_LOCALIZER_MODELS", os.pathsep.join([str(tmp_path / "mine"), str(tmp_path / "shipped")]))
    with caplog.at_level("WARNING"):
        assert default_extractor().path == good.path
    assert any("is broken and not used" in r.getMessage() and str(broken.path) in r.getMessage()
               for r in caplog.records)


def test_more_workers_than_cores_are_capped_with_a_warning(setup, tmp_path, monkeypatch, caplog):
    _, pkg = setup
    import anomaly_localizer.tooling.screening.screen as screen_mod
    monkeypatch.setattr(screen_mod, "default_workers", lambda: 1)
    (tmp_path / "s").mkdir()
    sitk.WriteImage(image_from(phantom_array((24, 40, 34))), str(tmp_path / "s" / "a.nii.gz"))
    with caplog.at_level("WARNING"):
        rows = screen_mod.run_screening([str(tmp_path / "s")], tmp_path / "w", screen_mod.ScreenOptions(
            str(pkg.path), pkg.name, pkg.manifest_sha256, ("rec",)), workers=16)
    assert [r.status for r in rows] == ["done"]
    assert any("--workers 16 is more than the 1 cores" in r.getMessage() for r in caplog.records)


def test_a_partial_folder_left_by_a_killed_run_is_removed_by_the_next_run(setup):
    tmp, pkg = setup
    from anomaly_localizer.core.paths import partial_prefix
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp / partial_prefix("o").replace(f"-p{os.getpid()}-", f"-p{gone.pid}-")
    stale = stale.with_name(stale.name + "abc123")
    (stale / "x").mkdir(parents=True)
    alive = tmp / (partial_prefix("o") + "live")  # this process's own: kept
    alive.mkdir()
    other = tmp / ".o.partial-old-naming"  # not of this naming: kept
    other.mkdir()
    assert score(pkg, tmp / "scan.nii.gz", tmp / "o") == 0
    assert not stale.exists() and alive.exists() and other.exists()
