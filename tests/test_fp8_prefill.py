"""FP8 prefill attention (q, k, v all float8 with float32 dequantization scales; upstream's fa3 fp8 path):
single_prefill_with_kv_cache and the ragged and paged batch prefill wrappers, against the float64 oracle on
the dequantized tensors, on the reference and kernel paths (docs/fp8_attention.md).

Tolerance: the kernels round the softmax weights to the fp8 dtype before the P.V product (FA3's scheme),
the output is rounded to its dtype, everything else is float32. The first is bounded elementwise by
oracles.fp8_weights_error_bound (computed from the exact weights); the output rounding by half an ulp of
the output dtype (2**-8 relative for bfloat16, 2**-11 for float16) with a little float32 slack. On a GPU
the q.k products run on fp8 tensor cores, whose accumulator keeps about 13 bits: the lse is allowed
oracles.fp8_mma_logit_error_bound on top (measured on an H100: up to 0.009 in log2 units at d128).
"""

import math

import pytest
import torch

import flashtile
from attention_cases import random_page_table, workspace
from flashtile._core import ops
from oracles import attention_oracle, fp8_mma_logit_error_bound, fp8_weights_error_bound

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
OUT_RTOL = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 1e-5}


def quantize(x, dtype, per_head=True):
    """``(x8, scale)``: symmetric quantization of ``x [tokens, heads, dim]`` with one float32 scale per head
    (``[heads]``) or per tensor (``[1]``); ``x8 * scale`` approximates ``x``."""
    amax = x.abs().amax(dim=(0, 2)) if per_head else x.abs().amax().reshape(1)
    scale = (amax.float() / FP8_MAX[dtype]).clamp_min(1e-6)
    shape = (1, -1, 1) if per_head else (1, 1, 1)
    return (x / scale.view(shape)).clamp(-FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype), scale


def dequantize(x8, scale):
    """float64 on the CPU, where the oracle and its error bound run."""
    return x8.cpu().double() * scale.cpu().double().view(1, -1, 1)


def fp8_inputs(qo_len, kv_len, hq, hk, d, dtype, device, per_head=True, spread=True):
    """Quantized q, k, v and their scales; v's heads get different magnitudes (a wrong head's scale shows)."""
    q = torch.randn(qo_len, hq, d, device=device)
    k = torch.randn(kv_len, hk, d, device=device)
    v = torch.randn(kv_len, hk, d, device=device)
    if spread:
        v = v * (1.0 + torch.arange(hk, device=device))[None, :, None]
        q = q * (1.0 + 0.5 * torch.arange(hq, device=device))[None, :, None]
    (q8, sq), (k8, sk), (v8, sv) = (quantize(x, dtype, per_head) for x in (q, k, v))
    return q8, k8, v8, sq, sk, sv


def check(out, lse, q8, k8, v8, sq, sk, sv, out_dtype, **mask):
    """``out``/``lse`` against the oracle of the dequantized tensors, within the fp8-weights bound."""
    qd, kd, vd = dequantize(q8, sq), dequantize(k8, sk), dequantize(v8, sv)
    ref_o, ref_lse = attention_oracle(qd, kd, vd, **mask)
    assert out.dtype == out_dtype
    assert not out.isnan().any(), "output has NaN (unwritten or bad math)"
    bound = fp8_weights_error_bound(qd, kd, vd, q8.dtype, **mask)
    tol = bound + OUT_RTOL[out_dtype] * ref_o.abs() + 1e-5 * vd.abs().max()
    err = (out.double().cpu() - ref_o).abs()
    assert (err <= tol).all(), f"max error {err.max():.4g}; worst excess {(err - tol).max():.4g}"
    if lse is not None:
        lse = lse.double().cpu()
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "empty rows must give lse -inf exactly"
        finite = torch.isfinite(ref_lse)
        lse_tol = 1e-3 + 1e-4 * ref_lse.abs()
        if out.is_cuda:  # the compiled kernels' q.k runs on fp8 tensor cores (oracles.FP8_MMA_STEP_ERROR)
            lse_tol = lse_tol + fp8_mma_logit_error_bound(qd, kd) / math.log(2.0)
        lse_err = (lse - ref_lse).abs()
        assert (lse_err[finite] <= lse_tol[finite]).all(), \
            f"lse error {lse_err[finite].max():.4g}; worst excess {(lse_err - lse_tol)[finite].max():.4g}"


