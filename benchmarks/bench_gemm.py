"""Grouped and fp8 GEMMs (issue 31): suites ``segment_gemm`` and ``bmm_fp8``.

segment_gemm: bf16, nn.Linear-layout weights (``weight_column_major=True``), segment i uses weight i.
LoRA: 64 adapters x 1-64 tokens each (seeded), hidden 4096, rank 16 or 64, shrink (4096 -> r) and
expand (r -> 4096). MoE: 4096 tokens routed to 8 or 64 experts (seeded multinomial), 4096 -> 14336.
Providers: flashtile's SegmentGEMMWrapper, a loop of torch matmuls (one per segment),
``torch._grouped_mm`` (when the installed torch has it; CUDA), FlashInfer's SegmentGEMMWrapper.
FLOPs = 2 x rows x d_in x d_out; bytes = x, the weights used, and y.

bmm_fp8: e4m3 A ``[b, m, k]`` and column-major B ``[b, k, n]``, per-tensor scales, bf16 out.
Providers: flashtile.bmm_fp8, ``torch._scaled_mm`` (one call per batch, CUDA), FlashInfer's bmm_fp8.
"""

from __future__ import annotations

from typing import List

import torch

from .harness import Case, Knob, Provider, Suite, Tune, Unavailable, device, grid, import_flashinfer, register


def _lengths(kind: str, segments: int, tokens: int) -> List[int]:
    g = torch.Generator().manual_seed(segments * 7919 + tokens)
    if kind == "lora":
        return torch.randint(1, tokens + 1, (segments,), generator=g).tolist()
    counts = torch.bincount(torch.randint(0, segments, (tokens,), generator=g), minlength=segments)
    return counts.tolist()


def _seg_case(kind: str, segments: int, tokens: int, d_in: int, d_out: int, label: str) -> Case:
    lens = _lengths(kind, segments, tokens)
    rows = sum(lens)
    used = sum(1 for n in lens if n)
    return Case(f"{label} {segments}x{tokens} {d_in}->{d_out}", dict(seg_lens=lens, d_in=d_in, d_out=d_out),
                flops=2.0 * rows * d_in * d_out, bytes=2.0 * (rows * (d_in + d_out) + used * d_in * d_out))


def segment_cases(smoke: bool) -> List[Case]:
    if smoke:
        return [Case("smoke 3 segs 32->24", dict(seg_lens=[0, 5, 17], d_in=32, d_out=24)),
                Case("smoke 2 segs 48->16", dict(seg_lens=[9, 1], d_in=48, d_out=16))]
    cases = []
    for rank in (16, 64):
        cases.append(_seg_case("lora", 64, 64, 4096, rank, f"lora shrink r{rank}"))
        cases.append(_seg_case("lora", 64, 64, rank, 4096, f"lora expand r{rank}"))
    for experts in (8, 64):
        cases.append(_seg_case("moe", experts, 4096, 4096, 14336, "moe"))
    return cases


def _seg_inputs(case: Case):
    p = case.params
    dev = device()
    lens = p["seg_lens"]
    x = torch.randn(sum(lens), p["d_in"], device=dev, dtype=torch.bfloat16)
    w = (torch.randn(len(lens), p["d_out"], p["d_in"], device=dev) / p["d_in"] ** 0.5).to(torch.bfloat16)
    seg_lens = torch.tensor(lens, dtype=torch.int64, device=dev)
    out = torch.empty(x.shape[0], p["d_out"], device=dev, dtype=torch.bfloat16)
    return lens, x, w, seg_lens, out


def _seg_flashtile(case: Case):
    import flashtile

    lens, x, w, seg_lens, out = _seg_inputs(case)
    # the workspace FlashInfer's provider gets too (128 MiB); flashtile keeps split-K partial sums there
    wrapper = flashtile.gemm.SegmentGEMMWrapper(torch.empty(128 << 20, dtype=torch.int8, device=device()))
    return lambda: wrapper.run(x, w, len(lens), True, out=out, seg_lens=seg_lens)


