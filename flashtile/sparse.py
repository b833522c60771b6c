"""Block-sparse and vector-sparse attention (``flashinfer.sparse``).

:class:`BlockSparseAttentionWrapper` takes a block-sparse (BSR) mask of ``R x C`` blocks over ``M``
queries and ``N`` keys, down to vector sparsity (``C = 1``); :class:`VariableBlockSparseAttentionWrapper`
takes one pattern per KV head with variable block sizes. Both run as batch prefill over a paged KV
cache (scheduler/block_sparse.py maps the pattern to requests and pages; the K/V tensors are viewed as
pages without a copy), so they share its kernels, work list, reference path and variants.

Positions are global (docs/sparse.md): query row ``i`` sits at position ``i``, key ``j`` at ``j``;
``causal`` means ``j <= i`` and RoPE rotates q and k by those positions.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch

from ._core.attention_args import POS_ENCODING_MODES
from ._core.checks import check_option, check_tensor, describe
from ._core.wrapper import check_heads
from .prefill import BatchPrefillWithPagedKVCacheWrapper
from .rope import apply_rope_pos_ids
from .scheduler.block_sparse import bsr_requests, variable_requests

__all__ = ["BlockSparseAttentionWrapper", "VariableBlockSparseAttentionWrapper"]


def _check_pos_encoding(pos_encoding_mode: str) -> bool:
    """Whether q and k are rotated (RoPE, applied before the kernel with global positions)."""
    check_option("pos_encoding_mode", pos_encoding_mode, POS_ENCODING_MODES)
    if pos_encoding_mode == "ALIBI":
        raise NotImplementedError("pos_encoding_mode: 'ALIBI' is not supported by flashtile's sparse attention "
                                  "(its bias depends on global positions, which the paged kernel does not see)")
    return pos_encoding_mode == "ROPE_LLAMA"


def _rotate(x: torch.Tensor, positions: torch.Tensor, rope: tuple) -> torch.Tensor:
    """``x [tokens, heads, D]`` rotated (RoPE, half-split pairs) by ``positions``, a new tensor."""
    rotated, _ = apply_rope_pos_ids(x, x[:, :1], positions, rope_scale=rope[0], rope_theta=rope[1])
    return rotated


def _rope_params(rope_scale, rope_theta) -> tuple:
    return (1.0 if rope_scale is None else float(rope_scale), 1e4 if rope_theta is None else float(rope_theta))


def _scale(name: str, value) -> Optional[float]:
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    raise NotImplementedError(f"{name}: per-head scale tensors (upstream's fp8 q/k/v path) are not supported; "
                              f"pass a float or None, got {describe(value)}")


class _SparseBase:
    """The paged prefill wrapper that computes the attention, and the shared plan()/run() steps."""

    def __init__(self, float_workspace_buffer: torch.Tensor, backend: str, jit_args=None) -> None:
        self._prefill = BatchPrefillWithPagedKVCacheWrapper(float_workspace_buffer, "NHD", backend=backend,
                                                            jit_args=jit_args)
        self.device = self._prefill.device
        self._plan_args: Optional[dict] = None
        self._rope: Optional[tuple] = None
        self._positions: tuple = ()  # (query positions, key positions) for RoPE, device int32
        self._page_size = 1

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor,
                               int_workspace_buffer: Optional[torch.Tensor] = None,
                               vector_sparse_indices_buffer: Optional[torch.Tensor] = None,
                               vector_sparse_indptr_buffer: Optional[torch.Tensor] = None) -> None:
        """Swap the workspaces (re-plan afterwards); upstream's vector-sparse buffers are accepted, unused."""
        self._prefill.reset_workspace_buffer(float_workspace_buffer, int_workspace_buffer)
        self._plan_args = None

    def end_forward(self) -> None:
        """Deprecated upstream alias; nothing to release."""

    @property
    def is_cuda_graph_enabled(self) -> bool:
        return False

    # Attributes engines read from wrappers (upstream's names).
    @property
    def _causal(self) -> bool:
        return bool(self._plan_args and self._plan_args["causal"])

    @property
    def _sm_scale(self) -> Optional[float]:
        return self._prefill._sm_scale

    @property
    def _logits_soft_cap(self) -> float:
        return self._prefill._logits_soft_cap

    def _require_plan(self) -> dict:
        if self._plan_args is None:
            raise RuntimeError("run() called before plan(): call plan() with the sparse pattern first")
        return self._plan_args

    def _plan_prefill(self, requests, num_qo_heads, num_kv_heads, head_dim, rope, positions, *, use_fp16_qk_reduction,
                      logits_soft_cap, sm_scale, rope_scale, rope_theta, q_data_type, kv_data_type, o_data_type,
                      non_blocking) -> None:
        qo_indptr, kv_indptr, kv_indices, last_page_len = requests.tensors()
        self._prefill.plan(
            qo_indptr, kv_indptr, kv_indices, last_page_len, num_qo_heads, num_kv_heads, head_dim,
            requests.page_size, packed_custom_mask=requests.packed_mask, causal=requests.causal,
            use_fp16_qk_reduction=use_fp16_qk_reduction, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap,
            rope_scale=rope_scale, rope_theta=rope_theta, q_data_type=q_data_type, kv_data_type=kv_data_type,
            o_data_type=o_data_type, non_blocking=non_blocking)
        self._page_size = requests.page_size  # rows of K/V per page (C, or more where runs were merged)
        self._rope = _rope_params(rope_scale, rope_theta) if rope else None
        self._positions = tuple(torch.arange(n, dtype=torch.int32, device=self.device) for n in positions) \
            if rope else ()

    def _check_kv(self, name: str, x, shape: tuple, dtype) -> None:
        check_tensor(name, x, device=self.device)
        if tuple(x.shape) != shape:
            raise ValueError(f"{name}: expected shape {list(shape)} as planned, got {list(x.shape)}")
        if x.dtype != dtype:
            raise ValueError(f"The dtype of {name} {x.dtype} does not match the kv_data_type {dtype} specified in "
                             "plan function.")

    def _replan_for_forward(self, **overrides) -> None:
        """The deprecated forward()'s attention parameters replace the planned ones (upstream semantics)."""
        args = dict(self._require_plan())
        changed = {k: v for k, v in overrides.items() if args.get(k) != v}
        if changed:
            self.plan(**{**args, **changed})

    def run_return_lse(self, *args, **kwargs):
        """``run(..., return_lse=True)`` (upstream alias)."""
        return self.run(*args, return_lse=True, **kwargs)

    def forward_return_lse(self, *args, **kwargs):
        """Deprecated upstream form of ``run(..., return_lse=True)``."""
        return self.forward(*args, return_lse=True, **kwargs)

    plan: Callable[..., None]  # each wrapper's own signature
    run: Callable[..., Any]
    forward: Callable[..., Any]


