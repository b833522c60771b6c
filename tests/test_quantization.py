"""packbits / segment_packbits against numpy.packbits (an independent oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flashtile.quantization import packbits, segment_packbits

BITORDERS = ("big", "little")
SIZES = (0, 1, 7, 8, 9, 15, 16, 17, 1000, 1003)


def _random_bits(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    bits = torch.randint(0, 2, (n,), generator=gen)
    return bits.to(dtype)


def _np_segment_packbits(x: np.ndarray, indptr: np.ndarray, bitorder: str):
    """Per-segment numpy loop: the oracle for segment_packbits."""
    chunks = [np.packbits(x[indptr[i] : indptr[i + 1]], bitorder=bitorder) for i in range(len(indptr) - 1)]
    lengths = [len(c) for c in chunks]
    new_indptr = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)
    y = np.concatenate(chunks).astype(np.uint8) if chunks else np.zeros(0, dtype=np.uint8)
    return y, new_indptr


@pytest.mark.parametrize("bitorder", BITORDERS)
@pytest.mark.parametrize("dtype", (torch.bool, torch.int32, torch.int64, torch.uint8))
@pytest.mark.parametrize("n", SIZES)
def test_packbits_matches_numpy(n, dtype, bitorder):
    gen = torch.Generator().manual_seed(1000 * n + len(bitorder))
    x = _random_bits(n, dtype, gen)
    y = packbits(x, bitorder)
    expected = np.packbits(x.numpy().astype(bool), bitorder=bitorder)
    assert y.dtype == torch.uint8
    assert tuple(y.shape) == ((n + 7) // 8,)
    np.testing.assert_array_equal(y.numpy(), expected)


def test_packbits_default_bitorder_is_big():
    x = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 1], dtype=torch.bool)
    assert packbits(x).tolist() == [128, 128]
    assert packbits(x, "little").tolist() == [1, 1]


def test_packbits_nonzero_means_one():
    # Like upstream's x.to(torch.bool): any nonzero value is a set bit, whatever the dtype.
    x = torch.tensor([2, 0, -1, 0, 0, 0, 0, 255], dtype=torch.int64)
    assert packbits(x, "big").tolist() == [0b1010_0001]
    xf = torch.tensor([0.5, 0.0, 1.0], dtype=torch.float32)
    assert packbits(xf, "little").tolist() == [0b101]


def test_packbits_strided_input():
    gen = torch.Generator().manual_seed(3)
    base = _random_bits(200, torch.bool, gen)
    x = base[::3]
    np.testing.assert_array_equal(packbits(x, "little").numpy(), np.packbits(x.numpy(), bitorder="little"))


@pytest.mark.parametrize("bitorder", BITORDERS)
@pytest.mark.parametrize(
    "lengths",
    [
        [0],
        [5],
        [8, 0, 9],
        [0, 0, 0],
        [1, 7, 8, 9, 0, 13, 64, 65],
        [3] * 40,
    ],
)
def test_segment_packbits_matches_numpy_loop(lengths, bitorder):
    gen = torch.Generator().manual_seed(sum(lengths) + len(lengths))
    indptr = torch.tensor([0] + list(np.cumsum(lengths)), dtype=torch.int32)
    x = _random_bits(int(indptr[-1]), torch.bool, gen)
    y, new_indptr = segment_packbits(x, indptr, bitorder)
    y_ref, new_indptr_ref = _np_segment_packbits(x.numpy(), indptr.numpy(), bitorder)
    assert y.dtype == torch.uint8 and new_indptr.dtype == torch.int32
    assert new_indptr.device == indptr.device
    np.testing.assert_array_equal(y.numpy(), y_ref)
    np.testing.assert_array_equal(new_indptr.numpy(), new_indptr_ref)


@pytest.mark.parametrize("bitorder", BITORDERS)
def test_segment_packbits_random_batch(bitorder):
    gen = torch.Generator().manual_seed(7)
    lengths = torch.randint(0, 50, (300,), generator=gen)
    lengths[::17] = 0
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    x = _random_bits(int(indptr[-1]), torch.int64, gen)
    y, new_indptr = segment_packbits(x, indptr, bitorder)
    y_ref, new_indptr_ref = _np_segment_packbits(x.numpy().astype(bool), indptr.numpy(), bitorder)
    np.testing.assert_array_equal(y.numpy(), y_ref)
    np.testing.assert_array_equal(new_indptr.numpy(), new_indptr_ref)
    assert new_indptr.dtype == torch.int32


def test_segment_packbits_indptr_window():
    # indptr[0] > 0 selects a window of x; elements outside [indptr[0], indptr[-1]) are ignored.
    gen = torch.Generator().manual_seed(11)
    x = _random_bits(100, torch.bool, gen)
    indptr = torch.tensor([10, 21, 21, 40], dtype=torch.int32)
    y, new_indptr = segment_packbits(x, indptr, "little")
    y_ref, new_indptr_ref = _np_segment_packbits(x.numpy(), indptr.numpy(), "little")
    np.testing.assert_array_equal(y.numpy(), y_ref)
    np.testing.assert_array_equal(new_indptr.numpy(), new_indptr_ref)


def test_segment_packbits_single_segment_equals_packbits():
    gen = torch.Generator().manual_seed(5)
    x = _random_bits(77, torch.bool, gen)
    y, new_indptr = segment_packbits(x, torch.tensor([0, 77]), "big")
    assert torch.equal(y, packbits(x, "big"))
    assert new_indptr.tolist() == [0, 10]


def test_segment_packbits_no_segments():
    y, new_indptr = segment_packbits(torch.ones(4, dtype=torch.bool), torch.tensor([0], dtype=torch.int32))
    assert y.shape == (0,) and y.dtype == torch.uint8
    assert new_indptr.tolist() == [0] and new_indptr.dtype == torch.int32


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("bad", ["middle", "BIG", "", None])
def test_packbits_bad_bitorder(bad):
    with pytest.raises(ValueError, match="bitorder"):
        packbits(torch.ones(3, dtype=torch.bool), bad)
    with pytest.raises(ValueError, match="bitorder"):
        segment_packbits(torch.ones(3, dtype=torch.bool), torch.tensor([0, 3]), bad)


@pytest.mark.parametrize("shape", [(), (2, 4), (1, 1, 8)])
def test_packbits_not_1d(shape):
    with pytest.raises(ValueError, match="^x: "):
        packbits(torch.ones(shape, dtype=torch.bool))
    with pytest.raises(ValueError, match="^x: "):
        segment_packbits(torch.ones(shape, dtype=torch.bool), torch.tensor([0, 1]))


def test_packbits_not_a_tensor():
    with pytest.raises(TypeError, match="^x: "):
        packbits([True, False])
    with pytest.raises(TypeError, match="^x: "):
        segment_packbits(np.ones(4, dtype=bool), torch.tensor([0, 4]))


def test_segment_packbits_indptr_not_a_tensor():
    with pytest.raises(TypeError, match="indptr"):
        segment_packbits(torch.ones(4, dtype=torch.bool), [0, 4])


def test_segment_packbits_indptr_float():
    with pytest.raises(TypeError, match="indptr"):
        segment_packbits(torch.ones(4, dtype=torch.bool), torch.tensor([0.0, 4.0]))


@pytest.mark.parametrize(
    "indptr, what",
    [
        (torch.zeros(0, dtype=torch.int32), "1-D"),
        (torch.zeros(1, 2, dtype=torch.int32), "1-D"),
        (torch.tensor([0, 5, 3], dtype=torch.int32), "non-decreasing"),
        (torch.tensor([-1, 3], dtype=torch.int32), "indptr\\[0\\] >= 0"),
        (torch.tensor([0, 4, 11], dtype=torch.int64), "indptr\\[-1\\] <= len\\(x\\)"),
    ],
)
def test_segment_packbits_bad_indptr(indptr, what):
    with pytest.raises(ValueError, match="indptr") as info:
        segment_packbits(torch.ones(10, dtype=torch.bool), indptr)
    assert info.match(what)
