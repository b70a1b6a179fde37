"""Compiled routed-region attention (BiFormer, ``sf.Routed``): the CPU executor and the
generated Triton kernels under the interpreter against the float64 reference (out, LSE,
dq/dk/dv), routing computed inside or given, ragged and non-power-of-two regions, GQA,
per-head routing; bad routes; the custom op under opcheck."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo  # noqa: F401  (imports triton.language before any kernel loads, as torch users do)

import sparseforge as sf
from sparseforge import compile

from ._common import (KERNEL_TOL, TOL, assert_gradients_match, assert_rows_close, module_reference, opcheck_attention,
                      qkv, rand, rel_err)


def P(grid, heads=2, head_dim=16, kv_heads=None, dtype=torch.float32):
    return sf.Problem(grid=grid, heads=heads, head_dim=head_dim, dtype=dtype, kv_heads=kv_heads)


def check(pattern, problem, backend, *, batch=1, routes=None, ref_pattern=None, seed=0, dtype=None):
    """Run ``compile(pattern)`` and the float64 reference on the same inputs; return errors."""
    dtype = problem.dtype if dtype is None else dtype
    attn = compile(pattern, problem, backend=backend)
    q, k, v = qkv(problem, batch, dtype, seed, requires_grad=True)
    out, lse = attn(q, k, v, return_lse=True, routes=routes)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == q.shape[:3]
    dout = rand(out.shape, dtype, torch.Generator().manual_seed(seed + 1))

    def reference(q64, k64, v64):
        if ref_pattern is None:
            return sf.reference_attention(q64, k64, v64, pattern, problem, return_lse=True, routes=routes)
        return sf.reference_attention(q64, k64, v64, ref_pattern, problem, return_lse=True)
    return assert_gradients_match(f"{pattern!r} on {problem!r} ({backend})", (q, k, v), out, lse, dout, reference,
                                  TOL[dtype] if backend == "cpu" else KERNEL_TOL[dtype])


# (pattern, problem): small shapes; the interpreter costs ~0.1 s per visited tile.
CASES = {
    "shared_ragged_gqa": (sf.Routed((4, 4), 2), P((10, 13), heads=2, kv_heads=1)),
    "per_head_non_pow2_gqa": (sf.Routed((3, 5), 3, per_head=True), P((6, 10), heads=2, kv_heads=1)),
    "topk1": (sf.Routed((4, 4), 1), P((8, 8), heads=1)),
    "one_d_large_region": (sf.Routed(24, 2), P(50, heads=1)),
}


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_with_computed_routes(case, backend):
    pattern, problem = CASES[case]
    check(pattern, problem, backend)


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
def test_topk_all_regions_is_full_attention(backend):
    problem = P((8, 6), heads=2, kv_heads=1)
    check(sf.Routed((4, 3), 4), problem, backend, ref_pattern=sf.Full())
    # per_head with every region routed: still Full, on every head.
    check(sf.Routed((4, 3), 4, per_head=True), problem, "cpu", ref_pattern=sf.Full())


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
def test_given_routes_differ_per_batch_element(backend):
    """Batch 2 with different routes per element (and per head), duplicates included:
    routes are a set, a duplicate region is attended once."""
    pattern, problem = sf.Routed((2, 4), 2, per_head=True), P((4, 8), heads=2)  # R = 4 regions
    routes = torch.tensor([[[[0, 1], [2, 2], [3, 0], [1, 3]], [[1, 2], [0, 3], [3, 3], [2, 0]]],
                           [[[3, 2], [1, 0], [0, 0], [2, 1]], [[0, 1], [1, 2], [2, 3], [3, 0]]]])
    check(pattern, problem, backend, batch=2, routes=routes)
    # int32 and shared [B, R, topk] routes are accepted too.
    shared = routes[:, 0].to(torch.int32)
    check(sf.Routed((2, 4), 2), problem, backend, batch=2, routes=shared)


def test_given_routes_equal_to_computed_ones_give_the_same_result():
    pattern, problem = sf.Routed((4, 4), 2), P((8, 12), heads=2, kv_heads=1)
    attn = compile(pattern, problem, backend="cpu")
    q, k, v = qkv(problem, 2, seed=5)
    k_rep = k.repeat_interleave(2, dim=1)
    routes = pattern.routes(q.double(), k_rep.double(), problem.grid)
    assert routes.shape == (2, 1, 6, 2)
    assert torch.equal(attn(q, k, v), attn(q, k, v, routes=routes))
    # another routing gives another result
    other = (routes + 1) % 6
    assert not torch.allclose(attn(q, k, v), attn(q, k, v, routes=other))


def test_fp16_kernels():
    pattern, problem = sf.Routed((4, 4), 2), P((8, 8), heads=1, dtype=torch.float16)
    check(pattern, problem, "interpret")


def test_user_api_shapes_and_names():
    attn = sf.compile(sf.Routed(region_size=(8, 8), topk=4),
                      sf.Problem(grid=(64, 64), heads=8, head_dim=32, dtype=torch.bfloat16))
    g = attn.schedule.geometry
    assert g.q_tile == (8, 8) and g.k_tile == (4, 8)  # one region per query tile: wgmma rows
    assert attn.name.startswith("routed_r8_k4_g64x64_h8_d32_bf16")
    src = attn.source("fwd")
    assert "Routed((8, 8), 4)" in src and "GROUP_STRIDE_B = tl.constexpr(8)" in src


# -- bad inputs ------------------------------------------------------------------------------
def _attn():
    pattern, problem = sf.Routed((2, 4), 2), P((4, 8), heads=2)
    return compile(pattern, problem, backend="cpu"), qkv(problem, 2)


@pytest.mark.parametrize("routes, error, match", [
    (torch.zeros(2, 4, 2), TypeError, r"routes must be an int32/int64 tensor"),
    (torch.zeros(2, 4, dtype=torch.long), ValueError,
     r"routes must have shape \[B, \(H,\) R=4, topk=2\], got \(2, 4\)"),
    (torch.zeros(2, 5, 2, dtype=torch.long), ValueError, r"R=4, topk=2\], got \(2, 1, 5, 2\)"),
    (torch.zeros(2, 4, 3, dtype=torch.long), ValueError, r"R=4, topk=2\], got \(2, 1, 4, 3\)"),
    (torch.zeros(3, 4, 2, dtype=torch.long), ValueError, r"got \(3, 1, 4, 2\)"),
    (torch.zeros(2, 3, 4, 2, dtype=torch.long), ValueError, r"got \(2, 3, 4, 2\)"),
    (torch.full((2, 4, 2), 4), ValueError, r"routes must index regions in \[0, 4\), got values in \[4, 4\]"),
    (torch.full((2, 4, 2), -1), ValueError, r"routes must index regions in \[0, 4\)"),
], ids=["float", "rank2", "regions", "topk", "batch", "heads", "too_big", "negative"])
def test_bad_routes_are_named(routes, error, match):
    attn, (q, k, v) = _attn()
    with pytest.raises(error, match=match):
        attn(q, k, v, routes=routes)


def test_topk_larger_than_regions_and_other_misuse():
    with pytest.raises(ValueError, match=r"topk=5 is larger than the number of regions 4"):
        compile(sf.Routed((2, 4), 5), P((4, 8)))
    with pytest.raises(ValueError, match=r"q_tile=\(4, 4\) must have power-of-two extents dividing the padded "
                                         r"region 2 in dimension 0"):
        compile(sf.Routed((2, 4), 2), P((4, 8)), q_tile=(4, 4))
    with pytest.raises(ValueError, match="autotune=True chooses the tiles"):
        compile(sf.Routed((2, 4), 2), P((4, 8)), autotune=True, q_tile=(2, 4))
    attn = compile(sf.Full(), P((4, 8)), backend="cpu")
    q, k, v = qkv(P((4, 8)), 1)
    with pytest.raises(ValueError, match="routes is only for Routed patterns"):
        attn(q, k, v, routes=torch.zeros(1, 4, 2, dtype=torch.long))


# -- the op ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32], ids=["fp32"])
def test_opcheck(dtype):
    pattern, problem = sf.Routed((2, 3), 2, per_head=True), P((4, 6), heads=2, kv_heads=1)
    attn = compile(pattern, problem, backend="cpu")
    q, k, v = qkv(problem, 2, dtype, requires_grad=True)
    routes = torch.tensor([[0, 1], [2, 3], [1, 1], [3, 0]]).expand(2, 2, 4, 2).contiguous()
    opcheck_attention(attn, q, k, v, dtype, routes=routes)


def test_lse_gradient_flows():
    """return_lse and a loss on the LSE: the LSE gradient matches the reference (kernels too)."""
    pattern, problem = sf.Routed((4, 4), 2), P((8, 8), heads=1)
    for backend in ("cpu", "interpret"):
        attn = compile(pattern, problem, backend=backend)
        q, k, v = qkv(problem, 1, requires_grad=True)
        out, lse = attn(q, k, v, return_lse=True)
        (out.sum() + lse.sum()).backward()
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref, ref_lse = sf.reference_attention(q64, k64, v64, pattern, problem, return_lse=True)
        (ref.sum() + ref_lse.sum()).backward()
        for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
            assert rel_err(got, want) < KERNEL_TOL[torch.float32], backend


def test_torch_compile():
    import torch._dynamo

    torch._dynamo.reset()
    pattern, problem = sf.Routed((4, 4), 2), P((8, 8), heads=2)
    attn = compile(pattern, problem, backend="cpu")
    q, k, v = qkv(problem, 1)
    routes = torch.tensor([[[0, 1], [1, 2], [2, 3], [3, 0]]])
    fn = torch.compile(lambda q, k, v, r: attn(q, k, v, routes=r), backend="eager")
    assert torch.allclose(fn(q, k, v, routes), attn(q, k, v, routes=routes))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_kernels_on_gpu(dtype):
    """The generated kernels on a GPU (tables built on the device), the user-facing shape."""
    pattern = sf.Routed(region_size=(8, 8), topk=4)
    problem = sf.Problem(grid=(64, 64), heads=8, head_dim=32, dtype=dtype)
    attn = compile(pattern, problem)
    q, k, v = (t.cuda().requires_grad_() for t in qkv(problem, 2, dtype))
    out, lse = attn(q, k, v, return_lse=True)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = sf.reference_attention(q64, k64, v64, pattern, problem)
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    bound = 3 * TOL[dtype]
    for got, want in ((out, ref), (dq, rq), (dk, rk), (dv, rv)):
        assert rel_err(got.cpu(), want.cpu()) < bound


def test_cpu_executor_gathers_about_one_k_per_chunk_and_explicit_tiles():
    """Memory stays O(input): a chunk's gathered keys per (batch, head) are about N, however
    many routes; explicit (smaller) tiles give the same result as the defaults."""
    from sparseforge.lower.paths import ROUTED, Shape
    from sparseforge.lower.routed import routes_for

    pattern, problem = sf.Routed((2, 4), 4), P((8, 8), heads=2)
    attn = compile(pattern, problem, backend="cpu")
    small = compile(pattern, problem, backend="cpu", q_tile=(2, 2), k_tile=(1, 4))
    assert small.schedule.geometry.q_tile == (2, 2)
    q, k, v = qkv(problem, 2)
    routes = routes_for(pattern, problem, q, k)
    for chunk in ROUTED.chunks(attn.schedule, [routes], Shape(2, 2, 2, problem.tokens), q.device):
        assert chunk.k_rows.shape[2] * chunk.k_rows.shape[3] <= problem.tokens
    assert rel_err(small(q, k, v), attn(q, k, v)) < TOL[torch.float32]


def test_nn_module():
    """The module end to end (routing computed inside the op): output and input gradient
    match the module computed with the float64 reference attention, row by row."""
    torch.manual_seed(0)
    m = sf.nn.SparseAttention(sf.Routed((2, 4), 2), dim=32, heads=2)
    x = rand((2, 4, 8, 32), torch.float32, torch.Generator().manual_seed(1), requires_grad=True)
    y = m(x)
    want, terms = module_reference(m, x, (4, 8))
    assert_rows_close("y", y, want, torch.float32, terms)
    dy = rand(y.shape, torch.float32, torch.Generator().manual_seed(2))
    (gx,), (wx,) = torch.autograd.grad(y, x, dy), torch.autograd.grad(want, x, dy)
    assert_rows_close("dx", gx, wx, torch.float32, terms)


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
def test_very_negative_scores_with_padding_keys_stay_finite(backend):
    """Every allowed score near -100 (LSE < -88): a padding key row's exp(0 - LSE) overflows
    fp32, so the kernels must mask padding keys in dQ too (0 * inf would be NaN)."""
    pattern, problem = sf.Routed((4, 4), 1), P((6, 6), heads=1)  # ragged regions: padding keys
    gen = torch.Generator().manual_seed(7)
    n, d = problem.tokens, problem.head_dim
    q = (5 + 0.1 * torch.randn(1, 1, n, d, generator=gen, dtype=torch.float64)).float().requires_grad_()
    k = (-5 + 0.1 * torch.randn(1, 1, n, d, generator=gen, dtype=torch.float64)).float().requires_grad_()
    v = torch.randn(1, 1, n, d, generator=gen, dtype=torch.float64).float().requires_grad_()
    attn = compile(pattern, problem, backend=backend)
    out = attn(q, k, v)
    dout = rand(out.shape, torch.float32, gen)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = sf.reference_attention(q64, k64, v64, pattern, problem)
    want = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    assert rel_err(out, ref) < KERNEL_TOL[torch.float32]
    for got, w in zip(grads, want):
        assert torch.isfinite(got).all() and rel_err(got, w) < 1e-4


# -- the meta device: shapes propagate, values are refused where the exact mask needs them ------
@pytest.mark.parametrize("case", ["computed", "given", "given_per_head", "per_head_gqa"])
def test_meta_tensors_propagate_shapes(case):
    """Routing inside the call and given routes on ``meta`` (e.g. a model built on the meta
    device): out, LSE and gradients get their shapes, no value is asked for."""
    per_head = case in ("given_per_head", "per_head_gqa")
    pattern = sf.Routed((4, 4), 2, per_head=per_head)
    problem = P((8, 8), heads=2, kv_heads=1 if case == "per_head_gqa" else None)
    attn = compile(pattern, problem, backend="cpu")
    q = torch.empty(3, 2, 64, 16, device="meta", requires_grad=True)
    k, v = (torch.empty(3, problem.kv_heads, 64, 16, device="meta", requires_grad=True) for _ in range(2))
    routes = {"given": torch.empty(3, 4, 2, dtype=torch.long, device="meta"),
              "given_per_head": torch.empty(3, 2, 4, 2, dtype=torch.int32, device="meta")}.get(case)
    out, lse = attn(q, k, v, return_lse=True, routes=routes)
    assert out.device.type == lse.device.type == "meta"
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (3, 2, 64)
    (out.sum() + lse.sum()).backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
    real = qkv(problem, 3)
    expected = pattern.routes(real[0], real[1], problem.grid)
    got = pattern.routes(q, k, problem.grid)
    assert got.device.type == "meta" and got.shape == expected.shape and got.dtype == expected.dtype


def test_meta_routes_still_have_their_dtype_and_shape_checked():
    attn, (q, k, v) = _attn()
    q, k, v = (t.to("meta") for t in (q, k, v))
    with pytest.raises(TypeError, match=r"routes must be an int32/int64 tensor"):
        attn(q, k, v, routes=torch.empty(2, 4, 2, device="meta"))
    with pytest.raises(ValueError, match=r"routes must have shape \[B, \(H,\) R=4, topk=2\], got \(2, 1, 5, 2\)"):
        attn(q, k, v, routes=torch.empty(2, 5, 2, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match=r"routes is on cpu but q is on meta"):
        attn(q, k, v, routes=torch.zeros(2, 4, 2, dtype=torch.long))


def test_exact_mask_on_meta_is_refused_naming_the_argument():
    pattern, problem = sf.Routed((2, 4), 2), P((4, 8), heads=2)
    q, k, v = qkv(problem, 2)
    with pytest.raises(ValueError, match=r"^routes is on the meta device, but the exact mask of Routed\(\(2, 4\), 2\) "
                                         r"\(dense_mask, reference_attention\) needs its values"):
        sf.reference_attention(q, k, v, pattern, problem, routes=torch.empty(2, 4, 2, dtype=torch.long, device="meta"))
    for name in ("q", "k"):
        meta = {"q": q, "k": k, name: (q if name == "q" else k).to("meta")}
        with pytest.raises(ValueError, match=rf"^{name} is on the meta device, but routing on content .* needs its "
                                             r"values: pass q and k holding data"):
            sf.dense_mask(pattern, problem, **meta)
