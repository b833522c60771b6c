"""The example serving engine (flashtile/examples) and ``python -m flashtile demo`` at tiny size (CPU, or the
GPU with CUDA-graph decode when there is one).

The paged engine (flashtile's wrappers, page ops, norm/RoPE/activation and sampler; the reference path
on CPU, the Triton kernels in the interpreter on the ``kernel`` path) must emit the same greedy tokens
as the plain PyTorch engine (contiguous KV, SDPA, argmax), which is written independently of flashtile.
"""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from flashtile.examples import demo
from flashtile.examples.engine import PagedEngine, RunResult, Sampling, graph_buckets
from flashtile.examples.model import MODELS, init_weights, make_requests, system_prompt
from flashtile.examples.reference import ReferenceEngine

ROOT = pathlib.Path(__file__).resolve().parent.parent
CFG = MODELS["tiny"]


def _serve(weights, sizes, page_size=4, max_batch=2, chunk=16, system_len=10):
    num, lens, new = sizes
    prompts, max_new = make_requests(num, lens, new, CFG.vocab_size, seed=1)
    system = system_prompt(system_len, CFG.vocab_size, seed=1)
    paged = PagedEngine(weights, page_size=page_size, max_batch=max_batch, prefill_chunk=chunk)
    res = paged.run(prompts, max_new, system, keep_first_logits=True)
    ref = ReferenceEngine(weights, max_batch=max_batch, prefill_chunk=chunk)
    forced = ref.run(prompts, max_new, system, forced=res.outputs, keep_first_logits=True)
    return paged, prompts, system, max_new, res, forced


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_greedy_tokens_match_reference_engine(path, dtype, device, capsys):
    # The PyTorch engine, teacher-forced with the paged engine's tokens, agrees on every greedy token up to
    # near-ties within the measured rounding noise (demo._check: exit code 0).
    sizes = (3, (5, 30), (3, 6)) if path == "reference" else (2, (3, 9), (2, 3))
    weights = init_weights(CFG, device, dtype, seed=3)
    paged, prompts, system, max_new, res, forced = _serve(weights, sizes)
    assert forced.compared == sum(max_new)
    assert sorted(res.outputs) == list(range(len(prompts)))
    code, facts = demo._check(weights, prompts, system, 2, 16, Sampling(), res, forced)
    assert code == 0, capsys.readouterr().out
    assert facts["first_token_logit_error"] < (0.01 if dtype == torch.float16 else 0.08)
    for rid, logits in res.first_logits.items():
        torch.testing.assert_close(logits, forced.first_logits[rid], atol=0.1, rtol=0)
    if device.type == "cuda":  # decode ran as CUDA-graph replays, except on the reference path (it syncs)
        assert bool(paged.graphs) == (path != "reference")
    # every page went back to the pool except the shared system prompt's (page 0 is the graphs' scratch page)
    assert len(paged.allocator.free) + len(paged.shared_pages) == paged.cache.shape[1] - 1


def test_continuous_batching_and_chunked_prefill(device):
    weights = init_weights(CFG, device, torch.bfloat16, seed=5)
    prompts, max_new = [[1] * 40, [2] * 5, [3] * 7], [2, 6, 3]
    paged = PagedEngine(weights, page_size=3, max_batch=2, prefill_chunk=16)
    res = paged.run(prompts, max_new, system_prompt(7, CFG.vocab_size))
    kinds = [s.kind for s in res.steps]
    # the 40-token prompt takes three chunked prefill steps; request 2 joins after request 0 finishes
    assert kinds[:3] == ["prefill"] * 3 and "prefill" in kinds[kinds.index("decode"):]
    assert all(s.tokens <= 16 for s in res.steps if s.kind == "prefill")
    assert {r: len(o) for r, o in res.outputs.items()} == {0: 2, 1: 6, 2: 3}


