"""Direct launches (flashtile/_core/launch.py): the cache key, the arguments handed to the compiled
kernel's launcher, and (on a GPU) agreement with Triton's own choice of compiled kernel."""

import pytest
import torch

import flashtile
from conftest import HAS_CUDA
from flashtile._core import launch
from flashtile._core.launch import DirectLaunch, argument_key
from oracles import rmsnorm_f64

# ---------------------------------------------------------------------------------------------
# The key: every property Triton specializes on changes it
# ---------------------------------------------------------------------------------------------


def test_int_key_separates_what_triton_specializes_on():
    # 1 is compiled in as a constant, multiples of 16 get a divisibility hint, the width picks i32/i64/u64
    assert argument_key(1) != argument_key(3)
    assert argument_key(16) != argument_key(17)
    assert argument_key(2**31 - 1) != argument_key(2**31)
    assert argument_key(2**63 - 1) != argument_key(2**63)
    assert argument_key(-(2**31)) != argument_key(-(2**31) - 1)
    # values Triton treats alike may share a key (fewer compiled-kernel lookups, same kernel)
    assert argument_key(3) == argument_key(5)
    assert argument_key(32) == argument_key(4096)


def test_tensor_key_is_dtype_and_16_byte_alignment():
    base = torch.zeros(64, dtype=torch.float16)
    assert argument_key(base) == argument_key(torch.zeros(8, dtype=torch.float16))
    assert argument_key(base) != argument_key(base.to(torch.bfloat16))
    assert argument_key(base) != argument_key(base[1:])  # 2-byte offset: not 16-byte aligned
    assert argument_key(base) == argument_key(base[8:])  # 16-byte offset: aligned


def test_scalars_carry_no_value_and_other_types_are_uncacheable():
    assert argument_key(0.5) == argument_key(2.0)
    assert argument_key(True) == argument_key(False)
    assert argument_key(True) != argument_key(1)
    assert argument_key(None) is None
    with pytest.raises(launch._Uncacheable):
        argument_key("text")


# ---------------------------------------------------------------------------------------------
# The key against Triton's own specialization code (CPU: Triton's binder, no GPU)
# ---------------------------------------------------------------------------------------------


def _probe_kernel(X, n, seed, scale, flag, opt, BLOCK):  # Triton's naming
    """The signature the key is tested on (the body is never compiled): a pointer, a specialized int,
    a do_not_specialize int, a float, a bool, an optional argument and a constexpr."""


def _triton_binder():
    """(DirectLaunch of _probe_kernel, Triton's binder for it): the function JITFunction.run calls to
    specialize a call's arguments (triton/runtime/jit.py), with the base backend's rules (those of
    every GPU backend). Skips on a Triton whose internals differ."""
    try:
        import triton.language as tl
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import JITFunction, create_function_from_signature
    except ImportError as e:
        pytest.skip(f"this Triton's specialization internals differ: {e}")
    _probe_kernel.__annotations__["BLOCK"] = tl.constexpr
    jit = JITFunction(_probe_kernel, do_not_specialize=["seed"])
    try:
        binder = create_function_from_signature(jit.signature, jit.params, BaseBackend)
        binder(torch.zeros(4), 3, 5, 0.5, True, None, 8)
    except Exception as e:  # another binder signature or return form
        pytest.skip(f"this Triton's binder differs: {type(e).__name__}: {e}")
    return DirectLaunch(jit), binder


def _tensor_at(dtype, offset):
    """A tensor whose data pointer is ``offset`` elements past an allocation's start (aligned to 64 bytes)."""
    base = torch.zeros(64, dtype=dtype)
    assert base.data_ptr() % 16 == 0
    return base[offset:]


INTS = [0, 1, 2, 3, 15, 16, 17, 32, -1, -5, -16, 2**31 - 1, 2**31, 2**31 + 16, -(2**31), -(2**31) - 1,
        2**32, 2**63 - 1, 2**63, 2**63 + 16, -(2**63), 2**64 - 1]
TENSORS = [_tensor_at(dtype, offset) for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int32,
                                                   torch.int64, torch.uint8, torch.bool)
           for offset in (0, 1, 2, 4, 8, 16)]
