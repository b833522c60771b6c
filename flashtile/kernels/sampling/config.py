"""Launch configuration of the segmented kernels: the sizes below, and the rules that pick a layout for
a call (one program per row, several rows per SM, or a row split over several programs).

The sizes are module constants that the launchers read at every call, so the sampling suite's tuning
grids (`python -m benchmarks.run --suite sampling --tune`) and tests can set them on this module
(replayed launches keep what they recorded: clear the launch memos after a change). The values were
chosen by sweeping them on an H100 over the sampling suite (benchmarks/bench_sampling.py);
docs/sampling.md explains the layouts.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..._core import dispatch, settings
from ..._core.device import num_sms
from ..._core.intmath import cdiv, floor_power_of_2, next_power_of_2

# One program per row.
SEG_WARPS = 8  # 8 warps beat 16 on every sampler (16 only adds barrier and register pressure)
SEG_ROWS = 16  # segments of the row (tile rows of a pass)
SEG_COLS = 64  # tokens per segment per iteration: a tile is SEG_ROWS x SEG_COLS (4 KB of float32)
SEG_STAGES = 7  # tl.range num_stages: SEG_STAGES - 1 tiles in flight per program (24 KB)
SEG_UNROLL = 2  # tiles per iteration of a pass: halves the barriers and loop bookkeeping
SEG_NQ = 4  # candidates drawn at once (and measured by the next pass)
# Pivot lanes of a pass (powers of 2; each costs 2 instructions per element, 3 with top-k's count): the
# SEG_NQ queued candidates, the rest search lanes (the first pass: 0 and a grid).
SEG_PIVOTS = 8  # top-k, joint top-k/top-p, top_k_first (also its exact top-k set search); >= max(4, SEG_NQ + 1)
# Top-p alone; >= SEG_NQ. 4 = the candidates only: on softmax(randn) and LLM-like rows at top_p 0.9 this
# takes as many passes as 8 lanes, at less work per element.
SEG_PIVOTS_TOP_P = 4
# Top-p alone, first pass: lanes j >= 1 at 2^(SEG_TOP_P_GRID_STEP * j - SEG_TOP_P_GRID_OFF) / vocab, i.e.
# 1/2, 2 and 8 / vocab. The smallest kept lane (``hi``) then sits near the threshold of flat rows, so most
# first candidates are accepted without a second pass, while the lanes above 1 / vocab still bracket the
# threshold of peaked rows.
SEG_TOP_P_GRID_STEP = 2
SEG_TOP_P_GRID_OFF = 3
SEG_PIVOTS_MIN_P = 1  # min-p alone: 1 = lane 0 (0 on the first pass, then the float just below the threshold)
SEG_SUBS = 16  # sub-segments of a picked segment (level 2 of a draw)
SEG_SUB_COLS = 32  # tokens per sub-segment per iteration of level 2
SEG_SCAN = 256  # chunk of the level-3 scan inside a sub-segment
SEG_MAX_PASSES = 16  # passes before the exact fallback
SEG_FALLBACK_BLOCK = 4096  # block of the exact fallback's passes (exact.py) and of top_k_first's top-k set

# Several rows per SM (batch >= SEG_WAVE_ROWS * SMs) with short rows (vocab <= SEG_WAVE_MAX_VOCAB):
# SEG_WAVE_WARPS warps with registers capped at SEG_WAVE_MAXNREG per thread (ptxas .maxnreg; 0 = no cap)
# and tiles SEG_WAVE_COLS wide (level 2 sweeps SEG_WAVE_SUB_COLS wide), so that 64K / (4 warps x 32 x 128)
# = 4 programs share an SM and batch 512 on 132 SMs runs as one wave: every row streams its first pass at
# once (the SMs together draw the full DRAM bandwidth) and the rows' serial parts (reductions, draws,
# decisions) overlap with other rows' streaming instead of following it wave by wave. Long rows are
# mostly streaming, where the register cap costs more than the overlap gains, hence the vocabulary bound.
# top_k_first keeps the one-program configuration: its exact top-k search spills under any register cap.
SEG_WAVE_ROWS = 2
SEG_WAVE_MAX_VOCAB = 65536
SEG_WAVE_WARPS = 4
SEG_WAVE_MAXNREG = 128
SEG_WAVE_COLS = 32
SEG_WAVE_SUB_COLS = 16

# Row split: while batch x chunks fits the SMs, a row's tokens are cut into chunks and every chunk gets its
# own program (docs/sampling.md "Launch layouts").
SPLIT_CHUNK = 4096  # smallest chunk (tokens per program); a multiple of SEG_ROWS * SEG_COLS * SEG_UNROLL
SPLIT_WARPS = 8
SPLIT_MAX_CHUNK = 1 << 20  # largest chunk with one program per SM
# Chunks publish their masses per segment of at most SPLIT_SEG tokens, so a draw (level 2 of
# ``seg_draw``) reads at most SPLIT_SEG tokens per candidate whatever the chunk size.
SPLIT_SEG = 4096
SPLIT_SEG_INTERPRETED = 8  # under the interpreter (chunks of 16): 2 published segments per chunk
SPLIT_CHUNK_INTERPRETED = 16  # so that test vocabularies of 20-40 tokens span 2-3 chunks
# Programs of the split kernel per SM when one per SM leaves no room for 2 chunks per row (batch 67-132 on
# 132 SMs), for samplers with top-k: 2 caps the registers at 64K / (2 x SPLIT_WARPS x 32) per thread so
# that two programs are resident on every SM at once, as the row barrier needs. Top-k's passes are
# issue-heavy (compare, FMA and count per element and lane) and gain from the doubled warps; top-p and
# min-p lose more to the register cap than they gain, so they keep one program per row there.
SPLIT_PER_SM = 2
# Pivot lanes of a split row with top-k or top-p (lanes cost little there: a program measures its chunk,
# from L2 after the first pass), and the first pass's grid: lanes j >= 1 at 2^(j - 3) / vocab (1/4 .. 16
# / vocab), a factor 2 apart, so that after one pass ``hi`` is close to the top-p threshold of flat rows.
SPLIT_PIVOTS = 8
SPLIT_NQ = 4  # candidates per draw in a split row (SPLIT_PIVOTS >= SPLIT_NQ + 1 with top-k)
SPLIT_GRID_STEP = 1
SPLIT_GRID_OFF = 3
SPLIT_EXCHANGE = True  # False: every program measures every chunk itself (no barrier; for tests)


def split_enabled() -> bool:
    """Whether small batches may split rows over programs: yes unless FLASHTILE_SAMPLING_SPLIT=0 (read
    once: _core/settings.py)."""
    return settings.flag("FLASHTILE_SAMPLING_SPLIT")


def usable_sms(device: torch.device) -> int:
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
    if device.type not in dispatch.KERNEL_DEVICE_TYPES or not split_enabled():
        return 0, 0
    if top_k is not None and order == "top_k_first":
        return 0, 0
    sms = usable_sms(device)
    for per_sm in sorted({1, max(1, SPLIT_PER_SM) if top_k is not None else 1}):
        chunk = SPLIT_CHUNK
        while batch * cdiv(vocab, chunk) > sms * per_sm and chunk < SPLIT_MAX_CHUNK:
            chunk *= 2
        chunks = cdiv(vocab, chunk)
        if chunks >= 2 and batch * chunks <= sms * per_sm:
            return chunks, chunk
    return 0, 0


def seg_config(vocab: int, interpreted: bool, *, filtered: bool, count: bool, unroll: int = 1,
               top_p_only: bool = False, wave: bool = False) -> dict:
    """Launch sizes of a segmented kernel with one program per row: ``seg_len`` and ``sub_len`` (tokens per
    segment and sub-segment) and the kernel's size constexprs and launch options. ``filtered``: some filter
    (top-k, top-p or min-p); ``count``: top-k or top-p (queued candidates are measured: pivot lanes for
    them); ``top_p_only``: top-p without top-k (SEG_PIVOTS_TOP_P lanes and its first-pass grid); ``wave``:
    several rows per SM (the SEG_WAVE_* tiles, warps and register cap). ``unroll``: tiles per iteration of
    ``seg_pass`` (``seg_len`` a multiple of ``W * unroll``). Under the interpreter, tiny tiles so that test
    vocabularies of 7-41 tokens span several segments, sub-segments and scan chunks."""
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
    # Candidates per draw and pivot lanes; with top-k or top-p the first NQ lanes measure the queued
    # candidates (the kernel's NC).
    if not filtered:
        nq, np_ = 2, 1  # plain sampling: one draw (two lanes: size-1 tiles spill), always kept
    elif not count:
        nq, np_ = SEG_NQ, SEG_PIVOTS_MIN_P  # min-p: no candidate is queued (judged at once by the threshold)
        assert np_ >= 1 and np_ & (np_ - 1) == 0, "SEG_PIVOTS_MIN_P: a power of 2"
    elif top_p_only:
        nq, np_ = SEG_NQ, SEG_PIVOTS_TOP_P
        assert np_ >= nq and np_ & (np_ - 1) == 0, "SEG_PIVOTS_TOP_P: a power of 2 >= SEG_NQ"
        grid = dict(GRID_STEP=SEG_TOP_P_GRID_STEP, GRID_OFF=SEG_TOP_P_GRID_OFF)
    else:
        nq, np_ = SEG_NQ, SEG_PIVOTS
        assert np_ >= max(4, nq + 1) and np_ & (np_ - 1) == 0, "SEG_PIVOTS: a power of 2 >= max(4, SEG_NQ + 1)"
    return dict(seg_len=seg_len, sub_len=sub_len, NQ=nq, NP=np_, NSEG=nseg, W=w, NSUB=nsub, CW=cw, C3=c3,
                STAGES=stages, UNROLL=unroll, num_warps=warps, **grid, **extra)


class SamplerLaunch(NamedTuple):
    """How ``filtered_sampling`` runs a batch: the grid, the segment sizes, the number of chunks per row
    (1: one program per row), the kernel's size constexprs and launch options (``kwargs``), and the sizes
    of the scratch tensors of a split row (None: not needed)."""

    grid: tuple
    seg_len: int
    sub_len: int
    nchunks: int
    kwargs: dict
    part_numel: Optional[int] = None
    counter_numel: Optional[int] = None


def sampler_launch(vocab: int, batch: int, device: torch.device, interpreted: bool, *, top_k, top_p, min_p,
                   order: str, split=None) -> SamplerLaunch:
    """The launch of the segmented sampler for a batch. ``split``: None = :func:`split_layout` decides;
    True = split rows into chunks of SPLIT_CHUNK tokens (SPLIT_CHUNK_INTERPRETED under the interpreter),
    an int = into chunks of that many tokens; False = one program per row. ``top_k_first`` with top-k
    keeps one program per row whatever ``split`` says."""
    top_k_first = top_k is not None and order == "top_k_first"
    nchunks = 0
    if split is not False and not top_k_first:
        if split:
            chunk = (SPLIT_CHUNK_INTERPRETED if interpreted else SPLIT_CHUNK) if split is True else int(split)
            nchunks = cdiv(vocab, chunk)
        else:
            nchunks, chunk = split_layout(vocab, batch, device, order, top_k)
    filtered = top_k is not None or top_p is not None or min_p is not None
    count = top_k is not None or top_p is not None
    top_p_only = top_p is not None and top_k is None
    if not nchunks:
        wave = (not interpreted and batch >= SEG_WAVE_ROWS * usable_sms(device) and vocab <= SEG_WAVE_MAX_VOCAB
                and not top_k_first)
        cfg = seg_config(vocab, interpreted, filtered=filtered, count=count, unroll=SEG_UNROLL, top_p_only=top_p_only,
                         wave=wave)
        seg_len, sub_len = cfg.pop("seg_len"), cfg.pop("sub_len")
        return SamplerLaunch((batch,), seg_len, sub_len, 1, cfg)
    return _split_launch(vocab, batch, device, interpreted, nchunks, chunk, filtered=filtered, count=count,
                         top_p_only=top_p_only, top_k=top_k, top_p=top_p, min_p=min_p)


def _split_launch(vocab, batch, device, interpreted, nchunks, chunk, *, filtered, count, top_p_only, top_k, top_p,
                  min_p) -> SamplerLaunch:
    """The segmented sampler with each row split over ``nchunks`` programs of ``chunk`` tokens (grid
    ``(batch, nchunks)``): every chunk's own pass has NSEG_IN segments and publishes NSEG_PUB of them
    (at most SPLIT_SEG tokens each); the row's segments are the published ones of every chunk."""
    cfg = seg_config(vocab, interpreted, filtered=filtered, count=count, unroll=SEG_UNROLL, top_p_only=top_p_only)
    cfg.pop("seg_len"), cfg.pop("sub_len")
    nseg_in = floor_power_of_2(min(cfg["NSEG"], chunk // (cfg["W"] * cfg["UNROLL"])))  # a chunk's own pass
    if chunk % (nseg_in * cfg["W"] * cfg["UNROLL"]) or chunk % cfg["CW"]:
        raise ValueError(f"SPLIT_CHUNK: expected a multiple of SEG_ROWS * SEG_COLS * SEG_UNROLL "
                         f"({nseg_in * cfg['W'] * cfg['UNROLL']}) and of SEG_SUB_COLS, got {chunk}")
    nseg_pub = min(nseg_in, floor_power_of_2(chunk // (SPLIT_SEG_INTERPRETED if interpreted else SPLIT_SEG)))
    if top_k is not None or top_p is not None:
        cfg.update(NQ=SPLIT_NQ, NP=SPLIT_PIVOTS, GRID_STEP=SPLIT_GRID_STEP, GRID_OFF=SPLIT_GRID_OFF)
        need = SPLIT_NQ + (1 if top_k is not None else 0)
        if SPLIT_PIVOTS < need or SPLIT_PIVOTS & (SPLIT_PIVOTS - 1):
            raise ValueError(f"SPLIT_PIVOTS: expected a power of 2 >= {need} (SPLIT_NQ = {SPLIT_NQ}), "
                             f"got {SPLIT_PIVOTS}")
    elif min_p is not None:
        cfg.update(NQ=SPLIT_NQ)
    nch = next_power_of_2(nchunks)
    nseg = nch * nseg_pub
    seg_len = chunk // nseg_pub
    sub_len = cdiv(cdiv(seg_len, cfg["NSUB"]), cfg["CW"]) * cfg["CW"]
    sms = 0 if interpreted else usable_sms(device)
    per_sm = 1 if batch * nchunks <= sms else max(1, SPLIT_PER_SM)
    exchange = SPLIT_EXCHANGE and not interpreted and batch * nchunks <= sms * per_sm
    cfg.update(NSEG=nseg, NSEG_IN=nseg_in, NSEG_PUB=nseg_pub, CHUNK=chunk, SPLIT=True, EXCHANGE=exchange)
    if not interpreted:
        cfg["num_warps"] = SPLIT_WARPS
        if exchange and per_sm > 1:
            # Registers per thread so that per_sm programs fit an SM's 64K registers (allocation is per
            # warp in units of 256, hence a multiple of 8 per thread).
            cfg["maxnreg"] = min(255, (65536 // (per_sm * SPLIT_WARPS * 32)) // 8 * 8)
    # Partials of a row (filtered.py, ``split_pass``): two slots of NP x NSEG masses, NP x nch counts, nch maxima.
    part_numel = batch * 2 * (cfg["NP"] * nseg + (cfg["NP"] + 1) * nch) if exchange else 1
    return SamplerLaunch((batch, nchunks), seg_len, sub_len, nchunks, cfg, part_numel, batch if exchange else 1)
