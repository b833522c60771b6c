"""Shared helpers for the attention tests: input makers and the comparison against the oracle."""

from __future__ import annotations

import torch

from oracles import LSE_TOLERANCES, TOLERANCES, attention_oracle


def make_qkv(qo_len, kv_len, num_qo_heads, num_kv_heads, head_dim, dtype, device, *, head_dim_vo=None,
             kv_dtype=None, layout="NHD"):
    """Random q [Lq, Hq, D]; k, v in ``layout``; K/V in kv_dtype (fp8 is made from scaled randn)."""
    head_dim_vo = head_dim_vo or head_dim
    q = torch.randn(qo_len, num_qo_heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(kv_len, num_kv_heads, head_dim, dtype=torch.float32, device=device)
    v = torch.randn(kv_len, num_kv_heads, head_dim_vo, dtype=torch.float32, device=device)
    kv_dtype = kv_dtype or dtype
    k, v = k.to(kv_dtype), v.to(kv_dtype)
    if layout == "HND":
        k, v = k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()
    return q, k, v


def to_nhd(x, layout):
    return x.transpose(0, 1) if layout == "HND" else x


def assert_matches_oracle(out, lse, q, k, v, layout="NHD", **oracle_kwargs):
    ref_o, ref_lse = attention_oracle(q, to_nhd(k, layout), to_nhd(v, layout), **oracle_kwargs)
    assert not out.isnan().any(), "output has NaN (unwritten or bad math)"
    atol, rtol = TOLERANCES[q.dtype]
    torch.testing.assert_close(out.double().cpu(), ref_o, atol=atol, rtol=rtol)
    if lse is not None:
        latol, lrtol = LSE_TOLERANCES[q.dtype]
        lse = lse.double().cpu()
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "empty rows must give lse -inf exactly"
        finite = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse[finite], ref_lse[finite], atol=latol, rtol=lrtol)


def random_page_table(lens, page_size, num_pages, *, indptr_offset=0):
    """A page table for requests of ``lens`` tokens whose pages are distinct pages of a pool of
    ``num_pages``, in random order (so no request reads contiguous memory).

    Returns int32 CPU tensors ``(indptr [B + 1], indices, last_page_len [B])``: request ``i`` owns pages
    ``indices[indptr[i]:indptr[i + 1]]``; a request of length 0 has no pages and ``last_page_len`` 0.
    ``indptr_offset`` random page ids precede the table (``indptr[0] == indptr_offset``).
    """
    pages = [-(-n // page_size) for n in lens]
    if sum(pages) > num_pages:
        raise ValueError(f"the requests need {sum(pages)} pages, the pool has {num_pages}")
    perm = torch.randperm(num_pages, dtype=torch.int32)[: sum(pages)]
    indices = torch.cat([torch.randint(0, num_pages, (indptr_offset,), dtype=torch.int32), perm])
    indptr = torch.tensor([indptr_offset] + [indptr_offset + s for s in torch.tensor(pages, dtype=torch.int64)
                                             .cumsum(0).tolist()], dtype=torch.int32)
    last = torch.tensor([n - (p - 1) * page_size if p else 0 for n, p in zip(lens, pages)], dtype=torch.int32)
    return indptr, indices, last


def make_paged_batch(lens, page_size, num_kv_heads, head_dim, dtype, device, *, layout="NHD", form="5d",
                     spare_pages=3, indptr_offset=0, scale=1.0, head_dim_vo=None):
    """A cache with the requests' pages scattered over a larger pool (random order), and its table.

    Returns ``(cache, indptr, indices, last_page_len)``; index arrays are int32 on the CPU. With a
    ``head_dim_vo`` other than ``head_dim`` the cache is a ``(k, v)`` tuple of separate pools.
    """
    total = sum(-(-n // page_size) for n in lens) + spare_pages
    indptr, indices, last = random_page_table(lens, page_size, total, indptr_offset=indptr_offset)
    shape = [total, 2, page_size, num_kv_heads, head_dim] if layout == "NHD" else \
        [total, 2, num_kv_heads, page_size, head_dim]
    if head_dim_vo is not None and head_dim_vo != head_dim:
        v_shape = shape[:1] + shape[2:-1] + [head_dim_vo]
        k = (torch.randn(shape[:1] + shape[2:], device=device) * scale).to(dtype)
        return (k, (torch.randn(v_shape, device=device) * scale).to(dtype)), indptr, indices, last
    cache = (torch.randn(shape, device=device) * scale).to(dtype)
    if form == "tuple":  # strided views of one pool, as engines pass them
        cache = (cache[:, 0], cache[:, 1])
    return cache, indptr, indices, last


def make_mla_batch(qo_lens, kv_lens, page_size, heads, dc, dp, dtype, device, *, kv_dtype=None, spare=3,
                   indptr_offset=0, scale=1.0):
    """q_nope/q_pe, scattered page pools ckv [pages, page_size, dc] and kpe (one [.., dc + dp] tensor,
    sliced, as engines pass it), and the int32 CPU index arrays."""
    total = sum(-(-n // page_size) for n in kv_lens) + spare
    kv_indptr, kv_indices, _ = random_page_table(kv_lens, page_size, total, indptr_offset=indptr_offset)
    qo_indptr = torch.tensor([0] + torch.tensor(qo_lens).cumsum(0).tolist(), dtype=torch.int32)
    nnz = int(qo_indptr[-1])
    q_nope = torch.randn(nnz, heads, dc, device=device).to(dtype)
    q_pe = torch.randn(nnz, heads, dp, device=device).to(dtype)
    pool = (torch.randn(total, page_size, dc + dp, device=device) * scale).to(kv_dtype or dtype)
    ckv, kpe = pool[..., :dc], pool[..., dc:]
    return q_nope, q_pe, ckv, kpe, qo_indptr, kv_indptr, kv_indices, torch.tensor(kv_lens, dtype=torch.int32)


def scaled_copy(x):
    """A tensor (or a (k, v) pair of them) with half of ``x``'s values, its shape, and its strides where ``x``
    is contiguous: new inputs for a second run() that replays the first one's launches."""
    if isinstance(x, (tuple, list)):
        return type(x)(scaled_copy(c) for c in x)
    return x.clone().mul_(0.5)


def workspace(device, mib=16):
    return torch.empty(mib * 1024 * 1024, dtype=torch.uint8, device=device)
