"""FlashInfer's TensorRT-LLM attention entry points, present so that engines can import them.

FlashInfer runs these functions on TensorRT-LLM's precompiled kernels (cubins downloaded from NVIDIA,
or the ``flashinfer-cubin`` package), which flashtile does not ship. They exist here with FlashInfer
0.7.2's signatures because serving engines import them at module load (vLLM's FlashInfer attention
backend imports all three, and its sampler's support check imports that backend); calling one raises
:class:`NotImplementedError` naming the wrapper that serves the same call with flashtile's kernels.

vLLM calls them only when it decides that its TRT-LLM attention path is available; turn that path off
with ``--attention-config.use_trtllm_attention=0`` (README, "Using flashtile in vLLM / SGLang").
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple, Union

import torch

__all__ = [
    "trtllm_batch_decode_with_kv_cache",
    "trtllm_batch_decode_with_kv_cache_mla",
    "trtllm_batch_context_with_kv_cache",
]


def _vendor_kernel_unavailable(function: str, alternative: str) -> NotImplementedError:
    return NotImplementedError(
        f"{function}: runs TensorRT-LLM's precompiled kernels (cubins), which flashtile does not ship; "
        f"use {alternative} instead (in vLLM: --attention-config.use_trtllm_attention=0)"
    )


def trtllm_batch_decode_with_kv_cache(
    query: torch.Tensor,
    kv_cache: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
    workspace_buffer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    bmm1_scale: Union[float, torch.Tensor] = 1.0,
    bmm2_scale: Union[float, torch.Tensor] = 1.0,
    window_left: int = -1,
    out: Optional[Any] = None,
    out_dtype: Optional[Union[torch.dtype, str]] = None,
    o_sf_scale: Optional[float] = None,
    o_sf_vec_size: Optional[int] = None,
    sinks: Optional[List[torch.Tensor]] = None,
    kv_layout: str = "HND",
    enable_pdl: Optional[bool] = None,
    backend: str = "auto",
    q_len_per_req: Optional[int] = 1,
    o_scale: Optional[float] = 1.0,
    mask: Optional[torch.Tensor] = None,
    max_q_len: Optional[int] = None,
    cum_seq_lens_q: Optional[torch.Tensor] = None,
    skip_softmax_threshold_scale_factor: Optional[float] = None,
    kv_cache_sf: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    uses_shared_paged_kv_idx: bool = True,
    lse: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    bmm1_scale_log2: Optional[torch.Tensor] = None,
    multi_ctas_kv_counter_buffer: Optional[torch.Tensor] = None,
    enable_block_sparse_attention: bool = False,
    cp_world: int = 1,
    cp_rank: int = 0,
    causal_seqlens_kv_global: Optional[torch.Tensor] = None,
    bf16q_fp8kv_transform_mode: Optional[str] = None,
    request_order: Optional[torch.Tensor] = None,
    request_order_plan: Optional[Any] = None,
):
    """Batch decode over a block-table KV cache with TensorRT-LLM's kernels (XQA or trtllm-gen).

    Not available in flashtile: always raises :class:`NotImplementedError`. The same attention is
    :class:`flashtile.BatchDecodeWithPagedKVCacheWrapper` (plan with the page table, then run).
    ``out`` may be a :class:`flashtile.utils.FP4Tensor` upstream.
    """
    raise _vendor_kernel_unavailable("trtllm_batch_decode_with_kv_cache", "BatchDecodeWithPagedKVCacheWrapper")


def trtllm_batch_decode_with_kv_cache_mla(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    workspace_buffer: torch.Tensor,
    qk_nope_head_dim: int,
    kv_lora_rank: int,
    qk_rope_head_dim: int,
    block_tables: torch.Tensor,
    seq_lens: Optional[torch.Tensor],
    max_seq_len: int,
    sparse_mla_top_k: int = 0,
    out: Optional[torch.Tensor] = None,
    bmm1_scale: Union[float, torch.Tensor] = 1.0,
    bmm2_scale: Union[float, torch.Tensor] = 1.0,
    sinks: Optional[List[torch.Tensor]] = None,
    skip_softmax_threshold_scale_factor: Optional[float] = None,
    enable_pdl: Optional[bool] = None,
    backend: str = "auto",
    is_var_seq: bool = True,
    uses_shared_paged_kv_idx: bool = True,
    lse: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    cute_dsl_impl: str = "auto",
    kv_scale_format: str = "auto",
    cum_seq_lens_q: Optional[torch.Tensor] = None,
    max_q_len: Optional[int] = None,
    multi_ctas_kv_counter_buffer: Optional[torch.Tensor] = None,
    sparse_mla_top_k_lens: Optional[torch.Tensor] = None,
    enable_dcp: bool = False,
    cp_world: int = 1,
    cp_rank: int = 0,
    causal_seqlens_kv_global: Optional[torch.Tensor] = None,
    use_fp16_softmax: Optional[bool] = None,
    return_lse_base: Optional[str] = None,
):
    """Multi-head latent attention (DeepSeek MLA) decode with TensorRT-LLM's kernels.

    Not available in flashtile: always raises :class:`NotImplementedError`; use
    :class:`flashtile.mla.BatchMLAPagedAttentionWrapper` (FlashInfer's MLA wrapper) instead.
    """
    raise _vendor_kernel_unavailable(
        "trtllm_batch_decode_with_kv_cache_mla",
        "flashtile.mla.BatchMLAPagedAttentionWrapper (FlashInfer's MLA wrapper)",
    )


def trtllm_batch_context_with_kv_cache(
    query: torch.Tensor,
    kv_cache: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
    workspace_buffer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_q_len: int,
    max_kv_len: int,
    bmm1_scale: Union[float, torch.Tensor],
    bmm2_scale: Union[float, torch.Tensor],
    batch_size: int,
    cum_seq_lens_q: torch.Tensor,
    cum_seq_lens_kv: torch.Tensor,
    window_left: int = -1,
    out: Optional[Any] = None,
    out_dtype: Optional[Union[torch.dtype, str]] = None,
    o_sf_scale: Optional[float] = None,
    o_sf_vec_size: Optional[int] = None,
    kv_layout: str = "HND",
    enable_pdl: Optional[bool] = None,
    sinks: Optional[List[torch.Tensor]] = None,
    kv_cache_sf: Optional[Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]] = None,
    skip_softmax_threshold_scale_factor: Optional[float] = None,
    uses_shared_paged_kv_idx: bool = True,
    causal: bool = True,
    lse: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    multi_ctas_kv_counter_buffer: Optional[torch.Tensor] = None,
    use_fp16_softmax: Optional[bool] = None,
    uses_spcompress: Optional[bool] = None,
    backend: str = "trtllm-gen",
):
    """Batch prefill (context phase) over a block-table KV cache with TensorRT-LLM's kernels.

    Not available in flashtile: always raises :class:`NotImplementedError`. The same attention is
    :class:`flashtile.BatchPrefillWithPagedKVCacheWrapper`.
    """
    raise _vendor_kernel_unavailable("trtllm_batch_context_with_kv_cache", "BatchPrefillWithPagedKVCacheWrapper")
