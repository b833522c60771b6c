"""A chunked-prefill engine step (issue 30): suite ``pod``.

One prefill chunk of ``chunk`` tokens on a ``prefix``-token prefix (causal, bottom-right aligned) and ``batch``
decodes of ``kv`` tokens each, fp16, heads 32/8, head_dim 128, page 16 (pages in random order). Providers:
flashtile's BatchAttention (everything paged, one plan, one launch: provider "flashtile", whose speedup column
is over the best of the others), and the same with ``split_row_classes`` (``flashtile_ba_split``: the prefill
chunk and the decodes as two plans with their own row tiles, two launches); flashtile's POD wrapper (prefill K/V
contiguous, decodes paged), with its decode launch on a side stream (``flashtile_pod``) or both launches on one
stream (``flashtile_pod_serial``); flashtile's paged batch prefill followed by its batch decode (two wrappers,
two plans, ``flashtile_2launch``); FlashInfer's POD and BatchAttention. Every provider returns the decode
outputs ``[batch, 32, 128]`` (compared with the first provider's). FLOPs: the visible (query, key) pairs of both
parts x 4 x heads x head_dim; bytes: K/V read once (prefill + decodes) plus q and o.
"""

from __future__ import annotations

import torch

from .harness import Case, Knob, Provider, Suite, Tune, device, grid, import_flashinfer, register

DTYPE = torch.float16


def _case(chunk: int, prefix: int, batch: int, kv: int, hq: int = 32, hk: int = 8, d: int = 128,
          page: int = 16) -> Case:
    name = f"chunk{chunk}+{prefix} dec{batch}x{kv} h{hq}/{hk} d{d} p{page}"
    kv_p = prefix + chunk
    visible = sum(prefix + t + 1 for t in range(chunk)) + batch * kv
    flops = 4.0 * hq * d * visible
    bytes_ = 2 * (kv_p + batch * kv) * hk * d * 2 + 2 * (chunk + batch) * hq * d * 2
    return Case(name, dict(chunk=chunk, prefix=prefix, batch=batch, kv=kv, hq=hq, hk=hk, d=d, page=page),
                flops=flops, bytes=float(bytes_))


def pod_cases(smoke: bool):
    if smoke:
        return [_case(16, 16, 4, 40, hq=4, hk=2, d=64), _case(8, 0, 2, 17, hq=4, hk=4, d=32, page=1)]
    return [_case(2048, 2048, 64, 4096), _case(2048, 2048, 256, 1024)]


