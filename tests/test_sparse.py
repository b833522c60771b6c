"""flashtile.sparse: BlockSparseAttentionWrapper and VariableBlockSparseAttentionWrapper against dense
float64 attention with the expanded mask (tests/oracles.py), on the reference path and the kernels
(Triton's interpreter on CPU at tiny shapes, the GPU at larger ones); errors; deprecated aliases."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import flashtile
from attention_cases import workspace
from conftest import HAS_CUDA
from flashtile.quantization import packbits
from flashtile.sparse import BlockSparseAttentionWrapper, VariableBlockSparseAttentionWrapper
from flashtile.variants import AttentionVariant
from oracles import (
    LSE_TOLERANCES,
    TOLERANCES,
    bsr_dense_mask,
    masked_attention_oracle,
    sink_attention_oracle,
    variable_dense_mask,
)


def random_bsr(M, N, R, C, density, *, empty_row=True, full_row=True, shuffle=True, gen=None):
    """A random BSR pattern (int32 CPU indptr, indices) with, where there are two block rows or more, one
    empty block row and one full one; column ids in random order within a row when ``shuffle``."""
    MB, NB = -(-M // R), N // C
    keep = torch.rand(MB, NB, generator=gen) < density
    if MB >= 2 and empty_row:
        keep[0] = False
    if MB >= 2 and full_row:
        keep[-1] = True
    cols = []
    for b in range(MB):
        row = keep[b].nonzero()[:, 0]
        if shuffle:
            row = row[torch.randperm(row.numel(), generator=gen)]
        cols.append(row)
    indptr = torch.tensor([0] + torch.tensor([c.numel() for c in cols]).cumsum(0).tolist(), dtype=torch.int32)
    indices = torch.cat(cols).to(torch.int32) if cols else torch.zeros(0, dtype=torch.int32)
    return indptr, indices


def check(out, lse, ref_o, ref_lse, dtype, loose=1.0):
    assert not out.isnan().any(), "output has NaN (unwritten or bad math)"
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double().cpu(), ref_o, atol=atol * loose, rtol=rtol * loose)
    if lse is not None:
        lse = lse.double().cpu()
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows that see nothing give lse -inf exactly"
        latol, lrtol = LSE_TOLERANCES[dtype]
        finite = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse[finite], ref_lse[finite], atol=latol * loose, rtol=lrtol * loose)
        empty = torch.isinf(ref_lse)
        assert (out.double().cpu()[empty] == 0).all(), "rows that see nothing give 0"


def run_bsr(device, q, k, v, indptr, indices, M, N, R, C, *, return_lse=True, **plan_kwargs):
    w = BlockSparseAttentionWrapper(workspace(device))
    w.plan(indptr.to(device), indices.to(device), M, N, R, C, q.shape[1], k.shape[1], q.shape[2],
           q_data_type=q.dtype, **plan_kwargs)
    return w, w.run(q, k, v, return_lse=return_lse)


# (M, N, R, C, Hq, Hk, D, density, options): tiny shapes, non-powers of two, every R/C of the issue.
CASES = [
    (37, 48, 16, 16, 2, 1, 64, 0.5, {}),
    (13, 24, 2, 4, 4, 2, 64, 0.4, {}),
    (9, 11, 1, 1, 2, 2, 64, 0.3, {}),  # vector sparsity, one query per block row
    (20, 21, 2, 1, 3, 1, 40, 0.5, {"mask": True}),  # element mask, odd head_dim, GQA 3
    (33, 32, 16, 4, 2, 2, 64, 0.5, {"causal": True}),  # causal through a mask (general pattern)
    (32, 32, 4, 4, 4, 1, 64, 1.0, {"causal": True}),  # causal: the kernel's flag (blocks end on the diagonal)
    (17, 16, 1, 4, 2, 1, 64, 0.6, {"logits_soft_cap": 5.0, "sm_scale": 0.2}),
    (12, 16, 4, 1, 2, 1, 64, 0.5, {"pos_encoding_mode": "ROPE_LLAMA", "rope_theta": 500.0}),
    (14, 32, 4, 1, 2, 1, 64, 1.0, {}),  # full rows of vector sparsity: runs merged into pages of 32 keys
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}N{c[1]}R{c[2]}C{c[3]}h{c[4]}/{c[5]}d{c[6]}"
                         + "".join(f"-{k}" for k in c[8]))
def test_block_sparse_matches_oracle(path, device, case):
    M, N, R, C, Hq, Hk, D, density, options = case
    dtype = torch.float16
    indptr, indices = random_bsr(M, N, R, C, density)
    q = torch.randn(M, Hq, D, dtype=dtype, device=device)
    k = torch.randn(N, Hk, D, dtype=dtype, device=device)
    v = torch.randn(N, Hk, D, dtype=dtype, device=device)
    options = dict(options)
    mask = None
    if options.pop("mask", False):
        mask = torch.rand(indices.numel(), R, C) < 0.6
        options["mask"] = mask.to(device)
    causal = options.get("causal", False)
    _, (out, lse) = run_bsr(device, q, k, v, indptr, indices, M, N, R, C, **options)
    dense = bsr_dense_mask(indptr, indices, M, N, R, C, mask=mask, causal=causal)
    rope = (1.0, options["rope_theta"]) if options.get("pos_encoding_mode") == "ROPE_LLAMA" else None
    ref_o, ref_lse = masked_attention_oracle(q, k, v, dense, sm_scale=options.get("sm_scale"),
                                             logits_soft_cap=options.get("logits_soft_cap", 0.0), rope=rope)
    # RoPE rotates q and k in the input dtype before the kernel (one more rounding than the oracle's).
    check(out, lse, ref_o, ref_lse, dtype, loose=4.0 if rope else 1.0)


def test_causal_kernel_flag_and_mask_agree(device, path):
    """A causal block pattern whose rows end on their diagonal block uses the kernel's causal flag (blocks
    above the diagonal are dropped); without one diagonal block it needs a mask; both match the oracle."""
    M = N = 24
    R = C = 8
    lower = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    q, k, v = (torch.randn(24, 2, 64, dtype=torch.bfloat16, device=device) for _ in range(3))
    gap = lower.clone()
    gap[1, 1] = False
    for pattern, uses_flag in ((lower | torch.eye(3, dtype=torch.bool).roll(1, 1), True), (gap, False)):
        indptr = torch.tensor([0] + pattern.sum(1).cumsum(0).tolist(), dtype=torch.int32)
        indices = pattern.nonzero()[:, 1].to(torch.int32)
        w, (out, lse) = run_bsr(device, q, k, v, indptr, indices, M, N, R, C, causal=True)
        plan = w._prefill._plan
        assert plan.params.causal == uses_flag and (plan.packed_mask is None) == uses_flag
        ref_o, ref_lse = masked_attention_oracle(q, k, v, bsr_dense_mask(indptr, indices, M, N, R, C, causal=True))
        check(out, lse, ref_o, ref_lse, torch.bfloat16)


def test_dense_runs_become_larger_pages(device):
    """Vector sparsity whose rows keep aligned runs of tokens reads them as pages of several keys."""
    M, N = 8, 64
    indptr = torch.tensor([0, 16, 48], dtype=torch.int32)
    indices = torch.cat([torch.arange(16, 32), torch.arange(0, 32).flip(0)]).to(torch.int32)
    q, k, v = (torch.randn(n, 2, 64, dtype=torch.float16, device=device) for n in (M, N, N))
    w, (out, lse) = run_bsr(device, q, k, v, indptr, indices, M, N, 4, 1)
    assert w._page_size == 16
    ref_o, ref_lse = masked_attention_oracle(q, k, v, bsr_dense_mask(indptr, indices, M, N, 4, 1))
    check(out, lse, ref_o, ref_lse, torch.float16)


def test_packed_mask_equals_mask(device):
    M, N, R, C = 10, 12, 4, 3
    indptr, indices = random_bsr(M, N, R, C, 0.7)
    mask = torch.rand(indices.numel(), R, C) < 0.5
    q, k, v = (torch.randn(n, 2, 64, dtype=torch.float16, device=device) for n in (M, N, N))
    _, (o1, l1) = run_bsr(device, q, k, v, indptr, indices, M, N, R, C, mask=mask.to(device))
    rows = [min(R, M - b * R) for b in range(len(indptr) - 1)]
    segments = [mask[indptr[b]:indptr[b + 1], :rows[b]].transpose(0, 1).reshape(-1) for b in range(len(rows))]
    packed = torch.cat([packbits(s, bitorder="little") for s in segments])
    _, (o2, l2) = run_bsr(device, q, k, v, indptr, indices, M, N, R, C, packed_mask=packed)
    torch.testing.assert_close(o1, o2, atol=0, rtol=0)
    torch.testing.assert_close(l1, l2, atol=0, rtol=0)


def test_outputs_in_place_dtypes_and_aliases(device):
    M, N, R, C, Hq, Hk, D = 12, 16, 4, 4, 4, 2, 64
    indptr, indices = random_bsr(M, N, R, C, 0.5)
    q, k, v = (torch.randn(n, h, D, dtype=torch.bfloat16, device=device) for n, h in ((M, Hq), (N, Hk), (N, Hk)))
    ref_o, ref_lse = masked_attention_oracle(q, k, v, bsr_dense_mask(indptr, indices, M, N, R, C))
    w = BlockSparseAttentionWrapper(workspace(device))
    w.begin_forward(indptr, indices, M, N, R, C, Hq, Hk, D, q_data_type=torch.bfloat16, o_data_type=torch.float32)
    assert (w.M, w.N, w.R, w.C) == (M, N, R, C)
    out = torch.full((M, Hq, D), float("nan"), dtype=torch.float32, device=device)
    lse = torch.full((M, Hq), float("nan"), dtype=torch.float32, device=device)
    o, s = w.run(q, k, v, out=out, lse=lse, return_lse=True)
    assert o is out and s is lse
    check(out, lse, ref_o, ref_lse, torch.bfloat16)
    o2, s2 = w.run_return_lse(q, k, v)
    torch.testing.assert_close(o2, out, atol=0, rtol=0)
    # forward(): its parameters replace the planned ones (a soft cap here).
    o3 = w.forward(q, k, v, logits_soft_cap=3.0)
    ref3, _ = masked_attention_oracle(q, k, v, bsr_dense_mask(indptr, indices, M, N, R, C), logits_soft_cap=3.0)
    check(o3, None, ref3, None, torch.bfloat16)
    assert w._logits_soft_cap == 3.0
    w.end_forward()
    # o_data_type defaults to q's dtype.
    w.plan(indptr, indices, M, N, R, C, Hq, Hk, D, q_data_type="bfloat16")
    assert w.run(q, k, v).dtype == torch.bfloat16


def test_sinks_through_block_sparse(device):
    """Every block listed, no mask: the sink variant's result is dense attention with sinks."""
    M, N, R, C, H, D = 8, 8, 4, 4, 2, 64
    indptr = torch.tensor([0, 2, 4], dtype=torch.int32)
    indices = torch.tensor([0, 1, 1, 0], dtype=torch.int32)
    q, k, v = (torch.randn(n, H, D, dtype=torch.float16, device=device) for n in (M, N, N))
    sinks = torch.randn(H, device=device)
    w = BlockSparseAttentionWrapper(workspace(device))
    w.plan(indptr, indices, M, N, R, C, H, H, D)
    out, lse = w.run(q, k, v, return_lse=True, sinks=sinks)
    ref_o, ref_lse = sink_attention_oracle(q, k, v, sinks.cpu())
    check(out, lse, ref_o, ref_lse, torch.float16)


