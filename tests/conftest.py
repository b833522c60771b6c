"""Test harness (DESIGN.md §Testing).

Every attention test runs on the paths of the machine it is on:
- ``reference``: the pure-PyTorch path (FLASHTILE_BACKEND=reference);
- ``kernel``: the Triton kernels, on the GPU when there is one, else under Triton's interpreter on
  CPU (TRITON_INTERPRET=1 is set here, before any kernel module is imported; tests keep shapes tiny).
Every test runs with output poisoning on (new outputs filled with NaN, so unwritten elements fail)
but without FLASHTILE_DEBUG's device-index validation: device page tables take the production path
(no host copy). A test that wants the validation sets FLASHTILE_DEBUG=1 itself (monkeypatch).
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda") if HAS_CUDA else torch.device("cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
