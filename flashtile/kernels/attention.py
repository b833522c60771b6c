"""Tiled attention for one request (FlashAttention-2 style), used by decode and prefill, + its launcher.

One program owns ``BLOCK_M`` rows of one KV head and one KV split. Rows are *GQA-packed*: row ``r``
is query token ``r // GROUP`` of query head ``kv_head * GROUP + r % GROUP``, so the query heads that
share a KV head share every K/V tile load (decode reads each K/V byte once; GQA prefill reads K/V
once per KV head instead of once per query head).

The tile loops over a program's KV range (masked edge tiles, unmasked interior tiles, tiles nobody
sees skipped) are in :mod:`.tiles`, shared with batch prefill. With ``num_splits > 1`` (split-KV /
flash-decoding) each program covers a ``kv_chunk``-token slice and writes a float32 partial state
that :mod:`.merge` combines.

Pointer shapes (strides are passed, so NHD and HND views and strided q work without copies):
  Q    [qo_len, num_qo_heads, HEAD_DIM_QK]
  K    [kv_len, num_kv_heads, HEAD_DIM_QK]  (fp16/bf16, or fp8 upcast in the kernel)
  V    [kv_len, num_kv_heads, HEAD_DIM_VO]
  O    [qo_len, num_qo_heads, HEAD_DIM_VO] (final), or float32 [num_splits, qo_len, num_qo_heads, D] (partial)
  LSE  [qo_len, num_qo_heads] float32 (final), or [num_splits, qo_len, num_qo_heads] (partial)
  MASK packed custom mask, uint8, bit ``t * kv_len + j`` (LSB first) = query t may see key j
  SLOPES float32 [num_qo_heads] ALiBi slopes
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .._core import decode_tune, tile_policy
from .._core.device import device_facts, num_sms
from .._core.intmath import cdiv, dot_tile_dim, offsets_fit_int32
from .._core.launch import direct_launch
from .._core.params import AttentionParams
from .._core.settings import interpreting
from ..reference.positional import alibi_slopes
from ..scheduler.split_kv import SingleKVSplits, SingleLaunchShape, plan_single_kv_splits
from ..scheduler.worklist import DECODE_ITEM_FIELDS, decode_layout
from .merge import merge_attention_states
from .smem import TileFeatures, device_config, launch_within_limit
from .tiles import attend_range, fp8_row_scales, fp8_v_scale, head_inputs, load_q, store_state, tile_ranges

LOG2E = 1.4426950408889634
INTERPRET = interpreting()
DECODE_ITEM_STRIDE = tl.constexpr(len(DECODE_ITEM_FIELDS))


@direct_launch
@triton.jit
def _attention_fwd_kernel(
    Q, K, V, O, LSE, MASK, SLOPES,
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_os, stride_ot, stride_oh,
    stride_ls, stride_lt, stride_lh,
    qo_len, kv_len, kv_chunk, num_m_blocks,
    sm_scale, qk_scale_log2, soft_cap, window_left, rope_log2_theta, rope_inv_scale, v_scale,
    GROUP: tl.constexpr,  # query heads per KV head; constexpr so row -> (token, head) is shifts/muls
    HEAD_DIM_QK: tl.constexpr, HEAD_DIM_VO: tl.constexpr,
    D_QK: tl.constexpr, D_VO: tl.constexpr,  # head dims padded to powers of two (>= 16) for tl.dot
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CUSTOM_MASK: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, USE_ROPE: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST_DOT: tl.constexpr,
    LOGITS_HOOK: tl.constexpr = None, MASK_HOOK: tl.constexpr = None, QUERY_HOOK: tl.constexpr = None,
    OUTPUT_HOOK: tl.constexpr = None, SINK_HOOK: tl.constexpr = None, USE_SOFTMAX: tl.constexpr = True, vargs=None,
    RANGE_HOOK: tl.constexpr = None, FP8: tl.constexpr = False, FP8_SCALES=None, V_T: tl.constexpr = False,
    stride_vd=1, FULL_HOOK: tl.constexpr = None,
):
    # FP8 (q, k, v float8): FP8_SCALES holds the per-head scales (tiles.fp8_row_scales); False (fp16/bf16 q)
    # compiles none of it. V_T: V transposed in memory (keys contiguous, head dim stride stride_vd; tiles.attend_tiles).
    # Heaviest causal blocks (the last query rows) first, so the tail of the grid is short work.
    pid_m = num_m_blocks - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [M] GQA-packed row ids
    num_rows = qo_len * GROUP
    row_ok = rows < num_rows
    tokens = rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    delta = kv_len - qo_len
    positions = tokens + delta  # absolute position of each row's query

    # Rows this program owns span tokens [t_first, t_last]; its KV range is this split's chunk.
    t_first = (pid_m * BLOCK_M) // GROUP
    t_last = tl.minimum(pid_m * BLOCK_M + BLOCK_M - 1, num_rows - 1) // GROUP
    lo = split * kv_chunk
    start, full_start, full_end, hi = tile_ranges(
        lo, tl.minimum(kv_len, lo + kv_chunk), t_first, t_last, delta, kv_len, window_left,
        CAUSAL, HAS_WINDOW, HAS_CUSTOM_MASK, BLOCK_N, RANGE_HOOK, 0, qo_len, vargs, FULL_HOOK)

    q = load_q(Q, tokens, heads, row_ok, stride_qt, stride_qh, positions, rope_log2_theta, rope_inv_scale,
               HEAD_DIM_QK, D_QK, USE_ROPE)
    batch = tokens * 0  # one request (variant hooks' batch index)
    if QUERY_HOOK is not None:
        q = QUERY_HOOK(q, batch, tokens, heads, qo_len, kv_len, vargs)
    slopes, k_base, v_base = head_inputs(SLOPES, K, V, heads, row_ok, kv_head, stride_kh, stride_vh, USE_ALIBI,
                                         BLOCK_M)
    if FP8:  # per-row logit scales: [M, 1] columns in place of the scalars
        sm_scale, qk_scale_log2 = fp8_row_scales(FP8_SCALES, heads, row_ok, kv_head, sm_scale)
    o, lse = attend_range(
        q, k_base, v_base, stride_kt, stride_vt, K, 1, 0, 0, MASK, slopes, positions, tokens, row_ok,
        start, full_start, full_end, hi, kv_len, sm_scale, qk_scale_log2, soft_cap, window_left,
        rope_log2_theta, rope_inv_scale, HEAD_DIM_QK, HEAD_DIM_VO, D_QK, D_VO, CAUSAL,
        HAS_WINDOW, HAS_CUSTOM_MASK, USE_SOFTCAP, USE_ALIBI, USE_ROPE, False, BLOCK_M, BLOCK_N, UPCAST_DOT,
        LOGITS_HOOK=LOGITS_HOOK, MASK_HOOK=MASK_HOOK, SINK_HOOK=SINK_HOOK, USE_SOFTMAX=USE_SOFTMAX, vargs=vargs,
        v_batch=batch, v_qo_idx=tokens, v_heads=heads, v_kv_head=kv_head, v_qo_len=qo_len, v_first=split == 0,
        V_T=V_T, stride_vd=stride_vd, FULL_HOOK=FULL_HOOK)
    if OUTPUT_HOOK is not None:  # whole rows only (no split: flashtile/variants.py)
        o = OUTPUT_HOOK(o, lse, batch, tokens, heads, qo_len, kv_len, vargs)
    if FP8:  # before a split partial too: the merge is linear in o
        o = o * fp8_v_scale(FP8_SCALES, kv_head)
    o_row = O + split * stride_os + tokens[:, None] * stride_ot + heads[:, None] * stride_oh
    lse_ptrs = LSE + split * stride_ls + tokens * stride_lt + heads * stride_lh
    store_state(o_row, lse_ptrs, o, lse, row_ok, v_scale, HEAD_DIM_VO, D_VO, WRITE_PARTIAL)


@direct_launch
@triton.jit
def _batch_decode_kernel(
    Q, K, V, O, LSE, PART_O, PART_LSE, SLOPES,
    PAGE_INDICES, PAGE_INDPTR, ITEM_INDPTR, KV_LENS, ITEMS,
    stride_qb, stride_qh,
    stride_kp, stride_kt, stride_kh,
    stride_vp, stride_vt, stride_vh,
    stride_ob, stride_oh, stride_lb, stride_lh,
    stride_pw, stride_ph, stride_plw, stride_plh,
    batch_size, page_size,
    sm_scale, qk_scale_log2, soft_cap, window_left, rope_log2_theta, rope_inv_scale, v_scale,
    GROUP: tl.constexpr, HEAD_DIM_QK: tl.constexpr, HEAD_DIM_VO: tl.constexpr, D_QK: tl.constexpr, D_VO: tl.constexpr,
    HAS_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, USE_ROPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST_DOT: tl.constexpr,
    LOGITS_HOOK: tl.constexpr = None, MASK_HOOK: tl.constexpr = None, QUERY_HOOK: tl.constexpr = None,
    OUTPUT_HOOK: tl.constexpr = None, SINK_HOOK: tl.constexpr = None, USE_SOFTMAX: tl.constexpr = True, vargs=None,
    RANGE_HOOK: tl.constexpr = None,
    PREFETCH_PAGES: tl.constexpr = False,  # page ids one KV tile ahead (tiles.py attend_tiles)
    FULL_HOOK: tl.constexpr = None,
    INT32_PAGE_OFFSETS: tl.constexpr = False,  # 32-bit paged row offsets (the launcher checked they fit)
):
    """Batch decode over a paged cache: program ``(item, kv_head)`` attends the GQA group of one KV
    head (rows = its query heads) over one work item's KV range (scheduler/split_kv.py).

    The work list (scheduler/worklist.py, decode layout) gives request r's items ITEM_INDPTR[r]:ITEM_INDPTR[r+1]
    (entry B: the planned count), its length KV_LENS[r], and per item (request, kv_start, kv_end) records of
    DECODE_ITEM_STRIDE values. A request with one item writes its final output; a split request writes
    float32 partial states at its items' slots, which the merge kernel folds. Programs beyond the planned item
    count (the fixed grid of CUDA-graph mode) store nothing. The plan lives in device memory, so a captured launch
    serves any later plan of the same batch size.
      Q [B, Hq, D], K/V pages [pages, page_size, Hkv, D] (strides), O [B, Hq, Dv], LSE [B, Hq] f32,
      PART_O [items, Hq, Dv] f32, PART_LSE [items, Hq] f32; index arrays int32.
    """
    item = tl.program_id(0)
    kv_head = tl.program_id(1)
    num_items = tl.load(ITEM_INDPTR + batch_size)
    live = item < num_items
    item = tl.minimum(item, num_items - 1)
    record = ITEMS + item * DECODE_ITEM_STRIDE  # request, kv_start, kv_end (scheduler/worklist.py)
    req = tl.load(record)
    lo = tl.load(record + 1)
    hi = tl.load(record + 2)
    hi = tl.where(live, hi, lo)
    kv_len = tl.load(KV_LENS + req)
    single = tl.load(ITEM_INDPTR + req + 1) - tl.load(ITEM_INDPTR + req) == 1
    page_table = PAGE_INDICES + tl.load(PAGE_INDPTR + req)

    rows = tl.arange(0, BLOCK_M)
    row_ok = (rows < GROUP) & (rows * 0 + tl.program_id(0) < num_items)  # vector form: the interpreter
    # rejects a block mask combined with a scalar bool
    heads = kv_head * GROUP + rows
    tokens = tl.zeros([BLOCK_M], dtype=tl.int32) + req
    positions = tl.zeros([BLOCK_M], dtype=tl.int32) + (kv_len - 1)  # the query is the newest token
    start, full_start, full_end, hi = tile_ranges(
        lo, hi, 0, 0, kv_len - 1, kv_len, window_left, False, HAS_WINDOW, False, BLOCK_N, RANGE_HOOK, req, 1, vargs,
        FULL_HOOK)

    q = load_q(Q, tokens, heads, row_ok, stride_qb, stride_qh, positions, rope_log2_theta, rope_inv_scale,
               HEAD_DIM_QK, D_QK, USE_ROPE)
    qo_idx = rows * 0  # a decode query is query 0 of its request (variant hooks)
    if QUERY_HOOK is not None:
        q = QUERY_HOOK(q, tokens, qo_idx, heads, 1, kv_len, vargs)
    slopes, k_base, v_base = head_inputs(SLOPES, K, V, heads, row_ok, kv_head, stride_kh, stride_vh, USE_ALIBI,
                                         BLOCK_M)
    o, lse = attend_range(
        q, k_base, v_base, stride_kt, stride_vt, page_table, page_size, stride_kp, stride_vp, K, slopes,
        positions, tokens, row_ok, start, full_start, full_end, hi, kv_len, sm_scale, qk_scale_log2, soft_cap,
        window_left, rope_log2_theta, rope_inv_scale, HEAD_DIM_QK, HEAD_DIM_VO, D_QK, D_VO, False,
        HAS_WINDOW, False, USE_SOFTCAP, USE_ALIBI, USE_ROPE, True, BLOCK_M, BLOCK_N, UPCAST_DOT,
        PREFETCH_PAGES=PREFETCH_PAGES, INT32_PAGE_OFFSETS=INT32_PAGE_OFFSETS,
        LOGITS_HOOK=LOGITS_HOOK, MASK_HOOK=MASK_HOOK, SINK_HOOK=SINK_HOOK, USE_SOFTMAX=USE_SOFTMAX, vargs=vargs,
        v_batch=tokens, v_qo_idx=qo_idx, v_heads=heads, v_kv_head=kv_head, v_qo_len=1, v_first=lo == 0,
        FULL_HOOK=FULL_HOOK)
    if OUTPUT_HOOK is not None:  # whole rows only (no split: flashtile/variants.py)
        o = OUTPUT_HOOK(o, lse, tokens, qo_idx, heads, 1, kv_len, vargs)
    if single:
        store_state(O + req.to(tl.int64) * stride_ob + heads[:, None] * stride_oh,
                    LSE + req * stride_lb + heads * stride_lh, o, lse, row_ok, v_scale, HEAD_DIM_VO, D_VO, False)
    else:
        store_state(PART_O + item.to(tl.int64) * stride_pw + heads[:, None] * stride_ph,
                    PART_LSE + item * stride_plw + heads * stride_plh, o, lse, row_ok, v_scale, HEAD_DIM_VO, D_VO,
                    True)


# ----------------------------------------------------------------------------------------------
# Launch configurations, declared as data. A config is chosen from a table keyed on the shape
# class (decode vs prefill, padded head dim). Under the interpreter one small config keeps CPU tests fast.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# ("prefill", padded head_dim) -> config; measured on H100 with the single_prefill tuning grid
# (benchmarks/bench_attention.py). Decode ("decode", "batch_decode") comes from the per-card tune table,
# _core/decode_tune.py, by the device's facts.
_CONFIG_TABLE = {
    ("prefill", 16): LaunchConfig(128, 64, 4, 3),
    ("prefill", 32): LaunchConfig(128, 64, 4, 3),
    ("prefill", 64): LaunchConfig(128, 64, 4, 3),
    ("prefill", 128): LaunchConfig(128, 128, 8, 3),
    ("prefill", 256): LaunchConfig(64, 32, 4, 2),
}
# FP8 attention's prefill (fp8 q, k, v): its own entries, so tuning them (benchmarks/bench_fp8_prefill.py's
# "config" grid) leaves the fp16/bf16 kernels alone. Not tuned yet: the fp16/bf16 configs.
_CONFIG_TABLE.update({("prefill_fp8", d): cfg for (kind, d), cfg in list(_CONFIG_TABLE.items()) if kind == "prefill"})


INTERPRETER_CONFIG = LaunchConfig(16, 16, 1, 1)


def check_fp8_head_dims(kv: torch.Tensor, head_dim_qk: int, head_dim_vo: int) -> None:
    """fp8 K/V with ``head_dim_vo != head_dim_qk`` fault (illegal address) or give wrong outputs on sm_90
    with Triton 3.6 (seen on an H100 for 64/32 in single and batch prefill; equal head dims and fp16/bf16
    caches are fine; the cause is not found yet). Until it is, such calls raise instead of crashing.
    The interpreter computes them correctly, so CPU runs are not refused."""
    if INTERPRET or kv.element_size() != 1 or head_dim_qk == head_dim_vo:
        return
    raise NotImplementedError(
        f"fp8 K/V with head_dim_vo ({head_dim_vo}) != head_dim_qk ({head_dim_qk}) is not supported by flashtile's "
        "GPU kernels yet; pass float16/bfloat16 K/V for this head-dim pair")


_slopes: dict = {}


def alibi_slopes_of(num_heads: int, device: torch.device) -> torch.Tensor:
    """ALiBi slopes (float32 ``[num_heads]``) on ``device``, made once per (heads, device)."""
    key = (num_heads, device)
    slopes = _slopes.get(key)
    if slopes is None:
        slopes = _slopes[key] = alibi_slopes(num_heads, device=device)
    return slopes


def variant_kwargs(variant) -> dict:
    """The kernel keywords of a bound attention variant (flashtile/variants.py's BoundVariant) or None:
    its hooks as constexpr functions, ``use_softmax``, and its extra arguments as one tuple. Nothing
    for None, so the default kernels compile exactly as without variants."""
    if variant is None:
        return {}
    v = variant.variant

    def fn(hook):
        return hook.triton if hook is not None else None

    kwargs = dict(LOGITS_HOOK=fn(v.logits_transform), MASK_HOOK=fn(v.logits_mask), QUERY_HOOK=fn(v.query_transform),
                  OUTPUT_HOOK=fn(v.output_transform), SINK_HOOK=fn(v.sink_logit), USE_SOFTMAX=v.use_softmax,
                  vargs=variant.args if variant.args else None)
    if v.kv_range is not None:  # only then: variants without one keep their compiled kernels
        kwargs["RANGE_HOOK"] = fn(v.kv_range)
    if v.kv_full_range is not None:  # likewise
        kwargs["FULL_HOOK"] = fn(v.kv_full_range)
    return kwargs


def qk_tile_dim(head_dim_qk: int, fp8: bool) -> int:
    """The padded q/k head dim of the kernels' tiles: at least 32 for FP8 attention (an fp8 ``tl.dot`` on
    sm_90 needs a reduction of 32 or more: Triton 3.6 does not compile head dim 16), else ``dot_tile_dim``."""
    return max(32, dot_tile_dim(head_dim_qk)) if fp8 else dot_tile_dim(head_dim_qk)


def fp8_kwargs(fp8_scales: Optional[tuple]) -> dict:
    """The kernel keyword of FP8 attention's scales ``(scale_q, scale_k, scale_v)`` (tiles.fp8_row_scales);
    nothing for None, so the fp16/bf16 kernels compile exactly as without it."""
    if fp8_scales is None:
        return {}
    sq, sk, sv = fp8_scales
    return {"FP8": True, "FP8_SCALES": (sq, sk, sv, sq.stride(0), sk.stride(0), sv.stride(0))}


# FP8 attention: hand the kernel a transposed copy of V (keys contiguous) instead of V as given. Triton 3.6's
# fp8 wgmma needs its B operand K-major; for P.V that is V with its keys contiguous. With V as given
# (head dim contiguous) Triton loads each V tile into registers and writes it back to shared memory transposed,
# outside its cp.async pipeline (sm_90a TTGIR, benchmarks/tools/aot_compile_check.py); with the copy the
# V tiles are pipelined like K's. The copy costs one pass over V per call. Its key rows are padded to a
# multiple of 16 (every row starts 16-byte aligned) plus V_T_TAIL zero keys: a tile may then read up to a
# tile past the last key without a key mask (the weights of those keys are 0), so its loads stay
# vectorized. Ragged batches: the same with each request's keys 16-aligned in the copy
# (batch_prefill.ragged_fp8_v_layout). False: V as given (what paged caches always use).
# benchmarks/bench_fp8_prefill.py measures both.
FP8_TRANSPOSE_V = True
V_T_ALIGN = 16
V_T_TAIL = 128  # >= the largest BLOCK_N


def fp8_v_layout(v: torch.Tensor, fp8_scales: Optional[tuple]) -> tuple:
    """``(v, kernel keywords)``: for FP8 attention with FP8_TRANSPOSE_V, a ``[rows, heads, dim]`` view of a
    transposed copy of ``v`` (memory ``[heads, dim, padded]``: the rows rounded up to V_T_ALIGN plus V_T_TAIL
    zero keys) and ``V_T``/``stride_vd``; else ``v`` itself and no keywords."""
    if fp8_scales is None or not FP8_TRANSPOSE_V or v.shape[0] == 0:
        return v, {}
    rows, heads, dim = v.shape
    padded = -(-rows // V_T_ALIGN) * V_T_ALIGN + V_T_TAIL
    vt = torch.empty(heads, dim, padded, dtype=v.dtype, device=v.device)
    vt[:, :, rows:].zero_()
    vt[:, :, :rows].copy_(v.permute(1, 2, 0))
    view = vt[:, :, :rows].permute(2, 0, 1)  # [rows, heads, dim], strides (1, dim * padded, padded)
    return view, {"V_T": True, "stride_vd": view.stride(2)}


def choose_config(kind: str, d_pad: int, device: Optional[torch.device] = None) -> LaunchConfig:
    """The preferred config of a shape class (the launchers then fit it to the device: smem.py): "prefill"
    and "prefill_fp8" from ``_CONFIG_TABLE``; "decode" and "batch_decode" (16-row tiles, page size 16,
    16-bit K/V) from the tune table entry of ``device``'s card (_core/decode_tune.py; None: the CPU facts,
    an H100's)."""
    if INTERPRET:
        return INTERPRETER_CONFIG
    if kind in ("prefill", "prefill_fp8"):
        return _CONFIG_TABLE[(kind, d_pad)]
    facts = device_facts(device if device is not None else torch.device("cpu"))
    tile = (decode_tune.single_decode_tile(facts, d_pad) if kind == "decode"
            else decode_tune.batch_decode_tile(facts, d_pad))
    return LaunchConfig(16, tile.block_n, tile.num_warps, tile.num_stages)


