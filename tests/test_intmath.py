"""The launchers' plain-Python integer helpers agree with Triton's."""

import triton

from flashtile._core.intmath import cdiv, dot_tile_dim, floor_power_of_2, next_power_of_2


def test_next_power_of_2_matches_triton():
    for n in list(range(0, 2100)) + [2**20 - 1, 2**20, 2**20 + 1, 151936]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n


def test_cdiv_matches_triton():
    for a in range(0, 300):
        for b in range(1, 40):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)


def test_dot_tile_dim():
    assert [dot_tile_dim(n) for n in (1, 8, 16, 17, 64, 100, 128, 192, 256)] == [16, 16, 16, 32, 64, 128, 128, 256, 256]


def test_floor_power_of_2():
    for n in range(1, 2100):
        p = floor_power_of_2(n)
        assert p <= n < 2 * p and p & (p - 1) == 0, n
    assert floor_power_of_2(0) == 1 and floor_power_of_2(-5) == 1
