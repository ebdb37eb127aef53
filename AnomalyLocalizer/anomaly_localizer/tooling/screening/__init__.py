"""Screening many scans into a ranked worklist, on one machine or a Dask cluster."""
