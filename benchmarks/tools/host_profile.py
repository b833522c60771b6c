"""Host time of eager small-op calls at batch 1 (CUDA only): wall time per call, and the Python
functions that take it (cProfile, by own time).

    python -m benchmarks.tools.host_profile [--profile] [--top N]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics

import torch
import triton
import triton.language as tl

import flashtile
from benchmarks.harness import host_overhead_us


@triton.jit
def _empty_kernel(X, n, BLOCK: tl.constexpr):
    pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--profile", action="store_true", help="also print cProfile tables (rmsnorm, rope)")
    args = ap.parse_args()
    dev = "cuda"
    bf = torch.bfloat16
    x, w, r = (torch.randn(1, 4096, dtype=bf, device=dev), torch.randn(4096, dtype=bf, device=dev),
               torch.randn(1, 4096, dtype=bf, device=dev))
    y = torch.randn(1, 2 * 14336, dtype=bf, device=dev)
    q, k = torch.randn(1, 32 * 128, dtype=bf, device=dev), torch.randn(1, 8 * 128, dtype=bf, device=dev)
    cache = torch.randn(4096, 128, device=dev)
    pos = torch.zeros(1, dtype=torch.int64, device=dev)
    cases = {
        "empty triton kernel (2 args)": lambda: _empty_kernel[(1,)](x, 1, BLOCK=16),
        "torch.empty_like": lambda: torch.empty_like(x),
        "rmsnorm": lambda: flashtile.rmsnorm(x, w),
        "fused_add_rmsnorm": lambda: flashtile.fused_add_rmsnorm(x, r, w),
        "silu_and_mul": lambda: flashtile.silu_and_mul(y),
        "rope cos_sin_cache inplace": lambda: flashtile.apply_rope_with_cos_sin_cache_inplace(pos, q, k, 128, cache),
    }
    from flashtile._core import launch

    def with_setting(name):
        def timed(fn, calls):
            launch._state[name] = False  # for the whole timed loop
            try:
                return host_overhead_us(fn, calls)
            finally:
                launch.reset_launch_settings()

        return timed

    modes = {"direct launch + launch memo (default)": host_overhead_us,
             "direct launch, memo off": with_setting("memo"),
             "through Triton's JITFunction.run": with_setting("enabled")}

    # torch's own eager versions of the same math, for scale
    torch_cases = {
        "torch rms_norm": lambda: torch.nn.functional.rms_norm(x, (4096,), w, 1e-6),
        "torch silu*mul": lambda: torch.nn.functional.silu(y[:, :14336]) * y[:, 14336:],
    }
    print(f"torch {torch.__version__}, triton {triton.__version__}")
    print("median of 9 alternating rounds of 300 calls; the columns run interleaved, so CPU clock")
    print("changes hit them alike\n")
    print("| call | " + " | ".join(modes) + " |")
    print("|---" * (len(modes) + 1) + "|")
    for name, fn in {**cases, **torch_cases}.items():
        times = {mode: [] for mode in modes}
        for _ in range(9):
            for mode, timed in modes.items():
                times[mode].append(timed(fn, 300))
        print(f"| {name} | " + " | ".join(f"{statistics.median(t):.1f} us" for t in times.values()) + " |")
    if not args.profile:
        return
    for name in ("rmsnorm", "rope cos_sin_cache inplace"):
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(2000):
            cases[name]()
        prof.disable()
        torch.cuda.synchronize()
        print(f"\n### {name}: top functions by own time (2000 calls)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
