"""flashtile.cascade merge operators (merge_state, merge_state_in_place, merge_states) against the
float64 oracle on the reference and kernel paths: random states with empty (-inf) ones, large LSEs,
every v dtype, odd head dims, 1..17 states, row masks, strided views, algebraic properties, ops and
errors."""

import pytest
import torch

import flashtile.cascade as cascade
from conftest import HAS_CUDA
from flashtile._core import ops_cascade
from oracles import LSE_TOLERANCES, TOLERANCES, merge_states_f64

NEG_INF = float("-inf")
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
HEAD_DIMS = [40, 64, 72, 128]
SEQ_LENS = [1, 7, 33] + ([1000] if HAS_CUDA else [])


def _close(v, s, ref_v, ref_s, dtype):
    assert not v.isnan().any(), "v has NaN (unwritten element?)"
    assert not s.isnan().any(), "s has NaN (unwritten element?)"
    assert s.dtype == torch.float32
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(v.double().cpu(), ref_v, atol=atol, rtol=rtol)
    atol, rtol = LSE_TOLERANCES[torch.float32]
    torch.testing.assert_close(s.double().cpu(), ref_s, atol=atol, rtol=rtol)


def _random_states(seq_len, num_states, num_heads, head_dim, dtype, device, scale=4.0):
    """v [T, S, H, D] in ``dtype``, s [T, S, H] float32 (spread ``scale``, so weights differ a lot)."""
    v = torch.randn(seq_len, num_states, num_heads, head_dim, device=device).to(dtype)
    s = torch.randn(seq_len, num_states, num_heads, device=device) * scale
    return v, s


def _empty(v, s, where):
    """Mark states empty (s = -inf) and fill their v with NaN: an empty state must not be read."""
    s[where] = NEG_INF
    v[where] = float("nan")


def _pair_oracle(v_a, s_a, v_b, s_b):
    return merge_states_f64(torch.stack([v_a, v_b], 1), torch.stack([s_a.double(), s_b.double()], 1))


# ---------------------------------------------------------------------------------------------
# merge_state
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_merge_state(path, device, dtype, head_dim):
    num_heads = 3
    v, s = _random_states(9, 2, num_heads, head_dim, dtype, device)
    v_a, v_b = v[:, 0].contiguous(), v[:, 1].contiguous()
    s_a, s_b = s[:, 0].contiguous(), s[:, 1].contiguous()
    _empty(v_a, s_a, 0)  # token 0: A empty
    _empty(v_b, s_b, 1)  # token 1: B empty
    _empty(v_a, s_a, 2)  # token 2: both empty
    _empty(v_b, s_b, 2)
    _empty(v_a, s_a, (3, 1))  # one head of token 3: A empty
    out_v, out_s = cascade.merge_state(v_a, s_a, v_b, s_b)
    assert out_v.shape == v_a.shape and out_v.dtype == dtype and out_s.shape == s_a.shape
    ref_v, ref_s = _pair_oracle(v_a, s_a, v_b, s_b)
    _close(out_v, out_s, ref_v, ref_s, dtype)
    # Both empty: exactly 0 and -inf.
    assert torch.equal(out_v[2].float().cpu(), torch.zeros(num_heads, head_dim))
    assert torch.equal(out_s[2].cpu(), torch.full((num_heads,), NEG_INF))
    # One empty: the other state, unchanged.
    torch.testing.assert_close(out_v[0], v_b[0], atol=0, rtol=0)
    torch.testing.assert_close(out_s[1], s_a[1], atol=0, rtol=0)


@pytest.mark.parametrize("seq_len", SEQ_LENS)
def test_merge_state_seq_lens(path, device, seq_len):
    v, s = _random_states(seq_len, 2, 4, 64, torch.float16, device)
    out_v, out_s = cascade.merge_state(v[:, 0], s[:, 0], v[:, 1], s[:, 1])  # strided views of [T, 2, H, D]
    _close(out_v, out_s, *merge_states_f64(v, s), torch.float16)


