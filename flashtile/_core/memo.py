"""Per-call work remembered on a key of the arguments' metadata.

An eager call of a launch-bound op (a norm, RoPE, a merge, a sampler) spends most of its host time
on work whose outcome depends only on its arguments' metadata: the argument checks (shapes, strides,
dtypes, devices), the dispatch choice, the launch's sizes. :func:`tensor_key` is that metadata for
one tensor, and :class:`CallMemo` keeps, per key of a call's arguments, what the first call with that
key concluded. The API functions use it to skip their checks: a key is remembered only after every
check passed for it, and the checks' outcome is a function of the key (values that are not in the
key, such as ``eps``, are still checked on every call), so a remembered key proves the checks pass.
The same key then serves the kernel launcher's launch memo (_core/launch.py), which is why it also
holds each pointer's 16-byte alignment.

Memos are cleared when the settings are reloaded (settings.reload), as the dispatch choice they
remember depends on FLASHTILE_BACKEND.
"""

from __future__ import annotations

import torch

from . import settings

__all__ = ["tensor_key", "CallMemo", "eager", "MAX_KEYS"]

MAX_KEYS = 4096  # keys per memo; a full memo starts over (keys still in use come back on their next call)


def tensor_key(t: torch.Tensor) -> tuple:
    """A tensor's metadata: shape and strides (which fix the checks and a launcher's sizes, strides and
    grid), dtype and device (the checks, the dispatch), and whether its data pointer is 16-byte aligned
    (which Triton specializes on). Raises (AttributeError, RuntimeError, ...) for a non-tensor or a
    tensor without strides or storage; callers then take their checked path."""
    return t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0


class CallMemo(dict):
    """key -> what the first call with that key concluded (a dict, so ``memo.get(key)`` costs one
    lookup). Fill it with :meth:`remember`."""

    _all: list = []

    def __init__(self):
        super().__init__()
        CallMemo._all.append(self)

    def remember(self, key, value) -> None:
        if len(self) >= MAX_KEYS:
            self.clear()
        self[key] = value


def _clear_all() -> None:
    for memo in CallMemo._all:
        memo.clear()


settings.on_reload(_clear_all)

_is_compiling = torch.compiler.is_compiling


def eager() -> bool:
    """Whether this call runs eagerly (not traced by torch.compile): only eager calls use the memos
    (a trace must see the checks and the registered op)."""
    return not _is_compiling()
