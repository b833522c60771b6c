"""CUDA-graph capture, written once for the CLI's timings, the benchmark harness and the GPU tests.

Capture needs a warm-up off the capturing stream (the first calls compile kernels and allocate), then
the calls themselves inside ``torch.cuda.graph``. :func:`capture_graph` does both and returns the
graph and the last call's output, whose storage the replays write again.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch

__all__ = ["capture_graph"]


def capture_graph(fn: Callable[[], Any], *, calls: int = 1, warmup: int = 1,
                  device: Optional[torch.device] = None) -> Tuple["torch.cuda.CUDAGraph", Any]:
    """Capture ``calls`` back-to-back calls of ``fn`` into one CUDA graph on ``device`` (the current
    CUDA device when None), after ``warmup`` calls on a side stream. Returns ``(graph, out)``: the
    graph (``graph.replay()`` runs it again) and the last captured call's return value. Errors of
    the warm-up or the capture (an op that synchronizes or allocates on the host) propagate."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm up on a side stream, as capture requires
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    out = None
    with torch.cuda.graph(graph):
        for _ in range(calls):
            out = fn()
    torch.cuda.synchronize(device)
    return graph, out
