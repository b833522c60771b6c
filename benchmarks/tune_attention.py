"""Sweep launch configs of the single-request attention kernel on the GPU and report the best per
shape class, so flashtile/kernels/attention.py's _CONFIG_TABLE is set from measurements.

    python benchmarks/tune_attention.py --out tune.json [--only decode|prefill]

Decode kernels run for a few microseconds, far less than one call's host time, so they are timed as
CUDA-graph replays (20 calls per graph); prefill is timed directly. Each candidate is tried by
replacing the shape class's table entry in this process; the winners go into the table by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flashtile  # noqa: E402
from benchmarks.harness import cuda_graph_replay, host_overhead_us  # noqa: E402
from flashtile.kernels import attention as attn  # noqa: E402

LC = attn.LaunchConfig
# (kind, name, make_inputs, call, candidates)
DECODE_CANDIDATES = [LC(16, bn, w, s) for bn in (64, 128) for w in (4, 8) for s in (2, 3)]
PREFILL_CANDIDATES = {
    64: [LC(128, bn, w, s) for bn in (64, 128) for w in (4, 8) for s in (2, 3)],
    128: [LC(bm, bn, 8, s) for bm, bn in ((128, 64), (128, 128), (64, 64)) for s in (2, 3, 4)] + [LC(128, 64, 4, 3)],
    256: [LC(bm, bn, w, s) for bm, bn in ((64, 32), (64, 64), (128, 32)) for w in (4, 8) for s in (2,)],
}


def decode_case(kv_len, hq, hk, d):
    q = torch.randn(hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(kv_len, hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    nbytes = 2 * k.numel() * 2 + 2 * q.numel() * 2
    return (lambda: flashtile.single_decode_with_kv_cache(q, k, v)), nbytes, "GB/s"


def prefill_case(L, hq, hk, d, causal=True):
    q = torch.randn(L, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(L, hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    flops = 4 * hq * d * (L * L - L * (L - 1) // 2) if causal else 4 * hq * d * L * L
    return (lambda: flashtile.single_prefill_with_kv_cache(q, k, v, causal=causal)), flops, "TFLOP/s"


CASES = [
    ("decode", 128, "decode 32768 32/8 d128", lambda: decode_case(32768, 32, 8, 128)),
    ("decode", 128, "decode 4096 32/8 d128", lambda: decode_case(4096, 32, 8, 128)),
    ("decode", 128, "decode 131072 32/8 d128", lambda: decode_case(131072, 32, 8, 128)),
    ("decode", 64, "decode 32768 32/8 d64", lambda: decode_case(32768, 32, 8, 64)),
    ("decode", 256, "decode 32768 32/8 d256", lambda: decode_case(32768, 32, 8, 256)),
    ("prefill", 128, "prefill 4096 32/32 d128 causal", lambda: prefill_case(4096, 32, 32, 128)),
    ("prefill", 128, "prefill 16384 32/32 d128 causal", lambda: prefill_case(16384, 32, 32, 128)),
    ("prefill", 128, "prefill 8192 32/8 d128 causal", lambda: prefill_case(8192, 32, 8, 128)),
    ("prefill", 64, "prefill 8192 32/32 d64 causal", lambda: prefill_case(8192, 32, 32, 64)),
    ("prefill", 256, "prefill 8192 32/32 d256 causal", lambda: prefill_case(8192, 32, 32, 256)),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tune.json")
    ap.add_argument("--only", default=None)
    args = ap.parse_args()
    results = []
    for kind, d, name, make in CASES:
        if args.only and kind != args.only:
            continue
        fn, work, unit = make()
        cands = DECODE_CANDIDATES if kind == "decode" else PREFILL_CANDIDATES[d]
        rows = []
        for c in cands:
            attn._CONFIG_TABLE[(kind, d)] = c
            try:
                fn()
                torch.cuda.synchronize()
                if kind == "decode":
                    calls = 20
                    replay = cuda_graph_replay(fn, calls)
                    ms = triton.testing.do_bench(replay, warmup=25, rep=100, return_mode="median") / calls
                else:
                    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            except Exception as e:  # out of resources etc.
                print(f"  {name} {c}: failed {type(e).__name__}: {str(e)[:80]}", flush=True)
                continue
            rate = work / ms / 1e6 if unit == "GB/s" else work / ms / 1e9  # bytes/ms -> GB/s; flops/ms -> TFLOP/s
            rows.append((ms, c, rate))
            print(f"  {name} {c}: {ms * 1e3:.1f} us  {rate:.0f} {unit}", flush=True)
        rows.sort(key=lambda r: r[0])
        best = rows[0]
        print(f"BEST {name}: {best[1]} {best[0] * 1e3:.1f} us {best[2]:.0f} {unit}", flush=True)
        results.append(dict(case=name, kind=kind, d=d, best=best[1].__dict__, us=best[0] * 1e3, rate=best[2], unit=unit,
                            all=[dict(cfg=c.__dict__, us=ms * 1e3) for ms, c, _ in rows]))
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(results, indent=1))
    # Host cost per call in the launch-bound regime (tiny KV), eager, no CUDA graph.
    for name, make in (("decode kv64 32/8 d128", lambda: decode_case(64, 32, 8, 128)),
                       ("prefill 16x16 32/8 d128", lambda: prefill_case(16, 32, 8, 128))):
        fn, _, _ = make()
        print(f"HOST {name}: {host_overhead_us(fn):.1f} us per call", flush=True)
    import triton.language as tl

    @triton.jit
    def _noop(x_ptr):
        tl.store(x_ptr, 1.0)

    x = torch.zeros(1, device="cuda")
    print(f"HOST bare triton launch: {host_overhead_us(lambda: _noop[(1,)](x)):.1f} us per call", flush=True)


if __name__ == "__main__":
    main()
