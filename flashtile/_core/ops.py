"""torch.library registrations: flashtile's ops as custom ops with fake implementations.

Ops are destination-passing: the public function allocates ``out``/``lse`` and the op writes them
(``mutates_args``), so torch.compile(fullgraph=True) traces through the public API, the fake
implementation is empty, and CUDA-graph capture sees no allocation inside the op.
Each op dispatches per call (dispatch.py) to the Triton kernels or the reference path.
"""

from __future__ import annotations

from typing import Optional

import torch

from .dispatch import Path, choose_path, load_kernels
from .params import AttentionParams

__all__ = [
    "single_decode", "single_prefill", "batch_decode", "batch_prefill",
    "call_single_decode", "call_single_prefill", "call_batch_decode", "call_batch_prefill",
]

_slopes_cache: dict = {}


def _alibi_slopes(num_heads: int, device: torch.device) -> torch.Tensor:
    key = (num_heads, str(device))
    if key not in _slopes_cache:
        from ..reference.positional import alibi_slopes

        _slopes_cache[key] = alibi_slopes(num_heads, device=device)
    return _slopes_cache[key]


def _run_single_attention(q, k, v, packed_mask, out, lse, params: AttentionParams, backend: str, kind: str) -> None:
    qo_len, num_qo_heads, _ = q.shape
    if qo_len == 0:
        return
    decision = choose_path(q.device, backend)
    if decision.path is Path.REFERENCE:
        from ..reference.attention import single_attention
        from ..reference.packbits import unpack_mask

        mask = unpack_mask(packed_mask, qo_len, k.shape[0]) if packed_mask is not None else None
        o, s = single_attention(q, k, v, params, custom_mask=mask)
        out.copy_(o)
        lse.copy_(s)
        return
    kernels = load_kernels("attention", decision.path)
    slopes = _alibi_slopes(num_qo_heads, q.device) if params.pos_encoding_mode == "ALIBI" else None
    kernels.attention_forward(q, k, v, out, lse, params, packed_mask=packed_mask, alibi_slopes=slopes, kind=kind)


def _single_decode_impl(q, k, v, out, lse, sm_scale, logits_soft_cap, window_left, pos_encoding_mode, rope_scale,
                        rope_theta, v_scale, backend) -> None:
    params = AttentionParams(sm_scale, False, logits_soft_cap, window_left, pos_encoding_mode, rope_scale,
                             rope_theta, v_scale)
    _run_single_attention(q, k, v, None, out, lse, params, backend, "decode")


def _single_prefill_impl(q, k, v, packed_mask, out, lse, causal, sm_scale, logits_soft_cap, window_left,
                         pos_encoding_mode, rope_scale, rope_theta, v_scale, backend) -> None:
    params = AttentionParams(sm_scale, causal, logits_soft_cap, window_left, pos_encoding_mode, rope_scale,
                             rope_theta, v_scale)
    _run_single_attention(q, k, v, packed_mask, out, lse, params, backend, "prefill")


@torch.library.custom_op("flashtile::single_decode", mutates_args=("out", "lse"))
def single_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    sm_scale: float,
    logits_soft_cap: float,
    window_left: int,
    pos_encoding_mode: str,
    rope_scale: float,
    rope_theta: float,
    v_scale: float,
    backend: str,
) -> None:
    """Decode attention of one request: q ``[1, Hq, D]``, k/v NHD views; writes out ``[1, Hq, Dv]``, lse ``[1, Hq]``."""
    _single_decode_impl(q, k, v, out, lse, sm_scale, logits_soft_cap, window_left, pos_encoding_mode, rope_scale,
                        rope_theta, v_scale, backend)


@single_decode.register_fake
def _single_decode_fake(q, k, v, out, lse, sm_scale, logits_soft_cap, window_left, pos_encoding_mode,
                        rope_scale, rope_theta, v_scale, backend) -> None:
    return None


