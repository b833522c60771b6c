"""Block-sparse and vector-sparse attention (issue 29): suite ``sparse``.

Cases (bf16, 32 query / 8 KV heads, head_dim 128, 8192 x 8192, random patterns, seeded):
- ``block 64x64 d10%`` / ``d50%``: a BSR mask of 64 x 64 blocks; flashtile's and FlashInfer's
  BlockSparseAttentionWrapper, and FlexAttention with the same block mask (BLOCK_SIZE 64).
- ``vector R64 C1 d10%`` / ``d50%`` / ``d100%``: vector sparsity (each block row of 64 queries keeps its
  own random tokens); the sparse wrappers against dense attention over the same kept tokens stored
  contiguously (flashtile's ragged batch prefill: block row = request; the throughput to reach).

FLOPs = 4 x query heads x head_dim x the (query, key) pairs the mask keeps; every provider computes the
same thing and returns ``[M, Hq, D]`` (compared across providers by the harness).
"""

from __future__ import annotations

import functools
import warnings

import torch

from .harness import Case, Provider, Suite, Unavailable, device, import_flashinfer, register


def _case(kind: str, M: int, N: int, R: int, C: int, density: float, hq: int, hk: int, d: int) -> Case:
    name = f"{kind} {R}x{C} d{round(density * 100)}% {M}x{N} h{hq}/{hk} d{d}"
    pairs = _pattern_pairs(M, N, R, C, density)
    return Case(name, dict(kind=kind, M=M, N=N, R=R, C=C, density=density, hq=hq, hk=hk, d=d),
                flops=4.0 * hq * d * pairs)


def sparse_cases(smoke: bool):
    if smoke:
        return [_case("block", 64, 64, 16, 16, 0.5, 4, 2, 64), _case("vector", 48, 64, 16, 1, 0.5, 4, 2, 64)]
    cases = [_case("block", 8192, 8192, 64, 64, dens, 32, 8, 128) for dens in (0.1, 0.5)]
    cases += [_case("vector", 8192, 8192, 64, 1, dens, 32, 8, 128) for dens in (0.1, 0.5, 1.0)]
    return cases


