"""The plain PyTorch engine the example engine is checked against (:class:`ReferenceEngine`)."""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .engine import EngineBase, Request, Sampling
from .model import TorchOps, Weights, forward

# ---------------------------------------------------------------------------------------------
# The plain PyTorch engine
# ---------------------------------------------------------------------------------------------


class ReferenceEngine(EngineBase):
    """The same serving loop in plain PyTorch: each placed request owns a slot of one contiguous KV buffer
    ``[layers, 2, max_batch, kv_heads, max_len, head_dim]``; attention is ``scaled_dot_product_attention``
    (prefill per request, decode over the batch with a length mask); torch sampling; the system prompt is
    prefilled with every request (no sharing)."""

    name = "pytorch"

    def __init__(self, weights: Weights, max_batch: int = 32, prefill_chunk: int = 2048,
                 sampling: Optional[Sampling] = None) -> None:
        super().__init__(weights, 1, max_batch, prefill_chunk, sampling or Sampling())
        self.ops = TorchOps()
        self.cache: Optional[torch.Tensor] = None
        self.gen = torch.Generator(device=self.device).manual_seed(self.sampling.seed)

    def begin(self, requests: List[Request], system: List[int]) -> List[Request]:
        max_len = max(len(system) + len(r.prompt) + r.max_new for r in requests)
        c = self.c
        if self.cache is None or self.cache.shape[4] < max_len:
            self.cache = torch.zeros(c.num_layers, 2, self.max_batch, c.num_kv_heads, max_len, c.head_dim,
                                     dtype=self.dtype, device=self.device)
        self.free_slots = list(range(self.max_batch))
        for r in requests:
            r.prompt = system + r.prompt
        return requests

    def release(self, r: Request) -> None:
        self.free_slots.append(r.slot)

    def prefill(self, items) -> Optional[torch.Tensor]:
        tokens: List[int] = []
        positions: List[int] = []
        rows: List[int] = []
        spans: List[Tuple[int, int, int, int]] = []
        for r, start, end in items:
            if r.slot < 0:
                r.slot = self.free_slots.pop()
            spans.append((r.slot, start, end, len(tokens)))
            tokens += r.prompt[start:end]
            positions += range(start, end)
            if end == len(r.prompt):
                rows.append(len(tokens) - 1)
        dev = self.device

        def attend(layer, q, k, v):
            assert self.cache is not None  # allocated by begin
            out = torch.empty_like(q)
            for slot, start, end, row in spans:
                n = end - start
                kc, vc = self.cache[layer, 0, slot], self.cache[layer, 1, slot]  # [Hkv, max_len, D]
                kc[:, start:end] = k[row:row + n].transpose(0, 1)
                vc[:, start:end] = v[row:row + n].transpose(0, 1)
                # query i sits at position start + i and sees keys 0 .. start + i
                mask = torch.arange(end, device=dev)[None] <= torch.arange(start, end, device=dev)[:, None]
                o = F.scaled_dot_product_attention(q[row:row + n].transpose(0, 1)[None], kc[None, :, :end],
                                                   vc[None, :, :end], attn_mask=mask, enable_gqa=True)
                out[row:row + n] = o[0].transpose(0, 1)
            return out

        return forward(self.w, self.ops, torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev),
                       attend, torch.tensor(rows, dtype=torch.long, device=dev))

    def decode(self, reqs: List[Request]) -> torch.Tensor:
        dev = self.device
        slots = torch.tensor([r.slot for r in reqs], device=dev)
        lens = [r.kv_len + 1 for r in reqs]
        pos = torch.tensor([n - 1 for n in lens], device=dev)
        width = max(lens)
        mask = (torch.arange(width, device=dev)[None] < torch.tensor(lens, device=dev)[:, None])[:, None, None]

        def attend(layer, q, k, v):
            assert self.cache is not None  # allocated by begin
            kc, vc = self.cache[layer, 0], self.cache[layer, 1]  # [slots, Hkv, max_len, D]
            kc[slots, :, pos] = k
            vc[slots, :, pos] = v
            o = F.scaled_dot_product_attention(q[:, :, None], kc[slots, :, :width], vc[slots, :, :width],
                                               attn_mask=mask, enable_gqa=True)
            return o[:, :, 0]

        return forward(self.w, self.ops, torch.tensor([r.output[-1] for r in reqs], device=dev), pos, attend)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        s = self.sampling
        if s.greedy:
            return logits.argmax(dim=-1)
        logits = logits / s.temperature
        kth = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        probs = logits.masked_fill(logits < kth, -math.inf).softmax(dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(dim=-1) - sorted_p > s.top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        return torch.multinomial(probs, 1, generator=self.gen)[:, 0]
