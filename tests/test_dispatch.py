"""Path selection: FLASHTILE_BACKEND and the Triton interpreter on machines without CUDA."""

import os
import subprocess
import sys

import pytest
import torch

from flashtile._core.dispatch import Path, choose_path, normalize_backend

SNIPPET = """
{pre}
import torch, flashtile
q = torch.randn(3, 2, 64, dtype=torch.float16); k = torch.randn(5, 2, 64, dtype=torch.float16)
print(tuple(flashtile.single_prefill_with_kv_cache(q, k, k).shape))
"""


def _run(pre):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FLASHTILE_BACKEND"] = "triton"
    return subprocess.run([sys.executable, "-c", SNIPPET.format(pre=pre)], env=env, capture_output=True, text=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter selection is for machines without CUDA")
def test_backend_triton_selects_interpreter_at_import():
    res = _run("")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "(3, 2, 64)" in res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter selection is for machines without CUDA")
def test_triton_imported_first_gives_clear_error():
    res = _run("import triton")
    assert res.returncode != 0
    assert "NotImplementedError" in res.stderr and "TRITON_INTERPRET=1" in res.stderr


def test_choose_path(monkeypatch):
    monkeypatch.setenv("FLASHTILE_BACKEND", "reference")
    assert choose_path(torch.device("cpu")).path is Path.REFERENCE
    monkeypatch.setenv("FLASHTILE_BACKEND", "auto")
    assert choose_path(torch.device("cpu")).path is Path.REFERENCE
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        # With a GPU the kernels compile for it; CPU tensors on the kernel path need the interpreter.
        with pytest.raises(NotImplementedError, match="TRITON_INTERPRET"):
            choose_path(torch.device("cpu"), "triton")
    else:
        assert choose_path(torch.device("cpu"), "triton").path is Path.TRITON_INTERPRETER
    monkeypatch.setenv("FLASHTILE_BACKEND", "gpu")
    with pytest.raises(ValueError, match="FLASHTILE_BACKEND"):
        choose_path(torch.device("cpu"))


def test_normalize_backend():
    assert normalize_backend("fa2") == "auto" and normalize_backend("fa3") == "auto"
    with pytest.raises(NotImplementedError, match="trtllm-gen"):
        normalize_backend("trtllm-gen")


def test_settings_are_read_once_until_reloaded(monkeypatch):
    """FLASHTILE_* settings are read once (_core/settings.py); reload() re-reads them and forgets the
    dispatch choices made with the old values (conftest's monkeypatch reloads after setenv)."""
    from flashtile._core import settings
    from flashtile._core.dispatch import implementation

    monkeypatch.setenv("FLASHTILE_BACKEND", "reference")
    assert settings.env("FLASHTILE_BACKEND") == "reference"
    assert implementation("norm", torch.device("cpu")).__name__ == "flashtile.reference.norm"
    os.environ["FLASHTILE_BACKEND"] = "triton"  # behind the settings' back (monkeypatch restores it)
    assert settings.env("FLASHTILE_BACKEND") == "reference"
    assert implementation("norm", torch.device("cpu")).__name__ == "flashtile.reference.norm"
    settings.reload()
    assert settings.env("FLASHTILE_BACKEND") == "triton"
    if not torch.cuda.is_available():  # the interpreter (conftest set TRITON_INTERPRET=1)
        assert implementation("norm", torch.device("cpu")).__name__ == "flashtile.kernels.norm"


def test_interpreter_is_chosen_in_one_place(monkeypatch):
    from flashtile._core import settings

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not settings.interpreting()
    settings.select_interpreter(unless_set=True)  # set by the user: left alone
    assert not settings.interpreting()
    settings.select_interpreter()
    assert settings.interpreting()
