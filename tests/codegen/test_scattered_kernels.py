"""Scattered voxel windows' lowering (window grouping and per-plan tables on the packed
sequence) and its kernels' ahead-of-time compile for sm_80/sm_90: tensor cores, no spills
with the default config."""
import pytest
import torch

import sparseforge as sf
from sparseforge.backends.triton import TritonKernels
from sparseforge.lower.segments import build_scattered_schedule, pack, plan, sort_into_windows, unpack, window_ids

from ._aot import assert_tensor_cores_without_spills, compile_reports, instance_ids


def _coords(n, extent, batch, ndim, gen):
    return torch.cat([torch.randint(0, batch, (n, 1), generator=gen),
                      torch.randint(0, extent, (n, ndim), generator=gen)], 1)


def _pairs(ptr, idx, full, rows):
    """{(row, col, is_full)} of a one-group CSR, checking FULL entries come first."""
    out = set()
    for r in range(rows):
        a, b, f = int(ptr[0, r]), int(ptr[0, r + 1]), int(full[0, r])
        assert a <= b and f <= b - a
        for j in range(a, b):
            out.add((r, int(idx[j]), j < a + f))
    return out


@pytest.mark.parametrize("n, extent, batch, window, shift, tiles", [
    (300, 20, 3, (4, 4), (2, 0), ((32,), (16,))),
    (200, 3, 2, (8, 8, 8), (0, 0, 0), ((16,), (32,))),     # few, large windows: FULL tiles
    (90, 40, 1, (2,), (1,), ((16,), (16,))),               # mostly single-voxel windows
    (1, 5, 1, (2, 2), (0, 0), ((16,), (16,))),             # one voxel
], ids=["shifted_2d", "large_windows_3d", "tiny_windows_1d", "one_voxel"])
def test_grouping_and_tables_match_brute_force(n, extent, batch, window, shift, tiles):
    gen = torch.Generator().manual_seed(n)
    pattern = sf.Scattered(window, shift=shift)
    problem = sf.Problem(heads=2, head_dim=16, dtype=torch.float32)
    s = build_scattered_schedule(pattern, problem, q_tile=tiles[0], k_tile=tiles[1])
    coords = _coords(n, extent, batch, len(window), gen)
    p = plan(s, coords)
    bm, bn = s.geometry.block_m, s.geometry.block_n
    order = p.order.tolist()
    assert sorted(order) == list(range(n))
    w = pattern.window_ids(coords)[p.order]           # the reference window ids, packed order
    assert torch.equal(w, window_ids(pattern, coords)[p.order])
    keys = [tuple(r) for r in w.tolist()]
    assert keys == sorted(keys)                       # grouped by window
    for a in range(n - 1):                            # stable: voxel order kept inside a window
        if keys[a] == keys[a + 1]:
            assert order[a] < order[a + 1]
    seg = p.seg.tolist()
    assert p.n_pad % bm == 0 and p.n_pad % bn == 0 and p.n_pad >= n and all(x == -1 for x in seg[n:])
    assert p.n_windows == len(set(keys))
    for a in range(n - 1):
        assert (seg[a] == seg[a + 1]) == (keys[a] == keys[a + 1])
    # brute force: tile pairs sharing a window, FULL when both tiles lie inside one window
    nq, nk = p.n_pad // bm, p.n_pad // bn
    want = set()
    for i in range(nq):
        qs = seg[i * bm:(i + 1) * bm]
        for j in range(nk):
            ks = seg[j * bn:(j + 1) * bn]
            if set(x for x in qs if x >= 0) & set(x for x in ks if x >= 0):
                full = len(set(qs)) == 1 and set(qs) == set(ks) and qs[0] >= 0
                want.add((i, j, full))
    t = p.tables
    assert _pairs(t["KV_PTR"], t["KV_IDX"], t["KV_FULL"], nq) == want
    assert _pairs(t["Q_PTR"], t["Q_IDX"], t["Q_FULL"], nk) == {(j, i, f) for i, j, f in want}


