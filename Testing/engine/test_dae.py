"""The coarse-noise denoising autoencoder: a detector family added as one module (plus its
network), scored, trained and chosen through the same engine as every other family."""

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from phantoms import (TINY_DAE_ARCH, image_from, make_tiny_dae_package, make_tiny_package, phantom_array)

from anomaly_localizer.cli import main
from anomaly_localizer.core.detectors import all_methods, detector_for
from anomaly_localizer.core.detectors.dae import erode, median_filter, residual_map, ssim_terms, top_k_mean
from anomaly_localizer.core.package import load_package
from anomaly_localizer.core.installed import resolve_package_for
from anomaly_localizer.core.pipeline import score_volume
from anomaly_localizer.tooling.training.train_dae import DAETrainConfig, coarse_noise, train_dae


@pytest.fixture(scope="module")
def dae(tmp_path_factory):
    return make_tiny_dae_package(tmp_path_factory.mktemp("models") / "tiny-dae")


def test_the_registry_finds_the_family_without_edits_elsewhere(dae):
    assert "dae" in all_methods() and detector_for("unet-dae").methods == ("dae",)
    assert dae.methods == ("dae",) and dae.default_methods() == ["dae"] and dae.primary_slice_score == "dae"
    assert dae.contract.context_slices == 3


def test_scores_a_volume_on_the_input_grid_with_its_neighbouring_slices(dae):
    image = image_from(phantom_array(lesion=True))
    res = score_volume(image, dae, device="cpu")
    brain = sitk.GetArrayFromImage(image) != 0
    assert set(res.maps) == {"dae"} and res.maps["dae"].shape == brain.shape
    assert (res.maps["dae"][~brain] == 0).all() and (res.maps["dae"] >= 0).all() and res.maps["dae"].max() > 0
    assert set(res.slice_scores) == {"dae"} and np.isfinite(res.volume_score)


def test_residual_is_zero_where_the_restoration_is_exact_and_stays_off_the_brains_edge():
    x = torch.zeros(1, 1, 16, 16)
    mask = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    mask[:, :, 2:14, 2:14] = True
    x[mask] = 1.0
    assert residual_map(x, x.clone(), mask, 1, 3).abs().max() == 0
    x_hat = x.clone()
    x_hat[:, :, 2, 2:14] = 0.0  # error on the brain's outermost row only
    assert residual_map(x, x_hat, mask, 1, 1).abs().max() == 0  # eroded away
    inner = erode(mask, 2)[0, 0]
    assert inner.sum() == 8 * 8 and inner[4:12, 4:12].all()
    spike = torch.zeros(1, 9, 9)
    spike[0, 4, 4] = 5.0
    assert median_filter(spike, 3).abs().max() == 0  # an isolated pixel is not an anomaly
    assert torch.allclose(top_k_mean(torch.arange(10.0).view(1, 1, 10), 3), torch.tensor([8.0]))


def test_ssim_residuals_see_lost_texture_and_ignore_a_faithful_restoration():
    gen = torch.Generator().manual_seed(0)
    x = 0.5 + 0.02 * torch.randn(1, 1, 32, 32, generator=gen)
    mask = torch.ones(1, 1, 32, 32, dtype=torch.bool)
    c, s = ssim_terms(x, x.clone())
    assert torch.allclose(c, torch.ones_like(c), atol=1e-5) and torch.allclose(s, torch.ones_like(s), atol=1e-4)
    for kind in ("contrast", "structure_contrast"):
        assert residual_map(x, x.clone(), mask, 0, 1, kind).abs().max() < 1e-4
    textured = x.clone()
    textured[:, :, 10:20, 10:20] += 0.3 * (torch.arange(10)[:, None] + torch.arange(10)[None]) % 2
    for kind in ("contrast", "structure_contrast"):
        resid = residual_map(textured, x, mask, 0, 3, kind)[0]
        assert resid[12:18, 12:18].min() > 0.5 and resid[:5, :5].max() < 0.05, kind
    # a uniform shift keeps texture: the contrast term does not see it, |x - x_hat| does
    assert residual_map(x + 0.2, x, mask, 0, 1, "contrast").max() < 1e-4
    assert residual_map(x + 0.2, x, mask, 0, 1, "abs").min() > 0.19


def test_a_dae_package_scores_with_the_residual_its_model_json_names(tmp_path):
    from anomaly_localizer.core.package import update_meta
    pkg = make_tiny_dae_package(tmp_path / "dae")
    image = image_from(phantom_array(lesion=True))
    absolute = score_volume(image, pkg, ["dae"]).maps["dae"]
    update_meta(pkg.path, {**pkg.meta, "dae": {"residual": "contrast"}})
    contrast = score_volume(image, load_package(pkg.path), ["dae"]).maps["dae"]
    assert contrast.shape == absolute.shape and not np.allclose(contrast, absolute)
    assert "contrast term" in "\n".join(detector_for("unet-dae").describe(load_package(pkg.path).meta))


def test_a_training_started_before_the_residual_option_still_resumes():
    """A run's checkpoint records its configuration, scoring defaults included, and resuming
    refuses a different one: the defaults keep the keys they had (absent residual = abs)."""
    from dataclasses import asdict
    assert asdict(DAETrainConfig.from_json(None))["scoring"] == {"erode_px": 2, "median_px": 5, "slice_top_k": 20}


