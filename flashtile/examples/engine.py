"""A small LLM serving engine on flashtile's kernels.

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
installed, ``kernels=flashinfer`` (the same calls, FlashInfer's kernels). The model is in
:mod:`flashtile.examples.model`; :mod:`flashtile.examples.reference` serves the same requests with plain
PyTorch (one contiguous KV buffer per request, ``scaled_dot_product_attention``, torch sampling) and no
prefix sharing (it prefills the system prompt with every request), to check this engine against;
:mod:`flashtile.examples.parallel` runs this engine tensor-parallel over several GPUs. Only torch is needed.
"""

from __future__ import annotations

import collections
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .model import Attend, KernelOps, Weights, forward

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
            tokens: List[int] = []
            if done:
                # prefill returns None only when no request finished its prompt (no logit row to compute)
                assert logits is not None
                tokens = self.sample(logits).tolist()
                if forced is not None:
                    self._compare(result, done, logits, forced)
            now = _now(self.device)
            for i, (r, tok) in enumerate(zip(done, tokens)):
                if not r.output:
                    r.first_token_s = now - t0
                    if keep_first_logits:
                        assert logits is not None  # r is done: the step computed its logit row
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
            assert r.first_token_s is not None  # the loop ends when every request has its max_new >= 1 tokens
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


