"""Self-supervised anomaly segmentation: its training tasks (never the evaluation's
generator), the held-out-task checkpoint choice, and the family scored through the engine."""

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from phantoms import TINY_SSL_ARCH, healthy_folder, image_from, make_tiny_ssl_package, phantom_array

from anomaly_localizer.cli import main
from anomaly_localizer.core.detectors import all_methods, detector_for
from anomaly_localizer.core.package import load_package
from anomaly_localizer.core.installed import resolve_package_for
from anomaly_localizer.core.pipeline import score_volume
from anomaly_localizer.errors import InputError
from anomaly_localizer.tooling.training import ssl_tasks
from anomaly_localizer.tooling.training.ssl_tasks import (ALL_TASKS, HELD_OUT_TASKS, TRAIN_TASKS, apply_task, make_batch,
                                                  poisson_blend, random_shape)
from anomaly_localizer.tooling.training.train_ssl import SSLTrainConfig, train_ssl


@pytest.fixture(scope="module")
def ssl(tmp_path_factory):
    return make_tiny_ssl_package(tmp_path_factory.mktemp("models") / "tiny-ssl")


def _stack(seed=0, size=48):
    """A (3,S,S) slice stack with a round brain of two tissues, background 0."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    rng = np.random.default_rng(seed)
    base = np.where(r < size * 0.4, 0.5 + 0.25 * (r < size * 0.2) + 0.02 * rng.normal(size=r.shape), 0.0)
    return torch.from_numpy(np.stack([base] * 3).astype(np.float32))


def test_the_registry_finds_the_family_and_the_held_out_tasks_are_not_trained_on(ssl):
    assert "ssl" in all_methods() and detector_for("unet-ssl").methods == ("ssl",)
    assert ssl.default_methods() == ["ssl"] and ssl.contract.context_slices == 3
    assert set(TRAIN_TASKS).isdisjoint(HELD_OUT_TASKS) and set(ALL_TASKS) == set(TRAIN_TASKS) | set(HELD_OUT_TASKS)
    cfg = SSLTrainConfig()
    assert cfg.tasks == list(TRAIN_TASKS) and cfg.held_out == list(HELD_OUT_TASKS)
    with pytest.raises(InputError, match="must not overlap"):
        SSLTrainConfig.from_json(None, tasks=["foreign", "sink"], held_out=["sink"])
    with pytest.raises(InputError, match="unknown tasks"):
        SSLTrainConfig.from_json(None, tasks=["balls"])


def test_the_training_generator_shares_no_code_with_the_evaluations():
    import ast

    from anomaly_localizer.tooling.evaluation import hard_cases
    from anomaly_localizer.tooling.training import train_ssl

    def imported(module) -> set[str]:
        tree = ast.parse(open(module.__file__).read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names |= {node.module or ""} | {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
        return {n.rsplit(".", 1)[-1] for n in names}

    evaluation = {"hard_cases", "synthetic", "evaluate"}
    assert not imported(ssl_tasks) & evaluation and not imported(train_ssl) & evaluation
    assert "ssl_tasks" not in imported(hard_cases)


def test_scores_a_probability_map_inside_the_brain_on_the_input_grid(ssl):
    image = image_from(phantom_array(lesion=True))
    res = score_volume(image, ssl, device="cpu")
    brain = sitk.GetArrayFromImage(image) != 0
    m = res.maps["ssl"]
    assert set(res.maps) == {"ssl"} and m.shape == brain.shape and (m[~brain] == 0).all()
    assert m.max() <= 1.0 + 1e-6 and m[brain].min() >= 0 and np.isfinite(res.volume_score)


def test_flip_averaging_makes_the_map_mirror_symmetric_in_the_network(ssl):
    from anomaly_localizer.core.detectors.ssl import predict
    net = ssl.load_model()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = predict(net, x, True), predict(net, x.flip(-1), True)
    assert torch.allclose(a, b.flip(-1), atol=1e-5)


def test_shapes_have_soft_edges_stay_in_the_brain_and_span_neighbouring_slices():
    x = _stack()
    brain = x != 0
    for seed in range(20):
        w = random_shape(brain, torch.Generator().manual_seed(seed))
        assert w is not None and float(w.max()) <= 1 and float(w.min()) >= 0
        assert (w[~brain] == 0).all() and w[1].max() > 0
    assert random_shape(torch.zeros_like(brain), torch.Generator()) is None


def test_shapes_are_varied_unions_some_only_a_slice_deep_with_edges_hard_and_soft():
    brain = torch.ones(5, 64, 64, dtype=torch.bool)
    shapes = [random_shape(brain, torch.Generator().manual_seed(seed)) for seed in range(60)]
    thin = [w for w in shapes if float(w[0].max()) == 0 and float(w[4].max()) == 0]
    deep = [w for w in shapes if float(w[0].max()) > 0]
    assert thin and deep  # some lie in the middle slices only, some span all five
    areas = sorted(float((w[2] > 0.5).sum()) for w in shapes)
    assert areas[0] < 30 and areas[-1] > 300  # from a few pixels (3 mm at 2 mm) to large
    soft = [float(((w[2] > 0.05) & (w[2] < 0.95)).sum()) / max(1.0, float((w[2] > 0.05).sum())) for w in shapes]
    assert min(soft) < 0.35 and max(soft) > 0.6  # edges range from nearly hard to wide fades


def test_the_tissue_task_changes_one_tissue_class_only():
    x = _stack()
    w = torch.zeros_like(x)
    w[:, 4:44, 4:44] = 1.0
    changed, strength = apply_task("tissue", x, w, x, torch.Generator().manual_seed(2))
    moved = (changed - x).abs()[1] > 1e-3
    bright = x[1] > 0.65  # the inner, brighter tissue of the phantom
    assert strength > 0 and moved.any()
    assert (moved & bright).sum() == 0 or (moved & ~bright & (x[1] > 0)).sum() == 0  # one side only


def test_foreign_patches_are_augmented_so_they_are_not_merely_another_subject():
    from anomaly_localizer.tooling.training.ssl_tasks import augment_donor
    donor = _stack(seed=4)
    outs = [augment_donor(donor, torch.Generator().manual_seed(s)) for s in range(8)]
    assert any(not torch.allclose(o, donor) for o in outs)
    assert all(int((o == 0).sum()) == int((donor == 0).sum()) for o in outs)  # background stays background
    assert len({round(float(o[o != 0].mean()), 4) for o in outs}) > 4  # intensities differ between draws


@pytest.mark.parametrize("task", ALL_TASKS)
def test_every_task_changes_the_image_only_where_it_labels_and_labels_are_soft(task):
    x = _stack()
    donors = [_stack(seed=5) * 1.3]
    gen = torch.Generator().manual_seed(3)
    sample = ssl_tasks.make_sample(x, donors, (task,), gen, 2)
    assert sample.x.shape == x.shape and sample.label.shape == (1, 48, 48)
    assert float(sample.label.min()) >= 0 and float(sample.label.max()) <= 1
    assert (sample.x[x == 0] == 0).all()  # never outside the brain
    changed = (sample.x[1] - x[1]).abs() > 1e-3
    assert sample.label[0][changed].min() >= 0 and (sample.label[0][~torch.from_numpy(
        _dilate(changed.numpy()))] == 0).all()
    assert sample.label.max() > 0 or not changed.any()


def _dilate(m, r=1):
    out = m.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(m, dy, 0), dx, 1)
    return out


def test_healthy_examples_are_unchanged_and_unlabelled():
    x = torch.stack([_stack(i) for i in range(4)])
    gen = torch.Generator().manual_seed(0)
    changed, label = make_batch(x, x.flip(0), TRAIN_TASKS, gen, healthy_share=1.0)
    assert torch.equal(changed, x) and float(label.abs().max()) == 0


def test_poisson_blending_keeps_the_patchs_structure_with_the_hosts_intensities():
    host = _stack()
    patch = host + 0.3  # the same structure, other intensities: the blend is the host again
    region = torch.zeros_like(host, dtype=torch.bool)
    region[:, 16:32, 16:32] = True
    blended = poisson_blend(host, patch, region, iterations=400)
    assert (blended - host).abs().max() < 1e-3
    w = torch.zeros_like(host)
    w[:, 16:32, 16:32] = 1.0
    moved, strength = apply_task("poisson", host, w, _stack(seed=9) * 0.5, torch.Generator().manual_seed(1))
    assert 0 < strength <= 1 and torch.equal(moved[:, :15], host[:, :15])  # outside the region: untouched


def _tiny_cfg(**kw):
    cfg = SSLTrainConfig.from_json(None, steps=4, batch_size=4, validate_every=2, spacing_mm=6.0, val_fraction=0.2,
                                   calibration_fraction=0.2, test_fraction=0.2, **kw)
    cfg.architecture = {k: v for k, v in TINY_SSL_ARCH.items() if k != "type"}
    return cfg


def test_training_chooses_the_checkpoint_on_held_out_tasks_and_resumes_exactly(tmp_path, monkeypatch):
    import anomaly_localizer.tooling.training.train_ssl as train_mod
    monkeypatch.setattr(train_mod, "VALIDATION_SLICES", 8)
    data = healthy_folder(tmp_path / "healthy")
    cfg = _tiny_cfg()
    full = load_package(train_ssl(data, tmp_path / "full", cfg))
    training = full.meta["training"]
    assert full.methods == ("ssl",) and "ssl" in full.calibration.pixel and "ssl" in full.calibration.slice
    assert training["steps_run"] == 4 and len(training["history"]) == 2
    figures = [h["val_figure"] for h in training["history"]]
    assert training["best_val_figure"] == max(figures) and "train_tasks_ap" in training["history"][0]
    assert "held-out tasks" in training["selection"] and training["config"]["held_out"] == list(HELD_OUT_TASKS)
    train_ssl(data, tmp_path / "resumed", cfg, calibrate=False, stop_after=2)
    assert not (tmp_path / "resumed" / "model.json").exists()
    resumed = load_package(train_ssl(data, tmp_path / "resumed", cfg, resume=True, calibrate=False))
    a, b = full.load_model().state_dict(), resumed.load_model().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(InputError, match="configuration differs"):
        train_ssl(data, tmp_path / "resumed", _tiny_cfg(healthy_share=0.5), resume=True)


def test_command_line_trains_and_scores_the_method_by_name(tmp_path, tiny_package, monkeypatch):
    data = healthy_folder(tmp_path / "healthy")
    config = tmp_path / "ssl.json"
    config.write_text(json.dumps({"architecture": {k: v for k, v in TINY_SSL_ARCH.items() if k != "type"},
                                  "spacing_mm": 6.0, "batch_size": 4, "validate_every": 2}))
    import anomaly_localizer.tooling.training.train_ssl as train_mod
    monkeypatch.setattr(train_mod, "VALIDATION_SLICES", 8)
    models = tmp_path / "models"
    assert main(["train-ssl", str(data), "--out", str(models / "my-ssl"), "--config", str(config), "--steps", "2",
                 "--held-out", "poisson,bend", "--tasks", "foreign,sink", "-q"]) == 0
    assert load_package(models / "my-ssl").meta["training"]["config"]["held_out"] == ["poisson", "bend"]
    monkeypatch.setenv("ANOMALY_LOCALIZER_MODELS", os.pathsep.join([str(models), str(tiny_package.path.parent)]))
    assert resolve_package_for(["ssl"]).name == "my-ssl"
    out = tmp_path / "out"
    assert main(["score", str(data / "t1" / "S00_T1.nii.gz"), "--method", "ssl", "--out", str(out), "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"] == ["ssl"] and summary["threshold"]["source"] == "calibrated"
    assert main(["train-ssl", str(data), "--out", str(tmp_path / "x"), "--held-out", "foreign", "-q"]) == 2
