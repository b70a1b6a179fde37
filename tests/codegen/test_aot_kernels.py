"""Ahead-of-time compile of generated kernels for sm_80 and sm_90 on the CPU: they compile,
use tensor cores (mma on sm_80, wgmma on sm_90 for the forward) and, with the default
config (codegen.config.default_config), no kernel spills registers on either target."""
import json
import math

import pytest
import torch

import sparseforge as sf
from sparseforge.lower import build_schedule
from sparseforge.codegen.config import default_config
from sparseforge.backends.triton import TritonKernels

from ._aot import assert_tensor_cores_without_spills, compile_reports, instance_ids

INSTANCES = [
    (sf.Neighborhood(7, dilation=2), sf.Problem(grid=(56, 56), heads=8, head_dim=64, dtype=torch.bfloat16)),
    (sf.PerHead([sf.Neighborhood(3), sf.Blocks(2), sf.Grid(2), sf.Causal()]),
     sf.Problem(grid=(4, 6), heads=4, head_dim=16, dtype=torch.float16)),
    (sf.Causal() & (sf.SlidingWindow(5) | sf.Sink(2)), sf.Problem(grid=40, heads=2, kv_heads=1, head_dim=16,
                                                                  dtype=torch.float16)),
    (sf.Neighborhood(7, dilation=2), sf.Problem(grid=(56, 56), heads=8, head_dim=128, dtype=torch.bfloat16)),
    (sf.Causal() & (sf.SlidingWindow(5) | sf.Sink(2)), sf.Problem(grid=4096, heads=2, kv_heads=1, head_dim=128,
                                                                  dtype=torch.float16)),
    (sf.Neighborhood(7), sf.Problem(grid=(56, 56), heads=4, head_dim=64, dtype=torch.float32)),
    (sf.Neighborhood(7, dilation=2), sf.Problem(grid=(56, 56), heads=4, head_dim=256, dtype=torch.bfloat16)),
    # one instance per remaining family, at the default (spill-free) tiles
    (sf.Neighborhood((3, 5, 5), dilation=(1, 2, 1)), sf.Problem(grid=(8, 16, 16), heads=2, head_dim=64,
                                                                dtype=torch.float16)),
    (sf.Halo(8, 3), sf.Problem(grid=(64, 64), heads=2, head_dim=64, dtype=torch.bfloat16)),
    (sf.PerHead([sf.Blocks(8), sf.Grid(8)]), sf.Problem(grid=(64, 64), heads=2, head_dim=32, dtype=torch.bfloat16)),
    (sf.Documents([100, 300, 112]) & sf.Causal(), sf.Problem(grid=512, heads=2, head_dim=64, dtype=torch.float16)),
    (sf.GlobalTokens([0, 1, 2, 3]) | sf.SlidingWindow(64, 64), sf.Problem(grid=1024, heads=2, head_dim=96,
                                                                          dtype=torch.bfloat16)),
    (sf.StridedShards(64, 16, 4), sf.Problem(grid=2048, heads=4, head_dim=128, dtype=torch.bfloat16)),
    (sf.Full(), sf.Problem(grid=256, heads=2, head_dim=64, dtype=torch.float16)),
]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """{(instance index, kernel, target): ResourceReport}, also written as JSON for the log."""
    out = compile_reports(INSTANCES, build_schedule)
    path = tmp_path_factory.mktemp("aot") / "resources.json"
    path.write_text(json.dumps({f"{INSTANCES[i][0]!r} {INSTANCES[i][1]!r} {n} {t}": r.as_dict()
                                for (i, n, t), r in out.items()}, indent=1))
    print(path.read_text())
    return out


@pytest.mark.parametrize("index", range(len(INSTANCES)), ids=instance_ids(INSTANCES))
def test_forward_uses_tensor_cores_without_spills(reports, index):
    problem = INSTANCES[index][1]
    fp32 = problem.dtype == torch.float32  # IEEE fp32 dots: no tensor cores by design
    assert_tensor_cores_without_spills(reports, index, ("fwd",), tensor_cores=not fp32)
    if not fp32:
        wgmma = math.prod(default_config(problem).q_tile) >= 64  # wgmma needs 64-row tiles
        assert reports[(index, "fwd", "sm_90")].tensor_core == ("wgmma" if wgmma else "mma")
    assert all(reports[(index, "fwd", t)].shared_bytes > 0 for t in ("sm_80", "sm_90"))


@pytest.mark.parametrize("index", range(len(INSTANCES)), ids=instance_ids(INSTANCES))
def test_backward_uses_tensor_cores_without_spills(reports, index):
    pattern, problem = INSTANCES[index]
    fp32 = problem.dtype == torch.float32
    assert_tensor_cores_without_spills(reports, index, ("bwd_dq", "bwd_dkdv"), tensor_cores=not fp32)
    config = default_config(problem, pattern, capability=90)
    keys = math.prod(min(t, n) for t, n in zip(config.dkdv_k_tile or (0,), problem.grid))  # clipped to the grid
    if not fp32 and problem.head_dim <= 128 and keys >= 64:
        # sm_90's dK/dV runs on tiles of its own with >= 64 stationary keys: wgmma only, unserialized
        dkdv = reports[(index, "bwd_dkdv", "sm_90")]
        assert dkdv.tensor_core == "wgmma" and not dkdv.serialized, dkdv.as_dict()


def test_bf16_signature():
    pattern, problem = INSTANCES[0]
    assert TritonKernels(build_schedule(pattern, problem)).signature("fwd")["Q"] == "*bf16"
