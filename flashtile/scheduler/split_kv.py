"""Split-KV planning for one request: how many KV chunks so the grid fills the GPU.

Pure host-side arithmetic (no torch, no Triton), property-tested in tests/test_scheduler.py.
"""

from __future__ import annotations

__all__ = ["plan_kv_splits", "PROGRAMS_PER_SM", "MIN_CHUNK_TILES"]

# Aim for this many programs per SM. Measured on H100 (benchmarks/sweep_splits.py, 32/8 heads,
# d128): 2 beats 3, 4, 6, 8 and 12 at kv 4k, 32k and 128k (128k: 179 us vs 210 us at 4); more,
# shorter splits cost partial-state traffic and pipeline start-up more than they gain in balance.
PROGRAMS_PER_SM = 2
# A split covers at least this many aligned tiles, so the partial-state traffic stays small.
MIN_CHUNK_TILES = 2


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def plan_kv_splits(kv_len: int, base_programs: int, num_sms: int, align: int) -> tuple[int, int]:
    """Choose ``(num_splits, chunk)`` for a KV sequence of ``kv_len`` tokens.

    Args:
        kv_len: tokens of KV (>= 0).
        base_programs: programs the launch has without splitting (query blocks x KV heads).
        num_sms: streaming multiprocessors of the device.
        align: chunk granularity in tokens (a multiple of every BLOCK_N used).

    Returns:
        ``chunk`` is a positive multiple of ``align``; split ``s`` covers
        ``[s * chunk, min((s + 1) * chunk, kv_len))``; ``num_splits = cdiv(kv_len, chunk)`` (>= 1), so
        the splits cover every token exactly once and none is empty (except kv_len == 0: one split).
    """
    if kv_len <= 0:
        return 1, align
    tiles = _cdiv(kv_len, align)
    target = PROGRAMS_PER_SM * num_sms
    if base_programs >= target:
        wanted = 1
    else:
        wanted = _cdiv(target, max(1, base_programs))
    wanted = max(1, min(wanted, tiles // MIN_CHUNK_TILES if tiles >= MIN_CHUNK_TILES else 1))
    # Round the chunk down so the grid reaches the target; with >= MIN_CHUNK_TILES tiles per split
    # this overshoots ``wanted`` by at most a factor 1.5 (rounded up).
    chunk = max(1, tiles // wanted) * align
    return _cdiv(kv_len, chunk), chunk
