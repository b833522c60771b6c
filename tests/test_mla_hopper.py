"""The warp-specialized Gluon MLA kernel (flashtile/kernels/mla_hopper.py): on CPU, which calls its scope
admits; on an sm_90 GPU (FLASHTILE_HOPPER_MLA on, its default), the wrapper's results against the float64 oracle
(decode, append and prefill rows, page sizes served by TMA boxes and by the cp.async gather, split-KV
partial states, CUDA-graph re-plan and replay), with a count of its launches so that a silent fallback to
the Triton kernel fails the test. Kept apart from test_mla.py so that a GPU run can give it its own time
limit."""

import math
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from attention_cases import make_mla_batch, workspace
from conftest import HAS_CUDA
from flashtile._core import settings
from flashtile.kernels import mla_hopper
from flashtile.mla import BatchMLAPagedAttentionWrapper
from oracles import LSE_TOLERANCES, TOLERANCES, sink_attention_oracle
from test_mla import check_mla, graph_replan_replay

FP8 = getattr(torch, "float8_e4m3fn", None)


def _tensors(heads=128, nnz=3, pages=5, page_size=64, dtype=torch.bfloat16, width=576):
    q = torch.zeros(nnz, heads, width, dtype=dtype)
    pool = torch.zeros(pages, page_size, width, dtype=dtype)
    return q[..., :512], q[..., 512:576], pool[..., :512], pool[..., 512:576]


def test_scope_admits_engine_layouts():
    """q and the caches as engines pass them (one [.., 576] tensor sliced, or contiguous parts), 64-row tiles."""
    assert mla_hopper.hopper_mla_layout(*_tensors(), 64, True)
    assert mla_hopper.hopper_mla_layout(*_tensors(dtype=torch.float16, page_size=1), 64, True)
    qn, qp = torch.zeros(4, 64, 512, dtype=torch.bfloat16), torch.zeros(4, 64, 64, dtype=torch.bfloat16)
    ckv, kpe = torch.zeros(9, 16, 512, dtype=torch.bfloat16), torch.zeros(9, 16, 64, dtype=torch.bfloat16)
    assert mla_hopper.hopper_mla_layout(qn, qp, ckv, kpe, 64, True)


@pytest.mark.parametrize("change", ["block_m", "variant", "fp32", "mixed", "fp8", "narrow", "heads_strided",
                                    "pages_strided", "unaligned_rows"])
