"""Segment GEMM and fp8 batched GEMM kernels + launchers (same functions as ``reference/gemm.py``).

Segment GEMM: one launch over the row tiles of every segment (scheduler/segment_tiles.py): program
``(t, j)`` finds its segment by a binary search over ``TILE_INDPTR`` on the device (no host sync, so
``run`` is capturable in a CUDA graph), then computes a ``[BLOCK_M, BLOCK_N]`` output tile with
``tl.dot`` over ``BLOCK_K`` slices of ``d_in`` in float32. Programs past the last tile run no k
iteration and store nothing.

Every matrix's innermost stride is 1, written as a literal in the kernels (Triton 3.6 does not
specialize a stride argument equal to 1, and without it loads neither vectorize nor pipeline); the
launchers copy an input whose last dim is strided. Pointer shapes:
  X [rows, d_in]                 segment rows (fp16/bf16), stride_xm
  W [num_weights, d_in, d_out]   row-major (n contiguous, stride_w_row between k rows), or
    [num_weights, d_out, d_in]   column-major, W_COLUMN_MAJOR (k contiguous, stride_w_row between n rows)
  Y [rows, d_out]                output, stride_ym; rows outside every segment are not written
  SEG_INDPTR [B + 1] int64, TILE_INDPTR [B + 1] int32, WEIGHT_INDICES [B] int32/int64 (optional)

bmm_fp8: A [b, m, k] and B [b, k, n] fp8, both k contiguous; C [b, m, n]. Grid: batch x m tiles x
n tiles on one axis; fp8 ``tl.dot`` (Hopper's fp8 tensor cores) in float32, scaled by ``A_scale * B_scale`` read on
the device, rounded once to the output dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._core.intmath import cdiv, next_power_of_2
from .._core.settings import interpreting
from ..scheduler.segment_tiles import search_steps, segment_tile_indptr, tile_slots
from .tiles import mma

__all__ = ["segment_gemm", "bmm_fp8", "segment_gemm_config", "bmm_fp8_config"]

INTERPRET = interpreting()  # Triton 3.9's interpreter computes bf16 tl.dot wrongly (tiles.mma)


@triton.jit
def _segment_gemm_kernel(
    X, W, Y, SEG_INDPTR, TILE_INDPTR, WEIGHT_INDICES,
    num_segments, steps, d_in, d_out,
    stride_xm, stride_wb, stride_w_row, stride_ym,
    HAS_WEIGHT_INDICES: tl.constexpr, W_COLUMN_MAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    # the largest segment s with TILE_INDPTR[s] <= t (empty segments own no tile). Programs past the last
    # tile get s = num_segments; they are turned into no-ops below (no early return: keeps the k loop
    # software-pipelined).
    lo = tl.full((), 0, tl.int32)
    hi = tl.full((), 0, tl.int32) + num_segments
    for _ in range(steps):
        mid = (lo + hi + 1) // 2
        go = tl.load(TILE_INDPTR + mid) <= t
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid - 1)
    active = lo < num_segments
    seg = tl.minimum(lo, num_segments - 1)
    row_end = tl.where(active, tl.load(SEG_INDPTR + seg + 1), 0)
    rows = tl.load(SEG_INDPTR + seg) + (t - tl.load(TILE_INDPTR + seg)) * BLOCK_M + tl.arange(0, BLOCK_M)  # [M]
    if HAS_WEIGHT_INDICES:
        w_index = tl.load(WEIGHT_INDICES + seg).to(tl.int64)
    else:
        w_index = seg.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [N]
    offs_k = tl.arange(0, BLOCK_K)  # [K]
    row_ok = rows < row_end
    col_ok = cols < d_out
    x_ptrs = X + rows.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]  # [M, K]
    if W_COLUMN_MAJOR:  # stored [d_out, d_in]: k contiguous
        w_ptrs = W + w_index * stride_wb + offs_k[:, None] + cols[None, :] * stride_w_row  # [K, N]
        w_step = BLOCK_K
    else:  # stored [d_in, d_out]: n contiguous
        w_ptrs = W + w_index * stride_wb + offs_k[:, None] * stride_w_row + cols[None, :]  # [K, N]
        w_step = BLOCK_K * stride_w_row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.where(active, d_in, 0)
    for k0 in range(0, k_end, BLOCK_K):
        k_ok = offs_k < d_in - k0
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += mma(x, w, UPCAST_DOT)
        x_ptrs += BLOCK_K
        w_ptrs += w_step
    y_ptrs = Y + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# GPU launch constants (module attributes so that benchmarks/bench_gemm.py's tuning grids can replace them).
SEG_BLOCK_M = 64  # rows per tile
SEG_MAX_BLOCK_N = 128  # output columns per tile (fewer for narrow outputs such as LoRA ranks)
SEG_BLOCK_K = 64  # d_in slice per tl.dot
SEG_WARPS = 4
SEG_STAGES = 3
FP8_BLOCK_M = 128  # 64 when m <= 64
FP8_BLOCK_N = 128
FP8_BLOCK_K = 128  # fp8: 128 bytes of k per row
FP8_WARPS = 8  # 4 with 64-row tiles
FP8_STAGES = 4


def segment_gemm_config(d_in: int, d_out: int, interpret: bool = INTERPRET) -> dict:
    """Tile sizes and launch options: small tiles under the interpreter; on a GPU the SEG_* constants,
    with BLOCK_N narrowed to the next power of two of ``d_out`` (at least 16)."""
    if interpret:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    block_n = min(SEG_MAX_BLOCK_N, max(16, next_power_of_2(d_out)))
    return dict(BLOCK_M=SEG_BLOCK_M, BLOCK_N=block_n, BLOCK_K=SEG_BLOCK_K, num_warps=SEG_WARPS, num_stages=SEG_STAGES)


def segment_gemm(x, weights, seg_indptr, weight_indices, weight_column_major: bool, out) -> None:
    """See ``reference/gemm.py``: the same arguments (seg_indptr int64 on x's device)."""
    num_segments = seg_indptr.shape[0] - 1
    d_in, d_out = x.shape[1], out.shape[1]
    cfg = segment_gemm_config(d_in, d_out)
    tile_indptr = segment_tile_indptr(seg_indptr, cfg["BLOCK_M"])
    # The kernel takes each matrix's innermost stride as 1 (a literal, so loads vectorize and pipeline).
    x = _unit_inner_stride(x)
    weights = _unit_inner_stride(weights)
    y = out if out.stride(-1) == 1 or out.shape[1] == 1 else out.new_empty(out.shape)
    if y is not out:
        y.copy_(out)  # rows outside every segment keep their values
    grid = (tile_slots(x.shape[0], num_segments, cfg["BLOCK_M"]), cdiv(d_out, cfg["BLOCK_N"]))
    _segment_gemm_kernel[grid](
        x, weights, y, seg_indptr, tile_indptr, weight_indices if weight_indices is not None else seg_indptr,
        num_segments, search_steps(num_segments), d_in, d_out,
        x.stride(0), weights.stride(0), weights.stride(1), y.stride(0),
        HAS_WEIGHT_INDICES=weight_indices is not None, W_COLUMN_MAJOR=weight_column_major, UPCAST_DOT=INTERPRET,
        **cfg,
    )
    if y is not out:
        out.copy_(y)


def _unit_inner_stride(t):
    """``t`` itself when its last dim has stride 1 (or size 1), else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


@triton.jit
def _bmm_fp8_kernel(
    A, B, C, A_SCALE, B_SCALE,
    m, n, k,
    stride_ab, stride_am, stride_bb, stride_bn, stride_cb, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MIXED_FP8: tl.constexpr, UPCAST_DOT: tl.constexpr, GROUP_M: tl.constexpr,
):
    # A [batch, m, k] fp8, k contiguous; B [batch, k, n] fp8, k contiguous (column-major); C [batch, m, n],
    # n contiguous. Tiles grouped GROUP_M rows at a time so
    # programs running together share B columns in L2.
    tiles_m = tl.cdiv(m, BLOCK_M)
    tiles_n = tl.cdiv(n, BLOCK_N)
    # one flat grid axis (batch-major): grid axes past the first hold at most 65535 programs
    batch = (tl.program_id(0) // (tiles_m * tiles_n)).to(tl.int64)
    pid = tl.program_id(0) % (tiles_m * tiles_n)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_rows
    pid_n = (pid % (GROUP_M * tiles_n)) // group_rows
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [M]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [N]
    offs_k = tl.arange(0, BLOCK_K)  # [K]
    row_ok = rows < m
    col_ok = cols < n
    a_ptrs = A + batch * stride_ab + rows[:, None] * stride_am + offs_k[None, :]  # [M, K]
    b_ptrs = B + batch * stride_bb + offs_k[:, None] + cols[None, :] * stride_bn  # [K, N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        k_ok = offs_k < k - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST_DOT:  # the interpreter: float32 products of the exact fp8 values
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32))
        elif MIXED_FP8:  # e4m3 x e5m2: both are exact in fp16
            acc += tl.dot(a.to(tl.float16), b.to(tl.float16))
        else:
            acc += tl.dot(a, b)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    acc = acc * (tl.load(A_SCALE) * tl.load(B_SCALE))
    c_ptrs = C + batch * stride_cb + rows[:, None] * stride_cm + cols[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def bmm_fp8_config(m: int, n: int, interpret: bool = INTERPRET) -> dict:
    """Tile sizes: the FP8_* constants on a GPU (64-row tiles and 4 warps when m <= 64), small tiles
    under the interpreter."""
    if interpret:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    small = m <= 64 and FP8_BLOCK_M > 64
    return dict(BLOCK_M=64 if small else FP8_BLOCK_M, BLOCK_N=FP8_BLOCK_N, BLOCK_K=FP8_BLOCK_K, GROUP_M=8,
                num_warps=4 if small else FP8_WARPS, num_stages=FP8_STAGES)


def bmm_fp8(A, B, A_scale, B_scale, out) -> None:
    """See ``reference/gemm.py``: the same arguments."""
    batch, m, k = A.shape
    n = B.shape[2]
    cfg = bmm_fp8_config(m, n)
    A = _unit_inner_stride(A)
    if B.stride(1) != 1 and k > 1:  # the API requires column-major B; keep the kernel's contract anyway
        B = B.transpose(1, 2).contiguous().transpose(1, 2)
    c = _unit_inner_stride(out)
    grid = (cdiv(m, cfg["BLOCK_M"]) * cdiv(n, cfg["BLOCK_N"]) * batch,)
    _bmm_fp8_kernel[grid](
        A, B, c, A_scale, B_scale, m, n, k,
        A.stride(0), A.stride(1), B.stride(0), B.stride(2), c.stride(0), c.stride(1),
        MIXED_FP8=A.dtype != B.dtype, UPCAST_DOT=INTERPRET, **cfg,
    )
    if c is not out:
        out.copy_(c)

