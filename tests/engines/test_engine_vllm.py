"""vLLM's FlashInfer attention backend, replayed call for call (../shared/ENGINES.md §1.1, §3 A and B)
against the float64 oracle over the logical view of the page table.

A. The mixed step: decodes first, then prefills, in one batch: prefill plan with the raw indptr slice
   (first value != 0) and the full indices array, decode plan with every keyword vLLM passes (and with
   the 22 positional arguments of vLLM 0.10-0.16), per layer decode.run then prefill.run with ``out=``
   slices of one output and q a strided view of the fused QKV; 5-D caches and the (K, V) views of
   ``buf.split(D, -1)``, NHD and HND.
B. The FULL decode CUDA graph: buffers given to the constructor, one real plan, capture, then steps in
   which vLLM writes the buffers itself and calls ``fast_decode_plan`` (which copies nothing), with
   padded rows of length 0. On CPU the same flow runs without capture, and a non-graph wrapper checks
   ``fast_decode_plan``'s results.
"""

from __future__ import annotations

import pytest
import torch
from engine_cases import (
    MIB,
    MODEL,
    assert_engine_attributes,
    assert_requests_match_oracle,
    cumsum0,
    fused_qkv,
    layers_to_run,
    nan_output,
    production_mode,  # noqa: F401  (fixture used through pytestmark)
    request_kv_f64,
)

import flashtile
from attention_cases import random_page_table
from conftest import HAS_CUDA
from flashtile.decode import BatchDecodeWithPagedKVCacheWrapper
from flashtile.prefill import BatchPrefillWithPagedKVCacheWrapper

pytestmark = pytest.mark.usefixtures("production_mode")

PAGE_SIZE = 16 if HAS_CUDA else 4
NUM_BLOCKS = 4096 if HAS_CUDA else 128
WORKSPACE_BYTES = 394 * MIB if HAS_CUDA else 16 * MIB  # vLLM: torch.zeros(394 MiB), shared by all wrappers
DECODE_LENS = [1, 17, 300, 4097] if HAS_CUDA else [1, 17, 30, 70]
# Prefills as (new tokens, cached prefix): a fresh prompt, a chunk on a long prefix, a prefix-cache hit.
PREFILLS = [(100, 0), (512, 1024), (37, 2048)] if HAS_CUDA else [(20, 0), (24, 40), (5, 70)]


def vllm_kv_cache(model, num_blocks, page_size, layout, form, device):
    """One layer's KV cache as vLLM hands it to the wrappers.

    form "5d": ``[P, 2, page_size, Hkv, D]`` (NHD) or ``[P, 2, Hkv, page_size, D]`` (HND), the form up to
    2026-07-10. form "split": one buffer ``[P, page_size, Hkv, 2D]`` (HND ``[P, Hkv, page_size, 2D]``) and
    the ``(K, V)`` views of ``buf.split(D, -1)`` (row stride 2D), the form since vLLM PR #44455.
    """
    hk, d = model.num_kv_heads, model.head_dim
    token_dims = [page_size, hk] if layout == "NHD" else [hk, page_size]
    if form == "5d":
        return torch.randn([num_blocks, 2] + token_dims + [d], device=device).to(model.dtype)
    buf = torch.randn([num_blocks] + token_dims + [2 * d], device=device).to(model.dtype)
    return buf.split(d, -1)


def decode_plan_keywords(model):
    """Everything after ``page_size`` that vLLM passes to the decode plan, as keywords."""
    return dict(pos_encoding_mode="NONE", window_left=-1, logits_soft_cap=None, q_data_type=model.dtype,
                kv_data_type=model.dtype, o_data_type=model.dtype, data_type=None, sm_scale=model.sm_scale,
                rope_scale=None, rope_theta=None, non_blocking=True, block_tables=None, seq_lens=None,
                fixed_split_size=-1, disable_split_kv=False)


def decode_plan_positional(model):
    """vLLM 0.10-0.16's first decode plan: 22 positional arguments in FlashInfer's >=0.6 order (table,
    shape, then pos_encoding_mode, window_left, logits_soft_cap, q/kv/o_data_type, data_type, sm_scale,
    rope_scale, rope_theta, non_blocking, block_tables, seq_lens, fixed_split_size, disable_split_kv)."""
    return ("NONE", -1, None, model.dtype, model.dtype, model.dtype, None, model.sm_scale, None, None, True,
            None, None, -1, False)


