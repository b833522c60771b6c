"""PODWithPagedKVCacheWrapper: one prefill request (contiguous K/V) and a decode batch (paged cache) against
the float64 oracle request by request, on the reference path, the interpreted kernels (CPU) and the GPU;
CUDA-graph capture, re-plan and replay (GPU); errors."""

import pytest
import torch

import flashtile
from attention_cases import make_paged_batch, make_qkv, to_nhd, workspace
from conftest import HAS_CUDA
from flashtile.pod import PODWithPagedKVCacheWrapper
from oracles import LSE_TOLERANCES, TOLERANCES, attention_oracle, paged_cache_f64, read_paged_kv_oracle


def check(out, lse, q, k, v, **kw):
    """``out`` (and ``lse`` when given) of one request against the oracle; k, v NHD."""
    atol, rtol = TOLERANCES[q.dtype]
    assert not out.isnan().any(), "output has NaN (unwritten element)"
    ref_o, ref_lse = attention_oracle(q, k, v, **kw)
    torch.testing.assert_close(out.double().cpu(), ref_o, atol=atol, rtol=rtol)
    if lse is not None:
        latol, lrtol = LSE_TOLERANCES[q.dtype]
        got = lse.double().cpu()
        assert torch.equal(torch.isinf(got), torch.isinf(ref_lse))
        finite = torch.isfinite(ref_lse)
        torch.testing.assert_close(got[finite], ref_lse[finite], atol=latol, rtol=lrtol)


def check_decodes(out_d, lse_d, q_d, cache, indptr, indices, last, layout="NHD", **kw):
    # only the pages the batch reads go to the float64 oracle (the graph test's pool is 1.3 GB in float64)
    used = indices[: int(indptr[-1])].long()
    page_dim_first = cache[used.to(cache.device)] if isinstance(cache, torch.Tensor) else \
        tuple(c[used.to(c.device)] for c in cache)
    k_pages, v_pages = paged_cache_f64(page_dim_first, layout)
    indices = torch.arange(used.numel(), dtype=torch.int32)
    for b, (k, v) in enumerate(read_paged_kv_oracle(k_pages, v_pages, indices, indptr, last)):
        check(out_d[b: b + 1], None if lse_d is None else lse_d[b: b + 1], q_d[b: b + 1], k, v, **kw)


if HAS_CUDA:
    # (prefill qo_len, prefill kv_len, decode kv lens)
    STEPS = [(1024, 2048, [4096] * 64), (1, 1, [1, 32000]), (777, 777, [37 * (i % 32) + 1 for i in range(256)])]
    HEADS, DIM = (32, 8), 128
    PAGE_SIZES = [1, 16]  # odd page sizes run on the CPU (the oracle reads pages token by token)
else:
    STEPS = [(1, 1, [1]), (23, 70, [33, 1, 130, 9]), (40, 40, [5] * 16), (7, 130, [0, 17])]
    HEADS, DIM = (4, 2), 16
    PAGE_SIZES = [1, 5, 16]


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("step", range(len(STEPS)))
def test_step_matches_oracle(path, device, page_size, step):
    qo_p, kv_p, lens = STEPS[step]
    hq, hk = HEADS
    dtype = torch.float16
    q_p, k_p, v_p = make_qkv(qo_p, kv_p, hq, hk, DIM, dtype, device)
    cache, indptr, indices, last = make_paged_batch(lens, page_size, hk, DIM, dtype, device)
    q_d = torch.randn(len(lens), hq, DIM, dtype=dtype, device=device)
    w = PODWithPagedKVCacheWrapper(workspace(device))
    w.plan(indptr, indices, last, hq, hk, DIM, page_size)
    out_p, out_d = w.run(q_p, k_p, v_p, q_d, cache, causal_p=True)
    assert out_p.shape == (qo_p, hq, DIM) and out_d.shape == (len(lens), hq, DIM)
    check(out_p, None, q_p, k_p, v_p, causal=True)
    check_decodes(out_d, None, q_d, cache, indptr, indices, last)


