"""Pure-PyTorch attention for one request: the CPU path and the readable spec of every kernel.

Inputs are in NHD layout (the API layer turns HND into NHD views). Math runs in float32 on upcast
inputs; query rows are processed in chunks so a 32k-token prompt never builds a 32k x 32k matrix.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .._core.params import AttentionParams
from ..scheduler.split_kv import SingleLaunchShape
from .packbits import unpack_mask
from .positional import alibi_slopes, rope_rotate_half_split

__all__ = ["single_attention", "gather_pages", "batch_paged_decode", "batch_prefill", "multi_item_mask",
           "single_launch_shape", "single_attention_forward", "batch_decode_forward", "dequantize_heads"]

LOG2E = 1.0 / math.log(2.0)

# Bound on the elements of one chunk's score matrix (chunk_rows x heads x kv_len), ~256 MB in fp32.
_CHUNK_ELEMENTS = 1 << 26


def single_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: AttentionParams,
    custom_mask: Optional[torch.Tensor] = None,
    compute_dtype: torch.dtype = torch.float32,
    variant=None,
    batch: int = 0,
):
    """Attention of one request.

    Args:
        q: ``[qo_len, num_qo_heads, head_dim_qk]``.
        k: ``[kv_len, num_kv_heads, head_dim_qk]``; any float dtype (fp8 is upcast; its scale is
            already folded into ``sm_scale``).
        v: ``[kv_len, num_kv_heads, head_dim_vo]``.
        causal: bottom-right aligned causal mask (query ``i`` sits at ``kv_len - qo_len + i``).
        params: sm_scale, causal (bottom-right aligned), soft cap, window, pos_encoding_mode ("ROPE_LLAMA"
            rotates q and k, the cache holding un-rotated keys), RoPE parameters, v_scale.
        custom_mask: bool ``[qo_len, kv_len]`` (True = attend) or None; replaces ``causal``.
        variant: a bound attention variant (flashtile/variants.py) or None: its hooks' PyTorch twins run
            at the points where the kernels call the hooks. batch: the request's index (for the hooks).

    Returns:
        ``(out [qo_len, num_qo_heads, head_dim_vo] float32, lse [qo_len, num_qo_heads] float32)``,
        lse in base 2; rows that see no key give out 0 and lse -inf.
    """
    qo_len, num_qo_heads, _ = q.shape
    kv_len, num_kv_heads, head_dim_vo = v.shape
    group = num_qo_heads // num_kv_heads
    device = q.device
    delta = kv_len - qo_len  # absolute position of query row i is delta + i

    kf = k.to(compute_dtype)
    vf = v.to(compute_dtype)
    if params.pos_encoding_mode == "ROPE_LLAMA":
        key_positions = torch.arange(kv_len, device=device)
        kf = rope_rotate_half_split(kf, key_positions, params.rope_scale, params.rope_theta).to(compute_dtype)
    # [kv_heads, kv_len, D] -> repeat for each query head of the group (GQA: head h reads h // group).
    kf = kf.transpose(0, 1).repeat_interleave(group, dim=0)
    vf = vf.transpose(0, 1).repeat_interleave(group, dim=0)
    alibi = params.pos_encoding_mode == "ALIBI"
    slopes = alibi_slopes(num_qo_heads, device=device).to(compute_dtype) if alibi else None
    key_pos = torch.arange(kv_len, device=device)

    out = torch.zeros(qo_len, num_qo_heads, head_dim_vo, dtype=torch.float32, device=device)
    lse = torch.full((qo_len, num_qo_heads), float("-inf"), dtype=torch.float32, device=device)
    if variant is not None:
        return _variant_attention(q, kf, vf, params, custom_mask, compute_dtype, variant, batch, group, out, lse)
    if kv_len == 0:  # nothing to see: every row is empty
        return out, lse
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, num_qo_heads * kv_len))
    for r0 in range(0, qo_len, rows_per_chunk):
        r1 = min(qo_len, r0 + rows_per_chunk)
        qpos = torch.arange(r0, r1, device=device) + delta
        qf = q[r0:r1].to(compute_dtype)
        if params.pos_encoding_mode == "ROPE_LLAMA":
            qf = rope_rotate_half_split(qf, qpos, params.rope_scale, params.rope_theta).to(compute_dtype)
        s = torch.einsum("qhd,hkd->hqk", qf, kf) * params.sm_scale  # [H, rows, kv_len]
        if slopes is not None:
            s = s + slopes[:, None, None] * (key_pos[None, None, :] - qpos[None, :, None]).to(compute_dtype)
        if params.logits_soft_cap > 0:
            s = params.logits_soft_cap * torch.tanh(s / params.logits_soft_cap)
        visible = torch.ones(r1 - r0, kv_len, dtype=torch.bool, device=device)
        if custom_mask is not None:
            visible &= custom_mask[r0:r1].to(device=device, dtype=torch.bool)
        elif params.causal:
            visible &= key_pos[None, :] <= qpos[:, None]
        if params.window_left >= 0:
            visible &= key_pos[None, :] >= qpos[:, None] - params.window_left
        s = s.masked_fill(~visible[None], float("-inf"))
        row_max = s.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
        p = torch.exp(s - row_max)
        denom = p.sum(dim=-1, keepdim=True)
        o = torch.einsum("hqk,hkd->qhd", p, vf) / denom.clamp_min(torch.finfo(compute_dtype).tiny).transpose(0, 1)
        empty = (denom == 0).squeeze(-1).transpose(0, 1)  # [rows, H]
        o = o.masked_fill(empty[..., None], 0.0)
        out[r0:r1] = (o * params.v_scale).float()
        lse[r0:r1] = ((row_max + denom.log()).squeeze(-1).transpose(0, 1) * LOG2E).float()
    return out, lse


def _twin(variant, hook: str):
    h = getattr(variant.variant, hook)
    if h is None:
        return None
    if h.torch is None:
        raise NotImplementedError(
            f"variant {variant.variant.name!r}: {hook} has no PyTorch twin, so it cannot run on the reference path "
            "(CPU tensors); give the hook as a (triton_function, torch_function) pair, or run the kernels "
            "(CUDA tensors, or backend='triton' under TRITON_INTERPRET=1)")
    return h.torch


def _variant_attention(q, kf, vf, params: AttentionParams, custom_mask, compute_dtype, variant, batch, group, out,
                       lse):
    """:func:`single_attention` with a variant's twins (flashtile/variants.py gives their arguments' shapes).
    ``kf``, ``vf``: ``[Hq, kv_len, D]`` (GQA-expanded by ``group``, RoPE applied). Writes and returns ``(out, lse)``."""
    qo_len, num_qo_heads, _ = q.shape
    kv_len = kf.shape[1]
    device = q.device
    args = variant.args
    use_softmax = variant.variant.use_softmax
    logits_fn, mask_fn = _twin(variant, "logits_transform"), _twin(variant, "logits_mask")
    query_fn, output_fn = _twin(variant, "query_transform"), _twin(variant, "output_transform")
    sink_fn = _twin(variant, "sink_logit")
    heads = torch.arange(num_qo_heads, device=device)
    kv_heads = heads // group
    key_pos = torch.arange(kv_len, device=device)
    rows = torch.arange(qo_len, device=device)
    qpos = rows + (kv_len - qo_len)
    qf = q.to(compute_dtype)
    if params.pos_encoding_mode == "ROPE_LLAMA":
        qf = rope_rotate_half_split(qf, qpos, params.rope_scale, params.rope_theta).to(compute_dtype)
    if query_fn is not None:
        qf = query_fn(qf, batch, rows[:, None], heads[None, :], qo_len, kv_len, args).to(compute_dtype)
    qk = torch.einsum("qhd,hkd->hqk", qf, kf)  # [H, R, N]
    if logits_fn is not None:
        s = logits_fn(qk, params.sm_scale, batch, rows[None, :, None], key_pos[None, None, :],
                      heads[:, None, None], kv_heads[:, None, None], qo_len, kv_len, args).to(compute_dtype)
    else:
        s = qk * params.sm_scale
        if params.pos_encoding_mode == "ALIBI":
            slopes = alibi_slopes(num_qo_heads, device=device).to(compute_dtype)
            s = s + slopes[:, None, None] * (key_pos[None, None, :] - qpos[None, :, None]).to(compute_dtype)
        if params.logits_soft_cap > 0:
            s = params.logits_soft_cap * torch.tanh(s / params.logits_soft_cap)
    visible = torch.ones(1, qo_len, kv_len, dtype=torch.bool, device=device)
    if custom_mask is not None:
        visible = visible & custom_mask.to(device=device, dtype=torch.bool)[None]
    elif params.causal:
        visible = visible & (key_pos[None, None, :] <= qpos[None, :, None])
    if params.window_left >= 0:
        visible = visible & (key_pos[None, None, :] >= qpos[None, :, None] - params.window_left)
    if mask_fn is not None:
        visible = visible & mask_fn(batch, rows[None, :, None], key_pos[None, None, :], heads[:, None, None],
                                    kv_heads[:, None, None], qo_len, kv_len, args).to(torch.bool)
    if not use_softmax:
        p = torch.where(visible, s, torch.zeros((), dtype=compute_dtype, device=device))
        o = torch.einsum("hqk,hkd->qhd", p, vf)
        row_lse = torch.zeros(qo_len, num_qo_heads, dtype=compute_dtype, device=device)
    else:
        s = s.masked_fill(~visible, float("-inf"))
        row_max = s.amax(dim=-1, keepdim=True) if kv_len > 0 else torch.full(
            (num_qo_heads, qo_len, 1), float("-inf"), dtype=compute_dtype, device=device)
        sink = None
        if sink_fn is not None:
            sink = torch.broadcast_to(sink_fn(batch, heads[None, :], args).to(compute_dtype),
                                      (qo_len, num_qo_heads)).transpose(0, 1)[..., None]  # [H, R, 1]
            row_max = torch.maximum(row_max, sink)
        row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
        p = torch.exp(s - row_max)
        denom = p.sum(dim=-1, keepdim=True)
        if sink is not None:
            denom = denom + torch.exp(sink - row_max)
        o = torch.einsum("hqk,hkd->qhd", p, vf) / denom.clamp_min(torch.finfo(compute_dtype).tiny).transpose(0, 1)
        empty = (denom == 0).squeeze(-1).transpose(0, 1)  # [R, H]
        o = o.masked_fill(empty[..., None], 0.0)
        row_lse = ((row_max + denom.log()).squeeze(-1).transpose(0, 1) * LOG2E)
    if output_fn is not None:
        o = output_fn(o, row_lse.float(), batch, rows[:, None], heads[None, :], qo_len, kv_len, args)
    out[:] = (o * params.v_scale).float()
    lse[:] = row_lse.float()
    return out, lse


def gather_pages(pages: torch.Tensor, page_ids: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of a request whose pages are ``page_ids``, from an NHD page view
    ``[num_pages, page_size, heads, dim]``: ``[length, heads, dim]``."""
    return pages[page_ids.to(device=pages.device, dtype=torch.long)].flatten(0, 1)[:length]


