"""``flashinfer.quantization``: mask bit packing, FP8 and FP4 (NVFP4, MXFP4) quantization.

- :mod:`.bits`: ``packbits``, ``segment_packbits`` (``numpy.packbits`` semantics).
- :mod:`.fp8`: ``fp8_quantize``, ``fp8_dequantize``: per-tensor / per-token FP8 with float32
  scales (flashtile extensions; upstream has no such public function).
- :mod:`.fp4`: upstream's ``fp4_quantize``, ``nvfp4_quantize``, ``mxfp4_quantize``,
  ``mxfp4_dequantize``, ``e2m1_and_ufp8sf_scale_to_float``, ``block_scale_interleave``, ``SfLayout``.

All of them run vectorized PyTorch on the device of their input (docs/quantization.md).
"""

from .bits import packbits, segment_packbits
from .fp4 import (
    SfLayout,
    block_scale_interleave,
    e2m1_and_ufp8sf_scale_to_float,
    fp4_quantize,
    mxfp4_dequantize,
    mxfp4_quantize,
    nvfp4_block_scale_interleave,
    nvfp4_quantize,
)
from .fp8 import FP8_MAX, fp8_dequantize, fp8_quantize

__all__ = [
    "packbits",
    "segment_packbits",
    "fp8_quantize",
    "fp8_dequantize",
    "FP8_MAX",
    "SfLayout",
    "fp4_quantize",
    "nvfp4_quantize",
    "mxfp4_quantize",
    "mxfp4_dequantize",
    "e2m1_and_ufp8sf_scale_to_float",
    "block_scale_interleave",
    "nvfp4_block_scale_interleave",
]
