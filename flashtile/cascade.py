"""Cascade attention (``flashinfer.cascade``): merging attention states across KV segments.

An attention *state* over a segment of the KV sequence is ``(v, s)``: the attention output over that
segment and ``s``, the **base-2** log-sum-exp of the scaled logits of its keys (what every flashtile
attention function returns with ``return_lse=True``). Merging the states of disjoint segments gives
the state of their union, so attention over a shared prefix and over each request's own suffix can
be computed apart and combined. See docs/cascade.md.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._core import ops_cascade as ops
from ._core.buffers import new_output
from ._core.checks import check_same_device, check_tensor

__all__ = ["merge_state", "merge_state_in_place", "merge_states"]


# ---------------------------------------------------------------------------------------------
# Merge operators
# ---------------------------------------------------------------------------------------------

V_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
S_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_v(name: str, v, ndim: int, layout: str) -> None:
    check_tensor(name, v, dtypes=V_DTYPES)
    if v.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor {layout}, got shape {list(v.shape)}")


def _check_like_v(name: str, x, v_name: str, v: torch.Tensor) -> None:
    """A second value tensor: v's shape and dtype."""
    check_tensor(name, x, shape=tuple(v.shape))
    if x.dtype != v.dtype:
        raise TypeError(f"{name}: expected the dtype of {v_name} ({_dtype_name(v.dtype)}), "
                        f"got {_dtype_name(x.dtype)}")


def _check_s(name: str, s, shape, dtypes=S_DTYPES) -> None:
    check_tensor(name, s, shape=shape, dtypes=dtypes)


def merge_state(
    v_a: torch.Tensor,
    s_a: torch.Tensor,
    v_b: torch.Tensor,
    s_b: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention states, e.g. attention over a shared prefix and over a request's suffix.

    For each (token, head), with ``m = max(s_a, s_b)``, ``w_a = 2**(s_a - m)``, ``w_b = 2**(s_b - m)``::

        v = (w_a * v_a + w_b * v_b) / (w_a + w_b)      s = m + log2(w_a + w_b)

    A state with ``s = -inf`` contributes nothing (its ``v`` is not read); two empty states give
    ``v = 0`` and ``s = -inf``.

    Args:
        v_a: ``[seq_len, num_heads, head_dim]``, float16, bfloat16 or float32; any strides.
        s_a: ``[seq_len, num_heads]`` base-2 log-sum-exp of state A; any float dtype (cast to float32),
            any strides.
        v_b: like ``v_a`` (same shape and dtype).
        s_b: like ``s_a``.

    Returns:
        ``(v, s)``: ``v [seq_len, num_heads, head_dim]`` in v_a's dtype, ``s [seq_len, num_heads]``
        float32 (base 2), new contiguous tensors.
    """
    _check_v("v_a", v_a, 3, "[seq_len, num_heads, head_dim]")
    seq_len, num_heads, head_dim = v_a.shape
    _check_s("s_a", s_a, (seq_len, num_heads))
    _check_like_v("v_b", v_b, "v_a", v_a)
    _check_s("s_b", s_b, (seq_len, num_heads))
    device = check_same_device(v_a=v_a, s_a=s_a, v_b=v_b, s_b=s_b)
    v = new_output((seq_len, num_heads, head_dim), v_a.dtype, device)
    s = new_output((seq_len, num_heads), torch.float32, device)
    ops.call(ops.merge_state, v_a, s_a.to(torch.float32), v_b, s_b.to(torch.float32), v, s)
    return v, s


def merge_state_in_place(
    v: torch.Tensor,
    s: torch.Tensor,
    v_other: torch.Tensor,
    s_other: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
) -> None:
    """Merge the state ``(v_other, s_other)`` into ``(v, s)``, in place (same math as :func:`merge_state`).

    Args:
        v: ``[seq_len, num_heads, head_dim]``, float16, bfloat16 or float32; any strides; overwritten
            with the merged output.
        s: ``[seq_len, num_heads]``, **float32** (base-2 log-sum-exp); any strides; overwritten with
            the merged log-sum-exp. Upstream casts ``s`` to float32 before the in-place call, so a
            non-float32 ``s`` would silently be left unchanged there; flashtile raises TypeError.
        v_other: like ``v`` (same shape and dtype); read only.
        s_other: ``[seq_len, num_heads]``, any float dtype (cast to float32); read only.
        mask: optional bool ``[seq_len]`` on v's device: tokens whose entry is False are neither read
            nor written (their ``v`` and ``s`` stay as they are; e.g. CUDA-graph padding rows).

    Returns:
        None.
    """
    _check_v("v", v, 3, "[seq_len, num_heads, head_dim]")
    seq_len, num_heads, _ = v.shape
    check_tensor("s", s, shape=(seq_len, num_heads))
    if s.dtype != torch.float32:
        raise TypeError(f"s: expected dtype float32 (it is updated in place, so it cannot be cast), "
                        f"got {_dtype_name(s.dtype)}")
    _check_like_v("v_other", v_other, "v", v)
    _check_s("s_other", s_other, (seq_len, num_heads))
    if mask is not None:
        check_tensor("mask", mask, shape=(seq_len,), dtypes=(torch.bool,))
    check_same_device(v=v, s=s, v_other=v_other, s_other=s_other, mask=mask)
    ops.call(ops.merge_state_in_place, v, s, v_other, s_other.to(torch.float32), mask)


def merge_states(v: torch.Tensor, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge any number of attention states per token (e.g. the partial outputs of several KV chunks).

    For each (token, head), with ``m = max_i s_i`` and ``w_i = 2**(s_i - m)`` over the states ``i``::

        v_merged = sum_i w_i * v_i / sum_i w_i        s_merged = m + log2(sum_i w_i)

    States with ``s = -inf`` contribute nothing (their ``v`` is not read); a token whose states are
    all empty (or that has ``num_states == 0``) gets ``v = 0``, ``s = -inf``.

    Args:
        v: ``[seq_len, num_states, num_heads, head_dim]``, float16, bfloat16 or float32; any strides
            (read through a state-major strided view; a head_dim stride other than 1 costs a copy on
            the kernel path).
        s: ``[seq_len, num_states, num_heads]`` base-2 log-sum-exp; any float dtype (cast to
            float32), any strides.

    Returns:
        ``(v_merged, s_merged)``: ``v_merged [seq_len, num_heads, head_dim]`` in v's dtype,
        ``s_merged [seq_len, num_heads]`` float32 (base 2), new contiguous tensors.
    """
    _check_v("v", v, 4, "[seq_len, num_states, num_heads, head_dim]")
    seq_len, num_states, num_heads, head_dim = v.shape
    _check_s("s", s, (seq_len, num_states, num_heads))
    device = check_same_device(v=v, s=s)
    v_merged = new_output((seq_len, num_heads, head_dim), v.dtype, device)
    s_merged = new_output((seq_len, num_heads), torch.float32, device)
    ops.call(ops.merge_states, v, s.to(torch.float32), v_merged, s_merged)
    return v_merged, s_merged