# (qo_len, kv_len, num_qo_heads, num_kv_heads, head_dim, causal, per_head, fp8 dtype, kv_layout)
SINGLE_CASES = [
    (7, 33, 4, 2, 64, True, True, E4M3, "NHD"),
    (1, 130, 4, 4, 128, False, False, E4M3, "NHD"),
    (33, 33, 6, 2, 40, True, True, E5M2, "HND"),  # odd head dim (a multiple of 8)
    (12, 7, 2, 1, 64, True, True, E4M3, "NHD"),  # qo_len > kv_len: the first rows see nothing
    (3, 20, 2, 1, 8, False, True, E4M3, "NHD"),  # head dim 8: q/k tiles padded to 32 (fp8 dot)
]


@pytest.mark.parametrize("qo_len, kv_len, hq, hk, d, causal, per_head, dtype, layout", SINGLE_CASES)
def test_single_prefill_fp8(path, device, qo_len, kv_len, hq, hk, d, causal, per_head, dtype, layout):
    q8, k8, v8, sq, sk, sv = fp8_inputs(qo_len, kv_len, hq, hk, d, dtype, device, per_head)
    k_in, v_in = (k8.transpose(0, 1).contiguous(), v8.transpose(0, 1).contiguous()) if layout == "HND" else (k8, v8)
    out, lse = flashtile.single_prefill_with_kv_cache(q8, k_in, v_in, sq, sk, sv, o_dtype=torch.bfloat16,
                                                      causal=causal, kv_layout=layout, return_lse=True)
    check(out, lse, q8, k8, v8, sq, sk, sv, torch.bfloat16, causal=causal)


@pytest.mark.parametrize("options", [dict(window_left=9, logits_soft_cap=20.0, sm_scale=0.3), dict(custom_mask=True)])
def test_single_prefill_fp8_options(path, device, options):
    """Window, soft cap and sm_scale (the per-row logit scale feeds all of them), and a custom mask; fp16 out."""
    q8, k8, v8, sq, sk, sv = fp8_inputs(9, 21, 4, 2, 32, E4M3, device)
    mask = dict(options)
    if mask.pop("custom_mask", None):
        mask["custom_mask"] = torch.rand(9, 21, device=device) > 0.4
        options = dict(mask)
    else:
        mask["causal"] = True
        options = dict(options, causal=True)
    out = flashtile.single_prefill_with_kv_cache(q8, k8, v8, sq, sk, sv, o_dtype=torch.float16, **options)
    check(out, None, q8, k8, v8, sq, sk, sv, torch.float16, **mask)


def test_single_prefill_fp8_default_scales(path, device):
    """Scales left out are 1.0 (upstream's default)."""
    q8, k8, v8, *_ = fp8_inputs(5, 17, 2, 2, 16, E4M3, device, spread=False)
    q8, k8, v8 = (x.float().mul(0.01).to(E4M3) for x in (q8, k8, v8))  # moderate logits
    one = torch.ones(1, device=device)
    out = flashtile.single_prefill_with_kv_cache(q8, k8, v8, o_dtype=torch.bfloat16, causal=True)
    check(out, None, q8, k8, v8, one, one, one, torch.bfloat16, causal=True)


def test_single_prefill_fp8_scalar_scales(path, device):
    """0-d scale tensors are per-tensor scales too."""
    q8, k8, v8, sq, sk, sv = fp8_inputs(6, 19, 4, 2, 32, E4M3, device, per_head=False)
    out = flashtile.single_prefill_with_kv_cache(q8, k8, v8, sq.reshape(()), sk.reshape(()), sv.reshape(()),
                                                 o_dtype=torch.bfloat16, causal=True)
    check(out, None, q8, k8, v8, sq, sk, sv, torch.bfloat16, causal=True)


