"""``flashinfer.utils``: enums, constants and small helpers that callers import.

Everything here works without a GPU: the capability queries answer ``False`` / the portable
backend name on CPU devices (and on CUDA devices when CUDA is unavailable) instead of raising, so the
same caller code runs in CPU-only CI. Only :func:`get_compute_capability` raises for a non-CUDA
device, as upstream does.

This module never imports Triton and does no work at import time.
"""

from __future__ import annotations

import enum
import functools
import logging
import re
from typing import Callable, Iterable, Optional, Sequence, Tuple, Union

import torch

from ._core.checks import FP8_DTYPES, InvalidOptionError, check_option, check_tensor, describe, parse_dtype
from .reference.positional import alibi_slopes

__all__ = [
    "PosEncodingMode",
    "MaskMode",
    "TensorLayout",
    "LogLevel",
    "log2e",
    "get_alibi_slopes",
    "get_compute_capability",
    "is_sm90a_supported",
    "is_sm100a_supported",
    "is_sm110a_supported",
    "is_sm120a_supported",
    "is_sm121a_supported",
    "is_fa3_backend_supported",
    "determine_attention_backend",
    "determine_gemm_backend",
    "determine_mla_backend",
    "device_support_pdl",
    "canonicalize_torch_dtype",
    "check_shape_dtype_device",
    "next_positive_power_of_2",
    "ceil_div",
    "round_up",
    "get_indptr",
    "is_float8",
    "FP4Tensor",
    "register_custom_op",
    "register_fake_op",
    "set_log_level",
    "parse_kv_layout",
    "parse_pos_encoding_mode",
]


# --------------------------------------------------------------------------------------------------
# Enums and constants
# --------------------------------------------------------------------------------------------------


class PosEncodingMode(enum.Enum):
    """Positional encoding applied inside attention. Public APIs take the member *name* as a string."""

    NONE = 0
    ROPE_LLAMA = 1
    ALIBI = 2


class MaskMode(enum.Enum):
    """Attention mask kind; ``MULTIITEMSCORING`` is accepted for compatibility (upstream v0.2.6+)."""

    NON_CAUSAL = 0
    CAUSAL = 1
    CUSTOM = 2
    MULTIITEMSCORING = 3


class TensorLayout(enum.Enum):
    """KV layout: ``NHD`` = (tokens, heads, dim), ``HND`` = (heads, tokens, dim). APIs take the name."""

    NHD = 0
    HND = 1


class LogLevel(enum.Enum):
    """Log levels accepted by :func:`set_log_level` (upstream's spdlog levels, same values)."""

    TRACE = 0
    DEBUG = 1
    INFO = 2
    WARN = 3
    ERROR = 4
    CRITICAL = 5


#: ``log2(e)``: multiply a natural-log quantity by this to get base 2 (LSE is base 2 everywhere).
log2e = 1.4426950408889634


# --------------------------------------------------------------------------------------------------
# Option strings used by the API layer
# --------------------------------------------------------------------------------------------------

_KV_LAYOUTS = tuple(m.name for m in TensorLayout)
_POS_ENCODING_MODES = tuple(m.name for m in PosEncodingMode)


def parse_kv_layout(kv_layout: Union[str, TensorLayout]) -> TensorLayout:
    """Parse a ``kv_layout`` option.

    Args:
        kv_layout: ``"NHD"`` or ``"HND"`` (a :class:`TensorLayout` member is passed through).

    Returns:
        The :class:`TensorLayout` member.

    Raises:
        InvalidOptionError: (a ``KeyError`` and a ``ValueError``) for any other value, e.g.
            ``Invalid kv_layout 'NDH': expected one of 'NHD', 'HND'``.
    """
    if isinstance(kv_layout, TensorLayout):
        return kv_layout
    return TensorLayout[check_option("kv_layout", kv_layout, _KV_LAYOUTS)]


def parse_pos_encoding_mode(pos_encoding_mode: Union[str, PosEncodingMode]) -> PosEncodingMode:
    """Parse a ``pos_encoding_mode`` option.

    Args:
        pos_encoding_mode: ``"NONE"``, ``"ROPE_LLAMA"`` or ``"ALIBI"`` (a :class:`PosEncodingMode`
            member is passed through).

    Returns:
        The :class:`PosEncodingMode` member.

    Raises:
        InvalidOptionError: (a ``KeyError`` and a ``ValueError``) for any other value.
    """
    if isinstance(pos_encoding_mode, PosEncodingMode):
        return pos_encoding_mode
    return PosEncodingMode[check_option("pos_encoding_mode", pos_encoding_mode, _POS_ENCODING_MODES)]