def batch_paged_decode(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_indptr: torch.Tensor,
    page_indices: torch.Tensor,
    kv_lens: torch.Tensor,
    params: AttentionParams,
    variant=None,
):
    """Decode for a batch over a paged cache, request by request.

    Args:
        q: ``[B, num_qo_heads, head_dim_qk]``, one query per request at position ``kv_len - 1``.
        k_pages, v_pages: ``[num_pages, page_size, num_kv_heads, head_dim]`` (NHD page views).
        page_indptr: ``[B + 1]``, page_indices: page ids; request ``r`` owns
            ``page_indices[page_indptr[r]:page_indptr[r + 1]]``.
        kv_lens: ``[B]`` tokens per request.
        params: as :func:`single_attention` (not causal: a decode query sees its whole cache).

    Returns:
        ``(out [B, num_qo_heads, head_dim_vo], lse [B, num_qo_heads])``, float32, lse base 2.
    """
    batch, num_qo_heads, _ = q.shape
    out = torch.empty(batch, num_qo_heads, v_pages.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, num_qo_heads, dtype=torch.float32, device=q.device)
    indptr = page_indptr.tolist()
    lens = kv_lens.tolist()
    for r in range(batch):
        ids = page_indices[indptr[r]: indptr[r + 1]]
        k = gather_pages(k_pages, ids, lens[r])
        v = gather_pages(v_pages, ids, lens[r])
        out[r: r + 1], lse[r: r + 1] = single_attention(q[r: r + 1], k, v, params, variant=variant, batch=r)
    return out, lse


