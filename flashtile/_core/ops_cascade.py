"""torch.library registrations of the cascade merge operators (``flashtile.cascade``).

Same pattern as ops.py: destination-passing custom ops (the public function allocates the outputs,
the op writes them; the in-place merge lists the tensors it modifies in ``mutates_args``), empty fake
implementations, and a per-call choice (dispatch.py) between the Triton kernels (kernels/merge.py)
and the reference (reference/merge.py). Eager calls skip the custom-op dispatcher (``call``); under
torch.compile the op is traced. Arguments are already checked; every ``s`` is float32.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from .dispatch import implementation

__all__ = ["merge_state", "merge_state_in_place", "merge_states", "call", "eager_function", "eager_runner"]


# The implementations: kernels/merge.py or reference/merge.py (same functions), chosen per call by
# dispatch.implementation.


def _merge_state_impl(v_a, s_a, v_b, s_b, v_out, s_out) -> None:
    implementation("merge", v_a.device).merge_state_pair(v_a, s_a, v_b, s_b, v_out, s_out)


def _merge_state_in_place_impl(v, s, v_other, s_other, mask) -> None:
    implementation("merge", v.device).merge_state_pair(v, s, v_other, s_other, v, s, mask)


def _merge_states_impl(v, s, v_out, s_out) -> None:
    implementation("merge", v.device).merge_states_by_token(v, s, v_out, s_out)


@torch.library.custom_op("flashtile::merge_state", mutates_args=("v_out", "s_out"))
def merge_state(v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor, v_out: torch.Tensor,
                s_out: torch.Tensor) -> None:
    """Merge two states: v ``[T, H, D]``, s ``[T, H]`` float32 (base 2) into v_out / s_out."""
    _merge_state_impl(v_a, s_a, v_b, s_b, v_out, s_out)


@merge_state.register_fake
def _(v_a, s_a, v_b, s_b, v_out, s_out) -> None:
    return None


@torch.library.custom_op("flashtile::merge_state_in_place", mutates_args=("v", "s"))
def merge_state_in_place(v: torch.Tensor, s: torch.Tensor, v_other: torch.Tensor, s_other: torch.Tensor,
                         mask: Optional[torch.Tensor]) -> None:
    """``(v, s) <- merge((v, s), (v_other, s_other))`` for the tokens where ``mask`` (bool ``[T]``,
    or None for all) is True."""
    _merge_state_in_place_impl(v, s, v_other, s_other, mask)


@merge_state_in_place.register_fake
def _(v, s, v_other, s_other, mask) -> None:
    return None


@torch.library.custom_op("flashtile::merge_states", mutates_args=("v_out", "s_out"))
def merge_states(v: torch.Tensor, s: torch.Tensor, v_out: torch.Tensor, s_out: torch.Tensor) -> None:
    """Merge v ``[T, S, H, D]`` / s ``[T, S, H]`` over S into v_out ``[T, H, D]`` / s_out ``[T, H]``."""
    _merge_states_impl(v, s, v_out, s_out)


@merge_states.register_fake
def _(v, s, v_out, s_out) -> None:
    return None


# Eager calls run the implementation directly (no dispatcher: the cascade wrapper merges once per
# level and layer); under torch.compile the registered op is what gets traced.
_IMPLS: Dict[object, Callable[..., None]] = {
    merge_state: _merge_state_impl,
    merge_state_in_place: _merge_state_in_place_impl,
    merge_states: _merge_states_impl,
}


def call(op, *args) -> None:
    """Run ``op`` (one of this module's ops): its implementation when eager, the op when compiling."""
    (op if torch.compiler.is_compiling() else _IMPLS[op])(*args)


def eager_function(op, device: torch.device):
    """The kernel or reference function that runs ``op`` eagerly for tensors on ``device``, for callers
    that remember it per argument key (_core/memo.py) and call it directly with a ``launch_key``:
    ``merge_state_pair(v_a, s_a, v_b, s_b, v_out, s_out, mask, launch_key)`` for both pair merges."""
    if op is merge_states:
        return implementation("merge", device).merge_states_by_token
    return implementation("merge", device).merge_state_pair


def eager_runner(op, device: torch.device, key):
    """The function that runs a pair merge (``merge_state`` or ``merge_state_in_place``) eagerly for tensors on
    ``device`` whose metadata is ``key``, made once per key by callers that keep it in their memo
    (_core/memo.py): ``run(v_a, s_a, v_b, s_b, v_out, s_out, mask)``. On the kernel path it replays the
    recorded launch (kernels/merge.py's runner)."""
    return implementation("merge", device).merge_state_pair_runner(key)
