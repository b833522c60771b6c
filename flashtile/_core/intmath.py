"""Integer helpers for launchers: plain-Python ``cdiv``, ``next_power_of_2``, ``floor_power_of_2``,
``dot_tile_dim`` and ``offsets_fit_int32``.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr-function objects (Triton 3.6+) that cost
~1.7 us of host time per call; a launcher calls them several times per launch, which matters for
launch-bound small ops at batch 1.
"""

from __future__ import annotations

__all__ = ["cdiv", "next_power_of_2", "floor_power_of_2", "dot_tile_dim", "offsets_fit_int32"]


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n = 0, as ``triton.next_power_of_2``)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def floor_power_of_2(n: int) -> int:
    """The largest power of two <= n, and 1 for n <= 1 (a count of segments or programs)."""
    return 1 << (max(1, n).bit_length() - 1)


def dot_tile_dim(n: int) -> int:
    """``n`` rounded up to a power of two, at least 16: the smallest tile dimension ``tl.dot`` takes
    (padded head dims, decode row blocks)."""
    return max(16, next_power_of_2(n))


def offsets_fit_int32(shape, strides) -> bool:
    """Whether every element offset of a view with this ``shape`` and these (non-negative) ``strides``,
    counted from its first element, fits in int32: the paged kernels then compute row offsets in 32 bits."""
    return sum((n - 1) * st for n, st in zip(shape, strides)) < 2**31
