"""FP8 prefill attention (issue 31 item 4): suite ``fp8_prefill`` (TFLOP/s).

Cases: one causal request of 8192 and of 16384 tokens, 32 query / 8 KV heads, head_dim 128 (the issue's
cases), and a ragged batch of 16 causal 1024-token requests (the batch kernel). Inputs: the same randn for
every provider (the harness reseeds), quantized per head to float8_e4m3fn with float32 scales for the fp8
providers, as bfloat16 for the bf16 ones; outputs bfloat16, so ``max_abs_diff`` shows the fp8 error
against the first provider (flashtile fp8). FLOPs count the visible (causal) query-key pairs.

Providers:
- ``flashtile``: fp8 q, k, v (V handed to the kernel transposed: kernels/attention.py FP8_TRANSPOSE_V, and
  kernels/batch_prefill.py ragged_fp8_v_layout for the ragged batch, which runs the warp-specialized Gluon
  kernel on Hopper);
- ``flashtile_fp8_v_as_given``: the same with FP8_TRANSPOSE_V off (V tiles transposed on chip); a variant of
  ours, not a baseline;
- ``flashtile_fp8_triton``: the ragged batch in fp8 on the Triton kernel (FLASHTILE_HOPPER_FP8=0's path, V from
  the same transposed copy); a variant of ours, not a baseline;
- ``flashtile_bf16``: flashtile's bf16 prefill of the unquantized inputs (single: the Triton kernel;
  ragged: the wrapper, i.e. the Gluon kernel on an H100);
- ``flashinfer_fa3_fp8``: FlashInfer's fp8 path (backend "fa3": single_prefill_with_kv_cache with
  scale_q/k/v and o_dtype; the ragged wrapper planned with fp8 q/kv data types, scales in run's ``*args``).
"""

from __future__ import annotations

from typing import List

import torch

from .harness import Case, Knob, Provider, Suite, Tune, Unavailable, device, grid, import_flashinfer, register

E4M3 = torch.float8_e4m3fn


def _case(name: str, qo_lens: List[int], hq: int = 32, hkv: int = 8, d: int = 128) -> Case:
    pairs = sum(n * (n + 1) // 2 for n in qo_lens)  # causal, qo_len == kv_len
    tokens = sum(qo_lens)
    return Case(name, dict(qo_lens=qo_lens, num_qo_heads=hq, num_kv_heads=hkv, head_dim=d),
                flops=4.0 * hq * d * pairs, bytes=float(tokens * (hq + 2 * hkv) * d + 2 * tokens * hq * d))


def cases(smoke: bool) -> List[Case]:
    if smoke:
        return [_case("causal 64 h4/2 d64", [64], 4, 2, 64), _case("ragged 3x40 h4/2 d64", [40] * 3, 4, 2, 64)]
    return [_case("causal 8192 h32/8 d128", [8192]), _case("causal 16384 h32/8 d128", [16384]),
            _case("ragged 16x1024 h32/8 d128", [1024] * 16)]


def _quantize(x: torch.Tensor):
    scale = (x.abs().amax(dim=(0, 2)).float() / 448.0).clamp_min(1e-6)
    return (x / scale[None, :, None]).to(E4M3), scale


def _inputs(case: Case, fp8: bool):
    p = case.params
    n, dev = sum(p["qo_lens"]), device()
    q = torch.randn(n, p["num_qo_heads"], p["head_dim"], device=dev)
    k = torch.randn(n, p["num_kv_heads"], p["head_dim"], device=dev)
    v = torch.randn(n, p["num_kv_heads"], p["head_dim"], device=dev)
    if not fp8:
        return tuple(x.to(torch.bfloat16) for x in (q, k, v)), None
    (q8, sq), (k8, sk), (v8, sv) = (_quantize(x) for x in (q, k, v))
    return (q8, k8, v8), (sq, sk, sv)


def _indptr(case: Case) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(case.params["qo_lens"]).cumsum(0).tolist(), dtype=torch.int32,
                        device=device())


def _flashtile(fp8: bool, transpose_v: bool = True):
    def make(case: Case):
        import flashtile
        from flashtile.kernels import attention as A

        (q, k, v), scales = _inputs(case, fp8)
        p = case.params
        if len(p["qo_lens"]) == 1:
            def call():
                if fp8:
                    return flashtile.single_prefill_with_kv_cache(q, k, v, *scales, o_dtype=torch.bfloat16,
                                                                  causal=True)
                return flashtile.single_prefill_with_kv_cache(q, k, v, causal=True)
        else:
            w = flashtile.BatchPrefillWithRaggedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.uint8,
                                                                           device=device()))
            indptr = _indptr(case)
            dt = E4M3 if fp8 else torch.bfloat16
            w.plan(indptr, indptr, p["num_qo_heads"], p["num_kv_heads"], p["head_dim"], causal=True, q_data_type=dt,
                   kv_data_type=dt, o_data_type=torch.bfloat16)

            def call():
                return w.run(q, k, v, *scales) if fp8 else w.run(q, k, v)

        if transpose_v:
            return call

        def as_given():
            A.FP8_TRANSPOSE_V = False
            try:
                return call()
            finally:
                A.FP8_TRANSPOSE_V = True

        return as_given

    return make


