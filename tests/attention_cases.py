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