@pytest.mark.parametrize("case", ["both_large", "far_apart", "very_negative", "equal"])
def test_merge_state_large_magnitude_lse(path, device, case):
    """The result depends on s_a - s_b only; |s| up to 2.45e5 (HEAD's extreme-logit regression)."""
    v_a = torch.randn(5, 2, 64, device=device)
    v_b = torch.randn(5, 2, 64, device=device)
    base = torch.randn(5, 2, device=device)
    if case == "both_large":
        s_a, s_b = 1e4 + base, 1e4 - base
    elif case == "far_apart":  # B's weight is 2**-6000: A alone
        s_a, s_b = 3000.0 + base, -3000.0 + base
    elif case == "very_negative":  # a finite, very negative state against an empty one: not "masked"
        s_a, s_b = -2.45e5 + base, torch.full_like(base, NEG_INF)
    else:
        s_a, s_b = base * 100, base * 100
    out_v, out_s = cascade.merge_state(v_a, s_a, v_b, s_b)
    ref_v, ref_s = _pair_oracle(v_a, s_a, v_b, s_b)
    _close(out_v, out_s, ref_v, ref_s, torch.float32)
    if case in ("far_apart", "very_negative"):
        torch.testing.assert_close(out_v, v_a)
        torch.testing.assert_close(out_s, s_a, atol=0, rtol=0)
    if case == "equal":  # two equal weights: the mean, one bit more of lse
        torch.testing.assert_close(out_s, s_a + 1.0)


def test_merge_state_half_lse_is_cast(path, device):
    """s of any float dtype is cast to float32; the output s is float32."""
    v, s = _random_states(6, 2, 2, 64, torch.bfloat16, device)
    s_a, s_b = s[:, 0].half(), s[:, 1].to(torch.bfloat16)
    out_v, out_s = cascade.merge_state(v[:, 0], s_a, v[:, 1], s_b)
    assert out_s.dtype == torch.float32
    _close(out_v, out_s, *_pair_oracle(v[:, 0], s_a, v[:, 1], s_b), torch.bfloat16)


def test_merge_state_strided_inputs(path, device):
    """Views with every stride different from contiguous: a head slice, a head_dim stride of 2,
    transposed s. Inputs are not modified."""
    T, H, D = 7, 3, 72
    wide = torch.randn(T, H + 2, D, dtype=torch.float16, device=device)
    v_a = wide[:, 1 : H + 1]  # head slice
    v_b = torch.randn(T, H, 2 * D, dtype=torch.float16, device=device)[..., ::2]  # head_dim stride 2
    s_a = torch.randn(H, T, device=device).t() * 3  # token stride 1
    s_b = torch.randn(T, 2 * H, device=device)[:, ::2] * 3
    s_b[4] = NEG_INF
    before = [x.clone() for x in (v_a, v_b, s_a, s_b)]
    out_v, out_s = cascade.merge_state(v_a, s_a, v_b, s_b)
    _close(out_v, out_s, *_pair_oracle(v_a, s_a, v_b, s_b), torch.float16)
    for x, b in zip((v_a, v_b, s_a, s_b), before):
        assert torch.equal(x, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_state_commutative(path, device, dtype):
    v, s = _random_states(8, 2, 3, 40, dtype, device)
    s[0, 0] = NEG_INF
    ab = cascade.merge_state(v[:, 0], s[:, 0], v[:, 1], s[:, 1])
    ba = cascade.merge_state(v[:, 1], s[:, 1], v[:, 0], s[:, 0])
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(ab[0], ba[0], atol=atol, rtol=rtol)
    torch.testing.assert_close(ab[1], ba[1], atol=1e-5, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# merge_state_in_place
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "random", "all_false"])
def test_merge_state_in_place(path, device, dtype, mask_kind):
    T, H, D = 11, 2, 72
    v_all, s_all = _random_states(T, 2, H, D, dtype, device)
    v, s = v_all[:, 0].contiguous(), s_all[:, 0].contiguous()
    v_other, s_other = v_all[:, 1].contiguous(), s_all[:, 1].contiguous()
    s[1] = NEG_INF  # empty self (v stays finite: it is the output tensor)
    _empty(v_other, s_other, 2)
    s[3] = NEG_INF
    _empty(v_other, s_other, 3)
    mask = None
    if mask_kind == "random":
        mask = torch.rand(T, device=device) < 0.5
        mask[:4] = True
        mask[4] = False
    elif mask_kind == "all_false":
        mask = torch.zeros(T, dtype=torch.bool, device=device)
    v0, s0, vo0, so0 = v.clone(), s.clone(), v_other.clone(), s_other.clone()
    assert cascade.merge_state_in_place(v, s, v_other, s_other, mask) is None
    ref_v, ref_s = _pair_oracle(v0, s0, v_other, s_other)
    rows = torch.ones(T, dtype=torch.bool) if mask is None else mask.cpu()
    _close(v[rows], s[rows], ref_v[rows], ref_s[rows], dtype)
    # Masked-off tokens are bit-identical; the other state is not modified.
    assert torch.equal(v[~rows], v0[~rows]) and torch.equal(s[~rows], s0[~rows])
    assert torch.equal(v_other.isnan(), vo0.isnan()) and torch.equal(s_other, so0)
    if rows[3]:
        assert torch.equal(v[3].float().cpu(), torch.zeros(H, D)) and (s[3] == NEG_INF).all()


