"""Block-sparse attention as batch prefill over a paged KV cache (flashtile/sparse.py's plans).

A block-sparse mask of ``R x C`` blocks over ``M`` queries and ``N`` keys (BSR: ``indptr``,
``indices``) is a paged KV cache with page size ``C``: K/V ``[N, H, D]`` viewed as ``N / C`` pages of
``C`` rows (no copy), and each block row, its ``R`` queries, one request whose page list is the row's
block-column ids. Vector sparsity is ``C = 1``. Per-KV-head variable blocks
(:func:`variable_requests`) become one request per (KV head, block row) over pages of one token.

Positions are global: query row ``i`` (of the ``M``) sits at position ``i`` and key column ``j`` at
``j``, so ``causal`` means ``j <= i`` (not bottom-right aligned per block row as batch prefill's
causal is). The paged kernel's causal flag gives exactly that when every request's gathered keys end
with the keys at its own rows' positions and the earlier ones are visible to all its rows (a block
row that ends on its diagonal block with ``C`` equal to its row count, the usual causal pattern); the
plan then uses it. Otherwise causal becomes a custom mask (bits packed per request), built here.
Blocks no row of the request can see are dropped either way. Without a mask, page lists made of
aligned runs of consecutive ids are read as larger pages (:func:`_coarsen`).

Host-side arithmetic (numpy, as the other planners; _core/host_arrays.py); property-tested in
tests/test_sparse_map.py against a dense expansion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .._core.checks import check_tensor, describe
from .._core.host_arrays import host_int64, host_view

__all__ = ["SparseRequests", "bsr_requests", "variable_requests", "expand_requests"]


@dataclass
class SparseRequests:
    """A batch prefill over a paged cache that computes the sparse attention.

    ``qo_indptr`` ``[B + 1]``: request ``b`` owns query rows ``qo_indptr[b]:qo_indptr[b + 1]`` of the
    kernel's q. ``kv_indptr`` ``[B + 1]``, ``kv_indices`` ``[nnz]``: its pages (ids of ``page_size`` rows
    of the kernel's K/V), every page full. ``key_start`` ``[nnz]``: the global column of each page's
    first key. ``row_start`` ``[B]``: the global position of each request's first query row.
    ``causal``: use the paged kernel's (bottom-right) causal mask. ``packed_mask``: uint8, each request's
    ``[qo_len, kv_len]`` mask packed LSB first from a byte boundary (segment_packbits' layout), or None.
    All int arrays are int64 numpy on the host."""

    qo_indptr: np.ndarray
    kv_indptr: np.ndarray
    kv_indices: np.ndarray
    key_start: np.ndarray
    row_start: np.ndarray
    page_size: int
    causal: bool
    packed_mask: Optional[torch.Tensor]

    @property
    def batch_size(self) -> int:
        return self.qo_indptr.size - 1

    def tensors(self) -> tuple:
        """``(qo_indptr, kv_indptr, kv_indices, last_page_len)`` int32 CPU tensors for the paged plan."""
        def as_i32(a):
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32))
        last = np.full(self.batch_size, self.page_size, dtype=np.int32)
        return as_i32(self.qo_indptr), as_i32(self.kv_indptr), as_i32(self.kv_indices), torch.from_numpy(last)


def _int_arg(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {describe(value)}")
    return int(value)


def _index_array(name: str, x) -> np.ndarray:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a 1-D int32 torch.Tensor, got {describe(x)}")
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected dtype int32 (or int64), got {str(x.dtype).replace('torch.', '')}")
    if x.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor, got shape {list(x.shape)}")
    return host_int64(x)


def _segments(indptr: np.ndarray) -> np.ndarray:
    """The request of every entry of a CSR ``indptr`` (int64)."""
    return np.repeat(np.arange(indptr.size - 1), np.diff(indptr))


def bsr_requests(indptr, indices, M, N, R, C, *, mask=None, packed_mask=None, causal=False) -> SparseRequests:
    """Validate a BSR mask and map it to paged-prefill requests (one per block row, page size ``C``).

    Args:
        indptr: int32/int64 ``[MB + 1]``, ``MB = ceil(M / R)``, non-decreasing: block row ``b`` has the
            blocks ``indptr[b]:indptr[b + 1]`` of ``indices`` (``indptr[0]`` may be > 0).
        indices: int32/int64 ``[nnz]``: block-column ids in ``[0, N / C)``, no repeats within a row.
        M, N: query rows and key columns; ``N`` a multiple of ``C``. R, C: block shape; the last block row
            has ``M - (MB - 1) * R`` rows.
        mask: bool ``[len(indices), R, C]`` or None: which elements of each listed block attend (the BSR
            data array); replaces ``causal``.
        packed_mask: uint8 1-D or None: the requests' masks already in the paged layout (each block
            row's ``[rows, nnz_b * C]`` mask, row-major, packed LSB first from a byte boundary); wins over
            ``mask``.
        causal: key column ``j`` visible to query row ``i`` only when ``j <= i``.
    """
    M, N, R, C = (_int_arg(n, v) for n, v in (("M", M), ("N", N), ("R", R), ("C", C)))
    if N % C:
        raise ValueError(f"N: must be a multiple of C (the block width) = {C}, got N = {N}")
    MB, NB = -(-M // R), N // C
    ip = _index_array("indptr", indptr)
    idx = _index_array("indices", indices)
    if ip.size != MB + 1:
        raise ValueError(f"indptr: expected MB + 1 = {MB + 1} entries (MB = ceil(M / R) = ceil({M} / {R})), "
                         f"got {ip.size}")
    if ip[0] < 0 or (np.diff(ip) < 0).any():
        raise ValueError(f"indptr: must be non-negative and non-decreasing, got {ip.tolist()[:16]}")
    if ip[-1] > idx.size:
        raise ValueError(f"indptr: its last entry {int(ip[-1])} exceeds len(indices) = {idx.size}")
    cols = idx[ip[0]:ip[-1]]
    if cols.size and (cols.min() < 0 or cols.max() >= NB):
        raise ValueError(f"indices: block-column ids must be in [0, N / C) = [0, {NB}), got values in "
                         f"[{int(cols.min())}, {int(cols.max())}] (indices out of bound)")
    local = ip - ip[0]
    req = _segments(local)
    if cols.size > 1:
        order = np.lexsort((cols, req))
        same = (req[order][1:] == req[order][:-1]) & (cols[order][1:] == cols[order][:-1])
        if same.any():
            bad = int(req[order][1:][same][0])
            raise ValueError(f"indices: block row {bad} lists block column {int(cols[order][1:][same][0])} more "
                             "than once")
    rows = np.minimum(R, M - R * np.arange(MB))
    row_start = R * np.arange(MB, dtype=np.int64)
    qo_indptr = np.concatenate([[0], np.cumsum(rows)])
    if mask is not None and packed_mask is None:
        check_tensor("mask", mask, shape=(idx.size, R, C), dtypes=(torch.bool,))
        packed = _pack_bsr_mask(mask[ip[0]:ip[-1]], local, rows, C)
        return SparseRequests(qo_indptr, local, cols, cols * C, row_start, C, False, packed)
    if packed_mask is not None:
        check_tensor("packed_mask", packed_mask, ndim=1, dtypes=(torch.uint8,))
        want = int(((rows * np.diff(local) * C + 7) // 8).sum())
        if packed_mask.numel() != want:
            raise ValueError(f"packed_mask: expected {want} bytes (each block row's [rows, nnz_b * C] mask packed "
                             f"LSB first from a byte boundary), got {packed_mask.numel()}")
        return SparseRequests(qo_indptr, local, cols, cols * C, row_start, C, False, packed_mask.cpu())
    requests = SparseRequests(qo_indptr, local, cols, cols * C, row_start, C, False, None)
    return _coarsen(_with_causal(requests) if causal else requests, N)


def variable_requests(block_mask_map, block_row_sz, block_col_sz, num_kv_heads: int, *,
                      causal=False) -> tuple[SparseRequests, int, int]:
    """Map per-KV-head variable blocks to paged-prefill requests over pages of one token.

    Request ``h * MB + r`` is KV head ``h``'s block row ``r``: query rows ``h * qo_len + row_off`` of the
    kernel's q (``[num_kv_heads * qo_len, group, D]``, heads of a group side by side) and the tokens
    ``h * kv_len + j`` of the kernel's K/V (``[num_kv_heads * kv_len, 1, 1, D]``) for every column ``j`` of
    the blocks it selects (aligned runs of tokens merged into larger pages where every request allows it).
    Returns ``(requests, qo_len, kv_len)``.

    Args:
        block_mask_map: bool ``[num_kv_heads, MB, NB]``.
        block_row_sz: int ``[num_kv_heads, MB]``, sizes >= 0 summing to the same ``qo_len`` for every head.
        block_col_sz: int ``[num_kv_heads, NB]``, sizes >= 0 summing to the same ``kv_len`` for every head.
        causal: global positions within a head: column ``j`` visible to row ``i`` only when ``j <= i``.
    """
    check_tensor("block_mask_map", block_mask_map, ndim=3, dtypes=(torch.bool,))
    H, MB, NB = block_mask_map.shape
    if H != num_kv_heads:
        raise ValueError(f"block_mask_map: expected num_kv_heads = {num_kv_heads} patterns (shape "
                         f"[num_kv_heads, MB, NB]), got shape {list(block_mask_map.shape)}")
    int_types = (torch.int32, torch.int64)
    check_tensor("block_row_sz", block_row_sz, shape=(H, MB), dtypes=int_types)
    check_tensor("block_col_sz", block_col_sz, shape=(H, NB), dtypes=int_types)
    rsz, csz = host_int64(block_row_sz), host_int64(block_col_sz)
    for name, sz in (("block_row_sz", rsz), ("block_col_sz", csz)):
        if sz.size and sz.min() < 0:
            raise ValueError(f"{name}: block sizes must be >= 0, got {int(sz.min())}")
        totals = sz.sum(axis=1)
        if totals.size and (totals != totals[0]).any():
            raise ValueError(f"{name}: every KV head's sizes must have the same sum, got {totals.tolist()[:8]}")
    qo_len = int(rsz.sum(axis=1)[0]) if H else 0
    kv_len = int(csz.sum(axis=1)[0]) if H else 0
    bm = host_view(block_mask_map).astype(bool)
    row_off = np.cumsum(rsz, axis=1) - rsz  # [H, MB]
    col_off = np.cumsum(csz, axis=1) - csz  # [H, NB]
    h_idx, r_idx, c_idx = np.nonzero(bm)  # row-major: requests (h, r) in order, columns ascending
    lengths = csz[h_idx, c_idx]
    base = h_idx * kv_len + col_off[h_idx, c_idx]
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    within = np.arange(int(lengths.sum()), dtype=np.int64) - starts
    kv_indices = np.repeat(base, lengths) + within
    key_start = kv_indices - np.repeat(h_idx * kv_len, lengths)
    per_request = np.zeros(H * MB, dtype=np.int64)
    np.add.at(per_request, h_idx * MB + r_idx, lengths)
    kv_indptr = np.concatenate([[0], np.cumsum(per_request)])
    qo_indptr = (np.arange(H)[:, None] * qo_len + row_off).reshape(-1)
    qo_indptr = np.append(qo_indptr, H * qo_len)
    requests = SparseRequests(qo_indptr, kv_indptr, kv_indices, key_start, row_off.reshape(-1), 1, False, None)
    return _coarsen(_with_causal(requests) if causal else requests, H * kv_len), qo_len, kv_len


def _pack_bsr_mask(mask: torch.Tensor, indptr: np.ndarray, rows: np.ndarray, C: int) -> torch.Tensor:
    """Each block row's ``[rows, nnz_b * C]`` mask (its blocks side by side), row-major, packed LSB first
    from a byte boundary: the paged prefill's packed custom mask."""
    m = mask.cpu().numpy()
    parts = []
    for b in range(rows.size):
        blocks = m[indptr[b]:indptr[b + 1], : rows[b]]  # [nnz_b, rows_b, C]
        parts.append(np.packbits(blocks.transpose(1, 0, 2).reshape(-1), bitorder="little"))
    return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8))


