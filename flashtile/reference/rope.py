"""RoPE of q and k in pure PyTorch, with the launcher's signature (kernels/rope.py): the CPU path of
``flashtile.rope``. The math (positions, frequencies, pair rotation) lives in positional.py.
"""

from __future__ import annotations

from typing import Optional

import torch

from .positional import apply_rope_reference, rope_positions

__all__ = ["apply_rope", "mla_rope_quantize", "FP8_E4M3_MAX"]

FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn (and the saturation bound of the casts below)


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    *,
    rotary_dim: int,
    interleave: bool,
    pos_ids: Optional[torch.Tensor] = None,
    indptr: Optional[torch.Tensor] = None,
    offsets: Optional[torch.Tensor] = None,
    cos_sin_cache: Optional[torch.Tensor] = None,
    rope_scale: float = 1.0,
    rope_theta: float = 1e4,
    smooth_a: float = 0.0,
    smooth_b: float = 0.0,
    head_size: Optional[int] = None,
    launch_key=None,
) -> None:
    """Rotate q ``[nnz, Hq, D]`` and k ``[nnz, Hk, D]`` into q_out/k_out (which may be q/k): positions
    from ``pos_ids [nnz]`` or the ragged ``indptr [B+1]`` / ``offsets [B]``; cos/sin from
    ``cos_sin_cache [max_pos, rotary_dim]`` when given, else from rope_scale/rope_theta and the Llama
    3.1 smoothing coefficients. ``head_size``: the four tensors are ``[nnz, heads * head_size]`` rows
    (3-D ones are taken as they are). ``launch_key`` (the kernels' launch-memo key) is unused here."""
    if head_size is not None:
        inplace_q, inplace_k = q_out is q, k_out is k
        q, k, q_out, k_out = (x if x.dim() == 3 else x.unflatten(1, (-1, head_size)) for x in (q, k, q_out, k_out))
        q_out, k_out = (q if inplace_q else q_out), (k if inplace_k else k_out)
    positions = rope_positions(q.shape[0], pos_ids, indptr, offsets, device=q.device)
    for x, out in ((q, q_out), (k, k_out)):
        apply_rope_reference(x, out, positions, rotary_dim, interleave, rope_scale=rope_scale, rope_theta=rope_theta,
                             smooth_a=smooth_a, smooth_b=smooth_b, cos_sin_cache=cos_sin_cache)


def _quantize_into(x: torch.Tensor, out: torch.Tensor, scale: float) -> None:
    """``out = cast(x * scale)`` (``x`` float32), saturating at the largest finite value of an fp8 ``out``."""
    y = x * scale
    if out.element_size() == 1:
        bound = torch.finfo(out.dtype).max
        y = y.clamp(-bound, bound)
    out.copy_(y)


def mla_rope_quantize(q_rope, k_rope, q_nope, k_nope, cos_sin_cache, pos_ids, q_rope_out, k_rope_out, q_nope_out,
                      k_nope_out, *, interleave: bool, quant_scale_q: float, quant_scale_kv: float) -> None:
    """RoPE of the rope parts and quantization of all four MLA inputs (see flashtile.rope.mla_rope_quantize_fp8):
    ``q_rope_out = cast(rope(q_rope) * quant_scale_q)``, ``k_rope_out = cast(rope(k_rope) * quant_scale_kv)``,
    ``q_nope_out = cast(q_nope * quant_scale_q)``, ``k_nope_out = cast(k_nope * quant_scale_kv)``; rotation in
    float32 over all ``cos_sin_cache.shape[1]`` rope dims; fp8 casts saturate. ``k_rope``/``k_nope`` are 2-D."""
    positions = pos_ids.to(torch.int64)
    rotary_dim = cos_sin_cache.shape[1]
    for x, out, scale in ((q_rope, q_rope_out, quant_scale_q), (k_rope[:, None], k_rope_out[:, None], quant_scale_kv)):
        rotated = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        apply_rope_reference(x, rotated, positions, rotary_dim, interleave, cos_sin_cache=cos_sin_cache)
        _quantize_into(rotated, out, scale)
    _quantize_into(q_nope.float(), q_nope_out, quant_scale_q)
    _quantize_into(k_nope.float(), k_nope_out, quant_scale_kv)
