"""Sampling, written the clear way (sort-based filters, inverse-CDF draws): the CPU path and the spec.

Every function here takes already-validated arguments (the API layer checks them). The spec
functions return new tensors; per-request parameters arrive as 1-D tensors ``[batch_out]`` and
``rows`` (int64 ``[batch_out]``) maps each output row to its row of ``probs``/``logits``. The last
section has the launchers' signatures (flashtile.kernels.sampling: ``filtered_sampling``,
``sampling_from_logits``, ``softmax``, ``threshold_filter``, ``chain_speculative_sampling``), which
take what the API passes the kernels (scalars or tensors on the device, ``rows`` or None, outputs to
write) and run the spec functions on the host.

Filter sets (the definition the Triton kernels implement without sorting; ties are always kept
together, because every rule compares a token's probability with the others' by value):

- top-k: keep token t iff ``count{p > p_t} < k``, i.e. ``p_t >=`` the k-th largest probability.
  ``k <= 0`` or ``k >= vocab`` keeps every token.
- top-p: keep t iff ``mass{p > p_t} < top_p * total`` (``total`` = the row's sum, so inputs need not
  be normalized), or t is a most probable token. Sorted descending with an exclusive cumulative sum
  ``c``, this keeps the sorted prefix with ``c < top_p * total`` plus every token tied with its last
  element. ``top_p >= 1`` keeps every token of positive probability.
- min-p: keep t iff ``p_t >= min_p * max(p)``.
- top-k then top-p ("top_k_first"): the top-p rule applied to the top-k renormalized distribution.
- joint: both rules on the original distribution.

Invalid entries: NaN and negative probabilities count as probability 0. A row without any positive
probability has no valid token: samplers return token 0 for it and report it as not valid.

Randomness: the draws of output row ``i`` are uniforms ``u(seed_i, offset_i + j)`` from a counter
based generator (:func:`uniforms`); a draw picks the first token whose running sum over the filter
set exceeds ``u * mass(filter set)`` (inverse CDF, in float64). The kernels use Triton's Philox with
the same (seed, offset) inputs, so the two paths are each reproducible but give different samples.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = [
    "uniforms",
    "softmax_of",
    "top_k_keep",
    "top_p_keep",
    "min_p_keep",
    "sample_from_mask",
    "sample_shared",
    "draws_from_probs",
    "draws_from_logits",
    "filtered_draws",
    "top_p_renorm_probs",
    "top_k_renorm_probs",
    "top_k_mask_logits",
    "speculative_draws",
    # the launchers' signatures (flashtile.kernels.sampling), writing into given outputs
    "filtered_sampling",
    "sampling_from_logits",
    "softmax",
    "threshold_filter",
    "chain_speculative_sampling",
]

_M64 = (1 << 64) - 1
DRAW_STRIDE = 64  # counters per output row when one (seed, offset) serves the batch


def _to_signed(v: int) -> int:
    v &= _M64
    return v - (1 << 64) if v >= (1 << 63) else v


_C1, _C2, _C3 = (_to_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _splitmix(x: torch.Tensor) -> torch.Tensor:
    x = x + _C1
    x = (x ^ _srl(x, 30)) * _C2
    x = (x ^ _srl(x, 27)) * _C3
    return x ^ _srl(x, 31)


def uniforms(seed: torch.Tensor, offset: torch.Tensor, rows: int, n: int,
             row_stride: int = DRAW_STRIDE) -> torch.Tensor:
    """Uniforms in [0, 1), float64 ``[rows, n]``: row i, draw j = u(seed_i, offset_i + j).

    ``seed``/``offset``: int64 tensors of length ``rows`` (per-row values), or of length 1: one
    (seed, offset) for the batch, with ``offset_i = offset + i * row_stride``.
    """
    seed = seed.to("cpu", torch.int64)
    offset = offset.to("cpu", torch.int64)
    if offset.numel() == 1:
        offset = offset + torch.arange(rows, dtype=torch.int64, device="cpu") * row_stride
    seed = seed.expand(rows)
    counter = offset[:, None] + torch.arange(n, dtype=torch.int64, device="cpu")[None, :]
    bits = _splitmix(_splitmix(seed)[:, None] ^ counter)
    return _srl(bits, 11).double() * (1.0 / (1 << 53))


def softmax_of(logits: torch.Tensor, temperature: Optional[torch.Tensor]) -> torch.Tensor:
    """float32 ``softmax(logits / temperature)`` per row; a row that is all -inf (or NaN) gives zeros."""
    x = logits.double()
    if temperature is not None:
        x = x / temperature.double()[:, None]
    x = torch.where(torch.isnan(x), float("-inf"), x)
    mx = x.max(dim=-1, keepdim=True).values
    alive = torch.isfinite(mx)
    e = torch.exp(x - torch.where(alive, mx, 0.0))
    out = torch.where(alive, e / e.sum(dim=-1, keepdim=True), 0.0)
    return out.float()


def _clean(probs: torch.Tensor) -> torch.Tensor:
    """float64 probabilities with NaN and negative entries set to 0."""
    p = probs.double()
    return torch.where(p > 0, p, 0.0)


def top_k_keep(p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Bool mask of the top-k set per row (ties at the k-th value kept). p: float64 ``[B, V]``."""
    vocab = p.shape[-1]
    k = top_k.to(torch.int64)
    k = torch.where((k <= 0) | (k > vocab), vocab, k)
    desc = torch.sort(p, dim=-1, descending=True).values
    kth = desc.gather(-1, (k - 1)[:, None])
    return p >= kth


