"""flashtile.page against the explicit-loop oracles (tests/oracles.py), on the reference path and the
kernel path (Triton interpreter on CPU, the GPU when there is one); validation errors; custom ops."""

from __future__ import annotations

import pytest
import torch

from conftest import HAS_CUDA
from flashtile import page
from flashtile._core import ops_page
from flashtile._core.checks import InvalidOptionError
from flashtile._core.graphs import capture_graph
from flashtile._core.paged_kv import read_page_table
from oracles import (
    append_paged_kv_oracle,
    append_paged_mla_oracle,
    batch_indices_positions_oracle,
    paged_cache_f64,
    read_paged_kv_oracle,
)

FP8 = [d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d is not None]


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def page_table(lens_after, page_size, num_pages, device, *, lead=2, gen=None):
    """A CSR page table for requests of ``lens_after`` tokens: pages drawn in scattered order from
    ``num_pages``; ``kv_indptr[0] = lead`` (``lead`` junk entries before the first request's pages)
    and one junk entry after the last."""
    counts = [-(-n // page_size) for n in lens_after]
    total = sum(counts)
    assert total <= num_pages
    perm = torch.randperm(num_pages, generator=gen)[:total]
    junk = torch.full((lead,), num_pages - 1, dtype=torch.int64)
    indices = torch.cat([junk, perm, junk[:1]]).to(torch.int32)
    indptr = torch.tensor([lead] + counts, dtype=torch.int64).cumsum(0).to(torch.int32)
    last = torch.tensor([0 if n == 0 else (n - 1) % page_size + 1 for n in lens_after], dtype=torch.int32)
    return indices.to(device), indptr.to(device), last.to(device)


def make_cache(form, num_pages, page_size, heads, dim, layout, dtype, device):
    """Random cache in one of the upstream forms. "5d" is a slice of a wider pool (row stride > dim);
    "tuple" is two strided halves of one buffer; "squeezed" is the page-size-1 form without the page
    axis (a 4-D single tensor)."""
    def rand(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    tok = (page_size, heads) if layout == "NHD" else (heads, page_size)
    if form == "5d":
        return rand(num_pages, 2, *tok, dim + 8)[..., :dim]
    if form == "tuple":
        pool = rand(num_pages, *tok, 2, dim)
        return pool[..., 0, :], pool[..., 1, :]
    if form == "squeezed":
        assert page_size == 1
        return rand(num_pages, 2, heads, dim)
    if form == "squeezed_tuple":
        assert page_size == 1
        return rand(num_pages, heads, dim), rand(num_pages, heads, dim)
    raise ValueError(form)


def make_append(nnz, heads, dim, dtype, device):
    """Non-contiguous append tensors: K a slice of a fused QKV-like buffer, V a transposed buffer."""
    fused = torch.randn(nnz, 3 * heads, dim + 4, device=device).to(dtype)
    key = fused[:, heads: 2 * heads, 2: dim + 2]
    value = torch.randn(heads, nnz, dim, device=device).to(dtype).transpose(0, 1)
    assert not key.is_contiguous() and not value.is_contiguous()
    return key, value


def rows_for(lens_before, lens_after):
    """batch_indices, positions (int32 tensors) of the appended rows, from the Python lengths."""
    bi, pos = [], []
    for b, (n0, n1) in enumerate(zip(lens_before, lens_after)):
        bi += [b] * (n1 - n0)
        pos += list(range(n0, n1))
    return torch.tensor(bi, dtype=torch.int32), torch.tensor(pos, dtype=torch.int32)


def assert_cache_equals(cache, layout, expected):
    got_k, got_v = paged_cache_f64(cache, layout)
    assert torch.equal(got_k, expected[0]), "K cache differs from the oracle"
    assert torch.equal(got_v, expected[1]), "V cache differs from the oracle"


# Requests: one appending to a partly filled page, one without pages, one with pages but nothing
# appended, one new request, one crossing page boundaries.
LENS_BEFORE = [5, 0, 17, 0, 2]
LENS_AFTER = [6, 0, 17, 4, 9]


# ---------------------------------------------------------------------------------------------
# append_paged_kv_cache
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [1, 3, 16])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("form", ["5d", "tuple"])
def test_append_matches_oracle(path, device, page_size, layout, form):
    heads, dim, dtype = 2, 24, torch.bfloat16
    num_pages = sum(-(-n // page_size) for n in LENS_AFTER) + 4
    indices, indptr, last = page_table(LENS_AFTER, page_size, num_pages, device)
    cache = make_cache(form, num_pages, page_size, heads, dim, layout, dtype, device)
    bi, pos = rows_for(LENS_BEFORE, LENS_AFTER)
    key, value = make_append(bi.numel(), heads, dim, dtype, device)
    expected = append_paged_kv_oracle(key, value, bi, pos, cache, indices.cpu(), indptr.cpu(), layout)
    out = page.append_paged_kv_cache(key, value, bi.to(device), pos.to(device), cache, indices, indptr, last,
                                     kv_layout=layout)
    assert out is None
    assert_cache_equals(cache, layout, expected)


@pytest.mark.parametrize("form", ["squeezed", "squeezed_tuple"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_append_page_size_1_forms(path, device, form, layout):
    heads, dim, dtype = 3, 16, torch.float16
    num_pages = sum(LENS_AFTER) + 2
    indices, indptr, last = page_table(LENS_AFTER, 1, num_pages, device, lead=0)
    cache = make_cache(form, num_pages, 1, heads, dim, layout, dtype, device)
    bi, pos = rows_for(LENS_BEFORE, LENS_AFTER)
    key, value = make_append(bi.numel(), heads, dim, dtype, device)
    expected = append_paged_kv_oracle(key, value, bi, pos, cache, indices.cpu(), indptr.cpu(), layout)
    page.append_paged_kv_cache(key, value, bi, pos, cache, indices, indptr, last, layout)
    assert_cache_equals(cache, layout, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32] + FP8, ids=str)
def test_append_dtypes(path, device, dtype):
    """The copy is bitwise: every cache dtype round-trips exactly; host int64 index arrays are accepted."""
    heads, dim, page_size, layout = 2, 32, 4, "HND"
    num_pages = 12
    indices, indptr, last = page_table(LENS_AFTER, page_size, num_pages, device)
    cache = make_cache("5d", num_pages, page_size, heads, dim, layout, dtype, device)
    bi, pos = rows_for(LENS_BEFORE, LENS_AFTER)
    key, value = make_append(bi.numel(), heads, dim, dtype, device)
    expected = append_paged_kv_oracle(key, value, bi, pos, cache, indices.cpu(), indptr.cpu(), layout)
    page.append_paged_kv_cache(key, value, bi.long(), pos.long(), cache, indices.cpu().long(), indptr.cpu().long(),
                               last.cpu().long(), layout)
    assert_cache_equals(cache, layout, expected)


def test_append_head_dim_vo_differs_and_padding_rows(path, device):
    """V may have its own head_dim; rows with batch index -1 (padding) are not written; nnz 0 is a no-op."""
    heads, page_size = 2, 3
    indices, indptr, last = page_table(LENS_AFTER, page_size, 16, device)
    k_cache = torch.randn(16, page_size, heads, 40, device=device).half()
    v_cache = torch.randn(16, page_size, heads, 8, device=device).half()
    bi, pos = rows_for(LENS_BEFORE, LENS_AFTER)
    bi = torch.cat([bi, torch.tensor([-1, -1], dtype=torch.int32)])
    pos = torch.cat([pos, torch.tensor([0, 0], dtype=torch.int32)])
    key = torch.randn(bi.numel(), heads, 40, device=device).half()
    value = torch.randn(bi.numel(), heads, 8, device=device).half()
    expected = append_paged_kv_oracle(key, value, bi, pos, (k_cache, v_cache), indices.cpu(), indptr.cpu(), "NHD")
    page.append_paged_kv_cache(key, value, bi, pos, (k_cache, v_cache), indices, indptr, last)
    assert_cache_equals((k_cache, v_cache), "NHD", expected)
    empty = key[:0]
    page.append_paged_kv_cache(empty, value[:0], bi[:0], pos[:0], (k_cache, v_cache), indices, indptr, last)
    assert_cache_equals((k_cache, v_cache), "NHD", expected)


def test_append_bad_device_rows_are_skipped(path, device):
    """The op (below the host checks, as with device index arrays) skips rows whose request,
    position or page is out of range instead of writing outside the cache."""
    heads, dim, page_size = 2, 16, 4
    pool = torch.randn(8, 2, page_size, heads, dim, device=device).half()
    cache = pool[:6]  # pages 6 and 7 lie outside the cache view: must stay untouched
    before = pool.clone()
    indices = torch.tensor([0, 7, 2, 3, 4], dtype=torch.int32, device=device)  # page 7 out of range
    indptr = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)  # request 0: pages 0, 7; request 1: 2, 3, 4
    #                 ok   bad-b  pad  neg-pos  past-pages  page-7  ok
    bi = torch.tensor([0, 2, -1, 1, 1, 0, 1], dtype=torch.int32, device=device)
    pos = torch.tensor([1, 0, 0, -1, 12, 5, 9], dtype=torch.int32, device=device)
    key, value = make_append(7, heads, dim, torch.float16, device)
    ops_page._append_paged_kv_cache_impl(key, value, bi, pos, cache, None, indices, indptr, "NHD", "auto")
    ok = torch.tensor([0, 6])
    expected = append_paged_kv_oracle(key[ok], value[ok], bi[ok].cpu(), pos[ok].cpu(), before[:6], indices.cpu(),
                                      indptr.cpu(), "NHD")
    assert_cache_equals(cache, "NHD", expected)
    assert torch.equal(pool[6:], before[6:])


def test_append_mla(path, device):
    page_size, ckv_dim, kpe_dim = 3, 512, 64
    indices, indptr, last = page_table(LENS_AFTER, page_size, 16, device)
    ckv_cache = torch.randn(16, page_size, ckv_dim, device=device).bfloat16()
    kpe_cache = torch.randn(16, page_size, kpe_dim + 16, device=device).bfloat16()[..., :kpe_dim]
    bi, pos = rows_for(LENS_BEFORE, LENS_AFTER)
    ckv = torch.randn(bi.numel(), ckv_dim + 64, device=device).bfloat16()[:, 64:]
    kpe = torch.randn(kpe_dim, bi.numel(), device=device).bfloat16().T
    expected = append_paged_mla_oracle(ckv, kpe, bi, pos, ckv_cache, kpe_cache, indices.cpu(), indptr.cpu())
    page.append_paged_mla_kv_cache(ckv, kpe, bi, pos, ckv_cache, kpe_cache, indices, indptr, last)
    assert torch.equal(ckv_cache.double().cpu(), expected[0])
    assert torch.equal(kpe_cache.double().cpu(), expected[1])


# ---------------------------------------------------------------------------------------------
# get_seq_lens, get_batch_indices_positions, and the round trip
# ---------------------------------------------------------------------------------------------


def test_get_seq_lens(device):
    _, indptr, last = page_table(LENS_AFTER, 3, 16, device)
    lens = page.get_seq_lens(indptr, last, 3)
    assert lens.dtype == torch.int32 and lens.device == indptr.device
    assert lens.tolist() == LENS_AFTER


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
def test_read_page_table_owns_its_arrays(dtype):
    """The wrappers' plan-time read: KV lengths and the largest page id, in arrays that stay valid when
    the engine overwrites its (host) page-table buffers after plan()."""
    indices, indptr, last = page_table(LENS_AFTER, 3, 16, "cpu")
    indptr, last = indptr.to(dtype), last.to(dtype)
    last[1] = 1  # a request without pages has length 0 whatever its last_page_len says
    table = read_page_table(indptr, indices, last, 3)
    given_indptr = indptr.tolist()
    assert table.indptr.tolist() == given_indptr
    assert table.kv_lens.tolist() == LENS_AFTER and table.batch_size == len(LENS_AFTER)
    assert (table.first, table.last) == (2, int(indptr[-1]))
    assert table.max_page_id == int(indices[2: int(indptr[-1])].max())
    indptr.fill_(0)
    last.fill_(2)
    assert table.kv_lens.tolist() == LENS_AFTER and table.indptr.tolist() == given_indptr


@pytest.mark.parametrize("append_counts, extra", [([1, 0, 3, 0, 7], 0), ([2, 2], 3), ([0, 0], 2), ([], 2)])
def test_get_batch_indices_positions(path, device, append_counts, extra):
    """Against the oracle; ``extra`` rows past append_indptr[-1] are padding (-1, 0)."""
    append_indptr = torch.tensor([0] + append_counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
    seq_lens = torch.tensor([c + 5 * i for i, c in enumerate(append_counts)], dtype=torch.int32).to(device)
    nnz = sum(append_counts) + extra
    bi, pos = page.get_batch_indices_positions(append_indptr, seq_lens, nnz)
    want_bi, want_pos = batch_indices_positions_oracle(append_indptr.cpu(), seq_lens.cpu(), nnz)
    assert bi.dtype == pos.dtype == torch.int32 and bi.device == pos.device == append_indptr.device
    assert bi.tolist() == want_bi and pos.tolist() == want_pos


def test_get_batch_indices_positions_preallocated_int64_and_offset(path, device):
    """Preallocated outputs are filled and returned; int64 inputs; append_indptr[0] > 0 leaves the
    rows before it as padding."""
    append_indptr = torch.tensor([2, 5, 5, 9], dtype=torch.int64, device=device)
    seq_lens = torch.tensor([3, 8, 40], dtype=torch.int64, device=device)
    bi_buf = torch.full((9,), 77, dtype=torch.int32, device=device)
    pos_buf = torch.full((9,), 77, dtype=torch.int32, device=device)
    bi, pos = page.get_batch_indices_positions(append_indptr, seq_lens, 9, batch_indices=bi_buf, positions=pos_buf)
    assert bi is bi_buf and pos is pos_buf
    want_bi, want_pos = batch_indices_positions_oracle(append_indptr.cpu(), seq_lens.cpu(), 9)
    assert bi.tolist() == want_bi and pos.tolist() == want_pos


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_round_trip(path, device, page_size):
    """get_seq_lens -> get_batch_indices_positions -> append, then read every request back token by
    token: old tokens unchanged, appended tokens at the end."""
    heads, dim, dtype, layout = 2, 16, torch.bfloat16, "HND"
    lens_before = [0, 7, 16, 33, 3]
    lens_after = [2, 7, 17, 50, 4]
    num_pages = sum(-(-n // page_size) for n in lens_after) + 3
    indices, indptr, last = page_table(lens_after, page_size, num_pages, device, lead=1)
    cache = make_cache("tuple", num_pages, page_size, heads, dim, layout, dtype, device)
    old = read_paged_kv_oracle(*paged_cache_f64(cache, layout), indices.cpu(), indptr.cpu(), last.cpu())

    seq_lens = page.get_seq_lens(indptr, last, page_size)
    assert seq_lens.tolist() == lens_after
    counts = [a - b for a, b in zip(lens_after, lens_before)]
    append_indptr = torch.tensor([0] + counts).cumsum(0).to(torch.int32).to(device)
    nnz = sum(counts)
    bi, pos = page.get_batch_indices_positions(append_indptr, seq_lens, nnz)
    key, value = make_append(nnz, heads, dim, dtype, device)
    page.append_paged_kv_cache(key, value, bi, pos, cache, indices, indptr, last, kv_layout=layout)

    new = read_paged_kv_oracle(*paged_cache_f64(cache, layout), indices.cpu(), indptr.cpu(), last.cpu())
    for b, (n0, n1) in enumerate(zip(lens_before, lens_after)):
        rows = slice(int(append_indptr[b]), int(append_indptr[b + 1]))
        for got, prev, app in ((new[b][0], old[b][0], key), (new[b][1], old[b][1], value)):
            assert got.shape[0] == n1
            assert torch.equal(got[:n0], prev[:n0]), f"request {b}: old tokens changed"
            assert torch.equal(got[n0:], app[rows].double().cpu()), f"request {b}: appended tokens wrong"


# ---------------------------------------------------------------------------------------------
# Errors (validation runs in the API layer, before any path is chosen)
# ---------------------------------------------------------------------------------------------


def _append_args(**over):
    page_size, heads, dim = 4, 2, 16
    indices, indptr, last = page_table(LENS_AFTER, page_size, 12, "cpu", lead=0)
    cache = torch.randn(12, 2, page_size, heads, dim).half()
    bi, pos = rows_for(LENS_BEFORE, LENS_AFTER)
    key = torch.randn(bi.numel(), heads, dim).half()
    args = dict(append_key=key, append_value=key.clone(), batch_indices=bi, positions=pos, paged_kv_cache=cache,
                kv_indices=indices, kv_indptr=indptr, kv_last_page_len=last, kv_layout="NHD")
    args.update(over)
    return args


def _with(**over):
    return _append_args(**over)


def _nnz():
    return _append_args()["append_key"].shape[0]


APPEND_ERRORS = [
    ("layout", lambda: _with(kv_layout="NDH"), InvalidOptionError, "kv_layout"),
    ("layout lowercase", lambda: _with(kv_layout="nhd"), KeyError, "kv_layout"),
    ("heads", lambda: _with(append_key=torch.randn(_nnz(), 3, 16).half()), ValueError, "append_key"),
    ("head_dim", lambda: _with(append_value=torch.randn(_nnz(), 2, 8).half()), ValueError, "append_value"),
    ("rank", lambda: _with(append_key=torch.randn(_nnz(), 32).half()), ValueError, "append_key"),
    ("dtype", lambda: _with(append_key=torch.randn(_nnz(), 2, 16).bfloat16()), TypeError, "append_key"),
    ("value dtype", lambda: _with(append_value=torch.randn(_nnz(), 2, 16)), TypeError, "append_value"),
    ("not a tensor", lambda: _with(append_key=[1.0]), TypeError, "append_key"),
    ("device", lambda: _with(append_key=torch.empty(_nnz(), 2, 16, dtype=torch.half, device="meta")), ValueError,
     "append_key"),
    ("nnz value", lambda: _with(append_value=torch.randn(_nnz() - 1, 2, 16).half()), ValueError, "append_value"),
    ("nnz batch_indices", lambda: _with(batch_indices=torch.zeros(_nnz() + 1, dtype=torch.int32)), ValueError,
     "batch_indices"),
    ("nnz positions", lambda: _with(positions=torch.zeros(_nnz() - 2, dtype=torch.int32)), ValueError, "positions"),
    ("float batch_indices", lambda: _with(batch_indices=torch.zeros(_nnz())), TypeError, "batch_indices"),
    ("float positions", lambda: _with(positions=torch.zeros(_nnz(), dtype=torch.float16)), TypeError, "positions"),
    ("int16 kv_indices", lambda: _with(kv_indices=torch.zeros(12, dtype=torch.int16)), TypeError, "kv_indices"),
    ("float kv_indptr", lambda: _with(kv_indptr=torch.zeros(6)), TypeError, "kv_indptr"),
    ("float last_page_len", lambda: _with(kv_last_page_len=torch.ones(5)), TypeError, "kv_last_page_len"),
    ("2-D positions", lambda: _with(positions=torch.zeros(_nnz(), 1, dtype=torch.int32)), ValueError, "positions"),
    ("last_page_len length", lambda: _with(kv_last_page_len=torch.ones(4, dtype=torch.int32)), ValueError,
     "kv_last_page_len"),
    ("batch index too large", lambda: _with(batch_indices=torch.full((_nnz(),), 5, dtype=torch.int32)), ValueError,
     "batch_indices"),
    ("batch index -2", lambda: _with(batch_indices=torch.full((_nnz(),), -2, dtype=torch.int32)), ValueError,
     "batch_indices"),
    ("position past pages", lambda: _with(positions=_append_args()["positions"] + 4), ValueError, "positions"),
    ("negative position", lambda: _with(positions=_append_args()["positions"] - 6), ValueError, "positions"),
    ("page id out of cache", lambda: _with(kv_indices=_append_args()["kv_indices"] + 10), ValueError, "indices"),
    ("indptr decreasing", lambda: _with(kv_indptr=torch.tensor([0, 2, 1, 5, 6, 8], dtype=torch.int32)), ValueError,
     "indptr"),
    ("last_page_len > page_size", lambda: _with(kv_last_page_len=torch.tensor([2, 0, 5, 4, 1], dtype=torch.int32)),
     ValueError, "last_page_len"),
    ("cache rank", lambda: _with(paged_kv_cache=torch.randn(12, 2, 4, 2, 16, 1).half()), ValueError,
     "paged_kv_cache"),
    ("cache type", lambda: _with(paged_kv_cache="cache"), TypeError, "paged_kv_cache"),
    ("cache dtype", lambda: _with(paged_kv_cache=torch.zeros(12, 2, 4, 2, 16, dtype=torch.int16),
                                  append_key=torch.zeros(_nnz(), 2, 16, dtype=torch.int16),
                                  append_value=torch.zeros(_nnz(), 2, 16, dtype=torch.int16)), TypeError,
     "paged_kv_cache"),
]


@pytest.mark.parametrize("name, make, error, match", APPEND_ERRORS, ids=[e[0] for e in APPEND_ERRORS])
def test_append_errors(name, make, error, match):
    args = make()
    cache = args["paged_kv_cache"]
    before = cache.clone() if isinstance(cache, torch.Tensor) else None
    with pytest.raises(error, match=match):
        page.append_paged_kv_cache(**args)
    if before is not None and before.dtype.is_floating_point:
        assert torch.equal(cache, before), "a rejected call must not write"


def _mla_args(**over):
    indices, indptr, last = page_table(LENS_AFTER, 4, 12, "cpu", lead=0)
    bi, pos = rows_for(LENS_BEFORE, LENS_AFTER)
    args = dict(append_ckv=torch.randn(bi.numel(), 64).half(), append_kpe=torch.randn(bi.numel(), 16).half(),
                batch_indices=bi, positions=pos, ckv_cache=torch.randn(12, 4, 64).half(),
                kpe_cache=torch.randn(12, 4, 16).half(), kv_indices=indices, kv_indptr=indptr, kv_last_page_len=last)
    args.update(over)
    return args


MLA_ERRORS = [
    ("ckv dim", lambda: _mla_args(append_ckv=torch.randn(7, 32).half()), ValueError, "append_ckv"),
    ("kpe dtype", lambda: _mla_args(append_kpe=torch.randn(7, 16).bfloat16()), TypeError, "append_kpe"),
    ("kpe rows", lambda: _mla_args(append_kpe=torch.randn(6, 16).half()), ValueError, "append_kpe"),
    ("cache pages", lambda: _mla_args(kpe_cache=torch.randn(11, 4, 16).half()), ValueError, "kpe_cache"),
    ("cache rank", lambda: _mla_args(ckv_cache=torch.randn(12, 4, 1, 64).half()), ValueError, "ckv_cache"),
    ("position", lambda: _mla_args(positions=_mla_args()["positions"] + 8), ValueError, "positions"),
]


@pytest.mark.parametrize("name, make, error, match", MLA_ERRORS, ids=[e[0] for e in MLA_ERRORS])
def test_append_mla_errors(name, make, error, match):
    with pytest.raises(error, match=match):
        page.append_paged_mla_kv_cache(**make())


def _gbip_args(**over):
    args = dict(append_indptr=torch.tensor([0, 2, 5], dtype=torch.int32),
                seq_lens=torch.tensor([4, 3], dtype=torch.int32), nnz=5)
    args.update(over)
    return args


GBIP_ERRORS = [
    ("nnz tensor", _gbip_args(nnz=torch.tensor(5)), TypeError, "nnz"),
    ("nnz float", _gbip_args(nnz=5.0), TypeError, "nnz"),
    ("nnz negative", _gbip_args(nnz=-1), ValueError, "nnz"),
    ("indptr float", _gbip_args(append_indptr=torch.tensor([0.0, 2.0, 5.0])), TypeError, "append_indptr"),
    ("indptr decreasing", _gbip_args(append_indptr=torch.tensor([0, 3, 2], dtype=torch.int32)), ValueError,
     "append_indptr"),
    ("seq_lens length", _gbip_args(seq_lens=torch.tensor([4], dtype=torch.int32)), ValueError, "seq_lens"),
    ("seq_lens too short", _gbip_args(seq_lens=torch.tensor([4, 2], dtype=torch.int32)), ValueError, "seq_lens"),
    ("out dtype", _gbip_args(batch_indices=torch.zeros(5, dtype=torch.int64)), TypeError, "batch_indices"),
    ("out shape", _gbip_args(positions=torch.zeros(4, dtype=torch.int32)), ValueError, "positions"),
]


@pytest.mark.parametrize("name, args, error, match", GBIP_ERRORS, ids=[e[0] for e in GBIP_ERRORS])
def test_get_batch_indices_positions_errors(name, args, error, match):
    with pytest.raises(error, match=match):
        page.get_batch_indices_positions(**args)


@pytest.mark.parametrize("args, error, match", [
    ((torch.tensor([0, 1], dtype=torch.int32), torch.tensor([1], dtype=torch.int32), 0), ValueError, "page_size"),
    ((torch.tensor([0, 1], dtype=torch.int32), torch.tensor([1], dtype=torch.int32), 2.0), TypeError, "page_size"),
    ((torch.tensor([0.0, 1.0]), torch.tensor([1], dtype=torch.int32), 4), TypeError, "kv_indptr"),
    ((torch.tensor([0, 1], dtype=torch.int32), torch.tensor([1, 1], dtype=torch.int32), 4), ValueError,
     "kv_last_page_len"),
])
def test_get_seq_lens_errors(args, error, match):
    with pytest.raises(error, match=match):
        page.get_seq_lens(*args)


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------


def _op_args(form, device):
    heads, dim, page_size = 2, 16, 3
    indices, indptr, _ = page_table(LENS_AFTER, page_size, 16, device)
    cache = make_cache(form, 16, page_size, heads, dim, "HND", torch.float16, device)
    k_or_cache, v_cache = (cache, None) if isinstance(cache, torch.Tensor) else cache
    bi, pos = rows_for(LENS_BEFORE, LENS_AFTER)
    key, value = make_append(bi.numel(), heads, dim, torch.float16, device)
    return (key, value, bi.to(device), pos.to(device), k_or_cache, v_cache, indices, indptr, "HND", "auto")


@pytest.mark.parametrize("form", ["5d", "tuple"])
def test_opcheck_append(path, device, form):
    torch.library.opcheck(ops_page.append_paged_kv_cache, _op_args(form, device))


def test_opcheck_append_mla(path, device):
    indices, indptr, _ = page_table(LENS_AFTER, 2, 24, device)
    bi, pos = rows_for(LENS_BEFORE, LENS_AFTER)
    n = bi.numel()
    args = (torch.randn(n, 32, device=device).half(), torch.randn(n, 8, device=device).half(), bi.to(device),
            pos.to(device), torch.randn(24, 2, 32, device=device).half(), torch.randn(24, 2, 8, device=device).half(),
            indices, indptr, "auto")
    torch.library.opcheck(ops_page.append_paged_mla_kv_cache, args)


def test_torch_compile_fullgraph_append(device):
    """A decode step that appends and then reads the cache traces into one graph (no graph break)."""
    backend = "inductor" if HAS_CUDA else "aot_eager"
    heads, dim, page_size = 2, 16, 4
    indices, indptr, last = page_table(LENS_AFTER, page_size, 12, device)
    bi, pos = rows_for(LENS_BEFORE, LENS_AFTER)
    bi, pos = bi.to(device), pos.to(device)

    def step(key, value, cache):
        page.append_paged_kv_cache(key, value, bi, pos, cache, indices, indptr, last, "NHD")
        return cache.float().sum()

    key, value = make_append(bi.numel(), heads, dim, torch.float16, device)
    cache = torch.randn(12, 2, page_size, heads, dim, device=device).half()
    cache2 = cache.clone()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    got = compiled(key, value, cache)
    want = step(key, value, cache2)
    assert torch.equal(cache, cache2)
    torch.testing.assert_close(got, want)


def test_bench_page_smoke(tmp_path):
    """The page_append benchmark suite runs on CPU (--smoke) and every provider writes the same cache."""
    from benchmarks import harness
    from benchmarks.bench_page import append_cases

    records = harness.run_suite(harness.SUITES["page_append"], smoke=True, log=lambda s: None)
    by = {(r["case"], r["provider"]): r for r in records}
    for case in append_cases(True):
        assert case.bytes == 2 * 2 * case.params["nnz"] * case.params["num_kv_heads"] * case.params["head_dim"] * 2
        assert by[case.name, "flashtile"]["status"] == "ok"
        for name in ("torch_index_slots", "torch_index_table"):
            r = by[case.name, name]
            assert r["status"] == "ok" and r["diff_ref"] == "flashtile" and r["max_abs_diff"] == 0, r


# ---------------------------------------------------------------------------------------------
# GPU: real shapes, CUDA-graph capture
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("lens_before, lens_after", [
    ([(7 * i) % 64 for i in range(512)], [1 + (7 * i) % 64 for i in range(512)]),  # decode step, batch 512
    ([0, 5, 100, 0], [300, 305, 400, 17]),  # prefill / chunked prefill
], ids=["decode512", "prefill"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_append_gpu_real_shapes(lens_before, lens_after, layout):
    device, page_size, heads, dim, dtype = torch.device("cuda"), 16, 8, 128, torch.bfloat16
    num_pages = sum(-(-n // page_size) for n in lens_after) + 5
    indices, indptr, last = page_table(lens_after, page_size, num_pages, device)
    cache = make_cache("5d", num_pages, page_size, heads, dim, layout, dtype, device)
    bi, pos = rows_for(lens_before, lens_after)
    key, value = make_append(bi.numel(), heads, dim, dtype, device)
    expected = append_paged_kv_oracle(key, value, bi, pos, cache, indices.cpu(), indptr.cpu(), layout)
    page.append_paged_kv_cache(key, value, bi.to(device), pos.to(device), cache, indices, indptr, last, layout)
    torch.cuda.synchronize()
    assert_cache_equals(cache, layout, expected)


@pytest.mark.gpu
def test_append_cuda_graph_replay():
    """get_batch_indices_positions + append captured in one CUDA graph; replays with new rows and a
    new page table (same shapes) write where the new table says."""
    device, page_size, heads, dim, dtype = torch.device("cuda"), 16, 8, 128, torch.bfloat16
    lens_before, lens_after = [40, 0, 15, 99], [41, 1, 16, 100]
    num_pages = 40
    indices, indptr, last = page_table(lens_after, page_size, num_pages, device)
    cache = torch.randn(num_pages, 2, page_size, heads, dim, device=device).to(dtype)
    append_indptr = torch.arange(5, dtype=torch.int32, device=device)
    seq_lens = page.get_seq_lens(indptr, last, page_size)
    key = torch.empty(4, heads, dim, dtype=dtype, device=device)
    value = torch.empty_like(key)
    bi = torch.empty(4, dtype=torch.int32, device=device)
    pos = torch.empty(4, dtype=torch.int32, device=device)

    def step():
        page.get_batch_indices_positions(append_indptr, seq_lens, 4, batch_indices=bi, positions=pos)
        page.append_paged_kv_cache(key, value, bi, pos, cache, indices, indptr, last)

    key.normal_(), value.normal_()
    graph, _ = capture_graph(step)
    for _trial in range(2):
        new_indices, _, _ = page_table(lens_after, page_size, num_pages, device)
        indices.copy_(new_indices)
        key.copy_(torch.randn_like(key, dtype=torch.float32).to(dtype))
        value.copy_(torch.randn_like(value, dtype=torch.float32).to(dtype))
        want_bi, want_pos = rows_for(lens_before, lens_after)
        expected = append_paged_kv_oracle(key, value, want_bi, want_pos, cache, indices.cpu(), indptr.cpu(), "NHD")
        graph.replay()
        torch.cuda.synchronize()
        assert bi.tolist() == want_bi.tolist() and pos.tolist() == want_pos.tolist()
        assert_cache_equals(cache, "NHD", expected)
