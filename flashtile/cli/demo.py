"""``flashtile demo``: Llama-3-8B attention, causal prefill then decode steps, checked against the
float32 reference and timed (exit code 1 when a check fails)."""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch

from .._core.checks import HALF_DTYPES, parse_dtype
from .common import SHAPE_PRESETS, SHORT_DTYPE, ModelShape, device_name, format_time, path_of, resolve_device, sync

DEMO_MODEL = ("Llama-3-8B", SHAPE_PRESETS["llama3-8b"])
DEMO_PROMPT_LEN = {"cuda": 4096, "cpu": 256}  # default prompt length per device type
DEMO_TOLERANCE = (2e-2, 2e-2)  # (atol, rtol) of a bf16/fp16 output against the float32 reference


def check_close(out: torch.Tensor, ref: torch.Tensor, atol: float = DEMO_TOLERANCE[0],
                rtol: float = DEMO_TOLERANCE[1]) -> Tuple[float, bool]:
    """(max abs error, passed): passed when every ``|out - ref| <= atol + rtol * |ref|`` (NaN fails)."""
    out = out.float()
    ref = ref.float().to(out.device)
    err = (out - ref).abs()
    max_err = float(err.max()) if err.numel() else 0.0
    if math.isnan(max_err) or bool(err.isnan().any()):
        return float("nan"), False
    return max_err, bool(torch.isclose(out, ref, atol=atol, rtol=rtol).all())


def _first_call(fn: Callable[[], torch.Tensor], device: torch.device) -> Tuple[float, torch.Tensor]:
    """Host seconds of one call, synchronized on both sides (on a GPU: compile or cache load + run)."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


def _median_seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median seconds of one call: CUDA events around each call on a GPU, perf_counter on CPU."""
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for start, end in zip(starts, ends):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e-3
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _graph_seconds(fn: Callable[[], object], device: torch.device, calls: int = 20, reps: int = 5) -> Optional[float]:
    """Seconds of one call as a CUDA-graph replay of ``calls`` back-to-back calls (GPU time without
    Python launch overhead), or None when the call cannot be captured."""
    from .._core.graphs import capture_graph

    try:
        graph, _ = capture_graph(fn, calls=calls, device=device)
    except Exception:
        torch.cuda.synchronize(device)
        return None
    return _median_seconds(graph.replay, device, reps) / calls


@dataclass
class DemoRun:
    """The demo's settings, its inputs' generator and its K/V cache (room for the prompt and the
    decode steps; the prompt fills the first ``prompt_len`` tokens)."""

    device: torch.device
    dtype: torch.dtype
    prompt_len: int
    steps: int
    reps: int
    path: str
    reason: str
    gen: torch.Generator
    k_cache: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # sized by _fill_prompt_cache
    v_cache: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    @property
    def shape(self) -> ModelShape:
        return DEMO_MODEL[1]

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def first_label(self) -> str:
        return "first call (compile)" if self.path == "triton" else "first call"

    def randn(self, *size: int) -> torch.Tensor:
        """Inputs drawn on the CPU from the seeded generator (the same values on every device)."""
        x = torch.randn(*size, generator=self.gen, dtype=torch.float32, device="cpu")
        return x.to(device=self.device, dtype=self.dtype)


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """The float32 reference output of the same attention call."""
    from .._core.params import AttentionParams
    from ..reference import single_attention

    out, _ = single_attention(q, k, v, AttentionParams(sm_scale=1.0 / math.sqrt(q.shape[-1]), causal=causal))
    return out


def _demo_run(args: argparse.Namespace) -> DemoRun:
    """The run the arguments ask for; ValueError names the bad argument."""
    device = resolve_device(args.device)
    dtype = parse_dtype("--dtype", args.dtype, HALF_DTYPES)
    on_gpu = device.type == "cuda"
    prompt_len = DEMO_PROMPT_LEN[device.type] if args.prompt_len is None else args.prompt_len
    reps = (20 if on_gpu else 5) if args.reps is None else args.reps
    if prompt_len < 1 or args.decode_steps < 0 or reps < 1:
        raise ValueError("--prompt-len and --reps must be >= 1, --decode-steps >= 0")
    path, reason = path_of(device)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    return DemoRun(device, dtype, prompt_len, args.decode_steps, reps, path, reason, gen)


