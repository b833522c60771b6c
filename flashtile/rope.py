"""Rotary position embedding (``flashinfer.rope``), FlashInfer v0.3.1 signatures.

All functions rotate the first ``rotary_dim`` dims of every head of ``q [nnz, num_q_heads, head_dim]``
and ``k [nnz, num_k_heads, head_dim]`` (head counts may differ) and leave the rest unchanged.
``_inplace`` variants overwrite q and k (only their first ``rotary_dim`` dims) and return None; the
others return new ``(q_rope, k_rope)``. q and k may be strided views (e.g. slices of a fused QKV
projection) with a contiguous last dim.

Pairing: ``interleave=False`` (default, "NeoX") rotates dims ``(m, m + rotary_dim/2)``;
``interleave=True`` ("GPT-J") rotates ``(2m, 2m + 1)``. Pair ``m`` turns by ``position * f'_m`` with
``f_m = rope_theta**(-2m / rotary_dim)`` and ``f'_m = f_m / rope_scale`` (Llama 3.1 variants blend
scaled and unscaled frequencies, see :func:`apply_llama31_rope`). Angles and sin/cos are float32.

Positions: ragged (``indptr``, ``offsets``: token ``t`` of segment ``i`` sits at
``offsets[i] + t - indptr[i]``), explicit ``pos_ids``, or, for the vLLM-compatible
:func:`apply_rope_with_cos_sin_cache`, ``positions`` indexing a float32 cos/sin cache.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from ._core import ops_small as ops
from ._core.attention_args import resolve_scalar
from ._core.buffers import new_output_like
from ._core.checks import check_same_device, check_tensor, describe
from ._core.debug import debug_checks_enabled, validate_device_indices
from ._core.memo import CallMemo, eager, tensor_key
from .reference.positional import llama31_smoothing

__all__ = [
    "apply_rope",
    "apply_rope_inplace",
    "apply_rope_pos_ids",
    "apply_rope_pos_ids_inplace",
    "apply_llama31_rope",
    "apply_llama31_rope_inplace",
    "apply_llama31_rope_pos_ids",
    "apply_llama31_rope_pos_ids_inplace",
    "apply_rope_with_cos_sin_cache",
    "apply_rope_with_cos_sin_cache_inplace",
    "mla_rope_quantize_fp8",
    "CacheDtypeError",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


class CacheDtypeError(TypeError, ValueError):
    """cos_sin_cache is not float32: a TypeError (flashtile's contract for a wrong dtype) and a
    ValueError (what upstream raises)."""


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _check_positive(name: str, value) -> float:
    if value is None:
        raise TypeError(f"{name}: expected a positive number, got None")
    return resolve_scalar(name, value, 0.0, positive=True)


def _check_qk(q, k, q_name: str = "q", k_name: str = "k") -> None:
    check_tensor(q_name, q, ndim=3, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    check_tensor(k_name, k, ndim=3, dtypes=(q.dtype,), device=q.device, last_dim_contiguous=True)
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(
            f"{k_name}: expected shape [{q.shape[0]}, num_k_heads, {q.shape[2]}] (nnz and head_dim of {q_name}), "
            f"got {list(k.shape)}"
        )


def _check_rotary_dim(rotary_dim, head_dim: int, name: str = "rotary_dim") -> int:
    if rotary_dim is None:
        rotary_dim = head_dim
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int):
        raise TypeError(f"{name}: expected an int or None, got {describe(rotary_dim)}")
    if rotary_dim <= 0 or rotary_dim % 2 != 0 or rotary_dim > head_dim:
        raise ValueError(f"{name}: expected an even int in [2, head_dim={head_dim}], got {rotary_dim}")
    return rotary_dim


def _check_pos_ids(pos_ids, q: torch.Tensor, name: str = "pos_ids") -> torch.Tensor:
    check_tensor(name, pos_ids, shape=(q.shape[0],), dtypes=INDEX_DTYPES)
    return pos_ids.to(q.device, non_blocking=True)


def _check_ragged(indptr, offsets, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_tensor("indptr", indptr, ndim=1, dtypes=INDEX_DTYPES)
    if indptr.shape[0] < 1:
        raise ValueError("indptr: expected shape [batch_size + 1], got an empty tensor")
    check_tensor("offsets", offsets, shape=(indptr.shape[0] - 1,), dtypes=INDEX_DTYPES)
    if validate_device_indices(indptr):
        ip = indptr.cpu()
        nnz = q.shape[0]
        if ip[0].item() != 0 or ip[-1].item() != nnz or bool((ip[1:] < ip[:-1]).any()):
            raise ValueError(
                f"indptr: expected non-decreasing values from 0 to nnz={nnz}, got first {ip[0].item()}, "
                f"last {ip[-1].item()}" + (", decreasing somewhere" if bool((ip[1:] < ip[:-1]).any()) else "")
            )
    return indptr.to(q.device, non_blocking=True), offsets.to(q.device, non_blocking=True)


def _llama31_coefficients(rope_scale, rope_theta, low_freq_factor, high_freq_factor, old_context_len):
    _check_positive("rope_scale", rope_scale)
    _check_positive("rope_theta", rope_theta)
    low = _check_positive("low_freq_factor", low_freq_factor)
    high = _check_positive("high_freq_factor", high_freq_factor)
    old = _check_positive("old_context_len", old_context_len)
    if not high > low:
        raise ValueError(f"high_freq_factor: expected a value > low_freq_factor={low}, got {high}")
    return llama31_smoothing(low, high, old)


# ---------------------------------------------------------------------------------------------
# One entry for every q/k variant
# ---------------------------------------------------------------------------------------------


_RAGGED = object()  # _rope's pos_ids when positions come from indptr and offsets (a given pos_ids may be None)


def _rope(q, k, *, inplace, pos_ids=_RAGGED, indptr=None, offsets=None, rotary_dim=None, interleave=False,
          rope_scale=1.0, rope_theta=1e4, smooth=(0.0, 0.0)):
    _check_qk(q, k)
    rotary_dim = _check_rotary_dim(rotary_dim, q.shape[2])
    if not isinstance(interleave, bool):
        raise TypeError(f"interleave: expected a bool, got {describe(interleave)}")
    rope_scale = _check_positive("rope_scale", rope_scale)
    rope_theta = _check_positive("rope_theta", rope_theta)
    if pos_ids is _RAGGED:
        pos_ids = None
        indptr, offsets = _check_ragged(indptr, offsets, q)
    else:
        pos_ids = _check_pos_ids(pos_ids, q)
    extra = (pos_ids, indptr, offsets, None, rotary_dim, interleave, rope_scale, rope_theta, smooth[0], smooth[1])
    if inplace:
        ops.call(ops.rope_inplace, q, k, *extra)
        return None
    q_out = new_output_like(q)
    k_out = new_output_like(k)
    ops.call(ops.rope, q, k, q_out, k_out, *extra)
    return q_out, k_out


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    indptr: torch.Tensor,
    offsets: torch.Tensor,
    rotary_dim: Optional[int] = None,
    interleave: bool = False,
    rope_scale: float = 1,
    rope_theta: float = 1e4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of a ragged batch, returning new tensors.

    Args:
        q: ``[nnz, num_q_heads, head_dim]``, float16/bfloat16/float32, last dim contiguous; the
            tokens of all requests concatenated.
        k: ``[nnz, num_k_heads, head_dim]``, same dtype and device as q.
        indptr: ``[batch_size + 1]`` int32/int64: request ``i`` owns rows ``indptr[i]:indptr[i+1]``
            (0 to nnz, non-decreasing; validated when on the host). May be on the host.
        offsets: ``[batch_size]`` int32/int64: position of each request's first token.
        rotary_dim: rotated dims (even, <= head_dim); default head_dim.
        interleave: pair ``(2m, 2m+1)`` instead of ``(m, m + rotary_dim/2)``.
        rope_scale: linear position interpolation (frequencies divided by it); default 1.
        rope_theta: base of the frequencies; default 1e4.

    Returns:
        ``(q_rope, k_rope)``, new contiguous tensors shaped like q and k.
    """
    return _rope(q, k, inplace=False, indptr=indptr, offsets=offsets, rotary_dim=rotary_dim, interleave=interleave,
                 rope_scale=rope_scale, rope_theta=rope_theta)


def apply_rope_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    indptr: torch.Tensor,
    offsets: torch.Tensor,
    rotary_dim: Optional[int] = None,
    interleave: bool = False,
    rope_scale: float = 1,
    rope_theta: float = 1e4,
) -> None:
    """:func:`apply_rope` in place: overwrites the first ``rotary_dim`` dims of q and k; returns None."""
    _rope(q, k, inplace=True, indptr=indptr, offsets=offsets, rotary_dim=rotary_dim, interleave=interleave,
          rope_scale=rope_scale, rope_theta=rope_theta)


