"""Argument checking shared by every public API.

Every check raises a typed error whose message names the argument, what was expected and what was
given. Messages never print tensor contents (they can be huge); they print shapes, dtypes, devices.

Error types (DESIGN.md §Errors):
- ValueError: bad shape, value, or layout string.
- TypeError: wrong dtype or wrong Python type.
- NotImplementedError: a valid combination that flashtile does not support, with the reason.

Unknown option strings (``kv_layout``, ``pos_encoding_mode``) raise :class:`InvalidOptionError`,
which is both a ``ValueError`` (our contract) and a ``KeyError`` (what upstream FlashInfer raises),
so callers written against either keep working. Every dtype given by name (the wrappers'
``q_data_type``, ``utils.canonicalize_torch_dtype``, the CLI's ``--dtype``) goes through
:func:`parse_dtype`, which raises :class:`InvalidDtypeError`.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional, Sequence

import torch

__all__ = [
    "InvalidOptionError",
    "InvalidDtypeError",
    "parse_dtype",
    "DTYPE_ALIASES",
    "check_tensor",
    "check_same_device",
    "check_option",
    "describe",
    "in_callers_terms",
    "CHECK_ERRORS",
    "FP8_DTYPES",
    "HALF_DTYPES",
    "OUTPUT_DTYPES",
]

HALF_DTYPES = (torch.float16, torch.bfloat16)
OUTPUT_DTYPES = HALF_DTYPES + (torch.float32,)  # what an attention output may be
FP8_DTYPES = tuple(
    dt for dt in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if dt is not None
)


class InvalidOptionError(KeyError, ValueError):
    """An option string that is not one of the accepted values (e.g. ``kv_layout="NDH"``)."""

    def __str__(self) -> str:  # KeyError would quote the message; print it plainly.
        return str(self.args[0]) if self.args else ""


CHECK_ERRORS = (TypeError, ValueError, NotImplementedError)  # the typed errors of bad input (DESIGN.md §Errors)


def in_callers_terms(error: Exception, names: Mapping[str, str], context: str) -> Exception:
    """A typed error (CHECK_ERRORS) of a call made on a caller's behalf, in the caller's argument names: every
    standalone ``name`` of ``names`` in its message becomes ``names[name]`` (``k`` -> ``k_p``), and a message that
    then names none of them gets ``context`` in front. The same error type (its subclasses included) where it takes
    a message alone, else its nearest CHECK_ERRORS base. Use: ``except CHECK_ERRORS as e: raise
    in_callers_terms(e, ...) from e`` (a try block costs nothing when nothing is raised)."""
    pattern = r"\b(" + "|".join(re.escape(name) for name in names) + r")\b"
    message = re.sub(pattern, lambda match: names[match.group(1)], str(error))
    if not any(re.search(r"\b" + re.escape(new) + r"\b", message) for new in names.values()):
        message = f"{context}: {message}"
    try:
        return type(error)(message)
    except Exception:  # an error type whose constructor takes other arguments
        return next(base for base in type(error).__mro__ if base in CHECK_ERRORS)(message)


class InvalidDtypeError(TypeError, ValueError):
    """A dtype argument that is neither an accepted ``torch.dtype`` nor the name of one. A wrong dtype
    is a ``TypeError`` (DESIGN.md §Errors); a bad name is also a bad value string, as a ``ValueError``
    (what the CLI and ``canonicalize_torch_dtype`` always raised), so callers catching either work."""


# Short names beside torch's own ("float16", "half", "bfloat16", "float8_e4m3fn", ...).
DTYPE_ALIASES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_dtype(name: str, value, allowed: Optional[Sequence[torch.dtype]] = None) -> torch.dtype:
    """``value`` as a ``torch.dtype``; ``name`` is the argument's name for the error message.

    ``value``: a ``torch.dtype``, or a string: a dtype name as torch spells it (``"float16"``,
    ``"half"``, ``"bfloat16"``, ``"float8_e4m3fn"``, with or without a leading ``"torch."``) or one of
    :data:`DTYPE_ALIASES` (``"bf16"``, ``"fp16"``, ``"fp32"``); case and surrounding spaces are
    ignored. ``allowed``: the dtypes accepted (default: every torch dtype).
    Raises :class:`InvalidDtypeError` for anything else."""
    dtype = value if isinstance(value, torch.dtype) else None
    if isinstance(value, str):
        key = value.strip().lower()
        key = key[len("torch."):] if key.startswith("torch.") else key
        dtype = DTYPE_ALIASES.get(key)
        if dtype is None and key:
            found = getattr(torch, key, None)
            dtype = found if isinstance(found, torch.dtype) else None
    if dtype is not None and (allowed is None or dtype in allowed):
        return dtype
    expected = f"one of {_dtype_names(allowed)}" if allowed is not None else (
        "a torch.dtype or a dtype name such as 'bfloat16' or 'bf16'")
    raise InvalidDtypeError(f"{name}: expected {expected}, got {describe(value)}")


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


def check_same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    """All named tensors (None ones skipped) on one device; returns it."""
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
