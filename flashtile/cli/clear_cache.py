"""``flashtile clear-cache``: delete Triton's on-disk kernel cache (dry run unless ``--yes``)."""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys

from ..jit.env import triton_cache_dir
from .common import dir_usage, format_bytes


def cmd_clear_cache(args: argparse.Namespace) -> int:
    cache = triton_cache_dir()
    if not cache.exists():
        print(f"Triton cache {cache} does not exist: nothing to delete.")
        return 0
    resolved = cache.resolve()
    if not cache.is_dir() or resolved == pathlib.Path(resolved.anchor) or resolved == pathlib.Path.home().resolve():
        print(f"flashtile clear-cache: error: refusing to delete {cache} (not a cache directory)", file=sys.stderr)
        return 2
    files, size = dir_usage(cache)
    if not args.yes:
        print(f"would delete {cache} ({files} files, {format_bytes(size)}); run again with --yes to delete it")
        return 0
    print(f"deleting {cache} ({files} files, {format_bytes(size)})")
    shutil.rmtree(cache)
    print("deleted; kernels recompile on their next use (or run `python -m flashtile warmup`)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("clear-cache", help="delete Triton's kernel cache (dry run unless --yes)")
    p.add_argument("--yes", action="store_true", help="actually delete (default: print what would be deleted)")
    p.set_defaults(func=cmd_clear_cache)
