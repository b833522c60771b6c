"""Sweep the split-KV planner's knobs for single decode (GPU time via CUDA-graph replay)."""
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import flashtile  # noqa: E402
from benchmarks.harness import cuda_graph_replay  # noqa: E402
from flashtile.scheduler import split_kv  # noqa: E402
from flashtile._core import tile_policy  # noqa: E402

for kv_len in (4096, 32768, 131072):
    q = torch.randn(32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(kv_len, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    nbytes = 2 * k.numel() * 2
    for align in (128, 256):
        for pps in (2, 3, 4, 6, 8, 12):
            for min_tiles in (1, 2):
                tile_policy.KV_CHUNK_ALIGN, split_kv.PROGRAMS_PER_SM, split_kv.MIN_CHUNK_TILES = align, pps, min_tiles
                fn = lambda: flashtile.single_decode_with_kv_cache(q, k, v)  # noqa: E731
                fn()
                replay = cuda_graph_replay(fn, 20)
                ms = triton.testing.do_bench(replay, warmup=20, rep=100, return_mode="median") / 20
                splits, chunk = split_kv.plan_kv_splits(kv_len, 8, 132, align)
                print(f"kv{kv_len} align{align} pps{pps} min{min_tiles}: splits {splits} chunk {chunk}: "
                      f"{ms * 1e3:.1f} us {nbytes / ms / 1e6:.0f} GB/s", flush=True)
