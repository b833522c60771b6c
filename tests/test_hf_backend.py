"""The Hugging Face transformers attention backend (flashtile/integrations/transformers.py), on CPU (or the GPU).

A tiny random Llama model runs with ``attn_implementation="flashtile"`` and with ``"sdpa"`` (transformers'
own path over torch SDPA, the oracle here) on the same weights: logits of batched, left-padded prompts
match within bf16 noise and greedy ``generate()`` emits the same tokens.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install flashtile[hf])")

from flashtile.integrations import transformers as ft_hf  # noqa: E402

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _models(dtype=torch.bfloat16):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   pad_token_id=0)
    return _model_pair(cfg, "sdpa", dtype)


def _model_pair(cfg, oracle: str, dtype, adjust=None):
    """The model of ``cfg`` with transformers' ``oracle`` attention and with flashtile's, the same weights
    (``adjust(ref)`` may change the oracle's first). Each gets its own copy of the config: from_config writes
    the attention implementation into the config it is given, so a shared one would run both on flashtile."""
    name = ft_hf.register()
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=oracle)
    ref = ref.to(DEVICE, dtype).eval()
    if adjust is not None:
        adjust(ref)
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=name)
    ours = ours.to(DEVICE, dtype).eval()
    ours.load_state_dict(ref.state_dict())
    assert (ref.config._attn_implementation, ours.config._attn_implementation) == (oracle, name)
    return ref, ours


def _batch():
    g = torch.Generator().manual_seed(1)
    lens = [9, 4, 13]
    ids = torch.zeros(len(lens), max(lens), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lens):  # left padding, as for generation
        ids[i, -n:] = torch.randint(1, 128, (n,), generator=g)
        mask[i, -n:] = 1
    return ids.to(DEVICE), mask.to(DEVICE)


def test_register_rejects_flash_names():
    with pytest.raises(ValueError, match="flash"):
        ft_hf.register("my_flash_attn")


def test_logits_match_sdpa(path):
    ref, ours = _models()
    ids, mask = _batch()
    ft_hf._state.clear()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits.float()
        got = ours(input_ids=ids, attention_mask=mask).logits.float()
        # no padding: the causal path without a mask
        want1 = ref(input_ids=ids[2:]).logits.float()
        got1 = ours(input_ids=ids[2:]).logits.float()
    assert ft_hf._state  # flashtile's wrappers ran (not transformers' SDPA)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got1, want1, atol=3e-2, rtol=3e-2)


def test_greedy_generate_matches_sdpa(path):
    ref, ours = _models(torch.float16)
    ids, mask = _batch()
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = ref.generate(ids, **kw)
        got = ours.generate(ids, **kw)
        got1 = ours.generate(ids[2:], max_new_tokens=3, do_sample=False, pad_token_id=0)  # decode without a mask
        want1 = ref.generate(ids[2:], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    assert torch.equal(got1, want1)


def _gpt_oss_models(dtype):
    """A tiny random gpt-oss (attention sinks on every layer, a sliding window of 8 on every other layer) with
    flashtile's attention and with transformers' eager attention (the oracle: gpt-oss's sinks have no SDPA
    path), the same weights, nonzero sinks."""
    cfg = transformers.GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                    num_experts_per_tok=2, sliding_window=8, max_position_embeddings=256,
                                    pad_token_id=0)
    assert cfg.layer_types == ["sliding_attention", "full_attention"]

    def nonzero_sinks(ref):
        with torch.no_grad():
            for layer in ref.model.layers:
                layer.self_attn.sinks.copy_(torch.randn(4) * 2)

    return _model_pair(cfg, "eager", dtype, nonzero_sinks)


def test_gpt_oss_sinks_and_sliding_window(path):
    """gpt-oss through the backend: its ``s_aux`` sinks and its sliding window (prompts of up to 13 tokens
    and 4 more generated, past the window of 8) give eager attention's logits and greedy tokens."""
    ref, ours = _gpt_oss_models(torch.float16)
    ids, mask = _batch()
    ft_hf._state.clear()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits.float()
        got = ours(input_ids=ids, attention_mask=mask).logits.float()
        want1 = ref(input_ids=ids[2:]).logits.float()  # no padding: the window comes from plan(), not a mask
        got1 = ours(input_ids=ids[2:]).logits.float()
    assert ft_hf._state
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got1, want1, atol=1e-2, rtol=1e-2)
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_soft_cap_and_sliding_window(path, family):
    """Gemma 2 (logit soft cap, sliding and full layers alternating) and Gemma 3 (sliding and full layers, QK
    norm), tiny and random, against transformers' eager attention: logits of a left-padded batch and greedy
    ``generate()`` past the window of 8. Gemma 2's soft cap is 0.2 here, on logits made large enough for it
    to bite (the model ships 50)."""
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, sliding_window=8, max_position_embeddings=256, pad_token_id=0)
    if family == "gemma2":
        cfg = transformers.Gemma2Config(attn_logit_softcapping=0.2, **common)
    else:
        cfg = transformers.Gemma3TextConfig(layer_types=["sliding_attention", "full_attention"] * 2, **common)
    assert "sliding_attention" in cfg.layer_types and "full_attention" in cfg.layer_types

    def larger_logits(ref):  # random init gives logits near 0, where a cap of 0.2 changes nothing
        with torch.no_grad():
            for layer in ref.model.layers:
                layer.self_attn.q_proj.weight.mul_(8)
                layer.self_attn.k_proj.weight.mul_(8)

    ref, ours = _model_pair(cfg, "eager", torch.float16, larger_logits if family == "gemma2" else None)
    ids, mask = _batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits.float()
        got = ours(input_ids=ids, attention_mask=mask).logits.float()
        kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=1e-2, rtol=1e-2)


