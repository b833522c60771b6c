"""One plan for any mix of query lengths over a paged cache: ``flashtile.attention.BatchAttention``
(FlashInfer v0.3.1's ``flashinfer.attention.BatchAttention``; docs/pod.md).

A serving step with chunked prefill mixes decodes (one query token), speculative verifications (a few)
and prefill chunks (hundreds or thousands) in one batch. :class:`BatchAttention` plans them together
with the batch-prefill scheduler (scheduler/prefill_work.py): one packed work list of (request, row
tile, KV chunk) items, long KV ranges cut so that the grid fills the GPU, and run() launches one
kernel over it (plus one merge launch when a range was cut). This module only translates the API:
``kv_len_arr`` (tokens per request) into the page table's last-page lengths, and upstream's defaults.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from ._core.checks import check_tensor, describe, parse_dtype
from ._core.host_arrays import host_int64
from ._core.paged_kv import as_index_tensor
from ._core.wrapper import check_positive_int
from .prefill import BatchPrefillWithPagedKVCacheWrapper

__all__ = ["BatchAttention", "last_page_lens"]

FLOAT_WORKSPACE_BYTES = 128 * 1024 * 1024  # split-KV partial states (upstream allocates 256 MiB)
# GQA-packed rows (query tokens x query heads per KV head) up to which a request counts as "small" (a decode or
# a speculative verification) for ``split_row_classes``: such requests get row tiles of at most this many rows.
SMALL_ROWS = 64


def last_page_lens(kv_indptr, kv_len_arr, page_size: int) -> torch.Tensor:
    """int32 CPU ``[B]``: tokens in each request's last page, from its page count and ``kv_len_arr``;
    0 for a request without pages. Raises ValueError when a length does not fit its pages."""
    pages = np.diff(host_int64(kv_indptr))
    lens = host_int64(kv_len_arr)
    if lens.size != pages.size:
        raise ValueError(f"kv_len_arr: expected batch_size = len(kv_indptr) - 1 = {pages.size} entries, "
                         f"got {lens.size}")
    lo = np.maximum(pages - 1, 0) * page_size + (pages > 0)  # a request with p pages has (p-1)*ps+1 .. p*ps tokens
    hi = pages * page_size
    bad = (lens < lo) | (lens > hi)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"kv_len_arr: request {i} has {int(lens[i])} tokens but {int(pages[i])} pages of "
                         f"page_size {page_size} (expected {int(lo[i])}..{int(hi[i])} tokens)")
    last = np.where(pages > 0, lens - np.maximum(pages - 1, 0) * page_size, 0)
    return torch.from_numpy(last.astype(np.int32))


class BatchAttention:
    """Attention of a batch whose requests have any number of query tokens, over a paged KV cache.

    Request ``i`` owns query rows ``qo_indptr[i]:qo_indptr[i + 1]`` of q (its last tokens: with ``causal``
    query ``t`` sits at position ``kv_len_i - qo_len_i + t``, bottom-right aligned) and the
    ``kv_len_arr[i]`` tokens stored in pages ``kv_indices[kv_indptr[i]:kv_indptr[i + 1]]``.

    Args:
        kv_layout: "NHD" or "HND", the layout of the cache given to run().
        device: where the workspaces live (the tensors of run() must be there too).
        use_cuda_graph: (flashtile extension, keyword; upstream has no CUDA-graph mode here) fixed-size mode:
            the batch size is ``len(qo_indptr_buf) - 1``, the first plan's ``qo_indptr[-1]`` is the most query
            rows a later plan may have, plan() copies the page table into the buffers, and run() launches
            grids that do not depend on the lengths, so a captured run() replays a later plan.
        qo_indptr_buf, kv_indptr_buf: int32 ``[B + 1]``; kv_indices_buf: int32 ``[max_pages]`` (graph mode,
            device tensors).
        jit_args: (flashtile extension, keyword; upstream's BatchAttention takes no variant) an attention
            variant (flashtile/variants.py: a :class:`flashtile.AttentionVariant` or upstream's ``jit_args``
            tuple with one as its ``variant_decl``); run()'s ``variant_args`` are its extra arguments.
    """

    def __init__(self, kv_layout: str = "NHD", device: Union[str, torch.device] = "cuda", *,
                 use_cuda_graph: bool = False, qo_indptr_buf: Optional[torch.Tensor] = None,
                 kv_indptr_buf: Optional[torch.Tensor] = None, kv_indices_buf: Optional[torch.Tensor] = None,
                 jit_args=None) -> None:
        self.device = torch.device(device)
        workspace = torch.empty(FLOAT_WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        last_page_len_buf = None
        if use_cuda_graph:
            for name, buf in (("qo_indptr_buf", qo_indptr_buf), ("kv_indptr_buf", kv_indptr_buf),
                              ("kv_indices_buf", kv_indices_buf)):
                if not isinstance(buf, torch.Tensor):
                    raise ValueError(f"{name} should be a torch.Tensor in cudagraph mode, got {describe(buf)}")
            assert qo_indptr_buf is not None  # checked above
            last_page_len_buf = torch.zeros(max(qo_indptr_buf.numel() - 1, 0), dtype=torch.int32, device=self.device)
        self._wrapper = BatchPrefillWithPagedKVCacheWrapper(
            workspace, kv_layout, use_cuda_graph, qo_indptr_buf=qo_indptr_buf, paged_kv_indptr_buf=kv_indptr_buf,
            paged_kv_indices_buf=kv_indices_buf, paged_kv_last_page_len_buf=last_page_len_buf, jit_args=jit_args)
        self._jit_args = jit_args
        # decodes and prefill tiles interleaved in launch order: bandwidth- and tensor-core-bound programs
        # run side by side instead of one after the other (scheduler/prefill_work.py)
        self._wrapper._interleave_rows = SMALL_ROWS
        self._kv_layout = kv_layout
        self._kv_indices_buf = kv_indices_buf if use_cuda_graph else None
        self._planned_cap = 0.0
        # One plan holds one row-tile shape, chosen for its longest request: in a batch that mixes prefill
        # chunks with decodes, the decodes' tiles then have prefill-sized row blocks. With
        # ``split_row_classes`` (not in CUDA-graph mode) a batch whose small-row requests (<= SMALL_ROWS
        # GQA-packed rows) and large-row requests form two contiguous runs is planned as two parts, each with
        # its own tile shape, and run() launches the two parts one after the other (two kernels, not one).
        self.split_row_classes = False
        self._workspace = workspace
        self._second: Optional[BatchPrefillWithPagedKVCacheWrapper] = None
        self._split_row: Optional[int] = None  # the first q row of the second part, when split

    @property
    def is_cuda_graph_enabled(self) -> bool:
        return self._wrapper.is_cuda_graph_enabled

    # Attributes serving engines read (upstream's names).
    @property
    def _causal(self) -> bool:
        return self._wrapper._causal

    @property
    def _sm_scale(self) -> Optional[float]:
        return self._wrapper._sm_scale

    @property
    def _logits_soft_cap(self) -> float:
        return self._wrapper._logits_soft_cap

    def plan(
        self,
        qo_indptr: torch.Tensor,
        kv_indptr: torch.Tensor,
        kv_indices: torch.Tensor,
        kv_len_arr: torch.Tensor,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim_qk: int,
        head_dim_vo: int,
        page_size: int,
        causal: bool = False,
        sm_scale: Optional[float] = None,
        logits_soft_cap: Optional[float] = None,
        q_data_type: Union[str, torch.dtype] = torch.bfloat16,
        kv_data_type: Union[str, torch.dtype] = torch.bfloat16,
        use_profiler: bool = False,
    ) -> None:
        """Plan a batch: validate, schedule, copy the work list to the device (may synchronize).

        Args:
            qo_indptr: int32 ``[B + 1]`` (CPU or device), from 0, non-decreasing: request ``i`` owns rows
                ``qo_indptr[i]:qo_indptr[i + 1]`` of q (any number per request: 1 for a decode).
            kv_indptr: int32 ``[B + 1]``, non-decreasing: request ``i`` owns pages
                ``kv_indices[kv_indptr[i]:kv_indptr[i + 1]]`` (``kv_indptr[0]`` may be > 0).
            kv_indices: int32 page ids into the cache given to run().
            kv_len_arr: int32 ``[B]``: tokens of each request, ``(pages - 1) * page_size + 1 .. pages * page_size``
                (0 for a request without pages); ValueError otherwise.
            num_qo_heads, num_kv_heads: heads of q and of the cache (GQA: num_qo_heads a multiple).
            head_dim_qk: head dim of q and k; head_dim_vo: of v and the output (multiples of 8 up to 256).
            page_size: tokens per page (any >= 1).
            causal: bottom-right aligned causal mask.
            sm_scale: default ``1 / sqrt(head_dim_qk)``.
            logits_soft_cap: ``cap * tanh(s / cap)`` when > 0 (None or 0: off).
            q_data_type, kv_data_type: dtypes of q and of the cache (default bfloat16, as upstream; kv may be fp8).
            use_profiler: upstream's in-kernel event profiler; only False (NotImplementedError otherwise).
        """
        if use_profiler:
            raise NotImplementedError("use_profiler: flashtile's kernels record no in-kernel profile; time them with "
                                      "CUDA events (benchmarks/harness.py)")
        check_positive_int("page_size", page_size)
        check_positive_int("head_dim_qk", head_dim_qk)
        check_positive_int("head_dim_vo", head_dim_vo)
        as_index_tensor("kv_indptr", kv_indptr)
        as_index_tensor("kv_len_arr", kv_len_arr)
        last = last_page_lens(kv_indptr, kv_len_arr, page_size)
        if self._kv_indices_buf is not None:
            ends = host_int64(kv_indptr)
            needed = int(ends[-1] - ends[0]) if ends.size else 0
            if needed > self._kv_indices_buf.numel():
                raise ValueError(f"The size of indices should be less than or equal to the allocated buffer: need "
                                 f"{needed} page ids, kv_indices_buf has {self._kv_indices_buf.numel()}")
        options: dict[str, Any] = dict(
            head_dim_qk=head_dim_qk, page_size=page_size, head_dim_vo=head_dim_vo, causal=causal, sm_scale=sm_scale,
            logits_soft_cap=logits_soft_cap, q_data_type=parse_dtype("q_data_type", q_data_type),
            kv_data_type=parse_dtype("kv_data_type", kv_data_type))
        self._split_row = None
        cut = None
        if self.split_row_classes and self._kv_indices_buf is None and isinstance(num_qo_heads, int) \
                and isinstance(num_kv_heads, int) and num_kv_heads > 0 and num_qo_heads % num_kv_heads == 0:
            cut = _row_class_cut(qo_indptr, num_qo_heads // num_kv_heads)
        if cut is None:
            self._wrapper.plan(qo_indptr, kv_indptr, kv_indices, last, num_qo_heads, num_kv_heads, **options)
        else:
            qo_h, kv_h = host_int64(qo_indptr), host_int64(kv_indptr)
            first_qo = torch.from_numpy(qo_h[: cut + 1].astype(np.int32))
            second_qo = torch.from_numpy((qo_h[cut:] - qo_h[cut]).astype(np.int32))
            first_kv = torch.from_numpy(kv_h[: cut + 1].astype(np.int32))
            second_kv = torch.from_numpy(kv_h[cut:].astype(np.int32))  # kv_indptr[0] > 0 selects a window
            if self._second is None:  # shares the float workspace: the two parts run in stream order
                self._second = BatchPrefillWithPagedKVCacheWrapper(self._workspace, self._kv_layout,
                                                                   jit_args=self._jit_args)
            self._wrapper.plan(first_qo, first_kv, kv_indices, last[:cut], num_qo_heads, num_kv_heads, **options)
            self._second.plan(second_qo, second_kv, kv_indices, last[cut:], num_qo_heads, num_kv_heads, **options)
            self._split_row = int(qo_h[cut])
        self._planned_cap = self._wrapper._logits_soft_cap

    def run(
        self,
        q: torch.Tensor,
        kv_cache,
        out: Optional[torch.Tensor] = None,
        lse: Optional[torch.Tensor] = None,
        logits_soft_cap: Optional[float] = 0.0,
        profiler_buffer: Optional[torch.Tensor] = None,
        *,
        k_scale: Optional[float] = None,
        v_scale: Optional[float] = None,
        kv_cache_sf=None,
        variant_args: Sequence = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of the planned batch.

        Args:
            q: ``[qo_indptr[-1], num_qo_heads, head_dim_qk]`` in the planned q dtype, unit last stride.
            kv_cache: ``[pages, 2, page_size, num_kv_heads, head_dim]`` (NHD; HND swaps page_size and heads), or
                a ``(k_cache, v_cache)`` tuple of ``[pages, page_size, heads, dim]`` views (head_dim_vo for v).
            out: optional ``[qo_indptr[-1], num_qo_heads, head_dim_vo]`` in q's dtype, written and returned.
            lse: optional float32 ``[qo_indptr[-1], num_qo_heads]``, written and returned.
            logits_soft_cap: 0 (or None): the planned cap; > 0: must equal the planned cap (the cap is fixed at
                plan time; ValueError when none was planned, as upstream, or a different one is given).
            profiler_buffer: only None (plan() refuses the profiler).
            k_scale, v_scale: fp8 calibration scales (k's folds into sm_scale; v's multiplies the output).
            kv_cache_sf: NVFP4 scale factors; only None.
            variant_args: (flashtile extension, keyword) the extra arguments of the ``jit_args`` variant,
                tensors first then scalars, in its declaration order.

        Returns:
            ``(out, lse)``; lse is base 2 (``log2(sum(exp(s)))``); rows that see no key give 0 and -inf.
        """
        cap = 0.0 if logits_soft_cap is None else logits_soft_cap
        if not isinstance(cap, (int, float)) or isinstance(cap, bool):
            raise TypeError(f"logits_soft_cap: expected a float, got {describe(cap)}")
        if cap > 0.0 and self._planned_cap <= 0.0:
            raise ValueError("logits_soft_cap: used in run() but not provided in plan(); plan with "
                             f"logits_soft_cap={cap}")
        if cap > 0.0 and cap != self._planned_cap:
            raise ValueError(f"logits_soft_cap: run() got {cap}, plan() was given {self._planned_cap}; re-plan to "
                             "change it")
        if profiler_buffer is not None:
            check_tensor("profiler_buffer", profiler_buffer)
            raise NotImplementedError("profiler_buffer: flashtile's kernels record no in-kernel profile")
        if self._split_row is None:
            result = self._wrapper.run(q, kv_cache, *variant_args, out=out, lse=lse, return_lse=True,
                                       k_scale=k_scale, v_scale=v_scale, kv_cache_sf=kv_cache_sf)
            return result[0], result[1]
        return self._run_parts(q, kv_cache, out, lse, k_scale, v_scale, kv_cache_sf, tuple(variant_args))

    def _run_parts(self, q, kv_cache, out, lse, k_scale, v_scale, kv_cache_sf,
                   variant_args: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """run() of a plan split into two row classes: both parts write their rows of one ``out`` / ``lse``."""
        assert self._second is not None and self._split_row is not None
        first, second = self._wrapper._require_plan(), self._second._require_plan()
        total = first.total_qo + second.total_qo
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q: expected a torch.Tensor, got {describe(q)}")
        if q.dim() != 3 or q.shape[0] != total:
            raise ValueError(f"q: expected shape [qo_indptr[-1], num_qo_heads, head_dim_qk] with qo_indptr[-1] = "
                             f"{total} as planned, got {list(q.shape)}")
        shape = (total, first.num_qo_heads, first.head_dim_vo)
        out, lse = self._wrapper._outputs(shape, first.o_dtype, out, lse)
        r = self._split_row
        for wrapper, rows in ((self._wrapper, slice(0, r)), (self._second, slice(r, total))):
            wrapper.run(q[rows], kv_cache, *variant_args, out=out[rows], lse=lse[rows], return_lse=True,
                        k_scale=k_scale, v_scale=v_scale, kv_cache_sf=kv_cache_sf)
        return out, lse


def _row_class_cut(qo_indptr, group: int) -> Optional[int]:
    """The request index where a batch's small-row requests (<= SMALL_ROWS GQA-packed rows) and large-row
    requests meet, when each class is one contiguous run and both are present; else None."""
    try:
        qo = host_int64(as_index_tensor("qo_indptr", qo_indptr))
    except (TypeError, ValueError):
        return None  # the single plan reports it
    if qo.size < 3 or qo[0] != 0 or (qo[1:] < qo[:-1]).any():
        return None
    small = (qo[1:] - qo[:-1]) * group <= SMALL_ROWS
    changes = np.flatnonzero(small[1:] != small[:-1])
    return int(changes[0]) + 1 if changes.size == 1 else None
