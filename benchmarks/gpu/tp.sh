#!/usr/bin/env bash
# GPU session for issue 32 (tensor parallelism of the example engine), for a machine with several GPUs
# (nvidia-h100-x2 or larger; on one GPU only TP 1 runs). Aimed at ~4 minutes on H100s; every step has a timeout.
#   1. tests/test_tp.py (gloo on CPU, 2 processes) and the demo tests on the GPU;
#   2. the demo at TP 1, 2, 4, 8 (as many as there are GPUs), a 1B-class random model, CUDA-graph decode:
#      decode tokens/s and TTFT per TP size, checked against the PyTorch engine at the largest TP size;
#   3. TP 1 and the largest TP again with --no-cuda-graphs, whose decode steps are eager, so that the share of
#      step time spent in collectives (CUDA events around each all-reduce) covers decode too.
# Writes $OUT/tp_*.json and $OUT/tp_*.log and prints a markdown table. Usage: bash benchmarks/gpu/tp.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/tp_gpu.txt"
SIZE="--model 1b --requests 32 --prompt-len 128:1024 --new-tokens 64 --max-batch 32 --system-len 256"

run_tests timeout 120 python3 -m pytest -q -p no:warnings -rf tests/test_tp.py tests/test_demo.py 2>&1 | tail -4 \
  | tee "$OUT/tp_tests.log"

SIZES=""
for TP in 1 2 4 8; do [ "$TP" -le "$NGPU" ] && SIZES="$SIZES $TP"; done
LARGEST=${SIZES##* }
for TP in $SIZES; do
  MODES="graphs"; { [ "$TP" = 1 ] || [ "$TP" = "$LARGEST" ]; } && MODES="graphs eager"  # eager: TP 1 and largest
  for MODE in $MODES; do
    EXTRA="--no-reference"; [ "$MODE" = eager ] && EXTRA="$EXTRA --no-cuda-graphs"
    [ "$TP" = "$LARGEST" ] && [ "$MODE" = graphs ] && EXTRA=""  # the greedy check once, at the largest TP
    echo "== TP $TP, $MODE"
    timeout 120 torchrun --standalone --nproc-per-node "$TP" -m flashtile demo --tp "$TP" $SIZE $EXTRA \
      --json "$OUT/tp_${TP}_${MODE}.json" > "$OUT/tp_${TP}_${MODE}.log" 2>&1
    echo "exit code: $?"; grep -E "^\| |PASS|FAIL|check" "$OUT/tp_${TP}_${MODE}.log"
  done
done

python3 - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
rows = []
for path in sorted(glob.glob(os.path.join(out, "tp_*_*.json"))):
    d = json.load(open(path))
    mode = path.rsplit("_", 1)[1][:-5]
    name, s = next(iter(d["engines"].items()))
    share = max((r["share"] for r in d.get("ranks", [])), default=0.0)
    rows.append((d.get("tp", 1), mode, s["decode_tokens_per_s"], s["ttft_median_ms"], s["ttft_max_ms"], share))
rows.sort()
base = {m: t for tp, m, t, *_ in rows if tp == 1}
print("| TP | decode | decode tok/s | speed-up vs TP 1 | TTFT median | TTFT max | collectives share (max rank) |")
print("|---|---|---|---|---|---|---|")
for tp, mode, tok, ttft, ttft_max, share in rows:
    up = tok / base[mode] if mode in base else float("nan")
    print(f"| {tp} | {mode} | {tok:.0f} | {up:.2f}x | {ttft:.1f} ms | {ttft_max:.1f} ms | {100 * share:.1f}% |")
print("(graphs: decode in CUDA graphs, whose collectives are not timed: the share covers prefill only;"
      " eager: every step timed)")
json.dump(rows, open(os.path.join(out, "tp_summary.json"), "w"))
PY
