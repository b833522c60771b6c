"""Cascade merge operators: suite ``merge_state`` (GB/s).

Cases (ANCHORS.md small-ops table, issue 7): ``merge_state`` of two states of 8192 tokens x 32 heads
x head_dim 128 in float16 (FlashInfer: 69.0 µs, 2920 GB/s), ``merge_states`` of 4 states of the same
shape, and ``merge_state_in_place`` of the same two states. Bytes = every v and s read plus every v
and s written, once (float16 v, float32 s). FlashInfer's 2920 GB/s counts the v tensors only
(3 x 8192 x 32 x 128 x 2 B = 201 MB in 69.0 µs); with the s tensors (3 MB more) the same time is
2963 GB/s here, so compare the times.

Providers get identical inputs (the harness seeds before each); the out-of-place ops return the
merged v, which the harness compares across providers. The in-place op returns nothing (repeated
timing calls keep merging into the same v and s, which stay finite: s grows by at most 1 per call).
- ``flashtile``: ``flashtile.cascade.merge_state`` / ``merge_states`` / ``merge_state_in_place``;
- ``flashinfer``: the same functions of ``flashinfer.cascade`` when FlashInfer is importable (CUDA);
- ``torch_eager``: flashtile's pure-PyTorch reference path (``flashtile/reference/merge.py``: max,
  exp2, weighted sum, log2 as eager torch ops) into preallocated outputs;
- ``torch_compile``: the same functions under ``torch.compile`` (CUDA only).
"""

from __future__ import annotations

import types

import torch

from .harness import Case, Knob, Provider, Suite, Tune, Unavailable, device, grid, import_flashinfer, register


def _case(op: str, seq_len: int, num_heads: int, head_dim: int, num_states: int = 2, dtype: str = "float16") -> Case:
    es = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    rows = seq_len * num_heads
    read = rows * num_states * (head_dim * es + 4)  # every state's v and s
    written = rows * (head_dim * es + 4)  # merged v and s
    shape = f"{seq_len} x {num_states} states x {num_heads} heads x {head_dim}" if op == "merge_states" else (
        f"{seq_len} x {num_heads} heads x {head_dim}")
    return Case(f"{op} {shape}", dict(op=op, seq_len=seq_len, num_states=num_states, num_heads=num_heads,
                                      head_dim=head_dim, dtype=dtype), bytes=float(read + written))


def merge_cases(smoke: bool):
    t, h, d = (16, 4, 64) if smoke else (8192, 32, 128)
    return [_case("merge_state", t, h, d), _case("merge_states", t, h, d, num_states=4),
            _case("merge_state_in_place", t, h, d)]


def _inputs(case: Case):
    """v [T, S, H, D] (the states of merge_states; merge_state uses two separate contiguous copies of
    the first two), s [T, S, H] float32 base-2 LSEs."""
    p = case.params
    t, n, h, d = p["seq_len"], p["num_states"], p["num_heads"], p["head_dim"]
    v = torch.randn(t, n, h, d, dtype=getattr(torch, p["dtype"]), device=device())
    s = torch.randn(t, n, h, dtype=torch.float32, device=device()) * 4
    return v, s


