"""single_prefill_with_kv_cache as a ragged batch of one (flashtile/_core/single_batch.py).

On CPU: which path a call takes (the Hopper kernel's scope stubbed, since Gluon cannot run in the
interpreter), and the batch-of-one path through the Triton batch prefill kernel against the float64
oracle. On a GPU (``gpu`` marker): both routes against the oracle at real shapes, and that the route
runs the warp-specialized kernel on an sm_90 card.
"""

import dataclasses

import pytest
import torch

import flashtile
from attention_cases import assert_matches_oracle, make_qkv
from conftest import HAS_CUDA
from flashtile._core import ops, single_batch
from flashtile._core.params import AttentionParams
from flashtile.quantization import packbits
from oracles import LSE_TOLERANCES, TOLERANCES, attention_oracle

SETTING = "FLASHTILE_SINGLE_PREFILL_AS_BATCH"


@pytest.fixture(autouse=True)
def _no_override():
    single_batch.set_route_override(None)
    yield
    single_batch.set_route_override(None)


@pytest.fixture
def kernels(monkeypatch):
    """The kernel path (GPU, or the interpreter on CPU); returns the two launcher modules."""
    monkeypatch.setenv("FLASHTILE_BACKEND", "triton")
    from flashtile.kernels import attention, batch_prefill

    return attention, batch_prefill


@pytest.fixture
def calls(kernels, monkeypatch):
    """Counts the launcher calls of each route: ``{"single": n, "batch": n}``."""
    attention, batch_prefill = kernels
    counts = {"single": 0, "batch": 0}

    def counting(module, name, route):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[route] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counting(attention, "single_attention_forward", "single")
    counting(batch_prefill, "batch_prefill_forward", "batch")
    return counts


def _serves(monkeypatch, kernels, answer: bool):
    """Stub the Hopper kernel's scope (batch_prefill.hopper_serves_single); returns the arguments it saw."""
    seen = []

    def serves(q, k, v, params, block_m):
        seen.append(block_m)
        return answer

    monkeypatch.setattr(kernels[1], "hopper_serves_single", serves)
    return seen


# -- routing ----------------------------------------------------------------------------------------------


def test_route_off_by_default(calls, device, monkeypatch, kernels):
    seen = _serves(monkeypatch, kernels, True)
    q, k, v = make_qkv(9, 20, 4, 2, 64, torch.float16, device)
    flashtile.single_prefill_with_kv_cache(q, k, v, causal=True)
    assert calls == {"single": 1, "batch": 0} and seen == []


@pytest.mark.parametrize("serves", [True, False])
def test_route_follows_hopper_scope(calls, device, monkeypatch, kernels, serves):
    monkeypatch.setenv(SETTING, "1")
    seen = _serves(monkeypatch, kernels, serves)
    q, k, v = make_qkv(9, 20, 4, 2, 64, torch.float16, device)
    out = flashtile.single_prefill_with_kv_cache(q, k, v, causal=True)
    assert calls == ({"single": 0, "batch": 1} if serves else {"single": 1, "batch": 0})
    assert len(seen) == 1
    assert_matches_oracle(out, None, q, k, v, causal=True)


def test_hopper_scope_is_false_without_gpu(kernels, device):
    if HAS_CUDA:
        pytest.skip("CPU check")
    q, k, v = make_qkv(256, 256, 4, 4, 128, torch.bfloat16, device)
    params = AttentionParams(sm_scale=0.1, causal=True)
    assert not kernels[1].hopper_serves_single(q, k, v, params, 128)


@pytest.mark.parametrize("what", ["custom_mask", "packed_custom_mask", "variant", "decode", "reference"])
def test_route_never_taken(calls, device, monkeypatch, kernels, what):
    """Masks, variants and decode keep the single-request kernel; the reference path has no route."""
    single_batch.set_route_override(True)
    q, k, v = make_qkv(9, 20, 4, 2, 64, torch.float16, device)
    mask = torch.rand(9, 20, device=device) > 0.3
    if what == "custom_mask":
        flashtile.single_prefill_with_kv_cache(q, k, v, custom_mask=mask)
    elif what == "packed_custom_mask":
        flashtile.single_prefill_with_kv_cache(q, k, v, packed_custom_mask=packbits(mask.flatten(), bitorder="little"))
    elif what == "variant":
        sinks = torch.randn(4, device=device)
        flashtile.single_prefill_with_kv_cache(q, k, v, causal=True, sinks=sinks)
    elif what == "decode":
        flashtile.single_decode_with_kv_cache(q[0], k, v)
    else:
        flashtile.single_prefill_with_kv_cache(q, k, v, causal=True, backend="reference")
    expected = 0 if what == "reference" else 1
    assert calls == {"single": expected, "batch": 0}


