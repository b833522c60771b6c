"""DeepSeek MLA over a paged latent cache (issue 26): suite ``mla``.

Latent 512 + RoPE 64, sm_scale 1/sqrt(192), pages in random order. Bytes = the latent and RoPE rows
of the actual lengths (read once) plus q and o; FLOPs = 2 x heads x query tokens x kv x (576 + 512)
(causal append: the visible keys only). flashtile and FlashInfer's BatchMLAPagedAttentionWrapper
read the same pool (one ``[pages, page_size, 576]`` tensor sliced into ckv and kpe).
"""

from __future__ import annotations

import math

import torch

from .harness import Case, Knob, Provider, Suite, Tune, device, grid, import_flashinfer, register

D_CKV, D_KPE = 512, 64


def _case(batch: int, kv: int, heads: int, page: int, qo: int = 1, kv_dtype: str = "bfloat16") -> Case:
    kv_es = torch.empty((), dtype=getattr(torch, kv_dtype)).element_size()
    name = f"{batch}x{kv} h{heads} p{page}" + (f" q{qo}" if qo > 1 else "") + (" fp8" if kv_es == 1 else "")
    visible = batch * sum(kv - qo + 1 + t for t in range(qo))  # (query, key) pairs (causal)
    flops = 2.0 * heads * visible * (D_CKV + D_KPE + D_CKV)
    bytes_ = batch * kv * (D_CKV + D_KPE) * kv_es + batch * qo * heads * (D_CKV + D_KPE + D_CKV) * 2
    return Case(name, dict(batch=batch, kv=kv, heads=heads, page_size=page, qo=qo, kv_dtype=kv_dtype), flops=flops,
                bytes=float(bytes_))


def mla_cases(smoke: bool):
    if smoke:
        return [_case(2, 64, 4, 16), _case(2, 40, 4, 1, qo=2)]
    cases = []
    for page in (64, 1):
        cases += [_case(64, 4096, 128, page), _case(128, 8192, 16, page), _case(32, 16384, 64, page),
                  _case(1, 32768, 128, page)]
    cases.append(_case(64, 4096, 128, 64, qo=4))
    cases.append(_case(64, 4096, 128, 64, kv_dtype="float8_e4m3fn"))
    return cases