def ragged_batch(qo_lens, kv_lens, hq, hk, d, dtype, device, per_head):
    """Per-head (or per-tensor) quantization of the whole batch's q, k, v, and the indptrs."""
    q8, k8, v8, sq, sk, sv = fp8_inputs(sum(qo_lens), sum(kv_lens), hq, hk, d, dtype, device, per_head)
    qo_indptr = torch.tensor([0] + torch.tensor(qo_lens).cumsum(0).tolist(), dtype=torch.int32)
    kv_indptr = torch.tensor([0] + torch.tensor(kv_lens).cumsum(0).tolist(), dtype=torch.int32)
    return q8, k8, v8, sq, sk, sv, qo_indptr, kv_indptr


def check_requests(out, lse, q8, k8_rows, v8_rows, sq, sk, sv, qo_lens, causal):
    """Every request against the oracle; ``k8_rows(i)``/``v8_rows(i)``: request i's keys/values."""
    start = 0
    for i, n in enumerate(qo_lens):
        check(out[start:start + n], lse[start:start + n], q8[start:start + n], k8_rows(i), v8_rows(i), sq, sk, sv,
              out.dtype, causal=causal)
        start += n


QO_LENS, KV_LENS = [5, 17, 0, 1], [9, 40, 3, 1]
# the split case: a request longer than two KV chunks of the planner (tile_policy: 16 keys under the
# interpreter, KV_CHUNK_ALIGN = 128 on the GPU), so that it is cut on both
SPLIT_KV_LENS = {"cpu": [9, 40, 3, 1], "cuda": [9, 300, 3, 1]}


@pytest.mark.parametrize("causal, per_head, split", [(True, True, False), (False, False, False), (True, True, True)])
def test_ragged_prefill_fp8(path, device, causal, per_head, split):
    kv_lens = SPLIT_KV_LENS[device.type] if split else KV_LENS
    q8, k8, v8, sq, sk, sv, qo_indptr, kv_indptr = ragged_batch(QO_LENS, kv_lens, 4, 2, 32, E4M3, device, per_head)
    w = flashtile.BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    w.plan(qo_indptr, kv_indptr, 4, 2, 32, causal=causal, q_data_type=E4M3, kv_data_type=E4M3,
           o_data_type=torch.bfloat16, fixed_split_size=16 if split else None)
    if split and path == "kernel":
        assert w._plan.num_merges > 0  # the long request is cut: partial states (pre-scaled by scale_v) merged
    out, lse = w.run(q8, k8, v8, sq, sk, sv, return_lse=True)
    kv = kv_indptr.tolist()
    check_requests(out, lse, q8, lambda i: k8[kv[i]:kv[i + 1]], lambda i: v8[kv[i]:kv[i + 1]], sq, sk, sv, QO_LENS,
                   causal)


def test_ragged_fp8_keys_offset_and_v_layouts(device, monkeypatch):
    """Ragged FP8 on the kernels with rows of k/v outside every request (kv_indptr[0] = 3, rows after
    kv_indptr[-1]) matches the oracle, and the key-contiguous V copy gives V-as-given's output exactly."""
    from flashtile.kernels import attention as A

    monkeypatch.setenv("FLASHTILE_BACKEND", "triton")
    q8, k8, v8, sq, sk, sv, qo_indptr, kv_indptr = ragged_batch(QO_LENS, KV_LENS, 4, 2, 32, E4M3, device, True)
    pad = lambda x: torch.cat([x[:3], x, x[:5]])  # noqa: E731  (3 rows before the requests, 5 after)
    k8, v8, kv_indptr = pad(k8), pad(v8), kv_indptr + 3
    w = flashtile.BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    w.plan(qo_indptr, kv_indptr, 4, 2, 32, causal=True, q_data_type=E4M3, kv_data_type=E4M3,
           o_data_type=torch.bfloat16, fixed_split_size=16)
    out, lse = w.run(q8, k8, v8, sq, sk, sv, return_lse=True)
    kv = kv_indptr.tolist()
    check_requests(out, lse, q8, lambda i: k8[kv[i]:kv[i + 1]], lambda i: v8[kv[i]:kv[i + 1]], sq, sk, sv, QO_LENS,
                   True)
    monkeypatch.setattr(A, "FP8_TRANSPOSE_V", False)
    as_given, _ = w.run(q8, k8, v8, sq, sk, sv, return_lse=True)
    torch.testing.assert_close(out, as_given, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["few", "many"])
