"""The input volumes of a run: one or more co-registered volume nodes of one study, each with
its contrast (T1, T1c, T2, FLAIR, PD).

What a contrast is, how it is known and which model reads it are the engine's rules
(:mod:`anomaly_localizer.core.contrast`, :mod:`anomaly_localizer.core.study`); this module only
turns volume nodes into what those rules read:

- a node's DICOM header, from Slicer's DICOM database when the node came from DICOM (its
  ``DICOM.instanceUIDs`` attribute), or from ``DICOM.<keyword>`` attributes that a reader
  without a database (the browser viewer) sets from the series it opened;
- a guess of each node's contrast from that header, else its name, to suggest which volume
  goes to which of a model's inputs (the user's choice then gives the contrast);
- the inputs a model reads, one selector each, and the scene's volumes suggested for them;
- a run's volumes as the engine's ``inputs`` and ``contrasts`` (a node, a list of nodes, or a
  ``{contrast: node}`` mapping), the first one being the grid of every output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import SimpleITK as sitk
from anomaly_localizer.core.contrast import KEYWORDS, NAMES, contrast_from_name, from_dicom

from .geometry import volumeNodeToImage
from .nodes import REF_PREFIX

INPUT_VOLUME_CLASS = "vtkMRMLScalarVolumeNode"  # what the input selectors offer (not label maps, not outputs)


def contrastName(contrast: str | None) -> str:
    """'T1', 'T1c (post-contrast T1)', 'FLAIR', ...; 'unknown' for None."""
    return NAMES.get(contrast or "", "unknown")


def shortName(contrast: str | None) -> str:
    """'T1', 'T1c', 'FLAIR', ...: a contrast's name without its explanation."""
    return contrastName(contrast).split(" (")[0]


def dicomTags(volumeNode, dicomDatabase=None) -> dict[str, str]:
    """The contrast-related DICOM header fields of a volume node, keyed as SimpleITK's readers
    key them (``"0008|103e"``), so that the engine reads them as it reads a DICOM folder's.

    ``dicomDatabase``: Slicer's (``slicer.dicomDatabase``; a ctkDICOMDatabase, whose
    ``instanceValue(uid, "gggg,eeee")`` reads one instance's header). Without it, or for a
    node that did not come from DICOM, only ``DICOM.<keyword>`` attributes are read.
    """
    tags: dict[str, str] = {}
    for tag, keyword in KEYWORDS.items():
        value = volumeNode.GetAttribute(f"DICOM.{keyword}")
        if value:
            tags[tag] = value
    uids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split()
    if uids and dicomDatabase is not None:
        for tag in KEYWORDS:
            if tag in tags:
                continue
            try:
                value = dicomDatabase.instanceValue(uids[0], tag.replace("|", ","))
            except (RuntimeError, ValueError):  # the instance left the database: its header says nothing
                continue
            if value and str(value).strip():
                tags[tag] = str(value).strip()
    return tags


def setDicomTags(volumeNode, image: sitk.Image) -> None:
    """Keep the contrast-related DICOM header fields of an image read by the engine (a DICOM
    series) on the node made from it, as ``DICOM.<keyword>`` attributes."""
    for tag, keyword in KEYWORDS.items():
        if image.HasMetaDataKey(tag) and image.GetMetaData(tag).strip():
            volumeNode.SetAttribute(f"DICOM.{keyword}", image.GetMetaData(tag).strip())


@dataclass
class ContrastGuess:
    """A volume's contrast as its header or name says it: ``contrast`` (None: they do not
    say), ``source`` ("dicom", "name" or None) and ``why``, in words."""

    contrast: str | None
    source: str | None
    why: str

    @property
    def text(self) -> str:
        """'FLAIR by its image (95 % sure: ...)', or that it is not known and is to be chosen."""
        if self.contrast is None:
            return f"its contrast is not known ({self.why}); choose it"
        return f"{shortName(self.contrast)} by {self.why}"


# how summary.json's "inputs" say each contrast was known, in the words interfaces show
HOW_KNOWN = {"given": "chosen", "dicom": "from its DICOM header", "image": "recognised from its image"}


@dataclass
class SuggestedInput:
    """One of a model's inputs: its contrast, whether the model can do without it, the volume
    suggested for it (None: none fits) and why that volume, in words."""

    contrast: str
    optional: bool
    node: Any
    why: str

    @property
    def label(self) -> str:
        return contrastName(self.contrast) + (" (optional)" if self.optional else "")


