"""RoPE of q and k in pure PyTorch, with the launcher's signature (kernels/rope.py): the CPU path of
``flashtile.rope``. The math (positions, frequencies, pair rotation) lives in positional.py.
"""

from __future__ import annotations

from typing import Optional

import torch

from .positional import apply_rope_reference, rope_positions

__all__ = ["apply_rope"]


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
