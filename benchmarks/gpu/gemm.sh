#!/usr/bin/env bash
# GEMM (issue 31, items 1-2) on one GPU, under ~4 minutes: the gemm tests on CUDA (CUDA-graph replay
# included), memcheck on a few kernel cases, the Triton 3.6 compile check of the GEMM kernels, then the
# segment_gemm (LoRA / MoE) and bmm_fp8 suites against torch and FlashInfer in the same process.
# Setup (once per checkout): cp -r ../shared/flashinfer-ref .fi-ref && echo /.fi-ref/ >> .git/info/exclude
# Run from the repo root: OUT=/some/dir bash benchmarks/gpu/gemm.sh [tune]   (carry .fi-ref)
# "tune" adds the launch-constant grids of both suites (python -m benchmarks.run --suite X --tune), ~3 more minutes.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if [ -f .fi-ref/device_env.sh ]; then . .fi-ref/device_env.sh || echo "FlashInfer setup failed: baseline skipped"; fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gemm_gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gemm_gpu.txt"
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
timeout 150 python3 -m pytest -q -p no:warnings -rf --tb=short tests/test_gemm.py 2>&1 | tee "$OUT/gemm_tests.log" | tail -12
FLASHTILE_BACKEND=triton timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:warnings -x \
    tests/test_gemm.py -k "kernel and (lora or weight_indices or out_and_views or strided or 33-48-17)" 2>&1 | tail -4 \
    | tee "$OUT/gemm_sanitize.log"
wait $WARM; cat "$OUT/gemm_fi_warm.log"
timeout 150 python3 -m benchmarks.run --suite segment_gemm --suite bmm_fp8 --out /tmp/gemm_bench 2>&1 | tail -3
cp /tmp/gemm_bench/segment_gemm.jsonl /tmp/gemm_bench/segment_gemm.md /tmp/gemm_bench/bmm_fp8.jsonl \
    /tmp/gemm_bench/bmm_fp8.md "$OUT/" 2>/dev/null
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
                cells.append(f"{r['median_us']:.1f} / {r['tflops'] or 0:.0f}")
                if p != "flashtile":
                    best = r["median_us"] if best is None else min(best, r["median_us"])
            else:
                cells.append("— " + ((r or {}).get("reason", "") or "")[:40])
        ft = by.get("flashtile")
        sp = f"{best / ft['median_us']:.2f}" if best and ft and ft.get("status") == "ok" else "—"
        diffs = ", ".join(f"{p} {by[p]['max_abs_diff']:.3g}" for p in provs
                          if p in by and by[p].get("max_abs_diff") is not None)
        text.append(f"| {case} | " + " | ".join(cells) + f" | {sp} | {diffs} |")
    text.append("")
print("\n".join(text))
(out / "gemm_table.md").write_text("\n".join(text) + "\n")
PY
if [ "${1:-}" = tune ]; then
  timeout 100 python3 -m benchmarks.run --suite segment_gemm --tune --filter moe --out "$OUT" 2>&1 | tail -12 | tee "$OUT/gemm_tune.log"
  timeout 100 python3 -m benchmarks.run --suite bmm_fp8 --tune --out "$OUT" 2>&1 | tail -12 | tee -a "$OUT/gemm_tune.log"
fi
