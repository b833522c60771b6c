"""torch.library registrations of the small memory-bound ops: norms, gated activations, RoPE.

Same pattern as ops.py: destination-passing custom ops (the public function allocates the output,
the op writes it; in-place ops list the tensors they modify in ``mutates_args``), empty fake
implementations, and a per-call choice (dispatch.py) between the Triton kernels and the reference.
Eager calls skip the custom-op dispatcher (``call``); under torch.compile the op is traced.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from .dispatch import implementation

__all__ = ["rmsnorm", "fused_add_rmsnorm", "layernorm", "act_and_mul", "rope", "rope_inplace", "mla_rope_quantize",
           "call", "eager_function",
           "eager_runner"]


# ---------------------------------------------------------------------------------------------
# Implementations (shared by the eager fast path and the registered ops): the functions of
# kernels/<family>.py or reference/<family>.py (same names and arguments), chosen per call by
# dispatch.implementation (a memoised lookup: these ops are launch-bound at small sizes).
# ---------------------------------------------------------------------------------------------


def _rmsnorm_impl(input, weight, out, eps, weight_offset) -> None:
    implementation("norm", input.device).rmsnorm(input, weight, out, eps, weight_offset)


def _fused_add_rmsnorm_impl(input, residual, weight, eps, weight_offset) -> None:
    implementation("norm", input.device).fused_add_rmsnorm(input, residual, weight, eps, weight_offset)


def _layernorm_impl(input, gamma, beta, out, eps) -> None:
    implementation("norm", input.device).layernorm(input, gamma, beta, out, eps)


def _act_and_mul_impl(input, out, activation) -> None:
    implementation("activation", input.device).act_and_mul(input, out, activation)


def _rope_impl(q, k, q_out, k_out, pos_ids, indptr, offsets, cos_sin_cache, rotary_dim, interleave, rope_scale,
               rope_theta, smooth_a, smooth_b) -> None:
    implementation("rope", q.device).apply_rope(
        q, k, q_out, k_out, rotary_dim=rotary_dim, interleave=interleave, pos_ids=pos_ids, indptr=indptr,
        offsets=offsets, cos_sin_cache=cos_sin_cache, rope_scale=rope_scale, rope_theta=rope_theta,
        smooth_a=smooth_a, smooth_b=smooth_b)


def _rope_inplace_impl(q, k, pos_ids, indptr, offsets, cos_sin_cache, rotary_dim, interleave, rope_scale,
                       rope_theta, smooth_a, smooth_b) -> None:
    _rope_impl(q, k, q, k, pos_ids, indptr, offsets, cos_sin_cache, rotary_dim, interleave, rope_scale, rope_theta,
               smooth_a, smooth_b)


# ---------------------------------------------------------------------------------------------
# Registered ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("flashtile::rmsnorm", mutates_args=("out",))
def rmsnorm(input: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, eps: float, weight_offset: float) -> None:
    """``out = input * rsqrt(mean(input^2) + eps) * (weight + weight_offset)`` over the last dim;
    input/out ``[rows, N]`` or ``[T, H, N]``, weight ``[N]``."""
    _rmsnorm_impl(input, weight, out, eps, weight_offset)


@rmsnorm.register_fake
def _(input, weight, out, eps, weight_offset) -> None:
    return None


@torch.library.custom_op("flashtile::fused_add_rmsnorm", mutates_args=("input", "residual"))
def fused_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                      weight_offset: float) -> None:
    """In place: ``residual = input + residual``; ``input = rmsnorm(that sum) * (weight + weight_offset)``."""
    _fused_add_rmsnorm_impl(input, residual, weight, eps, weight_offset)


@fused_add_rmsnorm.register_fake
def _(input, residual, weight, eps, weight_offset) -> None:
    return None


@torch.library.custom_op("flashtile::layernorm", mutates_args=("out",))
def layernorm(input: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, out: torch.Tensor, eps: float) -> None:
    """``out = (input - mean) * rsqrt(var + eps) * gamma + beta`` over the last dim."""
    _layernorm_impl(input, gamma, beta, out, eps)


@layernorm.register_fake
def _(input, gamma, beta, out, eps) -> None:
    return None


@torch.library.custom_op("flashtile::act_and_mul", mutates_args=("out",))
def act_and_mul(input: torch.Tensor, out: torch.Tensor, activation: str) -> None:
    """``out [rows, d] = act(input[:, :d]) * input[:, d:]``; activation "silu", "gelu" or "gelu_tanh"."""
    _act_and_mul_impl(input, out, activation)


@act_and_mul.register_fake
def _(input, out, activation) -> None:
    return None


@torch.library.custom_op("flashtile::rope", mutates_args=("q_out", "k_out"))
def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    pos_ids: Optional[torch.Tensor],
    indptr: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor],
    cos_sin_cache: Optional[torch.Tensor],
    rotary_dim: int,
    interleave: bool,
    rope_scale: float,
    rope_theta: float,
    smooth_a: float,
    smooth_b: float,
) -> None:
    """RoPE of q ``[nnz, Hq, D]`` and k ``[nnz, Hk, D]`` into new tensors q_out/k_out (see kernels/rope.py)."""
    _rope_impl(q, k, q_out, k_out, pos_ids, indptr, offsets, cos_sin_cache, rotary_dim, interleave, rope_scale,
               rope_theta, smooth_a, smooth_b)


@rope.register_fake
def _(q, k, q_out, k_out, pos_ids, indptr, offsets, cos_sin_cache, rotary_dim, interleave, rope_scale, rope_theta,
      smooth_a, smooth_b) -> None:
    return None


@torch.library.custom_op("flashtile::rope_inplace", mutates_args=("q", "k"))
def rope_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    pos_ids: Optional[torch.Tensor],
    indptr: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor],
    cos_sin_cache: Optional[torch.Tensor],
    rotary_dim: int,
    interleave: bool,
    rope_scale: float,
    rope_theta: float,
    smooth_a: float,
    smooth_b: float,
) -> None:
    """RoPE of q and k in place; dims past rotary_dim are untouched."""
    _rope_inplace_impl(q, k, pos_ids, indptr, offsets, cos_sin_cache, rotary_dim, interleave, rope_scale,
                       rope_theta, smooth_a, smooth_b)


@rope_inplace.register_fake
def _(q, k, pos_ids, indptr, offsets, cos_sin_cache, rotary_dim, interleave, rope_scale, rope_theta, smooth_a,
      smooth_b) -> None:
    return None


def _mla_rope_quantize_impl(q_rope, k_rope, q_nope, k_nope, cos_sin_cache, pos_ids, q_rope_out, k_rope_out,
                            q_nope_out, k_nope_out, interleave, quant_scale_q, quant_scale_kv) -> None:
    implementation("rope", q_rope.device).mla_rope_quantize(
        q_rope, k_rope, q_nope, k_nope, cos_sin_cache, pos_ids, q_rope_out, k_rope_out, q_nope_out, k_nope_out,
        interleave=interleave, quant_scale_q=quant_scale_q, quant_scale_kv=quant_scale_kv)


@torch.library.custom_op("flashtile::mla_rope_quantize",
                         mutates_args=("q_rope_out", "k_rope_out", "q_nope_out", "k_nope_out"))
def mla_rope_quantize(q_rope: torch.Tensor, k_rope: torch.Tensor, q_nope: torch.Tensor, k_nope: torch.Tensor,
                      cos_sin_cache: torch.Tensor, pos_ids: torch.Tensor, q_rope_out: torch.Tensor,
                      k_rope_out: torch.Tensor, q_nope_out: torch.Tensor, k_nope_out: torch.Tensor, interleave: bool,
                      quant_scale_q: float, quant_scale_kv: float) -> None:
    """MLA's RoPE of the rope parts and fp8 quantization of all four parts (see reference/rope.py)."""
    _mla_rope_quantize_impl(q_rope, k_rope, q_nope, k_nope, cos_sin_cache, pos_ids, q_rope_out, k_rope_out,
                            q_nope_out, k_nope_out, interleave, quant_scale_q, quant_scale_kv)