@triton.jit
def _softcap_logits(qk, sm_scale, batch, qo_idx, kv_idx, qo_head, kv_head, qo_len, kv_len, args):
    x = qk * sm_scale / args[0]
    return args[0] * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))  # cap * tanh(x)


def _softcap_logits_torch(qk, sm_scale, batch, qo_idx, kv_idx, qo_head, kv_head, qo_len, kv_len, args):
    return args[0] * torch.tanh(qk * sm_scale / args[0])


SOFTCAP = AttentionVariant("softcap", logits_transform=(_softcap_logits, _softcap_logits_torch),
                           scalars=[("cap", torch.float32)])


def test_jit_args_variant(device, path):
    """A wrapper built with jit_args runs that variant; its extra arguments come through variant_args."""
    M, N, R, C = 11, 12, 4, 3
    indptr, indices = random_bsr(M, N, R, C, 0.6)
    q, k, v = (torch.randn(n, h, 64, dtype=torch.float16, device=device) for n, h in ((M, 4), (N, 2), (N, 2)))
    w = BlockSparseAttentionWrapper(workspace(device), jit_args=SOFTCAP)
    w.plan(indptr, indices, M, N, R, C, 4, 2, 64)
    out, lse = w.run(q, k, v, return_lse=True, variant_args=(2.5,))
    ref_o, ref_lse = masked_attention_oracle(q, k, v, bsr_dense_mask(indptr, indices, M, N, R, C), logits_soft_cap=2.5)
    check(out, lse, ref_o, ref_lse, torch.float16)


