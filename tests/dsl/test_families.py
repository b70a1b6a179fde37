"""Every family against the independent brute-force transcription in ``brute_force.py``.

Sweeps cover 1-, 2- and 3-D grids (including extents that the kernel, block, region or
window size does not divide), odd and even kernels, dilations, strides and per-dimension
causality. Grids are kept tiny (N <= ~300) so the whole file runs in seconds.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sparseforge as sf

from . import brute_force as bf
from ._common import assert_mask_equal, dense


def _one_head(pattern, grid, **kw):
    m = dense(pattern, grid, **kw)
    assert m.shape[0] == 1
    return m[0]


# ------------------------------------------------------------------------------------
# Neighborhood (NATTEN)
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", range(1, 14))
def test_neighborhood_1d_exhaustive(length):
    """Every valid (kernel, dilation, stride, causal) on one 1-D length."""
    checked = 0
    for k in range(1, length + 1):
        for d in range(1, length // k + 1):
            for s in range(1, k + 1):
                for c in (False, True):
                    got = _one_head(sf.Neighborhood(k, dilation=d, stride=s, causal=c), (length,))
                    want = bf.natten_window_1d(length, k, d, s, c)
                    assert_mask_equal(got, want, f"L={length} K={k} d={d} s={s} causal={c}")
                    checked += 1
    assert checked > 0


ND_CASES = [
    # grid, kernel_size, dilation, stride, causal
    ((5, 6), 3, 1, 1, False),
    ((5, 6), 4, 1, 1, False),            # even kernel, 2-D
    ((7, 9), (3, 4), (2, 2), 1, False),  # dilation not dividing either extent
    ((7, 9), (3, 4), (2, 2), (2, 3), False),
    ((8, 8), 3, 2, 2, (True, False)),
    ((6, 7), (2, 5), 1, (2, 5), (False, True)),
    ((9, 5), (3, 2), (3, 2), (3, 1), True),
    ((10, 10), 5, 2, 4, False),
    ((4, 5, 6), 2, 1, 1, False),
    ((4, 5, 6), (3, 3, 3), (1, 1, 2), (1, 2, 3), (False, True, False)),
    ((5, 4, 7), (5, 4, 3), 1, (5, 1, 2), (True, True, True)),
    ((6, 6, 7), (2, 3, 2), (3, 2, 3), (2, 3, 1), (False, False, True)),
    ((3, 3, 3), 3, 1, 1, False),         # kernel == grid
]


def _random_nd_cases(n, seed=1234):
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < n:
        nd = int(rng.integers(2, 4))
        grid = tuple(int(x) for x in rng.integers(1, 10 if nd == 2 else 7, size=nd))
        if math.prod(grid) > 300:
            continue
        ks, ds, ss, cs = [], [], [], []
        for length in grid:
            k = int(rng.integers(1, length + 1))
            d = int(rng.integers(1, length // k + 1))
            ks.append(k)
            ds.append(d)
            ss.append(int(rng.integers(1, k + 1)))
            cs.append(bool(rng.integers(0, 2)))
        cases.append((grid, tuple(ks), tuple(ds), tuple(ss), tuple(cs)))
    return cases


@pytest.mark.parametrize("grid, kernel, dilation, stride, causal", ND_CASES + _random_nd_cases(30))
def test_neighborhood_nd(grid, kernel, dilation, stride, causal):
    p = sf.Neighborhood(kernel, dilation=dilation, stride=stride, causal=causal)
    got = _one_head(p, grid)
    want = bf.natten_mask_nd(grid, kernel, dilation, stride, causal)
    assert_mask_equal(got, want, repr(p))


def _expand(x, nd):
    return tuple(x) if isinstance(x, tuple) else (x,) * nd


@pytest.mark.parametrize("grid, kernel, dilation, stride, causal",
                         [c for c in ND_CASES + _random_nd_cases(30, seed=99) if not any(_expand(c[4], len(c[0])))])
def test_neighborhood_sees_exactly_kernel_keys(grid, kernel, dilation, stride, causal):
    """NATTEN: a non-causal query sees exactly prod(kernel_size) keys, wherever it is."""
    m = _one_head(sf.Neighborhood(kernel, dilation=dilation, stride=stride), grid)
    assert (m.sum(-1) == math.prod(_expand(kernel, len(grid)))).all()


@pytest.mark.parametrize("grid", [(1,), (7,), (4, 6), (2, 3, 5), (5, 1)])
@pytest.mark.parametrize("stride", [1, 2])
def test_neighborhood_kernel_equal_to_grid_is_full(grid, stride):
    stride = tuple(min(stride, g) for g in grid)
    m = _one_head(sf.Neighborhood(grid, stride=stride), grid)
    assert m.all()


@pytest.mark.parametrize("length", [1, 5, 8])
def test_neighborhood_causal_kernel_equal_to_length_is_causal(length):
    got = _one_head(sf.Neighborhood(length, causal=True), (length,))
    assert_mask_equal(got, _one_head(sf.Causal(), (length,)))


def test_neighborhood_tuple_and_int_agree():
    grid = (6, 7)
    a = _one_head(sf.Neighborhood(3, dilation=2, stride=2, causal=True), grid)
    b = _one_head(sf.Neighborhood((3, 3), dilation=(2, 2), stride=(2, 2), causal=(True, True)), grid)
    assert_mask_equal(a, b)


def test_neighborhood_is_separable_and_same_for_every_head():
    grid = (5, 7)
    p = sf.Neighborhood((3, 4), dilation=(1, 1), stride=(2, 3), causal=(False, True))
    m = dense(p, grid, heads=3)
    assert (m == m[:1]).all()
    rows = bf.natten_window_1d(5, 3, 1, 2, False)
    cols = bf.natten_window_1d(7, 4, 1, 3, True)
    assert_mask_equal(m[0], np.kron(rows, cols))


# ------------------------------------------------------------------------------------
# SlidingWindow, Halo, Blocks, Grid
# ------------------------------------------------------------------------------------
SLIDING = [
    ((9,), 0, 0), ((9,), 2, 0), ((9,), 0, 3), ((9,), 1, 4), ((6,), 10, 10), ((13,), 3, 2),
    ((5, 7), 1, 1), ((5, 7), (2, 0), (0, 3)), ((6, 6), (0, 1), 2), ((4, 5, 6), 1, 0),
    ((4, 5, 6), (1, 0, 2), (0, 2, 1)), ((3, 4, 5), (5, 5, 5), 0),
]


@pytest.mark.parametrize("grid, left, right", SLIDING)
def test_sliding_window(grid, left, right):
    got = _one_head(sf.SlidingWindow(left, right), grid)
    assert_mask_equal(got, bf.sliding_window_mask(grid, left, right))


def test_sliding_window_1d_is_causal_band():
    got = _one_head(sf.SlidingWindow(3), (10,))
    n = np.arange(10)
    diff = n[None, :] - n[:, None]
    assert_mask_equal(got, (diff <= 0) & (diff >= -3))


HALO = [
    ((8,), 2, 1), ((9,), 2, 1), ((7,), 3, 0), ((10,), 3, 4), ((5,), 5, 2), ((1,), 1, 1),
    ((6, 7), 2, 1), ((6, 7), (3, 2), (1, 0)), ((7, 5), (4, 5), (2, 3)),
    ((4, 5, 6), 2, 1), ((5, 4, 6), (2, 3, 4), (0, 1, 2)),
]


@pytest.mark.parametrize("grid, block, halo", HALO)
def test_halo(grid, block, halo):
    got = _one_head(sf.Halo(block, halo), grid)
    assert_mask_equal(got, bf.halo_mask(grid, block, halo))


def test_halo_zero_is_blocks():
    for grid, size in [((9,), 2), ((6, 7), (2, 3)), ((3, 4, 5), 2)]:
        assert_mask_equal(_one_head(sf.Halo(size, 0), grid), _one_head(sf.Blocks(size), grid))


BLOCKS = [((8,), 2), ((9,), 2), ((7,), 3), ((7,), 7), ((6, 7), 2), ((6, 7), (3, 2)),
          ((5, 5), (5, 1)), ((4, 5, 6), 2), ((4, 5, 6), (3, 2, 4))]


@pytest.mark.parametrize("grid, size", BLOCKS)
def test_blocks(grid, size):
    got = _one_head(sf.Blocks(size), grid)
    assert_mask_equal(got, bf.blocks_mask(grid, size))


GRIDS = [((8,), 2), ((8,), 4), ((9,), 3), ((7,), 7), ((7,), 1), ((6, 8), 2), ((6, 8), (3, 4)),
         ((6, 6), (6, 1)), ((4, 6, 6), 2), ((4, 6, 9), (2, 3, 3))]


@pytest.mark.parametrize("grid, size", GRIDS)
def test_grid(grid, size):
    m = _one_head(sf.Grid(size), grid)
    assert_mask_equal(m, bf.grid_mask(grid, size))
    # every token sees `size` tokens per dimension
    assert (m.sum(-1) == math.prod(_expand(size, len(grid)))).all()


def test_blocks_and_grid_are_complementary():
    """MaxViT: block (size b) and grid (size S/b) attention on the same grid intersect in
    the query alone."""
    grid = (6, 8)
    m = _one_head(sf.Blocks((2, 4)) & sf.Grid((3, 2)), grid)
    assert_mask_equal(m, np.eye(48, dtype=bool))


# ------------------------------------------------------------------------------------
# Flat-index families: Full, Causal, Sink, GlobalTokens, Documents
# ------------------------------------------------------------------------------------
FLAT_GRIDS = [(1,), (5,), (12,), (3, 4), (2, 3, 2)]


@pytest.mark.parametrize("grid", FLAT_GRIDS)
def test_full_and_causal(grid):
    n = math.prod(grid)
    assert_mask_equal(_one_head(sf.Full(), grid), np.ones((n, n), dtype=bool))
    idx = np.arange(n)
    assert_mask_equal(_one_head(sf.Causal(), grid), idx[None, :] <= idx[:, None])


@pytest.mark.parametrize("grid", FLAT_GRIDS)
def test_sink(grid):
    n = math.prod(grid)
    for s in {1, max(1, n // 2), n}:
        want = np.zeros((n, n), dtype=bool)
        want[:, :s] = True
        assert_mask_equal(_one_head(sf.Sink(s), grid), want, f"Sink({s})")


@pytest.mark.parametrize("grid, indices", [((5,), [0]), ((12,), [11, 3, 0]), ((3, 4), [5, 6]), ((2, 3, 2), [11])])
def test_global_tokens(grid, indices):
    n = math.prod(grid)
    want = np.zeros((n, n), dtype=bool)
    for g in indices:
        want[g, :] = True
        want[:, g] = True
    assert_mask_equal(_one_head(sf.GlobalTokens(indices), grid), want)


@pytest.mark.parametrize("grid, lengths", [((5,), [5]), ((12,), [3, 1, 8]), ((12,), [1] * 12), ((3, 4), [7, 5]),
                                           ((2, 3, 2), [2, 2, 2, 6])])
def test_documents(grid, lengths):
    n = math.prod(grid)
    doc = np.repeat(np.arange(len(lengths)), lengths)
    assert len(doc) == n
    assert_mask_equal(_one_head(sf.Documents(lengths), grid), doc[:, None] == doc[None, :])


def test_documents_and_causal():
    lengths = [3, 4, 2]
    doc = np.repeat(np.arange(3), lengths)
    idx = np.arange(9)
    want = (doc[:, None] == doc[None, :]) & (idx[None, :] <= idx[:, None])
    assert_mask_equal(_one_head(sf.Documents(lengths) & sf.Causal(), (9,)), want)


# ------------------------------------------------------------------------------------
# StridedShards (S2-Attention / DKernel)
# ------------------------------------------------------------------------------------
def _shard_cases(n, seed=7):
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < n:
        heads = int(rng.choice([1, 2, 3, 4, 6, 8]))
        kv = int(rng.choice([d for d in range(1, heads + 1) if heads % d == 0]))
        causal = bool(rng.integers(0, 2))
        if causal or rng.integers(0, 2):
            local = int(rng.integers(1, 4))
        else:
            local = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        cases.append(dict(
            n=int(rng.choice([7, 16, 23, 37, 50])), block_size=int(rng.choice([1, 2, 3, 4, 5, 8])),
            local_blocks=local, vertical_stride=int(rng.integers(1, 6)), heads=heads, kv_heads=kv,
            heterogeneous=bool(rng.integers(0, 2)), dense_heads=int(rng.integers(0, kv + 1)) if rng.integers(0, 2) else 0,
            causal=causal))
    return cases


SHARD_CASES = [
    dict(n=16, block_size=2, local_blocks=2, vertical_stride=3, heads=2, kv_heads=2, heterogeneous=True, dense_heads=0, causal=True),
    dict(n=37, block_size=4, local_blocks=2, vertical_stride=4, heads=4, kv_heads=4, heterogeneous=True, dense_heads=1, causal=True),
    dict(n=37, block_size=4, local_blocks=2, vertical_stride=4, heads=4, kv_heads=4, heterogeneous=False, dense_heads=0, causal=True),
    dict(n=37, block_size=4, local_blocks=(1, 3), vertical_stride=3, heads=4, kv_heads=2, heterogeneous=True, dense_heads=1, causal=False),
    dict(n=45, block_size=5, local_blocks=(2, 1), vertical_stride=2, heads=3, kv_heads=3, heterogeneous=True, dense_heads=0, causal=False),
    dict(n=64, block_size=4, local_blocks=1, vertical_stride=8, heads=8, kv_heads=2, heterogeneous=True, dense_heads=1, causal=True),
    dict(n=23, block_size=3, local_blocks=3, vertical_stride=2, heads=6, kv_heads=3, heterogeneous=True, dense_heads=3, causal=True),
]


def _brute_shards(c):
    return bf.dkernel_mask(
        c["heads"], c["n"], c["block_size"], c["local_blocks"], c["vertical_stride"], causal=c["causal"],
        dense_heads=c["dense_heads"], num_kv_heads=c["kv_heads"],
        # DKernel's homo_head forbids dense heads; a zero sliding step is the same layout
        head_sliding_step=None if c["heterogeneous"] else 0)


@pytest.mark.parametrize("case", SHARD_CASES + _shard_cases(40), ids=lambda c: "-".join(map(str, c.values())))
def test_strided_shards(case):
    c = case
    p = sf.StridedShards(c["block_size"], c["local_blocks"], c["vertical_stride"], heterogeneous=c["heterogeneous"],
                         dense_heads=c["dense_heads"], causal=c["causal"])
    got = dense(p, (c["n"],), heads=c["heads"], kv_heads=c["kv_heads"])
    assert_mask_equal(got, _brute_shards(c), repr(p))


@pytest.mark.parametrize("causal", [True, False])
def test_strided_shards_homogeneous_is_dkernel_homo_head(causal):
    p = sf.StridedShards(3, 2, 3, heterogeneous=False, causal=causal)
    got = dense(p, (29,), heads=3)
    assert_mask_equal(got, bf.dkernel_mask(3, 29, 3, 2, 3, homo_head=True, causal=causal))


def test_strided_shards_grid_is_flat_index():
    """Sequence families use the flat row-major index, whatever the grid's rank."""
    p = sf.StridedShards(4, 2, 3)
    assert_mask_equal(dense(p, (5, 7), heads=2), dense(p, (35,), heads=2))


