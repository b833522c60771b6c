"""flashtile.sampling against the float64 oracles: distributions (chi-square with fixed seeds, p-value
floor 1e-6), filter-set membership, exact renorm/mask, edge rows, reproducibility, speculative
sampling, errors. Each test runs on the reference path and the kernel path (Triton interpreter on CPU
with tiny vocabularies and few draws; compiled kernels and real vocabularies on a GPU)."""

from __future__ import annotations

import pytest
import torch

import flashtile.sampling as S
from conftest import HAS_CUDA
from oracles import chi_square_pvalue, renorm_oracle, sampling_keep_oracle, softmax_oracle

P_FLOOR = 1e-6  # fixed seeds make each test deterministic; this is its false-failure rate


def _interp(path):
    return path == "kernel" and not HAS_CUDA


def _draws(path):
    """Draws per distribution test: the interpreter runs one program per draw (~30 ms each)."""
    if HAS_CUDA:
        return 200_000
    return 80 if path == "kernel" else 20_000


def _vocab(path, gpu_vocab=32000):
    return gpu_vocab if HAS_CUDA else (8 if path == "kernel" else 300)


def _dist(kind, vocab, device):
    g = torch.Generator().manual_seed(vocab + len(kind))
    if kind == "flat":
        logits = torch.randn(vocab, generator=g) * 0.5
    elif kind == "peaked":
        logits = torch.randn(vocab, generator=g) * 5
    else:  # long tail: Zipf-like
        logits = -1.1 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float64)).float()
        logits = logits[torch.randperm(vocab, generator=g)]
    return torch.softmax(logits, -1).to(device)[None]


SAMPLERS = {
    "plain": (lambda p, idx, **kw: S.sampling_from_probs(p, idx, **kw), {}),
    "logits": (lambda p, idx, **kw: S.sampling_from_logits(p.log(), idx, **kw), {}),
    "top_p": (lambda p, idx, **kw: S.top_p_sampling_from_probs(p, 0.6, idx, **kw), dict(top_p=[0.6])),
    "top_k": (lambda p, idx, **kw: S.top_k_sampling_from_probs(p, 3, idx, **kw), dict(top_k=[3])),
    "min_p": (lambda p, idx, **kw: S.min_p_sampling_from_probs(p, 0.1, idx, **kw), dict(min_p=[0.1])),
    "top_k_first": (lambda p, idx, **kw: S.top_k_top_p_sampling_from_probs(p, 4, 0.7, idx, **kw),
                    dict(top_k=[4], top_p=[0.7], order="top_k_first")),
    "joint": (lambda p, idx, **kw: S.top_k_top_p_sampling_from_probs(p, 4, 0.7, idx, filter_apply_order="joint", **kw),
              dict(top_k=[4], top_p=[0.7], order="joint")),
    "logits_top_k_first": (lambda p, idx, **kw: S.top_k_top_p_sampling_from_logits(p.log(), 4, 0.7, idx, **kw),
                           dict(top_k=[4], top_p=[0.7], order="top_k_first")),
}
INTERP_SAMPLERS = ("plain", "top_p", "top_k", "joint")


@pytest.mark.parametrize("dist", ["flat", "peaked", "longtail"])
@pytest.mark.parametrize("kind", list(SAMPLERS))
def test_sampler_distribution(path, device, kind, dist):
    if _interp(path) and (kind not in INTERP_SAMPLERS or dist != "flat"):
        pytest.skip("interpreter: a subset (one program per draw)")
    fn, filt = SAMPLERS[kind]
    probs = _dist(dist, _vocab(path), device)
    n = _draws(path)
    idx = torch.zeros(n, dtype=torch.int32, device=device)
    ids = fn(probs, idx, seed=11, offset=0)
    assert ids.shape == (n,) and ids.dtype == torch.int32
    keep = sampling_keep_oracle(probs, **filt)[0]
    target = renorm_oracle(probs, keep[None])[0]
    ids = ids.cpu().long()
    assert bool(((ids >= 0) & (ids < probs.shape[-1])).all())
    assert bool(keep[ids].all()), "a sample outside the filter set"
    assert chi_square_pvalue(ids, target) > P_FLOOR


def test_samples_in_filter_set_per_request_params(path, device):
    """Per-request tensors (top_k, top_p, min_p) over a batch of different rows, ties included."""
    B, V = (4, 37) if _interp(path) else (64, _vocab(path, 128256))
    probs = torch.softmax(torch.randn(B, V) * 3, -1)
    probs[0, :5] = probs[0, 5]  # ties at the top of row 0
    probs = (probs / probs.sum(-1, keepdim=True)).to(device)
    g = torch.Generator().manual_seed(3)
    top_k = torch.randint(1, 12, (B,), generator=g, dtype=torch.int32)
    top_p = torch.rand(B, generator=g) * 0.9 + 0.05
    min_p = torch.rand(B, generator=g) * 0.5
    cases = [
        (S.top_k_sampling_from_probs(probs, top_k.to(device), seed=1, offset=0), dict(top_k=top_k)),
        (S.top_p_sampling_from_probs(probs, top_p.to(device), seed=1, offset=0), dict(top_p=top_p)),
        (S.min_p_sampling_from_probs(probs, min_p.to(device), seed=1, offset=0), dict(min_p=min_p)),
        (S.top_k_top_p_sampling_from_probs(probs, top_k.to(device), top_p.to(device), seed=1, offset=0),
         dict(top_k=top_k, top_p=top_p, order="top_k_first")),
        (S.top_k_top_p_sampling_from_probs(probs, top_k.to(device), 0.5, filter_apply_order="joint", seed=1,
                                           offset=0), dict(top_k=top_k, top_p=[0.5] * B, order="joint")),
    ]
    for ids, filt in cases:
        keep = sampling_keep_oracle(probs, **filt)
        assert bool(keep[torch.arange(B), ids.cpu().long()].all()), filt


