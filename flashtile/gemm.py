"""GEMMs (``flashinfer.gemm``): :class:`SegmentGEMMWrapper` (one weight per segment of rows, as in
LoRA and mixture-of-experts layers) and :func:`bmm_fp8` (batched fp8 matmul with per-tensor scales).

CUDA tensors run the Triton kernels of ``kernels/gemm.py``; CPU tensors the float32 reference
(``reference/gemm.py``), or the kernels under Triton's interpreter when forced (DESIGN.md §Dispatch).
Both accumulate in float32 and round once to the output dtype.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._core.checks import FP8_DTYPES, check_option, check_tensor, describe, parse_dtype
from ._core.ops_gemm import call_bmm_fp8, call_segment_gemm

__all__ = ["SegmentGEMMWrapper", "bmm_fp8"]

SEGMENT_DTYPES = (torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
OUTPUT_DTYPES = (torch.bfloat16, torch.float16)
# Upstream backends: "sm80"/"sm90" pick a CUTLASS kernel there; here every name runs our kernel.
# "triton" and "reference" choose a flashtile path explicitly.
_SEGMENT_BACKENDS = ("auto", "sm80", "sm90", "triton", "reference")
# bmm_fp8's upstream backends are vendor libraries (cuBLAS, cuDNN, CUTLASS, CuTe DSL); each one here
# means our Triton kernel, since upstream's default "cublas" is what callers pass.
_BMM_BACKENDS = ("auto", "cublas", "cudnn", "cutlass", "cute-dsl", "triton", "reference")


def _our_backend(backend: str) -> str:
    return backend if backend in ("triton", "reference") else "auto"


class SegmentGEMMWrapper:
    """Segment GEMM: ``y[rows of segment i] = x[rows of segment i] @ W[weight_indices[i]]``.

    Args:
        float_workspace_buffer: a contiguous device tensor of any dtype; its bytes hold the float32
            partial sums of split-K (``splits x rows x d_out x 4`` bytes: a smaller buffer means fewer
            splits, down to none; 128 MiB is ample). Its device is where the int workspace is allocated.
        backend: ``"auto"``, ``"sm80"`` or ``"sm90"`` (upstream's CUTLASS choices; all run flashtile's
            Triton kernel on CUDA tensors and the reference on CPU tensors), or ``"triton"`` /
            ``"reference"`` to force a path. Anything else raises ``ValueError``.
    """

    def __init__(self, float_workspace_buffer: torch.Tensor, backend: str = "auto") -> None:
        if backend not in _SEGMENT_BACKENDS:
            raise ValueError(f"Unsupported gemm backend: backend={backend!r}, expected one of {_SEGMENT_BACKENDS}")
        check_tensor("float_workspace_buffer", float_workspace_buffer)
        self._backend = _our_backend(backend)
        self._float_workspace_buffer = float_workspace_buffer
        self._scratch = _float32_scratch(float_workspace_buffer)
        self._int_workspace_buffer = torch.empty(
            1024 * 1024, dtype=torch.int8, device=float_workspace_buffer.device)

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor, int_workspace_buffer: torch.Tensor) -> None:
        """Replace the workspace buffers (the float one holds split-K partial sums; the int one is kept
        for API compatibility)."""
        check_tensor("float_workspace_buffer", float_workspace_buffer)
        check_tensor("int_workspace_buffer", int_workspace_buffer)
        self._float_workspace_buffer = float_workspace_buffer
        self._scratch = _float32_scratch(float_workspace_buffer)
        self._int_workspace_buffer = int_workspace_buffer

    def run(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        batch_size: int,
        weight_column_major: bool,
        out: Optional[torch.Tensor] = None,
        seg_lens: Optional[torch.Tensor] = None,
        seg_indptr: Optional[torch.Tensor] = None,
        weight_indices: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Multiply each segment of rows of ``x`` by its weight matrix.

        Args:
            x: ``[total_rows, d_in]``, fp16 or bf16; the segments' rows, concatenated (a strided view is fine).
            weights: ``[num_weights, d_in, d_out]`` when ``weight_column_major`` is False (``y = x @ W``), or
                ``[num_weights, d_out, d_in]`` when True (``y = x @ W^T``, the ``nn.Linear`` layout); dtype of x.
            batch_size: B, the number of segments.
            weight_column_major: the layout of ``weights`` (above).
            out: optional ``[total_rows, d_out]`` output of x's dtype, filled in place and returned;
                rows outside every segment are left as they are. When None, a zero-filled output is made.
            seg_lens: int32/int64 ``[B]`` rows per segment (any length >= 0); used when ``seg_indptr`` is None.
            seg_indptr: int32/int64 ``[B + 1]`` non-decreasing row offsets of the segments in ``x``; takes
                precedence over ``seg_lens``. One of the two is required.
            weight_indices: optional int32/int64 ``[B]``: segment i uses ``weights[weight_indices[i]]``
                (repeats allowed); by default segment i uses ``weights[i]``.

        Returns ``out``, ``[total_rows, d_out]`` in x's dtype. Index tensors may live on the CPU or on
        x's device; host ones are validated (ranges, monotonicity), device ones are not (no sync).
        """
        check_tensor("x", x, ndim=2, dtypes=SEGMENT_DTYPES)
        device = x.device
        check_tensor("weights", weights, ndim=3, dtypes=(x.dtype,), device=device)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 0:
            raise ValueError(f"batch_size: expected an int >= 0, got {describe(batch_size)}")
        num_weights = weights.shape[0]
        d_in = weights.shape[2] if weight_column_major else weights.shape[1]
        d_out = weights.shape[1] if weight_column_major else weights.shape[2]
        if x.shape[1] != d_in:
            layout = "[num_weights, d_out, d_in]" if weight_column_major else "[num_weights, d_in, d_out]"
            raise ValueError(f"weights: expected {layout} with d_in = x.shape[1] = {x.shape[1]}, "
                             f"got shape {list(weights.shape)} (weight_column_major={bool(weight_column_major)})")
        segs, segs_are_lens = self._segments(seg_lens, seg_indptr, batch_size, x.shape[0], device)
        if weight_indices is not None:
            check_tensor("weight_indices", weight_indices, shape=(batch_size,), dtypes=INDEX_DTYPES)
            if weight_indices.device.type == "cpu" and batch_size > 0:
                lo, hi = int(weight_indices.min()), int(weight_indices.max())
                if lo < 0 or hi >= num_weights:
                    raise ValueError(f"weight_indices: expected values in [0, {num_weights}), got [{lo}, {hi}]")
            weight_indices = weight_indices.to(device, non_blocking=True)
        elif num_weights < batch_size:
            raise ValueError(f"weights: without weight_indices, segment i uses weights[i], so expected "
                             f"num_weights >= batch_size = {batch_size}, got {num_weights}")
        if out is None:
            out = torch.zeros((x.shape[0], d_out), dtype=x.dtype, device=device)
        else:
            check_tensor("out", out, shape=(x.shape[0], d_out), dtypes=(x.dtype,), device=device)
        if batch_size == 0 or out.numel() == 0:
            return out
        scratch = self._scratch if self._scratch.device == device else _float32_scratch(None, device)
        call_segment_gemm(x, weights, segs, segs_are_lens, weight_indices, bool(weight_column_major), out, scratch,
                          self._backend)
        return out

    forward = run

    @staticmethod
    def _segments(seg_lens, seg_indptr, batch_size: int, total_rows: int, device: torch.device):
        """``(segs, segs_are_lens)``: ``seg_indptr`` (``[B + 1]``) when given, else ``seg_lens`` (``[B]``), on
        ``device`` in its own integer dtype (the kernel reads either form: no prefix-sum launch here)."""
        if seg_indptr is not None:
            check_tensor("seg_indptr", seg_indptr, shape=(batch_size + 1,), dtypes=INDEX_DTYPES)
            name, segs = "seg_indptr", seg_indptr
        elif seg_lens is not None:
            check_tensor("seg_lens", seg_lens, shape=(batch_size,), dtypes=INDEX_DTYPES)
            name, segs = "seg_lens", seg_lens
        else:
            raise ValueError("Either seg_lens or seg_indptr should be provided.")
        if segs.device.type == "cpu":
            values = segs.tolist()
            if name == "seg_lens":
                if any(v < 0 for v in values):
                    raise ValueError(f"seg_lens: expected lengths >= 0, got min {min(values)}")
                end = sum(values)
            else:
                if values[0] < 0 or any(b < a for a, b in zip(values, values[1:])):
                    raise ValueError("seg_indptr: expected non-decreasing offsets >= 0")
                end = values[-1]
            if end > total_rows:
                raise ValueError(f"{name}: the segments cover {end} rows, but x has {total_rows}")
        if segs.device != device:
            segs = segs.to(device, non_blocking=True)
        return segs, name == "seg_lens"


