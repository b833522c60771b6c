"""Replayed launches pass the compiled kernel what a computed launch passes (run by tests/test_launch.py
in a subprocess: it needs Triton's compiled-kernel path, so no TRITON_INTERPRET, on CPU tensors).

CPU tensors take the compiled-kernel path with a stand-in compiled kernel whose launcher records its
arguments (as ``benchmarks/tools/host_time.py --dry`` does). For each memoized op: a first call records the
launch under the call's key; a second call with other tensors of the same metadata is replayed; the
same second call with the memos off is launched from the launcher's own computation (through the
direct-launch cache). The two recorded argument lists must agree: the inputs' addresses, every
integer, float and flag, and the metadata of the outputs each call allocates afresh.
"""

import sys

import torch

from flashtile._core import device, dispatch, launch

RECORDS = []


class _Compiled:
    function, packed_metadata = "function", "metadata"

    @staticmethod
    def run(*args):
        RECORDS.append(args)

    @staticmethod
    def launch_metadata(*args):
        return None


class _Driver:
    @staticmethod
    def get_current_device():
        return 0

    @staticmethod
    def get_current_stream(device=None):
        return 77


def _enter_compiled_cpu_mode() -> None:
    dispatch.KERNEL_DEVICE_TYPES = ("cuda", "cpu")
    dispatch._MODULES.clear()
    device.TARGET_OVERRIDE = (232448, (9, 0))
    launch._state.update(enabled=True, memo=True, check=False, driver=_Driver(),
                         current_device=_Driver.get_current_device)
    launch._first_launch = lambda fn, grid, args, kwargs: _Compiled()


def _normalized(args, inputs) -> list:
    """Tensors given as inputs by address; tensors allocated by the call by element count and dtype (a launch
    passes only the address: a replay may hand over another view of an output, e.g. single decode's output
    without the query axis the checked path adds); tuples (a variant's extra arguments) element by element."""
    known = {t.data_ptr() for t in inputs}
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(("input", a.data_ptr()) if a.data_ptr() in known else ("new", a.numel(), a.dtype))
        elif type(a) is tuple:
            out.append(tuple(_normalized(a, inputs)))
        else:
            out.append(a)
    return out


def _check(name, make_inputs, call, wrapper=None, replays=None) -> None:
    """``wrapper``: ``call`` runs this batch wrapper, whose run() memo must replay the second call (counted),
    and is emptied for the third, which is then computed; ``replays``: the same for a memo given as a function
    returning its dict (the single-request functions'); neither: the launch memos are turned off for it."""
    if wrapper is not None:
        replays = lambda: wrapper._plan.replays  # noqa: E731
    first, second = make_inputs(), make_inputs()
    if replays is not None:
        replays().clear()
    call(*first)
    RECORDS.clear()
    hits = []
    if replays is not None:
        memo = replays()
        assert len(memo) == 1, f"{name}: the first call recorded {len(memo)} replays"
        ((key, runner),) = memo.items()
        memo[key] = lambda *a, **k: (hits.append(1), runner(*a, **k))[1]
    call(*second)
    assert replays is None or hits, f"{name}: the second call was not replayed"
    replayed = list(RECORDS)
    RECORDS.clear()
    launch._state["memo"] = replays is not None
    if replays is not None:
        replays().clear()
    try:
        call(*second)
    finally:
        launch._state["memo"] = True
    computed = list(RECORDS)
    RECORDS.clear()
    inputs = [t for t in second if isinstance(t, torch.Tensor)]
    assert replayed, f"{name}: nothing was replayed"
    assert len(replayed) == len(computed), f"{name}: {len(replayed)} replayed launches, {len(computed)} computed"
    for r, c in zip(replayed, computed):
        r, c = _normalized(r, inputs), _normalized(c, inputs)
        assert r == c, f"{name}: replayed launch\n  {r}\ncomputed launch\n  {c}"
    print(f"ok {name}")


