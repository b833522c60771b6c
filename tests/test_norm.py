"""flashtile.norm against float64 oracles on the reference and kernel paths: 2-D and per-head 3-D
input, odd hidden sizes, strided views, in-place semantics, the two-pass path, ops, errors."""

import pytest
import torch

import flashtile.norm as norm
from conftest import HAS_CUDA
from flashtile._core import ops_small
from flashtile._core.graphs import capture_graph
from oracles import TOLERANCES, fused_add_rmsnorm_f64, layernorm_f64, rmsnorm_f64

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (rows, hidden): odd sizes, a qk-norm-like narrow shape, one wider row. The GPU adds model sizes.
SHAPES = [(1, 111), (7, 128), (3, 640)]
if HAS_CUDA:
    SHAPES += [(1, 4096), (129, 4096), (33, 5120), (17, 7168), (16, 8192), (5, 14336), (3, 16384), (2, 40000),
               (4096, 4096), (1000, 111)]


def _close(out, ref, dtype):
    assert not out.isnan().any(), "output has NaN (unwritten element?)"
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double().cpu(), ref, atol=atol, rtol=rtol)


def _weight(n, dtype, device):
    return torch.randn(n, dtype=torch.float32, device=device).mul_(0.5).add_(1.0).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("gemma", [False, True])
def test_rmsnorm(path, device, dtype, shape, gemma):
    x = torch.randn(*shape, dtype=dtype, device=device)
    w = _weight(shape[1], dtype, device)
    fn = norm.gemma_rmsnorm if gemma else norm.rmsnorm
    out = fn(x, w)
    assert out.shape == x.shape and out.dtype == dtype
    _close(out, rmsnorm_f64(x, w, 1e-6, 1.0 if gemma else 0.0), dtype)


QK_SHAPES = [(5, 3, 64), (9, 2, 128)] + ([(4608, 48, 128), (1, 32, 128), (300, 8, 256)] if HAS_CUDA else [])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", QK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rmsnorm_per_head_3d(path, device, dtype, shape):
    """QK-norm: [tokens, heads, head_dim], every head normalized over head_dim with one weight."""
    x = torch.randn(*shape, dtype=dtype, device=device)
    w = _weight(shape[-1], dtype, device)
    out = norm.rmsnorm(x, w, eps=1e-5)
    _close(out, rmsnorm_f64(x, w, 1e-5), dtype)


def test_rmsnorm_strided_views_and_out(path, device):
    """Input a column slice of a wider tensor; 3-D input the q heads of a fused QKV buffer; out a
    strided view. Only out changes."""
    wide = torch.randn(6, 300, dtype=torch.bfloat16, device=device)
    x = wide[:, 7:207]  # row stride 300
    w = _weight(200, torch.bfloat16, device)
    out_buf = torch.full((6, 2, 200), float("nan"), dtype=torch.bfloat16, device=device)
    out = norm.rmsnorm(x, w, out=out_buf[:, 1])
    assert out.data_ptr() == out_buf[:, 1].data_ptr()
    _close(out, rmsnorm_f64(x, w), torch.bfloat16)
    assert out_buf[:, 0].isnan().all()

    qkv = torch.randn(5, (4 + 2 + 2) * 64, dtype=torch.float16, device=device)
    q = qkv[:, : 4 * 64].view(5, 4, 64)  # token stride 512
    before = qkv.clone()
    wq = _weight(64, torch.float16, device)
    _close(norm.rmsnorm(q, wq), rmsnorm_f64(q, wq), torch.float16)
    assert torch.equal(qkv, before)

    xt = torch.randn(64, 4, dtype=torch.float32, device=device).t()  # column stride 4
    wt = _weight(64, torch.float32, device)
    _close(norm.rmsnorm(xt, wt), rmsnorm_f64(xt, wt), torch.float32)


