"""Networks. :func:`build_model` turns an architecture description (JSON) into a module."""

from .vae import ConvVAE, build_model, ARCHITECTURE_TYPES

__all__ = ["ConvVAE", "build_model", "ARCHITECTURE_TYPES"]