def test_empty_pattern_gives_zeros(device):
    M, N = 6, 8
    q, k, v = (torch.randn(n, 1, 64, dtype=torch.float16, device=device) for n in (M, N, N))
    indptr = torch.zeros(4, dtype=torch.int32)
    _, (out, lse) = run_bsr(device, q, k, v, indptr, torch.zeros(0, dtype=torch.int32), M, N, 2, 4)
    assert (out == 0).all() and torch.isinf(lse).all() and (lse < 0).all()


# ---------------------------------------------------------------------------------------------
# Errors: typed, naming the argument
# ---------------------------------------------------------------------------------------------


def test_block_sparse_errors(device):
    w = BlockSparseAttentionWrapper(workspace(device))
    q, k, v = (torch.randn(n, 2, 64, dtype=torch.float16, device=device) for n in (8, 8, 8))
    with pytest.raises(RuntimeError, match="plan"):
        w.run(q, k, v)
    ip = torch.tensor([0, 1, 2], dtype=torch.int32)
    ix = torch.tensor([0, 1], dtype=torch.int32)
    args = (8, 8, 4, 4, 2, 2, 64)
    bad = [
        (ValueError, "indptr", dict(indptr=torch.tensor([0, 2, 1], dtype=torch.int32))),  # not monotone
        (ValueError, "indptr", dict(indptr=torch.tensor([0, 1], dtype=torch.int32))),  # wrong length
        (ValueError, "indptr", dict(indptr=torch.tensor([0, 1, 5], dtype=torch.int32))),  # past indices
        (TypeError, "indptr", dict(indptr=ip.float())),
        (ValueError, "indices", dict(indices=torch.tensor([0, 2], dtype=torch.int32))),  # out of range
        (ValueError, "indices", dict(indices=torch.tensor([0, -1], dtype=torch.int32))),
        (TypeError, "indices", dict(indices=[0, 1])),
        (ValueError, "indices", dict(indptr=torch.tensor([0, 2, 2], dtype=torch.int32),
                                     indices=torch.tensor([1, 1], dtype=torch.int32))),  # repeated block
        (ValueError, "N", dict(N=10)),  # not a multiple of C
        (ValueError, "R", dict(R=0)),
        (ValueError, "mask", dict(mask=torch.ones(2, 4, 3, dtype=torch.bool))),
        (TypeError, "mask", dict(mask=torch.ones(2, 4, 4, dtype=torch.uint8))),
        (ValueError, "packed_mask", dict(packed_mask=torch.zeros(3, dtype=torch.uint8))),
        (TypeError, "packed_mask", dict(packed_mask=torch.zeros(4, dtype=torch.int32))),
        (ValueError, "pos_encoding_mode", dict(pos_encoding_mode="ROPE")),
        (NotImplementedError, "ALIBI", dict(pos_encoding_mode="ALIBI")),
        (NotImplementedError, "block_mask", dict(block_mask=torch.ones(2, 2, 2, dtype=torch.bool))),
        (ValueError, "num_qo_heads", dict(num_qo_heads=3)),
        (NotImplementedError, "head_dim", dict(head_dim=60)),
        (TypeError, "q_data_type", dict(q_data_type=torch.float32)),
    ]
    names = ("M", "N", "R", "C", "num_qo_heads", "num_kv_heads", "head_dim")
    for err, name, change in bad:
        kw = dict(indptr=ip, indices=ix, **dict(zip(names, args)))
        kw.update(change)
        with pytest.raises(err, match=name):
            w.plan(**kw)
    w.plan(ip, ix, *args)
    for err, name, call in [
        (ValueError, "q", lambda: w.run(q[:7], k, v)),
        (ValueError, "q", lambda: w.run(q.bfloat16(), k, v)),
        (ValueError, "k", lambda: w.run(q, k[:4], v)),
        (ValueError, "v", lambda: w.run(q, k, v[:, :1])),
        (ValueError, "k", lambda: w.run(q, k.bfloat16(), v)),
        (TypeError, "k", lambda: w.run(q, None, v)),
        (NotImplementedError, "scale_k", lambda: w.run(q, k, v, scale_k=torch.ones(2))),
        (ValueError, "out", lambda: w.run(q, k, v, out=torch.empty(8, 2, 32, dtype=torch.float16, device=device))),
        (ValueError, "lse", lambda: w.run(q, k, v, lse=torch.empty(8, 2, dtype=torch.float16, device=device))),
    ]:
        with pytest.raises(err, match=name):
            call()