def test_ragged_fp8_v_layout(device, layout):
    """The copy: request r's keys at ragged_v_t_start (16-aligned), zeros elsewhere, and at least 128 zero
    keys after each request, so an unmasked tile read never reaches the next request's values. "many": 37
    requests (six steps of the copy kernel's binary search), empty ones and rows outside every request, a
    head dim that is no power of two, and V a strided view."""
    from flashtile.kernels.batch_prefill import V_T_GAP, ragged_fp8_v_layout
    from flashtile.scheduler.prefill_work import REQUEST_FIELDS

    if layout == "few":
        kv_offset, kv_len = [3, 12, 12, 40], [9, 0, 28, 1]
        v = (torch.randn(47, 2, 8, device=device) + 4).to(E4M3)  # no zeros among the values
    else:
        gen = torch.Generator().manual_seed(5)
        kv_len = torch.randint(0, 40, (37,), generator=gen).tolist()
        gaps = torch.randint(0, 3, (37,), generator=gen).tolist()
        kv_offset = [sum(kv_len[:r]) + sum(gaps[:r + 1]) for r in range(37)]
        rows = kv_offset[-1] + kv_len[-1] + 5
        v = (torch.randn(rows, 3, 40, device=device) + 4).to(E4M3)[:, :, :24]  # head stride 40, dim 24
    batch = len(kv_len)
    reqs = torch.zeros(batch, REQUEST_FIELDS, dtype=torch.int32, device=device)
    reqs[:, 2], reqs[:, 3] = torch.tensor(kv_offset), torch.tensor(kv_len)
    vt, kwargs = ragged_fp8_v_layout(v, reqs.flatten(), batch)
    assert kwargs["V_T"] and vt.shape == (v.shape[1], v.shape[2], kwargs["stride_vd"]) and vt.dtype == E4M3
    expected = torch.zeros(vt.shape, dtype=torch.uint8)
    ends = []
    for r, (o, n) in enumerate(zip(kv_offset, kv_len)):
        start = -(-o // 16) * 16 + r * V_T_GAP
        expected[:, :, start:start + n] = v[o:o + n].view(torch.uint8).permute(1, 2, 0).cpu()
        ends.append(start + n)
    assert torch.equal(vt.view(torch.uint8).cpu(), expected)
    starts = [-(-o // 16) * 16 + r * V_T_GAP for r, o in enumerate(kv_offset)]
    assert all(b - e >= 128 for e, b in zip(ends, starts[1:] + [vt.shape[2]]))


@pytest.mark.parametrize("page_size, form", [(4, "tuple"), (1, "5d"), (16, "tuple")])
def test_paged_prefill_fp8(path, device, page_size, form):
    hq, hk, d = 8, 2, 32
    q8, k8, v8, sq, sk, sv, qo_indptr, _ = ragged_batch(QO_LENS, KV_LENS, hq, hk, d, E4M3, device, True)
    num_pages = sum(-(-n // page_size) for n in KV_LENS) + 3
    indptr, indices, last = random_page_table(KV_LENS, page_size, num_pages)
    k_pages = torch.zeros(num_pages, page_size, hk, d, dtype=E4M3, device=device)
    v_pages = torch.zeros_like(k_pages)
    start = 0
    for i, n in enumerate(KV_LENS):  # request i's keys into its pages, in order
        for t in range(n):
            page = indices[indptr[i] + t // page_size]
            k_pages[page, t % page_size] = k8[start + t]
            v_pages[page, t % page_size] = v8[start + t]
        start += n
    cache = (k_pages, v_pages) if form == "tuple" else torch.stack([k_pages, v_pages], 1)
    w = flashtile.BatchPrefillWithPagedKVCacheWrapper(workspace(device))
    w.plan(qo_indptr, indptr, indices, last, hq, hk, d, page_size, causal=True, q_data_type=E4M3,
           kv_data_type=E4M3, o_data_type=torch.bfloat16)
    out, lse = w.run(q8, cache, sq, sk, sv, return_lse=True)
    kv = [0] + torch.tensor(KV_LENS).cumsum(0).tolist()
    check_requests(out, lse, q8, lambda i: k8[kv[i]:kv[i + 1]], lambda i: v8[kv[i]:kv[i + 1]], sq, sk, sv, QO_LENS,
                   True)


def test_opcheck_single_attention_fp8(path, device):
    """torch.library.opcheck of the fp8 op, without its "test_schema" check: that one compares the op's
    outputs by arithmetic on every tensor argument, which torch does not implement for float8 on CPU."""
    q8, k8, v8, sq, sk, sv = fp8_inputs(5, 9, 4, 2, 16, E4M3, device)
    out = torch.empty(5, 4, 16, dtype=torch.bfloat16, device=device)
    lse = torch.empty(5, 4, device=device)
    torch.library.opcheck(ops.single_attention_fp8, (q8, k8, v8, None, out, lse, "prefill", sq, sk, sv, 0.25, True,
                                                     0.0, -1, "NONE", 1.0, 1e4, 1.0, "auto"),
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_opcheck_batch_prefill_fp8(path, device):
    """The batch op's schema with the scales (opcheck without "test_schema", as above)."""
    q8, k8, v8, sq, sk, sv, qo_indptr, kv_indptr = ragged_batch([3, 5], [30, 5], 4, 2, 16, E4M3, device, True)
    w = flashtile.BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    w.plan(qo_indptr, kv_indptr, 4, 2, 16, causal=True, fixed_split_size=16, q_data_type=E4M3,
           o_data_type=torch.bfloat16)
    p = w._plan
    args = (q8, k8, v8, None, None, None, None, p.meta, p.part_o.clone(), p.part_lse.clone(),
            torch.empty(8, 4, 16, dtype=torch.bfloat16, device=device), torch.empty(8, 4, device=device),
            p.batch_size, p.item_capacity, p.block_m, p.block_n, p.num_items, p.num_merges, sq, sk, sv, 0.25, True, 0.0,
            -1, "NONE", 1.0, 1e4, 1.0, "auto")
    torch.library.opcheck(ops.batch_prefill_fp8, args,
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


# ------------------------------------------------------------------------------------------------
# Errors: typed, naming the argument
# ------------------------------------------------------------------------------------------------


def _single(device, **kwargs):
    q8, k8, v8, sq, sk, sv = fp8_inputs(3, 5, 4, 2, 16, E4M3, device)
    args = dict(q=q8, k=k8, v=v8, scale_q=sq, scale_k=sk, scale_v=sv, o_dtype=torch.bfloat16)
    args.update(kwargs)
    return flashtile.single_prefill_with_kv_cache(**args)


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(scale_q=torch.ones(3)), ValueError, "scale_q"),
    (dict(scale_k=torch.ones(2, 1)), ValueError, "scale_k"),
    (dict(scale_k=torch.ones(2, dtype=torch.float16)), TypeError, "scale_k"),
    (dict(scale_v=0.5), TypeError, "scale_v"),
    (dict(o_dtype=None), NotImplementedError, "o_dtype"),
    (dict(o_dtype=E4M3), NotImplementedError, "o_dtype"),
    (dict(o_dtype=torch.int8), TypeError, "o_dtype"),
    (dict(pos_encoding_mode="ROPE_LLAMA"), NotImplementedError, "pos_encoding_mode"),
    (dict(sinks=torch.zeros(4)), NotImplementedError, "sinks"),
])
def test_single_fp8_errors(device, kwargs, error, name):
    with pytest.raises(error, match=name):
        _single(device, **kwargs)


@pytest.mark.parametrize("which, dtype", [("k", torch.bfloat16), ("v", E5M2)])
def test_single_fp8_mixed_dtypes(device, which, dtype):
    """fp8 q needs k and v of q's fp8 dtype (both products on fp8 tensor cores)."""
    q8, k8, v8, *_ = fp8_inputs(3, 5, 4, 2, 16, E4M3, device)
    args = {"k": k8, "v": v8}
    args[which] = args[which].float().to(dtype)
    with pytest.raises(TypeError, match=f"^{which}: "):
        flashtile.single_prefill_with_kv_cache(q8, args["k"], args["v"], o_dtype=torch.bfloat16)


def test_wrapper_fp8_errors(device):
    q8, k8, v8, sq, sk, sv, qo_indptr, kv_indptr = ragged_batch([3], [5], 4, 2, 16, E4M3, device, True)
    w = flashtile.BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    with pytest.raises(TypeError, match="kv_data_type"):
        w.plan(qo_indptr, kv_indptr, 4, 2, 16, q_data_type=E4M3, kv_data_type=torch.bfloat16,
               o_data_type=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="o_data_type"):
        w.plan(qo_indptr, kv_indptr, 4, 2, 16, q_data_type=E4M3, kv_data_type=E4M3)
    with pytest.raises(NotImplementedError, match="pos_encoding_mode"):
        w.plan(qo_indptr, kv_indptr, 4, 2, 16, q_data_type=E4M3, kv_data_type=E4M3, o_data_type=torch.bfloat16,
               pos_encoding_mode="ALIBI")
    w.plan(qo_indptr, kv_indptr, 4, 2, 16, q_data_type="float8_e4m3fn", o_data_type="bfloat16")  # kv: q's dtype
    with pytest.raises(ValueError, match="scale_q"):
        w.run(q8, k8, v8, torch.ones(2), sk, sv)
    with pytest.raises(TypeError, match="scale_q, scale_k, scale_v"):
        w.run(q8, k8, v8, sq, sk, sv, sv)
    with pytest.raises(NotImplementedError, match="sinks"):
        w.run(q8, k8, v8, sinks=torch.zeros(4))
    with pytest.raises(ValueError, match="dtype of q"):
        w.run(q8.float().to(torch.bfloat16), k8, v8)


# ------------------------------------------------------------------------------------------------
# GPU: upstream-sized cases (test_hopper_fp8_attention's lengths), both V layouts of single prefill
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("transpose_v", [True, False])
@pytest.mark.parametrize("seq_len, causal", [(117, True), (1011, False), (2372, True)])
def test_single_prefill_fp8_gpu(monkeypatch, seq_len, causal, transpose_v):
    from flashtile.kernels import attention as A

    monkeypatch.setattr(A, "FP8_TRANSPOSE_V", transpose_v)
    device = torch.device("cuda")
    q8, k8, v8, sq, sk, sv = fp8_inputs(seq_len, seq_len, 8, 2, 128, E4M3, device)
    out, lse = flashtile.single_prefill_with_kv_cache(q8, k8, v8, sq, sk, sv, o_dtype=torch.bfloat16, causal=causal,
                                                      return_lse=True)
    check(out, lse, q8, k8, v8, sq, sk, sv, torch.bfloat16, causal=causal)


@pytest.mark.gpu
def test_ragged_prefill_fp8_gpu():
    device = torch.device("cuda")
    qo_lens, kv_lens = [128, 300, 1, 777], [128, 1000, 64, 777]
    q8, k8, v8, sq, sk, sv, qo_indptr, kv_indptr = ragged_batch(qo_lens, kv_lens, 8, 2, 128, E4M3, device, True)
    w = flashtile.BatchPrefillWithRaggedKVCacheWrapper(workspace(device))
    w.plan(qo_indptr, kv_indptr, 8, 2, 128, causal=True, q_data_type=E4M3, kv_data_type=E4M3,
           o_data_type=torch.bfloat16)
    out, lse = w.run(q8, k8, v8, sq, sk, sv, return_lse=True)
    kv = kv_indptr.tolist()
    check_requests(out, lse, q8, lambda i: k8[kv[i]:kv[i + 1]], lambda i: v8[kv[i]:kv[i + 1]], sq, sk, sv, qo_lens,
                   True)


def _hopper_gpu() -> bool:
    from flashtile.kernels import batch_prefill_hopper as hopper

    return torch.cuda.is_available() and hopper._HAVE_GLUON and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper_gpu(), reason="the warp-specialized prefill kernel needs an sm_90 GPU")
@pytest.mark.parametrize("d, dtype, per_head, causal, split, offset", [
    (128, E4M3, True, True, False, 0),
    (128, E4M3, False, False, False, 3),
    (128, E4M3, True, True, True, 0),
    (64, E4M3, True, True, False, 5),
    (128, E5M2, True, True, True, 0),
])
@pytest.mark.parametrize("p_shared", [False, True], ids=["p_registers", "p_shared"])
def test_ragged_prefill_fp8_gluon_gpu(monkeypatch, d, dtype, per_head, causal, split, offset, p_shared):
    """Ragged FP8 batches through the warp-specialized Gluon kernel (FLASHTILE_HOPPER_FP8 on; V from the
    transposed copy): every request against the oracle, with split-KV merges, per-tensor scales, e5m2, keys
    that start ``offset`` rows into k/v; the launch count fails the test if the Triton kernel ran instead."""
    from flashtile.kernels import batch_prefill as BP
    from flashtile.kernels import batch_prefill_hopper as hopper

    monkeypatch.setenv("FLASHTILE_HOPPER_FP8", "1")
    monkeypatch.setattr(hopper, "FP8_P_IN_SHARED", p_shared)  # the weights through registers or shared memory
    launches = []
    launch = BP.hopper_prefill_forward

    def counted(*args, **kwargs):
        launches.append(kwargs.get("fp8_scales") is not None)
        return launch(*args, **kwargs)

    monkeypatch.setattr(BP, "hopper_prefill_forward", counted)
    device = torch.device("cuda")
    qo_lens, kv_lens = [128, 300, 200, 777], [128, 1000, 264, 777]
    q8, k8, v8, sq, sk, sv, qo_indptr, kv_indptr = ragged_batch(qo_lens, kv_lens, 8, 2, d, dtype, device, per_head)
    if offset:  # rows of k/v before and after the requests
        pad = lambda x: torch.cat([x[:offset], x, x[:7]])  # noqa: E731
        k8, v8, kv_indptr = pad(k8), pad(v8), kv_indptr + offset
    w = flashtile.BatchPrefillWithRaggedKVCacheWrapper(workspace(device, mib=128))
    w.plan(qo_indptr, kv_indptr, 8, 2, d, causal=causal, q_data_type=dtype, kv_data_type=dtype,
           o_data_type=torch.bfloat16, fixed_split_size=256 if split else None)
    if split:
        assert w._plan.num_merges > 0
    out, lse = w.run(q8, k8, v8, sq, sk, sv, return_lse=True)
    assert launches and all(launches), "the Gluon kernel did not run the FP8 batch"
    again, lse_again = w.run(q8, k8, v8, sq, sk, sv, return_lse=True)  # a replay of the first call's launches
    assert torch.equal(again, out) and torch.equal(lse_again, lse)
    kv = kv_indptr.tolist()
    check_requests(out, lse, q8, lambda i: k8[kv[i]:kv[i + 1]], lambda i: v8[kv[i]:kv[i + 1]], sq, sk, sv, qo_lens,
                   causal)


@pytest.mark.gpu
def test_fp8_close_to_bf16_gpu():
    """Upstream's check (test_hopper_fp8_attention): fp8 output near the bf16 attention of the unquantized
    inputs (MSE < 1 there; here a much tighter bound for per-head quantized randn)."""
    device = torch.device("cuda")
    q, k, v = (torch.randn(2048, h, 128, device=device, dtype=torch.bfloat16) for h in (32, 8, 8))
    ref = flashtile.single_prefill_with_kv_cache(q, k, v, causal=True)
    (q8, sq), (k8, sk), (v8, sv) = (quantize(x.float(), E4M3) for x in (q, k, v))
    out = flashtile.single_prefill_with_kv_cache(q8, k8, v8, sq, sk, sv, o_dtype=torch.bfloat16, causal=True)
    mse = (out.float() - ref.float()).pow(2).mean().item()
    assert mse < 1e-3, mse
