"""Compare the warp-specialized Hopper batch-prefill kernel with the Triton kernel on one GPU.

Runs the public wrappers on a few batches (ragged and paged, NHD and HND, causal and not, GQA 1/4/8,
appends with qo_len < kv_len, prompts whose first rows see nothing, a split plan) twice, with
``FLASHTILE_HOPPER_PREFILL`` on and off, and prints the largest difference of out and lse per case.
Exit code 1 when a case differs by more than bf16 rounding allows. Run it under ``timeout``: a
synchronization bug in a warp-specialized kernel shows as a hang.

    timeout 120 python benchmarks/hopper_prefill_check.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import flashtile  # noqa: E402
from flashtile._core import settings  # noqa: E402


def run_case(qo_lens, kv_lens, hq, hk, d=128, page=None, layout="NHD", causal=True, split=None):
    dev = "cuda"
    torch.manual_seed(0)
    qo_indptr = torch.tensor([0] + list(torch.tensor(qo_lens).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(qo_indptr[-1]), hq, d, device=dev, dtype=torch.bfloat16)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    kw = dict(causal=causal, q_data_type=torch.bfloat16)
    if split is not None:
        kw["fixed_split_size"] = split
    if page is None:
        kv_indptr = torch.tensor([0] + list(torch.tensor(kv_lens).cumsum(0)), dtype=torch.int32)
        k = torch.randn(int(kv_indptr[-1]), hk, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        w = flashtile.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD")
        w.plan(qo_indptr.to(dev), kv_indptr.to(dev), hq, hk, d, **kw)
        args = (q, k, v)
    else:
        pages = [(n + page - 1) // page for n in kv_lens]
        kv_indptr = torch.tensor([0] + list(torch.tensor(pages).cumsum(0)), dtype=torch.int32)
        total = int(kv_indptr[-1])
        indices = torch.randperm(total + 7, dtype=torch.int32)[:total]
        last = torch.tensor([(n - 1) % page + 1 for n in kv_lens], dtype=torch.int32)
        shape = (total + 7, 2, page, hk, d) if layout == "NHD" else (total + 7, 2, hk, page, d)
        cache = torch.randn(shape, device=dev, dtype=torch.bfloat16)
        w = flashtile.BatchPrefillWithPagedKVCacheWrapper(ws, layout)
        w.plan(qo_indptr.to(dev), kv_indptr.to(dev), indices.to(dev), last.to(dev), hq, hk, d, page, **kw)
        args = (q, cache)
    res = {}
    for flag in ("0", "1"):
        os.environ["FLASHTILE_HOPPER_PREFILL"] = flag
        settings.reload()  # flashtile reads its settings once
        out, lse = w.run(*args, return_lse=True)
        torch.cuda.synchronize()
        res[flag] = (out.float(), lse)
    o0, l0 = res["0"]
    o1, l1 = res["1"]
    fin = torch.isfinite(l0)
    dl = (l0[fin] - l1[fin]).abs().max().item() if fin.any() else 0.0
    same_inf = bool((torch.isfinite(l1) == fin).all())
    do = (o0 - o1).abs().max().item()
    return do, dl, same_inf


CASES = [
    ("ragged 4x300 g1", dict(qo_lens=[300] * 4, kv_lens=[300] * 4, hq=8, hk=8)),
    ("ragged mixed g4", dict(qo_lens=[200, 129, 1000, 77], kv_lens=[200, 500, 1000, 300], hq=32, hk=8)),
    ("ragged qo>kv g4", dict(qo_lens=[300, 200], kv_lens=[100, 260], hq=16, hk=4)),
    ("ragged noncausal g8", dict(qo_lens=[257, 130], kv_lens=[300, 999], hq=32, hk=4, causal=False)),
    ("ragged g1 d64", dict(qo_lens=[300, 1000], kv_lens=[300, 1000], hq=4, hk=4, d=64)),
    ("paged p16 NHD g4", dict(qo_lens=[1024] * 3, kv_lens=[1024] * 3, hq=32, hk=8, page=16)),
    ("paged p16 NHD mixed", dict(qo_lens=[200, 129, 1000, 77], kv_lens=[200, 517, 1003, 300], hq=32, hk=8, page=16)),
    ("paged p16 HND", dict(qo_lens=[200, 1000], kv_lens=[333, 1000], hq=32, hk=8, page=16, layout="HND")),
    ("paged p8 NHD noncausal", dict(qo_lens=[150, 300], kv_lens=[301, 77], hq=8, hk=2, page=8, causal=False)),
    ("paged p64 NHD", dict(qo_lens=[500, 129], kv_lens=[700, 4000], hq=16, hk=16, page=64)),
    ("ragged split", dict(qo_lens=[200, 300], kv_lens=[3000, 5000], hq=16, hk=4, split=1024)),
    ("paged split p16", dict(qo_lens=[300], kv_lens=[9000], hq=16, hk=4, page=16, split=64)),
    # Gather mode (cp.async copies): pages TMA boxes cannot serve.
    ("gather p1 NHD g4", dict(qo_lens=[1024] * 3, kv_lens=[1024] * 3, hq=32, hk=8, page=1)),
    ("gather p1 mixed", dict(qo_lens=[200, 129, 1000, 77], kv_lens=[200, 517, 1003, 300], hq=32, hk=8, page=1)),
    ("gather p5 HND noncausal", dict(qo_lens=[150, 300], kv_lens=[301, 77], hq=8, hk=2, page=5, causal=False,
                                     layout="HND")),
    ("gather p3 d64 g1", dict(qo_lens=[300, 1000], kv_lens=[300, 1000], hq=4, hk=4, d=64, page=3)),
    ("gather p256 NHD", dict(qo_lens=[500, 129], kv_lens=[700, 4000], hq=16, hk=16, page=256)),
    ("gather split p1", dict(qo_lens=[300], kv_lens=[9000], hq=16, hk=4, page=1, split=1024)),
]

if __name__ == "__main__":
    bad = 0
    for name, kw in CASES:
        do, dl, same_inf = run_case(**kw)
        ok = do < 2e-2 and dl < 1e-2 and same_inf
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {name:28s} max|dout|={do:.3e} max|dlse|={dl:.3e} inf-pattern-equal={same_inf}",
              flush=True)
    sys.exit(1 if bad else 0)
