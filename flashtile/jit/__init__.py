"""``flashinfer.jit``: the names engines import from FlashInfer's JIT package.

FlashInfer compiles CUDA sources with nvcc into a workspace directory; flashtile's kernels are Triton
kernels that Triton compiles on first use into its own cache. Only what callers read at import time
is here: :data:`core.logger` (SGLang's ``configure_logger`` sets its level in every process) and
:data:`env.FLASHINFER_WORKSPACE_DIR` (vLLM derives its autotune-cache path from it);
:data:`has_prebuilt_ops`, True: there is nothing to build ahead with nvcc (FlashInfer's test fixtures
read it and then skip their JIT warm-up); and :mod:`attention`, the attention-variant generators
taking Python variants (docs/variants.md).
"""

from . import attention, core, env
from .attention import (
    gen_customize_batch_decode_module,
    gen_customize_batch_prefill_module,
    gen_customize_single_decode_module,
    gen_customize_single_prefill_module,
)

has_prebuilt_ops = True

__all__ = ["attention", "core", "env", "gen_customize_batch_decode_module", "gen_customize_batch_prefill_module",
           "gen_customize_single_decode_module", "gen_customize_single_prefill_module", "has_prebuilt_ops"]
