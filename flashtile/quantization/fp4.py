"""FP4 (e2m1) block quantization: NVFP4 (e4m3 scales per 16) and MXFP4 (e8m0 scales per 32).

Upstream's names, arguments, packed layouts and rounding recipe (see
:mod:`flashtile.reference.quant_fp4` for the exact recipe and the layouts). These run on the
device of their input with vectorized PyTorch ops (no Triton kernel: a memory-bound elementwise
pass with a per-block max). What is not supported: the TRT-LLM-gen shuffles (``do_shuffle=True``,
``shuffle_matrix_a``/``shuffle_matrix_sf_a``), the "4over6" NVFP4 recipe, per-token NVFP4
activation scales, the batched/grouped/paged-KV variants, and FP4 matmul itself (FP4 tensor cores
are Blackwell's; on Hopper dequantize with :func:`e2m1_and_ufp8sf_scale_to_float` and run a
16-bit GEMM).
"""

from __future__ import annotations

import enum
from typing import Optional, Tuple, Union

import torch

from .._core.checks import check_tensor, describe
from ..reference import quant_fp4 as _ref

__all__ = [
    "SfLayout",
    "fp4_quantize",
    "nvfp4_quantize",
    "mxfp4_quantize",
    "mxfp4_dequantize",
    "e2m1_and_ufp8sf_scale_to_float",
    "block_scale_interleave",
    "nvfp4_block_scale_interleave",
]


class SfLayout(enum.IntEnum):
    """Layout of FP4 scale factors (upstream's values)."""

    layout_128x4 = 0
    layout_8x4 = 1
    layout_linear = 2


_E4M3 = torch.float8_e4m3fn
_FP4_INPUTS = (torch.float16, torch.bfloat16, torch.float32, _E4M3)
_MXFP4_INPUTS = (torch.float16, torch.bfloat16, torch.float32)
_PACKED_DTYPES = tuple(d for d in (torch.uint8, getattr(torch, "float4_e2m1fn_x2", None)) if d is not None)
_SF_DTYPES = tuple(
    d for d in (torch.uint8, _E4M3, getattr(torch, "float8_e8m0fnu", None)) if d is not None
)


def _check_backend(backend) -> None:
    if backend == "cute-dsl":
        raise NotImplementedError("backend: 'cute-dsl' (upstream's SM100 CuTe-DSL kernels) is not available in "
                                  "flashtile; use backend='cuda' (flashtile runs vectorized PyTorch on any device)")
    if backend != "cuda":
        raise ValueError(f"backend: expected 'cuda' or 'cute-dsl', got {backend!r}")


