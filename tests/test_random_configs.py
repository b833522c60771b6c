"""Random valid configurations of the attention entry points against the float64 oracle (DESIGN.md, Testing:
property tests): batch decode, paged and ragged batch prefill, single decode and prefill, and MLA, drawing
combinations that the case lists do not enumerate (RoPE with a soft cap and a window, ALiBi over GQA groups of
5, odd page sizes and head dims, empty requests, fixed split sizes, both layouts), on the reference path, the
interpreted kernels (CPU) and the GPU.

Hypothesis draws the cases; ``derandomize`` fixes them, so every run checks the same cases and a failure prints
the one it drew. With RoPE the kernels round the rotated q and k to the input dtype before the dot product
(docs/semantics.md), so their oracle does too (``rotated_dtype``); the reference path keeps them exact."""

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashtile
from attention_cases import assert_matches_oracle, make_mla_batch, make_paged_batch, make_qkv, workspace
from conftest import HAS_CUDA
from flashtile.cascade import MultiLevelCascadeAttentionWrapper
from flashtile.decode import BatchDecodeWithPagedKVCacheWrapper
from flashtile.mla import BatchMLAPagedAttentionWrapper
from flashtile.pod import PODWithPagedKVCacheWrapper
from flashtile.prefill import BatchPrefillWithPagedKVCacheWrapper, BatchPrefillWithRaggedKVCacheWrapper
from oracles import alibi_slopes_f64, attention_oracle, bsr_dense_mask, masked_attention_oracle, sink_attention_oracle
from test_batch_decode import check_batch
from test_batch_prefill import check_requests, indptr_of, make_ragged, paged_requests, ragged_requests
from test_cascade import PagePool, cascade_oracle, check
from test_mla import check_mla
from test_pod import check_decodes
from test_sparse import check as check_sparse
from test_sparse import random_bsr, run_bsr
from test_variants import ALIBI, SINKS, SOFTCAP, TOL, WINDOW

# RANDOM_CONFIG_EXAMPLES=N draws N cases per entry point and path instead (a longer search, by hand). Fewer on a GPU:
# there most cases compile a kernel variant of their own (a second or more each), and a file's run is time-boxed
# (benchmarks/gpu/tests.sh).
EXAMPLES = int(os.environ.get("RANDOM_CONFIG_EXAMPLES", 10 if HAS_CUDA else 25))
CASES = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MAX_LEN = 3000 if HAS_CUDA else 70  # KV lengths: past several tiles and KV splits on either device
HEAD_DIMS = [40, 64, 128, 256] if HAS_CUDA else [16, 32, 40, 64]
DTYPES = st.sampled_from([torch.float16, torch.bfloat16])


def _features(draw) -> dict:
    """Soft cap, window, RoPE or ALiBi and sm_scale, each present or not."""
    f = {}
    if draw(st.booleans()):
        f["logits_soft_cap"] = draw(st.sampled_from([5.0, 30.0]))
    if draw(st.booleans()):
        f["window_left"] = draw(st.sampled_from([0, 1, 7, 100]))
    encoding = draw(st.sampled_from(["NONE", "NONE", "ROPE_LLAMA", "ALIBI"]))
    if encoding == "ROPE_LLAMA":
        f.update(pos_encoding_mode=encoding, rope_theta=draw(st.sampled_from([1e4, 500.0])),
                 rope_scale=draw(st.sampled_from([1.0, 2.0])))
    elif encoding == "ALIBI":
        f["pos_encoding_mode"] = encoding
    if draw(st.booleans()):
        f["sm_scale"] = draw(st.sampled_from([0.05, 0.3]))
    return f


def _heads(draw) -> tuple:
    num_kv_heads = draw(st.sampled_from([1, 2, 3]))
    return num_kv_heads * draw(st.sampled_from([1, 2, 4, 5, 8])), num_kv_heads


def _oracle_kw(path, features: dict, dtype) -> dict:
    rope = features.get("pos_encoding_mode") == "ROPE_LLAMA"
    return dict(features, rotated_dtype=dtype) if rope and path == "kernel" else dict(features)


