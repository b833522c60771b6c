#!/usr/bin/env bash
# One device-machine session: GPU tests, then (optionally) the tuning sweep, the benchmark suites
# and first-call times. Writes logs and tables under $OUT (or ./gpu_out).
# Usage: bash benchmarks/gpu_check.sh [tests] [tune] [bench] [compile]
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
for step in "$@"; do
  case "$step" in
    tests-decode) python3 -m pytest -q -p no:warnings -x tests/test_single_decode.py tests/test_attention_ops.py 2>&1 | tail -5 ;;
    tests) python3 -m pytest -q -p no:warnings -x tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
    tune) python3 benchmarks/tune_attention.py --out "$OUT/tune.json" 2>&1 | tee "$OUT/tune.log" | grep -E "BEST|HOST" ;;
    tune-decode) python3 benchmarks/tune_attention.py --only decode --out "$OUT/tune.json" 2>&1 | tee "$OUT/tune.log" | grep -E "BEST|HOST" ;;
    bench) python3 benchmarks/run.py --suite single_decode --providers flashtile,torch_sdpa_flash,torch_sdpa_cudnn,flashinfer --out /tmp/bench 2>&1 | tail -30
           python3 benchmarks/run.py --suite single_prefill --out /tmp/bench 2>&1 | tail -40
           cp /tmp/bench/single_decode.md /tmp/bench/single_prefill.md "$OUT/"; tar czf "$OUT/bench.tgz" -C /tmp bench ;;
    bench-decode) python3 benchmarks/run.py --suite single_decode --providers flashtile,torch_sdpa_flash,torch_sdpa_cudnn,flashinfer --out /tmp/bench 2>&1 | tail -14
           cp /tmp/bench/single_decode.md "$OUT/" ;;
    sanitize) FLASHTILE_BACKEND=triton timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:warnings -x \
                tests/test_single_decode.py tests/test_single_prefill.py -k "not 32768 and not 1024x1024 and not 8191 and not 4096 and not 513" 2>&1 | tail -6 | tee "$OUT/sanitize.log" ;;
    compile) python3 benchmarks/compile_time.py 2>&1 | tee "$OUT/compile.md" ;;
    tests-nosampling) timeout 330 python3 -m pytest -q -p no:warnings tests --ignore=tests/test_sampling.py --deselect tests/test_bench_harness.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
    tests-helpers) timeout 300 python3 -m pytest -q -p no:warnings -rf --tb=line tests/test_sampling.py tests/test_norm.py tests/test_rope.py tests/test_page.py tests/test_activation.py tests/test_batch_decode.py 2>&1 | tee "$OUT/gpu_tests_sampling.log" | tail -15 ;;
    sanitize-new) FLASHTILE_BACKEND=triton timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:warnings -x \
                tests/test_batch_decode.py tests/test_page.py -k "kernel and not replay and not 32768 and not 20000 and not 60000 and not 30000" 2>&1 | tail -4 | tee "$OUT/sanitize.log" ;;
    bench-small) timeout 200 python3 benchmarks/run.py --suite norm,qk_norm,activation,rope,small_ops_launch --out /tmp/bench 2>&1 | tail -5
           cat /tmp/bench/norm.md /tmp/bench/qk_norm.md /tmp/bench/activation.md /tmp/bench/rope.md /tmp/bench/small_ops_launch.md > "$OUT/small_ops.md" 2>/dev/null ;;
    bench-page) timeout 100 python3 benchmarks/run.py --suite page_append --out /tmp/bench 2>&1 | tail -3; cp /tmp/bench/page_append.md "$OUT/" ;;
    bench-sampling) timeout 200 python3 benchmarks/run.py --suite sampling --out /tmp/bench 2>&1 | tail -3; cp /tmp/bench/sampling*.md "$OUT/" ;;
    tests-batch) FLASHTILE_CHECK_LAUNCH=1 python3 -m pytest -q -p no:warnings tests/test_batch_decode.py tests/test_scheduler.py tests/test_attention_ops.py tests/test_single_decode.py 2>&1 | tee "$OUT/tests_batch.log" | tail -15 ;;
    bench-batch) python3 benchmarks/run.py --suite batch_decode --cuda-graph on --out /tmp/bench 2>&1 | tail -30
           python3 benchmarks/run.py --suite batch_decode_sweep --cuda-graph on --out /tmp/bench 2>&1 | tail -22
           python3 benchmarks/decode_host_cost.py 2>&1 | tee /tmp/bench/host_cost.md
           cat /tmp/bench/batch_decode.md /tmp/bench/batch_decode_sweep.md /tmp/bench/host_cost.md > "$OUT/batch_decode.md"
           cp /tmp/bench/batch_decode_sweep.png "$OUT/" 2>/dev/null ;;
    tests-prefill) FLASHTILE_CHECK_LAUNCH=1 timeout 240 python3 -m pytest -q -p no:warnings -rf --tb=short tests/test_batch_prefill.py tests/test_scheduler.py 2>&1 | tee "$OUT/tests_prefill.log" | tail -25 ;;
    bench-prefill) timeout 330 python3 benchmarks/run.py --suite batch_prefill,batch_append --out /tmp/bench 2>&1 | tail -4
           cat /tmp/bench/batch_prefill.md /tmp/bench/batch_append.md > "$OUT/batch_prefill.md" 2>/dev/null; cat "$OUT/batch_prefill.md" ;;
    tune-prefill) timeout 330 python3 benchmarks/tune_batch_prefill.py --quick 2>&1 | tee "$OUT/tune_prefill.log" | grep -v "^  skip" ;;
    tests-cascade) timeout 240 python3 -m pytest -q -p no:warnings -rf --tb=short tests/test_cascade.py tests/test_cascade_merge.py 2>&1 | tee "$OUT/tests_cascade.log" | tail -15 ;;
    bench-cascade) timeout 300 python3 benchmarks/run.py --suite merge_state,cascade_decode --cuda-graph on --out /tmp/bench 2>&1 | tail -3
           cat /tmp/bench/merge_state.md /tmp/bench/cascade_decode.md > "$OUT/cascade.md" 2>/dev/null; cp /tmp/bench/cascade_decode.png "$OUT/" 2>/dev/null; cat "$OUT/cascade.md" ;;
    tune-merge) timeout 200 python3 -m pytest -q -p no:warnings tests/test_cascade_merge.py 2>&1 | tail -2
           timeout 200 python3 benchmarks/tune_merge.py 2>&1 | tee "$OUT/tune_merge.log" ;;
    tune-small) timeout 200 python3 benchmarks/tune_small_ops.py 2>&1 | tee "$OUT/tune_small.log" | grep BEST ;;
    tests-split) FLASHTILE_CHECK_LAUNCH=1 timeout 500 python3 -m pytest -q -p no:warnings -rf --tb=short tests/test_sampling.py -k "split or wave" 2>&1 | tee "$OUT/tests_split.log" | tail -8 ;;
    bench-split) FLASHTILE_SAMPLING_SPLIT=0 timeout 120 python3 benchmarks/run.py --suite sampling --filter " b1 " --providers flashtile --out /tmp/bench_nosplit 2>&1 | tail -1
           grep "^| " /tmp/bench_nosplit/sampling.md | tee "$OUT/sampling_b1_nosplit.md"
           timeout 300 python3 benchmarks/tune_sampling.py --filter " b1 " SPLIT_CHUNK=2048,4096,8192 SPLIT_WARPS=4,8 2>&1 | tee "$OUT/tune_split.log" | grep -e BEST -e skip ;;
    tune-split-lanes) timeout 300 python3 benchmarks/tune_sampling.py --filter " b1 " SPLIT_PIVOTS=8,16 SPLIT_NQ=4,8 2>&1 | tee "$OUT/tune_split_lanes.log" | grep -e BEST -e skip
           timeout 200 python3 benchmarks/run.py --suite sampling --filter " b1 " --providers flashtile --cuda-graph on --graph-span-us 1000 --out /tmp/bench_steady 2>&1 | tail -1
           grep "^| " /tmp/bench_steady/sampling.md | tee "$OUT/sampling_b1_steady.md" ;;
    bench-sampling-split) FLASHTILE_SAMPLING_SPLIT=0 timeout 200 python3 benchmarks/run.py --suite sampling --providers flashtile --out /tmp/bench_nosplit 2>&1 | tail -1
           cp /tmp/bench_nosplit/sampling.md "$OUT/sampling_nosplit.md"
           timeout 330 python3 benchmarks/run.py --suite sampling --out /tmp/bench 2>&1 | tail -1; cp /tmp/bench/sampling.md /tmp/bench/sampling.jsonl "$OUT/"
           grep "^| " /tmp/bench/sampling.md ;;
    smoke-split-dense) timeout 90 python3 -c "
