"""flashtile.rope against the float64 oracle on the reference and kernel paths: every v0.3.1 function,
ragged and pos_ids positions, Llama 3.1 frequencies, partial rotary_dim, both pairings, different q/k
head counts, strided q/k views of a fused QKV buffer, exact in-place semantics, ops, errors."""

import math

import pytest
import torch

import flashtile.rope as rope
from conftest import HAS_CUDA
from flashtile._core import ops_small
from flashtile._core.graphs import capture_graph
from oracles import TOLERANCES, ragged_positions, rope_frequencies_f64, rope_general_f64

LLAMA31_DEFAULTS = dict(rope_scale=8.0, rope_theta=5e5, low_freq_factor=1.0, high_freq_factor=4.0, old_context_len=8192)

# (indptr, offsets): an empty request in the middle, a long one with a large offset.
RAGGED = ([0, 3, 3, 10, 13], [0, 5, 1000, 7])
if HAS_CUDA:
    RAGGED = ([0, 1, 1, 600, 2048, 2049], [0, 9, 17, 100, 4000])


def _qk(nnz, hq, hk, d, dtype, device):
    return (torch.randn(nnz, hq, d, dtype=dtype, device=device), torch.randn(nnz, hk, d, dtype=dtype, device=device))


def _expected(x, positions, rotary_dim, interleave, llama31, rope_scale, rope_theta):
    rd = rotary_dim or x.shape[-1]
    freqs = rope_frequencies_f64(rd, rope_scale, rope_theta, llama31)
    return rope_general_f64(x, positions, rd, interleave, freqs)


def _close(out, ref, dtype):
    assert not out.isnan().any(), "output has NaN (unwritten element?)"
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double().cpu(), ref, atol=atol, rtol=rtol)


def _call(variant, q, k, positions_kw, rotary_dim, interleave, params):
    """Run one of the eight q/k functions; returns (q_out, k_out) (q, k themselves for in-place)."""
    fn = getattr(rope, variant)
    out = fn(q, k, **positions_kw, rotary_dim=rotary_dim, interleave=interleave, **params)
    if variant.endswith("_inplace"):
        assert out is None
        return q, k
    return out


VARIANTS = [f"apply{llama}_rope{pos}{inplace}" for llama in ("", "_llama31") for pos in ("", "_pos_ids")
            for inplace in ("", "_inplace")]


# NeoX over the full head, GPT-J over part of an odd-sized head (the other two combinations are
# covered by the cos/sin-cache and fused-QKV tests).
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("interleave, head_dim, rotary_dim", [(False, 64, None), (True, 48, 16)])
def test_rope_variants(path, device, variant, interleave, head_dim, rotary_dim):
    indptr, offsets = RAGGED
    nnz = indptr[-1]
    positions = ragged_positions(indptr, offsets)
    q, k = _qk(nnz, 4, 2, head_dim, torch.bfloat16, device)
    q0, k0 = q.clone(), k.clone()
    llama31 = "llama31" in variant
    if llama31:
        params = dict(LLAMA31_DEFAULTS)
        llama_args = (params["low_freq_factor"], params["high_freq_factor"], params["old_context_len"])
        scale, theta = params["rope_scale"], params["rope_theta"]
    else:
        params, llama_args, scale, theta = dict(rope_scale=2.0, rope_theta=1e4), None, 2.0, 1e4
    if "pos_ids" in variant:
        positions_kw = dict(pos_ids=positions.to(device=device, dtype=torch.int32))
    else:
        positions_kw = dict(indptr=torch.tensor(indptr, dtype=torch.int32, device=device),
                            offsets=torch.tensor(offsets, dtype=torch.int32, device=device))
    q_out, k_out = _call(variant, q, k, positions_kw, rotary_dim, interleave, params)
    _close(q_out, _expected(q0, positions, rotary_dim, interleave, llama_args, scale, theta), torch.bfloat16)
    _close(k_out, _expected(k0, positions, rotary_dim, interleave, llama_args, scale, theta), torch.bfloat16)
    rd = rotary_dim or head_dim
    assert torch.equal(q_out[..., rd:], q0[..., rd:]) and torch.equal(k_out[..., rd:], k0[..., rd:])
    if not variant.endswith("_inplace"):
        assert torch.equal(q, q0) and torch.equal(k, k0), "the non-inplace functions must not touch q, k"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_rope_dtypes(path, device, dtype, pos_dtype):
    q, k = _qk(11, 3, 1, 64, dtype, device)  # MQA: one k head
    pos = torch.randint(0, 60, (11,), dtype=pos_dtype, device=device)
    q_out, k_out = rope.apply_rope_pos_ids(q, k, pos, rope_theta=500.0)
    assert q_out.dtype == dtype and q_out.shape == q.shape and k_out.shape == k.shape
    _close(q_out, _expected(q, pos, None, False, None, 1.0, 500.0), dtype)
    _close(k_out, _expected(k, pos, None, False, None, 1.0, 500.0), dtype)