# Candidates per argument of _probe_kernel; each call varies one argument from the base call.
CANDIDATES = [
    TENSORS,
    INTS,
    INTS,
    [0.5, 2.0, -1.0, 0.0, float("inf")],
    [True, False],
    [None, 7, 16, 0.25, torch.zeros(3)],
    [8, 16, 1, 64],
]
BASE_CALL = (TENSORS[0], 3, 5, 0.5, True, None, 8)


def _calls():
    for position, values in enumerate(CANDIDATES):
        for value in values:
            call = list(BASE_CALL)
            call[position] = value
            yield tuple(call)


def test_equal_keys_get_equal_triton_specialization():
    """Two calls with one key get one specialization from Triton's own binder (so one compiled kernel),
    and each property Triton specializes on (16-byte alignment, == 1, divisibility by 16, integer
    width, dtype, constexpr value) changes the key; do_not_specialize ints are keyed by width only."""
    kernel, binder = _triton_binder()
    keyer = kernel._positional_keyer(len(BASE_CALL))
    spec_of_key = {}
    kinds = set()
    for call in _calls():
        key = keyer(*call)
        spec = binder(*call)[1]
        known = spec_of_key.setdefault(key, spec)
        assert known == spec, f"key {key} covers two Triton specializations: {known} and {spec} (call {call})"
        kinds.update(str(entry) for entry in spec)
    # The candidates exercise what Triton tells apart: aligned 'D' and unaligned pointers, i32/i64/u64,
    # the constant 1 and multiples of 16, so an over-coarse key would have failed above.
    text = " ".join(kinds)
    for needle in ("'*fp32', 'D'", "'*fp32', ''", "'i64'", "'u64'", "('constexpr', 1)", "'i32', 'D'",
                   "'*bf16'", "'*u1'"):
        assert needle in text, f"no candidate made Triton specialize as {needle}"


def test_keyword_arguments_are_keyed_like_triton():
    """The same with every argument passed by keyword (keyed by argument_key, ints by their properties)."""
    kernel, binder = _triton_binder()
    names = [p.name for p in kernel.params]
    spec_of_key = {}
    for call in _calls():
        kwargs = dict(zip(names, call))
        key = kernel._key(0, (), kwargs)
        spec = binder(**kwargs)[1]
        known = spec_of_key.setdefault(key, spec)
        assert known == spec, f"key {key} covers two Triton specializations: {known} and {spec}"


def test_seed_ints_are_keyed_like_triton():
    """``seed`` (do_not_specialize): Triton keys it by width; the key by the four int properties."""
    kernel, binder = _triton_binder()
    keyer = kernel._positional_keyer(len(BASE_CALL))
    specs = {}
    for seed in INTS:
        call = (*BASE_CALL[:2], seed, *BASE_CALL[3:])
        specs.setdefault(binder(*call)[1][2], set()).add(keyer(*call))
    assert len(specs) == 3  # i32, i64, u64
    for keys in specs.values():
        for other in specs.values():
            assert keys is other or keys.isdisjoint(other)


def test_direct_launch_is_gated_by_triton_version(monkeypatch):
    """Only the Triton releases it was tested with take the direct path; others use JITFunction.run."""
    assert launch.triton_version_tested("3.6.0") and launch.triton_version_tested("3.9.1+git")
    assert not launch.triton_version_tested("3.7.0") and not launch.triton_version_tested("4.0.0")
    monkeypatch.setattr(launch, "TESTED_TRITON_VERSIONS", ())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    launch.reset_launch_settings()
    assert not launch._direct_enabled()


# ---------------------------------------------------------------------------------------------
# The cache, with a stand-in for Triton (CPU)
# ---------------------------------------------------------------------------------------------


class _Param:
    def __init__(self, name, is_constexpr, do_not_specialize=False):
        self.name, self.is_constexpr, self.do_not_specialize = name, is_constexpr, do_not_specialize


class _Compiled:
    """Stands in for triton.compiler.CompiledKernel: records what its launcher receives."""

    function, packed_metadata = "function", "metadata"

    def __init__(self):
        self.launches = []

    def run(self, *args):
        self.launches.append(args)

    def launch_metadata(self, grid, stream, *args):
        return ("metadata for", grid)


