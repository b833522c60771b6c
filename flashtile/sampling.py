"""Sampling (``flashinfer.sampling``): filtered sampling without sorting, renorm/mask, speculative.

All functions take ``[batch, vocab]`` rows (``probs`` or ``logits``; float32, float16 or bfloat16,
unit stride along the vocabulary) and run the Triton kernels on CUDA tensors and the pure-PyTorch
reference on CPU tensors (``FLASHTILE_BACKEND=triton`` runs the kernels in Triton's interpreter).

Common arguments of the samplers:

- ``top_k`` / ``top_p`` / ``min_p``: a Python scalar for the batch, or a 1-D tensor ``[batch]``
  (one value per output row) of any real dtype, as upstream: a floating top_k is truncated toward
  zero into int32, an integer top_p / min_p / temperature is converted to float32 (bool and complex
  tensors raise TypeError). Scalars are checked
  (ValueError): ``top_k >= 1``, ``0 < top_p <= 1``, ``0 <= min_p <= 1``. Tensor values are not
  read on the host (no synchronization; CUDA-graph safe) and mean: ``top_k <= 0`` or ``>= vocab``:
  no top-k filter; ``top_p >= 1``: no top-p filter; ``top_p <= 0``: only the most probable tokens.
- ``indices``: optional int32/int64 ``[batch_out]``; output row ``i`` is drawn from
  ``probs[indices[i]]`` (sample one distribution many times). Per-request parameters then have
  ``batch_out`` entries. Without it ``batch_out = probs.shape[0]``.
- ``deterministic``: accepted; every reduction here is deterministic, so results are run-to-run
  identical for the same inputs, batch and (seed, offset) whatever its value.
- ``generator``: a ``torch.Generator`` on the input's device; each call takes a fresh (seed, offset)
  from it: from its host-side state in eager mode (no kernel), drawn on the device while a CUDA graph
  is being captured (so that every replay draws new ones). ``None``: the default generator.
- ``seed``, ``offset`` (keyword): explicit Philox seed and counter, both or neither; ints, or int64
  tensors of length 1 or ``batch_out`` (device tensors: a captured CUDA graph replays with whatever
  values they hold). The same (seed, offset) gives the same samples on the same device and path.
- ``check_nan``: raise ``ValueError("Input probs contains NaN.")`` (a host-side check, which
  synchronizes) instead of the documented NaN handling.
- ``return_valid`` (keyword): also return a bool ``[batch_out]`` tensor, False for rows that have no
  token of positive probability.

Returned ids: ``[batch_out]``, int32 (the dtype of ``indices`` when given); always in ``[0, vocab)``
and of positive probability inside the filter set. NaN entries count as probability 0 (NaN logits
as -inf); a row with no positive probability (all zero, all NaN, all -inf logits) gives token 0 and
``valid = False``. Filter sets and tie handling: docs/sampling.md (ties with the boundary value are
always kept together).
"""

from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from ._core.buffers import discarded_output, new_output
from ._core.checks import check_tensor, describe
from ._core.dispatch import implementation
from ._core.memo import CallMemo, eager, tensor_key

