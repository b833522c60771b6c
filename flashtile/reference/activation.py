"""Gated activations in pure PyTorch: the CPU path and the readable spec of ``kernels/activation.py``.

``input [..., 2d]`` -> ``out [..., d] = act(input[..., :d]) * input[..., d:]``, in float32 on upcast
inputs, rounded once to ``out``'s dtype.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ACTIVATIONS", "activation", "act_and_mul"]

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """silu ``x * sigmoid(x)``; gelu (erf) ``x/2 * (1 + erf(x / sqrt 2))``; gelu_tanh
    ``x/2 * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    if name == "silu":
        return x * torch.sigmoid(x)
    if name == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")


def act_and_mul(input: torch.Tensor, out: torch.Tensor, name: str, launch_key=None) -> None:
    # launch_key: the kernels' launch-memo key (same signature as kernels/activation.py); unused here.
    d = input.shape[-1] // 2
    x = input.float()
    out.copy_(activation(x[..., :d], name) * x[..., d:])
