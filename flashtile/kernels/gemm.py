"""Segment GEMM and fp8 batched GEMM kernels + launchers (same functions as ``reference/gemm.py``).

Segment GEMM: one launch over the row tiles of every segment (scheduler/segment_tiles.py) and, with
split-K, a second that adds the splits. Program ``(pid, split)`` finds its row tile's segment on the
device by scanning the segment lengths or offsets (``_locate_tile``: no host sync and no prefix-sum
launch, so ``run`` is one or two launches and capturable in a CUDA graph), then computes a
``[BLOCK_M, BLOCK_N]`` output tile with ``tl.dot`` over ``BLOCK_K`` slices of its part of ``d_in`` in
float32. Programs past the last tile run no k iteration and store nothing. The tile shape, the split
count and the pipeline depth are chosen on the host per shape class from x's rows, the number of
segments, d_in and d_out (``segment_gemm_config``; the classes are module data, ``SEG_TILES``).

Split-K (deterministic, no atomics, no zero-filled buffer): split ``s`` writes its float32 sum of the
tile into ``PARTIAL[s]`` (rows of segments only; every such row is written by every split), and
``_segment_gemm_reduce_kernel`` adds ``PARTIAL[0..SPLIT)`` in order and rounds once into ``Y``. The
partials live in the wrapper's float workspace (SPLIT x rows x d_out float32); a smaller workspace
lowers the split count, down to 1 (no split).

Every matrix's innermost stride is 1, written as a literal in the kernels (Triton 3.6 does not
specialize a stride argument equal to 1, and without it loads neither vectorize nor pipeline); the
launchers copy an input whose last dim is strided. Pointer shapes:
  X [rows, d_in]                 segment rows (fp16/bf16), stride_xm
  W [num_weights, d_in, d_out]   row-major (n contiguous, stride_w_row between k rows), or
    [num_weights, d_out, d_in]   column-major, W_COLUMN_MAJOR (k contiguous, stride_w_row between n rows)
  Y [rows, d_out]                output, stride_ym; rows outside every segment are not written
  PARTIAL [SPLIT, rows, d_out]   float32 split-K partial sums (stride_ps, stride_pm), only when SPLIT > 1
  SEGS [B] lengths (SEGS_ARE_LENS) or [B + 1] offsets, int32/int64; WEIGHT_INDICES [B] int32/int64 (optional)

bmm_fp8: A [b, m, k] and B [b, k, n] fp8, both k contiguous; C [b, m, n]. Grid: batch x m tiles x
n tiles on one axis; fp8 ``tl.dot`` (Hopper's fp8 tensor cores) in float32, scaled by ``A_scale * B_scale`` read on
the device, rounded once to the output dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import triton
import triton.language as tl

from .._core.device import num_sms, shared_memory_limit
from .._core.intmath import cdiv, next_power_of_2
from .._core.launch import direct_launch
from .._core.settings import interpreting
from ..scheduler.segment_tiles import tile_slots
from .tiles import mma

__all__ = ["segment_gemm", "bmm_fp8", "segment_gemm_config", "bmm_fp8_config", "SegTile", "SEG_TILES"]

INTERPRET = interpreting()  # Triton 3.9's interpreter computes bf16 tl.dot wrongly (tiles.mma)


@triton.jit
def _locate_tile(SEGS, num_segments, t, SEGS_ARE_LENS: tl.constexpr, BLOCK_M: tl.constexpr, SCAN: tl.constexpr):
    """Row tile ``t`` of the launch: ``(segment, first row of the tile, end row of the segment)``, or
    ``(-1, 0, 0)`` when ``t`` is past the last tile. Segment ``s`` owns ``cdiv(len_s, BLOCK_M)``
    row tiles, numbered after those of segments ``0..s-1``; the segments are scanned SCAN at a time
    (their tile counts and row counts, running sums in registers), and exactly one non-empty segment's
    tile range holds ``t``. scheduler/segment_tiles.py::locate_tile is the host mirror."""
    found = tl.full((), 0, tl.int32)  # 1 + the segment that holds t, or 0
    row0 = tl.full((), 0, tl.int64)
    row_end = tl.full((), 0, tl.int64)
    tiles_before = tl.full((), 0, tl.int32)
    if SEGS_ARE_LENS:  # SEGS [B] lengths: the rows start at 0
        rows_before = tl.full((), 0, tl.int64)
    else:  # SEGS [B + 1] offsets
        rows_before = tl.load(SEGS).to(tl.int64)
    for c in range(0, num_segments, SCAN):
        idx = c + tl.arange(0, SCAN)  # [SCAN] segments
        ok = idx < num_segments
        if SEGS_ARE_LENS:
            lens = tl.load(SEGS + idx, mask=ok, other=0).to(tl.int64)
        else:
            lens = (tl.load(SEGS + idx + 1, mask=ok, other=0) - tl.load(SEGS + idx, mask=ok, other=0)).to(tl.int64)
        lens = tl.maximum(lens, 0)
        tiles = ((lens + (BLOCK_M - 1)) // BLOCK_M).to(tl.int32)
        tiles_end = tl.cumsum(tiles, 0) + tiles_before  # [SCAN] tiles of segments 0..s
        rows_end = tl.cumsum(lens, 0) + rows_before  # [SCAN] end row of segment s
        first_tile = tiles_end - tiles
        hit = ok & (first_tile <= t) & (t < tiles_end)
        found += tl.sum(tl.where(hit, idx + 1, 0), 0)
        row0 += tl.sum(tl.where(hit, rows_end - lens + (t - first_tile).to(tl.int64) * BLOCK_M, 0), 0)
        row_end += tl.sum(tl.where(hit, rows_end, 0), 0)
        tiles_before += tl.sum(tiles, 0)
        rows_before += tl.sum(lens, 0)
    return found - 1, row0, row_end


@triton.jit
def _program_tile(SEGS, num_segments, row_slots, d_out, SEGS_ARE_LENS: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, SCAN: tl.constexpr):
    """``(segment, first row, end row, column tile)`` of program ``program_id(0)``. Grouped order: GROUP_M
    consecutive row tiles (mostly one segment's) sweep the column tiles together, so the programs running at
    one time share each weight tile and each row tile through L2. ``segment`` is -1 past the last tile."""
    tiles_n = tl.cdiv(d_out, BLOCK_N)
    pid = tl.program_id(0)
    per_group = GROUP_M * tiles_n
    first_t = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(row_slots - first_t, GROUP_M)
    t = first_t + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    seg, row0, row_end = _locate_tile(SEGS, num_segments, t, SEGS_ARE_LENS, BLOCK_M, SCAN)
    return seg, row0, row_end, pid_n


@direct_launch
@triton.jit
def _segment_gemm_kernel(
    X, W, Y, PARTIAL, SEGS, WEIGHT_INDICES,
    num_segments, row_slots, d_in, d_out, k_per_split,
    stride_xm, stride_wb, stride_w_row, stride_ym, stride_ps, stride_pm,
    SEGS_ARE_LENS: tl.constexpr, HAS_WEIGHT_INDICES: tl.constexpr, W_COLUMN_MAJOR: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SCAN: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    # program (pid, split): output tile (_program_tile), d_in range [split * k_per_split, +k_per_split).
    split = tl.program_id(1)
    seg, row0, row_end, pid_n = _program_tile(SEGS, num_segments, row_slots, d_out, SEGS_ARE_LENS, BLOCK_M, BLOCK_N,
                                              GROUP_M, SCAN)
    active = seg >= 0  # programs past the last tile run no k iteration and store nothing (no early return:
    seg = tl.maximum(seg, 0)  # it would keep the k loop from being software-pipelined)
    if HAS_WEIGHT_INDICES:
        w_index = tl.load(WEIGHT_INDICES + seg).to(tl.int64)
    else:
        w_index = seg.to(tl.int64)
    rows = row0 + tl.arange(0, BLOCK_M)  # [M] int64
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [N]
    offs_k = tl.arange(0, BLOCK_K)  # [K]
    row_ok = rows < row_end
    col_ok = cols < d_out
    k_lo = split * k_per_split
    k_hi = tl.where(active, tl.minimum(d_in, k_lo + k_per_split), k_lo)
    x_ptrs = X + rows[:, None] * stride_xm + (k_lo + offs_k)[None, :]  # [M, K]
    if W_COLUMN_MAJOR:  # stored [d_out, d_in]: k contiguous
        w_ptrs = W + w_index * stride_wb + (k_lo + offs_k)[:, None] + cols[None, :] * stride_w_row  # [K, N]
        w_step = BLOCK_K
    else:  # stored [d_in, d_out]: n contiguous
        w_ptrs = W + w_index * stride_wb + (k_lo + offs_k)[:, None] * stride_w_row + cols[None, :]  # [K, N]
        w_step = BLOCK_K * stride_w_row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:  # d_in a multiple of BLOCK_K (and k_per_split is one): no k mask
            x = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < d_in - k0
            x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += mma(x, w, UPCAST_DOT)
        x_ptrs += BLOCK_K
        w_ptrs += w_step
    out_ok = row_ok[:, None] & col_ok[None, :]
    if WRITE_PARTIAL:  # split-K: this split's float32 sum; _segment_gemm_reduce_kernel adds the splits
        p_ptrs = PARTIAL + split.to(tl.int64) * stride_ps + rows[:, None] * stride_pm + cols[None, :]
        tl.store(p_ptrs, acc, mask=out_ok)
    else:
        y_ptrs = Y + rows[:, None] * stride_ym + cols[None, :]
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=out_ok)


@triton.jit
def _segment_gemm_tma_kernel(
    X_DESC, W_DESC, Y, SEGS, WEIGHT_INDICES,
    num_segments, row_slots, d_in, d_out, stride_ym,
    SEGS_ARE_LENS: tl.constexpr, HAS_WEIGHT_INDICES: tl.constexpr, W_COLUMN_MAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SCAN: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    # _segment_gemm_kernel without split-K, its tiles loaded by TMA (Hopper's tensor memory accelerator):
    # X_DESC [rows, d_in] in [BLOCK_M, BLOCK_K] blocks; W_DESC [num_weights, d_out, d_in] (W_COLUMN_MAJOR) in
    # [1, BLOCK_N, BLOCK_K] blocks, or [num_weights, d_in, d_out] in [1, BLOCK_K, BLOCK_N] blocks. Blocks past
    # d_in, d_out or x's last row read zeros; rows of the next segment in a tile's last rows are read but
    # not stored.
    seg, row0, row_end, pid_n = _program_tile(SEGS, num_segments, row_slots, d_out, SEGS_ARE_LENS, BLOCK_M, BLOCK_N,
                                              GROUP_M, SCAN)
    active = seg >= 0
    seg = tl.maximum(seg, 0)
    if HAS_WEIGHT_INDICES:
        w_index = tl.load(WEIGHT_INDICES + seg).to(tl.int32)
    else:
        w_index = seg
    n0 = pid_n * BLOCK_N
    row0_i32 = row0.to(tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.where(active, d_in, 0), BLOCK_K):
        x = X_DESC.load([row0_i32, k0])  # [M, K]
        if W_COLUMN_MAJOR:
            w = tl.trans(W_DESC.load([w_index, n0, k0]).reshape(BLOCK_N, BLOCK_K))  # [K, N]
        else:
            w = W_DESC.load([w_index, k0, n0]).reshape(BLOCK_K, BLOCK_N)  # [K, N]
        acc += mma(x, w, UPCAST_DOT)
    rows = row0 + tl.arange(0, BLOCK_M)  # [M] int64
    cols = n0 + tl.arange(0, BLOCK_N)  # [N]
    out_ok = (rows < row_end)[:, None] & (cols < d_out)[None, :]
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty), mask=out_ok)


@direct_launch
@triton.jit
def _segment_gemm_reduce_kernel(
    PARTIAL, Y, SEGS,
    num_segments, d_out, num_splits, stride_ps, stride_pm, stride_ym,
    SEGS_ARE_LENS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SCAN: tl.constexpr,
):
    # Y[r, c] = sum over splits s (in order: deterministic) of PARTIAL[s, r, c], for the rows r of the segments,
    # which are one range [first, last) (segments are consecutive); other rows of Y keep their values.
    if SEGS_ARE_LENS:
        first = tl.full((), 0, tl.int64)
        last = tl.full((), 0, tl.int64)
        for c in range(0, num_segments, SCAN):
            idx = c + tl.arange(0, SCAN)
            last += tl.sum(tl.maximum(tl.load(SEGS + idx, mask=idx < num_segments, other=0).to(tl.int64), 0), 0)
    else:
        first = tl.load(SEGS).to(tl.int64)
        last = tl.load(SEGS + num_segments).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [R]
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # [C]
    ok = ((rows >= first) & (rows < last))[:, None] & (cols < d_out)[None, :]
    p_ptrs = PARTIAL + rows[:, None] * stride_pm + cols[None, :]  # [R, C]
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for s in range(num_splits):
        acc += tl.load(p_ptrs + s * stride_ps, mask=ok, other=0.0)
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty), mask=ok)


@dataclass(frozen=True)
class SegTile:
    """A segment-GEMM launch shape: ``block_m`` rows x ``block_n`` output columns per tile and ``block_k``
    of d_in per ``tl.dot`` (``block_n`` and ``block_k`` are bounds: the next power of two of d_out / d_in,
    at least 16, when smaller; 0 = no bound), ``group_m`` row tiles per sweep of the column tiles, warps,
    pipeline stages (lowered on the host until the stages fit the device's shared memory)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    warps: int
    stages: int


# GPU launch shapes per shape class (module data, so that benchmarks/bench_gemm.py's tuning grid can
# replace an entry). block_m is an upper bound for the narrow classes: the next power of two of the
# mean segment length (at least 16) when that is smaller. See docs/gemm.md for the reasoning.
SEG_TILES = {
    # d_out <= 128 < d_in (LoRA shrink): narrow output, long k loop; split-K fills the machine.
    "shrink": SegTile(block_m=64, block_n=0, block_k=128, group_m=1, warps=4, stages=4),
    # d_in <= 128 (LoRA expand): one k step per tile; bound by writing the output.
    "expand": SegTile(block_m=64, block_n=128, block_k=0, group_m=8, warps=4, stages=2),
    # both wide, >= SEG_LONG_ROWS rows a segment on average (MoE with few experts): compute bound.
    "long": SegTile(block_m=128, block_n=256, block_k=64, group_m=8, warps=8, stages=3),
    # both wide, shorter segments (MoE with many experts): bound by reading each expert's weights once.
    "short": SegTile(block_m=64, block_n=256, block_k=64, group_m=8, warps=8, stages=4),
}
SEG_NARROW = 128  # d_out (shrink) or d_in (expand) at most this: a narrow class
SEG_LONG_ROWS = 96  # mean rows per segment from which the "long" class applies
SEG_SPLIT_K = 0  # 0: automatic split-K (below); n > 0: n splits of d_in (the scratch buffer permitting)
SEG_SPLIT_WAVES = 2  # automatic: split until the programs fill this many waves of SMs...
SEG_SPLIT_MIN_K = 512  # ...but each split keeps at least this much of d_in
SEG_MAX_SPLIT = 16
SEG_REDUCE_ROWS = 32  # rows per program of the split-K reduction
# The wide classes ("long", "short") load their tiles by TMA (_segment_gemm_tma_kernel) when True and the
# tensors allow it (16-byte aligned base and row strides; never with split-K). Off by default until measured.
SEG_TMA = False


def _shape_class(rows: int, num_segments: int, d_in: int, d_out: int) -> str:
    if d_in <= SEG_NARROW:
        return "expand"
    if d_out <= SEG_NARROW:
        return "shrink"
    return "long" if rows >= SEG_LONG_ROWS * max(num_segments, 1) else "short"


@functools.lru_cache(maxsize=1024)
def segment_gemm_config(rows: int, num_segments: int, d_in: int, d_out: int, itemsize: int = 2,
                        scratch_floats: int = 0, sms: int = 132, smem: Optional[int] = None,
                        interpret: bool = INTERPRET) -> dict:
    """The launch of one segment GEMM, from facts known on the host without reading the index tensors:
    x's rows, the number of segments, d_in, d_out, the element size, the float32 scratch available for
    split-K partial sums, the device's SMs and shared memory per program (None: no limit).

    Returns the kernel's tile constexprs and launch options plus ``SPLIT`` (d_in splits; 1 = no
    split-K), ``K_PER_SPLIT`` and ``ROW_SLOTS`` (the grid's row-tile bound, scheduler/segment_tiles.py)."""
    cls = _shape_class(rows, num_segments, d_in, d_out)
    if interpret:
        tile = SegTile(16, 32, 32, 2, 4, 1)
    else:
        tile = SEG_TILES[cls]
    block_m = tile.block_m
    if cls in ("shrink", "expand") and not interpret:
        mean = -(-rows // max(num_segments, 1))
        block_m = min(block_m, max(16, next_power_of_2(mean)))
    block_n = min(tile.block_n or 1 << 30, max(16, next_power_of_2(d_out)))
    block_k = min(tile.block_k or 1 << 30, max(16, next_power_of_2(d_in)))
    stages = tile.stages
    while smem is not None and stages > 1 and stages * (block_m + block_n) * block_k * itemsize > smem:
        stages -= 1
    row_slots = tile_slots(rows, num_segments, block_m)
    tiles_n = cdiv(d_out, block_n)
    # split-K: programs ~ row tiles (estimated: full tiles plus a partial one for half the segments) x column
    # tiles; split d_in until they fill SEG_SPLIT_WAVES waves, keeping >= SEG_SPLIT_MIN_K of d_in per split.
    if SEG_SPLIT_K:
        split = SEG_SPLIT_K
    else:
        programs = min(row_slots, cdiv(rows, block_m) + num_segments // 2) * tiles_n
        split = min(SEG_MAX_SPLIT, d_in // SEG_SPLIT_MIN_K, cdiv(SEG_SPLIT_WAVES * sms, max(programs, 1)))
    split = max(1, min(split, cdiv(d_in, block_k), scratch_floats // max(rows * d_out, 1)))
    k_per_split = cdiv(cdiv(d_in, split), block_k) * block_k
    split = cdiv(d_in, k_per_split)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=tile.group_m, num_warps=tile.warps,
                num_stages=stages, SPLIT=split, K_PER_SPLIT=k_per_split, ROW_SLOTS=row_slots,
                TMA=SEG_TMA and cls in ("long", "short") and split == 1)


def segment_gemm(x, weights, segs, segs_are_lens: bool, weight_indices, weight_column_major: bool, out,
                 scratch) -> None:
    """See ``reference/gemm.py``: the same arguments (segs int32/int64 on x's device; scratch a float32
    1-D tensor, possibly empty, for split-K partial sums)."""
    num_segments = segs.shape[0] - (0 if segs_are_lens else 1)
    rows, d_in = x.shape
    d_out = out.shape[1]
    cfg = segment_gemm_config(rows, num_segments, d_in, d_out, x.element_size(), scratch.numel(),
                              num_sms(x.device), shared_memory_limit(x.device))
    # The kernel takes each matrix's innermost stride as 1 (a literal, so loads vectorize and pipeline).
    x = _unit_inner_stride(x)
    weights = _unit_inner_stride(weights)
    y = out if out.stride(-1) == 1 or out.shape[1] == 1 else out.new_empty(out.shape)
    if y is not out:
        y.copy_(out)  # rows outside every segment keep their values
    split = cfg["SPLIT"]
    scan = min(128, max(16, next_power_of_2(num_segments)))
    if cfg["TMA"] and split == 1 and _tma_ready(x, weights):
        _launch_tma(x, weights, y, segs, segs_are_lens, weight_indices, weight_column_major, cfg, scan)
        if y is not out:
            out.copy_(y)
        return
    grid = (cfg["ROW_SLOTS"] * cdiv(d_out, cfg["BLOCK_N"]), split)
    _segment_gemm_kernel[grid](
        x, weights, y, scratch, segs, weight_indices if weight_indices is not None else segs,
        num_segments, cfg["ROW_SLOTS"], d_in, d_out, cfg["K_PER_SPLIT"],
        x.stride(0), weights.stride(0), weights.stride(1), y.stride(0), rows * d_out, d_out,
        SEGS_ARE_LENS=segs_are_lens, HAS_WEIGHT_INDICES=weight_indices is not None,
        W_COLUMN_MAJOR=weight_column_major, WRITE_PARTIAL=split > 1, EVEN_K=d_in % cfg["BLOCK_K"] == 0,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        SCAN=scan, UPCAST_DOT=INTERPRET, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split > 1:
        block_c = min(128, max(16, next_power_of_2(d_out)))
        _segment_gemm_reduce_kernel[(cdiv(rows, SEG_REDUCE_ROWS), cdiv(d_out, block_c))](
            scratch, y, segs, num_segments, d_out, split, rows * d_out, d_out, y.stride(0),
            SEGS_ARE_LENS=segs_are_lens, BLOCK_R=SEG_REDUCE_ROWS, BLOCK_C=block_c, SCAN=scan, num_warps=4,
        )
    if y is not out:
        out.copy_(y)


def _tma_ready(x, weights) -> bool:
    """TMA's constraints: 16-byte aligned bases and strides (other than the innermost, which is 1)."""
    size = x.element_size()
    return (x.data_ptr() % 16 == 0 and weights.data_ptr() % 16 == 0 and (x.stride(0) * size) % 16 == 0
            and (weights.stride(0) * size) % 16 == 0 and (weights.stride(1) * size) % 16 == 0)


def _launch_tma(x, weights, y, segs, segs_are_lens, weight_indices, weight_column_major, cfg, scan) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    x_desc = TensorDescriptor(x, list(x.shape), [x.stride(0), 1], [bm, bk])
    w_block = [1, bn, bk] if weight_column_major else [1, bk, bn]
    w_desc = TensorDescriptor(weights, list(weights.shape), [weights.stride(0), weights.stride(1), 1], w_block)
    d_in, d_out = x.shape[1], y.shape[1]
    num_segments = segs.shape[0] - (0 if segs_are_lens else 1)
    _segment_gemm_tma_kernel[(cfg["ROW_SLOTS"] * cdiv(d_out, bn),)](
        x_desc, w_desc, y, segs, weight_indices if weight_indices is not None else segs,
        num_segments, cfg["ROW_SLOTS"], d_in, d_out, y.stride(0),
        SEGS_ARE_LENS=segs_are_lens, HAS_WEIGHT_INDICES=weight_indices is not None,
        W_COLUMN_MAJOR=weight_column_major, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
        SCAN=scan, UPCAST_DOT=INTERPRET, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _unit_inner_stride(t):
    """``t`` itself when its last dim has stride 1 (or size 1), else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


@triton.jit
def _bmm_fp8_kernel(
    A, B, C, A_SCALE, B_SCALE,
    m, n, k,
    stride_ab, stride_am, stride_bb, stride_bn, stride_cb, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MIXED_FP8: tl.constexpr, UPCAST_DOT: tl.constexpr, GROUP_M: tl.constexpr,
):
    # A [batch, m, k] fp8, k contiguous; B [batch, k, n] fp8, k contiguous (column-major); C [batch, m, n],
    # n contiguous. Tiles grouped GROUP_M rows at a time so
    # programs running together share B columns in L2.
    tiles_m = tl.cdiv(m, BLOCK_M)
    tiles_n = tl.cdiv(n, BLOCK_N)
    # one flat grid axis (batch-major): grid axes past the first hold at most 65535 programs
    batch = (tl.program_id(0) // (tiles_m * tiles_n)).to(tl.int64)
    pid = tl.program_id(0) % (tiles_m * tiles_n)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_rows
    pid_n = (pid % (GROUP_M * tiles_n)) // group_rows
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [M]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [N]
    offs_k = tl.arange(0, BLOCK_K)  # [K]
    row_ok = rows < m
    col_ok = cols < n
    a_ptrs = A + batch * stride_ab + rows[:, None] * stride_am + offs_k[None, :]  # [M, K]
    b_ptrs = B + batch * stride_bb + offs_k[:, None] + cols[None, :] * stride_bn  # [K, N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        k_ok = offs_k < k - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST_DOT:  # the interpreter: float32 products of the exact fp8 values
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32))
        elif MIXED_FP8:  # e4m3 x e5m2: both are exact in fp16
            acc += tl.dot(a.to(tl.float16), b.to(tl.float16))
        else:
            acc += tl.dot(a, b)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    acc = acc * (tl.load(A_SCALE) * tl.load(B_SCALE))
    c_ptrs = C + batch * stride_cb + rows[:, None] * stride_cm + cols[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


FP8_BLOCK_M = 128  # 64 when m <= 64
FP8_BLOCK_N = 128
FP8_BLOCK_K = 128  # fp8: 128 bytes of k per row
FP8_WARPS = 8  # 4 with 64-row tiles
FP8_STAGES = 4


def bmm_fp8_config(m: int, n: int, interpret: bool = INTERPRET) -> dict:
    """Tile sizes: the FP8_* constants on a GPU (64-row tiles and 4 warps when m <= 64), small tiles
    under the interpreter."""
    if interpret:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    small = m <= 64 and FP8_BLOCK_M > 64
    return dict(BLOCK_M=64 if small else FP8_BLOCK_M, BLOCK_N=FP8_BLOCK_N, BLOCK_K=FP8_BLOCK_K, GROUP_M=8,
                num_warps=4 if small else FP8_WARPS, num_stages=FP8_STAGES)


def bmm_fp8(A, B, A_scale, B_scale, out) -> None:
    """See ``reference/gemm.py``: the same arguments."""
    batch, m, k = A.shape
    n = B.shape[2]
    cfg = bmm_fp8_config(m, n)
    A = _unit_inner_stride(A)
    if B.stride(1) != 1 and k > 1:  # the API requires column-major B; keep the kernel's contract anyway
        B = B.transpose(1, 2).contiguous().transpose(1, 2)
    c = _unit_inner_stride(out)
    grid = (cdiv(m, cfg["BLOCK_M"]) * cdiv(n, cfg["BLOCK_N"]) * batch,)
    _bmm_fp8_kernel[grid](
        A, B, c, A_scale, B_scale, m, n, k,
        A.stride(0), A.stride(1), B.stride(0), B.stride(2), c.stride(0), c.stride(1),
        MIXED_FP8=A.dtype != B.dtype, UPCAST_DOT=INTERPRET, **cfg,
    )
    if c is not out:
        out.copy_(c)

