"""BatchPrefillWith{Paged,Ragged}KVCacheWrapper: request-by-request against the float64 oracle on the
reference path, the interpreted kernels (CPU) and the GPU; masks; scheduling; plan/run checks;
CUDA-graph replay."""

import pytest
import torch

import flashtile
from attention_cases import make_paged_batch, scaled_copy, workspace
from conftest import HAS_CUDA
from flashtile._core import ops
from flashtile._core.checks import InvalidOptionError
from flashtile._core.graphs import capture_graph
from flashtile.prefill import BatchPrefillWithPagedKVCacheWrapper, BatchPrefillWithRaggedKVCacheWrapper
from flashtile.quantization import segment_packbits
from oracles import LSE_TOLERANCES, TOLERANCES, attention_oracle, paged_cache_f64, read_paged_kv_oracle

FP8 = getattr(torch, "float8_e4m3fn", None)
FP8_E5M2 = getattr(torch, "float8_e5m2", None)


def indptr_of(lens, offset=0):
    return torch.tensor([offset] + [offset + s for s in torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()],
                        dtype=torch.int32)


def make_ragged(qo_lens, kv_lens, hq, hk, d, dtype, device, *, dvo=None, kv_dtype=None, layout="NHD", kv_offset=0,
                scale=1.0):
    """q and ragged k/v (``kv_offset`` unused leading rows), with their int32 CPU indptrs."""
    dvo = dvo or d
    total_kv = kv_offset + sum(kv_lens)
    q = torch.randn(sum(qo_lens), hq, d, dtype=dtype, device=device)
    k = (torch.randn(total_kv, hk, d, device=device) * scale).to(kv_dtype or dtype)
    v = (torch.randn(total_kv, hk, dvo, device=device) * scale).to(kv_dtype or dtype)
    if layout == "HND":
        k, v = k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()
    return q, k, v, indptr_of(qo_lens), indptr_of(kv_lens, kv_offset)


def random_masks(qo_lens, kv_lens):
    return [torch.rand(a, b) > 0.4 for a, b in zip(qo_lens, kv_lens)]


def check_requests(out, lse, q, qo_indptr, kv_requests, *, masks=None, kv_scales=(1.0, 1.0), **kw):
    """Each request against the float64 oracle; ``kv_requests`` is a list of NHD ``(k, v)``."""
    atol, rtol = TOLERANCES[q.dtype]
    latol, lrtol = LSE_TOLERANCES[q.dtype]
    assert not out.isnan().any(), "output has NaN (unwritten element)"
    ip = qo_indptr.tolist()
    for r, (k, v) in enumerate(kv_requests):
        rows = slice(ip[r], ip[r + 1])
        mask = masks[r] if masks is not None else None
        ref_o, ref_lse = attention_oracle(q[rows], k, v, custom_mask=mask, k_scale=kv_scales[0], v_scale=kv_scales[1],
                                          **kw)
        torch.testing.assert_close(out[rows].double().cpu(), ref_o, atol=atol, rtol=rtol, msg=f"request {r}")
        got = lse[rows].double().cpu()
        assert torch.equal(torch.isinf(got), torch.isinf(ref_lse)), f"request {r}: empty rows must give -inf"
        finite = torch.isfinite(ref_lse)
        torch.testing.assert_close(got[finite], ref_lse[finite], atol=latol, rtol=lrtol, msg=f"request {r} lse")


def ragged_requests(k, v, kv_indptr, layout="NHD"):
    if layout == "HND":
        k, v = k.transpose(0, 1), v.transpose(0, 1)
    ip = kv_indptr.tolist()
    return [(k[ip[r]: ip[r + 1]], v[ip[r]: ip[r + 1]]) for r in range(len(ip) - 1)]


def paged_requests(cache, indptr, indices, last, layout="NHD"):
    k_pages, v_pages = paged_cache_f64(cache, layout)
    return read_paged_kv_oracle(k_pages, v_pages, indices, indptr, last)


if HAS_CUDA:
    # (qo_lens, kv_lens, heads (qo, kv), head_dim_qk, head_dim_vo)
    RAGGED = [
        ([1, 3, 17, 128, 1000], [1, 300, 17, 2000, 1000], (32, 8), 128, 128),
        ([17, 3, 1, 77], [5, 3, 290, 100], (12, 4), 64, 64),
        ([200, 1, 45], [200, 2500, 45], (16, 16), 192, 128),
        ([513, 8], [1024, 4096], (8, 1), 256, 256),
    ]
    PAGED = [
        ([1, 3, 17, 128, 1000], [1, 300, 17, 2000, 1000], 16, (32, 8), 128),
        ([5, 2, 33], [5, 299, 40], 1, (8, 2), 64),
        ([4, 9, 1], [300, 9, 77], 5, (6, 2), 40),
        # The Hopper kernel's gather mode (pages a TMA box cannot serve) at full 128-row tiles.
        ([1, 300, 129], [200, 300, 700], 1, (32, 8), 128),
        ([7, 300, 129], [300, 301, 700], 5, (16, 4), 128),
    ]
else:
    RAGGED = [
        ([1, 3, 17, 0, 9], [1, 30, 17, 4, 5], (4, 2), 16, 16),
        ([5, 3], [5, 70], (3, 1), 40, 40),
        ([6, 2], [9, 20], (2, 2), 48, 32),
    ]
    PAGED = [
        ([1, 3, 17, 2], [1, 30, 17, 0], 16, (4, 2), 16),
        ([5, 2], [5, 41], 1, (2, 2), 32),
        ([4, 9], [23, 9], 5, (6, 2), 16),
    ]


@pytest.mark.parametrize("qo_lens, kv_lens, heads, d, dvo", RAGGED)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_ragged_matches_oracle(path, device, qo_lens, kv_lens, heads, d, dvo, causal, layout):
    dtype = torch.bfloat16 if causal else torch.float16
    q, k, v, qo_indptr, kv_indptr = make_ragged(qo_lens, kv_lens, *heads, d, dtype, device, dvo=dvo, layout=layout,
                                                kv_offset=3)
    w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device), kv_layout=layout)
    w.plan(qo_indptr, kv_indptr, heads[0], heads[1], d, dvo, causal=causal, q_data_type=dtype)
    out, lse = w.run(q, k, v, return_lse=True)
    assert out.shape == (q.shape[0], heads[0], dvo) and out.dtype == dtype and lse.shape == q.shape[:2]
    check_requests(out, lse, q, qo_indptr, ragged_requests(k, v, kv_indptr, layout), causal=causal)
    q2, k2, v2 = torch.randn_like(q), scaled_copy(k), scaled_copy(v)  # a replay of the recorded launches
    out2, lse2 = w.run(q2, k2, v2, return_lse=True)
    check_requests(out2, lse2, q2, qo_indptr, ragged_requests(k2, v2, kv_indptr, layout), causal=causal)


