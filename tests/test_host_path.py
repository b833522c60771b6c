"""The eager fast paths (remembered checks per key, per-key runners, single-request replays) still catch every
bad input: a bad call whose key differs from a remembered good one only in what makes it bad raises the
documented error, on the kernel path (interpreter) and the reference path. And a replayed call computes
this call's inputs."""

import pytest
import torch

import flashtile
from attention_cases import assert_matches_oracle, make_qkv
from oracles import rmsnorm_f64


@pytest.mark.parametrize("bad, error", [
    (dict(eps=-1.0), ValueError),
    (dict(eps=float("nan")), ValueError),
    (dict(weight=torch.ones(64, dtype=torch.int32)), TypeError),
    (dict(weight=torch.ones(63)), ValueError),
    (dict(out=torch.empty(3, 64, dtype=torch.float32)), TypeError),
])
def test_rmsnorm_after_a_remembered_call(path, device, bad, error):
    x, w = torch.randn(3, 64, dtype=torch.float16, device=device), torch.randn(64, dtype=torch.float16, device=device)
    bad = {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in bad.items()}
    flashtile.rmsnorm(x, w, 1e-6)
    flashtile.rmsnorm(x, w, 1e-6)  # remembered (and replayed on the kernel path)
    kwargs = dict(weight=w, eps=1e-6)
    kwargs.update(bad)
    with pytest.raises(error):
        flashtile.rmsnorm(x, **kwargs)


@pytest.mark.parametrize("bad, error", [
    (dict(eps=-1.0), ValueError),
    (dict(residual=torch.randn(3, 64, dtype=torch.float32)), TypeError),
    (dict(residual=torch.randn(1, 3, 64, dtype=torch.float16)), ValueError),
    (dict(residual=torch.randn(3, 64, dtype=torch.float16, device="meta")), ValueError),
    (dict(weight=torch.ones(32, dtype=torch.float16)), ValueError),
    (dict(weight=torch.ones(64, dtype=torch.int32)), TypeError),
    (dict(weight=torch.ones(64, dtype=torch.float16, device="meta")), ValueError),
])
def test_fused_add_rmsnorm_after_a_remembered_call(path, device, bad, error):
    x, r = (torch.randn(3, 64, dtype=torch.float16, device=device) for _ in range(2))
    w = torch.randn(64, dtype=torch.float16, device=device)
    bad = {name: value.to(device) if isinstance(value, torch.Tensor) and not value.is_meta else value
           for name, value in bad.items()}
    flashtile.fused_add_rmsnorm(x, r, w, 1e-6)
    flashtile.fused_add_rmsnorm(x, r, w, 1e-6)
    kwargs = dict(residual=r, weight=w, eps=1e-6)
    kwargs.update(bad)
    with pytest.raises(error):
        flashtile.fused_add_rmsnorm(x, **kwargs)


def test_outputs_stay_contiguous_and_correct_for_strided_inputs(path, device):
    """Outputs are made per key (buffers.output_maker): contiguous for every input layout, also a contiguous
    input whose size-1 dim has an odd stride (its output keeps that stride) and a strided one."""
    wide = torch.randn(3, 128, dtype=torch.float16, device=device)
    w = torch.randn(64, dtype=torch.float16, device=device)
    for x in (wide[:1, :64], wide[:, :64], wide[:, ::2]):  # contiguous with stride (128, 1); strided twice
        for _ in range(2):
            out = flashtile.rmsnorm(x, w, 1e-6)
            assert out.is_contiguous() and out.shape == x.shape
            torch.testing.assert_close(out.double().cpu(), rmsnorm_f64(x, w, 1e-6).cpu(), atol=2e-3, rtol=2e-3)
    va, vb = (torch.randn(5, 4, 32, dtype=torch.float16, device=device) for _ in range(2))
    for sa in (torch.randn(5, 4, device=device, dtype=torch.float16), torch.randn(4, 5, device=device).t()):
        sb = torch.randn(5, 4, device=device)
        expected = [t.cpu() for t in flashtile.merge_state(va, sa.float().contiguous(), vb, sb)]
        for _ in range(2):
            v, s = flashtile.merge_state(va, sa, vb, sb)
            assert v.is_contiguous() and s.is_contiguous() and s.dtype == torch.float32
            torch.testing.assert_close(v.cpu(), expected[0])
            torch.testing.assert_close(s.cpu(), expected[1])


