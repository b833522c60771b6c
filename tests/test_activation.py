"""flashtile.activation against float64 oracles on the reference and kernel paths: any d (odd too),
leading dims, strided views, out=, extreme values, ops, errors."""

import pytest
import torch

import flashtile.activation as activation
from conftest import HAS_CUDA
from flashtile._core import ops_small
from flashtile._core.graphs import capture_graph
from oracles import TOLERANCES, act_and_mul_f64

FUNCS = {"silu": activation.silu_and_mul, "gelu": activation.gelu_and_mul, "gelu_tanh": activation.gelu_tanh_and_mul}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# input shapes [..., 2 d]
SHAPES = [(2,), (3, 2 * 7), (2, 3, 2 * 33), (5, 2 * 128)]
if HAS_CUDA:
    SHAPES += [(128, 2 * 14336), (1, 2 * 14336), (4, 77, 2 * 4096), (1000, 2 * 11008), (3, 2 * 3001)]


def _close(out, ref, dtype):
    assert not out.isnan().any(), "output has NaN (unwritten element?)"
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double().cpu(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", list(FUNCS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_act_and_mul(path, device, name, dtype, shape):
    x = torch.randn(*shape, dtype=dtype, device=device) * 2
    out = FUNCS[name](x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    _close(out, act_and_mul_f64(x, name), dtype)


@pytest.mark.parametrize("name", list(FUNCS))
def test_out_and_strided_views(path, device, name):
    """Input a column slice of a wider tensor; out a strided view that is filled and returned; a
    transposed (non-viewable) input and out still work. Nothing else changes."""
    wide = torch.randn(6, 3 * 40, dtype=torch.bfloat16, device=device)
    x = wide[:, 5 : 5 + 2 * 40]
    wide0 = wide.clone()
    out_buf = torch.full((6, 50), float("nan"), dtype=torch.bfloat16, device=device)
    out = FUNCS[name](x, out=out_buf[:, 3:43])
    assert out.data_ptr() == out_buf[:, 3:43].data_ptr()
    _close(out, act_and_mul_f64(x, name), torch.bfloat16)
    assert out_buf[:, :3].isnan().all() and out_buf[:, 43:].isnan().all()
    assert torch.equal(wide, wide0)

    xt = torch.randn(2 * 9, 4, 3, dtype=torch.float16, device=device).permute(2, 1, 0)  # [3, 4, 18]
    out_t = torch.empty(9, 4, 3, dtype=torch.float16, device=device).permute(2, 1, 0)  # [3, 4, 9]
    FUNCS[name](xt, out=out_t)
    _close(out_t, act_and_mul_f64(xt, name), torch.float16)


@pytest.mark.filterwarnings("ignore:overflow encountered")  # the interpreter's numpy exp(-x) -> inf, by design
@pytest.mark.parametrize("name", list(FUNCS))
def test_extreme_values(path, device, name):
    """Large |x|: no NaN or overflow inside the sigmoid/erf; limits x*b and 0."""
    a = torch.tensor([-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4], device=device)
    x = torch.cat([a, torch.full_like(a, 0.5)])[None]
    out = FUNCS[name](x)
    assert torch.isfinite(out).all()
    _close(out, act_and_mul_f64(x, name), torch.float32)


def test_empty(path, device):
    assert activation.silu_and_mul(torch.randn(0, 8, device=device)).shape == (0, 4)


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: activation.silu_and_mul(torch.randn(4, 7)), ValueError, "input"),
        (lambda: activation.gelu_and_mul(torch.randint(0, 3, (4, 8))), TypeError, "input"),
        (lambda: activation.gelu_tanh_and_mul("x"), TypeError, "input"),
        (lambda: activation.silu_and_mul(torch.randn(4, 8), out=torch.empty(4, 8)), ValueError, "out"),
        (lambda: activation.silu_and_mul(torch.randn(4, 8), out=torch.empty(3, 4)), ValueError, "out"),
        (lambda: activation.silu_and_mul(torch.randn(4, 8), out=torch.empty(4, 4, dtype=torch.float16)),
         TypeError, "out"),
        (lambda: activation.silu_and_mul(torch.randn(4, 8), out=torch.empty(4, 4, device="meta")), ValueError, "out"),
    ],
)
def test_bad_input_raises(call, error, name):
    with pytest.raises(error) as info:
        call()
    assert name in str(info.value)


@pytest.mark.parametrize("name", list(FUNCS))
def test_opcheck(path, device, name):
    x = torch.randn(3, 2 * 24, dtype=torch.float16, device=device)
    torch.library.opcheck(ops_small.act_and_mul, (x, torch.empty(3, 24, dtype=torch.float16, device=device), name))


def test_torch_compile_fullgraph(path, device):
    backend = "inductor" if HAS_CUDA else "aot_eager"

    def mlp(h):
        return activation.silu_and_mul(h).float().sum(-1) + activation.gelu_tanh_and_mul(h).float().sum(-1)

    h = torch.randn(2, 5, 2 * 48, dtype=torch.bfloat16, device=device)
    compiled = torch.compile(mlp, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(h), mlp(h), atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
def test_cuda_graph_replay():
    device = torch.device("cuda")
    x = torch.randn(16, 2 * 14336, dtype=torch.bfloat16, device=device)
    out = torch.empty(16, 14336, dtype=torch.bfloat16, device=device)
    graph, _ = capture_graph(lambda: activation.silu_and_mul(x, out=out))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    _close(out, act_and_mul_f64(x, "silu"), torch.bfloat16)


def test_known_metadata_computes_each_call(path, device):
    """Repeated calls with one metadata (remembered checks, _core/memo.py) compute on each call's
    input and out=; another layout is a new key and is checked."""
    for _ in range(3):
        x = torch.randn(3, 2 * 40, dtype=torch.float16, device=device)
        _close(activation.silu_and_mul(x), act_and_mul_f64(x, "silu"), torch.float16)
        out = torch.empty(3, 40, dtype=torch.float16, device=device)
        assert activation.gelu_and_mul(x, out=out) is out
        _close(out, act_and_mul_f64(x, "gelu"), torch.float16)
    with pytest.raises(ValueError, match="out"):
        activation.gelu_and_mul(x, out=torch.empty(3, 41, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="even last dim"):
        activation.silu_and_mul(x[:, :79])
