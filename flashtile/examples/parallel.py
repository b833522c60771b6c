"""Tensor parallelism for the example engine, with ``torch.distributed`` (NCCL on GPUs, gloo on CPU).

``torchrun --standalone --nproc-per-node N -m flashtile demo --tp N`` (or, without torchrun,
``python -m flashtile.examples.parallel --nproc N [demo options]``, which spawns the N processes itself)
serves the demo's requests with N ranks, one per GPU (or N CPU processes):

- weights: every rank draws the full model from the same seed (the single-device model, so that the two
  can be compared) and keeps its shard (:func:`shard_weights`): its query and KV heads of the stacked QKV
  projection and its gate/up rows (column-parallel), the matching columns of the output and down
  projections (row-parallel); norms, the embedding and the LM head are replicated;
- attention: each rank's :class:`TensorParallelEngine` is a :class:`~flashtile.examples.engine.PagedEngine`
  over its own KV heads: its own cache, workspace, wrappers and plans, and its own CUDA graphs on a GPU.
  The scheduler, page allocator and page tables are the same on every rank, computed from the same
  inputs (the requests and the sampled tokens, which every rank receives);
- one all-reduce (sum) after attention's output projection and one after the MLP's down projection
  (``ParallelOps.all_reduce``, called by :func:`~flashtile.examples.model.forward`); no flashtile call
  does any communication;
- sampling: rank 0 samples from its logits (identical on every rank after the all-reduces) and broadcasts
  the tokens, so greedy and random sampling give every rank the same tokens.

Communication time is measured by :class:`TPGroup`: ``time.perf_counter`` around each collective on CPU
(gloo's collectives return when done), CUDA events around each one on a GPU (read at the end of a run).
Collectives inside a CUDA-graph replay are not timed (decode on a GPU, unless ``--no-cuda-graphs``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import time
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .._core import settings
from .engine import PagedEngine, Sampling
from .model import KernelOps, LayerWeights, ModelConfig, Weights


class TensorParallelError(ValueError):
    """A model that cannot be split over the requested number of ranks (``--tp``)."""


def check_divisible(config: ModelConfig, tp: int) -> None:
    """Raise :class:`TensorParallelError` unless the heads and MLP columns split evenly over ``tp`` ranks."""
    if tp < 1:
        raise TensorParallelError(f"--tp: expected at least 1 rank, got {tp}")
    bad = [f"{name} {n}" for name, n in (("num_qo_heads", config.num_qo_heads), ("num_kv_heads", config.num_kv_heads),
                                          ("intermediate_size", config.intermediate_size)) if n % tp]
    if bad:
        raise TensorParallelError(f"--tp {tp}: {', '.join(bad)} not divisible by {tp} (each rank takes an equal "
                                  "share of the query heads, KV heads and MLP columns)")


def shard_weights(w: Weights, rank: int, tp: int) -> Weights:
    """Rank ``rank``'s shard of the full weights ``w`` (copies; ``w`` can be freed afterwards).

    Its config counts the rank's heads (``num_qo_heads / tp`` query heads, ``num_kv_heads / tp`` KV heads:
    the query heads of its KV heads' groups) and ``intermediate_size / tp`` MLP columns; norms, the
    embedding, the LM head and the RoPE table are the full ones.
    """
    c = w.config
    check_divisible(c, tp)
    hq, hkv, d, inter = c.num_qo_heads // tp, c.num_kv_heads // tp, c.head_dim, c.intermediate_size // tp

    def rows(t: torch.Tensor, start: int, n: int) -> torch.Tensor:
        return t[start + rank * n:start + (rank + 1) * n]

    layers = []
    for lw in w.layers:
        q0, k0, v0 = 0, c.num_qo_heads * d, (c.num_qo_heads + c.num_kv_heads) * d
        wqkv = torch.cat([rows(lw.wqkv, q0, hq * d), rows(lw.wqkv, k0, hkv * d), rows(lw.wqkv, v0, hkv * d)])
        gate_up = torch.cat([rows(lw.w_gate_up, 0, inter), rows(lw.w_gate_up, c.intermediate_size, inter)])
        wo = lw.wo[:, rank * hq * d:(rank + 1) * hq * d].contiguous()
        w_down = lw.w_down[:, rank * inter:(rank + 1) * inter].contiguous()
        layers.append(LayerWeights(lw.attn_norm, wqkv, wo, lw.mlp_norm, gate_up, w_down))
    local = replace(c, num_qo_heads=hq, num_kv_heads=hkv, intermediate_size=inter)
    return Weights(local, w.embed, layers, w.final_norm, w.lm_head, w.cos_sin)


class TPGroup:
    """This process's place in the tensor-parallel group (the default process group) and its timed
    collectives. ``comm_s()``: seconds spent in all-reduces and broadcasts since the last ``reset()``."""

    def __init__(self, device: torch.device) -> None:
        self.rank, self.size, self.device = dist.get_rank(), dist.get_world_size(), device
        self.backend = str(dist.get_backend())
        self.all_reduces = 0
        self._host_s = 0.0
        self._events: List[Tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def reset(self) -> None:
        self.all_reduces, self._host_s = 0, 0.0
        self._events.clear()

    @contextlib.contextmanager
    def _timed(self):
        if self.device.type != "cuda":
            t0 = time.perf_counter()
            yield
            self._host_s += time.perf_counter() - t0
        elif torch.cuda.is_current_stream_capturing():  # inside a CUDA graph: replays are not timed
            yield
        else:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        with self._timed():
            dist.all_reduce(x)
        self.all_reduces += 1
        return x

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        with self._timed():
            dist.broadcast(x, src)
        return x

    def comm_s(self) -> float:
        if self._events:
            torch.cuda.synchronize(self.device)
        return self._host_s + sum(s.elapsed_time(e) for s, e in self._events) / 1e3


class ParallelOps(KernelOps):
    """The kernel library's ops plus the group's all-reduce (summing row-parallel partial outputs)."""

    def __init__(self, kernels, group: TPGroup) -> None:
        super().__init__(kernels)
        self.group = group

    def all_reduce(self, x):  # type: ignore[override]  # an instance method here, static on one device
        return self.group.all_reduce(x)


class TensorParallelEngine(PagedEngine):
    """One rank of the tensor-parallel engine: a :class:`PagedEngine` over this rank's shard of ``weights``
    (the full model, the same on every rank), whose forward all-reduces after attention and the MLP and
    whose sampled tokens come from rank 0. Arguments after ``group`` are :class:`PagedEngine`'s."""

    def __init__(self, weights: Weights, group: TPGroup, kernels=None, page_size: int = 16, max_batch: int = 32,
                 prefill_chunk: int = 2048, sampling: Optional[Sampling] = None, num_pages: Optional[int] = None,
                 cuda_graphs: Optional[bool] = None) -> None:
        super().__init__(shard_weights(weights, group.rank, group.size), kernels, page_size, max_batch,
                         prefill_chunk, sampling, num_pages, cuda_graphs)
        self.full_config, self.group = weights.config, group
        self.ops = ParallelOps(self.k, group)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        if self.group.rank == 0:
            tokens = super().sample(logits).to(torch.int64)
        else:
            tokens = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
        return self.group.broadcast(tokens)

    def rank_info(self) -> Dict[str, Any]:
        """This rank's shard and cache, for the demo's per-rank table."""
        c = self.c
        weight_bytes = sum(t.numel() * t.element_size() for lw in self.w.layers for t in vars(lw).values())
        cache_bytes = 0 if self.cache is None else self.cache.numel() * self.cache.element_size()
        dev = self.device
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
        return dict(rank=self.group.rank, device=f"{dev} ({name})", qo_heads=c.num_qo_heads, kv_heads=c.num_kv_heads,
                    mlp_columns=c.intermediate_size, layer_weights_mib=weight_bytes / 2**20,
                    kv_cache_mib=cache_bytes / 2**20)


