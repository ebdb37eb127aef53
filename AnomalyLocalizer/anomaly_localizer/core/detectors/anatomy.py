"""The anatomy-conditioned score: each voxel against its own tissue, in this scan.

The intensity rule (:mod:`.rule`) compares every voxel with the whole brain, so on a healthy
FLAIR it flags the cortex and the periventricular caps, and on T2 the CSF, as readily as a
lesion. Here a contrast-agnostic U-Net, trained on healthy brains rendered in many contrasts
from their parcellations (:mod:`anomaly_localizer.tooling.training.train_tissue`, as SynthSeg
learns segmentation without images of the contrast), predicts each voxel's tissue class
(CSF, cortical grey matter, white matter, deep grey matter, the white matter next to the
lateral ventricles). Each class's intensity in this scan is summarised robustly (median and
inter-quartile range of the voxels the network assigns to it), and each voxel is scored by
how far it lies from the classes it may belong to, in units of that class's spread: a bright
spot in white matter stands out on FLAIR, bright cortex does not. The segmenter is trained
with blobs of random intensity pasted into the brain and the tissue beneath kept as the
label, so a lesion is labelled as the tissue it sits in rather than as its own class; the
median and the inter-quartile range keep a large lesion from moving its class's reference
much.

A model that reads several contrasts (``input_contract.contrasts``, e.g. FLAIR then T1) scores
the first and takes the tissue classes from the first of the others the study holds: on a T1
the anatomy is clearest and a FLAIR lesion faintest, so a lesion is less likely to be labelled
as a tissue of its own brightness.

Pixel score ``anatomy``: in model space, for every class c with probability at least
``min_probability`` (and the most probable class always), z_c = (x - median_c) / IQR_c kept
where positive (``direction`` "bright"; "dark": its negative; "both": its magnitude); the
voxel's score is the smallest of them (a partial-volume voxel between grey matter and CSF fits
either), smoothed by a Gaussian of ``smoothing_px`` model pixels; 0 outside the brain. Slice
score ``anatomy``: the mean of the slice's ``slice_top_k`` highest pixel scores.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import Field, model_validator

from ..schema import Channels, SliceSize, Strict
from .base import Detector, DetectorOutput, ScoringContext, run_in_batches

BATCH_SLICES = 32
MIN_CLASS_VOXELS = 50  # a class with fewer voxels in this scan has no reliable reference of its own
MIN_IQR = 0.02  # in normalised intensity (the brain's IQR is 0.25): a class spread never taken as narrower
TISSUE_CLASSES = ("csf", "cortical_grey", "white", "deep_grey", "periventricular_white")


class AnatomyArchitecture(Strict):
    type: Literal["tissue-unet"] = "tissue-unet"
    slice_size: SliceSize = 112
    in_channels: Annotated[int, Field(ge=1, le=9)] = 1
    feature_maps: Annotated[list[Channels], Field(min_length=2, max_length=7)] = [16, 32, 64, 128]
    groups: Annotated[int, Field(ge=1, le=64)] = 8
    classes: Annotated[list[str], Field(min_length=2, max_length=16)] = list(TISSUE_CLASSES)

    @model_validator(mode="after")
    def _divisible(self) -> "AnatomyArchitecture":
        if self.slice_size % (2 ** (len(self.feature_maps) - 1)):
            raise ValueError(f"slice_size {self.slice_size} is not divisible by 2**{len(self.feature_maps) - 1}")
        return self


class AnatomyScoring(Strict):
    """The ``anatomy`` block of model.json; keys left out take :data:`DEFAULT_ANATOMY_SCORING`."""

    direction: Optional[Literal["bright", "dark", "both"]] = None
    min_probability: Optional[Annotated[float, Field(gt=0.0, le=1.0)]] = None
    smoothing_px: Optional[Annotated[float, Field(ge=0.0, le=5.0)]] = None
    slice_top_k: Optional[Annotated[int, Field(ge=1, le=10000)]] = None


DEFAULT_ANATOMY_SCORING: dict[str, Any] = {"direction": "bright", "min_probability": 0.2, "smoothing_px": 1.0,
                                           "slice_top_k": 20}
SIGNED = {"bright": "(x - median) / IQR where positive", "dark": "(median - x) / IQR where positive",
          "both": "|x - median| / IQR"}


class AnatomyDetector(Detector):
    name = "anatomy"
    order = 80
    types = ("tissue-unet",)
    methods = ("anatomy",)
    uses_guides = True  # the tissue classes from another contrast of the study
    method_help = {"anatomy": "each voxel against its own tissue in this scan: a contrast-agnostic U-Net predicts "
                              "the tissue classes, each class's median and inter-quartile range are measured in the "
                              "scan, and a voxel scores how far it lies from the classes it may belong to"}
    slice_scores = ("anatomy",)
    volume_score_meaning = "mean anatomy slice score (its top pixel scores) of the 10 % most anomalous brain slices"
    architecture = AnatomyArchitecture
    settings = {"anatomy": AnatomyScoring}
    example_model = "an anatomy-conditioned model (e.g. brain-t2-anatomy)"

    def describe(self, meta: dict[str, Any]) -> list[str]:
        arch = AnatomyArchitecture.model_validate(meta["architecture"])
        sc = {**DEFAULT_ANATOMY_SCORING, **meta.get("anatomy", {})}
        training = meta.get("training", {})
        return [
            f"- Tissue segmenter: 2D U-Net (feature maps {arch.feature_maps}, GroupNorm), "
            f"{arch.slice_size}x{arch.slice_size} axial slices, {len(arch.classes)} classes "
            f"({', '.join(c.replace('_', ' ') for c in arch.classes)}), trained on healthy brains rendered from their "
            f"parcellations in several contrasts with random intensity remapping and pasted blobs "
            f"({training.get('steps_run', '?')} steps, best validation Dice {training.get('best_val_dice', '?')}).",
            f"- Scoring (`anatomy` in `model.json`): {SIGNED[sc['direction']]} against each class the voxel may belong "
            f"to (probability at least {sc['min_probability']:g}, and its most probable class), the smallest kept; "
            f"smoothed by a Gaussian of {sc['smoothing_px']:g} pixels; slice score = mean of the slice's "
            f"{sc['slice_top_k']} highest pixel scores."]

    def build_network(self, architecture: dict[str, Any]):
        from ..models.unet import UNet2D
        arch = AnatomyArchitecture.model_validate(architecture)
        return UNet2D(slice_size=arch.slice_size, feature_maps=arch.feature_maps, in_channels=arch.in_channels,
                      norm="group", groups=arch.groups, out_channels=len(arch.classes))

    def score(self, net, prepared, package, methods: list[str], ctx: ScoringContext) -> DetectorOutput:
        from .dae import top_k_mean
        from .rule import gaussian_blur
        params = {**DEFAULT_ANATOMY_SCORING, **package.settings("anatomy")}
        context = package.contract.context_slices
        x = prepared.with_context(context)
        # the tissue classes from another contrast of the study where the model reads one (a
        # T1 shows anatomy best and a FLAIR lesion least), else from the scored scan itself
        guide = next((c for c in package.contract.contrasts[1:] if c in ctx.guides), None)
        seen = ctx.guides[guide].with_context(context) if guide else x
        logits = run_in_batches(net, seen, ctx, BATCH_SLICES, "segmented")
        middle = x[:, x.shape[1] // 2]
        pixel = tissue_deviation(middle, logits.softmax(1), prepared.mask[:, 0], params["direction"],
                                 float(params["min_probability"]))
        pixel = gaussian_blur(pixel, float(params["smoothing_px"])) * prepared.mask[:, 0]
        return DetectorOutput(maps={"anatomy": pixel},
                              slice_scores={"anatomy": top_k_mean(pixel, int(params["slice_top_k"]))},
                              info={"tissue_classes_from": guide or package.contract.contrasts[0]})


def quartiles(values):
    """The 25th, 50th and 75th percentiles of a 1-D tensor, as torch.quantile's default
    (linear) gives them, by numpy's selection instead of a full sort: 4-5 times faster, so the
    six quantiles of a scan cost a fraction of a second."""
    import numpy as np
    return np.quantile(values.detach().cpu().numpy(), [0.25, 0.5, 0.75])


def class_references(x, probs, brain):
    """Per class, (median, IQR) of the brain voxels of ``x`` (N,S,S) whose most probable class
    it is under ``probs`` (N,K,S,S); None for a class with too few voxels in this scan."""
    hard = probs.argmax(1)
    refs = []
    for c in range(probs.shape[1]):
        values = x[brain & (hard == c)].float()
        if values.numel() < MIN_CLASS_VOXELS:
            refs.append(None)
            continue
        if values.numel() > 2_000_000:  # an even subsample keeps the figures (and the released calibrations)
            values = values[:: values.numel() // 2_000_000 + 1]
        q = quartiles(values)
        refs.append((float(q[1]), max(float(q[2] - q[0]), MIN_IQR)))
    return refs


def tissue_deviation(x, probs, brain, direction: str = "bright", min_probability: float = 0.2):
    """(N,S,S) deviation of each brain voxel of ``x`` from the classes it may belong to (module
    docstring); 0 outside ``brain``. A voxel none of whose candidate classes has a reference
    (too few voxels) is scored against the whole brain's median and IQR."""
    import torch
    refs = class_references(x, probs, brain)
    inside = x[brain].float()
    if inside.numel() >= MIN_CLASS_VOXELS:
        q = quartiles(inside[:: max(1, inside.numel() // 2_000_000)])
        whole = (float(q[1]), max(float(q[2] - q[0]), MIN_IQR))
    else:
        whole = (0.5, 0.25)
    top = probs.argmax(1)
    best = torch.full_like(x, float("inf"))
    for c, ref in enumerate(refs):
        if ref is None:
            continue
        z = (x - ref[0]) / ref[1]
        z = {"bright": z.clamp_min(0), "dark": (-z).clamp_min(0), "both": z.abs()}[direction]
        candidate = (probs[:, c] >= min_probability) | (top == c)
        best = torch.where(candidate, torch.minimum(best, z), best)
    z = (x - whole[0]) / whole[1]
    fallback = {"bright": z.clamp_min(0), "dark": (-z).clamp_min(0), "both": z.abs()}[direction]
    best = torch.where(torch.isinf(best), fallback, best)
    return best * brain


DETECTOR = AnatomyDetector()
