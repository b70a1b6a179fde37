"""The CPU executor (driven by the TileSchedule) against the float64 reference: forward,
LSE and dq/dk/dv, for every static family, combinations, ragged grids, GQA and B > 1."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import sparseforge as sf
from sparseforge.lower.schedule import CSR, build_schedule
from sparseforge.backends import cpu
from sparseforge.lower.paths import STATIC, Shape
from sparseforge import compile

from ._common import TOL, check_executor, empty_rows, inf_to_zero, qkv, rand, rel_err

F32 = torch.float32


def P(grid, heads=2, head_dim=8, kv_heads=None, dtype=F32):
    return sf.Problem(grid=grid, heads=heads, head_dim=head_dim, dtype=dtype, kv_heads=kv_heads)


# (id, pattern, problem, q_tile, k_tile): small tiles so that every grid has several tiles,
# most with padding (extents the tiles do not divide), and q_tile != k_tile somewhere.
CASES = [
    ("na2d", sf.Neighborhood(3), P((7, 9)), (4, 4), (4, 8)),
    ("na2d_dil_stride_causal", sf.Neighborhood((3, 5), dilation=(2, 1), stride=(1, 2), causal=(True, False)),
     P((9, 10)), (2, 4), (4, 4)),
    ("na3d", sf.Neighborhood((2, 3, 3), dilation=(1, 1, 2)), P((4, 5, 6)), (2, 2, 4), (2, 4, 2)),
    ("na1d_gqa", sf.Neighborhood(5, dilation=3), P(40, heads=4, kv_heads=2), (8,), (16,)),
    ("sliding1d", sf.SlidingWindow(3, 2), P(37), (8,), (8,)),
    ("sliding2d", sf.SlidingWindow((1, 2), (2, 0)), P((6, 7)), (4, 4), (2, 4)),
    ("halo", sf.Halo(4, 1), P((10, 9)), (4, 4), (4, 4)),
    ("blocks", sf.Blocks(4), P((9, 10)), (4, 8), (4, 4)),
    ("grid", sf.Grid(3), P((9, 6)), (2, 4), (4, 2)),
    ("full", sf.Full(), P(29), (8,), (16,)),
    ("causal", sf.Causal(), P(37), (8,), (4,)),
    ("sink", sf.Sink(3), P(37), (8,), (8,)),
    ("global", sf.GlobalTokens((0, 5, 20)), P(29), (8,), (8,)),
    ("documents", sf.Documents((5, 12, 3, 9)), P(29), (4,), (8,)),
    ("s2_causal", sf.StridedShards(4, 2, 3), P(50, heads=4), (8,), (8,)),
    ("s2_bidir", sf.StridedShards(4, (1, 2), 3, causal=False), P(50), (8,), (4,)),
    ("s2_gqa_dense", sf.StridedShards(4, 1, 4, dense_heads=1), P(48, heads=4, kv_heads=2), (8,), (8,)),
    ("union", sf.SlidingWindow(4) | sf.Sink(2) | sf.GlobalTokens((17,)), P(41), (8,), (16,)),
    ("union2d", sf.Neighborhood(3) | sf.GlobalTokens((0, 30)), P((7, 8)), (4, 4), (4, 4)),
    ("intersection", sf.Causal() & sf.SlidingWindow(5, 5), P(33), (8,), (8,)),
    ("intersection2d", sf.Blocks(4) & sf.Neighborhood(3, dilation=2), P((8, 9)), (4, 4), (4, 4)),
    ("perhead", sf.PerHead([sf.Neighborhood(3), sf.Blocks(4), sf.Neighborhood(3), sf.Full()]),
     P((8, 7), heads=4), (4, 4), (4, 4)),
    ("perhead_gqa", sf.PerHead([sf.Causal(), sf.Causal(), sf.SlidingWindow(2), sf.Documents((10, 20))]),
     P(30, heads=4, kv_heads=2), (8,), (8,)),
    ("empty_rows", sf.Blocks(4) & sf.GlobalTokens((1,)), P(19), (4,), (8,)),
    # per-group folds: the Grid heads' tiles are folded, the Blocks/Neighborhood heads' are not
    ("perhead_folds", sf.PerHead([sf.Blocks(4), sf.Grid(4), sf.Neighborhood(3), sf.Grid(4)]),
     P((16, 16), heads=4), (4, 4), (4, 4)),
]


@pytest.mark.parametrize("pattern, problem, q_tile, k_tile", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_fp32_matches_reference(pattern, problem, q_tile, k_tile):
    if isinstance(pattern, sf.PerHead) and problem.grid == (16, 16):
        from sparseforge.lower import build_schedule
        assert build_schedule(pattern, problem, q_tile=q_tile, k_tile=k_tile).group_folds is not None
    check_executor(pattern, problem, q_tile=q_tile, k_tile=k_tile)


@pytest.mark.parametrize("pattern, problem", [
    (sf.Neighborhood(7, dilation=2), P((30, 37), heads=2, head_dim=16)),
    (sf.Causal() & (sf.SlidingWindow(100) | sf.Sink(4)), P(700, heads=2, head_dim=16, kv_heads=1)),
], ids=["na2d_30x37", "causal_window_700"])
def test_medium_sizes_default_tiles(pattern, problem):
    """Larger grids with the default 128-token (8x16 on 2-D) tiles."""
    check_executor(pattern, problem, batch=1)


def test_default_tiles_and_batch_one():
    # Default (128-token) tiles: one tile with padding on a small grid.
    check_executor(sf.Neighborhood(5), P((11, 13)), batch=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", ["na2d_dil_stride_causal", "s2_gqa_dense", "perhead", "empty_rows"])
def test_half_dtypes(case, dtype):
    _, pattern, problem, q_tile, k_tile = next(c for c in CASES if c[0] == case)
    problem = dataclasses.replace(problem, dtype=dtype)
    check_executor(pattern, problem, q_tile=q_tile, k_tile=k_tile)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_error_within_factor_of_eager(dtype):
    """The executor's error against float64 is at most a small factor times the error of
    the same math done eagerly in the input dtype (dense mask, matmuls in ``dtype``)."""
    pattern, problem = sf.Neighborhood(3, dilation=2), P((8, 9), dtype=dtype)
    q, k, v = qkv(problem, 2, dtype, seed=3)
    out = compile(pattern, problem, backend="cpu", q_tile=(4, 4))(q, k, v)
    ref = sf.reference_attention(q, k, v, pattern, problem)
    from sparseforge.dsl.semantics import masked_softmax_attention

    mask = sf.dense_mask(pattern, problem)
    eager, _ = masked_softmax_attention(q, k, v, mask, problem.head_dim ** -0.5)
    assert rel_err(out, ref) <= 2 * rel_err(eager, ref)


def test_float64_inputs_are_accepted_on_cpu():
    errs = check_executor(sf.Neighborhood(3), P((6, 7)), dtype=torch.float64, q_tile=(4, 4))
    assert max(errs.values()) < 1e-12


def test_custom_scale():
    check_executor(sf.Halo(3, 1), P((7, 7)), q_tile=(4, 4), scale=0.37)


def test_empty_rows_give_zeros_and_no_nan_grads():
    pattern, problem = sf.Blocks(4) & sf.GlobalTokens((1,)), P(19)
    empty = empty_rows(pattern, problem)
    assert empty.any() and not empty.all()
    attn = compile(pattern, problem, backend="cpu", q_tile=(4,), k_tile=(8,))
    q, k, v = qkv(problem, 2, requires_grad=True)
    out, lse = attn(q, k, v, return_lse=True)
    e = empty[None].expand(2, -1, -1)
    assert torch.equal(out[e], torch.zeros_like(out[e]))
    assert torch.isneginf(lse[e]).all() and torch.isfinite(lse[~e]).all()
    (out.sum() + inf_to_zero(lse).sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[e], torch.zeros_like(q.grad[e]))


def test_everything_empty():
    """A query tile the schedule leaves without key tiles still gets zeros and -inf."""
    pattern, problem = sf.Documents((4, 4)) & sf.GlobalTokens((0,)) & sf.Causal(), P(8)
    attn = compile(pattern, problem, backend="cpu", q_tile=(4,))
    q, k, v = qkv(problem, 1, requires_grad=True)
    out, lse = attn(q, k, v, return_lse=True)
    assert torch.equal(out[:, :, 4:], torch.zeros_like(out[:, :, 4:]))
    assert torch.isneginf(lse[:, :, 4:]).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_lse_gradient_matches_reference():
    pattern, problem = sf.Neighborhood(3) | sf.Sink(2), P((6, 7), heads=4, kv_heads=2)
    attn = compile(pattern, problem, backend="cpu", q_tile=(2, 4), k_tile=(4, 4))
    q, k, v = qkv(problem, 2, requires_grad=True)
    gen = torch.Generator().manual_seed(5)
    do, dl = rand(q.shape, F32, gen), rand(q.shape[:3], F32, gen)
    out, lse = attn(q, k, v, return_lse=True)
    got = torch.autograd.grad((out * do).sum() + (lse * dl).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, rl = sf.reference_attention(q64, k64, v64, pattern, problem, return_lse=True)
    want = torch.autograd.grad((ro * do.double()).sum() + (rl * dl.double()).sum(), (q64, k64, v64))
    for g, w in zip(got, want):
        assert rel_err(g, w) < TOL[F32]


def _chunks(schedule, q, k):
    """The static path's chunks of ``schedule`` for q, k (what the op feeds the executor)."""
    return STATIC.chunks(schedule, [], Shape(q.shape[0], q.shape[1], k.shape[1], q.shape[2]), q.device)


