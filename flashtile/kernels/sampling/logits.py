"""Kernels on logits: ``softmax`` (with temperature) and ``sampling_from_logits``, both on segmented
passes (passes.py): one streaming pass keeps a per-slot online (max, sum of exp), combined per segment
after the loop; softmax then writes ``exp(x / T - max) / sum`` in a second pipelined pass, and the
sampler draws from the segment masses (``seg_draw`` with ``exp(x - max)`` computed on the fly), so a
draw needs neither a softmax in memory nor a second full pass."""

from __future__ import annotations

import triton
import triton.language as tl

from ..._core.launch import direct_launch
from .common import (
    DRAW_STRIDE,
    PER_CALL_INTS,
    input_row,
    interpreted,
    inverse_temperature,
    load_seed,
    param_args,
    seed_args,
    uniforms,
)
from .config import seg_config
from .passes import seg_draw, seg_max_sum


@triton.jit
def _store_softmax(row, out_row, idx, vocab, inv_temp, shift, scale):
    """``out_row[idx] = exp(row[idx] * inv_temp - shift) * scale`` (0 for NaN), for idx < vocab."""
    x = tl.load(row + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32) * inv_temp
    e = tl.where(x == x, tl.exp(x - shift), 0.0) * scale
    tl.store(out_row + idx, e, mask=idx < vocab)


@direct_launch
@triton.jit
def _seg_softmax_kernel(
    LOGITS, OUT, TEMP, vocab, stride_in, stride_out, seg_len, temp_val,
    TEMP_PER_ROW: tl.constexpr, NSEG: tl.constexpr, W: tl.constexpr, STAGES: tl.constexpr,
):
    """float32 softmax(x / T) per row on segmented passes (``seg_max_sum``, then a pipelined write
    pass); a row of only -inf/NaN gives zeros."""
    i = tl.program_id(0).to(tl.int64)
    row = LOGITS + i * stride_in
    inv_temp = inverse_temperature(TEMP, i, temp_val, TEMP_PER_ROW)
    shift, seg_mass = seg_max_sum(row, vocab, seg_len, inv_temp, NSEG, W, STAGES)
    total = tl.sum(seg_mass, axis=0)
    scale = tl.where(total > 0.0, 1.0 / total, 0.0)
    seg = tl.arange(0, NSEG)
    col = tl.arange(0, W)
    base = seg[:, None] * seg_len + col[None, :]
    for j in tl.range(0, seg_len, W, num_stages=STAGES):
        _store_softmax(row, OUT + i * stride_out, base + j, vocab, inv_temp, shift, scale)


@direct_launch
@triton.jit(do_not_specialize=PER_CALL_INTS)
def _seg_logits_sampling_kernel(
    LOGITS, ROWS, OUT, VALID, SEED, OFFSET,
    vocab, stride_row, seg_len, sub_len, seed_val, offset_val,
    HAS_ROWS: tl.constexpr, SEED_IN_TENSOR: tl.constexpr, SEED_PER_ROW: tl.constexpr, DRAW_STRIDE: tl.constexpr,
    NQ: tl.constexpr, NSEG: tl.constexpr, W: tl.constexpr, NSUB: tl.constexpr, CW: tl.constexpr, C3: tl.constexpr,
    STAGES: tl.constexpr,
):
    """``sampling_from_logits`` on segmented passes: one streaming pass keeps a per-slot online
    (max, sum of exp) (no reduction in the loop); per segment they combine into the segment's mass
    ``sum_s * exp(max_s - max)``, and the draw (``seg_draw`` with ``exp(x - max)`` on the fly) reads
    1/NSEG of the row more. NaN logits count as -inf; a row without a finite logit is invalid.
    Randomness: the first of the NQ words at counter ``offset_i`` (as the probability sampler)."""
    i = tl.program_id(0)
    row = input_row(LOGITS, ROWS, i, stride_row, HAS_ROWS)
    seed, counter = load_seed(i, SEED, OFFSET, seed_val, offset_val, DRAW_STRIDE, SEED_IN_TENSOR, SEED_PER_ROW)
    shift, seg_mass = seg_max_sum(row, vocab, seg_len, 1.0, NSEG, W, STAGES)
    total = tl.sum(seg_mass, axis=0)
    u = uniforms(seed, counter, NQ)
    cid = seg_draw(row, vocab, 0.0, seg_mass, u * total, seg_len, sub_len, shift, NQ, NSEG, NSUB, CW, C3, STAGES,
                   True)
    q = tl.arange(0, NQ)
    cand = tl.sum(tl.where(q == 0, cid, 0), axis=0)
    valid = (total > 0.0) & (cand >= 0)
    tl.store(OUT + i, tl.where(valid, cand, 0).to(OUT.dtype.element_ty))
    tl.store(VALID + i, valid.to(VALID.dtype.element_ty))


def sampling_from_logits(logits, rows, out, valid, seed, offset):
    """One token per output row drawn from ``softmax(logits[rows[i]])`` into ``out`` and ``valid``."""
    batch = out.shape[0]
    if batch == 0:
        return
    vocab = logits.shape[-1]
    s_t, o_t, s_val, o_val, s_in, s_row = seed_args(seed, offset)
    cfg = seg_config(vocab, interpreted(logits), filtered=False, count=False)
    _seg_logits_sampling_kernel[(batch,)](
        logits, rows if rows is not None else out, out, valid,
        s_t if s_t is not None else out, o_t if o_t is not None else out,
        vocab, logits.stride(0), cfg["seg_len"], cfg["sub_len"], s_val, o_val,
        HAS_ROWS=rows is not None, SEED_IN_TENSOR=s_in, SEED_PER_ROW=s_row, DRAW_STRIDE=DRAW_STRIDE,
        NQ=cfg["NQ"], NSEG=cfg["NSEG"], W=cfg["W"], NSUB=cfg["NSUB"], CW=cfg["CW"], C3=cfg["C3"],
        STAGES=cfg["STAGES"], num_warps=cfg["num_warps"],
    )


def softmax(logits, out, temperature):
    """float32 ``softmax(logits / temperature)`` per row into ``out``; ``temperature`` None, a scalar or a
    ``[batch]`` tensor."""
    batch, vocab = logits.shape
    if batch == 0:
        return
    t, t_val, t_row = param_args(temperature, 1.0)
    cfg = seg_config(vocab, interpreted(logits), filtered=False, count=False)
    _seg_softmax_kernel[(batch,)](
        logits, out, t if t is not None else out, vocab, logits.stride(0), out.stride(0), cfg["seg_len"],
        float(t_val), TEMP_PER_ROW=t_row, NSEG=cfg["NSEG"], W=cfg["W"], STAGES=cfg["STAGES"],
        num_warps=cfg["num_warps"],
    )
