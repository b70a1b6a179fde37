"""``Blocks(size, offset=...)`` lowered and compiled: the lowering entry (window, predicate,
tag) against the exact mask, closed-form loop bounds against the schedule's tables, and the
CPU executor and the Triton interpreter against the float64 reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo  # noqa: F401  (imports triton.language before any kernel loads)

import sparseforge as sf
from sparseforge import compile
from sparseforge.lower import build_schedule
from sparseforge.lower.families import Symbols, pattern_tag, predicate, span_1d
from sparseforge.lower.naming import readable_name

from ._common import KERNEL_TOL, TOL, assert_gradients_match, check_executor, qkv, rand

F32 = torch.float32


def P(grid, heads=2, head_dim=8, kv_heads=None, dtype=F32):
    return sf.Problem(grid=grid, heads=heads, head_dim=head_dim, dtype=dtype, kv_heads=kv_heads)


@pytest.mark.parametrize("size,offset,length", [(4, 2, 10), (3, 1, 7), (5, 4, 13), (7, 3, 7), (4, 0, 10)])
def test_window_is_the_mask_row(size, offset, length):
    """``span_1d`` (the lowering's window) is exactly the keys of each query along one dimension."""
    leaf = sf.Blocks(size, offset=offset)
    p = leaf.params(sf.Problem(grid=(length,)))[0]
    x = np.arange(length)
    lo, hi, step = span_1d(leaf, length, x, p)
    assert step == 1
    assert (np.diff(lo) >= 0).all() and (np.diff(hi) >= 0).all()   # what the closed-form bounds rely on
    m = sf.dense_mask(leaf, sf.Problem(grid=(length,)))[0].numpy()
    for i in range(length):
        keys = np.flatnonzero(m[i])
        assert (lo[i], hi[i]) == (keys.min(), keys.max()) and len(keys) == hi[i] - lo[i] + 1


@pytest.mark.parametrize("pattern,grid", [
    (sf.Blocks(4, offset=2), (10,)),
    (sf.Blocks((2, 3), offset=(1, 2)), (5, 7)),
    (sf.Blocks(3, offset=1) & sf.Causal(), (8,)),
])
def test_predicate_is_the_mask(pattern, grid):
    problem = sf.Problem(grid=grid, heads=1)
    s = Symbols.make(len(grid))
    expr = predicate(pattern, problem, s)
    want = sf.dense_mask(pattern, problem)[0].numpy()
    coords = list(np.ndindex(*grid))
    for qn, qc in enumerate(coords):
        for kn, kc in enumerate(coords):
            subs = {s.qn: qn, s.kn: kn, s.head: 0}
            subs.update({sym: c for sym, c in zip(s.qx, qc)})
            subs.update({sym: c for sym, c in zip(s.kx, kc)})
            assert bool(expr.subs(subs)) == want[qn, kn], (qc, kc)


def test_tags_and_names():
    assert pattern_tag(sf.Blocks(7), 2) == "blocks7"
    assert pattern_tag(sf.Blocks(7, offset=3), 2) == "blocks7_o3"
    assert pattern_tag(sf.Blocks((4, 8), offset=(1, 0)), 2) == "blocks4x8_o1x0"
    name = readable_name(sf.Blocks(7, offset=3), P((14, 14)), "0123456789abcdef")
    assert name.startswith("blocks7_o3_g14x14"), name
    assert compile(sf.Blocks(4, offset=2), P((8, 8))).name != compile(sf.Blocks(4), P((8, 8))).name


CLOSED = [
    (sf.Blocks(4, offset=2), (10,), (4,), (4,)),
    (sf.Blocks(3, offset=1), (7, 6), (2, 4), (4, 2)),
    (sf.Blocks((3, 4), offset=(1, 3)), (7, 10), (2, 4), (4, 2)),
    (sf.Blocks(7, offset=3), (14, 14), (4, 8), (8, 4)),
    (sf.Blocks(5, offset=4), (23,), (8,), (2,)),
]


@pytest.mark.parametrize("pattern,grid,q_tile,k_tile", CLOSED, ids=[f"{c[0]!r}-{c[1]}" for c in CLOSED])
def test_closed_form_equals_tables(pattern, grid, q_tile, k_tile):
    schedule = build_schedule(pattern, sf.Problem(grid=grid, heads=1, head_dim=16), q_tile=q_tile, k_tile=k_tile)
    assert schedule.loop_bounds == "closed form"
    k_shape = [d.k_tiles for d in schedule.geometry.dims]
    for qt, coords in enumerate(np.ndindex(*[d.q_tiles for d in schedule.geometry.dims])):
        a, b, f = schedule.forward.ptr[0, qt], schedule.forward.ptr[0, qt + 1], schedule.forward.full[0, qt]
        tiles = [tuple(int(x) for x in np.unravel_index(i, k_shape)) for i in schedule.forward.idx[a:b]]
        visited, full = schedule.bounds.key_tiles(coords)
        assert visited == set(tiles), f"query tile {coords}"
        assert full == set(tiles[:f]), f"query tile {coords}"


EXECUTOR = [
    ("1d", sf.Blocks(4, offset=2), P(10), (4,), (4,)),
    ("2d", sf.Blocks((3, 4), offset=(1, 3)), P((7, 10)), (2, 4), (4, 2)),
    ("swin", sf.Blocks(4, offset=2), P((8, 8), heads=2, kv_heads=1), (4, 4), (4, 4)),
    ("perhead", sf.PerHead([sf.Blocks(4), sf.Blocks(4, offset=2)]), P((8, 8)), (4, 4), (4, 4)),
    ("and_causal", sf.Blocks(3, offset=1) & sf.Causal(), P(11), (4,), (8,)),
    ("union", sf.Blocks(4, offset=1) | sf.Blocks(4, offset=3), P(13), (4,), (4,)),
]


@pytest.mark.parametrize("pattern, problem, q_tile, k_tile", [c[1:] for c in EXECUTOR], ids=[c[0] for c in EXECUTOR])
def test_cpu_executor_matches_reference(pattern, problem, q_tile, k_tile):
    check_executor(pattern, problem, q_tile=q_tile, k_tile=k_tile)


INTERPRETED = [
    ("2d", sf.Blocks((3, 4), offset=(1, 3)), P((6, 9), head_dim=16), (4, 4), (4, 4)),
    ("perhead", sf.PerHead([sf.Blocks(4), sf.Blocks(4, offset=2)]), P((8, 8), head_dim=16), (4, 4), (4, 4)),
]


@pytest.mark.parametrize("case", [c[0] for c in INTERPRETED])
def test_interpreter_matches_reference(case):
    _, pattern, problem, q_tile, k_tile = next(c for c in INTERPRETED if c[0] == case)
    attn = compile(pattern, problem, backend="interpret", q_tile=q_tile, k_tile=k_tile)
    if case == "2d":
        assert attn.schedule.loop_bounds == "closed form"
    q, k, v = qkv(problem, 2, F32, seed=5, requires_grad=True)
    out, lse = attn(q, k, v, return_lse=True)
    dout = rand(out.shape, F32, torch.Generator().manual_seed(6))
    assert_gradients_match(
        f"{pattern!r} interpreted", (q, k, v), out, lse, dout,
        lambda q64, k64, v64: sf.reference_attention(q64, k64, v64, pattern, problem, return_lse=True),
        KERNEL_TOL[F32])


def test_offset_zero_compiles_to_the_same_kernel():
    a = compile(sf.Blocks(4, offset=0), P((8, 8)))
    b = compile(sf.Blocks(4), P((8, 8)))
    assert a.name == b.name and a.kernel is b.kernel
    assert TOL[F32] > 0