@pytest.mark.parametrize("qo_lens, kv_lens, page_size, heads, d", PAGED)
@pytest.mark.parametrize("layout, form", [("NHD", "5d"), ("HND", "tuple")])
def test_paged_matches_oracle(path, device, qo_lens, kv_lens, page_size, heads, d, layout, form):
    dtype = torch.bfloat16 if page_size % 2 else torch.float16
    cache, indptr, indices, last = make_paged_batch(kv_lens, page_size, heads[1], d, dtype, device, layout=layout,
                                                    form=form, indptr_offset=2)
    q = torch.randn(sum(qo_lens), heads[0], d, dtype=dtype, device=device)
    qo_indptr = indptr_of(qo_lens)
    w = BatchPrefillWithPagedKVCacheWrapper(workspace(device), kv_layout=layout)
    w.plan(qo_indptr, indptr, indices, last, heads[0], heads[1], d, page_size, causal=True, q_data_type=dtype)
    out, lse = w.run(q, cache, return_lse=True)
    check_requests(out, lse, q, qo_indptr, paged_requests(cache, indptr, indices, last, layout), causal=True)
    # New inputs of the same shapes and strides: run() replays the launches it recorded (its memo).
    q2, cache2 = torch.randn_like(q), scaled_copy(cache)
    out2, lse2 = w.run(q2, cache2, return_lse=True)
    check_requests(out2, lse2, q2, qo_indptr, paged_requests(cache2, indptr, indices, last, layout), causal=True)


@pytest.mark.parametrize("table_on", ["host", "device", "mixed"])
def test_paged_request_without_pages_has_no_kv(path, device, table_on):
    """SGLang's extend plan passes last_page_len = 1 for requests without a cached prefix: they see no
    key (zero rows, lse -inf) and must not read another request's page."""
    qo_lens, kv_lens, page_size, dtype = [3, 2, 4], [0, 7, 0], 4, torch.float16
    cache, indptr, indices, last = make_paged_batch(kv_lens, page_size, 2, 16, dtype, device, indptr_offset=1)
    last = torch.ones_like(last).masked_scatter(indptr[1:] > indptr[:-1], last[indptr[1:] > indptr[:-1]])
    table = {"host": (indptr, indices, last), "device": (indptr.to(device), indices.to(device), last.to(device)),
             "mixed": (indptr, indices.to(device), last)}[table_on]
    q = torch.randn(sum(qo_lens), 4, 16, dtype=dtype, device=device)
    qo_indptr = indptr_of(qo_lens)
    w = BatchPrefillWithPagedKVCacheWrapper(workspace(device))
    w.plan(qo_indptr, *table, 4, 2, 16, page_size, causal=False, q_data_type=dtype)
    out, lse = w.run(q, cache, return_lse=True)
    assert torch.isneginf(lse[:3]).all() and torch.isneginf(lse[5:]).all()
    check_requests(out, lse, q, qo_indptr, paged_requests(cache, indptr, indices, last))


def test_plan_takes_flashinfer_06_positional_order(path, device):
    """Positional arguments after page_size in FlashInfer >= 0.6 order (o_data_type after kv_data_type)."""
    cache, indptr, indices, last = make_paged_batch([9, 20], 4, 2, 16, torch.float16, device)
    q = torch.randn(5, 4, 16, dtype=torch.float16, device=device)
    qo_indptr = indptr_of([2, 3])
    w = BatchPrefillWithPagedKVCacheWrapper(workspace(device))
    w.plan(qo_indptr, indptr, indices, last, 4, 2, 16, 4, None, None, None, True, "NONE", False, 0.3, -1, None,
           None, None, torch.float16, torch.float16, torch.float32, True)
    assert (w._causal, w._sm_scale, w._window_left, w._logits_soft_cap) == (True, 0.3, -1, 0.0)
    out, lse = w.run(q, cache, return_lse=True, kv_cache_sf=None)
    assert out.dtype == torch.float32
    check_requests(out.half(), lse, q, qo_indptr, paged_requests(cache, indptr, indices, last), causal=True,
                   sm_scale=0.3)
    with pytest.raises(NotImplementedError, match="kv_cache_sf"):
        w.run(q, cache, kv_cache_sf=torch.ones(1, device=device))
    ragged = BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    ragged.plan(qo_indptr, indptr_of([9, 20]), 4, 2, 16, None, None, None, False, "NONE", False, -1, None, 0.3,
                None, None, torch.float16, torch.float16, torch.float32, True)
    assert ragged._plan.o_dtype == torch.float32 and ragged._sm_scale == 0.3
    # TGI (FlashInfer <= 0.2.2 names) passes head_dim= for head_dim_qk.
    w.plan(qo_indptr, indptr, indices, last, num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=4,
           q_data_type=torch.float16)
    assert w._plan.head_dim_qk == 16
    with pytest.raises(TypeError, match="head_dim_qk"):
        ragged.plan(qo_indptr, indptr_of([9, 20]), 4, 2)
    with pytest.raises(ValueError, match="alias"):
        ragged.plan(qo_indptr, indptr_of([9, 20]), 4, 2, 16, head_dim=32)


