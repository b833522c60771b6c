"""Batch decode over a paged KV cache: suites ``batch_decode`` (the ANCHORS.md cases, fp8, page size 1,
skewed batches) and ``batch_decode_sweep`` (batch 1-512 x kv 512-16384, plotted against the copy
ceiling). GB/s counts the K/V bytes of the actual lengths plus q and o, each read or written once.

Every provider returns ``[batch, num_qo_heads, head_dim]``. flashtile and FlashInfer read one paged
cache (NHD, pages in random order); torch SDPA gets contiguous ``[B, H, L, D]`` copies (uniform
lengths only), made outside the timed region.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .harness import Case, Knob, Provider, Suite, Tune, Unavailable, device, grid, import_flashinfer, register

COPY_CEILING_GBPS = 3006.0  # H100 device-to-device copy, ANCHORS.md


def _zipf_lens(batch: int, mean: int, seed: int = 0) -> list:
    """Lengths drawn from a Zipf-like (power-law) distribution, rescaled to the given mean."""
    g = torch.Generator().manual_seed(seed)
    raw = (1.0 / torch.rand(batch, generator=g).clamp_min(1e-3)) ** (1 / 1.2)
    lens = (raw / raw.mean() * mean).round().clamp(1, 64 * mean).long()
    return lens.tolist()


def _case(name: str, lens: list, hq: int, hkv: int, d: int = 128, page_size: int = 16, dtype: str = "bfloat16",
          kv_dtype: str = None) -> Case:
    kv_dtype = kv_dtype or dtype
    es = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    kv_es = torch.empty((), dtype=getattr(torch, kv_dtype)).element_size()
    kv_bytes = 2 * sum(lens) * hkv * d * kv_es
    qo_bytes = 2 * len(lens) * hq * d * es
    params = dict(lens=lens, num_qo_heads=hq, num_kv_heads=hkv, head_dim=d, page_size=page_size, dtype=dtype,
                  kv_dtype=kv_dtype)
    flops = 4.0 * hq * d * sum(lens)
    return Case(name, params, flops=flops, bytes=float(kv_bytes + qo_bytes))


def batch_decode_cases(smoke: bool):
    if smoke:
        return [_case("4 x 64 h4/2 d64", [64] * 4, 4, 2, 64), _case("3 mixed p1", [1, 7, 40], 4, 4, 64, 1)]
    cases = [_case(f"{b} x {n} h32/{hk}", [n] * b, 32, hk) for b, n, hk in
             ((1, 32768, 8), (16, 4096, 8), (64, 4096, 8), (256, 2048, 8), (128, 8192, 8), (64, 4096, 32))]
    cases.append(_case("64 x 4096 h32/8 fp8e4m3", [4096] * 64, 32, 8, kv_dtype="float8_e4m3fn"))
    cases.append(_case("64 x 4096 h32/8 page1", [4096] * 64, 32, 8, page_size=1))
    cases.append(_case("64 x 4096 h32/8 page64", [4096] * 64, 32, 8, page_size=64))
    cases.append(_case("1x32768+63x512 h32/8", [32768] + [512] * 63, 32, 8))
    cases.append(_case("zipf 64 mean1024 h32/8", _zipf_lens(64, 1024), 32, 8))
    cases.append(_case("1 x 32768 h32/8 d64", [32768], 32, 8, d=64))
    cases.append(_case("64 x 2048 h32/8 d64", [2048] * 64, 32, 8, d=64))  # the demo's 1b model at full batch
    cases.append(_case("1 x 32768 h32/8 d256", [32768], 32, 8, d=256))
    return cases


def sweep_cases(smoke: bool):
    if smoke:
        return [_case("b2 kv64", [64] * 2, 4, 2, 64)]
    return [_case(f"b{b} kv{n}", [n] * b, 32, 8) for b in (1, 8, 64, 512) for n in (512, 2048, 8192, 16384)]


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _paged_inputs(case: Case):
    """q ``[B, Hq, D]``, a paged NHD cache with pages in random order, and its page table (int32, device)."""
    p = case.params
    dev = device()
    ps, hk, d = p["page_size"], p["num_kv_heads"], p["head_dim"]
    pages = [-(-n // ps) for n in p["lens"]]
    total = sum(pages)
    q = torch.randn(len(pages), p["num_qo_heads"], d, dtype=getattr(torch, p["dtype"]), device=dev)
    cache = torch.randn(total, 2, ps, hk, d, dtype=getattr(torch, p["dtype"]), device=dev)
    cache = cache.to(getattr(torch, p["kv_dtype"]))
    indices = torch.randperm(total, dtype=torch.int32, device=dev)
    indptr = torch.tensor([0] + torch.tensor(pages).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    last = torch.tensor([n - (k - 1) * ps for n, k in zip(p["lens"], pages)], dtype=torch.int32, device=dev)
    return q, cache, indptr, indices, last


def _flashtile(case: Case):
    import flashtile

    p = case.params
    q, cache, indptr, indices, last = _paged_inputs(case)
    ws = torch.empty(128 << 20, dtype=torch.uint8, device=device())
    w = flashtile.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
    w.plan(indptr.cpu(), indices.cpu(), last.cpu(), p["num_qo_heads"], p["num_kv_heads"], p["head_dim"],
           p["page_size"], q_data_type=q.dtype, kv_data_type=cache.dtype)
    out = torch.empty_like(q)
    note = f"{w._plan.num_programs} items, merge={w._plan.merge}"
    return (lambda: w.run(q, cache, out=out)), note


def _flashtile_graph(case: Case):
    """The wrapper in CUDA-graph mode (as engines capture decode): a fixed grid, and the split-KV merge launched
    whatever the plan."""
    import flashtile

    p = case.params
    q, cache, indptr, indices, last = _paged_inputs(case)
    ws = torch.empty(128 << 20, dtype=torch.uint8, device=device())
    w = flashtile.BatchDecodeWithPagedKVCacheWrapper(
        ws, "NHD", use_cuda_graph=True, paged_kv_indptr_buffer=torch.empty_like(indptr),
        paged_kv_indices_buffer=torch.empty_like(indices), paged_kv_last_page_len_buffer=torch.empty_like(last))
    w.plan(indptr.cpu(), indices, last.cpu(), p["num_qo_heads"], p["num_kv_heads"], p["head_dim"],
           p["page_size"], q_data_type=q.dtype, kv_data_type=cache.dtype)
    out = torch.empty_like(q)
    return (lambda: w.run(q, cache, out=out)), f"{w._plan.num_programs} programs (graph mode)"


def _flashinfer(use_tensor_cores: bool):
    def make(case: Case):
        flashinfer = import_flashinfer()
        p = case.params
        q, cache, indptr, indices, last = _paged_inputs(case)
        ws = torch.empty(128 << 20, dtype=torch.uint8, device=device())
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=use_tensor_cores)
        w.plan(indptr, indices, last, p["num_qo_heads"], p["num_kv_heads"], p["head_dim"], p["page_size"],
               q_data_type=q.dtype, kv_data_type=cache.dtype)
        return lambda: w.run(q, cache)

    return make


def _sdpa(backend_name: str):
    def make(case: Case):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        p = case.params
        if device().type != "cuda":
            raise Unavailable("timed on CUDA only")
        if len(set(p["lens"])) != 1 or p["kv_dtype"] != p["dtype"]:
            raise Unavailable("contiguous SDPA needs uniform lengths and half-precision KV")
        b, n = len(p["lens"]), p["lens"][0]
        kw = dict(dtype=getattr(torch, p["dtype"]), device=device())
        if b * n * p["num_qo_heads"] * p["head_dim"] * 2 * 2 > 24e9:
            raise Unavailable("contiguous K/V copies would not fit")
        q = torch.randn(b, p["num_qo_heads"], 1, p["head_dim"], **kw)
        k = torch.randn(b, p["num_kv_heads"], n, p["head_dim"], **kw)
        v = torch.randn_like(k)
        backend = getattr(SDPBackend, backend_name)
        gqa = p["num_qo_heads"] != p["num_kv_heads"]

        def call(k_, v_, enable_gqa):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k_, v_, enable_gqa=enable_gqa)[:, :, 0]

        note = None
        try:
            call(k, v, gqa)
        except RuntimeError as e:
            if not gqa:
                raise Unavailable(f"{backend_name}: {' '.join(str(e).split())[:160]}") from e
            g = p["num_qo_heads"] // p["num_kv_heads"]
            k, v = (x.repeat_interleave(g, dim=1) for x in (k, v))
            gqa, note = False, "GQA via repeat_interleave of K/V (reads 4x the bytes counted)"
            call(k, v, False)
        return (lambda: call(k, v, gqa)), note

    return make


PROVIDERS = [
    Provider("flashtile", _flashtile),
    Provider("flashinfer", _flashinfer(False)),
    Provider("flashinfer_tc", _flashinfer(True)),
    Provider("torch_sdpa_flash", _sdpa("FLASH_ATTENTION")),
    Provider("torch_sdpa_cudnn", _sdpa("CUDNN_ATTENTION")),
    Provider("flashtile_graph", _flashtile_graph),
]

TILE = Knob("flashtile._core.decode_tune", "BATCH_DECODE_OVERRIDE")
PER_SM = Knob("flashtile._core.decode_tune", "BATCH_PROGRAMS_PER_SM_OVERRIDE")


def _launch_grid(case: Case):
    """The paged decode kernel's tile for the case (flashtile/_core/decode_tune.py's DecodeTile): BLOCK_N x
    stages x page-id prefetch at 4 warps (the H100's), and 8 warps at BLOCK_N 128; at the card's programs-per-SM
    target. The winner per case is the
    table entry for the case's padded head dim (page size 1 and fp8 cases: the ``batch_decode_special``
    entries)."""
    from flashtile._core.decode_tune import DecodeTile

    tiles = [DecodeTile(g["bn"], 4, g["stages"], g["prefetch"])
             for g in grid(bn=(32, 64, 128), stages=(2, 3, 4), prefetch=(False, True))]
    tiles += [DecodeTile(128, 8, g["stages"], g["prefetch"]) for g in grid(stages=(2, 3, 4), prefetch=(False, True))]
    return [{TILE: tile} for tile in tiles]


def _tuned_case(case: Case) -> bool:
    """The grids run on the uniform page-16 16-bit cases (one per head dim and batch shape): 24 tiles x 3 head
    dims of compiles keep a sweep within a few minutes."""
    p = case.params
    return p["page_size"] == 16 and p["kv_dtype"] == p["dtype"] and len(set(p["lens"])) == 1


def _table_tile(case: Case):
    """The tile the card's table entry gives this case (flashtile/_core/decode_tune.py)."""
    from flashtile._core import decode_tune
    from flashtile._core.device import device_facts

    p = case.params
    d_pad = max(16, 1 << (p["head_dim"] - 1).bit_length())
    kv_bytes = torch.empty((), dtype=getattr(torch, p["kv_dtype"])).element_size()
    return decode_tune.batch_decode_tile(device_facts(device()), d_pad, p["page_size"], kv_bytes)


def _split_grid(case: Case):
    """The batch split planner's programs-per-SM target (1, 2, 4, 8), then the card's tile with 32-bit
    paged row offsets."""
    return ([{PER_SM: per_sm} for per_sm in (1, 2, 4, 8)]
            + [{TILE: _table_tile(case)._replace(int32_offsets=True)}])


register(Suite("batch_decode", batch_decode_cases, PROVIDERS, "gbps",
               "Batch decode over a paged cache (page 16, random page order), ANCHORS.md cases",
               ceiling=COPY_CEILING_GBPS,
               tunes={"launch": Tune(_launch_grid, cases=_tuned_case, cuda_graph="on",
                                     description="BLOCK_N x stages x page-id prefetch x warps (DecodeTile)"),
                      "splits": Tune(_split_grid, cases=_tuned_case, cuda_graph="on",
                                     description="batch programs per SM; 32-bit paged offsets (decode_tune)")}))
register(Suite("batch_decode_sweep", sweep_cases, PROVIDERS[:3], "gbps",
               "Batch decode sweep: batch 1-512 x kv 512-16384, 32/8 heads, d128, page 16",
               ceiling=COPY_CEILING_GBPS))