def _seg_torch_loop(case: Case):
    lens, x, w, _, out = _seg_inputs(case)
    bounds = [0]
    for n in lens:
        bounds.append(bounds[-1] + n)

    def run():
        for i in range(len(lens)):
            if bounds[i + 1] > bounds[i]:
                torch.matmul(x[bounds[i]:bounds[i + 1]], w[i].t(), out=out[bounds[i]:bounds[i + 1]])
        return out

    return run


def _seg_grouped_mm(case: Case):
    grouped_mm = getattr(torch, "_grouped_mm", None)
    if grouped_mm is None or not torch.cuda.is_available():
        raise Unavailable("torch._grouped_mm needs a newer torch and CUDA")
    lens, x, w, seg_lens, _ = _seg_inputs(case)
    offs = torch.cumsum(seg_lens, 0).to(torch.int32)
    w_t = w.transpose(1, 2)  # [G, d_in, d_out], column-major per group
    return lambda: grouped_mm(x, w_t, offs=offs, out_dtype=torch.bfloat16)


def _seg_flashinfer(case: Case):
    flashinfer = import_flashinfer("gemm")
    lens, x, w, seg_lens, out = _seg_inputs(case)
    wrapper = flashinfer.gemm.SegmentGEMMWrapper(torch.empty(128 << 20, dtype=torch.int8, device=device()))
    return lambda: wrapper.run(x, w, len(lens), True, out=out, seg_lens=seg_lens)


def _bmm_case(b: int, m: int, k: int, n: int) -> Case:
    return Case(f"{b}x{m}x{k}x{n}", dict(b=b, m=m, k=k, n=n), flops=2.0 * b * m * n * k,
                bytes=float(b * (m * k + k * n) + 2 * b * m * n))


def bmm_cases(smoke: bool) -> List[Case]:
    if smoke:
        return [_bmm_case(1, 16, 32, 16), _bmm_case(2, 33, 64, 40)]
    return [_bmm_case(1, 4096, 4096, 4096), _bmm_case(16, 1024, 1024, 1024), _bmm_case(1, 128, 4096, 4096)]


def _bmm_inputs(case: Case):
    p = case.params
    dev = device()
    fp8 = torch.float8_e4m3fn
    A = torch.randn(p["b"], p["m"], p["k"], device=dev).to(fp8)
    B = torch.randn(p["b"], p["n"], p["k"], device=dev).to(fp8).transpose(-2, -1)  # column-major [b, k, n]
    scale = torch.tensor(0.5, device=dev)
    out = torch.empty(p["b"], p["m"], p["n"], device=dev, dtype=torch.bfloat16)
    return A, B, scale, out


def _bmm_flashtile(case: Case):
    import flashtile

    A, B, s, out = _bmm_inputs(case)
    return lambda: flashtile.bmm_fp8(A, B, s, s, torch.bfloat16, out=out)


def _bmm_scaled_mm(case: Case):
    if not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        raise Unavailable("torch._scaled_mm needs CUDA")
    A, B, s, out = _bmm_inputs(case)

    def run():
        for i in range(A.shape[0]):
            out[i] = torch._scaled_mm(A[i], B[i], scale_a=s, scale_b=s, out_dtype=torch.bfloat16)
        return out

    return run


def _bmm_flashinfer(case: Case):
    flashinfer = import_flashinfer()
    A, B, s, out = _bmm_inputs(case)
    return lambda: flashinfer.bmm_fp8(A, B, s, s, torch.bfloat16, out=out)


_K = "flashtile.kernels.gemm"
# The GPU launch constants of flashtile/kernels/gemm.py; configs that exceed shared memory are reported, not fatal.
_T = "SEG_TILES"


def _tiles(cls: str, rows: List[tuple]):
    from flashtile.kernels.gemm import SegTile

    return [{Knob(_K, _T, cls): SegTile(*row)} for row in rows]


