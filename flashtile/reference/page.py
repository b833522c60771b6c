"""Pure-PyTorch page operations: the CPU path and the readable spec of ``flashtile/kernels/page.py``.

Same contract as the kernels (shapes in that module's docstring): rows with a batch index outside
``[0, batch_size)`` (``-1``: padding), a negative position, a position past the request's pages or a
page id outside the cache are skipped. The copy is bitwise (integer views of the same width), so
every cache dtype (fp16, bf16, fp8, fp32) is written exactly.
"""

from __future__ import annotations

import torch

__all__ = ["append_paged_kv", "batch_indices_positions", "seq_lens"]

_BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(_BITS_DTYPE[x.element_size()])


def seq_lens(kv_indptr, kv_last_page_len, page_size: int):
    """KV length of each request: ``(num_pages - 1) * page_size + last_page_len``, and 0 for a request
    with no pages whatever its ``last_page_len`` says (engines pass ``last_page_len = 1`` for requests
    without a cached prefix). Every API derives KV lengths here. Takes torch tensors (any device, no
    sync) or numpy arrays (the host planner, _core/paged_kv.py) and returns the same kind, with the
    promoted dtype of the inputs (int32 for int32 inputs)."""
    num_pages = kv_indptr[1:] - kv_indptr[:-1]
    return ((num_pages - 1) * page_size + kv_last_page_len) * (num_pages > 0)


def append_paged_kv(
    append_k: torch.Tensor,
    append_v: torch.Tensor,
    batch_indices: torch.Tensor,
    positions: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_indptr: torch.Tensor,
) -> None:
    """``k_pages[page(r), positions[r] % page_size] = append_k[r]`` (and V) for every valid row ``r``,
    with ``page(r) = kv_indices[kv_indptr[batch_indices[r]] + positions[r] // page_size]``.

    append_k/append_v: ``[nnz, H, D]`` (D may differ between K and V); k_pages/v_pages:
    ``[num_pages, page_size, H, D]`` views, modified in place; index arrays 1-D int32/int64.
    """
    batch_size = kv_indptr.numel() - 1
    num_pages, page_size = k_pages.shape[0], k_pages.shape[1]
    if append_k.shape[0] == 0 or batch_size == 0 or num_pages == 0 or kv_indices.numel() == 0:
        return
    b = batch_indices.to(torch.int64)
    p = positions.to(torch.int64)
    ok = (b >= 0) & (b < batch_size) & (p >= 0)
    b = b.clamp(0, batch_size - 1)
    p = p.clamp(min=0)
    indptr = kv_indptr.to(torch.int64)
    entry = indptr[b] + torch.div(p, page_size, rounding_mode="floor")
    ok &= (entry >= 0) & (entry < indptr[b + 1]) & (entry < kv_indices.numel())
    page = kv_indices.to(torch.int64)[entry.clamp(0, kv_indices.numel() - 1)]
    ok &= (page >= 0) & (page < num_pages)
    rows = ok.nonzero().squeeze(1)
    page, slot = page[rows], (p % page_size)[rows]
    _bits(k_pages)[page, slot] = _bits(append_k)[rows]
    _bits(v_pages)[page, slot] = _bits(append_v)[rows]


def batch_indices_positions(
    append_indptr: torch.Tensor, seq_lens: torch.Tensor, batch_indices: torch.Tensor, positions: torch.Tensor
) -> None:
    """Row ``r`` of request ``b`` (``append_indptr[b] <= r < append_indptr[b+1]``) gets
    ``batch_indices[r] = b`` and ``positions[r] = seq_lens[b] - (append_indptr[b+1] - r)`` (the
    appended tokens are the request's last ones); rows outside ``[append_indptr[0],
    append_indptr[-1])`` get -1 and 0. Outputs: int32 ``[nnz]``, filled in place. No host sync."""
    nnz = batch_indices.numel()
    if nnz == 0:
        return
    indptr = append_indptr.to(torch.int64)
    r = torch.arange(nnz, device=indptr.device, dtype=torch.int64)
    valid = (r >= indptr[0]) & (r < indptr[-1])
    # Requests that end at or before row r; equals r's request for rows inside the range.
    b = torch.searchsorted(indptr[1:].contiguous(), r, right=True)
    b = b.clamp(max=max(indptr.numel() - 2, 0))
    if indptr.numel() > 1:
        pos = seq_lens.to(torch.int64)[b] - (indptr[b + 1] - r)
    else:
        pos = torch.zeros_like(r)
    batch_indices.copy_(torch.where(valid, b, -1))
    positions.copy_(torch.where(valid, pos, 0))
