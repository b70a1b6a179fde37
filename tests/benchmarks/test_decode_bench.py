"""benchmarks/decode.py: GPU timing only; without a GPU it says so and writes nothing."""
from __future__ import annotations

import pytest
import torch


def test_decode_timing_needs_a_gpu(capsys):
    """benchmarks/decode.py times on CUDA only: without one it says so and exits 2 (no numbers)."""
    import importlib.util
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the GPU round runs this benchmark")
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "decode.py"
    spec = importlib.util.spec_from_file_location("_decode_bench_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--out", ""]) == 2
    assert "CUDA GPU" in capsys.readouterr().err
