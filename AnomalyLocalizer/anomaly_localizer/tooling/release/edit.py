"""Changing model packages safely: a tuned or recalibrated copy (or, when asked, the model
itself), a shippable release, and a models folder's index. A change that fails leaves no
half-made package behind."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

from ...core.package import (
    ANOMALY_TYPES,
    MANIFEST_FILE,
    ModelPackage,
    load_package,
    read_json,
    save_package,
    sha256_file,
    update_meta,
)
from ...core.package import resolve_package
from ...errors import InputError
from ..data import Subject, find_subjects
from ..rendering import rendered_contrast

SUBJECT_SETS = ("all", "calibration", "test", "val")


def subjects_of(package: ModelPackage, data: str, which: str, choosable: bool = True,
                contrasts: list[str] | None = None) -> list[Subject]:
    """The scans of ``data`` in the model's recorded subject set ``which`` (or all of them).
    ``choosable``: the command offers ``--subjects`` (the advice names it only then).
    Renderings (``<subject>~<contrast>~<k>``) count only in the contrasts the model reads
    (or ``contrasts``); a subject's set is its source subject's."""
    from ..rendering import source_subject
    reads = (None, *(contrasts or package.contract.contrasts))
    subjects = find_subjects(data)
    if which == "all":
        return [s for s in subjects if rendered_contrast(s.id) in reads]
    recorded = set(package.meta.get("provenance", {}).get("subjects", {}).get(which, []))
    chosen = [s for s in subjects if (s.id in recorded or source_subject(s.id) in recorded)
              and rendered_contrast(s.id) in reads]
    if not chosen:
        advice = ("pass --subjects all to use every scan there (they must be healthy and not used for training)"
                  if choosable else "give the data folder the model was made from")
        raise InputError(f"none of the model's {which} subjects are in {data}; {advice}")
    return chosen


@contextlib.contextmanager
def changed_copy(model: str, out: str | None, in_place: bool):
    """:func:`prepare_copy` for a block that changes the package: a new copy that the block
    fails to finish is removed, so a failed command leaves no half-made model behind."""
    package = prepare_copy(model, out, in_place)
    try:
        yield package
    except BaseException:
        if out:
            shutil.rmtree(out, ignore_errors=True)
        raise


def prepare_copy(model: str, out: str | None, in_place: bool) -> ModelPackage:
    """The package a changing command (calibrate, tune-restoration) works on: a new copy in
    ``out``, or with ``in_place`` the model itself, unless an index.json pins it."""
    package = resolve_package(model)
    if out and in_place:
        raise InputError("give --out NEW_MODEL_DIR for a changed copy or --in-place to change the model itself, "
                         "not both")
    if out:
        dest = Path(out)
        if dest.exists():
            raise InputError(f"{dest} already exists; choose a new folder for the changed model")
        shutil.copytree(package.path, dest, ignore=shutil.ignore_patterns("checkpoint", ".cache"))
        meta = json.loads((dest / "model.json").read_text())
        meta["name"] = dest.name
        update_meta(dest, meta)
        return load_package(dest)
    if not in_place:
        raise InputError("give --out NEW_MODEL_DIR for a changed copy, or --in-place to change "
                         f"{package.path} itself")
    index = package.path.parent / "index.json"
    if index.is_file() and package.path.name in json.loads(index.read_text()).get("models", {}):
        raise InputError(f"{package.path} is pinned in {index}; change a copy with --out NEW_MODEL_DIR "
                         "(or run `anomaly-localizer index` after changing it)")
    return package


def store_and_recalibrate(package: ModelPackage, key: str, block: dict, data: str, device: str,
                          say: Callable[[str], None] | None, message: str,
                          methods: list[str] | None = None) -> ModelPackage:
    """Store ``block`` under ``key`` in the package's model.json, then recalibrate its
    thresholds on the model's calibration subjects of ``data`` (the maps have changed; only
    ``methods``' when given: the others are as they were)."""
    from .calibrate import calibrate_package
    meta = dict(package.meta)
    meta[key] = block
    update_meta(package.path, meta)
    package = load_package(package.path)
    print(f"{message} for {package.name}; recalibrating its thresholds")
    return calibrate_package(package, subjects_of(package, data, "calibration", choosable=False), device=device,
                             progress=say, methods=methods)