def test_scope_refuses(change):
    """Everything else runs the Triton kernel: smaller tiles, variants, other dtypes, other widths, queries
    or caches that are not one 2-D view of 16-byte rows."""
    qn, qp, ckv, kpe = _tensors()
    block_m, plain = 64, True
    if change == "block_m":
        block_m = 32
    elif change == "variant":
        plain = False
    elif change == "fp32":
        qn, qp, ckv, kpe = _tensors(dtype=torch.float32)
    elif change == "mixed":
        ckv = ckv.half()
    elif change == "fp8":
        if FP8 is None:
            pytest.skip("no float8_e4m3fn in this torch")
        pool = torch.zeros(5, 64, 576, dtype=FP8)
        ckv, kpe = pool[..., :512], pool[..., 512:]
    elif change == "narrow":
        qn, qp, ckv, kpe = (t[..., : t.shape[-1] // 2] for t in (qn, qp, ckv, kpe))
    elif change == "heads_strided":  # heads of a token not one view row apart
        qn = torch.zeros(128, 3, 512, dtype=torch.bfloat16).transpose(0, 1)
    elif change == "pages_strided":  # a page's slots followed by a gap
        ckv = torch.zeros(5, 65, 512, dtype=torch.bfloat16)[:, :64]
    elif change == "unaligned_rows":  # 577-element rows: not 16 bytes apart
        qn, qp, ckv, kpe = _tensors(width=577)
    assert not mla_hopper.hopper_mla_layout(qn, qp, ckv, kpe, block_m, plain)


@pytest.mark.parametrize("page_size, gather", [(1, True), (3, True), (96, True), (8, False), (16, False),
                                               (64, False), (128, False)])
def test_gather_mode_for_pages_a_box_cannot_serve(page_size, gather):
    assert mla_hopper.use_gather(page_size) is gather


def test_on_by_default_and_never_on_cpu(monkeypatch):
    monkeypatch.delenv("FLASHTILE_HOPPER_MLA", raising=False)
    assert mla_hopper.hopper_mla_enabled()
    assert not mla_hopper.hopper_mla_usable(*_tensors(), 64, True)  # CPU tensors: the kernels' own path
    monkeypatch.setenv("FLASHTILE_HOPPER_MLA", "0")
    assert not settings.flag("FLASHTILE_HOPPER_MLA") and not mla_hopper.hopper_mla_enabled()


def _sm90() -> bool:
    return HAS_CUDA and mla_hopper._HAVE_GLUON and torch.cuda.get_device_capability() == (9, 0)


gpu = pytest.mark.skipif(not _sm90(), reason="the warp-specialized MLA kernel needs an sm_90 GPU")


@pytest.fixture
def gluon_launches(monkeypatch):
    """FLASHTILE_HOPPER_MLA on (its default), and a list that records each launch of the Gluon kernel."""
    from flashtile.kernels import mla as mla_kernels

    monkeypatch.setenv("FLASHTILE_HOPPER_MLA", "1")
    calls = []
    launch = mla_kernels.hopper_mla_forward

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return launch(*args, **kwargs)

    monkeypatch.setattr(mla_kernels, "hopper_mla_forward", counted)
    return calls


# (qo_lens, kv_lens, page_size, heads, dtype): 64-row tiles; TMA boxes of one page (64, 16, 128) and gathers (1, 3)
GPU_CASES = [
    ([1] * 6, [1, 64, 65, 0, 4096, 300], 64, 128, torch.bfloat16),
    ([4, 2, 8, 3], [4, 100, 1025, 64], 16, 64, torch.float16),
    ([1], [8192], 64, 128, torch.bfloat16),  # one request over many splits (a 32k one: the oracle is slow)
    ([37, 5, 130], [37, 800, 4000], 16, 32, torch.bfloat16),
    ([1, 1, 1, 2], [7, 90, 2000, 1], 1, 64, torch.bfloat16),
    ([1, 1, 3], [7, 90, 12], 3, 24, torch.float16),
    ([2, 1], [130, 5000], 128, 128, torch.bfloat16),
]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("qo_lens, kv_lens, page_size, heads, dtype", GPU_CASES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("split", [None, 256, "off"])
def test_gluon_kernel_matches_oracle(gluon_launches, qo_lens, kv_lens, page_size, heads, dtype, causal, split):
    device = torch.device("cuda")
    batch = make_mla_batch(qo_lens, kv_lens, page_size, heads, 512, 64, dtype, device, indptr_offset=page_size % 3)
    sm_scale = 1.0 / math.sqrt(192)
    w = BatchMLAPagedAttentionWrapper(workspace(device, mib=256))
    kw = {"fixed_split_size": split} if isinstance(split, int) else {"disable_split_kv": split == "off"}
    w.plan(*batch[4:], heads, 512, 64, page_size, causal, sm_scale, dtype, dtype, **kw)
    assert w._plan.meta.config.block_m == 64
    out, lse = w.run(*batch[:4], return_lse=True)
    assert gluon_launches, "the Gluon kernel did not run"
    check_mla(out, lse, *batch, causal=causal, sm_scale=sm_scale, dtype=dtype)
    # A second run replays the first one's launches: same bits.
    out2, lse2 = w.run(*batch[:4], return_lse=True)
    nnz = int(batch[4][-1])
    assert torch.equal(out2[:nnz], out[:nnz]) and torch.equal(lse2[:nnz], lse[:nnz])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("qo_lens, kv_lens, page_size, heads, dtype", [GPU_CASES[i] for i in (0, 1, 4, 6)])
@pytest.mark.parametrize("causal", [True, False])
def test_gluon_kernel_overlapped_logits(gluon_launches, monkeypatch, qo_lens, kv_lens, page_size, heads, dtype,
                                        causal):
    """OVERLAP_LOGITS (block j+1's logits issued before block j's product): the oracle's result, with a split
    plan (partial states) so that items of one and of several blocks both occur."""
    monkeypatch.setattr(mla_hopper, "OVERLAP_LOGITS", True)
    device = torch.device("cuda")
    batch = make_mla_batch(qo_lens, kv_lens, page_size, heads, 512, 64, dtype, device, indptr_offset=1)
    w = BatchMLAPagedAttentionWrapper(workspace(device, mib=256))
    w.plan(*batch[4:], heads, 512, 64, page_size, causal, 0.07, dtype, dtype, fixed_split_size=256)
    out, lse = w.run(*batch[:4], return_lse=True)
    assert gluon_launches
    check_mla(out, lse, *batch, causal=causal, sm_scale=0.07, dtype=dtype)


@gpu
@pytest.mark.gpu
def test_gluon_kernel_leaves_variants_to_the_triton_kernel(gluon_launches):
    """sinks= (a variant) runs the Triton kernel, and is right."""
    device, heads, sm_scale = torch.device("cuda"), 128, 0.07
    batch = make_mla_batch([1, 2], [300, 70], 16, heads, 512, 64, torch.bfloat16, device)
    sinks = torch.randn(heads, device=device)
    w = BatchMLAPagedAttentionWrapper(workspace(device, mib=64))
    w.plan(*batch[4:], heads, 512, 64, 16, True, sm_scale, torch.bfloat16, torch.bfloat16)
    out, lse = w.run(*batch[:4], sinks=sinks, return_lse=True)
    assert not gluon_launches
    q_nope, q_pe, ckv, kpe, qo_indptr, kv_indptr, kv_indices, lens = batch
    for r in range(2):
        rows = slice(int(qo_indptr[r]), int(qo_indptr[r + 1]))
        ids = kv_indices[int(kv_indptr[r]):int(kv_indptr[r + 1])].long().to(device)
        c, p = ckv[ids].flatten(0, 1)[:int(lens[r])], kpe[ids].flatten(0, 1)[:int(lens[r])]
        q = torch.cat([q_nope[rows], q_pe[rows]], -1)
        ref_o, ref_lse = sink_attention_oracle(q, torch.cat([c, p], -1)[:, None], c[:, None], sinks.cpu(),
                                               causal=True, sm_scale=sm_scale)
        atol, rtol = TOLERANCES[torch.bfloat16]
        torch.testing.assert_close(out[rows].double().cpu(), ref_o, atol=atol, rtol=rtol)
        atol, rtol = LSE_TOLERANCES[torch.bfloat16]
        torch.testing.assert_close(lse[rows].double().cpu(), ref_lse, atol=atol, rtol=rtol)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 64])
def test_gluon_kernel_cuda_graph_replan_replay(gluon_launches, page_size):
    graph_replan_replay(page_size, 128)
    assert gluon_launches


@pytest.mark.skipif(not mla_hopper._HAVE_GLUON, reason="this Triton has no Gluon Hopper API")
@pytest.mark.parametrize("args", [["--mla", "--qo", "2"], ["--mla", "--page-size", "1", "--overlap"], [], ["--fp8"]],
                         ids=["mla", "mla-gather-overlap", "prefill", "prefill-fp8"])
def test_gluon_kernels_compile_for_sm90_with_this_triton(args):
    """Both Gluon kernels (the MLA kernel, TMA and gather; the batch prefill, bf16 and FP8) compile for sm_90a with the
    installed Triton, within an H100's shared memory: the GPU runs Triton 3.6, and this catches Gluon's
    renamed APIs (kernels/gluon_api.py) in newer releases. In a subprocess: compiling needs the kernels
    defined without the interpreter these tests run under."""
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.tools.hopper_compile", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    found = re.search(r"sm_90a\): shared=(\d+)", done.stdout)
    assert done.returncode == 0 and found, done.stdout + done.stderr[-3000:]
    assert 0 < int(found.group(1)) <= 232448
