"""Nothing lost, nothing misleading: faults a new or a hostile user meets, each refused with
one line (exit 2) or stopped cleanly (exit 3), with no partial output and no silent shift."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from anomaly_localizer.cli import main
from anomaly_localizer.core import results
from anomaly_localizer.core.package import load_package, update_meta, write_manifest
from anomaly_localizer.core.package import resolve_package
from anomaly_localizer.core.scores import PIXEL_METHODS
from anomaly_localizer.errors import PackageError

from phantoms import image_from, make_tiny_package, phantom_array

CALIBRATION = {"default_fpr": 0.001, "pixel": {m: {"n_subjects": 3, "thresholds": [
    {"fpr": 0.01, "value": 0.01}, {"fpr": 0.001, "value": 0.02}, {"fpr": 0.0001, "value": 0.05}]}
    for m in PIXEL_METHODS}}
ENGINE = Path(__file__).resolve().parents[2] / "AnomalyLocalizer"


@pytest.fixture()
def setup(tmp_path):
    pkg = make_tiny_package(tmp_path / "models" / "tiny", calibration=CALIBRATION)
    sitk.WriteImage(image_from(phantom_array()), str(tmp_path / "scan.nii.gz"))
    return tmp_path, pkg


def score(tmp, pkg, out, *extra):
    return main(["score", str(tmp / "scan.nii.gz"), "--out", str(out), "--model", str(pkg.path), "-q",
                 "--method", "rec", *map(str, extra)])


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]


# ------------------------------------------------------------------ command line and outputs

def test_two_runs_into_one_new_folder_exactly_one_succeeds(setup):
    tmp, pkg = setup
    out = tmp / "out"
    env = {**os.environ, "PYTHONPATH": str(ENGINE)}
    cmd = [sys.executable, "-m", "anomaly_localizer.cli", "score", str(tmp / "scan.nii.gz"), "--out", str(out),
           "--model", str(pkg.path), "--method", "rec", "-q"]
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    codes = [(p.wait(120), p.stderr.read()) for p in procs]
    assert sorted(c for c, _ in codes) == [0, 2], codes
    assert any("already exists" in err or "created by another run" in err for c, err in codes if c == 2)
    assert not leftovers(tmp)


def test_the_folder_appearing_during_a_run_is_not_replaced(setup, tmp_path):
    out = tmp_path / "taken"
    tmp = tmp_path / ".taken.partial-x"
    tmp.mkdir()
    (tmp / "summary.json").write_text("{}")
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(results.InputError, match="created by another run") as err:
        results._publish(tmp, out, force=False)
    assert "--force" not in str(err.value)  # forcing would destroy the other run's results
    assert (out / "mine.txt").read_text() == "keep"


def test_sigterm_and_ctrl_c_while_writing_stop_cleanly(setup, monkeypatch, capsys):
    tmp, pkg = setup
    real = results.write_image
    calls = []

    def write_then_signal(image, path, *a):
        calls.append(path)
        real(image, path, *a)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, half-way through the files
            time.sleep(1)
    monkeypatch.setattr(results, "write_image", write_then_signal)
    assert score(tmp, pkg, tmp / "out") == 3
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert not (tmp / "out").exists() and not leftovers(tmp)
    monkeypatch.setattr(results, "write_image", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert score(tmp, pkg, tmp / "out") == 3
    assert not (tmp / "out").exists() and not leftovers(tmp)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main() leaves the handlers as it found them


def test_sigterm_of_a_running_command_exits_3_with_nothing_written(setup):
    tmp, pkg = setup
    env = {**os.environ, "PYTHONPATH": str(ENGINE)}
    p = subprocess.Popen([sys.executable, "-m", "anomaly_localizer.cli", "score", str(tmp / "scan.nii.gz"), "--out",
                          str(tmp / "out"), "--model", str(pkg.path), "--method", "restoration", "--threshold", "0.1"],
                         env=env, stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if "restoring" in line:
            p.send_signal(signal.SIGTERM)
            break
    rest = p.stderr.read()
    assert p.wait(60) == 3 and "Traceback" not in rest
    assert not (tmp / "out").exists() and not leftovers(tmp)


def test_output_problems_are_refused_before_any_scoring(setup, monkeypatch, capsys):
    tmp, pkg = setup
    from anomaly_localizer.core import pipeline
    monkeypatch.setattr(pipeline, "score_volume", lambda *a, **k: pytest.fail("scored before refusing"))
    real_access = os.access
    monkeypatch.setattr(results.os, "access", lambda p, mode: False if Path(p) == tmp else real_access(p, mode))
    assert score(tmp, pkg, tmp / "out") == 2
    assert "cannot write into" in capsys.readouterr().err
    monkeypatch.setattr(results.os, "access", real_access)
    here = tmp / "here"
    here.mkdir()
    (here / "x.txt").write_text("x")
    monkeypatch.chdir(here)
    assert score(tmp, pkg, ".", "--force") == 2
    assert "current folder" in capsys.readouterr().err and (here / "x.txt").exists()


def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(setup, monkeypatch, capsys):
    tmp, pkg = setup

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(results, "write_image", full)
    assert score(tmp, pkg, tmp / "out") == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "nothing was written" in err and "Traceback" not in err
    assert not (tmp / "out").exists() and not leftovers(tmp)


def test_force_on_a_folder_that_cannot_be_replaced_keeps_it_and_leaves_nothing(setup, monkeypatch, capsys):
    tmp, pkg = setup
    out = tmp / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    real = os.rename

    def refuse(src, dst):
        if Path(src) == out:
            raise OSError(16, "Device or resource busy")
        return real(src, dst)
    monkeypatch.setattr(results.os, "rename", refuse)
    assert score(tmp, pkg, out, "--force") == 2
    assert "could not replace" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "keep" and not leftovers(tmp)


def test_output_folders_follow_the_users_umask(setup):
    tmp, pkg = setup
    old = os.umask(0o022)
    try:
        assert score(tmp, pkg, tmp / "out") == 0
    finally:
        os.umask(old)
    assert (tmp / "out").stat().st_mode & 0o777 == 0o755


def test_a_sheared_nifti_is_refused_instead_of_shifting_the_results(setup, capsys):
    tmp, pkg = setup
    path = tmp / "sheared.nii"
    sitk.WriteImage(image_from(phantom_array()), str(path))
    raw = bytearray(path.read_bytes())
    srow_x = np.frombuffer(bytes(raw[280:296]), "<f4").copy()
    srow_x[1] += 1.0  # shear: the second voxel axis leans into x
    raw[280:296] = srow_x.tobytes()
    path.write_bytes(bytes(raw))
    assert main(["score", str(path), "--out", str(tmp / "out"), "--model", str(pkg.path), "-q"]) == 2
    assert "non-orthogonal" in capsys.readouterr().err and not (tmp / "out").exists()


def test_nan_thresholds_are_refused(setup, capsys):
    tmp, pkg = setup
    assert score(tmp, pkg, tmp / "out", "--threshold", "nan") == 2
    assert "not a finite number" in capsys.readouterr().err
    meta = dict(pkg.meta)
    meta["calibration"] = json.loads(json.dumps(CALIBRATION))
    meta["calibration"]["pixel"]["rec"]["thresholds"][1]["value"] = float("nan")
    (pkg.path / "model.json").write_text(json.dumps(meta))  # NaN is what Python's json writes
    write_manifest(pkg.path)
    with pytest.raises(PackageError, match="calibration.pixel.rec.thresholds.1.value"):
        load_package(pkg.path)


def test_messages_say_what_is_actually_wrong(setup, monkeypatch, capsys):
    tmp, pkg = setup
    img = image_from(phantom_array())
    sitk.WriteImage(img, str(tmp / "scan.mha"))
    data = (tmp / "scan.mha").read_bytes()
    (tmp / "cut.mha").write_bytes(data[: len(data) // 2])
    assert main(["score", str(tmp / "cut.mha"), "--out", str(tmp / "o1"), "--model", str(pkg.path), "-q"]) == 2
    err = capsys.readouterr().err
    assert "No such file" not in err and "incomplete" in err
    mask = image_from((phantom_array() != 0).astype(np.uint8), origin=(99.0, -20.0, 5.0))
    sitk.WriteImage(mask, str(tmp / "mask.nii.gz"))
    assert score(tmp, pkg, tmp / "o2", "--mask", tmp / "mask.nii.gz") == 2
    err = capsys.readouterr().err
    assert "origin" in err and "size" not in err.split("(")[1]
    from anomaly_localizer.core import imageio
    real_access = os.access
    monkeypatch.setattr(imageio.os, "access", lambda p, m: False if str(p).endswith("scan.nii.gz") else real_access(p, m))
    assert score(tmp, pkg, tmp / "o3") == 2
    err = capsys.readouterr().err
    assert "permission denied" in err and "does not exist" not in err


# -------------------------------------------------------------------------- model packages

def _edit(pkg, change):
    meta = json.loads((pkg.path / "model.json").read_text())
    change(meta)
    update_meta(pkg.path, meta)


def test_a_manifest_cannot_reach_outside_its_package(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not a model file")
    for name in ("../secret.txt", str(secret), "sub/../../secret.txt"):
        pkg = make_tiny_package(tmp_path / f"m{abs(hash(name))}")
        manifest = json.loads((pkg.path / "manifest.json").read_text())
        manifest["files"][name] = "0" * 64
        (pkg.path / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(PackageError, match="not a file of the package folder"):
            load_package(pkg.path)
    pkg = make_tiny_package(tmp_path / "linked")
    (pkg.path / "README.md").unlink()
    (pkg.path / "README.md").symlink_to(secret)
    write_manifest(pkg.path)
    with pytest.raises(PackageError, match="link"):
        load_package(pkg.path)


@pytest.mark.parametrize("change, field", [
    (lambda m: m["architecture"].update(feature_maps=[200000]), "architecture.feature_maps.0"),
    (lambda m: m.update(map_smoothing={"rec": {"through_plane_mm": 1e7}}), "map_smoothing.rec.through_plane_mm"),
    (lambda m: m["input_contract"].update(slice_size="big"), "input_contract.slice_size"),
    (lambda m: m["architecture"].update(slice_size=64), "slice_size"),
    (lambda m: m.update(restoration={"steps": -3}), "restoration.steps"),
    (lambda m: m.update(recommended_method="lsr"), "recommended_method"),
])
def test_model_json_is_validated_against_its_schema_naming_the_field(tmp_path, change, field):
    pkg = make_tiny_package(tmp_path / "m")
    _edit(pkg, change)
    with pytest.raises(PackageError, match=field.replace(".", r"\.")):
        load_package(pkg.path)


def test_deep_nesting_and_a_manifest_of_the_wrong_shape_are_refused(tmp_path):
    pkg = make_tiny_package(tmp_path / "m")
    (pkg.path / "model.json").write_text("[" * 100000 + "]" * 100000)
    write_manifest(pkg.path)
    with pytest.raises(PackageError, match="nested too deeply|not a JSON object"):
        load_package(pkg.path)
    pkg = make_tiny_package(tmp_path / "n")
    manifest = json.loads((pkg.path / "manifest.json").read_text())
    manifest["files"] = list(manifest["files"])
    (pkg.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="files"):
        load_package(pkg.path)


def test_one_broken_package_is_reported_and_skipped(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "models"
    good = make_tiny_package(folder / "good")
    bad = make_tiny_package(folder / "bad")
    (bad.path / "model.json").write_text("{not json")
    write_manifest(bad.path)
    monkeypatch.setenv("ANOMALY_LOCALIZER_MODELS", str(folder))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "BROKEN" in out and "bad" in out and "good" in out
    from anomaly_localizer.core.installed import resolve_package_for, scan_packages
    packages, broken = scan_packages()
    assert "good" in [p.name for p in packages] and [p.name for p, _ in broken] == ["bad"]
    assert resolve_package_for(["rec"], None).name in {p.name for p in packages}
    assert good.methods


def test_weights_changed_after_the_package_was_resolved_are_refused(tmp_path):
    pkg = make_tiny_package(tmp_path / "m")
    resolved = resolve_package(str(pkg.path))
    data = bytearray((pkg.path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (pkg.path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(PackageError, match="changed since"):
        resolved.load_model()


def test_a_package_shadowing_another_of_the_same_name_says_so(setup, monkeypatch, capsys):
    tmp, pkg = setup
    mine = make_tiny_package(tmp / "mine" / "tiny", calibration=CALIBRATION)
    monkeypatch.setenv("ANOMALY_LOCALIZER_MODELS", os.pathsep.join([str(mine.path.parent), str(pkg.path.parent)]))
    found = resolve_package("tiny")
    assert found.path == mine.path and found.shadows == [str(pkg.path)]
    assert main(["score", str(tmp / "scan.nii.gz"), "--out", str(tmp / "out"), "--model", "tiny", "-q",
                 "--method", "rec"]) == 0
    assert "shadows" in capsys.readouterr().err
    assert json.loads((tmp / "out" / "summary.json").read_text())["model"]["shadows"] == [str(pkg.path)]
    assert main(["models"]) == 0
    assert "shadows" in capsys.readouterr().out


def test_ctrl_c_while_the_command_starts_is_a_cancel_without_a_traceback(monkeypatch, capsys):
    import anomaly_localizer.cli as cli

    def interrupted():
        raise KeyboardInterrupt()  # as if Ctrl-C arrived while torch and the engine were imported
    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["models"]) == 3
    assert "cancelled" in capsys.readouterr().err


def test_a_whole_head_image_given_as_its_own_mask_is_refused(tmp_path):
    from anomaly_localizer.core.volume import brain_mask
    from anomaly_localizer.errors import InputError
    head = sitk.GetImageFromArray(np.ones((90, 120, 120), np.float32))
    head.SetSpacing((2.0, 2.0, 2.0))
    with pytest.raises(InputError, match="not a brain mask"):
        brain_mask(head, head)
    brain = np.zeros((90, 120, 120), np.uint8)
    brain[20:70, 20:100, 20:100] = 1  # 2560 mL: too large for a brain
    m = sitk.GetImageFromArray(brain)
    m.CopyInformation(head)
    with pytest.raises(InputError, match="2560 mL"):
        brain_mask(head, m)
    brain[:] = 0
    brain[30:70, 30:90, 30:90] = 1  # 1152 mL
    m = sitk.GetImageFromArray(brain)
    m.CopyInformation(head)
    assert brain_mask(head, m).sum() == brain.sum()


def test_an_empty_folder_is_refused_in_one_line_without_itks_warning(tmp_path, capfd):
    (tmp_path / "empty").mkdir()
    assert main(["score", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "-q"]) == 2
    err = capfd.readouterr().err
    assert "holds no DICOM series" in err and "WARNING" not in err and len(err.strip().splitlines()) == 1
