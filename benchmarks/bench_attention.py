"""Single-request attention: suites ``single_decode`` (GB/s) and ``single_prefill`` (TFLOP/s).

Cases follow ANCHORS.md. Inputs are NHD (q ``[num_qo_heads, head_dim]`` for decode,
``[qo_len, num_qo_heads, head_dim]`` for prefill; k/v ``[kv_len, num_kv_heads, head_dim]``), random
normal. Every provider returns its output in that layout (a view) so the harness can compare them.
Baselines that want ``[1, H, L, D]`` get contiguous copies made outside the timed region.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from .harness import Case, Knob, Provider, Suite, Tune, Unavailable, device, grid, import_flashinfer, register

# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


def _case(kind: str, qo_len: int, kv_len: int, hq: int, hkv: int, d: int, dtype: str, causal: bool) -> Case:
    es = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    q_and_o = 2 * qo_len * hq * d
    kv = 2 * kv_len * hkv * d
    if causal:  # bottom-right aligned: query i sees kv_len - qo_len + i + 1 keys
        pairs = qo_len * kv_len - qo_len * (qo_len - 1) // 2
    else:
        pairs = qo_len * kv_len
    if kind == "decode":
        name = f"kv{kv_len} h{hq}/{hkv} d{d} {dtype}"
    else:
        name = f"{'causal' if causal else 'full'} {qo_len} h{hq}/{hkv} d{d} {dtype}"
    params = dict(kind=kind, qo_len=qo_len, kv_len=kv_len, num_qo_heads=hq, num_kv_heads=hkv, head_dim=d,
                  dtype=dtype, causal=causal, kv_layout="NHD")
    return Case(name, params, flops=4.0 * hq * d * pairs, bytes=float(es * (q_and_o + kv)))


def decode_cases(smoke: bool):
    if smoke:
        return [_case("decode", 1, 64, 4, 2, 64, "bfloat16", False), _case("decode", 1, 64, 2, 2, 64, "float16", False)]
    cases = [_case("decode", 1, n, 32, 8, 128, "bfloat16", False) for n in (1024, 4096, 32768, 131072)]
    cases += [_case("decode", 1, 32768, 32, 8, d, "bfloat16", False) for d in (64, 256)]
    return cases + [_case("decode", 1, 32768, 32, 8, 128, "float16", False)]


def prefill_cases(smoke: bool):
    def c(n, hq, hkv, d=128, dtype="bfloat16", causal=True):
        return _case("prefill", n, n, hq, hkv, d, dtype, causal)

    if smoke:
        return [c(64, 4, 2, 64), c(64, 2, 2, 64, causal=False), c(64, 2, 2, 64, "float16")]
    return [
        c(4096, 32, 32), c(16384, 32, 32), c(8192, 32, 8), c(16384, 32, 32, causal=False),
        c(8192, 32, 32, d=64), c(8192, 32, 32, d=256), c(8192, 32, 32, dtype="float16"),
    ]


# ---------------------------------------------------------------------------------------------
# Inputs and layouts
# ---------------------------------------------------------------------------------------------


def _inputs(case: Case):
    """q, k, v in the flashtile/FlashInfer NHD layout (decode q has no token dimension)."""
    p = case.params
    kw = dict(dtype=getattr(torch, p["dtype"]), device=device())
    q = torch.randn(p["qo_len"], p["num_qo_heads"], p["head_dim"], **kw)
    if p["kind"] == "decode":
        q = q[0]
    k = torch.randn(p["kv_len"], p["num_kv_heads"], p["head_dim"], **kw)
    v = torch.randn(p["kv_len"], p["num_kv_heads"], p["head_dim"], **kw)
    return q, k, v


def _bhld(x: torch.Tensor) -> torch.Tensor:
    """NHD ``[L, H, D]`` (or decode q ``[H, D]``) -> contiguous ``[1, H, L, D]``."""
    if x.dim() == 2:
        x = x.unsqueeze(0)
    return x.transpose(0, 1).unsqueeze(0).contiguous()


def _from_bhld(case: Case):
    """Returns a view from ``[1, H, L, D]`` back to the case's output layout."""
    if case.params["kind"] == "decode":
        return lambda o: o[0, :, 0, :]
    return lambda o: o[0].transpose(0, 1)


