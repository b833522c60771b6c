"""Prefill and append attention (``flashinfer.prefill``).

This issue provides the single-request functions; the batch wrappers over paged and ragged KV come
next.
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import torch

from ._core import ops
from ._core.attention_args import normalize_single_attention
from ._core.buffers import new_output

__all__ = ["single_prefill_with_kv_cache", "single_prefill_with_kv_cache_return_lse"]


def single_prefill_with_kv_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale_q: Optional[torch.Tensor] = None,
    scale_k: Optional[torch.Tensor] = None,
    scale_v: Optional[torch.Tensor] = None,
    o_dtype: Optional[torch.dtype] = None,
    custom_mask: Optional[torch.Tensor] = None,
    packed_custom_mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    kv_layout: str = "NHD",
    pos_encoding_mode: str = "NONE",
    use_fp16_qk_reduction: bool = False,
    sm_scale: Optional[float] = None,
    window_left: int = -1,
    logits_soft_cap: Optional[float] = None,
    rope_scale: Optional[float] = None,
    rope_theta: Optional[float] = None,
    backend: str = "auto",
    return_lse: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Attention of ``qo_len`` query tokens (the last ones of the sequence) over ``kv_len`` keys.

    Args:
        q: ``[qo_len, num_qo_heads, head_dim_qk]``, float16/bfloat16, unit last stride.
        k: ``[kv_len, num_kv_heads, head_dim_qk]`` (NHD) or ``[num_kv_heads, kv_len, head_dim_qk]``
            (HND); dtype of q, or float8 (its scale folded in through ``sm_scale``).
        v: like k with ``head_dim_vo`` (may differ from head_dim_qk, e.g. 192/128).
        scale_q, scale_k, scale_v: per-head scales of upstream's fp8-q path; accepted and unused
            (flashtile takes fp16/bf16 q).
        o_dtype: output dtype (float16, bfloat16 or float32); default q's dtype.
        custom_mask: bool ``[qo_len, kv_len]``, True = attend; replaces ``causal``.
        packed_custom_mask: the same mask bit-packed row-major, LSB first
            (``packbits(mask.flatten(), "little")``), uint8; takes precedence over custom_mask.
        causal: bottom-right aligned: query ``i`` sits at position ``kv_len - qo_len + i`` and sees keys
            ``<= `` that position; with ``qo_len > kv_len`` the first rows see nothing (output 0,
            lse -inf).
        kv_layout: "NHD" or "HND".
        pos_encoding_mode: "NONE", "ROPE_LLAMA" (in-kernel RoPE of q and k) or "ALIBI".
        use_fp16_qk_reduction: accepted; flashtile always accumulates q.k in float32.
        sm_scale: default ``1 / sqrt(head_dim_qk)``.
        window_left: a query at position p sees keys ``>= p - window_left``; -1 disables.
        logits_soft_cap: ``cap * tanh(logits / cap)`` when > 0.
        rope_scale, rope_theta: RoPE parameters (defaults 1.0 and 1e4).
        backend: "auto", "fa2", "fa3" (all flashtile's kernel), "triton" (force the kernels, under
            the interpreter on CPU), "reference" (pure PyTorch); vendor names raise
            NotImplementedError.
        return_lse: also return the base-2 log-sum-exp.

    Returns:
        ``out [qo_len, num_qo_heads, head_dim_vo]`` and with ``return_lse`` also
        ``lse [qo_len, num_qo_heads]`` float32.
    """
    args = normalize_single_attention(
        q, k, v, kv_layout=kv_layout, pos_encoding_mode=pos_encoding_mode, causal=causal,
        custom_mask=custom_mask, packed_custom_mask=packed_custom_mask, q_scale=None, k_scale=None,
        v_scale=None, window_left=window_left, logits_soft_cap=logits_soft_cap, sm_scale=sm_scale,
        rope_scale=rope_scale, rope_theta=rope_theta, out_dtype=o_dtype, backend=backend,
    )
    qo_len, num_qo_heads, _ = args.q.shape
    out = new_output((qo_len, num_qo_heads, args.v.shape[2]), args.out_dtype, q.device)
    lse = new_output((qo_len, num_qo_heads), torch.float32, q.device)
    ops.call_single_prefill(
        args.q, args.k, args.v, args.packed_mask, out, lse, args.causal, args.sm_scale, args.logits_soft_cap,
        args.window_left, args.pos_encoding_mode, args.rope_scale, args.rope_theta, args.v_scale, args.backend,
    )
    return (out, lse) if return_lse else out


single_prefill_with_kv_cache_return_lse = functools.partial(single_prefill_with_kv_cache, return_lse=True)
single_prefill_with_kv_cache_return_lse.__doc__ = "``single_prefill_with_kv_cache`` with ``return_lse=True``."
