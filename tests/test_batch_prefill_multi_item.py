"""Multi-item scoring in batch prefill (``prefix_len_ptr``, ``token_pos_in_items_ptr``,
``token_pos_in_items_len``, ``max_item_len_ptr`` in plan()): both wrappers against the float64 oracle
with an explicit mask (oracles.multi_item_mask_oracle), on the reference path and the kernels; the
argument checks; the tiles no row can see are skipped."""

import pytest
import torch

from attention_cases import make_paged_batch, workspace
from conftest import HAS_CUDA
from flashtile._core import ops
from flashtile.prefill import BatchPrefillWithPagedKVCacheWrapper, BatchPrefillWithRaggedKVCacheWrapper
from oracles import multi_item_mask_from_items, multi_item_mask_oracle
from test_batch_prefill import check_requests, indptr_of, make_ragged, paged_requests, ragged_requests


def item_positions(item_lens):
    """Positions from the first delimiter on, as SGLang builds them: ``<d> item_1 <d> ... item_n <d>``."""
    positions = [0]
    for n in item_lens:
        positions += list(range(1, n + 1)) + [0]
    return positions


# Requests as (cached tokens, prompt tokens in the query, item lengths, queries dropped at the front):
# the query is the prompt and the items after `cached` tokens already in the cache; dropping queries makes
# a chunk that starts inside the items (prefix_len < kv_len - qo_len).
if HAS_CUDA:
    REQUESTS = [(37, 20, [3, 17, 1, 40], 0), (0, 300, [5] * 60, 0), (500, 0, [1, 2, 3], 0), (16, 80, [7] * 30, 150),
                (130, 0, [], 0)]
else:
    REQUESTS = [(5, 3, [2, 4, 1], 0), (0, 2, [3, 3, 3, 3, 3], 9), (0, 0, [1, 5], 0), (9, 0, [], 0), (7, 1, [2], 4)]


def scoring_batch(requests, pad=3):
    """``(qo_lens, kv_lens, prefix_lens, positions per request, stride, flat positions)`` for REQUESTS-like
    specs, each request's positions zero-padded to ``stride`` entries (upstream's batch layout)."""
    qo_lens, kv_lens, prefix_lens, per_request = [], [], [], []
    for cached, prompt, items, dropped in requests:
        positions = item_positions(items)
        qo_lens.append(prompt + len(positions) - dropped)
        kv_lens.append(cached + prompt + len(positions))
        prefix_lens.append(cached + prompt)
        per_request.append(positions)
    stride = max(len(p) for p in per_request) + pad
    flat = [x for p in per_request for x in p + [0] * (stride - len(p))]
    return qo_lens, kv_lens, prefix_lens, per_request, stride, flat


def oracle_masks(qo_lens, kv_lens, prefix_lens, per_request):
    return [multi_item_mask_oracle(q, k, p, pos) for q, k, p, pos in zip(qo_lens, kv_lens, prefix_lens, per_request)]


def multi_item_kwargs(prefix_lens, flat, stride, per_request, dtypes, device):
    prefix_dtype, pos_dtype, max_dtype = dtypes
    return dict(
        prefix_len_ptr=torch.tensor(prefix_lens, dtype=torch.int64).to(prefix_dtype).to(device),
        token_pos_in_items_ptr=torch.tensor(flat, dtype=torch.int64).to(pos_dtype).to(device),
        token_pos_in_items_len=stride,
        max_item_len_ptr=None if max_dtype is None else
        torch.tensor([max(p) for p in per_request], dtype=torch.int64).to(max_dtype).to(device),
    )


# (prefix_len_ptr, token_pos_in_items_ptr, max_item_len_ptr) dtypes
DTYPES = [
    (torch.uint32, torch.uint16, torch.uint16),  # what FlashInfer's tests and SGLang pass
    (torch.int32, torch.int16, torch.int32),
    (torch.int64, torch.int64, None),
    (torch.int32, torch.int32, torch.uint32),
]


@pytest.mark.parametrize("kind, dtypes", [("ragged", DTYPES[0]), ("paged", DTYPES[0]), ("ragged", DTYPES[1]),
                                          ("paged", DTYPES[2]), ("paged", DTYPES[3])],
                         ids=lambda x: x if isinstance(x, str) else "-".join(str(d).replace("torch.", "") for d in x))