class _FakeJit:
    """Stands in for a JITFunction: kernel(X, n, scale, BLOCK: constexpr, FLAG: constexpr = False), with
    ``n`` in do_not_specialize when asked."""

    def __init__(self, n_not_specialized=False):
        self.params = [_Param("X", False), _Param("n", False, n_not_specialized), _Param("scale", False),
                       _Param("BLOCK", True), _Param("FLAG", True)]
        self.triton_launches = []
        self.compiled = {}
        self.__name__ = "fake_kernel"

        def fn(X, n, scale, BLOCK, FLAG=False):
            pass

        self.fn = fn

    def _triton_key(self, args, kwargs):
        X, n = args[0], args[1]
        return (X.dtype, X.data_ptr() % 16 == 0, n == 1, n % 16 == 0, kwargs.get("BLOCK"), kwargs.get("FLAG"),
                kwargs.get("num_warps"))

    def __getitem__(self, grid):
        def launch_(*args, **kwargs):
            self.triton_launches.append((grid, args, kwargs))
            return self.compiled.setdefault(self._triton_key(args, kwargs), _Compiled())

        return launch_

    def run(self, *args, grid, warmup, **kwargs):
        return self.compiled.setdefault(self._triton_key(args, kwargs), _Compiled())


class _HookChain:
    """Triton's HookChain (triton >= 3.5): the hooks are its ``calls``."""

    def __init__(self, *calls):
        self.calls = list(calls)


class _FakeKnobs:
    """Stands in for ``triton.knobs.runtime``: launch hooks, none installed unless given."""

    def __init__(self, enter=None, leave=None):
        self.launch_enter_hook = _HookChain() if enter is None else enter
        self.launch_exit_hook = _HookChain() if leave is None else leave


class _FakeDriver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 1234


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setitem(launch._state, "enabled", True)
    monkeypatch.setitem(launch._state, "check", False)
    driver = _FakeDriver()
    monkeypatch.setitem(launch._state, "driver", driver)
    monkeypatch.setitem(launch._state, "current_device", driver.get_current_device)
    monkeypatch.setitem(launch._state, "knobs_runtime", _FakeKnobs())
    jit = _FakeJit()
    return jit, DirectLaunch(jit)


def test_second_call_goes_to_the_compiled_launcher_with_every_parameter(fake_cuda):
    jit, kernel = fake_cuda
    x, x2 = torch.zeros(32), torch.ones(48)
    kernel[(3,)](x, 20, 0.5, BLOCK=64, num_warps=4)
    assert len(jit.triton_launches) == 1
    kernel[(5, 2)](x2, 20, 1.5, BLOCK=64, num_warps=4)  # same key: another aligned tensor, another float
    assert len(jit.triton_launches) == 1
    (compiled,) = jit.compiled.values()
    # grid padded to 3-D, stream, handle, metadata, no hooks, then X, n, scale, BLOCK and FLAG's default
    assert compiled.launches == [(5, 2, 1, 1234, "function", "metadata", None, None, None, x2, 20, 1.5, 64, False)]


def test_ints_are_keyed_by_value_unless_triton_does_not_specialize_them(fake_cuda):
    jit, kernel = fake_cuda
    x = torch.zeros(32)
    kernel[(1,)](x, 20, 0.5, BLOCK=64)
    kernel[(1,)](x, 36, 0.5, BLOCK=64)  # Triton would reuse its kernel; the cache key is finer
    assert len(jit.triton_launches) == 2
    seeds = _FakeJit(n_not_specialized=True)
    by_property = DirectLaunch(seeds)
    for n in (20, 36, 3, 32, 48, 1, 1):
        by_property[(1,)](x, n, 0.5, BLOCK=64)
    assert len(seeds.triton_launches) == 3  # 20/36/3, 32/48 (divisible by 16), 1


@pytest.mark.parametrize("change", ["n=1", "n%16", "dtype", "misaligned", "constexpr", "default constexpr",
                                    "num_warps"])
