"""MRI contrasts: their names, and how an input's contrast is known.

Every model reads named contrasts (its input contract's ``contrasts``) and every input has
one. A contrast is known, in this order of trust:

1. given by the user (``--contrast``, a selector in Slicer or the viewer): the user's word
   wins, and what the image looked like is still recorded beside it;
2. from a DICOM series' header (:func:`from_dicom`): series description and protocol name,
   then the sequence (inversion, repetition and echo times, scanning sequence, contrast agent);
3. from the image itself (:func:`from_image`): the order of CSF, grey and white matter
   intensities in the brain. CSF is the dark tail of a T1 or FLAIR brain and the bright tail
   of a T2's; grey matter lies near the brain's surface and white matter deep, so whether the
   bright tissue is superficial or deep tells FLAIR (grey above white) from T1 (white above
   grey). An image cannot tell T1 from T1c (enhancement is small), nor PD reliably: those are
   said, never guessed, and a scan whose features are ambiguous is refused with advice.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

# In the order contracts list them; "pd" is proton density.
CONTRASTS = ("t1", "t1c", "t2", "flair", "pd")
NAMES = {"t1": "T1", "t1c": "T1c (post-contrast T1)", "t2": "T2", "flair": "FLAIR", "pd": "PD"}
SOURCES = ("given", "dicom", "image")


@dataclass
class ContrastEvidence:
    """An input's contrast and how it was known.

    ``source``: "given" (by the user), "dicom" (header) or "image" (intensities);
    ``confidence``: 0..1, how sure the recognition is (1.0 for a given contrast);
    ``detail``: what the decision rests on, in words; ``looked_like``: for a given contrast,
    what the image itself looked like (None when it could not tell or was not looked at).
    """

    contrast: str | None
    source: str
    confidence: float
    detail: str
    looked_like: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_contrast(value: str) -> str:
    """A contrast name as users write it (T1, t1c, T1-Gd, T2w, FLAIR, PD) in the engine's
    spelling; ValueError for anything else."""
    v = re.sub(r"[\s_\-]+", "", str(value).strip().lower())
    aliases = {"t1": "t1", "t1w": "t1", "t1c": "t1c", "t1ce": "t1c", "t1gd": "t1c", "t1post": "t1c",
               "t1contrast": "t1c", "t1wce": "t1c", "t2": "t2", "t2w": "t2", "flair": "flair", "t2flair": "flair",
               "pd": "pd", "pdw": "pd"}
    if v not in aliases:
        raise ValueError(f"unknown contrast {value!r}; choose from {', '.join(CONTRASTS)}")
    return aliases[v]


# ----------------------------------------------------------------------------- DICOM

# Series description / protocol name keywords, most specific first.
_DESCRIPTION_RULES = (
    (re.compile(r"flair|\bdark[ _-]?fluid|\bt2[ _-]?fl", re.I), "flair"),
    (re.compile(r"(t1|mprage|spgr|bravo|tfe|vibe).*(\+c|gd|gad|post|contrast|\bce\b|_ce|enh)|"
                r"(\+c|gd|gad|post[ _-]?contrast|\bce\b).*(t1|mprage|spgr|bravo)", re.I), "t1c"),
    (re.compile(r"\bpd\b|proton[ _-]?dens|_pd|pd_|pdw", re.I), "pd"),
    (re.compile(r"t2(?!\*)|t2w|\bt2[ _-]", re.I), "t2"),
    (re.compile(r"t1|mprage|spgr|bravo|\bflash\b|\btfe\b|mp2rage", re.I), "t1"),
)
# Header fields that mean a T2*-weighted, diffusion or other sequence no model reads
_NOT_STRUCTURAL = re.compile(r"\bdwi\b|diffusion|\badc\b|\bswi\b|t2\*|t2star|\bgre\b.*t2|perfusion|\bdti\b|\bbold\b",
                             re.I)


def _number(tags: Mapping[str, Any], *keys: str) -> float | None:
    for k in keys:
        v = tags.get(k)
        if v is None or v == "":
            continue
        try:
            return float(str(v).split("\\")[0])
        except ValueError:
            continue
    return None


def from_dicom(tags: Mapping[str, Any]) -> ContrastEvidence | None:
    """The contrast a DICOM series' header says, or None when it does not say.

    ``tags``: header values by keyword (``SeriesDescription``, ``ProtocolName``,
    ``SequenceName``, ``ScanningSequence``, ``SequenceVariant``, ``RepetitionTime``,
    ``EchoTime``, ``InversionTime``, ``ContrastBolusAgent``) or by their ``gggg|eeee`` tags.
    """
    t = {**{KEYWORDS.get(k, k): v for k, v in tags.items()}}
    text = " ".join(str(t.get(k) or "") for k in ("SeriesDescription", "ProtocolName", "SequenceName")).strip()
    agent = str(t.get("ContrastBolusAgent") or "").strip()
    if text and _NOT_STRUCTURAL.search(text):
        return ContrastEvidence(None, "dicom", 0.9, f"the series is not a structural scan ({text!r})")
    for pattern, contrast in _DESCRIPTION_RULES:
        if text and pattern.search(text):
            if contrast == "t1" and agent:
                contrast = "t1c"
            why = f"series description {text!r}" + (f" and contrast agent {agent!r}" if agent else "")
            return ContrastEvidence(contrast, "dicom", 0.9, why)
    tr = _number(t, "RepetitionTime")
    te = _number(t, "EchoTime")
    ti = _number(t, "InversionTime")
    seq = str(t.get("ScanningSequence") or "") + " " + str(t.get("SequenceVariant") or "")
    if tr is None or te is None:
        return None
    times = f"TR {tr:g} ms, TE {te:g} ms" + (f", TI {ti:g} ms" if ti else "")
    if ti and ti >= 1500 and te >= 60:
        contrast = "flair"  # long inversion nulls CSF, long echo gives T2 weighting
    elif ti and 300 <= ti < 1500 and te < 20:
        contrast = "t1"  # MPRAGE / IR-prepared gradient echo
    elif te >= 60 and tr >= 1500:
        contrast = "t2"
    elif te < 30 and tr < 1000:
        contrast = "t1"
    elif te < 40 and tr >= 1500:
        contrast = "pd"
    else:
        return ContrastEvidence(None, "dicom", 0.3, f"the sequence times ({times}) fit no contrast well")
    if contrast == "t1" and agent:
        contrast = "t1c"
    return ContrastEvidence(contrast, "dicom", 0.75, f"sequence times ({times}{', ' + seq.strip() if seq.strip() else ''})"
                            + (f" and contrast agent {agent!r}" if agent else ""))


def contrast_from_name(text: str) -> str | None:
    """The contrast a scan's name says ("T1_mprage", "sub-01_FLAIR", "3: AX T2 FLAIR",
    "BraTS_001_t1ce"), or None when it says none or names a scan no model reads (DWI, T2*).

    The rules are :func:`from_dicom`'s for a series description, and before them the words
    of the name that are themselves a contrast's name (:func:`parse_contrast`; BIDS suffixes
    such as "T1w" and "FLAIR", BraTS's "t1ce"): one such word is believed, unless it is a
    plain "T1" that the description rules call post-contrast ("T1 post Gd"); several different
    ones ("AX T2 FLAIR") are settled by the description rules, most specific first. A name is
    weaker evidence than a header: interfaces use it to suggest which input is which, and the
    user's choice is then the given contrast.
    """
    text = str(text or "").strip()
    if not text or _NOT_STRUCTURAL.search(text):
        return None
    words = set()
    for token in re.split(r"[\s_.:;,()\[\]/\\]+", text):
        try:
            words.add(parse_contrast(token))
        except ValueError:
            continue
    # "patient1", "test1": a lower-case word ending in t and a digit is not a T1 or T2, as it
    # is in "sagT1" or "ax_t1" (series descriptions seldom have such words; names often do)
    plain = re.sub(r"(?<=[a-z])t(?=[12])", "_", text)
    described = next((c for pattern, c in _DESCRIPTION_RULES if pattern.search(plain)), None)
    if len(words) == 1:
        word = words.pop()
        return described if word == "t1" and described == "t1c" else word
    return described


# DICOM tags as SimpleITK's readers name them
KEYWORDS = {"0008|103e": "SeriesDescription", "0018|1030": "ProtocolName", "0018|0024": "SequenceName",
            "0018|0020": "ScanningSequence", "0018|0021": "SequenceVariant", "0018|0080": "RepetitionTime",
            "0018|0081": "EchoTime", "0018|0082": "InversionTime", "0018|0010": "ContrastBolusAgent"}


# ----------------------------------------------------------------------------- image

# Decision limits of :func:`image_features`, set on real T1 (IXI), real FLAIR and T1c (BraTS)
# and rendered FLAIR, T2 and T1c scans (docs/contrasts.md, `evaluate-contrast-recognition`).
BRIGHT_SURFACE = 0.5  # brain surface (0-2 mm) this many IQRs above the median: bright CSF, T2
DARK_SURFACE = -0.3  # below this: dark CSF (T1, T1c, FLAIR)
RISE_T1 = 0.18  # deep white matter (13-16 mm) this many IQRs above the cortex (4-6 mm): T1-like
RISE_FLAIR = 0.15  # at most this: grey matter as bright as or brighter than white, FLAIR
DEPTH_BINS_MM = ((0.0, 2.0), (4.0, 6.0), (13.0, 16.0))


def image_features(arr: np.ndarray, mask: np.ndarray, spacing_zyx=(1.0, 1.0, 1.0)) -> dict[str, float]:
    """How intensity changes with depth in a brain (arrays in the same order, ``mask`` bool),
    in units of the brain's inter-quartile range from its median:

    ``surface``: the median of the outer 2 mm (sulcal CSF and cortex), high when CSF is
    bright (T2), low when dark (T1, T1c, FLAIR);
    ``rise``: the median at 13-16 mm deep (mostly white matter) minus that at 4-6 mm
    (mostly cortex): white above grey on T1 and T1c, about equal or below on FLAIR and T2.
    Medians of shells keep a lesion, which takes a small share of any shell, from moving them.
    """
    import SimpleITK as sitk

    v = arr[mask].astype(np.float64)
    q25, med, q75 = np.percentile(v, [25, 50, 75])
    iqr = max(q75 - q25, 1e-9)
    # The distance map on the brain's bounding box grown by one voxel (within the image): the
    # same depths as on the whole grid (a brain voxel's nearest background voxel is never
    # beyond that border) and 3-4 times faster on a whole-head grid.
    from .regions import bounding_box
    box = bounding_box(mask, margin=1)
    inner = mask[box]
    m = sitk.GetImageFromArray(inner.astype(np.uint8))
    m.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    depth = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(m, insideIsPositive=True, squaredDistance=False,
                                                                useImageSpacing=True))[inner]
    shells = []
    for lo, hi in DEPTH_BINS_MM:
        inside = (depth >= lo) & (depth < hi)
        shells.append(float((np.median(v[inside]) - med) / iqr) if inside.sum() >= 50 else float("nan"))
    return {"surface": shells[0], "rise": shells[2] - shells[1]}


def from_image(arr: np.ndarray, mask: np.ndarray, spacing_zyx=(1.0, 1.0, 1.0)) -> ContrastEvidence:
    """The contrast a brain's intensities say (see the module's docstring); ``contrast`` is
    None when they cannot tell. T1 and T1c look alike: a T1-like image is said to be "t1"
    with a detail that says so."""
    if mask.sum() < 1000:
        return ContrastEvidence(None, "image", 0.0, "too little brain to tell the contrast")
    f = image_features(arr, mask, spacing_zyx)
    surface, rise = f["surface"], f["rise"]
    numbers = f"surface {surface:+.2f}, deep-minus-cortex {rise:+.2f} IQR"
    if not (np.isfinite(surface) and np.isfinite(rise)):
        return ContrastEvidence(None, "image", 0.0, "the brain is too thin to tell the contrast")

    def sure(margin: float, scale: float) -> float:
        return round(float(min(0.95, 0.5 + 0.45 * margin / scale)), 2)

    if surface >= BRIGHT_SURFACE and rise < RISE_T1:
        return ContrastEvidence("t2", "image", sure(surface - BRIGHT_SURFACE, 1.0),
                                f"CSF brighter than the brain, white matter darkest ({numbers})")
    if rise >= RISE_T1 and surface < BRIGHT_SURFACE:
        # white above grey: T1-like whatever the surface shows (a thin or absent CSF rim)
        margin = sure(rise - RISE_T1, 0.2) if surface <= DARK_SURFACE else min(0.7, sure(rise - RISE_T1, 0.4))
        return ContrastEvidence("t1", "image", margin, f"white matter brighter than grey"
                                f"{', CSF dark' if surface <= DARK_SURFACE else ''} ({numbers}); an image cannot "
                                "tell T1 from T1c")
    if surface <= DARK_SURFACE:
        if rise <= RISE_FLAIR:
            return ContrastEvidence("flair", "image", sure(RISE_FLAIR - rise, 0.2),
                                    f"CSF dark, grey matter as bright as white or brighter ({numbers})")
    return ContrastEvidence(None, "image", 0.0, f"the tissue order is unclear ({numbers})")


def describe(evidence: ContrastEvidence) -> str:
    """In words: 'looks like FLAIR (54 % sure: ...)', 'is FLAIR (given)', 'is T2 by its DICOM header (...)'."""
    name = NAMES.get(evidence.contrast or "", "").split(" (")[0]
    if evidence.source == "given":
        return f"is {name} (given)"
    if evidence.contrast is None:
        return f"has no contrast that can be told ({evidence.detail})"
    if evidence.source == "dicom":
        return f"is {name} by its DICOM header ({evidence.detail})"
    return f"looks like {name} ({evidence.confidence:.0%} sure: {evidence.detail})"
