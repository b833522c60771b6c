#!/usr/bin/env bash
# Block-sparse / vector-sparse attention (issue 29) on one GPU, under ~4 minutes: the sparse tests (gpu
# cases included), memcheck on a few kernel cases, then the issue's speed cases (suite "sparse"): flashtile
# against FlashInfer's BlockSparseAttentionWrapper, FlexAttention (block cases) and dense attention over
# the same kept tokens (vector cases), in one process.
# Setup (once per checkout): cp -r ../shared/flashinfer-ref .fi-ref && echo /.fi-ref/ >> .git/info/exclude
# Run from the repo root: OUT=/some/dir bash benchmarks/gpu/sparse.sh   (carry .fi-ref)
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
gpu_header sparse
# FlashInfer's first block-sparse call compiles its prefill kernel with nvcc (up to ~75 s): start it now.
( timeout 200 python3 - > "$OUT/sparse_fi_warm.log" 2>&1 <<'PY'
import torch
try:
    import flashinfer, flashinfer.sparse
except Exception as e:
    raise SystemExit(f"no flashinfer: {e}")
for R, C in ((64, 64), (64, 1)):
    try:
        w = flashinfer.sparse.BlockSparseAttentionWrapper(torch.empty(64 << 20, dtype=torch.uint8, device="cuda"))
        i = lambda *x: torch.tensor(x, dtype=torch.int32, device="cuda")
        w.plan(i(0, 1), i(0), R, C, R, C, 32, 8, 128, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16,
               o_data_type=torch.bfloat16)
        q = torch.randn(R, 32, 128, device="cuda").bfloat16()
        k = torch.randn(C, 8, 128, device="cuda").bfloat16()
        w.run(q, k, k)
        print("warm", R, C)
    except Exception as e:
        print("warm failed", R, C, type(e).__name__, str(e)[:200])
PY
) &
WARM=$!
# The gpu cases (each block shape and feature once, at 520 x 512; variable blocks at 700) and the mapping's
# property tests; the tiny CPU-sized cases run under compute-sanitizer below.
run_tests timeout 100 python3 -m pytest -q -p no:warnings -rf --tb=short -m gpu tests/test_sparse.py 2>&1 \
    | tee "$OUT/sparse_tests.log" | tail -12
run_tests timeout 30 python3 -m pytest -q -p no:warnings tests/test_sparse_map.py 2>&1 | tail -2 | tee -a "$OUT/sparse_tests.log"
run_tests env FLASHTILE_BACKEND=triton timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:warnings \
    -x tests/test_sparse.py -k "kernel and (R1C1 or R16C16 or mask or flag)" 2>&1 | tail -4 | tee "$OUT/sparse_sanitize.log"
wait $WARM; cat "$OUT/sparse_fi_warm.log"
timeout 200 python3 -m benchmarks.run --suite sparse --out /tmp/sparse_bench 2>&1 | tail -3
cp /tmp/sparse_bench/sparse.jsonl /tmp/sparse_bench/sparse.md "$OUT/" 2>/dev/null
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
recs = [json.loads(l) for l in open(out / "sparse.jsonl")]
gpu = recs[0]["gpu"] if recs else "?"
rows = {}
for r in recs:
    rows.setdefault(r["case"], {})[r["provider"]] = r
provs = ["flashtile", "flashinfer", "flex_attention", "dense_ragged"]
lines = [f"Sparse attention on {gpu} (median, cold L2; TFLOP/s over the kept (query, key) pairs)", "",
         "| case | " + " | ".join(f"{p} us (TFLOP/s)" for p in provs) + " | vs flashinfer | vs flex | vs dense | note |",
         "|---|" + "---|" * (len(provs) + 4)]
def cell(r):
    return f"{r['median_us']:.0f} ({r['tflops'] or 0:.0f})" if r and r.get("status") == "ok" else "—"
def ratio(a, b):
    ok = a and b and a.get("status") == "ok" and b.get("status") == "ok"
    return f"{b['median_us'] / a['median_us']:.2f}" if ok else "—"
for case, by in rows.items():
    ft = by.get("flashtile")
    notes = [(ft or {}).get("note") or (ft or {}).get("reason", "")]
    for p in provs[1:]:
        r = by.get(p)
        if r and r.get("status") == "ok" and r.get("max_abs_diff") is not None:
            notes.append(f"{p} maxdiff {r['max_abs_diff']:.3g}")
        elif r and r.get("status") not in (None, "ok"):
            notes.append(f"{p}: {r.get('reason', '')[:60]}")
    lines.append(f"| {case} | " + " | ".join(cell(by.get(p)) for p in provs) + " | "
                 + " | ".join(ratio(ft, by.get(p)) for p in provs[1:]) + " | " + "; ".join(n for n in notes if n) + " |")
text = "\n".join(lines) + "\n\nratios: baseline time / flashtile time (> 1: flashtile faster); vs dense: the issue's >= 0.9 target\n"
print(text)
(out / "sparse_table.md").write_text(text)
PY
