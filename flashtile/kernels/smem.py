"""Shared memory of the attention kernels' launch configurations, and the choice of a configuration
that fits the device.

A config's tile shape and pipeline depth decide most of what a kernel keeps in shared memory, but
the features of the call change it too: in-kernel RoPE loads a second, rotated copy of each K tile
and rotates K in registers, so the product reads a re-staged copy; fp8 K/V are upcast before the
products, which then read re-staged fp16/bf16 copies; a custom mask needs a layout-conversion
buffer. ``estimate_shared_bytes`` models what Triton allocates for the kernels of attention.py and
batch_prefill.py: fitted to the sizes Triton 3.6 and 3.9 give sm_90 and sm_89 compiles of the
launchers' configs over the feature grid of benchmarks/tools/smem_compile.py, never below them (that
script checks it; tests/test_smem.py runs it), and exact for the plain configs that sit near the
H100's limit. ``fit_config`` steps a preferred config down (pipeline stages first, then the KV tile,
then the row tile where the caller allows) until the estimate fits the device's limit, and
``launch_within_limit`` still steps down should a Triton version need more than the model says.

Two product paths allocate differently:
- wgmma (sm_90, row tiles of >= 64): the Q tile and every K/V stage stay in shared memory for
  the asynchronous products; a K/V tile the product reads straight from its copy has one buffer
  per stage, a tile that is transformed first (RoPE, fp8 upcast) one fewer plus the re-staged copy;
- mma (sm_8x, sm_12x, and row tiles of 16 on sm_90): operands are read into registers, so loads
  keep one buffer fewer than the stages, and layout conversions (Q, the
  probabilities) need scratch.
Other architectures get the larger of the two models.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Callable, Iterator, NamedTuple

import torch
from triton.runtime.errors import OutOfResources

from .._core.device import compute_capability, shared_memory_limit

__all__ = ["TileFeatures", "estimate_shared_bytes", "fit_config", "config_candidates", "device_config",
           "launch_within_limit"]


class TileFeatures(NamedTuple):
    """What, besides the launch configuration, changes an attention kernel's shared memory.

    d_qk, d_vo: head dims padded for ``tl.dot`` (powers of two, >= 16).
    q_bytes, kv_bytes: element sizes of Q and of K/V (1 for fp8 K/V, upcast in the kernel).
    rope: in-kernel RoPE (ROPE_LLAMA). custom_mask: a packed custom mask.
    Window, soft cap, ALiBi, causal masking and paging change no allocation (measured).
    A NamedTuple: launchers build one per call, and it keys the fitted-config memo (host time).
    """

    d_qk: int
    d_vo: int
    q_bytes: int = 2
    kv_bytes: int = 2
    rope: bool = False
    custom_mask: bool = False


def _uses_wgmma(capability: tuple, block_m: int, num_warps: int) -> bool:
    return capability[0] == 9 and block_m >= 64 and num_warps % 4 == 0


def _restaged(block_n: int, f: TileFeatures) -> int:
    """Copies of the K/V tiles made after a transform, for the products to read: K rotated (RoPE) or
    upcast (fp8), V upcast. Triton may or may not give them one buffer: counted apart."""
    upcast = f.kv_bytes != f.q_bytes
    k_copy = block_n * f.d_qk * f.q_bytes if (f.rope or upcast) else 0
    v_copy = block_n * f.d_vo * f.q_bytes if upcast else 0
    return k_copy + v_copy


def _mask_scratch(block_m: int, block_n: int) -> int:
    """With a custom mask Triton may move the float32 score tile between layouts inside the KV loop
    (seen: half of it for single prefill, all of it for paged batch prefill with RoPE)."""
    return block_m * block_n * 4


def _wgmma_bytes(block_m: int, block_n: int, stages: int, f: TileFeatures) -> int:
    k_tile = block_n * f.d_qk * f.kv_bytes
    v_tile = block_n * f.d_vo * f.kv_bytes
    upcast = f.kv_bytes != f.q_bytes
    k_direct = not (f.rope or upcast)  # the product reads K where its copy landed: one buffer per stage
    total = block_m * f.d_qk * f.q_bytes  # Q, an operand in shared memory
    total += (stages if k_direct else stages - 1) * k_tile
    total += (stages if not upcast else stages - 1) * v_tile
    if f.rope:
        total += (stages - 1) * k_tile  # the partner halves
    total += _restaged(block_n, f)
    if f.custom_mask:
        total += _mask_scratch(block_m, block_n)
    return total


def _mma_bytes(block_m: int, block_n: int, stages: int, f: TileFeatures) -> int:
    k_tile = block_n * f.d_qk * f.kv_bytes
    v_tile = block_n * f.d_vo * f.kv_bytes
    buffers = max(stages - 1, 1)
    total = buffers * (k_tile + v_tile + (k_tile if f.rope else 0))
    total += block_m * f.d_qk * f.q_bytes + block_m * block_n * f.q_bytes  # Q and P layout conversions
    total += _restaged(block_n, f)
    if f.custom_mask:
        total += _mask_scratch(block_m, block_n)
    return total


def estimate_shared_bytes(block_m: int, block_n: int, num_stages: int, num_warps: int, features: TileFeatures,
                          capability: tuple = (9, 0)) -> int:
    """Bytes of shared memory the attention kernel needs at this configuration (an upper bound of
    what Triton allocates; see the module doc). ``capability``: the device's (major, minor)."""
    if _uses_wgmma(capability, block_m, num_warps):
        return _wgmma_bytes(block_m, block_n, num_stages, features)
    mma = _mma_bytes(block_m, block_n, num_stages, features)
    if capability[0] in (7, 8, 9, 12):
        return mma
    return max(mma, _wgmma_bytes(block_m, block_n, num_stages, features))