def test_a_call_that_specializes_differently_goes_through_triton(fake_cuda, change):
    jit, kernel = fake_cuda
    x = torch.zeros(64)
    args, kwargs = [x, 20, 0.5], dict(BLOCK=64, num_warps=4)
    kernel[(1,)](*args, **kwargs)
    if change == "n=1":
        args[1] = 1
    elif change == "n%16":
        args[1] = 32
    elif change == "dtype":
        args[0] = x.to(torch.float16)
    elif change == "misaligned":
        args[0] = x[1:]
    elif change == "constexpr":
        kwargs["BLOCK"] = 128
    elif change == "default constexpr":
        kwargs["FLAG"] = True
    else:
        kwargs["num_warps"] = 8
    kernel[(1,)](*args, **kwargs)
    assert len(jit.triton_launches) == 2


def test_cache_starts_over_when_full(fake_cuda, monkeypatch):
    jit, kernel = fake_cuda
    monkeypatch.setattr(launch, "MAX_CACHED_CALLS", 3)
    x = torch.zeros(64)
    for n in (20, 21, 22, 23):  # the fourth key clears the three before it
        kernel[(1,)](x, n, 0.5, BLOCK=64)
    assert len(kernel._compiled) == 1
    kernel[(1,)](x, 23, 0.5, BLOCK=64)
    assert len(jit.triton_launches) == 4  # 23 was cached after the reset
    kernel[(1,)](x, 20, 0.5, BLOCK=64)
    assert len(jit.triton_launches) == 5


def test_positional_constexpr_is_keyed_by_value(fake_cuda):
    jit, kernel = fake_cuda
    x = torch.zeros(64)
    kernel[(1,)](x, 20, 0.5, 64)
    kernel[(1,)](x, 20, 0.5, 128)  # a runtime int key would call 64 and 128 alike
    assert len(jit.triton_launches) == 2


def test_uncacheable_arguments_always_take_triton_path(fake_cuda):
    jit, kernel = fake_cuda
    for _ in range(2):
        kernel[(1,)](torch.zeros(4), 3, "not a number", BLOCK=4)
    assert len(jit.triton_launches) == 2


def test_check_mode_raises_when_triton_would_pick_another_kernel(fake_cuda, monkeypatch):
    jit, kernel = fake_cuda
    x = torch.zeros(64)
    kernel[(1,)](x, 20, 0.5, BLOCK=64)
    monkeypatch.setitem(launch._state, "check", True)
    kernel[(1,)](x, 20, 0.5, BLOCK=64)  # Triton agrees: no error
    jit.compiled.clear()  # now Triton would compile (pick) a different kernel object
    with pytest.raises(RuntimeError, match="cached kernel is not the one Triton selects"):
        kernel[(1,)](x, 20, 0.5, BLOCK=64)


def test_disabled_cache_always_takes_triton_path(fake_cuda, monkeypatch):
    jit, kernel = fake_cuda
    monkeypatch.setitem(launch._state, "enabled", False)
    for _ in range(3):
        kernel[(1,)](torch.zeros(4), 3, 0.5, BLOCK=4)
    assert len(jit.triton_launches) == 3


def test_bound_arguments_follow_a_real_kernel_signature():
    from triton.runtime.jit import JITFunction

    from flashtile._core.dispatch import Path, load_kernels

    norm = load_kernels("norm", Path.TRITON if HAS_CUDA else Path.TRITON_INTERPRETER)
    raw = norm._rmsnorm_kernel  # decorated on a GPU; an interpreted function on CPU
    kernel = raw if isinstance(raw, DirectLaunch) else DirectLaunch(JITFunction(raw.fn))
    names = [p.name for p in kernel.params]
    assert names[-4:] == ["HAS_RESIDUAL", "ONE_PASS", "BLOCK_M", "BLOCK_N"]
    args = tuple(range(len(names) - 4))
    tail = kernel._tail(args, dict(HAS_RESIDUAL=True, ONE_PASS=False, BLOCK_M=1, BLOCK_N=8, num_warps=4))
    assert tail == [True, False, 1, 8]
    assert kernel._tail(args[:-1], dict(weight_offset=1.0, HAS_RESIDUAL=True, ONE_PASS=False,
                                        BLOCK_M=1, BLOCK_N=8)) == [1.0, True, False, 1, 8]


# ---------------------------------------------------------------------------------------------
# Launch memos (whole launches replayed per launcher key), with the same stand-ins
# ---------------------------------------------------------------------------------------------


