"""The attention parameters every path takes, as one value (no math, no torch, no Triton)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionParams:
    """Resolved attention parameters (defaults filled, calibration scales folded in).

    sm_scale: scale of ``q.k`` (already includes ``q_scale * k_scale``).
    causal: bottom-right aligned causal mask (ignored when a custom mask is given).
    logits_soft_cap: ``cap * tanh(s / cap)`` when > 0; 0 disables.
    window_left: a query at position p sees keys ``>= p - window_left``; -1 disables.
    pos_encoding_mode: "NONE", "ROPE_LLAMA" or "ALIBI".
    rope_scale, rope_theta: RoPE frequency parameters.
    v_scale: multiplies the output (fp8 V calibration).
    """

    sm_scale: float
    causal: bool = False
    logits_soft_cap: float = 0.0
    window_left: int = -1
    pos_encoding_mode: str = "NONE"
    rope_scale: float = 1.0
    rope_theta: float = 1e4
    v_scale: float = 1.0
