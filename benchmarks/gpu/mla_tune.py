"""Time MLA launch configs on the GPU (issue 26 tuning; not part of the default run).

    python3 benchmarks/gpu/mla_tune.py [--out DIR]

For each case, every (BLOCK_M, BLOCK_N, warps, stages) below is planned and timed with
triton.testing.do_bench (median); the default config of flashtile/_core/mla_tiles.py is marked.
Launch failures (e.g. out of shared memory) are reported, not fatal.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import torch
import triton

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
import flashtile.mla as api
from flashtile._core import mla_tiles

CONFIGS = [(64, 32, 8, 2), (64, 16, 8, 2), (64, 32, 8, 3), (32, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2),
           (16, 32, 8, 2), (16, 64, 4, 2)]
CASES = [(64, 4096, 128, 64), (128, 8192, 16, 64), (32, 16384, 64, 64), (1, 32768, 128, 64), (64, 4096, 128, 1)]


def timed(batch, kv, heads, page, cfg):
    dev = torch.device("cuda")
    per = -(-kv // page)
    pool = torch.randn(batch * per, page, 576, device=dev, dtype=torch.bfloat16)
    qn = torch.randn(batch, heads, 512, device=dev, dtype=torch.bfloat16)
    qp = torch.randn(batch, heads, 64, device=dev, dtype=torch.bfloat16)
    i32 = dict(dtype=torch.int32)
    real = mla_tiles.mla_launch_facts
    if cfg is not None:
        api.mla_launch_facts = lambda d, c, rows, dc: (cfg[0], mla_tiles.MlaConfig(*cfg), mla_tiles.MLA_CHUNK_ALIGN,
                                                        real(d, c, rows, dc)[3])
    try:
        w = api.BatchMLAPagedAttentionWrapper(torch.empty(256 << 20, dtype=torch.uint8, device=dev))
        w.plan(torch.arange(batch + 1, **i32), torch.arange(batch + 1, **i32) * per,
               torch.randperm(batch * per, device=dev).to(torch.int32), torch.full((batch,), kv, **i32), heads, 512,
               64, page, True, 1 / math.sqrt(192), torch.bfloat16, torch.bfloat16)
        out = torch.empty_like(qn)
        fn = lambda: w.run(qn, qp, pool[..., :512], pool[..., 512:], out=out)  # noqa: E731
        fn()
        return triton.testing.do_bench(fn, warmup=25, rep=100) * 1e3, w._plan.meta.config
    finally:
        api.mla_launch_facts = real


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    print(f"{torch.cuda.get_device_name()}: MLA configs (us, median)")
    for case in CASES:
        batch, kv, heads, page = case
        gb = batch * kv * 576 * 2 / 1e9
        us, default = timed(*case, None)
        print(f"{batch}x{kv} h{heads} p{page}: default {default} {us:.1f} us ({gb / us * 1e3:.2f} TB/s)")
        for cfg in CONFIGS:
            try:
                t, _ = timed(*case, cfg)
                print(f"    {cfg}: {t:.1f} us ({gb / t * 1e3:.2f} TB/s)")
                rows.append(dict(case=case, config=cfg, us=t))
            except Exception as e:  # a config that does not fit must not stop the sweep
                print(f"    {cfg}: {type(e).__name__}: {str(e)[:100]}")
        sys.stdout.flush()
    if args.out:
        pathlib.Path(args.out, "mla_tune.json").write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
