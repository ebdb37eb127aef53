"""One fused map from several detectors, each in its healthy anomaly levels.

A fused model package holds no network: it names component maps of other installed
packages (a model and one of its methods each, pinned by one SHA-256 over the component's
weights and model.json) and a rule. Each component scores the volume on its own terms (its
resolution, its 3D smoothing, the exact way back to the input grid); its map is divided by its own
0.01 % healthy threshold (:mod:`anomaly_localizer.core.levels`), so every component is in
the same unit, "times the rarest healthy level"; the rule combines them voxel by voxel:

- ``mean``: the mean of the component levels (a voxel must look anomalous to several);
- ``max``: the highest level (any one detector suffices);
- ``weighted``: a weighted mean with each component's ``weight`` (written by hand in
  model.json; ``fuse`` chooses between mean and max).

The fused package is calibrated on healthy subjects like any other, so its threshold and
levels mean what every other map's mean. Every component map is kept in the results (one
click away in Slicer). Slice score ``fused``: the mean of the slice's highest fused values
over about 80 mm^2 (20 pixels at 2 mm), whatever the input's resolution, or, when the package
names a ``slice_score``, the weighted mean of some components' own slice scores, each in units
of its healthy spread (:func:`anomaly_localizer.core.fusion.standardised_slice_scores`): a
map's hottest area is not always what ranks slices best (a VAE's ELBO weighs a whole slice).
Built and chosen by
``anomaly-localizer fuse`` (:mod:`anomaly_localizer.tooling.release.fusion`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import Field, model_validator

from ..fusion import TOP_AREA_MM2
from ..schema import Strict
from .base import Detector


class Component(Strict):
    model: Annotated[str, Field(min_length=1, max_length=500)]
    method: Annotated[str, Field(min_length=1, max_length=50)]
    content_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]  # core.fusion.content_sha256
    weight: Annotated[float, Field(gt=0, le=100)] = 1.0


class SliceScorePart(Strict):
    model: Annotated[str, Field(min_length=1, max_length=500)]  # one of the components' models
    score: Annotated[str, Field(min_length=1, max_length=50)]  # one of that model's slice scores
    weight: Annotated[float, Field(gt=0, le=100)] = 1.0


class FusedSliceScore(Strict):
    """The fused slice score as a weighted mean of standardised component slice scores."""

    parts: Annotated[list[SliceScorePart], Field(min_length=1, max_length=6)]


class FusionArchitecture(Strict):
    type: Literal["fusion"] = "fusion"
    rule: Literal["mean", "max", "weighted"] = "mean"
    components: Annotated[list[Component], Field(min_length=1, max_length=12)]
    slice_score: Optional[FusedSliceScore] = None  # None: the fused map's top area

    @model_validator(mode="after")
    def _distinct(self) -> "FusionArchitecture":
        methods = [c.method for c in self.components]
        if len(set(methods)) != len(methods):
            raise ValueError(f"a method may appear once among the components (got {', '.join(methods)})")
        if "fused" in methods:
            raise ValueError("a fused map cannot be its own component")
        models = {c.model for c in self.components}
        for part in self.slice_score.parts if self.slice_score else []:
            if part.model not in models:
                raise ValueError(f"slice_score names {part.model}, which is not one of the components "
                                 f"({', '.join(sorted(models))})")
        return self


class FusedDetector(Detector):
    name = "fused"
    order = 5  # listed first: it is the default map
    types = ("fusion",)
    methods = ("fused",)
    composite = True
    has_weights = False
    method_help = {"fused": "the default map: several detectors' maps, each in healthy anomaly levels, combined "
                            "by the model's rule (summary.json says which)"}
    slice_scores = ("fused",)
    volume_score_meaning = "mean fused slice score (its top fused levels) of the 10 % most anomalous brain slices"
    architecture = FusionArchitecture
    example_model = "a fused model (e.g. brain-t1-fused)"

    def methods_of(self, meta: dict[str, Any]) -> tuple[str, ...]:
        comps = meta.get("architecture", {}).get("components", [])
        return ("fused",) + tuple(c.get("method") for c in comps if isinstance(c, dict))

    def describe(self, meta: dict[str, Any]) -> list[str]:
        arch = meta["architecture"]
        parts = ", ".join(f"`{c['method']}` of {c['model']}" + (f" (weight {c['weight']:g})" if arch["rule"] ==
                                                                 "weighted" else "") for c in arch["components"])
        chosen = meta.get("training", {}).get("selection", "")
        return [f"- Components, each in its healthy anomaly levels (raw score / its 0.01 % healthy threshold): "
                f"{parts}.",
                f"- Rule: {arch['rule']} of the component levels, voxel by voxel. {chosen[:1].upper()}{chosen[1:]}."
                if chosen else f"- Rule: {arch['rule']} of the component levels, voxel by voxel.",
                f"- Slice score: {slice_score_text(arch)}."]

    def build_network(self, architecture: dict[str, Any]):
        raise ValueError("a fused model has no network of its own")


def slice_score_text(arch: dict[str, Any]) -> str:
    """What a fused package's slice score is, in words (model card, summary)."""
    parts = (arch.get("slice_score") or {}).get("parts")
    if not parts:
        return f"the mean of the slice's highest fused values over {TOP_AREA_MM2:g} mm^2"
    total = sum(p.get("weight", 1.0) for p in parts)
    terms = " + ".join(f"{p.get('weight', 1.0) / total:.2g} x `{p['score']}` of {p['model']}" for p in parts)
    return (f"{'the' if len(parts) == 1 else 'a weighted mean of'} components' own slice scores, each in units of "
            f"its healthy spread ((score - healthy median) / (healthy 99th percentile - median)): {terms}")


DETECTOR = FusedDetector()
