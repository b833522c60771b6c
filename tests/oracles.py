"""Naive float64 oracles. Independent of flashtile/reference: explicit masks, explicit loops over
heads, every formula written out from api_spec.md §1.4-§1.9. Tests compare every path to these.
"""

from __future__ import annotations

import math

import torch

# (dtype) -> (atol, rtol) for outputs of kernels/reference against the float64 oracle computed on the
# same (already rounded) inputs. The error comes from rounding probabilities and outputs to the
# input dtype; float32 accumulation keeps the rest far below these bounds.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.2e-2, 1.6e-2),
}
LSE_TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 1e-3), torch.bfloat16: (1e-2, 1e-3)}


def alibi_slopes_f64(num_heads: int) -> list[float]:
    n = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]
    slopes += [2.0 ** (-4.0 * (2 * m + 1) / n) for m in range(num_heads - n)]
    return slopes


def rope_f64(x: torch.Tensor, positions: torch.Tensor, rope_scale: float, rope_theta: float) -> torch.Tensor:
    """x [tokens, heads, D] float64; half-split pairs (d, d + D/2)."""
    d = x.shape[-1]
    half = d // 2
    out = torch.empty_like(x)
    for m in range(half):
        freq = (rope_theta ** (-2.0 * m / d)) / rope_scale
        ang = positions.double() * freq
        c, s = torch.cos(ang)[:, None], torch.sin(ang)[:, None]
        a, b = x[..., m], x[..., m + half]
        out[..., m] = a * c - b * s
        out[..., m + half] = b * c + a * s
    return out


def visible_keys(Lq, Lk, *, causal=False, custom_mask=None, window_left=-1):
    """``(qpos, kpos, allowed)`` of one request: float64 positions of its queries (bottom-right aligned:
    the last query sits at the last key) and keys, and the bool ``[Lq, Lk]`` mask of the keys each query
    sees (a custom mask replaces causal; a window applies on top)."""
    qpos = torch.arange(Lq, dtype=torch.float64) + (Lk - Lq)
    kpos = torch.arange(Lk, dtype=torch.float64)
    allowed = torch.ones(Lq, Lk, dtype=torch.bool)
    if custom_mask is not None:
        allowed = custom_mask.cpu().bool().clone()
    elif causal:
        allowed = kpos[None, :] <= qpos[:, None]
    if window_left >= 0:
        allowed = allowed & (kpos[None, :] >= qpos[:, None] - window_left)
    return qpos, kpos, allowed


