"""Triton hooks of flashtile's built-in attention variants (flashtile/variants.py states the hook contract)."""

import triton
import triton.language as tl


@triton.jit
def sink_logit_hook(batch, qo_head, args):
    """Attention sinks: ``args[0]`` is a float32 ``[num_qo_heads]`` tensor of per-head sink logits."""
    return tl.load(args[0] + qo_head)
