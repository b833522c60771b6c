#!/usr/bin/env bash
# FP8 prefill attention (issue 31, item 4) on one GPU, under ~4 minutes: the fp8 attention tests on CUDA
# (tests/test_fp8_prefill.py: the kernel path, the gpu-marked upstream-sized cases with both V layouts), memcheck
# on the kernel cases, then the fp8_prefill suite (flashtile fp8 vs flashtile bf16 vs FlashInfer fa3 fp8; the ragged
# batch on the Gluon kernel by default and on the Triton kernel as provider flashtile_fp8_triton).
# Setup (once per checkout): cp -r ../shared/flashinfer-ref .fi-ref && echo /.fi-ref/ >> .git/info/exclude
# Run from the repo root: OUT=/some/dir bash benchmarks/gpu/fp8_prefill.sh [tune]   (carry .fi-ref)
# "gluon" times the Gluon kernel's FP8_P_IN_SHARED on the ragged batch; "tune" adds the launch-config grids of fp8
# single prefill and of the batch kernel's fp8 tiles (~5 more minutes).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
gpu_header fp8_prefill
# FlashInfer's fa3 fp8 modules (single, ragged batch) JIT-compile with nvcc on first use (~75 s each): start now.
( timeout 230 python3 - > "$OUT/fp8_prefill_fi_warm.log" 2>&1 <<'PY'
import torch
try:
    import flashinfer
except Exception as e:
    raise SystemExit(f"no flashinfer: {e}")
e4, dev = torch.float8_e4m3fn, "cuda"
q, k = torch.randn(64, 32, 128, device=dev).to(e4), torch.randn(64, 8, 128, device=dev).to(e4)
s32, s8 = torch.ones(32, device=dev), torch.ones(8, device=dev)
try:
    flashinfer.single_prefill_with_kv_cache(q, k, k, s32, s8, s8, o_dtype=torch.bfloat16, causal=True, backend="fa3")
    print("warm fa3 fp8 single")
except Exception as e:
    print("warm fa3 fp8 single failed", type(e).__name__, str(e)[:300])
try:
    w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.uint8, device=dev), "NHD",
                                                        backend="fa3")
    ind = torch.tensor([0, 64], dtype=torch.int32, device=dev)
    w.plan(ind, ind, 32, 8, 128, 128, causal=True, q_data_type=e4, kv_data_type=e4, o_data_type=torch.bfloat16)
    w.run(q, k, k, s32, s8, s8)
    print("warm fa3 fp8 ragged")
except Exception as e:
    print("warm fa3 fp8 ragged failed", type(e).__name__, str(e)[:300])
PY
) &
WARM=$!
# The kernel path and the gpu-marked cases (the reference path is the CPU CI's).
run_tests timeout 180 python3 -m pytest -q -p no:warnings -rf --tb=short tests/test_fp8_prefill.py \
    -k "(kernel or gpu) and not gluon" 2>&1 | tee "$OUT/fp8_prefill_tests.log" | tail -12
# The Gluon kernel's FP8 path under its own limit: a hang costs 90 s, not the run.
run_tests env FLASHTILE_CHECK_LAUNCH=1 timeout -k 10 90 python3 -m pytest -q -x -p no:warnings -rf --tb=short \
    tests/test_fp8_prefill.py -k gluon 2>&1 | tee "$OUT/fp8_prefill_gluon_tests.log" | tail -12
run_tests env FLASHTILE_BACKEND=triton timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q \
    -p no:warnings -x tests/test_fp8_prefill.py -k "kernel and (single_prefill_fp8 or ragged or paged) and not gpu" \
    2>&1 | tail -4 | tee "$OUT/fp8_prefill_sanitize.log"
wait $WARM; cat "$OUT/fp8_prefill_fi_warm.log"
timeout 150 python3 -m benchmarks.run --suite fp8_prefill --out /tmp/fp8_prefill_bench 2>&1 | tail -3
cp /tmp/fp8_prefill_bench/fp8_prefill.jsonl /tmp/fp8_prefill_bench/fp8_prefill.md "$OUT/" 2>/dev/null
cat "$OUT/fp8_prefill.md" 2>/dev/null || echo "fp8_prefill: no results"
if [ "${1:-}" = gluon ]; then timeout 120 python3 -m benchmarks.run --suite fp8_prefill --tune gluon --out "$OUT" 2>&1 \
  | tail -10 | tee "$OUT/fp8_prefill_tune.log"; fi
if [ "${1:-}" = tune ]; then
  timeout 200 python3 -m benchmarks.run --suite fp8_prefill --tune config --filter 8192 --out "$OUT" 2>&1 \
      | tail -14 | tee "$OUT/fp8_prefill_tune.log"
  timeout 120 python3 -m benchmarks.run --suite fp8_prefill --tune batch_tiles --out "$OUT" 2>&1 | tail -10 \
      | tee -a "$OUT/fp8_prefill_tune.log"
fi
