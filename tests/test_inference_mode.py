"""Calls inside ``torch.inference_mode()`` and outside it mix: serving code (the demo engine, Hugging Face
generate, vLLM) runs under inference mode while other code of the same process (tests, warm-ups, a sampler
called by the user) does not. The library keeps tensors between calls (scratch for results nobody asked for,
pools of zeros, the plans of single-request prefill); one made under inference mode is an inference tensor,
which an in-place write outside inference mode rejects (RuntimeError), as seen on a GPU when a sampler ran
after the demo in one process. Each order runs in a fresh process, so the first call is the one that makes
the library's tensors."""

import subprocess
import sys
import textwrap

import pytest
import torch

_CALLS = textwrap.dedent("""
    import sys
    import torch
    import flashtile

    device = sys.argv[1]
    first_inside = sys.argv[2] == "inside"
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float16):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    probs = torch.softmax(torch.randn(4, 64, generator=g), -1).to(device)
    q, k, v = rand(5, 4, 32), rand(9, 2, 32), rand(9, 2, 32)
    pages = rand(3, 2, 4, 2, 32)  # [pages, K/V, page_size, heads, dim]
    weight = rand(32)
    i32 = dict(dtype=torch.int32, device=device)

    def calls():
        yield "top_p_sampling_from_probs", flashtile.top_p_sampling_from_probs(probs, 0.9, seed=1, offset=0)
        yield "top_k_top_p_sampling_from_probs", flashtile.top_k_top_p_sampling_from_probs(
            probs, 8, 0.9, seed=1, offset=0)
        yield "sampling_from_probs", flashtile.sampling_from_probs(probs, seed=1, offset=0)
        yield "single_prefill_with_kv_cache", flashtile.single_prefill_with_kv_cache(q, k, v, causal=True)
        yield "single_decode_with_kv_cache", flashtile.single_decode_with_kv_cache(q[0], k, v)
        ws = torch.empty(16 << 20, dtype=torch.uint8, device=device)
        dec = flashtile.BatchDecodeWithPagedKVCacheWrapper(ws)
        dec.plan(torch.tensor([0, 3], **i32), torch.tensor([0, 1, 2], **i32), torch.tensor([2], **i32), 4, 2, 32, 4,
                 q_data_type=torch.float16)
        yield "BatchDecodeWithPagedKVCacheWrapper.run", dec.run(q[:1], pages)
        pre = flashtile.BatchPrefillWithPagedKVCacheWrapper(ws)
        pre.plan(torch.tensor([0, 5], **i32), torch.tensor([0, 3], **i32), torch.tensor([0, 1, 2], **i32),
                 torch.tensor([2], **i32), 4, 2, 32, 4, causal=True, q_data_type=torch.float16)
        yield "BatchPrefillWithPagedKVCacheWrapper.run", pre.run(q, pages)
        yield "rmsnorm", flashtile.rmsnorm(q[:, 0], weight)

    def run_all():
        return {name: out.clone() for name, out in calls()}

    if first_inside:
        with torch.inference_mode():
            first = run_all()
        second = run_all()
    else:
        first = run_all()
        with torch.inference_mode():
            second = run_all()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    print("ok", len(first))
""")


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("order", ["inside", "outside"])
def test_calls_inside_and_outside_inference_mode(device, order):
    """The same calls give the same results in both modes, whichever mode makes the library's tensors."""
    done = subprocess.run([sys.executable, "-c", _CALLS, device, order], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[:2] == ["ok", "8"], done.stdout
