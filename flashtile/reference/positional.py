"""Positional encodings: RoPE (half-split "NeoX" and interleaved "GPT-J" pairing, linear scaling,
Llama 3.1 frequency smoothing, precomputed cos/sin caches) and ALiBi slopes.

Pure PyTorch; no Triton. These are the readable definitions the kernels must match: attention's
in-kernel RoPE (``pos_encoding_mode="ROPE_LLAMA"``) and the standalone ``flashtile.rope`` ops.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = [
    "alibi_slopes",
    "llama31_smoothing",
    "rope_inverse_frequencies",
    "rope_cos_sin",
    "rope_positions",
    "rotate_pairs",
    "rope_rotate_half_split",
    "apply_rope_reference",
]


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


def llama31_smoothing(low_freq_factor: float, high_freq_factor: float, old_context_len: float) -> tuple[float, float]:
    """Coefficients ``(a, b)`` of the Llama 3.1 blend ``smooth = clamp(a * f + b, 0, 1)``.

    ``a = old_context_len / (2 pi (high - low))`` and ``b = -low / (high - low)``, so ``smooth`` is 0 for
    wavelengths ``2 pi / f`` above ``old_context_len / low`` (fully scaled), 1 below
    ``old_context_len / high`` (unscaled) and linear in ``old_context_len / wavelength`` between.
    Plain RoPE is ``a = b = 0``.
    """
    span = float(high_freq_factor) - float(low_freq_factor)
    return float(old_context_len) / (2.0 * math.pi * span), -float(low_freq_factor) / span


def rope_inverse_frequencies(
    rotary_dim: int, rope_scale: float, rope_theta: float, dtype=torch.float64, smooth_a: float = 0.0,
    smooth_b: float = 0.0,
) -> torch.Tensor:
    """Frequency of pair ``m`` (``0 <= m < rotary_dim/2``), ``[rotary_dim // 2]`` in ``dtype``.

    ``f = theta**(-2m/rotary_dim)``; ``smooth = clamp(smooth_a * f + smooth_b, 0, 1)``;
    result ``(1 - smooth) * f / rope_scale + smooth * f`` (``f / rope_scale`` for plain RoPE).
    """
    m = torch.arange(rotary_dim // 2, dtype=dtype, device="cpu")  # rope_cos_sin moves it to the positions
    f = rope_theta ** (-2.0 * m / rotary_dim)
    smooth = (smooth_a * f + smooth_b).clamp(0.0, 1.0)
    return (1.0 - smooth) * f / rope_scale + smooth * f


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of ``positions[t] * inv_freq[m]``, each ``[tokens, rotary_dim // 2]`` in
    inv_freq's dtype."""
    angle = positions.to(inv_freq.dtype)[:, None] * inv_freq.to(positions.device)[None, :]
    return angle.cos(), angle.sin()


def rope_positions(nnz: int, pos_ids=None, indptr=None, offsets=None, device=None) -> torch.Tensor:
    """Position of every token, int64 ``[nnz]``: ``pos_ids`` as given, or for ragged batches token ``t`` of
    segment ``i`` (rows ``indptr[i]:indptr[i+1]``) at ``offsets[i] + t - indptr[i]``."""
    if pos_ids is not None:
        return pos_ids.to(torch.int64)
    indptr = indptr.to(torch.int64)
    lengths = indptr[1:] - indptr[:-1]
    start = (offsets.to(torch.int64) - indptr[:-1]).to(device)
    return torch.arange(nnz, device=device) + torch.repeat_interleave(start, lengths.to(device), output_size=nnz)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate each pair ``(a, b)`` of the last dim of ``x`` by the angle whose cos/sin are given:
    ``(a cos - b sin, b cos + a sin)``. Pair ``m`` is ``(2m, 2m+1)`` when ``interleave`` (GPT-J), else
    ``(m, m + R/2)`` (NeoX, half-split). ``cos``/``sin`` broadcast against ``x[..., :R/2]``."""
    half = x.shape[-1] // 2
    if interleave:
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        a, b = x[..., :half], x[..., half:]
    ra, rb = a * cos - b * sin, b * cos + a * sin
    if interleave:
        return torch.stack((ra, rb), dim=-1).flatten(-2)
    return torch.cat((ra, rb), dim=-1)


def rope_rotate_half_split(x: torch.Tensor, positions: torch.Tensor, rope_scale: float,
                           rope_theta: float) -> torch.Tensor:
    """Rotate the last dim of ``x [..., tokens, heads, D]`` by angle ``position * freq``.

    Half-split ("NeoX") pairing: dimension ``d`` pairs with ``d + D/2``. ``positions`` is ``[tokens]``.
    Computed in float32 (or float64 when ``x`` is float64); returns the dtype of the computation.
    """
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = rope_inverse_frequencies(x.shape[-1], rope_scale, rope_theta, dtype=work)
    cos, sin = rope_cos_sin(positions, inv_freq)
    return rotate_pairs(x.to(work), cos[:, None, :], sin[:, None, :], interleave=False)


def apply_rope_reference(
    x: torch.Tensor,
    out: torch.Tensor,
    positions: torch.Tensor,
    rotary_dim: int,
    interleave: bool,
    *,
    rope_scale: float = 1.0,
    rope_theta: float = 1e4,
    smooth_a: float = 0.0,
    smooth_b: float = 0.0,
    cos_sin_cache: Optional[torch.Tensor] = None,
) -> None:
    """Write RoPE of ``x [nnz, heads, head_dim]`` into ``out`` (same shape; may be ``x`` itself).

    The first ``rotary_dim`` dims are rotated in float32; the rest are copied (untouched when
    ``out is x``). cos/sin come from ``cos_sin_cache [max_pos, rotary_dim]`` (cos in the first half,
    sin in the second) when given, else from the frequencies of :func:`rope_inverse_frequencies`.
    """
    if cos_sin_cache is not None:
        rows = cos_sin_cache.index_select(0, positions.to(cos_sin_cache.device)).float()
        cos, sin = rows[:, : rotary_dim // 2], rows[:, rotary_dim // 2 :]
    else:
        inv_freq = rope_inverse_frequencies(rotary_dim, rope_scale, rope_theta, torch.float32, smooth_a, smooth_b)
        cos, sin = rope_cos_sin(positions, inv_freq)
    rotated = rotate_pairs(x[..., :rotary_dim].float(), cos[:, None, :], sin[:, None, :], interleave)
    out[..., :rotary_dim].copy_(rotated)
    if out is not x and rotary_dim < x.shape[-1]:
        out[..., rotary_dim:].copy_(x[..., rotary_dim:])