def apply_rope_pos_ids(
    q: torch.Tensor,
    k: torch.Tensor,
    pos_ids: torch.Tensor,
    rotary_dim: Optional[int] = None,
    interleave: bool = False,
    rope_scale: float = 1,
    rope_theta: float = 1e4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE with an explicit position per token, returning new tensors.

    Args:
        q, k: as :func:`apply_rope`.
        pos_ids: ``[nnz]`` int32 or int64, the position of each token.
        rotary_dim, interleave, rope_scale, rope_theta: as :func:`apply_rope`.

    Returns:
        ``(q_rope, k_rope)``.
    """
    return _rope(q, k, inplace=False, pos_ids=pos_ids, rotary_dim=rotary_dim, interleave=interleave,
                 rope_scale=rope_scale, rope_theta=rope_theta)


def apply_rope_pos_ids_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    pos_ids: torch.Tensor,
    rotary_dim: Optional[int] = None,
    interleave: bool = False,
    rope_scale: float = 1,
    rope_theta: float = 1e4,
) -> None:
    """:func:`apply_rope_pos_ids` in place; returns None."""
    _rope(q, k, inplace=True, pos_ids=pos_ids, rotary_dim=rotary_dim, interleave=interleave,
          rope_scale=rope_scale, rope_theta=rope_theta)


def apply_llama31_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    indptr: torch.Tensor,
    offsets: torch.Tensor,
    rotary_dim: Optional[int] = None,
    interleave: bool = False,
    rope_scale: float = 8,
    rope_theta: float = 5e5,
    low_freq_factor: float = 1,
    high_freq_factor: float = 4,
    old_context_len: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama 3.1 RoPE of a ragged batch, returning new tensors.

    Frequencies blend between scaled and unscaled: with ``f = rope_theta**(-2m/rotary_dim)``,
    ``smooth = clamp(old_context_len * f / (2 pi (high_freq_factor - low_freq_factor))
    - low_freq_factor / (high_freq_factor - low_freq_factor), 0, 1)`` and
    ``f' = (1 - smooth) * f / rope_scale + smooth * f``: wavelengths shorter than
    ``old_context_len / high_freq_factor`` keep ``f``, longer than ``old_context_len / low_freq_factor``
    get ``f / rope_scale``.

    Args:
        q, k, indptr, offsets, rotary_dim, interleave: as :func:`apply_rope`.
        rope_scale: default 8. rope_theta: default 5e5.
        low_freq_factor: default 1. high_freq_factor: default 4 (must exceed low_freq_factor).
        old_context_len: the pre-training context length; default 8192.

    Returns:
        ``(q_rope, k_rope)``.
    """
    smooth = _llama31_coefficients(rope_scale, rope_theta, low_freq_factor, high_freq_factor, old_context_len)
    return _rope(q, k, inplace=False, indptr=indptr, offsets=offsets, rotary_dim=rotary_dim, interleave=interleave,
                 rope_scale=rope_scale, rope_theta=rope_theta, smooth=smooth)


def apply_llama31_rope_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    indptr: torch.Tensor,
    offsets: torch.Tensor,
    rotary_dim: Optional[int] = None,
    interleave: bool = False,
    rope_scale: float = 8,
    rope_theta: float = 5e5,
    low_freq_factor: float = 1,
    high_freq_factor: float = 4,
    old_context_len: int = 8192,
) -> None:
    """:func:`apply_llama31_rope` in place; returns None."""
    smooth = _llama31_coefficients(rope_scale, rope_theta, low_freq_factor, high_freq_factor, old_context_len)
    _rope(q, k, inplace=True, indptr=indptr, offsets=offsets, rotary_dim=rotary_dim, interleave=interleave,
          rope_scale=rope_scale, rope_theta=rope_theta, smooth=smooth)


