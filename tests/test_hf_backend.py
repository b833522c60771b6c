"""The Hugging Face transformers attention backend (flashtile/integrations/transformers.py), on CPU (or the GPU).

A tiny random Llama model runs with ``attn_implementation="flashtile"`` and with ``"sdpa"`` (transformers'
own path over torch SDPA, the oracle here) on the same weights: logits of batched, left-padded prompts
match within bf16 noise and greedy ``generate()`` emits the same tokens.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install flashtile[hf])")

from flashtile.integrations import transformers as ft_hf  # noqa: E402

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _models(dtype=torch.bfloat16):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   pad_token_id=0)
    name = ft_hf.register()
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(DEVICE, dtype).eval()
    ours = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=name).to(DEVICE, dtype).eval()
    ours.load_state_dict(ref.state_dict())
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


def test_rejects_unsupported():
    q = torch.randn(1, 4, 3, 16, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 3, 16, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="dropout"):
        ft_hf.attention_forward(torch.nn.Module(), q, k, k, None, dropout=0.1)
    with pytest.raises(TypeError, match="attention_mask"):
        ft_hf.attention_forward(torch.nn.Module(), q, k, k, torch.zeros(1, 1, 3, 3))
