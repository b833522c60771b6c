"""Attention variants written in Python: Triton hooks that every attention kernel calls (docs/variants.md).

A variant changes what the attention kernels compute at five points, each a ``@triton.jit`` function
(a *hook*) passed to the kernels as a compile-time constant, so a kernel without a variant compiles
to the same machine code as before and a kernel with one compiles once per variant (Triton's cache
keys a constexpr function by its source):

``logits_transform(qk, sm_scale, batch, qo_idx, kv_idx, qo_head, kv_head, qo_len, kv_len, args)``
    The logits of a tile. ``qk`` is the float32 dot product ``q . k`` (not scaled); the hook returns
    the logits in *natural* units (the default is ``qk * sm_scale``). The softmax runs in base 2: the
    kernel multiplies what the hook returns by log2(e) itself, so a hook never deals with log2(e)
    (only :attr:`sink_logit`'s value ends up in the base-2 state, and the kernel converts it too).
    With ``use_softmax=False`` the returned value *is* the attention weight (no exponential).
``logits_mask(batch, qo_idx, kv_idx, qo_head, kv_head, qo_len, kv_len, args)``
    True where a query may see a key; combined (and) with causal, window and custom masks.
``query_transform(q, batch, qo_idx, qo_head, qo_len, kv_len, args)``
    The query tile, once per program, before any dot product; returns the same dtype.
``output_transform(o, lse, batch, qo_idx, qo_head, qo_len, kv_len, args)``
    The normalized float32 output rows (``lse`` base 2) before they are stored.
``sink_logit(batch, qo_head, args)``
    A per-row logit (natural units) of a virtual key whose value is zero: it joins the softmax
    denominator once per row and nothing else (attention sinks, gpt-oss). The returned lse includes it.
``kv_range(batch, qo_first, qo_last, qo_len, kv_len, args)``
    Optional, for speed only: ``(lo, hi)``, scalars, such that every query ``qo_first..qo_last`` of request
    ``batch`` sees no key outside ``[lo, hi)`` under ``logits_mask``. Kernels skip the key tiles outside
    (a sliding window as a mask then costs what the built-in window costs). A range that cuts a visible
    key gives wrong results; the reference path ignores the hook (the mask alone defines the result).
``kv_full_range(batch, qo_first, qo_last, qo_len, kv_len, args)``
    Optional, for speed only, with ``logits_mask``: ``(lo, hi)``, scalars, such that every query
    ``qo_first..qo_last`` sees every key in ``[lo, hi)`` under ``logits_mask``. Key tiles wholly inside it
    skip the mask hook (the call's causal, window and custom masks still apply), so a window-like mask is
    evaluated only on the tiles that cross its edges. A range that holds a hidden key gives wrong results;
    the reference path ignores the hook.

Index arguments, in a kernel (a tile of M query rows of one KV head and N keys): ``qk`` / logits
``[M, N]``; ``batch``, ``qo_idx``, ``qo_head`` ``[M, 1]``; ``kv_idx`` ``[1, N]``; ``kv_head`` a scalar;
``qo_len``, ``kv_len`` scalars (of the row's request). ``qo_idx`` counts the request's queries from 0
(its absolute position is ``kv_len - qo_len + qo_idx``; a decode query has ``qo_idx`` 0, ``qo_len`` 1) and
``kv_idx`` the request's keys from 0. Row hooks (query, output, sink) get ``[M]`` vectors: ``q`` and ``o``
are ``[M, D]``, ``lse`` ``[M]``, and the sink hook returns ``[M]``. ``args`` is the tuple of the
variant's extra tensors (pointers) and scalars, in declaration order, tensors first (``args[0]``, ...).

Every hook has a PyTorch *twin* with the same arguments as torch tensors, which the reference path
(CPU tensors; no Triton there) calls: logits hooks get ``qk [H, R, N]`` (all query heads of R rows),
``batch`` an int, ``qo_idx [1, R, 1]``, ``kv_idx [1, 1, N]``, ``qo_head`` and ``kv_head [H, 1, 1]``; row
hooks get ``q``/``o`` ``[R, H, D]``, ``lse`` ``[R, H]``, ``qo_idx [R, 1]``, ``qo_head [1, H]``, and the sink
twin returns a tensor broadcastable to ``[R, H]``. Written with broadcasting, a twin is usually the hook
with ``tl.load(ptr + i)`` replaced by ``t[i]``. A hook given without a twin runs on the kernel path only
(the reference path raises NotImplementedError naming it). Why twins rather than running the Triton hook
in Triton's interpreter on the reference path: the reference must not import Triton (it is the readable
spec and the CPU path without Triton), and an independent twin lets the tests check the hook itself.

Limits: variants with ``use_softmax=False`` or an ``output_transform`` run without KV splits (their
states cannot be merged), which costs speed for long single requests; a variant with a logits transform
cannot be combined with the soft-cap or ALiBi flags (express them in the hook); the Hopper
warp-specialized prefill kernel does not take variants (such calls run the portable Triton kernel).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch

__all__ = ["AttentionVariant", "Hook", "ExtraTensor", "ExtraScalar", "BoundVariant", "bind_variant", "rebind_variant",
           "parse_cdtype",
           "HOOK_NAMES",
           "VARIANT_PREFILL_ROUTE"]

# Why batch prefill with a variant runs the portable Triton kernel on Hopper (``flashtile info`` shows it).
VARIANT_PREFILL_ROUTE = ("portable Triton batch-prefill kernel: the warp-specialized Hopper kernel "
                         "(kernels/batch_prefill_hopper.py) has no variant hook points")

HOOK_NAMES = ("logits_transform", "logits_mask", "query_transform", "output_transform", "sink_logit", "kv_range",
              "kv_full_range")

# Upstream's C type strings for additional tensors and scalars, and the torch dtypes they mean.
_C_DTYPES = {
    "float": torch.float32, "double": torch.float64, "half": torch.float16, "__half": torch.float16,
    "nv_half": torch.float16, "nv_bfloat16": torch.bfloat16, "__nv_bfloat16": torch.bfloat16,
    "bfloat16": torch.bfloat16, "int32_t": torch.int32, "int": torch.int32, "int64_t": torch.int64,
    "uint8_t": torch.uint8, "int8_t": torch.int8, "bool": torch.bool, "uint32_t": torch.int32,
}
_FLOAT_SCALARS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_INT_SCALARS = (torch.int32, torch.int64, torch.int8, torch.uint8)


def parse_cdtype(name: str, dtype) -> torch.dtype:
    """A torch dtype, or one of upstream's C type strings ("float", "int32_t", "uint8_t", ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype in _C_DTYPES:
        return _C_DTYPES[dtype]
    raise TypeError(f"{name}: expected a torch.dtype or one of {sorted(_C_DTYPES)}, got {dtype!r}")