# ---------------------------------------------------------------------------------------------
# Process set-up: torchrun's environment, or our own spawn
# ---------------------------------------------------------------------------------------------


def init(device_type: str) -> Tuple[TPGroup, torch.device]:
    """Join the process group that torchrun (or :func:`launch`) describes in the environment: NCCL and
    ``cuda:LOCAL_RANK`` for ``device_type == "cuda"``, gloo and the CPU otherwise."""
    spawned = _SPAWNED.get("rank") is not None
    if device_type == "cuda":
        local_rank = _SPAWNED["rank"] if spawned else int(settings.env("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        device_id = device if device_type == "cuda" else None
        if spawned:  # launch(): a local TCP rendezvous instead of torchrun's environment
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_SPAWNED['port']}",
                                    rank=_SPAWNED["rank"], world_size=_SPAWNED["world"], device_id=device_id)
        else:
            dist.init_process_group(backend, device_id=device_id)
    return TPGroup(device), device


def world_size() -> int:
    """Processes in this run: :func:`launch`'s count, else torchrun's ``WORLD_SIZE`` (1 without either)."""
    return _SPAWNED["world"] if _SPAWNED.get("world") is not None else int(settings.env("WORLD_SIZE", "1"))


def finish(code: int) -> int:
    """Rank 0's exit code on every rank (also waits for rank 0's check), then leave the group."""
    box = [code]
    dist.broadcast_object_list(box, src=0)
    dist.destroy_process_group()
    return int(box[0])