def _print_header(run: DemoRun) -> None:
    import flashtile

    model, shape = DEMO_MODEL
    atol, rtol = DEMO_TOLERANCE
    print(f"flashtile {flashtile.__version__} demo: {model} attention ({shape.num_qo_heads} query heads, "
          f"{shape.num_kv_heads} KV heads, head_dim {shape.head_dim}), {SHORT_DTYPE[run.dtype]}")
    print(f"device  {device_name(run.device)}")
    print(f"path    {run.path}: {run.reason}")
    timing = "CUDA events, median" if run.on_gpu else "time.perf_counter, median"
    print(f"timing  {timing} of {run.reps} calls after a first call"
          + (" (which includes the Triton compile, or loading it from the on-disk cache)" if run.path == "triton"
             else ""))
    print(f"check   max |out - ref| against the float32 reference (flashtile.reference) on the same inputs, "
          f"atol {atol:g}, rtol {rtol:g}")
    if run.path == "reference":
        print(f"note    the reference path runs that same reference, so the check only sees the rounding to "
              f"{SHORT_DTYPE[run.dtype]};\n        FLASHTILE_BACKEND=triton checks the Triton kernels "
              "(in Triton's interpreter on CPU: use a small --prompt-len)")
    print()


def _fill_prompt_cache(run: DemoRun) -> None:
    hkv, d = run.shape.num_kv_heads, run.shape.head_dim
    capacity = run.prompt_len + run.steps
    run.k_cache = torch.empty(capacity, hkv, d, dtype=run.dtype, device=run.device)
    run.v_cache = torch.empty(capacity, hkv, d, dtype=run.dtype, device=run.device)
    run.k_cache[:run.prompt_len] = run.randn(run.prompt_len, hkv, d)
    run.v_cache[:run.prompt_len] = run.randn(run.prompt_len, hkv, d)


