"""Prefill and decode of one engine step: ``flashtile.pod.PODWithPagedKVCacheWrapper`` (FlashInfer v0.3.1's
``flashinfer.pod.PODWithPagedKVCacheWrapper``; docs/pod.md).

One prefill request with its own contiguous K/V (the chunk being prefilled) and a batch of decodes over a
paged cache. Upstream runs both halves in one launch (POD-Attention); flashtile runs them as two launches:
the prefill half with the single-request prefill path (:func:`flashtile.single_prefill_with_kv_cache`), the
decode half with :class:`flashtile.BatchDecodeWithPagedKVCacheWrapper`. On a GPU the decode launch goes to a
side stream forked from (and joined back into) the caller's stream, so the GPU may run the memory-bound decode
programs beside the compute-bound prefill programs (``overlap_streams``; CUDA-graph capture records the fork
and the join). For one launch over a mixed batch whose prefill K/V is in the paged cache, use
:class:`flashtile.BatchAttention`.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from ._core.buffers import new_output
from ._core.checks import CHECK_ERRORS, describe, in_callers_terms
from ._core.variant_args import variant_from_jit_args
from .decode import BatchDecodeWithPagedKVCacheWrapper
from .prefill import single_prefill_with_kv_cache

__all__ = ["PODWithPagedKVCacheWrapper"]

# How the two launches meet on the GPU (the pod suite's "pod" tuning grid, benchmarks/bench_pod.py, times
# them): the order in which run() issues them, and the side stream's priority (CUDA: lower is higher; the
# block scheduler places pending blocks of a higher-priority stream first). Each half's programs fill every SM
# they fit on, so the second launch gets only the room beside the first one's programs.
DECODE_FIRST = True
SIDE_STREAM_PRIORITY = 0

# run()'s argument names for those of the calls it makes, so that their errors name what the caller passed
_PREFILL_NAMES = {"q": "q_p", "k": "k_p", "v": "v_p", "custom_mask": "custom_mask_p",
                  "packed_custom_mask": "packed_custom_mask_p", "kv_layout": "kv_layout_p",
                  "pos_encoding_mode": "pos_encoding_mode_p", "sm_scale": "sm_scale_p", "window_left": "window_left_p",
                  "logits_soft_cap": "logits_soft_cap_p", "rope_scale": "rope_scale_p", "rope_theta": "rope_theta_p"}
_DECODE_NAMES = {"q": "q_d", "paged_kv_cache": "paged_kv_cache_d", "out": "out_d"}


class PODWithPagedKVCacheWrapper:
    """A prefill request and a decode batch of one step, planned once (the decode half) and run per layer.

    Args:
        float_workspace_buffer: device tensor (any dtype) for the decode half's split-KV partial states;
            128 MiB is plenty. Its device is the wrapper's device.
        kv_layout: "NHD" or "HND": the layout of the decode half's paged cache.
        use_cuda_graph: fixed-size mode for CUDA-graph capture (the batch size is
            ``len(paged_kv_last_page_len_buffer)``; plan() copies the page table into the buffers below,
            run() launches grids that do not depend on the lengths); the prefill half keeps the length of
            the captured run.
        paged_kv_indptr_buffer: int32 ``[B + 1]``; paged_kv_indices_buffer: int32 ``[max_pages]``;
            paged_kv_last_page_len_buffer: int32 ``[B]`` (graph mode; device tensors).
        jit_args: an attention variant for both halves (flashtile/variants.py): a
            :class:`flashtile.AttentionVariant`, or upstream's ``jit_args`` tuple with one as its
            ``variant_decl`` (a C++ ``variant_decl`` raises NotImplementedError); run()'s ``*args`` are its
            extra arguments, passed to both halves.
    """

    def __init__(
        self,
        float_workspace_buffer: torch.Tensor,
        kv_layout: str = "NHD",
        use_cuda_graph: bool = False,
        paged_kv_indptr_buffer: Optional[torch.Tensor] = None,
        paged_kv_indices_buffer: Optional[torch.Tensor] = None,
        paged_kv_last_page_len_buffer: Optional[torch.Tensor] = None,
        jit_args=None,
    ) -> None:
        self._variant = variant_from_jit_args(jit_args)
        self._decode = BatchDecodeWithPagedKVCacheWrapper(
            float_workspace_buffer, kv_layout, use_cuda_graph, paged_kv_indptr_buffer=paged_kv_indptr_buffer,
            paged_kv_indices_buffer=paged_kv_indices_buffer,
            paged_kv_last_page_len_buffer=paged_kv_last_page_len_buffer, jit_args=self._variant)
        self.device = self._decode.device
        self._kv_layout = kv_layout
        # Run the decode half on a side stream (GPU only); False: both halves on the caller's stream, in order.
        self.overlap_streams = self.device.type == "cuda"
        self._side_stream = self._new_side_stream() if self.overlap_streams else None

    def _new_side_stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device, priority=SIDE_STREAM_PRIORITY)

    @property
    def is_cuda_graph_enabled(self) -> bool:
        return self._decode.is_cuda_graph_enabled

    # The decode half's planned parameters, under upstream's attribute names.
    @property
    def _window_left(self) -> int:
        return self._decode._window_left

    @property
    def _logits_soft_cap(self) -> float:
        return self._decode._logits_soft_cap

    @property
    def _sm_scale(self) -> Optional[float]:
        return self._decode._sm_scale

    @property
    def _pos_encoding_mode(self) -> str:
        return self._decode._pos_encoding_mode

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor,
                               int_workspace_buffer: Optional[torch.Tensor] = None) -> None:
        """Swap the workspaces (re-plan afterwards)."""
        self._decode.reset_workspace_buffer(float_workspace_buffer, int_workspace_buffer)

    def end_forward(self) -> None:
        """Deprecated upstream alias; nothing to release."""

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
        q_data_type: Union[str, torch.dtype] = "float16",
        kv_data_type: Optional[Union[str, torch.dtype]] = None,
        data_type: Optional[Union[str, torch.dtype]] = None,
        sm_scale: Optional[float] = None,
        rope_scale: Optional[float] = None,
        rope_theta: Optional[float] = None,
        non_blocking: bool = True,
        *,
        logits_soft_cap: Optional[float] = None,
        fixed_split_size: Optional[int] = None,
        disable_split_kv: bool = False,
    ) -> None:
        """Plan the decode half (the prefill half needs no plan): validate the page table, choose the KV
        split, copy the work list to the device (may synchronize).

        Args:
            indptr: int32 ``[B + 1]`` (CPU or device), non-decreasing: decode ``i`` owns pages
                ``indices[indptr[i]:indptr[i + 1]]`` (``indptr[0]`` may be > 0).
            indices: int32 page ids into the cache given to run().
            last_page_len: int32 ``[B]``: tokens in each request's last page, 1..page_size (a request without
                pages has no KV and gives zeros).
            num_qo_heads, num_kv_heads: heads of q_d and of the cache (GQA: num_qo_heads a multiple); the
                prefill half takes its heads from q_p / k_p.
            head_dim: head dim of q_d and the cache (multiple of 8, up to 256).
            page_size: tokens per page (any >= 1).
            pos_encoding_mode: "NONE", "ROPE_LLAMA" (in-kernel RoPE; the query sits at position kv_len - 1) or
                "ALIBI", for the decode half.
            window_left: sliding window of the decode half (-1 disables).
            q_data_type: dtype of q_d (default float16, as upstream); kv_data_type: of the cache (default q's;
                fp8 e4m3fn/e5m2 allowed); data_type: deprecated, fills kv_data_type when that is None.
            sm_scale: default ``1 / sqrt(head_dim)``. rope_scale, rope_theta: defaults 1 and 1e4.
            non_blocking: asynchronous host-to-device copies.
            logits_soft_cap: (flashtile extension, keyword) soft cap of the decode half; upstream has none.
            fixed_split_size, disable_split_kv: the decode wrapper's deterministic-split options.
        """
        self._decode.plan(
            indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
            pos_encoding_mode=pos_encoding_mode, window_left=window_left, logits_soft_cap=logits_soft_cap,
            q_data_type=q_data_type, kv_data_type=kv_data_type, data_type=data_type, sm_scale=sm_scale,
            rope_scale=rope_scale, rope_theta=rope_theta, non_blocking=non_blocking,
            fixed_split_size=fixed_split_size, disable_split_kv=disable_split_kv)

    begin_forward = plan

    def run(
        self,
        q_p: torch.Tensor,
        k_p: torch.Tensor,
        v_p: torch.Tensor,
        q_d: torch.Tensor,
        paged_kv_cache_d,
        custom_mask_p: Optional[torch.Tensor] = None,
        packed_custom_mask_p: Optional[torch.Tensor] = None,
        causal_p: bool = False,
        kv_layout_p: str = "NHD",
        pos_encoding_mode_p: str = "NONE",
        sm_scale_p: Optional[float] = None,
        window_left_p: int = -1,
        rope_scale_p: Optional[float] = None,
        rope_theta_p: Optional[float] = None,
        return_lse_p: bool = False,
        custom_mask_d: Optional[torch.Tensor] = None,
        packed_custom_mask_d: Optional[torch.Tensor] = None,
        causal_d: bool = False,
        kv_layout_d: str = "NHD",
        pos_encoding_mode_d: str = "NONE",
        sm_scale_d: Optional[float] = None,
        window_left_d: int = -1,
        rope_scale_d: Optional[float] = None,
        rope_theta_d: Optional[float] = None,
        q_scale: Optional[float] = None,
        k_scale: Optional[float] = None,
        v_scale: Optional[float] = None,
        return_lse_d: bool = False,
        use_fp16_qk_reduction: bool = False,
        enable_pdl: Optional[bool] = None,
        *args,
        logits_soft_cap_p: Optional[float] = None,
        out_d: Optional[torch.Tensor] = None,
    ):
        """Attention of the prefill request and of the planned decode batch.

        Prefill half (like :func:`flashtile.single_prefill_with_kv_cache`):
            q_p: ``[qo_len_p, num_qo_heads, head_dim]`` float16/bfloat16, unit last stride.
            k_p, v_p: ``[kv_len_p, num_kv_heads, head_dim]`` (``kv_layout_p`` "NHD") or
                ``[num_kv_heads, kv_len_p, head_dim]`` ("HND"), q_p's dtype; its queries are the last
                ``qo_len_p`` of the ``kv_len_p`` tokens (``causal_p``: bottom-right aligned).
            custom_mask_p: bool ``[qo_len_p, kv_len_p]`` (True = attend), replaces causal_p;
                packed_custom_mask_p: the same bit-packed LSB first (uint8).
            pos_encoding_mode_p, sm_scale_p, window_left_p, rope_scale_p, rope_theta_p: as for the single prefill.
            logits_soft_cap_p: (flashtile extension, keyword) soft cap of the prefill half.
        Decode half (as planned):
            q_d: ``[B, num_qo_heads, head_dim]`` in the planned q dtype, unit last stride.
            paged_kv_cache_d: ``[pages, 2, page_size, heads, dim]`` in the wrapper's kv_layout (HND swaps
                page_size and heads) or a ``(k_cache, v_cache)`` tuple; the planned kv dtype.
            q_scale, k_scale: fold into the decode half's sm_scale; v_scale multiplies its output (fp8 caches).
            out_d: (flashtile extension, keyword) optional ``[B, num_qo_heads, head_dim]`` decode output.
            custom_mask_d, packed_custom_mask_d: only None (NotImplementedError). causal_d, kv_layout_d: ignored
                (one query per request; the layout is the wrapper's). pos_encoding_mode_d, sm_scale_d,
                window_left_d, rope_scale_d, rope_theta_d: ignored at their defaults, as upstream (the decode
                half uses plan()'s values); another value that differs from the plan raises ValueError.
        Both: use_fp16_qk_reduction, enable_pdl: accepted and ignored. ``*args``: the extra arguments of the
        ``jit_args`` variant (tensors first, then scalars, in its declaration order), given to both halves;
        without a variant, only empty.

        Returns:
            ``(out_p, out_d)`` as upstream. With ``return_lse_p`` the first element is ``(out_p, lse_p)``, with
            ``return_lse_d`` the second is ``(out_d, lse_d)`` (base-2 lse; upstream computes them but returns
            only the outputs).
        """
        if args and self._variant is None:
            raise ValueError(f"run(): got {len(args)} extra positional arguments, which feed an attention variant "
                             "(jit_args=); this wrapper has none")
        variant_p = None if self._variant is None else (self._variant, args)
        if custom_mask_d is not None or packed_custom_mask_d is not None:
            name = "custom_mask_d" if custom_mask_d is not None else "packed_custom_mask_d"
            raise NotImplementedError(f"{name}: the decode half takes no custom mask (one query per request)")
        self._check_decode_overrides(pos_encoding_mode_d, sm_scale_d, window_left_d, rope_scale_d, rope_theta_d)
        if not isinstance(q_d, torch.Tensor):
            raise TypeError(f"q_d: expected a torch.Tensor, got {describe(q_d)}")
        plan = self._decode._require_plan()
        if q_d.dim() != 3 or q_d.shape[0] != plan.batch_size:
            raise ValueError(f"q_d: expected shape [batch_size, num_qo_heads, head_dim] with batch_size "
                             f"{plan.batch_size} as planned, got {list(q_d.shape)}")
        if not isinstance(q_p, torch.Tensor):
            raise TypeError(f"q_p: expected a torch.Tensor, got {describe(q_p)}")
        if q_p.device != self.device:
            raise ValueError(f"q_p must be on the wrapper's device {self.device}, got {q_p.device}")

        def prefill():
            try:
                return single_prefill_with_kv_cache(
                    q_p, k_p, v_p, custom_mask=custom_mask_p, packed_custom_mask=packed_custom_mask_p,
                    causal=causal_p, kv_layout=kv_layout_p, pos_encoding_mode=pos_encoding_mode_p, sm_scale=sm_scale_p,
                    window_left=window_left_p, logits_soft_cap=logits_soft_cap_p, rope_scale=rope_scale_p,
                    rope_theta=rope_theta_p, return_lse=return_lse_p, _variant=variant_p)
            except CHECK_ERRORS as error:
                raise in_callers_terms(error, _PREFILL_NAMES, "prefill half") from error

        def decode(out, lse):
            try:
                return self._decode.run(q_d, paged_kv_cache_d, *args, q_scale=q_scale, k_scale=k_scale,
                                        v_scale=v_scale, out=out, lse=lse, return_lse=return_lse_d)
            except CHECK_ERRORS as error:
                raise in_callers_terms(error, _DECODE_NAMES, "decode half") from error

        if not self.overlap_streams or torch.compiler.is_compiling():
            return prefill(), decode(out_d, None)
        # The decode half's outputs are made on the caller's stream (the side stream never allocates), the side
        # stream starts after everything queued so far and the caller's stream waits for it before returning.
        shape = (plan.batch_size, plan.num_qo_heads, plan.head_dim)
        if out_d is None:
            out_d = new_output(shape, plan.o_dtype, self.device)
        lse_d = new_output(shape[:2], torch.float32, self.device) if return_lse_d else None
        main = torch.cuda.current_stream(self.device)
        if self._side_stream is None:  # overlap_streams turned on after construction
            self._side_stream = self._new_side_stream()
        side = self._side_stream
        side.wait_stream(main)
        try:  # joined even when a launch raises, so no memory of the caller's stream is reused under the decode
            if not DECODE_FIRST:
                prefilled = prefill()
            with torch.cuda.stream(side):
                decoded = decode(out_d, lse_d)
            if DECODE_FIRST:
                prefilled = prefill()
        finally:
            main.wait_stream(side)
        return prefilled, decoded

    def _check_decode_overrides(self, pos_encoding_mode_d, sm_scale_d, window_left_d, rope_scale_d,
                                rope_theta_d) -> None:
        """Upstream ignores run()'s decode-side attention arguments; flashtile accepts them at their defaults
        or equal to the plan's, and raises for a value the decode half would not use."""
        plan = self._decode._require_plan()
        params = plan.params
        given = (("pos_encoding_mode_d", pos_encoding_mode_d, "NONE", params.pos_encoding_mode),
                 ("sm_scale_d", sm_scale_d, None, params.sm_scale),
                 ("window_left_d", window_left_d, -1, params.window_left),
                 ("rope_scale_d", rope_scale_d, None, params.rope_scale),
                 ("rope_theta_d", rope_theta_d, None, params.rope_theta))
        for name, value, default, planned in given:
            same = value == planned or (isinstance(value, (int, float)) and isinstance(planned, (int, float))
                                        and math.isclose(value, planned, rel_tol=1e-6))
            if value != default and not same:
                raise ValueError(f"{name}: run() got {value!r}, the decode half was planned with {planned!r}; "
                                 "pass it to plan() (the decode half uses plan()'s attention parameters)")
