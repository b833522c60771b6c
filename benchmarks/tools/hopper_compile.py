"""Compile the warp-specialized Hopper kernels (Gluon: the batch prefill of
flashtile/kernels/batch_prefill_hopper.py, and with ``--mla`` the MLA kernel of kernels/mla_hopper.py) for
sm_90a without a GPU, and print shared memory, registers, spill and a hash of the SASS opcode sequence
(``--fp8``: the prefill kernel on a ragged FP8 batch).

The launcher runs on CPU tensors (prefill: a paged cache, causal, 32/8 heads; MLA: 64 requests x 4096 keys,
128 heads, decode or ``--qo`` query tokens) with its launch captured instead of run, and the captured call is
compiled as aot_compile_check.py compiles the Triton kernels (benchmarks/tools/aot.py). Two checkouts that print
the same hash have the same machine code.

    python -m benchmarks.tools.hopper_compile --triton-path /tmp/t36 [--head-dim 64] [--page-size 16]
        [--stages N] [--fp8 [--p-shared]] [--mla [--qo 4] [--overlap]] [--dump DIR]
"""

import argparse
import os
import sys

_ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
_ap.add_argument("--triton-path", default=None, help="a directory holding the triton package to compile with")
_ap.add_argument("--head-dim", type=int, default=128, choices=(64, 128))
_ap.add_argument("--page-size", type=int, default=None, help="1: gather mode (default: 16, MLA 64)")
_ap.add_argument("--stages", type=int, default=None, help="the K/V ring depth (default: the kernel's table)")
_ap.add_argument("--mla", action="store_true", help="the MLA kernel instead")
_ap.add_argument("--fp8", action="store_true", help="prefill: a ragged FP8 (e4m3) batch, V from its transposed copy")
_ap.add_argument("--p-shared", action="store_true", help="with --fp8: FP8_P_IN_SHARED (batch_prefill_hopper.py)")
_ap.add_argument("--qo", type=int, default=1, help="MLA: query tokens per request (causal)")
_ap.add_argument("--overlap", action="store_true", help="MLA: with OVERLAP_LOGITS (kernels/mla_hopper.py)")
_ap.add_argument("--dump", default=None, help="write the TTGIR and PTX into this directory")
if __name__ == "__main__":  # (imported by tests/test_mla_hopper.py: no arguments, the installed Triton)
    _args = _ap.parse_args()
    if _args.triton_path:
        sys.path.insert(0, _args.triton_path)
    os.environ.pop("TRITON_INTERPRET", None)
import torch  # noqa: E402
import triton  # noqa: E402

import flashtile.kernels.batch_prefill_hopper as hopper  # noqa: E402
import flashtile.kernels.mla_hopper as mla_hopper  # noqa: E402
from benchmarks.tools.aot import capture_launches, compile_source, sass_summary  # noqa: E402


def captured_launch(head_dim: int, page_size: int):
    """The recorded launch (benchmarks/tools/aot.py's Launch) of one hopper_prefill_forward call on CPU
    tensors: on CPU the kernel's DirectLaunch wrapper hands the call to the Gluon JIT function, which
    capture_launches records."""
    tokens, qo_heads, kv_heads, pages = 2048, 32, 8, 256
    q = torch.zeros(tokens, qo_heads, head_dim, dtype=torch.bfloat16)
    cache = torch.zeros(pages, 2, page_size, kv_heads, head_dim, dtype=torch.bfloat16)
    k, v = cache[:, 0], cache[:, 1]
    views = (hopper._kv_rows(k, True), hopper._kv_rows(v, True))
    ints = torch.zeros(4096, dtype=torch.int32)
    out, lse = torch.zeros_like(q), torch.zeros(tokens, qo_heads)
    part_o, part_lse = torch.zeros(64, qo_heads, head_dim), torch.zeros(64, qo_heads)
    with capture_launches() as calls:
        hopper.hopper_prefill_forward(q, k, v, views, ints, ints, ints, ints, part_o, part_lse, out, lse, 0.1, True,
                                      64, 132)
    (launch,) = calls
    return launch


