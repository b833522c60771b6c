# Sourced by the benchmarks/gpu scripts. run_tests runs a script's test or sanitizer step unless
# SKIP_TESTS=1, for a run that has just passed the same tests on this machine (benchmarks only).
run_tests() {
  if [ "${SKIP_TESTS:-0}" = 1 ]; then echo "skipped (SKIP_TESTS=1): $1 $2 $3 $4"; return 0; fi
  "$@"
}
