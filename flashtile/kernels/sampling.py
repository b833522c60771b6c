"""Sampling without sorting: Triton kernels and their launchers (one program per output row; at small
batches the segmented kernel splits a row over several programs, section "Row split" of docs/sampling.md).

Pointer shapes (row strides passed; the vocabulary dimension is contiguous):
  PROBS / LOGITS  [num_rows, vocab]         float32 / float16 / bfloat16, read as float32
  ROWS            [batch]                    int32/int64, output row -> input row (``indices``)
  OUT             [batch]                    int32/int64 sampled token ids
  VALID           [batch]                    bool: the row had a token of positive probability
  TOP_K/TOP_P/MIN_P/TEMP [batch]             per-request parameters (or scalars, ``*_PER_ROW`` False)
  SEED / OFFSET   [1] or [batch]             int64 Philox seed / counter (or scalars)

The filter sets are the reference's (flashtile/reference/sampling.py). For a value ``v`` write
``cnt(v) = count{p > v}`` and ``mass(v) = sum{p : p > v}``; then ``keep(v)`` is
``cnt(v) < k`` (top-k) and ``mass(v) < top_p * total or cnt(v) == 0`` (top-p) and
``v >= min_p * max`` (min-p). ``keep`` is monotone in ``v``, so a filter set is ``{p >= tau}`` with
``tau`` the smallest kept probability, and every rule keeps ties together.

Rejection loop (``_filtered_sampling_kernel``), no sort: the candidate set is ``{p > low}``
(initially every positive token). A round draws ``t`` from it by inverse CDF (one streaming pass of
blocked prefix sums that stops at the block holding the draw), then one pass computes
``cnt``/``mass`` at the pivots ``p_t`` and ``pivot_1 = (p_t + high) / 2`` (and the row's total and
max). ``keep(p_t)``: t is in the filter set, which lies inside ``{p > low}``, so the accepted draw
has exactly the filtered distribution. Otherwise ``low = p_t`` (or ``pivot_1`` when that one is not
kept either) and the next round draws from a smaller set. After ``MAX_ROUNDS`` rounds an exact
search (``_search``) finds ``tau`` and one more draw from ``{p >= tau}`` ends the row.

Exact threshold search (``_search``, also the renorm/mask kernels): keep ``lo < tau <= hi`` with
``keep(lo)`` false, ``keep(hi)`` true, ``hi`` a value of the row and ``a`` the smallest value above
``lo``; one pass evaluates 4 pivots spread over ``[a, hi]`` and shrinks the interval about 4x (using
the nearest row values around the pivots) until ``a == hi``, then ``tau = hi``.

Float32 prefix sums are not monotone: a draw only lands on a token with ``p > low``; when the
running sum never exceeds ``u * mass`` it takes the last such token, and a mass that was only an
estimate (first round: ``1 + 1e-3``, probabilities assumed normalized) is replaced by the exact one
and the round repeats. NaN and negative entries count as 0; a row without positive mass returns
token 0 and ``valid = False``.

Randomness: draw ``j`` of output row ``i`` is ``tl.rand(seed_i, offset_i + j)`` (Philox-4x32-10) with
``offset_i = offset + i * DRAW_STRIDE`` when one (seed, offset) serves the batch; seed and offset
may be read from device tensors, so a captured CUDA graph replays with new values.

Two sampler kernels share these filter sets. The default is the segmented one (section "Segmented
path" below; also ``sampling_from_logits`` and ``softmax``): passes without block-wide reductions in
their streaming loops, several candidates per pass drawn from per-segment masses; on the H100 it is
2.3-6.5x faster than the rejection loop above at batch 128 (docs/sampling.md).
FLASHTILE_SAMPLING_SEG=0 (read at every call) selects the rejection loop above
(``_filtered_sampling_kernel``). The launch sizes are the module constants SEG_*.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import globaltimer, smid

from .._core import dispatch, settings
from .._core.device import num_sms
from .._core.intmath import cdiv, floor_power_of_2, next_power_of_2
from .._core.launch import MAX_CACHED_CALLS, LaunchMemo, argument_key, direct_launch, tensor_key

# Kernel ints that change with every call (generator draws): not specialized on their value, so a
# new value neither recompiles (Triton) nor adds a launch-cache key (flashtile/_core/launch.py).
PER_CALL_INTS = ["seed_val", "offset_val"]

NUM_PIVOTS = 4  # pivots evaluated per pass of the threshold search
MAX_ROUNDS = 32  # rejection rounds before the exact search
MAX_SEARCH_STEPS = 48  # passes of the exact search (each shrinks the interval about 4x)
DRAW_STRIDE = 64  # Philox counters reserved per row (>= MAX_ROUNDS + 1)


# Segmented path (FLASHTILE_SAMPLING_SEG=1): launch configuration, to sweep on the H100.
SEG_WARPS = 8  # H100 tune (2026-11-21, SEG_UNROLL=2): 8 warps beat 16 on top-p b1/b128, top-k, min-p, logits by 5-20%
SEG_ROWS = 16  # segments of the row (tile rows of a pass)
SEG_COLS = 64  # tokens per segment per iteration: a tile is SEG_ROWS x SEG_COLS (4 KB of float32)
SEG_STAGES = 7  # tl.range num_stages: SEG_STAGES - 1 tiles in flight per program (24 KB; H100: 4-6% faster than 5)
SEG_UNROLL = 2  # tiles per iteration of a pass (top-k/top-p/min-p/plain): halves the barriers and loop bookkeeping
SEG_NQ = 4  # candidates drawn at once (and measured by the next pass)
# Pivot lanes of a pass (powers of 2; each costs 2 instructions per element, 3 with top-k's count): the
# SEG_NQ queued candidates, the rest search lanes (the first pass: 0 and a grid).
SEG_PIVOTS = 8  # top-k, joint top-k/top-p, top_k_first (also its exact top-k set search); >= max(4, SEG_NQ + 1)
# Top-p alone; >= SEG_NQ. 4 = the candidates only: same passes as 8 on softmax(randn) and LLM-like rows at
# top_p 0.9 (interpreter, 128 rows of 128256), 1 row in 128 took a 3rd pass at top_p 0.3.
SEG_PIVOTS_TOP_P = 4
# Top-p alone, first pass: lanes j >= 1 at 2^(SEG_TOP_P_GRID_STEP * j - SEG_TOP_P_GRID_OFF) / vocab: 1/2, 2 and 8
# / vocab. The smallest kept lane (``hi``) then sits near the threshold of flat rows, so most first candidates
# are accepted without a second pass. H100, 2026-11-22 (against 2, 8, 32 / vocab): batch 512 x 32000 71.9 ->
# 66.2 us, 512 x 128256 ~191 -> 165.2, 128 x 128256 67.8 -> 66.4. Lanes a factor 2 apart (1/4, 1/2, 1 / vocab)
# were 1-2 us faster still, but no lane above 1 / vocab would bracket the threshold of peaked rows.
SEG_TOP_P_GRID_STEP = 2
SEG_TOP_P_GRID_OFF = 3
SEG_PIVOTS_MIN_P = 1  # min-p alone: 1 = lane 0 (0 on the first pass, then the float just below the threshold)
SEG_SUBS = 16  # sub-segments of a picked segment (level 2 of a draw)
SEG_SUB_COLS = 32  # tokens per sub-segment per iteration of level 2
SEG_SCAN = 256  # chunk of the level-3 scan inside a sub-segment
SEG_MAX_PASSES = 16  # passes before the exact fallback
# Batches of several rows per SM (batch >= SEG_WAVE_ROWS * SMs) with short rows (vocab <= SEG_WAVE_MAX_VOCAB):
# SEG_WAVE_WARPS warps with registers capped at SEG_WAVE_MAXNREG per thread (ptxas .maxnreg; 0 = no cap) and
# tiles of SEG_ROWS x SEG_WAVE_COLS (level-2 sweeps SEG_WAVE_SUB_COLS wide), so that 64K / (4 warps x 32 x 128)
# = 4 programs share an SM: batch 512 on 132 SMs runs as one wave. Every row then streams its first pass at
# once (the SMs' DRAM shares are full) and the rows' serial parts (reductions, draws, decisions) come once
# per SM instead of once per wave. Timeline (benchmarks/sampling_timeline.py, H100, 2026-11-22) of top-p
# batch 512 x 32000: two 8-warp programs per SM took two waves, 50 us from the first row's start to the last
# row's end, 4 x 4 warps one wave of 40 us (first pass 22 us: 512 KB per SM at 23 KB/us, the DRAM floor).
# Replays: top-p 66.2 -> 61.0 us, min-p 62.2 -> 60.1, top-k ~124 -> 113.1. At 128256 tokens a row is mostly
# streaming and an earlier cap cost 1-2.5%, hence the vocabulary bound.
SEG_WAVE_ROWS = 2
SEG_WAVE_MAX_VOCAB = 65536
SEG_WAVE_WARPS = 4
SEG_WAVE_MAXNREG = 128
SEG_WAVE_COLS = 32
SEG_WAVE_SUB_COLS = 16
# Row split (``_seg_filtered_sampling_kernel`` with SPLIT): while batch x chunks <= SMs, a row's tokens are
# cut into chunks of SPLIT_CHUNK and every chunk gets its own program (docs/sampling.md "Row split").
SPLIT_CHUNK = 4096  # tokens per program; a multiple of SEG_ROWS * SEG_COLS * SEG_UNROLL
SPLIT_WARPS = 8
# Largest chunk with one program per SM. Chunks publish their masses per segment of at most SPLIT_SEG
# tokens, so a draw (level 2 of ``_seg_draw``) reads at most SPLIT_SEG tokens per candidate whatever the
# chunk. (Before, a chunk published one mass and batch 64 x 128256 in 2 chunks of 65536 took 104 us for
# min-p against 56 us unsplit, H100 2026-11-22; hence a cap of 16384 then.)
SPLIT_MAX_CHUNK = 1 << 20
SPLIT_SEG = 4096
SPLIT_SEG_INTERPRETED = 8  # under the interpreter (chunks of 16): 2 published segments per chunk
# Programs of the split kernel per SM when one per SM leaves no room for 2 chunks per row (batch 67-132 on
# 132 SMs), for samplers with top-k: 2 caps the registers at 64K / (2 x SPLIT_WARPS x 32) per thread (ptxas
# .maxnreg) so that two programs are resident on every SM at once, as the row barrier needs; 1 turns that
# off. H100, 2026-11-22, batch 128 x 128256 (2 chunks of 65536): top-k 118.1 -> 104.0-105.4 us (its passes
# are issue-heavy: 8 lanes of compare, FMA and count per element, and 16 warps per SM overlap them with the
# loads), but top-p 67.7 -> 79.6 and min-p 69.1 -> 68.4, so those keep one program per row there.
# 4 warps x 2 per SM took 139 us, 4 x 4 446 us, and 16 lanes 508 us (registers spilled in the loop).
SPLIT_PER_SM = 2
# Pivot lanes of a split row with top-k or top-p (lanes cost little there: a program measures 4096 tokens,
# from L2 after the first pass), and the first pass's grid: lanes j >= 1 at 2^(j - 3) / vocab (1/4 .. 16 /
# vocab), a factor 2 apart where the one-program kernel spaces 4, so that after one pass ``hi`` (the
# smallest kept lane) is close to the top-p threshold of flat rows and most first candidates are accepted
# without a second pass.
SPLIT_PIVOTS = 8
SPLIT_NQ = 4  # candidates per draw in a split row (SPLIT_PIVOTS >= SPLIT_NQ + 1 with top-k)
SPLIT_EXCHANGE = True  # False: every program measures every chunk itself (no barrier; for tests and A/B)
# Block of the exact fallback's passes and of top_k_first's exact top-k set (default-path helpers): 4096 as the
# rejection-loop kernel (1024-element blocks measured 2.3x slower on top_k_first).
SEG_FALLBACK_BLOCK = 4096


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _uniform(seed, counter):
    """Uniform float32 in [0, 1) (Philox-4x32-10 via ``tl.rand``; clamped: it can round up to 1.0)."""
    return tl.minimum(tl.rand(seed, counter), 0.99999994)


@triton.jit
def _inverse_cdf(row, vocab, low, target, shift, IS_LOGITS: tl.constexpr, FULL_SCAN: tl.constexpr,
                 BLOCK: tl.constexpr):
    """First index where the running sum of ``w`` exceeds ``target``, over tokens with ``w > low``.

    ``w = p`` (probabilities) or ``exp(x - shift)`` (logits). Stops after the block holding the hit
    unless FULL_SCAN. Returns (index or -1, found, last index with ``w > low`` seen (-1 if none),
    sum of ``w`` over the scanned blocks).
    """
    offs = tl.arange(0, BLOCK)
    agg = tl.zeros([], dtype=tl.float32)
    found = agg > 1.0  # False, as a tensor (loop-carried)
    t = tl.full([], -1, dtype=tl.int32)
    last = tl.full([], -1, dtype=tl.int32)
    start = 0
    go = start < vocab
    while go:
        idx = start + offs
        x = tl.load(row + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)  # [BLOCK]
        if IS_LOGITS:
            x = tl.exp(x - shift)
        ok = x > low  # NaN, padding and filtered tokens are out
        w = tl.where(ok, x, 0.0)
        cs = tl.cumsum(w, axis=0) + agg
        hit = ok & (cs > target)
        first = tl.min(tl.where(hit, idx, 2147483647), axis=0)
        t = tl.where(found, t, tl.where(first < 2147483647, first, -1))
        found = found | (first < 2147483647)
        last = tl.maximum(last, tl.max(tl.where(ok, idx, -1), axis=0))
        agg += tl.sum(w, axis=0)
        start += BLOCK
        if FULL_SCAN:
            go = start < vocab
        else:
            go = (start < vocab) & (first == 2147483647)
    return t, found, last, agg


@triton.jit
def _row_stats(row, vocab, piv, NEED_MASS: tl.constexpr, NEED_BOUNDS: tl.constexpr, BLOCK: tl.constexpr,
               NP: tl.constexpr):
    """One pass over a row for the pivots ``piv [NP]``.

    Returns cnt ``[NP]`` (count > pivot), mass ``[NP]`` (sum > pivot), min_gt ``[NP]`` (smallest
    value > pivot, +inf if none), max_le ``[NP]`` (largest value <= pivot, -inf if none) and the row
    max (-inf for an empty/NaN row). NaN entries take part in nothing.
    """
    offs = tl.arange(0, BLOCK)
    cnt = tl.zeros([NP], dtype=tl.int32)
    mass = tl.zeros([NP], dtype=tl.float32)
    min_gt = tl.full([NP], float("inf"), dtype=tl.float32)
    max_le = tl.full([NP], float("-inf"), dtype=tl.float32)
    row_max = tl.full([], float("-inf"), dtype=tl.float32)
    for start in range(0, vocab, BLOCK):
        idx = start + offs
        x = tl.load(row + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)  # [BLOCK]
        x = tl.where(x == x, x, float("-inf"))
        gt = x[None, :] > piv[:, None]  # [NP, BLOCK]
        cnt += tl.sum(gt.to(tl.int32), axis=1)
        if NEED_MASS:
            mass += tl.sum(tl.where(gt, x[None, :], 0.0), axis=1)
        if NEED_BOUNDS:
            min_gt = tl.minimum(min_gt, tl.min(tl.where(gt, x[None, :], float("inf")), axis=1))
            max_le = tl.maximum(max_le, tl.max(tl.where(gt, float("-inf"), x[None, :]), axis=1))
        row_max = tl.maximum(row_max, tl.max(x, axis=0))
    return cnt, mass, min_gt, max_le, row_max


@triton.jit
def _keep(cnt, mass, v, k, p_mass, min_thr, USE_TOP_K: tl.constexpr, USE_TOP_P: tl.constexpr,
          USE_MIN_P: tl.constexpr):
    """Whether value ``v`` is kept by the filters, from ``cnt(v)`` and ``mass(v)`` (module doc)."""
    ok = cnt >= 0
    if USE_TOP_K:
        ok = ok & (cnt < k)
    if USE_TOP_P:
        ok = ok & ((mass < p_mass) | (cnt == 0))
    if USE_MIN_P:
        ok = ok & (v >= min_thr)
    return ok


@triton.jit
def _search(row, vocab, lo, a, hi, mass_lo, k, p_mass, USE_TOP_K: tl.constexpr, USE_TOP_P: tl.constexpr,
            NEED_MASS: tl.constexpr, MAX_STEPS: tl.constexpr, BLOCK: tl.constexpr, NP: tl.constexpr):
    """Exact threshold search (module doc). In: ``keep(lo)`` false, ``keep(hi)`` true, ``a`` the
    smallest value > lo, ``mass_lo = mass(lo)``. Out: (lo, tau, mass(lo)) with no value in (lo, tau)."""
    lane = tl.arange(0, NP)
    frac = lane.to(tl.float32) / NP
    step = 0
    while (a < hi) & (step < MAX_STEPS):
        piv = a * (1.0 - frac) + hi * frac  # piv[0] = a, a row value
        cnt, mass, min_gt, max_le, rmax = _row_stats(row, vocab, piv, NEED_MASS, True, BLOCK, NP)
        kept = _keep(cnt, mass, piv, k, p_mass, 0.0, USE_TOP_K, USE_TOP_P, False)
        first = tl.min(tl.where(kept, lane, NP), axis=0)  # first kept pivot (NP: only hi is)
        moved = first > 0
        new_lo = tl.where(moved, tl.sum(tl.where(lane == first - 1, piv, 0.0), axis=0), lo)
        new_mass = tl.where(moved, tl.sum(tl.where(lane == first - 1, mass, 0.0), axis=0), mass_lo)
        new_a = tl.where(moved, tl.sum(tl.where(lane == first - 1, min_gt, 0.0), axis=0), a)
        new_hi = tl.where(first < NP, tl.sum(tl.where(lane == first, max_le, 0.0), axis=0), hi)
        lo, mass_lo, a, hi = new_lo, new_mass, new_a, tl.minimum(new_hi, hi)
        a = tl.minimum(a, hi)
        step += 1
    return lo, hi, mass_lo


@triton.jit
def _filter_bound(row, vocab, low, cnt, mass, smallest, row_max, k, p_mass, USE_TOP_K: tl.constexpr,
                  USE_TOP_P: tl.constexpr, NEED_MASS: tl.constexpr, MAX_STEPS: tl.constexpr, BLOCK: tl.constexpr,
                  NP: tl.constexpr):
    """The top-k/top-p set as ``{p > bound}``, given the count, mass and smallest value above ``low``
    (``low`` below every kept value): ``low`` itself when its value passes the filter, else the exact
    search from it. Returns (bound, mass above bound)."""
    if _keep(cnt, mass, low, k, p_mass, 0.0, USE_TOP_K, USE_TOP_P, False):
        bound = low
        kept_mass = mass
    else:
        bound, tau, kept_mass = _search(row, vocab, low, smallest, row_max, mass, k, p_mass, USE_TOP_K, USE_TOP_P,
                                        NEED_MASS, MAX_STEPS, BLOCK, NP)
    return bound, kept_mass


@triton.jit
def _top_k_set(row, vocab, low, k, MAX_STEPS: tl.constexpr, BLOCK: tl.constexpr, NP: tl.constexpr):
    """The exact top-k set of a row (``filter_apply_order="top_k_first"``): returns ``(low, mass,
    row_max)`` where the set is the values above ``low`` (every positive value when the row has at most
    k of them), ``mass`` its sum and ``row_max`` the row's largest value."""
    cnt0, mass0, min0, max0, row_max = _row_stats(row, vocab, tl.zeros([NP], dtype=tl.float32), True, True, BLOCK, NP)
    c0 = tl.max(cnt0, axis=0)
    m0 = tl.max(mass0, axis=0)
    a0 = tl.min(min0, axis=0)
    if c0 >= k:
        low, tau_k, mass = _search(row, vocab, low, a0, row_max, m0, k, 0.0, True, False, True, MAX_STEPS, BLOCK, NP)
    else:
        mass = m0
    return low, mass, row_max


