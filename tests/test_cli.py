"""``python -m flashtile info|demo|bench|warmup|clear-cache`` end to end, in subprocesses.

On CPU the demo runs the reference path and (with FLASHTILE_BACKEND=triton) the Triton kernels in the
interpreter at a tiny prompt; on a GPU the same commands run the compiled kernels.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from flashtile import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()


def run_cli(*args, env=None, drop=(), cwd=ROOT, timeout=300):
    """Run ``python -m flashtile *args`` with this environment plus ``env`` minus FLASHTILE_BACKEND and
    ``drop``; returns the CompletedProcess (stdout and stderr as text)."""
    base = {k: v for k, v in os.environ.items() if k not in ("FLASHTILE_BACKEND", *drop)}
    base["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    base.update(env or {})
    return subprocess.run([sys.executable, "-m", "flashtile", *args], cwd=cwd, env=base, capture_output=True,
                          text=True, timeout=timeout)


def test_info():
    r = run_cli("info")
    assert r.returncode == 0, r.stderr
    for text in ("flashtile 0.1.0", "torch", "triton", "single_decode_with_kv_cache", "triton cache",
                 "FLASHTILE_BACKEND", "TRITON_INTERPRET"):
        assert text in r.stdout
    assert ("cuda tensors -> triton" if HAS_CUDA else "cpu tensors -> reference") in r.stdout


def test_info_json(tmp_path):
    r = run_cli("info", "--json", env={"TRITON_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["flashtile"] == "0.1.0" and info["triton_cache"]["dir"] == str(tmp_path / "cache")
    paths = {(p["api"], p["tensors"]): p["path"] for p in info["paths"]}
    assert paths["single_prefill_with_kv_cache", "cpu"] == "reference"
    if HAS_CUDA:
        assert paths["single_decode_with_kv_cache", "cuda"] == "triton"
        assert info["devices"][0]["sm_count"] > 0


def test_demo():
    # The serving-engine demo at its CPU defaults (tests/test_demo.py covers the engine itself).
    r = run_cli("demo", "--requests", "2", "--new-tokens", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| flashtile (paged) |" in r.stdout and "decode tok/s" in r.stdout and "PASS" in r.stdout
    assert "FAIL" not in r.stdout


@pytest.mark.skipif(HAS_CUDA, reason="the kernels run compiled on a GPU (test_demo)")
def test_demo_kernels_in_interpreter():
    # Without TRITON_INTERPRET the CLI chooses the interpreter itself for FLASHTILE_BACKEND=triton.
    r = run_cli("demo", "--requests", "2", "--prompt-len", "3:9", "--new-tokens", "3", "--system-len", "5",
                env={"FLASHTILE_BACKEND": "triton"}, drop=("TRITON_INTERPRET",))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "greedy tokens:" in r.stdout and "PASS" in r.stdout


def test_demo_bad_arguments():
    r = run_cli("demo", "--prompt-len", "0")
    assert r.returncode == 2 and "--prompt-len" in r.stderr
    if not HAS_CUDA:
        r = run_cli("demo", "--device", "cuda")
        assert r.returncode == 2 and "no CUDA device" in r.stderr


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench"
    r = run_cli("bench", "--smoke", "single_decode", "--out", str(out), "--providers", "flashtile,torch_sdpa_flash")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| case |" in r.stdout and "flashtile / best baseline" in r.stdout
    records = [json.loads(line) for line in (out / "single_decode.jsonl").read_text().splitlines()]
    assert records and all(rec["status"] == "ok" for rec in records if rec["provider"] == "flashtile")
    assert (out / "results.md").is_file()


def test_bench_errors(tmp_path):
    r = run_cli("bench", "no_such_suite", "--smoke", "--out", str(tmp_path))
    assert r.returncode == 2 and "no_such_suite" in r.stderr
    # An installed package without the source tree: no benchmarks/ next to flashtile.
    shutil.copytree(ROOT / "flashtile", tmp_path / "site" / "flashtile",
                    ignore=shutil.ignore_patterns("__pycache__"))
    r = run_cli("bench", "--smoke", env={"PYTHONPATH": str(tmp_path / "site")}, cwd=tmp_path / "site")
    assert r.returncode == 2 and "no benchmarks/ directory" in r.stderr


def test_warmup():
    if HAS_CUDA:
        r = run_cli("warmup", "--shapes", "llama3-8b", "--dtypes", "bf16", "--mla", "16")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "11/11" in r.stdout and "11 of 11 variants ready" in r.stdout
    else:
        r = run_cli("warmup", "--shapes", "llama3-8b,gemma2-9b")
        assert r.returncode == 0, r.stderr
        assert "nothing to compile" in r.stdout


def test_warmup_variants_and_errors(capsys):
    variants = cli.warmup_variants(["llama3-8b", "mistral-7b", "qwen2-7b"], None, ["bf16", "fp16"])
    # llama3-8b and mistral-7b share a shape; 8 variants per (shape, dtype).
    assert len(variants) == 2 * 2 * 8
    assert variants[0].models == ("llama3-8b", "mistral-7b")
    kinds = {(v.kind, v.causal, v.kv_len > cli._WARMUP_SHORT) for v in variants}
    assert kinds == {("prefill", True, False), ("prefill", False, False), ("prefill", True, True),
                     ("decode", False, False), ("decode", False, True), ("batch_decode", False, True),
                     ("batch_prefill", True, True), ("batch_append", True, True)}
    custom = cli.warmup_variants(["32/8/64"], [64, 96], ["fp16"])
    assert {v.shape.head_dim for v in custom} == {64, 96} and all(v.dtype == torch.float16 for v in custom)
    for shapes, dims, dtypes in ((["nope"], None, ["bf16"]), (["llama3-8b"], [100], ["bf16"]),
                                 (["llama3-8b"], None, ["fp32"]), (["32/5/128"], None, ["bf16"])):
        with pytest.raises(ValueError):
            cli.warmup_variants(shapes, dims, dtypes)
    assert cli.main(["warmup", "--shapes", "nope"]) == 2
    assert "unknown shape" in capsys.readouterr().err
    assert cli.main(["warmup", "--list", "--shapes", "qwen2-7b", "--dtypes", "bf16"]) == 0
    assert "28/4/128 bf16 decode, split-KV" in capsys.readouterr().out


def test_warmup_mla_variants(capsys):
    """--mla: per head count and dtype, MLA decode (split + merge) at pages 1 and 64 and a causal 4-token append
    at page 64; repeated counts once; shapes may be empty then; bad counts are errors. One variant runs on the
    CPU through the reference path (what the GPU run calls, minus the compile)."""
    variants = cli.warmup_variants([], None, ["bf16", "fp16"], [16, 128, 16])
    assert len(variants) == 2 * 2 * 3 and {v.kind for v in variants} == {"mla"}
    assert {(v.qo_len, v.page_size, v.causal) for v in variants} == {(1, 1, False), (1, 64, False), (4, 64, True)}
    assert {(v.shape.num_qo_heads, v.shape.num_kv_heads, v.shape.head_dim) for v in variants} == {(16, 1, 576),
                                                                                                   (128, 1, 576)}
    assert len(cli.warmup_variants(["llama3-8b"], None, ["bf16"], [16])) == 8 + 3
    for heads in ([0], [-2], [True]):
        with pytest.raises(ValueError, match="--mla"):
            cli.warmup_variants([], None, ["bf16"], heads)
    with pytest.raises(ValueError, match="no shapes"):
        cli.warmup_variants([], None, ["bf16"])
    assert cli.main(["warmup", "--list", "--shapes", "", "--mla", "16", "--dtypes", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "MLA 16 heads bf16 decode, split-KV + merge, page 1" in out and out.count("\n") == 3
    from flashtile.cli import warmup

    warmup._run_variant(variants[0], torch.device("cpu"))


def test_clear_cache(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "triton-cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    assert cli.main(["clear-cache"]) == 0
    assert "nothing to delete" in capsys.readouterr().out
    (cache / "abc").mkdir(parents=True)
    (cache / "abc" / "kernel.cubin").write_bytes(b"x" * 10)
    assert cli.main(["clear-cache"]) == 0  # dry run
    assert "would delete" in capsys.readouterr().out and cache.exists()
    assert cli.main(["clear-cache", "--yes"]) == 0
    assert "deleting" in capsys.readouterr().out and not cache.exists()