MAX_PAGE = 128  # largest page _coarsen makes (keys)


def _coarsen(req: SparseRequests, num_keys: int) -> SparseRequests:
    """``req`` over larger pages where its page lists allow: when every request's pages (sorted) form
    aligned runs of ``k`` consecutive ids, each run becomes one page of ``k * page_size`` keys (a dense
    stretch of a vector-sparse pattern reads whole tiles instead of gathering key by key). Only without
    a mask (a mask's bits follow the given page order); ``num_keys``: rows of the kernel's K/V."""
    if req.packed_mask is not None or req.kv_indices.size == 0:
        return req
    P, counts = req.page_size, np.diff(req.kv_indptr)
    owner = _segments(req.kv_indptr)
    order = np.lexsort((req.kv_indices, owner))
    ids = req.kv_indices[order]
    for k in (128, 64, 32, 16, 8, 4, 2):
        if P * k > MAX_PAGE or num_keys % (P * k) or (counts % k).any():
            continue
        runs = ids.reshape(-1, k)
        if (runs[:, 0] % k == 0).all() and (runs == runs[:, :1] + np.arange(k)).all():
            return SparseRequests(req.qo_indptr, req.kv_indptr // k, runs[:, 0] // k, req.key_start[order][::k],
                                  req.row_start, P * k, req.causal, None)
    return req


