"""SGLang's FlashInfer attention backend, replayed call for call (../shared/ENGINES.md §1.2, §3 C and D)
against the float64 oracle over the logical view of the page table.

SGLang keeps K and V as two 3-D tensors ``[pool + 1, Hkv, D]`` (page size 1, slot 0 reserved for
padding), shares one uninitialised workspace between its wrappers, passes ``last_page_len = ones`` for
every request (including those with no cached prefix: their length is 0) and uses the deprecated
``begin_forward`` / ``forward*`` names, which set causal, scale and cap at run time.

C. Extend: ragged attention over the new tokens + paged attention over the cached prefix, merged with
   ``merge_state``, then the new K/V are written; variants without prefix (ragged only) and paged-only
   (K/V written first).
D. Decode: eager with device index arrays; CUDA graph at batch 8 with ``begin_forward`` replaced by
   ``partial(fast_decode_plan, w)`` and ``global_override_indptr_cpu`` (without capture on CPU).
"""

from __future__ import annotations

import functools

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
    production_mode,  # noqa: F401  (fixture used through pytestmark)
    request_kv_f64,
)

import flashtile
from attention_cases import random_page_table
from conftest import HAS_CUDA
from flashtile.decode import BatchDecodeWithPagedKVCacheWrapper
from flashtile.prefill import BatchPrefillWithPagedKVCacheWrapper, BatchPrefillWithRaggedKVCacheWrapper

pytestmark = pytest.mark.usefixtures("production_mode")

POOL_SIZE = 65536 if HAS_CUDA else 512
WORKSPACE_BYTES = 384 * MIB if HAS_CUDA else 16 * MIB  # SGLang: torch.empty(384 MiB), never zeroed
LOGITS_SOFT_CAP = 0.0  # SGLang passes layer.logit_cap, 0.0 for Llama
SPARE_INDICES = 256  # SGLang allocates the extend kv_indices with 256 spare entries
# Extend batch as (new tokens, cached prefix). The request without prefix sits in the middle: a zero-page
# request read as length 1 would attend to the next request's first slot.
EXTEND_BATCH = [(512, 1024), (100, 0), (1, 300)] if HAS_CUDA else [(24, 40), (20, 0), (1, 30)]
DECODE_LENS = [1, 17, 300, 1024, 4097] if HAS_CUDA else [1, 9, 17, 33, 60]


def token_pool(model, device):
    """SGLang's per-layer KV pool: K and V ``[pool + 1, Hkv, D]`` each (slot 0 is the padding slot)."""
    shape = (POOL_SIZE + 1, model.num_kv_heads, model.head_dim)
    return (torch.randn(shape, device=device).to(model.dtype), torch.randn(shape, device=device).to(model.dtype))


def token_slots(lens):
    """Pool slots for requests of ``lens`` tokens (page size 1), shuffled, never slot 0: ``(indptr, indices)``
    int32 on the CPU."""
    indptr, indices, _ = random_page_table(lens, 1, POOL_SIZE)
    return indptr, indices + 1


def to_device(device, *tensors):
    """SGLang keeps its index arrays on the GPU."""
    return tuple(t.to(device) for t in tensors)


# ------------------------------------------------------------------------------------------------
# C. Extend
# ------------------------------------------------------------------------------------------------


