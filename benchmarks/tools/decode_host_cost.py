"""Host cost of batch decode: plan() wall time for a batch of 256, and run()'s eager cost per call
(no CUDA graph) on a shape whose GPU time is negligible, next to torch SDPA's eager call.

Usage: python -m benchmarks.tools.decode_host_cost  (prints a markdown table; CUDA only).
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

import flashtile
from benchmarks.harness import host_overhead_us, wall_seconds


def _table(batch, n, page_size, device):
    pages = -(-n // page_size)
    indptr = torch.arange(batch + 1, dtype=torch.int32) * pages
    indices = torch.randperm(batch * pages, dtype=torch.int32)
    last = torch.full((batch,), n - (pages - 1) * page_size, dtype=torch.int32)
    cache = torch.randn(batch * pages, 2, page_size, 8, 128, dtype=torch.bfloat16, device=device)
    return indptr, indices, last, cache


def _per_call_us(fn, calls=300):
    """Median of 5 rounds of ``calls`` back-to-back eager calls, after one warm-up call."""
    fn()
    return statistics.median(host_overhead_us(fn, calls, warmup=0) for _ in range(5))


def main() -> None:
    device = torch.device("cuda")
    ws = torch.empty(128 << 20, dtype=torch.uint8, device=device)
    rows = []
    indptr, indices, last, cache = _table(256, 2048, 16, device)
    w = flashtile.BatchDecodeWithPagedKVCacheWrapper(ws)

    def plan():
        w.plan(indptr, indices, last, 32, 8, 128, 16, q_data_type=torch.bfloat16)

    plan()
    rows.append(("plan(), batch 256 x 2048, page 16, host index arrays",
                 statistics.median(wall_seconds(plan, 50)) * 1e6))

    for batch in (1, 64):
        indptr, indices, last, cache = _table(batch, 16, 16, device)
        w.plan(indptr, indices, last, 32, 8, 128, 16, q_data_type=torch.bfloat16)
        q = torch.randn(batch, 32, 128, dtype=torch.bfloat16, device=device)
        out = torch.empty_like(q)
        rows.append((f"run() eager per call, batch {batch} x 16 tokens",
                     _per_call_us(lambda q=q, cache=cache, out=out: w.run(q, cache, out=out))))
        qs = q[:, :, None]
        ks = torch.randn(batch, 8, 16, 128, dtype=torch.bfloat16, device=device)
        rows.append((f"torch SDPA eager per call, batch {batch} x 16 tokens (enable_gqa)",
                     _per_call_us(lambda qs=qs, ks=ks: F.scaled_dot_product_attention(qs, ks, ks, enable_gqa=True))))
    print("| what | µs (host wall, median) |\n|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.1f} |")


if __name__ == "__main__":
    main()