def fast_decode_plan_keywords(model):
    """vLLM's fast_decode_plan keywords: the decode plan's, minus ``o_data_type`` (and the trtllm tables)."""
    kw = decode_plan_keywords(model)
    for name in ("o_data_type", "block_tables", "seq_lens"):
        del kw[name]
    return kw


# ------------------------------------------------------------------------------------------------
# A. The mixed step
# ------------------------------------------------------------------------------------------------


def mixed_batch(device):
    """The step's page table over a shuffled pool, with decodes first: ``(qo_indptr, indptr, indices,
    last_page_len)``, int32 on the CPU (vLLM's pinned host arrays)."""
    kv_lens = DECODE_LENS + [prefix + new for new, prefix in PREFILLS]
    qo_lens = [1] * len(DECODE_LENS) + [new for new, _ in PREFILLS]
    indptr, indices, last = random_page_table(kv_lens, PAGE_SIZE, NUM_BLOCKS)
    return cumsum0(qo_lens), indptr, indices, last


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("form", ["5d", "split"])
def test_vllm_mixed_step(path, device, layout, form):
    model, nd = MODEL, len(DECODE_LENS)
    qo_indptr, indptr, indices, last = mixed_batch(device)
    indices_gpu = indices.to(device)
    ws = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    prefill = BatchPrefillWithPagedKVCacheWrapper(ws, layout, backend="auto")
    decode = BatchDecodeWithPagedKVCacheWrapper(
        ws, layout, use_cuda_graph=False, paged_kv_indptr_buffer=None, paged_kv_indices_buffer=None,
        paged_kv_last_page_len_buffer=None, use_tensor_cores=True, backend="auto")

    # build(): prefill first (qo rebased to 0, the KV indptr a raw slice that starts above 0), then decode.
    assert int(indptr[nd]) > 0
    prefill.plan(qo_indptr=qo_indptr[nd:] - qo_indptr[nd], paged_kv_indptr=indptr[nd:], paged_kv_indices=indices_gpu,
                 paged_kv_last_page_len=last[nd:], num_qo_heads=model.num_qo_heads,
                 num_kv_heads=model.num_kv_heads, head_dim_qk=model.head_dim, page_size=PAGE_SIZE, causal=True,
                 sm_scale=model.sm_scale, window_left=-1, logits_soft_cap=None, q_data_type=model.dtype,
                 kv_data_type=model.dtype, o_data_type=model.dtype, fixed_split_size=-1, disable_split_kv=False)
    decode.plan(indptr[: nd + 1], indices_gpu, last[:nd], model.num_qo_heads, model.num_kv_heads, model.head_dim,
                PAGE_SIZE, **decode_plan_keywords(model))
    decode.vllm_first_call = False  # vLLM marks its wrappers: instance attributes must be allowed
    assert_engine_attributes(prefill, model, causal=True)
    assert_engine_attributes(decode, model)

    total = int(qo_indptr[-1])
    for _ in range(layers_to_run(path)):
        kv_cache = vllm_kv_cache(model, NUM_BLOCKS, PAGE_SIZE, layout, form, device)
        _, q, _, _ = fused_qkv(total, model, device)
        assert q.stride(0) > model.num_qo_heads * model.head_dim
        output = nan_output((total, model.num_qo_heads, model.head_dim), model.dtype, device)
        decode_out, prefill_out = output[:nd], output[nd:]
        got = decode.run(q[:nd], kv_cache, q_scale=1.0, k_scale=1.0, v_scale=1.0, out=decode_out, kv_cache_sf=None)
        assert got is decode_out
        got = prefill.run(q[nd:], kv_cache, q_scale=1.0, k_scale=1.0, v_scale=1.0, out=prefill_out,
                          kv_cache_sf=None)
        assert got is prefill_out
        assert_engine_attributes(prefill, model, causal=True)
        assert_engine_attributes(decode, model)
        request_kv = request_kv_f64(kv_cache, layout, indptr, indices, last)
        assert_requests_match_oracle(output, None, q, qo_indptr, request_kv, causal=True, sm_scale=model.sm_scale)


