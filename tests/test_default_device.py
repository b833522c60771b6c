"""flashtile creates every internal tensor on the device it means, whatever ``torch.set_default_device``
says (engines and test suites run with ``torch.set_default_device("cuda")``).

On a machine without a GPU the default device is set to ``"meta"``: a tensor that flashtile creates
without naming its device then lands on meta, and the call fails (CPU and meta tensors do not mix) or
returns meta tensors. Each case runs once normally and once under the meta default, and must return
the same values on the inputs' device. (Correctness against the oracles is tested elsewhere; this
test is about placement.) With a GPU the cases run on CUDA inputs, and also under a CUDA default.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.overrides import _get_current_function_mode_stack
from torch.utils._device import DeviceContext

import flashtile
import flashtile.sampling as S

CPU = torch.device("cpu")
F16 = torch.float16  # attention inputs


@contextlib.contextmanager
def default_device(device):
    """``torch.set_default_device(device)`` for the block; the previous default is restored after it.
    With none set before, none is left (``set_default_device("cpu")`` would leave a device mode active,
    which breaks later tests' torch.compile)."""
    previous = torch.get_default_device()
    had_mode = any(isinstance(m, DeviceContext) for m in _get_current_function_mode_stack())
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(previous if had_mode else None)


class Inputs:
    """Random inputs on ``device``, drawn on the CPU from one seeded generator; every tensor names its
    device, so building inputs never depends on the default device."""

    def __init__(self, device):
        self.device = device
        self.gen = torch.Generator(device="cpu").manual_seed(7)

    def randn(self, *shape, dtype=torch.float32):
        x = torch.randn(*shape, generator=self.gen, dtype=torch.float32, device=CPU)
        return x.to(device=self.device, dtype=dtype)

    def f16(self, *shape):
        return self.randn(*shape, dtype=F16)

    def bits(self, n, p_true):
        return torch.rand(n, generator=self.gen, device=CPU).lt(p_true).to(self.device)

    def i32(self, values):
        return torch.tensor(values, dtype=torch.int32, device=self.device)

    def zeros_i32(self, n):
        return torch.zeros(n, dtype=torch.int32, device=self.device)

    def workspace(self):
        return torch.empty(4 * 1024 * 1024, dtype=torch.uint8, device=self.device)

    def page_table(self):
        """Two requests on 4-token pages: 6 tokens (pages 3, 0) and 3 tokens (page 2); page 1 unused.
        (indptr, indices, last_page_len)."""
        return self.i32([0, 2, 3]), self.i32([3, 0, 2]), self.i32([2, 3])

    def paged_cache(self):
        return self.f16(4, 2, 4, 2, 16)  # pages, K/V, page_size 4, 2 KV heads, head_dim 16


# Each case builds its inputs (outside the default-device block) and returns a thunk that makes the
# API calls and returns the tensors to compare. Thunks that call in-place APIs work on clones, so that
# both runs see the same inputs. Attention: 4 query heads, 2 KV heads, head_dim 16, query rows 3 + 2.


def _single_decode(x: Inputs):
    q, k, v = x.f16(4, 16), x.f16(7, 2, 16), x.f16(7, 2, 16)
    return lambda: flashtile.single_decode_with_kv_cache(q, k, v)


def _single_prefill(x: Inputs):
    q, k, v = x.f16(5, 4, 16), x.f16(7, 2, 16), x.f16(7, 2, 16)
    return lambda: flashtile.single_prefill_with_kv_cache(q, k, v, causal=True, return_lse=True)


def _batch_decode(x: Inputs):
    (indptr, indices, last), cache, q, ws = x.page_table(), x.paged_cache(), x.f16(2, 4, 16), x.workspace()

    def run():
        w = flashtile.BatchDecodeWithPagedKVCacheWrapper(ws)
        w.plan(indptr, indices, last, 4, 2, 16, 4, q_data_type=F16)
        return w.run(q, cache, return_lse=True)
    return run


def _batch_prefill_paged(x: Inputs):
    (indptr, indices, last), cache, q, ws = x.page_table(), x.paged_cache(), x.f16(5, 4, 16), x.workspace()
    qo_indptr = x.i32([0, 3, 5])

    def run():
        w = flashtile.BatchPrefillWithPagedKVCacheWrapper(ws)
        w.plan(qo_indptr, indptr, indices, last, 4, 2, 16, 4, causal=True, q_data_type=F16)
        return w.run(q, cache, return_lse=True)
    return run


def _batch_prefill_ragged(x: Inputs):
    qo_indptr, kv_indptr = x.i32([0, 3, 5]), x.i32([0, 6, 9])
    q, k, v, ws = x.f16(5, 4, 16), x.f16(9, 2, 16), x.f16(9, 2, 16), x.workspace()

    def run():
        w = flashtile.BatchPrefillWithRaggedKVCacheWrapper(ws)
        w.plan(qo_indptr, kv_indptr, 4, 2, 16, causal=True, q_data_type=F16)
        return w.run(q, k, v, return_lse=True)
    return run


def _batch_attention(x: Inputs):
    (indptr, indices, _), cache, q = x.page_table(), x.paged_cache(), x.f16(5, 4, 16)
    qo_indptr, kv_lens = x.i32([0, 3, 5]), x.i32([6, 3])

    def run():
        w = flashtile.BatchAttention(device=x.device)
        w.plan(qo_indptr, indptr, indices, kv_lens, 4, 2, 16, 16, 4, causal=True, q_data_type=F16, kv_data_type=F16)
        return w.run(q, cache)
    return run


def _pod(x: Inputs):
    (indptr, indices, last), cache, q_d, ws = x.page_table(), x.paged_cache(), x.f16(2, 4, 16), x.workspace()
    q_p, k_p, v_p = x.f16(5, 4, 16), x.f16(7, 2, 16), x.f16(7, 2, 16)

    def run():
        w = flashtile.PODWithPagedKVCacheWrapper(ws)
        w.plan(indptr, indices, last, 4, 2, 16, 4, q_data_type=F16)
        return w.run(q_p, k_p, v_p, q_d, cache, causal_p=True)
    return run


def _graph_mode_and_custom_mask(x: Inputs):
    """Wrappers with use_cuda_graph=True (plan writes into the constructor's buffers) and a custom mask."""
    (indptr, indices, last), cache, ws = x.page_table(), x.paged_cache(), x.workspace()
    qo_indptr = x.i32([0, 3, 5])
    q_decode, q = x.f16(2, 4, 16), x.f16(5, 4, 16)
    mask = x.bits(3 * 6 + 2 * 3, 0.7)  # each request's [qo_len, kv_len] mask, flattened

    def run():
        d = flashtile.BatchDecodeWithPagedKVCacheWrapper(
            ws, use_cuda_graph=True, paged_kv_indptr_buffer=x.zeros_i32(3), paged_kv_indices_buffer=x.zeros_i32(8),
            paged_kv_last_page_len_buffer=x.zeros_i32(2))
        d.plan(indptr, indices, last, 4, 2, 16, 4, q_data_type=F16)
        p = flashtile.BatchPrefillWithPagedKVCacheWrapper(
            ws, use_cuda_graph=True, qo_indptr_buf=x.zeros_i32(3), paged_kv_indptr_buf=x.zeros_i32(3),
            paged_kv_indices_buf=x.zeros_i32(8), paged_kv_last_page_len_buf=x.zeros_i32(2),
            custom_mask_buf=torch.zeros(16, dtype=torch.uint8, device=x.device), mask_indptr_buf=x.zeros_i32(3))
        p.plan(qo_indptr, indptr, indices, last, 4, 2, 16, 4, custom_mask=mask, q_data_type=F16)
        return (*d.run(q_decode, cache, return_lse=True), *p.run(q, cache, return_lse=True))
    return run


def _cascade(x: Inputs):
    """Two levels: a shared 4-token prefix (page 1) and the two requests of the page table."""
    (indptr, indices, last), cache, q, ws = x.page_table(), x.paged_cache(), x.f16(5, 4, 16), x.workspace()
    qo_indptrs = [x.i32([0, 5]), x.i32([0, 3, 5])]
    kv_indptrs, kv_indices, last_page_lens = [x.i32([0, 1]), indptr], [x.i32([1]), indices], [x.i32([4]), last]

    def run():
        w = flashtile.MultiLevelCascadeAttentionWrapper(2, ws)
        w.plan(qo_indptrs, kv_indptrs, kv_indices, last_page_lens, 4, 2, 16, 4, causal=True, q_data_type=F16)
        return w.run(q, cache)
    return run


def _merge(x: Inputs):
    v_a, v_b, v_all = x.randn(3, 2, 16), x.randn(3, 2, 16), x.randn(3, 4, 2, 16)
    s_a, s_b, s_all = x.randn(3, 2), x.randn(3, 2), x.randn(3, 4, 2)
    mask = torch.tensor([True, False, True], device=x.device)

    def run():
        v, s = v_a.clone(), s_a.clone()
        flashtile.merge_state_in_place(v, s, v_b, s_b, mask=mask)
        return (*flashtile.merge_state(v_a, s_a, v_b, s_b), v, s, *flashtile.merge_states(v_all, s_all))
    return run


def _sampling(x: Inputs):
    B, V, n = 3, 9, 2
    logits = x.randn(B, V) * 2
    probs = torch.softmax(logits, -1)
    top_k = torch.tensor([2, 9, 4], device=x.device)
    top_p = torch.tensor([0.5, 0.9, 1.0], device=x.device)
    indices = x.i32([2, 0, 0, 1])
    draft, target = torch.softmax(x.randn(B, n, V), -1), torch.softmax(x.randn(B, n + 1, V), -1)
    draft_ids = x.i32([[1, 4], [0, 8], [3, 3]])
    rng = dict(seed=3, offset=0)

    def run():
        generator = torch.Generator(device=x.device).manual_seed(5)
        return (
            S.sampling_from_probs(probs, indices, **rng),
            S.sampling_from_probs(probs, generator=generator, return_valid=True)[0],
            S.sampling_from_logits(logits, indices, **rng),
            S.top_p_sampling_from_probs(probs, top_p, **rng),
            S.top_k_sampling_from_probs(probs, 3, **rng),
            S.min_p_sampling_from_probs(probs, 0.2, **rng),
            S.top_k_top_p_sampling_from_probs(probs, top_k, 0.8, **rng),
            S.top_k_top_p_sampling_from_logits(logits, 3, top_p, filter_apply_order="joint", **rng),
            S.softmax(logits, 0.7), S.softmax(logits, top_p),
            S.top_p_renorm_probs(probs, 0.6), S.top_k_renorm_probs(probs, top_k), S.top_k_mask_logits(logits, 4),
            *S.chain_speculative_sampling(draft, draft_ids, target, **rng),
        )
    return run


def _rope(x: Inputs):
    q, k = x.randn(5, 4, 16), x.randn(5, 2, 16)
    indptr, offsets, pos_ids = x.i32([0, 3, 5]), x.i32([2, 0]), x.i32([2, 3, 4, 0, 1])
    cos_sin = x.randn(8, 16)

    def run():
        qi, ki = q.clone(), k.clone()
        flashtile.apply_rope_inplace(qi, ki, indptr, offsets)
        return (*flashtile.apply_rope(q, k, indptr, offsets), *flashtile.apply_rope_pos_ids(q, k, pos_ids),
                *flashtile.apply_llama31_rope(q, k, indptr, offsets), qi, ki,
                *flashtile.apply_rope_with_cos_sin_cache(pos_ids, q.flatten(1), k.flatten(1), 16, cos_sin))
    return run


def _norm(x: Inputs):
    h, residual, weight, bias, gate = x.randn(3, 32), x.randn(3, 32), x.randn(32), x.randn(32), x.randn(3, 64)

    def run():
        hi, ri = h.clone(), residual.clone()
        flashtile.fused_add_rmsnorm(hi, ri, weight)
        return (flashtile.rmsnorm(h, weight), flashtile.gemma_rmsnorm(h, weight), hi, ri,
                flashtile.layernorm(h, weight, bias), flashtile.silu_and_mul(gate))
    return run


def _page(x: Inputs):
    (indptr, indices, last), cache = x.page_table(), x.paged_cache()
    append_indptr = x.i32([0, 2, 3])
    key, value = x.f16(3, 2, 16), x.f16(3, 2, 16)
    ckv, kpe, append_ckv, append_kpe = x.randn(4, 4, 8), x.randn(4, 4, 4), x.randn(3, 8), x.randn(3, 4)

    def run():
        seq_lens = flashtile.get_seq_lens(indptr, last, 4)
        batch_indices, positions = flashtile.get_batch_indices_positions(append_indptr, seq_lens, 3)
        c, ci, ki = cache.clone(), ckv.clone(), kpe.clone()
        flashtile.append_paged_kv_cache(key, value, batch_indices, positions, c, indices, indptr, last)
        flashtile.append_paged_mla_kv_cache(append_ckv, append_kpe, batch_indices, positions, ci, ki, indices,
                                            indptr, last)
        return seq_lens, batch_indices, positions, c, ci, ki
    return run


def _packbits(x: Inputs):
    bits, indptr = x.bits(20, 0.5), x.i32([0, 7, 7, 20])
    return lambda: (flashtile.packbits(bits, "little"), *flashtile.segment_packbits(bits, indptr))


def _gemm(x: Inputs):
    """Segment GEMM from seg_lens (host and device) and seg_indptr, then an fp8 bmm."""
    xs, ws = x.f16(7, 16), x.f16(3, 8, 16)
    lens, idx = torch.tensor([3, 0, 4]), x.i32([2, 2, 0])
    a = x.randn(2, 3, 32).to(torch.float8_e4m3fn)
    b = x.randn(2, 5, 32).to(torch.float8_e5m2).transpose(1, 2)
    scale = x.randn(1).abs()

    def run():
        w = flashtile.SegmentGEMMWrapper(x.workspace())
        return (w.run(xs, ws, 3, True, seg_lens=lens), w.run(xs, ws, 3, True, seg_lens=lens.to(x.device),
                                                              weight_indices=idx),
                w.run(xs, ws, 2, True, seg_indptr=x.i32([1, 3, 6])),
                flashtile.bmm_fp8(a, b, scale, scale, torch.bfloat16))
    return run


CASES = {f.__name__.lstrip("_"): f for f in (
    _single_decode, _single_prefill, _batch_decode, _batch_prefill_paged, _batch_prefill_ragged, _batch_attention,
    _pod, _graph_mode_and_custom_mask, _cascade, _merge, _sampling, _rope, _norm, _page, _packbits, _gemm)}


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _check_unaffected(case, device, other_default):
    run = CASES[case](Inputs(device))
    expected = _as_tuple(run())
    with default_device(other_default):
        got = _as_tuple(run())
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.device == e.device, f"output {i}: on {g.device}, expected {e.device}"
        torch.testing.assert_close(g, e, rtol=0, atol=0, equal_nan=True, msg=lambda m, i=i: f"output {i}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_meta_default_device(path, device, case):
    """Inputs on the test device (CPU here, under the interpreter for the kernel path); default meta."""
    _check_unaffected(case, device, "meta")


@pytest.mark.gpu
@pytest.mark.parametrize("inputs", ["cuda", "cpu"])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_default_device(path, case, inputs):
    """The engines' setting: ``torch.set_default_device("cuda")``, with CUDA inputs (and CPU inputs on
    the reference path)."""
    if inputs == "cpu" and path == "kernel":
        pytest.skip("CPU inputs run the kernels only under the interpreter")
    _check_unaffected(case, torch.device(inputs), "cuda")


def test_default_device_is_restored():
    """The helper leaves no device mode behind (a leaked one broke test_rope's torch.compile test)."""
    with default_device("meta"):
        pass
    assert not any(isinstance(m, DeviceContext) for m in _get_current_function_mode_stack())
