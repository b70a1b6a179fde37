"""``sparseforge show``: statistics, text and PNG pictures, JSON, and every bad-input error."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

import sparseforge as sf_pkg
from sparseforge import viz
from sparseforge.cli.main import display_repr

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "patterns.py"

# Small problems for every example in examples/patterns.py (each is meant for a larger grid).
EXAMPLE_ARGS = {
    "neighborhood_2d": ["--grid", "16x16"],
    "neighborhood_1d": ["--seq", "160"],
    "neighborhood_3d": ["--grid", "4x8x8"],
    "sliding_window": ["--seq", "48"],
    "causal_llm": ["--seq", "64"],
    "halo": ["--grid", "16x16"],
    "blocks": ["--grid", "14x14"],
    "grid": ["--grid", "14x14"],
    "maxvit_heads": ["--grid", "28x28", "--heads", "8"],
    "strided_shards": ["--seq", "256", "--heads", "8"],
    "documents": ["--seq", "4096"],
    "global_tokens": ["--seq", "48"],
    "routed": ["--grid", "24x24"],
    "scattered": ["--grid", "24x24"],
}

TINY = ["show", "Neighborhood(3)", "--grid", "5x5", "--query", "0,0"]


def picture_after(output: str, heading: str, rows: int) -> list[str]:
    """The ``rows`` lines drawn after the line starting with ``heading``."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    return lines[start + 1:start + 1 + rows]


def load_examples():
    spec = importlib.util.spec_from_file_location("_examples_under_test", EXAMPLES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_has_small_args():
    module = load_examples()
    names = {k for k, v in vars(module).items() if isinstance(v, sf_pkg.Pattern)}
    assert names == set(EXAMPLE_ARGS)


@pytest.mark.parametrize("name", sorted(EXAMPLE_ARGS))
def test_show_every_example(sf, name):
    result = sf("show", f"{EXAMPLES}:{name}", *EXAMPLE_ARGS[name])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert "keys/query min" in result.stdout
    assert "keys seen by query" in result.stdout


def test_show_example_relative_path_from_repo_root(sf, monkeypatch):
    monkeypatch.chdir(REPO)
    result = sf("show", "examples/patterns.py:maxvit_heads", "--grid", "28x28", "--heads", "8")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "PerHead([Neighborhood(7, dilation=2)] * 4 + [Blocks(7)] * 2 + [Grid(7)] * 2)" in out
    # one picture per distinct head group, labelled with that group's pattern
    assert "(heads 0-3: Neighborhood(7, dilation=2)): 49 keys" in out
    assert "(heads 4-5: Blocks(7)): 49 keys" in out
    assert "(heads 6-7: Grid(7)): 49 keys" in out
    assert out.count("keys seen by query (14, 14)") == 3


def test_heads_with_equal_patterns_are_drawn_once(sf):
    result = sf("show", "PerHead([Neighborhood(3), Full(), Neighborhood(3)])", "--grid", "5x5")
    assert result.exit_code == 0, result.output
    assert "keys seen by query (2, 2) (heads 0, 2: Neighborhood(3)): 9 keys" in result.stdout
    assert "keys seen by query (2, 2) (head 1: Full()): 25 keys" in result.stdout
    assert result.stdout.count("keys seen by query") == 2


def test_perhead_heads_default_to_its_length(sf):
    result = sf("show", "--json", f"{EXAMPLES}:maxvit_heads", "--grid", "28x28")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["heads"]) == 8


def test_tiny_neighborhood_marks_the_corner_block(sf):
    result = sf(*TINY)
    assert result.exit_code == 0, result.output
    assert picture_after(result.stdout, "keys seen by query (0, 0) (head 0): 9 keys", 5) == [
        "@ # # . .",
        "# # # . .",
        "# # # . .",
        ". . . . .",
        ". . . . .",
    ]
    mask = picture_after(result.stdout, "mask (head 0)", 25)
    assert mask[0] == "> " + " ".join("###..###..###............")
    assert all(line.startswith("  ") for line in mask[1:])
    assert "│    0 │    0.36 │              9 │ 9.00 │   9 │          0 │" in result.stdout


def test_query_not_seeing_itself_is_drawn_as_O(sf):
    result = sf("show", "Sink(2)", "--seq", "4", "--query", "2")
    assert result.exit_code == 0, result.output
    assert picture_after(result.stdout, "keys seen by query 2", 1) == ["# # O ."]


