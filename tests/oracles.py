"""Naive float64 oracles. Independent of flashtile/reference: explicit masks, explicit loops over
heads, every formula written out from api_spec.md §1.4-§1.9. Tests compare every path to these.
"""

from __future__ import annotations

import math

import torch

# (dtype) -> (atol, rtol) for outputs of kernels/reference against the float64 oracle computed on the
# same (already rounded) inputs. The error comes from rounding probabilities and outputs to the
# input dtype; float32 accumulation keeps the rest far below these bounds.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.2e-2, 1.6e-2),
}
LSE_TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 1e-3), torch.bfloat16: (1e-2, 1e-3)}


def alibi_slopes_f64(num_heads: int) -> list[float]:
    n = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]
    slopes += [2.0 ** (-4.0 * (2 * m + 1) / n) for m in range(num_heads - n)]
    return slopes


def rope_f64(x: torch.Tensor, positions: torch.Tensor, rope_scale: float, rope_theta: float) -> torch.Tensor:
    """x [tokens, heads, D] float64; half-split pairs (d, d + D/2)."""
    d = x.shape[-1]
    half = d // 2
    out = torch.empty_like(x)
    for m in range(half):
        freq = (rope_theta ** (-2.0 * m / d)) / rope_scale
        ang = positions.double() * freq
        c, s = torch.cos(ang)[:, None], torch.sin(ang)[:, None]
        a, b = x[..., m], x[..., m + half]
        out[..., m] = a * c - b * s
        out[..., m + half] = b * c + a * s
    return out


def attention_oracle(
    q, k, v, *, causal=False, custom_mask=None, sm_scale=None, logits_soft_cap=0.0, window_left=-1,
    pos_encoding_mode="NONE", rope_scale=1.0, rope_theta=1e4, k_scale=1.0, v_scale=1.0, q_scale=1.0,
):
    """One request. q [Lq, Hq, D]; k, v [Lk, Hk, D] (NHD). Returns (out float64, lse base 2 float64)."""
    q = q.double().cpu()
    k = k.double().cpu() * k_scale
    v = v.double().cpu() * v_scale
    Lq, Hq, D = q.shape
    Lk, Hk, Dv = v.shape
    g = Hq // Hk
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    q = q * q_scale
    qpos = torch.arange(Lq, dtype=torch.float64) + (Lk - Lq)
    kpos = torch.arange(Lk, dtype=torch.float64)
    if pos_encoding_mode == "ROPE_LLAMA":
        q = rope_f64(q, qpos, rope_scale, rope_theta)
        k = rope_f64(k, kpos, rope_scale, rope_theta)
    allowed = torch.ones(Lq, Lk, dtype=torch.bool)
    if custom_mask is not None:
        allowed = custom_mask.cpu().bool().clone()
    elif causal:
        allowed = kpos[None, :] <= qpos[:, None]
    if window_left >= 0:
        allowed = allowed & (kpos[None, :] >= qpos[:, None] - window_left)
    slopes = alibi_slopes_f64(Hq)
    out = torch.zeros(Lq, Hq, Dv, dtype=torch.float64)
    lse = torch.full((Lq, Hq), float("-inf"), dtype=torch.float64)
    for h in range(Hq):
        kh, vh = k[:, h // g], v[:, h // g]
        s = (q[:, h] @ kh.T) * sm_scale
        if pos_encoding_mode == "ALIBI":
            s = s + slopes[h] * (kpos[None, :] - qpos[:, None])
        if logits_soft_cap and logits_soft_cap > 0:
            s = logits_soft_cap * torch.tanh(s / logits_soft_cap)
        s = s.masked_fill(~allowed, float("-inf"))
        seen = allowed.any(dim=1)  # rows with at least one visible key
        mx = torch.where(seen, s.max(dim=1).values, torch.zeros(Lq, dtype=torch.float64))
        w = torch.exp(s - mx[:, None])  # exactly 0 where masked
        denom = w.sum(dim=1)
        out[seen, h] = (w @ vh)[seen] / denom[seen, None]
        lse[seen, h] = (mx[seen] + torch.log(denom[seen])) / math.log(2.0)
    return out, lse
