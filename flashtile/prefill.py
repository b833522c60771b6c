"""Prefill and append attention (``flashinfer.prefill``).

:func:`single_prefill_with_kv_cache` serves one request with contiguous K/V;
:class:`BatchPrefillWithPagedKVCacheWrapper` and :class:`BatchPrefillWithRaggedKVCacheWrapper` serve a
batch (prefill, chunked prefill, speculative-decoding verification) with plan/run.
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import torch

from ._core.attention_args import _unit_last_stride, normalize_single_attention
from ._core.checks import FP8_DTYPES, check_tensor
from ._core.host_arrays import host_int64
from ._core.multi_item import MultiItemArgs
from ._core.paged_kv import as_index_tensor, kv_page_views, read_page_table, unpack_paged_kv_cache
from ._core.prefill_wrapper import BatchPrefillWrapper
from ._core.single import replay_single_attention, run_single_attention
from ._core.variant_args import with_sinks
from ._core.wrapper import as_given, check_positive_int
from .trtllm import trtllm_batch_context_with_kv_cache

__all__ = [
    "trtllm_batch_context_with_kv_cache",
    "single_prefill_with_kv_cache",
    "single_prefill_with_kv_cache_return_lse",
    "single_prefill_with_kv_cache_with_jit_module",
    "BatchPrefillWithPagedKVCacheWrapper",
    "BatchPrefillWithRaggedKVCacheWrapper",
]


def single_prefill_with_kv_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale_q: Optional[torch.Tensor] = None,
    scale_k: Optional[torch.Tensor] = None,
    scale_v: Optional[torch.Tensor] = None,
    o_dtype: Optional[torch.dtype] = None,
    custom_mask: Optional[torch.Tensor] = None,
    packed_custom_mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    kv_layout: str = "NHD",
    pos_encoding_mode: str = "NONE",
    use_fp16_qk_reduction: bool = False,
    sm_scale: Optional[float] = None,
    window_left: int = -1,
    logits_soft_cap: Optional[float] = None,
    rope_scale: Optional[float] = None,
    rope_theta: Optional[float] = None,
    backend: str = "auto",
    return_lse: bool = False,
    sinks: Optional[torch.Tensor] = None,
    _variant=None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Attention of ``qo_len`` query tokens (the last ones of the sequence) over ``kv_len`` keys.

    Args:
        q: ``[qo_len, num_qo_heads, head_dim_qk]``, float16/bfloat16, or float8 (e4m3fn/e5m2: FP8
            attention, below); unit last stride.
        k: ``[kv_len, num_kv_heads, head_dim_qk]`` (NHD) or ``[num_kv_heads, kv_len, head_dim_qk]``
            (HND); dtype of q, or float8 with fp16/bf16 q (K/V quantized, q not).
        v: like k with ``head_dim_vo`` (may differ from head_dim_qk, e.g. 192/128).
        scale_q, scale_k, scale_v: FP8 attention (q, k and v all of one float8 dtype): float32 dequantization
            scales, per head (``[num_qo_heads]`` for q, ``[num_kv_heads]`` for k and v) or per tensor (``[1]``
            or 0-d), on q's device; None means 1.0. The attention is that of ``q * scale_q``,
            ``k * scale_k``, ``v * scale_v`` (docs/fp8_attention.md: both products run on fp8 tensor cores,
            the softmax weights rounded to q's fp8 dtype for the second). Ignored for fp16/bf16 q (as upstream).
        o_dtype: output dtype (float16, bfloat16 or float32); default q's dtype. Required with fp8 q
            (an fp8 output raises NotImplementedError).
        custom_mask: bool ``[qo_len, kv_len]``, True = attend; replaces ``causal``.
        packed_custom_mask: the same mask bit-packed row-major, LSB first
            (``packbits(mask.flatten(), "little")``), uint8; takes precedence over custom_mask.
        causal: bottom-right aligned: query ``i`` sits at position ``kv_len - qo_len + i`` and sees keys
            ``<= `` that position; with ``qo_len > kv_len`` the first rows see nothing (output 0,
            lse -inf).
        kv_layout: "NHD" or "HND".
        pos_encoding_mode: "NONE", "ROPE_LLAMA" (in-kernel RoPE of q and k) or "ALIBI".
        use_fp16_qk_reduction: accepted; flashtile always accumulates q.k in float32.
        sm_scale: default ``1 / sqrt(head_dim_qk)``.
        window_left: a query at position p sees keys ``>= p - window_left``; -1 disables.
        logits_soft_cap: ``cap * tanh(logits / cap)`` when > 0.
        rope_scale, rope_theta: RoPE parameters (defaults 1.0 and 1e4).
        backend: "auto", "fa2", "fa3" (all flashtile's kernel), "triton" (force the kernels, under
            the interpreter on CPU), "reference" (pure PyTorch); vendor names raise
            NotImplementedError.
        sinks: float ``[num_qo_heads]`` attention-sink logits (natural units; gpt-oss), each joining its
            head's softmax denominator (flashtile/variants.py); the lse then includes them. None: no sinks.
        return_lse: also return the base-2 log-sum-exp.

    Returns:
        ``out [qo_len, num_qo_heads, head_dim_vo]`` and with ``return_lse`` also
        ``lse [qo_len, num_qo_heads]`` float32.
    """
    options = (o_dtype, custom_mask, packed_custom_mask, causal, pos_encoding_mode, sm_scale, window_left,
               logits_soft_cap, rope_scale, rope_theta, backend, scale_q, scale_k, scale_v)
    # a call like an earlier one replays its launches (not FP8 attention: its scale views are made per call)
    if _variant is None and sinks is None and isinstance(q, torch.Tensor) and q.element_size() != 1:
        done = replay_single_attention("prefill", q, k, v, kv_layout, options, return_lse)
        if done is not None:
            return done if return_lse else done[0]

    def normalize():
        return normalize_single_attention(
            q, k, v, kv_layout=kv_layout, pos_encoding_mode=pos_encoding_mode, causal=causal,
            custom_mask=custom_mask, packed_custom_mask=packed_custom_mask, q_scale=None, k_scale=None,
            v_scale=None, window_left=window_left, logits_soft_cap=logits_soft_cap, sm_scale=sm_scale,
            rope_scale=rope_scale, rope_theta=rope_theta, out_dtype=o_dtype, backend=backend,
            scales=(scale_q, scale_k, scale_v), has_variant=_variant is not None or sinks is not None,
        )

    variant = with_sinks(_variant, sinks)
    out, lse = run_single_attention("prefill", q, k, v, kv_layout, options, normalize, return_lse, variant)
    return (out, lse) if return_lse else out



