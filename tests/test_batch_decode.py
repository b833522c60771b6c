"""BatchDecodeWithPagedKVCacheWrapper: request-by-request against the float64 oracle, on the
reference path, the interpreted kernels (CPU) and the GPU; plan/run checks; CUDA-graph replay."""

import functools

import pytest
import torch

import flashtile
from attention_cases import make_paged_batch, scaled_copy, workspace
from conftest import HAS_CUDA
from flashtile._core import ops
from flashtile._core.checks import InvalidOptionError
from flashtile._core.graphs import capture_graph
from flashtile.decode import BatchDecodeWithPagedKVCacheWrapper, CUDAGraphBatchDecodeWithPagedKVCacheWrapper
from oracles import LSE_TOLERANCES, TOLERANCES, attention_oracle, paged_cache_f64, read_paged_kv_oracle

FP8 = getattr(torch, "float8_e4m3fn", None)
FP8_E5M2 = getattr(torch, "float8_e5m2", None)


def check_batch(out, lse, q, cache, indptr, indices, last, layout, *, kv_scales=(1.0, 1.0), q_dtype=None, **kw):
    k_pages, v_pages = paged_cache_f64(cache, layout)
    requests = read_paged_kv_oracle(k_pages, v_pages, indices, indptr, last)
    atol, rtol = TOLERANCES[q_dtype or q.dtype]
    latol, lrtol = LSE_TOLERANCES[q_dtype or q.dtype]
    assert not out.isnan().any(), "output has NaN (unwritten element)"
    for r, (k, v) in enumerate(requests):
        ref_o, ref_lse = attention_oracle(q[r: r + 1], k, v, k_scale=kv_scales[0], v_scale=kv_scales[1], **kw)
        torch.testing.assert_close(out[r: r + 1].double().cpu(), ref_o, atol=atol, rtol=rtol, msg=f"request {r}")
        got = lse[r: r + 1].double().cpu()
        assert torch.equal(torch.isinf(got), torch.isinf(ref_lse)), f"request {r}: empty rows must give -inf"
        finite = torch.isfinite(ref_lse)
        torch.testing.assert_close(got[finite], ref_lse[finite], atol=latol, rtol=lrtol)


if HAS_CUDA:
    # (lens, page_size, heads (qo, kv), head_dim)
    SHAPES = [
        ([1, 16, 17, 1000, 4097], 16, (32, 8), 128),
        ([7, 300, 0, 33, 2048], 1, (32, 8), 128),
        ([5, 3, 4, 700, 129], 3, (8, 8), 64),
        ([32768], 16, (32, 8), 128),
        ([513] * 40 + [20000], 64, (16, 2), 256),
        ([1, 2, 9], 5, (12, 4), 40),
    ]
else:
    SHAPES = [
        ([1, 3, 4, 40, 0, 70], 3, (4, 2), 16),
        ([1, 16, 17, 90], 16, (4, 4), 32),
        ([2, 1, 35], 1, (8, 2), 16),
        ([9, 5], 5, (6, 2), 40),
    ]


@pytest.mark.parametrize("lens, page_size, heads, head_dim", SHAPES)
@pytest.mark.parametrize("layout, form", [("NHD", "5d"), ("HND", "tuple")])
def test_batch_decode_matches_oracle(path, device, lens, page_size, heads, head_dim, layout, form):
    dtype = torch.bfloat16 if page_size % 2 else torch.float16
    cache, indptr, indices, last = make_paged_batch(lens, page_size, heads[1], head_dim, dtype, device,
                                                    layout=layout, form=form)
    q = torch.randn(len(lens), heads[0], head_dim, dtype=dtype, device=device)
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(device), kv_layout=layout)
    w.plan(indptr, indices, last, heads[0], heads[1], head_dim, page_size, q_data_type=dtype)
    out, lse = w.run(q, cache, return_lse=True)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == q.shape[:2]
    check_batch(out, lse, q, cache, indptr, indices, last, layout)
    # New inputs of the same shapes and strides: run() replays the launches it recorded (its memo).
    q2, cache2 = torch.randn_like(q), scaled_copy(cache)
    out2, lse2 = w.run(q2, cache2, return_lse=True)
    check_batch(out2, lse2, q2, cache2, indptr, indices, last, layout)


