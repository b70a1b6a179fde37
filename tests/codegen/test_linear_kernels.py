"""The Triton kernels of scattered linear attention (``backends.linear_kernels``): numerics
under the Triton interpreter against the float64 oracle ``sf.reference_linear_attention``
(out and dq/dk/dv; relu and elu+1; pooling on/off; fp32/fp16; GQA; single-voxel windows, one
window cut into several chunks, no voxels, padded head dims), that the kernels are what runs
(not the torch ops), memory, and their ahead-of-time compile for sm_80/sm_90 (tensor cores,
no spills) at head dims 32 and 64 in fp16/bf16."""
from __future__ import annotations

import pytest
import torch

import sparseforge as sf
from sparseforge.backends import linear_kernels as lk
from sparseforge.backends import linear as sl
from sparseforge.backends.aot import aot_compile

from tests.runtime._common import assert_linear_matches

from ._aot import TARGETS, Reports, assert_tensor_cores_without_spills


def _coords(n, extent, batch, gen):
    cols = [torch.randint(0, batch, (n, 1), generator=gen)]
    cols += [torch.randint(0, e, (n, 1), generator=gen) for e in extent]
    return torch.cat(cols, 1)


def _rand(shape, dtype, gen, grad=True):
    """Fresh N(0, 1) values rounded to ``dtype`` (never zeros)."""
    return torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype).requires_grad_(grad)


def run(pattern, coords, *, heads=2, kv_heads=None, head_dim=16, dtype=torch.float32, feature_map="relu",
        pooling=False, chunk_rows=sl.CHUNK_ROWS, seed=0, backend="interpret"):
    """Kernel out and dq/dk/dv vs the float64 oracle on the same rounded inputs, row by row
    within tolerances from the dtype's epsilon and the voxels reaching a query
    (``assert_linear_matches``: dq and dk, small differences of large terms in windows of one
    voxel, are measured against those terms). Returns the largest row errors."""
    problem = sf.Problem(heads=heads, head_dim=head_dim, dtype=dtype, kv_heads=kv_heads)
    lin = sf.compile(pattern, problem, attention="linear", feature_map=feature_map, neighbor_pooling=pooling,
                     backend=backend)
    plan = sl.plan(pattern, coords, pooling, chunk_rows=chunk_rows)
    n, gen = coords.shape[0], torch.Generator().manual_seed(seed)
    q = _rand((n, heads, head_dim), dtype, gen)
    k, v = (_rand((n, problem.kv_heads, head_dim), dtype, gen) for _ in range(2))
    out = lin(q, k, v, plan=plan)
    assert out.dtype == dtype and out.shape == q.shape
    dout = _rand(out.shape, dtype, gen, grad=False)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = sf.reference_linear_attention(q64, k64, v64, pattern, coords, feature_map=feature_map,
                                        neighbor_pooling=pooling)
    refs = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    names = ("out", "dq", "dk", "dv")
    for name, got, want in zip(names, (out, *grads), (ref, *refs)):
        assert got.dtype == dtype and got.shape == want.shape and torch.isfinite(got).all(), name
    return assert_linear_matches(f"{feature_map} pooling={pooling} {pattern!r}", dict(zip(names, (out, *grads))),
                                 dict(zip(names, (ref, *refs))), q, k, v, dout, pattern, coords, feature_map,
                                 pooling, dtype)


