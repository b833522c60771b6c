"""Output allocation. With ``FLASHTILE_DEBUG=1`` new outputs are poisoned (NaN, or -1 for integers)
so an element a kernel forgets to write fails a test instead of passing by luck."""

from __future__ import annotations

import os

import torch


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("FLASHTILE_DEBUG") == "1":
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out
