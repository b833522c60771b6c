"""Batch prefill / append attention over a ragged or paged KV cache (+ the merge of split tiles).

The work list comes from :mod:`flashtile.scheduler.prefill_work`: program ``(item, kv_head)`` takes
one item, i.e. ``BLOCK_M`` GQA-packed rows of one request (row ``r`` = query token ``r // GROUP``
of query head ``kv_head * GROUP + r % GROUP``) over one KV range, and runs the same tile loops as
the single-request kernel (``attend_range`` in tiles.py: masked edge tiles, unmasked interior
tiles, tiles nobody sees skipped). The plan lives in device memory (``META``), so one compiled
kernel serves every batch composition and a CUDA-graph capture replays correctly after a re-plan.

``META`` (int32) holds, in order:
(field counts and the packing: scheduler/prefill_work.py)
  COUNTS [4]        number of items, number of merge entries, group_items (launch order), work counter
                    (batch_prefill_hopper.py; 0 between launches)
  REQS   [B, 5]     qo_start, qo_len, kv_offset, kv_len, mask_offset  per request
                    (kv_offset: first KV row (ragged) or first entry of the page list (paged);
                    mask_offset: first byte of the request's packed mask)
  ITEMS  [cap, 5]   request, row_block, kv_start, kv_end, slot  per item (slot -1: write the output)
  MERGES [cap, 4]   request, row_block, first slot, number of slots  per split tile
Pointer shapes (strides passed; only the last dim must be contiguous):
  Q [total_qo, Hq, Dqk]; O [total_qo, Hq, Dvo]; LSE [total_qo, Hq] float32 (base 2)
  K/V ragged: [total_kv, Hkv, D]; paged: pages [num_pages, page_size, Hkv, D] with PAGE_INDICES
  PART_O float32 [slots, Hkv, BLOCK_M, Dvo]; PART_LSE float32 [slots, Hkv, BLOCK_M]
  MASK uint8: request bits ``t * kv_len + j`` (LSB first) from its mask_offset
  MULTI_ITEM_REQS int32 [B, 2], TOKEN_POS int32 (multi-item scoring, _core/multi_item.py): a request's
  prefix_len and the index in TOKEN_POS of its first entry; the query at position ``p >= prefix_len``
  has item position ``TOKEN_POS[entry + p - prefix_len]``
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .._core import tile_policy
from .._core.device import num_sms
from .._core.intmath import dot_tile_dim, offsets_fit_int32
from .._core.launch import direct_launch
from .._core.params import AttentionParams
from ..scheduler.prefill_work import COUNT_FIELDS, ITEM_FIELDS, REQUEST_FIELDS
from . import attention as _attention
from .attention import (
    INTERPRET,
    INTERPRETER_CONFIG,
    LOG2E,
    V_T_ALIGN,
    LaunchConfig,
    alibi_slopes_of,
    check_fp8_head_dims,
    choose_config,
    fp8_kwargs,
    qk_tile_dim,
    variant_kwargs,
)
from .batch_prefill_hopper import hopper_prefill_forward, hopper_prefill_views
from .prefill_plan import (
    V_T_ALIGN_KEYS,
    V_T_GAP,
    item_and_head,
    item_fields,
    ragged_v_t_start,
    request_of_item,
)
from .smem import TileFeatures, launch_within_limit
from .softmax import finalize_state, softmax_update
from .tiles import attend_range, fp8_row_scales, fp8_v_scale, head_inputs, load_q, store_state, tile_ranges


@direct_launch
@triton.jit
def _ragged_v_t_kernel(V, VT, REQS, batch_size, search_steps, size, stride_vt, stride_vh,
                       DIM: tl.constexpr, DIM_PAD: tl.constexpr, FIELDS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Columns ``[pid0 * BLOCK_K, +BLOCK_K)`` of head ``pid1`` of the transposed copy (bytes): each column's
    request by a binary search over the requests' copy starts (the last one at or before the column), then
    its key of V, or 0 where the column is no request's key. Rows are read whole (V's last dim is
    contiguous, as the kernels require) and written transposed."""
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    head = tl.program_id(1)
    col_ok = cols < size
    lo = tl.zeros_like(cols)
    hi = lo + batch_size - 1
    for _ in range(search_steps):
        mid = (lo + hi + 1) // 2
        go_right = ragged_v_t_start(tl.load(REQS + mid * FIELDS + 2), mid) <= cols
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid - 1)
    kv_offset = tl.load(REQS + lo * FIELDS + 2)
    key = cols - ragged_v_t_start(kv_offset, lo)
    valid = col_ok & (key >= 0) & (key < tl.load(REQS + lo * FIELDS + 3))
    d = tl.arange(0, DIM_PAD)
    src = V + (kv_offset + key).to(tl.int64)[:, None] * stride_vt + head * stride_vh + d[None, :]
    if DIM == DIM_PAD:  # a mask constant along the row: the row loads stay vectorized
        row_mask = valid[:, None]
    else:
        row_mask = valid[:, None] & (d[None, :] < DIM)
    x = tl.load(src, mask=row_mask, other=0)  # [BLOCK_K, DIM_PAD]
    # [BLOCK_K, DIM_PAD] pointers into the [heads, dim, size] copy: the store's own layout runs along the
    # columns, the load's along the rows (one layout conversion through shared memory between them)
    dst = VT + (head * DIM + d).to(tl.int64)[None, :] * size + cols[:, None]
    tl.store(dst, x, mask=col_ok[:, None] & (d[None, :] < DIM))


