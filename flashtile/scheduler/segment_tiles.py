"""Segment GEMM tile schedule: one launch covers the row tiles of every segment, without a host sync.

Segment ``s`` owns rows ``[start_s, start_s + len_s)`` of ``x`` and ``cdiv(len_s, block_m)`` row tiles,
numbered after the tiles of segments ``0..s-1``. Program ``t`` of the launch finds the segment whose
tile range holds ``t`` on the device (kernels/gemm.py ``_locate_tile``: a scan of the lengths or
offsets, SCAN segments at a time, with running sums of tiles and rows) and computes tile
``t - first_tile_s`` of that segment. Empty segments own no tile. :func:`locate_tile` is the host
mirror of that scan (the spec the scheduler property tests check).

The launch size must be known on the host without reading the lengths, so it is the bound
:func:`tile_slots`: ``sum_s cdiv(len_s, m) <= sum_s (len_s // m + 1) <= total_rows // m + B``.
Programs past the last tile do nothing.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

__all__ = ["tile_slots", "locate_tile"]


def tile_slots(total_rows: int, num_segments: int, block_m: int) -> int:
    """Programs to launch per column tile: an upper bound on the row tiles of ``num_segments`` segments
    whose rows lie in ``[0, total_rows)``."""
    return total_rows // block_m + num_segments


def locate_tile(seg_lens: Sequence[int], first_row: int, block_m: int, t: int,
                scan: int = 16) -> Optional[Tuple[int, int, int]]:
    """(segment, first row of the tile, end row of the segment) of program ``t``, or None when ``t`` is
    past the last tile; the kernel's steps (chunks of ``scan`` segments, running sums), on the host.
    ``seg_lens``: the segments' lengths (negative ones count as 0); ``first_row``: the first segment's
    first row."""
    found = None
    tiles_before, rows_before = 0, first_row
    for c in range(0, len(seg_lens), scan):
        lens = [max(n, 0) for n in seg_lens[c:c + scan]]
        tiles_end = rows_end = 0
        for i, n in enumerate(lens):
            tiles = -(-n // block_m)
            tiles_end += tiles
            rows_end += n
            first_tile = tiles_before + tiles_end - tiles
            if first_tile <= t < tiles_before + tiles_end:
                assert found is None, "two segments hold one tile"
                end = rows_before + rows_end
                found = (c + i, end - n + (t - first_tile) * block_m, end)
        tiles_before += tiles_end
        rows_before += rows_end
    return found
