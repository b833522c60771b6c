#!/usr/bin/env bash
# Attention variants on the GPU (issue 25), for the lead's device session (~4 min on an H100):
#   1. the variant tests (tests/test_variants.py at GPU shapes + the gpu-marked test), launch-cache check on;
#   2. speed: built-in flag vs the same feature as a variant (decode 64 x 4096 paged, prefill 4096 causal),
#      variants vs compiled FlexAttention (prefill 4096, decode 1 x 32768);
#   3. first-call time of a new variant, cold and from the on-disk cache.
# Writes logs, markdown tables and JSON lines under $OUT (default ./gpu_out).
# Usage: bash benchmarks/gpu/variants.sh
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[ -f .fi-ref/device_env.sh ] && . .fi-ref/device_env.sh || true   # FlashInfer (optional; not needed here)
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

run_tests env FLASHTILE_CHECK_LAUNCH=1 timeout 150 python3 -m pytest -q -p no:warnings -rf --tb=short tests/test_variants.py \
  2>&1 | tee "$OUT/variants_tests.log" | tail -15

timeout 240 python3 -m benchmarks.run --suite variants_decode,variants_prefill,variants_flex --out /tmp/variants_bench \
  2>&1 | tail -45
cp /tmp/variants_bench/variants_*.md /tmp/variants_bench/variants_*.jsonl "$OUT/" 2>/dev/null

timeout 200 python3 -m benchmarks.tools.variant_compile_time --json "$OUT/variant_compile_time.json" \
  2>&1 | tee "$OUT/variant_compile_time.md"
