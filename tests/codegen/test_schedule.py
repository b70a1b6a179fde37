"""The tile schedule against the exact dense mask: every allowed pair lies in a visited
tile, FULL tiles are all-allowed (and hold no padding), EMPTY tiles are all-masked."""
import numpy as np
import pytest
import torch

import sparseforge as sf
from sparseforge.lower import build_schedule, default_tile
from sparseforge.lower.families import EMPTY, FULL, PARTIAL

CASES = [
    (sf.Neighborhood(3), (10,), (4,)),
    (sf.Neighborhood(4), (11,), (4,)),
    (sf.Neighborhood(5, dilation=2), (13, 11), (2, 4)),
    (sf.Neighborhood((3, 4), stride=(2, 1), causal=(True, False)), (9, 10), (4, 2)),
    (sf.Neighborhood((3, 2, 3), dilation=(1, 2, 1)), (5, 6, 7), (2, 2, 4)),
    (sf.Neighborhood(3, stride=3), (13,), (4,)),
    (sf.SlidingWindow((2, 1), (0, 3)), (7, 9), (4, 4)),
    (sf.Halo(4, 1), (12, 10), (2, 4)),
    (sf.Blocks(3), (10,), (4,)),
    (sf.Grid(3), (9, 12), (2, 4)),
    (sf.Full(), (9,), (4,)),
    (sf.Causal() & (sf.SlidingWindow(5) | sf.Sink(2)), (40,), (8,)),
    (sf.StridedShards(4, 2, 3), (50,), (8,)),
    (sf.StridedShards(4, (2, 2), 3, causal=False, dense_heads=1), (50,), (8,)),
    (sf.StridedShards(8, 1, 2, heterogeneous=False), (37,), (4,)),
    (sf.Documents([10, 20, 5]), (35,), (8,)),
    (sf.GlobalTokens([3, 17]) | sf.Neighborhood(3), (6, 6), (2, 4)),
    (sf.Neighborhood(3) & sf.Causal(), (6, 7), (2, 4)),
    (sf.PerHead([sf.Neighborhood(3), sf.Blocks(2), sf.Grid(2), sf.Causal()]), (8, 8), (2, 4)),
]


def visited_classes(s, group):
    g = s.geometry
    out = np.zeros((g.n_q_tiles, g.n_k_tiles), np.int8)
    ptr, idx, full = s.forward.ptr[group], s.forward.idx, s.forward.full[group]
    for a in range(g.n_q_tiles):
        row = idx[ptr[a]:ptr[a + 1]]
        out[a, row[:full[a]]] = FULL
        out[a, row[full[a]:]] = PARTIAL
    return out


@pytest.mark.parametrize("pattern,grid,tile", CASES, ids=[repr(c[0]) for c in CASES])
def test_schedule_is_exact(pattern, grid, tile):
    problem = sf.Problem(grid=grid, heads=4, kv_heads=2)
    s = build_schedule(pattern, problem, q_tile=tile)
    mask = sf.dense_mask(pattern, problem).numpy()
    g = s.geometry
    q_tok, k_tok = g.token_table("q"), g.token_table("k")
    for h in range(problem.heads):
        cls = visited_classes(s, s.head_group[h])
        covered = np.zeros_like(mask[h])
        for a in range(g.n_q_tiles):
            qv = q_tok[a][q_tok[a] >= 0]
            for b in range(g.n_k_tiles):
                kv = k_tok[b][k_tok[b] >= 0]
                sub = mask[h][np.ix_(qv, kv)]
                if cls[a, b] == EMPTY:
                    assert not sub.any(), (h, a, b)
                else:
                    covered[np.ix_(qv, kv)] = True
                if cls[a, b] == FULL:
                    assert sub.all() and (q_tok[a] >= 0).all() and (k_tok[b] >= 0).all(), (h, a, b)
        assert not (mask[h] & ~covered).any(), f"head {h}: an allowed pair is in no visited tile"


@pytest.mark.parametrize("pattern,grid,tile", CASES[:8], ids=[repr(c[0]) for c in CASES[:8]])
def test_inverse_is_the_transpose(pattern, grid, tile):
    s = build_schedule(pattern, sf.Problem(grid=grid, heads=1), q_tile=tile)
    fwd = visited_classes(s, 0)
    g = s.geometry
    inv = np.zeros((g.n_k_tiles, g.n_q_tiles), np.int8)
    ptr, idx, full = s.inverse.ptr[0], s.inverse.idx, s.inverse.full[0]
    for b in range(g.n_k_tiles):
        row = idx[ptr[b]:ptr[b + 1]]
        inv[b, row[:full[b]]] = FULL
        inv[b, row[full[b]:]] = PARTIAL
    np.testing.assert_array_equal(inv, fwd.T)