def test_functional_api_matches_op():
    """cpu.forward/backward called directly (what the op wraps)."""
    pattern, problem = sf.Neighborhood(3), P((5, 6))
    sched = build_schedule(pattern, problem, q_tile=(2, 4))
    q, k, v = qkv(problem, 2)
    out, lse = cpu.forward(q, k, v, _chunks(sched, q, k), 0.5)
    ref, rl = sf.reference_attention(q, k, v, pattern, problem, scale=0.5, return_lse=True)
    assert rel_err(out, ref) < TOL[F32] and rel_err(lse, rl) < TOL[F32]
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    dq, dk, dv = cpu.backward(q, k, v, out, lse, do, _chunks(sched, q, k), 0.5)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def _with_forward(sched, forward: CSR):
    return dataclasses.replace(sched, forward=forward)


def test_executor_trusts_the_schedule():
    """A schedule that calls a PARTIAL tile FULL, or drops a visited tile, changes the result:
    the executor really runs the schedule (it does not recompute masks for FULL tiles)."""
    pattern, problem = sf.Neighborhood(3), P((8, 8), heads=1)
    sched = build_schedule(pattern, problem, q_tile=(4, 4))
    q, k, v = qkv(problem, 1)
    ref = sf.reference_attention(q, k, v, pattern, problem)
    good, _ = cpu.forward(q, k, v, _chunks(sched, q, k), problem.head_dim ** -0.5)
    assert rel_err(good, ref) < TOL[F32]

    fwd = sched.forward
    r = int(np.argmax(np.diff(fwd.ptr[0]) > fwd.full[0]))  # a query tile with a PARTIAL tile
    full = fwd.full.copy()
    full[0, r] += 1
    wrong_full = _with_forward(sched, CSR(fwd.ptr, fwd.idx, full))
    bad, _ = cpu.forward(q, k, v, _chunks(wrong_full, q, k), problem.head_dim ** -0.5)
    assert rel_err(bad, ref) > 1e-3

    # drop the last key tile of query tile r
    keep = np.ones(len(fwd.idx), bool)
    keep[fwd.ptr[0, r + 1] - 1] = False
    ptr = fwd.ptr.copy()
    ptr[0, r + 1:] -= 1
    dropped = _with_forward(sched, CSR(ptr, fwd.idx[keep], fwd.full))
    bad, _ = cpu.forward(q, k, v, _chunks(dropped, q, k), problem.head_dim ** -0.5)
    assert rel_err(bad, ref) > 1e-3


@pytest.mark.parametrize("case", ["na2d_dil_stride_causal", "s2_causal", "perhead_gqa", "union2d"])
def test_inverse_schedule_is_transpose_of_forward(case):
    """The backward Triton kernels walk ``schedule.inverse``; it must list exactly the
    forward pairs, with the same FULL/PARTIAL classes."""
    _, pattern, problem, q_tile, k_tile = next(c for c in CASES if c[0] == case)
    s = build_schedule(pattern, problem, q_tile=q_tile, k_tile=k_tile)

    def pairs(csr, rows):
        out = {}
        for g in range(csr.ptr.shape[0]):
            for r in range(rows):
                a, b, f = csr.ptr[g, r], csr.ptr[g, r + 1], csr.full[g, r]
                for j, c in enumerate(csr.idx[a:b]):
                    out[(g, r, int(c))] = j < f
        return out

    fwd = pairs(s.forward, s.geometry.n_q_tiles)
    inv = {(g, r, c): full for (g, c, r), full in pairs(s.inverse, s.geometry.n_k_tiles).items()}
    assert fwd == inv
