#!/usr/bin/env bash
# FP8 / FP4 quantization (issue 31, item 3) on one GPU, about a minute: the gpu-marked tests (CUDA
# bytes equal CPU bytes), then FlashInfer cross-checks and timings (benchmarks/gpu/quant.py).
# Setup (once per checkout): cp -r ../shared/flashinfer-ref .fi-ref && echo /.fi-ref/ >> .git/info/exclude
# Run from the repo root: OUT=/some/dir bash benchmarks/gpu/quant.sh   (carry .fi-ref)
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
gpu_header quant
run_tests timeout 120 python3 -m pytest -q -m gpu tests/test_quantization_fp.py 2>&1 | tail -5 | tee "$OUT/quant_tests.txt"
timeout 180 python3 -m benchmarks.gpu.quant 2>&1 | tee "$OUT/quant_bench.txt"