class Hook(NamedTuple):
    """A hook: the ``@triton.jit`` function the kernels call and its PyTorch twin (or None)."""

    triton: Any
    torch: Optional[Callable]


def _as_hook(name: str, value) -> Optional[Hook]:
    if value is None:
        return None
    if isinstance(value, str):
        raise NotImplementedError(
            f"{name}: a C++ string cannot run in flashtile (Triton kernels, no nvcc); port it to a @triton.jit "
            "function and pass it with its PyTorch twin: docs/variants.md shows each upstream example ported")
    if isinstance(value, Hook):
        pair = tuple(value)
    elif isinstance(value, tuple) and len(value) == 2:
        pair = value
    else:
        pair = (value, None)
    fn, twin = pair
    if not _is_triton_function(fn):
        raise TypeError(f"{name}: expected a @triton.jit function (or a (function, torch_twin) pair), "
                        f"got {type(fn).__name__}")
    if twin is not None and not callable(twin):
        raise TypeError(f"{name}: the PyTorch twin must be callable, got {type(twin).__name__}")
    return Hook(fn, twin)


def _is_triton_function(fn) -> bool:
    # JITFunction (compiled) and InterpretedFunction (TRITON_INTERPRET=1) both wrap the Python function as
    # ``fn`` and know its argument names; checked by attribute so this module need not import Triton.
    return hasattr(fn, "fn") and hasattr(fn, "arg_names") and callable(fn.fn)