FEATURES = [
    dict(pos_encoding_mode="ROPE_LLAMA", rope_theta=500.0, rope_scale=2.0),
    dict(pos_encoding_mode="ALIBI"),
    dict(logits_soft_cap=5.0),
    dict(window_left=7),
    dict(sm_scale=0.3),
    dict(window_left=0, logits_soft_cap=30.0),
]


@pytest.mark.parametrize("features", FEATURES, ids=lambda f: ",".join(f))
def test_batch_decode_features(path, device, features):
    lens = [1, 9, 30, 75, 0] if not HAS_CUDA else [1, 9, 300, 2075, 0, 5000]
    heads, d, ps = (4, 2), 32, 4
    cache, indptr, indices, last = make_paged_batch(lens, ps, heads[1], d, torch.float16, device)
    q = torch.randn(len(lens), heads[0], d, dtype=torch.float16, device=device)
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    w.plan(indptr, indices, last, heads[0], heads[1], d, ps, q_data_type=torch.float16, **features)
    out, lse = w.run(q, cache, return_lse=True)
    check_batch(out, lse, q, cache, indptr, indices, last, "NHD", **features)


@pytest.mark.skipif(FP8 is None, reason="torch without float8")
@pytest.mark.parametrize("kv_name", ["e4m3", "e5m2"])
def test_batch_decode_fp8_kv(path, device, kv_name):
    kv_dtype = FP8 if kv_name == "e4m3" else FP8_E5M2
    lens = [3, 40, 17] if not HAS_CUDA else [3, 400, 1700, 64]
    cache, indptr, indices, last = make_paged_batch(lens, 8, 2, 32, kv_dtype, device, scale=2.0)
    q = torch.randn(len(lens), 4, 32, dtype=torch.bfloat16, device=device)
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    w.plan(indptr, indices, last, 4, 2, 32, 8, q_data_type=torch.bfloat16, kv_data_type=kv_dtype)
    out, lse = w.run(q, cache, k_scale=0.5, v_scale=1.5, return_lse=True)
    check_batch(out, lse, q, cache, indptr, indices, last, "NHD", kv_scales=(0.5, 1.5))


@pytest.mark.skipif(FP8 is None, reason="torch without float8")
def test_batch_decode_fp8_kv_query_beyond_fp16_range(path, device):
    """fp8 K/V run their dots in fp16 (kernels/tiles.py): a bf16 query far outside fp16's range is scaled by
    a power of two into it, and the scores back, so the result is the oracle's."""
    lens = [5, 40] if not HAS_CUDA else [5, 700]
    cache, indptr, indices, last = make_paged_batch(lens, 8, 2, 32, FP8, device)
    q = torch.randn(len(lens), 4, 32, device=device)
    q[0] *= 3e6  # amax ~1e7: past fp16's 65504
    q[1, :2] *= 1e-3
    q = q.bfloat16()
    sm_scale = 1.0 / (3e6 * 32 ** 0.5)
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    w.plan(indptr, indices, last, 4, 2, 32, 8, q_data_type=torch.bfloat16, kv_data_type=FP8, sm_scale=sm_scale)
    out, lse = w.run(q, cache, return_lse=True)
    assert out.isfinite().all()
    check_batch(out, lse, q, cache, indptr, indices, last, "NHD", sm_scale=sm_scale)


def test_batch_decode_empty_requests_and_indptr_offset(path, device):
    """Zero-page requests give 0 and -inf; indptr may start above 0 (a window of a larger indices array)."""
    lens = [0, 5, 0, 0, 12]
    cache, indptr, indices, last = make_paged_batch(lens, 4, 2, 16, torch.float16, device, indptr_offset=3)
    q = torch.randn(len(lens), 2, 16, dtype=torch.float16, device=device)
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    w.plan(indptr, indices, last, 2, 2, 16, 4)
    out, lse = w.run(q, cache, return_lse=True)
    check_batch(out, lse, q, cache, indptr, indices, last, "NHD")
    assert torch.all(out[[0, 2, 3]] == 0) and torch.all(lse[[0, 2, 3]] == float("-inf"))


