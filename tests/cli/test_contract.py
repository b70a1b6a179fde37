"""The CLI's contract (issue 16): every error is one line on stderr naming the option, argument
or variable and the value, exit status 2 for bad input, no traceback; warnings are one line;
sizes that would not fit in memory are refused up front."""
from __future__ import annotations

from pathlib import Path

import pytest

SMALL = ["--grid", "8x8", "--heads", "2", "--head-dim", "16", "--dtype", "fp16"]
UNWRITABLE = Path("/proc/sparseforge-test")  # nothing can be created in /proc, not even by root


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SPARSEFORGE_MEMORY_BUDGET", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def no_compile(monkeypatch):
    """Fail the test if the command gets as far as compiling (the check must come first)."""
    import sparseforge.api

    def refuse(*args, **kwargs):
        raise AssertionError("compiled before the up-front check")
    monkeypatch.setattr(sparseforge.api, "compile", refuse)


def bad_input(result, clean_error, *needles) -> str:
    line = clean_error(result, *needles)
    assert result.exit_code == 2, (result.exit_code, line)
    assert "internal error" not in line
    return line


# ------------------------------------------------------------------------------------
# click's usage errors
# ------------------------------------------------------------------------------------
USAGE = [
    (["show", "--bogus"], ["--bogus", "show --help"]),
    (["bogus"], ["'bogus'", "--help"]),
    (["show"], ["Missing argument 'PATTERN'"]),
    (["compile", "Full()", "--seq", "8", "--dtype", "xx"], ["'--dtype'", "'xx'", "fp16"]),
    (["cache", "list", "--x"], ["--x", "cache list --help"]),
    (["cache", "clear", "--only", "nope"], ["'--only'", "'nope'"]),
    (["--bogus", "env"], ["--bogus"]),
]


@pytest.mark.parametrize("args,needles", USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_usage_errors_are_one_line(sf, clean_error, cache, args, needles):
    bad_input(sf(*args), clean_error, *needles)


def test_no_arguments_still_prints_the_help(sf):
    result = sf()
    assert "Commands:" in result.output and "show" in result.output


# ------------------------------------------------------------------------------------
# --out and SPARSEFORGE_CACHE_DIR
# ------------------------------------------------------------------------------------
def out_cases(tmp_path: Path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "file").write_text("x\n")
    return {
        "non-empty directory": (tmp_path / "full", "non-empty directory that is not a sparseforge build"),
        "symbolic link": (tmp_path / "link", "symbolic link"),
        "under a file": (tmp_path / "file" / "build", "is a file, not a directory"),
        "unwritable place": (UNWRITABLE / "build", "cannot create files in '/proc'"),
    }


@pytest.mark.parametrize("case", ["non-empty directory", "symbolic link", "under a file", "unwritable place"])
def test_out_that_cannot_be_written_is_refused_before_compiling(sf, clean_error, cache, no_compile, tmp_path, case):
    out, why = out_cases(tmp_path)[case]
    line = bad_input(sf("compile", "Neighborhood(3)", *SMALL, "--out", str(out)), clean_error, "'--out'", str(out), why)
    assert "expected" in line
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine\n"  # nothing touched
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_out_error_found_late_is_one_line_about_out(sf, clean_error, cache, monkeypatch, tmp_path):
    """A file error while the build is written (after the up-front check) names --out, exit 2."""
    import sparseforge.runtime.build

    def denied(attn, out, targets=(), progress=None):
        raise PermissionError(13, "Permission denied", str(Path(out).parent / ".na.staging-1"))
    monkeypatch.setattr(sparseforge.runtime.build, "save", denied)
    line = bad_input(sf("compile", "Neighborhood(3)", *SMALL, "--out", str(tmp_path / "na")), clean_error,
                     "'--out'", "Permission denied", str(tmp_path))
    assert "PermissionError" not in line


def test_cache_error_found_late_names_the_variable(sf, clean_error, cache, monkeypatch, tmp_path):
    import sparseforge.runtime.build

    def broken(attn, out, targets=(), progress=None):
        raise NotADirectoryError(20, "Not a directory", str(cache / "kernels" / "fwd.py"))
    monkeypatch.setattr(sparseforge.runtime.build, "save", broken)
    bad_input(sf("compile", "Neighborhood(3)", *SMALL, "--out", str(tmp_path / "na")), clean_error,
              "SPARSEFORGE_CACHE_DIR", "Not a directory")


@pytest.mark.parametrize("case", ["a file", "under a file", "unwritable place"])
@pytest.mark.parametrize("command", ["compile", "bench"])
def test_unusable_cache_dir_names_the_variable(sf, clean_error, no_compile, monkeypatch, tmp_path, case, command):
    (tmp_path / "file").write_text("x\n")
    value = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "cache",
             "unwritable place": UNWRITABLE / "cache"}[case]
    monkeypatch.setenv("SPARSEFORGE_CACHE_DIR", str(value))
    args = [command, "Neighborhood(3)", *SMALL] + (["--out", str(tmp_path / "b")] if command == "compile" else [])
    line = bad_input(sf(*args), clean_error, f"SPARSEFORGE_CACHE_DIR='{value}'", "expected a writable directory")
    assert "--out" not in line


