"""The attention op boundary: torch.library custom ops (for torch.compile) over one implementation.

Each op is destination-passing (the public API allocates ``out``/``lse``; the op writes them and lists
them in ``mutates_args``), so torch.compile(fullgraph=True) traces through the public API, the fake
implementation is empty and CUDA-graph capture sees no allocation inside the op.

The implementation takes the resolved :class:`AttentionParams` as one value and runs the function of
the same name in the module :func:`dispatch.implementation` picks (flashtile/kernels/attention.py or
batch_prefill.py on CUDA, flashtile/reference/attention.py on CPU). Eager calls (:func:`call`) run it
directly, skipping the custom-op dispatcher (tens of microseconds per call); under torch.compile the
registered op is traced, and only there are the parameters flattened into the op's scalar arguments
(the schema's parameter part is generated from AttentionParams' fields, so it is written once).
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from ..scheduler.split_kv import plan_single_kv_splits
from . import dispatch
from .params import AttentionParams
from .single_batch import run_as_batch

__all__ = ["single_attention", "single_attention_fp8", "batch_decode", "batch_prefill", "batch_prefill_fp8", "call",
           "PARAMS_SCHEMA"]

_SCHEMA_TYPES = {"float": "float", "bool": "bool", "int": "int", "str": "str"}
_PARAM_FIELDS = dataclasses.fields(AttentionParams)
# f.type is the annotation's text (params.py postpones annotations).
PARAMS_SCHEMA = ", ".join(f"{_SCHEMA_TYPES[str(f.type)]} {f.name}" for f in _PARAM_FIELDS)
_IMPLS: dict = {}


def _define(name: str, arguments: str, mutates: tuple, impl):
    """Register ``flashtile::name`` with schema ``(arguments, <AttentionParams fields>, str backend) -> ()``;
    ``impl(*arguments, params, backend)`` runs it."""
    count = arguments.count(",") + 1
    width = len(_PARAM_FIELDS)

    def flat(*args) -> None:
        impl(*args[:count], AttentionParams(*args[count: count + width]), args[-1])

    op = torch.library.custom_op(f"flashtile::{name}", flat, mutates_args=mutates,
                                 schema=f"({arguments}, {PARAMS_SCHEMA}, str backend) -> ()")
    op.register_fake(lambda *args: None)
    _IMPLS[op] = impl
    return op


def call(op, *args, params: AttentionParams, backend: str, variant=None) -> None:
    """Run ``op`` (one of this module's ops) on ``args`` (its arguments before the parameters): its
    implementation when eager, the registered op when torch.compile traces. ``variant``: a bound attention
    variant (flashtile/variants.py) or None; its Triton functions cannot be op arguments, so a call with one
    always runs the implementation (under torch.compile: a graph break)."""
    if variant is not None:
        eager_only(_call_with_variant)(_IMPLS[op], args, params, backend, variant)
    elif torch.compiler.is_compiling():
        op(*args, *dataclasses.astuple(params), backend)
    else:
        _IMPLS[op](*args, params, backend)


_EAGER_ONLY: dict = {}


def eager_only(fn):
    """``fn`` wrapped so that torch.compile runs it eagerly (a graph break), made on first use while
    torch._dynamo is loaded: ``torch.compiler.disable`` imports it (about 1.5 s, which was most of a
    variant's first call from the cache), and until something imports it nothing can be tracing, so
    ``fn`` itself is returned. Importing flashtile must not import Triton (tests/test_utils.py). A plain
    dict memo: Dynamo warns about tracing through lru_cache."""
    wrapped = _EAGER_ONLY.get(fn)
    if wrapped is None:
        if "torch._dynamo" not in sys.modules:
            return fn
        wrapped = _EAGER_ONLY[fn] = torch.compiler.disable(fn)
    return wrapped


def _call_with_variant(impl, args, params, backend, variant) -> None:
    if variant.variant.logits_transform is not None and (params.logits_soft_cap > 0 or
                                                          params.pos_encoding_mode == "ALIBI"):
        raise NotImplementedError(f"variant {variant.variant.name!r}: a logits_transform cannot be combined with "
                                  "logits_soft_cap or ALiBi (the hook replaces them); express them in the hook")
    impl(*args, params, backend, variant=variant)


def _single_attention(q, k, v, packed_mask, out, lse, kind, params, backend, variant=None, fp8_scales=None) -> None:
    """Plan the request's KV splits (scheduler/split_kv.py, over the implementation's launch shape), then
    launch them: single-request planning happens here, as batch planning happens in the wrappers' plan().
    A prefill call the batch prefill kernels serve better runs as a ragged batch of one instead, with a
    remembered plan (_core/single_batch.py). ``fp8_scales``: FP8 attention's ``(scale_q, scale_k, scale_v)``."""
    if q.shape[0] == 0:
        return
    if kind == "prefill" and packed_mask is None and variant is None and fp8_scales is None and \
            run_as_batch(q, k, v, out, lse, params, backend):  # a batch of one (_core/single_batch.py)
        return
    extra = {} if variant is None else {"variant": variant}
    impl = dispatch.implementation("attention", q.device, backend)
    shape = impl.single_launch_shape(q, k, v, params, packed_mask=packed_mask, kind=kind, **extra)
    if fp8_scales is not None:
        extra["fp8_scales"] = fp8_scales
    impl.single_attention_forward(q, k, v, out, lse, params, packed_mask=packed_mask, kind=kind,
                                  splits=plan_single_kv_splits(k.shape[0], shape), **extra)


def _single_attention_fp8(q, k, v, packed_mask, out, lse, kind, scale_q, scale_k, scale_v, params, backend) -> None:
    _single_attention(q, k, v, packed_mask, out, lse, kind, params, backend, fp8_scales=(scale_q, scale_k, scale_v))


def _batch_decode(q, k_pages, v_pages, page_indptr, page_indices, worklist, part_o, part_lse, out, lse, batch_size,
                  num_programs, max_states, merge, params, backend, variant=None) -> None:
    if q.shape[0] == 0:
        return
    extra = {} if variant is None else {"variant": variant}
    dispatch.implementation("attention", q.device, backend).batch_decode_forward(
        q, k_pages, v_pages, page_indptr, page_indices, worklist, part_o, part_lse, out, lse, params,
        batch_size=batch_size, num_programs=num_programs, max_states=max_states, merge=merge, **extra)


def _batch_prefill(q, k, v, page_indices, packed_mask, multi_item_requests, token_pos_in_items, worklist, part_o,
                   part_lse, out, lse, batch_size, item_capacity, block_m, block_n, num_items, num_merges, params,
                   backend, variant=None, fp8_scales=None) -> None:
    if q.shape[0] == 0:
        return
    extra = {} if variant is None else {"variant": variant}
    if fp8_scales is not None:
        extra["fp8_scales"] = fp8_scales
    dispatch.implementation("batch_prefill", q.device, backend).batch_prefill_forward(
        q, k, v, page_indices, packed_mask, worklist, part_o, part_lse, out, lse, params, batch_size=batch_size,
        item_capacity=item_capacity, block_m=block_m, block_n=block_n, num_items=num_items, num_merges=num_merges,
        multi_item_requests=multi_item_requests, token_pos_in_items=token_pos_in_items, **extra)


def _batch_prefill_fp8(q, k, v, page_indices, packed_mask, multi_item_requests, token_pos_in_items, worklist, part_o,
                       part_lse, out, lse, batch_size, item_capacity, block_m, block_n, num_items, num_merges, scale_q,
                       scale_k, scale_v, params, backend) -> None:
    _batch_prefill(q, k, v, page_indices, packed_mask, multi_item_requests, token_pos_in_items, worklist, part_o,
                   part_lse, out, lse, batch_size, item_capacity, block_m, block_n, num_items, num_merges, params,
                   backend, fp8_scales=(scale_q, scale_k, scale_v))


single_attention = _define(
    "single_attention",
    "Tensor q, Tensor k, Tensor v, Tensor? packed_mask, Tensor(a!) out, Tensor(b!) lse, str kind",
    ("out", "lse"), _single_attention)
single_attention.__doc__ = """Attention of one request: q ``[Lq, Hq, Dqk]``, k/v NHD views ``[Lk, Hk, D]``,
packed_mask uint8
bits of ``[Lq, Lk]`` or None; writes out ``[Lq, Hq, Dvo]`` and lse ``[Lq, Hq]`` float32 (base 2). ``kind``:
"decode" or "prefill" (the launch-config family)."""

batch_decode = _define(
    "batch_decode",
    "Tensor q, Tensor k_pages, Tensor v_pages, Tensor page_indptr, Tensor page_indices, Tensor worklist, "
    "Tensor(a!) part_o, Tensor(b!) part_lse, Tensor(c!) out, Tensor(d!) lse, int batch_size, int num_programs, "
    "int max_states, bool merge",
    ("part_o", "part_lse", "out", "lse"), _batch_decode)
batch_decode.__doc__ = """Batch decode over a paged cache with a planned work list (scheduler/worklist.py):
q ``[B, Hq, D]``, K/V NHD
page views; writes out ``[B, Hq, Dv]``, lse ``[B, Hq]`` (part_o / part_lse: split-KV scratch)."""

batch_prefill = _define(
    "batch_prefill",
    "Tensor q, Tensor k, Tensor v, Tensor? page_indices, Tensor? packed_mask, Tensor? multi_item_requests, "
    "Tensor? token_pos_in_items, Tensor worklist, Tensor(a!) part_o, Tensor(b!) part_lse, Tensor(c!) out, "
    "Tensor(d!) lse, int batch_size, int item_capacity, int block_m, int block_n, int num_items, int num_merges",
    ("part_o", "part_lse", "out", "lse"), _batch_prefill)
batch_prefill.__doc__ = """Batch prefill over a ragged (``page_indices`` None) or paged cache with a planned work list
(scheduler/prefill_work.py): q ``[total_qo, Hq, Dqk]``; writes out ``[total_qo, Hq, Dvo]``, lse ``[total_qo, Hq]``.
Multi-item scoring: ``multi_item_requests`` int32 ``[B, 2]`` and ``token_pos_in_items`` int32
(flashtile/_core/multi_item.py), else both None."""

# FP8 attention (q, k, v all float8): the ops above plus the per-head float32 dequantization scales (views
# ``[num_qo_heads]`` for q, ``[num_kv_heads]`` for k and v; _core/fp8_attention.py).
single_attention_fp8 = _define(
    "single_attention_fp8",
    "Tensor q, Tensor k, Tensor v, Tensor? packed_mask, Tensor(a!) out, Tensor(b!) lse, str kind, Tensor scale_q, "
    "Tensor scale_k, Tensor scale_v",
    ("out", "lse"), _single_attention_fp8)
single_attention_fp8.__doc__ = """:data:`single_attention` of fp8 q, k, v with their per-head scales."""

batch_prefill_fp8 = _define(
    "batch_prefill_fp8",
    "Tensor q, Tensor k, Tensor v, Tensor? page_indices, Tensor? packed_mask, Tensor? multi_item_requests, "
    "Tensor? token_pos_in_items, Tensor worklist, Tensor(a!) part_o, Tensor(b!) part_lse, Tensor(c!) out, "
    "Tensor(d!) lse, int batch_size, int item_capacity, int block_m, int block_n, int num_items, int num_merges, "
    "Tensor scale_q, Tensor scale_k, Tensor scale_v",
    ("part_o", "part_lse", "out", "lse"), _batch_prefill_fp8)
batch_prefill_fp8.__doc__ = """:data:`batch_prefill` of fp8 q, k, v with their per-head scales."""
