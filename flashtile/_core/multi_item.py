"""Multi-item scoring in batch prefill (upstream's ``prefix_len_ptr`` / ``token_pos_in_items_ptr`` plan
arguments): argument checks and the per-request table the kernels and the reference read.

A request's sequence is a shared prefix (for example a prompt and its cached part) followed by items
(candidates to score) separated by delimiters: ``prompt <d> item1 <d> item2 <d> ... <d>``.
``token_pos_in_items`` gives each token from position ``prefix_len`` on its position inside its item,
0 for a delimiter. The token at sequence position ``p`` (bottom-right aligned: query row ``i`` sits at
``kv_len - qo_len + i``) sees key ``j`` when ``j <= p`` and

- ``p < prefix_len`` (a prefix token: plain causal), or
- ``j < prefix_len`` (the whole prefix), or
- ``j > p - t`` with ``t = token_pos_in_items[p - prefix_len]`` (itself and the ``t - 1`` tokens before
  it: the earlier tokens of its own item; a delimiter, ``t = 0``, sees only the prefix),

and, with ``window_left >= 0``, ``j >= p - window_left``. The mask is causal whatever ``causal`` says,
and replaces a custom mask (giving both raises). docs/semantics.md has the worked example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .checks import check_tensor, describe
from .debug import validate_device_indices

__all__ = ["MultiItemArgs", "MultiItemPlan", "plan_multi_item", "PREFIX_LEN_DTYPES", "TOKEN_POS_DTYPES",
           "MAX_ITEM_LEN_DTYPES"]

# The dtypes upstream and its callers use (uint32 / uint16 in FlashInfer and SGLang), and the signed ones.
PREFIX_LEN_DTYPES = (torch.uint32, torch.int32, torch.int64)
TOKEN_POS_DTYPES = (torch.uint16, torch.int16, torch.int32, torch.int64)
MAX_ITEM_LEN_DTYPES = (torch.uint16, torch.uint32, torch.int32, torch.int64)

_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class MultiItemArgs:
    """The multi-item arguments of plan(), as given (see plan()'s docstring)."""

    prefix_len_ptr: Optional[torch.Tensor] = None
    token_pos_in_items_ptr: Optional[torch.Tensor] = None
    token_pos_in_items_len: int = 0
    max_item_len_ptr: Optional[torch.Tensor] = None

    @property
    def empty(self) -> bool:
        """No multi-item argument is given (plain prefill)."""
        return (self.prefix_len_ptr is None and self.token_pos_in_items_ptr is None and self.max_item_len_ptr is None
                and not self.token_pos_in_items_len)

    def as_kwargs(self) -> dict:
        """The plan() keywords that give these arguments back (for a re-plan)."""
        return dict(prefix_len_ptr=self.prefix_len_ptr, token_pos_in_items_ptr=self.token_pos_in_items_ptr,
                    token_pos_in_items_len=self.token_pos_in_items_len, max_item_len_ptr=self.max_item_len_ptr)


@dataclass(frozen=True)
class MultiItemPlan:
    """Device tensors a multi-item plan owns (copies, so later changes to the caller's tensors do not
    reach a planned run)."""

    requests: torch.Tensor  # int32 [B, 2]: (prefix_len, index in token_pos of the request's first entry)
    token_pos: torch.Tensor  # int32 [N]: token_pos_in_items_ptr


def _check_index_array(name: str, x, dtypes, device: torch.device) -> None:
    check_tensor(name, x, ndim=1, dtypes=dtypes)
    if x.device.type != "cpu" and x.device != device:
        raise ValueError(f"{name}: expected a tensor on the CPU or on the wrapper's device {device}, got one on "
                         f"{x.device}")


def plan_multi_item(args: MultiItemArgs, qo_lens: torch.Tensor, kv_lens: torch.Tensor, device: torch.device,
                    non_blocking: bool) -> Optional[MultiItemPlan]:
    """Check the multi-item arguments against the batch and copy them to ``device``.

    Args:
        args: plan()'s arguments. ``prefix_len_ptr`` 1-D ``[B]`` (uint32, int32 or int64);
            ``token_pos_in_items_ptr`` 1-D (uint16, int16, int32 or int64), request ``b``'s entries
            starting at ``b * token_pos_in_items_len``; ``max_item_len_ptr`` 1-D ``[B]`` (uint16, uint32,
            int32 or int64) or None. Each on the CPU or on ``device``.
        qo_lens, kv_lens: host int64 ``[B]``: query and KV tokens per request.

    Returns:
        None when no multi-item argument is given, else the plan's device tensors. ``prefix_len_ptr`` is
        read on the host (a small copy; plan() may synchronize); token positions are checked on the host
        when they are host tensors or ``FLASHTILE_DEBUG=1``.

    Raises:
        TypeError: a wrong dtype or a non-tensor. ValueError: a missing companion argument, a wrong length,
        token positions that do not cover a request's query tokens, negative values.
    """
    prefix, token_pos, stride, max_item = (args.prefix_len_ptr, args.token_pos_in_items_ptr,
                                           args.token_pos_in_items_len, args.max_item_len_ptr)
    if args.empty:
        return None
    if prefix is None or token_pos is None:
        missing = "prefix_len_ptr" if prefix is None else "token_pos_in_items_ptr"
        raise ValueError(f"{missing}: multi-item scoring needs prefix_len_ptr and token_pos_in_items_ptr together "
                         f"(token_pos_in_items_len and max_item_len_ptr only qualify them); got "
                         f"prefix_len_ptr={describe(prefix)}, token_pos_in_items_ptr={describe(token_pos)}")
    if isinstance(stride, bool) or not isinstance(stride, int):
        raise TypeError(f"token_pos_in_items_len: expected an int, got {describe(stride)}")
    if stride < 0:
        raise ValueError(f"token_pos_in_items_len: expected an int >= 0, got {stride}")
    batch = kv_lens.numel()
    _check_index_array("prefix_len_ptr", prefix, PREFIX_LEN_DTYPES, device)
    _check_index_array("token_pos_in_items_ptr", token_pos, TOKEN_POS_DTYPES, device)
    if max_item is not None:
        # A per-request bound upstream's kernels use to skip KV tiles; flashtile derives the tiles it may
        # skip from the positions themselves, so only its form is checked.
        _check_index_array("max_item_len_ptr", max_item, MAX_ITEM_LEN_DTYPES, device)
        if max_item.numel() != batch:
            raise ValueError(f"max_item_len_ptr: expected one entry per request ({batch}), got {max_item.numel()}")
    if prefix.numel() != batch:
        raise ValueError(f"prefix_len_ptr: expected one entry per request ({batch}), got {prefix.numel()}")

    prefix_h = prefix.to("cpu").to(torch.int64)
    if batch and (int(prefix_h.min()) < 0 or int(prefix_h.max()) > _INT32_MAX):
        raise ValueError(f"prefix_len_ptr: expected values in [0, 2^31), got {prefix_h.tolist()[:16]}")
    # Query tokens at positions p >= prefix_len read entry b * stride + (p - prefix_len), p < kv_len: request
    # b needs kv_len - prefix_len entries when one of its queries sits at or after its prefix_len.
    reads = (qo_lens > 0) & (kv_lens > prefix_h)
    needed = torch.where(reads, kv_lens - prefix_h, 0)
    base = torch.arange(batch, dtype=torch.int64) * stride
    if batch > 1 and bool((needed > stride).any()):
        b = int(torch.nonzero(needed > stride)[0])
        raise ValueError(
            f"token_pos_in_items_len: request {b} has {int(needed[b])} tokens from its prefix_len "
            f"({int(prefix_h[b])}) to its last key ({int(kv_lens[b])}), more than the {stride} entries each request "
            f"owns in token_pos_in_items_ptr (batch size {batch}: request b's entries start at "
            f"b * token_pos_in_items_len)")
    short = reads & (base + needed > token_pos.numel())
    if bool(short.any()):
        b = int(torch.nonzero(short)[0])
        raise ValueError(
            f"token_pos_in_items_ptr: request {b} needs entries up to index {int(base[b] + needed[b]) - 1} "
            f"(kv_len - prefix_len = {int(needed[b])} positions from b * token_pos_in_items_len = {int(base[b])}), "
            f"got {token_pos.numel()} entries")
    if validate_device_indices(token_pos):
        values = token_pos.to("cpu").to(torch.int64)
        if values.numel() and (int(values.min()) < 0 or int(values.max()) > _INT32_MAX):
            raise ValueError(f"token_pos_in_items_ptr: expected positions in [0, 2^31), got values from "
                             f"{int(values.min())} to {int(values.max())}")

    # A request none of whose queries reaches its prefix_len never reads its entries: its base may be anything.
    requests = torch.stack([prefix_h, torch.where(reads, base, 0)], dim=1).to(torch.int32)
    return MultiItemPlan(
        requests=requests.to(device, non_blocking=non_blocking),
        token_pos=token_pos.to(device=device, dtype=torch.int32, non_blocking=non_blocking, copy=True),
    )
