"""Validation and normalization of attention arguments shared by the single-request APIs.

The API functions (decode.py, prefill.py) stay free of checks and math: they call
:func:`normalize_single_attention`, which raises a typed error naming the argument for every bad
input, and returns NHD views plus the resolved scalars that the op and kernels take.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

from .checks import (
    FP8_DTYPES,
    HALF_DTYPES,
    OUTPUT_DTYPES,
    check_option,
    check_same_device,
    check_tensor,
    describe,
    parse_dtype,
)
from .dispatch import normalize_backend
from .fp8_attention import Fp8Scales, check_fp8_qkv_dtypes, fp8_output_dtype, fp8_scales, reject_fp8_features
from .params import AttentionParams

KV_LAYOUTS = ("NHD", "HND")
POS_ENCODING_MODES = ("NONE", "ROPE_LLAMA", "ALIBI")
MAX_HEAD_DIM = 256


@dataclass
class SingleAttentionArgs:
    q: torch.Tensor  # [qo_len, num_qo_heads, head_dim_qk]
    k: torch.Tensor  # [kv_len, num_kv_heads, head_dim_qk] (NHD view)
    v: torch.Tensor  # [kv_len, num_kv_heads, head_dim_vo] (NHD view)
    packed_mask: Optional[torch.Tensor]  # uint8 bits of [qo_len, kv_len], LSB first
    params: AttentionParams  # sm_scale includes q_scale * k_scale
    out_dtype: torch.dtype
    backend: str
    fp8_scales: Optional[Fp8Scales] = None  # fp8 q, k, v: their per-head dequantization scales


def check_head_dim(name: str, head_dim: int) -> None:
    """Every multiple of 8 up to 256 works; 64, 128 and 256 are the tuned sizes."""
    if head_dim % 8 != 0 or not (8 <= head_dim <= MAX_HEAD_DIM):
        raise NotImplementedError(
            f"{name}: unsupported head_dim {head_dim}: flashtile supports multiples of 8 from 8 to {MAX_HEAD_DIM}"
        )


def resolve_scalar(name: str, value, default: float, *, positive: bool = False) -> float:
    """A float parameter (upstream also accepts a 1-element tensor, read once on the host); None gives
    ``default``; ``positive`` also requires a positive finite value."""
    if value is None:
        return default
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}: expected a float or a 1-element tensor, got {describe(value)}")
        value = float(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {describe(value)}")
    value = float(value)
    if positive and not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
    return value


def check_window_and_cap(window_left, logits_soft_cap) -> float:
    """``window_left`` is an int >= -1; returns the soft cap as a float (0 disables)."""
    if isinstance(window_left, bool) or not isinstance(window_left, int) or window_left < -1:
        raise ValueError(f"window_left: expected an int >= -1 (-1 disables the window), got {window_left!r}")
    cap = resolve_scalar("logits_soft_cap", logits_soft_cap, 0.0)
    if cap < 0 or not math.isfinite(cap):
        raise ValueError(f"logits_soft_cap: expected None, 0 or a positive number, got {logits_soft_cap!r}")
    return cap


def resolve_attention_params(
    base: Optional[AttentionParams] = None,
    *,
    head_dim: Optional[int] = None,
    causal: Optional[bool] = None,
    pos_encoding_mode: Optional[str] = None,
    window_left: Optional[int] = None,
    logits_soft_cap=None,
    sm_scale=None,
    rope_scale=None,
    rope_theta=None,
    q_scale=None,
    k_scale=None,
    v_scale=None,
) -> AttentionParams:
    """The one place attention parameters get their defaults and checks.

    Without ``base``: parameters from the given values, None meaning the default (causal False,
    pos_encoding_mode "NONE", window_left -1, no soft cap, ``sm_scale = 1 / sqrt(head_dim)``, rope_scale 1,
    rope_theta 1e4). With ``base`` (a plan's parameters): those, and only the calibration scales below apply.
    ``q_scale * k_scale`` multiply sm_scale; ``v_scale`` multiplies the output (floats or 1-element tensors).
    """
    if base is None:
        assert head_dim is not None, "resolve_attention_params: head_dim is needed without base"
        mode = "NONE" if pos_encoding_mode is None else pos_encoding_mode
        check_option("pos_encoding_mode", mode, POS_ENCODING_MODES)
        window = -1 if window_left is None else window_left
        cap = check_window_and_cap(window, logits_soft_cap)
        base = AttentionParams(
            sm_scale=resolve_scalar("sm_scale", sm_scale, 1.0 / math.sqrt(head_dim), positive=True),
            causal=bool(causal), logits_soft_cap=cap, window_left=window, pos_encoding_mode=mode,
            rope_scale=resolve_scalar("rope_scale", rope_scale, 1.0, positive=True),
            rope_theta=resolve_scalar("rope_theta", rope_theta, 1e4, positive=True))
    if q_scale is None and k_scale is None and v_scale is None:
        return base
    scale = base.sm_scale * resolve_scalar("q_scale", q_scale, 1.0) * resolve_scalar("k_scale", k_scale, 1.0)
    return dataclasses.replace(base, sm_scale=scale, v_scale=resolve_scalar("v_scale", v_scale, 1.0))


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    # Kernels need unit stride on the head dim only; any other strides (slices of a fused QKV
    # projection, HND views) are passed through without a copy.
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def normalize_single_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kv_layout: str,
    pos_encoding_mode: str,
    causal: bool,
    custom_mask: Optional[torch.Tensor],
    packed_custom_mask: Optional[torch.Tensor],
    q_scale,
    k_scale,
    v_scale,
    window_left: int,
    logits_soft_cap: Optional[float],
    sm_scale: Optional[float],
    rope_scale: Optional[float],
    rope_theta: Optional[float],
    out_dtype: Optional[torch.dtype],
    backend: str,
    scales: Optional[tuple] = None,
    has_variant: bool = False,
) -> SingleAttentionArgs:
    """Check and normalize; ``q`` is ``[qo_len, num_qo_heads, head_dim_qk]`` here (decode adds the axis).
    ``scales``: ``(scale_q, scale_k, scale_v)`` of an fp8-q call (single prefill), used when q is fp8;
    None: fp8 q is refused (decode). ``has_variant``: the call has an attention variant or sinks."""
    check_option("kv_layout", kv_layout, KV_LAYOUTS)
    check_option("pos_encoding_mode", pos_encoding_mode, POS_ENCODING_MODES)
    backend = normalize_backend(backend)
    check_tensor("q", q, ndim=3)
    check_tensor("k", k, ndim=3)
    check_tensor("v", v, ndim=3)
    fp8_q = q.dtype in FP8_DTYPES
    if fp8_q and scales is None:
        raise NotImplementedError("q: fp8 queries are not supported here; pass fp16/bf16 q (fp8 K/V are supported)")
    if fp8_q:
        check_fp8_qkv_dtypes(q.dtype, k.dtype, v.dtype)
        reject_fp8_features(pos_encoding_mode, has_variant)
    else:
        check_tensor("q", q, dtypes=HALF_DTYPES)
    check_tensor("k", k, dtypes=HALF_DTYPES + FP8_DTYPES)
    check_tensor("v", v, dtypes=(k.dtype,))
    if k.dtype not in FP8_DTYPES and k.dtype != q.dtype:
        raise TypeError(f"k: expected dtype {q.dtype} (the dtype of q) or an fp8 dtype, got {k.dtype}")
    check_same_device(q=q, k=k, v=v)

    if kv_layout == "HND":  # [heads, tokens, dim] -> NHD view, no copy
        k, v = k.transpose(0, 1), v.transpose(0, 1)
    qo_len, num_qo_heads, head_dim_qk = q.shape
    kv_len, num_kv_heads, _ = k.shape
    if v.shape[0] != kv_len or v.shape[1] != num_kv_heads:
        raise ValueError(
            f"v: expected {kv_len} tokens and {num_kv_heads} heads like k (layout {kv_layout}), "
            f"got {v.shape[0]} tokens and {v.shape[1]} heads"
        )
    if k.shape[2] != head_dim_qk:
        raise ValueError(f"k: expected head_dim {head_dim_qk} (the head_dim of q), got {k.shape[2]}")
    head_dim_vo = v.shape[2]
    if num_kv_heads == 0 or num_qo_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_qo_heads ({num_qo_heads}, from q) must be a positive multiple of num_kv_heads "
            f"({num_kv_heads}, from k)"
        )
    check_head_dim("q", head_dim_qk)
    check_head_dim("v", head_dim_vo)

    mask = None
    if packed_custom_mask is not None:
        check_tensor("packed_custom_mask", packed_custom_mask, ndim=1, dtypes=(torch.uint8,))
        want = (qo_len * kv_len + 7) // 8
        if packed_custom_mask.numel() < want:
            raise ValueError(
                f"packed_custom_mask: expected at least {want} bytes for a [{qo_len}, {kv_len}] mask, "
                f"got {packed_custom_mask.numel()}"
            )
        check_same_device(q=q, packed_custom_mask=packed_custom_mask)
        mask = packed_custom_mask.contiguous()
    elif custom_mask is not None:
        check_tensor("custom_mask", custom_mask, shape=(qo_len, kv_len))
        check_same_device(q=q, custom_mask=custom_mask)
        from ..reference.packbits import packbits

        mask = packbits(custom_mask.reshape(-1).to(torch.bool), bitorder="little")

    params = resolve_attention_params(
        None, head_dim=head_dim_qk, causal=causal, pos_encoding_mode=pos_encoding_mode, window_left=window_left,
        logits_soft_cap=logits_soft_cap, sm_scale=sm_scale, rope_scale=rope_scale, rope_theta=rope_theta)
    params = resolve_attention_params(params, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale)

    if fp8_q:
        assert scales is not None
        out_dtype = fp8_output_dtype("o_dtype", out_dtype)
        scale_q, scale_k, scale_v = scales
        fp8 = fp8_scales(scale_q, scale_k, scale_v, num_qo_heads, num_kv_heads, q.device)
    else:
        out_dtype = q.dtype if out_dtype is None else parse_dtype("o_dtype", out_dtype, OUTPUT_DTYPES)
        fp8 = None

    return SingleAttentionArgs(
        q=_unit_last_stride(q),
        k=_unit_last_stride(k),
        v=_unit_last_stride(v),
        packed_mask=mask,
        params=params,
        out_dtype=out_dtype,
        backend=backend,
        fp8_scales=fp8,
    )
