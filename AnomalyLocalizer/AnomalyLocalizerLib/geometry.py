"""Volume nodes and SimpleITK images on the same exact grid (RAS in Slicer, LPS in ITK)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import vtk
from slicer import util as sutil


def volumeNodeToImage(volumeNode) -> sitk.Image:
    """A SimpleITK image (LPS) with the node's voxels and exact geometry (RAS in Slicer)."""
    arr = sutil.arrayFromVolume(volumeNode)
    if arr is None:
        raise ValueError(f"volume {volumeNode.GetName()} has no image data; load a volume first")
    image = sitk.GetImageFromArray(np.array(arr, copy=True))
    image.SetSpacing(volumeNode.GetSpacing())
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    origin = ras_to_lps @ np.array(volumeNode.GetOrigin())
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASDirectionMatrix(m)
    direction = ras_to_lps @ np.array([[m.GetElement(r, c) for c in range(3)] for r in range(3)])
    image.SetOrigin(tuple(origin))
    image.SetDirection(tuple(direction.ravel()))
    return image


def imageToVolumeNode(scene, image: sitk.Image, name: str):
    """A new scalar volume node holding a SimpleITK image (LPS) on its exact grid (RAS)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    try:
        lps_to_ras = np.diag([-1.0, -1.0, 1.0])
        direction = lps_to_ras @ np.array(image.GetDirection(), dtype=float).reshape(3, 3)
        m = vtk.vtkMatrix4x4()
        for r in range(3):
            for c in range(3):
                m.SetElement(r, c, direction[r, c] * image.GetSpacing()[c])
            m.SetElement(r, 3, (lps_to_ras @ np.array(image.GetOrigin(), dtype=float))[r])
        node.SetIJKToRASMatrix(m)
        sutil.updateVolumeFromArray(node, sitk.GetArrayFromImage(image))
        node.CreateDefaultDisplayNodes()
    except BaseException:
        scene.RemoveNode(node)
        raise
    return node


def copyGeometry(source, target) -> None:
    """Give ``target`` the IJK-to-RAS geometry and parent transform of ``source``."""
    m = vtk.vtkMatrix4x4()
    source.GetIJKToRASMatrix(m)
    target.SetIJKToRASMatrix(m)
    target.SetAndObserveTransformNodeID(source.GetTransformNodeID())


def sameLattice(orientedImage, volumeNode) -> bool:
    """True when a segment's internal labelmap indexes the volume's own voxel lattice."""
    a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    orientedImage.GetImageToWorldMatrix(a)
    volumeNode.GetIJKToRASMatrix(b)
    return all(abs(a.GetElement(r, c) - b.GetElement(r, c)) < 1e-6 for r in range(4) for c in range(4))


def screenEdgeLetters(sliceNode) -> dict[str, str] | None:
    """The patient directions at a slice view's four screen edges ({"left": "R", "right": "L",
    "top": "A", "bottom": "P"} for Slicer's axial view: radiological), read from the view's
    slice-to-RAS matrix, so an oblique or flipped view is labelled as it is shown; None without
    a slice node. Each edge takes the patient axis the screen direction runs most along."""
    if sliceNode is None:
        return None
    m = sliceNode.GetSliceToRAS()
    letters = (("R", "L"), ("A", "P"), ("S", "I"))  # +x, +y, +z of RAS and their opposites

    def toward(column: int, sign: float) -> str:
        v = [sign * m.GetElement(r, column) for r in range(3)]
        axis = max(range(3), key=lambda r: abs(v[r]))
        return letters[axis][0 if v[axis] > 0 else 1]
    return {"right": toward(0, 1.0), "left": toward(0, -1.0), "top": toward(1, 1.0), "bottom": toward(1, -1.0)}