@triton.jit
def _exact_draw(row, vocab, low, mass, total, have_total, k, top_p, min_p, u, USE_TOP_K: tl.constexpr,
                USE_TOP_P: tl.constexpr, USE_MIN_P: tl.constexpr, MAX_STEPS: tl.constexpr, BLOCK: tl.constexpr,
                NP: tl.constexpr):
    """The bounded-round fallback of the samplers: find the filter set {p >= tau} exactly (``_search``
    from ``low``, below every kept value), then one inverse-CDF draw from it with uniform ``u``.
    ``mass``: mass of {p > low} (used without a filter); ``total``: the top-p reference mass when
    ``have_total``. Returns (token, valid, bound): the drawn set is {p > bound} (also the filter set
    when a filter is on)."""
    VERIFY: tl.constexpr = USE_TOP_K or USE_TOP_P or USE_MIN_P
    if VERIFY:
        start_piv = tl.zeros([NP], dtype=tl.float32) + low
        cnt_l, mass_l, min_l, max_l, rmax = _row_stats(row, vocab, start_piv, True, True, BLOCK, NP)
        c_l = tl.max(cnt_l, axis=0)
        m_l = tl.max(mass_l, axis=0)
        total = tl.where(have_total, total, m_l)  # not have_total: no round ran, low == 0
        a_l = tl.min(min_l, axis=0)
        if USE_MIN_P:
            thr = min_p * rmax
            lo_f = tl.where(thr > 0, (thr.to(tl.int32, bitcast=True) - 1).to(tl.float32, bitcast=True), 0.0)
            lo_f = tl.maximum(lo_f, low)
            cnt_f, mass_f, min_f, max_f, rmax_f = _row_stats(row, vocab, tl.zeros([NP], dtype=tl.float32) + lo_f, True, False,
                                            BLOCK, NP)
            m_f = tl.max(mass_f, axis=0)
        else:
            lo_f, m_f = _filter_bound(row, vocab, low, c_l, m_l, a_l, rmax, k, top_p * total, USE_TOP_K, USE_TOP_P,
                                      True, MAX_STEPS, BLOCK, NP)
    else:
        lo_f = low
        m_f = mass
    t, found, last, scanned = _inverse_cdf(row, vocab, lo_f, u * m_f, 0.0, False, False, BLOCK)
    cand = tl.where(found, t, last)
    valid = (cand >= 0) & (m_f > 0.0)
    result = tl.where(valid, cand, 0)
    return result, valid, lo_f


@triton.jit
def _input_row(BASE, ROWS, i, stride_row, HAS_ROWS: tl.constexpr):
    """Pointer to the input row of output row ``i``: ``ROWS[i]`` (``indices``) or ``i``."""
    if HAS_ROWS:
        src = tl.load(ROWS + i).to(tl.int64)
    else:
        src = i.to(tl.int64)
    return BASE + src * stride_row


@triton.jit
def _inverse_temperature(TEMP, i, temp_val, TEMP_PER_ROW: tl.constexpr):
    """1 / T of row ``i``: ``TEMP[i]`` (per-request tensor) or the scalar ``temp_val``."""
    if TEMP_PER_ROW:
        return 1.0 / tl.load(TEMP + i).to(tl.float32)
    else:
        return 1.0 / temp_val


