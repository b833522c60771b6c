#!/usr/bin/env bash
# Head-dim-64 batch prefill (the demo model's, issues 27 and 28) on one GPU, in ~3 minutes: FlashInfer's d64
# paged prefill variants (fa2, fa3) compile in the background while the Hopper kernel's GPU tests run (the
# ring depths 2-4 against the oracle, the dispatch rule, CUDA-graph replays); then suite batch_prefill's d64
# cases against FlashInfer fa2 / fa3 and cuDNN SDPA, and its `hopper_stages` grid (the Hopper kernel's K/V
# ring depth 2, 3, 4; paste a winner into STAGES_BY_HEAD_DIM in flashtile/kernels/batch_prefill_hopper.py).
# Setup (once per checkout): cp -r ../shared/flashinfer-ref .fi-ref && echo /.fi-ref/ >> .git/info/exclude
# Run from the repo root: OUT=/some/dir bash benchmarks/gpu/prefill_d64.sh   (carry .fi-ref)
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
gpu_header prefill_d64
( timeout 240 nice -n 5 python3 - > "$OUT/prefill_d64_fi_warm.log" 2>&1 <<'PY'
import torch
try:
    import flashinfer
except Exception as e:
    raise SystemExit(f"no flashinfer: {e}")
i = lambda *x: torch.tensor(x, dtype=torch.int32, device="cuda")
for backend in ("fa2", "fa3"):
    try:
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(torch.empty(64 << 20, dtype=torch.uint8, device="cuda"),
                                                           "NHD", backend=backend)
        w.plan(i(0, 16), i(0, 1), i(0), i(16), 32, 8, 64, 16, causal=True, q_data_type=torch.bfloat16)
        w.run(torch.randn(16, 32, 64, device="cuda").bfloat16(),
              torch.randn(1, 2, 16, 8, 64, device="cuda").bfloat16())
        print("warm", backend)
    except Exception as e:
        print("warm failed", backend, type(e).__name__, str(e)[:300])
PY
) &
WARM=$!
run_tests timeout 120 python3 -m pytest -q -p no:warnings -rf --tb=short tests/test_batch_prefill.py -k "hopper" \
    tests/test_hopper_prefill.py 2>&1 | tee "$OUT/prefill_d64_tests.log" | tail -6
wait $WARM; cat "$OUT/prefill_d64_fi_warm.log"
timeout 150 python3 -m benchmarks.run --suite batch_prefill --filter d64 \
    --providers flashtile,flashinfer,flashinfer_fa3,torch_sdpa_cudnn --out "$OUT" 2>&1 | tail -12
timeout 150 python3 -m benchmarks.run --suite batch_prefill --tune hopper_stages --filter d64 --out "$OUT" 2>&1 \
    | tail -12
exit 0