def test_rmsnorm_weight_dtype_may_differ(path, device):
    x = torch.randn(3, 96, dtype=torch.bfloat16, device=device)
    w = _weight(96, torch.float32, device)
    _close(norm.rmsnorm(x, w), rmsnorm_f64(x, w), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("gemma", [False, True])
def test_fused_add_rmsnorm_in_place(path, device, dtype, shape, gemma):
    """input <- rmsnorm(input + residual), residual <- input + residual; the weight and the rest of
    the buffers they are views of do not change."""
    rows, hidden = shape
    buf = torch.randn(rows, hidden + 5, dtype=dtype, device=device)
    x = buf[:, 2 : 2 + hidden]  # a strided view
    residual = torch.randn(rows, hidden, dtype=dtype, device=device)
    w = _weight(hidden, dtype, device)
    x0, r0, buf0, w0 = x.clone(), residual.clone(), buf.clone(), w.clone()
    fn = norm.gemma_fused_add_rmsnorm if gemma else norm.fused_add_rmsnorm
    assert fn(x, residual, w, eps=1e-5) is None
    ref_x, ref_r = fused_add_rmsnorm_f64(x0, r0, w0, 1e-5, 1.0 if gemma else 0.0)
    _close(residual, ref_r, dtype)
    _close(x, ref_x, dtype)
    assert torch.equal(w, w0)
    assert torch.equal(buf[:, :2], buf0[:, :2]) and torch.equal(buf[:, 2 + hidden :], buf0[:, 2 + hidden :])


def test_fused_add_rmsnorm_3d(path, device):
    x = torch.randn(4, 3, 64, dtype=torch.bfloat16, device=device)
    r = torch.randn(4, 3, 64, dtype=torch.bfloat16, device=device)
    w = _weight(64, torch.bfloat16, device)
    ref_x, ref_r = fused_add_rmsnorm_f64(x, r, w)
    norm.fused_add_rmsnorm(x, r, w)
    _close(x, ref_x, torch.bfloat16)
    _close(r, ref_r, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layernorm(path, device, dtype, shape):
    x = (torch.randn(*shape, dtype=torch.float32, device=device) * 2 + 3).to(dtype)  # mean far from 0
    gamma = torch.randn(shape[1], dtype=torch.float32, device=device)
    beta = torch.randn(shape[1], dtype=torch.float32, device=device)
    out = norm.layernorm(x, gamma, beta, eps=1e-5)
    assert out.dtype == dtype
    _close(out, layernorm_f64(x, gamma, beta, 1e-5), dtype)
    out2 = torch.empty_like(x)
    assert norm.layernorm(x, gamma, beta, 1e-5, out=out2) is out2
    _close(out2, layernorm_f64(x, gamma, beta, 1e-5), dtype)


def test_two_pass_path(path, device, monkeypatch):
    """Rows longer than MAX_ONE_PASS loop over chunks (two passes); shrink the limit to test it small."""
    kernels = None
    if path == "kernel":
        from flashtile._core.dispatch import choose_path, load_kernels

        kernels = load_kernels("norm", choose_path(device).path)
        monkeypatch.setattr(kernels, "MAX_ONE_PASS", 64)
        monkeypatch.setattr(kernels, "LOOP_BLOCK", 32)
        kernels.norm_config.cache_clear()  # configs are memoized per shape
        assert kernels.norm_config(3, 111, 4)[2] is False
    try:
        x = torch.randn(3, 111, dtype=torch.bfloat16, device=device)
        r = torch.randn(3, 111, dtype=torch.bfloat16, device=device)
        w = _weight(111, torch.bfloat16, device)
        g, b = torch.randn(111, device=device), torch.randn(111, device=device)
        _close(norm.rmsnorm(x, w), rmsnorm_f64(x, w), torch.bfloat16)
        _close(norm.layernorm(x, g, b), layernorm_f64(x, g, b), torch.bfloat16)
        ref_x, ref_r = fused_add_rmsnorm_f64(x, r, w)
        norm.fused_add_rmsnorm(x, r, w)
        _close(r, ref_r, torch.bfloat16)
        # The second pass reads the rounded residual (documented): compare against the oracle on it.
        _close(x, rmsnorm_f64(r, w) if path == "kernel" else ref_x, torch.bfloat16)
    finally:
        if kernels is not None:
            kernels.norm_config.cache_clear()


def test_empty_batch(path, device):
    x = torch.randn(0, 64, dtype=torch.float16, device=device)
    w = _weight(64, torch.float16, device)
    assert norm.rmsnorm(x, w).shape == (0, 64)
    norm.fused_add_rmsnorm(x, x.clone(), w)


def test_block_shape_follows_row_length():
    """Narrow rows share a program; wide rows get one program each and more warps."""
    pytest.importorskip("triton")
    from flashtile.kernels.norm import norm_config

    block_m, block_n, one_pass, _ = norm_config(4608 * 48, 128, 132)
    assert block_m > 1 and block_n == 128 and one_pass
    block_m, block_n, one_pass, warps_4k = norm_config(4096, 4096, 132)
    assert block_m == 1 and block_n == 4096 and one_pass
    assert norm_config(16, 128, 132)[0] == 1  # few rows: keep programs for every SM
    assert norm_config(16384, 16384, 132)[3] > warps_4k
    assert norm_config(2, 40000, 132)[2] is False


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

F16 = torch.float16


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: norm.rmsnorm(torch.randn(4, 8, dtype=F16), torch.randn(9, dtype=F16)), ValueError, "weight"),
        (lambda: norm.rmsnorm(torch.randn(4, 8, dtype=F16), torch.randn(2, 4, dtype=F16)), ValueError, "weight"),
        (lambda: norm.rmsnorm(torch.randn(8, dtype=F16), torch.randn(8, dtype=F16)), ValueError, "input"),
        (lambda: norm.rmsnorm(torch.randn(2, 2, 2, 8, dtype=F16), torch.randn(8, dtype=F16)), ValueError, "input"),
        (lambda: norm.rmsnorm(torch.randint(0, 5, (4, 8)), torch.randn(8, dtype=F16)), TypeError, "input"),
        (lambda: norm.rmsnorm(torch.randn(4, 8, dtype=F16), torch.randint(0, 5, (8,))), TypeError, "weight"),
        (lambda: norm.rmsnorm("x", torch.randn(8)), TypeError, "input"),
        (lambda: norm.rmsnorm(torch.randn(4, 0, dtype=F16), torch.randn(0, dtype=F16)), ValueError, "hidden_size"),
        (lambda: norm.rmsnorm(torch.randn(4, 8, dtype=F16), torch.randn(8, dtype=F16), eps=-1.0), ValueError, "eps"),
        (lambda: norm.rmsnorm(torch.randn(4, 8, dtype=F16), torch.randn(8, dtype=F16), eps="a"), TypeError, "eps"),
        (lambda: norm.rmsnorm(torch.randn(4, 8, dtype=F16), torch.randn(8, dtype=F16),
                              out=torch.empty(4, 7, dtype=F16)), ValueError, "out"),
        (lambda: norm.rmsnorm(torch.randn(4, 8, dtype=F16), torch.randn(8, dtype=F16),
                              out=torch.empty(4, 8)), TypeError, "out"),
        (lambda: norm.rmsnorm(torch.randn(4, 8, dtype=F16), torch.randn(8, dtype=F16, device="meta")),
         ValueError, "weight"),
        (lambda: norm.gemma_rmsnorm(torch.randn(4, 8, dtype=F16), torch.randn(7, dtype=F16)), ValueError, "weight"),
        (lambda: norm.fused_add_rmsnorm(torch.randn(4, 8, dtype=F16), torch.randn(4, 9, dtype=F16),
                                        torch.randn(8, dtype=F16)), ValueError, "residual"),
        (lambda: norm.fused_add_rmsnorm(torch.randn(4, 8, dtype=F16), torch.randn(4, 8, dtype=torch.bfloat16),
                                        torch.randn(8, dtype=F16)), TypeError, "residual"),
        (lambda: norm.gemma_fused_add_rmsnorm(torch.randn(4, 8, dtype=F16), torch.randn(4, 8, dtype=F16),
                                              torch.randn(16, dtype=F16)), ValueError, "weight"),
        (lambda: norm.layernorm(torch.randn(4, 8, dtype=F16), torch.randn(8), torch.randn(7)), ValueError, "beta"),
        (lambda: norm.layernorm(torch.randn(4, 8, dtype=F16), torch.randn(6), torch.randn(8)), ValueError, "gemma"),
    ],
)
def test_bad_input_raises(call, error, name):
    with pytest.raises(error) as info:
        call()
    assert name in str(info.value)


