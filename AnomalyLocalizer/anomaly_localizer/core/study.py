"""A study: one or more co-registered scans of one patient, each with its contrast, and the
model that reads them.

The rules every interface follows (command line, screening, Python, the Slicer logic, the
browser viewer), kept here once:

- the first input is the reference: maps, masks and findings are written on its grid; a
  later input on another grid is resampled onto it through its own geometry (linear), and
  one that does not overlap it is refused;
- each input's contrast is given, read from its DICOM header, or recognised from its image
  (:mod:`.contrast`); a given contrast wins, and what the image looked like is recorded;
- without a model named, the model is the installed one that reads the contrasts given,
  using most of them (ties: the models folder's preference); a named model that reads none
  of them, or needs one the study lacks, is refused before any work, naming the model to
  use instead; inputs no model reads are recorded as unused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, PackageError
from .contrast import CONTRASTS, NAMES, ContrastEvidence, describe, from_dicom, from_image, parse_contrast
from .imageio import dicom_tags, same_grid

MIN_OVERLAP = 0.05  # a later input must cover at least this share of the first one's field of view


@dataclass
class StudyInput:
    """One scan of a study: where it came from, its image (on the reference grid once
    :func:`align` ran) and its contrast."""

    source: str
    image: sitk.Image
    evidence: ContrastEvidence | None = None
    resampled: bool = False
    overlap: float = 1.0

    @property
    def contrast(self) -> str | None:
        return self.evidence.contrast if self.evidence else None


@dataclass
class Study:
    inputs: list[StudyInput]
    notes: list[str] = field(default_factory=list)
    extracted_on: StudyInput | None = None  # the input the brain was extracted from, if it was
    extraction_s: float = 0.0  # seconds the brain extraction took

    @property
    def reference(self) -> sitk.Image:
        return self.inputs[0].image

    @property
    def contrasts(self) -> list[str]:
        return [i.contrast for i in self.inputs if i.contrast]

    def images(self) -> dict[str, sitk.Image]:
        """Each contrast's image on the reference grid (the first input of a contrast given twice)."""
        out: dict[str, sitk.Image] = {}
        for i in self.inputs:
            if i.contrast and i.contrast not in out:
                out[i.contrast] = i.image
        return out

    def record(self, used: Sequence[str] = ()) -> list[dict[str, Any]]:
        """What summary.json says of each input: source, contrast, how it was known, use."""
        return [{"input": i.source, "contrast": i.contrast,
                 **({k: v for k, v in i.evidence.as_dict().items() if k != "contrast"} if i.evidence else {}),
                 "resampled_onto_first": i.resampled, "overlap_with_first": round(i.overlap, 4),
                 "used": i.contrast in used} for i in self.inputs]


def check_given(contrasts: Sequence[str | None] | None, n_inputs: int) -> list[str | None]:
    """Given contrasts in the engine's spelling, one per input (None: recognise)."""
    if not contrasts:
        return [None] * n_inputs
    if len(contrasts) != n_inputs:
        raise InputError(f"{len(contrasts)} --contrast for {n_inputs} inputs; give one per input, in the same order, "
                         "or none to have each recognised")
    try:
        out = [parse_contrast(c) if c else None for c in contrasts]
    except ValueError as exc:
        raise InputError(f"--contrast: {exc}") from None
    return out


