#!/usr/bin/env bash
# Host time per eager call (issue 23), flashtile vs FlashInfer in one process, on one GPU, in ~4 minutes:
# FlashInfer's kernels compile in the background (nvcc, 4 processes) while the GPU tests of the ops whose
# host path changed run (FLASHTILE_CHECK_LAUNCH=1: every direct launch is checked against Triton's choice,
# every memoized launch against the launcher's computation); then the host table of every row the issue lists
# (benchmarks/tools/host_time.py: tiny problems, 300 calls, perf_counter, median of 7 alternating rounds),
# and a cProfile of the rows that were slower than FlashInfer.
# Setup (once per checkout): cp -r ../shared/flashinfer-ref .fi-ref && echo /.fi-ref/ >> .git/info/exclude
# Run from the repo root: OUT=/some/dir bash benchmarks/gpu/host.sh   (carry .fi-ref)
# Writes $OUT/host.md (the table), $OUT/host.json, $OUT/host_profile.txt, $OUT/host_tests.log.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
gpu_header host
# FlashInfer's first call of each case compiles with nvcc (10-90 s each): four warm-up processes, now; and
# one that compiles flashtile's kernels of every case (Triton, a few seconds each) into Triton's cache.
WARMS=()
for cases in "batch decode,single_decode" "prefill" "top_p" "rmsnorm,silu,rope,merge_state"; do
    ( timeout 180 nice -n 5 python3 -m benchmarks.tools.host_time --warm --providers FlashInfer --filter "$cases" \
        > "$OUT/host_fi_warm_${cases%%,*}.log" 2>&1 ) &
    WARMS+=($!)
done
( timeout 180 python3 -m benchmarks.tools.host_time --warm --providers flashtile > "$OUT/host_ft_warm.log" 2>&1 ) &
WARMS+=($!)
# The kernel path of the changed ops on the GPU (the reference path is the CPU CI's).
run_tests env FLASHTILE_CHECK_LAUNCH=1 timeout 140 python3 -m pytest -q -p no:warnings -rf --tb=short -k "not reference" \
    tests/test_norm.py tests/test_cascade_merge.py tests/test_single_decode.py tests/test_single_plan.py \
    tests/test_host_path.py tests/test_launch.py 2>&1 | tee "$OUT/host_tests.log" | tail -8
for pid in "${WARMS[@]}"; do wait "$pid"; done
tail -n 3 "$OUT"/host_fi_warm_*.log "$OUT/host_ft_warm.log"
# The table: every case (both providers warm now; FlashInfer's compile happens outside the timed rounds anyway).
timeout 170 python3 -m benchmarks.tools.host_time --rounds 7 --calls 300 --json "$OUT/host.json" 2>&1 \
    | tee "$OUT/host.md" | tail -20
# Where flashtile's host time goes in the rows that were above FlashInfer (own time, cProfile-inflated).
timeout 60 python3 -m benchmarks.tools.host_time --providers flashtile --rounds 1 --calls 300 \
    --filter "rmsnorm,merge_state,single_decode" --profile "rmsnorm,merge_state,single_decode" --top 14 \
    > "$OUT/host_profile.txt" 2>&1
tail -n 50 "$OUT/host_profile.txt"