# ---------------------------------------------------------------------------------------------
# VariableBlockSparseAttentionWrapper
# ---------------------------------------------------------------------------------------------


def random_sizes(total, blocks, heads, *, allow_zero=False):
    """``[heads, blocks]`` int32 sizes summing to ``total`` per head (a random partition)."""
    out = []
    for _ in range(heads):
        cuts = torch.randint(0, total + 1, (blocks - 1,)) if allow_zero else \
            torch.randperm(total - 1)[: blocks - 1] + 1
        edges = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([total])])
        out.append(edges.diff())
    return torch.stack(out).to(torch.int32)


def variable_oracle(q, k, v, dense, **kwargs):
    """Per KV head: its query heads attend under the head's dense mask. q [Hq, L, D] (HND)."""
    Hq, L, D = q.shape
    Hk = k.shape[0]
    g = Hq // Hk
    outs, lses = [], []
    for h in range(Hk):
        o, s = masked_attention_oracle(q[h * g:(h + 1) * g].transpose(0, 1), k[h:h + 1].transpose(0, 1),
                                       v[h:h + 1].transpose(0, 1), dense[h], **kwargs)
        outs.append(o.transpose(0, 1))
        lses.append(s.transpose(0, 1))
    return torch.cat(outs), torch.cat(lses)


