"""top_k_renorm_probs, top_p_renorm_probs and top_k_mask_logits: one program per row finds the
filter set exactly (exact.py), then a write pass keeps it (probabilities divided by the kept mass, or
logits as they are) and zeroes (or sets to -inf) the rest."""

from __future__ import annotations

import triton
import triton.language as tl

from ..._core.launch import direct_launch
from .common import MAX_SEARCH_STEPS, NUM_PIVOTS, interpreted, load_params, param_args, stream_config
from .exact import filter_bound, row_stats


@direct_launch
@triton.jit
def _threshold_kernel(
    IN, OUT, TOP_K, TOP_P, vocab, stride_in, stride_out, top_k_val, top_p_val,
    TOPK_PER_ROW: tl.constexpr, TOPP_PER_ROW: tl.constexpr, USE_TOP_K: tl.constexpr, USE_TOP_P: tl.constexpr,
    IS_LOGITS: tl.constexpr, MAX_STEPS: tl.constexpr, BLOCK: tl.constexpr, NP: tl.constexpr,
):
    """top_k_renorm_probs / top_p_renorm_probs (probabilities: kept / kept mass, others 0) and
    top_k_mask_logits (IS_LOGITS: kept logits as they are, others -inf): exact search, then a write pass."""
    i = tl.program_id(0).to(tl.int64)
    row = IN + i * stride_in
    k, top_p, _ = load_params(i, TOP_K, TOP_P, TOP_P, top_k_val, top_p_val, 0.0, vocab, TOPK_PER_ROW, TOPP_PER_ROW,
                              False)
    if IS_LOGITS:
        lo = tl.full([], float("-inf"), dtype=tl.float32)
    else:
        lo = tl.zeros([], dtype=tl.float32)
    cnt0, mass0, min0, max0, row_max = row_stats(row, vocab, tl.zeros([NP], dtype=tl.float32) + lo, not IS_LOGITS,
                                                 True, BLOCK, NP)
    c0 = tl.max(cnt0, axis=0)
    m0 = tl.max(mass0, axis=0)
    a0 = tl.min(min0, axis=0)
    total = m0
    tau_lo, kept_mass = filter_bound(row, vocab, lo, c0, m0, a0, row_max, k, top_p * total, USE_TOP_K, USE_TOP_P,
                                     not IS_LOGITS, MAX_STEPS, BLOCK, NP)
    scale = tl.where(kept_mass > 0.0, 1.0 / kept_mass, 0.0)
    offs = tl.arange(0, BLOCK)
    for start in range(0, vocab, BLOCK):
        idx = start + offs
        x = tl.load(row + idx, mask=idx < vocab, other=0.0).to(tl.float32)
        keep = x > tau_lo
        if IS_LOGITS:
            y = tl.where(keep, x, float("-inf"))
        else:
            y = tl.where(keep, x * scale, 0.0)
        tl.store(OUT + i * stride_out + idx, y.to(OUT.dtype.element_ty), mask=idx < vocab)


def threshold_filter(x, out, *, top_k=None, top_p=None, is_logits=False):
    """``x`` with every entry outside its row's top-k (``top_k``) or top-p (``top_p``) set zeroed and the
    rest renormalized, or (``is_logits``) set to -inf, into ``out``."""
    batch, vocab = x.shape
    if batch == 0:
        return
    block, warps = stream_config(vocab, interpreted(x), "stats")
    tk, tk_val, tk_row = param_args(top_k, 0)
    tp, tp_val, tp_row = param_args(top_p, 1.0)
    _threshold_kernel[(batch,)](
        x, out, tk if tk is not None else out, tp if tp is not None else out,
        vocab, x.stride(0), out.stride(0), int(tk_val), float(tp_val),
        TOPK_PER_ROW=tk_row, TOPP_PER_ROW=tp_row, USE_TOP_K=top_k is not None, USE_TOP_P=top_p is not None,
        IS_LOGITS=is_logits, MAX_STEPS=MAX_SEARCH_STEPS, BLOCK=block, NP=NUM_PIVOTS, num_warps=warps,
    )
