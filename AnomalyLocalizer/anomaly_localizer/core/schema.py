"""The declared schema of a model package's JSON files (pydantic), with sane bounds.

``manifest.json`` and the shared blocks of ``model.json`` (input contract, calibration, 3D
smoothing) are declared here; the ``architecture`` block and a family's own settings (e.g.
``restoration``, ``lsr``) are declared by the detector family that reads them
(:mod:`anomaly_localizer.core.detectors`). A package is validated when it is loaded, so
a wrong type, an absurd size (a layer of 200,000 feature maps, a smoothing of 10 km) or a
NaN threshold is refused with one line naming the field, before anything is allocated.

Free-form documentation (summary, description, data statement, provenance, training
record, ...) is kept as it is.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Optional

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

PACKAGE_FORMAT = "anomaly-localizer-model/1"

Finite = Annotated[float, Field(allow_inf_nan=False)]
Rate = Annotated[float, Field(gt=0.0, lt=1.0)]
SliceSize = Annotated[int, Field(ge=8, le=1024)]
Channels = Annotated[int, Field(ge=1, le=4096)]


class _Block(BaseModel):
    """A validated JSON block: typed attributes, and read-only item access by the JSON key
    (``block["pixel"]``, ``block.get("curve")``) for code that reads it like the file."""

    def __getitem__(self, key: str) -> Any:
        for name, f in type(self).model_fields.items():
            if key in (name, f.alias):
                return getattr(self, name)
        extra = self.__pydantic_extra__ or {}
        if key in extra:
            return extra[key]
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            value = self[key]
        except KeyError:
            return default
        return default if value is None else value

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None


class Strict(_Block):
    """Blocks whose keys are all known: a misspelt key is an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Open(_Block):
    """Blocks that may carry records beside the known keys (e.g. a tuning's selection curves)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


# ----------------------------------------------------------------------------- manifest

class Manifest(Strict):
    format: str
    files: dict[Annotated[str, Field(min_length=1, max_length=255)], Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]]

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        if v != PACKAGE_FORMAT:
            raise ValueError(f"unknown package format {v!r} (this engine reads {PACKAGE_FORMAT}); "
                             "update AnomalyLocalizer or re-export the model")
        return v


# ------------------------------------------------------------------------ input contract

class HistogramStandard(Strict):
    """Histogram standardisation (Nyul & Udupa) after the median/IQR scaling: the brain's
    ``percentiles`` are mapped piecewise linearly onto ``values``, the training scans' mean
    landmarks (linear beyond the ends, so nothing is clipped)."""

    percentiles: Annotated[list[Annotated[float, Field(ge=0.0, le=100.0)]], Field(min_length=3, max_length=101)]
    values: list[Finite]

    @model_validator(mode="after")
    def _increasing(self) -> "HistogramStandard":
        if len(self.values) != len(self.percentiles):
            raise ValueError("percentiles and values must have the same length")
        if any(b <= a for a, b in zip(self.percentiles, self.percentiles[1:])) or \
                any(b <= a for a, b in zip(self.values, self.values[1:])):
            raise ValueError("percentiles and values must be strictly increasing")
        return self


class Normalisation(Strict):
    """Robust per-volume scaling inside a region (see :func:`core.volume.normalise_intensities`)."""

    method: Literal["brain_median_iqr"] = "brain_median_iqr"
    median_to: Annotated[float, Field(ge=-10.0, le=10.0)] = 0.5
    iqr_to: Annotated[float, Field(gt=0.0, le=10.0)] = 0.25
    background: Annotated[float, Field(ge=-10.0, le=10.0)] = 0.0
    region: Literal["brain", "head"] = "brain"
    standard: Optional[HistogramStandard] = None


class InputContract(Strict):
    """What a model expects: axial slices of ``slice_size`` pixels of ``spacing_mm``, each
    with ``context_slices`` neighbouring slices as channels (1 = the slice alone)."""

    modality: str = "T1w"
    #: the contrast of each input the model reads, in input order (:mod:`.contrast`); a model
    #: of several inputs says which it can work without (``optional_contrasts``)
    contrasts: Annotated[list[Literal["t1", "t1c", "t2", "flair", "pd"]], Field(min_length=1, max_length=5)] = ["t1"]
    optional_contrasts: list[Literal["t1", "t1c", "t2", "flair", "pd"]] = []
    orientation: Literal["axial"] = "axial"
    slice_size: SliceSize
    spacing_mm: Annotated[float, Field(ge=0.1, le=20.0)]
    normalisation: Normalisation = Normalisation()
    context_slices: Annotated[int, Field(ge=1, le=9)] = 1

    @model_validator(mode="after")
    def _contrasts(self) -> "InputContract":
        if len(set(self.contrasts)) != len(self.contrasts):
            raise ValueError("contrasts must not repeat")
        if set(self.optional_contrasts) - set(self.contrasts):
            raise ValueError("optional_contrasts must be some of contrasts")
        if set(self.optional_contrasts) == set(self.contrasts):
            raise ValueError("at least one of contrasts must be required (not in optional_contrasts)")
        return self

    @field_validator("context_slices")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("must be odd (the slice and as many neighbours on each side)")
        return v


# --------------------------------------------------------------------------- calibration

class ThresholdEntry(Strict):
    fpr: Rate
    value: Finite


class FprCurve(Strict):
    fpr: list[Rate]
    values: list[Finite]

    @model_validator(mode="after")
    def _same_length(self) -> "FprCurve":
        if len(self.fpr) != len(self.values) or not self.fpr:
            raise ValueError("fpr and values must be non-empty lists of the same length")
        return self


class PixelCalibration(Strict):
    n_subjects: Annotated[int, Field(ge=0)] = 0
    n_voxels: Annotated[int, Field(ge=0)] = 0
    thresholds: list[ThresholdEntry] = []
    curve: Optional[FprCurve] = None


class Quantiles(Strict):
    levels: list[Annotated[float, Field(ge=0.0, le=100.0)]]
    values: list[Finite]

    @model_validator(mode="after")
    def _same_length(self) -> "Quantiles":
        if len(self.levels) != len(self.values) or not self.levels:
            raise ValueError("levels and values must be non-empty lists of the same length")
        return self


class VolumeCalibration(Strict):
    values: list[Finite] = []


Share = Annotated[float, Field(ge=0.0, le=1.0)]


class FindingRule(Strict):
    """Which regions of a map's segmentation are findings (:mod:`core.findings`): volume or
    peak level unlikely on a healthy brain, chosen on the calibration scans at the default
    threshold, with what it did there."""

    min_volume_ml: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
    min_peak_level: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
    false_finding_rate: Rate
    n_subjects: Annotated[int, Field(ge=1)]
    threshold_level: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 1.0
    enough_scans: Optional[bool] = None  # enough calibration scans for the rate (else the bounds are maxima)
    scans_with_region: Optional[Share] = None
    scans_with_finding: Optional[Share] = None
    regions_per_scan: Optional[Annotated[float, Field(ge=0.0)]] = None
    findings_per_scan: Optional[Annotated[float, Field(ge=0.0)]] = None


class Calibration(Strict):
    """Healthy thresholds per pixel method, healthy quantiles per slice score, and the
    finding rule per pixel method."""

    default_fpr: Rate = 0.001
    subjects: list[str] = []
    pixel: dict[str, PixelCalibration] = {}
    slice: dict[str, Quantiles] = {}
    volume: Optional[VolumeCalibration] = None
    # per scan-relative method (:mod:`core.relative`): each healthy calibration scan's own
    # reference value (its map's brain quantile before dividing), sorted
    scan_reference: dict[str, list[Finite]] = {}
    findings: dict[str, FindingRule] = {}
    date: Optional[str] = None


# ---------------------------------------------------------------------------- smoothing

class Smoothing(Strict):
    """Gaussian sigma of a heatmap's 3D smoothing, in mm (:mod:`core.smoothing`)."""

    through_plane_mm: Annotated[float, Field(ge=0.0, le=50.0)] = 0.0
    in_plane_mm: Annotated[float, Field(ge=0.0, le=50.0)] = 0.0