def _graph_capturable(kernels, device: torch.device) -> bool:
    """Whether decode can be captured in a CUDA graph: on a GPU, unless the attention runs flashtile's
    reference path (FLASHTILE_BACKEND=reference), whose PyTorch ops synchronize with the host."""
    if device.type != "cuda":
        return False
    if kernels.__name__ != "flashtile":
        return True
    from flashtile._core.dispatch import Path, choose_path

    return choose_path(device).path is not Path.REFERENCE


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
        cuda_graphs: capture decode in CUDA graphs (default: wherever it can: on a GPU, with kernels, not
            flashtile's reference path, whose ops synchronize with the host; off elsewhere whatever is asked).
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
        capturable = _graph_capturable(kernels, self.device)
        self.cuda_graphs = capturable if cuda_graphs is None else bool(cuda_graphs) and capturable
        self.num_pages = num_pages
        self.cache: Optional[torch.Tensor] = None
        self.workspace = torch.empty(128 << 20, dtype=torch.uint8, device=self.device)
        kw = dict(kv_layout="NHD")
        self.prefill_wrapper = kernels.BatchPrefillWithPagedKVCacheWrapper(self.workspace, **kw)
        self.cascade_wrapper = kernels.MultiLevelCascadeAttentionWrapper(2, self.workspace, **kw)
        # use_tensor_cores: FlashInfer's fastest decode for grouped heads (flashtile always uses tensor cores)
        self.decode_wrapper = kernels.BatchDecodeWithPagedKVCacheWrapper(self.workspace, use_tensor_cores=True, **kw)
        self.gen = torch.Generator(device=self.device).manual_seed(self.sampling.seed)
        self.graphs: Dict[int, tuple] = {}
        self.pad_eager = False  # tests: pad eager decode to the graph buckets as graph replays do
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

    def reserve(self, prompts: Sequence[Sequence[int]], max_new: Sequence[int], system: Sequence[int] = ()) -> None:
        """Allocate the cache for these requests now (and keep it), so that CUDA graphs captured after this
        call stay valid for runs of these requests."""
        p = self.page_size
        shared = (len(system) // p) * p
        own = sum(_cdiv(len(system) - shared + len(q) + n, p) for q, n in zip(prompts, max_new))
        self._ensure_cache(shared // p + own)

    def begin(self, requests: List[Request], system: List[int]) -> List[Request]:
        """Size the page pool, prefill the whole pages of the system prompt once into shared pages, and
        hand each request the rest of the system prompt as the head of its own prompt."""
        p = self.page_size
        shared = (len(system) // p) * p
        self.reserve([r.prompt for r in requests], [r.max_new for r in requests], system)
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
        return (torch.tensor(indptr, dtype=torch.int32), torch.tensor(indices, dtype=torch.int32).to(self.device),
                torch.tensor(last, dtype=torch.int32))

    # prefill -----------------------------------------------------------------------------------
    def prefill(self, items) -> Optional[torch.Tensor]:
        return self._prefill_plain(items) if not self.shared_pages else self._prefill_cascade(items)

    def _prefill_inputs(self, items):
        tokens: List[int] = []
        positions: List[int] = []
        qo, rows = [0], []
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
        i32 = torch.int32
        shared = (torch.tensor([0, int(qo[-1])], dtype=i32), torch.tensor([0, len(self.shared_pages)], dtype=i32),
                  torch.tensor(self.shared_pages, dtype=i32).to(self.device),
                  torch.tensor([self.page_size], dtype=i32))
        own = self._table(reqs, [end for _, _, end in items], shared=False)
        self.cascade_wrapper.plan([shared[0], qo], [shared[1], own[0]], [shared[2], own[1]], [shared[3], own[2]],
                                  head_dim=self.c.head_dim, causal=True, q_data_type=self.dtype,
                                  kv_data_type=self.dtype, **self._heads())
        return forward(self.w, self.ops, tokens, positions,
                       self._attend(self.cascade_wrapper, self._append_args(items, qo)), rows)

    def _attend(self, wrapper, append) -> Attend:
        batch, pos, indices, indptr, last = append

        def attend(layer, q, k, v):
            assert self.cache is not None  # allocated by _ensure_cache (begin, reserve or capture_graphs)
            kv = self.cache[layer]
            self.k.append_paged_kv_cache(k, v, batch, pos, kv, indices, indptr, last)
            return wrapper.run(q, kv)
        return attend

    # decode ------------------------------------------------------------------------------------
    def _decode_table(self, reqs: List[Request], rows: int):
        """Inputs of one decode step padded to ``rows``: the last token of each request, its position,
        the page table after the append, and the append's row -> request map. A padding row is one token on
        the scratch page 0 (its K/V is written there and its output ignored), which every kernel library
        handles the same way."""
        lens = []
        for r in reqs:
            self._grow(r, r.kv_len + 1 - r.offset)
            lens.append(r.kv_len + 1)
        b, pad = len(reqs), rows - len(reqs)
        indptr, indices, last = self._table(reqs, lens, shared=True)
        indptr = torch.cat([indptr, indptr[-1] + torch.arange(1, pad + 1, dtype=torch.int32)])
        indices = torch.cat([indices, torch.zeros(pad, dtype=torch.int32, device=self.device)])
        last = torch.cat([last, torch.ones(pad, dtype=torch.int32)])
        tokens = [r.output[-1] for r in reqs] + [0] * pad
        positions = [n - 1 for n in lens] + [0] * pad
        return tokens, positions, list(range(b + pad)), indptr, indices, last

    def decode(self, reqs: List[Request]) -> torch.Tensor:
        b = len(reqs)
        if self.cuda_graphs:
            bucket = next(s for s in graph_buckets(self.max_batch) if s >= b)
            return self._replay(bucket, reqs)[:b]
        rows = next(s for s in graph_buckets(self.max_batch) if s >= b) if self.pad_eager else b
        tokens, positions, batch, indptr, indices, last = self._decode_table(reqs, rows)
        self.decode_wrapper.plan(indptr, indices, last, head_dim=self.c.head_dim, q_data_type=self.dtype,
                                 kv_data_type=self.dtype, **self._heads())
        dev = self.device
        positions = torch.tensor(positions, device=dev)
        append = (torch.tensor(batch, dtype=torch.int32, device=dev), positions.to(torch.int32), indices,
                  indptr.to(dev), last.to(dev))
        return forward(self.w, self.ops, torch.tensor(tokens, device=dev), positions,
                       self._attend(self.decode_wrapper, append))[:b]

    def _graph(self, bucket: int):
        """The CUDA graph of one decode step of ``bucket`` rows, captured on first use: static input
        buffers, a decode wrapper in CUDA-graph mode whose page-table buffers the graph reads, and the
        logits buffer the graph writes."""
        if bucket in self.graphs:
            return self.graphs[bucket]
        dev, i32 = self.device, torch.int32
        assert self.cache is not None  # allocated by _ensure_cache (capture_graphs, or begin before a replay)
        # Each row lists the shared pages, then its own: at most the pool in all, so bucket x pool bounds a
        # step (rows of padding read one scratch page). The graph outlives this run's system prompt: the
        # bound must not depend on it (capture_graphs runs before the prompt exists).
        max_pages = bucket * max(self.cache.shape[1], 1)
        bufs = dict(tokens=torch.zeros(bucket, dtype=torch.long, device=dev),
                    positions=torch.zeros(bucket, dtype=torch.long, device=dev),
                    positions32=torch.zeros(bucket, dtype=i32, device=dev),
                    batch=torch.arange(bucket, dtype=i32, device=dev),
                    indptr=torch.zeros(bucket + 1, dtype=i32, device=dev),
                    indices=torch.zeros(max_pages, dtype=i32, device=dev),
                    last=torch.zeros(bucket, dtype=i32, device=dev))
        wrapper = self.k.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True, paged_kv_indptr_buffer=bufs["indptr"],
            paged_kv_indices_buffer=bufs["indices"], paged_kv_last_page_len_buffer=bufs["last"])
        # A plan for the capture: every row one token on scratch page 0.
        wrapper.plan(torch.arange(bucket + 1, dtype=torch.int32), torch.zeros(bucket, dtype=i32, device=dev),
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
            self._ensure_cache(1)
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
        if s.greedy:  # top-k with k = 1: the most likely token. "joint": one sampling pass, the same token as
            # "top_k_first" at k = 1 (FlashInfer's top_k_first path JIT-compiles its top-k module for minutes)
            return self.k.sampling.top_k_top_p_sampling_from_logits(logits, 1, 1.0, filter_apply_order="joint",
                                                                    generator=self.gen)
        if s.temperature != 1.0:
            logits = logits / s.temperature
        return self.k.sampling.top_k_top_p_sampling_from_logits(logits, s.top_k, s.top_p, generator=self.gen)
