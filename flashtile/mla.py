"""DeepSeek multi-head latent attention (MLA): ``flashtile.mla.BatchMLAPagedAttentionWrapper``, FlashInfer
v0.3.1's signatures (docs/mla.md).

With the up-projections absorbed into the query, MLA attends every head to one shared paged latent
cache: keys are ``[ckv | kpe]`` (``head_dim_ckv`` + ``head_dim_kpe`` wide), values are ``ckv``. The math
is stated in flashtile/reference/mla.py; the kernels are flashtile/kernels/mla.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ._core import mla_tiles, ops_mla
from ._core.buffers import discarded_output
from ._core.checks import FP8_DTYPES, HALF_DTYPES, check_tensor, describe, parse_dtype
from ._core.dispatch import implementation
from ._core.host_arrays import host_int64
from ._core.mla_tiles import MlaMeta, mla_launch_facts
from ._core.paged_kv import as_index_tensor
from ._core.wrapper import PlanRunWrapper, as_given, check_positive_int, run_key, variant_replay_args
from .scheduler.mla_work import min_mla_chunk, plan_mla_work

__all__ = ["BatchMLAPagedAttentionWrapper", "MLA_HEAD_DIMS_CKV", "MLA_HEAD_DIMS_KPE", "MlaMeta"]

# What the kernel handles: each dim is a whole tensor-core tile dimension (a power of two).
MLA_HEAD_DIMS_CKV = (16, 32, 64, 128, 256, 512)
MLA_HEAD_DIMS_KPE = (16, 32, 64)
_KV_DTYPES = HALF_DTYPES + tuple(d for d in FP8_DTYPES if d == getattr(torch, "float8_e4m3fn", None))


@dataclass
class _MlaPlan:
    q_dtype: torch.dtype
    kv_dtype: torch.dtype
    num_heads: int
    head_dim_ckv: int
    head_dim_kpe: int
    page_size: int
    causal: bool
    sm_scale: float
    batch_size: int
    nnz_q: int
    max_page_id: int
    meta: MlaMeta
    owned_storage: frozenset = frozenset()  # the plan's device tensors, which run()'s replays bake in
    replays: dict = field(default_factory=dict)  # run()'s memo: input key -> runner


def _int32_host(name: str, x, length: Optional[int] = None) -> np.ndarray:
    """An index array of plan(): int32 (upstream's contract), 1-D; its values on the host."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a 1-D int32 torch.Tensor, got {describe(x)}")
    if x.dtype != torch.int32:
        raise ValueError(f"Expected {name}.dtype == torch.int32, got {x.dtype}")
    as_index_tensor(name, x, length=length)
    return host_int64(x)


class BatchMLAPagedAttentionWrapper(PlanRunWrapper):
    """Batched MLA over a paged latent cache: decode (one query token per request), speculative
    append (a few tokens) and chunked prefill, causal bottom-right aligned.

    Args:
        float_workspace_buffer: a device buffer (128 MiB recommended) holding split-KV partial states.
        use_cuda_graph: fixed-size mode for CUDA-graph capture: plan() copies its index arrays into the
            four buffers below (fixed batch size ``kv_len_arr.numel()``), and run() launches a grid whose
            size does not depend on the lengths, so a captured run replays correctly after a re-plan.
        qo_indptr: graph mode: int32 ``[B + 1]`` device buffer for plan()'s qo_indptr.
        kv_indptr: graph mode: int32 ``[B + 1]`` device buffer for plan()'s kv_indptr.
        kv_indices: graph mode: int32 device buffer with room for the largest page list.
        kv_len_arr: graph mode: int32 ``[B]`` device buffer for plan()'s kv_len_arr.
        backend: "auto", "fa2", "fa3" (flashtile's kernels), "triton" or "reference"; "cutlass" raises
            NotImplementedError.
        jit_args: an attention variant (flashtile extension; docs/variants.md): a
            :class:`flashtile.AttentionVariant` or upstream's jit_args tuple holding one. Its hooks see MLA
            as one KV head with keys ``[ckv | kpe]``; run() takes its extra arguments as ``variant_args``.
    """

    # An MLA plan holds no AttentionParams (no RoPE, window or soft cap): it is not a PlanBase, and the
    # properties below replace the base class's readers of one.
    _plan: Optional[_MlaPlan]  # type: ignore[assignment]

    def __init__(self, float_workspace_buffer: torch.Tensor, use_cuda_graph: bool = False,
                 qo_indptr: Optional[torch.Tensor] = None, kv_indptr: Optional[torch.Tensor] = None,
                 kv_indices: Optional[torch.Tensor] = None, kv_len_arr: Optional[torch.Tensor] = None,
                 backend: str = "auto", jit_args=None) -> None:
        super().__init__(float_workspace_buffer, "NHD", use_cuda_graph, backend, jit_args)
        if self._jit_variant is not None and self._jit_variant.query_transform is not None:
            raise NotImplementedError(f"jit_args: variant {self._jit_variant.name!r} has a query_transform, which MLA "
                                      "does not support (its query is two tiles); transform q_nope / q_pe before run()")
        self._token_capacity: Optional[int] = None
        if self._use_cuda_graph:
            for name, buf in (("qo_indptr", qo_indptr), ("kv_indptr", kv_indptr), ("kv_indices", kv_indices),
                              ("kv_len_arr", kv_len_arr)):
                if not isinstance(buf, torch.Tensor):
                    raise ValueError(f"{name} should be a torch.Tensor in cudagraph mode, got {describe(buf)}")
                if buf.dtype != torch.int32 or buf.device != self.device or buf.dim() != 1:
                    raise ValueError(f"{name}: expected a 1-D int32 tensor on {self.device} in cudagraph mode, "
                                     f"got {describe(buf)}")
            assert qo_indptr is not None and kv_indptr is not None and kv_len_arr is not None  # checked above
            self._fixed_batch_size = kv_len_arr.numel()
            for name, buf in (("qo_indptr", qo_indptr), ("kv_indptr", kv_indptr)):
                if buf.numel() != self._fixed_batch_size + 1:
                    raise ValueError(f"{name}: expected batch_size + 1 = {self._fixed_batch_size + 1} entries "
                                     f"(batch size from kv_len_arr), got {buf.numel()}")
        self._qo_indptr_buf = qo_indptr
        self._kv_indptr_buf = kv_indptr
        self._kv_indices_buf = kv_indices
        self._kv_len_arr_buf = kv_len_arr

    @property
    def _causal(self) -> bool:
        return self._plan.causal if self._plan is not None else False

    @property
    def _sm_scale(self) -> Optional[float]:
        return self._plan.sm_scale if self._plan is not None else None

    @property
    def _window_left(self) -> int:
        return -1

    @property
    def _logits_soft_cap(self) -> float:
        return 0.0

    def plan(self, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
             kv_len_arr: torch.Tensor, num_heads: int, head_dim_ckv: int, head_dim_kpe: int, page_size: int,
             causal: bool, sm_scale: float, q_data_type: Union[str, torch.dtype],
             kv_data_type: Union[str, torch.dtype], use_profiler: bool = False, *,
             fixed_split_size: Optional[int] = None, disable_split_kv: bool = False,
             non_blocking: bool = True) -> None:
        """Plan a batch: read the lengths, cut the KV into chunks, copy the work list.

        Args:
            qo_indptr: int32 ``[B + 1]`` (host or device): request ``b``'s query tokens are rows
                ``qo_indptr[b]:qo_indptr[b + 1]`` of run()'s q (decode: ``arange(B + 1)``).
            kv_indptr: int32 ``[B + 1]``, in pages: request ``b`` owns page ids
                ``kv_indices[kv_indptr[b]:kv_indptr[b + 1]]`` (``kv_indptr[0]`` may be > 0).
            kv_indices: int32 page ids into run()'s caches (may be longer than needed).
            kv_len_arr: int32 ``[B]``, KV tokens of each request (<= its pages x page_size; 0: the
                request's outputs are 0 and its lse -inf).
            num_heads: query heads (any number >= 1).
            head_dim_ckv: latent width, one of 16, 32, ..., 512 (DeepSeek: 512).
            head_dim_kpe: RoPE key width, 16, 32 or 64 (DeepSeek: 64).
            page_size: tokens per page (any value >= 1; SGLang uses 1, FlashMLA 64).
            causal: bottom-right aligned causal mask (query ``t`` of ``qo_len`` sits at ``kv_len - qo_len + t``).
            sm_scale: scale of the logits (DeepSeek: ``1 / sqrt(128 + 64)``).
            q_data_type: float16 or bfloat16. kv_data_type: q's dtype or float8_e4m3fn (then run()
                takes ``ckv_scale`` / ``kpe_scale``).
            use_profiler: must be False (upstream's kernel profiler).
            fixed_split_size: KV chunk in tokens (deterministic: a request's bits do not depend on the
                rest of the batch); None or -1: chosen to fill the GPU. disable_split_kv: one chunk.
            non_blocking: copy the work list to the device asynchronously.
        """
        if use_profiler:
            raise NotImplementedError("use_profiler: FlashInfer's kernel profiler has no flashtile counterpart")
        check_positive_int("num_heads", num_heads)
        check_positive_int("page_size", page_size)
        if head_dim_ckv not in MLA_HEAD_DIMS_CKV:
            raise NotImplementedError(f"head_dim_ckv: MLA supports {MLA_HEAD_DIMS_CKV}, got {head_dim_ckv!r}")
        if head_dim_kpe not in MLA_HEAD_DIMS_KPE:
            raise NotImplementedError(f"head_dim_kpe: MLA supports {MLA_HEAD_DIMS_KPE}, got {head_dim_kpe!r}")
        if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float)) or not sm_scale > 0:
            raise ValueError(f"sm_scale: expected a positive float, got {sm_scale!r}")
        q_dtype = parse_dtype("q_data_type", q_data_type)
        if q_dtype not in HALF_DTYPES:
            raise TypeError(f"q_data_type: expected float16 or bfloat16, got {q_dtype}")
        kv_dtype = parse_dtype("kv_data_type", kv_data_type)
        if kv_dtype not in _KV_DTYPES:
            raise TypeError(f"kv_data_type: expected float16, bfloat16 or float8_e4m3fn, got {kv_dtype}")
        if kv_dtype in HALF_DTYPES and kv_dtype != q_dtype:
            raise TypeError(f"kv_data_type: {kv_dtype} with q_data_type {q_dtype}: a half-precision latent cache "
                            "must have q's dtype (or be float8_e4m3fn)")
        fixed_split_size, disable_split_kv = self._split_options(fixed_split_size, disable_split_kv)

        qo = _int32_host("qo_indptr", qo_indptr)
        batch = qo.size - 1
        if batch < 0:
            raise ValueError("qo_indptr: expected at least one entry")
        kvp = _int32_host("kv_indptr", kv_indptr, batch + 1)
        lens = _int32_host("kv_len_arr", kv_len_arr, batch)
        if not isinstance(kv_indices, torch.Tensor) or kv_indices.dtype != torch.int32:
            raise ValueError(f"Expected kv_indices.dtype == torch.int32, got {describe(kv_indices)}")
        as_index_tensor("kv_indices", kv_indices)
        if batch and (np.any(np.diff(qo) < 0) or qo[0] != 0):
            raise ValueError("qo_indptr: expected non-decreasing offsets starting at 0")
        if batch and np.any(np.diff(kvp) < 0):
            raise ValueError("kv_indptr: expected non-decreasing offsets")
        if batch and kvp[-1] > kv_indices.numel():
            raise ValueError(f"kv_indptr: its last entry {int(kvp[-1])} exceeds kv_indices' {kv_indices.numel()} ids")
        if np.any(lens < 0):
            raise ValueError("kv_len_arr: expected lengths >= 0")
        pages = np.diff(kvp)
        if np.any(lens > pages * page_size):
            b = int(np.argmax(lens > pages * page_size))
            raise ValueError(f"kv_len_arr: request {b} has {int(lens[b])} tokens but only {int(pages[b])} pages of "
                             f"{page_size}")
        max_page_id = -1  # the largest page id used, when kv_indices is on the host (run() checks the cache)
        if kv_indices.device.type == "cpu" and batch:
            ids = host_int64(kv_indices)[int(kvp[0]):int(kvp[-1])]
            if ids.size and ids.min() < 0:
                raise ValueError("kv_indices: page ids must be >= 0")
            max_page_id = int(ids.max()) if ids.size else -1
        self._check_graph_batch(batch)

        nnz_q = int(qo[-1]) if batch else 0
        if self._use_cuda_graph:
            if self._token_capacity is None:
                self._token_capacity = nnz_q
            if nnz_q > self._token_capacity:
                raise ValueError(f"The total number of rows in qo_indptr {nnz_q} cannot exceed the "
                                 f"{self._token_capacity} of the first plan in cudagraph mode")
            token_capacity = self._token_capacity
        else:
            token_capacity = nnz_q

        kernels = implementation("mla", self.device, self._backend)
        compiled = not kernels.__name__.startswith("flashtile.reference")
        max_rows = int((np.diff(qo) * num_heads).max()) if batch else 1
        block_m, config, align, sms = mla_launch_facts(self.device, compiled, max_rows, head_dim_ckv)
        min_chunk = min_mla_chunk(max_rows, head_dim_ckv, head_dim_kpe, kv_dtype.itemsize, align) if compiled else 0
        # Partial states live in the float workspace: lse values first, for as many rows as it can hold.
        capacity = self._float_workspace_buffer.numel() * self._float_workspace_buffer.element_size() \
            // (4 * (head_dim_ckv + 1))
        work = plan_mla_work(qo, lens, num_heads, block_m, sms, align, token_capacity=token_capacity,
                             fixed_chunk=fixed_split_size, disable_split=disable_split_kv, min_chunk=min_chunk,
                             max_partial_rows=capacity,
                             programs_per_sm=mla_tiles.MLA_PROGRAMS_PER_SM if compiled else None)
        host = torch.from_numpy(work.packed)
        if self.device.type == "cuda":
            host = host.pin_memory()
        worklist = self._upload_worklist(host, non_blocking)

        if self._use_cuda_graph:
            d_qo, d_kvp, d_idx, d_len = (self._qo_indptr_buf, self._kv_indptr_buf, self._kv_indices_buf,
                                         self._kv_len_arr_buf)
            # the constructor requires the four buffers in graph mode
            assert d_qo is not None and d_kvp is not None and d_idx is not None and d_len is not None
            used = int(kvp[-1] - kvp[0]) if batch else 0
            if used > d_idx.numel():
                raise ValueError(f"The size of indices should be less than or equal to the allocated buffer: need "
                                 f"{used} page ids, kv_indices has {d_idx.numel()}")
            first = int(kvp[0]) if batch else 0
            d_qo.copy_(qo_indptr, non_blocking=non_blocking)
            d_kvp.copy_(torch.from_numpy((kvp - first).astype(np.int32)), non_blocking=non_blocking)
            d_idx[:used].copy_(kv_indices[first:first + used], non_blocking=non_blocking)
            d_len.copy_(kv_len_arr, non_blocking=non_blocking)
        else:
            d_qo = qo_indptr.to(self.device, non_blocking=non_blocking)
            d_kvp = kv_indptr.to(self.device, non_blocking=non_blocking)
            d_idx = kv_indices.to(self.device, non_blocking=non_blocking)
            d_len = kv_len_arr.to(self.device, non_blocking=non_blocking)

        # The partial states' offsets do not depend on the plan (a captured graph keeps the addresses).
        if work.partial_rows > capacity:
            raise ValueError(f"float_workspace_buffer: fixed_split_size={fixed_split_size} needs "
                             f"{4 * work.partial_rows * (head_dim_ckv + 1)} bytes of split-KV partial state; pass a "
                             "larger buffer (128 MiB is recommended) or a larger fixed_split_size")
        part_lse, part_o = self._workspace_tensors(self._float_workspace_buffer, "float_workspace_buffer",
                                                   torch.float32, (capacity,), (capacity, head_dim_ckv))
        meta = MlaMeta(
            qo_indptr=d_qo, kv_indptr=d_kvp, kv_indices=d_idx, kv_len=d_len, work=worklist,
            req_offset=work.req_offset, token_offset=work.token_offset, item_offset=work.item_offset,
            num_items=work.num_items, max_splits=work.max_splits,
            part_o=part_o, part_lse=part_lse,
            config=config, graph=self._use_cuda_graph,
        )
        self._plan = _MlaPlan(q_dtype=q_dtype, kv_dtype=kv_dtype, num_heads=num_heads, head_dim_ckv=head_dim_ckv,
                              head_dim_kpe=head_dim_kpe, page_size=page_size, causal=bool(causal),
                              sm_scale=float(sm_scale), batch_size=batch, nnz_q=nnz_q,
                              max_page_id=max_page_id, meta=meta,
                              owned_storage=self._owned_storage(d_qo, d_kvp, d_idx, d_len, worklist, part_o, part_lse))

    def run(self, q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
            out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None, return_lse: bool = False,
            profiler_buffer: Optional[torch.Tensor] = None, kv_len: Optional[torch.Tensor] = None,
            page_table: Optional[torch.Tensor] = None, *, ckv_scale: float = 1.0, kpe_scale: float = 1.0,
            return_lse_base_on_e: bool = False, variant_args: Sequence = (), sinks: Optional[torch.Tensor] = None):
        """Attention of the planned batch.

        Args:
            q_nope: ``[nnz_q, num_heads, head_dim_ckv]``, q_data_type, last dim contiguous (the
                absorbed query; may be a strided view).
            q_pe: ``[nnz_q, num_heads, head_dim_kpe]``, q_data_type, last dim contiguous.
            ckv_cache: ``[num_pages, page_size, head_dim_ckv]``, kv_data_type, last dim contiguous (a
                slice of one ``[num_pages, page_size, ckv + kpe]`` tensor works).
            kpe_cache: ``[num_pages, page_size, head_dim_kpe]``, kv_data_type, last dim contiguous.
            out: optional ``[nnz_q, num_heads, head_dim_ckv]`` of q's dtype, written and returned.
            lse: optional ``[nnz_q, num_heads]`` float32, base-2 log-sum-exp, written.
            return_lse: return ``(out, lse)``.
            profiler_buffer, kv_len, page_table: upstream's profiler and cutlass backend; must be None.
            ckv_scale, kpe_scale: dequantization scales of a float8 cache (the stored value times the
                scale is the latent); 1.0 for half-precision caches.
            return_lse_base_on_e: must be False (flashtile's LSE is base 2).
            variant_args: the extra tensors and scalars of the ``jit_args`` variant, in its declaration
                order (flashtile extension: upstream's run() has no place for them).
            sinks: optional float ``[num_heads]`` per-head sink logits (natural units) joining each row's
                softmax denominator (the built-in sink variant, as on the other wrappers).

        Rows of q past ``qo_indptr[-1]`` are left unwritten.

        A run() whose inputs have the shapes, strides, dtypes and alignment (and scales and options) of an
        earlier run() of the same plan replays that run's launches (its checks passed for exactly those).
        """
        plan = self._plan
        key = variant = None
        variant_args = tuple(variant_args)
        if plan is not None and not torch.compiler.is_compiling():
            if variant_args or sinks is not None:
                variant = self._mla_variant(plan, variant_args, sinks)
            key = run_key((q_nope, q_pe, ckv_cache, kpe_cache, out, lse),
                          (return_lse, ckv_scale, kpe_scale, return_lse_base_on_e, profiler_buffer, kv_len,
                           page_table), variant)
            if key is not None:
                replay = plan.replays.get(key)
                if replay is not None:
                    return replay((q_nope, q_pe, ckv_cache, kpe_cache), out, lse, return_lse, variant)
        plan = self._require_plan()
        for name, value in (("profiler_buffer", profiler_buffer), ("kv_len", kv_len), ("page_table", page_table)):
            if value is not None:
                raise NotImplementedError(f"{name}: only used by upstream's profiler / cutlass backend; pass None")
        if return_lse_base_on_e:
            raise NotImplementedError("return_lse_base_on_e: flashtile returns a base-2 lse")
        H, dc, dp = plan.num_heads, plan.head_dim_ckv, plan.head_dim_kpe
        check_tensor("q_nope", q_nope, ndim=3, device=self.device, last_dim_contiguous=True)
        nnz = q_nope.shape[0]
        check_tensor("q_nope", q_nope, shape=(nnz, H, dc), last_dim_contiguous=True)
        check_tensor("q_pe", q_pe, shape=(nnz, H, dp), device=self.device, last_dim_contiguous=True)
        for name, x in (("q_nope", q_nope), ("q_pe", q_pe)):
            if x.dtype != plan.q_dtype:
                raise TypeError(f"{name}: expected dtype {plan.q_dtype} (plan's q_data_type), got {x.dtype}")
        if nnz < plan.nnz_q:
            raise ValueError(f"q_nope: the plan has {plan.nnz_q} query tokens, q_nope has {nnz}")
        check_tensor("ckv_cache", ckv_cache, ndim=3, device=self.device, last_dim_contiguous=True)
        check_tensor("ckv_cache", ckv_cache, shape=(None, plan.page_size, dc))
        check_tensor("kpe_cache", kpe_cache, shape=(ckv_cache.shape[0], plan.page_size, dp), device=self.device,
                     last_dim_contiguous=True)
        if plan.max_page_id >= ckv_cache.shape[0]:
            raise ValueError(f"ckv_cache: the plan's page table uses page {plan.max_page_id}, the cache has "
                             f"{ckv_cache.shape[0]} pages")
        for name, x in (("ckv_cache", ckv_cache), ("kpe_cache", kpe_cache)):
            if x.dtype != plan.kv_dtype:
                raise TypeError(f"{name}: expected dtype {plan.kv_dtype} (plan's kv_data_type), got {x.dtype}")
        for name, scale in (("ckv_scale", ckv_scale), ("kpe_scale", kpe_scale)):
            if isinstance(scale, bool) or not isinstance(scale, (int, float)):
                raise TypeError(f"{name}: expected a float, got {describe(scale)}")
        if variant is None:
            variant = self._mla_variant(plan, variant_args, sinks)
        if lse is None and not return_lse:  # an lse nobody reads: a reused scratch view, no allocation
            lse = discarded_output((nnz, H), torch.float32, self.device)
        out, lse_out = self._outputs((nnz, H, dc), plan.q_dtype, out, lse)

        def launch() -> None:
            ops_mla.call_mla_paged(q_nope, q_pe, ckv_cache, kpe_cache, plan.meta, out, lse_out,
                                   sm_scale=plan.sm_scale, ckv_scale=float(ckv_scale), kpe_scale=float(kpe_scale),
                                   causal=plan.causal, backend=self._backend, variant=variant)

        replay = self._launch_recorded(plan, key, (q_nope, q_pe, ckv_cache, kpe_cache, out, lse_out,
                                                   *variant_replay_args(variant)), launch)
        if replay is not None:
            plan.replays[key] = self._replay_runner(replay, as_given, (nnz, H, dc), plan.q_dtype, self.device)
        return (out, lse_out) if return_lse else out

    def _mla_variant(self, plan: _MlaPlan, variant_args: tuple, sinks):
        """The call's bound variant (the ``jit_args`` variant with ``variant_args``, or the sink variant), or
        None; MLA rows are MQA rows over one latent head of ``ckv + kpe`` columns."""
        return self._bound_variant(variant_args, sinks, lambda: dict(
            num_qo_heads=plan.num_heads, num_kv_heads=1, batch_size=plan.batch_size,
            head_dim=plan.head_dim_ckv + plan.head_dim_kpe))

