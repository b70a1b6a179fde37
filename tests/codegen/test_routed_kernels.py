"""Routed attention's lowering (region-aligned tiles, per-call tables) and its kernels'
ahead-of-time compile for sm_80/sm_90: tensor cores, no spills with the default config."""
import math

import numpy as np
import pytest
import torch

import sparseforge as sf
from sparseforge.codegen.config import default_config
from sparseforge.lower.routed import build_routed_schedule, region_pad, region_tile, routed_tables
from sparseforge.lower.tiling import DimTiling

from ._aot import assert_tensor_cores_without_spills, compile_reports, instance_ids


def test_region_padding_coordinates():
    # regions of 3 padded to 4 over a grid of 7: x = (p // 4) * 3 + p % 4, valid iff p % 4 < 3 and x < 7
    d = DimTiling(7, 1, 2, 2, region=3, region_pad=4)
    assert d.regions == 3 and d.extent == 12
    x, valid = d.coords()
    assert list(np.where(valid, x, -1)) == [0, 1, 2, -1, 3, 4, 5, -1, 6, -1, -1, -1]


def test_region_pad_and_tiles():
    assert region_pad((8, 8)) == (8, 8)
    assert region_pad((3, 5)) == (4, 8)
    assert region_pad((2, 2)) == (4, 4)      # at least 16 positions: tl.dot's minimum
    assert region_pad((7,)) == (16,)
    assert region_tile((8, 8), 64) == (8, 8)
    assert region_tile((8, 8), 32) == (4, 8)
    assert region_tile((16, 16), 128) == (8, 16)


@pytest.mark.parametrize("pattern, grid", [
    (sf.Routed((3, 5), 2), (7, 13)),
    (sf.Routed((4, 4), 3, per_head=True), (10, 9)),
    (sf.Routed(20, 2), (50,)),
], ids=["non_pow2", "ragged_per_head", "one_d_split"])
def test_tiles_cover_every_token_once_and_never_straddle_regions(pattern, grid):
    problem = sf.Problem(grid=grid, heads=2, head_dim=16)
    s = build_routed_schedule(pattern, problem)
    ids, _ = pattern.regions(grid)
    for side in ("q", "k"):
        table = s.geometry.token_table(side)
        tokens = table[table >= 0]
        assert sorted(tokens.tolist()) == list(range(problem.tokens))
        for row in table:
            real = row[row >= 0]
            assert len(set(ids[real].tolist())) <= 1


def _pairs(ptr, idx, full, rows):
    """{(group, row, col, is_full)} of a CSR, checking FULL entries come first."""
    out = set()
    for g in range(ptr.shape[0]):
        for r in range(rows):
            a, b, f = int(ptr[g, r]), int(ptr[g, r + 1]), int(full[g, r])
            assert a <= b and f <= b - a
            for j in range(a, b):
                out.add((g, r, int(idx[j]), j < a + f))
    return out


def test_tables_visit_exactly_the_routed_tokens():
    """Per-call tables against the dense mask: forward and inverse CSR list the same pairs,
    FULL tiles hold no padding, and the visited keys of every query are its routed tokens
    (duplicate routes visited once)."""
    pattern = sf.Routed((3, 5), 2, per_head=True)
    problem = sf.Problem(grid=(7, 13), heads=2, head_dim=16)
    s = build_routed_schedule(pattern, problem)
    g = torch.Generator().manual_seed(0)
    _, n_regions = pattern.regions(problem.grid)
    routes = torch.randint(0, n_regions, (2, 2, n_regions, 2), generator=g)
    routes[0, 0, 0] = torch.tensor([1, 1])  # a duplicate
    t = routed_tables(s, routes)
    geom = s.geometry
    kt = {k: v.numpy() for k, v in t.kernels.items()}
    fwd = _pairs(kt["KV_PTR"], kt["KV_IDX"], kt["KV_FULL"], geom.n_q_tiles)
    inv = _pairs(kt["Q_PTR"], kt["Q_IDX"], kt["Q_FULL"], geom.n_k_tiles)
    assert fwd == {(g_, q, k, f) for g_, k, q, f in inv}
    assert t.kernels["HEAD_GROUP"].tolist() == [[0, 1], [2, 3]]
    q_tab, k_tab = geom.token_table("q"), geom.token_table("k")
    mask = sf.dense_mask(pattern, problem, routes=routes)  # [B, H, N, N]
    seen = np.zeros(mask.shape, dtype=np.int64)
    for g_, q, k, f in fwd:
        b, h = divmod(g_, 2)
        assert not f or ((q_tab[q] >= 0).all() and (k_tab[k] >= 0).all())
        qs, ks = q_tab[q][q_tab[q] >= 0], k_tab[k][k_tab[k] >= 0]
        seen[b, h][np.ix_(qs, ks)] += 1
    assert seen.max() == 1  # no key visited twice by a query (duplicate routes dropped)
    assert np.array_equal(seen == 1, mask.numpy())


def test_tables_are_built_with_device_ops_only():
    """routed_tables runs on meta tensors: torch ops only, nothing reads values on the host."""
    pattern = sf.Routed((4, 4), 2)
    problem = sf.Problem(grid=(8, 8), heads=2, head_dim=16)
    s = build_routed_schedule(pattern, problem)
    t = routed_tables(s, torch.empty(3, 1, 4, 2, dtype=torch.long, device="meta"))
    assert t.kernels["KV_PTR"].shape == (3, s.geometry.n_q_tiles + 1)
    assert t.kernels["KV_IDX"].device.type == "meta"


# -- ahead-of-time compile ----------------------------------------------------------------------
INSTANCES = [
    (sf.Routed((8, 8), 4), sf.Problem(grid=(64, 64), heads=8, head_dim=32, dtype=torch.bfloat16)),
    (sf.Routed((7, 7), 4, per_head=True), sf.Problem(grid=(56, 56), heads=4, kv_heads=2, head_dim=64,
                                                     dtype=torch.float16)),
]


@pytest.fixture(scope="module")
def reports():
    return compile_reports(INSTANCES, build_routed_schedule)


@pytest.mark.parametrize("index", range(len(INSTANCES)), ids=instance_ids(INSTANCES))
def test_routed_kernels_use_tensor_cores_without_spills(reports, index):
    pattern, problem = INSTANCES[index]
    q_rows = math.prod(default_config(problem, pattern).q_tile)
    assert q_rows >= 64
    assert_tensor_cores_without_spills(reports, index)
    assert reports[(index, "fwd", "sm_90")].tensor_core == "wgmma"