def test_param_tensors_of_any_real_dtype(path, device):
    """Per-request parameters as upstream accepts them: integer tensors for top_p / min_p / temperature
    (engines pass e.g. ``torch.full((B,), 1)``, int64) are read as float32, floating tensors for top_k
    are truncated toward zero. Integer top_p 0 / min_p 1 keep only the most probable tokens, so the
    samples are checked exactly; each call also gives the same ids as with the converted tensor."""
    B, V = 3, 9
    probs = torch.softmax(torch.randn(B, V) * 2, -1)
    probs[1, 2] = probs[1, 6] = probs[1].max()  # a tie at the top of row 1
    probs = (probs / probs.sum(-1, keepdim=True)).to(device)
    top_k_f = torch.tensor([2.7, 1.0, 100.0], device=device)
    top_k = torch.tensor([2, 1, 100], dtype=torch.int32)
    top_p_i = torch.tensor([1, 0, 1], device=device)  # int64: no filter, top token(s) only, no filter
    min_p_i = torch.full((B,), 1, device=device)  # int64: only the tokens equal to the row maximum
    rng = dict(seed=7, offset=0)
    cases = [
        (lambda k, p, m: S.top_k_sampling_from_probs(probs, k, **rng), dict(top_k=top_k)),
        (lambda k, p, m: S.top_p_sampling_from_probs(probs, p, **rng), dict(top_p=top_p_i)),
        (lambda k, p, m: S.min_p_sampling_from_probs(probs, m, **rng), dict(min_p=min_p_i)),
        (lambda k, p, m: S.top_k_top_p_sampling_from_probs(probs, k, p, **rng),
         dict(top_k=top_k, top_p=top_p_i, order="top_k_first")),
        (lambda k, p, m: S.top_k_top_p_sampling_from_logits(probs.log(), k, p, filter_apply_order="joint", **rng),
         dict(top_k=top_k, top_p=top_p_i, order="joint")),
    ]
    for sample, filt in cases:
        ids = sample(top_k_f, top_p_i, min_p_i)
        keep = sampling_keep_oracle(probs, **filt)
        assert bool(keep[torch.arange(B), ids.cpu().long()].all()), filt
        same = sample(top_k.to(device), top_p_i.float(), min_p_i.float())
        assert torch.equal(ids, same), filt
    assert torch.equal(S.min_p_sampling_from_probs(probs, min_p_i, **rng).cpu().long()[[0, 2]],
                       probs.argmax(-1).cpu()[[0, 2]])

    keep_k = sampling_keep_oracle(probs, top_k=top_k)
    torch.testing.assert_close(S.top_k_renorm_probs(probs, top_k_f).double().cpu(), renorm_oracle(probs, keep_k),
                               atol=1e-6, rtol=1e-5)
    logits = probs.log()
    expected = torch.where(keep_k, logits.double().cpu(), float("-inf"))
    assert torch.equal(S.top_k_mask_logits(logits, top_k_f).double().cpu(), expected)
    keep_p = sampling_keep_oracle(probs, top_p=top_p_i)
    torch.testing.assert_close(S.top_p_renorm_probs(probs, top_p_i).double().cpu(), renorm_oracle(probs, keep_p),
                               atol=1e-6, rtol=1e-5)
    temperature = torch.tensor([1, 2, 3], device=device)
    torch.testing.assert_close(S.softmax(logits, temperature).double().cpu(),
                               softmax_oracle(logits, temperature.cpu()), atol=1e-6, rtol=1e-5)


def test_top_k_one_is_argmax(path, device):
    B, V = (3, 50) if _interp(path) else (32, _vocab(path, 128256))
    probs = torch.softmax(torch.randn(B, V) * 2, -1).to(device)
    ids = S.top_k_sampling_from_probs(probs, 1, seed=5, offset=0)
    assert torch.equal(ids.cpu().long(), probs.argmax(-1).cpu())
    ids = S.top_k_top_p_sampling_from_logits(probs.log(), 1, 0.9, seed=5, offset=0)
    assert torch.equal(ids.cpu().long(), probs.argmax(-1).cpu())


