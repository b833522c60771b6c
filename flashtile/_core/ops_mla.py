"""The MLA op boundary: ``flashtile::mla_paged``, a destination-passing torch.library custom op (for
torch.compile; same conventions as ops.py) over the function of the same arguments in
flashtile/kernels/mla.py or flashtile/reference/mla.py. Eager calls skip the dispatcher."""

from __future__ import annotations

import dataclasses

import torch

from . import dispatch
from .mla_tiles import MlaConfig, MlaMeta
from .ops import eager_only

__all__ = ["mla_paged", "call_mla_paged"]

_TENSORS = ("qo_indptr", "kv_indptr", "kv_indices", "kv_len", "work", "part_o", "part_lse")
_INTS = ("req_offset", "token_offset", "item_offset", "num_items", "max_splits")


def _impl(q_nope, q_pe, ckv_cache, kpe_cache, meta: MlaMeta, out, lse, sm_scale, ckv_scale, kpe_scale, causal,
          backend, variant=None) -> None:
    if q_nope.shape[0] == 0:
        return
    extra = {} if variant is None else {"variant": variant}
    dispatch.implementation("mla", q_nope.device, backend).mla_paged_forward(
        q_nope, q_pe, ckv_cache, kpe_cache, meta, out, lse, sm_scale=sm_scale, ckv_scale=ckv_scale,
        kpe_scale=kpe_scale, causal=causal, **extra)




@torch.library.custom_op(
    "flashtile::mla_paged", mutates_args=("part_o", "part_lse", "out", "lse"),
    schema="(Tensor q_nope, Tensor q_pe, Tensor ckv_cache, Tensor kpe_cache, Tensor qo_indptr, Tensor kv_indptr, "
           "Tensor kv_indices, Tensor kv_len, Tensor work, Tensor(a!) part_o, Tensor(b!) part_lse, Tensor(c!) out, "
           "Tensor(d!) lse, int req_offset, int token_offset, int item_offset, int num_items, int max_splits, "
           "int block_m, int block_n, int num_warps, int num_stages, int out_split, bool graph, float sm_scale, "
           "float ckv_scale, float kpe_scale, bool causal, str backend) -> ()")
def mla_paged(q_nope, q_pe, ckv_cache, kpe_cache, qo_indptr, kv_indptr, kv_indices, kv_len, work, part_o, part_lse,
              out, lse, req_offset, token_offset, item_offset, num_items, max_splits, block_m, block_n, num_warps,
              num_stages, out_split, graph, sm_scale, ckv_scale, kpe_scale, causal, backend) -> None:
    """MLA attention of a planned batch (flashtile/kernels/mla.py): q_nope ``[nnz, H, Dc]``, q_pe
    ``[nnz, H, Dp]``, caches ``[pages, page_size, D]``; writes out ``[nnz, H, Dc]`` and lse ``[nnz, H]``
    (part_o / part_lse: split-KV scratch); the ints are the plan's work-list layout and launch config."""
    meta = MlaMeta(qo_indptr, kv_indptr, kv_indices, kv_len, work, req_offset, token_offset, item_offset, num_items,
                   max_splits, part_o, part_lse, MlaConfig(block_m, block_n, num_warps, num_stages, out_split), graph)
    _impl(q_nope, q_pe, ckv_cache, kpe_cache, meta, out, lse, sm_scale, ckv_scale, kpe_scale, causal, backend)


@mla_paged.register_fake
def _mla_paged_fake(*args) -> None:
    return None


def op_args(q_nope, q_pe, ckv_cache, kpe_cache, meta: MlaMeta, out, lse, sm_scale, ckv_scale, kpe_scale, causal,
            backend) -> tuple:
    """The flat arguments of :func:`mla_paged` for one call."""
    return (q_nope, q_pe, ckv_cache, kpe_cache, *(getattr(meta, n) for n in _TENSORS[:5]), meta.part_o,
            meta.part_lse, out, lse, *(getattr(meta, n) for n in _INTS), *dataclasses.astuple(meta.config),
            meta.graph, sm_scale, ckv_scale, kpe_scale, causal, backend)


def call_mla_paged(q_nope, q_pe, ckv_cache, kpe_cache, meta: MlaMeta, out, lse, *, sm_scale, ckv_scale, kpe_scale,
                   causal, backend, variant=None) -> None:
    """Run the op: its implementation when eager, the registered op when torch.compile traces.
    ``variant``: a bound attention variant (flashtile/variants.py) or None."""
    if variant is not None:  # Triton functions cannot be op arguments: always the implementation (as ops.call)
        eager_only(_impl)(q_nope, q_pe, ckv_cache, kpe_cache, meta, out, lse, sm_scale, ckv_scale, kpe_scale,
                           causal, backend, variant=variant)
    elif torch.compiler.is_compiling():
        mla_paged(*op_args(q_nope, q_pe, ckv_cache, kpe_cache, meta, out, lse, sm_scale, ckv_scale, kpe_scale,
                           causal, backend))
    else:
        _impl(q_nope, q_pe, ckv_cache, kpe_cache, meta, out, lse, sm_scale, ckv_scale, kpe_scale, causal, backend)