def config_candidates(preferred, vary_block_m: bool) -> Iterator:
    """Configs no larger than ``preferred`` (a LaunchConfig), largest first: its pipeline depth down
    to 2 stages, then each smaller KV tile (halving, down to 16) from its depth down to 2, then, if
    ``vary_block_m``, the same for each smaller row tile; single-stage configs come last."""
    row_tiles = [preferred.block_m]
    while vary_block_m and row_tiles[-1] > 16:
        row_tiles.append(row_tiles[-1] // 2)
    kv_tiles = [preferred.block_n]
    while kv_tiles[-1] > 16:
        kv_tiles.append(kv_tiles[-1] // 2)
    lowest = min(2, preferred.num_stages)
    for depths in (range(preferred.num_stages, lowest - 1, -1), range(1, lowest)):
        for block_m in row_tiles:
            for block_n in kv_tiles:
                for stages in depths:
                    yield replace(preferred, block_m=block_m, block_n=block_n, num_stages=stages)


_fitted: dict = {}


def fit_config(preferred, features: TileFeatures, limit: int, capability: tuple, *, vary_block_m: bool = False):
    """The first of :func:`config_candidates` whose estimated shared memory fits ``limit`` bytes
    (the smallest candidate if none does: Triton then reports the shortfall). Remembered per
    argument set (launchers call this on every launch)."""
    key = (preferred, features, limit, capability, vary_block_m)
    cfg = _fitted.get(key)
    if cfg is None:
        cfg = _first_fitting(config_candidates(preferred, vary_block_m), features, limit, capability)
        _fitted[key] = cfg
    return cfg


def _first_fitting(candidates, features, limit, capability, after=None):
    """The first of ``candidates`` (those after ``after`` when given) whose estimate fits ``limit``;
    the last candidate if none does."""
    last = None
    skipping = after is not None
    for c in candidates:
        last = c
        if skipping:
            skipping = c != after
            continue
        if estimate_shared_bytes(c.block_m, c.block_n, c.num_stages, c.num_warps, features, capability) <= limit:
            return c
    return last


def device_config(preferred, features: TileFeatures, device: torch.device, *, vary_block_m: bool = False):
    """:func:`fit_config` for ``device`` (its limit and capability); ``preferred`` unchanged where the
    device has no limit (CPU tensors: the interpreter)."""
    limit, capability = shared_memory_limit(device), compute_capability(device)
    if limit is None or capability is None:  # both None together: CPU tensors
        return preferred
    return fit_config(preferred, features, limit, capability, vary_block_m=vary_block_m)


def launch_within_limit(launch: Callable, preferred, features: TileFeatures, device: torch.device, *,
                        vary_block_m: bool = False, cfg=None):
    """``launch(cfg)`` at :func:`device_config`'s choice (``cfg``: that choice, already made by the
    caller), and return the config launched.

    Should Triton still find the compiled kernel too large for the device (a Triton version that
    allocates more than the model: it raises before launching anything), the launch is retried at
    the next candidate that fits with the model corrected by the shortfall, which later calls with
    these arguments then use directly (with a warning, once: the model needs the case)."""
    if cfg is None:
        cfg = device_config(preferred, features, device, vary_block_m=vary_block_m)
    while True:
        try:
            launch(cfg)
            return cfg
        except OutOfResources as err:
            if err.name != "shared memory":
                raise
            limit, capability = shared_memory_limit(device), compute_capability(device)
            if limit is None or capability is None:
                raise
            shortfall = err.required - estimate_shared_bytes(cfg.block_m, cfg.block_n, cfg.num_stages,
                                                             cfg.num_warps, features, capability)
            smaller = _first_fitting(config_candidates(preferred, vary_block_m), features,
                                     limit - max(shortfall, 0), capability, after=cfg)
            if smaller is None or smaller == cfg:
                raise
            warnings.warn(f"flashtile: {cfg} needs {err.required} B of shared memory with {features}, more than "
                          f"estimated; using {smaller} (please report this with your Triton version)", stacklevel=2)
            _fitted[(preferred, features, limit, capability, vary_block_m)] = cfg = smaller
