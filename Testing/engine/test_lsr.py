"""Latent space restoration (Naval Marimont & Tarroni): the prior's causality, resampling
only unlikely codes, the scores, the engine, model choice by method, and training."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from anomaly_localizer.cli import main
from anomaly_localizer.errors import AnomalyLocalizerError
from anomaly_localizer.core.lsr import (RESIDUAL_UNIT, code_nll, lsr_scores, pool, resample, slice_score,
                                   weighted_residual)
from anomaly_localizer.core.package import build_network as build_model
from anomaly_localizer.core.package import load_package
from anomaly_localizer.core.installed import resolve_package_for
from anomaly_localizer.core.pipeline import score_volume

from phantoms import TINY_LSR_ARCH, TINY_LSR_SCORING, image_from, phantom_array


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(TINY_LSR_ARCH).eval()


@torch.no_grad()
def test_prior_logits_depend_only_on_earlier_codes(model):
    prior = model.prior
    G = prior.grid_size
    codes = torch.randint(0, prior.codebook_size, (2, G, G))
    pos = torch.tensor([0.2, 0.7])
    base = prior(codes, pos)
    for t in (0, 5, G * G // 2, G * G - 2):
        r, c = divmod(t, G)
        changed = codes.clone()
        changed[:, r, c] = (changed[:, r, c] + 1) % prior.codebook_size
        diff = (prior(changed, pos) - base).abs().amax(1).flatten(1)  # per raster position
        assert float(diff[:, :t + 1].max()) == 0.0, "a code influenced itself or an earlier position"


@torch.no_grad()
def test_prior_on_a_cropped_grid_matches_the_full_grid(model):
    prior = model.prior
    codes = torch.randint(0, prior.codebook_size, (3, prior.grid_size, prior.grid_size))
    pos = torch.rand(3)
    full = prior(codes, pos)
    for r in (0, 3, prior.grid_size - 1):
        torch.testing.assert_close(prior(codes[:, :r + 1], pos), full[:, :, :r + 1], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_prior_depends_on_the_slice_position(model):
    torch.manual_seed(3)
    model.prior.condition.weight.data.normal_()
    codes = torch.randint(0, model.prior.codebook_size, (1, 8, 8))
    a = model.prior(codes, torch.tensor([0.1]))
    b = model.prior(codes, torch.tensor([0.9]))
    assert float((a - b).abs().max()) > 0


def test_resample_changes_only_flagged_codes_with_one_pass_per_position(model):
    G = model.prior.grid_size
    codes = torch.randint(0, model.prior.codebook_size, (4, G, G))
    flags = torch.zeros(4, G, G, dtype=torch.bool)
    flags[0, 1, 2] = flags[1, 1, 2] = flags[2, 5, 5] = True
    out, passes = resample(model.prior, codes, torch.rand(4), flags, torch.Generator().manual_seed(0))
    assert passes == 2  # positions (1,2) and (5,5)
    assert torch.equal(out[~flags], codes[~flags])
    same, none = resample(model.prior, codes, torch.rand(4), torch.zeros_like(flags), torch.Generator())
    assert none == 0 and torch.equal(same, codes)


def test_slice_score_sums_nll_above_lambda_s():
    nll = torch.tensor([[[1.0, 8.0], [7.5, 2.0]], [[0.0, 0.0], [0.0, 6.9]]])
    assert slice_score(nll, 7.0).tolist() == [15.5, 0.0]


def test_the_closer_restoration_dominates_the_weighted_residual():
    y = torch.zeros(1, 1, 4, 4)
    restored = torch.stack([torch.full((4, 4), 0.01), torch.full((4, 4), 2.0)])[None]
    out = weighted_residual(y, restored, temperature=3.0)
    assert torch.allclose(out, torch.full((1, 4, 4), 0.01), atol=1e-4)
    assert RESIDUAL_UNIT == pytest.approx(0.25 / 1.349)


def test_pooling_removes_an_isolated_pixel_and_keeps_a_blob():
    m = torch.zeros(1, 16, 16)
    m[0, 3, 3] = 1.0
    m[0, 8:14, 8:14] = 1.0
    out = pool(m, 3, 1)
    assert float(out[0, 3, 3]) == 0.0 and float(out[0, 10, 10]) == 1.0


def test_lsr_scores_are_seeded_and_reproducible(model):
    torch.manual_seed(5)
    x = torch.rand(10, 1, 32, 32)
    mask = torch.ones(10, 1, 32, 32, dtype=torch.bool)
    pos = torch.linspace(0, 1, 10)
    a = lsr_scores(model, x, mask, pos, TINY_LSR_SCORING)
    b = lsr_scores(model, x, mask, pos, TINY_LSR_SCORING)
    assert a.resampled_codes > 0, "the tiny model should flag codes at these thresholds"
    assert torch.equal(a.pixel, b.pixel) and torch.equal(a.slice, b.slice)
    c = lsr_scores(model, x, mask, pos, {**TINY_LSR_SCORING, "seed": 1})
    assert not torch.equal(a.pixel, c.pixel)
    # one chunk (10 slices < CHUNK_SLICES): one prior pass per position flagged in any slice
    _, nll = code_nll(model, x, pos)
    assert a.prior_passes == int((nll > TINY_LSR_SCORING["lambda_p"]).flatten(1).any(0).sum())


def test_engine_scores_lsr_with_its_own_slice_and_volume_score(tiny_lsr_package):
    arr = phantom_array(lesion=True)
    res = score_volume(image_from(arr), tiny_lsr_package, ["lsr"])
    assert set(res.maps) == {"lsr"} and res.maps["lsr"].shape == arr.shape
    assert float(res.maps["lsr"][arr == 0].max()) == 0.0
    assert set(res.slice_scores) == {"lsr"} and res.info["primary_slice_score"] == "lsr"
    assert np.isfinite(res.volume_score)
    with pytest.raises(AnomalyLocalizerError, match="does not offer rec"):
        score_volume(image_from(arr), tiny_lsr_package, ["rec"])


def test_model_is_chosen_by_method(tiny_package, tiny_lsr_package, monkeypatch):
    import os
    folder = tiny_lsr_package.path.parent
    monkeypatch.setenv("ANOMALY_LOCALIZER_MODELS", os.pathsep.join([str(folder), str(tiny_package.path.parent)]))
    assert resolve_package_for(["lsr"]).architecture["type"] == "vqvae-lsr"
    assert resolve_package_for(["rec"]).architecture["type"] == "vae"
    with pytest.raises(AnomalyLocalizerError, match="separate calls"):
        resolve_package_for(["rec", "lsr"])
    with pytest.raises(AnomalyLocalizerError, match="does not offer lsr"):
        resolve_package_for(["lsr"], str(tiny_package.path))


def test_cli_scores_lsr(tiny_lsr_package, tmp_path):
    img = tmp_path / "in.nii.gz"
    sitk.WriteImage(image_from(phantom_array(lesion=True)), str(img))
    out = tmp_path / "out"
    rc = main(["score", str(img), "--out", str(out), "--model", str(tiny_lsr_package.path), "--threshold", "0.05",
               "-q"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"] == ["lsr"] and "lsr slice score" in summary["volume_score"]["meaning"]
    header = (out / "slice_scores.csv").read_text().splitlines()[0]
    assert "lsr" in header


def test_train_lsr_writes_a_calibrated_package(tmp_path):
    from anomaly_localizer.tooling.training.train_lsr import LSRTrainConfig, train_lsr
    root = tmp_path / "healthy"
    (root / "t1").mkdir(parents=True)
    (root / "brainmask").mkdir()
    for i in range(8):
        arr = phantom_array((24, 40, 34), seed=i) * (1 + 0.1 * i)
        sitk.WriteImage(image_from(arr, spacing=(4.0, 4.0, 4.0)), str(root / "t1" / f"S{i:02d}_T1.nii.gz"))
        sitk.WriteImage(image_from((arr != 0).astype(np.uint8), spacing=(4.0, 4.0, 4.0)),
                        str(root / "brainmask" / f"S{i:02d}_brainmask.nii.gz"))
    cfg = LSRTrainConfig.from_json(None, vqvae_epochs=2, prior_epochs=2, batch_size=16, spacing_mm=6.0,
                                   val_fraction=0.2, calibration_fraction=0.2, test_fraction=0.2,
                                   architecture=TINY_LSR_ARCH, scoring=TINY_LSR_SCORING)
    out = train_lsr(root, tmp_path / "lsr", cfg)
    package = load_package(out)
    assert package.methods == ("lsr",)
    assert package.meta["lsr"]["lambda_s"] == TINY_LSR_SCORING["lambda_s"]
    assert package.meta["training"]["vqvae"]["epochs_run"] == 2 and package.meta["training"]["prior"]["epochs_run"] == 2
    assert "lsr" in package.calibration.pixel and "lsr" in package.calibration.slice
    assert package.default_threshold("lsr") is not None
    # a resumed run with nothing left to do reproduces the same package
    again = train_lsr(root, tmp_path / "lsr", cfg, resume=True)
    assert load_package(again).files["model.safetensors"] == package.files["model.safetensors"]


def test_a_broken_model_is_named_when_no_model_offers_a_method(tiny_package, tmp_path, monkeypatch):
    import shutil
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copytree(tiny_package.path, folder / "vae")
    from phantoms import make_tiny_lsr_package
    lsr = make_tiny_lsr_package(folder / "lsr")
    (lsr.path / "model.json").write_text((lsr.path / "model.json").read_text() + " ")  # edited: hash mismatch
    monkeypatch.setenv("ANOMALY_LOCALIZER_MODELS", str(folder))
    monkeypatch.setattr("anomaly_localizer.core.package.SHIPPED_MODELS_DIRS", ())
    monkeypatch.setattr("anomaly_localizer.core.package.USER_MODELS_DIR", tmp_path / "none")
    with pytest.raises(AnomalyLocalizerError, match="lsr: model.json does not match its SHA-256.*No other installed model offers lsr"):
        resolve_package_for(["lsr"])