def _float32_scratch(buffer: Optional[torch.Tensor], device: Optional[torch.device] = None) -> torch.Tensor:
    """The bytes of ``buffer`` as a 1-D float32 tensor (split-K partial sums), or an empty one when the
    buffer is absent, not contiguous or not 16-byte aligned."""
    if buffer is not None:
        device = buffer.device
        if buffer.is_contiguous() and buffer.numel() > 0 and buffer.data_ptr() % 16 == 0:
            flat = buffer.reshape(-1).view(torch.uint8)
            return flat[: flat.numel() // 4 * 4].view(torch.float32)
    return torch.empty(0, dtype=torch.float32, device=device)


def bmm_fp8(
    A: torch.Tensor,
    B: torch.Tensor,
    A_scale: torch.Tensor,
    B_scale: torch.Tensor,
    dtype: torch.dtype,
    out: Optional[torch.Tensor] = None,
    backend: str = "cublas",
) -> torch.Tensor:
    """Batched fp8 matmul with per-tensor scales: ``out[b] = (A[b] * A_scale) @ (B[b] * B_scale)``.

    Args:
        A: ``[batch, m, k]`` fp8 (``float8_e4m3fn`` or ``float8_e5m2``), any strides (row-major is fastest).
        B: ``[batch, k, n]`` fp8 (either fp8 dtype, mixing with A's allowed), column-major: ``B.stride(1) == 1``,
            i.e. a ``.transpose(-2, -1)`` view of a contiguous ``[batch, n, k]`` tensor, as upstream requires.
        A_scale, B_scale: float32 tensors of one element: dequantization multipliers (e.g. ``1 / quant_scale``).
        dtype: output dtype, ``torch.bfloat16`` or ``torch.float16``.
        out: optional ``[batch, m, n]`` output of ``dtype``, filled in place and returned.
        backend: upstream's ``"cublas"`` (default), ``"cudnn"``, ``"cutlass"``, ``"cute-dsl"`` or ``"auto"``
            all run flashtile's Triton kernel on CUDA tensors; ``"triton"``/``"reference"`` force a path.

    Returns ``out`` ``[batch, m, n]``. The product accumulates in float32; the scales multiply the
    accumulator, and the result is rounded once to ``dtype``.
    """
    check_option("backend", backend, _BMM_BACKENDS)
    check_tensor("A", A, ndim=3, dtypes=FP8_DTYPES)
    device = A.device
    check_tensor("B", B, ndim=3, dtypes=FP8_DTYPES, device=device)
    batch, m, k = A.shape
    if B.shape[0] != batch or B.shape[1] != k:
        raise ValueError(f"B: expected shape [{batch}, {k}, n] to match A {list(A.shape)}, got {list(B.shape)}")
    n = B.shape[2]
    if B.stride(1) != 1 and k > 1:
        raise ValueError(f"B: expected a column-major [batch, k, n] tensor (stride 1 along k, a transposed view "
                         f"of a contiguous [batch, n, k] tensor), got strides {tuple(B.stride())}")
    for name, scale in (("A_scale", A_scale), ("B_scale", B_scale)):
        check_tensor(name, scale, dtypes=(torch.float32,), device=device)
        if scale.numel() != 1:
            raise ValueError(f"{name}: expected a float32 tensor of one element (a per-tensor scale), "
                             f"got shape {list(scale.shape)}")
    dtype = parse_dtype("dtype", dtype, OUTPUT_DTYPES)
    if out is None:
        out = torch.empty((batch, m, n), dtype=dtype, device=device)
    else:
        check_tensor("out", out, shape=(batch, m, n), dtypes=(dtype,), device=device)
    if out.numel() == 0:
        return out
    if k == 0:
        out.zero_()
        return out
    call_bmm_fp8(A, B, A_scale, B_scale, out, _our_backend(backend))
    return out
