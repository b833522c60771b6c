"""Sweep batch-decode launch configs and the planner's programs-per-SM target on the GPU (CUDA-graph
replay timing), and profile run()'s host path. Prints one line per (case, setting) and the best.

Usage: python benchmarks/tune_batch_decode.py [--quick]
"""

from __future__ import annotations

import cProfile
import io
import pathlib
import pstats
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import flashtile  # noqa: E402
from benchmarks.harness import cuda_graph_replay  # noqa: E402
from flashtile.kernels import attention as attn  # noqa: E402
from flashtile.scheduler import split_kv  # noqa: E402


def make(lens, ps=16, hq=32, hk=8, d=128):
    pages = [-(-n // ps) for n in lens]
    total = sum(pages)
    cache = torch.randn(total, 2, ps, hk, d, dtype=torch.bfloat16, device="cuda")
    indices = torch.randperm(total, dtype=torch.int32)
    indptr = torch.tensor([0] + torch.tensor(pages).cumsum(0).tolist(), dtype=torch.int32)
    last = torch.tensor([n - (k - 1) * ps for n, k in zip(lens, pages)], dtype=torch.int32)
    q = torch.randn(len(lens), hq, d, dtype=torch.bfloat16, device="cuda")
    return q, cache, (indptr, indices, last, hq, hk, d, ps)


def time_us(w, q, cache, table):
    w.plan(*table, q_data_type=torch.bfloat16)
    out = torch.empty_like(q)
    replay = cuda_graph_replay(lambda: w.run(q, cache, out=out), 10)
    from triton.testing import do_bench

    return do_bench(replay, warmup=10, rep=60, return_mode="median") * 1e3 / 10


def main():
    quick = "--quick" in sys.argv
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    w = flashtile.BatchDecodeWithPagedKVCacheWrapper(ws)
    cases = {"1x32768": [32768], "16x4096": [4096] * 16, "64x4096": [4096] * 64, "256x2048": [2048] * 256,
             "skew": [32768] + [512] * 63}
    configs = [attn.LaunchConfig(16, bn, wp, st) for bn in (32, 64, 128) for wp in (4, 8) for st in (2, 3, 4)]
    if quick:
        configs = configs[:4]
    base = attn._CONFIG_TABLE[("batch_decode", 128)]
    for name, lens in cases.items():
        q, cache, table = make(lens)
        kv_bytes = 2 * sum(lens) * 8 * 128 * 2
        results = []
        for pps in (1, 2, 4, 8):
            split_kv.BATCH_PROGRAMS_PER_SM = pps
            for cfg in configs:
                attn._CONFIG_TABLE[("batch_decode", 128)] = cfg
                try:
                    us = time_us(w, q, cache, table)
                except Exception as e:  # out of resources
                    print(f"{name} pps={pps} {cfg}: {type(e).__name__}")
                    continue
                results.append((us, pps, cfg))
                print(f"{name} pps={pps} bn={cfg.block_n} w={cfg.num_warps} st={cfg.num_stages}: {us:.1f} us "
                      f"{kv_bytes / us / 1e3:.0f} GB/s", flush=True)
        results.sort(key=lambda r: r[0])
        us, pps, cfg = results[0]
        print(f"BEST {name}: pps={pps} {cfg} {us:.1f} us {kv_bytes / us / 1e3:.0f} GB/s", flush=True)
        del q, cache
    split_kv.BATCH_PROGRAMS_PER_SM = 4
    attn._CONFIG_TABLE[("batch_decode", 128)] = base

    # Host path of run(): where the eager microseconds go.
    q, cache, table = make([16])
    w.plan(*table, q_data_type=torch.bfloat16)
    out = torch.empty_like(q)
    for _ in range(20):
        w.run(q, cache, out=out)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(500):
        w.run(q, cache, out=out)
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    print(s.getvalue())


if __name__ == "__main__":
    main()