class _Step:
    """The inputs of one step: a pool holding the prefill request's pages (request 0) and the decodes' pages,
    the same prefill K/V as contiguous tensors, q of both parts, and the index arrays (int32, on the device)."""

    def __init__(self, case: Case) -> None:
        p = case.params
        dev = device()
        ps, hk, d = p["page"], p["hk"], p["d"]
        self.hq, self.hk, self.d, self.page = p["hq"], hk, d, ps
        self.chunk, self.batch = p["chunk"], p["batch"]
        kv_p = p["prefix"] + p["chunk"]
        lens = [kv_p] + [p["kv"]] * p["batch"]
        pages = [-(-n // ps) for n in lens]
        total = sum(pages)
        self.pool = torch.randn(total, 2, ps, hk, d, device=dev, dtype=DTYPE)
        perm = torch.randperm(total, device=dev).to(torch.int32)
        i32 = dict(dtype=torch.int32, device=dev)
        self.kv_indptr = torch.tensor([0] + torch.tensor(pages).cumsum(0).tolist(), **i32)
        self.kv_indices = perm
        self.kv_lens = torch.tensor(lens, **i32)
        self.last = torch.tensor([n - (m - 1) * ps for n, m in zip(lens, pages)], **i32)
        self.qo_indptr = torch.tensor([0] + [p["chunk"] + i for i in range(p["batch"] + 1)], **i32)
        self.q = torch.randn(p["chunk"] + p["batch"], self.hq, d, device=dev, dtype=DTYPE)
        # Request 0's K/V as the contiguous tensors POD takes (gathered from its pages).
        rows = self.pool[perm[: pages[0]].long()]  # [pages0, 2, ps, hk, d]
        self.k_p = rows[:, 0].reshape(-1, hk, d)[:kv_p].contiguous()
        self.v_p = rows[:, 1].reshape(-1, hk, d)[:kv_p].contiguous()
        # The decodes' part of the table.
        first = pages[0]
        self.dec_indptr = (self.kv_indptr[1:] - first).contiguous()
        self.dec_indices = self.kv_indices[first:].contiguous()
        self.dec_last = self.last[1:].contiguous()
        self.q_p, self.q_d = self.q[: self.chunk], self.q[self.chunk:]
        self.out = torch.empty_like(self.q)
        self.lse = torch.empty(self.q.shape[:2], dtype=torch.float32, device=dev)

    def workspace(self) -> torch.Tensor:
        return torch.empty(128 << 20, dtype=torch.uint8, device=self.q.device)


def _flashtile_pod(case: Case, overlap: bool = True):
    import flashtile

    s = _Step(case)
    w = flashtile.PODWithPagedKVCacheWrapper(s.workspace())
    w.overlap_streams = overlap and w.overlap_streams
    w.plan(s.dec_indptr, s.dec_indices, s.dec_last, s.hq, s.hk, s.d, s.page, q_data_type=DTYPE)
    out_d = s.out[s.chunk:]

    def run():
        w.run(s.q_p, s.k_p, s.v_p, s.q_d, s.pool, causal_p=True, out_d=out_d)
        return out_d

    return run, "two launches (single prefill + batch decode)" + (", decode on a side stream" if w.overlap_streams
                                                                   else "")


def _flashtile_batch_attention(case: Case, split: bool = False):
    import flashtile

    s = _Step(case)
    w = flashtile.BatchAttention(device=s.q.device)
    w.split_row_classes = split
    w.plan(s.qo_indptr, s.kv_indptr, s.kv_indices, s.kv_lens, s.hq, s.hk, s.d, s.d, s.page, causal=True,
           q_data_type=DTYPE, kv_data_type=DTYPE)
    out_d = s.out[s.chunk:]

    def run():
        w.run(s.q, s.pool, out=s.out, lse=s.lse)
        return out_d

    plans = [w._wrapper._plan] + ([w._second._plan] if w._split_row is not None and w._second is not None else [])
    return run, " + ".join(f"{p.num_items} items, {p.num_merges} merges, tile {p.block_m}x{p.block_n}" for p in plans)


def _flashtile_two_launches(case: Case):
    import flashtile

    s = _Step(case)
    pre = flashtile.BatchPrefillWithPagedKVCacheWrapper(s.workspace())
    pre.plan(s.qo_indptr[:2], s.kv_indptr[:2], s.kv_indices, s.last[:1], s.hq, s.hk, s.d, s.page, causal=True,
             q_data_type=DTYPE)
    dec = flashtile.BatchDecodeWithPagedKVCacheWrapper(s.workspace())
    dec.plan(s.dec_indptr, s.dec_indices, s.dec_last, s.hq, s.hk, s.d, s.page, q_data_type=DTYPE)
    out_p, out_d = s.out[: s.chunk], s.out[s.chunk:]

    def run():
        pre.run(s.q_p, s.pool, out=out_p)
        dec.run(s.q_d, s.pool, out=out_d)
        return out_d

    return run


def _flashinfer_pod(case: Case):
    flashinfer = import_flashinfer("pod")
    s = _Step(case)
    w = flashinfer.PODWithPagedKVCacheWrapper(s.workspace())
    w.plan(s.dec_indptr, s.dec_indices, s.dec_last, s.hq, s.hk, s.d, s.page, q_data_type=DTYPE, kv_data_type=DTYPE)

    def run():
        return w.run(s.q_p, s.k_p, s.v_p, s.q_d, s.pool, causal_p=True)[1]

    return run


def _flashinfer_batch_attention(case: Case):
    flashinfer = import_flashinfer("attention")
    s = _Step(case)
    w = flashinfer.BatchAttention(kv_layout="NHD", device=str(s.q.device))
    w.plan(s.qo_indptr, s.kv_indptr, s.kv_indices, s.kv_lens, s.hq, s.hk, s.d, s.d, s.page, causal=True,
           q_data_type=DTYPE, kv_data_type=DTYPE)
    out_d = s.out[s.chunk:]

    def run():
        w.run(s.q, s.pool, out=s.out, lse=s.lse)
        return out_d

    return run


# ---------------------------------------------------------------------------------------------
# Tuning grids (--tune): whether the two halves can share SMs. A program of the single-prefill kernel's d128
# config (128 x 128 tile, 8 warps, 3 stages) takes ~224 KiB of shared memory and the whole register file, so
# no decode program runs beside it: the side stream only fills SMs the prefill has left. The "pod" grid gives
# the prefill half smaller programs (4 warps), so that a prefill program and a decode program fit one SM
# together, and varies which half is launched first and the decode stream's priority. The "ba" grid times
# BatchAttention's row tile: its decodes share the prefill's tile rows (a 128-row tile holds 4 rows of one decode).
# ---------------------------------------------------------------------------------------------

PREFILL_CONFIG = Knob("flashtile.kernels.attention", "_CONFIG_TABLE", ("prefill", 128))
DECODE_FIRST = Knob("flashtile.pod", "DECODE_FIRST")
SIDE_PRIORITY = Knob("flashtile.pod", "SIDE_STREAM_PRIORITY")


def _pod_grid(case: Case):
    """Prefill configs whose programs leave room for decode programs (128 x 64 at 3 stages: ~128 KiB, one per
    SM; at 2 stages ~96 KiB; 64 x 64: ~112 KiB), x launch order x the decode stream's priority."""
    from flashtile.kernels.attention import LaunchConfig

    configs = [None, LaunchConfig(128, 64, 4, 3), LaunchConfig(128, 64, 4, 2), LaunchConfig(64, 64, 4, 3)]
    settings = []
    for g in grid(cfg=configs, decode_first=(True, False), priority=(0, -1)):
        setting = {}
        if g["cfg"] is not None:
            setting[PREFILL_CONFIG] = g["cfg"]
        if not g["decode_first"]:
            setting[DECODE_FIRST] = False
        if g["priority"]:
            setting[SIDE_PRIORITY] = g["priority"]
        if setting:
            settings.append(setting)
    return settings


def _batch_attention_grid(case: Case):
    """The batch-prefill suite's tile knobs (BatchAttention runs the batch prefill kernel)."""
    from .bench_batch_prefill import CONFIG, TILE_SHAPE, FixedTile

    return [{TILE_SHAPE: FixedTile(g["bm"], g["bn"]), CONFIG: (g["bn"], g["warps"], 2)}
            for g in grid(bm=(64, 128), bn=(64, 128), warps=(4, 8))]


POD_TUNES = {
    "pod": Tune(_pod_grid, provider="flashtile_pod",
                description="POD: prefill half's d128 config (LaunchConfig) x launch order x decode stream priority"),
    "ba": Tune(_batch_attention_grid, description="BatchAttention: row tile x BLOCK_N x warps (2 stages)"),
}

register(Suite("pod", pod_cases, [
    Provider("flashtile", _flashtile_batch_attention),  # BatchAttention: the one-launch path
    Provider("flashtile_ba_split", lambda case: _flashtile_batch_attention(case, split=True)),
    Provider("flashtile_pod", _flashtile_pod),
    Provider("flashtile_pod_serial", lambda case: _flashtile_pod(case, overlap=False)),
    Provider("flashtile_2launch", _flashtile_two_launches),
    Provider("flashinfer_pod", _flashinfer_pod),
    Provider("flashinfer_batch_attn", _flashinfer_batch_attention),
], "tflops", "chunked-prefill step: one prefill chunk + a decode batch (fp16, random page order)",
    tunes=POD_TUNES))
