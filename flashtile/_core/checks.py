"""Argument checking shared by every public API.

Every check raises a typed error whose message names the argument, what was expected and what was
given. Messages never print tensor contents (they can be huge); they print shapes, dtypes, devices.

Error types (DESIGN.md §Errors):
- ValueError: bad shape, value, or layout string.
- TypeError: wrong dtype or wrong Python type.
- NotImplementedError: a valid combination that flashtile does not support, with the reason.

Unknown option strings (``kv_layout``, ``pos_encoding_mode``) raise :class:`InvalidOptionError`,
which is both a ``ValueError`` (our contract) and a ``KeyError`` (what upstream FlashInfer raises),
so callers written against either keep working.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

__all__ = [
    "InvalidOptionError",
    "check_tensor",
    "check_same_device",
    "check_option",
    "describe",
    "FP8_DTYPES",
    "HALF_DTYPES",
]

HALF_DTYPES = (torch.float16, torch.bfloat16)
FP8_DTYPES = tuple(
    dt for dt in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if dt is not None
)


class InvalidOptionError(KeyError, ValueError):
    """An option string that is not one of the accepted values (e.g. ``kv_layout="NDH"``)."""

    def __str__(self) -> str:  # KeyError would quote the message; print it plainly.
        return str(self.args[0]) if self.args else ""


def describe(x) -> str:
    """Short description of a value for error messages: shape/dtype/device for tensors."""
    if isinstance(x, torch.Tensor):
        return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype}, device={x.device})"
    return f"{type(x).__name__} {x!r}"[:200]


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    x,
    *,
    ndim: Optional[int] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    device: Optional[torch.device] = None,
    last_dim_contiguous: bool = False,
) -> None:
    """Check one tensor argument; ``None`` entries of ``shape`` match any size."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {describe(x)}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(x.shape)}")
    if shape is not None:
        if x.dim() != len(shape) or any(s is not None and s != xs for s, xs in zip(shape, x.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name}: expected shape {want}, got {list(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in ({_dtype_names(dtypes)}), got {str(x.dtype).replace('torch.', '')}")
    if device is not None and x.device != device:
        raise ValueError(f"{name}: expected a tensor on device {device}, got one on {x.device}")
    if last_dim_contiguous and x.dim() > 0 and x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must have stride 1, got strides {tuple(x.stride())}")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All named tensors on one device; returns it."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for n, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{n}: expected a tensor on the same device as {first_name} ({first.device}), got one on {t.device}"
            )
    return first.device


def check_option(name: str, value, allowed: Sequence[str]) -> str:
    """An option string such as ``kv_layout``; raises InvalidOptionError naming the choices."""
    if not isinstance(value, str) or value not in allowed:
        raise InvalidOptionError(f"Invalid {name} {value!r}: expected one of {', '.join(map(repr, allowed))}")
    return value
