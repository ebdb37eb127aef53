"""The engine and the module import on Python 3.9, the Python of Slicer 5.8.

No Python 3.9 can be installed on these machines, so what can be checked is checked
statically: vermin finds syntax and library calls newer than 3.9, and the annotations that
pydantic evaluates at run time (where ``from __future__ import annotations`` does not help)
use ``Optional``/``Union`` rather than the 3.10 ``X | None`` syntax.
"""

from __future__ import annotations

import ast
import inspect
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import BaseModel

MODULE_DIR = Path(__file__).resolve().parents[2] / "AnomalyLocalizer"
OLDEST_PYTHON = "3.9"  # Slicer 5.8's Python (Slicer's CMakeLists.txt, Slicer_REQUIRED_PYTHON_VERSION)


def test_vermin_finds_nothing_newer_than_the_oldest_supported_python():
    vermin = shutil.which("vermin", path=str(Path(sys.executable).parent)) or shutil.which("vermin")
    if vermin is None:
        pytest.skip("vermin is not installed (pip install -e .[test])")
    paths = [MODULE_DIR / "anomaly_localizer", MODULE_DIR / "AnomalyLocalizerLib", MODULE_DIR / "AnomalyLocalizer.py"]
    done = subprocess.run([vermin, "-q", "--no-tips", "--violations", f"-t={OLDEST_PYTHON}-", *map(str, paths)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _pydantic_models() -> list[type[BaseModel]]:
    import importlib
    import pkgutil

    import anomaly_localizer
    for info in pkgutil.walk_packages(anomaly_localizer.__path__, "anomaly_localizer."):
        if not info.name.endswith("__main__"):  # importing __main__ would run the command line
            importlib.import_module(info.name)
    found, todo = [], [BaseModel]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("anomaly_localizer."):
                found.append(sub)
    return found


def _union_operators(annotation: ast.expr) -> list[str]:
    return [ast.unparse(node) for node in ast.walk(annotation)
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr)]


def test_pydantic_annotations_use_no_union_operator():
    models = _pydantic_models()
    assert len(models) > 10, "the engine's model.json schema was not found"
    offenders = []
    for model in models:
        tree = ast.parse(textwrap.dedent(inspect.getsource(model)))
        for node in ast.walk(tree):
            if isinstance(node, ast.AnnAssign):
                offenders += [f"{model.__module__}.{model.__name__}: {u}" for u in _union_operators(node.annotation)]
    assert not offenders, "pydantic evaluates these at run time; Python 3.9 cannot (use Optional/Union):\n" + \
        "\n".join(offenders)


def test_the_module_declares_the_oldest_python_it_supports():
    pyproject = (MODULE_DIR.parent / "pyproject.toml").read_text()
    assert f'requires-python = ">={OLDEST_PYTHON}"' in pyproject
