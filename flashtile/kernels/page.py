"""Paged KV cache writes: appending token rows into their pages, and the (batch index, position)
of every appended row. Kernels + launchers; the API and the checks live in ``flashtile.page``.

Append: one program per ``BLOCK_R`` rows of the flattened ``(token, head)`` grid, each row a vector
of ``head_dim`` elements, so a decode step of batch 512 is one short launch and a 16k-token prefill
is a few thousand programs. Every row finds its page through the CSR page table and copies its K
and V vectors. The copy is bitwise: the launcher reinterprets fp16/bf16/fp8/fp32 data as integers of
the same width (the API guarantees that the append tensors have the cache's dtype), so no float
conversion runs and fp8 needs no hardware support. Strides are passed: HND caches (transposed page
views), tuple caches, slices of a larger pool and strided append tensors (slices of a fused QKV
projection) are written without copies.

A row is skipped, never written out of bounds, when its batch index is outside ``[0, batch_size)``
(``-1`` marks padding rows), its position is negative or past the request's pages, or its page id
is outside the cache. (The API validates host index arrays and raises; device index arrays are not
read on the host, so these guards are what keeps a bad device table from corrupting memory.)

Pointer shapes:
  K_APP      [nnz, num_heads, HEAD_DIM_K]  any strides    (V_APP: HEAD_DIM_V)
  BATCH_IDX  [nnz] int32/int64, request of each row (-1: padding, skipped)
  POS        [nnz] int32/int64, position of each row inside its request
  KV_INDICES [num_indices] int32/int64, page ids
  KV_INDPTR  [batch_size + 1] int32/int64, request b owns KV_INDICES[KV_INDPTR[b]:KV_INDPTR[b+1]]
  K_CACHE    [num_pages, page_size, num_heads, HEAD_DIM_K] page view (NHD order of axes), unit last stride
  V_CACHE    [num_pages, page_size, num_heads, HEAD_DIM_V]

Batch indices and positions: one program per ``BLOCK`` appended rows; a row finds its request by a
binary search over ``append_indptr`` (``ceil(log2(batch_size))`` steps, a host-side integer), so
one long request does not serialize the work. No host synchronization, capturable in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._core.intmath import cdiv, next_power_of_2
from .._core.launch import direct_launch

__all__ = ["append_paged_kv", "batch_indices_positions", "append_block_rows"]

# Rows (token, head) per program: at most this many elements per program (16 KiB of bf16 for K plus
# as much for V), and a small block when there are few rows, so that short launches still spread
# over the SMs.
_MAX_TILE_ELEMENTS = 8192
_MIN_PROGRAMS = 256
_SMALL_TILE_ELEMENTS = 1024

# Bitwise copy: the integer type of each element width.
_BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@direct_launch
@triton.jit
def _append_paged_kv_kernel(
    K_APP, V_APP,  # [nnz, H, HEAD_DIM_K], [nnz, H, HEAD_DIM_V]
    BATCH_IDX, POS,  # [nnz]
    KV_INDICES, KV_INDPTR,  # [num_indices], [batch_size + 1]
    K_CACHE, V_CACHE,  # [num_pages, page_size, H, HEAD_DIM_K / HEAD_DIM_V]
    nnz, batch_size, num_indices, num_pages, page_size,
    stride_ka_t, stride_ka_h, stride_ka_d,
    stride_va_t, stride_va_h, stride_va_d,
    stride_kc_p, stride_kc_s, stride_kc_h,
    stride_vc_p, stride_vc_s, stride_vc_h,
    NUM_HEADS: tl.constexpr,  # constexpr: row -> (token, head) is a shift/mask for powers of 2
    HEAD_DIM_K: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    DK_PAD: tl.constexpr, DV_PAD: tl.constexpr,  # powers of 2 >= the head dims (tile widths)
    BLOCK_R: tl.constexpr,  # (token, head) rows per program
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [R] flattened (token, head)
    token = rows // NUM_HEADS
    head = rows % NUM_HEADS
    ok = token < nnz
    b = tl.load(BATCH_IDX + token, mask=ok, other=-1).to(tl.int32)  # [R]
    p = tl.load(POS + token, mask=ok, other=-1).to(tl.int32)  # [R]
    ok = ok & (b >= 0) & (b < batch_size) & (p >= 0)
    first = tl.load(KV_INDPTR + b, mask=ok, other=0).to(tl.int64)
    last = tl.load(KV_INDPTR + b + 1, mask=ok, other=0).to(tl.int64)
    entry = first + p // page_size  # index into KV_INDICES
    ok = ok & (entry >= 0) & (entry < last) & (entry < num_indices)
    page = tl.load(KV_INDICES + entry, mask=ok, other=0).to(tl.int64)
    ok = ok & (page >= 0) & (page < num_pages)
    slot = (p % page_size).to(tl.int64)
    token = token.to(tl.int64)  # 64-bit addressing: token * stride and page * stride may pass 2**31

    offs_k = tl.arange(0, DK_PAD)
    mask_k = ok[:, None] & (offs_k < HEAD_DIM_K)[None, :]  # [R, DK_PAD]
    src_k = K_APP + token[:, None] * stride_ka_t + head[:, None] * stride_ka_h + offs_k[None, :] * stride_ka_d
    dst_k = K_CACHE + page[:, None] * stride_kc_p + slot[:, None] * stride_kc_s + head[:, None] * stride_kc_h
    tl.store(dst_k + offs_k[None, :], tl.load(src_k, mask=mask_k), mask=mask_k)

    offs_v = tl.arange(0, DV_PAD)
    mask_v = ok[:, None] & (offs_v < HEAD_DIM_V)[None, :]  # [R, DV_PAD]
    src_v = V_APP + token[:, None] * stride_va_t + head[:, None] * stride_va_h + offs_v[None, :] * stride_va_d
    dst_v = V_CACHE + page[:, None] * stride_vc_p + slot[:, None] * stride_vc_s + head[:, None] * stride_vc_h
    tl.store(dst_v + offs_v[None, :], tl.load(src_v, mask=mask_v), mask=mask_v)


def _bits(x: torch.Tensor) -> torch.Tensor:
    """``x`` reinterpreted as integers of the same width (a view; strides unchanged)."""
    return x.view(_BITS_DTYPE[x.element_size()])


def append_block_rows(num_rows: int, head_dim_pad: int) -> int:
    """(token, head) rows per program: a power of 2, large for long appends, small for short ones."""
    cap = max(1, _MAX_TILE_ELEMENTS // head_dim_pad)
    if num_rows >= _MIN_PROGRAMS * cap:
        return cap
    return max(1, min(cap, _SMALL_TILE_ELEMENTS // head_dim_pad))


def append_paged_kv(
    append_k: torch.Tensor,
    append_v: torch.Tensor,
    batch_indices: torch.Tensor,
    positions: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_indptr: torch.Tensor,
) -> None:
    """Write row ``r`` of ``append_k``/``append_v`` ``[nnz, H, D]`` into page
    ``kv_indices[kv_indptr[batch_indices[r]] + positions[r] // page_size]``, slot
    ``positions[r] % page_size`` of ``k_pages``/``v_pages`` ``[num_pages, page_size, H, D]`` (views,
    unit last stride). All tensors on one device; the page views are modified in place."""
    nnz, num_heads, head_dim_k = append_k.shape
    head_dim_v = append_v.shape[2]
    num_pages, page_size = k_pages.shape[0], k_pages.shape[1]
    rows = nnz * num_heads
    if rows == 0 or num_pages == 0 or kv_indices.numel() == 0:
        return
    dk_pad = next_power_of_2(head_dim_k)
    dv_pad = next_power_of_2(head_dim_v)
    block_r = append_block_rows(rows, max(dk_pad, dv_pad))
    tile = block_r * max(dk_pad, dv_pad)
    ka, va, kc, vc = _bits(append_k), _bits(append_v), _bits(k_pages), _bits(v_pages)
    grid = (cdiv(rows, block_r),)
    _append_paged_kv_kernel[grid](
        ka, va, batch_indices, positions, kv_indices, kv_indptr, kc, vc,
        nnz, kv_indptr.numel() - 1, kv_indices.numel(), num_pages, page_size,
        ka.stride(0), ka.stride(1), ka.stride(2),
        va.stride(0), va.stride(1), va.stride(2),
        kc.stride(0), kc.stride(1), kc.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2),
        NUM_HEADS=num_heads, HEAD_DIM_K=head_dim_k, HEAD_DIM_V=head_dim_v, DK_PAD=dk_pad, DV_PAD=dv_pad,
        BLOCK_R=block_r, num_warps=4 if tile <= 2048 else 8,
    )


@direct_launch
@triton.jit
def _batch_indices_positions_kernel(
    APPEND_INDPTR,  # [batch_size + 1] int32/int64, rows of request b: APPEND_INDPTR[b]:APPEND_INDPTR[b+1]
    SEQ_LENS,  # [batch_size] int32/int64, KV length of each request after the append
    BATCH_IDX, POS,  # [nnz] int32 outputs
    nnz, batch_size, num_steps,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] appended rows
    in_range = r < nnz
    start = tl.load(APPEND_INDPTR).to(tl.int64)
    end = tl.load(APPEND_INDPTR + batch_size).to(tl.int64)
    valid = in_range & (r >= start) & (r < end)
    # Largest b in [0, batch_size) with APPEND_INDPTR[b] <= r (an empty request b' has
    # APPEND_INDPTR[b'] == APPEND_INDPTR[b' + 1], so the search never stops on it).
    lo = tl.zeros([BLOCK], dtype=tl.int32)
    hi = tl.zeros([BLOCK], dtype=tl.int32) + batch_size
    for _ in range(num_steps):
        mid = (lo + hi) // 2
        v = tl.load(APPEND_INDPTR + mid, mask=valid, other=0).to(tl.int64)
        right = v <= r
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    req_end = tl.load(APPEND_INDPTR + lo + 1, mask=valid, other=0).to(tl.int64)
    seq_len = tl.load(SEQ_LENS + lo, mask=valid, other=0).to(tl.int64)
    pos = seq_len - (req_end - r)
    tl.store(BATCH_IDX + r, tl.where(valid, lo, -1), mask=in_range)
    tl.store(POS + r, tl.where(valid, pos, 0).to(tl.int32), mask=in_range)


def batch_indices_positions(
    append_indptr: torch.Tensor, seq_lens: torch.Tensor, batch_indices: torch.Tensor, positions: torch.Tensor
) -> None:
    """Fill ``batch_indices``/``positions`` (int32 ``[nnz]``) for the rows ``append_indptr`` describes;
    rows outside ``[append_indptr[0], append_indptr[-1])`` get -1 and 0."""
    nnz = batch_indices.numel()
    if nnz == 0:
        return
    batch_size = append_indptr.numel() - 1
    block = 128 if nnz <= 128 * _MIN_PROGRAMS else 1024  # two compiled variants
    _batch_indices_positions_kernel[(cdiv(nnz, block),)](
        append_indptr, seq_lens, batch_indices, positions,
        nnz, batch_size, max(batch_size - 1, 0).bit_length(),
        BLOCK=block, num_warps=4,
    )
