"""sparseforge.compat: the torch/Triton version check made at import."""
from __future__ import annotations

import re
import subprocess
import sys
import pathlib

import pytest
import torch
import triton

from sparseforge import compat

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text, want", [
    ("2.13.0+cpu", (2, 13, 0)), ("3.6.0", (3, 6, 0)), ("3.6.0.dev20251101", (3, 6, 0)),
    ("2.10.0a0+git1234", (2, 10, 0)), ("3.10", (3, 10)),
])
def test_version_tuple(text, want):
    assert compat.version_tuple(text) == want


def test_supported_versions_pass():
    for torch_v in ("2.10.0", "2.11.0", "2.12.1", "2.13.0+cpu", "2.14.1"):
        for triton_v in ("3.6.0", "3.7.1", "3.8.0", "3.9.0"):
            compat.check_versions(torch_v, triton_v)


@pytest.mark.parametrize("torch_v, triton_v, match", [
    ("2.9.1", "3.9.0", r"needs torch >= 2\.10 and triton >= 3\.6, < 3\.10; installed: torch 2\.9\.1"),
    ("2.13.0", "3.5.1", r"installed: triton 3\.5\.1 \(with torch 2\.13\.0\)"),
    ("2.13.0", None, r"installed: torch 2\.13\.0, no triton"),
])
def test_too_old_raises_import_error_naming_both(torch_v, triton_v, match):
    with pytest.raises(ImportError, match=match):
        compat.check_versions(torch_v, triton_v)


def test_newer_triton_warns():
    with pytest.warns(RuntimeWarning, match=r"triton 3\.10\.0 is newer than the last release .* \(3\.9\)"):
        compat.check_versions("2.15.0", "3.10.0")


def test_import_fails_cleanly_with_an_old_triton(tmp_path):
    """A fake old ``triton`` first on sys.path: ``import sparseforge`` raises the ImportError."""
    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '3.4.0'\n")
    code = ("import sys; sys.path.insert(0, %r)\n"
            "try:\n    import sparseforge\nexcept ImportError as e:\n    print('IMPORTERROR', e)\n") % str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "IMPORTERROR sparseforge needs torch >= 2.10 and triton >= 3.6" in out.stdout, out.stdout + out.stderr
    assert "installed: triton 3.4.0" in out.stdout


def test_pyproject_pins_match():
    """pyproject's requirements say what compat checks (and what README's set-up says)."""
    deps = re.findall(r'^\s*"([^"]+)",?$', (ROOT / "pyproject.toml").read_text(), re.M)
    mt, mn, mx = compat.MIN_TORCH, compat.MIN_TRITON, compat.MAX_TRITON
    assert f"torch>={mt[0]}.{mt[1]}" in deps
    assert f"triton>={mn[0]}.{mn[1]},<{mx[0]}.{mx[1] + 1}" in deps


def test_installed_versions_are_supported():
    t, tr = compat.installed_versions()
    assert t == torch.__version__ and tr == triton.__version__
    assert compat.version_tuple(tr)[:2] >= compat.MIN_TRITON and re.match(r"\d+\.\d+", t)
