"""The op layer's batch-prefill entry point on the reference path (the same name and arguments as
flashtile/kernels/batch_prefill.py): the planned requests, request by request."""

from __future__ import annotations

from typing import Optional

import torch

from .._core.params import AttentionParams
from ..scheduler.prefill_work import meta_requests
from .attention import batch_prefill, dequantize_heads

__all__ = ["batch_prefill_forward"]


def batch_prefill_forward(q, k, v, page_indices: Optional[torch.Tensor], packed_mask: Optional[torch.Tensor],
                          worklist: torch.Tensor, part_o, part_lse, out, lse, params: AttentionParams, *,
                          batch_size: int, item_capacity: int, block_m: int, block_n: int, num_items: int,
                          num_merges: int, multi_item_requests: Optional[torch.Tensor] = None,
                          token_pos_in_items: Optional[torch.Tensor] = None, variant=None, fp8_scales=None) -> None:
    """:func:`flashtile.reference.attention.batch_prefill` over the work list's requests, written into
    ``out`` / ``lse`` (the tiling arguments are the kernels'; unused here). ``fp8_scales``: ``(scale_q,
    scale_k, scale_v)`` float32 per-head scales of fp8 q, k, v (FP8 attention of the dequantized
    tensors), or None."""
    if fp8_scales is not None:  # k, v: [rows, heads, dim] or pages [P, page_size, heads, dim]
        q, k, v = (dequantize_heads(x, s) for x, s in zip((q, k, v), fp8_scales))
    o, s = batch_prefill(q, k, v, page_indices, packed_mask, meta_requests(worklist, batch_size), params,
                         multi_item_requests=multi_item_requests, token_pos_in_items=token_pos_in_items,
                         variant=variant)
    out.copy_(o)
    lse.copy_(s)
