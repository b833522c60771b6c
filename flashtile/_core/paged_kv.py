"""The paged KV cache in the forms upstream accepts (api_spec.md §1.2), as two NHD page views.

Every API that takes a ``paged_kv_cache`` calls :func:`unpack_paged_kv_cache`: it accepts a 5-D tensor
``[pages, 2, page_size, heads, dim]`` (NHD) / ``[pages, 2, heads, page_size, dim]`` (HND), a
``(k_cache, v_cache)`` tuple of 4-D tensors, and the page-size-1 forms (a 4-D single tensor, 3-D
tuple members), and returns K and V as ``[pages, page_size, heads, dim]`` views (HND is transposed,
never copied), so kernels and references see one layout and read the strides.

It also holds the page-table checks (CSR ``indptr``/``indices``/``last_page_len``) shared by the
page ops and the wrappers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..reference.page import seq_lens
from .checks import check_option, describe
from .debug import validate_device_indices
from .host_arrays import host_int64, host_int64_view, host_max, host_min, host_view

__all__ = [
    "kv_page_views",
    "PagedKV",
    "unpack_paged_kv_cache",
    "as_index_tensor",
    "check_page_table",
    "HostPageTable",
    "read_page_table",
    "check_append_rows",
    "KV_LAYOUTS",
]

KV_LAYOUTS = ("NHD", "HND")


@dataclass(frozen=True)
class PagedKV:
    k: torch.Tensor  # [num_pages, page_size, num_kv_heads, head_dim_qk] view, last dim unit-stride
    v: torch.Tensor  # [num_pages, page_size, num_kv_heads, head_dim_vo] view, last dim unit-stride

    @property
    def num_pages(self) -> int:
        return self.k.shape[0]

    @property
    def page_size(self) -> int:
        return self.k.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device


def _page_view(x: torch.Tensor, hnd: bool) -> torch.Tensor:
    """A 4-D page tensor (or 3-D: page size 1) as an NHD view (no checks)."""
    if x.dim() == 3:  # [pages, heads, dim]: page size 1, the page axis sits where the layout puts it
        x = x.unsqueeze(2 if hnd else 1)
    return x.transpose(1, 2) if hnd else x


def kv_page_views(paged_kv_cache, kv_layout: str) -> tuple:
    """``(k, v)`` NHD page views ``[pages, page_size, heads, dim]`` of a paged cache (a 5-D tensor, 4-D
    for page size 1, or a ``(k_cache, v_cache)`` pair), without checks: for a cache of a form
    :func:`unpack_paged_kv_cache` has accepted (run()'s replays)."""
    hnd = kv_layout == "HND"
    if isinstance(paged_kv_cache, torch.Tensor):
        x = paged_kv_cache
        if x.dim() == 4:  # [pages, 2, heads, dim]: page size 1
            x = x.unsqueeze(3 if hnd else 2)
        k, v = x[:, 0], x[:, 1]
        return (k.transpose(1, 2), v.transpose(1, 2)) if hnd else (k, v)
    k, v = paged_kv_cache
    return _page_view(k, hnd), _page_view(v, hnd)


def unpack_paged_kv_cache(paged_kv_cache, kv_layout: str = "NHD", name: str = "paged_kv_cache") -> PagedKV:
    """Split a paged cache into K and V page views ``[pages, page_size, heads, dim]`` (no copies).

    Raises:
        InvalidOptionError: ``kv_layout`` is not "NHD" or "HND".
        TypeError: the cache is neither a tensor nor a (k, v) tuple, or K and V dtypes differ.
        ValueError: wrong rank, or K and V disagree on pages, page size, heads or device.
    """
    check_option("kv_layout", kv_layout, KV_LAYOUTS)
    if isinstance(paged_kv_cache, torch.Tensor):
        x = paged_kv_cache
        if x.dim() not in (4, 5) or x.shape[1] != 2:
            raise ValueError(
                f"{name}: expected a 5-D tensor [pages, 2, page_size, heads, dim] ({kv_layout} layout; "
                f"[pages, 2, heads, dim] for page size 1), got {describe(paged_kv_cache)}"
            )
    elif isinstance(paged_kv_cache, (tuple, list)) and len(paged_kv_cache) == 2:
        for part, t in zip(("k_cache", "v_cache"), paged_kv_cache):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: the {part} entry must be a torch.Tensor, got {describe(t)}")
            if t.dim() not in (3, 4):
                raise ValueError(f"{name} ({part[0]}): expected a 4-D [pages, page_size, heads, dim] (or 3-D) tensor, "
                                 f"got {describe(t)}")
    else:
        raise TypeError(
            f"{name}: expected a tensor [pages, 2, page_size, heads, dim] or a (k_cache, v_cache) tuple, "
            f"got {describe(paged_kv_cache)}"
        )
    k, v = kv_page_views(paged_kv_cache, kv_layout)
    for part, x in (("k", k), ("v", v)):
        if x.shape[-1] > 1 and x.stride(-1) != 1:
            raise ValueError(f"{name} ({part}): the head_dim axis must have stride 1, got strides {tuple(x.stride())}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"{name}: K and V must have the same [pages, page_size, heads] ({kv_layout} as NHD), "
            f"got {list(k.shape[:3])} and {list(v.shape[:3])}"
        )
    if k.dtype != v.dtype:
        raise TypeError(f"{name}: K and V must have one dtype, got {k.dtype} and {v.dtype}")
    if k.device != v.device:
        raise ValueError(f"{name}: K and V must be on one device, got {k.device} and {v.device}")
    return PagedKV(k, v)


def as_index_tensor(name: str, x, *, length: Optional[int] = None) -> torch.Tensor:
    """A 1-D integer index array (int32 or int64, any device) as given; checks rank, dtype, length."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a 1-D int32 torch.Tensor, got {describe(x)}")
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected dtype int32 (or int64), got {str(x.dtype).replace('torch.', '')}")
    if x.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor, got shape {list(x.shape)}")
    if length is not None and x.numel() != length:
        raise ValueError(f"{name}: expected {length} entries, got {x.numel()}")
    return x


def check_page_table(
    indptr,
    indices,
    last_page_len,
    page_size: int,
    num_pages: Optional[int] = None,
) -> None:
    """Validate a CSR page table held on the host (callers skip this for device tensors).

    ``indptr`` is non-decreasing with ``indptr[-1] <= len(indices)``; every used index is in
    ``[0, num_pages)`` when ``num_pages`` is known; ``last_page_len[i]`` is in ``1..page_size`` for a
    request with pages (a request without pages has length 0; its ``last_page_len`` is not read).
    Each array: a 1-D int tensor (any device: copied to the host) or numpy array.
    """
    ip = host_int64_view(indptr)  # arrays may sit on different devices: check on the host
    if ip.size < 1:
        raise ValueError("indptr: expected batch_size + 1 >= 1 entries, got 0")
    pages = ip[1:] - ip[:-1]
    if pages.size and host_min(pages) < 0:
        raise ValueError(f"indptr: must be non-decreasing, got {ip[:16].tolist()}")
    num_indices = indices.numel() if isinstance(indices, torch.Tensor) else len(indices)
    first, last = int(ip[0]), int(ip[-1])
    if first < 0 or last > num_indices:
        raise ValueError(
            f"indptr: entries must lie in [0, len(indices)={num_indices}], got first {first}, last {last}"
        )
    if num_pages is not None and last > first:
        used = host_view(indices[first:last])
        lo, hi = int(used.min()), int(used.max())
        if lo < 0 or hi >= num_pages:
            raise ValueError(f"indices: page ids must lie in [0, {num_pages}) (pages of the cache), got [{lo}, {hi}]")
    lp = host_view(last_page_len)
    # An entry out of range is an error only for a request with pages (one without has length 0 and its
    # last_page_len is not read); most tables have none, which the smallest and largest entry show.
    if lp.size and (host_min(lp) < 1 or host_max(lp) > page_size):
        bad = np.flatnonzero(((lp < 1) | (lp > page_size)) & (pages > 0))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"last_page_len: request {i} has {int(pages[i])} pages and last_page_len {int(lp[i])}; expected "
                f"1..{page_size} (page_size) for a request with pages"
            )


@dataclass(frozen=True)
class HostPageTable:
    """What a wrapper's plan() learns from a page table on the host: int64 numpy arrays, owned by the
    table (never views of the caller's tensors; ``torch.from_numpy`` views them as CPU tensors)."""

    indptr: np.ndarray  # [B + 1], as given (indptr[0] may be > 0)
    kv_lens: np.ndarray  # [B], 0 for a request without pages
    max_page_id: Optional[int]  # largest page id used, when the indices were read on the host

    @property
    def batch_size(self) -> int:
        return self.kv_lens.size

    @property
    def first(self) -> int:
        return int(self.indptr[0])

    @property
    def last(self) -> int:
        return int(self.indptr[-1])


def read_page_table(indptr, indices, last_page_len, page_size: int,
                    names=("indptr", "indices", "last_page_len"), last_page_len_is_one: bool = False) -> HostPageTable:
    """Check a CSR page table and derive the KV lengths on the host (plan() may synchronize).

    ``indptr`` and ``last_page_len`` are always read (a device-to-host copy when they live on the GPU);
    ``indices`` are read and validated only when on the host, or with ``FLASHTILE_DEBUG=1``: the
    production path with a device page table never copies it. ``last_page_len_is_one`` (page size 1,
    where a request with pages always fills its last page) skips reading ``last_page_len``.
    """
    indptr = as_index_tensor(names[0], indptr)
    indices = as_index_tensor(names[1], indices)
    last_page_len = as_index_tensor(names[2], last_page_len)
    batch = last_page_len.numel()
    if indptr.numel() != batch + 1:
        raise ValueError(f"{names[0]}: expected batch_size + 1 = {batch + 1} entries (batch size from "
                         f"{names[2]}), got {indptr.numel()}")
    indptr_h = host_int64(indptr)
    last_h = np.ones(batch, dtype=np.int64) if last_page_len_is_one else host_int64_view(last_page_len)
    first, last = int(indptr_h[0]), int(indptr_h[-1])
    if last > indices.numel() and batch > 0:
        raise ValueError(f"{names[0]}: its last entry {last} exceeds len({names[1]})={indices.numel()}")
    max_page_id = None
    if validate_device_indices(indices):
        check_page_table(indptr_h, indices, last_h, page_size)
        if last > first:
            max_page_id = host_max(host_view(indices[first:last]))
    elif first < 0 or (indptr_h[1:] < indptr_h[:-1]).any():
        raise ValueError(f"{names[0]}: must be non-negative and non-decreasing, got {indptr_h[:16].tolist()}")
    return HostPageTable(indptr=indptr_h, kv_lens=seq_lens(indptr_h, last_h, page_size), max_page_id=max_page_id)


def check_append_rows(
    batch_indices: torch.Tensor, positions: torch.Tensor, indptr: torch.Tensor, page_size: int
) -> None:
    """Validate appended rows against a CSR page table held on the host (callers skip device tensors).

    Row ``r`` is written to page ``indices[indptr[b] + positions[r] // page_size]`` of request
    ``b = batch_indices[r]``: ``b`` must be in ``[0, batch_size)`` (or -1, a padding row that is not
    written) and ``positions[r] // page_size`` must fall inside the request's pages.
    """
    batch_size = indptr.numel() - 1
    # The arrays may sit on different devices (host rows, device table): compare on the host.
    b = batch_indices.to("cpu", torch.int64)
    positions, indptr = positions.to("cpu"), indptr.to("cpu")
    bad = (b < -1) | (b >= batch_size)
    if bad.any():
        r = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"batch_indices: entries must lie in [0, {batch_size}) (batch size from kv_indptr) or be -1 (padding), "
            f"got {int(b[r])} at row {r}"
        )
    rows = (b >= 0).nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    b, p = b[rows], positions.to(torch.int64)[rows]
    ip = indptr.to(torch.int64)
    pages = ip[b + 1] - ip[b]
    bad = (p < 0) | (torch.div(p, page_size, rounding_mode="floor") >= pages)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        r, req = int(rows[i]), int(b[i])
        raise ValueError(
            f"positions: row {r} of request {req} has position {int(p[i])}, outside the request's "
            f"{int(pages[i])} page(s) of {page_size} tokens (kv_indptr/kv_indices must describe the cache "
            "after the append)"
        )
