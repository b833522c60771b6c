"""Normalization (``flashinfer.norm``): RMSNorm, Gemma RMSNorm, fused residual-add RMSNorm, LayerNorm.

All compute in float32 and round once to the output dtype. Rows are the last dimension; inputs may
be strided views (a slice of a wider tensor, the q heads of a fused QKV projection); only their
element strides are used, nothing is copied.

Host path: the checks of a call are remembered per key of its tensors' metadata (_core/memo.py), so
a later eager call with the same shapes, strides, dtypes and devices checks only ``eps`` and goes
straight to the implementation (which replays its launch for the same key).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._core import ops_small as ops
from ._core.buffers import new_output_like, output_maker
from ._core.checks import check_tensor, describe
from ._core.memo import CallMemo, tensor_key

__all__ = ["rmsnorm", "fused_add_rmsnorm", "gemma_rmsnorm", "gemma_fused_add_rmsnorm", "layernorm"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps: expected a float, got {describe(eps)}")
    if not eps >= 0:  # also rejects NaN
        raise ValueError(f"eps: expected a finite value >= 0, got {eps!r}")
    return float(eps)


def _check_rows(name: str, x, ndims=(2, 3)) -> None:
    check_tensor(name, x, dtypes=FLOAT_DTYPES)
    if x.dim() not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name}: expected a {want} tensor [..., hidden_size], got shape {list(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError(f"{name}: expected hidden_size >= 1, got shape {list(x.shape)}")


def _check_vector(name: str, x, input: torch.Tensor) -> None:
    """A per-column parameter (weight, gamma, beta): float ``[hidden_size]`` on input's device."""
    check_tensor(name, x, shape=(input.shape[-1],), dtypes=FLOAT_DTYPES, device=input.device)


def _check_like(name: str, x, input: torch.Tensor) -> None:
    """A tensor that must match input's shape, dtype and device (out, residual)."""
    check_tensor(name, x, shape=tuple(input.shape), dtypes=(input.dtype,), device=input.device)