def _calls(case: Case, api=None, reference=None):
    """A zero-argument call of the case's op: through ``api`` (a module with the three public
    functions: flashtile.cascade, flashinfer.cascade), or through ``reference`` (a namespace with the
    destination-passing ``merge_state_pair`` and ``merge_states_by_token`` of reference/merge.py)
    into outputs allocated here."""
    v, s = _inputs(case)
    op = case.params["op"]
    if op == "merge_states":
        if api is not None:
            return lambda: api.merge_states(v, s)[0]
        out_v, out_s = torch.empty_like(v[:, 0]), torch.empty_like(s[:, 0])

        def merge_states():
            reference.merge_states_by_token(v, s, out_v, out_s)
            return out_v

        return merge_states
    v_a, s_a, v_b, s_b = v[:, 0].contiguous(), s[:, 0].contiguous(), v[:, 1].contiguous(), s[:, 1].contiguous()
    v = s = None  # free the stacked states: the pair ops read their own copies
    if op == "merge_state":
        if api is not None:
            return lambda: api.merge_state(v_a, s_a, v_b, s_b)[0]
        out_v, out_s = torch.empty_like(v_a), torch.empty_like(s_a)

        def merge_state():
            reference.merge_state_pair(v_a, s_a, v_b, s_b, out_v, out_s)
            return out_v

        return merge_state

    def merge_state_in_place():  # returns None: the harness does not compare in-place results
        if api is not None:
            api.merge_state_in_place(v_a, s_a, v_b, s_b)
        else:
            reference.merge_state_pair(v_a, s_a, v_b, s_b, v_a, s_a)

    return merge_state_in_place


def _flashtile(case: Case):
    import flashtile.cascade

    return _calls(case, api=flashtile.cascade)


def _flashinfer(case: Case):
    return _calls(case, api=import_flashinfer("cascade").cascade)


def _torch(compiled: bool):
    def make(case: Case):
        from flashtile.reference import merge

        if not compiled:
            return _calls(case, reference=merge)
        if device().type != "cuda":
            raise Unavailable("torch.compile baseline is timed on CUDA only")
        fns = types.SimpleNamespace(
            merge_state_pair=torch.compile(merge.merge_state_pair, dynamic=False),
            merge_states_by_token=torch.compile(merge.merge_states_by_token, dynamic=False),
        )
        return _calls(case, reference=fns)

    return make


PROVIDERS = [
    Provider("flashtile", _flashtile),
    Provider("flashinfer", _flashinfer),
    Provider("torch_eager", _torch(compiled=False)),
    Provider("torch_compile", _torch(compiled=True)),
]

# The row-tiled merges' launch: elements per state tile x warps (flashtile/kernels/merge.py).
MERGE_TILE = Knob("flashtile.kernels.merge", "ROW_TILE_ELEMS")
MERGE_WARPS = Knob("flashtile.kernels.merge", "PAIR_WARPS")
MERGE_GRID = [{MERGE_TILE: g["elems"], MERGE_WARPS: g["warps"]}
              for g in grid(elems=(2048, 4096, 8192, 16384), warps=(2, 4, 8))]

register(Suite("merge_state", merge_cases, PROVIDERS, metric="gbps",
               description="merge attention states (base-2 LSE), float16 v / float32 s; bytes = every v and s "
                           "read + merged v and s written",
               tunes={"launch": Tune(lambda case: MERGE_GRID, cuda_graph="on",
                                     description="elements per state tile x warps of the row-tiled merges")}))


# ---------------------------------------------------------------------------------------------
# Cascade decode: a shared prefix read once for the batch, against plain batch decode
# ---------------------------------------------------------------------------------------------
# Every request has the shared prefix (its pages appear in every request's page table, as with
# prefix caching) followed by ``unique`` tokens of its own. GB/s counts the *logical* KV of all
# requests (B x (prefix + unique) tokens), so it is an effective bandwidth and the time ratio is the
# speedup of reading the prefix once.


def _cascade_case(batch: int, prefix: int, unique: int, hq: int = 32, hkv: int = 8, d: int = 128) -> Case:
    kv_bytes = 2 * batch * (prefix + unique) * hkv * d * 2
    params = dict(batch=batch, prefix=prefix, unique=unique, num_qo_heads=hq, num_kv_heads=hkv, head_dim=d,
                  page_size=16)
    return Case(f"b{batch} prefix {prefix} + {unique}", params, bytes=float(kv_bytes))


def cascade_cases(smoke: bool):
    if smoke:
        return [_cascade_case(4, 64, 16, 4, 2, 64)]
    return [_cascade_case(b, p, 256) for b in (64, 128) for p in (1024, 4096, 16384, 32768)]


