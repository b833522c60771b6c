"""``flashinfer.triton.cascade``: the attention-state merge operators.

FlashInfer ships Triton versions of the merge operators under this name; flashtile's own operators
are Triton kernels already (with the PyTorch path for CPU tensors), so these are the same functions
as :func:`flashtile.cascade.merge_state`, :func:`~flashtile.cascade.merge_state_in_place` and
:func:`~flashtile.cascade.merge_states`. FlashInfer's ``variable_length_merge_states`` is not
provided.
"""

from ..cascade import merge_state, merge_state_in_place, merge_states

__all__ = ["merge_state", "merge_state_in_place", "merge_states"]