class BlockSparseAttentionWrapper(_SparseBase):
    """Attention under a block-sparse mask: an ``M x N`` BSR matrix of ``R x C`` blocks (scipy's
    ``bsr_matrix`` layout) says which query rows see which keys; an optional element mask refines the
    listed blocks. Equivalent to dense attention with the mask expanded to ``[M, N]``.

    Each block row is one request of batch prefill over a paged cache with page size ``C`` (K/V
    ``[N, H, D]`` viewed as ``N / C`` pages, no copy), so any ``R`` and ``C`` work, vector sparsity
    (``C = 1``) included, on the Triton kernels and the reference path alike.

    Args:
        float_workspace_buffer: a device tensor (any dtype) for partial states of split tiles; 128 MiB is
            plenty. Its device is the wrapper's device.
        backend: "auto", "fa2", "fa3" (flashtile's kernels), "triton" (forced, under the interpreter on CPU)
            or "reference"; vendor backends raise NotImplementedError.
        jit_args: an attention variant (flashtile/variants.py; upstream's jit_args tuple or an
            AttentionVariant), as batch prefill takes it. Its hooks see each block row as a request
            (``qo_idx`` within the block row, ``kv_idx`` within the row's gathered blocks).

    Attributes ``M, N, R, C`` are set by plan().
    """

    def __init__(self, float_workspace_buffer: torch.Tensor, backend: str = "auto", jit_args=None) -> None:
        super().__init__(float_workspace_buffer, backend, jit_args)
        self.M: Optional[int] = None
        self.N: Optional[int] = None
        self.R: Optional[int] = None
        self.C: Optional[int] = None

    def plan(
        self,
        indptr: torch.Tensor,
        indices: torch.Tensor,
        M: int,
        N: int,
        R: int,
        C: int,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        mask: Optional[torch.Tensor] = None,
        packed_mask: Optional[torch.Tensor] = None,
        causal: bool = False,
        pos_encoding_mode: str = "NONE",
        use_fp16_qk_reduction: bool = False,
        logits_soft_cap: Optional[float] = None,
        sm_scale: Optional[float] = None,
        rope_scale: Optional[float] = None,
        rope_theta: Optional[float] = None,
        q_data_type: Union[str, torch.dtype] = "float16",
        kv_data_type: Optional[Union[str, torch.dtype]] = None,
        o_data_type: Optional[Union[str, torch.dtype]] = None,
        non_blocking: bool = True,
        block_mask: Optional[torch.Tensor] = None,
    ) -> None:
        """Plan attention under a BSR mask: validate it, map it to requests, schedule.

        Args:
            indptr: int32 (or int64) ``[MB + 1]`` with ``MB = ceil(M / R)``, non-decreasing, CPU or device:
                block row ``b`` lists the blocks ``indptr[b]:indptr[b + 1]`` of ``indices``.
            indices: int32 (or int64) ``[nnz]``: block-column ids in ``[0, N / C)``, none repeated in a row.
            M: query rows (q has M rows); block row ``b`` holds rows ``[b * R, min((b + 1) * R, M))``.
            N: keys (k and v have N rows), a multiple of ``C``.
            R, C: block height (queries) and width (keys); ``C = 1`` is vector sparsity.
            num_qo_heads, num_kv_heads: heads of q and of k/v (GQA: any multiple).
            head_dim: of q, k and v (a multiple of 8 up to 256).
            mask: bool ``[nnz, R, C]`` (the BSR data array) or None: which elements of each listed block
                attend (rows past M in the last block row are ignored). Replaces ``causal``.
            packed_mask: uint8 1-D, the element masks already packed in the paged prefill layout (block row
                ``b``'s ``[rows_b, nnz_b * C]`` mask row-major, LSB first, each block row from a byte
                boundary: ``segment_packbits`` of upstream's ``convert_bsr_mask_layout``); wins over mask.
            causal: key ``j`` is visible to query row ``i`` only when ``j <= i`` (global positions; not
                bottom-right aligned per block row). Ignored with a mask (as upstream).
            pos_encoding_mode: "NONE" or "ROPE_LLAMA" (q and k rotated by their global positions before
                the kernel); "ALIBI" raises NotImplementedError.
            use_fp16_qk_reduction: accepted; flashtile accumulates q.k in float32.
            logits_soft_cap: ``cap * tanh(s / cap)`` when > 0. sm_scale: default ``1 / sqrt(head_dim)``.
            rope_scale, rope_theta: RoPE parameters (defaults 1 and 1e4).
            q_data_type: float16 (default, as upstream) or bfloat16; kv_data_type: default q's (fp8 allowed,
                scale through run()'s scale_k / scale_v). o_data_type: default q's (upstream 0.3.1 defaults
                to float16).
            non_blocking: asynchronous host-to-device copies.
            block_mask: upstream's per-head dense block mask (its Blackwell backends only): not supported.
        """
        if block_mask is not None:
            raise NotImplementedError("block_mask: per-head block masks are upstream's Blackwell-only backends; "
                                      "give indptr/indices, or use VariableBlockSparseAttentionWrapper")
        rope = _check_pos_encoding(pos_encoding_mode)
        requests = bsr_requests(indptr, indices, M, N, R, C, mask=mask, packed_mask=packed_mask, causal=causal)
        self._plan_prefill(requests, num_qo_heads, num_kv_heads, head_dim, rope, (M, N),
                           use_fp16_qk_reduction=use_fp16_qk_reduction, logits_soft_cap=logits_soft_cap,
                           sm_scale=sm_scale, rope_scale=rope_scale, rope_theta=rope_theta, q_data_type=q_data_type,
                           kv_data_type=kv_data_type, o_data_type=o_data_type, non_blocking=non_blocking)
        self.M, self.N, self.R, self.C = int(M), int(N), int(R), int(C)
        self._num_kv_heads, self._head_dim = num_kv_heads, head_dim
        self._plan_args = dict(
            indptr=indptr, indices=indices, M=M, N=N, R=R, C=C, num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim, mask=mask, packed_mask=packed_mask, causal=causal, pos_encoding_mode=pos_encoding_mode,
            use_fp16_qk_reduction=use_fp16_qk_reduction, logits_soft_cap=logits_soft_cap, sm_scale=sm_scale,
            rope_scale=rope_scale, rope_theta=rope_theta, q_data_type=q_data_type, kv_data_type=kv_data_type,
            o_data_type=o_data_type, non_blocking=non_blocking)

    begin_forward = plan

    def run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale_q: Optional[float] = None,
        scale_k: Optional[float] = None,
        scale_v: Optional[float] = None,
        out: Optional[torch.Tensor] = None,
        lse: Optional[torch.Tensor] = None,
        return_lse: bool = False,
        enable_pdl: Optional[bool] = None,
        sinks: Optional[torch.Tensor] = None,
        variant_args: tuple = (),
    ):
        """Attention of the planned pattern.

        Args:
            q: ``[M, num_qo_heads, head_dim]`` in the planned q dtype, unit last stride.
            k, v: ``[N, num_kv_heads, head_dim]`` (NHD) in the planned kv dtype, unit last stride; viewed as
                pages of ``C`` rows, not copied.
            scale_q, scale_k: calibration scales (floats) multiplied into sm_scale; scale_v multiplies the
                output. Upstream's per-head tensors raise NotImplementedError.
            out: optional ``[M, num_qo_heads, head_dim]`` (o_data_type), written and returned.
            lse: optional float32 ``[M, num_qo_heads]``. return_lse: also return the base-2 lse.
            enable_pdl: accepted and ignored.
            sinks: float ``[num_qo_heads]`` attention-sink logits (natural units), or None.
            variant_args: the extra arguments of the wrapper's ``jit_args`` variant, tensors first.

        Returns:
            ``out`` or ``(out, lse)``; rows that see no key give zeros and lse -inf.
        """
        self._require_plan()
        assert self.N is not None and self.C is not None  # set by plan()
        plan = self._prefill._plan
        kv_dtype = plan.kv_dtype if plan is not None else None
        shape = (self.N, self._num_kv_heads, self._head_dim)
        self._check_kv("k", k, shape, kv_dtype)
        self._check_kv("v", v, shape, kv_dtype)
        if self._rope is not None:
            check_tensor("q", q, ndim=3, device=self.device, last_dim_contiguous=True)
            q = _rotate(q, self._positions[0], self._rope)
            k = _rotate(k, self._positions[1], self._rope)
        ps = self._page_size
        pages = (k.unflatten(0, (self.N // ps, ps)), v.unflatten(0, (self.N // ps, ps)))
        return self._prefill.run(q, pages, *variant_args, q_scale=_scale("scale_q", scale_q),
                                 k_scale=_scale("scale_k", scale_k), v_scale=_scale("scale_v", scale_v), out=out,
                                 lse=lse, return_lse=return_lse, sinks=sinks)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale_q=None, scale_k=None, scale_v=None,
                pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False,
                logits_soft_cap: Optional[float] = None, sm_scale: Optional[float] = None,
                rope_scale: Optional[float] = None, rope_theta: Optional[float] = None, return_lse: bool = False):
        """Deprecated upstream form of :meth:`run`: its attention parameters replace the planned ones."""
        self._replan_for_forward(pos_encoding_mode=pos_encoding_mode, use_fp16_qk_reduction=use_fp16_qk_reduction,
                                 logits_soft_cap=logits_soft_cap, sm_scale=sm_scale, rope_scale=rope_scale,
                                 rope_theta=rope_theta)
        return self.run(q, k, v, scale_q, scale_k, scale_v, return_lse=return_lse)


class VariableBlockSparseAttentionWrapper(_SparseBase):
    """Block-sparse attention with one pattern per KV head and variable block sizes (MInference-style
    sparse prefill, video models): for KV head ``h``, the queries of its block row ``r`` see the keys of
    the column blocks ``c`` with ``block_mask_map[h, r, c]``; the query heads of a GQA group share their KV
    head's pattern.

    Each (KV head, block row) is one request of batch prefill over pages of one token; q and the output
    are regrouped (a copy) so a GQA group's heads sit side by side, k and v are viewed as pages (no copy
    when contiguous).

    Args:
        float_workspace_buffer: a device tensor for partial states (128 MiB is plenty).
        backend: as :class:`BlockSparseAttentionWrapper`.
    """

    def __init__(self, float_workspace_buffer: torch.Tensor, backend: str = "auto") -> None:
        super().__init__(float_workspace_buffer, backend)

    def plan(
        self,
        block_mask_map: torch.Tensor,
        block_row_sz: torch.Tensor,
        block_col_sz: torch.Tensor,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        causal: bool = False,
        pos_encoding_mode: str = "NONE",
        use_fp16_qk_reduction: bool = False,
        logits_soft_cap: Optional[float] = None,
        sm_scale: Optional[float] = None,
        rope_scale: Optional[float] = None,
        rope_theta: Optional[float] = None,
        non_blocking: bool = True,
        q_data_type: Union[str, torch.dtype] = "float16",
        kv_data_type: Optional[Union[str, torch.dtype]] = None,
    ) -> None:
        """Plan attention under per-KV-head variable blocks.

        Args:
            block_mask_map: bool ``[num_kv_heads, MB, NB]``: KV head ``h``'s block row ``r`` sees its column
                block ``c`` where True. CPU or device (read on the host).
            block_row_sz: int32/int64 ``[num_kv_heads, MB]``: rows of each block row (>= 0), the same total
                ``qo_len`` for every head.
            block_col_sz: int32/int64 ``[num_kv_heads, NB]``: keys of each column block (>= 0), the same
                total ``kv_len`` for every head.
            num_qo_heads, num_kv_heads: heads of q and of k/v (num_qo_heads a multiple of num_kv_heads).
            head_dim: of q, k and v (a multiple of 8 up to 256).
            causal: within a head, key ``j`` visible to query ``i`` only when ``j <= i`` (global positions).
            pos_encoding_mode: "NONE" or "ROPE_LLAMA" (global positions, applied before the kernel);
                "ALIBI" raises NotImplementedError.
            use_fp16_qk_reduction: accepted. logits_soft_cap, sm_scale, rope_scale, rope_theta: as
                :meth:`BlockSparseAttentionWrapper.plan`.
            non_blocking: asynchronous host-to-device copies.
            q_data_type: float16 (default) or bfloat16; also the output dtype. kv_data_type: default q's.
        """
        check_heads(num_qo_heads, num_kv_heads)
        rope = _check_pos_encoding(pos_encoding_mode)
        requests, qo_len, kv_len = variable_requests(block_mask_map, block_row_sz, block_col_sz, num_kv_heads,
                                                     causal=causal)
        group = num_qo_heads // num_kv_heads
        self._plan_prefill(requests, group, 1, head_dim, rope, (qo_len, kv_len),
                           use_fp16_qk_reduction=use_fp16_qk_reduction, logits_soft_cap=logits_soft_cap,
                           sm_scale=sm_scale, rope_scale=rope_scale, rope_theta=rope_theta, q_data_type=q_data_type,
                           kv_data_type=kv_data_type, o_data_type=None, non_blocking=non_blocking)
        self._dims = (num_qo_heads, num_kv_heads, qo_len, kv_len, head_dim)
        self._plan_args = dict(
            block_mask_map=block_mask_map, block_row_sz=block_row_sz, block_col_sz=block_col_sz,
            num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, causal=causal,
            pos_encoding_mode=pos_encoding_mode, use_fp16_qk_reduction=use_fp16_qk_reduction,
            logits_soft_cap=logits_soft_cap, sm_scale=sm_scale, rope_scale=rope_scale, rope_theta=rope_theta,
            non_blocking=non_blocking, q_data_type=q_data_type, kv_data_type=kv_data_type)

    begin_forward = plan

    def run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: Optional[torch.Tensor] = None,
        lse: Optional[torch.Tensor] = None,
        return_lse: bool = False,
        enable_pdl: Optional[bool] = None,
    ):
        """Attention of the planned pattern (HND tensors, as upstream).

        Args:
            q: ``[num_qo_heads, qo_len, head_dim]`` in the planned q dtype, unit last stride.
            k, v: ``[num_kv_heads, kv_len, head_dim]`` in the planned kv dtype, unit last stride.
            out: optional ``[num_qo_heads, qo_len, head_dim]`` (q's dtype), written and returned.
            lse: optional float32 ``[num_qo_heads, qo_len]``. return_lse: also return the base-2 lse.
            enable_pdl: accepted and ignored.

        Returns:
            ``out [num_qo_heads, qo_len, head_dim]`` or ``(out, lse)``; rows that see no key give zeros
            and lse -inf.
        """
        self._require_plan()
        hq, hk, qo_len, kv_len, d = self._dims
        plan = self._prefill._plan
        assert plan is not None  # plan() succeeded
        check_tensor("q", q, device=self.device, last_dim_contiguous=True)
        if tuple(q.shape) != (hq, qo_len, d):
            raise ValueError(f"q: expected shape [num_qo_heads, qo_len, head_dim] = {[hq, qo_len, d]} as planned, "
                             f"got {list(q.shape)}")
        if q.dtype != plan.q_dtype:
            raise ValueError(f"The dtype of q {q.dtype} does not match the q_data_type {plan.q_dtype} specified in "
                             "plan function.")
        self._check_kv("k", k, (hk, kv_len, d), plan.kv_dtype)
        self._check_kv("v", v, (hk, kv_len, d), plan.kv_dtype)
        for name, x, shape, dtype in (("out", out, (hq, qo_len, d), plan.o_dtype),
                                      ("lse", lse, (hq, qo_len), torch.float32)):
            self._prefill._check_out(name, x, shape, dtype, self.device)
        if self._rope is not None:
            q = _rotate(q.transpose(0, 1), self._positions[0], self._rope).transpose(0, 1)
            k = _rotate(k.transpose(0, 1), self._positions[1], self._rope).transpose(0, 1)
        group = hq // hk
        # Rows of the kernel's q: (KV head, query), the group's heads side by side.
        q_rows = q.unflatten(0, (hk, group)).transpose(1, 2).reshape(hk * qo_len, group, d)
        ps = self._page_size
        pages = (k.reshape(hk * kv_len // ps, ps, 1, d), v.reshape(hk * kv_len // ps, ps, 1, d))
        o_rows, lse_rows = self._prefill.run(q_rows, pages, return_lse=True)
        o = o_rows.view(hk, qo_len, group, d).transpose(1, 2).reshape(hq, qo_len, d)
        s = lse_rows.view(hk, qo_len, group).transpose(1, 2).reshape(hq, qo_len)
        if out is not None:
            out.copy_(o)
            o = out
        if lse is not None:
            lse.copy_(s)
            s = lse
        return (o, s) if return_lse else o

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_encoding_mode: str = "NONE",
                use_fp16_qk_reduction: bool = False, logits_soft_cap: Optional[float] = None,
                sm_scale: Optional[float] = None, rope_scale: Optional[float] = None,
                rope_theta: Optional[float] = None, return_lse: bool = False):
        """Deprecated upstream form of :meth:`run`: its attention parameters replace the planned ones."""
        self._replan_for_forward(pos_encoding_mode=pos_encoding_mode, use_fp16_qk_reduction=use_fp16_qk_reduction,
                                 logits_soft_cap=logits_soft_cap, sm_scale=sm_scale, rope_scale=rope_scale,
                                 rope_theta=rope_theta)
        return self.run(q, k, v, return_lse=return_lse)
