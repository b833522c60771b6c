"""Sampling: suite ``sampling`` (GB/s = probability bytes read once; ANCHORS.md sampling table).

Cases: top_p 0.9 / top_k 50 / min_p 0.05 at batch 1, 128, 512 and vocab 32000, 128256, 151936 (and batch 4,
16, 64 at vocab 128256, where rows are split over several programs) on
``softmax(randn)`` probabilities (float32); top_k_top_p_sampling_from_logits (k 50, p 0.9, batch 128);
chain_speculative_sampling (batch 32, 5 draft tokens, vocab 128256). Providers: flashtile, FlashInfer
(when importable), torch sort-based top-p/top-k (the usual PyTorch implementation), torch.multinomial
without a filter (the floor of an unfiltered draw). Sub-100 us calls are timed as CUDA-graph replays
by the harness (flashtile's default-generator path draws its seed on the device while a graph is being
captured, so every replay samples anew); ``flashtile_seed_given`` passes seed and offset as ints (the GPU
work of an eager call, and FlashInfer's graph replays: one kernel).
"""

from __future__ import annotations

import torch

from .harness import Case, Knob, Provider, Suite, Tune, Unavailable, device, grid, import_flashinfer, register


def _case(kind: str, batch: int, vocab: int, n: int = 0) -> Case:
    name = {"top_p": f"top_p 0.9 b{batch} V{vocab}", "top_k": f"top_k 50 b{batch} V{vocab}",
            "min_p": f"min_p 0.05 b{batch} V{vocab}", "logits_kp": f"logits top_k 50 top_p 0.9 b{batch} V{vocab}",
            "spec": f"chain speculative b{batch} n{n} V{vocab}"}[kind]
    rows = batch * (2 * n + 1) if kind == "spec" else batch
    return Case(name, dict(kind=kind, batch=batch, vocab=vocab, n=n), bytes=4.0 * rows * vocab)


def sampling_cases(smoke: bool):
    if smoke:
        return [_case("top_p", 4, 1000), _case("top_k", 4, 1000), _case("min_p", 4, 1000),
                _case("logits_kp", 4, 1000), _case("spec", 2, 1000, 3)]
    cases = []
    for kind in ("top_p", "top_k", "min_p"):
        for batch in (1, 128, 512):
            for vocab in (32000, 128256, 151936):
                cases.append(_case(kind, batch, vocab))
        for batch in (4, 16, 64):  # 4, 16: rows split over several programs (docs/sampling.md "Row split"); 64 not
            cases.append(_case(kind, batch, 128256))
    return cases + [_case("logits_kp", 128, 128256), _case("spec", 32, 128256, 5)]


def _probs(case: Case):
    p = case.params
    return torch.softmax(torch.randn(p["batch"], p["vocab"], device=device()), -1)


def _spec_inputs(case: Case):
    p = case.params
    b, n, v = p["batch"], p["n"], p["vocab"]
    draft = torch.softmax(torch.randn(b, n, v, device=device()), -1)
    target = torch.softmax(torch.randn(b, n + 1, v, device=device()), -1)
    ids = torch.randint(0, v, (b, n), device=device(), dtype=torch.int32)
    return draft, ids, target


def _call(mod, case: Case, rng=None):
    """The op of ``case`` in the FlashInfer API (flashtile and flashinfer share it); ``rng``: extra keywords
    (seed and offset)."""
    kind = case.params["kind"]
    kw = rng or {}
    if kind == "spec":
        draft, ids, target = _spec_inputs(case)
        return lambda: mod.chain_speculative_sampling(draft, ids, target, **kw)[0]
    if kind == "logits_kp":
        logits = torch.randn(case.params["batch"], case.params["vocab"], device=device())
        return lambda: mod.top_k_top_p_sampling_from_logits(logits, 50, 0.9, **kw)
    probs = _probs(case)
    if kind == "top_p":
        return lambda: mod.top_p_sampling_from_probs(probs, 0.9, **kw)
    if kind == "top_k":
        return lambda: mod.top_k_sampling_from_probs(probs, 50, **kw)
    return lambda: mod.min_p_sampling_from_probs(probs, 0.05, **kw)


def _flashtile(case: Case):
    import flashtile.sampling as mod

    return _call(mod, case)


