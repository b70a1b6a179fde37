"""Context parallelism on a GPU: one NCCL rank (a single GPU cannot hold two NCCL ranks), so
the exchange is empty and what runs is the device side: the local compute, the merges, the
modifiers and group ids on CUDA tensors, under NCCL's barrier and rounds."""
from __future__ import annotations

import pytest

from ._spawn import spawn

CASES = [
    dict(pattern="Causal() & (SlidingWindow(6) | Sink(3))", grid=[41], heads=4, kv_heads=2, head_dim=16,
         dtype="fp32", modifiers=["alibi", "softcap", "sinks"], device="cuda"),
    dict(pattern="Neighborhood((3, 5), dilation=(2, 1))", grid=[13, 10], heads=2, head_dim=16, dtype="fp32",
         modifiers=["rpb"], scale="per_head", device="cuda", exchange="ring"),
    dict(pattern="Grouped() & Causal()", grid=[40], heads=2, head_dim=16, dtype="fp32", batch=2, groups="documents",
         padding="both_sides", device="cuda"),
]


@pytest.mark.gpu
def test_one_nccl_rank_on_cuda_equals_the_reference():
    (res,) = spawn(1, "attention_cases", CASES, backend="nccl", timeout=300)
    assert isinstance(res, list), res
    for case, r in zip(CASES, res):
        for key, err in r["errors"].items():
            assert err <= r["tol"][key], (case["pattern"], key, err, r["tol"][key])
