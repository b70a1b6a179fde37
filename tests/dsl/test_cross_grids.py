"""Queries and keys on different grids (``Problem(kv_grid=...)``): ``dense_mask`` [H, Nq, Nk]
against brute-force masks written from the rules, literal tiny masks, and bad input.

The rules (``dsl.problem.placement``), written again here in plain Python:

- two 1-D grids are one sequence and the queries are its LAST Nq positions (bottom-right,
  as FlashAttention's decode / chunked prefill): query i sits at key position i + Nk - Nq;
- N-D grids of one rank with an integer ratio per dimension: keys r times finer place query
  coordinate c at c * r (strided queries), keys r times coarser at c // r (pooled keys);
- a pattern that reads query positions is then the self-attention mask on the key grid, row
  of the query's place; Full, Sink, GlobalTokens' key side and Grouped without causal read
  no query position and take any pair of grids.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import sparseforge as sf

from . import brute_force as bf
from ._common import assert_mask_equal, lit


def cross(pattern, grid, kv_grid, heads: int = 1, kv_heads: int | None = None, **kw) -> np.ndarray:
    problem = sf.Problem(grid=grid, kv_grid=kv_grid, heads=heads, head_dim=4, kv_heads=kv_heads)
    return sf.dense_mask(pattern, problem, **kw).numpy()


def _unravel(i: int, grid) -> list[int]:
    out = []
    for s in reversed(grid):
        out.append(i % s)
        i //= s
    return out[::-1]


def _ravel(coords, grid) -> int:
    i = 0
    for c, s in zip(coords, grid):
        i = i * s + c
    return i


def place(i: int, grid, kv_grid) -> int:
    """Query i's key-grid position, straight from the rules (module docstring)."""
    if len(grid) == 1:
        return i + kv_grid[0] - grid[0]
    out = []
    for c, q, k in zip(_unravel(i, grid), grid, kv_grid):
        out.append(c * (k // q) if k % q == 0 else c // (q // k))
    return _ravel(out, kv_grid)


def placed_rows(self_mask: np.ndarray, grid, kv_grid) -> np.ndarray:
    """The rows of a self-attention mask [..., Nk, Nk] on the key grid at each query's place."""
    rows = [place(i, grid, kv_grid) for i in range(int(np.prod(grid)))]
    return self_mask[..., rows, :]


# ------------------------------------------------------------------------------------
# Brute-force 1-D masks on a sequence of n tokens, [n, n]
# ------------------------------------------------------------------------------------
def causal(n):
    return np.array([[k <= q for k in range(n)] for q in range(n)])


def band(n, left, right):
    return np.array([[-left <= k - q <= right for k in range(n)] for q in range(n)])


def sink(n, s):
    return np.array([[k < s for k in range(n)] for q in range(n)])


def documents(lengths):
    doc = np.repeat(np.arange(len(lengths)), lengths)
    return doc[:, None] == doc[None, :]


def global_tokens(n, idx):
    g = np.isin(np.arange(n), idx)
    return g[:, None] | g[None, :]


NK = 23
ONE_D = {
    "causal": (sf.Causal(), lambda n: causal(n)),
    "window": (sf.SlidingWindow(3), lambda n: band(n, 3, 0)),
    "window-2-1": (sf.SlidingWindow(2, 1), lambda n: band(n, 2, 1)),
    "causal&window": (sf.Causal() & sf.SlidingWindow(5, 5), lambda n: causal(n) & band(n, 5, 5)),
    "sink|causal&window": (sf.Sink(2) | (sf.Causal() & sf.SlidingWindow(3)),
                           lambda n: sink(n, 2) | (causal(n) & band(n, 3, 0))),
    "documents&causal": (sf.Documents((5, 10, 8)) & sf.Causal(), lambda n: documents((5, 10, 8)) & causal(n)),
    "global|window": (sf.GlobalTokens((0, 7)) | sf.SlidingWindow(2), lambda n: global_tokens(n, [0, 7]) | band(n, 2, 0)),
    "shards": (sf.StridedShards(4, 2, 3), lambda n: bf.dkernel_mask(2, n, 4, 2, 3, causal=True, num_kv_heads=2)),
    "shards-bidirectional": (sf.StridedShards(3, (1, 2), 2, causal=False),
                             lambda n: bf.dkernel_mask(2, n, 3, (1, 2), 2, causal=False, num_kv_heads=2)),
    "neighborhood": (sf.Neighborhood(5), lambda n: bf.natten_mask_nd((n,), 5)),
    "neighborhood-causal": (sf.Neighborhood(4, causal=True), lambda n: bf.natten_mask_nd((n,), 4, causal=True)),
    "blocks": (sf.Blocks(4), lambda n: bf.blocks_mask((n,), 4)),
}


@pytest.mark.parametrize("nq", [1, 4, 9, NK])
@pytest.mark.parametrize("name", list(ONE_D))
def test_decode_is_the_last_rows(name, nq):
    """1-D: the queries are the last Nq positions of the keys' sequence (bottom-right)."""
    pattern, brute = ONE_D[name]
    got = cross(pattern, (nq,), (NK,), heads=2)
    want = brute(NK)
    want = np.broadcast_to(want, (2, NK, NK)) if want.ndim == 2 else want
    assert got.shape == (2, nq, NK)
    assert_mask_equal(got, placed_rows(want, (nq,), (NK,)), f"{pattern!r} Nq={nq}")
    assert_mask_equal(got, want[:, NK - nq:], f"{pattern!r} Nq={nq}: the bottom rows")


def test_decode_literal_masks():
    """Written out by hand: 2 queries at positions 3 and 4 of 5 keys."""
    assert_mask_equal(cross(sf.Causal(), 2, 5)[0], lit("11110",
                                                        "11111"))
    assert_mask_equal(cross(sf.SlidingWindow(1), 2, 5)[0], lit("00110",
                                                                "00011"))
    assert_mask_equal(cross(sf.Sink(1) | (sf.Causal() & sf.SlidingWindow(1)), 1, 5)[0], lit("10011"))
    assert_mask_equal(cross(sf.Documents((2, 3)) & sf.Causal(), 3, 5)[0], lit("00100",
                                                                              "00110",
                                                                              "00111"))


N_D = [
    # (pattern, query grid, key grid, brute force self mask on the key grid)
    (sf.Neighborhood(3), (4, 4), (8, 8), lambda g: bf.natten_mask_nd(g, 3)),                    # strided queries
    (sf.Neighborhood(3), (8, 8), (4, 4), lambda g: bf.natten_mask_nd(g, 3)),                    # pooled keys
    (sf.Neighborhood((3, 5), dilation=(1, 2)), (6, 5), (3, 10), lambda g: bf.natten_mask_nd(g, (3, 5), (1, 2))),
    (sf.Halo(4, 1), (4, 4), (8, 8), lambda g: bf.halo_mask(g, 4, 1)),                            # HaloNet stride 2
    (sf.Halo((2, 4), (1, 2)), (3, 2), (6, 8), lambda g: bf.halo_mask(g, (2, 4), (1, 2))),
    (sf.Blocks(2), (8, 6), (4, 3), lambda g: bf.blocks_mask(g, 2)),
    (sf.Grid(2), (4, 4), (8, 8), lambda g: bf.grid_mask(g, 2)),
    (sf.SlidingWindow((1, 2), (1, 0)), (2, 9), (6, 3), lambda g: bf.sliding_window_mask(g, (1, 2), (1, 0))),
    (sf.Causal(), (3, 4), (6, 2), lambda g: causal(int(np.prod(g)))),                            # flat index on keys
    (sf.Neighborhood((3, 1, 1)) | sf.Sink(2), (2, 2, 4), (4, 2, 2),
     lambda g: bf.natten_mask_nd(g, (3, 1, 1)) | sink(int(np.prod(g)), 2)),
    (sf.Neighborhood((1, 3)), (1, 8), (1, 16), lambda g: bf.natten_mask_nd(g, (1, 3))),         # 1-D ratio as (1, N)
]


@pytest.mark.parametrize("case", N_D, ids=lambda c: f"{c[0]!r}-{c[1]}-{c[2]}" if isinstance(c, tuple) else str(c))
def test_grid_ratios(case):
    pattern, grid, kv_grid, brute = case
    got = cross(pattern, grid, kv_grid)
    assert got.shape == (1, int(np.prod(grid)), int(np.prod(kv_grid)))
    assert_mask_equal(got[0], placed_rows(brute(kv_grid), grid, kv_grid), f"{pattern!r} {grid} -> {kv_grid}")


def test_ratio_literal_masks():
    """(1, N) grids written out: strided queries sit at 2c, pooled keys' query c at c // 2."""
    strided = cross(sf.Neighborhood((1, 3)), (1, 2), (1, 4))[0]
    assert_mask_equal(strided, lit("1110",     # query 0 at key 0: window shifted inward
                                   "0111"))    # query 1 at key 2
    pooled = cross(sf.Blocks((1, 1)), (1, 4), (1, 2))[0]
    assert_mask_equal(pooled, lit("10", "10", "01", "01"))


def test_same_kv_grid_is_self_attention():
    p = sf.Neighborhood(3)
    a = sf.dense_mask(p, sf.Problem(grid=(6, 6), kv_grid=(6, 6)))
    assert torch.equal(a, sf.dense_mask(p, sf.Problem(grid=(6, 6))))


# ------------------------------------------------------------------------------------
# Position-free families: any pair of grids
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid,kv_grid", [((2, 3), (5,)), ((7,), (3,)), ((4, 4), (3, 5)), ((2, 2, 2), (9,))])
def test_position_free_any_grids(grid, kv_grid):
    nq, nk = int(np.prod(grid)), int(np.prod(kv_grid))
    assert_mask_equal(cross(sf.Full(), grid, kv_grid)[0], np.ones((nq, nk), bool), "Full")
    assert_mask_equal(cross(sf.Sink(2), grid, kv_grid)[0], np.arange(nk)[None, :].repeat(nq, 0) < 2, "Sink")
    keys = np.isin(np.arange(nk), [1])[None, :].repeat(nq, 0)
    got = cross(sf.GlobalTokens((1,)), grid, kv_grid)[0]
    if sf.dsl.problem.placement(sf.Problem(grid=grid, kv_grid=kv_grid)).aligned:  # (7,) -> (3,) is not
        keys = keys | np.array([[place(i, grid, kv_grid) == 1] * nk for i in range(nq)])
    assert_mask_equal(got, keys, "GlobalTokens")


def test_global_tokens_without_placement_name_keys_only():
    got = cross(sf.GlobalTokens((0, 2)), (2, 2), 4)[0]
    assert_mask_equal(got, lit("1010", "1010", "1010", "1010"))


@pytest.mark.parametrize("causal_,nq,nk", [(False, 3, 7), (False, 7, 7), (False, 6, 4), (True, 3, 7), (True, 7, 7)])
def test_grouped_cross(causal_, nq, nk):
    """Causal with Nq > Nk is refused (among the errors below): it reads positions."""
    gen = torch.Generator().manual_seed(nq * 10 + nk)
    gq = torch.randint(-1, 3, (2, nq), generator=gen)
    gk = torch.randint(-1, 3, (2, 2, nk), generator=gen)          # per head for the keys
    got = cross(sf.Grouped(causal=causal_), nq, nk, heads=2, groups=gq, kv_groups=gk)
    want = np.zeros((2, 2, nq, nk), bool)
    for b, h, i, j in itertools.product(range(2), range(2), range(nq), range(nk)):
        want[b, h, i, j] = gq[b, i] >= 0 and gq[b, i] == gk[b, h, j] and (not causal_ or j <= i + nk - nq)
    assert_mask_equal(got, want, "Grouped")


def test_kv_groups_on_one_grid():
    """Without kv_grid the keys' ids default to the queries'; given, they are the keys'."""
    g = torch.tensor([[0, 0, 1, 1]])
    kg = torch.tensor([[1, 1, 0, 0]])
    same = sf.dense_mask(sf.Grouped(), sf.Problem(grid=4), groups=g)[0, 0].numpy()
    other = sf.dense_mask(sf.Grouped(), sf.Problem(grid=4), groups=g, kv_groups=kg)[0, 0].numpy()
    assert_mask_equal(same, lit("1100", "1100", "0011", "0011"))
    assert_mask_equal(other, lit("0011", "0011", "1100", "1100"))


def test_describe_counts_nq_by_nk():
    stats = sf.describe(sf.Causal(), sf.Problem(grid=2, kv_grid=4))
    assert stats.tokens == 2 and stats.kv_tokens == 4
    assert stats.heads[0].allowed == 7 and stats.density == pytest.approx(7 / 8)
    assert stats.as_dict()["kv_tokens"] == 4
    assert "kv_tokens" not in sf.describe(sf.Causal(), sf.Problem(grid=4)).as_dict()


# ------------------------------------------------------------------------------------
# Problem
# ------------------------------------------------------------------------------------
def test_problem_without_kv_grid_is_unchanged():
    p = sf.Problem(grid=(4, 4), heads=2)
    assert p.kv_grid is None and p.key_grid == (4, 4) and p.kv_tokens == 16 and not p.is_cross
    assert p == sf.Problem(grid=(4, 4), heads=2, kv_grid=(4, 4)) == sf.Problem(grid=(4, 4), heads=2, kv_grid=[4, 4])
    assert hash(p) == hash(sf.Problem(grid=(4, 4), heads=2, kv_grid=(4, 4)))
    assert repr(p) == "Problem(grid=(4, 4), heads=2, head_dim=64, dtype=fp16)"
    assert p.name() == "g4x4_h2_d64_fp16"
    assert p.on_key_grid() is p


def test_problem_with_kv_grid():
    p = sf.Problem(grid=1, kv_grid=4096, heads=8, kv_heads=2)
    assert p.grid == (1,) and p.q_grid == (1,) and p.kv_grid == (4096,) and p.key_grid == (4096,)
    assert p.tokens == 1 and p.kv_tokens == 4096 and p.is_cross
    assert repr(p) == "Problem(grid=(1,), kv_grid=(4096,), heads=8, head_dim=64, dtype=fp16, kv_heads=2)"
    assert p.name() == "g1_kv4096_h8_d64_fp16"
    assert p != sf.Problem(grid=1, heads=8, kv_heads=2)
    assert p.on_key_grid() == sf.Problem(grid=4096, heads=8, kv_heads=2)
    assert sf.Problem(grid=(56, 56), kv_grid=(7, 7)).kv_tokens == 49


@pytest.mark.parametrize("kw,error,words", [
    (dict(kv_grid=(8, 8)), ValueError, ["kv_grid", "grid"]),                   # no query grid
    (dict(grid=4, kv_grid=0), ValueError, ["kv_grid", ">= 1"]),
    (dict(grid=4, kv_grid=(2, 2, 2, 2)), ValueError, ["kv_grid", "1, 2 or 3 dimensions"]),
    (dict(grid=4, kv_grid=(2, 2.0)), TypeError, ["kv_grid[1]", "int"]),
    (dict(grid=4, kv_grid="64"), TypeError, ["kv_grid"]),
])
def test_problem_bad_kv_grid(kw, error, words):
    with pytest.raises(error) as e:
        sf.Problem(**kw)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


# ------------------------------------------------------------------------------------
# Refusals: what the grids do not define, with the family and the grids in the message
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern,grid,kv_grid,words", [
    (sf.Causal(), 8, 4, ["Causal", "grid=(8,)", "kv_grid=(4,)", "Nq <= Nk"]),
    (sf.SlidingWindow(2) | sf.Sink(1), 9, 3, ["SlidingWindow", "Nq <= Nk"]),
    (sf.StridedShards(2, 2, 2), 5, 4, ["StridedShards", "Nq <= Nk"]),
    (sf.Neighborhood(3), (3, 4), (8, 8), ["Neighborhood", "grid=(3, 4)", "kv_grid=(8, 8)", "dimension 0",
                                          "integer ratio"]),
    (sf.Halo(2, 1), (4, 4), (6, 4), ["Halo", "dimension 0"]),
    (sf.Blocks(2), (4, 4), (16,), ["Blocks", "different numbers of dimensions"]),
    (sf.Grouped(causal=True), 6, 4, ["Grouped", "Nq <= Nk"]),
    (sf.Routed((2, 2), 1), (4, 4), (8, 8), ["Routed", "one set of tokens", "kv_grid"]),
])
def test_refused_pairs_of_grids(pattern, grid, kv_grid, words):
    problem = sf.Problem(grid=grid, kv_grid=kv_grid)
    kw = {}
    if "groups" in pattern.inputs_needed():
        kw = dict(groups=torch.zeros(1, problem.tokens, dtype=torch.long),
                  kv_groups=torch.zeros(1, problem.kv_tokens, dtype=torch.long))
    if "qk" in pattern.inputs_needed():
        kw = dict(q=torch.randn(1, 1, problem.tokens, 4), k=torch.randn(1, 1, problem.kv_tokens, 4))
    with pytest.raises(ValueError) as e:
        sf.dense_mask(pattern, problem, **kw)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("pattern,kv_grid,words", [
    (sf.Documents((3, 3)), 8, ["Documents", "add up to 6", "8 tokens"]),   # lengths cover the keys' sequence
    (sf.Sink(9), 8, ["Sink", "9"]),
    (sf.Neighborhood(9), 8, ["kernel_size", "8"]),
    (sf.GlobalTokens((8,)), 8, ["GlobalTokens", "8"]),
])
def test_checked_on_the_key_grid(pattern, kv_grid, words):
    with pytest.raises(ValueError) as e:
        sf.dense_mask(pattern, sf.Problem(grid=2, kv_grid=kv_grid))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_grouped_needs_both_ids():
    problem = sf.Problem(grid=3, kv_grid=5)
    with pytest.raises(ValueError, match="kv_groups is missing"):
        sf.dense_mask(sf.Grouped(), problem, groups=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"kv_groups must have shape \[B=1, N=5\]"):
        sf.dense_mask(sf.Grouped(), problem, groups=torch.zeros(1, 3, dtype=torch.long),
                      kv_groups=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="kv_groups is for Grouped patterns"):
        sf.dense_mask(sf.Causal(), problem, kv_groups=torch.zeros(1, 5, dtype=torch.long))


def test_reference_refusals_and_shapes():
    problem = sf.Problem(grid=2, kv_grid=6, heads=2, head_dim=4)
    q, k = torch.randn(1, 2, 2, 4), torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError, match=r"k has shape \(1, 2, 2, 4\), expected \(1, 2, 6, 4\) \[B, kv_heads, Nk, D\]"):
        sf.reference_attention(q, q, q, sf.Causal(), problem)
    with pytest.raises(ValueError, match=r"modifiers\[0\] \(ALiBi\).*no place there"):
        sf.reference_attention(k, q, q, sf.Full(), sf.Problem(grid=6, kv_grid=2, heads=2, head_dim=4),
                               modifiers=(sf.ALiBi(torch.ones(2)),))
    with pytest.raises(ValueError, match="lengths is not supported with kv_grid"):
        sf.reference_attention(q, k, k, sf.Causal(), problem, lengths=[6])
    # Softcap and Sinks read no position: they apply
    out = sf.reference_attention(q, k, k, sf.Causal(), problem, modifiers=(sf.Softcap(5.0), sf.Sinks(torch.zeros(2))))
    assert out.shape == (1, 2, 2, 4) and out.dtype == torch.float64
