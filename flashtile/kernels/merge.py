"""Merging attention states ``(o, lse)`` (split-KV reduction; cascade reuses it) + launcher.

Pointer shapes (strides passed):
  V_PARTS   [num_states, T, H, D]   float32 or fp16/bf16 partial outputs (normalized)
  LSE_PARTS [num_states, T, H]      float32, base 2 (-inf for an empty state)
  O         [T, H, D]               merged output (any float dtype), times ``v_scale``
  LSE       [T, H]                  float32 merged lse
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .softmax import finalize_state, merge_update


@triton.jit
def _merge_states_kernel(
    V_PARTS, LSE_PARTS, O, LSE,
    num_states, num_heads,
    stride_vs, stride_vt, stride_vh,
    stride_ls, stride_lt, stride_lh,
    stride_ot, stride_oh,
    stride_lse_t, stride_lse_h,
    v_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    offs_d = tl.arange(0, D_PAD)
    head_ok = heads < num_heads
    mask = head_ok[:, None] & (offs_d[None, :] < HEAD_DIM)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, D_PAD], dtype=tl.float32)
    v_row = V_PARTS + token.to(tl.int64) * stride_vt + heads[:, None] * stride_vh + offs_d[None, :]
    l_row = LSE_PARTS + token.to(tl.int64) * stride_lt + heads * stride_lh
    for s in range(0, num_states):
        lse_s = tl.load(l_row + s * stride_ls, mask=head_ok, other=float("-inf"))
        o_s = tl.load(v_row + s * stride_vs, mask=mask, other=0.0).to(tl.float32)
        m_i, l_i, acc = merge_update(m_i, l_i, acc, o_s, lse_s)
    o, lse = finalize_state(m_i, l_i, acc)
    tl.store(O + token * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             (o * v_scale).to(O.dtype.element_ty), mask=mask)
    tl.store(LSE + token * stride_lse_t + heads * stride_lse_h, lse, mask=head_ok)


def merge_attention_states(
    v_parts: torch.Tensor, lse_parts: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *, v_scale: float = 1.0
) -> None:
    """Merge ``num_states`` states per (token, head) into ``out``/``lse`` (shapes in the module doc)."""
    num_states, num_tokens, num_heads, head_dim = v_parts.shape
    d_pad = max(16, triton.next_power_of_2(head_dim))
    block_h = max(1, min(triton.next_power_of_2(num_heads), 8192 // d_pad, 16))
    grid = (num_tokens, triton.cdiv(num_heads, block_h))
    _merge_states_kernel[grid](
        v_parts, lse_parts, out, lse,
        num_states, num_heads,
        v_parts.stride(0), v_parts.stride(1), v_parts.stride(2),
        lse_parts.stride(0), lse_parts.stride(1), lse_parts.stride(2),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        float(v_scale),
        HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_H=block_h, num_warps=4,
    )
