"""Decode launch configs and split-planner targets per card, as data (no math).

The decode kernels (kernels/attention.py: single decode and paged batch decode) and the split planner
(scheduler/split_kv.py) take their knobs from :data:`TUNE_TABLE`, keyed by the normalized card name of
_core/device.py's :class:`DeviceFacts` ("H100", "H200"). A card not in the table takes an entry by the
fallback rule of :func:`card_entry`. The launchers then fit the chosen config to the device's shared memory
(kernels/smem.py), so a card with less shared memory steps the pipeline and tile down, never fails.

An entry says whether it was measured (a tuning sweep on that card: ``python -m benchmarks.run --suite
batch_decode --tune launch`` and ``--suite single_decode --tune config``, benchmarks/gpu/decode_tune.sh) or
predicted (reasoned from another card's measurements), with the reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

from .device import DeviceFacts

__all__ = ["DecodeTile", "CardTune", "TUNE_TABLE", "card_entry", "batch_decode_tile", "single_decode_tile",
           "split_targets", "FALLBACK_BANDWIDTH_RATIO"]


class DecodeTile(NamedTuple):
    """One decode launch choice.

    block_n: keys per KV tile (a divisor of tile_policy.KV_CHUNK_ALIGN); num_warps, num_stages: Triton's;
    prefetch_pages: batch decode loads each tile's page ids one iteration ahead (kernels/tiles.py
    attend_tiles; applied for page sizes above 1 only); int32_offsets: batch decode computes paged row
    offsets in 32 bits (applied only where every offset of the cache view fits).
    """

    block_n: int
    num_warps: int
    num_stages: int
    prefetch_pages: bool = False
    int32_offsets: bool = False


@dataclass(frozen=True)
class CardTune:
    """The decode knobs of one card.

    batch_decode: padded head dim -> tile for 16-row tiles (GQA groups up to 16); a row tile of 32 or more
        rows takes at least ``wide_rows_warps`` warps.
    batch_decode_special: ``(padded head dim, "page1" | "fp8")`` -> tile, for page size 1 or fp8 K/V
        (looked up in that order before ``batch_decode``).
    single_decode: padded head dim -> tile of the single-request decode kernel (16-row tiles).
    batch_programs_per_sm, programs_per_sm: the batch and single-request split planners' targets
        (scheduler/split_kv.py).
    status: "measured" or "predicted"; notes: where the numbers come from.
    """

    batch_decode: dict
    single_decode: dict
    batch_programs_per_sm: int
    programs_per_sm: int
    status: str
    notes: str
    batch_decode_special: dict = field(default_factory=dict)
    wide_rows_warps: int = 8


# H100 SXM (132 SMs, 3.35 TB/s HBM3, 227 KiB shared memory per block), measured:
# - batch decode (the batch_decode `launch` grid, d128, page 16): BLOCK_N 32 won at 1 x 32k, 16 x 4k and
#   64 x 4k (stages 2-4 within noise; 3 chosen); 128 won only at 256 x 2k. d256 keeps 2 stages. The page-id
#   prefetch gains nothing at d128 (64 x 4k: 363.0 us against 362.5, 2.97 TB/s, about the read ceiling).
# - batch decode d64 (the same grid on the demo's 64 x 2048, 32/8 heads, page 16): BLOCK_N 32 with the page ids
#   prefetched, 108.3 us against 124.7 without (the prefetch keeps two K/V buffers in flight instead of one;
#   FlashInfer's tensor-core decode 111 us). Page size 1 and fp8 K/V keep the tile without it (not swept).
# - single decode (the single_decode `config` grid): BLOCK_N 64, 2 stages; 4 warps at d128, 8 elsewhere.
# - programs per SM: single 2 (beat 3-12 at kv 4k, 32k, 128k), batch 4 (beat 1, 2 and 8 at 1 x 32k, 16 x 4k).
_H100 = CardTune(
    batch_decode={16: DecodeTile(32, 4, 3), 32: DecodeTile(32, 4, 3), 64: DecodeTile(32, 4, 3, True),
                  128: DecodeTile(32, 4, 3), 256: DecodeTile(32, 4, 2)},
    batch_decode_special={(64, "page1"): DecodeTile(32, 4, 3), (64, "fp8"): DecodeTile(32, 4, 3)},
    single_decode={16: DecodeTile(64, 8, 2), 32: DecodeTile(64, 8, 2), 64: DecodeTile(64, 8, 2),
                   128: DecodeTile(64, 4, 2), 256: DecodeTile(64, 8, 2)},
    batch_programs_per_sm=4,
    programs_per_sm=2,
    status="measured",
    notes="batch_decode `launch` and single_decode `config`/`splits` grids on H100, bf16, 32/8 heads",
)

# H200 (132 SMs, 4.8 TB/s HBM3e, the H100's shared memory), predicted until a sweep on an H200:
# Little's law: the bytes each SM must keep in flight are bandwidth x latency / SMs. At the same SM count and
# a similar loaded latency (~0.7 us), 4.8 vs 3.35 TB/s needs ~1.43x the H100's bytes in flight (~25 vs ~18
# KB per SM). Measured on an H200 (issue 27): batch decode d128 stops at ~3.8 TB/s with 16 KB K+V tiles
# (32 keys x 128 x 2 B x K,V), d64 (8 KB tiles) at 0.64x of FlashInfer, while d256 (32 KB tiles) reaches
# 4.47 TB/s. So:
# - batch decode d64/d128: tiles of 32 KB, like d256's (BLOCK_N 128 at d64, 64 at d128), 3 stages; with the
#   page ids loaded one iteration ahead, since a page-id load in the same iteration makes Triton's pipeliner
#   wait for every K/V copy at the top of the iteration (kernels/tiles.py), leaving no tile in flight during
#   the math. Shared memory (mma path, 2 buffers): 2 x 32 KB + Q + P ~= 70 KB of 227.
# - single decode (contiguous K/V, so its copies are pipelined already): one more stage (3) at d64 and d128,
#   two tiles in flight per program instead of one.
# - d16/d32/d256, page size 1, fp8 and the programs-per-SM targets: as on the H100 (d256 already saturates).
_H200 = CardTune(
    batch_decode={16: DecodeTile(32, 4, 3), 32: DecodeTile(32, 4, 3), 64: DecodeTile(128, 4, 3, True),
                  128: DecodeTile(64, 4, 3, True), 256: DecodeTile(32, 4, 2)},
    batch_decode_special={(64, "page1"): DecodeTile(32, 4, 3), (128, "page1"): DecodeTile(32, 4, 3),
                          (64, "fp8"): DecodeTile(32, 4, 3), (128, "fp8"): DecodeTile(32, 4, 3)},
    single_decode={16: DecodeTile(64, 8, 2), 32: DecodeTile(64, 8, 2), 64: DecodeTile(64, 8, 3),
                   128: DecodeTile(64, 4, 3), 256: DecodeTile(64, 8, 2)},
    batch_programs_per_sm=4,
    programs_per_sm=2,
    status="predicted",
    notes="H100's, with d64/d128 batch tiles widened to 32 KB and page ids prefetched, one more single-decode "
          "stage at d64/d128 (Little's law, see above)",
)

# Normalized card name -> entry. Paste a sweep's winners here (benchmarks/gpu/decode_tune.sh prints them).
TUNE_TABLE = {"H100": _H100, "H200": _H200}

# Fallback for a card not in the table: the H200 entry when the card's bandwidth per SM is at least this
# many times the H100's (it needs that many more bytes in flight per SM), else the H100 entry (what every
# card ran before the table; the launchers fit it to the card's shared memory). Without a bandwidth figure
# (torch reports no memory clock), the H100 entry.
FALLBACK_BANDWIDTH_RATIO = 1.25
_H100_GBPS_PER_SM = 3352.0 / 132

# Set by the tuning grids (benchmarks/bench_batch_decode.py, bench_attention.py) to time one setting; None:
# the table's choice.
BATCH_DECODE_OVERRIDE: Optional[DecodeTile] = None
SINGLE_DECODE_OVERRIDE: Optional[DecodeTile] = None
BATCH_PROGRAMS_PER_SM_OVERRIDE: Optional[int] = None
PROGRAMS_PER_SM_OVERRIDE: Optional[int] = None


def card_entry(facts: DeviceFacts) -> tuple:
    """``(table key, CardTune)`` for a card: its own entry, else by bandwidth per SM (see
    ``FALLBACK_BANDWIDTH_RATIO``)."""
    if facts.name in TUNE_TABLE:
        return facts.name, TUNE_TABLE[facts.name]
    if facts.bandwidth_gbps and facts.num_sms:
        if facts.bandwidth_gbps / facts.num_sms >= FALLBACK_BANDWIDTH_RATIO * _H100_GBPS_PER_SM:
            return "H200", TUNE_TABLE["H200"]
    return "H100", TUNE_TABLE["H100"]


def batch_decode_tile(facts: DeviceFacts, d_pad: int, page_size: int = 16, kv_bytes: int = 2) -> DecodeTile:
    """The paged batch decode tile for padded head dim ``d_pad`` (16-row tiles), a cache of ``page_size``
    tokens per page and K/V of ``kv_bytes`` per element (1: fp8)."""
    if BATCH_DECODE_OVERRIDE is not None:
        return BATCH_DECODE_OVERRIDE
    entry = card_entry(facts)[1]
    special = entry.batch_decode_special
    if page_size == 1 and (d_pad, "page1") in special:
        return special[(d_pad, "page1")]
    if kv_bytes == 1 and (d_pad, "fp8") in special:
        return special[(d_pad, "fp8")]
    return entry.batch_decode[d_pad]


def single_decode_tile(facts: DeviceFacts, d_pad: int) -> DecodeTile:
    """The single-request decode tile for padded head dim ``d_pad``."""
    if SINGLE_DECODE_OVERRIDE is not None:
        return SINGLE_DECODE_OVERRIDE
    return card_entry(facts)[1].single_decode[d_pad]


def split_targets(facts: DeviceFacts) -> tuple:
    """``(programs per SM for one request, programs per SM for a batch)`` the split planners aim for."""
    entry = card_entry(facts)[1]
    single = PROGRAMS_PER_SM_OVERRIDE if PROGRAMS_PER_SM_OVERRIDE is not None else entry.programs_per_sm
    batch = (BATCH_PROGRAMS_PER_SM_OVERRIDE if BATCH_PROGRAMS_PER_SM_OVERRIDE is not None
             else entry.batch_programs_per_sm)
    return single, batch