@contextlib.contextmanager
def rank0_output(group: Optional[TPGroup]):
    """Only rank 0 prints (``group`` None: one process, which prints): other ranks' stdout and stderr go
    nowhere (errors still raise)."""
    if group is None or group.rank == 0:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield


def report(engine: TensorParallelEngine, step_s: float) -> Tuple[List[str], List[Dict[str, Any]]]:
    """A per-rank table for rank 0 and its rows (a collective: every rank calls it): heads, shard and cache
    sizes, and the share of ``step_s`` (the run's step time) spent in collectives."""
    info = engine.rank_info()
    comm = engine.group.comm_s()
    info.update(all_reduces=engine.group.all_reduces, comm_s=comm, share=comm / step_s if step_s else float("nan"))
    infos: List[Any] = [None] * engine.group.size
    dist.all_gather_object(infos, info)
    lines = ["| rank | device | query heads | KV heads | MLP columns | layer weights | KV cache | all-reduces "
             "| collectives time | share of step time |", "|" + "---|" * 10]
    for i in infos:
        lines.append(f"| {i['rank']} | {i['device']} | {i['qo_heads']} | {i['kv_heads']} | {i['mlp_columns']} | "
                     f"{i['layer_weights_mib']:.1f} MiB | {i['kv_cache_mib']:.1f} MiB | {i['all_reduces']} | "
                     f"{1e3 * i['comm_s']:.1f} ms | {100 * i['share']:.1f}% |")
    return lines, infos


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# A process started by launch(): its rank, the number of processes and the rendezvous port (init() reads them).
_SPAWNED: Dict[str, Any] = {}


def _entry(rank: int, nprocs: int, port: int, fn: Callable, args: Sequence[Any]) -> None:
    _SPAWNED.update(rank=rank, world=nprocs, port=port)
    if settings.env("OMP_NUM_THREADS") is None:  # as torchrun does: the ranks share the CPU cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nprocs))
    code = fn(*args)
    if code:
        sys.exit(code)


def launch(nprocs: int, fn: Callable, args: Sequence[Any] = (), timeout: float = 300.0) -> None:
    """Run ``fn(*args)`` in ``nprocs`` spawned processes that join one group (rank, world size and a free
    local port for :func:`init`, in place of torchrun's environment); a non-zero return is the process's
    exit code. Raises on a failed process
    (``torch.multiprocessing.ProcessRaisedException`` / ``ProcessExitedException``) or after ``timeout``
    seconds (``TimeoutError``, the processes killed). ``fn`` must be importable (a module-level function)."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_entry, args=(nprocs, free_port(), fn, tuple(args)), nprocs=nprocs, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"tensor-parallel processes still running after {timeout:g} s")


def run_to_file(path: str, model: str, dtype: torch.dtype, seed: int, prompts: List[List[int]], max_new: List[int],
                system: List[int], engine_kw: Dict[str, Any]) -> int:
    """One rank of a tensor-parallel run (e.g. under :func:`launch`): the engine on CPU (gloo) serves
    ``prompts`` with the model ``MODELS[model]`` drawn from ``seed``; every rank saves its ``RunResult``
    (first-token logits kept) to ``path.format(rank=rank)`` with ``torch.save``."""
    from .model import MODELS, init_weights

    group, device = init("cpu")
    weights = init_weights(MODELS[model], device, dtype, seed)
    engine = TensorParallelEngine(weights, group, **engine_kw)
    res = engine.run(prompts, max_new, system, keep_first_logits=True)
    torch.save(dict(outputs=res.outputs, first_logits=res.first_logits, info=engine.rank_info(),
                    all_reduces=group.all_reduces, steps=[(s.kind, s.tokens) for s in res.steps],
                    free_pages=list(engine.allocator.free), shared_pages=engine.shared_pages),
               path.format(rank=group.rank))
    return finish(0)


def _demo(argv: List[str]) -> int:
    from ..cli import main
    return main(["demo", *argv])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m flashtile.examples.parallel --nproc N [demo options]``: the demo with ``--tp N`` in N
    spawned processes (gloo on CPU, NCCL on GPUs), like ``torchrun --nproc-per-node N -m flashtile demo``."""
    p = argparse.ArgumentParser(prog="python -m flashtile.examples.parallel", description=main.__doc__)
    p.add_argument("--nproc", type=int, required=True, help="number of ranks (processes)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before the processes are killed")
    args, rest = p.parse_known_args(argv)
    try:
        launch(args.nproc, _demo, ([*rest, "--tp", str(args.nproc)],), timeout=args.timeout)
    except Exception as e:  # a rank failed or timed out: its traceback is on stderr already
        print(f"flashtile.examples.parallel: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
