"""Tile policy: the tile shapes and KV-chunk granularity that planning and the launchers share.

The planners (decode.py, prefill.py) ask this module, not the kernel modules, for the facts they plan
with; the kernel launchers read the same tables. ``planning_facts`` gives a plan's KV-chunk granularity
and SM count on the path a call takes (the reference path and the interpreter plan small tiles on a
4-SM "GPU", so CPU tests exercise splitting).
"""

from __future__ import annotations

from typing import Optional

import torch

from .device import INTERPRETER_SMS, num_sms
from .intmath import dot_tile_dim
from .settings import interpreting

__all__ = ["KV_CHUNK_ALIGN", "SMALL_TILE", "SMALL_M_CONFIGS", "plans_small_tiles", "planning_facts",
           "prefill_tile_shape", "small_tiles"]

# KV splits are multiples of this many tokens so every BLOCK_N of the kernels divides a chunk
# (128 beat 256 at kv 4k and 128k on H100: finer chunks fit the grid to the GPU better).
KV_CHUNK_ALIGN = 128
# The interpreter's (and the reference plan's) tile, rows and keys: small, so tiny tests split and merge.
SMALL_TILE = 16


def small_tiles() -> bool:
    """Whether the kernels run under Triton's interpreter (tiny tiles)."""
    return interpreting()


def plans_small_tiles(compiled: bool) -> bool:
    """Whether a plan uses the small tile on a 4-SM "GPU" (module doc): on the reference path (``compiled``
    False: the call does not run the compiled kernels) and under Triton's interpreter. A plan asks once and
    passes the answer to :func:`planning_facts` and :func:`prefill_tile_shape`: TRITON_INTERPRET is read at
    every use (_core/settings.py), which costs microseconds."""
    return not compiled or small_tiles()


def planning_facts(device: torch.device, small: bool) -> tuple:
    """``(KV-chunk granularity in tokens, SMs)`` to plan for on ``device``; ``small``: the plan uses the
    small tile (:func:`plans_small_tiles`)."""
    if small:
        return SMALL_TILE, INTERPRETER_SMS
    return KV_CHUNK_ALIGN, num_sms(device)


# Launch configurations, measured on H100 (the batch_prefill tuning grids, bf16, causal):
# - BLOCK_M follows the longest request: an append batch of 4 tokens x GQA 4 has 16 rows per KV head,
#   a 128-row tile would be 7/8 padding. Small tiles use SMALL_M_CONFIGS[block_m][padded head dim].
# - 128-row tiles: BLOCK_N 64, 8 warps, 3 stages won on 16 x 1024 (ragged 248 TFLOP/s vs 230 with
#   BLOCK_N 128; d192/128 267 vs 163 with 64-row tiles); long sequences keep the single-prefill
#   BLOCK_N 128 (476 TFLOP/s at 1 x 32768). Stages drop to 2 where 3 would not fit shared memory.
# - Re-tuned 2026-11-22, after the launch-order change (scheduler/prefill_work.py) and with the paged
#   page-id prefetch: prompts of up to SHORT_KV keys run best with BLOCK_N 32 and 4 warps (ragged
#   16 x 1024 GQA 302 TFLOP/s vs 285 at BLOCK_N 64 / 8 warps, 128 x 1024 284 vs 277, paged page 16
#   254 vs 239); at 2048 keys BLOCK_N 64 / 8 warps wins again (362 vs 341), at 4096 BLOCK_N 128 (421
#   vs 412). d192/128 keeps BLOCK_N 64 / 8 warps (296 vs 135). Page size 1 runs best without the
#   prefetch at BLOCK_N 64 / 4 warps (245; with it, 235 at 8 warps: its page-id vector spills 4 warps).
SMALL_M_CONFIGS = {
    16: {16: (32, 4, 3), 32: (32, 4, 3), 64: (32, 4, 3), 128: (32, 4, 3), 256: (32, 4, 2)},
    32: {16: (64, 4, 3), 32: (64, 4, 3), 64: (64, 4, 3), 128: (64, 4, 3), 256: (32, 4, 2)},
    64: {16: (64, 4, 3), 32: (64, 4, 3), 64: (64, 4, 3), 128: (64, 4, 3), 256: (32, 4, 2)},
}
SHORT_KV = 1024  # up to this many keys, 128-row tiles (head dims <= 128) use BLOCK_N 32
LONG_KV = 4096  # from this many keys on, 128-row tiles use BLOCK_N 128


# Set by the batch_prefill suite's `tiles` tuning grid to time one configuration: (block_n, num_warps, num_stages).
CONFIG_OVERRIDE: Optional[tuple] = None


def prefill_tile_shape(max_rows: Optional[int], max_kv_len: int, head_dim_qk: int,
                       head_dim_vo: int, page_size: Optional[int] = None, small: Optional[bool] = None) -> tuple:
    """``(BLOCK_M, BLOCK_N)`` for a batch whose longest request has ``max_rows`` GQA-packed rows and
    whose longest KV has ``max_kv_len`` keys, over a cache of ``page_size`` (None: ragged).
    ``max_rows=None``: the batch-independent shape (deterministic mode: a request's tiles, and so its
    bits, do not depend on the other requests). ``small``: the plan uses the small tile
    (:func:`plans_small_tiles`; None: the compiled kernels' tiles unless under Triton's interpreter)."""
    if small_tiles() if small is None else small:
        return SMALL_TILE, SMALL_TILE
    d_qk, d_vo = dot_tile_dim(head_dim_qk), dot_tile_dim(head_dim_vo)
    full = 128 if d_vo <= 128 else 64
    block_m = full
    if max_rows is not None:
        block_m = next((bm for bm in (16, 32, 64) if max_rows <= bm and bm < full), full)
    if CONFIG_OVERRIDE is not None:
        return block_m, CONFIG_OVERRIDE[0]
    if block_m in SMALL_M_CONFIGS:
        return block_m, SMALL_M_CONFIGS[block_m][max(d_qk, d_vo)][0]
    if max_rows is None or d_qk > 128:
        return block_m, 64
    if max_kv_len >= LONG_KV:
        return block_m, 128
    return block_m, (32 if max_kv_len <= SHORT_KV and page_size != 1 else 64)

