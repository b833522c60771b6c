"""Sweep the row-tiled merge kernels' launch (elements per state tile x warps) on the merge_state
suite's cases (CUDA-graph replays) and print GB/s per configuration, best first per case.

    python benchmarks/tune_merge.py
"""

from __future__ import annotations

import itertools
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.bench_cascade import _flashtile, merge_cases  # noqa: E402
from benchmarks.harness import measure  # noqa: E402


def _ceilings() -> None:
    """Same traffic as merge_state (two fp16 reads, one write of 8192 x 32 x 128) through torch.add,
    and a plain copy: what this GPU's DRAM gives such streams."""
    a, b = (torch.randn(8192, 32, 128, dtype=torch.float16, device="cuda") for _ in range(2))
    c = torch.empty_like(a)
    for name, fn, nbytes in (("torch.add(a, b, out=c)", lambda: torch.add(a, b, out=c), 3 * a.nbytes),
                             ("c.copy_(a)", lambda: c.copy_(a), 2 * a.nbytes)):
        us = measure(fn, cuda_graph="on")["median_us"]
        print(f"CEILING {name:<28} {us:7.1f} us {nbytes / us / 1e3:6.0f} GB/s", flush=True)


def main() -> None:
    import flashtile.kernels.merge as merge

    _ceilings()

    default = (merge.ROW_TILE_ELEMS, merge.PAIR_WARPS, merge.STATE_LOOP_WARPS)
    for case in merge_cases(False):
        results = []
        for elems, warps in itertools.product((2048, 4096, 8192, 16384), (2, 4, 8)):
            merge.ROW_TILE_ELEMS, merge.PAIR_WARPS, merge.STATE_LOOP_WARPS = elems, warps, warps
            try:
                torch.manual_seed(0)
                us = measure(_flashtile(case), cuda_graph="on")["median_us"]
                results.append((case.bytes / us / 1e3, elems, warps, us))
            finally:
                merge.ROW_TILE_ELEMS, merge.PAIR_WARPS, merge.STATE_LOOP_WARPS = default
                torch.cuda.empty_cache()
        results.sort(reverse=True)
        for gbps, elems, warps, us in results[:5]:
            print(f"{case.name:<48} elems {elems:<6} warps {warps}  {us:7.1f} us {gbps:6.0f} GB/s")
        print(f"BEST {case.name}: {results[0]}", flush=True)


if __name__ == "__main__":
    main()
