#!/usr/bin/env bash
# The test suite on one GPU in parallel: one pytest process per test file, at most $JOBS at once (default:
# CPU cores - 2; compiling Triton kernels is CPU-bound and the files share the Triton cache), each stopped
# after $LIMIT seconds (default 480) with SIGINT, so that pytest still reports the failures it has seen.
# Prints one line per file (its pytest summary) and writes $OUT/gpu_tests.log: per file, its failures with
# tracebacks and its slowest tests.
# Usage, from the repo root:   OUT=dir bash benchmarks/gpu/tests.sh [pytest args or test files...]
#   (default: every tests/test_*.py and tests/engines, largest file first)
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
JOBS=${JOBS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
LIMIT=${LIMIT:-480}
LOGS=$(mktemp -d)
if [ $# -gt 0 ]; then
  TARGETS=("$@")
else
  mapfile -t TARGETS < <(ls -S tests/test_*.py; echo tests/engines)
fi
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1
echo "${#TARGETS[@]} targets, $JOBS at a time, ${LIMIT}s each"
run_one() {
  local target=$1 log
  log="$2/$(echo "$target" | tr '/:[]' '____').log"
  timeout -s INT -k 30 "$3" python3 -m pytest -q -p no:warnings -p no:cacheprovider -rfE --tb=short --durations=5 \
    "$target" > "$log" 2>&1
  local rc=$?
  printf '%-40s rc=%-3s %s\n' "$target" "$rc" "$(grep -E '(passed|failed|error|no tests ran)' "$log" | tail -n 1)"
}
export -f run_one
printf '%s\n' "${TARGETS[@]}" | xargs -P "$JOBS" -I{} bash -c 'run_one "$@"' _ {} "$LOGS" "$LIMIT" \
  | sort | tee "$OUT/gpu_tests_summary.txt"
for log in "$LOGS"/*.log; do
  echo "=================== $(basename "$log" .log)"
  # the failures section and the summary (pytest prints them after the progress dots)
  sed -n '/^=\+ \(FAILURES\|ERRORS\|slowest\)/,$p' "$log"
done > "$OUT/gpu_tests.log"
echo "failed files: $(grep -c -v 'rc=0 ' "$OUT/gpu_tests_summary.txt")"
