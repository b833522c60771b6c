"""First-call (compile) time of each kernel: cold (empty Triton cache) and from the on-disk cache.

    python -m benchmarks.tools.compile_time            # runs both phases in fresh subprocesses
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

PHASE = r"""
import torch, json, flashtile
from benchmarks.harness import first_call_seconds
torch.zeros(1, device="cuda"); torch.cuda.synchronize()
res = {}
def first(name, fn):
    res[name] = first_call_seconds(fn)
q = torch.randn(32, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(8192, 8, 128, device="cuda", dtype=torch.bfloat16); v = torch.randn_like(k)
first("single_decode (split-KV + merge), d128 bf16", lambda: flashtile.single_decode_with_kv_cache(q, k, v))
qp = torch.randn(2048, 32, 128, device="cuda", dtype=torch.bfloat16)
first("single_prefill causal, d128 bf16",
      lambda: flashtile.single_prefill_with_kv_cache(qp, k[:2048], v[:2048], causal=True))
first("single_prefill non-causal, d128 bf16", lambda: flashtile.single_prefill_with_kv_cache(qp, k[:2048], v[:2048]))
print("JSON" + json.dumps(res))
"""


def run_phase(cache_dir: str) -> dict:
    env = dict(os.environ, TRITON_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", PHASE], env=env, capture_output=True, text=True, check=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("JSON")][-1]
    return json.loads(line[4:])


def main():
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        cold = run_phase(cache)
        warm = run_phase(cache)
    print("| kernel | first call, cold cache (s) | first call, from disk cache (s) |")
    print("|---|---|---|")
    for name in cold:
        print(f"| {name} | {cold[name]:.2f} | {warm[name]:.2f} |")
    print(f"(total {time.perf_counter() - t:.1f} s)")


if __name__ == "__main__":
    main()