def test_paged_head_dim_192_128(path, device):
    """DeepSeek's non-absorbed head dims through the paged wrapper (separate K and V pools)."""
    d, dvo = (192, 128) if HAS_CUDA else (48, 32)
    qo_lens, kv_lens = ([3, 130], [700, 130]) if HAS_CUDA else ([3, 6], [20, 6])
    cache, indptr, indices, last = make_paged_batch(kv_lens, 4, 2, d, torch.bfloat16, device, head_dim_vo=dvo)
    q = torch.randn(sum(qo_lens), 4, d, dtype=torch.bfloat16, device=device)
    w = BatchPrefillWithPagedKVCacheWrapper(workspace(device))
    w.plan(indptr_of(qo_lens), indptr, indices, last, 4, 2, d, 4, head_dim_vo=dvo, causal=True,
           q_data_type=torch.bfloat16)
    out, lse = w.run(q, cache, return_lse=True)
    assert out.shape[-1] == dvo
    check_requests(out, lse, q, indptr_of(qo_lens), paged_requests(cache, indptr, indices, last), causal=True)


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("int32_offsets", [True, False])
def test_paged_row_offset_widths(device, monkeypatch, page_size, int32_offsets):
    """Paged K/V row offsets are computed in int32 where every offset of the cache fits, else in int64
    (forced here: a cache of 2^31 elements is too big for a test); both forms, with and without the
    page-id prefetch (page size 16 / 1), match the oracle."""
    import flashtile.kernels.batch_prefill as kernels

    monkeypatch.setenv("FLASHTILE_BACKEND", "triton")
    monkeypatch.setattr(kernels, "INT32_OFFSETS_OVERRIDE", None if int32_offsets else False)
    qo_lens, kv_lens = ([37, 1, 200], [300, 17, 200]) if HAS_CUDA else ([5, 1, 9], [30, 17, 9])
    cache, indptr, indices, last = make_paged_batch(kv_lens, page_size, 2, 64, torch.bfloat16, device)
    q = torch.randn(sum(qo_lens), 8, 64, dtype=torch.bfloat16, device=device)
    w = BatchPrefillWithPagedKVCacheWrapper(workspace(device))
    w.plan(indptr_of(qo_lens), indptr, indices, last, 8, 2, 64, page_size, causal=True, q_data_type=torch.bfloat16)
    out, lse = w.run(q, cache, return_lse=True)
    check_requests(out, lse, q, indptr_of(qo_lens), paged_requests(cache, indptr, indices, last), causal=True)


def test_int32_page_offsets_only_where_they_fit():
    from flashtile._core.intmath import offsets_fit_int32

    def fits(x):
        return offsets_fit_int32(x.shape, x.stride())

    small = torch.empty(64, 2, 16, 8, 128, device="meta")[:, 0]
    big = torch.empty(2**17, 2, 16, 8, 128, device="meta")[:, 1]  # spans 2^32 elements
    assert fits(small) and not fits(big)
    # Largest offset: (pages - 1) * 2^15 + 2^14 - 1, so 2^16 pages fit and one more does not.
    assert fits(big[: 2**16]) and not fits(big[: 2**16 + 1])


FEATURES = [
    dict(pos_encoding_mode="ROPE_LLAMA", rope_theta=500.0, rope_scale=2.0),
    dict(pos_encoding_mode="ALIBI"),
    dict(logits_soft_cap=5.0),
    dict(window_left=7),
    dict(window_left=0),
    dict(sm_scale=0.3),
    dict(window_left=11, logits_soft_cap=30.0, pos_encoding_mode="ROPE_LLAMA"),
]


