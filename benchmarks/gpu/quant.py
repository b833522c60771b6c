"""FP8 / FP4 quantization on one GPU (issue 31, item 3): FlashInfer cross-checks and timings.

Run from the repo root: ``OUT=dir python3 -m benchmarks.gpu.quant`` (``benchmarks/gpu/quant.sh`` runs
the gpu tests first). Prints a markdown table and writes ``$OUT/quant.json``.

1. FlashInfer's dequantizer (``e2m1_and_ufp8sf_scale_to_float``, ``mxfp4_dequantize``) on flashtile's
   packed values and swizzled scales must give flashtile's dequantized values bit for bit.
2. FlashInfer's ``fp4_quantize`` / ``mxfp4_quantize`` bytes against flashtile's where they are produced
   (its e2m1 conversion is an SM100 instruction: on Hopper it stores zeros, reported as such).
3. Timings (8192 x 4096 bf16): flashtile's quantizers (vectorized PyTorch) and, where they run,
   FlashInfer's; plus a plain torch FP8 cast as the floor for the FP8 path.
"""

from __future__ import annotations

import json
import os
import pathlib

import torch

import flashtile
from benchmarks.harness import Unavailable, import_flashinfer, measure
from flashtile.quantization import SfLayout


def _fi():
    try:
        return import_flashinfer()
    except Unavailable as e:
        print(f"FlashInfer: {e}")
        return None


def main() -> None:
    out = pathlib.Path(os.environ.get("OUT", "gpu_out"))
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()  # without one: a smoke run of this script at a small shape
    dev = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else "cpu (smoke run)"
    m, k = (8192, 4096) if cuda else (256, 256)
    fi = _fi()
    torch.manual_seed(0)
    x = (torch.randn(m, k, device=dev) * torch.exp2(torch.randint(-6, 6, (m, k), device=dev))).bfloat16()
    gs = (448 * 6 / x.float().abs().max()).reshape(1)
    checks: dict = {}
    q, sf = flashtile.nvfp4_quantize(x, gs)
    mq, msf = flashtile.mxfp4_quantize(x)
    ours_nv = flashtile.e2m1_and_ufp8sf_scale_to_float(q, sf, 1 / gs)
    ours_mx = flashtile.mxfp4_dequantize(mq, msf)
    if fi is not None:
        for label, fn in (
            ("fi_dequant_nvfp4", lambda: fi.e2m1_and_ufp8sf_scale_to_float(q.cpu(), sf.cpu().reshape(-1),
                                                                            (1 / gs).cpu(), 16, 1, True)),
            ("fi_dequant_mxfp4", lambda: fi.mxfp4_dequantize(mq, msf)),
        ):
            try:
                theirs = fn().to(dev)
                want = ours_nv if "nv" in label else ours_mx
                checks[label] = dict(equal=bool(torch.equal(theirs, want)),
                                     max_abs_diff=float((theirs - want).abs().nan_to_num().max()))
            except Exception as e:
                checks[label] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
        for label, fn, ref in (
            ("fi_quant_nvfp4", lambda: fi.fp4_quantize(x, gs), (q, sf)),
            ("fi_quant_mxfp4", lambda: fi.mxfp4_quantize(x), (mq, msf)),
        ):
            try:
                tq, tsf = fn()
                tq, tsf = tq.view(torch.uint8), tsf.view(torch.uint8).reshape(ref[1].shape)
                if not tq.any():
                    checks[label] = dict(note="FlashInfer stored zeros (its e2m1 conversion needs SM100)")
                else:
                    checks[label] = dict(q_mismatch=float((tq != ref[0]).float().mean()),
                                         sf_mismatch=float((tsf != ref[1]).float().mean()))
            except Exception as e:
                checks[label] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")

    def fp8_torch():
        s = x.float().abs().amax() / 448.0
        return (x.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn), s

    cases = [
        ("nvfp4_quantize 128x4", "flashtile", lambda: flashtile.nvfp4_quantize(x, gs)),
        ("nvfp4_quantize linear", "flashtile", lambda: flashtile.nvfp4_quantize(x, gs, SfLayout.layout_linear)),
        ("mxfp4_quantize 128x4", "flashtile", lambda: flashtile.mxfp4_quantize(x)),
        ("e2m1_and_ufp8sf_scale_to_float", "flashtile",
         lambda: flashtile.e2m1_and_ufp8sf_scale_to_float(q, sf, 1 / gs)),
        ("fp8_quantize per tensor", "flashtile", lambda: flashtile.quantization.fp8_quantize(x)),
        ("fp8_quantize per token", "flashtile", lambda: flashtile.quantization.fp8_quantize(x, per_token=True)),
        ("fp8_quantize per tensor", "torch ops", fp8_torch),
    ]
    if fi is not None:
        cases += [("nvfp4_quantize 128x4", "FlashInfer", lambda: fi.fp4_quantize(x, gs)),
                  ("mxfp4_quantize 128x4", "FlashInfer", lambda: fi.mxfp4_quantize(x))]
    rows = []
    nbytes = x.numel() * 2
    for op, provider, fn in cases:
        try:
            r = measure(fn, cuda_graph="off")
            rows.append(dict(op=op, provider=provider, median_us=r["median_us"],
                             input_gb_s=nbytes / r["median_us"] / 1e3))
        except Exception as e:
            rows.append(dict(op=op, provider=provider, error=f"{type(e).__name__}: {str(e)[:200]}"))
    print(f"\n{name}, x = {m} x {k} bf16\n")
    print("| op | provider | median µs | input GB/s |\n|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['op']} | {r['provider']} | {r['error']} | |")
        else:
            print(f"| {r['op']} | {r['provider']} | {r['median_us']:.1f} | {r['input_gb_s']:.0f} |")
    print("\nchecks:", json.dumps(checks, indent=1))
    (out / "quant.json").write_text(json.dumps(dict(device=name, rows=rows, checks=checks), indent=1))


if __name__ == "__main__":
    main()
