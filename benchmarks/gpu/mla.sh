#!/usr/bin/env bash
# MLA (issue 26) on one GPU, under ~8 minutes: the MLA tests (CUDA-graph capture / re-plan / replay
# included), the Gluon kernel's tests, memcheck on a few kernel cases, then the issue's speed cases against
# FlashInfer's MLA wrapper in the same process (flashtile's default, the Gluon kernel on Hopper where it applies,
# and the Triton kernel as provider flashtile_triton; DeepSeek prefill d192/128 listed beside them).
# Setup (once per checkout): cp -r ../shared/flashinfer-ref .fi-ref && echo /.fi-ref/ >> .git/info/exclude
# Run from the repo root: OUT=/some/dir bash benchmarks/gpu/mla.sh [tune]   (carry .fi-ref)
# "gluon" times the Gluon kernel's OVERLAP_LOGITS and a one- or two-programs-per-SM split plan on its cases;
# "tune" adds the launch-config grid of the mla suite (python -m benchmarks.run --suite mla --tune); "focus" its
# 7-shape grid per page-64 case (--tune focus, about 3 minutes); "split" the split planner's programs-per-SM
# target on every case (--tune split, about 2 minutes) and the kernels of one call of two h128 cases with and
# without splits (benchmarks/tools/kernel_breakdown.py).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
gpu_header mla
# FlashInfer's first MLA call compiles with nvcc (tens of seconds): start it in the background now.
( timeout 200 python3 - > "$OUT/mla_fi_warm.log" 2>&1 <<'PY'
import torch, math
try:
    import flashinfer
except Exception as e:
    raise SystemExit(f"no flashinfer: {e}")
for kv_dt in (torch.bfloat16, torch.float8_e4m3fn):
    try:
        w = flashinfer.mla.BatchMLAPagedAttentionWrapper(torch.empty(64 << 20, dtype=torch.uint8, device="cuda"))
        i = lambda *x: torch.tensor(x, dtype=torch.int32, device="cuda")
        w.plan(i(0, 1), i(0, 1), i(0), i(1), 16, 512, 64, 1, True, 0.07, torch.bfloat16, kv_dt)
        w.run(torch.randn(1, 16, 512, device="cuda").bfloat16(), torch.randn(1, 16, 64, device="cuda").bfloat16(),
              torch.randn(1, 1, 512, device="cuda").to(kv_dt), torch.randn(1, 1, 64, device="cuda").to(kv_dt))
        print("warm", kv_dt)
    except Exception as e:
        print("warm failed", kv_dt, type(e).__name__, str(e)[:200])
PY
) &
WARM=$!
run_tests env FLASHTILE_CHECK_LAUNCH=1 timeout 150 python3 -m pytest -q -n 8 -p no:warnings -rf --tb=short tests/test_mla.py 2>&1 | tee "$OUT/mla_tests.log" | tail -12
# The Gluon kernel's own tests, under their own limit (a hang costs 240 s, not the run); -v names what passed
# when the limit cuts the file (its float64 oracle of the long requests is slow on the CPU).
run_tests env FLASHTILE_CHECK_LAUNCH=1 timeout -k 10 240 python3 -m pytest -n 6 -v -p no:warnings -rf --tb=short \
    tests/test_mla_hopper.py 2>&1 | tee "$OUT/mla_hopper_tests.log" | grep -E "FAILED|ERROR|passed|failed" | tail -12
run_tests env FLASHTILE_BACKEND=triton timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:warnings -x \
    tests/test_mla.py -k "kernel and (qo_lens1 or qo_lens2 or fp8 or split)" 2>&1 | tail -4 | tee "$OUT/mla_sanitize.log"
wait $WARM; cat "$OUT/mla_fi_warm.log"
timeout 150 python3 -m benchmarks.run --suite mla --out /tmp/mla_bench 2>&1 | tail -3
timeout 45 python3 -m benchmarks.run --suite batch_prefill --filter d192 --out /tmp/mla_bench 2>&1 | tail -2
cp /tmp/mla_bench/mla.jsonl /tmp/mla_bench/mla.md "$OUT/" 2>/dev/null
cp /tmp/mla_bench/batch_prefill.md "$OUT/mla_deepseek_prefill.md" 2>/dev/null
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
recs = [json.loads(l) for l in open(out / "mla.jsonl")]
gpu = recs[0]["gpu"] if recs else "?"
rows = {}
for r in recs:
    rows.setdefault(r["case"], {})[r["provider"]] = r
lines = [f"MLA on {gpu} (median, cold L2)", "",
         "| case | flashtile us | TB/s | TFLOP/s | flashinfer us | TB/s | TFLOP/s | speedup | triton kernel us | TFLOP/s "
         "| triton speedup | note |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
def cells(r):
    if not r or r.get("status") != "ok":
        return ["—", "—", "—"]
    return [f"{r['median_us']:.1f}", f"{(r['gbps'] or 0) / 1e3:.2f}", f"{r['tflops'] or 0:.0f}"]
for case, by in rows.items():
    ft, fi = by.get("flashtile"), by.get("flashinfer")
    sp = (f"{fi['median_us'] / ft['median_us']:.2f}" if ft and fi and ft.get("status") == "ok"
          and fi.get("status") == "ok" else "—")
    note = (ft or {}).get("note") or (ft or {}).get("reason", "")
    if fi and fi.get("status") != "ok":
        note += f"; flashinfer: {fi.get('reason', '')[:80]}"
    if ft and fi and "max_abs_diff" in fi:
        note += f"; max|diff| {fi['max_abs_diff']:.3g}"
    gl = by.get("flashtile_triton")
    gsp = (f"{fi['median_us'] / gl['median_us']:.2f}" if gl and fi and gl.get("status") == "ok"
           and fi.get("status") == "ok" else "—")
    if gl and "max_abs_diff" in gl:
        note += f"; triton max|diff| {gl['max_abs_diff']:.3g}"
    lines.append(f"| {case} | " + " | ".join(cells(ft) + cells(fi)) + f" | {sp} | "
                 + " | ".join([cells(gl)[0], cells(gl)[2]]) + f" | {gsp} | {note} |")
text = "\n".join(lines)
print(text)
(out / "mla_table.md").write_text(text + "\n")
PY
if [ "${1:-}" = tune ]; then timeout 300 python3 -m benchmarks.run --suite mla --tune --filter h128 --out "$OUT" 2>&1 \
  | tail -40 | tee "$OUT/mla_tune.log"; fi
if [ "${1:-}" = focus ]; then timeout 300 python3 -m benchmarks.run --suite mla --tune focus --out "$OUT" 2>&1 \
  | tail -40 | tee "$OUT/mla_tune.log"; fi
if [ "${1:-}" = gluon ]; then timeout 300 python3 -m benchmarks.run --suite mla --tune gluon --providers flashtile \
  --out "$OUT" 2>&1 | tail -30 | tee "$OUT/mla_tune.log"; fi
if [ "${1:-}" = split ]; then
  timeout 200 python3 -m benchmarks.run --suite mla --tune split --providers flashtile --out "$OUT" 2>&1 \
    | tail -24 | tee "$OUT/mla_split.log"
  timeout 90 python3 -m benchmarks.tools.kernel_breakdown --suite mla --filter '64x4096 h128 p64$|1x32768 h128 p64$' \
    --providers flashtile,flashtile_no_split 2>&1 | tail -40 | tee "$OUT/mla_breakdown.log"
fi
