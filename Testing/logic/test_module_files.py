"""The Slicer module's files agree with each other (the widget itself runs only in Slicer):
every widget the code uses is in the .ui, every parameter-bound widget has a parameter node
field, CMake lists every Python file and resource, and the models reach the module."""

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "AnomalyLocalizer"
UI = MODULE / "Resources" / "UI" / "AnomalyLocalizer.ui"
SCRIPT = MODULE / "AnomalyLocalizer.py"


def _ui_widgets():
    tree = ET.parse(UI)
    widgets = {w.get("name"): w for w in tree.iter("widget") if w.get("name")}
    bound = {}
    for name, w in widgets.items():
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[name] = prop.find("string").text
    return widgets, bound


def _parameter_fields():
    tree = ast.parse(SCRIPT.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "AnomalyLocalizerParameterNode":
            assert any(getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list)
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("no AnomalyLocalizerParameterNode class")


def test_every_widget_the_code_uses_exists_in_the_ui():
    widgets, _ = _ui_widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", SCRIPT.read_text()))
    assert used, "the widget uses no ui names?"
    missing = used - set(widgets)
    assert not missing, f"used in AnomalyLocalizer.py but not in the .ui: {sorted(missing)}"


def test_every_bound_widget_matches_a_parameter_and_every_parameter_has_a_widget():
    _, bound = _ui_widgets()
    fields = _parameter_fields()
    assert set(bound.values()) <= fields, f"unknown parameters in the .ui: {set(bound.values()) - fields}"
    assert fields <= set(bound.values()), f"parameters without a widget: {fields - set(bound.values())}"


def test_ui_is_valid_and_names_are_unique():
    names = [w.get("name") for w in ET.parse(UI).iter("widget") if w.get("name")]
    assert len(names) == len(set(names))


def test_cmake_lists_every_python_file_and_resource():
    cmake = (MODULE / "CMakeLists.txt").read_text()
    listed = set(re.findall(r"^\s+([\w/]+\.py)\s*$", cmake.replace("${MODULE_NAME}", "AnomalyLocalizer"), re.M))
    # the browser viewer is not part of the Slicer module (it runs beside Slicer, not in it)
    on_disk = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py")
               if "__pycache__" not in p.parts and "anomaly_localizer_viewer" not in p.parts}
    assert listed == on_disk, f"missing: {sorted(on_disk - listed)}, stale: {sorted(listed - on_disk)}"
    for res in ("Resources/Icons/${MODULE_NAME}.png", "Resources/UI/${MODULE_NAME}.ui"):
        assert res in cmake
        assert (MODULE / res.replace("${MODULE_NAME}", "AnomalyLocalizer")).is_file()
    assert "WITH_GENERIC_TESTS" in cmake
    # The in-app test needs PyTorch and a download: registered with ctest it would fail on
    # Slicer's extension dashboard, which has neither.
    assert "slicer_add_python_unittest" not in cmake.split("# The in-app test")[0]
    assert not re.search(r"^\s*slicer_add_python_unittest", cmake, re.M)
    assert "add_subdirectory(AnomalyLocalizer)" in (ROOT / "CMakeLists.txt").read_text()


def test_models_are_installed_where_the_engine_looks_for_them():
    cmake = (MODULE / "CMakeLists.txt").read_text()
    # Each model package (a folder with a model.json) and the index, installed once; not
    # models/release or models/results; the build tree copied at build time, not configure time.
    assert "file(GLOB MODEL_JSON_FILES RELATIVE ${MODELS_SOURCE_DIR} ${MODELS_SOURCE_DIR}/*/model.json)" in cmake
    assert re.search(r"install\(DIRECTORY \$\{MODELS_SOURCE_DIR\}/\$\{model_package\}\s+"
                     r"DESTINATION \$\{Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR\}/Resources/Models", cmake)
    assert "install(FILES ${MODELS_SOURCE_DIR}/index.json" in cmake
    assert len(re.findall(r"^\s*install\(", cmake, re.M)) == 2
    code = "\n".join(line for line in cmake.splitlines() if not line.lstrip().startswith("#"))
    assert "file(COPY" not in code and "add_custom_target(${MODULE_NAME}Models ALL" in cmake
    models = ROOT / "models"
    packages = {p.parent.name for p in models.glob("*/model.json")}
    assert packages and not packages & {"release", "results"} and (models / "index.json").is_file()
    from anomaly_localizer.core import package
    # installed layout: <qt-scripted-modules>/anomaly_localizer/core/package.py -> <qt-scripted-modules>/Resources/Models
    here = Path(package.__file__).resolve().parent.parent
    assert here.parent / "Resources" / "Models" in package.SHIPPED_MODELS_DIRS
    assert ROOT / "models" in package.SHIPPED_MODELS_DIRS


def test_module_file_does_not_import_torch_or_the_engine_at_load():
    tree = ast.parse(SCRIPT.read_text())
    top_imports = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_imports |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top_imports.add((node.module or "").split(".")[0])
    assert not top_imports & {"torch", "anomaly_localizer", "safetensors"}


def test_logic_never_imports_qt():
    for path in (MODULE / "AnomalyLocalizerLib").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(qt|ctk|PythonQt)\b", text, re.M), path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer":
                assert node.attr not in {"app", "mrmlScene", "modules"}, f"{path}: slicer.{node.attr}"


def test_engine_never_imports_slicer_qt_or_vtk():
    for path in (MODULE / "anomaly_localizer").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(slicer|qt|vtk|ctk)\b", text, re.M), path


