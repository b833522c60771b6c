"""Binding an attention variant's extra arguments at a call site, and the built-in ``sinks=`` variant.

The API layer passes ``(AttentionVariant, extra args)``; these helpers check the arguments against the
variant's declaration (flashtile/variants.py ``bind_variant``) with the sizes the call knows.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..variants import AttentionVariant, BoundVariant, bind_variant
from .checks import check_tensor

__all__ = ["bind_single_variant", "sink_variant", "with_sinks"]

_SINK: dict = {}


def bind_single_variant(variant, args) -> BoundVariant:
    """Bind ``variant = (AttentionVariant, extra args)`` for one request (normalized ``args``)."""
    var, extra = variant
    qo_len, num_qo_heads, head_dim = args.q.shape
    kv_len, num_kv_heads, _ = args.k.shape
    sizes = dict(qo_len=qo_len, kv_len=kv_len, num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads,
                 head_dim=head_dim, batch_size=1)
    return bind_variant(var, extra, args.q.device, sizes)


def sink_variant() -> AttentionVariant:
    """The built-in attention-sink variant: one extra float32 tensor ``sinks [num_qo_heads]``, each head's
    learned logit (natural units) joining the softmax denominator (gpt-oss). Made on first use (its hook
    imports Triton, after dispatch has chosen the interpreter where needed)."""
    variant = _SINK.get("v")
    if variant is None:
        from ..kernels.variant_hooks import sink_logit_hook
        from ..reference.variant_hooks import sink_logit_twin

        variant = _SINK["v"] = AttentionVariant(
            "attention_sink", sink_logit=(sink_logit_hook, sink_logit_twin),
            tensors=[("sinks", torch.float32, ("num_qo_heads",))])
    return variant


def with_sinks(variant, sinks: Optional[torch.Tensor]):
    """``variant`` (``(AttentionVariant, args)`` or None) with the ``sinks=`` keyword applied: the built-in
    sink variant; combining it with another variant raises NotImplementedError."""
    if sinks is None:
        return variant
    if variant is not None:
        raise NotImplementedError("sinks: cannot be combined with a custom variant yet; add a sink_logit hook to "
                                  "your variant instead")
    check_tensor("sinks", sinks, ndim=1)
    if not sinks.dtype.is_floating_point:
        raise TypeError(f"sinks: expected a float tensor [num_qo_heads], got dtype {sinks.dtype}")
    return (sink_variant(), (sinks.float(),))
