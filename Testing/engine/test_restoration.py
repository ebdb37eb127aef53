"""The restoration method (Chen et al.): objective, optimisers, lambda choice, engine and CLI."""

import json

import numpy as np
import pytest
import torch

from anomaly_localizer.cli import main
from anomaly_localizer.core.package import build_network as build_model
from anomaly_localizer.core.pipeline import score_volume
from anomaly_localizer.core.restoration import (REFERENCE_RESTORATION, objective, restoration_map, restore,
                                                total_variation)
from anomaly_localizer.tooling.release.tune_restoration import choose_lambda

from phantoms import TINY_ARCH, image_from, phantom_array


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model({**TINY_ARCH, "likelihood_std": 0.2}).eval()


@pytest.fixture(scope="module")
def slices():
    """Six normalised axial slices of a phantom brain (with a bright lesion) and their masks."""
    from anomaly_localizer.core.volume import brain_mask, prepare_volume
    from phantoms import TINY_CONTRACT
    img = image_from(phantom_array(lesion=True))
    prepared = prepare_volume(img, brain_mask(img, None), TINY_CONTRACT)
    mid = prepared.slices.shape[0] // 2
    return prepared.slices[mid - 3:mid + 3], prepared.mask[mid - 3:mid + 3]


def test_total_variation_of_a_step_is_its_edge_length():
    d = torch.zeros(1, 1, 8, 8)
    d[:, :, :, 4:] = 2.0
    assert float(total_variation(d)) == pytest.approx(2.0 * 8)


def test_restoration_stays_inside_the_brain_and_lowers_the_objective(model, slices):
    y, mask = slices
    for params in ({"lambda": 0.1}, {"lambda": 0.1, **REFERENCE_RESTORATION, "steps": 60}):
        x, record = restore(model, y, mask, params)
        assert torch.equal(x[~mask], y[~mask])
        start = float(objective(model, y, y, 0.1).detach().sum())
        assert record["objective"] < start
    d, _ = restoration_map(model, y, mask, {"lambda": 0.1})
    assert d.shape == (6, 32, 32) and float(d.min()) >= 0 and float(d[~mask[:, 0]].abs().max()) == 0


def test_model_parameters_keep_their_gradient_flags(model, slices):
    y, mask = slices
    before = [p.requires_grad for p in model.parameters()]
    restore(model, y, mask, {"lambda": 0.1, "steps": 3})
    assert [p.requires_grad for p in model.parameters()] == before


def test_restoration_is_deterministic(model, slices):
    y, mask = slices
    a, _ = restoration_map(model, y, mask, {"lambda": 0.2})
    b, _ = restoration_map(model, y, mask, {"lambda": 0.2})
    assert torch.equal(a, b)


def test_larger_lambda_changes_a_scan_less(model, slices):
    y, mask = slices
    changes = [float(restoration_map(model, y, mask, {"lambda": lam})[0].mean()) for lam in (0.0, 0.3, 100.0)]
    assert changes[0] > changes[1] > changes[2]
    assert changes[2] < 1e-3 * max(changes[0], 1e-9) + 1e-6


def test_choose_lambda_takes_the_smallest_lambda_within_tolerance(model, slices):
    grid = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0, 100.0)
    full = choose_lambda(model, [slices], grid=grid, tolerance=-1.0)  # never met: the whole curve, the last lambda
    assert full["lambda"] == grid[-1]
    curve = full["selection"]["curve"]
    changes = [c["healthy_mean_change"] for c in curve]
    tol = (changes[2] + changes[3]) / 2  # between the third and fourth lambda's change
    chosen = choose_lambda(model, [slices], grid=grid, tolerance=tol)
    assert chosen["lambda"] == 0.3
    # the search stops one value past the choice
    assert chosen["selection"]["tolerance"] == tol and len(chosen["selection"]["curve"]) == 5


def test_adam_reaches_at_least_the_reference_optimum(model, slices):
    """The fast optimiser must restore as well as the reference's 500 gradient steps:
    an objective no higher, and a nearly identical restoration."""
    y, mask = slices
    x_ref, ref = restore(model, y, mask, {"lambda": 0.1, **REFERENCE_RESTORATION})
    x_fast, fast = restore(model, y, mask, {"lambda": 0.1})
    assert fast["steps"] < ref["steps"]
    assert fast["objective"] <= ref["objective"] * 1.01


def test_engine_scores_restoration_on_the_input_grid(tiny_package):
    arr = phantom_array(lesion=True)
    img = image_from(arr)
    res = score_volume(img, tiny_package, ["restoration", "rec"])
    assert set(res.maps) == {"restoration", "rec"}
    assert res.maps["restoration"].shape == arr.shape
    assert float(res.maps["restoration"][arr == 0].max()) == 0.0
    assert res.info["restoration"]["steps"] >= 1 and "restoration_s" in res.timings
    assert set(res.slice_scores) == {"elbo", "kl", "rec"}


def test_restoration_is_offered_but_not_run_by_default(tiny_package):
    assert "restoration" in tiny_package.methods
    assert "restoration" not in tiny_package.default_methods()


def test_cli_scores_restoration(tiny_package, tmp_path):
    img = tmp_path / "in.nii.gz"
    import SimpleITK as sitk
    sitk.WriteImage(image_from(phantom_array(lesion=True)), str(img))
    out = tmp_path / "out"
    rc = main(["score", str(img), "--out", str(out), "--model", str(tiny_package.path), "--method", "restoration",
               "--threshold", "0.05", "-q"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"] == ["restoration"] and (out / "restoration.nii.gz").is_file()
    assert np.isfinite(summary["volume_score"]["value"])


def test_progress_only_moves_forward_and_cancel_stops_a_restoration(tiny_package):
    from anomaly_localizer.errors import CancelledError
    img = image_from(phantom_array(lesion=True))
    seen = []
    score_volume(img, tiny_package, ["elbo_grad", "restoration"], progress=lambda f, msg: seen.append(f))
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) > 4
    calls = []
    with pytest.raises(CancelledError):
        score_volume(img, tiny_package, ["restoration"], cancel=lambda: calls.append(1) or len(calls) > 3)


def test_tune_restoration_that_fails_leaves_no_half_made_model(tiny_package, tiny_lsr_package, tmp_path, capsys):
    """A refused model, or a failure after the copy was made (here: the data folder holds
    none of the model's calibration subjects), leaves --out absent."""
    import SimpleITK as sitk
    data = tmp_path / "healthy"
    data.mkdir()
    for i in range(2):
        sitk.WriteImage(image_from(phantom_array(seed=i)), str(data / f"h{i}.nii.gz"))
    out = tmp_path / "tuned"
    assert main(["tune-restoration", str(tiny_lsr_package.path), str(data), "--out", str(out), "-q"]) == 2
    assert "not a VAE" in capsys.readouterr().err and not out.exists()
    assert main(["tune-restoration", str(tiny_package.path), str(data), "--subjects", "all", "--limit", "1",
                 "--out", str(out), "-q"]) == 2
    assert "calibration subjects" in capsys.readouterr().err and not out.exists()
