"""Host time per eager call, flashtile next to FlashInfer (the method of ANCHORS.md: tiny problems so
the GPU is idle, ``time.perf_counter`` over 300 back-to-back calls, synchronized at both ends; the
median of alternating rounds, so CPU clock changes hit every column alike).

    python -m benchmarks.tools.host_time [--rounds 7] [--calls 300] [--filter S] [--profile NAME] [--json PATH]
    python -m benchmarks.tools.host_time --dry [--profile NAME]
    python -m benchmarks.tools.host_time --dry --baseline DIR [--repeat 3] [--filter S]

``--dry`` runs on a machine without a GPU: CPU tensors take the compiled-kernel path with every
kernel launch stubbed out (the first call of a kernel records a launcher that does nothing), so the
numbers are flashtile's own Python work per call, without Triton's C launcher and the driver
(a few microseconds per launch on the real machine). ``--profile NAME`` prints cProfile's table for
the cases whose name contains NAME (own time), to see where the host time goes.

``--baseline DIR`` (with ``--dry``) compares this checkout with another one (e.g. the fork point, from
``git archive``): it runs this file's harness on DIR's flashtile and on this one, alternately,
``--repeat`` times each (separate processes), and prints per case the lowest of each side's medians,
before (DIR) and after (here). Alternating and taking the lowest keeps other load on a shared machine
out of the comparison.

FlashInfer (a baseline column) is imported when available (``. .fi-ref/device_env.sh`` first); its
kernels compile on the first call of each case, outside the timed rounds.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pathlib
import pstats
import statistics
import sys
from typing import Callable, Dict, Optional

import torch

from benchmarks.harness import host_overhead_us

HQ, HKV, D, PAGE = 32, 8, 128, 16
DTYPE = torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Dry mode: the compiled-kernel path on CPU tensors with launches stubbed out
# ---------------------------------------------------------------------------------------------


class _DryCompiled:
    """Stands in for a compiled Triton kernel: its launcher does nothing."""

    function = None
    packed_metadata = None

    @staticmethod
    def run(*args):
        return None

    @staticmethod
    def launch_metadata(*args):
        return None


class _DryDriver:
    @staticmethod
    def get_current_device():
        return 0

    @staticmethod
    def get_current_stream(device=None):
        return 0


def enter_dry_mode() -> None:
    from flashtile._core import device, dispatch, launch

    dispatch.KERNEL_DEVICE_TYPES = ("cuda", "cpu")
    dispatch._MODULES.clear()
    device.TARGET_OVERRIDE = (232448, (9, 0))  # configs as on an H100
    launch._state.update(enabled=True, memo=True, check=False, driver=_DryDriver(),
                         current_device=_DryDriver.get_current_device)
    launch._first_launch = lambda fn, grid, args, kwargs: _DryCompiled()


# ---------------------------------------------------------------------------------------------
# Cases: name -> {provider: make(dev) -> zero-argument call}
# ---------------------------------------------------------------------------------------------


def _page_table(batch: int, kv_len: int, dev):
    pages = -(-kv_len // PAGE)
    indptr = torch.arange(batch + 1, dtype=torch.int32) * pages
    indices = torch.arange(batch * pages, dtype=torch.int32)
    last = torch.full((batch,), kv_len - (pages - 1) * PAGE, dtype=torch.int32)
    cache = torch.randn(batch * pages, 2, PAGE, HKV, D, dtype=DTYPE, device=dev)
    return indptr, indices, last, cache


def _decode(lib, dev, batch: int, kv_len: int, what: str):
    """``what``: "plan", "run", "sinks" (run() with attention-sink logits) or "variant" (run() of a
    flashtile.AttentionVariant with one extra scalar: flashtile only)."""
    indptr, indices, last, cache = _page_table(batch, kv_len, dev)
    ws = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
    jit = {}
    if what == "variant":
        if lib.__name__ != "flashtile":
            raise NotImplementedError("a Python attention variant is flashtile's")
        from benchmarks.variant_examples import WINDOW

        jit = dict(jit_args=WINDOW)
    w = lib.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", **jit)
    args = (indptr, indices, last, HQ, HKV, D, PAGE)
    kw = dict(q_data_type=DTYPE, kv_data_type=DTYPE)
    w.plan(*args, **kw)
    if what == "plan":
        return lambda: w.plan(*args, **kw)
    q = torch.randn(batch, HQ, D, dtype=DTYPE, device=dev)
    if what == "sinks":
        sinks = torch.randn(HQ, device=dev)
        return lambda: w.run(q, cache, sinks=sinks)
    if what == "variant":
        return lambda: w.run(q, cache, 127)
    return lambda: w.run(q, cache)


def _paged_prefill(lib, dev, what: str, batch: int = 8, qo_len: int = 32, kv_len: int = 256):
    indptr, indices, last, cache = _page_table(batch, kv_len, dev)
    qo_indptr = torch.arange(batch + 1, dtype=torch.int32) * qo_len
    ws = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
    w = lib.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
    args = (qo_indptr, indptr, indices, last, HQ, HKV, D, PAGE)
    kw = dict(causal=True, q_data_type=DTYPE, kv_data_type=DTYPE)
    w.plan(*args, **kw)
    if what == "plan":
        return lambda: w.plan(*args, **kw)
    q = torch.randn(batch * qo_len, HQ, D, dtype=DTYPE, device=dev)
    return lambda: w.run(q, cache)


def _ragged_prefill(lib, dev, what: str, batch: int = 8, qo_len: int = 32, kv_len: int = 256):
    qo_indptr = torch.arange(batch + 1, dtype=torch.int32) * qo_len
    kv_indptr = torch.arange(batch + 1, dtype=torch.int32) * kv_len
    ws = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
    w = lib.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD")
    args = (qo_indptr, kv_indptr, HQ, HKV, D)
    kw = dict(causal=True, q_data_type=DTYPE, kv_data_type=DTYPE)
    w.plan(*args, **kw)
    if what == "plan":
        return lambda: w.plan(*args, **kw)
    q = torch.randn(batch * qo_len, HQ, D, dtype=DTYPE, device=dev)
    k = torch.randn(batch * kv_len, HKV, D, dtype=DTYPE, device=dev)
    v = torch.randn(batch * kv_len, HKV, D, dtype=DTYPE, device=dev)
    return lambda: w.run(q, k, v)


def _mla(lib, dev, what: str, batch: int = 8, kv_len: int = 256, heads: int = 16, page: int = 64):
    """DeepSeek MLA decode (latent 512 + rope 64, one query token per request, page 64)."""
    pages = -(-kv_len // page)
    qo_indptr = torch.arange(batch + 1, dtype=torch.int32)
    kv_indptr = torch.arange(batch + 1, dtype=torch.int32) * pages
    indices = torch.arange(batch * pages, dtype=torch.int32)
    lens = torch.full((batch,), kv_len, dtype=torch.int32)
    if dev.type == "cuda":
        qo_indptr, kv_indptr, indices, lens = (x.to(dev) for x in (qo_indptr, kv_indptr, indices, lens))
    w = lib.mla.BatchMLAPagedAttentionWrapper(torch.empty(128 << 20, dtype=torch.uint8, device=dev))
    args = (qo_indptr, kv_indptr, indices, lens, heads, 512, 64, page, False, 0.07, DTYPE, DTYPE)
    w.plan(*args)
    if what == "plan":
        return lambda: w.plan(*args)
    q_nope = torch.randn(batch, heads, 512, dtype=DTYPE, device=dev)
    q_pe = torch.randn(batch, heads, 64, dtype=DTYPE, device=dev)
    pool = torch.randn(batch * pages, page, 576, dtype=DTYPE, device=dev)
    ckv, kpe = pool[..., :512], pool[..., 512:]
    return lambda: w.run(q_nope, q_pe, ckv, kpe)


def _pod(lib, dev, batch: int = 8, kv_len: int = 256, qo_len: int = 32):
    """POD: a 32-token prefill chunk on 256 tokens (contiguous K/V) and 8 decodes of 256 (paged)."""
    indptr, indices, last, cache = _page_table(batch, kv_len, dev)
    w = lib.PODWithPagedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.uint8, device=dev), "NHD")
    w.plan(indptr, indices, last, HQ, HKV, D, PAGE, q_data_type=DTYPE, kv_data_type=DTYPE)
    q_p = torch.randn(qo_len, HQ, D, dtype=DTYPE, device=dev)
    k_p = torch.randn(kv_len, HKV, D, dtype=DTYPE, device=dev)
    v_p = torch.randn(kv_len, HKV, D, dtype=DTYPE, device=dev)
    q_d = torch.randn(batch, HQ, D, dtype=DTYPE, device=dev)
    return lambda: w.run(q_p, k_p, v_p, q_d, cache, causal_p=True)


def _batch_attention(lib, dev, batch: int = 8, kv_len: int = 256):
    """BatchAttention: one 32-token chunk and 7 decodes, each on 256 tokens."""
    indptr, indices, _, cache = _page_table(batch, kv_len, dev)
    qo_indptr = torch.tensor([0, 32] + [33 + i for i in range(batch - 1)], dtype=torch.int32)
    lens = torch.full((batch,), kv_len, dtype=torch.int32)
    if dev.type == "cuda":
        qo_indptr, indptr, indices, lens = (x.to(dev) for x in (qo_indptr, indptr, indices, lens))
    w = lib.BatchAttention("NHD", dev)
    w.plan(qo_indptr, indptr, indices, lens, HQ, HKV, D, D, PAGE, causal=True, q_data_type=DTYPE,
           kv_data_type=DTYPE)
    q = torch.randn(32 + batch - 1, HQ, D, dtype=DTYPE, device=dev)
    return lambda: w.run(q, cache)


def _single_decode(lib, dev, sinks: bool = False):
    q = torch.randn(HQ, D, dtype=DTYPE, device=dev)
    k = torch.randn(256, HKV, D, dtype=DTYPE, device=dev)
    v = torch.randn(256, HKV, D, dtype=DTYPE, device=dev)
    if sinks:
        s = torch.randn(HQ, device=dev)
        return lambda: lib.single_decode_with_kv_cache(q, k, v, sinks=s)
    return lambda: lib.single_decode_with_kv_cache(q, k, v)


def _single_prefill(lib, dev):
    q = torch.randn(32, HQ, D, dtype=DTYPE, device=dev)
    k = torch.randn(256, HKV, D, dtype=DTYPE, device=dev)
    v = torch.randn(256, HKV, D, dtype=DTYPE, device=dev)
    return lambda: lib.single_prefill_with_kv_cache(q, k, v, causal=True)


def _top_p(lib, dev):
    probs = torch.softmax(torch.randn(1, 32000, device=dev), -1)
    return lambda: lib.sampling.top_p_sampling_from_probs(probs, 0.9)


def _rmsnorm(lib, dev):
    x = torch.randn(1, 4096, dtype=DTYPE, device=dev)
    w = torch.randn(4096, dtype=DTYPE, device=dev)
    return lambda: lib.norm.rmsnorm(x, w)


def _fused_add_rmsnorm(lib, dev):
    x = torch.randn(1, 4096, dtype=DTYPE, device=dev)
    r = torch.randn(1, 4096, dtype=DTYPE, device=dev)
    w = torch.randn(4096, dtype=DTYPE, device=dev)
    return lambda: lib.norm.fused_add_rmsnorm(x, r, w)


def _silu_and_mul(lib, dev):
    x = torch.randn(1, 2 * 14336, dtype=DTYPE, device=dev)  # Llama 3 8B's MLP width
    return lambda: lib.activation.silu_and_mul(x)


def _rope(lib, dev):
    q = torch.randn(1, HQ * D, dtype=DTYPE, device=dev)
    k = torch.randn(1, HKV * D, dtype=DTYPE, device=dev)
    cache = torch.randn(4096, D, dtype=torch.float32, device=dev)
    pos = torch.zeros(1, dtype=torch.int64, device=dev)
    return lambda: lib.rope.apply_rope_with_cos_sin_cache_inplace(pos, q, k, D, cache)


def _merge_state(lib, dev):
    va, vb = (torch.randn(8, HQ, D, dtype=DTYPE, device=dev) for _ in range(2))
    sa, sb = (torch.randn(8, HQ, dtype=torch.float32, device=dev) for _ in range(2))
    return lambda: lib.cascade.merge_state(va, sa, vb, sb)


CASES: Dict[str, Callable] = {
    "batch decode run() 8 x 256": lambda lib, dev: _decode(lib, dev, 8, 256, "run"),
    "batch decode run() sinks 8 x 256": lambda lib, dev: _decode(lib, dev, 8, 256, "sinks"),
    "batch decode run() window variant 8 x 256": lambda lib, dev: _decode(lib, dev, 8, 256, "variant"),
    "batch decode plan() 8 x 256": lambda lib, dev: _decode(lib, dev, 8, 256, "plan"),
    "batch decode plan() 256 x 256": lambda lib, dev: _decode(lib, dev, 256, 256, "plan"),
    "paged prefill run() 8 x 32 on 256": lambda lib, dev: _paged_prefill(lib, dev, "run"),
    "paged prefill plan() 8 x 32 on 256": lambda lib, dev: _paged_prefill(lib, dev, "plan"),
    "ragged prefill run() 8 x 32 on 256": lambda lib, dev: _ragged_prefill(lib, dev, "run"),
    "ragged prefill plan() 8 x 32 on 256": lambda lib, dev: _ragged_prefill(lib, dev, "plan"),
    "mla run() 8 x 256 h16": lambda lib, dev: _mla(lib, dev, "run"),
    "POD run() 32 on 256 + 8 x 256": _pod,
    "BatchAttention run() 32 + 7 x 256": _batch_attention,
    "mla plan() 8 x 256 h16": lambda lib, dev: _mla(lib, dev, "plan"),
    "single_decode_with_kv_cache 256": _single_decode,
    "single_decode_with_kv_cache sinks 256": lambda lib, dev: _single_decode(lib, dev, sinks=True),
    "single_prefill_with_kv_cache 32 on 256": _single_prefill,
    "top_p_sampling_from_probs 1 x 32000": _top_p,
    "rmsnorm 1 x 4096": _rmsnorm,
    "fused_add_rmsnorm 1 x 4096": _fused_add_rmsnorm,
    "silu_and_mul 1 x 2*14336": _silu_and_mul,
    "apply_rope_with_cos_sin_cache_inplace 1 token": _rope,
    "merge_state 8 x 32 x 128": _merge_state,
}


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _providers(dry: bool) -> Dict[str, object]:
    import flashtile

    libs = {"flashtile": flashtile}
    if not dry:
        try:
            from flashtile.shim import import_real_flashinfer

            libs["FlashInfer"] = import_real_flashinfer("activation", "cascade", "norm", "rope", "sampling")
        except Exception as e:
            print(f"(FlashInfer not importable: {type(e).__name__}: {e})")
    return libs


def compare_with_baseline(baseline: str, args) -> int:
    """Run the dry table in ``baseline`` and in this checkout alternately; print before/after (module doc)."""
    import os
    import subprocess
    import tempfile

    here = pathlib.Path(__file__).resolve().parents[2]
    runs: Dict[str, list] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            for side, root in (("before", pathlib.Path(baseline).resolve()), ("after", here)):
                out = pathlib.Path(tmp, f"{side}{i}.json")
                # This file measures both sides (the same harness), each importing its own flashtile.
                cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--dry", "--rounds", str(args.rounds),
                       "--calls", str(args.calls), "--filter", args.filter, "--json", str(out)]
                env = dict(os.environ, PYTHONPATH=str(root))
                subprocess.run(cmd, cwd=root, env=env, check=True, stdout=subprocess.DEVNULL)
                runs[side].append(json.loads(out.read_text())["table"])
    names = [n for n in runs["after"][0] if n in runs["before"][0]]
    table = {}
    print(f"\nHost us per eager call, dry (launches stubbed, CPU), {args.calls} calls x {args.rounds} rounds, "
          f"lowest median of {args.repeat} alternating runs; before = {baseline}")
    print("| call | before | after | after / before |\n|---|---|---|---|")
    for name in names:
        before = min(r[name]["flashtile"] for r in runs["before"])
        after = min(r[name]["flashtile"] for r in runs["after"])
        table[name] = {"before": before, "after": after}
        print(f"| {name} | {before:.2f} | {after:.2f} | {after / before:.2f} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"device": "dry", "baseline": baseline, "table": table},
                                                      indent=1))
    return 0


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry", action="store_true", help="CPU: flashtile's Python work with launches stubbed out")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--filter", default="", help="only cases whose name contains one of these comma-separated texts")
    ap.add_argument("--profile", default=None,
                    help="print a cProfile table for cases containing one of these comma-separated texts")
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--json", default=None, help="also write the table as JSON here")
    ap.add_argument("--warm", action="store_true",
                    help="only call each matching case once per provider (compiles FlashInfer's kernels)")
    ap.add_argument("--providers", default=None, help="comma-separated subset of flashtile,FlashInfer")
    ap.add_argument("--baseline", default=None,
                    help="with --dry: a checkout to compare with (before), run alternately with this one (after)")
    ap.add_argument("--repeat", type=int, default=3, help="with --baseline: runs per side")
    args = ap.parse_args(argv)
    if args.baseline is not None:
        if not args.dry:
            ap.error("--baseline needs --dry")
        return compare_with_baseline(args.baseline, args)
    if args.dry:
        enter_dry_mode()
        dev = torch.device("cpu")
    else:
        dev = torch.device("cuda")
    libs = _providers(args.dry)
    if args.providers:
        libs = {n: lib for n, lib in libs.items() if n in args.providers.split(",")}
    cases = {n: c for n, c in CASES.items() if any(f in n for f in args.filter.split(","))}
    calls = {}
    for name, make in cases.items():
        for lib_name, lib in libs.items():
            try:
                fn = make(lib, dev)
                fn()
                _sync(dev)
                calls[(name, lib_name)] = fn
            except Exception as e:
                print(f"{name} / {lib_name}: {type(e).__name__}: {str(e)[:200]}")
    if args.warm:
        return 0
    samples = {key: [] for key in calls}
    for _ in range(args.rounds):
        for key, fn in calls.items():
            samples[key].append(host_overhead_us(fn, args.calls, warmup=0))
    names = list(libs)
    mode = "dry (launches stubbed, CPU)" if args.dry else torch.cuda.get_device_name()
    print(f"\nHost us per eager call, median of {args.rounds} rounds x {args.calls} calls; {mode}; "
          f"torch {torch.__version__}")
    header = "| call | " + " | ".join(names) + (" | flashtile / FlashInfer |" if len(names) > 1 else " |")
    print(header)
    print("|---" * (len(names) + 1 + (len(names) > 1)) + "|")
    table = {}
    for name in cases:
        row = {n: statistics.median(samples[(name, n)]) for n in names if (name, n) in samples}
        table[name] = row
        cells = [f"{row[n]:.1f}" if n in row else "-" for n in names]
        ratio = ""
        if len(names) > 1:
            ratio = f" | {row['flashtile'] / row['FlashInfer']:.2f}" if len(row) == len(names) else " | -"
        print(f"| {name} | " + " | ".join(cells) + ratio + " |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"device": mode, "table": table}, indent=1))
    if args.profile is not None:
        for name in cases:
            if not any(p in name for p in args.profile.split(",")) or (name, "flashtile") not in calls:
                continue
            fn = calls[(name, "flashtile")]
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.calls):
                fn()
            prof.disable()
            print(f"\n## {name}: flashtile, us per call (own time / with callees; cProfile inflates both)")
            stats = pstats.Stats(prof).stats
            rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[: args.top]
            for (file, line, func), (_, ncalls, tottime, cumtime, _) in rows:
                where = f"{pathlib.Path(file).name}:{line}({func})"
                print(f"  {tottime / args.calls * 1e6:8.2f} {cumtime / args.calls * 1e6:8.2f} "
                      f"{ncalls / args.calls:5.1f}x  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
