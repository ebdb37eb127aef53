"""Issue 25: what hostile probes broke, each now refused with one line before any work, or
told plainly. Every test here failed on the main branch the probes were run against."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from anomaly_localizer.cli import main
from anomaly_localizer.core.imageio import read_image
from anomaly_localizer.errors import InputError

from phantoms import image_from, make_tiny_package, phantom_array, write_dicom_series
from test_reliability import CALIBRATION, ENGINE


@pytest.fixture()
def setup(tmp_path):
    pkg = make_tiny_package(tmp_path / "models" / "tiny", calibration=CALIBRATION)
    sitk.WriteImage(image_from(phantom_array()), str(tmp_path / "scan.nii.gz"))
    return tmp_path, pkg


def score(tmp, pkg, scan, out, *extra):
    return main(["score", str(scan), "--out", str(out), "--model", str(pkg.path), "-q", "--method", "rec",
                 *map(str, extra)])


# ------------------------------------------------------------------ 1, 2, 14: geometry

@pytest.mark.parametrize("ext", [".mha", ".nrrd"])
def test_a_direction_matrix_that_is_not_orthonormal_is_refused(setup, capsys, ext):
    tmp, pkg = setup
    img = image_from(phantom_array())
    img.SetDirection((1, .5, 0, 0, 1, 0, 0, 0, 1))
    sitk.WriteImage(img, str(tmp / f"sheared{ext}"))
    assert score(tmp, pkg, tmp / f"sheared{ext}", tmp / "out") == 2
    err = capsys.readouterr().err
    assert "not orthonormal" in err and len(err.strip().splitlines()) == 1 and not (tmp / "out").exists()


def test_a_nifti_whose_qform_disagrees_with_its_sform_is_refused_not_mirrored(setup, capsys):
    tmp, pkg = setup
    path = tmp / "negative-pixdim.nii"
    sitk.WriteImage(image_from(phantom_array()), str(path))
    raw = bytearray(path.read_bytes())
    pixdim1 = float(np.frombuffer(bytes(raw[80:84]), "<f4")[0])
    raw[80:84] = np.array([-pixdim1], "<f4").tobytes()  # ITK then trusts the qform: mirrored
    path.write_bytes(bytes(raw))
    assert score(tmp, pkg, path, tmp / "out") == 2
    err = capsys.readouterr().err
    assert "sform" in err and "ITK" not in err and "WARNING" not in err and not (tmp / "out").exists()


def test_a_dicom_series_with_a_missing_slice_is_refused(tmp_path, capfd):
    folder = write_dicom_series(phantom_array().astype(np.int16), tmp_path / "dicom")
    (folder / "012.dcm").unlink()
    with pytest.raises(InputError, match="unevenly spaced"):
        read_image(folder)
    assert "WARNING" not in capfd.readouterr().err  # ITK's own multi-line warning is not shown


# ------------------------------------------------------------------ 6, 8, 9, 10: score

@pytest.mark.parametrize("level", ["1e308", "0", "-1", "1e-320", "nan", "inf"])
def test_threshold_levels_that_are_not_positive_finite_levels_are_refused_before_any_work(setup, capsys, level,
                                                                                         monkeypatch):
    tmp, pkg = setup
    import anomaly_localizer.core.pipeline as pipeline
    monkeypatch.setattr(pipeline, "score_volume", lambda *a, **k: pytest.fail("scored before the check"))
    assert score(tmp, pkg, tmp / "scan.nii.gz", tmp / "out", "--threshold-level", level) == 2
    err = capsys.readouterr().err
    assert "--threshold-level" in err and "Traceback" not in err and not (tmp / "out").exists()


def test_the_healthy_rate_below_the_calibrated_range_is_not_invented():
    from anomaly_localizer.core.levels import healthy_fpr
    calib = {"default_fpr": 0.001, "pixel": {"rec": {"n_subjects": 3, "thresholds": [
        {"fpr": 0.01, "value": 0.01}, {"fpr": 0.001, "value": 0.02}, {"fpr": 0.0001, "value": 0.05}],
        "curve": {"fpr": [0.5, 0.01, 0.0001], "values": [0.001, 0.01, 0.05]}}}}
    assert healthy_fpr(calib, "rec", 0.0) is None and healthy_fpr(calib, "rec", -1.0) is None
    assert healthy_fpr(calib, "rec", 0.01) == pytest.approx(0.01)


def test_an_output_folder_whose_parent_refuses_folders_is_refused_before_scoring(setup, capsys, monkeypatch):
    tmp, pkg = setup
    import tempfile
    real = tempfile.mkdtemp

    def refuse(*a, dir=None, **k):
        if str(dir) == str(tmp / "ro"):
            raise OSError(30, "Read-only file system")
        return real(*a, dir=dir, **k)
    (tmp / "ro").mkdir()
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    import anomaly_localizer.core.pipeline as pipeline
    monkeypatch.setattr(pipeline, "score_volume", lambda *a, **k: pytest.fail("scored before the check"))
    assert score(tmp, pkg, tmp / "scan.nii.gz", tmp / "ro" / "out") == 2
    err = capsys.readouterr().err
    assert "Read-only file system" in err and "Traceback" not in err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_out_under_proc_is_refused_up_front(setup, capsys):
    tmp, pkg = setup
    assert score(tmp, pkg, tmp / "scan.nii.gz", "/proc/anomaly-localizer-probe") == 2
    assert "cannot" in capsys.readouterr().err


def test_slicer_and_engine_share_the_level_check():
    from anomaly_localizer.core.levels import check_level
    for bad in (0, -1, float("nan"), 1e-320, 1e308, "x"):
        with pytest.raises(InputError):
            check_level(bad)
    assert check_level(1) == 1.0


# ------------------------------------------------------------------ 3, 4, 5, 7, 16: screening

@pytest.fixture()
def scans(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(3):
        sitk.WriteImage(image_from(phantom_array((24, 40, 34), seed=20 + i)), str(folder / f"s{i}.nii.gz"))
    return folder


def screen(model, *args):
    return main(["screen", *map(str, args), "--model", str(model.path), "-q", "--workers", "1"])


def test_a_csv_row_with_more_fields_than_its_header_is_one_line(setup, scans, tmp_path, capsys):
    _, pkg = setup
    (tmp_path / "list.csv").write_text("path,mask\ns0.nii.gz,,extra\n".replace("s0", str(scans / "s0")))
    assert screen(pkg, tmp_path / "list.csv", "--out", tmp_path / "w") == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "3 fields" in err and "Traceback" not in err and not (tmp_path / "w").exists()


def test_a_csv_that_lists_a_scan_twice_with_another_mask_is_refused(setup, scans, tmp_path, capsys):
    _, pkg = setup
    (tmp_path / "list.csv").write_text(f"path,mask\n{scans / 's0.nii.gz'},\n{scans / 's0.nii.gz'},"
                                       f"{scans / 's1.nii.gz'}\n")
    assert screen(pkg, tmp_path / "list.csv", "--out", tmp_path / "w") == 2
    assert "line 3: the scan of line 2 again, with another mask" in capsys.readouterr().err


@pytest.mark.parametrize("address", ["not a url", "tcp://127.0.0.1:9"])
def test_a_bad_or_silent_cluster_address_is_refused_before_the_folder_is_made(setup, scans, tmp_path, capsys,
                                                                            address, monkeypatch):
    pytest.importorskip("distributed")
    _, pkg = setup
    import anomaly_localizer.tooling.screening.screen_cluster as sc
    real = sc._client
    monkeypatch.setattr(sc, "_client", lambda w, a: real(w, a) if a == "not a url" else
                        (_ for _ in ()).throw(InputError(f"cannot reach the Dask scheduler at {a} (refused)")))
    assert main(["screen", str(scans), "--out", str(tmp_path / "w"), "--model", str(pkg.path), "-q",
                 "--cluster", address]) == 2
    err = capsys.readouterr().err
    assert "Dask scheduler" in err and "Traceback" not in err and not (tmp_path / "w").exists()


def _done_worklist(pkg, scans, out):
    assert screen(pkg, scans, "--out", out) == 0
    return json.loads((out / "worklist.json").read_text())


def test_compare_worklists_refuses_a_damaged_file_and_disjoint_worklists(setup, scans, tmp_path, capsys):
    _, pkg = setup
    record = _done_worklist(pkg, scans, tmp_path / "a")
    record["rows"][0]["volume_score"] = "high"
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "worklist.json").write_text(json.dumps(record))
    assert main(["compare-worklists", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "volume_score is 'high', not a number" in err and "Traceback" not in err
    for r in record["rows"]:
        r["volume_score"], r["id"] = 1.0, r["id"] + "-other"
    (tmp_path / "b" / "worklist.json").write_text(json.dumps(record))
    assert main(["compare-worklists", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "share no scans" in capsys.readouterr().err


def test_a_second_screening_into_a_held_folder_is_refused_and_changes_nothing(setup, scans, tmp_path, capsys):
    _, pkg = setup
    from anomaly_localizer.tooling.screening.screen import worklist_lock
    out = tmp_path / "w"
    out.mkdir()
    with worklist_lock(out):
        assert screen(pkg, scans, "--out", out) == 2
        assert "another screening run is writing" in capsys.readouterr().err
        assert not (out / "worklist.json").exists()
    assert screen(pkg, scans, "--out", out) == 0  # released: the next run proceeds


def test_two_screening_processes_into_one_new_folder_one_refused(setup, scans, tmp_path):
    _, pkg = setup
    out = tmp_path / "w"
    env = {**os.environ, "PYTHONPATH": str(ENGINE)}
    cmd = [sys.executable, "-m", "anomaly_localizer.cli", "screen", str(scans), "--out", str(out), "--model",
           str(pkg.path), "-q", "--workers", "1"]
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
             for _ in range(2)]
    codes = [(p.wait(180), p.stderr.read()) for p in procs]
    assert sorted(c for c, _ in codes) == [0, 2], codes
    assert "another screening run" in [e for c, e in codes if c == 2][0]
    rows = json.loads((out / "worklist.json").read_text())["rows"]
    assert {r["status"] for r in rows} == {"done"}


def test_ids_stay_the_same_when_inputs_are_removed(setup, tmp_path):
    _, pkg = setup
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        sitk.WriteImage(image_from(phantom_array((24, 40, 34), seed=ord(name))), str(tmp_path / name / "t1.nii.gz"))
    out = tmp_path / "w"
    assert screen(pkg, tmp_path / "a", tmp_path / "b", "--out", out) == 0
    first = {r["input"]: r["id"] for r in json.loads((out / "worklist.json").read_text())["rows"]}
    assert len(set(first.values())) == 2
    assert screen(pkg, tmp_path / "b", "--out", out) == 0
    second = {r["input"]: r["id"] for r in json.loads((out / "worklist.json").read_text())["rows"]}
    only = str((tmp_path / "b" / "t1.nii.gz").resolve())
    assert second == {only: first[only]}


def test_a_scan_written_just_before_an_interruption_is_recorded_done(setup, scans, tmp_path, monkeypatch):
    _, pkg = setup
    import anomaly_localizer.tooling.screening.screen as screen_mod
    real = screen_mod.screen_one
    calls = []

    def then_interrupt(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            real(*a, **k)  # written, then stopped before its row is recorded
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(screen_mod, "screen_one", then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        screen_mod.run_screening([str(scans)], tmp_path / "w", screen_mod.ScreenOptions(
            str(pkg.path), pkg.name, pkg.manifest_sha256, ("rec",)), workers=1)
    statuses = [r["status"] for r in json.loads((tmp_path / "w" / "worklist.json").read_text())["rows"]]
    assert statuses.count("done") == 2 and statuses.count("pending") == 1


# ------------------------------------------------------------------ 11, 12, 13: model packages

def test_a_broken_package_that_shadows_a_good_one_says_it_blocks_it(setup, monkeypatch, capsys):
    tmp, pkg = setup
    broken = make_tiny_package(tmp / "mine" / "tiny", calibration=CALIBRATION)
    (broken.path / "model.json").write_text("{not json")
    monkeypatch.setenv("ANOMALY_LOCALIZER_MODELS", os.pathsep.join([str(broken.path.parent), str(pkg.path.parent)]))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "It hides the model of the same name in" in out and str(pkg.path) in out
    assert main(["score", str(tmp / "scan.nii.gz"), "--out", str(tmp / "out"), "--model", "tiny", "-q"]) == 2
    assert "hides the model of the same name" in capsys.readouterr().err
    import anomaly_localizer.core.installed as installed
    monkeypatch.setattr(installed, "default_model_name", lambda: "tiny")
    monkeypatch.setattr(installed, "list_packages", lambda: [broken.path])  # no shipped model offers it either
    assert main(["score", str(tmp / "scan.nii.gz"), "--out", str(tmp / "out"), "--method", "rec", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.index("hides the model") < err.index("No other installed model")  # the cause comes first


def _world_with_fused(tmp_path, monkeypatch):
    from phantoms import healthy_folder, make_tiny_dae_package
    from anomaly_localizer.core.package import load_package, update_meta
    from anomaly_localizer.tooling.release.calibrate import calibrate_package
    from anomaly_localizer.tooling.data import find_subjects
    from anomaly_localizer.tooling.release.fusion import make_fused
    subjects = find_subjects(healthy_folder(tmp_path / "healthy", n=2))
    monkeypatch.setenv("ANOMALY_LOCALIZER_MODELS", str(tmp_path / "models"))
    dae = make_tiny_dae_package(tmp_path / "models" / "tiny-dae")
    meta = dict(dae.meta, provenance={"subjects": {"train": [], "val": [], "calibration": [], "test": []}})
    update_meta(dae.path, meta)
    calibrate_package(load_package(dae.path), subjects)
    return make_fused(["tiny-dae:dae"], tmp_path / "models" / "tiny-fused", None, rule="mean")


def test_models_and_score_check_a_fused_models_components_before_any_work(tmp_path, monkeypatch, capsys):
    fused = _world_with_fused(tmp_path, monkeypatch)
    from anomaly_localizer.core.package import load_package, update_meta
    dae = load_package(tmp_path / "models" / "tiny-dae")
    meta = json.loads((dae.path / "model.json").read_text())
    meta["calibration"]["default_fpr"] = 0.01  # recalibrated after the fused model was made
    update_meta(dae.path, meta)
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert not rows["tiny-fused"]["ok"] and "another version of tiny-dae" in rows["tiny-fused"]["error"]
    sitk.WriteImage(image_from(np.pad(phantom_array(), 8)), str(tmp_path / "head.nii.gz"))  # would need extraction
    import anomaly_localizer.core.pipeline as pipeline
    monkeypatch.setattr(pipeline, "find_brain", lambda *a, **k: pytest.fail("work began before the check"))
    assert main(["score", str(tmp_path / "head.nii.gz"), "--out", str(tmp_path / "o"), "--model", str(fused.path),
                 "-q"]) == 2
    assert "another version of tiny-dae" in capsys.readouterr().err


def test_a_huge_architecture_is_refused_before_it_is_built(setup, monkeypatch):
    from anomaly_localizer.core.package import load_package, update_meta
    from anomaly_localizer.errors import PackageError
    _, pkg = setup
    meta = json.loads((pkg.path / "model.json").read_text())
    meta["architecture"]["feature_maps"] = [4096] * len(meta["architecture"]["feature_maps"])  # GBs if built
    update_meta(pkg.path, meta)
    import anomaly_localizer.core.package as package_mod
    real = package_mod.build_network
    built = []

    def watch(arch):
        import torch
        built.append(torch.empty(0).device.type)
        return real(arch)
    monkeypatch.setattr(package_mod, "build_network", watch)
    with pytest.raises(PackageError, match="do not match the architecture"):
        load_package(pkg.path).load_model()
    assert built == ["meta"]  # only the shapes were built, on the meta device


# ------------------------------------------------------------------ 15: messages

def test_messages_name_what_was_really_wrong(setup, tmp_path, capsys):
    tmp, pkg = setup
    assert score(tmp, pkg, tmp / "scan.nii.gz", tmp / "o1") == 0
    assert main(["score", str(tmp / "scan.nii.gz"), "--out", str(tmp / "o2"), "--model", "/etc/hostname", "-q"]) == 2
    assert "is a file, not a model folder" in capsys.readouterr().err
    img = image_from(phantom_array())
    img.SetSpacing((100.0, 100.0, 100.0))
    sitk.WriteImage(img, str(tmp / "metres.nii.gz"))
    assert score(tmp, pkg, tmp / "metres.nii.gz", tmp / "o3") == 2
    err = capsys.readouterr().err
    assert "spacing is wrong" in err and "--mask" not in err
    from anomaly_localizer.core.pipeline import no_brain_slices_message
    mask = np.zeros(phantom_array().shape, bool)
    mask[14, 22:24, 18:20] = True  # 4 voxels of 1 mm: no model slice holds enough of it
    said = no_brain_slices_message(image_from(phantom_array(), spacing=(1.0, 1.0, 1.0)), mask, "given")
    assert "the brain mask given covers only 4 voxels" in said and "whole brain" in said


def test_out_and_in_place_together_are_refused(setup, capsys):
    tmp, pkg = setup
    for command in ("standardise", "scan-relative"):
        extra = ["--method", "rec"] if command == "scan-relative" else []
        assert main([command, str(pkg.path), str(tmp), "--out", str(tmp / "copy"), "--in-place", *extra]) == 2
        assert "not both" in capsys.readouterr().err and not (tmp / "copy").exists()


def test_fuse_says_a_fused_model_is_not_a_component_and_a_bad_meta_file_is_the_users(tmp_path, monkeypatch):
    fused = _world_with_fused(tmp_path, monkeypatch)
    from anomaly_localizer.core.package import read_json
    from anomaly_localizer.errors import PackageError
    from anomaly_localizer.tooling.release.fusion import make_fused
    with pytest.raises(InputError, match="itself a fused map.*tiny-dae:dae"):
        make_fused([f"{fused.path}:fused"], tmp_path / "x", None)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(PackageError, match="fix the file given with --meta"):
        make_fused(["tiny-dae:dae"], tmp_path / "y", None, meta_file=str(tmp_path / "bad.json"))
    with pytest.raises(PackageError, match="reinstall the model"):
        read_json(tmp_path / "bad.json", "model description")


def test_subjects_advice_only_where_the_option_exists(setup, tmp_path):
    from anomaly_localizer.tooling.release.edit import subjects_of
    from phantoms import healthy_folder
    _, pkg = setup
    data = healthy_folder(tmp_path / "h", n=1)
    with pytest.raises(InputError, match="--subjects all"):
        subjects_of(pkg, str(data), "val")
    with pytest.raises(InputError) as err:
        subjects_of(pkg, str(data), "val", choosable=False)
    assert "--subjects" not in str(err.value)


def test_standardise_refuses_a_fused_model_naming_the_users_model_before_any_copy(tmp_path, monkeypatch, capsys):
    fused = _world_with_fused(tmp_path, monkeypatch)
    assert main(["standardise", str(fused.path), str(tmp_path / "healthy"), "--out", str(tmp_path / "copy")]) == 2
    err = capsys.readouterr().err
    assert f"model {fused.name} has no input of its own" in err and not (tmp_path / "copy").exists()
