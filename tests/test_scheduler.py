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