class MapSmoothing(Open):
    """``{method: Smoothing, ..., "selection": record of how the widths were chosen}``."""

    __pydantic_extra__: dict[str, Smoothing]
    selection: Optional[dict[str, Any]] = None


# ------------------------------------------------------------------------ scan-relative

class RelativeTo(Strict):
    """A map divided by its own brain quantile on each scan (:mod:`core.relative`)."""

    quantile: Annotated[float, Field(ge=0.05, le=0.95)] = 0.5


class ScanRelative(Open):
    """``{method: RelativeTo, ..., "selection": record of how the choice was made}``."""

    __pydantic_extra__: dict[str, RelativeTo]
    selection: Optional[dict[str, Any]] = None


# --------------------------------------------------------------------------- model.json

class ArchitectureType(Open):
    type: str


class ModelMeta(Open):
    """The shared part of model.json. ``architecture`` and family settings are validated by
    the family (:func:`validate_meta`)."""

    name: Optional[Annotated[str, Field(min_length=1, max_length=200)]] = None
    summary: str = ""
    description: str = ""
    architecture: ArchitectureType
    input_contract: InputContract
    calibration: Calibration = Calibration()
    map_smoothing: Optional[MapSmoothing] = None
    scan_relative: Optional[ScanRelative] = None
    recommended_method: Optional[str] = None
    weights_dtype: Literal["float16", "float32"] = "float32"
    provenance: dict[str, Any] = {}
    training: dict[str, Any] = {}


def validation_message(exc: ValidationError, prefix: str = "") -> str:
    """The first problem of a pydantic error as 'field a.b.0: what is wrong' (under ``prefix``)."""
    err = exc.errors()[0]
    where = ".".join([prefix] * bool(prefix) + [str(p) for p in err["loc"]]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"field {where}: {msg}{more}"


def finite_or_none(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else None."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


class UNetArchitecture(Strict):
    """The brain extraction U-Net (:class:`core.models.unet.UNet2D`)."""

    type: Literal["unet-brainmask"] = "unet-brainmask"
    slice_size: SliceSize = 128
    feature_maps: Annotated[list[Channels], Field(min_length=1, max_length=8)] = [8, 16, 32, 64]

    @model_validator(mode="after")
    def _divisible(self) -> "UNetArchitecture":
        if self.slice_size % (2 ** (len(self.feature_maps) - 1)):
            raise ValueError(f"slice_size {self.slice_size} is not divisible by 2**{len(self.feature_maps) - 1}")
        return self