def test_nothing_changes_on_error():
    x = torch.randn(4, 8, dtype=F16)
    r = torch.randn(4, 8, dtype=F16)
    x0, r0 = x.clone(), r.clone()
    with pytest.raises(ValueError):
        norm.fused_add_rmsnorm(x, r, torch.randn(9, dtype=F16))
    assert torch.equal(x, x0) and torch.equal(r, r0)


# ---------------------------------------------------------------------------------------------
# torch.library
# ---------------------------------------------------------------------------------------------


def _rms_args(device):
    x = torch.randn(5, 64, dtype=torch.bfloat16, device=device)
    return (x, _weight(64, torch.bfloat16, device), torch.empty_like(x), 1e-6, 0.0)


def _fused_args(device):
    x = torch.randn(5, 64, dtype=torch.float16, device=device)
    return (x, torch.randn_like(x), _weight(64, torch.float16, device), 1e-6, 1.0)


def _ln_args(device):
    x = torch.randn(5, 64, dtype=torch.bfloat16, device=device)
    return (x, torch.randn(64, device=device), torch.randn(64, device=device), torch.empty_like(x), 1e-6)


@pytest.mark.parametrize("op, make_args", [(ops_small.rmsnorm, _rms_args), (ops_small.fused_add_rmsnorm, _fused_args),
                                           (ops_small.layernorm, _ln_args)], ids=["rmsnorm", "fused_add", "layernorm"])
