"""Sweep the warps of the norm and activation kernels (elements per warp) and the activation's
columns per program on the norm and activation suites' cases (CUDA-graph replays); prints GB/s.

    python benchmarks/tune_small_ops.py
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.bench_small_ops import _flashtile, activation_cases, norm_cases  # noqa: E402
from benchmarks.harness import measure  # noqa: E402


def _sweep(module, config_fn, cases, settings):
    default = {name: getattr(module, name) for name in settings[0]}
    for case in cases:
        rows = []
        for setting in settings:
            for name, value in setting.items():
                setattr(module, name, value)
            config_fn.cache_clear()
            try:
                torch.manual_seed(0)
                us = measure(_flashtile(case), cuda_graph="on")["median_us"]
                rows.append((us, setting))
            finally:
                for name, value in default.items():
                    setattr(module, name, value)
                config_fn.cache_clear()
        rows.sort(key=lambda r: r[0])
        for us, setting in rows:
            print(f"{case.name:<44} {setting}  {us:7.1f} us {case.bytes / us / 1e3:6.0f} GB/s")
        print(f"BEST {case.name}: {rows[0][1]} {rows[0][0]:.1f} us (default {default})", flush=True)


def main() -> None:
    import flashtile.kernels.activation as act
    import flashtile.kernels.norm as norm

    _sweep(norm, norm.norm_config, norm_cases(False), [dict(ELEMS_PER_WARP=e) for e in (256, 512, 1024, 2048)])
    _sweep(act, act.act_config, [c for c in activation_cases(False) if "silu" in c.name],
           [dict(MAX_BLOCK_D=b, ELEMS_PER_WARP=e) for b in (1024, 2048, 4096) for e in (256, 512, 1024)])


if __name__ == "__main__":
    main()
