"""``flashinfer.quantization``: bit packing of boolean masks (``numpy.packbits`` semantics).

Custom attention masks are passed to the kernels packed 8 per byte (``bitorder="little"``); these
functions do the packing. They run on the device of their input with vectorized PyTorch ops (the
implementation is :mod:`flashtile.reference.packbits`; there is no separate Triton kernel: the work
is a gather and a weighted sum, memory-bound either way).

``segment_packbits`` has a data-dependent output size: it reads ``indptr`` on the host once, so it
synchronizes and is not capturable in a CUDA graph or traceable by ``torch.compile`` (as upstream).
"""

from __future__ import annotations

from typing import Tuple

import torch

from .._core.checks import check_option, check_tensor, describe
from ..reference.packbits import packbits as _packbits_ref
from ..reference.packbits import segment_packbits as _segment_packbits_ref

__all__ = ["packbits", "segment_packbits"]

_BITORDERS = ("big", "little")
_INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _check_bits_input(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {describe(x)}")
    if x.dim() != 1:
        raise ValueError(
            f"x: expected a 1-D tensor (flatten a mask with .view(-1) first), got shape {list(x.shape)}"
        )


def packbits(x: torch.Tensor, bitorder: str = "big") -> torch.Tensor:
    """Pack the elements of a 1-D boolean tensor into bits of uint8, like ``numpy.packbits``.

    Args:
        x: 1-D tensor ``[n]``, usually bool or 0/1 integers; any dtype is accepted and nonzero
            means 1 (as upstream's ``x.to(torch.bool)``).
        bitorder: ``"big"`` (element 0 of each byte in the most significant bit, numpy's default)
            or ``"little"`` (element 0 in the least significant bit; the layout the attention kernels
            read for ``packed_custom_mask``).

    Returns:
        uint8 tensor ``[ceil(n / 8)]`` on ``x``'s device; the last byte is zero-padded.

    Raises:
        TypeError: ``x`` is not a tensor.
        ValueError: ``x`` is not 1-D, or ``bitorder`` is not ``"big"``/``"little"``.

    Example:
        >>> packbits(torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1], dtype=torch.bool), "little")
        tensor([77,  1], dtype=torch.uint8)
    """
    _check_bits_input(x)
    check_option("bitorder", bitorder, _BITORDERS)
    return _packbits_ref(x, bitorder)


def segment_packbits(
    x: torch.Tensor, indptr: torch.Tensor, bitorder: str = "big"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pack each segment ``x[indptr[i]:indptr[i + 1]]`` into bytes independently.

    Used for batched custom masks: segment ``i`` is request ``i``'s flattened
    ``[qo_len_i, kv_len_i]`` mask, and each segment starts on a byte boundary.

    Args:
        x: 1-D tensor ``[n]`` (bool or 0/1; nonzero means 1).
        indptr: 1-D integer tensor ``[B + 1]`` (int32 or int64), non-decreasing, with
            ``0 <= indptr[0]`` and ``indptr[-1] <= n``; ``indptr[0] > 0`` selects a window of ``x``.
            May be on the CPU while ``x`` is on the GPU.
        bitorder: ``"big"`` or ``"little"``.

    Returns:
        ``(y, new_indptr)``:
        - ``y``: uint8 ``[new_indptr[-1]]`` on ``x``'s device; segment ``i`` packed (zero-padded to
          whole bytes) in ``y[new_indptr[i]:new_indptr[i + 1]]``;
        - ``new_indptr``: int32 ``[B + 1]`` on ``indptr``'s device, ``new_indptr[0] = 0``,
          ``new_indptr[i + 1] - new_indptr[i] = ceil((indptr[i + 1] - indptr[i]) / 8)``.

    Raises:
        TypeError: ``x`` or ``indptr`` is not a tensor, or ``indptr`` is not an integer tensor.
        ValueError: ``x`` or ``indptr`` is not 1-D, ``indptr`` is empty, decreasing, negative or
            past the end of ``x``, or ``bitorder`` is invalid.

    Note:
        The output size depends on the values of ``indptr``, which are read on the host once
        (a synchronization when ``indptr`` is on the GPU).
    """
    _check_bits_input(x)
    check_tensor("indptr", indptr, dtypes=_INDEX_DTYPES)
    if indptr.dim() != 1 or indptr.shape[0] < 1:
        raise ValueError(
            f"indptr: expected a 1-D tensor [batch_size + 1] (at least 1 element), got shape {list(indptr.shape)}"
        )
    check_option("bitorder", bitorder, _BITORDERS)

    # Validate the offsets on the host; the output size needs them there anyway.
    host = indptr.to("cpu", torch.int64)
    if int(host[0]) < 0:
        raise ValueError(f"indptr: expected indptr[0] >= 0, got {int(host[0])}")
    steps = host[1:] - host[:-1]
    if steps.numel() and bool((steps < 0).any()):
        i = int(torch.nonzero(steps < 0)[0, 0])
        raise ValueError(
            f"indptr: expected a non-decreasing tensor, got indptr[{i}] = {int(host[i])} > "
            f"indptr[{i + 1}] = {int(host[i + 1])}"
        )
    if int(host[-1]) > x.shape[0]:
        raise ValueError(f"indptr: expected indptr[-1] <= len(x) = {x.shape[0]}, got {int(host[-1])}")
    return _segment_packbits_ref(x, indptr, bitorder)
