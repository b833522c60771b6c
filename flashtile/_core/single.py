"""The run path of the single-request APIs (single_decode_with_kv_cache, single_prefill_with_kv_cache).

The first call with given input shapes, strides, dtypes, alignment and options checks and normalizes
its arguments, allocates the outputs and launches through the op layer while recording the kernel
launches (_core/launch.py); later calls with the same key replay them with the new tensors. The key
fixes every outcome of the checks and every launch argument besides the tensors, so a replayed call
is the call the slow path would have made. An attention variant's extra arguments (or ``sinks=``) join the
key by the properties their checks read (_variant_key), and a replay passes this call's argument tuple. Calls
whose launches cannot be replayed (split-KV partial buffers, masks, ALiBi slopes: tensors that belong to one
call) always take the slow path.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..variants import rebind_variant
from . import ops
from .attention_args import SingleAttentionArgs
from .buffers import discarded_output, new_output, new_output_like
from .launch import argument_key, make_replay, on_clear_launch_memos, recording_launches
from .memo import tensor_key
from .single_batch import on_route_change, owned_storage
from .variant_args import bind_single_variant

__all__ = ["run_single_attention", "replay_single_attention", "single_key"]

MAX_REPLAYS = 256
_REPLAYS: dict = {}
_SCALAR_TYPES = frozenset((float, int, bool, str, type(None)))
on_route_change(_REPLAYS.clear)  # a replay holds the launches of the route chosen when it was recorded
# and the launch configs chosen when it was recorded (a tuning grid changes them, then clears the launch memos)
on_clear_launch_memos(_REPLAYS.clear)
_is_compiling = torch.compiler.is_compiling


def single_key(kind: str, q, k, v, kv_layout, options: tuple) -> Optional[tuple]:
    """The replay key of a call: ``kind``, the layout, ``options`` by value and type (1, 1.0 and True are
    equal keys otherwise), and q, k, v by their launch metadata (memo.tensor_key's fields, written out: this
    runs on every call). None when some part has no such key: an option that is not a plain scalar (a scale
    given as a tensor is read per call), an argument that is not a tensor (the checks then say what is wrong)."""
    types = tuple(map(type, options))
    if not _SCALAR_TYPES.issuperset(types):
        return None
    try:
        return (kind, kv_layout, options, types,
                q.shape, q.stride(), q.dtype, q.device, q.data_ptr() % 16 == 0,
                k.shape, k.stride(), k.dtype, k.device, k.data_ptr() % 16 == 0,
                v.shape, v.stride(), v.dtype, v.device, v.data_ptr() % 16 == 0)
    except Exception:
        return None


def _variant_key(variant) -> Optional[tuple]:
    """The part of a replay key that ``variant = (AttentionVariant, extra args)`` adds: the variant by identity,
    each extra tensor by its metadata (every property binding checks, and the alignment Triton specializes on),
    each scalar by type (ints also by what Triton specializes on); None (not replayed) for an argument of any
    other kind, e.g. a scalar given as a tensor (read per call)."""
    var, extra = variant
    key: list = [id(var)]
    for a in extra:
        kind = type(a)
        if kind is torch.Tensor:
            key.append(tensor_key(a))
        elif kind is int:
            key.append(argument_key(a))
        elif kind is float or a is None:
            key.append(kind)
        else:
            return None
    return tuple(key)


def replay_single_attention(kind: str, q, k, v, kv_layout, options: tuple, return_lse: bool) -> Optional[tuple]:
    """``(out, lse)`` of an eager call whose key (:func:`single_key`) has a recorded replay, else None (then
    call :func:`run_single_attention`). For the API functions' first lines: it needs no normalized arguments."""
    if _is_compiling():
        return None
    try:
        runner = _REPLAYS.get(single_key(kind, q, k, v, kv_layout, options))
    except TypeError:  # an unhashable option or layout: the slow path's checks reject it
        return None
    return None if runner is None else runner(q, k, v, return_lse)


def _derive(kind: str, kv_layout: str, q_copy: bool, k_copy: bool, v_copy: bool):
    """What a replay takes in place of the caller's q, k, v: the tensors themselves when the slow path
    used views of them (a replay passes only data pointers, and a view starts where its tensor does:
    decode's query axis, an HND transpose), else the unit-stride copies normalize_single_attention made
    for inputs of this key (None: no copies)."""
    if not (q_copy or k_copy or v_copy):
        return None
    hnd = kv_layout == "HND"

    def derive(q, k, v):
        if kind == "decode":
            q = q.unsqueeze(0)
        if q_copy:
            q = q.contiguous()
        if hnd:
            k, v = k.transpose(0, 1), v.transpose(0, 1)
        if k_copy:
            k = k.contiguous()
        if v_copy:
            v = v.contiguous()
        return q, k, v

    return derive


