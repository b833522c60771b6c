# Sourced by the benchmarks/gpu scripts. run_tests runs a script's test or sanitizer step unless
# SKIP_TESTS=1, for a run that has just passed the same tests on this machine (benchmarks only).
run_tests() {
  if [ "${SKIP_TESTS:-0}" = 1 ]; then echo "skipped (SKIP_TESTS=1): $1 $2 $3 $4"; return 0; fi
  "$@"
}

# The scripts' shared start (after OUT is set): FlashInfer on the path when .fi-ref is here, and the card
# and versions into $OUT/<name>_gpu.txt.
gpu_header() {
  if [ -f .fi-ref/device_env.sh ]; then . .fi-ref/device_env.sh || echo "FlashInfer setup failed: baseline skipped"; fi
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/$1_gpu.txt"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT/$1_gpu.txt"
}