def single_prefill_with_kv_cache_with_jit_module(jit_module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args,
                                                 kv_layout: str = "NHD", mask_mode: int = 0, window_left: int = -1,
                                                 return_lse: bool = False):
    """:func:`single_prefill_with_kv_cache` with a variant module (flashtile.jit.attention
    ``gen_customize_single_prefill_module(...).build_and_load()``); ``*args``: the variant's extra arguments,
    tensors first then scalars. ``mask_mode``: upstream's MaskMode value, 0 (non-causal) or 1 (causal); a
    custom mask is a variant's ``logits_mask``. Returns ``out`` or ``(out, lse)``."""
    variant = getattr(jit_module, "variant", None)
    if variant is None:
        raise TypeError(f"jit_module: expected a module from flashtile.jit.attention, got {type(jit_module).__name__}")
    if mask_mode not in (0, 1):
        raise NotImplementedError(f"mask_mode: {mask_mode!r}: only 0 (NON_CAUSAL) and 1 (CAUSAL) are supported with a "
                                  "variant module; express a custom mask as the variant's logits_mask")
    return single_prefill_with_kv_cache(q, k, v, causal=mask_mode == 1, kv_layout=kv_layout, window_left=window_left,
                                        return_lse=return_lse, _variant=(variant, args))

single_prefill_with_kv_cache_return_lse = functools.partial(single_prefill_with_kv_cache, return_lse=True)
single_prefill_with_kv_cache_return_lse.__doc__ = "``single_prefill_with_kv_cache`` with ``return_lse=True``."


# ------------------------------------------------------------------------------------------------
# Batch prefill / append: plan() once per step, run() once per layer (shared steps: _core/prefill_wrapper.py)
# ------------------------------------------------------------------------------------------------


