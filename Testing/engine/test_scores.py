"""Pixel and slice scores: gradients are right, shared work adds up, nothing depends on batching."""

import numpy as np
import pytest
import torch

from anomaly_localizer.core.package import build_network as build_model
from anomaly_localizer.core.detectors.vae import compute_terms
from anomaly_localizer.core.pipeline import score_volume
from anomaly_localizer.core.scores import (PIXEL_METHODS, finalise_maps, kl_divergence, raw_terms, rec_nll, smooth)

from phantoms import TINY_ARCH, image_from, phantom_array


@pytest.fixture()
def model64():
    torch.manual_seed(1)
    return build_model({**TINY_ARCH, "likelihood_std": 0.7}).double().eval()


def _finite_difference(fn, x, idx, eps=1e-6):
    xp, xm = x.clone(), x.clone()
    xp[idx] += eps
    xm[idx] -= eps
    return (fn(xp) - fn(xm)).item() / (2 * eps)


def test_gradients_match_finite_differences(model64):
    torch.manual_seed(2)
    x = torch.rand(3, 1, 32, 32, dtype=torch.float64)
    terms = raw_terms(model64, x, PIXEL_METHODS)

    def kl_sum(v):
        mu, logvar = model64.encode(v)
        return kl_divergence(mu, logvar).sum()

    def rec_sum(v):
        mu, _ = model64.encode(v)
        return rec_nll(v, model64.decode(mu), model64)[1].sum()

    for idx in [(0, 0, 5, 7), (1, 0, 16, 16), (2, 0, 31, 0)]:
        assert terms.grad_kl[idx[0], idx[2], idx[3]].item() == pytest.approx(_finite_difference(kl_sum, x, idx), rel=1e-4, abs=1e-8)
        assert terms.grad_rec[idx[0], idx[2], idx[3]].item() == pytest.approx(_finite_difference(rec_sum, x, idx), rel=1e-4, abs=1e-8)


def test_elbo_grad_is_the_sum_of_its_terms_gradients(model64):
    x = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    t = raw_terms(model64, x, PIXEL_METHODS)
    mask = torch.ones(2, 32, 32, dtype=torch.bool)
    maps = finalise_maps(t, mask, ["elbo_grad", "rec_grad", "kl_grad"])
    assert torch.allclose(maps["elbo_grad"], smooth((t.grad_rec + t.grad_kl).abs()))
    # |a + b| <= |a| + |b|, and smoothing keeps the inequality
    assert (maps["elbo_grad"] <= maps["rec_grad"] + maps["kl_grad"] + 1e-12).all()


def test_slice_terms_are_the_gaussian_nll_and_kl(model64):
    x = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    t = raw_terms(model64, x, ["rec"])
    mu, logvar = model64.encode(x)
    dist = torch.distributions.Normal(model64.decode(mu), 0.7)
    assert torch.allclose(t.rec_slice, -dist.log_prob(x).sum(dim=(1, 2, 3)))
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1)
    assert torch.allclose(t.kl_slice, kl)
    assert t.grad_kl is None and t.grad_rec is None  # rec needs no backward pass


def test_a_slices_scores_do_not_depend_on_its_batch(model64):
    x = torch.rand(7, 1, 32, 32, dtype=torch.float64)
    whole = compute_terms(model64, x, list(PIXEL_METHODS), torch.device("cpu"), batch_size=7)
    pieces = compute_terms(model64, x, list(PIXEL_METHODS), torch.device("cpu"), batch_size=2)
    for name in ("rec_pixel", "rec_slice", "kl_slice", "grad_rec", "grad_kl"):
        assert torch.allclose(getattr(whole, name), getattr(pieces, name))


def test_combi_is_normalised_over_the_volume_not_the_batch(tiny_package):
    img = image_from(phantom_array(lesion=True))
    a = score_volume(img, tiny_package, ["combi"], batch_size=3)
    b = score_volume(img, tiny_package, ["combi"], batch_size=100)
    np.testing.assert_allclose(a.maps["combi"], b.maps["combi"], rtol=1e-5, atol=1e-7)


