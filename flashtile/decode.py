"""Decode attention (``flashinfer.decode``): one query token per request against its KV cache.

This issue provides :func:`single_decode_with_kv_cache`; the batch wrappers over paged KV come next.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ._core import ops
from ._core.attention_args import normalize_single_attention
from ._core.buffers import new_output

__all__ = ["single_decode_with_kv_cache"]


def single_decode_with_kv_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layout: str = "NHD",
    pos_encoding_mode: str = "NONE",
    use_tensor_cores: bool = False,
    q_scale: Optional[float] = None,
    k_scale: Optional[float] = None,
    v_scale: Optional[float] = None,
    window_left: int = -1,
    logits_soft_cap: Optional[float] = None,
    sm_scale: Optional[float] = None,
    rope_scale: Optional[float] = None,
    rope_theta: Optional[float] = None,
    return_lse: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Attention of one query token (the newest position) over a whole KV sequence.

    Args:
        q: ``[num_qo_heads, head_dim]``, float16 or bfloat16; any strides with a unit last stride.
        k: ``[kv_len, num_kv_heads, head_dim]`` (NHD) or ``[num_kv_heads, kv_len, head_dim]`` (HND);
            float16/bfloat16 like q, or float8 (e4m3fn, e5m2) storing ``real / k_scale``.
        v: same layout and dtype as k (its head_dim may differ from q's).
        kv_layout: "NHD" or "HND".
        pos_encoding_mode: "NONE", "ROPE_LLAMA" (rotate q and k in the kernel; k is the un-rotated
            cache; q at position ``kv_len - 1``) or "ALIBI".
        use_tensor_cores: accepted for compatibility; flashtile's decode kernel always uses tensor
            cores (query heads of a GQA group form the rows of one matrix product).
        q_scale, k_scale: calibration scales (floats) multiplied into ``sm_scale``.
        v_scale: calibration scale multiplied into the output.
        window_left: the query sees the last ``window_left + 1`` keys; -1 disables.
        logits_soft_cap: ``cap * tanh(logits / cap)`` when > 0; None or 0 disables.
        sm_scale: default ``1 / sqrt(head_dim)``.
        rope_scale, rope_theta: RoPE parameters (defaults 1.0 and 1e4).
        return_lse: also return the base-2 log-sum-exp of the scaled logits.

    Returns:
        ``out [num_qo_heads, head_dim_vo]`` in q's dtype, and with ``return_lse`` also
        ``lse [num_qo_heads]`` float32 (``-inf`` and a zero output when kv_len is 0).

    GQA: query head ``h`` reads KV head ``h // (num_qo_heads // num_kv_heads)``.
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 2:
        from ._core.checks import check_tensor

        check_tensor("q", q, ndim=2)
    args = normalize_single_attention(
        q.unsqueeze(0), k, v, kv_layout=kv_layout, pos_encoding_mode=pos_encoding_mode, causal=False,
        custom_mask=None, packed_custom_mask=None, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale,
        window_left=window_left, logits_soft_cap=logits_soft_cap, sm_scale=sm_scale, rope_scale=rope_scale,
        rope_theta=rope_theta, out_dtype=None, backend="auto",
    )
    num_qo_heads = q.shape[0]
    out = new_output((1, num_qo_heads, args.v.shape[2]), args.out_dtype, q.device)
    lse = new_output((1, num_qo_heads), torch.float32, q.device)
    ops.call_single_decode(
        args.q, args.k, args.v, out, lse, args.sm_scale, args.logits_soft_cap, args.window_left,
        args.pos_encoding_mode, args.rope_scale, args.rope_theta, args.v_scale, args.backend,
    )
    if return_lse:
        return out[0], lse[0]
    return out[0]
