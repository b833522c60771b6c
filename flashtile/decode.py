"""Decode attention (``flashinfer.decode``): one query token per request against its KV cache.

:func:`single_decode_with_kv_cache` serves one request with contiguous K/V;
:class:`BatchDecodeWithPagedKVCacheWrapper` serves a batch over a paged cache with plan/run, and
:class:`CUDAGraphBatchDecodeWithPagedKVCacheWrapper` is its CUDA-graph form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from ._core import ops
from ._core.attention_args import normalize_single_attention, resolve_attention_params
from ._core.checks import describe
from ._core.decode_tune import split_targets
from ._core.device import device_facts
from ._core.paged_kv import HostPageTable, as_index_tensor, kv_page_views, read_page_table, unpack_paged_kv_cache
from ._core.single import replay_single_attention, run_single_attention
from ._core.variant_args import with_sinks
from ._core.wrapper import PlanBase, PlanRunWrapper, check_heads, check_positive_int, variant_replay_args
from .scheduler.split_kv import batch_item_capacity, plan_batch_kv_splits
from .scheduler.worklist import decode_layout, pack_decode_worklist
from .trtllm import trtllm_batch_decode_with_kv_cache, trtllm_batch_decode_with_kv_cache_mla

__all__ = [
    "trtllm_batch_decode_with_kv_cache",
    "trtllm_batch_decode_with_kv_cache_mla",
    "single_decode_with_kv_cache",
    "BatchDecodeWithPagedKVCacheWrapper",
    "CUDAGraphBatchDecodeWithPagedKVCacheWrapper",
    "fast_decode_plan",
    "single_decode_with_kv_cache_with_jit_module",
]


def single_decode_with_kv_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layout: str = "NHD",
    pos_encoding_mode: str = "NONE",
    use_tensor_cores: bool = False,
    q_scale: Optional[float] = None,
    k_scale: Optional[float] = None,
    v_scale: Optional[float] = None,
    window_left: int = -1,
    logits_soft_cap: Optional[float] = None,
    sm_scale: Optional[float] = None,
    rope_scale: Optional[float] = None,
    rope_theta: Optional[float] = None,
    return_lse: bool = False,
    sinks: Optional[torch.Tensor] = None,
    _variant=None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Attention of one query token (the newest position) over a whole KV sequence.

    Args:
        q: ``[num_qo_heads, head_dim]``, float16 or bfloat16; any strides with a unit last stride.
        k: ``[kv_len, num_kv_heads, head_dim]`` (NHD) or ``[num_kv_heads, kv_len, head_dim]`` (HND);
            float16/bfloat16 like q, or float8 (e4m3fn, e5m2) storing ``real / k_scale``.
        v: same layout and dtype as k (its head_dim may differ from q's).
        kv_layout: "NHD" or "HND".
        pos_encoding_mode: "NONE", "ROPE_LLAMA" (rotate q and k in the kernel; k is the un-rotated
            cache; q at position ``kv_len - 1``) or "ALIBI".
        use_tensor_cores: accepted for compatibility; flashtile's decode kernel always uses tensor
            cores (query heads of a GQA group form the rows of one matrix product).
        q_scale, k_scale: calibration scales (floats) multiplied into ``sm_scale``.
        v_scale: calibration scale multiplied into the output.
        window_left: the query sees the last ``window_left + 1`` keys; -1 disables.
        logits_soft_cap: ``cap * tanh(logits / cap)`` when > 0; None or 0 disables.
        sm_scale: default ``1 / sqrt(head_dim)``.
        rope_scale, rope_theta: RoPE parameters (defaults 1.0 and 1e4).
        sinks: float ``[num_qo_heads]`` attention-sink logits (natural units; gpt-oss), each joining its
            head's softmax denominator (flashtile/variants.py); the lse then includes them. None: no sinks.
        return_lse: also return the base-2 log-sum-exp of the scaled logits.

    Returns:
        ``out [num_qo_heads, head_dim_vo]`` in q's dtype, and with ``return_lse`` also
        ``lse [num_qo_heads]`` float32 (``-inf`` and a zero output when kv_len is 0).

    GQA: query head ``h`` reads KV head ``h // (num_qo_heads // num_kv_heads)``.
    """
    options = (pos_encoding_mode, q_scale, k_scale, v_scale, window_left, logits_soft_cap, sm_scale,
               rope_scale, rope_theta)
    if _variant is None and sinks is None:  # a call like an earlier one replays its launches
        done = replay_single_attention("decode", q, k, v, kv_layout, options, return_lse)
        if done is not None:
            return done if return_lse else done[0]

    def normalize():
        if not isinstance(q, torch.Tensor) or q.dim() != 2:
            from ._core.checks import check_tensor

            check_tensor("q", q, ndim=2)
        return normalize_single_attention(
            q.unsqueeze(0), k, v, kv_layout=kv_layout, pos_encoding_mode=pos_encoding_mode, causal=False,
            custom_mask=None, packed_custom_mask=None, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale,
            window_left=window_left, logits_soft_cap=logits_soft_cap, sm_scale=sm_scale, rope_scale=rope_scale,
            rope_theta=rope_theta, out_dtype=None, backend="auto",
        )

    variant = with_sinks(_variant, sinks)
    out, lse = run_single_attention("decode", q, k, v, kv_layout, options, normalize, return_lse, variant)
    return (out, lse) if return_lse else out



