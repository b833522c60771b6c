"""Rotary position embedding of q and k in one launch + its launcher.

One program rotates ``BLOCK_T`` tokens x ``BLOCK_H`` heads of either q or k (grid axis 1 runs over
q's head blocks, then k's), so q and k with different head counts share a launch. cos/sin are
computed (or loaded from a cache) once per (token, pair) and broadcast over the heads of the tile.

Pointer shapes (strides passed; the last dim must be contiguous):
  Q, K      [nnz, num_q_heads | num_k_heads, HEAD_DIM]   input (fp16/bf16/fp32)
  QO, KO    same shapes, outputs (may alias Q, K: in place)
  POS       [nnz] int32/int64 positions           (not IS_RAGGED)
  INDPTR    [batch + 1], OFFSETS [batch]          (IS_RAGGED): token t of segment i, i.e.
            ``indptr[i] <= t < indptr[i+1]``, sits at ``offsets[i] + t - indptr[i]``
  CACHE     float32 [max_pos, ROTARY_DIM]: cos in the first half, sin in the second (USE_CACHE)

Pairs: half-split ("NeoX") ``(m, m + ROTARY_DIM/2)`` or interleaved ("GPT-J") ``(2m, 2m + 1)``.
Frequency of pair m: ``f = theta**(-2m/ROTARY_DIM)``, ``smooth = clamp(f * smooth_a + smooth_b, 0, 1)``,
``f' = (1 - smooth) * f / rope_scale + smooth * f`` (Llama 3.1; plain RoPE has smooth_a = smooth_b = 0).
Angles and sin/cos in float32. Dims past ROTARY_DIM are copied when the output is a new tensor
(COPY_TAIL) and untouched in place.

Two kernels with the same contract and arguments. ``_rope_tokens_kernel`` (token-major): one program
takes ``BLOCK_T`` whole tokens, all their q heads and all their k heads, issues every q/k load before
it resolves positions and cos/sin, and reads each token's cos/sin row once. ``_rope_kernel``
(head blocks): a program takes a few tokens of one block of q or k heads. On the H100 the token-major
kernel is faster with a cos/sin cache (8192 tokens, 32/8 heads: 64.2 against 66.9 us) and slower when
it computes sin/cos (the Llama 3.1 form: 69.8 against 65.9 us: it evaluates them in two layouts), so
the cache form takes it and the other forms the head-block kernel (:func:`use_token_major`; both
kernels handle every form, and the tests run each form through both; docs/small_ops.md, "Where the
time goes").
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .._core.device import num_sms
from .._core.intmath import cdiv, floor_power_of_2, next_power_of_2
from .._core.launch import LaunchMemo, direct_launch, tensor_key

TILE = 4096  # elements (both halves of the rotated dims) per program
MAX_BLOCK_H = 8


@triton.jit
def _token_positions(tokens, tok_ok, POS, INDPTR, OFFSETS, batch_size, search_steps, IS_RAGGED: tl.constexpr):
    """Position of each token (int64). Ragged: binary search for the last segment ``i`` with
    ``indptr[i] <= t`` (empty segments are skipped that way), ``search_steps >= ceil(log2(batch))``."""
    if IS_RAGGED:
        lo = tl.zeros_like(tokens)
        hi = lo + batch_size - 1
        for _ in range(search_steps):
            mid = (lo + hi + 1) // 2
            start = tl.load(INDPTR + mid, mask=tok_ok, other=0).to(tl.int64)
            go_right = start <= tokens
            lo = tl.where(go_right, mid, lo)
            hi = tl.where(go_right, hi, mid - 1)
        start = tl.load(INDPTR + lo, mask=tok_ok, other=0).to(tl.int64)
        offset = tl.load(OFFSETS + lo, mask=tok_ok, other=0).to(tl.int64)
        return offset + tokens - start
    else:
        return tl.load(POS + tokens, mask=tok_ok, other=0).to(tl.int64)


@direct_launch
@triton.jit
def _rope_kernel(
    Q, K, QO, KO, POS, INDPTR, OFFSETS, CACHE,
    nnz, num_q_heads, num_k_heads, num_q_blocks, batch_size, search_steps, max_pos,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h,
    stride_qo_t, stride_qo_h, stride_ko_t, stride_ko_h, stride_cache,
    log2_theta, inv_scale, smooth_a, smooth_b,
    HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, HALF_PAD: tl.constexpr, TAIL_PAD: tl.constexpr,
    INTERLEAVE: tl.constexpr, IS_RAGGED: tl.constexpr, USE_CACHE: tl.constexpr, COPY_TAIL: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # HEAD_DIM and ROTARY_DIM are constexpr: pair offsets are then compile-time affine, so the
    # half-split loads vectorize.
    HALF: tl.constexpr = ROTARY_DIM // 2
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # [T]
    tok_ok = tokens < nnz
    head_block = tl.program_id(1)
    is_q = head_block < num_q_blocks
    heads = tl.where(is_q, head_block, head_block - num_q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)  # [H]
    head_ok = heads < tl.where(is_q, num_q_heads, num_k_heads)

    pos = _token_positions(tokens, tok_ok, POS, INDPTR, OFFSETS, batch_size, search_steps, IS_RAGGED)
    pair = tl.arange(0, HALF_PAD)  # [P]
    pair_ok = pair < HALF
    if USE_CACHE:
        in_range = tok_ok & (pos >= 0) & (pos < max_pos)  # out-of-range positions read nothing
        c_ptrs = CACHE + pos[:, None] * stride_cache + pair[None, :]
        c_ok = in_range[:, None] & pair_ok[None, :]
        cos = tl.load(c_ptrs, mask=c_ok, other=0.0)  # [T, P]
        sin = tl.load(c_ptrs + HALF, mask=c_ok, other=0.0)
    else:
        freq = tl.exp2(pair.to(tl.float32) * (-2.0 / ROTARY_DIM) * log2_theta)  # [P]
        smooth = tl.minimum(tl.maximum(freq * smooth_a + smooth_b, 0.0), 1.0)
        freq = (1.0 - smooth) * freq * inv_scale + smooth * freq
        angle = pos.to(tl.float32)[:, None] * freq[None, :]  # [T, P]
        cos = tl.cos(angle)
        sin = tl.sin(angle)
    cos = cos[:, None, :]  # [T, 1, P], broadcast over heads
    sin = sin[:, None, :]

    # Row starts of this tile in q or k (input and output), int64 [T, H, 1].
    t3 = tokens[:, None, None]
    h3 = heads[None, :, None]
    src = (tl.where(is_q, Q, K) + t3 * tl.where(is_q, stride_q_t, stride_k_t)
           + h3 * tl.where(is_q, stride_q_h, stride_k_h))
    dst = (tl.where(is_q, QO, KO) + t3 * tl.where(is_q, stride_qo_t, stride_ko_t)
           + h3 * tl.where(is_q, stride_qo_h, stride_ko_h))
    ok = tok_ok[:, None, None] & head_ok[None, :, None] & pair_ok[None, None, :]  # [T, H, P]
    p3 = pair[None, None, :]
    if INTERLEAVE:
        off_a = 2 * p3
        off_b = 2 * p3 + 1
    else:
        off_a = p3
        off_b = p3 + HALF
    a = tl.load(src + off_a, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(src + off_b, mask=ok, other=0.0).to(tl.float32)
    out_ty = QO.dtype.element_ty
    tl.store(dst + off_a, (a * cos - b * sin).to(out_ty), mask=ok)
    tl.store(dst + off_b, (b * cos + a * sin).to(out_ty), mask=ok)
    if COPY_TAIL:
        tail = ROTARY_DIM + tl.arange(0, TAIL_PAD)[None, None, :]
        t_ok = tok_ok[:, None, None] & head_ok[None, :, None] & (tail < HEAD_DIM)
        tl.store(dst + tail, tl.load(src + tail, mask=t_ok, other=0.0), mask=t_ok)


# ---------------------------------------------------------------------------------------------
# Token-major kernel (the cos/sin-cache form's)
# ---------------------------------------------------------------------------------------------

FAST_TILE = 4096  # elements of one half (the a or the b elements) of a program's q tile
FAST_MAX_BLOCK_T = 4
FAST_PROGRAMS_PER_SM = 4  # fewer tokens per program while the grid would give fewer programs per SM


def use_token_major(use_cache: bool) -> bool:
    """The token-major kernel for the cos/sin-cache form, the head-block kernel otherwise (the faster
    one of each on the H100)."""
    return use_cache


@triton.jit
def _row_starts(BASE, tokens, heads, stride_t, stride_h):
    """Pointers to element 0 of each (token, head) row: [T, H, 1] (tokens int64, heads int32)."""
    return BASE + tokens[:, None, None] * stride_t + heads[None, :, None] * stride_h


@triton.jit
def _load_pairs(src, ok, ROTARY_DIM: tl.constexpr, HALF_PAD: tl.constexpr, INTERLEAVE: tl.constexpr):
    """The two elements of every rotated pair of the rows at ``src`` [T, H, 1], as float32
    ``(a, b)`` [T, H, HALF_PAD]. Half-split: two contiguous loads (dims [0, R/2) and [R/2, R)).
    Interleaved: one contiguous load of dims [0, R) split into even and odd. Each element is read once."""
    HALF: tl.constexpr = ROTARY_DIM // 2
    if INTERLEAVE:
        r = tl.arange(0, 2 * HALF_PAD)[None, None, :]
        x = tl.load(src + r, mask=ok & (r < ROTARY_DIM), other=0.0).to(tl.float32)  # [T, H, 2P]
        a, b = tl.split(tl.reshape(x, (x.shape[0], x.shape[1], HALF_PAD, 2)))
    else:
        p = tl.arange(0, HALF_PAD)[None, None, :]
        m = ok & (p < HALF)
        a = tl.load(src + p, mask=m, other=0.0).to(tl.float32)
        b = tl.load(src + HALF + p, mask=m, other=0.0).to(tl.float32)
    return a, b


@triton.jit
def _store_rotated(dst, ok, a, b, cos, sin, ROTARY_DIM: tl.constexpr, HALF_PAD: tl.constexpr,
                   INTERLEAVE: tl.constexpr):
    """Write ``(a cos - b sin, b cos + a sin)`` to the pairs of the rows at ``dst`` [T, H, 1];
    cos/sin [T, 1, HALF_PAD] broadcast over the heads."""
    _store_pairs(dst, ok, a * cos - b * sin, b * cos + a * sin, ROTARY_DIM, HALF_PAD, INTERLEAVE)


@triton.jit
def _store_pairs(dst, ok, oa, ob, ROTARY_DIM: tl.constexpr, HALF_PAD: tl.constexpr, INTERLEAVE: tl.constexpr):
    """Write the pairs ``(oa, ob)`` [T, H, HALF_PAD] to the rows at ``dst`` [T, H, 1], cast to its dtype
    (the layout of :func:`_load_pairs`)."""
    HALF: tl.constexpr = ROTARY_DIM // 2
    out_ty = dst.dtype.element_ty
    if INTERLEAVE:
        r = tl.arange(0, 2 * HALF_PAD)[None, None, :]
        y = tl.reshape(tl.join(oa, ob), (oa.shape[0], oa.shape[1], 2 * HALF_PAD))
        tl.store(dst + r, y.to(out_ty), mask=ok & (r < ROTARY_DIM))
    else:
        p = tl.arange(0, HALF_PAD)[None, None, :]
        m = ok & (p < HALF)
        tl.store(dst + p, oa.to(out_ty), mask=m)
        tl.store(dst + HALF + p, ob.to(out_ty), mask=m)


@triton.jit
def _load_tail(src, ok, HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, TAIL_PAD: tl.constexpr):
    """Dims [ROTARY_DIM, HEAD_DIM) of the rows at ``src`` [T, H, 1] (padded to TAIL_PAD)."""
    tail = ROTARY_DIM + tl.arange(0, TAIL_PAD)[None, None, :]
    return tl.load(src + tail, mask=ok & (tail < HEAD_DIM), other=0.0)


@triton.jit
def _store_tail(dst, ok, x, HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, TAIL_PAD: tl.constexpr):
    tail = ROTARY_DIM + tl.arange(0, TAIL_PAD)[None, None, :]
    tl.store(dst + tail, x, mask=ok & (tail < HEAD_DIM))


@triton.jit
def _cos_sin(pos, tok_ok, CACHE, stride_cache, max_pos, log2_theta, inv_scale, smooth_a, smooth_b,
             ROTARY_DIM: tl.constexpr, HALF_PAD: tl.constexpr, USE_CACHE: tl.constexpr):
    """cos, sin of every (token, pair): float32 [T, 1, HALF_PAD], one cache row (or one set of
    angles) per token."""
    HALF: tl.constexpr = ROTARY_DIM // 2
    pair = tl.arange(0, HALF_PAD)[None, None, :]
    if USE_CACHE:
        in_range = tok_ok & (pos >= 0) & (pos < max_pos)  # out-of-range positions read nothing
        row = CACHE + pos[:, None, None] * stride_cache
        m = in_range[:, None, None] & (pair < HALF)
        cos = tl.load(row + pair, mask=m, other=0.0)
        sin = tl.load(row + HALF + pair, mask=m, other=0.0)
    else:
        freq = tl.exp2(pair.to(tl.float32) * (-2.0 / ROTARY_DIM) * log2_theta)  # [1, 1, P]
        smooth = tl.minimum(tl.maximum(freq * smooth_a + smooth_b, 0.0), 1.0)
        freq = (1.0 - smooth) * freq * inv_scale + smooth * freq
        angle = pos.to(tl.float32)[:, None, None] * freq  # [T, 1, P]
        cos = tl.cos(angle)
        sin = tl.sin(angle)
    return cos, sin


@triton.jit
def _rotate_remaining_heads(SRC, DST, tokens, tok_ok, offs_h, num_heads, stride_t, stride_h, stride_out_t,
                            stride_out_h, cos, sin, HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr,
                            HALF_PAD: tl.constexpr, TAIL_PAD: tl.constexpr, INTERLEAVE: tl.constexpr,
                            COPY_TAIL: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate heads ``BLOCK_H..num_heads`` of the program's tokens, one ``BLOCK_H``-head tile at a time
    (the first tile is done by the caller with its loads issued early)."""
    for h0 in range(BLOCK_H, num_heads, BLOCK_H):
        heads = h0 + offs_h
        ok = tok_ok[:, None, None] & (heads < num_heads)[None, :, None]
        src = _row_starts(SRC, tokens, heads, stride_t, stride_h)
        dst = _row_starts(DST, tokens, heads, stride_out_t, stride_out_h)
        a, b = _load_pairs(src, ok, ROTARY_DIM, HALF_PAD, INTERLEAVE)
        _store_rotated(dst, ok, a, b, cos, sin, ROTARY_DIM, HALF_PAD, INTERLEAVE)
        if COPY_TAIL:
            _store_tail(dst, ok, _load_tail(src, ok, HEAD_DIM, ROTARY_DIM, TAIL_PAD), HEAD_DIM, ROTARY_DIM, TAIL_PAD)