def test_batch_decode_device_index_arrays(path, device):
    """Index arrays already on the device are used as they are (no host copy needed at run)."""
    lens = [6, 33]
    cache, indptr, indices, last = make_paged_batch(lens, 4, 2, 16, torch.float16, device)
    q = torch.randn(2, 4, 16, dtype=torch.float16, device=device)
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    w.plan(indptr.to(device), indices.to(device), last.to(device), 4, 2, 16, 4)
    out, lse = w.run(q, cache, return_lse=True)
    check_batch(out, lse, q, cache, indptr, indices, last, "NHD")


def test_out_lse_buffers_and_aliases(path, device):
    lens = [4, 21]
    cache, indptr, indices, last = make_paged_batch(lens, 4, 2, 16, torch.float16, device)
    q = torch.randn(2, 4, 16, dtype=torch.float16, device=device)
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    w.begin_forward(indptr, indices, last, 4, 2, 16, 4, "NONE", -1, None, torch.float16)
    out = torch.full((2, 4, 16), float("nan"), dtype=torch.float16, device=device)
    lse = torch.full((2, 4), float("nan"), dtype=torch.float32, device=device)
    got_o, got_lse = w.run(q, cache, out=out, lse=lse, return_lse=True)
    assert got_o is out and got_lse is lse
    check_batch(out, lse, q, cache, indptr, indices, last, "NHD")
    torch.testing.assert_close(w.forward(q, cache), out)
    o2, lse2 = w.forward_return_lse(q, cache)
    torch.testing.assert_close(lse2, lse)
    w.end_forward()
    assert w._window_left == -1 and w._logits_soft_cap == 0.0 and w._sm_scale == pytest.approx(0.25)
    assert not w.is_cuda_graph_enabled and not w.use_tensor_cores


def test_fixed_split_size_is_batch_invariant(path, device):
    """With fixed_split_size a request's output bits do not depend on the other requests."""
    d, ps = 32, 4
    lens = [150, 3, 90, 1] if not HAS_CUDA else [5000, 3, 900, 1, 20000]
    cache, indptr, indices, last = make_paged_batch(lens, ps, 2, d, torch.bfloat16, device)
    q = torch.randn(len(lens), 4, d, dtype=torch.bfloat16, device=device)
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    w.plan(indptr, indices, last, 4, 2, d, ps, q_data_type=torch.bfloat16, fixed_split_size=8)
    full = w.run(q, cache)
    for keep in ([0], [0, 2]):
        sub_indptr = torch.tensor([0] + torch.tensor([int(indptr[r + 1] - indptr[r]) for r in keep]).cumsum(0).tolist(),
                                  dtype=torch.int32)
        sub_indices = torch.cat([indices[int(indptr[r]): int(indptr[r + 1])] for r in keep])
        w.plan(sub_indptr, sub_indices, last[keep], 4, 2, d, ps, q_data_type=torch.bfloat16, fixed_split_size=8)
        alone = w.run(q[keep].contiguous(), cache)
        assert torch.equal(alone, full[keep]), f"requests {keep} changed bits with the batch around them"


def test_disable_split_kv_matches_oracle(path, device):
    lens = [150, 3] if not HAS_CUDA else [30000, 3]
    cache, indptr, indices, last = make_paged_batch(lens, 4, 2, 32, torch.float16, device)
    q = torch.randn(len(lens), 4, 32, dtype=torch.float16, device=device)
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    w.plan(indptr, indices, last, 4, 2, 32, 4, disable_split_kv=True)
    assert w._plan.num_programs == len(lens)
    out, lse = w.run(q, cache, return_lse=True)
    check_batch(out, lse, q, cache, indptr, indices, last, "NHD")