def _inputs(case: Case):
    p = case.params
    dev = device()
    b, kv, ps, qo, h = p["batch"], p["kv"], p["page_size"], p["qo"], p["heads"]
    per = -(-kv // ps)
    total = b * per
    pool = torch.randn(total, ps, D_CKV + D_KPE, device=dev, dtype=torch.bfloat16).to(getattr(torch, p["kv_dtype"]))
    q_nope = torch.randn(b * qo, h, D_CKV, device=dev, dtype=torch.bfloat16)
    q_pe = torch.randn(b * qo, h, D_KPE, device=dev, dtype=torch.bfloat16)
    i32 = dict(dtype=torch.int32, device=dev)
    qo_indptr = torch.arange(b + 1, **i32) * qo
    kv_indptr = torch.arange(b + 1, **i32) * per
    kv_indices = torch.randperm(total, device=dev).to(torch.int32)
    kv_lens = torch.full((b,), kv, **i32)
    return q_nope, q_pe, pool[..., :D_CKV], pool[..., D_CKV:], qo_indptr, kv_indptr, kv_indices, kv_lens


def _flashtile(case: Case, **plan_options):
    import flashtile

    p = case.params
    q_nope, q_pe, ckv, kpe, qo_indptr, kv_indptr, kv_indices, kv_lens = _inputs(case)
    w = flashtile.mla.BatchMLAPagedAttentionWrapper(torch.empty(256 << 20, dtype=torch.uint8, device=device()))
    w.plan(qo_indptr.cpu(), kv_indptr.cpu(), kv_indices, kv_lens.cpu(), p["heads"], D_CKV, D_KPE, p["page_size"],
           True, 1 / math.sqrt(192), torch.bfloat16, ckv.dtype, **plan_options)
    out = torch.empty_like(q_nope)
    meta = w._plan.meta
    note = f"{meta.num_items} items, splits<={meta.max_splits}, tile {meta.config.block_m}x{meta.config.block_n}"
    return (lambda: w.run(q_nope, q_pe, ckv, kpe, out=out)), note


def _flashinfer(case: Case):
    flashinfer = import_flashinfer("mla")
    p = case.params
    q_nope, q_pe, ckv, kpe, qo_indptr, kv_indptr, kv_indices, kv_lens = _inputs(case)
    w = flashinfer.mla.BatchMLAPagedAttentionWrapper(torch.empty(256 << 20, dtype=torch.uint8, device=device()))
    w.plan(qo_indptr, kv_indptr, kv_indices, kv_lens, p["heads"], D_CKV, D_KPE, p["page_size"], True,
           1 / math.sqrt(192), torch.bfloat16, ckv.dtype)
    out = torch.empty_like(q_nope)
    scales = {}
    if ckv.element_size() == 1:  # newer FlashInfer requires the fp8 scales by keyword
        import inspect

        params = inspect.signature(w.run).parameters
        scales = {name: 1.0 for name in ("ckv_scale", "kpe_scale") if name in params}
    return lambda: w.run(q_nope, q_pe, ckv, kpe, out=out, **scales)


_TILES = "flashtile._core.mla_tiles"
_GLUON = "flashtile.kernels.mla_hopper"
# The launch constants of flashtile/_core/mla_tiles.py (4 warps with BLOCK_M 64 only when the output is split
# in two: a 64 x 512 float32 accumulator needs 8 warps, a 64 x 256 one fits 4); configs that exceed shared
# memory are reported, not fatal.
MLA_GRID = [{Knob(_TILES, "MLA_MAX_BLOCK_M"): g["m"], Knob(_TILES, "MLA_BLOCK_N"): g["n"],
             Knob(_TILES, "MLA_WIDE_WARPS"): g["w"], Knob(_TILES, "MLA_NARROW_WARPS"): g["w"],
             Knob(_TILES, "MLA_STAGES"): g["st"],
             Knob(_TILES, "MLA_OUT_SPLIT"): g["o"]}
            for g in grid(m=(16, 32, 64), n=(16, 32, 64), w=(4, 8), st=(2, 3), o=(1, 2))
            if g["w"] == 8 or g["m"] <= 32 or g["o"] == 2]



def _setting(m, n, w, st, o, prefetch=True):
    return {Knob(_TILES, "MLA_MAX_BLOCK_M"): m, Knob(_TILES, "MLA_BLOCK_N"): n, Knob(_TILES, "MLA_WIDE_WARPS"): w,
            Knob(_TILES, "MLA_NARROW_WARPS"): w,
            Knob(_TILES, "MLA_STAGES"): st, Knob(_TILES, "MLA_OUT_SPLIT"): o,
            Knob(_TILES, "MLA_PREFETCH_PAGES"): prefetch}


def _focus_settings(case: Case) -> list:
    """A few minutes' worth of the grid, by what limits the case (docs/mla.md). The first is the shape
    before the page-id prefetch (2 stages, page ids loaded in the iteration: one latent buffer, no copy in
    flight during the math). Up to 32 heads the tile has 16-32 rows and the work is memory-bound: deeper
    pipelines, 4 warps, longer key tiles. From 64 heads the logits' 32-key wgmmas reread Q from shared
    memory, and with 64 rows Triton splits the two warp groups of 8 warps along the keys (row maxima and P
    cross between them through shared memory): longer key tiles, the output split, or 128-row tiles (128
    heads), whose warp groups own 64 rows each."""
    if case.params["heads"] * case.params["qo"] <= 32:
        shapes = [(64, 32, 8, 2, 1, False), (64, 32, 8, 4, 1), (64, 32, 4, 3, 1), (64, 32, 4, 4, 1),
                  (64, 64, 8, 3, 1), (64, 64, 4, 3, 1), (64, 32, 8, 3, 1, False)]
    else:
        shapes = [(64, 32, 8, 2, 1, False), (64, 32, 8, 4, 1), (64, 64, 8, 3, 1), (64, 32, 8, 3, 2),
                  (64, 64, 4, 3, 2), (128, 32, 8, 2, 2), (128, 16, 8, 3, 2)]
    return [_setting(*shape) for shape in shapes]


def _flashtile_no_split(case: Case):
    """flashtile planned without KV splits (one work item per request and row tile, no partial states and no
    merge): what the splits of the default plan cost or gain."""
    return _flashtile(case, disable_split_kv=True)


def _flashtile_triton(case: Case):
    """flashtile with the Triton kernel (flashtile/kernels/mla.py) on every case, also those the warp-specialized
    Gluon kernel (kernels/mla_hopper.py: the default on Hopper for 64-row tiles) serves."""
    from flashtile.kernels import mla_hopper

    saved, mla_hopper.ENABLED_OVERRIDE = mla_hopper.ENABLED_OVERRIDE, False
    try:
        run, note = _flashtile(case)
        run()  # the first call chooses the kernel; later calls replay its launches (mla.py's run())
    finally:
        mla_hopper.ENABLED_OVERRIDE = saved
    return run, note


register(Suite("mla", mla_cases, [Provider("flashtile", _flashtile), Provider("flashinfer", _flashinfer),
                                  Provider("flashtile_no_split", _flashtile_no_split, baseline=False),
                                  Provider("flashtile_triton", _flashtile_triton, baseline=False)], "gbps",
               "DeepSeek MLA decode/append (latent 512 + rope 64, bf16, random page order)",
               tunes={"config": Tune(lambda case: MLA_GRID,
                                     description="largest BLOCK_M x BLOCK_N x warps (wide latent) x stages x "
                                                 "output-column split"),
                      "focus": Tune(_focus_settings, cases=lambda case: case.params["page_size"] == 64,
                                    description="7 shapes per page-64 case, chosen by what limits it (memory "
                                                "below 64 heads, the logits' wgmma width above)"),
                      "split": Tune(lambda case: [{Knob(_TILES, "MLA_PROGRAMS_PER_SM"): n} for n in (1, 2, 4, 8)],
                                    description="programs per SM the KV-split planner aims to fill (the default "
                                                "None is batch decode's target)"),
                      "gluon": Tune(lambda case: [{Knob(_GLUON, "OVERLAP_LOGITS"): True}]
                                    + [{Knob(_TILES, "MLA_PROGRAMS_PER_SM"): n} for n in (1, 2)],
                                    cases=lambda case: case.params["heads"] * case.params["qo"] > 32
                                    and case.params["kv_dtype"] == "bfloat16",
                                    description="the Gluon kernel's cases: the logits of block j+1 issued before "
                                                "block j's product (OVERLAP_LOGITS), and a split plan for one or two "
                                                "programs per SM")}))
