"""Smoke tests for the model examples in examples/: each ``main([...])`` at tiny sizes on CPU.

examples/ is not a package, so the scripts are loaded by path (as tests/cli/test_show.py
loads examples/patterns.py); one of them also runs as a script in a subprocess.
"""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sparseforge as sf

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"

VIT_TINY = ["--image-size", "16", "--patch", "4", "--dim", "32", "--depth", "1", "--heads", "2", "--kernel", "3",
            "--batch", "8", "--device", "cpu", "--dtype", "float32"]
LLAMA_TINY = ["--seq", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--block-size", "8",
              "--local-blocks", "2", "--vertical-stride", "2", "--sink", "2", "--vocab", "64", "--device", "cpu"]
MAXVIT_TINY = ["--size", "8", "--dim", "32", "--heads", "2", "--grid-heads", "1", "--block", "4", "--grid", "4",
               "--batch", "2", "--device", "cpu", "--dtype", "float32"]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"_example_{name}_under_test", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_all_grads(result: dict) -> None:
    assert result["missing_grads"] == []
    assert result["grad_norms"]
    assert all(math.isfinite(v) for v in result["grad_norms"].values()), result["grad_norms"]


def test_vit_neighborhood_trains():
    result = load_example("vit_neighborhood").main(VIT_TINY + ["--steps", "12", "--seed", "0"])
    losses = result["losses"]
    assert len(losses) == 12
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0], losses  # memorising one fixed batch of 8 labels
    assert result["params_changed"] and result["grads_finite"]
    assert result["grid"] == (4, 4)


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-4), ("float64", 1e-10)])
def test_llama_strided_shards_matches_reference(dtype, tol):
    result = load_example("llama_strided_shards").main(LLAMA_TINY + ["--dtype", dtype])
    assert result["logits_shape"] == (2, 64, 64)
    assert math.isfinite(result["loss"])
    assert result["rel_err"] is not None and result["rel_err"] < tol, result["rel_err"]
    assert_all_grads(result)


def test_llama_pattern_is_causal_with_sinks():
    module = load_example("llama_strided_shards")
    pattern = module.strided_shards_with_sinks(block_size=8, local_blocks=2, vertical_stride=2, sink=4)
    mask = sf.dense_mask(pattern, sf.Problem(grid=64, heads=4, kv_heads=2, head_dim=16))
    assert not mask.triu(diagonal=1).any()       # no query sees a later token
    assert mask[:, 4:, :4].all()                 # every later query sees the 4 sinks


def test_maxvit_block_forward_backward():
    result = load_example("maxvit_block").main(MAXVIT_TINY)
    assert result["input_shape"] == result["output_shape"] == (2, 32, 8, 8)
    assert math.isfinite(result["loss"]) and math.isfinite(result["input_grad_norm"])
    assert_all_grads(result)
    assert any(name.startswith("mbconv.") for name in result["grad_norms"])


def test_maxvit_block_script_entry_point():
    env = dict(os.environ)
    # The package may be installed, or only importable from the repository root.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(EXAMPLES / "maxvit_block.py"), *MAXVIT_TINY, "--no-mbconv"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "output (2, 32, 8, 8)" in proc.stdout
    assert "grad norm attn.qkv.weight" in proc.stdout