@dataclasses.dataclass(frozen=True)
class ExtraTensor:
    """An additional tensor argument: ``name`` (``maybe_`` prefix: None allowed), dtype, and optionally
    its shape as a tuple of ints and size names ("num_qo_heads", "num_kv_heads", "qo_len", "kv_len",
    "batch_size", "head_dim"; a name unknown at a call site, or None, is not checked)."""

    name: str
    dtype: torch.dtype
    shape: Optional[tuple] = None

    @property
    def optional(self) -> bool:
        return self.name.startswith("maybe_")


@dataclasses.dataclass(frozen=True)
class ExtraScalar:
    """An additional scalar argument: ``name`` and dtype (floats and ints; passed to the kernel as
    float32 / int32-or-int64 values)."""

    name: str
    dtype: torch.dtype


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionVariant:
    """A user-defined attention variant (module doc: hook signatures, shapes, base 2).

    Args:
        name: a label (error messages, ``flashtile info``, the jit module's uri).
        logits_transform, logits_mask, query_transform, output_transform, sink_logit: hooks, each a
            ``@triton.jit`` function or a ``(function, torch_twin)`` pair, or None (the default behaviour).
        kv_range: an optional ``@triton.jit`` hook that lets the kernels skip key tiles (module doc); it
            needs no twin, because it only skips keys that ``logits_mask`` hides anyway.
        kv_full_range: an optional ``@triton.jit`` hook naming keys that ``logits_mask`` shows to every query
            of a program (module doc), whose tiles then skip the mask hook; no twin, as for ``kv_range``.
        use_softmax: False skips the softmax: the output is ``sum_j w_ij v_j`` with ``w`` what the logits
            transform returns (masked keys weigh 0); the returned lse is then 0 for every row.
        tensors: additional tensors, as :class:`ExtraTensor` or ``(name, dtype)`` / ``(name, dtype, shape)``.
        scalars: additional scalars, as :class:`ExtraScalar` or ``(name, dtype)``.

    Variants compare by identity: one object is one compiled specialization per kernel.
    """

    name: str
    logits_transform: Any = None
    logits_mask: Any = None
    query_transform: Any = None
    output_transform: Any = None
    sink_logit: Any = None
    use_softmax: bool = True
    kv_range: Any = None
    tensors: Sequence = ()
    scalars: Sequence = ()
    kv_full_range: Any = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"name: expected a non-empty str, got {self.name!r}")
        for hook in HOOK_NAMES:
            object.__setattr__(self, hook, _as_hook(hook, getattr(self, hook)))
        if self.kv_full_range is not None and self.logits_mask is None:
            raise ValueError("kv_full_range: names keys that logits_mask shows to every query, so it needs a "
                             "logits_mask hook; got none")
        if not isinstance(self.use_softmax, bool):
            raise TypeError(f"use_softmax: expected a bool, got {self.use_softmax!r}")
        tensors = tuple(_as_spec(ExtraTensor, "tensors", t) for t in self.tensors)
        scalars = tuple(_as_spec(ExtraScalar, "scalars", s) for s in self.scalars)
        for s in scalars:
            if s.dtype not in _FLOAT_SCALARS + _INT_SCALARS:
                raise TypeError(f"scalars: {s.name}: expected a float or int dtype, got {s.dtype}")
        names = [x.name for x in tensors + scalars]
        if len(set(names)) != len(names):
            raise ValueError(f"tensors, scalars: names must be unique, got {names}")
        object.__setattr__(self, "tensors", tensors)
        object.__setattr__(self, "scalars", scalars)

    @property
    def whole_rows(self) -> bool:
        """Whether every row must be computed by one program (no KV splits): its state cannot be merged."""
        return not self.use_softmax or self.output_transform is not None

    @property
    def arg_names(self) -> tuple:
        return tuple(x.name for x in (*self.tensors, *self.scalars))

    def hooks(self) -> dict:
        """``{hook name: Hook}`` of the hooks this variant sets."""
        return {h: getattr(self, h) for h in HOOK_NAMES if getattr(self, h) is not None}

    def __repr__(self) -> str:
        return f"AttentionVariant({self.name!r}, hooks={list(self.hooks())}, use_softmax={self.use_softmax})"


