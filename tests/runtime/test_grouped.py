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
    attn = sf.compile(pattern, problem, backend=backend, q_tile=q_tile, k_tile=k_tile)
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


PATTERNS = {"plain": sf.Grouped(), "causal": sf.Grouped(causal=True)}


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_matches_reference_fp32(pattern, case, backend):
    check(P(), CASES[case](), backend, pattern=PATTERNS[pattern])


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_fp16_gqa(pattern, backend, per_head):
    groups = ids((2, 4, 40) if per_head else (2, 40), -1, 3, seed=5)
    check(P(heads=4, kv_heads=2, dtype=torch.float16), groups, backend, pattern=PATTERNS[pattern])


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("tiles", [((32,), (16,)), ((16,), (32,))])
def test_packed_documents_small_uneven_tiles_interpret(pattern, tiles):
    # contiguous documents, longer than a tile, and padding between them: FULL tiles (inside
    # one document, and for causal wholly below the diagonal) as well as PARTIAL ones
    groups = torch.tensor([[0] * 20 + [-1] * 3 + [1] * 70 + [2] * 11 + [0] * 24])
    check(P(n=128), groups, "interpret", pattern=PATTERNS[pattern], q_tile=tiles[0], k_tile=tiles[1])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tiles", [(16, 16), (16, 32), (32, 16)])
def test_tables_visit_exactly_the_tiles_with_allowed_pairs(causal, tiles):
    """Forward and inverse tables against brute force on the packed sequence: a tile pair is
    listed iff some pair in it is allowed, and marked FULL iff every pair is."""
    from sparseforge.lower.segments import build_scattered_schedule, plan as make_plan

    bm, bn = tiles
    problem = sf.Problem(heads=1, head_dim=16)
    schedule = build_scattered_schedule(sf.Scattered(window_size=1), problem, q_tile=(bm,), k_tile=(bn,),
                                        causal=causal)
    sizes = [1, 40, 3, 17, 64, 2, 33]
    coords = torch.tensor([[0, w] for w, s in enumerate(sizes) for _ in range(s)])
    pl = make_plan(schedule, coords)
    seg = pl.seg.long()
    allowed = (seg[:, None] == seg[None, :]) & (seg[None, :] >= 0)
    if causal:
        allowed &= torch.ones_like(allowed).tril()
    for rows, cols, ptr, idx, full, a in ((bm, bn, "KV_PTR", "KV_IDX", "KV_FULL", allowed),
                                          (bn, bm, "Q_PTR", "Q_IDX", "Q_FULL", allowed.T)):
        p, ix, f = pl.tables[ptr][0], pl.tables[idx], pl.tables[full][0]
        for t in range(len(p) - 1):
            listed = ix[p[t]:p[t + 1]].tolist()
            blocks = a[t * rows:(t + 1) * rows].reshape(rows, -1, cols).permute(1, 0, 2)  # [other tiles, rows, cols]
            want = blocks.flatten(1).any(1).nonzero().flatten().tolist()
            assert sorted(listed) == want, (ptr, t)
            n_full = int(f[t])
            assert all(bool(blocks[j].all()) for j in listed[:n_full]), (full, t)
            assert not any(bool(blocks[j].all()) for j in listed[n_full:]), (full, t)


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
@pytest.mark.parametrize("per_head", [False, True])
def test_plan_reused_across_calls(backend, per_head):
    problem = P(heads=2)
    groups = ids((2, 2, 40) if per_head else (2, 40), -1, 4, seed=6)
    attn = sf.compile(sf.Grouped(causal=True), problem, backend=backend)
    plan = attn.plan(groups)
    assert plan.per_head == per_head and "GroupedPlan" in repr(plan)
    for seed in (0, 1):  # two "layers" with one plan
        q, k, v = qkv(problem, 2, torch.float32, seed)
        with_plan = attn(q, k, v, plan=plan)
        assert torch.equal(with_plan, attn(q, k, v, groups=groups))
        ref = sf.reference_attention(q.double(), k.double(), v.double(), attn.pattern, problem, groups=groups)
        assert rel_err(with_plan, ref) < TOL[torch.float32]


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
def test_one_group_equals_full(backend):
    problem = P()
    q, k, v = qkv(problem, 2, torch.float32)
    full = sf.compile(sf.Full(), problem, backend=backend)(q, k, v)
    grouped = sf.compile(sf.Grouped(), problem, backend=backend)(q, k, v, groups=torch.full((2, 40), 7))
    assert rel_err(grouped, full) < 1e-5


def test_errors():
    problem = P()
    with pytest.raises(sf.UnsupportedPatternError):
        sf.compile(sf.Grouped() | sf.Sink(1), problem)
    with pytest.raises(ValueError, match="grid"):
        sf.compile(sf.Grouped(), sf.Problem(heads=2, head_dim=16))
    attn = sf.compile(sf.Grouped(), problem, backend="cpu")
    assert "Grouped()" in repr(attn)
    q, k, v = qkv(problem, 2, torch.float32)
    with pytest.raises(ValueError, match="exactly one of groups="):
        attn(q, k, v)
    plan = attn.plan(torch.zeros(2, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one of groups="):
        attn(q, k, v, groups=torch.zeros(2, 40, dtype=torch.long), plan=plan)
    with pytest.raises(TypeError, match="GroupedPlan"):
        attn(q, k, v, plan=object())
    with pytest.raises(ValueError, match="plan was made for"):
        attn(q[:1], k[:1], v[:1], plan=plan)
    causal = sf.compile(sf.Grouped(causal=True), problem, backend="cpu")
    with pytest.raises(ValueError, match="plan was made for"):
        causal(q, k, v, plan=plan)
    with pytest.raises(ValueError, match="groups must have shape"):
        attn(q, k, v, groups=torch.zeros(1, 40, dtype=torch.long))
    with pytest.raises(TypeError, match="groups must have an integer dtype"):
        attn(q, k, v, groups=torch.zeros(2, 40))


def test_torch_compile_fullgraph_with_a_plan():
    problem = P()
    attn = sf.compile(sf.Grouped(causal=True), problem, backend="cpu")
    groups = ids((2, 40), -1, 3, seed=7)
    plan = attn.plan(groups)
    q, k, v = qkv(problem, 2, torch.float32, requires_grad=True)
    compiled = torch.compile(lambda q, k, v: attn(q, k, v, plan=plan), fullgraph=True)
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    eager = attn(q, k, v, groups=groups)
    eager_grads = torch.autograd.grad(eager.square().sum(), (q, k, v))
    assert rel_err(out, eager) < 1e-6
    for g, e in zip(grads, eager_grads):
        assert rel_err(g, e) < 1e-5


def test_other_sequence_lengths_run_on_the_same_attention():
    """Segments do not depend on the grid: a Grouped attention compiled for N runs any N."""
    pattern = sf.Grouped(causal=True)
    attn = sf.compile(pattern, sf.Problem(grid=12, heads=2, head_dim=8, dtype=torch.float32), backend="cpu")
    gen = torch.Generator().manual_seed(11)
    for n in (7, 12, 30):
        problem = sf.Problem(grid=n, heads=2, head_dim=8, dtype=torch.float32)
        q, k, v = (torch.randn(2, 2, n, 8, generator=gen) for _ in range(3))
        ids = torch.randint(-1, 3, (2, n), generator=gen)
        got = attn(q, k, v, groups=ids)
        want = sf.reference_attention(q, k, v, pattern, problem, groups=ids)
        assert (got.double() - want).norm() <= 1e-5 * want.norm()
