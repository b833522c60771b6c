"""``flashtile install-shim`` / ``uninstall-shim``: a ``flashinfer`` package that resolves to flashtile."""

from __future__ import annotations

import argparse
import pathlib
import sys


def cmd_install_shim(args: argparse.Namespace) -> int:
    from .. import shim

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
    from .. import shim

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


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..shim import ADVERTISED_FLASHINFER_VERSION
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