def run_single_attention(kind: str, q, k, v, kv_layout, options: tuple, normalize: Callable[[], SingleAttentionArgs],
                         return_lse: bool, variant=None):
    """``(out, lse)`` of one request, lse None unless ``return_lse``. ``kind``: "decode" (q ``[Hq, D]``; out
    ``[Hq, Dvo]``, lse ``[Hq]``) or "prefill" (q ``[Lq, Hq, D]``; out ``[Lq, Hq, Dvo]``, lse ``[Lq, Hq]``);
    ``kv_layout``: the caller's; ``options``: the call's other arguments (their values key the replay;
    anything but a plain scalar among them turns the replay off); ``normalize()`` checks everything and
    returns the normalized arguments (the slow path). ``variant``: ``(AttentionVariant, extra args)`` or None;
    its arguments are checked on the first call of a key; a later call with the same key (which holds the extra
    arguments' properties: _variant_key) replays with this call's extra arguments."""
    key = None
    if not _is_compiling():
        try:
            key = single_key(kind, q, k, v, kv_layout, options)
            if key is not None and variant is not None:
                extra_key = _variant_key(variant)
                key = None if extra_key is None else key + (extra_key,)
            runner = _REPLAYS.get(key) if key is not None else None
        except TypeError:  # unhashable: the checks below reject it
            key = runner = None
        if runner is not None:
            if variant is None:
                return runner(q, k, v, return_lse)
            return runner(q, k, v, return_lse, rebind_variant(variant[0], variant[1]).args)
    args = normalize()
    qo_len, num_qo_heads, _ = args.q.shape
    shape = (qo_len, num_qo_heads, args.v.shape[2])  # the op's
    out_shape = shape[1:] if kind == "decode" else shape  # the caller's (decode: no query axis)
    out = new_output(out_shape, args.out_dtype, q.device)
    lse = new_output(out_shape[:-1], torch.float32, q.device)
    dynamic = (args.q, args.k, args.v) + ((out.unsqueeze(0), lse.unsqueeze(0)) if kind == "decode" else (out, lse))
    bound = None
    if variant is not None:
        bound = bind_single_variant(variant, args)
    if args.fp8_scales is not None:  # scales are tensors of one call: never replayed
        ops.call(ops.single_attention_fp8, *dynamic[:3], args.packed_mask, *dynamic[3:], kind,
                 *args.fp8_scales.as_tuple(), params=args.params, backend=args.backend)
        return out, lse if return_lse else None
    if key is None or args.packed_mask is not None:
        ops.call(ops.single_attention, *dynamic[:3], args.packed_mask, *dynamic[3:], kind, params=args.params,
                 backend=args.backend, variant=bound)
        return out, lse if return_lse else None
    with recording_launches() as recording:
        ops.call(ops.single_attention, *dynamic[:3], None, *dynamic[3:], kind, params=args.params, backend=args.backend,
                 variant=bound)
    # a batch of one launches with its plan's tensors; a variant's extra arguments are one dynamic tuple
    replay = make_replay(recording, dynamic + ((bound.args,) if bound is not None and bound.args else ()),
                         owned_storage())
    if replay is not None:
        if len(_REPLAYS) >= MAX_REPLAYS:
            _REPLAYS.clear()
        derive = _derive(kind, kv_layout, args.q.data_ptr() != q.data_ptr(),
                         args.k.data_ptr() != _nhd(k, kv_layout).data_ptr(),
                         args.v.data_ptr() != _nhd(v, kv_layout).data_ptr())
        out_dtype, device = args.out_dtype, q.device
        discarded_lse = discarded_output(out_shape[:-1], torch.float32, device)
        # The output has q's shape and dtype in the common case: torch.empty_like then (less host time)
        like_q = tuple(q.shape) == tuple(out_shape) and q.dtype == out_dtype

        def runner(q, k, v, return_lse, extra=()):
            o = new_output_like(q) if like_q else new_output(out_shape, out_dtype, device)
            if derive is not None:
                q, k, v = derive(q, k, v)
            s = new_output(out_shape[:-1], torch.float32, device) if return_lse else discarded_lse
            if extra:
                replay(q, k, v, o, s, extra)
            else:
                replay(q, k, v, o, s)
            return o, s if return_lse else None

        _REPLAYS[key] = runner
    return out, lse if return_lse else None


def _nhd(x: torch.Tensor, kv_layout: str) -> torch.Tensor:
    return x.transpose(0, 1) if kv_layout == "HND" else x
