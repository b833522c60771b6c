"""Online softmax and attention-state merging: the one place this math lives.

Everything is base 2. A row's running state is ``(m, l, acc)``:
- ``m``   running max of the base-2 logits seen so far (``-inf`` before any visible key),
- ``l``   sum of ``2**(s - m)`` over the keys seen,
- ``acc`` sum of ``2**(s - m) * v`` (unnormalized output), float32.
A finished state is ``(o, lse)`` with ``o = acc / l`` and ``lse = m + log2(l)``; a row that saw no
key has ``o = 0`` and ``lse = -inf``. Attention kernels (decode, prefill, split-KV partials) fold
tiles of logits in with :func:`softmax_update` (or :func:`softmax_step`). Merging finished states (split-KV reduction,
cascade) is the same update: a state is a "key" whose logit is its ``lse`` and whose value is its
``o`` (see merge.py). ``-inf`` is handled once, in :func:`_rescale`.
"""

import triton
import triton.language as tl


@triton.jit
def _rescale(m_old, m_new):
    """Factor that moves a sum taken relative to ``m_old`` onto ``m_new``, plus a safe pivot.

    When every logit so far is ``-inf`` (nothing visible yet) the pivot is 0 so that
    ``exp2(-inf - pivot)`` is 0 instead of NaN.
    """
    pivot = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_old - pivot)
    return alpha, pivot


@triton.jit
def softmax_step(m_i, l_i, s):
    """Fold one tile of base-2 logits ``s`` [BLOCK_M, BLOCK_N] (masked entries ``-inf``) into the row
    statistics, leaving the accumulator to the caller.

    Returns ``(m_new, l_new, alpha, p)``: the caller scales its accumulator by ``alpha[:, None]`` and
    adds ``dot(p, v_tile)``. ``p`` is float32 ``2**(s - m_new)``. (A kernel that overlaps the previous
    tile's ``dot`` with this step applies ``alpha`` once that product has landed.)
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha, pivot = _rescale(m_i, m_new)
    p = tl.exp2(s - pivot[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    return m_new, l_new, alpha, p


@triton.jit
def softmax_update(m_i, l_i, acc, s):
    """:func:`softmax_step` plus the rescale of ``acc``: returns ``(m_new, l_new, acc_rescaled, p)``;
    the caller adds ``dot(p, v_tile)`` to ``acc_rescaled``."""
    m_new, l_new, alpha, p = softmax_step(m_i, l_i, s)
    return m_new, l_new, acc * alpha[:, None], p


@triton.jit
def finalize_state(m_i, l_i, acc):
    """``(o, lse)`` of a running state; rows with ``l == 0`` give ``o = 0`` and ``lse = -inf``."""
    empty = l_i == 0.0
    safe_l = tl.where(empty, 1.0, l_i)
    # One reciprocal per row, not a division per element: a float32 division is a short sequence of
    # its own (range scaling around a reciprocal), and the row's zero factor clears an empty row
    # (its acc is 0: every weight was 0).
    inv_l = tl.where(empty, 0.0, 1.0 / safe_l)
    o = acc * inv_l[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(safe_l))
    return o, lse
