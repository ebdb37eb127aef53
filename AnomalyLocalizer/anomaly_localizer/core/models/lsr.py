"""The model of latent space restoration: a VQ-VAE and the prior over its codes, one package.

Architecture description (model.json)::

    {"type": "vqvae-lsr", "slice_size": 96,
     "vqvae": {... see models.vqvae.DEFAULT_VQVAE ...},
     "prior": {... see models.prior.DEFAULT_PRIOR ...}}

The weights of both parts live in one safetensors file under the prefixes ``vqvae.`` and
``prior.``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .prior import DEFAULT_PRIOR, CodePrior
from .vqvae import DEFAULT_VQVAE, VQVAE

DEFAULT_LSR: dict[str, Any] = {"type": "vqvae-lsr", "slice_size": DEFAULT_VQVAE["slice_size"],
                               "vqvae": {k: v for k, v in DEFAULT_VQVAE.items() if k != "slice_size"},
                               "prior": dict(DEFAULT_PRIOR)}


class LatentRestorationModel(nn.Module):
    def __init__(self, vqvae: VQVAE, prior: CodePrior):
        super().__init__()
        self.vqvae = vqvae
        self.prior = prior

    @property
    def slice_size(self) -> int:
        return self.vqvae.slice_size


def full_lsr_architecture(architecture: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in, so a package records every size it was built with."""
    return {"type": "vqvae-lsr", "slice_size": int(architecture.get("slice_size", DEFAULT_LSR["slice_size"])),
            "vqvae": {**DEFAULT_LSR["vqvae"], **architecture.get("vqvae", {})},
            "prior": {**DEFAULT_LSR["prior"], **architecture.get("prior", {})}}


def build_lsr(architecture: dict[str, Any]) -> LatentRestorationModel:
    arch = full_lsr_architecture(architecture)
    vq = VQVAE(slice_size=arch["slice_size"], **arch["vqvae"])
    prior = CodePrior(codebook_size=vq.codebook_size, grid_size=vq.grid_size, **arch["prior"])
    return LatentRestorationModel(vq, prior)
