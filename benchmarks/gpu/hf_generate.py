"""Hugging Face ``generate()`` with flashtile's attention backend ("ftile") against transformers' SDPA.

A 1B-class random Llama (Llama-3.2-1B's shape), batched left-padded prompts, greedy decoding; prints a
markdown table and writes JSON. Usage: python3 benchmarks/gpu/hf_generate.py [--out results.json]
"""

import argparse
import copy
import json
import time

import torch
import transformers

from flashtile.integrations import transformers as ft_hf


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", default="128:512")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    lo, hi = (int(x) for x in args.prompt_len.split(":"))
    cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                                   rope_theta=500000.0, pad_token_id=0)
    name = ft_hf.register()
    torch.manual_seed(0)
    # each model its own config: from_config writes the attention implementation into the config it is given
    with torch.device("cuda"):
        ref = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
    ref = ref.to(torch.bfloat16).eval()
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=name)
    ours = ours.to("cuda", torch.bfloat16)
    ours.load_state_dict(ref.state_dict())
    ours.eval()
    assert (ref.config._attn_implementation, ours.config._attn_implementation) == ("sdpa", name)
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(lo, hi + 1, (args.batch,), generator=g).tolist()
    ids = torch.zeros(args.batch, max(lens), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lens):
        ids[i, -n:] = torch.randint(1, cfg.vocab_size, (n,), generator=g)
        mask[i, -n:] = 1
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
    rows, outs = [], {}
    for label, model in (("sdpa", ref), (name, ours)):
        with torch.no_grad():
            model.generate(ids, max_new_tokens=2, **kw)  # compile / warm up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kw)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        outs[label] = out[:, ids.shape[1]:]
        rows.append(dict(attn_implementation=label, seconds=seconds,
                         tokens_per_s=args.batch * args.new_tokens / seconds))
    a, b = outs["sdpa"], outs[name]
    same = (a == b).cumprod(dim=1).sum(dim=1)  # identical tokens before the first divergence, per prompt
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"batch {args.batch}, prompts {lo}-{hi} (left-padded), {args.new_tokens} new tokens, greedy, bf16")
    print("| attn_implementation | generate() s | tokens/s | vs sdpa |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['attn_implementation']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{rows[0]['seconds'] / r['seconds']:.2f}x |")
    print(f"greedy agreement: {int(same.sum())} of {a.numel()} tokens before each prompt's first divergence; "
          f"{int((same == a.shape[1]).sum())} of {a.shape[0]} prompts identical")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), rows=rows, prompts=a.shape[0],
                           identical_prompts=int((same == a.shape[1]).sum())), f, indent=1)


if __name__ == "__main__":
    main()
