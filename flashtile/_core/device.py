"""Device facts the launchers size their grids by."""

from __future__ import annotations

import torch

__all__ = ["num_sms"]

INTERPRETER_SMS = 4  # CPU tensors run under Triton's interpreter: a small "GPU", so tests exercise splits
_sm_count: dict = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (queried once per device index)."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = _sm_count.get(index)
    if count is None:
        count = _sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return count