def test_merge_state_after_a_remembered_call(path, device):
    va, vb = (torch.randn(5, 4, 32, dtype=torch.float16, device=device) for _ in range(2))
    sa, sb = torch.randn(5, 4, device=device), torch.randn(5, 4, device=device)
    flashtile.merge_state(va, sa, vb, sb)
    flashtile.merge_state(va, sa, vb, sb)
    with pytest.raises(ValueError, match="s_b"):
        flashtile.merge_state(va, sa, vb, torch.randn(5, 3, device=device))
    with pytest.raises(TypeError, match="v_b"):
        flashtile.merge_state(va, sa, vb.float(), sb)


@pytest.mark.parametrize("bad, error", [
    (dict(window_left=-1.0), ValueError),  # equal to -1 as a key value: the key also holds the type
    (dict(window_left=True), ValueError),
    (dict(q_scale=True), TypeError),
    (dict(pos_encoding_mode="ROPE"), ValueError),
])
def test_single_decode_after_a_replayed_call(path, device, bad, error):
    q, k, v = make_qkv(1, 33, 4, 2, 64, torch.float16, device)
    good = dict(window_left=-1, q_scale=1.0, pos_encoding_mode="NONE")
    flashtile.single_decode_with_kv_cache(q[0], k, v, **good)
    flashtile.single_decode_with_kv_cache(q[0], k, v, **good)  # replayed on the kernel path
    good.update(bad)
    with pytest.raises(error):
        flashtile.single_decode_with_kv_cache(q[0], k, v, **good)


def test_replayed_calls_compute_this_calls_inputs(path, device):
    """Second and third calls with new tensors of the same metadata (replayed on the kernel path)."""
    for _ in range(3):
        x = torch.randn(3, 64, dtype=torch.float16, device=device)
        w = torch.randn(64, dtype=torch.float16, device=device)
        out = flashtile.rmsnorm(x, w, 1e-6)
        torch.testing.assert_close(out.double().cpu(), rmsnorm_f64(x, w, 1e-6).cpu(), atol=2e-3, rtol=2e-3)
        q, k, v = make_qkv(1, 70, 4, 2, 64, torch.float16, device)
        o, lse = flashtile.single_decode_with_kv_cache(q[0], k, v, return_lse=True)
        assert_matches_oracle(o[None], lse[None], q, k, v)
        o = flashtile.single_decode_with_kv_cache(q[0], k, v)
        assert_matches_oracle(o[None], None, q, k, v)


def test_zeroed_int32_hands_out_fresh_aligned_zeros(monkeypatch):
    """The split sampler's barrier counters come from pools of zeros (buffers.zeroed_int32): every slice
    is zeros when handed out although every earlier one was written (a slice is never handed out twice,
    across pool refills too), 16-byte aligned, of the asked length."""
    from flashtile._core import buffers

    monkeypatch.setattr(buffers, "ZEROED_POOL_USES", 3)
    monkeypatch.setattr(buffers, "_ZEROED_POOLS", {})
    handed = []
    for numel in (1, 5, 4, 7, 2, 3, 9, 1, 1, 1, 16):
        z = buffers.zeroed_int32(numel, torch.device("cpu"))
        assert z.shape == (numel,) and z.dtype == torch.int32 and z.is_contiguous()
        assert z.data_ptr() % 16 == 0
        assert not z.any()
        z.fill_(numel)  # as a launch writes its barrier counts
        handed.append(z)
    assert all(bool((z == z.numel()).all()) for z in handed)