def test_1d_strip_is_cropped_around_the_query(sf):
    result = sf("show", "SlidingWindow(5, 5) | Sink(2)", "--seq", "1000", "--query", "500")
    assert result.exit_code == 0, result.output
    heading = next(line for line in result.stdout.splitlines() if line.startswith("keys seen by query 500"))
    assert "cropped to columns 440-559" in heading and "2 more keys outside this view" in heading
    (strip,) = picture_after(result.stdout, "keys seen by query 500", 1)
    assert len(strip) == 120 and strip[60] == "@" and strip.count("#") == 10
    assert "mask (" not in result.stdout     # N > 64: no N x N text mask


def test_3d_draws_the_slice_through_the_query(sf):
    result = sf("show", "Neighborhood((3, 3, 3))", "--grid", "4x5x5", "--query", "0,2,2")
    assert result.exit_code == 0, result.output
    heading = next(line for line in result.stdout.splitlines() if line.startswith("keys seen by query (0, 2, 2)"))
    assert "27 keys" in heading and "slice dim 0 = 0 of 4" in heading and "18 more keys" in heading
    assert picture_after(result.stdout, "keys seen by query (0, 2, 2)", 5) == [
        ". . . . .", ". # # # .", ". # @ # .", ". # # # .", ". . . . ."]


def test_default_query_is_the_grid_centre(sf):
    result = sf("show", "Blocks(2)", "--grid", "4x6")
    assert result.exit_code == 0, result.output
    assert picture_after(result.stdout, "keys seen by query (2, 3)", 4) == [
        ". . . . . .", ". . . . . .", ". . # @ . .", ". . # # . ."]


def test_json_is_the_only_stdout(sf):
    result = sf("show", "--json", "Neighborhood(3)", "--grid", "5x5")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["tokens"] == 25 and data["density"] == pytest.approx(0.36) and data["empty_rows"] == 0
    assert data["pattern"] == "Neighborhood(3)"
    assert [h["keys_min"] for h in data["heads"]] == [9]
    assert result.stderr == ""


def test_json_for_perhead_mix_gives_every_head(sf):
    result = sf("show", "--json", "PerHead([Neighborhood(3)] * 2 + [Causal()])", "--grid", "4x4", "--heads", "3")
    assert result.exit_code == 0, result.output
    heads = json.loads(result.stdout)["heads"]
    assert [h["head"] for h in heads] == [0, 1, 2]
    assert heads[2]["keys_min"] == 1 and heads[2]["keys_max"] == 16


def test_png_tiny(sf, tmp_path):
    out = tmp_path / "na.png"
    result = sf(*TINY, "--png", str(out))
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == viz.png_size(1, 1, ndim=2) == (320, 750)    # one mask panel, one grid panel
        assert image.getextrema()[0][0] < image.getextrema()[0][1]       # not a blank image
    assert not list(tmp_path.glob(".*.tmp"))                            # no temporary file left behind


def test_png_one_panel_per_distinct_head_and_json(sf, tmp_path):
    out = tmp_path / "mix.png"
    result = sf("show", "--json", f"{EXAMPLES}:maxvit_heads", "--grid", "28x28", "--png", str(out))
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)                                           # still only JSON on stdout
    with Image.open(out) as image:
        assert image.size == viz.png_size(3, 3, ndim=2) == (960, 750)   # 3 distinct heads, N=784 <= 1024
    assert 0 < out.stat().st_size < 100_000


def test_png_1d_strips_without_mask_for_large_n(sf, tmp_path):
    out = tmp_path / "s2.png"
    result = sf("show", "StridedShards(16, 2, 4)", "--seq", "2048", "--heads", "2", "--png", str(out))
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.size == viz.png_size(0, 2, ndim=1)


def test_png_without_matplotlib_is_a_clean_error(sf, clean_error, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)      # makes the import fail
    out = tmp_path / "x.png"
    result = sf(*TINY, "--png", str(out))
    clean_error(result, "matplotlib", "sparseforge[pictures]")
    assert not out.exists()


def test_routed_routes_on_seeded_random_qk(sf):
    args = ("show", "Routed(4, 2)", "--grid", "8x8", "--heads", "2")
    first, second = sf(*args), sf(*args)
    assert first.exit_code == 0, first.output
    assert "routing on random q and k (seed 0" in first.stdout
    assert first.stdout == second.stdout                               # fixed seed: same picture
    assert "32 keys" in first.stdout                                   # 2 routed regions of 4x4


def test_scattered_uses_grid_cells_as_voxels(sf):
    result = sf("show", "Scattered(4, shift=2)", "--grid", "8x8", "--query", "0,0")
    assert result.exit_code == 0, result.output
    assert "every cell of the 8x8 grid is a voxel of batch 0" in result.stdout
    assert picture_after(result.stdout, "keys seen by query (0, 0)", 3) == [
        "@ # . . . . . .", "# # . . . . . .", ". . . . . . . ."]


