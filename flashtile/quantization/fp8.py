"""FP8 quantization with float32 scales, per tensor or per token (flashtile extensions).

Upstream FlashInfer has no public per-tensor/per-token FP8 quantizer (its FP8 APIs take already
quantized tensors and their scales, e.g. ``bmm_fp8``, ``k_scale``); these two functions produce
exactly what those APIs consume. They run on the device of their input with vectorized PyTorch
ops (the implementation is :mod:`flashtile.reference.quant_fp8`; an elementwise pass, memory-bound,
no separate Triton kernel).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .._core.checks import FP8_DTYPES, check_tensor, describe
from ..reference import quant_fp8 as _ref

__all__ = ["fp8_quantize", "fp8_dequantize", "FP8_MAX"]

FP8_MAX = _ref.FP8_MAX
_FLOAT_INPUTS = (torch.float16, torch.bfloat16, torch.float32)
_SCALE_DTYPES = (torch.float32,)


def _check_fp8_dtype(name: str, dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or dtype not in FP8_DTYPES:
        raise TypeError(f"{name}: expected torch.float8_e4m3fn or torch.float8_e5m2, got {describe(dtype)}")
    return dtype


def _scale_tensor(scale, x: torch.Tensor, per_token: bool) -> torch.Tensor:
    """A given scale as a float32 tensor that broadcasts against ``x`` (per tensor or per row)."""
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        if not (scale > 0 and scale != float("inf")):
            raise ValueError(f"scale: expected a positive finite number, got {scale!r}")
        t = torch.tensor([float(scale)], dtype=torch.float32, device=x.device)
        return t.expand(x.shape[:-1] + (1,)).contiguous() if per_token else t
    check_tensor("scale", scale, dtypes=_SCALE_DTYPES)
    if scale.device != x.device:
        raise ValueError(f"scale: expected a tensor on {x.device} (the input's device), got one on {scale.device}")
    per_row = x.shape[:-1] + (1,)
    if scale.numel() == 1:
        return scale.reshape(1).expand(per_row).contiguous() if per_token else scale.reshape(1)
    if per_token and tuple(scale.shape) == tuple(per_row):
        return scale
    want = f"one element or {list(per_row)}" if per_token else "one element"
    raise ValueError(f"scale: expected {want} for input of shape {list(x.shape)}, got shape {list(scale.shape)}")


def fp8_quantize(
    x: torch.Tensor,
    dtype: torch.dtype = torch.float8_e4m3fn,
    scale: Optional[Union[float, torch.Tensor]] = None,
    per_token: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to FP8 with a float32 scale (flashtile extension; no upstream counterpart).

    ``q = round(clamp(x / scale, -max, max))`` with ``max`` = 448 (e4m3fn) or 57344 (e5m2),
    round-to-nearest-even in float32, so that ``x ~= q.float() * scale``.

    Args:
        x: tensor ``[..., D]`` (at least 1-D), float16, bfloat16 or float32, any strides.
        dtype: ``torch.float8_e4m3fn`` (default) or ``torch.float8_e5m2``.
        scale: the dequantization scale. ``None`` (default): computed from the data, ``amax / max``
            over the finite values of the whole tensor (or of each row of the last dimension with
            ``per_token``), 1.0 where that amax is 0. Or given: a positive Python number, a float32
            tensor with one element, or (``per_token``) a float32 tensor ``x.shape[:-1] + (1,)``,
            on ``x``'s device (a static scale; its values are not checked).
        per_token: one scale per row (the last dimension is the token's feature dimension).

    Returns:
        ``(q, scale)``: ``q`` of ``dtype`` with ``x``'s shape (contiguous); ``scale`` float32
        ``[1]`` (per tensor) or ``x.shape[:-1] + (1,)`` (per token) -- the scale used.

    Saturation and special values: finite values beyond the range clamp to ``+-max`` (never to
    NaN, unlike a plain ``.to(float8_e4m3fn)``); ``+-inf`` become ``+-max``; NaN stays NaN (both
    formats encode NaN). A dynamic scale ignores inf/NaN when taking the amax.

    Raises:
        TypeError: ``x`` is not a float16/bfloat16/float32 tensor, ``dtype`` is not an FP8 dtype,
            or ``scale`` is a tensor that is not float32.
        ValueError: ``x`` is 0-D, ``scale`` has the wrong shape or device, or a number that is not
            positive and finite.
    """
    check_tensor("x", x, dtypes=_FLOAT_INPUTS)
    if x.dim() < 1:
        raise ValueError(f"x: expected at least a 1-D tensor [..., D], got shape {list(x.shape)}")
    dtype = _check_fp8_dtype("dtype", dtype)
    if not isinstance(per_token, bool):
        raise TypeError(f"per_token: expected a bool, got {describe(per_token)}")
    s = _ref.fp8_dynamic_scale(x, dtype, per_token) if scale is None else _scale_tensor(scale, x, per_token)
    return _ref.fp8_quantize(x, s, dtype), s


def fp8_dequantize(
    q: torch.Tensor, scale: Union[float, torch.Tensor], out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``q.float() * scale`` rounded to ``out_dtype`` (flashtile extension; inverse of :func:`fp8_quantize`).

    Args:
        q: float8_e4m3fn or float8_e5m2 tensor ``[..., D]``.
        scale: positive Python number, float32 tensor with one element, or float32
            ``q.shape[:-1] + (1,)`` (per token), on ``q``'s device.
        out_dtype: float32 (default), float16 or bfloat16.

    Returns:
        tensor of ``out_dtype`` with ``q``'s shape. NaN codes give NaN.

    Raises:
        TypeError: ``q`` is not FP8, ``out_dtype`` is not a float dtype, or ``scale`` is a
            non-float32 tensor.
        ValueError: ``scale`` has the wrong shape or device, or is a non-positive number.
    """
    check_tensor("q", q, dtypes=FP8_DTYPES)
    if q.dim() < 1:
        raise ValueError(f"q: expected at least a 1-D tensor [..., D], got shape {list(q.shape)}")
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in _FLOAT_INPUTS:
        raise TypeError(
            f"out_dtype: expected torch.float32, torch.float16 or torch.bfloat16, got {describe(out_dtype)}"
        )
    s = _scale_tensor(scale, q, per_token=True)
    return _ref.fp8_dequantize(q, s, out_dtype)