@pytest.mark.parametrize("features", FEATURES, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("causal", [True, False])
def test_ragged_features(path, device, features, causal):
    qo_lens, kv_lens = ([1, 7, 20, 3], [40, 7, 33, 0]) if not HAS_CUDA else ([1, 7, 200, 3], [4000, 7, 333, 0])
    q, k, v, qo_indptr, kv_indptr = make_ragged(qo_lens, kv_lens, 4, 2, 32, torch.float16, device)
    w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    w.plan(qo_indptr, kv_indptr, 4, 2, 32, causal=causal, **features)
    out, lse = w.run(q, k, v, return_lse=True)
    check_requests(out, lse, q, qo_indptr, ragged_requests(k, v, kv_indptr), causal=causal, **features)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kind", ["ragged", "paged"])
def test_custom_mask_flat_and_packed(path, device, packed, kind):
    """Per-request masks, flattened and concatenated (or packed by segment_packbits); causal is ignored."""
    qo_lens, kv_lens = (([3, 1, 9, 0, 5], [7, 13, 9, 4, 21]) if not HAS_CUDA
                        else ([3, 1, 90, 0, 57], [7, 13, 900, 4, 300]))
    masks = random_masks(qo_lens, kv_lens)
    flat = torch.cat([m.reshape(-1) for m in masks])
    mask_kw = dict(custom_mask=flat.to(device))
    if packed:
        bit_indptr = indptr_of([a * b for a, b in zip(qo_lens, kv_lens)])
        mask_kw = dict(packed_custom_mask=segment_packbits(flat, bit_indptr, bitorder="little")[0].to(device))
    if kind == "ragged":
        q, k, v, qo_indptr, kv_indptr = make_ragged(qo_lens, kv_lens, 4, 2, 16, torch.float16, device)
        w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
        w.plan(qo_indptr, kv_indptr, 4, 2, 16, causal=True, **mask_kw)
        out, lse = w.run(q, k, v, return_lse=True)
        requests = ragged_requests(k, v, kv_indptr)
    else:
        cache, indptr, indices, last = make_paged_batch(kv_lens, 3, 2, 16, torch.float16, device)
        q = torch.randn(sum(qo_lens), 4, 16, dtype=torch.float16, device=device)
        qo_indptr = indptr_of(qo_lens)
        w = BatchPrefillWithPagedKVCacheWrapper(workspace(device))
        w.plan(qo_indptr, indptr, indices, last, 4, 2, 16, 3, causal=True, **mask_kw)
        out, lse = w.run(q, cache, return_lse=True)
        requests = paged_requests(cache, indptr, indices, last)
    assert not w._causal
    check_requests(out, lse, q, qo_indptr, requests, masks=masks)


def test_custom_mask_with_window(path, device):
    qo_lens, kv_lens = [4, 6], [10, 6]
    masks = random_masks(qo_lens, kv_lens)
    q, k, v, qo_indptr, kv_indptr = make_ragged(qo_lens, kv_lens, 2, 1, 16, torch.float16, device)
    w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    w.plan(qo_indptr, kv_indptr, 2, 1, 16, custom_mask=torch.cat([m.reshape(-1) for m in masks]).to(device),
           window_left=3)
    out, lse = w.run(q, k, v, return_lse=True)
    check_requests(out, lse, q, qo_indptr, ragged_requests(k, v, kv_indptr), masks=masks, window_left=3)


def test_more_queries_than_keys_gives_empty_rows(path, device):
    """Causal with qo_len > kv_len: the first qo_len - kv_len rows see nothing (0 and -inf)."""
    qo_lens, kv_lens = [9, 4, 3], [3, 0, 3]
    q, k, v, qo_indptr, kv_indptr = make_ragged(qo_lens, kv_lens, 4, 2, 16, torch.float16, device)
    w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    w.plan(qo_indptr, kv_indptr, 4, 2, 16, causal=True)
    out, lse = w.run(q, k, v, return_lse=True)
    check_requests(out, lse, q, qo_indptr, ragged_requests(k, v, kv_indptr), causal=True)
    empty = list(range(0, 6)) + list(range(9, 13))
    assert torch.all(out[empty] == 0) and torch.all(lse[empty] == float("-inf"))


@pytest.mark.skipif(FP8 is None, reason="torch without float8")
@pytest.mark.parametrize("kv_name", ["e4m3", "e5m2"])
def test_fp8_kv(path, device, kv_name):
    kv_dtype = FP8 if kv_name == "e4m3" else FP8_E5M2
    qo_lens, kv_lens = ([3, 8], [40, 17]) if not HAS_CUDA else ([3, 80, 1], [400, 1700, 64])
    cache, indptr, indices, last = make_paged_batch(kv_lens, 8, 2, 32, kv_dtype, device, scale=2.0)
    q = torch.randn(sum(qo_lens), 4, 32, dtype=torch.bfloat16, device=device)
    w = BatchPrefillWithPagedKVCacheWrapper(workspace(device))
    w.plan(indptr_of(qo_lens), indptr, indices, last, 4, 2, 32, 8, causal=True, q_data_type=torch.bfloat16,
           kv_data_type=kv_dtype)
    out, lse = w.run(q, cache, k_scale=0.5, v_scale=1.5, return_lse=True)
    check_requests(out, lse, q, indptr_of(qo_lens), paged_requests(cache, indptr, indices, last), causal=True,
                   kv_scales=(0.5, 1.5))
    # The ragged wrapper takes fp8 K/V with the same scales.
    k_r = torch.randn(sum(kv_lens), 2, 32, device=device).mul(2).to(kv_dtype)
    v_r = torch.randn(sum(kv_lens), 2, 32, device=device).mul(2).to(kv_dtype)
    wr = BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    wr.plan(indptr_of(qo_lens), indptr_of(kv_lens), 4, 2, 32, causal=True, q_data_type=torch.bfloat16,
            kv_data_type=kv_dtype)
    out, lse = wr.run(q, k_r, v_r, k_scale=0.5, v_scale=1.5, return_lse=True)
    check_requests(out, lse, q, indptr_of(qo_lens), ragged_requests(k_r, v_r, indptr_of(kv_lens)), causal=True,
                   kv_scales=(0.5, 1.5))


# ------------------------------------------------------------------------------------------------
# Scheduling: long KV ranges are split and merged; determinism knobs
# ------------------------------------------------------------------------------------------------


def test_long_append_is_split_and_merged(path, device):
    """Few tiles over a long cache (chunked prefill): tiles are cut along KV and merged."""
    qo_lens, kv_lens = ([5, 2], [300, 2]) if not HAS_CUDA else ([64, 2], [60000, 2])
    q, k, v, qo_indptr, kv_indptr = make_ragged(qo_lens, kv_lens, 4, 2, 32, torch.float16, device)
    w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    w.plan(qo_indptr, kv_indptr, 4, 2, 32, causal=True)
    if path == "kernel":
        assert w._plan.num_merges > 0 and w._plan.num_items > 2
    out, lse = w.run(q, k, v, return_lse=True)
    check_requests(out, lse, q, qo_indptr, ragged_requests(k, v, kv_indptr), causal=True)


def test_fixed_split_size_is_batch_invariant(path, device):
    qo_lens, kv_lens = ([4, 1, 7], [150, 3, 90]) if not HAS_CUDA else ([40, 1, 7], [15000, 3, 900])
    q, k, v, qo_indptr, kv_indptr = make_ragged(qo_lens, kv_lens, 4, 2, 32, torch.bfloat16, device)
    w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    w.plan(qo_indptr, kv_indptr, 4, 2, 32, causal=True, q_data_type=torch.bfloat16, fixed_split_size=32)
    full = w.run(q, k, v)
    ip, kp = qo_indptr.tolist(), kv_indptr.tolist()
    for r in (0, 2):
        w.plan(indptr_of([qo_lens[r]]), indptr_of([kv_lens[r]]), 4, 2, 32, causal=True, q_data_type=torch.bfloat16,
               fixed_split_size=32)
        alone = w.run(q[ip[r]: ip[r + 1]].contiguous(), k[kp[r]: kp[r + 1]], v[kp[r]: kp[r + 1]])
        assert torch.equal(alone, full[ip[r]: ip[r + 1]]), f"request {r} changed bits with the batch around it"


def test_disable_split_kv(path, device):
    qo_lens, kv_lens = ([5, 2], [300, 2]) if not HAS_CUDA else ([64, 2], [60000, 2])
    q, k, v, qo_indptr, kv_indptr = make_ragged(qo_lens, kv_lens, 4, 2, 32, torch.float16, device)
    w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    w.plan(qo_indptr, kv_indptr, 4, 2, 32, causal=True, disable_split_kv=True)
    assert w._plan.num_merges == 0
    out, lse = w.run(q, k, v, return_lse=True)
    check_requests(out, lse, q, qo_indptr, ragged_requests(k, v, kv_indptr), causal=True)


def test_small_workspace_splits_less(path, device):
    """A workspace too small for the partial states makes plan() use longer chunks, not fail."""
    qo_lens, kv_lens = ([5, 2], [300, 2]) if not HAS_CUDA else ([64, 2], [60000, 2])
    q, k, v, qo_indptr, kv_indptr = make_ragged(qo_lens, kv_lens, 4, 2, 32, torch.float16, device)
    w = BatchPrefillWithRaggedKVCacheWrapper(torch.empty(64, dtype=torch.uint8, device=device))
    w.plan(qo_indptr, kv_indptr, 4, 2, 32, causal=True)
    assert w._plan.num_merges == 0
    out, lse = w.run(q, k, v, return_lse=True)
    check_requests(out, lse, q, qo_indptr, ragged_requests(k, v, kv_indptr), causal=True)


def test_skewed_batch(path, device):
    """One long prompt among many short ones (the scheduler's longest-first case). The long one is
    not first in the batch, and its item count does not divide the batch's, so the kernel's last
    head-major launch group is a partial one; every (item, head) must still be written once."""
    if HAS_CUDA:
        qo_lens = [128] * 10 + [4096] + [128] * 20
    else:
        qo_lens = [3] * 2 + [40] + [3] * 4
    q, k, v, qo_indptr, kv_indptr = make_ragged(qo_lens, qo_lens, 8, 2, 64, torch.bfloat16, device)
    w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    w.plan(qo_indptr, kv_indptr, 8, 2, 64, causal=True, q_data_type=torch.bfloat16)
    num_items, _, group_items = w._plan.meta[:3].tolist()
    assert num_items % group_items != 0
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), dtype=torch.float32, device=device)
    w.run(q, k, v, out=out, lse=lse, return_lse=True)
    check_requests(out, lse, q, qo_indptr, ragged_requests(k, v, kv_indptr), causal=True)