def single_decode_with_kv_cache_with_jit_module(jit_module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args,
                                                kv_layout: str = "NHD", window_left: int = -1,
                                                return_lse: bool = False):
    """:func:`single_decode_with_kv_cache` with a variant module (flashtile.jit.attention
    ``gen_customize_single_decode_module(...).build_and_load()``); ``*args``: the variant's extra arguments,
    tensors first then scalars, in declaration order. Returns ``out`` or ``(out, lse)``."""
    variant = getattr(jit_module, "variant", None)
    if variant is None:
        raise TypeError(f"jit_module: expected a module from flashtile.jit.attention, got {type(jit_module).__name__}")
    return single_decode_with_kv_cache(q, k, v, kv_layout=kv_layout, window_left=window_left, return_lse=return_lse,
                                       _variant=(variant, args))

@dataclass
class _DecodePlan(PlanBase):
    """What plan() decided; run() reads it and checks its inputs against it."""

    head_dim: int = 0
    page_size: int = 0
    page_indptr: Optional[torch.Tensor] = None  # int32 [B + 1], device
    page_indices: Optional[torch.Tensor] = None  # int32, device
    worklist: Optional[torch.Tensor] = None  # int32, scheduler/worklist.py's decode layout, device
    num_programs: int = 0
    max_states: int = 1
    merge: bool = False
    max_page_id: Optional[int] = None  # known when the page table came from the host
    part_o: Optional[torch.Tensor] = None  # float32 [rows, num_qo_heads, head_dim] view of the float workspace
    part_lse: Optional[torch.Tensor] = None  # float32 [rows, num_qo_heads]


