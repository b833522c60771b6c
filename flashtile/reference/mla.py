"""Multi-head latent attention (DeepSeek MLA) over a paged latent cache, in plain PyTorch: the CPU path
and the readable specification of flashtile/kernels/mla.py (same function, same arguments).

With the up-projections absorbed into the query, MLA is multi-query attention whose keys are the
concatenation ``[ckv | kpe]`` (latent and RoPE part) and whose values are the latent ``ckv`` itself,
shared by every head. Per request ``b``, query token ``t`` and head ``h``:

    s_j   = sm_scale * (q_nope[t, h] . ckv_j * ckv_scale + q_pe[t, h] . kpe_j * kpe_scale)
    out   = sum_j softmax(s)_j * ckv_j * ckv_scale
    lse   = log2(sum_j exp(s_j))                      (base 2)

over the request's ``kv_len`` tokens; with ``causal`` the query token ``t`` of a request with ``qo_len``
queries sits at position ``kv_len - qo_len + t`` and sees keys ``j <= position`` (bottom-right aligned).
A row that sees no key gets ``out = 0`` and ``lse = -inf``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["mla_paged_forward"]


def _request_rows(cache: torch.Tensor, pages: torch.Tensor, kv_len: int) -> torch.Tensor:
    """The first ``kv_len`` token rows ``[kv_len, D]`` (float32) of ``cache`` [pages, page_size, D]
    along the page list ``pages``."""
    return cache[pages.long()].reshape(-1, cache.shape[-1])[:kv_len].float()


def mla_paged_forward(q_nope, q_pe, ckv_cache, kpe_cache, meta, out, lse, *, sm_scale: float, ckv_scale: float,
                      kpe_scale: float, causal: bool) -> None:
    """Write MLA attention of every planned request into ``out`` / ``lse``.

    Args:
        q_nope: ``[nnz_q, num_heads, head_dim_ckv]`` float16/bfloat16, the absorbed query.
        q_pe: ``[nnz_q, num_heads, head_dim_kpe]``, q_nope's dtype, the RoPE part of the query.
        ckv_cache: ``[num_pages, page_size, head_dim_ckv]`` (q's dtype or float8), the latent cache.
        kpe_cache: ``[num_pages, page_size, head_dim_kpe]`` (ckv_cache's dtype), the RoPE keys.
        meta: the plan's :class:`flashtile._core.mla_plan.MlaMeta` (this path reads its index arrays:
            ``qo_indptr`` [B+1], ``kv_indptr`` [B+1] in pages, ``kv_indices``, ``kv_len`` [B] tokens).
        out: ``[nnz_q, num_heads, head_dim_ckv]``, written. lse: ``[nnz_q, num_heads]`` float32, written.
        sm_scale, ckv_scale, kpe_scale, causal: see the module docstring.
    """
    qo_indptr = meta.qo_indptr.tolist()
    kv_indptr = meta.kv_indptr.tolist()
    kv_lens = meta.kv_len.tolist()
    indices = meta.kv_indices
    page_size = ckv_cache.shape[1]
    for b, kv_len in enumerate(kv_lens):
        q0, q1 = qo_indptr[b], qo_indptr[b + 1]
        if q1 == q0:
            continue
        qn = q_nope[q0:q1].float()  # [qo_len, H, Dc]
        qp = q_pe[q0:q1].float()  # [qo_len, H, Dp]
        if kv_len == 0:
            out[q0:q1].zero_()
            lse[q0:q1].fill_(float("-inf"))
            continue
        pages = indices[kv_indptr[b]:kv_indptr[b] + (kv_len + page_size - 1) // page_size]
        ckv = _request_rows(ckv_cache, pages, kv_len) * ckv_scale  # [kv_len, Dc]
        kpe = _request_rows(kpe_cache, pages, kv_len) * kpe_scale  # [kv_len, Dp]
        s = (torch.einsum("thd,kd->thk", qn, ckv) + torch.einsum("thd,kd->thk", qp, kpe)) * sm_scale
        qo_len = q1 - q0
        if causal:
            pos = torch.arange(qo_len, device=s.device) + (kv_len - qo_len)
            visible = torch.arange(kv_len, device=s.device)[None, :] <= pos[:, None]  # [qo_len, kv_len]
            s = s.masked_fill(~visible[:, None, :], float("-inf"))
        m = s.amax(-1, keepdim=True)
        seen = m > float("-inf")
        p = torch.exp(s - torch.where(seen, m, torch.zeros_like(m)))
        denom = p.sum(-1, keepdim=True)
        o = torch.einsum("thk,kd->thd", p, ckv) / torch.where(seen, denom, torch.ones_like(denom))
        row_lse = torch.where(seen[..., 0], (m[..., 0] + torch.log(denom[..., 0])) / math.log(2.0),
                              torch.full_like(m[..., 0], float("-inf")))
        out[q0:q1] = o.to(out.dtype)
        lse[q0:q1] = row_lse
    # Rows after qo_indptr[-1] (no request) are left as they are, as on the kernel path.
