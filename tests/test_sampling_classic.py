"""tests/test_sampling.py again on the rejection-loop kernels (FLASHTILE_SAMPLING_SEG=0), which the
segmented kernels replaced as the default: they stay selectable, so they stay tested. The tests of
the segmented kernels and of their row split (which set the flag themselves) and the reference path
are not repeated."""

import pytest

import test_sampling as base
from test_sampling import *  # noqa: F401,F403  (the tests and module fixtures, collected here again)

for _name in [n for n in dir(base) if n.startswith(("test_seg_", "test_split_"))]:
    globals().pop(_name, None)


@pytest.fixture(autouse=True)
def _rejection_loop_kernels(request, monkeypatch):
    if "path" in request.fixturenames and request.getfixturevalue("path") == "reference":
        pytest.skip("the reference path runs in test_sampling.py")
    monkeypatch.setenv("FLASHTILE_SAMPLING_SEG", "0")
