"""Recorded launches and their replays (_core/launch.py: recording_launches, make_replay), on CPU.

A stand-in for a JITFunction (as in test_launch.py) plays Triton: its first launch returns a stand-in
compiled kernel whose ``run`` records what it receives, so the test sees exactly what a replay passes to
Triton's launcher: kernel(A, B, C, n, scale, BLOCK: constexpr)."""

import pytest
import torch

from flashtile._core import launch
from flashtile._core.launch import DirectLaunch


class _Param:
    def __init__(self, name, is_constexpr):
        self.name, self.is_constexpr = name, is_constexpr


class _Compiled:
    function, packed_metadata = "function", "metadata"

    def __init__(self):
        self.launches = []

    def run(self, *args):
        self.launches.append(args)


class _FakeJit:
    def __init__(self):
        self.params = [_Param(n, False) for n in ("A", "B", "C", "n", "scale")] + [_Param("BLOCK", True)]
        self.compiled = _Compiled()
        self.__name__ = "fake_kernel"

        def fn(A, B, C, n, scale, BLOCK):
            pass

        self.fn = fn

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.compiled


class _FakeDriver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 1234


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setitem(launch._state, "enabled", True)
    monkeypatch.setitem(launch._state, "check", False)
    monkeypatch.setitem(launch._state, "driver", _FakeDriver())
    monkeypatch.setattr(launch, "_hooks", lambda: None)
    monkeypatch.setattr(launch, "_descriptor_key", lambda desc: ("descriptor", tuple(desc.block_shape)))
    return DirectLaunch(_FakeJit())


def _record(kernel, *tensors):
    with launch.recording_launches() as recording:
        kernel[(2, 3)](*tensors, 64, 0.5, BLOCK=32)
    return recording


def test_replay_substitutes_the_dynamic_tensors_and_bakes_the_rest(kernel):
    a, b, owned = torch.zeros(64), torch.zeros(64), torch.zeros(64)
    recording = _record(kernel, a, b, owned)
    assert recording.complete and len(recording.launches) == 1
    replay = launch.make_replay(recording, (a, b), frozenset({owned.untyped_storage().data_ptr()}))
    assert replay is not None
    launches = kernel.fn.compiled.launches
    launches.clear()
    a2, b2 = torch.ones(64), torch.ones(64)
    replay(a2, b2)
    (args,) = launches
    assert args[:9] == (2, 3, 1, 1234, "function", "metadata", None, None, None)  # grid, stream, kernel
    assert args[9] is a2 and args[10] is b2 and args[11] is owned  # dynamic substituted, owned baked in
    assert args[12:] == (64, 0.5, 32)  # scalars and the constexpr tail


def test_a_view_of_an_owned_storage_may_be_baked_in(kernel):
    a, b, owned = torch.zeros(64), torch.zeros(64), torch.zeros(64)
    recording = _record(kernel, a, b, owned[16:])
    assert launch.make_replay(recording, (a, b), frozenset({owned.untyped_storage().data_ptr()})) is not None


def test_a_tensor_neither_dynamic_nor_owned_is_not_replayable(kernel):
    a, b, scratch = torch.zeros(64), torch.zeros(64), torch.zeros(64)
    assert launch.make_replay(_record(kernel, a, b, scratch), (a, b), frozenset()) is None


def test_a_launch_through_triton_makes_the_recording_incomplete(kernel, monkeypatch):
    a, b, c = torch.zeros(64), torch.zeros(64), torch.zeros(64)
    monkeypatch.setitem(launch._state, "enabled", False)  # direct launches off: Triton's path, not replayable
    recording = _record(kernel, a, b, c)
    assert not recording.complete
    assert launch.make_replay(recording, (a, b, c), frozenset()) is None


def test_nothing_is_recorded_outside_the_context_or_in_check_mode(kernel, monkeypatch):
    a, b, c = torch.zeros(64), torch.zeros(64), torch.zeros(64)
    with launch.recording_launches():
        pass
    kernel[(1,)](a, b, c, 64, 0.5, BLOCK=32)
    assert launch._state.get("recording") is None
    monkeypatch.setitem(launch._state, "check", True)
    with launch.recording_launches() as recording:
        pass
    assert not recording.complete


def test_descriptor_over_a_dynamic_tensor_is_rebuilt_over_the_new_one(kernel):
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    a, b, c = (torch.zeros(64, 64, dtype=torch.bfloat16) for _ in range(3))
    layout = gl.NVMMASharedLayout.get_default_for([64, 64], gl.bfloat16)
    desc = TensorDescriptor(a, [64, 64], [64, 1], [64, 64], layout)
    recording = _record(kernel, desc, b, c)
    replay = launch.make_replay(recording, (a, b, c), frozenset())
    launches = kernel.fn.compiled.launches
    launches.clear()
    a2 = torch.ones(64, 64, dtype=torch.bfloat16)
    replay(a2, b, c)
    new_desc = launches[0][9]
    assert new_desc is not desc and new_desc.base is a2
    assert (new_desc.shape, new_desc.strides, new_desc.block_shape, new_desc.layout) == \
        (desc.shape, desc.strides, desc.block_shape, desc.layout)