# --------------------------------------------------------------------------------------------------
# ALiBi
# --------------------------------------------------------------------------------------------------


def get_alibi_slopes(n_heads: int, device=None) -> torch.Tensor:
    """ALiBi slopes, one per head.

    Args:
        n_heads: number of (query) heads, a positive int.
        device: where to allocate the result (default: CPU).

    Returns:
        float32 tensor ``[n_heads]``; see :func:`flashtile.reference.positional.alibi_slopes` for
        the formula (the standard recipe, including head counts that are not powers of two).

    Raises:
        ValueError: ``n_heads`` is not a positive int.
    """
    return alibi_slopes(n_heads, device=device)


# --------------------------------------------------------------------------------------------------
# Device capabilities
# --------------------------------------------------------------------------------------------------

DeviceLike = Union[torch.device, str, int]


def _as_device(device: DeviceLike) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if isinstance(device, str):
        return torch.device(device)
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cuda", device)
    raise TypeError(f"device: expected a torch.device, a device string or a CUDA index, got {describe(device)}")


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> Tuple[int, int]:
    major, minor = torch.cuda.get_device_capability(index)
    return int(major), int(minor)


def get_compute_capability(device: DeviceLike) -> Tuple[int, int]:
    """Compute capability ``(major, minor)`` of a CUDA device; cached per device index.

    Args:
        device: a CUDA ``torch.device`` (``"cuda"`` means the current device), a device string,
            or a CUDA device index.

    Returns:
        ``(major, minor)``, e.g. ``(9, 0)`` on H100.

    Raises:
        ValueError: ``device`` is not a CUDA device.
    """
    dev = _as_device(device)
    if dev.type != "cuda":
        raise ValueError(f"device: expected a CUDA device, got {dev}")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return _cuda_capability(index)


def _version_at_least(version: Optional[str], base: str) -> bool:
    """``version >= base`` for dotted version strings; ``None`` (no CUDA build) is never enough."""
    if not version:
        return False

    def parts(v: str) -> Tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", v)[:3])

    return parts(version) >= parts(base)


def _cuda_capability_or_none(device: DeviceLike) -> Optional[Tuple[int, int]]:
    """Capability of a usable CUDA device, or None for CPU/other devices or when CUDA is unavailable."""
    dev = _as_device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return get_compute_capability(dev)


def _is_sm_supported(device: DeviceLike, major: int, minor: Optional[int], min_cuda: str) -> bool:
    cap = _cuda_capability_or_none(device)
    if cap is None or cap[0] != major or (minor is not None and cap[1] != minor):
        return False
    return _version_at_least(torch.version.cuda, min_cuda)


def is_sm90a_supported(device: DeviceLike) -> bool:
    """True on an SM 9.x (Hopper) CUDA device with a CUDA >= 12.3 torch build; False elsewhere (CPU too)."""
    return _is_sm_supported(device, 9, None, "12.3")


def is_sm100a_supported(device: DeviceLike) -> bool:
    """True on an SM 10.x (Blackwell datacenter) device with CUDA >= 12.8; False elsewhere (CPU too)."""
    return _is_sm_supported(device, 10, None, "12.8")


def is_sm110a_supported(device: DeviceLike) -> bool:
    """True on an SM 11.x device with CUDA >= 13.0; False elsewhere (CPU too)."""
    return _is_sm_supported(device, 11, None, "13.0")


def is_sm120a_supported(device: DeviceLike) -> bool:
    """True on an SM 12.0 device with CUDA >= 12.8; False elsewhere (CPU too)."""
    return _is_sm_supported(device, 12, 0, "12.8")


def is_sm121a_supported(device: DeviceLike) -> bool:
    """True on an SM 12.1 device with CUDA >= 12.9; False elsewhere (CPU too)."""
    return _is_sm_supported(device, 12, 1, "12.9")


def _pos_encoding_value(pos_encoding_mode) -> int:
    if isinstance(pos_encoding_mode, PosEncodingMode):
        return pos_encoding_mode.value
    if isinstance(pos_encoding_mode, str):
        return parse_pos_encoding_mode(pos_encoding_mode).value
    return int(pos_encoding_mode)