def top_p_keep(p: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Bool mask of the nucleus per row: mass{p > p_t} < top_p * total (most probable tokens always)."""
    desc = torch.sort(p, dim=-1, descending=True).values
    excl = torch.cumsum(desc, dim=-1) - desc  # mass strictly before each sorted position
    total = p.sum(dim=-1, keepdim=True)
    inside = excl < top_p.double()[:, None] * total
    inside[:, 0] = True
    # The smallest kept value; every token tied with it (or above it) is kept.
    last = inside.sum(dim=-1, keepdim=True) - 1
    pivot = desc.gather(-1, last)
    return p >= pivot


def min_p_keep(p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    mx = p.max(dim=-1, keepdim=True).values
    return p >= min_p.double()[:, None] * mx


def sample_from_mask(p: torch.Tensor, keep: torch.Tensor, u: torch.Tensor):
    """Inverse-CDF draw from ``p`` restricted to ``keep``. p float64 ``[B, V]`` (>= 0), u ``[B]``.

    Returns (ids int64 ``[B]``, valid bool ``[B]``); rows without positive mass give id 0, invalid.
    """
    w = torch.where(keep, p, 0.0)
    cdf = torch.cumsum(w, dim=-1)
    mass = cdf[:, -1:]
    valid = mass[:, 0] > 0
    hit = (cdf > u[:, None] * mass) & (w > 0)
    ids = torch.where(hit.any(dim=-1), hit.int().argmax(dim=-1), 0)
    # u * mass can round above the last running sum: take the last token of positive weight then.
    last = torch.where(w > 0, torch.arange(p.shape[-1], device=p.device), -1).max(dim=-1).values
    ids = torch.where(hit.any(dim=-1), ids, last.clamp(min=0))
    return torch.where(valid, ids, 0), valid


def sample_shared(p: torch.Tensor, keep: torch.Tensor, group: torch.Tensor, u: torch.Tensor):
    """:func:`sample_from_mask` for output rows that share distributions: output row ``i`` draws from
    row ``group[i]`` of ``p`` (float64 ``[U, V]``) restricted to ``keep`` with uniform ``u[i]``.

    The same (ids, valid) as ``sample_from_mask(p[group], keep[group], u)`` without its ``[len(group), V]``
    copies (many draws of one row: ``indices``): one running sum per distinct row, a binary search per
    draw. The first running sum above ``u * mass`` sits at a token of positive weight (a sum of
    non-negative terms only rises where a term is positive), so the search finds the token the
    masked scan of :func:`sample_from_mask` finds.
    """
    vocab = p.shape[-1]
    w = torch.where(keep, p, 0.0)
    cdf = torch.cumsum(w, dim=-1)
    mass = cdf[:, -1]
    last = torch.where(w > 0, torch.arange(vocab, device=p.device), -1).max(dim=-1).values.clamp(min=0)
    x = u * mass[group]
    ids = torch.empty_like(group)
    order = torch.argsort(group, stable=True)
    for g, sel in enumerate(torch.split(order, torch.bincount(group, minlength=p.shape[0]).tolist())):
        if sel.numel():
            ids[sel] = torch.searchsorted(cdf[g], x[sel], right=True)
    ids = torch.where(ids < vocab, ids, last[group])  # u * mass rounded above the last running sum
    valid = mass[group] > 0
    return torch.where(valid, ids, 0), valid


def _distinct(rows: torch.Tensor, *params):
    """Output rows with the same source row and the same parameters share a distribution:
    (representative output row of each distinct one ``[U]``, index of each output row's ``[batch_out]``)."""
    cols = [rows.double()] + [v.double() for v in params if v is not None]
    _, group = torch.unique(torch.stack(cols, dim=-1), dim=0, return_inverse=True)
    n = rows.numel()
    first = torch.full((int(group.max()) + 1,), n, dtype=torch.int64, device=group.device)
    first.scatter_reduce_(0, group, torch.arange(n, device=group.device), "amin")
    return first, group


def _no_samples(device):
    """(ids, valid) of a call with no output rows."""
    return torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.bool, device=device)


def draws_from_probs(probs, rows, seed, offset):
    u = uniforms(seed, offset, rows.numel(), 1)[:, 0]
    if rows.numel() == 0:
        return _no_samples(probs.device)
    src, group = torch.unique(rows, return_inverse=True)
    p = _clean(probs)[src]
    return sample_shared(p, torch.ones_like(p, dtype=torch.bool), group, u)


def draws_from_logits(logits, rows, seed, offset):
    return draws_from_probs(softmax_of(logits, None), rows, seed, offset)


def filtered_draws(probs, rows, seed, offset, *, top_k=None, top_p=None, min_p=None, order="joint"):
    """Draw from the filter set (module doc) of each row; returns (ids, valid). Filter sets are built
    once per distinct (row, parameters): many draws of one row cost one row of work, not one each."""
    u = uniforms(seed, offset, rows.numel(), 1)[:, 0]
    if rows.numel() == 0:
        return _no_samples(probs.device)
    vocab = probs.shape[-1]
    if top_k is not None:  # every k outside [1, vocab] means "no filter": one key for all of them
        top_k = top_k.to(torch.int64)
        top_k = torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
    first, group = _distinct(rows, top_k, top_p, min_p)
    top_k, top_p, min_p = (v if v is None else v[first] for v in (top_k, top_p, min_p))
    p = _clean(probs)[rows[first]]
    keep = p > 0
    if top_k is not None:
        keep &= top_k_keep(p, top_k)
    if top_p is not None:
        base = torch.where(keep, p, 0.0) if order == "top_k_first" else p
        keep &= top_p_keep(base, top_p)
    if min_p is not None:
        keep &= min_p_keep(p, min_p)
    return sample_shared(p, keep, group, u)


def _renorm(p: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    w = torch.where(keep, p, 0.0)
    mass = w.sum(dim=-1, keepdim=True)
    return torch.where(mass > 0, w / torch.where(mass > 0, mass, 1.0), 0.0).float()


def top_p_renorm_probs(probs, top_p):
    p = _clean(probs)
    return _renorm(p, top_p_keep(p, top_p) & (p > 0))


def top_k_renorm_probs(probs, top_k):
    p = _clean(probs)
    return _renorm(p, top_k_keep(p, top_k))


def top_k_mask_logits(logits, top_k):
    """Logits outside the top-k set (and NaN) become -inf; ``k`` counts entries above -inf."""
    x = logits.double()
    x = torch.where(torch.isnan(x), float("-inf"), x)
    vocab = x.shape[-1]
    k = top_k.to(torch.int64)
    k = torch.where((k <= 0) | (k > vocab), vocab, k)
    kth = torch.sort(x, dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])
    return torch.where(x >= kth, x, float("-inf")).to(logits.dtype)


def speculative_draws(draft_probs, draft_token_ids, target_probs, seed, offset):
    """Standard speculative sampling. Returns (output_ids int32 [B, n+1], accepted int32 [B], emitted int32 [B]).

    Draw j < n of row b judges draft token j: accepted iff ``u_j * p_draft < p_target`` (probability
    ``min(1, p_target / p_draft)``; a token of target probability 0 is never accepted). Draw n picks
    the final token: from ``normalize(max(p_target - p_draft, 0))`` at the first rejection (from the
    target itself when that residual has no mass), or from ``target_probs[:, n]`` when all n are
    accepted.
    """
    batch, n, _ = draft_probs.shape
    q = _clean(draft_probs)
    t = _clean(target_probs)
    ids = draft_token_ids.to(torch.int64)
    u = uniforms(seed, offset, batch, n + 1, row_stride=n + 1)
    pd = q.gather(-1, ids[..., None])[..., 0]  # [B, n]
    pt = t[:, :n].gather(-1, ids[..., None])[..., 0]
    accept = u[:, :n] * pd < pt
    accepted = accept.sum(dim=-1)
    emitted = torch.cumprod(accept.long(), dim=-1).sum(dim=-1)
    out = torch.full((batch, n + 1), -1, dtype=torch.int64, device=ids.device)
    for b in range(batch):
        e = int(emitted[b])
        out[b, :e] = ids[b, :e]
        if e < n:
            resid = torch.clamp(t[b, e] - q[b, e], min=0.0)
            dist = resid if resid.sum() > 0 else t[b, e]
        else:
            dist = t[b, n]
        tok, _ = sample_from_mask(dist[None], torch.ones_like(dist[None], dtype=torch.bool), u[b, n:])
        out[b, e] = tok[0]
    return out.to(torch.int32), accepted.to(torch.int32), emitted.to(torch.int32)


# ---------------------------------------------------------------------------------------------
# The launchers' signatures (flashtile.kernels.sampling): the API calls either module the same way
# ---------------------------------------------------------------------------------------------


def _host_rng(seed, offset):
    """(seed, offset) as int64 host tensors: ints become ``[1]`` tensors."""
    def as_tensor(v):
        if isinstance(v, torch.Tensor):
            return v.to("cpu", torch.int64)
        return torch.tensor([v], dtype=torch.int64, device="cpu")

    return as_tensor(seed), as_tensor(offset)


def _host_rows(rows: Optional[torch.Tensor], batch: int) -> torch.Tensor:
    """int64 host ``[batch]`` source rows (``None``: output row i draws from row i)."""
    return rows.long().cpu() if rows is not None else torch.arange(batch, device="cpu")


def _per_row(value, batch: int) -> Optional[torch.Tensor]:
    """A parameter as a host tensor ``[batch]`` (a scalar is broadcast), or None."""
    if value is None or isinstance(value, torch.Tensor):
        return value if value is None else value.cpu()
    return torch.full((batch,), value, device="cpu")


def filtered_sampling(probs, rows, out, valid, seed, offset, *, top_k=None, top_p=None, min_p=None, order="joint",
                      max_rounds=None, split=None, launch_key=None):
    """:func:`filtered_draws` into ``out`` (ids) and ``valid``. ``max_rounds`` and ``split`` (the kernels'
    pass bound and row layout) and ``launch_key`` (the kernels' launch-memo key) are ignored here."""
    batch = out.shape[0]
    ids, ok = filtered_draws(probs.cpu(), _host_rows(rows, batch), *_host_rng(seed, offset),
                             top_k=_per_row(top_k, batch), top_p=_per_row(top_p, batch),
                             min_p=_per_row(min_p, batch), order=order)
    out.copy_(ids)
    valid.copy_(ok)


def sampling_from_logits(logits, rows, out, valid, seed, offset):
    """:func:`draws_from_logits` into ``out`` and ``valid``."""
    ids, ok = draws_from_logits(logits.cpu(), _host_rows(rows, out.shape[0]), *_host_rng(seed, offset))
    out.copy_(ids)
    valid.copy_(ok)


def softmax(logits, out, temperature):
    """:func:`softmax_of` into ``out``; ``temperature`` None, a scalar or a ``[batch]`` tensor."""
    out.copy_(softmax_of(logits.cpu(), _per_row(temperature, logits.shape[0])))


def threshold_filter(x, out, *, top_k=None, top_p=None, is_logits=False):
    """:func:`top_k_mask_logits` (``is_logits``), :func:`top_k_renorm_probs` (``top_k``) or
    :func:`top_p_renorm_probs` of ``x`` into ``out``."""
    batch = x.shape[0]
    if is_logits:
        result = top_k_mask_logits(x.cpu(), _per_row(top_k, batch))
    elif top_k is not None:
        result = top_k_renorm_probs(x.cpu(), _per_row(top_k, batch))
    else:
        result = top_p_renorm_probs(x.cpu(), _per_row(top_p, batch))
    out.copy_(result)


def chain_speculative_sampling(draft_probs, draft_token_ids, target_probs, out, accepted, emitted, seed, offset):
    """:func:`speculative_draws` into ``out``, ``accepted`` and ``emitted``."""
    results = speculative_draws(draft_probs.cpu(), draft_token_ids.cpu(), target_probs.cpu(), *_host_rng(seed, offset))
    for dst, src in zip((out, accepted, emitted), results):
        dst.copy_(src)
