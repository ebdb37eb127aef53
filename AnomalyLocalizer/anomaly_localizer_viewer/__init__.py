"""The browser viewer: ``anomaly-localizer view`` (optional extra ``viewer``).

A local web app on trame-slicer (Kitware): Slicer's own MRML scene, slice views and segment
editor effects, driven by the same logic layer as the Slicer module
(:class:`AnomalyLocalizerLib.logic.AnomalyLocalizerLogic`). It sits above that layer, like the
Qt panel: :mod:`.session` holds every decision (what to open, run, threshold, export) and is
tested against real Slicer classes; :mod:`.app` is the page's wiring; :mod:`.command` registers
the command with the engine's command line without the engine importing it.
"""
