"""The sampler calls of vLLM and SGLang (../shared/ENGINES.md §1.1, §1.2, §3 E), in their exact forms.

vLLM (``flashinfer_sample``): fp32 logits ``[B, V]``, probs = softmax in fp32; k int32 (= V on rows
without top-k), p fp32 (= 1.0 on rows without top-p); ``deterministic=True``; the ids go through
``.view(-1).long()``. SGLang: ``top_k_top_p_sampling_from_probs(..., filter_apply_order="joint",
check_nan=True)`` with ``top_ks = 1 << 30`` meaning "all", and the min-p chain top-k renorm -> top-p
renorm -> min-p sampling.

Checks: shape ``[B]`` and an integer dtype; every sample inside the reference filter set (sort-based,
tests/oracles.py); a chi-square goodness-of-fit over 20k draws of a small-vocabulary row against the
renormalized filtered distribution (p-value floor 1e-6: with the fixed seed a correct sampler fails
with probability < 1e-6, while a wrong filter set or weighting gives p-values far below it at 20k
draws); the same generator state gives the same samples.
"""

from __future__ import annotations

import pytest
import torch

from conftest import HAS_CUDA
from flashtile import sampling
from oracles import chi_square_pvalue, renorm_oracle, sampling_keep_oracle, softmax_oracle

P_FLOOR = 1e-6
BATCH, VOCAB = (64, 128256) if HAS_CUDA else (6, 64)
SGLANG_ALL = 1 << 30  # SGLang's top_k for "no top-k"
CHI_SQUARE_DRAWS = 20_000
CHI_SQUARE_VOCAB = 16


def interpreted(path) -> bool:
    return path == "kernel" and not HAS_CUDA


def engine_logits(batch, vocab, device, generator):
    """fp32 logits, contiguous, peaked enough that top-k and top-p both cut."""
    return (torch.randn(batch, vocab, generator=generator) * 3).to(device)


def vllm_params(batch, vocab, device, generator):
    """vLLM's per-request tensors: k int32 (= vocab, i.e. unused, on half the rows), p fp32 (= 1.0 on a third)."""
    k = torch.randint(1, 20, (batch,), generator=generator, dtype=torch.int32)
    k[::2] = vocab
    p = torch.rand(batch, generator=generator) * 0.8 + 0.1
    p[::3] = 1.0
    return k.to(device), p.to(device)


def sglang_params(batch, device, generator):
    """SGLang's per-request tensors: top_ks int32 with 1 << 30 for "all", top_ps and min_ps fp32."""
    top_ks = torch.randint(1, 20, (batch,), generator=generator, dtype=torch.int32)
    top_ks[1::3] = SGLANG_ALL
    top_ps = torch.rand(batch, generator=generator) * 0.8 + 0.1
    top_ps[::4] = 1.0
    min_ps = torch.rand(batch, generator=generator) * 0.3
    return top_ks.to(device), top_ps.to(device), min_ps.to(device)


def assert_engine_samples(ids, keep):
    """ids: the engine's result; keep: bool ``[B, V]`` reference filter set."""
    batch = keep.shape[0]
    assert ids.shape == (batch,)
    assert ids.dtype in (torch.int32, torch.int64)
    flat = ids.view(-1).long()  # what vLLM does with the result
    assert flat.shape == (batch,)
    flat = flat.cpu()
    assert bool(((flat >= 0) & (flat < keep.shape[1])).all()), "an id outside the vocabulary"
    outside = ~keep[torch.arange(batch), flat]
    assert not outside.any(), f"rows {outside.nonzero().flatten().tolist()} sampled outside the filter set"


# Engine calls as (name, call(probs, logits, params) -> ids, reference filter set(probs f64, params) -> keep).
# ``params`` holds k/p for vLLM, top_ks/top_ps/min_ps for SGLang.
def _vllm_top_p(probs, logits, prm):
    return sampling.top_p_sampling_from_probs(probs, prm["p"], deterministic=True)


def _vllm_top_k(probs, logits, prm):
    return sampling.top_k_sampling_from_probs(probs, prm["k"], deterministic=True)


def _vllm_top_k_top_p_logits(probs, logits, prm):
    return sampling.top_k_top_p_sampling_from_logits(logits, prm["k"], prm["p"], deterministic=True)


def _sglang_joint(probs, logits, prm):
    return sampling.top_k_top_p_sampling_from_probs(probs.contiguous(), prm["top_ks"], prm["top_ps"],
                                                    filter_apply_order="joint", check_nan=True)


def _sglang_min_p_chain(probs, logits, prm):
    renormed = sampling.top_k_renorm_probs(probs, prm["top_ks"])
    renormed = sampling.top_p_renorm_probs(renormed, prm["top_ps"])
    return sampling.min_p_sampling_from_probs(renormed, prm["min_ps"])


def min_p_chain_target(probs, prm):
    """The min-p chain's distribution: top-k renorm, top-p renorm, then min-p, each on the previous result."""
    p = renorm_oracle(probs, sampling_keep_oracle(probs, top_k=prm["top_ks"].cpu()))
    p = renorm_oracle(p, sampling_keep_oracle(p, top_p=prm["top_ps"].cpu()))
    return renorm_oracle(p, sampling_keep_oracle(p, min_p=prm["min_ps"].cpu()))