def main() -> int:
    _enter_compiled_cpu_mode()
    import flashtile

    bf = torch.bfloat16

    def randn(*shape, dtype=bf):
        return torch.randn(*shape, dtype=dtype)

    _check("rmsnorm", lambda: (randn(3, 256), randn(256)), lambda x, w: flashtile.rmsnorm(x, w, 1e-5))
    _check("gemma_rmsnorm out=", lambda: (randn(2, 4, 64), randn(64), randn(2, 4, 64)),
           lambda x, w, o: flashtile.gemma_rmsnorm(x, w, 1e-6, out=o))
    _check("fused_add_rmsnorm", lambda: (randn(3, 256), randn(3, 256), randn(256)),
           lambda x, r, w: flashtile.fused_add_rmsnorm(x, r, w, 1e-6))
    _check("layernorm", lambda: (randn(5, 128), randn(128, dtype=torch.float32), randn(128, dtype=torch.float32)),
           lambda x, g, b: flashtile.layernorm(x, g, b, 1e-5))
    _check("silu_and_mul", lambda: (randn(4, 2 * 96),), lambda x: flashtile.silu_and_mul(x))
    cache = torch.randn(64, 64)
    positions = torch.randint(0, 64, (5,))
    _check("rope cos/sin cache in place", lambda: (positions, randn(5, 4 * 128), randn(5, 2 * 128), cache),
           lambda p, q, k, c: flashtile.apply_rope_with_cos_sin_cache_inplace(p, q, k, 128, c, False))
    _check("rope cos/sin cache", lambda: (positions, randn(5, 4, 128), randn(5, 2, 128), cache),
           lambda p, q, k, c: flashtile.apply_rope_with_cos_sin_cache(p, q, k, 128, c))
    _check("rope pos_ids", lambda: (randn(5, 4, 64), randn(5, 1, 64), positions),
           lambda q, k, p: flashtile.apply_rope_pos_ids(q, k, p, rotary_dim=32))
    _check("merge_state", lambda: (randn(6, 4, 64), randn(6, 4, dtype=torch.float32), randn(6, 4, 64),
                                   randn(6, 4, dtype=torch.float16)),
           lambda va, sa, vb, sb: flashtile.merge_state(va, sa, vb, sb))
    _check("merge_state_in_place", lambda: (randn(6, 4, 64), randn(6, 4, dtype=torch.float32), randn(6, 4, 64),
                                            randn(6, 4, dtype=torch.float32), torch.rand(6) > 0.5),
           lambda v, s, vo, so, m: flashtile.merge_state_in_place(v, s, vo, so, m))
    probs = lambda *shape: (torch.softmax(torch.randn(*shape), -1),)  # noqa: E731
    _check("top_p split", lambda: probs(1, 3000),
           lambda p: flashtile.top_p_sampling_from_probs(p, 0.9, seed=11, offset=4))
    _check("top_p rows", lambda: probs(6, 3000),
           lambda p: flashtile.top_p_sampling_from_probs(p, 0.8, seed=2**40, offset=2**33))
    _check("top_k_top_p tensors", lambda: (*probs(3, 500), torch.full((3,), 7), torch.full((3,), 0.7),
                                           torch.tensor([5]), torch.tensor([64])),
           lambda p, k, tp, s, o: flashtile.top_k_top_p_sampling_from_probs(p, k, tp, filter_apply_order="joint",
                                                                            seed=s, offset=o))
    _check("min_p indices", lambda: (*probs(2, 300), torch.tensor([0, 1, 1, 0], dtype=torch.int32)),
           lambda p, i: flashtile.min_p_sampling_from_probs(p, 0.1, indices=i, seed=3, offset=0))
    _check_wrappers()
    return 0


