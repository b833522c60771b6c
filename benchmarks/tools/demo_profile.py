"""Where the demo's time goes, per kernel library: the example engine (flashtile/examples/engine.py) at the
demo's issue size, timed twice per library (alternating, so that drift shows), then once under
torch.profiler: the GPU kernels by total time, grouped by what they do, beside the wall time of the prefill
and decode steps. The engines differ only in the library's kernels, so the rows that differ are the gap.

    python -m benchmarks.tools.demo_profile [--kernels flashtile,flashinfer] [--decode-tile BN,WARPS,STAGES,PREFETCH]
        [--json PATH] [--top 25]

--decode-tile adds an engine "flashtile[tile]": flashtile with that batch decode tile
(flashtile/_core/decode_tune.py's DecodeTile, set through the benchmark harness's override for every call
of that engine: graph capture, planning and replay alike).

CUDA only; FlashInfer where it imports (benchmarks/gpu/*.sh source .fi-ref/device_env.sh first).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import statistics
import time
from collections import defaultdict

import torch

from flashtile.examples.engine import PagedEngine, Sampling
from flashtile.examples.model import MODELS, init_weights, make_requests, system_prompt

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


def _tile_setting(tile):
    """A context factory that runs under the batch decode tile ``tile`` (none: the card's table)."""
    if tile is None:
        return contextlib.nullcontext
    from benchmarks.bench_batch_decode import TILE
    from benchmarks.harness import overridden

    return lambda: overridden({TILE: tile})


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
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run (operators instead of kernels)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    cfg = MODELS[args.model]
    lo, hi = (int(v) for v in args.prompt_len.split(":"))
    prompts, max_new = make_requests(args.requests, (lo, hi), (args.new_tokens, args.new_tokens), cfg.vocab_size)
    system = system_prompt(256, cfg.vocab_size)
    weights = init_weights(cfg, dev, torch.bfloat16, max_position=256 + hi + args.new_tokens + 1)
    libs = [(name, name, None) for name in args.kernels.split(",")]
    if args.decode_tile:
        from flashtile._core.decode_tune import DecodeTile

        bn, warps, stages, prefetch = (int(v) for v in args.decode_tile.split(","))
        libs.append((f"flashtile[{args.decode_tile}]", "flashtile", DecodeTile(bn, warps, stages, bool(prefetch))))
    engines, settings = {}, {}
    for name, module, tile in libs:
        try:
            lib = importlib.import_module(module)
        except ImportError as e:
            print(f"{name}: not importable ({e}); skipped")
            continue
        settings[name] = _tile_setting(tile)
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
    from torch.profiler import ProfilerActivity, profile

    for name, eng in engines.items():
        sync()
        activity = ProfilerActivity.CUDA if dev.type == "cuda" else ProfilerActivity.CPU
        with settings[name](), profile(activities=[activity]) as prof:
            res = eng.run(prompts, max_new, system)
            sync()
        kernels = defaultdict(lambda: [0, 0.0])
        for evt in prof.key_averages():
            us = evt.self_device_time_total if dev.type == "cuda" else evt.self_cpu_time_total
            if us > 0:
                kernels[evt.key][0] += evt.count
                kernels[evt.key][1] += us
        total = sum(v[1] for v in kernels.values())
        groups: dict = defaultdict(float)
        for key, (_, us) in kernels.items():
            groups[group_of(key)] += us
        report["kernels"][name] = dict(wall_s=res.total_s, gpu_busy_us=total, groups=dict(groups),
                                       top=sorted(((k, c, us) for k, (c, us) in kernels.items()),
                                                  key=lambda r: -r[2])[:args.top])
        print(f"\n## {name}: profiled run {res.total_s:.3f} s wall, kernels {total / 1e3:.1f} ms")
        print("| group | ms |\n|---|---|")
        for g, us in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"| {g} | {us / 1e3:.2f} |")
        print("| kernel | calls | ms | µs/call |\n|---|---|---|---|")
        for key, count, us in report["kernels"][name]["top"]:
            print(f"| {key[:110]} | {count} | {us / 1e3:.2f} | {us / max(count, 1):.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