SMALL = (sf.Scattered((5, 3), shift=(2, 1)), lambda g: _coords(48, (14, 10), 3, g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("pooling", [False, True], ids=["plain", "pooled"])
@pytest.mark.parametrize("feature_map", ["relu", "elu+1"])
def test_interpreted_matches_reference(feature_map, pooling, dtype):
    """Several batch elements, shifted 2-D windows of a few voxels each."""
    pattern, make = SMALL
    coords = make(torch.Generator().manual_seed(1))
    seed = int(pooling) + 2 * (dtype == torch.float16) + 4 * (feature_map == "relu")  # fresh inputs per case
    run(pattern, coords, dtype=dtype, feature_map=feature_map, pooling=pooling, seed=seed)


@pytest.mark.parametrize("kv_heads, dtype, feature_map, pooling", [
    (2, torch.float32, "elu+1", True),
    (1, torch.float16, "relu", False),
], ids=["gqa2_fp32_elu_pooled", "mqa_fp16_relu"])
def test_gqa(kv_heads, dtype, feature_map, pooling):
    """kv_heads < heads: the kernels map q head h to kv head h // group (no repeated k/v);
    head_dim 24 is padded to 32 inside the kernels."""
    coords = _coords(40, (9, 9, 3), 2, torch.Generator().manual_seed(3))
    run(sf.Scattered((4, 4, 2), shift=(2, 2, 0)), coords, heads=4, kv_heads=kv_heads, head_dim=24, dtype=dtype,
        feature_map=feature_map, pooling=pooling)


@pytest.mark.parametrize("pooling", [False, True], ids=["plain", "pooled"])
def test_single_voxel_windows(pooling):
    """Every window holds one voxel (on a lattice of window corners), plus one window of
    three; pooled, the windows see their lattice neighbours."""
    lattice = torch.tensor([[b, 4 * i, 4 * j] for b in range(2) for i in range(4) for j in range(3)])
    coords = torch.cat([lattice, torch.tensor([[0, 1, 1], [0, 2, 3]])])
    run(sf.Scattered((4, 4)), coords, feature_map="elu+1", pooling=pooling, dtype=torch.float16, seed=4)


@pytest.mark.parametrize("dtype, feature_map, pooling", [
    (torch.float32, "relu", True),
    (torch.float16, "elu+1", False),
], ids=["fp32_relu_pooled", "fp16_elu"])
def test_one_giant_window_in_chunks(dtype, feature_map, pooling):
    """All 75 voxels in one window, cut into chunks of 40 rows (40 + 35: partial row blocks,
    chunks added atomically) — the same result as one chunk."""
    pattern, coords = sf.Scattered((64, 64)), _coords(75, (30, 30), 1, torch.Generator().manual_seed(5))
    plan = sl.plan(pattern, coords, pooling, chunk_rows=40)
    assert plan.n_windows == 1 and plan.chunks.n_chunks == 2
    assert plan.chunks.start.tolist() == [0, 40] and plan.chunks.end.tolist() == [40, 75]
    run(pattern, coords, dtype=dtype, feature_map=feature_map, pooling=pooling, chunk_rows=40, seed=5)


def test_degenerate_rows_and_windows_stay_finite():
    """relu, fp16: a window whose keys are all negative (S = 0, KV = 0: den = 1e-6, so the
    backward's phi(q) / den is ~1e6 |q|, past fp16's range unless scaled) and query rows that
    are all negative (phi(q) = 0): out, dq, dk, dv finite and equal to the oracle's."""
    coords = torch.tensor([[0, 0, 0], [0, 1, 1], [0, 2, 0],      # window (0, 0): all keys negative
                           [0, 5, 5], [0, 6, 4], [0, 7, 7], [0, 4, 6]])
    pattern, problem = sf.Scattered((4, 4)), sf.Problem(heads=1, head_dim=16, dtype=torch.float16)
    gen = torch.Generator().manual_seed(12)
    q, k, v = (_rand((7, 1, 16), torch.float64, gen, grad=False) for _ in range(3))
    k[:3] = -k[:3].abs() - 0.1
    q[4] = -q[4].abs() - 0.1                                      # phi(q) = 0 in a normal window
    q, k, v = (t.half().requires_grad_() for t in (q, k, v))
    lin = sf.compile(pattern, problem, attention="linear", backend="interpret")
    out = lin(q, k, v, coords=coords)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = sf.reference_linear_attention(q64, k64, v64, pattern, coords)
    refs = torch.autograd.grad(ref, (q64, k64, v64), torch.ones_like(ref))
    for got, want in zip((out, *grads), (ref, *refs)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=4e-3, atol=4e-3)
    assert (out[:3] == 0).all() and (grads[0][4] == 0).all() and (grads[1][:3] == 0).all()


def test_one_d_coords_and_small_head_dim():
    """1-D windows (pooling over 3 windows), head_dim 8 padded to 16, chunks of 3 rows."""
    coords = _coords(40, (50,), 2, torch.Generator().manual_seed(6))
    run(sf.Scattered(7, shift=3), coords, head_dim=8, feature_map="elu+1", pooling=True, chunk_rows=3, seed=6)


def test_no_voxels_and_one_voxel():
    problem = sf.Problem(heads=2, head_dim=16, dtype=torch.float32)
    lin = sf.compile(sf.Scattered((3, 3)), problem, attention="linear", neighbor_pooling=True, backend="interpret")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (_rand((0, 2, 16), torch.float32, gen) for _ in range(3))
    out = lin(q, k, v, coords=torch.zeros(0, 3, dtype=torch.long))
    assert out.shape == (0, 2, 16)
    assert all(g.shape == (0, 2, 16) for g in torch.autograd.grad(out.sum(), (q, k, v)))
    run(sf.Scattered((3, 3)), torch.tensor([[0, 5, 5]]), pooling=True, feature_map="elu+1")


def test_chunks_cover_every_window():
    """The plan's chunks tile each window's sorted rows exactly, at most chunk_rows each."""
    pattern = sf.Scattered((3, 3), shift=(1, 2))
    coords = _coords(200, (12, 12), 2, torch.Generator().manual_seed(7))
    p = sl.plan(pattern, coords, False, chunk_rows=5)
    ch = p.chunks
    start, end, win, order = ch.start.long(), ch.end.long(), ch.win.long(), ch.order.long()
    assert sorted(order.tolist()) == list(range(200))
    assert (end > start).all() and (end - start <= 5).all() and ch.n_chunks == start.numel()
    assert start[0] == 0 and end[-1] == 200 and torch.equal(start[1:], end[:-1])  # contiguous, in order
    for c in range(ch.n_chunks):  # every row of a chunk lies in the chunk's window
        assert (p.win[order[start[c]:end[c]]] == win[c]).all()
    assert torch.equal(torch.bincount(win, minlength=p.n_windows) > 0, torch.ones(p.n_windows, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk_rows must be an int >= 1"):
        sl.plan(pattern, coords, False, chunk_rows=0)


def test_pooling_matrix_is_symmetric():
    """The kernels' backward pools dKV with the forward matrix: it must equal its transpose."""
    coords = _coords(150, (20, 20, 3), 3, torch.Generator().manual_seed(8))
    p = sl.plan(sf.Scattered((3, 3, 2), shift=(1, 1, 0)), coords, True)
    w = p.n_windows
    dense = torch.zeros(w, w)
    dense[p.pool_index[0], p.pool_index[1]] = 1
    assert dense.sum() > w and torch.equal(dense, dense.T)


def test_the_kernels_run_not_the_torch_ops(monkeypatch):
    """backend='interpret': the torch path raising changes nothing, and all four kernels
    launch (two forward, two backward); backend='cpu' and None on CPU tensors launch none and
    give the torch path's results bit for bit."""
    pattern, make = SMALL
    coords = make(torch.Generator().manual_seed(9))
    problem = sf.Problem(heads=2, head_dim=16, dtype=torch.float32)
    gen = torch.Generator().manual_seed(9)
    q, k, v = (_rand((coords.shape[0], 2, 16), torch.float32, gen) for _ in range(3))
    want = sl.linear_attention(q, k, v, sl.plan(pattern, coords, True), "elu+1")
    launched = []
    real_launch = lk.launch

    def spy(name, *args, **kwargs):
        launched.append(name)
        return real_launch(name, *args, **kwargs)

    def boom(*args, **kwargs):
        raise AssertionError("the torch path ran")

    with monkeypatch.context() as m:
        for name in ("linear_attention", "_segment_outer", "_window_matmul"):
            m.setattr(sl, name, boom)
        m.setattr(lk, "launch", spy)
        lin = sf.compile(pattern, problem, attention="linear", feature_map="elu+1", neighbor_pooling=True,
                         backend="interpret")
        out = lin(q, k, v, coords=coords)
        assert launched == ["lin_fwd_kv", "lin_fwd_out"]
        out.backward(torch.ones_like(out))
        assert launched == ["lin_fwd_kv", "lin_fwd_out", "lin_bwd_q", "lin_bwd_kv"]
        assert (out - want).abs().max() < 1e-5 and not torch.equal(out, want)  # other summation order

    def no_kernels(*args, **kwargs):
        raise AssertionError("a kernel launched on the CPU path")

    with monkeypatch.context() as m:
        m.setattr(lk, "launch", no_kernels)
        for backend in ("cpu", None):
            lin = sf.compile(pattern, problem, attention="linear", feature_map="elu+1", neighbor_pooling=True,
                             backend=backend)
            got = lin(q, k, v, coords=coords)
            assert torch.equal(got, want)
            got.sum().backward()


def test_memory_is_linear_in_voxels_and_windows():
    """No per-voxel [H, D, D] tensor: everything autograd keeps is at most N x H x D or
    W x kv_heads x D x D elements."""
    pattern, coords = sf.Scattered((64, 64)), _coords(64, (30, 30), 1, torch.Generator().manual_seed(10))
    problem = sf.Problem(heads=2, head_dim=16, dtype=torch.float32)
    lin = sf.compile(pattern, problem, attention="linear", backend="interpret", neighbor_pooling=True)
    gen = torch.Generator().manual_seed(10)
    q, k, v = (_rand((64, 2, 16), torch.float32, gen) for _ in range(3))
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lin(q, k, v, coords=coords)
    assert sizes and max(sizes) <= max(64 * 2 * 16, 1 * 2 * 16 * 16) < 64 * 2 * 16 * 16


def test_interpret_refuses_bf16_and_gpu_tensors():
    pattern = SMALL[0]
    with pytest.raises(ValueError, match="bf16 cannot run under backend='interpret'.*11584"):
        sf.compile(pattern, sf.Problem(heads=2, head_dim=16, dtype=torch.bfloat16), attention="linear",
                   backend="interpret")
    with pytest.raises(TypeError, match="bf16, which cannot run under the Triton interpreter"):
        plan = sl.plan(pattern, _coords(4, (4, 4), 1, torch.Generator().manual_seed(0)), False)
        x = torch.randn(4, 2, 16).bfloat16()
        lk.check_kernel_inputs(x, x, x, plan, interpret=True)


# ------------------------------------------------------------------ ahead-of-time compile

AOT = [(torch.float16, 32, "elu+1"), (torch.bfloat16, 32, "relu"), (torch.float16, 64, "relu"),
       (torch.bfloat16, 64, "elu+1")]


AOT_IDS = [f"{d}_hd{h}_{f}".replace("torch.", "") for d, h, f in AOT]


def compile_linear_reports() -> Reports:
    out = Reports()
    out.ids = dict(enumerate(AOT_IDS))
    for i, (dtype, head_dim, feature_map) in enumerate(AOT):
        for name in lk.KERNELS:
            sig, consts, warps = lk.aot_args(name, dtype, head_dim, feature_map)
            for target in TARGETS:
                out[(i, name, target)] = aot_compile(getattr(lk, name), sig, consts, target=target,
                                                     num_warps=warps)
    return out


@pytest.fixture(scope="module")
def reports():
    return compile_linear_reports()


@pytest.mark.parametrize("index", range(len(AOT)), ids=AOT_IDS)
def test_kernels_use_tensor_cores_without_spills(reports, index):
    assert_tensor_cores_without_spills(reports, index, kernels=lk.KERNELS)
    if AOT[index][1] == 64:  # the [D, D] segment outer products are wgmma-sized on sm_90
        assert reports[(index, "lin_fwd_kv", "sm_90")].tensor_core == "wgmma"
        assert reports[(index, "lin_bwd_q", "sm_90")].tensor_core == "wgmma"


# ------------------------------------------------------------------ on a GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pooling", [False, True])
def test_gpu_matches_reference(dtype, pooling):
    gen = torch.Generator().manual_seed(11)
    pattern = sf.Scattered((12, 12, 1), shift=(6, 6, 0))
    coords = _coords(3000, (96, 96, 4), 2, gen)
    problem = sf.Problem(heads=4, head_dim=64, dtype=dtype, kv_heads=2)
    lin = sf.compile(pattern, problem, attention="linear", feature_map="elu+1", neighbor_pooling=pooling)
    q = _rand((3000, 4, 64), dtype, gen).cuda()
    k, v = (_rand((3000, 2, 64), dtype, gen).cuda() for _ in range(2))
    plan = lin.plan(coords.cuda())
    out = lin(q, k, v, plan=plan)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref = sf.reference_linear_attention(q64, k64, v64, pattern, coords, feature_map="elu+1",
                                        neighbor_pooling=pooling)
    refs = torch.autograd.grad(ref, (q64, k64, v64), dout.cpu().double())
    names = ("out", "dq", "dk", "dv")
    assert_linear_matches(f"GPU pooling={pooling}", dict(zip(names, (t.cpu() for t in (out, *grads)))),
                          dict(zip(names, (ref, *refs))), q64, k64, v64, dout.cpu(), pattern, coords,
                          "elu+1", pooling, dtype)