# Segment GEMM tuning grids, one per shape class (SegTile fields: block_m, block_n (0: d_out's power of two),
# block_k (0: d_in's), group_m, warps, stages); the default (no knob changed) is timed first.
def _shrink_grid(case: Case) -> List[dict]:
    # tile shape x split count (SEG_SPLIT_K 0 = automatic)
    tiles = [(m, 0, k, 1, w, st) for m, k, w, st in
             [(64, 128, 4, 4), (64, 64, 4, 6), (64, 256, 4, 3), (64, 128, 8, 4), (32, 128, 4, 5), (16, 256, 4, 4)]]
    return [{**t, Knob(_K, "SEG_SPLIT_K"): sk} for t in _tiles("shrink", tiles) for sk in (0, 1, 4, 8, 16)]


def _expand_grid(case: Case) -> List[dict]:
    return _tiles("expand", [(m, n, 0, g, w, st) for m, n, w in [(64, 128, 4), (64, 256, 8), (32, 128, 4),
                                                                 (32, 256, 4), (128, 128, 8), (16, 256, 4)]
                             for g, st in ((8, 1), (8, 2), (1, 2))])


_WIDE = [(128, 256, 64, 8, 8, 4), (128, 256, 64, 16, 8, 3), (128, 128, 64, 8, 4, 4), (128, 128, 64, 8, 8, 5),
         (256, 128, 64, 8, 8, 3), (128, 256, 32, 8, 8, 5), (64, 256, 64, 8, 8, 4), (64, 128, 64, 8, 4, 5)]
_WIDE_TMA = [(128, 256, 64, 8, 8, 3), (128, 256, 64, 8, 8, 4), (128, 128, 64, 8, 4, 4), (64, 256, 64, 8, 8, 4),
             (128, 128, 128, 8, 8, 3)]


def _moe_grid(case: Case) -> List[dict]:
    # the class the launcher picks for this case (bench_gemm's MoE: 8 experts "long", 64 "short")
    cls = "long" if sum(case.params["seg_lens"]) >= 96 * len(case.params["seg_lens"]) else "short"
    return _tiles(cls, _WIDE) + [{**t, Knob(_K, "SEG_TMA"): True} for t in _tiles(cls, _WIDE_TMA)]


SEGMENT_TUNES = {
    "shrink": Tune(_shrink_grid, cases=lambda c: "shrink" in c.name, description="LoRA shrink: tile x split-K"),
    "expand": Tune(_expand_grid, cases=lambda c: "expand" in c.name, description="LoRA expand: tile x stages"),
    "moe": Tune(_moe_grid, cases=lambda c: c.name.startswith("moe"),
                description="MoE: tile, group, warps, stages; pointer loads, then TMA (SEG_TMA)"),
}
FP8_GRID = [{Knob(_K, "FP8_BLOCK_N"): g["n"], Knob(_K, "FP8_BLOCK_K"): g["k"], Knob(_K, "FP8_WARPS"): g["w"],
             Knob(_K, "FP8_STAGES"): g["st"]} for g in grid(n=(128, 256), k=(64, 128), w=(4, 8), st=(3, 4))]

register(Suite("segment_gemm", segment_cases,
               [Provider("flashtile", _seg_flashtile), Provider("torch_loop", _seg_torch_loop),
                Provider("torch_grouped_mm", _seg_grouped_mm), Provider("flashinfer", _seg_flashinfer)],
               "tflops", "Segment (grouped) GEMM, bf16, LoRA shrink/expand and MoE shapes",
               tunes=SEGMENT_TUNES))
register(Suite("bmm_fp8", bmm_cases,
               [Provider("flashtile", _bmm_flashtile), Provider("torch_scaled_mm", _bmm_scaled_mm),
                Provider("flashinfer", _bmm_flashinfer)],
               "tflops", "Batched fp8 e4m3 GEMM with per-tensor scales, bf16 out",
               tunes={"config": Tune(lambda case: FP8_GRID, description="BLOCK_N x BLOCK_K x warps x stages")}))