def test_options_of_both_halves(path, device):
    """Window, soft cap, sm_scale and RoPE of the prefill half from run(); RoPE, window and sm_scale of the
    decode half from plan(); HND on both sides; the lse of both halves on request. (float16: bfloat16 rounding
    of the rotated q and k moves the lse past its tolerance.)"""
    hq, hk, d, ps = 6, 2, 32, 4
    dtype = torch.float16
    q_p, k_p, v_p = make_qkv(19, 45, hq, hk, d, dtype, device, layout="HND")
    lens = [30, 1, 12]
    cache, indptr, indices, last = make_paged_batch(lens, ps, hk, d, dtype, device, layout="HND")
    q_d = torch.randn(len(lens), hq, d, dtype=dtype, device=device)
    w = PODWithPagedKVCacheWrapper(workspace(device), kv_layout="HND")
    w.plan(indptr, indices, last, hq, hk, d, ps, pos_encoding_mode="ROPE_LLAMA", window_left=7,
           q_data_type=dtype, sm_scale=0.2, rope_theta=500.0)
    assert w._window_left == 7 and w._sm_scale == 0.2
    (out_p, lse_p), (out_d, lse_d) = w.run(
        q_p, k_p, v_p, q_d, cache, causal_p=True, kv_layout_p="HND", pos_encoding_mode_p="ROPE_LLAMA",
        sm_scale_p=0.25, window_left_p=9, rope_scale_p=2.0, logits_soft_cap_p=4.0, return_lse_p=True,
        return_lse_d=True, window_left_d=7, sm_scale_d=0.2 * (1 + 1e-9), rope_theta_d=500.0)
    check(out_p, lse_p, q_p, to_nhd(k_p, "HND"), to_nhd(v_p, "HND"), causal=True, pos_encoding_mode="ROPE_LLAMA",
          sm_scale=0.25, window_left=9, rope_scale=2.0, logits_soft_cap=4.0)
    check_decodes(out_d, lse_d, q_d, cache, indptr, indices, last, layout="HND", pos_encoding_mode="ROPE_LLAMA",
                  window_left=7, sm_scale=0.2, rope_theta=500.0)


def test_custom_mask_and_out_d(path, device):
    hq, hk, d = 4, 4, 16
    q_p, k_p, v_p = make_qkv(5, 11, hq, hk, d, torch.float16, device)
    mask = torch.rand(5, 11, device=device) > 0.5
    cache, indptr, indices, last = make_paged_batch([3, 8], 16, hk, d, torch.float16, device)
    q_d = torch.randn(2, hq, d, dtype=torch.float16, device=device)
    out_d = torch.empty(2, hq, d, dtype=torch.float16, device=device)
    w = PODWithPagedKVCacheWrapper(workspace(device))
    w.plan(indptr, indices, last, hq, hk, d, 16)
    out_p, got_d = w.run(q_p, k_p, v_p, q_d, cache, custom_mask_p=mask, out_d=out_d)
    assert got_d is out_d
    check(out_p, None, q_p, k_p, v_p, custom_mask=mask.cpu())
    check_decodes(out_d, None, q_d, cache, indptr, indices, last)