@mla_rope_quantize.register_fake
def _(q_rope, k_rope, q_nope, k_nope, cos_sin_cache, pos_ids, q_rope_out, k_rope_out, q_nope_out, k_nope_out,
      interleave, quant_scale_q, quant_scale_kv) -> None:
    return None


# Eager calls run the implementation directly (no dispatcher: microseconds of host time matter at
# decode batch sizes); under torch.compile the registered op is what gets traced.
_IMPLS: Dict[object, Callable[..., None]] = {
    rmsnorm: _rmsnorm_impl,
    fused_add_rmsnorm: _fused_add_rmsnorm_impl,
    layernorm: _layernorm_impl,
    act_and_mul: _act_and_mul_impl,
    rope: _rope_impl,
    rope_inplace: _rope_inplace_impl,
    mla_rope_quantize: _mla_rope_quantize_impl,
}


def call(op, *args) -> None:
    """Run ``op`` (one of this module's ops): its implementation when eager, the op when compiling."""
    (op if torch.compiler.is_compiling() else _IMPLS[op])(*args)


# op -> (implementation module family, function name) of the function that runs it eagerly.
_EAGER_FUNCTIONS = {
    rmsnorm: ("norm", "rmsnorm"),
    fused_add_rmsnorm: ("norm", "fused_add_rmsnorm"),
    layernorm: ("norm", "layernorm"),
    act_and_mul: ("activation", "act_and_mul"),
    rope: ("rope", "apply_rope"),
    rope_inplace: ("rope", "apply_rope"),
}


def eager_function(op, device: torch.device):
    """The kernel or reference function that runs ``op`` eagerly for tensors on ``device``, for callers
    that remember it per argument key (_core/memo.py) and then call it directly, with a
    ``launch_key``: ``rmsnorm(input, weight, out, eps, weight_offset, launch_key)``,
    ``fused_add_rmsnorm(input, residual, weight, eps, weight_offset, launch_key)``,
    ``layernorm(input, gamma, beta, out, eps, launch_key)``, ``act_and_mul(input, out, activation,
    launch_key)``, and for both RoPE ops ``apply_rope(q, k, q_out, k_out, *, rotary_dim, interleave,
    pos_ids, indptr, offsets, cos_sin_cache, rope_scale, rope_theta, smooth_a, smooth_b, launch_key)``."""
    family, name = _EAGER_FUNCTIONS[op]
    return getattr(implementation(family, device), name)


# op -> name of the runner factory (same name in kernels/norm.py and reference/norm.py).
_RUNNERS = {
    rmsnorm: "rmsnorm_runner",
    fused_add_rmsnorm: "fused_add_rmsnorm_runner",
}


def eager_runner(op, device: torch.device, key):
    """The function that runs ``op`` eagerly for tensors on ``device`` whose metadata is ``key``, made once
    per key by callers that keep it in their memo (_core/memo.py): ``rmsnorm``: ``run(input, weight, out,
    eps, weight_offset)``; ``fused_add_rmsnorm``: ``run(input, residual, weight, eps, weight_offset)``. On the
    kernel path it replays the recorded launch (kernels/norm.py's runners)."""
    family, _ = _EAGER_FUNCTIONS[op]
    return getattr(implementation(family, device), _RUNNERS[op])(key)