class BatchPrefillWithPagedKVCacheWrapper(BatchPrefillWrapper):
    """Batch prefill / append attention over a paged KV cache.

    Request ``i`` has ``qo_indptr[i+1] - qo_indptr[i]`` query tokens (rows of q) and a KV cache of
    ``kv_len_i`` tokens in pages (``paged_kv_indptr``, ``paged_kv_indices``, ``paged_kv_last_page_len``:
    the layout of :class:`flashtile.BatchDecodeWithPagedKVCacheWrapper`). Its queries are the last
    ``qo_len_i`` tokens of the sequence: with ``causal`` query ``t`` sees keys ``<= kv_len_i - qo_len_i + t``
    (bottom-right alignment: ``qo_len < kv_len`` is an append or chunked prefill; with ``qo_len > kv_len`` the
    first rows see nothing and give 0 and lse -inf).

    plan() splits the batch into tiles of (request, query rows, KV range), longest request first and the tiles
    that share K/V side by side, and cuts long KV ranges when there are too few tiles to fill the GPU
    (scheduler/prefill_work.py); run() launches one kernel and, when a tile was cut, one merge.

    Args:
        float_workspace_buffer: a device tensor (any dtype) for partial states of split tiles; 128 MiB is
            plenty (a smaller one makes plan() split less). Its device is the wrapper's device.
        kv_layout: "NHD" or "HND", the layout of the paged cache given to run().
        use_cuda_graph: fixed-size mode for CUDA-graph capture: the batch size is ``len(qo_indptr_buf) - 1``,
            the first plan's ``qo_indptr[-1]`` is the most query rows any later plan may have, plan() copies
            the page table into the buffers below and run() launches grids that do not depend on the lengths.
        qo_indptr_buf: int32 ``[B + 1]``; paged_kv_indptr_buf: int32 ``[B + 1]``; paged_kv_indices_buf: int32
            ``[max_pages]``; paged_kv_last_page_len_buf: int32 ``[B]`` (graph mode).
        custom_mask_buf: uint8 ``[max_mask_bytes]``; mask_indptr_buf: int32 ``[B + 1]`` (graph mode with a
            custom mask).
        backend: "auto", "fa2", "fa3" (flashtile's kernels), "triton" or "reference"; vendor backends raise
            NotImplementedError. jit_args: an attention variant (upstream's tuple with an AttentionVariant as
            ``variant_decl``, or the AttentionVariant; a C++ string raises NotImplementedError); jit_kwargs:
            upstream's flags for it, accepted (flashtile takes them from plan()).
    """

    _paged = True

    def __init__(
        self,
        float_workspace_buffer: torch.Tensor,
        kv_layout: str = "NHD",
        use_cuda_graph: bool = False,
        qo_indptr_buf: Optional[torch.Tensor] = None,
        paged_kv_indptr_buf: Optional[torch.Tensor] = None,
        paged_kv_indices_buf: Optional[torch.Tensor] = None,
        paged_kv_last_page_len_buf: Optional[torch.Tensor] = None,
        custom_mask_buf: Optional[torch.Tensor] = None,
        mask_indptr_buf: Optional[torch.Tensor] = None,
        backend: str = "auto",
        jit_args=None,
        jit_kwargs=None,
    ) -> None:
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, qo_indptr_buf, custom_mask_buf,
                         mask_indptr_buf, backend, jit_args, jit_kwargs)
        if self._use_cuda_graph:
            for name, buf in (("paged_kv_indptr_buf", paged_kv_indptr_buf),
                              ("paged_kv_indices_buf", paged_kv_indices_buf),
                              ("paged_kv_last_page_len_buf", paged_kv_last_page_len_buf)):
                self._check_graph_buffer(name, buf)
            assert paged_kv_indptr_buf is not None and paged_kv_last_page_len_buf is not None  # checked above
            if paged_kv_indptr_buf.numel() != self._fixed_batch_size + 1 or \
                    paged_kv_last_page_len_buf.numel() != self._fixed_batch_size:
                raise ValueError("paged_kv_indptr_buf / paged_kv_last_page_len_buf: expected "
                                 f"{self._fixed_batch_size + 1} / {self._fixed_batch_size} entries (batch size from "
                                 "qo_indptr_buf), got "
                                 f"{paged_kv_indptr_buf.numel()} / {paged_kv_last_page_len_buf.numel()}")
        self._paged_kv_indptr_buf = paged_kv_indptr_buf
        self._paged_kv_indices_buf = paged_kv_indices_buf
        self._paged_kv_last_page_len_buf = paged_kv_last_page_len_buf

    def plan(
        self,
        qo_indptr: torch.Tensor,
        paged_kv_indptr: torch.Tensor,
        paged_kv_indices: torch.Tensor,
        paged_kv_last_page_len: torch.Tensor,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim_qk: Optional[int] = None,
        page_size: Optional[int] = None,
        head_dim_vo: Optional[int] = None,
        custom_mask: Optional[torch.Tensor] = None,
        packed_custom_mask: Optional[torch.Tensor] = None,
        causal: bool = False,
        pos_encoding_mode: str = "NONE",
        use_fp16_qk_reduction: bool = False,
        sm_scale: Optional[float] = None,
        window_left: int = -1,
        logits_soft_cap: Optional[float] = None,
        rope_scale: Optional[float] = None,
        rope_theta: Optional[float] = None,
        q_data_type: Union[str, torch.dtype] = "float16",
        kv_data_type: Optional[Union[str, torch.dtype]] = None,
        o_data_type: Optional[Union[str, torch.dtype]] = None,
        non_blocking: bool = True,
        prefix_len_ptr: Optional[torch.Tensor] = None,
        token_pos_in_items_ptr: Optional[torch.Tensor] = None,
        token_pos_in_items_len: int = 0,
        max_item_len_ptr: Optional[torch.Tensor] = None,
        seq_lens: Optional[torch.Tensor] = None,
        seq_lens_q: Optional[torch.Tensor] = None,
        block_tables: Optional[torch.Tensor] = None,
        max_token_per_sequence: Optional[int] = None,
        max_sequence_kv: Optional[int] = None,
        fixed_split_size: Optional[int] = None,
        disable_split_kv: bool = False,
        uniform_q_len: Optional[int] = None,
        **unsupported,
    ) -> None:
        """Plan a prefill/append step: validate, schedule, copy the work list to the device.

        Positional arguments follow FlashInfer >= 0.6 (``o_data_type`` after ``kv_data_type``).

        Args:
            qo_indptr: int32 ``[B + 1]`` (CPU or device), starting at 0: request ``i`` owns rows
                ``qo_indptr[i]:qo_indptr[i + 1]`` of q.
            paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len: the page table, as in batch decode
                (``last_page_len`` 1..page_size; a request without pages has no KV whatever its entry says;
                ``indptr[0]`` may be > 0). With ``FLASHTILE_DEBUG=1`` a device table is also validated.
            num_qo_heads, num_kv_heads: heads of q and of the cache (GQA: any multiple).
            head_dim_qk: head dim of q and k (multiple of 8, up to 256); ``head_dim=`` is accepted as its old
                name. head_dim_vo: of v (default head_dim_qk).
            page_size: tokens per page.
            custom_mask: bool, the requests' ``[qo_len, kv_len]`` masks (True = attend) flattened row-major and
                concatenated (``sum(qo_len * kv_len)`` elements); replaces ``causal``.
            packed_custom_mask: uint8, the same masks packed LSB first with every request starting on a new
                byte (``segment_packbits(custom_mask, indptr, bitorder="little")[0]``); wins over custom_mask.
            causal: bottom-right aligned causal mask.
            pos_encoding_mode: "NONE", "ROPE_LLAMA" (q and k rotated in the kernel) or "ALIBI".
            use_fp16_qk_reduction: accepted; flashtile accumulates q.k in float32.
            sm_scale: default ``1 / sqrt(head_dim_qk)``. window_left: sliding window (-1 disables).
            logits_soft_cap: ``cap * tanh(s / cap)`` when > 0. rope_scale, rope_theta: defaults 1 and 1e4.
            q_data_type: dtype of q (default float16 as upstream); kv_data_type: of the cache (default q's;
                fp8 e4m3fn/e5m2 allowed). An fp8 q_data_type is FP8 attention (docs/fp8_attention.md): the
                cache has q's fp8 dtype, o_data_type must be given (bfloat16, float16 or float32), run() takes
                the scales in ``*args``; no RoPE/ALiBi, variants or sinks.
                non_blocking: asynchronous host->device copies.
            prefix_len_ptr, token_pos_in_items_ptr, token_pos_in_items_len, max_item_len_ptr: multi-item scoring
                (many candidate items scored against one prompt in one sequence; docs/semantics.md).
                ``prefix_len_ptr`` ``[B]`` (uint32, int32 or int64): request ``b``'s shared prefix is keys
                ``[0, prefix_len[b])``. ``token_pos_in_items_ptr`` 1-D (uint16, int16, int32 or int64): the token
                at sequence position ``p >= prefix_len[b]`` (query ``i`` sits at ``kv_len - qo_len + i``) has item
                position ``t = token_pos_in_items_ptr[b * token_pos_in_items_len + p - prefix_len[b]]`` (0: a
                delimiter) and sees the prefix and the keys ``(p - t, p]`` (itself and the earlier tokens of
                its item; a delimiter sees only the prefix); prefix tokens are plain causal. Entries past a
                request's last key (zero padding) are never read. ``token_pos_in_items_len``: entries per request
                (unused for batch size 1). ``max_item_len_ptr`` ``[B]`` (uint16, uint32, int32 or int64) or None:
                upstream's bound for skipping KV tiles; flashtile finds the tiles to skip from the positions and
                only checks its form. The mask is causal whatever ``causal`` says, combines with
                ``window_left``, and cannot be combined with a custom mask (ValueError). CPU or device tensors;
                plan() reads ``prefix_len_ptr`` on the host and copies the positions; not in CUDA-graph mode
                (NotImplementedError).
            seq_lens, seq_lens_q, block_tables, max_token_per_sequence, max_sequence_kv: upstream's vendor
                backends only; ignored.
            o_data_type: output dtype (default q's). fixed_split_size: deterministic KV chunk in pages (a
                request's result does not depend on the rest of the batch; None or -1: off).
                disable_split_kv: never split. uniform_q_len: a hint of upstream's; ignored.
        """
        head_dim_qk = _head_dim_keyword(head_dim_qk, unsupported)
        if page_size is None:
            raise TypeError("plan(): missing the page_size argument")
        multi_item = MultiItemArgs(prefix_len_ptr, token_pos_in_items_ptr, token_pos_in_items_len, max_item_len_ptr)
        plan_args = dict(
            qo_indptr=qo_indptr, paged_kv_indptr=paged_kv_indptr, paged_kv_indices=paged_kv_indices,
            paged_kv_last_page_len=paged_kv_last_page_len, num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads,
            head_dim_qk=head_dim_qk, page_size=page_size, head_dim_vo=head_dim_vo, custom_mask=custom_mask,
            packed_custom_mask=packed_custom_mask, causal=causal, pos_encoding_mode=pos_encoding_mode,
            sm_scale=sm_scale, window_left=window_left, logits_soft_cap=logits_soft_cap, rope_scale=rope_scale,
            rope_theta=rope_theta, q_data_type=q_data_type, kv_data_type=kv_data_type, non_blocking=non_blocking,
            o_data_type=o_data_type, fixed_split_size=fixed_split_size, disable_split_kv=disable_split_kv,
        )
        check_positive_int("page_size", page_size)
        table = read_page_table(paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, page_size,
                                names=("paged_kv_indptr", "paged_kv_indices", "paged_kv_last_page_len"))
        indices, last_page_len = paged_kv_indices, paged_kv_last_page_len
        batch, indptr_h, kv_lens = table.batch_size, table.indptr, table.kv_lens  # int64 numpy
        first, last = table.first, table.last
        if self._use_cuda_graph:
            assert self._paged_kv_indptr_buf is not None and self._paged_kv_indices_buf is not None and \
                self._paged_kv_last_page_len_buf is not None  # the constructor checked them in CUDA-graph mode
            if last - first > self._paged_kv_indices_buf.numel():
                raise ValueError(
                    f"The size of indices should be less than or equal to the allocated buffer: need {last - first} "
                    f"page ids, paged_kv_indices_buf has {self._paged_kv_indices_buf.numel()}")
            self._check_graph_batch(batch)
            self._paged_kv_indptr_buf.copy_(torch.from_numpy(indptr_h - first), non_blocking=non_blocking)
            self._paged_kv_indices_buf[: last - first].copy_(indices[first:last], non_blocking=non_blocking)
            self._paged_kv_last_page_len_buf.copy_(last_page_len, non_blocking=non_blocking)
            page_indices, kv_offsets = self._paged_kv_indices_buf, indptr_h[:-1] - first
        else:
            page_indices, kv_offsets = indices.to(self.device, torch.int32, non_blocking=non_blocking), indptr_h[:-1]
        self._plan_batch(
            qo_indptr=qo_indptr, kv_lens_h=kv_lens, kv_offsets_h=kv_offsets, page_size=page_size,
            num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim_qk=head_dim_qk, head_dim_vo=head_dim_vo,
            custom_mask=custom_mask, packed_custom_mask=packed_custom_mask, causal=causal,
            pos_encoding_mode=pos_encoding_mode, window_left=window_left, logits_soft_cap=logits_soft_cap,
            sm_scale=sm_scale, rope_scale=rope_scale, rope_theta=rope_theta, q_data_type=q_data_type,
            kv_data_type=kv_data_type, o_data_type=o_data_type, non_blocking=non_blocking,
            fixed_split_size=fixed_split_size, disable_split_kv=disable_split_kv, page_indices=page_indices,
            kv_rows_needed=0, max_page_id=table.max_page_id, plan_args=plan_args, multi_item=multi_item,
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
        kv_cache_sf=None,
    ):
        """Attention of the planned batch.

        Args:
            q: ``[qo_indptr[-1], num_qo_heads, head_dim_qk]`` in the planned q dtype, unit last stride.
            paged_kv_cache: ``[pages, 2, page_size, heads, dim]`` (NHD; HND swaps page_size and heads), or a
                ``(k_cache, v_cache)`` tuple of ``[pages, page_size, heads, dim]`` views; the planned kv dtype.
            q_scale, k_scale: calibration scales multiplied into sm_scale; v_scale multiplies the output.
            out: optional ``[qo_indptr[-1], num_qo_heads, head_dim_vo]`` output (o_data_type), written and returned.
            lse: optional float32 ``[qo_indptr[-1], num_qo_heads]``. return_lse: also return the base-2 lse.
            enable_pdl: accepted and ignored. window_left: must equal the plan's.
            sinks: float ``[num_qo_heads]`` attention-sink logits (natural units), or None. ``*args``: the
                extra arguments of the wrapper's ``jit_args`` variant, tensors first then scalars; with an fp8
                q_data_type plan (FP8 attention, docs/fp8_attention.md): ``scale_q, scale_k, scale_v``, float32
                ``[num_qo_heads]`` / ``[num_kv_heads]`` / ``[num_kv_heads]`` (or ``[1]``) dequantization
                scales of q, k and v (fewer, or none: 1.0).
            kv_cache_sf: scale factors of an NVFP4 cache; only None (NotImplementedError otherwise).

        Returns:
            ``out`` or ``(out, lse)``; rows that see no key give zeros and lse -inf.
        """
        plan = self._plan
        key = variant = None
        if plan is not None and kv_cache_sf is None and plan.q_dtype not in FP8_DTYPES:  # fp8: args are scales
            key, variant = self._run_memo_key(plan, (q, paged_kv_cache, out, lse),
                                              (q_scale, k_scale, v_scale, window_left), args, sinks, window_left)
            if key is not None:
                replay = plan.replays.get(key)
                if replay is not None:
                    return replay((q, paged_kv_cache), out, lse, return_lse, variant)
        plan = self._require_plan()
        fp8 = self._fp8_scales(plan, args, sinks)
        if variant is None:
            variant = self._check_run_options(plan, () if fp8 is not None else args, sinks, window_left,
                                              kv_cache_sf)
        cache = unpack_paged_kv_cache(paged_kv_cache, self._kv_layout)
        rows = self._check_q(plan, q)
        if cache.dtype != plan.kv_dtype:
            raise ValueError(f"The dtype of paged_kv_cache {cache.dtype} does not match the kv_data_type "
                             f"{plan.kv_dtype} specified in plan function.")
        if cache.num_kv_heads != plan.num_kv_heads or cache.k.shape[3] != plan.head_dim_qk or \
                cache.v.shape[3] != plan.head_dim_vo:
            raise ValueError(f"paged_kv_cache: expected {plan.num_kv_heads} KV heads with head dims "
                             f"{plan.head_dim_qk}/{plan.head_dim_vo} (k/v) as planned, got {cache.num_kv_heads} heads "
                             f"of {cache.k.shape[3]}/{cache.v.shape[3]} ({self._kv_layout})")
        if cache.page_size != plan.page_size:
            raise ValueError(f"paged_kv_cache: page_size {cache.page_size} (from the cache shape) differs from the "
                             f"planned page_size {plan.page_size}")
        if cache.device != self.device:
            raise ValueError(f"paged_kv_cache must be on the wrapper's device {self.device}, got {cache.device}")
        if plan.max_page_id is not None and plan.max_page_id >= cache.num_pages:
            raise ValueError(f"paged_kv_indices: the plan uses page {plan.max_page_id}, the cache has "
                             f"{cache.num_pages} pages")
        layout = self._kv_layout
        return self._launch(plan, key, q, cache.k, cache.v, q_scale, k_scale, v_scale, out, lse, return_lse, rows,
                            lambda cache_: kv_page_views(cache_, layout), variant, fp8)

    def forward(self, q: torch.Tensor, paged_kv_cache, causal: bool = False, pos_encoding_mode: str = "NONE",
                use_fp16_qk_reduction: bool = False, k_scale: Optional[float] = None, v_scale: Optional[float] = None,
                window_left: int = -1, logits_soft_cap: Optional[float] = None, sm_scale: Optional[float] = None,
                rope_scale: Optional[float] = None, rope_theta: Optional[float] = None, return_lse: bool = False):
        """Deprecated upstream form of :meth:`run`: its attention parameters replace the planned ones."""
        self._forward(causal=causal, pos_encoding_mode=pos_encoding_mode, window_left=window_left,
                                 logits_soft_cap=logits_soft_cap, sm_scale=sm_scale, rope_scale=rope_scale,
                                 rope_theta=rope_theta)
        return self.run(q, paged_kv_cache, k_scale=k_scale, v_scale=v_scale, return_lse=return_lse)


