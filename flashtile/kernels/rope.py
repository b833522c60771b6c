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
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

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
    src = tl.where(is_q, Q, K) + t3 * tl.where(is_q, stride_q_t, stride_k_t) + h3 * tl.where(is_q, stride_q_h, stride_k_h)
    dst = tl.where(is_q, QO, KO) + t3 * tl.where(is_q, stride_qo_t, stride_ko_t) + h3 * tl.where(is_q, stride_qo_h, stride_ko_h)
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


_sm_count: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a small "GPU"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_count:
        _sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_count[index]


def rope_config(nnz: int, num_heads: int, half_pad: int, head_blocks_of, num_sms: int) -> tuple[int, int]:
    """``(BLOCK_T, BLOCK_H)``: a tile of about TILE elements; fewer tokens per program while that
    leaves fewer than two programs per SM."""
    block_h = min(triton.next_power_of_2(num_heads), MAX_BLOCK_H, max(1, TILE // (2 * half_pad)))
    block_t = max(1, TILE // (2 * half_pad * block_h))
    head_blocks = head_blocks_of(block_h)
    while block_t > 1 and triton.cdiv(nnz, block_t) * head_blocks < 2 * num_sms:
        block_t //= 2
    return block_t, block_h


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
) -> None:
    """Rotate q ``[nnz, Hq, D]`` and k ``[nnz, Hk, D]`` into q_out/k_out (which may be q/k).

    Positions: ``pos_ids [nnz]`` or the ragged ``indptr [B+1]`` / ``offsets [B]``. cos/sin from
    ``cos_sin_cache [max_pos, rotary_dim]`` (float32) when given, else from rope_scale/rope_theta and
    the Llama 3.1 smoothing coefficients.
    """
    nnz, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    if nnz == 0:
        return
    half_pad = triton.next_power_of_2(max(rotary_dim // 2, 1))
    copy_tail = q_out is not q and rotary_dim < head_dim  # in place leaves the tail untouched
    tail_pad = triton.next_power_of_2(max(head_dim - rotary_dim, 1))

    def head_blocks_of(bh):
        return triton.cdiv(num_q_heads, bh) + triton.cdiv(num_k_heads, bh)

    block_t, block_h = rope_config(nnz, max(num_q_heads, num_k_heads), half_pad, head_blocks_of, _num_sms(q.device))
    num_q_blocks = triton.cdiv(num_q_heads, block_h)
    is_ragged = pos_ids is None
    batch_size = indptr.shape[0] - 1 if is_ragged else 0
    use_cache = cos_sin_cache is not None
    dummy = q
    grid = (triton.cdiv(nnz, block_t), head_blocks_of(block_h))
    _rope_kernel[grid](
        q, k, q_out, k_out,
        pos_ids if not is_ragged else dummy,
        indptr if is_ragged else dummy,
        offsets if is_ragged else dummy,
        cos_sin_cache if use_cache else dummy,
        nnz, num_q_heads, num_k_heads, num_q_blocks, batch_size, max(1, batch_size).bit_length(),
        cos_sin_cache.shape[0] if use_cache else 0,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        cos_sin_cache.stride(0) if use_cache else 0,
        math.log2(rope_theta), 1.0 / rope_scale, float(smooth_a), float(smooth_b),
        HEAD_DIM=head_dim, ROTARY_DIM=rotary_dim, HALF_PAD=half_pad, TAIL_PAD=tail_pad,
        INTERLEAVE=bool(interleave), IS_RAGGED=is_ragged, USE_CACHE=use_cache, COPY_TAIL=copy_tail,
        BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4,
    )
