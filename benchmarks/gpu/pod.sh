#!/usr/bin/env bash
# POD and BatchAttention (issue 30) on one GPU, under ~4 minutes: their tests (CUDA-graph capture /
# re-plan / replay included), then the issue's chunked-prefill steps against FlashInfer's POD and
# BatchAttention in the same process (suite pod: BatchAttention = provider "flashtile", POD, prefill-then-
# decode, FlashInfer POD, FlashInfer BatchAttention).
# Setup (once per checkout): cp -r ../shared/flashinfer-ref .fi-ref && echo /.fi-ref/ >> .git/info/exclude
# Run from the repo root: OUT=/some/dir bash benchmarks/gpu/pod.sh [tune]   (carry .fi-ref)
# "tune" adds the suite's tuning grids (pod: the POD halves' launch shapes; ba: BatchAttention's tile), ~2 minutes.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
gpu_header pod
# FlashInfer's first POD / BatchAttention calls compile with nvcc: start them in the background now.
( timeout 200 python3 - > "$OUT/pod_fi_warm.log" 2>&1 <<'PY'
import torch
try:
    import flashinfer
except Exception as e:
    raise SystemExit(f"no flashinfer: {e}")
dev, f16 = "cuda", torch.float16
i = lambda *x: torch.tensor(x, dtype=torch.int32, device=dev)
pool = torch.randn(4, 2, 16, 8, 128, dtype=f16, device=dev)
try:
    w = flashinfer.PODWithPagedKVCacheWrapper(torch.empty(64 << 20, dtype=torch.uint8, device=dev))
    w.plan(i(0, 1), i(0), i(5), 32, 8, 128, 16, q_data_type=f16, kv_data_type=f16)
    k = torch.randn(20, 8, 128, dtype=f16, device=dev)
    w.run(torch.randn(20, 32, 128, dtype=f16, device=dev), k, k, torch.randn(1, 32, 128, dtype=f16, device=dev), pool,
          causal_p=True)
    print("warm pod")
except Exception as e:
    print("warm pod failed", type(e).__name__, str(e)[:300])
try:
    w = flashinfer.BatchAttention(kv_layout="NHD", device=dev)
    w.plan(i(0, 3, 4), i(0, 1, 2), i(0, 1), i(9, 5), 32, 8, 128, 128, 16, causal=True, q_data_type=f16,
           kv_data_type=f16)
    w.run(torch.randn(4, 32, 128, dtype=f16, device=dev), pool)
    print("warm batch attention")
except Exception as e:
    print("warm batch attention failed", type(e).__name__, str(e)[:300])
PY
) &
WARM=$!
# The kernel path and the gpu-marked graph tests (the reference path is the CPU CI's).
run_tests timeout 140 python3 -m pytest -q -p no:warnings -rf --tb=short -k "not reference" tests/test_pod.py \
    tests/test_batch_attention.py 2>&1 \
    | tee "$OUT/pod_tests.log" | tail -12
wait $WARM; cat "$OUT/pod_fi_warm.log"
# Per-provider lines go to pod_bench.log as they finish (the JSON and table are written at the end).
timeout 120 python3 -m benchmarks.run --suite pod --out /tmp/pod_bench 2>&1 | tee "$OUT/pod_bench.log" | tail -3
cp /tmp/pod_bench/pod.jsonl /tmp/pod_bench/pod.md "$OUT/" 2>/dev/null
cat "$OUT/pod.md" 2>/dev/null
if [ "${1:-}" = tune ]; then
  timeout 240 python3 -m benchmarks.run --suite pod --tune pod,ba --out /tmp/pod_bench 2>&1 | tail -n 2
  cp /tmp/pod_bench/pod.tune.jsonl /tmp/pod_bench/pod.tune.md "$OUT/" 2>/dev/null
  cat "$OUT/pod.tune.md" 2>/dev/null
fi