class BatchDecodeWithPagedKVCacheWrapper(PlanRunWrapper):
    """Batch decode over a paged KV cache: ``plan()`` once per step, ``run()`` once per layer.

    Each request has one query token (at position ``kv_len - 1``) and attends its whole cache (no
    causal mask; sliding window, soft cap, ALiBi and RoPE as in :func:`single_decode_with_kv_cache`).
    The scheduler cuts long requests into KV chunks so the grid fills the GPU for any mix of lengths;
    chunks are merged in base 2 (flashtile/scheduler/split_kv.py).

    Args:
        float_workspace_buffer: a device tensor (any dtype) for split-KV partial states; 128 MiB is
            plenty. Its device is the wrapper's device. May be shared with other wrappers.
        kv_layout: "NHD" or "HND", the layout of the paged cache given to run().
        use_cuda_graph: fixed-size mode for CUDA-graph capture: the page table lives in the three
            buffers below, the batch size is fixed (``len(paged_kv_last_page_len_buffer)``), and run()
            launches a grid that does not depend on the lengths, so a captured run() replays correctly
            after any re-plan of the same batch size.
        use_tensor_cores: accepted; flashtile always runs the tensor-core kernel (the query heads of
            one KV head form the rows of a ``tl.dot``), which is also the fastest for MHA here.
        paged_kv_indptr_buffer: int32 ``[B + 1]`` (graph mode), paged_kv_indices_buffer: int32
            ``[max_pages]`` (graph mode; may be larger than needed), paged_kv_last_page_len_buffer:
            int32 ``[B]`` (graph mode).
        backend: "auto", "fa2" or "fa3" (all flashtile's kernels), "triton" or "reference"; vendor
            backends raise NotImplementedError.
        jit_args: an attention variant: upstream's tuple (flashtile.jit.attention) with an
            :class:`flashtile.AttentionVariant` as ``variant_decl``, or the AttentionVariant itself; its extra
            arguments are passed to run() positionally. A C++ ``variant_decl`` raises NotImplementedError.
    """

    _plan: Optional[_DecodePlan]

    def __init__(
        self,
        float_workspace_buffer: torch.Tensor,
        kv_layout: str = "NHD",
        use_cuda_graph: bool = False,
        use_tensor_cores: bool = False,
        paged_kv_indptr_buffer: Optional[torch.Tensor] = None,
        paged_kv_indices_buffer: Optional[torch.Tensor] = None,
        paged_kv_last_page_len_buffer: Optional[torch.Tensor] = None,
        backend: str = "auto",
        jit_args=None,
    ) -> None:
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, backend, jit_args)
        self._use_tensor_cores = bool(use_tensor_cores)
        self._graph_capacity: Optional[int] = None
        if self._use_cuda_graph:
            for name, buf in (("paged_kv_indptr_buffer", paged_kv_indptr_buffer),
                              ("paged_kv_indices_buffer", paged_kv_indices_buffer),
                              ("paged_kv_last_page_len_buffer", paged_kv_last_page_len_buffer)):
                if not isinstance(buf, torch.Tensor):
                    raise ValueError(f"{name} should be a torch.Tensor in cudagraph mode, got {describe(buf)}")
                as_index_tensor(name, buf)
                if buf.dtype != torch.int32 or buf.device != self.device:
                    raise ValueError(f"{name}: expected an int32 tensor on {self.device} in cudagraph mode, "
                                     f"got {describe(buf)}")
            assert paged_kv_indptr_buffer is not None and paged_kv_last_page_len_buffer is not None  # checked above
            self._fixed_batch_size = paged_kv_last_page_len_buffer.numel()
            if paged_kv_indptr_buffer.numel() != self._fixed_batch_size + 1:
                raise ValueError(
                    f"paged_kv_indptr_buffer: expected batch_size + 1 = {self._fixed_batch_size + 1} entries "
                    f"(batch size from paged_kv_last_page_len_buffer), got {paged_kv_indptr_buffer.numel()}"
                )
        self._paged_kv_indptr_buf = paged_kv_indptr_buffer
        self._paged_kv_indices_buf = paged_kv_indices_buffer
        self._paged_kv_last_page_len_buf = paged_kv_last_page_len_buffer

    @property
    def use_tensor_cores(self) -> bool:
        return self._use_tensor_cores

    @property
    def _causal(self) -> bool:
        return False  # one query per request

    def plan(
        self,
        indptr: torch.Tensor,
        indices: torch.Tensor,
        last_page_len: torch.Tensor,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        pos_encoding_mode: str = "NONE",
        window_left: int = -1,
        logits_soft_cap: Optional[float] = None,
        q_data_type: Union[str, torch.dtype] = "float16",
        kv_data_type: Optional[Union[str, torch.dtype]] = None,
        o_data_type: Optional[Union[str, torch.dtype]] = None,
        data_type: Optional[Union[str, torch.dtype]] = None,
        sm_scale: Optional[float] = None,
        rope_scale: Optional[float] = None,
        rope_theta: Optional[float] = None,
        non_blocking: bool = True,
        block_tables: Optional[torch.Tensor] = None,
        seq_lens: Optional[torch.Tensor] = None,
        fixed_split_size: Optional[int] = None,
        disable_split_kv: bool = False,
        q_len_per_req: int = 1,
        *,
        is_causal: Optional[bool] = None,
        **unsupported,
    ) -> None:
        """Plan a decode step: validate the page table, choose the KV split, copy the work list.

        Positional arguments after ``page_size`` follow FlashInfer >= 0.6 (``o_data_type`` between
        ``kv_data_type`` and ``data_type``), the order vLLM passes them in.

        Args:
            indptr: int32 ``[B + 1]`` (CPU or device), request ``i`` owns pages
                ``indices[indptr[i]:indptr[i + 1]]``; ``indptr[0]`` may be > 0.
            indices: int32 physical page ids into the cache given to run().
            last_page_len: int32 ``[B]``, valid tokens of each request's last page (``1..page_size``).
                A request without pages has length 0 whatever its entry says (a zero output, lse -inf).
            num_qo_heads, num_kv_heads: heads of q and of the cache (a multiple relation: GQA).
            head_dim: a multiple of 8 up to 256.
            page_size: tokens per page (any value >= 1).
            pos_encoding_mode: "NONE", "ROPE_LLAMA" (q and k rotated in the kernel) or "ALIBI".
            window_left: the query sees the last ``window_left + 1`` keys; -1 disables.
            logits_soft_cap: ``cap * tanh(s / cap)`` when > 0.
            q_data_type: dtype of q in run() (default float16, as upstream: bf16 callers pass it).
            kv_data_type: dtype of the cache (default: q's); fp8 e4m3fn/e5m2 allowed.
            o_data_type: output dtype (default q's).
            data_type: deprecated; fills ``kv_data_type`` when that is None.
            sm_scale: default ``1 / sqrt(head_dim)``. rope_scale, rope_theta: defaults 1 and 1e4.
            non_blocking: copy host index arrays to the device asynchronously.
            block_tables, seq_lens: used by upstream's trtllm-gen backend only; ignored.
            fixed_split_size: deterministic split size in pages (a request's result bits do not depend
                on the rest of the batch); None or -1: off.
            disable_split_kv: one program per request and KV head (also batch-invariant).
            q_len_per_req: 1 (multi-token decode is the prefill wrappers' job).
            is_causal: None or False (decode has one query per request).

        With ``FLASHTILE_DEBUG=1`` a device page table is copied to the host and validated; otherwise
        only ``indptr`` and ``last_page_len`` are read on the host.
        """
        if unsupported:
            raise TypeError(f"plan(): unexpected keyword arguments {sorted(unsupported)}")
        check_positive_int("page_size", page_size)
        table = read_page_table(indptr, indices, last_page_len, page_size)
        self._plan_from_table(
            table, indices, last_page_len, engine_wrote_buffers=False, num_qo_heads=num_qo_heads,
            num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size, pos_encoding_mode=pos_encoding_mode,
            window_left=window_left, logits_soft_cap=logits_soft_cap, q_data_type=q_data_type,
            kv_data_type=kv_data_type, o_data_type=o_data_type, data_type=data_type, sm_scale=sm_scale,
            rope_scale=rope_scale, rope_theta=rope_theta, non_blocking=non_blocking, fixed_split_size=fixed_split_size,
            disable_split_kv=disable_split_kv, q_len_per_req=q_len_per_req, is_causal=is_causal,
            plan_args=dict(
                indptr=indptr, indices=indices, last_page_len=last_page_len, num_qo_heads=num_qo_heads,
                num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size, pos_encoding_mode=pos_encoding_mode,
                window_left=window_left, logits_soft_cap=logits_soft_cap, q_data_type=q_data_type,
                kv_data_type=kv_data_type, o_data_type=o_data_type, data_type=data_type, sm_scale=sm_scale,
                rope_scale=rope_scale, rope_theta=rope_theta, non_blocking=non_blocking,
                fixed_split_size=fixed_split_size, disable_split_kv=disable_split_kv),
        )

    def _plan_from_table(
        self, table: HostPageTable, indices, last_page_len, *, engine_wrote_buffers: bool, num_qo_heads,
        num_kv_heads, head_dim, page_size, pos_encoding_mode, window_left, logits_soft_cap, q_data_type, kv_data_type,
        o_data_type, data_type, sm_scale, rope_scale, rope_theta, non_blocking, fixed_split_size, disable_split_kv,
        q_len_per_req, is_causal, plan_args,
    ) -> None:
        """plan() once the page table is read. ``engine_wrote_buffers``: graph mode's buffers already hold
        the table (fast_decode_plan); only the work list is recomputed and uploaded."""
        if q_len_per_req != 1:
            raise NotImplementedError("q_len_per_req > 1: use BatchPrefillWithPagedKVCacheWrapper for "
                                      "multi-token (speculative) decode")
        if is_causal:
            raise NotImplementedError("is_causal=True: decode has one query per request; use the prefill wrappers "
                                      "for a causal multi-token step")
        check_heads(num_qo_heads, num_kv_heads)
        head_dim = self._check_head_dim(head_dim)
        params = resolve_attention_params(
            None, head_dim=head_dim, pos_encoding_mode=pos_encoding_mode, window_left=window_left,
            logits_soft_cap=logits_soft_cap, sm_scale=sm_scale, rope_scale=rope_scale, rope_theta=rope_theta)
        if kv_data_type is None:
            kv_data_type = data_type
        q_dtype, kv_dtype, o_dtype = self._plan_dtypes(q_data_type, kv_data_type, o_data_type)
        fixed_split_size, disable_split_kv = self._split_options(fixed_split_size, disable_split_kv)
        batch, kv_lens = table.batch_size, table.kv_lens
        self._check_graph_batch(batch)
        first, last = table.first, table.last

        align, sms = self._planning_facts()
        per_sm = split_targets(device_facts(self.device))[1]  # the card's target (_core/decode_tune.py)
        programs_per_item = num_kv_heads
        fixed_chunk = fixed_split_size * page_size if fixed_split_size is not None else None
        splits = plan_batch_kv_splits(kv_lens, programs_per_item, sms, align, fixed_chunk=fixed_chunk,
                                      disable_split=disable_split_kv, programs_per_sm=per_sm)
        item_indptr = splits.request_item_indptr  # int64 numpy [B + 1]
        num_items = int(item_indptr[-1])
        if self._use_cuda_graph:
            capacity = batch_item_capacity(batch, programs_per_item, sms, per_sm)
            if self._graph_capacity is None:
                self._graph_capacity = capacity
            capacity = self._graph_capacity
            if num_items > capacity:
                raise ValueError(
                    f"fixed_split_size={fixed_split_size} cuts this batch into {num_items} pieces, more than the "
                    f"{capacity} that CUDA-graph mode sized its grid for; use a larger fixed_split_size"
                )
            num_programs, merge, max_states = capacity, True, 64
        else:
            num_programs = num_items
            max_states = int(np.diff(item_indptr).max()) if batch else 1
            merge = max_states > 1

        # One host->device copy of the work list into the int workspace the wrapper owns.
        host = pack_decode_worklist(decode_layout(batch, num_programs), splits.request_item_indptr, kv_lens,
                                    splits.item_request, splits.item_kv_start, splits.item_kv_end,
                                    pin=self.device.type == "cuda")
        worklist = self._upload_worklist(host, non_blocking)

        if self._use_cuda_graph:
            assert self._paged_kv_indptr_buf is not None and self._paged_kv_indices_buf is not None and \
                self._paged_kv_last_page_len_buf is not None  # the constructor checked them in CUDA-graph mode
            if last - first > self._paged_kv_indices_buf.numel():
                raise ValueError(
                    f"The size of indices should be less than or equal to the allocated buffer: need {last - first} "
                    f"page ids, paged_kv_indices_buffer has {self._paged_kv_indices_buf.numel()}"
                )
            if not engine_wrote_buffers:
                self._paged_kv_indptr_buf.copy_(torch.from_numpy(table.indptr - first), non_blocking=non_blocking)
                self._paged_kv_indices_buf[: last - first].copy_(indices[first:last], non_blocking=non_blocking)
                self._paged_kv_last_page_len_buf.copy_(last_page_len, non_blocking=non_blocking)
            page_indptr, page_indices = self._paged_kv_indptr_buf, self._paged_kv_indices_buf
        else:
            page_indptr = torch.from_numpy(table.indptr).to(self.device, torch.int32, non_blocking=non_blocking)
            page_indices = indices.to(self.device, torch.int32, non_blocking=non_blocking)

        # Split-KV partial states live in the float workspace (float32 [rows, heads, head_dim] + lse).
        part_rows = num_programs if merge else 0
        part_o, part_lse = self._workspace_tensors(self._float_workspace_buffer, "float_workspace_buffer",
                                                   torch.float32, (part_rows, num_qo_heads, head_dim),
                                                   (part_rows, num_qo_heads))

        self._plan = _DecodePlan(
            q_dtype=q_dtype, kv_dtype=kv_dtype, o_dtype=o_dtype, params=params,
            plan_args={**plan_args, "_head_dim": head_dim},
            owned_storage=self._owned_storage(page_indptr, page_indices, worklist, part_o),
            batch_size=batch, num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            page_size=page_size, page_indptr=page_indptr, page_indices=page_indices, worklist=worklist,
            num_programs=num_programs, max_states=max_states, merge=merge, max_page_id=table.max_page_id,
            part_o=part_o, part_lse=part_lse,
        )

    begin_forward = plan

    def run(
        self,
        q: torch.Tensor,
        paged_kv_cache,
        *args,
        q_scale: Optional[float] = None,
        k_scale: Optional[float] = None,
        v_scale: Optional[float] = None,
        out: Optional[torch.Tensor] = None,
        lse: Optional[torch.Tensor] = None,
        return_lse: bool = False,
        enable_pdl: Optional[bool] = None,
        window_left: Optional[int] = None,
        sinks: Optional[torch.Tensor] = None,
        q_len_per_req: int = 1,
        kv_cache_sf=None,
    ):
        """Decode attention of the planned batch.

        Args:
            q: ``[B, num_qo_heads, head_dim]`` in the planned q dtype; any strides with a unit last stride.
            paged_kv_cache: ``[pages, 2, page_size, heads, dim]`` (NHD; HND swaps page_size and heads),
                or a ``(k_cache, v_cache)`` tuple of ``[pages, page_size, heads, dim]`` tensors (views
                with their own strides are fine), in the planned kv dtype.
            q_scale, k_scale: calibration scales multiplied into sm_scale; v_scale multiplies the output.
            out: optional ``[B, num_qo_heads, head_dim]`` output (o_data_type), written and returned.
            lse: optional float32 ``[B, num_qo_heads]``. return_lse: also return the base-2 lse.
            enable_pdl: accepted and ignored (a CUDA launch attribute). window_left: must equal the plan's.
            sinks: float ``[num_qo_heads]`` attention-sink logits (natural units), or None.
            ``*args``: the extra arguments of the wrapper's ``jit_args`` variant, tensors first then scalars
            (flashtile/variants.py). q_len_per_req > 1: not supported (NotImplementedError).
            kv_cache_sf: scale factors of an NVFP4 cache; only None (NotImplementedError otherwise).

        Returns:
            ``out`` or ``(out, lse)``; a request with no KV gives zeros and lse -inf.

        A run() whose inputs have the shapes, strides, dtypes and alignment of an earlier run() of the same
        plan replays that run's launches (its checks passed for exactly those properties).
        """
        plan = self._plan
        key = variant = None
        if plan is not None and kv_cache_sf is None and q_len_per_req == 1:
            key, variant = self._run_memo_key(plan, (q, paged_kv_cache, out, lse),
                                              (q_scale, k_scale, v_scale, window_left), args, sinks, window_left)
            if key is not None:
                replay = plan.replays.get(key)
                if replay is not None:
                    return replay((q, paged_kv_cache), out, lse, return_lse, variant)
        plan = self._require_plan()
        if variant is None:
            variant = self._check_run_options(plan, args, sinks, window_left, kv_cache_sf)
        if q_len_per_req != 1:
            raise NotImplementedError("q_len_per_req > 1: use BatchPrefillWithPagedKVCacheWrapper")
        cache = unpack_paged_kv_cache(paged_kv_cache, self._kv_layout)
        self._check_run_inputs(plan, q, cache)
        params = self._run_params(plan, q_scale, k_scale, v_scale)
        shape = (plan.batch_size, plan.num_qo_heads, cache.v.shape[3])
        o, s = self._outputs(shape, plan.o_dtype, out, lse)

        def launch() -> None:
            ops.call(ops.batch_decode, q, cache.k, cache.v, plan.page_indptr, plan.page_indices, plan.worklist,
                     plan.part_o, plan.part_lse, o, s, plan.batch_size, plan.num_programs, plan.max_states, plan.merge,
                     params=params, backend=self._backend, variant=variant)

        replay = self._launch_recorded(plan, key, (q, cache.k, cache.v, o, s, *variant_replay_args(variant)), launch)
        if replay is not None:
            layout = self._kv_layout
            plan.replays[key] = self._replay_runner(
                replay, lambda inputs: (inputs[0], *kv_page_views(inputs[1], layout)), shape, plan.o_dtype,
                self.device)
        return (o, s) if return_lse else o

    def run_return_lse(self, q: torch.Tensor, paged_kv_cache, *args, **kwargs):
        """``run(..., return_lse=True)`` (upstream alias)."""
        return self.run(q, paged_kv_cache, *args, return_lse=True, **kwargs)

    def _check_run_inputs(self, plan: _DecodePlan, q: torch.Tensor, cache) -> None:
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q: expected a torch.Tensor, got {describe(q)}")
        if q.dtype != plan.q_dtype:
            raise ValueError(f"The dtype of q {q.dtype} does not match the q_data_type {plan.q_dtype} specified "
                             "in plan function.")
        if cache.dtype != plan.kv_dtype:
            raise ValueError(f"The dtype of paged_kv_cache {cache.dtype} does not match the kv_data_type "
                             f"{plan.kv_dtype} specified in plan function.")
        want = (plan.batch_size, plan.num_qo_heads, plan.head_dim)
        if tuple(q.shape) != want:
            raise ValueError(f"q: expected shape [batch_size, num_qo_heads, head_dim] = {list(want)} as planned, "
                             f"got {list(q.shape)}")
        if q.shape[-1] > 1 and q.stride(-1) != 1:
            raise ValueError(f"q: the last dimension must have stride 1, got strides {tuple(q.stride())}")
        if cache.num_kv_heads != plan.num_kv_heads or cache.k.shape[3] != plan.head_dim:
            raise ValueError(f"paged_kv_cache: expected {plan.num_kv_heads} KV heads of head_dim {plan.head_dim} as "
                             f"planned, got {cache.num_kv_heads} heads of {cache.k.shape[3]} ({self._kv_layout})")
        if cache.v.shape[3] != plan.head_dim:
            raise ValueError(f"paged_kv_cache: V head_dim {cache.v.shape[3]} differs from the planned {plan.head_dim}")
        if cache.page_size != plan.page_size:
            raise ValueError(f"paged_kv_cache: page_size {cache.page_size} (from the cache shape) differs from the "
                             f"planned page_size {plan.page_size}")
        if q.device != self.device or cache.device != self.device:
            raise ValueError(f"q and paged_kv_cache must be on the wrapper's device {self.device} (the workspace's), "
                             f"got {q.device} and {cache.device}")
        if plan.max_page_id is not None and plan.max_page_id >= cache.num_pages:
            raise ValueError(f"indices: the plan uses page {plan.max_page_id}, the cache has {cache.num_pages} pages")

    def forward(self, q: torch.Tensor, paged_kv_cache, pos_encoding_mode: str = "NONE",
                q_scale: Optional[float] = None, k_scale: Optional[float] = None, v_scale: Optional[float] = None,
                window_left: int = -1, logits_soft_cap: Optional[float] = None,
                sm_scale: Optional[float] = None, rope_scale: Optional[float] = None,
                rope_theta: Optional[float] = None, return_lse: bool = False):
        """Deprecated upstream form of :meth:`run`: its attention parameters replace the planned ones
        (the wrapper re-plans when one differs)."""
        self._forward(pos_encoding_mode=pos_encoding_mode, window_left=window_left, logits_soft_cap=logits_soft_cap,
                      sm_scale=sm_scale, rope_scale=rope_scale, rope_theta=rope_theta)
        return self.run(q, paged_kv_cache, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale, return_lse=return_lse)

    def forward_return_lse(self, q: torch.Tensor, paged_kv_cache, **kwargs):
        """Deprecated upstream form of ``run(..., return_lse=True)``."""
        return self.forward(q, paged_kv_cache, return_lse=True, **kwargs)