def test_merge_state_in_place_strided(path, device):
    """v and s are views into larger buffers: only the viewed elements of unmasked tokens change."""
    T, H, D = 6, 3, 40
    v_buf = torch.randn(T, H + 1, D, dtype=torch.bfloat16, device=device)
    s_buf = torch.randn(T, 2 * H, device=device) * 3
    v, s = v_buf[:, 1:], s_buf[:, 1::2]
    v_other = torch.randn(H, T, D, dtype=torch.bfloat16, device=device).transpose(0, 1)
    s_other = torch.randn(T, H, device=device).half()
    mask = torch.tensor([True, False, True, True, False, True], device=device)
    v_buf0, s_buf0 = v_buf.clone(), s_buf.clone()
    ref_v, ref_s = _pair_oracle(v, s, v_other, s_other)
    cascade.merge_state_in_place(v, s, v_other, s_other, mask=mask)
    m = mask.cpu()
    _close(v[m], s[m], ref_v[m], ref_s[m], torch.bfloat16)
    assert torch.equal(v_buf[:, 0], v_buf0[:, 0]) and torch.equal(s_buf[:, 0::2], s_buf0[:, 0::2])
    assert torch.equal(v_buf[~m], v_buf0[~m]) and torch.equal(s_buf[~m], s_buf0[~m])


# ---------------------------------------------------------------------------------------------
# merge_states
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_states", [1, 3, 17])
@pytest.mark.parametrize("head_dim", [64, 72])
def test_merge_states(path, device, dtype, num_states, head_dim):
    T, H = 7, 3
    v, s = _random_states(T, num_states, H, head_dim, dtype, device)
    holes = torch.rand(T, num_states, H, device=device) < 0.25
    _empty(v, s, holes)
    _empty(v, s, 0)  # token 0: every state empty
    if num_states > 1:
        _empty(v, s, (1, slice(1, None)))  # token 1: only the first state
    out_v, out_s = cascade.merge_states(v, s)
    assert out_v.shape == (T, H, head_dim) and out_v.dtype == dtype and out_s.shape == (T, H)
    _close(out_v, out_s, *merge_states_f64(v, s), dtype)
    assert torch.equal(out_v[0].float().cpu(), torch.zeros(H, head_dim)) and (out_s[0] == NEG_INF).all()


def test_merge_states_strided_and_cast(path, device):
    """State-major storage [S, T, H, D] seen as [T, S, H, D] (how split-KV partials are laid out), a
    head_dim stride of 2, and a float16 s."""
    S, T, H, D = 5, 9, 2, 40
    v = torch.randn(S, T, H, D, dtype=torch.float16, device=device).transpose(0, 1)
    s = (torch.randn(S, T, H, device=device) * 4).half().transpose(0, 1)
    out_v, out_s = cascade.merge_states(v, s)
    _close(out_v, out_s, *merge_states_f64(v, s), torch.float16)
    v2 = torch.randn(T, S, H, 2 * D, device=device)[..., ::2]
    out_v, out_s = cascade.merge_states(v2, s)
    _close(out_v, out_s, *merge_states_f64(v2, s), torch.float32)


