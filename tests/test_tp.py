"""Tensor parallelism of the example engine (flashtile/examples/parallel.py) on CPU: 2 processes, gloo.

The tensor-parallel engine (heads and MLP columns split over 2 ranks, all-reduces after attention and the
MLP, rank 0's sampled tokens broadcast) is the single-device model computed in another order: partial
sums of the output and down projections are rounded to bf16 on each rank before the all-reduce adds them.
Its greedy tokens are compared with the single-device engine's by teacher forcing (the single-device
engine continues with the TP engine's tokens and records where its own choice differs, and by how much);
a differing token must be a near-tie within bf16 rounding noise, as in the demo's check.
"""

import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from flashtile.cli import main as cli_main
from flashtile.examples import demo, parallel
from flashtile.examples.engine import PagedEngine, RunResult, Sampling
from flashtile.examples.model import MODELS, LayerWeights, init_weights, make_requests, system_prompt
from flashtile.examples.reference import ReferenceEngine

ROOT = pathlib.Path(__file__).resolve().parent.parent
CFG = MODELS["tiny"]
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")
NEAR_TIE = 0.08  # bf16: the first-token logit error bound tests/test_demo.py allows the paged engine


def test_shards_partition_the_model():
    w = init_weights(CFG, "cpu", torch.bfloat16, seed=2)
    shards = [parallel.shard_weights(w, r, 2) for r in range(2)]
    c, d = CFG, CFG.head_dim
    assert shards[1].config.num_qo_heads == 2 and shards[1].config.num_kv_heads == 1
    assert shards[1].config.intermediate_size == CFG.intermediate_size // 2
    for i, lw in enumerate(w.layers):
        parts = [s.layers[i] for s in shards]
        # column-parallel: each rank's q, k and v heads (and gate, up rows), in rank order, are the full ones
        q = torch.cat([p.wqkv[:2 * d] for p in parts])
        k = torch.cat([p.wqkv[2 * d:3 * d] for p in parts])
        v = torch.cat([p.wqkv[3 * d:] for p in parts])
        assert torch.equal(torch.cat([q, k, v]), lw.wqkv)
        half = c.intermediate_size // 2
        gate = torch.cat([p.w_gate_up[:half] for p in parts])
        up = torch.cat([p.w_gate_up[half:] for p in parts])
        assert torch.equal(torch.cat([gate, up]), lw.w_gate_up)
        # row-parallel: the columns of the output and down projections
        assert torch.equal(torch.cat([p.wo for p in parts], dim=1), lw.wo)
        assert torch.equal(torch.cat([p.w_down for p in parts], dim=1), lw.w_down)
        assert set(LayerWeights.__dataclass_fields__) == set(vars(parts[0]))


def test_indivisible_heads_name_tp(capsys):
    with pytest.raises(parallel.TensorParallelError, match="--tp 3: num_qo_heads 4, num_kv_heads 2"):
        parallel.check_divisible(CFG, 3)
    with pytest.raises(parallel.TensorParallelError, match="--tp"):
        parallel.shard_weights(init_weights(CFG, "cpu", torch.bfloat16), 0, 0)
    assert cli_main(["demo", "--tp", "3"]) == 2
    assert "--tp 3: num_qo_heads 4, num_kv_heads 2, intermediate_size 256 not divisible by 3" in capsys.readouterr().err
    assert cli_main(["demo", "--tp", "2"]) == 2  # one process here: torchrun is needed
    assert "torchrun --nproc-per-node 2" in capsys.readouterr().err


def _tp_run(tmp_path, sizes, sampling, system_len=10, seed=3):
    num, lens, new = sizes
    prompts, max_new = make_requests(num, lens, new, CFG.vocab_size, seed=1)
    system = system_prompt(system_len, CFG.vocab_size, seed=1)
    kw = dict(page_size=4, max_batch=2, prefill_chunk=16, sampling=sampling)
    path = str(tmp_path / "rank{rank}.pt")
    parallel.launch(2, parallel.run_to_file, (path, "tiny", torch.bfloat16, seed, prompts, max_new, system, kw),
                    timeout=120)
    ranks = [torch.load(path.format(rank=r)) for r in range(2)]
    return prompts, max_new, system, kw, ranks


