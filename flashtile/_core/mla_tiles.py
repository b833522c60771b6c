"""Tile shapes of the MLA kernel (flashtile/kernels/mla.py), shared by its planner and launcher.

A tile holds ``BLOCK_M`` (token, head) rows of one request against ``BLOCK_N`` latent rows; the
accumulator is ``BLOCK_M x head_dim_ckv`` float32 (64 x 512: 128 KiB, 128 registers a thread at
8 warps), so wide latents use 8 warps for 64-row tiles and 4 for tiles of up to 32 rows. KV chunks of
a split are multiples of MLA_CHUNK_ALIGN tokens.
The reference path and the interpreter plan 16-row, 16-key tiles on a 4-SM "GPU", so CPU tests split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .device import INTERPRETER_SMS, num_sms
from .settings import interpreting

__all__ = ["MlaConfig", "MlaMeta", "MLA_CHUNK_ALIGN", "mla_launch_facts"]

MLA_CHUNK_ALIGN = 64
_SMALL = 16
# The compiled kernel's launch constants (benchmarks/bench_mla.py's ``--tune`` grid times them): the
# largest BLOCK_M (rows of small requests round up to a power of two, at least 16), BLOCK_N latent
# rows per step, warps for latents of 256 and wider (4 below) and software-pipeline stages.
MLA_MAX_BLOCK_M = 64
MLA_BLOCK_N = 32
MLA_WIDE_WARPS = 8
# Tiles of up to MLA_NARROW_ROWS rows (16-32 heads at one query token: memory-bound) launch
# MLA_NARROW_WARPS warps. On an H100 4 warps beat 8 there: 128 x 8192 with 16 heads 516.7 against 716.4 µs
# at page 64 and 449.0 against 550.0 at page 1, 64 x 8192 with 32 heads 487.5 / 525.5 (page 64) and
# 320.1 / 417.1 (page 1), 128 x 4096 with 16 heads at page 16 284.5 / 388.3 (a smaller program leaves
# room for more latent tiles in flight per SM).
MLA_NARROW_ROWS = 32
MLA_NARROW_WARPS = 4
MLA_STAGES = 3
# Programs per SM the split planner aims to fill (scheduler/split_kv.py; None: batch decode's target). A
# 64-row MLA program holds a 64 x 512 float32 accumulator, so fewer of them fit an SM than decode programs:
# benchmarks/bench_mla.py's ``split`` tune times the choices.
MLA_PROGRAMS_PER_SM = None
# Programs per work item, each owning a slice of the output columns (1 or 2; kernels/mla.py OUT_SPLIT).
MLA_OUT_SPLIT = 1
# Page ids one key tile ahead, so that Triton's pipeliner keeps latent tiles in flight (kernels/mla.py
# PREFETCH_PAGES); read at each launch.
MLA_PREFETCH_PAGES = True


@dataclass(frozen=True)
class MlaConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    out_split: int = 1  # programs per work item, one per slice of the output columns


@dataclass
class MlaMeta:
    """A plan as the MLA kernels and reference read it (device tensors, plus launch facts)."""

    qo_indptr: torch.Tensor  # [B + 1] int32
    kv_indptr: torch.Tensor  # [B + 1] int32, in pages
    kv_indices: torch.Tensor  # page ids
    kv_len: torch.Tensor  # [B] int32, tokens
    work: torch.Tensor  # int32 packed work list (scheduler/mla_work.py)
    req_offset: int
    token_offset: int
    item_offset: int
    num_items: int
    max_splits: int
    part_o: torch.Tensor  # float32 [partial rows, head_dim_ckv]
    part_lse: torch.Tensor  # float32 [partial rows]
    config: MlaConfig  # the kernel's launch config (the reference path ignores it)
    graph: bool


def mla_launch_facts(device: torch.device, compiled: bool, max_rows: int, head_dim_ckv: int) -> tuple:
    """``(block_m, config, chunk alignment, SMs)`` for a batch whose largest request has ``max_rows``
    (token, head) rows; ``compiled``: the call runs the kernels (else the reference path)."""
    if not compiled or interpreting():
        return _SMALL, MlaConfig(_SMALL, _SMALL, 4, 1, _out_split(head_dim_ckv)), _SMALL, INTERPRETER_SMS
    block_m = max(_SMALL, min(MLA_MAX_BLOCK_M, 1 << max(0, max_rows - 1).bit_length()))
    if head_dim_ckv < 256:
        warps = 4
    else:
        warps = MLA_NARROW_WARPS if block_m <= MLA_NARROW_ROWS else MLA_WIDE_WARPS
    return (block_m, MlaConfig(block_m, MLA_BLOCK_N, warps, MLA_STAGES, _out_split(head_dim_ckv)), MLA_CHUNK_ALIGN,
            num_sms(device))


def _out_split(head_dim_ckv: int) -> int:
    """MLA_OUT_SPLIT where each slice stays a tensor-core tile dimension (at least 16 columns)."""
    return MLA_OUT_SPLIT if head_dim_ckv // MLA_OUT_SPLIT >= 16 else 1