@direct_launch
@triton.jit
def _rope_tokens_kernel(
    Q, K, QO, KO, POS, INDPTR, OFFSETS, CACHE,
    nnz, num_q_heads, num_k_heads, batch_size, search_steps, max_pos,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h,
    stride_qo_t, stride_qo_h, stride_ko_t, stride_ko_h, stride_cache,
    log2_theta, inv_scale, smooth_a, smooth_b,
    HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, HALF_PAD: tl.constexpr, TAIL_PAD: tl.constexpr,
    INTERLEAVE: tl.constexpr, IS_RAGGED: tl.constexpr, USE_CACHE: tl.constexpr, COPY_TAIL: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
):
    """One program = ``BLOCK_T`` tokens x all their q heads and k heads (same pointer contract as
    ``_rope_kernel``). q tile [BLOCK_T, BLOCK_HQ, HALF_PAD] per half, k tile [BLOCK_T, BLOCK_HK,
    HALF_PAD]; heads beyond one tile are done in a loop. The first q and k tiles are loaded before
    the positions and cos/sin (their loads do not depend on them), so the position -> cos/sin
    chain overlaps the q/k reads instead of preceding them."""
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # [T]
    tok_ok = tokens < nnz
    hq = tl.arange(0, BLOCK_HQ)
    hk = tl.arange(0, BLOCK_HK)
    q_ok = tok_ok[:, None, None] & (hq < num_q_heads)[None, :, None]  # [T, HQ, 1]
    k_ok = tok_ok[:, None, None] & (hk < num_k_heads)[None, :, None]

    # 1. Every load of the first q and k tiles (and their tails), before anything that waits on memory.
    q_src = _row_starts(Q, tokens, hq, stride_q_t, stride_q_h)
    k_src = _row_starts(K, tokens, hk, stride_k_t, stride_k_h)
    qa, qb = _load_pairs(q_src, q_ok, ROTARY_DIM, HALF_PAD, INTERLEAVE)
    ka, kb = _load_pairs(k_src, k_ok, ROTARY_DIM, HALF_PAD, INTERLEAVE)
    if COPY_TAIL:
        q_tail = _load_tail(q_src, q_ok, HEAD_DIM, ROTARY_DIM, TAIL_PAD)
        k_tail = _load_tail(k_src, k_ok, HEAD_DIM, ROTARY_DIM, TAIL_PAD)
    # ptxas otherwise hoists the position load above them and then makes the rest of the q/k loads
    # wait for it (it places the dependent cos/sin loads first): a CTA barrier keeps all q/k loads
    # in flight before anything waits on memory. No warp waits on memory before the barrier.
    tl.debug_barrier()

    # 2. Positions, then cos/sin once per token.
    pos = _token_positions(tokens, tok_ok, POS, INDPTR, OFFSETS, batch_size, search_steps, IS_RAGGED)
    cos, sin = _cos_sin(pos, tok_ok, CACHE, stride_cache, max_pos, log2_theta, inv_scale, smooth_a, smooth_b,
                        ROTARY_DIM, HALF_PAD, USE_CACHE)

    # 3. Rotate and write the first tiles.
    q_dst = _row_starts(QO, tokens, hq, stride_qo_t, stride_qo_h)
    k_dst = _row_starts(KO, tokens, hk, stride_ko_t, stride_ko_h)
    _store_rotated(q_dst, q_ok, qa, qb, cos, sin, ROTARY_DIM, HALF_PAD, INTERLEAVE)
    _store_rotated(k_dst, k_ok, ka, kb, cos, sin, ROTARY_DIM, HALF_PAD, INTERLEAVE)
    if COPY_TAIL:
        _store_tail(q_dst, q_ok, q_tail, HEAD_DIM, ROTARY_DIM, TAIL_PAD)
        _store_tail(k_dst, k_ok, k_tail, HEAD_DIM, ROTARY_DIM, TAIL_PAD)

    # 4. Heads past the first tile (more than FAST_TILE / HALF_PAD heads): same steps per tile.
    _rotate_remaining_heads(Q, QO, tokens, tok_ok, hq, num_q_heads, stride_q_t, stride_q_h, stride_qo_t, stride_qo_h,
                            cos, sin, HEAD_DIM, ROTARY_DIM, HALF_PAD, TAIL_PAD, INTERLEAVE, COPY_TAIL, BLOCK_HQ)
    _rotate_remaining_heads(K, KO, tokens, tok_ok, hk, num_k_heads, stride_k_t, stride_k_h, stride_ko_t, stride_ko_h,
                            cos, sin, HEAD_DIM, ROTARY_DIM, HALF_PAD, TAIL_PAD, INTERLEAVE, COPY_TAIL, BLOCK_HK)