def _split_option(draw) -> dict:
    return draw(st.sampled_from([{}, {}, {"fixed_split_size": 16}, {"disable_split_kv": True}]))


@CASES
@given(data=st.data())
def test_batch_decode(path, device, data):
    draw = data.draw
    lens = draw(st.lists(st.one_of(st.integers(0, 2), st.integers(0, MAX_LEN)), min_size=1, max_size=5))
    page_size = draw(st.sampled_from([1, 3, 16]))
    (hq, hk), d, dtype = _heads(draw), draw(st.sampled_from(HEAD_DIMS)), draw(DTYPES)
    layout, form = draw(st.sampled_from([("NHD", "5d"), ("HND", "tuple"), ("NHD", "tuple")]))
    features = _features(draw)
    cache, indptr, indices, last = make_paged_batch(lens, page_size, hk, d, dtype, device, layout=layout, form=form)
    q = torch.randn(len(lens), hq, d, dtype=dtype, device=device)
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(device), kv_layout=layout)
    w.plan(indptr, indices, last, hq, hk, d, page_size, q_data_type=dtype, **features, **_split_option(draw))
    out, lse = w.run(q, cache, return_lse=True)
    check_batch(out, lse, q, cache, indptr, indices, last, layout, **_oracle_kw(path, features, dtype))


def _prefill_lens(draw) -> tuple:
    """Per request (qo_len, kv_len), causal or not; causal requests have qo_len <= kv_len (no empty rows)."""
    causal = draw(st.booleans())
    kv_lens = draw(st.lists(st.one_of(st.integers(0, 2), st.integers(0, MAX_LEN)), min_size=1, max_size=4))
    qo_lens = [draw(st.integers(1 if k else 0, max(min(k, 40), 1))) if causal else draw(st.integers(0, 40))
               for k in kv_lens]
    if sum(qo_lens) == 0:
        qo_lens[0] = 1
    return qo_lens, kv_lens, causal


@CASES
@given(data=st.data())
def test_paged_prefill(path, device, data):
    draw = data.draw
    qo_lens, kv_lens, causal = _prefill_lens(draw)
    page_size = draw(st.sampled_from([1, 4, 5, 16]))
    (hq, hk), d, dtype = _heads(draw), draw(st.sampled_from(HEAD_DIMS)), draw(DTYPES)
    layout, form = draw(st.sampled_from([("NHD", "5d"), ("HND", "tuple")]))
    features = _features(draw)
    cache, indptr, indices, last = make_paged_batch(kv_lens, page_size, hk, d, dtype, device, layout=layout,
                                                    form=form, indptr_offset=draw(st.sampled_from([0, 2])))
    q = torch.randn(sum(qo_lens), hq, d, dtype=dtype, device=device)
    qo_indptr = indptr_of(qo_lens)
    w = BatchPrefillWithPagedKVCacheWrapper(workspace(device), kv_layout=layout)
    w.plan(qo_indptr, indptr, indices, last, hq, hk, d, page_size, causal=causal, q_data_type=dtype, **features,
           **_split_option(draw))
    out, lse = w.run(q, cache, return_lse=True)
    check_requests(out, lse, q, qo_indptr, paged_requests(cache, indptr, indices, last, layout), causal=causal,
                   **_oracle_kw(path, features, dtype))


@CASES
@given(data=st.data())
def test_ragged_prefill(path, device, data):
    draw = data.draw
    qo_lens, kv_lens, causal = _prefill_lens(draw)
    (hq, hk), d, dtype = _heads(draw), draw(st.sampled_from(HEAD_DIMS)), draw(DTYPES)
    layout = draw(st.sampled_from(["NHD", "HND"]))
    features = _features(draw)
    q, k, v, qo_indptr, kv_indptr = make_ragged(qo_lens, kv_lens, hq, hk, d, dtype, device, layout=layout,
                                                kv_offset=draw(st.sampled_from([0, 3])))
    w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device), kv_layout=layout)
    w.plan(qo_indptr, kv_indptr, hq, hk, d, d, causal=causal, q_data_type=dtype, **features, **_split_option(draw))
    out, lse = w.run(q, k, v, return_lse=True)
    check_requests(out, lse, q, qo_indptr, ragged_requests(k, v, kv_indptr, layout), causal=causal,
                   **_oracle_kw(path, features, dtype))