def test_combi_is_normalised_kl_grad_times_rec_error(model64):
    x = torch.rand(4, 1, 32, 32, dtype=torch.float64)
    t = raw_terms(model64, x, ["combi"])
    mask = torch.zeros(4, 32, 32, dtype=torch.bool)
    mask[:, 4:28, 4:28] = True
    g = t.grad_kl.abs()
    lo, hi = g[mask].min(), g[mask].max()
    expected = smooth((g - lo) / (hi - lo)) * t.rec_pixel
    got = finalise_maps(t, mask, ["combi"])["combi"]
    assert torch.allclose(got[mask], expected[mask])
    assert (got[~mask] == 0).all()


def test_every_method_is_finite_deterministic_and_zero_outside_the_brain(tiny_package):
    arr = phantom_array(lesion=True)
    img = image_from(arr)
    first = score_volume(img, tiny_package, PIXEL_METHODS)
    second = score_volume(img, tiny_package, PIXEL_METHODS)
    brain = arr != 0
    for m in PIXEL_METHODS:
        v = first.maps[m]
        assert v.shape == arr.shape and v.dtype == np.float32
        assert np.isfinite(v).all()
        assert (v[~brain] == 0).all()
        assert (v >= 0).all() and v[brain].max() > 0
        np.testing.assert_array_equal(v, second.maps[m])
    for name in ("elbo", "kl", "rec"):
        s = first.slice_scores[name]
        assert s.shape == (arr.shape[0],)
        has_brain = brain.any(axis=(1, 2))
        assert np.isfinite(s[has_brain]).all() and np.isnan(s[~has_brain]).all()
    np.testing.assert_allclose(first.slice_scores["elbo"], first.slice_scores["rec"] + first.slice_scores["kl"])
    assert np.isfinite(first.volume_score)


def test_only_requested_methods_are_returned(tiny_package):
    res = score_volume(image_from(phantom_array()), tiny_package, ["kl_grad", "rec"])
    assert list(res.maps) == ["kl_grad", "rec"]


def test_out_of_memory_halves_the_batch_and_gives_the_same_result(model64):
    """A device that cannot take more than 2 slices at once: the engine retries smaller."""
    x = torch.rand(7, 1, 32, 32, dtype=torch.float64)
    expected = compute_terms(model64, x, list(PIXEL_METHODS), torch.device("cpu"), batch_size=7)

    class SmallDevice(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.likelihood_std, self.log_norm_const = inner, inner.likelihood_std, inner.log_norm_const
            self.batches = []

        def encode(self, v):
            self.batches.append(v.shape[0])
            if v.shape[0] > 2:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return self.inner.encode(v)

        def decode(self, z):
            return self.inner.decode(z)

    small = SmallDevice(model64)
    got = compute_terms(small, x, list(PIXEL_METHODS), torch.device("cpu"), batch_size=8)
    assert small.batches[:3] == [7, 4, 2]  # 8 capped to the 7 slices, then halved twice
    assert max(small.batches[2:]) <= 2
    for name in ("rec_pixel", "grad_kl", "grad_rec"):
        assert torch.allclose(getattr(got, name), getattr(expected, name))


def test_other_errors_are_not_mistaken_for_out_of_memory(model64):
    class Broken(torch.nn.Module):
        likelihood_std, log_norm_const = 1.0, 0.0

        def encode(self, v):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        compute_terms(Broken(), torch.rand(3, 1, 32, 32), ["rec"], torch.device("cpu"), batch_size=3)


def test_healthy_percentile_counts_tied_scores_at_their_highest_level():
    from anomaly_localizer.core.levels import percentile_of
    calib = {"slice": {"lsr": {"levels": [0.0, 25.0, 50.0, 75.0, 100.0], "values": [0.0, 0.0, 0.0, 10.0, 20.0]}}}
    assert percentile_of(calib, "lsr", 0.0) == 50.0  # half the healthy slices score exactly 0
    assert percentile_of(calib, "lsr", 15.0) == 87.5
    assert percentile_of(calib, "lsr", -1.0) == 0.0 and percentile_of(calib, "lsr", 99.0) == 100.0
