"""``sparseforge bench --suite`` (sparseforge.bench) on CPU: the --cpu suite on tiny
problems through the CLI, its JSON, the not-runnable problems, option errors, the GPU mode
without CUDA, the plot, and the exact counting and torch peers the suite relies on."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from click.testing import CliRunner

import sparseforge as sf
from sparseforge.bench import cases, peers, suite
from sparseforge.cli.main import main
from sparseforge.lower.schedule import build_schedule

# Tiny stand-ins for the issue's problems (same families, seconds on 2 cores).
TINY = (
    suite.Case("T1", "T1", "tiny 2-D neighborhood", sf.Neighborhood(7), suite.Shape(1, 2, (14, 14), 32),
               (suite.FLEX, suite.NATTEN), sf.Neighborhood(3), suite.Shape(1, 2, (8, 8), 16)),
    suite.Case("T2", "T2", "tiny MaxViT block + grid", cases._maxvit(2), suite.Shape(1, 2, (16, 16), 16),
               (suite.MAXVIT, suite.FLEX), sf.PerHead([sf.Blocks(4), sf.Grid(4)]), suite.Shape(1, 2, (16, 16), 16)),
    # content-dependent (the harnesses of P7, P8, P9 on tiny inputs)
    suite.Case("T7", "T7", "tiny routed", sf.Routed((4, 4), 3), suite.Shape(2, 2, (16, 32), 16),
               (suite.GATHER, suite.FLEX), sf.Routed((4, 4), 3), suite.Shape(1, 2, (16, 16), 16)),
    suite.Case("T8", "T8", "tiny scattered voxels", sf.Scattered((12, 12)), suite.Shape(1, 2, None, 16),
               (suite.PADDED, suite.FLEX), sf.Scattered((12, 12)), suite.Shape(1, 2, None, 16),
               voxels=(600, 2), cpu_voxels=(300, 2)),
    suite.Case("T9", "T9", "tiny scattered linear", sf.Scattered((12, 12)), suite.Shape(1, 2, None, 16),
               (suite.SCATTER_LINEAR,), sf.Scattered((12, 12)), suite.Shape(1, 2, None, 16),
               voxels=(600, 2), cpu_voxels=(300, 2), attention="linear"),
    # content-dependent without a harness: reported as not runnable
    suite.Case("T10", "T10", "tiny grouped (no harness)", sf.Grouped(), suite.Shape(1, 2, (64,), 16), ()),
)


def _tiny_suite(monkeypatch):
    # patched where they are read: select() reads cases.*, make_flex() and run_suite() peers.*
    monkeypatch.setattr(cases, "CASES", TINY)
    monkeypatch.setattr(cases, "PROBLEM_IDS", tuple(dict.fromkeys(c.problem for c in TINY)))
    monkeypatch.setattr(peers, "FLEX_COMPILE", False)  # torch.compile on CPU takes ~30 s per shape


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    """One --cpu suite run (T1, T2, T7-T10): (click result, parsed stdout, --out path, --plot path)."""
    out_dir = tmp_path_factory.mktemp("suite")
    out, png = out_dir / "results.json", out_dir / "results.png"
    with pytest.MonkeyPatch.context() as mp:
        _tiny_suite(mp)
        result = CliRunner().invoke(main, ["bench", "--suite", "--cpu", "--only", "T1,T2,T7,T8,T9,T10", "--repeat", "2",
                                           "--json", "--out", str(out), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    return result, json.loads(result.stdout), out, png


def _numbers(obj, path=""):
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")


def test_cpu_suite_json_schema(suite_run):
    result, data, out, _ = suite_run
    assert json.loads(out.read_text()) == data            # --out writes what --json prints
    meta = data["meta"]
    assert meta["schema"] == suite.SCHEMA and meta["mode"] == "cpu"
    assert meta["device"].startswith("cpu: ")
    assert set(meta["versions"]) == {"sparseforge", "torch", "triton", "python"}
    assert meta["date"] and "bench --suite --cpu" in meta["command"] and meta["scaling_rule"]
    assert [c["id"] for c in data["cases"]] == ["T1", "T2", "T7", "T8", "T9", "T10"]
    for c in data["cases"][:2]:
        assert c["status"] == "ok", c
        eff = c["tile_efficiency"]
        assert eff["size"] == "full" and 0 < eff["ours"] <= 1 and 0 < eff["one_d_128"] <= 1
        assert eff["visited_tiles"] > 0 and eff["visited_tiles_1d_128"] > 0
        assert c["schedule_build"]["sparseforge_build_schedule_s"] > 0
        assert c["schedule_build"]["flex_create_block_mask_s"] > 0
        assert c["compile"]["cold_s"] > 0 and c["compile"]["warm_s"] > 0
        ops = c["op_time_cpu"]
        for method in ("sparseforge", "sdpa_masked"):
            for key in ("forward", "forward_backward"):
                t = ops[method][key]
                assert 0 < t["min_ms"] <= t["median_ms"] and t["runs"] == 2
        assert ops["flex_attention"]["forward"]["median_ms"] > 0
        assert "eager" in ops["flex_attention"]["variant"]
        assert "backward on CPU" in ops["flex_attention"]["forward_backward"]["skipped"]
        assert c["speedup_vs_best_peer"]["forward"]["speedup_x"] > 0
    assert data["cases"][1]["op_time_cpu"][suite.MAXVIT]["forward"]["median_ms"] > 0
    for path, value in _numbers(data):
        assert math.isfinite(value) and value >= 0, (path, value)
    # progress on stderr only, stdout is the JSON alone
    assert "T1: tile efficiency" in result.stderr and "tile efficiency" not in result.stdout.replace('"tile_efficiency"', "")


def test_content_dependent_problem_without_harness_is_not_runnable(suite_run):
    _, data, _, _ = suite_run
    c = data["cases"][5]
    assert c["status"] == "not runnable"
    assert c["reason"].startswith("not runnable: ") and "no harness" in c["reason"] and "Grouped" in c["reason"]
    assert not any(k in c for k in ("tile_efficiency", "op_time_cpu", "speedup_vs_best_peer"))


def _case(data, case_id):
    return next(c for c in data["cases"] if c["id"] == case_id)


def test_content_harnesses_run(suite_run):
    """T7 / T8 / T9 (tiny P7 / P8 / P9): every method runs and agrees with ours, exact
    counts, set-up times, timings and speedups."""
    _, data, _, _ = suite_run
    peers_of = {"T7": (suite.GATHER, suite.FLEX), "T8": (suite.PADDED, suite.FLEX), "T9": (suite.SCATTER_LINEAR,)}
    for case_id, peer_names in peers_of.items():
        c = _case(data, case_id)
        assert c["status"] == "ok", c
        ops = c["op_time_cpu"]
        ours = ("sparseforge",) if case_id == "T7" else ("sparseforge", "sparseforge_plan")
        assert set(ops) == set(ours + peer_names)
        for name in ours + peer_names:
            assert ops[name]["forward"]["median_ms"] > 0
            if name == suite.FLEX:
                assert "backward on CPU" in ops[name]["forward_backward"]["skipped"]
            else:
                assert ops[name]["forward_backward"]["median_ms"] > 0
        assert set(c["max_abs_diff_vs_sparseforge"]) == set(ours[1:] + peer_names)
        assert all(d < 1e-4 for d in c["max_abs_diff_vs_sparseforge"].values()), c["max_abs_diff_vs_sparseforge"]
        assert c["speedup_vs_best_peer"]["forward"]["best_peer"] in peer_names   # ours' variants are not peers
        assert c["setup"]["sparseforge_" + ("routes_and_tables_s" if case_id == "T7" else "plan_s")] > 0
        assert c["compile"]["cold_s"] > 0
    t7, t8, t9 = (_case(data, i) for i in ("T7", "T8", "T9"))
    # P7-style exact counts: N * topk * region tokens per head and batch element (regions divide the grid)
    assert t7["inputs"]["allowed_pairs"] == 1 * 2 * 256 * 3 * 16
    assert t7["tile_efficiency"]["size"] == "full" and t7["tile_efficiency"]["allowed_pairs"] == 2 * 2 * 512 * 3 * 16
    assert t7["tile_efficiency"]["ours"] == 1.0          # 4x4 regions are 16-token tiles: nothing padded
    assert 0 < t7["tile_efficiency"]["one_d_128"] <= 1
    assert t8["inputs"]["voxels"] == 300 and t8["voxels_full"]["voxels"] == 600
    assert 0 < t8["tile_efficiency"]["ours"] <= 1 and 0 < t8["tile_efficiency"]["padded_window_sdpa"] <= 1
    assert "not applicable" in t9["tile_efficiency_note"] and "tile_efficiency" not in t9
    assert t9["inputs"]["flop_forward_model"] == 4 * 300 * 2 * 16 * 16


def test_routed_counts_match_the_dense_mask():
    """The routed allowed pairs and 1-D 128x128 visited tiles equal brute-force counts from
    sf.dense_mask with the same routes; our visited tiles cover every allowed pair."""
    case = next(c for c in TINY if c.id == "T7")
    shape = suite.Shape(2, 2, (32, 32), 16)
    eff = suite.routed_tile_efficiency(case, shape, "full")
    problem = shape.problem(torch.bfloat16)
    q, k, _ = suite.random_qkv(shape, torch.float32, "cpu", False, 0)
    from sparseforge.lower.routed import routes_for

    routes = routes_for(case.pattern, problem, q, k)
    mask = sf.dense_mask(case.pattern, problem, routes=routes)            # [B, H|1, N, N]
    mask = mask.expand(2, 2, 1024, 1024)
    assert eff["allowed_pairs"] == int(mask.sum())
    blocks = mask.reshape(2, 2, 8, 128, 8, 128).any(-1).any(-2)
    assert eff["visited_tiles_1d_128"] == int(blocks.sum())
    assert eff["visited_tiles"] * 16 * 16 * eff["ours"] == pytest.approx(eff["allowed_pairs"])


def test_voxel_counts_match_the_dense_mask():
    case = next(c for c in TINY if c.id == "T8")
    coords = suite.voxel_coords(case, "full")
    problem = sf.Problem(heads=2, head_dim=16, dtype=torch.float64)
    order = peers.window_groups(coords, 12)["order"]
    mask = sf.dense_mask(case.pattern, problem, coords=coords[order])     # window-sorted voxels
    mask = mask.reshape(-1, mask.shape[-2], mask.shape[-1])[0]
    assert suite.voxel_allowed_pairs(coords, case.pattern, 2) == 2 * int(mask.sum())
    eff = suite.voxel_tile_efficiency(case, suite.Shape(1, 2, None, 16), coords, "full")
    n = mask.shape[0]
    nb = -(-n // 128)
    padded = torch.zeros(nb * 128, nb * 128, dtype=torch.bool)
    padded[:n, :n] = mask
    assert eff["visited_tiles_1d_128"] == 2 * int(padded.reshape(nb, 128, nb, 128).any(3).any(1).sum())
    assert eff["allowed_pairs"] == 2 * int(mask.sum())


def test_make_voxels_is_deterministic_and_clustered():
    coords = peers.make_voxels(4096, batch=2)
    assert torch.equal(coords, peers.make_voxels(4096, batch=2))
    assert coords.shape == (4096, 3) and len(torch.unique(coords, dim=0)) == 4096
    sizes = peers.window_groups(coords, 12)["sizes"]
    assert 45 < sizes.float().mean() < 55 and sizes.min() < 30 and sizes.max() > 100   # variable windows
    assert set(coords[:, 0].tolist()) == {0, 1}


def test_voxel_peers_match_the_references():
    g = torch.Generator().manual_seed(0)
    coords = peers.make_voxels(500, batch=2)
    pattern = sf.Scattered((12, 12))
    problem = sf.Problem(heads=2, head_dim=8, dtype=torch.float64)
    q, k, v = (torch.randn(500, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    groups = peers.window_groups(coords, 12)
    ref = sf.reference_attention(q, k, v, pattern, problem, coords=coords)
    torch.testing.assert_close(peers.padded_window_sdpa(q, k, v, groups), ref)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    with warnings.catch_warnings():   # eager flex_attention warns that it is unfused
        warnings.simplefilter("ignore")
        flex = peers.flex_document_attention(q, k, v, groups, flex_attention, create_block_mask, "cpu")
    torch.testing.assert_close(flex, ref)
    for fmap in ("relu", "elu+1"):
        lin = peers.scatter_linear_attention(q, k, v, groups, fmap, chunk=128)
        torch.testing.assert_close(lin, sf.reference_linear_attention(q, k, v, pattern, coords, feature_map=fmap))


def test_plot_written(suite_run, tmp_path):
    _, _, out, png = suite_run
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = tmp_path / "again.png"
    assert suite.main(["plot", str(out), str(again)]) == 0
    assert again.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_output(monkeypatch, sf):
    _tiny_suite(monkeypatch)
    result = sf("bench", "--suite", "--cpu", "--only", "T9,T10", "--repeat", "1")
    assert result.exit_code == 0, result.output
    assert "T10" in result.stdout and "not runnable:" in result.stdout
    assert "set-up sparseforge_plan" in result.stdout and "scatter_linear_torch" in result.stdout


def test_only_rejects_unknown_ids(sf, clean_error):
    line = clean_error(sf("bench", "--suite", "--cpu", "--only", "P1,P99"), "'--only'", "P99")
    assert "P11" in line  # lists the known ids


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_gpu_mode_without_cuda(sf, clean_error):
    clean_error(sf("bench", "--suite", "--only", "P4"), "no CUDA device: use --cpu")


def test_suite_option_errors(sf, clean_error):
    clean_error(sf("bench", "--suite", "--cpu", "Full()", "--seq", "8"), "'--suite'", "DIR|PATTERN", "--seq")
    clean_error(sf("bench", "Full()", "--seq", "8", "--cpu"), "'--cpu'", "--suite")
    clean_error(sf("bench"), "DIR|PATTERN")


def test_every_issue_problem_is_listed():
    assert suite.PROBLEM_IDS == tuple(f"P{i}" for i in range(1, 12))
    shapes = {c.id: (c.full.batch, c.full.heads, c.full.grid, c.full.head_dim) for c in suite.CASES}
    assert shapes["P1"] == (1, 16, (32768,), 128) and shapes["P6b"] == (1, 32, (131072,), 128)
    assert shapes["P5"] == (1, 24, (30, 48, 80), 128) and shapes["P11"] == (32, 4, (64, 64), 32)
    assert shapes["P7"] == (8, 8, (64, 64), 64) and shapes["P8"] == shapes["P9"] == (1, 4, None, 32)
    p7, p8, p9 = (next(c for c in suite.CASES if c.id == i) for i in ("P7", "P8", "P9"))
    assert p7.pattern == sf.Routed((8, 8), 8) and p7.cpu == suite.Shape(1, 2, (64, 64), 64)
    assert p8.voxels == p9.voxels == (131072, 4) and p8.cpu_voxels == (4096, 2) and p9.attention == "linear"
    assert all(suite.not_runnable_reason(c) is None for c in (p7, p8, p9))
    assert [c.id for c in suite.select("p1, P4")] == ["P1", "P1b", "P4", "P4b"]
    for c in suite.CASES:
        if c.pattern.is_static:
            sf.dense_mask(c.cpu_pattern, c.cpu.problem(torch.float32))  # the scaled pattern is valid


# one case per counting method (the others take seconds each, see sparseforge/bench/efficiency.py)
@pytest.mark.parametrize("case_id", ["P1b", "P2", "P3b", "P4", "P6b", "P10", "P11"])
def test_exact_counts_match_the_schedule(case_id):
    """The suite's cheap exact counts equal the schedule's tile-by-tile ones (scaled size)."""
    case = next(c for c in suite.CASES if c.id == case_id)
    problem = case.cpu.problem(torch.bfloat16)
    s = build_schedule(case.cpu_pattern, problem)
    allowed, _ = suite.exact_allowed_pairs(case.cpu_pattern, problem)
    assert allowed == s.allowed_pairs
    visited, _ = suite.one_d_visited_tiles(case.cpu_pattern, problem, s, allowed)
    assert allowed / (visited * 128 * 128) == pytest.approx(s.one_d_efficiency(128), rel=1e-12)


def _reference(q, k, v, pattern, problem):
    mask = sf.dense_mask(pattern, problem)[None]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_torch_peers_match_the_pattern():
    g = torch.Generator().manual_seed(0)
    problem = sf.Problem(grid=(16, 16), heads=2, head_dim=8, dtype=torch.float64)
    q, k, v = (torch.randn(2, 2, 256, 8, generator=g, dtype=torch.float64) for _ in range(3))
    halo = suite.halo_attention_unfold(q, k, v, (16, 16), 4, 2)
    torch.testing.assert_close(halo, _reference(q, k, v, sf.Halo(4, 2), problem))
    maxvit = suite.maxvit_reshape_sdpa(q, k, v, (16, 16), 4)
    torch.testing.assert_close(maxvit, _reference(q, k, v, sf.PerHead([sf.Blocks(4), sf.Grid(4)]), problem))
