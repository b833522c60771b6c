"""Page management for the paged KV cache (``flashinfer.page``; api_spec.md §1.2, §8).

A paged cache stores each request's keys and values in fixed-size pages listed by a CSR page table:
request ``b`` owns pages ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]``, its last page holds
``kv_last_page_len[b]`` tokens, and token ``t`` of the request lives in page
``kv_indices[kv_indptr[b] + t // page_size]``, slot ``t % page_size``.

A decode or prefill step appends new tokens in three calls::

    seq_lens = get_seq_lens(kv_indptr, kv_last_page_len, page_size)    # lengths after the append
    batch_indices, positions = get_batch_indices_positions(append_indptr, seq_lens, nnz)
    append_paged_kv_cache(k, v, batch_indices, positions, paged_kv_cache,
                          kv_indices, kv_indptr, kv_last_page_len, kv_layout)

The caller allocates the pages first: the page table describes the cache *after* the append.

Index arrays are 1-D int32 (int64 is accepted). They may be on the host or on the cache's device;
host arrays are validated (bad values raise ValueError naming the argument) and copied to the
device. Device arrays are never read on the host (no synchronization, CUDA-graph capturable)
unless ``FLASHTILE_DEBUG=1``; the kernel skips any row whose request, position or page is out of
range rather than write outside the cache.
"""

from __future__ import annotations

import operator
from typing import Optional, Tuple, Union

import torch

from ._core import ops_page
from ._core.buffers import new_output
from ._core.checks import FP8_DTYPES, HALF_DTYPES, check_tensor, describe
from ._core.debug import validate_device_indices
from ._core.dispatch import implementation
from ._core.paged_kv import as_index_tensor, check_append_rows, check_page_table, unpack_paged_kv_cache
from .reference import page as _reference

__all__ = [
    "get_seq_lens",
    "get_batch_indices_positions",
    "append_paged_kv_cache",
    "append_paged_mla_kv_cache",
]

# Cache dtypes: the copy is bitwise, so any of these is written exactly.
CACHE_DTYPES = HALF_DTYPES + FP8_DTYPES + (torch.float32,)

PagedKVCache = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# Checks shared by the functions below
# ---------------------------------------------------------------------------------------------


def _check_page_size(page_size) -> int:
    if isinstance(page_size, bool):
        raise TypeError(f"page_size: expected a positive int, got {describe(page_size)}")
    try:
        page_size = operator.index(page_size)
    except TypeError:
        raise TypeError(f"page_size: expected a positive int, got {describe(page_size)}") from None
    if page_size < 1:
        raise ValueError(f"page_size: expected a positive int, got {page_size}")
    return page_size


def _check_nnz(nnz) -> int:
    if isinstance(nnz, bool) or isinstance(nnz, torch.Tensor):
        raise TypeError(f"nnz: expected a Python int (the number of appended rows), got {describe(nnz)}")
    try:
        nnz = operator.index(nnz)
    except TypeError:
        raise TypeError(f"nnz: expected a Python int (the number of appended rows), got {describe(nnz)}") from None
    if nnz < 0:
        raise ValueError(f"nnz: expected a non-negative int, got {nnz}")
    return nnz


def _check_indptr(name: str, x) -> torch.Tensor:
    x = as_index_tensor(name, x)
    if x.numel() < 1:
        raise ValueError(f"{name}: expected batch_size + 1 >= 1 entries, got 0")
    return x


