"""BatchAttention: mixed batches (decodes, speculative verifications, prefill chunks) against the float64
oracle request by request, on the reference path, the interpreted kernels (CPU) and the GPU; errors."""

import pytest
import torch

import flashtile
from attention_cases import make_paged_batch
from conftest import HAS_CUDA
from flashtile.attention import BatchAttention
from oracles import LSE_TOLERANCES, TOLERANCES, attention_oracle, paged_cache_f64, read_paged_kv_oracle


def indptr_of(lens):
    return torch.tensor([0] + torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)


def check_requests(out, lse, q, qo_lens, kv_requests, **kw):
    atol, rtol = TOLERANCES[q.dtype]
    latol, lrtol = LSE_TOLERANCES[q.dtype]
    assert not out.isnan().any(), "output has NaN (unwritten element)"
    ip = indptr_of(qo_lens).tolist()
    for r, (k, v) in enumerate(kv_requests):
        rows = slice(ip[r], ip[r + 1])
        ref_o, ref_lse = attention_oracle(q[rows], k, v, **kw)
        torch.testing.assert_close(out[rows].double().cpu(), ref_o, atol=atol, rtol=rtol, msg=f"request {r}")
        got = lse[rows].double().cpu()
        assert torch.equal(torch.isinf(got), torch.isinf(ref_lse)), f"request {r}: empty rows must give -inf"
        finite = torch.isfinite(ref_lse)
        torch.testing.assert_close(got[finite], ref_lse[finite], atol=latol, rtol=lrtol, msg=f"request {r} lse")


def requests_of(cache, indptr, indices, last, layout="NHD"):
    k_pages, v_pages = paged_cache_f64(cache, layout)
    return read_paged_kv_oracle(k_pages, v_pages, indices, indptr, last)


def kv_lens_of(indptr, last, page_size):
    pages = (indptr[1:] - indptr[:-1]).tolist()
    return torch.tensor([(p - 1) * page_size + n if p else 0 for p, n in zip(pages, last.tolist())],
                        dtype=torch.int32)


if HAS_CUDA:
    # (qo_lens, kv_lens): one prefill chunk, speculative verifications and decodes
    MIXES = [
        ([1024] + [1] * 64, [2048] + [4096] * 64),
        ([300, 4, 8, 1, 1, 2], [1000, 30000, 9, 1, 17000, 2]),
        ([1] * 16 + [777], [100 * i + 1 for i in range(16)] + [1500]),
        ([235, 1353], [2, 1]),  # more queries than keys (upstream's "real workload" case)
    ]
    HEADS, DIM = (32, 8), 128
    PAGE_SIZES = [1, 16]  # odd page sizes run on the CPU (the oracle reads pages token by token)
else:
    MIXES = [
        ([23, 1, 1, 1], [70, 33, 1, 130]),
        ([4, 8, 1, 2], [5, 40, 17, 2]),
        ([1, 1, 0, 3], [9, 0, 6, 3]),  # a request without keys, one without queries
        ([35, 13, 2], [2, 1, 70]),  # more queries than keys: the first rows see nothing (causal)
    ]
    HEADS, DIM = (4, 2), 16
    PAGE_SIZES = [1, 5, 16]


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("mix", range(len(MIXES)))
@pytest.mark.parametrize("causal", [True, False])
def test_mixed_batch_matches_oracle(path, device, page_size, mix, causal):
    qo_lens, kv_lens = MIXES[mix]
    hq, hk = HEADS
    dtype = torch.bfloat16
    cache, indptr, indices, last = make_paged_batch(kv_lens, page_size, hk, DIM, dtype, device)
    w = BatchAttention(device=device)
    w.plan(indptr_of(qo_lens), indptr, indices, torch.tensor(kv_lens, dtype=torch.int32), hq, hk, DIM, DIM, page_size,
           causal=causal)
    q = torch.randn(sum(qo_lens), hq, DIM, dtype=dtype, device=device)
    out, lse = w.run(q, cache)
    assert out.shape == (sum(qo_lens), hq, DIM) and lse.shape == (sum(qo_lens), hq) and lse.dtype == torch.float32
    check_requests(out, lse, q, qo_lens, requests_of(cache, indptr, indices, last), causal=causal)