def studyVolumes(inputVolume, contrasts: Sequence[str] | None = None) -> tuple[list, list[str] | None]:
    """A run's volume nodes, first the one whose grid every output takes, and their contrasts
    as given (None: each is read from its DICOM header or recognised from its image).

    ``inputVolume``: a volume node; a list of them (``contrasts``: one per node, or None); or
    ``{contrast: node}`` in input order (the contrasts are then given by its keys).
    """
    if isinstance(inputVolume, Mapping):
        if contrasts is not None:
            raise ValueError("give the contrasts as the mapping's keys or as contrasts=, not both")
        contrasts = list(inputVolume.keys())
        nodes = list(inputVolume.values())
    elif isinstance(inputVolume, (list, tuple)):
        nodes = list(inputVolume)
    else:
        nodes = [inputVolume]
    if not nodes or any(n is None for n in nodes):
        raise ValueError("no input volume given" if not nodes or all(n is None for n in nodes) else
                         "an input has no volume; select a volume for it or leave it out")
    ids = [n.GetID() for n in nodes]
    twice = next((n for n, i in zip(nodes, ids) if ids.count(i) > 1), None)
    if twice is not None:
        raise ValueError(f"volume {twice.GetName()} is given as two inputs; give each scan once")
    return nodes, (list(contrasts) if contrasts is not None else None)