# ------------------------------------------------------------------------------------------------
# Aliases, buffers, deprecated forms
# ------------------------------------------------------------------------------------------------


def test_out_lse_buffers_aliases_and_forward(path, device):
    qo_lens, kv_lens = [3, 5], [9, 5]
    q, k, v, qo_indptr, kv_indptr = make_ragged(qo_lens, kv_lens, 4, 2, 16, torch.float16, device)
    w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    w.begin_forward(qo_indptr, kv_indptr, 4, 2, 16, None, None, None, True)
    out = torch.full((8, 4, 16), float("nan"), dtype=torch.float16, device=device)
    lse = torch.full((8, 4), float("nan"), dtype=torch.float32, device=device)
    got_o, got_lse = w.run(q, k, v, out=out, lse=lse, return_lse=True)
    assert got_o is out and got_lse is lse
    check_requests(out, lse, q, qo_indptr, ragged_requests(k, v, kv_indptr), causal=True)
    assert w._causal and w._window_left == -1 and w._sm_scale == pytest.approx(0.25)
    o2, lse2 = w.run_return_lse(q, k, v)
    torch.testing.assert_close(lse2, lse)
    # Deprecated forward(): its parameters replace the planned ones (causal defaults to False).
    o3 = w.forward(q, k, v)
    check_requests(o3, w.forward_return_lse(q, k, v)[1], q, qo_indptr, ragged_requests(k, v, kv_indptr))
    o4, _ = w.forward_return_lse(q, k, v, causal=True, logits_soft_cap=4.0)
    check_requests(o4, _, q, qo_indptr, ragged_requests(k, v, kv_indptr), causal=True, logits_soft_cap=4.0)
    w.end_forward()


def test_paged_forward_and_device_index_arrays(path, device):
    qo_lens, kv_lens = [2, 6], [11, 6]
    cache, indptr, indices, last = make_paged_batch(kv_lens, 4, 2, 16, torch.float16, device)
    q = torch.randn(8, 4, 16, dtype=torch.float16, device=device)
    qo_indptr = indptr_of(qo_lens)
    w = BatchPrefillWithPagedKVCacheWrapper(workspace(device))
    w.plan(qo_indptr.to(device), indptr.to(device), indices.to(device), last.to(device), 4, 2, 16, 4, causal=True)
    out, lse = w.run(q, cache, return_lse=True)
    check_requests(out, lse, q, qo_indptr, paged_requests(cache, indptr, indices, last), causal=True)
    out2, lse2 = w.forward_return_lse(q, cache, causal=True, k_scale=0.5)
    check_requests(out2, lse2, q, qo_indptr, paged_requests(cache, indptr, indices, last), causal=True,
                   kv_scales=(0.5, 1.0))


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def _ragged_planned(device, **kw):
    q, k, v, qo_indptr, kv_indptr = make_ragged([3, 5], [9, 5], 4, 2, 16, torch.float16, device)
    w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device, 1))
    w.plan(qo_indptr, kv_indptr, 4, 2, 16, causal=True, **kw)
    return w, q, k, v


def test_run_before_plan_raises(device):
    w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device, 1))
    z = torch.zeros(1, 4, 16, dtype=torch.float16, device=device)
    with pytest.raises(RuntimeError, match="before plan"):
        w.run(z, z, z)


@pytest.mark.parametrize("change, error, match", [
    (lambda q, k, v: (q.to(torch.bfloat16), k, v), ValueError, "q_data_type"),
    (lambda q, k, v: (q, k.to(torch.bfloat16), v), ValueError, "kv_data_type"),
    (lambda q, k, v: (q[:7], k, v), ValueError, "rows"),
    (lambda q, k, v: (q[:, :2], k, v), ValueError, "num_qo_heads"),
    (lambda q, k, v: (q, k[:10], v), ValueError, "kv_indptr"),
    (lambda q, k, v: (q, k[:, :1], v), ValueError, "heads"),
    (lambda q, k, v: (q, k, v[..., :8]), ValueError, "heads"),
    (lambda q, k, v: (q, k[0], v), ValueError, "3-D"),
])
def test_ragged_run_checks_inputs(device, change, error, match):
    w, q, k, v = _ragged_planned(device)
    with pytest.raises(error, match=match):
        w.run(*change(q, k, v))


