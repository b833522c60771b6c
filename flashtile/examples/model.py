"""The example engine's model: a Llama-architecture decoder (RMSNorm, RoPE, grouped-query attention,
SwiGLU) with random weights from a fixed seed, and one forward pass whose norm, RoPE, activation and
attention are pluggable (the kernel library's ops, or plain PyTorch ones)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, overload

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# The model: configuration, seeded weights, one forward pass with pluggable ops
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-architecture decoder's shape."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 500000.0
    eps: float = 1e-5

    @property
    def num_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = h * (self.num_qo_heads + 2 * self.num_kv_heads) * d + self.num_qo_heads * d * h
        mlp = 3 * h * self.intermediate_size
        return self.num_layers * (attn + mlp + 2 * h) + 2 * self.vocab_size * h + h


MODELS: Dict[str, ModelConfig] = {
    # seconds on a CPU: the demo's and the tests' default there
    "tiny": ModelConfig(vocab_size=512, hidden_size=128, num_layers=2, num_qo_heads=4, num_kv_heads=2,
                        head_dim=32, intermediate_size=256, rope_theta=10000.0),
    "small": ModelConfig(vocab_size=32000, hidden_size=512, num_layers=8, num_qo_heads=8, num_kv_heads=2,
                         head_dim=64, intermediate_size=1536),
    # Llama-3.2-1B's shape (untied output head: 1.5B parameters)
    "1b": ModelConfig(vocab_size=128256, hidden_size=2048, num_layers=16, num_qo_heads=32, num_kv_heads=8,
                      head_dim=64, intermediate_size=8192),
}


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [hidden]
    wqkv: torch.Tensor       # [(Hq + 2 Hkv) * D, hidden]: q, k, v projections stacked
    wo: torch.Tensor         # [hidden, Hq * D]
    mlp_norm: torch.Tensor   # [hidden]
    w_gate_up: torch.Tensor  # [2 * intermediate, hidden]: gate then up
    w_down: torch.Tensor     # [hidden, intermediate]


@dataclass
class Weights:
    config: ModelConfig
    embed: torch.Tensor      # [vocab, hidden]
    layers: List[LayerWeights]
    final_norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor    # float32 [vocab, hidden]: logits in float32, not rounded to bf16 (where ties are common)
    cos_sin: torch.Tensor    # float32 [max_position, D]: cos in the first D/2 columns, sin in the rest

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def to(self, dtype: torch.dtype) -> "Weights":
        """A copy in another dtype (the float32 copy measures the model's rounding noise)."""
        def cast(t):
            return t.to(dtype)
        layers = [LayerWeights(*(cast(getattr(lw, f)) for f in LayerWeights.__dataclass_fields__))
                  for lw in self.layers]
        return Weights(self.config, cast(self.embed), layers, cast(self.final_norm), self.lm_head, self.cos_sin)


def init_weights(config: ModelConfig, device, dtype: torch.dtype, seed: int = 0, max_position: int = 8192) -> Weights:
    """Random weights from ``seed``, drawn on ``device`` (the same seed gives other numbers on another
    device type). Every linear layer has unit-variance outputs (std ``1/sqrt(fan_in)``) so that each
    layer, attention included, moves the residual stream and the next-token choice depends on the
    context; norm weights are 1 plus a little noise."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)

    def norm_weight():
        return (1.0 + 0.1 * torch.randn(config.hidden_size, generator=gen, device=device)).to(dtype)

    h, d, inter = config.hidden_size, config.head_dim, config.intermediate_size
    qkv_rows = (config.num_qo_heads + 2 * config.num_kv_heads) * d
    layers = [LayerWeights(norm_weight(), randn(qkv_rows, h, std=h ** -0.5),
                           randn(h, config.num_qo_heads * d, std=(config.num_qo_heads * d) ** -0.5),
                           norm_weight(), randn(2 * inter, h, std=h ** -0.5), randn(h, inter, std=inter ** -0.5))
              for _ in range(config.num_layers)]
    inv_freq = config.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
    angles = torch.arange(max_position, dtype=torch.float64, device=device)[:, None] * inv_freq[None]
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=1).float()
    lm_head = torch.randn(config.vocab_size, h, generator=gen, device=device) * h ** -0.5
    return Weights(config, randn(config.vocab_size, h), layers, norm_weight(), lm_head, cos_sin)


class KernelOps:
    """RMSNorm, RoPE and SiLU-and-mul from a kernel library (``flashtile``, or ``flashinfer``)."""

    def __init__(self, kernels) -> None:
        self.k = kernels

    def rmsnorm(self, x, w, eps):
        return self.k.rmsnorm(x, w, eps)

    def add_rmsnorm(self, x, residual, w, eps):
        self.k.fused_add_rmsnorm(x, residual, w, eps)  # residual += x; x = rmsnorm(residual), in place

    def rope(self, positions, q, k, cos_sin, head_dim):
        self.k.apply_rope_with_cos_sin_cache_inplace(positions=positions, query=q, key=k, head_size=head_dim,
                                                     cos_sin_cache=cos_sin, is_neox=True)

    def silu_and_mul(self, x):
        return self.k.silu_and_mul(x)

    @staticmethod
    def all_reduce(x):
        """Sum of the row-parallel partial outputs over the ranks: one device holds the whole sum."""
        return x


class TorchOps:
    """The same three ops in plain PyTorch (float32 math, rounded to the activations' dtype)."""

    @staticmethod
    def rmsnorm(x, w, eps):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)

    def add_rmsnorm(self, x, residual, w, eps):
        s = x.float() + residual.float()
        residual.copy_(s)
        x.copy_(s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * w.float())

    @staticmethod
    def rope(positions, q, k, cos_sin, head_dim):
        cos, sin = cos_sin[positions.long()].chunk(2, dim=-1)  # [T, D/2] each
        for x in (q, k):
            xv = x.view(x.shape[0], -1, head_dim)
            x1, x2 = xv.float().chunk(2, dim=-1)
            c, s = cos[:, None], sin[:, None]
            xv.copy_(torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1))

    @staticmethod
    def silu_and_mul(x):
        gate, up = x.chunk(2, dim=-1)
        return (F.silu(gate.float()) * up.float()).to(x.dtype)

    @staticmethod
    def all_reduce(x):
        return x


