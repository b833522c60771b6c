"""single_prefill_with_kv_cache against the float64 oracle on the reference and kernel paths."""

import pytest
import torch

import flashtile
from attention_cases import assert_matches_oracle, make_qkv
from conftest import HAS_CUDA
from flashtile.quantization import packbits

DTYPES = [torch.float16, torch.bfloat16]

# (qo_len, kv_len, num_qo_heads, num_kv_heads, head_dim): odd sizes, append (qo < kv), qo > kv, GQA.
SHAPES = [
    (1, 1, 1, 1, 64),
    (7, 7, 2, 2, 64),
    (7, 33, 4, 2, 128),
    (33, 130, 2, 1, 64),
    (17, 9, 3, 1, 40),  # qo_len > kv_len, group of 3, odd head_dim
]
if HAS_CUDA:
    SHAPES += [(1024, 1024, 32, 8, 128), (513, 2000, 8, 8, 256), (300, 777, 12, 4, 64), (129, 129, 4, 1, 8)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_prefill_matches_oracle(path, device, dtype, shape, causal):
    qo_len, kv_len, hq, hk, d = shape
    q, k, v = make_qkv(qo_len, kv_len, hq, hk, d, dtype, device)
    out, lse = flashtile.single_prefill_with_kv_cache(q, k, v, causal=causal, return_lse=True)
    assert out.shape == (qo_len, hq, d) and out.dtype == dtype
    assert lse.shape == (qo_len, hq) and lse.dtype == torch.float32
    assert_matches_oracle(out, lse, q, k, v, causal=causal)


FEATURES = [
    dict(window_left=5),
    dict(window_left=0),
    dict(logits_soft_cap=3.0),
    dict(pos_encoding_mode="ALIBI"),
    dict(pos_encoding_mode="ROPE_LLAMA"),
    dict(pos_encoding_mode="ROPE_LLAMA", rope_scale=2.0, rope_theta=5e5),
    dict(pos_encoding_mode="ALIBI", logits_soft_cap=4.0, window_left=9),
    dict(sm_scale=0.3),
]


@pytest.mark.parametrize("features", FEATURES, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("causal", [False, True])
def test_prefill_features(path, device, features, causal):
    q, k, v = make_qkv(19, 45, 4, 2, 64, torch.float16, device)
    out, lse = flashtile.single_prefill_with_kv_cache(q, k, v, causal=causal, return_lse=True, **features)
    assert_matches_oracle(out, lse, q, k, v, causal=causal, **features)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_prefill_layouts(path, device, layout):
    q, k, v = make_qkv(9, 31, 4, 2, 64, torch.bfloat16, device, layout=layout)
    out = flashtile.single_prefill_with_kv_cache(q, k, v, causal=True, kv_layout=layout)
    assert_matches_oracle(out, None, q, k, v, layout=layout, causal=True)


@pytest.mark.parametrize("packed", [False, True])
def test_prefill_custom_mask(path, device, packed):
    qo_len, kv_len = 11, 37
    q, k, v = make_qkv(qo_len, kv_len, 2, 1, 64, torch.float16, device)
    mask = torch.rand(qo_len, kv_len, device=device) > 0.5
    mask[3] = False  # a fully masked row: output 0, lse -inf
    kwargs = dict(packed_custom_mask=packbits(mask.flatten(), bitorder="little")) if packed else dict(custom_mask=mask)
    # causal=True is ignored when a custom mask is given.
    out, lse = flashtile.single_prefill_with_kv_cache(q, k, v, causal=True, return_lse=True, **kwargs)
    assert_matches_oracle(out, lse, q, k, v, custom_mask=mask)
    assert torch.all(out[3] == 0) and torch.all(lse[3] == float("-inf"))


def test_prefill_empty_rows_exact(path, device):
    """qo_len > kv_len with causal: the first qo_len - kv_len rows see nothing -> 0 and -inf exactly."""
    q, k, v = make_qkv(12, 5, 2, 2, 64, torch.bfloat16, device)
    out, lse = flashtile.single_prefill_with_kv_cache(q, k, v, causal=True, return_lse=True)
    assert torch.all(out[:7] == 0) and torch.all(lse[:7] == float("-inf"))
    assert_matches_oracle(out, lse, q, k, v, causal=True)


def test_prefill_empty_kv(path, device):
    q, k, v = make_qkv(3, 0, 2, 1, 64, torch.float16, device)
    out, lse = flashtile.single_prefill_with_kv_cache(q, k, v, return_lse=True)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


def test_prefill_very_negative_logits_are_not_masked(path, device):
    """Logits near -2.5e5 are real: the least negative key must dominate (not be treated as masked)."""
    q, k, v = make_qkv(4, 16, 1, 1, 64, torch.float16, device)
    q = torch.ones_like(q)
    k = -torch.ones_like(k)
    k[7] = -0.99  # slightly larger logit than all others
    out = flashtile.single_prefill_with_kv_cache(q, k, v, sm_scale=4000.0)
    assert_matches_oracle(out, None, q, k, v, sm_scale=4000.0)
    torch.testing.assert_close(out[0, 0].float(), v[7, 0].float(), atol=1e-3, rtol=1e-3)


def test_prefill_head_dim_vo_differs(path, device):
    """DeepSeek-style prefill: head_dim_qk 192, head_dim_vo 128."""
    q, k, _ = make_qkv(6, 21, 2, 2, 192, torch.bfloat16, device)
    v = torch.randn(21, 2, 128, dtype=torch.bfloat16, device=device)
    out, lse = flashtile.single_prefill_with_kv_cache(q, k, v, causal=True, return_lse=True)
    assert out.shape == (6, 2, 128)
    assert_matches_oracle(out, lse, q, k, v, causal=True)


def test_prefill_strided_q_and_kv(path, device):
    """q as a slice of a fused QKV projection; k/v slices of a wider pool: no copy needed, same result."""
    qkv = torch.randn(13, 4 + 2 + 2, 64, dtype=torch.float16, device=device)
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:8]
    assert not q.is_contiguous()
    out = flashtile.single_prefill_with_kv_cache(q, k, v, causal=True)
    assert_matches_oracle(out, None, q, k, v, causal=True)


@pytest.mark.parametrize("kv_dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_prefill_fp8_kv(path, device, kv_dtype):
    q, k, v = make_qkv(5, 29, 4, 2, 64, torch.float16, device, kv_dtype=getattr(torch, kv_dtype))
    out = flashtile.single_prefill_with_kv_cache(q, k, v, causal=True)
    assert_matches_oracle(out, None, q, k, v, causal=True)


def test_prefill_o_dtype_and_return_lse_alias(path, device):
    q, k, v = make_qkv(5, 9, 2, 2, 64, torch.bfloat16, device)
    out, lse = flashtile.single_prefill_with_kv_cache_return_lse(q, k, v, o_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert_matches_oracle(out.to(torch.bfloat16), lse, q, k, v)
