"""Small memory-bound ops: suites ``norm``, ``qk_norm``, ``activation``, ``rope``, ``mla_rope_quant`` (GB/s) and
``small_ops_launch`` (host cost of eager batch-1 calls).

Cases follow ANCHORS.md (small-ops table) and issue 6. Providers: flashtile, FlashInfer (when
importable), torch eager and torch.compile of the same math. GB/s counts the bytes each op must
move once (reads + writes). In-place ops (fused_add_rmsnorm, RoPE) return None, so the harness does
not compare their outputs (repeated timing calls keep changing the inputs); the out-of-place ops
are compared with flashtile's output.

Timing: the bandwidth suites time CUDA graphs of about 1 ms of back-to-back calls at every size
(``cuda_graph="on"``, ``graph_span_us=1000``), the steady state of an op called in a loop. This is
the method ANCHORS.md's numbers match: our torch.compile baseline measures 2.3-2.4 us at rmsnorm
128 x 4096 and 25.2 us at 4096 x 4096 this way, against ANCHORS' 2.2 and 25.1 us, while the
harness default (10 us replays after an L2 flush) gave 4.2-5.7 and 28.4-28.8 us. Inputs that fit in
the 50 MB L2 stay there between calls, as in ANCHORS. ``--cuda-graph auto --graph-span-us 10`` gives
the harness default.

``small_ops_launch``: each timed call runs the op ``LAUNCH_CALLS`` times back to back at batch 1,
without CUDA graphs (``--cuda-graph off`` is implied: the loop takes far over 100 us), so the time
is host-bound: the reported median / LAUNCH_CALLS is the eager cost of one call.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .harness import Case, Knob, Provider, Suite, Tune, Unavailable, device, grid, import_flashinfer, register

LAUNCH_CALLS = 100
EPS = 1e-6


def _es(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


def _norm_case(op: str, rows: int, hidden: int, dtype: str = "bfloat16") -> Case:
    tensors = 2 if op == "rmsnorm" else 4  # rmsnorm: x in, out; fused add: x, residual in and out
    return Case(f"{op} {rows}x{hidden} {dtype}", dict(op=op, rows=rows, hidden=hidden, dtype=dtype),
                bytes=float(_es(dtype) * (tensors * rows * hidden + hidden)))


def norm_cases(smoke: bool):
    if smoke:
        return [_norm_case("rmsnorm", 4, 256), _norm_case("fused_add_rmsnorm", 4, 256)]
    return [_norm_case("rmsnorm", 128, 4096), _norm_case("rmsnorm", 4096, 4096), _norm_case("rmsnorm", 16384, 8192),
            _norm_case("fused_add_rmsnorm", 4096, 4096), _norm_case("fused_add_rmsnorm", 16384, 8192)]


def qk_norm_cases(smoke: bool):
    t, h, d = (8, 4, 128) if smoke else (4608, 48, 128)
    return [Case(f"rmsnorm [{t}x{h}, {d}] bfloat16",
                 dict(op="qk_norm", tokens=t, heads=h, head_dim=d, dtype="bfloat16"),
                 bytes=float(2 * (2 * t * h * d + d)))]


def _act_case(op: str, rows: int, d: int, dtype: str = "bfloat16") -> Case:
    return Case(f"{op} {rows}x(2*{d}) {dtype}", dict(op=op, rows=rows, d=d, dtype=dtype),
                bytes=float(_es(dtype) * 3 * rows * d))


def activation_cases(smoke: bool):
    if smoke:
        return [_act_case("silu_and_mul", 4, 64), _act_case("gelu_tanh_and_mul", 3, 33)]
    return [_act_case("silu_and_mul", 128, 14336), _act_case("silu_and_mul", 8192, 14336),
            _act_case("gelu_tanh_and_mul", 8192, 14336)]


def _rope_case(op: str, nnz: int, hq: int, hk: int, d: int, dtype: str = "bfloat16") -> Case:
    qk = 2 * nnz * (hq + hk) * d * _es(dtype)  # q and k read and written once
    extra = nnz * 8 + (nnz * d * 4 if op == "cos_sin_cache" else 0)  # positions (+ float32 cache rows)
    return Case(f"rope {op} {nnz} tok h{hq}/{hk} d{d} {dtype}",
                dict(op=op, nnz=nnz, num_q_heads=hq, num_k_heads=hk, head_dim=d, dtype=dtype),
                bytes=float(qk + extra))


def rope_cases(smoke: bool):
    if smoke:
        return [_rope_case("cos_sin_cache", 4, 4, 2, 64), _rope_case("llama31_pos_ids", 4, 4, 2, 64)]
    return [_rope_case("cos_sin_cache", 128, 32, 8, 128), _rope_case("cos_sin_cache", 8192, 32, 8, 128),
            _rope_case("llama31_pos_ids", 8192, 32, 8, 128)]


MLA_ROPE_DIM, MLA_NOPE_DIM = 64, 512  # DeepSeek's RoPE key and latent widths


def _mla_quant_case(nnz: int, heads: int) -> Case:
    width = MLA_ROPE_DIM + MLA_NOPE_DIM
    moved = nnz * (heads + 1) * width * (2 + 1)  # bf16 q and latent row read, fp8 written
    return Case(f"mla_rope_quantize_fp8 {nnz} tok h{heads}", dict(op="mla_quantize", nnz=nnz, heads=heads,
                                                                   dtype="bfloat16"),
                bytes=float(moved + nnz * (MLA_ROPE_DIM * 4 + 8)))  # + float32 cache rows and positions


def mla_quant_cases(smoke: bool):
    if smoke:
        return [_mla_quant_case(3, 4)]
    return [_mla_quant_case(64, 128), _mla_quant_case(128, 16), _mla_quant_case(4096, 128),
            _mla_quant_case(8192, 16)]


def launch_cases(smoke: bool):
    n = f"batch 1, {LAUNCH_CALLS} eager calls"
    return [
        Case(f"rmsnorm 1x4096 ({n})", dict(op="rmsnorm", rows=1, hidden=4096, dtype="bfloat16", calls=LAUNCH_CALLS)),
        Case(f"fused_add_rmsnorm 1x4096 ({n})",
             dict(op="fused_add_rmsnorm", rows=1, hidden=4096, dtype="bfloat16", calls=LAUNCH_CALLS)),
        Case(f"silu_and_mul 1x(2*14336) ({n})", dict(op="silu_and_mul", rows=1, d=14336, dtype="bfloat16",
                                                      calls=LAUNCH_CALLS)),
        Case(f"rope cos_sin_cache 1 tok h32/8 d128 ({n})",
             dict(op="cos_sin_cache", nnz=1, num_q_heads=32, num_k_heads=8, head_dim=128, dtype="bfloat16",
                  calls=LAUNCH_CALLS)),
    ]


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _inputs(case: Case) -> dict:
    p = case.params
    kw = dict(dtype=getattr(torch, p["dtype"]), device=device())
    op = p["op"]
    if op in ("rmsnorm", "fused_add_rmsnorm"):
        return dict(x=torch.randn(p["rows"], p["hidden"], **kw), r=torch.randn(p["rows"], p["hidden"], **kw),
                    w=torch.rand(p["hidden"], **kw) + 0.5)
    if op == "qk_norm":
        return dict(x=torch.randn(p["tokens"], p["heads"], p["head_dim"], **kw),
                    w=torch.rand(p["head_dim"], **kw) + 0.5)
    if op in ("silu_and_mul", "gelu_tanh_and_mul"):
        return dict(x=torch.randn(p["rows"], 2 * p["d"], **kw))
    if op == "mla_quantize":  # q and the new latent rows as SGLang holds them: nope part first, then rope
        q = torch.randn(p["nnz"], p["heads"], MLA_NOPE_DIM + MLA_ROPE_DIM, **kw)
        kv = torch.randn(p["nnz"], MLA_NOPE_DIM + MLA_ROPE_DIM, **kw)
        dims = torch.arange(0, MLA_ROPE_DIM, 2, dtype=torch.float32, device=device())
        inv_freq = 1.0 / (1e4 ** (dims / MLA_ROPE_DIM))
        angle = torch.arange(8192, dtype=torch.float32, device=device())[:, None] * inv_freq[None, :]
        return dict(args=(q[..., MLA_NOPE_DIM:], kv[:, MLA_NOPE_DIM:], q[..., :MLA_NOPE_DIM], kv[:, :MLA_NOPE_DIM],
                          torch.cat([angle.cos(), angle.sin()], dim=-1),
                          torch.randint(0, 8192, (p["nnz"],), device=device(), dtype=torch.int32)))
    nnz, hq, hk, d = p["nnz"], p["num_q_heads"], p["num_k_heads"], p["head_dim"]
    max_pos = 8192
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device()) / d))
    angle = torch.arange(max_pos, dtype=torch.float32, device=device())[:, None] * inv_freq[None, :]
    return dict(
        positions=torch.randint(0, max_pos, (nnz,), device=device()),
        query=torch.randn(nnz, hq * d, **kw),
        key=torch.randn(nnz, hk * d, **kw),
        cache=torch.cat([angle.cos(), angle.sin()], dim=-1),
        head_size=d,
    )


def _repeat(fn, case: Case):
    calls = case.params.get("calls", 1)
    if calls == 1:
        return fn

    def many():
        for _ in range(calls):
            fn()

    return many


# ---------------------------------------------------------------------------------------------
# The math in plain torch (eager and compiled baselines)
# ---------------------------------------------------------------------------------------------


def _torch_rmsnorm(x, w):
    return F.rms_norm(x, (x.shape[-1],), w, EPS)


def _manual_rmsnorm(x, w):
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + EPS) * w.float()).to(x.dtype)


def _torch_fused_add(x, r, w, rms=_torch_rmsnorm):
    r.add_(x)
    x.copy_(rms(r, w))


def _torch_act(x, op):
    d = x.shape[-1] // 2
    if op == "silu_and_mul":
        return F.silu(x[..., :d]) * x[..., d:]
    return F.gelu(x[..., :d], approximate="tanh") * x[..., d:]


def _torch_rope_(positions, query, key, head_size, cache):
    """In-place NeoX RoPE from a cos|sin cache (vLLM's native path)."""
    cos, sin = cache.index_select(0, positions).chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    half = cos.shape[-1]
    for x in (query, key):
        x3 = x.view(x.shape[0], -1, head_size)
        a, b = x3[..., :half].float(), x3[..., half : 2 * half].float()
        x3[..., : 2 * half] = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1).to(x.dtype)