def test_rope_large_positions(path, device):
    """Positions up to 2**17: sin/cos of float32 angles (error ~ position * 1e-7 rad, like upstream)."""
    q, k = _qk(6, 2, 2, 64, torch.bfloat16, device)
    pos = torch.tensor([0, 1, 4095, 65535, 100000, 131071], device=device)
    q_out, k_out = rope.apply_rope_pos_ids(q, k, pos)
    ref = _expected(q, pos, None, False, None, 1.0, 1e4)
    torch.testing.assert_close(q_out.double().cpu(), ref, atol=6e-2, rtol=2e-2)


def test_inplace_on_fused_qkv_views(path, device):
    """q and k are strided views into one [nnz, (Hq + 2 Hk) * D] buffer: in place rotates exactly
    their first rotary_dim dims; their other dims and the v part keep their bits."""
    nnz, hq, hk, d, rd = 9, 4, 2, 64, 32
    qkv = torch.randn(nnz, (hq + 2 * hk) * d, dtype=torch.float16, device=device)
    q = qkv[:, : hq * d].view(nnz, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(nnz, hk, d)
    before = qkv.clone()
    pos = torch.arange(nnz, device=device) * 3
    rope.apply_rope_pos_ids_inplace(q, k, pos, rotary_dim=rd)
    q0 = before[:, : hq * d].view(nnz, hq, d)
    k0 = before[:, hq * d : (hq + hk) * d].view(nnz, hk, d)
    _close(q, _expected(q0, pos, rd, False, None, 1.0, 1e4), torch.float16)
    _close(k, _expected(k0, pos, rd, False, None, 1.0, 1e4), torch.float16)
    assert torch.equal(q[..., rd:], q0[..., rd:]) and torch.equal(k[..., rd:], k0[..., rd:])
    assert torch.equal(qkv[:, (hq + hk) * d :], before[:, (hq + hk) * d :]), "v must not change"


# ---------------------------------------------------------------------------------------------
# cos/sin cache (vLLM / SGLang form)
# ---------------------------------------------------------------------------------------------


def _cos_sin_cache(max_pos, rotary_dim, theta=1e4, device=None):
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angle = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([angle.cos(), angle.sin()], dim=-1).float().to(device)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("head_size, rotary_dim", [(64, 64), (80, 32)])
def test_cos_sin_cache(path, device, is_neox, inplace, head_size, rotary_dim):
    nnz, hq, hk = 13 if not HAS_CUDA else 8192, 4, 2
    cache = _cos_sin_cache(4096, rotary_dim, device=device)
    positions = torch.randint(0, 4096, (nnz,), device=device)
    qkv = torch.randn(nnz, (hq + 2 * hk) * head_size, dtype=torch.bfloat16, device=device)
    query = qkv[:, : hq * head_size]  # [nnz, hq * head_size], row stride of the fused buffer
    key = qkv[:, hq * head_size : (hq + hk) * head_size]
    before = qkv.clone()
    q0 = query.view(nnz, hq, head_size).clone()
    k0 = key.view(nnz, hk, head_size).clone()
    if inplace:
        assert rope.apply_rope_with_cos_sin_cache_inplace(positions, query, key, head_size, cache, is_neox) is None
        q_out, k_out = query, key
        assert torch.equal(qkv[:, (hq + hk) * head_size :], before[:, (hq + hk) * head_size :])
    else:
        q_out, k_out = rope.apply_rope_with_cos_sin_cache(positions, query, key, head_size, cache, is_neox=is_neox)
        assert q_out.shape == query.shape and k_out.shape == key.shape
        assert torch.equal(qkv, before)
    q3, k3 = q_out.view(nnz, hq, head_size), k_out.view(nnz, hk, head_size)
    _close(q3, rope_general_f64(q0, positions, rotary_dim, not is_neox, cos_sin_cache=cache), torch.bfloat16)
    _close(k3, rope_general_f64(k0, positions, rotary_dim, not is_neox, cos_sin_cache=cache), torch.bfloat16)
    assert torch.equal(q3[..., rotary_dim:], q0[..., rotary_dim:])


def test_cos_sin_cache_matches_computed_frequencies(path, device):
    """A cache built from theta gives the same result as apply_rope_pos_ids (3-D query accepted)."""
    q, k = _qk(10, 4, 4, 64, torch.float16, device)
    pos = torch.randint(0, 500, (10,), device=device)
    a_q, a_k = rope.apply_rope_with_cos_sin_cache(pos, q, k, 64, _cos_sin_cache(512, 64, device=device))
    b_q, b_k = rope.apply_rope_pos_ids(q, k, pos)
    torch.testing.assert_close(a_q, b_q, atol=4e-3, rtol=4e-3)
    torch.testing.assert_close(a_k, b_k, atol=4e-3, rtol=4e-3)


@pytest.mark.gpu
def test_rope_cuda_graph_replay():
    device = torch.device("cuda")
    nnz = 128
    cache = _cos_sin_cache(8192, 128, device=device)
    pos = torch.randint(0, 8192, (nnz,), device=device)
    query = torch.randn(nnz, 32 * 128, dtype=torch.bfloat16, device=device)
    key = torch.randn(nnz, 8 * 128, dtype=torch.bfloat16, device=device)
    graph, _ = capture_graph(lambda: rope.apply_rope_with_cos_sin_cache_inplace(pos, query, key, 128, cache))
    query.copy_(torch.randn_like(query))
    key.copy_(torch.randn_like(key))
    pos.copy_(torch.randint(0, 8192, (nnz,), device=device))
    q0, k0 = query.clone(), key.clone()
    graph.replay()
    torch.cuda.synchronize()
    _close(query.view(nnz, 32, 128), rope_general_f64(q0.view(nnz, 32, 128), pos, 128, cos_sin_cache=cache),
           torch.bfloat16)
    _close(key.view(nnz, 8, 128), rope_general_f64(k0.view(nnz, 8, 128), pos, 128, cos_sin_cache=cache),
           torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Token-major kernel, forced on the kernel path (kernels.rope.use_token_major replaced)
# ---------------------------------------------------------------------------------------------

FAST_FORMS = ["apply_rope", "apply_rope_pos_ids", "apply_llama31_rope", "apply_llama31_rope_pos_ids", "cos_sin_cache"]
# (nnz, num_q_heads, num_k_heads, head_dim, rotary_dim, tile): odd counts and a partial rotary_dim
# with an odd half (20); 67 tokens take 4 per program with a ragged last program (on CPU); "small
# tile" shrinks FAST_TILE so that the heads need the per-tile loop (q 5 heads -> 3 tiles, k 3 -> 2).
FAST_SHAPES = [(13, 5, 3, 48, 32, None), (67, 4, 1, 64, 64, None), (7, 5, 3, 80, 40, 64)]


@pytest.fixture
def fast_kernel(monkeypatch):
    """Kernel path with the token-major kernel for every form; returns the list of fast_config calls
    (proof that the token-major kernel ran)."""
    return _force_rope_kernel(monkeypatch, True)


def _force_rope_kernel(monkeypatch, token_major):
    """Kernel path with the token-major kernel (True), the head-block kernel (False) or each form's
    own (None) for every form; returns the list of fast_config calls."""
    from flashtile.kernels import rope as rope_kernels

    monkeypatch.setenv("FLASHTILE_BACKEND", "triton")  # (reloading the settings clears the launch memos)
    if token_major is not None:
        monkeypatch.setattr(rope_kernels, "use_token_major", lambda use_cache: token_major)
    calls = []
    config = rope_kernels.fast_config

    def spy(*args):
        calls.append(config(*args))
        return calls[-1]

    monkeypatch.setattr(rope_kernels, "fast_config", spy)
    return calls


@pytest.mark.parametrize("kernel", ["token_major", "head_blocks", "default"])
@pytest.mark.parametrize("form", FAST_FORMS)
@pytest.mark.parametrize("interleave", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("shape", FAST_SHAPES, ids=["odd", "4tok", "head_loop"])
def test_fast_kernel(monkeypatch, device, kernel, form, interleave, inplace, shape):
    """Every form through each kernel (forced token-major, forced head-block, default: the token-major
    kernel for the cos/sin-cache form only) on strided views of one fused QKV buffer: rotated dims against the
    float64 oracle, tails copied (out of place) or untouched (in place), v and the inputs of the
    out-of-place forms unchanged."""
    from flashtile.kernels import rope as rope_kernels

    fast_kernel = _force_rope_kernel(monkeypatch, {"token_major": True, "head_blocks": False, "default": None}[kernel])
    token_major = kernel == "token_major" or (kernel == "default" and form == "cos_sin_cache")

    nnz, hq, hk, d, rd, tile = shape
    if tile is not None:
        monkeypatch.setattr(rope_kernels, "FAST_TILE", tile)
    dtype = torch.float16
    qkv = torch.randn(nnz, (hq + 2 * hk) * d, dtype=dtype, device=device)
    q = qkv[:, : hq * d].view(nnz, hq, d)  # token stride (hq + 2 hk) * d: not contiguous
    k = qkv[:, hq * d : (hq + hk) * d].view(nnz, hk, d)
    before = qkv.clone()
    q0, k0 = q.clone(), k.clone()
    # positions: segments of unequal length (one empty) with offsets, or the same values as pos_ids
    cuts = sorted({0, nnz // 3, (2 * nnz) // 3, nnz})
    indptr = cuts[:2] + cuts[1:]  # the second request is empty
    offsets = [5 * i + 3 for i in range(len(indptr) - 1)]
    positions = ragged_positions(indptr, offsets)
    llama31 = "llama31" in form
    if form == "cos_sin_cache":
        cache = _cos_sin_cache(int(positions.max()) + 1, rd, device=device)
        fn = rope.apply_rope_with_cos_sin_cache_inplace if inplace else rope.apply_rope_with_cos_sin_cache
        query, key = qkv[:, : hq * d], qkv[:, hq * d : (hq + hk) * d]
        out = fn(positions.to(device), query, key, d, cache, not interleave)
        q_out, k_out = (q, k) if inplace else (out[0].view(nnz, hq, d), out[1].view(nnz, hk, d))
        want_q = rope_general_f64(q0, positions, rd, interleave, cos_sin_cache=cache)
        want_k = rope_general_f64(k0, positions, rd, interleave, cos_sin_cache=cache)
    else:
        params = dict(LLAMA31_DEFAULTS) if llama31 else dict(rope_scale=2.0, rope_theta=1e4)
        if "pos_ids" in form:
            positions_kw = dict(pos_ids=positions.to(device))
        else:
            positions_kw = dict(indptr=torch.tensor(indptr, dtype=torch.int32, device=device),
                                offsets=torch.tensor(offsets, dtype=torch.int32, device=device))
        q_out, k_out = _call(form + ("_inplace" if inplace else ""), q, k, positions_kw, rd, interleave, params)
        llama_args = (1.0, 4.0, 8192) if llama31 else None
        want_q = _expected(q0, positions, rd, interleave, llama_args, params["rope_scale"], params["rope_theta"])
        want_k = _expected(k0, positions, rd, interleave, llama_args, params["rope_scale"], params["rope_theta"])
    assert bool(fast_kernel) == token_major, "the wrong kernel ran"
    _close(q_out, want_q, dtype)
    _close(k_out, want_k, dtype)
    assert torch.equal(q_out[..., rd:], q0[..., rd:]) and torch.equal(k_out[..., rd:], k0[..., rd:])
    v = (hq + hk) * d
    assert torch.equal(qkv[:, v:], before[:, v:]), "v must not change"
    if not inplace:
        assert torch.equal(qkv, before), "the out-of-place functions must not touch q, k"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fast_kernel_dtypes_and_config(fast_kernel, monkeypatch, device, dtype):
    """bf16/fp32 through the token-major kernel, with its launch config fixed at 2 tokens per program
    (odd nnz: the last program has one) and 2 warps."""
    from flashtile.kernels import rope as rope_kernels

    spy = rope_kernels.fast_config  # the fixture's, recording the rule's configs

    def fixed_config(*args):
        _, block_hq, block_hk, _ = spy(*args)
        return 2, block_hq, block_hk, 2

    monkeypatch.setattr(rope_kernels, "fast_config", fixed_config)
    q, k = _qk(9, 3, 2, 64, dtype, device)
    pos = torch.randint(0, 60, (9,), device=device)  # float32 angles: error ~ position * 1e-7 rad
    q_out, k_out = rope.apply_rope_pos_ids(q, k, pos, rope_theta=5e5)
    assert fast_kernel, "the token-major kernel did not run"
    _close(q_out, _expected(q, pos, None, False, None, 1.0, 5e5), dtype)
    _close(k_out, _expected(k, pos, None, False, None, 1.0, 5e5), dtype)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

BF = torch.bfloat16


def _q(nnz=5, h=2, d=64, dtype=BF):
    return torch.randn(nnz, h, d, dtype=dtype)


POS5 = torch.arange(5)
IND = torch.tensor([0, 2, 5], dtype=torch.int32)
OFF = torch.tensor([0, 3], dtype=torch.int32)
CACHE = _cos_sin_cache(16, 64)


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: rope.apply_rope_pos_ids(_q(), _q(), POS5, rotary_dim=33), ValueError, "rotary_dim"),
        (lambda: rope.apply_rope_pos_ids(_q(), _q(), POS5, rotary_dim=66), ValueError, "rotary_dim"),
        (lambda: rope.apply_rope_pos_ids(_q(), _q(), POS5, rotary_dim=0), ValueError, "rotary_dim"),
        (lambda: rope.apply_rope_pos_ids(_q(), _q(), POS5, rotary_dim=32.0), TypeError, "rotary_dim"),
        (lambda: rope.apply_rope_pos_ids(_q()[0], _q(), POS5), ValueError, "q"),
        (lambda: rope.apply_rope_pos_ids(_q(), _q(d=32), POS5), ValueError, "k"),
        (lambda: rope.apply_rope_pos_ids(_q(), _q(nnz=4), POS5), ValueError, "k"),
        (lambda: rope.apply_rope_pos_ids(_q(), _q(dtype=torch.float16), POS5), TypeError, "k"),
        (lambda: rope.apply_rope_pos_ids(_q().int(), _q().int(), POS5), TypeError, "q"),
        (lambda: rope.apply_rope_pos_ids(_q().transpose(1, 2), _q(), POS5), ValueError, "q"),
        (lambda: rope.apply_rope_pos_ids(_q(), _q(), torch.arange(4)), ValueError, "pos_ids"),
        (lambda: rope.apply_rope_pos_ids(_q(), _q(), POS5.float()), TypeError, "pos_ids"),
        (lambda: rope.apply_rope_pos_ids(_q(), _q(), None), TypeError, "pos_ids: expected a torch.Tensor"),
        (lambda: rope.apply_llama31_rope_pos_ids_inplace(_q(), _q(), None), TypeError, "pos_ids"),
        (lambda: rope.apply_rope_pos_ids(_q(), _q(), POS5, interleave=1), TypeError, "interleave"),
        (lambda: rope.apply_rope_pos_ids(_q(), _q(), POS5, rope_theta=0.0), ValueError, "rope_theta"),
        (lambda: rope.apply_rope_pos_ids(_q(), _q(), POS5, rope_scale=-1.0), ValueError, "rope_scale"),
        (lambda: rope.apply_rope(_q(), _q(), torch.tensor([0, 2, 4], dtype=torch.int32), OFF), ValueError, "indptr"),
        (lambda: rope.apply_rope(_q(), _q(), torch.tensor([0, 3, 2, 5], dtype=torch.int32), OFF),
         ValueError, "offsets"),
        (lambda: rope.apply_rope(_q(), _q(), torch.tensor([0, 3, 2, 5], dtype=torch.int32),
                                 torch.zeros(3, dtype=torch.int32)), ValueError, "indptr"),
        (lambda: rope.apply_rope(_q(), _q(), IND.float(), OFF), TypeError, "indptr"),
        (lambda: rope.apply_llama31_rope(_q(), _q(), IND, OFF, low_freq_factor=4, high_freq_factor=4),
         ValueError, "high_freq_factor"),
        (lambda: rope.apply_llama31_rope_pos_ids(_q(), _q(), POS5, old_context_len=0), ValueError, "old_context_len"),
        (lambda: rope.apply_rope_with_cos_sin_cache(POS5, _q().flatten(1), _q().flatten(1), 64, CACHE.half()),
         TypeError, "cos_sin_cache should be float32"),
        (lambda: rope.apply_rope_with_cos_sin_cache(POS5, _q().flatten(1), _q().flatten(1), 64, CACHE.half()),
         ValueError, "cos_sin_cache should be float32"),
        (lambda: rope.apply_rope_with_cos_sin_cache(POS5, _q().flatten(1), _q().flatten(1), 32, CACHE),
         ValueError, "cos_sin_cache"),
        (lambda: rope.apply_rope_with_cos_sin_cache(POS5 + 12, _q().flatten(1), _q().flatten(1), 64, CACHE),
         ValueError, "positions"),
        (lambda: rope.apply_rope_with_cos_sin_cache(POS5 - 1, _q().flatten(1), _q().flatten(1), 64, CACHE),
         ValueError, "positions"),
        (lambda: rope.apply_rope_with_cos_sin_cache(POS5, _q().flatten(1), _q().flatten(1), 48, CACHE[:, :48]),
         ValueError, "query"),
        (lambda: rope.apply_rope_with_cos_sin_cache(POS5, _q().flatten(1), _q(dtype=torch.float16).flatten(1), 64,
                                                    CACHE), TypeError, "key"),
        (lambda: rope.apply_rope_with_cos_sin_cache(POS5[:4], _q().flatten(1), _q().flatten(1), 64, CACHE),
         ValueError, "query"),
        (lambda: rope.apply_rope_with_cos_sin_cache(POS5, _q().flatten(1), _q().flatten(1), 0, CACHE),
         ValueError, "head_size"),
    ],
)
def test_bad_input_raises(call, error, name):
    with pytest.raises(error) as info:
        call()
    assert name in str(info.value)


def test_nothing_changes_on_error():
    q, k = _q(), _q()
    q0, k0 = q.clone(), k.clone()
    with pytest.raises(ValueError):
        rope.apply_rope_pos_ids_inplace(q, k, POS5, rotary_dim=7)
    assert torch.equal(q, q0) and torch.equal(k, k0)


# ---------------------------------------------------------------------------------------------
# torch.library
# ---------------------------------------------------------------------------------------------


def _rope_args(device, cache: bool):
    q, k = _qk(5, 4, 2, 64, torch.bfloat16, device)
    pos = torch.arange(5, device=device)
    table = _cos_sin_cache(8, 32, device=device) if cache else None
    rd = 32 if cache else 48
    return q, k, pos, table, rd


@pytest.mark.parametrize("cache", [False, True], ids=["theta", "cache"])
def test_opcheck(path, device, cache):
    q, k, pos, table, rd = _rope_args(device, cache)
    torch.library.opcheck(ops_small.rope, (q, k, torch.empty_like(q), torch.empty_like(k), pos, None, None, table, rd,
                                           False, 1.0, 1e4, 0.0, 0.0))
    indptr = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
    offsets = torch.tensor([4, 0], dtype=torch.int32, device=device)
    torch.library.opcheck(ops_small.rope_inplace, (q, k, None, indptr, offsets, None, 64, True, 8.0, 5e5,
                                                   math.pi, -0.5))


def test_torch_compile_fullgraph(path, device):
    backend = "inductor" if HAS_CUDA else "aot_eager"
    cache = _cos_sin_cache(64, 64, device=device)

    def step(positions, qkv):
        query, key = qkv[:, : 4 * 64], qkv[:, 4 * 64 : 6 * 64]
        rope.apply_rope_with_cos_sin_cache_inplace(positions, query, key, 64, cache)
        q2, k2 = rope.apply_llama31_rope_pos_ids(query.view(-1, 4, 64), key.view(-1, 2, 64), positions)
        return q2.float().sum() + k2.float().sum() + qkv.float().sum()

    positions = torch.randint(0, 64, (7,), device=device)
    qkv = torch.randn(7, 8 * 64, dtype=torch.bfloat16, device=device)
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    qkv1 = qkv.clone()
    got = compiled(positions, qkv1)
    want = step(positions, qkv)
    torch.testing.assert_close(got, want, atol=1e-1, rtol=1e-2)
    torch.testing.assert_close(qkv1, qkv, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# Remembered checks (_core/memo.py): a known key skips the metadata checks, never the value checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inplace", [False, True])
def test_cos_sin_cache_known_metadata_still_checks_positions(path, device, inplace):
    """Repeated cos/sin-cache calls with one metadata compute on each call's tensors; host positions
    outside the cache still raise at a known key, and a non-bool is_neox takes the checked path."""
    nnz, hq, hk, d = 5, 2, 1, 64
    cache = _cos_sin_cache(32, d, device=device)
    fn = rope.apply_rope_with_cos_sin_cache_inplace if inplace else rope.apply_rope_with_cos_sin_cache
    for is_neox in (True, True, False, 1, 0):
        query = torch.randn(nnz, hq * d, dtype=torch.float16, device=device)
        key = torch.randn(nnz, hk * d, dtype=torch.float16, device=device)
        positions = torch.randint(0, 32, (nnz,), device=device)
        q0, k0 = query.view(nnz, hq, d).clone(), key.view(nnz, hk, d).clone()
        out = fn(positions, query, key, d, cache, is_neox)
        q_out, k_out = (query, key) if inplace else out
        _close(q_out.view(nnz, hq, d), rope_general_f64(q0, positions, d, not is_neox, cos_sin_cache=cache),
               torch.float16)
        _close(k_out.view(nnz, hk, d), rope_general_f64(k0, positions, d, not is_neox, cos_sin_cache=cache),
               torch.float16)
    bad = torch.tensor([0, 1, 32, 2, 3])  # on the host: validated; row 32 is past the cache
    with pytest.raises(ValueError, match=r"positions: expected values in \[0, 32\)"):
        fn(bad.to(device) if device.type == "cpu" else bad, query, key, d, cache, True)
    with pytest.raises(ValueError, match="head_size"):
        fn(positions, query, key, True, cache, True)
