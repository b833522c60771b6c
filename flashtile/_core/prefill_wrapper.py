"""The plan/run machinery shared by the paged and ragged batch prefill wrappers (flashtile/prefill.py):
what plan() decides (:class:`PrefillPlan`: the packed work list of scheduler/prefill_work.py, split-KV
scratch, the packed custom mask, multi-item scoring) and run()'s launch with replay (_core/wrapper.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..reference.packbits import segment_packbits
from ..scheduler.prefill_work import pack_prefill_meta, plan_prefill_work, prefill_capacity
from . import ops, tile_policy
from .attention_args import resolve_attention_params
from .checks import FP8_DTYPES, check_tensor, describe
from .fp8_attention import Fp8Scales, fp8_scales, reject_fp8_features
from .host_arrays import host_int64, host_max, host_min
from .multi_item import MultiItemArgs, MultiItemPlan, plan_multi_item
from .paged_kv import as_index_tensor
from .wrapper import PlanBase, PlanRunWrapper, check_heads, variant_replay_args

__all__ = ["PrefillPlan", "BatchPrefillWrapper"]


@dataclass
class PrefillPlan(PlanBase):
    """What plan() decided; run() checks its inputs against it and launches with it."""

    total_qo: int = 0  # rows of q (qo_indptr[-1])
    head_dim_qk: int = 0
    head_dim_vo: int = 0
    page_size: Optional[int] = None  # None: ragged
    meta: Optional[torch.Tensor] = None  # int32 packed work list (scheduler/prefill_work.py), device
    item_capacity: int = 0
    num_items: int = 0  # grid: planned items, or the fixed capacity in CUDA-graph mode
    num_merges: int = 0
    block_m: int = 0
    block_n: int = 0
    page_indices: Optional[torch.Tensor] = None  # int32 page ids, device (paged)
    packed_mask: Optional[torch.Tensor] = None  # uint8, device
    part_o: Optional[torch.Tensor] = None
    part_lse: Optional[torch.Tensor] = None
    kv_rows_needed: int = 0  # ragged: rows of k/v the plan reads; paged: 0
    max_page_id: Optional[int] = None  # paged, when the table came from the host
    multi_item: Optional[MultiItemPlan] = None  # multi-item scoring (prefix lengths, token positions), device


class BatchPrefillWrapper(PlanRunWrapper):
    """Shared plan/run machinery of the paged and ragged batch prefill wrappers."""

    _paged: bool = True
    _plan: Optional[PrefillPlan]
    run: Callable[..., Any]  # the paged and ragged wrappers' own signatures; the aliases below call them
    forward: Callable[..., Any]

    def __init__(self, float_workspace_buffer, kv_layout, use_cuda_graph, qo_indptr_buf, custom_mask_buf,
                 mask_indptr_buf, backend, jit_args, jit_kwargs) -> None:
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, backend, jit_args)
        if jit_kwargs is not None and not isinstance(jit_kwargs, dict):
            raise TypeError(f"jit_kwargs: expected a dict (upstream's flags of the jit_args module), "
                            f"got {jit_kwargs!r}")
        self._qo_indptr_buf = qo_indptr_buf
        self._custom_mask_buf = custom_mask_buf
        self._mask_indptr_buf = mask_indptr_buf
        self._graph_shape: Optional[tuple] = None  # (block_m, total_qo, capacities) fixed by the first plan
        # Set by BatchAttention: interleave the items of requests with at most this many GQA-packed rows
        # with the others' (scheduler/prefill_work.py, interleave_rows). None: the plain launch order.
        self._interleave_rows: Optional[int] = None
        if self._use_cuda_graph:
            self._check_graph_buffer("qo_indptr_buf", qo_indptr_buf)
            self._fixed_batch_size = qo_indptr_buf.numel() - 1
            for name, buf in (("custom_mask_buf", custom_mask_buf), ("mask_indptr_buf", mask_indptr_buf)):
                if buf is not None:
                    check_tensor(name, buf, device=self.device)

    def _check_graph_buffer(self, name: str, buf) -> None:
        if not isinstance(buf, torch.Tensor):
            raise ValueError(f"{name} should be a torch.Tensor in cudagraph mode, got {describe(buf)}")
        as_index_tensor(name, buf)
        if buf.dtype != torch.int32 or buf.device != self.device:
            raise ValueError(f"{name}: expected an int32 tensor on {self.device} in cudagraph mode, "
                             f"got {describe(buf)}")

    def _plan_batch(
        self, *, qo_indptr, kv_lens_h, kv_offsets_h, page_size, num_qo_heads, num_kv_heads, head_dim_qk,
        head_dim_vo, custom_mask, packed_custom_mask, causal, pos_encoding_mode, window_left, logits_soft_cap,
        sm_scale, rope_scale, rope_theta, q_data_type, kv_data_type, o_data_type, non_blocking, fixed_split_size,
        disable_split_kv, page_indices, kv_rows_needed, max_page_id, plan_args, multi_item: MultiItemArgs,
    ) -> None:
        """The part of plan() both wrappers share; the KV description is already reduced to per-request
        lengths and offsets (host int64 numpy arrays)."""
        check_heads(num_qo_heads, num_kv_heads)
        head_dim_qk = self._check_head_dim(head_dim_qk, "head_dim_qk")
        head_dim_vo = head_dim_qk if head_dim_vo is None else self._check_head_dim(head_dim_vo, "head_dim_vo")
        if pos_encoding_mode == "ROPE_LLAMA" and head_dim_qk % 2:
            raise ValueError(f"head_dim_qk: RoPE needs an even head_dim, got {head_dim_qk}")
        params = resolve_attention_params(
            None, head_dim=head_dim_qk, causal=causal, pos_encoding_mode=pos_encoding_mode, window_left=window_left,
            logits_soft_cap=logits_soft_cap, sm_scale=sm_scale, rope_scale=rope_scale, rope_theta=rope_theta)
        q_dtype, kv_dtype, o_dtype = self._plan_dtypes(q_data_type, kv_data_type, o_data_type, allow_fp8_q=True)
        if q_dtype in FP8_DTYPES:
            reject_fp8_features(pos_encoding_mode, self._jit_variant is not None)
        fixed_split_size, disable_split_kv = self._split_options(fixed_split_size, disable_split_kv)

        as_index_tensor("qo_indptr", qo_indptr)
        batch = kv_lens_h.size
        qo_h = host_int64(qo_indptr)
        if qo_h.size != batch + 1:
            raise ValueError(f"qo_indptr: expected batch_size + 1 = {batch + 1} entries (batch size from the KV "
                             f"description), got {qo_h.size}")
        if qo_h[0] != 0:
            raise ValueError(f"qo_indptr: must start at 0 (rows of q are numbered from 0), got {int(qo_h[0])}")
        qo_lens = qo_h[1:] - qo_h[:-1]
        if batch and host_min(qo_lens) < 0:
            raise ValueError(f"qo_indptr: must be non-decreasing, got {qo_h.tolist()[:16]}")
        total_qo = int(qo_h[-1])
        self._check_graph_batch(batch)

        mask_h, mask_offsets = self._pack_mask(custom_mask, packed_custom_mask, qo_lens, kv_lens_h)
        has_mask = mask_h is not None
        items = None
        if not multi_item.empty:
            items = plan_multi_item(multi_item, torch.from_numpy(qo_lens), torch.from_numpy(kv_lens_h), self.device,
                                    non_blocking)
        if items is not None:
            if has_mask:
                raise ValueError("custom_mask / packed_custom_mask: multi-item scoring (prefix_len_ptr) defines the "
                                 "mask itself; give one or the other (upstream silently drops the custom mask)")
            if self._use_cuda_graph:
                raise NotImplementedError(
                    "prefix_len_ptr: multi-item scoring in CUDA-graph mode is not supported by flashtile (the plan "
                    "copies the token positions into memory it allocates, which a captured graph would not see "
                    "after a re-plan)")
            causal = True  # the multi-item mask is causal whatever `causal` says (as upstream)
            plan_args = {**plan_args, **multi_item.as_kwargs()}
        group = num_qo_heads // num_kv_heads

        small = tile_policy.plans_small_tiles(self._compiled())
        align, sms = tile_policy.planning_facts(self.device, small)
        deterministic = fixed_split_size is not None or disable_split_kv
        max_rows = None if deterministic else (host_max(qo_lens) * group if batch else 0)
        max_kv = host_max(kv_lens_h) if batch else 0
        block_m, block_n = tile_policy.prefill_tile_shape(max_rows, max_kv, head_dim_qk, head_dim_vo, page_size,
                                                          small=small)
        if self._use_cuda_graph:
            if self._graph_shape is None:
                caps = prefill_capacity(batch, total_qo * group, block_m, num_kv_heads, sms)
                self._graph_shape = (block_m, block_n, total_qo, caps)
            block_m, block_n, max_qo, caps = self._graph_shape
            if total_qo > max_qo:
                raise ValueError(f"The total number of rows in qo_indptr {total_qo} in cuda graph mode cannot exceed "
                                 f"the number of rows set during initialization {max_qo}")
            item_cap, merge_cap, slot_cap = caps
        # Partial states of split tiles live in the float workspace; a plan that would need more than
        # it holds uses longer chunks (fewer splits) instead.
        slot_bytes = 4 * num_kv_heads * block_m * (head_dim_vo + 1)
        room = self._float_workspace_buffer.numel() * self._float_workspace_buffer.element_size() // slot_bytes
        work_kwargs = dict(group=group, block_m=block_m, causal=bool(causal) and not has_mask,
                           window_left=window_left, programs_per_item=num_kv_heads, num_sms=sms, align=align,
                           interleave_rows=self._interleave_rows)
        fixed_chunk = fixed_split_size * (page_size or 1) if fixed_split_size is not None else None
        work = plan_prefill_work(qo_lens, kv_lens_h, fixed_chunk=fixed_chunk, disable_split=disable_split_kv,
                                 **work_kwargs)
        slot_limit = min(room, slot_cap) if self._use_cuda_graph else room
        while work.num_slots > slot_limit and fixed_split_size is None:
            work = plan_prefill_work(qo_lens, kv_lens_h, fixed_chunk=2 * work.chunk, **work_kwargs)
        if work.num_slots > slot_limit:
            raise ValueError(f"fixed_split_size={fixed_split_size} needs {work.num_slots} partial states of "
                             f"{slot_bytes} bytes, more than the float workspace (or the CUDA-graph plan) holds "
                             f"({slot_limit}); use a larger fixed_split_size or workspace")
        if self._use_cuda_graph:
            if work.num_items > item_cap or work.num_merges > merge_cap:
                raise ValueError(f"fixed_split_size={fixed_split_size} cuts this batch into {work.num_items} pieces, "
                                 f"more than the {item_cap} that CUDA-graph mode sized its grid for; use a larger "
                                 "fixed_split_size")
            num_items, num_merges, num_slots = item_cap, merge_cap, slot_limit
        else:
            item_cap, merge_cap = work.num_items, work.num_merges
            num_items, num_merges, num_slots = work.num_items, work.num_merges, work.num_slots

        # One host->device copy of the plan into the int workspace the wrapper owns.
        meta_h = pack_prefill_meta(work, (qo_h[:-1], qo_lens, kv_offsets_h, kv_lens_h, mask_offsets), item_cap,
                                   merge_cap)
        if self.device.type == "cuda":
            meta_h = meta_h.pin_memory()
        meta = self._upload_worklist(meta_h, non_blocking)
        packed_mask = self._place_mask(mask_h, mask_offsets, non_blocking) if has_mask else None
        if self._use_cuda_graph:
            self._qo_indptr_buf.copy_(torch.from_numpy(qo_h), non_blocking=non_blocking)

        part_o, part_lse = self._workspace_tensors(
            self._float_workspace_buffer, "float_workspace_buffer", torch.float32,
            (num_slots, num_kv_heads, block_m, head_dim_vo), (num_slots, num_kv_heads, block_m))

        if has_mask:
            params = dataclasses.replace(params, causal=False)  # a custom mask replaces causal
        elif items is not None:
            params = dataclasses.replace(params, causal=True)  # the multi-item mask is causal (as upstream)
        self._plan = PrefillPlan(
            q_dtype=q_dtype, kv_dtype=kv_dtype, o_dtype=o_dtype, params=params,
            plan_args={**plan_args, "_head_dim": head_dim_qk, "_mask_replaces_causal": has_mask or items is not None},
            owned_storage=self._owned_storage(meta, page_indices, packed_mask, part_o,
                                              *(items.requests, items.token_pos) if items is not None else ()),
            batch_size=batch, total_qo=total_qo, num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads,
            head_dim_qk=head_dim_qk, head_dim_vo=head_dim_vo, page_size=page_size, meta=meta, item_capacity=item_cap,
            num_items=num_items, num_merges=num_merges, block_m=block_m, block_n=block_n, page_indices=page_indices,
            packed_mask=packed_mask, part_o=part_o, part_lse=part_lse, kv_rows_needed=kv_rows_needed,
            max_page_id=max_page_id, multi_item=items,
        )

    def _pack_mask(self, custom_mask, packed_custom_mask, qo_lens, kv_lens):
        """Host uint8 mask with each request's segment starting on a byte (or None), and the byte offsets
        (int64 numpy; zeros without a mask)."""
        if packed_custom_mask is None and custom_mask is None:
            return None, np.zeros(qo_lens.size, dtype=np.int64)
        seg_bits = qo_lens * kv_lens
        seg_bytes = (seg_bits + 7) // 8
        offsets = np.cumsum(seg_bytes) - seg_bytes
        if packed_custom_mask is not None:
            check_tensor("packed_custom_mask", packed_custom_mask, ndim=1, dtypes=(torch.uint8,))
            if packed_custom_mask.numel() != int(seg_bytes.sum()):
                raise ValueError(
                    f"packed_custom_mask: expected {int(seg_bytes.sum())} bytes (each request's qo_len * kv_len mask "
                    f"bits packed LSB first, every request starting on a new byte, as segment_packbits(..., "
                    f"bitorder='little') returns), got {packed_custom_mask.numel()}")
            return packed_custom_mask, offsets
        check_tensor("custom_mask", custom_mask, ndim=1)
        if custom_mask.numel() != int(seg_bits.sum()):
            raise ValueError(f"custom_mask: expected sum(qo_len * kv_len) = {int(seg_bits.sum())} elements (the "
                             f"requests' [qo_len, kv_len] masks flattened and concatenated), got {custom_mask.numel()}")
        bit_indptr = torch.from_numpy(np.concatenate([[0], np.cumsum(seg_bits)]).astype(np.int64))
        packed, _ = segment_packbits(custom_mask, bit_indptr, bitorder="little")
        return packed, offsets

    def _place_mask(self, mask, offsets, non_blocking) -> torch.Tensor:
        if not self._use_cuda_graph:
            return mask.to(self.device, non_blocking=non_blocking)
        if self._custom_mask_buf is None or self._mask_indptr_buf is None:
            raise ValueError("custom_mask_buf and mask_indptr_buf must be given to the constructor to use a custom "
                             "mask in cudagraph mode")
        if mask.numel() > self._custom_mask_buf.numel():
            raise ValueError(f"custom_mask_buf: this plan's packed mask has {mask.numel()} bytes, the buffer holds "
                             f"{self._custom_mask_buf.numel()}")
        self._custom_mask_buf.view(-1).view(torch.uint8)[: mask.numel()].copy_(mask, non_blocking=non_blocking)
        indptr = torch.from_numpy(np.append(offsets, mask.numel()).astype(np.int64))
        if self._mask_indptr_buf.numel() >= indptr.numel():
            self._mask_indptr_buf[: indptr.numel()].copy_(indptr, non_blocking=non_blocking)
        return self._custom_mask_buf.view(-1).view(torch.uint8)

    def _fp8_scales(self, plan: PrefillPlan, args: tuple, sinks) -> Optional[Fp8Scales]:
        """FP8 attention (an fp8 q_data_type plan): run()'s positional ``scale_q, scale_k, scale_v`` (upstream
        passes them in ``*args``), checked; None for an fp16/bf16 plan (``args`` then feed a variant)."""
        if plan.q_dtype not in FP8_DTYPES:
            return None
        if len(args) > 3:
            raise TypeError(f"run(): with fp8 q the extra positional arguments are scale_q, scale_k, scale_v; got "
                            f"{len(args)}")
        if sinks is not None:
            raise NotImplementedError("sinks: attention sinks with fp8 q are not supported")
        scale_q, scale_k, scale_v = tuple(args) + (None,) * (3 - len(args))
        return fp8_scales(scale_q, scale_k, scale_v, plan.num_qo_heads, plan.num_kv_heads, self.device)

    def _launch(self, plan: PrefillPlan, key, q, k, v, q_scale, k_scale, v_scale, out, lse, return_lse, rows_out,
                derive, variant=None, fp8: Optional[Fp8Scales] = None):
        """Allocate or check the outputs and launch; with a memo ``key``, remember a replay for later runs
        whose inputs have the same key (``derive(q, kv...)``: the kernel's K/V views of run()'s inputs).
        ``fp8``: FP8 attention's scales (then never replayed: they are tensors of one call)."""
        params = self._run_params(plan, q_scale, k_scale, v_scale)
        shape = (rows_out, plan.num_qo_heads, plan.head_dim_vo)
        o, s = self._outputs(shape, plan.o_dtype, out, lse)
        multi = plan.multi_item

        def launch() -> None:
            op_args = (q, k, v, plan.page_indices, plan.packed_mask,
                       multi.requests if multi is not None else None, multi.token_pos if multi is not None else None,
                       plan.meta, plan.part_o, plan.part_lse, o, s, plan.batch_size, plan.item_capacity, plan.block_m,
                       plan.block_n, plan.num_items, plan.num_merges)
            if fp8 is not None:
                ops.call(ops.batch_prefill_fp8, *op_args, *fp8.as_tuple(), params=params, backend=self._backend)
            else:
                ops.call(ops.batch_prefill, *op_args, params=params, backend=self._backend, variant=variant)

        if fp8 is not None:
            key = None

        replay = self._launch_recorded(plan, key, (q, k, v, o, s, *variant_replay_args(variant)), launch)
        if replay is not None:
            plan.replays[key] = self._replay_runner(replay, lambda inputs: (inputs[0], *derive(inputs[1])), shape,
                                                    plan.o_dtype, self.device)
        return (o, s) if return_lse else o

    def _check_q(self, plan: PrefillPlan, q) -> int:
        """Checks q against the plan; returns its row count (graph mode: may exceed the plan's rows)."""
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q: expected a torch.Tensor, got {describe(q)}")
        if q.dtype != plan.q_dtype:
            raise ValueError(f"The dtype of q {q.dtype} does not match the q_data_type {plan.q_dtype} specified "
                             "in plan function.")
        if q.dim() != 3 or tuple(q.shape[1:]) != (plan.num_qo_heads, plan.head_dim_qk):
            raise ValueError(f"q: expected shape [qo_indptr[-1], num_qo_heads, head_dim_qk] = "
                             f"[{plan.total_qo}, {plan.num_qo_heads}, {plan.head_dim_qk}] as planned, "
                             f"got {list(q.shape)}")
        rows_ok = q.shape[0] >= plan.total_qo if self._use_cuda_graph else q.shape[0] == plan.total_qo
        if not rows_ok:
            raise ValueError(f"q: expected {plan.total_qo} rows (qo_indptr[-1] of the plan), got {q.shape[0]}")
        if q.shape[-1] > 1 and q.stride(-1) != 1:
            raise ValueError(f"q: the last dimension must have stride 1, got strides {tuple(q.stride())}")
        if q.device != self.device:
            raise ValueError(f"q must be on the wrapper's device {self.device} (the workspace's), got {q.device}")
        return q.shape[0]

    def run_return_lse(self, *args, **kwargs):
        """``run(..., return_lse=True)`` (upstream alias)."""
        return self.run(*args, return_lse=True, **kwargs)

    def forward_return_lse(self, *args, **kwargs):
        """Deprecated upstream form of ``run(..., return_lse=True)``."""
        return self.forward(*args, return_lse=True, **kwargs)
