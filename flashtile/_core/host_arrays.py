"""Integer arrays on the host as numpy arrays: what the plan-time code (page-table checks, the
scheduler) computes with.

A plan works on a handful to a few thousand integers. A torch op on a CPU tensor costs 3-40 us of
dispatch however small the tensor, and a plan needs dozens of them; a numpy op costs about 1 us, and a
loop over Python lists costs ~50-150 ns per element (milliseconds at batch 4096, where the packed
int32 work list alone would cost more than today's whole plan). numpy arrays are also zero-copy both
ways with CPU tensors (``Tensor.numpy()``, ``torch.from_numpy``).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["host_view", "host_int64", "host_int64_view", "host_max", "host_min", "host_sum"]


def host_view(values) -> np.ndarray:
    """``values`` (an int tensor on any device, a numpy array or a sequence of ints) as a numpy array,
    without a copy where possible: a CPU tensor is viewed, a device tensor is copied to the host (a
    synchronization). Only for reading: the result may alias ``values``."""
    if isinstance(values, torch.Tensor):
        return (values if values.is_cpu else values.cpu()).numpy()
    return np.asarray(values)


def host_int64(values) -> np.ndarray:
    """``values`` as a fresh int64 numpy array (never aliases ``values``, so a caller may keep it while
    the engine overwrites its buffers)."""
    return np.array(host_view(values), dtype=np.int64)


def host_int64_view(values) -> np.ndarray:
    """``values`` as an int64 numpy array for reading only: no copy when they already are one (the
    scheduler's inputs from a wrapper's plan), so the result may alias ``values``."""
    return host_view(values).astype(np.int64, copy=False)


# Up to this many elements, a reduction of a small plan's arrays runs faster through a Python list than
# through numpy, whose reductions cost ~1.5 us each whatever the size (a plan does about ten of them).
LIST_REDUCTION_SIZE = 32


def host_max(values: np.ndarray) -> int:
    """The largest element of a non-empty integer array, as a Python int."""
    return max(values.tolist()) if values.size <= LIST_REDUCTION_SIZE else int(values.max())


def host_min(values: np.ndarray) -> int:
    """The smallest element of a non-empty integer array, as a Python int."""
    return min(values.tolist()) if values.size <= LIST_REDUCTION_SIZE else int(values.min())


def host_sum(values: np.ndarray) -> int:
    """The sum of an integer array, as a Python int."""
    return sum(values.tolist()) if values.size <= LIST_REDUCTION_SIZE else int(values.sum())
