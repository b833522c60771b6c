"""Binding an attention variant's extra arguments at a call site, and the built-in ``sinks=`` variant.

The API layer passes ``(AttentionVariant, extra args)``; these helpers check the arguments against the
variant's declaration (flashtile/variants.py ``bind_variant``) with the sizes the call knows.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..variants import HOOK_NAMES, AttentionVariant, BoundVariant, bind_variant
from .checks import check_tensor

__all__ = ["bind_single_variant", "sink_variant", "with_sinks", "variant_from_jit_args", "JIT_ARGS_FIELDS"]

# upstream's jit_args tuple (flashinfer.jit.attention gen_customize_batch_*_module's arguments after backend)
JIT_ARGS_FIELDS = ("uri", "dtype_q", "dtype_kv", "dtype_o", "idtype", "head_dim_qk", "head_dim_vo",
                   "additional_tensor_names", "additional_tensor_dtypes", "additional_scalar_names",
                   "additional_scalar_dtypes", "variant_name", "variant_decl")

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


def variant_from_jit_args(jit_args) -> Optional[AttentionVariant]:
    """The variant of a batch wrapper's ``jit_args``: upstream's 13-tuple with an :class:`AttentionVariant` as
    ``variant_decl`` (its extra-argument lists, when the variant declares none, come from the tuple), or an
    AttentionVariant alone. A C++ ``variant_decl`` raises NotImplementedError; None gives None."""
    if jit_args is None:
        return None
    if isinstance(jit_args, AttentionVariant):
        return jit_args
    if not isinstance(jit_args, (tuple, list)) or len(jit_args) != len(JIT_ARGS_FIELDS):
        raise TypeError(f"jit_args: expected upstream's tuple {JIT_ARGS_FIELDS} or an AttentionVariant, "
                        f"got {type(jit_args).__name__} {jit_args!r:.80}")
    fields = dict(zip(JIT_ARGS_FIELDS, jit_args))
    return variant_from_decl(fields["variant_decl"], fields["additional_tensor_names"],
                             fields["additional_tensor_dtypes"], fields["additional_scalar_names"],
                             fields["additional_scalar_dtypes"])


def variant_from_decl(decl, tensor_names, tensor_dtypes, scalar_names, scalar_dtypes) -> AttentionVariant:
    """An upstream ``variant_decl`` position: an AttentionVariant, with the declared lists checked against
    (or, when it declares none, given to) it; a string raises NotImplementedError with how to port it."""
    if isinstance(decl, str):
        raise NotImplementedError(
            "variant_decl: a C++ variant (FlashInfer's JIT string) cannot run in flashtile, which compiles Triton "
            "kernels without nvcc. Port it to flashtile.AttentionVariant: each C++ hook becomes a @triton.jit "
            "function (LogitsTransform -> logits_transform, LogitsMask -> logits_mask, QueryTransform -> "
            "query_transform, OutputTransform -> output_transform, update_m_d for sinks -> sink_logit), "
            "params.<name> becomes args[i] in declaration order (tensors first), and logits stay in natural units "
            "(no log2e); docs/variants.md ports every upstream example")
    if not isinstance(decl, AttentionVariant):
        raise TypeError(f"variant_decl: expected an AttentionVariant, got {type(decl).__name__}")
    tensors = list(zip(tensor_names or (), tensor_dtypes or ()))
    scalars = list(zip(scalar_names or (), scalar_dtypes or ()))
    if len(tensor_names or ()) != len(tensor_dtypes or ()) or len(scalar_names or ()) != len(scalar_dtypes or ()):
        raise ValueError("additional_tensor_names/_dtypes and additional_scalar_names/_dtypes: each names list "
                         "must be as long as its dtypes list")
    if not decl.tensors and not decl.scalars and (tensors or scalars):
        import dataclasses

        hooks = {h: getattr(decl, h) for h in HOOK_NAMES}
        return dataclasses.replace(decl, **hooks, tensors=tensors, scalars=scalars)
    if (tensors or scalars) and ([t[0] for t in tensors], [s[0] for s in scalars]) != (
            [t.name for t in decl.tensors], [s.name for s in decl.scalars]):
        raise ValueError(f"additional_tensor_names / additional_scalar_names {[t[0] for t in tensors]} / "
                         f"{[s[0] for s in scalars]} differ from the variant's declaration "
                         f"{[t.name for t in decl.tensors]} / {[s.name for s in decl.scalars]}")
    return decl
