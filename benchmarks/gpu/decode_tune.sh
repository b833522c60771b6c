#!/usr/bin/env bash
# Decode launch configs per card (issue 27, flashtile/_core/decode_tune.py), on one H100 or H200, in ~8 minutes
# (the tune sweep stops starting case groups after ~7.5 minutes):
#  1. the card's facts (what decode_tune chooses by) and its measured read ceiling: a large read-only
#     reduction (torch.sum over 4 GiB) and a device-to-device copy (2 GiB each way);
#  2. the decode GPU tests (batch decode, single decode, the tune table);
#  3. the batch_decode suite against FlashInfer (use_tensor_cores False and True) with the card's entry, and the
#     single_decode suite against FlashInfer;
#  4. the tune sweep (batch_decode --tune launch,splits): the best tile per case and per padded head dim, printed
#     as a DecodeTile line to paste into TUNE_TABLE for this card.
# Setup (once per checkout): cp -r ../shared/flashinfer-ref .fi-ref && echo /.fi-ref/ >> .git/info/exclude
# Run from the repo root: OUT=/some/dir bash benchmarks/gpu/decode_tune.sh [notune | demo]   (carry .fi-ref)
# demo: only the d64 cases and the demo case's sweep; its best tile goes to /tmp/decode_best_d64.txt.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
gpu_header decode
# FlashInfer compiles each decode variant with nvcc on first use (10-20 s each): warm them in the background now.
# (demo mode: head dim 64, bf16, only the batch variants)
( timeout 240 nice -n 10 python3 - "${1:-}" > "$OUT/decode_fi_warm.log" 2>&1 <<'PY'
import sys, torch
demo = sys.argv[1:] == ["demo"]
try:
    import flashinfer
except Exception as e:
    raise SystemExit(f"no flashinfer: {e}")
i = lambda *x: torch.tensor(x, dtype=torch.int32, device="cuda")
for d in (64,) if demo else (128, 64, 256):
    for kv in (torch.bfloat16, torch.float8_e4m3fn):
        for tc in (False, True):
            if kv != torch.bfloat16 and d != 128:
                continue
            try:
                w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(torch.empty(32 << 20, dtype=torch.uint8,
                                                                  device="cuda"), "NHD", use_tensor_cores=tc)
                w.plan(i(0, 1), i(0), i(16), 32, 8, d, 16, q_data_type=torch.bfloat16, kv_data_type=kv)
                w.run(torch.randn(1, 32, d, device="cuda").bfloat16(), torch.randn(1, 2, 16, 8, d, device="cuda").to(kv))
                print("warm", d, kv, tc, flush=True)
            except Exception as e:
                print("warm failed", d, kv, tc, type(e).__name__, str(e)[:200], flush=True)
for d, dt in () if demo else ((128, torch.bfloat16), (64, torch.bfloat16), (256, torch.bfloat16), (128, torch.float16)):
    try:
        k = torch.randn(16, 8, d, device="cuda", dtype=dt)
        flashinfer.single_decode_with_kv_cache(torch.randn(32, d, device="cuda", dtype=dt), k, k)
        print("warm single", d, dt, flush=True)
    except Exception as e:
        print("warm single failed", d, dt, type(e).__name__, str(e)[:200], flush=True)
PY
) &
WARM=$!

# 1. Card facts and read ceiling.
timeout 60 python3 - "$OUT" <<'PY' | tee -a "$OUT/decode_gpu.txt"
import json, sys, torch, triton
from flashtile._core import decode_tune
from flashtile._core.device import device_facts
dev = torch.device("cuda")
facts = device_facts(dev)
key, entry = decode_tune.card_entry(facts)
print("torch", torch.__version__, "triton", triton.__version__)
print(f"facts: {facts}; tune entry: {key} ({entry.status})")
def median_ms(fn, reps=20):
    fn(); torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]
x = torch.ones(2 << 30, dtype=torch.bfloat16, device=dev)  # 4 GiB
sum_gbps = x.numel() * 2 / median_ms(lambda: x.sum(dtype=torch.float32)) / 1e6
del x
src = torch.empty(1 << 30, dtype=torch.bfloat16, device=dev); dst = torch.empty_like(src)  # 2 GiB each
copy_gbps = 2 * src.numel() * 2 / median_ms(lambda: dst.copy_(src)) / 1e6
print(f"read ceiling: sum {sum_gbps:.0f} GB/s (read-only), copy {copy_gbps:.0f} GB/s (read + write)")
json.dump(dict(gpu=torch.cuda.get_device_name(), facts=facts._asdict(), entry=key, status=entry.status,
               sum_gbps=sum_gbps, copy_gbps=copy_gbps), open(f"{sys.argv[1]}/decode_ceiling.json", "w"))
PY

# 2. Decode GPU tests.
run_tests timeout 150 python3 -m pytest -q -p no:warnings -rf --tb=short tests/test_decode_tune.py tests/test_batch_decode.py \
    tests/test_single_decode.py 2>&1 | tee "$OUT/decode_tests.log" | tail -8

# 3. The batch_decode suite with the card's entry, against FlashInfer (both paths); single decode beside it.
# "demo": the d64 cases only (the demo's model, issue 28), and the sweep of the demo's case.
FILTER=(); TUNE_CASES=("64 x 2048 h32/8 d64" "64 x 4096 h32/8" "1 x 32768 h32/8" "16 x 4096" "256 x 2048" "128 x 8192"
                      "64 x 4096 h32/32")