def fast_decode_plan(
    self: BatchDecodeWithPagedKVCacheWrapper,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    last_page_len: torch.Tensor,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    pos_encoding_mode: str = "NONE",
    window_left: int = -1,
    logits_soft_cap: Optional[float] = None,
    q_data_type: Optional[Union[str, torch.dtype]] = None,
    kv_data_type: Optional[Union[str, torch.dtype]] = None,
    data_type: Optional[Union[str, torch.dtype]] = None,
    sm_scale: Optional[float] = None,
    rope_scale: Optional[float] = None,
    rope_theta: Optional[float] = None,
    non_blocking: bool = True,
    fixed_split_size: Optional[int] = None,
    disable_split_kv: bool = False,
    q_len_per_req: int = 1,
    global_override_indptr_cpu: Optional[torch.Tensor] = None,
) -> None:
    """Re-plan a decode wrapper for a step whose page table the engine already wrote (serving engines'
    per-step plan under CUDA graphs; SGLang installs it as ``w.begin_forward = partial(fast_decode_plan, w)``).

    In CUDA-graph mode it copies nothing into the wrapper's page-table buffers (the caller wrote
    ``indptr``/``indices``/``last_page_len`` into them in place): it only recomputes the split-KV
    schedule from the host lengths and uploads it. Without CUDA graphs it is :meth:`plan`.

    Args:
        self: a :class:`BatchDecodeWithPagedKVCacheWrapper`.
        indptr: int32 ``[B + 1]``; read on the host unless ``global_override_indptr_cpu`` is given.
        indices: int32 page ids. Graph mode reads the wrapper's indices buffer instead (the engine wrote
            the table there; its values are checked when on the host or with ``FLASHTILE_DEBUG=1``).
        last_page_len: int32 ``[B]``; read on the host (not for page size 1, where every request with
            pages has a full last page).
        global_override_indptr_cpu: a host copy of ``indptr``, used instead of it (no device sync).
        q_data_type: default ``data_type``, else float16. Other arguments: as :meth:`plan` (no
            ``o_data_type``: the output dtype is q's).
    """
    host_indptr = indptr if global_override_indptr_cpu is None else global_override_indptr_cpu
    if q_data_type is None:
        q_data_type = data_type if data_type is not None else "float16"
    check_positive_int("page_size", page_size)
    if self.is_cuda_graph_enabled:
        # The kernel reads the indices buffer the engine wrote, so that is what gets checked.
        known_full_last_page = page_size == 1 and last_page_len.device.type != "cpu"
        table = read_page_table(host_indptr, self._paged_kv_indices_buf, last_page_len, page_size,
                                last_page_len_is_one=known_full_last_page)
    else:
        table = read_page_table(host_indptr, indices, last_page_len, page_size)
    self._plan_from_table(
        table, indices, last_page_len, engine_wrote_buffers=self.is_cuda_graph_enabled, num_qo_heads=num_qo_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size, pos_encoding_mode=pos_encoding_mode,
        window_left=window_left, logits_soft_cap=logits_soft_cap, q_data_type=q_data_type, kv_data_type=kv_data_type,
        o_data_type=None, data_type=data_type, sm_scale=sm_scale, rope_scale=rope_scale, rope_theta=rope_theta,
        non_blocking=non_blocking, fixed_split_size=fixed_split_size, disable_split_kv=disable_split_kv,
        q_len_per_req=q_len_per_req, is_causal=None,
        plan_args=dict(
            indptr=host_indptr, indices=indices, last_page_len=last_page_len, num_qo_heads=num_qo_heads,
            num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size, pos_encoding_mode=pos_encoding_mode,
            window_left=window_left, logits_soft_cap=logits_soft_cap, q_data_type=q_data_type,
            kv_data_type=kv_data_type, data_type=data_type, sm_scale=sm_scale, rope_scale=rope_scale,
            rope_theta=rope_theta, non_blocking=non_blocking, fixed_split_size=fixed_split_size,
            disable_split_kv=disable_split_kv),
    )


class CUDAGraphBatchDecodeWithPagedKVCacheWrapper(BatchDecodeWithPagedKVCacheWrapper):
    """:class:`BatchDecodeWithPagedKVCacheWrapper` in CUDA-graph mode (fixed batch size =
    ``len(last_page_len_buffer)``).

    Args:
        workspace_buffer: the float workspace (device tensor, any dtype).
        indptr_buffer: int32 ``[B + 1]``; indices_buffer: int32 ``[max_pages]``; last_page_len_buffer:
            int32 ``[B]``: plan() copies the page table into them, a captured run() reads them.
        kv_layout: "NHD" or "HND". use_tensor_cores: accepted (always tensor cores).
    """

    def __init__(self, workspace_buffer: torch.Tensor, indptr_buffer: torch.Tensor, indices_buffer: torch.Tensor,
                 last_page_len_buffer: torch.Tensor, kv_layout: str = "NHD", use_tensor_cores: bool = False) -> None:
        super().__init__(workspace_buffer, kv_layout, use_cuda_graph=True, use_tensor_cores=use_tensor_cores,
                         paged_kv_indptr_buffer=indptr_buffer, paged_kv_indices_buffer=indices_buffer,
                         paged_kv_last_page_len_buffer=last_page_len_buffer)
