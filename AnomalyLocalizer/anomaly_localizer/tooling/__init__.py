"""Tooling above the scoring core: training, calibration and tuning, evaluation and
benchmarks, model cards and package releases. It never imports the command line."""