# -- replays that call Triton 3.6's C launch function directly (launch._launch_source) -----------------


class _CLaunch:
    """Plays the C launch function: records its arguments (no ``__code__``, like a builtin)."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        self.calls.append(args)


def _descriptor_wrapper(launcher, tensordesc_indices, tensordesc_meta):
    """Plays wrap_handle_tensordesc: a closure over the C function and the descriptor positions."""

    def inner(*args):
        return launcher, tensordesc_indices, tensordesc_meta  # never called by the replay

    return inner


class CudaLauncher:  # the name launch._c_launch looks for
    global_scratch_size = profile_scratch_size = 0
    launch_cooperative_grid, launch_pdl = False, True

    def __init__(self, launch):
        self.launch = launch


@pytest.fixture
def c_launch_kernel(kernel, monkeypatch):
    monkeypatch.setitem(launch._state, "c_launch", True)
    c = _CLaunch()
    kernel.fn.compiled.run = CudaLauncher(c)
    return kernel, c


def test_c_launch_replay_passes_tensors_as_addresses(c_launch_kernel):
    kernel, c = c_launch_kernel
    a, b, owned = torch.zeros(64), torch.zeros(64), torch.zeros(64)
    replay = launch.make_replay(_record(kernel, a, b, owned), (a, b), frozenset({owned.untyped_storage().data_ptr()}))
    a2, b2 = torch.ones(64), torch.ones(64)
    replay(a2, b2)
    (args,) = c.calls
    # grid, stream, kernel, cooperative, PDL, no scratch, packed metadata, no launch metadata or hooks
    assert args[:13] == (2, 3, 1, 1234, "function", False, True, None, None, "metadata", None, None, None)
    assert args[13:16] == (a2.data_ptr(), b2.data_ptr(), owned.data_ptr())  # all by address
    assert all(type(a) is int for a in args[13:16])
    assert args[16:] == (64, 0.5, 32)


def test_c_launch_replay_encodes_a_descriptor_once_per_pointer(c_launch_kernel, monkeypatch):
    kernel, c = c_launch_kernel
    kernel.fn.compiled.run = CudaLauncher(_descriptor_wrapper(c, {0}, [{"swizzle": 128}]))
    encoded = []

    def expand(desc, meta):
        encoded.append((desc.base.data_ptr(), meta))
        return [("map", desc.base.data_ptr()), *desc.shape, *desc.strides]

    monkeypatch.setattr(launch, "_expand_descriptor", expand)

    class Desc:
        def __init__(self, base):
            self.base, self.block_shape, self.shape, self.strides = base, [8, 8], [64, 64], [64, 1]

    a, b, c_ = torch.zeros(64, 64), torch.zeros(64), torch.zeros(64)
    replay = launch.make_replay(_record(kernel, Desc(a), b, c_), (a, b, c_), frozenset())
    a2, a3 = torch.ones(64, 64), torch.ones(64, 64)
    for x in (a2, a2, a3, a2):
        replay(x, b, c_)
    assert [p for p, _ in encoded] == [a2.data_ptr(), a3.data_ptr()]  # one encoding per pointer
    assert all(meta == {"swizzle": 128} for _, meta in encoded)
    first = c.calls[0]
    assert first[13:18] == (("map", a2.data_ptr()), 64, 64, 64, 1)  # the descriptor's expansion in place
    assert first[18:20] == (b.data_ptr(), c_.data_ptr())
    assert c.calls[2][13] == ("map", a3.data_ptr())


def test_launch_memo_replay_uses_the_c_launch(c_launch_kernel, monkeypatch):
    kernel, c = c_launch_kernel
    monkeypatch.setitem(launch._state, "memo", True)
    memo = launch.LaunchMemo(dynamic=(0, 1))
    a, b, placeholder = torch.zeros(64), torch.zeros(64), torch.zeros(64)
    memo.launch("key", kernel, (4,), (a, b, placeholder, 64, 0.5), {"BLOCK": 32})
    replay = memo._replays[(0, "key")]
    replay(b, a)
    (args,) = c.calls
    assert args[:3] == (4, 1, 1) and args[13:15] == (b.data_ptr(), a.data_ptr())
    assert args[15] == placeholder.data_ptr() and args[16:] == (64, 0.5, 32)


def test_clearing_launch_memos_forgets_single_request_replays():
    """A tuning grid changes a launch constant (the single-prefill config table), then clears the launch memos
    (benchmarks.harness.overridden): the single-request replays hold launches recorded with the old constant
    and must go with them, or every setting after the first replays the first one's launch."""
    from flashtile._core import single

    single._REPLAYS[("a key",)] = lambda *args: None
    launch.clear_launch_memos()
    assert not single._REPLAYS
