"""Property tests of the split-KV planner: coverage exactly once, alignment, bounded split count."""

from hypothesis import given, settings
from hypothesis import strategies as st

from flashtile.scheduler.split_kv import PROGRAMS_PER_SM, plan_kv_splits


@settings(max_examples=400, deadline=None)
@given(
    kv_len=st.integers(0, 1 << 20),
    base=st.integers(1, 4096),
    sms=st.integers(1, 256),
    align=st.sampled_from([16, 64, 256]),
)
def test_splits_cover_every_token_once(kv_len, base, sms, align):
    splits, chunk = plan_kv_splits(kv_len, base, sms, align)
    assert splits >= 1 and chunk >= align and chunk % align == 0
    covered = [(s * chunk, min((s + 1) * chunk, kv_len)) for s in range(splits)]
    # Contiguous, disjoint, in order, exactly [0, kv_len); no split is empty unless kv_len == 0.
    assert covered[0][0] == 0 and covered[-1][1] == kv_len
    for (a0, a1), (b0, _) in zip(covered, covered[1:]):
        assert a1 == b0
    if kv_len > 0:
        assert all(b > a for a, b in covered)
    # Imbalance: all splits but the last are equal (by construction above). Grid size: wanted =
    # cdiv(target, base) overshoots by < base programs, and rounding the chunk down by < 1.5x (+1 split).
    assert splits * base <= 1.5 * PROGRAMS_PER_SM * sms + 2 * base


@given(kv_len=st.integers(1, 1 << 18), sms=st.integers(16, 160))
def test_enough_programs_for_a_long_request(kv_len, sms):
    """One long request with few heads fills the GPU unless the chunks would get too small."""
    splits, chunk = plan_kv_splits(kv_len, 8, sms, 256)
    if kv_len >= 2 * 256 * PROGRAMS_PER_SM * sms:
        assert splits * 8 >= PROGRAMS_PER_SM * sms


# ------------------------------------------------------------------------------------------------
# Batch planner: every (request, kv token) covered exactly once, bounded item count and imbalance
# ------------------------------------------------------------------------------------------------

import torch  # noqa: E402

from flashtile.scheduler.split_kv import (  # noqa: E402
    BATCH_PROGRAMS_PER_SM,
    MIN_CHUNK_TILES,
    batch_item_capacity,
    plan_batch_kv_splits,
)


@settings(max_examples=300, deadline=None)
@given(
    lens=st.lists(st.integers(0, 1 << 17), min_size=1, max_size=64),
    heads=st.sampled_from([1, 2, 8, 32]),
    sms=st.integers(1, 160),
    align=st.sampled_from([16, 128]),
    mode=st.sampled_from(["auto", "fixed", "disable"]),
    fixed=st.integers(1, 5000),
)
def test_batch_items_cover_every_token_once(lens, heads, sms, align, mode, fixed):
    kv = torch.tensor(lens)
    plan = plan_batch_kv_splits(kv, heads, sms, align, fixed_chunk=fixed if mode == "fixed" else None,
                                disable_split=mode == "disable")
    ip = plan.request_item_indptr.tolist()
    assert ip[0] == 0 and ip[-1] == plan.num_items
    assert plan.chunk % align == 0 and plan.chunk >= align
    for r, n in enumerate(lens):
        items = range(ip[r], ip[r + 1])
        assert len(items) >= 1, "every request has at least one item (empty ones write zeros)"
        assert all(plan.item_request[w] == r for w in items)
        starts = [int(plan.item_kv_start[w]) for w in items]
        ends = [int(plan.item_kv_end[w]) for w in items]
        # Contiguous, in order, disjoint, exactly [0, n); chunk-aligned starts; no item longer than a chunk.
        assert starts[0] == 0 and ends[-1] == n
        assert all(e == s for e, s in zip(ends, starts[1:]))
        assert all(s % plan.chunk == 0 and 0 <= e - s <= plan.chunk for s, e in zip(starts, ends))
        if n > 0:
            assert all(e > s for s, e in zip(starts, ends))
    if mode == "auto":
        assert plan.num_items <= batch_item_capacity(len(lens), heads, sms)
        # Imbalance: no item is longer than the per-item share of the total work (rounded to the
        # alignment), or than the minimum chunk when the total is small.
        target = max(1, (BATCH_PROGRAMS_PER_SM * sms) // heads)
        share = -(-max(sum(lens), 1) // target)
        assert plan.chunk <= max(MIN_CHUNK_TILES * align, share + align)
    if mode == "disable":
        assert plan.num_items == len(lens)


@given(other=st.lists(st.integers(0, 1 << 15), max_size=20), n=st.integers(1, 1 << 16), fixed=st.integers(1, 4096))
def test_fixed_chunk_does_not_depend_on_the_batch(other, n, fixed):
    alone = plan_batch_kv_splits(torch.tensor([n]), 8, 132, 128, fixed_chunk=fixed)
    mixed = plan_batch_kv_splits(torch.tensor(other + [n]), 8, 132, 128, fixed_chunk=fixed)
    last = slice(int(mixed.request_item_indptr[-2]), int(mixed.request_item_indptr[-1]))
    assert torch.equal(alone.item_kv_start, mixed.item_kv_start[last])
    assert torch.equal(alone.item_kv_end, mixed.item_kv_end[last])