def test_widget_and_in_app_test_call_only_logic_methods_that_exist():
    from AnomalyLocalizerLib.logic import AnomalyLocalizerLogic
    used = set(re.findall(r"\blogic\.(\w+)", SCRIPT.read_text()))
    attributes = {"result", "method", "threshold", "opacity"}  # set in __init__
    missing = {u for u in used if not hasattr(AnomalyLocalizerLogic, u)} - attributes
    assert not missing, f"the widget calls logic methods that do not exist: {sorted(missing)}"


def test_the_parameter_node_is_tagged_with_this_module_and_methods_come_from_the_run():
    text = SCRIPT.read_text()
    assert "ScriptedLoadableModuleLogic().getParameterNode()" not in text  # would tag it "ScriptedLoadableModule"
    assert '.moduleName = "AnomalyLocalizer"' in text
    _, bound = _ui_widgets()
    assert "methodSelector" not in bound  # filled from the run's maps, the recommended one selected
    assert "self.ui.methodSelector.setCurrentText(self.logic.method)" in text


def _function(name: str) -> ast.FunctionDef:
    for node in ast.walk(ast.parse(SCRIPT.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise AssertionError(f"no {name} in AnomalyLocalizer.py")


def test_the_panel_is_restored_after_a_failure():
    """slicer.util.tryWithErrorDisplay shows an error and raises it again: what must run after
    a failure (the Apply/Cancel button, the result controls) runs in a `finally`."""
    for name, restores in [("onApplyButton", {"updateApplyButton"}),
                           ("onPollRun", {"updateApplyButton", "updateResultControls"})]:
        finals = [n for t in ast.walk(_function(name)) if isinstance(t, ast.Try) for n in t.finalbody]
        called = {c.func.attr for f in finals for c in ast.walk(f)
                  if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)}
        assert restores <= called, f"{name} restores {sorted(called)} in finally"


def test_the_gui_connection_can_be_undone_in_every_slicer():
    """Slicer 5.8's connectGui returns no tag, so disconnectGui could not undo it."""
    text = SCRIPT.read_text()
    assert ".connectGui(" not in text and ".connectParametersToGui(" in text


def test_the_install_check_imports_nothing_heavy_and_cleanup_stops_everything():
    text = SCRIPT.read_text()
    assert not re.search(r"^\s*import (torch|safetensors|pydantic)\b", text, re.M)
    assert "unmet_requirements()" in text and "torchVersionRequirement=" in text
    cleanup = ast.unparse(_function("cleanup"))
    assert "self._timer.stop()" in cleanup and "self.logic.cleanup()" in cleanup
    scene_close = ast.unparse(_function("onSceneStartClose"))
    assert "self._timer.stop()" in scene_close and "updateResultControls" in scene_close


def test_threshold_ranges_agree():
    from AnomalyLocalizerLib.threshold import SLIDER_MAX_LEVEL, SLIDER_MIN_LEVEL
    from anomaly_localizer.core.levels import MAX_LEVEL, MIN_LEVEL
    assert f"WithinRange({SLIDER_MIN_LEVEL}, {SLIDER_MAX_LEVEL})" in SCRIPT.read_text()
    widgets, _ = _ui_widgets()
    props = {p.get("name"): p.find("double").text for p in widgets["thresholdSlider"].findall("property")
             if p.find("double") is not None}
    assert float(props["minimum"]) == SLIDER_MIN_LEVEL and float(props["maximum"]) <= SLIDER_MAX_LEVEL
    assert MIN_LEVEL <= SLIDER_MIN_LEVEL < SLIDER_MAX_LEVEL <= MAX_LEVEL


def test_help_links_nowhere_that_does_not_exist_and_credits_every_method():
    text = SCRIPT.read_text() + (ROOT / "CMakeLists.txt").read_text()
    assert "github.com/anomaly-localizer" not in text and "SlicerAnomalyLocalizer" not in text
    for authors in ("Zimmerer", "Chen", "Konukoglu", "Naval Marimont", "Tarroni", "Kascenas", "Baugh", "IXI",
                    "BraTS"):
        assert authors in SCRIPT.read_text(), authors


def test_one_input_selector_per_engine_contrast_each_bound_to_its_parameter():
    """The panel shows one selector per contrast the chosen model reads: the .ui has one for
    each of the engine's contrasts, bound to its parameter, scene-aware, and never filled by
    Qt itself (noneEnabled: the logic suggests the volumes)."""
    from anomaly_localizer.core.contrast import CONTRASTS
    names = {}
    for node in ast.parse(SCRIPT.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("CONTRASTS", "INPUT_PARAMETERS"):
                names[node.targets[0].id] = ast.literal_eval(node.value)
    assert tuple(names["CONTRASTS"]) == CONTRASTS and set(names["INPUT_PARAMETERS"]) == set(CONTRASTS)
    widgets, bound = _ui_widgets()
    scene_aware = {c.find("receiver").text for c in ET.parse(UI).iter("connection")
                   if c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"}
    for contrast in CONTRASTS:
        selector = f"{contrast}InputSelector"
        assert widgets[selector].get("class") == "qMRMLNodeComboBox" and f"{contrast}InputLabel" in widgets
        assert bound[selector] == names["INPUT_PARAMETERS"][contrast]
        props = {p.get("name"): p for p in widgets[selector].findall("property")}
        assert props["noneEnabled"].find("bool").text == "true"
        assert selector in scene_aware
    assert "inputSelector" not in widgets and "inputVolume" not in _parameter_fields()
    text = SCRIPT.read_text()
    # the widget only wires: which inputs, which volumes and what a run read come from the logic
    for call in ("self.logic.suggestInputs(", "self.logic.selectInputs(", "self.logic.inputsBeforeInstall(",
                 "self.logic.runInputsText(", "self.logic.startRun(inputs,"):
        assert call in text, call
