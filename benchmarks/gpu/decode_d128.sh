#!/usr/bin/env bash
# The head-dim-128 batch decode tile on one GPU, swept and then timed where it decides an issue, in ~7 minutes:
#  1. the `launch` grid of suite batch_decode on 64 x 4096 (32/8 heads, page 16): BLOCK_N x stages x
#     page-id prefetch x warps; the winner goes to $OUT/decode_best_d128.txt as BN,WARPS,STAGES,PREFETCH
#     (empty: the table's tile won; benchmarks/tools/decode_tile.py);
#  2. with that tile (benchmarks.run --decode-tile): the variant suites' 64 x 4096 paged decode cases against the
#     built-in flags and compiled FlexAttention (issue 25's last row);
#  3. suite batch_decode's d128 cases with that tile and with the card's table entry, against FlashInfer (both
#     use_tensor_cores values) when .fi-ref is here (issue 27).
# Paste the winner into the card's entry in flashtile/_core/decode_tune.py (d128) and re-run the decode tests.
# Setup (once per checkout): cp -r ../shared/flashinfer-ref .fi-ref && echo /.fi-ref/ >> .git/info/exclude
# Run from the repo root: OUT=/some/dir bash benchmarks/gpu/decode_d128.sh   (carry .fi-ref)
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
gpu_header decode_d128
CASE="64 x 4096 h32/8"
D128="1 x 32768 h32/8$|16 x 4096 h32/8$|64 x 4096 h32/8$|256 x 2048 h32/8$|128 x 8192 h32/8$|64 x 4096 h32/32$"
# FlashInfer's d128 bf16 batch decode variants compile in the background (nvcc) for step 3.
( timeout 300 nice -n 10 python3 -m benchmarks.run --suite batch_decode --providers flashinfer,flashinfer_tc \
    --filter "1 x 32768 h32/8$" --out /tmp/decode_d128_warm > "$OUT/decode_d128_fi_warm.log" 2>&1 ) &
WARM=$!

timeout 200 python3 -m benchmarks.run --suite batch_decode --tune launch --filter "$CASE$" --out "$OUT/tune" \
    2>&1 | tail -2
cat "$OUT/tune/batch_decode.tune.md" 2>/dev/null
python3 -m benchmarks.tools.decode_tile best "$OUT/tune/batch_decode.tune.jsonl" "$CASE" > "$OUT/decode_best_d128.txt"
TILE=$(cat "$OUT/decode_best_d128.txt"); echo "best d128 tile: ${TILE:-none}"
T=(); [ -n "$TILE" ] && T=(--decode-tile "$TILE")

timeout 200 python3 -m benchmarks.run --suite variants_flex,variants_decode --filter "decode 64 x 4096" "${T[@]}" \
    --out "$OUT/variants" 2>&1 | tail -2
cat "$OUT"/variants/variants_*.md 2>/dev/null

wait $WARM; tail -n 2 "$OUT/decode_d128_fi_warm.log"
timeout 120 python3 -m benchmarks.run --suite batch_decode --filter "$D128" --providers flashtile,flashinfer,flashinfer_tc \
    "${T[@]}" --out "$OUT/suite_best" 2>&1 | tail -2
cat "$OUT/suite_best/batch_decode.md" 2>/dev/null
timeout 60 python3 -m benchmarks.run --suite batch_decode --filter "$D128" --providers flashtile --out "$OUT/suite_table" \
    2>&1 | tail -2
cat "$OUT/suite_table/batch_decode.md" 2>/dev/null
exit 0