def _global_scale(name: str, value, device: torch.device) -> torch.Tensor:
    """float32 0-d tensor on ``device`` from a number or a one-element float tensor."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float32, device=device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a float or a one-element float32 tensor, got {describe(value)}")
    if not value.is_floating_point() or value.numel() != 1:
        raise ValueError(f"{name}: expected a one-element float tensor, got {describe(value)}")
    return value.to(device=device, dtype=torch.float32).reshape(())


def fp4_quantize(
    input: torch.Tensor,
    global_scale: Optional[Union[float, torch.Tensor]] = None,
    sf_vec_size: int = 16,
    sf_use_ue8m0: bool = False,
    is_sf_swizzled_layout: bool = True,
    is_sf_8x4_layout: bool = False,
    is_global_scale_inversed: bool = False,
    enable_pdl: Optional[bool] = None,
    backend: str = "cuda",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize to FP4 (e2m1) with one 8-bit scale per ``sf_vec_size`` elements of the last dim.

    NVFP4 is ``sf_vec_size=16, sf_use_ue8m0=False`` (e4m3 scales and a float32 global scale);
    MXFP4 is ``sf_vec_size=32, sf_use_ue8m0=True`` (e8m0 power-of-two scales, no global scale).

    Args:
        input: ``[M, K]`` (or ``[..., K]``, leading dims flattened into M), float16, bfloat16,
            float8_e4m3fn, or float32 (a flashtile extension); ``K % sf_vec_size == 0``. As
            upstream, a column-major 2-D input (``stride(-2) == 1 != stride(-1)``) is quantized along its first
            dimension: the result is that of ``input.t()``, transposed back.
        global_scale: float32 tensor ``[1]`` (NVFP4 only; ``None`` means 1.0). The encode scale,
            usually ``448 * 6 / amax(input)`` so that the largest block scale lands on e4m3's max;
            dequantize with its inverse. Ignored with ``sf_use_ue8m0``.
        sf_vec_size: 16 or 32 elements per scale.
        sf_use_ue8m0: e8m0 scales (MXFP4) instead of e4m3.
        is_sf_swizzled_layout: return the scales swizzled (default, 128x4 or 8x4) or linear.
        is_sf_8x4_layout: the 8x4 swizzle instead of 128x4 (only with ``is_sf_swizzled_layout``).
        is_global_scale_inversed: ``global_scale`` holds ``1 / scale``.
        enable_pdl: accepted and ignored (a CUDA launch attribute upstream).
        backend: ``"cuda"`` (upstream's default; here vectorized PyTorch on ``input``'s device).

    Returns:
        ``(x_q, sf)``: ``x_q`` uint8 ``[..., K / 2]``, two e2m1 codes per byte (element ``2i`` in
        the low nibble); ``sf`` uint8 scale bytes: ``[M, K / sf_vec_size]`` linear, or the
        swizzled buffer ``[round_up(M, 128 or 8), round_up(K / sf_vec_size, 4)]`` (zero padded).

    Raises:
        TypeError: ``input`` is not a tensor of a supported dtype.
        ValueError: ``input`` is not at least 2-D, K is not a multiple of ``sf_vec_size``,
            ``global_scale`` is not one float element, 8x4 without swizzling, or an unknown backend.
        NotImplementedError: ``sf_vec_size`` not 16/32 (upstream's error type), ``backend="cute-dsl"``.
    """
    if sf_vec_size not in (16, 32):
        raise NotImplementedError(f"sf_vec_size: can only be 16 or 32, got {sf_vec_size!r}")
    _check_backend(backend)
    check_tensor("input", input, dtypes=_FP4_INPUTS if not sf_use_ue8m0 else _MXFP4_INPUTS)
    if input.dim() < 2:
        raise ValueError(f"input: expected a tensor [M, K] (at least 2-D), got shape {list(input.shape)}")
    if is_sf_8x4_layout and not is_sf_swizzled_layout:
        raise ValueError("is_sf_8x4_layout: the 8x4 layout is a swizzled layout; it needs is_sf_swizzled_layout=True")
    column_major = input.dim() == 2 and input.stride(-2) == 1 and input.stride(-1) != 1
    x = input.t() if column_major else input
    k = x.shape[-1]
    if k % sf_vec_size != 0:
        raise ValueError(f"input: the last dimension ({k}) must be a multiple of sf_vec_size = {sf_vec_size}")
    gs = torch.ones((), dtype=torch.float32, device=input.device)
    if global_scale is not None and not sf_use_ue8m0:
        gs = _global_scale("global_scale", global_scale, input.device)
        if is_global_scale_inversed:
            gs = 1.0 / gs
    lead = x.shape[:-1]
    x2 = x.reshape(lead.numel(), k)
    packed, sf = _ref.fp4_quantize(x2, gs, sf_vec_size, sf_use_ue8m0)
    if is_sf_swizzled_layout:
        sf = _ref.swizzle_sf(sf, 8 if is_sf_8x4_layout else 128)
    packed = packed.reshape(lead + (k // 2,))
    if column_major:
        return packed.t(), sf.t()
    return packed, sf


def nvfp4_quantize(
    a: torch.Tensor,
    a_global_sf: Union[float, torch.Tensor],
    sfLayout: SfLayout = SfLayout.layout_128x4,
    do_shuffle: bool = False,
    sf_vec_size: int = 16,
    enable_pdl: Optional[bool] = None,
    backend: str = "cuda",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """NVFP4: :func:`fp4_quantize` with e4m3 scales per ``sf_vec_size`` (16) and global scale ``a_global_sf``.

    Args:
        a: ``[M, K]`` float16/bfloat16/float8_e4m3fn (float32 too, an extension), K % 16 == 0.
        a_global_sf: global encode scale, float or float32 tensor ``[1]`` (``448 * 6 / amax(a)``).
        sfLayout: :class:`SfLayout` of the returned scales (128x4 by default, 8x4 or linear).
        do_shuffle: upstream's TRT-LLM-gen weight shuffle; not supported (``True`` raises).
        sf_vec_size: 16 (upstream's default).
        enable_pdl, backend: as :func:`fp4_quantize`.

    Returns:
        ``(x_q uint8 [M, K/2], sf uint8)`` as :func:`fp4_quantize`.

    Raises:
        NotImplementedError: ``do_shuffle=True``; and as :func:`fp4_quantize`.
    """
    if do_shuffle:
        raise NotImplementedError("do_shuffle: the TRT-LLM-gen scale/weight shuffle is not supported by flashtile")
    layout = SfLayout(sfLayout)
    if not isinstance(a_global_sf, torch.Tensor):
        a_global_sf = _global_scale("a_global_sf", a_global_sf, torch.device("cpu"))
    return fp4_quantize(a, a_global_sf, sf_vec_size, False, layout != SfLayout.layout_linear,
                        layout == SfLayout.layout_8x4, False, enable_pdl, backend)


def mxfp4_quantize(
    a: torch.Tensor,
    backend: str = "cuda",
    enable_pdl: Optional[bool] = None,
    sfLayout: SfLayout = SfLayout.layout_128x4,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """MXFP4: e2m1 values with an e8m0 (power-of-two) scale per 32 elements.

    Args:
        a: ``[M, K]`` float16/bfloat16 (float32 too, an extension), K % 32 == 0.
        backend, enable_pdl: as :func:`fp4_quantize`.
        sfLayout: layout of the returned scales (128x4 by default, 8x4 or linear).

    Returns:
        ``(x_q uint8 [M, K/2], sf uint8)``: scale byte ``b`` means ``2^(b - 127)``.
    """
    layout = SfLayout(sfLayout)
    return fp4_quantize(a, None, 32, True, layout != SfLayout.layout_linear, layout == SfLayout.layout_8x4,
                        False, enable_pdl, backend)


def e2m1_and_ufp8sf_scale_to_float(
    e2m1_tensor: torch.Tensor,
    ufp8_scale_tensor: torch.Tensor,
    global_scale_tensor: Optional[torch.Tensor] = None,
    sf_vec_size: int = 16,
    ufp8_type: int = 1,
    is_sf_swizzled_layout: bool = True,
    is_sf_8x4_layout: bool = False,
) -> torch.Tensor:
    """Dequantize packed e2m1 with 8-bit block scales to float32: ``e2m1 * scale * global``.

    Args:
        e2m1_tensor: uint8 ``[M, K/2]`` as :func:`fp4_quantize` returns (or ``float4_e2m1fn_x2``).
        ufp8_scale_tensor: the scale bytes, uint8 (or float8_e4m3fn / float8_e8m0fnu, read as
            bytes), any shape with the layout's element count: ``M * K/sf_vec_size`` (linear) or
            ``round_up(M, 128 or 8) * round_up(K/sf_vec_size, 4)`` (swizzled).
        global_scale_tensor: float32 ``[1]``, the *dequantization* multiplier (``1 / global_scale``
            of the quantizer); ``None`` means 1.0.
        sf_vec_size: 16 or 32.
        ufp8_type: 1 for e4m3 scales (NVFP4), 0 for ue8m0 (MXFP4; byte ``b`` is ``2^(b - 127)``,
            255 is NaN).
        is_sf_swizzled_layout, is_sf_8x4_layout: the scales' layout (128x4 swizzled by default).

    Returns:
        float32 ``[M, K]`` on ``e2m1_tensor``'s device.

    Raises:
        TypeError: wrong tensor dtypes.
        ValueError: wrong ranks or element counts, bad ``ufp8_type``, 8x4 without swizzling.
        NotImplementedError: ``sf_vec_size`` not 16/32.
    """
    if sf_vec_size not in (16, 32):
        raise NotImplementedError(f"sf_vec_size: can only be 16 or 32, got {sf_vec_size!r}")
    if ufp8_type not in (0, 1):
        raise ValueError(f"ufp8_type: expected 1 (e4m3) or 0 (ue8m0), got {ufp8_type!r}")
    if is_sf_8x4_layout and not is_sf_swizzled_layout:
        raise ValueError("is_sf_8x4_layout: the 8x4 layout is a swizzled layout; it needs is_sf_swizzled_layout=True")
    check_tensor("e2m1_tensor", e2m1_tensor, ndim=2, dtypes=_PACKED_DTYPES)
    check_tensor("ufp8_scale_tensor", ufp8_scale_tensor, dtypes=_SF_DTYPES)
    packed = e2m1_tensor.view(torch.uint8)
    m, k = packed.shape[0], packed.shape[1] * 2
    if k % sf_vec_size != 0:
        raise ValueError(f"e2m1_tensor: 2 * shape[1] = {k} must be a multiple of sf_vec_size = {sf_vec_size}")
    nb = k // sf_vec_size
    row_tile = 8 if is_sf_8x4_layout else 128
    if is_sf_swizzled_layout:
        mp, kp = _ref.swizzled_sf_shape(m, nb, row_tile)
        need = mp * kp
    else:
        need = m * nb
    if ufp8_scale_tensor.numel() != need:
        raise ValueError(f"ufp8_scale_tensor: expected {need} scale bytes for e2m1_tensor {list(packed.shape)}, "
                         f"sf_vec_size {sf_vec_size} and the {'swizzled' if is_sf_swizzled_layout else 'linear'} "
                         f"layout, got shape {list(ufp8_scale_tensor.shape)}")
    sf = ufp8_scale_tensor.contiguous().view(torch.uint8).to(packed.device)
    sf = _ref.unswizzle_sf(sf, m, nb, row_tile) if is_sf_swizzled_layout else sf.reshape(m, nb)
    g = torch.ones((), dtype=torch.float32, device=packed.device)
    if global_scale_tensor is not None:
        g = _global_scale("global_scale_tensor", global_scale_tensor, packed.device)
    return _ref.fp4_dequantize(packed, sf, g, sf_vec_size, ufp8_type == 0)


def mxfp4_dequantize(
    a_fp4: torch.Tensor, a_sf: torch.Tensor, sfLayout: SfLayout = SfLayout.layout_128x4
) -> torch.Tensor:
    """Inverse of :func:`mxfp4_quantize`: float32 ``[M, K]`` from ``a_fp4`` uint8 ``[M, K/2]`` and
    the e8m0 scale bytes ``a_sf`` in ``sfLayout`` (128x4 by default). Errors as
    :func:`e2m1_and_ufp8sf_scale_to_float`. Runs on ``a_fp4``'s device (upstream returns a CPU tensor)."""
    layout = SfLayout(sfLayout)
    return e2m1_and_ufp8sf_scale_to_float(a_fp4, a_sf, None, 32, 0, layout != SfLayout.layout_linear,
                                          layout == SfLayout.layout_8x4)


def block_scale_interleave(unswizzled_sf: torch.Tensor) -> torch.Tensor:
    """Swizzle linear scale bytes into the 128x4 layout.

    Args:
        unswizzled_sf: uint8 (or bfloat16, as upstream) ``[M, nb]`` or ``[E, M, nb]`` (per expert).

    Returns:
        1-D contiguous tensor of ``unswizzled_sf``'s dtype, ``E * round_up(M, 128) * round_up(nb, 4)``
        elements: each expert's swizzled buffer, zero padded, one after the other.

    Raises:
        TypeError: dtype not uint8/bfloat16 (upstream: AssertionError). ValueError: not 2-D or 3-D.
    """
    check_tensor("unswizzled_sf", unswizzled_sf, dtypes=(torch.uint8, torch.bfloat16))
    if unswizzled_sf.dim() not in (2, 3):
        raise ValueError(f"unswizzled_sf: expected [M, nb] or [E, M, nb], got shape {list(unswizzled_sf.shape)}")
    mats = unswizzled_sf.unsqueeze(0) if unswizzled_sf.dim() == 2 else unswizzled_sf
    return torch.cat([_ref.swizzle_sf(mat, 128).reshape(-1) for mat in mats]) if mats.shape[0] else \
        unswizzled_sf.new_zeros(0)


nvfp4_block_scale_interleave = block_scale_interleave  # upstream's older name
