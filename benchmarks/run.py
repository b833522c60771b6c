"""Command line of the benchmark harness (benchmarks/harness.py), from the repository root:

    python -m benchmarks.run --suite single_decode --out DIR [--smoke] [--filter S] [--providers a,b]
        [--cuda-graph auto|on|off] [--graph-span-us US] [--list]
    python -m benchmarks.run --suite merge_state --tune [GRIDS] [--rounds N]   # the suite's tuning grids

``python benchmarks/run.py ...`` works too: run as a file, it puts the repository root on the path
first (the one place the benchmarks do so).
"""

import pathlib
import sys

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.harness import main, run_suites

__all__ = ["main", "run_suites"]

if __name__ == "__main__":
    sys.exit(main())