def test_tp_greedy_tokens_match_single_device(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHTILE_BACKEND", "reference")  # the spawned ranks inherit it
    prompts, max_new, system, kw, ranks = _tp_run(tmp_path, (3, (5, 30), (3, 6)), Sampling())
    tp = ranks[0]
    assert ranks[1]["outputs"] == tp["outputs"]  # every rank has rank 0's tokens
    for key in ("steps", "free_pages", "shared_pages"):  # the same schedule and page decisions on every rank
        assert ranks[1][key] == tp[key], key
    assert tp["shared_pages"]
    assert [r["info"]["kv_heads"] for r in ranks] == [1, 1]
    assert tp["all_reduces"] > 0
    weights = init_weights(CFG, "cpu", torch.bfloat16, seed=3)
    # the single-device engine, teacher-forced with the TP engine's tokens
    single = PagedEngine(weights, **kw).run(prompts, max_new, system, forced=tp["outputs"], keep_first_logits=True)
    assert single.compared == sum(max_new)
    for rid, logits in tp["first_logits"].items():
        torch.testing.assert_close(logits, single.first_logits[rid], atol=NEAR_TIE, rtol=0)
    assert all(gap <= NEAR_TIE for *_, gap in single.mismatches), single.mismatches
    assert len(single.mismatches) <= single.compared // 4
    # and the demo's check against the plain PyTorch engine passes
    ref = ReferenceEngine(weights, max_batch=2, prefill_chunk=16)
    forced = ref.run(prompts, max_new, system, forced=tp["outputs"], keep_first_logits=True)
    res = RunResult(tp["outputs"], {}, [], 0.0, tp["first_logits"])
    code, _ = demo._check(weights, prompts, system, 2, 16, Sampling(), res, forced)
    assert code == 0


def test_tp_sampling_is_rank0s(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHTILE_BACKEND", "reference")
    _, max_new, _, _, ranks = _tp_run(tmp_path, (2, (4, 9), (4, 4)), Sampling(greedy=False, top_k=20, top_p=0.9),
                                      system_len=0)
    assert ranks[0]["outputs"] == ranks[1]["outputs"]
    assert all(len(o) == n and all(0 <= t < CFG.vocab_size for t in o)
               for o, n in zip(ranks[0]["outputs"].values(), max_new))


def test_demo_under_torchrun(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("FLASHTILE_BACKEND", "WORLD_SIZE", "RANK")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    out = tmp_path / "tp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "flashtile", "demo", "--tp", "2", "--device", "cpu", "--requests", "3", "--json", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    for text in ("tensor parallel over 2 ranks (gloo, cpu on rank 0)", "| flashtile (paged, TP 2) |",
                 "| 1 | cpu (CPU) | 2 | 1 |", "share of step time", "PASS"):
        assert text in r.stdout
    assert r.stdout.count("flashtile 0.") == 1  # rank 0 prints, rank 1 does not
    assert '"tp": 2' in out.read_text()


def test_python_entry_spawns_ranks(capfd, monkeypatch):
    # python -m flashtile.examples.parallel --nproc 2: the demo in 2 spawned processes, without torchrun
    monkeypatch.setenv("FLASHTILE_BACKEND", "reference")
    assert parallel.main(["--nproc", "2", "--device", "cpu", "--requests", "2", "--new-tokens", "2",
                          "--no-reference", "--timeout", "120"]) == 0
    out = capfd.readouterr().out
    assert "| flashtile (paged, TP 2) |" in out and "| 1 | cpu (CPU) |" in out
