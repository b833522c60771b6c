"""Attention variants (flashtile/variants.py, docs/variants.md): upstream's JIT examples ported to Python,
ALiBi / soft cap / sinks written as user variants, and the built-in ``sinks=`` keyword, against float64
oracles on the reference path and the kernels (interpreter on CPU, the GPU when there is one)."""

import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

import flashtile
from attention_cases import assert_matches_oracle, make_mla_batch, make_paged_batch, make_qkv, workspace
from conftest import HAS_CUDA
from flashtile import AttentionVariant
from flashtile.decode import single_decode_with_kv_cache_with_jit_module
from flashtile.jit.attention import (
    gen_customize_batch_prefill_module,
    gen_customize_single_decode_module,
    gen_customize_single_prefill_module,
)
from flashtile.prefill import single_prefill_with_kv_cache_with_jit_module
from oracles import alibi_slopes_f64, attention_oracle, sigmoid_attention_oracle, sink_attention_oracle

TOL = dict(atol=2e-3, rtol=2e-3)  # fp16 inputs, normalized outputs
SUM_TOL = dict(atol=2e-2, rtol=1e-2)  # fp16 inputs, unnormalized sums (sigmoid attention)

# ----------------------------------------------------------------------------------------------------------
# The variants: each hook a @triton.jit function and its PyTorch twin (same arguments, torch tensors).
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def sigmoid_logits(qk, sm_scale, batch, qo_idx, kv_idx, qo_head, kv_head, qo_len, kv_len, args):
    return tl.sigmoid(qk * args[0] + args[1])  # args: logits_scale, sigmoid_bias


def sigmoid_logits_torch(qk, sm_scale, batch, qo_idx, kv_idx, qo_head, kv_head, qo_len, kv_len, args):
    return torch.sigmoid(qk * args[0] + args[1])


# FlashSigmoid without declared arguments: the generators' name/dtype lists declare them (upstream style).
FLASH_SIGMOID = AttentionVariant("FlashSigmoid", logits_transform=(sigmoid_logits, sigmoid_logits_torch),
                                 use_softmax=False)
FLASH_SIGMOID_DECLARED = AttentionVariant("FlashSigmoid", logits_transform=(sigmoid_logits, sigmoid_logits_torch),
                                          use_softmax=False,
                                          scalars=[("logits_scale", "float"), ("sigmoid_bias", "float")])


