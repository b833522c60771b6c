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

Run: ``python -m benchmarks.run --suite single_decode --out DIR [--smoke] [--filter S]
[--providers a,b]``, or ``benchmarks.harness.run_suites(...)`` from Python.

Tuning. A suite may declare grids of launch constants (:class:`Tune`, :class:`Knob`);
``python -m benchmarks.run --suite X --tune [GRIDS]`` times each setting under :func:`overridden`
and prints each case's winner against the default (docs/benchmarks.md, "Tuning grids").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import itertools
import json
import math
import pathlib
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from flashtile._core.graphs import capture_graph

__all__ = [
    "Case",
    "Provider",
    "Suite",
    "Knob",
    "Tune",
    "grid",
    "overridden",
    "Unavailable",
    "register",
    "SUITES",
    "device",
    "first_call_seconds",
    "host_overhead_us",
    "wall_seconds",
    "cuda_graph_replay",
    "measure",
    "run_suite",
    "run_suites",
    "tune_suite",
    "run_tunes",
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
    tunes: Dict[str, "Tune"] = field(default_factory=dict)  # named grids that ``--tune`` times


@dataclass(frozen=True)
class Knob:
    """A launch constant that a tune setting replaces for the time of one measurement: the attribute
    ``attr`` of module ``module``, or, with ``key``, the entry ``key`` of that dict attribute."""

    module: str
    attr: str
    key: Any = None

    def __str__(self) -> str:
        return self.attr if self.key is None else f"{self.attr}[{self.key}]"


Setting = Dict[Knob, Any]  # the knobs a setting leaves out keep their values


@dataclass
class Tune:
    """A tuning grid of a suite. ``settings(case)`` lists the settings to time on a case (the harness
    adds the default, no knob changed, in front); ``cases`` picks the suite's cases to tune (all when
    None); ``rounds``: each setting is timed this many times, alternating with the others, and the
    median kept (clock drift then hits every setting alike)."""

    settings: Callable[[Case], List[Setting]]
    cases: Optional[Callable[[Case], bool]] = None
    provider: str = FLASHTILE
    rounds: int = 1
    description: str = ""
    cuda_graph: Optional[str] = None  # the grid's timing mode when the caller gives none (else the suite's)
    graph_span_us: Optional[float] = None  # likewise


def grid(**axes: Sequence[Any]) -> List[Dict[str, Any]]:
    """Every combination of the axes' values, as dicts: ``grid(a=(1, 2), b=(3,))`` gives
    ``[{"a": 1, "b": 3}, {"a": 2, "b": 3}]``."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*(axes[n] for n in names))]


def _clear_caches(modules: Sequence[Any]) -> None:
    """Forget what was derived from launch constants: the launch memos and the modules' cached
    config functions (functools caches)."""
    from flashtile._core.launch import clear_launch_memos

    clear_launch_memos()
    for module in modules:
        for value in vars(module).values():
            if callable(getattr(value, "cache_clear", None)) and getattr(value, "__module__", None) == module.__name__:
                value.cache_clear()


@contextlib.contextmanager
def overridden(setting: Setting):
    """Set the setting's knobs, then restore them (and clear the caches derived from them) on exit.
    This is the one way a benchmark changes flashtile's launch constants."""
    saved = []
    modules = []
    try:
        for knob, value in setting.items():
            module = importlib.import_module(knob.module)
            modules.append(module)
            if knob.key is None:
                saved.append((module, knob, getattr(module, knob.attr)))
                setattr(module, knob.attr, value)
            else:
                table = getattr(module, knob.attr)
                saved.append((table, knob, table[knob.key]))
                table[knob.key] = value
        _clear_caches(modules)
        yield
    finally:
        for owner, knob, value in reversed(saved):
            if knob.key is None:
                setattr(owner, knob.attr, value)
            else:
                owner[knob.key] = value
        _clear_caches(modules)


def setting_label(setting: Setting) -> str:
    if not setting:
        return "default"

    def text(value: Any) -> str:
        if dataclasses.is_dataclass(value):
            return "/".join(str(getattr(value, f.name)) for f in dataclasses.fields(value))
        return repr(value)

    return " ".join(f"{knob}={text(value)}" for knob, value in setting.items())


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
    from flashtile.shim import import_real_flashinfer

    try:
        lib = import_real_flashinfer(*submodules)
    except Exception as e:
        raise Unavailable(f"flashinfer is not importable ({type(e).__name__}: {e})") from e
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


def host_overhead_us(fn: Callable[[], Any], calls: int = 300, warmup: int = 10) -> float:
    """Wall microseconds per call of ``calls`` back-to-back eager calls (after ``warmup`` calls),
    synchronized at both ends: the host cost when the GPU work is negligible (launch-bound)."""
    for _ in range(warmup):
        fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync()
    return (time.perf_counter() - t0) / calls * 1e6


def wall_seconds(fn: Callable[[], Any], reps: int) -> List[float]:
    """Host wall seconds (``time.perf_counter``) of each of ``reps`` calls, without synchronizing."""
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


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
        med, p20, p80 = _quantiles_us(wall_seconds(fn, 3 if smoke else 10))
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

        from flashtile.shim import is_flashtile_shim

        env["flashinfer"] = None if is_flashtile_shim(flashinfer) else getattr(flashinfer, "__version__", "unknown")
    except Exception:
        env["flashinfer"] = None
    return env


def _max_abs_diff(out: Any, ref: Any) -> Optional[float]:
    if not (isinstance(out, torch.Tensor) and isinstance(ref, torch.Tensor)) or out.shape != ref.shape:
        return None
    return (out.float() - ref.float()).abs().max().item()


def case_selected(name: str, filter: Optional[str]) -> bool:
    """Whether a case named ``name`` passes ``--filter``: any of its ``|``-separated alternatives is a substring of
    the name; an alternative ending in ``$`` must end it ("64 x 4096 h32/8$" leaves out "64 x 4096 h32/8 page1")."""
    if not filter:
        return True
    return any(name.endswith(alt[:-1]) if alt.endswith("$") else alt in name for alt in filter.split("|"))


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
        if not case_selected(case.name, filter):
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


def _tune_case(suite: Suite, tune: Tune, case: Case, provider: Provider, *, cuda_graph: str, smoke: bool,
               graph_span_us: float, rounds: int, log: Callable[[str], None]) -> List[Dict[str, Any]]:
    """Time every setting of ``tune`` on ``case``; one record per setting, fastest first."""
    settings: List[Setting] = [{}] + list(tune.settings(case))
    times: Dict[int, List[float]] = {i: [] for i in range(len(settings))}
    failed: Dict[int, str] = {}
    for _ in range(rounds):
        for i, setting in enumerate(settings):
            if i in failed:
                continue
            made = fn = None
            try:
                with overridden(setting):
                    torch.manual_seed(0)
                    made = provider.make(case)
                    fn = made[0] if isinstance(made, tuple) else made
                    fn()
                    times[i].append(measure(fn, cuda_graph=cuda_graph, smoke=smoke,
                                            graph_span_us=graph_span_us)["median_us"])
            except Exception as e:  # e.g. a setting that needs more shared memory than the device has
                failed[i] = f"{type(e).__name__}: {_short(e, 120)}"
            finally:
                del made, fn
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    records = []
    for i, setting in enumerate(settings):
        rec: Dict[str, Any] = dict(suite=suite.name, case=case.name, setting=setting_label(setting),
                                   provider=provider.name)
        if i in failed:
            rec.update(status="error", reason=failed[i])
        else:
            us = statistics.median(times[i])
            work, unit = (case.bytes, 1e9) if suite.metric == "gbps" else (case.flops, 1e12)
            rec.update(status="ok", median_us=us, rounds_us=times[i],
                       **{suite.metric: work / (us * 1e-6) / unit if work else None})
        records.append(rec)
        log(f"[{suite.name} tune] {case.name:<40} {rec['setting']:<50} {_cell(rec, suite.metric)}")
    return sorted(records, key=lambda r: (r["status"] != "ok", r.get("median_us", 0.0)))


def tune_suite(suite: Suite, grid_names: Optional[Sequence[str]] = None, *, smoke: bool = False,
               filter: Optional[str] = None, cuda_graph: Optional[str] = None, graph_span_us: Optional[float] = None,
               rounds: Optional[int] = None, log: Callable[[str], None] = print) -> Dict[str, List[Dict[str, Any]]]:
    """Time the suite's tuning grids (``grid_names``; all when None) on their cases: per grid, the
    records of every (case, setting), each case's fastest first. ``rounds`` overrides the grids'."""
    if not suite.tunes:
        raise ValueError(f"Suite {suite.name!r} declares no tuning grid")
    names = list(suite.tunes) if not grid_names else list(grid_names)
    unknown = [n for n in names if n not in suite.tunes]
    if unknown:
        raise ValueError(f"Suite {suite.name!r} has no tuning grid {unknown}; grids: {sorted(suite.tunes)}")
    results = {}
    for name in names:
        tune = suite.tunes[name]
        mode = cuda_graph or tune.cuda_graph or suite.cuda_graph or "auto"
        span = graph_span_us or tune.graph_span_us or suite.graph_span_us or GRAPH_TARGET_US
        provider = next(p for p in suite.providers if p.name == tune.provider)
        records = []
        for case in suite.cases(smoke):
            if not case_selected(case.name, filter) or (tune.cases and not tune.cases(case)):
                continue
            for rec in _tune_case(suite, tune, case, provider, cuda_graph=mode, smoke=smoke, graph_span_us=span,
                                  rounds=rounds or tune.rounds, log=log):
                records.append(dict(rec, grid=name))
        results[name] = records
    return results


def tune_table(suite: Suite, name: str, records: List[Dict[str, Any]], top: int = 3) -> str:
    """Per case: the winner, its time against the default's, then the runners-up."""
    tune = suite.tunes[name]
    env = environment()
    lines = [f"## {suite.name} tune {name}" + (f": {tune.description}" if tune.description else ""), "",
             f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}. Median time, {_METRIC[suite.metric]}; "
             "default / best > 1: the winner is faster than today's default.", "",
             "| case | best setting | best | default | default / best | runners-up |", "|---|---|---|---|---|---|"]
    by_case: Dict[str, List[Dict[str, Any]]] = {}
    for r in records:
        by_case.setdefault(r["case"], []).append(r)
    for case, recs in by_case.items():
        ok = [r for r in recs if r["status"] == "ok"]
        default = next((r for r in recs if r["setting"] == "default"), None)
        if not ok:
            lines.append(f"| {case} | — | — | — | — | |")
            continue
        best = ok[0]
        ratio = f"{default['median_us'] / best['median_us']:.2f}×" if default and default["status"] == "ok" else "—"
        others = "; ".join(f"{r['setting']} {_cell(r, suite.metric)}" for r in ok[1:top])
        lines.append(f"| {case} | {best['setting']} | {_cell(best, suite.metric)} | "
                     f"{_cell(default, suite.metric) if default else '—'} | {ratio} | {others} |")
    failed = sorted({(r["setting"], r["reason"]) for r in records if r["status"] != "ok"})
    if failed:
        lines += ["", "Settings that did not run:", ""] + [f"- {setting}: {reason}" for setting, reason in failed]
    return "\n".join(lines) + "\n"