def test_plan_interleaves_decodes_with_prefill_tiles(device, monkeypatch):
    """The work list interleaves the small requests' items with the prefill's (test_scheduler.py checks the
    order itself), so that one launch runs bandwidth- and tensor-core-bound programs side by side."""
    from flashtile._core import prefill_wrapper
    from flashtile.attention import SMALL_ROWS

    seen = []
    real = prefill_wrapper.plan_prefill_work
    monkeypatch.setattr(prefill_wrapper, "plan_prefill_work", lambda *a, **k: seen.append(k) or real(*a, **k))
    qo_lens, kv_lens = MIXES[0]
    cache, indptr, indices, last = make_paged_batch(kv_lens, 16, HEADS[1], DIM, torch.bfloat16, device)
    w = BatchAttention(device=device)
    w.plan(indptr_of(qo_lens), indptr, indices, torch.tensor(kv_lens, dtype=torch.int32), *HEADS, DIM, DIM, 16)
    assert seen and all(k["interleave_rows"] == SMALL_ROWS for k in seen)
    prefill = flashtile.BatchPrefillWithPagedKVCacheWrapper(torch.empty(16 << 20, dtype=torch.uint8, device=device))
    seen.clear()
    prefill.plan(indptr_of(qo_lens), indptr, indices, last, *HEADS, DIM, 16)
    assert seen and all(k["interleave_rows"] is None for k in seen)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_soft_cap_gqa_fp16_layouts(path, device, layout):
    qo_lens, kv_lens = ([7, 1, 3], [40, 12, 3]) if not HAS_CUDA else ([700, 1, 3], [4000, 1200, 3])
    hq, hk, d, ps, cap = 6, 2, 32, 4, 5.0
    cache, indptr, indices, last = make_paged_batch(kv_lens, ps, hk, d, torch.float16, device, layout=layout,
                                                    form="tuple", scale=3.0)
    w = BatchAttention(kv_layout=layout, device=device)
    w.plan(indptr_of(qo_lens), indptr.to(device), indices.to(device), torch.tensor(kv_lens, dtype=torch.int32), hq,
           hk, d, d, ps, causal=True, sm_scale=0.3, logits_soft_cap=cap, q_data_type=torch.float16,
           kv_data_type=torch.float16)
    assert w._logits_soft_cap == cap and w._causal
    q = torch.randn(sum(qo_lens), hq, d, dtype=torch.float16, device=device) * 2
    out = torch.empty(sum(qo_lens), hq, d, dtype=torch.float16, device=device)
    lse = torch.empty(sum(qo_lens), hq, dtype=torch.float32, device=device)
    got = w.run(q, cache, out=out, lse=lse, logits_soft_cap=cap)
    assert got[0] is out and got[1] is lse
    check_requests(out, lse, q, qo_lens, requests_of(cache, indptr, indices, last, layout), causal=True,
                   sm_scale=0.3, logits_soft_cap=cap)
    # The default run() cap (0.0) applies the planned one.
    out2, _ = w.run(q, cache)
    torch.testing.assert_close(out2, out, atol=0, rtol=0)


@pytest.mark.parametrize("qo_lens,kv_lens,split", [
    ([1, 1, 3, 40], [9, 70, 5, 60], True),  # decodes first, then a prefill chunk (engines' order)
    ([40, 17, 2, 1], [40, 130, 2, 33], True),  # large-row requests first
    ([1, 40, 1], [5, 50, 7], False),  # the classes interleave: one plan
    ([1, 2, 1], [5, 50, 7], False),  # one class: one plan
])
def test_split_row_classes(path, device, qo_lens, kv_lens, split):
    """``split_row_classes``: a mixed batch planned as two parts with their own row tiles gives the oracle's
    results in one (out, lse); batches that cannot be cut keep one plan."""
    if HAS_CUDA:
        qo_lens = [q * 20 if q > 8 else q for q in qo_lens]
        kv_lens = [max(k * 20, q) for k, q in zip(kv_lens, qo_lens)]
    cache, indptr, indices, last = make_paged_batch(kv_lens, 16, 2, 16, torch.float16, device, indptr_offset=2)
    w = BatchAttention(device=device)
    w.split_row_classes = True
    w.plan(indptr_of(qo_lens), indptr, indices, torch.tensor(kv_lens, dtype=torch.int32), 8, 2, 16, 16, 16,
           causal=True, q_data_type=torch.float16, kv_data_type=torch.float16)
    assert (w._split_row is not None) == split
    q = torch.randn(sum(qo_lens), 8, 16, dtype=torch.float16, device=device)
    out, lse = w.run(q, cache)
    check_requests(out, lse, q, qo_lens, requests_of(cache, indptr, indices, last), causal=True)
    given = (torch.empty_like(out), torch.empty_like(lse))
    got = w.run(q, cache, *given)
    assert got[0] is given[0] and got[1] is given[1] and torch.equal(given[0], out)
    with pytest.raises(ValueError, match="q"):
        w.run(q[1:], cache)
    with pytest.raises(ValueError, match="out"):
        w.run(q, cache, out=out[:, :, :8])