def attention_oracle(
    q, k, v, *, causal=False, custom_mask=None, sm_scale=None, logits_soft_cap=0.0, window_left=-1,
    pos_encoding_mode="NONE", rope_scale=1.0, rope_theta=1e4, k_scale=1.0, v_scale=1.0, q_scale=1.0,
    rotated_dtype=None,
):
    """One request. q [Lq, Hq, D]; k, v [Lk, Hk, D] (NHD). Returns (out float64, lse base 2 float64).
    ``rotated_dtype``: with RoPE, round the rotated q and k to this dtype, as the kernels do before their dot
    product (docs/semantics.md; the reference path keeps them exact)."""
    q = q.double().cpu()
    k = k.double().cpu() * k_scale
    v = v.double().cpu() * v_scale
    Lq, Hq, D = q.shape
    Lk, Hk, Dv = v.shape
    g = Hq // Hk
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    q = q * q_scale
    qpos, kpos, allowed = visible_keys(Lq, Lk, causal=causal, custom_mask=custom_mask, window_left=window_left)
    if pos_encoding_mode == "ROPE_LLAMA":
        q = rope_f64(q, qpos, rope_scale, rope_theta)
        k = rope_f64(k, kpos, rope_scale, rope_theta)
        if rotated_dtype is not None:
            q, k = q.to(rotated_dtype).double(), k.to(rotated_dtype).double()
    slopes = alibi_slopes_f64(Hq)
    out = torch.zeros(Lq, Hq, Dv, dtype=torch.float64)
    lse = torch.full((Lq, Hq), float("-inf"), dtype=torch.float64)
    for h in range(Hq):
        kh, vh = k[:, h // g], v[:, h // g]
        s = (q[:, h] @ kh.T) * sm_scale
        if pos_encoding_mode == "ALIBI":
            s = s + slopes[h] * (kpos[None, :] - qpos[:, None])
        if logits_soft_cap and logits_soft_cap > 0:
            s = logits_soft_cap * torch.tanh(s / logits_soft_cap)
        s = s.masked_fill(~allowed, float("-inf"))
        seen = allowed.any(dim=1)  # rows with at least one visible key
        if Lk == 0:
            continue  # nothing visible: output 0, lse -inf
        mx = torch.where(seen, s.max(dim=1).values, torch.zeros(Lq, dtype=torch.float64))
        w = torch.exp(s - mx[:, None])  # exactly 0 where masked
        denom = w.sum(dim=1)
        out[seen, h] = (w @ vh)[seen] / denom[seen, None]
        lse[seen, h] = (mx[seen] + torch.log(denom[seen])) / math.log(2.0)
    return out, lse


# (fp8 dtype) -> (relative rounding error of a normal value, absolute rounding error below the normal range):
# half an ulp of the mantissa (3 bits e4m3fn, 2 bits e5m2) and half the subnormal step (2**-9, 2**-16).
FP8_ROUNDING = {torch.float8_e4m3fn: (2.0**-4, 2.0**-10), torch.float8_e5m2: (2.0**-3, 2.0**-17)}


# Hopper's fp8 tensor cores (wgmma) add each k32 step's products into an accumulator that keeps about 13
# mantissa bits, truncating (DeepSeek-V3 report, §3.3.2, "around 14 bits"); Triton leaves fp8 dots so on sm_90
# (its max_num_imprecise_acc default), as FA3 does. Two ulps of that accumulator per step:
FP8_MMA_STEP_ERROR = 2.0**-12


def fp8_mma_logit_error_bound(q, k, *, sm_scale=None):
    """``[Lq, Hq]`` (float64) bound on the error of any one logit ``sm_scale * q.k`` (natural units) that a
    Hopper fp8 tensor-core product adds: :data:`FP8_MMA_STEP_ERROR` per k32 step (plus one for the steps'
    own sums) of the largest sum of absolute products ``sum_i |q_i k_i|`` over the row's keys. The lse
    (a smooth max of the logits) moves by at most the largest logit error."""
    q, k = q.double().cpu(), k.double().cpu()
    Lq, Hq, D = q.shape
    g = Hq // k.shape[1]
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    bound = torch.zeros(Lq, Hq, dtype=torch.float64)
    for h in range(Hq):
        if k.shape[0]:
            bound[:, h] = (q[:, h].abs() @ k[:, h // g].abs().T).max(dim=1).values * sm_scale
    return bound * FP8_MMA_STEP_ERROR * (math.ceil(D / 32) + 1)


def fp8_weights_error_bound(q, k, v, fp8_dtype, *, causal=False, custom_mask=None, sm_scale=None,
                            logits_soft_cap=0.0, window_left=-1):
    """Elementwise bound ``[Lq, Hq, Dv]`` (float64) on how far an FP8 attention that rounds its softmax
    weights to ``fp8_dtype`` before the P.V product (FA3's scheme) may be from :func:`attention_oracle` of
    the same (dequantized) q, k, v. The row's normalizer is the sum of the unrounded weights, so
    ``out - exact = sum_j (w~_j - w_j) v_j / sum_j w_j`` with ``w_j = exp(s_j - max)``. A weight rounded
    at a running max ``m' <= max`` has its error scaled by ``exp(m' - max) <= 1`` afterwards, so
    ``|w~_j - w_j| <= max(rel * w_j, abs)`` (:data:`FP8_ROUNDING`) holds in the final scale too."""
    rel, absolute = FP8_ROUNDING[fp8_dtype]
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    Lq, Hq, D = q.shape
    Lk, Hk, Dv = v.shape
    g = Hq // Hk
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    _, _, allowed = visible_keys(Lq, Lk, causal=causal, custom_mask=custom_mask, window_left=window_left)
    bound = torch.zeros(Lq, Hq, Dv, dtype=torch.float64)
    for h in range(Hq):
        s = (q[:, h] @ k[:, h // g].T) * sm_scale
        if logits_soft_cap and logits_soft_cap > 0:
            s = logits_soft_cap * torch.tanh(s / logits_soft_cap)
        s = s.masked_fill(~allowed, float("-inf"))
        seen = allowed.any(dim=1)
        if Lk == 0:
            continue
        mx = torch.where(seen, s.max(dim=1).values, torch.zeros(Lq, dtype=torch.float64))
        w = torch.exp(s - mx[:, None])
        err = torch.where(allowed, torch.clamp(rel * w, min=absolute), torch.zeros_like(w))
        denom = w.sum(dim=1).clamp_min(1.0)  # >= 1 where a key is seen (the max's weight is 1)
        bound[:, h] = (err @ v[:, h // g].abs()) / denom[:, None]
    return bound


# ---------------------------------------------------------------------------------------------
# Paged KV cache (api_spec.md §1.2, §8): explicit loops over rows and heads
# ---------------------------------------------------------------------------------------------


def paged_cache_f64(cache, kv_layout):
    """The caller's cache as float64 copies ``(k, v)``, each ``[pages, page_size, heads, dim]``.

    Forms: 5-D ``[pages, 2, ps, H, D]`` (NHD) / ``[pages, 2, H, ps, D]`` (HND); 4-D ``[pages, 2, H, D]``
    (page size 1); tuple of 4-D ``[pages, ps, H, D]`` / ``[pages, H, ps, D]``; tuple of 3-D (page size 1).
    """
    if isinstance(cache, torch.Tensor):
        parts = [cache[:, 0], cache[:, 1]]
    else:
        parts = list(cache)
    out = []
    for x in parts:
        x = x.detach().cpu().to(torch.float64)
        if x.dim() == 3:  # [pages, H, D]
            x = x[:, None]
        elif kv_layout == "HND":  # [pages, H, ps, D] -> [pages, ps, H, D]
            x = x.permute(0, 2, 1, 3)
        out.append(x.clone())
    return tuple(out)


def append_paged_kv_oracle(append_key, append_value, batch_indices, positions, cache, kv_indices, kv_indptr,
                           kv_layout):
    """Expected ``(k, v)`` float64 ``[pages, page_size, heads, dim]`` after the append: row ``r`` of
    request ``b`` goes to page ``kv_indices[kv_indptr[b] + p // page_size]``, slot ``p % page_size``;
    rows with batch index -1 are padding and are not written."""
    k, v = paged_cache_f64(cache, kv_layout)
    page_size = k.shape[1]
    key, value = append_key.detach().cpu().double(), append_value.detach().cpu().double()
    bi, pos = batch_indices.tolist(), positions.tolist()
    indices, indptr = kv_indices.tolist(), kv_indptr.tolist()
    for r in range(len(bi)):
        b, p = bi[r], pos[r]
        if b == -1:
            continue
        page = indices[indptr[b] + p // page_size]
        slot = p % page_size
        for h in range(k.shape[2]):
            k[page, slot, h, :] = key[r, h, :]
            v[page, slot, h, :] = value[r, h, :]
    return k, v


def append_paged_mla_oracle(append_ckv, append_kpe, batch_indices, positions, ckv_cache, kpe_cache, kv_indices,
                            kv_indptr):
    """Expected float64 ``(ckv_cache, kpe_cache)`` ``[pages, page_size, dim]`` after an MLA append."""
    ckv, kpe = ckv_cache.detach().cpu().double().clone(), kpe_cache.detach().cpu().double().clone()
    page_size = ckv.shape[1]
    for r, (b, p) in enumerate(zip(batch_indices.tolist(), positions.tolist())):
        page = kv_indices.tolist()[kv_indptr.tolist()[b] + p // page_size]
        ckv[page, p % page_size] = append_ckv[r].double().cpu()
        kpe[page, p % page_size] = append_kpe[r].double().cpu()
    return ckv, kpe


def batch_indices_positions_oracle(append_indptr, seq_lens, nnz):
    """``(batch_indices, positions)`` as lists: row r of request b gets b and
    ``seq_lens[b] - (append_indptr[b+1] - r)``; rows no request owns get -1 and 0."""
    indptr, lens = append_indptr.tolist(), seq_lens.tolist()
    batch_indices, positions = [-1] * nnz, [0] * nnz
    for b in range(len(lens)):
        for r in range(indptr[b], indptr[b + 1]):
            if r < nnz:
                batch_indices[r] = b
                positions[r] = lens[b] - (indptr[b + 1] - r)
    return batch_indices, positions


def read_paged_kv_oracle(k_pages, v_pages, kv_indices, kv_indptr, kv_last_page_len):
    """Per request, its tokens ``(k [len, H, D], v [len, H, D])`` from float64 ``[pages, page_size, H, D]``
    page tensors: its pages in table order, laid end to end, cut at ``(num_pages - 1) * page_size + last``."""
    page_size = k_pages.shape[1]
    indices, indptr, last = kv_indices.tolist(), kv_indptr.tolist(), kv_last_page_len.tolist()
    out = []
    for b in range(len(last)):
        pages = indices[indptr[b]:indptr[b + 1]]
        length = (len(pages) - 1) * page_size + last[b] if pages else 0  # no pages: no KV
        rows = torch.tensor(pages, dtype=torch.long)
        out.append(tuple(x[rows].reshape((-1,) + tuple(x.shape[2:]))[:length] for x in (k_pages, v_pages)))
    return out


# ---------------------------------------------------------------------------------------------
# Small ops (api_spec.md §10-§12): norms, gated activations, RoPE. Float64, written from the spec.
# ---------------------------------------------------------------------------------------------


def rmsnorm_f64(x, weight, eps=1e-6, weight_offset=0.0):
    """x [..., N]; out = x / sqrt(mean(x^2) + eps) * (weight + weight_offset)."""
    x = x.double().cpu()
    w = weight.double().cpu() + weight_offset
    ms = (x * x).sum(dim=-1, keepdim=True) / x.shape[-1]
    return x / torch.sqrt(ms + eps) * w


def fused_add_rmsnorm_f64(x, residual, weight, eps=1e-6, weight_offset=0.0):
    """Returns (new input, new residual): s = x + residual; (rmsnorm(s), s)."""
    s = x.double().cpu() + residual.double().cpu()
    return rmsnorm_f64(s, weight, eps, weight_offset), s


def layernorm_f64(x, gamma, beta, eps=1e-6):
    x = x.double().cpu()
    n = x.shape[-1]
    mean = x.sum(dim=-1, keepdim=True) / n
    var = ((x - mean) ** 2).sum(dim=-1, keepdim=True) / n
    return (x - mean) / torch.sqrt(var + eps) * gamma.double().cpu() + beta.double().cpu()


def act_and_mul_f64(x, name):
    """x [..., 2d] -> act(x[..., :d]) * x[..., d:]."""
    x = x.double().cpu()
    d = x.shape[-1] // 2
    a, b = x[..., :d], x[..., d:]
    if name == "silu":
        g = a / (1.0 + torch.exp(-a))
    elif name == "gelu":
        g = 0.5 * a * (1.0 + torch.erf(a / math.sqrt(2.0)))
    elif name == "gelu_tanh":
        g = 0.5 * a * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (a + 0.044715 * a**3)))
    else:
        raise ValueError(name)
    return g * b


def rope_frequencies_f64(rotary_dim, rope_scale=1.0, rope_theta=1e4, llama31=None):
    """Per-pair frequencies. llama31 = (low_freq_factor, high_freq_factor, old_context_len) applies
    Meta's piecewise rule by wavelength: short waves keep f, long waves get f / scale, blend between."""
    freqs = []
    for m in range(rotary_dim // 2):
        f = rope_theta ** (-2.0 * m / rotary_dim)
        if llama31 is None:
            freqs.append(f / rope_scale)
            continue
        low, high, old = llama31
        wavelen = 2.0 * math.pi / f
        if wavelen < old / high:
            freqs.append(f)
        elif wavelen > old / low:
            freqs.append(f / rope_scale)
        else:
            smooth = (old / wavelen - low) / (high - low)
            freqs.append((1.0 - smooth) * f / rope_scale + smooth * f)
    return freqs


def rope_general_f64(x, positions, rotary_dim=None, interleave=False, freqs=None, cos_sin_cache=None):
    """x [nnz, H, D]; rotate the first rotary_dim dims of every head; pairs (m, m + R/2) or (2m, 2m+1).
    Angle of pair m at position p: p * freqs[m], or cos/sin read from cos_sin_cache[p] (cos | sin)."""
    x = x.double().cpu()
    positions = positions.cpu().long()
    r = rotary_dim or x.shape[-1]
    half = r // 2
    out = x.clone()
    if cos_sin_cache is not None:
        cos_sin = cos_sin_cache.double().cpu()[positions]  # the rows used, converted once
    for m in range(half):
        i, j = (2 * m, 2 * m + 1) if interleave else (m, m + half)
        if cos_sin_cache is not None:
            c = cos_sin[:, m][:, None]
            s = cos_sin[:, half + m][:, None]
        else:
            ang = positions.double() * freqs[m]
            c, s = torch.cos(ang)[:, None], torch.sin(ang)[:, None]
        out[..., i] = x[..., i] * c - x[..., j] * s
        out[..., j] = x[..., j] * c + x[..., i] * s
    return out


def ragged_positions(indptr, offsets):
    """Token t of segment i (rows indptr[i]:indptr[i+1]) sits at offsets[i] + t - indptr[i]."""
    pos = []
    for i in range(len(indptr) - 1):
        for t in range(int(indptr[i]), int(indptr[i + 1])):
            pos.append(int(offsets[i]) + t - int(indptr[i]))
    return torch.tensor(pos, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Sampling (api_spec.md §9): filter sets from explicit counts/masses of strictly larger entries
# ---------------------------------------------------------------------------------------------


def _greater_stats(p: torch.Tensor):
    """For each entry of float64 rows p: (count of entries > it, mass of entries > it), by searchsorted."""
    asc = torch.sort(p, dim=-1).values
    le = torch.searchsorted(asc, p.contiguous(), right=True)  # entries <= p_t
    cum = torch.cat([torch.zeros_like(asc[:, :1]), torch.cumsum(asc, dim=-1)], dim=-1)
    mass_le = cum.gather(-1, le)
    return p.shape[-1] - le, cum[:, -1:] - mass_le


def sampling_keep_oracle(probs, top_k=None, top_p=None, min_p=None, order="joint"):
    """Bool ``[B, V]``: tokens a filtered sampler may return. ``top_k``/``top_p``/``min_p`` are
    per-row sequences (or None). NaN/negative count as 0; zero-probability tokens are never kept."""
    p = probs.double().cpu()
    p = torch.where(p > 0, p, torch.zeros_like(p))
    B, V = p.shape
    keep = p > 0
    if top_k is not None:
        k = torch.as_tensor(top_k, dtype=torch.int64).cpu().reshape(-1).expand(B)
        k = torch.where((k <= 0) | (k > V), torch.full_like(k, V), k)
        cnt, _ = _greater_stats(p)
        keep &= cnt < k[:, None]
    if top_p is not None:
        tp = torch.as_tensor(top_p, dtype=torch.float64).cpu().reshape(-1).expand(B)
        base = torch.where(keep, p, torch.zeros_like(p)) if order == "top_k_first" else p
        cnt, mass = _greater_stats(base)
        total = base.sum(dim=-1, keepdim=True)
        keep &= (mass < tp[:, None] * total) | (cnt == 0)
    if min_p is not None:
        mp = torch.as_tensor(min_p, dtype=torch.float64).cpu().reshape(-1).expand(B)
        keep &= p >= mp[:, None] * p.max(dim=-1, keepdim=True).values
    return keep


def renorm_oracle(probs, keep):
    p = probs.double().cpu()
    w = torch.where(keep, p, torch.zeros_like(p))
    return w / w.sum(dim=-1, keepdim=True)


def softmax_oracle(logits, temperature=None):
    x = logits.double().cpu()
    if temperature is not None:
        x = x / torch.as_tensor(temperature, dtype=torch.float64).reshape(-1, 1)
    return torch.softmax(x, dim=-1)


def chi_square_pvalue(samples: torch.Tensor, target: torch.Tensor) -> float:
    """p-value of samples (ids) against the distribution ``target`` [V] (float64, sums to 1).
    Categories with expected count < 5 are pooled into one bin. Samples outside the support fail."""
    from scipy import stats

    n = samples.numel()
    counts = torch.bincount(samples.long().cpu(), minlength=target.numel()).double()
    target = target.double().cpu()
    assert counts[target == 0].sum() == 0, "a sample has target probability 0"
    expected = target * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    if exp[-1] < 5:  # pool too small: merge it into the smallest big bin
        obs, exp = obs[:-1].clone(), exp[:-1].clone()
        j = int(torch.argmin(exp))
        obs[j] += counts[~big].sum()
        exp[j] += expected[~big].sum()
    if exp.numel() < 2:
        return 1.0
    return float(stats.chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


def merge_states_f64(v, s):
    """Merge attention states (api_spec.md §4.1), written as a softmax over the states in natural log.

    v [T, S, H, D], s [T, S, H] base-2 LSEs. Returns (v float64 [T, H, D], s float64 [T, H]).
    State i of a (token, head) gets weight exp(ln2 * s_i - L) with L = logsumexp_i(ln2 * s_i); the
    merged LSE is L / ln2. A (token, head) whose states are all -inf (or that has none) is 0 and -inf,
    and the v of a -inf state is never used."""
    v = v.double().cpu()
    s = s.double().cpu()
    T, S, H, D = v.shape
    out = torch.zeros(T, H, D, dtype=torch.float64)
    lse = torch.full((T, H), float("-inf"), dtype=torch.float64)
    ln2 = math.log(2.0)
    for t in range(T):
        for h in range(H):
            live = [i for i in range(S) if s[t, i, h] != float("-inf")]
            if not live:
                continue
            x = s[t, live, h] * ln2
            total = torch.logsumexp(x, dim=0)
            weights = torch.exp(x - total)
            out[t, h] = (weights[:, None] * v[t, live, h]).sum(dim=0)
            lse[t, h] = total / ln2
    return out, lse


# ---------------------------------------------------------------------------------------------
# Multi-item scoring in batch prefill (upstream's prefix_len_ptr / token_pos_in_items_ptr)
# ---------------------------------------------------------------------------------------------


def multi_item_mask_oracle(qo_len, kv_len, prefix_len, item_positions):
    """Bool ``[qo_len, kv_len]`` (True = attend), set key by key.

    Query ``i`` is the token at sequence position ``p = kv_len - qo_len + i``. ``item_positions[e]`` is
    the position inside its item of the token at ``prefix_len + e`` (0 for a delimiter). A prefix token
    (``p < prefix_len``) sees keys ``0..p``. A later token with item position ``t`` sees the whole prefix
    ``0..prefix_len-1`` and the keys ``p-t+1..p``: itself and the ``t - 1`` tokens of its item before it
    (a delimiter sees only the prefix)."""
    mask = torch.zeros(qo_len, kv_len, dtype=torch.bool)
    for i in range(qo_len):
        p = kv_len - qo_len + i
        if p < 0:
            continue
        if p < prefix_len:
            for j in range(p + 1):
                mask[i, j] = True
            continue
        for j in range(prefix_len):
            mask[i, j] = True
        t = int(item_positions[p - prefix_len])
        for j in range(max(p - t + 1, 0), p + 1):
            mask[i, j] = True
    return mask


def multi_item_mask_from_items(prompt_len, item_lens):
    """The mask of a whole scoring sequence ``prompt <d> item_1 <d> ... item_n <d>`` (every token a query),
    built from item membership as FlashInfer's own test does: a token sees the prompt, and the tokens of
    its own item up to itself; delimiters are seen by nobody and see only the prompt."""
    is_delim = [False] * prompt_len + [True]
    for n in item_lens:
        is_delim += [False] * n + [True]
    length = len(is_delim)
    group, g = [], 0
    for d in is_delim:
        g += int(d)
        group.append(g)  # the prompt is group 0; each delimiter opens a group
    mask = torch.zeros(length, length, dtype=torch.bool)
    for p in range(length):
        for j in range(p + 1):
            if p < prompt_len:
                mask[p, j] = True
            elif j < prompt_len:
                mask[p, j] = True
            elif not is_delim[p] and not is_delim[j] and group[j] == group[p]:
                mask[p, j] = True
    return mask


# ---------------------------------------------------------------------------------------------
# Attention variants (flashtile/variants.py): sinks and sigmoid attention, float64, explicit loops
# ---------------------------------------------------------------------------------------------


def sink_attention_oracle(q, k, v, sinks, *, causal=False, sm_scale=None):
    """One request with per-head sink logits (natural units) joining each row's softmax denominator.
    Returns (out float64, lse base 2 float64, the sink included)."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    Lq, Hq, D = q.shape
    Lk, Hk, Dv = v.shape
    g = Hq // Hk
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    _, _, allowed = visible_keys(Lq, Lk, causal=causal)
    out = torch.zeros(Lq, Hq, Dv, dtype=torch.float64)
    lse = torch.zeros(Lq, Hq, dtype=torch.float64)
    for h in range(Hq):
        s = (q[:, h] @ k[:, h // g].T) * sm_scale
        s = s.masked_fill(~allowed, float("-inf"))
        sink = torch.full((Lq, 1), float(sinks[h]), dtype=torch.float64)
        full = torch.cat([s, sink], dim=1)
        w = torch.softmax(full, dim=1)[:, :Lk]
        out[:, h] = w @ v[:, h // g]
        lse[:, h] = torch.logsumexp(full, dim=1) / math.log(2.0)
    return out, lse


def sigmoid_attention_oracle(q, k, v, logits_scale, sigmoid_bias, *, causal=False):
    """FlashSigmoid: ``out_i = sum_j sigmoid(q_i.k_j * logits_scale + sigmoid_bias) v_j`` over visible keys
    (no normalization). Returns out float64."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    Lq, Hq, _ = q.shape
    Lk, Hk, Dv = v.shape
    g = Hq // Hk
    _, _, allowed = visible_keys(Lq, Lk, causal=causal)
    out = torch.zeros(Lq, Hq, Dv, dtype=torch.float64)
    for h in range(Hq):
        w = torch.sigmoid((q[:, h] @ k[:, h // g].T) * logits_scale + sigmoid_bias) * allowed
        out[:, h] = w @ v[:, h // g]
    return out


# ---------------------------------------------------------------------------------------------
# MLA (api_spec.md §5): plain MQA over the concatenated [latent | rope] keys
# ---------------------------------------------------------------------------------------------


def mla_oracle(q_nope, q_pe, ckv_cache, kpe_cache, qo_indptr, kv_indptr, kv_indices, kv_lens, *, causal, sm_scale,
               ckv_scale=1.0, kpe_scale=1.0):
    """Every request of an MLA batch as multi-query attention: q = [q_nope | q_pe] per head, one KV head
    with k = [ckv * ckv_scale | kpe * kpe_scale] and v = ckv * ckv_scale, the token rows read page by
    page. Returns (out float64 [nnz_q, H, D_ckv], lse base 2 [nnz_q, H]); rows of requests with no
    visible key are 0 / -inf. Rows past qo_indptr[-1] are NaN (not part of any request)."""
    qo, kvp, idx, lens = (t.tolist() for t in (qo_indptr.cpu(), kv_indptr.cpu(), kv_indices.cpu(), kv_lens.cpu()))
    nnz, H, dc = q_nope.shape
    page_size = ckv_cache.shape[1]
    ckv_cache, kpe_cache = ckv_cache.cpu(), kpe_cache.cpu()  # one copy, then host indexing
    out = torch.full((nnz, H, dc), float("nan"), dtype=torch.float64)
    lse = torch.full((nnz, H), float("nan"), dtype=torch.float64)
    for b, kv_len in enumerate(lens):
        q0, q1 = qo[b], qo[b + 1]
        rows_c, rows_p = [], []
        for j in range(kv_len):
            page = idx[kvp[b] + j // page_size]
            rows_c.append(ckv_cache[page, j % page_size].double() * ckv_scale)
            rows_p.append(kpe_cache[page, j % page_size].double() * kpe_scale)
        ckv = torch.stack(rows_c) if rows_c else torch.zeros(0, dc, dtype=torch.float64)
        kpe = torch.stack(rows_p) if rows_p else torch.zeros(0, kpe_cache.shape[-1], dtype=torch.float64)
        q = torch.cat([q_nope[q0:q1].double().cpu(), q_pe[q0:q1].double().cpu()], dim=-1)
        k = torch.cat([ckv, kpe], dim=-1)[:, None]
        o, s = attention_oracle(q, k, ckv[:, None], causal=causal, sm_scale=sm_scale)
        out[q0:q1], lse[q0:q1] = o, s
    return out, lse


# ---------------------------------------------------------------------------------------------
# Block-sparse attention (api_spec.md §6): the BSR pattern expanded to a dense mask, explicit loops
# ---------------------------------------------------------------------------------------------


def bsr_dense_mask(indptr, indices, M, N, R, C, mask=None, causal=False):
    """``[M, N]`` bool: block row ``b`` (rows ``b*R`` up to ``M``) sees the columns of its listed blocks,
    refined by ``mask [nnz, R, C]``; ``causal`` (only without a mask) keeps ``j <= i``."""
    indptr, indices = [int(x) for x in indptr.cpu()], [int(x) for x in indices.cpu()]
    dense = torch.zeros(M, N, dtype=torch.bool)
    for b in range(len(indptr) - 1):
        for p in range(indptr[b], indptr[b + 1]):
            c = indices[p]
            for r in range(R):
                i = b * R + r
                if i >= M:
                    break
                block = torch.ones(C, dtype=torch.bool) if mask is None else mask[p, r].cpu()
                dense[i, c * C:(c + 1) * C] |= block
    if causal and mask is None:
        dense &= torch.arange(N)[None, :] <= torch.arange(M)[:, None]
    return dense


def variable_dense_mask(block_mask_map, block_row_sz, block_col_sz, causal=False):
    """``[num_kv_heads, qo_len, kv_len]`` bool of per-head variable blocks, explicit loops."""
    H, MB, NB = block_mask_map.shape
    rows, cols = block_row_sz.cpu().tolist(), block_col_sz.cpu().tolist()
    qo_len, kv_len = sum(rows[0]), sum(cols[0])
    dense = torch.zeros(H, qo_len, kv_len, dtype=torch.bool)
    for h in range(H):
        r0 = 0
        for r in range(MB):
            c0 = 0
            for c in range(NB):
                if bool(block_mask_map[h, r, c]):
                    dense[h, r0:r0 + rows[h][r], c0:c0 + cols[h][c]] = True
                c0 += cols[h][c]
            r0 += rows[h][r]
    if causal:
        dense &= torch.arange(kv_len)[None, None, :] <= torch.arange(qo_len)[None, :, None]
    return dense


def masked_attention_oracle(q, k, v, dense_mask, *, sm_scale=None, logits_soft_cap=0.0, rope=None):
    """Attention of q ``[M, Hq, D]`` over k, v ``[N, Hk, D]`` under ``dense_mask [M, N]``; ``rope`` =
    ``(rope_scale, rope_theta)`` rotates q and k by their row indices (global positions) first.
    Returns (out float64, lse base 2 float64)."""
    if rope is not None:
        q = rope_f64(q.double().cpu(), torch.arange(q.shape[0]), *rope)
        k = rope_f64(k.double().cpu(), torch.arange(k.shape[0]), *rope)
    return attention_oracle(q, k, v, custom_mask=dense_mask, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap)


# --------------------------------------------------------------------------------------------------
# FP8 / FP4 quantization (flashtile.quantization): float64, written from the format definitions
# --------------------------------------------------------------------------------------------------

# (mantissa bits, smallest normal exponent, largest finite value) of each minifloat format.
MINIFLOAT_FORMATS = {
    "e4m3": (3, -6, 448.0),
    "e5m2": (2, -14, 57344.0),
    "e2m1": (1, 0, 6.0),
}


def minifloat_round_f64(v: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round float64 ``v`` to the nearest value of a minifloat format, ties to even, saturating
    (|v| > max and +-inf give +-max); NaN stays NaN. Normals are 2^e (1 + m / 2^mbits) for
    e >= emin, subnormals multiples of 2^(emin - mbits)."""
    mbits, emin, vmax = MINIFLOAT_FORMATS[fmt]
    v = v.double()
    a = v.abs()
    _, big_e = torch.frexp(torch.where(torch.isfinite(a), a, torch.ones_like(a)))  # a = f 2^E, f in [0.5, 1)
    e = (big_e - 1).clamp(min=emin).double()
    step = torch.pow(2.0, e - mbits)
    q = torch.round(a / step) * step  # torch.round: half to even
    q = torch.where(torch.isinf(a), torch.full_like(q, vmax), q).clamp(max=vmax)
    return torch.where(torch.isnan(v), v, torch.copysign(q, v))


def fp8_dynamic_scale_f64(x: torch.Tensor, fmt: str, per_token: bool) -> torch.Tensor:
    a = x.double().abs()
    a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    amax = a.amax(dim=-1, keepdim=True) if per_token else a.amax().reshape(1)
    vmax = MINIFLOAT_FORMATS[fmt][2]
    return torch.where(amax > 0, amax / vmax, torch.ones_like(amax))


def fp8_quantize_f64(x: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """The FP8 values (as float64) of x / scale, RNE, saturating."""
    return minifloat_round_f64(x.double() / scale.double(), fmt)


def fp4_block_quantize_f64(x: torch.Tensor, sf_vec_size: int, mx: bool, global_scale: float = 1.0):
    """FP4 block quantization of ``x [M, K]`` in float64. Returns ``(values, scales)``: the e2m1
    values ``[M, K]`` (on the grid, signed) and each block's scale ``[M, K / sf_vec_size]`` as
    float64 (NVFP4: the e4m3 value of global_scale * amax / 6; MXFP4: 2^ceil(log2(amax / 6)),
    exponent clamped to [-127, 127]). NaN elements are ignored by the amax and encode as +6."""
    m, k = x.shape
    xb = x.double().reshape(m, k // sf_vec_size, sf_vec_size)
    a = xb.abs()
    amax = torch.where(torch.isnan(a), torch.zeros_like(a), a).amax(dim=-1)
    if mx:
        t = amax / 6.0
        f, big_e = torch.frexp(torch.where(torch.isfinite(t) & (t > 0), t, torch.ones_like(t)))
        e = torch.where(f == 0.5, big_e - 1, big_e).double()  # ceil(log2(t))
        e = torch.where(torch.isinf(t), torch.full_like(e, 127.0), e).clamp(-127, 127)
        scale = torch.where(amax > 0, torch.pow(2.0, e), torch.zeros_like(e))
        enc = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    else:
        scale = minifloat_round_f64(global_scale * amax / 6.0, "e4m3")
        # Upstream's encode multiplier is a float32 value, 1 / (scale * (1 / global_scale)), each
        # step rounded to float32, and x times it is a float32 product (so a value can land on or
        # leave an e2m1 midpoint): modelled step by step as such; the e2m1 rounding is float64.
        f32 = torch.float32
        inv_gs = torch.tensor(1.0 / global_scale, dtype=torch.float64).to(f32)
        enc = (1.0 / (scale.to(f32) * inv_gs)).double()
        enc = torch.where(scale > 0, enc, torch.zeros_like(scale))
    v = (xb.float() * enc.unsqueeze(-1).float()).double()  # exact for MXFP4 (a power of two)
    vals = minifloat_round_f64(v, "e2m1")
    vals = torch.where(torch.isnan(vals), torch.full_like(vals, 6.0), vals)
    vals = torch.where((scale > 0).unsqueeze(-1), vals, torch.zeros_like(vals))
    return vals.reshape(m, k), scale


def sf_swizzled_offset_128x4(row: int, col: int, num_block_cols: int) -> int:
    """Byte offset of scale (row, block column) in the 128x4 swizzled layout: tiles of 128 rows x 4
    columns (512 bytes), row-major over tiles; inside a tile, (row % 32) * 16 + (row % 128 // 32) * 4
    + col % 4."""
    k_tiles = (num_block_cols + 3) // 4
    return ((row // 128) * k_tiles + col // 4) * 512 + (row % 32) * 16 + (row % 128 // 32) * 4 + col % 4


def sf_swizzled_offset_8x4(row: int, col: int, num_block_cols: int) -> int:
    k_tiles = (num_block_cols + 3) // 4
    return ((row // 8) * k_tiles + col // 4) * 32 + (row % 8) * 4 + col % 4


def segment_gemm_f64(x, weights, seg_lens, weight_indices=None, weight_column_major=False):
    """``[rows, d_out]`` float64: segment s (``seg_lens[s]`` consecutive rows from 0) times its weight,
    ``weights[weight_indices[s]]`` (or ``weights[s]``), transposed when column-major; other rows 0."""
    x64, w64 = x.double().cpu(), weights.double().cpu()
    d_out = w64.shape[1] if weight_column_major else w64.shape[2]
    y = torch.zeros(x64.shape[0], d_out, dtype=torch.float64)
    start = 0
    for s, n in enumerate(seg_lens):
        w = w64[s if weight_indices is None else weight_indices[s]]
        w = w.t() if weight_column_major else w
        y[start:start + n] = x64[start:start + n] @ w
        start += n
    return y


def bmm_fp8_f64(A, B, A_scale, B_scale):
    """``(A * A_scale) @ (B * B_scale)`` in float64 on the fp8 values."""
    return torch.bmm(A.double().cpu() * float(A_scale), B.double().cpu() * float(B_scale))
