"""Shared pytest set-up: tests marked ``gpu`` are skipped where no CUDA GPU is available,
and the ``sf`` / ``clean_error`` fixtures run the ``sparseforge`` CLI in-process with click's
CliRunner (used by tests/cli and tests/benchmarks)."""
from __future__ import annotations

import pytest
from click.testing import CliRunner


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is false)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def sf():
    """``sf("show", "Full()", "--seq", "8")`` runs the CLI and returns click's Result
    (``.stdout`` and ``.stderr`` apart)."""
    runner = CliRunner()

    def invoke(*args: str, **kwargs):
        from sparseforge.cli.main import main

        return runner.invoke(main, list(args), **kwargs)

    return invoke


@pytest.fixture
def clean_error():
    """``clean_error(result, "'--grid'")``: checks the command failed with one line on
    stderr that names every needle and no traceback; returns that line."""
    return _clean_error


def _clean_error(result, *needles: str) -> str:
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
