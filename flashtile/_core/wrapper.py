"""The plan/run machinery shared by the batch wrappers (DESIGN.md §plan / run): workspace buffers,
CUDA-graph buffers, dtype and scalar resolution, and the checks run() makes against the plan.

plan() runs on the host: it validates the page table (when it is on the host), asks the scheduler
for a work list and copies it, in one transfer, into memory the wrapper owns (the int workspace), so
several wrappers can share one float workspace. run() only checks shapes against the plan and
launches: it never synchronizes and never allocates except the output when none is given.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .attention_args import POS_ENCODING_MODES, check_head_dim, check_window_and_cap
from .checks import FP8_DTYPES, HALF_DTYPES, check_option, check_tensor, describe
from .dispatch import normalize_backend

__all__ = ["PlanRunWrapper", "resolve_dtype", "check_common_options", "reject_kv_cache_sf", "INT_WORKSPACE_BYTES"]

INT_WORKSPACE_BYTES = 8 * 1024 * 1024  # like upstream's internal int workspace


def resolve_dtype(name: str, value: Union[str, torch.dtype, None], default: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """A dtype given as ``torch.dtype`` or by name ("float16", "bfloat16", "float8_e4m3fn", ...)."""
    if value is None:
        return default
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    raise TypeError(f"{name}: expected a torch.dtype or a dtype name such as 'bfloat16', got {describe(value)}")


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def check_heads(num_qo_heads, num_kv_heads) -> None:
    check_positive_int("num_qo_heads", num_qo_heads)
    check_positive_int("num_kv_heads", num_kv_heads)
    if num_qo_heads % num_kv_heads != 0:
        raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")


def check_common_options(pos_encoding_mode: str, window_left, logits_soft_cap) -> float:
    """Checks shared by every plan(); returns the soft cap as a float (0 disables)."""
    check_option("pos_encoding_mode", pos_encoding_mode, POS_ENCODING_MODES)
    return check_window_and_cap(window_left, logits_soft_cap)


def reject_kv_cache_sf(kv_cache_sf) -> None:
    """run()'s ``kv_cache_sf`` (upstream >= 0.6): scale factors of an NVFP4 KV cache, which flashtile's
    kernels do not read. None (what engines pass for fp16/bf16/fp8 caches) is accepted."""
    if kv_cache_sf is not None:
        raise NotImplementedError("kv_cache_sf: NVFP4 KV caches (per-block scale factors) are not supported by "
                                  "flashtile; use a float16/bfloat16 or fp8 (e4m3fn/e5m2) cache with k_scale/v_scale")


class PlanRunWrapper:
    """Base of the batch wrappers: owns the workspaces and the CUDA-graph flag.

    Subclasses implement ``plan`` and ``run``; this class keeps what every wrapper shares.
    """

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str, use_cuda_graph: bool, backend: str,
                 jit_args) -> None:
        check_tensor("float_workspace_buffer", float_workspace_buffer)
        check_option("kv_layout", kv_layout, ("NHD", "HND"))
        if jit_args is not None:
            raise NotImplementedError(
                "jit_args: C++ attention variants (FlashInfer's JIT strings) cannot run in flashtile, which "
                "compiles Triton kernels; write the variant in Python instead (see docs/semantics.md)"
            )
        self._backend = normalize_backend(backend)
        self._kv_layout = kv_layout
        self._use_cuda_graph = bool(use_cuda_graph)
        self.device = float_workspace_buffer.device
        self._float_workspace_buffer = float_workspace_buffer
        self._int_workspace_buffer = torch.empty(INT_WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self._plan = None

    @property
    def is_cuda_graph_enabled(self) -> bool:
        return self._use_cuda_graph

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor,
                               int_workspace_buffer: Optional[torch.Tensor] = None) -> None:
        """Swap the workspaces (re-plan afterwards). ``int_workspace_buffer`` holds the plan's work list."""
        check_tensor("float_workspace_buffer", float_workspace_buffer, device=self.device)
        self._float_workspace_buffer = float_workspace_buffer
        if int_workspace_buffer is not None:
            check_tensor("int_workspace_buffer", int_workspace_buffer, device=self.device)
            self._int_workspace_buffer = int_workspace_buffer
        self._plan = None

    def end_forward(self) -> None:
        """Deprecated upstream alias; nothing to release."""

    # -- helpers for subclasses ---------------------------------------------------------------------

    def _workspace_view(self, buffer: torch.Tensor, name: str, num_bytes: int, dtype: torch.dtype) -> torch.Tensor:
        """The first ``num_bytes`` of a workspace as a flat tensor of ``dtype`` (no copy)."""
        if not buffer.is_contiguous():
            raise ValueError(f"{name}: must be contiguous")
        have = buffer.numel() * buffer.element_size()
        if have < num_bytes:
            raise ValueError(
                f"{name}: this plan needs {num_bytes} bytes of workspace, the buffer has {have}; allocate a larger "
                "one (128 MiB is recommended) and pass it to the constructor or reset_workspace_buffer"
            )
        return buffer.reshape(-1).view(torch.uint8)[:num_bytes].view(dtype)

    def _require_plan(self):
        if self._plan is None:
            raise RuntimeError("run() called before plan(): call plan() with the batch's page table first")
        return self._plan

    @staticmethod
    def _check_head_dim(head_dim) -> int:
        check_positive_int("head_dim", head_dim)
        check_head_dim("head_dim", head_dim)
        return head_dim

    @staticmethod
    def _check_q_kv_dtypes(q_dtype: torch.dtype, kv_dtype: torch.dtype) -> None:
        if q_dtype in FP8_DTYPES:
            raise NotImplementedError("q_data_type: fp8 queries are not supported; use float16 or bfloat16 q")
        if q_dtype not in HALF_DTYPES:
            raise TypeError(f"q_data_type: expected float16 or bfloat16, got {q_dtype}")
        if kv_dtype not in HALF_DTYPES + FP8_DTYPES:
            raise TypeError(f"kv_data_type: expected float16, bfloat16 or float8 (e4m3fn, e5m2), got {kv_dtype}")
        if kv_dtype in HALF_DTYPES and kv_dtype != q_dtype:
            raise TypeError(f"kv_data_type: {kv_dtype} with q_data_type {q_dtype}: a half-precision cache must "
                            "have q's dtype (or be fp8)")

    @staticmethod
    def _check_out(name: str, x: Optional[torch.Tensor], shape, dtype: torch.dtype, device) -> None:
        if x is None:
            return
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {describe(x)}")
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"Invalid shape of {name}: expected {list(shape)}, got {list(x.shape)}")
        if x.dtype != dtype:
            raise ValueError(f"Invalid dtype of {name}: expected {dtype}, got {x.dtype}")
        if x.device != device:
            raise ValueError(f"Invalid device of {name}: expected {device}, got {x.device}")
        if x.shape[-1] > 1 and x.stride(-1) != 1:
            raise ValueError(f"{name}: the last dimension must have stride 1, got strides {tuple(x.stride())}")
