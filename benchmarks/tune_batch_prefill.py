"""Sweep batch-prefill launch configurations (BLOCK_M x BLOCK_N x warps x stages, and for paged caches
the page-id prefetch on/off) on the cases of ``bench_batch_prefill`` and print TFLOP/s (GB/s of the
cache for the append suite) per configuration, best first per case.

    python benchmarks/tune_batch_prefill.py [--filter S] [--quick] [--suite prefill|append]
    python benchmarks/tune_batch_prefill.py --prefetch-ab [--suite ...]   # default configs, prefetch off/on
    python benchmarks/tune_batch_prefill.py --offsets32-ab [--suite ...]  # int64 vs int32 paged row offsets
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from benchmarks.bench_batch_prefill import _flashtile, append_cases, prefill_cases  # noqa: E402
from flashtile._core import tile_policy  # noqa: E402


def _time(case) -> float:
    """Median ms of the case's flashtile call under the module's current overrides."""
    fn, _ = _flashtile(case)
    fn()
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def _unit(case, ms: float) -> str:
    if case.flops and not case.name.startswith("append"):
        return f"{case.flops / ms / 1e9:7.1f} TFLOP/s"
    return f"{case.bytes / ms / 1e6:7.0f} GB/s"


def _ab_knob(kb, knob: str, case) -> None:
    """Time ``case`` with the module override ``knob`` False, then True, alternating over 3 rounds;
    print the medians and their ratio."""
    times = {False: [], True: []}
    for _ in range(3):
        for flag in (False, True):
            setattr(kb, knob, flag)
            torch.manual_seed(0)
            times[flag].append(_time(case))
    setattr(kb, knob, None)
    off, on = (sorted(times[f])[1] for f in (False, True))
    print(f"AB {knob} {case.name:<40} False {off * 1e3:8.1f} us {_unit(case, off)} | "
          f"True {on * 1e3:8.1f} us {_unit(case, on)} | True/False time {on / off:.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--filter", default="16 x 1024")
    ap.add_argument("--quick", action="store_true", help="fewer configurations")
    ap.add_argument("--suite", default="prefill", choices=("prefill", "append"))
    ap.add_argument("--configs", default="", help="only these configurations: 'bm,bn,warps,stages;...'")
    ap.add_argument("--prefetch-ab", action="store_true",
                    help="default launch configs, page-id prefetch off vs on (alternating rounds)")
    ap.add_argument("--offsets32-ab", action="store_true",
                    help="default launch configs, int64 vs int32 paged row offsets (alternating rounds)")
    args = ap.parse_args()
    import flashtile.kernels.batch_prefill as kb

    cases = prefill_cases(False) if args.suite == "prefill" else append_cases(False)
    cases = [c for c in cases if args.filter in c.name]
    if args.offsets32_ab or args.prefetch_ab:
        knob = "INT32_OFFSETS_OVERRIDE" if args.offsets32_ab else "PREFETCH_OVERRIDE"
        for case in cases:
            _ab_knob(kb, knob, case)
        return

    block_ms = (64, 128)
    block_ns = (64, 128) if args.quick else (32, 64, 128)
    warps = (4, 8)
    stages = (2, 3) if args.quick else (2, 3, 4)
    original = tile_policy.prefill_tile_shape
    for case in cases:
        results = []
        prefetches = (False, True) if case.params.get("page_size") else (None,)
        configs = list(itertools.product(block_ms, block_ns, warps, stages))
        if args.configs:
            configs = [tuple(int(x) for x in c.split(",")) for c in args.configs.split(";")]
        for (bm, bn, w, st), pf in itertools.product(configs, prefetches):
            if (bn * 128 * 2 * 2) * st + bm * 128 * 2 > 232448:  # K/V stages must fit shared memory
                continue
            tile_policy.CONFIG_OVERRIDE = (bn, w, st)
            kb.PREFETCH_OVERRIDE = pf
            tile_policy.prefill_tile_shape = lambda *a, _bm=bm, _bn=bn, **kw: (_bm, _bn)
            try:
                torch.manual_seed(0)
                ms = _time(case)
                results.append((ms, bm, bn, w, st, pf))
            except Exception as e:  # out of resources
                print(f"  skip bm{bm} bn{bn} w{w} s{st} prefetch {pf}: {type(e).__name__}")
            finally:
                tile_policy.CONFIG_OVERRIDE = None
                kb.PREFETCH_OVERRIDE = None
                tile_policy.prefill_tile_shape = original
                torch.cuda.empty_cache()
        results.sort()
        for ms, bm, bn, w, st, pf in results[:8]:
            print(f"{case.name:<40} bm{bm:<4} bn{bn:<4} w{w} s{st} prefetch {pf!s:<5} {_unit(case, ms)}")
        print(f"BEST {case.name}: {results[0] if results else None}", flush=True)


if __name__ == "__main__":
    main()