def test_v_scale(path, device):
    qo_lens, kv_lens = [3, 1], [20, 9]
    cache, indptr, indices, last = make_paged_batch(kv_lens, 4, 2, 16, torch.bfloat16, device)
    w = BatchAttention(device=device)
    w.plan(indptr_of(qo_lens), indptr, indices, torch.tensor(kv_lens, dtype=torch.int32), 4, 2, 16, 16, 4,
           causal=True)
    q = torch.randn(4, 4, 16, dtype=torch.bfloat16, device=device)
    out, lse = w.run(q, cache, v_scale=2.0)
    check_requests(out, lse, q, qo_lens, requests_of(cache, indptr, indices, last), causal=True, v_scale=2.0)


def test_head_dim_vo_differs(path, device):
    qo_lens, kv_lens = [3, 1], [20, 9]
    cache, indptr, indices, last = make_paged_batch(kv_lens, 4, 2, 32, torch.bfloat16, device, head_dim_vo=16)
    w = BatchAttention(device=device)
    w.plan(indptr_of(qo_lens), indptr, indices, torch.tensor(kv_lens, dtype=torch.int32), 2, 2, 32, 16, 4,
           causal=True)
    q = torch.randn(4, 2, 32, dtype=torch.bfloat16, device=device)
    out, lse = w.run(q, cache)
    assert out.shape == (4, 2, 16)
    check_requests(out, lse, q, qo_lens, requests_of(cache, indptr, indices, last), causal=True)


def test_replan_other_mix(path, device):
    """One wrapper, plans of other compositions in turn (a serving loop)."""
    w = BatchAttention(device=device)
    for qo_lens, kv_lens in (([5, 1], [30, 8]), ([1, 1, 1], [3, 60, 1]), ([12], [12])):
        cache, indptr, indices, last = make_paged_batch(kv_lens, 16, 2, 16, torch.bfloat16, device)
        w.plan(indptr_of(qo_lens), indptr, indices, torch.tensor(kv_lens, dtype=torch.int32), 4, 2, 16, 16, 16,
               causal=True)
        q = torch.randn(sum(qo_lens), 4, 16, dtype=torch.bfloat16, device=device)
        out, lse = w.run(q, cache)
        check_requests(out, lse, q, qo_lens, requests_of(cache, indptr, indices, last), causal=True)


