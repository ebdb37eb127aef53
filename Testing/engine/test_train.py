"""Training end to end on tiny synthetic data: package, split, calibration, resume, seed, DDP."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from anomaly_localizer.cli import main
from anomaly_localizer.tooling.data import find_subjects, split_subjects
from anomaly_localizer.errors import InputError
from anomaly_localizer.core.package import load_package
from anomaly_localizer.tooling.training.train import TrainConfig, train

from phantoms import image_from, phantom_array

TINY = {"architecture": {"type": "vae", "slice_size": 32, "feature_maps": [4, 8], "latent_size": 8,
                         "likelihood_std": 0.2},
        "spacing_mm": 6.0, "batch_size": 16, "max_epochs": 2, "learning_rate": 1e-3,
        "val_fraction": 0.2, "calibration_fraction": 0.2, "test_fraction": 0.2}
ENGINE = str(Path(__file__).resolve().parents[2] / "AnomalyLocalizer")


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    """Ten healthy phantoms in the IXI layout (t1/ + brainmask/), varying in size and contrast."""
    root = tmp_path_factory.mktemp("healthy")
    (root / "t1").mkdir()
    (root / "brainmask").mkdir()
    for i in range(10):
        arr = phantom_array((24 + i % 3, 40, 34), seed=i) * (1 + 0.1 * i)
        img = image_from(arr, spacing=(4.0, 4.0, 4.0))
        sitk.WriteImage(img, str(root / "t1" / f"S{i:02d}_T1.nii.gz"))
        m = image_from((arr != 0).astype(np.uint8), spacing=(4.0, 4.0, 4.0))
        sitk.WriteImage(m, str(root / "brainmask" / f"S{i:02d}_brainmask.nii.gz"))
    return root


@pytest.fixture()
def config(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


def test_data_layouts_are_found(healthy, tmp_path):
    subjects = find_subjects(healthy)
    assert [s.id for s in subjects][:2] == ["S00", "S01"] and all(s.mask for s in subjects)
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(healthy / "t1" / "S00_T1.nii.gz", flat / "a.nii.gz")
    shutil.copy(healthy / "brainmask" / "S00_brainmask.nii.gz", flat / "a_brainmask.nii.gz")
    shutil.copy(healthy / "t1" / "S01_T1.nii.gz", flat / "b.nii.gz")
    found = find_subjects(flat)
    assert [(s.id, s.mask is not None) for s in found] == [("a", True), ("b", False)]


def test_split_is_by_subject_disjoint_and_seeded():
    ids = [f"s{i}" for i in range(148)]
    split = split_subjects(ids, 0, 0.1, 0.15, 0.15)
    sets = [set(v) for v in split.values()]
    assert sum(len(s) for s in sets) == 148 and len(set().union(*sets)) == 148
    assert len(split["test"]) == 22 and len(split["calibration"]) == 22 and len(split["val"]) == 15
    assert split == split_subjects(list(reversed(ids)), 0, 0.1, 0.15, 0.15)
    assert split != split_subjects(ids, 1, 0.1, 0.15, 0.15)


def test_train_writes_a_calibrated_package_that_scores(healthy, config, tmp_path):
    out = tmp_path / "model"
    assert main(["train", str(healthy), "--out", str(out), "--config", str(config), "-q"]) == 0
    pkg = load_package(out)
    subjects = pkg.meta["provenance"]["subjects"]
    assert len(subjects["train"]) == 4 and not set(subjects["train"]) & set(subjects["test"])
    assert pkg.meta["training"]["epochs_run"] == 2 and len(pkg.meta["training"]["history"]) == 2
    calib = pkg.calibration
    assert calib["default_fpr"] == 0.001 and set(calib["subjects"]) == set(subjects["calibration"])
    for m, entry in calib["pixel"].items():
        values = [t["value"] for t in entry["thresholds"]]
        assert values == sorted(values) and values[0] > 0  # rarer flags need higher thresholds
    assert len(calib["slice"]["elbo"]["values"]) == 201
    from anomaly_localizer.core.levels import healthy_fpr
    t01 = calib["pixel"]["combi"]["thresholds"][0]["value"]
    assert healthy_fpr(calib, "combi", t01) == pytest.approx(0.01, rel=0.3)
    assert healthy_fpr(calib, "combi", 0.5 * t01) > healthy_fpr(calib, "combi", 2 * t01)
    # the default threshold is used by `score`, and summary.json says what it means
    scan = healthy / "t1" / f"{subjects['test'][0]}_T1.nii.gz"
    assert main(["score", str(scan), "--out", str(tmp_path / "o"), "--model", str(out), "-q"]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["threshold"]["source"] == "calibrated"
    assert summary["threshold"]["value"] == calib["pixel"]["rec"]["thresholds"][1]["value"]
    # calibration checked on the held-back test subjects
    assert main(["fpr", str(out), str(healthy), "--json", str(tmp_path / "fpr.json"), "-q"]) == 0
    fpr = json.loads((tmp_path / "fpr.json").read_text())
    assert set(fpr["subjects"]) == set(subjects["test"])
    assert all(0 <= v <= 1 for row in fpr["flagged_fraction"].values() for v in row.values())


def test_fixed_seed_reproduces_a_run_and_resume_continues_it_exactly(healthy, tmp_path):
    cfg = TrainConfig.from_json(None, **{k: v for k, v in TINY.items() if k != "architecture"})
    cfg.architecture.update(TINY["architecture"])
    cfg.max_epochs = 2
    a = train(healthy, tmp_path / "a", cfg, progress=False, calibrate=False, cache_dir=tmp_path / "cache")
    b_cfg = TrainConfig.from_json(None, **{k: v for k, v in TINY.items() if k != "architecture"})
    b_cfg.architecture.update(TINY["architecture"])
    b_cfg.max_epochs = 1
    train(healthy, tmp_path / "b", b_cfg, progress=False, calibrate=False, cache_dir=tmp_path / "cache")
    # an interrupted run (1 epoch) resumed to 2 epochs equals the uninterrupted run
    other = TrainConfig.from_json(None, **{k: v for k, v in TINY.items() if k != "architecture"})
    other.architecture.update(TINY["architecture"], likelihood_std=0.3)
    with pytest.raises(InputError, match="configuration differs"):
        train(healthy, tmp_path / "b", other, resume=True, progress=False, calibrate=False,
              cache_dir=tmp_path / "cache")
    train(healthy, tmp_path / "b", cfg, resume=True, progress=False, calibrate=False, cache_dir=tmp_path / "cache")
    c = train(healthy, tmp_path / "c", cfg, progress=False, calibrate=False, cache_dir=tmp_path / "cache")
    wa = (a / "model.safetensors").read_bytes()
    assert wa == (c / "model.safetensors").read_bytes()  # same seed, same weights
    assert wa == (tmp_path / "b" / "model.safetensors").read_bytes()  # resume is exact


def test_a_package_records_the_config_that_retrains_it(healthy, config, tmp_path):
    out = tmp_path / "m"
    assert main(["train", str(healthy), "--out", str(out), "--config", str(config), "--no-calibration", "-q"]) == 0
    again = tmp_path / "again"
    assert main(["train", str(healthy), "--out", str(again), "--config", str(out / "model.json"),
                 "--no-calibration", "-q"]) == 0
    assert (out / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()


def test_existing_output_needs_resume_or_force(healthy, config, tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "x").write_text("keep")
    assert main(["train", str(healthy), "--out", str(out), "--config", str(config), "-q"]) == 2
    assert "--resume" in capsys.readouterr().err and (out / "x").read_text() == "keep"


def test_cevae_trains_from_the_same_command(healthy, config, tmp_path):
    out = tmp_path / "ce"
    assert main(["train", str(healthy), "--out", str(out), "--config", str(config), "--type", "cevae",
                 "--epochs", "1", "--no-calibration", "-q"]) == 0
    assert load_package(out).architecture["type"] == "cevae"


def test_two_gloo_processes_train_the_same_weights(healthy, config, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": ENGINE, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "anomaly_localizer.cli", "train", str(healthy), "--out", str(out), "--config", str(config),
                        "--no-calibration", "-q"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, "\n".join(line for line in r.stderr.splitlines() if "Error" in line or "error:" in line)[-3000:]
    h0 = (out / "checkpoint" / "weights-rank0.sha256").read_text()
    h1 = (out / "checkpoint" / "weights-rank1.sha256").read_text()
    assert h0 == h1
    assert load_package(out).meta["training"]["processes"] == 2