def test_long_request_is_split_and_merged(path, device):
    """One long request among short ones is cut into several items (so the GPU fills) and merged."""
    lens = [200, 2, 3] if not HAS_CUDA else [60000, 2, 3]
    cache, indptr, indices, last = make_paged_batch(lens, 16, 2, 32, torch.float16, device)
    q = torch.randn(len(lens), 4, 32, dtype=torch.float16, device=device)
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    w.plan(indptr, indices, last, 4, 2, 32, 16)
    if path == "kernel":
        assert w._plan.merge and w._plan.num_programs > len(lens)
    out, lse = w.run(q, cache, return_lse=True)
    check_batch(out, lse, q, cache, indptr, indices, last, "NHD")


# ------------------------------------------------------------------------------------------------
# Errors: plan validates the page table and options, run checks its inputs against the plan
# ------------------------------------------------------------------------------------------------


def _planned(device, **kw):
    lens = [5, 9]
    cache, indptr, indices, last = make_paged_batch(lens, 4, 2, 16, torch.float16, device)
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(device, 1))
    w.plan(indptr, indices, last, 4, 2, 16, 4, **kw)
    q = torch.randn(2, 4, 16, dtype=torch.float16, device=device)
    return w, q, cache, (indptr, indices, last)


def test_run_before_plan_raises(device):
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(device, 1))
    with pytest.raises(RuntimeError, match="before plan"):
        w.run(torch.zeros(1, 4, 16, dtype=torch.float16, device=device), torch.zeros(1, 2, 4, 2, 16, device=device))


@pytest.mark.parametrize("change, error, match", [
    (lambda q, c: (q.to(torch.bfloat16), c), ValueError, "q_data_type"),
    (lambda q, c: (q, c.to(torch.bfloat16)), ValueError, "kv_data_type"),
    (lambda q, c: (q[:1], c), ValueError, "batch_size"),
    (lambda q, c: (q[:, :2], c), ValueError, "num_qo_heads"),
    (lambda q, c: (q, c[:, :, :, :1]), ValueError, "KV heads"),
    (lambda q, c: (q, c[:, :, :2]), ValueError, "page_size"),
    (lambda q, c: (q, c[:2]), ValueError, "pages"),
    (lambda q, c: (q, "cache"), TypeError, "paged_kv_cache"),
    (lambda q, c: (q, c[:, 0]), ValueError, "5-D"),
])
def test_run_checks_inputs_against_plan(device, change, error, match):
    w, q, cache, _ = _planned(device)
    q2, c2 = change(q, cache)
    with pytest.raises(error, match=match):
        w.run(q2, c2)