import torch, flashtile.kernels.sampling as K
p = torch.softmax(torch.randn(128, 128256, device='cuda'), -1)
print('layout b128', K.split_layout(128256, 128, p.device))
for kw in (dict(top_k=50), dict(top_p=0.9), dict(min_p=0.05), dict()):
    o = torch.empty(128, dtype=torch.int32, device='cuda'); v = torch.empty(128, dtype=torch.bool, device='cuda')
    K.filtered_sampling(p, None, o, v, 1, 0, **kw); torch.cuda.synchronize(); print(kw, 'ok', bool(v.all()))
" 2>&1 | tee "$OUT/smoke_split_dense.log" | tail -6 ;;
    tune-split-dense) timeout 300 python3 benchmarks/tune_sampling.py --filter "b16 V128256,b64 V128256,b128 V128256" SPLIT_MAX_CHUNK=16384,1048576 SPLIT_PER_SM=1,2 2>&1 | tee "$OUT/tune_split_dense.log" | grep -v "^BEST" ;;
    tune-wave) timeout 300 python3 benchmarks/tune_sampling.py --filter "b512 V32000" SEG_WAVE_WARPS=4,8 SEG_WAVE_COLS=32,64 SEG_WAVE_SUB_COLS=16,32 2>&1 | tee "$OUT/tune_wave.log" | grep -v "^BEST" ;;
    tune-topk-dense) F="top_k 50 b128 V128256,top_k 50 b64 V128256"
           timeout 200 python3 benchmarks/tune_sampling.py --filter "$F" SPLIT_WARPS=4,8 SPLIT_PER_SM=2,4 2>&1 | tee "$OUT/tune_topk_dense.log" | grep -v "^BEST"
           timeout 150 python3 benchmarks/tune_sampling.py --filter "$F" SPLIT_PIVOTS=8,16 SPLIT_NQ=4,8 2>&1 | tee -a "$OUT/tune_topk_dense.log" | grep -v "^BEST"
           timeout 150 python3 benchmarks/tune_sampling.py --filter "b64 V128256" SPLIT_MAX_CHUNK=32768,1048576 2>&1 | tee -a "$OUT/tune_topk_dense.log" | grep -v "^BEST" ;;
    tune-split-seg) timeout 150 python3 benchmarks/tune_sampling.py --filter "top_k 50 b128 V128256,top_k 50 b64 V128256,top_k 50 b16 V128256" SPLIT_SEG=2048,4096,8192 2>&1 | tee "$OUT/tune_split_seg.log" | grep -v "^BEST" ;;
    tests-sampling-nosplit) timeout 570 python3 -m pytest -v -p no:warnings -rf --tb=short tests/test_sampling.py -k "not split and not wave" 2>&1 | tee "$OUT/tests_sampling_nosplit.log" | grep -v PASSED | tail -15 ;;
    bench-sampling-all) timeout 400 python3 benchmarks/run.py --suite sampling --out /tmp/bench 2>&1 | tail -1; cp /tmp/bench/sampling.md /tmp/bench/sampling.jsonl "$OUT/"; grep "^| " /tmp/bench/sampling.md ;;
    tune-top-p-grid) F="top_p 0.9 b512 V32000,top_p 0.9 b128 V128256,top_p 0.9 b128 V32000,top_p 0.9 b512 V128256"
           timeout 330 python3 benchmarks/tune_sampling.py --filter "$F" SEG_PIVOTS_TOP_P=4,8 SEG_TOP_P_GRID_STEP=1,2 SEG_TOP_P_GRID_OFF=1,3 2>&1 | tee "$OUT/tune_top_p_grid.log" | grep -v "^BEST"
           timeout 150 python3 benchmarks/tune_sampling.py --filter "top_p 0.9 b512 V32000" SEG_UNROLL=1,2 SEG_STAGES=4,7 2>&1 | tee -a "$OUT/tune_top_p_grid.log" | grep -v "^BEST" ;;
    tests-sampling-top-p) timeout 200 python3 -m pytest -q -p no:warnings -rf --tb=short tests/test_sampling.py -k "top_p and not split and not wave" 2>&1 | tee "$OUT/tests_sampling_top_p.log" | tail -4 ;;
    tests-sampling-rest) timeout 400 python3 -m pytest -q -p no:warnings -rf --tb=short tests/test_sampling.py \
                -k "exchange or cuda_graph or spec or logits or softmax or errors or aliases or edge_rows or reproducible or layout" 2>&1 | tee "$OUT/tests_sampling_rest.log" | tail -6 ;;
    tests-sampling) FLASHTILE_CHECK_LAUNCH=1 timeout 560 python3 -m pytest -q -p no:warnings -rf --tb=short tests/test_sampling.py 2>&1 | tee "$OUT/tests_sampling.log" | tail -8 ;;
    sanitize-merge-rope) FLASHTILE_BACKEND=triton timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:warnings -x \
                tests/test_cascade_merge.py tests/test_rope.py -k "kernel" 2>&1 | tail -4 | tee "$OUT/sanitize.log" ;;
    bench-merge) timeout 100 python3 benchmarks/run.py --suite merge_state --out /tmp/bench 2>&1 | tail -1; grep "^| merge" /tmp/bench/merge_state.md ;;
    tests-single-prefill) timeout 420 python3 -m pytest -q -p no:warnings -rf --tb=short tests/test_single_prefill.py 2>&1 | tee "$OUT/tests_single_prefill.log" | tail -8 ;;
    sanitize-prefill) FLASHTILE_BACKEND=triton timeout 170 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:warnings -x \
                tests/test_batch_prefill.py -k "kernel and (ragged_matches or paged_matches or custom_mask or fp8 or rows_outside or long_append or more_queries)" 2>&1 | tail -4 | tee "$OUT/sanitize_prefill.log" ;;
    bench-sampling-final) timeout 200 python3 benchmarks/run.py --suite sampling --out /tmp/bench 2>&1 | tail -1; cp /tmp/bench/sampling.md "$OUT/"; grep "^| " /tmp/bench/sampling.md ;;
    sanitize-sampling) timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:warnings -x \
                tests/test_sampling.py -k "seg and not distribution" 2>&1 | tail -4 | tee "$OUT/sanitize_sampling.log" ;;
    bench-activation) timeout 90 python3 benchmarks/run.py --suite activation --cuda-graph on --out /tmp/bench 2>&1 | tail -1; grep "^| " /tmp/bench/activation.md ;;
    host-profile) timeout 120 python3 benchmarks/host_profile.py 2>&1 | tee "$OUT/host_profile.log" | grep "^|" ;;
    host-profile-old) [ -d old_tree ] && (cd old_tree && timeout 120 python3 benchmarks/host_profile.py 2>&1 | tee "$OUT/host_profile_old.log" | grep "^|") ;;  # an older checkout copied to old_tree/ (untracked), for a same-machine comparison
    tests-small-replay) timeout 300 python3 -m pytest -q -p no:warnings -rf --tb=short tests/test_norm.py tests/test_rope.py tests/test_activation.py tests/test_launch.py 2>&1 | tee "$OUT/tests_small_replay.log" | tail -4 ;;  # without check mode: launch memos replay
    norm-ab-steady) timeout 120 python3 benchmarks/run.py --suite norm --out /tmp/norm_new 2>&1 | tail -1
           [ -d old_tree ] && (cd old_tree && timeout 60 python3 benchmarks/run.py --suite norm --providers flashtile,copy_same_bytes --out /tmp/norm_old 2>&1 | tail -1)
           { echo "### this tree"; cat /tmp/norm_new/norm.md; echo "### old_tree"; cat /tmp/norm_old/norm.md; } > "$OUT/norm_ab.md"; grep -h -e "^###" -e "^| " "$OUT/norm_ab.md" ;;
    tune-small-tiny) timeout 200 python3 benchmarks/tune_small_ops.py --graph-span-us 1000 --rounds 5 --filter "128x" 2>&1 | tee "$OUT/tune_tiny.log" | grep -v "^BEST" ;;  # warps for the latency-bound 128-row cases
    bench-small-flush) timeout 300 python3 benchmarks/run.py --suite norm,qk_norm,activation,rope --cuda-graph auto --graph-span-us 10 --out /tmp/bench_flush 2>&1 | tail -3  # the harness default timing (previous tables)
           cat /tmp/bench_flush/norm.md /tmp/bench_flush/qk_norm.md /tmp/bench_flush/activation.md /tmp/bench_flush/rope.md > "$OUT/small_ops_flush.md"; grep -h "^| " "$OUT/small_ops_flush.md" ;;
    bench-rope) timeout 60 python3 benchmarks/run.py --suite rope --cuda-graph on --out /tmp/bench 2>&1 | tail -1; grep "^| rope" /tmp/bench/rope.md ;;
    bench-launch) timeout 150 python3 benchmarks/run.py --suite small_ops_launch --out /tmp/bench 2>&1 | tail -1; grep "^| " /tmp/bench/small_ops_launch.md
           timeout 60 python3 benchmarks/decode_host_cost.py 2>&1 | tee "$OUT/decode_host_cost.md" | tail -8 ;;
    tests-small) FLASHTILE_CHECK_LAUNCH=1 timeout 300 python3 -m pytest -q -p no:warnings -rf --tb=short tests/test_norm.py tests/test_rope.py tests/test_activation.py tests/test_cascade_merge.py tests/test_intmath.py tests/test_page.py tests/test_launch.py 2>&1 | tee "$OUT/tests_small.log" | tail -8 ;;
  esac
done