# ------------------------------------------------------------------------------------
# pattern files and warnings
# ------------------------------------------------------------------------------------
def test_pattern_file_calling_sys_exit_is_an_error(sf, clean_error, tmp_path):
    f = tmp_path / "quits.py"
    f.write_text("import sys\nsys.exit(0)\n")
    bad_input(sf("show", f"{f}:p", "--seq", "8"), clean_error, "'PATTERN'", "sys.exit(0)", "quits.py")
    g = tmp_path / "quits_later.py"
    g.write_text("def p():\n    raise SystemExit(3)\n")
    bad_input(sf("show", f"{g}:p", "--seq", "8"), clean_error, "'PATTERN'", "sys.exit(3)", "p()")


def test_warnings_are_one_line(sf, tmp_path):
    f = tmp_path / "warns.py"
    f.write_text("import warnings\nimport sparseforge as sf\nwarnings.warn('careful\\nnow')\np = sf.Full()\n")
    result = sf("show", f"{f}:p", "--seq", "4", "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == ["Warning: careful now (UserWarning, warns.py:3)"]


# ------------------------------------------------------------------------------------
# sizes
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [["--grid", "100000x100000"], ["--seq", "10000000000"]])
def test_show_on_a_huge_grid_is_refused_up_front(sf, clean_error, monkeypatch, size):
    monkeypatch.delenv("SPARSEFORGE_MEMORY_BUDGET", raising=False)
    line = bad_input(sf("show", "Full()", *size), clean_error, f"'{size[0]}'", "10000000000 tokens", "GiB",
                     "memory budget", "SPARSEFORGE_MEMORY_BUDGET")
    assert "use a smaller --grid or --seq" in line


def test_show_follows_the_memory_budget_variable(sf, clean_error, monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_MEMORY_BUDGET", "1MiB")
    bad_input(sf("show", "Neighborhood(3)", "--grid", "64x64"), clean_error, "'--grid'", "64x64",
              "SPARSEFORGE_MEMORY_BUDGET=1MiB")
    monkeypatch.setenv("SPARSEFORGE_MEMORY_BUDGET", "unlimited")
    assert sf("show", "Neighborhood(3)", "--grid", "8x8", "--json").exit_code == 0


def test_bad_memory_budget_variable_is_one_line(sf, clean_error, monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_MEMORY_BUDGET", "lots")
    bad_input(sf("env"), clean_error, "SPARSEFORGE_MEMORY_BUDGET='lots'", "16GiB")


def test_per_head_list_too_long_for_memory(sf, clean_error):
    bad_input(sf("show", "PerHead([Full()] * 4096 * 4096)", "--seq", "8"), clean_error, "'PATTERN'",
              "16777216 items", "65536")


def test_compile_on_a_huge_grid_is_refused_up_front(sf, clean_error, cache):
    line = bad_input(sf("compile", "Full()", "--seq", "100000000", "--head-dim", "16", "--dtype", "fp16"),
                     clean_error, "'--seq'", "tile schedule", "(100000000,)", "query x", "key tiles", "TiB",
                     "SPARSEFORGE_MEMORY_BUDGET")
    assert "larger tiles" in line
    assert not (cache / "builds").exists() or not any((cache / "builds").iterdir())


def test_bench_dense_mask_beyond_the_budget_is_one_line(sf, clean_error, cache, monkeypatch):
    """bench compares with SDPA on the dense mask: refused by name when the mask would not fit."""
    monkeypatch.setenv("SPARSEFORGE_MEMORY_BUDGET", "2MiB")
    import sparseforge.api

    class Tiny:  # no compile needed to reach the dense mask
        pattern = __import__("sparseforge").Full()
        problem = __import__("sparseforge").Problem(grid=(1024,), heads=2, head_dim=16, dtype="fp16")
    monkeypatch.setattr(sparseforge.api, "compile", lambda pattern, problem, **kw: Tiny())
    bad_input(sf("bench", "Full()", "--seq", "1024", "--heads", "2", "--head-dim", "16", "--dtype", "fp16"),
              clean_error, "'--seq'", "dense_mask", "SPARSEFORGE_MEMORY_BUDGET=2MiB")

