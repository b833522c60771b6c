"""Compile the warp-specialized Hopper prefill kernel (Gluon, flashtile/kernels/batch_prefill_hopper.py) for
sm_90a without a GPU, and print its shared memory, registers, spill and a hash of its SASS opcode sequence.

The launcher runs on CPU tensors (a paged cache, causal, 32/8 heads) with its launch captured instead of run;
the captured call is compiled with Triton's specialization rules, as aot_compile_check.py does for the Triton
kernels (which it cannot capture: this kernel launches through _core/launch.py's DirectLaunch). Two checkouts
that print the same hash have the same machine code on the default path.

    python -m benchmarks.tools.hopper_prefill_compile --triton-path /tmp/t36 [--head-dim 64] [--page-size 16]
        [--stages N]
"""

import argparse
import hashlib
import os
import pathlib
import re
import subprocess
import sys
import tempfile

_ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
_ap.add_argument("--triton-path", default=None, help="a directory holding the triton package to compile with")
_ap.add_argument("--head-dim", type=int, default=128, choices=(64, 128))
_ap.add_argument("--page-size", type=int, default=16, help="1: gather mode")
_ap.add_argument("--stages", type=int, default=None, help="the K/V ring depth (default: the kernel's table)")
_args = _ap.parse_args()
if _args.triton_path:
    sys.path.insert(0, _args.triton_path)
os.environ.pop("TRITON_INTERPRET", None)
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

import flashtile.kernels.batch_prefill_hopper as hopper  # noqa: E402
from flashtile._core import launch  # noqa: E402


def captured_launch(head_dim: int, page_size: int):
    """``(kernel, args, kwargs)`` of one hopper_prefill_forward call on CPU tensors."""
    calls = []
    launch.DirectLaunch.__getitem__ = lambda self, grid: (lambda *a, **k: calls.append((self, a, k)))
    tokens, qo_heads, kv_heads, pages = 2048, 32, 8, 256
    q = torch.zeros(tokens, qo_heads, head_dim, dtype=torch.bfloat16)
    cache = torch.zeros(pages, 2, page_size, kv_heads, head_dim, dtype=torch.bfloat16)
    k, v = cache[:, 0], cache[:, 1]
    views = (hopper._kv_rows(k, True), hopper._kv_rows(v, True))
    ints = torch.zeros(4096, dtype=torch.int32)
    out, lse = torch.zeros_like(q), torch.zeros(tokens, qo_heads)
    part_o, part_lse = torch.zeros(64, qo_heads, head_dim), torch.zeros(64, qo_heads)
    hopper.hopper_prefill_forward(q, k, v, views, ints, ints, ints, ints, part_o, part_lse, out, lse, 0.1, True,
                                  64, 132)
    (call,) = calls
    return call


def compile_launch(kernel, args, kwargs):
    """The compiled kernel, specialized as Triton's JIT would on the GPU (16-aligned pointers and ints divisible
    by 16 carry the divisibility hint, ints equal to 1 become constexprs)."""
    fn = kernel.fn
    kwargs = dict(kwargs)
    options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages", "maxnreg") if key in kwargs}
    bound = dict(zip(fn.arg_names, args))
    bound.update(kwargs)
    bound["num_warps"] = options.get("num_warps", 4)  # also a constexpr parameter of this kernel
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        value = bound.get(p.name, p.default)
        if p.is_constexpr or (type(value) is int and value == 1):
            signature[p.name], constexprs[p.name] = "constexpr", value
            continue
        signature[p.name] = mangle_type(value)
        aligned = isinstance(value, torch.Tensor) and value.data_ptr() % 16 == 0
        if aligned or (type(value) is int and value % 16 == 0 and not p.do_not_specialize):
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = GluonASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def sass_summary(compiled) -> str:
    tools = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as d:
        pathlib.Path(d, "k.ptx").write_text(compiled.asm["ptx"])
        info = subprocess.run([str(tools / "ptxas"), "-v", "--gpu-name=sm_90a", f"{d}/k.ptx", "-o", f"{d}/k.cubin"],
                              capture_output=True, text=True).stderr
        sass = subprocess.run([str(tools / "cuobjdump"), "-sass", f"{d}/k.cubin"], capture_output=True,
                              text=True).stdout
    ops = re.findall(r"/\*[0-9a-f]{4,6}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass)
    regs = ",".join(re.findall(r"Used (\d+) registers", info))
    spill = ",".join(re.findall(r"(\d+) bytes spill stores", info))
    digest = hashlib.sha1(" ".join(ops).encode()).hexdigest()[:12]
    return f"registers {regs}, spill {spill} B, {len(ops)} instructions, opcode hash {digest}"


def main() -> None:
    if not hopper._HAVE_GLUON:
        raise SystemExit(f"this Triton ({triton.__version__}) has no Gluon Hopper API")
    if _args.stages is not None:
        hopper.STAGES_OVERRIDE = _args.stages
    kernel, args, kwargs = captured_launch(_args.head_dim, _args.page_size)
    compiled = compile_launch(kernel, args, kwargs)
    print(f"hopper prefill d{_args.head_dim} page {_args.page_size} stages {kwargs['STAGES']} (Triton "
          f"{triton.__version__}, sm_90a): shared {compiled.metadata.shared} B, {sass_summary(compiled)}")


if __name__ == "__main__":
    main()
