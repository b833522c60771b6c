"""single_decode_with_kv_cache against the float64 oracle on the reference and kernel paths."""

import pytest
import torch

import flashtile
from attention_cases import assert_matches_oracle, make_qkv
from conftest import HAS_CUDA
from flashtile.scheduler.split_kv import plan_kv_splits

# (kv_len, num_qo_heads, num_kv_heads, head_dim); kv 130 and 300 take the split-KV path on the
# interpreter's 4-SM "device" (see test_split_kv_path_is_exercised).
SHAPES = [(1, 1, 1, 64), (7, 4, 4, 64), (33, 8, 2, 128), (130, 8, 1, 64), (300, 6, 2, 48)]
if HAS_CUDA:
    SHAPES += [(32768, 32, 8, 128), (4096, 32, 8, 64), (8191, 16, 2, 256), (1000, 64, 1, 128), (777, 12, 3, 96)]


def _decode(q, k, v, **kw):
    return flashtile.single_decode_with_kv_cache(q, k, v, return_lse=True, **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_decode_matches_oracle(path, device, dtype, shape, layout):
    kv_len, hq, hk, d = shape
    q, k, v = make_qkv(1, kv_len, hq, hk, d, dtype, device, layout=layout)
    out, lse = _decode(q[0], k, v, kv_layout=layout)
    assert out.shape == (hq, d) and out.dtype == dtype and lse.shape == (hq,)
    assert_matches_oracle(out[None], lse[None], q, k, v, layout=layout)


FEATURES = [
    dict(window_left=10),
    dict(logits_soft_cap=2.5),
    dict(pos_encoding_mode="ALIBI"),
    dict(pos_encoding_mode="ROPE_LLAMA", rope_theta=5e5),
    dict(sm_scale=0.05, window_left=0),
]


@pytest.mark.parametrize("features", FEATURES, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_decode_features(path, device, features):
    q, k, v = make_qkv(1, 131, 8, 2, 64, torch.bfloat16, device)
    out, lse = _decode(q[0], k, v, **features)
    assert_matches_oracle(out[None], lse[None], q, k, v, **features)


def test_decode_window_equals_truncated_cache(path, device):
    """window_left=w on the full cache equals no window on the last w + 1 keys (upstream's test)."""
    q, k, v = make_qkv(1, 150, 4, 4, 64, torch.float16, device)
    out_w = flashtile.single_decode_with_kv_cache(q[0], k, v, window_left=20)
    out_t = flashtile.single_decode_with_kv_cache(q[0], k[-21:], v[-21:])
    torch.testing.assert_close(out_w, out_t, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("kv_dtype", ["float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_fp8_kv_with_scales(path, device, kv_dtype, dtype):
    q, k, v = make_qkv(1, 77, 8, 2, 128, dtype, device, kv_dtype=getattr(torch, kv_dtype))
    out, lse = _decode(q[0], k, v, k_scale=0.5, v_scale=2.0, q_scale=1.5)
    assert_matches_oracle(out[None], lse[None], q, k, v, k_scale=0.5, v_scale=2.0, q_scale=1.5)


def test_decode_empty_kv(path, device):
    q, k, v = make_qkv(1, 0, 4, 2, 64, torch.float16, device)
    out, lse = _decode(q[0], k, v)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


def test_decode_use_tensor_cores_same_result(path, device):
    q, k, v = make_qkv(1, 99, 8, 2, 64, torch.bfloat16, device)
    a = flashtile.single_decode_with_kv_cache(q[0], k, v)
    b = flashtile.single_decode_with_kv_cache(q[0], k, v, use_tensor_cores=True)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_split_kv_path_is_exercised():
    """The CPU shapes above include ones that the scheduler splits (4 SMs under the interpreter)."""
    splits, _ = plan_kv_splits(300, base_programs=2, num_sms=4, align=16)
    assert splits > 1
