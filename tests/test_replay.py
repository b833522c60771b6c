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