def _check_wrappers() -> None:
    """Batch attention run()s with an attention variant's extra arguments or ``sinks=``: the replay passes this
    call's tensors and scalars (one float differs between the calls, as does the extra tensor)."""
    import triton
    import triton.language as tl

    import flashtile

    @triton.jit
    def scaled_logits(qk, sm_scale, batch, qo_idx, kv_idx, qo_head, kv_head, qo_len, kv_len, args):
        return qk * sm_scale * tl.load(args[0] + qo_head) + args[1] + args[2]

    variant = flashtile.AttentionVariant("scaled", logits_transform=scaled_logits,
                                         tensors=[("head_scale", torch.float32)],
                                         scalars=[("bias", torch.float32), ("shift", torch.int32)])
    bf, hq, hk, d, page = torch.bfloat16, 4, 2, 64, 16
    lens = [5, 40, 17]
    ws = torch.empty(32 << 20, dtype=torch.uint8)
    pages = [-(-n // page) for n in lens]
    indptr = torch.tensor([0] + list(torch.tensor(pages).cumsum(0)), dtype=torch.int32)
    indices = torch.randperm(sum(pages), dtype=torch.int32)
    last = torch.tensor([n - (p - 1) * page for n, p in zip(lens, pages)], dtype=torch.int32)

    def decode_inputs():
        return (torch.randn(len(lens), hq, d, dtype=bf), torch.randn(sum(pages), 2, page, hk, d, dtype=bf),
                torch.rand(hq), float(torch.rand(())), torch.randn(hq))

    for name, jit, run in (
        ("batch decode variant", variant, lambda w, q, c, s, b, sinks: w.run(q, c, s, b, 7)),
        ("batch decode sinks", None, lambda w, q, c, s, b, sinks: w.run(q, c, sinks=sinks)),
    ):
        w = flashtile.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", jit_args=jit)
        w.plan(indptr, indices, last, hq, hk, d, page, q_data_type=bf)
        _check(name, decode_inputs, lambda *a, w=w, run=run: run(w, *a), wrapper=w)

    qo_lens = [3, 1, 9]
    qo_indptr = torch.tensor([0] + list(torch.tensor(qo_lens).cumsum(0)), dtype=torch.int32)
    kv_indptr = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)

    def ragged_inputs():
        return (torch.randn(sum(qo_lens), hq, d, dtype=bf), torch.randn(sum(lens), hk, d, dtype=bf),
                torch.randn(sum(lens), hk, d, dtype=bf), torch.rand(hq), float(torch.rand(())))

    # the single-request functions: a variant with a tensor and two scalars, and sinks
    from flashtile._core import single

    def single_inputs(qo_len):
        return lambda: (torch.randn(qo_len, hq, d, dtype=bf), torch.randn(50, hk, d, dtype=bf),
                        torch.randn(50, hk, d, dtype=bf), torch.rand(hq), float(torch.rand(())), torch.randn(hq))

    decode, prefill = flashtile.single_decode_with_kv_cache, flashtile.single_prefill_with_kv_cache
    memo = lambda: single._REPLAYS  # noqa: E731
    _check("single decode variant", single_inputs(1),
           lambda q, k, v, s, b, sinks: decode(q[0], k, v, _variant=(variant, (s, b, 7))), replays=memo)
    _check("single decode sinks", single_inputs(1), lambda q, k, v, s, b, sinks: decode(q[0], k, v, sinks=sinks),
           replays=memo)
    _check("single prefill variant", single_inputs(9),
           lambda q, k, v, s, b, sinks: prefill(q, k, v, causal=True, _variant=(variant, (s, b, 7))), replays=memo)

    w = flashtile.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", jit_args=variant)
    w.plan(qo_indptr, kv_indptr, hq, hk, d, causal=True, q_data_type=bf)
    _check("batch prefill ragged variant", ragged_inputs, lambda q, k, v, s, b: w.run(q, k, v, s, b, 7),
           wrapper=w)

    # MLA (latent 64 + rope 16 here): two requests of one and two query tokens, one of them split
    heads, dc, dp, mla_page = 4, 64, 16, 16
    mla_lens = [40, 300]
    mla_pages = [-(-n // mla_page) for n in mla_lens]
    mla_qo = torch.tensor([0, 1, 3], dtype=torch.int32)
    mla_kvp = torch.tensor([0] + list(torch.tensor(mla_pages).cumsum(0)), dtype=torch.int32)
    mla_idx = torch.randperm(sum(mla_pages), dtype=torch.int32)

    def mla_inputs():
        pool = torch.randn(sum(mla_pages), mla_page, dc + dp, dtype=bf)
        return (torch.randn(3, heads, dc, dtype=bf), torch.randn(3, heads, dp, dtype=bf), pool[..., :dc],
                pool[..., dc:], torch.empty(3, heads, dc, dtype=bf), torch.randn(heads))

    for name, run in (
        ("mla", lambda w, qn, qp, c, k, o, s: w.run(qn, qp, c, k)),
        ("mla out= return_lse", lambda w, qn, qp, c, k, o, s: w.run(qn, qp, c, k, out=o, return_lse=True)),
        ("mla sinks", lambda w, qn, qp, c, k, o, s: w.run(qn, qp, c, k, sinks=s)),
    ):
        w = flashtile.mla.BatchMLAPagedAttentionWrapper(ws)
        w.plan(mla_qo, mla_kvp, mla_idx, torch.tensor(mla_lens, dtype=torch.int32), heads, dc, dp, mla_page, True,
               0.1, bf, bf, fixed_split_size=128)
        _check(name, mla_inputs, lambda *a, w=w, run=run: run(w, *a), wrapper=w)


if __name__ == "__main__":
    sys.exit(main())