# attend(layer, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> o [T, Hq, D]: stores k, v and attends.
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@overload
def forward(w: Weights, ops, tokens: torch.Tensor, positions: torch.Tensor, attend: Attend,
            logit_rows: None = None) -> torch.Tensor: ...


@overload
def forward(w: Weights, ops, tokens: torch.Tensor, positions: torch.Tensor, attend: Attend,
            logit_rows: Optional[torch.Tensor]) -> Optional[torch.Tensor]: ...


def forward(w: Weights, ops, tokens: torch.Tensor, positions: torch.Tensor, attend: Attend,
            logit_rows: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """One pass over a flat batch of ``T`` tokens (all requests' rows concatenated).

    Tensor-parallel ranks run it on their shard (:mod:`flashtile.examples.parallel`): ``w.config`` then
    counts the rank's heads and MLP columns, and ``ops.all_reduce`` sums the output and down projections'
    partial results over the ranks (on one device it returns its argument).

    Args:
        tokens: int64 ``[T]``; positions: int64 ``[T]``, each token's position in its sequence.
        attend: the engine's attention (KV cache write + attention over the cache).
        logit_rows: int64 rows whose next-token logits are wanted (default: all); empty: none.

    Returns:
        float32 ``[len(logit_rows), vocab]`` logits, or None when no row is wanted.
    """
    c = w.config
    t, hq, hkv, d = tokens.shape[0], c.num_qo_heads, c.num_kv_heads, c.head_dim
    x = w.embed[tokens]
    residual = None
    for i, lw in enumerate(w.layers):
        if residual is None:
            residual, x = x, ops.rmsnorm(x, lw.attn_norm, c.eps)
        else:
            ops.add_rmsnorm(x, residual, lw.attn_norm, c.eps)
        qkv = x @ lw.wqkv.T  # [T, (Hq + 2 Hkv) D]; q, k, v are strided views of it
        q, k, v = qkv[:, :hq * d], qkv[:, hq * d:(hq + hkv) * d], qkv[:, (hq + hkv) * d:]
        ops.rope(positions, q, k, w.cos_sin, d)
        o = attend(i, q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d))
        x = ops.all_reduce(o.reshape(t, hq * d) @ lw.wo.T)
        ops.add_rmsnorm(x, residual, lw.mlp_norm, c.eps)
        x = ops.all_reduce(ops.silu_and_mul(x @ lw.w_gate_up.T) @ lw.w_down.T)
    assert residual is not None  # set by the first layer; a model has at least one
    if logit_rows is not None:
        if logit_rows.numel() == 0:
            return None
        x, residual = x[logit_rows], residual[logit_rows]
    ops.add_rmsnorm(x, residual, w.final_norm, c.eps)
    return x.float() @ w.lm_head.T


def make_requests(num: int, prompt_lens: Tuple[int, int], new_tokens: Tuple[int, int], vocab: int,
                  seed: int = 0) -> Tuple[List[List[int]], List[int]]:
    """``num`` prompts of random tokens with lengths drawn from ``prompt_lens`` (inclusive) and output
    lengths from ``new_tokens`` (inclusive), from ``seed``."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(*prompt_lens))] for _ in range(num)]
    return prompts, [rng.randint(*new_tokens) for _ in range(num)]


def system_prompt(length: int, vocab: int, seed: int = 0) -> List[int]:
    rng = random.Random(seed + 7919)
    return [rng.randrange(vocab) for _ in range(length)]