def test_display_repr_round_trips():
    mix = load_examples().maxvit_heads
    assert sf_pkg.parse_pattern(display_repr(mix)) == mix


def test_debug_shows_the_exception(sf):
    result = sf("--debug", "show", "Neighbourhood(7)", "--grid", "5x5")
    assert result.exit_code != 0
    assert isinstance(result.exception, ValueError)                   # raised, not turned into one line


BAD_INPUT = [
    (["Full()", "--grid", "56y56"], ["'--grid'", "'56y56'"]),
    (["Full()", "--grid", "2x2x2x2"], ["'--grid'", "1, 2 or 3 dimensions"]),
    (["Full()", "--grid", "0x5"], ["'--grid'", "grid[0]"]),
    (["Full()", "--grid", "-4x5"], ["'--grid'", "negative"]),
    (["Full()"], ["'--grid'", "--seq"]),
    (["Full()", "--grid", "4", "--seq", "4"], ["'--seq'", "not both"]),
    (["Full()", "--seq", "many"], ["'--seq'", "'many'"]),
    (["Full()", "--seq", "4", "--heads", "0"], ["'--heads'", ">= 1"]),
    (["Full()", "--seq", "4", "--heads", "x"], ["'--heads'", "not an integer"]),
    (["Neighbourhood(7)", "--grid", "9x9"], ["'PATTERN'", "unknown pattern 'Neighbourhood'"]),
    (["Neighborhood(7) | foo", "--grid", "9x9"], ["'PATTERN'", "unknown name 'foo'"]),
    (["__import__('os')", "--grid", "9x9"], ["'PATTERN'", "unknown pattern '__import__'"]),
    (["__import__('os').system('echo hi')", "--grid", "9x9"],
     ["'PATTERN'", "only sparseforge pattern constructors may be called"]),
    (["Neighborhood(7", "--grid", "9x9"], ["'PATTERN'", "not valid syntax"]),
    (["Neighborhood(0)", "--grid", "9x9"], ["'PATTERN'", "kernel_size must be >= 1"]),
    (["Neighborhood('7')", "--grid", "9x9"], ["'PATTERN'", "'7'"]),
    (["Neighborhood(7)", "--grid", "5x5"], ["'PATTERN' with --grid 5x5", "kernel_size=7 is larger than the grid"]),
    (["Neighborhood((3, 3))", "--seq", "9"], ["'PATTERN' with --grid 9", "kernel_size=(3, 3)"]),
    (["Grid(7)", "--grid", "16x16"], ["'PATTERN'", "must divide the grid extent 16"]),
    (["PerHead([Full(), Causal()])", "--seq", "8", "--heads", "3"],
     ["'PATTERN' with --grid 8 --heads 3", "PerHead has 2 patterns", "heads=3"]),
    (["Scattered(4)"], ["'--grid'", "Scattered(4)"]),
    (["Scattered((4, 4, 4))", "--grid", "8x8"], ["'PATTERN' with --grid 8x8", "window_size=(4, 4, 4)"]),
    (["Documents([3, 4])", "--seq", "8"], ["'PATTERN' with --grid 8", "add up to 7"]),
    (["nope/missing.py:pattern", "--seq", "8"], ["'PATTERN'", "'nope/missing.py' does not exist"]),
    ([f"{EXAMPLES}:nope", "--seq", "8"], ["'PATTERN'", "no pattern named 'nope'", "neighborhood_2d"]),
    (["Full()", "--grid", "5x5", "--query", "5,0"], ["'--query'", "outside the grid (5, 5)"]),
    (["Full()", "--grid", "5x5", "--query", "2"], ["'--query'", "1 coordinate", "has 2"]),
    (["Full()", "--grid", "5x5", "--query", "a,b"], ["'--query'", "'a,b'"]),
    (["Full()", "--grid", "5x5", "--png", "no/such/dir/x.png"], ["'--png'", "does not exist"]),
]


@pytest.mark.parametrize("args,needles", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_clean_line(sf, clean_error, args, needles):
    clean_error(sf("show", *args), *needles)


def test_pattern_file_that_fails_to_import(sf, clean_error, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    clean_error(sf("show", f"{bad}:x", "--seq", "8"), "'PATTERN'", "RuntimeError: boom")


def test_pattern_file_name_that_is_not_a_pattern(sf, clean_error, tmp_path):
    path = tmp_path / "pats.py"
    path.write_text("window = 7\n")
    clean_error(sf("show", f"{path}:window", "--seq", "8"), "'PATTERN'", "int, not a sparseforge pattern")


def test_png_path_is_a_directory(sf, clean_error, tmp_path):
    clean_error(sf("show", "Full()", "--seq", "4", "--png", str(tmp_path)), "'--png'", "is a directory")
