"""The exact threshold search and the exact draw: the fallback that bounds every sampler's passes,
and the core of the renorm/mask kernels (renorm.py).

Search (``exact_search``): keep ``lo < tau <= hi`` with ``lo`` not kept, ``hi`` kept and a value of
the row, and ``a`` the smallest value above ``lo``; one pass evaluates NUM_PIVOTS pivots spread over
``[a, hi]`` and moves the ends to the nearest row values around the pivots, shrinking the interval
about 4x, until ``a == hi``; then ``tau = hi`` (filter predicate: common.py).

Float32 prefix sums are not monotone: an inverse-CDF draw only lands on a token with ``p > low``, and
when the running sum never exceeds the target it takes the last such token. NaN and negative entries
count as 0; a row without positive mass gives token 0 and ``valid = False``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import kept_by_filters


@triton.jit
def _inverse_cdf(row, vocab, low, target, BLOCK: tl.constexpr):
    """First index where the running sum of ``p`` exceeds ``target``, over tokens with ``p > low``,
    scanning blocks until the one holding the hit. Returns (index or -1, found, last index with
    ``p > low`` seen (-1 if none)).
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
        go = (start < vocab) & (first == 2147483647)
    return t, found, last


@triton.jit
def row_stats(row, vocab, piv, NEED_MASS: tl.constexpr, NEED_BOUNDS: tl.constexpr, BLOCK: tl.constexpr,
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
def exact_search(row, vocab, lo, a, hi, mass_lo, k, p_mass, USE_TOP_K: tl.constexpr, USE_TOP_P: tl.constexpr,
                 NEED_MASS: tl.constexpr, MAX_STEPS: tl.constexpr, BLOCK: tl.constexpr, NP: tl.constexpr):
    """Exact threshold search (module doc). In: ``lo`` not kept, ``hi`` kept, ``a`` the
    smallest value > lo, ``mass_lo = mass(lo)``. Out: (lo, tau, mass(lo)) with no value in (lo, tau)."""
    lane = tl.arange(0, NP)
    frac = lane.to(tl.float32) / NP
    step = 0
    while (a < hi) & (step < MAX_STEPS):
        piv = a * (1.0 - frac) + hi * frac  # piv[0] = a, a row value
        cnt, mass, min_gt, max_le, rmax = row_stats(row, vocab, piv, NEED_MASS, True, BLOCK, NP)
        kept = kept_by_filters(cnt, mass, piv, k, p_mass, 0.0, USE_TOP_K, USE_TOP_P, False)
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
def filter_bound(row, vocab, low, cnt, mass, smallest, row_max, k, p_mass, USE_TOP_K: tl.constexpr,
                 USE_TOP_P: tl.constexpr, NEED_MASS: tl.constexpr, MAX_STEPS: tl.constexpr, BLOCK: tl.constexpr,
                 NP: tl.constexpr):
    """The top-k/top-p set as ``{p > bound}``, given the count, mass and smallest value above ``low``
    (``low`` below every kept value): ``low`` itself when its value passes the filter, else the exact
    search from it. Returns (bound, mass above bound)."""
    if kept_by_filters(cnt, mass, low, k, p_mass, 0.0, USE_TOP_K, USE_TOP_P, False):
        bound = low
        kept_mass = mass
    else:
        bound, tau, kept_mass = exact_search(row, vocab, low, smallest, row_max, mass, k, p_mass, USE_TOP_K,
                                             USE_TOP_P, NEED_MASS, MAX_STEPS, BLOCK, NP)
    return bound, kept_mass


@triton.jit
def exact_draw(row, vocab, low, mass, total, have_total, k, top_p, min_p, u, USE_TOP_K: tl.constexpr,
               USE_TOP_P: tl.constexpr, USE_MIN_P: tl.constexpr, MAX_STEPS: tl.constexpr, BLOCK: tl.constexpr,
               NP: tl.constexpr):
    """The bounded-pass fallback of the samplers: find the filter set {p >= tau} exactly (``exact_search``
    from ``low``, below every kept value), then one inverse-CDF draw from it with uniform ``u``.
    ``mass``: mass of {p > low} (used without a filter); ``total``: the top-p reference mass when
    ``have_total``. Returns (token, valid, bound): the drawn set is {p > bound} (also the filter set
    when a filter is on)."""
    VERIFY: tl.constexpr = USE_TOP_K or USE_TOP_P or USE_MIN_P
    if VERIFY:
        start_piv = tl.zeros([NP], dtype=tl.float32) + low
        cnt_l, mass_l, min_l, max_l, rmax = row_stats(row, vocab, start_piv, True, True, BLOCK, NP)
        c_l = tl.max(cnt_l, axis=0)
        m_l = tl.max(mass_l, axis=0)
        total = tl.where(have_total, total, m_l)  # not have_total: no pass ran, low == 0
        a_l = tl.min(min_l, axis=0)
        if USE_MIN_P:
            thr = min_p * rmax
            lo_f = tl.where(thr > 0, (thr.to(tl.int32, bitcast=True) - 1).to(tl.float32, bitcast=True), 0.0)
            lo_f = tl.maximum(lo_f, low)
            cnt_f, mass_f, min_f, max_f, rmax_f = row_stats(row, vocab, tl.zeros([NP], dtype=tl.float32) + lo_f, True,
                                                            False, BLOCK, NP)
            m_f = tl.max(mass_f, axis=0)
        else:
            lo_f, m_f = filter_bound(row, vocab, low, c_l, m_l, a_l, rmax, k, top_p * total, USE_TOP_K, USE_TOP_P,
                                     True, MAX_STEPS, BLOCK, NP)
    else:
        lo_f = low
        m_f = mass
    t, found, last = _inverse_cdf(row, vocab, lo_f, u * m_f, BLOCK)
    cand = tl.where(found, t, last)
    valid = (cand >= 0) & (m_f > 0.0)
    result = tl.where(valid, cand, 0)
    return result, valid, lo_f
