"""A small LLM serving engine on flashtile's kernels, and a plain PyTorch engine to check it against.

The model is a Llama-architecture decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) with
random weights drawn from a fixed seed. :class:`PagedEngine` serves a list of requests the way a
serving engine does (docs/serving.md walks through it):

- a paged KV cache (one ``[pages, 2, page_size, kv_heads, head_dim]`` tensor per layer) whose pages a
  :class:`PageAllocator` hands out and takes back; new K/V rows go in with ``append_paged_kv_cache``;
- continuous batching (:class:`Scheduler`): up to ``max_batch`` requests hold a place; a finished
  request frees its place and its pages, and the next waiting request takes them; prefill comes first
  and is cut into chunks of at most ``prefill_chunk`` tokens per step;
- a system prompt shared by every request: its KV is computed once into shared pages; prefill reads it
  through ``MultiLevelCascadeAttentionWrapper`` (level 0: the shared pages, read once per step for all
  query rows; level 1: each request's own pages, causal) and decode lists the shared pages at the
  head of every request's page table;
- attention planned once per step and run once per layer (``plan()`` then ``run()``); decode on a GPU
  replays a CUDA graph captured per batch-size bucket (``use_cuda_graph=True``; re-plan, then replay);
- sampling with ``sampling.top_k_top_p_sampling_from_logits`` (``top_k=1``: greedy);
- RMSNorm, RoPE and SiLU-and-mul from the kernel library.

The kernel library is an argument: ``PagedEngine(..., kernels=flashtile)`` or, where FlashInfer is
installed, ``kernels=flashinfer`` (the same calls, FlashInfer's kernels). :class:`ReferenceEngine`
serves the same requests with plain PyTorch (one contiguous KV buffer per request, ``scaled_dot_product_attention``,
torch sampling) and no prefix sharing (it prefills the system prompt with every request).
Only torch is needed.
"""

from __future__ import annotations

import collections
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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


