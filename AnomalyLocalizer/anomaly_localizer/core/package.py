"""Model packages: a folder with safetensors weights, a JSON description and a manifest.

Layout of a package folder::

    model.safetensors   weights (tensors only; never pickle)
    model.json          architecture, input contract, calibration, provenance, training
    README.md           model card (optional, hashed when present)
    manifest.json       {"format": ..., "files": {name: sha256}}

Every file the manifest lists must be a plain file inside the folder (no path, no link out
of it); it is hashed and compared before the package is used, and the weights are hashed
again when they are loaded, so a truncated download or an edited file is refused with a
clear message. ``model.json`` is validated against its declared schema
(:mod:`anomaly_localizer.core.schema`, and the architecture and settings each detector
family declares) when the package is loaded. Packages are found by path or by name in the
model folders (:func:`model_dirs`); choosing among them is :mod:`.installed`'s.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ..errors import InputError, PackageError
from . import detectors
from .hashing import sha256_bytes, sha256_file
from .schema import (
    PACKAGE_FORMAT,
    Calibration,
    InputContract,
    Manifest,
    ModelMeta,
    Smoothing,
    UNetArchitecture,
    validation_message,
)

if TYPE_CHECKING:  # torch is imported only when weights are loaded or saved, so listing
    import torch  # and checking models works (e.g. in Slicer) before PyTorch is installed.

BRAIN_EXTRACTION_TYPES = ("unet-brainmask",)  # models that find the brain in a whole-head scan
ANOMALY_TYPES = detectors.anomaly_types()  # models that score anomalies, one family each
ARCHITECTURE_TYPES = ANOMALY_TYPES + BRAIN_EXTRACTION_TYPES
ALL_METHODS = detectors.all_methods()

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
MANIFEST_FILE = "manifest.json"
CARD_FILE = "README.md"
MAX_JSON_BYTES = 50 << 20  # a model.json holds curves and records, never this much

# Folders searched for a model given by name, in order: $ANOMALY_LOCALIZER_MODELS
# (os.pathsep-separated), the user's folder, then the models shipped with the code
# (the repository's models/ or, inside Slicer, the module's Resources/Models).
USER_MODELS_DIR = Path.home() / ".anomaly-localizer" / "models"
_ENGINE = Path(__file__).resolve().parent.parent  # the anomaly_localizer package
SHIPPED_MODELS_DIRS = (_ENGINE.parent.parent / "models", _ENGINE.parent / "Resources" / "Models")


def model_dirs() -> list[Path]:
    """Folders that hold model packages, most specific first."""
    dirs = [Path(p) for p in os.environ.get("ANOMALY_LOCALIZER_MODELS", "").split(os.pathsep) if p]
    dirs.append(USER_MODELS_DIR)
    dirs.extend(SHIPPED_MODELS_DIRS)
    return [d for d in dirs if d.is_dir()]


def all_package_paths() -> list[Path]:
    """Every package folder in the model folders, in search order (a name may appear twice)."""
    return [sub for d in model_dirs() for sub in sorted(d.iterdir()) if (sub / MANIFEST_FILE).is_file()]


def shadowed(path: Path) -> list[Path]:
    """Packages of the same name that ``path`` hides, when ``path`` is the one a name finds."""
    same = [p for p in all_package_paths() if p.name == path.name]
    if not same or same[0].resolve() != path.resolve():
        return []
    return [p for p in same[1:] if p.resolve() != path.resolve()]


def list_packages() -> list[Path]:
    """Package folders in the model folders; a name found twice resolves to the first."""
    seen: dict[str, Path] = {}
    for sub in all_package_paths():
        seen.setdefault(sub.name, sub)
    return list(seen.values())



def read_json(path: Path, what: str, fix: str = "reinstall the model") -> Any:
    """Parse a package's JSON file; every way it can be broken is a PackageError whose
    advice is ``fix`` (a user's own file is fixed, not reinstalled)."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise PackageError(f"{path} is larger than {MAX_JSON_BYTES >> 20} MB; it is not a {what}")
        return json.loads(path.read_text(encoding="utf-8"))
    except PackageError:
        raise
    except RecursionError:
        raise PackageError(f"{path} is nested too deeply to be a {what}; {fix}") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise PackageError(f"{path} is not valid JSON ({str(exc)[:120]}); {fix}") from None


def build_network(architecture: dict[str, Any]) -> "torch.nn.Module":
    """An untrained network for an architecture block (any anomaly family or brain extraction)."""
    arch_type = architecture.get("type", "vae")  # the seed family when none is named
    if arch_type in BRAIN_EXTRACTION_TYPES:
        from .models.unet import UNet2D
        arch = UNetArchitecture.model_validate(architecture)
        return UNet2D(slice_size=arch.slice_size, feature_maps=arch.feature_maps)
    detector = detectors.detector_for(arch_type)
    if detector is None:
        raise ValueError(f"unknown architecture type {arch_type!r}; known: {', '.join(ARCHITECTURE_TYPES)}")
    return detector.build_network(architecture)


@dataclass
class ModelPackage:
    """A verified model package: ``meta`` is model.json as written, ``spec`` its validated form."""

    path: Path
    meta: dict[str, Any]
    manifest_sha256: str
    files: dict[str, str] = field(default_factory=dict)
    spec: ModelMeta | None = None
    #: packages of the same name further down the model folders that this one hides
    shadows: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.spec is None:
            self.spec = validate_meta(self.meta, self.path)

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or self.path.name)

    @property
    def architecture(self) -> dict[str, Any]:
        return self.meta["architecture"]

    @property
    def arch_type(self) -> str:
        return str(self.architecture.get("type"))

    @property
    def detector(self) -> "detectors.Detector | None":
        """The detector family that scores this model (None for brain extraction)."""
        return detectors.detector_for(self.arch_type)

    @property
    def methods(self) -> tuple[str, ...]:
        """The pixel methods this model offers (none for a brain extraction model)."""
        return self.detector.methods_of(self.meta) if self.detector else ()

    @property
    def primary_slice_score(self) -> str | None:
        return self.detector.primary_slice_score if self.detector else None

    @property
    def contract(self) -> InputContract:
        return self.spec.input_contract

    @property
    def slice_size(self) -> int:
        return self.spec.input_contract.slice_size

    @property
    def calibration(self) -> Calibration:
        return self.spec.calibration

    @property
    def recommended_method(self) -> str | None:
        return self.spec.recommended_method

    def settings(self, key: str) -> dict[str, Any]:
        """A family's own settings block (e.g. "restoration", "lsr") as written, {} if absent."""
        block = self.meta.get(key)
        return dict(block) if isinstance(block, dict) else {}

    def smoothing(self, method: str) -> Smoothing | None:
        """The 3D smoothing of a method's map, None when the package has none for it."""
        block = self.spec.map_smoothing
        return (block.__pydantic_extra__ or {}).get(method) if block is not None else None

    def scan_relative(self, method: str) -> float | None:
        """The brain quantile a method's map is divided by on each scan (:mod:`.relative`), or None."""
        block = self.spec.scan_relative
        entry = (block.__pydantic_extra__ or {}).get(method) if block is not None else None
        return entry.quantile if entry is not None else None

    def default_methods(self) -> list[str]:
        """The methods a run computes by default: all the model offers, its recommended one
        first (it makes the segmentation); opt-in methods (e.g. restoration, an optimisation
        per slice) only when recommended."""
        first = self.recommended_method
        opt_in = self.detector.opt_in if self.detector else ()
        offered = [m for m in self.methods if m not in opt_in or m == first]
        return ([first] if first in offered else []) + [m for m in offered if m != first]

    def default_threshold(self, method: str) -> tuple[float, str] | None:
        """The calibrated default threshold of a pixel score and what it means, if any."""
        from .levels import default_threshold
        return default_threshold(self.calibration, method)

    def check_components(self) -> None:
        """For a fused package, that every component it names is installed and is the version
        it was made with (:func:`.fusion.resolve_components`); nothing for other packages.
        Cheap (hashes already checked, no network built): run it before any work."""
        if self.detector is not None and self.detector.composite:
            from .fusion import resolve_components
            resolve_components(self, resolve_package)

    def load_model(self, device: "torch.device | str" = "cpu") -> "torch.nn.Module":
        """Build the network and load its weights, hashed again as they are read unless this run
        hashed the unchanged file already (:mod:`.hashing`; a file changed since the package was
        resolved is refused), and checked against the architecture.
        A fused package loads its component models instead (:func:`.fusion.load_components`)."""
        from safetensors.torch import load as load_bytes

        if self.detector is not None and self.detector.composite:
            from .fusion import load_components
            return load_components(self, device, resolve_package)
        if self.detector is not None and not self.detector.has_weights:
            return None  # a rule: nothing to load

        import torch
        data = _read_inside(self.path, WEIGHTS_FILE)
        if sha256_bytes(data, self.path / WEIGHTS_FILE) != self.files.get(WEIGHTS_FILE):
            raise PackageError(f"model {self.name}: {WEIGHTS_FILE} does not match its SHA-256 in {MANIFEST_FILE} "
                               "(changed since the model was checked); reinstall the model or re-export it")
        try:
            state = load_bytes(data)
        except Exception as exc:  # safetensors raises its own error types
            raise PackageError(f"model {self.name}: cannot read {WEIGHTS_FILE} ({exc}); reinstall the model") from exc
        # The architecture is built on the meta device first (shapes only, no memory), so a
        # model.json naming a huge network that its weights do not fill is refused before
        # gigabytes are allocated for it.
        with torch.device("meta"):
            expected = {k: v.shape for k, v in build_network(self.architecture).state_dict().items()}
        if set(state) != set(expected) or any(state[k].shape != expected[k] for k in expected):
            raise PackageError(f"model {self.name}: weights do not match the architecture in {META_FILE}; "
                               "the package is inconsistent, re-export it")
        model = build_network(self.architecture)
        # float16 weights (small shipped files) are widened: scores are computed in float32.
        model.load_state_dict({k: v.float() for k, v in state.items()})
        return model.to(device).eval()


