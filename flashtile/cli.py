"""Command line: ``python -m flashtile <command>`` (also installed as the ``flashtile`` script).

Commands:
  info         versions, device, which path each API takes here, Triton cache, environment knobs
  demo         the example serving engine (flashtile/examples/) against a plain PyTorch engine,
               timed and checked (exit code 1 when a greedy divergence exceeds rounding noise)
  bench        the benchmark harness (``benchmarks/``, present in a source checkout only)
  warmup       compile the Triton kernel variants that model shapes need, before the first request
  clear-cache  delete Triton's on-disk kernel cache (prints what it would delete; ``--yes`` deletes)
  install-shim    write a ``flashinfer`` package (and flashinfer-python metadata) that resolves to
                  flashtile, for serving engines that ``import flashinfer``; refuses if FlashInfer is installed
  uninstall-shim  remove exactly what install-shim wrote

Only argparse and the standard library are used. Kernels compile on first use, so ``info`` and a
CPU ``demo`` compile nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ._core import settings
from ._core.checks import HALF_DTYPES, parse_dtype
from .jit.env import triton_cache_dir

__all__ = ["main", "ModelShape", "SHAPE_PRESETS", "check_close", "triton_cache_dir", "warmup_variants"]


# ---------------------------------------------------------------------------------------------
# Shapes and small helpers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """Attention heads of one model layer."""

    num_qo_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.num_qo_heads // self.num_kv_heads

    def __str__(self) -> str:
        return f"{self.num_qo_heads}/{self.num_kv_heads}/{self.head_dim}"


# Query heads / KV heads / head_dim of the attention layers of a few common models.
SHAPE_PRESETS: Dict[str, ModelShape] = {
    "llama3-8b": ModelShape(32, 8, 128),
    "llama3-70b": ModelShape(64, 8, 128),
    "mistral-7b": ModelShape(32, 8, 128),
    "qwen2-7b": ModelShape(28, 4, 128),
    "gemma2-9b": ModelShape(16, 8, 256),
}
DEMO_MODEL = ("Llama-3-8B", SHAPE_PRESETS["llama3-8b"])
DEMO_PROMPT_LEN = {"cuda": 4096, "cpu": 256}  # default prompt length per device type
DEMO_TOLERANCE = (2e-2, 2e-2)  # (atol, rtol) of a bf16/fp16 output against the float32 reference

SHORT_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16"}

def _parse_list(text: str) -> List[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _parse_shape(text: str) -> Tuple[str, ModelShape]:
    """A preset name (``llama3-8b``) or ``QO_HEADS/KV_HEADS/HEAD_DIM`` (``32/8/128``)."""
    key = text.strip().lower()
    if key in SHAPE_PRESETS:
        return key, SHAPE_PRESETS[key]
    parts = key.split("/")
    if len(parts) == 3 and all(p.isdigit() for p in parts):
        shape = ModelShape(*(int(p) for p in parts))
        if shape.num_kv_heads < 1 or shape.num_qo_heads % shape.num_kv_heads != 0:
            raise ValueError(f"shape {text!r}: query heads must be a positive multiple of KV heads")
        return key, shape
    raise ValueError(
        f"unknown shape {text!r}; expected a preset ({', '.join(SHAPE_PRESETS)}) or QO_HEADS/KV_HEADS/HEAD_DIM"
    )


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available (torch {torch.__version__})")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device {name}: expected auto, cpu or cuda[:N]")
    return device


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.multi_processor_count} SMs, sm_{props.major}{props.minor})"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _path_of(device: torch.device, backend: str = "auto") -> Tuple[str, str]:
    """(path, reason) that an attention call on ``device`` takes; errors are reported, not raised."""
    from ._core.dispatch import choose_path

    try:
        decision = choose_path(device, backend)
    except (ValueError, NotImplementedError) as e:
        return "error", str(e)
    return decision.path.value, decision.reason


def _format_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _dir_usage(path: pathlib.Path) -> Tuple[int, int]:
    """(number of files, total bytes) under ``path``."""
    files = size = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            try:
                size += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
            files += 1
    return files, size


def _format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# ---------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------


def _info() -> dict:
    import flashtile

    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # report, do not fail: info is what one runs when something is broken
        triton_version = f"not importable ({type(e).__name__}: {e})"
    devices = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append(dict(
                device=f"cuda:{index}", name=props.name, sm_count=props.multi_processor_count,
                compute_capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
            ))
    else:
        devices.append(dict(device="cpu", name=platform.processor() or platform.machine(),
                            threads=torch.get_num_threads()))
    attention_apis = ["single_decode_with_kv_cache", "single_prefill_with_kv_cache",
                      "single_prefill_with_kv_cache_return_lse"]
    paths = []
    tensor_devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    for dev in tensor_devices:
        path, reason = _path_of(torch.device(dev))
        paths += [dict(api=api, tensors=dev, path=path, reason=reason) for api in attention_apis]
        paths += [dict(api=api, tensors=dev, path="pytorch", reason="vectorized PyTorch on the input's device")
                  for api in ("packbits", "segment_packbits")]
    cache = triton_cache_dir()
    files, size = _dir_usage(cache) if cache.is_dir() else (0, 0)
    return dict(
        flashtile=flashtile.__version__,
        flashtile_location=str(pathlib.Path(flashtile.__file__).resolve().parent),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        triton=triton_version,
        python=platform.python_version(),
        platform=platform.platform(),
        cuda_available=torch.cuda.is_available(),
        devices=devices,
        paths=paths,
        triton_cache=dict(dir=str(cache), exists=cache.is_dir(), files=files, bytes=size),
        env={s.name: dict(text=settings.env(s.name), value=_setting_value(s.name), kind=s.kind, doc=s.doc)
             for s in settings.SETTINGS.values()},
    )


def _setting_value(name: str):
    """The value flashtile uses for setting ``name``, or the reason the text set is refused."""
    try:
        return settings.get(name)
    except ValueError as e:
        return f"invalid: {e}"


def cmd_info(args: argparse.Namespace) -> int:
    if args.readme:
        path = pathlib.Path(args.readme)
        path.write_text(settings.with_current_table(path.read_text()))
        return 0
    info = _info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"flashtile {info['flashtile']}  ({info['flashtile_location']})")
    print(f"torch     {info['torch']}" + (f" (CUDA {info['torch_cuda']})" if info["torch_cuda"] else " (no CUDA build)"))
    print(f"triton    {info['triton']}")
    print(f"python    {info['python']}  ({info['platform']})")
    print()
    print("device")
    for d in info["devices"]:
        if d["device"] == "cpu":
            print(f"  cpu       {d['name']}, {d['threads']} threads (no CUDA device)")
        else:
            print(f"  {d['device']:<9} {d['name']}, {d['sm_count']} SMs, compute capability "
                  f"{d['compute_capability']}, {d['memory_gib']} GiB")
    print()
    print("paths (FLASHTILE_BACKEND and backend= change them)")
    width = max(len(p["api"]) for p in info["paths"])
    for p in info["paths"]:
        print(f"  {p['api']:<{width}}  {p['tensors']} tensors -> {p['path']}: {p['reason']}")
    print()
    c = info["triton_cache"]
    state = f"{c['files']} files, {_format_bytes(c['bytes'])}" if c["exists"] else "does not exist yet"
    print(f"triton cache  {c['dir']}  ({state})")
    print()
    print("environment (flashtile/_core/settings.py; value: as set, else the default)")
    width = max(len(name) for name in info["env"])
    for name, e in info["env"].items():
        if e["text"] is not None:
            shown = repr(e["text"])
        else:
            shown = "unset" if e["value"] is None else f"unset: {e['value']}"
        print(f"  {name:<{width}}  {shown:<13} {e['kind']:<20} {e['doc'].replace('`', '')}")
    return 0


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first_call(fn: Callable[[], torch.Tensor], device: torch.device) -> Tuple[float, torch.Tensor]:
    """Host seconds of one call, synchronized on both sides (on a GPU: compile or cache load + run)."""
    _sync(device)
    t0 = time.perf_counter()
    result = fn()
    _sync(device)
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
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm up on a side stream, as capture requires
            fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        torch.cuda.synchronize(device)
    except Exception:
        torch.cuda.synchronize(device)
        return None
    return _median_seconds(graph.replay, device, reps) / calls


def cmd_demo(args: argparse.Namespace) -> int:
    from .examples import demo

    return demo.run(args)


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------


def _benchmarks_root() -> Optional[pathlib.Path]:
    """The source checkout that holds ``benchmarks/harness.py`` beside the flashtile package, if any."""
    root = pathlib.Path(__file__).resolve().parent.parent
    return root if (root / "benchmarks" / "harness.py").is_file() else None


def cmd_bench(args: argparse.Namespace) -> int:
    root = _benchmarks_root()
    if root is None:
        here = pathlib.Path(__file__).resolve().parent.parent
        print(f"flashtile bench: error: no benchmarks/ directory next to the flashtile package (in {here}). "
              "The benchmarks ship with the source tree, not the wheel: clone the repository and run "
              "`pip install -e .` there, or `python benchmarks/run.py` from the checkout.", file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.harness import run_suites

    suites = [s for arg in (args.suites or ["all"]) for s in _parse_list(arg)]
    try:
        markdown = run_suites(suites, args.out, smoke=args.smoke, filter=args.filter,
                              providers=args.providers, cuda_graph=args.cuda_graph)
    except ValueError as e:
        print(f"flashtile bench: error: {e}", file=sys.stderr)
        return 2
    print()
    print(markdown)
    print(f"results written to {pathlib.Path(args.out).resolve()} (<suite>.jsonl, <suite>.md, results.md, PNG plots)")
    return 0


# ---------------------------------------------------------------------------------------------
# warmup
# ---------------------------------------------------------------------------------------------

# Lengths of the warm-up calls. The calls use the model's real head counts: besides its constexprs
# (head_dim, group size, dtype, causal, split or not), Triton specializes integer arguments (strides,
# which depend on head counts, and lengths) on divisibility by 16. None of the lengths is a multiple
# of 16, like most real lengths; an aligned length (e.g. a 4096-token prompt) compiles one more
# variant on first use, which then sits in the on-disk cache like the others.
_WARMUP_SHORT = 200  # one KV split
_WARMUP_PREFILL_SPLIT = 1000  # split-KV prefill on a large GPU (the scheduler fills idle SMs)
_WARMUP_DECODE_SPLIT = 1999  # split-KV decode (flash-decoding) and the merge kernel


@dataclass
class WarmupVariant:
    label: str
    shape: ModelShape
    dtype: torch.dtype
    kind: str  # "prefill", "decode", "batch_decode", "batch_prefill" or "batch_append"
    causal: bool
    qo_len: int
    kv_len: int
    models: Tuple[str, ...]


def warmup_variants(shapes: Sequence[str], head_dims: Optional[Sequence[int]], dtypes: Sequence[str]) -> List[WarmupVariant]:
    """The kernel variants to compile for ``shapes`` (preset names or ``Hq/Hkv/D``) and ``dtypes``.

    Per (shape, dtype): causal and non-causal prefill, causal prefill with split-KV, decode,
    decode with split-KV (which also runs the merge kernel), and the batch wrappers over a paged
    cache of page size 16: decode, causal prefill and a 4-token append. ``head_dims`` replaces the shapes' own
    head dims (each is combined with every shape's head counts). Identical shapes are compiled once.
    """
    parsed = [_parse_shape(s) for s in shapes]
    if not parsed:
        raise ValueError("no shapes given")
    types = [parse_dtype("dtypes", t, HALF_DTYPES) for t in dtypes]
    if not types:
        raise ValueError("no dtypes given")
    keys: Dict[Tuple[ModelShape, torch.dtype], List[str]] = {}
    for name, shape in parsed:
        for d in (head_dims or [shape.head_dim]):
            if d % 8 != 0 or not 8 <= d <= 256:
                raise ValueError(f"head_dim {d}: flashtile supports multiples of 8 from 8 to 256")
            for dtype in types:
                models = keys.setdefault((ModelShape(shape.num_qo_heads, shape.num_kv_heads, d), dtype), [])
                if name not in models:
                    models.append(name)
    variants = []
    for (shape, dtype), models in keys.items():
        for kind, causal, qo_len, kv_len, what in (
            ("prefill", True, _WARMUP_SHORT, _WARMUP_SHORT, "prefill causal"),
            ("prefill", False, _WARMUP_SHORT, _WARMUP_SHORT, "prefill"),
            ("prefill", True, _WARMUP_PREFILL_SPLIT, _WARMUP_PREFILL_SPLIT, "prefill causal, split-KV"),
            ("decode", False, 1, _WARMUP_SHORT, "decode"),
            ("decode", False, 1, _WARMUP_DECODE_SPLIT, "decode, split-KV + merge"),
            ("batch_decode", False, 1, _WARMUP_DECODE_SPLIT, "batch decode, page 16"),
            ("batch_prefill", True, _WARMUP_PREFILL_SPLIT, _WARMUP_PREFILL_SPLIT, "batch prefill causal, page 16"),
            ("batch_append", True, 4, _WARMUP_DECODE_SPLIT, "batch append 4 tokens, page 16"),
        ):
            label = f"{shape} {SHORT_DTYPE[dtype]} {what}"
            variants.append(WarmupVariant(label, shape, dtype, kind, causal, qo_len, kv_len, tuple(models)))
    return variants


def _planned_splits(v: WarmupVariant, device: torch.device) -> Optional[int]:
    """KV splits the launcher will choose for a variant (best effort: None when unknown)."""
    try:
        from ._core import tile_policy
        from ._core.device import num_sms
        from .kernels import attention as kernels
        from .scheduler.split_kv import plan_kv_splits

        cfg = kernels.choose_config(v.kind, max(16, 1 << (v.shape.head_dim - 1).bit_length()))
        base_programs = -(-v.qo_len * v.shape.group // cfg.block_m) * v.shape.num_kv_heads
        return plan_kv_splits(v.kv_len, base_programs, num_sms(device), tile_policy.KV_CHUNK_ALIGN)[0]
    except Exception:
        return None


def _run_variant(v: WarmupVariant, device: torch.device) -> None:
    import flashtile

    hq, hkv, d = v.shape.num_qo_heads, v.shape.num_kv_heads, v.shape.head_dim
    kw = dict(dtype=v.dtype, device=device)
    k = torch.randn(v.kv_len, hkv, d, **kw)
    val = torch.randn(v.kv_len, hkv, d, **kw)
    if v.kind == "decode":
        flashtile.single_decode_with_kv_cache(torch.randn(hq, d, **kw), k, val)
    elif v.kind == "prefill":
        flashtile.single_prefill_with_kv_cache(torch.randn(v.qo_len, hq, d, **kw), k, val, causal=v.causal)
    else:  # batch wrappers over a paged cache (page 16) of two requests
        page_size, batch = 16, 2
        pages = -(-v.kv_len // page_size)
        cache = torch.randn(batch * pages, 2, page_size, hkv, d, **kw)
        indptr = torch.arange(0, batch * pages + 1, pages, dtype=torch.int32, device="cpu")
        indices = torch.arange(batch * pages, dtype=torch.int32, device="cpu")
        last = torch.full((batch,), v.kv_len - (pages - 1) * page_size, dtype=torch.int32, device="cpu")
        ws = torch.empty(64 << 20, dtype=torch.uint8, device=device)
        if v.kind == "batch_decode":
            w = flashtile.BatchDecodeWithPagedKVCacheWrapper(ws)
            w.plan(indptr, indices, last, hq, hkv, d, page_size, q_data_type=v.dtype)
            w.run(torch.randn(batch, hq, d, **kw), cache)
        else:
            w = flashtile.BatchPrefillWithPagedKVCacheWrapper(ws)
            qo_indptr = torch.arange(0, batch * v.qo_len + 1, v.qo_len, dtype=torch.int32, device="cpu")
            w.plan(qo_indptr, indptr, indices, last, hq, hkv, d, page_size, causal=v.causal, q_data_type=v.dtype)
            w.run(torch.randn(batch * v.qo_len, hq, d, **kw), cache)
    _sync(device)


def _bar(done: int, total: int, width: int = 24) -> str:
    filled = round(width * done / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + f"] {done:>{len(str(total))}}/{total}"


def cmd_warmup(args: argparse.Namespace) -> int:
    try:
        head_dims = [int(x) for x in _parse_list(args.head_dims)] if args.head_dims else None
        variants = warmup_variants(_parse_list(args.shapes), head_dims, _parse_list(args.dtypes))
    except ValueError as e:
        print(f"flashtile warmup: error: {e}", file=sys.stderr)
        return 2
    if args.list:
        for v in variants:
            print(f"{v.label:<40} {v.kind} qo_len {v.qo_len} kv_len {v.kv_len}  ({', '.join(v.models)})")
        return 0
    if not torch.cuda.is_available():
        print("No CUDA device: nothing to compile. The CPU path is pure PyTorch (no Triton kernels to build).")
        return 0
    try:
        device = _resolve_device(args.device)
    except ValueError as e:
        print(f"flashtile warmup: error: {e}", file=sys.stderr)
        return 2
    if device.type != "cuda":
        print("--device cpu: nothing to compile. The CPU path is pure PyTorch (no Triton kernels to build).")
        return 0
    print(f"compiling {len(variants)} kernel variants on {_device_name(device)} into {triton_cache_dir()}")
    failed = _compile_variants(variants, device)
    return 1 if failed else 0


def _compile_variants(variants: Sequence[WarmupVariant], device: torch.device) -> int:
    """Run each variant once, printing a progress bar line per variant; returns the number that failed."""
    tty = sys.stdout.isatty()
    failed = 0
    total_s = 0.0
    for i, v in enumerate(variants, 1):
        splits = _planned_splits(v, device)
        label = v.label + (f" ({splits} KV splits)" if splits and splits > 1 else "")
        if tty:
            print(f"{_bar(i - 1, len(variants))}  {label} ...", end="\r", flush=True)
        t0 = time.perf_counter()
        try:
            _run_variant(v, device)
            status = f"{time.perf_counter() - t0:6.2f} s"
        except Exception as e:  # report and go on: one bad variant must not hide the others
            failed += 1
            status = f"FAILED: {type(e).__name__}: {e}"
        total_s += time.perf_counter() - t0
        print(f"{_bar(i, len(variants))}  {label:<48} {status}" + (" " * 8 if tty else ""), flush=True)
    print(f"done in {total_s:.1f} s; {len(variants) - failed} of {len(variants)} variants ready "
          f"(cached on disk in {triton_cache_dir()})")
    return failed


# ---------------------------------------------------------------------------------------------
# clear-cache
# ---------------------------------------------------------------------------------------------


def cmd_clear_cache(args: argparse.Namespace) -> int:
    cache = triton_cache_dir()
    if not cache.exists():
        print(f"Triton cache {cache} does not exist: nothing to delete.")
        return 0
    resolved = cache.resolve()
    if not cache.is_dir() or resolved == pathlib.Path(resolved.anchor) or resolved == pathlib.Path.home().resolve():
        print(f"flashtile clear-cache: error: refusing to delete {cache} (not a cache directory)", file=sys.stderr)
        return 2
    files, size = _dir_usage(cache)
    if not args.yes:
        print(f"would delete {cache} ({files} files, {_format_bytes(size)}); run again with --yes to delete it")
        return 0
    print(f"deleting {cache} ({files} files, {_format_bytes(size)})")
    shutil.rmtree(cache)
    print("deleted; kernels recompile on their next use (or run `python -m flashtile warmup`)")
    return 0


# ---------------------------------------------------------------------------------------------
# install-shim / uninstall-shim
# ---------------------------------------------------------------------------------------------


def cmd_install_shim(args: argparse.Namespace) -> int:
    from . import shim

    target = pathlib.Path(args.target) if args.target else shim.default_target()
    try:
        written = shim.install_shim(target, args.flashinfer_version)
    except (shim.ShimError, ValueError, OSError) as e:
        print(f"flashtile install-shim: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} files into {target}:")
    for path in written:
        print(f"  {path.relative_to(target)}")
    print(f"`import flashinfer` now gives flashtile (flashinfer.__version__ == {args.flashinfer_version!r}, "
          f"flashinfer-python {args.flashinfer_version} in the package metadata); "
          "undo with `python -m flashtile uninstall-shim" + (f" --target {args.target}" if args.target else "") + "`")
    if str(target.resolve()) not in {str(pathlib.Path(p).resolve()) for p in sys.path if p}:
        print(f"note: {target} is not on this interpreter's sys.path; add it to PYTHONPATH of the engine's processes")
    return 0


def cmd_uninstall_shim(args: argparse.Namespace) -> int:
    from . import shim

    target = pathlib.Path(args.target) if args.target else shim.default_target()
    try:
        removed = shim.uninstall_shim(target)
    except (shim.ShimError, OSError) as e:
        print(f"flashtile uninstall-shim: error: {e}", file=sys.stderr)
        return 1
    if not removed:
        print(f"no flashtile shim in {target}: nothing to remove")
        return 0
    print(f"removed {len(removed)} files from {target}:")
    for path in removed:
        print(f"  {path.relative_to(target)}")
    leftover = target / shim.PACKAGE
    if leftover.exists():
        print(f"warning: {leftover} still exists: it holds files install-shim did not write "
              "(`import flashinfer` may still find it)", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashtile", description="flashtile: FlashInfer's core API in Python (PyTorch + Triton).",
        epilog="Run `python -m flashtile <command> --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)

    p = sub.add_parser("info", help="versions, device, dispatch paths, Triton cache, environment")
    p.add_argument("--json", action="store_true", help="print the information as JSON")
    p.add_argument("--readme", metavar="PATH", default=None,
                   help="instead, rewrite the table of environment variables in this README from the settings registry")
    p.set_defaults(func=cmd_info)

    from .examples import demo

    p = sub.add_parser("demo", help="a small serving engine on flashtile's kernels, checked and timed",
                       description="Serve random requests with a Llama-architecture model (random weights) on "
                                   "flashtile's kernels (flashtile/examples/engine.py) and with a plain PyTorch "
                                   "engine; print time to first token, decode tokens/s and a greedy-token check. "
                                   "Exit code 1 when a divergence exceeds rounding noise.")
    demo.add_arguments(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="run benchmark suites (source checkout only)",
                       description="Run benchmark suites with benchmarks/harness.py and print the markdown tables.")
    p.add_argument("suites", nargs="*", help="suite names (e.g. single_decode single_prefill); default: all")
    p.add_argument("--out", default="bench_out", help="output folder (default: bench_out)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and few repetitions (seconds on CPU)")
    p.add_argument("--filter", default=None, help="only cases whose name contains this substring")
    p.add_argument("--providers", default=None, help="comma-separated providers (default: all)")
    p.add_argument("--cuda-graph", choices=["auto", "on", "off"], default="auto",
                   help="time CUDA-graph replays (auto: for kernels under 100 us)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("warmup", help="compile the kernels that model shapes need, with a progress bar",
                       description="Call the public APIs once per kernel variant (head_dim, group size, dtype; "
                                   "causal and non-causal prefill; decode and prefill with and without split-KV) "
                                   "on small CUDA tensors with the model's head counts, so that Triton compiles "
                                   "them into its on-disk cache. "
                                   f"Shape presets: {', '.join(f'{k} ({v})' for k, v in SHAPE_PRESETS.items())}.")
    p.add_argument("--shapes", default="llama3-8b",
                   help="comma-separated presets or QO_HEADS/KV_HEADS/HEAD_DIM (default: llama3-8b)")
    p.add_argument("--head-dims", default=None,
                   help="comma-separated head dims to compile instead of the shapes' own (e.g. 64,128)")
    p.add_argument("--dtypes", default="bf16,fp16", help="comma-separated: bf16, fp16 (default: bf16,fp16)")
    p.add_argument("--device", default="auto", help="auto (default), cuda or cuda:N")
    p.add_argument("--list", action="store_true", help="list the variants and exit (compiles nothing)")
    p.set_defaults(func=cmd_warmup)

    p = sub.add_parser("clear-cache", help="delete Triton's kernel cache (dry run unless --yes)")
    p.add_argument("--yes", action="store_true", help="actually delete (default: print what would be deleted)")
    p.set_defaults(func=cmd_clear_cache)

    from .shim import ADVERTISED_FLASHINFER_VERSION

    p = sub.add_parser("install-shim", help="make `import flashinfer` load flashtile (for vLLM, SGLang)",
                       description="Write a `flashinfer` package whose modules are flashtile's (flashinfer.decode is "
                                   "flashtile.decode, ...) and flashinfer-python package metadata into site-packages, "
                                   "so that serving engines written for FlashInfer load flashtile. Refuses when a "
                                   "FlashInfer that flashtile did not write is importable. README: "
                                   "\"Using flashtile in vLLM / SGLang\".")
    p.add_argument("--target", default=None,
                   help="directory to write into (default: this environment's site-packages)")
    p.add_argument("--flashinfer-version", default=ADVERTISED_FLASHINFER_VERSION,
                   help=f"FlashInfer version to advertise to version checks (default {ADVERTISED_FLASHINFER_VERSION})")
    p.set_defaults(func=cmd_install_shim)

    p = sub.add_parser("uninstall-shim", help="remove what install-shim wrote",
                       description="Remove exactly the files install-shim wrote (its RECORD) and the bytecode Python "
                                   "cached for them. Refuses to touch a FlashInfer that flashtile did not write.")
    p.add_argument("--target", default=None,
                   help="directory install-shim wrote into (default: this environment's site-packages)")
    p.set_defaults(func=cmd_uninstall_shim)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    settings.select_interpreter_for_backend()  # before torch imports triton (first custom-op call)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
