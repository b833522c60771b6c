"""``flashtile bench``: the benchmark harness (``benchmarks/``, present in a source checkout only)."""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Optional

from .common import parse_list


def _benchmarks_root() -> Optional[pathlib.Path]:
    """The source checkout that holds ``benchmarks/harness.py`` beside the flashtile package, if any."""
    root = pathlib.Path(__file__).resolve().parents[2]
    return root if (root / "benchmarks" / "harness.py").is_file() else None


def cmd_bench(args: argparse.Namespace) -> int:
    root = _benchmarks_root()
    if root is None:
        here = pathlib.Path(__file__).resolve().parents[2]
        print(f"flashtile bench: error: no benchmarks/ directory next to the flashtile package (in {here}). "
              "The benchmarks ship with the source tree, not the wheel: clone the repository and run "
              "`pip install -e .` there, or `python -m benchmarks.run` from the checkout.", file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.harness import run_suites

    suites = [s for arg in (args.suites or ["all"]) for s in parse_list(arg)]
    try:
        markdown = run_suites(suites, args.out, smoke=args.smoke, filter=args.filter,
                              providers=args.providers, cuda_graph=args.cuda_graph)
    except ValueError as e:
        print(f"flashtile bench: error: {e}", file=sys.stderr)
        return 2
    print()
    print(markdown)
    print(f"results written to {pathlib.Path(args.out).resolve()} (<suite>.jsonl, <suite>.md, results.md, PNG plots)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run benchmark suites (source checkout only)",
                       description="Run benchmark suites with benchmarks/harness.py and print the markdown tables.")
    p.add_argument("suites", nargs="*", help="suite names (e.g. single_decode single_prefill); default: all")
    p.add_argument("--out", default="bench_out", help="output folder (default: bench_out)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and few repetitions (seconds on CPU)")
    p.add_argument("--filter", default=None, help="only cases whose name contains this substring")
    p.add_argument("--providers", default=None, help="comma-separated providers (default: all)")
    p.add_argument("--cuda-graph", choices=["auto", "on", "off"], default="auto",
                   help="time CUDA-graph replays (auto: for kernels under 100 us)")
    p.set_defaults(func=cmd_bench)
