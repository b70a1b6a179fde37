"""Scattered voxel-window linear attention (ScatterFormer, ``compile(..., attention="linear")``)
against the float64 oracle ``sf.reference_linear_attention``: out and dq/dk/dv, relu and
elu+1, with and without neighbour pooling; empty windows, single-voxel and all-in-one
windows, several batch elements, shifts, 1-D/2-D/3-D coordinates, GQA; plan reuse; a
hand-checked case pinning the neighbour rule; bad arguments."""
from __future__ import annotations

import pytest
import torch

import sparseforge as sf

from ._common import assert_linear_matches, coords_of, rand, rel_err, voxel_qkv


def P(heads=2, head_dim=8, kv_heads=None, dtype=torch.float32):
    return sf.Problem(heads=heads, head_dim=head_dim, dtype=dtype, kv_heads=kv_heads)


CASES = {
    # 60 voxels in a 200 x 200 x 10 volume, 8 x 8 x 4 windows: almost every window empty
    "empty_windows": lambda g: (sf.Scattered((8, 8, 4)), coords_of(60, (200, 200, 10), 2, g)),
    "single_voxel_window": lambda g: (sf.Scattered((4, 4)),
                                      torch.cat([coords_of(80, (8, 8), 1, g), torch.tensor([[0, 40, 40]])])),
    "one_window": lambda g: (sf.Scattered((64, 64)), coords_of(150, (30, 30), 1, g)),
    "batches_shifted_2d": lambda g: (sf.Scattered((5, 3), shift=(2, 1)), coords_of(170, (16, 12), 3, g)),
    "shifted_3d": lambda g: (sf.Scattered((12, 12, 1), shift=(6, 6, 0)), coords_of(160, (40, 40, 3), 2, g)),
    "one_d": lambda g: (sf.Scattered(7, shift=3), coords_of(120, (60,), 2, g)),
}


def check(pattern, problem, coords, *, feature_map="relu", pooling=False, dtype=None, seed=0):
    """Compiled linear attention vs the float64 oracle on the same (rounded) inputs: out and
    dq/dk/dv of ``(out * dout).sum()``, row by row within tolerances from the dtype's epsilon
    and the voxels reaching a query (``assert_linear_matches``). Where a window's
    ``phi(q) . S`` dwarfs the 1e-6, out hardly depends on q and k (a single-voxel window gives
    out ~ v), so dq and dk are the near-cancelling difference of two large terms: those rows
    are measured against the terms (the hand-checked and gradcheck tests pin exact values).
    Returns the largest row errors."""
    dtype = problem.dtype if dtype is None else dtype
    lin = sf.compile(pattern, problem, attention="linear", feature_map=feature_map, neighbor_pooling=pooling)
    n = coords.shape[0]
    q, k, v = voxel_qkv(problem, n, dtype, seed)
    out = lin(q, k, v, coords=coords)
    assert out.dtype == dtype and out.shape == q.shape
    dout = rand(out.shape, dtype, torch.Generator().manual_seed(seed + 1))
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = sf.reference_linear_attention(q64, k64, v64, pattern, coords, feature_map=feature_map,
                                        neighbor_pooling=pooling)
    refs = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    names = ("out", "dq", "dk", "dv")
    for name, got, want in zip(names, (out, *grads), (ref, *refs)):
        assert got.dtype == dtype and got.shape == want.shape and not torch.isnan(got).any(), name
    return assert_linear_matches(f"linear {feature_map} pooling={pooling} {pattern!r}",
                                 dict(zip(names, (out, *grads))), dict(zip(names, (ref, *refs))), q, k, v, dout,
                                 pattern, coords, feature_map, pooling, dtype)


