"""Split-KV planning: how many KV chunks per request so the grid fills the GPU.

Host-side arithmetic (Python ints, numpy arrays for the batch planner: see _core/host_arrays.py; no
Triton), property-tested in tests/test_scheduler.py. :func:`plan_single_kv_splits` serves one request (single
decode/prefill: the op layer plans, _core/ops.py, and the launcher launches the :class:`SingleKVSplits` it is
given); :func:`plan_kv_splits` is its arithmetic; :func:`plan_batch_kv_splits` serves a batch (the batch
decode wrapper).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .._core.host_arrays import host_int64, host_max, host_sum
from .._core.intmath import cdiv

__all__ = [
    "plan_kv_splits",
    "plan_single_kv_splits",
    "SingleKVSplits",
    "SingleLaunchShape",
    "plan_batch_kv_splits",
    "batch_split_chunk",
    "batch_item_capacity",
    "BatchKVSplits",
    "PROGRAMS_PER_SM",
    "BATCH_PROGRAMS_PER_SM",
    "MIN_CHUNK_TILES",
]

# Aim for this many programs per SM. These are the H100's targets and the defaults for callers that pass
# none; the decode launchers and wrappers pass their card's (_core/decode_tune.py, whose H100 entry holds
# these numbers). Measured on H100 (the single_decode suite's `splits` tuning grid, 32/8 heads, d128): 2
# beats 3, 4, 6, 8 and 12 at kv 4k, 32k and 128k (128k: 179 us vs 210 us at 4); more, shorter splits
# cost partial-state traffic and pipeline start-up more than they gain in balance.
PROGRAMS_PER_SM = 2
# The batch planner aims higher: with BLOCK_N 32 tiles, 4 programs per SM beat 1, 2 and 8 at 1 x 32k and
# 16 x 4k (the batch_decode tuning grid, H100, 32/8 heads, d128, page 16); 8 was 3% better on a
# skewed batch. Large uniform batches are not split at any of these targets.
BATCH_PROGRAMS_PER_SM = 4
# A split covers at least this many aligned tiles, so the partial-state traffic stays small.
MIN_CHUNK_TILES = 2


def plan_kv_splits(kv_len: int, base_programs: int, num_sms: int, align: int,
                   programs_per_sm: Optional[int] = None) -> tuple[int, int]:
    """Choose ``(num_splits, chunk)`` for a KV sequence of ``kv_len`` tokens.

    Args:
        kv_len: tokens of KV (>= 0).
        base_programs: programs the launch has without splitting (query blocks x KV heads).
        num_sms: streaming multiprocessors of the device.
        align: chunk granularity in tokens (a multiple of every BLOCK_N used).
        programs_per_sm: programs per SM to aim for (None: ``PROGRAMS_PER_SM``).

    Returns:
        ``chunk`` is a positive multiple of ``align``; split ``s`` covers
        ``[s * chunk, min((s + 1) * chunk, kv_len))``; ``num_splits = cdiv(kv_len, chunk)`` (>= 1), so
        the splits cover every token exactly once and none is empty (except kv_len == 0: one split).
    """
    if kv_len <= 0:
        return 1, align
    tiles = cdiv(kv_len, align)
    target = (PROGRAMS_PER_SM if programs_per_sm is None else programs_per_sm) * num_sms
    if base_programs >= target:
        wanted = 1
    else:
        wanted = cdiv(target, max(1, base_programs))
    wanted = max(1, min(wanted, tiles // MIN_CHUNK_TILES if tiles >= MIN_CHUNK_TILES else 1))
    # Round the chunk down so the grid reaches the target; with >= MIN_CHUNK_TILES tiles per split
    # this overshoots ``wanted`` by at most a factor 1.5 (rounded up).
    chunk = max(1, tiles // wanted) * align
    return cdiv(kv_len, chunk), chunk


@dataclass(frozen=True)
class SingleLaunchShape:
    """What the single-request planner needs to know of a launch: ``programs`` (query row blocks x KV
    heads: what one KV split launches), the KV chunk granularity ``align`` in tokens (a multiple of every
    BLOCK_N the launch may use), the device's ``num_sms``, ``can_split`` (False for a kernel whose
    rows cannot be merged from partial states: a whole-row attention variant), and the card's
    ``programs_per_sm`` target (None: ``PROGRAMS_PER_SM``)."""

    programs: int
    align: int
    num_sms: int
    can_split: bool = True
    programs_per_sm: Optional[int] = None


@dataclass(frozen=True)
class SingleKVSplits:
    """How one request's KV of ``kv_len`` tokens is cut: split ``s`` covers
    ``[s * chunk, min((s + 1) * chunk, kv_len))`` for ``s < num_splits``. Unsplit (``num_splits == 1``), the
    chunk is the whole sequence, ``max(kv_len, 1)``; split, it is a multiple of the launch's ``align`` and
    no split is empty. With more than one split the kernel writes float32 partial states that are merged."""

    kv_len: int
    num_splits: int
    chunk: int

    @property
    def partial(self) -> bool:
        return self.num_splits > 1

    def ranges(self) -> list:
        """``[(start, end)]`` of the splits, in KV order."""
        return [(s * self.chunk, min((s + 1) * self.chunk, self.kv_len)) for s in range(self.num_splits)]


def plan_single_kv_splits(kv_len: int, shape: SingleLaunchShape, *, num_splits: Optional[int] = None) -> SingleKVSplits:
    """The KV splits of one request of ``kv_len`` tokens launched as ``shape``: :func:`plan_kv_splits`'s
    choice, or with ``num_splits`` about that many splits of an aligned chunk (fewer when the chunks would be
    empty); one split when ``shape.can_split`` is False or the sequence is too short to split."""
    if not shape.can_split:
        splits, chunk = 1, 0
    elif num_splits is None:
        splits, chunk = plan_kv_splits(kv_len, shape.programs, shape.num_sms, shape.align,
                                       shape.programs_per_sm)
    else:
        chunk = max(shape.align, cdiv(cdiv(max(kv_len, 1), num_splits), shape.align) * shape.align)
        splits = max(1, cdiv(kv_len, chunk))
    if splits == 1:
        chunk = max(kv_len, 1)
    return SingleKVSplits(kv_len, splits, chunk)


@dataclass(frozen=True)
class BatchKVSplits:
    """Work items of a batch: item ``w`` is request ``item_request[w]``'s KV range
    ``[item_kv_start[w], item_kv_end[w])``; the items of request ``r`` are
    ``request_item_indptr[r]:request_item_indptr[r + 1]``, in KV order (at least one per request,
    empty for a request of length 0). The arrays are int64 numpy arrays (``torch.from_numpy`` views
    them as CPU tensors without a copy)."""

    chunk: int
    request_item_indptr: np.ndarray  # [B + 1]
    item_request: np.ndarray  # [num_items]
    item_kv_start: np.ndarray  # [num_items]
    item_kv_end: np.ndarray  # [num_items]

    @property
    def num_items(self) -> int:
        return self.item_request.size


def batch_item_capacity(batch_size: int, programs_per_item: int, num_sms: int,
                        programs_per_sm: Optional[int] = None) -> int:
    """Most items :func:`plan_batch_kv_splits` creates for ``batch_size`` requests (without a fixed
    split size): ``sum(cdiv(len, chunk)) <= total / chunk + batch <= target_items + batch``. CUDA-graph
    mode sizes its grid and partial-state buffers with this. ``programs_per_sm``: as for
    :func:`plan_batch_kv_splits`."""
    return _target_items(programs_per_item, num_sms, programs_per_sm) + batch_size


def _target_items(programs_per_item: int, num_sms: int, programs_per_sm: Optional[int] = None) -> int:
    per_sm = BATCH_PROGRAMS_PER_SM if programs_per_sm is None else programs_per_sm
    return max(1, (per_sm * num_sms) // max(1, programs_per_item))


def batch_split_chunk(kv_lens, programs_per_item: int, num_sms: int, align: int,
                      programs_per_sm: Optional[int] = None) -> int:
    """The chunk of :func:`plan_batch_kv_splits`'s automatic split (arguments as there): the total KV length
    over the items that fill the target, rounded up to ``align``, at least ``MIN_CHUNK_TILES * align``."""
    total = host_sum(host_int64(kv_lens))
    per_item = cdiv(max(total, 1), _target_items(programs_per_item, num_sms, programs_per_sm))
    return max(MIN_CHUNK_TILES * align, cdiv(per_item, align) * align)


def plan_batch_kv_splits(
    kv_lens,
    programs_per_item: int,
    num_sms: int,
    align: int,
    *,
    fixed_chunk: Optional[int] = None,
    disable_split: bool = False,
    programs_per_sm: Optional[int] = None,
) -> BatchKVSplits:
    """Cut every request's KV into chunks of one common size so the grid fills the GPU.

    The chunk is the total KV length over the number of items that fill ``programs_per_sm`` programs
    per SM (each item launches ``programs_per_item`` programs, e.g. one per KV head), rounded up to
    ``align`` and at least ``MIN_CHUNK_TILES * align``. A large uniform batch therefore is not split,
    one long request is cut into about ``target`` pieces, and in a skewed batch only the long
    requests are cut, into pieces no longer than the work every SM gets anyway: no program runs much
    longer than the average, which bounds the tail.

    Args:
        kv_lens: ``[B]`` KV lengths (>= 0): an int CPU tensor, a numpy array or a list of ints.
        programs_per_item: programs one item launches (KV heads x row blocks).
        num_sms: streaming multiprocessors of the device.
        align: chunk granularity in tokens (a multiple of every BLOCK_N of the kernel).
        fixed_chunk: deterministic mode: this chunk (tokens, rounded up to ``align``) whatever the
            batch, so a request's split points, and so its output bits, do not depend on the other
            requests of the batch.
        disable_split: one item per request (also batch-invariant).
        programs_per_sm: the card's target (_core/decode_tune.py); None: ``BATCH_PROGRAMS_PER_SM``.
    """
    lens = host_int64(kv_lens)
    batch = lens.size
    longest = host_max(lens) if batch else 0
    if disable_split:
        chunk = max(align, cdiv(max(longest, 1), align) * align)
    elif fixed_chunk is not None:
        chunk = max(align, cdiv(int(fixed_chunk), align) * align)
    else:
        chunk = batch_split_chunk(lens, programs_per_item, num_sms, align, programs_per_sm)
    if longest <= chunk:  # one item per request (a large uniform batch)
        return BatchKVSplits(chunk, np.arange(batch + 1, dtype=np.int64), np.arange(batch, dtype=np.int64),
                             np.zeros(batch, dtype=np.int64), lens)
    counts = np.maximum((lens + (chunk - 1)) // chunk, 1)
    indptr = np.zeros(batch + 1, dtype=np.int64)
    counts.cumsum(out=indptr[1:])
    item_request = np.arange(batch, dtype=np.int64).repeat(counts)
    item_kv_start = (np.arange(item_request.size, dtype=np.int64) - indptr[item_request]) * chunk
    item_kv_end = np.minimum(item_kv_start + chunk, lens[item_request])
    return BatchKVSplits(chunk, indptr, item_request, item_kv_start, item_kv_end)
