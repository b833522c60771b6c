"""Segment GEMM tile schedule: one launch covers the row tiles of every segment, without a host sync.

Segment ``s`` owns rows ``[seg_indptr[s], seg_indptr[s+1])`` of ``x`` and ``cdiv(len_s, block_m)`` row
tiles. ``tile_indptr[s]`` (an exclusive prefix sum of those counts, computed with torch ops on the index
tensors' own device) numbers the tiles of all segments consecutively; program ``t`` of the launch finds
its segment as the largest ``s`` with ``tile_indptr[s] <= t`` (a binary search over ``search_steps``
steps) and computes tile ``t - tile_indptr[s]`` of that segment. Empty segments own no tile.

The launch size must be known on the host without reading the indptr, so it is the bound
:func:`tile_slots`: ``sum_s cdiv(len_s, m) <= sum_s (len_s // m + 1) <= total_rows // m + B``.
Programs past ``tile_indptr[B]`` return at once. :func:`locate_tile` is the host mirror of the
kernel's search (the spec the scheduler property tests check).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

__all__ = ["segment_tile_indptr", "tile_slots", "search_steps", "locate_tile"]


def segment_tile_indptr(seg_indptr: torch.Tensor, block_m: int) -> torch.Tensor:
    """int32 ``[B + 1]`` exclusive prefix sum of each segment's row-tile count, on ``seg_indptr``'s device.

    ``seg_indptr``: integer ``[B + 1]``, non-decreasing (row offsets of the segments in ``x``)."""
    lens = (seg_indptr[1:] - seg_indptr[:-1]).to(torch.int64)
    tiles = torch.div(lens + (block_m - 1), block_m, rounding_mode="floor")
    out = torch.zeros(seg_indptr.shape[0], dtype=torch.int32, device=seg_indptr.device)
    torch.cumsum(tiles, 0, out=out[1:])
    return out


def tile_slots(total_rows: int, num_segments: int, block_m: int) -> int:
    """Programs to launch: an upper bound on the row tiles of ``num_segments`` segments whose rows lie
    in ``[0, total_rows)``."""
    return total_rows // block_m + num_segments


def search_steps(num_segments: int) -> int:
    """Binary-search steps that find a segment among ``num_segments + 1`` candidates ``0..B``."""
    return max(0, num_segments).bit_length()


def locate_tile(tile_indptr: Sequence[int], t: int) -> Optional[Tuple[int, int]]:
    """(segment, row tile within it) of program ``t``, or None when ``t`` is past the last tile; the same
    steps as the kernel's search."""
    num_segments = len(tile_indptr) - 1
    if t >= tile_indptr[num_segments]:
        return None
    lo, hi = 0, num_segments
    for _ in range(search_steps(num_segments)):
        mid = (lo + hi + 1) // 2
        if tile_indptr[mid] <= t:
            lo = mid
        else:
            hi = mid - 1
    return lo, t - tile_indptr[lo]