def _flashtile_fp8_triton(case: Case):
    """flashtile fp8 with the ragged batch on the Triton kernel, not on the warp-specialized Gluon kernel
    (kernels/batch_prefill_hopper.py, the default on Hopper); single prefill always runs the Triton kernel."""
    from flashtile.kernels import batch_prefill_hopper as hopper

    if len(case.params["qo_lens"]) == 1:
        raise Unavailable("single prefill runs the Triton kernel: the flashtile column")
    call = _flashtile(True)(case)

    def triton_kernel():
        saved, hopper.FP8_OVERRIDE = hopper.FP8_OVERRIDE, False
        try:
            return call()
        finally:
            hopper.FP8_OVERRIDE = saved

    return triton_kernel


def _flashinfer_fp8(case: Case):
    flashinfer = import_flashinfer()
    (q, k, v), (sq, sk, sv) = _inputs(case, True)
    p = case.params
    if len(p["qo_lens"]) == 1:
        return lambda: flashinfer.single_prefill_with_kv_cache(q, k, v, sq, sk, sv, o_dtype=torch.bfloat16,
                                                               causal=True, backend="fa3")
    w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.uint8, device=device()),
                                                        "NHD", backend="fa3")
    indptr = _indptr(case)
    w.plan(indptr, indptr, p["num_qo_heads"], p["num_kv_heads"], p["head_dim"], p["head_dim"], causal=True,
           q_data_type=E4M3, kv_data_type=E4M3, o_data_type=torch.bfloat16)
    return lambda: w.run(q, k, v, sq, sk, sv)


# The fp8 single-prefill launch config (kernels/attention.py's ("prefill_fp8", 128) entry).
_A = "flashtile.kernels.attention"


def _config_grid(case: Case):
    from flashtile.kernels.attention import LaunchConfig

    configs = [LaunchConfig(128, g["n"], g["w"], g["st"]) for g in grid(n=(64, 128), w=(4, 8), st=(2, 3))]
    return [{Knob(_A, "_CONFIG_TABLE", ("prefill_fp8", 128)): c} for c in configs + [LaunchConfig(64, 64, 4, 3)]]


# The batch kernel's tile for the ragged case (tile_policy.CONFIG_OVERRIDE: block_n, warps, stages; plan() takes
# it, and the harness builds the provider under the setting): its fp8 compile spills at 128 x 32 with 4 warps.
# With 128-row tiles of 255 registers one program fills an SM, and a short prompt's tile (16 x 1024 GQA 4: about
# 576 keys, under five 128-key steps) pays its pipeline fill and epilogue with nothing to overlap them; 64-row
# tiles of 4 warps (a 64 x 128 float32 accumulator) leave room for two or three programs per SM.
_BATCH_GRID = [(128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3),
               (128, 128, 8, 2), (64, 32, 4, 3), (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 2), (64, 128, 4, 3)]


def _batch_grid(case: Case):
    from .bench_batch_prefill import CONFIG, TILE_SHAPE, FixedTile

    return [{TILE_SHAPE: FixedTile(m, n), CONFIG: (n, w, st)} for m, n, w, st in _BATCH_GRID]


register(Suite("fp8_prefill", cases,
               [Provider("flashtile", _flashtile(True)),
                Provider("flashtile_fp8_v_as_given", _flashtile(True, transpose_v=False), baseline=False),
                Provider("flashtile_fp8_triton", _flashtile_fp8_triton, baseline=False),
                Provider("flashtile_bf16", _flashtile(False)), Provider("flashinfer_fa3_fp8", _flashinfer_fp8)],
               "tflops", "FP8 prefill attention (e4m3 q/k/v, per-head scales, bf16 out), causal, 32/8 heads, d128",
               tunes={"config": Tune(_config_grid, cases=lambda case: len(case.params["qo_lens"]) == 1,
                                     description="fp8 single prefill BLOCK_M x BLOCK_N x warps x stages"),
                      "batch_tiles": Tune(_batch_grid, cases=lambda case: len(case.params["qo_lens"]) > 1,
                                          description="fp8 batch prefill BLOCK_M x BLOCK_N x warps x stages"),
                      "gluon": Tune(lambda case: [{Knob("flashtile.kernels.batch_prefill_hopper",
                                                        "FP8_P_IN_SHARED"): True}],
                                    cases=lambda case: len(case.params["qo_lens"]) > 1, rounds=3,
                                    description="the Gluon kernel's fp8 weights through shared memory "
                                                "(FP8_P_IN_SHARED) against registers")}))