def _with_causal(req: SparseRequests) -> SparseRequests:
    """``req`` with global causal masking: pages no row of their request sees dropped, pages sorted by
    position; then the kernel's causal flag where it means the same for every request, else a mask."""
    P = req.page_size
    rows = np.diff(req.qo_indptr)
    owner = _segments(req.kv_indptr)
    last_row = req.row_start + rows - 1
    keep = (req.key_start <= last_row[owner]) & (rows[owner] > 0)  # a request without rows needs no keys
    order = np.lexsort((req.key_start, owner))
    order = order[keep[order]]
    owner, key_start, kv_indices = owner[order], req.key_start[order], req.kv_indices[order]
    counts = np.bincount(owner, minlength=rows.size)
    kv_indptr = np.concatenate([[0], np.cumsum(counts)])
    # The kernel's causal puts query r of a request at gathered key kv_len - rows + r. Same as global
    # iff the keys at or after the request's first row are exactly its rows' positions.
    tail = np.clip(key_start + P - np.maximum(key_start, req.row_start[owner]), 0, None)
    tail_keys = np.bincount(owner, weights=tail, minlength=rows.size).astype(np.int64)
    ends = np.full(rows.size, -1, dtype=np.int64)
    np.maximum.at(ends, owner, key_start + P - 1)
    ok = (counts == 0) | ((tail_keys == rows) & (ends == last_row))
    out = SparseRequests(req.qo_indptr, kv_indptr, kv_indices, key_start, req.row_start, P, True, None)
    if ok.all():
        return out
    parts = []
    for b in range(rows.size):
        keys = (key_start[kv_indptr[b]:kv_indptr[b + 1], None] + np.arange(P)).reshape(-1)
        pos = req.row_start[b] + np.arange(rows[b])
        parts.append(np.packbits((keys[None, :] <= pos[:, None]).reshape(-1), bitorder="little"))
    out.causal = False
    out.packed_mask = torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8))
    return out


