"""MLA work list: (request, row tile, KV chunk) items for the MLA kernel (flashtile/kernels/mla.py).

Host-side arithmetic only (numpy). A request's query rows are its (token, head) pairs, flattened as
``row = token * num_heads + head``: with matrix absorption every head reads the same latent, so the
heads (times the query tokens) fill the M dimension of one tensor-core tile. The KV of each request is
cut into chunks by :func:`flashtile.scheduler.split_kv.plan_batch_kv_splits` (one common chunk size, so
one long request spreads over the whole GPU); each (row tile, chunk) pair is one work item.

Packed int32 layout (one host->device copy; offsets depend only on the batch size and the row
capacity, so a CUDA-graph replay reads a re-plan's work list at the same addresses):

- ``[0]``: number of work items;
- ``REQ_FIELDS`` ints per request: ``qo_start, num_splits, partial_base, rows`` (rows = qo_len * heads;
  partial state of split ``s``, row ``r`` is partial row ``partial_base + s * rows + r``);
- ``token_capacity`` ints: the request of each query token (its rows are merged by that request's splits);
- ``ITEM_FIELDS`` ints per item: ``request, row0, kv_start, kv_end, split`` (split -1: the request
  has one split and the item writes the output directly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .._core.intmath import cdiv
from .split_kv import MIN_CHUNK_TILES, batch_split_chunk, plan_batch_kv_splits

__all__ = ["MlaWork", "plan_mla_work", "min_mla_chunk", "balanced_chunk", "REQ_FIELDS", "ITEM_FIELDS"]

REQ_FIELDS = 4
ITEM_FIELDS = 5


@dataclass(frozen=True)
class MlaWork:
    packed: np.ndarray  # int32, the layout above
    num_items: int
    partial_rows: int  # rows of partial state (float32 out rows and lse values) the plan needs
    max_splits: int
    req_offset: int
    token_offset: int
    item_offset: int


def min_mla_chunk(max_rows: int, head_dim_ckv: int, head_dim_kpe: int, kv_bytes: int, align: int) -> int:
    """The shortest KV chunk (tokens, a multiple of ``align``) worth a split of a request with ``max_rows``
    rows: a split writes (and the merge reads) ``rows x head_dim_ckv`` float32 of partial state, which
    should stay under half of the latent bytes the split reads. With 128 heads this is 512 tokens;
    without it, one request of 32k would be cut into 128-token chunks whose partial states outweigh
    the cache twice over. (A model of the traffic, not yet a measurement.)"""
    tokens = 2 * max_rows * head_dim_ckv * 4 / ((head_dim_ckv + head_dim_kpe) * kv_bytes)
    return max(align, -(-int(tokens) // align) * align)


def balanced_chunk(chunk: int, longest: int, align: int, min_chunk: int = 0) -> int:
    """The chunk that cuts a request of ``longest`` tokens into as many pieces as ``chunk`` does, but of
    equal length (rounded up to ``align``, at least ``min_chunk``): 4096 tokens with a chunk of 4032 give
    two pieces of 2048, not 4032 and 64. A persistent grid ends when its longest item does, and every
    piece of a split adds its partial state to the merge, so a sliver of a chunk costs nearly a whole one."""
    if longest <= chunk:
        return chunk
    pieces = cdiv(longest, chunk)
    even = cdiv(cdiv(longest, pieces), align) * align
    return even if even >= min_chunk else chunk


def _partial_rows(splits, rows: np.ndarray) -> int:
    """Rows of partial state a split plan needs: every split of a request with several, times its rows."""
    counts = np.diff(splits.request_item_indptr)
    return int(np.where((rows > 0) & (counts > 1), counts * rows, 0).sum())


def plan_mla_work(qo_indptr, kv_lens, num_heads: int, block_m: int, num_sms: int, align: int, *,
                  token_capacity: int, fixed_chunk=None, disable_split: bool = False, min_chunk: int = 0,
                  max_partial_rows: Optional[int] = None, programs_per_sm: Optional[int] = None) -> MlaWork:
    """The work list of one MLA batch.

    Args:
        qo_indptr: ``[B + 1]`` query-token offsets (numpy int64, host). kv_lens: ``[B]`` KV tokens.
        num_heads: query heads; block_m: rows per tile; num_sms: SMs to fill; align: chunk granularity
            (a multiple of the kernel's BLOCK_N).
        token_capacity: query tokens the layout has room for (>= qo_indptr[-1]).
        fixed_chunk, disable_split: as :func:`plan_batch_kv_splits`.
        min_chunk: the shortest chunk of an automatic split (:func:`min_mla_chunk`); 0: no floor.
        max_partial_rows: rows of partial state the workspace holds (None: unbounded). An automatic split
            whose partial states would not fit doubles its chunk until they do (at worst: no split); a
            fixed chunk is kept (the caller reports the shortfall).
        programs_per_sm: programs per SM an automatic split aims for (None: batch decode's target).
    """
    qo_indptr = np.asarray(qo_indptr, dtype=np.int64)
    kv_lens = np.asarray(kv_lens, dtype=np.int64)
    batch = kv_lens.size
    qo_lens = qo_indptr[1:] - qo_indptr[:-1]
    rows = qo_lens * num_heads
    tiles = (rows + block_m - 1) // block_m
    per_item = max(1, int(tiles.max()) if batch else 1)
    if fixed_chunk is None and not disable_split:  # the automatic chunk, floored and evened, planned once
        floor = max(min_chunk, MIN_CHUNK_TILES * align)
        chunk = max(batch_split_chunk(kv_lens, per_item, num_sms, align, programs_per_sm), min_chunk)
        chunk = balanced_chunk(chunk, int(kv_lens.max()) if batch else 0, align, floor)
        splits = plan_batch_kv_splits(kv_lens, per_item, num_sms, align, fixed_chunk=chunk)
    else:
        splits = plan_batch_kv_splits(kv_lens, per_item, num_sms, align, fixed_chunk=fixed_chunk,
                                      disable_split=disable_split)
    if fixed_chunk is None and not disable_split and max_partial_rows is not None:
        chunk = splits.chunk
        while _partial_rows(splits, rows) > max_partial_rows:
            if batch == 0 or chunk >= int(kv_lens.max()):
                splits = plan_batch_kv_splits(kv_lens, per_item, num_sms, align, disable_split=True)
                break
            chunk *= 2
            splits = plan_batch_kv_splits(kv_lens, per_item, num_sms, align, fixed_chunk=chunk)
    counts = np.diff(splits.request_item_indptr)
    num_splits = np.where(rows > 0, counts, 0)
    multi = num_splits > 1
    part_sizes = np.where(multi, num_splits * rows, 0)
    partial_base = np.zeros(batch, dtype=np.int64)
    if batch:
        np.cumsum(part_sizes[:-1], out=partial_base[1:])
    # Items: every KV chunk of a request times every row tile of it (requests without rows: none).
    item_req = splits.item_request
    item_split = np.arange(item_req.size, dtype=np.int64) - splits.request_item_indptr[item_req]
    reps = tiles[item_req]
    req = np.repeat(item_req, reps)
    first = np.repeat(np.cumsum(reps) - reps, reps)
    tile = np.arange(req.size, dtype=np.int64) - first
    item = np.stack([
        req,
        tile * block_m,
        np.repeat(splits.item_kv_start, reps),
        np.repeat(splits.item_kv_end, reps),
        np.where(multi[req], np.repeat(item_split, reps), -1),
    ], axis=1) if req.size else np.zeros((0, ITEM_FIELDS), dtype=np.int64)
    # Longest chunks first: the persistent grid then ends with short items (a smaller tail).
    order = np.argsort(-(item[:, 3] - item[:, 2]), kind="stable")
    item = item[order]
    req_offset = 1
    token_offset = req_offset + REQ_FIELDS * batch
    item_offset = token_offset + token_capacity
    packed = np.zeros(item_offset + ITEM_FIELDS * item.shape[0], dtype=np.int32)
    packed[0] = item.shape[0]
    packed[req_offset:token_offset] = np.stack([qo_indptr[:-1], num_splits, partial_base, rows], axis=1).reshape(-1)
    nnz = int(qo_indptr[-1]) if batch else 0
    packed[token_offset:token_offset + nnz] = np.repeat(np.arange(batch, dtype=np.int64), qo_lens)
    packed[item_offset:] = item.reshape(-1)
    return MlaWork(packed, int(item.shape[0]), int(part_sizes.sum()), int(num_splits.max()) if batch else 0,
                   req_offset, token_offset, item_offset)