def _flashtile_seed_given(case: Case):
    """flashtile with ``seed``/``offset`` given as ints: no random-number kernel in the timed region. This is
    the GPU work of an eager call with a generator (flashtile then takes the seed and offset from the
    generator's host-side state), and of a graph replay as FlashInfer's anchors were timed (FlashInfer reads
    the generator on the host, so its graph replays one sampling kernel). With the default generator inside a
    captured graph (the "flashtile" column) torch adds its graph-safe Philox prologue (two fills per replay)
    and a randint node."""
    import flashtile.sampling as mod

    return _call(mod, case, dict(seed=1234, offset=0))


def _flashinfer(case: Case):
    return _call(import_flashinfer("sampling").sampling, case)


def _torch_sort(case: Case):
    """The common PyTorch implementation: sort, cumsum, mask, renormalize, multinomial."""
    kind = case.params["kind"]
    if kind == "spec":
        raise Unavailable("no torch baseline for chain speculative sampling in this suite")
    if kind == "logits_kp":
        logits = torch.randn(case.params["batch"], case.params["vocab"], device=device())

        def call():
            probs = torch.softmax(logits, -1)
            return _sort_filter(probs, k=50, p=0.9)

        return call
    probs = _probs(case)
    if kind == "top_p":
        return lambda: _sort_filter(probs, p=0.9)
    if kind == "top_k":
        return lambda: _sort_filter(probs, k=50)
    return lambda: _min_p(probs, 0.05)


def _sort_filter(probs, k=None, p=None):
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    if k is not None:
        sorted_p[:, k:] = 0.0
    if p is not None:
        excl = torch.cumsum(sorted_p, -1) - sorted_p
        sorted_p = torch.where(excl < p * sorted_p.sum(-1, keepdim=True), sorted_p, 0.0)
    pick = torch.multinomial(sorted_p, 1)
    return order.gather(-1, pick)[:, 0].to(torch.int32)


def _min_p(probs, min_p):
    keep = probs >= min_p * probs.max(-1, keepdim=True).values
    return torch.multinomial(torch.where(keep, probs, 0.0), 1)[:, 0].to(torch.int32)


def _multinomial(case: Case):
    if case.params["kind"] in ("spec", "logits_kp"):
        raise Unavailable("unfiltered floor is reported for the probs cases")
    probs = _probs(case)
    return lambda: torch.multinomial(probs, 1)[:, 0].to(torch.int32)


PROVIDERS = [
    Provider("flashtile", _flashtile),
    Provider("flashtile_seed_given", _flashtile_seed_given, baseline=False),
    Provider("flashinfer", _flashinfer),
    Provider("torch_sort", _torch_sort),
    Provider("torch_multinomial", _multinomial),
]

# Tuning grids (--tune): the launch constants of flashtile/kernels/sampling/config.py. "seg": the tile and
# pipelining of the segmented passes (one program per row); "wave": the smaller tiles used when the batch
# fills the GPU several times over; "split": rows split over several programs (batch below the SM count).
_CONFIG = "flashtile.kernels.sampling.config"
SEG_GRID = [{Knob(_CONFIG, "SEG_COLS"): g["cols"], Knob(_CONFIG, "SEG_STAGES"): g["stages"],
             Knob(_CONFIG, "SEG_UNROLL"): g["unroll"]} for g in grid(cols=(32, 64), stages=(3, 5, 7), unroll=(1, 2))]
WAVE_GRID = [{Knob(_CONFIG, "SEG_WAVE_WARPS"): g["warps"], Knob(_CONFIG, "SEG_WAVE_COLS"): g["cols"],
              Knob(_CONFIG, "SEG_WAVE_SUB_COLS"): g["sub_cols"]}
             for g in grid(warps=(4, 8), cols=(32, 64), sub_cols=(16, 32))]
SPLIT_GRID = [{Knob(_CONFIG, "SPLIT_PER_SM"): g["per_sm"], Knob(_CONFIG, "SPLIT_WARPS"): g["warps"]}
              for g in grid(per_sm=(1, 2, 4), warps=(4, 8))]

register(Suite("sampling", sampling_cases, PROVIDERS, metric="gbps", cuda_graph="on",
               description="float32 probs (softmax of randn); bytes = probabilities read once",
               tunes={"seg": Tune(lambda case: SEG_GRID, description="segment columns x pipeline stages x unroll"),
                      "wave": Tune(lambda case: WAVE_GRID, cases=lambda case: case.params.get("batch", 0) >= 512,
                                   description="wave tiles (batch >= 2 x SMs, vocab <= 65536)"),
                      "split": Tune(lambda case: SPLIT_GRID, cases=lambda case: case.params.get("batch", 0) <= 16,
                                    description="split rows: programs per SM x warps")}))
