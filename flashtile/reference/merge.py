"""Merging attention states in plain PyTorch: the CPU path of ``flashtile.cascade``'s merge operators.

A state is ``(v, s)``: a normalized attention output and the base-2 log-sum-exp of the logits it
covers. Merging states ``i`` is a softmax over their ``s``::

    m = max_i s_i;  w_i = 2 ** (s_i - m);  v = sum_i w_i v_i / sum_i w_i;  s = m + log2(sum_i w_i)

A state with ``s = -inf`` (it saw no key) has weight 0 and its ``v`` is not used (it may hold
anything); if every state is empty the result is ``v = 0``, ``s = -inf``. Math in float32; the output
is rounded once to ``v_out``'s dtype.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["merge_state_pair", "merge_state_pair_runner", "merge_states_by_token"]

NEG_INF = float("-inf")


def _weights(s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``2 ** (s - m)``, with pivot 0 where every state is empty so that the weights are 0, not NaN."""
    pivot = torch.where(m == NEG_INF, torch.zeros_like(m), m)
    return torch.exp2(s - pivot)


def _values(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """float32 ``v`` with the rows of empty states zeroed (their contents are never used)."""
    return v.float().masked_fill((s == NEG_INF).unsqueeze(-1), 0.0)


def _finish(m: torch.Tensor, weight_sum: torch.Tensor, acc: torch.Tensor):
    """``(v, s)`` from the max, the weight sum and the weighted value sum; empty rows give 0, -inf."""
    empty = weight_sum == 0
    safe_l = torch.where(empty, torch.ones_like(weight_sum), weight_sum)
    v = torch.where(empty.unsqueeze(-1), torch.zeros_like(acc), acc / safe_l.unsqueeze(-1))
    s = torch.where(empty, torch.full_like(m, NEG_INF), m + torch.log2(safe_l))
    return v, s


def merge_state_pair(
    v_a: torch.Tensor,
    s_a: torch.Tensor,
    v_b: torch.Tensor,
    s_b: torch.Tensor,
    v_out: torch.Tensor,
    s_out: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    launch_key=None,
) -> None:
    """Merge two states: v ``[T, H, D]``, s ``[T, H]`` float32. ``v_out``/``s_out`` may be
    ``v_a``/``s_a`` (in place). With ``mask`` (bool ``[T]``) tokens with False are left untouched.
    ``launch_key`` (the kernels' launch-memo key) is unused here."""
    s_a, s_b = s_a.float(), s_b.float()
    m = torch.maximum(s_a, s_b)
    w_a, w_b = _weights(s_a, m), _weights(s_b, m)
    acc = w_a.unsqueeze(-1) * _values(v_a, s_a) + w_b.unsqueeze(-1) * _values(v_b, s_b)
    v, s = _finish(m, w_a + w_b, acc)
    if mask is None:
        v_out.copy_(v)
        s_out.copy_(s)
    else:
        v_out.copy_(torch.where(mask[:, None, None], v.to(v_out.dtype), v_out))
        s_out.copy_(torch.where(mask[:, None], s, s_out))


def merge_states_by_token(v: torch.Tensor, s: torch.Tensor, v_out: torch.Tensor, s_out: torch.Tensor) -> None:
    """Merge ``v [T, S, H, D]`` / ``s [T, S, H]`` over the ``S`` states of each token into
    ``v_out [T, H, D]`` / ``s_out [T, H]``. No state at all gives 0 and -inf."""
    s = s.float()
    if s.shape[1] == 0:
        m = torch.full(s_out.shape, NEG_INF, dtype=torch.float32, device=s.device)
    else:
        m = s.amax(dim=1)  # [T, H]
    w = _weights(s, m.unsqueeze(1))  # [T, S, H]
    acc = (w.unsqueeze(-1) * _values(v, s)).sum(dim=1)  # [T, H, D]
    out, lse = _finish(m, w.sum(dim=1), acc)
    v_out.copy_(out)
    s_out.copy_(lse)


def merge_state_pair_runner(launch_key):
    """``run(v_a, s_a, v_b, s_b, v_out, s_out, mask)`` (kernels/merge.py's runner signature)."""
    return merge_state_pair
