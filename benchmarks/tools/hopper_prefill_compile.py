"""Compile the warp-specialized Hopper prefill kernel (Gluon, flashtile/kernels/batch_prefill_hopper.py) for
sm_90a without a GPU, and print its shared memory, registers, spill and a hash of its SASS opcode sequence.

The launcher runs on CPU tensors (a paged cache, causal, 32/8 heads) with its launch captured instead of run,
and the captured call is compiled as aot_compile_check.py compiles the Triton kernels (benchmarks/tools/aot.py).
Two checkouts that print the same hash have the same machine code on the default path.

    python -m benchmarks.tools.hopper_prefill_compile --triton-path /tmp/t36 [--head-dim 64] [--page-size 16]
        [--stages N]
"""

import argparse
import os
import sys

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

import flashtile.kernels.batch_prefill_hopper as hopper  # noqa: E402
from benchmarks.tools.aot import capture_launches, compile_source, sass_summary  # noqa: E402


def captured_launch(head_dim: int, page_size: int):
    """The recorded launch (benchmarks/tools/aot.py's Launch) of one hopper_prefill_forward call on CPU
    tensors: on CPU the kernel's DirectLaunch wrapper hands the call to the Gluon JIT function, which
    capture_launches records."""
    tokens, qo_heads, kv_heads, pages = 2048, 32, 8, 256
    q = torch.zeros(tokens, qo_heads, head_dim, dtype=torch.bfloat16)
    cache = torch.zeros(pages, 2, page_size, kv_heads, head_dim, dtype=torch.bfloat16)
    k, v = cache[:, 0], cache[:, 1]
    views = (hopper._kv_rows(k, True), hopper._kv_rows(v, True))
    ints = torch.zeros(4096, dtype=torch.int32)
    out, lse = torch.zeros_like(q), torch.zeros(tokens, qo_heads)
    part_o, part_lse = torch.zeros(64, qo_heads, head_dim), torch.zeros(64, qo_heads)
    with capture_launches() as calls:
        hopper.hopper_prefill_forward(q, k, v, views, ints, ints, ints, ints, part_o, part_lse, out, lse, 0.1, True,
                                      64, 132)
    (launch,) = calls
    return launch


def main() -> None:
    if not hopper._HAVE_GLUON:
        raise SystemExit(f"this Triton ({triton.__version__}) has no Gluon Hopper API")
    if _args.stages is not None:
        hopper.STAGES_OVERRIDE = _args.stages
    launch = captured_launch(_args.head_dim, _args.page_size)
    source, target, options = compile_source(launch)
    compiled = triton.compile(source, target=target, options=options)
    print(f"hopper prefill d{_args.head_dim} page {_args.page_size} stages {launch.constexpr('STAGES')} (Triton "
          f"{triton.__version__}, sm_90a): shared={compiled.metadata.shared}{sass_summary(compiled.asm['ptx'])}")


if __name__ == "__main__":
    main()