def _single_config(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: AttentionParams,
                   packed_mask: Optional[torch.Tensor], kind: str):
    """``(preferred config, features, config fitted to the device, whether the row tile may shrink)`` of a
    single-request launch (the kernel's own choice: the config table and the device's shared memory)."""
    head_dim_qk, head_dim_vo = q.shape[2], v.shape[2]
    fp8 = q.element_size() == 1  # FP8 attention: fp8 q, k and v
    d_qk, d_vo = qk_tile_dim(head_dim_qk, fp8), dot_tile_dim(head_dim_vo)
    use_rope = params.pos_encoding_mode == "ROPE_LLAMA"
    features = TileFeatures(d_qk, d_vo, q.element_size(), k.element_size(), use_rope, packed_mask is not None)
    preferred = choose_config(kind + "_fp8" if fp8 and kind == "prefill" else kind, max(d_qk, d_vo), q.device)
    vary_block_m = kind == "prefill"  # decode row tiles are 16 already
    return preferred, features, device_config(preferred, features, q.device, vary_block_m=vary_block_m), vary_block_m


def single_launch_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: AttentionParams, *,
                        packed_mask: Optional[torch.Tensor], kind: str, variant=None) -> SingleLaunchShape:
    """What the split planner (scheduler/split_kv.py) needs to know of :func:`single_attention_forward`'s
    launch for these arguments (same meanings): its programs per KV split (row blocks of the fitted config x
    KV heads), the KV chunk granularity, the SM count, and whether rows may be split (not for a variant
    whose rows cannot be merged, ``whole_rows``)."""
    check_fp8_head_dims(k, q.shape[2], v.shape[2])
    qo_len, num_qo_heads, _ = q.shape
    num_kv_heads = v.shape[1]
    cfg = _single_config(q, k, v, params, packed_mask, kind)[2]
    num_m_blocks = cdiv(qo_len * (num_qo_heads // num_kv_heads), cfg.block_m)
    align = tile_policy.KV_CHUNK_ALIGN if not INTERPRET else cfg.block_n
    return SingleLaunchShape(num_m_blocks * num_kv_heads, align, num_sms(q.device),
                             can_split=variant is None or not variant.variant.whole_rows,
                             programs_per_sm=decode_tune.split_targets(device_facts(q.device))[0])


def single_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    params: AttentionParams,
    *,
    packed_mask: Optional[torch.Tensor],
    kind: str,
    splits: Optional[SingleKVSplits] = None,
    num_splits: Optional[int] = None,
    variant=None,
    fp8_scales: Optional[tuple] = None,
) -> None:
    """Launch attention of one request as planned by ``splits``, writing ``out`` and ``lse`` in place.

    Args:
        q: ``[qo_len, num_qo_heads, head_dim_qk]``, fp16/bf16 (or fp8 with ``fp8_scales``), last dim contiguous
            (any other strides).
        k: ``[kv_len, num_kv_heads, head_dim_qk]`` view (an HND tensor is passed transposed), last dim
            contiguous; fp16/bf16 or fp8 (its calibration scale already folded into ``sm_scale``).
        v: ``[kv_len, num_kv_heads, head_dim_vo]`` view, like ``k``.
        out: ``[qo_len, num_qo_heads, head_dim_vo]`` in the output dtype, last dim contiguous.
        lse: float32 ``[qo_len, num_qo_heads]``, base 2.
        params: the resolved attention parameters (sm_scale with k_scale folded in, mask, RoPE, ...).
        packed_mask: uint8 bits of a ``[qo_len, kv_len]`` mask, row-major, LSB first; or None.
        kind: "decode" or "prefill": picks the launch-config table.
        splits: the KV splits (scheduler/split_kv.py's plan_single_kv_splits over :func:`single_launch_shape`;
            the op layer plans them, _core/ops.py). None: planned here the same way, with ``num_splits``
            forcing about that many splits (for tools and tests that call the launcher directly).
        variant: a bound attention variant (flashtile/variants.py) or None.
        fp8_scales: FP8 attention (q, k, v of one fp8 dtype): ``(scale_q [num_qo_heads], scale_k [num_kv_heads],
            scale_v [num_kv_heads])`` float32 views (stride 0 for a per-tensor scale); None otherwise.
    """
    if splits is None:
        shape = single_launch_shape(q, k, v, params, packed_mask=packed_mask, kind=kind, variant=variant)
        splits = plan_single_kv_splits(k.shape[0], shape, num_splits=num_splits)
    qo_len, num_qo_heads, head_dim_qk = q.shape
    kv_len, num_kv_heads, head_dim_vo = v.shape
    check_fp8_head_dims(k, head_dim_qk, head_dim_vo)
    v, v_kwargs = fp8_v_layout(v, fp8_scales)
    group = num_qo_heads // num_kv_heads
    d_qk, d_vo = qk_tile_dim(head_dim_qk, fp8_scales is not None), dot_tile_dim(head_dim_vo)
    num_rows = qo_len * group
    device = q.device
    use_rope = params.pos_encoding_mode == "ROPE_LLAMA"
    use_alibi = params.pos_encoding_mode == "ALIBI"
    causal, window_left, logits_soft_cap = params.causal, params.window_left, params.logits_soft_cap
    sm_scale, v_scale = params.sm_scale, params.v_scale
    dummy = out  # placeholder pointer for absent optional tensors (never dereferenced)
    alibi = alibi_slopes_of(num_qo_heads, device) if use_alibi else None

    def launch(cfg: LaunchConfig, splits: int, chunk: int, o_buf, lse_buf, partial: bool):
        num_m_blocks = cdiv(num_rows, cfg.block_m)
        if partial:
            o_strides = (o_buf.stride(0), o_buf.stride(1), o_buf.stride(2))
            l_strides = (lse_buf.stride(0), lse_buf.stride(1), lse_buf.stride(2))
        else:
            o_strides = (0, o_buf.stride(0), o_buf.stride(1))
            l_strides = (0, lse_buf.stride(0), lse_buf.stride(1))
        grid = (num_m_blocks, num_kv_heads, splits)
        _attention_fwd_kernel[grid](
            q, k, v, o_buf, lse_buf,
            packed_mask if packed_mask is not None else dummy,
            alibi if alibi is not None else dummy,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            *o_strides, *l_strides,
            qo_len, kv_len, chunk, num_m_blocks,
            sm_scale, sm_scale * LOG2E, float(logits_soft_cap), int(window_left),
            math.log2(params.rope_theta), 1.0 / params.rope_scale, float(v_scale),
            GROUP=group, HEAD_DIM_QK=head_dim_qk, HEAD_DIM_VO=head_dim_vo, D_QK=d_qk, D_VO=d_vo,
            CAUSAL=bool(causal) and packed_mask is None, HAS_WINDOW=window_left >= 0,
            HAS_CUSTOM_MASK=packed_mask is not None, USE_SOFTCAP=logits_soft_cap > 0,
            USE_ALIBI=use_alibi, USE_ROPE=use_rope, WRITE_PARTIAL=partial,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, UPCAST_DOT=INTERPRET, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, **extra,
        )

    extra = variant_kwargs(variant) | fp8_kwargs(fp8_scales) | v_kwargs
    preferred, features, cfg, vary_block_m = _single_config(q, k, v, params, packed_mask, kind)
    if not splits.partial:
        launch_within_limit(lambda c: launch(c, 1, splits.chunk, out, lse, False), preferred, features, device,
                            vary_block_m=vary_block_m, cfg=cfg)
        return
    count, chunk = splits.num_splits, splits.chunk
    partial_o = torch.empty((count, qo_len, num_qo_heads, head_dim_vo), dtype=torch.float32, device=device)
    partial_lse = torch.empty((count, qo_len, num_qo_heads), dtype=torch.float32, device=device)
    launch_within_limit(lambda c: launch(c, count, chunk, partial_o, partial_lse, True), preferred, features, device,
                        vary_block_m=vary_block_m, cfg=cfg)
    merge_attention_states(partial_o, partial_lse, out, lse, v_scale=v_scale)


# Decode rows are the query heads of one KV head: at least 16 for tl.dot, the whole group in one block.
def decode_block_m(group: int) -> int:
    return dot_tile_dim(group)


def batch_decode_tile(group: int, d_pad: int, page_size: int = 16, kv_bytes: int = 2,
                      device: Optional[torch.device] = None) -> tuple:
    """``(preferred config, DecodeTile)`` of batch decode: the card's tile (_core/decode_tune.py) for padded
    head dim ``d_pad``, ``page_size`` and K/V element size ``kv_bytes``, with a row tile holding the GQA
    ``group`` (at least the entry's ``wide_rows_warps`` warps from 32 rows on). ``device`` None: the CPU
    facts (an H100's)."""
    if INTERPRET:  # one small config; a tuning override's page-id options still apply (tests run them)
        forced = decode_tune.BATCH_DECODE_OVERRIDE
        flags = (forced.prefetch_pages, forced.int32_offsets) if forced is not None else (False, False)
        return INTERPRETER_CONFIG, decode_tune.DecodeTile(16, 1, 1, *flags)
    facts = device_facts(device if device is not None else torch.device("cpu"))
    tile = decode_tune.batch_decode_tile(facts, d_pad, page_size, kv_bytes)
    block_m = decode_block_m(group)
    warps = tile.num_warps if block_m <= 16 else max(tile.num_warps, decode_tune.card_entry(facts)[1].wide_rows_warps)
    return LaunchConfig(block_m, tile.block_n, warps, tile.num_stages), tile


def batch_decode_forward(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_indptr: torch.Tensor,
    page_indices: torch.Tensor,
    worklist: torch.Tensor,
    part_o: torch.Tensor,
    part_lse: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    params: AttentionParams,
    *,
    batch_size: int,
    num_programs: int,
    max_states: int,
    merge: bool,
    variant=None,
) -> None:
    """Launch batch decode over a paged cache (+ the merge of split requests), in place.

    Args:
        q: ``[B, num_qo_heads, head_dim_qk]`` fp16/bf16, unit last stride.
        k_pages, v_pages: ``[num_pages, page_size, num_kv_heads, head_dim]`` views (NHD; strides
            passed), fp16/bf16 or fp8 (scale folded into ``params.sm_scale`` / ``params.v_scale``).
        page_indptr: int32 ``[B + 1]``, page_indices: int32 page ids; request ``r`` owns
            ``page_indices[page_indptr[r]:page_indptr[r + 1]]``.
        worklist: int32, the decode layout of scheduler/worklist.py for ``batch_size`` requests and
            ``num_programs`` item records.
        part_o: float32 ``[>= num_programs, num_qo_heads, head_dim_vo]``, part_lse float32 ``[.., num_qo_heads]``.
        out: ``[B, num_qo_heads, head_dim_vo]``; lse: float32 ``[B, num_qo_heads]`` (base 2).
        num_programs: grid size along items (the planned count, or CUDA-graph mode's fixed capacity).
        max_states: a bound on the items of one request (merge fold width).
        merge: launch the merge (some request is split, or CUDA-graph mode where that is unknown).
        variant: a bound attention variant (flashtile/variants.py) or None; one with ``whole_rows`` needs a plan
            without splits (the wrapper plans so).
    """
    extra = variant_kwargs(variant)
    layout = decode_layout(batch_size, num_programs)
    item_indptr = worklist[layout.offset("item_indptr"):]
    kv_lens = worklist[layout.offset("kv_lens"):]
    items = worklist[layout.offset("items"):]
    alibi = alibi_slopes_of(q.shape[1], q.device) if params.pos_encoding_mode == "ALIBI" else None
    batch, num_qo_heads, head_dim_qk = q.shape
    num_kv_heads, head_dim_vo = v_pages.shape[2], v_pages.shape[3]
    group = num_qo_heads // num_kv_heads
    d_qk, d_vo = dot_tile_dim(head_dim_qk), dot_tile_dim(head_dim_vo)
    page_size = k_pages.shape[1]
    preferred, tile = batch_decode_tile(group, max(d_qk, d_vo), page_size, k_pages.element_size(), q.device)
    prefetch = tile.prefetch_pages and page_size > 1
    int32_offsets = (tile.int32_offsets and offsets_fit_int32(k_pages.shape, k_pages.stride())
                     and offsets_fit_int32(v_pages.shape, v_pages.stride()))
    use_rope = params.pos_encoding_mode == "ROPE_LLAMA"
    features = TileFeatures(d_qk, d_vo, q.element_size(), k_pages.element_size(), use_rope)
    launch_within_limit(lambda cfg: _batch_decode_kernel[(num_programs, num_kv_heads)](
        q, k_pages, v_pages, out, lse, part_o, part_lse, alibi if alibi is not None else lse,
        page_indices, page_indptr, item_indptr, kv_lens, items,
        q.stride(0), q.stride(1),
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        v_pages.stride(0), v_pages.stride(1), v_pages.stride(2),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        part_o.stride(0), part_o.stride(1), part_lse.stride(0), part_lse.stride(1),
        batch, k_pages.shape[1],
        params.sm_scale, params.sm_scale * LOG2E, float(params.logits_soft_cap), int(params.window_left),
        math.log2(params.rope_theta), 1.0 / params.rope_scale, float(params.v_scale),
        GROUP=group, HEAD_DIM_QK=head_dim_qk, HEAD_DIM_VO=head_dim_vo, D_QK=d_qk, D_VO=d_vo,
        HAS_WINDOW=params.window_left >= 0, USE_SOFTCAP=params.logits_soft_cap > 0,
        USE_ALIBI=params.pos_encoding_mode == "ALIBI", USE_ROPE=use_rope,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, UPCAST_DOT=INTERPRET, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, PREFETCH_PAGES=prefetch, INT32_PAGE_OFFSETS=int32_offsets, **extra,
    ), preferred, features, q.device)
    if merge:
        merge_attention_states(part_o, part_lse, out, lse, v_scale=params.v_scale, state_indptr=item_indptr,
                               max_states=max_states)
