"""``python -m flashtile demo``: the example engine serving random requests, checked and timed.

Serves the same requests with :class:`~flashtile.examples.engine.PagedEngine` (the kernel library) and
the plain PyTorch :class:`~flashtile.examples.reference.ReferenceEngine`, prints a table (time to first
token, decode tokens/s) and a correctness line, and exits 1 when a greedy divergence exceeds the model's
rounding noise. With ``--tp N`` under ``torchrun --nproc-per-node N`` (or ``python -m
flashtile.examples.parallel --nproc N``) the paged engine runs tensor-parallel over N ranks
(:mod:`flashtile.examples.parallel`); rank 0 prints, runs the PyTorch engine and the check, and adds a
per-rank table with the share of step time spent in collectives.

The check: the PyTorch engine runs teacher-forced with the tokens the kernel engine chose, so both see
the same sequences; at every generated token it records whether its own greedy choice differs and by how
much (the gap between its best logit and its logit of the forced token). The rounding noise is measured,
not assumed: the first-token logits of both engines against a float32 run of the PyTorch engine (max
absolute difference over a few requests). Two checks fail the run (exit code 1):

- the paged engine's logit error is more than 4 times the PyTorch engine's (both in the run's dtype): its
  kernels lose more precision than rounding to that dtype explains;
- a greedy divergence whose gap exceeds twice the two measured errors together: two engines whose logits
  are each within their error of the exact ones cannot disagree by more than the sum, so a larger gap is
  not a near-tie.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Dict, List, Tuple

import torch

from . import parallel
from .engine import PagedEngine, RunResult, Sampling
from .model import MODELS, init_weights, make_requests, system_prompt
from .reference import ReferenceEngine

# (model, requests, prompt lengths, new tokens, system prompt, page size, prefill chunk) per device type
DEFAULTS: Dict[str, Dict[str, Any]] = {
    "cpu": dict(model="tiny", requests=4, prompt_len="8:48", new_tokens="4:16", system_len=18, page_size=4,
                prefill_chunk=32),
    "cuda": dict(model="1b", requests=16, prompt_len="128:1024", new_tokens="32:64", system_len=256,
                 page_size=16, prefill_chunk=2048),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
NOISE_REQUESTS = 4   # requests whose first-token logits are recomputed in float32
NOISE_FACTOR = 2.0   # a divergence is a near-tie when its gap is at most this times the two measured errors
ERROR_FACTOR = 4.0   # the paged engine's logit error may be at most this times the PyTorch engine's


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=sorted(MODELS), default=None,
                   help="model size (default: 1b on a GPU, tiny on CPU)")
    p.add_argument("--requests", type=int, default=None, help="number of requests (default 16 GPU, 4 CPU)")
    p.add_argument("--prompt-len", default=None, help="prompt lengths LO:HI or N (default 128:1024 GPU, 8:48 CPU)")
    p.add_argument("--new-tokens", default=None, help="tokens generated per request LO:HI or N "
                                                       "(default 32:64 GPU, 4:16 CPU)")
    p.add_argument("--system-len", type=int, default=None,
                   help="shared system prompt tokens (default 256 GPU, 18 CPU; 0: none)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="requests served at once (default: half the requests, at least 1)")
    p.add_argument("--page-size", type=int, default=None, help="KV page size (default 16 GPU, 4 CPU)")
    p.add_argument("--prefill-chunk", type=int, default=None, help="most prefill tokens per step")
    p.add_argument("--device", default="auto", help="auto (default: cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="model dtype (default bf16)")
    p.add_argument("--sample", action="store_true",
                   help="top-k/top-p sampling instead of greedy (tokens are then random: no token check)")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--kernels", choices=["flashtile", "flashinfer"], default="flashtile",
                   help="kernel library of the paged engine (flashinfer: where FlashInfer is installed)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on a GPU")
    p.add_argument("--no-reference", action="store_true", help="skip the PyTorch engine (and the check)")
    p.add_argument("--plot", metavar="PNG", default=None, help="write a plot of per-step latency (needs matplotlib)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the requests")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks (run under torchrun --nproc-per-node N, or python -m "
                        "flashtile.examples.parallel --nproc N; NCCL and cuda:LOCAL_RANK on GPUs, gloo on CPU)")


def _range(name: str, text: str) -> Tuple[int, int]:
    try:
        lo_text, _, hi_text = text.partition(":")
        lo, hi = int(lo_text), int(hi_text or lo_text)
    except ValueError:
        raise ValueError(f"{name}: expected N or LO:HI, got {text!r}") from None
    if lo < 1 or hi < lo:
        raise ValueError(f"{name}: expected 1 <= LO <= HI, got {text!r}")
    return lo, hi


class Progress:
    """A one-line progress bar on stderr (redrawn at most ten times a second)."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self.t0 = self.shown = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.shown > 0.1 or self.done >= self.total:
            self.shown = now
            self._draw(now)

    def _draw(self, now: float, end: str = "") -> None:
        width = 28
        fill = int(width * self.done / max(self.total, 1))
        line = (f"{self.label:<24} [{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} tokens "
                f"{now - self.t0:5.1f}s")
        if self.tty:
            print("\r" + line, end=end, file=sys.stderr, flush=True)
        elif end:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        self._draw(time.perf_counter(), end="\n")


