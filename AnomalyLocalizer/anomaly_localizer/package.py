"""Model packages: a folder with safetensors weights, a JSON description and a manifest.

Layout of a package folder::

    model.safetensors   weights (tensors only; never pickle)
    model.json          architecture, input contract, calibration, provenance, training
    README.md           model card (optional, hashed when present)
    manifest.json       {"format": ..., "files": {name: sha256}}

Every file the manifest lists is hashed and compared before the package is used, so a
truncated download or an edited file is refused with a clear message. Packages are found
by path or by name in the model folders (:func:`model_dirs`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PackageError

if TYPE_CHECKING:  # torch is imported only when weights are loaded or saved, so listing
    import torch   # and checking models works (e.g. in Slicer) before PyTorch is installed.

ANOMALY_TYPES = ("vae", "cevae", "vqvae-lsr")  # models that score anomalies
BRAIN_EXTRACTION_TYPES = ("unet-brainmask",)  # models that find the brain in a whole-head scan
ARCHITECTURE_TYPES = ANOMALY_TYPES + BRAIN_EXTRACTION_TYPES

# The methods each kind of model offers. The VAE's five gradient-family scores come from one
# forward and two backward passes (scores.py); restoration optimises each slice
# (restoration.py); lsr needs a VQ-VAE and its prior (lsr.py).
VAE_METHODS = ("rec", "rec_grad", "kl_grad", "elbo_grad", "combi", "restoration")
LSR_METHODS = ("lsr",)
METHODS_BY_TYPE = {"vae": VAE_METHODS, "cevae": VAE_METHODS, "vqvae-lsr": LSR_METHODS}
ALL_METHODS = VAE_METHODS + LSR_METHODS
# The slice score each kind of model ranks slices by (its volume score is built from it).
PRIMARY_SLICE_SCORE = {"vae": "elbo", "cevae": "elbo", "vqvae-lsr": "lsr"}

PACKAGE_FORMAT = "anomaly-localizer-model/1"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
MANIFEST_FILE = "manifest.json"
CARD_FILE = "README.md"

# Folders searched for a model given by name, in order: $ANOMALY_LOCALIZER_MODELS
# (os.pathsep-separated), the user's folder, then the models shipped with the code
# (the repository's models/ or, inside Slicer, the module's Resources/Models).
USER_MODELS_DIR = Path.home() / ".anomaly-localizer" / "models"
_HERE = Path(__file__).resolve().parent
SHIPPED_MODELS_DIRS = (_HERE.parent.parent / "models", _HERE.parent / "Resources" / "Models")


def model_dirs() -> list[Path]:
    """Folders that hold model packages, most specific first."""
    dirs = [Path(p) for p in os.environ.get("ANOMALY_LOCALIZER_MODELS", "").split(os.pathsep) if p]
    dirs.append(USER_MODELS_DIR)
    dirs.extend(SHIPPED_MODELS_DIRS)
    return [d for d in dirs if d.is_dir()]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class ModelPackage:
    """A verified model package. ``meta`` is the parsed model.json."""

    path: Path
    meta: dict[str, Any]
    manifest_sha256: str
    files: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.path.name))

    @property
    def architecture(self) -> dict[str, Any]:
        return self.meta["architecture"]

    @property
    def methods(self) -> tuple[str, ...]:
        """The pixel methods this model offers (none for a brain extraction model)."""
        return METHODS_BY_TYPE.get(self.architecture.get("type"), ())

    @property
    def primary_slice_score(self) -> str | None:
        return PRIMARY_SLICE_SCORE.get(self.architecture.get("type"))

    @property
    def contract(self) -> dict[str, Any]:
        return self.meta["input_contract"]

    @property
    def calibration(self) -> dict[str, Any]:
        return self.meta.get("calibration") or {}

    def default_threshold(self, method: str) -> tuple[float, str] | None:
        """The calibrated default threshold of a pixel score and what it means, if any."""
        entry = self.calibration.get("pixel", {}).get(method)
        if not entry:
            return None
        default_fpr = self.calibration.get("default_fpr", 0.001)
        for t in entry.get("thresholds", []):
            if abs(float(t["fpr"]) - default_fpr) < 1e-12:
                meaning = (f"flags {100 * default_fpr:g} % of healthy brain voxels "
                           f"({entry.get('n_subjects', '?')} held-out healthy subjects)")
                return float(t["value"]), meaning
        return None

    def load_model(self, device: "torch.device | str" = "cpu") -> "torch.nn.Module":
        """Build the network and load its weights (safetensors, checked against the architecture)."""
        from safetensors.torch import load_file

        from .models import build_model

        model = build_model(self.architecture)
        try:
            state = load_file(str(self.path / WEIGHTS_FILE), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise PackageError(f"model {self.name}: cannot read {WEIGHTS_FILE} ({exc}); reinstall the model") from exc
        expected = model.state_dict()
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
            raise PackageError(f"model {self.name}: weights do not match the architecture in {META_FILE}; "
                               "the package is inconsistent, re-export it")
        # float16 weights (small shipped files) are widened: scores are computed in float32.
        model.load_state_dict({k: v.float() for k, v in state.items()})
        return model.to(device).eval()


def load_package(path: str | os.PathLike) -> ModelPackage:
    """Read and verify a package folder: manifest, every file's SHA-256, format and architecture."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not path.is_dir():
        raise PackageError(f"model folder {path} does not exist; give a model name or folder from "
                           "`anomaly-localizer models`")
    if not manifest_path.is_file():
        raise PackageError(f"{path} is not a model package (no {MANIFEST_FILE}); "
                           "point --model at a folder made by `anomaly-localizer train`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise PackageError(f"{manifest_path} is not valid JSON ({exc}); reinstall the model") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != PACKAGE_FORMAT:
        raise PackageError(f"{path}: unknown package format {manifest.get('format') if isinstance(manifest, dict) else None!r} "
                           f"(this engine reads {PACKAGE_FORMAT}); update AnomalyLocalizer or re-export the model")
    files = manifest.get("files") or {}
    for required in (WEIGHTS_FILE, META_FILE):
        if required not in files:
            raise PackageError(f"{path}: manifest does not list {required}; the package is incomplete, reinstall it")
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise PackageError(f"{path}: {name} is missing; the package is incomplete, reinstall it")
        if sha256_file(f) != digest:
            raise PackageError(f"{path}: {name} does not match its SHA-256 in {MANIFEST_FILE} "
                               "(truncated or modified); reinstall the model or re-export it")
    _check_index(path, manifest_path)
    meta = json.loads((path / META_FILE).read_text())
    arch_type = meta.get("architecture", {}).get("type")
    if arch_type not in ARCHITECTURE_TYPES:
        raise PackageError(f"{path}: unknown architecture {arch_type!r}; this engine knows "
                           f"{', '.join(ARCHITECTURE_TYPES)}. Update AnomalyLocalizer")
    if "input_contract" not in meta:
        raise PackageError(f"{path}: {META_FILE} has no input_contract; re-export the model")
    return ModelPackage(path=path, meta=meta, manifest_sha256=sha256_file(manifest_path), files=dict(files))


def _check_index(path: Path, manifest_path: Path) -> None:
    """A models folder's index.json pins each listed package's manifest hash."""
    index = path.parent / "index.json"
    if not index.is_file():
        return
    try:
        pinned = json.loads(index.read_text()).get("models", {}).get(path.name, {}).get("manifest_sha256")
    except (ValueError, AttributeError):
        raise PackageError(f"{index} is not valid JSON; reinstall the models folder") from None
    if pinned and pinned != sha256_file(manifest_path):
        raise PackageError(f"{path}: manifest.json does not match its SHA-256 in {index} (modified); "
                           "reinstall the model")


def write_manifest(path: Path) -> None:
    """Hash the package's files into manifest.json (call after any change to them)."""
    names = [n for n in (WEIGHTS_FILE, META_FILE, CARD_FILE) if (path / n).is_file()]
    manifest = {"format": PACKAGE_FORMAT, "files": {n: sha256_file(path / n) for n in names}}
    (path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def save_package(model: "torch.nn.Module", meta: dict[str, Any], path: str | os.PathLike,
                 card: str | None = None) -> ModelPackage:
    """Write weights, description, optional model card and manifest into ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS_FILE))
    update_meta(path, meta, write_hashes=False)
    if card is not None:
        (path / CARD_FILE).write_text(card)
    write_manifest(path)
    return load_package(path)


def update_meta(path: Path, meta: dict[str, Any], write_hashes: bool = True) -> None:
    """Rewrite model.json (e.g. after calibration) and, by default, the manifest."""
    (Path(path) / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if write_hashes:
        write_manifest(Path(path))


def list_packages() -> list[Path]:
    """Package folders in the model folders; a name found twice resolves to the first."""
    seen: dict[str, Path] = {}
    for d in model_dirs():
        for sub in sorted(d.iterdir()):
            if (sub / MANIFEST_FILE).is_file() and sub.name not in seen:
                seen[sub.name] = sub
    return list(seen.values())


def default_model_name() -> str | None:
    """The model marked as default in a models folder's index.json, else the first found."""
    for d in model_dirs():
        index = d / "index.json"
        if index.is_file():
            try:
                name = json.loads(index.read_text()).get("default")
            except ValueError:
                continue
            if name and (d / name / MANIFEST_FILE).is_file():
                return name
    found = list_packages()
    return found[0].name if found else None


def resolve_package_for(methods: list[str] | tuple[str, ...] | None, model: str | None = None) -> ModelPackage:
    """The model to run ``methods`` with: ``model`` if given (it must offer them), else the
    default model if it offers them all, else the first installed model that does."""
    wanted = [m for m in (methods or []) if m]
    unknown = [m for m in wanted if m not in ALL_METHODS]
    if unknown:
        raise PackageError(f"unknown method {', '.join(unknown)}; choose from {', '.join(ALL_METHODS)}")
    if model is not None or not wanted:
        package = resolve_package(model)
        missing = [m for m in wanted if m not in package.methods]
        if missing:
            raise PackageError(f"model {package.name} does not offer {', '.join(missing)} (it offers "
                               f"{', '.join(package.methods) or 'no anomaly methods'}); "
                               f"{_who_offers(missing)}")
        return package
    default = default_model_name()
    candidates = ([default] if default else []) + [p.name for p in list_packages() if p.name != default]
    broken = []
    for name in candidates:
        try:
            package = resolve_package(name)
        except PackageError as exc:
            broken.append(str(exc))  # say so below: a broken model may be the one that was wanted
            continue
        if all(m in package.methods for m in wanted):
            return package
    unusable = f" (unusable models: {'; '.join(broken)})" if broken else ""
    raise PackageError(f"no installed model offers {', '.join(wanted)} together; {_who_offers(wanted)}{unusable}")


def _who_offers(methods: list[str]) -> str:
    """Which kind of model each method needs, as advice."""
    vae = [m for m in methods if m in VAE_METHODS]
    lsr = [m for m in methods if m in LSR_METHODS]
    parts = ([f"{', '.join(vae)} need{'s' if len(vae) == 1 else ''} a VAE model (e.g. brain-t1-vae)"] if vae else []) + \
        ([f"{', '.join(lsr)} needs an LSR model (e.g. brain-t1-lsr)"] if lsr else [])
    advice = "run them in separate calls" if vae and lsr else "pass such a model with --model, or leave --model out"
    return "; ".join(parts) + f": {advice}"


def resolve_package(model: str | None) -> ModelPackage:
    """A package from a folder path, a model name, or (None) the default model."""
    if model is None:
        model = default_model_name()
        if model is None:
            raise PackageError("no model is installed; pass --model PATH to a model folder "
                               "or set ANOMALY_LOCALIZER_MODELS")
    p = Path(model)
    if p.is_dir() or os.sep in model or model.startswith("."):
        return load_package(p)
    for d in model_dirs():
        if (d / model).is_dir():
            return load_package(d / model)
    known = ", ".join(sorted(x.name for x in list_packages())) or "none"
    raise PackageError(f"unknown model {model!r}; installed models: {known}. "
                       "Pass a model name or a path to a model folder")
