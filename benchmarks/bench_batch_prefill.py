"""Batch prefill and append: suites ``batch_prefill`` (TFLOP/s: paged 16 x 1024, ragged causal
batches, page size 1, a skewed batch) and ``batch_append`` (GB/s of the KV cache: speculative-decoding
verification, 2-8 query tokens per request against long caches, next to batch decode on the same cache).

FLOPs count the (query, key) pairs each request can see: ``4 * Hq * d * pairs``, with
``pairs = qo * kv - qo * (qo - 1) / 2`` for a causal request with ``qo <= kv`` (bottom-right aligned).
Every provider returns ``[total_qo, Hq, d]``. flashtile and FlashInfer read one paged cache (NHD, pages
in random order) or ragged K/V; torch SDPA gets ``[B, H, L, D]`` tensors (uniform batches only);
FlexAttention gets the batch packed into one sequence with a document mask (causal within a request).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F

from .harness import Case, Knob, Provider, Suite, Tune, Unavailable, device, grid, import_flashinfer, register

COPY_CEILING_GBPS = 3006.0  # H100 device-to-device copy, ANCHORS.md


def _pairs(qo: int, kv: int, causal: bool) -> int:
    if not causal:
        return qo * kv
    seen = min(qo, kv)  # rows with a non-negative position see 1..kv keys
    return seen * kv - seen * (seen - 1) // 2


def _case(name, qo_lens, kv_lens, hq, hkv, d=128, *, page_size=None, causal=True, dtype="bfloat16", skewed=None):
    es = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    pairs = sum(_pairs(a, b, causal) for a, b in zip(qo_lens, kv_lens))
    kv_bytes = 2 * sum(kv_lens) * hkv * d * es
    qo_bytes = 2 * sum(qo_lens) * hq * d * es
    params = dict(qo_lens=qo_lens, kv_lens=kv_lens, num_qo_heads=hq, num_kv_heads=hkv, head_dim=d,
                  page_size=page_size, causal=causal, dtype=dtype, skewed=skewed)
    return Case(name, params, flops=4.0 * hq * d * pairs, bytes=float(kv_bytes + qo_bytes))


def prefill_cases(smoke: bool):
    if smoke:
        return [_case("paged 2 x 64 h4/2 d64", [64] * 2, [64] * 2, 4, 2, 64, page_size=16),
                _case("ragged 3 mixed h4/4 d64", [5, 64, 1], [5, 64, 70], 4, 4, 64)]
    cases = [_case("paged 16 x 1024 h32/8 p16", [1024] * 16, [1024] * 16, 32, 8, page_size=16),
             _case("paged 16 x 1024 h32/8 p1", [1024] * 16, [1024] * 16, 32, 8, page_size=1),
             _case("paged 4 x 8192 h32/8 p16", [8192] * 4, [8192] * 4, 32, 8, page_size=16),
             _case("ragged 16 x 1024 h32/8", [1024] * 16, [1024] * 16, 32, 8)]
    cases += [_case(f"ragged {b} x {n} h32/32", [n] * b, [n] * b, 32, 32) for b, n in
              ((128, 1024), (64, 2048), (32, 4096), (16, 8192), (1, 32768))]
    lens = [16384] + [128] * 100
    cases.append(_case("skewed 16384 + 100 x 128 h32/8", lens, lens, 32, 8, skewed=(1, 100)))
    cases.append(_case("ragged 16 x 1024 h16/16 d192/128", [1024] * 16, [1024] * 16, 16, 16, 192))
    # head dim 64: the demo model's (a 2048-token prefill chunk after earlier chunks of the same requests)
    cases.append(_case("paged 16 x 1024 h32/8 p16 d64", [1024] * 16, [1024] * 16, 32, 8, 64, page_size=16))
    cases.append(_case("paged 2 x 1024 vs 2048 h32/8 p16 d64", [1024] * 2, [2048] * 2, 32, 8, 64, page_size=16))
    return cases


def append_cases(smoke: bool):
    if smoke:
        return [_case("append 4 x 4 vs 256 h4/2 d64", [4] * 4, [256] * 4, 4, 2, 64, page_size=16)]
    return [_case(f"append 64 x {n} vs 4096 h32/8 p16", [n] * 64, [4096] * 64, 32, 8, page_size=16)
            for n in (1, 2, 4, 8)] + [
        _case("append 8 x 4 vs 32768 h32/8 p16", [4] * 8, [32768] * 8, 32, 8, page_size=16)]


# ---------------------------------------------------------------------------------------------
# Inputs (every provider of a case sees the same random tensors: the harness seeds before make)
# ---------------------------------------------------------------------------------------------


def _indptr(lens, dev):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)


def _ragged_inputs(case: Case):
    p = case.params
    dt = getattr(torch, p["dtype"])
    dev = device()
    q = torch.randn(sum(p["qo_lens"]), p["num_qo_heads"], p["head_dim"], dtype=dt, device=dev)
    k = torch.randn(sum(p["kv_lens"]), p["num_kv_heads"], p["head_dim"], dtype=dt, device=dev)
    dvo = 128 if p["head_dim"] == 192 else p["head_dim"]
    v = torch.randn(sum(p["kv_lens"]), p["num_kv_heads"], dvo, dtype=dt, device=dev)
    return q, k, v


def _paged_table(kv_lens, page_size, dev):
    pages = [-(-n // page_size) for n in kv_lens]
    total = sum(pages)
    indices = torch.randperm(total, dtype=torch.int32, device=dev)
    last = torch.tensor([n - (k - 1) * page_size for n, k in zip(kv_lens, pages)], dtype=torch.int32, device=dev)
    return _indptr(pages, dev), indices, last, total


def _paged_cache(k, v, kv_lens, page_size, indices, total):
    """The ragged k/v scattered into pages (so paged and ragged providers compute the same thing)."""
    cache = torch.zeros(total, 2, page_size, k.shape[1], k.shape[2], dtype=k.dtype, device=k.device)
    pos = torch.cat([torch.arange(n, device=k.device) for n in kv_lens])
    page_of_req = torch.repeat_interleave(torch.arange(len(kv_lens), device=k.device),
                                          torch.tensor(kv_lens, device=k.device))
    pages = [-(-n // page_size) for n in kv_lens]
    first_page = _indptr(pages, k.device)[:-1].long()
    slot_page = indices.long()[first_page[page_of_req] + pos // page_size]
    cache[slot_page, 0, pos % page_size] = k
    cache[slot_page, 1, pos % page_size] = v
    return cache


def _flashtile(case: Case):
    import flashtile

    p = case.params
    q, k, v = _ragged_inputs(case)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=device())
    qo_indptr = _indptr(p["qo_lens"], "cpu")
    hq, hk, d = p["num_qo_heads"], p["num_kv_heads"], p["head_dim"]
    if p["page_size"]:
        indptr, indices, last, total = _paged_table(p["kv_lens"], p["page_size"], device())
        cache = _paged_cache(k, v, p["kv_lens"], p["page_size"], indices, total)
        del k, v
        w = flashtile.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
        w.plan(qo_indptr, indptr.cpu(), indices.cpu(), last.cpu(), hq, hk, d, p["page_size"], causal=p["causal"],
               q_data_type=q.dtype)
        fn = functools.partial(w.run, q, cache)
    else:
        w = flashtile.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD")
        w.plan(qo_indptr, _indptr(p["kv_lens"], "cpu"), hq, hk, d, v.shape[-1], causal=p["causal"],
               q_data_type=q.dtype)
        fn = functools.partial(w.run, q, k, v)
    note = f"tile {w._plan.block_m}x{w._plan.block_n}, {w._plan.num_items} items, {w._plan.num_merges} merged tiles"
    return fn, note


def _flashtile_parts(case: Case):
    """The skewed batch run as its parts (the long prompt alone, then the short ones), back to back."""
    import flashtile

    p = case.params
    if not p["skewed"]:
        raise Unavailable("only for the skewed case")
    q, k, v = _ragged_inputs(case)
    n_long, _ = p["skewed"]
    hq, hk, d = p["num_qo_heads"], p["num_kv_heads"], p["head_dim"]
    split_q, split_kv = sum(p["qo_lens"][:n_long]), sum(p["kv_lens"][:n_long])
    calls = []
    for part in (slice(0, n_long), slice(n_long, None)):
        qo, kv = p["qo_lens"][part], p["kv_lens"][part]
        qs = q[:split_q] if part.start == 0 else q[split_q:]
        ks, vs = (k[:split_kv], v[:split_kv]) if part.start == 0 else (k[split_kv:], v[split_kv:])
        w = flashtile.BatchPrefillWithRaggedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.uint8, device=device()))
        w.plan(_indptr(qo, "cpu"), _indptr(kv, "cpu"), hq, hk, d, causal=p["causal"], q_data_type=q.dtype)
        calls.append(functools.partial(w.run, qs.contiguous(), ks.contiguous(), vs.contiguous()))
    return lambda: torch.cat([c() for c in calls])


def _flashtile_decode(case: Case):
    """Batch decode on the same paged cache (one query per request): the bandwidth reference of append."""
    import flashtile

    p = case.params
    if not p["page_size"] or max(p["qo_lens"]) > 8:
        raise Unavailable("append cases only")
    q, k, v = _ragged_inputs(case)
    indptr, indices, last, total = _paged_table(p["kv_lens"], p["page_size"], device())
    cache = _paged_cache(k, v, p["kv_lens"], p["page_size"], indices, total)
    del k, v
    qd = q[torch.tensor(p["qo_lens"], device=q.device).cumsum(0) - 1].contiguous()  # each request's last query
    w = flashtile.BatchDecodeWithPagedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.uint8, device=device()))
    w.plan(indptr.cpu(), indices.cpu(), last.cpu(), p["num_qo_heads"], p["num_kv_heads"], p["head_dim"],
           p["page_size"], q_data_type=q.dtype)
    run = functools.partial(w.run, qd, cache)
    return lambda: (run(), None)[1], "decode of each request's last query (output not compared)"


def _flashinfer(backend: str):
    def make(case: Case):
        flashinfer = import_flashinfer()
        p = case.params
        q, k, v = _ragged_inputs(case)
        ws = torch.empty(256 << 20, dtype=torch.uint8, device=device())
        qo_indptr = _indptr(p["qo_lens"], device())
        hq, hk, d = p["num_qo_heads"], p["num_kv_heads"], p["head_dim"]
        if p["page_size"]:
            indptr, indices, last, total = _paged_table(p["kv_lens"], p["page_size"], device())
            cache = _paged_cache(k, v, p["kv_lens"], p["page_size"], indices, total)
            w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=backend)
            w.plan(qo_indptr, indptr, indices, last, hq, hk, d, p["page_size"], causal=p["causal"],
                   q_data_type=q.dtype)
            return lambda: w.run(q, cache)
        w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend=backend)
        w.plan(qo_indptr, _indptr(p["kv_lens"], device()), hq, hk, d, v.shape[-1], causal=p["causal"],
               q_data_type=q.dtype)
        return lambda: w.run(q, k, v)

    return make


def _sdpa(backend_name: str):
    def make(case: Case):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        p = case.params
        if device().type != "cuda":
            raise Unavailable("timed on CUDA only")
        if len(set(p["qo_lens"])) != 1 or p["qo_lens"] != p["kv_lens"]:
            raise Unavailable("batched SDPA needs one length for every request (qo = kv)")
        q, k, v = _ragged_inputs(case)
        b, n = len(p["qo_lens"]), p["qo_lens"][0]
        q, k, v = (x.view(b, n, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v))
        gqa = p["num_qo_heads"] != p["num_kv_heads"]
        backend = getattr(SDPBackend, backend_name)

        def call():
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=p["causal"], enable_gqa=gqa)
            return o.transpose(1, 2).reshape(b * n, o.shape[1], o.shape[3])

        try:
            call()
        except RuntimeError as e:
            raise Unavailable(f"{backend_name}: {' '.join(str(e).split())[:160]}") from e
        return call

    return make


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
    return torch.compile(flex_attention, dynamic=False)


def _flex(case: Case):
    from torch.nn.attention.flex_attention import create_block_mask

    p = case.params
    if device().type != "cuda":
        raise Unavailable("timed on CUDA only")
    if p["qo_lens"] != p["kv_lens"] or p["page_size"] or p["head_dim"] > 128:
        raise Unavailable("ragged prefill cases (qo = kv, d <= 128) only")
    q, k, v = _ragged_inputs(case)
    doc = torch.repeat_interleave(torch.arange(len(p["qo_lens"]), device=q.device),
                                  torch.tensor(p["qo_lens"], device=q.device))

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    n = q.shape[0]
    # _compile: build the block mask without materializing the dense [n, n] mask (128 GiB at 128 x 1024).
    mask = create_block_mask(document_causal, None, None, n, n, device=q.device, _compile=True)
    q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    flex = _compiled_flex()
    gqa = p["num_qo_heads"] != p["num_kv_heads"]
    return lambda: flex(q4, k4, v4, block_mask=mask, enable_gqa=gqa)[0].transpose(0, 1)


PROVIDERS = [
    Provider("flashtile", _flashtile),
    Provider("flashtile_parts", _flashtile_parts),
    Provider("flashinfer", _flashinfer("fa2")),
    Provider("flashinfer_fa3", _flashinfer("fa3")),
    Provider("torch_sdpa_flash", _sdpa("FLASH_ATTENTION")),
    Provider("torch_sdpa_cudnn", _sdpa("CUDNN_ATTENTION")),
    Provider("flex_attention", _flex),
]

# ---------------------------------------------------------------------------------------------
# Tuning grids (--tune): the tile shape and launch of the batch-prefill kernel (the tuning hooks of
# flashtile/_core/tile_policy.py and kernels/batch_prefill.py), and two of its code switches
# ---------------------------------------------------------------------------------------------

TILE_SHAPE = Knob("flashtile._core.tile_policy", "prefill_tile_shape")
CONFIG = Knob("flashtile._core.tile_policy", "CONFIG_OVERRIDE")  # (block_n, warps, stages), launched as given
PREFETCH = Knob("flashtile.kernels.batch_prefill", "PREFETCH_OVERRIDE")
INT32_OFFSETS = Knob("flashtile.kernels.batch_prefill", "INT32_OFFSETS_OVERRIDE")
HOPPER_STAGES = Knob("flashtile.kernels.batch_prefill_hopper", "STAGES_OVERRIDE")  # the Hopper kernel's K/V ring
SHARED_MEMORY = 232448  # H100's per-block limit: settings whose K/V stages do not fit are left out


@dataclasses.dataclass(frozen=True)
class FixedTile:
    """Stands in for tile_policy.prefill_tile_shape: every plan gets this (BLOCK_M, BLOCK_N)."""

    block_m: int
    block_n: int

    def __call__(self, *args, **kwargs):
        return self.block_m, self.block_n

    def __repr__(self) -> str:
        return f"{self.block_m}x{self.block_n}"


def _tile_grid(case: Case):
    prefetches = (False, True) if case.params["page_size"] else (None,)
    settings = []
    for g in grid(bm=(64, 128), bn=(32, 64, 128), warps=(4, 8), stages=(2, 3, 4), prefetch=prefetches):
        if (g["bn"] * 128 * 2 * 2) * g["stages"] + g["bm"] * 128 * 2 > SHARED_MEMORY:
            continue
        settings.append({TILE_SHAPE: FixedTile(g["bm"], g["bn"]), CONFIG: (g["bn"], g["warps"], g["stages"]),
                         PREFETCH: g["prefetch"]})
    return settings


def _paged(case: Case) -> bool:
    return bool(case.params["page_size"])


BATCH_PREFILL_TUNES = {
    "tiles": Tune(_tile_grid, description="BLOCK_M x BLOCK_N x warps x stages (x page-id prefetch when paged)"),
    "prefetch": Tune(lambda case: [{PREFETCH: False}, {PREFETCH: True}], cases=_paged, rounds=3,
                     description="default configs, page-id prefetch off / on"),
    "offsets32": Tune(lambda case: [{INT32_OFFSETS: False}], cases=_paged, rounds=3,
                      description="default (int32 paged row offsets where they fit) against int64"),
    # d64 only: at d128 a third K/V stage does not fit beside the two Q buffers (kernels/batch_prefill_hopper.py)
    "hopper_stages": Tune(lambda case: [{HOPPER_STAGES: n} for n in (2, 3, 4)], rounds=3,
                          cases=lambda case: case.params["head_dim"] == 64,
                          description="the warp-specialized Hopper kernel's K/V ring depth, head dim 64"),
}

register(Suite("batch_prefill", prefill_cases, PROVIDERS, "tflops",
               "Batch prefill, causal, bf16: paged (page 16/1, random page order) and ragged; skewed batch "
               "against its parts run separately", tunes=BATCH_PREFILL_TUNES))
register(Suite("batch_append", append_cases,
               [Provider("flashtile", _flashtile), Provider("flashtile_decode", _flashtile_decode),
                Provider("flashinfer", _flashinfer("fa2"))], "gbps",
               "Append (speculative verification): 1-8 causal queries per request against a paged cache; "
               "bytes = K + V + q + o", ceiling=COPY_CEILING_GBPS, tunes=BATCH_PREFILL_TUNES))
