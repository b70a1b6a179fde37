"""The NaN/Inf containment kernels (``<kernel>_fix``, launched after each kernel where
visited tiles hold masked pairs) compile ahead of time for sm_90 on the CPU, with tensor
cores. They only recompute tiles whose stored results came out non-finite; the kernels they
follow are unchanged but for the forward's LSE marking (checked in the AOT suite)."""
import pytest
import torch

import sparseforge as sf
from sparseforge.backends.triton import TritonKernels
from sparseforge.codegen.config import KernelConfig, default_config
from sparseforge.lower import build_schedule
from sparseforge.lower.paths import SEGMENTS

FIXES = ("fwd_fix", "bwd_dq_fix", "bwd_dkdv_fix")


def _kernels(which):
    if which == "documents":
        pattern = sf.Documents([100, 300, 112]) & sf.Causal()
        problem = sf.Problem(grid=512, heads=2, head_dim=64, dtype=torch.float16)
        return TritonKernels(build_schedule(pattern, problem), config=default_config(problem, pattern))
    pattern, problem = sf.Scattered((12, 12, 1)), sf.Problem(heads=2, head_dim=64, dtype=torch.bfloat16)
    config = KernelConfig().resolved(problem, pattern)
    return TritonKernels(SEGMENTS.build(pattern, problem, config), config=config)


@pytest.mark.parametrize("which", ["documents", "scattered"])
def test_containment_kernels_compile_for_sm90(which):
    kernels = _kernels(which)
    for name in FIXES:
        report = kernels.aot(name, "sm_90")
        assert report.tensor_core in ("wgmma", "mma"), (name, report.as_dict())
        assert 0 < report.registers <= 255, (name, report.as_dict())
        assert kernels.signature(name) == kernels.signature(name.removesuffix("_fix"))
