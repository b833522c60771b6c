"""torch.library registration: opcheck, torch.compile(fullgraph=True), CUDA-graph capture/replay."""

import pytest
import torch

import flashtile
from attention_cases import assert_matches_oracle, make_qkv
from conftest import HAS_CUDA
from flashtile._core import ops
from flashtile._core.graphs import capture_graph


def _decode_args(device):
    q, k, v = make_qkv(1, 37, 4, 2, 64, torch.float16, device)
    out = torch.empty(1, 4, 64, dtype=torch.float16, device=device)
    lse = torch.empty(1, 4, dtype=torch.float32, device=device)
    return (q, k, v, None, out, lse, "decode", 0.125, False, 0.0, -1, "NONE", 1.0, 1e4, 1.0, "auto")


def _prefill_args(device):
    q, k, v = make_qkv(5, 9, 4, 2, 64, torch.bfloat16, device)
    out = torch.empty(5, 4, 64, dtype=torch.bfloat16, device=device)
    lse = torch.empty(5, 4, dtype=torch.float32, device=device)
    return (q, k, v, None, out, lse, "prefill", 0.125, True, 0.0, -1, "NONE", 1.0, 1e4, 1.0, "auto")


@pytest.mark.parametrize("op, make_args", [(ops.single_attention, _decode_args), (ops.single_attention, _prefill_args)])
def test_opcheck(path, device, op, make_args):
    torch.library.opcheck(op, make_args(device))


def test_torch_compile_fullgraph(path, device):
    """The public APIs trace into one graph (no graph breaks) and give the eager result."""
    backend = "inductor" if HAS_CUDA else "aot_eager"

    def step(q, k, v):
        o1 = flashtile.single_prefill_with_kv_cache(q, k, v, causal=True)
        o2 = flashtile.single_decode_with_kv_cache(q[-1], k, v)
        return o1.float().sum(-1) + o2.float().sum(-1)

    q, k, v = make_qkv(6, 11, 4, 2, 64, torch.float16, device)
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(q, k, v), step(q, k, v), atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_len", [4096, 33000])
def test_single_decode_cuda_graph_replay(kv_len):
    """Capture single decode in a CUDA graph, then replay with new inputs copied into the same buffers."""
    device = torch.device("cuda")
    q, k, v = make_qkv(1, kv_len, 32, 8, 128, torch.bfloat16, device)
    q = q[0]
    graph, out = capture_graph(lambda: flashtile.single_decode_with_kv_cache(q, k, v), warmup=2)
    for _ in range(2):
        q2, k2, v2 = make_qkv(1, kv_len, 32, 8, 128, torch.bfloat16, device)
        q.copy_(q2[0])
        k.copy_(k2)
        v.copy_(v2)
        graph.replay()
        torch.cuda.synchronize()
        assert_matches_oracle(out[None], None, q[None], k, v)
