"""scheduler/block_sparse.py: property tests of the mapping from sparse patterns to paged-prefill
requests. The requests, expanded back to a dense visibility (what the paged kernel computes from the
page table, the packed mask or its bottom-right causal flag), must equal the pattern's dense mask
(tests/oracles.py), with no key listed twice in a request."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashtile.scheduler.block_sparse import bsr_requests, expand_requests, variable_requests
from oracles import bsr_dense_mask, variable_dense_mask


def _no_repeated_keys(req):
    for b in range(req.batch_size):
        pages = req.kv_indices[req.kv_indptr[b]:req.kv_indptr[b + 1]]
        assert np.unique(pages).size == pages.size


@st.composite
def bsr_patterns(draw):
    R = draw(st.integers(1, 5))
    C = draw(st.integers(1, 5))
    M = draw(st.integers(1, 20))
    NB = draw(st.integers(1, 6))
    N = NB * C
    MB = -(-M // R)
    rows = []
    for _ in range(MB):
        kind = draw(st.sampled_from(["empty", "full", "random", "random"]))
        cols = [] if kind == "empty" else list(range(NB)) if kind == "full" else \
            sorted(draw(st.sets(st.integers(0, NB - 1), max_size=NB)))
        rows.append(draw(st.permutations(cols)))
    offset = draw(st.integers(0, 2))  # indptr[0] > 0 selects a window of a longer indices array
    flat = [c for row in rows for c in row]
    indices = torch.tensor([0] * offset + flat, dtype=torch.int32)
    indptr = torch.tensor(np.concatenate([[0], np.cumsum([len(r) for r in rows])]) + offset, dtype=torch.int32)
    return indptr, indices, M, N, R, C


@settings(max_examples=150, deadline=None)
@given(bsr_patterns(), st.sampled_from(["plain", "causal", "mask"]), st.integers(0, 2**31 - 1))
def test_bsr_requests_cover_the_pattern(pattern, mode, seed):
    indptr, indices, M, N, R, C = pattern
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(indices.numel(), R, C, generator=gen) < 0.5 if mode == "mask" else None
    req = bsr_requests(indptr, indices, M, N, R, C, mask=mask, causal=mode == "causal")
    assert req.page_size % C == 0 and N % req.page_size == 0 and req.batch_size == -(-M // R)
    assert np.array_equal(req.qo_indptr, np.minimum(R * np.arange(req.batch_size + 1), M))
    _no_repeated_keys(req)
    off = int(indptr[0])
    want = bsr_dense_mask(indptr - off, indices[off:], M, N, R, C,
                          mask=None if mask is None else mask[off:], causal=mode == "causal").numpy()
    assert np.array_equal(expand_requests(req, M, N), want)


def test_causal_uses_the_kernel_flag_when_blocks_end_on_the_diagonal():
    # Block-lower-triangular with R == C: every row ends on its diagonal block.
    MB = 5
    pattern = np.tril(np.ones((MB, MB), dtype=bool))
    indptr = torch.tensor(np.concatenate([[0], np.cumsum(pattern.sum(1))]), dtype=torch.int32)
    indices = torch.tensor(np.concatenate([np.arange(b + 1)[::-1] for b in range(MB)]), dtype=torch.int32)
    req = bsr_requests(indptr, indices, MB * 4, MB * 4, 4, 4, causal=True)
    assert req.causal and req.packed_mask is None
    # A ragged last block row (M not a multiple of R) cannot end on a full diagonal block: a mask.
    req = bsr_requests(indptr, indices, MB * 4 - 1, MB * 4, 4, 4, causal=True)
    assert not req.causal and req.packed_mask is not None
    # Vector sparsity keeping the diagonal tokens: the flag again.
    M = 7
    keep = np.tril(np.ones((M, M), dtype=bool)) & (np.random.default_rng(0).random((M, M)) < 0.5)
    keep |= np.eye(M, dtype=bool)
    indptr = torch.tensor(np.concatenate([[0], np.cumsum(keep.sum(1))]), dtype=torch.int32)
    req = bsr_requests(indptr, torch.tensor(np.nonzero(keep)[1], dtype=torch.int32), M, M, 1, 1, causal=True)
    assert req.causal and req.packed_mask is None


def test_aligned_runs_are_merged_into_pages():
    # Rows keeping whole aligned groups of 4 block columns: pages of 4 * C keys.
    indptr = torch.tensor([0, 8, 8, 12], dtype=torch.int32)
    indices = torch.tensor([7, 6, 5, 4, 0, 1, 2, 3, 8, 9, 10, 11], dtype=torch.int32)
    req = bsr_requests(indptr, indices, 9, 24, 3, 2, causal=False)
    assert req.page_size == 8 and req.kv_indices.tolist() == [0, 1, 2]
    assert np.array_equal(expand_requests(req, 9, 24), bsr_dense_mask(indptr, indices, 9, 24, 3, 2).numpy())
    # One unaligned run keeps the pages as given.
    req = bsr_requests(indptr, torch.tensor([7, 6, 5, 4, 1, 2, 3, 8, 9, 10, 11, 0], dtype=torch.int32), 9, 24, 3, 2)
    assert req.page_size == 2


@st.composite
def variable_patterns(draw):
    H = draw(st.integers(1, 3))
    MB, NB = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    qo_len, kv_len = draw(st.integers(0, 12)), draw(st.integers(0, 12))

    def sizes(total, blocks):
        cuts = sorted(draw(st.lists(st.integers(0, total), min_size=blocks - 1, max_size=blocks - 1)))
        return np.diff([0, *cuts, total])

    rows = torch.tensor(np.stack([sizes(qo_len, MB) for _ in range(H)]), dtype=torch.int64)
    cols = torch.tensor(np.stack([sizes(kv_len, NB) for _ in range(H)]), dtype=torch.int32)
    bm = torch.tensor(draw(st.lists(st.booleans(), min_size=H * MB * NB, max_size=H * MB * NB))).view(H, MB, NB)
    return bm, rows, cols


@settings(max_examples=150, deadline=None)
@given(variable_patterns(), st.booleans())
def test_variable_requests_cover_the_pattern(pattern, causal):
    bm, rows, cols = pattern
    H = bm.shape[0]
    req, qo_len, kv_len = variable_requests(bm, rows, cols, H, causal=causal)
    assert (H * kv_len) % req.page_size == 0 and req.batch_size == H * bm.shape[1]
    _no_repeated_keys(req)
    dense = variable_dense_mask(bm, rows, cols, causal=causal).numpy()
    want = np.zeros((H * qo_len, H * kv_len), dtype=bool)  # kernel rows (h, i), keys (h, j)
    for h in range(H):
        want[h * qo_len:(h + 1) * qo_len, h * kv_len:(h + 1) * kv_len] = dense[h]
    assert np.array_equal(expand_requests(req, H * qo_len, H * kv_len), want)