def test_run_rejects_bad_out_and_options(device):
    w, q, k, v = _ragged_planned(device)
    with pytest.raises(ValueError, match="Invalid shape of out"):
        w.run(q, k, v, out=torch.empty(8, 4, 8, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="Invalid dtype of lse"):
        w.run(q, k, v, lse=torch.empty(8, 4, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="window_left"):
        w.run(q, k, v, window_left=5)
    with pytest.raises(ValueError, match="sinks"):
        w.run(q, k, v, sinks=torch.zeros(3, device=device))
    with pytest.raises(ValueError, match="extra positional"):
        w.run(q, k, v, "extra")


@pytest.mark.parametrize("qo, kv, kwargs, error, match", [
    ([0, 3, 2], [0, 4, 8], {}, ValueError, "non-decreasing"),
    ([1, 3, 5], [0, 4, 8], {}, ValueError, "start at 0"),
    ([0, 3], [0, 4, 8], {}, ValueError, "as many entries"),
    ([0, 3, 5], [0, 9, 8], {}, ValueError, "non-decreasing"),
    ([0, 3, 5], [0, 4, 8], dict(custom_mask=torch.ones(19, dtype=torch.bool)), ValueError, "custom_mask"),
    ([0, 3, 5], [0, 4, 8], dict(packed_custom_mask=torch.ones(4, dtype=torch.uint8)), ValueError, "expected 3 bytes"),
    ([0, 3, 5], [0, 4, 8], dict(num_qo_heads=6, num_kv_heads=4), ValueError, "multiple"),
    ([0, 3, 5], [0, 4, 8], dict(head_dim_qk=20), NotImplementedError, "head_dim_qk"),
    ([0, 3, 5], [0, 4, 8], dict(head_dim_vo=12), NotImplementedError, "head_dim_vo"),
    ([0, 3, 5], [0, 4, 8], dict(head_dim_qk=0), ValueError, "head_dim_qk: expected"),
    ([0, 3, 5], [0, 4, 8], dict(head_dim_vo="x"), ValueError, "head_dim_vo: expected"),
    ([0, 3, 5], [0, 4, 8], dict(pos_encoding_mode="ROPE"), InvalidOptionError, "pos_encoding_mode"),
    ([0, 3, 5], [0, 4, 8], dict(window_left=-3), ValueError, "window_left"),
    ([0, 3, 5], [0, 4, 8], dict(q_data_type=torch.float32), TypeError, "q_data_type"),
    ([0, 3, 5], [0, 4, 8], dict(kv_data_type=torch.bfloat16), TypeError, "kv_data_type"),
    ([0, 3, 5], [0, 4, 8], dict(o_data_type=torch.int8), TypeError, "o_data_type"),
    ([0, 3, 5], [0, 4, 8], dict(fixed_split_size=0), ValueError, "fixed_split_size"),
    ([0, 3, 5], [0, 4, 8], dict(prefix_len_ptr=torch.zeros(2, dtype=torch.int32)), ValueError, "token_pos_in_items"),
    ([0, 3, 5], [0, 4, 8], dict(bogus=1), TypeError, "bogus"),
])
def test_ragged_plan_errors(device, qo, kv, kwargs, error, match):
    args = dict(num_qo_heads=4, num_kv_heads=2, head_dim_qk=16)
    args.update(kwargs)
    w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device, 1))
    with pytest.raises(error, match=match):
        w.plan(torch.tensor(qo, dtype=torch.int32), torch.tensor(kv, dtype=torch.int32), **args)


def test_paged_plan_and_run_errors(device):
    cache, indptr, indices, last = make_paged_batch([5, 9], 4, 2, 16, torch.float16, device, spare_pages=0)
    w = BatchPrefillWithPagedKVCacheWrapper(workspace(device, 1))
    with pytest.raises(ValueError, match="batch_size \\+ 1"):
        w.plan(indptr_of([1, 1, 1]), indptr, indices, last, 4, 2, 16, 4)
    with pytest.raises(ValueError, match="last_page_len"):
        w.plan(indptr_of([1, 1]), indptr, indices, torch.tensor([5, 1], dtype=torch.int32), 4, 2, 16, 4)
    with pytest.raises(ValueError, match="custom_mask"):
        w.plan(indptr_of([1, 1]), indptr, indices, last, 4, 2, 16, 4, custom_mask=torch.ones(5, dtype=torch.bool))
    bad = indices.clone()
    bad[-1] = 99
    w.plan(indptr_of([1, 1]), indptr, bad, last, 4, 2, 16, 4)
    q = torch.randn(2, 4, 16, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="page 99"):
        w.run(q, cache)
    w.plan(indptr_of([1, 1]), indptr, indices, last, 4, 2, 16, 4)
    with pytest.raises(ValueError, match="page_size"):
        w.run(q, cache[:, :, :2])
    with pytest.raises(ValueError, match="kv_data_type"):
        w.run(q, cache.to(torch.bfloat16))
    with pytest.raises(NotImplementedError, match="C\\+\\+"):
        BatchPrefillWithPagedKVCacheWrapper(workspace(device, 1), jit_args=("u", None, None, None, None, 64, 64, [], [],
                                                                           [], [], "v", "struct V {};"))
    with pytest.raises(NotImplementedError, match="vendor"):
        BatchPrefillWithPagedKVCacheWrapper(workspace(device, 1), backend="cudnn")
    with pytest.raises(InvalidOptionError):
        BatchPrefillWithPagedKVCacheWrapper(workspace(device, 1), kv_layout="NDH")


def _graph_paged(device, b, max_pages=64, mask_bytes=None):
    bufs = dict(qo_indptr_buf=torch.zeros(b + 1, dtype=torch.int32, device=device),
                paged_kv_indptr_buf=torch.zeros(b + 1, dtype=torch.int32, device=device),
                paged_kv_indices_buf=torch.zeros(max_pages, dtype=torch.int32, device=device),
                paged_kv_last_page_len_buf=torch.zeros(b, dtype=torch.int32, device=device))
    if mask_bytes:
        bufs.update(custom_mask_buf=torch.zeros(mask_bytes, dtype=torch.uint8, device=device),
                    mask_indptr_buf=torch.zeros(b + 1, dtype=torch.int32, device=device))
    return BatchPrefillWithPagedKVCacheWrapper(workspace(device), use_cuda_graph=True, **bufs), bufs


def test_graph_mode_errors(device):
    with pytest.raises(ValueError, match="cudagraph"):
        BatchPrefillWithPagedKVCacheWrapper(workspace(device, 1), use_cuda_graph=True)
    with pytest.raises(ValueError, match="cudagraph"):
        BatchPrefillWithRaggedKVCacheWrapper(workspace(device, 1), use_cuda_graph=True,
                                             qo_indptr_buf=torch.zeros(3, dtype=torch.int32, device=device))
    w, _ = _graph_paged(device, 2)
    cache, indptr, indices, last = make_paged_batch([5, 9, 3], 4, 2, 16, torch.float16, device)
    with pytest.raises(ValueError, match="batch size should be fixed"):
        w.plan(indptr_of([1, 1, 1]), indptr, indices, last, 4, 2, 16, 4)
    cache, indptr, indices, last = make_paged_batch([5, 9], 4, 2, 16, torch.float16, device)
    w.plan(indptr_of([2, 3]), indptr, indices, last, 4, 2, 16, 4, causal=True)
    with pytest.raises(ValueError, match="total number of rows"):
        w.plan(indptr_of([3, 3]), indptr, indices, last, 4, 2, 16, 4, causal=True)
    with pytest.raises(ValueError, match="custom_mask_buf"):
        w.plan(indptr_of([2, 3]), indptr, indices, last, 4, 2, 16, 4, custom_mask=torch.ones(37, dtype=torch.bool))
    w_small, _ = _graph_paged(device, 2, max_pages=3)
    with pytest.raises(ValueError, match="less than or equal to the allocated buffer"):
        w_small.plan(indptr_of([2, 3]), indptr, indices, last, 4, 2, 16, 4)