def fast_config(nnz: int, num_q_heads: int, num_k_heads: int, half_pad: int, num_sms: int) -> tuple[int, int, int, int]:
    """``(BLOCK_T, BLOCK_HQ, BLOCK_HK, num_warps)`` of the token-major kernel: all heads of a token in
    one tile while a half-tile stays within FAST_TILE elements; then as many tokens (up to
    FAST_MAX_BLOCK_T) as fit, fewer while that leaves under FAST_PROGRAMS_PER_SM programs per SM;
    one warp per 512 elements of the larger half-tile (two 16-byte vectors per thread in bf16).
    8192 tokens x 32/8 heads x d128: (2, 32, 8, 8), 4096 programs of 40 KB (q/k read + written)."""
    max_heads = max(1, FAST_TILE // half_pad)
    block_hq = min(next_power_of_2(num_q_heads), max_heads)
    block_hk = min(next_power_of_2(num_k_heads), max_heads)
    widest = max(block_hq, block_hk) * half_pad
    block_t = min(FAST_MAX_BLOCK_T, max(1, FAST_TILE // widest))
    while block_t > 1 and cdiv(nnz, block_t) < FAST_PROGRAMS_PER_SM * num_sms:
        block_t //= 2
    num_warps = min(8, max(1, block_t * widest // 512))
    return block_t, block_hq, block_hk, num_warps


def rope_config(nnz: int, num_heads: int, half_pad: int, head_blocks_of, num_sms: int) -> tuple[int, int]:
    """``(BLOCK_T, BLOCK_H)``: a tile of about TILE elements; fewer tokens per program while that
    leaves fewer than two programs per SM."""
    block_h = min(next_power_of_2(num_heads), MAX_BLOCK_H, max(1, TILE // (2 * half_pad)))
    block_t = max(1, TILE // (2 * half_pad * block_h))
    head_blocks = head_blocks_of(block_h)
    while block_t > 1 and cdiv(nnz, block_t) * head_blocks < 2 * num_sms:
        block_t //= 2
    return block_t, block_h


def _heads_views(q, k, q_out, k_out, head_size: int):
    """``[nnz, heads * head_size]`` rows as ``[nnz, heads, head_size]`` views (3-D tensors as they are)."""
    views = [x if x.dim() == 3 else x.unflatten(1, (-1, head_size)) for x in (q, k, q_out, k_out)]
    return views[0], views[1], (views[0] if q_out is q else views[2]), (views[1] if k_out is k else views[3])


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    *,
    rotary_dim: int,
    interleave: bool,
    pos_ids: Optional[torch.Tensor] = None,
    indptr: Optional[torch.Tensor] = None,
    offsets: Optional[torch.Tensor] = None,
    cos_sin_cache: Optional[torch.Tensor] = None,
    rope_scale: float = 1.0,
    rope_theta: float = 1e4,
    smooth_a: float = 0.0,
    smooth_b: float = 0.0,
    head_size: Optional[int] = None,
    launch_key=None,
) -> None:
    """Rotate q ``[nnz, Hq, D]`` and k ``[nnz, Hk, D]`` into q_out/k_out (which may be q/k).

    Positions: ``pos_ids [nnz]`` or the ragged ``indptr [B+1]`` / ``offsets [B]``. cos/sin from
    ``cos_sin_cache [max_pos, rotary_dim]`` (float32) when given, else from rope_scale/rope_theta and
    the Llama 3.1 smoothing coefficients. ``head_size``: q, k, q_out, k_out are ``[nnz, heads * head_size]``
    rows (viewed as ``[nnz, heads, head_size]`` only when the launch is not replayed: a replay needs
    only the addresses). ``launch_key``: the caller's key of this call (its tensors' metadata and every
    option; _core/memo.py), or None to compute one.
    """
    optional = (pos_ids, indptr, offsets, cos_sin_cache)
    key = launch_key
    if key is None:  # keyed on the 3-D views
        if head_size is not None:
            q, k, q_out, k_out = _heads_views(q, k, q_out, k_out, head_size)
            head_size = None
        key = (tensor_key(q), tensor_key(k),
               None if q_out is q else tensor_key(q_out), None if k_out is k else tensor_key(k_out),
               *(None if t is None else tensor_key(t) for t in optional), rotary_dim, interleave, rope_scale,
               rope_theta, smooth_a, smooth_b)
    replay = _LAUNCHES.get(key)
    if replay is not None:
        replay(q, k, q_out, k_out, pos_ids if pos_ids is not None else q, indptr if indptr is not None else q,
               offsets if offsets is not None else q, cos_sin_cache if cos_sin_cache is not None else q)
        return
    if head_size is not None:
        q, k, q_out, k_out = _heads_views(q, k, q_out, k_out, head_size)
    nnz, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    if nnz == 0:
        return
    half_pad = next_power_of_2(max(rotary_dim // 2, 1))
    copy_tail = q_out is not q and rotary_dim < head_dim  # in place leaves the tail untouched
    tail_pad = next_power_of_2(max(head_dim - rotary_dim, 1))

    def head_blocks_of(bh):
        return cdiv(num_q_heads, bh) + cdiv(num_k_heads, bh)

    is_ragged = pos_ids is None
    batch_size = 0
    if is_ragged:
        assert indptr is not None, "positions: pos_ids, or indptr and offsets"
        batch_size = indptr.shape[0] - 1
    use_cache = cos_sin_cache is not None
    dummy = q
    common = (
        q, k, q_out, k_out,
        pos_ids if not is_ragged else dummy,
        indptr if is_ragged else dummy,
        offsets if is_ragged else dummy,
        cos_sin_cache if use_cache else dummy,
    )
    head_counts = (nnz, num_q_heads, num_k_heads)  # the head-block kernel takes num_q_blocks after these
    scalars = (
        batch_size, max(1, batch_size).bit_length(), cos_sin_cache.shape[0] if cos_sin_cache is not None else 0,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        cos_sin_cache.stride(0) if cos_sin_cache is not None else 0,
        math.log2(rope_theta), 1.0 / rope_scale, float(smooth_a), float(smooth_b),
    )
    constexprs = dict(HEAD_DIM=head_dim, ROTARY_DIM=rotary_dim, HALF_PAD=half_pad, TAIL_PAD=tail_pad,
                      INTERLEAVE=bool(interleave), IS_RAGGED=is_ragged, USE_CACHE=use_cache, COPY_TAIL=copy_tail)
    if use_token_major(use_cache):
        block_t, block_hq, block_hk, num_warps = fast_config(nnz, num_q_heads, num_k_heads, half_pad, num_sms(q.device))
        _LAUNCHES.launch(key, _rope_tokens_kernel, (cdiv(nnz, block_t),), (*common, *head_counts, *scalars), dict(
            constexprs, BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, num_warps=num_warps))
        return
    block_t, block_h = rope_config(nnz, max(num_q_heads, num_k_heads), half_pad, head_blocks_of, num_sms(q.device))
    num_q_blocks = cdiv(num_q_heads, block_h)
    grid = (cdiv(nnz, block_t), head_blocks_of(block_h))
    _LAUNCHES.launch(key, _rope_kernel, grid, (*common, *head_counts, num_q_blocks, *scalars), dict(
        constexprs, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4))


@triton.jit
def _scaled_saturated(x, scale, BOUND: tl.constexpr):
    """``x * scale`` clamped to ``[-BOUND, BOUND]`` (NaN stays NaN): the saturating fp8 cast's input."""
    return tl.clamp(x * scale, -BOUND, BOUND, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _rope_quantize_rows(R, N, RO, NO, token, heads, ok, s_r_t, s_r_h, s_n_t, s_n_h, s_ro_t, s_ro_h, s_no_t, s_no_h,
                        cos, sin, scale, ROPE_DIM: tl.constexpr, HALF_PAD: tl.constexpr, NOPE_DIM: tl.constexpr,
                        NOPE_PAD: tl.constexpr, INTERLEAVE: tl.constexpr, BOUND: tl.constexpr):
    """One token's rows ``heads`` [1, H, 1] of a rope part R (rotated) and a nope part N, scaled,
    saturated and cast into RO / NO."""
    tokens = token + tl.arange(0, 1)  # [1]
    n = tl.arange(0, NOPE_PAD)[None, None, :]
    n_ok = ok & (n < NOPE_DIM)
    nope = tl.load(_row_starts(N, tokens, heads, s_n_t, s_n_h) + n, mask=n_ok, other=0.0).to(tl.float32)
    a, b = _load_pairs(_row_starts(R, tokens, heads, s_r_t, s_r_h), ok, ROPE_DIM, HALF_PAD, INTERLEAVE)
    nope = _scaled_saturated(nope, scale, BOUND)
    tl.store(_row_starts(NO, tokens, heads, s_no_t, s_no_h) + n, nope.to(NO.dtype.element_ty), mask=n_ok)
    oa = _scaled_saturated(a * cos - b * sin, scale, BOUND)
    ob = _scaled_saturated(b * cos + a * sin, scale, BOUND)
    _store_pairs(_row_starts(RO, tokens, heads, s_ro_t, s_ro_h), ok, oa, ob, ROPE_DIM, HALF_PAD, INTERLEAVE)


@direct_launch
@triton.jit
def _mla_rope_quantize_kernel(
    QR, KR, QN, KN, QRO, KRO, QNO, KNO, POS, CACHE,
    scale_q, scale_kv,
    num_heads, max_pos,
    s_qr_t, s_qr_h, s_kr_t, s_qn_t, s_qn_h, s_kn_t,
    s_qro_t, s_qro_h, s_kro_t, s_qno_t, s_qno_h, s_kno_t, s_cache,
    ROPE_DIM: tl.constexpr, HALF_PAD: tl.constexpr, NOPE_DIM: tl.constexpr, NOPE_PAD: tl.constexpr,
    INTERLEAVE: tl.constexpr, BOUND: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """MLA's RoPE + fp8 quantization (contract of reference/rope.py's mla_rope_quantize): program
    (token, j) does q heads ``[j * BLOCK_H, (j + 1) * BLOCK_H)`` of the token, rope part and nope part;
    the last j of the grid does the token's k (one row: k_rope [nnz, ROPE_DIM], k_nope [nnz, NOPE_DIM]).
    Every last dim is contiguous; positions are in range (the API checks what it can read)."""
    token = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    tok_ok = tl.full([1], 1, tl.int1)
    pos = tl.load(POS + token + tl.arange(0, 1))
    cos, sin = _cos_sin(pos, tok_ok, CACHE, s_cache, max_pos, 0.0, 1.0, 0.0, 0.0, ROPE_DIM, HALF_PAD, True)
    if j < tl.num_programs(1) - 1:
        heads = j * BLOCK_H + tl.arange(0, BLOCK_H)
        ok = (heads < num_heads)[None, :, None]
        _rope_quantize_rows(QR, QN, QRO, QNO, token, heads, ok, s_qr_t, s_qr_h, s_qn_t, s_qn_h, s_qro_t, s_qro_h,
                            s_qno_t, s_qno_h, cos, sin, scale_q, ROPE_DIM, HALF_PAD, NOPE_DIM, NOPE_PAD, INTERLEAVE,
                            BOUND)
    else:
        row = tl.arange(0, 1)  # k's single row: head strides 0
        row_ok = (row >= 0)[None, :, None]
        _rope_quantize_rows(KR, KN, KRO, KNO, token, row, row_ok, s_kr_t, 0, s_kn_t, 0, s_kro_t, 0, s_kno_t, 0, cos,
                            sin, scale_kv, ROPE_DIM, HALF_PAD, NOPE_DIM, NOPE_PAD, INTERLEAVE, BOUND)


MLA_QUANT_TILE = 8192  # elements (rope + nope) of one program's q heads


def mla_rope_quantize(q_rope, k_rope, q_nope, k_nope, cos_sin_cache, pos_ids, q_rope_out, k_rope_out, q_nope_out,
                      k_nope_out, *, interleave: bool, quant_scale_q: float, quant_scale_kv: float) -> None:
    """RoPE of the rope parts and fp8 quantization of all four MLA inputs in one launch (arguments and
    math: flashtile/reference/rope.py). q parts ``[nnz, heads, dim]``, k parts ``[nnz, dim]``, every last
    dim contiguous; the outputs are all of one fp8 dtype."""
    key = (tensor_key(q_rope), tensor_key(k_rope), tensor_key(q_nope), tensor_key(k_nope), tensor_key(q_rope_out),
           tensor_key(k_rope_out), tensor_key(q_nope_out), tensor_key(k_nope_out), tensor_key(pos_ids),
           tensor_key(cos_sin_cache), interleave)
    replay = _MLA_QUANT_LAUNCHES.get(key)
    if replay is not None:
        replay(q_rope, k_rope, q_nope, k_nope, q_rope_out, k_rope_out, q_nope_out, k_nope_out, pos_ids, cos_sin_cache,
               quant_scale_q, quant_scale_kv)
        return
    nnz, num_heads, rope_dim = q_rope.shape
    nope_dim = q_nope.shape[2]
    if nnz == 0:
        return
    half_pad = next_power_of_2(max(rope_dim // 2, 1))
    nope_pad = next_power_of_2(nope_dim)
    block_h = min(next_power_of_2(num_heads), floor_power_of_2(max(1, MLA_QUANT_TILE // (nope_pad + 2 * half_pad))))
    grid = (nnz, cdiv(num_heads, block_h) + 1)
    args = (q_rope, k_rope, q_nope, k_nope, q_rope_out, k_rope_out, q_nope_out, k_nope_out, pos_ids, cos_sin_cache,
            quant_scale_q, quant_scale_kv, num_heads, cos_sin_cache.shape[0],
            q_rope.stride(0), q_rope.stride(1), k_rope.stride(0), q_nope.stride(0), q_nope.stride(1), k_nope.stride(0),
            q_rope_out.stride(0), q_rope_out.stride(1), k_rope_out.stride(0), q_nope_out.stride(0),
            q_nope_out.stride(1), k_nope_out.stride(0), cos_sin_cache.stride(0))
    width = block_h * (nope_pad + 2 * half_pad)
    _MLA_QUANT_LAUNCHES.launch(key, _mla_rope_quantize_kernel, grid, args, dict(
        ROPE_DIM=rope_dim, HALF_PAD=half_pad, NOPE_DIM=nope_dim, NOPE_PAD=nope_pad, INTERLEAVE=bool(interleave),
        BOUND=torch.finfo(q_rope_out.dtype).max, BLOCK_H=block_h, num_warps=min(8, max(1, width // 1024))))


# Launches replayed per key (shapes, strides, dtypes, alignment, options; the env knobs that pick the
# kernel are read once and clear the memo when reloaded): the eight tensor arguments, first in both
# kernels, are all that change.
_LAUNCHES = LaunchMemo(dynamic=range(8))
_MLA_QUANT_LAUNCHES = LaunchMemo(dynamic=range(12))  # the ten tensors and the two scales, first in the kernel