@pytest.mark.parametrize("arrays_on", ["cpu", "device"])
def test_multi_item_matches_oracle(path, device, dtypes, kind, arrays_on):
    if arrays_on == "device" and not HAS_CUDA:
        pytest.skip("the device is the CPU here")
    qo_lens, kv_lens, prefix_lens, per_request, stride, flat = scoring_batch(REQUESTS)
    kw = multi_item_kwargs(prefix_lens, flat, stride, per_request, dtypes, device if arrays_on == "device" else "cpu")
    qo_indptr = indptr_of(qo_lens)
    if kind == "ragged":
        d = 24  # padded to 32 in the kernel
        q, k, v, qo_indptr, kv_indptr = make_ragged(qo_lens, kv_lens, 4, 2, d, torch.float16, device, kv_offset=2)
        w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
        w.plan(qo_indptr, kv_indptr, 4, 2, d, causal=True, **kw)
        out, lse = w.run(q, k, v, return_lse=True)
        requests = ragged_requests(k, v, kv_indptr)
    else:
        cache, indptr, indices, last = make_paged_batch(kv_lens, 3, 2, 16, torch.bfloat16, device, indptr_offset=1)
        q = torch.randn(sum(qo_lens), 6, 16, dtype=torch.bfloat16, device=device)
        w = BatchPrefillWithPagedKVCacheWrapper(workspace(device))
        w.plan(qo_indptr, indptr, indices, last, 6, 2, 16, 3, causal=True, q_data_type=torch.bfloat16, **kw)
        out, lse = w.run(q, cache, return_lse=True)
        requests = paged_requests(cache, indptr, indices, last)
    check_requests(out, lse, q, qo_indptr, requests, masks=oracle_masks(qo_lens, kv_lens, prefix_lens, per_request))


def test_multi_item_with_rope_window_and_soft_cap(path, device):
    """The multi-item mask combines with the sliding window; RoPE positions stay the sequence positions
    (as upstream: an engine that wants item-relative positions rotates q/k itself)."""
    qo_lens, kv_lens, prefix_lens, per_request, stride, flat = scoring_batch(REQUESTS[:3])
    kw = multi_item_kwargs(prefix_lens, flat, stride, per_request, DTYPES[0], device)
    features = dict(window_left=6, logits_soft_cap=8.0, pos_encoding_mode="ROPE_LLAMA", rope_theta=1e3)
    q, k, v, qo_indptr, kv_indptr = make_ragged(qo_lens, kv_lens, 2, 1, 16, torch.float16, device)
    w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    w.plan(qo_indptr, kv_indptr, 2, 1, 16, causal=True, **features, **kw)
    out, lse = w.run(q, k, v, return_lse=True)
    check_requests(out, lse, q, qo_indptr, ragged_requests(k, v, kv_indptr),
                   masks=oracle_masks(qo_lens, kv_lens, prefix_lens, per_request), **features)


def test_multi_item_split_kv(path, device):
    """KV ranges cut into chunks (fixed_split_size) and merged: chunks that hold only unseen items give
    empty partial states."""
    qo_lens, kv_lens, prefix_lens, per_request, stride, flat = scoring_batch(REQUESTS)
    kw = multi_item_kwargs(prefix_lens, flat, stride, per_request, DTYPES[1], device)
    q, k, v, qo_indptr, kv_indptr = make_ragged(qo_lens, kv_lens, 4, 2, 16, torch.float16, device)
    w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    w.plan(qo_indptr, kv_indptr, 4, 2, 16, causal=True, fixed_split_size=128 if HAS_CUDA else 16, **kw)
    if path == "kernel":
        assert w._plan.num_merges > 0
    out, lse = w.run(q, k, v, return_lse=True)
    check_requests(out, lse, q, qo_indptr, ragged_requests(k, v, kv_indptr),
                   masks=oracle_masks(qo_lens, kv_lens, prefix_lens, per_request))


def test_multi_item_mask_is_causal_and_survives_forward(path, device):
    """The mask is causal whatever `causal` says (as upstream); the deprecated forward() re-plans with the
    multi-item arguments kept; batch size 1 needs no token_pos_in_items_len."""
    qo_lens, kv_lens, prefix_lens, per_request, _, _ = scoring_batch(REQUESTS[:1])
    kw = dict(prefix_len_ptr=torch.tensor(prefix_lens, dtype=torch.uint32),
              token_pos_in_items_ptr=torch.tensor(per_request[0], dtype=torch.uint16))
    q, k, v, qo_indptr, kv_indptr = make_ragged(qo_lens, kv_lens, 4, 1, 16, torch.float16, device)
    w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    w.plan(qo_indptr, kv_indptr, 4, 1, 16, causal=False, **kw)
    assert w._causal
    masks = oracle_masks(qo_lens, kv_lens, prefix_lens, per_request)
    out, lse = w.run(q, k, v, return_lse=True)
    check_requests(out, lse, q, qo_indptr, ragged_requests(k, v, kv_indptr), masks=masks)
    out, lse = w.forward_return_lse(q, k, v, logits_soft_cap=3.0)
    assert w._plan.multi_item is not None
    check_requests(out, lse, q, qo_indptr, ragged_requests(k, v, kv_indptr), masks=masks, logits_soft_cap=3.0)