@pytest.mark.parametrize("pooling", [False, True])
@pytest.mark.parametrize("feature_map", ["relu", "elu+1"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, feature_map, pooling):
    pattern, coords = CASES[case](torch.Generator().manual_seed(len(case)))
    for dtype, seed in ((torch.float64, 0), (torch.float32, 1)):  # fresh inputs per dtype
        check(pattern, P(), coords, feature_map=feature_map, pooling=pooling, dtype=dtype, seed=seed)


@pytest.mark.parametrize("pooling", [False, True])
def test_gqa_and_fp16(pooling):
    pattern, coords = CASES["shifted_3d"](torch.Generator().manual_seed(7))
    check(pattern, P(heads=4, kv_heads=2, head_dim=16), coords, feature_map="elu+1", pooling=pooling)
    check(pattern, P(heads=4, kv_heads=1, dtype=torch.float16), coords, pooling=pooling, seed=3)


@pytest.mark.parametrize("feature_map", ["relu", "elu+1"])
def test_interpret_backend_matches_cpu_backend(feature_map):
    """backend='interpret' (the Triton kernels, backends.linear_kernels) against backend='cpu'
    (torch ops) and the oracle on 3-D shifted windows with pooling and GQA."""
    pattern, coords = CASES["shifted_3d"](torch.Generator().manual_seed(11))
    coords = coords[:60]
    problem = P(heads=4, kv_heads=2, head_dim=16)
    q, k, v = voxel_qkv(problem, 60, torch.float32, 12, requires_grad=False)
    outs = [sf.compile(pattern, problem, attention="linear", feature_map=feature_map, neighbor_pooling=True,
                       backend=backend)(q, k, v, coords=coords) for backend in ("cpu", "interpret")]
    assert rel_err(outs[1], outs[0]) < 1e-5
    ref = sf.reference_linear_attention(q.double(), k.double(), v.double(), pattern, coords,
                                        feature_map=feature_map, neighbor_pooling=True)
    assert rel_err(outs[1], ref) < 1e-5


def test_pooling_changes_results_and_gradcheck():
    pattern, coords = CASES["batches_shifted_2d"](torch.Generator().manual_seed(2))
    problem = P(dtype=torch.float64)
    q, k, v = voxel_qkv(problem, coords.shape[0], torch.float64, 0)
    plain = sf.compile(pattern, problem, attention="linear", feature_map="elu+1")
    pooled = sf.compile(pattern, problem, attention="linear", feature_map="elu+1", neighbor_pooling=True)
    assert rel_err(plain(q, k, v, coords=coords), pooled(q, k, v, coords=coords)) > 1e-2
    small, tiny = coords[:12], P(heads=1, head_dim=3, dtype=torch.float64)
    pooled = sf.compile(pattern, tiny, attention="linear", feature_map="elu+1", neighbor_pooling=True)
    plan = pooled.plan(small)
    assert plan.n_windows >= 2
    args = voxel_qkv(tiny, 12, torch.float64, 5)
    f = lambda q, k, v: pooled(q, k, v, plan=plan)  # noqa: E731
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def test_hand_checked_neighbour_rule():
    """window_size (2, 2, 1), H = D = 1, q = 1, relu: out = sum k v / (sum k + 1e-6) over the
    (pooled) windows."""
    coords = torch.tensor([[0, 0, 0, 0],   # A: batch 0, window (0, 0, 0)   k=1 v=2
                           [0, 2, 3, 0],   # B: batch 0, window (1, 1, 0)   k=3 v=4  diagonal neighbour of A
                           [1, 6, 1, 0],   # C: batch 1, window (3, 0, 0)   k=1 v=10 D's window, other batch
                           [0, 6, 0, 0],   # D: batch 0, window (3, 0, 0)   k=1 v=-7 two windows away from B
                           [0, 1, 1, 1],   # E: batch 0, window (0, 0, 1)   k=2 v=5  other third coordinate
                           [0, 3, 2, 0]])  # F: batch 0, window (1, 1, 0)   k=1 v=0  B's window
    k = torch.tensor([1., 3., 1., 1., 2., 1.], dtype=torch.float64).view(6, 1, 1)
    v = torch.tensor([2., 4., 10., -7., 5., 0.], dtype=torch.float64).view(6, 1, 1)
    q = torch.ones(6, 1, 1, dtype=torch.float64)
    pattern, problem = sf.Scattered((2, 2, 1)), P(heads=1, head_dim=1, dtype=torch.float64)
    eps = 1e-6
    plain = [2 / (1 + eps), 12 / (4 + eps), 10 / (1 + eps), -7 / (1 + eps), 10 / (2 + eps), 12 / (4 + eps)]
    ab = 14 / (5 + eps)  # A + B + F
    pooled = [ab, ab, 10 / (1 + eps), -7 / (1 + eps), 10 / (2 + eps), ab]
    for pool, want in ((False, plain), (True, pooled)):
        want = torch.tensor(want, dtype=torch.float64).view(6, 1, 1)
        got = sf.compile(pattern, problem, attention="linear", neighbor_pooling=pool)(q, k, v, coords=coords)
        ref = sf.reference_linear_attention(q, k, v, pattern, coords, neighbor_pooling=pool)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ref, want, rtol=1e-12, atol=1e-12)
    # no carry across a window-grid row: (0, last) and (1, 0) are not neighbours
    far = torch.tensor([[0, 0, 9, 0], [0, 2, 0, 0]])
    got = sf.compile(pattern, problem, attention="linear", neighbor_pooling=True)(q[:2], k[:2], v[:2], coords=far)
    torch.testing.assert_close(got.flatten(), torch.tensor([2 / (1 + eps), 12 / (3 + eps)], dtype=torch.float64))


