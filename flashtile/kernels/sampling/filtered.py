"""Top-k, top-p, min-p and plain sampling from probabilities without sorting: the segmented sampler
(``_seg_filtered_sampling_kernel``) and its launcher ``filtered_sampling``.

The sampler is rejection sampling with several proposals per pass. The candidate set is ``{p > lo}``
(at first every positive token); ``lo`` only grows and stays below every kept value, so the filter set
always lies inside it. A pass (passes.py) measures count and mass above NP pivots per segment of the
row: lanes for the queued candidates and search lanes that bracket the threshold (``lo < tau <= hi``).
After a pass the queue is decided: the first queued candidate (in draw order) that is kept is the
sample; otherwise ``lo`` moves up to the largest rejected pivot, and NQ new candidates are drawn from
the smaller set at once, from the per-segment masses the pass left (no extra full pass). A new
candidate at or above ``hi`` (a value known to be kept) is accepted without being measured, and one
below the min-p threshold (known from the row max after the first pass) is rejected at once. The
accepted token is thus the first filter-set member of a sequence of draws from supersets of the
filter set: exactly the renormalized filter-set distribution.

After MAX_PASSES passes the exact fallback (exact.py) finds the set and draws once from it; candidates
queued by the last pass, never measured, came first in the sequence, so the first of them inside the
set is taken before the fresh draw. ``top_k_first`` finds the top-k set exactly first
(``seg_top_k_set``) and runs the same loop inside it with top-p measured against the set's mass.

Launch layouts (config.py): one program per row; at batches of several rows per SM a smaller-register
configuration so that all rows run in one wave; at small batches each row is split over several
programs that exchange their pass results through a per-row barrier and then run the same decisions.
With a ``launch_key`` the whole launch is remembered and later calls with that key are replayed.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..._core.buffers import zeroed_int32
from ..._core.launch import MAX_CACHED_CALLS, LaunchMemo, direct_launch
from . import config
from .common import (
    DRAW_STRIDE,
    MAX_SEARCH_STEPS,
    NUM_PIVOTS,
    PER_CALL_INTS,
    input_row,
    interpreted,
    kept_by_filters,
    load_params,
    load_seed,
    param_args,
    seed_args,
    seed_key,
    uniform,
)
from .exact import exact_draw
from .passes import lane_value, seg_draw_queue, seg_pass, seg_pivots, seg_top_k_set, split_pass


@direct_launch
@triton.jit(do_not_specialize=PER_CALL_INTS)
def _seg_filtered_sampling_kernel(
    PROBS, ROWS, OUT, VALID, TOP_K, TOP_P, MIN_P, SEED, OFFSET, PART, COUNTER,
    vocab, stride_row, seg_len, sub_len, nchunks,
    top_k_val, top_p_val, min_p_val, seed_val, offset_val,
    HAS_ROWS: tl.constexpr, TOPK_PER_ROW: tl.constexpr, TOPP_PER_ROW: tl.constexpr, MINP_PER_ROW: tl.constexpr,
    SEED_IN_TENSOR: tl.constexpr, SEED_PER_ROW: tl.constexpr,
    USE_TOP_K: tl.constexpr, USE_TOP_P: tl.constexpr, USE_MIN_P: tl.constexpr, TOP_K_FIRST: tl.constexpr,
    MAX_PASSES: tl.constexpr, MAX_STEPS: tl.constexpr, DRAW_STRIDE: tl.constexpr,
    NQ: tl.constexpr, NP: tl.constexpr, NSEG: tl.constexpr, W: tl.constexpr,
    NSUB: tl.constexpr, CW: tl.constexpr, C3: tl.constexpr, STAGES: tl.constexpr, UNROLL: tl.constexpr,
    BLOCK: tl.constexpr, NP_SEARCH: tl.constexpr,
    SPLIT: tl.constexpr = False, EXCHANGE: tl.constexpr = False, CHUNK: tl.constexpr = 1,
    NSEG_IN: tl.constexpr = 1, NSEG_PUB: tl.constexpr = 1, GRID_STEP: tl.constexpr = 2, GRID_OFF: tl.constexpr = 1,
):
    """Top-k / top-p / min-p sampling (all USE_* False: plain sampling), one output row per program (module
    doc). Pointers and per-row parameters as common.py; ``seg_len`` and ``sub_len``: tokens per segment
    and sub-segment (multiples of W * UNROLL and CW); the size constexprs as ``config.seg_config``.
    TOP_K_FIRST: the exact top-k set first, then top-p inside it (USE_TOP_K is then False). MAX_PASSES
    bounds the passes before the exact fallback (``exact_draw``, with blocks of BLOCK and NP_SEARCH
    pivots and at most MAX_STEPS search passes). GRID_STEP, GRID_OFF: the first pass's pivot grid
    (``seg_pivots``).

    SPLIT (row split, grid ``(batch, nchunks)``): program ``(i, c)`` owns chunk ``c`` of row i (CHUNK
    tokens, NSEG_IN segments of its own ``seg_pass``, published as NSEG_PUB segments); the segments of
    the algorithm are the published ones (``seg_len`` = CHUNK / NSEG_PUB, NSEG = NSEG_PUB x a power of 2
    >= nchunks), and a pass is ``split_pass`` (EXCHANGE: partials in ``PART``, ``[batch, 2, SLOT]``
    float32, and a barrier on ``COUNTER[i]``, int32 zeros). Every program of a row then holds the same
    pass results and runs the same decisions and draws (reading the row, mostly from L2), so they stay
    in step; program 0 stores the result."""
    i = tl.program_id(0)
    c = tl.program_id(1)
    tl.static_assert(not (SPLIT and TOP_K_FIRST))  # top_k_first keeps one program per row
    row = input_row(PROBS, ROWS, i, stride_row, HAS_ROWS)
    k, top_p, min_p = load_params(i, TOP_K, TOP_P, MIN_P, top_k_val, top_p_val, min_p_val, vocab, TOPK_PER_ROW,
                                  TOPP_PER_ROW, MINP_PER_ROW)
    top_p = tl.where(top_p >= 1.0, 3.0e38, top_p)  # top_p >= 1 keeps every positive token (no float-sum edge)
    seed, counter = load_seed(i, SEED, OFFSET, seed_val, offset_val, DRAW_STRIDE, SEED_IN_TENSOR, SEED_PER_ROW)
    USE_KP: tl.constexpr = USE_TOP_K or USE_TOP_P
    VERIFY: tl.constexpr = USE_KP or USE_MIN_P
    WORDS: tl.constexpr = (NQ + 3) // 4  # Philox counters per draw
    tl.static_assert(WORDS * MAX_PASSES + 2 <= DRAW_STRIDE)
    # Candidates measured by the next pass (top-k, top-p): NC lanes, one per queue slot; min-p judges its
    # candidates against the threshold, plain sampling keeps every candidate.
    NC: tl.constexpr = NQ if (USE_TOP_K or USE_TOP_P or TOP_K_FIRST) else 0
    tl.static_assert(NP >= NC)
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
        lo, rmax0, lo_seg0 = seg_top_k_set(row, vocab, seg_len, k, NP, NSEG, W, STAGES, MAX_STEPS, UNROLL)
        hi = rmax0
        lo_seg = lo_seg0
        lo_mass = tl.sum(lo_seg0, axis=0)
        total = lo_mass  # the top-p reference: the top-k set's mass
        have_total = have_total | True
        if MAX_PASSES > 0:
            # First candidates right away (the search measured the set's masses per segment).
            acc0, pick0, qv0, qid0, qn0 = seg_draw_queue(row, vocab, lo, hi, 0.0, lo_seg0, seed,
                                                         counter + MAX_PASSES * WORDS + 1, seg_len, sub_len, NQ, NSEG,
                                                         NSUB, CW, C3, STAGES)

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
                piv = seg_pivots(grid, qv, qn, lo, lo_cnt, lo_mass, hi, hi_cnt, hi_mass, k, p_mass, thr, vocab,
                                 USE_TOP_K, USE_TOP_P, USE_MIN_P, NQ, NC, NP, GRID_STEP, GRID_OFF)
            else:
                piv = tl.zeros([NP], dtype=tl.float32)  # lane 0 = 0: the masses of {p > 0}
            if SPLIT:
                part_row = PART + i.to(tl.int64) * (2 * (NP * NSEG + (NP + 1) * (NSEG // NSEG_PUB)))
                cnt, seg_mass, rmax = split_pass(row, vocab, c, nchunks, r, part_row, COUNTER + i, piv, USE_TOP_K,
                                                 VERIFY, NP, NSEG, NSEG_IN, NSEG_PUB, CHUNK, W, STAGES, UNROLL,
                                                 not VERIFY, EXCHANGE)
            else:
                cnt, seg_mass, rmax = seg_pass(row, vocab, seg_len, piv, USE_TOP_K, VERIFY, NP, NSEG, W, STAGES,
                                               UNROLL, not VERIFY)
            if not USE_TOP_K:
                # Top-p needs cnt only for "cnt(v) == 0", i.e. v >= row max: no counting in the pass.
                cnt = tl.where(piv >= rmax, 0, 1)
            pmass = tl.sum(seg_mass, axis=1)  # [NP]
            used = piv < float("inf")
            if VERIFY:
                if first:
                    total = lane_value(pmass, lane, 0)
                    thr = min_p * rmax
                    if USE_KP:
                        hi = tl.minimum(hi, rmax)  # the row max passes top-k and top-p (cnt = 0)
                p_mass = top_p * tl.where(top_p > 1.0, 1.0, total)
                keep_kp = kept_by_filters(cnt, pmass, piv, k, p_mass, 0.0, USE_TOP_K, USE_TOP_P, False)
                keep = keep_kp & (piv >= thr)
                # New lo: the largest rejected pivot, if above lo.
                lo = tl.maximum(lo, tl.max(tl.where(used & (~keep), piv, -1.0), axis=0))
                if USE_KP:
                    passed = used & keep_kp
                    hb = tl.min(tl.where(passed, piv, float("inf")), axis=0)
                    hb_lane = tl.min(tl.where(passed & (piv == hb), lane, NP), axis=0)
                    mh = hb < hi
                    hi_cnt = tl.where(mh, lane_value(cnt, lane, hb_lane), hi_cnt)
                    hi_mass = tl.where(mh, lane_value(pmass, lane, hb_lane), hi_mass)
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
            lo_cnt = tl.where(found, lane_value(cnt, lane, lo_lane), lo_cnt)
            lo_mass = tl.where(found, lane_value(pmass, lane, lo_lane), lo_mass)
            lo_seg = tl.where(found, tl.sum(tl.where(lane[:, None] == lo_lane, seg_mass, 0.0), axis=0), lo_seg)
            empty = lo_mass <= 0.0
            have_total = have_total | True
            qn = qn * 0  # the queue was measured: it is decided
            if (~accept) & (~empty):
                # Draw NQ new candidates from {p > lo} with its per-segment masses.
                acc_n, pick, qv, qid, qn = seg_draw_queue(row, vocab, lo, hi, thr, lo_seg, seed, counter + r * WORDS,
                                                         seg_len, sub_len, NQ, NSEG, NSUB, CW, C3, STAGES)
                result = tl.where(acc_n, pick, result)
                accept = accept | acc_n
            valid = valid | accept
            done = accept | empty
            r += 1

    if ~done:
        if not VERIFY:
            # Plain sampling's fallback draws from every positive token: it needs their exact mass
            # (no pass may have run).
            cnt, seg_mass, rmax = seg_pass(row, vocab, seg_len, tl.zeros([NP], dtype=tl.float32), False, False, NP,
                                           NSEG, W, STAGES, UNROLL, True)
            lo_mass = tl.sum(tl.sum(seg_mass, axis=1), axis=0)
        # Exact fallback: find tau above lo, then one draw.
        result, valid, kept_above = exact_draw(row, vocab, lo, lo_mass, total, have_total, k, top_p, min_p,
                                               uniform(seed, counter + MAX_PASSES * WORDS), USE_TOP_K,
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
        tl.store(OUT + i, result.to(OUT.dtype.element_ty))
        tl.store(VALID + i, valid.to(VALID.dtype.element_ty))


# Launches replayed per key (the API's key of probs, indices and the filter kinds, plus the seed/offset
# kinds and a scalar top_k: see filtered_sampling), with the sizes of the scratch tensors each launch
# allocates: the tensors, the float filter values, seed and offset are all that change under one key
# (seed_val and offset_val are not specialized on their value: PER_CALL_INTS).
_LAUNCHES = LaunchMemo(dynamic=(*range(11), 17, 18, 19, 20))
_SCRATCH: Dict[tuple, Tuple[Optional[int], Optional[int]]] = {}  # key -> (PART elements, COUNTER elements)


def _scratch(part_numel: Optional[int], counter_numel: Optional[int], dummy: torch.Tensor):
    """The PART (float32, uninitialized) and COUNTER (int32 zeros) tensors of a split launch; ``dummy``
    where the launch needs none. On a GPU COUNTER is a fresh slice of a pool of zeros (buffers.zeroed_int32):
    a zero fill per call would be one more kernel launch (on a CPU torch.zeros costs less than the slice)."""
    part = dummy if part_numel is None else torch.empty(part_numel, dtype=torch.float32, device=dummy.device)
    if counter_numel is None:
        counter = dummy
    elif dummy.is_cuda:
        counter = zeroed_int32(counter_numel, dummy.device)
    else:
        counter = torch.zeros(counter_numel, dtype=torch.int32, device=dummy.device)
    return part, counter


def filtered_sampling(probs, rows, out, valid, seed, offset, *, top_k=None, top_p=None, min_p=None,
                      order="joint", max_rounds=None, split=None, launch_key=None):
    """Sample one token per output row into ``out`` (ids) and ``valid``: plain sampling, or with the given
    filters. ``top_k``/``top_p``/``min_p``: int/float scalars or ``[batch]`` tensors on the device;
    ``seed``/``offset``: ints or int64 tensors ``[1]``/``[batch]``. ``max_rounds``: passes before the exact
    fallback, None = SEG_MAX_PASSES. ``split``: the row layout, None = the default
    (:func:`config.sampler_launch`). ``launch_key``: the caller's key of probs, rows and the filters' kinds
    and metadata (_core/memo.py); with ``max_rounds`` and ``split`` None the launch is then replayed for
    later calls with that key and the same seed/offset kinds (and scalar top_k)."""
    batch = out.shape[0]
    if batch == 0:
        return
    tk, tk_val, tk_row = param_args(top_k, 0)
    tp, tp_val, tp_row = param_args(top_p, 1.0)
    mp, mp_val, mp_row = param_args(min_p, 0.0)
    s_t, o_t, s_val, o_val, s_in, s_row = seed_args(seed, offset)
    dummy = out
    memo_key = None
    if launch_key is not None and max_rounds is None and split is None:
        memo_key = (launch_key, seed_key(seed), seed_key(offset), top_k if type(top_k) is int else None)
        replay = _LAUNCHES.get(memo_key)
        scratch = _SCRATCH.get(memo_key)
        if replay is not None and scratch is not None:
            part, counter = _scratch(*scratch, dummy)
            replay(probs, dummy if rows is None else rows, out, valid, dummy if tk is None else tk,
                   dummy if tp is None else tp, dummy if mp is None else mp, dummy if s_t is None else s_t,
                   dummy if o_t is None else o_t, part, counter, float(tp_val), float(mp_val), s_val, o_val)
            return
    vocab = probs.shape[-1]
    is_interpreted = interpreted(probs)
    launch = config.sampler_launch(vocab, batch, probs.device, is_interpreted, top_k=top_k, top_p=top_p,
                                   min_p=min_p, order=order, split=split)
    part, counter = _scratch(launch.part_numel, launch.counter_numel, dummy)
    args = (
        probs, rows if rows is not None else dummy, out, valid,
        tk if tk is not None else dummy, tp if tp is not None else dummy, mp if mp is not None else dummy,
        s_t if s_t is not None else dummy, o_t if o_t is not None else dummy, part, counter,
        vocab, probs.stride(0), launch.seg_len, launch.sub_len, launch.nchunks, int(tk_val), float(tp_val),
        float(mp_val), s_val, o_val,
    )
    kwargs = dict(
        HAS_ROWS=rows is not None, TOPK_PER_ROW=tk_row, TOPP_PER_ROW=tp_row, MINP_PER_ROW=mp_row,
        SEED_IN_TENSOR=s_in, SEED_PER_ROW=s_row,
        USE_TOP_K=top_k is not None and order != "top_k_first", USE_TOP_P=top_p is not None,
        USE_MIN_P=min_p is not None, TOP_K_FIRST=top_k is not None and order == "top_k_first",
        MAX_PASSES=config.SEG_MAX_PASSES if max_rounds is None else max_rounds, MAX_STEPS=MAX_SEARCH_STEPS,
        DRAW_STRIDE=DRAW_STRIDE, BLOCK=16 if is_interpreted else config.SEG_FALLBACK_BLOCK, NP_SEARCH=NUM_PIVOTS,
        **launch.kwargs,
    )
    if memo_key is None:
        _seg_filtered_sampling_kernel[launch.grid](*args, **kwargs)
        return
    if len(_SCRATCH) >= MAX_CACHED_CALLS:
        _SCRATCH.clear()
    _SCRATCH[memo_key] = (launch.part_numel, launch.counter_numel)
    _LAUNCHES.launch(memo_key, _seg_filtered_sampling_kernel, launch.grid, args, kwargs)
