"""Device facts the launchers size their grids and tiles by (queried once per device index)."""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

import torch

__all__ = ["num_sms", "shared_memory_limit", "compute_capability", "DeviceFacts", "device_facts",
           "normalize_device_name"]

INTERPRETER_SMS = 4  # CPU tensors run under Triton's interpreter: a small "GPU", so tests exercise splits
# (shared-memory limit in bytes, (major, minor)) that every device is taken to have, for tools that
# choose launch configs for another device than the one they run on: benchmarks/tools/smem_compile.py compiles
# sm_90 kernels on a CPU machine, benchmarks/tools/smem_check.py runs a smaller card's configs on an H100.
# None: each device's own.
TARGET_OVERRIDE: Optional[tuple] = None
_sm_count: dict = {}
_facts: dict = {}
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


class DeviceFacts(NamedTuple):
    """What the decode launch configs and split targets are chosen by (_core/decode_tune.py).

    name: the normalized card name (:func:`normalize_device_name`: "H100", "H200", ...).
    num_sms: streaming multiprocessors. shared_memory: opt-in bytes of shared memory per block.
    capability: ``(major, minor)``. bandwidth_gbps: peak memory bandwidth from the memory clock and bus
    width (GB/s), None where torch does not report them.
    """

    name: str
    num_sms: int
    shared_memory: int
    capability: tuple
    bandwidth_gbps: Optional[float] = None


# The card the compile-only tools (benchmarks/tools/aot_compile_check.py, smem_compile.py) and CPU tensors
# outside the interpreter are taken to be: an H100 SXM (132 SMs, 3.35 TB/s HBM3).
H100_FACTS = DeviceFacts("H100", 132, 232448, (9, 0), 3352.0)
# Tests and tools set this to choose configs as on another card (e.g. ``DeviceFacts("H200", 132, 232448,
# (9, 0), 4800.0)``); None: each device's own facts (CUDA), H100_FACTS otherwise.
FACTS_OVERRIDE: Optional[DeviceFacts] = None


def normalize_device_name(raw: str) -> str:
    """The card's model from the name the driver reports: "NVIDIA H100 80GB HBM3" and "NVIDIA H100 NVL" ->
    "H100", "NVIDIA H200" -> "H200", "NVIDIA A100-SXM4-80GB" -> "A100", "NVIDIA GH200 480GB" -> "GH200";
    a name without a model token is returned stripped and upper-cased."""
    text = raw.upper().replace("NVIDIA", " ")
    match = re.search(r"(?<![A-Z0-9])([A-Z]{1,3}\d{2,4}[A-Z]?)(?![A-Z0-9])", text)
    return match.group(1) if match else " ".join(text.split())


def _bandwidth_gbps(props) -> Optional[float]:
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2.0 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate


def device_facts(device: torch.device) -> DeviceFacts:
    """The :class:`DeviceFacts` of ``device`` (``FACTS_OVERRIDE`` when set; ``H100_FACTS`` for non-CUDA
    devices, whose compiled configs are those of the compile-only tools' target)."""
    if FACTS_OVERRIDE is not None:
        return FACTS_OVERRIDE
    if device.type != "cuda":
        return H100_FACTS
    index = _index(device)
    facts = _facts.get(index)
    if facts is None:
        props = torch.cuda.get_device_properties(index)
        facts = _facts[index] = DeviceFacts(normalize_device_name(props.name), props.multi_processor_count,
                                            _read_shared_memory_limit(index), (props.major, props.minor),
                                            _bandwidth_gbps(props))
    return facts
