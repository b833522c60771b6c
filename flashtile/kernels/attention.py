"""Tiled attention for one request (FlashAttention-2 style), used by decode and prefill, + its launcher.

One program owns ``BLOCK_M`` rows of one KV head and one KV split. Rows are *GQA-packed*: row ``r``
is query token ``r // GROUP`` of query head ``kv_head * GROUP + r % GROUP``, so the query heads that
share a KV head share every K/V tile load (decode reads each K/V byte once; GQA prefill reads K/V
once per KV head instead of once per query head).

The KV range of a program is cut into three loops: tiles that need masking on the left (sliding
window), tiles every row sees in full (no mask arithmetic at all), and masked tiles on the right
(causal diagonal, the ragged end of the sequence). Tiles nobody sees are never visited (causal and
window tile skipping). With ``num_splits > 1`` (split-KV / flash-decoding) each program covers a
``kv_chunk``-token slice and writes a float32 partial state that :mod:`.merge` combines.

Pointer shapes (strides are passed, so NHD and HND views and strided q work without copies):
  Q    [qo_len, num_qo_heads, HEAD_DIM_QK]
  K    [kv_len, num_kv_heads, HEAD_DIM_QK]  (fp16/bf16, or fp8 upcast in the kernel)
  V    [kv_len, num_kv_heads, HEAD_DIM_VO]
  O    [qo_len, num_qo_heads, HEAD_DIM_VO] (final), or float32 [num_splits, qo_len, num_qo_heads, D] (partial)
  LSE  [qo_len, num_qo_heads] float32 (final), or [num_splits, qo_len, num_qo_heads] (partial)
  MASK packed custom mask, uint8, bit ``t * kv_len + j`` (LSB first) = query t may see key j
  SLOPES float32 [num_qo_heads] ALiBi slopes
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .._core.device import compute_capability, num_sms, shared_memory_limit
from .._core.intmath import cdiv, dot_tile_dim
from .._core.launch import direct_launch

try:  # host-side tensor descriptors (TMA); absent in old Triton builds
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

from .._core.params import AttentionParams
from .._core.settings import interpreting
from ..scheduler.split_kv import plan_kv_splits
from .merge import merge_attention_states
from .smem import TileFeatures, device_config, estimate_shared_bytes, launch_within_limit
from .softmax import finalize_state, softmax_update

LOG2E = 1.4426950408889634
INTERPRET = interpreting()


@triton.jit
def _tanh(x):
    # tanh through exp2 (portable to the interpreter); saturates cleanly to +-1 for large |x|.
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)


@triton.jit
def _mma(a, b, UPCAST: tl.constexpr):
    """``tl.dot(a, b)`` in float32 accumulation. UPCAST (interpreter only): Triton 3.9's interpreter
    computes bf16 ``tl.dot`` wrongly, so it multiplies float32 copies instead."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _rope_rotate(x, partner, positions, offs_d, HEAD_DIM: tl.constexpr, rope_log2_theta, rope_inv_scale):
    """Half-split RoPE of a tile ``x [R, D]``; ``partner[:, d] = x[:, (d + HEAD_DIM/2) % HEAD_DIM]``.

    Angle of dim ``d`` at position ``p``: ``p * theta**(-2 (d mod HEAD_DIM/2) / HEAD_DIM) / rope_scale``,
    in float32.
    """
    half: tl.constexpr = HEAD_DIM // 2
    pair = (offs_d % half).to(tl.float32)
    inv_freq = tl.exp2(-(2.0 * pair / HEAD_DIM) * rope_log2_theta) * rope_inv_scale
    angle = positions.to(tl.float32)[:, None] * inv_freq[None, :]
    sign = tl.where(offs_d < half, -1.0, 1.0)
    return x.to(tl.float32) * tl.cos(angle) + sign[None, :] * partner.to(tl.float32) * tl.sin(angle)


