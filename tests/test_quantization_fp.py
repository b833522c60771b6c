"""FP8 and FP4 (NVFP4, MXFP4) quantization against the float64 oracles in tests/oracles.py."""

from __future__ import annotations

import pytest
import torch

import flashtile
from flashtile.quantization import (
    FP8_MAX,
    SfLayout,
    block_scale_interleave,
    e2m1_and_ufp8sf_scale_to_float,
    fp4_quantize,
    fp8_dequantize,
    fp8_quantize,
    mxfp4_dequantize,
    mxfp4_quantize,
    nvfp4_block_scale_interleave,
    nvfp4_quantize,
)
from flashtile.reference import quant_fp4 as ref4
from oracles import (
    fp4_block_quantize_f64,
    fp8_dynamic_scale_f64,
    fp8_quantize_f64,
    minifloat_round_f64,
    sf_swizzled_offset_8x4,
    sf_swizzled_offset_128x4,
)

FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
IN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bitwise-equal values as float64, NaN equal to NaN."""
    torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=0, equal_nan=True)


def _randn(shape, dtype, seed=0, spread=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if spread:  # several orders of magnitude, so subnormals and saturation get exercised
        x = x * torch.exp2(torch.randint(-12, 8, shape, generator=g).float())
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------- FP8


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", IN_DTYPES)
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("shape", [(1,), (7,), (5, 33), (2, 3, 17)])
def test_fp8_dynamic_matches_oracle(fmt, dtype, per_token, shape):
    x = _randn(shape, dtype, seed=len(shape) * 10 + shape[-1])
    q, scale = fp8_quantize(x, FP8[fmt], per_token=per_token)
    assert q.dtype == FP8[fmt] and q.shape == x.shape
    want_scale = fp8_dynamic_scale_f64(x, fmt, per_token)
    assert scale.dtype == torch.float32 and scale.shape == want_scale.shape
    torch.testing.assert_close(scale.double(), want_scale, rtol=1e-7, atol=0)
    _same(q.double(), fp8_quantize_f64(x, scale, fmt))  # oracle on the scale actually used
    # Dequantization: the exact product q * scale, rounded once to float32.
    _same(fp8_dequantize(q, scale), (q.double() * scale.double()).float())
    assert fp8_dequantize(q, scale, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_grid_round_trip_exact(fmt):
    # Every finite non-negative code of the format, both signs, times a power-of-two scale.
    codes = torch.arange(0, 256, dtype=torch.uint8).view(FP8[fmt]).double()
    grid = codes[torch.isfinite(codes)]
    scale = 0.25
    x = (grid * scale).float()
    q, s = fp8_quantize(x, FP8[fmt], scale=scale)
    _same(q.double(), grid)
    _same(fp8_dequantize(q, s), x)


def test_fp8_rounding_ties_to_even():
    # e4m3 between 1 and 2 has step 1/8: 1.0625 -> 1.0, 1.1875 -> 1.25; e5m2 step 1/4: 1.125 -> 1.0, 1.375 -> 1.5.
    q, _ = fp8_quantize(torch.tensor([1.0625, 1.1875, -1.0625]), torch.float8_e4m3fn, scale=1.0)
    assert q.float().tolist() == [1.0, 1.25, -1.0]
    q, _ = fp8_quantize(torch.tensor([1.125, 1.375]), torch.float8_e5m2, scale=1.0)
    assert q.float().tolist() == [1.0, 1.5]


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_saturation_nan_inf(fmt):
    fmax = FP8_MAX[FP8[fmt]]
    x = torch.tensor([2 * fmax, -1e30, float("inf"), float("-inf"), float("nan"), 1.0, fmax * 1.01])
    q, s = fp8_quantize(x, FP8[fmt], scale=1.0)
    got = q.float()
    assert got[:4].tolist() == [fmax, -fmax, fmax, -fmax]
    assert torch.isnan(got[4]) and got[5] == 1.0 and got[6] == fmax
    _same(q.double(), fp8_quantize_f64(x, s, fmt))
    # Dynamic scale ignores inf/NaN; all-zero or all-non-finite input gets scale 1.
    q, s = fp8_quantize(torch.tensor([3.0, float("inf"), float("nan"), -6.0]), FP8[fmt])
    assert s.item() == pytest.approx(6.0 / fmax)
    assert q.float()[1] == fmax and torch.isnan(q.float()[2]) and q.float()[3] == -fmax
    for z in (torch.zeros(4), torch.tensor([float("nan"), float("inf")])):
        assert fp8_quantize(z, FP8[fmt])[1].item() == 1.0
    # A dynamic scale never leaves the range: the amax element maps to +-max exactly.
    q, s = fp8_quantize(torch.tensor([[0.1, -7.5], [0.0, 0.0]]), FP8[fmt], per_token=True)
    assert q.float()[0, 1] == -fmax and s[1].item() == 1.0


def test_fp8_static_scales():
    x = _randn((4, 8), torch.bfloat16, seed=3, spread=False)
    per_row = torch.tensor([[0.5], [1.0], [2.0], [4.0]])
    q, s = fp8_quantize(x, scale=per_row, per_token=True)
    assert s is per_row
    _same(q.double(), fp8_quantize_f64(x, per_row, "e4m3"))
    for scale in (0.5, torch.tensor(0.5), torch.tensor([0.5])):
        q1, s1 = fp8_quantize(x, scale=scale)
        assert s1.shape == (1,)
        _same(q1.double(), fp8_quantize_f64(x, torch.tensor([0.5]), "e4m3"))
        q2, s2 = fp8_quantize(x, scale=scale, per_token=True)
        assert s2.shape == (4, 1)
        _same(q2.double(), q1.double())
    _same(fp8_dequantize(q, per_row), (q.double() * per_row.double()).float())
    _same(fp8_dequantize(q, 2.0), q.double() * 2)


def test_fp8_errors():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="x:"):
        fp8_quantize(torch.ones(4, dtype=torch.int32))
    with pytest.raises(TypeError, match="x:"):
        fp8_quantize([1.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="x:"):
        fp8_quantize(torch.tensor(1.0))
    with pytest.raises(TypeError, match="dtype:"):
        fp8_quantize(x, torch.float16)
    with pytest.raises(TypeError, match="per_token:"):
        fp8_quantize(x, per_token=1)  # type: ignore[arg-type]
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="scale:"):
            fp8_quantize(x, scale=bad)
    with pytest.raises(TypeError, match="scale:"):
        fp8_quantize(x, scale=torch.tensor([1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="scale:"):
        fp8_quantize(x, scale=torch.ones(4, 1))  # per-row scales need per_token=True
    with pytest.raises(ValueError, match="scale:"):
        fp8_quantize(x, scale=torch.ones(3, 1), per_token=True)
    with pytest.raises(ValueError, match="scale:"):
        fp8_quantize(x, scale=torch.ones(1, device="meta"))
    q, s = fp8_quantize(x)
    with pytest.raises(TypeError, match="q:"):
        fp8_dequantize(x, s)
    with pytest.raises(TypeError, match="out_dtype:"):
        fp8_dequantize(q, s, torch.int8)
    with pytest.raises(ValueError, match="scale:"):
        fp8_dequantize(q, torch.ones(5, 1))


# ---------------------------------------------------------------------------------------------- FP4


def test_e2m1_rounding_table():
    v = torch.tensor([0.0, 0.2, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 6.0, 7.0, float("inf"),
                      -0.1, -0.75, -5.0, -100.0, float("-inf"), float("nan"), -0.0])
    want = [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, 6.0,
            -0.0, -1.0, -4.0, -6.0, -6.0, 6.0, -0.0]
    codes = ref4.e2m1_round_codes(v)
    got = ref4.e2m1_decode(codes)
    assert got.tolist() == want
    assert torch.equal(torch.signbit(got), torch.signbit(torch.tensor(want)))
    _same(got[:-2], minifloat_round_f64(v[:-2], "e2m1"))  # the oracle agrees except its NaN (flashtile: +6)
    assert codes[-2].item() == 7 and codes[-1].item() == 8  # NaN -> +6; -0 keeps its sign bit


def test_e8m0_ceil():
    tiny = torch.finfo(torch.float32).tiny  # 2^-126
    v = torch.tensor([0.0, 1.0, 1.5, 0.75, 2.0 ** -127, 2.0 ** -127 * 1.5, 2.0 ** -140, tiny, tiny * 1.01,
                      2.0 ** 127, 2.0 ** 127 * 1.5, float("inf"), float("nan"), 3e38], dtype=torch.float32)
    want = [0, 127, 128, 127, 0, 1, 0, 1, 2, 254, 254, 254, 255, 254]
    assert ref4.e8m0_ceil(v).tolist() == want


def test_nibble_order_and_codes():
    # Block of 16 with amax 6 and global scale 256: e4m3 scale 256 (0x78), values encode unscaled.
    x = torch.tensor([[0.5, 1.0, -6.0, 3.0] + [0.0] * 12])
    q, sf = fp4_quantize(x, torch.tensor([256.0]), is_sf_swizzled_layout=False)
    assert q.dtype == torch.uint8 and q.shape == (1, 8)
    assert q[0, :2].tolist() == [0x21, 0x5F]  # element 0 in the low nibble: 0.5 = 1, 1.0 = 2; -6 = 15, 3 = 5
    assert sf.tolist() == [[0x78]]
    assert e2m1_and_ufp8sf_scale_to_float(q, sf, torch.tensor([1 / 256]), is_sf_swizzled_layout=False).tolist() \
        == x.tolist()


def _check_fp4_against_oracle(x, q, sf_linear, sf_vec_size, mx, gs=1.0):
    vals, scales = fp4_block_quantize_f64(x.float(), sf_vec_size, mx, gs)
    codes = ref4.unpack_e2m1(q)
    _same(ref4.e2m1_decode(codes), vals)
    if mx:
        # A zero block stores byte 0 (2^-127), like a block whose scale is 2^-127.
        _same(torch.exp2(sf_linear.double() - 127), torch.where(scales == 0, 2.0 ** -127, scales))
    else:
        _same(sf_linear.view(torch.float8_e4m3fn).double(), scales)
    deq = e2m1_and_ufp8sf_scale_to_float(q, sf_linear, None if mx else torch.tensor([1.0 / gs]),
                                         sf_vec_size, 0 if mx else 1, False)
    want = vals * torch.where(scales == 0, 0.0, scales).repeat_interleave(sf_vec_size, dim=1) / (1.0 if mx else gs)
    torch.testing.assert_close(deq, want.float(), rtol=2e-7, atol=0)  # float32 output: 6 * 2^127 is inf


@pytest.mark.parametrize("dtype", IN_DTYPES + (torch.float8_e4m3fn,))
@pytest.mark.parametrize("shape", [(1, 16), (5, 48), (3, 160)])
@pytest.mark.parametrize("global_sf", ["none", "amax"])
def test_nvfp4_matches_oracle(dtype, shape, global_sf):
    x = _randn(shape, torch.float32, seed=shape[0] * 7 + shape[1], spread=dtype != torch.float8_e4m3fn)
    x = (x * 4).to(dtype) if dtype == torch.float8_e4m3fn else x.to(dtype)
    gs = 1.0 if global_sf == "none" else float(448 * 6 / x.float().abs().max())
    gs_arg = None if global_sf == "none" else torch.tensor([gs])
    q, sf = fp4_quantize(x, gs_arg, is_sf_swizzled_layout=False)
    assert q.shape == (shape[0], shape[1] // 2) and sf.shape == (shape[0], shape[1] // 16)
    assert q.dtype == sf.dtype == torch.uint8
    _check_fp4_against_oracle(x, q, sf, 16, False, torch.tensor(gs).item())


@pytest.mark.parametrize("dtype", IN_DTYPES)
@pytest.mark.parametrize("shape", [(1, 32), (7, 96), (2, 320)])
def test_mxfp4_matches_oracle(dtype, shape):
    x = _randn(shape, dtype, seed=shape[0] * 5 + shape[1])
    q, sf = mxfp4_quantize(x, sfLayout=SfLayout.layout_linear)
    assert sf.shape == (shape[0], shape[1] // 32)
    _check_fp4_against_oracle(x, q, sf, 32, True)
    q2, sf2 = fp4_quantize(x, None, 32, True, False)
    assert torch.equal(q, q2) and torch.equal(sf, sf2)
    _same(mxfp4_dequantize(q, sf, SfLayout.layout_linear), e2m1_and_ufp8sf_scale_to_float(q, sf, None, 32, 0, False))


@pytest.mark.parametrize("mx", [False, True])
def test_fp4_grid_round_trip_exact(mx):
    # Each block holds grid values and its amax is 6 * scale, so the scale and every value are exact.
    g = torch.Generator().manual_seed(11)
    vec = 32 if mx else 16
    m, nb = 6, 5
    codes = torch.randint(0, 16, (m, nb, vec), generator=g, dtype=torch.uint8)
    codes[..., 0] = 7  # +6 in every block
    if mx:
        scales = torch.exp2(torch.randint(-20, 20, (m, nb, 1), generator=g).float())
    else:
        scales = torch.arange(0, 127, dtype=torch.uint8)[torch.randint(8, 120, (m, nb, 1), generator=g)].view(
            torch.float8_e4m3fn).float()  # e4m3 normals
    x = (ref4.e2m1_decode(codes) * scales).reshape(m, nb * vec)
    if mx:
        q, sf = mxfp4_quantize(x)
        back = mxfp4_dequantize(q, sf)
    else:
        q, sf = nvfp4_quantize(x, 1.0)
        back = e2m1_and_ufp8sf_scale_to_float(q, sf, torch.tensor([1.0]))
    _same(back, x)
    assert torch.equal(ref4.unpack_e2m1(q).view(m, nb, vec) & 7, codes & 7)


@pytest.mark.parametrize("mx", [False, True])
def test_fp4_nan_inf(mx):
    vec = 32 if mx else 16
    x = torch.linspace(-3, 3, 2 * vec).reshape(1, -1)
    x[0, 1] = float("nan")  # block 0: NaN ignored by the amax, encoded as +6
    x[0, vec + 2] = float("inf")  # block 1: scale saturates, inf -> +6, the finite values -> 0
    q, sf = fp4_quantize(x, None, vec, mx, False)
    _check_fp4_against_oracle(x, q, sf, vec, mx)
    vals = ref4.e2m1_decode(ref4.unpack_e2m1(q))[0]
    assert vals[1] == 6.0 and vals[vec + 2] == 6.0
    assert sf[0, 1].item() == (254 if mx else 0x7E)
    # A zero block stores scale 0 and codes 0.
    q, sf = fp4_quantize(torch.zeros(2, 2 * vec), None, vec, mx, False)
    assert not q.any() and not sf.any()


@pytest.mark.parametrize("m, nb", [(1, 1), (5, 3), (130, 6), (256, 4)])
def test_swizzled_layouts_match_offsets(m, nb):
    g = torch.Generator().manual_seed(m + nb)
    lin = torch.randint(1, 256, (m, nb), generator=g, dtype=torch.uint8)
    for tile, offset in ((128, sf_swizzled_offset_128x4), (8, sf_swizzled_offset_8x4)):
        sw = ref4.swizzle_sf(lin, tile)
        mp, kp = -(-m // tile) * tile, -(-nb // 4) * 4
        assert sw.shape == (mp, kp)
        flat = sw.reshape(-1)
        want = torch.zeros(mp * kp, dtype=torch.uint8)
        for r in range(m):
            for c in range(nb):
                want[offset(r, c, nb)] = lin[r, c]
        assert torch.equal(flat, want)  # padding is zero
        assert torch.equal(ref4.unswizzle_sf(sw, m, nb, tile), lin)


@pytest.mark.parametrize("layout", list(SfLayout))
@pytest.mark.parametrize("mx", [False, True])
def test_fp4_layouts_agree(layout, mx):
    vec = 32 if mx else 16
    x = _randn((133, 3 * vec), torch.bfloat16, seed=2)
    q_lin, sf_lin = fp4_quantize(x, torch.tensor([2.0]), vec, mx, False)
    if mx:
        q, sf = mxfp4_quantize(x, sfLayout=layout)
    else:
        q, sf = nvfp4_quantize(x, torch.tensor([2.0]), sfLayout=layout)
    assert torch.equal(q, q_lin)
    if layout == SfLayout.layout_linear:
        assert torch.equal(sf, sf_lin)
    else:
        assert torch.equal(sf, ref4.swizzle_sf(sf_lin, 128 if layout == SfLayout.layout_128x4 else 8))
    if layout == SfLayout.layout_128x4:
        assert torch.equal(block_scale_interleave(sf_lin), sf.reshape(-1))
    deq = e2m1_and_ufp8sf_scale_to_float(q, sf.reshape(-1), torch.tensor([0.5]), vec, 0 if mx else 1,
                                         layout != SfLayout.layout_linear, layout == SfLayout.layout_8x4)
    _same(deq, e2m1_and_ufp8sf_scale_to_float(q, sf_lin, torch.tensor([0.5]), vec, 0 if mx else 1, False))


def test_block_scale_interleave_experts():
    lin = torch.randint(0, 256, (3, 5, 6), dtype=torch.uint8)
    out = nvfp4_block_scale_interleave(lin)
    per = 128 * 8
    assert out.shape == (3 * per,)
    for e in range(3):
        assert torch.equal(out[e * per:(e + 1) * per], ref4.swizzle_sf(lin[e], 128).reshape(-1))
    assert block_scale_interleave(lin[0].to(torch.bfloat16)).dtype == torch.bfloat16


def test_fp4_column_major_and_nd_inputs():
    x = _randn((32, 48), torch.float16, seed=4)
    q, sf = fp4_quantize(x.t(), None, 16, False, False)  # [48, 32] column-major: blocks along dim 0
    q_ref, sf_ref = fp4_quantize(x.contiguous(), None, 16, False, False)
    assert torch.equal(q, q_ref.t()) and torch.equal(sf, sf_ref.t())
    x3 = _randn((2, 3, 32), torch.bfloat16, seed=5)
    q3, sf3 = fp4_quantize(x3, None, 16, False, False)
    q2, sf2 = fp4_quantize(x3.reshape(6, 32), None, 16, False, False)
    assert q3.shape == (2, 3, 16) and torch.equal(q3.reshape(6, 16), q2) and torch.equal(sf3, sf2)


def test_fp4_global_scale_forms():
    x = _randn((4, 32), torch.bfloat16, seed=6)
    a = fp4_quantize(x, torch.tensor([3.0]), is_sf_swizzled_layout=False)
    b = fp4_quantize(x, torch.tensor([1 / 3.0]), is_sf_swizzled_layout=False, is_global_scale_inversed=True)
    c = nvfp4_quantize(x, 3.0, sfLayout=SfLayout.layout_linear)
    d = fp4_quantize(x, torch.tensor([3.0], dtype=torch.float64), is_sf_swizzled_layout=False)
    for other in (b, c, d):
        assert torch.equal(a[0], other[0]) and torch.equal(a[1], other[1])


def test_fp4_errors():
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="input: the last dimension"):
        fp4_quantize(torch.randn(4, 24))
    with pytest.raises(ValueError, match="input: the last dimension"):
        mxfp4_quantize(torch.randn(4, 48))
    with pytest.raises(NotImplementedError, match="sf_vec_size"):
        fp4_quantize(x, sf_vec_size=8)
    with pytest.raises(TypeError, match="input:"):
        fp4_quantize(torch.ones(4, 32, dtype=torch.int32))
    with pytest.raises(TypeError, match="input:"):
        mxfp4_quantize(x.to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="input:"):
        fp4_quantize(torch.randn(32))
    with pytest.raises(NotImplementedError, match="backend"):
        fp4_quantize(x, backend="cute-dsl")
    with pytest.raises(ValueError, match="backend"):
        mxfp4_quantize(x, backend="triton")
    with pytest.raises(NotImplementedError, match="do_shuffle"):
        nvfp4_quantize(x, 1.0, do_shuffle=True)
    with pytest.raises(ValueError, match="is_sf_8x4_layout"):
        fp4_quantize(x, is_sf_swizzled_layout=False, is_sf_8x4_layout=True)
    with pytest.raises(ValueError, match="global_scale"):
        fp4_quantize(x, torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="global_scale"):
        fp4_quantize(x, "1.0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sfLayout|SfLayout|valid"):
        mxfp4_quantize(x, sfLayout=7)  # type: ignore[arg-type]
    q, sf = fp4_quantize(x)
    with pytest.raises(ValueError, match="ufp8_scale_tensor"):
        e2m1_and_ufp8sf_scale_to_float(q, sf[:64])
    with pytest.raises(ValueError, match="ufp8_scale_tensor"):
        e2m1_and_ufp8sf_scale_to_float(q, sf, is_sf_swizzled_layout=False)
    with pytest.raises(ValueError, match="ufp8_type"):
        e2m1_and_ufp8sf_scale_to_float(q, sf, ufp8_type=2)
    with pytest.raises(TypeError, match="e2m1_tensor"):
        e2m1_and_ufp8sf_scale_to_float(q.to(torch.int32), sf)
    with pytest.raises(ValueError, match="e2m1_tensor"):
        e2m1_and_ufp8sf_scale_to_float(q.reshape(-1), sf)
    with pytest.raises(ValueError, match="e2m1_tensor"):
        e2m1_and_ufp8sf_scale_to_float(q[:, :4], sf, sf_vec_size=16)
    with pytest.raises(TypeError, match="ufp8_scale_tensor"):
        e2m1_and_ufp8sf_scale_to_float(q, sf.float())
    with pytest.raises(TypeError, match="unswizzled_sf"):
        block_scale_interleave(sf.float())
    with pytest.raises(ValueError, match="unswizzled_sf"):
        block_scale_interleave(sf.reshape(-1))


def test_top_level_names():
    for name in ("fp4_quantize", "nvfp4_quantize", "mxfp4_quantize", "mxfp4_dequantize",
                 "e2m1_and_ufp8sf_scale_to_float", "block_scale_interleave", "nvfp4_block_scale_interleave",
                 "SfLayout"):
        assert getattr(flashtile, name) is getattr(flashtile.quantization, name)


def test_info_names_the_fp4_matmul_route():
    from flashtile.cli.info import _info

    rows = [p for p in _info()["paths"] if p["api"] == "FP4 matmul"]
    assert rows and all(p["path"] == "not provided" and "FP4 tensor cores" in p["reason"]
                        and "dequantize" in p["reason"] for p in rows)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 10:
        assert all("Blackwell" in p["reason"] and "Hopper" in p["reason"] for p in rows)
    assert any(p["api"].startswith("fp4_quantize") for p in _info()["paths"])


@pytest.mark.parametrize("layout", list(SfLayout))
def test_empty_inputs(layout):
    tile = {SfLayout.layout_128x4: 128, SfLayout.layout_8x4: 8, SfLayout.layout_linear: 0}[layout]
    swz = layout != SfLayout.layout_linear
    q, sf = nvfp4_quantize(torch.zeros(0, 32), 1.0, sfLayout=layout)
    assert q.shape == (0, 16) and sf.shape == (0, 4 if swz else 2)
    assert e2m1_and_ufp8sf_scale_to_float(q, sf, None, 16, 1, swz, layout == SfLayout.layout_8x4).shape == (0, 32)
    q, sf = mxfp4_quantize(torch.zeros(3, 0), sfLayout=layout)
    assert q.shape == (3, 0) and sf.shape == ((tile, 0) if swz else (3, 0))
    assert mxfp4_dequantize(q, sf, layout).shape == (3, 0)
    assert fp8_quantize(torch.zeros(0, 4))[1].item() == 1.0
    assert fp8_quantize(torch.zeros(0, 4), per_token=True)[0].shape == (0, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("mx", [False, True])
def test_cuda_matches_cpu_bitwise(mx):
    """The same PyTorch ops on a CUDA device give the CPU's bytes (float8 casts, the e2m1 rounding)."""
    vec = 32 if mx else 16
    x = _randn((300, 8 * vec), torch.bfloat16, seed=21)
    x[0, 3], x[1, 5] = float("nan"), float("inf")
    gs = torch.tensor([448 * 6 / 40.0])
    for layout in SfLayout:
        if mx:
            cpu, gpu = mxfp4_quantize(x, sfLayout=layout), mxfp4_quantize(x.cuda(), sfLayout=layout)
        else:
            cpu, gpu = nvfp4_quantize(x, gs, sfLayout=layout), nvfp4_quantize(x.cuda(), gs.cuda(), sfLayout=layout)
        assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())
        swz = layout != SfLayout.layout_linear
        args = (None if mx else 1 / gs, vec, 0 if mx else 1, swz, layout == SfLayout.layout_8x4)
        _same(e2m1_and_ufp8sf_scale_to_float(gpu[0], gpu[1], *args).cpu(),
              e2m1_and_ufp8sf_scale_to_float(cpu[0], cpu[1], *args))
    for fmt in FP8.values():
        for per_token in (False, True):
            qc, sc = fp8_quantize(x, fmt, per_token=per_token)
            qg, sg = fp8_quantize(x.cuda(), fmt, per_token=per_token)
            _same(qg.cpu().double(), qc.double())
            _same(sg.cpu(), sc)