def test_no_voxels_and_one_voxel():
    problem = P()
    lin = sf.compile(sf.Scattered((3, 3)), problem, attention="linear", neighbor_pooling=True)
    q, k, v = voxel_qkv(problem, 0, torch.float32, 0)
    out = lin(q, k, v, coords=torch.zeros(0, 3, dtype=torch.long))
    assert out.shape == (0, 2, 8)
    out.sum().backward()
    check(sf.Scattered((3, 3)), problem, torch.tensor([[0, 5, 5]]), pooling=True)


def test_plan_reuse():
    pattern, coords = CASES["shifted_3d"](torch.Generator().manual_seed(1))
    problem = P()
    lin = sf.compile(pattern, problem, attention="linear", neighbor_pooling=True)
    plan = lin.plan(coords)
    assert plan.n_voxels == coords.shape[0] and plan.n_windows >= 2 and plan.neighbors.shape == (plan.n_windows, 9)
    for seed in (0, 1):  # two layers sharing the windows
        q, k, v = voxel_qkv(problem, coords.shape[0], torch.float32, seed, requires_grad=False)
        a, b, c = lin(q, k, v, coords=coords), lin(q, k, v, plan=plan), lin(q, k, v, plan=plan)
        assert torch.equal(a, b) and torch.equal(b, c)
    with pytest.raises(ValueError, match="plan was made for"):
        lin(q, k, v, plan=sf.compile(pattern, problem, attention="linear").plan(coords))
    with pytest.raises(ValueError, match="plan was made for"):
        lin(q, k, v, plan=sf.compile(sf.Scattered((12, 12, 1)), problem, attention="linear",
                                     neighbor_pooling=True).plan(coords))
    with pytest.raises(TypeError, match="plan must be a ScatteredLinearPlan"):
        lin(q, k, v, plan=sf.compile(pattern, problem, backend="cpu").plan(coords))
    with pytest.raises(ValueError, match="exactly one of coords="):
        lin(q, k, v, coords=coords, plan=plan)
    with pytest.raises(ValueError, match="exactly one of coords="):
        lin(q, k, v)


