"""One benchmark harness for every per-area case file (``benchmarks/bench_*.py``).

A case file declares only cases and providers and registers a :class:`Suite`::

    register(Suite("single_decode", cases=decode_cases, providers=[...], metric="gbps"))

The harness times every (case, provider) pair in one process and writes, into an output folder:

- ``<suite>.jsonl``: one record per case x provider (times in us, TFLOP/s, GB/s, first-call
  seconds, max abs difference to the first provider's output, GPU, versions, timestamp);
- ``<suite>.md`` (and all suites in ``results.md``): one row per case, one column per provider,
  and a "flashtile / best baseline" speedup column (> 1 means flashtile is faster);
- ``<suite>.png``: grouped bars of the suite's metric (skipped when matplotlib is missing).

Timing. On CUDA: ``triton.testing.do_bench`` (cold L2: it flushes a 256 MB buffer before each
run; CUDA events; p20/p50/p80). Kernels under 100 us are timed as CUDA-graph replays (``--cuda-graph
auto``): the graph holds ``graph_calls`` back-to-back calls so that event resolution is amortized
(only the first call of a replay sees a cold L2), and the time is divided by that count. Without
CUDA: host wall clock (``time.perf_counter``), median over a few runs, so ``--smoke`` runs on CPU.

``--graph-span-us`` sets how long one replay should take (default 10 us, so a 4 us kernel gets 3
calls). do_bench's L2 flush writes 256 MB just before each replay, so the first call of a replay
also pays for writing that dirty L2 back, and the replay's own launch latency is shared by only a
few calls. A long span (e.g. 1000 us: hundreds of calls) measures the steady state of back-to-back
calls instead: launch and flush costs vanish, and inputs that fit in the 50 MB L2 stay there, as
they do when an op runs in a loop over one buffer. Report which mode a table used.

Run: ``python benchmarks/run.py --suite single_decode --out DIR [--smoke] [--filter S]
[--providers a,b]``, or ``benchmarks.harness.run_suites(...)`` from Python.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import pathlib
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from flashtile._core.graphs import capture_graph

__all__ = [
    "Case",
    "Provider",
    "Suite",
    "Unavailable",
    "register",
    "SUITES",
    "device",
    "first_call_seconds",
    "measure",
    "run_suite",
    "run_suites",
    "main",
]

FLASHTILE = "flashtile"  # the provider whose speedup over the best baseline is reported
GRAPH_BELOW_US = 100.0  # --cuda-graph auto: replay graphs for kernels faster than this
GRAPH_TARGET_US = 10.0  # calls per graph replay: enough to span about this long (--graph-span-us)
MAX_GRAPH_CALLS = 1024  # bounds the graph (outputs allocated per call live in its memory pool)


class Unavailable(Exception):
    """Raised by ``Provider.make`` (or the first call) when a provider cannot run a case; the
    message is recorded as the reason (FlashInfer not importable, backend lacks the head_dim, ...)."""


@dataclass
class Case:
    """One shape to time. ``flops`` and ``bytes`` come from the actual lengths of the case."""

    name: str
    params: Dict[str, Any]
    flops: float = 0.0
    bytes: float = 0.0


@dataclass
class Provider:
    """``make(case)`` builds inputs (outside the timed region) and returns a zero-argument callable
    that runs the op once; the callable's return value (a tensor in the case's canonical layout, or
    None) is compared across providers. ``make`` may also return ``(fn, note)``; it raises
    :class:`Unavailable` when the provider cannot run the case."""

    name: str
    make: Callable[[Case], Any]
    baseline: bool = True  # False: a reference line (e.g. a copy of the same bytes), not in the speedup column


@dataclass
class Suite:
    """``cases(smoke)`` returns the cases; ``metric`` ("gbps" or "tflops") fills the table and plot."""

    name: str
    cases: Callable[[bool], List[Case]]
    providers: List[Provider]
    metric: str = "gbps"
    description: str = ""
    ceiling: Optional[float] = None  # drawn as a line on the plot (e.g. the measured copy bandwidth)
    cuda_graph: Optional[str] = None  # the suite's timing mode when the caller gives none ("auto" otherwise)
    graph_span_us: Optional[float] = None  # likewise (GRAPH_TARGET_US otherwise)


SUITES: Dict[str, Suite] = {}


def register(suite: Suite) -> Suite:
    if suite.metric not in ("gbps", "tflops"):
        raise ValueError(f"Suite {suite.name!r}: metric must be 'gbps' or 'tflops', got {suite.metric!r}")
    SUITES[suite.name] = suite
    return suite


def load_case_files() -> None:
    """Import every ``benchmarks/bench_*.py`` so that its suites register themselves."""
    for path in sorted(pathlib.Path(__file__).parent.glob("bench_*.py")):
        importlib.import_module(f"{__package__ or 'benchmarks'}.{path.stem}")


def import_flashinfer(*submodules: str):
    """FlashInfer (and its ``submodules``, e.g. "sampling") for a baseline provider, or
    :class:`Unavailable` when it is not importable or there is no CUDA device."""
    import importlib

    try:
        lib = importlib.import_module("flashinfer")
        for name in submodules:
            importlib.import_module(f"flashinfer.{name}")
    except Exception as e:
        raise Unavailable(f"flashinfer is not importable ({type(e).__name__})")
    if not torch.cuda.is_available():
        raise Unavailable("FlashInfer needs CUDA")
    return lib


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _first_call(fn: Callable[[], Any]):
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t0, out


def first_call_seconds(fn: Callable[[], Any]) -> float:
    """Host-clock seconds of ``fn``'s first call (compile + run), synchronized on both sides."""
    return _first_call(fn)[0]