def overlap_fraction(reference: sitk.Image, other: sitk.Image) -> float:
    """Share of the reference's voxels that lie inside ``other``'s field of view."""
    ones = sitk.Image(other.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(other)
    covered = sitk.Resample(ones, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return float(sitk.GetArrayViewFromImage(covered).mean())


def align(study: Study) -> None:
    """Resample every later input onto the first's grid through its own geometry (linear);
    refuse one that does not overlap it."""
    ref = study.reference
    for i in study.inputs[1:]:
        if same_grid(ref, i.image):
            continue
        frac = overlap_fraction(ref, i.image)
        if frac < MIN_OVERLAP:
            raise InputError(f"input {i.source} does not overlap the first input ({100 * frac:.1f} % of its field of "
                             "view): the scans of a study must be co-registered. Register it onto the first input "
                             "(e.g. with Slicer's General Registration) and try again")
        img = sitk.Cast(i.image, sitk.sitkFloat32)
        i.image = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        i.resampled, i.overlap = True, frac
        study.notes.append(f"{i.source} was resampled onto the first input's grid (it covers {100 * frac:.0f} % of "
                           "its field of view)")


def evidence_without_image(image: sitk.Image, given: str | None) -> ContrastEvidence | None:
    """The contrast given by the user or said by a DICOM header; None when only the image can tell."""
    if given is not None:
        return ContrastEvidence(given, "given", 1.0, "given by the user")
    tags = dicom_tags(image)
    if tags:
        ev = from_dicom(tags)
        if ev is not None and ev.contrast is None and ev.confidence >= 0.9:
            raise InputError(f"the DICOM series says {ev.detail}; no model reads it. Give a T1, T1c, T2, FLAIR or PD "
                             "series, or --contrast if the header is wrong")
        if ev is not None and ev.contrast is not None:
            return ev
    return None


def recognise(study: Study, given: Sequence[str | None], brain: np.ndarray) -> None:
    """Every input's contrast: given, from its DICOM header, or from its image inside ``brain``
    (bool, the reference's array order); a given contrast also records what the image looked like."""
    spacing = study.reference.GetSpacing()[::-1]
    for inp, g in zip(study.inputs, given):
        ev = inp.evidence or evidence_without_image(inp.image, g)
        seen = from_image(sitk.GetArrayViewFromImage(inp.image), brain, spacing)
        if ev is None:
            ev = seen
        elif ev.source == "given":
            ev.looked_like = seen.contrast
            if seen.contrast and seen.contrast != ev.contrast and not {seen.contrast, ev.contrast} <= {"t1", "t1c"}:
                study.notes.append(f"{inp.source} was given as {NAMES[ev.contrast]} but looks like "
                                   f"{NAMES[seen.contrast]} ({seen.detail}); it was read as {NAMES[ev.contrast]}")
        inp.evidence = ev


def unknown_contrast_message(inp: StudyInput) -> str:
    ev = inp.evidence
    return (f"cannot tell the contrast of {inp.source}: {ev.detail if ev else 'nothing says it'}; give it with "
            f"--contrast ({', '.join(CONTRASTS)})")


# --------------------------------------------------------------------------- model choice

def reads(package, contrasts: Sequence[str]) -> tuple[bool, list[str]]:
    """Whether ``package`` can score a study of ``contrasts`` (every required contrast there,
    at least one of its contrasts used), and the contrasts it would use."""
    contract = package.contract
    used = [c for c in contract.contrasts if c in contrasts]
    required = [c for c in contract.contrasts if c not in contract.optional_contrasts]
    return bool(used) and all(c in contrasts for c in required), used


def preference() -> list[str]:
    """Model names in the models folders' order of preference (index.json "preference", then
    its "default"), most preferred first."""
    import json

    from .package import model_dirs
    out: list[str] = []
    for d in model_dirs():
        index = d / "index.json"
        if not index.is_file():
            continue
        try:
            data = json.loads(index.read_text())
        except (OSError, ValueError, RecursionError):
            continue
        if not isinstance(data, dict):
            continue
        names = data.get("preference") if isinstance(data.get("preference"), list) else []
        names = [n for n in names if isinstance(n, str)]
        if isinstance(data.get("default"), str):
            names.append(data["default"])
        out += [n for n in names if n not in out]
    return out


def choose_model(contrasts: Sequence[str], model: str | None = None, methods: Sequence[str] | None = None,
                 describe_inputs: Callable[[], str] = lambda: ""):
    """The package that scores a study of ``contrasts`` (see the module's rules)."""
    from .installed import resolve_package_for, scan_packages

    wanted = list(methods or [])
    if model is not None:
        # a package already loaded (screening resolves its model once) or a name or folder
        package = model if hasattr(model, "contract") else _anomaly_model(model, wanted)
        ok, _ = reads(package, contrasts)
        if not ok:
            accepted = _contract_text(package)
            instead = _best_installed(contrasts, wanted)
            raise InputError(f"model {package.name} reads {accepted}; this study has "
                             f"{_names(contrasts) or 'no known contrast'}{describe_inputs()}: "
                             + (f"use --model {instead.name} instead, or leave --model out"
                                if instead else "no installed model reads it") +
                             " (or give --contrast if a contrast was recognised wrongly)")
        return package
    best = _best_installed(contrasts, wanted)
    if best is None:
        good, broken = scan_packages()
        offered = sorted({c for p in good if p.detector is not None for c in p.contract.contrasts},
                         key=CONTRASTS.index)
        # a broken model may be the one that was wanted: its reason is said first
        cause = "; ".join(reason for _, reason in broken) + ". No other installed model" if broken else \
            "no installed model"
        raise PackageError(f"{cause} reads {_names(contrasts) or 'this study'}{describe_inputs()}"
                           f"{' with ' + ', '.join(wanted) if wanted else ''}; the installed models read "
                           f"{_names(offered) or 'nothing'}. Give --contrast if the contrast was recognised wrongly, "
                           "or install a model for it (README, 'Models')")
    best.check_components()
    return best


def _anomaly_model(model: str, wanted: list[str]):
    """The package ``model`` names, refused when it is not an anomaly model (e.g. the brain
    extraction model)."""
    from .installed import resolve_package_for

    package = resolve_package_for(wanted or None, model)  # methods asked for: "does not offer" says it
    if package.detector is None:
        raise InputError(f"model {package.name} is a {package.arch_type} model (brain extraction), not an anomaly model; "
                         "choose another --model (anomaly-localizer models lists them) or leave --model out")
    return package


def _best_installed(contrasts: Sequence[str], methods: Sequence[str]):
    from .installed import scan_packages

    good, _ = scan_packages()
    order = preference()
    rank = {n: i for i, n in enumerate(order)}
    usable = []
    for p in good:
        if p.detector is None:
            continue
        if methods and not all(m in p.methods for m in methods):
            continue
        if methods and p.detector.composite and not any(m in p.detector.methods for m in methods):
            continue  # a fused model's component maps, asked for alone, come from their own models
        ok, used = reads(p, contrasts)
        if ok:
            usable.append((-len(used), rank.get(p.name, len(order)), p.name, p))
    return min(usable, key=lambda t: t[:3])[3] if usable else None


def _names(contrasts: Sequence[str]) -> str:
    return " + ".join(NAMES[c].split(" (")[0] for c in contrasts)


def _contract_text(package) -> str:
    c = package.contract
    if len(c.contrasts) == 1:
        return f"{NAMES[c.contrasts[0]].split(' (')[0]} only"
    optional = set(c.optional_contrasts)
    return " + ".join(NAMES[x].split(" (")[0] + (" (optional)" if x in optional else "") for x in c.contrasts)


def inputs_text(study: Study) -> str:
    """' (a.nii.gz looks like FLAIR (80 % sure: ...); ...)' for messages."""
    parts = [f"{i.source} {describe(i.evidence)}" for i in study.inputs if i.evidence]
    return f" ({'; '.join(parts)})" if parts else ""


EXTRACTION_CONTRASTS = ("t1", "t1c")  # what the brain extraction models read (trained on T1)


def check_extraction(study: Study) -> None:
    """Refuse a brain extracted from an input the extraction model does not read."""
    target = study.extracted_on
    if target is not None and target.contrast not in EXTRACTION_CONTRASTS:
        raise InputError(f"{target.source} is {NAMES.get(target.contrast or '', 'of unknown contrast')} and not "
                         "skull-stripped, and brain extraction reads T1 only; give a brain mask (--mask), a "
                         "skull-stripped scan, or add the study's T1 as an input")