@triton.jit
def _attend_tiles(
    acc, m_i, l_i, q,
    k_base, v_base, stride_kt, stride_vt,
    page_table, page_size, stride_kp, stride_vp,
    mask_ptr, slopes, positions, tokens, row_ok,
    start, end, kv_len, sm_scale, qk_scale_log2, soft_cap, window_left, rope_log2_theta, rope_inv_scale,
    k_desc, v_desc, desc_head, desc_row0,
    HEAD_DIM_QK: tl.constexpr, HEAD_DIM_VO: tl.constexpr, D_QK: tl.constexpr, D_VO: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CUSTOM_MASK: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, USE_ROPE: tl.constexpr, PAGED: tl.constexpr,
    USE_TMA: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST_DOT: tl.constexpr,
    PREFETCH_PAGES: tl.constexpr, INT32_PAGE_OFFSETS: tl.constexpr,
    MULTI_ITEM: tl.constexpr, prefix_len, item_first_key,
):
    """Visit KV tiles ``[start, end)`` (a multiple of BLOCK_N apart unless MASKED).

    PAGED: key ``j`` of the request is slot ``j % page_size`` of page ``page_table[j // page_size]``
    (``page_table`` points at the request's first page id); otherwise keys are rows ``stride_kt`` apart.
    USE_TMA (contiguous keys, unpadded head dims, no RoPE): K/V tiles come through tensor descriptors
    ``[kv_heads, rows, D]`` at row ``desc_row0 + key`` of head ``desc_head``; rows past ``kv_len``
    (the next request's, or zero fill) are masked like pointer loads are.
    MULTI_ITEM (batch prefill's multi-item scoring, with CAUSAL): in a masked tile a row also sees a key
    only inside the prefix (``< prefix_len``) or from its ``item_first_key`` on (batch_prefill.py).
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, D_QK)
    offs_dvo = tl.arange(0, D_VO)
    dqk_ok = offs_dqk < HEAD_DIM_QK
    dvo_ok = offs_dvo < HEAD_DIM_VO
    next_page = offs_n * 0
    if PAGED and PREFETCH_PAGES:
        next_page = tl.load(page_table + (start + offs_n) // page_size, mask=start + offs_n < kv_len, other=0)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n  # [BLOCK_N] key positions
        col_ok = cols < kv_len
        if USE_TMA:
            k = k_desc.load([desc_head, desc_row0 + n0, 0]).reshape([BLOCK_N, D_QK])
        elif PAGED:
            if PREFETCH_PAGES:
                # The page ids come from the previous iteration. Loaded in this one, they make the K/V
                # copies "indirect" for Triton's pipeliner, which then waits for every copy at the top
                # of each iteration (no K/V tile in flight during the math).
                page = next_page
                ahead = cols + BLOCK_N
                next_page = tl.load(page_table + ahead // page_size, mask=ahead < kv_len, other=0)
            elif MASKED:
                page = tl.load(page_table + cols // page_size, mask=col_ok, other=0)
            else:
                page = tl.load(page_table + cols // page_size)
            if not INT32_PAGE_OFFSETS:  # 32-bit row offsets halve the address arithmetic where they fit
                page = page.to(tl.int64)
            slot = cols % page_size
            k_rows = page * stride_kp + slot * stride_kt
            v_rows = page * stride_vp + slot * stride_vt
        else:
            k_rows = cols * stride_kt
            v_rows = cols * stride_vt
        if not USE_TMA:
            k_ptrs = k_base + k_rows[:, None] + offs_dqk[None, :]
            if MASKED:
                k_mask = col_ok[:, None] & dqk_ok[None, :]
                k = tl.load(k_ptrs, mask=k_mask, other=0.0)  # [N, D_QK]
            elif HEAD_DIM_QK == D_QK:  # interior tile, unpadded head dim: unpredicated loads
                k_mask = dqk_ok[None, :]
                k = tl.load(k_ptrs)
            else:
                k_mask = dqk_ok[None, :]
                k = tl.load(k_ptrs, mask=k_mask, other=0.0)
        if USE_ROPE:
            partner_d = (offs_dqk + HEAD_DIM_QK // 2) % HEAD_DIM_QK
            k_partner = tl.load(k_base + k_rows[:, None] + partner_d[None, :], mask=k_mask, other=0.0)
            k = _rope_rotate(k, k_partner, cols, offs_dqk, HEAD_DIM_QK, rope_log2_theta, rope_inv_scale)
        qk = _mma(q, tl.trans(k.to(q.dtype)), UPCAST_DOT)  # [M, N] float32

        if USE_SOFTCAP or USE_ALIBI:
            s = qk * sm_scale
            if USE_ALIBI:
                s += slopes[:, None] * (cols[None, :] - positions[:, None]).to(tl.float32)
            if USE_SOFTCAP:
                s = soft_cap * _tanh(s / soft_cap)
            s = s * 1.4426950408889634
        else:
            s = qk * qk_scale_log2

        if MASKED:
            visible = col_ok[None, :] & row_ok[:, None]
            if HAS_CUSTOM_MASK:
                bit = tokens[:, None].to(tl.int64) * kv_len + cols[None, :]
                byte = tl.load(mask_ptr + (bit >> 3), mask=visible, other=0).to(tl.int32)
                visible = visible & (((byte >> (bit & 7).to(tl.int32)) & 1) != 0)
            elif CAUSAL:
                # Bottom-right aligned; rows with a negative position (qo_len > kv_len) see nothing.
                visible = visible & (cols[None, :] <= positions[:, None])
            if MULTI_ITEM:
                visible = visible & ((cols[None, :] < prefix_len) | (cols[None, :] >= item_first_key[:, None]))
            if HAS_WINDOW:
                visible = visible & (cols[None, :] >= positions[:, None] - window_left)
            s = tl.where(visible, s, float("-inf"))

        m_i, l_i, acc, p = softmax_update(m_i, l_i, acc, s)
        if USE_TMA:
            v = v_desc.load([desc_head, desc_row0 + n0, 0]).reshape([BLOCK_N, D_VO])
            if MASKED:  # rows past kv_len may hold anything (0 * NaN would poison the sum)
                v = tl.where(col_ok[:, None], v, 0.0)
        else:
            v_ptrs = v_base + v_rows[:, None] + offs_dvo[None, :]
            if MASKED:
                v = tl.load(v_ptrs, mask=col_ok[:, None] & dvo_ok[None, :], other=0.0)  # [N, D_VO]
            elif HEAD_DIM_VO == D_VO:
                v = tl.load(v_ptrs)
            else:
                v = tl.load(v_ptrs, mask=dvo_ok[None, :], other=0.0)
        acc += _mma(p.to(q.dtype), v.to(q.dtype), UPCAST_DOT)
    return acc, m_i, l_i


@triton.jit
def _tile_ranges(
    lo, hi, t_first, t_last, delta, kv_len, window_left,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CUSTOM_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Cut a program's KV range ``[lo, hi)`` (``lo`` a multiple of BLOCK_N) for query tokens
    ``t_first..t_last`` (absolute positions ``t + delta``) into ``[start, full_start)`` (masked: window
    edge), ``[full_start, full_end)`` (seen by every row: no mask) and ``[full_end, hi)`` (masked:
    causal diagonal, ragged end). Tiles no row can see are dropped."""
    if CAUSAL:
        hi = tl.minimum(hi, t_last + delta + 1)
    if HAS_WINDOW:
        lo = tl.maximum(lo, t_first + delta - window_left)
    start = (lo // BLOCK_N) * BLOCK_N
    full_lo = 0
    full_hi = kv_len
    if CAUSAL:
        full_hi = tl.maximum(tl.minimum(full_hi, t_first + delta + 1), 0)
    if HAS_WINDOW:
        full_lo = tl.maximum(t_last + delta - window_left, 0)
    full_start = tl.maximum(start, tl.cdiv(full_lo, BLOCK_N) * BLOCK_N)
    full_end = tl.minimum((full_hi // BLOCK_N) * BLOCK_N, hi)
    if HAS_CUSTOM_MASK:
        full_start = start
        full_end = start
    if full_end <= full_start:
        full_start = start
        full_end = start
    return start, full_start, full_end, hi


@triton.jit
def _load_q(Q, tokens, heads, row_ok, stride_qt, stride_qh, positions, rope_log2_theta, rope_inv_scale,
            HEAD_DIM_QK: tl.constexpr, D_QK: tl.constexpr, USE_ROPE: tl.constexpr):
    """The ``[BLOCK_M, D_QK]`` query tile of GQA-packed rows (rotated in float32 with RoPE)."""
    offs_dqk = tl.arange(0, D_QK)
    q_row = Q + tokens[:, None].to(tl.int64) * stride_qt + heads[:, None] * stride_qh
    q_mask = row_ok[:, None] & (offs_dqk[None, :] < HEAD_DIM_QK)
    q = tl.load(q_row + offs_dqk[None, :], mask=q_mask, other=0.0)
    if USE_ROPE:
        partner_d = (offs_dqk + HEAD_DIM_QK // 2) % HEAD_DIM_QK
        q_partner = tl.load(q_row + partner_d[None, :], mask=q_mask, other=0.0)
        q = _rope_rotate(q, q_partner, positions, offs_dqk, HEAD_DIM_QK, rope_log2_theta, rope_inv_scale)
        q = q.to(Q.dtype.element_ty)
    return q


@triton.jit
def _head_inputs(SLOPES, K, V, heads, row_ok, kv_head, stride_kh, stride_vh, USE_ALIBI: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """Per-row ALiBi slopes (zeros without ALiBi) and the K/V base pointers of ``kv_head``."""
    slopes = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_ALIBI:
        slopes = tl.load(SLOPES + heads, mask=row_ok, other=0.0)
    return slopes, K + kv_head.to(tl.int64) * stride_kh, V + kv_head.to(tl.int64) * stride_vh


@triton.jit
def _attend_range(
    q, k_base, v_base, stride_kt, stride_vt, page_table, page_size, stride_kp, stride_vp,
    mask_ptr, slopes, positions, tokens, row_ok,
    start, full_start, full_end, hi, kv_len,
    sm_scale, qk_scale_log2, soft_cap, window_left, rope_log2_theta, rope_inv_scale,
    k_desc, v_desc, desc_head, desc_row0,
    HEAD_DIM_QK: tl.constexpr, HEAD_DIM_VO: tl.constexpr, D_QK: tl.constexpr, D_VO: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CUSTOM_MASK: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, USE_ROPE: tl.constexpr, PAGED: tl.constexpr,
    USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST_DOT: tl.constexpr,
    PREFETCH_PAGES: tl.constexpr = False, INT32_PAGE_OFFSETS: tl.constexpr = False,
    MULTI_ITEM: tl.constexpr = False, prefix_len=0, item_first_key=0,
):
    """Attention state ``(o, lse)`` of a row tile over the ranges from :func:`_tile_ranges`.
    Paged only: PREFETCH_PAGES loads each tile's page ids one iteration ahead (see _attend_tiles);
    INT32_PAGE_OFFSETS computes K/V row offsets in int32 (the caller checked that every offset from
    the K/V base pointers fits). MULTI_ITEM (batch prefill's multi-item scoring, with CAUSAL): rows see
    the prefix ``[0, prefix_len)`` and, after it, keys from their ``item_first_key`` (``[BLOCK_M]``) on."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_VO], dtype=tl.float32)
    skip_lo = hi  # KV tiles [skip_lo, skip_hi) are seen by no row (multi-item only)
    skip_hi = hi
    if MULTI_ITEM:
        # Only tiles wholly inside the prefix run unmasked. Past the prefix a row sees keys from its
        # item_first_key on, so the tiles below the rows' smallest one (earlier items) are skipped.
        full_end = tl.maximum(tl.minimum(full_end, (prefix_len // BLOCK_N) * BLOCK_N), full_start)
        skip_lo = tl.minimum(tl.maximum(tl.cdiv(prefix_len, BLOCK_N) * BLOCK_N, full_end), hi)
        skip_hi = tl.minimum(tl.maximum((tl.min(item_first_key, 0) // BLOCK_N) * BLOCK_N, skip_lo), hi)
    # Left masked tiles (window edge), tiles seen in full, right masked tiles (diagonal, ragged end).
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, page_table, page_size, stride_kp, stride_vp,
        mask_ptr, slopes, positions, tokens, row_ok, start, full_start, kv_len, sm_scale, qk_scale_log2, soft_cap,
        window_left, rope_log2_theta, rope_inv_scale, k_desc, v_desc, desc_head, desc_row0, HEAD_DIM_QK, HEAD_DIM_VO, D_QK, D_VO, CAUSAL, HAS_WINDOW,
        HAS_CUSTOM_MASK, USE_SOFTCAP, USE_ALIBI, USE_ROPE, PAGED, USE_TMA, True, BLOCK_N, UPCAST_DOT,
        PREFETCH_PAGES, INT32_PAGE_OFFSETS, MULTI_ITEM, prefix_len, item_first_key)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, page_table, page_size, stride_kp, stride_vp,
        mask_ptr, slopes, positions, tokens, row_ok, full_start, full_end, kv_len, sm_scale, qk_scale_log2, soft_cap,
        window_left, rope_log2_theta, rope_inv_scale, k_desc, v_desc, desc_head, desc_row0, HEAD_DIM_QK, HEAD_DIM_VO, D_QK, D_VO, CAUSAL, HAS_WINDOW,
        HAS_CUSTOM_MASK, USE_SOFTCAP, USE_ALIBI, USE_ROPE, PAGED, USE_TMA, False, BLOCK_N, UPCAST_DOT,
        PREFETCH_PAGES, INT32_PAGE_OFFSETS, MULTI_ITEM, prefix_len, item_first_key)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, page_table, page_size, stride_kp, stride_vp,
        mask_ptr, slopes, positions, tokens, row_ok, full_end, skip_lo, kv_len, sm_scale, qk_scale_log2, soft_cap,
        window_left, rope_log2_theta, rope_inv_scale, k_desc, v_desc, desc_head, desc_row0, HEAD_DIM_QK, HEAD_DIM_VO, D_QK, D_VO, CAUSAL, HAS_WINDOW,
        HAS_CUSTOM_MASK, USE_SOFTCAP, USE_ALIBI, USE_ROPE, PAGED, USE_TMA, True, BLOCK_N, UPCAST_DOT,
        PREFETCH_PAGES, INT32_PAGE_OFFSETS, MULTI_ITEM, prefix_len, item_first_key)
    if MULTI_ITEM:  # the masked tiles after the skipped ones
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, page_table, page_size, stride_kp, stride_vp,
            mask_ptr, slopes, positions, tokens, row_ok, skip_hi, hi, kv_len, sm_scale, qk_scale_log2, soft_cap,
            window_left, rope_log2_theta, rope_inv_scale, k_desc, v_desc, desc_head, desc_row0, HEAD_DIM_QK,
            HEAD_DIM_VO, D_QK, D_VO, CAUSAL, HAS_WINDOW, HAS_CUSTOM_MASK, USE_SOFTCAP, USE_ALIBI, USE_ROPE, PAGED,
            USE_TMA, True, BLOCK_N, UPCAST_DOT, PREFETCH_PAGES, INT32_PAGE_OFFSETS, MULTI_ITEM, prefix_len,
            item_first_key)
    return finalize_state(m_i, l_i, acc)


@triton.jit
def _store_state(o_row, lse_ptrs, o, lse, row_ok, v_scale, HEAD_DIM_VO: tl.constexpr, D_VO: tl.constexpr,
                 PARTIAL: tl.constexpr):
    """Store a finished state: float32 as is (a split-KV partial), or times ``v_scale`` in O's dtype."""
    offs_dvo = tl.arange(0, D_VO)
    o_mask = row_ok[:, None] & (offs_dvo[None, :] < HEAD_DIM_VO)
    if PARTIAL:
        tl.store(o_row + offs_dvo[None, :], o, mask=o_mask)
    else:
        tl.store(o_row + offs_dvo[None, :], (o * v_scale).to(o_row.dtype.element_ty), mask=o_mask)
    tl.store(lse_ptrs, lse, mask=row_ok)


@direct_launch
@triton.jit
def _attention_fwd_kernel(
    Q, K, V, O, LSE, MASK, SLOPES, K_DESC, V_DESC,
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_os, stride_ot, stride_oh,
    stride_ls, stride_lt, stride_lh,
    qo_len, kv_len, kv_chunk, num_m_blocks,
    sm_scale, qk_scale_log2, soft_cap, window_left, rope_log2_theta, rope_inv_scale, v_scale,
    GROUP: tl.constexpr,  # query heads per KV head; constexpr so row -> (token, head) is shifts/muls
    HEAD_DIM_QK: tl.constexpr, HEAD_DIM_VO: tl.constexpr,
    D_QK: tl.constexpr, D_VO: tl.constexpr,  # head dims padded to powers of two (>= 16) for tl.dot
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CUSTOM_MASK: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, USE_ROPE: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    # Heaviest causal blocks (the last query rows) first, so the tail of the grid is short work.
    pid_m = num_m_blocks - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [M] GQA-packed row ids
    num_rows = qo_len * GROUP
    row_ok = rows < num_rows
    tokens = rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    delta = kv_len - qo_len
    positions = tokens + delta  # absolute position of each row's query

    # Rows this program owns span tokens [t_first, t_last]; its KV range is this split's chunk.
    t_first = (pid_m * BLOCK_M) // GROUP
    t_last = tl.minimum(pid_m * BLOCK_M + BLOCK_M - 1, num_rows - 1) // GROUP
    lo = split * kv_chunk
    start, full_start, full_end, hi = _tile_ranges(
        lo, tl.minimum(kv_len, lo + kv_chunk), t_first, t_last, delta, kv_len, window_left,
        CAUSAL, HAS_WINDOW, HAS_CUSTOM_MASK, BLOCK_N)

    q = _load_q(Q, tokens, heads, row_ok, stride_qt, stride_qh, positions, rope_log2_theta, rope_inv_scale,
                HEAD_DIM_QK, D_QK, USE_ROPE)
    slopes, k_base, v_base = _head_inputs(SLOPES, K, V, heads, row_ok, kv_head, stride_kh, stride_vh, USE_ALIBI,
                                          BLOCK_M)
    o, lse = _attend_range(
        q, k_base, v_base, stride_kt, stride_vt, K, 1, 0, 0, MASK, slopes, positions, tokens, row_ok,
        start, full_start, full_end, hi, kv_len, sm_scale, qk_scale_log2, soft_cap, window_left,
        rope_log2_theta, rope_inv_scale, K_DESC, V_DESC, kv_head, 0, HEAD_DIM_QK, HEAD_DIM_VO, D_QK, D_VO, CAUSAL,
        HAS_WINDOW, HAS_CUSTOM_MASK, USE_SOFTCAP, USE_ALIBI, USE_ROPE, False, USE_TMA, BLOCK_M, BLOCK_N, UPCAST_DOT)
    o_row = O + split * stride_os + tokens[:, None] * stride_ot + heads[:, None] * stride_oh
    lse_ptrs = LSE + split * stride_ls + tokens * stride_lt + heads * stride_lh
    _store_state(o_row, lse_ptrs, o, lse, row_ok, v_scale, HEAD_DIM_VO, D_VO, WRITE_PARTIAL)


@direct_launch
@triton.jit
def _batch_decode_kernel(
    Q, K, V, O, LSE, PART_O, PART_LSE, SLOPES,
    PAGE_INDICES, PAGE_INDPTR, KV_LENS, REQ_ITEM_INDPTR, ITEM_REQUEST, ITEM_KV_START, ITEM_KV_END,
    stride_qb, stride_qh,
    stride_kp, stride_kt, stride_kh,
    stride_vp, stride_vt, stride_vh,
    stride_ob, stride_oh, stride_lb, stride_lh,
    stride_pw, stride_ph, stride_plw, stride_plh,
    batch_size, page_size,
    sm_scale, qk_scale_log2, soft_cap, window_left, rope_log2_theta, rope_inv_scale, v_scale,
    GROUP: tl.constexpr, HEAD_DIM_QK: tl.constexpr, HEAD_DIM_VO: tl.constexpr, D_QK: tl.constexpr, D_VO: tl.constexpr,
    HAS_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, USE_ROPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Batch decode over a paged cache: program ``(item, kv_head)`` attends the GQA group of one KV
    head (rows = its query heads) over one work item's KV range (scheduler/split_kv.py).

    A request with one item writes its final output; a split request writes float32 partial states at
    its items' slots, which the merge kernel folds. Programs beyond the planned item count (the fixed
    grid of CUDA-graph mode) store nothing. The plan lives in device memory, so a captured launch
    serves any later plan of the same batch size.
      Q [B, Hq, D], K/V pages [pages, page_size, Hkv, D] (strides), O [B, Hq, Dv], LSE [B, Hq] f32,
      PART_O [items, Hq, Dv] f32, PART_LSE [items, Hq] f32; index arrays int32.
    """
    item = tl.program_id(0)
    kv_head = tl.program_id(1)
    num_items = tl.load(REQ_ITEM_INDPTR + batch_size)
    live = item < num_items
    item = tl.minimum(item, num_items - 1)
    req = tl.load(ITEM_REQUEST + item)
    lo = tl.load(ITEM_KV_START + item)
    hi = tl.load(ITEM_KV_END + item)
    hi = tl.where(live, hi, lo)
    kv_len = tl.load(KV_LENS + req)
    single = tl.load(REQ_ITEM_INDPTR + req + 1) - tl.load(REQ_ITEM_INDPTR + req) == 1
    page_table = PAGE_INDICES + tl.load(PAGE_INDPTR + req)

    rows = tl.arange(0, BLOCK_M)
    row_ok = (rows < GROUP) & (rows * 0 + tl.program_id(0) < num_items)  # vector form: the interpreter
    # rejects a block mask combined with a scalar bool
    heads = kv_head * GROUP + rows
    tokens = tl.zeros([BLOCK_M], dtype=tl.int32) + req
    positions = tl.zeros([BLOCK_M], dtype=tl.int32) + (kv_len - 1)  # the query is the newest token
    start, full_start, full_end, hi = _tile_ranges(
        lo, hi, 0, 0, kv_len - 1, kv_len, window_left, False, HAS_WINDOW, False, BLOCK_N)

    q = _load_q(Q, tokens, heads, row_ok, stride_qb, stride_qh, positions, rope_log2_theta, rope_inv_scale,
                HEAD_DIM_QK, D_QK, USE_ROPE)
    slopes, k_base, v_base = _head_inputs(SLOPES, K, V, heads, row_ok, kv_head, stride_kh, stride_vh, USE_ALIBI,
                                          BLOCK_M)
    o, lse = _attend_range(
        q, k_base, v_base, stride_kt, stride_vt, page_table, page_size, stride_kp, stride_vp, K, slopes,
        positions, tokens, row_ok, start, full_start, full_end, hi, kv_len, sm_scale, qk_scale_log2, soft_cap,
        window_left, rope_log2_theta, rope_inv_scale, K, V, 0, 0, HEAD_DIM_QK, HEAD_DIM_VO, D_QK, D_VO, False,
        HAS_WINDOW, False, USE_SOFTCAP, USE_ALIBI, USE_ROPE, True, False, BLOCK_M, BLOCK_N, UPCAST_DOT)
    if single:
        _store_state(O + req.to(tl.int64) * stride_ob + heads[:, None] * stride_oh,
                     LSE + req * stride_lb + heads * stride_lh, o, lse, row_ok, v_scale, HEAD_DIM_VO, D_VO, False)
    else:
        _store_state(PART_O + item.to(tl.int64) * stride_pw + heads[:, None] * stride_ph,
                     PART_LSE + item * stride_plw + heads * stride_plh, o, lse, row_ok, v_scale, HEAD_DIM_VO, D_VO,
                     True)


# ----------------------------------------------------------------------------------------------
# Launch configurations, declared as data. A config is chosen from a table keyed on the shape
# class (decode vs prefill, padded head dim); FLASHTILE_AUTOTUNE=1 autotunes over the pruned list
# instead (slower first call). Under the interpreter one small config keeps CPU tests fast.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# (kind, padded head_dim) -> config; measured on H100 with benchmarks/tune_attention.py.
_CONFIG_TABLE = {
    ("decode", 16): LaunchConfig(16, 64, 8, 2),
    ("decode", 32): LaunchConfig(16, 64, 8, 2),
    ("decode", 64): LaunchConfig(16, 64, 8, 2),
    ("decode", 128): LaunchConfig(16, 64, 4, 2),
    ("decode", 256): LaunchConfig(16, 64, 8, 2),
    # Paged batch decode (benchmarks/tune_batch_decode.py, H100, d128, page 16): BLOCK_N 32 won at
    # 1 x 32k, 16 x 4k and 64 x 4k (stages 2-4 within noise; 3 chosen); 128 won only at 256 x 2k.
    ("batch_decode", 16): LaunchConfig(16, 32, 4, 3),
    ("batch_decode", 32): LaunchConfig(16, 32, 4, 3),
    ("batch_decode", 64): LaunchConfig(16, 32, 4, 3),
    ("batch_decode", 128): LaunchConfig(16, 32, 4, 3),
    ("batch_decode", 256): LaunchConfig(16, 32, 4, 2),
    ("prefill", 16): LaunchConfig(128, 64, 4, 3),
    ("prefill", 32): LaunchConfig(128, 64, 4, 3),
    ("prefill", 64): LaunchConfig(128, 64, 4, 3),
    ("prefill", 128): LaunchConfig(128, 128, 8, 3),
    ("prefill", 256): LaunchConfig(64, 32, 4, 2),
}


def load_config_overrides(path: str) -> None:
    """Replace table entries from a JSON file ``{"decode,128": [block_m, block_n, warps, stages], ...}``
    (what ``benchmarks/tune_attention.py --write-configs`` produces). Set FLASHTILE_CONFIGS=path."""
    import json

    with open(path) as f:
        for key, (bm, bn, w, st) in json.load(f).items():
            kind, d = key.split(",")
            _CONFIG_TABLE[(kind, int(d))] = LaunchConfig(int(bm), int(bn), int(w), int(st))


if os.environ.get("FLASHTILE_CONFIGS"):
    load_config_overrides(os.environ["FLASHTILE_CONFIGS"])
_INTERPRETER_CONFIG = LaunchConfig(16, 16, 1, 1)

# Autotuning candidates: every combination, pruned by shared-memory and register footprint.
AUTOTUNE_CANDIDATES = [
    LaunchConfig(bm, bn, w, s)
    for bm in (16, 64, 128)
    for bn in (32, 64, 128)
    for w in (4, 8)
    for s in (2, 3, 4)
]

# KV splits are multiples of this many tokens so every BLOCK_N in the tables divides a chunk
# (128 beat 256 at kv 4k and 128k on H100: finer chunks fit the grid to the GPU better).
KV_CHUNK_ALIGN = 128


def check_fp8_head_dims(kv: torch.Tensor, head_dim_qk: int, head_dim_vo: int) -> None:
    """fp8 K/V with ``head_dim_vo != head_dim_qk`` fault (illegal address) or give wrong outputs on sm_90
    with Triton 3.6 (seen on an H100 for 64/32 in single and batch prefill; equal head dims and fp16/bf16
    caches are fine; the cause is not found yet). Until it is, such calls raise instead of crashing.
    The interpreter computes them correctly, so CPU runs are not refused."""
    if INTERPRET or kv.element_size() != 1 or head_dim_qk == head_dim_vo:
        return
    raise NotImplementedError(
        f"fp8 K/V with head_dim_vo ({head_dim_vo}) != head_dim_qk ({head_dim_qk}) is not supported by flashtile's "
        "GPU kernels yet; pass float16/bfloat16 K/V for this head-dim pair")


def tma_enabled(k: torch.Tensor, v: torch.Tensor, head_dim_qk: int, head_dim_vo: int, use_rope: bool) -> bool:
    """Whether K/V tiles may come through tensor descriptors (TMA on Hopper): FLASHTILE_TMA=1 (off by
    default until measured), fp16/bf16 K/V, power-of-two head dims (no padding), no in-kernel RoPE (it
    reads partner columns through pointers), 16-byte aligned base and row/head strides. K and V are
    ``[rows, heads, D]`` views."""
    if os.environ.get("FLASHTILE_TMA") != "1" or use_rope or TensorDescriptor is None:
        return False
    if k.dtype not in (torch.float16, torch.bfloat16) or v.dtype != k.dtype:
        return False
    if head_dim_qk != dot_tile_dim(head_dim_qk) or head_dim_vo != dot_tile_dim(head_dim_vo):
        return False
    for x in (k, v):
        if x.numel() == 0 or x.data_ptr() % 16 or x.stride(0) % 8 or x.stride(1) % 8 or x.stride(2) != 1:
            return False
    return True


def kv_descriptors(k: torch.Tensor, v: torch.Tensor, block_n: int, use_tma: bool):
    """Tensor descriptors over K and V seen as ``[heads, rows, D]`` with ``[1, block_n, D]`` blocks, or
    the tensors themselves (unused placeholders) without TMA."""
    if not use_tma:
        return k, v
    return tuple(TensorDescriptor(x, shape=[x.shape[1], x.shape[0], x.shape[2]],
                                  strides=[x.stride(1), x.stride(0), 1], block_shape=[1, block_n, x.shape[2]])
                 for x in (k, v))


def _prune(candidates, kind: str, features: TileFeatures, num_rows: int, device: torch.device):
    out = []
    limit, capability = shared_memory_limit(device), compute_capability(device)
    d_pad = max(features.d_qk, features.d_vo)
    for c in candidates:
        if kind == "decode" and c.block_m > dot_tile_dim(num_rows):
            continue
        if limit is not None and estimate_shared_bytes(c.block_m, c.block_n, c.num_stages, c.num_warps, features,
                                                       capability) > limit:
            continue
        if c.block_m * d_pad > 128 * 256 or c.block_m * c.block_n > 128 * 128:
            continue
        out.append(c)
    return out


def choose_config(kind: str, d_pad: int) -> LaunchConfig:
    """The table's config for a shape class (the launchers then fit it to the device: smem.py)."""
    if INTERPRET:
        return _INTERPRETER_CONFIG
    return _CONFIG_TABLE[(kind, d_pad)]


_autotune_cache: dict = {}


def _autotuned_config(key, candidates, launch) -> LaunchConfig:
    """Time every candidate once for this shape class (FLASHTILE_AUTOTUNE=1) and remember the best."""
    if key not in _autotune_cache:
        best, best_ms = None, float("inf")
        for c in candidates:
            try:
                ms = triton.testing.do_bench(lambda: launch(c), warmup=5, rep=20, return_mode="median")
            except Exception:  # a config that fails to compile (out of resources) is skipped
                continue
            if ms < best_ms:
                best, best_ms = c, ms
        _autotune_cache[key] = best
    return _autotune_cache[key]


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    params: AttentionParams,
    *,
    packed_mask: Optional[torch.Tensor],
    alibi_slopes: Optional[torch.Tensor],
    kind: str,
    num_splits: Optional[int] = None,
) -> None:
    """Launch attention of one request, writing ``out`` and ``lse`` in place.

    Args:
        q: ``[qo_len, num_qo_heads, head_dim_qk]``, fp16/bf16, last dim contiguous (any other strides).
        k: ``[kv_len, num_kv_heads, head_dim_qk]`` view (an HND tensor is passed transposed), last dim
            contiguous; fp16/bf16 or fp8 (its scale already folded into ``sm_scale``).
        v: ``[kv_len, num_kv_heads, head_dim_vo]`` view, like ``k``.
        out: ``[qo_len, num_qo_heads, head_dim_vo]`` in the output dtype, last dim contiguous.
        lse: float32 ``[qo_len, num_qo_heads]``, base 2.
        params: the resolved attention parameters (sm_scale with k_scale folded in, mask, RoPE, ...).
        packed_mask: uint8 bits of a ``[qo_len, kv_len]`` mask, row-major, LSB first; or None.
        kind: "decode" or "prefill": picks the launch-config table.
        num_splits: force the number of KV splits (None: the scheduler decides).
    """
    qo_len, num_qo_heads, head_dim_qk = q.shape
    kv_len, num_kv_heads, head_dim_vo = v.shape
    check_fp8_head_dims(k, head_dim_qk, head_dim_vo)
    group = num_qo_heads // num_kv_heads
    d_qk, d_vo = dot_tile_dim(head_dim_qk), dot_tile_dim(head_dim_vo)
    num_rows = qo_len * group
    device = q.device
    use_rope = params.pos_encoding_mode == "ROPE_LLAMA"
    use_alibi = params.pos_encoding_mode == "ALIBI"
    causal, window_left, logits_soft_cap = params.causal, params.window_left, params.logits_soft_cap
    sm_scale, v_scale = params.sm_scale, params.v_scale
    dummy = out  # placeholder pointer for absent optional tensors (never dereferenced)
    use_tma = tma_enabled(k, v, head_dim_qk, head_dim_vo, use_rope)

    def launch(cfg: LaunchConfig, splits: int, chunk: int, o_buf, lse_buf, partial: bool):
        num_m_blocks = cdiv(num_rows, cfg.block_m)
        if partial:
            o_strides = (o_buf.stride(0), o_buf.stride(1), o_buf.stride(2))
            l_strides = (lse_buf.stride(0), lse_buf.stride(1), lse_buf.stride(2))
        else:
            o_strides = (0, o_buf.stride(0), o_buf.stride(1))
            l_strides = (0, lse_buf.stride(0), lse_buf.stride(1))
        grid = (num_m_blocks, num_kv_heads, splits)
        k_desc, v_desc = kv_descriptors(k, v, cfg.block_n, use_tma)
        _attention_fwd_kernel[grid](
            q, k, v, o_buf, lse_buf,
            packed_mask if packed_mask is not None else dummy,
            alibi_slopes if alibi_slopes is not None else dummy, k_desc, v_desc,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            *o_strides, *l_strides,
            qo_len, kv_len, chunk, num_m_blocks,
            sm_scale, sm_scale * LOG2E, float(logits_soft_cap), int(window_left),
            math.log2(params.rope_theta), 1.0 / params.rope_scale, float(v_scale),
            GROUP=group, HEAD_DIM_QK=head_dim_qk, HEAD_DIM_VO=head_dim_vo, D_QK=d_qk, D_VO=d_vo,
            CAUSAL=bool(causal) and packed_mask is None, HAS_WINDOW=window_left >= 0,
            HAS_CUSTOM_MASK=packed_mask is not None, USE_SOFTCAP=logits_soft_cap > 0,
            USE_ALIBI=use_alibi, USE_ROPE=use_rope, WRITE_PARTIAL=partial, USE_TMA=use_tma,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, UPCAST_DOT=INTERPRET, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    features = TileFeatures(d_qk, d_vo, q.element_size(), k.element_size(), use_rope, packed_mask is not None,
                            use_tma)
    preferred = choose_config(kind, max(d_qk, d_vo))
    if os.environ.get("FLASHTILE_AUTOTUNE") == "1" and not INTERPRET:
        candidates = _prune(AUTOTUNE_CANDIDATES, kind, features, num_rows, device)
        key = (kind, features, group, causal, q.dtype, k.dtype, qo_len > 1)
        preferred = _autotuned_config(key, candidates, lambda c: launch(c, 1, kv_len, out, lse, False)) or preferred
    vary_block_m = kind == "prefill"  # decode row tiles are 16 already
    cfg = device_config(preferred, features, device, vary_block_m=vary_block_m)

    num_m_blocks = cdiv(num_rows, cfg.block_m)
    align = KV_CHUNK_ALIGN if not INTERPRET else cfg.block_n
    if num_splits is None:
        splits, chunk = plan_kv_splits(kv_len, num_m_blocks * num_kv_heads, num_sms(device), align)
    else:
        chunk = max(align, cdiv(cdiv(max(kv_len, 1), num_splits), align) * align)
        splits = max(1, cdiv(kv_len, chunk))
    if splits == 1:
        launch_within_limit(lambda c: launch(c, 1, max(kv_len, 1), out, lse, False), preferred, features, device,
                            vary_block_m=vary_block_m, cfg=cfg)
        return
    partial_o = torch.empty((splits, qo_len, num_qo_heads, head_dim_vo), dtype=torch.float32, device=device)
    partial_lse = torch.empty((splits, qo_len, num_qo_heads), dtype=torch.float32, device=device)
    launch_within_limit(lambda c: launch(c, splits, chunk, partial_o, partial_lse, True), preferred, features, device,
                        vary_block_m=vary_block_m, cfg=cfg)
    merge_attention_states(partial_o, partial_lse, out, lse, v_scale=v_scale)


# Decode rows are the query heads of one KV head: at least 16 for tl.dot, the whole group in one block.
def decode_block_m(group: int) -> int:
    return dot_tile_dim(group)


def batch_decode_config(group: int, d_pad: int) -> LaunchConfig:
    """Batch decode's preferred config: the table's KV tile and pipeline for padded head dim ``d_pad``,
    a row tile holding the GQA group (8 warps from 32 rows on)."""
    table = choose_config("batch_decode", d_pad)
    block_m = decode_block_m(group)
    return LaunchConfig(block_m, table.block_n, table.num_warps if block_m <= 16 else max(table.num_warps, 8),
                        table.num_stages)


def batch_decode_forward(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_indptr: torch.Tensor,
    page_indices: torch.Tensor,
    kv_lens: torch.Tensor,
    req_item_indptr: torch.Tensor,
    item_request: torch.Tensor,
    item_kv_start: torch.Tensor,
    item_kv_end: torch.Tensor,
    part_o: torch.Tensor,
    part_lse: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    params: AttentionParams,
    *,
    alibi_slopes: Optional[torch.Tensor],
    num_programs: int,
    max_states: int,
    merge: bool,
) -> None:
    """Launch batch decode over a paged cache (+ the merge of split requests), in place.

    Args:
        q: ``[B, num_qo_heads, head_dim_qk]`` fp16/bf16, unit last stride.
        k_pages, v_pages: ``[num_pages, page_size, num_kv_heads, head_dim]`` views (NHD; strides
            passed), fp16/bf16 or fp8 (scale folded into ``params.sm_scale`` / ``params.v_scale``).
        page_indptr: int32 ``[B + 1]``, page_indices: int32 page ids; request ``r`` owns
            ``page_indices[page_indptr[r]:page_indptr[r + 1]]``.
        kv_lens: int32 ``[B]``. req_item_indptr: int32 ``[B + 1]`` (entry ``B`` = planned item count);
            item_request / item_kv_start / item_kv_end: int32 ``[>= num_programs]`` (the work items).
        part_o: float32 ``[>= num_programs, num_qo_heads, head_dim_vo]``, part_lse float32 ``[.., num_qo_heads]``.
        out: ``[B, num_qo_heads, head_dim_vo]``; lse: float32 ``[B, num_qo_heads]`` (base 2).
        num_programs: grid size along items (the planned count, or CUDA-graph mode's fixed capacity).
        max_states: a bound on the items of one request (merge fold width).
        merge: launch the merge (some request is split, or CUDA-graph mode where that is unknown).
    """
    batch, num_qo_heads, head_dim_qk = q.shape
    num_kv_heads, head_dim_vo = v_pages.shape[2], v_pages.shape[3]
    group = num_qo_heads // num_kv_heads
    d_qk, d_vo = dot_tile_dim(head_dim_qk), dot_tile_dim(head_dim_vo)
    preferred = batch_decode_config(group, max(d_qk, d_vo))
    use_rope = params.pos_encoding_mode == "ROPE_LLAMA"
    features = TileFeatures(d_qk, d_vo, q.element_size(), k_pages.element_size(), use_rope)
    launch_within_limit(lambda cfg: _batch_decode_kernel[(num_programs, num_kv_heads)](
        q, k_pages, v_pages, out, lse, part_o, part_lse, alibi_slopes if alibi_slopes is not None else lse,
        page_indices, page_indptr, kv_lens, req_item_indptr, item_request, item_kv_start, item_kv_end,
        q.stride(0), q.stride(1),
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        v_pages.stride(0), v_pages.stride(1), v_pages.stride(2),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        part_o.stride(0), part_o.stride(1), part_lse.stride(0), part_lse.stride(1),
        batch, k_pages.shape[1],
        params.sm_scale, params.sm_scale * LOG2E, float(params.logits_soft_cap), int(params.window_left),
        math.log2(params.rope_theta), 1.0 / params.rope_scale, float(params.v_scale),
        GROUP=group, HEAD_DIM_QK=head_dim_qk, HEAD_DIM_VO=head_dim_vo, D_QK=d_qk, D_VO=d_vo,
        HAS_WINDOW=params.window_left >= 0, USE_SOFTCAP=params.logits_soft_cap > 0,
        USE_ALIBI=params.pos_encoding_mode == "ALIBI", USE_ROPE=use_rope,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, UPCAST_DOT=INTERPRET, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    ), preferred, features, q.device)
    if merge:
        merge_attention_states(part_o, part_lse, out, lse, v_scale=params.v_scale, state_indptr=req_item_indptr,
                               max_states=max_states)


def batch_chunk_align() -> int:
    """Granularity of planned KV chunks: a multiple of every decode BLOCK_N (tiles never straddle
    two items). Under the interpreter it is the small test tile, so tiny tests exercise splitting."""
    return _INTERPRETER_CONFIG.block_n if INTERPRET else KV_CHUNK_ALIGN