def test_vllm_decode_plan_22_positional(path, device):
    """vLLM 0.10-0.16 plans decode with 22 positional arguments; DCP also asks for the LSE into a buffer."""
    model = MODEL
    lens = DECODE_LENS + [0]  # plus a padded row: no pages, last_page_len 0
    indptr, indices, last = random_page_table(lens, PAGE_SIZE, NUM_BLOCKS)
    kv_cache = vllm_kv_cache(model, NUM_BLOCKS, PAGE_SIZE, "NHD", "5d", device)
    ws = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    decode = BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True, backend="auto")
    args = (indptr, indices.to(device), last, model.num_qo_heads, model.num_kv_heads, model.head_dim, PAGE_SIZE)
    args += decode_plan_positional(model)
    assert len(args) == 22
    decode.plan(*args)
    assert_engine_attributes(decode, model)
    _, q, _, _ = fused_qkv(len(lens), model, device)
    out = nan_output((len(lens), model.num_qo_heads, model.head_dim), model.dtype, device)
    lse = nan_output((len(lens), model.num_qo_heads), torch.float32, device)
    got_out, got_lse = decode.run(q, kv_cache, q_scale=1.0, k_scale=1.0, v_scale=1.0, out=out, lse=lse,
                                  return_lse=True, kv_cache_sf=None)
    assert got_out is out and got_lse is lse
    request_kv = request_kv_f64(kv_cache, "NHD", indptr, indices, last)
    assert_requests_match_oracle(out, lse, q, cumsum0([1] * len(lens)), request_kv, sm_scale=model.sm_scale)
    assert torch.all(out[-1] == 0) and torch.all(lse[-1] == float("-inf"))


# ------------------------------------------------------------------------------------------------
# B. The FULL decode CUDA graph (capture on the GPU; the same buffer protocol without capture on CPU)
# ------------------------------------------------------------------------------------------------

MAX_NUM_REQS = 256
MAX_SEQ_LEN = 8192 if HAS_CUDA else 64
MAX_BLOCKS_PER_REQ = MAX_SEQ_LEN // PAGE_SIZE
GRAPH_STEPS = 5 if HAS_CUDA else 2


def padded_step_lens(batch_size, generator):
    """One step's lengths: real requests of 1..MAX_SEQ_LEN tokens, then (up to) 2 padded rows of length 0."""
    num_padded = min(2, batch_size - 1)
    real = torch.randint(1, MAX_SEQ_LEN + 1, (batch_size - num_padded,), generator=generator).tolist()
    return real + [0] * num_padded


def check_decode_step(out, q, kv_cache, table, model, num_padded):
    indptr, indices, last = table
    request_kv = request_kv_f64(kv_cache, "NHD", indptr, indices, last)
    assert_requests_match_oracle(out, None, q, cumsum0([1] * q.shape[0]), request_kv, sm_scale=model.sm_scale)
    if num_padded:
        assert torch.all(out[-num_padded:] == 0), "padded rows (no pages) must give 0"


