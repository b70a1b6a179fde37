"""Ahead-of-time compile of generated kernels for sm_80 and sm_90 on the CPU: they compile,
use tensor cores (mma on sm_80, wgmma on sm_90) and report their resources. The forward
must not spill; backward resources are recorded (tuning them is the autotuner's job)."""
import json

import pytest
import torch

import sparseforge as sf
from sparseforge.codegen import build_schedule
from sparseforge.codegen.kernels import TritonKernels

INSTANCES = [
    (sf.Neighborhood(7, dilation=2), sf.Problem(grid=(56, 56), heads=8, head_dim=64, dtype=torch.bfloat16)),
    (sf.PerHead([sf.Neighborhood(3), sf.Blocks(2), sf.Grid(2), sf.Causal()]),
     sf.Problem(grid=(4, 6), heads=4, head_dim=16, dtype=torch.float16)),
    (sf.Causal() & (sf.SlidingWindow(5) | sf.Sink(2)), sf.Problem(grid=40, heads=2, kv_heads=1, head_dim=16,
                                                                  dtype=torch.float16)),
]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = {}
    for pattern, problem in INSTANCES:
        kernels = TritonKernels(build_schedule(pattern, problem))
        for name in TritonKernels.KERNELS:
            for target in ("sm_80", "sm_90"):
                out[(repr(pattern), name, target)] = kernels.aot(name, target)
    path = tmp_path_factory.mktemp("aot") / "resources.json"
    path.write_text(json.dumps({" ".join(k): r.as_dict() for k, r in out.items()}, indent=1))
    print(path.read_text())
    return out


@pytest.mark.parametrize("index", range(len(INSTANCES)))
def test_forward_uses_tensor_cores_without_spills(reports, index):
    pattern = repr(INSTANCES[index][0])
    assert reports[(pattern, "fwd", "sm_80")].tensor_core == "mma"
    assert reports[(pattern, "fwd", "sm_90")].tensor_core == "wgmma"
    for target in ("sm_80", "sm_90"):
        r = reports[(pattern, "fwd", target)]
        assert r.spills == 0, r.as_dict()
        assert 0 < r.registers <= 255 and r.shared_bytes > 0


@pytest.mark.parametrize("index", range(len(INSTANCES)))
def test_backward_compiles_with_tensor_cores(reports, index):
    pattern = repr(INSTANCES[index][0])
    for name in ("bwd_dq", "bwd_dkdv"):
        assert reports[(pattern, name, "sm_80")].tensor_core == "mma"
        assert reports[(pattern, name, "sm_90")].tensor_core in ("wgmma", "mma")
        assert reports[(pattern, name, "sm_90")].registers > 0


def test_bf16_signature():
    pattern, problem = INSTANCES[0]
    assert TritonKernels(build_schedule(pattern, problem)).signature("fwd")["Q"] == "*bf16"