class ExtendBatch:
    """One extend step: each request has a cached prefix in the pool and new tokens whose K/V are written
    to fresh slots after (or, paged-only, before) attention."""

    def __init__(self, batch, device):
        self.new_lens = [new for new, _ in batch]
        self.prefix_lens = [prefix for _, prefix in batch]
        self.device = device
        self.qo_indptr = cumsum0(self.new_lens)
        # Slots of prefix + new tokens, per request; the prefix table is their first prefix_len slots.
        self.full_indptr, self.full_indices = token_slots([p + n for p, n in zip(self.prefix_lens, self.new_lens)])
        starts, ends = self.full_indptr[:-1].tolist(), self.full_indptr[1:].tolist()
        splits = [start + prefix for start, prefix in zip(starts, self.prefix_lens)]
        self.prefix_indices = torch.cat([self.full_indices[a:b] for a, b in zip(starts, splits)])
        self.new_slots = torch.cat([self.full_indices[a:b] for a, b in zip(splits, ends)])
        self.prefix_indptr = cumsum0(self.prefix_lens)
        self.ones = torch.ones(len(batch), dtype=torch.int32)

    @property
    def num_new_tokens(self) -> int:
        return int(self.qo_indptr[-1])

    def prefix_indices_with_spare(self):
        """The prefix indices as SGLang allocates them: 256 spare entries at the end (never read)."""
        spare = torch.randint(0, POOL_SIZE + 1, (SPARE_INDICES,), dtype=torch.int32)
        return torch.cat([self.prefix_indices, spare])

    def write_kv(self, pool, k, v):
        """set_kv_buffer: the new tokens' K and V into their slots."""
        slots = self.new_slots.long().to(self.device)
        pool[0][slots] = k
        pool[1][slots] = v

    def full_request_kv(self, pool):
        """Every request's prefix + new K/V (float64 NHD), read through the full slot table once written."""
        return request_kv_f64(pool, "NHD", self.full_indptr, self.full_indices, self.ones)


def plan_extend(model, step, ragged, paged, device):
    """SGLang's extend plan: ragged over the new tokens, paged over the prefix only (ones as last_page_len,
    also for requests without prefix); all index arrays on the device."""
    qo_indptr, kv_indptr, kv_indices, ones = to_device(
        device, step.qo_indptr, step.prefix_indptr, step.prefix_indices_with_spare(), step.ones)
    ragged.begin_forward(qo_indptr, qo_indptr, model.num_qo_heads, model.num_kv_heads, model.head_dim,
                         q_data_type=model.dtype)
    paged.begin_forward(qo_indptr, kv_indptr, kv_indices, ones, model.num_qo_heads, model.num_kv_heads,
                        model.head_dim, 1, q_data_type=model.dtype, kv_data_type=model.dtype, custom_mask=None,
                        non_blocking=True, fixed_split_size=None, prefix_len_ptr=None, token_pos_in_items_ptr=None,
                        token_pos_in_items_len=0, max_item_len_ptr=None)


def extend_wrappers(device):
    ws = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    ragged = BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend="auto")
    paged = BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend="fa2")
    return ragged, paged


def test_sglang_extend_ragged_paged_merge(path, device):
    """Ragged (new tokens, causal) + paged (prefix, non-causal) + merge_state equals attention over
    prefix + new tokens; the request without prefix pages gets 0 / -inf from the paged part."""
    model = MODEL
    step = ExtendBatch(EXTEND_BATCH, device)
    ragged, paged = extend_wrappers(device)
    plan_extend(model, step, ragged, paged, device)
    no_prefix = [r for r, p in enumerate(step.prefix_lens) if p == 0]
    bounds = step.qo_indptr.tolist()
    for _ in range(layers_to_run(path)):
        pool = token_pool(model, device)
        _, q, k, v = fused_qkv(step.num_new_tokens, model, device)
        o1, s1 = ragged.forward_return_lse(q, k, v, causal=True, sm_scale=model.sm_scale,
                                           logits_soft_cap=LOGITS_SOFT_CAP, window_left=-1)
        assert_engine_attributes(ragged, model, causal=True, logits_soft_cap=LOGITS_SOFT_CAP)
        o2, s2 = paged.forward_return_lse(q, pool, causal=False, sm_scale=model.sm_scale,
                                          logits_soft_cap=LOGITS_SOFT_CAP)
        assert_engine_attributes(paged, model, causal=False, logits_soft_cap=LOGITS_SOFT_CAP)
        for r in no_prefix:
            rows = slice(bounds[r], bounds[r + 1])
            assert torch.all(o2[rows] == 0), f"request {r} has no prefix pages: its paged output must be 0"
            assert torch.all(s2[rows] == float("-inf")), f"request {r} has no prefix pages: its paged LSE must be -inf"
        o, s = flashtile.cascade.merge_state(o1, s1, o2, s2)
        step.write_kv(pool, k, v)
        assert_requests_match_oracle(o, s, q, step.qo_indptr, step.full_request_kv(pool), causal=True,
                                     sm_scale=model.sm_scale)


