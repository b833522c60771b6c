"""A Hugging Face transformers attention backend on flashtile's kernels.

    import flashtile.integrations.transformers as ft_hf
    ft_hf.register()                                   # once; returns the name, "ftile"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="ftile")
    model.generate(**tokenizer(prompts, return_tensors="pt", padding=True))

:func:`register` adds :func:`attention_forward` to transformers' ``AttentionInterface`` and transformers'
own SDPA mask builder (``masking_utils.sdpa_mask``: a boolean ``[batch, 1, q_len, kv_len]`` mask, or None
when the attention is plainly causal) to its ``AttentionMaskInterface``, both under one name. The name has
no "flash" in it: transformers 5 treats such names as kernels to download from the Hub.

How a call maps to flashtile: transformers' KV cache holds ``[batch, kv_heads, kv_len, head_dim]`` per
layer, which is a paged cache in the HND layout with one page of ``kv_len`` tokens per sequence. Each call
plans on that view (no copy of K/V) and runs:

- no mask, one query token (decode without padding): ``BatchDecodeWithPagedKVCacheWrapper``;
- otherwise ``BatchPrefillWithPagedKVCacheWrapper``: causal (bottom-right) without a mask, or the mask as a
  custom mask (padding, any pattern). Query rows that the mask hides entirely give zeros (SDPA gives NaN
  or a fully unmasked row there; transformers ignores those rows).

Both honour the keywords models pass to their attention function: ``softcap`` (Gemma 2's logit soft cap),
``sliding_window`` (a query sees its last ``sliding_window`` keys, itself included: the wrappers'
``window_left = sliding_window - 1``; transformers puts the window into the mask too once it bites) and
``s_aux`` (gpt-oss's per-head attention sinks: the wrappers' ``sinks=``).

Plans are cached per plan key (shapes, dtypes, scale, soft cap, window, whether there is a mask), each on a
wrapper of its own: the layers of one forward pass share the mask tensors and the shapes, so each kind of
layer plans once per forward pass, also in models whose layers alternate (gpt-oss and Gemma 2/3: sliding
and full attention). Needs transformers >= 4.54 (``AttentionMaskInterface``); tested with 5.25.
"""

from __future__ import annotations

import weakref
from typing import Optional, Tuple

import torch

NAME = "ftile"  # flashtile; transformers reserves names containing "flash"
_WORKSPACE_BYTES = 128 << 20
_MAX_PLANS = 8  # planned wrappers kept per device (a model has a few kinds of layers)
_state: dict = {}  # device -> {"workspace": float workspace, "plans": {plan key: (wrapper, mask or a weakref)}}


