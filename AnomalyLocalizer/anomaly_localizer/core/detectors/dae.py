"""The coarse-noise denoising autoencoder (Kascenas, Pugeault, O'Neil, MIDL 2022).

A U-Net learned to remove coarse noise (Gaussian noise drawn on a coarse grid, upsampled,
added inside the brain) from healthy slices, so it maps a slice onto a healthy one; what it
changes is the anomaly. Here it works at the data's 2 mm in-plane and sees the slice with
its neighbours (``context_slices`` channels, 2.5D); it restores the middle slice.

Pixel score ``dae``: the residual between x and x_hat inside the brain mask eroded by
``erode_px`` model pixels (the brain's edge is where every reconstruction errs), median filtered
(``median_px``), then the package's 3D smoothing like every map. The residual (``residual``) is
|x - x_hat| by default, or one of SSIM's weight-free terms over a Gaussian window (Huijben et
al. 2024 found its contrast term the best single metric for an autoencoder's anomalies):
``contrast``, 1 - c, or ``structure_contrast``, 1 - c * s. Slice score ``dae``: the mean of the slice's
``slice_top_k`` highest pixel scores. Training: :mod:`anomaly_localizer.tooling.training.train_dae`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import Field, model_validator

from ..schema import Channels, SliceSize, Strict
from .base import Detector, DetectorOutput, ScoringContext, run_in_batches

BATCH_SLICES = 32


class DAEArchitecture(Strict):
    type: Literal["unet-dae"] = "unet-dae"
    slice_size: SliceSize = 112
    in_channels: Annotated[int, Field(ge=1, le=9)] = 3
    feature_maps: Annotated[list[Channels], Field(min_length=2, max_length=7)] = [16, 32, 64, 128]
    groups: Annotated[int, Field(ge=1, le=64)] = 8

    @model_validator(mode="after")
    def _divisible(self) -> "DAEArchitecture":
        if self.slice_size % (2 ** (len(self.feature_maps) - 1)):
            raise ValueError(f"slice_size {self.slice_size} is not divisible by 2**{len(self.feature_maps) - 1}")
        return self


class DAEScoring(Strict):
    """The ``dae`` block of model.json; keys left out take :data:`DEFAULT_DAE_SCORING`."""

    erode_px: Optional[Annotated[int, Field(ge=0, le=10)]] = None
    median_px: Optional[Annotated[int, Field(ge=1, le=15)]] = None
    slice_top_k: Optional[Annotated[int, Field(ge=1, le=10000)]] = None
    residual: Optional[Literal["abs", "contrast", "structure_contrast"]] = None


# ``residual`` is left out of the defaults (absent means "abs"): a training configuration
# records these defaults, and one started before the option existed must still resume.
DEFAULT_DAE_SCORING: dict[str, Any] = {"erode_px": 2, "median_px": 5, "slice_top_k": 20}
RESIDUAL_TEXT = {"abs": "|x - x_hat|", "contrast": "1 - SSIM's contrast term c(x, x_hat)",
                 "structure_contrast": "1 - SSIM's contrast times structure terms c * s (x, x_hat)"}
SSIM_SIGMA_PX = 1.5  # Gaussian window of SSIM (Wang et al. 2004), 7x7 pixels
SSIM_C2 = 0.03 ** 2  # (K2 * L)^2 with the normalised intensity's range L taken as 1


class DAEDetector(Detector):
    name = "dae"
    order = 20
    types = ("unet-dae",)
    methods = ("dae",)
    method_help = {"dae": "coarse-noise denoising autoencoder (Kascenas et al.): |x - x_hat| of a U-Net that removes "
                          "coarse noise from healthy slices, 2 mm, neighbouring slices as input"}
    slice_scores = ("dae",)
    volume_score_meaning = "mean dae slice score (its top pixel scores) of the 10 % most anomalous brain slices"
    architecture = DAEArchitecture
    settings = {"dae": DAEScoring}
    example_model = "a denoising autoencoder model (e.g. brain-t1-dae)"

    def describe(self, meta: dict[str, Any]) -> list[str]:
        arch, sc = meta["architecture"], {**DEFAULT_DAE_SCORING, **meta.get("dae", {})}
        training = meta.get("training", {})
        cfg = training.get("config", {})
        return [
            f"- Architecture: 2D U-Net (feature maps {arch['feature_maps']}, GroupNorm in groups of up to "
            f"{arch['groups']}), input the slice and its neighbours ({arch['in_channels']} channels, 2.5D), output the "
            "restored middle slice (Kascenas et al. 2022).",
            f"- Training: coarse noise of standard deviation {cfg.get('noise_std')} (normalised intensity; the brain's "
            f"inter-quartile range is 0.25) drawn on a {cfg.get('noise_res')}x{cfg.get('noise_res')} grid, upsampled, "
            "rolled and added inside the brain; squared error inside the brain; augmentation: left-right flips, "
            f"contrast +-{cfg.get('contrast')}, gamma exp(+-{cfg.get('gamma')}), bias field +-{cfg.get('bias_field')}; "
            f"AdamW {cfg.get('learning_rate')}, cosine schedule, {training.get('steps_run')} steps of "
            f"{cfg.get('batch_size')} slices, best validation loss at step {training.get('best_step')} "
            f"({'bf16' if training.get('bf16') else 'float32'}).",
            f"- Scoring (`dae` in `model.json`): {RESIDUAL_TEXT[sc.get('residual') or 'abs']} inside the brain eroded by "
            f"{sc['erode_px']} pixels, "
            f"{sc['median_px']}x{sc['median_px']} median filter; slice score = mean of the slice's "
            f"{sc['slice_top_k']} highest pixel scores."]

    def build_network(self, architecture: dict[str, Any]):
        from ..models.unet import UNet2D
        arch = DAEArchitecture.model_validate(architecture)
        return UNet2D(slice_size=arch.slice_size, feature_maps=arch.feature_maps, in_channels=arch.in_channels,
                      norm="group", groups=arch.groups)

    def score(self, net, prepared, package, methods: list[str], ctx: ScoringContext) -> DetectorOutput:
        params = {**DEFAULT_DAE_SCORING, **package.settings("dae")}
        x = prepared.with_context(package.contract.context_slices)
        restored = run_in_batches(net, x, ctx, BATCH_SLICES, "restored")
        middle = x[:, x.shape[1] // 2: x.shape[1] // 2 + 1]
        pixel = residual_map(middle, restored, prepared.mask, int(params["erode_px"]),
                             int(params["median_px"]), params.get("residual") or "abs")
        return DetectorOutput(maps={"dae": pixel}, slice_scores={"dae": top_k_mean(pixel, int(params["slice_top_k"]))})


def erode(mask, radius: int):
    """(N,1,S,S) bool mask eroded by a square of side 2 * radius + 1."""
    import torch.nn.functional as F
    if radius <= 0:
        return mask
    k = 2 * radius + 1
    return -F.max_pool2d(-mask.float(), k, stride=1, padding=radius) > 0.5


def median_filter(maps, size: int):
    """(N,S,S) maps, median over size x size neighbourhoods (zero padding), same size."""
    import torch.nn.functional as F
    if size <= 1:
        return maps
    n, h, w = maps.shape
    patches = F.unfold(maps[:, None], size, padding=size // 2)  # (N, size*size, H*W)
    return patches.median(dim=1).values.view(n, h, w)


def residual_map(x, x_hat, mask, erode_px: int, median_px: int, residual: str = "abs"):
    """The residual (N,S,S) of (N,1,S,S) x and x_hat inside the eroded brain, median
    filtered; 0 outside the brain. ``residual``: a key of :data:`RESIDUAL_TEXT`."""
    inner = erode(mask, erode_px)[:, 0]
    if residual == "abs":
        resid = (x - x_hat).abs()[:, 0]
    else:
        c, s = ssim_terms(x, x_hat)
        resid = (1 - c if residual == "contrast" else 1 - c * s)[:, 0]
    return median_filter(resid * inner, median_px) * mask[:, 0]


def ssim_terms(x, y, sigma: float = SSIM_SIGMA_PX, c2: float = SSIM_C2):
    """SSIM's contrast c = (2 sx sy + C2) / (sx^2 + sy^2 + C2) and structure
    s = (sxy + C2/2) / (sx sy + C2/2) terms, per pixel of (N,1,S,S) images, over a Gaussian
    window. The luminance term is left out: |x - x_hat| already carries it, and these terms are
    what a reconstruction gets wrong in texture and edges whatever its mean."""
    import torch
    import torch.nn.functional as F
    radius = int(round(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()

    def blur(a):  # separable, reflected at the slice's border
        a = F.pad(a, (radius, radius, radius, radius), mode="reflect")
        a = F.conv2d(a, g.view(1, 1, 1, -1))
        return F.conv2d(a, g.view(1, 1, -1, 1))

    x, y = x.float(), y.float()
    mx, my = blur(x), blur(y)
    vx = (blur(x * x) - mx * mx).clamp_min(0)
    vy = (blur(y * y) - my * my).clamp_min(0)
    cov = blur(x * y) - mx * my
    sx, sy = vx.sqrt(), vy.sqrt()
    c3 = c2 / 2
    return (2 * sx * sy + c2) / (vx + vy + c2), (cov + c3) / (sx * sy + c3)


def top_k_mean(maps, k: int):
    """Per slice (N,): the mean of its k highest values."""
    flat = maps.flatten(1)
    return flat.topk(min(k, flat.shape[1]), dim=1).values.mean(1)


DETECTOR = DAEDetector()