def _summary(r: RunResult, prompt_tokens: int) -> dict:
    ttft = sorted(r.ttft_s.values())
    dec = [s for s in r.steps if s.kind == "decode"]
    dec_tokens, dec_s = sum(s.tokens for s in dec), sum(s.seconds for s in dec)
    return dict(requests=len(r.outputs), prompt_tokens=prompt_tokens,
                prefilled_tokens=sum(s.tokens for s in r.steps if s.kind == "prefill"),
                generated_tokens=sum(len(o) for o in r.outputs.values()),
                ttft_median_ms=1e3 * statistics.median(ttft), ttft_max_ms=1e3 * ttft[-1],
                decode_tokens_per_s=dec_tokens / dec_s if dec_s else float("nan"),
                decode_steps=len(dec), total_s=r.total_s)


def _table(rows: List[Tuple[str, dict]]) -> str:
    head = ("engine", "requests", "prompt tok", "prefilled", "generated", "TTFT median", "TTFT max",
            "decode tok/s", "total")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in rows:
        cells = (name, s["requests"], s["prompt_tokens"], s["prefilled_tokens"], s["generated_tokens"],
                 f"{s['ttft_median_ms']:.1f} ms", f"{s['ttft_max_ms']:.1f} ms", f"{s['decode_tokens_per_s']:.0f}",
                 f"{s['total_s']:.2f} s")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _plot(path: str, runs: List[Tuple[str, RunResult]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    for name, r in runs:
        xs = range(len(r.steps))
        ax.plot(xs, [1e3 * s.seconds for s in r.steps], label=name, linewidth=1)
        pre = [(i, 1e3 * s.seconds) for i, s in enumerate(r.steps) if s.kind == "prefill"]
        if pre:
            ax.scatter([i for i, _ in pre], [ms for _, ms in pre], s=12, marker="^")
    ax.set_xlabel("engine step (triangles: prefill steps)")
    ax.set_ylabel("step latency (ms)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: no CUDA device is available here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}")
    return device


def _kernels(name: str):
    if name == "flashinfer":
        from ..shim import import_real_flashinfer

        try:
            return import_real_flashinfer()
        except ImportError as e:
            raise SystemExit(f"--kernels flashinfer: {e}") from e
    import flashtile
    return flashtile


def run(args: argparse.Namespace) -> int:
    """The demo; returns the exit code (0 pass, 1 a divergence beyond noise, 2 bad arguments)."""
    try:
        device = _device(args.device)
        d = DEFAULTS[device.type]
        model = args.model or d["model"]
        num = d["requests"] if args.requests is None else args.requests
        prompt_lens = _range("--prompt-len", args.prompt_len or d["prompt_len"])
        new_tokens = _range("--new-tokens", args.new_tokens or d["new_tokens"])
        system_len = d["system_len"] if args.system_len is None else args.system_len
        page_size = args.page_size or d["page_size"]
        chunk = args.prefill_chunk or d["prefill_chunk"]
        max_batch = args.max_batch or max(1, num // 2)
        if num < 1 or max_batch < 1 or page_size < 1 or chunk < 1 or system_len < 0:
            raise ValueError("--requests, --max-batch, --page-size and --prefill-chunk must be >= 1, "
                             "--system-len >= 0")
        if args.plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise ValueError("--plot needs matplotlib (pip install matplotlib)") from None
        kernels = _kernels(args.kernels)
        parallel.check_divisible(MODELS[model], args.tp)
        world = parallel.world_size()
        if args.tp != world:
            raise ValueError(f"--tp {args.tp}: {world} process(es) here; run torchrun --nproc-per-node {args.tp} "
                             f"-m flashtile demo --tp {args.tp} (or python -m flashtile.examples.parallel "
                             f"--nproc {args.tp})")
    except (ValueError, ImportError) as e:
        print(f"flashtile demo: error: {e}", file=sys.stderr)
        return 2
    group = None
    if args.tp > 1:
        group, device = parallel.init(device.type)
    with parallel.rank0_output(group):
        code = _serve(args, device, group, model, num, prompt_lens, new_tokens, system_len, page_size, chunk,
                      max_batch, kernels)
    return parallel.finish(code) if group is not None else code


def _serve(args, device, group, model, num, prompt_lens, new_tokens, system_len, page_size, chunk, max_batch,
           kernels) -> int:
    """The demo after argument checks (on every rank; only rank 0 prints and runs the PyTorch engine)."""
    dtype, cfg = DTYPES[args.dtype], MODELS[model]
    sampling = Sampling(greedy=not args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        seed=args.seed)
    prompts, max_new = make_requests(num, prompt_lens, new_tokens, cfg.vocab_size, args.seed)
    system = system_prompt(system_len, cfg.vocab_size, args.seed)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    import flashtile
    size = f"{cfg.num_params / 1e9:.2f}B" if cfg.num_params >= 1e9 else f"{cfg.num_params / 1e6:.1f}M"
    print(f"flashtile {flashtile.__version__} demo: a {size}-parameter Llama-architecture "
          f"model ({model}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_qo_heads}/{cfg.num_kv_heads} "
          f"heads of {cfg.head_dim}, vocab {cfg.vocab_size}), random weights (seed {args.seed}), {args.dtype}")
    tp = f"; tensor parallel over {group.size} ranks ({group.backend}, {device} on rank 0)" if group else ""
    print(f"device   {gpu}; kernels: {kernels.__name__}{tp}")
    print(f"requests {num}, prompts {prompt_lens[0]}-{prompt_lens[1]} tokens after a shared {system_len}-token "
          f"system prompt, {new_tokens[0]}-{new_tokens[1]} new tokens each; at most {max_batch} at once, "
          f"page size {page_size}, prefill chunk {chunk}; {'greedy' if sampling.greedy else 'top-k/top-p'} sampling")

    weights = init_weights(cfg, device, dtype, args.seed, max_position=system_len + prompt_lens[1] + new_tokens[1] + 1)
    kw = dict(page_size=page_size, max_batch=max_batch, prefill_chunk=chunk, sampling=sampling,
              cuda_graphs=not args.no_cuda_graphs)
    engine: PagedEngine
    if group is None:
        engine = PagedEngine(weights, kernels, **kw)
    else:
        engine = parallel.TensorParallelEngine(weights, group, kernels, **kw)
    engine.reserve(prompts, max_new, system)
    total_new = sum(max_new)
    runs: List[Tuple[str, RunResult]] = []
    if device.type == "cuda":  # compile the kernels and capture the decode graphs before timing
        t0 = time.perf_counter()
        engine.capture_graphs()
        engine.run(prompts, [min(n, 2) for n in max_new], system)
        print(f"warm-up  {time.perf_counter() - t0:.1f} s (Triton compile or cache load, {len(engine.graphs)} "
              "decode CUDA graphs captured)")
    bar = Progress(f"{engine.name} engine", total_new)
    if group is not None:
        group.reset()
    res = engine.run(prompts, max_new, system, keep_first_logits=True, progress=bar)
    bar.close()
    runs.append((f"{engine.name} (paged{f', TP {group.size}' if group else ''})", res))
    tp_lines, ranks = (parallel.report(engine, sum(s.seconds for s in res.steps))
                       if isinstance(engine, parallel.TensorParallelEngine) else ([], []))
    ref_res = None
    if not args.no_reference and (group is None or group.rank == 0):
        ref = ReferenceEngine(weights, max_batch=max_batch, prefill_chunk=chunk, sampling=sampling)
        if device.type == "cuda":
            ref.run(prompts, [min(n, 2) for n in max_new], system)
        bar = Progress("pytorch engine", total_new)
        ref_res = ref.run(prompts, max_new, system, forced=res.outputs, keep_first_logits=True, progress=bar)
        bar.close()
        runs.append(("pytorch (contiguous KV, SDPA)", ref_res))
    prompt_tokens = sum(len(p) + system_len for p in prompts)
    summaries = [(name, _summary(r, prompt_tokens)) for name, r in runs]
    print()
    print(_table(summaries))
    print("(TTFT: from the start of the run, all requests arriving at once; decode tok/s: generated tokens over "
          "the time of decode steps; prefilled: tokens the engine computed, the shared system prompt once for the "
          "paged engine)")
    print()
    if tp_lines:
        print("\n".join(tp_lines))
        print("(collectives: the all-reduces after attention and the MLP and the sampled tokens' broadcast; timed "
              "with perf_counter on CPU, CUDA events on GPU, where decode CUDA-graph replays are not timed)")
        print()
    code = 0
    check: Dict[str, Any] = {}
    if ref_res is not None:
        code, check = _check(weights, prompts, system, max_batch, chunk, sampling, res, ref_res)
    if group is not None and group.rank != 0:
        return code
    if args.plot:
        _plot(args.plot, runs)
        print(f"plot     {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=gpu, model=model, dtype=args.dtype, kernels=kernels.__name__,
                           requests=num, prompt_len=prompt_lens, new_tokens=new_tokens, system_len=system_len,
                           max_batch=max_batch, engines=dict(summaries), check=check, tp=args.tp, ranks=ranks), f,
                      indent=1)
    return code


def _check(weights, prompts, system, max_batch, chunk, sampling, res: RunResult,
           ref_res: RunResult) -> Tuple[int, dict]:
    """The correctness lines (see the module docstring); returns (exit code, facts for the JSON)."""
    k = min(NOISE_REQUESTS, len(prompts))
    ref32 = ReferenceEngine(weights.to(torch.float32), max_batch=k, prefill_chunk=chunk, sampling=sampling)
    exact = ref32.run(prompts[:k], [1] * k, system, keep_first_logits=True).first_logits
    noise = max(float((ref_res.first_logits[i] - exact[i]).abs().max()) for i in range(k))
    err = max(float((res.first_logits[i] - exact[i]).abs().max()) for i in range(k))
    scale = max(float(exact[i].abs().max()) for i in range(k))
    floor = 1e-4 * scale
    tol = max(NOISE_FACTOR * (noise + err), floor)
    print(f"logits   first token of {k} requests vs a float32 run of the PyTorch engine: max |error| "
          f"{err:.3g} (paged engine), {noise:.3g} (PyTorch engine, {weights.dtype}); "
          f"logits up to {scale:.3g}")
    if err > ERROR_FACTOR * noise + floor:
        print(f"FAIL: the paged engine's logit error is more than {ERROR_FACTOR:g} x the PyTorch engine's")
        return 1, dict(first_token_logit_error=err, reference_noise=noise)
    check = dict(first_token_logit_error=err, reference_noise=noise, tolerance=tol, compared=ref_res.compared,
                 mismatches=len(ref_res.mismatches))
    if not sampling.greedy:
        print("check    sampled tokens are random: no token comparison (run without --sample for it)")
        return 0, check
    beyond = [m for m in ref_res.mismatches if m[4] > tol]
    same = ref_res.compared - len(ref_res.mismatches)
    print(f"check    greedy tokens: {same} of {ref_res.compared} identical (the PyTorch engine teacher-forced "
          "with the paged engine's tokens)")
    if ref_res.mismatches:
        rid, i, own, forced, gap = min(ref_res.mismatches, key=lambda m: (m[0], m[1]))
        worst = max(m[4] for m in ref_res.mismatches)
        print(f"         {len(ref_res.mismatches)} differ; first: request {rid}, token {i}: paged engine {forced}, "
              f"PyTorch engine {own}, whose logit gap is {gap:.3g}; largest gap {worst:.3g}; "
              f"tolerance {tol:.3g} ({NOISE_FACTOR:g} x the two engines' measured errors)")
    if beyond:
        print(f"FAIL: {len(beyond)} divergences beyond rounding noise")
        return 1, check
    print("PASS: " + ("identical greedy tokens" if not ref_res.mismatches else
                      "every divergence is a near-tie within rounding noise"))
    return 0, check