def is_fa3_backend_supported(
    pos_encoding_mode: Union[int, str, PosEncodingMode],
    use_fp16_qk_reductions: bool,
    use_custom_mask: bool,
    dtype_q: torch.dtype,
    dtype_kv: torch.dtype,
) -> bool:
    """Whether upstream's FA3 (SM90) attention backend supports a configuration.

    Args:
        pos_encoding_mode: ``PosEncodingMode`` value (int), member, or name.
        use_fp16_qk_reductions: fp16 accumulation of QK requested.
        use_custom_mask: a custom mask is used.
        dtype_q, dtype_kv: query / KV dtypes (not restricting, kept for the upstream signature).

    Returns:
        False if a custom mask, RoPE/ALiBi or fp16 QK reduction is requested, else True. (In
        flashtile, "fa2" and "fa3" both select the same Triton kernels; this answers the upstream
        question for callers that branch on it.)
    """
    if use_custom_mask:
        return False
    if _pos_encoding_value(pos_encoding_mode) != PosEncodingMode.NONE.value:
        return False
    if use_fp16_qk_reductions:
        return False
    return True


def determine_attention_backend(
    device: DeviceLike,
    pos_encoding_mode: Union[int, str, PosEncodingMode],
    use_fp16_qk_reductions: bool,
    use_custom_mask: bool,
    dtype_q: torch.dtype,
    dtype_kv: torch.dtype,
) -> str:
    """Upstream's ``backend="auto"`` choice for attention.

    Args:
        device: the device the attention runs on (any device; CPU answers ``"fa2"``).
        pos_encoding_mode, use_fp16_qk_reductions, use_custom_mask, dtype_q, dtype_kv: as in
            :func:`is_fa3_backend_supported`.

    Returns:
        ``"fa3"`` on an SM90a device when :func:`is_fa3_backend_supported`, else ``"fa2"``.
    """
    if is_sm90a_supported(device) and is_fa3_backend_supported(
        pos_encoding_mode, use_fp16_qk_reductions, use_custom_mask, dtype_q, dtype_kv
    ):
        return "fa3"
    return "fa2"


def determine_gemm_backend(device: DeviceLike) -> str:
    """Upstream's SegmentGEMM ``backend="auto"`` choice.

    Returns:
        ``"sm90"`` on an SM 9.x device with CUDA >= 12.3, else ``"sm80"`` (also on CPU).
    """
    return "sm90" if _is_sm_supported(device, 9, None, "12.3") else "sm80"


def determine_mla_backend(device: DeviceLike) -> str:
    """Upstream's MLA ``backend="auto"`` choice: ``"fa3"`` on SM90a, else ``"fa2"`` (also on CPU)."""
    return "fa3" if is_sm90a_supported(device) else "fa2"


def device_support_pdl(device: DeviceLike) -> bool:
    """Whether programmatic dependent launch is available: a CUDA device of major >= 9.

    Returns False for CPU devices and when CUDA is unavailable. (flashtile's Triton kernels accept
    ``enable_pdl`` and ignore it.)
    """
    cap = _cuda_capability_or_none(device)
    return cap is not None and cap[0] >= 9


# --------------------------------------------------------------------------------------------------
# dtypes and argument checks
# --------------------------------------------------------------------------------------------------


def canonicalize_torch_dtype(x: Union[torch.dtype, str]) -> torch.dtype:
    """Turn a dtype or its name into a ``torch.dtype``.

    Args:
        x: a ``torch.dtype``, or a name such as ``"float16"``, ``"bfloat16"``, ``"half"``,
            ``"float8_e4m3fn"`` (a leading ``"torch."`` is allowed), or ``"bf16"``, ``"fp16"``,
            ``"fp32"``.

    Returns:
        The ``torch.dtype``.

    Raises:
        InvalidDtypeError: ``x`` is neither a ``torch.dtype`` nor the name of one; it is both a
            ``TypeError`` and a ``ValueError`` (``flashtile._core.checks.parse_dtype``).
    """
    return parse_dtype("dtype", x)


def _same_device(actual: torch.device, expected: torch.device) -> bool:
    # A device without an index ("cuda") matches any device of that type.
    if expected.index is None:
        return actual.type == expected.type
    return actual == expected


