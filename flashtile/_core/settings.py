"""flashtile's environment settings: each variable is read once, on first use.

Why: an eager call of a launch-bound op (a norm, RoPE, a merge, a sampler) has a host budget of a few
microseconds, and one ``os.environ.get`` costs about one (it encodes the name and decodes the value).
So the ``FLASHTILE_*`` knobs that calls consult (FLASHTILE_BACKEND, FLASHTILE_DEBUG, the launch and
kernel-choice knobs) are read once and kept; :func:`reload` forgets them, and everything derived from
them (the launch memos, the checked-call memos, the dispatch choices, which key on the settings
implicitly), so that the next call reads the environment again. Tools and tests that change these
variables at run time call :func:`reload` afterwards (tests/conftest.py does it for every
``monkeypatch.setenv``/``delenv``). Changing them in the environment of a running process has no
effect otherwise; set them before the first call.

``TRITON_INTERPRET`` is owned here too (:func:`interpreting`, :func:`select_interpreter`): Triton
reads it itself when ``@triton.jit`` decorates a kernel, so flashtile must read it at the same times
Triton does, not from a cache.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, List, Optional

__all__ = ["env", "env_flag", "reload", "on_reload", "interpreting", "select_interpreter", "INTERPRET_VARIABLE"]

INTERPRET_VARIABLE = "TRITON_INTERPRET"

_values: dict = {}
_listeners: List[Callable[[], None]] = []
_UNSET = object()


def env(name: str, default: Optional[str] = None) -> Optional[str]:
    """``os.environ.get(name, default)``, read once (see the module doc)."""
    value = _values.get(name, _UNSET)
    if value is _UNSET:
        value = _values[name] = os.environ.get(name)
    return default if value is None else value


def env_flag(name: str, default: bool) -> bool:
    """A boolean knob: unset gives ``default``; "", "0", "false", "False" are off, anything else on."""
    value = env(name)
    if value is None:
        return default
    return value.strip() not in ("", "0", "false", "False")


def on_reload(listener: Callable[[], None]) -> None:
    """Call ``listener()`` at every :func:`reload` (modules that keep state derived from settings)."""
    _listeners.append(listener)


def reload() -> None:
    """Forget every setting read so far and everything derived from them (module doc)."""
    _values.clear()
    for listener in _listeners:
        listener()


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``), as Triton sees it
    now (read at every call: :func:`select_interpreter` may set it)."""
    return os.environ.get(INTERPRET_VARIABLE) == "1"


def select_interpreter(*, unless_set: bool = False) -> None:
    """Choose Triton's interpreter for kernels decorated from now on (``TRITON_INTERPRET=1``).

    ``unless_set``: leave a value the user set alone, and do nothing on a machine with CUDA or once
    triton is imported (it must be chosen before triton is imported to cover triton's own library):
    the rule for ``FLASHTILE_BACKEND=triton`` at import time and in the CLI."""
    if unless_set:
        if INTERPRET_VARIABLE in os.environ or "triton" in sys.modules:
            return
        import torch

        if torch.cuda.is_available():
            return
    os.environ[INTERPRET_VARIABLE] = "1"
