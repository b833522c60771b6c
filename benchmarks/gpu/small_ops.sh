#!/usr/bin/env bash
# Memory-bound small ops on one GPU (issue 27's merge_state / rmsnorm rows), in ~3 minutes: the norm and
# merge GPU tests, then suites norm, merge_state and activation against FlashInfer (steady state:
# CUDA graphs), beside a device copy of the same bytes (norm, activation) as the card's ceiling, then the norm `warps` and merge_state `launch`
# grids (paste winners into ELEMS_PER_WARP in flashtile/kernels/norm.py, ROW_TILE_ELEMS / PAIR_WARPS in
# flashtile/kernels/merge.py, per card only if the cards disagree).
# Setup (once per checkout): cp -r ../shared/flashinfer-ref .fi-ref && echo /.fi-ref/ >> .git/info/exclude
# Run from the repo root: OUT=/some/dir bash benchmarks/gpu/small_ops.sh   (carry .fi-ref)
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
gpu_header small_ops
# FlashInfer's norm, activation and cascade modules compile on first use: warm them in the background.
( timeout 200 nice -n 5 python3 -m benchmarks.run --suite norm --smoke --providers flashinfer --out /tmp/small_ops_warm \
    > "$OUT/small_ops_fi_warm.log" 2>&1
  timeout 120 nice -n 5 python3 -m benchmarks.run --suite merge_state --smoke --providers flashinfer \
    --out /tmp/small_ops_warm >> "$OUT/small_ops_fi_warm.log" 2>&1
  timeout 120 nice -n 5 python3 -m benchmarks.run --suite activation --smoke --providers flashinfer \
    --out /tmp/small_ops_warm >> "$OUT/small_ops_fi_warm.log" 2>&1 ) &
WARM=$!
run_tests timeout 120 python3 -m pytest -q -p no:warnings -rf --tb=short -k "not reference" tests/test_norm.py \
    tests/test_cascade_merge.py 2>&1 | tee "$OUT/small_ops_tests.log" | tail -4
wait $WARM; tail -n 3 "$OUT/small_ops_fi_warm.log"
for suite in norm merge_state activation; do
    timeout 100 python3 -m benchmarks.run --suite $suite --providers flashtile,flashinfer,copy_same_bytes \
        --out "$OUT" 2>&1 | tail -2
    cat "$OUT/$suite.md" 2>/dev/null
done
timeout 100 python3 -m benchmarks.run --suite norm --tune warps --out "$OUT/tune" 2>&1 | tail -2
timeout 100 python3 -m benchmarks.run --suite merge_state --tune launch --out "$OUT/tune" 2>&1 | tail -2
cat "$OUT"/tune/*.tune.md 2>/dev/null
exit 0