def test_coarse_noise_is_smooth_and_has_the_asked_scale():
    gen = torch.Generator().manual_seed(0)
    noise = coarse_noise(64, 32, 4, 0.1, gen)
    assert noise.shape == (64, 1, 32, 32)
    assert 0.05 < float(noise.std()) < 0.12
    neighbour = torch.corrcoef(torch.stack([noise[..., :-1].flatten(), noise[..., 1:].flatten()]))[0, 1]
    assert neighbour > 0.9  # coarse: neighbouring pixels move together


def _healthy_folder(root, n=8):
    (root / "t1").mkdir(parents=True)
    (root / "brainmask").mkdir()
    for i in range(n):
        arr = phantom_array((24, 40, 34), seed=i) * (1 + 0.1 * i)
        sitk.WriteImage(image_from(arr), str(root / "t1" / f"S{i:02d}_T1.nii.gz"))
        sitk.WriteImage(image_from((arr != 0).astype(np.uint8)), str(root / "brainmask" / f"S{i:02d}_brainmask.nii.gz"))
    return root


def test_training_writes_a_calibrated_package_and_resumes_exactly(tmp_path):
    data = _healthy_folder(tmp_path / "healthy")
    arch = {k: v for k, v in TINY_DAE_ARCH.items() if k != "type"}
    cfg = DAETrainConfig.from_json(None, steps=6, batch_size=4, validate_every=3, spacing_mm=6.0, noise_res=4,
                                   val_fraction=0.2, calibration_fraction=0.2, test_fraction=0.2)
    cfg.architecture = arch
    full = load_package(train_dae(data, tmp_path / "full", cfg))
    assert full.methods == ("dae",) and full.contract.context_slices == 3 and full.contract.spacing_mm == 6.0
    assert "dae" in full.calibration.pixel and "dae" in full.calibration.slice
    assert full.meta["training"]["steps_run"] == 6 and len(full.meta["training"]["history"]) == 2
    # stopped after 3 steps, then resumed: the same weights as the uninterrupted run
    train_dae(data, tmp_path / "resumed", cfg, calibrate=False, stop_after=3)
    assert not (tmp_path / "resumed" / "model.json").exists()
    resumed = load_package(train_dae(data, tmp_path / "resumed", cfg, resume=True, calibrate=False))
    a, b = full.load_model().state_dict(), resumed.load_model().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_command_line_trains_and_scores_the_method_by_name(tmp_path, tiny_package, monkeypatch):
    data = _healthy_folder(tmp_path / "healthy")
    config = tmp_path / "dae.json"
    config.write_text(json.dumps({"architecture": {k: v for k, v in TINY_DAE_ARCH.items() if k != "type"},
                                  "spacing_mm": 6.0, "noise_res": 4, "batch_size": 4, "validate_every": 2}))
    models = tmp_path / "models"
    assert main(["train-dae", str(data), "--out", str(models / "my-dae"), "--config", str(config), "--steps", "2",
                 "-q"]) == 0
    monkeypatch.setenv("ANOMALY_LOCALIZER_MODELS", os.pathsep.join([str(models), str(tiny_package.path.parent)]))
    assert resolve_package_for(["dae"]).name == "my-dae"
    out = tmp_path / "out"
    assert main(["score", str(data / "t1" / "S00_T1.nii.gz"), "--method", "dae", "--out", str(out), "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"] == ["dae"] and summary["threshold"]["source"] == "calibrated"
    assert summary["primary_slice_score"] == "dae" and (out / "dae.nii.gz").is_file()
    assert "dae" in (out / "slice_scores.csv").read_text().splitlines()[0]


def test_a_dae_package_with_a_bad_setting_is_refused_naming_the_field(tmp_path):
    from anomaly_localizer.core.package import update_meta
    from anomaly_localizer.errors import PackageError
    pkg = make_tiny_dae_package(tmp_path / "dae")
    meta = dict(pkg.meta)
    meta["dae"] = {"median_px": 1000}
    update_meta(pkg.path, meta)
    with pytest.raises(PackageError, match="dae.median_px"):
        load_package(pkg.path)
    update_meta(pkg.path, {**meta, "dae": {"residual": "lpips"}})
    with pytest.raises(PackageError, match="dae.residual"):
        load_package(pkg.path)
    assert make_tiny_package(tmp_path / "vae").methods != ("dae",)


def test_the_slices_a_model_sees_must_match_its_input_channels(tmp_path):
    from anomaly_localizer.core.package import update_meta
    from anomaly_localizer.errors import PackageError
    pkg = make_tiny_dae_package(tmp_path / "dae")
    meta = dict(pkg.meta)
    meta["input_contract"] = {**meta["input_contract"], "context_slices": 5}
    update_meta(pkg.path, meta)
    with pytest.raises(PackageError, match="in_channels 3 differs from input_contract.context_slices 5"):
        load_package(pkg.path)


def test_bf16_scoring_is_close_to_float32_and_is_recorded(dae):
    """bf16 autocast is a measured option (benchmark/evaluate --bf16), never the default: the
    map it gives is close to float32's, and a run records which precision made it."""
    img = image_from(phantom_array(lesion=True))
    fp32 = score_volume(img, dae, ["dae"])
    bf16 = score_volume(img, dae, ["dae"], bf16=True)
    assert fp32.info["bf16"] is False and bf16.info["bf16"] is True
    brain = fp32.brain_mask
    top = float(np.quantile(fp32.maps["dae"][brain], 0.999))
    assert np.abs(bf16.maps["dae"] - fp32.maps["dae"])[brain].max() < 0.1 * top
    assert not np.array_equal(bf16.maps["dae"], fp32.maps["dae"])  # it did run in another precision