def test_run_rejects_bad_out_and_options(device):
    w, q, cache, _ = _planned(device)
    with pytest.raises(ValueError, match="Invalid shape of out"):
        w.run(q, cache, out=torch.empty(2, 4, 8, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="Invalid dtype of lse"):
        w.run(q, cache, lse=torch.empty(2, 4, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="window_left"):
        w.run(q, cache, window_left=5)
    with pytest.raises(ValueError, match="sinks"):
        w.run(q, cache, sinks=torch.zeros(3, device=device))
    with pytest.raises(ValueError, match="extra positional"):
        w.run(q, cache, torch.zeros(3, device=device))
    with pytest.raises(NotImplementedError):
        w.run(q, cache, q_len_per_req=2)


@pytest.mark.parametrize("table, match", [
    (([0, 3, 2], None, [1, 1]), "non-decreasing"),
    (([0, 2, 4], None, [5, 1]), "last_page_len"),
    (([0, 2, 4], None, [0, 1]), "last_page_len"),
    (([0, 2, 9], None, [1, 1]), "len\\(indices\\)"),
    (([0, 2], None, [1, 1]), "batch_size \\+ 1"),
])
def test_plan_validates_host_page_table(device, table, match):
    indptr, _, last = table
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(device, 1))
    with pytest.raises(ValueError, match=match):
        w.plan(torch.tensor(indptr, dtype=torch.int32), torch.arange(4, dtype=torch.int32),
               torch.tensor(last, dtype=torch.int32), 4, 2, 16, 4)


@pytest.mark.parametrize("table_on", ["host", "device", "mixed"])
def test_request_without_pages_has_no_kv(path, device, table_on):
    """A request with no pages is empty whatever its last_page_len says (SGLang passes ones for every
    request): zero output and lse -inf, and its neighbours unaffected, for host and device page tables."""
    lens, page_size, dtype = [5, 0, 9, 0], 4, torch.bfloat16
    cache, indptr, indices, last = make_paged_batch(lens, page_size, 2, 32, dtype, device)
    last = torch.where(indptr[1:] > indptr[:-1], last, torch.ones_like(last))  # what SGLang passes
    q = torch.randn(len(lens), 4, 32, dtype=dtype, device=device)
    table = {"host": (indptr, indices, last), "device": (indptr.to(device), indices.to(device), last.to(device)),
             "mixed": (indptr, indices.to(device), last)}[table_on]  # vLLM: indices on the GPU, the rest pinned
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    w.plan(*table, 4, 2, 32, page_size, q_data_type=dtype)
    out, lse = w.run(q, cache, return_lse=True)
    assert torch.equal(out[1].float().cpu(), torch.zeros(4, 32)) and torch.isneginf(lse[1]).all()
    check_batch(out, lse, q, cache, indptr, indices, last, "NHD")


@pytest.mark.parametrize("kwargs, error", [
    (dict(num_qo_heads=6, num_kv_heads=4), ValueError),
    (dict(head_dim=20), NotImplementedError),
    (dict(page_size=0), ValueError),
    (dict(pos_encoding_mode="ROPE"), InvalidOptionError),
    (dict(window_left=-2), ValueError),
    (dict(logits_soft_cap=-1.0), ValueError),
    (dict(q_data_type=torch.float32), TypeError),
    (dict(q_data_type="float16", kv_data_type=torch.bfloat16), TypeError),
    (dict(q_data_type="nonsense"), TypeError),
    (dict(sm_scale=0.0), ValueError),
    (dict(q_len_per_req=3), NotImplementedError),
])
def test_plan_rejects_bad_options(device, kwargs, error):
    args = dict(num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=4)
    args.update(kwargs)
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(device, 1))
    table = (torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32),
             torch.tensor([1], dtype=torch.int32))
    with pytest.raises(error):
        w.plan(*table, **args)


def test_plan_index_dtype_and_constructor_errors(device):
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(device, 1))
    with pytest.raises(TypeError, match="indices"):
        w.plan(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0.0]), torch.tensor([1], dtype=torch.int32),
               4, 2, 16, 4)
    with pytest.raises(InvalidOptionError):
        BatchDecodeWithPagedKVCacheWrapper(workspace(device, 1), kv_layout="NDH")
    with pytest.raises(NotImplementedError, match="C\\+\\+"):
        BatchDecodeWithPagedKVCacheWrapper(workspace(device, 1), jit_args=("u", None, None, None, None, 64, 64, [], [],
                                                                          [], [], "v", "struct V {};"))
    with pytest.raises(NotImplementedError, match="vendor"):
        BatchDecodeWithPagedKVCacheWrapper(workspace(device, 1), backend="trtllm-gen")
    with pytest.raises(ValueError, match="cudagraph"):
        BatchDecodeWithPagedKVCacheWrapper(workspace(device, 1), use_cuda_graph=True)


def test_indices_out_of_cache_range_raise_at_run(device):
    lens = [5, 9]
    cache, indptr, indices, last = make_paged_batch(lens, 4, 2, 16, torch.float16, device, spare_pages=0)
    indices = indices.clone()
    indices[-1] = 99
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(device, 1))
    w.plan(indptr, indices, last, 4, 2, 16, 4)
    with pytest.raises(ValueError, match="page 99"):
        w.run(torch.randn(2, 4, 16, dtype=torch.float16, device=device), cache)


