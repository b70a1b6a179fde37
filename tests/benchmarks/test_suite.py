"""``sparseforge bench --suite`` (benchmarks/suite.py) on CPU: the --cpu suite on tiny
problems through the CLI, its JSON, the not-runnable problems, option errors, the GPU mode
without CUDA, the plot, and the exact counting and torch peers the suite relies on."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

import sparseforge as sf
from sparseforge.cli import main
from sparseforge.cli_build import load_suite
from sparseforge.codegen.schedule import build_schedule

suite = load_suite()

# Tiny stand-ins for the issue's problems (same families, seconds on 2 cores).
TINY = (
    suite.Case("T1", "T1", "tiny 2-D neighborhood", sf.Neighborhood(7), suite.Shape(1, 2, (14, 14), 32),
               (suite.FLEX, suite.NATTEN), sf.Neighborhood(3), suite.Shape(1, 2, (8, 8), 16)),
    suite.Case("T2", "T2", "tiny MaxViT block + grid", suite._maxvit(2), suite.Shape(1, 2, (16, 16), 16),
               (suite.MAXVIT, suite.FLEX), sf.PerHead([sf.Blocks(4), sf.Grid(4)]), suite.Shape(1, 2, (16, 16), 16)),
)


def _tiny_suite(monkeypatch):
    cases = TINY + tuple(c for c in suite.CASES if c.problem in ("P7", "P8"))
    monkeypatch.setattr(suite, "CASES", cases)
    monkeypatch.setattr(suite, "PROBLEM_IDS", tuple(dict.fromkeys(c.problem for c in cases)))
    monkeypatch.setattr(suite, "FLEX_COMPILE", False)  # torch.compile on CPU takes ~30 s per shape


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    """One --cpu suite run (T1, T2, P7, P8): (click result, parsed stdout, --out path, --plot path)."""
    out_dir = tmp_path_factory.mktemp("suite")
    out, png = out_dir / "results.json", out_dir / "results.png"
    with pytest.MonkeyPatch.context() as mp:
        _tiny_suite(mp)
        result = CliRunner().invoke(main, ["bench", "--suite", "--cpu", "--only", "T1,T2,P7,P8", "--repeat", "2",
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
    assert [c["id"] for c in data["cases"]] == ["T1", "T2", "P7", "P8"]
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


def test_content_dependent_problems_are_not_runnable(suite_run):
    _, data, _, _ = suite_run
    for c in data["cases"][2:]:
        assert c["status"] == "not runnable"
        assert c["reason"].startswith("not runnable: ") and len(c["reason"]) > 30
        assert not any(k in c for k in ("tile_efficiency", "op_time_cpu", "speedup_vs_best_peer"))
    assert "Scattered" in data["cases"][3]["reason"]


def test_plot_written(suite_run, tmp_path):
    _, _, out, png = suite_run
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = tmp_path / "again.png"
    assert suite.main(["plot", str(out), str(again)]) == 0
    assert again.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_output(monkeypatch, sf):
    _tiny_suite(monkeypatch)
    result = sf("bench", "--suite", "--cpu", "--only", "P7,P8")
    assert result.exit_code == 0, result.output
    assert "P7" in result.stdout and "not runnable:" in result.stdout


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
    assert [c.id for c in suite.select("p1, P4")] == ["P1", "P1b", "P4", "P4b"]
    for c in suite.CASES:
        if c.pattern.is_static:
            sf.dense_mask(c.cpu_pattern, c.cpu.problem(torch.float32))  # the scaled pattern is valid


# one case per counting method (the others take seconds each, see benchmarks/suite.py)
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