def test_merge_states_equals_folding_merge_state(path, device):
    """Associativity: merging 6 states at once equals folding them pairwise with merge_state (and in
    place), in float32."""
    v, s = _random_states(8, 6, 3, 64, torch.float32, device)
    _empty(v, s, (2, slice(0, 3)))
    _empty(v, s, (5, slice(None)))
    all_v, all_s = cascade.merge_states(v, s)
    acc_v, acc_s = v[:, 0], s[:, 0]
    for i in range(1, 6):
        acc_v, acc_s = cascade.merge_state(acc_v, acc_s, v[:, i], s[:, i])
    torch.testing.assert_close(all_v, acc_v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(all_s, acc_s, atol=1e-5, rtol=1e-5)
    ip_v, ip_s = v[:, 5].clone(), s[:, 5].clone()  # reverse order, in place
    for i in range(4, -1, -1):
        cascade.merge_state_in_place(ip_v, ip_s, v[:, i], s[:, i])
    torch.testing.assert_close(all_v, ip_v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(all_s, ip_s, atol=1e-5, rtol=1e-5)


def test_empty_shapes(path, device):
    """seq_len 0 and num_states 0 (no state: 0 and -inf)."""
    v, s = cascade.merge_state(*(torch.empty(0, 2, 64, device=device), torch.empty(0, 2, device=device)) * 2)
    assert v.shape == (0, 2, 64) and s.shape == (0, 2)
    v, s = cascade.merge_states(torch.empty(3, 0, 2, 64, device=device), torch.empty(3, 0, 2, device=device))
    assert torch.equal(v.cpu(), torch.zeros(3, 2, 64)) and (s == NEG_INF).all()


# ---------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------


def _op_args(device):
    v, s = _random_states(5, 3, 2, 40, torch.float16, device)
    s[0, 1] = NEG_INF
    mask = torch.tensor([True, False, True, True, False], device=device)
    out_v = torch.empty(5, 2, 40, dtype=torch.float16, device=device)
    out_s = torch.empty(5, 2, device=device)
    return {
        "merge_state": (v[:, 0], s[:, 0], v[:, 1], s[:, 1], out_v, out_s),
        "merge_state_in_place": (v[:, 0].clone(), s[:, 0].clone(), v[:, 1], s[:, 1], mask),
        "merge_state_in_place_nomask": (v[:, 0].clone(), s[:, 0].clone(), v[:, 1], s[:, 1], None),
        "merge_states": (v, s, out_v, out_s),
    }


@pytest.mark.parametrize("name", ["merge_state", "merge_state_in_place", "merge_state_in_place_nomask", "merge_states"])
def test_opcheck(path, device, name):
    op = getattr(ops_cascade, name.replace("_nomask", ""))
    torch.library.opcheck(op, _op_args(device)[name])


def test_torch_compile_fullgraph(path, device):
    """A cascade-like step (two partial states merged, then a third in place) traces into one graph."""
    backend = "inductor" if HAS_CUDA else "aot_eager"
    v, s = _random_states(4, 3, 2, 64, torch.float16, device)

    def step(v, s):
        o, lse = cascade.merge_state(v[:, 0], s[:, 0], v[:, 1], s[:, 1])
        cascade.merge_state_in_place(o, lse, v[:, 2], s[:, 2])
        return o, lse

    eager = step(v, s)
    compiled = torch.compile(step, fullgraph=True, backend=backend)(v, s)
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])


# ---------------------------------------------------------------------------------------------
# Errors: typed, naming the argument, expected vs given
# ---------------------------------------------------------------------------------------------


def _pair(device, T=4, H=2, D=64, dtype=torch.float16):
    return (torch.randn(T, H, D, device=device).to(dtype), torch.randn(T, H, device=device),
            torch.randn(T, H, D, device=device).to(dtype), torch.randn(T, H, device=device))


def test_merge_state_errors(device):
    v_a, s_a, v_b, s_b = _pair(device)
    with pytest.raises(ValueError, match=r"v_b: expected shape \[4, 2, 64\], got \[4, 2, 32\]"):
        cascade.merge_state(v_a, s_a, v_b[..., :32], s_b)
    with pytest.raises(ValueError, match=r"s_a: expected shape \[4, 2\], got \[4, 3\]"):
        cascade.merge_state(v_a, torch.randn(4, 3, device=device), v_b, s_b)
    with pytest.raises(ValueError, match=r"s_b: expected shape \[4, 2\], got \[4\]"):
        cascade.merge_state(v_a, s_a, v_b, s_b[:, 0])
    with pytest.raises(ValueError, match=r"v_a: expected a 3-D tensor .*got shape \[4, 128\]"):
        cascade.merge_state(v_a.view(4, 128), s_a, v_b, s_b)
    with pytest.raises(TypeError, match=r"v_b: expected the dtype of v_a \(float16\), got bfloat16"):
        cascade.merge_state(v_a, s_a, v_b.to(torch.bfloat16), s_b)
    with pytest.raises(TypeError, match=r"v_a: expected dtype in \(float16, bfloat16, float32\), got int32"):
        cascade.merge_state(v_a.int(), s_a, v_b.int(), s_b)
    with pytest.raises(TypeError, match=r"s_a: expected dtype in .*got int64"):
        cascade.merge_state(v_a, s_a.long(), v_b, s_b)
    with pytest.raises(TypeError, match=r"v_a: expected a torch.Tensor, got list"):
        cascade.merge_state([1.0], s_a, v_b, s_b)
    with pytest.raises(ValueError, match=r"v_b: expected a tensor on the same device as v_a"):
        cascade.merge_state(v_a, s_a, v_b.to("meta"), s_b)