@triton.jit
def _load_params(i, TOP_K, TOP_P, MIN_P, top_k_val, top_p_val, min_p_val, vocab, TOPK_PER_ROW: tl.constexpr,
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
def _load_seed(i, SEED, OFFSET, seed_val, offset_val, draw_stride, SEED_IN_TENSOR: tl.constexpr,
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


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@direct_launch
@triton.jit(do_not_specialize=PER_CALL_INTS)
def _filtered_sampling_kernel(
    PROBS, ROWS, OUT, VALID, TOP_K, TOP_P, MIN_P, SEED, OFFSET,
    vocab, stride_row,
    top_k_val, top_p_val, min_p_val, seed_val, offset_val,
    HAS_ROWS: tl.constexpr, TOPK_PER_ROW: tl.constexpr, TOPP_PER_ROW: tl.constexpr, MINP_PER_ROW: tl.constexpr,
    SEED_IN_TENSOR: tl.constexpr, SEED_PER_ROW: tl.constexpr,
    USE_TOP_K: tl.constexpr, USE_TOP_P: tl.constexpr, USE_MIN_P: tl.constexpr, TOP_K_FIRST: tl.constexpr,
    MAX_ROUNDS: tl.constexpr, MAX_STEPS: tl.constexpr, DRAW_STRIDE: tl.constexpr,
    BLOCK: tl.constexpr, NP: tl.constexpr,
):
    """One output row per program. With no filter (all USE_* False) it is plain sampling: one
    full inverse-CDF pass that also measures the row's mass (MAX_ROUNDS bounds the retries)."""
    i = tl.program_id(0)
    row = _input_row(PROBS, ROWS, i, stride_row, HAS_ROWS)
    k, top_p, min_p = _load_params(i, TOP_K, TOP_P, MIN_P, top_k_val, top_p_val, min_p_val, vocab, TOPK_PER_ROW,
                                   TOPP_PER_ROW, MINP_PER_ROW)
    seed, counter = _load_seed(i, SEED, OFFSET, seed_val, offset_val, DRAW_STRIDE, SEED_IN_TENSOR, SEED_PER_ROW)
    VERIFY: tl.constexpr = USE_TOP_K or USE_TOP_P or USE_MIN_P
    lane = tl.arange(0, NP)

    low = tl.zeros([], dtype=tl.float32)  # candidate set {p > low}
    mass = tl.full([], 1.001, dtype=tl.float32)  # first-round estimate (probabilities sum to ~1)  # mass of the candidate set
    exact = low > 1.0  # False: ``mass`` is only an estimate
    total = tl.full([], 1.0, dtype=tl.float32)  # top-p reference mass
    have_total = exact
    row_max = tl.full([], -1.0, dtype=tl.float32)  # unknown yet
    high = tl.full([], float("inf"), dtype=tl.float32)
    if TOP_K_FIRST:
        # Top-k set first (exact search), then the rejection loop runs inside it with top-p
        # measured against the top-k mass.
        low, mass, row_max = _top_k_set(row, vocab, low, k, MAX_STEPS, BLOCK, NP)
        exact = exact | True
        total = mass
        have_total = exact
        high = row_max

    result = tl.full([], 0, dtype=tl.int32)
    valid = exact & False
    done = exact & False
    r = 0
    if MAX_ROUNDS > 0:  # a loop that can never run breaks Triton 3.6's coalesce pass
        while (r < MAX_ROUNDS) & (~done):
            u = _uniform(seed, counter + r)
            t, found, last, scanned = _inverse_cdf(row, vocab, low, u * mass, 0.0, False, not VERIFY, BLOCK)
            cand = tl.where(found, t, last)
            if VERIFY:
                p_t = tl.load(row + tl.maximum(cand, 0)).to(tl.float32)
                p_t = tl.where(cand >= 0, p_t, low)
                if USE_MIN_P:
                    thr = min_p * row_max
                    below = (thr.to(tl.int32, bitcast=True) - 1).to(tl.float32, bitcast=True)
                    pivot_1 = tl.where((row_max >= 0) & (thr > 0), below, (p_t + tl.minimum(high, mass)) * 0.5)
                else:
                    pivot_1 = (p_t + tl.minimum(high, mass)) * 0.5
                pivot_1 = tl.maximum(pivot_1, p_t)
                piv = tl.where(lane == 0, p_t, tl.where(lane == 1, pivot_1, tl.where(lane == 2, low, 0.0)))
                cnt, pmass, min_v, max_v, rmax = _row_stats(row, vocab, piv, True, False, BLOCK, NP)
                actual = tl.sum(tl.where(lane == 2, pmass, 0.0), axis=0)  # mass(low): the true mass of the candidate set
                total = tl.where(have_total, total, tl.sum(tl.where(lane == 3, pmass, 0.0), axis=0))
                have_total = have_total | True
                row_max = rmax
                high = tl.minimum(high, rmax)
                min_thr = min_p * rmax
                keep = _keep(cnt, pmass, piv, k, top_p * total, min_thr, USE_TOP_K, USE_TOP_P, USE_MIN_P)
                keep0 = tl.max(tl.where(lane == 0, keep.to(tl.int32), 0), axis=0) > 0
                keep1 = tl.max(tl.where(lane == 1, keep.to(tl.int32), 0), axis=0) > 0
                redo = (~exact) & ((~found) | (actual > mass))
                empty = actual <= 0.0
                accept = (~redo) & (~empty) & keep0 & (cand >= 0)
                move = (~redo) & (~empty) & (~accept)
                low = tl.where(move, tl.where(keep1, p_t, pivot_1), low)
                mass = tl.where(move, tl.where(keep1, tl.sum(tl.where(lane == 0, pmass, 0.0), axis=0), tl.sum(tl.where(lane == 1, pmass, 0.0), axis=0)),
                                tl.where(redo, actual, mass))
                high = tl.where(move & keep1, pivot_1, high)
                exact = exact | redo | move
            else:
                actual = scanned
                redo = (~exact) & ((~found) | (actual > mass))
                empty = actual <= 0.0
                accept = (~redo) & (~empty) & (cand >= 0)
                mass = tl.where(redo, actual, mass)
                exact = exact | redo
            result = tl.where(accept, cand, result)
            valid = valid | accept
            done = accept | empty
            r += 1

    if ~done:
        # Exact fallback: find tau, then one draw from {p >= tau}.
        result, valid, _ = _exact_draw(row, vocab, low, mass, total, have_total, k, top_p, min_p,
                                    _uniform(seed, counter + MAX_ROUNDS), USE_TOP_K, USE_TOP_P, USE_MIN_P,
                                    MAX_STEPS, BLOCK, NP)

    tl.store(OUT + i, result.to(OUT.dtype.element_ty))
    tl.store(VALID + i, valid.to(VALID.dtype.element_ty))


@direct_launch
@triton.jit(do_not_specialize=PER_CALL_INTS)
def _logits_sampling_kernel(
    LOGITS, ROWS, OUT, VALID, SEED, OFFSET,
    vocab, stride_row, seed_val, offset_val,
    HAS_ROWS: tl.constexpr, SEED_IN_TENSOR: tl.constexpr, SEED_PER_ROW: tl.constexpr,
    DRAW_STRIDE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Sample from softmax(logits): an online max/sum pass, then an inverse-CDF pass over
    ``exp(x - max)`` that stops at the drawn block. NaN logits count as -inf."""
    i = tl.program_id(0)
    row = _input_row(LOGITS, ROWS, i, stride_row, HAS_ROWS)
    seed, counter = _load_seed(i, SEED, OFFSET, seed_val, offset_val, DRAW_STRIDE, SEED_IN_TENSOR, SEED_PER_ROW)
    m, s = _online_max_sum(row, vocab, 1.0, BLOCK)
    u = _uniform(seed, counter)
    alive = s > 0.0
    t, found, last, _ = _inverse_cdf(row, vocab, 0.0, u * s, tl.where(alive, m, 0.0), True, False, BLOCK)
    cand = tl.where(found, t, last)
    valid = alive & (cand >= 0)
    tl.store(OUT + i, tl.where(valid, cand, 0).to(OUT.dtype.element_ty))
    tl.store(VALID + i, valid.to(VALID.dtype.element_ty))


@triton.jit
def _store_softmax(row, out_row, idx, vocab, inv_temp, shift, scale):
    """``out_row[idx] = exp(row[idx] * inv_temp - shift) * scale`` (0 for NaN), for idx < vocab."""
    x = tl.load(row + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32) * inv_temp
    e = tl.where(x == x, tl.exp(x - shift), 0.0) * scale
    tl.store(out_row + idx, e, mask=idx < vocab)


@triton.jit
def _online_max_sum(row, vocab, inv_temp, BLOCK: tl.constexpr):
    """(max, sum of exp(x - max)) of ``x * inv_temp`` over a row; NaN counts as -inf; (-inf, 0) if empty."""
    offs = tl.arange(0, BLOCK)
    m = tl.full([], float("-inf"), dtype=tl.float32)
    s = tl.zeros([], dtype=tl.float32)
    for start in range(0, vocab, BLOCK):
        idx = start + offs
        x = tl.load(row + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32) * inv_temp
        x = tl.where(x == x, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
        m = m_new
    return m, s


@direct_launch
@triton.jit
def _softmax_kernel(
    LOGITS, OUT, TEMP, vocab, stride_in, stride_out, temp_val,
    TEMP_PER_ROW: tl.constexpr, BLOCK: tl.constexpr,
):
    """float32 softmax(x / T) per row; a row of only -inf/NaN gives zeros."""
    i = tl.program_id(0).to(tl.int64)
    row = LOGITS + i * stride_in
    inv_temp = _inverse_temperature(TEMP, i, temp_val, TEMP_PER_ROW)
    m, s = _online_max_sum(row, vocab, inv_temp, BLOCK)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    scale = tl.where(s > 0.0, 1.0 / s, 0.0)
    offs = tl.arange(0, BLOCK)
    for start in range(0, vocab, BLOCK):
        _store_softmax(row, OUT + i * stride_out, start + offs, vocab, inv_temp, m_safe, scale)


@direct_launch
@triton.jit
def _threshold_kernel(
    IN, OUT, TOP_K, TOP_P, vocab, stride_in, stride_out, top_k_val, top_p_val,
    TOPK_PER_ROW: tl.constexpr, TOPP_PER_ROW: tl.constexpr, USE_TOP_K: tl.constexpr, USE_TOP_P: tl.constexpr,
    IS_LOGITS: tl.constexpr, MAX_STEPS: tl.constexpr, BLOCK: tl.constexpr, NP: tl.constexpr,
):
    """top_k_renorm_probs / top_p_renorm_probs (probabilities: kept / kept mass, others 0) and
    top_k_mask_logits (IS_LOGITS: kept logits as they are, others -inf): exact search, then a write pass."""
    i = tl.program_id(0).to(tl.int64)
    row = IN + i * stride_in
    k, top_p, _ = _load_params(i, TOP_K, TOP_P, TOP_P, top_k_val, top_p_val, 0.0, vocab, TOPK_PER_ROW, TOPP_PER_ROW,
                               False)
    if IS_LOGITS:
        lo = tl.full([], float("-inf"), dtype=tl.float32)
    else:
        lo = tl.zeros([], dtype=tl.float32)
    cnt0, mass0, min0, max0, row_max = _row_stats(row, vocab, tl.zeros([NP], dtype=tl.float32) + lo, not IS_LOGITS, True,
                                               BLOCK, NP)
    c0 = tl.max(cnt0, axis=0)
    m0 = tl.max(mass0, axis=0)
    a0 = tl.min(min0, axis=0)
    total = m0
    tau_lo, kept_mass = _filter_bound(row, vocab, lo, c0, m0, a0, row_max, k, top_p * total, USE_TOP_K, USE_TOP_P,
                                      not IS_LOGITS, MAX_STEPS, BLOCK, NP)
    scale = tl.where(kept_mass > 0.0, 1.0 / kept_mass, 0.0)
    offs = tl.arange(0, BLOCK)
    for start in range(0, vocab, BLOCK):
        idx = start + offs
        x = tl.load(row + idx, mask=idx < vocab, other=0.0).to(tl.float32)
        keep = x > tau_lo
        if IS_LOGITS:
            y = tl.where(keep, x, float("-inf"))
        else:
            y = tl.where(keep, x * scale, 0.0)
        tl.store(OUT + i * stride_out + idx, y.to(OUT.dtype.element_ty), mask=idx < vocab)


@direct_launch
@triton.jit(do_not_specialize=PER_CALL_INTS)
def _chain_speculative_kernel(
    DRAFT, DRAFT_IDS, TARGET, OUT, ACCEPTED, EMITTED, SEED, OFFSET,
    n, vocab, stride_db, stride_dn, stride_ib, stride_tb, stride_tn, stride_ob,
    seed_val, offset_val,
    SEED_IN_TENSOR: tl.constexpr, SEED_PER_ROW: tl.constexpr, BLOCK: tl.constexpr,
):
    """One request per program. Draw j < n judges draft token j (accept iff ``u * p_draft <
    p_target``), draw n samples the final token from ``max(p_target - p_draft, 0)`` at the first
    rejection (the target row itself if that has no mass) or from the bonus target row."""
    b = tl.program_id(0).to(tl.int64)
    seed, counter = _load_seed(b, SEED, OFFSET, seed_val, offset_val, n + 1, SEED_IN_TENSOR, SEED_PER_ROW)
    accepted = tl.zeros([], dtype=tl.int32)
    emitted = tl.zeros([], dtype=tl.int32)
    prefix = accepted == 0  # True while every draft so far was accepted
    for j in range(0, n):
        d = tl.load(DRAFT_IDS + b * stride_ib + j).to(tl.int64)
        d_ok = (d >= 0) & (d < vocab)
        d = tl.where(d_ok, d, 0)
        pd = tl.load(DRAFT + b * stride_db + j * stride_dn + d).to(tl.float32)
        pt = tl.load(TARGET + b * stride_tb + j * stride_tn + d).to(tl.float32)
        u = _uniform(seed, counter + j)
        ok = d_ok & (u * pd < pt)
        accepted += ok.to(tl.int32)
        prefix = prefix & ok
        emitted += prefix.to(tl.int32)
    # Final token: residual at the first rejection, or the bonus row.
    pos = emitted.to(tl.int64)
    d_lim = tl.where(emitted < n, vocab, 0)  # draft row is read (subtracted) only below this
    d_row = DRAFT + b * stride_db + tl.minimum(pos, tl.maximum(n - 1, 0)) * stride_dn
    t_row = TARGET + b * stride_tb + pos * stride_tn
    offs = tl.arange(0, BLOCK)
    resid_mass = tl.zeros([], dtype=tl.float32)
    for start in range(0, vocab, BLOCK):
        idx = start + offs
        pt = tl.load(t_row + idx, mask=idx < vocab, other=0.0).to(tl.float32)
        pd = tl.load(d_row + idx, mask=idx < d_lim, other=0.0).to(tl.float32)
        resid_mass += tl.sum(tl.where(pt - pd > 0, pt - pd, 0.0), axis=0)
    d_lim = tl.where(resid_mass > 0.0, d_lim, 0)
    u = _uniform(seed, counter + n)
    agg = tl.zeros([], dtype=tl.float32)
    tok = tl.full([], -1, dtype=tl.int32)
    last = tl.full([], -1, dtype=tl.int32)
    tot = tl.zeros([], dtype=tl.float32)
    for start in range(0, vocab, BLOCK):  # total mass of the chosen distribution
        idx = start + offs
        pt = tl.load(t_row + idx, mask=idx < vocab, other=0.0).to(tl.float32)
        pd = tl.load(d_row + idx, mask=idx < d_lim, other=0.0).to(tl.float32)
        w = pt - pd
        w = tl.where(w > 0, w, 0.0)
        tot += tl.sum(w, axis=0)
    target = u * tot
    for start in range(0, vocab, BLOCK):
        idx = start + offs
        pt = tl.load(t_row + idx, mask=idx < vocab, other=0.0).to(tl.float32)
        pd = tl.load(d_row + idx, mask=idx < d_lim, other=0.0).to(tl.float32)
        w = pt - pd
        ok = w > 0
        w = tl.where(ok, w, 0.0)
        cs = tl.cumsum(w, axis=0) + agg
        first = tl.min(tl.where(ok & (cs > target), idx, 2147483647), axis=0)
        tok = tl.where((tok < 0) & (first < 2147483647), first, tok)
        last = tl.maximum(last, tl.max(tl.where(ok, idx, -1), axis=0))
        agg += tl.sum(w, axis=0)
    tok = tl.where(tok >= 0, tok, tl.maximum(last, 0))
    for j in range(0, n + 1):
        jt = tl.full([], j, dtype=tl.int32)
        d = tl.load(DRAFT_IDS + b * stride_ib + tl.minimum(jt, tl.maximum(n - 1, 0)), mask=jt < n, other=0).to(tl.int32)
        val = tl.where(jt < emitted, d, tl.where(jt == emitted, tok, -1))
        tl.store(OUT + b * stride_ob + j, val.to(OUT.dtype.element_ty))
    tl.store(ACCEPTED + b, accepted.to(ACCEPTED.dtype.element_ty))
    tl.store(EMITTED + b, emitted.to(EMITTED.dtype.element_ty))


# ---------------------------------------------------------------------------------------------
# Several candidates per pass (the segmented kernel below)
# ---------------------------------------------------------------------------------------------
#
# Candidates queue in the order they were drawn, each from a set {p > lo} that contains the filter
# set; the first queued candidate that is not rejected is accepted as soon as it is known to be
# kept (measured, or ``>= hi``), so the accepted token is the first filter-set member of a sequence
# of draws: exactly the renormalized filter-set distribution (rejection sampling with several
# proposals per round). When the pass budget runs out, the exact fallback first judges the queued
# candidates in order, then draws from the exact set. Min-p is decided from the row max (known
# after the first pass).


@triton.jit
def _uniforms(seed, counter, NQ: tl.constexpr):
    """NQ uniforms in [0, 1): the 4 words of Philox-4x32-10 at counters ``counter + q // 4``."""
    q = tl.arange(0, NQ)
    r0, r1, r2, r3 = tl.randint4x(seed, counter + (q // 4).to(tl.int64))
    j = q % 4
    bits = tl.where(j == 0, r0, tl.where(j == 1, r1, tl.where(j == 2, r2, r3)))
    return (bits >> 8).to(tl.float32) * (1.0 / 16777216.0)  # 24 bits: at most 1 - 2^-24


# ---------------------------------------------------------------------------------------------
# Segmented path (the default; docs/sampling.md "Segmented path")
# ---------------------------------------------------------------------------------------------
#
# Same filter sets, the exactness argument above, and passes that have no block-wide
# reduction inside their streaming loop:
# - the row is cut into NSEG contiguous segments of ``seg_len`` tokens (a multiple of W); an
#   iteration loads the tile [NSEG, W] (W contiguous tokens of every segment; UNROLL such tiles in
#   ``_seg_pass``) and only does
#   elementwise work into per-thread accumulators [.., NSEG, W]; the loop is a plain ``for`` over
#   ``tl.range(..., num_stages=STAGES)`` so that Triton can keep STAGES tiles of loads in flight;
#   everything is reduced once after the loop;
# - a pass measures cnt/mass at NP pivots *per segment*: lanes 0..NC-1 the queued candidates, the
#   rest search pivots (the first pass: 0 and a grid). Whatever lane becomes the new ``lo``, its
#   per-segment masses are the CDF of the next candidate set at segment granularity (kept until
#   ``lo`` moves again, so ``lo`` needs no lane of its own), so the next
#   NQ candidates are drawn right after the pass without another full pass: a prefix over the
#   NSEG segment masses picks each draw's segment (level 1), one pipelined sweep over the picked
#   segments computes NSUB sub-segment masses per draw (level 2, 1/NSEG of the row per draw), and a
#   short blocked scan of the picked sub-segment ends the draw (level 3);
# - every queued candidate is measured by the next pass, so after a pass the queue is decided:
#   the first kept candidate (in draw order) is accepted, otherwise all are rejected and NQ new
#   ones are drawn from the smaller set at once; a new candidate at or above ``hi`` (a value known
#   to be kept) is accepted without being measured.


@triton.jit
def _seg_pass(row, vocab, seg_len, piv, COUNT: tl.constexpr, MAX: tl.constexpr, NP: tl.constexpr,
              NSEG: tl.constexpr, W: tl.constexpr, STAGES: tl.constexpr, UNROLL: tl.constexpr,
              ZERO_PIVOTS: tl.constexpr = False):
    """One streaming pass: per segment, count and mass of the values above each pivot.

    ``piv [NP]`` (+inf: unused lane). Returns cnt ``[NP]`` (count > pivot, whole row), mass
    ``[NP, NSEG]`` (sum > pivot, per segment) and the row max (0 if no positive entry). NaN,
    negative and padding entries count as 0 (never above a pivot >= 0). cnt is zeros without
    COUNT, the max 0 without MAX. ZERO_PIVOTS: every pivot is 0 (the masses of the positive
    entries). An iteration reads UNROLL consecutive tiles [NSEG, W] (``seg_len`` a multiple of
    W * UNROLL): fewer barriers and less loop bookkeeping per element; every accumulator slot still
    adds its tokens in row order, so the sums do not depend on UNROLL.

    Per element and lane the loop body is a compare to 1.0/0.0 (``g``), an FMA into the mass
    (``x * g`` is x or +0 exactly: x is finite or +inf, and only a +inf pivot meets x = +inf with
    g = 0, whose NaN mass no caller reads) and (COUNT) an add of ``g``: 2-3 instructions instead
    of compare, select, add (and select, add).
    """
    seg = tl.arange(0, NSEG)
    col = tl.arange(0, W)
    base = seg[:, None] * seg_len + col[None, :]  # [NSEG, W]: first tile of every segment
    cnt_acc = tl.zeros([NP, NSEG, W], dtype=tl.float32)  # exact integers (< 2^24 per slot)
    mass_acc = tl.zeros([NP, NSEG, W], dtype=tl.float32)
    # [1, NSEG, W]: the layout of the lanes' broadcast, so the tile is read from shared memory once.
    max_acc = tl.zeros([1, NSEG, W], dtype=tl.float32)
    for j in tl.range(0, seg_len, W * UNROLL, num_stages=STAGES):
        for u in tl.static_range(UNROLL):
            idx = base + (j + u * W)
            x = tl.load(row + idx, mask=idx < vocab, other=0.0).to(tl.float32)
            x = tl.where(x > 0.0, x, 0.0)[None, :, :]  # NaN and negative -> 0
            if ZERO_PIVOTS:
                mass_acc += x
            else:
                g = (x > piv[:, None, None]).to(tl.float32)  # [NP, NSEG, W]
                mass_acc += x * g
                if COUNT:
                    cnt_acc += g
            if MAX:
                max_acc = tl.maximum(max_acc, x)
    cnt = tl.sum(tl.sum(cnt_acc, axis=2), axis=1).to(tl.int32)
    mass = tl.sum(mass_acc, axis=2)
    return cnt, mass, tl.max(tl.max(tl.max(max_acc, axis=2), axis=1), axis=0)


@triton.jit
def _row_barrier(COUNTER, target):
    """Wait until ``COUNTER`` (one int32 per output row, zeroed by the launcher) reaches ``target``
    after adding this program's arrival: a barrier over the programs of one row. The launcher splits
    a row only while every program of the grid fits on the GPU at once (batch x chunks <= SMs), so
    the programs waited for are running, not queued behind the waiting ones."""
    tl.debug_barrier()  # every thread's partial stores come before the release below
    tl.atomic_add(COUNTER, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(COUNTER, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(COUNTER, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _chunk_pass(row, vocab, ch, piv, COUNT: tl.constexpr, MAX: tl.constexpr, NP: tl.constexpr,
                NSEG_IN: tl.constexpr, NSEG_PUB: tl.constexpr, CHUNK: tl.constexpr, W: tl.constexpr,
                STAGES: tl.constexpr, UNROLL: tl.constexpr, ZERO_PIVOTS: tl.constexpr):
    """``_seg_pass`` over chunk ``ch`` (tokens ``[ch * CHUNK, (ch + 1) * CHUNK)``, NSEG_IN segments):
    count ``[NP]`` (int32), mass ``[NP, NSEG_PUB]`` (per run of NSEG_IN / NSEG_PUB consecutive segments:
    the chunk's published segments) and max of the chunk."""
    start = ch * CHUNK
    cnt, seg_mass, cmax = _seg_pass(row + start, vocab - start, CHUNK // NSEG_IN, piv, COUNT, MAX, NP, NSEG_IN, W,
                                    STAGES, UNROLL, ZERO_PIVOTS)
    pub = tl.sum(tl.reshape(seg_mass, [NP, NSEG_PUB, NSEG_IN // NSEG_PUB]), axis=2)
    return cnt, pub, cmax


@triton.jit
def _split_pass(row, vocab, c, nchunks, r, PART, COUNTER, piv, COUNT: tl.constexpr, MAX: tl.constexpr,
                NP: tl.constexpr, NSEG: tl.constexpr, NSEG_IN: tl.constexpr, NSEG_PUB: tl.constexpr,
                CHUNK: tl.constexpr, W: tl.constexpr, STAGES: tl.constexpr, UNROLL: tl.constexpr,
                ZERO_PIVOTS: tl.constexpr, EXCHANGE: tl.constexpr):
    """Pass ``r`` of a row split into ``nchunks`` chunks of NSEG_PUB published segments each: the
    ``_seg_pass`` results with the published segments as the row's segments (cnt ``[NP]`` of the row,
    mass ``[NP, NSEG]`` per segment, segment ``s`` being ``[s, s + 1) * CHUNK / NSEG_PUB``; row max), the
    same in every program.

    EXCHANGE: program ``c`` measures its chunk and stores it into the row's slot ``r % 2`` of ``PART``
    (``[2, SLOT]`` float32, ``SLOT = NP * NSEG + (NP + 1) * NCH``: masses ``[NP, NSEG]``, counts ``[NP,
    NCH]``, maxima ``[NCH]``; two slots, so that a program already in pass r + 1 never overwrites what
    a slower one still reads of pass r), all meet at the row barrier, then each reads every chunk's
    partials (volatile loads: not from a stale L1 line). Otherwise this program measures every chunk
    itself, with the same arithmetic per chunk: the same bits, without a barrier (the interpreter runs
    programs one after another, so it cannot wait for another)."""
    NCH: tl.constexpr = NSEG // NSEG_PUB
    lane = tl.arange(0, NP)
    chs = tl.arange(0, NCH)
    segs = tl.arange(0, NSEG)
    if EXCHANGE:
        cnt_c, mass_c, max_c = _chunk_pass(row, vocab, c, piv, COUNT, MAX, NP, NSEG_IN, NSEG_PUB, CHUNK, W, STAGES,
                                           UNROLL, ZERO_PIVOTS)
        slot = PART + (r % 2) * (NP * NSEG + (NP + 1) * NCH)
        pub = tl.arange(0, NSEG_PUB)
        tl.store(slot + lane[:, None] * NSEG + c * NSEG_PUB + pub[None, :], mass_c)
        tl.store(slot + NP * NSEG + lane * NCH + c, cnt_c.to(tl.float32))
        tl.store(slot + NP * NSEG + NP * NCH + c, max_c)
        _row_barrier(COUNTER, (r + 1) * nchunks)
        mass = tl.load(slot + lane[:, None] * NSEG + segs[None, :], mask=segs[None, :] < nchunks * NSEG_PUB,
                       other=0.0, volatile=True)
        cnts = tl.load(slot + NP * NSEG + lane[:, None] * NCH + chs[None, :], mask=chs[None, :] < nchunks,
                       other=0.0, volatile=True)
        maxes = tl.load(slot + NP * NSEG + NP * NCH + chs, mask=chs < nchunks, other=0.0, volatile=True)
    else:
        mass = tl.zeros([NP, NSEG], dtype=tl.float32)
        cnts = tl.zeros([NP, NCH], dtype=tl.float32)
        maxes = tl.zeros([NCH], dtype=tl.float32)
        pub = tl.arange(0, NSEG_PUB)
        for ch in range(0, nchunks):
            cnt_c, mass_c, max_c = _chunk_pass(row, vocab, ch, piv, COUNT, MAX, NP, NSEG_IN, NSEG_PUB, CHUNK, W,
                                               STAGES, UNROLL, ZERO_PIVOTS)
            # Published segment j of this chunk goes to column ch * NSEG_PUB + j (a sum with one term).
            put = (segs[:, None] == ch * NSEG_PUB + pub[None, :])[None, :, :]  # [1, NSEG, NSEG_PUB]
            spread = tl.sum(tl.where(put, mass_c[:, None, :], 0.0), axis=2)
            mass = tl.where((segs[None, :] // NSEG_PUB) == ch, spread, mass)
            at = chs[None, :] == ch
            cnts = tl.where(at, cnt_c.to(tl.float32)[:, None], cnts)
            maxes = tl.where(chs == ch, max_c, maxes)
    # Counts are exact in float32: at most vocab < 2^24.
    return tl.sum(cnts, axis=1).to(tl.int32), mass, tl.max(maxes, axis=0)


@triton.jit
def _seg_pick(sums, targets, N: tl.constexpr):
    """For every row q of ``sums [NQ, N]`` (non-negative): the first position whose running sum
    exceeds ``targets[q]`` among positions of positive sum (the last such position when the float
    running sum never does; -1 if none) and the target minus the sums before it."""
    pos = tl.arange(0, N)[None, :]
    cs = tl.cumsum(sums, axis=1)
    hit = (cs > targets[:, None]) & (sums > 0.0)
    first = tl.min(tl.where(hit, pos, N), axis=1)
    last = tl.max(tl.where(sums > 0.0, pos, -1), axis=1)
    sel = tl.where(first < N, first, last)
    before = tl.sum(tl.where(pos < sel[:, None], sums, 0.0), axis=1)
    return sel, targets - before


@triton.jit
def _seg_draw(row, vocab, lo, seg_mass, targets, seg_len, sub_len, shift, NQ: tl.constexpr, NSEG: tl.constexpr,
              NSUB: tl.constexpr, CW: tl.constexpr, C3: tl.constexpr, STAGES: tl.constexpr,
              IS_LOGITS: tl.constexpr = False):
    """NQ inverse-CDF draws from {p > lo}, given that set's per-segment masses ``seg_mass [NSEG]``
    and running-sum ``targets [NQ]`` (below the sum of ``seg_mass``). Returns the token ids ``[NQ]``
    (-1 where the set is empty); every id returned has ``p > lo``. IS_LOGITS: the row holds logits
    and ``p = exp(x - shift)`` (NaN and -inf are never drawn).

    Level 1 picks the segment, level 2 sweeps the NQ picked segments once (tile [NQ, NSUB, CW], no
    reduction in the loop) for their NSUB sub-segment masses and picks the sub-segment, level 3
    scans it in chunks of C3 (prefix sums; ``sub_len`` is a few C3). Float sums in another order
    need not agree: a target past a sub-segment's recomputed sum takes its last token above lo.
    """
    seg_sel, resid = _seg_pick(tl.broadcast_to(seg_mass[None, :], (NQ, NSEG)), targets, NSEG)
    ok = seg_sel >= 0
    seg_start = tl.maximum(seg_sel, 0) * seg_len
    seg_end = tl.minimum(seg_start + seg_len, vocab)
    # Level 2: sub-segment masses of every picked segment.
    sub = tl.arange(0, NSUB)
    cw = tl.arange(0, CW)
    base = seg_start[:, None, None] + sub[None, :, None] * sub_len + cw[None, None, :]  # [NQ, NSUB, CW]
    lim = seg_end[:, None, None]
    acc = tl.zeros([NQ, NSUB, CW], dtype=tl.float32)
    for j in tl.range(0, sub_len, CW, num_stages=STAGES):
        idx = base + j
        if IS_LOGITS:
            x = tl.exp(tl.load(row + idx, mask=idx < lim, other=float("-inf")).to(tl.float32) - shift)
        else:
            x = tl.load(row + idx, mask=idx < lim, other=0.0).to(tl.float32)
        acc += tl.where(x > lo, x, 0.0)
    sub_sel, resid = _seg_pick(tl.sum(acc, axis=2), resid, NSUB)
    ok = ok & (sub_sel >= 0)
    start = seg_start + tl.maximum(sub_sel, 0) * sub_len
    end = tl.minimum(start + sub_len, seg_end)
    # Level 3: blocked scan of the picked sub-segment.
    c3 = tl.arange(0, C3)
    run = tl.zeros([NQ], dtype=tl.float32)
    hit = tl.full([NQ], -1, dtype=tl.int32)
    last = tl.full([NQ], -1, dtype=tl.int32)
    for j in range(0, sub_len, C3):
        idx = start[:, None] + j + c3[None, :]  # [NQ, C3]
        if IS_LOGITS:
            x = tl.exp(tl.load(row + idx, mask=idx < end[:, None], other=float("-inf")).to(tl.float32) - shift)
        else:
            x = tl.load(row + idx, mask=idx < end[:, None], other=0.0).to(tl.float32)
        above = x > lo  # NaN and padding are out
        w = tl.where(above, x, 0.0)
        cs = tl.cumsum(w, axis=1) + run[:, None]
        first = tl.min(tl.where(above & (cs > resid[:, None]), idx, 2147483647), axis=1)
        hit = tl.where((hit < 0) & (first < 2147483647), first, hit)
        last = tl.maximum(last, tl.max(tl.where(above, idx, -1), axis=1))
        run += tl.sum(w, axis=1)
    cid = tl.where(hit >= 0, hit, last)
    return tl.where(ok, cid, -1)


@triton.jit
def _seg_draw_queue(row, vocab, lo, hi, thr, lo_seg, seed, counter, seg_len, sub_len, NQ: tl.constexpr,
                    NSEG: tl.constexpr, NSUB: tl.constexpr, CW: tl.constexpr, C3: tl.constexpr, STAGES: tl.constexpr):
    """Draw NQ candidates from {p > lo} (per-segment masses ``lo_seg``; Philox words at ``counter``) and
    judge them in draw order: the first one not rejected (``p >= thr``) is accepted when known kept
    (``p >= hi``). Returns (accepted, its id, queue values ``[NQ]``, queue ids ``[NQ]``, queue length):
    the queue holds the candidates not rejected, in draw order, for the next pass to measure (empty
    when one was accepted)."""
    q = tl.arange(0, NQ)
    u = _uniforms(seed, counter, NQ)
    cid = _seg_draw(row, vocab, lo, lo_seg, u * tl.sum(lo_seg, axis=0), seg_len, sub_len, 0.0, NQ, NSEG, NSUB, CW, C3,
                    STAGES)
    cok = cid >= 0
    cv = tl.load(row + tl.maximum(cid, 0), mask=cok, other=0.0).to(tl.float32)
    alive = cok & (cv > lo) & (cv >= thr)
    kept = alive & (cv >= hi)
    head = tl.min(tl.where(alive, q, NQ), axis=0)
    accept = tl.max(tl.where((q == head) & kept, 1, 0), axis=0) > 0
    pick = tl.sum(tl.where(q == head, cid, 0), axis=0)
    # Queue the alive candidates in draw order (the head is undecided).
    pos = tl.cumsum(alive.to(tl.int32), axis=0) - 1
    sel = (pos[None, :] == q[:, None]) & alive[None, :]  # [slot, candidate]
    qv = tl.sum(tl.where(sel, cv[None, :], 0.0), axis=1)
    qid = tl.sum(tl.where(sel, cid[None, :], 0), axis=1)
    qn = tl.where(accept, 0, tl.sum(alive.to(tl.int32), axis=0))
    return accept, pick, qv, qid, qn


@triton.jit
def _seg_pivots(first, qv, qn, lo, lo_cnt, lo_mass, hi, hi_cnt, hi_mass, k, p_mass, thr, vocab,
                USE_TOP_K: tl.constexpr, USE_TOP_P: tl.constexpr, USE_MIN_P: tl.constexpr, NQ: tl.constexpr,
                NC: tl.constexpr, NP: tl.constexpr, GRID_STEP: tl.constexpr = 2, GRID_OFF: tl.constexpr = 1):
    """The pivots ``[NP]`` of the next pass (+inf: unused lane).

    Lanes 0..NC-1 = the queued candidates; the other NP - NC lanes search: ``lo + (hi - lo) * g``
    with g in {f/2, f, (1+f)/2, (3+f)/4, ...} around the fraction f where cnt reaches k or the mass
    reaches ``p_mass`` (interpolated between the bracket ends); with min-p the first search lane is
    the float just below the threshold ({p > lane} is then exactly the min-p set). ``lo`` itself
    needs no lane: its count and per-segment masses are kept from the pass that measured it. First
    pass: lane 0 = 0 (total, positive count, masses of {p > 0}) and, with top-k or top-p, the other
    lanes at ``2^(GRID_STEP * j - GRID_OFF) / vocab`` (default ``2^(2j-1) / vocab``).
    """
    lane = tl.arange(0, NP)
    piv = tl.full([NP], float("inf"), dtype=tl.float32)
    if NC > 0:
        qi = tl.arange(0, NQ)
        sel = (lane[:, None] == qi[None, :]) & (qi[None, :] < qn) & (qi[None, :] < NC)  # [NP, NQ]
        piv = tl.where(tl.max(sel.to(tl.int32), axis=1) > 0, tl.sum(tl.where(sel, qv[None, :], 0.0), axis=1), piv)
    s = lane - NC  # search lane index
    NS: tl.constexpr = NP - NC
    if NS > 0:
        if USE_TOP_K or USE_TOP_P:
            f = tl.full([], 0.02, dtype=tl.float32)
            if USE_TOP_K:
                # Counts fall about exponentially in the value at a distribution's tail: interpolate log(cnt).
                log_lo = tl.log(tl.maximum(lo_cnt, 1).to(tl.float32))
                log_hi = tl.log(tl.maximum(hi_cnt.to(tl.float32), 0.5))
                f = tl.maximum(f, (log_lo - tl.log(k.to(tl.float32) + 0.5)) / tl.maximum(log_lo - log_hi, 1e-6))
            if USE_TOP_P:
                f = tl.maximum(f, tl.maximum(lo_mass - p_mass, 0.0) / tl.maximum(lo_mass - hi_mass, 1e-30))
            f = tl.minimum(f, 0.98)
            HALF: tl.constexpr = (NS + 1) // 2  # lanes f/2^j below f (f included), (1+f)/2 ... above
            sf = s.to(tl.float32)
            g = tl.where(s < HALF, f * tl.exp2(sf - HALF + 1.0), 1.0 - (1.0 - f) * tl.exp2(HALF - 1.0 - sf))
            piv = tl.where((hi < float("inf")) & (lo < hi), tl.where(s >= 0, lo + (hi - lo) * g, piv), piv)
        if USE_MIN_P:
            below = (thr.to(tl.int32, bitcast=True) - 1).to(tl.float32, bitcast=True)
            piv = tl.where((thr > 0) & (below > lo), tl.where(s == 0, below, piv), piv)
    if USE_TOP_K or USE_TOP_P:
        start = tl.where(lane == 0, 0.0, tl.exp2(GRID_STEP * lane.to(tl.float32) - GRID_OFF) / vocab)
    else:
        start = tl.where(lane == 0, 0.0, float("inf"))
    return tl.where(first, start, piv)


@triton.jit
def _lane_value(v, lane, j):
    """``v[j]`` of a per-lane vector ``v`` (float or int)."""
    return tl.sum(tl.where(lane == j, v, 0), axis=0)


@triton.jit
def _seg_top_k_set(row, vocab, seg_len, k, NP: tl.constexpr, NSEG: tl.constexpr, W: tl.constexpr,
                   STAGES: tl.constexpr, MAX_STEPS: tl.constexpr, UNROLL: tl.constexpr):
    """The exact top-k set for ``filter_apply_order="top_k_first"`` on segmented passes: returns
    ``(lo, row_max, passes, seg_mass)`` with the set = the values above ``lo`` (every positive value
    when the row has at most k of them) and ``seg_mass [NSEG]`` its mass per segment (so the first
    candidates are drawn without another pass).

    Pass 0 measures ``cnt`` at 0 and at ``2^(2j-1) / vocab``; then each pass measures NP pivots in
    ``[a, hi]`` (``lo < tau <= hi``, ``cnt(lo) >= k``, ``cnt(hi) < k``, ``a`` the smallest value above
    ``lo``, ``hi`` a row value): lane 0 at ``a``, the others around the point where ``log(cnt)``
    interpolated between the ends reaches k (log-count targets ``k * rho^t``, ``|t| <= 1``). The
    nearest row values around each pivot (per-slot min/max accumulators) move ``a`` and ``hi``; the
    search ends when ``a == hi`` (= tau). UNROLL tiles per iteration, as ``_seg_pass``.
    """
    lane = tl.arange(0, NP)
    seg = tl.arange(0, NSEG)
    col = tl.arange(0, W)
    base = seg[:, None] * seg_len + col[None, :]
    lo = tl.zeros([], dtype=tl.float32)
    a = tl.zeros([], dtype=tl.float32)
    hi = tl.full([], float("inf"), dtype=tl.float32)
    lo_cnt = tl.zeros([], dtype=tl.int32)
    hi_cnt = tl.zeros([], dtype=tl.int32)
    row_max = tl.zeros([], dtype=tl.float32)
    lo_seg = tl.zeros([NSEG], dtype=tl.float32)
    step = 0
    searching = lo == 0.0  # True
    while searching & (step < MAX_STEPS):
        if step == 0:
            piv = tl.where(lane == 0, 0.0, tl.exp2(2.0 * lane.to(tl.float32) - 1.0) / vocab)
        else:
            # Model: log(cnt) linear in the value between (lo, cnt(lo)) and (hi, cnt(hi)). Lanes 1..NP-1 at
            # counts spread evenly in log space over k / rho .. k * rho, rho = (cnt(lo) / cnt(hi))^(1/8):
            # a right model shrinks the bracket ~4 (NP - 1) times in log(cnt) per pass (spreads of 1/4 and
            # 1/16 took more passes on softmax(randn) rows of 128256 tokens with k = 50 and 1000).
            log_lo = tl.log(tl.maximum(lo_cnt, 1).to(tl.float32))
            log_hi = tl.log(tl.maximum(hi_cnt.to(tl.float32), 0.5))
            span = tl.maximum(log_lo - log_hi, 1e-6)
            log_k = tl.log(k.to(tl.float32) + 0.5)
            t = (lane - 1).to(tl.float32) / (NP - 2) * 2.0 - 1.0  # -1 .. 1 over lanes 1..NP-1
            log_c = log_k - t * span * 0.125
            g = (log_lo - log_c) / span
            g = tl.minimum(tl.maximum(g, 0.0), 1.0)
            piv = tl.where(lane == 0, a, a + (hi - a) * g)
        cnt_acc = tl.zeros([NP, NSEG, W], dtype=tl.float32)
        min_acc = tl.full([NP, NSEG, W], float("inf"), dtype=tl.float32)
        max_acc = tl.zeros([NP, NSEG, W], dtype=tl.float32)  # values are >= 0 (NaN, negative -> 0)
        mass_acc = tl.zeros([NP, NSEG, W], dtype=tl.float32)
        top_acc = tl.zeros([1, NSEG, W], dtype=tl.float32)  # the lanes' layout: one read of the tile (_seg_pass)
        for j in tl.range(0, seg_len, W * UNROLL, num_stages=STAGES):
            for u in tl.static_range(UNROLL):
                idx = base + (j + u * W)
                x = tl.load(row + idx, mask=idx < vocab, other=0.0).to(tl.float32)
                x3 = tl.where(x > 0.0, x, 0.0)[None, :, :]
                top_acc = tl.maximum(top_acc, x3)
                gt = x3 > piv[:, None, None]
                g = gt.to(tl.float32)  # compare to 1.0/0.0 and FMA, as _seg_pass
                cnt_acc += g
                mass_acc += x3 * g
                min_acc = tl.minimum(min_acc, tl.where(gt, x3, float("inf")))
                max_acc = tl.maximum(max_acc, tl.where(gt, 0.0, x3))
        cnt = tl.sum(tl.sum(cnt_acc, axis=2), axis=1).to(tl.int32)
        min_gt = tl.min(tl.min(min_acc, axis=2), axis=1)
        max_le = tl.max(tl.max(max_acc, axis=2), axis=1)
        row_max = tl.max(tl.max(tl.max(top_acc, axis=2), axis=1), axis=0)
        rejected = cnt >= k
        kept = ~rejected
        # Largest rejected pivot -> lo (its nearest value above -> a); smallest kept -> hi (nearest value at or below).
        best = tl.max(tl.where(rejected, piv, -1.0), axis=0)
        moved = best >= lo
        b_lane = tl.min(tl.where(rejected & (piv == best), lane, NP), axis=0)
        lo = tl.where(moved, best, lo)
        lo_seg = tl.where(moved, tl.sum(tl.where(lane[:, None] == b_lane, tl.sum(mass_acc, axis=2), 0.0), axis=0),
                          lo_seg)
        lo_cnt = tl.where(moved, _lane_value(cnt, lane, b_lane), lo_cnt)
        a = tl.where(moved, _lane_value(tl.where(lane == b_lane, min_gt, 0.0), lane, b_lane), a)
        hb = tl.min(tl.where(kept, piv, float("inf")), axis=0)
        h_lane = tl.min(tl.where(kept & (piv == hb), lane, NP), axis=0)
        has_kept = h_lane < NP
        new_hi = _lane_value(tl.where(lane == h_lane, max_le, 0.0), lane, h_lane)
        hi_cnt = tl.where(has_kept & (new_hi < hi), _lane_value(cnt, lane, h_lane), hi_cnt)
        hi = tl.where(has_kept, tl.minimum(hi, new_hi), hi)
        if step == 0:
            hi = tl.minimum(hi, row_max)  # the row max is kept (cnt = 0)
            searching = tl.max(rejected.to(tl.int32), axis=0) > 0  # cnt(0) < k: every positive value is kept
            # Lane 0 (pivot 0): every positive value, the set when nothing is rejected.
            lo_seg = tl.where(searching, lo_seg, tl.sum(tl.where(lane[:, None] == 0, tl.sum(mass_acc, axis=2), 0.0),
                                                        axis=0))
        a = tl.minimum(a, hi)
        searching = searching & (a < hi)
        step += 1
    return lo, row_max, step, lo_seg


@direct_launch
@triton.jit(do_not_specialize=PER_CALL_INTS)
def _seg_filtered_sampling_kernel(
    PROBS, ROWS, OUT, VALID, TOP_K, TOP_P, MIN_P, SEED, OFFSET, PASSES, PART, COUNTER,
    vocab, stride_row, seg_len, sub_len, nchunks,
    top_k_val, top_p_val, min_p_val, seed_val, offset_val,
    HAS_ROWS: tl.constexpr, TOPK_PER_ROW: tl.constexpr, TOPP_PER_ROW: tl.constexpr, MINP_PER_ROW: tl.constexpr,
    SEED_IN_TENSOR: tl.constexpr, SEED_PER_ROW: tl.constexpr,
    USE_TOP_K: tl.constexpr, USE_TOP_P: tl.constexpr, USE_MIN_P: tl.constexpr, TOP_K_FIRST: tl.constexpr,
    MAX_PASSES: tl.constexpr, MAX_STEPS: tl.constexpr, DRAW_STRIDE: tl.constexpr,
    NQ: tl.constexpr, NC: tl.constexpr, NP: tl.constexpr, NSEG: tl.constexpr, W: tl.constexpr,
    NSUB: tl.constexpr, CW: tl.constexpr, C3: tl.constexpr, STAGES: tl.constexpr, UNROLL: tl.constexpr,
    BLOCK: tl.constexpr, NP_SEARCH: tl.constexpr, RECORD_PASSES: tl.constexpr,
    SPLIT: tl.constexpr = False, EXCHANGE: tl.constexpr = False, CHUNK: tl.constexpr = 1,
    NSEG_IN: tl.constexpr = 1, NSEG_PUB: tl.constexpr = 1, GRID_STEP: tl.constexpr = 2, GRID_OFF: tl.constexpr = 1,
    RECORD_TIMES: tl.constexpr = False,
):
    """The rejection sampler with segmented passes (section comment above). One output row per
    program; arguments as ``_filtered_sampling_kernel`` plus the segment sizes (``seg_len``,
    ``sub_len``: tokens per segment / sub-segment, multiples of W / CW); BLOCK and NP_SEARCH size
    the exact fallback (``_exact_draw``, default path helpers). RECORD_PASSES: store into ``PASSES[i]``
    the passes this row ran, plus 1000 if it ended in the exact fallback (instrumentation).

    SPLIT (row split, grid ``(batch, nchunks)``): program ``(i, c)`` owns chunk ``c`` of row i (CHUNK
    tokens, NSEG_IN segments of its own ``_seg_pass``, published as NSEG_PUB segments); the segments of
    the algorithm are the published ones (``seg_len`` = CHUNK / NSEG_PUB, NSEG = NSEG_PUB x a power of 2
    >= nchunks), and a pass is ``_split_pass`` (EXCHANGE: partials in ``PART``, ``[batch, 2, SLOT]``
    float32, and a barrier on ``COUNTER[i]``, int32 zeros).
    Every program of a row then holds the same pass results and runs the same decisions and draws
    (reading the row, mostly from L2), so they stay in step; program 0 stores the result.
    GRID_STEP, GRID_OFF: the first pass's pivot grid (``_seg_pivots``).
    RECORD_TIMES (with RECORD_PASSES; instrumentation): ``PASSES`` is int64 ``[batch, 6]`` and row i gets
    (passes, then the global timer in ns at the start, after the first pass, after the first draw and at
    the end, then the SM id)."""
    i = tl.program_id(0)
    c = tl.program_id(1)
    if RECORD_TIMES:
        t_start = globaltimer()
    tl.static_assert(not (SPLIT and TOP_K_FIRST))  # top_k_first keeps one program per row
    row = _input_row(PROBS, ROWS, i, stride_row, HAS_ROWS)
    k, top_p, min_p = _load_params(i, TOP_K, TOP_P, MIN_P, top_k_val, top_p_val, min_p_val, vocab, TOPK_PER_ROW,
                                   TOPP_PER_ROW, MINP_PER_ROW)
    top_p = tl.where(top_p >= 1.0, 3.0e38, top_p)  # top_p >= 1 keeps every positive token (no float-sum edge)
    seed, counter = _load_seed(i, SEED, OFFSET, seed_val, offset_val, DRAW_STRIDE, SEED_IN_TENSOR, SEED_PER_ROW)
    USE_KP: tl.constexpr = USE_TOP_K or USE_TOP_P
    VERIFY: tl.constexpr = USE_KP or USE_MIN_P
    WORDS: tl.constexpr = (NQ + 3) // 4  # Philox counters per draw
    tl.static_assert(WORDS * MAX_PASSES + 2 <= DRAW_STRIDE)
    tl.static_assert(NC == 0 or (NC == NQ and NP >= NQ))  # every queued candidate is measured by the next pass
    lane = tl.arange(0, NP)
    q = tl.arange(0, NQ)

    # Bracket: every value <= lo is rejected (lo = 0 at first), every value >= hi passes top-k/top-p.
    lo = tl.zeros([], dtype=tl.float32)
    lo_cnt = tl.zeros([], dtype=tl.int32)  # cnt(lo), mass(lo): the candidate set {p > lo}
    lo_mass = tl.zeros([], dtype=tl.float32)
    lo_seg = tl.zeros([NSEG], dtype=tl.float32)  # per-segment masses of {p > lo}
    have_total = lo > 1.0  # False until a pass (or the top-k set) measured the row
    if USE_KP:
        hi = tl.full([], float("inf"), dtype=tl.float32)
    else:
        hi = tl.zeros([], dtype=tl.float32)
    hi_cnt = tl.zeros([], dtype=tl.int32)
    hi_mass = tl.zeros([], dtype=tl.float32)
    total = tl.full([], 1.0, dtype=tl.float32)  # top-p reference mass
    thr = tl.zeros([], dtype=tl.float32)  # min-p threshold (min_p * row max)
    if TOP_K_FIRST:
        # The top-k set exactly ({p > lo}, with its per-segment masses), then top-p inside it.
        lo, rmax0, search_passes, lo_seg0 = _seg_top_k_set(row, vocab, seg_len, k, NP, NSEG, W, STAGES, MAX_STEPS,
                                                                   UNROLL)
        hi = rmax0
        lo_seg = lo_seg0
        lo_mass = tl.sum(lo_seg0, axis=0)
        total = lo_mass  # the top-p reference: the top-k set's mass
        have_total = have_total | True
        if MAX_PASSES > 0:
            # First candidates right away (the search measured the set's masses per segment).
            acc0, pick0, qv0, qid0, qn0 = _seg_draw_queue(row, vocab, lo, hi, 0.0, lo_seg0, seed,
                                                          counter + MAX_PASSES * WORDS + 1, seg_len, sub_len, NQ, NSEG,
                                                          NSUB, CW, C3, STAGES)
    else:
        search_passes = 0

    # Candidate queue, in draw order: values and ids; qn entries, all measured by the next pass.
    qv = tl.zeros([NQ], dtype=tl.float32)
    qid = tl.zeros([NQ], dtype=tl.int32)
    qn = tl.zeros([], dtype=tl.int32)
    result = tl.zeros([], dtype=tl.int32)
    valid = lo < 0.0  # False
    done = lo < 0.0
    if TOP_K_FIRST:
        if MAX_PASSES > 0:
            qv, qid, qn, result = qv0, qid0, qn0, tl.where(acc0, pick0, result)
            valid = acc0
            done = acc0 | (lo_mass <= 0.0)
    r = 0
    if MAX_PASSES > 0:  # a loop that can never run breaks Triton 3.6's coalesce pass
        while (r < MAX_PASSES) & (~done):
            first = ~have_total
            p_mass = top_p * tl.where(top_p > 1.0, 1.0, total)  # no top-p filter: stays huge, no overflow
            if TOP_K_FIRST:
                grid = first & False  # candidates and search lanes between the top-k set's bound and its max
            else:
                grid = first
            if VERIFY:
                piv = _seg_pivots(grid, qv, qn, lo, lo_cnt, lo_mass, hi, hi_cnt, hi_mass, k, p_mass, thr, vocab,
                                  USE_TOP_K, USE_TOP_P, USE_MIN_P, NQ, NC, NP, GRID_STEP, GRID_OFF)
            else:
                piv = tl.zeros([NP], dtype=tl.float32)  # lane 0 = 0: the masses of {p > 0}
            if SPLIT:
                part_row = PART + i.to(tl.int64) * (2 * (NP * NSEG + (NP + 1) * (NSEG // NSEG_PUB)))
                cnt, seg_mass, rmax = _split_pass(row, vocab, c, nchunks, r, part_row, COUNTER + i, piv, USE_TOP_K,
                                                  VERIFY, NP, NSEG, NSEG_IN, NSEG_PUB, CHUNK, W, STAGES, UNROLL,
                                                  not VERIFY, EXCHANGE)
            else:
                cnt, seg_mass, rmax = _seg_pass(row, vocab, seg_len, piv, USE_TOP_K, VERIFY, NP, NSEG, W, STAGES,
                                                UNROLL, not VERIFY)
            if RECORD_TIMES:
                if r == 0:
                    tl.store(PASSES + i * 6 + 2, globaltimer())
            if not USE_TOP_K:
                # Top-p needs cnt only for "cnt(v) == 0", i.e. v >= row max: no counting in the pass.
                cnt = tl.where(piv >= rmax, 0, 1)
            pmass = tl.sum(seg_mass, axis=1)  # [NP]
            used = piv < float("inf")
            if VERIFY:
                if first:
                    total = _lane_value(pmass, lane, 0)
                    thr = min_p * rmax
                    if USE_KP:
                        hi = tl.minimum(hi, rmax)  # the row max passes top-k and top-p (cnt = 0)
                p_mass = top_p * tl.where(top_p > 1.0, 1.0, total)
                keep_kp = _keep(cnt, pmass, piv, k, p_mass, 0.0, USE_TOP_K, USE_TOP_P, False)
                keep = keep_kp & (piv >= thr)
                # New lo: the largest rejected pivot, if above lo.
                lo = tl.maximum(lo, tl.max(tl.where(used & (~keep), piv, -1.0), axis=0))
                if USE_KP:
                    passed = used & keep_kp
                    hb = tl.min(tl.where(passed, piv, float("inf")), axis=0)
                    hb_lane = tl.min(tl.where(passed & (piv == hb), lane, NP), axis=0)
                    mh = hb < hi
                    hi_cnt = tl.where(mh, _lane_value(cnt, lane, hb_lane), hi_cnt)
                    hi_mass = tl.where(mh, _lane_value(pmass, lane, hb_lane), hi_mass)
                    hi = tl.where(mh, hb, hi)
                # Queued candidates (lanes 0..NQ-1): the first kept one in draw order is accepted.
                if NC > 0:
                    qkeep = tl.max(tl.where((lane[None, :] == q[:, None]) & keep[None, :], 1, 0), axis=1) > 0
                    head = tl.min(tl.where(qkeep & (q < qn), q, NQ), axis=0)
                    accept = head < NQ
                    result = tl.where(accept, tl.sum(tl.where(q == head, qid, 0), axis=0), result)
                else:
                    accept = have_total & False
            else:
                accept = have_total & False
            # A lane measured lo (the first pass's lane 0, or lo moved to a rejected lane): its count and
            # masses; otherwise lo kept its value and they are those of an earlier pass.
            lo_lane = tl.min(tl.where((piv == lo) & used, lane, NP), axis=0)
            found = lo_lane < NP
            lo_cnt = tl.where(found, _lane_value(cnt, lane, lo_lane), lo_cnt)
            lo_mass = tl.where(found, _lane_value(pmass, lane, lo_lane), lo_mass)
            lo_seg = tl.where(found, tl.sum(tl.where(lane[:, None] == lo_lane, seg_mass, 0.0), axis=0), lo_seg)
            empty = lo_mass <= 0.0
            have_total = have_total | True
            qn = qn * 0  # the queue was measured: it is decided
            if (~accept) & (~empty):
                # Draw NQ new candidates from {p > lo} with its per-segment masses.
                acc_n, pick, qv, qid, qn = _seg_draw_queue(row, vocab, lo, hi, thr, lo_seg, seed, counter + r * WORDS,
                                                          seg_len, sub_len, NQ, NSEG, NSUB, CW, C3, STAGES)
                result = tl.where(acc_n, pick, result)
                accept = accept | acc_n
            valid = valid | accept
            done = accept | empty
            if RECORD_TIMES:
                if r == 0:
                    tl.store(PASSES + i * 6 + 3, globaltimer())
            r += 1

    if ~done:
        if not VERIFY:
            # Plain sampling's fallback draws from every positive token: it needs their exact mass
            # (no pass may have run).
            cnt, seg_mass, rmax = _seg_pass(row, vocab, seg_len, tl.zeros([NP], dtype=tl.float32), False, False, NP,
                                            NSEG, W, STAGES, UNROLL, True)
            lo_mass = tl.sum(tl.sum(seg_mass, axis=1), axis=0)
        # Exact fallback (as the default path): find tau above lo, then one draw.
        result, valid, kept_above = _exact_draw(row, vocab, lo, lo_mass, total, have_total, k, top_p, min_p,
                                                _uniform(seed, counter + MAX_PASSES * WORDS), USE_TOP_K,
                                                USE_TOP_P, USE_MIN_P, MAX_STEPS, BLOCK, NP_SEARCH)
        # Candidates drawn by the last pass were never measured. They came first in the rejection
        # sequence, so the first of them inside the set is the sample; only when none is does the
        # fresh draw stand (drawing fresh regardless would favour the tokens accepted early).
        pending = (q < qn) & (qv > kept_above)
        head = tl.min(tl.where(pending, q, NQ), axis=0)
        from_queue = head < NQ
        result = tl.where(from_queue, tl.sum(tl.where(q == head, qid, 0), axis=0), result)
        valid = valid | from_queue
    if c == 0:
        if RECORD_TIMES:
            tl.store(PASSES + i * 6, r + search_passes + tl.where(done, 0, 1000))
            tl.store(PASSES + i * 6 + 1, t_start)
            tl.store(PASSES + i * 6 + 4, globaltimer())
            tl.store(PASSES + i * 6 + 5, smid())
        elif RECORD_PASSES:
            tl.store(PASSES + i, r + search_passes + tl.where(done, 0, 1000))
        tl.store(OUT + i, result.to(OUT.dtype.element_ty))
        tl.store(VALID + i, valid.to(VALID.dtype.element_ty))


@triton.jit
def _seg_max_sum(row, vocab, seg_len, inv_temp, NSEG: tl.constexpr, W: tl.constexpr, STAGES: tl.constexpr):
    """One segmented pass over logits ``x * inv_temp``: per-slot online (max, sum of exp), no reduction
    in the loop. Returns ``shift`` (the row max, 0 for a row without a finite logit) and the segments'
    masses ``[NSEG]`` = sum of ``exp(x - shift)`` per segment. NaN counts as -inf."""
    seg = tl.arange(0, NSEG)
    col = tl.arange(0, W)
    base = seg[:, None] * seg_len + col[None, :]
    m_acc = tl.full([NSEG, W], float("-inf"), dtype=tl.float32)
    s_acc = tl.zeros([NSEG, W], dtype=tl.float32)
    for j in tl.range(0, seg_len, W, num_stages=STAGES):
        idx = base + j
        x = tl.load(row + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32) * inv_temp
        x = tl.where(x == x, x, float("-inf"))
        m_new = tl.maximum(m_acc, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_acc = s_acc * tl.exp(m_acc - m_safe) + tl.exp(x - m_safe)
        m_acc = m_new
    seg_max = tl.max(m_acc, axis=1)  # [NSEG]
    seg_safe = tl.where(seg_max == float("-inf"), 0.0, seg_max)
    seg_sum = tl.sum(s_acc * tl.exp(m_acc - seg_safe[:, None]), axis=1)
    row_max = tl.max(seg_max, axis=0)
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    return shift, seg_sum * tl.exp(seg_max - shift)


@direct_launch
@triton.jit
def _seg_softmax_kernel(
    LOGITS, OUT, TEMP, vocab, stride_in, stride_out, seg_len, temp_val,
    TEMP_PER_ROW: tl.constexpr, NSEG: tl.constexpr, W: tl.constexpr, STAGES: tl.constexpr,
):
    """float32 softmax(x / T) per row on segmented passes (``_seg_max_sum``, then a pipelined write
    pass); a row of only -inf/NaN gives zeros."""
    i = tl.program_id(0).to(tl.int64)
    row = LOGITS + i * stride_in
    inv_temp = _inverse_temperature(TEMP, i, temp_val, TEMP_PER_ROW)
    shift, seg_mass = _seg_max_sum(row, vocab, seg_len, inv_temp, NSEG, W, STAGES)
    total = tl.sum(seg_mass, axis=0)
    scale = tl.where(total > 0.0, 1.0 / total, 0.0)
    seg = tl.arange(0, NSEG)
    col = tl.arange(0, W)
    base = seg[:, None] * seg_len + col[None, :]
    for j in tl.range(0, seg_len, W, num_stages=STAGES):
        _store_softmax(row, OUT + i * stride_out, base + j, vocab, inv_temp, shift, scale)


@direct_launch
@triton.jit(do_not_specialize=PER_CALL_INTS)
def _seg_logits_sampling_kernel(
    LOGITS, ROWS, OUT, VALID, SEED, OFFSET,
    vocab, stride_row, seg_len, sub_len, seed_val, offset_val,
    HAS_ROWS: tl.constexpr, SEED_IN_TENSOR: tl.constexpr, SEED_PER_ROW: tl.constexpr, DRAW_STRIDE: tl.constexpr,
    NQ: tl.constexpr, NSEG: tl.constexpr, W: tl.constexpr, NSUB: tl.constexpr, CW: tl.constexpr, C3: tl.constexpr,
    STAGES: tl.constexpr,
):
    """``sampling_from_logits`` on segmented passes: one streaming pass keeps a per-slot online
    (max, sum of exp) (no reduction in the loop); per segment they combine into the segment's mass
    ``sum_s * exp(max_s - max)``, and the draw (``_seg_draw`` with ``exp(x - max)`` on the fly) reads
    1/NSEG of the row more. NaN logits count as -inf; a row without a finite logit is invalid.
    Randomness: the first of the NQ words at counter ``offset_i`` (as the segmented probs sampler)."""
    i = tl.program_id(0)
    row = _input_row(LOGITS, ROWS, i, stride_row, HAS_ROWS)
    seed, counter = _load_seed(i, SEED, OFFSET, seed_val, offset_val, DRAW_STRIDE, SEED_IN_TENSOR, SEED_PER_ROW)
    shift, seg_mass = _seg_max_sum(row, vocab, seg_len, 1.0, NSEG, W, STAGES)
    total = tl.sum(seg_mass, axis=0)
    u = _uniforms(seed, counter, NQ)
    cid = _seg_draw(row, vocab, 0.0, seg_mass, u * total, seg_len, sub_len, shift, NQ, NSEG, NSUB, CW, C3, STAGES,
                    True)
    q = tl.arange(0, NQ)
    cand = tl.sum(tl.where(q == 0, cid, 0), axis=0)
    valid = (total > 0.0) & (cand >= 0)
    tl.store(OUT + i, tl.where(valid, cand, 0).to(OUT.dtype.element_ty))
    tl.store(VALID + i, valid.to(VALID.dtype.element_ty))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _interpreted(t: torch.Tensor) -> bool:
    """Whether ``t``'s kernels run in Triton's interpreter: tensors of a device type without compiled
    kernels (dispatch.KERNEL_DEVICE_TYPES: CUDA; benchmarks/host_time.py --dry adds the CPU)."""
    return t.device.type not in dispatch.KERNEL_DEVICE_TYPES


def _config(vocab: int, interpreted: bool, kind: str = "stream"):
    """(BLOCK, num_warps): tiles of the streaming passes. Under the interpreter, small tiles so that
    tiny test vocabularies still take several blocks."""
    if interpreted:
        return max(16, min(64, next_power_of_2(vocab))), 4
    block = max(128, min(2048 if kind == "stats" else 4096, next_power_of_2(vocab)))
    return block, (16 if block >= 4096 else 8 if block >= 1024 else 4)


def _seed_args(seed, offset):
    """(SEED tensor or dummy, OFFSET tensor or dummy, seed int, offset int, in_tensor, per_row)."""
    if isinstance(seed, torch.Tensor):
        return seed, offset, 0, 0, True, seed.numel() > 1
    return None, None, int(seed), int(offset), False, False


def _param(value, dtype_default):
    if isinstance(value, torch.Tensor):
        return value, 0, True
    return None, value if value is not None else dtype_default, False


def seg_path_enabled() -> bool:
    """Whether the samplers use the segmented kernels: yes unless FLASHTILE_SAMPLING_SEG=0 (read once:
    _core/settings.py; the default since the H100 measurement)."""
    return settings.env("FLASHTILE_SAMPLING_SEG", "1") != "0"


def split_path_enabled() -> bool:
    """Whether small batches may split rows over programs: yes unless FLASHTILE_SAMPLING_SPLIT=0 (read
    once: _core/settings.py)."""
    return settings.env("FLASHTILE_SAMPLING_SPLIT", "1") != "0"


def _split_chunk(interpreted: bool) -> int:
    """Tokens per program of the row split: SPLIT_CHUNK, or 16 under the interpreter (so that test
    vocabularies of 20-40 tokens span 2-3 chunks)."""
    return 16 if interpreted else SPLIT_CHUNK


def _usable_sms(device: torch.device) -> int:
    """SMs this process may run on: the device's, scaled by ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` under MPS
    (where a process may get only part of the SMs while the device reports them all)."""
    sms = num_sms(device)
    mps = settings.env("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "")  # read once (_core/settings.py)
    if mps.replace(".", "", 1).isdigit():
        sms = int(sms * min(float(mps), 100.0) / 100.0)
    return sms


def split_layout(vocab: int, batch: int, device: torch.device, order: str = "joint", top_k=None):
    """``(programs per row, tokens per program)`` that ``filtered_sampling`` gives a batch by default, or
    ``(0, 0)`` for one program per row. On a GPU the chunk is the smallest ``SPLIT_CHUNK * 2^m`` (up to
    SPLIT_MAX_CHUNK) with ``batch * cdiv(vocab, chunk) <= SMs`` (the row barrier needs every program
    resident), provided that leaves at least 2 chunks; failing that, with top-k, the same with SPLIT_PER_SM
    programs per SM. On 132 SMs at vocab 128256: batch 1-4 get 32 programs of 4096 tokens per row, batch 16
    8 of 16384, batch 17-33 4 of 32768, batch 34-66 2 of 65536 (one program per SM), batch 67-132 with
    top-k 2 of 65536 (two per SM), other batches one program per row. ``top_k_first`` never splits. Under
    MPS, ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` scales the SMs counted."""
    if device.type not in dispatch.KERNEL_DEVICE_TYPES or not split_path_enabled() or not seg_path_enabled():
        return 0, 0
    if top_k is not None and order == "top_k_first":
        return 0, 0
    sms = _usable_sms(device)
    for per_sm in sorted({1, max(1, SPLIT_PER_SM) if top_k is not None else 1}):
        chunk = SPLIT_CHUNK
        while batch * cdiv(vocab, chunk) > sms * per_sm and chunk < SPLIT_MAX_CHUNK:
            chunk *= 2
        chunks = cdiv(vocab, chunk)
        if chunks >= 2 and batch * chunks <= sms * per_sm:
            return chunks, chunk
    return 0, 0


def _seg_config(vocab: int, interpreted: bool, *, filtered: bool, count: bool, unroll: int = 1,
                top_p_only: bool = False, wave: bool = False):
    """Launch sizes of the segmented sampler (module constants SEG_*). ``filtered``: some filter (top-k,
    top-p or min-p); ``count``: top-k or top-p (queued candidates are measured: pivot lanes for them);
    ``top_p_only``: top-p without top-k (SEG_PIVOTS_TOP_P lanes); ``wave``: several rows per SM (the
    SEG_WAVE_* tiles, warps and register cap).
    Under the interpreter, tiny tiles so that test vocabularies of 7-41 tokens span several segments,
    sub-segments and scan chunks. ``unroll``: tiles per iteration of ``_seg_pass`` (``seg_len`` a
    multiple of ``W * unroll``)."""
    if interpreted:
        nseg, w, nsub, cw, c3, warps, stages = 4, 2, 2, 2, 4, 4, 1
    else:
        nseg, w, nsub, cw, c3, warps, stages = (SEG_ROWS, SEG_COLS, SEG_SUBS, SEG_SUB_COLS, SEG_SCAN, SEG_WARPS,
                                                SEG_STAGES)
    extra = {}
    if wave and not interpreted:
        w, cw, warps = SEG_WAVE_COLS, SEG_WAVE_SUB_COLS, SEG_WAVE_WARPS
        if SEG_WAVE_MAXNREG:
            extra["maxnreg"] = SEG_WAVE_MAXNREG
    seg_len = cdiv(cdiv(vocab, nseg), w * unroll) * w * unroll
    sub_len = cdiv(cdiv(seg_len, nsub), cw) * cw
    grid = {}  # the kernel's default first-pass grid
    if not filtered:
        nq, nc, np_ = 2, 0, 1  # plain sampling: one draw (two lanes: size-1 tiles spill), always kept
    elif not count:
        nq, nc, np_ = SEG_NQ, 0, SEG_PIVOTS_MIN_P  # min-p: no candidate is queued (judged at once by the threshold)
        assert np_ >= 1 and np_ & (np_ - 1) == 0, "SEG_PIVOTS_MIN_P: a power of 2"
    elif top_p_only:
        nq, nc, np_ = SEG_NQ, SEG_NQ, SEG_PIVOTS_TOP_P
        assert np_ >= nq and np_ & (np_ - 1) == 0, "SEG_PIVOTS_TOP_P: a power of 2 >= SEG_NQ"
        grid = dict(GRID_STEP=SEG_TOP_P_GRID_STEP, GRID_OFF=SEG_TOP_P_GRID_OFF)
    else:
        nq, nc, np_ = SEG_NQ, SEG_NQ, SEG_PIVOTS
        assert np_ >= max(4, nq + 1) and np_ & (np_ - 1) == 0, "SEG_PIVOTS: a power of 2 >= max(4, SEG_NQ + 1)"
    return dict(seg_len=seg_len, sub_len=sub_len, NQ=nq, NC=nc, NP=np_, NSEG=nseg, W=w, NSUB=nsub, CW=cw, C3=c3,
                STAGES=stages, UNROLL=unroll, num_warps=warps, **grid, **extra)


def _seed_key(value):
    """A seed's or offset's part of a launch key: what Triton sees in an int (its width), or a tensor's
    metadata."""
    return argument_key(value) if type(value) is int else tensor_key(value)


# Segmented-sampler launches replayed per key (the API's key of probs, indices and the filter kinds,
# plus the seed/offset kinds and a scalar top_k: see filtered_sampling), with the sizes of the scratch
# tensors each launch allocates: the tensors, the float filter values, seed and offset are all that
# change under one key (seed_val and offset_val are not specialized on their value: PER_CALL_INTS).
_SEG_LAUNCHES = LaunchMemo(dynamic=(*range(12), 18, 19, 20, 21))
_SEG_SCRATCH: dict = {}  # key -> (PART elements or None, COUNTER elements or None)


def filtered_sampling(probs, rows, out, valid, seed, offset, *, top_k=None, top_p=None, min_p=None,
                      order="joint", max_rounds=None, seg=None, passes=None, split=None, launch_key=None):
    """Launch the rejection sampler (no filter: plain sampling). ``top_k``/``top_p``/``min_p``: int/float
    scalars or ``[batch]`` tensors on the device; ``seed``/``offset``: ints or int64 tensors ``[1]``/``[batch]``.
    ``max_rounds``: rejection rounds (segmented path: passes) before the exact fallback, None = the
    default; ``seg``: None = :func:`seg_path_enabled`; ``passes``: an int32 ``[batch]`` tensor that the segmented kernel fills with each
    row's pass count (+1000 where the exact fallback ran), for measurements; an int64 ``[batch, 6]`` tensor
    also gets each row's timeline (``RECORD_TIMES``, benchmarks/sampling_timeline.py). ``split`` (segmented path):
    None = :func:`split_layout` decides; True = split rows into chunks of ``_split_chunk`` tokens, an int =
    into chunks of that many tokens (the partials are exchanged between programs only on a GPU and when
    the grid fits the SMs; otherwise each program measures every chunk, with the same results); False =
    one program per row. ``launch_key``: the caller's key of probs, rows and the filters' kinds and
    metadata (_core/memo.py); with the default options the launch is then replayed for later calls
    with that key and the same seed/offset kinds (and scalar top_k)."""
    batch = out.shape[0]
    if batch == 0:
        return
    memo_key = None
    if launch_key is not None and max_rounds is None and seg is None and passes is None and split is None:
        memo_key = (launch_key, _seed_key(seed), _seed_key(offset), top_k if type(top_k) is int else None)
        replay = _SEG_LAUNCHES.get(memo_key)
        scratch = _SEG_SCRATCH.get(memo_key)
        if replay is not None and scratch is not None:
            part, counter = _seg_scratch(scratch, out)
            tk, _, _ = _param(top_k, 0)
            tp, tp_val, _ = _param(top_p, 1.0)
            mp, mp_val, _ = _param(min_p, 0.0)
            s_t, o_t, s_val, o_val, _, _ = _seed_args(seed, offset)
            replay(probs, out if rows is None else rows, out, valid, out if tk is None else tk,
                   out if tp is None else tp, out if mp is None else mp, out if s_t is None else s_t,
                   out if o_t is None else o_t, out, part, counter, float(tp_val), float(mp_val), s_val, o_val)
            return
    if seg is None:
        seg = seg_path_enabled()
    vocab = probs.shape[-1]
    if seg and split is not False and not (top_k is not None and order == "top_k_first"):
        if split:
            chunk = _split_chunk(_interpreted(probs)) if split is True else int(split)
            nchunks = cdiv(vocab, chunk)
        else:
            nchunks, chunk = split_layout(vocab, batch, probs.device, order, top_k)
        if nchunks:
            _split_sampling(probs, rows, out, valid, seed, offset, nchunks, chunk, top_k=top_k, top_p=top_p,
                            min_p=min_p, max_rounds=max_rounds, passes=passes, memo_key=memo_key)
            return
    if seg:
        # top_k_first keeps the standard configuration: its exact top-k search spills under any register
        # cap (824 B with 4 warps, 724 with 8), and uncapped it is fastest (H100, batch 512 x 32000: 409 us,
        # against 607 with 8 warps capped at 128 and 667 with the 4-warp wave configuration).
        wave = (not _interpreted(probs) and batch >= SEG_WAVE_ROWS * _usable_sms(probs.device)
                and vocab <= SEG_WAVE_MAX_VOCAB and not (top_k is not None and order == "top_k_first"))
        cfg = _seg_config(vocab, _interpreted(probs), filtered=top_k is not None or top_p is not None or min_p is not None,
                          count=top_k is not None or top_p is not None, unroll=SEG_UNROLL,
                          top_p_only=top_p is not None and top_k is None, wave=wave)
        seg_len, sub_len = cfg.pop("seg_len"), cfg.pop("sub_len")
        _launch_seg_sampler((batch,), probs, rows, out, valid, seed, offset, top_k, top_p, min_p, order, max_rounds,
                            passes, seg_len, sub_len, cfg, memo_key=memo_key)
        return
    tk, tk_val, tk_row = _param(top_k, 0)
    tp, tp_val, tp_row = _param(top_p, 1.0)
    mp, mp_val, mp_row = _param(min_p, 0.0)
    s_t, o_t, s_val, o_val, s_in, s_row = _seed_args(seed, offset)
    dummy = out
    block, warps = _config(vocab, _interpreted(probs))
    kernel = _filtered_sampling_kernel
    sizes = dict(MAX_ROUNDS=MAX_ROUNDS if max_rounds is None else max_rounds, NP=NUM_PIVOTS)
    kernel[(batch,)](
        probs, rows if rows is not None else dummy, out, valid,
        tk if tk is not None else dummy, tp if tp is not None else dummy, mp if mp is not None else dummy,
        s_t if s_t is not None else dummy, o_t if o_t is not None else dummy,
        vocab, probs.stride(0), int(tk_val), float(tp_val), float(mp_val), s_val, o_val,
        HAS_ROWS=rows is not None, TOPK_PER_ROW=tk_row, TOPP_PER_ROW=tp_row, MINP_PER_ROW=mp_row,
        SEED_IN_TENSOR=s_in, SEED_PER_ROW=s_row,
        USE_TOP_K=top_k is not None and order != "top_k_first", USE_TOP_P=top_p is not None,
        USE_MIN_P=min_p is not None, TOP_K_FIRST=top_k is not None and order == "top_k_first",
        MAX_STEPS=MAX_SEARCH_STEPS, DRAW_STRIDE=DRAW_STRIDE, BLOCK=block, num_warps=warps, **sizes,
    )


def _seg_scratch(sizes, dummy):
    """The PART (float32, uninitialized) and COUNTER (int32 zeros) tensors of a replayed segmented launch,
    of the recorded ``sizes``; ``dummy`` where the launch had none."""
    part_numel, counter_numel = sizes
    part = dummy if part_numel is None else torch.empty(part_numel, dtype=torch.float32, device=dummy.device)
    counter = dummy if counter_numel is None else torch.zeros(counter_numel, dtype=torch.int32, device=dummy.device)
    return part, counter


def _launch_seg_sampler(grid, probs, rows, out, valid, seed, offset, top_k, top_p, min_p, order, max_rounds, passes,
                        seg_len, sub_len, cfg, part=None, counter=None, nchunks=1, memo_key=None):
    """``_seg_filtered_sampling_kernel[grid]`` with the arguments of ``filtered_sampling`` and the
    launch sizes ``cfg`` (``_seg_config``; with SPLIT also CHUNK, NSEG_IN, EXCHANGE). With
    ``memo_key`` the launch is recorded for filtered_sampling's replays (with its scratch sizes)."""
    vocab = probs.shape[-1]
    tk, tk_val, tk_row = _param(top_k, 0)
    tp, tp_val, tp_row = _param(top_p, 1.0)
    mp, mp_val, mp_row = _param(min_p, 0.0)
    s_t, o_t, s_val, o_val, s_in, s_row = _seed_args(seed, offset)
    dummy = out
    args = (
        probs, rows if rows is not None else dummy, out, valid,
        tk if tk is not None else dummy, tp if tp is not None else dummy, mp if mp is not None else dummy,
        s_t if s_t is not None else dummy, o_t if o_t is not None else dummy, passes if passes is not None else dummy,
        part if part is not None else dummy, counter if counter is not None else dummy,
        vocab, probs.stride(0), seg_len, sub_len, nchunks, int(tk_val), float(tp_val), float(mp_val), s_val, o_val,
    )
    kwargs = dict(
        HAS_ROWS=rows is not None, TOPK_PER_ROW=tk_row, TOPP_PER_ROW=tp_row, MINP_PER_ROW=mp_row,
        SEED_IN_TENSOR=s_in, SEED_PER_ROW=s_row,
        USE_TOP_K=top_k is not None and order != "top_k_first", USE_TOP_P=top_p is not None,
        USE_MIN_P=min_p is not None, TOP_K_FIRST=top_k is not None and order == "top_k_first",
        MAX_PASSES=SEG_MAX_PASSES if max_rounds is None else max_rounds, MAX_STEPS=MAX_SEARCH_STEPS,
        DRAW_STRIDE=DRAW_STRIDE, BLOCK=16 if _interpreted(probs) else SEG_FALLBACK_BLOCK, NP_SEARCH=NUM_PIVOTS,
        RECORD_PASSES=passes is not None, RECORD_TIMES=passes is not None and passes.dim() == 2, **cfg,
    )
    if memo_key is None:
        _seg_filtered_sampling_kernel[grid](*args, **kwargs)
        return
    if len(_SEG_SCRATCH) >= MAX_CACHED_CALLS:
        _SEG_SCRATCH.clear()
    _SEG_SCRATCH[memo_key] = (None if part is None else part.numel(), None if counter is None else counter.numel())
    _SEG_LAUNCHES.launch(memo_key, _seg_filtered_sampling_kernel, grid, args, kwargs)


def _split_sampling(probs, rows, out, valid, seed, offset, nchunks, chunk, *, top_k, top_p, min_p, max_rounds,
                    passes, memo_key=None):
    """The segmented sampler with each row split over ``nchunks`` programs of ``chunk`` tokens (grid
    ``(batch, nchunks)``)."""
    batch, vocab = out.shape[0], probs.shape[-1]
    interpreted = _interpreted(probs)
    cfg = _seg_config(vocab, interpreted, filtered=top_k is not None or top_p is not None or min_p is not None,
                      count=top_k is not None or top_p is not None, unroll=SEG_UNROLL,
                      top_p_only=top_p is not None and top_k is None)
    cfg.pop("seg_len"), cfg.pop("sub_len")
    nseg_in = floor_power_of_2(min(cfg["NSEG"], chunk // (cfg["W"] * cfg["UNROLL"])))  # a chunk's own pass
    if chunk % (nseg_in * cfg["W"] * cfg["UNROLL"]) or chunk % cfg["CW"]:
        raise ValueError(f"SPLIT_CHUNK: expected a multiple of SEG_ROWS * SEG_COLS * SEG_UNROLL "
                         f"({nseg_in * cfg['W'] * cfg['UNROLL']}) and of SEG_SUB_COLS, got {chunk}")
    # Published segments per chunk: at most SPLIT_SEG tokens each (a draw reads one per candidate).
    nseg_pub = min(nseg_in, floor_power_of_2(chunk // (SPLIT_SEG_INTERPRETED if interpreted else SPLIT_SEG)))
    if top_k is not None or top_p is not None:
        cfg.update(NQ=SPLIT_NQ, NC=SPLIT_NQ, NP=SPLIT_PIVOTS, GRID_STEP=1, GRID_OFF=3)
        need = SPLIT_NQ + (1 if top_k is not None else 0)
        if SPLIT_PIVOTS < need or SPLIT_PIVOTS & (SPLIT_PIVOTS - 1):
            raise ValueError(f"SPLIT_PIVOTS: expected a power of 2 >= {need} (SPLIT_NQ = {SPLIT_NQ}), got {SPLIT_PIVOTS}")
    elif min_p is not None:
        cfg.update(NQ=SPLIT_NQ)
    nch = next_power_of_2(nchunks)
    nseg = nch * nseg_pub
    seg_len = chunk // nseg_pub
    sub_len = cdiv(cdiv(seg_len, cfg["NSUB"]), cfg["CW"]) * cfg["CW"]
    sms = 0 if interpreted else _usable_sms(probs.device)
    per_sm = 1 if batch * nchunks <= sms else max(1, SPLIT_PER_SM)
    exchange = SPLIT_EXCHANGE and not interpreted and batch * nchunks <= sms * per_sm
    cfg.update(NSEG=nseg, NSEG_IN=nseg_in, NSEG_PUB=nseg_pub, CHUNK=chunk, SPLIT=True, EXCHANGE=exchange)
    if not interpreted:
        cfg["num_warps"] = SPLIT_WARPS
        if exchange and per_sm > 1:
            # Registers per thread so that per_sm programs fit an SM's 64K registers (allocation is per
            # warp in units of 256, hence a multiple of 8 per thread).
            cfg["maxnreg"] = min(255, (65536 // (per_sm * SPLIT_WARPS * 32)) // 8 * 8)
    part = torch.empty(batch * 2 * (cfg["NP"] * nseg + (cfg["NP"] + 1) * nch) if exchange else 1,
                       dtype=torch.float32, device=probs.device)
    counter = torch.zeros(batch if exchange else 1, dtype=torch.int32, device=probs.device)
    _launch_seg_sampler((batch, nchunks), probs, rows, out, valid, seed, offset, top_k, top_p, min_p, "joint",
                        max_rounds, passes, seg_len, sub_len, cfg, part, counter, nchunks, memo_key=memo_key)


def sampling_from_logits(logits, rows, out, valid, seed, offset, *, seg=None):
    """``seg``: None = :func:`seg_path_enabled` (the segmented one-pass kernel)."""
    batch = out.shape[0]
    if batch == 0:
        return
    vocab = logits.shape[-1]
    if seg is None:
        seg = seg_path_enabled()
    s_t, o_t, s_val, o_val, s_in, s_row = _seed_args(seed, offset)
    if seg:
        cfg = _seg_config(vocab, _interpreted(logits), filtered=False, count=False)
        _seg_logits_sampling_kernel[(batch,)](
            logits, rows if rows is not None else out, out, valid,
            s_t if s_t is not None else out, o_t if o_t is not None else out,
            vocab, logits.stride(0), cfg["seg_len"], cfg["sub_len"], s_val, o_val,
            HAS_ROWS=rows is not None, SEED_IN_TENSOR=s_in, SEED_PER_ROW=s_row, DRAW_STRIDE=DRAW_STRIDE,
            NQ=cfg["NQ"], NSEG=cfg["NSEG"], W=cfg["W"], NSUB=cfg["NSUB"], CW=cfg["CW"], C3=cfg["C3"],
            STAGES=cfg["STAGES"], num_warps=cfg["num_warps"],
        )
        return
    block, warps = _config(vocab, _interpreted(logits))
    _logits_sampling_kernel[(batch,)](
        logits, rows if rows is not None else out, out, valid,
        s_t if s_t is not None else out, o_t if o_t is not None else out,
        vocab, logits.stride(0), s_val, o_val,
        HAS_ROWS=rows is not None, SEED_IN_TENSOR=s_in, SEED_PER_ROW=s_row, DRAW_STRIDE=DRAW_STRIDE,
        BLOCK=block, num_warps=warps,
    )


def softmax(logits, out, temperature, *, seg=None):
    """``seg``: None = :func:`seg_path_enabled` (segmented passes)."""
    batch, vocab = logits.shape
    if batch == 0:
        return
    t, t_val, t_row = _param(temperature, 1.0)
    if seg is None:
        seg = seg_path_enabled()
    if seg:
        cfg = _seg_config(vocab, _interpreted(logits), filtered=False, count=False)
        _seg_softmax_kernel[(batch,)](
            logits, out, t if t is not None else out, vocab, logits.stride(0), out.stride(0), cfg["seg_len"],
            float(t_val), TEMP_PER_ROW=t_row, NSEG=cfg["NSEG"], W=cfg["W"], STAGES=cfg["STAGES"],
            num_warps=cfg["num_warps"],
        )
        return
    block, warps = _config(vocab, _interpreted(logits))
    _softmax_kernel[(batch,)](
        logits, out, t if t is not None else out, vocab, logits.stride(0), out.stride(0), float(t_val),
        TEMP_PER_ROW=t_row, BLOCK=block, num_warps=warps,
    )


def threshold_filter(x, out, *, top_k=None, top_p=None, is_logits=False):
    batch, vocab = x.shape
    if batch == 0:
        return
    block, warps = _config(vocab, _interpreted(x), "stats")
    tk, tk_val, tk_row = _param(top_k, 0)
    tp, tp_val, tp_row = _param(top_p, 1.0)
    _threshold_kernel[(batch,)](
        x, out, tk if tk is not None else out, tp if tp is not None else out,
        vocab, x.stride(0), out.stride(0), int(tk_val), float(tp_val),
        TOPK_PER_ROW=tk_row, TOPP_PER_ROW=tp_row, USE_TOP_K=top_k is not None, USE_TOP_P=top_p is not None,
        IS_LOGITS=is_logits, MAX_STEPS=MAX_SEARCH_STEPS, BLOCK=block, NP=NUM_PIVOTS, num_warps=warps,
    )


def chain_speculative_sampling(draft_probs, draft_token_ids, target_probs, out, accepted, emitted, seed, offset):
    batch, n, vocab = draft_probs.shape
    if batch == 0:
        return
    block, warps = _config(vocab, _interpreted(target_probs))
    s_t, o_t, s_val, o_val, s_in, s_row = _seed_args(seed, offset)
    _chain_speculative_kernel[(batch,)](
        draft_probs, draft_token_ids, target_probs, out, accepted, emitted,
        s_t if s_t is not None else out, o_t if o_t is not None else out,
        n, vocab, draft_probs.stride(0), draft_probs.stride(1), draft_token_ids.stride(0),
        target_probs.stride(0), target_probs.stride(1), out.stride(0), s_val, o_val,
        SEED_IN_TENSOR=s_in, SEED_PER_ROW=s_row, BLOCK=block, num_warps=warps,
    )
