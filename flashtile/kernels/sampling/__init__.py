"""Sampling kernels and their launchers, without sorting (docs/sampling.md).

The launchers take the same arguments as flashtile/reference/sampling.py's, which the API
(flashtile/sampling.py) calls the same way:

- ``filtered_sampling`` (filtered.py): plain, top-k, top-p, min-p and joint or top-k-first top-k/top-p
  sampling from probabilities, on segmented passes, with a row split at small batches;
- ``sampling_from_logits`` and ``softmax`` (logits.py);
- ``threshold_filter`` (renorm.py): top-k/top-p renormalization and top-k logit masking;
- ``chain_speculative_sampling`` (speculative.py).

common.py holds what they share (parameters, seeds, Philox draws), exact.py the exact threshold search
behind every fallback and the renorm kernels, passes.py the segmented passes and draws, config.py the
launch sizes and layout rules.
"""

from .config import split_layout
from .filtered import filtered_sampling
from .logits import sampling_from_logits, softmax
from .renorm import threshold_filter
from .speculative import chain_speculative_sampling

__all__ = ["chain_speculative_sampling", "filtered_sampling", "sampling_from_logits", "softmax", "split_layout",
           "threshold_filter"]