def expand_requests(req: SparseRequests, num_rows: int, num_keys: int) -> np.ndarray:
    """The dense ``[num_rows, num_keys]`` visibility the requests compute, in the kernel's coordinates
    (row ``qo_indptr[b] + r``; key ``kv_indices[p] * page_size + t``): for tests and debugging."""
    dense = np.zeros((num_rows, num_keys), dtype=bool)
    P = req.page_size
    byte = 0
    mask_bits = None
    if req.packed_mask is not None:
        mask_bits = np.unpackbits(req.packed_mask.numpy(), bitorder="little").astype(bool)
    for b in range(req.batch_size):
        q0, q1 = int(req.qo_indptr[b]), int(req.qo_indptr[b + 1])
        pages = req.kv_indices[int(req.kv_indptr[b]):int(req.kv_indptr[b + 1])]
        keys = (pages[:, None] * P + np.arange(P)).reshape(-1)
        rows, kv = q1 - q0, keys.size
        allowed = np.ones((rows, kv), dtype=bool)
        if mask_bits is not None:
            allowed = mask_bits[8 * byte: 8 * byte + rows * kv].reshape(rows, kv)
            byte += (rows * kv + 7) // 8
        elif req.causal:
            allowed = np.arange(kv)[None, :] <= (kv - rows + np.arange(rows))[:, None]
        for r in range(rows):
            dense[q0 + r, keys[allowed[r]]] = True
    return dense
