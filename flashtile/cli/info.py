"""``flashtile info``: versions, device, which path each API takes here, Triton cache, environment."""

from __future__ import annotations

import argparse
import json
import pathlib
import platform

import torch

from .._core import settings
from ..jit.env import triton_cache_dir
from ..variants import VARIANT_PREFILL_ROUTE
from .common import dir_usage, format_bytes, path_of

# FP4 (e2m1) MMA is a Blackwell (SM100+) tensor-core instruction; Hopper and older have none.
_FP4_MATMUL = ("needs Blackwell (SM100+) FP4 tensor cores; on Hopper dequantize with "
               "e2m1_and_ufp8sf_scale_to_float / mxfp4_dequantize, then a bf16/fp16 GEMM")


def _fp4_matmul_reason(dev: str) -> str:
    if dev == "cuda" and torch.cuda.get_device_capability()[0] >= 10:
        return ("this GPU has FP4 tensor cores, but flashtile has no FP4 GEMM yet: dequantize with "
                "e2m1_and_ufp8sf_scale_to_float / mxfp4_dequantize, then a bf16/fp16 GEMM")
    return _FP4_MATMUL


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
        path, reason = path_of(torch.device(dev))
        paths += [dict(api=api, tensors=dev, path=path, reason=reason) for api in attention_apis]
        paths += [dict(api=api, tensors=dev, path="pytorch", reason="vectorized PyTorch on the input's device")
                  for api in ("packbits", "segment_packbits", "fp8_quantize", "fp4_quantize (NVFP4, MXFP4)")]
        paths.append(dict(api="FP4 matmul", tensors=dev, path="not provided", reason=_fp4_matmul_reason(dev)))
        if path == "triton":  # attention variants (flashtile/variants.py) on the batch-prefill kernels
            paths.append(dict(api="batch prefill with a variant", tensors=dev, path="triton",
                              reason=VARIANT_PREFILL_ROUTE))
    cache = triton_cache_dir()
    files, size = dir_usage(cache) if cache.is_dir() else (0, 0)
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
    cuda = f" (CUDA {info['torch_cuda']})" if info["torch_cuda"] else " (no CUDA build)"
    print(f"torch     {info['torch']}{cuda}")
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
    state = f"{c['files']} files, {format_bytes(c['bytes'])}" if c["exists"] else "does not exist yet"
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


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="versions, device, dispatch paths, Triton cache, environment")
    p.add_argument("--json", action="store_true", help="print the information as JSON")
    p.add_argument("--readme", metavar="PATH", default=None,
                   help="instead, rewrite the table of environment variables in this README from the settings registry")
    p.set_defaults(func=cmd_info)
