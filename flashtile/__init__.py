"""flashtile: FlashInfer's core API in Python, with Triton kernels and a pure-PyTorch CPU path.

``import flashtile as flashinfer`` works for existing callers. Importing compiles nothing: kernels
compile on first use (or ahead of time with ``python -m flashtile warmup``).
"""

__version__ = "0.1.0"

from ._core import settings as _settings

_settings.select_interpreter_for_backend()  # before triton is imported (cheap; nothing is compiled here)

# Modules engines import at start-up (no kernels are compiled here).
from . import (  # noqa: E402
    activation,
    attention,
    autotuner,
    cascade,
    decode,
    gemm,
    jit,
    mla,
    norm,
    page,
    pod,
    prefill,
    quantization,
    rope,
    sampling,
    sparse,
    utils,
)
from .activation import gelu_and_mul, gelu_tanh_and_mul, silu_and_mul  # noqa: E402
from .attention import BatchAttention  # noqa: E402
from .autotuner import autotune  # noqa: E402
from .cascade import (  # noqa: E402
    BatchDecodeWithSharedPrefixPagedKVCacheWrapper,
    BatchPrefillWithSharedPrefixPagedKVCacheWrapper,
    MultiLevelCascadeAttentionWrapper,
    merge_state,
    merge_state_in_place,
    merge_states,
)
from .decode import (  # noqa: E402
    BatchDecodeWithPagedKVCacheWrapper,
    CUDAGraphBatchDecodeWithPagedKVCacheWrapper,
    fast_decode_plan,
    single_decode_with_kv_cache,
)
from .gemm import SegmentGEMMWrapper, bmm_fp8  # noqa: E402
from .mla import BatchMLAPagedAttentionWrapper  # noqa: E402
from .norm import fused_add_rmsnorm, gemma_fused_add_rmsnorm, gemma_rmsnorm, layernorm, rmsnorm  # noqa: E402
from .page import append_paged_kv_cache, append_paged_mla_kv_cache, get_batch_indices_positions, get_seq_lens  # noqa: E402
from .pod import PODWithPagedKVCacheWrapper  # noqa: E402
from .prefill import (  # noqa: E402
    BatchPrefillWithPagedKVCacheWrapper,
    BatchPrefillWithRaggedKVCacheWrapper,
    single_prefill_with_kv_cache,
    single_prefill_with_kv_cache_return_lse,
)
from .quantization import (  # noqa: E402
    SfLayout,
    block_scale_interleave,
    e2m1_and_ufp8sf_scale_to_float,
    fp4_quantize,
    mxfp4_dequantize,
    mxfp4_quantize,
    nvfp4_block_scale_interleave,
    nvfp4_quantize,
    packbits,
    segment_packbits,
)
from .rope import (  # noqa: E402
    apply_llama31_rope,
    apply_llama31_rope_inplace,
    apply_llama31_rope_pos_ids,
    apply_llama31_rope_pos_ids_inplace,
    apply_rope,
    apply_rope_inplace,
    apply_rope_pos_ids,
    apply_rope_pos_ids_inplace,
    apply_rope_with_cos_sin_cache,
    apply_rope_with_cos_sin_cache_inplace,
)
from .sampling import (  # noqa: E402
    chain_speculative_sampling,
    min_p_sampling_from_probs,
    sampling_from_logits,
    sampling_from_probs,
    softmax,
    top_k_mask_logits,
    top_k_renorm_probs,
    top_k_sampling_from_probs,
    top_k_top_p_sampling_from_logits,
    top_k_top_p_sampling_from_probs,
    top_p_renorm_probs,
    top_p_sampling_from_probs,
)
from .sparse import BlockSparseAttentionWrapper, VariableBlockSparseAttentionWrapper  # noqa: E402
from .utils import next_positive_power_of_2  # noqa: E402
from .variants import AttentionVariant  # noqa: E402

__all__ = [
    "AttentionVariant",
    "__version__",
    "autotuner",
    "autotune",
    "jit",
    "activation",
    "norm",
    "page",
    "sampling",
    "chain_speculative_sampling",
    "min_p_sampling_from_probs",
    "sampling_from_logits",
    "sampling_from_probs",
    "softmax",
    "top_k_mask_logits",
    "top_k_renorm_probs",
    "top_k_sampling_from_probs",
    "top_k_top_p_sampling_from_logits",
    "top_k_top_p_sampling_from_probs",
    "top_p_renorm_probs",
    "top_p_sampling_from_probs",
    "append_paged_kv_cache",
    "append_paged_mla_kv_cache",
    "get_batch_indices_positions",
    "get_seq_lens",
    "rope",
    "silu_and_mul",
    "gelu_and_mul",
    "gelu_tanh_and_mul",
    "rmsnorm",
    "fused_add_rmsnorm",
    "gemma_rmsnorm",
    "gemma_fused_add_rmsnorm",
    "layernorm",
    "apply_rope",
    "apply_rope_inplace",
    "apply_rope_pos_ids",
    "apply_rope_pos_ids_inplace",
    "apply_llama31_rope",
    "apply_llama31_rope_inplace",
    "apply_llama31_rope_pos_ids",
    "apply_llama31_rope_pos_ids_inplace",
    "apply_rope_with_cos_sin_cache",
    "apply_rope_with_cos_sin_cache_inplace",
    "decode",
    "gemm",
    "SegmentGEMMWrapper",
    "bmm_fp8",
    "prefill",
    "quantization",
    "utils",
    "packbits",
    "segment_packbits",
    "SfLayout",
    "fp4_quantize",
    "nvfp4_quantize",
    "mxfp4_quantize",
    "mxfp4_dequantize",
    "e2m1_and_ufp8sf_scale_to_float",
    "block_scale_interleave",
    "nvfp4_block_scale_interleave",
    "next_positive_power_of_2",
    "single_decode_with_kv_cache",
    "BatchDecodeWithPagedKVCacheWrapper",
    "CUDAGraphBatchDecodeWithPagedKVCacheWrapper",
    "fast_decode_plan",
    "single_prefill_with_kv_cache",
    "single_prefill_with_kv_cache_return_lse",
    "BatchPrefillWithPagedKVCacheWrapper",
    "BatchPrefillWithRaggedKVCacheWrapper",
    "merge_state",
    "merge_state_in_place",
    "merge_states",
    "MultiLevelCascadeAttentionWrapper",
    "BatchDecodeWithSharedPrefixPagedKVCacheWrapper",
    "BatchPrefillWithSharedPrefixPagedKVCacheWrapper",
    "cascade",
    "mla",
    "BatchMLAPagedAttentionWrapper",
    "sparse",
    "BlockSparseAttentionWrapper",
    "VariableBlockSparseAttentionWrapper",
    "attention",
    "BatchAttention",
    "pod",
    "PODWithPagedKVCacheWrapper",
]