@triton.jit
def key_bit_mask(batch, qo_idx, kv_idx, qo_head, kv_head, qo_len, kv_len, args):
    byte = tl.load(args[0] + kv_idx // 8, mask=kv_idx < kv_len, other=0).to(tl.int32)
    return ((byte >> (kv_idx % 8)) & 1) != 0


def key_bit_mask_torch(batch, qo_idx, kv_idx, qo_head, kv_head, qo_len, kv_len, args):
    return ((args[0][kv_idx // 8].to(torch.int32) >> (kv_idx % 8)) & 1) != 0


@triton.jit
def scaled_logits(qk, sm_scale, batch, qo_idx, kv_idx, qo_head, kv_head, qo_len, kv_len, args):
    return qk * args[1]  # args: custom_mask, sm_scale (upstream's decode mask example)


def scaled_logits_torch(qk, sm_scale, batch, qo_idx, kv_idx, qo_head, kv_head, qo_len, kv_len, args):
    return qk * args[1]


KEY_MASK = AttentionVariant("SingleDecodeWithCustomMask", logits_mask=(key_bit_mask, key_bit_mask_torch),
                            logits_transform=(scaled_logits, scaled_logits_torch))


@triton.jit
def dump_logits(qk, sm_scale, batch, qo_idx, kv_idx, qo_head, kv_head, qo_len, kv_len, args):
    s = qk * sm_scale
    inside = (qo_idx < qo_len) & (kv_idx < kv_len)
    tl.store(args[0] + (qo_head * qo_len + qo_idx) * kv_len + kv_idx, s, mask=inside)
    return s


def dump_logits_torch(qk, sm_scale, batch, qo_idx, kv_idx, qo_head, kv_head, qo_len, kv_len, args):
    s = qk * sm_scale
    args[0][qo_head, qo_idx, kv_idx] = s.float()
    return s


DUMP_LOGITS = AttentionVariant("DumpLogits", logits_transform=(dump_logits, dump_logits_torch),
                               tensors=[("output_logits", torch.float32, ("num_qo_heads", "qo_len", "kv_len"))])


@triton.jit
def alibi_logits(qk, sm_scale, batch, qo_idx, kv_idx, qo_head, kv_head, qo_len, kv_len, args):
    slope = tl.load(args[0] + qo_head)
    return qk * sm_scale + slope * (kv_idx - (qo_idx + kv_len - qo_len)).to(tl.float32)


def alibi_logits_torch(qk, sm_scale, batch, qo_idx, kv_idx, qo_head, kv_head, qo_len, kv_len, args):
    return qk * sm_scale + args[0][qo_head] * (kv_idx - (qo_idx + kv_len - qo_len)).to(qk.dtype)


ALIBI = AttentionVariant("alibi", logits_transform=(alibi_logits, alibi_logits_torch),
                         tensors=[("alibi_slopes", torch.float32, ("num_qo_heads",))])


@triton.jit
def softcap_logits(qk, sm_scale, batch, qo_idx, kv_idx, qo_head, kv_head, qo_len, kv_len, args):
    x = qk * sm_scale / args[0]
    return args[0] * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))  # cap * tanh(x)


def softcap_logits_torch(qk, sm_scale, batch, qo_idx, kv_idx, qo_head, kv_head, qo_len, kv_len, args):
    return args[0] * torch.tanh(qk * sm_scale / args[0])


SOFTCAP = AttentionVariant("softcap", logits_transform=(softcap_logits, softcap_logits_torch),
                           scalars=[("cap", torch.float32)])


@triton.jit
def user_sink(batch, qo_head, args):
    return tl.load(args[0] + qo_head)


def user_sink_torch(batch, qo_head, args):
    return args[0][qo_head]


SINKS = AttentionVariant("user_sinks", sink_logit=(user_sink, user_sink_torch),
                         tensors=[("sinks", torch.float32, ("num_qo_heads",))])


def _prefill_module(variant, names=(), dtypes=()):
    spec = gen_customize_single_prefill_module("fa2", variant.name, torch.float16, torch.float16, torch.float16, 64, 64,
                                               [], [], list(names), list(dtypes), variant.name, variant)
    return spec.build_and_load()


# ----------------------------------------------------------------------------------------------------------
# Single request
# ----------------------------------------------------------------------------------------------------------


def test_decode_key_bit_mask(path, device):
    """Upstream test_single_decode_mask: a bit-packed per-key mask and an sm_scale scalar."""
    q, k, v = make_qkv(1, 37, 4, 2, 64, torch.float16, device)
    keep = torch.rand(37, device=device) > 0.3
    keep[5] = True
    packed = flashtile.packbits(keep, bitorder="little")
    spec = gen_customize_single_decode_module("decode_mask", torch.float16, torch.float16, torch.float16, 64, 64,
                                              ["custom_mask"], ["uint8_t"], ["sm_scale"], ["double"],
                                              "SingleDecodeWithCustomMask", KEY_MASK)
    out, lse = single_decode_with_kv_cache_with_jit_module(spec.build_and_load(), q[0], k, v, packed, 0.125,
                                                           return_lse=True)
    assert_matches_oracle(out[None], lse[None], q, k, v, custom_mask=keep[None].cpu(), sm_scale=0.125)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_sigmoid_single_prefill(path, device, causal):
    """Upstream test_flash_sigmoid: use_softmax=False, sigmoid(q.k * logits_scale + bias) weights."""
    q, k, v = make_qkv(9, 21, 4, 2, 64, torch.float16, device)
    module = _prefill_module(FLASH_SIGMOID, ["logits_scale", "sigmoid_bias"], ["float", "float"])
    out = single_prefill_with_kv_cache_with_jit_module(module, q, k, v, 0.125, -1.0, mask_mode=int(causal))
    ref = sigmoid_attention_oracle(q, k, v, 0.125, -1.0, causal=causal)
    torch.testing.assert_close(out.double().cpu(), ref, **SUM_TOL)


def test_dump_logits(path, device):
    """Upstream test_dump_logits: the hook writes the scaled logits into an extra tensor."""
    q, k, v = make_qkv(7, 19, 2, 1, 64, torch.float16, device)
    logits = torch.full((2, 7, 19), float("nan"), device=device)
    out = single_prefill_with_kv_cache_with_jit_module(_prefill_module(DUMP_LOGITS), q, k, v, logits)
    ref = torch.einsum("qhd,khd->hqk", q.double().cpu(), k.double().cpu().expand(19, 2, 64)) / 8.0
    torch.testing.assert_close(logits.double().cpu(), ref, atol=2e-3, rtol=2e-3)
    assert_matches_oracle(out, None, q, k, v)


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_alibi_as_variant(path, device, kind):
    qo_len = 1 if kind == "decode" else 11
    q, k, v = make_qkv(qo_len, 27, 4, 2, 64, torch.float16, device)
    slopes = torch.tensor(alibi_slopes_f64(4), dtype=torch.float32, device=device)
    if kind == "decode":
        out, lse = flashtile.single_decode_with_kv_cache(q[0], k, v, return_lse=True, _variant=(ALIBI, (slopes,)))
        out, lse = out[None], lse[None]
    else:
        out, lse = flashtile.single_prefill_with_kv_cache(q, k, v, causal=True, return_lse=True,
                                                          _variant=(ALIBI, (slopes,)))
    assert_matches_oracle(out, lse, q, k, v, causal=kind == "prefill", pos_encoding_mode="ALIBI")


def test_softcap_and_window_as_variant(path, device):
    """A soft cap variant with the window flag, three calls with new inputs and caps (the second and third
    replay the first one's launches on the GPU; the cap 3 is an int: one more key, the same kernel)."""
    for cap in (2.5, 1.5, 3):
        q, k, v = make_qkv(13, 40, 4, 1, 64, torch.float16, device)
        out, lse = flashtile.single_prefill_with_kv_cache(q, k, v, causal=True, window_left=6, return_lse=True,
                                                          _variant=(SOFTCAP, (cap,)))
        assert_matches_oracle(out, lse, q, k, v, causal=True, window_left=6, logits_soft_cap=cap)


@triton.jit
def window_mask(batch, qo_idx, kv_idx, qo_head, kv_head, qo_len, kv_len, args):
    return kv_idx >= qo_idx + kv_len - qo_len - args[0]


def window_mask_torch(batch, qo_idx, kv_idx, qo_head, kv_head, qo_len, kv_len, args):
    return kv_idx >= qo_idx + kv_len - qo_len - args[0]


@triton.jit
def window_range(batch, qo_first, qo_last, qo_len, kv_len, args):
    return tl.maximum(qo_first + kv_len - qo_len - args[0], 0), kv_len


@triton.jit
def cut_range(batch, qo_first, qo_last, qo_len, kv_len, args):
    return 0, 1  # excludes the window's tiles: only the kernels, which skip tiles, see the cut


@triton.jit
def window_full_range(batch, qo_first, qo_last, qo_len, kv_len, args):
    return tl.maximum(qo_last + kv_len - qo_len - args[0], 0), kv_len  # keys every query of the program sees


@triton.jit
def all_full_range(batch, qo_first, qo_last, qo_len, kv_len, args):
    return 0, kv_len  # wrong on purpose: claims the window hides nothing


WINDOW = AttentionVariant("window", logits_mask=(window_mask, window_mask_torch), kv_range=window_range,
                          scalars=[("window_left", torch.int32)])
WINDOW_CUT = AttentionVariant("window_cut", logits_mask=(window_mask, window_mask_torch), kv_range=cut_range,
                              scalars=[("window_left", torch.int32)])
WINDOW_FULL = AttentionVariant("window_full", logits_mask=(window_mask, window_mask_torch), kv_range=window_range,
                               kv_full_range=window_full_range, scalars=[("window_left", torch.int32)])
WINDOW_ALL_FULL = AttentionVariant("window_all_full", logits_mask=(window_mask, window_mask_torch),
                                   kv_full_range=all_full_range, scalars=[("window_left", torch.int32)])


def _planned_window_wrapper(kind, variant, device, indptr, indices, last, qo_indptr):
    """A batch decode (``kind`` "batch_decode") or paged prefill wrapper with ``variant``, planned over the
    4/2-head, d64, page-4 batch of the window tests in 16-token chunks."""
    if kind == "batch_decode":
        wr = flashtile.BatchDecodeWithPagedKVCacheWrapper(workspace(device, 1), jit_args=variant)
        wr.plan(indptr, indices, last, 4, 2, 64, 4, fixed_split_size=16)
    else:
        wr = flashtile.BatchPrefillWithPagedKVCacheWrapper(workspace(device, 1), jit_args=variant)
        wr.plan(torch.tensor(qo_indptr, dtype=torch.int32), indptr, indices, last, 4, 2, 64, 4, causal=True,
                fixed_split_size=16)
    return wr


@pytest.mark.parametrize("kind", ["single_prefill", "single_decode", "batch_decode", "paged_prefill"])
def test_window_mask_with_kv_range(path, device, kind):
    """A sliding window as a mask hook with a kv_range hook (the kernels skip the tiles before the window),
    and with a kv_full_range hook too (the tiles inside the window skip the mask), matches the oracle of the
    built-in window; a range that cuts visible keys, or a full range that holds hidden ones, changes the
    kernels' result only, so each hook is really used there (the reference path ignores both)."""
    w = 9
    # keys enough that a prefill has key tiles no causal mask touches (the loop where kv_full_range applies),
    # some of them outside the window: 75 with the interpreter's 16 x 16 tiles, 200 with the GPU's (up to
    # 128 rows x 128 keys)
    n = 200 if device.type == "cuda" else 75
    if kind.startswith("single"):
        q, k, v = make_qkv(1 if kind == "single_decode" else 21, n, 4, 2, 64, torch.float16, device)
    else:
        lens = [n, 5, 33]
        cache, indptr, indices, last = make_paged_batch(lens, 4, 2, 64, torch.float16, device)
        qo_indptr = [0, 1, 2, 3] if kind == "batch_decode" else [0, 12, 17, 18]
        q = torch.randn(qo_indptr[-1], 4, 64, dtype=torch.float16, device=device)

    def run(variant):
        """``[(out, lse, q, k, v)]`` per request."""
        if kind == "single_decode":
            out, lse = flashtile.single_decode_with_kv_cache(q[0], k, v, return_lse=True, _variant=(variant, (w,)))
            return [(out[None], lse[None], q, k, v)]
        if kind == "single_prefill":
            out, lse = flashtile.single_prefill_with_kv_cache(q, k, v, causal=True, return_lse=True,
                                                              _variant=(variant, (w,)))
            return [(out, lse, q, k, v)]
        wr = _planned_window_wrapper(kind, variant, device, indptr, indices, last, qo_indptr)
        out, lse = wr.run(q, cache, w, return_lse=True)
        rows = [slice(qo_indptr[r], qo_indptr[r + 1]) for r in range(len(lens))]
        return [(out[s], lse[s], q[s], *_request_kv(cache, indptr, indices, r, n, 4))
                for r, (s, n) in enumerate(zip(rows, lens))]

    windowed, cut, full, all_full = run(WINDOW), run(WINDOW_CUT), run(WINDOW_FULL), run(WINDOW_ALL_FULL)
    for o, s, qr, kr, vr in windowed + full:
        assert_matches_oracle(o, s, qr, kr, vr, causal=True, window_left=w)
    for wrong in (cut, all_full):
        changes = any(not torch.equal(a[0], b[0]) for a, b in zip(windowed, wrong))
        assert changes == (path == "kernel")


@pytest.mark.parametrize("kind", ["batch_decode", "paged_prefill"])
def test_batch_variant_runs_with_new_arguments(path, device, kind):
    """run() after run() with new queries and a new window scalar: each call computes with its own arguments
    (on the GPU the later calls replay the first one's launches, passing this call's extra-argument tuple; 16
    is a multiple of 16, which Triton specializes on: that call records anew)."""
    lens = [70, 5, 33]
    cache, indptr, indices, last = make_paged_batch(lens, 4, 2, 64, torch.float16, device)
    qo_indptr = [0, 1, 2, 3] if kind == "batch_decode" else [0, 12, 17, 18]
    wr = _planned_window_wrapper(kind, WINDOW_FULL, device, indptr, indices, last, qo_indptr)
    out = torch.empty(qo_indptr[-1], 4, 64, dtype=torch.float16, device=device)
    for w in (9, 5, 9, 16, 16):
        q = torch.randn(qo_indptr[-1], 4, 64, dtype=torch.float16, device=device)
        got, lse = wr.run(q, cache, w, out=out, return_lse=True)
        assert got is out
        for r, n in enumerate(lens):
            rows = slice(qo_indptr[r], qo_indptr[r + 1])
            assert_matches_oracle(out[rows], lse[rows], q[rows], *_request_kv(cache, indptr, indices, r, n, 4),
                                  causal=True, window_left=w)


# POD (prefill half and decode half) and BatchAttention take a variant through jit_args too

# run()'s positional parameters between paged_kv_cache_d and *args, at their defaults, with causal_p,
# return_lse_p and return_lse_d on (upstream puts the variant's extra arguments after enable_pdl)
_POD_POSITIONAL = [None, None, True, "NHD", "NONE", None, -1, None, None, True, None, None, False, "NHD", "NONE",
                   None, -1, None, None, None, None, None, True, False, None]


@pytest.mark.parametrize("variant", ["softcap", "window"])
def test_pod_with_variant(path, device, variant):
    """POD's jit_args variant runs on both halves with run()'s extra arguments (after enable_pdl, as upstream),
    and each half matches the oracle of the same feature as a built-in flag."""
    hq, hk, d, ps = 4, 2, 64, 4
    q_p, k_p, v_p = make_qkv(13, 40, hq, hk, d, torch.float16, device)
    lens = [30, 1, 12]
    cache, indptr, indices, last = make_paged_batch(lens, ps, hk, d, torch.float16, device)
    q_d = torch.randn(len(lens), hq, d, dtype=torch.float16, device=device)
    var, extra, flag = (SOFTCAP, 2.5, dict(logits_soft_cap=2.5)) if variant == "softcap" else \
        (WINDOW_FULL, 6, dict(window_left=6))
    w = flashtile.PODWithPagedKVCacheWrapper(workspace(device, 1), jit_args=var)
    w.plan(indptr, indices, last, hq, hk, d, ps, q_data_type=torch.float16)
    (out_p, lse_p), (out_d, lse_d) = w.run(q_p, k_p, v_p, q_d, cache, *_POD_POSITIONAL, extra)
    assert_matches_oracle(out_p, lse_p, q_p, k_p, v_p, causal=True, **flag)
    for r, n in enumerate(lens):
        assert_matches_oracle(out_d[r:r + 1], lse_d[r:r + 1], q_d[r:r + 1],
                              *_request_kv(cache, indptr, indices, r, n, ps), causal=True, **flag)
    with pytest.raises(ValueError, match="expected 1 extra arguments"):
        w.run(q_p, k_p, v_p, q_d, cache)


def test_pod_variant_errors(device):
    with pytest.raises(NotImplementedError, match="C\\+\\+ variant"):
        flashtile.PODWithPagedKVCacheWrapper(workspace(device, 1), jit_args=(
            "uri", torch.float16, torch.float16, torch.float16, torch.int32, 64, 64, [], [], [], [], "V",
            "struct V {};"))
    w = flashtile.PODWithPagedKVCacheWrapper(workspace(device, 1))
    cache, indptr, indices, last = make_paged_batch([5], 4, 2, 64, torch.float16, device)
    w.plan(indptr, indices, last, 4, 2, 64, 4, q_data_type=torch.float16)
    q_p, k_p, v_p = make_qkv(3, 5, 4, 2, 64, torch.float16, device)
    with pytest.raises(ValueError, match="this wrapper has none"):
        w.run(q_p, k_p, v_p, torch.randn(1, 4, 64, dtype=torch.float16, device=device), cache, *_POD_POSITIONAL, 2.5)


@pytest.mark.parametrize("split_row_classes", [False, True])
def test_batch_attention_with_variant(path, device, split_row_classes):
    """BatchAttention's jit_args variant (a flashtile extension) over a mixed batch, one plan or two row
    classes, with its extra arguments in run()'s ``variant_args``."""
    lens, qo_lens = [40, 50, 30, 1], [40, 35, 1, 1]  # two row classes: 80 and 70 rows, then 2 and 2
    hq, hk, d, ps = 4, 2, 64, 4
    cache, indptr, indices, last = make_paged_batch(lens, ps, hk, d, torch.float16, device)
    qo_indptr = torch.tensor([0] + list(torch.tensor(qo_lens).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(qo_indptr[-1]), hq, d, dtype=torch.float16, device=device)
    w = flashtile.BatchAttention("NHD", device, jit_args=SOFTCAP)
    w.split_row_classes = split_row_classes
    w.plan(qo_indptr, indptr, indices, torch.tensor(lens, dtype=torch.int32), hq, hk, d, d, ps, causal=True,
           q_data_type=torch.float16, kv_data_type=torch.float16)
    assert (w._split_row is not None) == split_row_classes
    out, lse = w.run(q, cache, variant_args=(2.5,))
    for r, n in enumerate(lens):
        rows = slice(int(qo_indptr[r]), int(qo_indptr[r + 1]))
        assert_matches_oracle(out[rows], lse[rows], q[rows], *_request_kv(cache, indptr, indices, r, n, ps),
                              causal=True, logits_soft_cap=2.5)


def test_kv_full_range_needs_a_mask():
    with pytest.raises(ValueError, match="kv_full_range"):
        AttentionVariant("no_mask", kv_full_range=window_full_range)


@pytest.mark.parametrize("builtin", [True, False], ids=["sinks=", "user"])
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_sinks(path, device, builtin, kind):
    """Sinks on the single-request functions, three calls with new inputs and sinks (on the GPU the later ones
    replay the first one's launches with this call's sinks)."""
    qo_len = 1 if kind == "decode" else 10
    for _ in range(3):
        q, k, v = make_qkv(qo_len, 33, 4, 2, 64, torch.float16, device)
        sinks = torch.randn(4, device=device) * 2
        extra = dict(sinks=sinks) if builtin else dict(_variant=(SINKS, (sinks,)))
        if kind == "decode":
            out, lse = flashtile.single_decode_with_kv_cache(q[0], k, v, return_lse=True, **extra)
            out, lse = out[None], lse[None]
        else:
            out, lse = flashtile.single_prefill_with_kv_cache(q, k, v, causal=True, return_lse=True, **extra)
        ref_o, ref_lse = sink_attention_oracle(q, k, v, sinks.cpu(), causal=kind == "prefill")
        torch.testing.assert_close(out.double().cpu(), ref_o, **TOL)
        torch.testing.assert_close(lse.double().cpu(), ref_lse, atol=1e-3, rtol=1e-3)


def test_sinks_with_split_kv(device, monkeypatch):
    """A sink is counted once when the KV range is split across programs (the kernels' split-KV merge)."""
    monkeypatch.setenv("FLASHTILE_BACKEND", "triton")
    from flashtile._core.attention_args import normalize_single_attention
    from flashtile._core.variant_args import bind_single_variant, sink_variant
    from flashtile.kernels.attention import single_attention_forward

    q, k, v = make_qkv(1, 70, 4, 2, 64, torch.float16, device)
    sinks = torch.randn(4, device=device)
    args = normalize_single_attention(
        q, k, v, kv_layout="NHD", pos_encoding_mode="NONE", causal=False, custom_mask=None, packed_custom_mask=None,
        q_scale=None, k_scale=None, v_scale=None, window_left=-1, logits_soft_cap=None, sm_scale=None, rope_scale=None,
        rope_theta=None, out_dtype=None, backend="triton")
    out = torch.full((1, 4, 64), float("nan"), dtype=torch.float16, device=device)
    lse = torch.full((1, 4), float("nan"), device=device)
    single_attention_forward(args.q, args.k, args.v, out, lse, args.params, packed_mask=None, kind="decode",
                             num_splits=3, variant=bind_single_variant((sink_variant(), (sinks,)), args))
    ref_o, ref_lse = sink_attention_oracle(q, k, v, sinks.cpu())
    torch.testing.assert_close(out.double().cpu(), ref_o, **TOL)
    torch.testing.assert_close(lse.double().cpu(), ref_lse, atol=1e-3, rtol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# Batch wrappers (jit_args=, extra run() arguments, sinks=)
# ----------------------------------------------------------------------------------------------------------


def _jit_args(variant, names=(), dtypes=()):
    return (variant.name, torch.float16, torch.float16, torch.float16, torch.int32, 64, 64, [], [], list(names),
            list(dtypes), variant.name, variant)


@pytest.mark.parametrize("use_tensor_cores", [False, True])
def test_batch_decode_flash_sigmoid(path, device, use_tensor_cores):
    lens = [5, 40, 17]
    cache, indptr, indices, last = make_paged_batch(lens, 4, 2, 64, torch.float16, device)
    w = flashtile.BatchDecodeWithPagedKVCacheWrapper(workspace(device, 1), use_tensor_cores=use_tensor_cores,
                                                     jit_args=_jit_args(FLASH_SIGMOID_DECLARED))
    w.plan(indptr, indices, last, 4, 2, 64, 4)
    q = torch.randn(3, 4, 64, dtype=torch.float16, device=device)
    out = w.run(q, cache, 0.125, 0.5)
    for r, n in enumerate(lens):
        k, v = _request_kv(cache, indptr, indices, r, n, 4)
        ref = sigmoid_attention_oracle(q[r:r + 1], k, v, 0.125, 0.5)
        torch.testing.assert_close(out[r:r + 1].double().cpu(), ref, **SUM_TOL)


@pytest.mark.parametrize("paged", [False, True], ids=["ragged", "paged"])
def test_batch_prefill_flash_sigmoid(path, device, paged):
    qo, kv = [3, 9], [7, 30]
    q = torch.randn(sum(qo), 4, 64, dtype=torch.float16, device=device)
    qo_indptr = torch.tensor([0, 3, 12], dtype=torch.int32)
    jit = _jit_args(FLASH_SIGMOID, ["logits_scale", "sigmoid_bias"], ["float", "float"])
    if paged:
        cache, indptr, indices, last = make_paged_batch(kv, 4, 2, 64, torch.float16, device)
        w = flashtile.BatchPrefillWithPagedKVCacheWrapper(workspace(device, 1), backend="fa2", jit_args=jit)
        w.plan(qo_indptr, indptr, indices, last, 4, 2, 64, 4, causal=True)
        out = w.run(q, cache, 0.125, -0.5)
        kvs = [_request_kv(cache, indptr, indices, r, n, 4) for r, n in enumerate(kv)]
    else:
        k = torch.randn(sum(kv), 2, 64, dtype=torch.float16, device=device)
        v = torch.randn(sum(kv), 2, 64, dtype=torch.float16, device=device)
        w = flashtile.BatchPrefillWithRaggedKVCacheWrapper(workspace(device, 1), backend="fa2", jit_args=jit)
        w.plan(qo_indptr, torch.tensor([0, 7, 37], dtype=torch.int32), 4, 2, 64, causal=True)
        out = w.run(q, k, v, 0.125, -0.5)
        kvs = [(k[:7], v[:7]), (k[7:], v[7:])]
    for r in range(2):
        rows = slice(int(qo_indptr[r]), int(qo_indptr[r + 1]))
        ref = sigmoid_attention_oracle(q[rows], *kvs[r], 0.125, -0.5, causal=True)
        torch.testing.assert_close(out[rows].double().cpu(), ref, **SUM_TOL)


@pytest.mark.parametrize("wrapper", ["decode", "paged_prefill"])
def test_batch_sinks(path, device, wrapper):
    """Sinks on the batch wrappers, over three run()s with new queries and sinks (on the GPU the later ones
    replay the first one's launches with this call's sinks)."""
    lens = [6, 35]
    cache, indptr, indices, last = make_paged_batch(lens, 4, 2, 64, torch.float16, device)
    if wrapper == "decode":
        w = flashtile.BatchDecodeWithPagedKVCacheWrapper(workspace(device, 1))
        w.plan(indptr, indices, last, 4, 2, 64, 4)
        qo_indptr = [0, 1, 2]
    else:
        qo_indptr = [0, 4, 9]
        w = flashtile.BatchPrefillWithPagedKVCacheWrapper(workspace(device, 1))
        w.plan(torch.tensor(qo_indptr, dtype=torch.int32), indptr, indices, last, 4, 2, 64, 4, causal=True)
    for _ in range(3):
        sinks = torch.randn(4, device=device)
        q = torch.randn(qo_indptr[-1], 4, 64, dtype=torch.float16, device=device)
        out, lse = w.run(q, cache, sinks=sinks, return_lse=True)
        for r, n in enumerate(lens):
            rows = slice(qo_indptr[r], qo_indptr[r + 1])
            ref_o, ref_lse = sink_attention_oracle(q[rows], *_request_kv(cache, indptr, indices, r, n, 4),
                                                   sinks.cpu(), causal=wrapper != "decode")
            torch.testing.assert_close(out[rows].double().cpu(), ref_o, **TOL)
            torch.testing.assert_close(lse[rows].double().cpu(), ref_lse, atol=1e-3, rtol=1e-3)


def _request_kv(cache, indptr, indices, r, n, page_size):
    ids = indices[int(indptr[r]):int(indptr[r + 1])].long().to(cache.device)
    return cache[ids, 0].flatten(0, 1)[:n], cache[ids, 1].flatten(0, 1)[:n]


# ----------------------------------------------------------------------------------------------------------
# MLA (flashtile.mla): the hooks see one KV head with keys [ckv | kpe] and values ckv
# ----------------------------------------------------------------------------------------------------------

MLA_DC, MLA_DP = (512, 64) if HAS_CUDA else (32, 16)


def _mla_request(batch, r):
    """Request ``r`` of an MLA batch as MQA: q ``[qo, H, Dc + Dp]``, k ``[kv, 1, Dc + Dp]``, v ``[kv, 1, Dc]``."""
    q_nope, q_pe, ckv, kpe, qo_indptr, kv_indptr, kv_indices, lens = batch
    rows = slice(int(qo_indptr[r]), int(qo_indptr[r + 1]))
    ids = kv_indices[int(kv_indptr[r]):int(kv_indptr[r + 1])].long().to(ckv.device)
    n = int(lens[r])
    c, p = ckv[ids].flatten(0, 1)[:n], kpe[ids].flatten(0, 1)[:n]
    return rows, torch.cat([q_nope[rows], q_pe[rows]], -1), torch.cat([c, p], -1)[:, None], c[:, None]


def _mla_wrapper(device, batch, heads, page_size, causal, sm_scale, **kw):
    plan_kw = {k: kw.pop(k) for k in ("fixed_split_size",) if k in kw}
    w = flashtile.mla.BatchMLAPagedAttentionWrapper(workspace(device), **kw)
    q_nope, q_pe, ckv, kpe, qo_indptr, kv_indptr, kv_indices, lens = batch
    w.plan(qo_indptr, kv_indptr, kv_indices, lens, heads, MLA_DC, MLA_DP, page_size, causal, sm_scale,
           q_nope.dtype, ckv.dtype, **plan_kw)
    return w


@pytest.mark.parametrize("builtin", [True, False], ids=["sinks=", "user"])
def test_mla_sinks_with_split_kv(path, device, builtin):
    """Sinks on MLA, counted once per row when the KV is split (fixed 16-token chunks) and merged; a
    request with no keys gets out 0 and lse = the sink."""
    heads, page_size = 4, 16
    batch = make_mla_batch([1, 3, 1], [70, 41, 0], page_size, heads, MLA_DC, MLA_DP, torch.float16, device)
    sinks = torch.randn(heads, device=device) * 2
    extra = {} if builtin else dict(jit_args=SINKS)
    w = _mla_wrapper(device, batch, heads, page_size, True, 0.2, fixed_split_size=16, **extra)
    for step in range(3):  # new sinks and queries each time (on the GPU, later run()s replay the first one's launches)
        if step:
            sinks = torch.randn(heads, device=device) * 2
            batch = (torch.randn_like(batch[0]), torch.randn_like(batch[1]), *batch[2:])
        run_kw = dict(sinks=sinks) if builtin else dict(variant_args=(sinks,))
        out, lse = w.run(*batch[:4], return_lse=True, **run_kw)
        for r in range(3):
            rows, q, k, v = _mla_request(batch, r)
            ref_o, ref_lse = sink_attention_oracle(q, k, v, sinks.cpu(), causal=True, sm_scale=0.2)
            torch.testing.assert_close(out[rows].double().cpu(), ref_o, **TOL)
            torch.testing.assert_close(lse[rows].double().cpu(), ref_lse, atol=1e-3, rtol=1e-3)


def test_mla_flash_sigmoid_and_key_mask(path, device):
    """A variant without softmax (whole rows: the plan does not split) on MLA, and a mask hook with a
    softmax variant, both against float64 oracles."""
    heads, page_size = 2, 4
    batch = make_mla_batch([1, 5], [9, 30], page_size, heads, MLA_DC, MLA_DP, torch.float16, device)
    w = _mla_wrapper(device, batch, heads, page_size, True, 0.2, jit_args=FLASH_SIGMOID_DECLARED)
    out = w.run(*batch[:4], variant_args=(0.05, -0.5))
    assert w._plan.meta.max_splits == 1
    bits = torch.randint(0, 256, (8,), dtype=torch.uint8, device=device)
    masked = AttentionVariant("key_bits", logits_mask=(key_bit_mask, key_bit_mask_torch),
                              tensors=[("bits", torch.uint8)])
    wm = _mla_wrapper(device, batch, heads, page_size, False, 0.2, jit_args=masked, fixed_split_size=16)
    out_m, lse_m = wm.run(*batch[:4], variant_args=(bits,), return_lse=True)
    for r in range(2):
        rows, q, k, v = _mla_request(batch, r)
        ref = sigmoid_attention_oracle(q, k, v, 0.05, -0.5, causal=True)
        torch.testing.assert_close(out[rows].double().cpu(), ref, **SUM_TOL)
        n = k.shape[0]
        keep = ((bits.cpu()[torch.arange(n) // 8].int() >> (torch.arange(n) % 8)) & 1).bool()
        ref_o, ref_lse = attention_oracle(q, k[keep], v[keep], causal=False, sm_scale=0.2)
        torch.testing.assert_close(out_m[rows].double().cpu(), ref_o, **TOL)
        torch.testing.assert_close(lse_m[rows].double().cpu(), ref_lse, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("variant", [WINDOW, WINDOW_FULL], ids=["kv_range", "kv_full_range"])
def test_mla_window_with_kv_range(path, device, variant):
    """MLA with the window mask and its kv_range (tiles before the window skipped) against the oracle; a
    kv_full_range hook too (the MLA kernel takes it and masks every tile as before)."""
    heads, page_size, w = 2, 4, 7
    batch = make_mla_batch([1, 6], [70, 40], page_size, heads, MLA_DC, MLA_DP, torch.float16, device)
    wr = _mla_wrapper(device, batch, heads, page_size, True, 0.2, jit_args=variant, fixed_split_size=16)
    out, lse = wr.run(*batch[:4], variant_args=(w,), return_lse=True)
    for r in range(2):
        rows, q, k, v = _mla_request(batch, r)
        ref_o, ref_lse = attention_oracle(q, k, v, causal=True, window_left=w, sm_scale=0.2)
        torch.testing.assert_close(out[rows].double().cpu(), ref_o, **TOL)
        torch.testing.assert_close(lse[rows].double().cpu(), ref_lse, atol=1e-3, rtol=1e-3)


@triton.jit
def halve_query(q, batch, qo_idx, qo_head, qo_len, kv_len, args):
    return q * 0.5


def test_mla_variant_errors(device):
    batch = make_mla_batch([1], [5], 4, 2, MLA_DC, MLA_DP, torch.float16, device)
    scaled_q = AttentionVariant("scaled_q", query_transform=halve_query)
    with pytest.raises(NotImplementedError, match="query_transform"):
        flashtile.mla.BatchMLAPagedAttentionWrapper(workspace(device), jit_args=scaled_q)
    w = _mla_wrapper(device, batch, 2, 4, True, 0.2, jit_args=FLASH_SIGMOID_DECLARED)
    with pytest.raises(ValueError, match="expected 2 extra arguments"):
        w.run(*batch[:4], variant_args=(0.05,))
    w = _mla_wrapper(device, batch, 2, 4, True, 0.2)
    with pytest.raises(ValueError, match="extra positional"):
        w.run(*batch[:4], variant_args=(0.05,))
    with pytest.raises(ValueError, match="sinks"):
        w.run(*batch[:4], sinks=torch.zeros(3, device=device))


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------


def test_cpp_variant_raises_with_porting_advice(device):
    with pytest.raises(NotImplementedError, match="Port it to flashtile.AttentionVariant"):
        gen_customize_single_prefill_module("fa2", "u", torch.float16, torch.float16, torch.float16, 64, 64, [], [],
                                            [], [], "V", "struct V : AttentionVariantBase {};")
    with pytest.raises(NotImplementedError, match="C\\+\\+"):
        AttentionVariant("v", logits_transform="return logits;")
    with pytest.raises(ValueError, match="'auto'"):
        gen_customize_batch_prefill_module("auto", "u", torch.float16, torch.float16, torch.float16, torch.int32, 64,
                                           64, [], [], [], [], "V", FLASH_SIGMOID)
    with pytest.raises(TypeError, match="@triton.jit"):
        AttentionVariant("v", logits_transform=lambda *a: a[0])


def test_extra_argument_errors(device):
    q, k, v = make_qkv(1, 9, 4, 2, 64, torch.float16, device)
    run = flashtile.single_decode_with_kv_cache
    slopes = torch.ones(4, device=device)
    with pytest.raises(TypeError, match="alibi_slopes.*float32"):
        run(q[0], k, v, _variant=(ALIBI, (slopes.half(),)))
    with pytest.raises(ValueError, match="alibi_slopes.*shape"):
        run(q[0], k, v, _variant=(ALIBI, (torch.ones(3, device=device),)))
    with pytest.raises(ValueError, match="expected 1 extra arguments"):
        run(q[0], k, v, _variant=(ALIBI, ()))
    with pytest.raises(TypeError, match="cap.*float"):
        run(q[0], k, v, _variant=(SOFTCAP, ("2.0",)))
    with pytest.raises(ValueError, match="sinks"):
        run(q[0], k, v, sinks=torch.ones(3, device=device))
    with pytest.raises(TypeError, match="sinks"):
        run(q[0], k, v, sinks=torch.ones(4, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="names must be unique"):
        AttentionVariant("v", tensors=[("a", torch.float32)], scalars=[("a", torch.float32)])
    with pytest.raises(TypeError, match="scalars"):
        AttentionVariant("v", scalars=[("a", torch.bool)])
    with pytest.raises(NotImplementedError, match="mask_mode"):
        single_prefill_with_kv_cache_with_jit_module(_prefill_module(SOFTCAP), q, k, v, 1.0, mask_mode=2)
    w = flashtile.BatchDecodeWithPagedKVCacheWrapper(workspace(device, 1), jit_args=_jit_args(SOFTCAP))
    cache, indptr, indices, last = make_paged_batch([5], 4, 2, 64, torch.float16, device)
    w.plan(indptr, indices, last, 4, 2, 64, 4)
    with pytest.raises(ValueError, match="expected 1 extra arguments"):
        w.run(q, cache)


def test_variant_without_twin_on_reference(device, monkeypatch):
    monkeypatch.setenv("FLASHTILE_BACKEND", "reference")
    q, k, v = make_qkv(1, 9, 4, 2, 64, torch.float16, device)
    bare = AttentionVariant("bare", logits_transform=softcap_logits, scalars=[("cap", torch.float32)])
    with pytest.raises(NotImplementedError, match="no PyTorch twin"):
        flashtile.single_decode_with_kv_cache(q[0], k, v, _variant=(bare, (1.0,)))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_variants_at_gpu_shapes(device):
    """Variants at real sizes on the GPU (the split-KV and Hopper-routing paths)."""
    q, k, v = make_qkv(1, 8192, 32, 8, 128, torch.float16, device)
    sinks = torch.randn(32, device=device)
    out, lse = flashtile.single_decode_with_kv_cache(q[0], k, v, sinks=sinks, return_lse=True)
    ref_o, ref_lse = sink_attention_oracle(q, k, v, sinks.cpu())
    torch.testing.assert_close(out[None].double().cpu(), ref_o, **TOL)
    q, k, v = make_qkv(1024, 1024, 8, 8, 128, torch.float16, device)
    out, lse = flashtile.single_prefill_with_kv_cache(q, k, v, causal=True, return_lse=True,
                                                      _variant=(SOFTCAP, (30.0,)))
    assert_matches_oracle(out, lse, q, k, v, causal=True, logits_soft_cap=30.0)
    assert math.isfinite(float(lse.float().mean()))


def test_cascade_with_variant(path, device):
    """MultiLevelCascadeAttentionWrapper(jit_args=...): the variant runs at every level, states merge."""
    from flashtile.cascade import MultiLevelCascadeAttentionWrapper
    from test_cascade import PagePool, cascade_oracle, check, indptr_of

    pool = PagePool(64, 4, 2, 64, torch.float16, device)
    qo = [2, 1, 3]
    qo_indptrs, tables = [indptr_of([sum(qo)]), indptr_of(qo)], [pool.table([11]), pool.table([5, 0, 9])]
    q = torch.randn(sum(qo), 4, 64, dtype=torch.float16, device=device)
    w = MultiLevelCascadeAttentionWrapper(2, workspace(device), jit_args=SOFTCAP)
    w.plan(qo_indptrs, [t[0] for t in tables], [t[1] for t in tables], [t[2] for t in tables], 4, 2, 64, 4,
           causal=True)
    check(w.run(q, pool.cache, 2.0), q, cascade_oracle(q, pool, qo_indptrs, tables, True, logits_soft_cap=2.0))
    with pytest.raises(NotImplementedError, match="merged"):
        MultiLevelCascadeAttentionWrapper(2, workspace(device), jit_args=FLASH_SIGMOID_DECLARED)


def test_logits_transform_excludes_softcap_and_alibi_flags(path, device):
    q, k, v = make_qkv(3, 9, 4, 2, 64, torch.float16, device)
    with pytest.raises(NotImplementedError, match="logits_soft_cap or ALiBi"):
        flashtile.single_prefill_with_kv_cache(q, k, v, logits_soft_cap=5.0, _variant=(SOFTCAP, (2.0,)))
    with pytest.raises(NotImplementedError, match="logits_soft_cap or ALiBi"):
        flashtile.single_prefill_with_kv_cache(q, k, v, pos_encoding_mode="ALIBI", _variant=(SOFTCAP, (2.0,)))
    logits = torch.zeros(4, 3, 18, device=device)[:, :, ::2]
    with pytest.raises(ValueError, match="output_logits.*contiguous"):
        single_prefill_with_kv_cache_with_jit_module(_prefill_module(DUMP_LOGITS), q, k, v, logits)


def test_variant_call_does_not_import_dynamo():
    """A call with a variant needs no graph-break wrapper until torch._dynamo is loaded; importing it
    (about 1.5 s) was most of a variant's first call from Triton's cache."""
    code = ("import sys, torch, flashtile\n"
            "q, k = torch.randn(5, 4, 64, dtype=torch.float16), torch.randn(9, 2, 64, dtype=torch.float16)\n"
            "flashtile.single_prefill_with_kv_cache(q, k, k, causal=True, sinks=torch.zeros(4))\n"
            "assert 'torch._dynamo' not in sys.modules, 'a variant call imported torch._dynamo'\n")
    root = pathlib.Path(__file__).resolve().parent.parent
    env = dict(os.environ, FLASHTILE_BACKEND="reference", PYTHONPATH=str(root))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_variant_under_torch_compile(device, monkeypatch):
    """A call with a variant runs eagerly inside a compiled function (a graph break), with the same result."""
    monkeypatch.setenv("FLASHTILE_BACKEND", "reference")
    q, k, v = make_qkv(5, 9, 4, 2, 64, torch.float16, device)
    sinks = torch.randn(4, device=device)

    def f(q, k, v, s):
        return flashtile.single_prefill_with_kv_cache(q, k, v, causal=True, sinks=s) * 2

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, backend="eager")(q, k, v, sinks), f(q, k, v, sinks))
