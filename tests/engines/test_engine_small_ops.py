"""Smoke tests of the small ops engines call (../shared/ENGINES.md §1, §3 F), in their call forms, against
the float64 oracles: vLLM's DeepSeek-scaling RoPE (``apply_rope_with_cos_sin_cache_inplace`` on a strided
view of q, fp32 cache with the YaRN mscale folded in, GPT-J pairs), MiniMax's Gemma norms, SGLang's
``layernorm(bf16 x, fp32 w, fp32 b)``. (Import probes live in tests/test_compat_names.py.)
"""

from __future__ import annotations

import torch

from conftest import HAS_CUDA
from flashtile import norm, rope
from oracles import TOLERANCES, fused_add_rmsnorm_f64, layernorm_f64, rmsnorm_f64, rope_general_f64

BF16 = torch.bfloat16


def assert_close_to(out, expected, dtype=BF16):
    assert not out.isnan().any(), "output has NaN (unwritten element?)"
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double().cpu(), expected, atol=atol, rtol=rtol)


# DeepSeek-V3 MLA at TP=1 on the GPU (128 heads, nope 128 + rope 64, kv_lora_rank 512); tiny on CPU.
NUM_TOKENS, NUM_HEADS = (4096, 128) if HAS_CUDA else (13, 4)
NOPE_DIM, ROPE_DIM, KV_LORA_RANK = 128, 64, 512
MAX_POSITION = 163840 if HAS_CUDA else 4096


def deepseek_cos_sin_cache(device, mscale=1.3):
    """fp32 ``[max_position, ROPE_DIM]``: cos | sin, scaled by mscale as YaRN's cache is (cos and sin are
    then not unit-norm, so a kernel that recomputes them from the angle would fail)."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, ROPE_DIM, 2, dtype=torch.float64) / ROPE_DIM))
    angle = torch.arange(MAX_POSITION, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return (torch.cat([angle.cos(), angle.sin()], dim=-1) * mscale).float().to(device)


def test_deepseek_rope_cos_sin_cache_inplace(path, device):
    """q_pe is the rope part of each head of q [T, H, nope + rope]; k_pe the rope part of the latent
    projection [T, kv_lora_rank + rope] viewed as one head. Both rotate in place (GPT-J pairs); the
    rest of q and of the latent projection is untouched."""
    q = torch.randn(NUM_TOKENS, NUM_HEADS, NOPE_DIM + ROPE_DIM, dtype=BF16, device=device)
    latent = torch.randn(NUM_TOKENS, KV_LORA_RANK + ROPE_DIM, dtype=BF16, device=device)
    q_pe = q[..., NOPE_DIM:]
    k_pe = latent[:, KV_LORA_RANK:].unsqueeze(1)
    assert not q_pe.is_contiguous() and not k_pe.is_contiguous()
    q_before, latent_before = q.clone(), latent.clone()
    positions = torch.randint(0, MAX_POSITION, (NUM_TOKENS,), device=device)
    cache = deepseek_cos_sin_cache(device)
    result = rope.apply_rope_with_cos_sin_cache_inplace(positions=positions, query=q_pe, key=k_pe,
                                                        head_size=ROPE_DIM, cos_sin_cache=cache, is_neox=False)
    assert result is None
    assert_close_to(q_pe, rope_general_f64(q_before[..., NOPE_DIM:], positions, ROPE_DIM, True, cos_sin_cache=cache))
    assert_close_to(k_pe, rope_general_f64(latent_before[:, None, KV_LORA_RANK:], positions, ROPE_DIM, True,
                                           cos_sin_cache=cache))
    assert torch.equal(q[..., :NOPE_DIM], q_before[..., :NOPE_DIM])
    assert torch.equal(latent[:, :KV_LORA_RANK], latent_before[:, :KV_LORA_RANK])


NORM_ROWS, HIDDEN = (512, 6144) if HAS_CUDA else (7, 256)
EPS = 1e-6


def test_gemma_norms_in_place(path, device):
    """MiniMax calls gemma_rmsnorm(x, w, eps) and gemma_fused_add_rmsnorm(x, residual, w, eps); the fused
    one updates x and residual in place, and rmsnorm also writes in place when given out=x."""
    x = torch.randn(NORM_ROWS, HIDDEN, dtype=BF16, device=device)
    residual = torch.randn(NORM_ROWS, HIDDEN, dtype=BF16, device=device)
    weight = (torch.randn(HIDDEN, device=device) * 0.1).to(BF16)

    expected = rmsnorm_f64(x, weight, EPS, weight_offset=1.0)
    out = norm.gemma_rmsnorm(x, weight, EPS)
    assert out.shape == x.shape and out.dtype == BF16
    assert_close_to(out, expected)
    assert norm.gemma_rmsnorm(x, weight, EPS, out=x) is x
    assert_close_to(x, expected)

    expected_x, expected_residual = fused_add_rmsnorm_f64(x, residual, weight, EPS, weight_offset=1.0)
    assert norm.gemma_fused_add_rmsnorm(x, residual, weight, EPS) is None
    assert_close_to(residual, expected_residual)
    assert_close_to(x, expected_x)


def test_layernorm_bf16_input_fp32_params(path, device):
    """SGLang: layernorm(x_bf16, w_fp32, b_fp32, eps), FlashInfer >= 0.5."""
    x = torch.randn(NORM_ROWS, HIDDEN, dtype=BF16, device=device)
    weight = torch.randn(HIDDEN, device=device) * 0.5 + 1.0
    bias = torch.randn(HIDDEN, device=device) * 0.1
    out = norm.layernorm(x, weight, bias, 1e-5)
    assert out.shape == x.shape and out.dtype == BF16
    assert_close_to(out, layernorm_f64(x, weight, bias, 1e-5))
    given = torch.full_like(x, float("nan"))
    assert norm.layernorm(x, weight, bias, 1e-5, out=given) is given
    assert_close_to(given, layernorm_f64(x, weight, bias, 1e-5))
