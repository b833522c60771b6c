"""Warp-specialized batch prefill for Hopper (sm_90), written in Gluon.

The Triton kernel (batch_prefill.py) runs each 128-row tile in one program whose warps both load
K/V and compute, so a short prompt's tile pays its own pipeline fill, drain and epilogue, and only
one 8-warp tile fits an SM. Triton 3.6's automatic warp specialization does not engage on that
loop for sm_90a (docs/batch_prefill.md). This kernel splits the roles by hand:

- a *producer* warp issues TMA copies: the tile's Q (``GROUP`` boxes of ``BLOCK_M / GROUP``
  tokens, one per query head of the KV head's group) and its K and V blocks into a ring of
  ``STAGES`` shared-memory buffers (paged: one box per page);
- the *consumer*, two warpgroups of 64 rows each, runs the wgmma products and the online softmax
  (the shared helper, softmax.py) and stores the result;
- the grid is persistent: program ``p`` takes work units ``p, p + grid, ...`` in the plan's launch
  order, so the producer loads the next tile's Q and K/V while the consumer finishes the last one.

Rows inside a tile are head-major (row ``g * BLOCK_M / GROUP + t`` is token ``t`` of query head
``g`` of the group): the same rows as the Triton kernel's token-major tile, in the order TMA can
fill. It reads the same plan (scheduler/prefill_work.py) and writes the same outputs and partial
states, so the merge kernel and CUDA-graph mode are shared.

Scope (:func:`hopper_prefill_supported` decides): fp16/bf16 Q/K/V with head dim 64 or 128 (both),
causal or no mask, no window, soft cap, ALiBi, RoPE or custom mask; 128-row tiles; GQA groups of
1..16 (powers of two); ragged K/V with heads adjacent in memory, or pages of 8..128 keys (multiple
of 8) in NHD or HND layout. Everything else runs the Triton kernel.

Only the GPU runs this module (the interpreter cannot run Gluon): the same request-by-request tests
check it on the H100 (tests/test_batch_prefill.py).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

try:  # Gluon (Triton >= 3.5). Imported only where a Hopper GPU runs it: see hopper_prefill_supported.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor

    _HAVE_GLUON = True
except Exception:  # pragma: no cover - older or newer Triton without this API
    _HAVE_GLUON = False

from .softmax import finalize_state, softmax_update

BLOCK_M = 128
BLOCK_N = 128
STAGES = 2
PRODUCER_REGS = 40
# 8 consumer warps + one producer warpgroup: 12 warps x 32 threads x 168 = 64512 <= 65536 registers;
# the consumers get what the producer leaves (about 232 each).
MAX_REGS = 168


def hopper_prefill_enabled() -> bool:
    """``FLASHTILE_HOPPER_PREFILL=0`` turns the warp-specialized kernel off (the Triton kernel runs)."""
    return os.environ.get("FLASHTILE_HOPPER_PREFILL", "1") != "0"


def _page_layout(k: torch.Tensor) -> Optional[str]:
    """"NHD" or "HND" when a page view ``[P, page_size, H, D]`` (strides as given) is a dense cache in
    that layout (so that a page of one head is a box of rows of a 2-D view), else None."""
    p, ps, h, d = k.shape
    s0, s1, s2, s3 = k.stride()
    if s3 != 1:
        return None
    if s2 == d and s1 == h * d and s0 == ps * h * d:
        return "NHD"
    if s1 == d and s2 == ps * d and s0 == ps * h * d:
        return "HND"
    return None


def hopper_prefill_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, paged: bool, block_m: int,
                             causal: bool, plain: bool) -> bool:
    """Whether :func:`hopper_prefill_forward` handles this call (module doc: scope). ``plain``: no
    window, soft cap, ALiBi, RoPE, custom mask or fp8 scales."""
    if not (_HAVE_GLUON and hopper_prefill_enabled() and plain and q.is_cuda and block_m == BLOCK_M):
        return False
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    d = q.shape[2]
    if d not in (64, 128) or k.shape[-1] != d or v.shape[-1] != d or q.stride(2) != 1 or q.stride(1) != d:
        return False
    if (q.stride(0) * 2) % 16 or q.data_ptr() % 16 or k.data_ptr() % 16 or v.data_ptr() % 16:
        return False
    num_kv_heads = k.shape[2] if paged else k.shape[1]
    group = q.shape[1] // num_kv_heads
    if group < 1 or group > 16 or group & (group - 1):
        return False
    if paged:
        page_size = k.shape[1]
        if page_size % 8 or page_size > BLOCK_N or BLOCK_N % page_size:
            return False
        layout = _page_layout(k)
        return layout is not None and _page_layout(v) == layout
    return all(x.stride(2) == 1 and x.stride(1) == d and (x.stride(0) * 2) % 16 == 0 for x in (k, v))


if _HAVE_GLUON:
    # The tile constants as the kernels see them.
    _BLOCK_M = gl.constexpr(BLOCK_M)
    _BLOCK_N = gl.constexpr(BLOCK_N)
    _STAGES = gl.constexpr(STAGES)
    _PRODUCER_REGS = gl.constexpr(PRODUCER_REGS)

    @gluon.jit
    def _work_unit(w, COUNTS, REQS, ITEMS, num_kv_heads, GROUP: gl.constexpr, CAUSAL: gl.constexpr):
        """The item and KV head of work unit ``w`` (the plan's launch order, as _item_and_head in
        batch_prefill.py) and its KV blocks: ``[start, start + num_blocks * _BLOCK_N)``, the blocks from
        ``full_end`` on masked (causal diagonal, end of the keys)."""
        TOKENS: gl.constexpr = _BLOCK_M // GROUP
        num_items = gl.load(COUNTS)
        group_items = gl.maximum(gl.load(COUNTS + 2), 1)
        per_group = group_items * num_kv_heads
        grp = w // per_group
        r = w - grp * per_group
        first = grp * group_items
        in_group = gl.maximum(gl.minimum(group_items, num_items - first), 1)
        kv_head = r // in_group
        item = first + r - kv_head * in_group
        it = ITEMS + item * 5
        req = gl.load(it)
        row_block = gl.load(it + 1)
        lo = gl.load(it + 2)
        hi = gl.load(it + 3)
        slot = gl.load(it + 4)
        rq = REQS + req * 5
        qo_start = gl.load(rq)
        qo_len = gl.load(rq + 1)
        kv_offset = gl.load(rq + 2)
        kv_len = gl.load(rq + 3)
        delta = kv_len - qo_len
        t_first = row_block * TOKENS
        full_hi = kv_len
        if CAUSAL:
            t_last = gl.minimum(t_first + TOKENS - 1, qo_len - 1)
            hi = gl.minimum(hi, t_last + delta + 1)
            full_hi = gl.maximum(gl.minimum(kv_len, t_first + delta + 1), 0)
        start = (lo // _BLOCK_N) * _BLOCK_N
        full_end = gl.maximum(gl.minimum((full_hi // _BLOCK_N) * _BLOCK_N, hi), start)
        num_blocks = gl.maximum(hi - start + _BLOCK_N - 1, 0) // _BLOCK_N
        return (kv_head, slot, qo_start, qo_len, kv_offset, kv_len, delta, t_first, start, full_end,
                num_blocks)

    @gluon.jit
    def _load_kv_block(desc, buf, bar, n0, kv_len, kv_offset, kv_head, PAGE_INDICES, rows_per_page, head_row,
                       head_col, oob_row, PAGED: gl.constexpr, PAGE_SIZE: gl.constexpr, HEAD_DIM: gl.constexpr):
        """TMA copies of keys ``[n0, n0 + _BLOCK_N)`` of one head into ``buf`` (arriving on ``bar``).
        Paged: one box per page; pages past the request's last one come from ``oob_row``, past the end
        of the view, which TMA fills with zeros."""
        if PAGED:
            for j in gl.static_range(_BLOCK_N // PAGE_SIZE):
                key = n0 + j * PAGE_SIZE
                page = gl.load(PAGE_INDICES + kv_offset + key // PAGE_SIZE, mask=key < kv_len, other=0)
                row = gl.where(key < kv_len, page * rows_per_page + kv_head * head_row, oob_row)
                tma.async_copy_global_to_shared(desc, [row, kv_head * head_col], bar,
                                                buf.slice(j * PAGE_SIZE, PAGE_SIZE))
        else:
            tma.async_copy_global_to_shared(desc, [kv_offset + n0, kv_head * HEAD_DIM], bar, buf)

    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, bars, COUNTS, REQS, ITEMS, PAGE_INDICES,
                  num_kv_heads, rows_per_page, head_row, head_col, oob_row, GROUP: gl.constexpr,
                  HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, PAGED: gl.constexpr, PAGE_SIZE: gl.constexpr):
        q_ready, q_empty, k_ready, k_empty, v_ready, v_empty = bars
        TOKENS: gl.constexpr = _BLOCK_M // GROUP
        kv_bytes: gl.constexpr = _BLOCK_N * HEAD_DIM * 2
        total = gl.load(COUNTS) * num_kv_heads
        tile = 0
        block = 0
        for w in range(gl.program_id(0), total, gl.num_programs(0)):
            (kv_head, slot, qo_start, qo_len, kv_offset, kv_len, delta, t_first, start, full_end,
             num_blocks) = _work_unit(w, COUNTS, REQS, ITEMS, num_kv_heads, GROUP, CAUSAL)
            qi = tile % 2
            mbarrier.wait(q_empty.index(qi), ((tile // 2) & 1) ^ 1)
            mbarrier.expect(q_ready.index(qi), _BLOCK_M * HEAD_DIM * 2)
            q_buf = q_bufs.index(qi)
            for g in gl.static_range(GROUP):
                tma.async_copy_global_to_shared(q_desc, [qo_start + t_first, (kv_head * GROUP + g) * HEAD_DIM],
                                                q_ready.index(qi), q_buf.slice(g * TOKENS, TOKENS))
            for j in range(num_blocks):
                n0 = start + j * _BLOCK_N
                s = block % _STAGES
                phase = ((block // _STAGES) & 1) ^ 1
                mbarrier.wait(k_empty.index(s), phase)
                mbarrier.expect(k_ready.index(s), kv_bytes)
                _load_kv_block(k_desc, k_bufs.index(s), k_ready.index(s), n0, kv_len, kv_offset, kv_head,
                               PAGE_INDICES, rows_per_page, head_row, head_col, oob_row, PAGED, PAGE_SIZE, HEAD_DIM)
                mbarrier.wait(v_empty.index(s), phase)
                mbarrier.expect(v_ready.index(s), kv_bytes)
                _load_kv_block(v_desc, v_bufs.index(s), v_ready.index(s), n0, kv_len, kv_offset, kv_head,
                               PAGE_INDICES, rows_per_page, head_row, head_col, oob_row, PAGED, PAGE_SIZE, HEAD_DIM)
                block += 1
            tile += 1

    @gluon.jit
    def _consumer(q_bufs, k_bufs, v_bufs, bars, O, LSE, PART_O, PART_LSE, COUNTS, REQS, ITEMS, num_kv_heads,
                  stride_ot, stride_oh, stride_lt, stride_lh, qk_scale_log2, GROUP: gl.constexpr,
                  HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, num_warps: gl.constexpr):
        q_ready, q_empty, k_ready, k_empty, v_ready, v_empty = bars
        TOKENS: gl.constexpr = _BLOCK_M // GROUP
        # Both products accumulate in one wgmma layout (instruction N = the head dim, at most BLOCK_N), so
        # the softmax's row statistics broadcast onto the output; a warpgroup owns 64 rows.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        o_layout: gl.constexpr = s_layout
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
        # V rows past the keys are zeroed in shared memory (they may be another request's or unwritten
        # slots of a page: 0 * NaN would poison the product).
        fix_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        dtype: gl.constexpr = q_bufs.dtype
        offs_m = gl.arange(0, _BLOCK_M, layout=row_layout)
        offs_n = gl.arange(0, _BLOCK_N, layout=col_layout)
        head_of_row = offs_m // TOKENS
        token_of_row = offs_m % TOKENS
        total = gl.load(COUNTS) * num_kv_heads
        tile = 0
        block = 0
        for w in range(gl.program_id(0), total, gl.num_programs(0)):
            (kv_head, slot, qo_start, qo_len, kv_offset, kv_len, delta, t_first, start, full_end,
             num_blocks) = _work_unit(w, COUNTS, REQS, ITEMS, num_kv_heads, GROUP, CAUSAL)
            tokens = t_first + token_of_row
            positions = tokens + delta
            qi = tile % 2
            mbarrier.wait(q_ready.index(qi), (tile // 2) & 1)
            q_buf = q_bufs.index(qi)
            m_i = gl.full([_BLOCK_M], float("-inf"), gl.float32, layout=row_layout)
            l_i = gl.zeros([_BLOCK_M], gl.float32, layout=row_layout)
            acc = gl.zeros([_BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
            s_zero = gl.zeros([_BLOCK_M, _BLOCK_N], gl.float32, layout=s_layout)
            for j in range(num_blocks):
                n0 = start + j * _BLOCK_N
                s = block % _STAGES
                phase = (block // _STAGES) & 1
                k_buf = k_bufs.index(s)
                v_buf = v_bufs.index(s)
                mbarrier.wait(k_ready.index(s), phase)
                qk = warpgroup_mma(q_buf, k_buf.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                qk, _, _ = warpgroup_mma_wait(num_outstanding=0, deps=(qk, q_buf, k_buf))
                mbarrier.arrive(k_empty.index(s), count=1)
                x = qk * qk_scale_log2
                if n0 + _BLOCK_N > full_end:  # causal diagonal or the end of the keys
                    cols = n0 + offs_n
                    visible = cols[None, :] < kv_len
                    if CAUSAL:
                        visible = visible & (cols[None, :] <= positions[:, None])
                    x = gl.where(visible, x, float("-inf"))
                m_i, l_i, acc, p = softmax_update(m_i, l_i, acc, x)
                p_op = gl.convert_layout(p.to(dtype), p_layout)
                mbarrier.wait(v_ready.index(s), phase)
                if n0 + _BLOCK_N > kv_len:
                    rows = n0 + gl.arange(0, _BLOCK_N, layout=gl.SliceLayout(1, fix_layout))
                    v_tile = v_buf.load(fix_layout)
                    v_buf.store(gl.where(rows[:, None] < kv_len, v_tile, 0.0).to(dtype))
                    fence_async_shared()
                    gl.thread_barrier()
                acc = warpgroup_mma(p_op, v_buf, acc, is_async=True)
                acc, _ = warpgroup_mma_wait(num_outstanding=0, deps=(acc, v_buf))
                mbarrier.arrive(v_empty.index(s), count=1)
                block += 1
            mbarrier.arrive(q_empty.index(qi), count=1)
            tile += 1

            o, lse = finalize_state(m_i, l_i, acc)
            offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
            o_tokens = t_first + gl.convert_layout(token_of_row, gl.SliceLayout(1, o_layout))
            o_heads = kv_head * GROUP + gl.convert_layout(head_of_row, gl.SliceLayout(1, o_layout))
            o_ok = o_tokens < qo_len
            if slot < 0:
                o_rows = (qo_start + o_tokens).to(gl.int64) * stride_ot + o_heads * stride_oh
                gl.store(O + o_rows[:, None] + offs_d[None, :], o.to(O.dtype.element_ty), mask=o_ok[:, None])
                lse_ok = tokens < qo_len
                l_rows = (qo_start + tokens).to(gl.int64) * stride_lt + (kv_head * GROUP + head_of_row) * stride_lh
                gl.store(LSE + l_rows, lse, mask=lse_ok)
            else:
                # Partial states keep the Triton kernel's token-major row order (the merge reads it).
                base = (slot.to(gl.int64) * num_kv_heads + kv_head) * _BLOCK_M
                o_part = base + (o_tokens - t_first) * GROUP + (o_heads - kv_head * GROUP)
                gl.store(PART_O + o_part[:, None] * HEAD_DIM + offs_d[None, :], o, mask=o_ok[:, None])
                l_part = base + token_of_row * GROUP + head_of_row
                gl.store(PART_LSE + l_part, lse, mask=tokens < qo_len)

    @gluon.jit
    def _hopper_prefill_kernel(q_desc, k_desc, v_desc, O, LSE, PART_O, PART_LSE, PAGE_INDICES, COUNTS, REQS,
                               ITEMS, num_kv_heads, stride_ot, stride_oh, stride_lt, stride_lh, qk_scale_log2,
                               rows_per_page, head_row, head_col, oob_row, GROUP: gl.constexpr,
                               HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, PAGED: gl.constexpr,
                               PAGE_SIZE: gl.constexpr, num_warps: gl.constexpr):
        dtype: gl.constexpr = q_desc.dtype
        tile_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([_BLOCK_M, HEAD_DIM], dtype)
        q_bufs = gl.allocate_shared_memory(dtype, [2, _BLOCK_M, HEAD_DIM], tile_layout)
        k_bufs = gl.allocate_shared_memory(dtype, [_STAGES, _BLOCK_N, HEAD_DIM], tile_layout)
        v_bufs = gl.allocate_shared_memory(dtype, [_STAGES, _BLOCK_N, HEAD_DIM], tile_layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [_STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [_STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [_STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=1)
        for i in gl.static_range(_STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(v_empty.index(i), count=1)
        bars = (q_ready, q_empty, k_ready, k_empty, v_ready, v_empty)
        gl.warp_specialize([
            (_consumer, (q_bufs, k_bufs, v_bufs, bars, O, LSE, PART_O, PART_LSE, COUNTS, REQS, ITEMS, num_kv_heads,
                         stride_ot, stride_oh, stride_lt, stride_lh, qk_scale_log2, GROUP, HEAD_DIM, CAUSAL,
                         num_warps)),
            (_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, bars, COUNTS, REQS, ITEMS, PAGE_INDICES,
                         num_kv_heads, rows_per_page, head_row, head_col, oob_row, GROUP, HEAD_DIM, CAUSAL, PAGED,
                         PAGE_SIZE)),
        ], [1], [_PRODUCER_REGS])


def _tile_layout(rows: int, head_dim: int, dtype: torch.dtype):
    gl_dtype = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return gl.NVMMASharedLayout.get_default_for([rows, head_dim], gl_dtype)


def _kv_descriptor(x: torch.Tensor, paged: bool, head_dim: int):
    """A 2-D TMA view of K or V whose boxes are one page of one head (paged) or BLOCK_N keys of one
    head (ragged), and the coordinates' (rows_per_page, head_row, head_col, oob_row)."""
    if not paged:
        rows, cols = x.shape[0], x.shape[1] * head_dim
        desc = GluonTensorDescriptor(x, [rows, cols], [x.stride(0), 1], [BLOCK_N, head_dim],
                                     _tile_layout(BLOCK_N, head_dim, x.dtype))
        return desc, (0, 0, head_dim, rows)
    num_pages, page_size, num_heads, _ = x.shape
    box = _tile_layout(page_size, head_dim, x.dtype)
    if _page_layout(x) == "NHD":  # row = page * page_size + slot, column = head * D
        rows = num_pages * page_size
        desc = GluonTensorDescriptor(x, [rows, num_heads * head_dim], [num_heads * head_dim, 1],
                                     [page_size, head_dim], box)
        return desc, (page_size, 0, head_dim, rows)
    rows = num_pages * num_heads * page_size  # HND: row = (page * H + head) * page_size + slot
    desc = GluonTensorDescriptor(x, [rows, head_dim], [head_dim, 1], [page_size, head_dim], box)
    return desc, (num_heads * page_size, page_size, 0, rows)


