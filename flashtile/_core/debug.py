"""The two debugging aids, kept apart so tests can take one without the other.

- **Output poisoning**: new outputs are filled with NaN (integers with -1) before a kernel writes
  them, so an element a kernel forgets fails a test instead of passing by luck. On with
  ``FLASHTILE_DEBUG=1``, or programmatically with :func:`set_output_poisoning` (the test suite does
  this for every test, without turning on the checks below).
- **Device index validation**: page tables, append rows and RoPE positions that live on the GPU are
  copied to the host and validated (a synchronization). On only with ``FLASHTILE_DEBUG=1``; the
  production path (device tables, no host copy) runs without it.

Host-side index arrays are always validated; neither aid changes results.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import settings

__all__ = ["output_poisoning_enabled", "set_output_poisoning", "validate_device_indices", "debug_checks_enabled"]

_poisoning_override: Optional[bool] = None
_poisoning: Optional[bool] = None  # the override, else FLASHTILE_DEBUG; None until first asked


def _debug_env() -> bool:
    return settings.flag("FLASHTILE_DEBUG")  # read once (settings.py)


def set_output_poisoning(enabled: Optional[bool]) -> None:
    """Force output poisoning on or off; ``None`` returns control to ``FLASHTILE_DEBUG``."""
    global _poisoning_override, _poisoning
    _poisoning_override = enabled
    _poisoning = None


def _forget_poisoning() -> None:
    global _poisoning
    _poisoning = None


settings.on_reload(_forget_poisoning)


def debug_checks_enabled() -> bool:
    """Whether FLASHTILE_DEBUG=1 (device index arrays are validated on the host)."""
    return _debug_env()


def output_poisoning_enabled() -> bool:
    global _poisoning
    enabled = _poisoning
    if enabled is None:  # every new output asks: decided once
        enabled = _poisoning = _debug_env() if _poisoning_override is None else _poisoning_override
    return enabled


def validate_device_indices(*tensors: torch.Tensor) -> bool:
    """Whether index values are read and checked on the host: always when every tensor is on the
    host; for device tensors only with ``FLASHTILE_DEBUG=1``. Never while torch.compile traces or a
    CUDA graph is captured (the values are unknown then and a sync would break the capture)."""
    if torch.compiler.is_compiling():
        return False
    if all(t.is_cpu for t in tensors):
        return True
    if not _debug_env():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
