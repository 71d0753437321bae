"""Dex's benchmarks: `python bench/run.py [--quick] [--only NAME]` (see shared BENCH.md). Not tests."""