@functools.lru_cache(maxsize=8)
def _pattern(M: int, N: int, R: int, C: int, density: float):
    """BSR ``(indptr, indices)`` int32 CPU: each block row keeps ``round(density * NB)`` random columns
    (sorted), the same count per row (so the dense ragged form has equal lengths)."""
    gen = torch.Generator().manual_seed(29)
    MB, NB = -(-M // R), N // C
    keep = max(1, round(density * NB))
    cols = torch.stack([torch.randperm(NB, generator=gen)[:keep].sort().values for _ in range(MB)])
    indptr = torch.arange(MB + 1, dtype=torch.int32) * keep
    return indptr, cols.reshape(-1).to(torch.int32)


def _pattern_pairs(M, N, R, C, density) -> int:
    indptr, _ = _pattern(M, N, R, C, density)
    MB = indptr.numel() - 1
    rows = [min(R, M - b * R) for b in range(MB)]
    return sum(r * int(indptr[b + 1] - indptr[b]) * C for b, r in enumerate(rows))


def _inputs(case: Case):
    p = case.params
    kw = dict(dtype=torch.bfloat16, device=device())
    q = torch.randn(p["M"], p["hq"], p["d"], **kw)
    k = torch.randn(p["N"], p["hk"], p["d"], **kw)
    v = torch.randn(p["N"], p["hk"], p["d"], **kw)
    return q, k, v, *_pattern(p["M"], p["N"], p["R"], p["C"], p["density"])


def _workspace():
    return torch.empty(256 << 20, dtype=torch.uint8, device=device())


def _flashtile(case: Case):
    import flashtile

    p = case.params
    q, k, v, indptr, indices = _inputs(case)
    w = flashtile.sparse.BlockSparseAttentionWrapper(_workspace())
    w.plan(indptr, indices, p["M"], p["N"], p["R"], p["C"], p["hq"], p["hk"], p["d"], q_data_type=torch.bfloat16)
    out = torch.empty_like(q)
    plan = w._prefill._plan
    note = f"{plan.num_items} items, {plan.num_merges} merges, tile {plan.block_m}x{plan.block_n}"
    return (lambda: w.run(q, k, v, out=out)), note


def _flashinfer(case: Case):
    flashinfer = import_flashinfer("sparse")
    p = case.params
    q, k, v, indptr, indices = _inputs(case)
    w = flashinfer.sparse.BlockSparseAttentionWrapper(_workspace())
    dev = device()
    w.plan(indptr.to(dev), indices.to(dev), p["M"], p["N"], p["R"], p["C"], p["hq"], p["hk"], p["d"],
           q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, o_data_type=torch.bfloat16)
    out = torch.empty_like(q)
    return lambda: w.run(q, k, v, out=out)


def _dense_ragged(case: Case):
    """Dense attention over the kept tokens, gathered once (outside the timing) into contiguous rows:
    block row b is request b with its keys side by side."""
    import flashtile

    p = case.params
    q, k, v, indptr, indices = _inputs(case)
    C, R, M = p["C"], p["R"], p["M"]
    tokens = (indices.to(torch.int64)[:, None] * C + torch.arange(C)).reshape(-1).to(q.device)
    k_rows, v_rows = k[tokens].contiguous(), v[tokens].contiguous()
    MB = indptr.numel() - 1
    qo_indptr = torch.tensor([min(R * b, M) for b in range(MB + 1)], dtype=torch.int32)
    kv_indptr = indptr * C
    w = flashtile.BatchPrefillWithRaggedKVCacheWrapper(_workspace())
    w.plan(qo_indptr, kv_indptr, p["hq"], p["hk"], p["d"], q_data_type=torch.bfloat16)
    out = torch.empty_like(q)
    return lambda: w.run(q, k_rows, v_rows, out=out)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(case: Case):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    p = case.params
    if p["kind"] != "block":
        raise Unavailable("FlexAttention is compared on the block-sparse cases only")
    q, k, v, indptr, indices = _inputs(case)
    R, C = p["R"], p["C"]
    if R != C:
        raise Unavailable("FlexAttention blocks are square here")
    MB, NB = indptr.numel() - 1, p["N"] // C
    dense = torch.zeros(MB, NB, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(MB), (indptr[1:] - indptr[:-1]).long())
    dense[rows, indices.long()] = True
    dense = dense.to(q.device)

    def block_mod(b, h, q_idx, kv_idx):
        return dense[q_idx // R, kv_idx // C]

    mask = create_block_mask(block_mod, None, None, p["M"], p["N"], device=q.device, BLOCK_SIZE=R)
    note = None
    if q.device.type == "cuda":
        flex = _compiled_flex()
    else:  # compiling flex for CPU takes ~30 s; eager still checks the call
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        flex, note = flex_attention, "eager (uncompiled) on CPU"
    qb, kb, vb = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    # Flex's own tiles must divide the mask's blocks (its Hopper default is 128 x 128)
    options = {"BLOCK_M": R, "BLOCK_N": C} if q.device.type == "cuda" and R < 128 else None

    def call():
        return flex(qb, kb, vb, block_mask=mask, enable_gqa=p["hq"] != p["hk"],
                    kernel_options=options)[0].transpose(0, 1)

    return call, note


register(Suite("sparse", sparse_cases,
               [Provider("flashtile", _flashtile), Provider("flashinfer", _flashinfer),
                Provider("flex_attention", _flex), Provider("dense_ragged", _dense_ragged, baseline=False)],
               "tflops", "block-sparse (64x64) and vector-sparse (C=1) attention, bf16, 32/8 heads, d128; "
               "dense_ragged: flashtile's dense prefill over the same kept tokens, contiguous"))
