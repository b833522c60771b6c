"""Attention variants (flashtile/variants.py): suites ``variants_decode`` (GB/s), ``variants_prefill``
(TFLOP/s) and ``variants_flex`` (TFLOP/s or GB/s per case, metric of the case kind).

``variants_decode`` / ``variants_prefill``: a built-in feature through its kernel flag (provider ``flag``,
the baseline) against the same feature written as a variant (provider ``flashtile``, the example hooks of
benchmarks/variant_examples.py): soft cap, ALiBi, sliding window. The speedup column is then
variant / flag (1.00 = same speed; the goal is >= 0.97). Decode: batch decode 64 x 4096 paged (page 16,
h32/8 d128 bf16); prefill: single prefill 4096 causal (h32/32 d128 bf16).

``variants_flex``: soft cap, ALiBi and FlashSigmoid as variants against FlexAttention (compiled) with the
same ``score_mod`` on prefill 4096 and 16384 causal, decode 1 x 32768, and batch decode 64 x 4096 (flashtile
paged with page 16, Flex on a dense cache, since it has no paged KV). FlashSigmoid has no softmax, which Flex
cannot express: reported unavailable there.
"""

from __future__ import annotations

import functools

import torch

from .harness import Case, Provider, Suite, Unavailable, device, register

FEATURES = ("softcap", "alibi", "window")
CAP, WINDOW = 30.0, 1023


def _decode_case(feature: str, batch=64, kv=4096, hq=32, hk=8, d=128, page=16) -> Case:
    params = dict(kind="batch_decode", feature=feature, batch=batch, kv_len=kv, num_qo_heads=hq, num_kv_heads=hk,
                  head_dim=d, page_size=page)
    keys = kv if feature != "window" else min(kv, WINDOW + 1)
    return Case(f"{feature} decode {batch} x {kv} p{page}", params, flops=4.0 * hq * d * keys * batch,
                bytes=float(2 * 2 * batch * kv * hk * d + 2 * 2 * batch * hq * d))


def _prefill_case(feature: str, n=4096, hq=32, hk=32, d=128, kind="prefill") -> Case:
    params = dict(kind=kind, feature=feature, qo_len=n, kv_len=n, num_qo_heads=hq, num_kv_heads=hk, head_dim=d)
    pairs = n * (n + 1) // 2 if kind == "prefill" else n
    return Case(f"{feature} {'prefill causal' if kind == 'prefill' else 'decode 1 x'} {n}", params,
                flops=4.0 * hq * d * pairs, bytes=float(2 * 2 * n * hk * d + 2 * 2 * hq * d))


def decode_cases(smoke: bool):
    if smoke:
        return [_decode_case(f, batch=2, kv=64, hq=4, hk=2, d=64) for f in FEATURES]
    return [_decode_case(f) for f in FEATURES]


def prefill_cases(smoke: bool):
    if smoke:
        return [_prefill_case(f, n=64, hq=2, hk=2, d=64) for f in FEATURES]
    return [_prefill_case(f) for f in FEATURES]


def flex_cases(smoke: bool):
    n_p, n_d = (64, 64) if smoke else (4096, 32768)
    hq, hk, d = (2, 2, 64) if smoke else (32, 8, 128)
    cases = []
    for f in ("softcap", "alibi", "sigmoid"):
        cases.append(_prefill_case(f, n=n_p, hq=hq, hk=hq, d=d))
        if not smoke:
            cases.append(_prefill_case(f, n=4 * n_p, hq=hq, hk=hq, d=d))
        cases.append(_prefill_case(f, n=n_d, hq=hq, hk=hk, d=d, kind="decode"))
        # Flex has no paged KV: its side of the batch decode reads a dense [batch, heads, kv, dim] cache
        cases.append(_decode_case(f, batch=2, kv=64, hq=hq, hk=hq, d=d) if smoke else _decode_case(f))
    return cases


@functools.lru_cache(maxsize=None)
def _slopes(h: int) -> torch.Tensor:
    from flashtile.utils import get_alibi_slopes

    return get_alibi_slopes(h).float().to(device())


def _variant(feature: str, p: dict):
    """``(AttentionVariant, extra args)`` of a feature (benchmarks/variant_examples.py)."""
    from . import variant_examples as VX

    if feature == "softcap":
        return VX.SOFTCAP, (CAP,)
    if feature == "alibi":
        return VX.ALIBI, (_slopes(p["num_qo_heads"]),)
    if feature == "window":
        return VX.WINDOW, (WINDOW,)
    return VX.FLASH_SIGMOID, (1.0 / p["head_dim"] ** 0.5, -1.0)


def _flag_kwargs(feature: str) -> dict:
    return {"softcap": dict(logits_soft_cap=CAP), "alibi": dict(pos_encoding_mode="ALIBI"),
            "window": dict(window_left=WINDOW)}[feature]


