"""``sparseforge env`` and the environment-variable module."""
from __future__ import annotations

import json
import platform

import platformdirs
import pytest
import torch

import sparseforge
from sparseforge import envvars


def test_env_text(sf, monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEFORGE_CACHE_DIR", str(tmp_path / "cache"))
    result = sf("env")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for word in ("sparseforge", "torch", "triton", "python", "cuda_device", "cache_dir", "SPARSEFORGE_DEBUG"):
        assert word in out
    assert torch.__version__ in out and str(tmp_path / "cache") in out


def test_env_json(sf, monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEFORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SPARSEFORGE_DEBUG", raising=False)
    monkeypatch.setenv("SPARSEFORGE_MEMORY_BUDGET", "32GiB")
    result = sf("env", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["sparseforge"] == sparseforge.__version__
    assert info["torch"] == torch.__version__
    assert info["python"] == platform.python_version()
    assert info["triton"]
    assert (info["cuda_device"] == "none") == (not torch.cuda.is_available())
    assert info["cache_dir"] == str(tmp_path)
    assert info["env"] == {"SPARSEFORGE_CACHE_DIR": str(tmp_path), "SPARSEFORGE_DEBUG": None,
                           "SPARSEFORGE_MEMORY_BUDGET": "32GiB"}


def test_cache_dir_default_is_platformdirs(monkeypatch):
    monkeypatch.delenv("SPARSEFORGE_CACHE_DIR", raising=False)
    assert str(envvars.cache_dir()) == platformdirs.user_cache_dir("sparseforge")
    monkeypatch.setenv("SPARSEFORGE_CACHE_DIR", "")            # empty means unset
    assert str(envvars.cache_dir()) == platformdirs.user_cache_dir("sparseforge")
    monkeypatch.setenv("SPARSEFORGE_CACHE_DIR", "~/sfcache")
    assert envvars.cache_dir() == envvars.Path("~/sfcache").expanduser()


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("0", False), ("", False), ("off", False)])
def test_debug_flag(monkeypatch, value, expected):
    monkeypatch.setenv("SPARSEFORGE_DEBUG", value)
    assert envvars.debug() is expected


def test_debug_env_var_shows_the_exception(sf, monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_DEBUG", "1")
    result = sf("show", "Nope()", "--seq", "4")
    assert isinstance(result.exception, ValueError)


def test_bad_debug_value_is_a_clean_error(sf, clean_error, monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_DEBUG", "maybe")
    clean_error(sf("env"), "SPARSEFORGE_DEBUG='maybe'")


def test_version_and_help(sf):
    result = sf("--version")
    assert result.exit_code == 0 and sparseforge.__version__ in result.stdout
    result = sf("--help")
    assert result.exit_code == 0
    assert "show" in result.stdout and "env" in result.stdout


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "sparseforge", "show", "Blocks(4)", "--grid", "8x8", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert '"density"' in r.stdout
