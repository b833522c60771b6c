"""Merging attention states ``(o, lse)`` (split-KV reduction; cascade) + launchers.

Three kernels, all folding states with the online-softmax helpers of softmax.py (the only place the
math lives): ``_merge_states_kernel`` folds any number of states per (token, head), one program each,
the states of a block in flight at once (split-KV reduction: few tokens, many states);
``_merge_state_rows_kernel`` folds the states of many rows per program, one state after the other
(``flashtile.cascade.merge_states``: many tokens, few states); ``_merge_state_pair_kernel`` folds
exactly two states held in separate tensors (``merge_state`` and, writing over the first state under
a row mask, ``merge_state_in_place``), many rows per program. An empty state (lse ``-inf``)
contributes nothing, whatever its values hold (they may never have been written: NaN is fine).

_merge_states_kernel, pointer shapes (strides passed; head_dim stride 1):
  V_PARTS   [num_states, T, H, D]   float32 or fp16/bf16 partial outputs (normalized)
  LSE_PARTS [num_states, T, H]      float32, base 2 (-inf for an empty state)
  O         [T, H, D]               merged output (any float dtype), times ``v_scale``
  LSE       [T, H]                  float32 merged lse
With ``STATE_INDPTR`` (batch decode) the states of token ``t`` are rows ``indptr[t]:indptr[t + 1]`` of
V_PARTS ``[items, H, D]`` instead: a token with a single state was written by the attention kernel
directly and is skipped.

_merge_state_pair_kernel, pointer shapes (all strides passed, head_dim too):
  V_A, V_B  [T, H, D]   the two states' outputs (one float dtype)
  S_A, S_B  [T, H]      float32 base-2 lse
  O         [T, H, D]   merged output (may be V_A: in place)
  S_OUT     [T, H]      float32 merged lse (may be S_A)
  MASK      [T]         uint8 (a bool tensor's bytes); rows with 0 are neither read nor written

_merge_state_rows_kernel, pointer shapes (strides passed; head_dim stride 1):
  V         [T, S, H, D]   the states' outputs (any float dtype)
  S         [T, S, H]      float32 base-2 lse
  O         [T, H, D], S_OUT [T, H]
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._core.intmath import cdiv, dot_tile_dim, next_power_of_2
from .._core.launch import LaunchMemo, direct_launch, tensor_key
from .softmax import finalize_state, softmax_update

# Row-tiled merges: elements per state tile ([rows, head_dim]) and warps per program. Module constants
# so that the merge_state suite's tuning grid (benchmarks/bench_cascade.py, --tune) can sweep them on a
# GPU. H100 sweep (8192 tokens x 32 heads x 128, fp16): 2048-element tiles are best for both kernels,
# the pair kernel with 8 warps (74.6 us, 2741 GB/s; torch.add with the same traffic: 72.9 us), the
# state-loop kernel with 4 (4 states: 136 us).
# Cache hints (evict_first loads, .cs stores) measured no gain (74.4-75.6 us).
ROW_TILE_ELEMS = 2048
PAIR_WARPS = 8
STATE_LOOP_WARPS = 4
MAX_UNROLLED_STATES = 8  # merge_states unrolls its state loop (one compile per count) up to this many


@direct_launch
@triton.jit
def _merge_states_kernel(
    V_PARTS, LSE_PARTS, O, LSE, STATE_INDPTR,
    num_states,
    stride_vs, stride_vt, stride_vh,
    stride_ls, stride_lt, stride_lh,
    stride_ot, stride_oh,
    stride_lse_t, stride_lse_h,
    v_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_S: tl.constexpr, HAS_INDPTR: tl.constexpr,
):
    """One program per (token, head). Merging states is online softmax over the states: state ``s``
    is a "key" with logit ``lse_s`` and value ``o_s``; BLOCK_S states are folded per step, so the loads
    of a whole block are in flight at once."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    v_row = V_PARTS + token * stride_vt + head * stride_vh
    l_row = LSE_PARTS + token * stride_lt + head * stride_lh
    s_begin = 0
    s_end = num_states
    if HAS_INDPTR:
        s_begin = tl.load(STATE_INDPTR + token)
        s_end = tl.load(STATE_INDPTR + token + 1)
        # A token of one state folds nothing (CUDA-graph decode launches the merge for every token; on an H100,
        # 64 x 4096 d128, decode plus merge took 370.8 us this way against 381.9 folding a masked tile)
        s_end = tl.where(s_end - s_begin > 1, s_end, s_begin)
    # Vector form (the interpreter rejects block masks combined with scalar bools). Without an indptr
    # every token is merged; with one, a token whose single state was written directly is skipped.
    write = (tl.zeros([1], dtype=tl.int32) + (s_end - s_begin)) > (1 if HAS_INDPTR else 0)

    m_i = tl.full([1], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([1, D_PAD], dtype=tl.float32)
    for s0 in range(s_begin, s_end, BLOCK_S):
        states = s0 + offs_s
        s_ok = states < s_end
        lse_s = tl.load(l_row + states * stride_ls, mask=s_ok, other=float("-inf"))  # [S]
        # An empty state (lse -inf) has weight 0: its values are not read (they may be unwritten).
        read = s_ok & (lse_s > float("-inf"))
        o_s = tl.load(v_row + states[:, None] * stride_vs + offs_d[None, :],
                      mask=read[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [S, D]
        m_i, l_i, acc, p = softmax_update(m_i, l_i, acc, lse_s[None, :])
        acc += tl.sum(tl.reshape(p, [BLOCK_S, 1]) * o_s, axis=0)[None, :]
    o, lse = finalize_state(m_i, l_i, acc)
    tl.store(O + token * stride_ot + head * stride_oh + offs_d[None, :], (o * v_scale).to(O.dtype.element_ty),
             mask=d_ok[None, :] & write[:, None])
    tl.store(LSE + token * stride_lse_t + head * stride_lse_h + tl.zeros([1], dtype=tl.int32), lse, mask=write)


def merge_attention_states(
    v_parts: torch.Tensor,
    lse_parts: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    v_scale: float = 1.0,
    state_indptr: Optional[torch.Tensor] = None,
    max_states: Optional[int] = None,
) -> None:
    """Merge the states of every (token, head) into ``out``/``lse`` (shapes in the module doc).

    ``v_parts`` is ``[num_states, T, H, D]``; or, with ``state_indptr`` (int32 ``[T + 1]``, on the
    device), ``[items, H, D]`` holding token ``t``'s states at rows ``state_indptr[t]:state_indptr[t+1]``
    (``max_states``, a bound on any token's count, sizes the fold width).
    """
    num_tokens, num_heads = out.shape[0], out.shape[1]
    head_dim = v_parts.shape[-1]
    d_pad = dot_tile_dim(head_dim)
    if state_indptr is None:
        num_states = v_parts.shape[0]
        state_strides = (v_parts.stride(0), v_parts.stride(1), v_parts.stride(2))
        lse_strides = (lse_parts.stride(0), lse_parts.stride(1), lse_parts.stride(2))
    else:
        num_states = max_states or 2
        state_strides = (v_parts.stride(0), 0, v_parts.stride(1))
        lse_strides = (lse_parts.stride(0), 0, lse_parts.stride(1))
    block_s = max(2, min(next_power_of_2(num_states), 8192 // d_pad, 64))
    _merge_states_kernel[(num_tokens, num_heads)](
        v_parts, lse_parts, out, lse, state_indptr if state_indptr is not None else lse_parts,
        num_states,
        *state_strides, *lse_strides,
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        float(v_scale),
        HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_S=block_s, HAS_INDPTR=state_indptr is not None, num_warps=4,
    )


@triton.jit
def _fold_state_tile(v_tile, s_tile, row_ok, d_ok, m_i, l_i, acc):
    """Fold one state of a [R, D_PAD] row tile (value pointers ``v_tile``, lse pointers ``s_tile``)
    into the running online-softmax state."""
    lse_s = tl.load(s_tile, mask=row_ok, other=float("-inf"))  # [R]
    # The value load does not wait for the lse load (a second memory round trip per program costs
    # bandwidth); an empty state's values (lse -inf, possibly never written: NaN) are replaced by 0
    # after the load, since its weight 0 times NaN would be NaN.
    o_s = tl.load(v_tile, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    o_s = tl.where((lse_s > float("-inf"))[:, None], o_s, 0.0)  # [R, D]
    m_i, l_i, acc, p = softmax_update(m_i, l_i, acc, lse_s[:, None])
    return m_i, l_i, acc + p * o_s


@direct_launch
@triton.jit
def _merge_state_pair_kernel(
    V_A, S_A, V_B, S_B, O, S_OUT, MASK,
    num_rows, num_heads,
    stride_vat, stride_vah, stride_vad,
    stride_sat, stride_sah,
    stride_vbt, stride_vbh, stride_vbd,
    stride_sbt, stride_sbh,
    stride_ot, stride_oh, stride_od,
    stride_st, stride_sh,
    stride_mask,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_R: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """One program per BLOCK_R rows of the flattened (token, head) grid: a [BLOCK_R, D_PAD] tile of
    each state is read once and the merge is two online-softmax folds (state A, then state B) of one
    "key" each, whose logit is the state's lse and whose value is its output."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [R]
    token = rows // num_heads
    head = rows % num_heads
    row_ok = rows < num_rows
    if HAS_MASK:  # CUDA-graph padding: rows whose token is masked off are left as they are
        row_ok = row_ok & (tl.load(MASK + token * stride_mask, mask=row_ok, other=0) != 0)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, D_PAD], dtype=tl.float32)
    m_i, l_i, acc = _fold_state_tile(
        V_A + token[:, None] * stride_vat + head[:, None] * stride_vah + offs_d[None, :] * stride_vad,
        S_A + token * stride_sat + head * stride_sah, row_ok, d_ok, m_i, l_i, acc)
    m_i, l_i, acc = _fold_state_tile(
        V_B + token[:, None] * stride_vbt + head[:, None] * stride_vbh + offs_d[None, :] * stride_vbd,
        S_B + token * stride_sbt + head * stride_sbh, row_ok, d_ok, m_i, l_i, acc)
    o, lse = finalize_state(m_i, l_i, acc)

    tl.store(O + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
             o.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(S_OUT + token * stride_st + head * stride_sh, lse, mask=row_ok)


# Pair merges replayed per key (the seven tensors' metadata): only the tensors change.
_PAIR_LAUNCHES = LaunchMemo(dynamic=range(7))


def merge_state_pair(
    v_a: torch.Tensor,
    s_a: torch.Tensor,
    v_b: torch.Tensor,
    s_b: torch.Tensor,
    v_out: torch.Tensor,
    s_out: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    launch_key=None,
) -> None:
    """``(v_out, s_out) = merge((v_a, s_a), (v_b, s_b))`` row by row (shapes in the module doc).

    ``v_out``/``s_out`` may be ``v_a``/``s_a`` (in-place merge: each element is read before it is
    written, by the same program). With ``mask`` (bool ``[T]``), tokens whose entry is False are left
    untouched. Any strides. ``launch_key``: the caller's key of these tensors' metadata
    (_core/memo.py), or None to compute one.
    """
    if launch_key is None:
        launch_key = (tensor_key(v_a), tensor_key(s_a), tensor_key(v_b), tensor_key(s_b), tensor_key(v_out),
                      tensor_key(s_out), None if mask is None else tensor_key(mask))
    replay = _PAIR_LAUNCHES.get(launch_key)
    if replay is not None:
        replay(v_a, s_a, v_b, s_b, v_out, s_out, s_a if mask is None else mask.view(torch.uint8))
        return
    num_tokens, num_heads, head_dim = v_out.shape
    num_rows = num_tokens * num_heads
    if num_rows == 0:
        return
    d_pad = dot_tile_dim(head_dim)
    block_r = _row_block(d_pad)
    mask_bytes = mask.view(torch.uint8) if mask is not None else None
    args = (v_a, s_a, v_b, s_b, v_out, s_out, mask_bytes if mask is not None else s_a,
            num_rows, num_heads,
            *v_a.stride(), *s_a.stride(),
            *v_b.stride(), *s_b.stride(),
            *v_out.stride(), *s_out.stride(),
            mask_bytes.stride(0) if mask_bytes is not None else 0)
    _PAIR_LAUNCHES.launch(launch_key, _merge_state_pair_kernel, (cdiv(num_rows, block_r),), args, dict(
        HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_R=block_r, HAS_MASK=mask is not None, num_warps=PAIR_WARPS))


def merge_state_pair_runner(launch_key):
    """``run(v_a, s_a, v_b, s_b, v_out, s_out, mask)``: :func:`merge_state_pair` for tensors of
    ``launch_key``, made once per key by a caller that keeps it in its own memo (the API layer): once the
    launch is recorded, a call replays it without looking the key up again (_core/launch.py's ReplayCell)."""
    cell = _PAIR_LAUNCHES.cell(launch_key)

    def run(v_a, s_a, v_b, s_b, v_out, s_out, mask):
        if not cell.replay(v_a, s_a, v_b, s_b, v_out, s_out, s_a if mask is None else mask.view(torch.uint8)):
            merge_state_pair(v_a, s_a, v_b, s_b, v_out, s_out, mask, launch_key)
            cell.refresh()

    return run


def _row_block(d_pad: int) -> int:
    """Rows per program of the row-tiled merges: ROW_TILE_ELEMS per state tile (16 rows of head_dim 128)."""
    return max(1, min(128, ROW_TILE_ELEMS // d_pad))


@direct_launch
@triton.jit
def _merge_state_rows_kernel(
    V, S, O, S_OUT,
    num_rows, num_heads, num_states,
    stride_vt, stride_vs, stride_vh,
    stride_st, stride_ss, stride_sh,
    stride_ot, stride_oh,
    stride_lt, stride_lh,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_R: tl.constexpr, UNROLLED_STATES: tl.constexpr,
):
    """One program per BLOCK_R rows of the flattened (token, head) grid, folding the row's states one
    after the other: state ``s`` of a block is one [BLOCK_R, D_PAD] tile (contiguous when BLOCK_R rows
    are heads of one token), so each program streams whole tiles instead of one 256-byte row."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [R]
    token = rows // num_heads
    head = rows % num_heads
    row_ok = rows < num_rows
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    v_rows = V + token[:, None] * stride_vt + head[:, None] * stride_vh + offs_d[None, :]
    s_rows = S + token * stride_st + head * stride_sh

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, D_PAD], dtype=tl.float32)
    # A compile-time state count (UNROLLED_STATES > 0) unrolls the loop, so every state's loads are
    # in flight at once; otherwise each iteration waits for its own tile.
    if UNROLLED_STATES > 0:
        for state in tl.static_range(UNROLLED_STATES):
            m_i, l_i, acc = _fold_state_tile(v_rows + state * stride_vs, s_rows + state * stride_ss, row_ok, d_ok,
                                             m_i, l_i, acc)
    else:
        for state in range(num_states):
            m_i, l_i, acc = _fold_state_tile(v_rows + state * stride_vs, s_rows + state * stride_ss, row_ok, d_ok,
                                             m_i, l_i, acc)
    o, lse = finalize_state(m_i, l_i, acc)
    tl.store(O + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(S_OUT + token * stride_lt + head * stride_lh, lse, mask=row_ok)


def merge_states_by_token(v: torch.Tensor, s: torch.Tensor, v_out: torch.Tensor, s_out: torch.Tensor) -> None:
    """Merge ``v [T, S, H, D]`` / ``s [T, S, H]`` (float32) over ``S`` into ``v_out [T, H, D]`` /
    ``s_out [T, H]`` (``v_out`` with unit stride along head_dim) with the row-tiled kernel (a ``v``
    whose head_dim stride is not 1 is copied first). With no state at all the result is 0 and ``-inf``."""
    num_tokens, num_states, num_heads, _ = v.shape
    if num_tokens * num_heads == 0:
        return
    if num_states == 0:  # the kernel writes only tokens that have states
        v_out.zero_()
        s_out.fill_(float("-inf"))
        return
    if v.shape[-1] > 1 and v.stride(-1) != 1:  # the kernel reads head_dim with unit stride
        v = v.contiguous()
    if v_out.shape[-1] > 1 and v_out.stride(-1) != 1:
        raise ValueError(f"v_out: expected unit stride along head_dim, got strides {tuple(v_out.stride())}")
    head_dim = v.shape[-1]
    d_pad = dot_tile_dim(head_dim)
    block_r = _row_block(d_pad)
    _merge_state_rows_kernel[(cdiv(num_tokens * num_heads, block_r),)](
        v, s, v_out, s_out,
        num_tokens * num_heads, num_heads, num_states,
        v.stride(0), v.stride(1), v.stride(2),
        s.stride(0), s.stride(1), s.stride(2),
        v_out.stride(0), v_out.stride(1),
        s_out.stride(0), s_out.stride(1),
        HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_R=block_r,
        UNROLLED_STATES=num_states if num_states <= MAX_UNROLLED_STATES else 0, num_warps=STATE_LOOP_WARPS,
    )
