"""Work list of batch prefill / append: tiles of (request, row block), cut into KV chunks.

Host-side arithmetic on numpy arrays (_core/host_arrays.py says why; no Triton), property-tested in
tests/test_scheduler.py.

A request with ``qo_len`` query tokens and ``group`` query heads per KV head has
``qo_len * group`` GQA-packed rows per KV head (row ``r`` is token ``r // group``, head
``r % group`` of the group); they are cut into *tiles* of ``block_m`` rows. A tile only needs the
keys its rows can see (causal: up to its last row's position; sliding window: from its first row's
window start), so its KV range is clipped here and the kernel never visits the rest.

Tiles are then cut into *items* along KV with one chunk size per batch (the batch decode planner,
:func:`plan_batch_kv_splits`, applied to the tiles' ranges): with few tiles (one long chunked
prefill, a small batch of long appends) long ranges are split so the grid fills the GPU; with many
tiles nothing is split.

Launch order. The items of a request are contiguous, longest first, and requests go in order of
their longest item (the long tiles of a skewed batch start first, the short ones fill in behind
them: longest-processing-time order). The kernel takes the items in groups of ``group_items``
(the most items any request has) and runs, inside a group, every item of KV head 0, then every
item of head 1, and so on. The programs running at one time therefore read the K/V of one or a
few (request, KV head) pairs, which stay in L2 for all their row blocks. (Ordering all items by
length instead puts the same row block of every request and head side by side: those programs
share no K/V, and a batch of 1k-token prompts then streams K/V from DRAM once per row block.)

A tile cut into several items has its items write float32 partial states into consecutive *slots*;
one merge entry per such tile folds them into the output. A tile with one item writes the output
directly (slot -1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .._core.host_arrays import host_int64_view, host_max, host_view
from .._core.intmath import cdiv
from .split_kv import _target_items, plan_batch_kv_splits

__all__ = [
    "PrefillWork", "plan_prefill_work", "prefill_capacity", "pack_prefill_meta", "meta_requests", "meta_size",
    "COUNT_FIELDS", "REQUEST_FIELDS", "ITEM_FIELDS", "MERGE_FIELDS",
]

# The plan as the kernels read it: one int32 array (kernels/batch_prefill.py documents the fields).
# number of items, number of merge entries, group_items, and the work counter of the persistent Hopper
# kernel (0 after every plan and every launch: kernels/batch_prefill_hopper.py)
COUNT_FIELDS = 4
REQUEST_FIELDS = 5  # qo_start, qo_len, kv_offset, kv_len, mask_offset
ITEM_FIELDS = 5  # request, row_block, kv_start, kv_end, slot
MERGE_FIELDS = 4  # request, row_block, first slot, number of slots


@dataclass(frozen=True)
class PrefillWork:
    """The plan of one batch; every array is an int64 numpy array (``torch.from_numpy`` views it as a
    CPU tensor without a copy).

    Item ``w`` (in launch order) computes rows ``[tile_row_block*block_m, +block_m)`` of request
    ``item_request[w]`` (``item_row_block[w]``) over keys ``[item_kv_start[w], item_kv_end[w])`` and
    writes the output (``item_slot[w] == -1``) or partial-state slot ``item_slot[w]``. Merge entry
    ``e`` folds slots ``merge_slot_start[e] .. + merge_num_slots[e]`` into rows ``merge_row_block[e]``
    of request ``merge_request[e]``. ``group_items``: items per head-major launch group (module doc).
    """

    chunk: int
    group_items: int
    item_request: np.ndarray
    item_row_block: np.ndarray
    item_kv_start: np.ndarray
    item_kv_end: np.ndarray
    item_slot: np.ndarray
    merge_request: np.ndarray
    merge_row_block: np.ndarray
    merge_slot_start: np.ndarray
    merge_num_slots: np.ndarray

    @property
    def num_items(self) -> int:
        return self.item_request.size

    @property
    def num_merges(self) -> int:
        return self.merge_request.size

    @property
    def num_slots(self) -> int:
        return int(self.merge_num_slots.sum()) if self.num_merges else 0


def prefill_capacity(batch_size: int, total_rows: int, block_m: int, programs_per_item: int,
                     num_sms: int) -> tuple[int, int, int]:
    """``(items, merges, slots)`` bounds of :func:`plan_prefill_work` (without a fixed chunk) for a batch
    of ``batch_size`` requests with at most ``total_rows`` GQA-packed rows in all. CUDA-graph mode sizes
    its grids and partial-state buffers with these.

    Tiles: ``sum(cdiv(rows_r, block_m)) <= total_rows / block_m + batch``. Items: each tile adds
    ``cdiv(range, chunk) <= range / chunk + 1`` with ``chunk >= total_range / target``, so at most
    ``tiles + target``. Split tiles have ``range > chunk``, so at most ``target`` of them, and their
    items number ``<= 2 * range / chunk`` each: at most ``2 * target`` slots.
    """
    target = _target_items(programs_per_item, num_sms)
    tiles = cdiv(total_rows, block_m) + batch_size
    return tiles + target, target, 2 * target


def plan_prefill_work(
    qo_lens,
    kv_lens,
    *,
    group: int,
    block_m: int,
    causal: bool,
    window_left: int,
    programs_per_item: int,
    num_sms: int,
    align: int,
    fixed_chunk: Optional[int] = None,
    disable_split: bool = False,
    interleave_rows: Optional[int] = None,
) -> PrefillWork:
    """Plan the items of a batch.

    Args:
        qo_lens, kv_lens: ``[B]`` (>= 0): int CPU tensors, numpy arrays or lists of ints.
        group: query heads per KV head (rows per query token).
        block_m: rows per tile (the kernel's BLOCK_M).
        causal: bottom-right aligned causal mask (False with a custom mask: every key may be seen).
        window_left: sliding window (-1: none).
        programs_per_item: programs an item launches (its KV heads).
        num_sms: streaming multiprocessors of the device.
        align: KV chunk granularity in tokens (a multiple of the kernel's BLOCK_N).
        fixed_chunk: deterministic chunk (tokens; the plan of a request does not depend on the batch).
        disable_split: one item per tile.
        interleave_rows: mixed batches (BatchAttention): the items of requests with at most this many
            GQA-packed rows (decodes, speculative verifications: bandwidth-bound) are interleaved with the
            other requests' items (tensor-core-bound) by :func:`_interleave_by_cost`, so that the programs
            running at one time use both. None: the launch order of the module doc.
    """
    qo, kv = host_int64_view(qo_lens), host_int64_view(kv_lens)  # only read
    batch = qo.size
    rows = qo * group
    tiles_per_req = (rows + (block_m - 1)) // block_m
    tile_request = np.arange(batch, dtype=np.int64).repeat(tiles_per_req)
    num_tiles = tile_request.size
    tile_block = np.arange(num_tiles, dtype=np.int64) - (tiles_per_req.cumsum() - tiles_per_req)[tile_request]

    # KV range each tile can see: tokens t_first..t_last sit at positions t + (kv_len - qo_len).
    first_row = tile_block * block_m
    hi = kv[tile_request]
    if causal:
        # Keys up to the position of the tile's last row's token; a last tile's padding rows (past the
        # request's last token) give a bound past kv_len, which the minimum clips.
        last_visible = (first_row + (block_m - 1)) // group + (kv - qo)[tile_request]
        hi = np.maximum(np.minimum(hi, last_visible + 1), 0)
    lo = None  # no window: every range starts at key 0
    if window_left >= 0:
        lo = np.maximum(first_row // group + (kv - qo)[tile_request] - window_left, 0)
        lo = np.minimum(lo, hi)
        lo = (lo // align) * align  # the kernel's tile loop starts on an aligned key

    splits = plan_batch_kv_splits(hi if lo is None else hi - lo, programs_per_item, num_sms, align,
                                  fixed_chunk=fixed_chunk, disable_split=disable_split)
    item_kv_start, item_kv_end = splits.item_kv_start, splits.item_kv_end
    if splits.num_items == num_tiles:
        # Every tile is one item (each tile has at least one), in tile order: no tile is split, so
        # every item writes the output directly and there is nothing to merge.
        item_tile = None
        item_request, item_row_block = tile_request, tile_block
        item_slot = np.empty(num_tiles, dtype=np.int64)
        item_slot.fill(-1)  # (np.full's Python wrapper costs a microsecond more)
        merge_tiles = np.zeros(0, dtype=np.int64)
        merge_slot_start = merge_num_slots = merge_tiles
    else:
        item_tile = splits.item_request
        item_request, item_row_block = tile_request[item_tile], tile_block[item_tile]
        counts = splits.request_item_indptr[1:] - splits.request_item_indptr[:-1]
        split_tile = counts > 1
        merge_tiles = split_tile.nonzero()[0]
        # Partial-state slots: consecutive for the items of one split tile.
        slot_counts = np.where(split_tile, counts, 0)
        slot_base = slot_counts.cumsum() - slot_counts
        within = np.arange(item_tile.size, dtype=np.int64) - splits.request_item_indptr[item_tile]
        item_slot = np.where(split_tile[item_tile], slot_base[item_tile] + within, -1)
        merge_slot_start, merge_num_slots = slot_base[merge_tiles], counts[merge_tiles]
    if lo is not None:
        item_lo = lo if item_tile is None else lo[item_tile]
        item_kv_start, item_kv_end = item_kv_start + item_lo, item_kv_end + item_lo

    order, group_items = _launch_order(item_request, item_kv_end - item_kv_start, batch)
    if interleave_rows is not None:
        item_rows = np.minimum(rows[item_request] - item_row_block * block_m, block_m)
        small = rows[item_request] <= interleave_rows
        span_items = item_kv_end - item_kv_start
        # time of an item within its class: keys read (bandwidth-bound) or rows x keys (tensor-core-bound)
        order = _interleave_by_cost(order, small, np.where(small, span_items, item_rows * span_items))
    return PrefillWork(
        chunk=splits.chunk,
        group_items=group_items,
        item_request=item_request[order],
        item_row_block=item_row_block[order],
        item_kv_start=item_kv_start[order],
        item_kv_end=item_kv_end[order],
        item_slot=item_slot[order],
        merge_request=tile_request[merge_tiles],
        merge_row_block=tile_block[merge_tiles],
        merge_slot_start=merge_slot_start,
        merge_num_slots=merge_num_slots,
    )


def _launch_order(item_request: np.ndarray, item_length: np.ndarray, batch_size: int) -> tuple[np.ndarray, int]:
    """Permutation of the items into launch order (module doc) and ``group_items``: each request's
    items contiguous and longest first; requests by their longest item, longest first (stable).
    Arguments: int64 numpy arrays ``[num_items]``."""
    if item_request.size == 0:
        return np.zeros(0, dtype=np.int64), 1
    group_items = host_max(np.bincount(item_request, minlength=batch_size))
    if group_items == 1:  # every request has one item: by its length descending, then request, then position
        return np.lexsort((item_request, -item_length)), 1
    request_max = np.zeros(batch_size, dtype=np.int64)
    np.maximum.at(request_max, item_request, item_length)
    # One stable sort: by the request's longest item descending, then request, then length descending,
    # then position.
    return np.lexsort((-item_length, item_request, -request_max[item_request])), group_items


def _interleave_by_cost(order: np.ndarray, small: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """``order`` (a permutation of the items) with its small-class and large-class items merged so that
    the two classes progress together: each item is placed by the midpoint of its share of its own
    class's total cost, so that at every point of the launch order both classes have done about the same
    fraction of their work. Each class keeps its relative order. ``small``: bool per item; ``cost``: int
    per item (>= 0)."""
    small_seq, large_seq = order[small[order]], order[~small[order]]
    if small_seq.size == 0 or large_seq.size == 0:
        return order
    keys = []
    for seq in (large_seq, small_seq):
        c = cost[seq].astype(np.float64) + 1.0  # an empty item still takes a program
        keys.append((np.cumsum(c) - 0.5 * c) / c.sum())
    merged = np.concatenate([large_seq, small_seq])
    return merged[np.argsort(np.concatenate(keys), kind="stable")]


def meta_size(batch_size: int, item_capacity: int, merge_capacity: int) -> int:
    """int32 entries of the packed plan."""
    return COUNT_FIELDS + REQUEST_FIELDS * batch_size + ITEM_FIELDS * item_capacity + MERGE_FIELDS * merge_capacity


def pack_prefill_meta(work: PrefillWork, requests, item_capacity: int, merge_capacity: int) -> torch.Tensor:
    """The plan as one int32 CPU tensor: counts, ``requests``, the items and the merge entries, each section
    padded with zeros to its capacity. ``requests``: int ``[B, REQUEST_FIELDS]`` rows (a tensor, a numpy
    array or nested lists), or a tuple of the REQUEST_FIELDS columns ``[B]`` (numpy arrays; the wrappers'
    form, which saves stacking them)."""
    columns = isinstance(requests, tuple)
    if not columns:
        requests = host_view(requests)
    batch = requests[0].size if columns else requests.shape[0]
    meta = np.zeros(meta_size(batch, item_capacity, merge_capacity), dtype=np.int32)
    meta[0], meta[1], meta[2] = work.num_items, work.num_merges, work.group_items
    o = COUNT_FIELDS
    # The sections are written field by field through their transposes: one assignment of a tuple of
    # columns, cheaper than stacking them first.
    if columns:
        meta[o: o + REQUEST_FIELDS * batch].reshape(batch, REQUEST_FIELDS).T[:] = requests
    else:
        meta[o: o + REQUEST_FIELDS * batch] = requests.reshape(-1)
    o += REQUEST_FIELDS * batch
    items = meta[o: o + ITEM_FIELDS * work.num_items].reshape(work.num_items, ITEM_FIELDS)
    items.T[:] = (work.item_request, work.item_row_block, work.item_kv_start, work.item_kv_end, work.item_slot)
    o += ITEM_FIELDS * item_capacity
    if work.num_merges:  # (most plans split no tile)
        merges = meta[o: o + MERGE_FIELDS * work.num_merges].reshape(work.num_merges, MERGE_FIELDS)
        merges.T[:] = (work.merge_request, work.merge_row_block, work.merge_slot_start, work.merge_num_slots)
    return torch.from_numpy(meta)


def meta_requests(meta: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The ``[B, REQUEST_FIELDS]`` request rows of a packed plan (a view)."""
    return meta[COUNT_FIELDS: COUNT_FIELDS + REQUEST_FIELDS * batch_size].view(batch_size, REQUEST_FIELDS)

