"""``flashtile demo``: the example serving engine (flashtile/examples/) against a plain PyTorch engine,
timed and checked (exit code 1 when a greedy divergence exceeds rounding noise)."""

from __future__ import annotations

import argparse


def cmd_demo(args: argparse.Namespace) -> int:
    from ..examples import demo

    return demo.run(args)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..examples import demo

    p = sub.add_parser("demo", help="a small serving engine on flashtile's kernels, checked and timed",
                       description="Serve random requests with a Llama-architecture model (random weights) on "
                                   "flashtile's kernels (flashtile/examples/engine.py) and with a plain PyTorch "
                                   "engine; print time to first token, decode tokens/s and a greedy-token check. "
                                   "Exit code 1 when a divergence exceeds rounding noise.")
    demo.add_arguments(p)
    p.set_defaults(func=cmd_demo)
