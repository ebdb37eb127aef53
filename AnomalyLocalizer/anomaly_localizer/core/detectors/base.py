"""The one interface every detector family implements.

A detector family turns a trained network and a prepared volume (the model's axial slices,
:class:`anomaly_localizer.core.volume.PreparedVolume`) into pixel maps and slice scores in
model space. Everything around it is shared and needs no edit when a family is added: the
volume pipeline (reorientation, normalisation, the exact way back to the input grid), the
3D smoothing, calibration into healthy anomaly levels, the command line, evaluation, model
cards and the Slicer module all ask the registry (:mod:`anomaly_localizer.core.detectors`)
what a family offers.

A family module must not import torch (or anything heavy) when it is imported: the
registry is read to list models, e.g. in Slicer before PyTorch is installed. Import it
inside :meth:`Detector.build_network` and :meth:`Detector.score`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from pydantic import BaseModel

ProgressFn = Callable[[float, str], None]


@dataclass
class ScoringContext:
    """How to run: the torch device, an optional batch size, progress (fraction 0..1 of the
    scoring work, message), a cancel callback, and whether the networks run under bf16
    autocast (:func:`run_in_batches`; families that need input gradients stay float32).
    ``guides``: for a model that reads several contrasts of a study, the other contrasts'
    prepared volumes on the same model slices, by contrast (the scored one is ``prepared``)."""

    device: Any
    batch_size: int | None = None
    progress: ProgressFn | None = None
    cancel: Callable[[], bool] | None = None
    bf16: bool = False
    guides: dict[str, Any] = field(default_factory=dict)

    def report(self, fraction: float, message: str) -> None:
        if self.progress is not None:
            self.progress(min(1.0, max(0.0, fraction)), message)


@dataclass
class DetectorOutput:
    """Model-space results of one volume: maps (N,S,S) tensors per method, slice scores (N,)
    tensors per name, and what the family wants recorded (``info``) and timed."""

    maps: dict[str, Any]
    slice_scores: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


class Detector:
    """A detector family. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    #: architecture "type" values in model.json this family scores
    types: ClassVar[tuple[str, ...]]
    #: pixel methods, in display order
    methods: ClassVar[tuple[str, ...]]
    #: methods offered but computed only when asked for (slow), unless recommended
    opt_in: ClassVar[tuple[str, ...]] = ()
    #: one line per method for help texts and model cards
    method_help: ClassVar[dict[str, str]] = {}
    #: slice scores the family yields; the first is the one slices are ranked by
    slice_scores: ClassVar[tuple[str, ...]]
    #: what the volume score (mean of the top 10 % of the primary slice score) means
    volume_score_meaning: ClassVar[str]
    #: pydantic model of the "architecture" block
    architecture: ClassVar[type[BaseModel]]
    #: pydantic models of the family's own top-level model.json blocks (e.g. "restoration")
    settings: ClassVar[dict[str, type[BaseModel]]] = {}
    #: the model kind a user needs for these methods, for advice in messages
    example_model: ClassVar[str] = ""
    #: a family that combines other packages' maps on the input grid (no network of its own)
    composite: ClassVar[bool] = False
    #: whether scoring uses the study's other contrasts the model reads (``ScoringContext.guides``)
    uses_guides: ClassVar[bool] = False
    #: whether the package holds weights (model.safetensors)
    has_weights: ClassVar[bool] = True

    def methods_of(self, meta: dict[str, Any]) -> tuple[str, ...]:
        """The pixel methods a package of this family offers (by default the family's)."""
        return self.methods

    @property
    def primary_slice_score(self) -> str:
        return self.slice_scores[0]

    def build_network(self, architecture: dict[str, Any]):
        """An untrained torch module for a validated architecture block."""
        raise NotImplementedError

    def score(self, net, prepared, package, methods: list[str], ctx: ScoringContext) -> DetectorOutput:
        """Maps and slice scores of ``prepared`` (all brain slices of one volume) for ``methods``."""
        raise NotImplementedError

    def describe(self, meta: dict[str, Any]) -> list[str]:
        """Markdown bullets for the model card: architecture, scoring settings, training schedule."""
        arch = {k: v for k, v in meta["architecture"].items() if k != "type"}
        training = meta.get("training", {})
        return [f"- Architecture: {meta['architecture']['type']} {arch}.",
                f"- Training: {', '.join(f'{k} {v}' for k, v in training.items() if not isinstance(v, (dict, list)))}."]


def run_in_batches(fn: Callable[[Any], Any], x: Any, ctx: ScoringContext, batch: int, verb: str) -> Any:
    """``fn`` over ``x`` (N, ...) in batches on ``ctx.device`` without gradients, results on
    the CPU in float32 and concatenated; cancel checked and progress reported per batch.
    With ``ctx.bf16``, under bf16 autocast with channels-last batches (fast only where the
    CPU has bf16 matrix instructions; ``benchmark --bf16`` and ``evaluate --bf16`` measure it)."""
    import contextlib

    import torch

    from ...errors import CancelledError

    n, out = x.shape[0], []
    precision = torch.autocast(device_type=torch.device(ctx.device).type, dtype=torch.bfloat16) if ctx.bf16 \
        else contextlib.nullcontext()
    with torch.no_grad(), precision:
        for s in range(0, n, batch):
            if ctx.cancel is not None and ctx.cancel():
                raise CancelledError("cancelled by the user")
            b = x[s:s + batch].to(ctx.device)
            if ctx.bf16 and b.dim() == 4:
                b = b.contiguous(memory_format=torch.channels_last)
            out.append(fn(b).float().cpu())
            ctx.report(min(n, s + batch) / n, f"{verb} {min(n, s + batch)}/{n} slices")
    return torch.cat(out)