# ---------------------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------------------


def _flashtile(case: Case):
    import flashtile

    p = case.params
    name = f"single_{p['kind']}_with_kv_cache"
    op = getattr(flashtile, name, None)
    if op is None:
        raise Unavailable(f"flashtile.{name} does not exist yet")
    q, k, v = _inputs(case)
    if p["kind"] == "decode":
        return lambda: op(q, k, v, kv_layout="NHD")
    return _routed(None, lambda: op(q, k, v, causal=p["causal"], kv_layout="NHD"))


def _routed(route, run):
    """``run`` with single prefill's route (flashtile/_core/single_batch.py) forced to ``route`` (None: the
    default choice), called once here so that planning and recording stay outside the timed region."""
    from flashtile._core.single_batch import set_route_override

    def call():
        set_route_override(route)  # an identity check unless another provider's route ran last
        return run()

    call()
    return call


def _flashtile_route(as_batch: bool):
    """flashtile's single prefill with the route forced: as a ragged batch of one through the batch prefill
    launcher (the Hopper kernel where it applies, else the Triton batch kernel), or through the
    single-request kernel."""

    def make(case: Case):
        if case.params["kind"] != "prefill":
            raise Unavailable("a prefill route")
        p = case.params
        q, k, v = _inputs(case)
        import flashtile

        return _routed(as_batch, lambda: flashtile.single_prefill_with_kv_cache(q, k, v, causal=p["causal"],
                                                                                kv_layout="NHD"))

    return make


def _flashinfer(backend: str):
    def make(case: Case):
        flashinfer = import_flashinfer()
        p = case.params
        q, k, v = _inputs(case)
        if p["kind"] == "decode":
            if backend == "fa3":
                raise Unavailable("fa3 is a prefill backend")
            return lambda: flashinfer.single_decode_with_kv_cache(q, k, v, kv_layout="NHD")
        causal = p["causal"]
        return lambda: flashinfer.single_prefill_with_kv_cache(q, k, v, causal=causal, kv_layout="NHD", backend=backend)

    return make


def _sdpa(backend_name: str):
    def make(case: Case):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)
        if backend_name == "CUDNN_ATTENTION" and device().type != "cuda":
            raise Unavailable("cuDNN attention needs CUDA")
        p = case.params
        q, k, v = (_bhld(x) for x in _inputs(case))
        gqa = p["num_qo_heads"] != p["num_kv_heads"]
        causal = p["causal"]  # qo_len == kv_len in these cases, so top-left == bottom-right
        out = _from_bhld(case)

        def call(k_, v_, enable_gqa):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k_, v_, is_causal=causal, enable_gqa=enable_gqa)

        note = None
        try:
            call(k, v, gqa)
        except RuntimeError as e:
            if not gqa:
                raise Unavailable(f"{backend_name}: {' '.join(str(e).split())[:200]}") from e
            group = p["num_qo_heads"] // p["num_kv_heads"]
            k, v = (x.repeat_interleave(group, dim=1) for x in (k, v))
            gqa, note = False, "GQA via repeat_interleave of K/V (enable_gqa unsupported by this backend)"
            try:
                call(k, v, False)
            except RuntimeError as e2:
                raise Unavailable(f"{backend_name}: {' '.join(str(e2).split())[:200]}") from e2
        return (lambda: out(call(k, v, gqa))), note

    return make


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    for knob in ("recompile_limit", "cache_size_limit"):  # one compile per case shape
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
    return torch.compile(flex_attention, dynamic=False)


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _flex(case: Case):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    p = case.params
    q, k, v = (_bhld(x) for x in _inputs(case))
    note = None
    if device().type == "cuda":
        flex = _compiled_flex()
    else:  # compiling flex for CPU takes ~30 s; eager still checks the call
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        flex, note = flex_attention, "eager (uncompiled) on CPU"
    mask = None
    if p["causal"]:
        mask = create_block_mask(_causal, None, None, p["qo_len"], p["kv_len"], device=device())
    gqa = p["num_qo_heads"] != p["num_kv_heads"]
    out = _from_bhld(case)
    return (lambda: out(flex(q, k, v, block_mask=mask, enable_gqa=gqa))), note