def test_one_giant_window_is_all_full_tiles():
    pattern, problem = sf.Scattered(1000), sf.Problem(heads=1, head_dim=16, dtype=torch.float32)
    s = build_scattered_schedule(pattern, problem, q_tile=(16,), k_tile=(16,))
    p = plan(s, _coords(64, 50, 1, 2, torch.Generator().manual_seed(0)))
    t = p.tables
    assert p.n_windows == 1 and int(t["KV_PTR"][0, -1]) == 16 and int(t["KV_FULL"].sum()) == 16


def test_pack_unpack_round_trip():
    x = torch.randn(37, 3, 5)
    order = torch.randperm(37)
    packed = pack(x, order, 48)
    assert packed.shape == (1, 3, 48, 5) and torch.equal(packed[0, :, 0], x[order[0]])
    assert torch.equal(unpack(packed, order, 37), x)


def test_grouping_runs_on_meta_tensors():
    """Grouping is torch ops on the coordinates' device, no Python loop over voxels or
    windows and no host reads: it runs on meta tensors (the tables then read one size)."""
    coords = torch.empty(100, 3, dtype=torch.long, device="meta")
    order, seg, start, end = sort_into_windows(sf.Scattered((4, 4), shift=(2, 1)), coords)
    assert all(t.device.type == "meta" and t.shape == (100,) for t in (order, seg, start, end))


def test_generated_source_has_the_segment_predicate():
    pattern = sf.Scattered((4, 4))
    problem = sf.Problem(heads=2, head_dim=32)
    k = TritonKernels(build_scattered_schedule(pattern, problem))
    for kind in ("fwd", "bwd_dq", "bwd_dkdv"):
        src = k.source(kind)
        assert "SEG, n_tokens" in src and "q_seg[:, None] == k_seg[None, :]" in src or \
            "k_seg[:, None] == q_seg[None, :]" in src
        assert "* N_TOKENS" not in src
    assert "n_tokens" in k.signature("fwd") and k.signature("bwd_dkdv")["SEG"] == "*i32"


def test_causal_segments_add_the_position_compare():
    problem = sf.Problem(heads=2, head_dim=32)
    plain = TritonKernels(build_scattered_schedule(sf.Scattered(1), problem))
    causal = TritonKernels(build_scattered_schedule(sf.Scattered(1), problem, causal=True))
    assert causal.schedule.name != plain.schedule.name
    for kind, compare in (("fwd", "(k_tok[None, :] <= q_tok[:, None])"), ("bwd_dkdv", "(k_tok[:, None] <= q_tok[None, :])")):
        assert compare in causal.source(kind) and compare not in plain.source(kind)


def schedule_of(pattern, problem):
    """Scattered patterns as they are; ``Grouped`` as the runtime lowers it (window 1, causal)."""
    if isinstance(pattern, sf.Grouped):
        return build_scattered_schedule(sf.Scattered(1), problem, causal=pattern.causal)
    return build_scattered_schedule(pattern, problem)


INSTANCES = [
    (sf.Scattered((12, 12, 1), shift=(6, 6, 0)), sf.Problem(heads=4, head_dim=32, dtype=torch.float16)),
    (sf.Scattered((8, 8)), sf.Problem(heads=8, head_dim=64, dtype=torch.bfloat16)),
    (sf.Scattered((8, 8)), sf.Problem(heads=8, head_dim=128, dtype=torch.float16, kv_heads=2)),
    (sf.Grouped(causal=True), sf.Problem(heads=8, head_dim=64, dtype=torch.bfloat16)),
]


@pytest.fixture(scope="module")
def reports():
    return compile_reports(INSTANCES, schedule_of)


@pytest.mark.parametrize("index", range(len(INSTANCES)), ids=instance_ids(INSTANCES))
def test_scattered_kernels_use_tensor_cores_without_spills(reports, index):
    assert_tensor_cores_without_spills(reports, index)
    assert reports[(index, "fwd", "sm_90")].tensor_core == "wgmma"
