"""Normalization layers in pure PyTorch: the CPU path and the readable spec of ``kernels/norm.py``.

Every function computes in float32 on upcast inputs and writes its result into the given tensors
(rounded to their dtype), like the kernels. Rows are the last dimension. Signatures are the kernels'
(``launch_key``, the kernels' launch-memo key, is accepted and unused; the ``*_runner`` factories return
the function itself with the kernels' runner signature).
"""

from __future__ import annotations

import torch

__all__ = ["rmsnorm", "fused_add_rmsnorm", "layernorm", "rmsnorm_runner", "fused_add_rmsnorm_runner"]


def _rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / sqrt(mean(x**2) + eps)`` over the last dim, float32, keepdim."""
    return torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)


def rmsnorm(input: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, eps: float, weight_offset: float = 0.0,
            launch_key=None) -> None:
    """``out = input / sqrt(mean(input**2) + eps) * (weight + weight_offset)``; ``weight_offset`` is 1
    for Gemma's RMSNorm."""
    x = input.float()
    out.copy_(x * _rms_scale(x, eps) * (weight.float() + weight_offset))


def fused_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                      weight_offset: float = 0.0, launch_key=None) -> None:
    """In place: ``s = input + residual`` (float32); ``residual = s`` (rounded); ``input = rmsnorm(s)``
    where the norm uses the float32 sum ``s``, not the rounded residual."""
    s = input.float() + residual.float()
    residual.copy_(s)
    input.copy_(s * _rms_scale(s, eps) * (weight.float() + weight_offset))


def layernorm(input: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, out: torch.Tensor, eps: float,
              launch_key=None) -> None:
    """``out = (input - mean) / sqrt(var + eps) * gamma + beta`` over the last dim (biased variance)."""
    x = input.float()
    mean = x.mean(dim=-1, keepdim=True)
    var = (x - mean).square().mean(dim=-1, keepdim=True)
    out.copy_((x - mean) * torch.rsqrt(var + eps) * gamma.float() + beta.float())


def rmsnorm_runner(launch_key):
    """``run(input, weight, out, eps, weight_offset)`` (kernels/norm.py's runner signature)."""
    return rmsnorm


def fused_add_rmsnorm_runner(launch_key):
    """``run(input, residual, weight, eps, weight_offset)`` (kernels/norm.py's runner signature)."""
    return fused_add_rmsnorm
