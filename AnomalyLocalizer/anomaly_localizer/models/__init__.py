"""Networks. :func:`build_model` turns an architecture description (JSON) into a module."""

from .unet import UNet2D
from .vae import ARCHITECTURE_TYPES, ConvVAE, build_vae


def build_model(architecture: dict):
    """Build an untrained network from an architecture description (by its "type")."""
    if architecture.get("type") == "unet-brainmask":
        return UNet2D(**{k: v for k, v in architecture.items() if k != "type"})
    return build_vae(architecture)


__all__ = ["ConvVAE", "UNet2D", "build_model", "ARCHITECTURE_TYPES"]