def run_vllm_full_decode_graph(device, batch_size, capture):
    """vLLM's FULL decode graph for one batch size: constructor buffers, a real plan (its first call),
    capture of run(), then steps of: write the buffers in place, fast_decode_plan, replay, compare."""
    model = MODEL
    ws = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    indptr_buf = torch.zeros(MAX_NUM_REQS + 1, dtype=torch.int32, device=device)
    indices_buf = torch.zeros(MAX_NUM_REQS * MAX_BLOCKS_PER_REQ, dtype=torch.int32, device=device)
    last_page_len_buf = torch.zeros(MAX_NUM_REQS, dtype=torch.int32, device=device)
    decode = BatchDecodeWithPagedKVCacheWrapper(
        ws, "NHD", use_cuda_graph=True, paged_kv_indptr_buffer=indptr_buf[: batch_size + 1],
        paged_kv_indices_buffer=indices_buf, paged_kv_last_page_len_buffer=last_page_len_buf[:batch_size],
        use_tensor_cores=True, backend="auto")
    assert decode.is_cuda_graph_enabled
    num_blocks = batch_size * MAX_BLOCKS_PER_REQ + 8
    kv_cache = vllm_kv_cache(model, num_blocks, PAGE_SIZE, "NHD", "5d", device)
    generator = torch.Generator().manual_seed(batch_size)

    def write_step():
        """What vLLM's builder does: page ids straight into the indices buffer, indptr and last_page_len
        copied from its pinned host arrays into the buffers. Returns the host table."""
        lens = padded_step_lens(batch_size, generator)
        indptr, indices, last = random_page_table(lens, PAGE_SIZE, num_blocks)
        indices_buf[: indices.numel()].copy_(indices)
        indptr_buf[: batch_size + 1].copy_(indptr)
        last_page_len_buf[:batch_size].copy_(last)
        return (indptr, indices, last), lens.count(0)

    _, q, _, _ = fused_qkv(batch_size, model, device)
    out = nan_output((batch_size, model.num_qo_heads, model.head_dim), model.dtype, device)

    def run():
        got = decode.run(q, kv_cache, q_scale=1.0, k_scale=1.0, v_scale=1.0, out=out, kv_cache_sf=None)
        assert got is out

    # vLLM's first call: the full plan with the buffers' own contents (indices: a slice of the buffer).
    (indptr, indices, last), num_padded = write_step()
    decode.plan(indptr, indices_buf[: indices.numel()], last, model.num_qo_heads, model.num_kv_heads,
                model.head_dim, PAGE_SIZE, **decode_plan_keywords(model))
    decode.vllm_first_call = False
    run()
    check_decode_step(out, q, kv_cache, (indptr, indices, last), model, num_padded)

    graph = None
    if capture:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()

    for _ in range(GRAPH_STEPS):
        table, num_padded = write_step()
        flashtile.decode.fast_decode_plan(decode, table[0], indices_buf, table[2], model.num_qo_heads,
                                          model.num_kv_heads, model.head_dim, PAGE_SIZE,
                                          **fast_decode_plan_keywords(model))
        assert_engine_attributes(decode, model)
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        if graph is not None:
            graph.replay()
            torch.cuda.synchronize()
        else:
            run()
        check_decode_step(out, q, kv_cache, table, model, num_padded)


@pytest.mark.gpu
@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_vllm_full_decode_graph(batch_size):
    run_vllm_full_decode_graph(torch.device("cuda"), batch_size, capture=True)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_vllm_decode_buffers_fast_plan_without_capture(path, device, batch_size):
    """B's buffer protocol without a graph: run() after each fast_decode_plan reads what vLLM wrote."""
    run_vllm_full_decode_graph(device, batch_size, capture=False)


def test_vllm_fast_decode_plan_eager(path, device):
    """fast_decode_plan on a wrapper without CUDA graphs plans like plan() (host indptr and last_page_len,
    device indices), step after step; padded rows give 0."""
    model = MODEL
    ws = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    decode = BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True, backend="auto")
    assert flashtile.fast_decode_plan is flashtile.decode.fast_decode_plan
    generator = torch.Generator().manual_seed(11)
    batch_size = 5
    num_blocks = batch_size * MAX_BLOCKS_PER_REQ + 8
    kv_cache = vllm_kv_cache(model, num_blocks, PAGE_SIZE, "NHD", "split", device)
    for _ in range(2):
        lens = padded_step_lens(batch_size, generator)
        indptr, indices, last = random_page_table(lens, PAGE_SIZE, num_blocks)
        flashtile.decode.fast_decode_plan(decode, indptr, indices.to(device), last, model.num_qo_heads,
                                          model.num_kv_heads, model.head_dim, PAGE_SIZE,
                                          **fast_decode_plan_keywords(model))
        assert_engine_attributes(decode, model)
        _, q, _, _ = fused_qkv(batch_size, model, device)
        out = nan_output((batch_size, model.num_qo_heads, model.head_dim), model.dtype, device)
        assert decode.run(q, kv_cache, q_scale=1.0, k_scale=1.0, v_scale=1.0, out=out, kv_cache_sf=None) is out
        check_decode_step(out, q, kv_cache, (indptr, indices, last), model, lens.count(0))
