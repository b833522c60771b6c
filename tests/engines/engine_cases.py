"""Shared pieces of the serving-engine scenarios (../shared/ENGINES.md §3): the model shape, caches
and page tables in the forms vLLM and SGLang build, the float64 oracle over the logical view of a
page table, and the production setting engines run with.

Shapes: Llama-3-8B at TP=1 on a GPU; on CPU a tiny GQA model (the Triton kernels run under the
interpreter there, so every launch must stay small).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from attention_cases import assert_matches_oracle
from conftest import HAS_CUDA
from oracles import paged_cache_f64, read_paged_kv_oracle


@dataclass(frozen=True)
class ModelShape:
    """The attention shape of a model: query/KV heads, head dim, dtype and layer count."""

    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16
    num_layers: int = 2

    @property
    def sm_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    @property
    def qkv_width(self) -> int:
        """Columns of the fused QKV projection output."""
        return (self.num_qo_heads + 2 * self.num_kv_heads) * self.head_dim


LLAMA3_8B = ModelShape(32, 8, 128)
TINY_GQA = ModelShape(8, 2, 64)
MODEL = LLAMA3_8B if HAS_CUDA else TINY_GQA

MIB = 1024 * 1024


def layers_to_run(path: str) -> int:
    """Layers a scenario runs per plan: the model's, but one under the Triton interpreter on CPU (it runs
    one program at a time; further layers re-run the same plan, which the reference path and the GPU
    cover)."""
    return 1 if path == "kernel" and not HAS_CUDA else MODEL.num_layers


@pytest.fixture
def production_mode(monkeypatch):
    """Engines run without FLASHTILE_DEBUG: device page tables are then neither copied to the host nor
    validated, which is the path they take (issue 22, item 5). The suite's default; kept explicit so
    the scenarios stay on that path when FLASHTILE_DEBUG=1 is set in the environment. The scenarios
    also NaN-fill the ``out`` buffers they pass (the suite poisons only outputs flashtile allocates)."""
    monkeypatch.delenv("FLASHTILE_DEBUG", raising=False)


def fused_qkv(num_tokens: int, model: ModelShape, device, dtype=None):
    """A fused QKV projection output and its q, k, v views as engines slice them.

    Returns ``(qkv [T, qkv_width], q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D])``; q, k and v are strided
    views (row stride ``qkv_width``, larger than their own width), as vLLM and SGLang pass them.
    """
    dtype = dtype or model.dtype
    hq, hk, d = model.num_qo_heads, model.num_kv_heads, model.head_dim
    qkv = torch.randn(num_tokens, model.qkv_width, dtype=dtype, device=device)
    q = qkv[:, : hq * d].view(-1, hq, d)
    k = qkv[:, hq * d: (hq + hk) * d].view(-1, hk, d)
    v = qkv[:, (hq + hk) * d:].view(-1, hk, d)
    return qkv, q, k, v


def cumsum0(lens, device="cpu") -> torch.Tensor:
    """int32 ``[len(lens) + 1]``: 0 then the running sums of ``lens`` (an indptr)."""
    out = torch.zeros(len(lens) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    return out.to(device)


def nan_output(shape, dtype, device) -> torch.Tensor:
    """An ``out=`` buffer full of NaN, so that any element a kernel leaves unwritten fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def request_kv_f64(cache, kv_layout, indptr, indices, last_page_len):
    """The logical K/V of every request of a page table: a list of float64 NHD ``(k [len, Hkv, D],
    v [len, Hkv, D])`` on the CPU, read through ``indptr``, ``indices`` and ``last_page_len`` (a
    request with no pages is empty).

    ``cache`` is any form run() takes (5-D tensor, tuple of 4-D views, tuple of 3-D page-size-1
    tensors). Only the pages the table names are copied to the host: engine pools are large.
    """
    indptr = indptr.cpu().long()
    first, end = int(indptr[0]), int(indptr[-1])
    if isinstance(cache, torch.Tensor):
        device = cache.device
        pages = indices.cpu()[first:end].long().to(device)
        used = cache[pages]
    else:
        device = cache[0].device
        pages = indices.cpu()[first:end].long().to(device)
        used = tuple(part[pages] for part in cache)
    k_pages, v_pages = paged_cache_f64(used, kv_layout)
    local_indices = torch.arange(end - first, dtype=torch.int64)
    return read_paged_kv_oracle(k_pages, v_pages, local_indices, indptr - first, last_page_len.cpu())


def assert_requests_match_oracle(out, lse, q, qo_indptr, request_kv, **oracle_kwargs):
    """Rows ``qo_indptr[r]:qo_indptr[r + 1]`` of ``out`` (and ``lse``, base 2, when given) are request
    ``r``'s attention over ``request_kv[r]`` (float64 NHD k, v), by the float64 oracle with the
    tolerances of tests/oracles.py for q's dtype. Causal masks align bottom-right."""
    bounds = qo_indptr.cpu().tolist()
    assert len(bounds) == len(request_kv) + 1
    assert out.shape[0] == bounds[-1] and q.shape[0] == bounds[-1]
    for r, (k, v) in enumerate(request_kv):
        rows = slice(bounds[r], bounds[r + 1])
        try:
            assert_matches_oracle(out[rows], None if lse is None else lse[rows], q[rows], k, v, **oracle_kwargs)
        except AssertionError as error:
            raise AssertionError(f"request {r} ({bounds[r + 1] - bounds[r]} queries, {k.shape[0]} keys): "
                                 f"{error}") from None


def assert_engine_attributes(wrapper, model: ModelShape, *, causal=None, window_left=-1, logits_soft_cap=None):
    """The attributes vLLM's forward asserts (and SGLang reads) hold: ``_window_left``,
    ``_logits_soft_cap`` (0.0 for None), ``_sm_scale`` and, for prefill, ``_causal``."""
    assert wrapper._window_left == window_left
    assert wrapper._logits_soft_cap == (logits_soft_cap or 0.0)
    assert wrapper._sm_scale == model.sm_scale
    if causal is not None:
        assert wrapper._causal is causal
