"""The test harness's change to Triton's interpreter (conftest.py: the language is patched once per launch,
not again on every nested @triton.jit call): it applies to the installed Triton, and kernels with nested
calls still compute what they did."""

import pytest
import torch
import triton
import triton.language as tl

from conftest import HAS_CUDA, INTERPRETER_PATCHES_ONCE

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="the interpreter runs on CPU only")


@triton.jit
def _twice_plus_abs(x, y):
    return x * 2 + tl.abs(y)


@triton.jit
def _nested_calls_kernel(X, Y, OUT, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(X + offs)
    acc = tl.zeros([N], dtype=tl.float32)
    for _ in range(3):
        acc += _twice_plus_abs(x, acc)
    tl.store(OUT + offs, acc + _twice_plus_abs(tl.load(Y + offs), x))


def test_installed_triton_has_the_structure_the_harness_relies_on():
    # If a Triton release changes its interpreter, the harness leaves it alone and the suite runs about
    # twice as long: this says so.
    assert INTERPRETER_PATCHES_ONCE


def test_nested_calls_patch_nothing_and_compute_the_same(monkeypatch):
    from triton.runtime import interpreter

    walks = []
    real = interpreter._patch_lang_core
    monkeypatch.setattr(interpreter, "_patch_lang_core", lambda *a, **k: (walks.append(1), real(*a, **k))[1])
    original_load = tl.load
    x, y = torch.randn(8), torch.randn(8)
    out = torch.empty(8)
    _nested_calls_kernel[(2,)](x, y, out, N=8)
    acc = torch.zeros(8)
    for _ in range(3):
        acc = acc + (x * 2 + acc.abs())
    torch.testing.assert_close(out, acc + y * 2 + x.abs())
    # The launch patches the module the kernel sees (triton.language); the first call into one of the language's
    # own jit functions (tl.zeros) patches the module those see (triton.language.core). Later nested calls (8 of
    # ours, more of the language's) patch nothing: without the harness's change this launch walks 12 times.
    assert len(walks) <= 2
    assert tl.load is original_load  # the launch's patches are undone when it ends