def run_tunes(name: str, grid_names: Optional[Sequence[str]], out_dir, **kwargs) -> str:
    """``tune_suite`` for one suite, writing ``<suite>.tune.jsonl`` and ``<suite>.tune.md`` into
    ``out_dir``; returns the markdown winner tables."""
    load_case_files()
    if name not in SUITES:
        raise ValueError(f"Unknown suite {name!r}; registered: {sorted(SUITES)}")
    suite = SUITES[name]
    results = tune_suite(suite, grid_names, **kwargs)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{name}.tune.jsonl", "w") as f:
        for records in results.values():
            for r in records:
                f.write(json.dumps(r) + "\n")
    markdown = "\n".join(tune_table(suite, grid_name, records) for grid_name, records in results.items())
    (out_dir / f"{name}.tune.md").write_text(markdown)
    return markdown


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
                        help="suite name(s), comma-separated or repeated, or 'all' (default); "
                             f"one of {', '.join(SUITES)}")
    parser.add_argument("--out", default="bench_out", help="output folder (default: bench_out)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few repetitions (runs on CPU in seconds)")
    parser.add_argument("--filter", default=None,
                        help="only cases whose name contains this substring (alternatives separated by '|'; one "
                             "ending in '$' must end the name)")
    parser.add_argument("--providers", default=None, help="comma-separated provider names (default: all)")
    parser.add_argument("--cuda-graph", choices=["auto", "on", "off"], default=None,
                        help=f"time CUDA-graph replays: auto = for kernels under {GRAPH_BELOW_US:.0f} us "
                             "(default: the suite's choice, else auto)")
    parser.add_argument("--graph-span-us", type=float, default=None,
                        help=f"length of one graph replay, which sets the calls per graph (default: the suite's "
                             f"choice, else {GRAPH_TARGET_US:g}; 1000 times the steady state of back-to-back calls)")
    parser.add_argument("--list", action="store_true", help="list suites, cases, providers and grids, then exit")
    parser.add_argument("--tune", nargs="?", const="all", default=None, metavar="GRIDS",
                        help="instead of comparing providers, time the suite's tuning grid(s) (comma-separated "
                             "names; all when none is given) on flashtile and print each case's winner")
    parser.add_argument("--rounds", type=int, default=None,
                        help="--tune: time each setting this many times, alternating, and keep the median")
    parser.add_argument("--decode-tile", default=None, metavar="BN,WARPS,STAGES,PREFETCH",
                        help="batch decode runs this tile (flashtile/_core/decode_tune.py's DecodeTile; PREFETCH 0 "
                             "or 1) instead of the card's table entry: to time a sweep's winner before it lands")
    args = parser.parse_args(argv)
    if args.decode_tile is not None:
        from benchmarks.tools import decode_tile
        from flashtile._core import decode_tune

        try:
            decode_tune.BATCH_DECODE_OVERRIDE = decode_tile.parse(args.decode_tile)
        except ValueError as e:
            parser.error(f"--decode-tile: {e}")
    suites = [s for arg in (args.suite or ["all"]) for s in arg.split(",") if s]
    if args.list:
        for name in (list(SUITES) if "all" in suites else suites):
            suite = SUITES[name]
            print(f"{name} ({suite.metric}): providers {', '.join(p.name for p in suite.providers)}"
                  + (f"; tuning grids {', '.join(suite.tunes)}" if suite.tunes else ""))
            for case in suite.cases(args.smoke):
                print(f"  {case.name}")
        return 0
    if args.tune is not None:
        if len(suites) != 1 or suites[0] == "all":
            parser.error("--tune takes exactly one --suite")
        grid_names = None if args.tune == "all" else [g for g in args.tune.split(",") if g]
        try:
            print(run_tunes(suites[0], grid_names, args.out, smoke=args.smoke, filter=args.filter,
                            cuda_graph=args.cuda_graph, graph_span_us=args.graph_span_us, rounds=args.rounds))
        except ValueError as e:
            parser.error(str(e))
        return 0
    print(run_suites(suites, args.out, smoke=args.smoke, filter=args.filter, providers=args.providers,
                     cuda_graph=args.cuda_graph, graph_span_us=args.graph_span_us))
    return 0
