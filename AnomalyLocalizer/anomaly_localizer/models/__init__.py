"""Networks. :func:`build_model` turns an architecture description (JSON) into a module."""

from .prior import CodePrior
from .unet import UNet2D
from .vae import ARCHITECTURE_TYPES, ConvVAE, build_vae
from .vqvae import VQVAE
from .lsr import LatentRestorationModel, build_lsr


def build_model(architecture: dict):
    """Build an untrained network from an architecture description (by its "type")."""
    if architecture.get("type") == "unet-brainmask":
        return UNet2D(**{k: v for k, v in architecture.items() if k != "type"})
    if architecture.get("type") == "vqvae-lsr":
        return build_lsr(architecture)
    return build_vae(architecture)


__all__ = ["ConvVAE", "UNet2D", "VQVAE", "CodePrior", "LatentRestorationModel", "build_model", "ARCHITECTURE_TYPES"]
