"""``flashtile warmup``: compile the Triton kernel variants that model shapes need, before the first
request."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .._core.checks import HALF_DTYPES, parse_dtype
from ..jit.env import triton_cache_dir
from .common import SHAPE_PRESETS, SHORT_DTYPE, ModelShape, device_name, parse_list, parse_shape, resolve_device, sync

# Lengths of the warm-up calls. The calls use the model's real head counts: besides its constexprs
# (head_dim, group size, dtype, causal, split or not), Triton specializes integer arguments (strides,
# which depend on head counts, and lengths) on divisibility by 16. None of the lengths is a multiple
# of 16, like most real lengths; an aligned length (e.g. a 4096-token prompt) compiles one more
# variant on first use, which then sits in the on-disk cache like the others.
_WARMUP_SHORT = 200  # one KV split
_WARMUP_PREFILL_SPLIT = 1000  # split-KV prefill on a large GPU (the scheduler fills idle SMs)
_WARMUP_DECODE_SPLIT = 1999  # split-KV decode (flash-decoding) and the merge kernel


@dataclass
class WarmupVariant:
    label: str
    shape: ModelShape  # MLA: (heads, 1, 512 + 64)
    dtype: torch.dtype
    kind: str  # "prefill", "decode", "batch_decode", "batch_prefill", "batch_append" or "mla"
    causal: bool
    qo_len: int
    kv_len: int
    models: Tuple[str, ...]
    page_size: int = 16


# DeepSeek MLA (flashtile.mla): latent and rope widths, and the page sizes engines use (SGLang 1, FlashMLA 64)
_MLA_DIMS = (512, 64)
_MLA_PAGES = (1, 64)


def warmup_variants(shapes: Sequence[str], head_dims: Optional[Sequence[int]],
                    dtypes: Sequence[str], mla_heads: Sequence[int] = ()) -> List[WarmupVariant]:
    """The kernel variants to compile for ``shapes`` (preset names or ``Hq/Hkv/D``) and ``dtypes``.

    Per (shape, dtype): causal and non-causal prefill, causal prefill with split-KV, decode,
    decode with split-KV (which also runs the merge kernel), and the batch wrappers over a paged
    cache of page size 16: decode, causal prefill and a 4-token append. ``head_dims`` replaces the shapes' own
    head dims (each is combined with every shape's head counts). Identical shapes are compiled once.
    ``mla_heads``: query heads of DeepSeek MLA models (e.g. 16 at tensor parallelism 8, 128 at 1); per count and
    dtype, the MLA wrapper's decode with split-KV (and its merge) at page sizes 1 and 64, and a causal 4-token
    append at page 64. ``shapes`` may be empty when ``mla_heads`` is not.
    """
    parsed = [parse_shape(s) for s in shapes]
    for heads in mla_heads:
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ValueError(f"--mla: expected positive head counts, got {heads!r}")
    if not parsed and not mla_heads:
        raise ValueError("no shapes given")
    types = [parse_dtype("dtypes", t, HALF_DTYPES) for t in dtypes]
    if not types:
        raise ValueError("no dtypes given")
    keys: Dict[Tuple[ModelShape, torch.dtype], List[str]] = {}
    for name, shape in parsed:
        for d in (head_dims or [shape.head_dim]):
            if d % 8 != 0 or not 8 <= d <= 256:
                raise ValueError(f"head_dim {d}: flashtile supports multiples of 8 from 8 to 256")
            for dtype in types:
                models = keys.setdefault((ModelShape(shape.num_qo_heads, shape.num_kv_heads, d), dtype), [])
                if name not in models:
                    models.append(name)
    variants = []
    for (shape, dtype), models in keys.items():
        for kind, causal, qo_len, kv_len, what in (
            ("prefill", True, _WARMUP_SHORT, _WARMUP_SHORT, "prefill causal"),
            ("prefill", False, _WARMUP_SHORT, _WARMUP_SHORT, "prefill"),
            ("prefill", True, _WARMUP_PREFILL_SPLIT, _WARMUP_PREFILL_SPLIT, "prefill causal, split-KV"),
            ("decode", False, 1, _WARMUP_SHORT, "decode"),
            ("decode", False, 1, _WARMUP_DECODE_SPLIT, "decode, split-KV + merge"),
            ("batch_decode", False, 1, _WARMUP_DECODE_SPLIT, "batch decode, page 16"),
            ("batch_prefill", True, _WARMUP_PREFILL_SPLIT, _WARMUP_PREFILL_SPLIT, "batch prefill causal, page 16"),
            ("batch_append", True, 4, _WARMUP_DECODE_SPLIT, "batch append 4 tokens, page 16"),
        ):
            label = f"{shape} {SHORT_DTYPE[dtype]} {what}"
            variants.append(WarmupVariant(label, shape, dtype, kind, causal, qo_len, kv_len, tuple(models)))
    for heads in dict.fromkeys(mla_heads):
        shape = ModelShape(heads, 1, sum(_MLA_DIMS))
        for dtype in types:
            for qo_len, page in [(1, p) for p in _MLA_PAGES] + [(4, _MLA_PAGES[-1])]:
                what = "decode, split-KV + merge" if qo_len == 1 else f"append {qo_len} tokens"
                variants.append(WarmupVariant(f"MLA {heads} heads {SHORT_DTYPE[dtype]} {what}, page {page}", shape,
                                              dtype, "mla", qo_len > 1, qo_len, _WARMUP_DECODE_SPLIT, ("mla",),
                                              page_size=page))
    return variants


def _planned_splits(v: WarmupVariant, device: torch.device) -> Optional[int]:
    """KV splits the launcher will choose for a variant (best effort: None when unknown)."""
    try:
        from .._core import tile_policy
        from .._core.decode_tune import split_targets
        from .._core.device import device_facts, num_sms
        from ..kernels import attention as kernels
        from ..scheduler.split_kv import plan_kv_splits

        cfg = kernels.choose_config(v.kind, max(16, 1 << (v.shape.head_dim - 1).bit_length()), device)
        base_programs = -(-v.qo_len * v.shape.group // cfg.block_m) * v.shape.num_kv_heads
        return plan_kv_splits(v.kv_len, base_programs, num_sms(device), tile_policy.KV_CHUNK_ALIGN,
                              split_targets(device_facts(device))[0])[0]
    except Exception:
        return None


def _run_variant(v: WarmupVariant, device: torch.device) -> None:
    import flashtile

    hq, hkv, d = v.shape.num_qo_heads, v.shape.num_kv_heads, v.shape.head_dim

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=v.dtype, device=device)

    if v.kind == "mla":
        _run_mla_variant(v, device, randn)
        return
    k = randn(v.kv_len, hkv, d)
    val = randn(v.kv_len, hkv, d)
    if v.kind == "decode":
        flashtile.single_decode_with_kv_cache(randn(hq, d), k, val)
    elif v.kind == "prefill":
        flashtile.single_prefill_with_kv_cache(randn(v.qo_len, hq, d), k, val, causal=v.causal)
    else:  # batch wrappers over a paged cache (page 16) of two requests
        page_size, batch = 16, 2
        pages = -(-v.kv_len // page_size)
        cache = randn(batch * pages, 2, page_size, hkv, d)
        indptr = torch.arange(0, batch * pages + 1, pages, dtype=torch.int32, device="cpu")
        indices = torch.arange(batch * pages, dtype=torch.int32, device="cpu")
        last = torch.full((batch,), v.kv_len - (pages - 1) * page_size, dtype=torch.int32, device="cpu")
        ws = torch.empty(64 << 20, dtype=torch.uint8, device=device)
        if v.kind == "batch_decode":
            decode = flashtile.BatchDecodeWithPagedKVCacheWrapper(ws)
            decode.plan(indptr, indices, last, hq, hkv, d, page_size, q_data_type=v.dtype)
            decode.run(randn(batch, hq, d), cache)
        else:
            prefill = flashtile.BatchPrefillWithPagedKVCacheWrapper(ws)
            qo_indptr = torch.arange(0, batch * v.qo_len + 1, v.qo_len, dtype=torch.int32, device="cpu")
            prefill.plan(qo_indptr, indptr, indices, last, hq, hkv, d, page_size, causal=v.causal,
                         q_data_type=v.dtype)
            prefill.run(randn(batch * v.qo_len, hq, d), cache)
    sync(device)


def _run_mla_variant(v: WarmupVariant, device: torch.device, randn) -> None:
    """One MLA plan and run: two requests of ``v.kv_len`` latent tokens in pages of ``v.page_size``."""
    import flashtile

    heads, (d_ckv, d_kpe), batch = v.shape.num_qo_heads, _MLA_DIMS, 2
    pages = -(-v.kv_len // v.page_size)
    i32 = torch.int32
    pool = randn(batch * pages, v.page_size, d_ckv + d_kpe)
    w = flashtile.mla.BatchMLAPagedAttentionWrapper(torch.empty(128 << 20, dtype=torch.uint8, device=device))
    qo_indptr = torch.arange(0, batch * v.qo_len + 1, v.qo_len, dtype=i32)
    kv_indptr = torch.arange(0, batch * pages + 1, pages, dtype=i32)
    w.plan(qo_indptr, kv_indptr, torch.arange(batch * pages, dtype=i32), torch.full((batch,), v.kv_len, dtype=i32),
           heads, d_ckv, d_kpe, v.page_size, v.causal, 1.0 / (d_ckv + d_kpe) ** 0.5, v.dtype, v.dtype)
    w.run(randn(batch * v.qo_len, heads, d_ckv), randn(batch * v.qo_len, heads, d_kpe), pool[..., :d_ckv],
          pool[..., d_ckv:])


def _bar(done: int, total: int, width: int = 24) -> str:
    filled = round(width * done / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + f"] {done:>{len(str(total))}}/{total}"


def cmd_warmup(args: argparse.Namespace) -> int:
    try:
        head_dims = [int(x) for x in parse_list(args.head_dims)] if args.head_dims else None
        mla_heads = [int(x) for x in parse_list(args.mla)] if args.mla else []
        variants = warmup_variants(parse_list(args.shapes), head_dims, parse_list(args.dtypes), mla_heads)
    except ValueError as e:
        print(f"flashtile warmup: error: {e}", file=sys.stderr)
        return 2
    if args.list:
        for v in variants:
            print(f"{v.label:<40} {v.kind} qo_len {v.qo_len} kv_len {v.kv_len}  ({', '.join(v.models)})")
        return 0
    if not torch.cuda.is_available():
        print("No CUDA device: nothing to compile. The CPU path is pure PyTorch (no Triton kernels to build).")
        return 0
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        print(f"flashtile warmup: error: {e}", file=sys.stderr)
        return 2
    if device.type != "cuda":
        print("--device cpu: nothing to compile. The CPU path is pure PyTorch (no Triton kernels to build).")
        return 0
    print(f"compiling {len(variants)} kernel variants on {device_name(device)} into {triton_cache_dir()}")
    failed = _compile_variants(variants, device)
    return 1 if failed else 0


def _compile_variants(variants: Sequence[WarmupVariant], device: torch.device) -> int:
    """Run each variant once, printing a progress bar line per variant; returns the number that failed."""
    tty = sys.stdout.isatty()
    failed = 0
    total_s = 0.0
    for i, v in enumerate(variants, 1):
        splits = _planned_splits(v, device)
        label = v.label + (f" ({splits} KV splits)" if splits and splits > 1 else "")
        if tty:
            print(f"{_bar(i - 1, len(variants))}  {label} ...", end="\r", flush=True)
        t0 = time.perf_counter()
        try:
            _run_variant(v, device)
            status = f"{time.perf_counter() - t0:6.2f} s"
        except Exception as e:  # report and go on: one bad variant must not hide the others
            failed += 1
            status = f"FAILED: {type(e).__name__}: {e}"
        total_s += time.perf_counter() - t0
        print(f"{_bar(i, len(variants))}  {label:<48} {status}" + (" " * 8 if tty else ""), flush=True)
    print(f"done in {total_s:.1f} s; {len(variants) - failed} of {len(variants)} variants ready "
          f"(cached on disk in {triton_cache_dir()})")
    return failed


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("warmup", help="compile the kernels that model shapes need, with a progress bar",
                       description="Call the public APIs once per kernel variant (head_dim, group size, dtype; "
                                   "causal and non-causal prefill; decode and prefill with and without split-KV) "
                                   "on small CUDA tensors with the model's head counts, so that Triton compiles "
                                   "them into its on-disk cache. "
                                   f"Shape presets: {', '.join(f'{k} ({v})' for k, v in SHAPE_PRESETS.items())}.")
    p.add_argument("--shapes", default="llama3-8b",
                   help="comma-separated presets or QO_HEADS/KV_HEADS/HEAD_DIM (default: llama3-8b)")
    p.add_argument("--head-dims", default=None,
                   help="comma-separated head dims to compile instead of the shapes' own (e.g. 64,128)")
    p.add_argument("--dtypes", default="bf16,fp16", help="comma-separated: bf16, fp16 (default: bf16,fp16)")
    p.add_argument("--mla", default=None,
                   help="comma-separated query-head counts of DeepSeek MLA models to compile the MLA wrapper's "
                        "kernels for (e.g. 16,128); with --shapes '' only those")
    p.add_argument("--device", default="auto", help="auto (default), cuda or cuda:N")
    p.add_argument("--list", action="store_true", help="list the variants and exit (compiles nothing)")
    p.set_defaults(func=cmd_warmup)