def _cascade_inputs(case: Case):
    """q [B, Hq, D], a page-16 cache holding the prefix once and each request's unique pages, and the
    page tables: level 0 (the prefix, one group), level 1 (unique parts), and the full per-request
    tables (prefix pages then unique pages) that plain batch decode reads."""
    p = case.params
    dev = device()
    ps, b = p["page_size"], p["batch"]
    prefix_pages, unique_pages = -(-p["prefix"] // ps), -(-p["unique"] // ps)
    total = prefix_pages + b * unique_pages
    cache = torch.randn(total, 2, ps, p["num_kv_heads"], p["head_dim"], dtype=torch.bfloat16, device=dev)
    perm = torch.randperm(total, dtype=torch.int32)
    prefix_ids, unique_ids = perm[:prefix_pages], perm[prefix_pages:].view(b, unique_pages)
    q = torch.randn(b, p["num_qo_heads"], p["head_dim"], dtype=torch.bfloat16, device=dev)

    def last(n):
        return n - (-(-n // ps) - 1) * ps

    i32 = dict(dtype=torch.int32)
    levels = [
        (torch.tensor([0, b], **i32), torch.tensor([0, prefix_pages], **i32), prefix_ids,
         torch.tensor([last(p["prefix"])], **i32)),
        (torch.arange(b + 1, **i32), torch.arange(0, b * unique_pages + 1, unique_pages, **i32),
         unique_ids.reshape(-1), torch.full((b,), last(p["unique"]), **i32)),
    ]
    full_ids = torch.cat([prefix_ids.expand(b, prefix_pages), unique_ids], dim=1).reshape(-1)
    full = (torch.arange(0, b * (prefix_pages + unique_pages) + 1, prefix_pages + unique_pages, **i32), full_ids,
            torch.full((b,), last(p["unique"]), **i32))
    if p["prefix"] % ps:
        raise ValueError("prefix must be a whole number of pages (plain decode concatenates page lists)")
    return q, cache, levels, full


def _cascade_provider(lib_name: str, plain: bool):
    def make(case: Case):
        if lib_name == "flashinfer":
            lib = import_flashinfer()
        else:
            import flashtile as lib
        p = case.params
        q, cache, levels, full = _cascade_inputs(case)
        ws = torch.empty(128 << 20, dtype=torch.uint8, device=device())
        hq, hk, d, ps = p["num_qo_heads"], p["num_kv_heads"], p["head_dim"], p["page_size"]
        if plain:
            w = lib.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
            w.plan(*(x.to(device()) if lib_name == "flashinfer" else x for x in full), hq, hk, d, ps,
                   q_data_type=q.dtype)
            return lambda: w.run(q, cache)
        w = lib.MultiLevelCascadeAttentionWrapper(2, ws, "NHD")
        dev = device() if lib_name == "flashinfer" else "cpu"
        w.plan([lv[0].to(dev) for lv in levels], [lv[1].to(dev) for lv in levels], [lv[2].to(dev) for lv in levels],
               [lv[3].to(dev) for lv in levels], hq, hk, d, ps, q_data_type=q.dtype)
        return lambda: w.run(q, cache)

    return make


register(Suite("cascade_decode", cascade_cases, [
    Provider("flashtile", _cascade_provider("flashtile", plain=False)),
    Provider("flashtile_batch_decode", _cascade_provider("flashtile", plain=True)),
    Provider("flashinfer_cascade", _cascade_provider("flashinfer", plain=False)),
    Provider("flashinfer_batch_decode", _cascade_provider("flashinfer", plain=True)),
], metric="gbps", description="decode with a shared prefix (2-level cascade) against plain batch decode over the "
                              "full sequences; 32/8 heads, d128, page 16, bf16; GB/s of the logical KV "
                              "(B x (prefix + unique)), so the time ratio is the speedup"))
