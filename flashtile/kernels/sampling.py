"""Sampling without sorting: Triton kernels and their launchers (one program per output row).

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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NUM_PIVOTS = 4  # pivots evaluated per pass of the threshold search
MAX_ROUNDS = 32  # rejection rounds before the exact search
MAX_SEARCH_STEPS = 48  # passes of the exact search (each shrinks the interval about 4x)
DRAW_STRIDE = 64  # Philox counters reserved per row (>= MAX_ROUNDS + 1)


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


@triton.jit
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
    if HAS_ROWS:
        src = tl.load(ROWS + i).to(tl.int64)
    else:
        src = i.to(tl.int64)
    row = PROBS + src * stride_row
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
        cnt0, mass0, min0, max0, row_max = _row_stats(row, vocab, tl.zeros([NP], dtype=tl.float32), True, True,
                                                   BLOCK, NP)
        c0 = tl.max(cnt0, axis=0)
        m0 = tl.max(mass0, axis=0)
        a0 = tl.min(min0, axis=0)
        if c0 >= k:
            low, tau_k, mass = _search(row, vocab, low, a0, row_max, m0, k, 0.0, True, False, True, MAX_STEPS, BLOCK,
                                       NP)
        else:
            mass = m0
        exact = exact | True
        total = mass
        have_total = exact
        high = row_max

    result = tl.full([], 0, dtype=tl.int32)
    valid = exact & False
    done = exact & False
    r = 0
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
                kept_l = _keep(c_l, m_l, low, k, top_p * total, 0.0, USE_TOP_K, USE_TOP_P, False)
                if kept_l:
                    lo_f = low
                    m_f = m_l
                else:
                    lo_f, tau_f, m_f = _search(row, vocab, low, a_l, rmax, m_l, k, top_p * total, USE_TOP_K, USE_TOP_P,
                                               True, MAX_STEPS, BLOCK, NP)
        else:
            lo_f = low
            m_f = mass
        u = _uniform(seed, counter + MAX_ROUNDS)
        t, found, last, scanned = _inverse_cdf(row, vocab, lo_f, u * m_f, 0.0, False, False, BLOCK)
        cand = tl.where(found, t, last)
        valid = (cand >= 0) & (m_f > 0.0)
        result = tl.where(valid, cand, 0)

    tl.store(OUT + i, result.to(OUT.dtype.element_ty))
    tl.store(VALID + i, valid.to(VALID.dtype.element_ty))


@triton.jit
def _logits_sampling_kernel(
    LOGITS, ROWS, OUT, VALID, SEED, OFFSET,
    vocab, stride_row, seed_val, offset_val,
    HAS_ROWS: tl.constexpr, SEED_IN_TENSOR: tl.constexpr, SEED_PER_ROW: tl.constexpr,
    DRAW_STRIDE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Sample from softmax(logits): an online max/sum pass, then an inverse-CDF pass over
    ``exp(x - max)`` that stops at the drawn block. NaN logits count as -inf."""
    i = tl.program_id(0)
    if HAS_ROWS:
        src = tl.load(ROWS + i).to(tl.int64)
    else:
        src = i.to(tl.int64)
    row = LOGITS + src * stride_row
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


