#!/usr/bin/env bash
# A GPU session in one call, for machines lent by the minute: FlashInfer's JIT (and Flex's inductor cache)
# warms in a detached process while the tests run (pytest-xdist), compute-sanitizer checks the kernel paths,
# then the named benchmarks/gpu scripts run with SKIP_TESTS=1 in what is left of $TOTAL seconds. Everything
# lands in $OUT/session.tgz (the device tool returns at most 8 files); a summary goes to stdout.
#
# Usage, from the repo root (carry .fi-ref):
#   OUT=dir TOTAL=560 TEST_LIMIT=300 TESTS="tests/test_sparse.py ..." WARM="pod sparse" \
#     bash benchmarks/gpu/session.sh pod sparse gemm   (a script's argument after a colon: pod:tune, mla:focus)
# TESTS: test files or node ids (default: none); KEEP_WARM=1: see below; WARM: suites whose FlashInfer/Flex providers warm up
# (default: the named scripts'); a later call on the same warm machine reuses the warm caches. Each warm-up
# may run WARM_LIMIT seconds (default 900: it outlives the call, and FlashInfer's demo modules took longer
# than one call's tests on a shared CPU).
set -uo pipefail
T0=$(date +%s)
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=$(mktemp -d)
SCRIPTS=("$@")
left() { echo $(( ${TOTAL:-560} - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$R/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$R/gpu.txt"

# FlashInfer / Flex warm-up: the baseline providers of each suite, once, detached (setsid) and not waited
# for here, so that it survives this call; its timings are thrown away (the GPU is shared with the tests).
declare -A FI_PROVIDERS=(
  [pod]="pod flashinfer_pod,flashinfer_batch_attn" [sparse]="sparse flashinfer,flex_attention"
  [mla]="mla flashinfer" [fp8_prefill]="fp8_prefill flashinfer_fa3_fp8" [gemm]="segment_gemm flashinfer"
  [variants]="variants_flex flex" [decode_tune]="batch_decode flashinfer,flashinfer_tc"
  [single_prefill]="single_prefill flashinfer,flashinfer_fa3"
  [host]="cmd python3 -m benchmarks.tools.host_time --warm --providers FlashInfer"
  [demo]="cmd python3 -m flashtile demo --kernels flashinfer --model 1b --requests 3 --prompt-len 40:70 --new-tokens 3 --system-len 32 --page-size 16 --no-reference")
WARM_LIST=${WARM-$*}
if [ -n "$WARM_LIST" ] && [ -f .fi-ref/device_env.sh ] && command -v nvidia-smi > /dev/null; then
  cmds=""
  for s in $WARM_LIST; do
    s=${s%%:*}
    [ -n "${FI_PROVIDERS[$s]:-}" ] || continue
    read -r suite providers <<< "${FI_PROVIDERS[$s]}"
    if [ "$suite" = cmd ]; then run="$providers"  # a script's own warm-up command (host, demo)
    else run="python3 -m benchmarks.run --suite $suite --providers $providers --out /tmp/warm/$s"; fi
    cmds+="timeout ${WARM_LIMIT:-900} nice -n 10 $run > /tmp/warm/$s.log 2>&1; echo \"\$(date +%T) warm $s rc=\$?\" >> /tmp/warm/progress &
"
  done
  mkdir -p /tmp/warm
  # MAX_JOBS=4: nvcc shares the CPUs with the tests' Triton compiles (16 cores; with device_env's 16 jobs
  # plus 14 pytest workers a 1-second test took a minute)
  setsid nohup bash -c ". .fi-ref/device_env.sh; export MAX_JOBS=4; $cmds wait; echo ALL DONE >> /tmp/warm/progress" \
    > /tmp/warm/driver.log 2>&1 < /dev/null &
  echo $! > /tmp/warm/pgid  # setsid made it a process-group leader: its group is every warm-up process
  disown
fi

if [ -n "${TESTS:-}" ]; then
  timeout -s INT -k 20 "${TEST_LIMIT:-300}" python3 -m pytest -n "${JOBS:-12}" -v -p no:warnings -p no:cacheprovider \
    -rfE --tb=short --durations=40 $TESTS > "$R/tests.log" 2>&1
  echo "pytest rc=$? after $(( $(date +%s) - T0 )) s"
  grep -E "^(FAILED|ERROR)" "$R/tests.log" | head -40
  tail -n 1 "$R/tests.log"
  grep -oE "PASSED tests/[a-z0-9_/]+\.py" "$R/tests.log" | sort | uniq -c | tee "$R/passed_per_file.txt"
fi
if [ -n "${SANITIZE:-}" ]; then  # "file::-k expression" items, run in parallel under memcheck
  i=0
  for item in $SANITIZE; do
    i=$((i + 1))
    ( FLASHTILE_BACKEND=triton timeout "${SANITIZE_LIMIT:-90}" compute-sanitizer --tool memcheck --error-exitcode 9 \
        python3 -m pytest -q -p no:warnings -x "${item%%::*}" -k "${item#*::}" > "$R/sanitize_$i.log" 2>&1
      echo "sanitizer ${item%%::*} rc=$? $(grep -h 'ERROR SUMMARY' "$R/sanitize_$i.log" | tail -n 1)" ) &
  done
  wait
fi

# the warm-up must not share the GPU (or, for host timings, the CPUs) with the timings: wait for it a
# while, then stop what is left of it, this call's or an earlier call's (a call without scripts leaves it
# running for the next call)
# KEEP_WARM=1 leaves it running: for scripts whose timings are GPU-only (CUDA events, graph replays), which
# the warm-up's nvcc jobs on the CPUs do not disturb
if [ ${#SCRIPTS[@]} -gt 0 ] && [ -f /tmp/warm/pgid ] && [ "${KEEP_WARM:-0}" != 1 ]; then
  for _ in $(seq "${WARM_WAIT:-60}"); do grep -q "ALL DONE" /tmp/warm/progress 2>/dev/null && break; sleep 1; done
  kill -- -"$(cat /tmp/warm/pgid)" 2>/dev/null; sleep 1
fi
for s in "${SCRIPTS[@]}"; do
  [ "$(left)" -lt 40 ] && { echo "== $s: skipped, $(left) s left"; continue; }
  echo "== $s ($(left) s left)"
  name=${s%%:*}; arg=""; [ "$name" != "$s" ] && arg=${s#*:}  # "pod:tune" runs pod.sh tune
  mkdir -p "$R/$name"
  SKIP_TESTS=1 OUT="$R/$name" timeout -k 10 "$(left)" bash "benchmarks/gpu/$name.sh" $arg > "$R/$name.log" 2>&1
  echo "== $s rc=$? after $(( $(date +%s) - T0 )) s"
  tail -n 30 "$R/$name.log"
done
cat /tmp/warm/progress 2>/dev/null
tar czf "$OUT/session.tgz" -C "$R" .
