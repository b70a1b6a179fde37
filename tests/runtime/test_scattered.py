"""Compiled scattered voxel-window attention (SST / DSVT, ``sf.Scattered``): the CPU
executor and the generated Triton kernels under the interpreter against the float64
reference (out, LSE, dq/dk/dv) on voxel layout [N, H, D]; empty windows, single-voxel and
all-in-one windows, several batch elements, shifts, 1-D/2-D/3-D coordinates, GQA; plan
reuse; bad inputs; the custom op under opcheck."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo  # noqa: F401  (imports triton.language before any kernel loads, as torch users do)

import sparseforge as sf
from sparseforge import compile

from ._common import KERNEL_TOL, TOL, assert_gradients_match, coords_of, opcheck_attention, rand, rel_err, voxel_qkv


def P(heads=2, head_dim=16, kv_heads=None, dtype=torch.float32):
    return sf.Problem(heads=heads, head_dim=head_dim, dtype=dtype, kv_heads=kv_heads)


def check(pattern, problem, coords, backend, *, dtype=None, seed=0, q_tile=None, k_tile=None):
    dtype = problem.dtype if dtype is None else dtype
    attn = compile(pattern, problem, backend=backend, q_tile=q_tile, k_tile=k_tile)
    n = coords.shape[0]
    q, k, v = voxel_qkv(problem, n, dtype, seed)
    out, lse = attn(q, k, v, coords=coords, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (n, problem.heads)
    dout = rand(out.shape, dtype, torch.Generator().manual_seed(seed + 1))
    assert_gradients_match(
        f"{pattern!r} on {problem!r} ({backend})", (q, k, v), out, lse, dout,
        lambda q64, k64, v64: sf.reference_attention(q64, k64, v64, pattern, problem, coords=coords, return_lse=True),
        TOL[dtype] if backend == "cpu" else KERNEL_TOL[dtype])
    return attn


def _empty_windows(gen):
    # 60 voxels in a 200 x 200 x 10 volume cut into 8 x 8 x 4 windows: almost every window empty
    return sf.Scattered((8, 8, 4)), coords_of(60, (200, 200, 10), 2, gen)


def _single_voxel_window(gen):
    c = coords_of(80, (8, 8), 1, gen)
    c = torch.cat([c, torch.tensor([[0, 40, 40]])])  # alone in its window
    return sf.Scattered((4, 4)), c


def _one_window(gen):
    return sf.Scattered((64, 64)), coords_of(150, (30, 30), 1, gen)


def _batches_shifted_2d(gen):
    return sf.Scattered((5, 3), shift=(2, 1)), coords_of(170, (16, 12), 3, gen)


def _shifted_3d(gen):
    return sf.Scattered((12, 12, 1), shift=(6, 6, 0)), coords_of(160, (30, 30, 3), 2, gen)


def _one_d(gen):
    return sf.Scattered(7, shift=3), coords_of(120, (60,), 2, gen)


CASES = {"empty_windows": _empty_windows, "single_voxel_window": _single_voxel_window, "one_window": _one_window,
         "batches_shifted_2d": _batches_shifted_2d, "shifted_3d": _shifted_3d, "one_d": _one_d}


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(case, backend):
    pattern, coords = CASES[case](torch.Generator().manual_seed(len(case)))
    check(pattern, P(), coords, backend)


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
@pytest.mark.parametrize("case", ["shifted_3d", "single_voxel_window"])
def test_matches_reference_fp16_gqa(case, backend):
    pattern, coords = CASES[case](torch.Generator().manual_seed(7))
    check(pattern, P(heads=4, head_dim=32, kv_heads=2, dtype=torch.float16), coords, backend)


def test_small_tiles_and_float64_on_cpu():
    pattern, coords = _batches_shifted_2d(torch.Generator().manual_seed(3))
    check(pattern, P(), coords, "cpu", q_tile=(16,), k_tile=(64,))
    check(pattern, P(), coords, "cpu", dtype=torch.float64)


def test_one_giant_window_interpret_uneven_tiles():
    pattern, coords = sf.Scattered(10 ** 6), coords_of(300, (100, 100), 1, torch.Generator().manual_seed(5))
    check(pattern, P(), coords, "interpret", q_tile=(64,), k_tile=(32,))


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
def test_plan_reuse_gives_identical_results(backend):
    pattern, coords = _shifted_3d(torch.Generator().manual_seed(1))
    problem = P()
    attn = compile(pattern, problem, backend=backend)
    plan = attn.plan(coords)
    assert plan.n_voxels == coords.shape[0] and plan.n_windows >= 2
    for seed in (0, 1):  # two "layers" sharing the windows
        q, k, v = voxel_qkv(problem, coords.shape[0], torch.float32, seed, requires_grad=False)
        a = attn(q, k, v, coords=coords)
        b = attn(q, k, v, plan=plan)
        c = attn(q, k, v, plan=plan)
        assert torch.equal(a, b) and torch.equal(b, c)


def test_bad_inputs_name_the_argument():
    pattern, coords = _batches_shifted_2d(torch.Generator().manual_seed(0))
    problem = P()
    attn = compile(pattern, problem, backend="cpu")
    n = coords.shape[0]
    q, k, v = voxel_qkv(problem, n, torch.float32, 0, requires_grad=False)
    with pytest.raises(TypeError, match="coords must have an integer dtype"):
        attn(q, k, v, coords=coords.float())
    with pytest.raises(ValueError, match=r"coords must have shape \[N, 1 \+ ndim\]"):
        attn(q, k, v, coords=coords[:, :, None])
    with pytest.raises(ValueError, match="coords must be non-negative"):
        attn(q, k, v, coords=coords - 5)
    with pytest.raises(ValueError, match="window_size"):
        attn(q, k, v, coords=coords[:, :2])
    with pytest.raises(ValueError, match=r"q has shape \(169, 2, 16\), expected \(170, 2, 16\)"):
        attn(q[1:], k, v, coords=coords)
    with pytest.raises(ValueError, match=r"v has shape .* expected \(170, 2, 16\)"):
        attn(q, k, v[:, :1], coords=coords)
    with pytest.raises(ValueError, match=r"k must have shape \[N_voxels, H, D\]"):
        attn(q, k[None], v, coords=coords)
    with pytest.raises(ValueError, match="exactly one of coords= .* or plan="):
        attn(q, k, v)
    with pytest.raises(ValueError, match="exactly one of coords="):
        attn(q, k, v, coords=coords, plan=attn.plan(coords))
    with pytest.raises(TypeError, match="plan must be a ScatteredPlan"):
        attn(q, k, v, plan=coords)
    other = compile(sf.Scattered((5, 3)), problem, backend="cpu")
    with pytest.raises(ValueError, match="plan was made for"):
        attn(q, k, v, plan=other.plan(coords))
    with pytest.raises(ValueError, match="routes is only for Routed"):
        attn(q, k, v, coords=coords, routes=torch.zeros(1, 1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="give Problem\\(grid=None\\)"):
        compile(pattern, sf.Problem(grid=(4, 4), heads=2, head_dim=16))
    static = compile(sf.Full(), sf.Problem(grid=8, heads=2, head_dim=16), backend="cpu")
    with pytest.raises(ValueError, match="only for Scattered"):
        static.plan(coords)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    pattern, coords = _single_voxel_window(torch.Generator().manual_seed(2))
    problem = P(heads=2, kv_heads=1)
    attn = compile(pattern, problem, backend="cpu")
    q, k, v = voxel_qkv(problem, coords.shape[0], dtype, 0)
    opcheck_attention(attn, q, k, v, dtype, plan=attn.plan(coords))


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
def test_lse_gradient_flows(backend):
    pattern, coords = _batches_shifted_2d(torch.Generator().manual_seed(4))
    problem = P()
    attn = compile(pattern, problem, backend=backend)
    q, k, v = voxel_qkv(problem, coords.shape[0], torch.float32, 0)
    out, lse = attn(q, k, v, coords=coords, return_lse=True)
    (out.sum() + (lse * lse).sum()).backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = sf.reference_attention(q64, k64, v64, pattern, problem, coords=coords, return_lse=True)
    (ref.sum() + (ref_lse * ref_lse).sum()).backward()
    for got, want in ((q, q64), (k, k64), (v, v64)):
        assert rel_err(got.grad, want.grad) < 1e-5


def test_torch_compile_fullgraph_with_a_plan():
    pattern, coords = _batches_shifted_2d(torch.Generator().manual_seed(6))
    problem = P()
    attn = compile(pattern, problem, backend="cpu")
    plan = attn.plan(coords)
    q, k, v = voxel_qkv(problem, coords.shape[0], torch.float32, 0)
    f = torch.compile(lambda q, k, v: attn(q, k, v, plan=plan), fullgraph=True, backend="aot_eager")
    out = f(q, k, v)
    out.sum().backward()
    want = attn(q, k, v, plan=plan)
    assert torch.equal(out, want)
    dq = torch.autograd.grad(want.sum(), q)[0]
    assert torch.equal(q.grad, dq)


def test_save_and_load_round_trip(tmp_path):
    from sparseforge.runtime.build import load, save

    pattern, coords = _shifted_3d(torch.Generator().manual_seed(8))
    attn = compile(pattern, P(), backend="cpu")
    loaded = load(save(attn, tmp_path / "build", targets=()), backend="cpu")
    q, k, v = voxel_qkv(attn.problem, coords.shape[0], torch.float32, 0, requires_grad=False)
    assert loaded.name == attn.name
    assert torch.equal(loaded(q, k, v, coords=coords), attn(q, k, v, coords=coords))
