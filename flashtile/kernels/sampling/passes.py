"""Segmented passes and draws: the building blocks of the samplers in filtered.py and logits.py.

A pass has no block-wide reduction inside its streaming loop. The row is cut into NSEG contiguous
segments of ``seg_len`` tokens; an iteration loads the tile [NSEG, W] (W contiguous tokens of every
segment; UNROLL such tiles per iteration) and only does elementwise work into per-thread accumulators
[.., NSEG, W]; the loop is a ``tl.range(..., num_stages=STAGES)`` so that Triton keeps STAGES - 1 tiles
of loads in flight; everything is reduced once after the loop.

A pass measures count and mass above NP pivots *per segment*. Whatever pivot becomes the sampler's new
``lo``, its per-segment masses are the CDF of the candidate set ``{p > lo}`` at segment granularity, so
NQ candidates are drawn right after the pass without another full pass (``seg_draw``): a prefix over
the NSEG segment masses picks each draw's segment (level 1), one pipelined sweep over the picked
segments computes NSUB sub-segment masses per draw (level 2, 1/NSEG of the row per draw), and a short
blocked scan of the picked sub-segment ends the draw (level 3).

Row split (``split_pass``): the programs of one row each measure a chunk and exchange their partials
through global memory and a per-row barrier, so that every program holds the whole row's results.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import uniforms


@triton.jit
def seg_pass(row, vocab, seg_len, piv, COUNT: tl.constexpr, MAX: tl.constexpr, NP: tl.constexpr,
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
    """``seg_pass`` over chunk ``ch`` (tokens ``[ch * CHUNK, (ch + 1) * CHUNK)``, NSEG_IN segments):
    count ``[NP]`` (int32), mass ``[NP, NSEG_PUB]`` (per run of NSEG_IN / NSEG_PUB consecutive segments:
    the chunk's published segments) and max of the chunk."""
    start = ch * CHUNK
    cnt, seg_mass, cmax = seg_pass(row + start, vocab - start, CHUNK // NSEG_IN, piv, COUNT, MAX, NP, NSEG_IN, W,
                                   STAGES, UNROLL, ZERO_PIVOTS)
    pub = tl.sum(tl.reshape(seg_mass, [NP, NSEG_PUB, NSEG_IN // NSEG_PUB]), axis=2)
    return cnt, pub, cmax


@triton.jit
def split_pass(row, vocab, c, nchunks, r, PART, COUNTER, piv, COUNT: tl.constexpr, MAX: tl.constexpr,
               NP: tl.constexpr, NSEG: tl.constexpr, NSEG_IN: tl.constexpr, NSEG_PUB: tl.constexpr,
               CHUNK: tl.constexpr, W: tl.constexpr, STAGES: tl.constexpr, UNROLL: tl.constexpr,
               ZERO_PIVOTS: tl.constexpr, EXCHANGE: tl.constexpr):
    """Pass ``r`` of a row split into ``nchunks`` chunks of NSEG_PUB published segments each: the
    ``seg_pass`` results with the published segments as the row's segments (cnt ``[NP]`` of the row,
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
def seg_draw(row, vocab, lo, seg_mass, targets, seg_len, sub_len, shift, NQ: tl.constexpr, NSEG: tl.constexpr,
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
def seg_draw_queue(row, vocab, lo, hi, thr, lo_seg, seed, counter, seg_len, sub_len, NQ: tl.constexpr,
                   NSEG: tl.constexpr, NSUB: tl.constexpr, CW: tl.constexpr, C3: tl.constexpr, STAGES: tl.constexpr):
    """Draw NQ candidates from {p > lo} (per-segment masses ``lo_seg``; Philox words at ``counter``) and
    judge them in draw order: the first one not rejected (``p >= thr``) is accepted when known kept
    (``p >= hi``). Returns (accepted, its id, queue values ``[NQ]``, queue ids ``[NQ]``, queue length):
    the queue holds the candidates not rejected, in draw order, for the next pass to measure (empty
    when one was accepted)."""
    q = tl.arange(0, NQ)
    u = uniforms(seed, counter, NQ)
    cid = seg_draw(row, vocab, lo, lo_seg, u * tl.sum(lo_seg, axis=0), seg_len, sub_len, 0.0, NQ, NSEG, NSUB, CW, C3,
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
def seg_pivots(first, qv, qn, lo, lo_cnt, lo_mass, hi, hi_cnt, hi_mass, k, p_mass, thr, vocab,
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
def lane_value(v, lane, j):
    """``v[j]`` of a per-lane vector ``v`` (float or int)."""
    return tl.sum(tl.where(lane == j, v, 0), axis=0)


@triton.jit
def seg_top_k_set(row, vocab, seg_len, k, NP: tl.constexpr, NSEG: tl.constexpr, W: tl.constexpr,
                  STAGES: tl.constexpr, MAX_STEPS: tl.constexpr, UNROLL: tl.constexpr):
    """The exact top-k set for ``filter_apply_order="top_k_first"`` on segmented passes: returns
    ``(lo, row_max, seg_mass)`` with the set = the values above ``lo`` (every positive value
    when the row has at most k of them) and ``seg_mass [NSEG]`` its mass per segment (so the first
    candidates are drawn without another pass).

    Pass 0 measures ``cnt`` at 0 and at ``2^(2j-1) / vocab``; then each pass measures NP pivots in
    ``[a, hi]`` (``lo < tau <= hi``, ``cnt(lo) >= k``, ``cnt(hi) < k``, ``a`` the smallest value above
    ``lo``, ``hi`` a row value): lane 0 at ``a``, the others around the point where ``log(cnt)``
    interpolated between the ends reaches k (log-count targets ``k * rho^t``, ``|t| <= 1``). The
    nearest row values around each pivot (per-slot min/max accumulators) move ``a`` and ``hi``; the
    search ends when ``a == hi`` (= tau). UNROLL tiles per iteration, as ``seg_pass``.
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
        lo_cnt = tl.where(moved, lane_value(cnt, lane, b_lane), lo_cnt)
        a = tl.where(moved, lane_value(tl.where(lane == b_lane, min_gt, 0.0), lane, b_lane), a)
        hb = tl.min(tl.where(kept, piv, float("inf")), axis=0)
        h_lane = tl.min(tl.where(kept & (piv == hb), lane, NP), axis=0)
        has_kept = h_lane < NP
        new_hi = lane_value(tl.where(lane == h_lane, max_le, 0.0), lane, h_lane)
        hi_cnt = tl.where(has_kept & (new_hi < hi), lane_value(cnt, lane, h_lane), hi_cnt)
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
    return lo, row_max, lo_seg



@triton.jit
def seg_max_sum(row, vocab, seg_len, inv_temp, NSEG: tl.constexpr, W: tl.constexpr, STAGES: tl.constexpr):
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

