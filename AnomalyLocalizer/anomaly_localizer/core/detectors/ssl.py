"""Self-supervised anomaly segmentation: a U-Net that learned where a healthy slice was changed.

Trained on healthy slices into which synthetic anomalies were inserted (blended patches of
other subjects, intensity changes, blur, deformations, on random shapes with soft edges;
:mod:`anomaly_localizer.tooling.training.ssl_tasks`), the network predicts, per pixel of the middle
slice, how strongly the image departs from what it would be. The strongest brain entries of
the MOOD challenge work this way (Tan et al. 2020; Naval Marimont & Tarroni 2022); choosing
the checkpoint on tasks held out of training follows Baugh et al. (MICCAI 2023).

Pixel score ``ssl``: the predicted probability inside the brain, averaged with the prediction
of the left-right mirrored slice (``flip``, the brain's symmetry: halves the network's
position-bound errors), then the package's 3D smoothing like every map. A package may hold
several folds (``architecture.folds``; Baugh et al.'s leave-tasks-out folds, each trained on
some task families and chosen on the others): their probabilities are averaged, each fold
run once, and with ``flip`` every other fold sees the mirrored slice, so an ensemble of two
costs what one fold with flip costs. Slice score ``ssl``:
the mean of the slice's ``slice_top_k`` highest pixel scores. Same 2.5D input as the DAE.
Training: :mod:`anomaly_localizer.tooling.training.train_ssl`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import Field

from ..schema import Strict
from .base import Detector, DetectorOutput, ScoringContext, run_in_batches
from .dae import DAEArchitecture, top_k_mean

BATCH_SLICES = 32


class SSLArchitecture(DAEArchitecture):
    type: Literal["unet-ssl"] = "unet-ssl"  # type: ignore[assignment]
    folds: Annotated[int, Field(ge=1, le=8)] = 1  # networks averaged (weights folds.<i>.*)


class SSLScoring(Strict):
    """The ``ssl`` block of model.json; keys left out take :data:`DEFAULT_SSL_SCORING`."""

    flip: Optional[bool] = None
    slice_top_k: Optional[Annotated[int, Field(ge=1, le=10000)]] = None


DEFAULT_SSL_SCORING: dict[str, Any] = {"flip": True, "slice_top_k": 20}


class SSLDetector(Detector):
    name = "ssl"
    order = 30
    types = ("unet-ssl",)
    methods = ("ssl",)
    method_help = {"ssl": "self-supervised anomaly segmentation: a U-Net trained to find synthetic anomalies "
                          "inserted into healthy slices (blended patches, intensity, blur, deformations), 2 mm, "
                          "neighbouring slices as input"}
    slice_scores = ("ssl",)
    volume_score_meaning = "mean ssl slice score (its top pixel probabilities) of the 10 % most anomalous brain slices"
    architecture = SSLArchitecture
    settings = {"ssl": SSLScoring}
    example_model = "a self-supervised model (e.g. brain-t1-ssl)"

    def describe(self, meta: dict[str, Any]) -> list[str]:
        arch, sc = meta["architecture"], {**DEFAULT_SSL_SCORING, **meta.get("ssl", {})}
        training = meta.get("training", {})
        folds = training.get("folds") or [training]
        lines = [
            f"- Architecture: 2D U-Net (feature maps {arch['feature_maps']}, GroupNorm in groups of up to "
            f"{arch['groups']}), input the slice and its neighbours ({arch['in_channels']} channels, 2.5D), output "
            "one logit per pixel of the middle slice: how strongly it was changed."
            + (f" {len(folds)} such networks (folds), trained on different task families, averaged." if len(folds) > 1
               else "")]
        for i, fold in enumerate(folds):
            lines.append(_training_line(fold, f"Fold {i + 1}" if len(folds) > 1 else "Training"))
        flip = ("; every other fold sees the mirrored slice" if len(folds) > 1 else ", averaged with the mirrored slice")
        lines.append(f"- Scoring (`ssl` in `model.json`): the predicted probability inside the brain"
                     f"{flip if sc['flip'] else ''}; slice score = mean of the slice's "
                     f"{sc['slice_top_k']} highest pixel scores.")
        return lines

    def build_network(self, architecture: dict[str, Any]):
        from ..models.unet import FoldEnsemble, UNet2D
        arch = SSLArchitecture.model_validate(architecture)

        def one():
            return UNet2D(slice_size=arch.slice_size, feature_maps=arch.feature_maps, in_channels=arch.in_channels,
                          norm="group", groups=arch.groups)
        return one() if arch.folds == 1 else FoldEnsemble([one() for _ in range(arch.folds)])

    def score(self, net, prepared, package, methods: list[str], ctx: ScoringContext) -> DetectorOutput:
        params = {**DEFAULT_SSL_SCORING, **package.settings("ssl")}
        x = prepared.with_context(package.contract.context_slices)
        probs = run_in_batches(lambda b: predict(net, b, bool(params["flip"])), x, ctx, BATCH_SLICES, "segmented")
        pixel = probs[:, 0] * prepared.mask[:, 0]
        return DetectorOutput(maps={"ssl": pixel}, slice_scores={"ssl": top_k_mean(pixel, int(params["slice_top_k"]))})


def _training_line(training: dict[str, Any], title: str) -> str:
    cfg = training.get("config", {})
    return (f"- {title}: tasks {', '.join(cfg.get('tasks', []))}; held out of training and used to choose the "
            f"checkpoint: {', '.join(cfg.get('held_out', []))}. {100 * cfg.get('healthy_share', 0):.0f} % of "
            f"training slices unchanged; 1-{cfg.get('max_anomalies')} anomalies on the others; binary cross-entropy "
            f"with soft labels inside the brain plus {cfg.get('dice_weight', 0)} x soft Dice; augmentation: "
            f"left-right flips, contrast +-{cfg.get('contrast')}, "
            f"gamma exp(+-{cfg.get('gamma')}), bias field +-{cfg.get('bias_field')}; AdamW {cfg.get('learning_rate')}, "
            f"cosine schedule, {training.get('steps_run')} steps of {cfg.get('batch_size')} slices; the checkpoint of "
            f"step {training.get('best_step')} found held-out tasks best (pixel AP {_fmt(training.get('best_val_figure'))})"
            f" ({'bf16' if training.get('bf16') else 'float32'}).")


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "?"


def predict(net, x, flip: bool):
    """(N,1,S,S) probabilities of change for stacks x (N,C,S,S): the mean over passes. One
    network: its prediction and, with ``flip``, that of the mirrored stack (mirrored back).
    Folds (:class:`~..models.unet.FoldEnsemble`): each fold once, every other fold on the
    mirrored stack when ``flip``."""
    import torch
    folds = list(getattr(net, "folds", [net]))
    if len(folds) == 1:
        passes = [(folds[0], False)] + ([(folds[0], True)] if flip else [])
    else:
        passes = [(fold, flip and i % 2 == 1) for i, fold in enumerate(folds)]
    total = None
    for fold, mirrored in passes:
        p = torch.sigmoid(fold(x.flip(-1)).float()).flip(-1) if mirrored else torch.sigmoid(fold(x).float())
        total = p if total is None else total + p
    return total / len(passes)


DETECTOR = SSLDetector()