def test_workspace_too_small_raises(device):
    lens = [200, 3] if not HAS_CUDA else [60000, 3]
    cache, indptr, indices, last = make_paged_batch(lens, 16, 2, 32, torch.float16, device)
    w = BatchDecodeWithPagedKVCacheWrapper(torch.empty(64, dtype=torch.uint8, device=device), backend="triton")
    with pytest.raises(ValueError, match="workspace"):
        w.plan(indptr, indices, last, 4, 2, 32, 16)


def test_graph_mode_buffer_errors(device):
    b = 3
    bufs = dict(paged_kv_indptr_buffer=torch.zeros(b + 1, dtype=torch.int32, device=device),
                paged_kv_indices_buffer=torch.zeros(4, dtype=torch.int32, device=device),
                paged_kv_last_page_len_buffer=torch.zeros(b, dtype=torch.int32, device=device))
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(device, 1), use_cuda_graph=True, **bufs)
    assert w.is_cuda_graph_enabled
    cache, indptr, indices, last = make_paged_batch([5, 9], 4, 2, 16, torch.float16, device)
    with pytest.raises(ValueError, match="batch size should be fixed"):
        w.plan(indptr, indices, last, 4, 2, 16, 4)
    cache, indptr, indices, last = make_paged_batch([5, 9, 30], 4, 2, 16, torch.float16, device)
    with pytest.raises(ValueError, match="less than or equal to the allocated buffer"):
        w.plan(indptr, indices, last, 4, 2, 16, 4)
    with pytest.raises(ValueError, match="batch_size \\+ 1"):
        CUDAGraphBatchDecodeWithPagedKVCacheWrapper(workspace(device, 1), bufs["paged_kv_indptr_buffer"][:2],
                                                    bufs["paged_kv_indices_buffer"],
                                                    bufs["paged_kv_last_page_len_buffer"])


def test_graph_mode_plan_writes_only_given_buffers(path, device):
    """In graph mode the kernel reads the constructor's buffers; results match the oracle after re-plans (with
    split, single-state and empty requests; the merge runs for every token and skips single-state ones)."""
    b, d = 3, 16
    bufs = (torch.zeros(b + 1, dtype=torch.int32, device=device), torch.zeros(64, dtype=torch.int32, device=device),
            torch.zeros(b, dtype=torch.int32, device=device))
    w = CUDAGraphBatchDecodeWithPagedKVCacheWrapper(workspace(device), *bufs)
    for lens in ([5, 0, 70], [1, 33, 2]):
        cache, indptr, indices, last = make_paged_batch(lens, 4, 2, d, torch.float16, device, indptr_offset=2)
        q = torch.randn(b, 4, d, dtype=torch.float16, device=device)
        w.plan(indptr, indices, last, 4, 2, d, 4)
        assert w._plan.page_indptr.data_ptr() == bufs[0].data_ptr()
        assert w._plan.page_indices.data_ptr() == bufs[1].data_ptr()
        out, lse = w.run(q, cache, return_lse=True)
        check_batch(out, lse, q, cache, indptr, indices, last, "NHD")


def test_plan_takes_flashinfer_06_positional_order(path, device):
    """vLLM 0.10-0.16 passes 22 positional arguments: ..., kv_data_type, o_data_type, data_type, sm_scale,
    rope_scale, rope_theta, non_blocking, block_tables, seq_lens, fixed_split_size, disable_split_kv."""
    cache, indptr, indices, last = make_paged_batch([5, 40], 4, 2, 16, torch.bfloat16, device)
    q = torch.randn(2, 4, 16, dtype=torch.bfloat16, device=device)
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    w.plan(indptr, indices, last, 4, 2, 16, 4, "NONE", -1, None, torch.bfloat16, torch.bfloat16, torch.float16,
           None, 0.3, None, None, True, None, None, 2, False)
    assert (w._sm_scale, w._window_left, w._logits_soft_cap, w._causal) == (0.3, -1, 0.0, False)
    by_keyword = BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    by_keyword.plan(indptr, indices, last, 4, 2, 16, 4, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16,
                    o_data_type=torch.float16, sm_scale=0.3, fixed_split_size=2)
    for field in ("o_dtype", "kv_dtype", "sm_scale", "num_programs", "max_states"):
        assert getattr(w._plan, field) == getattr(by_keyword._plan, field), field
    assert w._plan.o_dtype == torch.float16
    out, lse = w.run(q, cache, return_lse=True, q_scale=1.0, k_scale=1.0, v_scale=1.0, kv_cache_sf=None)
    assert out.dtype == torch.float16
    check_batch(out, lse, q, cache, indptr, indices, last, "NHD", sm_scale=0.3)
    with pytest.raises(NotImplementedError, match="kv_cache_sf"):
        w.run(q, cache, kv_cache_sf=torch.ones(1, device=device))
    with pytest.raises(NotImplementedError, match="is_causal"):
        w.plan(indptr, indices, last, 4, 2, 16, 4, is_causal=True)