VARIABLE_CASES = [
    # (qo_len, kv_len, MB, NB, Hq, Hk, D, density, options)
    (23, 30, 3, 4, 2, 2, 64, 0.5, {}),
    (19, 25, 4, 5, 4, 2, 64, 0.6, {"causal": True}),
    (16, 16, 2, 3, 3, 1, 64, 0.7, {"logits_soft_cap": 4.0, "zero": True}),
    (12, 14, 3, 2, 2, 1, 64, 0.8, {"pos_encoding_mode": "ROPE_LLAMA"}),
]


@pytest.mark.parametrize("case", VARIABLE_CASES, ids=lambda c: f"L{c[0]}x{c[1]}blocks{c[2]}x{c[3]}h{c[4]}/{c[5]}"
                         + "".join(f"-{k}" for k in c[8]))
def test_variable_block_sparse_matches_oracle(path, device, case):
    qo_len, kv_len, MB, NB, Hq, Hk, D, density, options = case
    options = dict(options)
    zero = options.pop("zero", False)
    rows = random_sizes(qo_len, MB, Hk, allow_zero=zero)
    cols = random_sizes(kv_len, NB, Hk, allow_zero=zero)
    block_mask = torch.rand(Hk, MB, NB) < density
    block_mask[0, 0] = False  # an empty block row
    q = torch.randn(Hq, qo_len, D, dtype=torch.float16, device=device)
    k = torch.randn(Hk, kv_len, D, dtype=torch.float16, device=device)
    v = torch.randn(Hk, kv_len, D, dtype=torch.float16, device=device)
    w = VariableBlockSparseAttentionWrapper(workspace(device))
    w.plan(block_mask.to(device), rows.to(device), cols.to(device), Hq, Hk, D, **options)
    out, lse = w.run(q, k, v, return_lse=True)
    assert out.shape == (Hq, qo_len, D) and lse.shape == (Hq, qo_len)
    dense = variable_dense_mask(block_mask, rows, cols, causal=options.get("causal", False))
    rope = (1.0, 1e4) if options.get("pos_encoding_mode") == "ROPE_LLAMA" else None
    ref_o, ref_lse = variable_oracle(q, k, v, dense, logits_soft_cap=options.get("logits_soft_cap", 0.0), rope=rope)
    check(out, lse, ref_o, ref_lse, torch.float16, loose=4.0 if rope else 1.0)


