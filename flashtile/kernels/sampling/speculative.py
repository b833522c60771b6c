"""chain_speculative_sampling: one program per request judges the draft tokens in order, then draws
the final token from the residual distribution at the first rejection or from the bonus target row.
Draws of request ``b`` use ``n + 1`` Philox counters from ``offset + b * (n + 1)`` (one (seed, offset)
for the batch) or from its own offset."""

from __future__ import annotations

import triton
import triton.language as tl

from ..._core.launch import direct_launch
from .common import PER_CALL_INTS, interpreted, load_seed, seed_args, stream_config, uniform


@direct_launch
@triton.jit(do_not_specialize=PER_CALL_INTS)
def _chain_speculative_kernel(
    DRAFT, DRAFT_IDS, TARGET, OUT, ACCEPTED, EMITTED, SEED, OFFSET,
    n, vocab, stride_db, stride_dn, stride_ib, stride_tb, stride_tn, stride_ob,
    seed_val, offset_val,
    SEED_IN_TENSOR: tl.constexpr, SEED_PER_ROW: tl.constexpr, BLOCK: tl.constexpr,
):
    """One request per program. Draw j < n judges draft token j (accept iff ``u * p_draft <
    p_target``), draw n samples the final token from ``max(p_target - p_draft, 0)`` at the first
    rejection (the target row itself if that has no mass) or from the bonus target row."""
    b = tl.program_id(0).to(tl.int64)
    seed, counter = load_seed(b, SEED, OFFSET, seed_val, offset_val, n + 1, SEED_IN_TENSOR, SEED_PER_ROW)
    accepted = tl.zeros([], dtype=tl.int32)
    emitted = tl.zeros([], dtype=tl.int32)
    prefix = accepted == 0  # True while every draft so far was accepted
    for j in range(0, n):
        d = tl.load(DRAFT_IDS + b * stride_ib + j).to(tl.int64)
        d_ok = (d >= 0) & (d < vocab)
        d = tl.where(d_ok, d, 0)
        pd = tl.load(DRAFT + b * stride_db + j * stride_dn + d).to(tl.float32)
        pt = tl.load(TARGET + b * stride_tb + j * stride_tn + d).to(tl.float32)
        u = uniform(seed, counter + j)
        ok = d_ok & (u * pd < pt)
        accepted += ok.to(tl.int32)
        prefix = prefix & ok
        emitted += prefix.to(tl.int32)
    # Final token: residual at the first rejection, or the bonus row.
    pos = emitted.to(tl.int64)
    d_lim = tl.where(emitted < n, vocab, 0)  # draft row is read (subtracted) only below this
    d_row = DRAFT + b * stride_db + tl.minimum(pos, tl.maximum(n - 1, 0)) * stride_dn
    t_row = TARGET + b * stride_tb + pos * stride_tn
    offs = tl.arange(0, BLOCK)
    resid_mass = tl.zeros([], dtype=tl.float32)
    for start in range(0, vocab, BLOCK):
        idx = start + offs
        pt = tl.load(t_row + idx, mask=idx < vocab, other=0.0).to(tl.float32)
        pd = tl.load(d_row + idx, mask=idx < d_lim, other=0.0).to(tl.float32)
        resid_mass += tl.sum(tl.where(pt - pd > 0, pt - pd, 0.0), axis=0)
    d_lim = tl.where(resid_mass > 0.0, d_lim, 0)
    u = uniform(seed, counter + n)
    agg = tl.zeros([], dtype=tl.float32)
    tok = tl.full([], -1, dtype=tl.int32)
    last = tl.full([], -1, dtype=tl.int32)
    tot = tl.zeros([], dtype=tl.float32)
    for start in range(0, vocab, BLOCK):  # total mass of the chosen distribution
        idx = start + offs
        pt = tl.load(t_row + idx, mask=idx < vocab, other=0.0).to(tl.float32)
        pd = tl.load(d_row + idx, mask=idx < d_lim, other=0.0).to(tl.float32)
        w = pt - pd
        w = tl.where(w > 0, w, 0.0)
        tot += tl.sum(w, axis=0)
    target = u * tot
    for start in range(0, vocab, BLOCK):
        idx = start + offs
        pt = tl.load(t_row + idx, mask=idx < vocab, other=0.0).to(tl.float32)
        pd = tl.load(d_row + idx, mask=idx < d_lim, other=0.0).to(tl.float32)
        w = pt - pd
        ok = w > 0
        w = tl.where(ok, w, 0.0)
        cs = tl.cumsum(w, axis=0) + agg
        first = tl.min(tl.where(ok & (cs > target), idx, 2147483647), axis=0)
        tok = tl.where((tok < 0) & (first < 2147483647), first, tok)
        last = tl.maximum(last, tl.max(tl.where(ok, idx, -1), axis=0))
        agg += tl.sum(w, axis=0)
    tok = tl.where(tok >= 0, tok, tl.maximum(last, 0))
    for j in range(0, n + 1):
        jt = tl.full([], j, dtype=tl.int32)
        d = tl.load(DRAFT_IDS + b * stride_ib + tl.minimum(jt, tl.maximum(n - 1, 0)), mask=jt < n, other=0).to(tl.int32)
        val = tl.where(jt < emitted, d, tl.where(jt == emitted, tok, -1))
        tl.store(OUT + b * stride_ob + j, val.to(OUT.dtype.element_ty))
    tl.store(ACCEPTED + b, accepted.to(ACCEPTED.dtype.element_ty))
    tl.store(EMITTED + b, emitted.to(EMITTED.dtype.element_ty))


def chain_speculative_sampling(draft_probs, draft_token_ids, target_probs, out, accepted, emitted, seed, offset):
    """Speculative decoding's accept/reject of ``draft_token_ids`` ``[batch, n]`` into ``out`` ``[batch, n + 1]``
    (emitted tokens, then -1), ``accepted`` and ``emitted`` ``[batch]``."""
    batch, n, vocab = draft_probs.shape
    if batch == 0:
        return
    block, warps = stream_config(vocab, interpreted(target_probs))
    s_t, o_t, s_val, o_val, s_in, s_row = seed_args(seed, offset)
    _chain_speculative_kernel[(batch,)](
        draft_probs, draft_token_ids, target_probs, out, accepted, emitted,
        s_t if s_t is not None else out, o_t if o_t is not None else out,
        n, vocab, draft_probs.stride(0), draft_probs.stride(1), draft_token_ids.stride(0),
        target_probs.stride(0), target_probs.stride(1), out.stride(0), s_val, o_val,
        SEED_IN_TENSOR=s_in, SEED_PER_ROW=s_row, BLOCK=block, num_warps=warps,
    )
