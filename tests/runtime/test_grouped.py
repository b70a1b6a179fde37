"""Compiled Grouped attention (runtime.grouped, on the Scattered kernels): the CPU executor
and the generated Triton kernels under the interpreter against the float64 reference."""
from __future__ import annotations

import pytest
import torch

import sparseforge as sf
from tests.runtime._common import TOL, assert_gradients_match, qkv, rand, rel_err


def P(n=40, heads=2, head_dim=16, kv_heads=None, dtype=torch.float32):
    return sf.Problem(grid=n, heads=heads, head_dim=head_dim, kv_heads=kv_heads, dtype=dtype)


def check(problem, groups, backend, *, pattern=None, dtype=None, seed=0, q_tile=None, k_tile=None):
    pattern = sf.Grouped() if pattern is None else pattern
    dtype = problem.dtype if dtype is None else dtype
    attn = sf.compile(sf.Grouped(), problem, backend=backend, q_tile=q_tile, k_tile=k_tile)
    q, k, v = qkv(problem, groups.shape[0], dtype, seed, requires_grad=True)
    out, lse = attn(q, k, v, groups=groups, return_lse=True)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == q.shape[:3]
    dout = rand(out.shape, dtype, torch.Generator().manual_seed(seed + 1))
    return assert_gradients_match(
        f"Grouped on {problem!r} ({dtype}, {backend})", (q, k, v), out, lse, dout,
        lambda q64, k64, v64: sf.reference_attention(q64, k64, v64, pattern, problem, groups=groups,
                                                     return_lse=True),
        TOL[dtype] if dtype != torch.float16 else 2e-3)


def ids(shape, low, high, seed=0):
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed))


CASES = {
    "clusters": lambda: ids((1, 40), 0, 4),
    "empty_tokens": lambda: ids((1, 40), -2, 3, seed=1),
    "batch2_different_ids": lambda: torch.stack([ids((40,), -1, 3, seed=2), ids((40,), 0, 6, seed=3)]),
    "singletons": lambda: torch.arange(40)[None].repeat(2, 1),
    "per_head": lambda: ids((2, 2, 40), -1, 3, seed=4),
    "all_empty": lambda: torch.full((1, 40), -1),
}


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(case, backend):
    check(P(), CASES[case](), backend)


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
@pytest.mark.parametrize("per_head", [False, True])
def test_fp16_gqa(backend, per_head):
    groups = ids((2, 4, 40) if per_head else (2, 40), -1, 3, seed=5)
    check(P(heads=4, kv_heads=2, dtype=torch.float16), groups, backend)


def test_packed_documents_small_uneven_tiles_interpret():
    # contiguous documents, longer than a tile, and padding between them
    groups = torch.tensor([[0] * 20 + [-1] * 3 + [1] * 30 + [2] * 11])
    check(P(n=64), groups, "interpret", q_tile=(32,), k_tile=(16,))


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
def test_one_group_equals_full(backend):
    problem = P()
    q, k, v = qkv(problem, 2, torch.float32)
    full = sf.compile(sf.Full(), problem, backend=backend)(q, k, v)
    grouped = sf.compile(sf.Grouped(), problem, backend=backend)(q, k, v, groups=torch.full((2, 40), 7))
    assert rel_err(grouped, full) < 1e-5


def test_errors():
    problem = P()
    with pytest.raises(sf.UnsupportedPatternError, match="causal"):
        sf.compile(sf.Grouped(causal=True), problem)
    with pytest.raises(sf.UnsupportedPatternError):
        sf.compile(sf.Grouped() | sf.Sink(1), problem)
    with pytest.raises(ValueError, match="grid"):
        sf.compile(sf.Grouped(), sf.Problem(heads=2, head_dim=16))
    attn = sf.compile(sf.Grouped(), problem, backend="cpu")
    assert "Grouped()" in repr(attn)
    q, k, v = qkv(problem, 2, torch.float32)
    with pytest.raises(TypeError, match="groups"):
        attn(q, k, v)
    with pytest.raises(ValueError, match="groups must have shape"):
        attn(q, k, v, groups=torch.zeros(1, 40, dtype=torch.long))
    with pytest.raises(TypeError, match="groups must have an integer dtype"):
        attn(q, k, v, groups=torch.zeros(2, 40))
