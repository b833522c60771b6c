"""DeepSeek MLA over a paged latent cache: the Triton kernels and their launcher (same function and
arguments as flashtile/reference/mla.py, which states the math).

With matrix absorption MLA is multi-query attention with keys ``[ckv | kpe]`` (D_CKV + D_KPE wide)
and values ``ckv`` (D_CKV wide), one latent shared by every head. So a tile's M dimension holds query
rows ``row = token * num_heads + head`` of one request (heads times query tokens), and each KV tile
of BLOCK_N latent rows is read once for all of them: once as the keys of ``S = Qn Ckv^T + Qp Kpe^T``
and once more, from the same registers/shared memory, as the values of ``O += P Ckv``.

Work: the plan's work list (flashtile/scheduler/mla_work.py) holds (request, row tile, KV chunk)
items. ``_mla_kernel`` runs a persistent grid (its size does not depend on the lengths, so a CUDA
graph replays a re-plan correctly) over the items; a request cut into several KV chunks writes
float32 partial states, merged by ``_mla_merge_kernel`` with the online-softmax helpers of softmax.py.

On an H100/H200, plain bf16/fp16 batches with 64-row tiles run the warp-specialized Gluon kernel of
mla_hopper.py instead of ``_mla_kernel`` (same plan, outputs and merge; ``FLASHTILE_HOPPER_MLA=0`` turns it off).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._core import mla_tiles
from .._core.device import num_sms
from .._core.launch import direct_launch
from .._core.settings import interpreting
from .attention import variant_kwargs
from .mla_hopper import hopper_mla_forward, hopper_mla_usable
from .smem import TileFeatures, launch_within_limit
from .softmax import finalize_state, softmax_update
from .tiles import mma

__all__ = ["mla_paged_forward"]

LOG2E = 1.4426950408889634
_LOG2E_IN_KERNEL = tl.constexpr(LOG2E)  # a global a @triton.jit function may read
INTERPRET = interpreting()  # Triton 3.9's interpreter computes bf16 tl.dot wrongly (tiles.mma)


@direct_launch
@triton.jit
def _mla_kernel(
    qn_ptr, qp_ptr,  # [nnz_q, H, D_CKV], [nnz_q, H, D_KPE]
    ckv_ptr, kpe_ptr,  # [pages, page_size, D_CKV], [pages, page_size, D_KPE]
    kv_indptr_ptr, kv_indices_ptr, kv_len_ptr,  # [B + 1] pages, page ids, [B] tokens
    work_ptr,  # int32: [0] item count, then the tables of scheduler/mla_work.py
    out_ptr, lse_ptr,  # [nnz_q, H, D_CKV], [nnz_q, H] float32
    part_o_ptr, part_lse_ptr,  # [partial rows, D_CKV], [partial rows] float32
    req_offset, item_offset,
    s_qn_t, s_qn_h, s_qp_t, s_qp_h,
    s_ckv_p, s_ckv_s, s_kpe_p, s_kpe_s,
    s_o_t, s_o_h, s_lse_t,
    num_heads, page_size,
    qk_scale_ckv, qk_scale_kpe, v_scale,  # log2(e) * sm_scale * ckv_scale, ... * kpe_scale; ckv_scale
    D_CKV: tl.constexpr, D_KPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    NUM_STAGES: tl.constexpr, UPCAST_DOT: tl.constexpr,
    LOGITS_HOOK: tl.constexpr = None, MASK_HOOK: tl.constexpr = None, OUTPUT_HOOK: tl.constexpr = None,
    SINK_HOOK: tl.constexpr = None, USE_SOFTMAX: tl.constexpr = True, vargs=None, hook_sm_scale=None,
    OUT_SPLIT: tl.constexpr = 1, RANGE_HOOK: tl.constexpr = None, PREFETCH_PAGES: tl.constexpr = False,
):
    """Variant hooks (flashtile/variants.py; None: not compiled) see the MLA rows as MQA: kv_head 0, the
    unscaled ``qk`` over ``[ckv | kpe]`` (the launcher then passes the caches' dequantization scales as
    qk_scale_ckv / qk_scale_kpe and sm_scale as ``hook_sm_scale``).

    OUT_SPLIT 2: each work item runs as two programs, one per half of the output columns. Both compute
    the full logits (the latent in two halves: "mine", whose columns this program outputs, and the other)
    and accumulate only their half of ``P @ ckv``: half the accumulator registers, the logits twice.

    PREFETCH_PAGES: each tile's page ids are loaded one iteration ahead. Loaded in the iteration that uses
    them, they make the latent copies "indirect" for Triton's pipeliner, which then keeps one latent
    buffer and waits for every copy at the top of each iteration (sm_90a TTGIR, Triton 3.6): no tile in
    flight during the math, whatever NUM_STAGES says (kernels/tiles.py's attend_tiles does the same)."""
    D_OUT: tl.constexpr = D_CKV // OUT_SPLIT
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_items = tl.load(work_ptr)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, D_OUT)
    offs_p = tl.arange(0, D_KPE)
    for w in range(pid, num_items * OUT_SPLIT, num_programs):
        if OUT_SPLIT == 1:
            item = work_ptr + item_offset + w * 5
            col0 = 0  # the first output column of this program
        else:
            item = work_ptr + item_offset + (w // OUT_SPLIT) * 5
            col0 = (w % OUT_SPLIT) * D_OUT
            col1 = D_OUT - col0  # the other half of the latent
        offs_mine = col0 + offs_c
        b = tl.load(item)
        row0 = tl.load(item + 1)
        kv_start = tl.load(item + 2)
        kv_end = tl.load(item + 3)
        split = tl.load(item + 4)
        req = work_ptr + req_offset + b * 4
        qo_start = tl.load(req)
        rows = tl.load(req + 3)
        kv_len = tl.load(kv_len_ptr + b)
        page0 = tl.load(kv_indptr_ptr + b)
        qo_len = rows // num_heads

        r = row0 + offs_m  # [BLOCK_M] request-local rows
        row_ok = r < rows
        t = r // num_heads
        h = r % num_heads
        tok = (qo_start + t).to(tl.int64)  # int64 offsets: tokens x heads x 512 may pass 2**31
        qn_rows = qn_ptr + (tok * s_qn_t + h * s_qn_h)[:, None]
        qn = tl.load(qn_rows + offs_mine[None, :], mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D_OUT]
        if OUT_SPLIT != 1:
            qn_other = tl.load(qn_rows + (col1 + offs_c)[None, :], mask=row_ok[:, None], other=0.0)
        qp = tl.load(qp_ptr + (tok * s_qp_t + h * s_qp_h)[:, None] + offs_p[None, :],
                     mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D_KPE]
        pos = kv_len - qo_len + t  # the query's position (causal: sees keys <= pos)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        if SINK_HOOK is not None:  # the sink joins the state once per row: in the request's first chunk
            first = (l_i == 0.0) & (kv_start == 0)
            m_i = tl.where(first, SINK_HOOK(b, h, vargs) * _LOG2E_IN_KERNEL, m_i)
            l_i = tl.where(first, 1.0, l_i)
        acc = tl.zeros([BLOCK_M, D_OUT], tl.float32)
        lo = kv_start
        hi = kv_end
        if CAUSAL:
            hi = tl.minimum(hi, kv_len - qo_len + (tl.minimum(row0 + BLOCK_M, rows) - 1) // num_heads + 1)
        if RANGE_HOOK is not None:  # the variant's kv_range: keys its mask lets these rows see
            r_lo, r_hi = RANGE_HOOK(b, row0 // num_heads, (tl.minimum(row0 + BLOCK_M, rows) - 1) // num_heads,
                                    qo_len, kv_len, vargs)
            lo = tl.maximum(lo, (r_lo // BLOCK_N) * BLOCK_N)
            hi = tl.minimum(hi, r_hi)
        if PREFETCH_PAGES:
            next_page = tl.load(kv_indices_ptr + page0 + (lo + offs_n) // page_size, mask=lo + offs_n < hi, other=0)
        for j0 in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
            j = j0 + offs_n  # [BLOCK_N] token positions
            kv_ok = j < hi
            if PREFETCH_PAGES:
                page = next_page.to(tl.int64)
                ahead = j + BLOCK_N
                next_page = tl.load(kv_indices_ptr + page0 + ahead // page_size, mask=ahead < hi, other=0)
            else:
                page = tl.load(kv_indices_ptr + page0 + j // page_size, mask=kv_ok, other=0).to(tl.int64)
            slot = j % page_size
            ckv_rows = ckv_ptr + (page * s_ckv_p + slot * s_ckv_s)[:, None]
            ckv = tl.load(ckv_rows + offs_mine[None, :], mask=kv_ok[:, None], other=0.0)  # [BLOCK_N, D_OUT]
            kpe = tl.load(kpe_ptr + (page * s_kpe_p + slot * s_kpe_s)[:, None] + offs_p[None, :],
                          mask=kv_ok[:, None], other=0.0)  # [BLOCK_N, D_KPE]
            ckv = ckv.to(qn.dtype)
            kpe = kpe.to(qn.dtype)
            qk_ckv = mma(qn, tl.trans(ckv), UPCAST_DOT)
            if OUT_SPLIT != 1:
                ckv_other = tl.load(ckv_rows + (col1 + offs_c)[None, :], mask=kv_ok[:, None], other=0.0)
                qk_ckv += mma(qn_other, tl.trans(ckv_other.to(qn.dtype)), UPCAST_DOT)
            s = qk_ckv * qk_scale_ckv + mma(qp, tl.trans(kpe), UPCAST_DOT) * qk_scale_kpe
            if LOGITS_HOOK is not None:  # natural-unit logits from the variant; base 2 for the softmax
                s = LOGITS_HOOK(s, hook_sm_scale, b, t[:, None], j[None, :], h[:, None], 0, qo_len, kv_len, vargs)
                if USE_SOFTMAX:
                    s = s * _LOG2E_IN_KERNEL
            visible = kv_ok[None, :]
            if CAUSAL:
                visible = visible & (j[None, :] <= pos[:, None])
            if MASK_HOOK is not None:
                visible = visible & MASK_HOOK(b, t[:, None], j[None, :], h[:, None], 0, qo_len, kv_len, vargs)
            if USE_SOFTMAX:
                s = tl.where(visible, s, float("-inf"))  # [BLOCK_M, BLOCK_N], base-2 logits
                m_i, l_i, acc, p = softmax_update(m_i, l_i, acc, s)
            else:  # the variant's weights as they are (whole rows: the plan does not split)
                p = tl.where(visible, s, 0.0)
            acc += mma(p.to(ckv.dtype), ckv, UPCAST_DOT)
        if USE_SOFTMAX:
            o, lse = finalize_state(m_i, l_i, acc)
        else:
            o, lse = acc, tl.zeros([BLOCK_M], tl.float32)
        o = o * v_scale
        if OUTPUT_HOOK is not None:  # whole rows only (the plan does not split; OUT_SPLIT is 1)
            o = OUTPUT_HOOK(o, lse, b, t, h, qo_len, kv_len, vargs)
        lse_ok = row_ok
        if OUT_SPLIT != 1:  # both halves computed the same lse: one stores it
            lse_ok = row_ok & ((offs_m * 0 + col0) == 0)
        if split < 0:
            o_rows = tok * s_o_t + h * s_o_h
            tl.store(out_ptr + o_rows[:, None] + offs_mine[None, :], o.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None])
            tl.store(lse_ptr + tok * s_lse_t + h, lse, mask=lse_ok)
        else:
            part = tl.load(req + 2) + split * rows + r  # [BLOCK_M] partial rows
            tl.store(part_o_ptr + part[:, None].to(tl.int64) * D_CKV + offs_mine[None, :], o, mask=row_ok[:, None])
            tl.store(part_lse_ptr + part, lse, mask=lse_ok)


@direct_launch
@triton.jit
def _mla_merge_kernel(
    work_ptr, req_offset, token_offset,
    out_ptr, lse_ptr,  # [nnz_q, H, D_CKV], [nnz_q, H] float32
    part_o_ptr, part_lse_ptr,  # [partial rows, D_CKV], [partial rows]
    s_o_t, s_o_h, s_lse_t,
    num_heads,
    D_CKV: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (query token, block of heads, block of output columns): merge the token's split
    states, if it has several, ``BLOCK_S`` splits per step (a finished state is a "key" whose logit is its
    lse and whose value is its output). Why steps of several splits and column blocks: one request of 32k
    keys and 128 heads has 64 splits per row, and one split per step over whole 512-column rows gave 8
    programs of 64 dependent steps each (84 µs on an H100 against the main kernel's 72)."""
    tok = tl.program_id(0)
    b = tl.load(work_ptr + token_offset + tok)
    req = work_ptr + req_offset + b * 4
    num_splits = tl.load(req + 1)
    qo_start = tl.load(req)
    rows = tl.load(req + 3)
    # Tokens past the planned ones (a q longer than qo_indptr[-1]) map to request 0: skip them.
    if (num_splits > 1) & (tok >= qo_start) & ((tok - qo_start) * num_heads < rows):
        base = tl.load(req + 2)
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = h < num_heads
        r = (tok - qo_start) * num_heads + h
        d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_s = tl.arange(0, BLOCK_S)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        for s0 in range(0, num_splits, BLOCK_S):
            split = s0 + offs_s
            ok = h_ok[:, None] & (split < num_splits)[None, :]  # [BLOCK_H, BLOCK_S]
            part = base + split[None, :] * rows + r[:, None]
            s_lse = tl.load(part_lse_ptr + part, mask=ok, other=float("-inf"))
            o_s = tl.load(part_o_ptr + part[:, :, None].to(tl.int64) * D_CKV + d[None, None, :], mask=ok[:, :, None],
                          other=0.0)  # [BLOCK_H, BLOCK_S, BLOCK_D]
            m_i, l_i, acc, p = softmax_update(m_i, l_i, acc, s_lse)
            acc += tl.sum(p[:, :, None] * o_s, axis=1)
        o, lse = finalize_state(m_i, l_i, acc)
        tl.store(out_ptr + (tok.to(tl.int64) * s_o_t + h * s_o_h)[:, None] + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=h_ok[:, None])
        if tl.program_id(2) == 0:  # the lse once per head, by the first column block
            tl.store(lse_ptr + tok * s_lse_t + h, lse, mask=h_ok)


MERGE_TILE = 4096  # float32 partial-output elements a merge program loads per step (BLOCK_H x BLOCK_S x BLOCK_D)
MERGE_BLOCK_D = 128  # output columns per merge program


def merge_launch(num_heads: int, d_ckv: int, max_splits: int) -> tuple:
    """``(BLOCK_H, BLOCK_S, BLOCK_D)`` of the merge kernel: up to 8 splits a step (all of a plan's, when
    fewer), column blocks of MERGE_BLOCK_D, and as many heads as fill MERGE_TILE."""
    block_d = min(d_ckv, MERGE_BLOCK_D)
    block_s = min(8, triton.next_power_of_2(max(max_splits, 1)))
    block_h = min(triton.next_power_of_2(num_heads), max(1, MERGE_TILE // (block_s * block_d)))
    return block_h, block_s, block_d


def _grid_programs(device: torch.device, num_items: int, graph: bool) -> int:
    """Persistent programs: a fixed count in CUDA-graph mode (lengths may change between replays)."""
    cap = 4 * num_sms(device) if device.type == "cuda" else 8
    return cap if graph else max(1, min(cap, num_items))


def _hook_kwargs(variant, sm_scale: float, ckv_scale: float, kpe_scale: float) -> tuple:
    """``(qk_scale_ckv, qk_scale_kpe, kernel keywords)``: the default base-2 logit scales and no keywords
    without a variant; with one, its hooks and arguments, and the scales its logits need (a logits hook
    gets the unscaled qk and sm_scale; weights without softmax stay in natural units)."""
    kwargs = variant_kwargs(variant)
    kwargs.pop("QUERY_HOOK", None)  # None: the wrapper rejects a query_transform (MLA's query is two tiles)
    kwargs.pop("FULL_HOOK", None)  # the MLA kernel evaluates the mask on every tile (kv_full_range: speed only)
    if variant is None or (kwargs["LOGITS_HOOK"] is None and kwargs["USE_SOFTMAX"]):
        return sm_scale * ckv_scale * LOG2E, sm_scale * kpe_scale * LOG2E, kwargs
    if kwargs["LOGITS_HOOK"] is not None:
        return ckv_scale, kpe_scale, dict(kwargs, hook_sm_scale=sm_scale)
    return sm_scale * ckv_scale, sm_scale * kpe_scale, kwargs


def hooks_need_whole_output(variant) -> bool:
    """An output_transform sees whole output rows: such a variant runs with OUT_SPLIT 1."""
    return variant is not None and variant.variant.output_transform is not None


def mla_paged_forward(q_nope, q_pe, ckv_cache, kpe_cache, meta, out, lse, *, sm_scale: float, ckv_scale: float,
                      kpe_scale: float, causal: bool, variant=None) -> None:
    """Launch the MLA kernels for the plan ``meta`` (flashtile._core.mla_plan.MlaMeta); arguments as
    :func:`flashtile.reference.mla.mla_paged_forward`."""
    num_heads, d_ckv, d_kpe = q_nope.shape[1], q_nope.shape[2], q_pe.shape[2]
    cfg = meta.config
    out_split = 1 if hooks_need_whole_output(variant) else cfg.out_split
    programs = _grid_programs(q_nope.device, meta.num_items * out_split, meta.graph)
    part_o, part_lse = meta.part_o, meta.part_lse
    qk_scale_ckv, qk_scale_kpe, hooks = _hook_kwargs(variant, sm_scale, ckv_scale, kpe_scale)

    def launch(c):
        _mla_kernel[(programs,)](
            q_nope, q_pe, ckv_cache, kpe_cache, meta.kv_indptr, meta.kv_indices, meta.kv_len, meta.work,
            out, lse, part_o, part_lse, meta.req_offset, meta.item_offset,
            q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1),
            ckv_cache.stride(0), ckv_cache.stride(1), kpe_cache.stride(0), kpe_cache.stride(1),
            out.stride(0), out.stride(1), lse.stride(0),
            num_heads, ckv_cache.shape[1],
            qk_scale_ckv, qk_scale_kpe, ckv_scale,
            D_CKV=d_ckv, D_KPE=d_kpe, BLOCK_M=c.block_m, BLOCK_N=c.block_n, CAUSAL=bool(causal),
            NUM_STAGES=c.num_stages, UPCAST_DOT=INTERPRET, num_warps=c.num_warps, num_stages=c.num_stages,
            PREFETCH_PAGES=mla_tiles.MLA_PREFETCH_PAGES,
            **hooks, **({} if out_split == 1 else {"OUT_SPLIT": out_split}),
        )

    plain = variant is None and ckv_scale == 1.0 and kpe_scale == 1.0
    if hopper_mla_usable(q_nope, q_pe, ckv_cache, kpe_cache, cfg.block_m, plain):
        hopper_mla_forward(q_nope, q_pe, ckv_cache, kpe_cache, meta, out, lse, sm_scale=sm_scale, causal=causal,
                           num_sms=num_sms(q_nope.device))
    else:
        features = TileFeatures(d_qk=d_ckv + d_kpe, d_vo=d_ckv, q_bytes=q_nope.element_size(),
                                kv_bytes=ckv_cache.element_size())
        launch_within_limit(launch, cfg, features, q_nope.device, cfg=cfg)
    nnz = q_nope.shape[0]
    if nnz and (meta.graph or meta.max_splits > 1):
        block_h, block_s, block_d = merge_launch(num_heads, d_ckv, meta.max_splits)
        _mla_merge_kernel[(nnz, triton.cdiv(num_heads, block_h), d_ckv // block_d)](
            meta.work, meta.req_offset, meta.token_offset, out, lse, part_o, part_lse,
            out.stride(0), out.stride(1), lse.stride(0), num_heads,
            D_CKV=d_ckv, BLOCK_H=block_h, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4,
        )
