"""FP4 (e2m1) block quantization, NVFP4 and MXFP4: the readable spec and the implementation on any device.

Pure PyTorch, vectorized; runs on the device of its input. Inputs are assumed valid: the API layer
(``flashtile.quantization.fp4``) checks them. The recipe is upstream FlashInfer's (TensorRT-LLM's
``cvt_warp_fp16_to_fp4``), computed in float32 as upstream does:

* Values are split along the last dimension into blocks of ``sf_vec_size`` (16 for NVFP4, 32 for
  MXFP4). ``amax`` is the block's largest ``|x|``, NaN ignored (as CUDA's ``fmaxf``).
* NVFP4 (``ue8m0=False``): the block scale is ``sf = e4m3(global_scale * (amax * (1/6)))`` (round to
  nearest even, saturated to 448); each value is encoded as ``e2m1(x * (1 / (float(sf) * (1 /
  global_scale))))``. Dequantized: ``e2m1 * float(sf) / global_scale``.
* MXFP4 (``ue8m0=True``): the block scale is ``2^e`` with ``e = ceil(log2(amax / 6))`` (e8m0 rounded
  toward +inf, saturated to 2^127), stored as the byte ``e + 127``; values are ``e2m1(x * 2^-e)``.
  Dequantized: ``e2m1 * 2^(byte - 127)``.
* ``e2m1`` rounds to nearest, ties to even, and saturates to +-6 (PTX ``cvt.rn.satfinite.e2m1x2``).
  The e2m1 grid is 0, 0.5, 1, 1.5, 2, 3, 4, 6 with a sign bit; NaN has no encoding and becomes +6
  (flashtile's choice: the largest code, as a saturating conversion). A zero block (or one whose
  scale rounds to zero) stores scale 0 and codes 0.
* Packing: two codes per byte, element ``2i`` in the low nibble and ``2i + 1`` in the high nibble;
  code bit 3 is the sign, bits 0-2 the magnitude index on the grid above.

Scale-factor layouts (one uint8 per block; ``M`` rows = the product of the leading dims):

* linear: ``[M, K / sf_vec_size]`` row-major.
* 128x4 swizzled (what Blackwell block-scaled MMA reads): rows padded to a multiple of 128 and
  block columns to a multiple of 4, with zeros; the padded ``[Mp, Kp]`` matrix viewed as
  ``[Mp/128, 4, 32, Kp/4, 4]`` is stored in the order ``(0, 3, 2, 1, 4)``: tiles of 128 rows x 4
  blocks, 512 bytes each, row ``r`` of a tile at byte ``(r % 32) * 16 + (r // 32) * 4``.
* 8x4 swizzled: rows padded to a multiple of 8, ``[Mp/8, 8, Kp/4, 4]`` stored as ``(0, 2, 1, 3)``.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .quant_fp8 import round_to_fp8_grid

__all__ = [
    "E2M1_VALUES",
    "e2m1_round_codes",
    "e2m1_decode",
    "pack_e2m1",
    "unpack_e2m1",
    "e8m0_ceil",
    "swizzle_sf",
    "unswizzle_sf",
    "swizzled_sf_shape",
    "fp4_quantize",
    "fp4_dequantize",
]

#: The 16 e2m1 codes' values (bit 3 = sign).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

# Round-to-nearest-even on the e2m1 grid: the magnitude code is the number of midpoints passed.
# A midpoint whose tie goes to the upper (even) code counts when reached (>=), the others when
# passed (>): 0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4.
_MIDPOINTS_TIE_UP = (0.75, 1.75, 3.5)
_MIDPOINTS_TIE_DOWN = (0.25, 1.25, 2.5, 5.0)


def e2m1_round_codes(v: torch.Tensor) -> torch.Tensor:
    """float32 values -> uint8 e2m1 codes (0-15), RNE, saturating to +-6, NaN -> +6 (code 7)."""
    a = v.abs()
    mag = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for t in _MIDPOINTS_TIE_UP:
        mag += (a >= t).to(torch.uint8)
    for t in _MIDPOINTS_TIE_DOWN:
        mag += (a > t).to(torch.uint8)
    code = mag | (torch.signbit(v).to(torch.uint8) << 3)
    return torch.where(torch.isnan(v), torch.full_like(code, 7), code)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (0-15) -> float32 values."""
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    return lut[codes.long()]


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[..., K]`` (K even) -> uint8 ``[..., K/2]``: element 2i low nibble, 2i+1 high."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., K/2]`` -> uint8 codes ``[..., K]``."""
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1)
    return codes.reshape(packed.shape[:-1] + (packed.shape[-1] * 2,))


