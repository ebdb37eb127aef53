"""Helpers of the AnomalyLocalizer Slicer module.

``logic`` holds :class:`AnomalyLocalizerLogic`, which uses Slicer's MRML API and VTK but no
Qt, so it runs inside Slicer and headless under the PyPI package ``slicer-core``.
"""
