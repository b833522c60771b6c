"""Warp-specialized DeepSeek MLA for Hopper (sm_90), written in Gluon.

Why a second MLA kernel: with 64 or more heads, MLA decode is compute-bound (every head of a request
reads the same 576-wide latent), and the Triton kernel (mla.py) wastes the tensor cores there. At 8
warps Triton lays the 64 x BLOCK_N logits over both warpgroups along M, so both compute the same
logits (``warpsPerCTA [8, 1]``, m64n16 wgmmas: the 576-deep product, over half of the work, runs
twice), and one program both waits for its latent tiles and computes. This kernel splits the roles
by hand:

- a *producer* warp issues TMA copies of the tile's queries (``q_nope`` and ``q_pe``, 64 rows) and
  of each block of ``BLOCK_N`` latent rows (``ckv`` and ``kpe``: one box per page) into a ring of
  ``STAGES`` shared-memory buffers. Pages a box cannot serve (fewer than 8 keys, e.g. SGLang's page
  size 1) go through *gather mode*: a warpgroup of producer threads issues ``cp.async`` copies key by
  key;
- the *softmax warpgroup* (the default partition, 4 warps) computes each block's 64 x BLOCK_N logits
  ``Qn Ckv^T + Qp Kpe^T`` once, runs the online softmax (the shared helper, softmax.py), writes the
  weights ``P`` and the rescale factor to shared memory, and accumulates the left half of the output
  columns, ``O[:, :256] += P Ckv[:, :256]``;
- the *output warpgroup* (4 warps) takes each block's ``P`` and factor and accumulates the right
  half, ``O[:, 256:] += P Ckv[:, 256:]``, while the softmax warpgroup computes the next logits.

So the logits are computed once, the two products of a block overlap, and each warpgroup holds a
64 x 256 float32 accumulator (128 registers a thread). Shared memory: the queries (72 KiB), two
latent stages (144 KiB) and ``P`` (8 KiB): 224 KiB, within an H100's 227.

The plan is the Triton kernel's (scheduler/mla_work.py: items of one request's 64-row tile and KV
chunk), and the outputs and partial states are written in the same places, so the merge kernel and
CUDA-graph mode are shared. The grid is persistent, one program per SM (its shared memory allows one).

Scope (:func:`hopper_mla_layout` decides): bf16 or fp16 queries and latent cache of one dtype (an fp8
latent runs the Triton kernel), latent 512 and rope 64 wide, 64-row tiles (the plan's ``block_m``: 33
or more rows per request, e.g. 64 or 128 heads, or 16 heads with 4 query tokens), no attention variant
or sinks; queries whose heads are rows of one 2-D view (``stride(0) == heads * stride(1)``), caches
whose slots are rows of one (``stride(0) == page_size * stride(1)``). ``FLASHTILE_HOPPER_MLA=0``
(settings.py) turns it off: the Triton kernel then runs every batch.

Only the GPU runs this module (the interpreter cannot run Gluon): tests/test_mla.py's GPU tests
check it against the float64 oracle.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._core import settings
from .._core.launch import direct_launch
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
        tma_load,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

from .softmax import finalize_state, softmax_step

__all__ = ["hopper_mla_enabled", "hopper_mla_layout", "hopper_mla_forward", "use_gather", "BLOCK_M", "BLOCK_N"]

BLOCK_M = 64  # (token, head) rows of a tile: one wgmma M, the plan's 64-row tiles
BLOCK_N = 64  # latent rows per block
D_CKV = 512
D_KPE = 64
STAGES = 2  # latent blocks in flight: 2 x 72 KiB (a third does not fit beside the queries)
# Registers per thread, as in batch_prefill_hopper.py: two 4-warp consumers and a producer warp (a
# warpgroup in gather mode); 12 warps x 32 threads x MAX_REGS <= 65536.
PRODUCER_REGS = 24
CONSUMER_REGS = 240
MAX_REGS = 168
GATHER_WARPS = 4  # producer warps in gather mode
# Issue each block's logits before the previous block's left product (_overlapped_blocks). Off until timed: the
# mla suite's ``gluon`` tune times both.
OVERLAP_LOGITS = False
# Benchmarks set this to True or False to choose the kernel whatever the setting says (None: the setting).
ENABLED_OVERRIDE: Optional[bool] = None


def hopper_mla_enabled() -> bool:
    """Whether the warp-specialized kernel may run: the kill-switch ``FLASHTILE_HOPPER_MLA`` (settings.py; on by
    default), unless ENABLED_OVERRIDE says otherwise."""
    return settings.flag("FLASHTILE_HOPPER_MLA") if ENABLED_OVERRIDE is None else ENABLED_OVERRIDE


def use_gather(page_size: int) -> bool:
    """Latent blocks through ``cp.async`` gathers instead of TMA boxes: pages a box cannot serve (fewer
    than 8 keys, or neither dividing BLOCK_N nor a multiple of it)."""
    return page_size % 8 != 0 or (BLOCK_N % page_size != 0 and page_size % BLOCK_N != 0)


def _rows_view(x: torch.Tensor) -> bool:
    """``x`` ``[A, B, D]`` is a 2-D view ``[A * B, D]`` of unit column stride whose rows start on 16 bytes."""
    return (x.stride(2) == 1 and x.stride(0) == x.shape[1] * x.stride(1) and (x.stride(1) * x.element_size()) % 16 == 0
            and x.data_ptr() % 16 == 0 and x.shape[0] * x.shape[1] < 2**31)


def hopper_mla_layout(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
                      block_m: int, plain: bool) -> bool:
    """Whether the tensors' dtypes, widths and strides are in this kernel's scope (module doc), without
    looking at the device or the setting. ``plain``: no attention variant, sinks or cache scales."""
    if not plain or block_m != BLOCK_M or q_nope.dtype not in (torch.float16, torch.bfloat16):
        return False
    if any(t.dtype != q_nope.dtype for t in (q_pe, ckv_cache, kpe_cache)):
        return False
    if q_nope.shape[2] != D_CKV or q_pe.shape[2] != D_KPE or ckv_cache.shape[2] != D_CKV or kpe_cache.shape[2] != D_KPE:
        return False
    return all(_rows_view(t) for t in (q_nope, q_pe, ckv_cache, kpe_cache))


def hopper_mla_usable(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
                      block_m: int, plain: bool) -> bool:
    """:func:`hopper_mla_layout` on an sm_90 GPU with Gluon, the kernel not switched off."""
    if not (_HAVE_GLUON and hopper_mla_enabled() and q_nope.is_cuda):
        return False
    return (torch.cuda.get_device_capability(q_nope.device) == (9, 0)
            and hopper_mla_layout(q_nope, q_pe, ckv_cache, kpe_cache, block_m, plain))


if _HAVE_GLUON:
    _BLOCK_M = gl.constexpr(BLOCK_M)
    _BLOCK_N = gl.constexpr(BLOCK_N)
    _D_CKV = gl.constexpr(D_CKV)
    _D_KPE = gl.constexpr(D_KPE)
    _HALF = gl.constexpr(D_CKV // 2)
    _STAGES = gl.constexpr(STAGES)
    _CONSUMER_REGS = gl.constexpr(CONSUMER_REGS)
    _PRODUCER_REGS = gl.constexpr(PRODUCER_REGS)
    _GATHER_WARPS = gl.constexpr(GATHER_WARPS)

    @gluon.jit
    def _item(WORK, w, req_offset, item_offset, KV_LEN, num_heads, CAUSAL: gl.constexpr):
        """The fields of work item ``w`` (scheduler/mla_work.py) and its latent blocks: keys
        ``[kv_start, hi)`` in ``num_blocks`` blocks of BLOCK_N (``hi``: the chunk's end, cut at the last
        key a row of the tile sees when causal). Every partition decodes its items itself."""
        item = WORK + item_offset + w * 5
        b = gl.load(item)
        row0 = gl.load(item + 1)
        kv_start = gl.load(item + 2)
        hi = gl.load(item + 3)
        split = gl.load(item + 4)
        req = WORK + req_offset + b * 4
        qo_start = gl.load(req)
        rows = gl.load(req + 3)
        kv_len = gl.load(KV_LEN + b)
        qo_len = rows // num_heads
        if CAUSAL:
            hi = gl.minimum(hi, kv_len - qo_len + (gl.minimum(row0 + _BLOCK_M, rows) - 1) // num_heads + 1)
        num_blocks = gl.maximum(hi - kv_start + _BLOCK_N - 1, 0) // _BLOCK_N
        return b, row0, kv_start, hi, split, req, qo_start, rows, kv_len, qo_len, num_blocks

    @gluon.jit
    def _load_block(ckv_desc, kpe_desc, ckv_buf, kpe_buf, bar, n0, kv_len, page0, KV_INDICES, page_size, oob_row,
                    BOX: gl.constexpr):
        """TMA copies of latent rows ``[n0, n0 + BLOCK_N)`` of one request, one box of ``BOX`` rows per page
        (or per BLOCK_N rows of a longer page); boxes past the request's keys read ``oob_row``, past the
        end of the view, which TMA fills with zeros."""
        for i in gl.static_range(_BLOCK_N // BOX):
            key = n0 + i * BOX
            page = gl.load(KV_INDICES + page0 + key // page_size, mask=key < kv_len, other=0)
            row = gl.where(key < kv_len, page * page_size + key % page_size, oob_row)
            tma_load(ckv_desc, [row, 0], bar, ckv_buf.slice(i * BOX, BOX))
            tma_load(kpe_desc, [row, 0], bar, kpe_buf.slice(i * BOX, BOX))

    @gluon.jit
    def _gather_rows(base, row_stride, buf, keys_rows, WIDTH: gl.constexpr, num_warps: gl.constexpr):
        """Gather mode: ``cp.async`` copies of BLOCK_N latent rows (``WIDTH`` elements each from ``base``;
        view rows ``keys_rows``, -1: a key past the request, zero-filled) into ``buf``, 4096 elements (four
        16-byte copies a thread) at a time so that the addresses fit the producer's registers."""
        THREADS_D: gl.constexpr = WIDTH // 8 if WIDTH // 8 < 32 else 32
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // THREADS_D, THREADS_D], [num_warps, 1], [1, 0])
        STEP: gl.constexpr = 4096 // WIDTH  # rows per step: 8 of the latent, 64 of the rope part
        offs_d = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, layout))
        for r in gl.static_range(_BLOCK_N // STEP):
            rows = keys_rows.slice(r * STEP, STEP).load(gl.SliceLayout(1, layout))
            # Multiples of 8 elements (16 bytes): the host checks the strides (_rows_view).
            offs = gl.multiple_of(rows.to(gl.int64) * row_stride, 8)
            cp_async_load(buf.slice(r * STEP, STEP),
                                                   base + offs[:, None] + offs_d[None, :], mask=(rows >= 0)[:, None])

    @gluon.jit
    def _producer(qn_desc, qp_desc, ckv_desc, kpe_desc, CKV, KPE, qn_buf, qp_buf, ckv_bufs, kpe_bufs, keys_rows, bars,
                  WORK, KV_INDPTR, KV_INDICES, KV_LEN, req_offset, item_offset, num_heads, page_size, oob_row,
                  ckv_row_stride, kpe_row_stride, CAUSAL: gl.constexpr, BOX: gl.constexpr, GATHER: gl.constexpr,
                  num_warps: gl.constexpr):
        q_ready, q_empty, kv_ready, kv_empty, p_ready, p_empty = bars
        q_bytes: gl.constexpr = _BLOCK_M * (_D_CKV + _D_KPE) * 2
        kv_bytes: gl.constexpr = _BLOCK_N * (_D_CKV + _D_KPE) * 2
        key_layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        block = 0
        count = 0
        for w in range(gl.program_id(0), gl.load(WORK), gl.num_programs(0)):
            (b, row0, kv_start, hi, split, req, qo_start, rows, kv_len, qo_len,
             num_blocks) = _item(WORK, w, req_offset, item_offset, KV_LEN, num_heads, CAUSAL)
            page0 = gl.load(KV_INDPTR + b)
            mbarrier.wait(q_empty, (count & 1) ^ 1)
            mbarrier.expect(q_ready, q_bytes)
            # The tile's rows are view rows qo_start * H + row0 ...: (token, head) pairs in the plan's order;
            # rows past the request belong to the next one (never stored) or lie past the view (zeros).
            tma_load(qn_desc, [qo_start * num_heads + row0, 0], q_ready, qn_buf)
            tma_load(qp_desc, [qo_start * num_heads + row0, 0], q_ready, qp_buf)
            for j in range(num_blocks):
                n0 = kv_start + j * _BLOCK_N
                s = block % _STAGES
                phase = ((block // _STAGES) & 1) ^ 1
                if GATHER:
                    offsets = keys_rows.index(block % 2)
                    keys = n0 + gl.arange(0, _BLOCK_N, layout=key_layout)
                    ok = keys < kv_len
                    pages = gl.load(KV_INDICES + page0 + keys // page_size, mask=ok, other=0)
                    offsets.store(gl.where(ok, pages * page_size + keys % page_size, -1))
                    cta_barrier()
                    mbarrier.wait(kv_empty.index(s), phase)
                    _gather_rows(CKV, ckv_row_stride, ckv_bufs.index(s), offsets, _D_CKV, num_warps)
                    _gather_rows(KPE, kpe_row_stride, kpe_bufs.index(s), offsets, _D_KPE, num_warps)
                    async_copy.mbarrier_arrive(kv_ready.index(s), increment_count=False)
                else:
                    mbarrier.wait(kv_empty.index(s), phase)
                    mbarrier.expect(kv_ready.index(s), kv_bytes)
                    _load_block(ckv_desc, kpe_desc, ckv_bufs.index(s), kpe_bufs.index(s), kv_ready.index(s), n0, kv_len,
                                page0, KV_INDICES, page_size, oob_row, BOX)
                block += 1
            count += 1

    @gluon.jit
    def _zero_past_keys(ckv_buf, n0, kv_len, num_warps: gl.constexpr):
        """Zero the latent rows of keys past the request (a page's unwritten slots, TMA copies only): their
        weight is 0, but 0 * NaN would poison the product. 64 columns at a time (32 values a thread: the
        warpgroup holds its accumulator meanwhile)."""
        if n0 + _BLOCK_N > kv_len:
            layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
            keys = n0 + gl.arange(0, _BLOCK_N, layout=gl.SliceLayout(1, layout))
            for c in gl.static_range(_D_CKV // 64):
                part = ckv_buf.slice(c * 64, 64, dim=1)
                part.store(gl.where(keys[:, None] < kv_len, part.load(layout), 0.0).to(ckv_buf.dtype))

    @gluon.jit
    def _store_half(x, r, col0, O, PART_O, rows, num_heads, qo_start, split, part_base, s_o_t, s_o_h,
                    layout: gl.constexpr):
        """Write 256 output columns from ``col0`` of a tile's rows ``r`` (request-local; those past ``rows``
        are not stored) to the output, or as the split's partial state (kernels/mla.py's layout)."""
        offs_d = col0 + gl.arange(0, _HALF, layout=gl.SliceLayout(0, layout))
        ok = (r < rows)[:, None]
        if split < 0:
            o_rows = (qo_start + r // num_heads).to(gl.int64) * s_o_t + (r % num_heads) * s_o_h
            gl.store(O + o_rows[:, None] + offs_d[None, :], x.to(O.dtype.element_ty), mask=ok)
        else:
            part = (part_base + split * rows + r).to(gl.int64)
            gl.store(PART_O + part[:, None] * _D_CKV + offs_d[None, :], x, mask=ok)

    @gluon.jit
    def _store_lse(lse, r, LSE, PART_LSE, rows, num_heads, qo_start, split, part_base, s_lse_t):
        """The base-2 LSE of a tile's rows ``r`` (or the split's partial LSE)."""
        ok = r < rows
        if split < 0:
            gl.store(LSE + (qo_start + r // num_heads).to(gl.int64) * s_lse_t + r % num_heads, lse, mask=ok)
        else:
            gl.store(PART_LSE + part_base + split * rows + r, lse, mask=ok)

    @gluon.jit
    def _wait_block(ready, phase, GATHER: gl.constexpr):
        """Wait for a latent block."""
        mbarrier.wait(ready, phase)
        if GATHER:  # cp.async wrote through the generic proxy; the wgmma reads through the async one
            fence_async_shared()

    @gluon.jit
    def _issue_logits(qn_buf, qp_buf, ckv, kpe, s_zero):
        """Issue a block's logits ``Qn Ckv^T + Qp Kpe^T`` (two asynchronous wgmmas)."""
        qk = warpgroup_mma(qn_buf, ckv.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        return warpgroup_mma(qp_buf, kpe.permute((1, 0)), qk, is_async=True)

    @gluon.jit
    def _block_softmax(qk, n0, hi, positions, offs_n, m_i, l_i, qk_scale_log2, CAUSAL: gl.constexpr):
        """A block's logits masked (keys from ``hi`` on, and past each row's position when causal) and folded
        into the row statistics: ``(m, l, alpha, p)`` as softmax.py's softmax_step."""
        keys = n0 + offs_n
        visible = keys[None, :] < hi
        if CAUSAL:
            visible = visible & (keys[None, :] <= positions[:, None])
        x = gl.where(visible, qk * qk_scale_log2, float("-inf"))
        return softmax_step(m_i, l_i, x)

    @gluon.jit
    def _publish(p, alpha, p_buf, alpha_buf, p_empty, p_ready, message):
        """Hand a block's weights ``P`` and factor to the output warpgroup (and to this one's product, which
        reads ``P`` from shared memory too), once the previous message is consumed."""
        mbarrier.wait(p_empty, (message & 1) ^ 1)
        p_buf.store(p.to(p_buf.dtype))
        alpha_buf.store(alpha)
        fence_async_shared()
        cta_barrier()  # every thread's P and factor in shared memory before the arrival
        mbarrier.arrive(p_ready, count=1)

    @gluon.jit
    def _block_weights(qn_buf, qp_buf, ckv, kpe, p_buf, alpha_buf, q_empty, p_empty, p_ready, last, n0, hi, kv_len,
                       positions, offs_n, s_zero, m_i, l_i, message, qk_scale_log2, CAUSAL: gl.constexpr,
                       GATHER: gl.constexpr, num_warps: gl.constexpr):
        """One block of the softmax warpgroup up to its product, all waits in it: the logits, the queries'
        release after the item's ``last`` block, the softmax, the zeroing of rows past the keys, and ``P`` and
        the factor handed on. Returns ``(m_i, l_i, alpha)``."""
        qk = _issue_logits(qn_buf, qp_buf, ckv, kpe, s_zero)
        qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk, qn_buf, qp_buf, ckv, kpe))[0]
        if last:  # the item's queries are read: the producer may load the next ones
            mbarrier.arrive(q_empty, count=1)
        m_i, l_i, alpha, p = _block_softmax(qk, n0, hi, positions, offs_n, m_i, l_i, qk_scale_log2, CAUSAL)
        if not GATHER:
            _zero_past_keys(ckv, n0, kv_len, num_warps)
        _publish(p, alpha, p_buf, alpha_buf, p_empty, p_ready, message)
        return m_i, l_i, alpha

    @gluon.jit
    def _overlapped_blocks(qn_buf, qp_buf, ckv_bufs, kpe_bufs, p_buf, alpha_buf, bars, acc, m_i, l_i, block, message,
                           num_blocks, kv_start, hi, kv_len, positions, offs_n, s_zero, qk_scale_log2,
                           o_row_layout: gl.constexpr, CAUSAL: gl.constexpr, GATHER: gl.constexpr,
                           num_warps: gl.constexpr):
        """The softmax warpgroup's blocks (at least one) with block j+1's logits issued before block j's left
        product, so that block j+1's softmax runs while both warpgroups' products of block j are on the tensor
        cores (without it, nothing runs on them during the softmax once the output warpgroup's product is
        done). Returns ``(acc, m_i, l_i, block, message)``. The same messages and releases, in the same order,
        as the plain loop in :func:`_softmax_partition`."""
        q_ready, q_empty, kv_ready, kv_empty, p_ready, p_empty = bars
        s = block % _STAGES
        _wait_block(kv_ready.index(s), (block // _STAGES) & 1, GATHER)
        ckv = ckv_bufs.index(s)
        kpe = kpe_bufs.index(s)
        m_i, l_i, alpha = _block_weights(qn_buf, qp_buf, ckv, kpe, p_buf, alpha_buf, q_empty, p_empty, p_ready,
                                         num_blocks == 1, kv_start, hi, kv_len, positions, offs_n, s_zero, m_i, l_i,
                                         message, qk_scale_log2, CAUSAL, GATHER, num_warps)
        message += 1
        acc = acc * gl.convert_layout(alpha, o_row_layout)[:, None]
        for j in range(1, num_blocks):  # block j's logits and softmax under block j-1's products
            n0 = kv_start + j * _BLOCK_N
            s_next = (block + 1) % _STAGES
            _wait_block(kv_ready.index(s_next), ((block + 1) // _STAGES) & 1, GATHER)
            ckv_next = ckv_bufs.index(s_next)
            kpe_next = kpe_bufs.index(s_next)
            qk = _issue_logits(qn_buf, qp_buf, ckv_next, kpe_next, s_zero)
            acc = warpgroup_mma(p_buf, ckv.slice(0, _HALF, dim=1), acc, is_async=True)
            # the logits' two wgmmas were issued first: waiting for all but the last group leaves the product
            qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk, qn_buf, qp_buf, ckv_next, kpe_next))[0]
            if j == num_blocks - 1:  # the item's queries are read: the producer may load the next ones
                mbarrier.arrive(q_empty, count=1)
            m_i, l_i, alpha, p = _block_softmax(qk, n0, hi, positions, offs_n, m_i, l_i, qk_scale_log2, CAUSAL)
            if not GATHER:
                _zero_past_keys(ckv_next, n0, kv_len, num_warps)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_buf, ckv))[0]
            mbarrier.arrive(kv_empty.index(s), count=1)
            _publish(p, alpha, p_buf, alpha_buf, p_empty, p_ready, message)
            message += 1
            acc = acc * gl.convert_layout(alpha, o_row_layout)[:, None]
            block += 1
            s = s_next
            ckv = ckv_next
        acc = warpgroup_mma(p_buf, ckv.slice(0, _HALF, dim=1), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_buf, ckv))[0]
        mbarrier.arrive(kv_empty.index(s), count=1)
        return acc, m_i, l_i, block + 1, message

    @gluon.jit
    def _softmax_partition(qn_buf, qp_buf, ckv_bufs, kpe_bufs, p_buf, alpha_buf, bars, WORK, KV_LEN, O, LSE, PART_O,
                           PART_LSE, req_offset, item_offset, num_heads, s_o_t, s_o_h, s_lse_t, qk_scale_log2,
                           CAUSAL: gl.constexpr, GATHER: gl.constexpr, OVERLAP: gl.constexpr,
                           num_warps: gl.constexpr):
        """Logits, softmax and the left output half (module doc); OVERLAP: :func:`_overlapped_blocks`."""
        q_ready, q_empty, kv_ready, kv_empty, p_ready, p_empty = bars
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, _BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, _HALF, 16])
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        o_row_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
        offs_m = gl.arange(0, _BLOCK_M, layout=row_layout)
        offs_n = gl.arange(0, _BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        o_offs_m = gl.arange(0, _BLOCK_M, layout=o_row_layout)
        s_zero = gl.zeros([_BLOCK_M, _BLOCK_N], gl.float32, layout=s_layout)
        block = 0
        count = 0
        message = 0  # P/factor messages sent to the output warpgroup (one per block, one per item's end)
        for w in range(gl.program_id(0), gl.load(WORK), gl.num_programs(0)):
            (b, row0, kv_start, hi, split, req, qo_start, rows, kv_len, qo_len,
             num_blocks) = _item(WORK, w, req_offset, item_offset, KV_LEN, num_heads, CAUSAL)
            r = row0 + offs_m
            positions = kv_len - qo_len + r // num_heads  # causal: a row sees keys up to its token's position
            m_i = gl.full([_BLOCK_M], float("-inf"), gl.float32, layout=row_layout)
            l_i = gl.zeros([_BLOCK_M], gl.float32, layout=row_layout)
            acc = gl.zeros([_BLOCK_M, _HALF], gl.float32, layout=o_layout)
            mbarrier.wait(q_ready, count & 1)
            if num_blocks == 0:
                mbarrier.arrive(q_empty, count=1)
            if OVERLAP and num_blocks > 0:
                acc, m_i, l_i, block, message = _overlapped_blocks(
                    qn_buf, qp_buf, ckv_bufs, kpe_bufs, p_buf, alpha_buf, bars, acc, m_i, l_i, block, message,
                    num_blocks, kv_start, hi, kv_len, positions, offs_n, s_zero, qk_scale_log2, o_row_layout, CAUSAL,
                    GATHER, num_warps)
            for j in range(0 if OVERLAP else num_blocks):
                n0 = kv_start + j * _BLOCK_N
                s = block % _STAGES
                _wait_block(kv_ready.index(s), (block // _STAGES) & 1, GATHER)
                ckv = ckv_bufs.index(s)
                kpe = kpe_bufs.index(s)
                m_i, l_i, alpha = _block_weights(qn_buf, qp_buf, ckv, kpe, p_buf, alpha_buf, q_empty, p_empty, p_ready,
                                                 j == num_blocks - 1, n0, hi, kv_len, positions, offs_n, s_zero, m_i,
                                                 l_i, message, qk_scale_log2, CAUSAL, GATHER, num_warps)
                message += 1
                acc = acc * gl.convert_layout(alpha, o_row_layout)[:, None]
                acc = warpgroup_mma(p_buf, ckv.slice(0, _HALF, dim=1), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_buf, ckv))[0]
                mbarrier.arrive(kv_empty.index(s), count=1)
                block += 1
            # The item's end: the row sums, for the output warpgroup's normalization.
            mbarrier.wait(p_empty, (message & 1) ^ 1)
            alpha_buf.store(l_i)
            cta_barrier()
            mbarrier.arrive(p_ready, count=1)
            message += 1
            o, lse = finalize_state(gl.convert_layout(m_i, o_row_layout), gl.convert_layout(l_i, o_row_layout), acc)
            o_r = row0 + o_offs_m
            part_base = gl.load(req + 2)
            _store_half(o, o_r, 0, O, PART_O, rows, num_heads, qo_start, split, part_base, s_o_t, s_o_h, o_layout)
            _store_lse(lse, o_r, LSE, PART_LSE, rows, num_heads, qo_start, split, part_base, s_lse_t)
            count += 1

    @gluon.jit
    def _output_partition(ckv_bufs, p_buf, alpha_buf, bars, WORK, KV_LEN, O, LSE, PART_O, PART_LSE, req_offset,
                          item_offset, num_heads, s_o_t, s_o_h, s_lse_t, CAUSAL: gl.constexpr, GATHER: gl.constexpr,
                          num_warps: gl.constexpr):
        """The right output half (module doc)."""
        q_ready, q_empty, kv_ready, kv_empty, p_ready, p_empty = bars
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, _HALF, 16])
        o_row_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
        o_offs_m = gl.arange(0, _BLOCK_M, layout=o_row_layout)
        block = 0
        message = 0
        for w in range(gl.program_id(0), gl.load(WORK), gl.num_programs(0)):
            (b, row0, kv_start, hi, split, req, qo_start, rows, kv_len, qo_len,
             num_blocks) = _item(WORK, w, req_offset, item_offset, KV_LEN, num_heads, CAUSAL)
            acc = gl.zeros([_BLOCK_M, _HALF], gl.float32, layout=o_layout)
            for _ in range(num_blocks):
                s = block % _STAGES
                # Already complete (the softmax warpgroup waited for it): the copies' writes are visible here too.
                mbarrier.wait(kv_ready.index(s), (block // _STAGES) & 1)
                if GATHER:
                    fence_async_shared()
                mbarrier.wait(p_ready, message & 1)
                alpha = alpha_buf.load(o_row_layout)
                acc = acc * alpha[:, None]
                ckv = ckv_bufs.index(s)
                acc = warpgroup_mma(p_buf, ckv.slice(_HALF, _HALF, dim=1), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_buf, ckv))[0]
                mbarrier.arrive(p_empty, count=1)
                mbarrier.arrive(kv_empty.index(s), count=1)
                message += 1
                block += 1
            mbarrier.wait(p_ready, message & 1)
            l_i = alpha_buf.load(o_row_layout)
            cta_barrier()  # every thread has read the sums before the buffer is handed back
            mbarrier.arrive(p_empty, count=1)
            message += 1
            o, _ = finalize_state(l_i, l_i, acc)
            _store_half(o, row0 + o_offs_m, _HALF, O, PART_O, rows, num_heads, qo_start, split, gl.load(req + 2), s_o_t,
                        s_o_h, o_layout)

    @direct_launch  # launches skip Triton's binder (launch.py)
    @gluon.jit
    def _hopper_mla_kernel(qn_desc, qp_desc, ckv_desc, kpe_desc, CKV, KPE, KV_INDPTR, KV_INDICES, KV_LEN, WORK, O, LSE,
                           PART_O, PART_LSE, req_offset, item_offset, num_heads, page_size, oob_row, ckv_row_stride,
                           kpe_row_stride, s_o_t, s_o_h, s_lse_t, qk_scale_log2, CAUSAL: gl.constexpr,
                           BOX: gl.constexpr, GATHER: gl.constexpr, num_warps: gl.constexpr,
                           OVERLAP: gl.constexpr = False):
        dtype: gl.constexpr = qn_desc.dtype
        wide: gl.constexpr = gl.NVMMASharedLayout.get_default_for([_BLOCK_M, _D_CKV], dtype)
        narrow: gl.constexpr = gl.NVMMASharedLayout.get_default_for([_BLOCK_M, _D_KPE], dtype)
        qn_buf = gl.allocate_shared_memory(dtype, [_BLOCK_M, _D_CKV], wide)
        qp_buf = gl.allocate_shared_memory(dtype, [_BLOCK_M, _D_KPE], narrow)
        ckv_bufs = gl.allocate_shared_memory(dtype, [_STAGES, _BLOCK_N, _D_CKV], wide)
        kpe_bufs = gl.allocate_shared_memory(dtype, [_STAGES, _BLOCK_N, _D_KPE], narrow)
        p_buf = gl.allocate_shared_memory(dtype, [_BLOCK_M, _BLOCK_N],
                                          gl.NVMMASharedLayout.get_default_for([_BLOCK_M, _BLOCK_N], dtype))
        plain_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
        alpha_buf = gl.allocate_shared_memory(gl.float32, [_BLOCK_M], plain_layout)
        keys_rows = gl.allocate_shared_memory(gl.int32, [2, _BLOCK_N], plain_layout)  # gather mode
        q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kv_ready = gl.allocate_shared_memory(gl.int64, [_STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [_STAGES, 1], mbarrier.MBarrierLayout())
        p_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        p_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        # TMA copies complete a ready barrier with one arrival (plus the bytes); gather mode's cp.async copies
        # with one arrival per producer thread.
        PRODUCER_WARPS: gl.constexpr = _GATHER_WARPS if GATHER else 1
        mbarrier.init(q_ready, count=1)
        mbarrier.init(q_empty, count=1)
        mbarrier.init(p_ready, count=1)
        mbarrier.init(p_empty, count=1)
        for i in gl.static_range(_STAGES):
            mbarrier.init(kv_ready.index(i), count=32 * PRODUCER_WARPS if GATHER else 1)
            mbarrier.init(kv_empty.index(i), count=2)  # both warpgroups' products have read the block
        bars = (q_ready, q_empty, kv_ready, kv_empty, p_ready, p_empty)
        gl.warp_specialize([
            (_softmax_partition, (qn_buf, qp_buf, ckv_bufs, kpe_bufs, p_buf, alpha_buf, bars, WORK, KV_LEN, O, LSE,
                                  PART_O, PART_LSE, req_offset, item_offset, num_heads, s_o_t, s_o_h, s_lse_t,
                                  qk_scale_log2, CAUSAL, GATHER, OVERLAP, num_warps)),
            (_output_partition, (ckv_bufs, p_buf, alpha_buf, bars, WORK, KV_LEN, O, LSE, PART_O, PART_LSE, req_offset,
                                 item_offset, num_heads, s_o_t, s_o_h, s_lse_t, CAUSAL, GATHER, num_warps)),
            (_producer, (qn_desc, qp_desc, ckv_desc, kpe_desc, CKV, KPE, qn_buf, qp_buf, ckv_bufs, kpe_bufs, keys_rows,
                         bars, WORK, KV_INDPTR, KV_INDICES, KV_LEN, req_offset, item_offset, num_heads, page_size,
                         oob_row, ckv_row_stride, kpe_row_stride, CAUSAL, BOX, GATHER, PRODUCER_WARPS)),
        ], [num_warps, PRODUCER_WARPS], [_CONSUMER_REGS, _PRODUCER_REGS])


def _rows_descriptor(x: torch.Tensor, box_rows: int):
    """The TMA view ``[A * B, D]`` of ``x`` ``[A, B, D]`` (:func:`_rows_view`) with boxes of ``box_rows`` rows."""
    rows, width = x.shape[0] * x.shape[1], x.shape[2]
    return GluonTensorDescriptor(x, [rows, width], [x.stride(1), 1], [box_rows, width],
                                 nvmma_layout(box_rows, width, x.dtype))


def hopper_mla_forward(q_nope, q_pe, ckv_cache, kpe_cache, meta, out, lse, *, sm_scale: float, causal: bool,
                       num_sms: int) -> None:
    """Launch the warp-specialized kernel over the plan ``meta`` (arguments as kernels/mla.py's
    mla_paged_forward, tensors in :func:`hopper_mla_layout`'s scope); the caller launches the merge."""
    num_heads, page_size = q_nope.shape[1], ckv_cache.shape[1]
    gather = use_gather(page_size)
    box = min(page_size, BLOCK_N)
    qn_desc, qp_desc = _rows_descriptor(q_nope, BLOCK_M), _rows_descriptor(q_pe, BLOCK_M)
    if gather:  # the descriptors are not read: any box will do
        ckv_desc, kpe_desc = qn_desc, qp_desc
    else:
        ckv_desc, kpe_desc = _rows_descriptor(ckv_cache, box), _rows_descriptor(kpe_cache, box)
    grid = num_sms if meta.graph else max(1, min(num_sms, meta.num_items))
    _hopper_mla_kernel[(grid,)](
        qn_desc, qp_desc, ckv_desc, kpe_desc, ckv_cache, kpe_cache, meta.kv_indptr, meta.kv_indices, meta.kv_len,
        meta.work, out, lse, meta.part_o, meta.part_lse, meta.req_offset, meta.item_offset, num_heads, page_size,
        ckv_cache.shape[0] * page_size, ckv_cache.stride(1), kpe_cache.stride(1), out.stride(0), out.stride(1),
        lse.stride(0), sm_scale * 1.4426950408889634,
        CAUSAL=bool(causal), BOX=box, GATHER=gather, num_warps=4, maxnreg=MAX_REGS,
        **({"OVERLAP": True} if OVERLAP_LOGITS else {}))