def hopper_prefill_forward(q, k, v, page_indices, counts, reqs, items, part_o, part_lse, out, lse, qk_scale_log2: float,
                           causal: bool, num_items: int, num_sms: int) -> None:
    """Launch the warp-specialized kernel over the plan's items (arguments as batch_prefill_forward;
    ``counts``/``reqs``/``items`` are the plan's sections). The caller checked
    :func:`hopper_prefill_supported`."""
    num_qo_heads, head_dim = q.shape[1], q.shape[2]
    paged = page_indices is not None
    num_kv_heads = k.shape[2] if paged else k.shape[1]
    group = num_qo_heads // num_kv_heads
    tokens = BLOCK_M // group
    q_desc = GluonTensorDescriptor(q, [q.shape[0], num_qo_heads * head_dim], [q.stride(0), 1], [tokens, head_dim],
                                   _tile_layout(tokens, head_dim, q.dtype))
    k_desc, coords = _kv_descriptor(k, paged, head_dim)
    v_desc, v_coords = _kv_descriptor(v, paged, head_dim)
    if v_coords != coords:  # the kernel shares one set of coordinates between K and V
        raise ValueError(f"k and v page views must have one layout; got {tuple(k.stride())} and {tuple(v.stride())}")
    grid = max(1, min(num_sms, num_items * num_kv_heads))
    _hopper_prefill_kernel[(grid,)](
        q_desc, k_desc, v_desc, out, lse, part_o, part_lse, page_indices if paged else counts, counts, reqs, items,
        num_kv_heads, out.stride(0), out.stride(1), lse.stride(0), lse.stride(1), qk_scale_log2, *coords,
        GROUP=group, HEAD_DIM=head_dim, CAUSAL=causal, PAGED=paged, PAGE_SIZE=k.shape[1] if paged else 1,
        num_warps=8, maxnreg=MAX_REGS)
