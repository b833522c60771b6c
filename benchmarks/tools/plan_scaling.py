"""Host us of the wrappers' plan() against the batch size, in host_time.py's dry mode (CPU tensors,
kernel path, launches stubbed): checks that the host planner stays cheap from one request to the
thousands a large decode step holds.

    python -m benchmarks.tools.plan_scaling [--rounds 5] [--calls 50] [--filter S]

Cases: uniform batches (decode: kv 256; prefill: 32 queries on 256 keys) and a skewed decode batch
(one 32k request among 255-token ones: the long request is split).

torch runs on one thread here: it splits copies of more than 32k elements across its threads, and on
a CPU that other jobs keep busy those threads wait milliseconds for a core (the 4096-request rows
would then measure the machine's load, not flashtile).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from benchmarks.harness import host_overhead_us
from benchmarks.tools import host_time


def _skewed_decode(lib, dev, batch: int):
    kv_lens = [32768] + [255] * (batch - 1)
    pages = [-(-n // host_time.PAGE) for n in kv_lens]
    indptr = torch.tensor([0] + pages, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    indices = torch.arange(int(indptr[-1]), dtype=torch.int32)
    last = torch.tensor([n - (p - 1) * host_time.PAGE for n, p in zip(kv_lens, pages)], dtype=torch.int32)
    w = lib.BatchDecodeWithPagedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.uint8, device=dev), "NHD")
    args = (indptr, indices, last, host_time.HQ, host_time.HKV, host_time.D, host_time.PAGE)
    kw = dict(q_data_type=host_time.DTYPE, kv_data_type=host_time.DTYPE)
    return lambda: w.plan(*args, **kw)


def cases():
    out = {}
    for b in (1, 8, 256, 4096):
        out[f"decode plan() {b} x 256"] = lambda lib, dev, b=b: host_time._decode(lib, dev, b, 256, "plan")
    out["decode plan() skewed 256 (1 x 32k)"] = lambda lib, dev: _skewed_decode(lib, dev, 256)
    out["decode plan() skewed 4096 (1 x 32k)"] = lambda lib, dev: _skewed_decode(lib, dev, 4096)
    for b in (1, 8, 256, 4096):
        out[f"paged prefill plan() {b} x 32 on 256"] = lambda lib, dev, b=b: host_time._paged_prefill(
            lib, dev, "plan", batch=b)
        out[f"ragged prefill plan() {b} x 32 on 256"] = lambda lib, dev, b=b: host_time._ragged_prefill(
            lib, dev, "plan", batch=b)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--filter", default="")
    args = ap.parse_args(argv)
    host_time.enter_dry_mode()
    torch.set_num_threads(1)
    import flashtile

    dev = torch.device("cpu")
    print(f"| plan() (dry, us per call, median of {args.rounds} x {args.calls}) | flashtile |")
    print("|---|---|")
    for name, make in cases().items():
        if args.filter not in name:
            continue
        fn = make(flashtile, dev)
        fn()
        us = statistics.median(host_overhead_us(fn, args.calls, warmup=0) for _ in range(args.rounds))
        print(f"| {name} | {us:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