def _memo_launcher(memo, kernel):
    """A launcher in the style of kernels/norm.py: key on the tensor, compute the rest."""
    calls = []

    def launcher(x, scale):
        key = (launch.tensor_key(x),)
        replay = memo.get(key)
        if replay is not None:
            return replay(x, scale)
        calls.append(x.shape)
        memo.launch(key, kernel, (x.shape[0] // 4,), (x, x.shape[0], scale), dict(BLOCK=x.shape[0] * 2, num_warps=4))

    return launcher, calls


@pytest.fixture
def memo_launcher(fake_cuda):
    """(stand-in JIT, memo, launcher, list of the launches the launcher computed)."""
    jit, kernel = fake_cuda
    memo = launch.LaunchMemo(dynamic=(0, 2))
    launcher, computed = _memo_launcher(memo, kernel)
    return jit, memo, launcher, computed


def test_memo_replays_a_known_key_with_this_calls_tensors_and_floats(memo_launcher):
    jit, memo, launcher, computed = memo_launcher
    x, x2, x3 = torch.zeros(32), torch.ones(32), torch.zeros(64)
    launcher(x, 0.5)
    launcher(x2, 1.5)  # same key: replayed without the launcher's work or Triton
    assert computed == [(32,)] and len(jit.triton_launches) == 1
    (compiled,) = jit.compiled.values()
    assert compiled.launches == [(8, 1, 1, 1234, "function", "metadata", None, None, None, x2, 32, 1.5, 64, False)]
    launcher(x3, 0.5)  # another shape: another key, computed and launched through Triton
    assert computed == [(32,), (64,)] and len(jit.triton_launches) == 2
    launcher(torch.zeros(33)[1:], 0.5)  # 4-byte offset, not 16-byte aligned: its own key
    assert len(computed) == 3


def test_memo_is_bypassed_when_off_with_hooks_and_in_check_mode(memo_launcher, monkeypatch):
    jit, memo, launcher, computed = memo_launcher
    x = torch.zeros(32)
    launcher(x, 0.5)
    for knobs in (_FakeKnobs(enter=_HookChain(print)), _FakeKnobs(leave=_HookChain(print)),  # a profiler's hooks
                  _FakeKnobs(enter=print)):  # an older Triton's plain hook function
        monkeypatch.setitem(launch._state, "knobs_runtime", knobs)
        launcher(x, 0.5)
    monkeypatch.setitem(launch._state, "knobs_runtime", _FakeKnobs())
    monkeypatch.setitem(launch._state, "check", True)
    launcher(x, 0.5)
    monkeypatch.setitem(launch._state, "check", False)
    monkeypatch.setitem(launch._state, "enabled", False)
    launcher(x, 0.5)
    assert len(computed) == 6
    monkeypatch.setitem(launch._state, "enabled", True)
    launcher(x, 0.5)  # replayed again
    assert len(computed) == 6


def test_memo_check_mode_raises_when_the_key_does_not_fix_the_launch(fake_cuda, monkeypatch):
    jit, kernel = fake_cuda
    memo = launch.LaunchMemo(dynamic=(0, 2))
    monkeypatch.setitem(launch._state, "check", True)
    x = torch.zeros(32)
    memo.launch("key", kernel, (1,), (x, 32, 0.5), dict(BLOCK=64))
    memo.launch("key", kernel, (1,), (x, 32, 2.5), dict(BLOCK=64))  # only a dynamic value differs: fine
    with pytest.raises(RuntimeError, match="does not fix the launch"):
        memo.launch("key", kernel, (1,), (x, 48, 0.5), dict(BLOCK=64))  # a static int the key missed
    with pytest.raises(RuntimeError, match="does not fix the launch"):
        memo.launch("key", kernel, (2,), (x, 32, 0.5), dict(BLOCK=64))  # the grid
    with pytest.raises(RuntimeError, match="does not fix the launch"):
        memo.launch("key", kernel, (1,), (x, 32, 0.5), dict(BLOCK=128))  # a constexpr


def test_memo_starts_over_when_full(memo_launcher, monkeypatch):
    jit, memo, launcher, computed = memo_launcher
    monkeypatch.setattr(launch, "MAX_CACHED_CALLS", 2)
    for n in (16, 32, 48, 48, 16):  # the third key clears the two before it
        launcher(torch.zeros(n), 0.5)
    assert computed == [(16,), (32,), (48,), (16,)]


def test_replayed_launches_pass_what_computed_launches_pass():
    """Every memoized launcher (norms, activation, RoPE, merges, samplers), replayed under the keys the
    API passes down, hands the compiled kernel the arguments its own computation would: tests/replay_check.py,
    in a subprocess because it needs Triton's compiled-kernel path (no interpreter) on CPU tensors."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FLASHTILE_BACKEND")}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, str(root / "tests" / "replay_check.py")], env=env, cwd=root,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("ok ") == 23


# ---------------------------------------------------------------------------------------------
# GPU: cached launches agree with Triton (check mode) and compute the right thing
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 3, 16, 33])
@pytest.mark.parametrize("offset", [0, 1, 8])
def test_gpu_cached_launches_match_triton(monkeypatch, rows, offset):
    monkeypatch.setenv("FLASHTILE_CHECK_LAUNCH", "1")
    monkeypatch.delenv("FLASHTILE_DIRECT_LAUNCH", raising=False)
    launch.reset_launch_settings()
    try:
        hidden = 4096
        storage = torch.randn(rows * hidden + offset, dtype=torch.bfloat16, device="cuda")
        x = storage[offset:].view(rows, hidden)  # offset 1: a 2-byte misaligned base pointer
        w = torch.randn(hidden, dtype=torch.bfloat16, device="cuda")
        for _ in range(3):  # first call compiles, the rest are cached launches checked against Triton
            out = flashtile.rmsnorm(x, w)
        torch.testing.assert_close(out.double().cpu(), rmsnorm_f64(x.double().cpu(), w.double().cpu()),
                                   atol=2e-2, rtol=2e-2)
        y = torch.randn(rows, 2 * 96 + offset, dtype=torch.float16, device="cuda")[:, offset:]
        for _ in range(3):
            act = flashtile.silu_and_mul(y)
        ref = torch.nn.functional.silu(y[:, :96].double()) * y[:, 96:].double()
        torch.testing.assert_close(act.double(), ref, atol=2e-3, rtol=2e-3)
        assert act.dtype == torch.float16 and act.shape == (rows, 96)
        from flashtile.kernels import norm

        assert norm._rmsnorm_kernel._compiled, "no launch was cached"
    finally:
        monkeypatch.undo()
        launch.reset_launch_settings()


@pytest.mark.gpu
def test_gpu_replayed_launches_compute_each_calls_inputs(monkeypatch):
    """Without check mode the launch memos replay: every call must use its own tensors and floats
    (fresh inputs, outputs and eps each time), for each memoized launcher."""
    from flashtile.kernels import activation, norm, rope
    from oracles import act_and_mul_f64, fused_add_rmsnorm_f64, layernorm_f64, rope_general_f64

    monkeypatch.delenv("FLASHTILE_CHECK_LAUNCH", raising=False)
    monkeypatch.delenv("FLASHTILE_DIRECT_LAUNCH", raising=False)
    launch.reset_launch_settings()
    try:
        dev, bf = "cuda", torch.bfloat16
        w, b = torch.randn(4096, dtype=bf, device=dev), torch.randn(4096, dtype=bf, device=dev)
        n = 16
        cache = torch.randn(64, 64, device=dev)
        for step in range(3):
            eps = 1e-6 * 10**step
            x = torch.randn(3, 4096, dtype=bf, device=dev)
            torch.testing.assert_close(flashtile.rmsnorm(x, w, eps).double().cpu(), rmsnorm_f64(x, w, eps),
                                       atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(flashtile.gemma_rmsnorm(x, w, eps).double().cpu(),
                                       rmsnorm_f64(x, w, eps, 1.0), atol=2e-2, rtol=2e-2)
            r = torch.randn_like(x)
            want_x, want_r = fused_add_rmsnorm_f64(x, r, w, eps)
            flashtile.fused_add_rmsnorm(x, r, w, eps)
            torch.testing.assert_close(x.double().cpu(), want_x, atol=3e-2, rtol=2e-2)
            torch.testing.assert_close(r.double().cpu(), want_r, atol=2e-2, rtol=1e-2)
            torch.testing.assert_close(flashtile.layernorm(x, w, b, eps).double().cpu(), layernorm_f64(x, w, b, eps),
                                       atol=5e-2, rtol=2e-2)
            y = torch.randn(5, 2 * 96, dtype=torch.float16, device=dev)
            torch.testing.assert_close(flashtile.gelu_and_mul(y).double().cpu(), act_and_mul_f64(y, "gelu"),
                                       atol=2e-3, rtol=2e-3)
            q, k = torch.randn(n, 4 * 128, dtype=bf, device=dev), torch.randn(n, 2 * 128, dtype=bf, device=dev)
            pos = torch.randint(0, 64, (n,), device=dev)
            q_out, k_out = flashtile.apply_rope_with_cos_sin_cache(pos, q, k, 128, cache)
            torch.testing.assert_close(q_out.view(n, 4, 128).double().cpu(),
                                       rope_general_f64(q.view(n, 4, 128), pos, 64, cos_sin_cache=cache),
                                       atol=3e-2, rtol=2e-2)
            torch.testing.assert_close(k_out.view(n, 2, 128).double().cpu(),
                                       rope_general_f64(k.view(n, 2, 128), pos, 64, cos_sin_cache=cache),
                                       atol=3e-2, rtol=2e-2)
        for memo in (norm._RMSNORM_LAUNCHES, norm._LAYERNORM_LAUNCHES, activation._LAUNCHES, rope._LAUNCHES):
            assert memo._replays, "a launcher recorded nothing: its replays went untested"
    finally:
        monkeypatch.undo()
        launch.reset_launch_settings()


def test_memo_knob_and_clear_launch_memos(memo_launcher, monkeypatch):
    jit, memo, launcher, computed = memo_launcher
    x = torch.zeros(32)
    launcher(x, 0.5)
    launch.clear_launch_memos()  # e.g. after a tuning script changed a module's launch constants
    launcher(x, 0.5)
    monkeypatch.setitem(launch._state, "memo", False)  # FLASHTILE_LAUNCH_MEMO=0: nothing replayed or recorded
    launch.clear_launch_memos()
    launcher(x, 0.5)
    assert len(computed) == 3 and not memo._replays
    monkeypatch.setitem(launch._state, "memo", True)
    launcher(x, 0.5)
    launcher(x, 0.5)
    assert len(computed) == 4


def test_replay_cell_replays_what_the_memo_would(memo_launcher, monkeypatch):
    """A ReplayCell (held by an API memo entry) replays the memo's launch for its key, and launches nothing
    (returns False) wherever LaunchMemo.get gives None: nothing recorded yet, hooks installed, check mode,
    direct launches or memos off, another current device; after clear_launch_memos until it is refreshed."""
    jit, memo, launcher, computed = memo_launcher
    x = torch.zeros(32)
    key = (launch.tensor_key(x),)
    cell = memo.cell(key)
    cell.refresh()
    assert cell.replay(x, 0.5) is False  # nothing recorded
    launcher(x, 0.5)
    (compiled,) = jit.compiled.values()
    launched = len(compiled.launches)
    cell.refresh()
    assert cell.replay(torch.ones(32), 1.5) is True
    assert len(compiled.launches) == launched + 1
    assert compiled.launches[-1][-4] == 32 and compiled.launches[-1][-3] == 1.5

    def replays() -> bool:
        before = len(compiled.launches)
        done = cell.replay(x, 0.5)
        assert len(compiled.launches) == before + done  # launched exactly when it says so
        return done

    unhooked = _FakeKnobs()
    unhooked.launch_enter_hook = unhooked.launch_exit_hook = None  # older Triton: no hook installed
    for knobs, hooked in ((_FakeKnobs(enter=_HookChain(print)), True), (_FakeKnobs(leave=_HookChain(print)), True),
                          (_FakeKnobs(leave=print), True), (_FakeKnobs(enter=print), True), (unhooked, False)):
        monkeypatch.setitem(launch._state, "knobs_runtime", knobs)
        assert replays() is not hooked
    monkeypatch.setitem(launch._state, "knobs_runtime", _FakeKnobs())
    for name, value in (("check", True), ("enabled", False), ("memo", False)):
        previous = launch._state.get(name)
        monkeypatch.setitem(launch._state, name, value)
        assert not replays(), name
        monkeypatch.setitem(launch._state, name, previous if previous is not None else name != "check")
    assert replays()
    monkeypatch.setitem(launch._state, "current_device", lambda: 1)  # recorded on device 0
    assert not replays()
    cell.refresh()  # nothing recorded on device 1
    assert not replays()
    monkeypatch.setitem(launch._state, "current_device", lambda: 0)
    cell.refresh()
    assert replays()
    launch.clear_launch_memos()
    assert not replays() and computed == [(32,)]
    launcher(x, 0.5)  # recorded again
    assert not replays()  # the cell still holds the cleared memo's replay
    cell.refresh()
    assert replays()


def _probe_tuple_kernel(X, extra, BLOCK):
    """A kernel taking a tuple argument, as the attention kernels take a variant's extra arguments."""


TUPLES = [(), (3,), (1,), (16,), (2**40,), (0.5,), (True,), (None,), (3, 0.5), (1, 0.5), (16, 2.0),
          (TENSORS[0],), (TENSORS[1],), (TENSORS[2],), (TENSORS[0], 7), (TENSORS[7], 1), (TENSORS[8], 0.25, 32)]


def test_tuple_arguments_are_keyed_like_triton():
    """A variant's extra arguments reach the kernels as one tuple: Triton specializes it element by element,
    and one key never covers two of its specializations (positional and keyword)."""
    try:
        import triton.language as tl
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import JITFunction, create_function_from_signature
    except ImportError as e:
        pytest.skip(f"this Triton's specialization internals differ: {e}")
    _probe_tuple_kernel.__annotations__["BLOCK"] = tl.constexpr
    jit = JITFunction(_probe_tuple_kernel)
    try:
        binder = create_function_from_signature(jit.signature, jit.params, BaseBackend)
        binder(TENSORS[0], (3, 0.5), 8)
    except Exception as e:
        pytest.skip(f"this Triton's binder differs: {type(e).__name__}: {e}")
    kernel = DirectLaunch(jit)
    keyer = kernel._positional_keyer(3)
    spec_of_key, specs = {}, set()
    for extra in TUPLES:
        for key in (keyer(TENSORS[0], extra, 8), kernel._key(0, (TENSORS[0],), {"extra": extra, "BLOCK": 8})):
            spec = binder(TENSORS[0], extra, 8)[1]
            known = spec_of_key.setdefault(key, spec)
            assert known == spec, f"key {key} covers two Triton specializations: {known} and {spec} ({extra})"
            specs.add(str(spec))
    assert len(specs) > 8  # the candidates do make Triton specialize differently
    with pytest.raises(launch._Uncacheable):
        argument_key((3, "text"))


def test_tuple_arguments_are_launched_directly_but_never_baked_into_a_replay(fake_cuda):
    """A tuple (a variant's extra arguments) takes the direct launch with this call's values; a recording that
    holds one gives no replay, which would bake one call's values in."""
    jit, kernel = fake_cuda
    x = torch.zeros(32)
    with launch.recording_launches() as recording:
        kernel[(1,)](x, 20, (7, 0.5), BLOCK=64)
    kernel[(1,)](x, 20, (9, 1.5), BLOCK=64)  # same key: direct launch with the new values
    assert len(jit.triton_launches) == 1
    (compiled,) = jit.compiled.values()
    assert compiled.launches[-1][9:12] == (x, 20, (9, 1.5))
    assert recording.complete and launch.make_replay(recording, (x,), frozenset()) is None


def test_a_dynamic_tuple_is_passed_by_the_replay(fake_cuda):
    """A tuple given among the dynamic arguments (a variant's extra arguments, matched by identity) is a
    replay argument: the replay passes the tuple of its call, not the recorded one."""
    jit, kernel = fake_cuda
    x, extra = torch.zeros(32), (7, 0.5)
    with launch.recording_launches() as recording:
        kernel[(1,)](x, 20, extra, BLOCK=64)
    replay = launch.make_replay(recording, (x, extra), frozenset())
    assert replay is not None
    y = torch.zeros(32)
    replay(y, (9, 1.5))
    (compiled,) = jit.compiled.values()
    assert compiled.launches[-1][9:12] == (y, 20, (9, 1.5))
