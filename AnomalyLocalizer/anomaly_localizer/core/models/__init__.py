"""Networks. :func:`anomaly_localizer.core.package.build_network` builds one from an
architecture description (JSON), asking the detector family that owns its type."""

from .lsr import LatentRestorationModel, build_lsr
from .prior import CodePrior
from .unet import UNet2D
from .vae import ConvVAE
from .vqvae import VQVAE

__all__ = ["ConvVAE", "UNet2D", "VQVAE", "CodePrior", "LatentRestorationModel", "build_lsr"]
