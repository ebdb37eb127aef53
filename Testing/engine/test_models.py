"""The VAE's shapes follow its configuration; bad configurations are refused."""

import pytest
import torch

from anomaly_localizer.core.package import build_network as build_model


@pytest.mark.parametrize("size", [64, 128])
def test_default_vae_encodes_and_decodes_slices_of_configured_size(size):
    model = build_model({"slice_size": size})
    x = torch.randn(2, 1, size, size)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (2, 256)
    assert model.decode(mu).shape == (2, 1, size, size)


def test_default_feature_maps_are_the_papers():
    model = build_model({})
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 256, 512]  # last: mean and log-variance
    assert all(isinstance(m, (torch.nn.Conv2d, torch.nn.LeakyReLU)) for m in model.encoder)


def test_widths_latent_and_c_are_configuration():
    model = build_model({"slice_size": 32, "feature_maps": [8, 16, 32], "latent_size": 12, "likelihood_std": 0.5})
    mu, _ = model.encode(torch.zeros(1, 1, 32, 32))
    assert mu.shape == (1, 12)
    assert model.likelihood_std == 0.5


@pytest.mark.parametrize("arch", [{"type": "gan"}, {"slice_size": 60}, {"likelihood_std": 0}, {"feature_maps": []}])
def test_bad_architecture_is_refused(arch):
    with pytest.raises(ValueError):
        build_model(arch)
