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
import sys
from typing import Optional, Sequence

from .._core import settings
from ..jit.env import triton_cache_dir
from . import bench, clear_cache, demo, info, shim, warmup
from .common import SHAPE_PRESETS, ModelShape
from .info import _info
from .warmup import _WARMUP_SHORT, warmup_variants

__all__ = ["main", "build_parser", "ModelShape", "SHAPE_PRESETS", "triton_cache_dir", "warmup_variants",
           "_info", "_WARMUP_SHORT"]

COMMANDS = (info, demo, bench, warmup, clear_cache, shim)  # each adds its subcommand(s), in this order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashtile", description="flashtile: FlashInfer's core API in Python (PyTorch + Triton).",
        epilog="Run `python -m flashtile <command> --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    settings.select_interpreter_for_backend()  # before torch imports triton (first custom-op call)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