def e8m0_ceil(v: torch.Tensor) -> torch.Tensor:
    """Non-negative float32 -> uint8 e8m0 byte ``e + 127`` with ``2^e >= v`` minimal (round toward +inf).

    0 -> 0 (2^-127, the smallest code), saturating at 254 (2^127); NaN -> 255 (e8m0's NaN).
    """
    bits = v.contiguous().view(torch.int32)
    exp = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    # Round up when not a power of two. A float32 subnormal is mant * 2^-149: at most 2^-127 (byte 0)
    # when mant <= 2^22, else it rounds up to 2^-126 (byte 1).
    up = torch.where(exp == 0, mant > 0x400000, (mant != 0) & (exp != 0xFF))
    e = (exp + up.to(torch.int32)).clamp(max=254)
    e = torch.where(torch.isnan(v), torch.full_like(e, 255), e)
    return e.to(torch.uint8)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def swizzled_sf_shape(m: int, nblocks: int, row_tile: int) -> Tuple[int, int]:
    """``(Mp, Kp)``: rows padded to ``row_tile`` (128 or 8), block columns to 4."""
    return _round_up(m, row_tile), _round_up(nblocks, 4)


def swizzle_sf(sf: torch.Tensor, row_tile: int) -> torch.Tensor:
    """Linear ``[M, nb]`` scale bytes -> the swizzled ``[Mp, Kp]`` buffer (zero padded)."""
    m, nb = sf.shape
    mp, kp = swizzled_sf_shape(m, nb, row_tile)
    padded = torch.zeros((mp, kp), dtype=sf.dtype, device=sf.device)
    padded[:m, :nb] = sf
    if row_tile == 128:
        out = padded.view(mp // 128, 4, 32, kp // 4, 4).permute(0, 3, 2, 1, 4)
    else:
        out = padded.view(mp // 8, 8, kp // 4, 4).permute(0, 2, 1, 3)
    return out.contiguous().view(mp, kp)


def unswizzle_sf(buf: torch.Tensor, m: int, nb: int, row_tile: int) -> torch.Tensor:
    """Swizzled buffer (any shape, ``Mp * Kp`` elements) -> linear ``[M, nb]``."""
    mp, kp = swizzled_sf_shape(m, nb, row_tile)
    flat = buf.reshape(-1)
    if row_tile == 128:
        lin = flat.view(mp // 128, kp // 4, 32, 4, 4).permute(0, 3, 2, 1, 4)
    else:
        lin = flat.view(mp // 8, kp // 4, 8, 4).permute(0, 2, 1, 3)
    return lin.reshape(mp, kp)[:m, :nb]


def fp4_quantize(
    x: torch.Tensor, global_scale: float | torch.Tensor, sf_vec_size: int, ue8m0: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` (any float dtype, K a multiple of ``sf_vec_size``) -> ``(packed uint8 [M, K/2],
    linear scale bytes uint8 [M, K/sf_vec_size])``. ``global_scale`` is ignored when ``ue8m0``."""
    m, k = x.shape
    xf = x.float().reshape(m, k // sf_vec_size, sf_vec_size)
    a = xf.abs()
    amax = torch.where(torch.isnan(a), torch.zeros((), device=a.device), a).amax(dim=-1)  # [M, nb]
    nonzero = amax != 0
    inv6 = torch.tensor(1.0 / 6.0, dtype=torch.float32)  # float32(1/6), as upstream's reciprocal
    if ue8m0:
        sf = e8m0_ceil(amax * inv6)
        sf = torch.where(nonzero, sf, torch.zeros_like(sf))
        out_scale = torch.exp2(127.0 - sf.float())  # 2^-e; exact in float32 for every byte < 255
    else:
        gs = torch.as_tensor(global_scale, dtype=torch.float32, device=x.device).reshape(())
        sf_val = gs * (amax * inv6)
        sf8 = round_to_fp8_grid(sf_val.clamp(max=448.0), torch.float8_e4m3fn)  # RNE, saturated (sf_val >= 0)
        sf = sf8.view(torch.uint8)
        sff = sf8.float()
        nonzero = nonzero & (sff > 0)
        out_scale = 1.0 / (sff * (1.0 / gs))
    out_scale = torch.where(nonzero, out_scale, torch.zeros((), device=x.device))
    codes = e2m1_round_codes(xf * out_scale.unsqueeze(-1))
    codes = torch.where(nonzero.unsqueeze(-1), codes, torch.zeros_like(codes)).reshape(m, k)
    return pack_e2m1(codes), sf


def fp4_dequantize(
    packed: torch.Tensor, sf: torch.Tensor, global_dequant_scale: float | torch.Tensor, sf_vec_size: int, ue8m0: bool
) -> torch.Tensor:
    """``packed uint8 [M, K/2]``, linear scale bytes ``[M, K/sf_vec_size]`` -> float32 ``[M, K]``:
    ``e2m1 * scale * global_dequant_scale`` (scale: e4m3 value, or ``2^(byte - 127)`` for e8m0)."""
    m, k = packed.shape[0], packed.shape[1] * 2
    vals = e2m1_decode(unpack_e2m1(packed)).view(m, k // sf_vec_size, sf_vec_size)
    if ue8m0:
        scale = torch.exp2(sf.float() - 127.0)
        scale = torch.where(sf == 255, torch.full_like(scale, float("nan")), scale)
    else:
        scale = sf.view(torch.float8_e4m3fn).float()
    g = torch.as_tensor(global_dequant_scale, dtype=torch.float32, device=packed.device).reshape(())
    return (vals * scale.unsqueeze(-1) * g).reshape(m, k)
