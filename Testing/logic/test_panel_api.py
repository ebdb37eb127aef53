"""The Qt panel against the API of the classes it uses (the panel itself only runs in Slicer).

The table below lists, for each widget class the module's .ui uses, the members the module
may use: Qt 5's (doc.qt.io, Qt 5.15, which Slicer 5.8 and later build on), CTK's
(commontk/CTK: Libs/Widgets/ctkSliderWidget.h, ctkCollapsibleButton.h) and Slicer's
(Libs/MRML/Widgets/qMRMLNodeComboBox.h, qMRMLWidget.h). A member the code uses that is not
in the table is a name Slicer's classes may not have: check it in those sources, then add it.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

MODULE = Path(__file__).resolve().parents[2] / "AnomalyLocalizer"
UI = MODULE / "Resources" / "UI" / "AnomalyLocalizer.ui"
SCRIPT = MODULE / "AnomalyLocalizer.py"

QOBJECT = {"connect", "blockSignals", "property", "setProperty", "objectName", "findChildren"}
QWIDGET = QOBJECT | {"enabled", "visible", "setVisible", "toolTip", "setEnabled", "show", "hide"}
API = {  # class: (base members, signals, other members)
    "QWidget": (QWIDGET, set(), set()),
    "qMRMLWidget": (QWIDGET, {"mrmlSceneChanged(vtkMRMLScene*)"}, {"setMRMLScene", "mrmlScene"}),
    "QLabel": (QWIDGET, set(), {"text", "wordWrap", "setText"}),
    "QPushButton": (QWIDGET, {"clicked(bool)", "clicked()", "toggled(bool)"}, {"text", "setText", "checkable"}),
    "QCheckBox": (QWIDGET, {"toggled(bool)", "stateChanged(int)", "clicked(bool)"}, {"checked", "text"}),
    "QComboBox": (QWIDGET, {"currentIndexChanged(int)", "currentTextChanged(QString)"},
                  {"addItem", "clear", "count", "currentData", "currentIndex", "setCurrentIndex", "currentText",
                   "setCurrentText", "itemData", "itemText"}),
    "QProgressBar": (QWIDGET, {"valueChanged(int)"}, {"value", "format", "minimum", "maximum", "setValue"}),
    "QTableWidget": (QWIDGET, {"cellClicked(int,int)", "cellDoubleClicked(int,int)", "itemSelectionChanged()"},
                     {"setColumnCount", "setRowCount", "setHorizontalHeaderLabels", "setItem", "item", "rowCount",
                      "columnCount", "resizeColumnsToContents", "clearContents", "selectRow"}),
    "ctkSliderWidget": (QWIDGET, {"valueChanged(double)", "valueIsChanging(double)"},
                        {"value", "minimum", "maximum", "singleStep", "decimals", "setRange", "tracking"}),
    "ctkCollapsibleButton": (QWIDGET, {"contentsCollapsed(bool)"}, {"collapsed", "text"}),
    "qMRMLNodeComboBox": (QWIDGET, {"currentNodeChanged(vtkMRMLNode*)", "currentNodeChanged(bool)"},
                          {"currentNode", "setCurrentNode", "nodeTypes", "setMRMLScene", "noneEnabled"}),
}
LAYOUTS = {"QGridLayout", "QVBoxLayout", "QHBoxLayout", "QFormLayout"}


def _ui_classes() -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in ET.parse(UI).iter("widget") if w.get("name")}


def test_every_widget_class_of_the_ui_is_a_known_qt_ctk_or_slicer_class():
    unknown = {c for c in _ui_classes().values() if c not in API}
    layouts = {layout.get("class") for layout in ET.parse(UI).iter("layout")}
    assert not unknown, f"widget classes the table does not know: {sorted(unknown)}"
    assert layouts <= LAYOUTS


def test_every_member_the_panel_uses_exists_on_its_widgets_class():
    classes = _ui_classes()
    text = SCRIPT.read_text()
    problems = []
    for name, member in set(re.findall(r"self\.ui\.(\w+)\.(\w+)", text)):
        base, signals, members = API[classes[name]]
        if member not in base | members:
            problems.append(f"{name} ({classes[name]}).{member}")
    for name, signal in set(re.findall(r'self\.ui\.(\w+)\.connect\("([^"]+)"', text)):
        if signal not in API[classes[name]][1]:
            problems.append(f"{name} ({classes[name]}) has no signal {signal}")
    # widgets reached through a local name or a loop: the findings table and the result controls
    for member in re.findall(r"\btable\.(\w+)\(", text):
        if member not in API["QTableWidget"][0] | API["QTableWidget"][2]:
            problems.append(f"findingsTable (QTableWidget).{member}")
    assert not problems, "members not in the table of Slicer/CTK/Qt classes:\n" + "\n".join(sorted(problems))


def test_the_module_imports_only_names_slicer_58_provides():
    """slicer.parameterNodeWrapper (Choice, WithinRange, parameterNodeWrapper) and
    slicer.util.VTKObservationMixin exist from Slicer 5.2; the module imports nothing newer
    (e.g. slicer.packaging, from 5.12)."""
    imports = set(re.findall(r"^from (slicer[\w.]*) import", SCRIPT.read_text(), re.M))
    assert imports <= {"slicer", "slicer.parameterNodeWrapper", "slicer.ScriptedLoadableModule", "slicer.util"}
    assert "slicer.packaging" not in SCRIPT.read_text()


def test_the_input_selectors_reached_by_contrast_use_only_their_classes_members():
    """The input selectors and their labels are reached by contrast (``selector`` and ``label``
    in updateInputSelectors), which the table above checks too."""
    text = SCRIPT.read_text()
    assert 'label, selector = getattr(self.ui, f"{contrast}InputLabel"), getattr(self.ui, f"{contrast}InputSelector")' \
        in text
    used = {("qMRMLNodeComboBox", m) for m in re.findall(r"\bselector\.(\w+)", text)}
    used |= {("QLabel", m) for m in re.findall(r"\blabel\.(\w+)", text)}
    assert used
    problems = [f"{cls}.{member}" for cls, member in used if member not in API[cls][0] | API[cls][2]]
    assert not problems, problems
    classes = _ui_classes()
    assert {classes[n] for n in classes if n.endswith("InputSelector")} == {"qMRMLNodeComboBox"}
    assert {classes[n] for n in classes if n.endswith("InputLabel")} == {"QLabel"}