def test_graph_mode_replans_into_its_buffers(path, device):
    """Graph mode: plan() writes the constructor's buffers and fixed-size work lists; results match
    after re-plans with other lengths (q may have more rows than the plan)."""
    b = 3
    w, bufs = _graph_paged(device, b, mask_bytes=256)
    q = torch.randn(16, 4, 16, dtype=torch.float16, device=device)
    first_meta = None
    for qo_lens, kv_lens, masked in (([2, 8, 6], [9, 8, 40], False), ([1, 1, 3], [70, 2, 5], True),
                                     ([5, 0, 4], [5, 3, 30], False)):
        cache, indptr, indices, last = make_paged_batch(kv_lens, 4, 2, 16, torch.float16, device, indptr_offset=1)
        masks = random_masks(qo_lens, kv_lens) if masked else None
        kw = dict(custom_mask=torch.cat([m.reshape(-1) for m in masks]).to(device)) if masked else {}
        w.plan(indptr_of(qo_lens), indptr, indices, last, 4, 2, 16, 4, causal=True, **kw)
        assert w._plan.page_indices.data_ptr() == bufs["paged_kv_indices_buf"].data_ptr()
        if first_meta is None:
            first_meta = (w._plan.meta.data_ptr(), w._plan.meta.numel(), w._plan.num_items)
        assert (w._plan.meta.data_ptr(), w._plan.meta.numel(), w._plan.num_items) == first_meta
        out, lse = w.run(q, cache, return_lse=True)
        total = sum(qo_lens)
        check_requests(out[:total], lse[:total], q[:total], indptr_of(qo_lens),
                       paged_requests(cache, indptr, indices, last), masks=masks, causal=not masked)


def test_opcheck_batch_prefill(path, device):
    q, k, v, qo_indptr, kv_indptr = make_ragged([3, 5], [30, 5], 4, 2, 16, torch.float16, device)
    w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    w.plan(qo_indptr, kv_indptr, 4, 2, 16, causal=True, fixed_split_size=16)
    p = w._plan
    args = (q, k, v, None, None, None, None, p.meta, p.part_o.clone(), p.part_lse.clone(),
            torch.empty(8, 4, 16, dtype=torch.float16, device=device), torch.empty(8, 4, device=device), p.batch_size,
            p.item_capacity, p.block_m, p.block_n, p.num_items, p.num_merges, 0.25, True, 0.0, -1, "NONE", 1.0, 1e4,
            1.0, "auto")
    torch.library.opcheck(ops.batch_prefill, args)


def test_torch_compile_run(path, device):
    q, k, v, qo_indptr, kv_indptr = make_ragged([3, 5], [30, 5], 4, 2, 16, torch.float16, device)
    w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    w.plan(qo_indptr, kv_indptr, 4, 2, 16, causal=True)

    def step(q, k, v):
        return w.run(q, k, v).float() * 2

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if HAS_CUDA else "aot_eager")
    torch.testing.assert_close(compiled(q, k, v), step(q, k, v))


def test_import_surface():
    assert flashtile.BatchPrefillWithPagedKVCacheWrapper is BatchPrefillWithPagedKVCacheWrapper
    assert flashtile.prefill.BatchPrefillWithRaggedKVCacheWrapper is BatchPrefillWithRaggedKVCacheWrapper


