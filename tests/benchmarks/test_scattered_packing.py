"""sparseforge.bench.scattered_packing: its count of visited tiles is the one the kernels' real
tables give (at align 1, today's packing), and aligned packing starts every window on its
boundary without losing or overlapping rows."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sparseforge as sf
from sparseforge.bench import peers
from sparseforge.bench import scattered_packing as packing
from sparseforge.lower.segments import build_scattered_schedule, plan, sort_into_windows


@pytest.mark.parametrize("tiles", [(64, 32), (32, 32), (16, 16), (32, 64)])
@pytest.mark.parametrize("seed", [0, 1])
def test_visited_tiles_match_the_plan_tables(tiles, seed):
    pattern = sf.Scattered((12, 12))
    coords = peers.make_voxels(3000, batch=2, seed=seed)
    schedule = build_scattered_schedule(pattern, sf.Problem(heads=2, head_dim=32, dtype=torch.float16),
                                        q_tile=(tiles[0],), k_tile=(tiles[1],))
    kv_ptr = plan(schedule, coords).tables["KV_PTR"]
    sizes = np.bincount(sort_into_windows(pattern, coords)[1].numpy())
    visited, rows = packing.visited_tiles(sizes, *tiles, align=1)
    assert visited == int(kv_ptr[0, -1]) and rows == len(coords)


@pytest.mark.parametrize("align", [1, 16, 32])
def test_aligned_packing(align):
    sizes = np.array([1, 16, 17, 50, 144, 3])
    start, end, rows = packing.packed_windows(sizes, align)
    assert (start % align == 0).all() and (end - start == sizes).all()
    assert (start[1:] >= end[:-1]).all() and rows >= end[-1] and rows % align == 0
    # one window of exactly one tile, aligned: one visited pair, efficiency 1
    assert packing.visited_tiles(np.array([32]), 32, 32, align) == (1, 32)


def test_cli_writes_json(tmp_path):
    out = tmp_path / "p.json"
    assert packing.main(["--voxels", "2000", "--batch", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    base = next(r for r in result["results"] if (r["q_tile"], r["k_tile"], r["align"]) == (64, 32, 1))
    assert 0 < base["tile_efficiency"] <= 1 and base["extra_rows"] == 0
    assert result["meta"]["voxels"] == len(peers.make_voxels(2000, batch=1, seed=0))
