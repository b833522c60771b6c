"""Attention tile loops shared by the attention kernels: single-request attention and batch decode
(attention.py) and batch prefill (batch_prefill.py; its Gluon kernel, batch_prefill_hopper.py, cuts
its KV range with :func:`tile_ranges` too).

A program owns ``BLOCK_M`` GQA-packed query rows of one KV head (attention.py's module doc) and one
KV range. :func:`tile_ranges` cuts that range into three loops: tiles that need masking on the left
(sliding window), tiles every row sees in full (no mask arithmetic at all), and masked tiles on the
right (causal diagonal, the ragged end of the sequence). Tiles nobody sees are never visited (causal
and window tile skipping). :func:`attend_range` runs :func:`attend_tiles` over the three and returns
the finished state ``(o, lse)``; :func:`load_q`, :func:`head_inputs` and :func:`store_state` read a
program's query tile and per-head inputs and write its state (final, or a float32 split-KV partial).
"""

import triton
import triton.language as tl

from .softmax import finalize_state, softmax_update


@triton.jit
def tanh(x):
    # tanh through exp2 (portable to the interpreter); saturates cleanly to +-1 for large |x|.
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)


@triton.jit
def mma(a, b, UPCAST: tl.constexpr):
    """``tl.dot(a, b)`` in float32 accumulation. UPCAST (interpreter only): Triton 3.9's interpreter
    computes bf16 ``tl.dot`` wrongly, so it multiplies float32 copies instead."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def rope_rotate(x, partner, positions, offs_d, HEAD_DIM: tl.constexpr, rope_log2_theta, rope_inv_scale):
    """Half-split RoPE of a tile ``x [R, D]``; ``partner[:, d] = x[:, (d + HEAD_DIM/2) % HEAD_DIM]``.

    Angle of dim ``d`` at position ``p``: ``p * theta**(-2 (d mod HEAD_DIM/2) / HEAD_DIM) / rope_scale``,
    in float32.
    """
    half: tl.constexpr = HEAD_DIM // 2
    pair = (offs_d % half).to(tl.float32)
    inv_freq = tl.exp2(-(2.0 * pair / HEAD_DIM) * rope_log2_theta) * rope_inv_scale
    angle = positions.to(tl.float32)[:, None] * inv_freq[None, :]
    sign = tl.where(offs_d < half, -1.0, 1.0)
    return x.to(tl.float32) * tl.cos(angle) + sign[None, :] * partner.to(tl.float32) * tl.sin(angle)


@triton.jit
def attend_tiles(
    acc, m_i, l_i, q,
    k_base, v_base, stride_kt, stride_vt,
    page_table, page_size, stride_kp, stride_vp,
    mask_ptr, slopes, positions, tokens, row_ok,
    start, end, kv_len, sm_scale, qk_scale_log2, soft_cap, window_left, rope_log2_theta, rope_inv_scale,
    HEAD_DIM_QK: tl.constexpr, HEAD_DIM_VO: tl.constexpr, D_QK: tl.constexpr, D_VO: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CUSTOM_MASK: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, USE_ROPE: tl.constexpr, PAGED: tl.constexpr,
    MASKED: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST_DOT: tl.constexpr,
    PREFETCH_PAGES: tl.constexpr, INT32_PAGE_OFFSETS: tl.constexpr,
    MULTI_ITEM: tl.constexpr, prefix_len, item_first_key,
    LOGITS_HOOK: tl.constexpr = None, MASK_HOOK: tl.constexpr = None, USE_SOFTMAX: tl.constexpr = True,
    vargs=None, v_batch=0, v_qo_idx=0, v_heads=0, v_kv_head=0, v_qo_len=0, V_T: tl.constexpr = False, stride_vd=1,
    MASK_HOOK_UNMASKED: tl.constexpr = True,
):
    """Visit KV tiles ``[start, end)`` (a multiple of BLOCK_N apart unless MASKED).

    PAGED: key ``j`` of the request is slot ``j % page_size`` of page ``page_table[j // page_size]``
    (``page_table`` points at the request's first page id); otherwise keys are rows ``stride_kt`` apart.
    MULTI_ITEM (batch prefill's multi-item scoring, with CAUSAL): in a masked tile a row also sees a key
    only inside the prefix (``< prefix_len``) or from its ``item_first_key`` on (batch_prefill.py).
    LOGITS_HOOK, MASK_HOOK, USE_SOFTMAX, vargs: an attention variant's tile hooks and extra arguments
    (flashtile/variants.py), called with the row vectors ``v_batch``, ``v_qo_idx``, ``v_heads`` ``[M]`` as
    ``[M, 1]`` columns; None (the default kernels) compiles none of it. MASK_HOOK_UNMASKED False: the
    unmasked tiles skip MASK_HOOK too (the variant's ``kv_full_range`` says every row sees them).
    V_T (not PAGED): V's head dim has stride ``stride_vd`` and its keys are contiguous (``stride_vt`` is 1): the
    P.V operand is then K-major in memory, which fp8 wgmma needs (FP8 attention; kernels/attention.py).
    """
    # fp8 K/V under a 16-bit q (fp8 q is FP8 attention: fp8 products, kernels/attention.py)
    KV_FP8: tl.constexpr = k_base.dtype.element_ty.is_fp8() and not q.dtype.is_fp8()
    if KV_FP8:
        # fp8 K/V: both dots run in float16, because fp8 -> fp16 is one conversion per pair of values and
        # fp8 -> bf16 takes a second one per value (cvt.bf16.f16 on sm_90), which set fp8 decode's speed.
        # q goes to fp16 scaled by a power of two into its range (2^15; no scaling while |q| <= 32768) and
        # the scores are scaled back in float32: exact for bf16 q, whose 8-bit mantissas fp16 holds, down
        # to values 2^-29 of the tile's largest.
        q_exponent = tl.maximum(tl.ceil(tl.log2(tl.max(tl.max(tl.abs(q.to(tl.float32)), 1), 0))) - 15.0, 0.0)
        q_dot = (q.to(tl.float32) * tl.exp2(-q_exponent)).to(tl.float16)
        q_unscale = tl.exp2(q_exponent)
    else:
        q_dot = q
        q_unscale = 1.0
    # P's dtype in the second dot: fp16 too when its values are probabilities (a variant without softmax
    # may produce weights beyond fp16's range)
    PV_FP16: tl.constexpr = KV_FP8 and USE_SOFTMAX
    offs_n = tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, D_QK)
    offs_dvo = tl.arange(0, D_VO)
    dqk_ok = offs_dqk < HEAD_DIM_QK
    dvo_ok = offs_dvo < HEAD_DIM_VO
    next_page = offs_n * 0
    if PAGED and PREFETCH_PAGES:
        next_page = tl.load(page_table + (start + offs_n) // page_size, mask=start + offs_n < kv_len, other=0)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n  # [BLOCK_N] key positions
        col_ok = cols < kv_len
        if PAGED:
            if PREFETCH_PAGES:
                # The page ids come from the previous iteration. Loaded in this one, they make the K/V
                # copies "indirect" for Triton's pipeliner, which then waits for every copy at the top
                # of each iteration (no K/V tile in flight during the math).
                page = next_page
                ahead = cols + BLOCK_N
                next_page = tl.load(page_table + ahead // page_size, mask=ahead < kv_len, other=0)
            elif MASKED:
                page = tl.load(page_table + cols // page_size, mask=col_ok, other=0)
            else:
                page = tl.load(page_table + cols // page_size)
            if not INT32_PAGE_OFFSETS:  # 32-bit row offsets halve the address arithmetic where they fit
                page = page.to(tl.int64)
            slot = cols % page_size
            k_rows = page * stride_kp + slot * stride_kt
            v_rows = page * stride_vp + slot * stride_vt
        else:
            k_rows = cols * stride_kt
            v_rows = cols * stride_vt
        k_ptrs = k_base + k_rows[:, None] + offs_dqk[None, :]
        if MASKED:
            k_mask = col_ok[:, None] & dqk_ok[None, :]
            k = tl.load(k_ptrs, mask=k_mask, other=0.0)  # [N, D_QK]
        elif HEAD_DIM_QK == D_QK:  # interior tile, unpadded head dim: unpredicated loads
            k_mask = dqk_ok[None, :]
            k = tl.load(k_ptrs)
        else:
            k_mask = dqk_ok[None, :]
            k = tl.load(k_ptrs, mask=k_mask, other=0.0)
        if USE_ROPE:
            partner_d = (offs_dqk + HEAD_DIM_QK // 2) % HEAD_DIM_QK
            k_partner = tl.load(k_base + k_rows[:, None] + partner_d[None, :], mask=k_mask, other=0.0)
            k = rope_rotate(k, k_partner, cols, offs_dqk, HEAD_DIM_QK, rope_log2_theta, rope_inv_scale)
        qk = mma(q_dot, tl.trans(k.to(q_dot.dtype)), UPCAST_DOT)  # [M, N] float32
        if KV_FP8:
            qk = qk * q_unscale

        if LOGITS_HOOK is not None:  # natural-unit logits from the variant; base 2 for the softmax
            s = LOGITS_HOOK(qk, sm_scale, v_batch[:, None], v_qo_idx[:, None], cols[None, :], v_heads[:, None],
                            v_kv_head, v_qo_len, kv_len, vargs)
            if USE_SOFTMAX:
                s = s * 1.4426950408889634
        elif USE_SOFTCAP or USE_ALIBI:
            s = qk * sm_scale
            if USE_ALIBI:
                s += slopes[:, None] * (cols[None, :] - positions[:, None]).to(tl.float32)
            if USE_SOFTCAP:
                s = soft_cap * tanh(s / soft_cap)
            s = s * 1.4426950408889634
        elif USE_SOFTMAX:
            s = qk * qk_scale_log2
        else:
            s = qk * sm_scale

        if MASKED:
            visible = col_ok[None, :] & row_ok[:, None]
            if HAS_CUSTOM_MASK:
                bit = tokens[:, None].to(tl.int64) * kv_len + cols[None, :]
                byte = tl.load(mask_ptr + (bit >> 3), mask=visible, other=0).to(tl.int32)
                visible = visible & (((byte >> (bit & 7).to(tl.int32)) & 1) != 0)
            elif CAUSAL:
                # Bottom-right aligned; rows with a negative position (qo_len > kv_len) see nothing.
                visible = visible & (cols[None, :] <= positions[:, None])
            if MULTI_ITEM:
                visible = visible & ((cols[None, :] < prefix_len) | (cols[None, :] >= item_first_key[:, None]))
            if HAS_WINDOW:
                visible = visible & (cols[None, :] >= positions[:, None] - window_left)
            if MASK_HOOK is not None:
                visible = visible & MASK_HOOK(v_batch[:, None], v_qo_idx[:, None], cols[None, :], v_heads[:, None],
                                              v_kv_head, v_qo_len, kv_len, vargs)
            if USE_SOFTMAX:
                s = tl.where(visible, s, float("-inf"))
            else:
                s = tl.where(visible, s, 0.0)
        elif MASK_HOOK is not None and MASK_HOOK_UNMASKED:
            keep = MASK_HOOK(v_batch[:, None], v_qo_idx[:, None], cols[None, :], v_heads[:, None], v_kv_head,
                             v_qo_len, kv_len, vargs)
            if USE_SOFTMAX:
                s = tl.where(keep, s, float("-inf"))
            else:
                s = tl.where(keep, s, 0.0)

        if USE_SOFTMAX:
            m_i, l_i, acc, p = softmax_update(m_i, l_i, acc, s)
        else:  # the variant's weights as they are (flashtile/variants.py: use_softmax=False)
            p = s
        if V_T:  # keys contiguous: offsets from `cols` itself, so the compiler sees the contiguity
            v_ptrs = v_base + cols[:, None] + offs_dvo[None, :] * stride_vd
        else:
            v_ptrs = v_base + v_rows[:, None] + offs_dvo[None, :]
        if MASKED:
            if V_T:  # rows past the keys are in bounds and finite (fp8_v_layout's zero tail); their weights are 0
                v = tl.load(v_ptrs, mask=dvo_ok[None, :], other=0.0)  # [N, D_VO]
            else:
                v = tl.load(v_ptrs, mask=col_ok[:, None] & dvo_ok[None, :], other=0.0)  # [N, D_VO]
        elif HEAD_DIM_VO == D_VO:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=dvo_ok[None, :], other=0.0)
        if PV_FP16:
            acc += mma(p.to(tl.float16), v.to(tl.float16), UPCAST_DOT)
        elif UPCAST_DOT:  # the interpreter (fp8 q: weights rounded by fp8_round)
            acc += mma(weights_operand(p, q), v.to(q.dtype), UPCAST_DOT)
        else:  # compiled: the weights in q's dtype (fp8 q: FA3's fp8 weights, both products on fp8 tensor cores)
            acc += mma(p.to(q.dtype), v.to(q.dtype), UPCAST_DOT)
    return acc, m_i, l_i


@triton.jit
def fp8_round(p, E4M3: tl.constexpr):
    """Non-negative float32 ``p`` rounded to the nearest float8 value (e4m3fn: 3 mantissa bits, normal from
    2**-6; e5m2: 2 bits, normal from 2**-14; ties away from zero), still in float32."""
    e = tl.floor(tl.log2(tl.maximum(p, 1e-30)))  # the binade of p (p = 0: below every fp8 value)
    if E4M3:
        ulp = tl.exp2(tl.maximum(e, -6.0) - 3.0)
    else:
        ulp = tl.exp2(tl.maximum(e, -14.0) - 2.0)
    return tl.floor(p / ulp + 0.5) * ulp


@triton.jit
def weights_operand(p, q):
    """Under the interpreter: the softmax weights ``p`` (float32) as the A operand of the P.V product, in
    q's dtype. For fp8 q the cast is emulated by :func:`fp8_round`: the interpreter's own float -> fp8
    conversion does not round to nearest (Triton 3.9: 0.1219 became 0.0625), the GPU's (cvt.rn.satfinite)
    does. (Compiled kernels cast in place: a helper call there changes the default kernels' machine code.)"""
    if q.dtype.is_fp8():
        w = fp8_round(p, q.dtype == tl.float8e4nv)
    else:
        w = p.to(q.dtype)
    return w


@triton.jit
def fp8_row_scales(FP8_SCALES, heads, row_ok, kv_head, sm_scale):
    """FP8 attention: the logit scale of each row, ``sm_scale * scale_q[head] * scale_k[kv_head]``, as a
    ``[BLOCK_M, 1]`` column, and the same times log2(e) (the one multiplier of the fp8 q.k product for
    the base-2 softmax). ``FP8_SCALES``: ``(SCALE_Q [Hq], SCALE_K [Hkv], SCALE_V [Hkv], stride_q,
    stride_k, stride_v)``, float32 (a per-tensor scale has stride 0)."""
    sq = tl.load(FP8_SCALES[0] + heads * FP8_SCALES[3], mask=row_ok, other=0.0)  # [M]
    sk = tl.load(FP8_SCALES[1] + kv_head * FP8_SCALES[4])
    scale = sq * (sk * sm_scale)
    return scale[:, None], (scale * 1.4426950408889634)[:, None]


@triton.jit
def fp8_v_scale(FP8_SCALES, kv_head):
    """FP8 attention: ``scale_v`` of the program's KV head (multiplies its output rows, partial or final)."""
    return tl.load(FP8_SCALES[2] + kv_head * FP8_SCALES[5])


@triton.jit
def tile_ranges(
    lo, hi, t_first, t_last, delta, kv_len, window_left,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CUSTOM_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
    RANGE_HOOK: tl.constexpr = None, v_batch=0, v_qo_len=0, vargs=None, FULL_HOOK: tl.constexpr = None,
):
    """Cut a program's KV range ``[lo, hi)`` (``lo`` a multiple of BLOCK_N) for query tokens
    ``t_first..t_last`` (absolute positions ``t + delta``) into ``[start, full_start)`` (masked: window
    edge), ``[full_start, full_end)`` (seen by every row: no mask) and ``[full_end, hi)`` (masked:
    causal diagonal, ragged end). Tiles no row can see are dropped. RANGE_HOOK (a variant's ``kv_range``,
    flashtile/variants.py) narrows ``[lo, hi)`` to the keys its mask lets these rows see; FULL_HOOK (its
    ``kv_full_range``) narrows the unmasked tiles to the keys its mask shows every row, whose tiles then
    skip the mask hook (attend_range)."""
    if RANGE_HOOK is not None:
        r_lo, r_hi = RANGE_HOOK(v_batch, t_first, t_last, v_qo_len, kv_len, vargs)
        lo = tl.maximum(lo, r_lo)
        hi = tl.minimum(hi, r_hi)
    if CAUSAL:
        hi = tl.minimum(hi, t_last + delta + 1)
    if HAS_WINDOW:
        lo = tl.maximum(lo, t_first + delta - window_left)
    start = (lo // BLOCK_N) * BLOCK_N
    full_lo = 0
    full_hi = kv_len
    if CAUSAL:
        full_hi = tl.maximum(tl.minimum(full_hi, t_first + delta + 1), 0)
    if HAS_WINDOW:
        full_lo = tl.maximum(t_last + delta - window_left, 0)
    if FULL_HOOK is not None:
        f_lo, f_hi = FULL_HOOK(v_batch, t_first, t_last, v_qo_len, kv_len, vargs)
        full_lo = tl.maximum(full_lo, f_lo)
        full_hi = tl.minimum(full_hi, f_hi)
    full_start = tl.maximum(start, tl.cdiv(full_lo, BLOCK_N) * BLOCK_N)
    full_end = tl.minimum((full_hi // BLOCK_N) * BLOCK_N, hi)
    if HAS_CUSTOM_MASK:
        full_start = start
        full_end = start
    if full_end <= full_start:
        full_start = start
        full_end = start
    return start, full_start, full_end, hi


@triton.jit
def load_q(Q, tokens, heads, row_ok, stride_qt, stride_qh, positions, rope_log2_theta, rope_inv_scale,
           HEAD_DIM_QK: tl.constexpr, D_QK: tl.constexpr, USE_ROPE: tl.constexpr):
    """The ``[BLOCK_M, D_QK]`` query tile of GQA-packed rows (rotated in float32 with RoPE)."""
    offs_dqk = tl.arange(0, D_QK)
    q_row = Q + tokens[:, None].to(tl.int64) * stride_qt + heads[:, None] * stride_qh
    q_mask = row_ok[:, None] & (offs_dqk[None, :] < HEAD_DIM_QK)
    q = tl.load(q_row + offs_dqk[None, :], mask=q_mask, other=0.0)
    if USE_ROPE:
        partner_d = (offs_dqk + HEAD_DIM_QK // 2) % HEAD_DIM_QK
        q_partner = tl.load(q_row + partner_d[None, :], mask=q_mask, other=0.0)
        q = rope_rotate(q, q_partner, positions, offs_dqk, HEAD_DIM_QK, rope_log2_theta, rope_inv_scale)
        q = q.to(Q.dtype.element_ty)
    return q


@triton.jit
def head_inputs(SLOPES, K, V, heads, row_ok, kv_head, stride_kh, stride_vh, USE_ALIBI: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """Per-row ALiBi slopes (zeros without ALiBi) and the K/V base pointers of ``kv_head``."""
    slopes = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_ALIBI:
        slopes = tl.load(SLOPES + heads, mask=row_ok, other=0.0)
    return slopes, K + kv_head.to(tl.int64) * stride_kh, V + kv_head.to(tl.int64) * stride_vh


@triton.jit
def attend_range(
    q, k_base, v_base, stride_kt, stride_vt, page_table, page_size, stride_kp, stride_vp,
    mask_ptr, slopes, positions, tokens, row_ok,
    start, full_start, full_end, hi, kv_len,
    sm_scale, qk_scale_log2, soft_cap, window_left, rope_log2_theta, rope_inv_scale,
    HEAD_DIM_QK: tl.constexpr, HEAD_DIM_VO: tl.constexpr, D_QK: tl.constexpr, D_VO: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CUSTOM_MASK: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, USE_ROPE: tl.constexpr, PAGED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST_DOT: tl.constexpr,
    PREFETCH_PAGES: tl.constexpr = False, INT32_PAGE_OFFSETS: tl.constexpr = False,
    MULTI_ITEM: tl.constexpr = False, prefix_len=0, item_first_key=0,
    LOGITS_HOOK: tl.constexpr = None, MASK_HOOK: tl.constexpr = None, SINK_HOOK: tl.constexpr = None,
    USE_SOFTMAX: tl.constexpr = True, vargs=None, v_batch=0, v_qo_idx=0, v_heads=0, v_kv_head=0, v_qo_len=0,
    v_first=0, V_T: tl.constexpr = False, stride_vd=1, FULL_HOOK: tl.constexpr = None,
):
    """Attention state ``(o, lse)`` of a row tile over the ranges from :func:`tile_ranges`.
    Paged only: PREFETCH_PAGES loads each tile's page ids one iteration ahead (see attend_tiles);
    INT32_PAGE_OFFSETS computes K/V row offsets in int32 (the caller checked that every offset from
    the K/V base pointers fits). MULTI_ITEM (batch prefill's multi-item scoring, with CAUSAL): rows see
    the prefix ``[0, prefix_len)`` and, after it, keys from their ``item_first_key`` (``[BLOCK_M]``) on.
    Variant hooks (flashtile/variants.py; None: not compiled): LOGITS_HOOK, MASK_HOOK, USE_SOFTMAX as in
    :func:`attend_tiles`; SINK_HOOK's per-row logit starts the state (a key of value 0 seen once) in the
    program whose range starts the request's keys (``v_first`` nonzero), so a split-KV merge counts it once.
    With USE_SOFTMAX False the result is ``(sum of w * v, 0)``. V_T, stride_vd: V stored transposed (attend_tiles).
    FULL_HOOK: the variant's ``kv_full_range``, applied by tile_ranges: the unmasked tiles skip MASK_HOOK."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if SINK_HOOK is not None:
        first = (l_i == 0.0) & (v_first != 0)
        sink = SINK_HOOK(v_batch, v_heads, vargs) * 1.4426950408889634
        m_i = tl.where(first, sink, m_i)
        l_i = tl.where(first, 1.0, l_i)
    acc = tl.zeros([BLOCK_M, D_VO], dtype=tl.float32)
    skip_lo = hi  # KV tiles [skip_lo, skip_hi) are seen by no row (multi-item only)
    skip_hi = hi
    if MULTI_ITEM:
        # Only tiles wholly inside the prefix run unmasked. Past the prefix a row sees keys from its
        # item_first_key on, so the tiles below the rows' smallest one (earlier items) are skipped.
        full_end = tl.maximum(tl.minimum(full_end, (prefix_len // BLOCK_N) * BLOCK_N), full_start)
        skip_lo = tl.minimum(tl.maximum(tl.cdiv(prefix_len, BLOCK_N) * BLOCK_N, full_end), hi)
        skip_hi = tl.minimum(tl.maximum((tl.min(item_first_key, 0) // BLOCK_N) * BLOCK_N, skip_lo), hi)
    # Left masked tiles (window edge), tiles seen in full, right masked tiles (diagonal, ragged end).
    acc, m_i, l_i = attend_tiles(
        acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, page_table, page_size, stride_kp, stride_vp,
        mask_ptr, slopes, positions, tokens, row_ok, start, full_start, kv_len, sm_scale, qk_scale_log2, soft_cap,
        window_left, rope_log2_theta, rope_inv_scale, HEAD_DIM_QK, HEAD_DIM_VO, D_QK, D_VO, CAUSAL, HAS_WINDOW,
        HAS_CUSTOM_MASK, USE_SOFTCAP, USE_ALIBI, USE_ROPE, PAGED, True, BLOCK_N, UPCAST_DOT,
        PREFETCH_PAGES, INT32_PAGE_OFFSETS, MULTI_ITEM, prefix_len, item_first_key,
        LOGITS_HOOK, MASK_HOOK, USE_SOFTMAX, vargs, v_batch, v_qo_idx, v_heads, v_kv_head, v_qo_len, V_T, stride_vd)
    acc, m_i, l_i = attend_tiles(
        acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, page_table, page_size, stride_kp, stride_vp,
        mask_ptr, slopes, positions, tokens, row_ok, full_start, full_end, kv_len, sm_scale, qk_scale_log2, soft_cap,
        window_left, rope_log2_theta, rope_inv_scale, HEAD_DIM_QK, HEAD_DIM_VO, D_QK, D_VO, CAUSAL, HAS_WINDOW,
        HAS_CUSTOM_MASK, USE_SOFTCAP, USE_ALIBI, USE_ROPE, PAGED, False, BLOCK_N, UPCAST_DOT,
        PREFETCH_PAGES, INT32_PAGE_OFFSETS, MULTI_ITEM, prefix_len, item_first_key,
        LOGITS_HOOK, MASK_HOOK, USE_SOFTMAX, vargs, v_batch, v_qo_idx, v_heads, v_kv_head, v_qo_len, V_T, stride_vd,
        MASK_HOOK_UNMASKED=FULL_HOOK is None)  # the tiles every row sees: FULL_HOOK vouches for the mask
    acc, m_i, l_i = attend_tiles(
        acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, page_table, page_size, stride_kp, stride_vp,
        mask_ptr, slopes, positions, tokens, row_ok, full_end, skip_lo, kv_len, sm_scale, qk_scale_log2, soft_cap,
        window_left, rope_log2_theta, rope_inv_scale, HEAD_DIM_QK, HEAD_DIM_VO, D_QK, D_VO, CAUSAL, HAS_WINDOW,
        HAS_CUSTOM_MASK, USE_SOFTCAP, USE_ALIBI, USE_ROPE, PAGED, True, BLOCK_N, UPCAST_DOT,
        PREFETCH_PAGES, INT32_PAGE_OFFSETS, MULTI_ITEM, prefix_len, item_first_key,
        LOGITS_HOOK, MASK_HOOK, USE_SOFTMAX, vargs, v_batch, v_qo_idx, v_heads, v_kv_head, v_qo_len, V_T, stride_vd)
    if MULTI_ITEM:  # the masked tiles after the skipped ones
        acc, m_i, l_i = attend_tiles(
            acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, page_table, page_size, stride_kp, stride_vp,
            mask_ptr, slopes, positions, tokens, row_ok, skip_hi, hi, kv_len, sm_scale, qk_scale_log2, soft_cap,
            window_left, rope_log2_theta, rope_inv_scale, HEAD_DIM_QK,
            HEAD_DIM_VO, D_QK, D_VO, CAUSAL, HAS_WINDOW, HAS_CUSTOM_MASK, USE_SOFTCAP, USE_ALIBI, USE_ROPE, PAGED,
            True, BLOCK_N, UPCAST_DOT, PREFETCH_PAGES, INT32_PAGE_OFFSETS, MULTI_ITEM, prefix_len,
            item_first_key, LOGITS_HOOK, MASK_HOOK, USE_SOFTMAX, vargs, v_batch, v_qo_idx, v_heads, v_kv_head,
            v_qo_len, V_T, stride_vd)
    if not USE_SOFTMAX:
        return acc, tl.zeros([BLOCK_M], dtype=tl.float32)
    return finalize_state(m_i, l_i, acc)


@triton.jit
def store_state(o_row, lse_ptrs, o, lse, row_ok, v_scale, HEAD_DIM_VO: tl.constexpr, D_VO: tl.constexpr,
                PARTIAL: tl.constexpr):
    """Store a finished state: float32 as is (a split-KV partial), or times ``v_scale`` in O's dtype."""
    offs_dvo = tl.arange(0, D_VO)
    o_mask = row_ok[:, None] & (offs_dvo[None, :] < HEAD_DIM_VO)
    if PARTIAL:
        tl.store(o_row + offs_dvo[None, :], o, mask=o_mask)
    else:
        tl.store(o_row + offs_dvo[None, :], (o * v_scale).to(o_row.dtype.element_ty), mask=o_mask)
    tl.store(lse_ptrs, lse, mask=row_ok)