def _prefill_step(run: DemoRun) -> bool:
    """Causal attention of the prompt over itself: timed, checked and printed. Returns whether it passed."""
    import flashtile

    hq, d, n = run.shape.num_qo_heads, run.shape.head_dim, run.prompt_len
    q = run.randn(n, hq, d)
    k, v = run.k_cache[:n], run.v_cache[:n]

    def prefill():
        return flashtile.single_prefill_with_kv_cache(q, k, v, causal=True)

    first_s, out = _first_call(prefill, run.device)
    seconds = _median_seconds(prefill, run.device, run.reps)
    flops = 4.0 * hq * d * (n * (n + 1) // 2)  # causal: query i sees i + 1 keys
    max_err, ok = check_close(out, _reference(q, k, v, causal=True))
    print(f"prefill  causal, {n} tokens")
    print(f"  {run.first_label:<22} {format_time(first_s)}")
    print(f"  {'time':<22} {format_time(seconds)}  ({flops / seconds / 1e12:.3g} TFLOP/s)")
    print(f"  {'check':<22} max abs err {max_err:.2e}  {'PASS' if ok else 'FAIL'}")
    print()
    return ok


@dataclass
class DecodeRow:
    step: int
    kv_len: int
    seconds: float
    graph_seconds: Optional[float]
    nbytes: int
    max_err: float
    ok: bool


def _decode_step(run: DemoRun, step: int) -> DecodeRow:
    """Append one token to K/V and attend one new query over the whole cache: timed and checked."""
    import flashtile

    hq, hkv, d = run.shape.num_qo_heads, run.shape.num_kv_heads, run.shape.head_dim
    kv_len = run.prompt_len + step + 1
    run.k_cache[kv_len - 1] = run.randn(hkv, d)
    run.v_cache[kv_len - 1] = run.randn(hkv, d)
    q_tok = run.randn(hq, d)
    k, v = run.k_cache[:kv_len], run.v_cache[:kv_len]

    def decode():
        return flashtile.single_decode_with_kv_cache(q_tok, k, v)

    first_s, out = _first_call(decode, run.device)  # also absorbs a compile for a new specialization
    if step == 0:
        print(f"  {run.first_label:<22} {format_time(first_s)}")
    seconds = _median_seconds(decode, run.device, run.reps)
    graph_s = _graph_seconds(decode, run.device) if run.on_gpu else None
    nbytes = run.dtype.itemsize * (2 * kv_len * hkv * d + 2 * hq * d)  # read K, V, q; write o
    max_err, ok = check_close(out, _reference(q_tok[None], k, v, causal=False)[0])
    return DecodeRow(step + 1, kv_len, seconds, graph_s, nbytes, max_err, ok)


def _print_decode_table(rows: List[DecodeRow], on_gpu: bool) -> None:
    graph_col = on_gpu and any(r.graph_seconds is not None for r in rows)
    header = f"  {'step':>4}  {'kv_len':>7}  {'time':>10}"
    header += f"  {'graph replay':>12}" if graph_col else ""
    print(header + f"  {'GB/s':>8}  {'max abs err':>11}  check")
    for r in rows:
        best = r.graph_seconds if r.graph_seconds is not None else r.seconds
        line = f"  {r.step:>4}  {r.kv_len:>7}  {format_time(r.seconds):>10}"
        if graph_col:
            line += f"  {format_time(r.graph_seconds) if r.graph_seconds is not None else '-':>12}"
        line += f"  {r.nbytes / best / 1e9:>8.1f}  {r.max_err:>11.2e}  {'PASS' if r.ok else 'FAIL'}"
        print(line)
    if graph_col:
        print("  (time: one eager call incl. Python overhead; graph replay: kernel time, used for GB/s)")
    print()


def _decode_steps(run: DemoRun) -> int:
    """Every decode step, then their table. Returns the number of failed checks."""
    if not run.steps:
        return 0
    print(f"decode   {run.steps} steps, one token appended to K/V per step")
    rows = [_decode_step(run, step) for step in range(run.steps)]
    _print_decode_table(rows, run.on_gpu)
    return sum(not r.ok for r in rows)


def _print_verdict(failures: int, checks: int) -> int:
    atol, rtol = DEMO_TOLERANCE
    if failures:
        print(f"FAIL: {failures} of {checks} results outside atol {atol:g} / rtol {rtol:g} of the reference")
        return 1
    print(f"PASS: {checks} of {checks} results match the reference")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        run = _demo_run(args)
    except ValueError as e:
        print(f"flashtile demo: error: {e}", file=sys.stderr)
        return 2
    _print_header(run)
    _fill_prompt_cache(run)
    failures = int(not _prefill_step(run))
    failures += _decode_steps(run)
    return _print_verdict(failures, 1 + run.steps)


def add_parser(sub: argparse._SubParsersAction) -> None:
    model, shape = DEMO_MODEL
    p = sub.add_parser("demo", help=f"{model} attention: prefill + decode, checked and timed",
                       description=f"Causal prefill then decode steps with {model}'s attention shape "
                                   f"({shape.num_qo_heads} query heads, {shape.num_kv_heads} KV heads, "
                                   f"head_dim {shape.head_dim}), each result checked against the float32 "
                                   "reference. Exit code 1 when a check fails.")
    p.add_argument("--prompt-len", type=int, default=None,
                   help=f"prompt tokens (default {DEMO_PROMPT_LEN['cuda']} on a GPU, {DEMO_PROMPT_LEN['cpu']} on CPU)")
    p.add_argument("--decode-steps", type=int, default=8, help="decode steps after the prefill (default 8)")
    p.add_argument("--device", default="auto", help="auto (default: cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="bf16", help="bf16 (default) or fp16")
    p.add_argument("--reps", type=int, default=None, help="timed calls per measurement (default 20 on GPU, 5 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the inputs")
    p.set_defaults(func=cmd_demo)
