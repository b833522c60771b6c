"""Pieces every sampling kernel shares: per-row parameters and seeds, Philox uniforms, the filter
predicate, and the host-side argument packing of the launchers.

Pointer shapes (row strides passed; the vocabulary dimension is contiguous):
  PROBS / LOGITS  [num_rows, vocab]         float32 / float16 / bfloat16, read as float32
  ROWS            [batch]                    int32/int64, output row -> input row (``indices``)
  OUT             [batch]                    int32/int64 sampled token ids
  VALID           [batch]                    bool: the row had a token of positive probability
  TOP_K/TOP_P/MIN_P/TEMP [batch]             per-request parameters (or scalars, ``*_PER_ROW`` False)
  SEED / OFFSET   [1] or [batch]             int64 Philox seed / counter (or scalars)

Randomness: the draws of output row ``i`` use Philox-4x32-10 with seed ``seed_i`` at counters from
``offset_i`` on, ``offset_i = offset + i * DRAW_STRIDE`` when one (seed, offset) serves the batch.
Seed and offset may be read from device tensors, so a captured CUDA graph replays with new values.

The filters (flashtile/reference/sampling.py computes the same sets with sorts): for a value ``v`` write
``cnt(v) = count{p > v}`` and ``mass(v) = sum{p : p > v}``; then ``v`` is kept when ``cnt(v) < k``
(top-k), ``mass(v) < top_p * total or cnt(v) == 0`` (top-p) and ``v >= min_p * max`` (min-p). Every
rule is monotone in ``v``, so a filter set is ``{p >= tau}`` with ``tau`` its smallest kept value, and
ties are kept or dropped together.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._core import dispatch
from ..._core.intmath import next_power_of_2
from ..._core.launch import argument_key, tensor_key

# Kernel ints that change with every call (generator draws): not specialized on their value, so a
# new value neither recompiles (Triton) nor adds a launch-cache key (flashtile/_core/launch.py).
PER_CALL_INTS = ["seed_val", "offset_val"]

DRAW_STRIDE = 64  # Philox counters reserved per output row
NUM_PIVOTS = 4  # pivots evaluated per pass of the exact threshold search
MAX_SEARCH_STEPS = 48  # passes of the exact search (each shrinks the interval about 4x)


@triton.jit
def uniform(seed, counter):
    """Uniform float32 in [0, 1) (Philox-4x32-10 via ``tl.rand``; clamped: it can round up to 1.0)."""
    return tl.minimum(tl.rand(seed, counter), 0.99999994)


@triton.jit
def uniforms(seed, counter, NQ: tl.constexpr):
    """NQ uniforms in [0, 1): the 4 words of Philox-4x32-10 at counters ``counter + q // 4``."""
    q = tl.arange(0, NQ)
    r0, r1, r2, r3 = tl.randint4x(seed, counter + (q // 4).to(tl.int64))
    j = q % 4
    bits = tl.where(j == 0, r0, tl.where(j == 1, r1, tl.where(j == 2, r2, r3)))
    return (bits >> 8).to(tl.float32) * (1.0 / 16777216.0)  # 24 bits: at most 1 - 2^-24


@triton.jit
def kept_by_filters(cnt, mass, v, k, p_mass, min_thr, USE_TOP_K: tl.constexpr, USE_TOP_P: tl.constexpr,
                    USE_MIN_P: tl.constexpr):
    """Whether value ``v`` is kept by the filters, from ``cnt(v)`` and ``mass(v)`` (see the module doc)."""
    ok = cnt >= 0
    if USE_TOP_K:
        ok = ok & (cnt < k)
    if USE_TOP_P:
        ok = ok & ((mass < p_mass) | (cnt == 0))
    if USE_MIN_P:
        ok = ok & (v >= min_thr)
    return ok


@triton.jit
def input_row(BASE, ROWS, i, stride_row, HAS_ROWS: tl.constexpr):
    """Pointer to the input row of output row ``i``: ``ROWS[i]`` (``indices``) or ``i``."""
    if HAS_ROWS:
        src = tl.load(ROWS + i).to(tl.int64)
    else:
        src = i.to(tl.int64)
    return BASE + src * stride_row


@triton.jit
def inverse_temperature(TEMP, i, temp_val, TEMP_PER_ROW: tl.constexpr):
    """1 / T of row ``i``: ``TEMP[i]`` (per-request tensor) or the scalar ``temp_val``."""
    if TEMP_PER_ROW:
        return 1.0 / tl.load(TEMP + i).to(tl.float32)
    else:
        return 1.0 / temp_val


@triton.jit
def load_params(i, TOP_K, TOP_P, MIN_P, top_k_val, top_p_val, min_p_val, vocab, TOPK_PER_ROW: tl.constexpr,
                 TOPP_PER_ROW: tl.constexpr, MINP_PER_ROW: tl.constexpr):
    """This row's (top_k, top_p, min_p); top_k <= 0 or >= vocab becomes vocab + 1 ("keep all")."""
    if TOPK_PER_ROW:
        k = tl.load(TOP_K + i).to(tl.int32)
    else:
        k = tl.full([], top_k_val, dtype=tl.int32)
    k = tl.where((k <= 0) | (k >= vocab), vocab + 1, k)
    if TOPP_PER_ROW:
        p = tl.load(TOP_P + i).to(tl.float32)
    else:
        p = tl.full([], top_p_val, dtype=tl.float32)
    if MINP_PER_ROW:
        mp = tl.load(MIN_P + i).to(tl.float32)
    else:
        mp = tl.full([], min_p_val, dtype=tl.float32)
    return k, p, mp


@triton.jit
def load_seed(i, SEED, OFFSET, seed_val, offset_val, draw_stride, SEED_IN_TENSOR: tl.constexpr,
               SEED_PER_ROW: tl.constexpr):
    """(seed, first Philox counter) of output row i: per-row tensors as given, else one
    (seed, offset) for the batch with ``draw_stride`` counters per row."""
    if SEED_IN_TENSOR:
        if SEED_PER_ROW:
            seed = tl.load(SEED + i).to(tl.int64)
            counter = tl.load(OFFSET + i).to(tl.int64)
        else:
            seed = tl.load(SEED).to(tl.int64)
            counter = tl.load(OFFSET).to(tl.int64) + i.to(tl.int64) * draw_stride
    else:
        seed = tl.full([], seed_val, dtype=tl.int64)
        counter = tl.full([], offset_val, dtype=tl.int64) + i.to(tl.int64) * draw_stride
    return seed, counter


def interpreted(t: torch.Tensor) -> bool:
    """Whether ``t``'s kernels run in Triton's interpreter: tensors of a device type without compiled
    kernels (dispatch.KERNEL_DEVICE_TYPES: CUDA; benchmarks.tools.host_time --dry adds the CPU)."""
    return t.device.type not in dispatch.KERNEL_DEVICE_TYPES


def stream_config(vocab: int, interpreted: bool, kind: str = "stream"):
    """(BLOCK, num_warps): tiles of the streaming passes. Under the interpreter, small tiles so that
    tiny test vocabularies still take several blocks."""
    if interpreted:
        return max(16, min(64, next_power_of_2(vocab))), 4
    block = max(128, min(2048 if kind == "stats" else 4096, next_power_of_2(vocab)))
    return block, (16 if block >= 4096 else 8 if block >= 1024 else 4)


def seed_args(seed, offset):
    """(SEED tensor or dummy, OFFSET tensor or dummy, seed int, offset int, in_tensor, per_row)."""
    if isinstance(seed, torch.Tensor):
        return seed, offset, 0, 0, True, seed.numel() > 1
    return None, None, int(seed), int(offset), False, False


def param_args(value, default):
    """(tensor or None, scalar value, per_row) of a filter parameter or temperature: a ``[batch]`` tensor,
    a scalar, or None (``default``)."""
    if isinstance(value, torch.Tensor):
        return value, 0, True
    return None, value if value is not None else default, False


def seed_key(value):
    """A seed's or offset's part of a launch key: what Triton sees in an int (its width), or a tensor's
    metadata."""
    return argument_key(value) if type(value) is int else tensor_key(value)
