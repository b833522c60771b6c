"""Sweep the warps of the norm and activation kernels (elements per warp) and the activation's
columns per program on the norm and activation suites' cases (CUDA-graph replays); prints GB/s.

    python benchmarks/tune_small_ops.py [--graph-span-us 1000] [--only norm|activation] [--filter S] [--rounds N]

``--graph-span-us``: the replay length (harness.measure); 1000 times back-to-back calls.
"""

from __future__ import annotations

import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.bench_small_ops import _flashtile, activation_cases, norm_cases  # noqa: E402
from benchmarks.harness import measure  # noqa: E402
from flashtile._core.launch import clear_launch_memos  # noqa: E402


def _sweep(module, config_fn, cases, settings, span_us, rounds):
    """Time every setting on every case; ``rounds`` > 1 alternates the settings round by round and
    reports each one's median (clock and placement drift hit every setting alike)."""
    default = {name: getattr(module, name) for name in settings[0]}
    for case in cases:
        times = {i: [] for i in range(len(settings))}
        for _ in range(rounds):
            for i, setting in enumerate(settings):
                for name, value in setting.items():
                    setattr(module, name, value)
                config_fn.cache_clear()
                clear_launch_memos()  # recorded launches do not know the module constants
                try:
                    torch.manual_seed(0)
                    times[i].append(measure(_flashtile(case), cuda_graph="on", graph_span_us=span_us)["median_us"])
                finally:
                    for name, value in default.items():
                        setattr(module, name, value)
                    config_fn.cache_clear()
                    clear_launch_memos()
        rows = sorted((statistics.median(ts), settings[i], ts) for i, ts in times.items())
        for us, setting, ts in rows:
            spread = f" (rounds {min(ts):.2f}-{max(ts):.2f})" if rounds > 1 else ""
            print(f"{case.name:<44} {setting}  {us:7.2f} us {case.bytes / us / 1e3:6.0f} GB/s{spread}")
        print(f"BEST {case.name}: {rows[0][1]} {rows[0][0]:.1f} us (default {default})", flush=True)


def main() -> None:
    import argparse

    import flashtile.kernels.activation as act
    import flashtile.kernels.norm as norm

    ap = argparse.ArgumentParser()
    ap.add_argument("--graph-span-us", type=float, default=10.0)
    ap.add_argument("--only", choices=["norm", "activation"], default=None)
    ap.add_argument("--filter", default="", help="only cases whose name contains this")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the settings this many times; report medians")
    args = ap.parse_args()
    if args.only in (None, "norm"):
        _sweep(norm, norm.norm_config, [c for c in norm_cases(False) if args.filter in c.name],
               [dict(ELEMS_PER_WARP=e) for e in (256, 512, 1024, 2048)], args.graph_span_us, args.rounds)
    if args.only in (None, "activation"):
        _sweep(act, act.act_config, [c for c in activation_cases(False) if "silu" in c.name and args.filter in c.name],
               [dict(MAX_BLOCK_D=b, ELEMS_PER_WARP=e) for b in (1024, 2048, 4096) for e in (256, 512, 1024)],
               args.graph_span_us, args.rounds)


if __name__ == "__main__":
    main()