# attend(layer, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> o [T, Hq, D]: stores k, v and attends.
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def forward(w: Weights, ops, tokens: torch.Tensor, positions: torch.Tensor, attend: Attend,
            logit_rows: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """One pass over a flat batch of ``T`` tokens (all requests' rows concatenated).

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
        x = o.reshape(t, hq * d) @ lw.wo.T
        ops.add_rmsnorm(x, residual, lw.mlp_norm, c.eps)
        x = ops.silu_and_mul(x @ lw.w_gate_up.T) @ lw.w_down.T
    if logit_rows is not None:
        if logit_rows.numel() == 0:
            return None
        x, residual = x[logit_rows], residual[logit_rows]
    ops.add_rmsnorm(x, residual, w.final_norm, c.eps)
    return x.float() @ w.lm_head.T


# ---------------------------------------------------------------------------------------------
# Requests, sampling settings, scheduling
# ---------------------------------------------------------------------------------------------


@dataclass
class Sampling:
    """Per-run sampling settings; ``greedy`` takes the most likely token (top-k with k = 1)."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 0.9
    seed: int = 0


@dataclass
class Request:
    """One request as an engine sees it: ``prompt`` are the tokens this engine prefills, starting at
    sequence position ``offset`` (the part of a shared system prompt it does not prefill)."""

    rid: int
    prompt: List[int]
    max_new: int
    offset: int = 0
    prefilled: int = 0
    output: List[int] = field(default_factory=list)
    first_token_s: Optional[float] = None
    pages: List[int] = field(default_factory=list)  # own pages (PagedEngine)
    slot: int = -1                                  # KV buffer (ReferenceEngine)

    @property
    def kv_len(self) -> int:
        """Tokens in the KV cache when the next step runs (the newest output token is not there yet)."""
        return self.offset + self.prefilled + max(len(self.output) - 1, 0)


class Scheduler:
    """Continuous batching: at most ``max_batch`` requests hold a place; prefill first (chunks of at most
    ``prefill_chunk`` tokens per step, several requests per step), else one decode step of all placed ones."""

    def __init__(self, requests: Sequence[Request], max_batch: int, prefill_chunk: int) -> None:
        self.waiting = collections.deque(requests)
        self.active: List[Request] = []
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk

    def has_work(self) -> bool:
        return bool(self.waiting or self.active)

    def next_step(self) -> Tuple[str, list]:
        while self.waiting and len(self.active) < self.max_batch:
            self.active.append(self.waiting.popleft())
        items, budget = [], self.prefill_chunk
        for r in self.active:
            left = len(r.prompt) - r.prefilled
            if left and budget:
                n = min(left, budget)
                items.append((r, r.prefilled, r.prefilled + n))
                budget -= n
        if items:
            return "prefill", items
        return "decode", list(self.active)

    def finish(self, r: Request) -> None:
        self.active.remove(r)


@dataclass
class StepRecord:
    kind: str       # "prefill" or "decode"
    tokens: int     # query rows of the step
    seconds: float


@dataclass
class RunResult:
    outputs: Dict[int, List[int]]
    ttft_s: Dict[int, float]
    steps: List[StepRecord]
    total_s: float
    first_logits: Dict[int, torch.Tensor] = field(default_factory=dict)  # float32 [vocab] on CPU
    # teacher-forced comparison: (rid, token index, own argmax, forced token, own gap = logit[argmax] - logit[forced])
    mismatches: List[Tuple[int, int, int, int, float]] = field(default_factory=list)
    compared: int = 0


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class EngineBase:
    """The serving loop both engines share; subclasses provide prefill, decode and sample."""

    name = "engine"

    def __init__(self, weights: Weights, page_size: int, max_batch: int, prefill_chunk: int, sampling: Sampling):
        self.w, self.c = weights, weights.config
        self.device, self.dtype = weights.device, weights.dtype
        self.page_size, self.max_batch, self.prefill_chunk = page_size, max_batch, prefill_chunk
        self.sampling = sampling

    # subclass interface ------------------------------------------------------------------
    def begin(self, requests: List[Request], system: List[int]) -> List[Request]:
        raise NotImplementedError

    def prefill(self, items) -> Optional[torch.Tensor]:
        raise NotImplementedError

    def decode(self, reqs: List[Request]) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def release(self, r: Request) -> None:
        raise NotImplementedError

    # the loop ----------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, prompts: Sequence[Sequence[int]], max_new: Sequence[int], system: Sequence[int] = (),
            forced: Optional[Dict[int, List[int]]] = None, keep_first_logits: bool = False,
            progress: Optional[Callable[[int], None]] = None) -> RunResult:
        """Serve ``prompts`` (each prefixed by ``system``), ``max_new[i]`` tokens each, all arriving at once.

        ``forced``: teacher forcing (checking one engine against another): request ``rid`` continues with
        ``forced[rid]`` whatever this engine samples; every step records where its own greedy choice differs
        from the forced token, and by how much (in this engine's logits). ``progress(n)`` is called with the
        number of tokens each step produced.
        """
        t0 = _now(self.device)
        reqs = self.begin([Request(i, list(p), int(n)) for i, (p, n) in enumerate(zip(prompts, max_new))],
                          list(system))
        sched = Scheduler(reqs, self.max_batch, self.prefill_chunk)
        result = RunResult({}, {}, [], 0.0)
        while sched.has_work():
            kind, items = sched.next_step()
            ts = time.perf_counter()
            if kind == "prefill":
                logits = self.prefill(items)
                for r, _, end in items:
                    r.prefilled = end
                done = [r for r, _, end in items if end == len(r.prompt)]
                rows = sum(end - start for _, start, end in items)
            else:
                done, rows = items, len(items)
                logits = self.decode(items)
            tokens = self.sample(logits).tolist() if done else []
            if forced is not None and done:
                self._compare(result, done, logits, forced)
            now = _now(self.device)
            for i, (r, tok) in enumerate(zip(done, tokens)):
                if not r.output:
                    r.first_token_s = now - t0
                    if keep_first_logits:
                        result.first_logits[r.rid] = logits[i].cpu()
                r.output.append(forced[r.rid][len(r.output)] if forced is not None else int(tok))
                if len(r.output) == r.max_new:
                    sched.finish(r)
                    self.release(r)
            result.steps.append(StepRecord(kind, rows, now - ts))
            if progress is not None and done:
                progress(len(done))
        result.total_s = _now(self.device) - t0
        for r in reqs:
            result.outputs[r.rid], result.ttft_s[r.rid] = r.output, r.first_token_s
        return result

    @staticmethod
    def _compare(result: RunResult, reqs: List[Request], logits: torch.Tensor, forced) -> None:
        want = torch.tensor([forced[r.rid][len(r.output)] for r in reqs], device=logits.device)
        best = logits.max(dim=-1)
        gap = (best.values - logits.gather(1, want[:, None])[:, 0]).tolist()
        own = best.indices.tolist()
        result.compared += len(reqs)
        for r, g, o, f in zip(reqs, gap, own, want.tolist()):
            if o != f and g > 0:
                result.mismatches.append((r.rid, len(r.output), o, f, g))


