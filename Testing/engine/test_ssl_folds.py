"""Leave-tasks-out folds joined into one self-supervised detector: each fold runs once,
every other fold on the mirrored slice, and the ensemble scores through the engine."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from phantoms import TINY_SSL_ARCH, image_from, make_tiny_ssl_package, phantom_array

from anomaly_localizer.cli import main
from anomaly_localizer.core.detectors.ssl import predict
from anomaly_localizer.core.package import load_package, update_meta
from anomaly_localizer.core.pipeline import score_volume
from anomaly_localizer.errors import InputError
from anomaly_localizer.tooling.release.folds import join_folds


def _fold(tmp_path, name, seed, tasks, held_out):
    package = make_tiny_ssl_package(tmp_path / name, seed=seed)
    meta = dict(package.meta, training={"config": {"tasks": tasks, "held_out": held_out, "seed": seed},
                                        "best_step": 10 * (seed + 1), "best_val_figure": 0.1 * (seed + 1),
                                        "steps_run": 20})
    update_meta(package.path, meta)
    return load_package(package.path)


@pytest.fixture()
def folds(tmp_path):
    return [_fold(tmp_path, "fold-a", 0, ["foreign", "blur"], ["poisson", "sink"]),
            _fold(tmp_path, "fold-b", 1, ["poisson", "sink"], ["foreign", "sink"])]


def test_joined_folds_average_each_fold_once_every_other_one_mirrored(tmp_path, folds):
    joined = join_folds([str(f.path) for f in folds], tmp_path / "joined")
    assert joined.architecture["folds"] == 2 and joined.calibration.pixel == {}
    net, a, b = joined.load_model(), folds[0].load_model(), folds[1].load_model()
    x = torch.rand(3, TINY_SSL_ARCH["in_channels"], 32, 32)
    with torch.no_grad():
        expected = 0.5 * (torch.sigmoid(a(x)) + torch.sigmoid(b(x.flip(-1))).flip(-1))
        np.testing.assert_allclose(predict(net, x, True), expected, atol=1e-6)
        np.testing.assert_allclose(predict(net, x, False), 0.5 * (torch.sigmoid(a(x)) + torch.sigmoid(b(x))),
                                   atol=1e-6)
    training = joined.meta["training"]
    assert [f["source"] for f in training["folds"]] == ["fold-a", "fold-b"]
    # a family some fold trained on counts as trained; only what every fold held out stays held out
    assert training["config"]["held_out"] == ["sink"]
    assert set(training["config"]["tasks"]) == {"foreign", "blur", "poisson", "sink"}
    card = "\n".join(joined.detector.describe(joined.meta))
    assert "Fold 1:" in card and "Fold 2:" in card and "2 such networks" in card


def test_two_identical_folds_cost_and_score_what_one_fold_with_flip_does(tmp_path, folds):
    joined = join_folds([str(folds[0].path), str(folds[0].path)], tmp_path / "twins")
    image = image_from(phantom_array(lesion=True))
    one = score_volume(image, folds[0], device="cpu").maps["ssl"]
    two = score_volume(image, joined, device="cpu").maps["ssl"]
    np.testing.assert_allclose(two, one, atol=1e-5)


def test_join_refuses_what_is_not_a_fold_and_never_overwrites(tmp_path, folds):
    with pytest.raises(InputError, match="at least two"):
        join_folds([str(folds[0].path)], tmp_path / "x")
    other = make_tiny_ssl_package(tmp_path / "other")
    meta = dict(other.meta, ssl={"flip": False, "slice_top_k": 5})
    update_meta(other.path, meta)
    with pytest.raises(InputError, match="another ssl"):
        join_folds([str(folds[0].path), str(other.path)], tmp_path / "x")
    joined = join_folds([str(f.path) for f in folds], tmp_path / "joined")
    with pytest.raises(InputError, match="not a single self-supervised detector"):
        join_folds([str(joined.path), str(folds[0].path)], tmp_path / "y")
    with pytest.raises(InputError, match="already exists"):
        join_folds([str(f.path) for f in folds], tmp_path / "joined")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_command_line_joins_folds(tmp_path, folds, capsys):
    assert main(["join-folds", str(folds[0].path), str(folds[1].path), "--out", str(tmp_path / "cli")]) == 0
    assert "2 folds" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "model.json").read_text())["architecture"]["folds"] == 2


def test_a_training_configuration_has_no_folds_so_older_runs_still_resume():
    from anomaly_localizer.tooling.training.train_ssl import SSLTrainConfig
    cfg = SSLTrainConfig.from_json(None, steps=10)
    assert "folds" not in cfg.architecture  # a checkpoint's stored config never had it
