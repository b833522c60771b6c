"""Output allocation. With output poisoning on (``FLASHTILE_DEBUG=1``, or
``_core.debug.set_output_poisoning(True)`` as the tests do) new outputs are filled with NaN (-1 for
integers) so an element a kernel forgets to write fails a test instead of passing by luck."""

from __future__ import annotations

import threading

import torch

from . import debug
from .debug import output_poisoning_enabled

_empty_like = torch.empty_like
_CONTIGUOUS = torch.contiguous_format


def _poisoned_in_debug(out: torch.Tensor) -> torch.Tensor:
    if output_poisoning_enabled():
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


_TEMPLATES: dict = {}  # (shape, dtype, device) -> a one-element tensor expanded to shape
MAX_TEMPLATES = 4096
_is_compiling = torch.compiler.is_compiling


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A new contiguous tensor of ``shape``, ``dtype`` on ``device``. Eagerly it is ``torch.empty_like`` of a
    template kept per (shape, dtype, device): a one-element tensor expanded to ``shape`` (a few bytes), which
    allocates in half the host time of ``torch.empty(shape, dtype=..., device=...)`` (no keyword and device
    parsing), for the launch-bound calls that allocate outputs on every call."""
    if _is_compiling():  # traced code sees the plain allocation
        return _poisoned_in_debug(torch.empty(shape, dtype=dtype, device=device))
    key = (shape, dtype, device)
    try:
        template = _TEMPLATES.get(key)
    except TypeError:  # an unhashable shape (a list)
        return _poisoned_in_debug(torch.empty(shape, dtype=dtype, device=device))
    if template is None:
        # torch.empty's errors and symbolic sizes; devices that depend on the current or default device
        if type(shape) is not tuple and type(shape) is not torch.Size or \
                not all(type(n) is int and n >= 0 for n in shape) or not isinstance(device, torch.device) or \
                (device.index is None and device.type != "cpu"):
            return _poisoned_in_debug(torch.empty(shape, dtype=dtype, device=device))
        if len(_TEMPLATES) >= MAX_TEMPLATES:
            _TEMPLATES.clear()
        template = _TEMPLATES[key] = torch.empty((1,) * len(shape), dtype=dtype, device=device).expand(tuple(shape))
    out = _empty_like(template, memory_format=_CONTIGUOUS)
    if debug._poisoning is not False:
        _poisoned_in_debug(out)
    return out


def new_output_as(x: torch.Tensor, shape) -> torch.Tensor:
    """A contiguous output of ``shape`` with ``x``'s dtype and device (``x.new_empty``: a quarter less
    host time than ``torch.empty(shape, dtype=..., device=...)``)."""
    return _poisoned_in_debug(x.new_empty(shape))


def new_output_like(x: torch.Tensor) -> torch.Tensor:
    """A contiguous output with ``x``'s shape, dtype and device. ``torch.empty_like`` takes under half
    the host time of ``torch.empty(shape, dtype=..., device=...)``, which matters for launch-bound ops."""
    out = _empty_like(x, memory_format=_CONTIGUOUS)
    if debug._poisoning is not False:  # on, or not decided yet (it runs on every call of the small ops)
        _poisoned_in_debug(out)
    return out


def new_output_like_contiguous(x: torch.Tensor) -> torch.Tensor:
    """:func:`new_output_like` of an ``x`` known to be contiguous (by a memo key holding its shape and strides):
    ``torch.empty_like``'s default (``preserve_format``) then gives a contiguous output with x's strides,
    without parsing a ``memory_format`` keyword (a fifth less host time)."""
    out = _empty_like(x)
    if debug._poisoning is not False:
        _poisoned_in_debug(out)
    return out


def output_maker(x: torch.Tensor):
    """The function that makes the contiguous outputs like ``x`` for calls whose memo key holds x's shape
    and strides: :func:`new_output_like_contiguous` for a contiguous ``x``, else :func:`new_output_like`."""
    return new_output_like_contiguous if x.is_contiguous() else new_output_like



def persistent_tensors():
    """The context in which to make a tensor the library keeps between calls (scratch, pools, plans): outside
    inference mode even when the call that makes it runs inside, so that a later call outside inference mode
    may write it in place (an inference tensor rejects that). A normal tensor is written freely in both modes."""
    return torch.inference_mode(False)


_DISCARDED_BUFFERS: dict = {}  # (device, dtype) -> buffers, newest last; never freed (see discarded_output)
_DISCARDED_VIEWS: dict = {}  # (shape, dtype, device) -> the view handed out
MAX_DISCARDED_VIEWS = 4096


def discarded_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A contiguous tensor of ``shape`` and ``dtype`` for a result the caller did not ask for (an LSE
    without ``return_lse``, a sampler's ``valid`` flags without ``return_valid``), so the call allocates
    nothing for it. It is a view of a per-device buffer that is never freed: writes from several streams
    may race, but nobody reads it, and a CUDA graph that captured a write into it stays valid. The same
    view comes back for the same arguments (one dict lookup)."""
    key = (tuple(shape), dtype, device)
    view = _DISCARDED_VIEWS.get(key)
    if view is not None:
        return view
    numel = 1
    for n in shape:
        numel *= n
    device = torch.device(device)
    buffers = _DISCARDED_BUFFERS.setdefault((device, dtype), [])
    if not buffers or buffers[-1].numel() < numel:
        size = max(numel, 2 * buffers[-1].numel() if buffers else 1024)
        with persistent_tensors():
            buffers.append(torch.empty(size, dtype=dtype, device=device))
    if len(_DISCARDED_VIEWS) >= MAX_DISCARDED_VIEWS:
        _DISCARDED_VIEWS.clear()
    view = _DISCARDED_VIEWS[key] = buffers[-1][:numel].view(tuple(shape))
    return view


