"""Argument checks of FP8 attention (q, k and v all float8, upstream's fa3 fp8 path): the dequantization
scales and the options that combine with fp8 queries. No math here: the kernels and the reference apply
the scales (kernels/tiles.py ``fp8_row_scales``, reference/attention.py ``dequantize_heads``).

Semantics (FlashInfer's ``scale_q``, ``scale_k``, ``scale_v``): the real tensors are ``q * scale_q``,
``k * scale_k``, ``v * scale_v`` with one float32 scale per head (``[num_qo_heads]`` for q,
``[num_kv_heads]`` for k and v) or one for the whole tensor (``[1]`` or 0-d); None means 1.0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import FP8_DTYPES, OUTPUT_DTYPES, describe, parse_dtype

__all__ = ["Fp8Scales", "fp8_scales", "check_fp8_qkv_dtypes", "fp8_output_dtype", "reject_fp8_features"]

@dataclass(frozen=True)
class Fp8Scales:
    """Per-head float32 scales as views (a per-tensor scale is a stride-0 view: nothing is allocated).
    q: ``[num_qo_heads]``; k, v: ``[num_kv_heads]``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor

    def as_tuple(self) -> tuple:
        return self.q, self.k, self.v


_ONES: dict = {}


def _one(device: torch.device) -> torch.Tensor:
    """A float32 1.0 on ``device``, made once (the default scale; run() must not allocate)."""
    one = _ONES.get(device)
    if one is None:
        one = _ONES[device] = torch.ones(1, dtype=torch.float32, device=device)
    return one


def _scale(name: str, scale, heads: int, heads_name: str, device: torch.device) -> torch.Tensor:
    if scale is None:
        return _one(device).expand(heads)
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"{name}: expected a float32 tensor of shape [{heads}] ({heads_name}) or [1], "
                        f"got {describe(scale)}")
    if scale.dtype != torch.float32:
        raise TypeError(f"{name}: expected dtype torch.float32, got {scale.dtype}")
    if scale.dim() > 1 or scale.numel() not in (1, heads):
        raise ValueError(f"{name}: expected shape [{heads}] (one scale per head of {heads_name}) or [1] (one "
                         f"for the tensor), got {list(scale.shape)}")
    if scale.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (q's device), got {scale.device}")
    return scale.reshape(1).expand(heads) if scale.numel() == 1 else scale


def fp8_scales(scale_q, scale_k, scale_v, num_qo_heads: int, num_kv_heads: int, device: torch.device) -> Fp8Scales:
    """The checked scales as ``[heads]`` float32 views (None: 1.0)."""
    return Fp8Scales(_scale("scale_q", scale_q, num_qo_heads, "q (num_qo_heads)", device),
                     _scale("scale_k", scale_k, num_kv_heads, "k (num_kv_heads)", device),
                     _scale("scale_v", scale_v, num_kv_heads, "v (num_kv_heads)", device))


def check_fp8_qkv_dtypes(q_dtype: torch.dtype, k_dtype: torch.dtype, v_dtype: torch.dtype,
                         names=("q", "k", "v")) -> None:
    """fp8 q needs k and v of the same fp8 dtype (e4m3fn or e5m2); both dots then run on fp8 tensor cores."""
    if q_dtype not in FP8_DTYPES:
        raise TypeError(f"{names[0]}: expected float8_e4m3fn or float8_e5m2, got {q_dtype}")
    for name, dtype in zip(names[1:], (k_dtype, v_dtype)):
        if dtype != q_dtype:
            raise TypeError(f"{name}: with fp8 q ({q_dtype}) expected {q_dtype} (q, k and v share one fp8 dtype), "
                            f"got {dtype}")


def fp8_output_dtype(name: str, value) -> torch.dtype:
    """The output dtype of an fp8-q attention (a dtype or its name). It must be given: upstream's default,
    q's dtype, would be an fp8 output, which neither upstream's fa3 module nor flashtile writes."""
    dtype = None if value is None else parse_dtype(name, value)
    if dtype is None or dtype in FP8_DTYPES:
        raise NotImplementedError(f"{name}: an fp8 output is not supported; with fp8 q pass {name}=torch.bfloat16 "
                                  f"(or float16, float32), got {dtype}")
    return parse_dtype(name, dtype, OUTPUT_DTYPES)


def reject_fp8_features(pos_encoding_mode: str, has_variant: bool) -> None:
    """Options fp8 q does not combine with (upstream's fa3 fp8 path has none of them either)."""
    if pos_encoding_mode != "NONE":
        raise NotImplementedError(f"pos_encoding_mode: {pos_encoding_mode!r} with fp8 q is not supported (apply "
                                  "RoPE before quantizing q and k); use 'NONE'")
    if has_variant:
        raise NotImplementedError("fp8 q with an attention variant (jit_args, sinks) is not supported")