def _to_device(x: torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    """Index arrays may come from the host; anything else must already be on the cache's device."""
    if x.device == device:
        return x
    if x.device.type == "cpu":
        return x.to(device, non_blocking=True)
    raise ValueError(f"{name}: expected a tensor on the host or on the cache's device {device}, got one on {x.device}")


def _check_append_indices(nnz, batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len, page_size,
                          num_pages, device):
    """Types, lengths and (for host arrays) values of the index arrays of an append; returns them on
    ``device``."""
    batch_indices = as_index_tensor("batch_indices", batch_indices)
    positions = as_index_tensor("positions", positions)
    for name, x in (("batch_indices", batch_indices), ("positions", positions)):
        if x.numel() != nnz:
            raise ValueError(
                f"{name}: expected {nnz} entries (one per appended row, nnz = append tensors' first dim), "
                f"got {x.numel()}"
            )
    kv_indices = as_index_tensor("kv_indices", kv_indices)
    kv_indptr = _check_indptr("kv_indptr", kv_indptr)
    kv_last_page_len = as_index_tensor("kv_last_page_len", kv_last_page_len, length=kv_indptr.numel() - 1)
    if validate_device_indices(kv_indptr, kv_indices, kv_last_page_len):
        check_page_table(kv_indptr, kv_indices, kv_last_page_len, page_size, num_pages)
    if validate_device_indices(batch_indices, positions, kv_indptr):
        check_append_rows(batch_indices, positions, kv_indptr, page_size)
    return tuple(
        _to_device(x, name, device)
        for name, x in (("batch_indices", batch_indices), ("positions", positions), ("kv_indices", kv_indices),
                        ("kv_indptr", kv_indptr))
    )


def _check_append_tensor(name: str, x, ndim: int, cache: torch.Tensor, cache_name: str, shape) -> None:
    """An append tensor: rank, the cache's dtype and device, trailing dims matching the cache."""
    check_tensor(name, x, ndim=ndim)
    if x.dtype != cache.dtype:
        raise TypeError(
            f"{name}: expected the dtype of {cache_name} ({str(cache.dtype).replace('torch.', '')}), got "
            f"{str(x.dtype).replace('torch.', '')} (the append copies bits; convert or quantize first)"
        )
    if x.device != cache.device:
        raise ValueError(f"{name}: expected a tensor on {cache_name}'s device {cache.device}, got one on {x.device}")
    if tuple(x.shape[1:]) != tuple(shape):
        what = "[nnz, num_kv_heads, head_dim]" if ndim == 3 else "[nnz, dim]"
        raise ValueError(
            f"{name}: expected {what} with trailing dims {list(shape)} (from {cache_name}), got {list(x.shape)}"
        )


def _check_cache_dtype(name: str, cache: torch.Tensor) -> None:
    if cache.dtype not in CACHE_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in CACHE_DTYPES)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(cache.dtype).replace('torch.', '')}")


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def get_seq_lens(kv_indptr: torch.Tensor, kv_last_page_len: torch.Tensor, page_size: int) -> torch.Tensor:
    """KV length of each request from its page table.

    Args:
        kv_indptr: ``[batch_size + 1]``, int32 (or int64); request ``b`` owns
            ``kv_indptr[b + 1] - kv_indptr[b]`` pages.
        kv_last_page_len: ``[batch_size]``, int32 (or int64), same device; tokens in each request's
            last page (``1..page_size``, 0 for a request without pages).
        page_size: tokens per page (int >= 1).

    Returns:
        ``[batch_size]`` on the inputs' device, dtype promoted from the inputs (int32 for int32):
        ``max(num_pages - 1, 0) * page_size + kv_last_page_len``. Pure tensor arithmetic, no sync.
    """
    kv_indptr = _check_indptr("kv_indptr", kv_indptr)
    kv_last_page_len = as_index_tensor("kv_last_page_len", kv_last_page_len, length=kv_indptr.numel() - 1)
    if kv_last_page_len.device != kv_indptr.device:
        raise ValueError(
            f"kv_last_page_len: expected a tensor on kv_indptr's device {kv_indptr.device}, got one on "
            f"{kv_last_page_len.device}"
        )
    return _reference.seq_lens(kv_indptr, kv_last_page_len, _check_page_size(page_size))