def test_graph_mode_replans_into_its_buffers(path, device):
    """Graph mode: plan() writes the constructor's buffers; results match after re-plans with other lengths."""
    b, hq, hk, d, ps = 3, 4, 2, 16, 4
    bufs = dict(paged_kv_indptr_buffer=torch.zeros(b + 1, dtype=torch.int32, device=device),
                paged_kv_indices_buffer=torch.zeros(64, dtype=torch.int32, device=device),
                paged_kv_last_page_len_buffer=torch.zeros(b, dtype=torch.int32, device=device))
    w = PODWithPagedKVCacheWrapper(workspace(device), use_cuda_graph=True, **bufs)
    assert w.is_cuda_graph_enabled
    q_p, k_p, v_p = make_qkv(6, 20, hq, hk, d, torch.float16, device)
    for lens in ([5, 9, 30], [1, 40, 2], [0, 3, 7]):
        cache, indptr, indices, last = make_paged_batch(lens, ps, hk, d, torch.float16, device, indptr_offset=1)
        w.plan(indptr, indices, last, hq, hk, d, ps)
        q_d = torch.randn(b, hq, d, dtype=torch.float16, device=device)
        out_p, out_d = w.run(q_p, k_p, v_p, q_d, cache, causal_p=True)
        check(out_p, None, q_p, k_p, v_p, causal=True)
        check_decodes(out_d, None, q_d, cache, indptr, indices, last)
        assert torch.equal(bufs["paged_kv_last_page_len_buffer"].cpu(), last)


def test_errors(device):
    hq, hk, d, ps = 4, 2, 16, 4
    q_p, k_p, v_p = make_qkv(3, 5, hq, hk, d, torch.float16, device)
    cache, indptr, indices, last = make_paged_batch([5, 9], ps, hk, d, torch.float16, device)
    q_d = torch.randn(2, hq, d, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="cudagraph"):
        PODWithPagedKVCacheWrapper(workspace(device, 1), use_cuda_graph=True)
    with pytest.raises(TypeError, match="jit_args"):
        PODWithPagedKVCacheWrapper(workspace(device, 1), jit_args=["my_variant"])
    with pytest.raises(ValueError, match="kv_layout"):
        PODWithPagedKVCacheWrapper(workspace(device, 1), kv_layout="NDH")
    w = PODWithPagedKVCacheWrapper(workspace(device))
    with pytest.raises(RuntimeError, match="plan"):
        w.run(q_p, k_p, v_p, q_d, cache)
    with pytest.raises(ValueError, match="num_qo_heads"):
        w.plan(indptr, indices, last, 3, hk, d, ps)
    with pytest.raises(ValueError, match="last_page_len"):
        w.plan(indptr, indices, torch.tensor([5, 1], dtype=torch.int32), hq, hk, d, ps)
    with pytest.raises(ValueError, match="pos_encoding_mode"):
        w.plan(indptr, indices, last, hq, hk, d, ps, pos_encoding_mode="ROPE")
    w.plan(indptr, indices, last, hq, hk, d, ps)
    with pytest.raises(ValueError, match="q_d"):
        w.run(q_p, k_p, v_p, q_d[:1], cache)
    with pytest.raises(TypeError, match="q_d"):
        w.run(q_p, k_p, v_p, None, cache)
    with pytest.raises(ValueError, match="q_data_type"):
        w.run(q_p, k_p, v_p, q_d.bfloat16(), cache)
    with pytest.raises(ValueError, match="sm_scale_d"):
        w.run(q_p, k_p, v_p, q_d, cache, sm_scale_d=0.5)
    with pytest.raises(ValueError, match="window_left_d"):
        w.run(q_p, k_p, v_p, q_d, cache, window_left_d=3)
    with pytest.raises(ValueError, match="pos_encoding_mode_d"):
        w.run(q_p, k_p, v_p, q_d, cache, pos_encoding_mode_d="ROPE_LLAMA")
    with pytest.raises(NotImplementedError, match="custom_mask_d"):
        w.run(q_p, k_p, v_p, q_d, cache, custom_mask_d=torch.ones(14, dtype=torch.bool))
    with pytest.raises(ValueError, match="extra positional"):
        w.run(q_p, k_p, v_p, q_d, cache, None, None, False, "NHD", "NONE", None, -1, None, None, False, None, None,
              False, "NHD", "NONE", None, -1, None, None, None, None, None, False, False, None, "extra")
    # the halves' errors name run()'s arguments (q_p, k_p, ..., q_d, paged_kv_cache_d), not the inner calls'
    with pytest.raises(ValueError, match="v_p: expected 5 tokens and 1 heads like k_p"):  # k_p of other heads
        w.run(q_p, k_p[:, :1], v_p, q_d, cache)
    with pytest.raises(TypeError, match="^k_p: expected dtype"):
        w.run(q_p, k_p.float(), v_p, q_d, cache)
    with pytest.raises(ValueError, match="from q_p.*from k_p"):
        w.run(q_p.transpose(0, 1), k_p, v_p, q_d, cache)
    with pytest.raises(ValueError, match="paged_kv_cache_d"):
        w.run(q_p, k_p, v_p, q_d, cache.float())
    with pytest.raises(ValueError, match="^decode half: indices: .*3 pages"):
        w.run(q_p, k_p, v_p, q_d, cache[:3])
    with pytest.raises(ValueError, match="^q_d: expected shape"):
        w.run(q_p, k_p, v_p, q_d[..., :8], cache)
    with pytest.raises(ValueError, match="^window_left_p: expected"):
        w.run(q_p, k_p, v_p, q_d, cache, window_left_p=-5)
    with pytest.raises(ValueError, match="kv_layout_p") as info:
        w.run(q_p, k_p, v_p, q_d, cache, kv_layout_p="NDH")
    assert isinstance(info.value, KeyError)  # still upstream's KeyError too (InvalidOptionError)


