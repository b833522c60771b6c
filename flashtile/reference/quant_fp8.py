"""FP8 quantization with float32 scales: the readable spec and the implementation on any device.

Pure PyTorch, vectorized; runs on the device of its input. Inputs are assumed valid: the API layer
(``flashtile.quantization.fp8``) checks them.

Scale convention (as ``bmm_fp8``'s ``A_scale``): ``scale`` is the *dequantization* multiplier,
``x ~= float(q) * scale``. Quantization computes ``x / scale`` in float32, clamps it to the format's
finite range ``[-max, max]`` (saturation: no overflow to NaN/inf) and rounds to nearest, ties to even,
in float32 arithmetic (``round_to_fp8_grid``), so that every device gives the same bytes: PyTorch's
float32 -> float8 cast is exact on the CPU but rounds twice (through float16) on some CUDA builds,
which moves ~0.1-0.3% of values by one fp8 step. NaN stays NaN (both formats encode NaN); +-inf saturates to +-max.

A dynamic scale is ``amax / max`` over the finite values (per tensor, or per row of the last
dimension for per-token), and 1.0 where that amax is 0 (all-zero or all-non-finite input), so that
the scale is always finite and positive.
"""

from __future__ import annotations

import torch

__all__ = ["FP8_MAX", "round_to_fp8_grid", "fp8_dynamic_scale", "fp8_quantize", "fp8_dequantize"]

#: Largest finite value of each float8 format (e4m3fn: 1.75 * 2^8; e5m2: 1.75 * 2^15).
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}

#: (mantissa bits, exponent of the smallest normal) of each float8 format.
_FP8_GRID = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}


def round_to_fp8_grid(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 ``y`` (already within the format's finite range) rounded to the nearest value of
    float8 ``dtype``, ties to even, returned as ``dtype``. The rounding is float32 arithmetic (scaling
    by a power of two and ``torch.round`` are exact), so the final cast only re-encodes a value the
    format holds exactly. NaN stays NaN."""
    mantissa_bits, min_exponent = _FP8_GRID[dtype]
    _, exponent = torch.frexp(y)  # |y| = m * 2^exponent with m in [0.5, 1)
    step_exponent = (exponent - 1).clamp(min=min_exponent) - mantissa_bits  # subnormals share the last step
    return torch.ldexp(torch.round(torch.ldexp(y, -step_exponent)), step_exponent).to(dtype)


def fp8_dynamic_scale(x: torch.Tensor, dtype: torch.dtype, per_token: bool) -> torch.Tensor:
    """float32 dequantization scale: ``[1]`` (per tensor) or ``x.shape[:-1] + (1,)`` (per token)."""
    a = x.float().abs()
    a = torch.where(torch.isfinite(a), a, torch.zeros((), dtype=a.dtype, device=a.device))
    if per_token:
        amax = a.amax(dim=-1, keepdim=True) if a.numel() else a.new_zeros(a.shape[:-1] + (1,))
    else:
        amax = (a.amax() if a.numel() else a.new_zeros(())).reshape(1)
    # a tensor divisor: CUDA divides by a Python scalar as a multiply by its rounded reciprocal, the CPU
    # divides exactly, and the bytes must not depend on the device
    scale = amax / amax.new_full((), FP8_MAX[dtype])
    return torch.where(amax > 0, scale, torch.ones((), dtype=scale.dtype, device=scale.device))


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``clamp(x / scale, -max, max)`` rounded to ``dtype`` (RNE); ``scale`` broadcasts against ``x``."""
    fmax = FP8_MAX[dtype]
    y = x.float() / scale.float()
    return round_to_fp8_grid(y.clamp(-fmax, fmax), dtype)  # clamp keeps NaN; inf saturates


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``float(q) * scale`` in float32, rounded to ``out_dtype``."""
    return (q.float() * scale.float()).to(out_dtype)
