"""Compile flashtile's attention, merge, sampling, RoPE and activation kernels ahead of time for sm_90a (H100)
without a GPU.

The launchers run on CPU tensors; their kernel launches are captured and compiled for the target
instead of run, so the exact specializations (constexprs, dtypes, descriptors) are checked against a
given Triton, e.g. the device machine's 3.6 while this machine has a newer one:

    pip install --no-deps --target /tmp/t36 triton==3.6.0
    python -m benchmarks.tools.aot_compile_check --triton-path /tmp/t36

Prints per kernel: shared memory, registers and spills (from the package's ptxas), and a hash of the
SASS opcode sequence (operands dropped). Run it in two checkouts to see whether a change altered the
machine code of the default paths (same hash: GPU measurements of one apply to the other). Any
compile failure gives exit code 1.
"""
import argparse
import os
import pathlib
import re
import sys

_ap = argparse.ArgumentParser()
_ap.add_argument("--triton-path", default=None, help="a directory holding the triton package to compile with")
_ap.add_argument("--dump", default=None, help="write each compiled kernel's TTGIR and PTX into this directory")
_ap.add_argument("--only", default="", help="compile only the cases whose label contains this text (e.g. sampling)")
_ap.add_argument("--prefill-config", default=None,
                 help="block_n,num_warps,num_stages for the batch-prefill cases (default: the launcher's)")
_ap.add_argument("--prefill-block-m", type=int, default=None,
                 help="rows of the batch-prefill cases' tiles (default: tile_policy.prefill_tile_shape's)")
_ap.add_argument("--mla-config", default=None,
                 help="max_block_m,block_n,warps,stages,out_split for the MLA cases (default: _core/mla_tiles.py's)")
_ap.add_argument("--decode-tile", default=None,
                 help="block_n,num_warps,num_stages,prefetch(0/1) for the batch decode cases (default: the card's)")
_ap.add_argument("--card", default="H100",
                 help="choose the decode configs of this card's tune table entry (flashtile/_core/decode_tune.py)")
_args = _ap.parse_args()
if _args.triton_path:
    sys.path.insert(0, _args.triton_path)
os.environ.pop("TRITON_INTERPRET", None)
import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from benchmarks.tools.aot import Launch, compile_source, sass_summary  # noqa: E402

captured = []
failures = []
JITFunction.__getitem__ = lambda self, grid: (lambda *a, **k: captured.append(Launch(self, a, dict(k))))


