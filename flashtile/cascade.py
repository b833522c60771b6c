"""Cascade attention (``flashinfer.cascade``): merging attention states across KV segments.

An attention *state* over a segment of the KV sequence is ``(v, s)``: the attention output over that
segment and ``s``, the **base-2** log-sum-exp of the scaled logits of its keys (what every flashtile
attention function returns with ``return_lse=True``). Merging the states of disjoint segments gives
the state of their union, so attention over a shared prefix and over each request's own suffix can
be computed apart and combined. :class:`MultiLevelCascadeAttentionWrapper` does that for a KV cache
organised in levels of sharing (and the two legacy shared-prefix wrappers for one shared level). See
docs/cascade.md.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ._core import ops_cascade as ops
from ._core.attention_args import resolve_scalar
from ._core.buffers import new_output, output_maker
from ._core.checks import check_same_device, check_tensor, describe
from ._core.memo import CallMemo, eager, tensor_key
from ._core.variant_args import variant_from_jit_args
from .prefill import BatchPrefillWithPagedKVCacheWrapper, single_prefill_with_kv_cache

__all__ = [
    "merge_state",
    "merge_state_in_place",
    "merge_states",
    "MultiLevelCascadeAttentionWrapper",
    "BatchDecodeWithSharedPrefixPagedKVCacheWrapper",
    "BatchPrefillWithSharedPrefixPagedKVCacheWrapper",
]


# ---------------------------------------------------------------------------------------------
# Merge operators
# ---------------------------------------------------------------------------------------------

V_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
S_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_v(name: str, v, ndim: int, layout: str) -> None:
    check_tensor(name, v, dtypes=V_DTYPES)
    if v.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor {layout}, got shape {list(v.shape)}")


def _check_like_v(name: str, x, v_name: str, v: torch.Tensor) -> None:
    """A second value tensor: v's shape and dtype."""
    check_tensor(name, x, shape=tuple(v.shape))
    if x.dtype != v.dtype:
        raise TypeError(f"{name}: expected the dtype of {v_name} ({_dtype_name(v.dtype)}), "
                        f"got {_dtype_name(x.dtype)}")


def _check_s(name: str, s, shape, dtypes=S_DTYPES) -> None:
    check_tensor(name, s, shape=shape, dtypes=dtypes)


def _memo_key(tag: str, v_a, s_a, v_b, s_b, mask=None) -> Optional[tuple]:
    """The memo key of an eager merge (_core/memo.py): ``tag`` and the tensors' metadata (None for an
    absent mask), or None when the call cannot use the memos (traced by torch.compile, or an argument
    that is not a plain tensor: the checks then say what is wrong)."""
    if not eager():
        return None
    try:
        return (tag, tensor_key(v_a), tensor_key(s_a), tensor_key(v_b), tensor_key(s_b),
                None if mask is None else tensor_key(mask))
    except Exception:
        return None


# Keys whose checks passed -> for merge_state: (ops.eager_runner's function, whether s_a and whether s_b need
# the float32 cast, the makers of the v and s outputs: buffers.output_maker); for merge_state_in_place: (the
# eager merge_state_pair function, whether s_other needs the float32 cast). A known key proves the checks pass:
# they depend only on the tensors' shapes, dtypes and devices.
_MERGE_STATE_CALLS = CallMemo()
_MERGE_STATE_IN_PLACE_CALLS = CallMemo()
_is_compiling = torch.compiler.is_compiling