def test_fast_decode_plan_without_graphs_is_plan(path, device):
    cache, indptr, indices, last = make_paged_batch([5, 0, 40], 4, 2, 16, torch.float16, device, indptr_offset=3)
    q = torch.randn(3, 4, 16, dtype=torch.float16, device=device)
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    w.begin_forward = functools.partial(flashtile.fast_decode_plan, w)  # SGLang's instance attribute
    assert w.begin_forward.func is flashtile.decode.fast_decode_plan
    w.begin_forward(indptr.to(device), indices.to(device), last.to(device), 4, 2, 16, 4, data_type=torch.float16,
                    non_blocking=True, fixed_split_size=None, disable_split_kv=False,
                    global_override_indptr_cpu=indptr)
    out, lse = w.forward(q, cache, sm_scale=0.2, logits_soft_cap=0.0, k_scale=None, v_scale=None, return_lse=True)
    check_batch(out, lse, q, cache, indptr, indices, last, "NHD", sm_scale=0.2)


def test_fast_decode_plan_graph_mode_copies_nothing(path, device):
    """In graph mode the engine writes the page table into the wrapper's buffers itself; fast_decode_plan
    only reschedules: the buffers are left as the engine wrote them (it reads only the host lengths)."""
    b, d, page_size = 3, 16, 4
    bufs = (torch.zeros(b + 1, dtype=torch.int32, device=device), torch.zeros(64, dtype=torch.int32, device=device),
            torch.zeros(b, dtype=torch.int32, device=device))
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(device), use_cuda_graph=True, use_tensor_cores=True,
                                           paged_kv_indptr_buffer=bufs[0], paged_kv_indices_buffer=bufs[1],
                                           paged_kv_last_page_len_buffer=bufs[2])
    assert w._paged_kv_indices_buf is bufs[1]
    cache, indptr, indices, last = make_paged_batch([9, 1, 30], page_size, 2, d, torch.float16, device)
    w.plan(indptr, indices, last, 4, 2, d, page_size)
    for lens in ([0, 70, 13], [5, 0, 0]):
        cache, indptr, indices, last = make_paged_batch(lens, page_size, 2, d, torch.float16, device)
        for buf, values in zip(bufs, (indptr, indices, last)):  # the engine writes the buffers in place
            buf[: values.numel()].copy_(values)
        before = [buf.clone() for buf in bufs]
        garbage = torch.full_like(indices, 10**6).to(device)  # never read: the buffer holds the table
        flashtile.decode.fast_decode_plan(w, indptr, garbage, last, 4, 2, d, page_size, q_data_type=torch.float16)
        assert all(torch.equal(x, y) for x, y in zip(bufs, before))
        q = torch.randn(b, 4, d, dtype=torch.float16, device=device)
        out, lse = w.run(q, cache, return_lse=True)
        check_batch(out, lse, q, cache, indptr, indices, last, "NHD")


