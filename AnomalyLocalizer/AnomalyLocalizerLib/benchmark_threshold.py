"""Latency of the live threshold on a 1 mm 256x256x180 volume (a benchmark, not a test).

Run: ``PYTHONPATH=AnomalyLocalizer python -m AnomalyLocalizerLib.benchmark_threshold``
(needs slicer-core). Prints the median and 95th percentile of ``setThreshold`` over a sweep
of thresholds, as a slider produces them, and the machine it ran on.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import numpy as np

from .headless import SlicerApp
from .logic import AnomalyLocalizerLogic, RunResult


SHAPE = (180, 256, 256)  # k, j, i: a 1 mm whole head


def syntheticResult(logic: AnomalyLocalizerLogic):
    """A 1 mm volume with a synthetic heatmap (a "lesion" block over gamma noise in an
    ellipsoid brain) applied as a run's result; returns the volume node and the brain mask."""
    import slicer.util as su

    rng = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij", sparse=True)
    brain = (zz ** 2 / 0.7 + yy ** 2 / 0.8 + xx ** 2 / 0.6) < 1
    heat = (rng.gamma(2.0, 0.1, size=SHAPE) * brain).astype(np.float32)
    heat[60:90, 100:140, 90:130] += 1.0  # a "lesion"
    scan = logic.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "scan")
    su.updateVolumeFromArray(scan, (brain * 100).astype(np.float32))
    result = RunResult(scan.GetID(), {"combi": heat}, brain, {k: np.zeros(SHAPE[0]) for k in ("elbo", "kl", "rec")},
                       2, {"model": {"name": "synthetic"}})

    class _Package:  # no calibration: anomaly level 1.0 is the map's maximum
        calibration: dict = {}

        @staticmethod
        def default_threshold(method):
            return None

    logic._applyResult(scan, result, _Package())
    return scan, brain


def main() -> int:
    app = SlicerApp()
    logic = AnomalyLocalizerLogic(app.app)
    _, brain = syntheticResult(logic)
    shape = SHAPE
    levels = np.linspace(0.05, 0.95, 60)
    times = []
    for level in levels:
        t0 = time.perf_counter()
        logic.setThreshold(float(level))
        times.append(1000 * (time.perf_counter() - t0))
    times.sort()
    print(f"setThreshold on {shape[2]}x{shape[1]}x{shape[0]} ({int(brain.sum())} brain voxels), {len(times)} levels: "
          f"median {statistics.median(times):.1f} ms, 95th percentile {times[int(0.95 * len(times)) - 1]:.1f} ms; "
          f"{platform.machine()}, {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