def validate_meta(meta: Any, path: Path | str = "model") -> ModelMeta:
    """model.json against the shared schema, its family's architecture and settings, and the
    cross-checks (one slice size; a recommended method the model offers)."""
    where = f"{path}: {META_FILE}"
    if not isinstance(meta, dict):
        raise PackageError(f"{where} is not a JSON object; reinstall the model")

    def check(model, value, prefix: str = ""):
        try:
            return model.model_validate(value)
        except ValidationError as exc:
            raise PackageError(f"{where}: {validation_message(exc, prefix)}; fix or re-export the model") from None

    spec = check(ModelMeta, meta)
    arch_type = spec.architecture.type
    detector = detectors.detector_for(arch_type)
    if detector is None and arch_type not in BRAIN_EXTRACTION_TYPES:
        raise PackageError(f"{path}: unknown architecture {arch_type!r}; this engine knows "
                           f"{', '.join(ARCHITECTURE_TYPES)}. Update AnomalyLocalizer")
    arch = check(detector.architecture if detector else UNetArchitecture, meta["architecture"], "architecture")
    for key, model in (detector.settings if detector else {}).items():
        if key in meta:
            check(model, meta[key], key)
    if getattr(arch, "slice_size", spec.input_contract.slice_size) != spec.input_contract.slice_size:
        raise PackageError(f"{where}: architecture.slice_size {arch.slice_size} differs from input_contract.slice_size "
                           f"{spec.input_contract.slice_size}; re-export the model")
    channels = getattr(arch, "in_channels", spec.input_contract.context_slices)
    if channels != spec.input_contract.context_slices:
        raise PackageError(f"{where}: architecture.in_channels {channels} differs from input_contract.context_slices "
                           f"{spec.input_contract.context_slices} (the slices a model sees); re-export the model")
    offered = detector.methods_of(meta) if detector else ()
    if spec.recommended_method is not None and spec.recommended_method not in offered:
        raise PackageError(f"{where}: recommended_method {spec.recommended_method!r} is not one of the model's "
                           f"methods ({', '.join(offered) or 'none'})")
    # a composite's component maps are made relative (or not) by their own packages
    own = detector.methods if detector is not None and detector.composite else offered
    for key, block, allowed in (("map_smoothing", spec.map_smoothing, offered),
                                ("scan_relative", spec.scan_relative, own)):
        unknown = set((block.__pydantic_extra__ or {}) if block else ()) - set(allowed)
        if unknown:
            why = "which the model does not offer" if set(allowed) == set(offered) else \
                f"a component's map; only {', '.join(allowed)} may be (components follow their own models)"
            raise PackageError(f"{where}: {key} names {', '.join(sorted(unknown))}, {why}")
    return spec