def apply_llama31_rope_pos_ids(
    q: torch.Tensor,
    k: torch.Tensor,
    pos_ids: torch.Tensor,
    rotary_dim: Optional[int] = None,
    interleave: bool = False,
    rope_scale: float = 8,
    rope_theta: float = 5e5,
    low_freq_factor: float = 1,
    high_freq_factor: float = 4,
    old_context_len: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama 3.1 RoPE (see :func:`apply_llama31_rope`) with ``pos_ids [nnz]``; returns new tensors."""
    smooth = _llama31_coefficients(rope_scale, rope_theta, low_freq_factor, high_freq_factor, old_context_len)
    return _rope(q, k, inplace=False, pos_ids=pos_ids, rotary_dim=rotary_dim, interleave=interleave,
                 rope_scale=rope_scale, rope_theta=rope_theta, smooth=smooth)


def apply_llama31_rope_pos_ids_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    pos_ids: torch.Tensor,
    rotary_dim: Optional[int] = None,
    interleave: bool = False,
    rope_scale: float = 8,
    rope_theta: float = 5e5,
    low_freq_factor: float = 1,
    high_freq_factor: float = 4,
    old_context_len: int = 8192,
) -> None:
    """:func:`apply_llama31_rope_pos_ids` in place; returns None."""
    smooth = _llama31_coefficients(rope_scale, rope_theta, low_freq_factor, high_freq_factor, old_context_len)
    _rope(q, k, inplace=True, pos_ids=pos_ids, rotary_dim=rotary_dim, interleave=interleave,
          rope_scale=rope_scale, rope_theta=rope_theta, smooth=smooth)


# ---------------------------------------------------------------------------------------------
# vLLM / SGLang-compatible form
# ---------------------------------------------------------------------------------------------


def _heads_view(name: str, x, nnz: int, head_size: int) -> torch.Tensor:
    """``[nnz, H * head_size]`` (or ``[nnz, H, head_size]``) as a ``[nnz, H, head_size]`` view."""
    check_tensor(name, x, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    if x.dim() == 3 and x.shape[0] == nnz and x.shape[2] == head_size:
        return x
    if x.dim() != 2 or x.shape[0] != nnz or x.shape[1] % head_size != 0 or x.shape[1] == 0:
        raise ValueError(
            f"{name}: expected shape [nnz={nnz}, num_heads * head_size={head_size}] "
            f"(or [nnz, num_heads, head_size]), got {list(x.shape)}"
        )
    return x.unflatten(1, (-1, head_size))


def _cos_sin_cache_args(positions, query, key, head_size, cos_sin_cache):
    check_tensor("positions", positions, ndim=1, dtypes=INDEX_DTYPES)
    if isinstance(head_size, bool) or not isinstance(head_size, int) or head_size <= 0:
        raise ValueError(f"head_size: expected a positive int, got {describe(head_size)}")
    nnz = positions.shape[0]
    q3 = _heads_view("query", query, nnz, head_size)
    k3 = _heads_view("key", key, nnz, head_size)
    check_tensor("key", key, dtypes=(query.dtype,), device=query.device)
    check_tensor("cos_sin_cache", cos_sin_cache, ndim=2)
    if cos_sin_cache.dtype != torch.float32:
        raise CacheDtypeError(f"cos_sin_cache should be float32, got {str(cos_sin_cache.dtype).replace('torch.', '')}")
    check_same_device(query=query, cos_sin_cache=cos_sin_cache)
    rotary_dim = _check_rotary_dim(cos_sin_cache.shape[1], head_size, name="cos_sin_cache.shape[1] (rotary_dim)")
    _check_position_values(positions, cos_sin_cache.shape[0])
    return positions.to(query.device, non_blocking=True), q3, k3, cos_sin_cache.contiguous(), rotary_dim


def _check_position_values(positions: torch.Tensor, cache_rows: int) -> None:
    """Positions index rows of the cache: checked on the host when validate_device_indices says so."""
    if validate_device_indices(positions) and positions.shape[0] > 0:
        lo, hi = positions.min().item(), positions.max().item()
        if lo < 0 or hi >= cache_rows:
            raise ValueError(
                f"positions: expected values in [0, {cache_rows}) (rows of cos_sin_cache), got values in [{lo}, {hi}]"
            )


# Keys of cos/sin-cache calls whose checks passed (_core/memo.py) -> _CosSinCacheCall.
_COS_SIN_CACHE_CALLS = CallMemo()


class _CosSinCacheCall(NamedTuple):
    """What the checks of a cos/sin-cache call concluded, for later calls with the same key."""

    run: Callable[..., None]  # ops.eager_function(ops.rope): kernels/rope.py or reference/rope.py apply_rope
    rotary_dim: int
    move_positions: bool  # positions live on another device than query
    copy_cache: bool  # cos_sin_cache is not contiguous
    check_values: bool  # positions' values are checked (host positions, or FLASHTILE_DEBUG=1)
    cache_rows: int


def _cos_sin_cache_call(positions, query, key, head_size, cos_sin_cache, is_neox, inplace: bool):
    """Both cos/sin-cache forms: rotate into query/key (``inplace``) or into new tensors, returned."""
    memo_key = None
    if type(head_size) is int and type(is_neox) is bool and eager():
        try:
            memo_key = ("cos_sin_cache", inplace, tensor_key(positions), tensor_key(query), tensor_key(key), head_size,
                        tensor_key(cos_sin_cache), is_neox)
        except Exception:
            memo_key = None
    call = _COS_SIN_CACHE_CALLS.get(memo_key)
    if call is None:
        pos, q3, k3, cache, rotary_dim = _cos_sin_cache_args(positions, query, key, head_size, cos_sin_cache)
        if memo_key is None:
            if inplace:
                ops.call(ops.rope_inplace, q3, k3, pos, None, None, cache, rotary_dim, not is_neox, 1.0, 1e4, 0.0, 0.0)
                return None
            query_out, key_out = new_output_like(query), new_output_like(key)
            ops.call(ops.rope, q3, k3, query_out.view(q3.shape), key_out.view(k3.shape), pos, None, None, cache,
                     rotary_dim, not is_neox, 1.0, 1e4, 0.0, 0.0)
            return query_out, key_out
        call = _CosSinCacheCall(ops.eager_function(ops.rope, query.device), rotary_dim, pos is not positions,
                                cache is not cos_sin_cache, positions.device.type == "cpu" or debug_checks_enabled(),
                                cos_sin_cache.shape[0])
        _COS_SIN_CACHE_CALLS.remember(memo_key, call)
        positions, cos_sin_cache = pos, cache
    else:
        if call.check_values:
            _check_position_values(positions, call.cache_rows)
        if call.move_positions:
            positions = positions.to(query.device, non_blocking=True)
        if call.copy_cache:
            cos_sin_cache = cos_sin_cache.contiguous()
    # query and key go as given (2-D rows or 3-D): the implementation views them by head_size only
    # when it cannot replay the launch for memo_key.
    if inplace:
        call.run(query, key, query, key, rotary_dim=call.rotary_dim, interleave=not is_neox, pos_ids=positions,
                 cos_sin_cache=cos_sin_cache, head_size=head_size, launch_key=memo_key)
        return None
    query_out, key_out = new_output_like(query), new_output_like(key)
    call.run(query, key, query_out, key_out, rotary_dim=call.rotary_dim, interleave=not is_neox, pos_ids=positions,
             cos_sin_cache=cos_sin_cache, head_size=head_size, launch_key=memo_key)
    return query_out, key_out


def apply_rope_with_cos_sin_cache(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE with precomputed cos/sin (the vLLM / SGLang calling convention), returning new tensors.

    Args:
        positions: ``[nnz]`` int32/int64, row of ``cos_sin_cache`` for each token (checked to be in
            range when on the host, or with FLASHTILE_DEBUG=1; out-of-range rows read as zero).
        query: ``[nnz, num_q_heads * head_size]`` (or ``[nnz, num_q_heads, head_size]``),
            float16/bfloat16/float32, last dim contiguous (a slice of a fused QKV tensor works).
        key: ``[nnz, num_k_heads * head_size]``, same dtype and device.
        head_size: dims per head.
        cos_sin_cache: float32 ``[max_position, rotary_dim]``: ``cos`` in the first ``rotary_dim/2``
            columns, ``sin`` in the rest; ``rotary_dim`` (even, <= head_size) dims of each head rotate.
        is_neox: True pairs ``(m, m + rotary_dim/2)``; False pairs ``(2m, 2m+1)``.

    Returns:
        ``(query_out, key_out)``, new tensors shaped like query and key.
    """
    return _cos_sin_cache_call(positions, query, key, head_size, cos_sin_cache, is_neox, inplace=False)


def apply_rope_with_cos_sin_cache_inplace(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> None:
    """:func:`apply_rope_with_cos_sin_cache` in place: overwrites the first ``rotary_dim`` dims of each
    head of query and key; returns None."""
    _cos_sin_cache_call(positions, query, key, head_size, cos_sin_cache, is_neox, inplace=True)


# ---------------------------------------------------------------------------------------------
# MLA: RoPE of the rope parts + fp8 quantization of q and the latent, in one call
# ---------------------------------------------------------------------------------------------

_FP8_OUT = tuple(d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d)


def mla_rope_quantize_fp8(
    q_rope: torch.Tensor,
    k_rope: torch.Tensor,
    q_nope: torch.Tensor,
    k_nope: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    pos_ids: torch.Tensor,
    is_neox: bool = True,
    quantize_dtype: Optional[torch.dtype] = None,
    quant_scale_q: float = 1.0,
    quant_scale_kv: float = 1.0,
    q_rope_out: Optional[torch.Tensor] = None,
    k_rope_out: Optional[torch.Tensor] = None,
    q_nope_out: Optional[torch.Tensor] = None,
    k_nope_out: Optional[torch.Tensor] = None,
    enable_pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek MLA's pre-attention step: RoPE on the rope parts of q and k, then every part of q and of
    the new latent rows scaled and cast to fp8 (FlashInfer v0.3.1 semantics).

    ``q_rope_out = fp8(rope(q_rope) * quant_scale_q)``, ``k_rope_out = fp8(rope(k_rope) * quant_scale_kv)``,
    ``q_nope_out = fp8(q_nope * quant_scale_q)``, ``k_nope_out = fp8(k_nope * quant_scale_kv)``; the rotation
    runs in float32, and values beyond the fp8 range saturate to its largest finite value.

    Args:
        q_rope: ``[nnz, num_heads, rope_dim]`` float16/bfloat16/float32. Every tensor argument and
            output has a contiguous last dim (other strides are free), as upstream requires.
        k_rope: ``[nnz, rope_dim]`` (the one shared RoPE key per token), q_rope's dtype.
        q_nope: ``[nnz, num_heads, nope_dim]`` (DeepSeek absorbed: 512), q_rope's dtype.
        k_nope: ``[nnz, nope_dim]`` (the latent, 512), q_rope's dtype.
        cos_sin_cache: float32 ``[max_position, rope_dim]``, cos in the first half, sin in the second;
            its width is the rotary dim and must equal ``rope_dim``.
        pos_ids: ``[nnz]`` int32/int64 positions (rows of cos_sin_cache).
        is_neox: True pairs dims ``(m, m + rope_dim/2)``; False pairs ``(2m, 2m+1)`` (interleaved).
        quantize_dtype: float8_e4m3fn (default) or float8_e5m2; when None, the dtype of the first
            given output, else float8_e4m3fn.
        quant_scale_q, quant_scale_kv: multipliers applied before the cast.
        q_rope_out, k_rope_out, q_nope_out, k_nope_out: optional outputs, shaped like the inputs, of
            ``quantize_dtype``; filled and returned.
        enable_pdl: accepted and ignored (a CUDA launch attribute).

    Returns:
        ``(q_rope_out, k_rope_out, q_nope_out, k_nope_out)``.

    On a GPU one Triton kernel does all of it (one program per token and block of heads, plus one for the
    token's k); on a CPU it runs as PyTorch operations.
    """
    check_tensor("q_rope", q_rope, ndim=3, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    nnz, heads, rope_dim = q_rope.shape
    dev = q_rope.device
    check_tensor("k_rope", k_rope, shape=(nnz, rope_dim), dtypes=(q_rope.dtype,), device=dev, last_dim_contiguous=True)
    check_tensor("q_nope", q_nope, ndim=3, dtypes=(q_rope.dtype,), device=dev, last_dim_contiguous=True)
    check_tensor("q_nope", q_nope, shape=(nnz, heads, None))
    check_tensor("k_nope", k_nope, shape=(nnz, q_nope.shape[2]), dtypes=(q_rope.dtype,), device=dev,
                 last_dim_contiguous=True)
    if not isinstance(cos_sin_cache, torch.Tensor) or cos_sin_cache.dtype != torch.float32:
        raise CacheDtypeError(f"cos_sin_cache should be float32, got {describe(cos_sin_cache)}")
    check_tensor("cos_sin_cache", cos_sin_cache, shape=(None, rope_dim), device=dev)
    if rope_dim % 2:
        raise ValueError(f"q_rope: rope_dim must be even, got {rope_dim}")
    pos_ids = _check_pos_ids(pos_ids, q_rope)
    _check_position_values(pos_ids, cos_sin_cache.shape[0])
    outs = (("q_rope_out", q_rope_out, q_rope), ("k_rope_out", k_rope_out, k_rope), ("q_nope_out", q_nope_out, q_nope),
            ("k_nope_out", k_nope_out, k_nope))
    if quantize_dtype is None:
        quantize_dtype = next((o.dtype for _, o, _ in outs if o is not None), _FP8_OUT[0] if _FP8_OUT else None)
    if quantize_dtype is None or quantize_dtype not in _FP8_OUT:
        raise TypeError(f"quantize_dtype: expected float8_e4m3fn or float8_e5m2, got {describe(quantize_dtype)}")
    for name, value in (("quant_scale_q", quant_scale_q), ("quant_scale_kv", quant_scale_kv)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: expected a float, got {describe(value)}")
    results = []
    for name, out, like in outs:
        if out is None:
            out = torch.empty(like.shape, dtype=quantize_dtype, device=dev)
        else:
            check_tensor(name, out, shape=tuple(like.shape), dtypes=(quantize_dtype,), device=dev,
                         last_dim_contiguous=True)
        results.append(out)
    ops.call(ops.mla_rope_quantize, q_rope, k_rope, q_nope, k_nope, cos_sin_cache, pos_ids, *results, not is_neox,
             float(quant_scale_q), float(quant_scale_kv))
    q_rope_out, k_rope_out, q_nope_out, k_nope_out = results
    return q_rope_out, k_rope_out, q_nope_out, k_nope_out
