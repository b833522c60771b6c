"""Device facts the launchers size their grids and tiles by (queried once per device index)."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["num_sms", "shared_memory_limit", "compute_capability"]

INTERPRETER_SMS = 4  # CPU tensors run under Triton's interpreter: a small "GPU", so tests exercise splits
# (shared-memory limit in bytes, (major, minor)) that every device is taken to have, for tools that
# choose launch configs for another device than the one they run on: benchmarks/tools/smem_compile.py compiles
# sm_90 kernels on a CPU machine, benchmarks/tools/smem_check.py runs a smaller card's configs on an H100.
# None: each device's own.
TARGET_OVERRIDE: Optional[tuple] = None
_sm_count: dict = {}
_smem_limit: dict = {}
_capability: dict = {}


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    index = _index(device)
    count = _sm_count.get(index)
    if count is None:
        count = _sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return count


def _read_shared_memory_limit(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    limit = getattr(props, "shared_memory_per_block_optin", None)
    if not limit:  # older torch: ask Triton's driver (the number it checks a kernel against)
        from triton.runtime import driver

        limit = driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return int(limit)


def shared_memory_limit(device: torch.device) -> Optional[int]:
    """Bytes of shared memory one program may use on ``device`` (the opt-in maximum per block, what
    Triton checks a compiled kernel against: 232,448 on H100/H200, 166,912 on A100, 101,376 on
    sm_86/sm_89 cards). None for CPU tensors (the interpreter has no such limit)."""
    if TARGET_OVERRIDE is not None:
        return TARGET_OVERRIDE[0]
    if device.type != "cuda":
        return None
    index = _index(device)
    limit = _smem_limit.get(index)
    if limit is None:
        limit = _smem_limit[index] = _read_shared_memory_limit(index)
    return limit


def compute_capability(device: torch.device) -> Optional[tuple]:
    """``(major, minor)`` of ``device``; None for CPU tensors."""
    if TARGET_OVERRIDE is not None:
        return TARGET_OVERRIDE[1]
    if device.type != "cuda":
        return None
    index = _index(device)
    cap = _capability.get(index)
    if cap is None:
        cap = _capability[index] = tuple(torch.cuda.get_device_capability(index))
    return cap
