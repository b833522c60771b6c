"""Segment GEMM and fp8 batched GEMM in pure PyTorch: the CPU path and the readable spec of
``kernels/gemm.py`` (the same functions, the same arguments).

Both accumulate in float32 on upcast inputs and round once to the output dtype.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["segment_gemm", "bmm_fp8"]


def segment_gemm(
    x: torch.Tensor,
    weights: torch.Tensor,
    segs: torch.Tensor,
    segs_are_lens: bool,
    weight_indices: Optional[torch.Tensor],
    weight_column_major: bool,
    out: torch.Tensor,
    scratch: torch.Tensor,
) -> None:
    """``out[rows of s] = x[rows of s] @ W[weight_indices[s] or s]`` (``W`` transposed when
    ``weight_column_major``), for each segment ``s``; rows outside every segment are left as they are.

    x ``[rows, d_in]``; weights ``[num_weights, d_in, d_out]`` (or ``[num_weights, d_out, d_in]`` when
    column-major); segs integer: ``[B]`` lengths (the segments start at row 0) when ``segs_are_lens``,
    else ``[B + 1]`` row offsets; weight_indices integer ``[B]`` or None; out ``[rows, d_out]``, written in
    place; scratch: float32 workspace of the kernels' split-K (unused here)."""
    if segs_are_lens:
        bounds = [0]
        for n in segs.tolist():
            bounds.append(bounds[-1] + n)
    else:
        bounds = segs.tolist()
    which = weight_indices.tolist() if weight_indices is not None else range(len(bounds) - 1)
    for s, w in enumerate(which):
        start, end = bounds[s], bounds[s + 1]
        if end <= start:
            continue
        weight = weights[w].float()
        if weight_column_major:
            weight = weight.t()
        out[start:end] = (x[start:end].float() @ weight).to(out.dtype)


def bmm_fp8(A: torch.Tensor, B: torch.Tensor, A_scale: torch.Tensor, B_scale: torch.Tensor, out: torch.Tensor) -> None:
    """``out[b] = (A[b] * A_scale) @ (B[b] * B_scale)``: fp8 A ``[batch, m, k]`` and B ``[batch, k, n]``
    dequantized to float32, float32 scalar scales; out ``[batch, m, n]`` (fp16/bf16), written in place."""
    scale = A_scale.float().reshape(()) * B_scale.float().reshape(())
    out.copy_((torch.bmm(A.float(), B.float()) * scale).to(out.dtype))
