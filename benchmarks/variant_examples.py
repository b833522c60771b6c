"""Example attention variants for the benchmarks and the ahead-of-time compile check: soft cap, ALiBi, a
sliding window and FlashSigmoid written as flashtile.AttentionVariant hooks (docs/variants.md explains
them; tests/test_variants.py checks the same hooks against float64 oracles)."""

import torch
import triton
import triton.language as tl

from flashtile import AttentionVariant


@triton.jit
def softcap_logits(qk, sm_scale, batch, qo_idx, kv_idx, qo_head, kv_head, qo_len, kv_len, args):
    x = qk * sm_scale / args[0]
    return args[0] * (1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0))  # cap * tanh(x), as the flag path


@triton.jit
def alibi_logits(qk, sm_scale, batch, qo_idx, kv_idx, qo_head, kv_head, qo_len, kv_len, args):
    slope = tl.load(args[0] + qo_head)
    return qk * sm_scale + slope * (kv_idx - (qo_idx + kv_len - qo_len)).to(tl.float32)


@triton.jit
def window_mask(batch, qo_idx, kv_idx, qo_head, kv_head, qo_len, kv_len, args):
    return kv_idx >= qo_idx + kv_len - qo_len - args[0]


@triton.jit
def window_range(batch, qo_first, qo_last, qo_len, kv_len, args):
    return tl.maximum(qo_first + kv_len - qo_len - args[0], 0), kv_len  # the keys the window can show


@triton.jit
def window_full_range(batch, qo_first, qo_last, qo_len, kv_len, args):
    return tl.maximum(qo_last + kv_len - qo_len - args[0], 0), kv_len  # the keys every query sees


@triton.jit
def sigmoid_logits(qk, sm_scale, batch, qo_idx, kv_idx, qo_head, kv_head, qo_len, kv_len, args):
    return tl.sigmoid(qk * args[0] + args[1])


SOFTCAP = AttentionVariant("softcap", logits_transform=softcap_logits, scalars=[("cap", torch.float32)])
ALIBI = AttentionVariant("alibi", logits_transform=alibi_logits, tensors=[("alibi_slopes", torch.float32)])
WINDOW = AttentionVariant("window", logits_mask=window_mask, kv_range=window_range, kv_full_range=window_full_range,
                          scalars=[("window_left", torch.int32)])
FLASH_SIGMOID = AttentionVariant("flash_sigmoid", logits_transform=sigmoid_logits, use_softmax=False,
                                 scalars=[("logits_scale", torch.float32), ("sigmoid_bias", torch.float32)])
