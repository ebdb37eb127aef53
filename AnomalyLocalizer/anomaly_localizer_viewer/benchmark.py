"""How long one threshold move takes in the browser viewer on a 1 mm scan (a benchmark, not a test).

Run: ``python -m anomaly_localizer_viewer.benchmark`` (needs the viewer extra and offscreen
OpenGL). On a 256x256x180 volume with a synthetic heatmap it times, per slider position, what
the server does for one move: threshold the map, update the segmentation, and render the three
slice views once (each 512x512, offscreen, with Slicer's displayable managers). On top come
the scheduler's wait (the server renders a changed view within 1/30 s) and streaming the
pictures to the browser (trame-slicer encodes and sends the changed views).
Prints the median and 95th percentile and the machine it ran on.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import numpy as np

VIEW_SIZE = 512


def main() -> int:
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    from AnomalyLocalizerLib.benchmark_threshold import SHAPE, syntheticResult
    from trame_slicer.core import SlicerApp
    from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition
    from trame_slicer.views.render_scheduler import NoScheduleRendering

    from .session import ViewerSession, prepareSliceViews

    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    views = [app.view_manager.create_view(d) for d in (ViewLayoutDefinition.axial_view(),
                                                        ViewLayoutDefinition.coronal_view(),
                                                        ViewLayoutDefinition.sagittal_view())]
    prepareSliceViews(views)  # as the page's views
    for view in views:
        # The server renders each changed view once per move, at most 30 times a second
        # (trame-slicer's asyncio scheduler); render once per move here as well, rather
        # than on every Modified event as the direct scheduler would.
        view.set_scheduled_render(NoScheduleRendering())
    session = ViewerSession(app)
    try:
        scan, brain = syntheticResult(session.logic)
        session.scan = scan
        session._afterResult()
        for view in views:
            view.render_window().SetSize(VIEW_SIZE, VIEW_SIZE)
            view.reset_view()
            view.render()
        times = []
        for level in np.linspace(0.05, 0.95, 60):
            t0 = time.perf_counter()
            session.setThreshold(float(level))
            for view in views:
                view.render()
            times.append(1000 * (time.perf_counter() - t0))
    finally:
        session.close()
    times.sort()
    print(f"viewer threshold move on {SHAPE[2]}x{SHAPE[1]}x{SHAPE[0]} ({int(brain.sum())} brain voxels), "
          f"segmentation updated and 3 slice views of {VIEW_SIZE}x{VIEW_SIZE} rendered, {len(times)} positions: "
          f"median {statistics.median(times):.1f} ms, 95th percentile {times[int(0.95 * len(times)) - 1]:.1f} ms; "
          f"{platform.machine()}, {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