def test_alternating_layer_kinds_plan_once_each(monkeypatch):
    """Layers that alternate between two kinds of calls (a window with a mask, full attention without one, as
    gpt-oss and Gemma 3 do) plan once per kind and mask, not once per layer; a new mask re-plans its kind."""
    planned = []
    plan = ft_hf._plan
    monkeypatch.setattr(ft_hf, "_plan", lambda *a: planned.append(a[3]) or plan(*a))
    ft_hf._state.clear()
    q = torch.randn(1, 4, 6, 16, dtype=torch.float16, device=DEVICE)
    k = torch.randn(1, 2, 6, 16, dtype=torch.float16, device=DEVICE)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool, device=DEVICE).tril()
    for _ in range(3):  # three "layer pairs" of one forward pass
        ft_hf.attention_forward(torch.nn.Module(), q, k, k, mask, sliding_window=4)
        ft_hf.attention_forward(torch.nn.Module(), q, k, k, None)
    assert len(planned) == 2
    ft_hf.attention_forward(torch.nn.Module(), q, k, k, mask.clone(), sliding_window=4)  # the next forward's mask
    ft_hf.attention_forward(torch.nn.Module(), q, k, k, None)
    assert len(planned) == 3


@pytest.mark.parametrize("q_len", [1, 12])
def test_sliding_window_without_a_mask(path, q_len):
    """A call without a mask whose window is shorter than the keys (transformers then builds a mask, a direct
    caller need not): the window, ``sliding_window`` keys including the query's own, comes from the plan."""
    from oracles import TOLERANCES, attention_oracle

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, n, 16, generator=g).to(DEVICE, torch.float16)
               for h, n in ((4, q_len), (2, 12), (2, 12)))
    out, _ = ft_hf.attention_forward(torch.nn.Module(), q, k, v, None, sliding_window=4, is_causal=True)
    want, _ = attention_oracle(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), causal=True,
                               window_left=3)
    atol, rtol = TOLERANCES[torch.float16]
    torch.testing.assert_close(out[0].double().cpu(), want, atol=atol, rtol=rtol)


def test_rejects_unsupported():
    q = torch.randn(1, 4, 3, 16, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 3, 16, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="dropout"):
        ft_hf.attention_forward(torch.nn.Module(), q, k, k, None, dropout=0.1)
    with pytest.raises(TypeError, match="attention_mask"):
        ft_hf.attention_forward(torch.nn.Module(), q, k, k, torch.zeros(1, 1, 3, 3))
    with pytest.raises(ValueError, match="sliding_window"):
        ft_hf.attention_forward(torch.nn.Module(), q, k, k, None, sliding_window=0)
