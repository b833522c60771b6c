"""The test harness's changes to Triton's interpreter (conftest.py): the language is patched once per launch,
not again on every nested @triton.jit call, and float32 rounds to bfloat16 and to float8 to nearest-even as on the
GPU. Both apply to the installed Triton; kernels with nested calls compute what they did; the rounding is torch's
(for float8 after the GPU's saturation)."""

import pytest
import torch
import triton
import triton.language as tl

from conftest import HAS_CUDA, INTERPRETER_PATCHES_ONCE, INTERPRETER_ROUNDS_CASTS

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="the interpreter runs on CPU only")


@triton.jit
def _twice_plus_abs(x, y):
    return x * 2 + tl.abs(y)


@triton.jit
def _nested_calls_kernel(X, Y, OUT, N: tl.constexpr, REPEATS: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(X + offs)
    acc = tl.zeros([N], dtype=tl.float32)
    for _ in range(REPEATS):
        acc += _twice_plus_abs(x, acc)
    tl.store(OUT + offs, acc + _twice_plus_abs(tl.load(Y + offs), x))


@triton.jit
def _cast_kernel(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, tl.load(X + offs).to(Y.dtype.element_ty))


def _float32_classes() -> torch.Tensor:
    """Special values, normal numbers and random bit patterns (every class of float32), padded to 2**15."""
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 3.3895e38, -3.3895e38, 1e-40, -0.0, 0.0,
                            1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 2.0 - 2.0**-9, -0.12353515625, 100.0, 9.0, 0.0039,
                            2.0**-10, 3 * 2.0**-11, 450.0, 464.0, -1e6, 57344.0, 61440.0, 2.0**-17])
    patterns = torch.randint(-2**31, 2**31 - 1, (1 << 14,), dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = torch.cat([special, torch.randn(1 << 12), torch.randn(1 << 12) * 2.0**-8, patterns])
    return torch.cat([x, torch.zeros((1 << 15) - x.numel())])


def test_installed_triton_has_the_structure_the_harness_relies_on():
    # If a Triton release changes its interpreter, the harness leaves it alone: the suite then runs about twice
    # as long, and interpreted bfloat16 roundings truncate. This says so.
    assert INTERPRETER_PATCHES_ONCE
    assert INTERPRETER_ROUNDS_CASTS


def test_float32_to_bfloat16_rounds_as_torch_does():
    """Ties to even, carries into the exponent, overflow to inf, NaN, signed zeros, subnormals: every float32
    bit pattern class, against torch's conversion (the GPU's cvt.rn.bf16.f32)."""
    x = _float32_classes()
    y = torch.empty(x.numel(), dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, y, N=x.numel())
    want = x.to(torch.bfloat16)
    same = (y.view(torch.int16) == want.view(torch.int16)) | (y.isnan() & want.isnan())
    assert bool(same.all()), f"{int((~same).sum())} values rounded otherwise, e.g. {x[~same][:4].tolist()}"


@pytest.mark.parametrize("fp8", ["float8_e4m3fn", "float8_e5m2"])
def test_float32_to_float8_rounds_as_the_gpu_does(fp8):
    """Ties to even with carries into the exponent, subnormals, signed zeros and NaN as torch's cast; values
    beyond the largest finite one (infinities included) saturate to it, as the GPU's cvt.rn.satfinite does
    (torch's cast gives NaN or inf there)."""
    fp8 = getattr(torch, fp8)
    x = _float32_classes()
    y = torch.empty(x.numel(), dtype=fp8)
    _cast_kernel[(1,)](x, y, N=x.numel())
    bound = torch.finfo(fp8).max
    want = torch.where(x.isnan(), x, x.clamp(-bound, bound)).to(fp8)
    same = (y.view(torch.uint8) == want.view(torch.uint8)) | (y.float().isnan() & want.float().isnan())
    assert bool(same.all()), f"{int((~same).sum())} values rounded otherwise, e.g. {x[~same][:4].tolist()}"
    assert float(y[3].float()) == bound and float(y[1].float()) == -bound  # 3.39e38 and -inf saturate
    assert float(y[11].float()) == -0.125  # the interpreter's own cast gave -0.0625


def test_nested_calls_patch_nothing_and_compute_the_same(monkeypatch):
    from triton.runtime import interpreter

    walks = []
    real = interpreter._patch_lang_core
    monkeypatch.setattr(interpreter, "_patch_lang_core", lambda *a, **k: (walks.append(1), real(*a, **k))[1])
    original_load = tl.load
    x, y = torch.randn(8), torch.randn(8)
    walks_per_launch = []
    for repeats in (1, 6):
        walks.clear()
        out = torch.empty(8)
        _nested_calls_kernel[(2,)](x, y, out, N=8, REPEATS=repeats)
        walks_per_launch.append(len(walks))
        acc = torch.zeros(8)
        for _ in range(repeats):
            acc = acc + (x * 2 + acc.abs())
        torch.testing.assert_close(out, acc + y * 2 + x.abs())
    # A launch walks the language modules its kernel sees, and those of the first nested function that sees
    # others (triton.language's own, such as tl.zeros): a few walks (which modules those functions see varies
    # with what ran before), however many nested calls follow. Without the harness's change every nested call
    # walks again: 8 and 19 walks.
    assert max(walks_per_launch) <= 4, walks_per_launch
    assert tl.load is original_load  # the launch's patches are undone when it ends
