#!/usr/bin/env bash
# Single prefill as a ragged batch of one (issue 27; flashtile/_core/single_batch.py) on one GPU, in ~4 minutes:
# FlashInfer's fa2/fa3 single-prefill variants compile in the background (nvcc, one process per variant) while
# the GPU tests of the change run (both routes against the float64 oracle, the CUDA-graph case); then suite
# single_prefill's causal cases with flashtile's routes side by side against FlashInfer fa2 / fa3 and cuDNN SDPA:
#   flashtile                 FLASHTILE_SINGLE_PREFILL_AS_BATCH=1 (the route where the Hopper kernel serves the call)
#   flashtile_single_route    the single-request Triton kernel (today's default)
#   flashtile_batch_route     every call as a batch of one (the Hopper kernel where it applies, else Triton batch)
# and the host time per eager call of a small single prefill with the setting off and on.
# Setup (once per checkout): cp -r ../shared/flashinfer-ref .fi-ref && echo /.fi-ref/ >> .git/info/exclude
# Run from the repo root: OUT=/some/dir bash benchmarks/gpu/single_prefill.sh   (carry .fi-ref)
# Writes $OUT/single_prefill.md and .jsonl (the table), single_prefill_tests.log, single_prefill_host_{off,on}.json.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
gpu_header single_prefill
# FlashInfer's variants of the benchmark's cases (head dim x dtype x backend; causal), one process each.
WARMS=()
for variant in "fa2 128 bfloat16" "fa3 128 bfloat16" "fa2 64 bfloat16" "fa3 64 bfloat16" "fa2 256 bfloat16" \
               "fa3 256 bfloat16" "fa2 128 float16" "fa3 128 float16"; do
    set -- $variant
    ( timeout 200 nice -n 5 python3 - "$1" "$2" "$3" > "$OUT/single_prefill_fi_warm_${1}_${2}_${3}.log" 2>&1 <<'PY'
import sys
import torch
try:
    import flashinfer
except Exception as e:
    raise SystemExit(f"no flashinfer: {e}")
backend, d, dtype = sys.argv[1], int(sys.argv[2]), getattr(torch, sys.argv[3])
for hk in (32, 8):
    q = torch.randn(128, 32, d, dtype=dtype, device="cuda")
    k = torch.randn(128, hk, d, dtype=dtype, device="cuda")
    try:
        flashinfer.single_prefill_with_kv_cache(q, k, k, causal=True, kv_layout="NHD", backend=backend)
        print("warm", backend, d, dtype, hk)
    except Exception as e:
        print("warm failed", backend, d, dtype, hk, type(e).__name__, str(e)[:300])
PY
    ) &
    WARMS+=($!)
done
# The change's tests on the GPU (gpu-marked route comparisons included) and the single-prefill kernel path.
run_tests timeout 150 python3 -m pytest -q -p no:warnings -rf --tb=short tests/test_single_prefill_batch.py \
    2>&1 | tee "$OUT/single_prefill_tests.log" | tail -6
run_tests env FLASHTILE_SINGLE_PREFILL_AS_BATCH=1 timeout 90 python3 -m pytest -q -p no:warnings -rf --tb=short \
    -k "kernel and (matches_oracle or layouts or empty_rows)" tests/test_single_prefill.py 2>&1 | tee -a "$OUT/single_prefill_tests.log" | tail -4
for pid in "${WARMS[@]}"; do wait "$pid"; done
tail -q -n 2 "$OUT"/single_prefill_fi_warm_*.log
# The table (per-provider lines go to single_prefill_bench.log as they finish).
FLASHTILE_SINGLE_PREFILL_AS_BATCH=1 timeout 170 python3 -m benchmarks.run --suite single_prefill --filter causal \
    --providers flashtile,flashtile_single_route,flashtile_batch_route,flashinfer,flashinfer_fa3,torch_sdpa_cudnn \
    --out /tmp/single_prefill_bench 2>&1 | tee "$OUT/single_prefill_bench.log" | tail -3
cp /tmp/single_prefill_bench/single_prefill.jsonl /tmp/single_prefill_bench/single_prefill.md "$OUT/" 2>/dev/null
cat "$OUT/single_prefill.md" 2>/dev/null
# Host time per eager call (32 queries over 256 keys, 32/8 heads): the replayed launches of each route.
for flag in 0 1; do
    FLASHTILE_SINGLE_PREFILL_AS_BATCH=$flag timeout 40 python3 -m benchmarks.tools.host_time --providers flashtile \
        --filter single_prefill --rounds 5 --json "$OUT/single_prefill_host_$([ $flag = 1 ] && echo on || echo off).json" \
        2>&1 | tail -2 | sed "s/^/setting=$flag: /"
done