def host_overhead_us(fn: Callable[[], Any], calls: int = 300) -> float:
    """Wall microseconds per call of ``calls`` back-to-back eager calls (after 10 warm-up calls),
    synchronized at both ends: the host cost when the GPU work is negligible (launch-bound)."""
    for _ in range(10):
        fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync()
    return (time.perf_counter() - t0) / calls * 1e6


def cuda_graph_replay(fn: Callable[[], Any], calls: int) -> Callable[[], None]:
    """Capture ``calls`` back-to-back calls of ``fn`` in one CUDA graph (after 3 warm-up calls);
    returns its replay."""
    return capture_graph(fn, calls=calls, warmup=3)[0].replay


def _quantiles_us(samples_s: Sequence[float]):
    xs = sorted(samples_s)

    def q(p: float) -> float:  # linear interpolation, like torch.quantile
        pos = p * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return (xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)) * 1e6

    return q(0.5), q(0.2), q(0.8)


def measure(fn: Callable[[], Any], *, cuda_graph: str = "auto", smoke: bool = False,
            warmup_ms: float = 25, rep_ms: float = 100, graph_span_us: float = GRAPH_TARGET_US) -> Dict[str, Any]:
    """Time ``fn``. Returns ``median_us``, ``p20_us``, ``p80_us``, ``timing`` (how it was timed),
    ``graph_calls`` and, when graph capture failed, ``note``. ``cuda_graph``: "auto", "on", "off";
    ``graph_span_us``: the length of one graph replay, which sets the calls per graph."""
    if not torch.cuda.is_available():
        fn()  # warm
        reps = 3 if smoke else 10
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        med, p20, p80 = _quantiles_us(samples)
        return dict(median_us=med, p20_us=p20, p80_us=p80, timing="cpu_wall", graph_calls=0)

    from triton.testing import do_bench

    if smoke:
        warmup_ms, rep_ms = 5, 20
    quantiles = [0.5, 0.2, 0.8]
    med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=quantiles)
    result = dict(median_us=med * 1e3, p20_us=p20 * 1e3, p80_us=p80 * 1e3, timing="cuda_events", graph_calls=0)
    if cuda_graph == "off" or (cuda_graph == "auto" and result["median_us"] >= GRAPH_BELOW_US):
        return result
    calls = max(1, min(MAX_GRAPH_CALLS, math.ceil(graph_span_us / max(result["median_us"], 1e-3))))
    try:
        replay = cuda_graph_replay(fn, calls)
    except Exception as e:  # e.g. the op synchronizes or allocates on the host path
        torch.cuda.synchronize()
        result["note"] = f"CUDA-graph capture failed, timed eagerly: {type(e).__name__}: {_short(e)}"
        return result
    med, p20, p80 = do_bench(replay, warmup=warmup_ms, rep=rep_ms, quantiles=quantiles)
    scale = 1e3 / calls
    return dict(median_us=med * scale, p20_us=p20 * scale, p80_us=p80 * scale, timing="cuda_graph",
                graph_calls=calls)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def environment() -> Dict[str, Any]:
    import triton

    cpu = f"CPU ({platform.processor() or platform.machine()})"
    env = dict(
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else cpu,
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
    )
    try:
        import flashinfer

        env["flashinfer"] = getattr(flashinfer, "__version__", "unknown")
    except Exception:
        env["flashinfer"] = None
    return env