def test_opcheck_batch_decode(path, device):
    lens = [5, 19]
    cache, indptr, indices, last = make_paged_batch(lens, 4, 2, 16, torch.float16, device)
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    w.plan(indptr, indices, last, 4, 2, 16, 4, fixed_split_size=2)
    p = w._plan
    q = torch.randn(2, 4, 16, dtype=torch.float16, device=device)
    part_o = torch.zeros(p.num_programs, 4, 16, device=device)
    part_lse = torch.zeros(p.num_programs, 4, device=device)
    k, v = cache[:, 0], cache[:, 1]
    args = (q, k, v, p.page_indptr, p.page_indices, p.worklist, part_o, part_lse,
            torch.empty(2, 4, 16, dtype=torch.float16, device=device), torch.empty(2, 4, device=device), p.batch_size,
            p.num_programs, p.max_states, p.merge, 0.25, False, 0.0, -1, "NONE", 1.0, 1e4, 1.0, "auto")
    torch.library.opcheck(ops.batch_decode, args)


def test_torch_compile_run(path, device):
    """run() traces into one graph (plan stays outside) and matches eager."""
    lens = [5, 19]
    cache, indptr, indices, last = make_paged_batch(lens, 4, 2, 16, torch.float16, device)
    q = torch.randn(2, 4, 16, dtype=torch.float16, device=device)
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(device))
    w.plan(indptr, indices, last, 4, 2, 16, 4)

    def step(q, cache):
        return w.run(q, cache).float() * 2

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if HAS_CUDA else "aot_eager")
    torch.testing.assert_close(compiled(q, cache), step(q, cache))


def test_import_surface():
    assert flashtile.BatchDecodeWithPagedKVCacheWrapper is BatchDecodeWithPagedKVCacheWrapper
    assert flashtile.decode.CUDAGraphBatchDecodeWithPagedKVCacheWrapper is CUDAGraphBatchDecodeWithPagedKVCacheWrapper
    assert flashtile.CUDAGraphBatchDecodeWithPagedKVCacheWrapper is CUDAGraphBatchDecodeWithPagedKVCacheWrapper


# ------------------------------------------------------------------------------------------------
# CUDA graphs on the GPU: capture, re-plan with other lengths and page tables, replay
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16])
def test_cuda_graph_capture_replan_replay(page_size):
    device = torch.device("cuda")
    b, hq, hk, d = 8, 32, 8, 128
    max_pages = 40000 // page_size + 64
    bufs = (torch.zeros(b + 1, dtype=torch.int32, device=device),
            torch.zeros(max_pages * 2, dtype=torch.int32, device=device),
            torch.zeros(b, dtype=torch.int32, device=device))
    w = CUDAGraphBatchDecodeWithPagedKVCacheWrapper(workspace(device, 64), *bufs)
    pool = torch.randn(max_pages * 2, 2, page_size, hk, d, dtype=torch.bfloat16, device=device)
    q = torch.randn(b, hq, d, dtype=torch.bfloat16, device=device)
    out = torch.empty(b, hq, d, dtype=torch.bfloat16, device=device)
    lse = torch.empty(b, hq, dtype=torch.float32, device=device)

    def table(lens):
        pages = [-(-n // page_size) for n in lens]
        perm = torch.randperm(pool.shape[0], dtype=torch.int32)[: sum(pages)]
        indptr = torch.tensor([0] + torch.tensor(pages).cumsum(0).tolist(), dtype=torch.int32)
        last = torch.tensor([n - (p - 1) * page_size if p else 0 for n, p in zip(lens, pages)], dtype=torch.int32)
        return indptr, perm, last

    first = table([100, 1, 2000, 0, 35000, 7, 512, 4096])
    w.plan(*first, hq, hk, d, page_size, q_data_type=torch.bfloat16)
    graph, _ = capture_graph(lambda: w.run(q, pool, out=out, lse=lse), warmup=2)
    for lens in ([3000, 30000, 1, 1, 0, 17, 9000, 64], [1] * 8, [38000] + [0] * 7):
        tbl = table(lens)
        w.plan(*tbl, hq, hk, d, page_size, q_data_type=torch.bfloat16)
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        check_batch(out, lse, q, pool, *tbl, "NHD")
