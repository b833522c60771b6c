#!/usr/bin/env bash
# GPU session for issue 28 (the example serving engine and the HF backend), aimed at ~4 minutes on an H100 with a warm
# FlashInfer JIT cache; every step has a timeout, worst case about 9 minutes:
#   1. the demo and HF-backend tests on the GPU (CUDA-graph decode, kernels compiled);
#   2. the demo at the issue's size: a 1B-class random model, 64 requests, prompts 128-2048, 256 new tokens,
#      flashtile's paged engine against the plain PyTorch engine (+ the greedy check);
#   3. HF generate() with attn_implementation="ftile" against "sdpa" (needs transformers: pip install ".[hf]");
#   4. the same engine as 2 with FlashInfer's kernels (`import flashinfer`), when .fi-ref is here; its kernels are
#      JIT-compiled in the background from the start (on an H100 machine its modules took more than 4 minutes
#      from a cold cache: a session's earlier call on the same machine can warm them, session.sh's WARM=demo).
# Writes $OUT/demo_*.json, $OUT/demo_*.log, $OUT/demo_steps.png. Usage: bash benchmarks/gpu/demo.sh
# `demo.sh profile` instead runs benchmarks/tools/demo_profile.py (both libraries' engines at the issue's size,
# timed and profiled by kernel; FlashInfer's JIT modules must be warm: session.sh WARM=demo on an earlier call).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/demo_gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/demo_gpu.txt"
python3 -c "import transformers" 2>/dev/null || python3 -m pip install -q "transformers>=5.25,<6" 2>&1 | tail -1
SIZE="--model 1b --requests 64 --prompt-len 128:2048 --new-tokens 256 --max-batch 64 --system-len 256"

HAVE_FI=0
if [ -f .fi-ref/device_env.sh ]; then
  (. .fi-ref/device_env.sh && python3 -c "import flashinfer" 2>/dev/null) && HAVE_FI=1
fi
if [ "${1:-}" = profile ]; then
  K=flashtile; [ "$HAVE_FI" = 1 ] && K=flashtile,flashinfer
  TILE=(); [ -s /tmp/decode_best_d64.txt ] && TILE=(--decode-tile "$(cat /tmp/decode_best_d64.txt)")  # decode_tune.sh demo
  # PROFILE_ARGS: more flashtile engines with candidate launch settings (demo_profile's options)
  (. .fi-ref/device_env.sh 2>/dev/null; timeout 400 python3 -m benchmarks.tools.demo_profile --kernels $K "${TILE[@]}" \
     ${PROFILE_ARGS---hopper-stages 3} \
     --json "$OUT/demo_profile.json" 2>&1 | grep -v USDT | tee "$OUT/demo_profile.log")
  exit 0
fi
if [ "$HAVE_FI" = 1 ]; then  # warm FlashInfer's JIT cache in the background: same head dims, page size, dtype
  (. .fi-ref/device_env.sh && setsid nice -n 19 timeout 400 python3 -m flashtile demo --kernels flashinfer --model 1b \
     --requests 3 --prompt-len 40:70 --new-tokens 3 --system-len 32 --page-size 16 --no-reference \
     > "$OUT/demo_fi_warm.log" 2>&1) &
  WARM=$!
fi

run_tests timeout 100 python3 -m pytest -q -p no:warnings -rf tests/test_demo.py tests/test_hf_backend.py 2>&1 | tail -6 | tee "$OUT/demo_tests.log"

PLOT=""; python3 -c "import matplotlib" 2>/dev/null && PLOT="--plot $OUT/demo_steps.png"
timeout 170 python3 -m flashtile demo $SIZE --json "$OUT/demo_flashtile.json" $PLOT 2>&1 \
  | tee "$OUT/demo_flashtile.log" | grep -v "tokens .*s$"
echo "exit code: ${PIPESTATUS[0]}"

# HF generate() before the FlashInfer run: it does not need FlashInfer's JIT, which may still be compiling
timeout 100 python3 benchmarks/gpu/hf_generate.py --out "$OUT/demo_hf.json" 2>&1 | tee "$OUT/demo_hf.log"

if [ "$HAVE_FI" = 1 ]; then
  wait "$WARM"; tail -3 "$OUT/demo_fi_warm.log"
  (. .fi-ref/device_env.sh && timeout 120 python3 -m flashtile demo $SIZE --kernels flashinfer --no-reference \
     --json "$OUT/demo_flashinfer.json" 2>&1 | tee "$OUT/demo_flashinfer.log" | grep -v "tokens .*s$")
else
  echo "FlashInfer: not importable here (.fi-ref/device_env.sh missing); skipped" | tee "$OUT/demo_flashinfer.log"
fi

