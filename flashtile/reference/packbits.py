"""Bit packing (``numpy.packbits`` semantics): the readable spec and the implementation on any device.

Pure PyTorch, vectorized (no Python loop over elements or segments); runs on the device of its
input. Inputs are assumed valid: the API layer (``flashtile.quantization``) checks them.

Bit order inside a byte: ``"big"`` puts element 0 of each group of 8 in the most significant bit
(``0b1000_0000``), ``"little"`` in the least significant bit (what the attention kernels read).
The last byte of a sequence (or of a segment) is padded with zero bits.
"""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["packbits", "segment_packbits", "unpack_mask"]


def _bit_weights(bitorder: str, device: torch.device) -> torch.Tensor:
    """uint8 ``[8]``: the value of bit slot ``b`` of a byte (128..1 for "big", 1..128 for "little")."""
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)
    return weights.flip(0) if bitorder == "big" else weights


def _pack_rows(bits: torch.Tensor, bitorder: str) -> torch.Tensor:
    """``bits``: uint8 0-1 tensor ``[nbytes * 8]`` -> uint8 ``[nbytes]``."""
    rows = bits.view(-1, 8)  # [nbytes, 8]
    # Distinct powers of two sum to at most 255: the uint8 sum cannot overflow.
    return (rows * _bit_weights(bitorder, bits.device)).sum(dim=1, dtype=torch.uint8)


def packbits(x: torch.Tensor, bitorder: str = "big") -> torch.Tensor:
    """Pack a 1-D tensor of truth values into bytes.

    Args:
        x: 1-D tensor ``[n]``, any dtype; nonzero means 1 (same as ``x.to(torch.bool)``).
        bitorder: ``"big"`` or ``"little"``.

    Returns:
        uint8 ``[ceil(n / 8)]`` on ``x``'s device.
    """
    n = x.shape[0]
    nbytes = (n + 7) // 8
    bits = torch.zeros(nbytes * 8, dtype=torch.uint8, device=x.device)
    bits[:n] = x != 0
    return _pack_rows(bits, bitorder)


def segment_packbits(
    x: torch.Tensor, indptr: torch.Tensor, bitorder: str = "big"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pack each segment ``x[indptr[i]:indptr[i + 1]]`` independently, each padded to whole bytes.

    Args:
        x: 1-D tensor ``[n]``, any dtype; nonzero means 1.
        indptr: 1-D integer tensor ``[B + 1]``, non-decreasing, ``0 <= indptr[0]`` and
            ``indptr[-1] <= n`` (``indptr[0] > 0`` selects a window of ``x``). May live on another
            device than ``x``.
        bitorder: ``"big"`` or ``"little"``.

    Returns:
        ``(y, new_indptr)``: ``y`` uint8 ``[new_indptr[-1]]`` on ``x``'s device, where segment ``i``
        occupies ``y[new_indptr[i]:new_indptr[i + 1]]``; ``new_indptr`` int32 ``[B + 1]`` on
        ``indptr``'s device, ``new_indptr[0] = 0`` and
        ``new_indptr[i + 1] - new_indptr[i] = ceil(len_i / 8)``.
    """
    device = x.device
    starts_ends = indptr.to(device=device, dtype=torch.int64)  # [B + 1]
    num_segments = starts_ends.shape[0] - 1
    seg_len = starts_ends[1:] - starts_ends[:-1]  # [B]
    packed_len = (seg_len + 7) // 8  # [B]
    new_indptr = torch.zeros(num_segments + 1, dtype=torch.int64, device=device)
    torch.cumsum(packed_len, 0, out=new_indptr[1:])

    # The output size is data dependent: one host read of the totals (the only synchronization).
    first, last, total_bytes = (int(v) for v in torch.stack([starts_ends[0], starts_ends[-1], new_indptr[-1]]).tolist())
    nnz = last - first

    # Element i of segment s (global index indptr[s] + i) goes to bit new_indptr[s] * 8 + i of the
    # output, i.e. its global index plus a per-segment shift; expand the shifts to one per element.
    shift = new_indptr[:-1] * 8 - starts_ends[:-1]  # [B]
    dest = torch.arange(first, last, device=device) + torch.repeat_interleave(shift, seg_len, output_size=nnz)  # [nnz]

    bits = torch.zeros(total_bytes * 8, dtype=torch.uint8, device=device)
    bits[dest] = (x[first:last] != 0).to(torch.uint8)
    y = _pack_rows(bits, bitorder)
    return y, new_indptr.to(device=indptr.device, dtype=torch.int32)


def unpack_mask(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Bool ``[rows, cols]`` from a row-major mask packed LSB first (what the kernels read)."""
    bits = (packed[:, None].to(torch.int32) >> torch.arange(8, device=packed.device, dtype=torch.int32)) & 1
    return bits.reshape(-1)[: rows * cols].reshape(rows, cols).bool()
