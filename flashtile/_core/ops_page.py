"""torch.library registrations of the page ops (``flashtile.page``): the cache appends.

Each op mutates the cache tensors it is given (``mutates_args``) and returns nothing; the fake
implementation is empty, so torch.compile(fullgraph=True) traces a decode step that appends to the
cache, and CUDA-graph capture sees no allocation. The cache is passed in the form the caller gave
it (one tensor, or the two members of a ``(k, v)`` tuple) and unpacked inside, so every tensor the
op writes is one of its arguments. Each op dispatches per call (dispatch.py) to the Triton kernel
or the reference path.
"""

from __future__ import annotations

from typing import Optional

import torch

from .dispatch import implementation
from .paged_kv import unpack_paged_kv_cache

__all__ = [
    "append_paged_kv_cache",
    "append_paged_mla_kv_cache",
    "call_append_paged_kv_cache",
    "call_append_paged_mla_kv_cache",
]


def _append_rows(append_k, append_v, batch_indices, positions, k_pages, v_pages, kv_indices, kv_indptr,
                 backend: str) -> None:
    """Shared by both ops: append ``[nnz, H, D]`` rows into ``[pages, page_size, H, D]`` page views."""
    implementation("page", k_pages.device, backend).append_paged_kv(
        append_k, append_v, batch_indices, positions, k_pages, v_pages, kv_indices, kv_indptr)


def _append_paged_kv_cache_impl(append_key, append_value, batch_indices, positions, paged_kv_cache, v_cache,
                                kv_indices, kv_indptr, kv_layout, backend) -> None:
    cache = paged_kv_cache if v_cache is None else (paged_kv_cache, v_cache)
    kv = unpack_paged_kv_cache(cache, kv_layout)
    _append_rows(append_key, append_value, batch_indices, positions, kv.k, kv.v, kv_indices, kv_indptr, backend)


def _append_paged_mla_kv_cache_impl(append_ckv, append_kpe, batch_indices, positions, ckv_cache, kpe_cache,
                                    kv_indices, kv_indptr, backend) -> None:
    # One "head": ckv is the K row, kpe the V row ([nnz, 1, D] into [pages, page_size, 1, D]).
    _append_rows(append_ckv.unsqueeze(1), append_kpe.unsqueeze(1), batch_indices, positions,
                 ckv_cache.unsqueeze(2), kpe_cache.unsqueeze(2), kv_indices, kv_indptr, backend)


@torch.library.custom_op("flashtile::append_paged_kv_cache", mutates_args=("paged_kv_cache", "v_cache"))
def append_paged_kv_cache(
    append_key: torch.Tensor,
    append_value: torch.Tensor,
    batch_indices: torch.Tensor,
    positions: torch.Tensor,
    paged_kv_cache: torch.Tensor,
    v_cache: Optional[torch.Tensor],
    kv_indices: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_layout: str,
    backend: str,
) -> None:
    """Append ``[nnz, H, D]`` K/V rows into a paged cache: ``paged_kv_cache`` is the single 5-D (or
    4-D, page size 1) cache tensor with ``v_cache=None``, or the K member of a ``(k, v)`` tuple with
    ``v_cache`` its V member. Index arrays are on the cache's device (already checked)."""
    _append_paged_kv_cache_impl(append_key, append_value, batch_indices, positions, paged_kv_cache, v_cache,
                                kv_indices, kv_indptr, kv_layout, backend)


@append_paged_kv_cache.register_fake
def _append_paged_kv_cache_fake(append_key, append_value, batch_indices, positions, paged_kv_cache, v_cache,
                                kv_indices, kv_indptr, kv_layout, backend) -> None:
    return None


@torch.library.custom_op("flashtile::append_paged_mla_kv_cache", mutates_args=("ckv_cache", "kpe_cache"))
def append_paged_mla_kv_cache(
    append_ckv: torch.Tensor,
    append_kpe: torch.Tensor,
    batch_indices: torch.Tensor,
    positions: torch.Tensor,
    ckv_cache: torch.Tensor,
    kpe_cache: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_indptr: torch.Tensor,
    backend: str,
) -> None:
    """Append ``[nnz, D_ckv]``/``[nnz, D_kpe]`` rows into ``[pages, page_size, D]`` MLA caches."""
    _append_paged_mla_kv_cache_impl(append_ckv, append_kpe, batch_indices, positions, ckv_cache, kpe_cache,
                                    kv_indices, kv_indptr, backend)


@append_paged_mla_kv_cache.register_fake
def _append_paged_mla_kv_cache_fake(append_ckv, append_kpe, batch_indices, positions, ckv_cache, kpe_cache,
                                    kv_indices, kv_indptr, backend) -> None:
    return None


# Eager calls skip the custom-op dispatcher (tens of microseconds of host time per call); under
# torch.compile the registered op is what gets traced. Both run the same implementation.


def call_append_paged_kv_cache(*args) -> None:
    (append_paged_kv_cache if torch.compiler.is_compiling() else _append_paged_kv_cache_impl)(*args)


def call_append_paged_mla_kv_cache(*args) -> None:
    (append_paged_mla_kv_cache if torch.compiler.is_compiling() else _append_paged_mla_kv_cache_impl)(*args)
