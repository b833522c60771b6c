"""Merging attention states ``(o, lse)`` (split-KV reduction; cascade reuses it) + launcher.

Pointer shapes (strides passed):
  V_PARTS   [num_states, T, H, D]   float32 or fp16/bf16 partial outputs (normalized)
  LSE_PARTS [num_states, T, H]      float32, base 2 (-inf for an empty state)
  O         [T, H, D]               merged output (any float dtype), times ``v_scale``
  LSE       [T, H]                  float32 merged lse
With ``STATE_INDPTR`` (batch decode) the states of token ``t`` are rows ``indptr[t]:indptr[t + 1]`` of
V_PARTS ``[items, H, D]`` instead: a token with a single state was written by the attention kernel
directly and is skipped.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .softmax import finalize_state, softmax_update


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
        o_s = tl.load(v_row + states[:, None] * stride_vs + offs_d[None, :],
                      mask=s_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [S, D]
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
    d_pad = max(16, triton.next_power_of_2(head_dim))
    if state_indptr is None:
        num_states = v_parts.shape[0]
        state_strides = (v_parts.stride(0), v_parts.stride(1), v_parts.stride(2))
        lse_strides = (lse_parts.stride(0), lse_parts.stride(1), lse_parts.stride(2))
    else:
        num_states = max_states or 2
        state_strides = (v_parts.stride(0), 0, v_parts.stride(1))
        lse_strides = (lse_parts.stride(0), 0, lse_parts.stride(1))
    block_s = max(2, min(triton.next_power_of_2(num_states), 8192 // d_pad, 64))
    _merge_states_kernel[(num_tokens, num_heads)](
        v_parts, lse_parts, out, lse, state_indptr if state_indptr is not None else lse_parts,
        num_states,
        *state_strides, *lse_strides,
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        float(v_scale),
        HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_S=block_s, HAS_INDPTR=state_indptr is not None, num_warps=4,
    )
