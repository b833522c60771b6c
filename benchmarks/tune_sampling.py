"""Sweep the launch constants of flashtile/kernels/sampling/config.py on the sampling suite's cases
(CUDA-graph replays) and print microseconds per setting, best first per case.

    python benchmarks/tune_sampling.py [--filter S[,S...]] NAME=v1,v2 [NAME=v1,v2 ...]
    e.g. python benchmarks/tune_sampling.py --filter b128 SEG_COLS=32,64,128 SEG_STAGES=3,5
         python benchmarks/tune_sampling.py --filter "b128 V128256,b1 V128256" SEG_UNROLL=1,2 SEG_WARPS=8,16

Every combination of the given values is timed on every case whose name contains one of the
comma-separated filter strings; names must be constants of that module.
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.bench_sampling import _flashtile, sampling_cases  # noqa: E402
from benchmarks.harness import measure  # noqa: E402
from flashtile._core.launch import clear_launch_memos  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--filter", default="", help="comma-separated substrings of case names (any may match)")
    ap.add_argument("settings", nargs="+", help="NAME=v1,v2,...")
    args = ap.parse_args()
    from flashtile.kernels.sampling import config as kernels

    names, choices = [], []
    for item in args.settings:
        name, values = item.split("=", 1)
        if not hasattr(kernels, name):
            raise SystemExit(f"{name}: not a constant of flashtile.kernels.sampling.config")
        names.append(name)
        choices.append([type(getattr(kernels, name))(v) for v in values.split(",")])
    default = {n: getattr(kernels, n) for n in names}
    filters = args.filter.split(",")
    for case in sampling_cases(False):
        if not any(f in case.name for f in filters):
            continue
        rows = []
        for combo in itertools.product(*choices):
            setting = dict(zip(names, combo))
            try:
                for n, v in setting.items():
                    setattr(kernels, n, v)
                clear_launch_memos()  # replayed launches do not know the module constants
                torch.manual_seed(0)
                us = measure(_flashtile(case), cuda_graph="on")["median_us"]
                rows.append((us, setting))
            except Exception as e:  # out of resources, a failed compile
                print(f"  skip {setting}: {type(e).__name__}: {str(e)[:120]}")
            finally:
                for n, v in default.items():
                    setattr(kernels, n, v)
                clear_launch_memos()
        rows.sort(key=lambda r: r[0])
        for us, setting in rows[:4]:
            print(f"{case.name:<44} {setting}  {us:8.1f} us")
        if rows:
            print(f"BEST {case.name}: {rows[0][1]} {rows[0][0]:.1f} us (default {default})", flush=True)


if __name__ == "__main__":
    main()
