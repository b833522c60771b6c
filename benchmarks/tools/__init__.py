"""Diagnostics beside the benchmark harness: host-time tables, compile checks, timelines (see
docs/benchmarks.md, "Diagnostics"). Run each as ``python -m benchmarks.tools.NAME`` from the repository root."""
