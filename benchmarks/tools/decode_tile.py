"""Batch decode tiles as the GPU scripts and tools pass them: ``BN,WARPS,STAGES,PREFETCH`` (PREFETCH 0 or 1;
flashtile/_core/decode_tune.py's DecodeTile), and the winner of a batch_decode ``launch`` sweep.

    python -m benchmarks.tools.decode_tile best TUNE_JSONL CASE

prints the spec of the fastest tile the sweep timed on CASE, or nothing when the card's table tile (the grid's
``default`` setting) was the fastest.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Optional

from flashtile._core.decode_tune import DecodeTile

__all__ = ["parse", "spec_of", "best_spec"]


def parse(spec: str) -> DecodeTile:
    """The DecodeTile of ``BN,WARPS,STAGES,PREFETCH``; ValueError naming what is wrong."""
    try:
        bn, warps, stages, prefetch = (int(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"expected four integers BN,WARPS,STAGES,PREFETCH, got {spec!r}") from None
    return DecodeTile(bn, warps, stages, bool(prefetch))


def spec_of(tile: DecodeTile) -> str:
    return f"{tile.block_n},{tile.num_warps},{tile.num_stages},{int(tile.prefetch_pages)}"


def best_spec(tune_jsonl: str, case: str) -> Optional[str]:
    """The spec of the fastest `launch`-grid setting on ``case`` in a tuning run's records, None when the table's
    own tile won or nothing ran."""
    records = [json.loads(line) for line in open(tune_jsonl)]
    timed = [r for r in records if r["case"] == case and r.get("status") == "ok" and r.get("grid") == "launch"]
    if not timed:
        return None
    best = min(timed, key=lambda r: r["median_us"])["setting"]
    if "DecodeTile(" not in best:
        return None
    fields = dict(re.findall(r"(\w+)=(\w+)", best.split("DecodeTile(", 1)[1]))
    return spec_of(DecodeTile(int(fields["block_n"]), int(fields["num_warps"]), int(fields["num_stages"]),
                              fields["prefetch_pages"] == "True"))


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "best":
        raise SystemExit(__doc__)
    print(best_spec(sys.argv[2], sys.argv[3]) or "")