def merge_state(
    v_a: torch.Tensor,
    s_a: torch.Tensor,
    v_b: torch.Tensor,
    s_b: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention states, e.g. attention over a shared prefix and over a request's suffix.

    For each (token, head), with ``m = max(s_a, s_b)``, ``w_a = 2**(s_a - m)``, ``w_b = 2**(s_b - m)``::

        v = (w_a * v_a + w_b * v_b) / (w_a + w_b)      s = m + log2(w_a + w_b)

    A state with ``s = -inf`` contributes nothing (its ``v`` is not read); two empty states give
    ``v = 0`` and ``s = -inf``.

    Args:
        v_a: ``[seq_len, num_heads, head_dim]``, float16, bfloat16 or float32; any strides.
        s_a: ``[seq_len, num_heads]`` base-2 log-sum-exp of state A; any float dtype (cast to float32),
            any strides.
        v_b: like ``v_a`` (same shape and dtype).
        s_b: like ``s_a``.

    Returns:
        ``(v, s)``: ``v [seq_len, num_heads, head_dim]`` in v_a's dtype, ``s [seq_len, num_heads]``
        float32 (base 2), new contiguous tensors.
    """
    key = call = None
    if not _is_compiling():  # the remembered call first, its key (memo.tensor_key's fields) written out here
        try:
            key = (v_a.shape, v_a.stride(), v_a.dtype, v_a.device, v_a.data_ptr() % 16 == 0,
                   s_a.shape, s_a.stride(), s_a.dtype, s_a.device, s_a.data_ptr() % 16 == 0,
                   v_b.shape, v_b.stride(), v_b.dtype, v_b.device, v_b.data_ptr() % 16 == 0,
                   s_b.shape, s_b.stride(), s_b.dtype, s_b.device, s_b.data_ptr() % 16 == 0)
        except Exception:
            key = None
        else:
            call = _MERGE_STATE_CALLS.get(key)
    if call is None:
        _check_v("v_a", v_a, 3, "[seq_len, num_heads, head_dim]")
        seq_len, num_heads, head_dim = v_a.shape
        _check_s("s_a", s_a, (seq_len, num_heads))
        _check_like_v("v_b", v_b, "v_a", v_a)
        _check_s("s_b", s_b, (seq_len, num_heads))
        device = check_same_device(v_a=v_a, s_a=s_a, v_b=v_b, s_b=s_b)
        if key is None:
            v = new_output((seq_len, num_heads, head_dim), v_a.dtype, device)
            s = new_output((seq_len, num_heads), torch.float32, device)
            ops.call(ops.merge_state, v_a, s_a.to(torch.float32), v_b, s_b.to(torch.float32), v, s)
            return v, s
        call = (ops.eager_runner(ops.merge_state, device, key), s_a.dtype != torch.float32,
                s_b.dtype != torch.float32, output_maker(v_a), output_maker(s_a))
        _MERGE_STATE_CALLS.remember(key, call)
    run, cast_a, cast_b, make_v, make_s = call
    if cast_a:
        s_a = s_a.to(torch.float32)  # as it is (strides kept), so its output maker still applies
    if cast_b:
        s_b = s_b.to(torch.float32)
    v = make_v(v_a)  # contiguous [seq_len, num_heads, head_dim] in v_a's dtype
    s = make_s(s_a)  # contiguous float32 [seq_len, num_heads]
    run(v_a, s_a, v_b, s_b, v, s, None)
    return v, s


def merge_state_in_place(
    v: torch.Tensor,
    s: torch.Tensor,
    v_other: torch.Tensor,
    s_other: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
) -> None:
    """Merge the state ``(v_other, s_other)`` into ``(v, s)``, in place (same math as :func:`merge_state`).

    Args:
        v: ``[seq_len, num_heads, head_dim]``, float16, bfloat16 or float32; any strides; overwritten
            with the merged output.
        s: ``[seq_len, num_heads]``, **float32** (base-2 log-sum-exp); any strides; overwritten with
            the merged log-sum-exp. Upstream casts ``s`` to float32 before the in-place call, so a
            non-float32 ``s`` would silently be left unchanged there; flashtile raises TypeError.
        v_other: like ``v`` (same shape and dtype); read only.
        s_other: ``[seq_len, num_heads]``, any float dtype (cast to float32); read only.
        mask: optional bool ``[seq_len]`` on v's device: tokens whose entry is False are neither read
            nor written (their ``v`` and ``s`` stay as they are; e.g. CUDA-graph padding rows).

    Returns:
        None.
    """
    key = _memo_key("merge_state_in_place", v, s, v_other, s_other, mask)
    call = _MERGE_STATE_IN_PLACE_CALLS.get(key)
    if call is None:
        _check_v("v", v, 3, "[seq_len, num_heads, head_dim]")
        seq_len, num_heads, _ = v.shape
        check_tensor("s", s, shape=(seq_len, num_heads))
        if s.dtype != torch.float32:
            raise TypeError(f"s: expected dtype float32 (it is updated in place, so it cannot be cast), "
                            f"got {_dtype_name(s.dtype)}")
        _check_like_v("v_other", v_other, "v", v)
        _check_s("s_other", s_other, (seq_len, num_heads))
        if mask is not None:
            check_tensor("mask", mask, shape=(seq_len,), dtypes=(torch.bool,))
        device = check_same_device(v=v, s=s, v_other=v_other, s_other=s_other, mask=mask)
        if key is None:
            ops.call(ops.merge_state_in_place, v, s, v_other, s_other.to(torch.float32), mask)
            return
        call = (ops.eager_function(ops.merge_state_in_place, device), s_other.dtype != torch.float32)
        _MERGE_STATE_IN_PLACE_CALLS.remember(key, call)
    run, cast_other = call
    if cast_other:
        s_other = s_other.to(torch.float32)
    run(v, s, v_other, s_other, v, s, mask, key)


def merge_states(v: torch.Tensor, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge any number of attention states per token (e.g. the partial outputs of several KV chunks).

    For each (token, head), with ``m = max_i s_i`` and ``w_i = 2**(s_i - m)`` over the states ``i``::

        v_merged = sum_i w_i * v_i / sum_i w_i        s_merged = m + log2(sum_i w_i)

    States with ``s = -inf`` contribute nothing (their ``v`` is not read); a token whose states are
    all empty (or that has ``num_states == 0``) gets ``v = 0``, ``s = -inf``.

    Args:
        v: ``[seq_len, num_states, num_heads, head_dim]``, float16, bfloat16 or float32; any strides
            (read through a state-major strided view; a head_dim stride other than 1 costs a copy on
            the kernel path).
        s: ``[seq_len, num_states, num_heads]`` base-2 log-sum-exp; any float dtype (cast to
            float32), any strides.

    Returns:
        ``(v_merged, s_merged)``: ``v_merged [seq_len, num_heads, head_dim]`` in v's dtype,
        ``s_merged [seq_len, num_heads]`` float32 (base 2), new contiguous tensors.
    """
    _check_v("v", v, 4, "[seq_len, num_states, num_heads, head_dim]")
    seq_len, num_states, num_heads, head_dim = v.shape
    _check_s("s", s, (seq_len, num_states, num_heads))
    device = check_same_device(v=v, s=s)
    v_merged = new_output((seq_len, num_heads, head_dim), v.dtype, device)
    s_merged = new_output((seq_len, num_heads), torch.float32, device)
    ops.call(ops.merge_states, v, s.to(torch.float32), v_merged, s_merged)
    return v_merged, s_merged


# ------------------------------------------------------------------------------------------------
# Cascade wrappers: levels of shared KV, each run by a batch prefill wrapper, merged in place
# ------------------------------------------------------------------------------------------------


def _level_list(name: str, value, num_levels: int) -> list:
    if not isinstance(value, (list, tuple)) or len(value) != num_levels:
        raise ValueError(f"{name}: expected a list of {num_levels} tensors (one per level), got {describe(value)}"
                         + (f" of length {len(value)}" if isinstance(value, (list, tuple)) else ""))
    return list(value)


class MultiLevelCascadeAttentionWrapper:
    """Attention over a KV cache organised in levels of sharing (cascade inference).

    Level 0 is the most shared: its ``qo_indptr`` groups the query rows that share one KV sequence
    (for one system prompt shared by the whole batch, ``[0, total_q]``); the last level usually
    holds each request's own KV. All levels index the same paged cache and the same query tensor. A
    query row attends to the concatenation of its KV at every level: each level is one batch prefill
    (a group of rows reads its shared KV once per KV head, for all of them, instead of once per
    request), and the per-level states are merged in place (base-2 lse, :func:`merge_state_in_place`).

    ``causal`` applies at the last level only (bottom-right aligned within that level's KV); the shared
    levels are seen in full.

    Args:
        num_levels: number of levels (>= 1).
        float_workspace_buffer: device tensor shared by the levels (they run one after the other).
        kv_layout: "NHD" or "HND".
        use_cuda_graph: CUDA-graph mode; then the four buffer lists below are required, one int32
            buffer per level each, with the meaning of :class:`BatchPrefillWithPagedKVCacheWrapper`'s
            ``qo_indptr_buf``, ``paged_kv_indptr_buf``, ``paged_kv_indices_buf``,
            ``paged_kv_last_page_len_buf``.
        jit_args: an attention variant (flashtile/variants.py; as the batch prefill wrapper's) run at every
            level; its hooks see each level's own key indices (``kv_idx`` from 0 within the level). Variants
            whose states cannot be merged (``use_softmax=False``, an output transform) raise NotImplementedError.
    """

    def __init__(
        self,
        num_levels: int,
        float_workspace_buffer: torch.Tensor,
        kv_layout: str = "NHD",
        use_cuda_graph: bool = False,
        qo_indptr_buf_arr: Optional[list] = None,
        paged_kv_indptr_buf_arr: Optional[list] = None,
        paged_kv_indices_buf_arr: Optional[list] = None,
        paged_kv_last_page_len_buf_arr: Optional[list] = None,
        jit_args=None,
    ) -> None:
        variant = variant_from_jit_args(jit_args)
        if variant is not None and variant.whole_rows:
            raise NotImplementedError(f"jit_args: variant {variant.name!r} has use_softmax=False or an "
                                      "output_transform, whose per-level states cannot be merged")
        if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 1:
            raise ValueError(f"num_levels: expected an int >= 1, got {num_levels!r}")
        self._num_levels = num_levels
        self._use_cuda_graph = bool(use_cuda_graph)
        if self._use_cuda_graph:
            bufs = [_level_list(name, arr, num_levels) for name, arr in (
                ("qo_indptr_buf_arr", qo_indptr_buf_arr), ("paged_kv_indptr_buf_arr", paged_kv_indptr_buf_arr),
                ("paged_kv_indices_buf_arr", paged_kv_indices_buf_arr),
                ("paged_kv_last_page_len_buf_arr", paged_kv_last_page_len_buf_arr))]
            self._batch_prefill_wrappers = [
                BatchPrefillWithPagedKVCacheWrapper(
                    float_workspace_buffer, kv_layout, use_cuda_graph=True, qo_indptr_buf=bufs[0][i],
                    paged_kv_indptr_buf=bufs[1][i], paged_kv_indices_buf=bufs[2][i],
                    paged_kv_last_page_len_buf=bufs[3][i], jit_args=variant)
                for i in range(num_levels)
            ]
        else:
            self._batch_prefill_wrappers = [BatchPrefillWithPagedKVCacheWrapper(float_workspace_buffer, kv_layout,
                                                                                jit_args=variant)
                                            for _ in range(num_levels)]
        self._kv_layout = kv_layout

    @property
    def is_cuda_graph_enabled(self) -> bool:
        return self._use_cuda_graph

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor, int_workspace_buffers=None) -> None:
        """Swap the float workspace and, optionally, the per-level int workspaces (a list); re-plan after."""
        if int_workspace_buffers is not None:
            int_workspace_buffers = _level_list("int_workspace_buffers", int_workspace_buffers, self._num_levels)
        for i, w in enumerate(self._batch_prefill_wrappers):
            w.reset_workspace_buffer(float_workspace_buffer,
                                     int_workspace_buffers[i] if int_workspace_buffers is not None else None)

    def plan(
        self,
        qo_indptr_arr: list,
        paged_kv_indptr_arr: list,
        paged_kv_indices_arr: list,
        paged_kv_last_page_len: list,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
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
    ) -> None:
        """Plan every level.

        Args:
            qo_indptr_arr: one int32 ``[B_l + 1]`` tensor per level; level ``l`` groups query rows
                ``qo_indptr_arr[l][g]:qo_indptr_arr[l][g + 1]`` into its group ``g``. Every level covers
                the same rows (its last entry is the total number of query rows).
            paged_kv_indptr_arr, paged_kv_indices_arr, paged_kv_last_page_len: one page table per level
                (int32 ``[B_l + 1]``, page ids, ``[B_l]``): the KV of each group, in the one paged cache.
            num_qo_heads, num_kv_heads, head_dim, page_size: as the batch wrappers.
            causal: causal mask at the last level (bottom-right aligned within that level's KV).
            pos_encoding_mode, use_fp16_qk_reduction, sm_scale, window_left, logits_soft_cap, rope_scale,
            rope_theta, q_data_type, kv_data_type: as :meth:`BatchPrefillWithPagedKVCacheWrapper.plan`,
                applied at every level (positions count from the start of each level's KV).
        """
        lists = [_level_list(name, arr, self._num_levels) for name, arr in (
            ("qo_indptr_arr", qo_indptr_arr), ("paged_kv_indptr_arr", paged_kv_indptr_arr),
            ("paged_kv_indices_arr", paged_kv_indices_arr), ("paged_kv_last_page_len", paged_kv_last_page_len))]
        totals = set()
        for level, qo in enumerate(lists[0]):
            if not isinstance(qo, torch.Tensor) or qo.dim() != 1 or qo.numel() < 1:
                raise ValueError(f"qo_indptr_arr[{level}]: expected a 1-D int32 tensor, got {describe(qo)}")
            totals.add(int(qo[-1]))
        if len(totals) != 1:
            raise ValueError(f"qo_indptr_arr: every level must cover the same query rows (last entries equal), "
                             f"got {[int(qo[-1]) for qo in lists[0]]}")
        for level, w in enumerate(self._batch_prefill_wrappers):
            w.plan(lists[0][level], lists[1][level], lists[2][level], lists[3][level], num_qo_heads, num_kv_heads,
                   head_dim, page_size, causal=bool(causal) and level == self._num_levels - 1,
                   pos_encoding_mode=pos_encoding_mode, use_fp16_qk_reduction=use_fp16_qk_reduction,
                   sm_scale=sm_scale, window_left=window_left, logits_soft_cap=logits_soft_cap,
                   rope_scale=rope_scale, rope_theta=rope_theta, q_data_type=q_data_type, kv_data_type=kv_data_type)

    begin_forward = plan

    def run(self, q: torch.Tensor, paged_kv_cache, *args, sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention of the planned levels.

        Args:
            q: ``[total_q, num_qo_heads, head_dim]`` in the planned q dtype.
            paged_kv_cache: the paged cache every level indexes (any form the batch wrappers take).
            args: the extra arguments of the ``jit_args`` variant (tensors first, then scalars), for every level.
            sinks: float ``[num_qo_heads]`` attention-sink logits, joined once (at level 0), or None.

        Returns:
            ``[total_q, num_qo_heads, head_dim]`` in q's dtype.
        """
        last = len(self._batch_prefill_wrappers) - 1
        out, lse = self._batch_prefill_wrappers[-1].run(q, paged_kv_cache, *args, return_lse=True,
                                                        sinks=sinks if last == 0 else None)
        for level in range(last - 1, -1, -1):
            o_level, lse_level = self._batch_prefill_wrappers[level].run(
                q, paged_kv_cache, *args, return_lse=True, sinks=sinks if level == 0 else None)
            merge_state_in_place(out, lse, o_level, lse_level)
        return out

    def end_forward(self) -> None:
        """Deprecated upstream alias; nothing to release."""

    def forward(self, q: torch.Tensor, paged_kv_cache) -> torch.Tensor:
        """Deprecated upstream name of :meth:`run`."""
        return self.run(q, paged_kv_cache)


class _SharedPrefixWrapper:
    """What the two legacy shared-prefix wrappers share: attend the shared prefix (one non-causal
    multi-query prefill, so the prefix is read once per KV head for the whole batch), attend the
    unique part with the wrapped batch wrapper, merge the two states in place."""

    def __init__(self, inner, kv_layout: str) -> None:
        self._kv_layout = kv_layout
        self._inner = inner

    def _attend(self, q, k_shared, v_shared, unique_kv_cache, sm_scale: Optional[float]) -> torch.Tensor:
        check_tensor("k_shared", k_shared, ndim=3)
        check_tensor("v_shared", v_shared, ndim=3)
        o_shared, lse_shared = single_prefill_with_kv_cache(
            q, k_shared, v_shared, causal=False, kv_layout=self._kv_layout, sm_scale=sm_scale, return_lse=True)
        out, lse = self._inner.run(q, unique_kv_cache, return_lse=True)
        merge_state_in_place(out, lse, o_shared, lse_shared)
        return out

    def end_forward(self) -> None:
        """Deprecated upstream alias; nothing to release."""

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor,
                               int_workspace_buffer: Optional[torch.Tensor] = None) -> None:
        """Swap the workspaces (call begin_forward again afterwards)."""
        self._inner.reset_workspace_buffer(float_workspace_buffer, int_workspace_buffer)


class BatchDecodeWithSharedPrefixPagedKVCacheWrapper(_SharedPrefixWrapper):
    """Decode for a batch whose requests share one prefix (legacy upstream API; prefer
    :class:`MultiLevelCascadeAttentionWrapper`).

    The shared prefix is a contiguous K/V pair given to :meth:`forward`; each request's own tokens live
    in a paged cache described to :meth:`begin_forward`. The batch's queries attend the shared prefix
    together and their own pages (batch decode); the two states are merged. No RoPE (as upstream).

    Args:
        float_workspace_buffer: device tensor for split-KV partial states.
        kv_layout: "NHD" or "HND", for both the shared K/V and the paged cache.
    """

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD") -> None:
        from .decode import BatchDecodeWithPagedKVCacheWrapper

        super().__init__(BatchDecodeWithPagedKVCacheWrapper(float_workspace_buffer, kv_layout), kv_layout)

    def begin_forward(self, unique_kv_indptr: torch.Tensor, unique_kv_indices: torch.Tensor,
                      unique_kv_last_page_len: torch.Tensor, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                      page_size: int, data_type: Union[str, torch.dtype] = "float16") -> None:
        """Plan the unique parts (the page table of each request's own tokens); ``data_type`` is the
        dtype of q and of the caches."""
        self._inner.plan(unique_kv_indptr, unique_kv_indices, unique_kv_last_page_len, num_qo_heads, num_kv_heads,
                         head_dim, page_size, q_data_type=data_type, kv_data_type=data_type)

    plan = begin_forward

    def forward(self, q: torch.Tensor, k_shared: torch.Tensor, v_shared: torch.Tensor, unique_kv_cache,
                allow_fp16_qk_reduction: bool = False, sm_scale: Optional[float] = None,
                rope_scale: Optional[float] = None, rope_theta: Optional[float] = None) -> torch.Tensor:
        """Attention of ``q [B, num_qo_heads, head_dim]`` over ``k_shared``/``v_shared``
        (``[shared_len, num_kv_heads, head_dim]`` NHD, ``[num_kv_heads, shared_len, head_dim]`` HND) followed
        by each request's pages in ``unique_kv_cache``. Returns ``[B, num_qo_heads, head_dim]``."""
        plan = self._inner._require_plan()
        if sm_scale is not None:
            plan.sm_scale = resolve_scalar("sm_scale", sm_scale, plan.sm_scale, positive=True)
        return self._attend(q, k_shared, v_shared, unique_kv_cache, plan.sm_scale)

    run = forward


class BatchPrefillWithSharedPrefixPagedKVCacheWrapper(_SharedPrefixWrapper):
    """Prefill for a batch whose requests share one prefix (legacy upstream API; prefer
    :class:`MultiLevelCascadeAttentionWrapper`).

    Every query row sees the whole shared prefix (contiguous ``k_shared``/``v_shared``, never causal) and
    its request's own pages (``causal`` applies there, bottom-right aligned within the unique part).

    Args:
        float_workspace_buffer: device tensor for split-KV partial states.
        kv_layout: "NHD" or "HND".
    """

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD") -> None:
        super().__init__(BatchPrefillWithPagedKVCacheWrapper(float_workspace_buffer, kv_layout), kv_layout)
        self._plan_args: Optional[tuple] = None  # begin_forward()'s arguments
        self._planned: Optional[tuple] = None  # the forward() options the inner wrapper was planned for

    def begin_forward(self, qo_indptr: torch.Tensor, paged_kv_indptr: torch.Tensor,
                      paged_kv_indices: torch.Tensor, paged_kv_last_page_len: torch.Tensor, num_qo_heads: int,
                      num_kv_heads: int, head_dim: int, page_size: int) -> None:
        """Record the batch: query rows per request and the page table of the unique parts. The
        work is planned at :meth:`forward`, which carries the mask (as upstream)."""
        self._plan_args = (qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
                           num_kv_heads, head_dim, page_size)
        self._planned = None

    plan = begin_forward

    def forward(self, q: torch.Tensor, k_shared: torch.Tensor, v_shared: torch.Tensor, unique_kv_cache,
                causal: bool = False, use_fp16_qk_reduction: bool = False, sm_scale: Optional[float] = None,
                rope_scale: Optional[float] = None, rope_theta: Optional[float] = None) -> torch.Tensor:
        """Attention of ``q [qo_indptr[-1], num_qo_heads, head_dim]`` over the shared prefix and each
        request's pages. Returns ``[qo_indptr[-1], num_qo_heads, head_dim]``."""
        if self._plan_args is None:
            raise RuntimeError("forward() called before begin_forward()")
        kv_dtype = unique_kv_cache[0].dtype if isinstance(unique_kv_cache, (tuple, list)) else unique_kv_cache.dtype
        key = (bool(causal), sm_scale, rope_scale, rope_theta, q.dtype, kv_dtype)
        if self._planned != key:  # the work list depends on the mask: plan on the first forward of a kind
            self._inner.plan(*self._plan_args, causal=bool(causal), sm_scale=sm_scale, rope_scale=rope_scale,
                             rope_theta=rope_theta, q_data_type=q.dtype, kv_data_type=kv_dtype)
            self._planned = key
        return self._attend(q, k_shared, v_shared, unique_kv_cache, sm_scale)

    run = forward

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor,
                               int_workspace_buffer: Optional[torch.Tensor] = None) -> None:
        """Swap the workspaces (the next forward re-plans)."""
        super().reset_workspace_buffer(float_workspace_buffer, int_workspace_buffer)
        self._planned = None