__all__ = [
    "softmax",
    "sampling_from_probs",
    "sampling_from_logits",
    "top_p_sampling_from_probs",
    "top_k_sampling_from_probs",
    "min_p_sampling_from_probs",
    "top_k_top_p_sampling_from_probs",
    "top_k_top_p_sampling_from_logits",
    "top_p_renorm_probs",
    "top_k_renorm_probs",
    "top_k_mask_logits",
    "top_p_renorm_prob",
    "top_k_renorm_prob",
    "chain_speculative_sampling",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_DTYPES = (torch.int32, torch.int64)
_PARAM_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_ORDERS = ("top_k_first", "joint")
DRAW_STRIDE = 64  # Philox counters per output row (flashtile/kernels/sampling/common.py: DRAW_STRIDE)

Param = Union[int, float, torch.Tensor]
Samples = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# Argument handling
# ---------------------------------------------------------------------------------------------


def _check_rows(name: str, x, ndim: int = 2) -> None:
    check_tensor(name, x, ndim=ndim, dtypes=_FLOAT_DTYPES, last_dim_contiguous=True)


def _check_nan(name: str, x: torch.Tensor, check_nan: bool) -> None:
    if check_nan and bool(torch.isnan(x).any()):
        raise ValueError(f"Input {name} contains NaN.")


def _output_rows(x: torch.Tensor, indices) -> Tuple[int, Optional[torch.Tensor], torch.dtype]:
    """(batch_out, indices on x's device or None, output id dtype)."""
    if indices is None:
        return x.shape[0], None, torch.int32
    check_tensor("indices", indices, ndim=1, dtypes=_INT_DTYPES)
    return indices.shape[0], indices.to(x.device, non_blocking=True), indices.dtype


def _param(name: str, value, batch: int, device: torch.device, *, integer: bool, lo: float, hi: float,
           lo_open: bool = False):
    """A sampling parameter: a checked Python scalar, or a 1-D tensor ``[batch]`` on ``device``."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            raise ValueError(
                f"Expected a 1D tensor of shape (batch_size,) or scalar for the sampling parameter {name}, "
                "got a 0-dimensional tensor"
            )
        if value.dim() >= 2:
            raise ValueError(
                f"Expected a 1D tensor or scalar for the sampling parameter, but got a {value.dim()}D tensor. "
                f"({name}: shape {list(value.shape)})"
            )
        if value.shape[0] != batch:
            raise ValueError(
                f"Sampling parameter tensor batch size mismatch: {name} has {value.shape[0]} entries, "
                f"expected batch_size = {batch}"
            )
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name}: expected a 1-D integer or floating-point tensor [batch_size], got dtype "
                            f"{str(value.dtype).replace('torch.', '')}")
        # Any other real dtype is accepted, as upstream does: engines pass e.g. torch.full((B,), 1)
        # (int64) for min_p. Integer parameters (top_k) keep int32/int64 and truncate others toward
        # zero into int32; float parameters keep the floating dtypes the kernels read and turn the
        # rest (integers, fp8) into float32.
        kept = _INT_DTYPES if integer else _PARAM_FLOAT_DTYPES
        dtype = value.dtype if value.dtype in kept else (torch.int32 if integer else torch.float32)
        return value.to(device=device, dtype=dtype, non_blocking=True)
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        kind = "an int" if integer else "a float"
        raise TypeError(f"{name}: expected {kind} or a 1-D tensor [batch_size], got {describe(value)}")
    below = value <= lo if lo_open else value < lo
    if below or value > hi:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ValueError(f"{name}: expected a value in {interval}, got {value}")
    return int(value) if integer else float(value)


def _top_k(value, batch, device):
    return _param("top_k", value, batch, device, integer=True, lo=1, hi=float("inf"))


def _top_p(value, batch, device):
    return _param("top_p", value, batch, device, integer=False, lo=0.0, hi=1.0, lo_open=True)


_HOST_DRAW_LOCK = threading.Lock()


def _host_draw(generator: torch.Generator, counters: int) -> Tuple[int, int]:
    """(seed, offset) for one call from a CUDA generator's host-side state, with no kernel: the offset is
    the generator's Philox offset, advanced past the ``counters`` this call uses (rounded up to 4, as
    CUDA generators require), and the seed a fixed mix of the generator's seed, so that the samplers'
    Philox key differs from the one torch's own random ops use with the same offsets."""
    with _HOST_DRAW_LOCK:
        offset = generator.get_offset()
        generator.set_offset(offset + (counters + 3) // 4 * 4)
        seed = generator.initial_seed()
    return (seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (1 << 63), offset


def _rng(generator, seed, offset, batch: int, device: torch.device, counters_per_row: int = DRAW_STRIDE):
    """(seed, offset): ints, or int64 tensors ``[1]``/``[batch]`` on ``device``. Without seed/offset, a
    CUDA generator gives them from its host-side state (no kernel) unless the stream is capturing a CUDA
    graph; then they are drawn on the device, so that every replay draws new ones. ``counters_per_row``:
    the Philox counters a row may use (the generator advances past ``batch`` of them)."""
    if (seed is None) != (offset is None):
        raise ValueError("seed and offset must be given together (both or neither)")
    if seed is not None:
        out: List[Union[torch.Tensor, int]] = []
        for name, v in (("seed", seed), ("offset", offset)):
            if isinstance(v, torch.Tensor):
                check_tensor(name, v, ndim=1, dtypes=(torch.int32, torch.int64, torch.uint64)
                             if hasattr(torch, "uint64") else _INT_DTYPES)
                if v.shape[0] not in (1, batch):
                    raise ValueError(f"{name}: expected a tensor of length 1 or batch_size = {batch}, "
                                     f"got shape {list(v.shape)}")
                out.append(v.to(device=device, dtype=torch.int64, non_blocking=True))
            elif isinstance(v, int) and not isinstance(v, bool):
                out.append(int(v))
            else:
                raise TypeError(f"{name}: expected an int or a 1-D int64 tensor, got {describe(v)}")
        seed_value, offset_value = out
        if isinstance(seed_value, torch.Tensor) and isinstance(offset_value, torch.Tensor):
            if seed_value.shape != offset_value.shape:
                raise ValueError(f"seed and offset: expected the same length, got {seed_value.shape[0]} and "
                                 f"{offset_value.shape[0]}")
        elif isinstance(seed_value, torch.Tensor) or isinstance(offset_value, torch.Tensor):
            raise ValueError("seed and offset must both be ints or both be tensors")
        return seed_value, offset_value
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {describe(generator)}")
    gen_device = generator.device if generator is not None else device
    if gen_device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        if generator is None:
            index = gen_device.index if gen_device.index is not None else torch.cuda.current_device()
            generator = torch.cuda.default_generators[index]
        return _host_draw(generator, batch * counters_per_row)
    drawn = torch.randint(0, 2**62, (2,), dtype=torch.int64, device=gen_device, generator=generator)
    if drawn.device.type == "cpu":
        s, o = drawn.tolist()
        return s, o
    drawn = drawn.to(device, non_blocking=True)
    return drawn[0:1], drawn[1:2]


def _finish(ids: torch.Tensor, valid: torch.Tensor, return_valid: bool) -> Samples:
    return (ids, valid) if return_valid else ids


# ---------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------


# The filter parameters of the probability samplers: name -> _param's rule.
_FILTERS: Dict[str, Dict[str, Any]] = {
    "top_k": dict(integer=True, lo=1, hi=float("inf")),
    "top_p": dict(integer=False, lo=0.0, hi=1.0, lo_open=True),
    "min_p": dict(integer=False, lo=0.0, hi=1.0),
}


def _filter_key(value):
    """A filter parameter's part of a memo key: None, its Python type (the value is checked at every
    call), or a tensor's metadata."""
    if value is None or type(value) in (int, float):
        return type(value)
    return tensor_key(value)


# Keys of probability-sampler calls whose checks passed (_core/memo.py) -> (eager filtered_sampling
# function, batch_out, id dtype). A known key proves the metadata checks pass (probs and indices
# layout and dtypes, filter tensors' shapes and dtypes); scalar filter values, seed/offset/generator
# and check_nan are still checked at every call.
_SAMPLER_CALLS = CallMemo()


def _sample(probs, indices, generator, check_nan, seed, offset, return_valid, order="joint", **filters) -> Samples:
    """Shared body of the probability samplers: ``filters`` are the given ones of top_k / top_p /
    min_p, as the caller passed them (checked here)."""
    key = None
    if eager() and type(order) is str:
        try:
            key = (tensor_key(probs), None if indices is None else tensor_key(indices), order,
                   *((name, _filter_key(value)) for name, value in filters.items()))
        except Exception:
            key = None
    call = _SAMPLER_CALLS.get(key)
    known = call is not None
    if call is None:
        _check_rows("probs", probs)
        _check_order(order)
        batch, _, id_dtype = _output_rows(probs, indices)
        call = (implementation("sampling", probs.device).filtered_sampling, batch, id_dtype)
    run, batch, id_dtype = call
    device = probs.device
    for name, value in filters.items():  # scalars: the value; tensors: moved to the device and dtype
        filters[name] = _param(name, value, batch, device, **_FILTERS[name])
    if not known and key is not None:
        _SAMPLER_CALLS.remember(key, call)  # every metadata check has passed
    rows = None if indices is None else indices.to(device, non_blocking=True)
    _check_nan("probs", probs, check_nan)
    seed, offset = _rng(generator, seed, offset, batch, device)
    ids = new_output(batch, id_dtype, device)  # an int size: faster than a shape tuple
    valid = new_output(batch, torch.bool, device) if return_valid else discarded_output((batch,), torch.bool, device)
    if batch > 0:
        run(probs, rows, ids, valid, seed, offset, order=order, launch_key=key, **filters)
    return _finish(ids, valid, return_valid)


def sampling_from_probs(
    probs: torch.Tensor,
    indices: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    check_nan: bool = False,
    *,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
    return_valid: bool = False,
) -> Samples:
    """Draw one token per row from the categorical distribution ``probs``.

    Args:
        probs: ``[batch, vocab]`` float32/float16/bfloat16, non-negative (rows need not sum to 1).
        indices, deterministic, generator, check_nan, seed, offset, return_valid: module doc.

    Returns:
        ids ``[batch_out]`` (int32 or ``indices.dtype``); with ``return_valid`` also ``valid`` bool.
    """
    return _sample(probs, indices, generator, check_nan, seed, offset, return_valid)


def sampling_from_logits(
    logits: torch.Tensor,
    indices: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    check_nan: bool = False,
    *,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
    return_valid: bool = False,
) -> Samples:
    """Draw one token per row from ``softmax(logits)`` (one fused kernel: an online max/sum pass, then
    an inverse-CDF pass; no probability tensor is written).

    Args:
        logits: ``[batch, vocab]`` float32/float16/bfloat16; -inf entries have probability 0.
        Others: module doc (``check_nan`` raises ``ValueError("Input logits contains NaN.")``).
    """
    _check_rows("logits", logits)
    batch, rows, id_dtype = _output_rows(logits, indices)
    _check_nan("logits", logits, check_nan)
    seed, offset = _rng(generator, seed, offset, batch, logits.device)
    ids = new_output((batch,), id_dtype, logits.device)
    valid = new_output((batch,), torch.bool, logits.device)
    if batch > 0:
        implementation("sampling", logits.device).sampling_from_logits(logits, rows, ids, valid, seed, offset)
    return _finish(ids, valid, return_valid)


def top_p_sampling_from_probs(
    probs: torch.Tensor,
    top_p: Param,
    indices: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    check_nan: bool = False,
    *,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
    return_valid: bool = False,
) -> Samples:
    """Nucleus sampling: draw from the smallest set of most probable tokens whose mass reaches
    ``top_p`` (token t is kept iff ``mass{p > p_t} < top_p * sum(p)``; ties with the last kept
    value are kept), renormalized.

    Args:
        probs: ``[batch, vocab]`` float32/float16/bfloat16.
        top_p: float in (0, 1], or a tensor ``[batch_out]`` (module doc: dtypes).
        Others: module doc.
    """
    return _sample(probs, indices, generator, check_nan, seed, offset, return_valid, top_p=top_p)


def top_k_sampling_from_probs(
    probs: torch.Tensor,
    top_k: Param,
    indices: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    check_nan: bool = False,
    *,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
    return_valid: bool = False,
) -> Samples:
    """Top-k sampling: draw from the tokens with ``p >=`` the k-th largest probability (all tokens
    tied with it are kept, so the set can exceed k), renormalized.

    Args:
        probs: ``[batch, vocab]`` float32/float16/bfloat16.
        top_k: int >= 1 (``>= vocab``: no filter), or a tensor ``[batch_out]`` (module doc: dtypes).
        Others: module doc.
    """
    return _sample(probs, indices, generator, check_nan, seed, offset, return_valid, top_k=top_k)


def min_p_sampling_from_probs(
    probs: torch.Tensor,
    min_p: Param,
    indices: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    check_nan: bool = False,
    *,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
    return_valid: bool = False,
) -> Samples:
    """Min-p sampling: draw from the tokens with ``p >= min_p * max(p)``, renormalized.

    Args:
        probs: ``[batch, vocab]`` float32/float16/bfloat16.
        min_p: float in [0, 1], or a tensor ``[batch_out]`` (module doc: dtypes).
        Others: module doc.
    """
    return _sample(probs, indices, generator, check_nan, seed, offset, return_valid, min_p=min_p)


def top_k_top_p_sampling_from_probs(
    probs: torch.Tensor,
    top_k: Param,
    top_p: Param,
    indices: Optional[torch.Tensor] = None,
    filter_apply_order: str = "top_k_first",
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    check_nan: bool = False,
    *,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
    return_valid: bool = False,
) -> Samples:
    """Top-k and top-p together.

    ``filter_apply_order="top_k_first"``: top-p applied to the top-k renormalized distribution (the
    kernel finds the top-k set exactly, then samples inside it). ``"joint"``: a token must pass both
    rules on the original distribution (both checked in one sampling loop).

    Args:
        probs: ``[batch, vocab]`` float32/float16/bfloat16.
        top_k, top_p: as in :func:`top_k_sampling_from_probs` / :func:`top_p_sampling_from_probs`.
        filter_apply_order: "top_k_first" or "joint"; anything else raises
            ``ValueError("Invalid filter_apply_order: ...")``.
        Others: module doc.
    """
    return _sample(probs, indices, generator, check_nan, seed, offset, return_valid, filter_apply_order,
                   top_k=top_k, top_p=top_p)


def _check_order(order) -> None:
    if order not in _ORDERS:
        from ._core.checks import InvalidOptionError

        raise InvalidOptionError(f"Invalid filter_apply_order: {order!r}; "
                                 f"expected one of {', '.join(map(repr, _ORDERS))}")


def top_k_top_p_sampling_from_logits(
    logits: torch.Tensor,
    top_k: Param,
    top_p: Param,
    indices: Optional[torch.Tensor] = None,
    filter_apply_order: str = "top_k_first",
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    check_nan: bool = False,
    *,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
    return_valid: bool = False,
) -> Samples:
    """:func:`top_k_top_p_sampling_from_probs` on ``softmax(logits)``. "top_k_first" equals upstream's
    top_k_mask_logits -> softmax -> top-p sampling (the softmax of the masked logits is the top-k
    renormalized distribution).

    Args:
        logits: ``[batch, vocab]`` float32/float16/bfloat16. Others as the probs version.
    """
    _check_rows("logits", logits)
    _check_order(filter_apply_order)
    batch, _, _ = _output_rows(logits, indices)
    top_k = _top_k(top_k, batch, logits.device)
    top_p = _top_p(top_p, batch, logits.device)
    _check_nan("logits", logits, check_nan)
    probs = softmax(logits)
    return _sample(probs, indices, generator, False, seed, offset, return_valid, filter_apply_order,
                   top_k=top_k, top_p=top_p)


# ---------------------------------------------------------------------------------------------
# softmax, renorm, mask
# ---------------------------------------------------------------------------------------------


def softmax(logits: torch.Tensor, temperature: Optional[Param] = None,
            enable_pdl: Optional[bool] = None) -> torch.Tensor:
    """``softmax(logits / temperature)`` per row, float32 ``[batch, vocab]``.

    Args:
        logits: ``[batch, vocab]`` float32/float16/bfloat16. -inf entries get probability 0; a row
            with no finite entry (all -inf or NaN) gives all zeros (torch would give NaN).
        temperature: None (1), a float > 0, or a tensor ``[batch]`` (values not checked; module doc: dtypes).
        enable_pdl: accepted for compatibility (programmatic dependent launch; no effect).
    """
    _check_rows("logits", logits)
    batch = logits.shape[0]
    if temperature is not None:
        temperature = _param("temperature", temperature, batch, logits.device, integer=False, lo=0.0,
                             hi=float("inf"), lo_open=True)
    out = new_output(tuple(logits.shape), torch.float32, logits.device)
    if batch > 0:
        implementation("sampling", logits.device).softmax(logits, out, temperature)
    return out


def _threshold(name: str, x: torch.Tensor, *, top_k=None, top_p=None, is_logits=False) -> torch.Tensor:
    out = new_output(tuple(x.shape), x.dtype, x.device)
    if x.shape[0] > 0:
        implementation("sampling", x.device).threshold_filter(x, out, top_k=top_k, top_p=top_p, is_logits=is_logits)
    return out


def top_p_renorm_probs(probs: torch.Tensor, top_p: Param) -> torch.Tensor:
    """Zero the probabilities outside the nucleus (the top-p set of :func:`top_p_sampling_from_probs`)
    and renormalize the rest to sum 1.

    Args:
        probs: ``[batch, vocab]`` float32/float16/bfloat16.
        top_p: float in (0, 1], or a tensor ``[batch]`` (module doc: dtypes).

    Returns:
        ``[batch, vocab]`` in probs' dtype (upstream v0.3.1 returned float32; HEAD keeps the dtype).
    """
    _check_rows("probs", probs)
    top_p = _top_p(top_p, probs.shape[0], probs.device)
    return _threshold("probs", probs, top_p=top_p)


def top_k_renorm_probs(probs: torch.Tensor, top_k: Param) -> torch.Tensor:
    """Keep the probabilities ``>=`` the k-th largest (ties kept), zero the rest, renormalize.

    Args:
        probs: ``[batch, vocab]`` float32/float16/bfloat16.
        top_k: int >= 1, or a tensor ``[batch]`` (module doc: dtypes).

    Returns:
        ``[batch, vocab]`` in probs' dtype.
    """
    _check_rows("probs", probs)
    top_k = _top_k(top_k, probs.shape[0], probs.device)
    return _threshold("probs", probs, top_k=top_k)


def top_k_mask_logits(logits: torch.Tensor, top_k: Param) -> torch.Tensor:
    """Keep the logits ``>=`` the k-th largest (ties kept), set the rest (and NaN) to -inf.

    Args:
        logits: ``[batch, vocab]`` float32/float16/bfloat16.
        top_k: int >= 1, or a tensor ``[batch]`` (module doc: dtypes).

    Returns:
        ``[batch, vocab]`` in logits' dtype.
    """
    _check_rows("logits", logits)
    top_k = _top_k(top_k, logits.shape[0], logits.device)
    return _threshold("logits", logits, top_k=top_k, is_logits=True)


top_p_renorm_prob = top_p_renorm_probs  # upstream's singular aliases
top_k_renorm_prob = top_k_renorm_probs


# ---------------------------------------------------------------------------------------------
# Speculative sampling
# ---------------------------------------------------------------------------------------------


def chain_speculative_sampling(
    draft_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    target_probs: torch.Tensor,
    maybe_output_accepted_token_num: Optional[torch.Tensor] = None,
    maybe_output_emitted_draft_token_num: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    *,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chain speculative sampling (standard accept/reject of a draft chain against the target).

    Draft token j of request b is accepted with probability ``min(1, p_target / p_draft)`` (as
    ``u * p_draft < p_target``: a token of target probability 0 is never accepted). At the first
    rejection one token is drawn from ``normalize(max(p_target - p_draft, 0))`` (from the target
    row if that has no mass) and the chain stops; if all n are accepted a bonus token is drawn from
    ``target_probs[:, n]``. The emitted tokens follow the target distribution.

    Args:
        draft_probs: ``[batch, n, vocab]`` float32/float16/bfloat16.
        draft_token_ids: ``[batch, n]`` int32/int64, in ``[0, vocab)`` (others are never accepted).
        target_probs: ``[batch, n + 1, vocab]``, same dtype family.
        maybe_output_accepted_token_num, maybe_output_emitted_draft_token_num: optional int tensors
            ``[batch]`` on the device; the counts of this call are added to them in place and they
            are returned.
        deterministic, generator, seed, offset: module doc (n + 1 draws per request).

    Returns:
        ``(output_token_ids [batch, n + 1] int32, accepted_num [batch], emitted_num [batch])``:
        ``output_token_ids[b, :emitted + 1]`` are the emitted draft tokens and the final token, the
        rest -1; ``accepted_num`` counts draft tokens that pass the test on their own (not only the
        prefix), ``emitted_num`` the accepted prefix (excluding the final token).
    """
    check_tensor("draft_probs", draft_probs, ndim=3, dtypes=_FLOAT_DTYPES, last_dim_contiguous=True)
    batch, n, vocab = draft_probs.shape
    check_tensor("draft_token_ids", draft_token_ids, shape=(batch, n), dtypes=_INT_DTYPES,
                 device=draft_probs.device, last_dim_contiguous=True)
    check_tensor("target_probs", target_probs, shape=(batch, n + 1, vocab), dtypes=_FLOAT_DTYPES,
                 device=draft_probs.device, last_dim_contiguous=True)
    for name, t in (("maybe_output_accepted_token_num", maybe_output_accepted_token_num),
                    ("maybe_output_emitted_draft_token_num", maybe_output_emitted_draft_token_num)):
        if t is not None:
            check_tensor(name, t, shape=(batch,), dtypes=_INT_DTYPES, device=draft_probs.device)
    device = draft_probs.device
    seed, offset = _rng(generator, seed, offset, batch, device, n + 1)
    out = new_output((batch, n + 1), torch.int32, device)
    accepted = new_output((batch,), torch.int32, device)
    emitted = new_output((batch,), torch.int32, device)
    if batch > 0:
        implementation("sampling", device).chain_speculative_sampling(
            draft_probs, draft_token_ids, target_probs, out, accepted, emitted, seed, offset)
    if maybe_output_accepted_token_num is not None:
        maybe_output_accepted_token_num.add_(accepted)
        accepted = maybe_output_accepted_token_num
    if maybe_output_emitted_draft_token_num is not None:
        maybe_output_emitted_draft_token_num.add_(emitted)
        emitted = maybe_output_emitted_draft_token_num
    return out, accepted, emitted
