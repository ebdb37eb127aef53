"""A Slicer application logic without the Slicer application (PyPI slicer-core).

Sets up the scene, application logic and module logics the way Slicer does, so that
:class:`AnomalyLocalizerLogic` can be scripted headless, tested, and benchmarked. Inside
Slicer use ``slicer.app.applicationLogic()`` instead.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import slicer
import vtk


class SlicerApp:
    """Application logic with the module logics the AnomalyLocalizer logic needs.

    VTK module logics must stay referenced from Python, or they are deleted.
    """

    def __init__(self):
        self.scene = slicer.vtkMRMLScene()
        self.app = slicer.vtkSlicerApplicationLogic()
        self.app.SetMRMLScene(self.scene)
        # Slicer's colour logic reads colour files from HOME/SHARE/ColorFiles; without a Slicer
        # installation there are none, so point it at an empty folder of our own: the
        # built-in colour tables are used, without VTK's red "HomeDirectory is not set" error.
        home = Path(tempfile.gettempdir()) / "anomaly-localizer-slicer-home"
        (home / "share" / "ColorFiles").mkdir(parents=True, exist_ok=True)
        self.app.SetHomeDirectory(str(home))
        self.app.SetShareDirectory("share")
        self.app.SetSliceLogics(vtk.vtkCollection())
        self.app.SetViewLogics(vtk.vtkCollection())
        self.colors = slicer.vtkSlicerColorLogic()
        self.colors.SetMRMLApplicationLogic(self.app)
        self.colors.SetMRMLScene(self.scene)
        self.app.SetColorLogic(self.colors)
        self.app.SetModuleLogic("Colors", self.colors)
        self.logics = {}
        for name, cls in [("Volumes", slicer.vtkSlicerVolumesLogic),
                          ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                          ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
                          ("Tables", slicer.vtkSlicerTablesLogic), ("Plots", slicer.vtkSlicerPlotsLogic)]:
            logic = cls()
            logic.SetMRMLScene(self.scene)
            logic.SetMRMLApplicationLogic(self.app)
            self.app.SetModuleLogic(name, logic)
            self.logics[name] = logic
        self.sliceLogics = []

    def addSliceView(self, name: str = "Red", orientation: str = "Axial"):
        sliceLogic = slicer.vtkMRMLSliceLogic()
        sliceLogic.SetMRMLApplicationLogic(self.app)
        sliceLogic.SetMRMLScene(self.scene)
        sliceNode = sliceLogic.AddSliceNode(name)
        sliceNode.SetOrientation(orientation)
        self.app.GetSliceLogics().AddItem(sliceLogic)
        self.sliceLogics.append(sliceLogic)
        return sliceLogic

    def loadVolume(self, path: Path, name: str, labelmap: bool = False):
        volumes = self.logics["Volumes"]
        props = 1 if labelmap else 0
        node = volumes.AddArchetypeVolume(str(path), name, props)
        assert node is not None, f"could not load {path}"
        return node

    def nodeCount(self) -> int:
        return self.scene.GetNumberOfNodes()


def renderSliceView(app: SlicerApp, sliceLogic, path, size: tuple[int, int] = (400, 400),
                    segmentations: bool = True) -> Path:
    """Render a slice view offscreen with Slicer's own slice pipeline and write a PNG.

    Background, foreground and label layers come from the slice logic's blended image;
    segmentations are drawn by Slicer's 2D segmentation displayable manager. Needs a working
    offscreen OpenGL (EGL or OSMesa); without one VTK may crash, so callers check in a
    child process first.
    """
    width, height = size
    renderWindow = vtk.vtkRenderWindow()
    renderWindow.SetOffScreenRendering(1)
    renderWindow.SetSize(width, height)
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0, 0, 0)
    renderWindow.AddRenderer(renderer)
    interactor = vtk.vtkRenderWindowInteractor()
    interactor.SetRenderWindow(renderWindow)

    sliceNode = sliceLogic.GetSliceNode()
    sliceLogic.ResizeSliceNode(width, height)
    mapper = vtk.vtkImageMapper()
    mapper.SetInputConnection(sliceLogic.GetImageDataConnection())
    mapper.SetColorWindow(255)
    mapper.SetColorLevel(127.5)
    actor = vtk.vtkActor2D()
    actor.SetMapper(mapper)
    renderer.AddActor2D(actor)

    group = None
    if segmentations:
        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        factory.SetMRMLApplicationLogic(app.app)
        if not factory.IsDisplayableManagerRegistered("vtkMRMLSegmentationsDisplayableManager2D"):
            factory.RegisterDisplayableManager("vtkMRMLSegmentationsDisplayableManager2D")
        group = factory.InstantiateDisplayableManagers(renderer)
        group.SetMRMLDisplayableNode(sliceNode)
    sliceLogic.GetImageDataConnection().GetProducer().Update()
    if group is not None:
        group.RequestRender()
    renderWindow.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(renderWindow)
    grab.Update()
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    return Path(path)