[ "${1:-}" = demo ] && { FILTER=(--filter d64); TUNE_CASES=("64 x 2048 h32/8 d64"); }
# DECODE_TUNE_CASES="case|case|...": sweep these case groups instead, in this order (e.g. on a card whose d64 entry
# is already measured)
[ -n "${DECODE_TUNE_CASES:-}" ] && IFS='|' read -r -a TUNE_CASES <<< "$DECODE_TUNE_CASES"
wait $WARM; cat "$OUT/decode_fi_warm.log"
timeout 150 python3 -m benchmarks.run --suite batch_decode --providers flashtile,flashinfer,flashinfer_tc \
    "${FILTER[@]}" --out "$OUT" 2>&1 | tail -3
[ "${1:-}" != demo ] && timeout 90 python3 -m benchmarks.run --suite single_decode --providers flashtile,flashinfer \
    --out "$OUT" 2>&1 | tail -3

# 4. The tune sweep, one case group per run (each run writes its results when it ends), while time is left:
# the demo's d64 case first (issue 28), then d128, then d64 / d256 at 1 x 32k; later groups reuse the compiled kernels.
if [ "${1:-}" != notune ]; then
  : > "$OUT/batch_decode.tune.jsonl"; : > "$OUT/batch_decode.tune.md"
  for f in "${TUNE_CASES[@]}"; do
    left=$(( 470 - SECONDS ))
    if [ $left -lt 30 ]; then echo "tune: no time left for '$f'" | tee -a "$OUT/decode_tune.log"; continue; fi
    rm -rf /tmp/decode_tune_part
    timeout $left python3 -m benchmarks.run --suite batch_decode --tune launch,splits --filter "$f" \
      --out /tmp/decode_tune_part 2>&1 | tail -2 | tee -a "$OUT/decode_tune.log"
    cat /tmp/decode_tune_part/batch_decode.tune.jsonl >> "$OUT/batch_decode.tune.jsonl" 2>/dev/null
    cat /tmp/decode_tune_part/batch_decode.tune.md >> "$OUT/batch_decode.tune.md" 2>/dev/null
  done
  # the demo case's fastest tile as "block_n,warps,stages,prefetch" in /tmp/decode_best_d64.txt (empty: the table's
  # tile won), for a later script of the same call (demo.sh profile times the demo with it)
  python3 -m benchmarks.tools.decode_tile best "$OUT/batch_decode.tune.jsonl" "64 x 2048 h32/8 d64" \
    > /tmp/decode_best_d64.txt 2>/dev/null && echo "demo case: best tile $(cat /tmp/decode_best_d64.txt)"
fi

python3 - "$OUT" <<'PY'
import json, math, pathlib, sys
out = pathlib.Path(sys.argv[1])
try:
    ceiling = json.load(open(out / "decode_ceiling.json"))
except OSError:
    ceiling = {}
read = ceiling.get("sum_gbps")
lines = [f"# Batch decode on {ceiling.get('gpu', '?')} (tune entry {ceiling.get('entry')}, {ceiling.get('status')})", "",
         f"Read ceiling: sum {read or 0:.0f} GB/s, copy {ceiling.get('copy_gbps') or 0:.0f} GB/s.", "",
         "| case | flashtile TB/s | flashinfer TB/s | flashinfer_tc TB/s | ft / best FI | ft / read ceiling | note |",
         "|---|---|---|---|---|---|---|"]
rows = {}
path = out / "batch_decode.jsonl"
for line in (open(path) if path.exists() else []):
    r = json.loads(line)
    rows.setdefault(r["case"], {})[r["provider"]] = r
def gbps(r):
    return r["gbps"] if r and r.get("status") == "ok" and r.get("gbps") else None
for case, by in rows.items():
    ft, fi, tc = (gbps(by.get(p)) for p in ("flashtile", "flashinfer", "flashinfer_tc"))
    best = max([v for v in (fi, tc) if v] or [0])
    cell = lambda v: f"{v / 1e3:.2f}" if v else "—"
    lines.append(f"| {case} | {cell(ft)} | {cell(fi)} | {cell(tc)} | "
                 f"{f'{ft / best:.2f}' if ft and best else '—'} | {f'{ft / read:.2f}' if ft and read else '—'} | "
                 f"{(by.get('flashtile') or {}).get('note') or ''} |")
tune = out / "batch_decode.tune.jsonl"
if tune.exists():
    recs = [json.loads(l) for l in open(tune)]
    by_case = {}
    for r in recs:
        if r.get("status") == "ok" and "BATCH_PROGRAMS" not in r["setting"] and "int32_offsets=True" not in r["setting"]:
            by_case.setdefault(r["case"], {})[r["setting"]] = r["median_us"]
    groups = {}
    for case, times in by_case.items():
        d = "d64" if "d64" in case else "d256" if "d256" in case else "d128"
        groups.setdefault(d, []).append(times)
    lines += ["", "## Best tile per padded head dim (geometric mean of time / case's best, launch grid)", "",
              "| head dim | best setting | mean slowdown vs each case's best | default's |", "|---|---|---|---|"]
    for d, cases in sorted(groups.items()):
        common = set.intersection(*(set(t) for t in cases))
        score = {s: math.exp(sum(math.log(t[s] / min(t.values())) for t in cases) / len(cases)) for s in common}
        best = min(score, key=score.get)
        lines.append(f"| {d} | {best} | {score[best]:.3f} | {score.get('default', float('nan')):.3f} |")
    lines += ["", "Paste the winners into flashtile/_core/decode_tune.py's TUNE_TABLE entry for this card "
              "(status \"measured\"); per-case tables: batch_decode.tune.md."]
text = "\n".join(lines)
print(text)
(out / "decode_table.md").write_text(text + "\n")
PY
[ -f "$OUT/single_decode.md" ] && cat "$OUT/single_decode.md"
[ -s "$OUT/batch_decode.tune.md" ] && echo "Per-case tune tables: $OUT/batch_decode.tune.md"
exit 0
