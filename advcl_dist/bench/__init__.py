"""Benchmarks behind `tools/bench.py`; each prints a table and one JSON line last."""