@torch.library.custom_op("flashtile::single_prefill", mutates_args=("out", "lse"))
def single_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    packed_mask: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    sm_scale: float,
    logits_soft_cap: float,
    window_left: int,
    pos_encoding_mode: str,
    rope_scale: float,
    rope_theta: float,
    v_scale: float,
    backend: str,
) -> None:
    """Prefill/append attention of one request: q ``[Lq, Hq, D]``, k/v NHD views ``[Lk, Hk, D]``."""
    _single_prefill_impl(q, k, v, packed_mask, out, lse, causal, sm_scale, logits_soft_cap, window_left,
                         pos_encoding_mode, rope_scale, rope_theta, v_scale, backend)


@single_prefill.register_fake
def _single_prefill_fake(q, k, v, packed_mask, out, lse, causal, sm_scale, logits_soft_cap, window_left,
                         pos_encoding_mode, rope_scale, rope_theta, v_scale, backend) -> None:
    return None


# Eager calls skip the custom-op dispatcher (tens of microseconds of host time per call); under
# torch.compile the registered op is what gets traced. Both run the same implementation.


def call_single_decode(*args) -> None:
    (single_decode if torch.compiler.is_compiling() else _single_decode_impl)(*args)


def call_single_prefill(*args) -> None:
    (single_prefill if torch.compiler.is_compiling() else _single_prefill_impl)(*args)


def _batch_decode_impl(q, k_pages, v_pages, page_indptr, page_indices, kv_lens, req_item_indptr, item_request,
                       item_kv_start, item_kv_end, part_o, part_lse, out, lse, num_programs, max_states, merge,
                       sm_scale, logits_soft_cap, window_left, pos_encoding_mode, rope_scale, rope_theta, v_scale,
                       backend) -> None:
    params = AttentionParams(sm_scale, False, logits_soft_cap, window_left, pos_encoding_mode, rope_scale,
                             rope_theta, v_scale)
    if q.shape[0] == 0:
        return
    decision = choose_path(q.device, backend)
    if decision.path is Path.REFERENCE:
        from ..reference.attention import batch_paged_decode

        o, s = batch_paged_decode(q, k_pages, v_pages, page_indptr, page_indices, kv_lens, params)
        out.copy_(o)
        lse.copy_(s)
        return
    kernels = load_kernels("attention", decision.path)
    slopes = _alibi_slopes(q.shape[1], q.device) if pos_encoding_mode == "ALIBI" else None
    kernels.batch_decode_forward(
        q, k_pages, v_pages, page_indptr, page_indices, kv_lens, req_item_indptr, item_request, item_kv_start,
        item_kv_end, part_o, part_lse, out, lse, params, alibi_slopes=slopes, num_programs=num_programs,
        max_states=max_states, merge=merge)


@torch.library.custom_op("flashtile::batch_decode", mutates_args=("out", "lse", "part_o", "part_lse"))
def batch_decode(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_indptr: torch.Tensor,
    page_indices: torch.Tensor,
    kv_lens: torch.Tensor,
    req_item_indptr: torch.Tensor,
    item_request: torch.Tensor,
    item_kv_start: torch.Tensor,
    item_kv_end: torch.Tensor,
    part_o: torch.Tensor,
    part_lse: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    num_programs: int,
    max_states: int,
    merge: bool,
    sm_scale: float,
    logits_soft_cap: float,
    window_left: int,
    pos_encoding_mode: str,
    rope_scale: float,
    rope_theta: float,
    v_scale: float,
    backend: str,
) -> None:
    """Batch decode over a paged cache with a planned work list (see kernels.attention.batch_decode_forward):
    q ``[B, Hq, D]``, K/V NHD page views; writes out ``[B, Hq, Dv]``, lse ``[B, Hq]`` (part_o/part_lse scratch)."""
    _batch_decode_impl(q, k_pages, v_pages, page_indptr, page_indices, kv_lens, req_item_indptr, item_request,
                       item_kv_start, item_kv_end, part_o, part_lse, out, lse, num_programs, max_states, merge,
                       sm_scale, logits_soft_cap, window_left, pos_encoding_mode, rope_scale, rope_theta, v_scale,
                       backend)