def test_errors_name_the_argument():
    pattern, coords = CASES["batches_shifted_2d"](torch.Generator().manual_seed(0))
    problem = P()
    with pytest.raises(ValueError, match="attention must be one of"):
        sf.compile(pattern, problem, attention="performer")
    with pytest.raises(ValueError, match="feature_map must be one of"):
        sf.compile(pattern, problem, attention="linear", feature_map="gelu")
    with pytest.raises(TypeError, match="neighbor_pooling must be a bool"):
        sf.compile(pattern, problem, attention="linear", neighbor_pooling="yes")
    static = sf.Problem(grid=8, heads=2, head_dim=8)
    with pytest.raises(ValueError, match="attention='linear' is only for Scattered"):
        sf.compile(sf.Full(), static, attention="linear")
    with pytest.raises(ValueError, match="feature_map is only for Scattered"):
        sf.compile(sf.Full(), static, feature_map="relu")
    with pytest.raises(ValueError, match="neighbor_pooling is only for Scattered"):
        sf.compile(sf.Full(), static, neighbor_pooling=True)
    with pytest.raises(ValueError, match="feature_map is only for attention='linear'"):
        sf.compile(pattern, problem, feature_map="relu")
    with pytest.raises(ValueError, match="neighbor_pooling is only for attention='linear'"):
        sf.compile(pattern, problem, neighbor_pooling=False)
    with pytest.raises(ValueError, match="backend must be one of"):
        sf.compile(pattern, problem, attention="linear", backend="cuda")
    with pytest.raises(ValueError, match="dtype=bf16 cannot run under backend='interpret'.*11584"):
        sf.compile(pattern, P(dtype=torch.bfloat16), attention="linear", backend="interpret")
    with pytest.raises(ValueError, match="head_dim=160 is not supported by backend='triton'"):
        sf.compile(pattern, P(head_dim=160), attention="linear", backend="triton")
    with pytest.raises(ValueError, match="dtype=fp64 is not supported by backend='interpret'"):
        sf.compile(pattern, P(dtype=torch.float64), attention="linear", backend="interpret")
    on_gpu = sf.compile(pattern, problem, attention="linear", backend="triton")
    q, k, v = voxel_qkv(problem, coords.shape[0], torch.float32, 0, requires_grad=False)
    with pytest.raises(ValueError, match="compiled with backend='triton' \\(CUDA tensors\\)"):
        on_gpu(q, k, v, coords=coords)
    interp = sf.compile(pattern, problem, attention="linear", backend="interpret")
    with pytest.raises(TypeError, match="q has dtype torch.float64, expected fp32.*runs Triton kernels"):
        interp(q.double(), k.double(), v.double(), coords=coords)
    with pytest.raises(ValueError, match="q_tile is not used"):
        sf.compile(pattern, problem, attention="linear", q_tile=(16,))
    with pytest.raises(ValueError, match="give Problem\\(grid=None\\)"):
        sf.compile(pattern, sf.Problem(grid=(4, 4), heads=2, head_dim=8), attention="linear")
    lin = sf.compile(pattern, problem, attention="linear")
    q, k, v = voxel_qkv(problem, coords.shape[0], torch.float32, 0, requires_grad=False)
    with pytest.raises(ValueError, match="return_lse=True is not available for attention='linear'"):
        lin(q, k, v, coords=coords, return_lse=True)
    with pytest.raises(ValueError, match="scale is not used by attention='linear'"):
        lin(q, k, v, coords=coords, scale=0.5)
    cpu = sf.compile(pattern, problem, attention="linear", backend="cpu")
    assert torch.equal(cpu(q, k, v, coords=coords), lin(q, k, v, coords=coords))
    with pytest.raises(TypeError, match="coords must have an integer dtype"):
        lin(q, k, v, coords=coords.float())
    with pytest.raises(ValueError, match=r"coords must have shape \[N, 1 \+ ndim\]"):
        lin(q, k, v, coords=coords[:, :, None])
    with pytest.raises(ValueError, match="coords must be non-negative"):
        lin(q, k, v, coords=coords - 5)
    with pytest.raises(ValueError, match="window_size"):
        lin(q, k, v, coords=coords[:, :2])
    with pytest.raises(ValueError, match=r"q has shape \(169, 2, 8\), expected \(170, 2, 8\)"):
        lin(q[1:], k, v, coords=coords)
    with pytest.raises(TypeError, match="q has dtype torch.float16"):
        lin(q.half(), k.half(), v.half(), coords=coords)
    with pytest.raises(ValueError, match="feature_map must be one of"):
        sf.reference_linear_attention(q, k, v, pattern, coords, feature_map="tanh")
    with pytest.raises(TypeError, match="coords must have an integer dtype"):
        sf.reference_linear_attention(q, k, v, pattern, coords.float())


@pytest.mark.parametrize("pooling", [False, True], ids=["plain", "pooled"])
def test_opcheck_linear_attention_ops(pooling):
    """The kernels' op pair (``sparseforge::linear_attention`` and its backward) under the
    interpreter: schema, fake tensors and autograd registration."""
    pattern, coords = CASES["batches_shifted_2d"](torch.Generator().manual_seed(6))
    problem = P(heads=2, head_dim=16, kv_heads=1)
    lin = sf.compile(pattern, problem, attention="linear", backend="interpret", neighbor_pooling=pooling)
    plan = lin.plan(coords)
    q, k, v = voxel_qkv(problem, coords.shape[0], torch.float32, 0)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    args = (q, k, v, plan.tensors(), plan.n_windows, "elu+1", True)
    torch.library.opcheck(torch.ops.sparseforge.linear_attention.default, args)
    out, kv, s = torch.ops.sparseforge.linear_attention.default(*args)
    dout = rand(out.shape, torch.float32, torch.Generator().manual_seed(7))
    detached = tuple(t.detach() for t in (q, k, v, out, kv, s))
    torch.library.opcheck(torch.ops.sparseforge.linear_attention_backward.default,
                          (*detached, dout, plan.tensors(), plan.n_windows, "elu+1", True))
