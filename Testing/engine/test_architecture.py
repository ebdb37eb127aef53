"""The layers of the code, as rules on its import graph (imports inside functions count).

- The scoring core (``anomaly_localizer.core``) imports neither tooling nor the command line.
- Tooling (``anomaly_localizer.tooling``) never imports the command line, and nothing outside
  the command line does.
- Tooling is grouped by concern, each group importing only those below it: evaluation, then
  release (making a trained model shippable), then training, then screening; ``tooling.data``
  and ``tooling.metrics`` serve them all.
- The Slicer logic (``AnomalyLocalizerLib``) uses only the engine's core.
- The browser viewer (``anomaly_localizer_viewer``) uses the logic and the engine's core, and
  nothing imports it.
- No import cycles; no source file over 500 lines.
- A detector family module imports nothing heavy when it is imported (the registry is read
  to list models, in Slicer before PyTorch is installed).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "AnomalyLocalizer"
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """Project modules ``module`` imports anywhere in its file (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in known}


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    return {m: _imports(p, m, known) - {m} for m, p in sources.items()}


def test_the_scoring_core_imports_no_tooling_and_no_command_line():
    for module, deps in _graph().items():
        if module.startswith("anomaly_localizer.core"):
            bad = {d for d in deps if d.startswith(("anomaly_localizer.tooling", "anomaly_localizer.cli"))}
            assert not bad, f"{module} imports {sorted(bad)}"


def test_only_the_command_line_imports_the_command_line():
    for module, deps in _graph().items():
        if not module.startswith("anomaly_localizer.cli"):
            bad = {d for d in deps if d.startswith("anomaly_localizer.cli")}
            assert not bad, f"{module} imports {sorted(bad)}"


TOOLING_LAYERS = ("evaluation", "release", "training", "screening")  # lowest first
TOOLING_BASE = ("anomaly_localizer.tooling", "anomaly_localizer.tooling.data", "anomaly_localizer.tooling.rendering",
                "anomaly_localizer.tooling.metrics")  # data: scans, their renderings in other contrasts, metrics


def test_tooling_groups_import_only_the_groups_below_them():
    graph = _graph()
    tooling = {m for m in graph if m.startswith("anomaly_localizer.tooling")}
    grouped = {m for m in tooling if len(m.split(".")) > 2 and m.split(".")[2] in TOOLING_LAYERS}
    flat = tooling - set(TOOLING_BASE) - grouped
    assert not flat, f"tooling modules outside the groups {TOOLING_LAYERS}: {sorted(flat)}"
    for module in grouped:
        layer = TOOLING_LAYERS.index(module.split(".")[2])
        for dep in graph[module]:
            if dep.startswith("anomaly_localizer.tooling.") and dep not in TOOLING_BASE:
                assert TOOLING_LAYERS.index(dep.split(".")[2]) <= layer, f"{module} imports {dep}"
    for base in TOOLING_BASE[1:]:
        bad = {d for d in graph[base] if d.startswith("anomaly_localizer.tooling.") and d not in TOOLING_BASE}
        assert not bad, f"{base} imports {sorted(bad)}"


def test_the_slicer_logic_uses_only_the_engines_core():
    for module, deps in _graph().items():
        if module.startswith("AnomalyLocalizerLib") or module == "AnomalyLocalizer":
            bad = {d for d in deps if d.startswith("anomaly_localizer")
                   and not d.startswith(("anomaly_localizer.core", "anomaly_localizer.errors"))}
            assert not bad, f"{module} imports {sorted(bad)}"


def test_the_browser_viewer_sits_above_the_logic_and_nothing_imports_it():
    """The viewer (like the Qt panel) uses the Slicer logic and the engine's core; neither the
    engine nor the logic imports it (the command line finds it through an entry point)."""
    graph = _graph()
    viewer = {m for m in graph if m.startswith("anomaly_localizer_viewer")}
    assert viewer, "no viewer package found"
    for module, deps in graph.items():
        if module in viewer:
            bad = {d for d in deps if d.startswith("anomaly_localizer.")
                   and not d.startswith(("anomaly_localizer.core", "anomaly_localizer.errors"))}
            assert not bad, f"{module} imports {sorted(bad)}"
        else:
            bad = {d for d in deps if d.startswith("anomaly_localizer_viewer")}
            assert not bad, f"{module} imports the viewer: {sorted(bad)}"
        if module.startswith("anomaly_localizer."):
            assert not {d for d in deps if d.startswith("AnomalyLocalizerLib")}, f"{module} imports the logic"


def test_there_are_no_import_cycles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            strongconnect(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_source_file_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_listing_detectors_and_models_imports_no_torch():
    code = ("import sys\n"
            "from anomaly_localizer.core import detectors, package\n"
            "assert detectors.all_detectors() and package.ALL_METHODS\n"
            "[package.load_package(p).methods for p in package.list_packages()]\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
