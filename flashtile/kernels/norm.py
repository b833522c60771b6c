"""RMSNorm (plain, Gemma, fused residual add) and LayerNorm kernels + their launchers.

Memory-bound: each row is loaded once, reduced in float32 registers and stored once. The block
shape follows the row length (``norm_config``):
- wide rows (hidden > 1024): one row per program, ``BLOCK_N = next_pow2(hidden)``, more warps as the
  row grows; rows longer than ``MAX_ONE_PASS`` elements loop over ``LOOP_BLOCK`` chunks (two passes);
- narrow rows (per-head q/k norm, head_dim 64..256): ``BLOCK_M`` rows per program, so a program
  still moves ~``ROW_TILE`` elements.

Pointer shapes (strides passed; rows may be a strided ``[outer, inner, N]`` view, e.g. the heads of
a q slice of a fused QKV projection): row ``r`` starts at ``(r // inner) * stride_outer +
(r % inner) * stride_inner`` (``inner = 1`` for 2-D inputs).
  X  [rows, N]  input (fp16/bf16/fp32); in place output of fused_add_rmsnorm
  R  [rows, N]  residual (fused add only), updated in place to X + R
  W  [N]        weight (any float dtype), used as ``W + weight_offset``
  Y  [rows, N]  output
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._core.device import num_sms
from .._core.intmath import cdiv, next_power_of_2
from .._core.launch import LaunchMemo, direct_launch, tensor_key

MAX_ONE_PASS = 32768  # longest row kept in registers (next_pow2(hidden) elements)
LOOP_BLOCK = 4096  # chunk of the two-pass loop for longer rows
ROW_TILE = 4096  # elements a program handles when several short rows share it
MAX_ROWS_PER_PROGRAM = 64
ELEMS_PER_WARP = 1024  # warps per program = tile elements / this (1..16)


@triton.jit
def _row_start(rows, inner, stride_outer, stride_inner):
    """Element offset of the first column of each row (int64 ``rows``)."""
    return (rows // inner) * stride_outer + (rows % inner) * stride_inner


@direct_launch
@triton.jit
def _rmsnorm_kernel(
    X, R, W, Y,
    n_rows, n_cols, inner,
    stride_x_outer, stride_x_inner, stride_x_col,
    stride_r_outer, stride_r_inner, stride_r_col,
    stride_y_outer, stride_y_inner, stride_y_col,
    stride_w, eps, weight_offset,
    HAS_RESIDUAL: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """BLOCK_M rows per program. ``s = X (+ R)`` in float32; with HAS_RESIDUAL ``R = s``;
    ``Y = s * rsqrt(mean(s^2) + eps) * (W + weight_offset)``. BLOCK_N is constexpr so that the row
    tile lives in registers and loads vectorize; ONE_PASS (row fits one tile) loads every byte once."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_N)
    x_row = X + _row_start(rows, inner, stride_x_outer, stride_x_inner)[:, None]  # [BLOCK_M, 1]
    r_row = R + _row_start(rows, inner, stride_r_outer, stride_r_inner)[:, None]
    y_row = Y + _row_start(rows, inner, stride_y_outer, stride_y_inner)[:, None]
    if ONE_PASS:
        ok = row_ok[:, None] & (cols < n_cols)[None, :]  # [BLOCK_M, BLOCK_N]
        # The weight load goes first so that its latency overlaps the row's instead of following
        # the reduction (small batches are latency-bound).
        w = tl.load(W + cols * stride_w, mask=cols < n_cols, other=0.0).to(tl.float32) + weight_offset
        s = tl.load(x_row + cols[None, :] * stride_x_col, mask=ok, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r_ptrs = r_row + cols[None, :] * stride_r_col
            s += tl.load(r_ptrs, mask=ok, other=0.0).to(tl.float32)
            tl.store(r_ptrs, s.to(R.dtype.element_ty), mask=ok)
        inv_rms = tl.rsqrt(tl.sum(s * s, axis=1) / n_cols + eps)  # [BLOCK_M]
        y = s * inv_rms[:, None] * w[None, :]
        tl.store(y_row + cols[None, :] * stride_y_col, y.to(Y.dtype.element_ty), mask=ok)
    else:
        # Pass 1: sum of squares (and the residual update); pass 2 re-reads the sum (from R when
        # fused: the rounded residual) and writes the output.
        sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            ok = row_ok[:, None] & (c < n_cols)[None, :]
            s = tl.load(x_row + c[None, :] * stride_x_col, mask=ok, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r_ptrs = r_row + c[None, :] * stride_r_col
                s += tl.load(r_ptrs, mask=ok, other=0.0).to(tl.float32)
                tl.store(r_ptrs, s.to(R.dtype.element_ty), mask=ok)
            sum_sq += tl.sum(s * s, axis=1)
        inv_rms = tl.rsqrt(sum_sq / n_cols + eps)
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            ok = row_ok[:, None] & (c < n_cols)[None, :]
            if HAS_RESIDUAL:
                s = tl.load(r_row + c[None, :] * stride_r_col, mask=ok, other=0.0).to(tl.float32)
            else:
                s = tl.load(x_row + c[None, :] * stride_x_col, mask=ok, other=0.0).to(tl.float32)
            w = tl.load(W + c * stride_w, mask=c < n_cols, other=0.0).to(tl.float32) + weight_offset
            y = s * inv_rms[:, None] * w[None, :]
            tl.store(y_row + c[None, :] * stride_y_col, y.to(Y.dtype.element_ty), mask=ok)


@direct_launch
@triton.jit
def _layernorm_kernel(
    X, G, B, Y,
    n_rows, n_cols, inner,
    stride_x_outer, stride_x_inner, stride_x_col,
    stride_y_outer, stride_y_inner, stride_y_col,
    stride_g, stride_b, eps,
    ONE_PASS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``Y = (X - mean) * rsqrt(var + eps) * G + B`` per row (biased variance, float32). The variance
    is the mean of the centred squares (no E[x^2] - mean^2 cancellation)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_N)
    x_row = X + _row_start(rows, inner, stride_x_outer, stride_x_inner)[:, None]  # [BLOCK_M, 1]
    y_row = Y + _row_start(rows, inner, stride_y_outer, stride_y_inner)[:, None]
    if ONE_PASS:
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        x = tl.load(x_row + cols[None, :] * stride_x_col, mask=ok, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / n_cols
        xc = tl.where(ok, x - mean[:, None], 0.0)
        inv_std = tl.rsqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
        g = tl.load(G + cols * stride_g, mask=cols < n_cols, other=0.0).to(tl.float32)
        b = tl.load(B + cols * stride_b, mask=cols < n_cols, other=0.0).to(tl.float32)
        y = xc * inv_std[:, None] * g[None, :] + b[None, :]
        tl.store(y_row + cols[None, :] * stride_y_col, y.to(Y.dtype.element_ty), mask=ok)
    else:
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            ok = row_ok[:, None] & (c < n_cols)[None, :]
            total += tl.sum(tl.load(x_row + c[None, :] * stride_x_col, mask=ok, other=0.0).to(tl.float32), axis=1)
        mean = total / n_cols
        sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            ok = row_ok[:, None] & (c < n_cols)[None, :]
            x = tl.load(x_row + c[None, :] * stride_x_col, mask=ok, other=0.0).to(tl.float32)
            xc = tl.where(ok, x - mean[:, None], 0.0)
            sq += tl.sum(xc * xc, axis=1)
        inv_std = tl.rsqrt(sq / n_cols + eps)
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            ok = row_ok[:, None] & (c < n_cols)[None, :]
            x = tl.load(x_row + c[None, :] * stride_x_col, mask=ok, other=0.0).to(tl.float32)
            g = tl.load(G + c * stride_g, mask=c < n_cols, other=0.0).to(tl.float32)
            b = tl.load(B + c * stride_b, mask=c < n_cols, other=0.0).to(tl.float32)
            y = (x - mean[:, None]) * inv_std[:, None] * g[None, :] + b[None, :]
            tl.store(y_row + c[None, :] * stride_y_col, y.to(Y.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1024)
def norm_config(n_rows: int, n_cols: int, num_sms: int) -> tuple[int, int, bool, int]:
    """``(BLOCK_M, BLOCK_N, ONE_PASS, num_warps)`` for ``n_rows`` rows of ``n_cols`` elements.

    One row per program for rows wider than 1024; shorter rows share a program (up to ROW_TILE
    elements) while there are still at least ``num_sms`` programs. Warps grow with the tile so
    each thread holds 8..32 elements.
    """
    block_n = next_power_of_2(n_cols)
    one_pass = block_n <= MAX_ONE_PASS
    if not one_pass:
        block_n = LOOP_BLOCK
    block_m = 1
    if one_pass and block_n <= 1024:
        block_m = min(ROW_TILE // block_n, MAX_ROWS_PER_PROGRAM, next_power_of_2(n_rows))
        while block_m > 1 and cdiv(n_rows, block_m) < num_sms:
            block_m //= 2
    num_warps = max(1, min(16, block_m * block_n // ELEMS_PER_WARP))
    return block_m, block_n, one_pass, num_warps


def _rows(x: torch.Tensor) -> tuple[int, int, int, int]:
    """``(inner, stride_outer, stride_inner, stride_col)`` of a 2-D ``[rows, N]`` or 3-D
    ``[outer, inner, N]`` tensor."""
    if x.dim() == 2:
        return 1, x.stride(0), 0, x.stride(1)
    return x.shape[1], x.stride(0), x.stride(1), x.stride(2)


# Launches replayed per (shapes, strides, dtypes, alignment): only X, R, W, Y, eps and the weight
# offset change between calls with one key (host time is most of a batch-1 norm's cost). The plain
# and the fused norm keep apart memos: their callers' keys (launch_key) have different layouts.
_RMSNORM_LAUNCHES = LaunchMemo(dynamic=(0, 1, 2, 3, 17, 18))
_FUSED_ADD_RMSNORM_LAUNCHES = LaunchMemo(dynamic=(0, 1, 2, 3, 17, 18))
_LAYERNORM_LAUNCHES = LaunchMemo(dynamic=(0, 1, 2, 3, 15))


def _launch_rmsnorm(memo, key, x, residual, weight, y, eps: float, weight_offset: float) -> None:
    """RMSNorm of ``x`` (plus ``residual``) into ``y``, replayed from ``memo`` when ``key`` (which
    must fix everything but the tensors' addresses, eps and the weight offset) is known."""
    has_residual = residual is not None
    r = residual if has_residual else x
    replay = memo.get(key)
    if replay is not None:
        replay(x, r, weight, y, float(eps), float(weight_offset))
        return
    n_cols = x.shape[-1]
    n_rows = x.numel() // max(n_cols, 1)
    if n_rows == 0 or n_cols == 0:
        return
    block_m, block_n, one_pass, num_warps = norm_config(n_rows, n_cols, num_sms(x.device))
    inner, sxo, sxi, sxc = _rows(x)
    _, syo, syi, syc = _rows(y)
    _, sro, sri, src = _rows(r)
    args = (x, r, weight, y, n_rows, n_cols, inner, sxo, sxi, sxc, sro, sri, src, syo, syi, syc,
            weight.stride(0), float(eps), float(weight_offset))
    memo.launch(key, _rmsnorm_kernel, (cdiv(n_rows, block_m),), args, dict(
        HAS_RESIDUAL=has_residual, ONE_PASS=one_pass, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps))


def rmsnorm(input: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, eps: float, weight_offset: float,
            launch_key=None) -> None:
    """``out = rmsnorm(input) * (weight + weight_offset)``; input/out ``[rows, N]`` or ``[T, H, N]``.
    ``launch_key``: the caller's key of these tensors' metadata (_core/memo.py), or None to compute one."""
    if launch_key is None:
        launch_key = (tensor_key(input), tensor_key(weight), tensor_key(out))
    _launch_rmsnorm(_RMSNORM_LAUNCHES, launch_key, input, None, weight, out, eps, weight_offset)


def rmsnorm_runner(launch_key):
    """``run(input, weight, out, eps, weight_offset)``: :func:`rmsnorm` for tensors of ``launch_key``, made
    once per key by a caller that keeps it in its own memo (the API layer): once the launch is recorded,
    a call replays it without looking the key up again (_core/launch.py's ReplayCell)."""
    cell = _RMSNORM_LAUNCHES.cell(launch_key)

    def run(input, weight, out, eps, weight_offset):
        if not cell.replay(input, input, weight, out, eps, weight_offset):
            _launch_rmsnorm(_RMSNORM_LAUNCHES, launch_key, input, None, weight, out, eps, weight_offset)
            cell.refresh()

    return run


def fused_add_rmsnorm_runner(launch_key):
    """``run(input, residual, weight, eps, weight_offset)``: :func:`fused_add_rmsnorm` for tensors of
    ``launch_key``, as :func:`rmsnorm_runner`."""
    cell = _FUSED_ADD_RMSNORM_LAUNCHES.cell(launch_key)

    def run(input, residual, weight, eps, weight_offset):
        if not cell.replay(input, residual, weight, input, eps, weight_offset):
            _launch_rmsnorm(_FUSED_ADD_RMSNORM_LAUNCHES, launch_key, input, residual, weight, input, eps,
                            weight_offset)
            cell.refresh()

    return run


def fused_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                      weight_offset: float, launch_key=None) -> None:
    """In place: ``residual += input``; ``input = rmsnorm(input + residual) * (weight + weight_offset)``.
    ``launch_key``: as :func:`rmsnorm`."""
    if launch_key is None:
        launch_key = (tensor_key(input), tensor_key(residual), tensor_key(weight))
    _launch_rmsnorm(_FUSED_ADD_RMSNORM_LAUNCHES, launch_key, input, residual, weight, input, eps, weight_offset)


def layernorm(input: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, out: torch.Tensor, eps: float,
              launch_key=None) -> None:
    """``out = layernorm(input) * gamma + beta``; input/out ``[rows, N]`` or ``[T, H, N]``.
    ``launch_key``: as :func:`rmsnorm`."""
    if launch_key is None:
        launch_key = (tensor_key(input), tensor_key(gamma), tensor_key(beta), tensor_key(out))
    replay = _LAYERNORM_LAUNCHES.get(launch_key)
    if replay is not None:
        replay(input, gamma, beta, out, float(eps))
        return
    n_cols = input.shape[-1]
    n_rows = input.numel() // max(n_cols, 1)
    if n_rows == 0 or n_cols == 0:
        return
    block_m, block_n, one_pass, num_warps = norm_config(n_rows, n_cols, num_sms(input.device))
    inner, sxo, sxi, sxc = _rows(input)
    _, syo, syi, syc = _rows(out)
    args = (input, gamma, beta, out, n_rows, n_cols, inner, sxo, sxi, sxc, syo, syi, syc,
            gamma.stride(0), beta.stride(0), float(eps))
    _LAYERNORM_LAUNCHES.launch(launch_key, _layernorm_kernel, (cdiv(n_rows, block_m),), args, dict(
        ONE_PASS=one_pass, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps))