def batch_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    page_indices: Optional[torch.Tensor],
    packed_mask: Optional[torch.Tensor],
    requests: torch.Tensor,
    params: AttentionParams,
    *,
    multi_item_requests: Optional[torch.Tensor] = None,
    token_pos_in_items: Optional[torch.Tensor] = None,
    variant=None,
):
    """Prefill/append for a batch over a ragged or paged cache, request by request.

    Args:
        q: ``[total_qo, num_qo_heads, head_dim_qk]``.
        k, v: ragged ``[total_kv, num_kv_heads, head_dim]``, or NHD page views
            ``[num_pages, page_size, num_kv_heads, head_dim]`` when ``page_indices`` is given.
        page_indices: page ids (paged) or None (ragged).
        packed_mask: uint8 per-request masks packed row-major, LSB first, or None.
        requests: int ``[B, 5]`` rows ``(qo_start, qo_len, kv_offset, kv_len, mask_offset)``:
            request ``r`` has queries ``q[qo_start:qo_start + qo_len]`` and keys ``k[kv_offset:][:kv_len]``
            (ragged) or the pages ``page_indices[kv_offset:]`` (paged); its mask starts at byte
            ``mask_offset`` of ``packed_mask``.
        params: as :func:`single_attention`.
        multi_item_requests: multi-item scoring, int ``[B, 2]`` rows ``(prefix_len, token_base)``, with
            ``token_pos_in_items`` (int, 1-D): the mask is :func:`multi_item_mask` (it replaces ``causal``;
            ``packed_mask`` is then None). Both None otherwise.

    Returns:
        ``(out [total_qo, num_qo_heads, head_dim_vo], lse [total_qo, num_qo_heads])``, float32, lse base 2.
    """
    total_qo, num_qo_heads, _ = q.shape
    items = multi_item_requests.tolist() if multi_item_requests is not None else None
    out = torch.zeros(total_qo, num_qo_heads, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((total_qo, num_qo_heads), float("-inf"), dtype=torch.float32, device=q.device)
    for r, (qo_start, qo_len, kv_offset, kv_len, mask_offset) in enumerate(requests.tolist()):
        if qo_len == 0:
            continue
        if page_indices is not None:
            ids = page_indices[kv_offset: kv_offset + -(-kv_len // k.shape[1])]
            kr, vr = gather_pages(k, ids, kv_len), gather_pages(v, ids, kv_len)
        else:
            kr, vr = k[kv_offset: kv_offset + kv_len], v[kv_offset: kv_offset + kv_len]
        mask = None
        if packed_mask is not None:
            mask = unpack_mask(packed_mask[mask_offset: mask_offset + -(-qo_len * kv_len // 8)], qo_len, kv_len)
        if items is not None:
            assert token_pos_in_items is not None, "multi_item_requests comes with token_pos_in_items"
            prefix_len, token_base = items[r]
            mask = multi_item_mask(qo_len, kv_len, prefix_len, token_base, token_pos_in_items)
        rows = slice(qo_start, qo_start + qo_len)
        out[rows], lse[rows] = single_attention(q[rows], kr, vr, params, custom_mask=mask, variant=variant, batch=r)
    return out, lse


def multi_item_mask(qo_len: int, kv_len: int, prefix_len: int, token_base: int,
                    token_pos_in_items: torch.Tensor) -> torch.Tensor:
    """The multi-item scoring mask of one request (flashtile/_core/multi_item.py states the rule).

    Args:
        qo_len, kv_len: the request's query and key counts; query ``i`` sits at ``p = kv_len - qo_len + i``.
        prefix_len: keys ``[0, prefix_len)`` are the shared prefix every later token sees.
        token_base: the query at ``p >= prefix_len`` has item position ``token_pos_in_items[token_base + p -
            prefix_len]`` (0: a delimiter).

    Returns:
        bool ``[qo_len, kv_len]``, True = attend (causal included; the window is applied by the caller).
    """
    device = token_pos_in_items.device
    qpos = torch.arange(kv_len - qo_len, kv_len, device=device)
    key = torch.arange(kv_len, device=device)
    in_items = qpos >= prefix_len
    item_pos = torch.zeros_like(qpos)
    item_pos[in_items] = token_pos_in_items[token_base + qpos[in_items] - prefix_len].long()
    # An item token at p with item position t sees keys (p - t, p]: itself and its item's earlier tokens.
    first_item_key = torch.where(in_items, qpos - item_pos + 1, prefix_len)
    causal = key[None, :] <= qpos[:, None]
    return causal & ((key[None, :] < prefix_len) | (key[None, :] >= first_item_key[:, None]))


# -- the op layer's entry points (the same names and arguments as flashtile/kernels/attention.py) -----------


def single_launch_shape(q, k, v, params: AttentionParams, *, packed_mask: Optional[torch.Tensor], kind: str,
                        variant=None) -> SingleLaunchShape:
    """The reference computes whole rows: a shape that the split planner never splits."""
    return SingleLaunchShape(1, 1, 1, can_split=False)


def dequantize_heads(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``x * scale`` with one scale per head: ``x [..., heads, dim]`` (fp8), ``scale`` float32 ``[heads]``."""
    return x.to(torch.float32) * scale.to(device=x.device, dtype=torch.float32)[:, None]


def single_attention_forward(q, k, v, out, lse, params: AttentionParams, *, packed_mask: Optional[torch.Tensor],
                             kind: str, splits=None, variant=None, fp8_scales=None) -> None:
    """:func:`single_attention` written into ``out`` / ``lse`` (``packed_mask``: uint8 bits of the
    ``[qo_len, kv_len]`` mask, LSB first, or None; ``kind`` picks kernel configs and ``splits`` cuts the KV
    on the kernel path, both unused here). ``fp8_scales``: ``(scale_q, scale_k, scale_v)`` float32 per-head
    scales of fp8 q, k, v (FP8 attention: the attention of the dequantized tensors), or None."""
    if fp8_scales is not None:
        q, k, v = (dequantize_heads(x, s) for x, s in zip((q, k, v), fp8_scales))
    mask = unpack_mask(packed_mask, q.shape[0], k.shape[0]) if packed_mask is not None else None
    o, s = single_attention(q, k, v, params, custom_mask=mask, variant=variant)
    out.copy_(o)
    lse.copy_(s)


def batch_decode_forward(q, k_pages, v_pages, page_indptr, page_indices, worklist, part_o, part_lse, out, lse,
                         params: AttentionParams, *, batch_size: int, num_programs: int, max_states: int,
                         merge: bool, variant=None) -> None:
    """:func:`batch_paged_decode` written into ``out`` / ``lse``; the KV lengths come from the work list
    (scheduler/worklist.py), the split-KV items are not needed here."""
    from ..scheduler.worklist import decode_layout

    kv_lens = decode_layout(batch_size, 0).view(worklist, "kv_lens")[:, 0]
    o, s = batch_paged_decode(q, k_pages, v_pages, page_indptr, page_indices, kv_lens, params, variant)
    out.copy_(o)
    lse.copy_(s)