def _read_inside(path: Path, name: str) -> bytes:
    """The bytes of a plain file ``name`` directly inside package folder ``path``."""
    return _inside(path, name).read_bytes()


def _inside(path: Path, name: str) -> Path:
    """``path / name`` when ``name`` is a plain file name and the file a regular file (not a
    link) in the folder; else a PackageError. A manifest must not reach outside its package."""
    if not name or name != Path(name).name or name in (".", "..") or "\\" in name or os.path.isabs(name):
        raise PackageError(f"{path}: the manifest names {name!r}, which is not a file of the package folder; "
                           "reinstall the model")
    f = path / name
    if f.is_symlink() or (f.exists() and not f.is_file()):
        raise PackageError(f"{path}: {name} is a link or not a regular file; a package holds plain files only, "
                           "reinstall the model")
    if not f.is_file():
        raise PackageError(f"{path}: {name} is missing; the package is incomplete, reinstall it")
    return f


def _weightless(files: dict[str, str], path: Path) -> bool:
    """Whether the package's family holds no weights (a fused map); model.json decides."""
    if META_FILE not in files:
        return False
    try:
        arch_type = read_json(_inside(path, META_FILE), "model description").get("architecture", {}).get("type")
    except (PackageError, AttributeError):
        return False
    detector = detectors.detector_for(arch_type)
    return detector is not None and not detector.has_weights


