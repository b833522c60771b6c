"""Pure-PyTorch implementations: the CPU path and the readable specification. Never imports Triton."""

from .attention import single_attention
from .positional import alibi_slopes, rope_rotate_half_split

__all__ = ["single_attention", "alibi_slopes", "rope_rotate_half_split"]