@contextlib.contextmanager
def building(out: Path):
    """A folder to build a package in (``OUT.partial``): it replaces ``out`` when the block
    ends, and is removed when the block fails, so no half-made package is ever left."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def release_package(source: str | Path, out: str | Path, data: str, meta_file: str | None = None, half: bool = False,
                    force: bool = False, device: str = "cpu",
                    progress: Callable[[str], None] | None = None,
                    contrast: str | list[str] | None = None) -> tuple[ModelPackage, int]:
    """Turn a trained package into a shippable one: new name, optional float16 weights,
    descriptive metadata, recalibrated (the weights may have changed). ``contrast``: the
    contrast the released model reads (a network trained on renderings of several contrasts
    is released once per contrast, each calibrated on its own renderings); several, for a model
    that uses a study's other contrasts: the first is scored, the others (required, as in its
    calibration) guide it (an anatomy model's tissue classes from a T1). Returns the package and
    the number of calibration subjects."""
    from .calibrate import calibrate_package

    src = load_package(source)
    if src.detector is not None and src.detector.composite:
        raise InputError(f"{src.name} is a fused model (no weights of its own); make it with anomaly-localizer fuse "
                         "from released components")
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out} already exists; pass --force to replace it")
    model = src.load_model()
    if half:
        model = model.half()  # stored as float16; the engine computes in float32
    meta = json.loads(json.dumps(src.meta))
    if meta_file:
        extra = read_json(Path(meta_file), "metadata file")
        if not isinstance(extra, dict):
            raise InputError(f"{meta_file} must hold a JSON object of model.json keys")
        meta.update(extra)
    meta["name"] = out.name
    if contrast:
        reads = [contrast] if isinstance(contrast, str) else list(contrast)
        if len(set(reads)) != len(reads):
            raise InputError(f"--contrast {' '.join(reads)}: a contrast is given twice; give each once")
        if len(reads) > 1 and not (src.detector is not None and src.detector.uses_guides):
            raise InputError(f"{src.name} ({src.arch_type}) reads one contrast; give one --contrast (only a model "
                             "that uses a study's other contrasts, such as an anatomy model, takes several)")
        # every contrast required: the model is calibrated with all of them and must be used so
        meta["input_contract"] = {**meta["input_contract"], "contrasts": reads, "optional_contrasts": []}
    meta["calibration"] = {}
    meta.setdefault("provenance", {})["data"] = str(data)  # as given, not this machine's absolute path
    meta["weights_dtype"] = "float16" if half else "float32"
    subjects: list[Subject] = []
    with building(out) as tmp:
        package = save_package(model, meta, tmp)
        if package.arch_type in ANOMALY_TYPES:  # brain extraction models have no thresholds
            subjects = subjects_of(package, data, "calibration", choosable=False)
            package = calibrate_package(package, subjects, device=device, progress=progress)
            update_meta(package.path, package.meta)
    return load_package(out), len(subjects)


def write_index(folder: str | Path, default: str | None = None, brain_extraction: str | None = None,
                prefer: list[str] | None = None) -> dict[str, Any]:
    """Write FOLDER/index.json: the default models and each package's pinned manifest hash."""
    folder = Path(folder)
    old = json.loads((folder / "index.json").read_text()) if (folder / "index.json").is_file() else {}
    (folder / "index.json").unlink(missing_ok=True)  # the packages are checked against their own manifests
    models = {}
    for sub in sorted(folder.iterdir()):
        if (sub / MANIFEST_FILE).is_file():
            p = load_package(sub)
            models[sub.name] = {"manifest_sha256": sha256_file(sub / MANIFEST_FILE), "type": p.arch_type}
    anomaly = [n for n, m in models.items() if m["type"] in ANOMALY_TYPES]
    extraction = [n for n, m in models.items() if m["type"] not in ANOMALY_TYPES]
    index = {"default": default or old.get("default") or (anomaly[0] if anomaly else None),
             "brain_extraction": brain_extraction or old.get("brain_extraction") or
             (extraction[0] if extraction else None),
             "models": models}
    kept = old.get("preference") if isinstance(old.get("preference"), list) else []
    unknown = [n for n in prefer or [] if n not in models]
    if unknown:
        raise InputError(f"--prefer {', '.join(unknown)}: not a model of {folder}")
    preference = [n for n in (prefer if prefer is not None else kept) if n in models]
    if preference:  # the order in which models of several contrasts are chosen (core.study.preference)
        index["preference"] = preference
    (folder / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index
