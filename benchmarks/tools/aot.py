"""Compiling flashtile's kernel launches for a GPU target on a machine without one.

The launchers run on CPU tensors with Triton's interpreter off (TRITON_INTERPRET unset before triton
is imported); :func:`capture_launches` records each ``kernel[grid](...)`` call instead of running it,
and :func:`compile_launch` compiles a recorded call with the specialization Triton's JIT would give
it on the GPU (16-byte aligned pointers and ints divisible by 16 carry the divisibility hint; without
it the pipeliner cannot use asynchronous copies and the compile is not representative).
:func:`shared_bytes` stops after the TTGIR -> LLVM lowering, where Triton has sized the kernel's
shared memory (what it checks against the device limit before a launch), skipping LLVM's
optimization and ptxas: about a second per kernel.

Used by benchmarks/tools/aot_compile_check.py and benchmarks/tools/smem_compile.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import pathlib
import re
import subprocess
import tempfile
from typing import Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction, mangle_type

__all__ = ["Launch", "capture_launches", "compile_source", "sass_summary", "shared_bytes"]


class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)`` call."""

    def __init__(self, fn: JITFunction, args: tuple, kwargs: dict):
        self.fn, self.args, self.kwargs = fn, args, kwargs

    @property
    def name(self) -> str:
        return self.fn.__name__

    def constexpr(self, name: str):
        return self.kwargs.get(name)


@contextlib.contextmanager
def capture_launches() -> Iterator[list]:
    """Within the block, kernel launches are appended to the yielded list instead of running."""
    recorded: list = []
    original = JITFunction.__getitem__
    JITFunction.__getitem__ = lambda self, grid: (lambda *a, **k: recorded.append(Launch(self, a, dict(k))))
    try:
        yield recorded
    finally:
        JITFunction.__getitem__ = original


def compile_source(launch: Launch, arch: int = 90):
    """``(source, target, options)`` for ``triton.compile`` of a recorded launch on ``sm_<arch>``."""
    kwargs = dict(launch.kwargs)
    launch_options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages", "maxnreg") if key in kwargs}
    launch_options.setdefault("num_warps", 4)
    launch_options.setdefault("num_stages", 3)
    fn = launch.fn
    bound = dict(zip(fn.arg_names, launch.args))
    bound.update(kwargs)
    # a launch option the kernel also declares as a constexpr parameter (Gluon kernels take num_warps)
    bound.update({key: value for key, value in launch_options.items() if key in fn.arg_names})
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        value = bound[p.name] if p.name in bound else p.default  # an omitted constexpr takes its default
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
            continue
        signature[p.name] = mangle_type(value)
        if isinstance(value, tuple):  # a tuple argument (attention variants' extra arguments): per element
            for j, item in enumerate(value):
                if isinstance(item, torch.Tensor) and item.data_ptr() % 16 == 0:
                    attrs[(i, j)] = [["tt.divisibility", 16]]
                elif item is None or (type(item) is int and item == 1):  # Triton specializes both as constexprs
                    constexprs[(i, j)] = item
            continue
        aligned_ptr = isinstance(value, torch.Tensor) and value.data_ptr() % 16 == 0
        int16 = (isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0
                 and not p.do_not_specialize)
        if aligned_ptr or int16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    target = GPUTarget("cuda", arch, 32)
    options = triton.compiler.make_backend(target).parse_options(launch_options)
    source_type = triton.compiler.ASTSource
    if type(fn).__name__ == "GluonJITFunction":  # @gluon.jit (kernels/batch_prefill_hopper.py)
        from triton.experimental.gluon._runtime import GluonASTSource as source_type
    source = source_type(fn=fn, constexprs=constexprs, signature=signature, attrs=attrs)
    return source, target, options.__dict__


def sass_summary(ptx: str) -> str:
    """Registers, spill bytes and the opcode-sequence hash of the assembled kernel (needs ptxas and
    cuobjdump from the Triton package; empty when they are missing). Two checkouts whose kernel prints the
    same hash compiled to the same instructions (operands dropped)."""
    tools = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (tools / "ptxas").exists():
        return ""
    with tempfile.TemporaryDirectory() as d:
        pathlib.Path(d, "k.ptx").write_text(ptx)
        info = subprocess.run([str(tools / "ptxas"), "-v", "--gpu-name=sm_90a", f"{d}/k.ptx", "-o", f"{d}/k.cubin"],
                              capture_output=True, text=True).stderr
        sass = subprocess.run([str(tools / "cuobjdump"), "-sass", f"{d}/k.cubin"], capture_output=True,
                              text=True).stdout
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores", info)
    ops = re.findall(r"/\*[0-9a-f]{4,6}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass)
    digest = hashlib.sha1(" ".join(ops).encode()).hexdigest()[:12]
    return (f" regs={regs.group(1) if regs else '?'} spill_bytes={spills.group(1) if spills else '?'}"
            f" sass_ops={len(ops)} opseq={digest}")


def shared_bytes(compiled_source) -> int:
    """Bytes of shared memory Triton gives a kernel: ``compiled_source`` is :func:`compile_source`'s
    ``(source, target, options)`` for a recorded launch."""
    from triton._C.libtriton import ir, llvm

    source, target, options = compiled_source
    backend = triton.compiler.make_backend(target)
    parsed = backend.parse_options(options)
    stages: dict = {}
    backend.add_stages(stages, parsed, source.language)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = source.make_ir(target, parsed, backend.get_codegen_implementation(parsed), backend.get_module_map(),
                            context)
    metadata = {"target": target, **parsed.__dict__}
    optimize = llvm.optimize_module
    llvm.optimize_module = lambda *a, **k: None  # the size is known before LLVM optimizes
    try:
        for stage in ("ttir", "ttgir", "llir"):
            module = stages[stage](module, metadata)
    finally:
        llvm.optimize_module = optimize
    return int(metadata["shared"])
