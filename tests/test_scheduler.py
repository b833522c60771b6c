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
    for (_a0, a1), (b0, _) in zip(covered, covered[1:]):
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

import numpy as np  # noqa: E402
import pytest  # noqa: E402
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
    assert alone.item_kv_start.tolist() == mixed.item_kv_start[last].tolist()
    assert alone.item_kv_end.tolist() == mixed.item_kv_end[last].tolist()


@pytest.mark.parametrize("form", ["list", "int32 tensor", "int64 tensor", "numpy"])
def test_planners_take_lists_tensors_and_arrays(form):
    """The documented argument types give the same plans (the reference: int64 tensors)."""
    qo, kv = [3, 0, 40, 7], [900, 2, 40, 5000]
    convert = {"list": list, "int32 tensor": lambda x: torch.tensor(x, dtype=torch.int32),
               "int64 tensor": lambda x: torch.tensor(x, dtype=torch.int64), "numpy": np.array}[form]
    want = plan_batch_kv_splits(torch.tensor(kv), 2, 4, 16)
    got = plan_batch_kv_splits(convert(kv), 2, 4, 16)
    assert got.chunk == want.chunk
    assert got.num_items == want.num_items == sum(max(1, -(-n // got.chunk)) for n in kv) > len(kv)
    for name in ("request_item_indptr", "item_request", "item_kv_start", "item_kv_end"):
        assert getattr(got, name).tolist() == getattr(want, name).tolist()
    kwargs = dict(group=2, block_m=16, causal=True, window_left=-1, programs_per_item=2, num_sms=4, align=16)
    want = plan_prefill_work(torch.tensor(qo), torch.tensor(kv), **kwargs)
    got = plan_prefill_work(convert(qo), convert(kv), **kwargs)
    assert (got.chunk, got.group_items, got.num_items, got.num_merges) == (want.chunk, want.group_items,
                                                                          want.num_items, want.num_merges)
    assert torch.equal(pack_prefill_meta(got, torch.zeros(4, 5, dtype=torch.int64), got.num_items, got.num_merges),
                       pack_prefill_meta(want, np.zeros((4, 5), dtype=np.int64), want.num_items, want.num_merges))


# ------------------------------------------------------------------------------------------------
# Prefill work list: every visible (row, key) covered exactly once, capacities, launch order
# ------------------------------------------------------------------------------------------------

from flashtile.scheduler.prefill_work import (  # noqa: E402
    meta_requests,
    pack_prefill_meta,
    plan_prefill_work,
    prefill_capacity,
)


@settings(max_examples=300, deadline=None)
@given(
    reqs=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 5000)), min_size=1, max_size=24),
    group=st.sampled_from([1, 3, 4, 8]),
    block_m=st.sampled_from([16, 64, 128]),
    causal=st.booleans(),
    window=st.sampled_from([-1, 0, 37, 1000]),
    heads=st.sampled_from([1, 8, 32]),
    sms=st.integers(1, 160),
    align=st.sampled_from([16, 128]),
    mode=st.sampled_from(["auto", "auto", "fixed", "disable"]),
)
def test_prefill_items_cover_visible_keys_once(reqs, group, block_m, causal, window, heads, sms, align, mode):
    qo = torch.tensor([a for a, _ in reqs])
    kv = torch.tensor([b for _, b in reqs])
    work = plan_prefill_work(qo, kv, group=group, block_m=block_m, causal=causal, window_left=window,
                             programs_per_item=heads, num_sms=sms, align=align,
                             fixed_chunk=300 if mode == "fixed" else None, disable_split=mode == "disable")
    items = {}
    for w in range(work.num_items):
        key = (int(work.item_request[w]), int(work.item_row_block[w]))
        items.setdefault(key, []).append((int(work.item_kv_start[w]), int(work.item_kv_end[w]), int(work.item_slot[w])))
    merges = {(int(r), int(b)): (int(s), int(n)) for r, b, s, n in zip(
        work.merge_request, work.merge_row_block, work.merge_slot_start, work.merge_num_slots)}
    used_slots = []
    for r, (n_q, n_k) in enumerate(reqs):
        rows = n_q * group
        blocks = -(-rows // block_m)
        assert {b for (rr, b) in items if rr == r} == set(range(blocks)), "one or more items per tile"
        for b in range(blocks):
            pieces = sorted(items[(r, b)])
            # Disjoint, ordered pieces, starting on aligned keys.
            assert all(a1 <= b0 for (_, a1, _), (b0, _, _) in zip(pieces, pieces[1:]))
            assert all(s % align == 0 and s <= e for s, e, _ in pieces)
            covered = set()
            for s, e, _ in pieces:
                covered.update(range(s, e))
            # Every key a row of the tile can see is covered.
            first_t, last_t = (b * block_m) // group, min(b * block_m + block_m - 1, rows - 1) // group
            for t in {first_t, last_t}:
                pos = n_k - n_q + t
                lo = max(0, pos - window) if window >= 0 else 0
                hi = min(n_k, pos + 1) if causal else n_k
                assert set(range(lo, max(lo, hi))) <= covered, (r, b, t)
            slots = [slot for _, _, slot in pieces]
            if len(pieces) == 1:
                assert slots == [-1] and (r, b) not in merges
            else:
                start, count = merges[(r, b)]
                assert count == len(pieces) and sorted(slots) == list(range(start, start + count))
                used_slots += slots
    assert sorted(used_slots) == list(range(work.num_slots)), "slots are dense"
    _check_launch_order(work)
    if mode == "auto":
        cap_items, cap_merges, cap_slots = prefill_capacity(len(reqs), int(qo.sum()) * group, block_m, heads, sms)
        assert work.num_items <= cap_items and work.num_merges <= cap_merges and work.num_slots <= cap_slots


def _check_launch_order(work):
    """Each request's items contiguous and longest first; requests by their longest item, longest
    first; group_items is the most items of any request."""
    lengths = (work.item_kv_end - work.item_kv_start).tolist()
    requests = work.item_request.tolist()
    runs = []  # (request, lengths of its items) in launch order
    for r, n in zip(requests, lengths):
        if runs and runs[-1][0] == r:
            runs[-1][1].append(n)
        else:
            runs.append((r, [n]))
    assert len({r for r, _ in runs}) == len(runs), "a request's items are contiguous"
    for _, ns in runs:
        assert ns == sorted(ns, reverse=True), "longest first within a request"
    firsts = [ns[0] for _, ns in runs]
    assert firsts == sorted(firsts, reverse=True), "requests by their longest item"
    assert work.group_items == max([len(ns) for _, ns in runs], default=1)


def test_prefill_launch_order_groups_a_request():
    """Equal prompts: request 0's row blocks (longest first), then request 1's, ...; a long prompt
    placed last in the batch still launches first."""
    work = plan_prefill_work(torch.tensor([256, 256]), torch.tensor([256, 256]), group=1, block_m=64, causal=True,
                             window_left=-1, programs_per_item=4, num_sms=132, align=64, disable_split=True)
    assert work.item_request.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert work.item_row_block.tolist() == [3, 2, 1, 0, 3, 2, 1, 0]
    assert work.group_items == 4
    skewed = plan_prefill_work(torch.tensor([64, 64, 1024]), torch.tensor([64, 64, 1024]), group=1, block_m=64,
                               causal=True, window_left=-1, programs_per_item=4, num_sms=132, align=64,
                               disable_split=True)
    assert skewed.item_request.tolist() == [2] * 16 + [0, 1]
    assert skewed.group_items == 16


def test_prefill_splits_few_long_tiles_only():
    """One chunked prefill (few tiles, long cache) is cut along KV; a big prefill batch is not."""
    long = plan_prefill_work(torch.tensor([64]), torch.tensor([60000]), group=4, block_m=128, causal=True,
                             window_left=-1, programs_per_item=8, num_sms=132, align=128)
    assert long.num_items >= 32 and long.num_merges == 2
    big = plan_prefill_work(torch.tensor([1024] * 16), torch.tensor([1024] * 16), group=4, block_m=128, causal=True,
                            window_left=-1, programs_per_item=8, num_sms=132, align=128)
    assert big.num_merges == 0 and big.num_items == 16 * 32


def test_prefill_meta_roundtrip():
    work = plan_prefill_work(torch.tensor([3, 0, 40]), torch.tensor([900, 2, 40]), group=2, block_m=16, causal=True,
                             window_left=-1, programs_per_item=2, num_sms=4, align=16)
    requests = torch.arange(15).view(3, 5)
    meta = pack_prefill_meta(work, requests, work.num_items + 3, work.num_merges + 1)
    assert meta[0] == work.num_items and meta[1] == work.num_merges and meta[2] == work.group_items
    assert torch.equal(meta_requests(meta, 3), requests.to(torch.int32))


# ------------------------------------------------------------------------------------------------
# Mixed batches (BatchAttention, chunked prefill): one prefill chunk with decodes and speculative
# verifications in one work list; every visible (request, row, key) exactly once, and balance
# ------------------------------------------------------------------------------------------------

from flashtile.scheduler.split_kv import _target_items  # noqa: E402


@settings(max_examples=150, deadline=None)
@given(
    prefill=st.tuples(st.integers(1, 4096), st.integers(0, 4096)),  # (chunk tokens, prefix tokens)
    decodes=st.lists(st.tuples(st.integers(1, 8), st.integers(1, 32768)), min_size=1, max_size=256),
    group=st.sampled_from([1, 4, 8]),
    block_m=st.sampled_from([16, 64, 128]),
    heads=st.sampled_from([1, 8]),
    sms=st.sampled_from([1, 78, 132]),
    align=st.sampled_from([16, 64]),
)
def test_mixed_batch_covers_each_key_once_and_balances(prefill, decodes, group, block_m, heads, sms, align):
    chunk, prefix = prefill
    qo = np.array([chunk] + [q for q, _ in decodes], dtype=np.int64)
    kv = np.array([chunk + prefix] + [max(k, q) for q, k in decodes], dtype=np.int64)
    work = plan_prefill_work(qo, kv, group=group, block_m=block_m, causal=True, window_left=-1,
                             programs_per_item=heads, num_sms=sms, align=align)
    pieces = {}
    for w in range(work.num_items):
        key = (int(work.item_request[w]), int(work.item_row_block[w]))
        pieces.setdefault(key, []).append((int(work.item_kv_start[w]), int(work.item_kv_end[w])))
    total = 0
    for r in range(qo.size):
        rows = int(qo[r]) * group
        for b in range(-(-rows // block_m)):
            # The tile's last row sees keys [0, its position]: the items tile exactly that range.
            last_t = min(b * block_m + block_m - 1, rows - 1) // group
            visible = int(kv[r] - qo[r]) + last_t + 1
            got = sorted(pieces.pop((r, b)))
            assert got[0][0] == 0 and got[-1][1] == visible, (r, b, got)
            assert all(e0 == s1 for (_, e0), (s1, _) in zip(got, got[1:])), "contiguous, disjoint pieces"
            total += visible
    assert not pieces, "no item outside a tile"
    # Balance: one chunk size for prefill tiles and decode tiles alike, no longer than the average work of
    # the items that fill the GPU (rounded up to the alignment, at least MIN_CHUNK_TILES tiles).
    target = _target_items(heads, sms)
    per_item = -(-total // target)
    bound = max(MIN_CHUNK_TILES * align, -(-per_item // align) * align)
    lengths = work.item_kv_end - work.item_kv_start
    assert int(lengths.max()) <= bound
    cap_items, _, _ = prefill_capacity(qo.size, int(qo.sum()) * group, block_m, heads, sms)
    assert work.num_items <= cap_items


def _item_tuples(work, positions):
    return [(int(work.item_request[w]), int(work.item_row_block[w]), int(work.item_kv_start[w]),
             int(work.item_kv_end[w]), int(work.item_slot[w])) for w in positions]


@settings(max_examples=60, deadline=None)
@given(
    reqs=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 5000)), min_size=1, max_size=12),
    group=st.sampled_from([1, 4, 8]),
    small_rows=st.sampled_from([1, 8, 64]),
    sms=st.integers(1, 160),
)
def test_prefill_interleave_is_a_class_preserving_permutation(reqs, group, small_rows, sms):
    """BatchAttention's interleaved order has the same items (so the same coverage and slots) as the plain
    order, and keeps each class (small / large requests) in its plain relative order."""
    qo = torch.tensor([min(a, b) for a, b in reqs])
    kv = torch.tensor([b for _, b in reqs])
    kwargs = dict(group=group, block_m=64, causal=True, window_left=-1, programs_per_item=8, num_sms=sms, align=64)
    plain = plan_prefill_work(qo, kv, **kwargs)
    mixed = plan_prefill_work(qo, kv, interleave_rows=small_rows, **kwargs)
    assert mixed.group_items == plain.group_items and mixed.chunk == plain.chunk
    assert sorted(_item_tuples(mixed, range(mixed.num_items))) == sorted(_item_tuples(plain, range(plain.num_items)))
    small_req = {r for r in range(len(reqs)) if int(qo[r]) * group <= small_rows}
    for want_small in (True, False):
        keep = [w for w in range(plain.num_items) if (int(plain.item_request[w]) in small_req) == want_small]
        got = [w for w in range(mixed.num_items) if (int(mixed.item_request[w]) in small_req) == want_small]
        assert _item_tuples(mixed, got) == _item_tuples(plain, keep)


def test_prefill_interleave_mixes_a_chunked_prefill_step():
    """One 2048-token chunk on a 2048-token prefix plus 64 decodes of 4096 (GQA 4, 128-row tiles): the plain
    order runs the prefill's 64 tiles first; interleaved, each half of the launch order holds about half of
    the prefill's work (rows x keys) and half of the decodes' (keys)."""
    qo = torch.tensor([2048] + [1] * 64)
    kv = torch.tensor([4096] + [4096] * 64)
    kwargs = dict(group=4, block_m=128, causal=True, window_left=-1, programs_per_item=8, num_sms=132, align=128)
    plain = plan_prefill_work(qo, kv, **kwargs)
    assert plain.item_request[:64].tolist() == [0] * 64
    mixed = plan_prefill_work(qo, kv, interleave_rows=64, **kwargs)
    n = mixed.num_items
    span = mixed.item_kv_end - mixed.item_kv_start
    prefill = mixed.item_request == 0
    work = np.where(prefill, np.minimum(8192 - mixed.item_row_block * 128, 128) * span, span)
    for cls in (prefill, ~prefill):
        first_half = work[: n // 2][cls[: n // 2]].sum() / work[cls].sum()
        assert 0.4 < first_half < 0.6
    # no run of more than a few items of one class
    runs = np.diff(np.flatnonzero(np.diff(prefill.astype(np.int8)) != 0))
    assert runs.size > 20 and runs.max() <= 4


# ------------------------------------------------------------------------------------------------
# Single-request plan (the op layer plans, the launcher launches): every key position in exactly one
# split, balanced splits, forced split counts, unsplittable launches
# ------------------------------------------------------------------------------------------------

from flashtile.scheduler.split_kv import SingleKVSplits, SingleLaunchShape, plan_single_kv_splits  # noqa: E402


def _check_single_plan(plan: SingleKVSplits, kv_len: int, align: int) -> None:
    assert plan.kv_len == kv_len and plan.num_splits >= 1 and plan.chunk >= 1
    ranges = plan.ranges()
    assert len(ranges) == plan.num_splits
    # Every key position in exactly one split: contiguous, in order, exactly [0, kv_len).
    seen = [0] * kv_len
    for start, end in ranges:
        for position in range(start, end):
            seen[position] += 1
    assert seen == [1] * kv_len
    assert ranges[0][0] == 0 and ranges[-1][1] == kv_len
    if plan.partial:
        # Balanced: every split but the last is one aligned chunk; the last is non-empty and no longer.
        assert plan.chunk % align == 0
        assert all(end - start == plan.chunk for start, end in ranges[:-1])
        assert 0 < ranges[-1][1] - ranges[-1][0] <= plan.chunk
    else:
        assert plan.chunk == max(kv_len, 1), "unsplit: the kernel's chunk is the whole sequence"


@settings(max_examples=300, deadline=None)
@given(
    kv_len=st.integers(0, 20000),
    programs=st.integers(1, 600),
    sms=st.integers(1, 160),
    align=st.sampled_from([16, 64, 128]),
    forced=st.one_of(st.none(), st.integers(1, 64)),
    can_split=st.booleans(),
)
def test_single_plan_covers_every_key_once_in_balanced_splits(kv_len, programs, sms, align, forced, can_split):
    shape = SingleLaunchShape(programs, align, sms, can_split=can_split)
    plan = plan_single_kv_splits(kv_len, shape, num_splits=forced)
    _check_single_plan(plan, kv_len, align)
    if not can_split:
        assert plan.num_splits == 1
    elif forced is None:
        # The planner's choice is plan_kv_splits' (the arithmetic property-tested above).
        assert plan.num_splits == plan_kv_splits(kv_len, programs, sms, align)[0]
    else:
        assert plan.num_splits <= forced


@given(kv_len=st.integers(1, 1 << 17), sms=st.integers(16, 160))
def test_single_plan_fills_the_gpu_for_one_long_request(kv_len, sms):
    plan = plan_single_kv_splits(kv_len, SingleLaunchShape(8, 256, sms))
    if kv_len >= 2 * 256 * PROGRAMS_PER_SM * sms:
        assert plan.num_splits * 8 >= PROGRAMS_PER_SM * sms