# Zeroed int32 scratch handed out in slices of pools: one torch.zeros per ZEROED_POOL_USES slices of a size
# instead of one per call (on a GPU a zero fill is a kernel launch: a few µs of host time). Each slice is handed
# out once. Pools are kept per device and CUDA stream: the pool's zeros are written on the stream that then uses
# its slices, and a finished pool returns to PyTorch's allocator on that stream, which orders its reuse after
# them. A stream capturing a CUDA graph gets a torch.zeros of its own (the graph replays that fill).
ZEROED_POOL_USES = 256
MAX_ZEROED_POOLS = 64
_ZEROED_POOLS: dict = {}  # (device, stream) -> [pool, next free element]
_ZEROED_LOCK = threading.Lock()
_ZERO_ALIGN = 4  # int32 elements per 16 bytes: slices keep the pool's 16-byte alignment (Triton specializes on it)


def zeroed_int32(numel: int, device: torch.device) -> torch.Tensor:
    """``numel`` int32 zeros on ``device``, 16-byte aligned, for one kernel launch that may write them (the
    sampler's row barriers): a fresh slice of a pool of zeros, never handed out again."""
    key: tuple
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(numel, dtype=torch.int32, device=device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (index, torch._C._cuda_getCurrentRawStream(index))
    else:
        key = (device, None)
    size = -(-max(numel, 1) // _ZERO_ALIGN) * _ZERO_ALIGN
    with _ZEROED_LOCK:
        entry = _ZEROED_POOLS.get(key)
        if entry is None or entry[1] + size > entry[0].numel():
            if entry is None and len(_ZEROED_POOLS) >= MAX_ZEROED_POOLS:
                _ZEROED_POOLS.clear()
            with persistent_tensors():
                pool = torch.zeros(size * ZEROED_POOL_USES, dtype=torch.int32, device=device)
            entry = _ZEROED_POOLS[key] = [pool, 0]
        start = entry[1]
        entry[1] = start + size
    return entry[0][start:start + numel]
