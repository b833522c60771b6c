"""First-call time of a new attention variant: cold (empty Triton cache, new process) and from the on-disk
cache (new process, same cache). Prints a markdown table; ``--json PATH`` also writes the numbers.

Each measurement runs in a fresh Python process so that nothing is compiled or loaded in memory before it.
CUDA is initialized and the inputs are made first; then two calls are timed: the process's first flashtile
call of the same kind without a variant (its own kernel compiled or loaded, plus what any process pays once:
Triton's driver, flashtile's kernel modules), and then the first call with the variant, whose kernel is the
new one: the cost of a new variant in a process that already runs flashtile.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r'''
import sys, time, torch, triton, triton.language as tl
sys.path.insert(0, {root!r})
import flashtile
from flashtile import AttentionVariant

@triton.jit
def logits(qk, sm_scale, batch, qo_idx, kv_idx, qo_head, kv_head, qo_len, kv_len, args):
    return qk * sm_scale + {salt} * 0.0 - 1.0 / (1.0 + tl.abs(qk))

variant = AttentionVariant("compile_probe", logits_transform=logits)
kind = {kind!r}
q = torch.randn(512, 32, 128, dtype=torch.bfloat16, device="cuda")
k = torch.randn(512, 8, 128, dtype=torch.bfloat16, device="cuda")
v = torch.randn_like(k)
torch.cuda.synchronize()
t0 = time.perf_counter()
if kind == "decode":
    flashtile.single_decode_with_kv_cache(q[0], k, v)
else:
    flashtile.single_prefill_with_kv_cache(q, k, v, causal=True)
torch.cuda.synchronize()
plain = time.perf_counter() - t0
t0 = time.perf_counter()
if kind == "decode":
    flashtile.single_decode_with_kv_cache(q[0], k, v, _variant=(variant, ()))
else:
    flashtile.single_prefill_with_kv_cache(q, k, v, causal=True, _variant=(variant, ()))
torch.cuda.synchronize()
first = time.perf_counter() - t0
t0 = time.perf_counter()
for _ in range(3):
    if kind == "decode":
        flashtile.single_decode_with_kv_cache(q[0], k, v, _variant=(variant, ()))
    else:
        flashtile.single_prefill_with_kv_cache(q, k, v, causal=True, _variant=(variant, ()))
torch.cuda.synchronize()
print(plain, first, (time.perf_counter() - t0) / 3)
'''


def run(kind: str, cache: str, salt: int) -> tuple:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_CACHE_DIR=cache)
    # a file, not ``python -c``: triton.jit reads the hook's source from its file
    script = os.path.join(cache, f"variant_probe_{kind}.py")
    with open(script, "w") as f:
        f.write(CHILD.format(root=root, kind=kind, salt=salt))
    out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    plain, first, steady = map(float, out.stdout.split()[-3:])
    return plain, first, steady


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    salt = os.getpid()
    for kind in ("prefill", "decode"):
        with tempfile.TemporaryDirectory() as cache:
            plain_cold, cold, steady = run(kind, cache, salt)
            plain_warm, warm, _ = run(kind, cache, salt)
        rows.append(dict(kind=kind, plain_cold_s=plain_cold, cold_s=cold, plain_from_cache_s=plain_warm,
                         from_cache_s=warm, later_call_s=steady))
    print("| first call | variant, cold (empty cache) | variant, from cache (new process) | later variant calls "
          "| process's first plain call: cold / from cache |")
    print("|---|---|---|---|---|")
    for r in rows:
        later_ms = r["later_call_s"] * 1e3
        print(f"| single {r['kind']} | {r['cold_s']:.2f} s | {r['from_cache_s']:.3f} s | {later_ms:.2f} ms "
              f"| {r['plain_cold_s']:.2f} s / {r['plain_from_cache_s']:.3f} s |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