def _llama31_inv_freq(d, device_):
    import math

    f = 5e5 ** (-torch.arange(0, d, 2, dtype=torch.float32, device=device_) / d)
    smooth = ((8192 * f / (2 * math.pi) - 1.0) / 3.0).clamp(0, 1)
    return (1 - smooth) * f / 8.0 + smooth * f


def _torch_llama31_rope_(pos, q3, k3, inv_freq):
    angle = pos.float()[:, None] * inv_freq[None, :]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    half = cos.shape[-1]
    for x in (q3, k3):
        a, b = x[..., :half].float(), x[..., half:].float()
        x.copy_(torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1))


def _torch_fn(case: Case, compiled: bool):
    p = case.params
    t = _inputs(case)
    op = p["op"]
    wrap = _compile if compiled else (lambda f: f)
    if op in ("rmsnorm", "qk_norm"):
        f = wrap(_manual_rmsnorm if compiled else _torch_rmsnorm)
        x, w = t["x"], t["w"]
        return lambda: f(x, w)
    if op == "fused_add_rmsnorm":
        f = wrap(functools.partial(_torch_fused_add, rms=_manual_rmsnorm) if compiled else _torch_fused_add)
        x, r, w = t["x"], t["r"], t["w"]
        return lambda: f(x, r, w)
    if op in ("silu_and_mul", "gelu_tanh_and_mul"):
        f = wrap(functools.partial(_torch_act, op=op))
        x = t["x"]
        return lambda: f(x)
    if op == "mla_quantize":  # flashtile's PyTorch path (its CPU path), eager or compiled
        from flashtile.reference.rope import mla_rope_quantize

        args = t["args"]
        outs = [torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device) for x in args[:4]]
        f = wrap(functools.partial(mla_rope_quantize, interleave=False, quant_scale_q=0.5, quant_scale_kv=0.5))
        return lambda: (f(*args, *outs), outs[0])[1]
    if op == "cos_sin_cache":
        f = wrap(_torch_rope_)
        a = (t["positions"], t["query"], t["key"], t["head_size"], t["cache"])
        return lambda: f(*a)
    d = p["head_dim"]
    f = wrap(_torch_llama31_rope_)
    q3, k3 = t["query"].view(p["nnz"], -1, d), t["key"].view(p["nnz"], -1, d)
    inv_freq = _llama31_inv_freq(d, device())
    pos = t["positions"]
    return lambda: f(pos, q3, k3, inv_freq)