def _paged(p):
    dev, bf = device(), torch.bfloat16
    pages = -(-p["kv_len"] // p["page_size"])
    total = pages * p["batch"]
    q = torch.randn(p["batch"], p["num_qo_heads"], p["head_dim"], dtype=bf, device=dev)
    cache = torch.randn(total, 2, p["page_size"], p["num_kv_heads"], p["head_dim"], dtype=bf, device=dev)
    indices = torch.randperm(total, dtype=torch.int32)
    indptr = torch.arange(0, total + 1, pages, dtype=torch.int32)
    last = torch.full((p["batch"],), p["kv_len"] - (pages - 1) * p["page_size"], dtype=torch.int32)
    return q, cache, indptr, indices, last


def _batch_decode(use_variant: bool):
    def make(case: Case):
        import flashtile

        p = case.params
        q, cache, indptr, indices, last = _paged(p)
        ws = torch.empty(128 << 20, dtype=torch.uint8, device=device())
        variant, args = _variant(p["feature"], p)
        w = flashtile.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", jit_args=variant if use_variant else None)
        plan_kw = {} if use_variant else _flag_kwargs(p["feature"])
        w.plan(indptr, indices, last, p["num_qo_heads"], p["num_kv_heads"], p["head_dim"], p["page_size"],
               q_data_type=q.dtype, **plan_kw)
        out = torch.empty_like(q)
        extra = args if use_variant else ()
        return lambda: w.run(q, cache, *extra, out=out)

    return make


def _single(use_variant: bool):
    def make(case: Case):
        import flashtile

        p = case.params
        dev, bf = device(), torch.bfloat16
        q = torch.randn(p["qo_len"] if p["kind"] == "prefill" else 1, p["num_qo_heads"], p["head_dim"], dtype=bf,
                        device=dev)
        k = torch.randn(p["kv_len"], p["num_kv_heads"], p["head_dim"], dtype=bf, device=dev)
        v = torch.randn_like(k)
        kw = dict(_variant=_variant(p["feature"], p)) if use_variant else _flag_kwargs(p["feature"])
        if p["kind"] == "decode":
            return lambda: flashtile.single_decode_with_kv_cache(q[0], k, v, **kw)
        return lambda: flashtile.single_prefill_with_kv_cache(q, k, v, causal=True, **kw)

    return make


def _flex(case: Case):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if device().type != "cuda":
        raise Unavailable("compiled FlexAttention needs CUDA")
    p = case.params
    if p["feature"] == "sigmoid":
        raise Unavailable("FlashSigmoid skips the softmax, which FlexAttention always applies")
    dev, bf = device(), torch.bfloat16
    lq = p["qo_len"] if p["kind"] == "prefill" else 1
    batch = p.get("batch", 1)
    q = torch.randn(batch, p["num_qo_heads"], lq, p["head_dim"], dtype=bf, device=dev)
    k = torch.randn(batch, p["num_kv_heads"], p["kv_len"], p["head_dim"], dtype=bf, device=dev)
    v = torch.randn_like(k)
    delta = p["kv_len"] - lq
    if p["feature"] == "softcap":
        def score_mod(score, b, h, q_idx, kv_idx):
            return CAP * torch.tanh(score / CAP)
    else:
        slopes = _slopes(p["num_qo_heads"])

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx - q_idx - delta)
    mask = None
    if p["kind"] == "prefill":
        mask = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + delta, None, None, lq, p["kv_len"],
                                 device=dev)
    flex = torch.compile(flex_attention, dynamic=False)
    gqa = p["num_qo_heads"] != p["num_kv_heads"]
    if p["kind"] == "batch_decode":
        return lambda: flex(q, k, v, score_mod=score_mod, block_mask=mask, enable_gqa=gqa)[:, :, 0]
    return lambda: flex(q, k, v, score_mod=score_mod, block_mask=mask, enable_gqa=gqa)[0].transpose(0, 1)


def _flashtile_flex_case(case: Case):
    if case.params["kind"] == "batch_decode":
        return _batch_decode(True)(case)
    fn = _single(True)(case)
    if case.params["kind"] == "decode":
        return lambda: fn()[None]
    return fn


register(Suite("variants_decode", decode_cases, [Provider("flashtile", _batch_decode(True)),
                                                 Provider("flag", _batch_decode(False))], metric="gbps",
               description="batch decode: built-in flag (baseline) vs the same feature as a variant"))
register(Suite("variants_prefill", prefill_cases, [Provider("flashtile", _single(True)),
                                                   Provider("flag", _single(False))], metric="tflops",
               description="single prefill 4096 causal: built-in flag (baseline) vs the same feature as a variant"))
register(Suite("variants_flex", flex_cases, [Provider("flashtile", _flashtile_flex_case), Provider("flex", _flex)],
               metric="tflops", description="variants vs FlexAttention (compiled) with the same score_mod; "
               "batch decode: flashtile paged (page 16), Flex on a dense cache"))
