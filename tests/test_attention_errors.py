"""Every documented bad input raises the documented error type, naming the argument."""

import pytest
import torch

import flashtile

F16 = torch.float16


def qkv(qo=3, kv=5, hq=4, hk=2, d=64, dtype=F16):
    return (torch.randn(qo, hq, d, dtype=dtype), torch.randn(kv, hk, d, dtype=dtype),
            torch.randn(kv, hk, d, dtype=dtype))


def prefill(q, k, v, **kw):
    return flashtile.single_prefill_with_kv_cache(q, k, v, **kw)


def decode(q, k, v, **kw):
    return flashtile.single_decode_with_kv_cache(q[0], k, v, **kw)


@pytest.mark.parametrize("fn", [prefill, decode])
@pytest.mark.parametrize(
    "mutate, kwargs, error, names",
    [
        (None, dict(kv_layout="NDH"), (KeyError, ValueError), "kv_layout"),
        (None, dict(pos_encoding_mode="ROPE"), (KeyError, ValueError), "pos_encoding_mode"),
        (lambda q, k, v: (q[:, :3], k, v), {}, ValueError, "num_qo_heads"),  # 3 heads over 2 kv heads
        (lambda q, k, v: (q, k[..., :32], v), {}, ValueError, "k"),  # head_dim mismatch
        (lambda q, k, v: (q, k, v[:4]), {}, ValueError, "v"),  # k/v length mismatch
        (lambda q, k, v: (q.float(), k.float(), v.float()), {}, TypeError, "q"),  # float32 unsupported
        (lambda q, k, v: (q, k.bfloat16(), v.bfloat16()), {}, TypeError, "k"),  # kv dtype != q dtype
        (lambda q, k, v: (q, k, v.bfloat16()), {}, TypeError, "v"),
        (lambda q, k, v: (q, k.to("meta"), v.to("meta")), {}, ValueError, "k"),  # wrong device
        (lambda q, k, v: (q[..., :36], k[..., :36], v[..., :36]), {}, NotImplementedError, "head_dim"),
        (lambda q, k, v: (torch.randn(3, 4, 264, dtype=F16), torch.randn(5, 2, 264, dtype=F16),
                          torch.randn(5, 2, 264, dtype=F16)), {}, NotImplementedError, "head_dim"),
        (None, dict(window_left=-2), ValueError, "window_left"),
        (None, dict(logits_soft_cap=-1.0), ValueError, "logits_soft_cap"),
        (None, dict(sm_scale=0.0), ValueError, "sm_scale"),
        (None, dict(rope_theta=-1.0), ValueError, "rope_theta"),
        (lambda q, k, v: ("q", k, v), {}, TypeError, "q"),
    ],
)
def test_bad_input_raises(fn, mutate, kwargs, error, names):
    q, k, v = qkv()
    if mutate is not None:
        q, k, v = mutate(q, k, v)
    with pytest.raises(error) as info:
        fn(q, k, v, **kwargs)
    assert names in str(info.value)


def test_unsupported_head_dim_is_also_a_runtime_error():
    """Upstream raises RuntimeError("Unsupported head_dim"); NotImplementedError is one."""
    q, k, v = qkv(d=100)
    with pytest.raises(RuntimeError, match="head_dim"):
        prefill(q, k, v)


def test_decode_q_must_be_2d():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="q"):
        flashtile.single_decode_with_kv_cache(q, k, v)


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(custom_mask=torch.ones(3, 4, dtype=torch.bool)), ValueError, "custom_mask"),
        (dict(packed_custom_mask=torch.ones(1, dtype=torch.uint8)), ValueError, "packed_custom_mask"),
        (dict(packed_custom_mask=torch.ones(2, dtype=torch.int32)), TypeError, "packed_custom_mask"),
        (dict(backend="cudnn"), NotImplementedError, "cudnn"),
        (dict(backend="fa4"), (KeyError, ValueError), "backend"),
        (dict(o_dtype=torch.int8), TypeError, "o_dtype"),
    ],
)
def test_prefill_bad_options(kwargs, error, name):
    q, k, v = qkv()
    with pytest.raises(error) as info:
        prefill(q, k, v, **kwargs)
    assert name in str(info.value)


def test_fp8_q_not_supported_with_reason():
    q, k, v = qkv()
    with pytest.raises(NotImplementedError, match="fp8"):
        prefill(q.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn))


def test_fp8_kv_with_unequal_head_dims_is_refused_on_the_gpu(monkeypatch):
    """fp8 K/V with head_dim_vo != head_dim_qk fault on sm_90 (Triton 3.6): the compiled path raises a
    typed error instead; the interpreter (correct) and equal head dims or fp16/bf16 caches are allowed."""
    from flashtile.kernels import attention

    fp8 = torch.empty(4, 2, 64, dtype=torch.float8_e4m3fn)
    monkeypatch.setattr(attention, "INTERPRET", True)
    attention.check_fp8_head_dims(fp8, 64, 32)  # the interpreter computes it correctly
    monkeypatch.setattr(attention, "INTERPRET", False)
    with pytest.raises(NotImplementedError, match="head_dim_vo \\(32\\) != head_dim_qk \\(64\\)"):
        attention.check_fp8_head_dims(fp8, 64, 32)
    attention.check_fp8_head_dims(fp8, 64, 64)
    attention.check_fp8_head_dims(torch.empty(4, 2, 64, dtype=torch.float16), 64, 32)
