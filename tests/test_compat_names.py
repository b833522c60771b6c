"""Names serving engines import from FlashInfer at module load (ENGINES.md §2), in flashtile: the
TensorRT-LLM entry points (stubs that raise), utils.FP4Tensor, jit.core.logger,
jit.env.FLASHINFER_WORKSPACE_DIR, the autotuner (a no-op that keeps vLLM's warm-up sequence working)
and flashtile.triton.cascade."""

import inspect
import json
import logging
import os
import pathlib
import sys

import pytest
import torch

import flashtile
from flashtile import cli
from oracles import LSE_TOLERANCES, TOLERANCES, merge_states_f64

# ---------------------------------------------------------------------------------------------
# TensorRT-LLM entry points
# ---------------------------------------------------------------------------------------------

# Leading parameters of FlashInfer 0.7.2's functions (their full lists are longer), and the keywords
# vLLM's FlashInfer backend passes besides them.
TRTLLM_STUBS = {
    ("decode", "trtllm_batch_decode_with_kv_cache"): (
        ["query", "kv_cache", "workspace_buffer", "block_tables", "seq_lens", "max_seq_len", "bmm1_scale",
         "bmm2_scale", "window_left", "out", "out_dtype", "o_sf_scale", "o_sf_vec_size", "sinks", "kv_layout"],
        dict(backend="xqa", q_len_per_req=1, kv_cache_sf=None, lse=None, return_lse=False),
        "BatchDecodeWithPagedKVCacheWrapper",
    ),
    ("decode", "trtllm_batch_decode_with_kv_cache_mla"): (
        ["query", "kv_cache", "workspace_buffer", "qk_nope_head_dim", "kv_lora_rank", "qk_rope_head_dim",
         "block_tables", "seq_lens", "max_seq_len", "sparse_mla_top_k", "out", "bmm1_scale", "bmm2_scale"],
        dict(backend="auto", is_var_seq=True, return_lse=False),
        "MLA",
    ),
    ("prefill", "trtllm_batch_context_with_kv_cache"): (
        ["query", "kv_cache", "workspace_buffer", "block_tables", "seq_lens", "max_q_len", "max_kv_len",
         "bmm1_scale", "bmm2_scale", "batch_size", "cum_seq_lens_q", "cum_seq_lens_kv", "window_left", "out"],
        dict(kv_layout="HND", sinks=None, kv_cache_sf=None, causal=True),
        "BatchPrefillWithPagedKVCacheWrapper",
    ),
}


@pytest.mark.parametrize("module,name", list(TRTLLM_STUBS))
def test_trtllm_stub_signature_and_error(module, name):
    leading, keywords, alternative = TRTLLM_STUBS[module, name]
    fn = getattr(getattr(flashtile, module), name)
    assert fn is getattr(flashtile.trtllm, name) and name in getattr(flashtile, module).__all__
    params = list(inspect.signature(fn).parameters)
    assert params[: len(leading)] == leading
    required = [p.name for p in inspect.signature(fn).parameters.values() if p.default is inspect.Parameter.empty]
    call = {p: torch.zeros(1) for p in required}  # a call as engines make it binds: NotImplementedError, no TypeError
    call.update(keywords)
    with pytest.raises(NotImplementedError, match=rf"{name}: runs TensorRT-LLM's precompiled kernels.*{alternative}"):
        fn(**call)


# ---------------------------------------------------------------------------------------------
# utils.FP4Tensor
# ---------------------------------------------------------------------------------------------


def _fp4_inputs(rows=4, packed=8, scale_rows=128):
    return torch.zeros(rows, packed, dtype=torch.uint8), torch.zeros(scale_rows, 2, dtype=torch.float8_e4m3fn)


def test_fp4_tensor_constructs():
    data, scale = _fp4_inputs()
    t = flashtile.utils.FP4Tensor(data, scale, 124, (4, 15))
    assert t.data is data and t.scale is scale and t.scale_start_index == 124 and t.original_shape == (4, 15)
    assert t.dtype == "nvfp4"
    plain = flashtile.utils.FP4Tensor(data, scale)
    assert plain.scale_start_index == 0 and plain.original_shape is None
    assert "FP4Tensor(" in repr(plain)


@pytest.mark.parametrize("case,error,match", [
    (dict(data=torch.zeros(4, 8)), TypeError, "data: expected dtype in \\(uint8\\)"),
    (dict(scale=torch.zeros(128, 2)), TypeError, "scale: expected dtype in \\(float8_e4m3fn\\)"),
    (dict(scale=torch.zeros(100, 2, dtype=torch.float8_e4m3fn)), ValueError, "scale: .*multiple of 128"),
    (dict(scale_start_index=-1), ValueError, "scale_start_index"),
    (dict(scale_start_index=125), ValueError, "scale_start_index"),  # 125 + 4 rows > 128
    (dict(original_shape=(4, 17)), ValueError, "original_shape"),  # ceil(17 / 2) = 9 != 8
    (dict(original_shape=(5, 16)), ValueError, "original_shape"),
])
def test_fp4_tensor_errors(case, error, match):
    data, scale = _fp4_inputs()
    args = dict(data=data, scale=scale, scale_start_index=0, original_shape=None)
    args.update(case)
    with pytest.raises(error, match=match):
        flashtile.utils.FP4Tensor(**args)


def test_trtllm_stub_rejects_fp4_out():
    data, scale = _fp4_inputs()
    with pytest.raises(NotImplementedError, match="TensorRT-LLM"):
        flashtile.decode.trtllm_batch_decode_with_kv_cache(
            None, None, None, None, None, 1, out=flashtile.utils.FP4Tensor(data, scale))


