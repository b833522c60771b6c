"""``flashinfer.triton``: FlashInfer's Triton-kernel operators, as far as engines import them.

Only :mod:`.cascade` is provided (the merge operators). Every flashtile module imports Triton itself
with an absolute ``import triton``, which this subpackage cannot shadow.
"""

from . import cascade

__all__ = ["cascade"]