def test_mxfp4_tiny_blocks_match_oracle():
    # Block maxima near float32's subnormal range: the e8m0 scale bottoms out at 2^-127 (byte 0).
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 64, generator=g) * torch.exp2(torch.randint(-140, -118, (8, 1), generator=g).float())
    q, sf = mxfp4_quantize(x, sfLayout=SfLayout.layout_linear)
    assert (sf == 0).any() and (sf > 0).any()
    _check_fp4_against_oracle(x, q, sf, 32, True)


@pytest.mark.parametrize("fmt", list(FP8.values()))
def test_fp8_grid_rounding_is_exact_rne(fmt):
    """The rounding the quantizers use is exact round-to-nearest-even on every device: on the CPU it gives
    PyTorch's (exact) cast, and it is not the double rounding through float16 that some CUDA casts do."""
    from flashtile.reference.quant_fp8 import FP8_MAX, round_to_fp8_grid

    gen = torch.Generator().manual_seed(5)
    fmax = FP8_MAX[fmt]
    y = (torch.randn(400_000, generator=gen) * torch.exp(4 * torch.randn(400_000, generator=gen))).clamp(-fmax, fmax)
    grid = torch.arange(256, dtype=torch.uint8).view(fmt).float()
    grid = grid[grid.isfinite()].unique()
    ties = (grid[1:] + grid[:-1]) / 2  # exact midpoints: even mantissa wins
    y = torch.cat([y, ties, -ties, torch.tensor([0.0, -0.0, float("nan"), 2.0**-30])])
    got = round_to_fp8_grid(y, fmt)
    _same(got.float(), y.to(fmt).float())
    assert not torch.equal(got.float(), y.half().to(fmt).float())