def test_variable_outputs_in_place_and_forward(device):
    Hq, Hk, L, D = 4, 2, 10, 64
    rows, cols = random_sizes(L, 2, Hk), random_sizes(L, 3, Hk)
    block_mask = torch.rand(Hk, 2, 3) < 0.7
    q, k, v = torch.randn(Hq, L, D, dtype=torch.bfloat16, device=device), *(
        torch.randn(Hk, L, D, dtype=torch.bfloat16, device=device) for _ in range(2))
    w = VariableBlockSparseAttentionWrapper(workspace(device))
    w.begin_forward(block_mask, rows, cols, Hq, Hk, D, q_data_type=torch.bfloat16)
    out = torch.full((Hq, L, D), float("nan"), dtype=torch.bfloat16, device=device)
    lse = torch.full((Hq, L), float("nan"), dtype=torch.float32, device=device)
    o, s = w.run(q, k, v, out=out, lse=lse, return_lse=True)
    assert o is out and s is lse
    ref_o, ref_lse = variable_oracle(q, k, v, variable_dense_mask(block_mask, rows, cols))
    check(out, lse, ref_o, ref_lse, torch.bfloat16)
    o2 = w.forward(q, k, v, sm_scale=0.3)
    ref2, _ = variable_oracle(q, k, v, variable_dense_mask(block_mask, rows, cols), sm_scale=0.3)
    check(o2, None, ref2, None, torch.bfloat16)


def test_variable_errors(device):
    w = VariableBlockSparseAttentionWrapper(workspace(device))
    q = torch.randn(2, 8, 64, dtype=torch.float16, device=device)
    k = torch.randn(1, 8, 64, dtype=torch.float16, device=device)
    with pytest.raises(RuntimeError, match="plan"):
        w.run(q, k, k)
    bm = torch.ones(1, 2, 2, dtype=torch.bool)
    rs = torch.tensor([[4, 4]], dtype=torch.int32)
    cs = torch.tensor([[3, 5]], dtype=torch.int32)
    names = ("block_mask_map", "block_row_sz", "block_col_sz", "num_qo_heads", "num_kv_heads", "head_dim")
    bad = [
        (TypeError, "block_mask_map", dict(block_mask_map=bm.int())),
        (ValueError, "block_mask_map", dict(num_kv_heads=2, num_qo_heads=2)),
        (ValueError, "block_row_sz", dict(block_row_sz=torch.tensor([[4, 4, 0]], dtype=torch.int32))),
        (TypeError, "block_col_sz", dict(block_col_sz=cs.float())),
        (ValueError, "block_col_sz", dict(block_col_sz=torch.tensor([[9, -1]], dtype=torch.int32))),
        (ValueError, "block_row_sz", dict(block_mask_map=torch.ones(2, 2, 2, dtype=torch.bool), num_kv_heads=2,
                                          block_row_sz=torch.tensor([[4, 4], [4, 5]], dtype=torch.int32),
                                          block_col_sz=torch.tensor([[4, 4], [4, 4]], dtype=torch.int32))),
        (ValueError, "num_qo_heads", dict(num_qo_heads=3, num_kv_heads=2)),
        (NotImplementedError, "ALIBI", dict(pos_encoding_mode="ALIBI")),
    ]
    for err, name, change in bad:
        kw = dict(zip(names, (bm, rs, cs, 2, 1, 64)))
        kw.update(change)
        with pytest.raises(err, match=name):
            w.plan(**kw)
    w.plan(bm, rs, cs, 2, 1, 64)
    for err, name, call in [
        (ValueError, "q", lambda: w.run(q[:, :7], k, k)),
        (ValueError, "q", lambda: w.run(q.bfloat16(), k, k)),
        (ValueError, "k", lambda: w.run(q, k[:, :4], k)),
        (ValueError, "v", lambda: w.run(q, k, k[:, :, :32])),
        (ValueError, "out", lambda: w.run(q, k, k, out=torch.empty(8, 2, 64, dtype=torch.float16, device=device))),
    ]:
        with pytest.raises(err, match=name):
            call()