def compile_all(label):
    if _args.only not in label:
        captured.clear()
    while captured:
        launch = captured.pop(0)
        source, target, options = compile_source(launch)
        nw, ns, maxnreg = options["num_warps"], options["num_stages"], launch.kwargs.get("maxnreg")
        try:
            cc = triton.compile(source, target=target, options=options)
            status = f"ok shared={cc.metadata.shared}" + sass_summary(cc.asm["ptx"])
            if _args.dump:
                stem = pathlib.Path(_args.dump, re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{label} {launch.name}"))
                stem.parent.mkdir(parents=True, exist_ok=True)
                for ext in ("ttgir", "ptx"):
                    stem.with_suffix(f".{ext}").write_text(cc.asm[ext])
        except Exception as e:
            status = f"FAILED {type(e).__name__}: {str(e)[:400]}"
            failures.append(label)
        reg = f" maxnreg={maxnreg}" if maxnreg else ""
        print(f"[triton {triton.__version__}] {label}: {launch.name} warps={nw} stages={ns}{reg}: {status}", flush=True)


from flashtile._core import device as _device  # noqa: E402
from flashtile._core import tile_policy as TP  # noqa: E402
from flashtile._core.params import AttentionParams  # noqa: E402
from flashtile.kernels import attention as A  # noqa: E402
from flashtile.kernels import batch_prefill as BP  # noqa: E402
from flashtile.kernels import merge as M  # noqa: E402
from flashtile.scheduler.prefill_work import pack_prefill_meta, plan_prefill_work  # noqa: E402

bf = torch.bfloat16
P = AttentionParams(0.088, True)
_device.TARGET_OVERRIDE = (232448, (9, 0))  # the launchers fit their configs to an H100's shared memory
_device.FACTS_OVERRIDE = _device.H100_FACTS._replace(name=_args.card)  # H100 and H200: same SMs, shared memory
if _args.prefill_config:
    TP.CONFIG_OVERRIDE = tuple(int(x) for x in _args.prefill_config.split(","))
if _args.prefill_block_m:
    _tile_shape = TP.prefill_tile_shape
    TP.prefill_tile_shape = lambda *a, **k: (_args.prefill_block_m, _tile_shape(*a, **k)[1])
if _args.decode_tile:
    from benchmarks.tools import decode_tile as _tile
    from flashtile._core import decode_tune as _DT

    _DT.BATCH_DECODE_OVERRIDE = _tile.parse(_args.decode_tile)

def ragged_case(qo, kv, hq=32, hk=8, d=128, dvo=None, paged=False, page=16, label="", prefix_len=None, variant=None,
                fp8=False):
    """prefix_len: multi-item scoring with this shared prefix per request (item positions all 0 here).
    fp8: FP8 attention (e4m3 q, k, v with per-head scales)."""
    dvo = dvo or d
    q = torch.randn(sum(qo), hq, d, dtype=bf)
    group = hq // hk
    bm, bn = TP.prefill_tile_shape(max(qo) * group, max(kv), d, dvo, page if paged else None)
    work = plan_prefill_work(torch.tensor(qo), torch.tensor(kv), group=group, block_m=bm, causal=True, window_left=-1,
                             programs_per_item=hk, num_sms=132, align=128)
    reqs = torch.stack([torch.tensor([0] + list(torch.tensor(qo).cumsum(0)[:-1])), torch.tensor(qo),
                        torch.tensor([0] + list(torch.tensor(kv).cumsum(0)[:-1])), torch.tensor(kv),
                        torch.zeros(len(qo), dtype=torch.long)], 1)
    meta = pack_prefill_meta(work, reqs, work.num_items, work.num_merges)
    if paged:
        pages = sum(-(-n // page) for n in kv)
        cache = torch.randn(pages, 2, page, hk, d, dtype=bf)
        k, v, idx = cache[:, 0], cache[:, 1], torch.arange(pages, dtype=torch.int32)
    else:
        k, v, idx = torch.randn(sum(kv), hk, d, dtype=bf), torch.randn(sum(kv), hk, dvo, dtype=bf), None
    slots = max(work.num_slots, 1)
    extra = {"variant": variant} if variant else {}
    if fp8:
        q, k, v = (x.to(torch.float8_e4m3fn) for x in (q, k, v))
        extra["fp8_scales"] = (torch.rand(hq), torch.rand(hk), torch.rand(hk))
    BP.batch_prefill_forward(q, k, v, idx, None, meta, torch.empty(slots, hk, bm, dvo), torch.empty(slots, hk, bm),
                             torch.empty(sum(qo), hq, dvo, dtype=bf), torch.empty(sum(qo), hq), P, batch_size=len(qo),
                             item_capacity=work.num_items, block_m=bm, block_n=bn,
                             num_items=work.num_items, num_merges=max(work.num_merges, 0),
                             **multi_item_inputs(prefix_len, kv), **extra)
    compile_all(label + f" (tile {bm}x{bn}, merges {work.num_merges})")


def multi_item_inputs(prefix_len, kv):
    if prefix_len is None:
        return {}
    stride = max(kv) - prefix_len
    reqs = torch.tensor([[prefix_len, b * stride] for b in range(len(kv))], dtype=torch.int32)
    return dict(multi_item_requests=reqs, token_pos_in_items=torch.zeros(len(kv) * stride, dtype=torch.int32))


ragged_case([1024] * 16, [1024] * 16, label="ragged 16x1024")
ragged_case([1024] * 16, [1024] * 16, label="ragged 16x1024 multi-item", prefix_len=256)
ragged_case([1024] * 16, [1024] * 16, paged=True, label="paged p16 multi-item", prefix_len=256)
ragged_case([4096] * 2, [8192] * 2, label="ragged long")
ragged_case([64], [60000], label="ragged chunked (split + merge)")
ragged_case([1024] * 4, [1024] * 4, hq=16, hk=16, d=192, dvo=128, label="ragged d192/128 (padded)")
ragged_case([1024] * 16, [1024] * 16, paged=True, label="paged p16")
ragged_case([1024] * 16, [1024] * 16, paged=True, page=1, label="paged p1")
ragged_case([8192] * 4, [8192] * 4, paged=True, label="paged long p16")
ragged_case([1024] * 4, [1024] * 4, hq=16, hk=16, d=192, dvo=128, paged=True, label="paged d192/128 p16")
ragged_case([4] * 64, [4096] * 64, paged=True, label="paged append")
# flashtile.sparse (benchmarks/bench_sparse.py): vector sparsity is page size 1, 64x64 blocks page size 64.
ragged_case([8192], [8192], hq=32, hk=32, d=256, label="single prefill d256 as a batch of one (forced route)")
ragged_case([64] * 128, [4096] * 128, paged=True, page=1, label="sparse vector p1")
ragged_case([64] * 128, [4096] * 128, paged=True, page=64, label="sparse block p64")

q = torch.randn(4096, 32, 128, dtype=bf)
k = torch.randn(4096, 32, 128, dtype=bf)
A.single_attention_forward(q, k, k.clone(), torch.empty(4096, 32, 128, dtype=bf), torch.empty(4096, 32), P,
                           packed_mask=None, kind="prefill")
compile_all("single prefill 4096")

q = torch.randn(1, 32, 128, dtype=bf)
k = torch.randn(32768, 8, 128, dtype=bf)
A.single_attention_forward(q, k, k.clone(), torch.empty(1, 32, 128, dtype=bf), torch.empty(1, 32),
                           AttentionParams(0.088), packed_mask=None, kind="decode")
compile_all("single decode 32k")

from flashtile.scheduler.split_kv import plan_batch_kv_splits  # noqa: E402
from flashtile.scheduler.worklist import decode_layout, pack_decode_worklist  # noqa: E402

lens = torch.tensor([4096] * 64)
splits = plan_batch_kv_splits(lens, 8, 132, 128)
cache = torch.randn(64 * 256, 2, 16, 8, 128, dtype=bf)
i32 = lambda x: torch.as_tensor(x).to(torch.int32)  # noqa: E731
worklist = pack_decode_worklist(decode_layout(64, splits.num_items), splits.request_item_indptr, lens,
                                splits.item_request, splits.item_kv_start, splits.item_kv_end)


def batch_decode_case(k_cache, v_cache, page_size, label):
    """The 64 x 4096 batch decode (32/8 heads, d128) over pages of ``page_size`` tokens."""
    pages = 4096 // page_size
    A.batch_decode_forward(torch.randn(64, 32, 128, dtype=bf), k_cache, v_cache,
                           i32(torch.arange(0, 64 * pages + 1, pages)), torch.arange(64 * pages, dtype=torch.int32),
                           worklist, torch.empty(splits.num_items, 32, 128), torch.empty(splits.num_items, 32),
                           torch.empty(64, 32, 128, dtype=bf), torch.empty(64, 32), AttentionParams(0.088),
                           batch_size=64, num_programs=splits.num_items, max_states=1, merge=False)
    compile_all(label)


batch_decode_case(cache[:, 0], cache[:, 1], 16, "batch decode 64 x 4096")
# CUDA-graph mode: the merge runs whatever the plan, sized for up to 64 states a token (flashtile/decode.py)
A.batch_decode_forward(torch.randn(64, 32, 128, dtype=bf), cache[:, 0], cache[:, 1],
                       i32(torch.arange(0, 64 * 256 + 1, 256)), torch.arange(64 * 256, dtype=torch.int32), worklist,
                       torch.empty(splits.num_items, 32, 128), torch.empty(splits.num_items, 32),
                       torch.empty(64, 32, 128, dtype=bf), torch.empty(64, 32), AttentionParams(0.088),
                       batch_size=64, num_programs=splits.num_items, max_states=64, merge=True)
compile_all("batch decode graph mode 64 x 4096")
_cache1 = cache.view(64 * 4096, 2, 1, 8, 128)  # page size 1 (SGLang's token-granular cache)
batch_decode_case(_cache1[:, 0], _cache1[:, 1], 1, "batch decode page 1 64 x 4096")
if hasattr(torch, "float8_e4m3fn"):  # fp8 K/V: fp16 dots (kernels/tiles.py)
    for _fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        _cache8 = cache.to(_fp8)
        batch_decode_case(_cache8[:, 0], _cache8[:, 1], 16, f"batch decode {str(_fp8).split('_')[-1]} 64 x 4096")
for _d in (64, 256):  # other head dims (the tune table has one entry per padded head dim)
    _cache = torch.empty(16 * 256, 2, 16, 8, _d, dtype=bf)  # launches are captured, not run
    _splits = plan_batch_kv_splits(torch.tensor([4096] * 16), 8, 132, 128)
    _wl = pack_decode_worklist(decode_layout(16, _splits.num_items), _splits.request_item_indptr,
                               torch.tensor([4096] * 16), _splits.item_request, _splits.item_kv_start,
                               _splits.item_kv_end)
    A.batch_decode_forward(torch.randn(16, 32, _d, dtype=bf), _cache[:, 0], _cache[:, 1],
                           i32(torch.arange(0, 16 * 256 + 1, 256)), torch.arange(16 * 256, dtype=torch.int32), _wl,
                           torch.empty(_splits.num_items, 32, _d), torch.empty(_splits.num_items, 32),
                           torch.empty(16, 32, _d, dtype=bf), torch.empty(16, 32), AttentionParams(0.088),
                           batch_size=16, num_programs=_splits.num_items, max_states=1, merge=False)
    compile_all(f"batch decode d{_d} 16 x 4096")
    _k = torch.empty(32768, 8, _d, dtype=bf)
    A.single_attention_forward(torch.randn(1, 32, _d, dtype=bf), _k, _k.clone(), torch.empty(1, 32, _d, dtype=bf),
                               torch.empty(1, 32), AttentionParams(0.088), packed_mask=None, kind="decode")
    compile_all(f"single decode d{_d} 32k")

# Attention variants (flashtile/variants.py): the example hooks of benchmarks/variant_examples.py.
from benchmarks import variant_examples as VX  # noqa: E402
from flashtile.variants import BoundVariant  # noqa: E402

_slopes = torch.randn(32)
for _name, _bound in [("softcap", BoundVariant(VX.SOFTCAP, (30.0,))), ("alibi", BoundVariant(VX.ALIBI, (_slopes,))),
                      ("sigmoid", BoundVariant(VX.FLASH_SIGMOID, (0.1, -1.0))),
                      ("window", BoundVariant(VX.WINDOW, (1023,)))]:
    q = torch.randn(4096, 32, 128, dtype=bf)
    k = torch.randn(4096, 32, 128, dtype=bf)
    A.single_attention_forward(q, k, k.clone(), torch.empty(4096, 32, 128, dtype=bf), torch.empty(4096, 32), P,
                               packed_mask=None, kind="prefill", variant=_bound)
    compile_all(f"variant {_name} single prefill 4096")
    A.batch_decode_forward(torch.randn(64, 32, 128, dtype=bf), cache[:, 0], cache[:, 1],
                           i32(torch.arange(0, 64 * 256 + 1, 256)), torch.arange(64 * 256, dtype=torch.int32), worklist,
                           torch.empty(splits.num_items, 32, 128), torch.empty(splits.num_items, 32),
                           torch.empty(64, 32, 128, dtype=bf), torch.empty(64, 32), AttentionParams(0.088),
                           batch_size=64, num_programs=splits.num_items, max_states=1, merge=False, variant=_bound)
    compile_all(f"variant {_name} batch decode 64 x 4096")
    ragged_case([1024] * 16, [1024] * 16, paged=True, label=f"variant {_name} batch prefill paged p16", variant=_bound)
    q = torch.randn(4096, 32, 128, dtype=bf)
    flag = {"softcap": AttentionParams(0.088, True, logits_soft_cap=30.0),
            "alibi": AttentionParams(0.088, True, pos_encoding_mode="ALIBI")}.get(_name)
    if flag is not None:  # the built-in flag version of the same feature, to compare
        A.single_attention_forward(q, k, k.clone(), torch.empty(4096, 32, 128, dtype=bf), torch.empty(4096, 32), flag,
                                   packed_mask=None, kind="prefill")
        compile_all(f"variant {_name} (as the flag) single prefill 4096")
from flashtile._core.variant_args import sink_variant  # noqa: E402

A.single_attention_forward(torch.randn(1, 32, 128, dtype=bf), k[:, :8], k[:, :8].clone(),
                           torch.empty(1, 32, 128, dtype=bf), torch.empty(1, 32), AttentionParams(0.088),
                           packed_mask=None, kind="decode", variant=BoundVariant(sink_variant(), (torch.randn(32),)))
compile_all("variant sinks single decode")

va, vb = torch.randn(8192, 32, 128, dtype=torch.float16), torch.randn(8192, 32, 128, dtype=torch.float16)
sa, sb = torch.randn(8192, 32), torch.randn(8192, 32)
M.merge_state_pair(va, sa, vb, sb, va.clone(), sa.clone())
compile_all("merge_state")
M.merge_state_pair(va, sa, vb, sb, va, sa, mask=torch.ones(8192, dtype=torch.bool))
compile_all("merge_state_in_place masked")
vs, ss = torch.randn(8192, 4, 32, 128, dtype=torch.float16), torch.randn(8192, 4, 32)
M.merge_states_by_token(vs, ss, torch.empty(8192, 32, 128, dtype=torch.float16), torch.empty(8192, 32))
compile_all("merge_states x4")
from flashtile.kernels import sampling as S  # noqa: E402
from flashtile.kernels.sampling import config as _SCFG  # noqa: E402

# The sampling launchers pick tiny interpreter tiles for CPU tensors: compile the GPU configuration.
for _mod in vars(S).values():
    if hasattr(_mod, "interpreted"):
        _mod.interpreted = lambda t: False
probs = torch.softmax(torch.randn(128, 128256), -1)
# Every specialization family of the probability sampler (one program per row at batch 128).
out_i, out_v = torch.empty(128, dtype=torch.int32), torch.empty(128, dtype=torch.bool)
for label, kw in [("top-p", dict(top_p=0.9)), ("top-k", dict(top_k=50)), ("min-p", dict(min_p=0.05)),
                  ("joint top-k/top-p", dict(top_k=50, top_p=0.9)),
                  ("top_k_first", dict(top_k=50, top_p=0.9, order="top_k_first")), ("plain", dict()),
                  ("top-p max_rounds=0", dict(top_p=0.5, max_rounds=0))]:
    S.filtered_sampling(probs, None, out_i, out_v, 7, 0, **kw)
    compile_all(f"sampling seg {label}")
# Batch 512 (several rows per SM): the SEG_WAVE_* configuration (tiles, warps, register cap; AOT_WAVE_CONFIGS
# adds warps x maxnreg variants).
probs32k = torch.softmax(torch.randn(512, 32000), -1)
_waves = [(_SCFG.SEG_WAVE_WARPS, _SCFG.SEG_WAVE_MAXNREG)] + [tuple(int(x) for x in w.split("x")) for w in
                                                          os.environ.get("AOT_WAVE_CONFIGS", "").split(",") if w]
for _w, _r in _waves:
    _SCFG.SEG_WAVE_WARPS, _SCFG.SEG_WAVE_MAXNREG = _w, _r
    for label, kw in [("top-p", dict(top_p=0.9)), ("top-k", dict(top_k=50)), ("min-p", dict(min_p=0.05)),
                      ("top_k_first", dict(top_k=50, top_p=0.9, order="top_k_first"))]:
        S.filtered_sampling(probs32k, None, torch.empty(512, dtype=torch.int32), torch.empty(512, dtype=torch.bool),
                            7, 0, **kw)
        compile_all(f"sampling seg {label} batch 512 vocab 32000")
_SCFG.SEG_WAVE_WARPS, _SCFG.SEG_WAVE_MAXNREG = _waves[0]
# Row split (batch 1: 32 programs per row exchanging partials through a barrier).
from flashtile._core import device as _DEV  # noqa: E402

_sms, _DEV.INTERPRETER_SMS = _DEV.INTERPRETER_SMS, 132
for label, kw in [("top-p", dict(top_p=0.9)), ("top-k", dict(top_k=50)), ("min-p", dict(min_p=0.05)),
                  ("joint top-k/top-p", dict(top_k=50, top_p=0.9)), ("plain", dict())]:
    S.filtered_sampling(probs[:1], None, out_i[:1], out_v[:1], 7, 0, split=True, **kw)
    compile_all(f"sampling split {label}")
    # Batch 128: 2 chunks of 65536 per row, two programs per SM (registers capped).
    S.filtered_sampling(probs, None, out_i, out_v, 7, 0, split=65536, **kw)
    compile_all(f"sampling split batch 128 {label}")
_DEV.INTERPRETER_SMS = _sms
S.sampling_from_logits(torch.randn(128, 128256, dtype=torch.bfloat16), None, out_i, out_v, 7, 0)
compile_all("sampling seg sampling_from_logits bf16")
S.softmax(torch.randn(128, 128256, dtype=torch.bfloat16), torch.empty(128, 128256), None)
compile_all("sampling seg softmax bf16")
for label, kw in [("top-k", dict(top_k=50)), ("top-p", dict(top_p=0.9)),
                  ("top-k mask logits", dict(top_k=50, is_logits=True))]:
    S.threshold_filter(probs, torch.empty_like(probs), **kw)
    compile_all(f"sampling renorm/mask {label}")
_draft = torch.softmax(torch.randn(32, 5, 128256), -1)
S.chain_speculative_sampling(_draft, torch.randint(0, 128256, (32, 5), dtype=torch.int32),
                             torch.softmax(torch.randn(32, 6, 128256), -1), torch.empty(32, 6, dtype=torch.int32),
                             torch.empty(32, dtype=torch.int32), torch.empty(32, dtype=torch.int32), 7, 0)
compile_all("sampling chain speculative")
# Small ops: RoPE (the cos/sin-cache form's token-major kernel, the Llama 3.1 form's head-block kernel) and gated
# activations.
from flashtile._core import device as DEV  # noqa: E402
from flashtile.kernels import activation as ACT  # noqa: E402
from flashtile.kernels import rope as R  # noqa: E402

# RoPE launch sizes of the H100, not of the interpreter's small "GPU"
_interpreter_sms, DEV.INTERPRETER_SMS = DEV.INTERPRETER_SMS, 132
qr, kr = torch.randn(8192, 32, 128, dtype=bf), torch.randn(8192, 8, 128, dtype=bf)
pos = torch.arange(8192, dtype=torch.int64)
R.apply_rope(qr, kr, qr, kr, rotary_dim=128, interleave=False, pos_ids=pos, cos_sin_cache=torch.randn(8192, 128))
compile_all("rope cos_sin_cache")
R.apply_rope(qr, kr, qr, kr, rotary_dim=128, interleave=False, pos_ids=pos, smooth_a=0.1, smooth_b=-0.5)
compile_all("rope llama31")
DEV.INTERPRETER_SMS = _interpreter_sms
_q, _kv = torch.randn(4, 128, 576, dtype=bf), torch.randn(4, 576, dtype=bf)  # MLA: latent 512 | rope 64
R.mla_rope_quantize(_q[..., 512:], _kv[:, 512:], _q[..., :512], _kv[:, :512], torch.randn(8192, 64),
                    torch.arange(4, dtype=torch.int32), *(torch.empty(s, dtype=torch.float8_e4m3fn)
                                                          for s in ((4, 128, 64), (4, 64), (4, 128, 512), (4, 512))),
                    interleave=False, quant_scale_q=1.0, quant_scale_kv=1.0)
compile_all("mla_rope_quantize_fp8 h128")
ACT.act_and_mul(torch.randn(8192, 2 * 14336, dtype=bf), torch.empty(8192, 14336, dtype=bf), "silu")
compile_all("activation silu 8192 x 2*14336")
from flashtile.kernels import norm as NORM  # noqa: E402

_x, _w = torch.randn(1, 4096, dtype=bf), torch.randn(4096, dtype=bf)
NORM.rmsnorm(_x, _w, torch.empty_like(_x), 1e-6, 0.0)
compile_all("rmsnorm 1 x 4096")
NORM.fused_add_rmsnorm(_x, torch.randn(1, 4096, dtype=bf), _w, 1e-6, 0.0)
compile_all("fused_add_rmsnorm 1 x 4096")
# MLA (DeepSeek latent 512 + rope 64): the default configs of the 16-, 32- and 64-row tiles (16, 32, 128 heads),
# an fp8 latent, the graph-mode merge.
from flashtile._core.mla_tiles import MlaMeta, mla_launch_facts  # noqa: E402
from flashtile.kernels import mla as MLA  # noqa: E402
from flashtile.scheduler.mla_work import plan_mla_work  # noqa: E402

if _args.mla_config:
    from flashtile._core import mla_tiles as _MT

    (_MT.MLA_MAX_BLOCK_M, _MT.MLA_BLOCK_N, _MT.MLA_WIDE_WARPS, _MT.MLA_STAGES,
     _MT.MLA_OUT_SPLIT) = (int(x) for x in _args.mla_config.split(","))
    _MT.MLA_NARROW_WARPS = _MT.MLA_WIDE_WARPS  # the given warps for every tile


def mla_case(batch, kv, heads, qo=1, page=64, kv_dtype=bf, label="", variant=None):
    import numpy as np
    qo_indptr = np.arange(batch + 1) * qo
    block_m, cfg, align, _ = mla_launch_facts(torch.device("cpu"), True, qo * heads, 512)  # the GPU default (SMs: 132)
    work = plan_mla_work(qo_indptr, np.full(batch, kv), heads, block_m, 132, align, token_capacity=batch * qo)
    pages = batch * (-(-kv // page))
    pool = torch.randn(pages, page, 576, dtype=bf).to(kv_dtype)
    i32 = lambda x: torch.as_tensor(x).to(torch.int32)  # noqa: E731
    rows = max(work.partial_rows, 1)
    meta = MlaMeta(i32(qo_indptr), i32(np.arange(batch + 1) * (pages // batch)), torch.arange(pages, dtype=torch.int32),
                   i32(np.full(batch, kv)), i32(work.packed), work.req_offset, work.token_offset, work.item_offset,
                   work.num_items, work.max_splits, torch.empty(rows, 512), torch.empty(rows), cfg, True)
    MLA.mla_paged_forward(torch.randn(batch * qo, heads, 512, dtype=bf), torch.randn(batch * qo, heads, 64, dtype=bf),
                          pool[..., :512], pool[..., 512:], meta, torch.empty(batch * qo, heads, 512, dtype=bf),
                          torch.empty(batch * qo, heads), sm_scale=0.072, ckv_scale=1.0, kpe_scale=1.0, causal=True,
                          variant=variant)
    compile_all(f"mla {label} (tile {block_m}x{cfg.block_n}, items {work.num_items}, splits {work.max_splits})")


mla_case(64, 4096, 128, label="decode 64x4096 h128 p64")
mla_case(128, 8192, 16, page=1, label="decode 128x8192 h16 p1")
mla_case(32, 16384, 32, label="decode 32x16384 h32 p64")
mla_case(64, 4096, 128, qo=4, label="append 4 x 64x4096 h128 p64")
if hasattr(torch, "float8_e4m3fn"):
    mla_case(64, 4096, 128, kv_dtype=torch.float8_e4m3fn, label="decode fp8 64x4096 h128 p64")
    mla_case(128, 8192, 16, kv_dtype=torch.float8_e4m3fn, label="decode fp8 128x8192 h16 p64")
# MLA with two programs per work item (MLA_OUT_SPLIT 2: half the accumulator each), BLOCK_N 32 and 64.
from flashtile._core import mla_tiles as _MT  # noqa: E402

_MT.MLA_OUT_SPLIT = 2
mla_case(64, 4096, 128, label="out-split 2 decode 64x4096 h128 p64")
_stages, _MT.MLA_BLOCK_N, _MT.MLA_STAGES = _MT.MLA_STAGES, 64, 2  # 64 x 576 latent tiles: two stages fit
mla_case(64, 4096, 128, label="out-split 2 block_n 64 decode 64x4096 h128 p64")
mla_case(128, 8192, 16, label="out-split 2 block_n 64 decode 128x8192 h16 p64")
_MT.MLA_OUT_SPLIT, _MT.MLA_BLOCK_N, _MT.MLA_STAGES = 1, 32, _stages
# MLA with variants: sinks (the sink hook), a logits transform (soft cap), no softmax (FlashSigmoid).
mla_case(64, 4096, 128, label="variant sinks decode 64x4096 h128 p64",
         variant=BoundVariant(sink_variant(), (torch.randn(128),)))
mla_case(64, 4096, 128, label="variant softcap decode 64x4096 h128 p64", variant=BoundVariant(VX.SOFTCAP, (30.0,)))
mla_case(64, 4096, 128, label="variant sigmoid decode 64x4096 h128 p64",
         variant=BoundVariant(VX.FLASH_SIGMOID, (0.1, -1.0)))
mla_case(64, 4096, 128, label="variant window decode 64x4096 h128 p64", variant=BoundVariant(VX.WINDOW, (1023,)))
# GEMM: segment GEMM (MoE-like column-major experts, LoRA-like rank-16 row-major) and fp8 bmm (e4m3, mixed).
from flashtile.kernels import gemm as G  # noqa: E402

G.num_sms = lambda device: 132  # the launcher's split-K choice for an H100 (CPU tensors would say 4)
_scratch = torch.empty(32 << 20, dtype=torch.float32)  # a 128 MiB float workspace
_seg = torch.tensor([0, 1000, 1000, 2024], dtype=torch.int64)
G.segment_gemm(torch.randn(2024, 4096, dtype=bf), torch.randn(3, 1024, 4096, dtype=bf), _seg, False,
               torch.tensor([2, 0, 1]), True, torch.empty(2024, 1024, dtype=bf), _scratch)
compile_all("gemm segment column-major bf16 4096->1024")
G.segment_gemm(torch.randn(2024, 4096, dtype=torch.float16), torch.randn(3, 4096, 16, dtype=torch.float16), _seg,
               False, None, False, torch.empty(2024, 16, dtype=torch.float16), _scratch)
compile_all("gemm segment row-major fp16 lora 4096->16")
# The benchmark's shapes (bench_gemm.py): LoRA 64 segments x 1-64 rows (2080 rows), shrink and expand at
# ranks 16 and 64 (nn.Linear layout, seg_lens); MoE 4096 rows over 8 and 64 experts, 4096 -> 14336.
_lora = torch.randint(1, 65, (64,), generator=torch.Generator().manual_seed(1))
for _r in (16, 64):
    G.segment_gemm(torch.randn(int(_lora.sum()), 4096, dtype=bf), torch.empty(64, _r, 4096, dtype=bf), _lora, True,
                   None, True, torch.empty(int(_lora.sum()), _r, dtype=bf), _scratch)
    compile_all(f"gemm segment lora shrink r{_r} 4096->{_r}")
    G.segment_gemm(torch.randn(int(_lora.sum()), _r, dtype=bf), torch.empty(64, 4096, _r, dtype=bf), _lora, True,
                   None, True, torch.empty(int(_lora.sum()), 4096, dtype=bf), _scratch)
    compile_all(f"gemm segment lora expand r{_r} {_r}->4096")
for _e in (8, 64):
    # one expert's weights seen _e times (stride 0: specialized like the real stride, a multiple of 16)
    G.segment_gemm(torch.empty(4096, 4096, dtype=bf), torch.empty(1, 14336, 4096, dtype=bf).expand(_e, -1, -1),
                   torch.full((_e,), 4096 // _e), True, None, True, torch.empty(4096, 14336, dtype=bf), _scratch)
    compile_all(f"gemm segment moe {_e} experts 4096->14336")
G.SEG_TMA = True  # the wide classes' TMA kernel (off by default)
G.segment_gemm_config.cache_clear()
for _e in (8, 64):
    for _cm in (True, False):
        _w = torch.empty(1, 14336, 4096, dtype=bf) if _cm else torch.empty(1, 4096, 14336, dtype=bf)
        G.segment_gemm(torch.empty(4096, 4096, dtype=bf), _w.expand(_e, -1, -1), torch.full((_e,), 4096 // _e), True,
                       None, _cm, torch.empty(4096, 14336, dtype=bf), _scratch)
        compile_all(f"gemm segment moe {_e} experts 4096->14336 tma {'column' if _cm else 'row'}-major")
G.SEG_TMA = False
G.segment_gemm_config.cache_clear()
_e4, _e5, _one = torch.float8_e4m3fn, torch.float8_e5m2, torch.ones((), dtype=torch.float32)
G.bmm_fp8(torch.randn(4, 256, 1024).to(_e4), torch.randn(4, 512, 1024).to(_e4).transpose(-2, -1), _one, _one,
          torch.empty(4, 256, 512, dtype=bf))
compile_all("gemm bmm_fp8 e4m3 256x512x1024")
G.bmm_fp8(torch.randn(4, 48, 1024).to(_e4), torch.randn(4, 512, 1024).to(_e5).transpose(-2, -1), _one, _one,
          torch.empty(4, 48, 512, dtype=torch.float16))
compile_all("gemm bmm_fp8 e4m3 x e5m2 48x512x1024")
G.bmm_fp8(torch.randn(16, 1024, 1024).to(_e5), torch.randn(16, 1024, 1024).to(_e5).transpose(-2, -1), _one, _one,
          torch.empty(16, 1024, 1024, dtype=bf))
compile_all("gemm bmm_fp8 e5m2 16x1024x1024x1024")
# FP8 attention (e4m3 q, k, v with per-head scales; benchmarks/bench_fp8_prefill.py): single prefill causal
# 8192 at 32/8 heads, d128, and the batch kernel, ragged and paged.
_e4s = (torch.rand(32), torch.rand(8), torch.rand(8))
_q8, _k8 = torch.randn(8192, 32, 128).to(_e4), torch.randn(8192, 8, 128).to(_e4)
A.single_attention_forward(_q8, _k8, _k8.clone(), torch.empty(8192, 32, 128, dtype=bf), torch.empty(8192, 32), P,
                           packed_mask=None, kind="prefill", fp8_scales=_e4s)
compile_all("fp8 single prefill 8192 h32/8")
ragged_case([1024] * 16, [1024] * 16, label="fp8 ragged 16x1024", fp8=True)
ragged_case([8192] * 2, [8192] * 2, label="fp8 ragged long", fp8=True)
ragged_case([1024] * 16, [1024] * 16, paged=True, label="fp8 paged p16", fp8=True)
sys.exit(1 if failures else 0)