def _compile(fn):
    for knob in ("recompile_limit", "cache_size_limit"):  # one compile per case shape
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
    return torch.compile(fn, dynamic=False)


def _torch_eager(case: Case):
    return _repeat(_torch_fn(case, compiled=False), case)


def _torch_compiled(case: Case):
    if device().type != "cuda":
        raise Unavailable("torch.compile baseline is timed on CUDA only")
    return _repeat(_torch_fn(case, compiled=True), case)


# ---------------------------------------------------------------------------------------------
# flashtile and FlashInfer (same call signatures)
# ---------------------------------------------------------------------------------------------


def _library_fn(lib, case: Case):
    """One call of ``lib`` (flashtile or flashinfer, whose small-op APIs match) for this case."""
    p = case.params
    t = _inputs(case)
    op = p["op"]
    if op == "rmsnorm":
        x, w, out = t["x"], t["w"], torch.empty_like(t["x"])
        return lambda: lib.norm.rmsnorm(x, w, EPS, out=out)
    if op == "qk_norm":
        x, w, out = t["x"], t["w"], torch.empty_like(t["x"])
        if lib.__name__ == "flashinfer":  # a 2-D view of the same rows (older releases take 2-D only)
            x, out = x.view(-1, x.shape[-1]), out.view(-1, x.shape[-1])
            return lambda: lib.norm.rmsnorm(x, w, EPS, out=out).view(t["x"].shape)
        return lambda: lib.norm.rmsnorm(x, w, EPS, out=out)
    if op == "fused_add_rmsnorm":
        x, r, w = t["x"], t["r"], t["w"]
        return lambda: lib.norm.fused_add_rmsnorm(x, r, w, EPS)
    if op in ("silu_and_mul", "gelu_tanh_and_mul"):
        x = t["x"]
        out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype, device=x.device)
        fn = getattr(lib.activation, op)
        return lambda: fn(x, out=out)
    if op == "mla_quantize":
        args = t["args"]
        outs = [torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device) for x in args[:4]]
        return lambda: lib.rope.mla_rope_quantize_fp8(*args, True, None, 0.5, 0.5, *outs)[0]  # q_rope_out compared
    if op == "cos_sin_cache":
        a = (t["positions"], t["query"], t["key"], t["head_size"], t["cache"])
        return lambda: lib.rope.apply_rope_with_cos_sin_cache_inplace(*a, is_neox=True)
    d = p["head_dim"]
    q3, k3 = t["query"].view(p["nnz"], -1, d), t["key"].view(p["nnz"], -1, d)
    pos = t["positions"].to(torch.int32)
    return lambda: lib.rope.apply_llama31_rope_pos_ids_inplace(q3, k3, pos)