def test_strided_shards_causal_ignores_right_local_count():
    """Causal: key blocks right of the query block are masked at token level anyway."""
    a = dense(sf.StridedShards(3, (2, 3), 4), (31,), heads=4)
    b = dense(sf.StridedShards(3, 2, 4), (31,), heads=4)
    assert_mask_equal(a, b)


@pytest.mark.parametrize("heads, vs", [(4, 4), (8, 4), (5, 3)])
def test_strided_shards_heterogeneous_heads_cover_the_context(heads, vs):
    """With at least vertical_stride heads (step 1), the heads' union is all of Causal."""
    n = 40
    m = dense(sf.StridedShards(2, 1, vs), (n,), heads=heads)
    assert_mask_equal(m.any(0), _one_head(sf.Causal(), (n,)))
    assert not (m == m[:1]).all()


# ------------------------------------------------------------------------------------
# Routed (BiFormer)
# ------------------------------------------------------------------------------------
ROUTED = [
    # grid, region_size, topk
    ((12,), 3, 1), ((12,), 5, 2),        # ragged last region (12 = 5 + 5 + 2)
    ((6, 8), 2, 3), ((5, 6), (2, 4), 2), ((7, 7), 3, 4),
    ((4, 5, 6), 2, 3), ((3, 4, 5), (2, 3, 2), 5),
]


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("grid, region, topk", ROUTED)
def test_routed(grid, region, topk, per_head):
    gen = torch.Generator().manual_seed(hash((grid, topk, per_head)) % 1000)
    b, h, d = 2, 3, 4
    n = math.prod(grid)
    q = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)
    problem = sf.Problem(grid=grid, heads=h, head_dim=d)
    got = sf.dense_mask(sf.Routed(region, topk, per_head=per_head), problem, q=q, k=k).numpy()
    want = bf.biformer_routing_mask(q.numpy(), k.numpy(), region, grid, topk, per_head=per_head)
    assert_mask_equal(got, want)
    if not per_head:
        assert (got == got[:, :1]).all()


