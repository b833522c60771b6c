"""Where the demo's time goes, per kernel library: the example engine (flashtile/examples/engine.py) at the
demo's issue size, timed twice per library (alternating, so that drift shows), then once under
torch.profiler: the GPU kernels by total time, grouped by what they do, beside the wall time of the prefill
and decode steps. The engines differ only in the library's kernels, so the rows that differ are the gap.

    python -m benchmarks.tools.demo_profile [--kernels flashtile,flashinfer] [--decode-tile BN,WARPS,STAGES,PREFETCH]
        [--hopper-stages N] [--json PATH] [--top 25]

Each of --decode-tile (flashtile/_core/decode_tune.py's DecodeTile) and --hopper-stages
(kernels/batch_prefill_hopper.py's K/V ring depth) adds one more flashtile engine with that launch setting, set
through the benchmark harness's override around every call of that engine: graph capture, planning and replay alike.

CUDA only; FlashInfer where it imports (benchmarks/gpu/*.sh source .fi-ref/device_env.sh first).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import importlib
import json
import statistics
import time
from collections import defaultdict

import torch

from flashtile.examples.engine import PagedEngine, Sampling
from flashtile.examples.model import MODELS, init_weights, make_requests, system_prompt
from flashtile.shim import import_real_flashinfer

# what a kernel does, by words in its name (first match wins); the rest is "other"
GROUPS = (("attention decode", ("decode",)), ("attention prefill", ("prefill", "attention", "attn", "cascade",
                                                                      "merge")),
          ("append kv", ("append", "paged_kv")), ("norm", ("norm",)), ("rope", ("rope", "rotary")),
          ("activation", ("silu", "act_and_mul")), ("sampling", ("sampl", "top_k", "top_p", "argmax")),
          ("gemm", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "wgmma")))


def group_of(name: str) -> str:
    low = name.lower()
    for group, words in GROUPS:
        if any(w in low for w in words):
            return group
    return "other"


def _phases(res) -> dict:
    ttft = sorted(res.ttft_s.values())
    pre = [s.seconds for s in res.steps if s.kind == "prefill"]
    dec = [s for s in res.steps if s.kind == "decode"]
    return dict(total_s=res.total_s, ttft_median_ms=1e3 * statistics.median(ttft),
                prefill_steps=len(pre), prefill_s=sum(pre), decode_steps=len(dec),
                decode_s=sum(s.seconds for s in dec),
                decode_tok_s=sum(s.tokens for s in dec) / max(sum(s.seconds for s in dec), 1e-9))


def _setting_engines(args) -> list:
    """``(name, module, harness setting)`` of the extra flashtile engines the options ask for."""
    from benchmarks.bench_batch_decode import TILE
    from benchmarks.bench_batch_prefill import HOPPER_STAGES
    from benchmarks.tools import decode_tile

    extra = []
    if args.decode_tile:
        extra.append((f"flashtile[tile {args.decode_tile}]", "flashtile", {TILE: decode_tile.parse(args.decode_tile)}))
    if args.hopper_stages:
        extra.append((f"flashtile[hopper stages {args.hopper_stages}]", "flashtile",
                      {HOPPER_STAGES: args.hopper_stages}))
    return extra


def _in_setting(setting):
    """A context factory that runs under the harness setting ``setting`` (None: flashtile's defaults)."""
    if setting is None:
        return contextlib.nullcontext
    from benchmarks.harness import overridden

    return lambda: overridden(setting)


def _profiled_run(eng, prompts, max_new, system, dev, sync):
    """One run under torch.profiler; ``(result, {kernel: [calls, prefill-step us, decode-step us]})``. A kernel
    belongs to the step whose host range (record_function around the engine's prefill/decode call) began last
    before the kernel did: each step that samples ends with a host sync, so kernels rarely cross into the
    next step's range, and a prefill step without a finished request runs into the next prefill step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    def marked(kind, fn):
        def step(*a, **kw):
            with record_function(f"demo_step:{kind}"):
                return fn(*a, **kw)
        return step

    eng.prefill, eng.decode = marked("prefill", eng.prefill), marked("decode", eng.decode)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    try:
        with profile(activities=activities) as prof:
            res = eng.run(prompts, max_new, system)
            sync()
    finally:
        del eng.prefill, eng.decode  # the class's methods again
    events = prof.events()
    steps = sorted((e.time_range.start, e.name.split(":")[1]) for e in events if e.name.startswith("demo_step:"))
    starts = [t for t, _ in steps]
    kernels: dict = defaultdict(lambda: [0, 0.0, 0.0])
    want = DeviceType.CUDA if dev.type == "cuda" else DeviceType.CPU
    for e in events:
        if e.device_type != want or e.name.startswith("demo_step:") or (dev.type == "cpu" and e.cpu_parent is None):
            continue
        i = bisect.bisect_right(starts, e.time_range.start) - 1
        if i < 0:
            continue
        k = kernels[e.name]
        k[0] += 1
        k[1 if steps[i][1] == "prefill" else 2] += e.time_range.elapsed_us()
    return res, kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", default="flashtile,flashinfer")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", default="128:2048")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", default=None)
    ap.add_argument("--model", default="1b", choices=sorted(MODELS))
    ap.add_argument("--decode-tile", default=None, help="BN,WARPS,STAGES,PREFETCH(0/1): add flashtile with it")
    ap.add_argument("--hopper-stages", type=int, default=None, help="add flashtile with this Hopper K/V ring")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run (operators instead of kernels)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    cfg = MODELS[args.model]
    lo, hi = (int(v) for v in args.prompt_len.split(":"))
    prompts, max_new = make_requests(args.requests, (lo, hi), (args.new_tokens, args.new_tokens), cfg.vocab_size)
    system = system_prompt(256, cfg.vocab_size)
    weights = init_weights(cfg, dev, torch.bfloat16, max_position=256 + hi + args.new_tokens + 1)
    libs = [(name, name, None) for name in args.kernels.split(",")] + _setting_engines(args)
    engines, settings = {}, {}
    for name, module, setting in libs:
        try:
            lib = import_real_flashinfer() if module == "flashinfer" else importlib.import_module(module)
        except ImportError as e:
            print(f"{name}: not importable ({e}); skipped")
            continue
        settings[name] = _in_setting(setting)
        with settings[name]():
            eng = PagedEngine(weights, lib, page_size=16, max_batch=args.requests, prefill_chunk=2048,
                              sampling=Sampling())
            eng.reserve(prompts, max_new, system)
            t0 = time.perf_counter()
            eng.capture_graphs()
            eng.run(prompts, [min(n, 2) for n in max_new], system)
        print(f"{name}: warm-up {time.perf_counter() - t0:.1f} s", flush=True)
        engines[name] = eng
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    report: dict = {"gpu": gpu, "runs": defaultdict(list), "kernels": {}}
    for _ in range(2):
        for name, eng in engines.items():
            sync()
            with settings[name]():
                report["runs"][name].append(_phases(eng.run(prompts, max_new, system)))
    print(f"\n{report['gpu']}; {args.requests} requests, prompts {lo}-{hi} after 256 shared, {args.new_tokens} new")
    print("| kernels | run | total s | TTFT median ms | prefill steps / s | decode steps / s | decode tok/s |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in report["runs"].items():
        for i, p in enumerate(runs):
            print(f"| {name} | {i + 1} | {p['total_s']:.3f} | {p['ttft_median_ms']:.1f} | {p['prefill_steps']} / "
                  f"{p['prefill_s']:.3f} | {p['decode_steps']} / {p['decode_s']:.3f} | {p['decode_tok_s']:.0f} |")
    for name, eng in engines.items():
        sync()
        with settings[name]():
            res, kernels = _profiled_run(eng, prompts, max_new, system, dev, sync)
        total = sum(sum(v[1:]) for v in kernels.values())
        groups: dict = defaultdict(lambda: [0.0, 0.0])
        for key, (_, pre, dec) in kernels.items():
            groups[group_of(key)][0] += pre
            groups[group_of(key)][1] += dec
        top = sorted(((k, *v) for k, v in kernels.items()), key=lambda r: -(r[2] + r[3]))[:args.top]
        report["kernels"][name] = dict(wall_s=res.total_s, gpu_busy_us=total, groups=dict(groups), top=top)
        print(f"\n## {name}: profiled run (host slowed by the profiler) {res.total_s:.3f} s, "
              f"kernels {total / 1e3:.1f} ms")
        print("| group | prefill steps ms | decode steps ms |\n|---|---|---|")
        for g, (pre, dec) in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
            print(f"| {g} | {pre / 1e3:.2f} | {dec / 1e3:.2f} |")
        print("| kernel | calls | prefill ms | decode ms | µs/call |\n|---|---|---|---|---|")
        for key, count, pre, dec in top:
            print(f"| {key[:100]} | {count} | {pre / 1e3:.2f} | {dec / 1e3:.2f} | {(pre + dec) / max(count, 1):.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
