"""Warp-specialized batch prefill for Hopper (sm_90), written in Gluon.

The Triton kernel (batch_prefill.py) runs each 128-row tile in one program whose warps both load
K/V and compute, so a short prompt's tile pays its own pipeline fill, drain and epilogue, and only
one 8-warp tile fits an SM. Triton 3.6's automatic warp specialization does not engage on that
loop for sm_90a (docs/batch_prefill.md). This kernel splits the roles by hand:

- a *producer* warp issues TMA copies: the tile's Q (``GROUP`` boxes of ``BLOCK_M / GROUP``
  tokens, one per query head of the KV head's group) and its K and V blocks into a ring of
  ``STAGES`` shared-memory buffers (paged: one box per page). Pages a box cannot serve (fewer
  than 8 keys, e.g. page size 1, or not dividing ``BLOCK_N``) go through *gather mode*: a
  warpgroup of producer threads issues ``cp.async`` copies key by key. The producer also decodes
  each tile's work unit and hands the fields to the consumers through shared memory;
- the *consumer*, two warpgroups of 64 rows each, runs the wgmma products and the online softmax
  (the shared helper, softmax.py). A tile whose rows all lie in its request leaves through its
  own Q buffer and TMA stores (other tiles store from registers);
- the grid is persistent: programs take work units from a counter in the plan's launch order, so
  the producer loads the next tile's Q and K/V while the consumer finishes the last one.

Rows inside a tile are head-major (row ``g * BLOCK_M / GROUP + t`` is token ``t`` of query head
``g`` of the group): the same rows as the Triton kernel's token-major tile, in the order TMA can
fill. It reads the same plan (scheduler/prefill_work.py) and writes the same outputs and partial
states, so the merge kernel and CUDA-graph mode are shared.

Scope (:func:`hopper_prefill_views` decides): fp16/bf16 Q/K/V with head dim 64 or 128 (both),
causal or no mask, no window, soft cap, ALiBi, RoPE or custom mask; 128-row tiles; GQA groups of
1..16 (powers of two); ragged K/V with heads adjacent in memory, or pages of any size in NHD or
HND layout. Everything else runs the Triton kernel, as does every call with the kill-switch
``FLASHTILE_HOPPER_PREFILL=0``.

FP8 attention (q, k, v of one fp8 dtype with per-head scales), ragged batches only (``FLASHTILE_HOPPER_FP8=0``
turns it off): the products run on the fp8 tensor cores (m64n128k32), each row's logits take
``sm_scale * scale_q[head] * scale_k[kv_head]``, the weights are rounded to the fp8 dtype for ``P @ V``
(the Triton kernel's scheme, docs/fp8_attention.md) and the output rows are multiplied by
``scale_v[kv_head]``. An fp8 B operand must be K-major, so ``V`` comes from the key-contiguous copy
that the Triton kernel reads too (batch_prefill.ragged_fp8_v_layout), in ``[HEAD_DIM, BLOCK_N]`` boxes; the
copy's zeros past each request replace the zeroing of rows past the keys. Outputs leave from registers
(their dtype is not q's).

Only the GPU runs this module (the interpreter cannot run Gluon): the same request-by-request tests
check it on the H100 (tests/test_batch_prefill.py; the FP8 path: tests/test_fp8_prefill.py).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._core import settings
from .._core.launch import direct_launch
from . import attention as _attention
from .attention import fp8_kwargs
from .gluon_api import HAVE_GLUON as _HAVE_GLUON

if _HAVE_GLUON:  # Gluon (Triton >= 3.5). Used only where a Hopper GPU runs it.
    from .gluon_api import (
        GluonTensorDescriptor,
        async_copy,
        cp_async_load,
        cta_barrier,
        fence_async_shared,
        gl,
        gluon,
        mbarrier,
        nvmma_layout,
        tma,
        tma_load,
        tma_store,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

from .prefill_plan import item_and_head, item_fields, ragged_v_t_start, request_of_item
from .softmax import finalize_state, softmax_step
from .tiles import tile_ranges

BLOCK_M = 128
BLOCK_N = 128
# K/V ring depth per head dim (the kernel's STAGES): 2 at both, the depth it was measured with. Shared memory
# (sm_90a, Triton 3.6): 98,856 bytes at d64 and 197,160 at d128 with 2 stages; a stage adds 2 x BLOCK_N x D x 2
# bytes (32 KiB at d64), so d64 fits 4 stages and d128 only 2. The batch_prefill suite's `hopper_stages` grid
# times STAGES_OVERRIDE on the head-dim-64 cases.
STAGES_BY_HEAD_DIM = {64: 2, 128: 2}
STAGES_OVERRIDE: Optional[int] = None
# FP8: the weights reach P @ V through shared memory instead of registers. In registers, fp8 weights need the
# 8-bit operand layout: 256 byte permutes (prmt) and more shuffles per conversion site and thread in the sm_90a
# PTX (Triton 3.6), CUDA-core work on the path that bounds fp8, whose products run at twice the bf16 rate. Off
# until timed: the fp8_prefill suite's ``gluon`` tune times both.
FP8_P_IN_SHARED = False
# Benchmarks set this to True or False to choose the kernel for ragged FP8 batches whatever FLASHTILE_HOPPER_FP8
# says (None: the setting).
FP8_OVERRIDE: Optional[bool] = None
_FP8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))
# Registers per thread: two 4-warp consumers and a producer warp (a warpgroup for the register file):
# 12 warps x 32 threads x MAX_REGS = 64512 <= 65536. The second consumer asks for CONSUMER_REGS and the
# producer for PRODUCER_REGS; the default partition (the first consumer) gets what is left (240).
PRODUCER_REGS = 24
CONSUMER_REGS = 240
MAX_REGS = 168
# Gather mode (pages a TMA box cannot serve, e.g. one key per page): a warpgroup of producer threads
# issues cp.async copies row by row.
GATHER_WARPS = 4
# RECORD timelines (benchmarks/tools/hopper_prefill_timeline.py): int64 records per tile, for the first
# RECORD_TILES tiles of every program.
RECORD_TILES = 64
RECORD_FIELDS = 12


def hopper_fp8_enabled() -> bool:
    """Whether ragged FP8 batches may run this kernel: the kill-switch ``FLASHTILE_HOPPER_FP8`` (settings.py; on
    by default), unless FP8_OVERRIDE says otherwise."""
    return settings.flag("FLASHTILE_HOPPER_FP8") if FP8_OVERRIDE is None else FP8_OVERRIDE


def hopper_prefill_enabled() -> bool:
    """``FLASHTILE_HOPPER_PREFILL=0`` turns the warp-specialized kernel off (the Triton kernel runs;
    read once: _core/settings.py)."""
    return settings.flag("FLASHTILE_HOPPER_PREFILL")


def _kv_rows(x: torch.Tensor, paged: bool) -> Optional[tuple]:
    """How the TMA copies address K or V: a 2-D view ``[rows, cols]`` with row stride ``row_stride``
    (elements, unit column stride) in which a key of one head is a row segment of ``D`` elements.
    Key ``j`` of head ``h`` sits at row ``base(j) + h * head_row``, column ``h * head_col``, where
    ``base(j)`` is ``kv_offset + j`` (ragged) or ``page * rows_per_page + slot`` (paged).

    Returns ``(rows, cols, row_stride, rows_per_page, head_row, head_col)`` or None when the tensor
    has no such form (e.g. a key's elements not contiguous)."""
    d = x.shape[-1]
    if x.stride(-1) != 1:
        return None
    if not paged:  # [T, H, D]
        t, h, _ = x.shape
        st, sh = x.stride(0), x.stride(1)
        if st < d or sh < d or (h - 1) * sh + d > st:
            return None
        return t, (h - 1) * sh + d, st, 0, 0, sh
    p, ps, h, _ = x.shape  # [P, page_size, H, D] with the cache's strides
    sp, ss, sh = x.stride(0), x.stride(1), x.stride(2)
    if ss < d or sp % ss:
        return None
    rows_per_page = sp // ss
    if sh < ss:  # NHD: the heads of a slot share a row
        if sh < d or (h - 1) * sh + d > ss or rows_per_page < ps:
            return None
        return (p - 1) * rows_per_page + ps, (h - 1) * sh + d, ss, rows_per_page, 0, sh
    # HND: a head's slots are consecutive rows
    if sh % ss or sh // ss < ps or rows_per_page < (h - 1) * (sh // ss) + ps:
        return None
    return (p - 1) * rows_per_page + (h - 1) * (sh // ss) + ps, d, ss, rows_per_page, sh // ss, 0


def use_gather(page_size: Optional[int]) -> bool:
    """Paged K/V through cp.async gathers instead of TMA boxes: pages a box cannot serve (fewer than 8
    keys, or not dividing BLOCK_N)."""
    if page_size is None:
        return False
    return page_size % 8 != 0 or page_size > BLOCK_N or BLOCK_N % page_size != 0


def hopper_prefill_views(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, paged: bool, block_m: int,
                         plain: bool, fp8: bool = False) -> Optional[tuple]:
    """The TMA views of K and V (:func:`_kv_rows`) when :func:`hopper_prefill_forward` handles this
    call (module doc: scope), else None. ``plain``: no window, soft cap, ALiBi, RoPE, custom or multi-item
    mask, or ``v_scale``. ``fp8``: FP8 attention (q, k, v of one fp8 dtype, scales given apart)."""
    if not (_HAVE_GLUON and hopper_prefill_enabled() and plain and q.is_cuda and block_m == BLOCK_M):
        return None
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return None
    dtypes = _FP8_DTYPES if fp8 else (torch.float16, torch.bfloat16)
    if q.dtype not in dtypes or k.dtype != q.dtype or v.dtype != q.dtype:
        return None
    # FP8: ragged batches only, whose V the kernel reads from the transposed copy (FP8_TRANSPOSE_V)
    if fp8 and (paged or not hopper_fp8_enabled() or not _attention.FP8_TRANSPOSE_V):
        return None
    d = q.shape[2]
    if d not in (64, 128) or k.shape[-1] != d or v.shape[-1] != d or q.stride(2) != 1 or q.stride(1) != d:
        return None
    element = q.element_size()
    if (q.stride(0) * element) % 16 or q.data_ptr() % 16 or k.data_ptr() % 16 or v.data_ptr() % 16:
        return None
    num_kv_heads = k.shape[2] if paged else k.shape[1]
    group = q.shape[1] // num_kv_heads
    if group < 1 or group > 16 or group & (group - 1):
        return None
    k_rows, v_rows = _kv_rows(k, paged), _kv_rows(v, paged)
    if k_rows is None or v_rows is None or k_rows[3:] != v_rows[3:]:  # K and V share coordinates
        return None
    # Gather mode: one offset list serves K and V, and every key's offset is a multiple of 16 bytes.
    if paged and use_gather(k.shape[1]) and (k_rows[2] != v_rows[2] or k_rows[5] % 8):
        return None
    if not all(r[0] < 2**31 and r[1] < 2**31 and (r[2] * element) % 16 == 0 for r in (k_rows, v_rows)):
        return None
    return k_rows, v_rows


if _HAVE_GLUON:
    # The tile constants as the kernels see them.
    _BLOCK_M = gl.constexpr(BLOCK_M)
    _BLOCK_N = gl.constexpr(BLOCK_N)
    _PRODUCER_REGS = gl.constexpr(PRODUCER_REGS)
    _CONSUMER_REGS = gl.constexpr(CONSUMER_REGS)
    _GATHER_WARPS = gl.constexpr(GATHER_WARPS)
    _INFO = gl.constexpr(16)  # int32 fields per tile handed from producer to consumers (_publish_unit)
    # Where each field sits (_publish_unit writes them, _field reads one).
    _F_UNIT = gl.constexpr(0)
    _F_KV_HEAD = gl.constexpr(1)
    _F_SLOT = gl.constexpr(2)
    _F_QO_START = gl.constexpr(3)
    _F_QO_LEN = gl.constexpr(4)
    _F_KV_LEN = gl.constexpr(5)
    _F_DELTA = gl.constexpr(6)
    _F_T_FIRST = gl.constexpr(7)
    _F_START = gl.constexpr(8)
    _F_FULL_END = gl.constexpr(9)
    _F_NUM_BLOCKS = gl.constexpr(10)
    _RECORD_TILES = gl.constexpr(RECORD_TILES)
    _RECORD_FIELDS = gl.constexpr(RECORD_FIELDS)

    @gluon.jit
    def _work_unit(w, COUNTS, REQS, ITEMS, num_kv_heads, GROUP: gl.constexpr, CAUSAL: gl.constexpr):
        """The item and KV head of work unit ``w`` (the plan's launch order: item_and_head) and its KV
        blocks: ``[start, start + num_blocks * _BLOCK_N)``, the blocks from
        ``full_end`` on masked (causal diagonal, end of the keys)."""
        TOKENS: gl.constexpr = _BLOCK_M // GROUP
        item, kv_head, _ = item_and_head(w, gl.load(COUNTS), gl.load(COUNTS + 2), num_kv_heads)
        row_block, lo, hi, slot, qo_start, qo_len, kv_offset, kv_len, _ = item_fields(ITEMS, REQS, item)
        delta = kv_len - qo_len
        t_first = row_block * TOKENS
        t_last = gl.minimum(t_first + TOKENS - 1, qo_len - 1)
        start, _, full_end, hi = tile_ranges(lo, hi, t_first, t_last, delta, kv_len, -1, CAUSAL, False, False,
                                             _BLOCK_N)
        num_blocks = gl.maximum(hi - start + _BLOCK_N - 1, 0) // _BLOCK_N
        return (kv_head, slot, qo_start, qo_len, kv_offset, kv_len, delta, t_first, start, full_end,
                num_blocks, item)

    @gluon.jit
    def _publish_unit(info_buf, w, kv_head, slot, qo_start, qo_len, kv_len, delta, t_first, start, full_end,
                      num_blocks, num_warps: gl.constexpr):
        """The producer hands a tile's decoded fields to the consumers through shared memory (the
        consumers would otherwise repeat three dependent global loads at every tile start)."""
        layout: gl.constexpr = gl.BlockedLayout([_INFO], [32], [num_warps], [0])
        f = gl.arange(0, _INFO, layout=layout)
        v = gl.where(f == _F_UNIT, w, 0)
        v = gl.where(f == _F_KV_HEAD, kv_head, v)
        v = gl.where(f == _F_SLOT, slot, v)
        v = gl.where(f == _F_QO_START, qo_start, v)
        v = gl.where(f == _F_QO_LEN, qo_len, v)
        v = gl.where(f == _F_KV_LEN, kv_len, v)
        v = gl.where(f == _F_DELTA, delta, v)
        v = gl.where(f == _F_T_FIRST, t_first, v)
        v = gl.where(f == _F_START, start, v)
        v = gl.where(f == _F_FULL_END, full_end, v)
        v = gl.where(f == _F_NUM_BLOCKS, num_blocks, v)
        info_buf.store(v)

    @gluon.jit
    def _field(v, f, k: gl.constexpr):
        """Field ``k`` of a tile (:func:`_tile_fields`); a reduction inside each thread."""
        return gl.sum(gl.where(f == k, v, 0), 0)

    @gluon.jit
    def _tile_fields(info_buf, num_warps: gl.constexpr):
        """A tile's fields as the producer published them (:func:`_publish_unit`): ``(v, f)``, read
        one with ``_field(v, f, k)``. The consumers read them where they are used (before and
        after the KV loop) instead of keeping them in registers through the loop."""
        layout: gl.constexpr = gl.BlockedLayout([_INFO], [32], [num_warps], [0])
        return info_buf.load(layout), gl.arange(0, _INFO, layout=layout)

    @gluon.jit
    def _next_unit(unit_info, q_ready, tile, num_warps: gl.constexpr):
        """Wait for the producer's next tile and return its work unit (-1: none left)."""
        qi = tile % 2
        mbarrier.wait(q_ready.index(qi), (tile // 2) & 1)
        v, f = _tile_fields(unit_info.index(qi), num_warps)
        return _field(v, f, _F_UNIT)

    @gluon.jit
    def _clock(dep):
        """The SM's cycle counter (RECORD timelines only); ``dep`` orders the read after a value."""
        return gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [dep], dtype=gl.int64, is_pure=False,
                                         pack=1)

    @gluon.jit
    def _block_rows(n0, kv_len, kv_offset, kv_head, PAGE_INDICES, rows_per_page, head_row, oob_row,
                    PAGED: gl.constexpr, PAGE_SIZE: gl.constexpr):
        """Paged: the view row of each page of keys ``[n0, n0 + BLOCK_N)`` (one vector load of the page
        ids, shared by the K and V copies); pages past the request's last one get ``oob_row``, past the
        end of the view, which TMA fills with zeros. Ragged: unused."""
        page_layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        offs_p = gl.arange(0, _BLOCK_N // PAGE_SIZE, layout=page_layout)
        rows = offs_p
        if PAGED:
            keys = n0 + offs_p * PAGE_SIZE
            pages = gl.load(PAGE_INDICES + kv_offset + keys // PAGE_SIZE, mask=keys < kv_len, other=0)
            rows = gl.where(keys < kv_len, pages * rows_per_page + kv_head * head_row, oob_row)
        return offs_p, rows

    @gluon.jit
    def _load_kv_block(desc, buf, bar, n0, kv_offset, kv_head, offs_p, rows, head_col, PAGED: gl.constexpr,
                       PAGE_SIZE: gl.constexpr):
        """TMA copies of keys ``[n0, n0 + BLOCK_N)`` of one head into ``buf`` (arriving on ``bar``):
        paged, one box per page at the rows from :func:`_block_rows`."""
        if PAGED:
            for j in gl.static_range(_BLOCK_N // PAGE_SIZE):
                row = gl.sum(gl.where(offs_p == j, rows, 0), 0)
                tma_load(desc, [row, kv_head * head_col], bar,
                                                buf.slice(j * PAGE_SIZE, PAGE_SIZE))
        else:
            tma_load(desc, [kv_offset + n0, kv_head * head_col], bar, buf)

    @gluon.jit
    def _gather_rows(offs_buf, n0, kv_len, kv_offset, kv_head, PAGE_INDICES, rows_per_page, head_row, row_stride,
                     col, PAGE_SIZE: gl.constexpr, num_warps: gl.constexpr):
        """Gather mode: the element offset in the K (and V: the same strides) view of each key
        ``n0 .. n0 + BLOCK_N`` of one head (negative past the keys) into ``offs_buf``, one page-id load per
        key, shared by the K and V copies of the block (which then add only their base)."""
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        keys = n0 + gl.arange(0, _BLOCK_N, layout=layout)
        ok = keys < kv_len
        pages = gl.load(PAGE_INDICES + kv_offset + keys // PAGE_SIZE, mask=ok, other=0)
        rows = pages * rows_per_page + kv_head * head_row + keys % PAGE_SIZE
        # Past the keys: -8, negative (masked off) yet as aligned as a key's offset.
        offs_buf.store(gl.where(ok, rows.to(gl.int64) * row_stride + col, -8))
        cta_barrier()

    @gluon.jit
    def _gather_block(base, buf, offs_buf, HEAD_DIM: gl.constexpr, num_warps: gl.constexpr):
        """Gather mode: ``cp.async`` copies of the ``BLOCK_N`` keys at the offsets in ``offs_buf``
        (``HEAD_DIM`` elements each from ``base``) into ``buf``; negative offsets become zeros. A few rows at
        a time, so the producer's 24 registers hold the addresses."""
        copy_layout: gl.constexpr = gl.BlockedLayout([1, 8], [256 // HEAD_DIM, HEAD_DIM // 8], [num_warps, 1],
                                                     [1, 0])
        SUB: gl.constexpr = 2 * (256 // HEAD_DIM) * num_warps
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, copy_layout))
        for r in gl.static_range(_BLOCK_N // SUB):
            # Multiples of 8 elements (16 bytes): the host checks the strides and the column.
            offs = gl.multiple_of(offs_buf.slice(r * SUB, SUB).load(gl.SliceLayout(1, copy_layout)), 8)
            cp_async_load(buf.slice(r * SUB, SUB), base + offs[:, None] + offs_d[None, :],
                                                   mask=(offs >= 0)[:, None])

    @gluon.jit
    def _mask_logits(x, n0, full_end, kv_len, offs_n, positions, CAUSAL: gl.constexpr):
        """Logits of keys ``n0 + offs_n``; from ``full_end`` on (causal diagonal, end of the keys) the
        keys a row cannot see become ``-inf``."""
        if n0 + _BLOCK_N > full_end:
            cols = n0 + offs_n
            visible = cols[None, :] < kv_len
            if CAUSAL:
                visible = visible & (cols[None, :] <= positions[:, None])
            x = gl.where(visible, x, float("-inf"))
        return x

    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, K, V, q_bufs, k_bufs, v_bufs, key_offsets, unit_info, bars, COUNTS, REQS,
                  ITEMS, PAGE_INDICES, num_kv_heads, rows_per_page, head_row, head_col, oob_row, row_stride,
                  TIMES, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr,
                  PAGED: gl.constexpr, PAGE_SIZE: gl.constexpr, GATHER: gl.constexpr, RECORD: gl.constexpr,
                  V_T: gl.constexpr, num_warps: gl.constexpr):
        q_ready, q_empty, k_ready, k_empty, v_ready, v_empty = bars
        STAGES: gl.constexpr = k_bufs.shape[0]  # the K/V ring depth (the kernel's STAGES)
        TOKENS: gl.constexpr = _BLOCK_M // GROUP
        ELEMENT: gl.constexpr = q_bufs.dtype.primitive_bitwidth // 8  # bytes
        kv_bytes: gl.constexpr = _BLOCK_N * HEAD_DIM * ELEMENT
        total = gl.load(COUNTS) * num_kv_heads
        tile = 0
        block = 0
        # Work units are taken from a counter (the plan's COUNTS[3]) in launch order, as the hardware
        # hands out the blocks of a non-persistent grid: long tiles first, and the programs running
        # at one time on neighbouring units (shared K/V in L2).
        rec = TIMES + gl.program_id(0) * (_RECORD_TILES * _RECORD_FIELDS)
        w = gl.atomic_add(COUNTS + 3, 1)
        while w < total:
            if RECORD:
                if tile < _RECORD_TILES:
                    gl.store(rec + tile * _RECORD_FIELDS + 8, _clock(w))
            (kv_head, slot, qo_start, qo_len, kv_offset, kv_len, delta, t_first, start, full_end,
             num_blocks, item) = _work_unit(w, COUNTS, REQS, ITEMS, num_kv_heads, GROUP, CAUSAL)
            qi = tile % 2
            mbarrier.wait(q_empty.index(qi), ((tile // 2) & 1) ^ 1)
            _publish_unit(unit_info.index(qi), w, kv_head, slot, qo_start, qo_len, kv_len, delta, t_first, start,
                          full_end, num_blocks, num_warps)
            mbarrier.expect(q_ready.index(qi), _BLOCK_M * HEAD_DIM * ELEMENT)
            q_buf = q_bufs.index(qi)
            for g in gl.static_range(GROUP):
                tma_load(q_desc, [qo_start + t_first, (kv_head * GROUP + g) * HEAD_DIM], q_ready.index(qi),
                         q_buf.slice(g * TOKENS, TOKENS))
            if V_T:  # the request's first key in the transposed copy of V (ragged FP8)
                v_t_start = ragged_v_t_start(kv_offset, request_of_item(ITEMS, item))
            if RECORD:
                if tile < _RECORD_TILES:
                    gl.store(rec + tile * _RECORD_FIELDS + 9, _clock(w))
            for j in range(num_blocks):
                n0 = start + j * _BLOCK_N
                s = block % STAGES
                phase = ((block // STAGES) & 1) ^ 1
                if GATHER:
                    offsets = key_offsets.index(block % 2)
                    _gather_rows(offsets, n0, kv_len, kv_offset, kv_head, PAGE_INDICES, rows_per_page, head_row,
                                 row_stride, kv_head * head_col, PAGE_SIZE, num_warps)
                    mbarrier.wait(k_empty.index(s), phase)
                    _gather_block(K, k_bufs.index(s), offsets, HEAD_DIM, num_warps)
                    async_copy.mbarrier_arrive(k_ready.index(s), increment_count=False)
                    mbarrier.wait(v_empty.index(s), phase)
                    _gather_block(V, v_bufs.index(s), offsets, HEAD_DIM, num_warps)
                    async_copy.mbarrier_arrive(v_ready.index(s), increment_count=False)
                else:
                    offs_p, rows = _block_rows(n0, kv_len, kv_offset, kv_head, PAGE_INDICES, rows_per_page,
                                               head_row, oob_row, PAGED, PAGE_SIZE)
                    mbarrier.wait(k_empty.index(s), phase)
                    mbarrier.expect(k_ready.index(s), kv_bytes)
                    _load_kv_block(k_desc, k_bufs.index(s), k_ready.index(s), n0, kv_offset, kv_head, offs_p, rows,
                                   head_col, PAGED, PAGE_SIZE)
                    mbarrier.wait(v_empty.index(s), phase)
                    mbarrier.expect(v_ready.index(s), kv_bytes)
                    if V_T:  # the head's [HEAD_DIM, BLOCK_N] box of the copy: keys contiguous, zeros past the request
                        tma_load(v_desc, [kv_head * HEAD_DIM, v_t_start + n0], v_ready.index(s), v_bufs.index(s))
                    else:
                        _load_kv_block(v_desc, v_bufs.index(s), v_ready.index(s), n0, kv_offset, kv_head, offs_p,
                                       rows, head_col, PAGED, PAGE_SIZE)
                block += 1
            if RECORD:
                if tile < _RECORD_TILES:
                    gl.store(rec + tile * _RECORD_FIELDS + 10, _clock(w))
            tile += 1
            w = gl.atomic_add(COUNTS + 3, 1)
        # The last program to find the work gone resets the counter for the next launch.
        if w == total + gl.num_programs(0) - 1:
            gl.atomic_xchg(COUNTS + 3, 0)
        qi = tile % 2
        mbarrier.wait(q_empty.index(qi), ((tile // 2) & 1) ^ 1)
        _publish_unit(unit_info.index(qi), -1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, num_warps)  # no more work
        mbarrier.arrive(q_ready.index(qi), count=1)

    @gluon.jit
    def _wait_kv(bar, phase, GATHER: gl.constexpr):
        """Wait for a K or V block. Gather mode's ``cp.async`` copies write through the generic proxy:
        fence them before the wgmma (async proxy) reads the buffer."""
        mbarrier.wait(bar, phase)
        if GATHER:
            fence_async_shared()

    @gluon.jit
    def _ready_values(v_buf, v_bar, phase, n0, kv_len, fix_layout: gl.constexpr, dtype: gl.constexpr,
                      GATHER: gl.constexpr, V_T: gl.constexpr):
        """Wait for a V block and return it as the B operand of ``P @ V``. TMA copies: rows past the keys are
        zeroed in shared memory first (another request's rows or a page's unwritten slots: 0 * NaN would
        poison the product); gather mode zero-fills them in the copy, and the transposed copy of V (V_T:
        a ``[HEAD_DIM, BLOCK_N]`` buffer, keys contiguous as an fp8 B operand must be) holds zeros there."""
        _wait_kv(v_bar, phase, GATHER)
        operand = v_buf
        if V_T:
            operand = v_buf.permute((1, 0))
        elif not GATHER:
            if n0 + _BLOCK_N > kv_len:
                rows = n0 + gl.arange(0, _BLOCK_N, layout=gl.SliceLayout(1, fix_layout))
                v_tile = v_buf.load(fix_layout)
                v_buf.store(gl.where(rows[:, None] < kv_len, v_tile, 0.0).to(dtype))
                fence_async_shared()
                cta_barrier()
        return operand

    @gluon.jit
    def _release_staged(q_empty, staged, O_TMA: gl.constexpr):
        """Hand a Q buffer that staged an output back to the producer once the TMA stores have read it."""
        if O_TMA:  # (without TMA stores ``staged`` is the constant -1: no index -1 may be compiled)
            if staged >= 0:
                tma.store_wait(0)
                mbarrier.arrive(q_empty.index(staged), count=1)
        return -1

    @gluon.jit
    def _weights_in_shared(p, dtype: gl.constexpr, p_buf):
        """P_SMEM: the softmax weights ``p`` (float32) written to ``p_buf`` in ``dtype`` as the A operand of
        ``P @ V`` (a single buffer: the caller has waited for the product that read the previous weights). The
        default keeps them in registers (a ``gl.convert_layout`` at the call site: routed through a helper,
        gather mode's SASS changes)."""
        p_buf.store(p.to(dtype))
        fence_async_shared()
        cta_barrier()  # the warpgroup's rows all written before its wgmma reads them
        return p_buf

    @gluon.jit
    def _consumer(q_bufs, k_bufs, v_bufs, p_buf, unit_info, bars, o_desc, O, LSE, PART_O, PART_LSE, TIMES,
                  num_kv_heads, stride_ot, stride_oh, stride_lt, stride_lh, qk_scale_log2, FP8_SCALES,
                  GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, GATHER: gl.constexpr,
                  O_TMA: gl.constexpr, RECORD: gl.constexpr, V_T: gl.constexpr, P_SMEM: gl.constexpr,
                  ROW0: gl.constexpr, ROWS: gl.constexpr, num_warps: gl.constexpr):
        """Rows ``ROW0 .. ROW0 + ROWS`` of every tile.

        The output of a tile whose rows are all in its request leaves through the tile's own Q buffer
        (these rows of it are no longer read) and TMA stores, so the stores neither occupy the
        warps nor queue in front of the producer's loads; the Q buffer is handed back to the producer
        once the next tile's first product is issued (by then the store has read it). Partial tiles,
        split tiles' partial states and outputs TMA cannot address are stored from registers."""
        q_ready, q_empty, k_ready, k_empty, v_ready, v_empty = bars
        STAGES: gl.constexpr = k_bufs.shape[0]  # the K/V ring depth (the kernel's STAGES)
        TOKENS: gl.constexpr = _BLOCK_M // GROUP
        # Both products accumulate in one wgmma layout (instruction N = the head dim, at most BLOCK_N), so
        # the softmax's row statistics broadcast onto the output; a warpgroup owns 64 rows. An instruction's K
        # and a register operand's width are 32 bytes and 4 bytes: 16 and 2 elements of 16 bits, 32 and 4 of fp8.
        dtype: gl.constexpr = q_bufs.dtype
        BITS: gl.constexpr = dtype.primitive_bitwidth
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, HEAD_DIM, 256 // BITS])
        o_layout: gl.constexpr = s_layout
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=32 // BITS)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
        fix_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        RECORDS: gl.constexpr = RECORD and ROW0 == 0
        O_BOX: gl.constexpr = o_desc.block_shape[0]  # rows of one TMA store: one head's tokens (or ROWS)
        offs_m = ROW0 + gl.arange(0, ROWS, layout=row_layout)
        offs_n = gl.arange(0, _BLOCK_N, layout=col_layout)
        head_of_row = offs_m // TOKENS
        token_of_row = offs_m % TOKENS
        tile = 0
        block = 0
        staged = -1  # the Q buffer whose output store may still be reading it (-1: none)
        rec = TIMES + gl.program_id(0) * (_RECORD_TILES * _RECORD_FIELDS)
        t_wait = 0
        if RECORDS:
            t_wait = _clock(tile)  # int64 from here on
        w = _next_unit(unit_info, q_ready, tile, num_warps)
        while w >= 0:
            qi = tile % 2
            v, f = _tile_fields(unit_info.index(qi), num_warps)
            kv_len = _field(v, f, _F_KV_LEN)
            t_first = _field(v, f, _F_T_FIRST)
            start = _field(v, f, _F_START)
            full_end = _field(v, f, _F_FULL_END)
            num_blocks = _field(v, f, _F_NUM_BLOCKS)
            if RECORDS:
                if tile < _RECORD_TILES:
                    gl.store(rec + tile * _RECORD_FIELDS, t_wait)
                    gl.store(rec + tile * _RECORD_FIELDS + 1, _clock(w))
                    gl.store(rec + tile * _RECORD_FIELDS + 6, num_blocks.to(gl.int64))
            if RECORDS:
                kv_stall = (t_first * 0).to(gl.int64)  # cycles spent waiting for K/V inside the loop
            positions = t_first + token_of_row + _field(v, f, _F_DELTA)  # the rows' key positions
            logit_scale = qk_scale_log2
            if FP8_SCALES is not None:  # FP8: each row's sm_scale * scale_q[head] * scale_k[kv_head] * log2(e)
                kv_head_scale = gl.load(FP8_SCALES[1] + _field(v, f, _F_KV_HEAD) * FP8_SCALES[4]) * qk_scale_log2
                row_heads = _field(v, f, _F_KV_HEAD) * GROUP + head_of_row
                logit_scale = (gl.load(FP8_SCALES[0] + row_heads * FP8_SCALES[3]) * kv_head_scale)[:, None]
            q_buf = q_bufs.index(qi).slice(ROW0, ROWS)
            m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_layout)
            l_i = gl.zeros([ROWS], gl.float32, layout=row_layout)
            acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
            s_zero = gl.zeros([ROWS, _BLOCK_N], gl.float32, layout=s_layout)
            if num_blocks > 0:
                # Block j's softmax runs while the tensor cores do block j-1's P @ V: per iteration,
                # issue S_j = Q K_j^T and O += P_{j-1} V_{j-1}, wait for S_j only, release K_j, do the
                # softmax, then wait for the product, release V_{j-1} and rescale O.
                s = block % STAGES
                phase = (block // STAGES) & 1
                _wait_kv(k_ready.index(s), phase, GATHER)
                if RECORDS:
                    if tile < _RECORD_TILES:
                        gl.store(rec + tile * _RECORD_FIELDS + 2, _clock(s))
                qk = warpgroup_mma(q_buf, k_bufs.index(s).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                staged = _release_staged(q_empty, staged, O_TMA)
                qk, _, _ = warpgroup_mma_wait(num_outstanding=0, deps=(qk, q_buf, k_bufs.index(s)))
                mbarrier.arrive(k_empty.index(s), count=1)
                x = _mask_logits(qk * logit_scale, start, full_end, kv_len, offs_n, positions, CAUSAL)
                m_i, l_i, alpha, p = softmax_step(m_i, l_i, x)
                if P_SMEM:
                    p_op = _weights_in_shared(p, dtype, p_buf)
                else:
                    p_op = gl.convert_layout(p.to(dtype), p_layout)
                if RECORDS:
                    if tile < _RECORD_TILES:
                        gl.store(rec + tile * _RECORD_FIELDS + 3, _clock(s))
                prev_s = s
                prev_phase = phase
                prev_n0 = start
                block += 1
                for j in range(1, num_blocks):
                    n0 = start + j * _BLOCK_N
                    s = block % STAGES
                    phase = (block // STAGES) & 1
                    if RECORDS:
                        c0 = _clock(s)
                    _wait_kv(k_ready.index(s), phase, GATHER)
                    if RECORDS:
                        kv_stall += _clock(s) - c0
                    qk = warpgroup_mma(q_buf, k_bufs.index(s).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                    if RECORDS:
                        c0 = _clock(s)
                    v_prev = _ready_values(v_bufs.index(prev_s), v_ready.index(prev_s), prev_phase, prev_n0, kv_len,
                                           fix_layout, dtype, GATHER, V_T)
                    if RECORDS:
                        kv_stall += _clock(s) - c0
                    acc = warpgroup_mma(p_op, v_prev, acc, is_async=True)
                    qk, _, _ = warpgroup_mma_wait(num_outstanding=1, deps=(qk, q_buf, k_bufs.index(s)))
                    mbarrier.arrive(k_empty.index(s), count=1)
                    x = _mask_logits(qk * logit_scale, n0, full_end, kv_len, offs_n, positions, CAUSAL)
                    m_i, l_i, alpha, p = softmax_step(m_i, l_i, x)
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, v_prev))[0]
                    mbarrier.arrive(v_empty.index(prev_s), count=1)
                    acc = acc * alpha[:, None]
                    if P_SMEM:
                        p_op = _weights_in_shared(p, dtype, p_buf)
                    else:
                        p_op = gl.convert_layout(p.to(dtype), p_layout)
                    prev_s = s
                    prev_phase = phase
                    prev_n0 = n0
                    block += 1
                v_prev = _ready_values(v_bufs.index(prev_s), v_ready.index(prev_s), prev_phase, prev_n0, kv_len,
                                       fix_layout, dtype, GATHER, V_T)
                acc = warpgroup_mma(p_op, v_prev, acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, v_prev))[0]
                mbarrier.arrive(v_empty.index(prev_s), count=1)
            else:
                staged = _release_staged(q_empty, staged, O_TMA)
            # The epilogue's fields, read again (the Q buffer, and with it the fields, is not handed back yet).
            v, f = _tile_fields(unit_info.index(qi), num_warps)
            kv_head = _field(v, f, _F_KV_HEAD)
            slot = _field(v, f, _F_SLOT)
            qo_start = _field(v, f, _F_QO_START)
            qo_len = _field(v, f, _F_QO_LEN)
            t_first = _field(v, f, _F_T_FIRST)
            tokens = t_first + token_of_row
            via_tma = False
            if O_TMA:
                via_tma = slot < 0 and t_first + TOKENS <= qo_len
            if not via_tma:
                mbarrier.arrive(q_empty.index(qi), count=1)
            if RECORDS:
                if tile < _RECORD_TILES:
                    gl.store(rec + tile * _RECORD_FIELDS + 4, _clock(tile))
                    gl.store(rec + tile * _RECORD_FIELDS + 7, kv_stall)

            o, lse = finalize_state(m_i, l_i, acc)
            if FP8_SCALES is not None:  # scale_v of the KV head, also before a split's partial state (linear merge)
                o = o * gl.load(FP8_SCALES[2] + kv_head * FP8_SCALES[5])
            offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
            o_tokens = t_first + gl.convert_layout(token_of_row, gl.SliceLayout(1, o_layout))
            o_heads = kv_head * GROUP + gl.convert_layout(head_of_row, gl.SliceLayout(1, o_layout))
            o_ok = o_tokens < qo_len
            if O_TMA:  # (a constexpr guard: without it the dead branch still reaches the LLVM lowering)
                if via_tma:
                    q_buf.store(o.to(dtype))
                    fence_async_shared()
                    cta_barrier()  # every thread's rows in shared memory before the copies start
                    for b in gl.static_range(ROWS // O_BOX):  # one box per query head: rows are head-major
                        tma_store(
                            o_desc, [qo_start + t_first + (ROW0 + b * O_BOX) % TOKENS,
                                     (kv_head * GROUP + (ROW0 + b * O_BOX) // TOKENS) * HEAD_DIM],
                            q_buf.slice(b * O_BOX, O_BOX))
                    staged = qi
            if slot < 0:
                if not via_tma:
                    o_rows = (qo_start + o_tokens).to(gl.int64) * stride_ot + o_heads * stride_oh
                    gl.store(O + o_rows[:, None] + offs_d[None, :], o.to(O.dtype.element_ty), mask=o_ok[:, None])
                l_rows = (qo_start + tokens).to(gl.int64) * stride_lt + (kv_head * GROUP + head_of_row) * stride_lh
                gl.store(LSE + l_rows, lse, mask=tokens < qo_len)
            else:
                # Partial states keep the Triton kernel's token-major row order (the merge reads it).
                base = (slot.to(gl.int64) * num_kv_heads + kv_head) * _BLOCK_M
                o_part = base + (o_tokens - t_first) * GROUP + (o_heads - kv_head * GROUP)
                gl.store(PART_O + o_part[:, None] * HEAD_DIM + offs_d[None, :], o, mask=o_ok[:, None])
                l_part = base + token_of_row * GROUP + head_of_row
                gl.store(PART_LSE + l_part, lse, mask=tokens < qo_len)
            if RECORDS:
                t_wait = _clock(tile)
                if tile < _RECORD_TILES:
                    gl.store(rec + tile * _RECORD_FIELDS + 5, t_wait)
            tile += 1
            w = _next_unit(unit_info, q_ready, tile, num_warps)
        _release_staged(q_empty, staged, O_TMA)  # the last store must finish reading before the program exits

    @direct_launch  # launches skip Triton's binder (~150 us for this signature: launch.py)
    @gluon.jit
    def _hopper_prefill_kernel(q_desc, k_desc, v_desc, o_desc, K, V, O, LSE, PART_O, PART_LSE, PAGE_INDICES, COUNTS,
                               REQS, ITEMS, TIMES, num_kv_heads, stride_ot, stride_oh, stride_lt, stride_lh,
                               qk_scale_log2,
                               rows_per_page, head_row, head_col, oob_row, row_stride,
                               GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr,
                               PAGED: gl.constexpr, PAGE_SIZE: gl.constexpr, GATHER: gl.constexpr,
                               O_TMA: gl.constexpr, RECORD: gl.constexpr, STAGES: gl.constexpr,
                               num_warps: gl.constexpr, FP8_SCALES=None, V_T: gl.constexpr = False,
                               P_SMEM: gl.constexpr = False):
        """FP8_SCALES (FP8 q, k and v): ``(SCALE_Q [Hq], SCALE_K [Hkv], SCALE_V [Hkv], stride_q, stride_k,
        stride_v)`` as the Triton kernels take them (tiles.fp8_row_scales), or None. V_T: ``v_desc`` views
        ragged_fp8_v_layout's transposed copy of V, ``[heads * HEAD_DIM, keys]``. P_SMEM: the weights reach
        ``P @ V`` through shared memory (FP8_P_IN_SHARED)."""
        dtype: gl.constexpr = q_desc.dtype
        tile_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([_BLOCK_M, HEAD_DIM], dtype)
        q_bufs = gl.allocate_shared_memory(dtype, [2, _BLOCK_M, HEAD_DIM], tile_layout)
        k_bufs = gl.allocate_shared_memory(dtype, [STAGES, _BLOCK_N, HEAD_DIM], tile_layout)
        if P_SMEM:  # each consumer's weights, [64 rows, BLOCK_N]
            p_bufs = gl.allocate_shared_memory(dtype, [2, _BLOCK_M // 2, _BLOCK_N],
                                               gl.NVMMASharedLayout.get_default_for([_BLOCK_M // 2, _BLOCK_N], dtype))
            p_buf0 = p_bufs.index(0)
            p_buf1 = p_bufs.index(1)
        else:  # the weights stay in registers; the partitions already take q_bufs, so passing it adds no capture
            p_buf0 = q_bufs
            p_buf1 = q_bufs
        if V_T:  # [HEAD_DIM, BLOCK_N] boxes of the transposed copy
            v_bufs = gl.allocate_shared_memory(dtype, [STAGES, HEAD_DIM, _BLOCK_N],
                                               gl.NVMMASharedLayout.get_default_for([HEAD_DIM, _BLOCK_N], dtype))
        else:
            v_bufs = gl.allocate_shared_memory(dtype, [STAGES, _BLOCK_N, HEAD_DIM], tile_layout)
        plain_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
        unit_info = gl.allocate_shared_memory(gl.int32, [2, _INFO], plain_layout)
        key_offsets = gl.allocate_shared_memory(gl.int64, [2, _BLOCK_N], plain_layout)  # gather mode (_gather_rows)
        q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        # TMA copies complete a ready barrier with one arrival (plus the bytes); gather mode's cp.async
        # copies with one arrival per producer thread.
        PRODUCER_WARPS: gl.constexpr = _GATHER_WARPS if GATHER else 1
        KV_ARRIVALS: gl.constexpr = 32 * PRODUCER_WARPS if GATHER else 1
        for i in gl.static_range(2):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=2)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=KV_ARRIVALS)
            mbarrier.init(k_empty.index(i), count=2)
            mbarrier.init(v_ready.index(i), count=KV_ARRIVALS)
            mbarrier.init(v_empty.index(i), count=2)
        bars = (q_ready, q_empty, k_ready, k_empty, v_ready, v_empty)
        # Two 4-warp consumers of 64 rows each, free to drift (one's softmax under the other's products).
        gl.warp_specialize([
            (_consumer, (q_bufs, k_bufs, v_bufs, p_buf0, unit_info, bars, o_desc, O, LSE, PART_O, PART_LSE,
                         TIMES, num_kv_heads, stride_ot, stride_oh, stride_lt, stride_lh, qk_scale_log2, FP8_SCALES,
                         GROUP, HEAD_DIM, CAUSAL, GATHER, O_TMA, RECORD, V_T, P_SMEM, 0, _BLOCK_M // 2, num_warps)),
            (_consumer, (q_bufs, k_bufs, v_bufs, p_buf1, unit_info, bars, o_desc, O, LSE, PART_O, PART_LSE,
                         TIMES, num_kv_heads, stride_ot, stride_oh, stride_lt, stride_lh, qk_scale_log2, FP8_SCALES,
                         GROUP, HEAD_DIM, CAUSAL, GATHER, O_TMA, RECORD, V_T, P_SMEM, _BLOCK_M // 2, _BLOCK_M // 2,
                         num_warps)),
            (_producer, (q_desc, k_desc, v_desc, K, V, q_bufs, k_bufs, v_bufs, key_offsets, unit_info, bars, COUNTS,
                         REQS, ITEMS, PAGE_INDICES, num_kv_heads, rows_per_page, head_row, head_col, oob_row,
                         row_stride, TIMES, GROUP, HEAD_DIM, CAUSAL, PAGED, PAGE_SIZE, GATHER,
                         RECORD, V_T, PRODUCER_WARPS)),
        ], [num_warps, PRODUCER_WARPS], [_CONSUMER_REGS, _PRODUCER_REGS])


def out_tma_ok(out: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether TMA stores can write ``out`` ``[T, H, D]``: q's dtype, heads of a token contiguous,
    16-byte aligned rows."""
    return (out.dtype == q.dtype and out.stride(2) == 1 and out.stride(1) == out.shape[2]
            and (out.stride(0) * out.element_size()) % 16 == 0 and out.data_ptr() % 16 == 0)


def _kv_descriptor(x: torch.Tensor, paged: bool, head_dim: int, rows: int, cols: int, row_stride: int):
    """The TMA view of K or V (:func:`_kv_rows`) with boxes of one page of one head (paged) or BLOCK_N
    keys of one head (ragged)."""
    box_rows = x.shape[1] if paged else BLOCK_N
    return GluonTensorDescriptor(x, [rows, cols], [row_stride, 1], [box_rows, head_dim],
                                 nvmma_layout(box_rows, head_dim, x.dtype))


def _token_descriptor(x: torch.Tensor, box_rows: int):
    """The TMA view of Q or O ``[T, H, D]`` as ``[T, H * D]`` with boxes of ``box_rows`` tokens of one head."""
    head_dim = x.shape[2]
    return GluonTensorDescriptor(x, [x.shape[0], x.shape[1] * head_dim], [x.stride(0), 1], [box_rows, head_dim],
                                 nvmma_layout(box_rows, head_dim, x.dtype))


def hopper_prefill_forward(q, k, v, views, page_indices, counts, reqs, items, part_o, part_lse, out, lse,
                           qk_scale_log2: float, causal: bool, num_items: int, num_sms: int,
                           record: Optional[torch.Tensor] = None, fp8_scales: Optional[tuple] = None,
                           v_t: Optional[torch.Tensor] = None) -> None:
    """Launch the warp-specialized kernel over the plan's items (arguments as batch_prefill_forward;
    ``counts``/``reqs``/``items`` are the plan's sections; ``views`` from :func:`hopper_prefill_views`).
    ``record``: int64 ``[grid, RECORD_TILES, RECORD_FIELDS]`` for a per-tile timeline of the first
    consumer (benchmarks/tools/hopper_prefill_timeline.py), or None. FP8 attention: ``fp8_scales`` as
    batch_prefill_forward's, and ``v_t`` the transposed copy of V ``[heads, dim, keys]`` (ragged_fp8_v_layout)."""
    num_qo_heads, head_dim = q.shape[1], q.shape[2]
    paged = page_indices is not None
    num_kv_heads = k.shape[2] if paged else k.shape[1]
    group = num_qo_heads // num_kv_heads
    tokens = BLOCK_M // group
    gather = use_gather(k.shape[1] if paged else None)
    q_desc = _token_descriptor(q, tokens)
    (k_view_rows, *k_view), (v_view_rows, *v_view) = views
    if gather:  # the descriptors are not read: any box will do
        k_desc = v_desc = q_desc
    else:
        k_desc = _kv_descriptor(k, paged, head_dim, k_view_rows, *k_view[:2])
        v_desc = _kv_descriptor(v, paged, head_dim, v_view_rows, *v_view[:2])
    fp8 = {}
    if fp8_scales is not None and v_t is None:
        raise ValueError("v_t: FP8 attention reads V from its transposed copy (ragged_fp8_v_layout); got None")
    if fp8_scales is not None and v_t is not None:
        heads, dim, size = v_t.shape
        v_desc = GluonTensorDescriptor(v_t, [heads * dim, size], [size, 1], [dim, BLOCK_N],
                                       nvmma_layout(dim, BLOCK_N, v_t.dtype))
        fp8 = {"FP8_SCALES": fp8_kwargs(fp8_scales)["FP8_SCALES"], "V_T": True}
        if FP8_P_IN_SHARED:
            fp8["P_SMEM"] = True
    o_tma = out_tma_ok(out, q)
    # A consumer's 64 rows leave as one box per query head (or as half of one head's 128 tokens).
    o_desc = _token_descriptor(out, min(tokens, BLOCK_M // 2)) if o_tma else q_desc
    coords = (*k_view[2:], max(k_view_rows, v_view_rows))  # rows_per_page, head_row, head_col, a row past both views
    grid = max(1, min(num_sms, num_items * num_kv_heads))
    _hopper_prefill_kernel[(grid,)](
        q_desc, k_desc, v_desc, o_desc, k, v, out, lse, part_o, part_lse, page_indices if paged else counts, counts,
        reqs, items, record if record is not None else counts, num_kv_heads, out.stride(0), out.stride(1),
        lse.stride(0),
        lse.stride(1), qk_scale_log2, *coords, k_view[1],  # gather mode's row stride (V's is the same)
        GROUP=group, HEAD_DIM=head_dim, CAUSAL=causal, PAGED=paged, PAGE_SIZE=k.shape[1] if paged else 1,
        GATHER=gather, O_TMA=o_tma, RECORD=record is not None, STAGES=hopper_stages(head_dim), num_warps=4,
        maxnreg=MAX_REGS, **fp8)


def hopper_stages(head_dim: int) -> int:
    """The K/V ring depth for ``head_dim`` (STAGES_BY_HEAD_DIM, or the tuning grid's STAGES_OVERRIDE)."""
    return STAGES_OVERRIDE if STAGES_OVERRIDE is not None else STAGES_BY_HEAD_DIM[head_dim]