@pytest.mark.parametrize("per_head", [False, True])
def test_routed_gqa_uses_expanded_keys(per_head):
    gen = torch.Generator().manual_seed(3)
    grid, b, h, kvh, d = (6, 6), 2, 4, 2, 4
    q = torch.randn(b, h, 36, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, kvh, 36, d, generator=gen, dtype=torch.float64)
    problem = sf.Problem(grid=grid, heads=h, head_dim=d, kv_heads=kvh)
    got = sf.dense_mask(sf.Routed((2, 3), 2, per_head=per_head), problem, q=q, k=k).numpy()
    want = bf.biformer_routing_mask(q.numpy(), k.repeat_interleave(h // kvh, 1).numpy(), (2, 3), grid, 2,
                                    per_head=per_head)
    assert_mask_equal(got, want)


@pytest.mark.parametrize("grid, region", [((10,), 3), ((5, 6), (2, 4)), ((3, 4, 5), 2)])
def test_routed_all_regions_is_full(grid, region):
    rs = _expand(region, len(grid))
    regions = math.prod(-(-g // r) for g, r in zip(grid, rs))
    gen = torch.Generator().manual_seed(0)
    n = math.prod(grid)
    q, k = (torch.randn(2, 2, n, 3, generator=gen) for _ in range(2))
    problem = sf.Problem(grid=grid, heads=2, head_dim=3)
    for per_head in (False, True):
        assert sf.dense_mask(sf.Routed(region, regions, per_head=per_head), problem, q=q, k=k).all()


def test_routed_given_routes_match_computed():
    gen = torch.Generator().manual_seed(5)
    grid, h = (6, 4), 2
    q, k = (torch.randn(1, h, 24, 4, generator=gen) for _ in range(2))
    p = sf.Routed(2, 2, per_head=True)
    problem = sf.Problem(grid=grid, heads=h, head_dim=4)
    routes = p.routes(q.double(), k.double(), grid)
    assert routes.shape == (1, h, 6, 2)
    a = sf.dense_mask(p, problem, q=q, k=k)
    b = sf.dense_mask(p, problem, routes=routes)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------
# Scattered (voxel windows)
# ------------------------------------------------------------------------------------
def _random_coords(gen, n, batch, ndim, extent=10):
    b = torch.randint(0, batch, (n, 1), generator=gen)
    c = torch.randint(0, extent, (n, ndim), generator=gen)
    return torch.cat([b, c], 1)


SCATTERED = [
    # batch, ndim, window, shift
    (1, 1, 3, 0), (2, 1, 4, 2),
    (1, 2, 3, 0), (3, 2, (2, 4), (1, 0)), (2, 2, 4, 2), (2, 2, (5, 3), (4, 1)),
    (1, 3, 2, 0), (3, 3, (3, 2, 4), (1, 1, 2)), (2, 3, 4, (2, 0, 3)),
]


@pytest.mark.parametrize("batch, ndim, window, shift", SCATTERED)
def test_scattered(batch, ndim, window, shift):
    gen = torch.Generator().manual_seed(batch * 10 + ndim)
    coords = _random_coords(gen, 80, batch, ndim)
    got = sf.dense_mask(sf.Scattered(window, shift=shift), sf.Problem(heads=2), coords=coords).numpy()
    want = bf.scattered_mask(coords.numpy(), window, shift)
    assert got.shape == (2, 80, 80)
    assert_mask_equal(got[0], want)
    assert_mask_equal(got[1], want)


def test_scattered_int32_coords_and_grid_problem():
    gen = torch.Generator().manual_seed(11)
    coords = _random_coords(gen, 30, 2, 2).to(torch.int32)
    p = sf.Scattered((3, 3), shift=1)
    a = sf.dense_mask(p, sf.Problem(heads=1), coords=coords)
    b = sf.dense_mask(p, sf.Problem(grid=30, heads=1), coords=coords)
    assert torch.equal(a, b)
    assert_mask_equal(a[0].numpy(), bf.scattered_mask(coords.numpy(), (3, 3), (1, 1)))


# ------------------------------------------------------------------------------------
# describe
# ------------------------------------------------------------------------------------
def test_describe_neighborhood_and_empty_rows():
    problem = sf.Problem(grid=(7, 9), heads=2)
    s = sf.describe(sf.Neighborhood((3, 4), dilation=2), problem)
    assert len(s.heads) == 2
    for h in s.heads:
        assert h.keys_min == h.keys_max == 12 and h.empty_rows == 0
        assert h.allowed == 63 * 12
    assert s.density == pytest.approx(12 / 63)
    s = sf.describe(sf.Blocks(3) & sf.Grid(3), sf.Problem(grid=(9,), heads=1))
    assert s.heads[0].keys_max == 1 and s.empty_rows == 0
    s = sf.describe(sf.Documents([4, 5]) & sf.GlobalTokens([0]), sf.Problem(grid=(9,), heads=1))
    # tokens of document 2 see nothing (token 0 is in document 1)
    assert s.empty_rows == 5 and s.heads[0].keys_min == 0
    assert "empty rows" in str(s)
