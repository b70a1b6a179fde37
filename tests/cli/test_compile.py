"""``sparseforge compile | check | bench | cache`` as a user runs them, without a GPU."""
from __future__ import annotations

import json

import pytest

SMALL = ["--grid", "8x8", "--heads", "2", "--head-dim", "16", "--dtype", "fp16"]


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEFORGE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def built(sf, cache, tmp_path):
    out = tmp_path / "na"
    result = sf("compile", "Neighborhood(3, dilation=2)", *SMALL, "--q-tile", "4x4", "--target", "sm_80",
                "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_compile_writes_a_build(built):
    out, info = built
    assert info["build_dir"] == str(out) and info["target"] == "sm_80"
    assert info["config"]["q_tile"] == [4, 4] and info["config"]["k_tile"] == [4, 4]
    assert info["loop_bounds"] == "closed form" and info["tuning"] is None
    assert set(info["resources"]) == {"fwd", "bwd_dq", "bwd_dkdv"}
    assert all(r["spills"] == 0 and r["tensor_core"] == "mma" for r in info["resources"].values())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["meta"]["name"] == info["name"] and "aot/sm_80/fwd.cubin" in manifest["files"]


def test_compile_text_output_names_the_op(sf, cache, tmp_path):
    result = sf("compile", "Blocks(4)", *SMALL, "--target", "sm_90", "--out", str(tmp_path / "b"))
    assert result.exit_code == 0, result.output
    assert "torch.ops.sparseforge.attention (kernel 'blocks" in result.stdout and "wgmma" not in result.stderr
    assert "bwd_dkdv sm_90" in result.stdout


def test_compile_autotune_says_predicted(sf, cache, tmp_path, monkeypatch):
    from sparseforge.autotune import space
    from sparseforge.codegen.config import Launch

    monkeypatch.setattr(space, "LAUNCHES", (Launch(8, 1),))
    monkeypatch.setattr(space, "TILE_TOKENS", {"default": ((16, 16), (32, 16))})
    monkeypatch.setattr(space, "DKDV_TILE_TOKENS", {"default": ((32, 16),)})
    monkeypatch.setattr(space, "CLOSED_FORM", (True,))
    args = ["compile", "Neighborhood(3)", *SMALL, "--autotune", "--target", "sm_90", "--out", str(tmp_path / "t")]
    first = sf(*args, "--json")
    assert first.exit_code == 0, first.output
    info = json.loads(first.stdout)
    assert info["tuning"]["measured"] is False and info["tuning"]["basis"].startswith("predicted")
    assert info["tuning"]["cached"] is False
    again = sf(*args)
    assert again.exit_code == 0, again.output
    assert "predicted by the cost model" in again.stdout and "from the tuning database" in again.stdout
    assert info["tuning"]["batch"] == 1
    batched = sf(*args[:-2], "--out", str(tmp_path / "b"), "--batch", "6", "--json")
    assert batched.exit_code == 0, batched.output
    tuned = json.loads(batched.stdout)["tuning"]
    assert tuned["batch"] == 8 and tuned["cached"] is False   # its own bucket: tuned, not the batch-1 entry


def test_check_passes_on_cpu(sf, built):
    out, _ = built
    result = sf("check", str(out), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["passed"] and info["device"] == "cpu" and set(info["errors"]) == {"out", "lse", "dq", "dk", "dv"}
    assert all(0 <= e <= info["tolerances"][name] for name, e in info["errors"].items())
    assert "CPU executor" in result.stderr


def test_check_interpret_runs_the_triton_kernels(sf, built):
    out, _ = built
    result = sf("check", str(out), "--backend", "interpret")
    assert result.exit_code == 0, result.output
    assert "PASS" in result.stdout and "Triton kernels" in result.stdout


def test_check_refuses_a_tampered_build(sf, built, clean_error):
    out, _ = built
    src = out / "kernels" / "fwd.py"
    src.write_text(src.read_text() + "\n")
    clean_error(sf("check", str(out)), "'DIR'", "kernels/fwd.py")


def test_bench_compares_with_sdpa(sf, built):
    out, _ = built
    result = sf("bench", str(out), "--repeat", "2", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert {"sparseforge", "sdpa (dense mask)"} <= set(info["median_ms"]) and info["device"] == "cpu"
    assert all(ms > 0 for ms in info["median_ms"].values())


def test_cache_list_and_clear(sf, built, cache, tmp_path):
    # A pattern no other test compiles: its kernel sources land in this test's cache.
    result = sf("compile", "Halo(2, 1)", *SMALL, "--target", "sm_80", "--out", str(tmp_path / "halo"))
    assert result.exit_code == 0, result.output
    listed = sf("cache", "list", "--json")
    assert listed.exit_code == 0, listed.output
    info = json.loads(listed.stdout)
    assert info["cache_dir"] == str(cache) and info["kernels"] and info["bytes"]["kernels"] > 0
    cleared = sf("cache", "clear", "--only", "kernels")
    assert cleared.exit_code == 0, cleared.output
    assert not (cache / "kernels").exists()
    assert json.loads(sf("cache", "list", "--json").stdout)["kernels"] == []
    out, _ = built
    assert (out / "manifest.json").exists()  # builds written with --out are never touched


@pytest.mark.parametrize("args,needles", [
    (["compile", "Neighborhood(3)", "--grid", "8x8", "--q-tile", "4x4x4", "--out", "x"], ["'--q-tile'", "2 positive"]),
    (["compile", "Neighborhood(3)", "--grid", "8x8", "--target", "sm_75"], ["'--target'", "not supported"]),
    (["compile", "Neighborhood(3)", "--grid", "8x8", "--autotune", "--q-tile", "4x4"], ["'--autotune'"]),
    (["compile", "Neighborhood(3)", "--grid", "8x8", "--batch", "4"], ["'--batch'", "--autotune"]),
    (["compile", "Neighborhood(3)", "--grid", "8x8", "--head-dim", "24"], ["head_dim=24"]),
    (["compile", "Neighborhood(3)"], ["'--grid'", "missing"]),
    (["check", "/nonexistent/build"], ["'DIR'", "does not exist"]),
])
def test_errors_are_one_line(sf, cache, clean_error, args, needles):
    clean_error(sf(*args), *needles)


def test_interrupted_compile_leaves_nothing(sf, cache, tmp_path, monkeypatch):
    """A failure half-way through the ahead-of-time compiles: no build, no staging left."""
    from sparseforge.backends.triton import TritonKernels

    original, calls = TritonKernels.aot, []

    def fail_on_third(self, name, target="sm_90"):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, name, target)
    monkeypatch.setattr(TritonKernels, "aot", fail_on_third)
    out = tmp_path / "builds" / "na"
    out.parent.mkdir()
    result = sf("compile", "Neighborhood(3)", *SMALL, "--target", "sm_80", "--out", str(out))
    assert result.exit_code != 0 and len(calls) == 3, (result.output, calls)
    assert list(out.parent.iterdir()) == []


def test_compile_interrupted_while_writing_the_build_leaves_nothing(sf, cache, tmp_path, monkeypatch):
    """Interrupted inside write_build, after the staging directory got its first files (the
    test above stops before any write): no build, no staging directory, no version left."""
    from sparseforge.runtime import builddir

    real, written = builddir._write_file, []

    def interrupt_on_third(path, data):
        if len(written) == 2:
            assert any(p.name.startswith(".na.staging-") for p in out.parent.iterdir())  # staging exists now
            raise KeyboardInterrupt
        written.append(path)
        real(path, data)
    monkeypatch.setattr(builddir, "_write_file", interrupt_on_third)
    out = tmp_path / "builds" / "na"
    out.parent.mkdir()
    result = sf("compile", "Neighborhood(3)", *SMALL, "--target", "sm_80", "--out", str(out))
    assert result.exit_code != 0 and len(written) == 2, (result.output, written)
    assert [p.name for p in out.parent.iterdir() if p.name != ".na.lock"] == []


def test_bench_pattern_and_cache_clear_json(sf, cache):
    result = sf("bench", "Blocks(4)", *SMALL, "--repeat", "1", "--backward", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["backward"] is True and info["median_ms"]["sparseforge"] > 0
    cleared = sf("cache", "clear", "--json")
    assert cleared.exit_code == 0, cleared.output
    assert set(json.loads(cleared.stdout)["removed_bytes"]) == {"kernels", "builds", "tuning"}


def test_bench_bad_pattern_is_one_line(sf, cache, clean_error):
    clean_error(sf("bench", "Neighborhood(99)", *SMALL), "'PATTERN'", "kernel_size")


def test_check_failing_exits_1_with_the_table(sf, built, monkeypatch):
    from sparseforge.runtime import check

    monkeypatch.setattr(check, "FACTOR", 0.0)  # nothing passes a zero tolerance
    result = sf("check", str(built[0]), "--json")
    assert result.exit_code == 1
    info = json.loads(result.stdout)
    assert info["passed"] is False and "internal error" not in result.stderr
