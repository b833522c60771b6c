"""BatchMLAPagedAttentionWrapper (DeepSeek MLA): request by request against the float64 MQA oracle over
[latent | rope] keys, on the reference path, the interpreted kernels (CPU) and the GPU; plan/run
checks with typed errors; CUDA-graph capture, re-plan and replay on the GPU."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flashtile
from attention_cases import make_mla_batch, random_page_table, workspace
from conftest import HAS_CUDA
from flashtile.mla import BatchMLAPagedAttentionWrapper
from flashtile.scheduler.mla_work import ITEM_FIELDS, REQ_FIELDS, balanced_chunk, plan_mla_work
from oracles import LSE_TOLERANCES, TOLERANCES, mla_oracle

FP8 = getattr(torch, "float8_e4m3fn", None)


def check_mla(out, lse, q_nope, q_pe, ckv, kpe, qo_indptr, kv_indptr, kv_indices, kv_lens, *, causal, sm_scale,
              dtype, ckv_scale=1.0, kpe_scale=1.0, rtol_scale=1.0):
    ref_o, ref_lse = mla_oracle(q_nope, q_pe, ckv, kpe, qo_indptr, kv_indptr, kv_indices, kv_lens, causal=causal,
                                sm_scale=sm_scale, ckv_scale=ckv_scale, kpe_scale=kpe_scale)
    nnz = int(qo_indptr[-1])
    atol, rtol = TOLERANCES[dtype]
    latol, lrtol = LSE_TOLERANCES[dtype]
    got_o, got_lse = out[:nnz].double().cpu(), lse[:nnz].double().cpu()
    assert not got_o.isnan().any(), "output has NaN (unwritten element)"
    torch.testing.assert_close(got_o, ref_o[:nnz], atol=atol * rtol_scale, rtol=rtol * rtol_scale)
    assert torch.equal(torch.isinf(got_lse), torch.isinf(ref_lse[:nnz])), "rows without keys must give lse -inf"
    finite = torch.isfinite(ref_lse[:nnz])
    torch.testing.assert_close(got_lse[finite], ref_lse[:nnz][finite], atol=latol * rtol_scale, rtol=lrtol)
    empty = ~torch.isfinite(ref_lse[:nnz])
    assert torch.equal(got_o[empty], torch.zeros_like(got_o[empty])), "rows without keys must be 0"


if HAS_CUDA:
    DIMS = [(512, 64)]
    # (qo_lens, kv_lens, page_size, heads)
    CASES = [
        ([1] * 6, [1, 64, 65, 0, 4096, 300], 64, 128),
        ([1] * 5, [1, 17, 0, 2000, 33], 1, 16),
        ([4, 2, 8, 3], [4, 100, 1025, 64], 16, 64),
        ([1], [32768], 64, 128),
        ([37, 5, 130], [37, 800, 4000], 16, 32),
        ([1, 1, 3], [7, 90, 12], 3, 24),
    ]
else:
    DIMS = [(32, 16)]
    CASES = [
        ([1] * 5, [1, 16, 17, 0, 40], 16, 4),
        ([1, 1, 1], [1, 7, 33], 1, 2),
        ([3, 2, 4], [3, 20, 9], 3, 2),
        ([7, 1], [30, 0], 4, 3),
        ([2, 1], [18, 40], 16, 16),
    ]


@pytest.mark.parametrize("qo_lens, kv_lens, page_size, heads", CASES)
@pytest.mark.parametrize("causal", [True, False])
def test_mla_matches_oracle(path, device, qo_lens, kv_lens, page_size, heads, causal):
    dc, dp = DIMS[0]
    dtype = torch.bfloat16 if page_size % 2 else torch.float16
    batch = make_mla_batch(qo_lens, kv_lens, page_size, heads, dc, dp, dtype, device, indptr_offset=page_size % 3)
    q_nope, q_pe, ckv, kpe, qo_indptr, kv_indptr, kv_indices, lens = batch
    sm_scale = 1.0 / math.sqrt(dc // 4 + dp)
    w = BatchMLAPagedAttentionWrapper(workspace(device))
    w.plan(qo_indptr, kv_indptr, kv_indices, lens, heads, dc, dp, page_size, causal, sm_scale, dtype, dtype)
    out, lse = w.run(q_nope, q_pe, ckv, kpe, return_lse=True)
    assert out.shape == q_nope.shape and out.dtype == dtype and lse.shape == q_nope.shape[:2]
    check_mla(out, lse, *batch, causal=causal, sm_scale=sm_scale, dtype=dtype)
    # out= / lse= are filled in place and returned; a second run on the same plan gives the same bits.
    out2, lse2 = torch.full_like(out, float("nan")), torch.full_like(lse, float("nan"))
    got = w.run(q_nope, q_pe, ckv, kpe, out=out2, lse=lse2, return_lse=True)
    assert got[0] is out2 and got[1] is lse2
    nnz = int(qo_indptr[-1])
    assert torch.equal(out2[:nnz], out[:nnz])


@pytest.mark.parametrize("qo_lens, kv_lens, page_size, heads", CASES[:3])
def test_mla_output_column_split(path, device, monkeypatch, qo_lens, kv_lens, page_size, heads):
    """MLA_OUT_SPLIT 2 (two programs per work item, one per half of the latent's output columns), with
    split-KV partial states and a sink variant: the same results as the oracle."""
    from flashtile._core import mla_tiles

    monkeypatch.setenv("FLASHTILE_HOPPER_MLA", "0")  # a knob of the Triton kernel: keep it on the 64-row tiles
    monkeypatch.setattr(mla_tiles, "MLA_OUT_SPLIT", 2)
    dc, dp = DIMS[0]
    batch = make_mla_batch(qo_lens, kv_lens, page_size, heads, dc, dp, torch.bfloat16, device)
    # fixed_split_size 64 on the GPU cases (4096 keys x 128 heads) needs ~18 MiB of partial states
    w = BatchMLAPagedAttentionWrapper(workspace(device, mib=128))
    w.plan(*batch[4:], heads, dc, dp, page_size, True, 0.15, torch.bfloat16, torch.bfloat16, fixed_split_size=64)
    assert w._plan.meta.config.out_split == 2
    out, lse = w.run(*batch[:4], return_lse=True)
    check_mla(out, lse, *batch, causal=True, sm_scale=0.15, dtype=torch.bfloat16)


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("qo_lens, kv_lens, page_size, heads", [CASES[0], CASES[1], CASES[2]])
def test_mla_page_id_prefetch_either_way(path, device, monkeypatch, prefetch, qo_lens, kv_lens, page_size, heads):
    """MLA_PREFETCH_PAGES (each key tile's page ids loaded one tile ahead, masked at the chunk's end) and
    its absence give the oracle's result, over split chunks (fixed_split_size) whose ends are not tile
    multiples of the request's pages, page size 1 and a page size that does not divide the tile."""
    from flashtile._core import mla_tiles

    monkeypatch.setenv("FLASHTILE_HOPPER_MLA", "0")  # a knob of the Triton kernel: keep it on the 64-row tiles
    monkeypatch.setattr(mla_tiles, "MLA_PREFETCH_PAGES", prefetch)
    dc, dp = DIMS[0]
    batch = make_mla_batch(qo_lens, kv_lens, page_size, heads, dc, dp, torch.bfloat16, device, indptr_offset=1)
    w = BatchMLAPagedAttentionWrapper(workspace(device, mib=128))
    w.plan(*batch[4:], heads, dc, dp, page_size, True, 0.15, torch.bfloat16, torch.bfloat16, fixed_split_size=64)
    out, lse = w.run(*batch[:4], return_lse=True)
    check_mla(out, lse, *batch, causal=True, sm_scale=0.15, dtype=torch.bfloat16)


@pytest.mark.parametrize("split", ["fixed", "disabled"])
def test_mla_split_options(path, device, split):
    dc, dp = DIMS[0]
    batch = make_mla_batch([1, 2], [70, 5], 16, 2, dc, dp, torch.float16, device)
    q_nope, q_pe, ckv, kpe, qo_indptr, kv_indptr, kv_indices, lens = batch
    w = BatchMLAPagedAttentionWrapper(workspace(device))
    kw = {"fixed_split_size": 16} if split == "fixed" else {"disable_split_kv": True}
    w.plan(qo_indptr, kv_indptr, kv_indices, lens, 2, dc, dp, 16, True, 0.2, torch.float16, torch.float16, **kw)
    out, lse = w.run(q_nope, q_pe, ckv, kpe, return_lse=True)
    check_mla(out, lse, *batch, causal=True, sm_scale=0.2, dtype=torch.float16)


def test_mla_runs_with_new_inputs(path, device):
    """run() after run() on one plan with new queries and caches of the same metadata, with and without
    ``out=`` and ``return_lse`` (on the GPU the later calls of a key replay the first one's launches): each
    call computes its own inputs, into the given ``out`` when there is one."""
    dc, dp = DIMS[0]
    batch = make_mla_batch([1, 2], [70, 5], 16, 2, dc, dp, torch.float16, device)
    w = BatchMLAPagedAttentionWrapper(workspace(device))
    w.plan(*batch[4:], 2, dc, dp, 16, True, 0.2, torch.float16, torch.float16, fixed_split_size=16)
    given = torch.empty_like(batch[0])
    for step in range(6):
        batch = (torch.randn_like(batch[0]), torch.randn_like(batch[1]), torch.randn_like(batch[2]),
                 torch.randn_like(batch[3]), *batch[4:])
        if step % 2:
            out, lse = w.run(*batch[:4], out=given, return_lse=True)
            assert out is given
        else:
            out = w.run(*batch[:4])
            lse = w.run(*batch[:4], return_lse=True)[1]
        check_mla(out, lse, *batch, causal=True, sm_scale=0.2, dtype=torch.float16)


def test_mla_merge_many_splits_wide_latent(path, device):
    """DeepSeek's 512-wide latent (four merge column blocks) over more splits than a merge step takes (8),
    with a head count that leaves a merge head block partly empty: the oracle's result."""
    heads = 5
    # 16-key chunks on CPU; on the GPU chunks are multiples of 64 keys, so the long request is longer there
    batch = make_mla_batch([1, 2], [1000 if HAS_CUDA else 300, 45], 16, heads, 512, 64, torch.bfloat16, device)
    w = BatchMLAPagedAttentionWrapper(workspace(device, mib=64))
    w.plan(*batch[4:], heads, 512, 64, 16, True, 0.05, torch.bfloat16, torch.bfloat16, fixed_split_size=16)
    assert w._plan.meta.max_splits > 8
    out, lse = w.run(*batch[:4], return_lse=True)
    check_mla(out, lse, *batch, causal=True, sm_scale=0.05, dtype=torch.bfloat16)


@pytest.mark.skipif(FP8 is None, reason="no float8_e4m3fn in this torch")
def test_mla_fp8_latent(path, device):
    dc, dp = DIMS[0]
    heads = 16 if HAS_CUDA else 2
    kv_lens = [1, 300, 0, 64] if HAS_CUDA else [1, 20, 0, 9]
    batch = make_mla_batch([1, 2, 1, 1], kv_lens, 16, heads, dc, dp, torch.bfloat16, device, kv_dtype=FP8, scale=4.0)
    q_nope, q_pe, ckv, kpe, qo_indptr, kv_indptr, kv_indices, lens = batch
    w = BatchMLAPagedAttentionWrapper(workspace(device))
    w.plan(qo_indptr, kv_indptr, kv_indices, lens, heads, dc, dp, 16, True, 0.1, "bfloat16", FP8)
    out, lse = w.run(q_nope, q_pe, ckv, kpe, return_lse=True, ckv_scale=0.25, kpe_scale=0.5)
    check_mla(out, lse, *batch, causal=True, sm_scale=0.1, dtype=torch.bfloat16, ckv_scale=0.25, kpe_scale=0.5)


def test_mla_small_workspace_splits_less(path, device, monkeypatch):
    """A long request on a workspace too small for the automatic split's partial states gets longer
    chunks (at worst none) instead of an error; a fixed split that does not fit raises, naming it."""
    import flashtile.mla as api

    real = api.mla_launch_facts
    monkeypatch.setattr(api, "mla_launch_facts", lambda *a: (*real(*a)[:3], 64))  # a 64-SM device: many splits
    dc, dp = DIMS[0]
    batch = make_mla_batch([1], [400], 16, 2, dc, dp, torch.float16, device)
    q_nope, q_pe, ckv, kpe, qo_indptr, kv_indptr, kv_indices, lens = batch
    small = torch.empty(4 * (dc + 1) * 6, dtype=torch.uint8, device=device)  # room for 6 partial rows
    w = BatchMLAPagedAttentionWrapper(small)
    w.plan(qo_indptr, kv_indptr, kv_indices, lens, 2, dc, dp, 16, True, 0.2, torch.float16, torch.float16)
    assert 1 < w._plan.meta.max_splits <= 3
    out, lse = w.run(q_nope, q_pe, ckv, kpe, return_lse=True)
    check_mla(out, lse, *batch, causal=True, sm_scale=0.2, dtype=torch.float16)
    with pytest.raises(ValueError, match="fixed_split_size=16"):
        w.plan(qo_indptr, kv_indptr, kv_indices, lens, 2, dc, dp, 16, True, 0.2, torch.float16, torch.float16,
               fixed_split_size=16)


def test_mla_empty_batch_rows_and_zero_length(path, device):
    dc, dp = DIMS[0]
    batch = make_mla_batch([1, 1], [0, 0], 16, 2, dc, dp, torch.float16, device)
    q_nope, q_pe, ckv, kpe, qo_indptr, kv_indptr, kv_indices, lens = batch
    w = BatchMLAPagedAttentionWrapper(workspace(device))
    w.plan(qo_indptr, kv_indptr, kv_indices, lens, 2, dc, dp, 16, False, 0.3, torch.float16, torch.float16)
    out, lse = w.run(q_nope, q_pe, ckv, kpe, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, torch.full_like(lse, float("-inf")))


def test_mla_exports():
    assert flashtile.BatchMLAPagedAttentionWrapper is flashtile.mla.BatchMLAPagedAttentionWrapper


# -- errors ---------------------------------------------------------------------------------------------


def _planned(device, dtype=torch.float16, **plan_kw):
    dc, dp = DIMS[0]
    batch = make_mla_batch([1, 1], [5, 9], 4, 2, dc, dp, dtype, device)
    q_nope, q_pe, ckv, kpe, qo_indptr, kv_indptr, kv_indices, lens = batch
    w = BatchMLAPagedAttentionWrapper(workspace(device))
    args = dict(qo_indptr=qo_indptr, kv_indptr=kv_indptr, kv_indices=kv_indices, kv_len_arr=lens, num_heads=2,
                head_dim_ckv=dc, head_dim_kpe=dp, page_size=4, causal=False, sm_scale=0.2, q_data_type=dtype,
                kv_data_type=dtype)
    args.update(plan_kw)
    return w, args, batch


@pytest.mark.parametrize("change, error, text", [
    ({"head_dim_ckv": 48}, NotImplementedError, "head_dim_ckv"),
    ({"head_dim_kpe": 128}, NotImplementedError, "head_dim_kpe"),
    ({"num_heads": 0}, ValueError, "num_heads"),
    ({"page_size": 0}, ValueError, "page_size"),
    ({"sm_scale": -1.0}, ValueError, "sm_scale"),
    ({"q_data_type": torch.float32}, TypeError, "q_data_type"),
    ({"kv_data_type": torch.bfloat16}, TypeError, "kv_data_type"),
    ({"kv_data_type": "float8_e5m2"}, TypeError, "kv_data_type"),
    ({"q_data_type": "nope"}, TypeError, "q_data_type"),
    ({"use_profiler": True}, NotImplementedError, "use_profiler"),
    ({"kv_len_arr": torch.tensor([5, 900], dtype=torch.int32)}, ValueError, "kv_len_arr"),
    ({"kv_len_arr": torch.tensor([5, -1], dtype=torch.int32)}, ValueError, "kv_len_arr"),
    ({"kv_len_arr": torch.tensor([5], dtype=torch.int32)}, ValueError, "kv_len_arr"),
    ({"kv_len_arr": torch.tensor([5, 9], dtype=torch.int64)}, ValueError, "kv_len_arr.dtype"),
    ({"qo_indptr": torch.tensor([0, 1, 2])}, ValueError, "qo_indptr.dtype"),
    ({"qo_indptr": torch.tensor([0, 2, 1], dtype=torch.int32)}, ValueError, "qo_indptr"),
    ({"kv_indptr": torch.tensor([0, 2], dtype=torch.int32)}, ValueError, "kv_indptr"),
    ({"kv_indptr": torch.tensor([0, 2, 900], dtype=torch.int32)}, ValueError, "kv_indptr"),
    ({"kv_indices": [0, 1]}, ValueError, "kv_indices"),
])
def test_mla_plan_errors(device, change, error, text):
    w, args, _ = _planned(device, **change)
    with pytest.raises(error, match=text):
        w.plan(**args)


def test_mla_run_errors(device):
    w, args, batch = _planned(device)
    q_nope, q_pe, ckv, kpe, *_ = batch
    with pytest.raises(RuntimeError, match="before plan"):
        w.run(q_nope, q_pe, ckv, kpe)
    w.plan(**args)
    bad = [
        ((q_nope.bfloat16(), q_pe, ckv, kpe), {}, TypeError, "q_nope"),
        ((q_nope, q_pe[:, :1], ckv, kpe), {}, ValueError, "q_pe"),
        ((q_nope[:, :1], q_pe, ckv, kpe), {}, ValueError, "q_nope"),
        ((q_nope, q_pe, ckv[:, :2], kpe), {}, ValueError, "ckv_cache"),
        ((q_nope, q_pe, ckv, kpe[:-1]), {}, ValueError, "kpe_cache"),
        ((q_nope, q_pe, ckv[:1], kpe[:1]), {}, ValueError, "ckv_cache: the plan's page table uses page"),
        ((q_nope, q_pe, ckv.bfloat16(), kpe), {}, TypeError, "ckv_cache"),
        ((q_nope, q_pe, ckv, kpe.bfloat16()), {}, TypeError, "kpe_cache"),
        ((q_nope[:1], q_pe[:1], ckv, kpe), {}, ValueError, "q_nope"),
        ((q_nope, q_pe, ckv, kpe), {"out": torch.empty(2, 2, 3, device=device)}, ValueError, "out"),
        ((q_nope, q_pe, ckv, kpe), {"lse": torch.empty(2, 2, device=device, dtype=torch.float16)}, ValueError,
         "lse"),
        ((q_nope, q_pe, ckv, kpe), {"kv_len": torch.ones(2)}, NotImplementedError, "kv_len"),
        ((q_nope, q_pe, ckv, kpe), {"ckv_scale": "x"}, TypeError, "ckv_scale"),
        ((q_nope, q_pe, ckv, kpe), {"return_lse_base_on_e": True}, NotImplementedError, "base"),
        (("q", q_pe, ckv, kpe), {}, TypeError, "q_nope"),
    ]
    for args_, kw, error, text in bad:
        with pytest.raises(error, match=text):
            w.run(*args_, **kw)


def test_mla_constructor_errors(device):
    with pytest.raises(NotImplementedError, match="cutlass"):
        BatchMLAPagedAttentionWrapper(workspace(device), backend="cutlass")
    with pytest.raises(ValueError, match="cudagraph"):
        BatchMLAPagedAttentionWrapper(workspace(device), use_cuda_graph=True)
    i32 = dict(dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="kv_indptr"):
        BatchMLAPagedAttentionWrapper(workspace(device), True, torch.zeros(3, **i32), torch.zeros(4, **i32),
                                      torch.zeros(8, **i32), torch.zeros(2, **i32))


def test_mla_graph_mode_buffers_and_limits(path, device):
    """Graph-mode plan writes into the constructor's buffers in place; batch size and token count are fixed."""
    dc, dp = DIMS[0]
    i32 = dict(dtype=torch.int32, device=device)
    bufs = (torch.zeros(3, **i32), torch.zeros(3, **i32), torch.zeros(64, **i32), torch.zeros(2, **i32))
    w = BatchMLAPagedAttentionWrapper(workspace(device), True, *bufs)
    batch = make_mla_batch([1, 1], [5, 20], 4, 2, dc, dp, torch.float16, device)
    q_nope, q_pe, ckv, kpe, qo_indptr, kv_indptr, kv_indices, lens = batch
    w.plan(qo_indptr, kv_indptr, kv_indices, lens, 2, dc, dp, 4, False, 0.2, torch.float16, torch.float16)
    assert torch.equal(bufs[3].cpu(), lens)
    out, lse = w.run(q_nope, q_pe, ckv, kpe, return_lse=True)
    check_mla(out, lse, *batch, causal=False, sm_scale=0.2, dtype=torch.float16)
    b3 = make_mla_batch([1, 1, 1], [5, 20, 3], 4, 2, dc, dp, torch.float16, device)
    with pytest.raises(ValueError, match="batch size should be fixed"):
        w.plan(*b3[4:], 2, dc, dp, 4, False, 0.2, torch.float16, torch.float16)
    more = make_mla_batch([2, 1], [5, 20], 4, 2, dc, dp, torch.float16, device)
    with pytest.raises(ValueError, match="cannot exceed"):
        w.plan(*more[4:], 2, dc, dp, 4, True, 0.2, torch.float16, torch.float16)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("page_size, heads", [(1, 16), (64, 128)])
def test_mla_cuda_graph_replan_replay(page_size, heads):
    graph_replan_replay(page_size, heads)


def graph_replan_replay(page_size: int, heads: int) -> None:
    """Capture run() in a CUDA graph, then re-plan with other lengths and replay, twice, against the oracle
    (also tests/test_mla_hopper.py's, with the Gluon kernel)."""
    device = torch.device("cuda")
    dc, dp, B = 512, 64, 4
    i32 = dict(dtype=torch.int32, device=device)
    bufs = (torch.zeros(B + 1, **i32), torch.zeros(B + 1, **i32), torch.zeros(40000, **i32), torch.zeros(B, **i32))
    w = BatchMLAPagedAttentionWrapper(workspace(device, 128), True, *bufs)
    lens_a, lens_b = [10, 3000, 1, 700], [5000, 0, 129, 64]
    pool_pages = 40000 // page_size + 16
    pool = torch.randn(pool_pages, page_size, dc + dp, device=device).bfloat16()
    ckv, kpe = pool[..., :dc], pool[..., dc:]
    q_nope = torch.randn(B, heads, dc, device=device).bfloat16()
    q_pe = torch.randn(B, heads, dp, device=device).bfloat16()
    qo_indptr = torch.arange(B + 1, dtype=torch.int32)

    def table(lens):
        kv_indptr, kv_indices, _ = random_page_table(lens, page_size, pool_pages)
        return kv_indptr, kv_indices, torch.tensor(lens, dtype=torch.int32)

    def plan(t):
        w.plan(qo_indptr, t[0], t[1], t[2], heads, dc, dp, page_size, True, 0.07, torch.bfloat16, torch.bfloat16)

    ta, tb = table(lens_a), table(lens_b)
    plan(ta)
    out = torch.empty(B, heads, dc, device=device, dtype=torch.bfloat16)
    lse = torch.empty(B, heads, device=device)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            w.run(q_nope, q_pe, ckv, kpe, out=out, lse=lse)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        w.run(q_nope, q_pe, ckv, kpe, out=out, lse=lse)
    for t in (tb, ta):
        plan(t)
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        check_mla(out, lse, q_nope, q_pe, ckv, kpe, qo_indptr, t[0], t[1], t[2], causal=True, sm_scale=0.07,
                  dtype=torch.bfloat16)


# -- mla_rope_quantize_fp8 ------------------------------------------------------------------------------


def _rope_quant_inputs(device, dtype, nnz, heads, dr, dn, max_pos=100):
    """q and the new latent row as SGLang holds them: q ``[nnz, heads, dn + dr]`` and kv ``[nnz, dn + dr]``,
    nope part first; the four inputs are their slices (strided, last dim contiguous)."""
    q = torch.randn(nnz, heads, dn + dr, device=device).to(dtype)
    kv = torch.randn(nnz, dn + dr, device=device).to(dtype)
    pos = torch.randint(0, max_pos, (nnz,), dtype=torch.int32)
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * (1e4 ** (-torch.arange(dr // 2) * 2.0 / dr))[None, :]
    cache = torch.cat([ang.cos(), ang.sin()], 1).float().to(device)
    return q[..., dn:], kv[:, dn:], q[..., :dn], kv[:, :dn], cache, pos


FP8_FORMATS = [pytest.param(getattr(torch, name, None), id=name,
                            marks=pytest.mark.skipif(not hasattr(torch, name), reason=f"no {name} in this torch"))
               for name in ("float8_e4m3fn", "float8_e5m2")]


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fp8", FP8_FORMATS)
@pytest.mark.parametrize("nnz,heads,dr,dn", [(7, 3, 16, 32), (5, 5, 12, 40), (2, 16, 64, 512)])
def test_mla_rope_quantize_fp8(path, device, is_neox, dtype, fp8, nnz, heads, dr, dn):
    from oracles import rope_general_f64

    q_rope, k_rope, q_nope, k_nope, cache, pos = _rope_quant_inputs(device, dtype, nnz, heads, dr, dn)
    q_nope[:, 0] *= 4 * torch.finfo(fp8).max  # the first head saturates (in fp16 partly as inf)
    k_rope[0, 0] = float("inf")  # saturates too, as every format's values beyond its range do
    qs, ks = 0.5, 2.0
    outs = flashtile.rope.mla_rope_quantize_fp8(q_rope, k_rope, q_nope, k_nope, cache, pos, is_neox, fp8,
                                                quant_scale_q=qs, quant_scale_kv=ks)
    assert all(o.dtype == fp8 and o.shape == x.shape for o, x in zip(outs, (q_rope, k_rope, q_nope, k_nope)))
    want = [rope_general_f64(q_rope, pos, interleave=not is_neox, cos_sin_cache=cache) * qs,
            rope_general_f64(k_rope[:, None], pos, interleave=not is_neox, cos_sin_cache=cache)[:, 0] * ks,
            q_nope.double().cpu() * qs, k_nope.double().cpu() * ks]
    info = torch.finfo(fp8)
    bound = info.max
    for got, ref in zip(outs, want):
        ref = ref.nan_to_num(nan=0.0).clamp(-bound, bound)  # inf times a cos and a sin: NaN where one is 0
        got = got.double().cpu()
        finite = ref.abs() < bound
        # one fp8 rounding to nearest: half a step, relative eps / 2 (one subnormal step covers the float32
        # rotation's error near zero)
        torch.testing.assert_close(got[finite], ref[finite], atol=info.tiny * info.eps, rtol=info.eps / 2)
        assert bool((got[~finite].abs() == bound).all() | got[~finite].isnan().all())
    assert bool((outs[2].double().abs() == bound).any())  # the saturation was exercised
    # given outputs are filled and returned; their dtype selects the format
    given = [torch.empty(o.shape, dtype=fp8, device=device) for o in outs]
    again = flashtile.rope.mla_rope_quantize_fp8(q_rope, k_rope, q_nope, k_nope, cache, pos, is_neox, None, qs, ks,
                                                 *given)
    assert all(a is g for a, g in zip(again, given))
    assert all(torch.equal(a.view(torch.uint8), o.view(torch.uint8)) for a, o in zip(again, outs))


@pytest.mark.skipif(FP8 is None, reason="no float8_e4m3fn in this torch")
@pytest.mark.parametrize("is_neox", [True, False])
def test_mla_rope_quantize_fp8_kernel_matches_reference(device, monkeypatch, is_neox):
    """The fused kernel against the PyTorch path, bit for bit where both compute the same float32 values:
    the nope parts (one product, one cast), NaN, infinities and saturation; the rope parts within one fp8
    step (the GPU may contract ``a cos - b sin`` into an FMA)."""
    q_rope, k_rope, q_nope, k_nope, cache, pos = _rope_quant_inputs(device, torch.bfloat16, 9, 6, 16, 48)
    q_nope[0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e4])
    k_nope[1, :2] = torch.tensor([float("nan"), -3e3])
    q_rope[2, 1, 0] = float("nan")  # a NaN in one element of a pair makes both rotated elements NaN
    # the outputs strided too: slices of one [nnz, heads, dn + dr] fp8 tensor, as q is
    q_out = torch.zeros(9, 6, 64, dtype=FP8, device=device)
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("FLASHTILE_BACKEND", backend)
        q_out.zero_()
        outs = flashtile.rope.mla_rope_quantize_fp8(q_rope, k_rope, q_nope, k_nope, cache, pos, is_neox, None, 0.7,
                                                    1.3, q_out[..., 48:], None, q_out[..., :48], None)
        results[backend] = [o.view(torch.uint8).cpu().clone() for o in outs]
    for i, (ref, got) in enumerate(zip(results["reference"], results["triton"])):
        if i in (1, 3) or device == "cpu":  # nope parts; and on the interpreter everything
            assert torch.equal(ref, got), i
        else:
            ref_f, got_f = (x.view(FP8).double() for x in (ref, got))
            assert torch.equal(ref_f.isnan(), got_f.isnan())
            close = (ref_f - got_f).abs() <= ref_f.abs() * 2.0 ** -3 + 2.0 ** -9
            assert bool(close[~ref_f.isnan()].all()), i
    nan_pair = results["reference"][0].view(FP8)[2, 1].double()
    assert bool(nan_pair[0].isnan()) and bool(nan_pair[8 if is_neox else 1].isnan())


def test_mla_rope_quantize_fp8_op(path, device):
    """The registered op (what torch.compile traces): opcheck, and a compiled graph that calls the public
    function gives the eager bits."""
    if FP8 is None:
        pytest.skip("no float8_e4m3fn in this torch")
    from flashtile._core import ops_small

    *tensors, pos = _rope_quant_inputs(device, torch.bfloat16, 5, 3, 16, 32)
    args = (*tensors, pos.to(device))  # the op takes device tensors (the public function moves host positions)
    outs = [torch.empty(x.shape, dtype=FP8, device=device) for x in args[:4]]
    # test_schema and test_aot_dispatch compare outputs with arithmetic torch lacks for float8 on CPU
    torch.library.opcheck(ops_small.mla_rope_quantize, (*args, *outs, True, 0.5, 2.0),
                          test_utils=("test_faketensor", "test_autograd_registration"))

    def step(q_rope, k_rope, q_nope, k_nope, cache, pos):
        return flashtile.rope.mla_rope_quantize_fp8(q_rope, k_rope, q_nope, k_nope, cache, pos, False,
                                                    quant_scale_q=0.5, quant_scale_kv=2.0)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(*args), step(*args)):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_mla_rope_quantize_fp8_empty(path, device):
    if FP8 is None:
        pytest.skip("no float8_e4m3fn in this torch")
    q_rope, k_rope, q_nope, k_nope, cache, pos = _rope_quant_inputs(device, torch.float16, 0, 4, 16, 32)
    outs = flashtile.rope.mla_rope_quantize_fp8(q_rope, k_rope, q_nope, k_nope, cache, pos)
    assert [tuple(o.shape) for o in outs] == [(0, 4, 16), (0, 16), (0, 4, 32), (0, 32)]


@pytest.mark.skipif(FP8 is None, reason="no float8_e4m3fn in this torch")
def test_mla_rope_quantize_fp8_errors(device, monkeypatch):
    q = torch.randn(4, 2, 16, device=device).half()
    k = torch.randn(4, 16, device=device).half()
    qn, kn = torch.randn(4, 2, 32, device=device).half(), torch.randn(4, 32, device=device).half()
    cache = torch.randn(10, 16, device=device)
    pos = torch.arange(4, dtype=torch.int32)
    f = flashtile.rope.mla_rope_quantize_fp8
    with pytest.raises(ValueError, match="float32"):
        f(q, k, qn, kn, cache.half(), pos)
    with pytest.raises(ValueError, match="k_rope"):
        f(q, k[:3], qn, kn, cache, pos)
    with pytest.raises(TypeError, match="k_nope"):
        f(q, k, qn, kn.float(), cache, pos)
    with pytest.raises(ValueError, match="cos_sin_cache"):
        f(q, k, qn, kn, cache[:, :8], pos)
    with pytest.raises(TypeError, match="quantize_dtype"):
        f(q, k, qn, kn, cache, pos, quantize_dtype=torch.float16)
    # Position values are checked where they can be read without a device sync (host tensors, or FLASHTILE_DEBUG).
    monkeypatch.setattr(flashtile.rope, "validate_device_indices", lambda *t: True)
    with pytest.raises(ValueError, match="positions"):
        f(q, k, qn, kn, cache, pos + 8)
    with pytest.raises(ValueError, match="q_nope_out"):
        f(q, k, qn, kn, cache, pos, q_nope_out=torch.empty(4, 2, 8, device=device, dtype=FP8))
    # every last dim contiguous, as upstream requires (the kernel reads rows as vectors)
    with pytest.raises(ValueError, match="q_nope"):
        f(q, k, torch.randn(4, 32, 2, device=device).half().transpose(1, 2), kn, cache, pos)
    with pytest.raises(ValueError, match="k_rope_out"):
        f(q, k, qn, kn, cache, pos, k_rope_out=torch.empty(16, 4, device=device, dtype=FP8).t())
    with pytest.raises(ValueError, match="k_nope"):
        f(q, k, qn, kn[:, :16], cache, pos)


# -- the MLA work list (scheduler/mla_work.py) ----------------------------------------------------------



@settings(max_examples=200, deadline=None)
@given(
    reqs=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 3000)), min_size=1, max_size=12),
    heads=st.integers(1, 40),
    block_m=st.sampled_from([16, 32, 64]),
    sms=st.integers(1, 140),
    align=st.sampled_from([16, 64]),
    extra_tokens=st.integers(0, 3),
    min_chunk=st.sampled_from([0, 64, 512]),
    max_partial_rows=st.sampled_from([None, 0, 100, 5000]),
)
def test_mla_work_covers_each_row_and_key_once(reqs, heads, block_m, sms, align, extra_tokens, min_chunk,
                                               max_partial_rows):
    """Every (request, row, kv token) is covered by exactly one item; partial-state rows of different
    splits and requests never overlap and fit ``max_partial_rows``; the token -> request table matches
    qo_indptr."""
    qo_lens = [q for q, _ in reqs]
    kv_lens = [k for _, k in reqs]
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)])
    nnz = int(qo_indptr[-1])
    work = plan_mla_work(qo_indptr, kv_lens, heads, block_m, sms, align, token_capacity=nnz + extra_tokens,
                         min_chunk=min_chunk, max_partial_rows=max_partial_rows)
    if max_partial_rows is not None:
        assert work.partial_rows <= max_partial_rows
    p = work.packed
    assert p[0] == work.num_items
    req = p[work.req_offset:work.token_offset].reshape(-1, REQ_FIELDS)
    items = p[work.item_offset:].reshape(-1, ITEM_FIELDS)
    assert items.shape[0] == work.num_items
    assert list(p[work.token_offset:work.token_offset + nnz]) == [b for b, q in enumerate(qo_lens) for _ in range(q)]
    used_partials = set()
    for b, (q, k) in enumerate(reqs):
        rows = q * heads
        assert req[b, 0] == qo_indptr[b] and req[b, 3] == rows
        mine = items[items[:, 0] == b]
        if rows == 0:
            assert mine.shape[0] == 0
            continue
        cover = np.zeros((rows, max(k, 1)), dtype=np.int64)
        for _, row0, k0, k1, split in mine:
            assert row0 % block_m == 0 and 0 <= k0 <= k1 <= k
            cover[row0:row0 + block_m, k0:k1] += 1
            assert (split == -1) == (req[b, 1] == 1)
        if k:
            assert (cover[:, :k] == 1).all()
        else:  # an empty request still gets its rows written (zeros, -inf)
            assert sorted(mine[:, 1].tolist()) == list(range(0, rows, block_m))
        if req[b, 1] > 1:
            span = set(range(int(req[b, 2]), int(req[b, 2]) + int(req[b, 1]) * rows))
            assert not (span & used_partials)
            used_partials |= span
            assert max(span) < work.partial_rows


