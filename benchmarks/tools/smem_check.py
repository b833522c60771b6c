"""Run the attention kernels on the GPU for every case of a feature grid and report any launch config the
device refuses for lack of shared memory (issue 22), any result that differs from the reference path,
and any launch the shared-memory model underestimated (flashtile stepped down after Triton's refusal).

    python -m benchmarks.tools.smem_check                          # the GPU grid, this device's limit (~2 min on H100)
    python -m benchmarks.tools.smem_check --limit 101376 --arch 89 # the configs an sm_89 card would get, run here
    python -m benchmarks.tools.smem_check --grid quick|gpu|full --only batch_prefill --workers 16

The cases are benchmarks/tools/smem_compile.py's (which checks the same configs compiled, without a GPU),
called through the public API (single prefill/decode, ragged and paged batch prefill, batch decode).
Workers share the GPU; compiling dominates. Exit code 1 on any problem.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

from benchmarks.tools.smem_compile import Case, Features, full_grid, quick_grid

TOLERANCE = 0.05  # max |out - reference| for unit-scale fp16/bf16 attention outputs


def gpu_grid() -> list:
    """Per head dim and kernel (the tile shapes every launcher picks), the heaviest feature combinations."""
    heavy = [Features(), Features("ROPE_LLAMA", "custom", window_softcap=True),
             Features("ROPE_LLAMA", "causal", fp8_kv=True, half_vo=True, fp16=True),
             Features("ALIBI", "custom", window_softcap=True, fp8_kv=True)]
    decode = [Features("NONE", "none"), Features("ROPE_LLAMA", "none", window_softcap=True),
              Features("ROPE_LLAMA", "none", fp8_kv=True, fp16=True), Features("ALIBI", "none", window_softcap=True)]
    cases = []
    for head_dim in (64, 128, 256):
        for f in heavy:
            cases += [Case("single_prefill", head_dim, f, qo_len=700, kv_len=900),
                      Case("single_prefill", head_dim, f, qo_len=233, kv_len=233, num_qo_heads=4, num_kv_heads=4)]
            for rows, kv in ((1024, 8192), (1024, 512), (None, 512), (16, 512)):
                cases += [Case("batch_prefill", head_dim, f, page_size=page, max_rows=rows, kv_len=kv)
                          for page in (None, 16)]
            cases.append(Case("batch_prefill", head_dim, f, page_size=1, max_rows=1024, kv_len=512))
        for f in decode:
            cases += [Case("single_decode", head_dim, f, qo_len=1, kv_len=5000),
                      Case("batch_decode", head_dim, f, qo_len=1, kv_len=3000),
                      Case("batch_decode", head_dim, f, qo_len=1, kv_len=3000, num_qo_heads=64, num_kv_heads=2)]
    return cases


GRIDS = {"gpu": gpu_grid, "quick": quick_grid, "full": full_grid}


def _inputs(case: Case):
    import torch

    f = case.features
    dtype = torch.float16 if f.fp16 else torch.bfloat16
    kv_dtype = torch.float8_e4m3fn if f.fp8_kv else dtype
    options = dict(pos_encoding_mode=f.pos, window_left=63 if f.window_softcap else -1,
                   logits_soft_cap=30.0 if f.window_softcap else None)
    return dtype, kv_dtype, options


def _compare(out, lse, ref_out, ref_lse) -> str:
    import torch

    if torch.isnan(out).any():
        return "NaN in the output"
    err = (out.float() - ref_out.float()).abs().max().item()
    finite = torch.isfinite(ref_lse)
    lse_err = (lse[finite] - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
    if err > TOLERANCE or lse_err > TOLERANCE or not torch.equal(torch.isinf(lse), torch.isinf(ref_lse)):
        return f"differs from the reference: max |out| error {err:.3g}, lse {lse_err:.3g}"
    return ""


def _batch_rows(case: Case) -> tuple:
    """(query lengths, KV lengths, deterministic) giving the case's planned tile: the longest request
    has ``max_rows`` GQA rows (None: deterministic tiles) and ``kv_len`` keys; a second, short request."""
    group = case.num_qo_heads // case.num_kv_heads
    rows = case.rows()
    qo = 64 if rows is None else max(1, rows // group)
    return [qo, 5], [case.kv_len, 37], rows is None


def _on_both_paths(call) -> list:
    """``[call() on the Triton kernels, call() on the reference path]`` (FLASHTILE_BACKEND; flashtile reads
    its settings once, so they are reloaded after each change)."""
    from flashtile._core import settings

    results = []
    for backend in ("triton", "reference"):
        os.environ["FLASHTILE_BACKEND"] = backend
        settings.reload()
        try:
            results.append(call())
        finally:
            os.environ.pop("FLASHTILE_BACKEND")
            settings.reload()
    return results


def runnable(case: Case) -> bool:
    """Through the public API: batch decode has one head dim for K and V; merges are not attention."""
    return (case.supported() and case.kernel != "merge"
            and not (case.kernel == "batch_decode" and case.features.half_vo)
            # refused on the GPU (kernels/attention.py check_fp8_head_dims): they fault there
            and not (case.features.fp8_kv and case.features.half_vo))


def run_case(case: Case, device: str = "cuda") -> str:
    """Run one case through the public API; "" when it matches the reference path. (``device`` "cpu":
    the kernels under Triton's interpreter, for tiny cases in the test suite.)"""
    import torch

    import flashtile

    device = torch.device(device)
    dtype, kv_dtype, options = _inputs(case)
    f = case.features
    hq, hk, d, dvo = case.num_qo_heads, case.num_kv_heads, case.head_dim, case.head_dim_vo
    if case.kernel in ("single_prefill", "single_decode"):
        qo, kv = case.qo_len, case.kv_len
        q = torch.randn(qo, hq, d, dtype=dtype, device=device)
        k = torch.randn(kv, hk, d, device=device).to(kv_dtype)
        v = torch.randn(kv, hk, dvo, device=device).to(kv_dtype)
        if case.kernel == "single_decode":
            results = _on_both_paths(lambda: flashtile.single_decode_with_kv_cache(q[0], k, v, return_lse=True,
                                                                                   **options))
        else:
            mask = torch.rand(qo, kv, device=device) > 0.3 if f.mask == "custom" else None
            results = _on_both_paths(lambda: flashtile.single_prefill_with_kv_cache(
                q, k, v, custom_mask=mask, causal=f.mask == "causal", return_lse=True, **options))
        (out, lse), (ref_out, ref_lse) = results
        return _compare(out, lse, ref_out, ref_lse)
    if case.kernel == "batch_decode":
        batch, page = 3, 16
        pages = -(-case.kv_len // page)
        k_cache = torch.randn(batch * pages, page, hk, d, device=device).to(kv_dtype)
        v_cache = torch.randn(batch * pages, page, hk, d, device=device).to(kv_dtype)
        indptr = torch.arange(0, batch * pages + 1, pages, dtype=torch.int32)
        indices = torch.randperm(batch * pages, dtype=torch.int32)
        last = torch.full((batch,), case.kv_len - (pages - 1) * page, dtype=torch.int32)
        q = torch.randn(batch, hq, d, dtype=dtype, device=device)

        def decode():
            w = flashtile.BatchDecodeWithPagedKVCacheWrapper(torch.empty(64 << 20, dtype=torch.uint8, device=device))
            w.plan(indptr, indices, last, hq, hk, d, page, q_data_type=dtype, kv_data_type=kv_dtype, **options)
            return w.run(q, (k_cache, v_cache), return_lse=True)

        (out, lse), (ref_out, ref_lse) = _on_both_paths(decode)
        return _compare(out, lse, ref_out, ref_lse)
    qo_lens, kv_lens, deterministic = _batch_rows(case)
    qo_indptr = torch.tensor([0, qo_lens[0], sum(qo_lens)], dtype=torch.int32)
    q = torch.randn(sum(qo_lens), hq, d, dtype=dtype, device=device)
    mask = None
    if f.mask == "custom":
        mask = torch.cat([(torch.rand(a, b, device=device) > 0.3).flatten() for a, b in zip(qo_lens, kv_lens)])
    plan_options = dict(head_dim_vo=dvo, custom_mask=mask, causal=f.mask == "causal", q_data_type=dtype,
                        kv_data_type=kv_dtype, disable_split_kv=deterministic, **options)
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    if case.page_size is None:
        k = torch.randn(sum(kv_lens), hk, d, device=device).to(kv_dtype)
        v = torch.randn(sum(kv_lens), hk, dvo, device=device).to(kv_dtype)
        kv_indptr = torch.tensor([0, kv_lens[0], sum(kv_lens)], dtype=torch.int32)

        def prefill():
            w = flashtile.BatchPrefillWithRaggedKVCacheWrapper(workspace)
            w.plan(qo_indptr, kv_indptr, hq, hk, d, **plan_options)
            return w.run(q, k, v, return_lse=True)
    else:
        page = case.page_size
        pages = [-(-n // page) for n in kv_lens]
        k_cache = torch.randn(sum(pages), page, hk, d, device=device).to(kv_dtype)
        v_cache = torch.randn(sum(pages), page, hk, dvo, device=device).to(kv_dtype)
        indptr = torch.tensor([0, pages[0], sum(pages)], dtype=torch.int32)
        indices = torch.randperm(sum(pages), dtype=torch.int32)
        last = torch.tensor([n - (p - 1) * page for n, p in zip(kv_lens, pages)], dtype=torch.int32)

        def prefill():
            w = flashtile.BatchPrefillWithPagedKVCacheWrapper(workspace)
            w.plan(qo_indptr, indptr, indices, last, hq, hk, d, page, **plan_options)
            return w.run(q, (k_cache, v_cache), return_lse=True)
    (out, lse), (ref_out, ref_lse) = _on_both_paths(prefill)
    return _compare(out, lse, ref_out, ref_lse)


_SETTINGS: dict = {}


def _worker_init(grid: str, limit, arch) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    _SETTINGS["cases"] = [c for c in GRIDS[grid]() if runnable(c)]
    if limit is not None:
        from flashtile._core import device

        device.TARGET_OVERRIDE = (limit, (arch // 10, arch % 10))


def _run(index: int) -> dict:
    from triton.runtime.errors import OutOfResources

    case = _SETTINGS["cases"][index]
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            problem = run_case(case)
        except OutOfResources as e:
            problem = f"OutOfResources: {e}"
        except Exception as e:  # reported per case; the run goes on
            problem = f"{type(e).__name__}: {str(e)[:300]}"
    misses = [str(w.message) for w in caught if "more than estimated" in str(w.message)]
    if misses and not problem:
        problem = "the model underestimated: " + misses[0]
    return dict(case=case.label(), ok=not problem, problem=problem or None,
                seconds=round(time.perf_counter() - start, 2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", choices=sorted(GRIDS), default="gpu")
    ap.add_argument("--only", default="", help="only the cases whose label contains this text")
    ap.add_argument("--limit", type=int, default=None,
                    help="choose configs for this much shared memory (bytes) instead of the device's")
    ap.add_argument("--arch", type=int, default=89, help="with --limit: the capability to choose for (major*10+minor)")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    import multiprocessing

    import torch

    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    cases = [c for c in GRIDS[args.grid]() if runnable(c)]
    indices = [i for i, c in enumerate(cases) if args.only in c.label()]
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.workers, _worker_init,
                                                  (args.grid, args.limit, args.arch)) as pool:
        results = list(pool.imap_unordered(_run, indices))
    for r in sorted(results, key=lambda r: r["case"]):
        print(json.dumps(r))
    problems = [r for r in results if not r["ok"]]
    print(json.dumps(dict(device=torch.cuda.get_device_name(), limit=args.limit, cases=len(results),
                          problems=len(problems), seconds=round(time.perf_counter() - start, 1))))
    for r in problems:
        print(f"PROBLEM {r['case']}: {r['problem']}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