def captured_fp8_launch(head_dim: int):
    """The recorded launch of one hopper_prefill_forward call of a ragged FP8 (e4m3) batch on CPU tensors
    (16 requests x 1024 tokens, causal, 32/8 heads), V from a transposed copy of the layout
    batch_prefill.ragged_fp8_v_layout makes (zeros here: only the shapes matter)."""
    fp8 = torch.float8_e4m3fn
    tokens, qo_heads, kv_heads, requests = 16 * 1024, 32, 8, 16
    q = torch.zeros(tokens, qo_heads, head_dim, dtype=fp8)
    k, v = torch.zeros(tokens, kv_heads, head_dim, dtype=fp8), torch.zeros(tokens, kv_heads, head_dim, dtype=fp8)
    views = (hopper._kv_rows(k, False), hopper._kv_rows(v, False))
    v_t = torch.zeros(kv_heads, head_dim, tokens + requests * 144, dtype=fp8)
    ints = torch.zeros(4096, dtype=torch.int32)
    out, lse = torch.zeros(tokens, qo_heads, head_dim, dtype=torch.bfloat16), torch.zeros(tokens, qo_heads)
    part_o, part_lse = torch.zeros(64, qo_heads, head_dim), torch.zeros(64, qo_heads)
    scales = (torch.ones(qo_heads), torch.ones(kv_heads), torch.ones(kv_heads))
    with capture_launches() as calls:
        hopper.hopper_prefill_forward(q, k, v, views, None, ints, ints, ints, part_o, part_lse, out, lse, 0.1, True,
                                      64, 132, fp8_scales=scales, v_t=v_t)
    (launch,) = calls
    return launch


def captured_mla_launch(page_size: int, qo: int):
    """The recorded launch of one hopper_mla_forward call on CPU tensors (64 requests x 4096 keys, 128 heads,
    ``qo`` query tokens each, one cache tensor of 576-wide slots viewed as latent and rope part)."""
    import numpy as np

    from flashtile._core.mla_tiles import MlaConfig, MlaMeta
    from flashtile.scheduler.mla_work import plan_mla_work

    batch, kv, heads = 64, 4096, 128
    qo_indptr = np.arange(batch + 1) * qo
    work = plan_mla_work(qo_indptr, np.full(batch, kv), heads, 64, 132, 64, token_capacity=batch * qo)
    pages = batch * -(-kv // page_size)
    pool = torch.zeros(pages, page_size, 576, dtype=torch.bfloat16)
    i32 = lambda x: torch.as_tensor(x).to(torch.int32)  # noqa: E731
    rows = max(work.partial_rows, 1)
    meta = MlaMeta(i32(qo_indptr), i32(np.arange(batch + 1) * (pages // batch)), torch.arange(pages, dtype=torch.int32),
                   i32(np.full(batch, kv)), i32(work.packed), work.req_offset, work.token_offset, work.item_offset,
                   work.num_items, work.max_splits, torch.zeros(rows, 512), torch.zeros(rows),
                   MlaConfig(64, 64, 4, 2), True)
    q = torch.zeros(batch * qo, heads, 576, dtype=torch.bfloat16)
    with capture_launches() as calls:
        mla_hopper.hopper_mla_forward(q[..., :512], q[..., 512:], pool[..., :512], pool[..., 512:], meta,
                                      torch.zeros(batch * qo, heads, 512, dtype=torch.bfloat16),
                                      torch.zeros(batch * qo, heads), sm_scale=0.072, causal=qo > 1, num_sms=132)
    (launch,) = calls
    return launch


def compile_launch(launch):
    """``triton.compile`` of a captured launch for sm_90a (its ``metadata.shared``, ``asm``)."""
    source, target, options = compile_source(launch)
    return triton.compile(source, target=target, options=options)


def main() -> None:
    if not hopper._HAVE_GLUON:
        raise SystemExit(f"this Triton ({triton.__version__}) has no Gluon Hopper API")
    if _args.stages is not None:
        hopper.STAGES_OVERRIDE = _args.stages
    if _args.mla:
        mla_hopper.OVERLAP_LOGITS = _args.overlap
        page_size = 64 if _args.page_size is None else _args.page_size
        launch = captured_mla_launch(page_size, _args.qo)
        label = (f"hopper mla page {page_size} qo {_args.qo}{' (gather)' if mla_hopper.use_gather(page_size) else ''}"
                 f"{' overlap' if _args.overlap else ''}")
    elif _args.fp8:
        hopper.FP8_P_IN_SHARED = _args.p_shared
        launch = captured_fp8_launch(_args.head_dim)
        label = (f"hopper prefill fp8 ragged d{_args.head_dim} stages {launch.constexpr('STAGES')}"
                 f"{' p-shared' if _args.p_shared else ''}")
    else:
        page_size = 16 if _args.page_size is None else _args.page_size
        launch = captured_launch(_args.head_dim, page_size)
        label = f"hopper prefill d{_args.head_dim} page {page_size} stages {launch.constexpr('STAGES')}"
    compiled = compile_launch(launch)
    if _args.dump:
        import pathlib

        for ext in ("ttgir", "ptx"):
            pathlib.Path(_args.dump).mkdir(parents=True, exist_ok=True)
            pathlib.Path(_args.dump, f"{launch.name}.{ext}").write_text(compiled.asm[ext])
    print(f"{label} (Triton {triton.__version__}, sm_90a): shared={compiled.metadata.shared}"
          f"{sass_summary(compiled.asm['ptx'])}")


if __name__ == "__main__":
    main()