V_T_BLOCK_K = 64  # copy columns per program


def ragged_fp8_v_layout(v: torch.Tensor, reqs: torch.Tensor, batch_size: int) -> tuple:
    """``(v, kernel keywords)`` for a ragged FP8 batch: with FP8_TRANSPOSE_V, a ``[heads, dim, keys]``
    copy of ``v [rows, heads, dim]`` with each request's keys at :func:`ragged_v_t_start` and zeros between
    (the plan's request fields ``reqs`` give the offsets and lengths; one launch, no sync; rows of v outside
    every request are never read), and ``V_T``/``stride_vd``; else ``v`` itself and no keywords."""
    rows, heads, dim = v.shape
    if not _attention.FP8_TRANSPOSE_V or rows == 0 or batch_size == 0:
        return v, {}
    size = -(-rows // V_T_ALIGN) * V_T_ALIGN + batch_size * V_T_GAP
    vt = torch.empty(heads, dim, size, dtype=torch.uint8, device=v.device)
    source = v.view(torch.uint8)  # as bytes: the copy moves them unchanged
    _ragged_v_t_kernel[(triton.cdiv(size, V_T_BLOCK_K), heads)](
        source, vt, reqs, batch_size, max(1, batch_size).bit_length(), size, source.stride(0), source.stride(1),
        DIM=dim, DIM_PAD=triton.next_power_of_2(dim), FIELDS=REQUEST_FIELDS, BLOCK_K=V_T_BLOCK_K, num_warps=4)
    return vt.view(v.dtype), {"V_T": True, "stride_vd": size}


@triton.jit
def _item_first_keys(TOKEN_POS, token_pos_entry, prefix_len, positions, row_ok, kv_len):
    """Multi-item scoring: per row, the first key after the prefix it may see. A row at position
    ``p >= prefix_len`` with item position ``t`` sees its item's keys ``(p - t, p]``; a prefix row gets
    ``prefix_len`` (causal hides every later key from it anyway); rows outside the tile get ``kv_len``, so
    they never lower the tile's smallest first key (which decides the tiles it skips)."""
    in_items = row_ok & (positions >= prefix_len)
    offsets = token_pos_entry.to(tl.int64) + (positions - prefix_len)
    item_pos = tl.load(TOKEN_POS + offsets, mask=in_items, other=0)
    first = tl.where(in_items, positions - item_pos + 1, prefix_len)
    return tl.where(row_ok, first, kv_len)


@direct_launch
@triton.jit
def _batch_prefill_kernel(
    Q, K, V, O, LSE, PART_O, PART_LSE, MASK, SLOPES, PAGE_INDICES, COUNTS, REQS, ITEMS, MULTI_ITEM_REQS, TOKEN_POS,
    stride_qt, stride_qh,
    stride_kp, stride_kt, stride_kh,
    stride_vp, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_lt, stride_lh,
    num_kv_heads,
    sm_scale, qk_scale_log2, soft_cap, window_left, rope_log2_theta, rope_inv_scale, v_scale,
    PAGE_SIZE: tl.constexpr,  # constexpr: the key -> (page, slot) split is a shift for powers of two
    GROUP: tl.constexpr, HEAD_DIM_QK: tl.constexpr, HEAD_DIM_VO: tl.constexpr, D_QK: tl.constexpr,
    D_VO: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CUSTOM_MASK: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, USE_ROPE: tl.constexpr, PAGED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST_DOT: tl.constexpr,
    PREFETCH_PAGES: tl.constexpr, INT32_PAGE_OFFSETS: tl.constexpr, MULTI_ITEM: tl.constexpr,
    LOGITS_HOOK: tl.constexpr = None, MASK_HOOK: tl.constexpr = None, QUERY_HOOK: tl.constexpr = None,
    OUTPUT_HOOK: tl.constexpr = None, SINK_HOOK: tl.constexpr = None, USE_SOFTMAX: tl.constexpr = True, vargs=None,
    RANGE_HOOK: tl.constexpr = None, FP8: tl.constexpr = False, FP8_SCALES=None, FULL_HOOK: tl.constexpr = None,
    V_T: tl.constexpr = False, stride_vd=1,
):
    # FP8 (q, k, v float8): FP8_SCALES holds the per-head scales (tiles.fp8_row_scales); False (fp16/bf16 q)
    # compiles none of it. V_T (ragged FP8): V is ragged_fp8_v_layout's transposed copy, keys contiguous
    # (head dim stride stride_vd), request r's keys from ragged_v_t_start(kv_offset, r); else V as given.
    pid = tl.program_id(0)
    num_items = tl.load(COUNTS)
    item, kv_head, active = item_and_head(pid, num_items, tl.load(COUNTS + 2), num_kv_heads)
    item_c = tl.maximum(tl.minimum(item, num_items - 1), 0)  # programs past the plan (graph mode) idle
    row_block, lo, hi, slot, qo_start, qo_len, kv_offset, kv_len, mask_offset = item_fields(ITEMS, REQS, item_c)

    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    num_rows = qo_len * GROUP
    # Vector form: the interpreter rejects a block mask combined with a scalar bool.
    row_ok = (rows < num_rows) & ((rows * 0 + active) != 0)
    hi = tl.where(active, hi, lo)
    tokens = rows // GROUP  # within the request
    heads = kv_head * GROUP + rows % GROUP
    delta = kv_len - qo_len
    positions = tokens + delta
    t_first = (row_block * BLOCK_M) // GROUP
    t_last = tl.minimum(row_block * BLOCK_M + BLOCK_M - 1, num_rows - 1) // GROUP
    if RANGE_HOOK is not None or FULL_HOOK is not None:
        start, full_start, full_end, hi = tile_ranges(
            lo, hi, t_first, t_last, delta, kv_len, window_left, CAUSAL, HAS_WINDOW, HAS_CUSTOM_MASK, BLOCK_N,
            RANGE_HOOK, request_of_item(ITEMS, item_c), qo_len, vargs, FULL_HOOK)
    else:
        start, full_start, full_end, hi = tile_ranges(
            lo, hi, t_first, t_last, delta, kv_len, window_left, CAUSAL, HAS_WINDOW, HAS_CUSTOM_MASK, BLOCK_N)

    q_tokens = qo_start + tokens
    q = load_q(Q, q_tokens, heads, row_ok, stride_qt, stride_qh, positions, rope_log2_theta, rope_inv_scale,
               HEAD_DIM_QK, D_QK, USE_ROPE)
    batch = tokens * 0
    if LOGITS_HOOK is not None or MASK_HOOK is not None or QUERY_HOOK is not None or OUTPUT_HOOK is not None or \
            SINK_HOOK is not None:
        batch += request_of_item(ITEMS, item_c)  # the request index, for variant hooks
    if QUERY_HOOK is not None:
        q = QUERY_HOOK(q, batch, tokens, heads, qo_len, kv_len, vargs)
    slopes, k_base, v_base = head_inputs(SLOPES, K, V, heads, row_ok, kv_head, stride_kh, stride_vh, USE_ALIBI,
                                         BLOCK_M)
    prefix_len = 0
    item_first_key = positions
    if MULTI_ITEM:
        item_request = MULTI_ITEM_REQS + request_of_item(ITEMS, item_c) * 2
        prefix_len = tl.load(item_request)
        item_first_key = _item_first_keys(TOKEN_POS, tl.load(item_request + 1), prefix_len, positions, row_ok,
                                          kv_len)
    if FP8:  # per-row logit scales: [M, 1] columns in place of the scalars
        sm_scale, qk_scale_log2 = fp8_row_scales(FP8_SCALES, heads, row_ok, kv_head, sm_scale)
    page_table = PAGE_INDICES + kv_offset
    if not PAGED:
        k_base += kv_offset.to(tl.int64) * stride_kt
        if V_T:
            v_base += tl.multiple_of(ragged_v_t_start(kv_offset, request_of_item(ITEMS, item_c)).to(tl.int64),
                                     V_T_ALIGN_KEYS)
        else:
            v_base += kv_offset.to(tl.int64) * stride_vt
    o, lse = attend_range(
        q, k_base, v_base, stride_kt, stride_vt, page_table, PAGE_SIZE, stride_kp, stride_vp,
        MASK + mask_offset.to(tl.int64), slopes, positions, tokens, row_ok, start, full_start, full_end, hi, kv_len,
        sm_scale, qk_scale_log2, soft_cap, window_left, rope_log2_theta, rope_inv_scale,
        HEAD_DIM_QK, HEAD_DIM_VO, D_QK, D_VO, CAUSAL, HAS_WINDOW, HAS_CUSTOM_MASK, USE_SOFTCAP, USE_ALIBI,
        USE_ROPE, PAGED, BLOCK_M, BLOCK_N, UPCAST_DOT, PREFETCH_PAGES, INT32_PAGE_OFFSETS,
        MULTI_ITEM=MULTI_ITEM, prefix_len=prefix_len, item_first_key=item_first_key,
        LOGITS_HOOK=LOGITS_HOOK, MASK_HOOK=MASK_HOOK, SINK_HOOK=SINK_HOOK, USE_SOFTMAX=USE_SOFTMAX, vargs=vargs,
        v_batch=batch, v_qo_idx=tokens, v_heads=heads, v_kv_head=kv_head, v_qo_len=qo_len, v_first=lo == 0,
        V_T=V_T, stride_vd=stride_vd, FULL_HOOK=FULL_HOOK)
    if OUTPUT_HOOK is not None:  # whole rows only (no split: flashtile/variants.py)
        o = OUTPUT_HOOK(o, lse, batch, tokens, heads, qo_len, kv_len, vargs)
    if FP8:  # before a split partial too: the merge is linear in o
        o = o * fp8_v_scale(FP8_SCALES, kv_head)
    if slot < 0:
        store_state(O + q_tokens[:, None].to(tl.int64) * stride_ot + heads[:, None] * stride_oh,
                    LSE + q_tokens.to(tl.int64) * stride_lt + heads * stride_lh, o, lse, row_ok, v_scale,
                    HEAD_DIM_VO, D_VO, False)
    else:
        part_row = ((slot.to(tl.int64) * num_kv_heads + kv_head) * BLOCK_M + tl.arange(0, BLOCK_M))
        store_state(PART_O + part_row[:, None] * HEAD_DIM_VO, PART_LSE + part_row, o, lse, row_ok, v_scale,
                    HEAD_DIM_VO, D_VO, True)


@direct_launch
@triton.jit
def _merge_tiles_kernel(
    PART_O, PART_LSE, O, LSE, COUNTS, REQS, MERGES,
    stride_ot, stride_oh, stride_lt, stride_lh, num_kv_heads, v_scale,
    GROUP: tl.constexpr, HEAD_DIM_VO: tl.constexpr, D_VO: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Fold the partial states of a split tile (rows of one KV head) into the output: a state is a
    "key" with logit ``lse`` and value ``o`` (the shared online softmax, softmax.py)."""
    pid = tl.program_id(0)
    entry = pid // num_kv_heads
    kv_head = pid % num_kv_heads
    num_merges = tl.load(COUNTS + 1)
    entry_c = tl.maximum(tl.minimum(entry, num_merges - 1), 0)
    me = MERGES + entry_c * 4
    req = tl.load(me)
    row_block = tl.load(me + 1)
    slot0 = tl.load(me + 2)
    num_slots = tl.where(entry < num_merges, tl.load(me + 3), 0)
    qo_start = tl.load(REQS + req * 5)
    qo_len = tl.load(REQS + req * 5 + 1)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_VO)
    rows = row_block * BLOCK_M + offs_m
    row_ok = (rows < qo_len * GROUP) & ((rows * 0 + entry) < num_merges)
    d_ok = offs_d < HEAD_DIM_VO
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_VO], dtype=tl.float32)
    for s in range(0, num_slots):
        part_row = ((slot0 + s).to(tl.int64) * num_kv_heads + kv_head) * BLOCK_M + offs_m
        lse_s = tl.load(PART_LSE + part_row, mask=row_ok, other=float("-inf"))
        o_s = tl.load(PART_O + part_row[:, None] * HEAD_DIM_VO + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                      other=0.0)
        m_i, l_i, acc, p = softmax_update(m_i, l_i, acc, lse_s[:, None])
        acc += p * o_s
    o, lse = finalize_state(m_i, l_i, acc)
    tokens = qo_start + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    store_state(O + tokens[:, None].to(tl.int64) * stride_ot + heads[:, None] * stride_oh,
                LSE + tokens.to(tl.int64) * stride_lt + heads * stride_lh, o, lse, row_ok, v_scale, HEAD_DIM_VO,
                D_VO, False)


# Set by the batch_prefill suite's tuning grids (benchmarks/bench_batch_prefill.py): the page-id prefetch
# (None: the default rule, prefetch_page_ids) and 32-bit page offsets (False: int64 even where int32 would
# fit). The tile tables and the tile override (CONFIG_OVERRIDE) are in _core/tile_policy.py.
PREFETCH_OVERRIDE: Optional[bool] = None
INT32_OFFSETS_OVERRIDE: Optional[bool] = None  # False: int64 page offsets even where int32 would fit


def prefetch_page_ids(page_size: Optional[int]) -> bool:
    """Whether the paged kernel loads each tile's page ids one iteration ahead (attend_tiles): for
    page sizes above 1 (see the launch-configuration notes)."""
    if PREFETCH_OVERRIDE is not None:
        return PREFETCH_OVERRIDE and page_size is not None
    return page_size is not None and page_size > 1


def _launch_config(block_m: int, block_n: int, d_qk: int, d_vo: int, page_size: Optional[int],
                   fp8: bool = False) -> LaunchConfig:
    """The preferred config of a planned tile (measured on H100: see the notes above); the launch fits
    it to the device's shared memory (smem.py). ``fp8``: FP8 attention, whose full row tiles take the
    key tile, warps and stages of FP8 single prefill (kernels/attention.py's "prefill_fp8" entry; d128:
    BLOCK_N 128, 8 warps). The planned BLOCK_N 32 of short prompts ran ragged 16 x 1024 at 0.37x its bf16
    time with 4 warps (about 1 KiB of spill) and 0.48x with 8 on an H100: its fp8 logits are 32-key
    m64n32k32 wgmmas and its P.V one k32 step per tile (sm_90a PTX)."""
    if INTERPRET:
        return INTERPRETER_CONFIG
    if tile_policy.CONFIG_OVERRIDE is not None:
        return LaunchConfig(block_m, *tile_policy.CONFIG_OVERRIDE)
    if block_m in tile_policy.SMALL_M_CONFIGS:
        _, warps, stages = tile_policy.SMALL_M_CONFIGS[block_m][max(d_qk, d_vo)]
        return LaunchConfig(block_m, block_n, warps, stages)
    if fp8:
        single = choose_config("prefill_fp8", max(d_qk, d_vo))
        if single.block_m == block_m:
            return LaunchConfig(block_m, single.block_n, single.num_warps, single.num_stages)
    warps = 4 if not fp8 and (block_n == 32 or (page_size == 1 and block_n == 64)) else 8
    return LaunchConfig(block_m, block_n, warps, 3)


def _batch_prefill_triton(q, k, v, page_indices, packed_mask, multi_item_requests, token_pos_in_items, meta, counts,
                          reqs, items, part_o, part_lse, out, lse, params, alibi_slopes, block_m, block_n, num_items,
                          paged, num_kv_heads, group, causal, variant=None, fp8_scales=None, batch_size=0):
    """The Triton kernel's launch (every case the Gluon kernel does not take)."""
    head_dim_qk, head_dim_vo = q.shape[2], v.shape[-1]
    v_kwargs = {}
    if fp8_scales is not None and not paged and num_items > 0:
        v, v_kwargs = ragged_fp8_v_layout(v, reqs, batch_size)
    d_qk, d_vo = qk_tile_dim(head_dim_qk, fp8_scales is not None), dot_tile_dim(head_dim_vo)
    preferred = _launch_config(block_m, block_n, d_qk, d_vo, k.shape[1] if paged else None,  # k: [P, page_size, ..]
                               fp8_scales is not None)
    if paged:
        k_strides = (k.stride(0), k.stride(1), k.stride(2))
        v_strides = (v.stride(0), v.stride(1), v.stride(2))
        page_size = k.shape[1]
    else:
        k_strides = (0, k.stride(0), k.stride(1))
        # the FP8 copy is [heads, dim, keys] (keys contiguous); else V as given, [rows, heads, dim]
        v_strides = (0, 1, v.stride(0)) if v_kwargs else (0, v.stride(0), v.stride(1))
        page_size = 1
    use_rope = params.pos_encoding_mode == "ROPE_LLAMA"
    features = TileFeatures(d_qk, d_vo, q.element_size(), k.element_size(), use_rope, packed_mask is not None)

    def launch(cfg: LaunchConfig) -> None:
        _batch_prefill_kernel[(num_items * num_kv_heads,)](
            q, k, v, out, lse, part_o, part_lse, packed_mask if packed_mask is not None else meta,
            alibi_slopes if alibi_slopes is not None else lse, page_indices if paged else meta, counts, reqs, items,
            multi_item_requests if multi_item_requests is not None else meta,
            token_pos_in_items if token_pos_in_items is not None else meta,
            q.stride(0), q.stride(1), *k_strides, *v_strides,
            out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
            num_kv_heads,
            params.sm_scale, params.sm_scale * LOG2E, float(params.logits_soft_cap), int(params.window_left),
            math.log2(params.rope_theta), 1.0 / params.rope_scale, float(params.v_scale),
            PAGE_SIZE=page_size, GROUP=group, HEAD_DIM_QK=head_dim_qk, HEAD_DIM_VO=head_dim_vo, D_QK=d_qk,
            D_VO=d_vo, CAUSAL=causal, HAS_WINDOW=params.window_left >= 0,
            HAS_CUSTOM_MASK=packed_mask is not None, USE_SOFTCAP=params.logits_soft_cap > 0,
            USE_ALIBI=params.pos_encoding_mode == "ALIBI", USE_ROPE=params.pos_encoding_mode == "ROPE_LLAMA",
            PAGED=paged, BLOCK_M=block_m, BLOCK_N=cfg.block_n, UPCAST_DOT=INTERPRET,
            PREFETCH_PAGES=prefetch_page_ids(page_size if paged else None),
            INT32_PAGE_OFFSETS=paged and INT32_OFFSETS_OVERRIDE is not False and offsets_fit_int32(k.shape, k.stride())
            and offsets_fit_int32(v.shape, v.stride()),
            MULTI_ITEM=multi_item_requests is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            **extra,
        )

    extra = variant_kwargs(variant) | fp8_kwargs(fp8_scales) | v_kwargs

    if num_items == 0:
        return
    if tile_policy.CONFIG_OVERRIDE is not None:  # a tuning tool's explicit config: launched as given
        launch(preferred)
    else:  # the row tile is the plan's
        launch_within_limit(launch, preferred, features, q.device)


def batch_prefill_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    page_indices: Optional[torch.Tensor],
    packed_mask: Optional[torch.Tensor],
    meta: torch.Tensor,
    part_o: torch.Tensor,
    part_lse: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    params: AttentionParams,
    *,
    batch_size: int,
    item_capacity: int,
    block_m: int,
    block_n: int,
    num_items: int,
    num_merges: int,
    multi_item_requests: Optional[torch.Tensor] = None,
    token_pos_in_items: Optional[torch.Tensor] = None,
    variant=None,
    fp8_scales: Optional[tuple] = None,
) -> None:
    """Launch batch prefill (+ the merge of split tiles), writing ``out`` and ``lse`` in place.

    Args:
        q: ``[total_qo, Hq, Dqk]`` fp16/bf16 (or fp8 with ``fp8_scales``), unit last stride.
        k, v: ragged ``[total_kv, Hkv, D]`` (``page_indices`` None) or NHD page views
            ``[num_pages, page_size, Hkv, D]`` (strides passed); fp16/bf16 or fp8 (scales folded into
            ``params``).
        page_indices: int32 page ids (paged) or None (ragged).
        packed_mask: uint8 per-request packed masks (offsets in META), or None.
        meta: int32 plan (module doc): ``batch_size`` requests, ``item_capacity`` item rows.
        part_o, part_lse: float32 partial-state slots (module doc).
        out: ``[total_qo, Hq, Dvo]``; lse: float32 ``[total_qo, Hq]``.
        block_m, block_n: the planned tile shape (_core/tile_policy.prefill_tile_shape).
        num_items / num_merges: grid sizes (planned counts, or the fixed capacities of CUDA-graph mode;
            programs beyond the plan idle).
        multi_item_requests, token_pos_in_items: multi-item scoring (int32 ``[B, 2]`` and int32, module doc;
            ``params.causal`` is set and ``packed_mask`` None), or None. Only the Triton kernel takes it.
        variant: a bound attention variant (flashtile/variants.py) or None. Only the Triton kernel takes it:
            the warp-specialized Gluon kernel (batch_prefill_hopper.py) has no hook points, so variant calls
            are not "plain" and run the Triton kernel. One with ``whole_rows`` needs a plan without splits (the
            wrapper plans so).
        fp8_scales: FP8 attention (q, k, v of one fp8 dtype): ``(scale_q [Hq], scale_k [Hkv], scale_v [Hkv])``
            float32 views, or None. Paged FP8 batches run the Triton kernel; ragged ones the Gluon kernel on an
            H100/H200 (batch_prefill_hopper.py; FLASHTILE_HOPPER_FP8=0: the Triton kernel).
    """
    paged = page_indices is not None
    alibi_slopes = alibi_slopes_of(q.shape[1], q.device) if params.pos_encoding_mode == "ALIBI" else None
    num_kv_heads, head_dim_vo = (v.shape[2], v.shape[3]) if paged else (v.shape[1], v.shape[2])
    check_fp8_head_dims(k, q.shape[2], head_dim_vo)
    d_vo = dot_tile_dim(head_dim_vo)
    group = q.shape[1] // num_kv_heads
    counts = meta[:COUNT_FIELDS]
    reqs = meta[COUNT_FIELDS:]
    items = meta[COUNT_FIELDS + REQUEST_FIELDS * batch_size:]
    causal = bool(params.causal) and packed_mask is None
    # The warp-specialized Hopper kernel has no multi-item mask: such plans take the Triton kernel.
    plain = packed_mask is None and multi_item_requests is None and variant is None and _plain_params(params)
    fp8 = fp8_scales is not None
    views = None if INTERPRET or num_items == 0 else hopper_prefill_views(q, k, v, paged, block_m, plain, fp8)
    v_t = None
    if views is not None and fp8:  # the Gluon kernel reads V from the transposed copy
        v_t, copied = ragged_fp8_v_layout(v, reqs, batch_size)
        views = views if copied else None
    if views is not None:
        hopper_prefill_forward(q, k, v, views, page_indices, counts, reqs, items, part_o, part_lse, out, lse,
                               params.sm_scale * LOG2E, causal, num_items, num_sms(q.device), fp8_scales=fp8_scales,
                               v_t=v_t)
    else:
        _batch_prefill_triton(q, k, v, page_indices, packed_mask, multi_item_requests, token_pos_in_items, meta, counts,
                              reqs, items, part_o, part_lse, out, lse, params, alibi_slopes, block_m, block_n,
                              num_items, paged, num_kv_heads, group, causal, variant, fp8_scales, batch_size)
    if num_merges > 0:
        merges = meta[COUNT_FIELDS + REQUEST_FIELDS * batch_size + ITEM_FIELDS * item_capacity:]
        _merge_tiles_kernel[(num_merges * num_kv_heads,)](
            part_o, part_lse, out, lse, counts, reqs, merges,
            out.stride(0), out.stride(1), lse.stride(0), lse.stride(1), num_kv_heads, float(params.v_scale),
            GROUP=group, HEAD_DIM_VO=head_dim_vo, D_VO=d_vo, BLOCK_M=block_m,
            # 4 warps for a [128, 128] float32 tile spill (sm_90a, aot_compile_check.py); 8 do not.
            num_warps=8 if block_m * d_vo >= 128 * 128 else 4,
        )


def _plain_params(params: AttentionParams) -> bool:
    """Parameters the warp-specialized Hopper kernel serves: no window, soft cap, ALiBi, RoPE or ``v_scale``."""
    return (params.window_left < 0 and params.logits_soft_cap <= 0 and params.pos_encoding_mode == "NONE"
            and params.v_scale == 1.0)


def hopper_serves_single(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: AttentionParams,
                         block_m: int) -> bool:
    """Whether :func:`batch_prefill_forward` would run one request without a custom mask or variant (q
    ``[qo_len, Hq, D]``, ragged k/v ``[kv_len, Hkv, D]`` NHD views) through the warp-specialized Hopper
    kernel with a plan of ``block_m``-row tiles: the test single prefill routes by (_core/single_batch.py)."""
    return (not INTERPRET and _plain_params(params)
            and hopper_prefill_views(q, k, v, False, block_m, True) is not None)