def test_padded_decode_matches(device):
    # Decode padded to a graph bucket (padding rows: one token on the scratch page) gives the same tokens.
    weights = init_weights(CFG, device, torch.float16, seed=8)
    prompts, max_new = make_requests(3, (4, 12), (3, 5), CFG.vocab_size)
    plain = PagedEngine(weights, max_batch=5, cuda_graphs=False)
    padded = PagedEngine(weights, max_batch=5, cuda_graphs=False)
    padded.pad_eager = True
    assert plain.run(prompts, max_new).outputs == padded.run(prompts, max_new).outputs


def test_graphs_captured_before_a_system_prompt(device):
    # The demo captures its decode graphs in the warm-up, before the run's system prompt exists: each graph's
    # page-table buffer must hold every row's shared pages too (15 here, for two rows, in a 24-page pool).
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    weights = init_weights(CFG, device, torch.bfloat16, seed=9)
    prompts, max_new = make_requests(2, (3, 9), (2, 3), CFG.vocab_size)
    paged = PagedEngine(weights, page_size=4, max_batch=2, num_pages=24)
    paged.capture_graphs()
    res = paged.run(prompts, max_new, system_prompt(60, CFG.vocab_size))
    assert 2 in paged.graphs and len(paged.shared_pages) == 15
    assert {r: len(o) for r, o in res.outputs.items()} == dict(enumerate(max_new))


def test_sampling_mode_and_buckets(device):
    weights = init_weights(CFG, device, torch.bfloat16, seed=6)
    prompts, max_new = make_requests(2, (4, 8), (4, 4), CFG.vocab_size)
    res = PagedEngine(weights, sampling=Sampling(greedy=False, top_k=5, top_p=0.8)).run(prompts, max_new)
    assert all(len(o) == 4 and all(0 <= t < CFG.vocab_size for t in o) for o in res.outputs.values())
    assert graph_buckets(1) == [1] and graph_buckets(4) == [1, 2, 4]
    assert graph_buckets(20) == [1, 2, 4, 8, 16, 20]


def test_check_fails_beyond_noise(capsys):
    weights = init_weights(CFG, "cpu", torch.bfloat16, seed=7)
    prompts, max_new = make_requests(2, (4, 8), (3, 3), CFG.vocab_size)
    paged = PagedEngine(weights).run(prompts, max_new, keep_first_logits=True)
    ref = ReferenceEngine(weights).run(prompts, max_new, forced=paged.outputs, keep_first_logits=True)
    code, _ = demo._check(weights, prompts, [], 32, 2048, Sampling(), paged, ref)
    assert code == 0
    bad = RunResult(ref.outputs, ref.ttft_s, ref.steps, ref.total_s, ref.first_logits,
                    [(0, 1, 5, 6, 3.0)], ref.compared)
    code, facts = demo._check(weights, prompts, [], 32, 2048, Sampling(), paged, bad)
    assert code == 1 and facts["mismatches"] == 1
    assert "FAIL: 1 divergences beyond rounding noise" in capsys.readouterr().out


def run_demo(*args, env=None):
    base = {k: v for k, v in os.environ.items() if k != "FLASHTILE_BACKEND"}
    base["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    base.update(env or {})
    return subprocess.run([sys.executable, "-m", "flashtile", "demo", *args], cwd=ROOT, env=base,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU defaults")
def test_demo_command(tmp_path):
    out = tmp_path / "demo.json"
    r = run_demo("--requests", "3", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    for text in ("| flashtile (paged) |", "| pytorch (contiguous KV, SDPA) |", "TTFT median", "greedy tokens:", "PASS"):
        assert text in r.stdout
    assert "flashtile engine" in r.stderr  # the progress bar
    assert out.is_file()


def test_demo_bad_arguments(capsys):
    # in this process: the command's own checks run before any model is built (a subprocess per case took
    # 17 s on a busy GPU machine, importing torch and initializing CUDA each time)
    from flashtile.cli import main

    for args, text in ((("--prompt-len", "0"), "--prompt-len"), (("--new-tokens", "a:b"), "--new-tokens"),
                       (("--requests", "0"), "--requests")):
        assert main(["demo", *args]) == 2
        err = capsys.readouterr().err
        assert text in err and "error" in err, err