def test_errors(device):
    kv_lens = [9, 4]
    cache, indptr, indices, last = make_paged_batch(kv_lens, 4, 2, 16, torch.bfloat16, device)
    qo = indptr_of([2, 1])
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    w = BatchAttention(device=device)
    with pytest.raises(RuntimeError, match="plan"):
        w.run(torch.randn(3, 4, 16, dtype=torch.bfloat16, device=device), cache)
    with pytest.raises(ValueError, match="kv_len_arr"):  # 13 tokens do not fit 3 pages of 4
        w.plan(qo, indptr, indices, torch.tensor([13, 4], dtype=torch.int32), 4, 2, 16, 16, 4)
    with pytest.raises(ValueError, match="kv_len_arr"):
        w.plan(qo, indptr, indices, torch.tensor([9], dtype=torch.int32), 4, 2, 16, 16, 4)
    with pytest.raises(TypeError, match="kv_len_arr"):
        w.plan(qo, indptr, indices, lens.float(), 4, 2, 16, 16, 4)
    with pytest.raises(ValueError, match="qo_indptr"):
        w.plan(indptr_of([2]), indptr, indices, lens, 4, 2, 16, 16, 4)
    with pytest.raises(ValueError, match="num_qo_heads"):
        w.plan(qo, indptr, indices, lens, 3, 2, 16, 16, 4)
    with pytest.raises(ValueError, match="head_dim_vo"):
        w.plan(qo, indptr, indices, lens, 4, 2, 16, 0, 4)
    with pytest.raises(ValueError, match="page_size"):
        w.plan(qo, indptr, indices, lens, 4, 2, 16, 16, 0)
    with pytest.raises(NotImplementedError, match="use_profiler"):
        w.plan(qo, indptr, indices, lens, 4, 2, 16, 16, 4, use_profiler=True)
    w.plan(qo, indptr, indices, lens, 4, 2, 16, 16, 4, causal=True)
    q = torch.randn(3, 4, 16, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="logits_soft_cap"):
        w.run(q, cache, logits_soft_cap=30.0)  # not planned (upstream's error)
    with pytest.raises(ValueError, match="q_data_type"):
        w.run(q.half(), cache.half())
    with pytest.raises(ValueError, match="kv_data_type"):
        w.run(q, cache.half())
    with pytest.raises(ValueError, match="out"):
        w.run(q, cache, out=torch.empty(3, 4, 8, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match="lse"):
        w.run(q, cache, lse=torch.empty(3, 4, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="q"):
        w.run(q[:2], cache)
    with pytest.raises(NotImplementedError, match="profiler_buffer"):
        w.run(q, cache, profiler_buffer=torch.empty(16, dtype=torch.uint64, device=device))
    w.plan(qo, indptr, indices, lens, 4, 2, 16, 16, 4, logits_soft_cap=10.0)
    with pytest.raises(ValueError, match="logits_soft_cap"):
        w.run(q, cache, logits_soft_cap=20.0)  # the cap is fixed at plan time
    with pytest.raises(ValueError, match="kv_layout"):
        BatchAttention(kv_layout="NDH", device=device)


def test_import_surface():
    assert flashtile.BatchAttention is BatchAttention
    assert flashtile.attention.BatchAttention is BatchAttention


def test_upstream_signature():
    """Positional parameters of FlashInfer v0.3.1's BatchAttention, in order."""
    import inspect

    def names(fn):
        return [p.name for p in inspect.signature(fn).parameters.values()
                if p.kind == p.POSITIONAL_OR_KEYWORD][1:]

    assert names(BatchAttention.__init__) == ["kv_layout", "device"]
    assert names(BatchAttention.plan) == [
        "qo_indptr", "kv_indptr", "kv_indices", "kv_len_arr", "num_qo_heads", "num_kv_heads", "head_dim_qk",
        "head_dim_vo", "page_size", "causal", "sm_scale", "logits_soft_cap", "q_data_type", "kv_data_type",
        "use_profiler"]
    assert names(BatchAttention.run) == ["q", "kv_cache", "out", "lse", "logits_soft_cap", "profiler_buffer"]


def test_torch_compile_run(path, device):
    kv_lens, qo_lens = [20, 3], [4, 1]
    cache, indptr, indices, last = make_paged_batch(kv_lens, 4, 2, 16, torch.bfloat16, device)
    w = BatchAttention(device=device)
    w.plan(indptr_of(qo_lens), indptr, indices, torch.tensor(kv_lens, dtype=torch.int32), 4, 2, 16, 16, 4,
           causal=True)
    q = torch.randn(5, 4, 16, dtype=torch.bfloat16, device=device)

    def step(q, cache):
        out, lse = w.run(q, cache)
        return out.float() * 2, lse

    # aot_eager: the op's inductor lowering is test_batch_prefill's test_torch_compile_run.
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(q, cache), step(q, cache)):
        torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------------------
# CUDA-graph mode (flashtile extension): fixed buffers, re-plan, replay
# ------------------------------------------------------------------------------------------------


def _graph_wrapper(device, b, max_pages=64):
    bufs = dict(qo_indptr_buf=torch.zeros(b + 1, dtype=torch.int32, device=device),
                kv_indptr_buf=torch.zeros(b + 1, dtype=torch.int32, device=device),
                kv_indices_buf=torch.zeros(max_pages, dtype=torch.int32, device=device))
    return BatchAttention(device=device, use_cuda_graph=True, **bufs), bufs


def test_graph_mode_replans_into_its_buffers(path, device):
    b = 3
    w, bufs = _graph_wrapper(device, b)
    assert w.is_cuda_graph_enabled and not BatchAttention(device=device).is_cuda_graph_enabled
    q = torch.randn(16, 4, 16, dtype=torch.bfloat16, device=device)
    first = None
    for qo_lens, kv_lens in (([8, 1, 7], [9, 8, 40]), ([1, 1, 3], [70, 2, 5]), ([5, 0, 4], [5, 3, 30])):
        cache, indptr, indices, last = make_paged_batch(kv_lens, 4, 2, 16, torch.bfloat16, device)
        w.plan(indptr_of(qo_lens), indptr, indices, torch.tensor(kv_lens, dtype=torch.int32), 4, 2, 16, 16, 4,
               causal=True)
        plan = w._wrapper._plan
        assert plan.page_indices.data_ptr() == bufs["kv_indices_buf"].data_ptr()
        first = first or (plan.meta.data_ptr(), plan.num_items)
        assert (plan.meta.data_ptr(), plan.num_items) == first, "fixed grid and work-list storage"
        out, lse = w.run(q, cache)
        total = sum(qo_lens)
        check_requests(out[:total], lse[:total], q[:total], qo_lens, requests_of(cache, indptr, indices, last),
                       causal=True)


def test_graph_mode_errors(device):
    with pytest.raises(ValueError, match="kv_indptr_buf should be a torch.Tensor in cudagraph mode"):
        BatchAttention(device=device, use_cuda_graph=True, qo_indptr_buf=torch.zeros(3, dtype=torch.int32))
    w, _ = _graph_wrapper(device, 2)
    cache, indptr, indices, last = make_paged_batch([5, 9, 3], 4, 2, 16, torch.bfloat16, device)
    lens = torch.tensor([5, 9, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="batch size should be fixed"):
        w.plan(indptr_of([1, 1, 1]), indptr, indices, lens, 4, 2, 16, 16, 4)
    cache, indptr, indices, last = make_paged_batch([5, 9], 4, 2, 16, torch.bfloat16, device)
    with pytest.raises(ValueError, match="less than or equal to the allocated buffer.*kv_indices_buf"):
        _graph_wrapper(device, 2, max_pages=3)[0].plan(indptr_of([2, 3]), indptr, indices, lens[:2], 4, 2, 16, 16, 4)
    w.plan(indptr_of([2, 3]), indptr, indices, lens[:2], 4, 2, 16, 16, 4, causal=True)
    with pytest.raises(ValueError, match="total number of rows"):
        w.plan(indptr_of([3, 3]), indptr, indices, lens[:2], 4, 2, 16, 16, 4, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16])
def test_cuda_graph_capture_replan_replay(page_size):
    """Capture run() once; re-plan other mixes (a prefill chunk, speculative verifications, decodes) of the
    same batch size and no more query rows; replay; compare with the oracle."""
    from flashtile._core.graphs import capture_graph

    device = torch.device("cuda")
    b, hq, hk, d = 8, 32, 8, 128
    max_pages = 40000 // page_size + 64
    w, _ = _graph_wrapper(device, b, max_pages=max_pages * 2)
    pool = torch.randn(max_pages * 2, 2, page_size, hk, d, dtype=torch.bfloat16, device=device)
    rows = 512 + 7
    q = torch.randn(rows, hq, d, dtype=torch.bfloat16, device=device)
    out = torch.empty(rows, hq, d, dtype=torch.bfloat16, device=device)
    lse = torch.empty(rows, hq, dtype=torch.float32, device=device)

    def table(lens):
        pages = [-(-n // page_size) for n in lens]
        perm = torch.randperm(pool.shape[0], dtype=torch.int32)[: sum(pages)]
        last = torch.tensor([n - (p - 1) * page_size if p else 0 for n, p in zip(lens, pages)], dtype=torch.int32)
        return indptr_of(pages), perm, last

    def plan(qo_lens, kv_lens):
        tbl = table(kv_lens)
        w.plan(indptr_of(qo_lens), tbl[0], tbl[1], torch.tensor(kv_lens, dtype=torch.int32), hq, hk, d, d, page_size,
               causal=True, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
        return tbl

    plan([512] + [1] * 7, [2048] + [4096] * 7)
    graph, _ = capture_graph(lambda: w.run(q, pool, out=out, lse=lse), warmup=2)
    for qo_lens, kv_lens in (([1, 2, 3, 4, 5, 6, 7, 8], [3000, 30000, 3, 4, 5, 17, 9000, 64]),
                             ([1] * 8, [1] * 8), ([300, 1, 1, 1, 1, 1, 1, 8], [600, 38000, 1, 2, 3, 4, 5, 8])):
        tbl = plan(qo_lens, kv_lens)
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        total = sum(qo_lens)
        check_requests(out[:total], lse[:total], q[:total], qo_lens, requests_of(pool, *tbl), causal=True)