def register(name: str = NAME) -> str:
    """Register flashtile's attention (and transformers' SDPA mask builder) under ``name``; returns it.

    Raises:
        ValueError: ``name`` contains "flash" (transformers 5 would look it up on the Hub).
        ImportError: transformers is not installed (``pip install flashtile[hf]``).
    """
    if "flash" in name.lower():
        raise ValueError(f"name: transformers treats names containing 'flash' as Hub kernels, got {name!r}")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def _planned_wrapper(device: torch.device, plan_key: tuple, mask, causal: bool, scaling, softcap,
                     window_left: int):
    """The wrapper planned for ``plan_key`` and this ``mask`` tensor: the cached one, else one planned now
    (the wrappers share one float workspace: their runs are ordered on the stream)."""
    st = _state.get(device)
    if st is None:
        st = _state[device] = dict(workspace=torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device),
                                   plans={})
    entry = st["plans"].get(plan_key)
    if entry is None or (mask is not None and entry[1]() is not mask):  # the key says whether there is a mask
        if entry is None and len(st["plans"]) >= _MAX_PLANS:
            st["plans"].clear()
        wrapper = _plan(st["workspace"], None if entry is None else entry[0], mask, plan_key, causal, scaling,
                        softcap, window_left)
        # the mask by weak reference: a cached plan does not keep a forward pass's mask alive
        entry = st["plans"][plan_key] = (wrapper, None if mask is None else weakref.ref(mask))
    return entry[0]


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> Tuple[torch.Tensor, None]:
    """transformers' attention-function signature.

    Args:
        module: the attention module (its ``is_causal`` is the default of ``is_causal``).
        query: ``[batch, num_qo_heads, q_len, head_dim]``; key, value: ``[batch, num_kv_heads, kv_len,
            head_dim]`` (the layer's cache after this step's append), float16 or bfloat16.
        attention_mask: None or boolean ``[batch, 1, q_len, kv_len]`` (True: attend), from ``sdpa_mask``.
        dropout: must be 0 (inference only). scaling: softmax scale (default ``1/sqrt(head_dim)``).
        is_causal: causal when no mask is given (default: ``module.is_causal``, else True).
        kwargs: ``softcap`` (logit soft cap), ``sliding_window`` (keys within the last ``sliding_window``
            positions, the query's own included) and ``s_aux`` (float ``[num_qo_heads]`` attention-sink logits,
            gpt-oss) are honoured; other keywords carry nothing attention needs.

    Returns:
        ``(out, None)``, ``out`` ``[batch, q_len, num_qo_heads, head_dim]`` in query's dtype.
    """
    if dropout:
        raise NotImplementedError("dropout: flashtile's attention is for inference (dropout must be 0)")
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        raise TypeError(f"attention_mask: expected a boolean mask (transformers' sdpa_mask), got "
                        f"{attention_mask.dtype}")
    batch, hq, q_len, d = query.shape
    hkv, kv_len = key.shape[1], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and causal and 1 < q_len < kv_len:
        # a static cache's empty tail (as transformers' SDPA path: the keys past the queries are unused)
        key, value, kv_len = key[:, :, :q_len], value[:, :, :q_len], q_len
    window = kwargs.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"sliding_window: expected None or an int >= 1, got {window!r}")
    window_left = -1 if window is None else window - 1
    plan_key = (batch, hq, hkv, q_len, kv_len, d, query.dtype, key.dtype, scaling, causal, kwargs.get("softcap"),
                attention_mask is None, window_left)
    wrapper = _planned_wrapper(query.device, plan_key, attention_mask, causal, scaling, kwargs.get("softcap"),
                               window_left)
    q = query.transpose(1, 2).reshape(batch * q_len, hq, d)  # one copy: [batch * q_len, Hq, D]
    out = wrapper.run(q, (key, value), sinks=kwargs.get("s_aux"))  # key, value: HND pages of kv_len tokens
    return out.view(batch, q_len, hq, -1), None


def _plan(workspace: torch.Tensor, wrapper, mask, plan_key, causal: bool, scaling, softcap, window_left: int):
    """Plan ``wrapper`` (None: a new one of the kind the call needs) for one call's batch; returns it. The decode
    wrapper serves one query token without a mask, the paged prefill wrapper everything else."""
    import flashtile

    batch, hq, hkv, q_len, kv_len, d, q_dtype, kv_dtype = plan_key[:8]
    i32 = torch.int32
    indptr = torch.arange(batch + 1, dtype=i32)
    indices = torch.arange(batch, dtype=i32)
    last = torch.full((batch,), kv_len, dtype=i32)
    common = dict(q_data_type=q_dtype, kv_data_type=kv_dtype, sm_scale=scaling, logits_soft_cap=softcap,
                  window_left=window_left)
    if mask is None and q_len == 1:
        wrapper = wrapper or flashtile.BatchDecodeWithPagedKVCacheWrapper(workspace, "HND")
        wrapper.plan(indptr, indices, last, hq, hkv, d, kv_len, **common)
    else:
        wrapper = wrapper or flashtile.BatchPrefillWithPagedKVCacheWrapper(workspace, "HND")
        extra = dict(causal=causal) if mask is None else dict(custom_mask=mask[:, 0].reshape(-1))
        wrapper.plan(indptr * q_len, indptr, indices, last, hq, hkv, head_dim_qk=d, page_size=kv_len,
                     **extra, **common)
    return wrapper
