"""Shared memory of every attention kernel's chosen launch config, compiled for a GPU target on any machine.

For each case (a kernel, a head dim, a combination of features) the launcher runs on CPU tensors as if
on a device with ``--limit`` bytes of shared memory and compute capability ``--arch``; its launches are
captured and compiled for that target (benchmarks/tools/aot.py), and each compiled kernel's shared memory is
checked against the limit and against the model of flashtile/kernels/smem.py (which must never be
below it). One JSON line per compiled kernel; exit code 1 on any failure.

    python -m benchmarks.tools.smem_compile                          # the grid tests/test_smem.py runs
    python -m benchmarks.tools.smem_compile --full                   # every combination (~15 min on 2 cores)
    python -m benchmarks.tools.smem_compile --full --limit 101376 --arch 89
    python -m benchmarks.tools.smem_compile --issue                  # issue 22's crashing shapes, before/after
    python -m benchmarks.tools.smem_compile --triton-path /tmp/t36   # with the device machine's Triton 3.6
    python -m benchmarks.tools.smem_compile --full --only decode --card H200   # the H200 tune entry's tiles

Triton's interpreter must be off (TRITON_INTERPRET is removed before triton is imported), so run this
in its own process. The case grid is also what benchmarks/tools/smem_check.py runs on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

H100_LIMIT = 232448  # sm_90 opt-in shared memory per block (H100, H200)


@dataclass(frozen=True)
class Features:
    """The call options of one case (those that change a kernel's specialization)."""

    pos: str = "NONE"  # pos_encoding_mode: NONE, ALIBI, ROPE_LLAMA
    mask: str = "causal"  # causal, custom (a packed custom mask), none
    window_softcap: bool = False  # sliding window and logits soft cap
    fp8_kv: bool = False  # float8_e4m3fn K/V, fp16/bf16 Q
    half_vo: bool = False  # head_dim_vo = head_dim_qk / 2
    fp16: bool = False  # fp16 instead of bf16

    def label(self) -> str:
        parts = [self.pos.lower(), self.mask] + [f.name for f in dataclasses.fields(self)
                                                 if f.type in ("bool", bool) and getattr(self, f.name)]
        return "+".join(parts)


@dataclass(frozen=True)
class Case:
    """One launcher call. kernel: single_prefill, single_decode, batch_decode, batch_prefill, merge
    (cascade's state merges; only the head dim and dtype matter).
    Batch prefill: ``page_size`` None is a ragged cache, ``max_rows`` None the deterministic tile
    (else the longest request's GQA rows), ``kv_len`` picks the KV tile."""

    kernel: str
    head_dim: int
    features: Features = field(default_factory=Features)
    qo_len: int = 200
    kv_len: int = 300
    num_qo_heads: int = 8
    num_kv_heads: int = 2
    page_size: Optional[int] = 16
    max_rows: Optional[int] = -1  # -1: from qo_len

    @property
    def head_dim_vo(self) -> int:
        return self.head_dim // 2 if self.features.half_vo else self.head_dim

    def label(self) -> str:
        extra = ""
        if self.kernel == "batch_prefill":
            extra = f" {'ragged' if self.page_size is None else f'page {self.page_size}'}"
            extra += f" rows {'det' if self.max_rows is None else self.rows()} kv {self.kv_len}"
        elif self.kernel != "merge":
            extra = f" group {self.num_qo_heads // self.num_kv_heads}"
        return f"{self.kernel}{extra} d{self.head_dim}/{self.head_dim_vo} {self.features.label()}"

    def rows(self) -> int:
        return self.qo_len * (self.num_qo_heads // self.num_kv_heads) if self.max_rows == -1 else self.max_rows

    def supported(self) -> bool:
        f = self.features
        if self.kernel == "merge":
            return f == Features(mask="none", fp16=f.fp16)
        if f.mask == "custom" and self.kernel in ("single_decode", "batch_decode"):
            return False
        if self.kernel in ("single_decode", "batch_decode") and f.mask == "causal":
            return False  # decode has no causal mask: "none" stands for it
        return True


# Batch prefill tiles: (rows of the longest request, its KV length) -> prefill_tile_shape's choices:
# 128 rows with BLOCK_N 128 / 32, the deterministic tile (BLOCK_N 64; 64 rows at head dim 256), 16 rows.
BATCH_PREFILL_SHAPES = [(1024, 8192), (1024, 512), (None, 512), (16, 512)]


def full_grid() -> list:
    """Per kernel and head dim, every combination of the features the model distinguishes (position
    encoding, mask, fp8 K/V, head_dim_vo); window + soft cap and fp16 alternate over them, so
    each meets half of the others (the model says they change nothing; the grid checks it)."""
    cases = []
    for head_dim in (64, 128, 256):
        combos = itertools.product(("NONE", "ALIBI", "ROPE_LLAMA"), ("causal", "custom", "none"), (False, True),
                                   (False, True))
        for index, (pos, mask, fp8, half_vo) in enumerate(combos):
            f = Features(pos, mask, index % 2 == 1, fp8, half_vo, index // 2 % 2 == 1)
            kernels = [Case("single_prefill", head_dim, f), Case("single_decode", head_dim, f, qo_len=1),
                       Case("single_prefill", head_dim, f, qo_len=233, kv_len=233, num_qo_heads=4, num_kv_heads=4),
                       Case("batch_decode", head_dim, f, qo_len=1),
                       Case("batch_decode", head_dim, f, qo_len=1, num_qo_heads=64, num_kv_heads=2)]
            for page_size in (None, 16):
                for rows, kv in BATCH_PREFILL_SHAPES:
                    kernels.append(Case("batch_prefill", head_dim, f, page_size=page_size, max_rows=rows, kv_len=kv))
            kernels.append(Case("batch_prefill", head_dim, f, page_size=1, max_rows=1024, kv_len=512))
            kernels.append(Case("merge", head_dim, f))
            cases += [c for c in kernels if c.supported()]
    return cases


def quick_grid() -> list:
    """The heaviest combinations per kernel and head dim (what the test suite compiles)."""
    worst = Features("ROPE_LLAMA", "custom", window_softcap=True)
    fp8_rope = Features("ROPE_LLAMA", "causal", fp8_kv=True, half_vo=True)
    decode = Features("ROPE_LLAMA", "none", window_softcap=True)
    cases = []
    for head_dim in (64, 128, 256):
        cases += [Case("single_prefill", head_dim, Features()), Case("single_prefill", head_dim, worst),
                  Case("single_prefill", head_dim, fp8_rope),
                  Case("batch_prefill", head_dim, worst, max_rows=1024, kv_len=8192),
                  Case("batch_prefill", head_dim, worst, max_rows=None, kv_len=512, page_size=None),
                  Case("single_decode", head_dim, decode, qo_len=1), Case("merge", head_dim, Features(mask="none")),
                  Case("batch_decode", head_dim, decode, qo_len=1, num_qo_heads=64, num_kv_heads=2)]
    return cases


def issue_cases() -> list:
    """Issue 22's crashing shapes: single prefill with a sliding window (4/4 heads, d128, 233 tokens;
    FlashInfer's sliding-window test checks it against the same call with a custom mask) and paged
    batch prefill with in-kernel RoPE (32/4 heads, d128, page 5, 127 queries vs 512 keys, causal;
    FlashInfer's test checks it against single prefill per request)."""
    window = Features("NONE", "causal", window_softcap=True)
    rope = Features("ROPE_LLAMA", "causal")
    return [Case("single_prefill", 128, window, qo_len=233, kv_len=233, num_qo_heads=4, num_kv_heads=4),
            Case("single_prefill", 128, Features("NONE", "custom"), qo_len=233, kv_len=233, num_qo_heads=4,
                 num_kv_heads=4),
            Case("batch_prefill", 128, rope, qo_len=127, kv_len=512, num_qo_heads=32, num_kv_heads=4, page_size=5),
            Case("single_prefill", 128, rope, qo_len=127, kv_len=512, num_qo_heads=32, num_kv_heads=4)]


def tile_features(case: Case):
    """The case's TileFeatures (the model's inputs)."""
    from flashtile._core.intmath import dot_tile_dim
    from flashtile.kernels.smem import TileFeatures

    f = case.features
    return TileFeatures(dot_tile_dim(case.head_dim), dot_tile_dim(case.head_dim_vo), 2, 1 if f.fp8_kv else 2,
                        f.pos == "ROPE_LLAMA", f.mask == "custom")


def run_launcher(case: Case) -> None:
    """Call the case's launcher on CPU tensors (its launches are captured by the caller)."""
    import torch

    from flashtile._core import tile_policy
    from flashtile._core.params import AttentionParams
    from flashtile.kernels import attention, batch_prefill
    from flashtile.scheduler.prefill_work import pack_prefill_meta, plan_prefill_work
    from flashtile.scheduler.worklist import decode_layout, pack_decode_worklist

    f = case.features
    dtype = torch.float16 if f.fp16 else torch.bfloat16
    kv_dtype = torch.float8_e4m3fn if f.fp8_kv else dtype
    hq, hk, d, dvo = case.num_qo_heads, case.num_kv_heads, case.head_dim, case.head_dim_vo
    params = AttentionParams(d ** -0.5, f.mask == "causal", 30.0 if f.window_softcap else 0.0,
                             63 if f.window_softcap else -1, f.pos)
    if case.kernel in ("single_prefill", "single_decode"):
        qo, kv = case.qo_len, case.kv_len
        mask = torch.zeros((qo * kv + 7) // 8, dtype=torch.uint8) if f.mask == "custom" else None
        attention.single_attention_forward(
            torch.randn(qo, hq, d, dtype=dtype), torch.randn(kv, hk, d).to(kv_dtype),
            torch.randn(kv, hk, dvo).to(kv_dtype), torch.empty(qo, hq, dvo, dtype=dtype), torch.empty(qo, hq), params,
            packed_mask=mask, kind="prefill" if case.kernel == "single_prefill" else "decode",
            num_splits=2)  # split-KV: the merge kernel compiles too
    elif case.kernel == "merge":
        from flashtile.kernels import merge

        tokens, states = 300, 3
        v_a, v_b = torch.randn(tokens, hq, d, dtype=dtype), torch.randn(tokens, hq, d, dtype=dtype)
        s_a, s_b = torch.randn(tokens, hq), torch.randn(tokens, hq)
        merge.merge_state_pair(v_a, s_a, v_b, s_b, v_a.clone(), s_a.clone())
        merge.merge_state_pair(v_a, s_a, v_b, s_b, v_a, s_a, mask=torch.ones(tokens, dtype=torch.bool))
        merge.merge_states_by_token(torch.randn(tokens, states, hq, d, dtype=dtype), torch.randn(tokens, states, hq),
                                    torch.empty(tokens, hq, d, dtype=dtype), torch.empty(tokens, hq))
    elif case.kernel == "batch_decode":
        batch, pages_per_request, page = 2, 8, 16
        pages = batch * pages_per_request
        i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
        kv_len = pages_per_request * page
        worklist = pack_decode_worklist(decode_layout(batch, 4), [0, 2, 4], [kv_len] * batch, [0, 0, 1, 1],
                                        [0, kv_len // 2] * batch, [kv_len // 2, kv_len] * batch)
        attention.batch_decode_forward(
            torch.randn(batch, hq, d, dtype=dtype), torch.randn(pages, page, hk, d).to(kv_dtype),
            torch.randn(pages, page, hk, dvo).to(kv_dtype), i32([0, pages_per_request, pages]),
            torch.arange(pages, dtype=torch.int32), worklist, torch.empty(4, hq, dvo),
            torch.empty(4, hq), torch.empty(batch, hq, dvo, dtype=dtype), torch.empty(batch, hq), params,
            batch_size=batch, num_programs=4, max_states=2, merge=True)
    else:
        qo, kv, group = [case.qo_len, 17], [case.kv_len, 40], hq // hk
        block_m, block_n = tile_policy.prefill_tile_shape(case.rows(), case.kv_len, d, dvo, case.page_size)
        work = plan_prefill_work(torch.tensor(qo), torch.tensor(kv), group=group, block_m=block_m,
                                 causal=f.mask == "causal", window_left=params.window_left, programs_per_item=hk,
                                 num_sms=132, align=128)
        starts = lambda n: torch.tensor([0, n[0]])  # noqa: E731
        reqs = torch.stack([starts(qo), torch.tensor(qo), starts(kv), torch.tensor(kv),
                            torch.zeros(2, dtype=torch.long)], 1)
        meta = pack_prefill_meta(work, reqs, work.num_items, work.num_merges)
        if case.page_size is None:
            k, v, page_indices = (torch.randn(sum(kv), hk, d).to(kv_dtype), torch.randn(sum(kv), hk, dvo).to(kv_dtype),
                                  None)
        else:
            pages = sum(-(-n // case.page_size) for n in kv)
            k = torch.randn(pages, case.page_size, hk, d).to(kv_dtype)
            v = torch.randn(pages, case.page_size, hk, dvo).to(kv_dtype)
            page_indices = torch.arange(pages, dtype=torch.int32)
        mask = None
        if f.mask == "custom":
            mask = torch.zeros(sum(a * b for a, b in zip(qo, kv)) // 8 + 1, dtype=torch.uint8)
        slots = max(work.num_slots, 1)
        batch_prefill.batch_prefill_forward(
            torch.randn(sum(qo), hq, d, dtype=dtype), k, v, page_indices, mask, meta,
            torch.empty(slots, hk, block_m, dvo), torch.empty(slots, hk, block_m),
            torch.empty(sum(qo), hq, dvo, dtype=dtype), torch.empty(sum(qo), hq), params, batch_size=2,
            item_capacity=work.num_items, block_m=block_m, block_n=block_n, num_items=work.num_items,
            num_merges=max(work.num_merges, 1))


_PENDING: list = []  # compile_source() triples; read by index in forked workers (kernels do not pickle)


def _compile(index: int):
    from benchmarks.tools.aot import shared_bytes

    try:
        return shared_bytes(_PENDING[index]), None
    except Exception as e:  # a compile failure is reported, not fatal
        return None, f"{type(e).__name__}: {str(e)[:300]}"


def check(cases: list, limit: int, arch: int, workers: int = 0) -> list:
    """Compile every case's launches as chosen for a device with ``limit`` bytes and ``sm_<arch>``;
    one record per compiled kernel: case, kernel, config, shared (Triton), estimate (model), ok."""
    from benchmarks.tools.aot import capture_launches, compile_source
    from flashtile._core import device
    from flashtile.kernels.smem import estimate_shared_bytes

    capability = (arch // 10, arch % 10)
    records, keys, index_of = [], [], {}
    _PENDING.clear()
    device.TARGET_OVERRIDE = (limit, capability)
    try:
        for case in cases:
            with capture_launches() as launches:
                run_launcher(case)
            for launch in launches:  # keep what the compile and the record need, not the tensors
                record = dict(case=case.label(), kernel=launch.name, limit=limit, arch=arch)
                block_n = launch.constexpr("BLOCK_N")
                if block_n is not None:
                    block_m, warps = launch.constexpr("BLOCK_M"), launch.kwargs["num_warps"]
                    stages = launch.kwargs["num_stages"]
                    record.update(block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages,
                                  estimate=estimate_shared_bytes(block_m, block_n, stages, warps, tile_features(case),
                                                                 capability))
                compiled_source = compile_source(launch, arch)
                source, _, options = compiled_source
                # One compile per distinct specialization (the merge kernels and many cases share theirs).
                key = (source.hash(), options["num_warps"], options["num_stages"])
                if key not in index_of:
                    index_of[key] = len(_PENDING)
                    _PENDING.append(compiled_source)
                records.append(record)
                keys.append(key)
    finally:
        device.TARGET_OVERRIDE = None
    if workers > 1 and len(_PENDING) > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            compiled = pool.map(_compile, range(len(_PENDING)), chunksize=1)
    else:
        compiled = [_compile(i) for i in range(len(_PENDING))]
    for record, key in zip(records, keys):
        shared, error = compiled[index_of[key]]
        record["shared"] = shared
        problems = []
        if error is not None and "not supported in this architecture" in error:
            record["skipped"] = error  # e.g. fp8 K/V on sm_80: a limit of the target, not of shared memory
        elif error is not None:
            problems.append(f"compile failed: {error}")
        else:
            if shared > limit:
                problems.append(f"needs {shared} B, the limit is {limit}")
            if record.get("estimate") is not None and shared > record["estimate"]:
                problems.append(f"the model estimates {record['estimate']} B, below Triton's {shared}")
        record["ok"] = not problems
        if problems:
            record["problems"] = problems
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="every feature combination (default: the heaviest ones)")
    ap.add_argument("--issue", action="store_true",
                    help="issue 22's shapes: the config chosen without a limit (before) and with one (after)")
    ap.add_argument("--limit", type=int, default=H100_LIMIT, help="the device's shared memory per block, bytes")
    ap.add_argument("--arch", type=int, default=90, help="compute capability as major*10+minor")
    ap.add_argument("--only", default="", help="only the cases whose label contains this text")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--card", default=None,
                    help="choose the decode tiles of this card's tune table entry (flashtile/_core/decode_tune.py)")
    ap.add_argument("--triton-path", default=None, help="a directory holding the triton package to compile with")
    args = ap.parse_args(argv)
    if args.card:
        from flashtile._core import device

        device.FACTS_OVERRIDE = device.H100_FACTS._replace(name=args.card)
    cases = issue_cases() if args.issue else full_grid() if args.full else quick_grid()
    cases = [c for c in cases if args.only in c.label()]
    failures = 0
    runs = [(2**31, False), (args.limit, True)] if args.issue else [(args.limit, True)]
    for limit, checked in runs:
        for record in check(cases, limit, args.arch, args.workers):
            if not checked:  # the config chosen as before the limit was known: report only
                record = dict(record, ok=None, problems=None, before=True)
            print(json.dumps(record), flush=True)
            failures += record["ok"] is False
    print(json.dumps({"cases": len(cases), "failures": failures}), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    _args = sys.argv[1:]
    if "--triton-path" in _args:
        sys.path.insert(0, _args[_args.index("--triton-path") + 1])
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