@CASES
@given(data=st.data())
def test_single_decode_and_prefill(path, device, data):
    draw = data.draw
    (hq, hk), d, dtype = _heads(draw), draw(st.sampled_from(HEAD_DIMS)), draw(DTYPES)
    layout = draw(st.sampled_from(["NHD", "HND"]))
    features = _features(draw)
    kv_len = draw(st.one_of(st.integers(1, 3), st.integers(1, MAX_LEN)))
    q, k, v = make_qkv(1, kv_len, hq, hk, d, dtype, device, layout=layout)
    out = flashtile.single_decode_with_kv_cache(q[0], k, v, kv_layout=layout, **features)
    assert_matches_oracle(out[None], None, q, k, v, layout=layout, **_oracle_kw(path, features, dtype))

    causal, qo_len = draw(st.booleans()), draw(st.integers(1, 40))
    kv_len = max(kv_len, qo_len) if causal else kv_len
    q, k, v = make_qkv(qo_len, kv_len, hq, hk, d, dtype, device, layout=layout)
    mask = None
    if not causal and draw(st.booleans()):
        mask = torch.rand(qo_len, kv_len, device=device) > 0.4
    out, lse = flashtile.single_prefill_with_kv_cache(q, k, v, causal=causal, kv_layout=layout, custom_mask=mask,
                                                      return_lse=True, **features)
    assert_matches_oracle(out, lse, q, k, v, layout=layout, causal=causal, custom_mask=mask,
                          **_oracle_kw(path, features, dtype))


@CASES
@given(data=st.data())
def test_mla(path, device, data):
    draw = data.draw
    causal = draw(st.booleans())
    kv_lens = draw(st.lists(st.one_of(st.integers(0, 2), st.integers(0, MAX_LEN)), min_size=1, max_size=4))
    qo_lens = [draw(st.integers(1, 6)) for _ in kv_lens]
    if causal:
        qo_lens = [min(q, k) if k else q for q, k in zip(qo_lens, kv_lens)]
    page_size = draw(st.sampled_from([1, 3, 16, 64]))
    heads = draw(st.sampled_from([1, 3, 16, 128] if HAS_CUDA else [1, 2, 3, 8, 16]))
    dc, dp = (512, 64) if HAS_CUDA else draw(st.sampled_from([(32, 16), (64, 16), (16, 32)]))
    dtype = draw(DTYPES)
    batch = make_mla_batch(qo_lens, kv_lens, page_size, heads, dc, dp, dtype, device,
                           indptr_offset=draw(st.sampled_from([0, 2])))
    q_nope, q_pe, ckv, kpe, qo_indptr, kv_indptr, kv_indices, lens = batch
    sm_scale = draw(st.sampled_from([1.0 / math.sqrt(dc + dp), 0.3 / math.sqrt(dp)]))
    w = BatchMLAPagedAttentionWrapper(workspace(device))
    w.plan(qo_indptr, kv_indptr, kv_indices, lens, heads, dc, dp, page_size, causal, sm_scale, dtype, dtype,
           **_split_option(draw))
    out, lse = w.run(q_nope, q_pe, ckv, kpe, return_lse=True)
    check_mla(out, lse, *batch, causal=causal, sm_scale=sm_scale, dtype=dtype)