def test_exported():
    assert flashtile.sparse.BlockSparseAttentionWrapper is flashtile.BlockSparseAttentionWrapper
    assert flashtile.sparse.VariableBlockSparseAttentionWrapper is flashtile.VariableBlockSparseAttentionWrapper


# ---------------------------------------------------------------------------------------------
# GPU: real shapes (skipped without CUDA)
# ---------------------------------------------------------------------------------------------


GPU_CASES = [  # (R, C, dtype, options): every block shape of the issue once, each feature on some
    (1, 1, torch.bfloat16, {}), (16, 1, torch.float16, {}), (64, 64, torch.bfloat16, {}),
    (64, 64, torch.float16, {"mask": True}), (2, 16, torch.bfloat16, {"mask": True}),
    (16, 4, torch.bfloat16, {"causal": True}), (128, 128, torch.bfloat16, {"causal": True}),
    (16, 1, torch.bfloat16, {"dense": True}),  # full rows: read as pages of 128 keys
]


def _gpu_id(x):
    return "-".join(x) or "plain" if isinstance(x, dict) else str(x).replace("torch.", "")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("R,C,dtype,options", GPU_CASES, ids=_gpu_id)
def test_block_sparse_gpu(R, C, dtype, options, device):
    M, N, Hq, Hk, D = 520, 512, 8, 2, 128
    gen = torch.Generator().manual_seed(R * 1000 + C)
    indptr, indices = random_bsr(M, N, R, C, 1.0 if options.get("dense") else 0.3, gen=gen)
    q, k, v = (torch.randn(n, h, D, dtype=dtype, device=device) for n, h in ((M, Hq), (N, Hk), (N, Hk)))
    mask = torch.rand(indices.numel(), R, C, generator=gen) < 0.5 if options.get("mask") else None
    causal = bool(options.get("causal"))
    w, (out, lse) = run_bsr(device, q, k, v, indptr, indices, M, N, R, C, causal=causal,
                            mask=None if mask is None else mask.to(device))
    assert w._page_size == (128 if options.get("dense") else C)
    ref_o, ref_lse = masked_attention_oracle(q, k, v, bsr_dense_mask(indptr, indices, M, N, R, C, mask=mask,
                                                                     causal=causal))
    check(out, lse, ref_o, ref_lse, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("causal", [False, True])
def test_variable_block_sparse_gpu(causal, device):
    Hq, Hk, L, D = 8, 4, 700, 128
    rows, cols = random_sizes(L, 10, Hk), random_sizes(L, 30, Hk)
    block_mask = torch.rand(Hk, 10, 30) < 0.4
    q = torch.randn(Hq, L, D, dtype=torch.float16, device=device)
    k, v = (torch.randn(Hk, L, D, dtype=torch.float16, device=device) for _ in range(2))
    w = VariableBlockSparseAttentionWrapper(workspace(device))
    w.plan(block_mask.to(device), rows.to(device), cols.to(device), Hq, Hk, D, causal=causal)
    out, lse = w.run(q, k, v, return_lse=True)
    ref_o, ref_lse = variable_oracle(q, k, v, variable_dense_mask(block_mask, rows, cols, causal=causal))
    check(out, lse, ref_o, ref_lse, torch.float16)


def test_bench_suite_smoke(tmp_path):
    """benchmarks/bench_sparse.py runs end to end (--smoke) and its providers agree."""
    import json

    from benchmarks import harness

    harness.run_suites(["sparse"], tmp_path, smoke=True, providers=["flashtile", "dense_ragged"])
    records = [json.loads(line) for line in (tmp_path / "sparse.jsonl").read_text().splitlines()]
    assert records and all(r["status"] == "ok" for r in records), records
    assert all(r["max_abs_diff"] < 2e-2 for r in records if r["provider"] == "dense_ragged")