PROVIDERS = [
    Provider("flashtile", _flashtile),
    Provider("flashtile_single_route", _flashtile_route(False), baseline=False),
    Provider("flashtile_batch_route", _flashtile_route(True), baseline=False),
    Provider("flashinfer", _flashinfer("fa2")),
    Provider("flashinfer_fa3", _flashinfer("fa3")),
    Provider("torch_sdpa_flash", _sdpa("FLASH_ATTENTION")),
    Provider("torch_sdpa_cudnn", _sdpa("CUDNN_ATTENTION")),
    Provider("flex_attention", _flex),
]

# ---------------------------------------------------------------------------------------------
# Tuning grids (--tune): the single-prefill config table (flashtile/kernels/attention.py), the single decode
# tile and the split-KV planner's knobs (_core/decode_tune.py, scheduler/split_kv.py, _core/tile_policy.py)
# ---------------------------------------------------------------------------------------------


def _padded_head_dim(case: Case) -> int:
    return max(16, 1 << (case.params["head_dim"] - 1).bit_length())


def _config_grid(kind: str, candidates):
    """Settings that replace the config table's entry for the case's shape class."""
    from flashtile.kernels.attention import LaunchConfig

    def settings(case: Case):
        knob = Knob("flashtile.kernels.attention", "_CONFIG_TABLE", (kind, _padded_head_dim(case)))
        return [{knob: LaunchConfig(*c)} for c in candidates(_padded_head_dim(case))]

    return settings


def _decode_grid(case: Case):
    """The single decode kernel's tile (flashtile/_core/decode_tune.py's DecodeTile, the card's table entry
    for the case's padded head dim)."""
    from flashtile._core.decode_tune import DecodeTile

    knob = Knob("flashtile._core.decode_tune", "SINGLE_DECODE_OVERRIDE")
    return [{knob: DecodeTile(g["bn"], g["warps"], g["stages"])}
            for g in grid(bn=(64, 128), warps=(4, 8), stages=(2, 3, 4))]


def _prefill_configs(d: int):
    if d <= 64:
        return [(128, g["bn"], g["warps"], g["stages"]) for g in grid(bn=(64, 128), warps=(4, 8), stages=(2, 3))]
    if d == 128:
        tiles = ((128, 64), (128, 128), (64, 64))
        return [(bm, bn, 8, st) for bm, bn in tiles for st in (2, 3, 4)] + [(128, 64, 4, 3)]
    return [(bm, bn, w, 2) for bm, bn in ((64, 32), (64, 64), (128, 32)) for w in (4, 8)]


ALIGN = Knob("flashtile._core.tile_policy", "KV_CHUNK_ALIGN")
PER_SM = Knob("flashtile._core.decode_tune", "PROGRAMS_PER_SM_OVERRIDE")  # the card's target otherwise
MIN_TILES = Knob("flashtile.scheduler.split_kv", "MIN_CHUNK_TILES")
SPLIT_GRID = [{ALIGN: g["align"], PER_SM: g["per_sm"], MIN_TILES: g["min_tiles"]}
              for g in grid(align=(128, 256), per_sm=(2, 3, 4, 6, 8, 12), min_tiles=(1, 2))]

register(Suite("single_decode", decode_cases, PROVIDERS, metric="gbps",
               description="one request, one query token, NHD KV; bytes = K + V + q + o",
               tunes={"config": Tune(_decode_grid, cuda_graph="on",
                                     description="the decode kernel's BLOCK_N x warps x stages"),
                      "splits": Tune(lambda case: SPLIT_GRID, cuda_graph="on",
                                     description="split-KV chunk alignment x programs per SM x min tiles per split")}))
register(Suite("single_prefill", prefill_cases, PROVIDERS, metric="tflops",
               description="one request, qo_len = kv_len; causal flops = 4·h·d·(sq·skv − sq(sq−1)/2)",
               tunes={"config": Tune(_config_grid("prefill", _prefill_configs),
                                     description="the prefill kernel's tile x warps x stages per head dim")}))
