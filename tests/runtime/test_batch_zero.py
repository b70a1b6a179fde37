"""Batch 0 (issue 16): every path, forward and backward, on the CPU executor and the Triton
kernels under the interpreter: outputs [0, ...] of the right shape and dtype, gradients of
the inputs' shapes (LSE gradient included), also for an empty set of voxels."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo  # noqa: F401  (imports triton.language before any kernel loads, as torch users do)

import sparseforge as sf

F32 = torch.float32


def P(grid=None):
    return sf.Problem(grid=grid, heads=2, kv_heads=1, head_dim=16, dtype=F32)


def empty_inputs(*shape_of_q_k):
    return tuple(torch.randn(s, dtype=F32, requires_grad=True) for s in shape_of_q_k)


def check(out, lse, inputs, out_shape):
    assert out.shape == out_shape and out.dtype == F32
    assert lse.shape == out_shape[:-1] and lse.dtype == F32
    (out.sum() + lse.sum()).backward()
    for t in inputs:
        assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == t.dtype


CALLS = {
    "static": (sf.Neighborhood(3), P((4, 6)), {}),
    "routed": (sf.Routed((2, 3), 2), P((4, 6)), {}),
    "routed_given": (sf.Routed((2, 3), 2, per_head=True), P((4, 6)),
                     {"routes": torch.zeros(0, 2, 4, 2, dtype=torch.long)}),
    "grouped": (sf.Grouped(), P(24), {"groups": torch.zeros(0, 24, dtype=torch.long)}),
    "grouped_per_head": (sf.Grouped(causal=True), P(24), {"groups": torch.zeros(0, 2, 24, dtype=torch.long)}),
}


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
@pytest.mark.parametrize("case", list(CALLS))
def test_batch_zero(case, backend):
    pattern, problem, kwargs = CALLS[case]
    attn = sf.compile(pattern, problem, backend=backend)
    q, k, v = empty_inputs((0, 2, 24, 16), (0, 1, 24, 16), (0, 1, 24, 16))
    out, lse = attn(q, k, v, return_lse=True, **kwargs)
    check(out, lse, (q, k, v), (0, 2, 24, 16))


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
def test_no_voxels(backend):
    attn = sf.compile(sf.Scattered((4, 4)), P(), backend=backend)
    q, k, v = empty_inputs((0, 2, 16), (0, 1, 16), (0, 1, 16))
    out, lse = attn(q, k, v, coords=torch.zeros(0, 3, dtype=torch.long), return_lse=True)
    check(out, lse, (q, k, v), (0, 2, 16))


def test_reference_batch_zero():
    q, k, v = empty_inputs((0, 2, 24, 16), (0, 1, 24, 16), (0, 1, 24, 16))
    out, lse = sf.reference_attention(q, k, v, sf.Neighborhood(3), P((4, 6)), return_lse=True)
    assert out.shape == (0, 2, 24, 16) and lse.shape == (0, 2, 24)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape
