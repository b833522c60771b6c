"""PyTorch twins of the built-in variants' hooks (flashtile/kernels/variant_hooks.py); no Triton here."""


def sink_logit_twin(batch, qo_head, args):
    """Attention sinks: ``args[0][qo_head]`` (``qo_head [1, H]``)."""
    return args[0][qo_head]