def test_sglang_extend_no_prefix_ragged_only(path, device):
    """No request has a prefix: both wrappers are planned (the paged one over zero-page requests with
    last_page_len 1), only ragged.forward runs."""
    model = MODEL
    step = ExtendBatch([(new, 0) for new, _ in EXTEND_BATCH], device)
    ragged, paged = extend_wrappers(device)
    plan_extend(model, step, ragged, paged, device)
    for _ in range(layers_to_run(path)):
        pool = token_pool(model, device)
        _, q, k, v = fused_qkv(step.num_new_tokens, model, device)
        o = ragged.forward(q, k, v, causal=True, sm_scale=model.sm_scale, logits_soft_cap=LOGITS_SOFT_CAP)
        assert_engine_attributes(ragged, model, causal=True, logits_soft_cap=LOGITS_SOFT_CAP)
        step.write_kv(pool, k, v)
        assert_requests_match_oracle(o, None, q, step.qo_indptr, step.full_request_kv(pool), causal=True,
                                     sm_scale=model.sm_scale)


def test_sglang_extend_paged_only(path, device):
    """SGLANG_FLASHINFER_USE_PAGED: K/V written first, then one causal paged.forward over prefix + new."""
    model = MODEL
    step = ExtendBatch(EXTEND_BATCH, device)
    _, paged = extend_wrappers(device)
    qo_indptr, kv_indptr, kv_indices, ones = to_device(device, step.qo_indptr, step.full_indptr,
                                                            step.full_indices, step.ones)
    paged.begin_forward(qo_indptr, kv_indptr, kv_indices, ones, model.num_qo_heads, model.num_kv_heads,
                        model.head_dim, 1, q_data_type=model.dtype, kv_data_type=model.dtype, custom_mask=None,
                        non_blocking=True, fixed_split_size=None)
    for _ in range(layers_to_run(path)):
        pool = token_pool(model, device)
        _, q, k, v = fused_qkv(step.num_new_tokens, model, device)
        step.write_kv(pool, k, v)
        o = paged.forward(q, pool, causal=True, sm_scale=model.sm_scale, window_left=-1,
                          logits_soft_cap=LOGITS_SOFT_CAP, k_scale=None, v_scale=None)
        assert_engine_attributes(paged, model, causal=True, logits_soft_cap=LOGITS_SOFT_CAP)
        assert_requests_match_oracle(o, None, q, step.qo_indptr, step.full_request_kv(pool), causal=True,
                                     sm_scale=model.sm_scale)


# ------------------------------------------------------------------------------------------------
# D. Decode
# ------------------------------------------------------------------------------------------------


def uses_tensor_cores(model) -> bool:
    """SGLang's choice without decode._grouped_size_compiled_for_decode_kernels: GQA group >= 4 (or fp8)."""
    return model.num_qo_heads // model.num_kv_heads >= 4


def decode_plan_keywords(model):
    return dict(data_type=model.dtype, q_data_type=model.dtype, non_blocking=True, fixed_split_size=None,
                disable_split_kv=False)


def sglang_decode_forward(wrapper, q, pool, model):
    return wrapper.forward(q, pool, sm_scale=model.sm_scale, logits_soft_cap=LOGITS_SOFT_CAP, k_scale=None,
                           v_scale=None)


def check_decode(out, q, pool, indptr, indices, model):
    ones = torch.ones(q.shape[0], dtype=torch.int32)
    request_kv = request_kv_f64(pool, "NHD", indptr, indices, ones)
    assert_requests_match_oracle(out, None, q, cumsum0([1] * q.shape[0]), request_kv, sm_scale=model.sm_scale)


def test_sglang_decode_eager(path, device):
    model = MODEL
    ws = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    decode = BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", backend="fa2", use_tensor_cores=uses_tensor_cores(model))
    indptr, indices = token_slots(DECODE_LENS)
    ones = torch.ones(len(DECODE_LENS), dtype=torch.int32, device=device)
    decode.begin_forward(indptr.to(device), indices.to(device), ones, model.num_qo_heads, model.num_kv_heads,
                         model.head_dim, 1, **decode_plan_keywords(model))
    for _ in range(layers_to_run(path)):
        pool = token_pool(model, device)
        _, q, _, _ = fused_qkv(len(DECODE_LENS), model, device)
        out = sglang_decode_forward(decode, q, pool, model)
        assert_engine_attributes(decode, model, logits_soft_cap=LOGITS_SOFT_CAP)
        check_decode(out, q, pool, indptr, indices, model)