def load_package(path: str | os.PathLike) -> ModelPackage:
    """Read and verify a package folder: manifest, every file's SHA-256, format and schema."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not path.is_dir():
        raise PackageError(f"model folder {path} does not exist; give a model name or folder from "
                           "`anomaly-localizer models`")
    if not manifest_path.is_file():
        raise PackageError(f"{path} is not a model package (no {MANIFEST_FILE}); "
                           "point --model at a folder made by `anomaly-localizer train`")
    _inside(path, MANIFEST_FILE)
    try:
        manifest = Manifest.model_validate(read_json(manifest_path, "package manifest"))
    except ValidationError as exc:
        raise PackageError(f"{manifest_path}: {validation_message(exc)}; reinstall the model") from None
    for required in (WEIGHTS_FILE, META_FILE):
        if required not in manifest.files and not (required == WEIGHTS_FILE and _weightless(manifest.files, path)):
            raise PackageError(f"{path}: manifest does not list {required}; the package is incomplete, reinstall it")
    for name, digest in manifest.files.items():
        if sha256_file(_inside(path, name)) != digest:
            raise PackageError(f"{path}: {name} does not match its SHA-256 in {MANIFEST_FILE} "
                               "(truncated or modified); reinstall the model or re-export it")
    _check_index(path, manifest_path)
    meta = read_json(path / META_FILE, "model description")
    spec = validate_meta(meta, path)
    return ModelPackage(path=path, meta=meta, manifest_sha256=sha256_file(manifest_path), files=dict(manifest.files),
                        spec=spec, shadows=[str(p) for p in shadowed(path)])


def _check_index(path: Path, manifest_path: Path) -> None:
    """A models folder's index.json pins each listed package's manifest hash."""
    index = path.parent / "index.json"
    if not index.is_file():
        return
    try:
        pinned = read_json(index, "models index").get("models", {}).get(path.name, {}).get("manifest_sha256")
    except AttributeError:
        raise PackageError(f"{index} is not a models index; reinstall the models folder") from None
    if pinned and pinned != sha256_file(manifest_path):
        raise PackageError(f"{path}: manifest.json does not match its SHA-256 in {index} (modified); "
                           "reinstall the model")


def write_manifest(path: Path) -> None:
    """Hash the package's files into manifest.json (call after any change to them)."""
    names = [n for n in (WEIGHTS_FILE, META_FILE, CARD_FILE) if (path / n).is_file()]
    manifest = {"format": PACKAGE_FORMAT, "files": {n: sha256_file(path / n) for n in names}}
    (path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def save_package(model: "torch.nn.Module | None", meta: dict[str, Any], path: str | os.PathLike,
                 card: str | None = None) -> ModelPackage:
    """Write weights, description, optional model card and manifest into ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    validate_meta(meta, path)  # nothing is written for a description the engine would refuse
    path.mkdir(parents=True, exist_ok=True)
    if model is not None:  # None: a family without weights (a fused map)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE))
    update_meta(path, meta, write_hashes=False)
    if card is not None:
        (path / CARD_FILE).write_text(card)
    write_manifest(path)
    return load_package(path)


def update_meta(path: Path, meta: dict[str, Any], write_hashes: bool = True) -> None:
    """Rewrite model.json (e.g. after calibration) and, by default, the manifest. The next
    :func:`load_package` validates it."""
    (Path(path) / META_FILE).write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n")
    if write_hashes:
        write_manifest(Path(path))


def shadow_advice(path: Path) -> str:
    """What a broken package at ``path`` hides and how to fix it ('' when it hides nothing):
    a broken package blocks every model of its name further down the model folders."""
    hidden = shadowed(path)
    if not hidden:
        return ""
    return (f". It hides the model of the same name in {hidden[0]}, which is not used while it is there: fix or "
            f"remove {path}, or list {hidden[0].parent} first in ANOMALY_LOCALIZER_MODELS")


def default_model_name() -> str | None:
    """The model marked as default in a models folder's index.json, else the first found."""
    for d in model_dirs():
        index = d / "index.json"
        if index.is_file():
            try:
                name = json.loads(index.read_text()).get("default")
            except (ValueError, AttributeError, RecursionError, OSError):
                continue
            if isinstance(name, str) and (d / name / MANIFEST_FILE).is_file():
                return name
    found = list_packages()
    return found[0].name if found else None


def resolve_package(model: str | None) -> ModelPackage:
    """A package from a folder path, a model name, or (None) the default model."""
    if model is None:
        model = default_model_name()
        if model is None:
            raise PackageError("no model is installed; pass --model PATH to a model folder "
                               "or set ANOMALY_LOCALIZER_MODELS")
    if not str(model).strip():
        raise PackageError("the model given is empty; give a model name (anomaly-localizer models lists them) or a "
                           "model folder")
    p = Path(model)
    if p.is_dir() or os.sep in model or model.startswith("."):
        if p.exists() and not p.is_dir():
            raise PackageError(f"--model {model} is a file, not a model folder; give a model name or the folder "
                               "holding model.json")
        return load_package(p)
    for d in model_dirs():
        if (d / model).is_dir():
            try:
                return load_package(d / model)
            except PackageError as exc:
                raise PackageError(str(exc) + shadow_advice(d / model)) from None
    known = ", ".join(sorted(x.name for x in list_packages())) or "none"
    raise PackageError(f"unknown model {model!r}; installed models: {known}. "
                       "Pass a model name or a path to a model folder")
