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

import torch

from .._core.params import AttentionParams
from .attention import single_attention

__all__ = ["mla_paged_forward"]


def _request_rows(cache: torch.Tensor, pages: torch.Tensor, kv_len: int) -> torch.Tensor:
    """The first ``kv_len`` token rows ``[kv_len, D]`` (float32) of ``cache`` [pages, page_size, D]
    along the page list ``pages``."""
    return cache[pages.long()].reshape(-1, cache.shape[-1])[:kv_len].float()


def mla_paged_forward(q_nope, q_pe, ckv_cache, kpe_cache, meta, out, lse, *, sm_scale: float, ckv_scale: float,
                      kpe_scale: float, causal: bool, variant=None) -> None:
    """Write MLA attention of every planned request into ``out`` / ``lse``.

    Args:
        q_nope: ``[nnz_q, num_heads, head_dim_ckv]`` float16/bfloat16, the absorbed query.
        q_pe: ``[nnz_q, num_heads, head_dim_kpe]``, q_nope's dtype, the RoPE part of the query.
        ckv_cache: ``[num_pages, page_size, head_dim_ckv]`` (q's dtype or float8), the latent cache.
        kpe_cache: ``[num_pages, page_size, head_dim_kpe]`` (ckv_cache's dtype), the RoPE keys.
        meta: the plan's :class:`flashtile._core.mla_tiles.MlaMeta` (this path reads its index arrays:
            ``qo_indptr`` [B+1], ``kv_indptr`` [B+1] in pages, ``kv_indices``, ``kv_len`` [B] tokens).
        out: ``[nnz_q, num_heads, head_dim_ckv]``, written. lse: ``[nnz_q, num_heads]`` float32, written.
        sm_scale, ckv_scale, kpe_scale, causal: see the module docstring.
        variant: a bound attention variant (flashtile/variants.py) or None; its hooks see one KV head
            (kv_head 0) with keys ``[ckv | kpe]`` (times their scales) and values ``ckv``.
    """
    qo_indptr = meta.qo_indptr.tolist()
    kv_indptr = meta.kv_indptr.tolist()
    kv_lens = meta.kv_len.tolist()
    indices = meta.kv_indices
    page_size = ckv_cache.shape[1]
    params = AttentionParams(sm_scale=sm_scale, causal=causal)
    for b, kv_len in enumerate(kv_lens):
        q0, q1 = qo_indptr[b], qo_indptr[b + 1]
        if q1 == q0:
            continue
        pages = indices[kv_indptr[b]:kv_indptr[b] + (kv_len + page_size - 1) // page_size]
        ckv = _request_rows(ckv_cache, pages, kv_len) * ckv_scale  # [kv_len, Dc]
        kpe = _request_rows(kpe_cache, pages, kv_len) * kpe_scale  # [kv_len, Dp]
        q = torch.cat([q_nope[q0:q1], q_pe[q0:q1]], dim=-1).float()  # [qo_len, H, Dc + Dp]
        k = torch.cat([ckv, kpe], dim=-1)[:, None]  # one KV head: [kv_len, 1, Dc + Dp]
        o, row_lse = single_attention(q, k, ckv[:, None], params, variant=variant, batch=b)
        out[q0:q1] = o.to(out.dtype)
        lse[q0:q1] = row_lse
    # Rows after qo_indptr[-1] (no request) are left as they are, as on the kernel path.