def _in_place(case: Case) -> bool:
    return case.params["op"] in ("fused_add_rmsnorm", "cos_sin_cache", "llama31_pos_ids")


def _no_output(fn):
    def call():
        fn()

    return call


def _flashtile(case: Case):
    import flashtile
    import flashtile.activation  # submodules, in case flashtile/__init__ does not import them
    import flashtile.norm
    import flashtile.rope

    fn = _library_fn(flashtile, case)
    return _repeat(_no_output(fn) if _in_place(case) else fn, case)


def _flashtile_triton_launch(case: Case):
    """flashtile with the direct-launch cache off: every launch goes through Triton's JITFunction.run
    (what flashtile cost before flashtile/_core/launch.py)."""
    from flashtile._core import launch

    fn = _flashtile(case)

    def call():
        launch._state["enabled"] = False
        try:
            return fn()
        finally:
            launch.reset_launch_settings()

    return call


def _flashinfer(case: Case):
    flashinfer = import_flashinfer("activation", "norm", "rope")
    fn = _library_fn(flashinfer, case)
    return _repeat(_no_output(fn) if _in_place(case) else fn, case)


def _wrap_torch(make):
    def provider(case: Case):
        fn = make(case)
        return _no_output(fn) if _in_place(case) else fn

    return provider