def test_unseen_item_tiles_are_skipped(device, monkeypatch):
    """A chunk of queries at the end of a long item list: KV tiles after the prefix that hold only earlier
    items are seen by no query, and the kernel never reads them (they hold NaN here, which any visit
    would spread into the output). The bound comes from the positions: max_item_len_ptr is not needed."""
    monkeypatch.setenv("FLASHTILE_BACKEND", "triton")
    prompt, item_len, num_items, qo_len = (40, 5, 200, 16) if HAS_CUDA else (5, 3, 14, 8)
    positions = item_positions([item_len] * num_items)
    kv_len = prompt + len(positions)
    q, k, v, qo_indptr, kv_indptr = make_ragged([qo_len], [kv_len], 4, 2, 32, torch.float16, device)
    w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    w.plan(qo_indptr, kv_indptr, 4, 2, 32, causal=True, prefix_len_ptr=torch.tensor([prompt], dtype=torch.int32),
           token_pos_in_items_ptr=torch.tensor(positions, dtype=torch.int32))
    block_n = w._plan.block_n
    first_seen = kv_len - qo_len - item_len  # no query sees an item key before this one
    unseen = slice(-(-prompt // block_n) * block_n, first_seen // block_n * block_n)
    assert unseen.stop - unseen.start >= block_n, "the case should have a whole tile to skip"
    k_poisoned, v_poisoned = k.clone(), v.clone()
    k_poisoned[unseen], v_poisoned[unseen] = float("nan"), float("nan")
    out, lse = w.run(q, k_poisoned, v_poisoned, return_lse=True)
    mask = multi_item_mask_oracle(qo_len, kv_len, prompt, positions)
    assert not mask[:, unseen].any()
    check_requests(out, lse, q, qo_indptr, [(k, v)], masks=[mask])


def test_oracle_mask_matches_item_membership():
    """The position rule (what plan() takes) and the item-membership rule (how FlashInfer's test builds
    its reference) give the same mask for whole scoring sequences."""
    for prompt, items in ((4, [2, 1, 3]), (0, [1, 1]), (3, []), (1, [5])):
        positions = item_positions(items)
        n = prompt + len(positions)
        assert torch.equal(multi_item_mask_oracle(n, n, prompt, positions), multi_item_mask_from_items(prompt, items))


def test_opcheck_multi_item(device, monkeypatch):
    """The op's schema with the multi-item tensors (test_batch_prefill.py opchecks the kernel path)."""
    monkeypatch.setenv("FLASHTILE_BACKEND", "reference")
    qo_lens, kv_lens, prefix_lens, per_request, stride, flat = scoring_batch(REQUESTS[1:3])
    q, k, v, qo_indptr, kv_indptr = make_ragged(qo_lens, kv_lens, 4, 2, 16, torch.float16, device)
    w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    kw = multi_item_kwargs(prefix_lens, flat, stride, per_request, DTYPES[1], device)
    w.plan(qo_indptr, kv_indptr, 4, 2, 16, **kw)
    p = w._plan
    out = torch.empty(q.shape[0], 4, 16, dtype=torch.float16, device=device)
    lse = torch.empty(q.shape[0], 4, device=device)
    args = (q, k, v, None, None, p.multi_item.requests, p.multi_item.token_pos, p.meta, p.part_o.clone(),
            p.part_lse.clone(), out, lse, p.batch_size, p.item_capacity, p.block_m, p.block_n, p.num_items,
            p.num_merges, 0.25, True, 0.0, -1, "NONE", 1.0, 1e4, 1.0, "auto")
    torch.library.opcheck(ops.batch_prefill, args)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

# Two requests: qo [3, 5], kv [9, 5]; prefix lengths [4, 1] need 5 and 4 positions.
GOOD = dict(prefix_len_ptr=torch.tensor([4, 1], dtype=torch.int32),
            token_pos_in_items_ptr=torch.tensor([0, 1, 2, 0, 1, 0, 0, 1, 0], dtype=torch.uint16),
            token_pos_in_items_len=5, max_item_len_ptr=torch.tensor([2, 1], dtype=torch.uint16))


def _with(**changes):
    kw = dict(GOOD)
    kw.update(changes)
    return kw


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(prefix_len_ptr=GOOD["prefix_len_ptr"]), ValueError, "token_pos_in_items_ptr"),
    (dict(token_pos_in_items_ptr=GOOD["token_pos_in_items_ptr"]), ValueError, "prefix_len_ptr"),
    (dict(max_item_len_ptr=GOOD["max_item_len_ptr"]), ValueError, "prefix_len_ptr"),
    (dict(token_pos_in_items_len=5), ValueError, "prefix_len_ptr"),
    (_with(prefix_len_ptr=torch.tensor([4.0, 1.0])), TypeError, "prefix_len_ptr"),
    (_with(prefix_len_ptr=torch.tensor([4, 1], dtype=torch.int16)), TypeError, "prefix_len_ptr"),
    (_with(prefix_len_ptr=[4, 1]), TypeError, "prefix_len_ptr"),
    (_with(prefix_len_ptr=torch.tensor([4], dtype=torch.int32)), ValueError, "prefix_len_ptr"),
    (_with(prefix_len_ptr=torch.tensor([[4, 1]], dtype=torch.int32)), ValueError, "prefix_len_ptr"),
    (_with(prefix_len_ptr=torch.tensor([4, -1], dtype=torch.int32)), ValueError, "prefix_len_ptr"),
    (_with(token_pos_in_items_ptr=torch.tensor([0, 1, 2, 0, 1, 0, 0, 1, 0], dtype=torch.uint8)), TypeError,
     "token_pos_in_items_ptr"),
    (_with(token_pos_in_items_ptr=torch.zeros(9)), TypeError, "token_pos_in_items_ptr"),
    (_with(token_pos_in_items_ptr=torch.zeros(3, 3, dtype=torch.int32)), ValueError, "token_pos_in_items_ptr"),
    (_with(token_pos_in_items_ptr=torch.zeros(8, dtype=torch.int32)), ValueError, "token_pos_in_items_ptr"),
    (_with(token_pos_in_items_ptr=torch.tensor([0, 1, -2, 0, 1, 0, 0, 1, 0], dtype=torch.int16)), ValueError,
     "token_pos_in_items_ptr"),
    (_with(token_pos_in_items_len=4), ValueError, "token_pos_in_items_len"),
    (_with(token_pos_in_items_len=0), ValueError, "token_pos_in_items_len"),
    (_with(token_pos_in_items_len=-5), ValueError, "token_pos_in_items_len"),
    (_with(token_pos_in_items_len=5.0), TypeError, "token_pos_in_items_len"),
    (_with(max_item_len_ptr=torch.tensor([2, 1], dtype=torch.float32)), TypeError, "max_item_len_ptr"),
    (_with(max_item_len_ptr=torch.tensor([2, 1, 3], dtype=torch.int32)), ValueError, "max_item_len_ptr"),
    (_with(custom_mask=torch.ones(52, dtype=torch.bool)), ValueError, "custom_mask"),
])
@pytest.mark.parametrize("kind", ["ragged", "paged"])
def test_multi_item_plan_errors(device, kwargs, error, match, kind):
    qo_indptr = torch.tensor([0, 3, 8], dtype=torch.int32)
    if kind == "ragged":
        w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device, 1))
        plan = lambda **kw: w.plan(qo_indptr, torch.tensor([0, 9, 14], dtype=torch.int32), 4, 2, 16, **kw)  # noqa: E731
    else:
        _, indptr, indices, last = make_paged_batch([9, 5], 4, 2, 16, torch.float16, device)
        w = BatchPrefillWithPagedKVCacheWrapper(workspace(device, 1))
        plan = lambda **kw: w.plan(qo_indptr, indptr, indices, last, 4, 2, 16, 4, **kw)  # noqa: E731
    plan(**GOOD)  # the baseline is valid
    with pytest.raises(error, match=match):
        plan(**kwargs)


def test_multi_item_arrays_on_another_device():
    if torch.cuda.device_count() < 1:
        pytest.skip("needs a wrapper on the CPU and a tensor on a GPU")
    w = BatchPrefillWithRaggedKVCacheWrapper(workspace(torch.device("cpu"), 1))
    with pytest.raises(ValueError, match="prefix_len_ptr"):
        w.plan(torch.tensor([0, 3, 8], dtype=torch.int32), torch.tensor([0, 9, 14], dtype=torch.int32), 4, 2, 16,
               **_with(prefix_len_ptr=GOOD["prefix_len_ptr"].cuda()))


def test_multi_item_in_cuda_graph_mode_raises(device):
    bufs = dict(qo_indptr_buf=torch.zeros(3, dtype=torch.int32, device=device),
                kv_indptr_buf=torch.zeros(3, dtype=torch.int32, device=device))
    w = BatchPrefillWithRaggedKVCacheWrapper(workspace(device, 1), use_cuda_graph=True, **bufs)
    with pytest.raises(NotImplementedError, match="CUDA-graph"):
        w.plan(torch.tensor([0, 3, 8], dtype=torch.int32), torch.tensor([0, 9, 14], dtype=torch.int32), 4, 2, 16,
               **GOOD)
