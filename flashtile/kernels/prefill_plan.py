"""Reading the batch-prefill plan (``META``: kernels/batch_prefill.py documents its layout, the scheduler
owns the record widths: scheduler/prefill_work.py) in a kernel.

Shared by the Triton kernel (batch_prefill.py) and the warp-specialized Gluon kernel
(batch_prefill_hopper.py), so both take the same items in the same launch order.
"""

import triton
import triton.language as tl

from ..scheduler.prefill_work import ITEM_FIELDS, REQUEST_FIELDS
from .attention import V_T_ALIGN, V_T_TAIL

# Record widths of the plan's item and request sections, as the scheduler packs them.
ITEM_STRIDE = tl.constexpr(ITEM_FIELDS)
REQUEST_STRIDE = tl.constexpr(REQUEST_FIELDS)

# Ragged FP8 batches: a key-contiguous copy of V (why: kernels/attention.py FP8_TRANSPOSE_V; made by
# batch_prefill.ragged_fp8_v_layout). Request r's keys start at ragged_v_t_start(kv_offset, r), a multiple of
# V_T_ALIGN, and are followed by at least V_T_GAP - V_T_ALIGN + 1 zero keys, so a tile may read up to BLOCK_N
# (<= V_T_TAIL) keys past the request's last one without a key mask, never into the next request (whose values
# could be anything).
V_T_GAP = V_T_TAIL + V_T_ALIGN
V_T_ALIGN_KEYS = tl.constexpr(V_T_ALIGN)  # kernels may read only constexpr globals
_GAP = tl.constexpr(V_T_GAP)


@triton.jit
def ragged_v_t_start(kv_offset, request):
    """Where request ``request``'s keys start in the transposed copy (its ragged start rounded up to
    V_T_ALIGN, plus V_T_GAP per earlier request)."""
    return (kv_offset + V_T_ALIGN_KEYS - 1) // V_T_ALIGN_KEYS * V_T_ALIGN_KEYS + request * _GAP


@triton.jit
def item_and_head(pid, num_items, group_items, num_kv_heads):
    """``(item, kv_head, active)`` of program ``pid``. Items come in groups of ``group_items``
    (the last one shorter); inside a group, head 0 takes every item, then head 1, ... (so programs
    that read the same K/V run together: scheduler/prefill_work.py). ``active`` is False for the
    programs past ``num_items * num_kv_heads`` (graph mode's fixed grid); their head is clamped into
    range here, their item by the caller."""
    group_items = tl.maximum(group_items, 1)
    per_group = group_items * num_kv_heads
    group = pid // per_group
    r = pid - group * per_group
    first = group * group_items
    in_group = tl.maximum(tl.minimum(group_items, num_items - first), 1)
    kv_head = r // in_group
    item = first + r - kv_head * in_group
    active = pid < num_items * num_kv_heads
    return item, tl.minimum(kv_head, num_kv_heads - 1), active


@triton.jit
def request_of_item(ITEMS, item):
    """The request an item belongs to (its first field; item_fields reads the request's own fields
    with its own load: routing that load through here reorders the default kernel's SASS, measured)."""
    return tl.load(ITEMS + item * ITEM_STRIDE)


@triton.jit
def item_fields(ITEMS, REQS, item):
    """An item's row block, KV range and slot, and its request's fields (the plan layout: module doc)."""
    it = ITEMS + item * ITEM_STRIDE
    rq = REQS + tl.load(it) * REQUEST_STRIDE
    return (tl.load(it + 1), tl.load(it + 2), tl.load(it + 3), tl.load(it + 4), tl.load(rq), tl.load(rq + 1),
            tl.load(rq + 2), tl.load(rq + 3), tl.load(rq + 4))