@batch_decode.register_fake
def _batch_decode_fake(*args) -> None:
    return None


def call_batch_decode(*args) -> None:
    (batch_decode if torch.compiler.is_compiling() else _batch_decode_impl)(*args)


def _batch_prefill_impl(q, k, v, page_indices, packed_mask, multi_item_requests, token_pos_in_items, meta, batch_size,
                        item_capacity, part_o, part_lse, out, lse, block_m, block_n, num_items, num_merges, causal,
                        sm_scale, logits_soft_cap, window_left, pos_encoding_mode, rope_scale, rope_theta, v_scale,
                        backend) -> None:
    params = AttentionParams(sm_scale, causal, logits_soft_cap, window_left, pos_encoding_mode, rope_scale,
                             rope_theta, v_scale)
    if q.shape[0] == 0:
        return
    decision = choose_path(q.device, backend)
    if decision.path is Path.REFERENCE:
        from ..reference.attention import batch_prefill as reference_batch_prefill

        from ..scheduler.prefill_work import meta_requests

        o, s = reference_batch_prefill(q, k, v, page_indices, packed_mask, meta_requests(meta, batch_size), params,
                                       multi_item_requests=multi_item_requests, token_pos_in_items=token_pos_in_items)
        out.copy_(o)
        lse.copy_(s)
        return
    kernels = load_kernels("batch_prefill", decision.path)
    slopes = _alibi_slopes(q.shape[1], q.device) if pos_encoding_mode == "ALIBI" else None
    kernels.batch_prefill_forward(
        q, k, v, page_indices, packed_mask, meta, batch_size, item_capacity, part_o, part_lse, out, lse, params,
        alibi_slopes=slopes, block_m=block_m, block_n=block_n, num_items=num_items, num_merges=num_merges,
        multi_item_requests=multi_item_requests, token_pos_in_items=token_pos_in_items)


@torch.library.custom_op("flashtile::batch_prefill", mutates_args=("out", "lse", "part_o", "part_lse"))
def batch_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    page_indices: Optional[torch.Tensor],
    packed_mask: Optional[torch.Tensor],
    multi_item_requests: Optional[torch.Tensor],
    token_pos_in_items: Optional[torch.Tensor],
    meta: torch.Tensor,
    batch_size: int,
    item_capacity: int,
    part_o: torch.Tensor,
    part_lse: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    block_m: int,
    block_n: int,
    num_items: int,
    num_merges: int,
    causal: bool,
    sm_scale: float,
    logits_soft_cap: float,
    window_left: int,
    pos_encoding_mode: str,
    rope_scale: float,
    rope_theta: float,
    v_scale: float,
    backend: str,
) -> None:
    """Batch prefill over a ragged (``page_indices`` None) or paged cache with a planned work list (see
    kernels.batch_prefill): q ``[total_qo, Hq, Dqk]``; writes out ``[total_qo, Hq, Dvo]``, lse ``[total_qo, Hq]``.
    Multi-item scoring: ``multi_item_requests`` int32 ``[B, 2]`` (prefix_len, first entry in ``token_pos_in_items``)
    and ``token_pos_in_items`` int32 (flashtile/_core/multi_item.py), else both None."""
    _batch_prefill_impl(q, k, v, page_indices, packed_mask, multi_item_requests, token_pos_in_items, meta, batch_size,
                        item_capacity, part_o, part_lse, out, lse, block_m, block_n, num_items, num_merges, causal,
                        sm_scale, logits_soft_cap, window_left, pos_encoding_mode, rope_scale, rope_theta, v_scale,
                        backend)


@batch_prefill.register_fake
def _batch_prefill_fake(*args) -> None:
    return None


def call_batch_prefill(*args) -> None:
    (batch_prefill if torch.compiler.is_compiling() else _batch_prefill_impl)(*args)

