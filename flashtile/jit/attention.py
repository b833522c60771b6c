"""``flashinfer.jit.attention``: FlashInfer's attention-variant generators, taking Python variants.

Upstream's ``gen_customize_*_module`` compile a C++ ``variant_decl`` with nvcc into a module. flashtile
takes a :class:`flashtile.AttentionVariant` (Triton hooks, flashtile/variants.py) in that position, with
the same argument lists; a C++ string raises NotImplementedError saying how to port it. The returned spec's
``build_and_load()`` gives a module for ``single_decode_with_kv_cache_with_jit_module`` /
``single_prefill_with_kv_cache_with_jit_module``; nothing is compiled until its first call (Triton then
compiles the kernels with the hooks, in seconds, and caches them on disk). The batch wrappers take the same
arguments as ``jit_args=`` (see flashtile/_core/variant_args.py).

The dtype, head-dim and feature arguments describe upstream's one compiled specialization; flashtile's
kernels specialize on each call's inputs instead, so they are recorded and not enforced.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._core.variant_args import variant_from_decl
from ..variants import AttentionVariant

__all__ = ["JitSpec", "JitModule", "gen_customize_single_decode_module", "gen_customize_single_prefill_module",
           "gen_customize_batch_decode_module", "gen_customize_batch_prefill_module"]


@dataclass(frozen=True)
class JitModule:
    """A loaded variant module: what the ``*_with_jit_module`` functions take. ``kind``: "single_decode",
    "single_prefill", "batch_decode" or "batch_prefill"."""

    uri: str
    kind: str
    variant: AttentionVariant


@dataclass(frozen=True)
class JitSpec:
    """Upstream's JitSpec: :meth:`build_and_load` returns the :class:`JitModule` (no build step: Triton
    compiles on first call)."""

    uri: str
    kind: str
    variant: AttentionVariant

    @property
    def name(self) -> str:
        return self.uri

    def build_and_load(self) -> JitModule:
        return JitModule(self.uri, self.kind, self.variant)

    def build(self, verbose: bool = False) -> None:
        """Nothing to build ahead of time (kernels compile on their first call)."""


def _check_backend(backend: str) -> None:
    if backend not in ("fa2", "fa3"):
        raise ValueError(f"backend: expected 'fa2' or 'fa3' for a customized module (upstream rejects 'auto'), "
                         f"got {backend!r}; both run flashtile's Triton kernels")


def _spec(kind, uri, tensor_names, tensor_dtypes, scalar_names, scalar_dtypes, variant_name, variant_decl):
    variant = variant_from_decl(variant_decl, tensor_names, tensor_dtypes, scalar_names, scalar_dtypes)
    return JitSpec(str(uri), kind, variant)


def gen_customize_single_decode_module(uri, dtype_q, dtype_kv, dtype_o, head_dim_qk, head_dim_vo,
                                       additional_tensor_names, additional_tensor_dtypes, additional_scalar_names,
                                       additional_scalar_dtypes, variant_name, variant_decl, pos_encoding_mode=0,
                                       use_sliding_window=False, use_logits_soft_cap=False) -> JitSpec:
    """A single-decode variant module. ``variant_decl``: an AttentionVariant. Additional tensor/scalar names
    and dtypes (torch dtypes or C type strings) declare the extra arguments passed positionally at call time."""
    return _spec("single_decode", uri, additional_tensor_names, additional_tensor_dtypes, additional_scalar_names,
                 additional_scalar_dtypes, variant_name, variant_decl)


def gen_customize_single_prefill_module(backend, uri, dtype_q, dtype_kv, dtype_o, head_dim_qk, head_dim_vo,
                                        additional_tensor_names, additional_tensor_dtypes, additional_scalar_names,
                                        additional_scalar_dtypes, variant_name, variant_decl, pos_encoding_mode=0,
                                        use_sliding_window=False, use_logits_soft_cap=False,
                                        use_fp16_qk_reduction=False, fp8_enabled=False) -> JitSpec:
    """A single-prefill variant module (``backend`` "fa2" or "fa3"; the other arguments as the decode one)."""
    _check_backend(backend)
    return _spec("single_prefill", uri, additional_tensor_names, additional_tensor_dtypes, additional_scalar_names,
                 additional_scalar_dtypes, variant_name, variant_decl)


def gen_customize_batch_decode_module(uri, dtype_q, dtype_kv, dtype_o, idtype, head_dim_qk, head_dim_vo,
                                      additional_tensor_names, additional_tensor_dtypes, additional_scalar_names,
                                      additional_scalar_dtypes, variant_name, variant_decl, pos_encoding_mode=0,
                                      use_sliding_window=False, use_logits_soft_cap=False) -> JitSpec:
    """A batch-decode variant module (the wrappers take the same arguments as ``jit_args``)."""
    return _spec("batch_decode", uri, additional_tensor_names, additional_tensor_dtypes, additional_scalar_names,
                 additional_scalar_dtypes, variant_name, variant_decl)


def gen_customize_batch_prefill_module(backend, uri, dtype_q, dtype_kv, dtype_o, idtype, head_dim_qk, head_dim_vo,
                                       additional_tensor_names, additional_tensor_dtypes, additional_scalar_names,
                                       additional_scalar_dtypes, variant_name, variant_decl, pos_encoding_mode=0,
                                       use_sliding_window=False, use_logits_soft_cap=False,
                                       use_fp16_qk_reduction=False, fp8_enabled=False) -> JitSpec:
    """A batch-prefill variant module (``backend`` "fa2" or "fa3")."""
    _check_backend(backend)
    return _spec("batch_prefill", uri, additional_tensor_names, additional_tensor_dtypes, additional_scalar_names,
                 additional_scalar_dtypes, variant_name, variant_decl)
