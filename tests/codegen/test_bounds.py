"""Closed-form key-tile bounds (lower.bounds) reproduce the schedule's tables exactly, and
the kernels that loop over them match the float64 reference under the Triton interpreter."""
import numpy as np
import pytest
import torch
import torch._dynamo  # noqa: F401  (imports triton.language before any kernel loads)

import sparseforge as sf
from sparseforge.lower import build_schedule
from sparseforge.lower.bounds import derive
from sparseforge.backends.triton import TritonKernels

# (pattern, grid, query tile, key tile)
CASES = [
    (sf.Neighborhood(7, dilation=2), (56, 56), (8, 16), (4, 16)),
    (sf.Neighborhood(9), (20, 20), (2, 4), (2, 2)),
    (sf.Neighborhood(5, dilation=2), (13, 11), (4, 4), (2, 4)),
    (sf.Neighborhood((3, 4), stride=(2, 3), causal=(True, False)), (9, 10), (4, 4), (4, 2)),
    (sf.Neighborhood(4, stride=2), (11,), (4,), (4,)),
    (sf.Neighborhood(3, stride=2, causal=True), (11,), (4,), (2,)),
    (sf.Neighborhood(18, dilation=3), (61,), (8,), (16,)),
    (sf.Neighborhood((3, 5, 5), dilation=(1, 2, 1)), (5, 12, 9), (2, 2, 4), (1, 2, 2)),
    (sf.SlidingWindow(3, 1), (19,), (8,), (4,)),
    (sf.SlidingWindow(20, 3), (70,), (8,), (4,)),
    (sf.Halo(4, 1), (6, 5), (2, 4), (2, 4)),
    (sf.Halo(4, 2), (16, 16), (4, 4), (2, 2)),
    (sf.Blocks(3), (7, 6), (2, 4), (4, 2)),
    (sf.Blocks((4, 8)), (16, 16), (4, 8), (2, 4)),
    (sf.Grid(2), (4, 6), (2, 4), (2, 4)),
    (sf.Grid(8), (64, 64), (8, 16), (8, 8)),
]


def _ids(cases):
    return [f"{c[0]!r}-{'x'.join(map(str, c[1]))}" for c in cases]


@pytest.mark.parametrize("pattern,grid,q_tile,k_tile", CASES, ids=_ids(CASES))
def test_closed_form_equals_tables(pattern, grid, q_tile, k_tile):
    problem = sf.Problem(grid=grid, heads=1, head_dim=16)
    schedule = build_schedule(pattern, problem, q_tile=q_tile, k_tile=k_tile)
    assert schedule.loop_bounds == "closed form"
    bounds = schedule.bounds
    geom = schedule.geometry
    k_shape = [d.k_tiles for d in geom.dims]
    for qt, coords in enumerate(np.ndindex(*[d.q_tiles for d in geom.dims])):
        a, b, f = schedule.forward.ptr[0, qt], schedule.forward.ptr[0, qt + 1], schedule.forward.full[0, qt]
        tiles = [tuple(int(x) for x in np.unravel_index(i, k_shape)) for i in schedule.forward.idx[a:b]]
        visited, full = bounds.key_tiles(coords)
        assert visited == set(tiles), f"query tile {coords}"
        assert full == set(tiles[:f]), f"query tile {coords}"


def test_bounds_have_full_and_partial_tiles_somewhere():
    """The sweep above exercises both loops: some cases have FULL boxes with PARTIAL slabs around."""
    schedule = build_schedule(sf.Neighborhood(9), sf.Problem(grid=(20, 20), heads=1, head_dim=16),
                              q_tile=(2, 4), k_tile=(2, 2))
    assert 0 < schedule.full_tiles < schedule.visited_tiles


@pytest.mark.parametrize("pattern,reason", [
    (sf.Neighborhood(3) | sf.Sink(2), "Union is not a single separable family"),
    (sf.Causal(), "Causal is not a single separable family"),
])
def test_no_closed_form_says_why(pattern, reason):
    schedule = build_schedule(pattern, sf.Problem(grid=(16,), heads=1, head_dim=16), q_tile=(4,))
    assert schedule.loop_bounds == "index tables"
    assert schedule.bounds_reason == reason
    assert reason in schedule.summary()


def test_fold_mismatch_falls_back_to_tables():
    problem = sf.Problem(grid=(12,), heads=1, head_dim=16)
    schedule = build_schedule(sf.Neighborhood(3, dilation=2), problem, q_tile=(4,), fold=(1,))
    assert schedule.bounds is None
    assert "contiguous under fold 2" in schedule.bounds_reason
    assert derive(sf.Neighborhood(3, dilation=2), problem, schedule.geometry)[0] is None


def test_closed_form_kernels_walk_the_full_box_with_counters():
    """FULL key tiles come from the closed-form box (counters, no index load, no division per
    tile); PARTIAL ones from the tables, whose FULL count the box reproduces."""
    schedule = build_schedule(sf.Neighborhood(7), sf.Problem(grid=(16, 16), heads=2, head_dim=16))
    kernels = TritonKernels(schedule)
    for kind in ("fwd", "bwd_dq"):
        src = kernels.source(kind)
        assert "_key_tile_bounds(q_tile)" in src and "c0 = full_first0" in src and "_k_rows(c0 * " in src
        assert "_partial_key_tile" not in src and "_k_rows(tl.load(KV_IDX + partial_first + j))" in src
    assert "Q_IDX" in kernels.source("bwd_dkdv")  # dK/dV walks the inverse tables


# Small enough for the interpreter, each with FULL and PARTIAL key tiles.
INTERPRET = [
    (sf.Neighborhood(5), (10, 10), (2, 4), (2, 2)),
    (sf.Neighborhood((3, 3, 3), dilation=(1, 2, 1)), (3, 6, 5), (2, 2, 2), (2, 2, 2)),
    (sf.Neighborhood((3, 4), stride=(2, 3), causal=(True, False)), (9, 10), (2, 4), (1, 2)),
    (sf.SlidingWindow(20, 3), (70,), (8,), (4,)),
    (sf.Halo(4, 1), (8, 8), (4, 4), (2, 2)),
]


@pytest.mark.parametrize("pattern,grid,q_tile,k_tile", INTERPRET, ids=_ids(INTERPRET))
def test_closed_form_kernels_match_reference(pattern, grid, q_tile, k_tile):
    torch.manual_seed(0)
    dtype, d = torch.float32, 16
    problem = sf.Problem(grid=grid, heads=2, kv_heads=1, head_dim=d, dtype=dtype)
    schedule = build_schedule(pattern, problem, q_tile=q_tile, k_tile=k_tile)
    assert schedule.loop_bounds == "closed form" and 0 < schedule.full_tiles < schedule.visited_tiles
    kernels = TritonKernels(schedule, interpret=True)
    n = problem.tokens
    q, k, v = torch.randn(1, 2, n, d), torch.randn(1, 1, n, d), torch.randn(1, 1, n, d)
    out, lse = kernels.forward(q, k, v, 0.3, schedule.tables())
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = sf.reference_attention(q64, k64, v64, pattern, problem, scale=0.3, return_lse=True)
    dout = torch.randn_like(ref)
    ref.backward(dout)
    dq, dk, dv, _ = kernels.backward(q, k, v, out, lse, dout.float(), 0.3, schedule.tables())
    for name, got, want in (("out", out, ref), ("lse", lse, ref_lse), ("dq", dq, q64.grad), ("dk", dk, k64.grad),
                            ("dv", dv, v64.grad)):
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < 2e-5, f"{name}: relative error {err:.2e}"