ENGINE_CALLS = {
    "vllm_top_p": (_vllm_top_p, lambda probs, prm: sampling_keep_oracle(probs, top_p=prm["p"].cpu())),
    "vllm_top_k": (_vllm_top_k, lambda probs, prm: sampling_keep_oracle(probs, top_k=prm["k"].cpu())),
    "vllm_top_k_top_p_logits": (_vllm_top_k_top_p_logits, lambda probs, prm: sampling_keep_oracle(
        probs, top_k=prm["k"].cpu(), top_p=prm["p"].cpu(), order="top_k_first")),
    "sglang_joint": (_sglang_joint, lambda probs, prm: sampling_keep_oracle(
        probs, top_k=prm["top_ks"].cpu(), top_p=prm["top_ps"].cpu(), order="joint")),
    "sglang_min_p_chain": (_sglang_min_p_chain, lambda probs, prm: min_p_chain_target(probs, prm) > 0),
}


def engine_inputs(batch, vocab, device, generator):
    logits = engine_logits(batch, vocab, device, generator)
    probs = torch.softmax(logits, dim=-1)  # both engines: softmax in fp32
    k, p = vllm_params(batch, vocab, device, generator)
    top_ks, top_ps, min_ps = sglang_params(batch, device, generator)
    return probs, logits, dict(k=k, p=p, top_ks=top_ks, top_ps=top_ps, min_ps=min_ps)


@pytest.mark.parametrize("call", list(ENGINE_CALLS))
def test_engine_sampler_support_and_reproducibility(path, device, call):
    sample, reference_keep = ENGINE_CALLS[call]
    probs, logits, params = engine_inputs(BATCH, VOCAB, device, torch.Generator().manual_seed(17))
    # The filter sets come from the float64 softmax of the logits (the fp32 probs the engines pass
    # differ from it by rounding only).
    keep = reference_keep(softmax_oracle(logits), params)
    torch.manual_seed(99)
    ids = sample(probs, logits, params)
    assert_engine_samples(ids, keep)
    torch.manual_seed(99)
    assert torch.equal(sample(probs, logits, params), ids), "the same generator state must give the same samples"


def test_engine_samplers_with_explicit_generator(path, device):
    """A request-level generator (upstream's ``generator=``) reproduces its draws when re-seeded."""
    probs, _, params = engine_inputs(BATCH, VOCAB, device, torch.Generator().manual_seed(5))
    generator = torch.Generator(device=device)
    draws = []
    for _ in range(2):
        generator.manual_seed(1234)
        draws.append(sampling.top_k_top_p_sampling_from_probs(probs, params["top_ks"], params["top_ps"],
                                                              filter_apply_order="joint", generator=generator))
    assert torch.equal(draws[0], draws[1])


def repeated_row(device, params, generator):
    """CHI_SQUARE_DRAWS identical requests over one small-vocabulary distribution, with the same
    parameters for every request (a batch of one distribution sampled many times)."""
    logits = (torch.randn(1, CHI_SQUARE_VOCAB, generator=generator) * 1.5).repeat(CHI_SQUARE_DRAWS, 1).to(device)
    full = {name: torch.full((CHI_SQUARE_DRAWS,), value, dtype=dtype, device=device)
            for name, (value, dtype) in params.items()}
    return torch.softmax(logits, dim=-1), logits, full


CHI_SQUARE_PARAMS = {  # (value, dtype) per parameter: both filters cut on the 16-token row
    "vllm_top_p": dict(p=(0.8, torch.float32)),
    "vllm_top_k": dict(k=(5, torch.int32)),
    "vllm_top_k_top_p_logits": dict(k=(6, torch.int32), p=(0.8, torch.float32)),
    "sglang_joint": dict(top_ks=(6, torch.int32), top_ps=(0.7, torch.float32)),
    "sglang_min_p_chain": dict(top_ks=(10, torch.int32), top_ps=(0.9, torch.float32), min_ps=(0.08, torch.float32)),
}


@pytest.mark.parametrize("call", list(ENGINE_CALLS))
def test_engine_sampler_distribution(path, device, call):
    if interpreted(path):
        pytest.skip("the interpreter runs one program per draw; tests/test_sampling.py covers the kernels' "
                    "distributions with few draws")
    sample, reference_keep = ENGINE_CALLS[call]
    probs, logits, params = repeated_row(device, CHI_SQUARE_PARAMS[call], torch.Generator().manual_seed(23))
    row = softmax_oracle(logits[:1])
    row_params = {name: value[:1] for name, value in params.items()}
    if call == "sglang_min_p_chain":
        target = min_p_chain_target(row, row_params)[0]
    else:
        target = renorm_oracle(row, reference_keep(row, row_params))[0]
    assert 2 <= int((target > 0).sum()) < CHI_SQUARE_VOCAB, "the filters must cut, else the test is weak"
    torch.manual_seed(7)
    ids = sample(probs, logits, params)
    assert ids.shape == (CHI_SQUARE_DRAWS,)
    assert chi_square_pvalue(ids.view(-1).long().cpu(), target) > P_FLOOR
