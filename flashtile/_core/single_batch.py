"""Single prefill as a ragged batch of one: the route that lets one request run the batch prefill kernels.

A single request is a batch of one (``qo_indptr = [0, qo_len]``, ``kv_indptr = [0, kv_len]``), so it can
run the warp-specialized Hopper batch prefill kernel (kernels/batch_prefill_hopper.py), which the
single-request kernel (kernels/attention.py) is not. :func:`run_as_batch` decides per call and launches:

- the route is taken when ``FLASHTILE_SINGLE_PREFILL_AS_BATCH`` is on and the batch prefill launcher
  would run the Hopper kernel for this call (``hopper_serves_single``: an sm_90 GPU, fp16/bf16, head dim
  64 or 128, no window, soft cap, RoPE, ALiBi, custom mask or variant, 128-row tiles, TMA-compatible
  strides). Every other call keeps the single-request kernel. :func:`set_route_override` forces the
  route on (every call without a custom mask or variant, whichever batch kernel then runs) or off, for
  tests and for the benchmark's per-route providers;
- the plan (the batch wrappers' own planning, _core/prefill_wrapper.py) is made once per
  (qo_len, kv_len, heads, head dims, dtypes, causal, window, device, backend) and kept in a small bounded
  memo, so a call pays no plan() on the host. Each plan owns its work list (a few hundred bytes); the
  partial states of split tiles live in one float workspace per device, shared by the plans (calls on
  one stream run one after the other). A plan's work list holds the Hopper kernel's work counter: like a
  batch wrapper's plan, one plan must not run on two streams at the same time;
- a first call with a given key while a CUDA graph is being captured keeps the single-request kernel
  (planning copies from host memory, which a capture must not record); later calls replay as usual.

The eager replay of single-request calls (_core/single.py) records these launches like any others: the
plans' storages are in :func:`owned_storage`, and a replay keeps the tensors it launches with alive.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from . import dispatch, settings, tile_policy
from .buffers import persistent_tensors
from .multi_item import MultiItemArgs
from .params import AttentionParams

if TYPE_CHECKING:  # imported on first use: prefill_wrapper imports ops, which imports this module
    from .prefill_wrapper import BatchPrefillWrapper, PrefillPlan

__all__ = ["run_as_batch", "owned_storage", "set_route_override", "route_override", "on_route_change", "MAX_PLANS",
           "WORKSPACE_BYTES"]

MAX_PLANS = 64  # remembered plans (one per prompt shape and layer shape); cleared when full
WORKSPACE_BYTES = 32 * 1024 * 1024  # per device: split tiles' partial states (the planner lengthens chunks to fit)

_PLANS: dict = {}
_PLANNERS: dict = {}  # (device, backend) -> a BatchPrefillWrapper used only for its plan step
_OWNED: dict = {"storage": frozenset()}
_OVERRIDE: dict = {"route": None}
_NO_MULTI_ITEM = MultiItemArgs()


_ROUTE_LISTENERS: list = []


def on_route_change(listener) -> None:
    """Call ``listener()`` whenever :func:`set_route_override` changes the route (and on settings.reload):
    the single-request replays (_core/single.py) hold the launches of the route they were recorded with."""
    _ROUTE_LISTENERS.append(listener)
    settings.on_reload(listener)


def set_route_override(route: Optional[bool]) -> None:
    """Force the route: True (every prefill call without a custom mask or variant runs as a batch of one),
    False (none does) or None (the setting and the Hopper kernel's scope decide). The remembered plans
    stay; the replays recorded with the other route are forgotten."""
    if _OVERRIDE["route"] is not route:
        _OVERRIDE["route"] = route
        for listener in _ROUTE_LISTENERS:
            listener()


def route_override() -> Optional[bool]:
    """The forced route (:func:`set_route_override`), or None."""
    return _OVERRIDE["route"]


def owned_storage() -> frozenset:
    """Data pointers of the storages the remembered plans launch with (work lists, float workspaces)."""
    return _OWNED["storage"]


def _forget() -> None:
    _PLANS.clear()
    _OWNED["storage"] = frozenset(t.untyped_storage().data_ptr() for p in _PLANNERS.values()
                                  for t in (p._float_workspace_buffer,))


settings.on_reload(_forget)


def _planner(device: torch.device, backend: str) -> BatchPrefillWrapper:
    planner = _PLANNERS.get((device, backend))
    if planner is None:
        from .prefill_wrapper import BatchPrefillWrapper

        with persistent_tensors():  # written by every later plan, in or outside inference mode
            workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
            planner = _PLANNERS[(device, backend)] = BatchPrefillWrapper(workspace, "NHD", False, None, None, None,
                                                                         backend, None, None)
        _OWNED["storage"] = _OWNED["storage"] | {workspace.untyped_storage().data_ptr()}
    return planner


def _make_plan(q, k, v, out, params: AttentionParams, backend: str) -> PrefillPlan:
    """The batch-of-one plan of this call (the ragged batch wrapper's plan step), owning its work list (made
    outside inference mode: the plan lives on, and later launches write its work counter)."""
    qo_len, kv_len = q.shape[0], k.shape[0]
    planner = _planner(q.device, backend)
    with persistent_tensors():
        planner._plan_batch(
            qo_indptr=torch.tensor([0, qo_len], dtype=torch.int32), kv_lens_h=np.array([kv_len], dtype=np.int64),
            kv_offsets_h=np.zeros(1, dtype=np.int64), page_size=None, num_qo_heads=q.shape[1],
            num_kv_heads=k.shape[1], head_dim_qk=q.shape[2], head_dim_vo=v.shape[2], custom_mask=None,
            packed_custom_mask=None, causal=params.causal, pos_encoding_mode=params.pos_encoding_mode,
            window_left=params.window_left, logits_soft_cap=params.logits_soft_cap or None,
            sm_scale=params.sm_scale, rope_scale=params.rope_scale, rope_theta=params.rope_theta,
            q_data_type=q.dtype, kv_data_type=k.dtype, o_data_type=out.dtype, non_blocking=True,
            fixed_split_size=None, disable_split_kv=False, page_indices=None, kv_rows_needed=kv_len,
            max_page_id=None, plan_args={}, multi_item=_NO_MULTI_ITEM)
        plan = planner._plan
        assert plan is not None and plan.meta is not None  # _plan_batch just set it
        meta = plan.meta.clone()  # the planner's int workspace holds the next plan's work list
    owned = frozenset(t.untyped_storage().data_ptr() for t in (meta, plan.part_o) if t is not None)
    planner._plan = None
    return dataclasses.replace(plan, meta=meta, owned_storage=owned, plan_args={})


def run_as_batch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                 params: AttentionParams, backend: str) -> bool:
    """Run one prefill request (q ``[qo_len, Hq, Dqk]``, k/v NHD views ``[kv_len, Hkv, D]``, out
    ``[qo_len, Hq, Dvo]``, lse float32 ``[qo_len, Hq]``; no custom mask, no variant) as a ragged batch of
    one when the route applies (module doc); returns whether it did (False: the caller runs the
    single-request kernel)."""
    route = _OVERRIDE["route"]
    if route is False or (route is None and not settings.flag("FLASHTILE_SINGLE_PREFILL_AS_BATCH")):
        return False
    impl = dispatch.implementation("batch_prefill", q.device, backend)
    serves = getattr(impl, "hopper_serves_single", None)
    if serves is None:  # the reference path: the single-request reference is the same math
        return False
    if route is None:
        group = q.shape[1] // k.shape[1]
        block_m, _ = tile_policy.prefill_tile_shape(q.shape[0] * group, k.shape[0], q.shape[2], v.shape[2])
        if not serves(q, k, v, params, block_m):
            return False
    key = (q.shape[0], k.shape[0], q.shape[1], k.shape[1], q.shape[2], v.shape[2], q.dtype, k.dtype, v.dtype,
           params.causal, params.window_left, q.device, backend)
    plan = _PLANS.get(key)
    if plan is None:
        if q.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
        if len(_PLANS) >= MAX_PLANS:
            _forget()  # replays made with the forgotten plans keep their tensors alive
        plan = _PLANS[key] = _make_plan(q, k, v, out, params, backend)
        _OWNED["storage"] = _OWNED["storage"] | plan.owned_storage
    impl.batch_prefill_forward(q, k, v, None, None, plan.meta, plan.part_o, plan.part_lse, out, lse, params,
                               batch_size=1, item_capacity=plan.item_capacity, block_m=plan.block_m,
                               block_n=plan.block_n, num_items=plan.num_items, num_merges=plan.num_merges)
    return True
