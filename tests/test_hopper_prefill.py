"""The warp-specialized Hopper batch-prefill kernel against the Triton kernel, on one sm_90 GPU.

The public wrappers run each batch (ragged and paged, NHD and HND, causal and not, GQA 1/4/8, appends
with qo_len < kv_len, prompts whose first rows see nothing, split plans, and the gather mode for pages
TMA boxes cannot serve) twice, with ``FLASHTILE_HOPPER_PREFILL`` on and off; out must agree within
bf16 rounding and lse must agree with the same rows infinite. Both kernels are also checked against
the float64 oracle in test_batch_prefill.py; this test covers the shapes where the two kernels split
the work differently. A synchronization bug in a warp-specialized kernel shows as a hang: run it
under ``timeout``.
"""

import pytest
import torch

import flashtile
from conftest import HAS_CUDA

CASES = {
    "ragged 4x300 g1": dict(qo_lens=[300] * 4, kv_lens=[300] * 4, hq=8, hk=8),
    "ragged mixed g4": dict(qo_lens=[200, 129, 1000, 77], kv_lens=[200, 500, 1000, 300], hq=32, hk=8),
    "ragged qo>kv g4": dict(qo_lens=[300, 200], kv_lens=[100, 260], hq=16, hk=4),
    "ragged noncausal g8": dict(qo_lens=[257, 130], kv_lens=[300, 999], hq=32, hk=4, causal=False),
    "ragged g1 d64": dict(qo_lens=[300, 1000], kv_lens=[300, 1000], hq=4, hk=4, d=64),
    "paged p16 NHD g4": dict(qo_lens=[1024] * 3, kv_lens=[1024] * 3, hq=32, hk=8, page=16),
    "paged p16 NHD mixed": dict(qo_lens=[200, 129, 1000, 77], kv_lens=[200, 517, 1003, 300], hq=32, hk=8, page=16),
    "paged p16 HND": dict(qo_lens=[200, 1000], kv_lens=[333, 1000], hq=32, hk=8, page=16, layout="HND"),
    "paged p8 NHD noncausal": dict(qo_lens=[150, 300], kv_lens=[301, 77], hq=8, hk=2, page=8, causal=False),
    "paged p64 NHD": dict(qo_lens=[500, 129], kv_lens=[700, 4000], hq=16, hk=16, page=64),
    "ragged split": dict(qo_lens=[200, 300], kv_lens=[3000, 5000], hq=16, hk=4, split=1024),
    "paged split p16": dict(qo_lens=[300], kv_lens=[9000], hq=16, hk=4, page=16, split=64),
    # Gather mode (cp.async copies): pages TMA boxes cannot serve.
    "gather p1 NHD g4": dict(qo_lens=[1024] * 3, kv_lens=[1024] * 3, hq=32, hk=8, page=1),
    "gather p1 mixed": dict(qo_lens=[200, 129, 1000, 77], kv_lens=[200, 517, 1003, 300], hq=32, hk=8, page=1),
    "gather p5 HND noncausal": dict(qo_lens=[150, 300], kv_lens=[301, 77], hq=8, hk=2, page=5, causal=False,
                                    layout="HND"),
    "gather p3 d64 g1": dict(qo_lens=[300, 1000], kv_lens=[300, 1000], hq=4, hk=4, d=64, page=3),
    "gather p256 NHD": dict(qo_lens=[500, 129], kv_lens=[700, 4000], hq=16, hk=16, page=256),
    "gather split p1": dict(qo_lens=[300], kv_lens=[9000], hq=16, hk=4, page=1, split=1024),
}


def _hopper_kernel_available() -> bool:
    if not HAS_CUDA:
        return False
    from flashtile.kernels import batch_prefill_hopper as hopper

    return hopper._HAVE_GLUON and torch.cuda.get_device_capability() == (9, 0)


def _indptr(lens) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def _planned_wrapper(qo_lens, kv_lens, hq, hk, d=128, page=None, layout="NHD", causal=True, split=None):
    """A planned wrapper over random bf16 inputs and the arguments of its run()."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    qo_indptr = _indptr(qo_lens)
    q = torch.randn(int(qo_indptr[-1]), hq, d, device=dev, dtype=torch.bfloat16)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    kw = dict(causal=causal, q_data_type=torch.bfloat16)
    if split is not None:
        kw["fixed_split_size"] = split
    if page is None:
        kv_indptr = _indptr(kv_lens)
        k = torch.randn(int(kv_indptr[-1]), hk, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        w = flashtile.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD")
        w.plan(qo_indptr.to(dev), kv_indptr.to(dev), hq, hk, d, **kw)
        return w, (q, k, v)
    kv_indptr = _indptr([(n + page - 1) // page for n in kv_lens])
    total = int(kv_indptr[-1])
    indices = torch.randperm(total + 7, dtype=torch.int32)[:total]
    last = torch.tensor([(n - 1) % page + 1 for n in kv_lens], dtype=torch.int32)
    shape = (total + 7, 2, page, hk, d) if layout == "NHD" else (total + 7, 2, hk, page, d)
    cache = torch.randn(shape, device=dev, dtype=torch.bfloat16)
    w = flashtile.BatchPrefillWithPagedKVCacheWrapper(ws, layout)
    w.plan(qo_indptr.to(dev), kv_indptr.to(dev), indices.to(dev), last.to(dev), hq, hk, d, page, **kw)
    return w, (q, cache)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper_kernel_available(), reason="the warp-specialized prefill kernel needs an sm_90 GPU")
@pytest.mark.parametrize("name", list(CASES))
def test_hopper_kernel_matches_triton_kernel(name, monkeypatch):
    w, args = _planned_wrapper(**CASES[name])
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("FLASHTILE_HOPPER_PREFILL", flag)  # the fixture re-reads flashtile's settings
        out, lse = w.run(*args, return_lse=True)
        torch.cuda.synchronize()
        results[flag] = (out.float(), lse)
    (out_triton, lse_triton), (out_hopper, lse_hopper) = results["0"], results["1"]
    finite = torch.isfinite(lse_triton)
    assert torch.equal(torch.isfinite(lse_hopper), finite), "the rows that see no key differ"
    if finite.any():
        assert (lse_triton[finite] - lse_hopper[finite]).abs().max().item() < 1e-2
    assert (out_triton - out_hopper).abs().max().item() < 2e-2
