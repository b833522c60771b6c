"""The Gluon (Triton's explicit-layout dialect) names the Hopper kernels use, imported once.

The warp-specialized kernels (batch_prefill_hopper.py, mla_hopper.py) run only on an sm_90 GPU, under the
device machine's Triton 3.6; this module also lets them compile for sm_90a under newer Triton releases
(benchmarks/tools/hopper_compile.py), which renamed a few names. ``HAVE_GLUON`` is False where Triton has
no Gluon Hopper API at all; the kernel modules then define no kernels and their dispatchers decline.
"""

from __future__ import annotations

import functools

import torch

try:  # Gluon (Triton >= 3.5)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor

    # Names that newer releases changed (same leading arguments): the barrier of the calling warps
    # (``thread_barrier`` up to Triton 3.6, then ``barrier``), the TMA copies (``async_copy_global_to_shared`` /
    # ``async_copy_shared_to_global``, then ``async_load`` / ``async_store``) and the cp.async copy
    # (``async_copy_global_to_shared``, then ``async_load``).
    cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    cp_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    HAVE_GLUON = True
except Exception:  # pragma: no cover - older or newer Triton without this API
    HAVE_GLUON = False


@functools.lru_cache(maxsize=None)  # ~6 us of host time per layout otherwise, several per launch
def nvmma_layout(rows: int, cols: int, dtype: torch.dtype):
    """The wgmma/TMA shared-memory layout of a ``[rows, cols]`` tile of torch ``dtype`` (fp16, bf16, fp8)."""
    gl_dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float8_e4m3fn: gl.float8e4nv,
                torch.float8_e5m2: gl.float8e5}[dtype]
    return gl.NVMMASharedLayout.get_default_for([rows, cols], gl_dtype)


__all__ = ["HAVE_GLUON", "nvmma_layout", "gluon", "gl", "async_copy", "fence_async_shared", "mbarrier", "tma",
           "warpgroup_mma", "warpgroup_mma_wait", "GluonTensorDescriptor", "cta_barrier", "tma_load", "tma_store",
           "cp_async_load"]
