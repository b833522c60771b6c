#!/usr/bin/env bash
# GEMM (issue 31, items 1-2) on one GPU, ~5-6 minutes (at most ~10 by the timeouts): the gemm tests on CUDA (CUDA-graph replay
# included), memcheck on a few kernel cases, then the segment_gemm (LoRA / MoE) and bmm_fp8 suites:
# flashtile and the torch baselines in one process, FlashInfer in separate processes (its MoE kernel
# once died of an illegal instruction and took the whole suite with it), one per part of the suite.
# Setup (once per checkout): cp -r ../shared/flashinfer-ref .fi-ref && echo /.fi-ref/ >> .git/info/exclude
# Run from the repo root: OUT=/some/dir bash benchmarks/gpu/gemm.sh        (carry .fi-ref)
#                     or: OUT=/some/dir bash benchmarks/gpu/gemm.sh tune [GRIDS]   (only tuning grids: segment_gemm's
# shrink / expand / moe grids, python -m benchmarks.run --suite segment_gemm --tune GRID, each in its own process
# and folder $OUT/tune_GRID, and fp8 = bmm_fp8's grid; GRIDS comma-separated, default all, ~11 minutes in all, so
# split it over two calls of the 10-minute limit: "tune shrink,expand,fp8" (~5 min) and "tune moe" (~5 min))
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [ "${1:-}" = tune ]; then
  nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gemm_gpu.txt"
  for g in $(echo "${2:-shrink,expand,moe,fp8}" | tr , ' '); do
    if [ "$g" = fp8 ]; then
      timeout 90 python3 -m benchmarks.run --suite bmm_fp8 --tune --out "$OUT/tune_fp8" 2>&1 | tail -12 \
        | tee "$OUT/gemm_tune_fp8.log"
      continue
    fi
    # ~2 minutes each for shrink and expand; ~5 for moe (13 large kernels to compile per case)
    timeout $([ "$g" = moe ] && echo 330 || echo 150) python3 -m benchmarks.run --suite segment_gemm --tune "$g" \
      --out "$OUT/tune_$g" 2>&1 | tee "$OUT/gemm_tune_$g.log" | grep -v "^\[segment_gemm tune\]" | tail -30
  done
  exit 0
fi
gpu_header gemm
# FlashInfer's first segment-GEMM / bmm_fp8 call may JIT-compile (nvcc): start it in the background now.
( timeout 200 python3 - > "$OUT/gemm_fi_warm.log" 2>&1 <<'PY'
import torch
try:
    import flashinfer, flashinfer.gemm
except Exception as e:
    raise SystemExit(f"no flashinfer: {e}")
try:
    w = flashinfer.gemm.SegmentGEMMWrapper(torch.empty(128 << 20, dtype=torch.int8, device="cuda"))
    x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    ws = torch.randn(2, 32, 64, device="cuda", dtype=torch.bfloat16)
    w.run(x, ws, 2, True, seg_lens=torch.tensor([3, 5], device="cuda"))
    print("warm segment gemm")
except Exception as e:
    print("warm segment gemm failed", type(e).__name__, str(e)[:200])
try:
    a = torch.randn(1, 16, 64, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(1, 32, 64, device="cuda").to(torch.float8_e4m3fn).transpose(-2, -1)
    s = torch.tensor(1.0, device="cuda")
    flashinfer.bmm_fp8(a, b, s, s, torch.bfloat16)
    print("warm bmm_fp8")
except Exception as e:
    print("warm bmm_fp8 failed", type(e).__name__, str(e)[:200])
PY
) &
WARM=$!
run_tests timeout 150 python3 -m pytest -q -p no:warnings -rf --tb=short tests/test_gemm.py 2>&1 | tee "$OUT/gemm_tests.log" | tail -12
run_tests env FLASHTILE_BACKEND=triton timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:warnings -x \
    tests/test_gemm.py -k "kernel and (lora or weight_indices or out_and_views or strided or 33-48-17 or split_k)" 2>&1 | tail -4 \
    | tee "$OUT/gemm_sanitize.log"
wait $WARM; cat "$OUT/gemm_fi_warm.log"
rm -rf /tmp/gemm_bench*
timeout 150 python3 -m benchmarks.run --suite segment_gemm --suite bmm_fp8 \
    --providers flashtile,torch_loop,torch_grouped_mm,torch_scaled_mm --out /tmp/gemm_bench 2>&1 | tail -3
# FlashInfer: LoRA cases, each MoE case and bmm_fp8, each part in its own process (a crash loses only that part)
i=0
for part in "90 segment_gemm lora" "60 bmm_fp8 x" "60 segment_gemm moe 8x" "60 segment_gemm moe 64x"; do
  i=$((i + 1)); set -- $part; limit=$1; suite=$2; shift 2
  timeout "$limit" python3 -m benchmarks.run --suite "$suite" --providers flashinfer --filter "$*" \
      --out /tmp/gemm_bench_fi$i 2>&1 | tail -2 || echo "FlashInfer $part: exit $?"
done
for suite in segment_gemm bmm_fp8; do
  cat /tmp/gemm_bench/$suite.jsonl /tmp/gemm_bench_fi*/$suite.jsonl > "$OUT/$suite.jsonl" 2>/dev/null
  cp /tmp/gemm_bench/$suite.md "$OUT/" 2>/dev/null
done
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
text = []
for suite in ("segment_gemm", "bmm_fp8"):
    path = out / f"{suite}.jsonl"
    if not path.exists():
        text.append(f"{suite}: no results")
        continue
    recs = [json.loads(l) for l in open(path)]
    provs = list(dict.fromkeys(r["provider"] for r in recs))
    rows = {}
    for r in recs:
        rows.setdefault(r["case"], {})[r["provider"]] = r
    gpu = recs[0]["gpu"] if recs else "?"
    text += [f"{suite} on {gpu} (median us / TFLOP/s, cold L2)", "",
             "| case | " + " | ".join(provs) + " | flashtile / best | max abs diff |",
             "|---" * (len(provs) + 3) + "|"]
    for case, by in rows.items():
        cells, best = [], None
        for p in provs:
            r = by.get(p)
            if r and r.get("status") == "ok":
                graph = "g" if r.get("timing") == "cuda_graph" else ""
                cells.append(f"{r['median_us']:.1f}{graph} / {r['tflops'] or 0:.0f}")
                if p != "flashtile":
                    best = r["median_us"] if best is None else min(best, r["median_us"])
            else:
                cells.append("— " + ((r or {}).get("reason", "") or "")[:40])
        ft = by.get("flashtile")
        sp = f"{best / ft['median_us']:.2f}" if best and ft and ft.get("status") == "ok" else "—"
        diffs = ", ".join(f"{p} {by[p]['max_abs_diff']:.3g}" for p in provs
                          if p in by and by[p].get("max_abs_diff") is not None)
        text.append(f"| {case} | " + " | ".join(cells) + f" | {sp} | {diffs} |")
    text += ["", "g: timed as CUDA-graph replays (under 100 us eager); — with no reason: the provider's process died",
             "(FlashInfer runs in separate processes, so it has no max abs diff)", ""]
print("\n".join(text))
(out / "gemm_table.md").write_text("\n".join(text) + "\n")
PY
