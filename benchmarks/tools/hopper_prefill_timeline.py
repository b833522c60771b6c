"""Per-tile timeline of the warp-specialized Hopper prefill kernel (where a short prompt's time goes).

Runs one batch through the public wrapper with the kernel's ``RECORD`` switch on: the first consumer
warpgroup of every program writes the SM cycle counter at six points of each tile (the first
``RECORD_TILES`` tiles). Prints, in cycles per tile (mean over tiles), averaged per KV-block count:

- ``wait_q``: waiting for the producer's next tile (its Q and fields);
- ``wait_k0``: then waiting for the tile's first K block;
- ``block0``: the first S = Q K^T and its softmax (nothing to overlap it with);
- ``loop``: the remaining blocks and the last P V;
- ``kv_stall``: the part of ``loop`` spent waiting for K/V copies;
- ``epilogue``: normalization and the stores of O and LSE;
- ``p_decode``: the producer's work-unit decode up to its Q copies (after the counter's atomic);
- ``p_q_lead``: how long before the consumer asks for the tile the producer issued its Q (negative:
  after; then ``wait_q`` is the producer's fault);
- ``p_kv_lead``: how long before the consumer's loop ends the producer issued the tile's last V.

    python -m benchmarks.tools.hopper_prefill_timeline --case paged16 [--gather] [--out FILE.json]

Needs an sm_90 GPU. The recorded variant is a separate compilation (the default kernel has none of
this code); its stores add a little time of their own.
"""
import argparse
import json
from collections import defaultdict

import torch

import flashtile
from flashtile.kernels import batch_prefill as bp
from flashtile.kernels import batch_prefill_hopper as hopper

CASES = {
    "paged16": dict(batch=16, length=1024, hq=32, hk=8, page=16),
    "paged1": dict(batch=16, length=1024, hq=32, hk=8, page=1),
    "ragged": dict(batch=16, length=1024, hq=32, hk=8, page=None),
    "ragged_mha": dict(batch=128, length=1024, hq=32, hk=32, page=None),
}
FIELDS = ("wait_q", "wait_k0", "block0", "loop", "kv_stall", "epilogue", "p_decode", "p_q_lead", "p_kv_lead")


def build(batch, length, hq, hk, page, d=128):
    dev = "cuda"
    qo_indptr = torch.arange(batch + 1, dtype=torch.int32) * length
    q = torch.randn(batch * length, hq, d, device=dev, dtype=torch.bfloat16)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    if page is None:
        k = torch.randn(batch * length, hk, d, device=dev, dtype=torch.bfloat16)
        w = flashtile.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD")
        w.plan(qo_indptr.to(dev), qo_indptr.to(dev), hq, hk, d, causal=True, q_data_type=torch.bfloat16)
        return w, (q, k, torch.randn_like(k))
    pages = -(-length // page)
    kv_indptr = torch.arange(batch + 1, dtype=torch.int32) * pages
    indices = torch.randperm(batch * pages, dtype=torch.int32)
    last = torch.full((batch,), length - (pages - 1) * page, dtype=torch.int32)
    cache = torch.randn(batch * pages, 2, page, hk, d, device=dev, dtype=torch.bfloat16)
    w = flashtile.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
    w.plan(qo_indptr.to(dev), kv_indptr.to(dev), indices.to(dev), last.to(dev), hq, hk, d, page, causal=True,
           q_data_type=torch.bfloat16)
    return w, (q, cache)


def summarize(rec: torch.Tensor) -> dict:
    """Per-KV-block-count means of the FIELDS (cycles) over every recorded tile."""
    by_blocks = defaultdict(lambda: defaultdict(float))
    counts = defaultdict(int)
    spans = []
    for prog in rec.tolist():
        tiles = [t for t in prog if t[1] != 0]
        if not tiles:
            continue
        spans.append(tiles[-1][5] - tiles[0][0])
        for t0, t1, t2, t3, t4, t5, nb, stall, p_start, p_q, p_kv, _ in tiles:
            row = dict(wait_q=t1 - t0, wait_k0=t2 - t1, block0=t3 - t2, loop=t4 - t3, kv_stall=stall,
                       epilogue=t5 - t4, p_decode=p_q - p_start, p_q_lead=t0 - p_q, p_kv_lead=t4 - p_kv)
            for key in (int(nb), "all"):
                counts[key] += 1
                for f in FIELDS:
                    by_blocks[key][f] += row[f]
    table = {str(k): {f: by_blocks[k][f] / counts[k] for f in FIELDS} | {"tiles": counts[k]} for k in counts}
    return dict(per_blocks=table, program_span_cycles_max=max(spans), program_span_cycles_mean=sum(spans) / len(spans))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="paged16", choices=sorted(CASES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    w, inputs = build(**CASES[args.case])
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rec = torch.zeros(sms, hopper.RECORD_TILES, hopper.RECORD_FIELDS, dtype=torch.int64, device="cuda")
    plain_forward = bp.hopper_prefill_forward

    def recording_forward(*a, **kw):
        rec.zero_()
        plain_forward(*a, **kw, record=rec)

    bp.hopper_prefill_forward = recording_forward
    try:
        for _ in range(3):
            w.run(*inputs)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        w.run(*inputs)
        end.record()
        torch.cuda.synchronize()
    finally:
        bp.hopper_prefill_forward = plain_forward
    res = summarize(rec.cpu()) | dict(case=args.case, gather=args.gather, kernel_ms=start.elapsed_time(end))
    res["cycles_per_us"] = res["program_span_cycles_max"] / (res["kernel_ms"] * 1000)
    print(f"{args.case}{' gather' if args.gather else ''}: kernel {res['kernel_ms'] * 1000:.1f} us, "
          f"~{res['cycles_per_us']:.0f} cycles/us (longest program's span / kernel time)")
    print(f"{'blocks':>6} {'tiles':>6} " + " ".join(f"{f:>9}" for f in FIELDS))
    for key in sorted(res["per_blocks"], key=lambda k: (k == "all", int(k) if k != "all" else 0)):
        row = res["per_blocks"][key]
        print(f"{key:>6} {row['tiles']:>6} " + " ".join(f"{row[f]:>9.0f}" for f in FIELDS))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
