"""Helpers that several commands share: model shapes, devices, formatting."""

from __future__ import annotations

import os
import pathlib
import platform
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch


@dataclass(frozen=True)
class ModelShape:
    """Attention heads of one model layer."""

    num_qo_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.num_qo_heads // self.num_kv_heads

    def __str__(self) -> str:
        return f"{self.num_qo_heads}/{self.num_kv_heads}/{self.head_dim}"


# Query heads / KV heads / head_dim of the attention layers of a few common models.
SHAPE_PRESETS: Dict[str, ModelShape] = {
    "llama3-8b": ModelShape(32, 8, 128),
    "llama3-70b": ModelShape(64, 8, 128),
    "mistral-7b": ModelShape(32, 8, 128),
    "qwen2-7b": ModelShape(28, 4, 128),
    "gemma2-9b": ModelShape(16, 8, 256),
}

SHORT_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def parse_list(text: str) -> List[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_shape(text: str) -> Tuple[str, ModelShape]:
    """A preset name (``llama3-8b``) or ``QO_HEADS/KV_HEADS/HEAD_DIM`` (``32/8/128``)."""
    key = text.strip().lower()
    if key in SHAPE_PRESETS:
        return key, SHAPE_PRESETS[key]
    parts = key.split("/")
    if len(parts) == 3 and all(p.isdigit() for p in parts):
        shape = ModelShape(*(int(p) for p in parts))
        if shape.num_kv_heads < 1 or shape.num_qo_heads % shape.num_kv_heads != 0:
            raise ValueError(f"shape {text!r}: query heads must be a positive multiple of KV heads")
        return key, shape
    raise ValueError(
        f"unknown shape {text!r}; expected a preset ({', '.join(SHAPE_PRESETS)}) or QO_HEADS/KV_HEADS/HEAD_DIM"
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available (torch {torch.__version__})")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device {name}: expected auto, cpu or cuda[:N]")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.multi_processor_count} SMs, sm_{props.major}{props.minor})"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def path_of(device: torch.device, backend: str = "auto") -> Tuple[str, str]:
    """(path, reason) that an attention call on ``device`` takes; errors are reported, not raised."""
    from .._core.dispatch import choose_path

    try:
        decision = choose_path(device, backend)
    except (ValueError, NotImplementedError) as e:
        return "error", str(e)
    return decision.path.value, decision.reason


def dir_usage(path: pathlib.Path) -> Tuple[int, int]:
    """(number of files, total bytes) under ``path``."""
    files = size = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            try:
                size += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
            files += 1
    return files, size


def format_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
