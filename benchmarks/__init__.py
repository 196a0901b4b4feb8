"""Benchmarks for torchgeo-dofa: ``python benchmarks/run.py`` (``make bench``)."""