def check_shape_dtype_device(
    x: torch.Tensor,
    expected_shape: Optional[Sequence[int]],
    expected_dtype: Optional[torch.dtype],
    expected_device: Optional[DeviceLike],
    name: str,
) -> None:
    """Check a tensor against an expected shape, dtype and device (each optional).

    Args:
        x: the tensor to check.
        expected_shape: exact shape, or None to skip.
        expected_dtype: exact dtype, or None to skip.
        expected_device: device, or None to skip; a device without an index (``"cuda"``) matches
            any device of that type.
        name: the argument name used in messages.

    Raises:
        TypeError: ``x`` is not a tensor.
        ValueError: ``Invalid shape/dtype/device of {name}: expected ..., got ...``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"Invalid type of {name}: expected a torch.Tensor, got {describe(x)}")
    if expected_shape is not None and tuple(x.shape) != tuple(expected_shape):
        raise ValueError(f"Invalid shape of {name}: expected {list(expected_shape)}, got {list(x.shape)}")
    if expected_dtype is not None and x.dtype != expected_dtype:
        raise ValueError(f"Invalid dtype of {name}: expected {expected_dtype}, got {x.dtype}")
    if expected_device is not None and not _same_device(x.device, _as_device(expected_device)):
        raise ValueError(f"Invalid device of {name}: expected {_as_device(expected_device)}, got {x.device}")


def is_float8(x: torch.Tensor) -> bool:
    """Whether ``x`` has an fp8 dtype (``float8_e4m3fn`` or ``float8_e5m2``)."""
    return x.dtype in FP8_DTYPES


class FP4Tensor:
    """An NVFP4 tensor: packed 4-bit values plus their per-block fp8 scale factors.

    PyTorch has no 4-bit dtype, so two FP4 (e2m1) values share one uint8. flashtile's kernels do not
    read or write FP4 (the FlashInfer functions that take one, e.g. the ``out=`` of the TensorRT-LLM
    entry points in :mod:`flashtile.trtllm`, raise :class:`NotImplementedError`); the class exists so
    that callers can import and build it.

    Args:
        data: uint8 tensor ``[num_tokens, ..., ceil(original_shape[-1] / 2)]``, two values per byte.
        scale: float8_e4m3fn scale factors, first dimension a multiple of 128 (rows of the swizzled
            scale layout). One scale tensor may serve several ``data`` tensors at different offsets.
        scale_start_index: first row of ``scale`` that belongs to ``data`` (e.g. decode rows after
            the prefill rows of the same step), ``0 <= scale_start_index`` and
            ``scale_start_index + data.shape[0] <= scale.shape[0]``.
        original_shape: the unpacked shape; when given, it must equal ``data.shape`` except in the last
            dimension, which ``data`` holds in ``ceil(original_shape[-1] / 2)`` bytes.

    Raises:
        TypeError: ``data`` or ``scale`` is not a tensor of the expected dtype.
        ValueError: the shapes or ``scale_start_index`` do not fit together as described above.
    """

    def __init__(
        self,
        data: torch.Tensor,
        scale: torch.Tensor,
        scale_start_index: int = 0,
        original_shape: Optional[Tuple[int, ...]] = None,
    ):
        check_tensor("data", data, dtypes=(torch.uint8,))
        check_tensor("scale", scale, dtypes=(torch.float8_e4m3fn,))
        if data.dim() < 1 or scale.dim() < 1:
            raise ValueError(f"data and scale: expected tensors of at least 1 dimension, got shapes "
                             f"{list(data.shape)} and {list(scale.shape)}")
        if scale.shape[0] % 128 != 0:
            raise ValueError("scale: expected a first dimension that is a multiple of 128, "
                             f"got shape {list(scale.shape)}")
        if not 0 <= scale_start_index < scale.shape[0] or scale_start_index + data.shape[0] > scale.shape[0]:
            raise ValueError(
                f"scale_start_index: expected 0 <= scale_start_index and scale_start_index + data.shape[0] "
                f"<= scale.shape[0] = {scale.shape[0]}, got {scale_start_index} with data.shape[0] = {data.shape[0]}"
            )
        if original_shape is not None:
            original_shape = tuple(int(d) for d in original_shape)
            packed = original_shape[:-1] + ((original_shape[-1] + 1) // 2,) if original_shape else ()
            if tuple(data.shape) != packed:
                raise ValueError(
                    f"original_shape: expected data.shape[:-1] + (ceil(original_shape[-1] / 2),) == data.shape "
                    f"{list(data.shape)}, got original_shape {list(original_shape)}"
                )
        self.data = data
        self.scale = scale
        self.scale_start_index = scale_start_index
        self.original_shape = original_shape
        self.dtype = "nvfp4"  # as upstream: a string, since torch has no FP4 dtype to name

    def __repr__(self) -> str:
        return (f"FP4Tensor(data={describe(self.data)}, scale={describe(self.scale)}, "
                f"scale_start_index={self.scale_start_index}, original_shape={self.original_shape})")


# --------------------------------------------------------------------------------------------------
# Integer helpers
# --------------------------------------------------------------------------------------------------


def next_positive_power_of_2(x: int) -> int:
    """Smallest power of two ``>= x``, and 1 for ``x < 1``.

    Examples: 0 -> 1, 1 -> 1, 3 -> 4, 1024 -> 1024, 1025 -> 2048.
    """
    if x < 1:
        return 1
    # Bit smearing instead of int.bit_length() so torch.compile can trace it (as upstream); exact up
    # to 2**64, bit_length beyond.
    if x > (1 << 64):
        return 1 << (x - 1).bit_length()
    n = x - 1
    n |= n >> 1
    n |= n >> 2
    n |= n >> 4
    n |= n >> 8
    n |= n >> 16
    n |= n >> 32
    return n + 1


def ceil_div(x: int, y: int) -> int:
    """``ceil(x / y)`` for integers (also works elementwise on integer tensors)."""
    return (x + y - 1) // y


def round_up(x: int, y: int) -> int:
    """``x`` rounded up to a multiple of ``y``."""
    return ceil_div(x, y) * y


def get_indptr(x: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sum with a leading 0: lengths ``[B]`` -> indptr ``[B + 1]``.

    Args:
        x: 1-D integer tensor of lengths ``[B]``.

    Returns:
        int64 tensor ``[B + 1]`` on ``x``'s device with ``out[0] = 0`` and
        ``out[i + 1] = x[0] + ... + x[i]`` (int64 like upstream).

    Raises:
        TypeError: ``x`` is not a tensor.
        ValueError: ``x`` is not 1-D.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {describe(x)}")
    if x.dim() != 1:
        raise ValueError(f"x: expected a 1-D tensor of lengths, got shape {list(x.shape)}")
    x = x.to(torch.int64)
    out = torch.zeros(x.shape[0] + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(x, 0, out=out[1:])
    return out


# --------------------------------------------------------------------------------------------------
# Op registration (compatibility) and logging
# --------------------------------------------------------------------------------------------------


def register_custom_op(
    name: str,
    fn: Optional[Callable] = None,
    /,
    *,
    mutates_args: Union[str, Iterable[str]] = (),
    device_types: Optional[Union[str, Sequence[str]]] = None,
    schema: Optional[str] = None,
) -> Callable:
    """Pass-through decorator kept for import compatibility with ``flashinfer.utils``.

    flashtile registers its own ops with ``torch.library`` itself (``flashtile/_core/ops.py``); this
    function registers nothing. ``register_custom_op(name, fn)`` returns ``fn``;
    ``@register_custom_op(name, mutates_args=...)`` returns the decorated function unchanged.
    """
    if fn is not None:
        return fn
    return lambda f: f


def register_fake_op(name: str, fn: Optional[Callable] = None) -> Callable:
    """Pass-through decorator kept for import compatibility (see :func:`register_custom_op`)."""
    if fn is not None:
        return fn
    return lambda f: f


_LOG_LEVEL_NAMES = tuple(m.name.lower() for m in LogLevel)
_PY_LOG_LEVELS = {
    LogLevel.TRACE: logging.DEBUG - 5,  # Python logging has no TRACE; use the level below DEBUG.
    LogLevel.DEBUG: logging.DEBUG,
    LogLevel.INFO: logging.INFO,
    LogLevel.WARN: logging.WARNING,
    LogLevel.ERROR: logging.ERROR,
    LogLevel.CRITICAL: logging.CRITICAL,
}


def set_log_level(lvl_str: Union[str, LogLevel]) -> None:
    """Set the level of the ``"flashtile"`` Python logger.

    Args:
        lvl_str: one of ``"trace"``, ``"debug"``, ``"info"``, ``"warn"``, ``"error"``,
            ``"critical"`` (case-insensitive), or a :class:`LogLevel` member. ``"trace"`` maps to
            ``logging.DEBUG - 5``.

    Raises:
        InvalidOptionError: (a ``ValueError`` and a ``KeyError``, as upstream's dict lookup) for
            any other value.
    """
    if isinstance(lvl_str, LogLevel):
        level = lvl_str
    else:
        key = lvl_str.lower() if isinstance(lvl_str, str) else lvl_str
        if not isinstance(key, str) or key not in _LOG_LEVEL_NAMES:
            raise InvalidOptionError(
                f"Invalid log level {lvl_str!r}: expected one of {', '.join(map(repr, _LOG_LEVEL_NAMES))}"
            )
        level = LogLevel[key.upper()]
    logging.getLogger("flashtile").setLevel(_PY_LOG_LEVELS[level])