class InputsMixin:
    """Input volumes, their contrasts and the inputs a model reads, for :class:`AnomalyLocalizerLogic`."""

    #: Slicer's DICOM database (``slicer.dicomDatabase``, set by the widget), to read the DICOM
    #: header of volumes loaded from DICOM; None headless, where only node attributes are read.
    dicomDatabase = None

    def contrastGuess(self, volumeNode, lookAtImage: bool = False) -> ContrastGuess:
        """A volume's contrast as its DICOM header says it, else (``lookAtImage``) as its image
        shows it, else as its name says it
        (:func:`~anomaly_localizer.core.contrast.contrast_from_name`). A header that names a
        scan no model reads (diffusion, T2*) is believed over the rest.

        The header and the image are what a run reads when no contrast is given
        (:func:`anomaly_localizer.core.study.recognise`); the image is looked at only when
        it is skull-stripped (a whole head's brain is found when it is scored), and it costs
        a distance map of the brain, so the Slicer panel's suggestions use header and name only.
        """
        tags = dicomTags(volumeNode, self.dicomDatabase)
        evidence = from_dicom(tags) if tags else None
        if evidence is not None and (evidence.contrast is not None or evidence.confidence >= 0.9):
            why = f"its DICOM header ({evidence.detail})" if evidence.contrast else evidence.detail
            return ContrastGuess(evidence.contrast, "dicom", why)
        if lookAtImage:
            seen = self._imageEvidence(volumeNode)
            if seen is not None and seen.contrast is not None:
                return ContrastGuess(seen.contrast, "image",
                                     f"its image ({seen.confidence:.0%} sure: {seen.detail})")
        name = volumeNode.GetName() or ""
        contrast = contrast_from_name(name)
        if contrast is not None:
            return ContrastGuess(contrast, "name", f"its name {name!r}")
        return ContrastGuess(None, None, "nothing in its name or DICOM header says its contrast")

    @staticmethod
    def _imageEvidence(volumeNode):
        """What a skull-stripped volume's intensities say its contrast is (the engine's
        :func:`~anomaly_localizer.core.contrast.from_image` inside its non-zero region), or
        None for a whole head or an empty volume."""
        from anomaly_localizer.core.contrast import from_image
        from anomaly_localizer.core.volume import brain_mask
        from anomaly_localizer.errors import InputError

        image = volumeNodeToImage(volumeNode)
        try:
            brain = brain_mask(image, None, None)
        except InputError:
            return None
        return from_image(sitk.GetArrayViewFromImage(image), brain, image.GetSpacing()[::-1])

    def guessContrast(self, volumeNode) -> str | None:
        """The contrast a volume's DICOM header or name says (``t1``, ``t1c``, ``t2``,
        ``flair``, ``pd``), or None when they do not tell."""
        return self.contrastGuess(volumeNode).contrast

    def inputContrasts(self, model: str | None = None) -> list[SuggestedInput]:
        """The inputs ``model`` reads (its input contract's contrasts, in input order; the
        first one is the grid of the outputs), without volumes: one selector each."""
        contract = self.package(model).contract
        optional = set(contract.optional_contrasts)
        return [SuggestedInput(c, c in optional, None, "") for c in contract.contrasts]

    def inputVolumeNodes(self) -> list:
        """The scene's volumes a reader can score: scalar volumes (not label maps), not this
        module's outputs (heatmaps), not hidden ones."""
        outputs = set()
        nodes = []
        collection = self.scene.GetNodesByClass("vtkMRMLVolumeNode")
        for i in range(collection.GetNumberOfItems()):
            node = collection.GetItemAsObject(i)
            for k in range(node.GetNumberOfNodeReferenceRoles()):
                role = node.GetNthNodeReferenceRole(k)
                if role.startswith(REF_PREFIX + "."):
                    ref = node.GetNodeReference(role)
                    if ref is not None:
                        outputs.add(ref.GetID())
            if node.GetClassName() == INPUT_VOLUME_CLASS and not node.GetHideFromEditors():
                nodes.append(node)
        return [n for n in nodes if n.GetID() not in outputs]

    def suggestInputs(self, model: str | None = None, current: Mapping[str, Any] | None = None,
                      previous: Sequence[SuggestedInput] = ()) -> list[SuggestedInput]:
        """The model's inputs (:meth:`inputContrasts`), each with a volume of the scene:

        - a volume already chosen for it (``current``, by contrast) stays, if it is still in
          the scene: the user's choice wins (with the reason it had among ``previous``, the
          inputs as last suggested, if it was suggested);
        - else the first volume whose DICOM header or name says that contrast
          (:meth:`contrastGuess`), each volume given to one input at most;
        - the model's first required input, if still empty, gets the first volume whose
          contrast nothing says (as a single-input panel took the first volume); its contrast
          is then the user's word, so ``why`` asks to check it. A volume said to be of another
          contrast never fills an input of this one.
        """
        slots = self.inputContrasts(model)
        current = current or {}
        before = {s.contrast: s for s in previous}
        taken: set[str] = set()
        for slot in slots:
            node = current.get(slot.contrast)
            if node is not None and self.scene.GetNodeByID(node.GetID()) is node:
                kept = before.get(slot.contrast)
                slot.node, slot.why = node, kept.why if kept is not None and kept.node is node else "chosen"
                taken.add(node.GetID())
        guesses = [(node, self.contrastGuess(node)) for node in self.inputVolumeNodes()]
        for slot in slots:
            if slot.node is not None:
                continue
            match = next(((n, g) for n, g in guesses if g.contrast == slot.contrast and n.GetID() not in taken), None)
            if match is not None:
                slot.node, slot.why = match[0], f"{shortName(slot.contrast)} by {match[1].why}"
                taken.add(match[0].GetID())
        first = next((s for s in slots if not s.optional), None)
        if first is not None and first.node is None:
            unknown = next((n for n, g in guesses if g.source is None and n.GetID() not in taken), None)
            if unknown is not None:
                first.node = unknown
                first.why = (f"nothing in its name or DICOM header says its contrast: check that it is "
                             f"{shortName(first.contrast)}")
        for slot in slots:
            if slot.node is None:
                slot.why = f"no volume of the scene is said to be {shortName(slot.contrast)}; choose one" + \
                    (" or leave it empty" if slot.optional else "")
        return slots

    @staticmethod
    def inputsBeforeInstall() -> list[SuggestedInput]:
        """Before the engine's packages are installed no model can be read: the one T1 input
        every shipped model reads."""
        return [SuggestedInput("t1", False, None, "")]

    @staticmethod
    def selectInputs(slots: Sequence[SuggestedInput], selected: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Take the volumes now selected for ``slots`` (the user may have changed some: their
        reason becomes "chosen"); returns :meth:`chosenInputs` and :meth:`missingInputs`."""
        for slot in slots:
            node = selected.get(slot.contrast)
            if node is not slot.node:
                slot.node, slot.why = node, "chosen" if node is not None else "left empty"
        return InputsMixin.chosenInputs(slots), InputsMixin.missingInputs(slots)

    @staticmethod
    def missingInputs(slots: Sequence[SuggestedInput]) -> list[str]:
        """The names of the required inputs without a volume ('T1', ...): a run needs them."""
        return [shortName(s.contrast) for s in slots if s.node is None and not s.optional]

    @staticmethod
    def inputsNote(slots: Sequence[SuggestedInput]) -> str:
        """Each input's volume and why it is there, one line each, for the panel."""
        return "\n".join(f"{s.label}: {s.node.GetName() + ' (' + s.why + ')' if s.node is not None else s.why}"
                         for s in slots)

    @staticmethod
    def chosenInputs(slots: Sequence[SuggestedInput]) -> dict[str, Any]:
        """``{contrast: node}`` of the inputs with a volume, in the model's input order: what
        :meth:`run` and :meth:`startRun` take (each contrast then given by the user)."""
        return {s.contrast: s.node for s in slots if s.node is not None}

    def _volumeImage(self, volumeNode) -> sitk.Image:
        """A volume as the engine reads an input: its voxels on its exact grid, with the
        contrast-related DICOM header fields it came with (the engine's rules read them)."""
        image = volumeNodeToImage(volumeNode)
        for tag, value in dicomTags(volumeNode, self.dicomDatabase).items():
            image.SetMetaData(tag, value)
        return image

    @staticmethod
    def runInputsText(summary: Mapping[str, Any]) -> str:
        """What a run read, in words: each input, its contrast and how it was known, and the
        inputs recorded but not used; then the engine's notes on them. Empty for a summary
        without inputs (results of an older engine)."""
        inputs = summary.get("inputs") or []
        if not inputs:
            return ""
        parts = [f"{i['input']} is {shortName(i.get('contrast'))} "
                 f"({HOW_KNOWN.get(i.get('source'), i.get('source') or '?')})" for i in inputs]
        # the engine's notes say, one line each, which inputs were resampled, looked like
        # another contrast than given, or were recorded but not used
        return "\n".join(["Inputs: " + "; ".join(parts) + "."] + list(summary.get("input_notes") or []))
