"""``Blocks(size, offset=...)``: windows [0, s), [s, s + size), ..., the last one partial.

Checked against literal masks, a brute force that lists the windows, Swin's shifted-window
attention mask (roll the grid by -shift, cut windows, mask the wrapped regions, roll back)
and the reference attention computed window by window."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import sparseforge as sf

from ._common import assert_mask_equal, dense, lit


def windows_1d(length: int, size: int, offset: int) -> list[range]:
    """The windows written out: [0, offset) when offset > 0, then size-long runs, the last partial."""
    starts = ([0] if offset else []) + list(range(offset, length, size))
    ends = starts[1:] + [length]
    return [range(a, b) for a, b in zip(starts, ends) if b > a]


def brute_blocks(grid, size, offset) -> np.ndarray:
    """[N, N]: q and k share a window in every dimension (windows from ``windows_1d``)."""
    nd = len(grid)
    size = size if isinstance(size, tuple) else (size,) * nd
    offset = offset if isinstance(offset, tuple) else (offset,) * nd
    window_of = []
    for d in range(nd):
        w = np.empty(grid[d], dtype=int)
        for i, r in enumerate(windows_1d(grid[d], size[d], offset[d])):
            w[list(r)] = i
        window_of.append(w)
    coords = np.array(list(itertools.product(*(range(g) for g in grid))))
    out = np.ones((len(coords), len(coords)), dtype=bool)
    for d in range(nd):
        wd = window_of[d][coords[:, d]]
        out &= wd[:, None] == wd[None, :]
    return out


def test_literal_size4_offset2_on_10():
    # windows [0, 2), [2, 6), [6, 10)
    want = lit("1100000000",
               "1100000000",
               "0011110000",
               "0011110000",
               "0011110000",
               "0011110000",
               "0000001111",
               "0000001111",
               "0000001111",
               "0000001111")
    assert_mask_equal(dense(sf.Blocks(4, offset=2), (10,))[0], want)
    assert [list(r) for r in windows_1d(10, 4, 2)] == [[0, 1], [2, 3, 4, 5], [6, 7, 8, 9]]


def test_literal_2d_offsets_per_dimension():
    # rows: size 2 offset 1 on 3 -> {0}, {1, 2}; columns: size 3 offset 0 on 4 -> {0, 1, 2}, {3}
    want = lit("111000000000",
               "111000000000",
               "111000000000",
               "000100000000",
               "000011101110",
               "000011101110",
               "000011101110",
               "000000010001",
               "000011101110",
               "000011101110",
               "000011101110",
               "000000010001")
    assert_mask_equal(dense(sf.Blocks((2, 3), offset=(1, 0)), (3, 4))[0], want)


def test_literal_last_window_partial():
    # size 3 offset 1 on 6: [0, 1), [1, 4), [4, 6)
    want = lit("100000",
               "011100",
               "011100",
               "011100",
               "000011",
               "000011")
    assert_mask_equal(dense(sf.Blocks(3, offset=1), (6,))[0], want)


SWEEP = [((10,), 4, 2), ((9,), 3, 1), ((7,), 7, 3), ((13,), 5, 4), ((8,), 1, 0), ((6, 7), 3, (1, 2)),
         ((5, 9), (2, 4), (1, 3)), ((4, 5, 6), (2, 3, 4), (1, 0, 3)), ((12, 12), 6, 3)]


@pytest.mark.parametrize("grid,size,offset", SWEEP, ids=[f"{g}-{s}-{o}" for g, s, o in SWEEP])
def test_matches_listed_windows(grid, size, offset):
    assert_mask_equal(dense(sf.Blocks(size, offset=offset), grid)[0], brute_blocks(grid, size, offset),
                      f"Blocks({size}, offset={offset}) on {grid}")


def swin_shifted_mask(h: int, w: int, window: int, shift: int) -> np.ndarray:
    """Swin's shifted-window attention as a token mask on the original grid: roll the image by
    -shift, cut window x window windows, allow pairs in one window and one region of Swin's
    ``img_mask`` (slices (0, -window), (-window, -shift), (-shift, None)), roll back."""
    img = np.zeros((h, w), dtype=int)
    cnt = 0
    sl = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for a in sl:
        for b in sl:
            img[a, b] = cnt
            cnt += 1
    # token at rolled position (i, j) is original (i + shift, j + shift) mod the extents
    n = h * w
    orig = np.array([((i + shift) % h) * w + (j + shift) % w for i in range(h) for j in range(w)])
    win = np.array([(i // window) * (w // window) + j // window for i in range(h) for j in range(w)])
    reg = img.reshape(-1)
    rolled = (win[:, None] == win[None, :]) & (reg[:, None] == reg[None, :])
    out = np.zeros((n, n), dtype=bool)
    out[np.ix_(orig, orig)] = rolled
    return out


@pytest.mark.parametrize("h,w,window,shift", [(8, 8, 4, 2), (6, 9, 3, 1), (14, 7, 7, 3)])
def test_equals_swin_shifted_windows(h, w, window, shift):
    assert_mask_equal(dense(sf.Blocks(window, offset=shift), (h, w))[0], swin_shifted_mask(h, w, window, shift))


def test_offset_zero_is_todays_blocks():
    for a, b in [(sf.Blocks(7, offset=0), sf.Blocks(7)), (sf.Blocks((2, 3), offset=(0, 0)), sf.Blocks((2, 3)))]:
        assert a == b and repr(a) == repr(b) and a.fingerprint() == b.fingerprint() and hash(a) == hash(b)
    assert repr(sf.Blocks(7)) == "Blocks(7)"
    assert sf.Blocks(7).fingerprint() == sf.Blocks(7, 0).fingerprint()
    assert sf.Blocks(7, offset=3) != sf.Blocks(7)
    assert sf.Blocks(7, offset=3).fingerprint() != sf.Blocks(7).fingerprint()


@pytest.mark.parametrize("pattern, text", [
    (sf.Blocks(7, offset=3), "Blocks(7, offset=3)"),
    (sf.Blocks((4, 8), offset=(1, 0)), "Blocks((4, 8), offset=(1, 0))"),
    (sf.PerHead([sf.Blocks(4), sf.Blocks(4, offset=2)]), "PerHead([Blocks(4), Blocks(4, offset=2)])"),
])
def test_repr_parses_back(pattern, text):
    assert repr(pattern) == text
    assert sf.parse_pattern(text) == pattern
    assert sf.parse_pattern("sf." + text if not text.startswith("PerHead") else text) == pattern


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(size=4, offset=4), ValueError, r"offset must be < size \(0 <= offset < size\), got offset=4, size=4"),
    (dict(size=4, offset=-1), ValueError, r"offset must be >= 0, got -1"),
    (dict(size=(4, 2), offset=(1, 2)), ValueError, r"offset must be < size in dimension 1"),
    (dict(size=(4, 2), offset=(1, 0, 0)), ValueError, r"must have the same number of entries"),
    (dict(size=4, offset=1.5), TypeError, r"offset must be an int, got 1\.5"),
    (dict(size=4, offset=True), TypeError, r"offset must be an int, got True"),
    (dict(size=2, offset=(1, 3)), ValueError, r"offset must be < size in dimension 1"),
])
def test_bad_offsets(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sf.Blocks(**kwargs)


def test_offset_rank_checked_against_the_grid():
    with pytest.raises(ValueError, match=r"offset=\(1, 1\) has 2 entries but the grid has 1 dimension"):
        sf.dense_mask(sf.Blocks(4, offset=(1, 1)), sf.Problem(grid=(8,)))
    with pytest.raises(ValueError, match=r"size=8 is larger than the grid"):
        sf.dense_mask(sf.Blocks(8, offset=3), sf.Problem(grid=(6,)))


def test_parse_rejects_bad_offset():
    with pytest.raises(sf.PatternSyntaxError, match=r"offset must be < size"):
        sf.parse_pattern("Blocks(3, offset=3)")


@pytest.mark.parametrize("grid,size,offset", [((10,), 4, 2), ((6, 7), (3, 4), (2, 1))])
def test_reference_attention_window_by_window(grid, size, offset):
    """The reference equals softmax attention computed separately inside every window."""
    gen = torch.Generator().manual_seed(sum(grid) + offset if isinstance(offset, int) else sum(offset))
    problem = sf.Problem(grid=grid, heads=2, head_dim=5)
    n = problem.tokens
    q, k, v = (torch.randn(2, 2, n, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    out = sf.reference_attention(q, k, v, sf.Blocks(size, offset=offset), problem)
    m = brute_blocks(grid, size, offset)
    want = torch.zeros_like(out)
    seen = np.zeros(n, dtype=bool)
    for i in range(n):
        if seen[i]:
            continue
        members = np.flatnonzero(m[i])
        seen[members] = True
        idx = torch.from_numpy(members)
        s = q[:, :, idx] @ k[:, :, idx].transpose(-1, -2) * 5 ** -0.5
        want[:, :, idx] = torch.softmax(s, -1) @ v[:, :, idx]
    assert torch.allclose(out, want, rtol=1e-12, atol=1e-13)
