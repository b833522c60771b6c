"""Paged KV cache append: suite ``page_append`` (GB/s).

Cases: a decode step (batch 1, 64, 512; one new token per request, each request's length drawn
from 1..512) and a prefill (16 new requests of 1024 tokens); 8 KV heads, head_dim 128, page 16,
bf16, NHD 5-D cache, pages in scattered order. Bytes = K and V rows read from the append tensors
and written to the cache (2 x 2 x nnz x heads x head_dim x 2 bytes); index arrays not counted.

Providers get identical inputs (the harness seeds before each) and return the whole cache, so the
harness checks that they wrote the same bits:
- ``flashtile``: ``flashtile.page.append_paged_kv_cache`` with device index arrays (one launch);
- ``torch_index_slots``: ``k_cache[page, slot] = key`` (two index_put) with ``page``/``slot``
  precomputed outside the timed region (what an engine with a slot mapping does);
- ``torch_index_table``: the same, computing ``page``/``slot`` from the page table inside the timed
  region (the work flashtile's kernel does);
- ``flashinfer``: ``flashinfer.page.append_paged_kv_cache`` when FlashInfer is importable.
"""

from __future__ import annotations

import torch

from .harness import Case, Provider, Suite, device, import_flashinfer, register


def _case(name: str, lens_before, lens_after, heads=8, head_dim=128, page_size=16, dtype="bfloat16") -> Case:
    nnz = sum(a - b for a, b in zip(lens_after, lens_before))
    es = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    params = dict(lens_before=list(lens_before), lens_after=list(lens_after), num_kv_heads=heads,
                  head_dim=head_dim, page_size=page_size, dtype=dtype, kv_layout="NHD", nnz=nnz)
    return Case(name, params, bytes=float(2 * 2 * nnz * heads * head_dim * es))


def _decode(batch: int, **kw) -> Case:
    g = torch.Generator().manual_seed(batch)
    after = torch.randint(1, 513, (batch,), generator=g).tolist()
    return _case(f"decode batch {batch}", [n - 1 for n in after], after, **kw)


def append_cases(smoke: bool):
    if smoke:
        return [_decode(3, heads=2, head_dim=64, page_size=4), _case("prefill 2x40", [0, 0], [40, 40], heads=2,
                                                                    head_dim=64, page_size=4)]
    return [_decode(1), _decode(64), _decode(512), _case("prefill 16x1024", [0] * 16, [1024] * 16)]


def _inputs(case: Case):
    """Zeroed 5-D NHD cache, scattered page table (int32, on the device), append rows and their
    (batch index, position)."""
    p = case.params
    dev, dtype, ps, h, d = device(), getattr(torch, p["dtype"]), p["page_size"], p["num_kv_heads"], p["head_dim"]
    counts = [-(-n // ps) for n in p["lens_after"]]
    num_pages = sum(counts) + 8
    indices = torch.randperm(num_pages)[: sum(counts)].to(torch.int32).to(dev)
    indptr = torch.tensor([0] + counts).cumsum(0).to(torch.int32).to(dev)
    last = torch.tensor([(n - 1) % ps + 1 for n in p["lens_after"]], dtype=torch.int32, device=dev)
    cache = torch.zeros(num_pages, 2, ps, h, d, dtype=dtype, device=dev)
    bi, pos = [], []
    for b, (n0, n1) in enumerate(zip(p["lens_before"], p["lens_after"])):
        bi += [b] * (n1 - n0)
        pos += range(n0, n1)
    bi = torch.tensor(bi, dtype=torch.int32, device=dev)
    pos = torch.tensor(pos, dtype=torch.int32, device=dev)
    key = torch.randn(p["nnz"], h, d, device=dev).to(dtype)
    value = torch.randn(p["nnz"], h, d, device=dev).to(dtype)
    return key, value, bi, pos, cache, indices, indptr, last


def _flashtile(case: Case):
    from flashtile import page

    key, value, bi, pos, cache, indices, indptr, last = _inputs(case)

    def call():
        page.append_paged_kv_cache(key, value, bi, pos, cache, indices, indptr, last, "NHD")
        return cache

    return call


def _page_slot(bi, pos, indices, indptr, page_size):
    b, p = bi.long(), pos.long()
    return indices.long()[indptr.long()[b] + p // page_size], p % page_size


def _torch_index(precomputed: bool):
    def make(case: Case):
        key, value, bi, pos, cache, indices, indptr, last = _inputs(case)
        k_cache, v_cache = cache[:, 0], cache[:, 1]
        ps = case.params["page_size"]
        if precomputed:
            page, slot = _page_slot(bi, pos, indices, indptr, ps)

            def call():
                k_cache[page, slot] = key
                v_cache[page, slot] = value
                return cache
        else:
            def call():
                page, slot = _page_slot(bi, pos, indices, indptr, ps)
                k_cache[page, slot] = key
                v_cache[page, slot] = value
                return cache

        return call

    return make


def _flashinfer(case: Case):
    flashinfer = import_flashinfer()
    key, value, bi, pos, cache, indices, indptr, last = _inputs(case)

    def call():
        flashinfer.page.append_paged_kv_cache(key, value, bi, pos, cache, indices, indptr, last, "NHD")
        return cache

    return call


PROVIDERS = [
    Provider("flashtile", _flashtile),
    Provider("flashinfer", _flashinfer),
    Provider("torch_index_slots", _torch_index(precomputed=True)),
    Provider("torch_index_table", _torch_index(precomputed=False)),
]

register(Suite("page_append", append_cases, PROVIDERS, metric="gbps",
               description="append K/V rows into a paged cache (8 KV heads, d128, page 16, bf16, NHD); "
                           "bytes = K + V read and written"))
