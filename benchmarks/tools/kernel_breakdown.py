"""Which GPU kernels one call of a benchmark provider launches, and how long each takes: the cases of a
harness suite (benchmarks/bench_*.py) run under torch.profiler, one table per (case, provider).

    python -m benchmarks.tools.kernel_breakdown --suite fp8_prefill --filter ragged \
        --providers flashtile,flashtile_bf16 [--calls 20] [--json PATH]

Why: a suite's time is one number per provider; when a provider is slower than expected, this says whether
the time is in its main kernel or in what runs around it (copies, index arithmetic, merges), and how many
launches a call makes. Each provider's call runs a few times first (compilation, plans), then ``--calls``
times under the profiler; times are GPU time per call (the sum over a kernel's launches / calls), eager
launches back to back, warm L2: a breakdown, not a replacement for the suite's timing.

CUDA only. FlashInfer providers need FlashInfer on the path (benchmarks/gpu/*.sh source .fi-ref/device_env.sh).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from benchmarks import harness


def breakdown(fn, calls: int) -> list:
    """``[(kernel name, launches per call, GPU µs per call)]`` of ``fn``, longest first."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals: dict = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals[event.name]
            entry[0] += 1
            entry[1] += event.time_range.elapsed_us()
    rows = [(name, n / calls, us / calls) for name, (n, us) in totals.items()]
    return sorted(rows, key=lambda r: -r[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", required=True)
    parser.add_argument("--filter", default=None, help="cases whose name contains this (harness syntax)")
    parser.add_argument("--providers", default=None, help="comma-separated provider names (default: all)")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", default=None, help="also write the tables as JSON lines here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernel_breakdown needs a CUDA device")
    harness.load_case_files()
    suite = harness.SUITES[args.suite]
    wanted = None if args.providers is None else set(args.providers.split(","))
    records = []
    for case in suite.cases(args.smoke):
        if not harness.case_selected(case.name, args.filter):
            continue
        for prov in suite.providers:
            if wanted is not None and prov.name not in wanted:
                continue
            torch.manual_seed(0)
            try:
                made = prov.make(case)
            except harness.Unavailable as e:
                print(f"\n{case.name} / {prov.name}: unavailable ({e})")
                continue
            fn = made[0] if isinstance(made, tuple) else made
            rows = breakdown(fn, args.calls)
            total = sum(us for _, _, us in rows)
            print(f"\n{case.name} / {prov.name}: {total:.1f} µs of GPU time per call, "
                  f"{sum(n for _, n, _ in rows):.0f} launches")
            print("| µs per call | share | launches | kernel |\n|---|---|---|---|")
            for name, n, us in rows:
                print(f"| {us:.1f} | {us / max(total, 1e-9):.0%} | {n:g} | `{name[:110]}` |")
            records.append(dict(suite=suite.name, case=case.name, provider=prov.name, total_us=total,
                                kernels=[dict(name=name, launches=n, us=us) for name, n, us in rows]))
            del made, fn
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
