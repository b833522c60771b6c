"""Sweep batch-prefill launch configurations (BLOCK_M x BLOCK_N x warps x stages) on the cases of
``bench_batch_prefill`` and print TFLOP/s per configuration, best first per case.

    python benchmarks/tune_batch_prefill.py [--filter S] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from benchmarks.bench_batch_prefill import _flashtile, prefill_cases  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--filter", default="16 x 1024")
    ap.add_argument("--quick", action="store_true", help="fewer configurations")
    args = ap.parse_args()
    import flashtile.kernels.batch_prefill as kb

    block_ms = (64, 128)
    block_ns = (64, 128) if args.quick else (32, 64, 128)
    warps = (4, 8)
    stages = (2, 3) if args.quick else (2, 3, 4)
    original = kb.prefill_tile_shape
    for case in prefill_cases(False):
        if args.filter not in case.name:
            continue
        results = []
        for bm, bn, w, st in itertools.product(block_ms, block_ns, warps, stages):
            if (bn * 128 * 2 * 2) * st + bm * 128 * 2 > 232448:  # K/V stages must fit shared memory
                continue
            kb.CONFIG_OVERRIDE = (bn, w, st)
            kb.prefill_tile_shape = lambda *a, _bm=bm, _bn=bn: (_bm, _bn)
            try:
                torch.manual_seed(0)
                fn, _ = _flashtile(case)
                fn()
                ms = do_bench(fn, warmup=10, rep=60, return_mode="median")
                results.append((case.flops / ms / 1e9, bm, bn, w, st))
            except Exception as e:  # out of resources
                print(f"  skip bm{bm} bn{bn} w{w} s{st}: {type(e).__name__}")
            finally:
                kb.CONFIG_OVERRIDE = None
                kb.prefill_tile_shape = original
                torch.cuda.empty_cache()
        results.sort(reverse=True)
        for tf, bm, bn, w, st in results[:6]:
            print(f"{case.name:<40} bm{bm:<4} bn{bn:<4} w{w} s{st}  {tf:7.1f} TFLOP/s")
        print(f"BEST {case.name}: {results[0] if results else None}", flush=True)


if __name__ == "__main__":
    main()
