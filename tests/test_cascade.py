"""Cascade wrappers (MultiLevelCascadeAttentionWrapper and the legacy shared-prefix wrappers) against
the float64 oracle on the concatenated KV of every level, on all paths."""

import pytest
import torch

import flashtile
from attention_cases import workspace
from conftest import HAS_CUDA
from flashtile._core.graphs import capture_graph
from flashtile.cascade import (
    BatchDecodeWithSharedPrefixPagedKVCacheWrapper,
    BatchPrefillWithSharedPrefixPagedKVCacheWrapper,
    MultiLevelCascadeAttentionWrapper,
)
from oracles import LSE_TOLERANCES, TOLERANCES, attention_oracle, paged_cache_f64  # noqa: F401


def indptr_of(lens):
    return torch.tensor([0] + torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)


class PagePool:
    """A paged cache with pages handed out in random order, one page table per level."""

    def __init__(self, num_pages, page_size, hk, d, dtype, device, layout="NHD"):
        self.page_size, self.layout = page_size, layout
        shape = [num_pages, 2, page_size, hk, d] if layout == "NHD" else [num_pages, 2, hk, page_size, d]
        self.cache = torch.randn(shape, device=device).to(dtype)
        self.free = torch.randperm(num_pages, dtype=torch.int32).tolist()

    def table(self, lens):
        """Page table for sequences of ``lens`` tokens: (indptr, indices, last_page_len)."""
        pages = [-(-n // self.page_size) for n in lens]
        ids = [self.free.pop() for _ in range(sum(pages))]
        last = [n - (p - 1) * self.page_size if p else 0 for n, p in zip(lens, pages)]
        return indptr_of(pages), torch.tensor(ids, dtype=torch.int32), torch.tensor(last, dtype=torch.int32)

    def tokens(self, table, group):
        """float64 NHD k, v of one group of a level."""
        indptr, indices, last = table
        k_pages, v_pages = paged_cache_f64(self.cache, self.layout)
        ids = indices[int(indptr[group]): int(indptr[group + 1])].long()
        n = max(len(ids) - 1, 0) * self.page_size + int(last[group]) if len(ids) else 0
        return k_pages[ids].flatten(0, 1)[:n], v_pages[ids].flatten(0, 1)[:n]


def cascade_oracle(q, pool, qo_indptrs, tables, causal, **kw):
    """Per last-level group: keys = its group's KV at every level (concatenated), causal on the last."""
    out = torch.zeros(q.shape[0], q.shape[1], q.shape[2], dtype=torch.float64)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float64)
    last_ip = qo_indptrs[-1].tolist()
    for g in range(len(last_ip) - 1):
        a, b = last_ip[g], last_ip[g + 1]
        if a == b:
            continue
        ks, vs, shared = [], [], 0
        for level, (ip, table) in enumerate(zip(qo_indptrs, tables)):
            owner = int(torch.searchsorted(ip, torch.tensor([a], dtype=ip.dtype), right=True)) - 1
            k, v = pool.tokens(table, owner)
            ks.append(k)
            vs.append(v)
            if level < len(tables) - 1:
                shared += k.shape[0]
        k, v = torch.cat(ks), torch.cat(vs)
        unique = k.shape[0] - shared
        mask = torch.ones(b - a, k.shape[0], dtype=torch.bool)
        if causal:
            pos = torch.arange(b - a) + unique - (b - a)
            mask[:, shared:] = torch.arange(unique)[None, :] <= pos[:, None]
        out[a:b], lse[a:b] = attention_oracle(q[a:b], k, v, custom_mask=mask, **kw)
    return out, lse


def check(out, q, ref):
    atol, rtol = TOLERANCES[q.dtype]
    assert not out.isnan().any()
    torch.testing.assert_close(out.double().cpu(), ref[0], atol=atol, rtol=rtol)


if HAS_CUDA:
    CASES = [  # (prefix lens per level above the last, unique lens, qo lens, page_size, heads, d)
        ([[3000]], [1, 300, 0, 77], [1, 1, 1, 1], 16, (32, 8), 128),
        ([[1000], [200, 17]], [5, 0, 33, 60], [3, 1, 9, 2], 5, (8, 2), 64),
        ([[513]], [64] * 8, [16] * 8, 1, (16, 16), 128),
    ]
else:
    CASES = [
        ([[30]], [1, 7, 0, 12], [1, 1, 1, 1], 4, (4, 2), 16),
        ([[20], [9, 5]], [5, 0, 3, 6], [3, 1, 2, 2], 3, (2, 1), 32),
        ([[17]], [4, 9], [4, 9], 1, (4, 4), 16),
    ]


@pytest.mark.parametrize("prefixes, unique, qo, page_size, heads, d", CASES)
@pytest.mark.parametrize("causal", [False, True])
def test_multilevel_matches_oracle(path, device, prefixes, unique, qo, page_size, heads, d, causal):
    """Levels: each entry of ``prefixes`` is a level whose groups split the requests evenly."""
    dtype = torch.float16
    pool = PagePool(4096 if HAS_CUDA else 256, page_size, heads[1], d, dtype, device)
    num_levels = len(prefixes) + 1
    qo_indptrs, tables = [], []
    b = len(unique)
    for level_lens in prefixes:
        groups = len(level_lens)
        per = b // groups
        qo_indptrs.append(indptr_of([sum(qo[g * per:(g + 1) * per]) for g in range(groups)]))
        tables.append(pool.table(level_lens))
    qo_indptrs.append(indptr_of(qo))
    tables.append(pool.table(unique))
    q = torch.randn(sum(qo), heads[0], d, dtype=dtype, device=device)
    w = MultiLevelCascadeAttentionWrapper(num_levels, workspace(device))
    w.plan(qo_indptrs, [t[0] for t in tables], [t[1] for t in tables], [t[2] for t in tables], heads[0], heads[1],
           d, page_size, causal=causal)
    out = w.run(q, pool.cache)
    assert out.shape == q.shape and out.dtype == dtype
    check(out, q, cascade_oracle(q, pool, qo_indptrs, tables, causal))


def test_multilevel_request_without_pages_has_no_unique_kv(path, device):
    """A last-level request with no pages but last_page_len 1 sees only the shared prefix."""
    dtype, page_size, heads, d = torch.float16, 4, (4, 2), 16
    pool = PagePool(64, page_size, heads[1], d, dtype, device)
    unique, qo = [6, 0, 5], [1, 1, 1]
    tables = [pool.table([9]), pool.table(unique)]
    indptr, indices, last = tables[1]
    tables[1] = (indptr, indices, torch.where(indptr[1:] > indptr[:-1], last, torch.ones_like(last)))
    qo_indptrs = [indptr_of([sum(qo)]), indptr_of(qo)]
    q = torch.randn(sum(qo), heads[0], d, dtype=dtype, device=device)
    w = MultiLevelCascadeAttentionWrapper(2, workspace(device))
    w.plan(qo_indptrs, [t[0] for t in tables], [t[1].to(device) for t in tables], [t[2] for t in tables], heads[0],
           heads[1], d, page_size)
    check(w.run(q, pool.cache), q, cascade_oracle(q, pool, qo_indptrs, tables, False))


def test_multilevel_options_and_errors(path, device):
    pool = PagePool(128, 4, 2, 16, torch.bfloat16, device)
    tables = [pool.table([20]), pool.table([3, 9])]
    qo_indptrs = [indptr_of([2]), indptr_of([1, 1])]
    q = torch.randn(2, 4, 16, dtype=torch.bfloat16, device=device)
    w = MultiLevelCascadeAttentionWrapper(2, workspace(device))
    kw = dict(logits_soft_cap=5.0, sm_scale=0.2, window_left=-1, q_data_type=torch.bfloat16)
    w.plan(qo_indptrs, [t[0] for t in tables], [t[1] for t in tables], [t[2] for t in tables], 4, 2, 16, 4, **kw)
    out = w.run(q, pool.cache)
    check(out, q, cascade_oracle(q, pool, qo_indptrs, tables, False, logits_soft_cap=5.0, sm_scale=0.2))
    with pytest.raises(ValueError, match="num_levels"):
        MultiLevelCascadeAttentionWrapper(0, workspace(device))
    with pytest.raises(ValueError, match="one per level"):
        w.plan(qo_indptrs[:1], [t[0] for t in tables], [t[1] for t in tables], [t[2] for t in tables], 4, 2, 16, 4)
    with pytest.raises(ValueError, match="same query rows"):
        w.plan([indptr_of([3]), indptr_of([1, 1])], [t[0] for t in tables], [t[1] for t in tables],
               [t[2] for t in tables], 4, 2, 16, 4)
    with pytest.raises(ValueError, match="cudagraph|one per level"):
        MultiLevelCascadeAttentionWrapper(2, workspace(device), use_cuda_graph=True)


def test_shared_prefix_decode_wrapper(path, device):
    hq, hk, d, ps = 4, 2, 16, 4
    pool = PagePool(64, ps, hk, d, torch.float16, device)
    unique = [3, 0, 9]
    table = pool.table(unique)
    k_shared = torch.randn(21, hk, d, dtype=torch.float16, device=device)
    v_shared = torch.randn(21, hk, d, dtype=torch.float16, device=device)
    q = torch.randn(len(unique), hq, d, dtype=torch.float16, device=device)
    w = BatchDecodeWithSharedPrefixPagedKVCacheWrapper(workspace(device))
    w.begin_forward(*table, hq, hk, d, ps, "float16")
    out = w.forward(q, k_shared, v_shared, pool.cache)
    for r in range(len(unique)):
        k_u, v_u = pool.tokens(table, r)
        ref = attention_oracle(q[r:r + 1], torch.cat([k_shared.double().cpu(), k_u]),
                               torch.cat([v_shared.double().cpu(), v_u]))
        torch.testing.assert_close(out[r:r + 1].double().cpu(), ref[0], atol=2e-3, rtol=2e-3)
    w.end_forward()


def test_shared_prefix_prefill_wrapper(path, device):
    hq, hk, d, ps = 4, 2, 16, 3
    pool = PagePool(64, ps, hk, d, torch.float16, device)
    unique, qo = [5, 2, 7], [3, 2, 1]
    table = pool.table(unique)
    k_shared = torch.randn(13, hk, d, dtype=torch.float16, device=device)
    v_shared = torch.randn(13, hk, d, dtype=torch.float16, device=device)
    q = torch.randn(sum(qo), hq, d, dtype=torch.float16, device=device)
    w = BatchPrefillWithSharedPrefixPagedKVCacheWrapper(workspace(device))
    w.begin_forward(indptr_of(qo), *table, hq, hk, d, ps)
    for causal in (True, False):
        out = w.forward(q, k_shared, v_shared, pool.cache, causal=causal)
        ip = indptr_of(qo).tolist()
        for r in range(len(unique)):
            k_u, v_u = pool.tokens(table, r)
            n_q, n_u = qo[r], unique[r]
            mask = torch.ones(n_q, 13 + n_u, dtype=torch.bool)
            if causal:
                mask[:, 13:] = torch.arange(n_u)[None, :] <= (torch.arange(n_q) + n_u - n_q)[:, None]
            ref = attention_oracle(q[ip[r]: ip[r + 1]], torch.cat([k_shared.double().cpu(), k_u]),
                                   torch.cat([v_shared.double().cpu(), v_u]), custom_mask=mask)
            torch.testing.assert_close(out[ip[r]: ip[r + 1]].double().cpu(), ref[0], atol=2e-3, rtol=2e-3)


def test_import_surface():
    assert flashtile.MultiLevelCascadeAttentionWrapper is MultiLevelCascadeAttentionWrapper
    assert flashtile.BatchDecodeWithSharedPrefixPagedKVCacheWrapper is BatchDecodeWithSharedPrefixPagedKVCacheWrapper
    assert flashtile.BatchPrefillWithSharedPrefixPagedKVCacheWrapper is BatchPrefillWithSharedPrefixPagedKVCacheWrapper


@pytest.mark.gpu
def test_multilevel_cuda_graph_replan_replay():
    """Graph mode: capture run(), re-plan every level with other lengths (same batch size), replay."""
    device = torch.device("cuda")
    b, hq, hk, d, ps = 8, 32, 8, 128, 16
    pool = PagePool(8192, ps, hk, d, torch.bfloat16, device)
    bufs = [[torch.zeros(n + 1, dtype=torch.int32, device=device) for n in (1, b)],
            [torch.zeros(n + 1, dtype=torch.int32, device=device) for n in (1, b)],
            [torch.zeros(4096, dtype=torch.int32, device=device) for _ in range(2)],
            [torch.zeros(n, dtype=torch.int32, device=device) for n in (1, b)]]
    w = MultiLevelCascadeAttentionWrapper(2, workspace(device, 128), use_cuda_graph=True, qo_indptr_buf_arr=bufs[0],
                                          paged_kv_indptr_buf_arr=bufs[1], paged_kv_indices_buf_arr=bufs[2],
                                          paged_kv_last_page_len_buf_arr=bufs[3])
    q = torch.randn(b, hq, d, dtype=torch.bfloat16, device=device)
    qo_indptrs = [indptr_of([b]), indptr_of([1] * b)]

    def plan(prefix, unique):
        tables = [pool.table([prefix]), pool.table(unique)]
        w.plan(qo_indptrs, [t[0] for t in tables], [t[1] for t in tables], [t[2] for t in tables], hq, hk, d, ps,
               q_data_type=torch.bfloat16)
        return tables

    plan(4000, [100] * b)
    graph, out = capture_graph(lambda: w.run(q, pool.cache), warmup=2)
    for prefix, unique in ((9000, [1, 50, 0, 700, 3, 3, 3, 3]), (17, [2000] * b)):
        pool.free = torch.randperm(pool.cache.shape[0], dtype=torch.int32).tolist()
        tables = plan(prefix, unique)
        graph.replay()
        torch.cuda.synchronize()
        check(out, q, cascade_oracle(q, pool, qo_indptrs, tables, False))