def test_override_off_beats_setting(calls, device, monkeypatch, kernels):
    monkeypatch.setenv(SETTING, "1")
    _serves(monkeypatch, kernels, True)
    single_batch.set_route_override(False)
    q, k, v = make_qkv(9, 20, 4, 2, 64, torch.float16, device)
    flashtile.single_prefill_with_kv_cache(q, k, v, causal=True)
    assert calls == {"single": 1, "batch": 0}


def test_plans_are_remembered_and_replayed(calls, device, monkeypatch, kernels):
    """One plan per shape key; a repeated call replays the batch launches (no launcher call) and is right
    for new inputs; switching the route forgets the replays."""
    single_batch.set_route_override(True)
    made = []
    original = single_batch._make_plan
    monkeypatch.setattr(single_batch, "_make_plan", lambda *a: made.append(1) or original(*a))
    for _ in range(3):
        q, k, v = make_qkv(13, 29, 4, 2, 64, torch.bfloat16, device)
        out, lse = flashtile.single_prefill_with_kv_cache(q, k, v, causal=True, return_lse=True)
        assert_matches_oracle(out, lse, q, k, v, causal=True)
    assert len(made) == 1 and calls["single"] == 0 and calls["batch"] >= 1
    q, k, v = make_qkv(13, 31, 4, 2, 64, torch.bfloat16, device)  # another kv_len: another plan
    flashtile.single_prefill_with_kv_cache(q, k, v, causal=True)
    assert len(made) == 2
    single_batch.set_route_override(False)
    out = flashtile.single_prefill_with_kv_cache(q, k, v, causal=True)
    assert calls["single"] == 1
    assert_matches_oracle(out, None, q, k, v, causal=True)


def test_plan_memo_is_bounded(kernels, device, monkeypatch):
    single_batch.set_route_override(True)
    monkeypatch.setattr(single_batch, "MAX_PLANS", 2)
    for kv_len in (5, 6, 7):
        q, k, v = make_qkv(3, kv_len, 2, 1, 64, torch.float16, device)
        out = flashtile.single_prefill_with_kv_cache(q, k, v, causal=True)
        assert_matches_oracle(out, None, q, k, v, causal=True)
    assert len(single_batch._PLANS) <= 2


# -- the batch-of-one path against the oracle (the Triton batch kernel; under the interpreter on CPU) -------

