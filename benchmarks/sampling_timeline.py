"""Where a segmented sampling launch spends its time, row by row (GPU only).

    python benchmarks/sampling_timeline.py [--cases top_p:512:32000,min_p:512:32000] [NAME=v ...]

For each case (sampler:batch:vocab; samplers top_p / top_k / min_p / plain / joint / top_k_first on
``softmax(randn)`` rows, one program per row: the split is off) the kernel runs once with ``RECORD_TIMES``
(the global timer at the row's start, after its first pass, after its first draw and at its end, and its
SM), then alone as CUDA-graph replays with seed and offset given. Printed: the launch's span, the mean row
time and its parts, the passes, and how the rows' start times spread (rows that start after the first ones
finish ran in a later wave). NAME=v sets a constant of flashtile.kernels.sampling first (e.g. SEG_NQ=2).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from benchmarks.harness import measure  # noqa: E402
from flashtile.kernels import sampling as K  # noqa: E402

PARAMS = {"top_p": dict(top_p=0.9), "top_k": dict(top_k=50), "min_p": dict(min_p=0.05), "plain": dict(),
          "joint": dict(top_k=50, top_p=0.9), "top_k_first": dict(top_k=50, top_p=0.9, order="top_k_first")}


@triton.jit
def _touch_kernel(PROBS, OUT, stride_row):
    """Reads one float per row and stores it: the launch floor of a one-program-per-row kernel."""
    i = tl.program_id(0)
    tl.store(OUT + i, tl.load(PROBS + i.to(tl.int64) * stride_row).to(tl.int32))


def _quantiles(x: torch.Tensor) -> str:
    q = torch.quantile(x.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return f"{float(x.double().mean()):6.2f} (p10 {q[0]:.2f}, p50 {q[1]:.2f}, p90 {q[2]:.2f}, max {float(x.max()):.2f})"


def run_case(name: str, batch: int, vocab: int) -> None:
    dev = "cuda"
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(batch, vocab, device=dev), -1)
    out = torch.empty(batch, dtype=torch.int32, device=dev)
    valid = torch.empty(batch, dtype=torch.bool, device=dev)
    rec = torch.zeros(batch, 6, dtype=torch.int64, device=dev)
    params = PARAMS[name]
    for _ in range(2):  # the first launch compiles
        K.filtered_sampling(probs, None, out, valid, 1, 0, seg=True, split=False, passes=rec, **params)
    torch.cuda.synchronize()
    r = rec.cpu()
    passes = (r[:, 0] % 1000).float()
    t0 = r[:, 1].min()
    start, pass1, draw1, end = [(r[:, j] - t0).double() / 1000.0 for j in (1, 2, 3, 4)]
    sms = r[:, 5]
    span = float(end.max())
    per_sm = torch.bincount(sms, minlength=int(sms.max()) + 1)
    busy = torch.zeros(per_sm.numel(), dtype=torch.float64).index_add_(0, sms, end - start)
    first_end = float(end.min())
    late = int((start > first_end).sum())
    kernel_us = measure(lambda: K.filtered_sampling(probs, None, out, valid, 1, 0, seg=True, split=False, **params),
                        cuda_graph="on")["median_us"]
    call = lambda: K.filtered_sampling(probs, None, out, valid, 1, 0, seg=True, split=False, **params)  # noqa: E731
    ten_us = measure(call, cuda_graph="on", graph_span_us=10 * kernel_us)["median_us"]
    floor_us = measure(lambda: _touch_kernel[(batch,)](probs, out, probs.stride(0)), cuda_graph="on")["median_us"]
    print(f"  graph of ~10 calls: {ten_us:.1f} us per call; launch floor (one load per row): {floor_us:.1f} us")
    print(f"{name} b{batch} V{vocab}: graph replay {kernel_us:.1f} us; timeline span {span:.1f} us; "
          f"passes mean {passes.mean():.2f} max {int(passes.max())}")
    print(f"  row total   {_quantiles(end - start)} us")
    print(f"  first pass  {_quantiles(pass1 - start)} us (start to end of the first pass)")
    print(f"  first draw  {_quantiles(draw1 - pass1)} us")
    print(f"  rest        {_quantiles(end - draw1)} us")
    print(f"  row starts  {_quantiles(start)} us; rows starting after the first row ended: {late}")
    print(f"  rows per SM {per_sm.min()}..{per_sm.max()} over {int((per_sm > 0).sum())} SMs; "
          f"busy time per SM (sum of row times) {_quantiles(busy[per_sm > 0])} us", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="top_p:512:32000,min_p:512:32000,plain:512:32000,top_p:264:32000,"
                    "top_p:128:128256")
    ap.add_argument("settings", nargs="*", help="NAME=value constants of flashtile.kernels.sampling")
    args = ap.parse_args()
    for item in args.settings:
        key, value = item.split("=", 1)
        setattr(K, key, type(getattr(K, key))(value))
        print(f"{key} = {value}")
    for spec in args.cases.split(","):
        name, batch, vocab = spec.split(":")
        run_case(name, int(batch), int(vocab))


if __name__ == "__main__":
    main()
