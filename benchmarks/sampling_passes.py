"""Passes per row of the segmented sampler on the GPU (FLASHTILE_SAMPLING_SEG path), and its time
with the kernel alone against the public call, for a few sampling-suite shapes.

    python benchmarks/sampling_passes.py
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import flashtile.sampling as api  # noqa: E402
from benchmarks.harness import measure  # noqa: E402
from flashtile.kernels import sampling as K  # noqa: E402

CASES = [("top_p", 1, 32000, dict(top_p=0.9)), ("top_p", 128, 32000, dict(top_p=0.9)),
         ("top_p", 128, 128256, dict(top_p=0.9)), ("min_p", 128, 128256, dict(min_p=0.05)),
         ("top_k", 128, 128256, dict(top_k=50)), ("plain", 128, 128256, dict())]


def main() -> None:
    dev = "cuda"
    for name, batch, vocab, params in CASES:
        torch.manual_seed(0)
        probs = torch.softmax(torch.randn(batch, vocab, device=dev), -1)
        out = torch.empty(batch, dtype=torch.int32, device=dev)
        valid = torch.empty(batch, dtype=torch.bool, device=dev)
        passes = torch.zeros(batch, dtype=torch.int32, device=dev)
        K.filtered_sampling(probs, None, out, valid, 1, 0, seg=True, passes=passes, **params)
        p = passes.cpu()
        fallback = int((p >= 1000).sum())
        p = p % 1000
        kernel_us = measure(lambda: K.filtered_sampling(probs, None, out, valid, 1, 0, seg=True, **params),
                            cuda_graph="on")["median_us"]
        public = {"top_p": lambda: api.top_p_sampling_from_probs(probs, 0.9),
                  "min_p": lambda: api.min_p_sampling_from_probs(probs, 0.05),
                  "top_k": lambda: api.top_k_sampling_from_probs(probs, 50),
                  "plain": lambda: api.sampling_from_probs(probs)}[name]
        public_us = measure(public, cuda_graph="on")["median_us"]
        print(f"{name} b{batch} V{vocab}: passes mean {p.float().mean():.2f} max {int(p.max())}, "
              f"fallback rows {fallback}; kernel alone {kernel_us:.1f} us, public call {public_us:.1f} us",
              flush=True)


if __name__ == "__main__":
    main()