def _copy_same_bytes(case: Case):
    """A device-to-device copy that reads and writes as many bytes as the case moves: the bandwidth
    this GPU gives such a stream, measured in the same run (a ceiling, not a baseline)."""
    if "calls" in case.params or not case.bytes:
        raise Unavailable("only for the bandwidth cases")
    src = torch.randn(int(case.bytes // 4), dtype=torch.bfloat16, device=device())  # half read, half written
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)

    return copy


PROVIDERS = [
    Provider("flashtile", _flashtile),
    Provider("flashinfer", _flashinfer),
    Provider("torch_eager", _wrap_torch(_torch_eager)),
    Provider("torch_compile", _wrap_torch(_torch_compiled)),
    Provider("copy_same_bytes", _copy_same_bytes, baseline=False),
]

# Steady-state timing (module doc): CUDA graphs of ~1 ms of back-to-back calls at every size.
STEADY = dict(cuda_graph="on", graph_span_us=1000.0)
# Warps per program (elements per warp) of the norm kernels; columns per program and warps of the
# activation kernels (flashtile/kernels/norm.py, activation.py).
NORM_WARPS = Knob("flashtile.kernels.norm", "ELEMS_PER_WARP")
ACT_BLOCK_D, ACT_WARPS = Knob("flashtile.kernels.activation", "MAX_BLOCK_D"), Knob("flashtile.kernels.activation",
                                                                                   "ELEMS_PER_WARP")
NORM_GRID = [{NORM_WARPS: e} for e in (256, 512, 1024, 2048)]
ACT_GRID = [{ACT_BLOCK_D: g["block_d"], ACT_WARPS: g["elems"]} for g in grid(block_d=(1024, 2048, 4096),
                                                                             elems=(256, 512, 1024))]

register(Suite("norm", norm_cases, PROVIDERS, metric="gbps",
               description="rmsnorm / fused_add_rmsnorm [rows, hidden]; bytes = inputs read + outputs written once",
               tunes={"warps": Tune(lambda case: NORM_GRID, description="elements per warp")}, **STEADY))
register(Suite("qk_norm", qk_norm_cases, PROVIDERS, metric="gbps",
               description="per-head RMSNorm over [tokens, heads, head_dim] (flashtile takes the 3-D tensor)",
               **STEADY))
register(Suite("activation", activation_cases, PROVIDERS, metric="gbps",
               description="gated activations [rows, 2d] -> [rows, d]; bytes = 3 * rows * d elements",
               tunes={"launch": Tune(lambda case: ACT_GRID, cases=lambda case: case.params["op"] == "silu_and_mul",
                                     description="columns per program x elements per warp (silu_and_mul)")},
               **STEADY))
register(Suite("rope", rope_cases, PROVIDERS, metric="gbps",
               description="in-place RoPE of q and k (cos/sin cache, or Llama 3.1 frequencies from pos_ids)", **STEADY))
register(Suite("mla_rope_quant", mla_quant_cases, PROVIDERS, metric="gbps",
               description="DeepSeek MLA: RoPE of q's and the new latent row's rope parts and fp8 e4m3 quantization "
                           "of all four parts (mla_rope_quantize_fp8; rope 64, latent 512, bf16 in)", **STEADY))
register(Suite("small_ops_launch", launch_cases,
               PROVIDERS + [Provider("flashtile_triton_launch", _flashtile_triton_launch)], metric="gbps",
               description=f"host cost: each time is {LAUNCH_CALLS} back-to-back eager calls at batch 1 "
                           f"(no CUDA graph); divide by {LAUNCH_CALLS} for µs per call"))
