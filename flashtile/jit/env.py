"""``flashinfer.jit.env``: where compiled kernels are kept.

:data:`FLASHINFER_WORKSPACE_DIR` is FlashInfer's directory of JIT-compiled kernels. flashtile's
compiled kernels live in Triton's on-disk cache, so the name points there: the directory that
``python -m flashtile clear-cache`` deletes, resolved once at import (vLLM names its FlashInfer
autotune cache after the last two parts of this path).
"""

import os
import pathlib

from .._core import settings

__all__ = ["FLASHINFER_WORKSPACE_DIR", "triton_cache_dir"]


def triton_cache_dir() -> pathlib.Path:
    """Where Triton keeps compiled kernels: ``TRITON_CACHE_DIR``, else ``$TRITON_HOME/.triton/cache``."""
    explicit = settings.env("TRITON_CACHE_DIR")
    if explicit:
        return pathlib.Path(explicit).expanduser()
    home = settings.env("TRITON_HOME") or os.path.expanduser("~")
    return pathlib.Path(home) / ".triton" / "cache"


FLASHINFER_WORKSPACE_DIR: pathlib.Path = triton_cache_dir()
