"""Test harness (DESIGN.md §Testing).

Every attention test runs on the paths of the machine it is on:
- ``reference``: the pure-PyTorch path (FLASHTILE_BACKEND=reference);
- ``kernel``: the Triton kernels, on the GPU when there is one, else under Triton's interpreter on
  CPU (TRITON_INTERPRET=1 is set here, before any kernel module is imported; tests keep shapes tiny).
Every test runs with output poisoning on (new outputs filled with NaN, so unwritten elements fail)
but without FLASHTILE_DEBUG's device-index validation: device page tables take the production path
(no host copy). A test that wants the validation sets FLASHTILE_DEBUG=1 itself (monkeypatch).

flashtile reads its FLASHTILE_* settings once (flashtile/_core/settings.py); the ``monkeypatch``
fixture here re-reads them after every ``setenv``/``delenv`` and after undoing them, so tests change
settings the ordinary way.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda") if HAS_CUDA else torch.device("cpu")


class _NoPatches:
    """The patch scope of a nested call that patched nothing."""

    @staticmethod
    def restore() -> None:
        pass


def _patch_language_once_per_launch() -> bool:
    """Make Triton's interpreter patch ``triton.language`` once per kernel launch instead of once per call.

    The interpreter patches the language modules (an ``inspect.getmembers`` walk over them, about a
    millisecond) at the start of a launch, restores them when it ends, and patches them again on every call
    of a nested ``@triton.jit`` function inside it. The nested patches find the launch's patches in place
    and change nothing, but they were most of the interpreted sampling tests' time. Here a nested call whose
    language modules the running launch has patched skips that walk; every other call patches as before.
    Returns whether the interpreter has the structure this relies on (else nothing is changed)."""
    try:
        from triton.runtime import interpreter
        patch_lang, grid_call = interpreter._patch_lang, interpreter.GridExecutor.__call__
        languages = (interpreter.tl, interpreter.tl.core)
    except (ImportError, AttributeError):
        return False
    patched: list = []  # per running launch: the ids of the language modules it patched

    def modules_of(fn) -> set:
        return {id(v) for v in fn.__globals__.values() if any(v is lang for lang in languages)}

    def patch_lang_once(fn):
        modules = modules_of(fn)
        if patched and modules and modules <= patched[-1]:  # (no modules: the interpreter's own error stands)
            return _NoPatches
        scope = patch_lang(fn)
        if patched:
            patched[-1] |= modules
        return scope

    def launch(self, *args, **kwargs):
        patched.append(set())
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            patched.pop()

    interpreter._patch_lang = patch_lang_once
    interpreter.GridExecutor.__call__ = launch
    return True


def _round_casts_to_nearest() -> bool:
    """Make Triton's interpreter round float32 to bfloat16 to nearest-even, as the GPU's ``x.to(tl.bfloat16)``
    does (cvt.rn.bf16.f32). The interpreter keeps bfloat16 as its upper 16 bits and drops the lower ones: a
    truncation toward zero, up to one unit in the last place and biased, where the GPU errs by at most half a
    unit. Interpreted kernels then erred more than on the GPU wherever they round a float32 tile to bfloat16
    (rotated RoPE queries and keys, probabilities, outputs).

    float32 to float8 (e4m3fn, e5m2) likewise, as the GPU's cvt.rn.satfinite does: nearest-even, beyond the
    largest finite value that value, NaN stays NaN. The interpreter's own cast rounds the dropped bits half
    up without carrying into the exponent (Triton 3.9: -0.1235 became -0.0625, not -0.125), and misrounds
    subnormals. Returns whether the installed interpreter has the cast this replaces (else nothing is
    changed)."""
    try:
        import numpy as np
        from triton.runtime import interpreter

        builder, cast = interpreter.InterpreterBuilder, interpreter.InterpreterBuilder.cast_impl
        to_fp = interpreter.InterpreterBuilder.create_fp_to_fp
        handle, bfloat16, float32 = interpreter.TensorHandle, interpreter.tl.bfloat16, interpreter.tl.float32
        fp8_types = {interpreter.tl.float8e4nv: torch.float8_e4m3fn, interpreter.tl.float8e5: torch.float8_e5m2}
    except (ImportError, AttributeError):
        return False

    def fp_to_fp(self, src, dst_type, rounding_mode):
        fp8 = fp8_types.get(dst_type.scalar)
        if src.dtype.scalar != float32 or fp8 is None:
            return to_fp(self, src, dst_type, rounding_mode)
        # through torch's cast (ties to even), after the GPU's saturation
        x = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
        bound = torch.finfo(fp8).max
        x = torch.where(x.isnan(), x, x.clamp(-bound, bound))
        return handle(x.to(fp8).view(torch.uint8).numpy().reshape(np.shape(src.data)), dst_type.scalar)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar != float32 or dst_type.scalar != bfloat16:
            return cast(self, src, dst_type)
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16  # ties to even; overflow rounds to inf
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        out = np.where(nan, (bits >> 16) | 0x40, rounded).astype(np.uint16)  # NaN stays a (quiet) NaN
        return handle(out.reshape(np.shape(src.data)), bfloat16)

    builder.cast_impl = cast_impl
    builder.create_fp_to_fp = fp_to_fp
    return True


INTERPRETER_PATCHES_ONCE = not HAS_CUDA and _patch_language_once_per_launch()
INTERPRETER_ROUNDS_CASTS = not HAS_CUDA and _round_casts_to_nearest()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class _SettingsMonkeyPatch(pytest.MonkeyPatch):
    """pytest's MonkeyPatch, reloading flashtile's settings whenever the environment changes."""

    def setenv(self, name, value, prepend=None):
        super().setenv(name, value, prepend)
        _reload_settings()

    def delenv(self, name, raising=True):
        super().delenv(name, raising)
        _reload_settings()

    def undo(self):
        super().undo()
        _reload_settings()


def _reload_settings():
    from flashtile._core import settings

    settings.reload()


@pytest.fixture
def monkeypatch():
    patch = _SettingsMonkeyPatch()
    yield patch
    patch.undo()


@pytest.fixture(params=["reference", "kernel"])
def path(request, monkeypatch):
    """Which implementation runs: sets FLASHTILE_BACKEND for the test."""
    monkeypatch.setenv("FLASHTILE_BACKEND", "reference" if request.param == "reference" else "triton")
    return request.param


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(autouse=True)
def _poison_outputs():
    """NaN-poison every new output (flashtile._core.debug), independent of FLASHTILE_DEBUG."""
    from flashtile._core.debug import set_output_poisoning

    set_output_poisoning(True)
    yield
    set_output_poisoning(None)