@CASES
@given(data=st.data())
def test_multilevel_cascade(path, device, data):
    """2 or 3 levels: one shared prefix for the batch, optionally a level whose groups are runs of requests,
    then each request's own pages."""
    draw = data.draw
    batch = draw(st.integers(1, 5))
    qo = [draw(st.integers(1, 6)) for _ in range(batch)]
    unique = [draw(st.one_of(st.integers(0, 2), st.integers(0, MAX_LEN))) for _ in range(batch)]
    groups = [[batch]]  # per level above the last: group sizes, in requests
    if draw(st.booleans()):
        cuts = sorted(set(draw(st.lists(st.integers(1, batch - 1), max_size=3)))) if batch > 1 else []
        groups.append([b - a for a, b in zip([0] + cuts, cuts + [batch])])
    page_size = draw(st.sampled_from([1, 3, 16]))
    (hq, hk), d, dtype = _heads(draw), draw(st.sampled_from(HEAD_DIMS)), draw(DTYPES)
    causal = draw(st.booleans())
    features = {}
    if draw(st.booleans()):
        features["logits_soft_cap"] = draw(st.sampled_from([5.0, 30.0]))
    if draw(st.booleans()):
        features["sm_scale"] = draw(st.sampled_from([0.05, 0.3]))
    pages = sum(-(-n // page_size) for n in unique) + len(groups[-1]) * (-(-MAX_LEN // page_size)) + 1
    pool = PagePool(pages + -(-MAX_LEN // page_size), page_size, hk, d, dtype, device)
    qo_indptrs, tables = [], []
    for sizes in groups:
        bounds = [0]
        for size in sizes:
            bounds.append(bounds[-1] + size)
        qo_indptrs.append(indptr_of([sum(qo[a:b]) for a, b in zip(bounds, bounds[1:])]))
        tables.append(pool.table([draw(st.integers(0, MAX_LEN)) for _ in sizes]))
    qo_indptrs.append(indptr_of(qo))
    tables.append(pool.table(unique))
    q = torch.randn(sum(qo), hq, d, dtype=dtype, device=device)
    w = MultiLevelCascadeAttentionWrapper(len(tables), workspace(device))
    w.plan(qo_indptrs, [t[0] for t in tables], [t[1] for t in tables], [t[2] for t in tables], hq, hk, d, page_size,
           causal=causal, q_data_type=dtype, **features)
    check(w.run(q, pool.cache), q, cascade_oracle(q, pool, qo_indptrs, tables, causal, **features))


@CASES
@given(data=st.data())
def test_block_sparse(path, device, data):
    """BSR patterns of random block shapes and densities (empty and full block rows), with an element mask,
    causal, soft cap and sm_scale drawn independently."""
    draw = data.draw
    R, C = draw(st.sampled_from([1, 2, 4, 16])), draw(st.sampled_from([1, 2, 4, 16]))
    M = draw(st.integers(1, 70 if not HAS_CUDA else 700))
    N = C * draw(st.integers(1, max(1, (70 if not HAS_CUDA else 700) // C)))
    (hq, hk), d, dtype = _heads(draw), draw(st.sampled_from(HEAD_DIMS)), draw(DTYPES)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    indptr, indices = random_bsr(M, N, R, C, draw(st.sampled_from([0.2, 0.5, 1.0])), gen=gen)
    options, mask = {}, None
    if draw(st.booleans()):
        mask = torch.rand(indices.numel(), R, C, generator=gen) < 0.6
        options["mask"] = mask.to(device)
    causal = draw(st.booleans())
    if causal:
        options["causal"] = True
    if draw(st.booleans()):
        options["logits_soft_cap"] = draw(st.sampled_from([5.0, 30.0]))
    if draw(st.booleans()):
        options["sm_scale"] = draw(st.sampled_from([0.05, 0.3]))
    q = torch.randn(M, hq, d, dtype=dtype, device=device)
    k = torch.randn(N, hk, d, dtype=dtype, device=device)
    v = torch.randn(N, hk, d, dtype=dtype, device=device)
    _, (out, lse) = run_bsr(device, q, k, v, indptr, indices, M, N, R, C, **options)
    dense = bsr_dense_mask(indptr, indices, M, N, R, C, mask=mask, causal=causal)
    ref_o, ref_lse = masked_attention_oracle(q, k, v, dense, sm_scale=options.get("sm_scale"),
                                             logits_soft_cap=options.get("logits_soft_cap", 0.0))
    check_sparse(out, lse, ref_o, ref_lse, dtype)


@CASES
@given(data=st.data())
def test_pod(path, device, data):
    """One prefill request and a decode batch in one call, each half with its own drawn features."""
    draw = data.draw
    (hq, hk), d, dtype = _heads(draw), draw(st.sampled_from(HEAD_DIMS)), draw(DTYPES)
    lens = draw(st.lists(st.one_of(st.integers(0, 2), st.integers(0, MAX_LEN)), min_size=1, max_size=5))
    page_size = draw(st.sampled_from([1, 5, 16]))
    layout, layout_p = draw(st.sampled_from(["NHD", "HND"])), draw(st.sampled_from(["NHD", "HND"]))
    features_d, features_p = _features(draw), _features(draw)
    cache, indptr, indices, last = make_paged_batch(lens, page_size, hk, d, dtype, device, layout=layout)
    q_d = torch.randn(len(lens), hq, d, dtype=dtype, device=device)
    causal = draw(st.booleans())
    qo_p = draw(st.integers(1, 40))
    kv_p = draw(st.integers(qo_p if causal else 1, MAX_LEN + 40))
    q_p, k_p, v_p = make_qkv(qo_p, kv_p, hq, hk, d, dtype, device, layout=layout_p)
    mask = torch.rand(qo_p, kv_p, device=device) > 0.4 if not causal and draw(st.booleans()) else None
    w = PODWithPagedKVCacheWrapper(workspace(device), kv_layout=layout)
    w.plan(indptr, indices, last, hq, hk, d, page_size, q_data_type=dtype, **features_d, **_split_option(draw))
    (out_p, lse_p), (out_d, lse_d) = w.run(
        q_p, k_p, v_p, q_d, cache, custom_mask_p=mask, causal_p=causal, kv_layout_p=layout_p, return_lse_p=True,
        return_lse_d=True, **{f"{name}_p": value for name, value in features_p.items()})
    assert_matches_oracle(out_p, lse_p, q_p, k_p, v_p, layout=layout_p, causal=causal, custom_mask=mask,
                          **_oracle_kw(path, features_p, dtype))
    check_decodes(out_d, lse_d, q_d, cache, indptr, indices, last, layout=layout, **_oracle_kw(path, features_d, dtype))


def _variant_case(draw, hq, device):
    """A user variant of test_variants.py, its run() arguments, and the oracle keywords of the built-in feature
    it restates (sinks: None, sink_attention_oracle)."""
    name = draw(st.sampled_from(["softcap", "alibi", "window", "sinks"]))
    if name == "softcap":
        cap = draw(st.sampled_from([2.5, 30.0]))
        return SOFTCAP, (cap,), dict(logits_soft_cap=cap)
    if name == "alibi":
        return ALIBI, (torch.tensor(alibi_slopes_f64(hq), dtype=torch.float32, device=device),), \
            dict(pos_encoding_mode="ALIBI")
    if name == "window":
        left = draw(st.sampled_from([0, 3, 20]))
        return WINDOW, (left,), dict(window_left=left)
    return SINKS, (torch.randn(hq, device=device) * 2,), None


@CASES
@given(data=st.data())
def test_user_variants(path, device, data):
    """Soft cap, ALiBi, a sliding window (with its kv_range hook) and sinks written as user variants, on every
    entry point that takes one, against the oracle of the feature each restates."""
    draw = data.draw
    kind = draw(st.sampled_from(["single_decode", "single_prefill", "batch_decode", "paged_prefill",
                                 "ragged_prefill"]))
    (hq, hk), d = _heads(draw), draw(st.sampled_from([16, 64] if not HAS_CUDA else [64, 128]))
    dtype = torch.float16  # test_variants.TOL: fp16 tolerances for the hooks' float32 math
    variant, args, feature = _variant_case(draw, hq, device)
    causal = kind != "batch_decode" and kind != "single_decode" and draw(st.booleans())
    if kind.startswith("single"):
        qo_len = 1 if kind == "single_decode" else draw(st.integers(1, 30))
        kv_len = draw(st.integers(max(qo_len if causal else 1, 1), MAX_LEN + 1))
        q, k, v = make_qkv(qo_len, kv_len, hq, hk, d, dtype, device)
        if kind == "single_decode":
            out, lse = flashtile.single_decode_with_kv_cache(q[0], k, v, return_lse=True, _variant=(variant, args))
        else:
            out, lse = flashtile.single_prefill_with_kv_cache(q, k, v, causal=causal, return_lse=True,
                                                              _variant=(variant, args))
        requests = [(out.reshape(qo_len, hq, d), lse.reshape(qo_len, hq), q, k, v)]
    else:
        kv_lens = draw(st.lists(st.one_of(st.integers(0, 2), st.integers(0, MAX_LEN)), min_size=1, max_size=4))
        if kind == "batch_decode":
            qo_lens = [1] * len(kv_lens)
        else:
            qo_lens = [draw(st.integers(1 if k else 0, max(min(k, 20), 1))) if causal else draw(st.integers(0, 20))
                       for k in kv_lens]
        qo_indptr = indptr_of(qo_lens)
        q = torch.randn(sum(qo_lens), hq, d, dtype=dtype, device=device)
        split = _split_option(draw)
        if kind == "ragged_prefill":
            _, k, v, _, kv_indptr = make_ragged(qo_lens, kv_lens, hq, hk, d, dtype, device)
            w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device), jit_args=variant)
            w.plan(qo_indptr, kv_indptr, hq, hk, d, causal=causal, q_data_type=dtype, **split)
            out, lse = w.run(q, k, v, *args, return_lse=True)
            kvs = ragged_requests(k, v, kv_indptr)
        else:
            page_size = draw(st.sampled_from([1, 4, 16]))
            cache, indptr, indices, last = make_paged_batch(kv_lens, page_size, hk, d, dtype, device)
            if kind == "batch_decode":
                w = BatchDecodeWithPagedKVCacheWrapper(workspace(device), jit_args=variant)
                w.plan(indptr, indices, last, hq, hk, d, page_size, q_data_type=dtype, **split)
            else:
                w = BatchPrefillWithPagedKVCacheWrapper(workspace(device), jit_args=variant)
                w.plan(qo_indptr, indptr, indices, last, hq, hk, d, page_size, causal=causal, q_data_type=dtype,
                       **split)
            out, lse = w.run(q, cache, *args, return_lse=True)
            kvs = paged_requests(cache, indptr, indices, last)
        ip = qo_indptr.tolist()
        requests = [(out[ip[r]:ip[r + 1]], lse[ip[r]:ip[r + 1]], q[ip[r]:ip[r + 1]], *kvs[r]) for r in range(len(kvs))]
    for o, s, qr, kr, vr in requests:
        if feature is None:
            ref_o, ref_lse = sink_attention_oracle(qr, kr, vr, args[0].cpu(), causal=causal)
        else:
            ref_o, ref_lse = attention_oracle(qr, kr, vr, causal=causal, **feature)
        assert not o.isnan().any(), "output has NaN (unwritten element)"
        torch.testing.assert_close(o.double().cpu(), ref_o, **TOL)
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isinf(s.double().cpu()), ~finite), "rows without keys give lse -inf"
        torch.testing.assert_close(s.double().cpu()[finite], ref_lse[finite], **TOL)


def test_settings_fix_the_cases():
    """The cases are the same on every run (a failure reproduces): derandomized, no example database."""
    assert CASES.derandomize and CASES.database is None
    with pytest.raises(AssertionError):  # and the property tests can fail: a wrong oracle is caught
        assert_matches_oracle(torch.ones(1, 1, 8), None, *make_qkv(1, 3, 1, 1, 8, torch.float16, "cpu"))
