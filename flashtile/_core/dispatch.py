"""Choose, per call, between the Triton kernels and the pure-PyTorch reference (DESIGN.md §Dispatch).

- CUDA tensors run the Triton kernels.
- CPU tensors run the reference path, unless the kernel path is forced with
  ``FLASHTILE_BACKEND=triton`` or ``backend="triton"``; then the kernels run under Triton's
  interpreter. The interpreter is selected by ``TRITON_INTERPRET=1`` when ``@triton.jit`` decorates
  a kernel, so kernel modules are imported lazily, here, after the variable is set.
- ``FLASHTILE_BACKEND=reference`` (or ``backend="reference"``) forces the reference path anywhere.
  FLASHTILE_BACKEND is read once (settings.py; ``settings.reload()`` re-reads it).

API and op layers find the module that runs an op family with :func:`implementation` (the one lookup):
``flashtile.kernels.<family>`` or ``flashtile.reference.<family>``, which define the same functions
with the same arguments.

Nothing is compiled at import: kernels compile on their first call (and ``python -m flashtile
warmup`` precompiles them).
"""

from __future__ import annotations

import enum
import importlib
import sys
from dataclasses import dataclass
from types import ModuleType

import torch

from . import settings
from .checks import check_option

__all__ = ["Path", "Decision", "choose_path", "load_kernels", "implementation", "UPSTREAM_BACKENDS",
           "normalize_backend"]

# Device types whose tensors run the compiled kernels. benchmarks/tools/host_time.py --dry adds "cpu" to
# profile the launch path on a machine without a GPU (with launches stubbed out).
KERNEL_DEVICE_TYPES = ("cuda",)


class Path(enum.Enum):
    TRITON = "triton"
    TRITON_INTERPRETER = "triton-interpreter"
    REFERENCE = "reference"


@dataclass(frozen=True)
class Decision:
    path: Path
    reason: str


# Upstream `backend=` strings: "auto", "fa2" and "fa3" mean our best kernel. Vendor libraries that a
# Triton package cannot call raise NotImplementedError with the reason.
_OUR_BACKENDS = ("auto", "fa2", "fa3", "triton", "reference")
_VENDOR_BACKENDS = ("cudnn", "trtllm-gen", "cutlass", "cute-dsl", "xqa")
UPSTREAM_BACKENDS = _OUR_BACKENDS + _VENDOR_BACKENDS


def normalize_backend(backend: str) -> str:
    """Map an upstream backend string to "auto", "triton" or "reference"."""
    check_option("backend", backend, UPSTREAM_BACKENDS)
    if backend in _VENDOR_BACKENDS:
        raise NotImplementedError(
            f"backend={backend!r} is a vendor library that flashtile does not wrap; "
            "use 'auto' (flashtile's Triton kernels, equivalent to 'fa2'/'fa3')"
        )
    if backend in ("fa2", "fa3"):
        return "auto"
    return backend


def _env_backend() -> str:
    return settings.choice("FLASHTILE_BACKEND")


def choose_path(device: torch.device, backend: str = "auto") -> Decision:
    """The path one call takes on ``device``; ``backend`` is already normalized."""
    if backend == "auto":
        backend = _env_backend()
    if backend == "reference":
        return Decision(Path.REFERENCE, "reference path requested")
    if device.type in KERNEL_DEVICE_TYPES:
        return Decision(Path.TRITON, "CUDA tensors run the Triton kernels")
    if backend == "triton":
        if torch.cuda.is_available() and not settings.interpreting():
            raise NotImplementedError(
                "the Triton kernel path for CPU tensors runs under Triton's interpreter, which must be chosen "
                "before kernels are compiled: set TRITON_INTERPRET=1 before importing flashtile, or pass CUDA tensors"
            )
        return Decision(Path.TRITON_INTERPRETER, "kernel path forced on CPU tensors: Triton interpreter")
    return Decision(Path.REFERENCE, f"{device.type} tensors use the pure-PyTorch reference")


_MODULES: dict = {}


def implementation(name: str, device: torch.device, backend: str = "auto") -> ModuleType:
    """The module that runs op family ``name`` for tensors on ``device``: ``flashtile.kernels.<name>`` or
    ``flashtile.reference.<name>``, which define the same functions with the same arguments (the API and
    op layers call them without knowing which one they got). ``backend`` is already normalized.

    The choice is remembered per (name, device type, backend) until the settings are reloaded (it depends
    on FLASHTILE_BACKEND): the launch-bound small ops cannot afford choose_path's work on every call."""
    key = (name, device.type, backend)
    module = _MODULES.get(key)
    if module is None:
        decision = choose_path(device, backend)
        if decision.path is Path.REFERENCE:
            module = importlib.import_module(f"flashtile.reference.{name}")
        else:
            module = load_kernels(name, decision.path)
        _MODULES[key] = module
    return module


settings.on_reload(_MODULES.clear)


def load_kernels(name: str, path: Path) -> ModuleType:
    """Import ``flashtile.kernels.<name>`` for ``path`` (setting up the interpreter when needed)."""
    if path is Path.TRITON_INTERPRETER:
        settings.select_interpreter()
        if not _triton_is_interpreted():
            raise NotImplementedError(
                "the Triton kernels can run on CPU tensors only under Triton's interpreter, which must be chosen "
                "before triton is imported: set TRITON_INTERPRET=1 (or FLASHTILE_BACKEND=triton) before importing "
                "triton or flashtile"
            )
    return importlib.import_module(f"flashtile.kernels.{name}")


def _triton_is_interpreted() -> bool:
    """True if triton is not imported yet, or was imported in interpreter mode (its own ``tl``
    library functions are then interpreted too)."""
    if "triton" not in sys.modules:
        return True
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.cdiv, InterpretedFunction)
