"""flashtile: FlashInfer's core API in Python, with Triton kernels and a pure-PyTorch CPU path.

``import flashtile as flashinfer`` works for existing callers. Importing compiles nothing: kernels
compile on first use (or ahead of time with ``python -m flashtile warmup``).
"""

__version__ = "0.1.0"

from . import decode, prefill  # noqa: E402
from .decode import single_decode_with_kv_cache  # noqa: E402
from .prefill import single_prefill_with_kv_cache, single_prefill_with_kv_cache_return_lse  # noqa: E402

__all__ = [
    "__version__",
    "decode",
    "prefill",
    "single_decode_with_kv_cache",
    "single_prefill_with_kv_cache",
    "single_prefill_with_kv_cache_return_lse",
]