def test_import_surface():
    assert flashtile.PODWithPagedKVCacheWrapper is PODWithPagedKVCacheWrapper
    assert flashtile.pod.PODWithPagedKVCacheWrapper is PODWithPagedKVCacheWrapper


# ------------------------------------------------------------------------------------------------
# CUDA graphs on the GPU: capture, re-plan the decode half with other lengths and pages, replay
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16])
def test_cuda_graph_capture_replan_replay(page_size):
    from flashtile._core.graphs import capture_graph

    device = torch.device("cuda")
    b, hq, hk, d = 16, 32, 8, 128
    max_pages = 40000 // page_size + 64
    bufs = dict(paged_kv_indptr_buffer=torch.zeros(b + 1, dtype=torch.int32, device=device),
                paged_kv_indices_buffer=torch.zeros(max_pages * 2, dtype=torch.int32, device=device),
                paged_kv_last_page_len_buffer=torch.zeros(b, dtype=torch.int32, device=device))
    w = PODWithPagedKVCacheWrapper(workspace(device), use_cuda_graph=True, **bufs)
    pool = torch.randn(max_pages * 2, 2, page_size, hk, d, dtype=torch.bfloat16, device=device)
    q_p, k_p, v_p = make_qkv(512, 1536, hq, hk, d, torch.bfloat16, device)
    q_d = torch.randn(b, hq, d, dtype=torch.bfloat16, device=device)

    def table(lens):
        pages = [-(-n // page_size) for n in lens]
        perm = torch.randperm(pool.shape[0], dtype=torch.int32)[: sum(pages)]
        last = torch.tensor([n - (p - 1) * page_size if p else 0 for n, p in zip(lens, pages)], dtype=torch.int32)
        indptr = torch.tensor([0] + torch.tensor(pages).cumsum(0).tolist(), dtype=torch.int32)
        return indptr, perm, last

    w.plan(*table([100 * i + 7 for i in range(b)]), hq, hk, d, page_size, q_data_type=torch.bfloat16)
    graph, (out_p, out_d) = capture_graph(lambda: w.run(q_p, k_p, v_p, q_d, pool, causal_p=True), warmup=2)
    for lens in ([35000] + [1] * (b - 1), [2000 * (i % 3) + 1 for i in range(b)]):
        tbl = table(lens)
        w.plan(*tbl, hq, hk, d, page_size, q_data_type=torch.bfloat16)
        q_d.copy_(torch.randn_like(q_d))
        q_p.copy_(torch.randn_like(q_p))
        graph.replay()
        torch.cuda.synchronize()
        check(out_p, None, q_p, k_p, v_p, causal=True)
        check_decodes(out_d, None, q_d, pool, *tbl)


def test_upstream_signature():
    """Positional parameters of FlashInfer v0.3.1's PODWithPagedKVCacheWrapper, in order."""
    import inspect

    def names(fn):
        return [p.name for p in inspect.signature(fn).parameters.values()
                if p.kind == p.POSITIONAL_OR_KEYWORD][1:]

    assert names(PODWithPagedKVCacheWrapper.__init__) == [
        "float_workspace_buffer", "kv_layout", "use_cuda_graph", "paged_kv_indptr_buffer", "paged_kv_indices_buffer",
        "paged_kv_last_page_len_buffer", "jit_args"]
    assert names(PODWithPagedKVCacheWrapper.plan) == [
        "indptr", "indices", "last_page_len", "num_qo_heads", "num_kv_heads", "head_dim", "page_size",
        "pos_encoding_mode", "window_left", "q_data_type", "kv_data_type", "data_type", "sm_scale", "rope_scale",
        "rope_theta", "non_blocking"]
    assert names(PODWithPagedKVCacheWrapper.run) == [
        "q_p", "k_p", "v_p", "q_d", "paged_kv_cache_d", "custom_mask_p", "packed_custom_mask_p", "causal_p",
        "kv_layout_p", "pos_encoding_mode_p", "sm_scale_p", "window_left_p", "rope_scale_p", "rope_theta_p",
        "return_lse_p", "custom_mask_d", "packed_custom_mask_d", "causal_d", "kv_layout_d", "pos_encoding_mode_d",
        "sm_scale_d", "window_left_d", "rope_scale_d", "rope_theta_d", "q_scale", "k_scale", "v_scale",
        "return_lse_d", "use_fp16_qk_reduction", "enable_pdl"]


@pytest.mark.parametrize("decode_first", [True, False])
def test_side_stream_fork_and_join(path, device, monkeypatch, decode_first):
    """The overlap path's stream protocol, with recording stand-ins for torch.cuda's streams (any device): the
    side stream waits for the caller's stream, the decode launches inside it, the caller's stream waits for it
    at the end (also when a launch raises), and the results are those of the serial path; in either launch
    order (flashtile.pod.DECODE_FIRST)."""
    import contextlib

    import flashtile.pod

    monkeypatch.setattr(flashtile.pod, "DECODE_FIRST", decode_first)

    events = []

    class FakeStream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append(f"{self.name} waits {other.name}")

    main, side = FakeStream("main"), FakeStream("side")

    @contextlib.contextmanager
    def on(stream):
        events.append(f"enter {stream.name}")
        yield
        events.append(f"exit {stream.name}")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.cuda, "stream", on)
    hq, hk, d = 4, 2, 16
    q_p, k_p, v_p = make_qkv(5, 9, hq, hk, d, torch.float16, device)
    cache, indptr, indices, last = make_paged_batch([3, 20], 4, hk, d, torch.float16, device)
    q_d = torch.randn(2, hq, d, dtype=torch.float16, device=device)
    w = PODWithPagedKVCacheWrapper(workspace(device))
    w.plan(indptr, indices, last, hq, hk, d, 4)
    w.overlap_streams, w._side_stream = True, side
    (out_p, lse_p), (out_d, lse_d) = w.run(q_p, k_p, v_p, q_d, cache, causal_p=True, return_lse_p=True,
                                           return_lse_d=True)
    assert events == ["side waits main", "enter side", "exit side", "main waits side"]
    check(out_p, lse_p, q_p, k_p, v_p, causal=True)
    check_decodes(out_d, lse_d, q_d, cache, indptr, indices, last)
    events.clear()
    with pytest.raises(ValueError):
        w.run(q_p, k_p[:, :1], v_p, q_d, cache)  # the prefill half raises after the decode was queued
    assert events[-1] == "main waits side"
