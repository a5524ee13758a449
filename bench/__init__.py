"""Benchmark scripts; `python -m bench` runs the suite behind BENCHMARKS.md's main table."""
