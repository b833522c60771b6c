"""Positional encodings used inside attention: RoPE (half-split, "LLaMA" style) and ALiBi slopes.

Pure PyTorch; no Triton. These are the readable definitions the kernels must match.
"""

from __future__ import annotations

import math

import torch

__all__ = ["alibi_slopes", "rope_inverse_frequencies", "rope_rotate_half_split"]


def alibi_slopes(num_heads: int, device=None) -> torch.Tensor:
    """ALiBi slopes, float32 ``[num_heads]``.

    With ``n = 2**floor(log2(num_heads))``, head ``h < n`` gets ``2**(-8 (h + 1) / n)``; the remaining
    heads get ``2**(-4 (2 m + 1) / n)`` for ``m = 0, 1, ...`` (the standard recipe for head counts that
    are not powers of two).
    """
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads: expected a positive int, got {num_heads!r}")
    n = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]
    slopes += [2.0 ** (-4.0 * (2 * m + 1) / n) for m in range(num_heads - n)]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


def rope_inverse_frequencies(rotary_dim: int, rope_scale: float, rope_theta: float, dtype=torch.float64) -> torch.Tensor:
    """Frequency of pair ``m`` (``0 <= m < rotary_dim/2``): ``theta**(-2m/rotary_dim) / rope_scale``."""
    m = torch.arange(rotary_dim // 2, dtype=dtype)
    return rope_theta ** (-2.0 * m / rotary_dim) / rope_scale


def rope_rotate_half_split(x: torch.Tensor, positions: torch.Tensor, rope_scale: float, rope_theta: float) -> torch.Tensor:
    """Rotate the last dim of ``x [..., tokens, heads, D]`` by angle ``position * freq``.

    Half-split ("NeoX") pairing: dimension ``d`` pairs with ``d + D/2``. ``positions`` is ``[tokens]``.
    Computed in float32 (or float64 when ``x`` is float64); returns the dtype of the computation.
    """
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    d = x.shape[-1]
    inv_freq = rope_inverse_frequencies(d, rope_scale, rope_theta, dtype=work).to(x.device)
    angle = positions.to(work)[:, None] * inv_freq[None, :]  # [tokens, D/2]
    cos = torch.cat([angle.cos(), angle.cos()], dim=-1)[:, None, :]  # [tokens, 1, D]
    sin = torch.cat([angle.sin(), angle.sin()], dim=-1)[:, None, :]
    xf = x.to(work)
    rotated = torch.cat([-xf[..., d // 2 :], xf[..., : d // 2]], dim=-1)
    return xf * cos + rotated * sin
