"""Command line: ``python benchmarks/run.py --suite single_decode --out DIR [--smoke] [--filter S]
[--providers a,b] [--cuda-graph auto|on|off] [--list]``. See benchmarks/harness.py."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # repo root: flashtile, benchmarks

from benchmarks.harness import main, run_suites  # noqa: E402

__all__ = ["main", "run_suites"]

if __name__ == "__main__":
    sys.exit(main())
