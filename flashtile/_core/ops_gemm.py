"""The GEMM op boundary: ``flashtile::segment_gemm`` and ``flashtile::bmm_fp8``, destination-passing
torch.library custom ops (for torch.compile; same conventions as ops.py) over the functions of the same
arguments in flashtile/kernels/gemm.py or flashtile/reference/gemm.py. Eager calls skip the dispatcher."""

from __future__ import annotations

from typing import Optional

import torch

from . import dispatch

__all__ = ["segment_gemm", "bmm_fp8", "call_segment_gemm", "call_bmm_fp8"]


def _segment_gemm_impl(x, weights, segs, segs_are_lens, weight_indices, weight_column_major, out, scratch,
                       backend) -> None:
    dispatch.implementation("gemm", x.device, backend).segment_gemm(
        x, weights, segs, segs_are_lens, weight_indices, weight_column_major, out, scratch)


def _bmm_fp8_impl(A, B, A_scale, B_scale, out, backend) -> None:
    dispatch.implementation("gemm", A.device, backend).bmm_fp8(A, B, A_scale, B_scale, out)


@torch.library.custom_op(
    "flashtile::segment_gemm", mutates_args=("out", "scratch"),
    schema="(Tensor x, Tensor weights, Tensor segs, bool segs_are_lens, Tensor? weight_indices, "
           "bool weight_column_major, Tensor(a!) out, Tensor(b!) scratch, str backend) -> ()")
def segment_gemm(x, weights, segs, segs_are_lens, weight_indices, weight_column_major, out, scratch, backend) -> None:
    """Segment GEMM (reference/gemm.py::segment_gemm): x ``[rows, d_in]``, weights ``[num_weights, d_in, d_out]``
    (or ``[num_weights, d_out, d_in]`` when column-major), segs int32/int64 on x's device (``[B]`` lengths when
    segs_are_lens, else ``[B + 1]`` offsets), weight_indices ``[B]`` or None; writes the segments' rows of out
    ``[rows, d_out]``; scratch float32 ``[n]`` (split-K partial sums; n may be 0)."""
    _segment_gemm_impl(x, weights, segs, segs_are_lens, weight_indices, weight_column_major, out, scratch, backend)


@segment_gemm.register_fake
def _segment_gemm_fake(*args) -> None:
    return None


@torch.library.custom_op(
    "flashtile::bmm_fp8", mutates_args=("out",),
    schema="(Tensor A, Tensor B, Tensor A_scale, Tensor B_scale, Tensor(a!) out, str backend) -> ()")
def bmm_fp8(A, B, A_scale, B_scale, out, backend) -> None:
    """fp8 batched GEMM (reference/gemm.py::bmm_fp8): A ``[b, m, k]``, B ``[b, k, n]`` (column-major) fp8,
    one-element float32 scales; writes out ``[b, m, n]``."""
    _bmm_fp8_impl(A, B, A_scale, B_scale, out, backend)


@bmm_fp8.register_fake
def _bmm_fp8_fake(*args) -> None:
    return None


def call_segment_gemm(x, weights, segs, segs_are_lens: bool, weight_indices: Optional[torch.Tensor],
                      weight_column_major: bool, out, scratch, backend: str) -> None:
    """Run the op: its implementation when eager, the registered op when torch.compile traces."""
    if torch.compiler.is_compiling():
        segment_gemm(x, weights, segs, segs_are_lens, weight_indices, weight_column_major, out, scratch, backend)
    else:
        _segment_gemm_impl(x, weights, segs, segs_are_lens, weight_indices, weight_column_major, out, scratch,
                           backend)


def call_bmm_fp8(A, B, A_scale, B_scale, out, backend: str) -> None:
    """Run the op: its implementation when eager, the registered op when torch.compile traces."""
    if torch.compiler.is_compiling():
        bmm_fp8(A, B, A_scale, B_scale, out, backend)
    else:
        _bmm_fp8_impl(A, B, A_scale, B_scale, out, backend)