def _renorm_rows(path, device):
    V = 130 if _interp(path) else _vocab(path, 128256)
    probs = torch.softmax(torch.randn(3, V) * 2, -1)
    probs[1, 10:20] = probs[1, 3]  # ties
    probs[2, V // 2:] = 0.0  # zeros
    return (probs / probs.sum(-1, keepdim=True)).to(device)


@pytest.mark.parametrize("k", [1, 5, 64, 100000])
def test_top_k_renorm_and_mask_exact(path, device, k):
    probs = _renorm_rows(path, device)
    keep = sampling_keep_oracle(probs, top_k=[k])
    out = S.top_k_renorm_probs(probs, k)
    torch.testing.assert_close(out.double().cpu(), renorm_oracle(probs, keep), atol=1e-6, rtol=1e-5)
    logits = probs.log()
    masked = S.top_k_mask_logits(logits, torch.full((3,), k, dtype=torch.int64, device=device))
    x = logits.double().cpu()
    finite_keep = keep | (torch.isfinite(x) & (sampling_keep_oracle(torch.exp(x), top_k=[k])))
    expected = torch.where(finite_keep, x, float("-inf"))
    assert torch.equal(masked.double().cpu(), expected.to(logits.dtype).double())


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 1.0])
def test_top_p_renorm_exact(path, device, p):
    probs = _renorm_rows(path, device)
    keep = sampling_keep_oracle(probs, top_p=[p])
    out = S.top_p_renorm_probs(probs, p)
    torch.testing.assert_close(out.double().cpu(), renorm_oracle(probs, keep), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_renorm_keeps_dtype(path, device, dtype):
    probs = _renorm_rows(path, device).to(dtype)
    assert S.top_k_renorm_probs(probs, 3).dtype == dtype
    assert S.top_k_mask_logits(probs.float().log().to(dtype), 3).dtype == dtype


@pytest.mark.parametrize("temperature", [None, 0.7, "tensor"])
def test_softmax(path, device, temperature):
    V = 77 if _interp(path) else 1000
    logits = torch.randn(3, V) * 3
    logits[0, :10] = float("-inf")
    t = torch.tensor([0.5, 1.0, 2.0]) if temperature == "tensor" else temperature
    out = S.softmax(logits.to(device), t.to(device) if isinstance(t, torch.Tensor) else t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double().cpu(), softmax_oracle(logits, t), atol=1e-6, rtol=1e-5)
    dead = torch.full((1, V), float("-inf"), device=device)
    assert torch.equal(S.softmax(dead).cpu(), torch.zeros(1, V))


def test_edge_rows(path, device):
    """All-zero, NaN, partly NaN, -inf logits, top_k >= vocab with top_p = 1: ids in range, never a
    zero-probability token, invalid rows give 0 with valid False."""
    V = 40
    probs = torch.softmax(torch.randn(5, V), -1)
    probs[0] = 0.0
    probs[1] = float("nan")
    probs[2, :20] = float("nan")
    probs[3, :-1] = 0.0  # one token
    probs = probs.to(device)
    for fn in (lambda: S.sampling_from_probs(probs, seed=1, offset=0, return_valid=True),
               lambda: S.top_p_sampling_from_probs(probs, 1.0, seed=1, offset=0, return_valid=True),
               lambda: S.top_k_sampling_from_probs(probs, V + 5, seed=1, offset=0, return_valid=True),
               lambda: S.min_p_sampling_from_probs(probs, 0.2, seed=1, offset=0, return_valid=True),
               lambda: S.top_k_top_p_sampling_from_probs(probs, V, 1.0, seed=1, offset=0, return_valid=True)):
        ids, valid = fn()
        ids, valid = ids.cpu(), valid.cpu()
        assert valid.tolist() == [False, False, True, True, True]
        assert ids[0] == 0 and ids[1] == 0
        p = probs.cpu()
        assert p[2, ids[2]] > 0 and ids[3] == V - 1 and p[4, ids[4]] > 0
    logits = torch.randn(3, V)
    logits[0, ::2] = float("-inf")
    logits[1] = float("-inf")
    logits[2, 5] = float("nan")
    ids, valid = S.sampling_from_logits(logits.to(device), seed=2, offset=0, return_valid=True)
    ids, valid = ids.cpu(), valid.cpu()
    assert valid.tolist() == [True, False, True]
    assert ids[0] % 2 == 1 and ids[1] == 0 and ids[2] != 5


def test_check_nan(path, device):
    probs = torch.full((2, 16), 1 / 16, device=device)
    probs[1, 3] = float("nan")
    with pytest.raises(ValueError, match="Input probs contains NaN"):
        S.top_p_sampling_from_probs(probs, 0.9, check_nan=True)
    with pytest.raises(ValueError, match="Input logits contains NaN"):
        S.sampling_from_logits(probs, check_nan=True)


def test_reproducible(path, device):
    B, V = (3, 33) if _interp(path) else (16, 4096)
    probs = torch.softmax(torch.randn(B, V), -1).to(device)
    a = S.top_p_sampling_from_probs(probs, 0.9, seed=7, offset=100)
    b = S.top_p_sampling_from_probs(probs, 0.9, seed=7, offset=100)
    assert torch.equal(a, b)
    seeds = torch.tensor([7], device=device)
    c = S.top_p_sampling_from_probs(probs, 0.9, seed=seeds, offset=torch.tensor([100], device=device))
    assert torch.equal(a, c), "int and tensor seed/offset give the same draws"
    gen = torch.Generator(device=device)
    gen.manual_seed(42)
    d = S.sampling_from_probs(probs, generator=gen)
    gen.manual_seed(42)
    e = S.sampling_from_probs(probs, generator=gen)
    assert torch.equal(d, e)
    many = torch.zeros(64 if not _interp(path) else 16, dtype=torch.int32, device=device)
    f = S.sampling_from_probs(probs, many, seed=1, offset=0)
    g = S.sampling_from_probs(probs, many, seed=2, offset=0)
    assert not torch.equal(f, g)
    torch.manual_seed(0)
    h = S.sampling_from_probs(probs, deterministic=False)
    torch.manual_seed(0)
    assert torch.equal(h, S.sampling_from_probs(probs, deterministic=False))


@pytest.mark.gpu
def test_generator_host_draw():
    """Eager calls take (seed, offset) from a CUDA generator's host-side state, with no kernel: the offset
    advances past the call's Philox counters (64 per row; n + 1 per request for speculative sampling), the
    same generator state gives the same samples, successive calls differ."""
    gen = torch.Generator(device="cuda")
    gen.manual_seed(3)
    probs = torch.full((256, 1000), 1e-3, device="cuda")
    a = S.top_p_sampling_from_probs(probs, 0.9, generator=gen)
    assert gen.get_offset() == 256 * 64
    b = S.top_p_sampling_from_probs(probs, 0.9, generator=gen)
    assert gen.get_offset() == 2 * 256 * 64 and not torch.equal(a, b)
    gen.manual_seed(3)
    assert torch.equal(a, S.top_p_sampling_from_probs(probs, 0.9, generator=gen))
    draft = torch.full((5, 3, 1000), 1e-3, device="cuda")
    target = torch.full((5, 4, 1000), 1e-3, device="cuda")
    ids = torch.zeros(5, 3, dtype=torch.int32, device="cuda")
    before = gen.get_offset()
    S.chain_speculative_sampling(draft, ids, target, generator=gen)
    assert gen.get_offset() == before + 20  # 5 requests x 4 counters
    torch.cuda.manual_seed(11)
    c = S.min_p_sampling_from_probs(probs, 0.1)
    torch.cuda.manual_seed(11)
    assert torch.equal(c, S.min_p_sampling_from_probs(probs, 0.1))


def test_indices_dtype_and_rows(path, device):
    probs = torch.zeros(3, 10, device=device)
    probs[0, 2] = probs[1, 7] = probs[2, 4] = 1.0
    idx = torch.tensor([2, 0, 1, 1], dtype=torch.int64, device=device)
    ids = S.top_k_sampling_from_probs(probs, 2, idx, seed=0, offset=0)
    assert ids.dtype == torch.int64 and ids.tolist() == [4, 2, 7, 7]


@pytest.mark.parametrize("mode", ["top_p", "top_k", "joint", "min_p", "top_k_first"])
def test_kernel_exact_fallback(path, device, mode):
    """max_rounds=0: the kernel goes straight to the exact threshold search; samples stay in the set
    and (on GPU, enough draws) follow the filtered distribution."""
    if path != "kernel":
        pytest.skip("kernel-only knob")
    from flashtile._core.dispatch import choose_path, load_kernels

    kernels = load_kernels("sampling", choose_path(device).path)
    V = 24 if _interp(path) else 50_000
    probs = _dist("longtail", V, device)
    n = 30 if _interp(path) else 100_000
    rows = torch.zeros(n, dtype=torch.int32, device=device)
    ids = torch.empty(n, dtype=torch.int32, device=device)
    valid = torch.empty(n, dtype=torch.bool, device=device)
    params = dict(top_p=dict(top_p=0.5), top_k=dict(top_k=5), joint=dict(top_k=6, top_p=0.5), min_p=dict(min_p=0.2),
                  top_k_first=dict(top_k=6, top_p=0.5))[mode]
    order = "top_k_first" if mode == "top_k_first" else "joint"
    kernels.filtered_sampling(probs, rows, ids, valid, 3, 0, order=order, max_rounds=0, **params)
    keep = sampling_keep_oracle(probs, **{k: [v] for k, v in params.items()}, order=order)[0]
    assert bool(valid.all()) and bool(keep[ids.cpu().long()].all())
    if not _interp(path):
        assert chi_square_pvalue(ids.cpu(), renorm_oracle(probs, keep[None])[0]) > P_FLOOR


# ---------------------------------------------------------------------------------------------
# Rows and calls shared by the kernel tests below
# ---------------------------------------------------------------------------------------------


def _edge_rows(V, device):
    """Rows of every kind the samplers must handle: sharp and flat, ties at the top, all zero, all
    NaN, partly NaN, one token, unnormalized, half zero."""
    g = torch.Generator().manual_seed(V)
    B = 10
    probs = torch.softmax(torch.randn(B, V, generator=g) * torch.linspace(0.3, 4.0, B)[:, None], -1)
    probs[0, :6] = probs[0, :6].max()  # ties at the top
    probs[1] = 0.0
    probs[2] = float("nan")
    probs[3, ::3] = float("nan")
    probs[4, :-1] = 0.0  # one token
    probs[5] = probs[5] * 3.0  # unnormalized
    probs[6, 1::2] = 0.0
    probs[7, V // 2:] = probs[7, V // 2]  # a long run of ties
    return probs.to(device)


def _sampler_cases(B, V, device):
    """(call, oracle filter) for every sampler family, per-request tensors and scalars."""
    g = torch.Generator().manual_seed(B + V)
    top_k = torch.randint(1, 9, (B,), generator=g, dtype=torch.int32)
    top_k[1] = V + 3  # no filter
    top_p = torch.rand(B, generator=g) * 0.9 + 0.05
    top_p[2] = 1.0
    min_p = torch.rand(B, generator=g) * 0.6

    def d(t):
        return t.to(device)

    return [
        (lambda p, **kw: S.sampling_from_probs(p, **kw), {}),
        (lambda p, **kw: S.top_p_sampling_from_probs(p, d(top_p), **kw), dict(top_p=top_p)),
        (lambda p, **kw: S.top_p_sampling_from_probs(p, 1.0, **kw), dict(top_p=[1.0] * B)),
        (lambda p, **kw: S.top_k_sampling_from_probs(p, d(top_k), **kw), dict(top_k=top_k)),
        (lambda p, **kw: S.top_k_sampling_from_probs(p, 1, **kw), dict(top_k=[1] * B)),
        (lambda p, **kw: S.min_p_sampling_from_probs(p, d(min_p), **kw), dict(min_p=min_p)),
        (lambda p, **kw: S.top_k_top_p_sampling_from_probs(p, d(top_k), d(top_p), **kw),
         dict(top_k=top_k, top_p=top_p, order="top_k_first")),
        (lambda p, **kw: S.top_k_top_p_sampling_from_probs(p, d(top_k), 0.5, filter_apply_order="joint", **kw),
         dict(top_k=top_k, top_p=[0.5] * B, order="joint")),
        (lambda p, **kw: S.top_k_top_p_sampling_from_probs(p, V + 5, 1.0, filter_apply_order="joint", **kw),
         dict(top_k=[V + 5] * B, top_p=[1.0] * B, order="joint")),
    ]


# ---------------------------------------------------------------------------------------------
# Segmented sampler, on the kernel path whatever the environment of the test run
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def seg_kernels(monkeypatch, device):
    """The kernel path; returns (kernel package, launch counter of the probability sampler's kernel), so
    a test fails if the API stops reaching it."""
    return _count_seg_launches(monkeypatch, device, "filtered", "_seg_filtered_sampling_kernel")


def _count_seg_launches(monkeypatch, device, module, kernel_name):
    """Kernel path with a launch counter wrapped around ``kernel_name`` of the package's ``module``;
    returns (kernel package, counter list)."""
    from flashtile._core.dispatch import choose_path, load_kernels

    monkeypatch.setenv("FLASHTILE_BACKEND", "triton")
    kernels = load_kernels("sampling", choose_path(device).path)
    owner = getattr(kernels, module)
    real = getattr(owner, kernel_name)
    launches = [0]

    class Counting:
        def __getitem__(self, grid):
            launches[0] += 1
            return real[grid]

    monkeypatch.setattr(owner, kernel_name, Counting())
    return kernels, launches


@pytest.mark.parametrize("vocab,dtype", [(7, torch.float32), (41, torch.bfloat16)])
def test_seg_sampler_filter_sets_and_edge_rows(seg_kernels, device, vocab, dtype):
    """Every sampler family on the segmented kernel (4 segments of 2-wide tiles under the interpreter,
    so 7 and 41 tokens leave segments partly or wholly past the end): ids in [0, vocab), inside the
    float64 oracle's filter set (never a zero-probability token), invalid rows give token 0 with valid
    False; top_k >= vocab and top_p = 1 keep every positive token."""
    kernels, launches = seg_kernels
    V = vocab if not HAS_CUDA else vocab * 3000 + 7
    probs = _edge_rows(V, device).to(dtype)
    B = probs.shape[0]
    for n, (call, filt) in enumerate(_sampler_cases(B, V, device)):
        before = launches[0]
        ids, valid = call(probs, seed=n, offset=0, return_valid=True)
        assert launches[0] == before + 1, "the API did not reach the segmented kernel"
        keep = sampling_keep_oracle(probs, **filt)
        ids, valid = ids.cpu().long(), valid.cpu()
        assert bool(((ids >= 0) & (ids < V)).all())
        has = keep.any(-1)
        assert valid.tolist() == has.tolist(), filt
        assert bool(keep[has.nonzero()[:, 0], ids[has]].all()), filt
        assert bool((ids[~has] == 0).all())


@pytest.mark.parametrize("kind", ["plain", "top_p", "top_k", "min_p", "top_k_first", "joint"])
def test_seg_sampler_distribution(seg_kernels, device, kind):
    """Samples of the segmented kernel follow the renormalized oracle distribution (chi-square, fixed
    seed). 21 tokens span 4 segments, 2 sub-segments each; the parameters force rejections, queued
    candidates and search pivots; some rows do not sum to 1 (the segmented kernel never assumes it)."""
    kernels, launches = seg_kernels
    V = 21 if not HAS_CUDA else 32001
    n = 60 if not HAS_CUDA else 200_000
    fn, filt = {
        "plain": SAMPLERS["plain"],
        "top_p": (lambda p, idx, **kw: S.top_p_sampling_from_probs(p, 0.3, idx, **kw), dict(top_p=[0.3])),
        "top_k": (lambda p, idx, **kw: S.top_k_sampling_from_probs(p, 4, idx, **kw), dict(top_k=[4])),
        "min_p": (lambda p, idx, **kw: S.min_p_sampling_from_probs(p, 0.4, idx, **kw), dict(min_p=[0.4])),
        "top_k_first": SAMPLERS["top_k_first"],
        "joint": SAMPLERS["joint"],
    }[kind]
    probs = _dist("flat", V, device)
    if kind in ("plain", "top_k", "min_p"):
        probs = probs * 2.5
    idx = torch.zeros(n, dtype=torch.int32, device=device)
    ids = fn(probs, idx, seed=23, offset=0)
    assert launches[0] == 1
    keep = sampling_keep_oracle(probs, **filt)[0]
    ids = ids.cpu().long()
    assert bool(keep[ids].all()), "a sample outside the filter set"
    assert chi_square_pvalue(ids, renorm_oracle(probs, keep[None])[0]) > P_FLOOR


@pytest.mark.parametrize("passes", [0, 1])
@pytest.mark.parametrize("mode", ["top_p", "top_k", "min_p", "joint", "top_k_first", "plain"])
def test_seg_sampler_bounded_passes(seg_kernels, device, mode, passes):
    """The segmented kernel with 0 passes (the exact fallback alone) or 1 (candidates queued, then the
    fallback): samples stay in the set and, on a GPU, follow the filtered distribution."""
    kernels, launches = seg_kernels
    V = 24 if not HAS_CUDA else 50_000
    probs = _dist("longtail", V, device)
    n = 12 if not HAS_CUDA else 100_000
    rows = torch.zeros(n, dtype=torch.int32, device=device)
    ids = torch.empty(n, dtype=torch.int32, device=device)
    valid = torch.empty(n, dtype=torch.bool, device=device)
    params = dict(top_p=dict(top_p=0.5), top_k=dict(top_k=5), joint=dict(top_k=6, top_p=0.5), min_p=dict(min_p=0.2),
                  top_k_first=dict(top_k=6, top_p=0.5), plain=dict())[mode]
    order = "top_k_first" if mode == "top_k_first" else "joint"
    kernels.filtered_sampling(probs, rows, ids, valid, 3, 0, order=order, max_rounds=passes, **params)
    assert launches[0] == 1
    keep = sampling_keep_oracle(probs, **{k: [v] for k, v in params.items()}, order=order)[0]
    assert bool(valid.all()) and bool(keep[ids.cpu().long()].all())
    if HAS_CUDA:
        assert chi_square_pvalue(ids.cpu(), renorm_oracle(probs, keep[None])[0]) > P_FLOOR


# Launch constants (kernels/sampling/config.py) that change the segmented kernel's code or its pivot lanes
# (the sampling suite's --tune grids sweep them on the GPU): every variant must keep the filter sets and the
# distributions.
SEG_VARIANTS = [dict(SEG_UNROLL=1), dict(SEG_PIVOTS_TOP_P=8, SEG_PIVOTS_MIN_P=2),
                dict(SEG_PIVOTS=4, SEG_PIVOTS_TOP_P=2, SEG_NQ=2)]


@pytest.mark.parametrize("consts", SEG_VARIANTS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_seg_sampler_launch_constants(seg_kernels, device, monkeypatch, consts):
    """Filter sets on edge rows and chi-square of top-p, top-k, min-p and joint with other launch
    constants than the defaults (the defaults run in the tests above)."""
    kernels, launches = seg_kernels
    for name, value in consts.items():
        assert hasattr(kernels.config, name), name
        monkeypatch.setattr(kernels.config, name, value)
    test_seg_sampler_filter_sets_and_edge_rows(seg_kernels, device, 41, torch.float32)
    for kind in ("top_p", "top_k", "min_p", "joint"):
        launches[0] = 0
        test_seg_sampler_distribution(seg_kernels, device, kind)


def test_seg_sampler_reproducible(seg_kernels, device):
    """Same (seed, offset) as ints or device tensors: the same samples; another seed: others; per-row
    seed/offset tensors are honoured."""
    kernels, launches = seg_kernels
    B, V = (3, 33) if not HAS_CUDA else (16, 4096)
    probs = torch.softmax(torch.randn(B, V) * 2, -1).to(device)
    a = S.top_k_top_p_sampling_from_probs(probs, 5, 0.8, filter_apply_order="joint", seed=7, offset=100)
    b = S.top_k_top_p_sampling_from_probs(probs, 5, 0.8, filter_apply_order="joint", seed=7, offset=100)
    c = S.top_k_top_p_sampling_from_probs(probs, 5, 0.8, filter_apply_order="joint",
                                          seed=torch.tensor([7], device=device),
                                          offset=torch.tensor([100], device=device))
    assert torch.equal(a, b) and torch.equal(a, c)
    many = torch.zeros(16 if not HAS_CUDA else 256, dtype=torch.int32, device=device)
    f = S.top_p_sampling_from_probs(probs, 0.9, many, seed=1, offset=0)
    g = S.top_p_sampling_from_probs(probs, 0.9, many, seed=2, offset=0)
    assert not torch.equal(f, g)
    # Per-row (seed, offset): row i with (seed_i, offset_i) equals a batch-wide (seed_i, offset_i) call's row 0.
    seeds = torch.tensor([5, 6, 7], device=device)
    offs = torch.tensor([0, 64, 9], device=device)
    h = S.top_p_sampling_from_probs(probs[:3], 0.9, seed=seeds, offset=offs)
    for r in range(3):
        one = S.top_p_sampling_from_probs(probs[r:r + 1], 0.9, seed=int(seeds[r]), offset=int(offs[r]))
        assert int(h[r]) == int(one[0])
    assert launches[0] == 9


# ---------------------------------------------------------------------------------------------
# Row split (segmented kernel with several programs per row), whatever the environment
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def split_kernels(seg_kernels, monkeypatch):
    """seg_kernels with every ``filtered_sampling`` call forced onto the row split (``split=True``;
    top_k_first keeps one program per row). Under the interpreter a chunk is 16 tokens and every program
    measures every chunk; on a GPU a chunk is SPLIT_CHUNK tokens and the programs exchange partials
    whenever the grid fits the SMs."""
    if HAS_CUDA:
        pytest.skip("GPU: the split runs by default at small batches (with exchanged partials) and is checked by "
                    "test_split_exchange_*; forcing it onto the large test batches would only run the slow local form")
    kernels, launches = seg_kernels
    real = kernels.filtered_sampling
    split_launches = [0]

    def forced(*args, **kwargs):
        kwargs.setdefault("split", True)
        if kwargs.get("top_k") is None or kwargs.get("order", "joint") != "top_k_first":
            split_launches[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "filtered_sampling", forced)
    return kernels, launches, split_launches


@pytest.mark.parametrize("vocab,dtype", [(7, torch.float32), (41, torch.bfloat16)])
def test_split_sampler_filter_sets_and_edge_rows(split_kernels, device, vocab, dtype):
    """The filter-set and edge-row checks of the segmented kernel, rows split over programs (41 tokens:
    3 chunks under the interpreter, the last one partial)."""
    kernels, launches, split_launches = split_kernels
    test_seg_sampler_filter_sets_and_edge_rows((kernels, launches), device, vocab, dtype)
    assert split_launches[0] > 0


@pytest.mark.parametrize("kind", ["plain", "top_p", "top_k", "min_p", "joint"])
def test_split_sampler_distribution(split_kernels, device, kind):
    """Chi-square of every split sampler (21 tokens: 2 chunks under the interpreter)."""
    kernels, launches, split_launches = split_kernels
    test_seg_sampler_distribution((kernels, launches), device, kind)
    assert split_launches[0] == 1


@pytest.mark.parametrize("passes", [0, 1])
@pytest.mark.parametrize("mode", ["top_p", "top_k", "min_p", "joint", "plain"])
def test_split_sampler_bounded_passes(split_kernels, device, mode, passes):
    """The exact fallback after 0 or 1 passes of a split row."""
    kernels, launches, split_launches = split_kernels
    test_seg_sampler_bounded_passes((kernels, launches), device, mode, passes)
    assert split_launches[0] == 1


def test_wave_config_sizes(monkeypatch):
    """The several-rows-per-SM configuration: its tiles, warps and register cap, and that the cap lets
    four programs share an SM's 64K registers (the one-wave design at batch 512, docs/sampling.md)."""
    from flashtile.kernels.sampling import config as C

    for filters in (dict(filtered=True, count=True, top_p_only=True), dict(filtered=True, count=False),
                    dict(filtered=False, count=False)):
        cfg = C.seg_config(32000, False, unroll=C.SEG_UNROLL, wave=True, **filters)
        assert cfg["W"] == C.SEG_WAVE_COLS and cfg["CW"] == C.SEG_WAVE_SUB_COLS
        assert cfg["num_warps"] == C.SEG_WAVE_WARPS and cfg["maxnreg"] == C.SEG_WAVE_MAXNREG
        assert cfg["seg_len"] % (cfg["W"] * C.SEG_UNROLL) == 0 and cfg["sub_len"] % cfg["CW"] == 0
        assert cfg["seg_len"] * cfg["NSEG"] >= 32000 and cfg["sub_len"] * cfg["NSUB"] >= cfg["seg_len"]
        assert 4 * cfg["num_warps"] * 32 * cfg["maxnreg"] <= 65536
        plain = C.seg_config(32000, False, unroll=C.SEG_UNROLL, **filters)
        assert plain["W"] == C.SEG_COLS and plain["num_warps"] == C.SEG_WARPS and "maxnreg" not in plain
        # The interpreter keeps its tiny tiles whatever the batch.
        assert "maxnreg" not in C.seg_config(32000, True, unroll=1, wave=True, **filters)
    # The launch of a batch: the wave configuration from SEG_WAVE_ROWS rows per SM at short rows, not for
    # top_k_first (its top-k search spills under a register cap), not for long rows.
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(C, "num_sms", lambda d: 132)
    batch = C.SEG_WAVE_ROWS * 132

    def launch(vocab, batch, **filters):
        filters = {"top_k": None, "top_p": None, "min_p": None, "order": "joint", **filters}
        return C.sampler_launch(vocab, batch, cuda, False, **filters)

    wave = launch(32000, batch, top_p=0.9)
    assert wave.grid == (batch,) and wave.kwargs["num_warps"] == C.SEG_WAVE_WARPS
    assert wave.kwargs["maxnreg"] == C.SEG_WAVE_MAXNREG and wave.part_numel is None
    for one in (launch(32000, batch - 1, top_p=0.9), launch(C.SEG_WAVE_MAX_VOCAB + 1, batch, top_p=0.9),
                launch(32000, batch, top_k=50, top_p=0.9, order="top_k_first")):
        assert one.grid[1:] == () and one.kwargs["num_warps"] == C.SEG_WARPS and "maxnreg" not in one.kwargs


def test_split_layout_rule(monkeypatch):
    """The default split: a GPU, the smallest SPLIT_CHUNK * 2^m chunk (at most SPLIT_MAX_CHUNK) with
    batch x chunks <= SMs, else <= SMs x SPLIT_PER_SM, at least 2 chunks, not top_k_first, not turned off."""
    from flashtile.kernels.sampling import config as K

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(K, "num_sms", lambda d: 132)
    c = K.SPLIT_CHUNK
    assert K.split_layout(128256, 1, cuda) == (-(-128256 // c), c)
    for top_k in (None, 50):
        per_sm = K.SPLIT_PER_SM if top_k else 1  # more than one program per SM: samplers with top-k only
        for batch in (1, 2, 3, 4, 5, 8, 16, 33, 64, 65, 66, 67, 131, 132, 133):
            n, chunk = K.split_layout(128256, batch, cuda, top_k=top_k)
            fits = 132 if batch * 2 <= 132 else 132 * per_sm  # one program per SM while 2 chunks fit
            if n:
                assert n >= 2 and batch * n <= fits and n == -(-128256 // chunk) and chunk % c == 0
                assert chunk <= K.SPLIT_MAX_CHUNK
                assert chunk == c or batch * -(-128256 // (chunk // 2)) > fits  # the smallest chunk that fits
            else:
                assert batch * 2 > 132 * per_sm
    assert K.split_layout(128256, 16, cuda) == (8, 16384) and K.split_layout(128256, 17, cuda) == (4, 32768)
    assert K.split_layout(128256, 33, cuda) == (4, 32768) and K.split_layout(128256, 34, cuda) == (2, 65536)
    assert K.split_layout(128256, 66, cuda) == (2, 65536) and K.split_layout(128256, 67, cuda) == (0, 0)
    assert K.split_layout(128256, 128, cuda, top_k=50) == (2, 65536)
    assert K.split_layout(128256, 133, cuda, top_k=50) == (0, 0)
    monkeypatch.setattr(K, "SPLIT_PER_SM", 1)
    assert K.split_layout(128256, 66, cuda, top_k=50) == (2, 65536)
    assert K.split_layout(128256, 67, cuda, top_k=50) == (0, 0)
    monkeypatch.setattr(K, "SPLIT_PER_SM", 2)
    assert K.split_layout(c, 1, cuda) == (0, 0)  # one chunk: nothing to split
    assert K.split_layout(128256, 1, cuda, "top_k_first", top_k=50) == (0, 0)
    assert K.split_layout(128256, 1, cuda, "top_k_first")[0] > 0  # no top-k: the order is moot
    assert K.split_layout(128256, 1, torch.device("cpu")) == (0, 0)
    monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "50")  # 66 SMs usable: batch 4 needs 8192-token chunks
    assert K.split_layout(128256, 4, cuda) == (16, 8192) and K.split_layout(128256, 5, cuda) == (8, 16384)
    assert K.split_layout(128256, 33, cuda) == (2, 65536) and K.split_layout(128256, 34, cuda) == (0, 0)
    assert K.split_layout(128256, 66, cuda, top_k=50) == (2, 65536)
    monkeypatch.delenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
    monkeypatch.setenv("FLASHTILE_SAMPLING_SPLIT", "0")
    assert K.split_layout(128256, 1, cuda) == (0, 0)


@pytest.mark.parametrize("consts", [dict(SPLIT_NQ=8, SPLIT_PIVOTS=16), dict(SPLIT_PIVOTS=4, SPLIT_NQ=2),
                                    dict(SPLIT_SEG_INTERPRETED=16), dict(SPLIT_SEG_INTERPRETED=4)],
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_split_sampler_launch_constants(split_kernels, device, monkeypatch, consts):
    """Other lane and candidate counts of the split (the sampling suite's --tune grids sweep them), and 1 or 4
    published segments per chunk instead of 2: filter sets on edge rows (every filter) and chi-square of
    top-p and top-k."""
    kernels, launches, split_launches = split_kernels
    for name, value in consts.items():
        assert hasattr(kernels.config, name), name
        monkeypatch.setattr(kernels.config, name, value)
    test_seg_sampler_filter_sets_and_edge_rows((kernels, launches), device, 41, torch.float32)
    for kind in ("top_p", "top_k"):
        launches[0] = 0
        test_seg_sampler_distribution((kernels, launches), device, kind)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [128256, 50001])
def test_split_exchange_matches_local(monkeypatch, vocab):
    """On the GPU, programs that exchange partials through the row barrier give the same bits as
    programs that each measure every chunk (SPLIT_EXCHANGE=False), for every filter, batch 1, 3, 16, 40
    and 100 (the default layouts of these batches; 16 and up and the fallback at vocab 128256 only, to
    bound the compiles), per-request parameters and many seeds."""
    import flashtile.kernels.sampling as K
    from flashtile.kernels.sampling import config as C

    g = torch.Generator().manual_seed(vocab)
    probs = torch.softmax(torch.randn(3, vocab, generator=g) * torch.tensor([[0.5], [2.0], [4.0]]), -1).cuda()
    probs[2, ::7] = 0.0
    params = [dict(), dict(top_p=0.9), dict(top_p=0.3), dict(top_k=50), dict(top_k=2), dict(min_p=0.05),
              dict(top_k=50, top_p=0.9), dict(top_k=torch.tensor([1, 7, 500], dtype=torch.int32, device="cuda"),
                                              top_p=torch.tensor([0.2, 0.9, 1.0], device="cuda"))]
    layouts = [(1, params), (3, params)]
    if vocab == 128256:
        # 16: 8 chunks of 16384; 40: 4 of 32768 (8 published segments each); 100: 2 of 65536, two programs
        # per SM with capped registers (the H100's 132 SMs; other GPUs give other layouts).
        layouts += [(16, params), (40, params[1:2] + params[3:4] + params[5:6] + params[7:]),
                    (100, params[1:2] + params[3:4] + params[5:6] + params[7:])]
    for batch, batch_params in layouts:
        nchunks, chunk = K.split_layout(vocab, batch, probs.device, top_k=50)  # forced below for every filter
        assert nchunks > 0
        rows = probs[torch.arange(batch) % 3]
        for kw in batch_params:
            kw = {k: (v[torch.arange(batch, device="cuda") % 3] if isinstance(v, torch.Tensor) else v)
                  for k, v in kw.items()}
            for seed in range(8):
                got = []
                for exchange in (True, False):
                    monkeypatch.setattr(C, "SPLIT_EXCHANGE", exchange)
                    out = torch.empty(batch, dtype=torch.int32, device="cuda")
                    valid = torch.empty(batch, dtype=torch.bool, device="cuda")
                    K.filtered_sampling(rows, None, out, valid, seed, 0, split=chunk, **kw)
                    got.append((out.tolist(), valid.tolist()))
                assert got[0] == got[1], (batch, kw, seed)
    # The exact fallback after 0 or 1 passes, partials exchanged: the same bits, inside the filter set.
    for kw in params[1:] if vocab == 128256 else []:
        for max_rounds in (0, 1):
            got = []
            for exchange in (True, False):
                monkeypatch.setattr(C, "SPLIT_EXCHANGE", exchange)
                out = torch.empty(3, dtype=torch.int32, device="cuda")
                valid = torch.empty(3, dtype=torch.bool, device="cuda")
                K.filtered_sampling(probs, None, out, valid, 5, 0, split=C.SPLIT_CHUNK, max_rounds=max_rounds, **kw)
                got.append((out.tolist(), valid.tolist()))
            assert got[0] == got[1], (kw, max_rounds)
            filt = {k: (v.cpu() if isinstance(v, torch.Tensor) else [v] * 3) for k, v in kw.items()}
            keep = sampling_keep_oracle(probs, **filt)
            assert bool(keep[torch.arange(3), torch.tensor(got[0][0])].all()), (kw, max_rounds)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [16, 128])
@pytest.mark.parametrize("mode", ["plain", "top_p", "top_k", "min_p", "joint"])
def test_split_exchange_distribution(mode, batch):
    """Chi-square of the split kernel with partials exchanged, 1500 calls with new seeds, on a Zipf-like
    row whose kept set spans several chunks: 16 rows x 5 chunks of 4096 (one published segment each), and
    128 rows x 2 chunks of 16384 (4 published segments each; two programs per SM on the H100, forced for
    every filter)."""
    import flashtile.kernels.sampling as K
    from flashtile.kernels.sampling import config as C

    V = 4 * C.SPLIT_CHUNK + 3
    probs = _dist("longtail", V, "cuda")
    params = dict(plain=dict(), top_p=dict(top_p=0.5), top_k=dict(top_k=6), min_p=dict(min_p=0.1),
                  joint=dict(top_k=9, top_p=0.5))[mode]
    rows = torch.zeros(batch, dtype=torch.int32, device="cuda")
    nchunks, chunk = K.split_layout(V, batch, probs.device, top_k=1)  # forced below for every filter
    if batch == 16:
        assert (nchunks, chunk) == (5, C.SPLIT_CHUNK)
    elif nchunks != 2:
        pytest.skip(f"this GPU gives batch {batch} the layout {(nchunks, chunk)}")
    ids = []
    for seed in range(1500):
        out = torch.empty(batch, dtype=torch.int32, device="cuda")
        valid = torch.empty(batch, dtype=torch.bool, device="cuda")
        K.filtered_sampling(probs, rows, out, valid, seed, 0, split=chunk, **params)
        ids.append(out)
    ids = torch.cat(ids).cpu()
    keep = sampling_keep_oracle(probs, **{k: [v] for k, v in params.items()})[0]
    assert bool(keep[ids.long()].all())
    assert chi_square_pvalue(ids, renorm_oracle(probs, keep[None])[0]) > P_FLOOR


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["plain", "top_p", "top_k", "min_p", "joint", "top_k_first"])
def test_wave_config_distribution(mode):
    """Batches of several rows per SM run the one-program kernel with SEG_WAVE_WARPS and capped registers
    (top_k_first: the standard configuration): every id in the filter set and chi-square (2 x SMs + 8 rows
    per call, 100 calls)."""
    import flashtile.kernels.sampling as K
    from flashtile.kernels.sampling import config as C

    V = 4 * C.SPLIT_CHUNK + 3
    probs = _dist("longtail", V, "cuda")
    params = dict(plain=dict(), top_p=dict(top_p=0.5), top_k=dict(top_k=6), min_p=dict(min_p=0.1),
                  joint=dict(top_k=9, top_p=0.5), top_k_first=dict(top_k=9, top_p=0.5))[mode]
    order = "top_k_first" if mode == "top_k_first" else "joint"
    batch = C.SEG_WAVE_ROWS * C.usable_sms(probs.device) + 8
    assert K.split_layout(V, batch, probs.device) == (0, 0)
    rows = torch.zeros(batch, dtype=torch.int32, device="cuda")
    ids = []
    for seed in range(100):
        out = torch.empty(batch, dtype=torch.int32, device="cuda")
        valid = torch.empty(batch, dtype=torch.bool, device="cuda")
        K.filtered_sampling(probs, rows, out, valid, seed, 0, order=order, **params)
        assert bool(valid.all())
        ids.append(out)
    ids = torch.cat(ids).cpu()
    keep = sampling_keep_oracle(probs, **{k: [v] for k, v in params.items()}, order=order)[0]
    assert bool(keep[ids.long()].all())
    assert chi_square_pvalue(ids, renorm_oracle(probs, keep[None])[0]) > P_FLOOR


def test_seg_sampling_from_logits(monkeypatch, device):
    """sampling_from_logits on the segmented kernel: follows softmax(logits)
    with -inf and NaN entries (never drawn); a row without a finite logit is invalid (token 0)."""
    kernels, launches = _count_seg_launches(monkeypatch, device, "logits", "_seg_logits_sampling_kernel")
    V = 41 if not HAS_CUDA else 128256
    n = 120 if not HAS_CUDA else 200_000
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, V, generator=g) * 2
    logits[0, ::5] = float("-inf")
    logits[0, 3] = float("nan")
    target = softmax_oracle(torch.nan_to_num(logits, nan=float("-inf")), None)[0]
    idx = torch.zeros(n, dtype=torch.int32, device=device)
    ids = S.sampling_from_logits(logits.to(device), idx, seed=9, offset=0).cpu().long()
    assert launches[0] == 1
    assert bool((target[ids] > 0).all())
    assert chi_square_pvalue(ids, target) > P_FLOOR
    rows = torch.randn(3, V)
    rows[0] = float("-inf")
    rows[1, :] = float("nan")
    rows[1, V - 1] = 0.0  # one finite logit
    ids, valid = S.sampling_from_logits(rows.to(device), seed=1, offset=0, return_valid=True)
    assert valid.cpu().tolist() == [False, True, True] and ids.cpu().tolist()[:2] == [0, V - 1]
    assert launches[0] == 2


@pytest.mark.parametrize("temperature", [None, "tensor"])
def test_seg_softmax_and_logits_top_k_top_p(monkeypatch, device, temperature):
    """softmax on segmented passes against the oracle (-inf entries, a dead
    row, per-row temperature), and top_k_top_p_sampling_from_logits (segmented softmax, then the
    segmented top_k_first sampler) inside the oracle's filter set."""
    monkeypatch.setenv("FLASHTILE_BACKEND", "triton")
    V = 45 if not HAS_CUDA else 128256
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(3, V, generator=g) * 3
    logits[0, :10] = float("-inf")
    logits[1] = float("-inf")
    t = torch.tensor([0.5, 1.0, 2.0]) if temperature == "tensor" else None
    out = S.softmax(logits.to(device), t.to(device) if t is not None else None)
    expected = softmax_oracle(logits, t)
    expected[1] = 0.0
    torch.testing.assert_close(out.double().cpu(), expected, atol=1e-6, rtol=1e-5)
    if temperature is None:
        live = logits[[0, 2]]
        ids = S.top_k_top_p_sampling_from_logits(live.to(device), 5, 0.6, seed=4, offset=0).cpu().long()
        keep = sampling_keep_oracle(softmax_oracle(live), top_k=[5, 5], top_p=[0.6, 0.6], order="top_k_first")
        assert bool(keep[torch.arange(2), ids].all())


# ---------------------------------------------------------------------------------------------
# Speculative sampling
# ---------------------------------------------------------------------------------------------


def _spec_inputs(B, n, V, device, same=False):
    g = torch.Generator().manual_seed(B * 100 + n)
    draft = torch.softmax(torch.randn(B, n, V, generator=g), -1)
    target = torch.softmax(torch.randn(B, n + 1, V, generator=g), -1)
    if same:
        target[:, :n] = draft
    ids = torch.multinomial(draft.reshape(-1, V), 1, generator=g).reshape(B, n).to(torch.int32)
    return draft.to(device), ids.to(device), target.to(device)


def test_spec_identical_accepts_all(path, device):
    B, n, V = (3, 4, 20) if _interp(path) else (64, 5, 32000)
    draft, ids, target = _spec_inputs(B, n, V, device, same=True)
    acc_total = torch.zeros(B, dtype=torch.int32, device=device)
    out, acc, emi = S.chain_speculative_sampling(draft, ids, target, acc_total, None, seed=1, offset=0)
    assert acc is acc_total
    assert acc.cpu().tolist() == [n] * B and emi.cpu().tolist() == [n] * B
    assert torch.equal(out[:, :n].cpu(), ids.cpu())
    assert bool((out[:, n] >= 0).all())


def test_spec_zero_target_rejected_and_layout(path, device):
    B, n, V = (3, 3, 20) if _interp(path) else (32, 5, 32000)
    draft, ids, target = _spec_inputs(B, n, V, device)
    target = target.clone()
    target[:, 1].scatter_(-1, ids[:, 1:2].long(), 0.0)  # draft token 1 has target probability 0
    out, acc, emi = S.chain_speculative_sampling(draft, ids, target, seed=3, offset=0)
    out, acc, emi = out.cpu(), acc.cpu(), emi.cpu()
    assert bool((emi <= 1).all()) and bool((acc <= n - 1).all())
    for b in range(B):
        e = int(emi[b])
        assert out[b, :e].tolist() == ids[b, :e].cpu().tolist()
        assert 0 <= out[b, e] < V and out[b, e + 1:].tolist() == [-1] * (n - e)
        assert target.cpu()[b, e, out[b, e]] > 0


def test_spec_output_follows_target(path, device):
    """The first emitted token is distributed as target_probs[:, 0] whatever the draft (n = 1)."""
    V = 6 if _interp(path) else 50
    N = 100 if _interp(path) else (200_000 if HAS_CUDA else 6_000)
    g = torch.Generator().manual_seed(9)
    q = torch.softmax(torch.randn(V, generator=g) * 2, -1)
    t = torch.softmax(torch.randn(2, V, generator=g) * 2, -1)
    draft = q.expand(N, 1, V).contiguous()
    ids = torch.multinomial(q, N, replacement=True, generator=g).to(torch.int32)[:, None]
    target = t.expand(N, 2, V).contiguous()
    out, _, _ = S.chain_speculative_sampling(draft.to(device), ids.to(device), target.to(device), seed=4, offset=0)
    assert chi_square_pvalue(out[:, 0].cpu(), t[0].double()) > P_FLOOR


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_errors():
    probs = torch.full((4, 8), 1 / 8)
    with pytest.raises(ValueError, match="0-dimensional"):
        S.top_p_sampling_from_probs(probs, torch.tensor(0.5))
    with pytest.raises(ValueError, match="got a 2D tensor"):
        S.top_k_sampling_from_probs(probs, torch.ones(4, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="batch size mismatch"):
        S.min_p_sampling_from_probs(probs, torch.full((3,), 0.1))
    with pytest.raises(ValueError, match="top_k"):
        S.top_k_sampling_from_probs(probs, 0)
    for p in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="top_p"):
            S.top_p_renorm_probs(probs, p)
    with pytest.raises(ValueError, match="min_p"):
        S.min_p_sampling_from_probs(probs, 1.5)
    with pytest.raises(TypeError, match="top_k"):
        S.top_k_sampling_from_probs(probs, torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="min_p"):
        S.min_p_sampling_from_probs(probs, torch.ones(4, dtype=torch.complex64))
    with pytest.raises(TypeError, match="temperature"):
        S.softmax(probs, torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="top_k"):
        S.top_k_renorm_probs(probs, 2.5)
    with pytest.raises(TypeError, match="probs"):
        S.sampling_from_probs(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="probs"):
        S.sampling_from_probs(torch.ones(8))
    with pytest.raises(ValueError, match="Invalid filter_apply_order"):
        S.top_k_top_p_sampling_from_probs(probs, 2, 0.5, filter_apply_order="top_p_first")
    with pytest.raises(ValueError, match="seed and offset"):
        S.sampling_from_probs(probs, seed=1)
    with pytest.raises(ValueError, match="length 1 or batch_size"):
        S.sampling_from_probs(probs, seed=torch.tensor([1, 2]), offset=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="indices"):
        S.sampling_from_probs(probs, torch.zeros(3))
    with pytest.raises(ValueError, match="temperature"):
        S.softmax(probs, 0.0)
    with pytest.raises(ValueError, match="target_probs"):
        S.chain_speculative_sampling(torch.ones(2, 3, 8), torch.zeros(2, 3, dtype=torch.int32), torch.ones(2, 3, 8))
    with pytest.raises(ValueError, match="draft_token_ids"):
        S.chain_speculative_sampling(torch.ones(2, 3, 8), torch.zeros(2, 4, dtype=torch.int32), torch.ones(2, 4, 8))


def test_aliases_and_signature():
    import inspect

    assert S.top_p_renorm_prob is S.top_p_renorm_probs and S.top_k_renorm_prob is S.top_k_renorm_probs
    params = list(inspect.signature(S.top_k_top_p_sampling_from_probs).parameters)
    assert params[:8] == ["probs", "top_k", "top_p", "indices", "filter_apply_order", "deterministic", "generator",
                          "check_nan"]
    assert {"seed", "offset", "return_valid"} <= set(params)


# ---------------------------------------------------------------------------------------------
# GPU: CUDA graphs
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_graph_replay_new_offsets():
    """One decode-step sampling call captured once, replayed with new device seed/offset values."""
    device = torch.device("cuda")
    probs = torch.softmax(torch.randn(128, 128256, device=device), -1)
    seed = torch.tensor([1], device=device)
    offset = torch.tensor([0], device=device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        S.top_k_top_p_sampling_from_probs(probs, 50, 0.9, seed=seed, offset=offset)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = S.top_k_top_p_sampling_from_probs(probs, 50, 0.9, seed=seed, offset=offset)
    results = []
    for off in (0, 1000, 0):
        offset.fill_(off)
        graph.replay()
        torch.cuda.synchronize()
        results.append(out.clone())
        assert torch.equal(out, S.top_k_top_p_sampling_from_probs(probs, 50, 0.9, seed=1, offset=off))
    assert torch.equal(results[0], results[2]) and not torch.equal(results[0], results[1])
    # default generator inside the graph: each replay draws new randomness
    g2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g2):
        out2 = S.top_p_sampling_from_probs(probs, 0.9)
    g2.replay()
    first = out2.clone()
    g2.replay()
    assert not torch.equal(first, out2)


def test_known_metadata_still_checks_values(path, device):
    """After a good call, calls with the same metadata skip the metadata checks (_core/memo.py) but still
    check every value: the filter scalars, check_nan, seed/offset; each call draws from its own probs."""
    probs = torch.zeros(2, 8, device=device)
    for token in (3, 5, 6):  # one-hot rows: each call must read its own probs
        probs.zero_()
        probs[:, token] = 1.0
        assert S.top_p_sampling_from_probs(probs, 0.9, seed=1, offset=0).tolist() == [token, token]
    for bad, error in ((0.0, ValueError), (1.5, ValueError), (True, TypeError), ("0.5", TypeError)):
        with pytest.raises(error, match="top_p"):
            S.top_p_sampling_from_probs(probs, bad, seed=1, offset=0)
    nan_probs = probs.clone()
    nan_probs[1, 0] = float("nan")
    with pytest.raises(ValueError, match="Input probs contains NaN"):
        S.top_p_sampling_from_probs(nan_probs, 0.9, check_nan=True)
    with pytest.raises(ValueError, match="seed and offset"):
        S.top_p_sampling_from_probs(probs, 0.9, seed=1)
    for k in (2, 3):
        S.top_k_top_p_sampling_from_probs(probs, k, 0.5, filter_apply_order="joint", seed=1, offset=0)
    with pytest.raises(ValueError, match="top_k"):
        S.top_k_top_p_sampling_from_probs(probs, 0, 0.5, filter_apply_order="joint")
    with pytest.raises(ValueError, match="Invalid filter_apply_order"):
        S.top_k_top_p_sampling_from_probs(probs, 2, 0.5, filter_apply_order="top_p_first")