def _as_spec(kind, field: str, spec):
    if isinstance(spec, kind):
        return spec
    if not isinstance(spec, (tuple, list)) or len(spec) not in (2, 3) or not isinstance(spec[0], str):
        raise TypeError(f"{field}: expected {kind.__name__} or a (name, dtype) pair, got {spec!r}")
    if kind is ExtraScalar and len(spec) == 3:
        raise TypeError(f"{field}: a scalar has no shape, got {spec!r}")
    return kind(spec[0], parse_cdtype(f"{field}: {spec[0]}", spec[1]), *spec[2:])


class BoundVariant(NamedTuple):
    """A variant with the extra arguments of one call, checked: ``args`` holds the tensors (contiguous, on
    the call's device, or None for an absent ``maybe_`` tensor) then the scalars (Python floats/ints)."""

    variant: AttentionVariant
    args: tuple


def bind_variant(variant: AttentionVariant, args: Sequence, device: torch.device, sizes: dict) -> BoundVariant:
    """Check ``args`` (positional, tensors first then scalars, as declared) against ``variant``.

    ``sizes``: the call's known sizes for declared shapes (e.g. ``{"num_qo_heads": 32, "kv_len": 7}``).
    Raises TypeError (wrong dtype or type), ValueError (count, shape, device) naming the argument.
    """
    if not isinstance(variant, AttentionVariant):
        raise TypeError(f"variant: expected an AttentionVariant, got {type(variant).__name__}")
    args = tuple(args)
    names = variant.arg_names
    if len(args) != len(names):
        raise ValueError(f"variant {variant.name!r}: expected {len(names)} extra arguments {list(names)} "
                         f"(tensors first, then scalars), got {len(args)}")
    bound = []
    for spec, value in zip(variant.tensors, args):
        bound.append(_check_extra_tensor(variant.name, spec, value, device, sizes))
    for spec, value in zip(variant.scalars, args[len(variant.tensors):]):
        bound.append(_check_extra_scalar(variant.name, spec, value))
    return BoundVariant(variant, tuple(bound))


def _check_extra_tensor(vname: str, spec: ExtraTensor, value, device, sizes: dict):
    where = f"{spec.name} (extra tensor of variant {vname!r})"
    if value is None:
        if spec.optional:
            return None
        raise ValueError(f"{where}: expected a tensor (only maybe_ tensors may be None), got None")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype != spec.dtype:
        raise TypeError(f"{where}: expected dtype {spec.dtype}, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{where}: expected a tensor on {device} (the device of q), got {value.device}")
    if spec.shape is not None:
        want = tuple(sizes.get(d, None) if isinstance(d, str) else d for d in spec.shape)
        got = tuple(value.shape)
        if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
            shown = [w if w is not None else "*" for w in want]
            raise ValueError(f"{where}: expected shape {shown} ({list(spec.shape)}), got {list(got)}")
    if not value.is_contiguous():  # hooks index it densely; a copy would hide the writes of an output tensor
        raise ValueError(f"{where}: expected a contiguous tensor, got strides {tuple(value.stride())}")
    return value


def _check_extra_scalar(vname: str, spec: ExtraScalar, value):
    where = f"{spec.name} (extra scalar of variant {vname!r})"
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if spec.dtype in _FLOAT_SCALARS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}: expected a float ({spec.dtype}), got {type(value).__name__}")
    elif isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: expected an int ({spec.dtype}), got {type(value).__name__}")
    return _scalar_value(spec, value)


def _scalar_value(spec: ExtraScalar, value):
    """A checked Python scalar as the kernels receive it: float for a float scalar, else int."""
    return float(value) if spec.dtype in _FLOAT_SCALARS else int(value)


def rebind_variant(variant: AttentionVariant, args: Sequence) -> BoundVariant:
    """:func:`bind_variant` without the checks, for ``args`` whose every property the checks read (count,
    type, tensor dtype, device, shape and strides; scalars as Python ints and floats) equals those of
    arguments :func:`bind_variant` accepted for this variant and call sizes: a replayed call's (_core/single.py
    keys its replays on exactly these properties)."""
    n = len(variant.tensors)
    return BoundVariant(variant, tuple(args[:n]) + tuple(_scalar_value(spec, value)
                                                          for spec, value in zip(variant.scalars, args[n:])))