@triton.jit
def _softmax_kernel(
    LOGITS, OUT, TEMP, vocab, stride_in, stride_out, temp_val,
    TEMP_PER_ROW: tl.constexpr, BLOCK: tl.constexpr,
):
    """float32 softmax(x / T) per row; a row of only -inf/NaN gives zeros."""
    i = tl.program_id(0).to(tl.int64)
    row = LOGITS + i * stride_in
    if TEMP_PER_ROW:
        inv_temp = 1.0 / tl.load(TEMP + i).to(tl.float32)
    else:
        inv_temp = 1.0 / temp_val
    m, s = _online_max_sum(row, vocab, inv_temp, BLOCK)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    scale = tl.where(s > 0.0, 1.0 / s, 0.0)
    offs = tl.arange(0, BLOCK)
    for start in range(0, vocab, BLOCK):
        idx = start + offs
        x = tl.load(row + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32) * inv_temp
        e = tl.where(x == x, tl.exp(x - m_safe), 0.0) * scale
        tl.store(OUT + i * stride_out + idx, e, mask=idx < vocab)


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
    kept0 = _keep(c0, m0, lo, k, top_p * total, 0.0, USE_TOP_K, USE_TOP_P, False)
    if kept0:
        tau_lo = lo
        kept_mass = m0
    else:
        tau_lo, tau, kept_mass = _search(row, vocab, lo, a0, row_max, m0, k, top_p * total, USE_TOP_K, USE_TOP_P,
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


@triton.jit
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
# Launchers
# ---------------------------------------------------------------------------------------------


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def _config(vocab: int, interpreted: bool, kind: str = "stream"):
    """(BLOCK, num_warps): tiles of the streaming passes. Under the interpreter, small tiles so that
    tiny test vocabularies still take several blocks."""
    if interpreted:
        return max(16, min(64, triton.next_power_of_2(vocab))), 4
    block = max(128, min(2048 if kind == "stats" else 4096, triton.next_power_of_2(vocab)))
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


def filtered_sampling(probs, rows, out, valid, seed, offset, *, top_k=None, top_p=None, min_p=None,
                      order="joint", max_rounds: int = MAX_ROUNDS):
    """Launch the rejection sampler (no filter: plain sampling). ``top_k``/``top_p``/``min_p``: int/float
    scalars or ``[batch]`` tensors on the device; ``seed``/``offset``: ints or int64 tensors ``[1]``/``[batch]``."""
    batch = out.shape[0]
    if batch == 0:
        return
    vocab = probs.shape[-1]
    block, warps = _config(vocab, _interpreted(probs))
    tk, tk_val, tk_row = _param(top_k, 0)
    tp, tp_val, tp_row = _param(top_p, 1.0)
    mp, mp_val, mp_row = _param(min_p, 0.0)
    s_t, o_t, s_val, o_val, s_in, s_row = _seed_args(seed, offset)
    dummy = out
    _filtered_sampling_kernel[(batch,)](
        probs, rows if rows is not None else dummy, out, valid,
        tk if tk is not None else dummy, tp if tp is not None else dummy, mp if mp is not None else dummy,
        s_t if s_t is not None else dummy, o_t if o_t is not None else dummy,
        vocab, probs.stride(0), int(tk_val), float(tp_val), float(mp_val), s_val, o_val,
        HAS_ROWS=rows is not None, TOPK_PER_ROW=tk_row, TOPP_PER_ROW=tp_row, MINP_PER_ROW=mp_row,
        SEED_IN_TENSOR=s_in, SEED_PER_ROW=s_row,
        USE_TOP_K=top_k is not None and order != "top_k_first", USE_TOP_P=top_p is not None,
        USE_MIN_P=min_p is not None, TOP_K_FIRST=top_k is not None and order == "top_k_first",
        MAX_ROUNDS=max_rounds, MAX_STEPS=MAX_SEARCH_STEPS, DRAW_STRIDE=DRAW_STRIDE,
        BLOCK=block, NP=NUM_PIVOTS, num_warps=warps,
    )


def sampling_from_logits(logits, rows, out, valid, seed, offset):
    batch = out.shape[0]
    if batch == 0:
        return
    vocab = logits.shape[-1]
    block, warps = _config(vocab, _interpreted(logits))
    s_t, o_t, s_val, o_val, s_in, s_row = _seed_args(seed, offset)
    _logits_sampling_kernel[(batch,)](
        logits, rows if rows is not None else out, out, valid,
        s_t if s_t is not None else out, o_t if o_t is not None else out,
        vocab, logits.stride(0), s_val, o_val,
        HAS_ROWS=rows is not None, SEED_IN_TENSOR=s_in, SEED_PER_ROW=s_row, DRAW_STRIDE=DRAW_STRIDE,
        BLOCK=block, num_warps=warps,
    )


def softmax(logits, out, temperature):
    batch, vocab = logits.shape
    if batch == 0:
        return
    block, warps = _config(vocab, _interpreted(logits))
    t, t_val, t_row = _param(temperature, 1.0)
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
