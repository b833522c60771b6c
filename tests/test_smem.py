"""Launch configs fit the device's shared memory (issue 22, defect 2).

- On CPU, in milliseconds: the model (flashtile/kernels/smem.py) against sizes Triton reported for
  sm_90 compiles, and the chooser over every feature combination, head dim, kernel and device limit.
- On CPU, compiled (slow): benchmarks/tools/smem_compile.py compiles the chosen configs for sm_90 in a
  subprocess (Triton's interpreter off) and compares Triton's sizes with the limit and the model.
- On the GPU: issue 22's crashing calls, against the float64 oracle.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import subprocess
import sys
import types

import pytest
import torch

import flashtile
from attention_cases import assert_matches_oracle, make_paged_batch, make_qkv, workspace
from flashtile._core import device as device_facts
from flashtile._core import tile_policy
from flashtile.kernels import attention, batch_prefill, smem
from flashtile.kernels.attention import LaunchConfig
from flashtile.kernels.smem import TileFeatures, config_candidates, estimate_shared_bytes, fit_config

ROOT = pathlib.Path(__file__).resolve().parent.parent

H100 = (232448, (9, 0))
A100 = (166912, (8, 0))
SM89 = (101376, (8, 9))  # RTX 4090 / L40 (sm_86 cards have the same limit)
TARGETS = {"H100": H100, "A100": A100, "sm89": SM89, "sm120": (101376, (12, 0)), "sm100": (232448, (10, 0))}


@pytest.fixture
def gpu_tables(monkeypatch):
    """The launchers' GPU tables (CPU tests run with the interpreter's single small config)."""
    monkeypatch.setattr(attention, "INTERPRET", False)
    monkeypatch.setattr(batch_prefill, "INTERPRET", False)
    monkeypatch.setattr(tile_policy, "small_tiles", lambda: False)


def feature_sets(head_dim: int):
    """Every TileFeatures combination for a head dim: head_dim_vo equal or half, fp8 K/V, RoPE,
    custom mask."""
    for half_vo, fp8, rope, mask in itertools.product((False, True), repeat=4):
        yield TileFeatures(head_dim, head_dim // 2 if half_vo else head_dim, 2, 1 if fp8 else 2, rope, mask)


def preferred_configs(head_dim: int) -> dict:
    """label -> (preferred config, may the row tile shrink): what every attention launcher asks for at
    this padded head dim (single prefill/decode tables, batch decode per GQA group, batch prefill per
    planned tile of a ragged or paged cache)."""
    configs = {"single prefill": (attention.choose_config("prefill", head_dim), True),
               "single decode": (attention.choose_config("decode", head_dim), False)}
    for group in (1, 4, 8, 16, 32, 64):
        configs[f"batch decode group {group}"] = (attention.batch_decode_tile(group, head_dim)[0], False)
    for rows, kv_len, page_size in itertools.product((16, 32, 64, 1024, None), (512, 2048, 8192), (None, 1, 5, 16)):
        block_m, block_n = tile_policy.prefill_tile_shape(rows, kv_len, head_dim, head_dim, page_size)
        cfg = batch_prefill._launch_config(block_m, block_n, head_dim, head_dim, page_size)
        configs[f"batch prefill rows {rows} kv {kv_len} page {page_size}"] = (cfg, False)
        cfg = batch_prefill._launch_config(block_m, block_n, head_dim, head_dim, page_size, fp8=True)
        configs[f"fp8 batch prefill rows {rows} kv {kv_len} page {page_size}"] = (cfg, False)
    return configs


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kv_len", [512, 8192])
def test_fp8_full_row_tiles_take_the_single_prefill_fp8_tile(gpu_tables, head_dim, kv_len):
    # FP8's full row tiles use FP8 single prefill's key tile, warps and stages whatever the plan's BLOCK_N
    # (short prompts plan 32 keys, fp8's slowest shape); smaller row tiles keep their own configs.
    single = attention.choose_config("prefill_fp8", head_dim)
    block_m, block_n = tile_policy.prefill_tile_shape(1024, kv_len, head_dim, head_dim, None)
    assert block_m == single.block_m
    assert batch_prefill._launch_config(block_m, block_n, head_dim, head_dim, None, fp8=True) == single
    assert batch_prefill._launch_config(block_m, block_n, head_dim, head_dim, 16, fp8=True) == single
    small = tile_policy.prefill_tile_shape(16, kv_len, head_dim, head_dim, None)
    assert (batch_prefill._launch_config(*small, head_dim, head_dim, None, fp8=True)
            == batch_prefill._launch_config(*small, head_dim, head_dim, None))


@pytest.mark.parametrize("target", TARGETS)
def test_every_chosen_config_fits_and_is_the_largest_that_does(gpu_tables, target):
    limit, capability = TARGETS[target]
    checked = 0
    for head_dim in (64, 128, 256):
        for label, (preferred, vary_block_m) in preferred_configs(head_dim).items():
            for features in feature_sets(head_dim):
                cfg = fit_config(preferred, features, limit, capability, vary_block_m=vary_block_m)
                need = estimate_shared_bytes(cfg.block_m, cfg.block_n, cfg.num_stages, cfg.num_warps, features,
                                             capability)
                assert need <= limit, (label, features, cfg, need)
                if not vary_block_m:
                    assert cfg.block_m == preferred.block_m, (label, cfg)  # the planned row tile is kept
                for larger in config_candidates(preferred, vary_block_m):  # every config tried before it
                    if larger == cfg:
                        break
                    assert estimate_shared_bytes(larger.block_m, larger.block_n, larger.num_stages,
                                                 larger.num_warps, features, capability) > limit
                checked += 1
    assert checked > 3 * 16 * 60


def test_default_configs_unchanged_on_h100(gpu_tables):
    """Plain bf16/fp16 attention (no in-kernel RoPE, mask or fp8; ALiBi, window and soft cap do not
    count) keeps every measured config on the H100."""
    for head_dim in (64, 128, 256):
        for label, (preferred, vary_block_m) in preferred_configs(head_dim).items():
            plain = TileFeatures(head_dim, head_dim)
            assert fit_config(preferred, plain, *H100, vary_block_m=vary_block_m) == preferred, label


# Shared memory Triton gave sm_90 compiles of the attention kernels (3.6 and 3.9 agree on each):
# (kernel, head dim, features, BLOCK_M, BLOCK_N, warps, stages, bytes). "partial": split-KV output.
MEASURED_SM90 = [
    ("single", 128, {}, 128, 128, 8, 3, 229376),  # the default Llama prefill: the model is exact
    ("single", 128, {}, 128, 128, 8, 2, 163840),
    ("single", 128, {}, 128, 64, 8, 3, 131072),
    ("single", 64, {}, 128, 64, 4, 3, 65536),
    ("single", 256, {}, 64, 64, 4, 3, 229376),
    ("single", 128, {}, 16, 64, 4, 2, 38912),  # 16-row tiles: mma, not wgmma
    ("single", 128, dict(rope=True), 128, 128, 8, 3, 294912),  # issue 22 (FlashInfer's RoPE reference call)
    ("single", 128, dict(rope=True), 128, 128, 8, 2, 196608),
    ("single", 128, dict(rope=True), 128, 64, 8, 3, 163840),
    ("single", 128, dict(custom_mask=True), 128, 128, 8, 3, 233472),  # issue 22 (the window test's mask call)
    ("single partial", 128, dict(custom_mask=True), 128, 128, 8, 3, 262144),
    ("single partial", 128, dict(custom_mask=True), 128, 128, 8, 2, 196608),
    ("single", 128, dict(kv_bytes=1), 128, 128, 8, 3, 131072),
    ("single", 128, dict(rope=True, kv_bytes=1), 128, 128, 8, 3, 163840),
    ("single", 128, dict(d_vo=64), 128, 128, 8, 3, 180224),
    ("batch prefill paged", 128, dict(rope=True), 128, 32, 4, 3, 98304),  # issue 22's batch prefill call
    ("batch prefill paged", 128, {}, 128, 128, 8, 3, 229376),
]


@pytest.mark.parametrize("kernel,head_dim,features,block_m,block_n,warps,stages,measured", MEASURED_SM90)
def test_model_is_not_below_triton(kernel, head_dim, features, block_m, block_n, warps, stages, measured):
    features = TileFeatures(**{"d_qk": head_dim, "d_vo": head_dim, **features})
    estimate = estimate_shared_bytes(block_m, block_n, stages, warps, features, (9, 0))
    assert estimate >= measured
    if features == TileFeatures(head_dim, head_dim) and block_m >= 64:
        assert estimate == measured  # exact where the defaults sit near the limit


def test_issue_22_configs(gpu_tables):
    """The two crashing calls: the table config needs more than the H100 has; the chosen one fits."""
    table = attention.choose_config("prefill", 128)
    assert table == LaunchConfig(128, 128, 8, 3)
    for features in (TileFeatures(128, 128, custom_mask=True), TileFeatures(128, 128, rope=True)):
        assert estimate_shared_bytes(128, 128, 3, 8, features, (9, 0)) > H100[0]
        assert fit_config(table, features, *H100, vary_block_m=True) == LaunchConfig(128, 128, 8, 2)
    # The sliding window alone and the paged RoPE batch prefill tile fit as they are.
    assert fit_config(table, TileFeatures(128, 128), *H100, vary_block_m=True) == table
    block_m, block_n = tile_policy.prefill_tile_shape(127 * 8, 512, 128, 128, 5)
    planned = batch_prefill._launch_config(block_m, block_n, 128, 128, 5)
    assert fit_config(planned, TileFeatures(128, 128, rope=True), *H100) == planned == LaunchConfig(128, 32, 4, 3)


def test_shared_memory_limit_is_read_from_the_device(monkeypatch):
    monkeypatch.setattr(device_facts, "_smem_limit", {})
    monkeypatch.setattr(device_facts, "_capability", {})
    props = types.SimpleNamespace(shared_memory_per_block_optin=101376)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (8, 9))
    cuda0 = torch.device("cuda", 0)
    assert device_facts.shared_memory_limit(cuda0) == 101376
    assert device_facts.compute_capability(cuda0) == (8, 9)
    assert device_facts.shared_memory_limit(torch.device("cpu")) is None  # the interpreter: no limit
    # Without the torch property: Triton's driver (the number it checks kernels against).
    monkeypatch.setattr(device_facts, "_smem_limit", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace())
    import triton.runtime

    fake_utils = types.SimpleNamespace(get_device_properties=lambda index: {"max_shared_mem": 166912})
    monkeypatch.setattr(triton.runtime, "driver", types.SimpleNamespace(active=types.SimpleNamespace(utils=fake_utils)))
    assert device_facts.shared_memory_limit(cuda0) == 166912
    # The chooser uses what the device reports.
    monkeypatch.setattr(device_facts, "TARGET_OVERRIDE", None)
    features = TileFeatures(128, 128, rope=True)
    cfg = smem.device_config(LaunchConfig(128, 128, 8, 3), features, cuda0, vary_block_m=True)
    assert estimate_shared_bytes(cfg.block_m, cfg.block_n, cfg.num_stages, cfg.num_warps, features, (8, 9)) <= 166912


def test_launch_steps_down_when_triton_needs_more_than_estimated(monkeypatch):
    """A Triton that allocates more than the model: the launch that reports OutOfResources (before
    running anything) is retried at a smaller config, which later calls use directly."""
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(device_facts, "TARGET_OVERRIDE", H100)
    monkeypatch.setattr(smem, "_fitted", {})
    features = TileFeatures(128, 128)
    preferred = LaunchConfig(128, 128, 8, 3)
    launched = []

    def launch(cfg):
        need = estimate_shared_bytes(cfg.block_m, cfg.block_n, cfg.num_stages, cfg.num_warps, features) + 8192
        if need > H100[0]:
            raise OutOfResources(need, H100[0], "shared memory")
        launched.append(cfg)

    with pytest.warns(UserWarning, match="more than estimated"):
        cfg = smem.launch_within_limit(launch, preferred, features, torch.device("cpu"))
    assert cfg == launched[-1] == LaunchConfig(128, 128, 8, 2)
    assert smem.launch_within_limit(launch, preferred, features, torch.device("cpu")) == cfg  # no second try
    assert launched == [cfg, cfg]

    def other_resource(cfg):
        raise OutOfResources(2048, 1024, "threads")

    with pytest.raises(OutOfResources):
        smem.launch_within_limit(other_resource, preferred, features, torch.device("cpu"))


# ------------------------------------------------------------------------------------------------
# Compiled for sm_90 without a GPU (benchmarks/tools/smem_compile.py in a subprocess)
# ------------------------------------------------------------------------------------------------


def _compile_check(*args: str) -> list:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.tools.smem_compile", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if not records:
        pytest.skip(f"compiling for sm_90 is not available here: {proc.stderr[-500:]}")
    return records


def _sm90_compiler_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception:
        return False
    return True


needs_compiler = pytest.mark.skipif(not _sm90_compiler_available(), reason="Triton has no NVIDIA backend here")


@pytest.mark.slow
@needs_compiler
def test_issue_22_compiled_before_and_after():
    records = [r for r in _compile_check("--issue") if "case" in r and r["kernel"] == "_attention_fwd_kernel"]
    before = {r["case"]: r["shared"] for r in records if r.get("before")}
    after = {r["case"]: r for r in records if not r.get("before")}
    mask = "single_prefill group 1 d128/128 none+custom"
    rope = "single_prefill group 8 d128/128 rope_llama+causal"
    assert before[mask] > H100[0] and before[rope] > H100[0]
    for _case, record in after.items():
        assert record["ok"], record
        assert record["shared"] <= H100[0]


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize("limit,arch", [(232448, 90), (101376, 89)], ids=["H100", "sm89"])
def test_heaviest_feature_combinations_compile_within_the_limit(limit, arch):
    records = _compile_check("--limit", str(limit), "--arch", str(arch))
    summary = records[-1]
    problems = [r for r in records[:-1] if not r["ok"]]
    assert not problems, problems
    assert summary["failures"] == 0 and summary["cases"] >= 24


# ------------------------------------------------------------------------------------------------
# On the GPU: issue 22's calls, against the oracle
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_issue_22_single_prefill_sliding_window_and_its_mask():
    device = torch.device("cuda")
    q, k, v = make_qkv(233, 233, 4, 4, 128, torch.float16, device)
    window = 100
    out, lse = flashtile.single_prefill_with_kv_cache(q, k, v, causal=True, window_left=window, return_lse=True)
    assert_matches_oracle(out, lse, q, k, v, causal=True, window_left=window)
    pos = torch.arange(233, device=device)
    mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] >= pos[:, None] - window)
    out, lse = flashtile.single_prefill_with_kv_cache(q, k, v, custom_mask=mask, return_lse=True)
    assert_matches_oracle(out, lse, q, k, v, custom_mask=mask)


@pytest.mark.gpu
def test_issue_22_paged_batch_prefill_with_rope():
    device = torch.device("cuda")
    qo_len, kv_len, hq, hk, d, page_size = 127, 512, 32, 4, 128, 5
    cache, indptr, indices, last = make_paged_batch([kv_len], page_size, hk, d, torch.float16, device)
    q = torch.randn(qo_len, hq, d, dtype=torch.float16, device=device)
    w = flashtile.BatchPrefillWithPagedKVCacheWrapper(workspace(device))
    w.plan(torch.tensor([0, qo_len], dtype=torch.int32), indptr, indices, last, hq, hk, d, page_size, causal=True,
           pos_encoding_mode="ROPE_LLAMA", q_data_type=torch.float16)
    out, lse = w.run(q, cache, return_lse=True)
    pages = indices.long().to(device)
    k = cache[pages, 0].reshape(-1, hk, d)[:kv_len]
    v = cache[pages, 1].reshape(-1, hk, d)[:kv_len]
    assert_matches_oracle(out, lse, q, k, v, causal=True, pos_encoding_mode="ROPE_LLAMA")
    # FlashInfer's test checks each request against single prefill with the same RoPE.
    out, lse = flashtile.single_prefill_with_kv_cache(q, k, v, causal=True, pos_encoding_mode="ROPE_LLAMA",
                                                      return_lse=True)
    assert_matches_oracle(out, lse, q, k, v, causal=True, pos_encoding_mode="ROPE_LLAMA")


def test_gpu_check_script_runs_its_cases():
    """benchmarks/tools/smem_check.py's runner, on tiny cases of each kernel and cache (kernels in the
    interpreter on CPU), so that the GPU run does not fail on the script itself."""
    from benchmarks.tools.smem_check import Case, Features, run_case

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rope_mask = Features("ROPE_LLAMA", "custom", window_softcap=True, half_vo=True)
    cases = [Case("single_prefill", 32, rope_mask, qo_len=5, kv_len=20),
             Case("single_decode", 32, Features("ALIBI", "none", fp8_kv=True), qo_len=1, kv_len=20),
             Case("batch_decode", 32, Features("ROPE_LLAMA", "none"), qo_len=1, kv_len=20),
             Case("batch_prefill", 32, rope_mask, qo_len=3, kv_len=20, page_size=None),
             Case("batch_prefill", 32, Features(fp8_kv=True), qo_len=3, kv_len=20, page_size=5, max_rows=None)]
    for case in cases:
        assert run_case(case, device) == "", case.label()