def _output(input: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    if out is None:
        return new_output_like(input)
    _check_like("out", out, input)
    return out


_is_compiling = torch.compiler.is_compiling


def _key(eps, a, b, c, d=None) -> Optional[tuple]:
    """The memo key of an eager call: its tensors' metadata (memo.tensor_key's fields, written out flat for
    the first two: this runs on every call; an absent ``out`` as None), or None when the call cannot use the
    memos: traced by torch.compile, an ``eps`` that is not a float, an argument that is not a plain tensor
    (the checks then say what is wrong)."""
    if type(eps) is not float or _is_compiling():
        return None
    try:
        return (a.shape, a.stride(), a.dtype, a.device, a.data_ptr() % 16 == 0,
                b.shape, b.stride(), b.dtype, b.device, b.data_ptr() % 16 == 0,
                None if c is None else tensor_key(c), None if d is None else tensor_key(d))
    except Exception:
        return None


# Keys whose checks passed -> what runs such a call: for rmsnorm (ops.eager_runner's function, the maker of its
# output: buffers.output_maker), for fused_add_rmsnorm ops.eager_runner's function (on the kernel path they
# replay the key's recorded launch), for layernorm ops.eager_function's.
_RMSNORM_CALLS = CallMemo()
_FUSED_ADD_RMSNORM_CALLS = CallMemo()
_LAYERNORM_CALLS = CallMemo()


def _rmsnorm(input, weight, eps, out, weight_offset: float) -> torch.Tensor:
    # The remembered call first, with its key (memo.tensor_key's fields) written out here: host time is most
    # of a batch-1 norm.
    key = None
    if type(eps) is float and not _is_compiling():
        try:
            key = (input.shape, input.stride(), input.dtype, input.device, input.data_ptr() % 16 == 0,
                   weight.shape, weight.stride(), weight.dtype, weight.device, weight.data_ptr() % 16 == 0,
                   None if out is None else tensor_key(out))
        except Exception:
            key = None
        else:
            call = _RMSNORM_CALLS.get(key)
            if call is not None and eps >= 0.0:
                run, make_output = call
                if out is None:
                    out = make_output(input)
                run(input, weight, out, eps, weight_offset)
                return out
    _check_rows("input", input)
    _check_vector("weight", weight, input)
    eps = _check_eps(eps)
    if key is None:
        out = _output(input, out)
        ops.call(ops.rmsnorm, input, weight, out, eps, weight_offset)
        return out
    if out is not None:
        _check_like("out", out, input)
    run, make_output = ops.eager_runner(ops.rmsnorm, input.device, key), output_maker(input)
    _RMSNORM_CALLS.remember(key, (run, make_output))
    if out is None:
        out = make_output(input)  # as the later calls make it: the recorded launch holds its strides
    run(input, weight, out, eps, weight_offset)
    return out


def rmsnorm(
    input: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    out: Optional[torch.Tensor] = None,
    enable_pdl: Optional[bool] = None,
) -> torch.Tensor:
    """Root-mean-square normalization: ``out = input / sqrt(mean(input**2) + eps) * weight``.

    Args:
        input: ``[batch_size, hidden_size]``, or ``[num_tokens, num_heads, head_dim]`` for per-head
            q/k norm (each head normalized separately); float16, bfloat16 or float32; any strides.
        weight: ``[hidden_size]``, any float dtype (upcast to float32).
        eps: added to the mean square; default 1e-6.
        out: optional output, same shape and dtype as input (any strides); filled and returned.
        enable_pdl: accepted for compatibility (programmatic dependent launch); ignored.

    Returns:
        ``out`` (a new tensor shaped like input when none is given), in input's dtype.
    """
    return _rmsnorm(input, weight, eps, out, 0.0)


def gemma_rmsnorm(
    input: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    out: Optional[torch.Tensor] = None,
    enable_pdl: Optional[bool] = None,
) -> torch.Tensor:
    """Gemma's RMSNorm: ``out = input / sqrt(mean(input**2) + eps) * (1 + weight)``.

    Arguments and return value as :func:`rmsnorm`.
    """
    return _rmsnorm(input, weight, eps, out, 1.0)


def _fused_add(input, residual, weight, eps, weight_offset: float) -> None:
    # As _rmsnorm: the remembered call first; every tensor's fields flat in the key (no tuple per tensor to
    # build and hash).
    key = None
    if type(eps) is float and not _is_compiling():
        try:
            key = (input.shape, input.stride(), input.dtype, input.device, input.data_ptr() % 16 == 0,
                   residual.shape, residual.stride(), residual.dtype, residual.device,
                   residual.data_ptr() % 16 == 0,
                   weight.shape, weight.stride(), weight.dtype, weight.device, weight.data_ptr() % 16 == 0)
        except Exception:
            key = None
        else:
            run = _FUSED_ADD_RMSNORM_CALLS.get(key)
            if run is not None and eps >= 0.0:
                run(input, residual, weight, eps, weight_offset)
                return
    _check_rows("input", input)
    _check_like("residual", residual, input)
    _check_vector("weight", weight, input)
    eps = _check_eps(eps)
    if key is None:
        ops.call(ops.fused_add_rmsnorm, input, residual, weight, eps, weight_offset)
        return
    run = ops.eager_runner(ops.fused_add_rmsnorm, input.device, key)
    _FUSED_ADD_RMSNORM_CALLS.remember(key, run)
    run(input, residual, weight, eps, weight_offset)


def fused_add_rmsnorm(
    input: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    enable_pdl: Optional[bool] = None,
) -> None:
    """Residual add then RMSNorm, both in place.

    ``s = input + residual`` (float32); ``residual <- s`` (rounded to residual's dtype);
    ``input <- s / sqrt(mean(s**2) + eps) * weight``. The norm uses the float32 sum, not the
    rounded residual (for rows longer than 32768 elements the kernel re-reads the rounded residual).

    Args:
        input: ``[batch_size, hidden_size]`` (or ``[tokens, heads, head_dim]``), float16, bfloat16 or
            float32; overwritten with the normalized sum.
        residual: same shape, dtype and device as input; overwritten with the sum.
        weight: ``[hidden_size]``, any float dtype.
        eps: default 1e-6.
        enable_pdl: accepted for compatibility; ignored.

    Returns:
        None. Only ``input`` and ``residual`` change.
    """
    _fused_add(input, residual, weight, eps, 0.0)


def gemma_fused_add_rmsnorm(
    input: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    enable_pdl: Optional[bool] = None,
) -> None:
    """:func:`fused_add_rmsnorm` with Gemma's scaling ``(1 + weight)``. In place; returns None."""
    _fused_add(input, residual, weight, eps, 1.0)


def layernorm(
    input: torch.Tensor,
    gemma: torch.Tensor,
    beta: torch.Tensor,
    eps: float = 1e-6,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """LayerNorm over the last dim: ``out = (input - mean) / sqrt(var + eps) * gemma + beta``
    (biased variance, float32 statistics).

    Upstream (FlashInfer >= 0.5) names the weight ``gemma`` and takes bfloat16 input with float32
    ``gemma``/``beta``; flashtile keeps those names and positions and also accepts float16/float32
    input, parameters of any float dtype, 3-D input, and an ``out=`` keyword.

    Args:
        input: ``[batch_size, hidden_size]`` (or ``[tokens, heads, head_dim]``), float16, bfloat16 or
            float32; any strides.
        gemma: the scale, ``[hidden_size]``, any float dtype.
        beta: the shift, ``[hidden_size]``, any float dtype.
        eps: default 1e-6.
        out: optional output, same shape and dtype as input.

    Returns:
        ``out`` in input's dtype.
    """
    key = _key(eps, input, gemma, beta, out)
    run = _LAYERNORM_CALLS.get(key)
    if run is None or not eps >= 0.0:
        _check_rows("input", input)
        _check_vector("gemma", gemma, input)
        _check_vector("beta", beta, input)
        eps = _check_eps(eps)
        if key is None:
            out = _output(input, out)
            ops.call(ops.layernorm, input, gemma, beta, out, eps)
            return out
        if out is not None:
            _check_like("out", out, input)
        run = ops.eager_function(ops.layernorm, input.device)
        _LAYERNORM_CALLS.remember(key, run)
    if out is None:
        out = new_output_like(input)
    run(input, gemma, beta, out, eps, key)
    return out