# ---------------------------------------------------------------------------------------------
# jit
# ---------------------------------------------------------------------------------------------


def test_jit_names():
    from flashtile.jit import env
    from flashtile.jit.core import logger

    assert isinstance(logger, logging.Logger) and logger.name == "flashtile.jit"
    logger.setLevel(logging.ERROR)  # what SGLang's configure_logger does with it
    assert isinstance(env.FLASHINFER_WORKSPACE_DIR, pathlib.Path)
    assert env.triton_cache_dir is cli.triton_cache_dir  # one definition, the directory clear-cache deletes


def test_workspace_dir_is_triton_cache(tmp_path):
    import subprocess

    code = "import flashtile.jit.env as e; print(e.FLASHINFER_WORKSPACE_DIR)"
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "kernels"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=pathlib.Path(__file__).resolve().parent.parent, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "kernels")


# ---------------------------------------------------------------------------------------------
# autotuner
# ---------------------------------------------------------------------------------------------


def test_autotune_context_manager_without_cache():
    from flashtile.autotuner import AutoTuner, autotune

    assert flashtile.autotune is autotune
    with autotune():
        pass
    with autotune(True, skip_ops={"fp4_gemm"}, tuning_buckets=(64, 128), round_up=True, some_later_keyword=1):
        pass
    assert AutoTuner.get() is AutoTuner.get()
    AutoTuner.get().clear_cache()


def test_autotune_vllm_warmup_sequence(tmp_path):
    """vLLM's flashinfer_autotune: autotune(tune_mode=True, cache=path, skip_ops=...) around a dummy run,
    read the file back if it exists, then AutoTuner.get().load_configs(path); its multi-rank sync saves
    with save_configs and requires load_configs to return True."""
    from flashtile.autotuner import AutoTuner, autotune

    path = tmp_path / "autotune" / "autotune_configs.json"
    path.parent.mkdir()
    with autotune(tune_mode=True, cache=str(path), skip_ops={"fp4_gemm"}):
        assert not path.exists()
    configs = json.loads(path.read_bytes())
    assert isinstance(configs, dict) and set(configs) == {"_metadata"}
    assert configs["_metadata"]["writer"] == "flashtile"
    assert AutoTuner.get().load_configs(str(path)) is True
    again = tmp_path / "saved.json"
    AutoTuner.get().save_configs(str(again))
    assert AutoTuner.get().load_configs(again) is True
    with autotune(False, cache=str(path)):  # inference with a pre-tuned file: read, not written
        pass


def test_autotune_read_only_and_missing(tmp_path):
    from flashtile.autotuner import AutoTuner, autotune

    path = tmp_path / "never.json"
    with autotune(False, cache=path):
        pass
    assert not path.exists()
    assert AutoTuner.get().load_configs(path) is False  # a missing file is accepted: nothing loaded


def test_autotune_keeps_flashinfer_tactics(tmp_path):
    from flashtile.autotuner import AutoTuner, autotune

    path = tmp_path / "configs.json"
    foreign = {"_metadata": {"flashinfer_version": "0.7.2.post1"}, "('fp4_gemm', ...)": ["runner", 3]}
    path.write_text(json.dumps(foreign))
    with autotune(True, cache=path):
        pass
    assert json.loads(path.read_text()) == foreign
    assert AutoTuner.get().load_configs(path) is False  # tactics flashtile cannot use


def test_autotune_errors(tmp_path):
    from flashtile.autotuner import AutoTuner, autotune

    with pytest.raises(ValueError, match="tuning_buckets"):
        with autotune(tuning_buckets=()):
            pass
    with pytest.raises(ValueError, match="cuda_graph_profile_replays"):
        with autotune(cuda_graph_profile_replays=0):
            pass
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        AutoTuner.get().load_configs(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError):
        AutoTuner.get().load_configs(bad)


# ---------------------------------------------------------------------------------------------
# flashtile.triton.cascade, __version__
# ---------------------------------------------------------------------------------------------


def test_triton_cascade_names():
    import flashtile.triton.cascade as tc

    assert (tc.merge_state, tc.merge_state_in_place, tc.merge_states) == (
        flashtile.merge_state, flashtile.merge_state_in_place, flashtile.merge_states)
    assert flashtile.__version__ == "0.1.0"


def test_triton_subpackage_does_not_shadow_triton(path, device):
    """With flashtile.triton imported, flashtile's kernels still import the real Triton (the kernel
    path runs them, under the interpreter on CPU)."""
    import flashtile.triton.cascade as tc
    from flashtile.kernels import merge

    assert merge.triton is sys.modules["triton"] and hasattr(merge.triton, "jit")
    v = torch.randn(3, 2, 2, 64, device=device, dtype=torch.float16)
    s = torch.randn(3, 2, 2, device=device) * 3
    out_v, out_s = tc.merge_state(v[:, 0].contiguous(), s[:, 0].contiguous(), v[:, 1].contiguous(),
                                  s[:, 1].contiguous())
    ref_v, ref_s = merge_states_f64(v, s.double())
    torch.testing.assert_close(out_v.double().cpu(), ref_v, atol=TOLERANCES[torch.float16][0],
                               rtol=TOLERANCES[torch.float16][1])
    torch.testing.assert_close(out_s.double().cpu(), ref_s, atol=LSE_TOLERANCES[torch.float32][0],
                               rtol=LSE_TOLERANCES[torch.float32][1])