# (qo_len, kv_len, num_qo_heads, num_kv_heads, head_dim): odd sizes, append, qo > kv, GQA, an odd head dim.
SHAPES = [(1, 1, 1, 1, 64), (7, 33, 4, 2, 128), (33, 130, 2, 1, 64), (17, 9, 3, 1, 40), (5, 0, 2, 2, 64)]
if HAS_CUDA:
    SHAPES += [(1024, 1024, 32, 8, 128), (300, 777, 12, 4, 64), (513, 2000, 8, 8, 256)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_batch_of_one_matches_oracle(calls, device, shape, causal, dtype):
    single_batch.set_route_override(True)
    qo_len, kv_len, hq, hk, d = shape
    q, k, v = make_qkv(qo_len, kv_len, hq, hk, d, dtype, device)
    out, lse = flashtile.single_prefill_with_kv_cache(q, k, v, causal=causal, return_lse=True)
    assert out.shape == (qo_len, hq, d) and out.dtype == dtype and lse.shape == (qo_len, hq)
    assert_matches_oracle(out, lse, q, k, v, causal=causal)
    assert calls["single"] == 0


FEATURES = [
    dict(window_left=5),
    dict(window_left=0),
    dict(logits_soft_cap=3.0),
    dict(sm_scale=0.3),
    dict(pos_encoding_mode="ALIBI", logits_soft_cap=4.0, window_left=9),
    dict(pos_encoding_mode="ROPE_LLAMA"),
    dict(o_dtype=torch.float32),
]


@pytest.mark.parametrize("features", FEATURES, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("causal", [False, True])
def test_batch_of_one_features(calls, device, features, causal):
    single_batch.set_route_override(True)
    q, k, v = make_qkv(19, 45, 4, 2, 64, torch.float16, device)
    out, lse = flashtile.single_prefill_with_kv_cache(q, k, v, causal=causal, return_lse=True, **features)
    oracle = {k_: v_ for k_, v_ in features.items() if k_ != "o_dtype"}
    assert out.dtype == features.get("o_dtype", torch.float16)
    assert_matches_oracle(out.to(torch.float16), lse, q, k, v, causal=causal, **oracle)
    assert calls["single"] == 0


def test_batch_of_one_layouts_and_views(calls, device):
    """HND K/V and a strided q (a slice of a fused projection) give the single path's answer."""
    single_batch.set_route_override(True)
    q, k, v = make_qkv(9, 31, 4, 2, 64, torch.bfloat16, device, layout="HND")
    fused = torch.randn(9, 6, 64, dtype=torch.bfloat16, device=device)
    fused[:, :4] = q
    out = flashtile.single_prefill_with_kv_cache(fused[:, :4], k, v, causal=True, kv_layout="HND")
    assert_matches_oracle(out, None, q, k, v, layout="HND", causal=True)
    assert calls["single"] == 0


def test_batch_of_one_empty_rows_exact(device, kernels):
    single_batch.set_route_override(True)
    q, k, v = make_qkv(12, 5, 2, 2, 64, torch.bfloat16, device)
    out, lse = flashtile.single_prefill_with_kv_cache(q, k, v, causal=True, return_lse=True)
    assert torch.all(out[:7] == 0) and torch.all(lse[:7] == float("-inf"))
    assert_matches_oracle(out, lse, q, k, v, causal=True)


# -- on the GPU: both routes at real shapes --------------------------------------------------------------

GPU_SHAPES = [(1024, 1024, 32, 8, 128), (1500, 1500, 8, 8, 64), (777, 777, 8, 8, 128), (200, 3000, 16, 4, 128),
              (2048, 2048, 4, 4, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_routes_match_oracle(calls, device, monkeypatch, shape, causal, dtype):
    """The setting on: an sm_90 card runs these through the Hopper kernel; both routes match the oracle."""
    monkeypatch.setenv(SETTING, "1")
    qo_len, kv_len, hq, hk, d = shape
    q, k, v = make_qkv(qo_len, kv_len, hq, hk, d, dtype, device)
    results = {}
    for route in (None, False):
        single_batch.set_route_override(route)
        for _ in range(2):  # the first call records, the second replays
            results[route] = flashtile.single_prefill_with_kv_cache(q, k, v, causal=causal, return_lse=True)
    hopper = torch.cuda.get_device_capability(device) == (9, 0)
    assert (calls["batch"] > 0) == hopper and calls["single"] > 0
    ref_o, ref_lse = attention_oracle(q, k, v, causal=causal)  # once (float64 on the CPU)
    atol, rtol = TOLERANCES[dtype]
    latol, lrtol = LSE_TOLERANCES[dtype]
    for out, lse in results.values():
        assert not out.isnan().any()
        torch.testing.assert_close(out.double().cpu(), ref_o, atol=atol, rtol=rtol)
        torch.testing.assert_close(lse.double().cpu(), ref_lse, atol=latol, rtol=lrtol)


@pytest.mark.gpu
def test_gpu_route_under_cuda_graph(device, monkeypatch):
    """A first call inside a capture keeps the single kernel; a planned shape replays the batch route."""
    monkeypatch.setenv(SETTING, "1")
    q, k, v = make_qkv(1024, 1024, 32, 8, 128, torch.bfloat16, device)
    flashtile.single_prefill_with_kv_cache(q, k, v, causal=True)  # plans (eagerly)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph):
            out = flashtile.single_prefill_with_kv_cache(q, k, v, causal=True)
    torch.cuda.current_stream().wait_stream(stream)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    assert_matches_oracle(out, None, q, k, v, causal=True)


def test_batch_of_one_under_torch_compile(calls, device):
    """torch.compile(fullgraph=True) traces the public function; the op routes when it runs."""
    single_batch.set_route_override(True)
    backend = "inductor" if HAS_CUDA else "aot_eager"
    q, k, v = make_qkv(6, 11, 4, 2, 64, torch.float16, device)
    compiled = torch.compile(lambda q, k, v: flashtile.single_prefill_with_kv_cache(q, k, v, causal=True),
                             fullgraph=True, backend=backend)
    assert_matches_oracle(compiled(q, k, v), None, q, k, v, causal=True)
    assert calls["batch"] >= 1 and calls["single"] == 0


def test_batch_of_one_opcheck(calls, device):
    single_batch.set_route_override(True)
    q, k, v = make_qkv(5, 9, 4, 2, 64, torch.float16, device)
    out = torch.empty(5, 4, 64, dtype=torch.float16, device=device)
    lse = torch.empty(5, 4, dtype=torch.float32, device=device)
    params = AttentionParams(sm_scale=0.125, causal=True)
    torch.library.opcheck(ops.single_attention, (q, k, v, None, out, lse, "prefill", *dataclasses.astuple(params),
                                                 "triton"))
    assert calls["batch"] >= 1 and calls["single"] == 0