def test_opcheck(path, device, op, make_args):
    torch.library.opcheck(op, make_args(device))


def test_torch_compile_fullgraph(path, device):
    """A transformer-block-like sequence of norm calls traces into one graph and matches eager."""
    backend = "inductor" if HAS_CUDA else "aot_eager"
    w = _weight(64, torch.bfloat16, device)

    def step(x, residual):
        norm.fused_add_rmsnorm(x, residual, w)
        q = norm.rmsnorm(x.view(-1, 2, 32), w[:32])
        return norm.gemma_rmsnorm(x, w).float().sum() + q.float().sum() + residual.float().sum()

    x = torch.randn(6, 64, dtype=torch.bfloat16, device=device)
    r = torch.randn(6, 64, dtype=torch.bfloat16, device=device)
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    x1, r1 = x.clone(), r.clone()
    got = compiled(x1, r1)
    want = step(x, r)
    torch.testing.assert_close(got, want, atol=1e-1, rtol=1e-2)
    torch.testing.assert_close(x1, x, atol=0, rtol=0)
    torch.testing.assert_close(r1, r, atol=0, rtol=0)


@pytest.mark.gpu
def test_cuda_graph_replay():
    device = torch.device("cuda")
    x = torch.randn(64, 4096, dtype=torch.bfloat16, device=device)
    r = torch.randn_like(x)
    w = _weight(4096, torch.bfloat16, device)
    out = torch.empty_like(x)
    def step():
        norm.rmsnorm(x, w, out=out)
        norm.fused_add_rmsnorm(x, r, w)

    graph, _ = capture_graph(step)
    x.copy_(torch.randn_like(x))
    r.copy_(torch.randn_like(r))
    x0, r0 = x.clone(), r.clone()
    graph.replay()
    torch.cuda.synchronize()
    _close(out, rmsnorm_f64(x0, w), torch.bfloat16)
    ref_x, ref_r = fused_add_rmsnorm_f64(x0, r0, w)
    _close(x, ref_x, torch.bfloat16)
    _close(r, ref_r, torch.bfloat16)


def test_small_ops_benchmark_smoke(tmp_path):
    """benchmarks/bench_small_ops.py runs end to end (--smoke) and flashtile agrees with torch."""
    import json

    from benchmarks import harness

    suites = ["norm", "qk_norm", "activation", "rope", "small_ops_launch"]
    harness.run_suites(suites, tmp_path, smoke=True, providers=["flashtile", "torch_eager"])
    for suite in suites:
        records = [json.loads(line) for line in (tmp_path / f"{suite}.jsonl").read_text().splitlines()]
        assert records and all(r["status"] == "ok" for r in records), [r.get("reason") for r in records]
        for r in records:
            if r.get("max_abs_diff") is not None:
                assert r["max_abs_diff"] < 5e-2, r


# ---------------------------------------------------------------------------------------------
# Remembered checks (_core/memo.py): a known key skips the metadata checks, never the value checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ["rmsnorm", "gemma_rmsnorm", "fused_add_rmsnorm", "layernorm"])
def test_known_metadata_still_checks_eps_and_computes_each_call(path, device, fn):
    """Calls with the tensors' metadata of an earlier good call skip the metadata checks; each still
    computes on its own tensors and eps, and a bad eps still raises its typed error."""

    def call(eps):
        """Runs fn with eps; returns (output, a function giving the oracle's)."""
        x = torch.randn(3, 64, dtype=F16, device=device)
        w, b, r = _weight(64, F16, device), _weight(64, F16, device), torch.randn(3, 64, dtype=F16, device=device)
        if fn == "layernorm":
            return norm.layernorm(x, w, b, eps), lambda: layernorm_f64(x, w, b, eps)
        if fn == "fused_add_rmsnorm":
            x0, r0 = x.clone(), r.clone()
            norm.fused_add_rmsnorm(x, r, w, eps)
            _close(r, fused_add_rmsnorm_f64(x0, r0, w, eps)[1], F16)
            return x, lambda: fused_add_rmsnorm_f64(x0, r0, w, eps)[0]
        offset = 1.0 if fn == "gemma_rmsnorm" else 0.0
        return getattr(norm, fn)(x, w, eps), lambda: rmsnorm_f64(x, w, eps, offset)

    for eps in (1e-6, 1e-2, 0.5):  # the first call checks and remembers; the others use the memo
        out, expected = call(eps)
        _close(out, expected(), F16)
    for bad, error in ((-1e-6, ValueError), (float("nan"), ValueError), (True, TypeError), ("1e-6", TypeError),
                       (None, TypeError)):
        with pytest.raises(error, match="eps"):
            call(bad)