def _max_abs_diff(out: Any, ref: Any) -> Optional[float]:
    if not (isinstance(out, torch.Tensor) and isinstance(ref, torch.Tensor)) or out.shape != ref.shape:
        return None
    return (out.float() - ref.float()).abs().max().item()


def run_suite(suite: Suite, *, smoke: bool = False, filter: Optional[str] = None,
              providers: Optional[Sequence[str]] = None, cuda_graph: Optional[str] = None,
              graph_span_us: Optional[float] = None, log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """Time every case of ``suite`` whose name contains ``filter`` with every provider named in
    ``providers`` (all when None). ``cuda_graph`` / ``graph_span_us``: None takes the suite's
    choice, then the harness default. Returns the records (one per case x provider)."""
    cuda_graph = cuda_graph or suite.cuda_graph or "auto"
    graph_span_us = graph_span_us or suite.graph_span_us or GRAPH_TARGET_US
    env = environment()
    chosen = [p for p in suite.providers if providers is None or p.name in providers]
    records = []
    for case in suite.cases(smoke):
        if filter and filter not in case.name:
            continue
        ref = ref_name = None
        for prov in chosen:
            rec = dict(suite=suite.name, case=case.name, params=case.params, provider=prov.name,
                       flops=case.flops, bytes=case.bytes, smoke=smoke, graph_span_us=graph_span_us, **env,
                       timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
            made = fn = out = None
            try:
                torch.manual_seed(0)  # every provider of a case sees the same random inputs
                made = prov.make(case)
                fn, note = made if isinstance(made, tuple) else (made, None)
                if note:
                    rec["note"] = note
                rec["first_call_s"], out = _first_call(fn)
                timing = measure(fn, cuda_graph=cuda_graph, smoke=smoke, graph_span_us=graph_span_us)
                if "note" in timing:
                    rec["note"] = "; ".join(n for n in (rec.get("note"), timing.pop("note")) if n)
                rec.update(timing, status="ok")
                sec = rec["median_us"] * 1e-6
                rec["tflops"] = case.flops / sec / 1e12 if case.flops else None
                rec["gbps"] = case.bytes / sec / 1e9 if case.bytes else None
                if ref is None and isinstance(out, torch.Tensor):
                    ref, ref_name = out, prov.name
                else:
                    rec["max_abs_diff"], rec["diff_ref"] = _max_abs_diff(out, ref), ref_name
            except Unavailable as e:
                rec.update(status="unavailable", reason=_short(e))
            except Exception as e:  # one broken provider must not stop a long run
                rec.update(status="error", reason=f"{type(e).__name__}: {_short(e)}")
            finally:
                del made, fn, out  # free this provider's inputs before the next one builds its own
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            records.append(rec)
            log(f"[{suite.name}] {case.name:<44} {prov.name:<18} {_cell(rec, suite.metric)}")
        del ref
    return records


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

_METRIC = {"gbps": "GB/s", "tflops": "TFLOP/s"}


def _cell(rec: Dict[str, Any], metric: str) -> str:
    if rec["status"] != "ok":
        return "—"
    us = rec["median_us"]
    text = f"{us:.1f} µs" if us < 1e4 else f"{us / 1e3:.2f} ms"
    value = rec.get(metric)
    if value is not None:
        text += f", {value:.0f}" if value >= 10 else f", {value:.3g}"
        text += " " + _METRIC[metric]
    return text


def _speedup(recs: Dict[str, Dict[str, Any]], not_baselines=frozenset()) -> str:
    mine = recs.get(FLASHTILE)
    base = [r for name, r in recs.items() if name != FLASHTILE and name not in not_baselines and r["status"] == "ok"]
    if not mine or mine["status"] != "ok" or not base:
        return "—"
    best = min(base, key=lambda r: r["median_us"])
    return f"{best['median_us'] / mine['median_us']:.2f}× ({best['provider']})"


def _graph_mode(records: List[Dict[str, Any]]) -> str:
    calls = sorted({r["graph_calls"] for r in records if r.get("timing") == "cuda_graph"})
    if not calls:
        return ""
    span = records[0].get("graph_span_us", GRAPH_TARGET_US)
    return f" CUDA-graph rows: replays of about {span:g} µs ({calls[0]}–{calls[-1]} calls each)."


def markdown_table(suite: Suite, records: List[Dict[str, Any]]) -> str:
    """One row per case, one column per provider, then the flashtile / best baseline speedup."""
    names = [p.name for p in suite.providers if any(r["provider"] == p.name for r in records)]
    not_baselines = frozenset(p.name for p in suite.providers if not p.baseline)
    by_case: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for r in records:
        by_case.setdefault(r["case"], {})[r["provider"]] = r
    env = records[0] if records else environment()
    lines = [
        f"## {suite.name}" + (f": {suite.description}" if suite.description else ""),
        "",
        f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}"
        + (f", flashinfer {env['flashinfer']}" if env.get("flashinfer") else "")
        + f". Median time (p20, p80 and timing mode in the JSON lines), {_METRIC[suite.metric]}."
        + _graph_mode(records)
        + " Speedup = best baseline time / flashtile time (> 1: flashtile is faster).",
        "",
        "| case | " + " | ".join(names) + " | flashtile / best baseline |",
        "|---" * (len(names) + 2) + "|",
    ]
    for case, recs in by_case.items():
        cells = [_cell(recs[n], suite.metric) if n in recs else "" for n in names]
        lines.append(f"| {case} | " + " | ".join(cells) + f" | {_speedup(recs, not_baselines)} |")
    skipped = sorted({(r["provider"], r["status"], r["reason"]) for r in records if r["status"] != "ok"})
    notes = sorted({(r["provider"], r["note"]) for r in records if r.get("note")})
    if skipped or notes:
        lines += ["", "Not run / notes:", ""]
        lines += [f"- {p} ({s}): {reason}" for p, s, reason in skipped]
        lines += [f"- {p}: {note}" for p, note in notes]
    return "\n".join(lines) + "\n"


def plot(suite: Suite, records: List[Dict[str, Any]], path: pathlib.Path) -> Optional[pathlib.Path]:
    """Grouped bars of the suite's metric per case and provider; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"[{suite.name}] matplotlib is not installed: no plot written")
        return None
    ok = [r for r in records if r["status"] == "ok" and r.get(suite.metric) is not None]
    cases = list(dict.fromkeys(r["case"] for r in records))
    names = [p.name for p in suite.providers if any(r["provider"] == p.name for r in ok)]
    value = {(r["case"], r["provider"]): r[suite.metric] for r in ok}
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(cases) + 2), 4.5))
    for i, name in enumerate(names):
        xs = [c + (i - (len(names) - 1) / 2) * width for c in range(len(cases))]
        ax.bar(xs, [value.get((case, name), 0.0) for case in cases], width, label=name)
    if suite.ceiling:
        ax.axhline(suite.ceiling, linestyle="--", color="black", linewidth=1, label=f"ceiling {suite.ceiling:g}")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(_METRIC[suite.metric])
    ax.set_title(f"{suite.name} ({ok[0]['gpu'] if ok else 'no results'})")
    if names:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(suite: Suite, records: List[Dict[str, Any]], out_dir: pathlib.Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{suite.name}.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    table = markdown_table(suite, records)
    (out_dir / f"{suite.name}.md").write_text(table)
    plot(suite, records, out_dir / f"{suite.name}.png")
    return table


def run_suites(names: Sequence[str], out_dir, smoke: bool = False, filter: Optional[str] = None,
               providers: Optional[Sequence[str]] = None, cuda_graph: Optional[str] = None,
               graph_span_us: Optional[float] = None) -> str:
    """Run the named suites ("all" for every registered one), write ``<suite>.jsonl/.md/.png`` and
    ``results.md`` into ``out_dir``, and return the markdown of all suites."""
    load_case_files()
    if isinstance(names, str):
        names = [names]
    names = list(SUITES) if "all" in names else list(names)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise ValueError(f"Unknown suite(s) {unknown}; registered: {sorted(SUITES)}")
    if isinstance(providers, str):
        providers = [p for p in providers.split(",") if p]
    out_dir = pathlib.Path(out_dir)
    tables = []
    for name in names:
        records = run_suite(SUITES[name], smoke=smoke, filter=filter, providers=providers, cuda_graph=cuda_graph,
                            graph_span_us=graph_span_us)
        tables.append(write_outputs(SUITES[name], records, out_dir))
    markdown = "\n".join(tables)
    (out_dir / "results.md").write_text(markdown)
    return markdown


def main(argv: Optional[Sequence[str]] = None) -> int:
    load_case_files()
    parser = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", action="append",
                        help=f"suite name(s), comma-separated or repeated, or 'all' (default); one of {', '.join(SUITES)}")
    parser.add_argument("--out", default="bench_out", help="output folder (default: bench_out)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few repetitions (runs on CPU in seconds)")
    parser.add_argument("--filter", default=None, help="only cases whose name contains this substring")
    parser.add_argument("--providers", default=None, help="comma-separated provider names (default: all)")
    parser.add_argument("--cuda-graph", choices=["auto", "on", "off"], default=None,
                        help=f"time CUDA-graph replays: auto = for kernels under {GRAPH_BELOW_US:.0f} us "
                             "(default: the suite's choice, else auto)")
    parser.add_argument("--graph-span-us", type=float, default=None,
                        help=f"length of one graph replay, which sets the calls per graph (default: the suite's "
                             f"choice, else {GRAPH_TARGET_US:g}; 1000 times the steady state of back-to-back calls)")
    parser.add_argument("--list", action="store_true", help="list suites, cases and providers, then exit")
    args = parser.parse_args(argv)
    suites = [s for arg in (args.suite or ["all"]) for s in arg.split(",") if s]
    if args.list:
        for name in (list(SUITES) if "all" in suites else suites):
            suite = SUITES[name]
            print(f"{name} ({suite.metric}): providers {', '.join(p.name for p in suite.providers)}")
            for case in suite.cases(args.smoke):
                print(f"  {case.name}")
        return 0
    print(run_suites(suites, args.out, smoke=args.smoke, filter=args.filter, providers=args.providers,
                     cuda_graph=args.cuda_graph, graph_span_us=args.graph_span_us))
    return 0


if __name__ == "__main__":  # run as benchmarks.harness, so that case files register into this module
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    from benchmarks.harness import main as _main

    sys.exit(_main())