GRAPH_BATCH = 8 if HAS_CUDA else 4  # graph mode's grid is sized for the batch: costly under the interpreter
GRAPH_STEPS = 5 if HAS_CUDA else 2
MAX_CONTEXT = 4097 if HAS_CUDA else 24


def run_sglang_decode_graph(device, capture):
    """SGLang's decode CUDA graph (batch 8 on the GPU): constructor buffers, indices written into
    ``w._paged_kv_indices_buf``, the real plan, then ``begin_forward = partial(fast_decode_plan, w)``;
    each replay: SGLang rewrites indptr and indices in place, calls begin_forward with
    ``global_override_indptr_cpu``, replays. Padded rows have length 1 (slot 0)."""
    model, bs = MODEL, GRAPH_BATCH
    ws = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    indptr_buf = torch.zeros(bs + 1, dtype=torch.int32, device=device)
    indices_buf = torch.zeros(bs * MAX_CONTEXT, dtype=torch.int32, device=device)
    ones = torch.ones(bs, dtype=torch.int32, device=device)
    decode = BatchDecodeWithPagedKVCacheWrapper(
        ws, "NHD", backend="fa2", use_cuda_graph=True, use_tensor_cores=uses_tensor_cores(model),
        paged_kv_indptr_buffer=indptr_buf[: bs + 1], paged_kv_indices_buffer=indices_buf,
        paged_kv_last_page_len_buffer=ones[:bs])
    assert decode.is_cuda_graph_enabled
    assert decode._paged_kv_indices_buf is indices_buf
    pool = token_pool(model, device)
    generator = torch.Generator().manual_seed(5)

    def write_step(lens, padded):
        """Slots of the real requests, then padded rows of one token in slot 0, written into the buffers
        in place (SGLang's create_flashinfer_kv_indices_triton). Returns the host table."""
        _, indices = token_slots(lens)
        indptr = cumsum0(lens + [1] * padded)
        indices = torch.cat([indices, torch.zeros(padded, dtype=torch.int32)])
        indptr_buf.copy_(indptr)
        decode._paged_kv_indices_buf[: indices.numel()].copy_(indices)
        return indptr, indices

    # Capture: padded-looking batch of length 1, the real plan, then the fast path installed.
    indptr, indices = write_step([], bs)
    decode.begin_forward(indptr_buf[: bs + 1], decode._paged_kv_indices_buf, ones[:bs], model.num_qo_heads,
                         model.num_kv_heads, model.head_dim, 1, **decode_plan_keywords(model))
    decode.begin_forward = functools.partial(flashtile.fast_decode_plan, decode)
    assert decode.begin_forward.func is flashtile.fast_decode_plan
    _, q, _, _ = fused_qkv(bs, model, device)
    out = sglang_decode_forward(decode, q, pool, model)
    check_decode(out, q, pool, indptr, indices, model)
    graph = None
    if capture:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            sglang_decode_forward(decode, q, pool, model)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = sglang_decode_forward(decode, q, pool, model)

    for _ in range(GRAPH_STEPS):
        num_padded = 1
        lens = torch.randint(1, MAX_CONTEXT + 1, (bs - num_padded,), generator=generator).tolist()
        indptr, indices = write_step(lens, num_padded)
        decode.begin_forward(indptr_buf[: bs + 1], decode._paged_kv_indices_buf, ones[:bs], model.num_qo_heads,
                             model.num_kv_heads, model.head_dim, 1, **decode_plan_keywords(model),
                             global_override_indptr_cpu=indptr)
        q.copy_(torch.randn_like(q))
        if graph is not None:
            graph.replay()
            torch.cuda.synchronize()
        else:
            out = sglang_decode_forward(decode, q, pool, model)
        assert_engine_attributes(decode, model, logits_soft_cap=LOGITS_SOFT_CAP)
        check_decode(out, q, pool, indptr, indices, model)


@pytest.mark.gpu
def test_sglang_decode_cuda_graph():
    run_sglang_decode_graph(torch.device("cuda"), capture=True)


def test_sglang_decode_fast_plan_without_capture(path, device):
    run_sglang_decode_graph(device, capture=False)