def test_merge_state_in_place_errors(device):
    v, s, v_other, s_other = _pair(device)
    with pytest.raises(TypeError, match=r"s: expected dtype float32 .*in place.*got float16"):
        cascade.merge_state_in_place(v, s.half(), v_other, s_other)
    with pytest.raises(TypeError, match=r"s: expected dtype float32 .*got float64"):
        cascade.merge_state_in_place(v, s.double(), v_other, s_other)
    with pytest.raises(ValueError, match=r"mask: expected shape \[4\], got \[5\]"):
        cascade.merge_state_in_place(v, s, v_other, s_other, torch.ones(5, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match=r"mask: expected shape \[4\], got \[4, 2\]"):
        cascade.merge_state_in_place(v, s, v_other, s_other, torch.ones(4, 2, dtype=torch.bool, device=device))
    with pytest.raises(TypeError, match=r"mask: expected dtype in \(bool\), got int32"):
        cascade.merge_state_in_place(v, s, v_other, s_other, torch.ones(4, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"v_other: expected shape \[4, 2, 64\], got \[4, 3, 64\]"):
        cascade.merge_state_in_place(v, s, torch.randn(4, 3, 64, device=device).half(), s_other)
    with pytest.raises(TypeError, match=r"v_other: expected the dtype of v \(float16\), got float32"):
        cascade.merge_state_in_place(v, s, v_other.float(), s_other)
    with pytest.raises(ValueError, match=r"s_other: expected shape \[4, 2\], got \[2, 4\]"):
        cascade.merge_state_in_place(v, s, v_other, s_other.t())
    with pytest.raises(ValueError, match=r"mask: expected a tensor on the same device as v"):
        cascade.merge_state_in_place(v, s, v_other, s_other, torch.ones(4, dtype=torch.bool, device="meta"))
    v0, s0 = v.clone(), s.clone()  # nothing was modified by the failed calls
    assert torch.equal(v, v0) and torch.equal(s, s0)


def test_merge_states_errors(device):
    v = torch.randn(4, 3, 2, 64, device=device)
    s = torch.randn(4, 3, 2, device=device)
    with pytest.raises(ValueError, match=r"s: expected shape \[4, 3, 2\], got \[4, 2, 2\]"):
        cascade.merge_states(v, s[:, :2])
    with pytest.raises(ValueError, match=r"v: expected a 4-D tensor \[seq_len, num_states, num_heads, head_dim\]"):
        cascade.merge_states(v[:, 0], s)
    with pytest.raises(TypeError, match=r"v: expected dtype in .*got float64"):
        cascade.merge_states(v.double(), s)
    with pytest.raises(TypeError, match=r"s: expected dtype in .*got int32"):
        cascade.merge_states(v, s.int())


def test_known_metadata_merges_each_calls_states(path, device):
    """Repeated merges with one metadata (the second on use the remembered checks, _core/memo.py)
    compute on each call's tensors; a new dtype is a new key and is checked."""
    for _ in range(3):
        v_a, s_a, v_b, s_b = _pair(device)
        v, s = cascade.merge_state(v_a, s_a, v_b, s_b)
        ref_v, ref_s = _pair_oracle(v_a, s_a, v_b, s_b)
        _close(v, s, ref_v, ref_s, torch.float16)
        mask = torch.tensor([True, False, True, True], device=device)
        v0, s0 = v_a.clone(), s_a.clone()
        cascade.merge_state_in_place(v_a, s_a, v_b, s_b, mask)
        _close(v_a[mask], s_a[mask], ref_v[mask.cpu()], ref_s[mask.cpu()], torch.float16)
        assert torch.equal(v_a[~mask], v0[~mask]) and torch.equal(s_a[~mask], s0[~mask])
    with pytest.raises(TypeError, match="s_a"):
        cascade.merge_state(v_a, s_a.long(), v_b, s_b)
    with pytest.raises(TypeError, match="s: expected dtype float32"):
        cascade.merge_state_in_place(v_a, s_a.half(), v_b, s_b, mask)