@settings(max_examples=300, deadline=None)
@given(chunk_tiles=st.integers(1, 200), longest=st.integers(0, 40000), align=st.sampled_from([16, 64]),
       min_chunk=st.sampled_from([0, 512, 2048]))
def test_balanced_chunk_keeps_the_piece_count_and_evens_the_pieces(chunk_tiles, longest, align, min_chunk):
    chunk = chunk_tiles * align
    even = balanced_chunk(chunk, longest, align, min_chunk)
    assert even <= chunk
    if even == chunk:
        return
    pieces = -(-longest // chunk)
    assert even % align == 0 and even >= min_chunk
    assert -(-longest // even) == pieces  # as many pieces, the last one at most `align` shorter per piece
    assert longest - (pieces - 1) * even > even - pieces * align


@pytest.mark.parametrize("kv", [4096, 8192, 16384, 3000])
@pytest.mark.parametrize("programs_per_sm", [None, 1, 2, 8])
def test_mla_work_splits_uniform_batches_into_even_chunks(kv, programs_per_sm):
    """A uniform batch's automatic split gives every item the same KV length within one alignment step."""
    batch, heads = 64, 16
    work = plan_mla_work(np.arange(batch + 1), np.full(batch, kv), heads, 16, 132, 64, token_capacity=batch,
                         min_chunk=64, programs_per_sm=programs_per_sm)
    items = work.packed[work.item_offset:].reshape(-1, ITEM_FIELDS)
    lengths = items[:, 3] - items[:, 2]
    assert lengths.max() - lengths.min() < 64 * work.max_splits


def test_mla_opcheck(path, device):
    """The registered op's schema, mutation and fake implementation (torch.library.opcheck)."""
    from flashtile._core import ops_mla

    dc, dp = DIMS[0]
    batch = make_mla_batch([1, 2], [20, 5], 4, 2, dc, dp, torch.float16, device)
    q_nope, q_pe, ckv, kpe, qo_indptr, kv_indptr, kv_indices, lens = batch
    w = BatchMLAPagedAttentionWrapper(workspace(device))
    w.plan(qo_indptr, kv_indptr, kv_indices, lens, 2, dc, dp, 4, True, 0.2, torch.float16, torch.float16)
    out = torch.empty_like(q_nope)
    lse = torch.empty(q_nope.shape[:2], device=device)
    args = ops_mla.op_args(q_nope, q_pe, ckv, kpe, w._plan.meta, out, lse, 0.2, 1.0, 1.0, True, "auto")
    torch.library.opcheck(ops_mla.mla_paged, args, test_utils=("test_schema", "test_faketensor"))
    ops_mla.mla_paged(*args)
    check_mla(out, lse, *batch, causal=True, sm_scale=0.2, dtype=torch.float16)