# ------------------------------------------------------------------------------------------------
# CUDA graphs on the GPU: capture, re-plan with other lengths and page tables, replay
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16])
def test_cuda_graph_capture_replan_replay(page_size):
    """Append-sized batches (1-8 query tokens per request) against long caches, as speculative decoding."""
    device = torch.device("cuda")
    b, hq, hk, d = 8, 32, 8, 128
    max_pages = 40000 // page_size + 64
    w, bufs = _graph_paged(device, b, max_pages=max_pages * 2)
    pool = torch.randn(max_pages * 2, 2, page_size, hk, d, dtype=torch.bfloat16, device=device)
    q = torch.randn(8 * b, hq, d, dtype=torch.bfloat16, device=device)
    out = torch.empty(8 * b, hq, d, dtype=torch.bfloat16, device=device)
    lse = torch.empty(8 * b, hq, dtype=torch.float32, device=device)

    def table(lens):
        pages = [-(-n // page_size) for n in lens]
        perm = torch.randperm(pool.shape[0], dtype=torch.int32)[: sum(pages)]
        last = torch.tensor([n - (p - 1) * page_size if p else 0 for n, p in zip(lens, pages)], dtype=torch.int32)
        return indptr_of(pages), perm, last

    qo_first = [8] * b
    first = table([100, 8, 2000, 9, 35000, 17, 512, 4096])
    w.plan(indptr_of(qo_first), *first, hq, hk, d, page_size, causal=True, q_data_type=torch.bfloat16)
    graph, _ = capture_graph(lambda: w.run(q, pool, out=out, lse=lse), warmup=2)
    for qo_lens, kv_lens in (([1, 2, 3, 4, 5, 6, 7, 8], [3000, 30000, 2, 4, 5, 17, 9000, 64]),
                             ([1] * 8, [1] * 8), ([4] * 8, [38000] + [4] * 7)):
        tbl = table(kv_lens)
        w.plan(indptr_of(qo_lens), *tbl, hq, hk, d, page_size, causal=True, q_data_type=torch.bfloat16)
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        total = sum(qo_lens)
        check_requests(out[:total], lse[:total], q[:total], indptr_of(qo_lens), paged_requests(pool, *tbl),
                       causal=True)


def test_rows_outside_the_request_never_leak_in(path, device):
    """K/V rows past a request's keys (the next request's, NaN-filled spare rows at the end) are never
    used."""
    qo_lens, kv_lens = ([3, 5, 2], [9, 21, 30]) if not HAS_CUDA else ([3, 50, 2], [90, 210, 3000])
    q, k, v, qo_indptr, kv_indptr = make_ragged(qo_lens, kv_lens, 4, 2, 32, torch.float16, device)
    spare = torch.full((40, 2, 32), float("nan"), dtype=torch.float16, device=device)
    k, v = torch.cat([k, spare]), torch.cat([v, spare])
    w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    for causal in (True, False):
        w.plan(qo_indptr, kv_indptr, 4, 2, 32, causal=causal)
        out, lse = w.run(q, k, v, return_lse=True)
        check_requests(out, lse, q, qo_indptr, ragged_requests(k, v, kv_indptr), causal=causal)


def _hopper_kernel_available():
    from flashtile.kernels import batch_prefill_hopper as hopper
    return HAS_CUDA and hopper._HAVE_GLUON and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.skipif(not _hopper_kernel_available(), reason="the warp-specialized prefill kernel needs an sm_90 GPU")
def test_hopper_kernel_serves_prefill_tiles(device):
    """The cases above reach the Gluon kernel where it applies (so they test it), and not elsewhere."""
    from flashtile.kernels.batch_prefill_hopper import hopper_prefill_views, use_gather
    q, k, v, _, _ = make_ragged([300], [300], 32, 8, 128, torch.bfloat16, device)
    assert hopper_prefill_views(q, k, v, False, 128, True) is not None
    assert hopper_prefill_views(q, k, v, False, 64, True) is None  # small tiles: the Triton kernel
    assert hopper_prefill_views(q, k, v, False, 128, False) is None  # soft cap, window, ...
    cache, indptr, indices, last = make_paged_batch([300], 16, 8, 128, torch.bfloat16, device)
    assert hopper_prefill_views(q, cache[:, 0], cache[:, 1], True, 128, True) is not None
    assert hopper_prefill_views(q, cache[:, 0, :1].expand(-1, 16, -1, -1), cache[:, 1, :1].expand(-1, 16, -1, -1),
                                True, 128, True) is None  # slots not a row apart
    # Pages TMA boxes cannot serve go through cp.async gathers (test_paged_matches_oracle's pages 1 and 5).
    cache1, _, _, _ = make_paged_batch([300], 1, 8, 128, torch.bfloat16, device)
    assert hopper_prefill_views(q, cache1[:, 0], cache1[:, 1], True, 128, True) is not None
    # One list of key offsets serves K and V in gather mode: V with another slot stride (padded heads)
    # but the same page and head coordinates goes to the Triton kernel.
    v_padded = torch.zeros(cache1.shape[0], 2, 1, 16, 128, dtype=torch.bfloat16, device=device)[:, 0, :, :8]
    assert hopper_prefill_views(q, cache1[:, 0], v_padded, True, 128, True) is None
    assert [use_gather(p) for p in (None, 1, 5, 8, 16, 128, 256)] == [False, True, True, False, False, False, True]


@pytest.mark.skipif(not _hopper_kernel_available(), reason="the warp-specialized prefill kernel needs an sm_90 GPU")
def test_hopper_kernel_graph_replays(device):
    """The persistent kernel takes its work from a counter in the plan, reset by the last program of
    each launch: graph replays after re-plans all compute every tile (out is cleared in between)."""
    b = 3
    bufs = dict(qo_indptr_buf=torch.zeros(b + 1, dtype=torch.int32, device=device),
                kv_indptr_buf=torch.zeros(b + 1, dtype=torch.int32, device=device))
    w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device), use_cuda_graph=True, **bufs)
    q, k, v, qo_indptr, kv_indptr = make_ragged([300, 129, 200], [300, 400, 1000], 16, 4, 128, torch.bfloat16, device)
    out = torch.empty_like(q)
    w.plan(qo_indptr, kv_indptr, 16, 4, 128, causal=True, q_data_type=torch.bfloat16)
    graph, _ = capture_graph(lambda: w.run(q, k, v, out=out))
    for qo_lens, kv_lens in (([300, 129, 200], [300, 400, 1000]), ([129, 300, 100], [1000, 300, 400])):
        qo_indptr, kv_indptr = indptr_of(qo_lens), indptr_of(kv_lens)
        w.plan(qo_indptr, kv_indptr, 16, 4, 128, causal=True, q_data_type=torch.bfloat16)
        for _ in range(2):
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert int(w._plan.meta[3]) == 0, "work counter not reset"
            total = sum(qo_lens)
            reqs = ragged_requests(k, v, kv_indptr)
            assert not out[:total].isnan().any(), "a tile was skipped"
            atol, rtol = TOLERANCES[q.dtype]
            ip = qo_indptr.tolist()
            for r, (kr, vr) in enumerate(reqs):
                ref_o, _ = attention_oracle(q[ip[r]: ip[r + 1]], kr, vr, causal=True)
                torch.testing.assert_close(out[ip[r]: ip[r + 1]].double().cpu(), ref_o, atol=atol, rtol=rtol)


def test_hopper_ring_depth_follows_the_table_and_the_override(monkeypatch):
    from flashtile.kernels import batch_prefill_hopper as hopper
    assert [hopper.hopper_stages(d) for d in (64, 128)] == [hopper.STAGES_BY_HEAD_DIM[d] for d in (64, 128)]
    monkeypatch.setattr(hopper, "STAGES_OVERRIDE", 4)
    assert hopper.hopper_stages(64) == 4


@pytest.mark.skipif(not _hopper_kernel_available(), reason="the warp-specialized prefill kernel needs an sm_90 GPU")
@pytest.mark.parametrize("stages", [2, 3, 4])
def test_hopper_kernel_ring_depths_match_oracle(device, monkeypatch, stages):
    """Head dim 64 with a K/V ring of 2-4 stages (the batch_prefill suite's hopper_stages grid): every
    ring slot and phase is used over requests of several key blocks."""
    from flashtile.kernels import batch_prefill_hopper as hopper
    monkeypatch.setattr(hopper, "STAGES_OVERRIDE", stages)
    qo_lens, kv_lens = [300, 129, 200], [300, 700, 1000]
    q, k, v, qo_indptr, kv_indptr = make_ragged(qo_lens, kv_lens, 16, 4, 64, torch.bfloat16, device)
    w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    w.plan(qo_indptr, kv_indptr, 16, 4, 64, causal=True, q_data_type=torch.bfloat16)
    out = w.run(q, k, v)
    atol, rtol = TOLERANCES[q.dtype]
    ip = qo_indptr.tolist()
    for r, (kr, vr) in enumerate(ragged_requests(k, v, kv_indptr)):
        ref_o, _ = attention_oracle(q[ip[r]: ip[r + 1]], kr, vr, causal=True)
        torch.testing.assert_close(out[ip[r]: ip[r + 1]].double().cpu(), ref_o, atol=atol, rtol=rtol)
