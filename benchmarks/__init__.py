"""flashtile benchmarks: one harness (harness.py) and per-area case files (bench_*.py)."""