# ---------------------------------------------------------------------------------------------
# The paged engine on the kernel library
# ---------------------------------------------------------------------------------------------


class PageAllocator:
    """Hands out page ids from a free list (shuffled, so requests' pages are scattered as in a long-running
    server) and takes them back."""

    def __init__(self, num_pages: int, seed: int = 0) -> None:
        self.free = list(range(num_pages))
        random.Random(seed).shuffle(self.free)

    def alloc(self, n: int) -> List[int]:
        if n > len(self.free):
            raise RuntimeError(f"KV cache out of pages: need {n}, {len(self.free)} free")
        pages, self.free = self.free[:n], self.free[n:]
        return pages

    def release(self, pages: List[int]) -> None:
        self.free.extend(pages)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def graph_buckets(max_batch: int) -> List[int]:
    """Decode batch sizes that get a CUDA graph (a batch runs in the smallest bucket that holds it)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return sizes + [max_batch]


class PagedEngine(EngineBase):
    """Serving on a paged KV cache with the kernel library's wrappers (see the module docstring).

    Args:
        weights: the model (its device and dtype are the engine's).
        kernels: the kernel library, ``flashtile`` (default) or ``flashinfer``.
        page_size: tokens per KV page. max_batch: requests served at once. prefill_chunk: most prefill
            tokens per step. sampling: :class:`Sampling`.
        num_pages: size of the page pool (sized by :meth:`begin` from the requests when None).
        cuda_graphs: capture decode in CUDA graphs (GPU only; default: on a GPU).
    """

    name = "flashtile"

    def __init__(self, weights: Weights, kernels=None, page_size: int = 16, max_batch: int = 32,
                 prefill_chunk: int = 2048, sampling: Optional[Sampling] = None, num_pages: Optional[int] = None,
                 cuda_graphs: Optional[bool] = None) -> None:
        super().__init__(weights, page_size, max_batch, prefill_chunk, sampling or Sampling())
        if kernels is None:
            import flashtile as kernels
        self.k, self.ops = kernels, KernelOps(kernels)
        self.name = kernels.__name__
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs and
                                                                                       self.device.type == "cuda")
        self.num_pages = num_pages
        self.cache: Optional[torch.Tensor] = None
        self.workspace = torch.empty(128 << 20, dtype=torch.uint8, device=self.device)
        kw = dict(kv_layout="NHD")
        self.prefill_wrapper = kernels.BatchPrefillWithPagedKVCacheWrapper(self.workspace, **kw)
        self.cascade_wrapper = kernels.MultiLevelCascadeAttentionWrapper(2, self.workspace, **kw)
        self.decode_wrapper = kernels.BatchDecodeWithPagedKVCacheWrapper(self.workspace, **kw)
        self.gen = torch.Generator(device=self.device).manual_seed(self.sampling.seed)
        self.graphs: Dict[int, tuple] = {}
        self.shared_pages: List[int] = []

    # set-up --------------------------------------------------------------------------------
    def _heads(self):
        c = self.c
        return dict(num_qo_heads=c.num_qo_heads, num_kv_heads=c.num_kv_heads, page_size=self.page_size)

    def _ensure_cache(self, pages_needed: int) -> None:
        """One zeroed NHD cache ``[layers, pages, 2, page_size, kv_heads, head_dim]`` (page 0 is the
        scratch page that CUDA-graph padding rows point at)."""
        pages = max(self.num_pages or 0, pages_needed + 1)
        if self.cache is not None and self.cache.shape[1] >= pages:
            return
        c = self.c
        self.cache = torch.zeros(c.num_layers, pages, 2, self.page_size, c.num_kv_heads, c.head_dim,
                                 dtype=self.dtype, device=self.device)
        self.allocator = PageAllocator(pages - 1)
        self.allocator.free = [p + 1 for p in self.allocator.free]
        self.graphs.clear()

    def begin(self, requests: List[Request], system: List[int]) -> List[Request]:
        """Size the page pool, prefill the whole pages of the system prompt once into shared pages, and
        hand each request the rest of the system prompt as the head of its own prompt."""
        p = self.page_size
        shared = (len(system) // p) * p
        own_pages = [_cdiv(len(system) - shared + len(r.prompt) + r.max_new, p) for r in requests]
        self._ensure_cache(shared // p + sum(own_pages))
        if self.shared_pages:
            self.allocator.release(self.shared_pages)
        self.shared_pages = []
        if shared:  # the system prompt as a request of its own; its pages become the shared pages
            sys_req = Request(-1, system[:shared], 0, pages=self.allocator.alloc(shared // p))
            self._prefill_plain([(sys_req, 0, shared)])
            self.shared_pages = sys_req.pages
        for r in requests:
            r.prompt, r.offset = system[shared:] + r.prompt, shared
        return requests

    def release(self, r: Request) -> None:
        self.allocator.release(r.pages)
        r.pages = []

    def _grow(self, r: Request, tokens: int) -> None:
        """Give ``r`` enough own pages for ``tokens`` own tokens (positions past the shared prefix)."""
        need = _cdiv(tokens, self.page_size) - len(r.pages)
        if need > 0:
            r.pages += self.allocator.alloc(need)

    def _table(self, reqs: Sequence[Request], lens: Sequence[int], shared: bool):
        """Page table (indptr, indices, last_page_len) of ``reqs`` holding ``lens`` tokens each; with
        ``shared`` the shared pages head every request's list and ``lens`` count them."""
        p, head = self.page_size, self.shared_pages if shared else []
        indptr, indices, last = [0], [], []
        for r, n in zip(reqs, lens):
            pages = (head + r.pages)[:_cdiv(n, p)]
            indices += pages
            indptr.append(len(indices))
            last.append((n - 1) % p + 1 if n else 0)
        i32 = dict(dtype=torch.int32)
        return torch.tensor(indptr, **i32), torch.tensor(indices, **i32).to(self.device), torch.tensor(last, **i32)

    # prefill -----------------------------------------------------------------------------------
    def prefill(self, items) -> Optional[torch.Tensor]:
        return self._prefill_plain(items) if not self.shared_pages else self._prefill_cascade(items)

    def _prefill_inputs(self, items):
        tokens, positions, qo, rows = [], [], [0], []
        for r, start, end in items:
            self._grow(r, end)
            tokens += r.prompt[start:end]
            positions += range(r.offset + start, r.offset + end)
            qo.append(qo[-1] + end - start)
            if end == len(r.prompt):
                rows.append(qo[-1] - 1)
        dev = self.device
        return (torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev),
                torch.tensor(qo, dtype=torch.int32), torch.tensor(rows, device=dev, dtype=torch.long))

    def _append_args(self, items, qo):
        """Where each new K/V row goes: the request's full table (shared pages first), absolute positions."""
        reqs = [r for r, _, _ in items]
        lens = [r.offset + end for r, _, end in items]
        indptr, indices, last = self._table(reqs, lens, shared=True)
        dev = self.device
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
        batch, pos = self.k.get_batch_indices_positions(qo.to(dev), seq_lens, int(qo[-1]))
        return batch, pos, indices, indptr.to(dev), last.to(dev)

    def _prefill_plain(self, items) -> Optional[torch.Tensor]:
        tokens, positions, qo, rows = self._prefill_inputs(items)
        reqs = [r for r, _, _ in items]
        indptr, indices, last = self._table(reqs, [r.offset + end for r, _, end in items], shared=True)
        self.prefill_wrapper.plan(qo, indptr, indices, last, head_dim_qk=self.c.head_dim, causal=True,
                                  q_data_type=self.dtype, kv_data_type=self.dtype, **self._heads())
        return forward(self.w, self.ops, tokens, positions,
                       self._attend(self.prefill_wrapper, self._append_args(items, qo)), rows)

    def _prefill_cascade(self, items) -> Optional[torch.Tensor]:
        tokens, positions, qo, rows = self._prefill_inputs(items)
        reqs = [r for r, _, _ in items]
        i32 = dict(dtype=torch.int32)
        shared = (torch.tensor([0, int(qo[-1])], **i32), torch.tensor([0, len(self.shared_pages)], **i32),
                  torch.tensor(self.shared_pages, **i32).to(self.device), torch.tensor([self.page_size], **i32))
        own = self._table(reqs, [end for _, _, end in items], shared=False)
        self.cascade_wrapper.plan([shared[0], qo], [shared[1], own[0]], [shared[2], own[1]], [shared[3], own[2]],
                                  head_dim=self.c.head_dim, causal=True, q_data_type=self.dtype,
                                  kv_data_type=self.dtype, **self._heads())
        return forward(self.w, self.ops, tokens, positions,
                       self._attend(self.cascade_wrapper, self._append_args(items, qo)), rows)

    def _attend(self, wrapper, append) -> Attend:
        batch, pos, indices, indptr, last = append

        def attend(layer, q, k, v):
            kv = self.cache[layer]
            self.k.append_paged_kv_cache(k, v, batch, pos, kv, indices, indptr, last)
            return wrapper.run(q, kv)
        return attend

    # decode ------------------------------------------------------------------------------------
    def _decode_table(self, reqs: List[Request], rows: int):
        """Inputs of one decode step padded to ``rows``: the last token of each request, its position,
        the page table after the append (padding rows: no pages), and the append's row -> request map."""
        lens = []
        for r in reqs:
            self._grow(r, r.kv_len + 1 - r.offset)
            lens.append(r.kv_len + 1)
        pad = rows - len(reqs)
        indptr, indices, last = self._table(reqs, lens, shared=True)
        indptr = torch.cat([indptr, indptr[-1:].repeat(pad)])
        last = torch.cat([last, torch.zeros(pad, dtype=torch.int32)])
        tokens = [r.output[-1] for r in reqs] + [0] * pad
        positions = [n - 1 for n in lens] + [0] * pad
        batch = list(range(len(reqs))) + [-1] * pad  # -1: a padding row, not written
        return tokens, positions, batch, indptr, indices, last

    def decode(self, reqs: List[Request]) -> torch.Tensor:
        b = len(reqs)
        if self.cuda_graphs:
            bucket = next(s for s in graph_buckets(self.max_batch) if s >= b)
            return self._replay(bucket, reqs)[:b]
        tokens, positions, batch, indptr, indices, last = self._decode_table(reqs, b)
        self.decode_wrapper.plan(indptr, indices, last, head_dim=self.c.head_dim, q_data_type=self.dtype,
                                 kv_data_type=self.dtype, **self._heads())
        dev = self.device
        positions = torch.tensor(positions, device=dev)
        append = (torch.tensor(batch, dtype=torch.int32, device=dev), positions.to(torch.int32), indices,
                  indptr.to(dev), last.to(dev))
        return forward(self.w, self.ops, torch.tensor(tokens, device=dev), positions,
                       self._attend(self.decode_wrapper, append))

    def _graph(self, bucket: int):
        """The CUDA graph of one decode step of ``bucket`` rows, captured on first use: static input
        buffers, a decode wrapper in CUDA-graph mode whose page-table buffers the graph reads, and the
        logits buffer the graph writes."""
        if bucket in self.graphs:
            return self.graphs[bucket]
        dev, i32 = self.device, dict(dtype=torch.int32, device=self.device)
        max_pages = self.cache.shape[1] + bucket * len(self.shared_pages)
        bufs = dict(tokens=torch.zeros(bucket, dtype=torch.long, device=dev),
                    positions=torch.zeros(bucket, dtype=torch.long, device=dev),
                    positions32=torch.zeros(bucket, **i32), batch=torch.full((bucket,), -1, **i32),
                    indptr=torch.zeros(bucket + 1, **i32), indices=torch.zeros(max_pages, **i32),
                    last=torch.zeros(bucket, **i32))
        wrapper = self.k.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True, paged_kv_indptr_buffer=bufs["indptr"],
            paged_kv_indices_buffer=bufs["indices"], paged_kv_last_page_len_buffer=bufs["last"])
        # A plan for the capture: every row one token on scratch page 0 (padding rows write nothing).
        wrapper.plan(torch.arange(bucket + 1, dtype=torch.int32), torch.zeros(bucket, **i32),
                     torch.ones(bucket, dtype=torch.int32), head_dim=self.c.head_dim, q_data_type=self.dtype,
                     kv_data_type=self.dtype, **self._heads())
        attend = self._attend(wrapper, (bufs["batch"], bufs["positions32"], bufs["indices"], bufs["indptr"],
                                        bufs["last"]))

        def step():
            return forward(self.w, self.ops, bufs["tokens"], bufs["positions"], attend)

        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # compile and warm up outside the capture
            step()
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if not hasattr(self, "_pool"):
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = step()
        self.graphs[bucket] = (graph, wrapper, bufs, logits)
        return self.graphs[bucket]

    def capture_graphs(self) -> None:
        """Capture every decode bucket now (largest first, sharing one memory pool)."""
        if self.cuda_graphs:
            self._ensure_cache(self.num_pages or 1)
            for b in reversed(graph_buckets(self.max_batch)):
                self._graph(b)

    def _replay(self, bucket: int, reqs: List[Request]) -> torch.Tensor:
        graph, wrapper, bufs, logits = self._graph(bucket)
        tokens, positions, batch, indptr, indices, last = self._decode_table(reqs, bucket)
        # plan per step: in CUDA-graph mode it writes the page table into the buffers the graph reads
        wrapper.plan(indptr, indices, last, head_dim=self.c.head_dim, q_data_type=self.dtype,
                     kv_data_type=self.dtype, **self._heads())
        host = torch.tensor([tokens, positions, batch], dtype=torch.long)
        bufs["tokens"].copy_(host[0], non_blocking=True)
        bufs["positions"].copy_(host[1], non_blocking=True)
        bufs["positions32"].copy_(host[1], non_blocking=True)
        bufs["batch"].copy_(host[2], non_blocking=True)
        graph.replay()
        return logits

    # sampling ----------------------------------------------------------------------------------
    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        s = self.sampling
        if s.greedy:  # top-k with k = 1: the most likely token
            return self.k.sampling.top_k_top_p_sampling_from_logits(logits, 1, 1.0, generator=self.gen)
        if s.temperature != 1.0:
            logits = logits / s.temperature
        return self.k.sampling.top_k_top_p_sampling_from_logits(logits, s.top_k, s.top_p, generator=self.gen)


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
        tokens, positions, rows, spans = [], [], [], []
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
