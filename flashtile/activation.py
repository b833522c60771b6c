"""Gated activations (``flashinfer.activation``): ``out = act(input[..., :d]) * input[..., d:]``.

The activation is applied to the first half of the last dim and multiplied by the second half, in
float32, rounded once to the output dtype. Any ``d`` works (odd too); upstream's "multiple of 16
bytes" restriction does not apply.

Host path: the checks of a call on 2-D rows are remembered per key of its tensors' metadata
(_core/memo.py); a later eager call with the same key goes straight to the implementation.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._core import ops_small as ops
from ._core.buffers import new_output, new_output_as
from ._core.checks import check_tensor
from ._core.memo import CallMemo, eager, tensor_key

__all__ = ["silu_and_mul", "gelu_and_mul", "gelu_tanh_and_mul"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _as_rows(x: torch.Tensor, width: int) -> Optional[torch.Tensor]:
    """``x`` as a 2-D ``[rows, width]`` view, or None when its strides do not allow one."""
    try:
        return x.view(-1, width)
    except RuntimeError:
        return None


# Keys of 2-D calls whose checks passed -> (the eager act_and_mul function, output shape). On 2-D
# tensors the ``[rows, width]`` views below are the tensors themselves, so the function takes them as given.
_CALLS = CallMemo()


def _act_and_mul(input, out, activation: str) -> torch.Tensor:
    key = None
    if eager():
        try:
            key = (tensor_key(input), None if out is None else tensor_key(out), activation)
        except Exception:
            key = None
    entry = _CALLS.get(key)
    if entry is None:
        return _checked_act_and_mul(input, out, activation, key)
    run, out_shape = entry
    if out is None:
        out = new_output_as(input, out_shape)
    run(input, out, activation, key)
    return out


def _checked_act_and_mul(input, out, activation: str, key) -> torch.Tensor:
    check_tensor("input", input, dtypes=FLOAT_DTYPES)
    if input.dim() < 1 or input.shape[-1] % 2 != 0:
        raise ValueError(f"input: expected shape [..., 2 * d] (an even last dim), got {list(input.shape)}")
    d = input.shape[-1] // 2
    out_shape = (*input.shape[:-1], d)
    if out is None:
        out = new_output(out_shape, input.dtype, input.device)
    else:
        check_tensor("out", out, shape=out_shape, dtypes=(input.dtype,), device=input.device)
    if out.numel() == 0:
        return out
    if key is not None and input.dim() == 2:
        run = ops.eager_function(ops.act_and_mul, input.device)
        _CALLS.remember(key, (run, out_shape))
        run(input, out, activation, key)
        return out
    rows_in = _as_rows(input, 2 * d)
    if rows_in is None:  # e.g. a transposed view: one copy, then the fast path
        rows_in = input.reshape(-1, 2 * d)
    rows_out = _as_rows(out, d)
    if rows_out is None:
        tmp = new_output((rows_in.shape[0], d), out.dtype, out.device)
        ops.call(ops.act_and_mul, rows_in, tmp, activation)
        out.copy_(tmp.view(out_shape))
    else:
        ops.call(ops.act_and_mul, rows_in, rows_out, activation)
    return out


def silu_and_mul(input: torch.Tensor, out: Optional[torch.Tensor] = None,
                 enable_pdl: Optional[bool] = None) -> torch.Tensor:
    """``out = silu(input[..., :d]) * input[..., d:]`` with ``silu(x) = x * sigmoid(x)``.

    Args:
        input: ``[..., 2 * d]``, float16, bfloat16 or float32; any d.
        out: optional ``[..., d]`` output with input's dtype and leading dims; filled and returned.
        enable_pdl: accepted for compatibility; ignored.

    Returns:
        ``out`` ``[..., d]`` in input's dtype.
    """
    return _act_and_mul(input, out, "silu")


def gelu_and_mul(input: torch.Tensor, out: Optional[torch.Tensor] = None,
                 enable_pdl: Optional[bool] = None) -> torch.Tensor:
    """``out = gelu(input[..., :d]) * input[..., d:]`` with the exact GELU
    ``x / 2 * (1 + erf(x / sqrt(2)))``. Arguments as :func:`silu_and_mul`."""
    return _act_and_mul(input, out, "gelu")


def gelu_tanh_and_mul(input: torch.Tensor, out: Optional[torch.Tensor] = None,
                      enable_pdl: Optional[bool] = None) -> torch.Tensor:
    """``out = gelu_tanh(input[..., :d]) * input[..., d:]`` with the tanh approximation
    ``x / 2 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x**3)))``. Arguments as :func:`silu_and_mul`."""
    return _act_and_mul(input, out, "gelu_tanh")
