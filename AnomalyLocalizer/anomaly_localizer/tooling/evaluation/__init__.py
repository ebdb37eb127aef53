"""Measuring models: synthetic and real cases with a ground truth, metrics' use, benchmarks, the demo picture."""