def test_tile_efficiency_is_exact_on_a_literal_case():
    # 1-D, 8 tokens, window of 3 (NATTEN), tiles of 4: allowed = 8 * 3 = 24 pairs.
    # Query tile 0 (0..3) sees keys 0..4 -> key tiles 0, 1; tile 1 (4..7) sees 3..7 -> 0, 1.
    s = build_schedule(sf.Neighborhood(3), sf.Problem(grid=8), q_tile=(4,))
    assert s.allowed_pairs == 24
    assert s.visited_tiles == 4
    assert s.tile_efficiency == pytest.approx(24 / (4 * 16))


def test_published_efficiency_figures():
    # Issue 3: on 128x128 kernel 31, 1-D 128-token tiles reach 0.24 and 8x16 tiles 0.57.
    s = build_schedule(sf.Neighborhood(31), sf.Problem(grid=(128, 128)), q_tile=(8, 16))
    assert s.tile_efficiency == pytest.approx(0.5748, abs=1e-3)
    assert s.one_d_efficiency() == pytest.approx(0.2422, abs=1e-3)


def test_dilation_costs_nothing():
    dilated = build_schedule(sf.Neighborhood(7, dilation=4), sf.Problem(grid=(56, 56)), q_tile=(8, 16))
    plain = build_schedule(sf.Neighborhood(7), sf.Problem(grid=(14, 14)), q_tile=(8, 16))
    assert dilated.geometry.fold == (4, 4)
    assert dilated.tile_efficiency == pytest.approx(plain.tile_efficiency)


def test_tile_aligned_strided_window_is_fully_efficient():
    s = build_schedule(sf.Neighborhood(16, stride=16), sf.Problem(grid=(64, 64)), q_tile=(16, 16))
    assert s.tile_efficiency == 1.0
    assert s.full_tiles == s.visited_tiles


@pytest.mark.parametrize("grid,expected", [((4096,), (128,)), ((56, 56), (8, 16)), ((30, 48, 80), (4, 4, 8))])
def test_default_tile_shapes(grid, expected):
    assert default_tile(sf.Problem(grid=grid)) == expected


def test_perhead_groups_share_schedules():
    mix = sf.PerHead([sf.Neighborhood(3)] * 2 + [sf.Blocks(2)] * 2)
    s = build_schedule(mix, sf.Problem(grid=(8, 8), heads=4))
    assert s.groups == 2 and list(s.head_group) == [0, 0, 1, 1]


MAXVIT = sf.PerHead([sf.Blocks(8)] * 2 + [sf.Grid(8)] * 2)


def test_perhead_groups_get_their_own_fold():
    # MaxViT: Blocks heads want no fold, Grid heads fold 8; one shared fold would cost 16x tiles
    problem = sf.Problem(grid=(64, 64), heads=4, head_dim=32, dtype=torch.bfloat16)
    s = build_schedule(MAXVIT, problem)
    assert s.group_folds == ((1, 1), (8, 8)) and list(s.head_group) == [0, 0, 1, 1]
    assert s.tile_efficiency == 1.0 and s.visited_tiles == 4 * 64 * 2
    shared = build_schedule(MAXVIT, problem, fold=(1, 1))
    assert shared.group_folds is None and shared.visited_tiles == 16640
    assert "per head group [(1, 1), (8, 8)]" in s.summary()
    assert s.fingerprint() != shared.fingerprint()


@pytest.mark.parametrize("heads,kv_heads,why", [
    (4, 2, None),                         # each kv head's query heads share a fold: per-group folds
    (4, 1, "one kv head for Blocks and Grid heads: its key tile is loaded once for both"),
])
def test_perhead_folds_respect_gqa(heads, kv_heads, why):
    problem = sf.Problem(grid=(64, 64), heads=heads, kv_heads=kv_heads, head_dim=32, dtype=torch.bfloat16)
    s = build_schedule(MAXVIT, problem)
    assert (s.group_folds is None) == (why is not None)


def test_perhead_folds_need_equal_tile_counts():
    # Grid(5) on 20x20 folds 5 (groups of 4 padded to 8 with 8x8 tiles): more tiles than
    # Blocks(4) unfolded, so the groups keep one shared fold
    problem = sf.Problem(grid=(20, 20), heads=2, head_dim=32, dtype=torch.float16)
    s = build_schedule(sf.PerHead([sf.Blocks(4), sf.Grid(5)]), problem, q_tile=(8, 8))
    folds = [build_schedule(p, problem, q_tile=(8, 8)).geometry for p in (sf.Blocks(4), sf.Grid(5))]
    assert (folds[0].n_q_tiles != folds[1].n_q_tiles) == (s.group_folds is None)


def test_content_patterns_are_refused():
    with pytest.raises(ValueError, match="run-time content"):
        build_schedule(sf.Routed(4, 2), sf.Problem(grid=(8, 8)))


def test_summary_names_the_numbers():
    text = build_schedule(sf.Neighborhood(7), sf.Problem(grid=(28, 28))).summary()
    assert "tile efficiency" in text and "visited tile pairs" in text