class BatchPrefillWithRaggedKVCacheWrapper(BatchPrefillWrapper):
    """Batch prefill attention over ragged (packed, variable-length) K/V tensors.

    Request ``i`` has query rows ``qo_indptr[i]:qo_indptr[i + 1]`` of q and keys/values rows
    ``kv_indptr[i]:kv_indptr[i + 1]`` of k and v. Masks, causal alignment, scheduling and the CUDA-graph
    mode are those of :class:`BatchPrefillWithPagedKVCacheWrapper`. This is also the path for DeepSeek
    prefill without matrix absorption (``head_dim_qk=192, head_dim_vo=128``).

    Args:
        float_workspace_buffer: device tensor (any dtype) for partial states; 128 MiB is plenty.
        kv_layout: "NHD" (k ``[rows, heads, dim]``) or "HND" (k ``[heads, rows, dim]``).
        use_cuda_graph: fixed-size mode (see the paged wrapper); qo_indptr_buf and kv_indptr_buf: int32
            ``[B + 1]``; custom_mask_buf / mask_indptr_buf for a custom mask in graph mode.
        backend, jit_args, jit_kwargs: as the paged wrapper.
    """

    _paged = False

    def __init__(
        self,
        float_workspace_buffer: torch.Tensor,
        kv_layout: str = "NHD",
        use_cuda_graph: bool = False,
        qo_indptr_buf: Optional[torch.Tensor] = None,
        kv_indptr_buf: Optional[torch.Tensor] = None,
        custom_mask_buf: Optional[torch.Tensor] = None,
        mask_indptr_buf: Optional[torch.Tensor] = None,
        backend: str = "auto",
        jit_args=None,
        jit_kwargs=None,
    ) -> None:
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, qo_indptr_buf, custom_mask_buf,
                         mask_indptr_buf, backend, jit_args, jit_kwargs)
        if self._use_cuda_graph:
            self._check_graph_buffer("kv_indptr_buf", kv_indptr_buf)
            assert kv_indptr_buf is not None  # checked above
            if kv_indptr_buf.numel() != self._fixed_batch_size + 1:
                raise ValueError(f"kv_indptr_buf: expected {self._fixed_batch_size + 1} entries (batch size from "
                                 f"qo_indptr_buf), got {kv_indptr_buf.numel()}")
        self._kv_indptr_buf = kv_indptr_buf

    def plan(
        self,
        qo_indptr: torch.Tensor,
        kv_indptr: torch.Tensor,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim_qk: Optional[int] = None,
        head_dim_vo: Optional[int] = None,
        custom_mask: Optional[torch.Tensor] = None,
        packed_custom_mask: Optional[torch.Tensor] = None,
        causal: bool = False,
        pos_encoding_mode: str = "NONE",
        use_fp16_qk_reduction: bool = False,
        window_left: int = -1,
        logits_soft_cap: Optional[float] = None,
        sm_scale: Optional[float] = None,
        rope_scale: Optional[float] = None,
        rope_theta: Optional[float] = None,
        q_data_type: Union[str, torch.dtype] = "float16",
        kv_data_type: Optional[Union[str, torch.dtype]] = None,
        o_data_type: Optional[Union[str, torch.dtype]] = None,
        non_blocking: bool = True,
        prefix_len_ptr: Optional[torch.Tensor] = None,
        token_pos_in_items_ptr: Optional[torch.Tensor] = None,
        token_pos_in_items_len: int = 0,
        max_item_len_ptr: Optional[torch.Tensor] = None,
        fixed_split_size: Optional[int] = None,
        disable_split_kv: bool = False,
        seq_lens: Optional[torch.Tensor] = None,
        seq_lens_q: Optional[torch.Tensor] = None,
        max_token_per_sequence: Optional[int] = None,
        max_sequence_kv: Optional[int] = None,
        v_indptr: Optional[torch.Tensor] = None,
        o_indptr: Optional[torch.Tensor] = None,
        uniform_q_len: Optional[int] = None,
        **unsupported,
    ) -> None:
        """Plan a ragged prefill step (arguments as the paged plan; note upstream's order here:
        ``window_left, logits_soft_cap, sm_scale``; positional order of FlashInfer >= 0.6).

        Args:
            qo_indptr: int32 ``[B + 1]`` starting at 0: request ``i`` owns rows ``qo_indptr[i]:qo_indptr[i + 1]`` of q.
            kv_indptr: int32 ``[B + 1]``, non-decreasing: request ``i`` owns rows ``kv_indptr[i]:kv_indptr[i + 1]``
                of k and v (``kv_indptr[0]`` may be > 0).
            fixed_split_size: deterministic KV chunk in tokens.
            seq_lens, seq_lens_q, max_token_per_sequence, max_sequence_kv, uniform_q_len: upstream's vendor
                backends only; ignored.
            v_indptr, o_indptr: separate V / output row offsets (upstream's cuDNN backend): NotImplementedError.
            Other arguments: see :meth:`BatchPrefillWithPagedKVCacheWrapper.plan`.
        """
        head_dim_qk = _head_dim_keyword(head_dim_qk, unsupported)
        if v_indptr is not None or o_indptr is not None:
            raise NotImplementedError("v_indptr, o_indptr: V and the output share kv_indptr / qo_indptr in "
                                      "flashtile (upstream's cuDNN-only layout)")
        multi_item = MultiItemArgs(prefix_len_ptr, token_pos_in_items_ptr, token_pos_in_items_len, max_item_len_ptr)
        plan_args = dict(
            qo_indptr=qo_indptr, kv_indptr=kv_indptr, num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads,
            head_dim_qk=head_dim_qk, head_dim_vo=head_dim_vo, custom_mask=custom_mask,
            packed_custom_mask=packed_custom_mask, causal=causal, pos_encoding_mode=pos_encoding_mode,
            window_left=window_left, logits_soft_cap=logits_soft_cap, sm_scale=sm_scale, rope_scale=rope_scale,
            rope_theta=rope_theta, q_data_type=q_data_type, kv_data_type=kv_data_type, non_blocking=non_blocking,
            o_data_type=o_data_type, fixed_split_size=fixed_split_size, disable_split_kv=disable_split_kv,
        )
        kv_indptr = as_index_tensor("kv_indptr", kv_indptr)
        qo_indptr = as_index_tensor("qo_indptr", qo_indptr)
        if kv_indptr.numel() != qo_indptr.numel():
            raise ValueError(f"kv_indptr: expected as many entries as qo_indptr ({qo_indptr.numel()}), got "
                             f"{kv_indptr.numel()}")
        kv_h = host_int64(kv_indptr)
        if kv_h.size < 1 or kv_h[0] < 0 or (kv_h[1:] < kv_h[:-1]).any():
            raise ValueError(f"kv_indptr: must be non-negative and non-decreasing, got {kv_h.tolist()[:16]}")
        if self._use_cuda_graph:
            assert self._kv_indptr_buf is not None  # the constructor checked it in CUDA-graph mode
            self._check_graph_batch(kv_h.size - 1)
            self._kv_indptr_buf.copy_(torch.from_numpy(kv_h), non_blocking=non_blocking)
        self._plan_batch(
            qo_indptr=qo_indptr, kv_lens_h=kv_h[1:] - kv_h[:-1], kv_offsets_h=kv_h[:-1], page_size=None,
            num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim_qk=head_dim_qk, head_dim_vo=head_dim_vo,
            custom_mask=custom_mask, packed_custom_mask=packed_custom_mask, causal=causal,
            pos_encoding_mode=pos_encoding_mode, window_left=window_left, logits_soft_cap=logits_soft_cap,
            sm_scale=sm_scale, rope_scale=rope_scale, rope_theta=rope_theta, q_data_type=q_data_type,
            kv_data_type=kv_data_type, o_data_type=o_data_type, non_blocking=non_blocking,
            fixed_split_size=fixed_split_size, disable_split_kv=disable_split_kv, page_indices=None,
            kv_rows_needed=int(kv_h[-1]), max_page_id=None, plan_args=plan_args, multi_item=multi_item,
        )

    begin_forward = plan

    def run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
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
    ):
        """Attention of the planned batch.

        Args:
            q: ``[qo_indptr[-1], num_qo_heads, head_dim_qk]`` in the planned q dtype, unit last stride.
            k: ``[rows, num_kv_heads, head_dim_qk]`` (NHD; HND: ``[num_kv_heads, rows, head_dim_qk]``) with
                ``rows >= kv_indptr[-1]``, the planned kv dtype (fp8 allowed; scales below); unit last stride.
            v: like k with ``head_dim_vo``.
            *args: a ``jit_args`` variant's extra arguments, or with an fp8 q_data_type plan ``scale_q, scale_k,
                scale_v`` (as the paged wrapper's run(); FP8 attention, docs/fp8_attention.md).
            q_scale, k_scale: calibration scales multiplied into sm_scale; v_scale multiplies the output.
            out, lse, return_lse, enable_pdl, window_left, sinks: as the paged wrapper's run().

        Returns:
            ``out [qo_indptr[-1], num_qo_heads, head_dim_vo]`` or ``(out, lse)``.
        """
        plan = self._plan
        key = variant = None
        if plan is not None and plan.q_dtype not in FP8_DTYPES:  # fp8: args are scales
            key, variant = self._run_memo_key(plan, (q, k, v, out, lse), (q_scale, k_scale, v_scale, window_left),
                                              args, sinks, window_left)
            if key is not None:
                replay = plan.replays.get(key)
                if replay is not None:
                    return replay((q, (k, v)), out, lse, return_lse, variant)
        plan = self._require_plan()
        fp8 = self._fp8_scales(plan, args, sinks)
        if variant is None:
            variant = self._check_run_options(plan, () if fp8 is not None else args, sinks, window_left, None)
        rows = self._check_q(plan, q)
        for name, x in (("k", k), ("v", v)):
            check_tensor(name, x, ndim=3)
            if x.dtype != plan.kv_dtype:
                raise ValueError(f"The dtype of {name} {x.dtype} does not match the kv_data_type {plan.kv_dtype} "
                                 "specified in plan function.")
            if x.device != self.device:
                raise ValueError(f"{name} must be on the wrapper's device {self.device}, got {x.device}")
        derive = _ragged_kv_views(self._kv_layout)
        k_given, v_given = k, v
        k, v = derive((k, v))
        # views, no copies: a replay passes only data pointers, which views share. (Not while torch.compile
        # traces: no replay is recorded then, and torch 2.11's Dynamo cannot read a fake tensor's data_ptr.)
        if key is not None and k.data_ptr() == k_given.data_ptr() and v.data_ptr() == v_given.data_ptr():
            derive = as_given
        for name, x, dim in (("k", k, plan.head_dim_qk), ("v", v, plan.head_dim_vo)):
            if x.shape[1] != plan.num_kv_heads or x.shape[2] != dim or x.shape[0] < plan.kv_rows_needed:
                raise ValueError(f"{name}: expected at least {plan.kv_rows_needed} rows (kv_indptr[-1]) of "
                                 f"{plan.num_kv_heads} heads x {dim} as planned ({self._kv_layout}), got "
                                 f"{list(x.shape)} as NHD")
        return self._launch(plan, key, q, k, v, q_scale, k_scale, v_scale, out, lse, return_lse, rows, derive,
                            variant, fp8)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False, window_left: int = -1,
                logits_soft_cap: Optional[float] = None, sm_scale: Optional[float] = None,
                rope_scale: Optional[float] = None, rope_theta: Optional[float] = None, return_lse: bool = False):
        """Deprecated upstream form of :meth:`run`: its attention parameters replace the planned ones."""
        self._forward(causal=causal, pos_encoding_mode=pos_encoding_mode, window_left=window_left,
                                 logits_soft_cap=logits_soft_cap, sm_scale=sm_scale, rope_scale=rope_scale,
                                 rope_theta=rope_theta)
        return self.run(q, k, v, return_lse=return_lse)


def _head_dim_keyword(head_dim_qk: Optional[int], unsupported: dict) -> int:
    """``head_dim_qk``, or ``head_dim=`` as FlashInfer <= 0.2.2 named it (TGI passes that keyword)."""
    head_dim = unsupported.pop("head_dim", None)
    if unsupported:
        raise TypeError(f"plan(): unexpected keyword arguments {sorted(unsupported)}")
    if head_dim is not None and head_dim_qk is not None and head_dim != head_dim_qk:
        raise ValueError(f"head_dim: an alias of head_dim_qk, got both ({head_dim} and {head_dim_qk})")
    head_dim_qk = head_dim_qk if head_dim_qk is not None else head_dim
    if head_dim_qk is None:
        raise TypeError("plan(): missing the head_dim_qk argument")
    return head_dim_qk


def _ragged_kv_views(kv_layout: str):
    """The kernel's NHD views of ragged ``(k, v)`` (HND transposed; a non-unit last stride copied)."""
    hnd = kv_layout == "HND"

    def views(kv):
        k, v = kv
        if hnd:
            k, v = k.transpose(0, 1), v.transpose(0, 1)
        return _unit_last_stride(k), _unit_last_stride(v)

    return views