def get_batch_indices_positions(
    append_indptr: torch.Tensor,
    seq_lens: torch.Tensor,
    nnz: int,
    batch_indices: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Request and position of every appended row (the inputs of :func:`append_paged_kv_cache`).

    Args:
        append_indptr: ``[batch_size + 1]``, int32 (or int64), non-decreasing; request ``b``
            appends rows ``append_indptr[b]:append_indptr[b + 1]`` of the packed append tensors.
        seq_lens: ``[batch_size]``, int32 (or int64), same device: each request's KV length *after*
            the append (e.g. from :func:`get_seq_lens`), at least its number of appended rows.
        nnz: number of appended rows (Python int; normally ``append_indptr[-1]``). Rows outside
            ``[append_indptr[0], append_indptr[-1])`` (e.g. CUDA-graph padding) get batch index -1,
            which :func:`append_paged_kv_cache` skips, and position 0.
        batch_indices, positions: optional preallocated outputs, int32 ``[nnz]`` on
            ``append_indptr``'s device (written in place and returned).

    Returns:
        ``(batch_indices, positions)``, int32 ``[nnz]`` on ``append_indptr``'s device: for row ``r``
        of request ``b``, ``batch_indices[r] = b`` and
        ``positions[r] = seq_lens[b] - (append_indptr[b + 1] - r)`` (the appended tokens are the
        request's last ones).

    On CUDA (and with ``FLASHTILE_BACKEND=triton``) one small Triton kernel computes both (a binary
    search over ``append_indptr`` per row); on CPU the same in PyTorch ops. Neither reads device
    values on the host, so the call is CUDA-graph capturable. Host inputs are validated.
    """
    append_indptr = _check_indptr("append_indptr", append_indptr)
    batch_size = append_indptr.numel() - 1
    seq_lens = as_index_tensor("seq_lens", seq_lens, length=batch_size)
    device = append_indptr.device
    if seq_lens.device != device:
        raise ValueError(
            f"seq_lens: expected a tensor on append_indptr's device {device}, got one on {seq_lens.device}"
        )
    nnz = _check_nnz(nnz)
    outs = []
    for name, out in (("batch_indices", batch_indices), ("positions", positions)):
        if out is None:
            out = new_output((nnz,), torch.int32, device)
        else:
            check_tensor(name, out, shape=(nnz,), dtypes=(torch.int32,), device=device)
        outs.append(out)
    batch_indices, positions = outs
    if validate_device_indices(append_indptr, seq_lens):
        ip = append_indptr.to(torch.int64)
        if ip[0] < 0 or (ip[1:] < ip[:-1]).any():
            raise ValueError(f"append_indptr: must be non-negative and non-decreasing, got {ip.tolist()[:16]}")
        short = seq_lens.to(torch.int64) < ip[1:] - ip[:-1]
        if short.any():
            b = int(short.nonzero()[0, 0])
            raise ValueError(
                f"seq_lens: request {b} appends {int(ip[b + 1] - ip[b])} rows but its length after the append "
                f"is {int(seq_lens[b])}; seq_lens must count the appended tokens"
            )
    implementation("page", device).batch_indices_positions(append_indptr, seq_lens, batch_indices, positions)
    return batch_indices, positions


def append_paged_kv_cache(
    append_key: torch.Tensor,
    append_value: torch.Tensor,
    batch_indices: torch.Tensor,
    positions: torch.Tensor,
    paged_kv_cache: PagedKVCache,
    kv_indices: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    kv_layout: str = "NHD",
) -> None:
    """Write appended keys and values into their pages of a paged KV cache (in place).

    Row ``r`` goes to page ``kv_indices[kv_indptr[batch_indices[r]] + positions[r] // page_size]``,
    slot ``positions[r] % page_size``.

    Args:
        append_key: ``[nnz, num_kv_heads, head_dim]`` in every layout, the cache's dtype and device;
            any strides (e.g. a slice of a fused QKV projection).
        append_value: ``[nnz, num_kv_heads, head_dim_vo]``, like ``append_key``.
        batch_indices: ``[nnz]`` int32 (or int64): request of each row; -1 marks a padding row,
            which is not written (see :func:`get_batch_indices_positions`).
        positions: ``[nnz]`` int32 (or int64): position of each row inside its request;
            ``positions[r] // page_size`` must fall inside the request's pages.
        paged_kv_cache: float16, bfloat16, float8 (e4m3fn, e5m2) or float32, modified in place; either
            one tensor ``[max_num_pages, 2, page_size, num_kv_heads, head_dim]`` (NHD) /
            ``[max_num_pages, 2, num_kv_heads, page_size, head_dim]`` (HND) with K at index 0 and V
            at 1 of dim 1, or a tuple ``(k_cache, v_cache)`` of ``[max_num_pages, page_size,
            num_kv_heads, head_dim]`` (NHD) / ``[max_num_pages, num_kv_heads, page_size, head_dim]``
            (HND) tensors. Page size 1 may drop the page axis (4-D single tensor, 3-D tuple
            members). Views with any strides and a unit-stride last dim.
        kv_indices: ``[>= kv_indptr[-1]]`` int32 (or int64): page ids in ``[0, max_num_pages)``.
        kv_indptr: ``[batch_size + 1]`` int32 (or int64), non-decreasing (``kv_indptr[0]`` may be
            > 0): request ``b`` owns ``kv_indices[kv_indptr[b]:kv_indptr[b + 1]]``.
        kv_last_page_len: ``[batch_size]`` int32 (or int64): tokens in each request's last page
            (``1..page_size``; 0 for a request without pages), counted after the append.
        kv_layout: "NHD" or "HND" (the cache's layout; the append tensors are always NHD-like).

    The page table describes the cache *after* the append (the caller allocates pages first).
    Index arrays on the host are validated (ValueError) and copied to the cache's device; device
    index arrays are used as given (rows out of range are skipped, never written out of bounds).

    Raises:
        InvalidOptionError (a ValueError and KeyError): bad ``kv_layout``.
        TypeError: a non-tensor argument, an append dtype other than the cache's, an unsupported cache
            dtype, a non-integer index array.
        ValueError: wrong ranks or shapes (heads, head_dim, nnz), devices, or (host arrays) indices out
            of range.
    """
    kv = unpack_paged_kv_cache(paged_kv_cache, kv_layout)
    _check_cache_dtype("paged_kv_cache", kv.k)
    head_dim, head_dim_vo = kv.k.shape[3], kv.v.shape[3]
    _check_append_tensor("append_key", append_key, 3, kv.k, "paged_kv_cache", (kv.num_kv_heads, head_dim))
    _check_append_tensor("append_value", append_value, 3, kv.v, "paged_kv_cache", (kv.num_kv_heads, head_dim_vo))
    nnz = append_key.shape[0]
    if append_value.shape[0] != nnz:
        raise ValueError(f"append_value: expected {nnz} rows (append_key has {nnz}), got {append_value.shape[0]}")
    batch_indices, positions, kv_indices, kv_indptr = _check_append_indices(
        nnz, batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len, kv.page_size, kv.num_pages,
        kv.device,
    )
    if isinstance(paged_kv_cache, torch.Tensor):
        cache, v_cache = paged_kv_cache, None
    else:
        cache, v_cache = paged_kv_cache
    ops_page.call_append_paged_kv_cache(
        append_key, append_value, batch_indices, positions, cache, v_cache, kv_indices, kv_indptr, kv_layout, "auto"
    )


def append_paged_mla_kv_cache(
    append_ckv: torch.Tensor,
    append_kpe: torch.Tensor,
    batch_indices: torch.Tensor,
    positions: torch.Tensor,
    ckv_cache: torch.Tensor,
    kpe_cache: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_last_page_len: torch.Tensor,
) -> None:
    """Write appended MLA rows (compressed KV and its RoPE part) into paged MLA caches (in place).

    Same addressing as :func:`append_paged_kv_cache`, with one "head" per token.

    Args:
        append_ckv: ``[nnz, ckv_dim]`` (DeepSeek: 512), ``ckv_cache``'s dtype and device, any strides.
        append_kpe: ``[nnz, kpe_dim]`` (DeepSeek: 64), ``kpe_cache``'s dtype and device, any strides.
        batch_indices, positions: ``[nnz]`` int32 (or int64), as in :func:`append_paged_kv_cache`.
        ckv_cache: ``[max_num_pages, page_size, ckv_dim]``, float16/bfloat16/float8/float32, modified
            in place; any strides with a unit-stride last dim.
        kpe_cache: ``[max_num_pages, page_size, kpe_dim]``, same pages and page size as ``ckv_cache``.
        kv_indices, kv_indptr, kv_last_page_len: the page table, as in :func:`append_paged_kv_cache`.

    Any ``ckv_dim``/``kpe_dim`` works (upstream documents only 512 and 64).

    Raises:
        TypeError / ValueError: as :func:`append_paged_kv_cache`.
    """
    for name, c in (("ckv_cache", ckv_cache), ("kpe_cache", kpe_cache)):
        check_tensor(name, c, ndim=3, last_dim_contiguous=True)
        _check_cache_dtype(name, c)
    if ckv_cache.shape[:2] != kpe_cache.shape[:2]:
        raise ValueError(
            f"kpe_cache: expected the [max_num_pages, page_size] of ckv_cache {list(ckv_cache.shape[:2])}, "
            f"got {list(kpe_cache.shape[:2])}"
        )
    if kpe_cache.device != ckv_cache.device:
        raise ValueError(
            f"kpe_cache: expected a tensor on ckv_cache's device {ckv_cache.device}, got one on {kpe_cache.device}"
        )
    _check_append_tensor("append_ckv", append_ckv, 2, ckv_cache, "ckv_cache", ckv_cache.shape[2:])
    _check_append_tensor("append_kpe", append_kpe, 2, kpe_cache, "kpe_cache", kpe_cache.shape[2:])
    nnz = append_ckv.shape[0]
    if append_kpe.shape[0] != nnz:
        raise ValueError(f"append_kpe: expected {nnz} rows (append_ckv has {nnz}), got {append_kpe.shape[0]}")
    num_pages, page_size = ckv_cache.shape[0], ckv_cache.shape[1]
    batch_indices, positions, kv_indices, kv_indptr = _check_append_indices(
        nnz, batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len, page_size, num_pages,
        ckv_cache.device,
    )
    ops_page.call_append_paged_mla_kv_cache(
        append_ckv, append_kpe, batch_indices, positions, ckv_cache, kpe_cache, kv_indices, kv_indptr, "auto"
    )
