"""sparseforge.runtime.compile and CompiledAttention: backends, input checking, source."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import sparseforge as sf
from sparseforge import CompiledAttention, UnsupportedPatternError, compile

from ._common import TOL, qkv, rel_err

HAVE_KERNELS = importlib.util.find_spec("sparseforge.backends.triton") is not None
needs_kernels = pytest.mark.skipif(not HAVE_KERNELS, reason="sparseforge.backends.triton not written yet")


def P(grid=(6, 7), heads=2, head_dim=16, kv_heads=None, dtype=torch.float32):
    return sf.Problem(grid=grid, heads=heads, head_dim=head_dim, dtype=dtype, kv_heads=kv_heads)


@pytest.fixture(scope="module")
def attn():
    return compile(sf.Neighborhood(3), P(), q_tile=(2, 4))


def test_attributes(attn):
    assert isinstance(attn, CompiledAttention)
    assert attn.pattern == sf.Neighborhood(3) and attn.problem == P()
    assert attn.backend is None
    assert attn.schedule.geometry.q_tile == (2, 4)
    assert attn.name in repr(attn)
    assert callable(attn.op.default)


def test_call_returns_out_or_out_and_lse(attn):
    q, k, v = qkv(attn.problem, 2)
    out = attn(q, k, v)
    out2, lse = attn(q, k, v, return_lse=True)
    assert torch.equal(out, out2)
    ref, rl = sf.reference_attention(q, k, v, attn.pattern, attn.problem, return_lse=True)
    assert rel_err(out, ref) < TOL[torch.float32] and rel_err(lse, rl) < TOL[torch.float32]


def test_non_contiguous_inputs(attn):
    q, k, v = qkv(attn.problem, 2)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    assert torch.equal(attn(qt, kt, vt), attn(q, k, v))


# -- bad arguments: every error names the argument ------------------------------------------
def test_bad_backend():
    with pytest.raises(ValueError, match=r"backend must be one of \[None, 'triton', 'cpu', 'interpret'\], got 'cuda'"):
        compile(sf.Full(), P(), backend="cuda")


def test_bad_pattern_and_problem_types():
    with pytest.raises(TypeError, match="pattern"):
        compile("Full()", P())
    with pytest.raises(TypeError, match="problem"):
        compile(sf.Full(), (6, 7))


def test_content_dependent_pattern_is_refused_clearly():
    with pytest.raises(UnsupportedPatternError, match="only a Routed or a Scattered pattern on its own"):
        compile(sf.PerHead([sf.Scattered(2), sf.Scattered(4)]), sf.Problem(heads=2))
    with pytest.raises(NotImplementedError):
        compile(sf.Routed(2, topk=1) | sf.Causal(), P((4, 4)))


@pytest.mark.parametrize("backend", ["triton", "interpret"])
def test_unsupported_head_dim_for_triton_backends(backend):
    with pytest.raises(ValueError, match=r"head_dim=24.*\[16, 32, 64, 96, 128, 256\]"):
        compile(sf.Full(), P(head_dim=24), backend=backend)


def test_float64_problem_refused_for_triton_backends():
    with pytest.raises(ValueError, match="dtype"):
        compile(sf.Full(), P(dtype=torch.float64), backend="interpret")


def test_cpu_backend_takes_any_head_dim():
    problem = P(grid=5, head_dim=24)
    a = compile(sf.Causal(), problem, backend="cpu")
    q, k, v = qkv(problem, 1)
    assert rel_err(a(q, k, v), sf.reference_attention(q, k, v, sf.Causal(), problem)) < TOL[torch.float32]


@pytest.mark.parametrize("which, shape, match", [
    ("q", (2, 3, 42, 16), r"q has shape \(2, 3, 42, 16\)"),
    ("q", (2, 2, 41, 16), r"q has shape"),
    ("k", (2, 2, 42, 8), r"k has shape \(2, 2, 42, 8\)"),
    ("v", (2, 2, 42), r"v must have shape \[B, H, N, D\]"),
])
def test_wrong_shapes(attn, which, shape, match):
    q, k, v = qkv(attn.problem, 2)
    args = {"q": q, "k": k, "v": v}
    args[which] = torch.randn(shape)
    with pytest.raises(ValueError, match=match):
        attn(**args)


def test_gqa_shape_expects_kv_heads():
    a = compile(sf.Full(), P(heads=4, kv_heads=2))
    q, k, v = qkv(a.problem, 1)
    with pytest.raises(ValueError, match=r"k has shape .*kv_heads"):
        a(q, q, v)


def test_wrong_dtype(attn):
    q, k, v = qkv(attn.problem, 1, torch.float16)
    with pytest.raises(TypeError, match=r"q has dtype torch.float16, expected torch.float32"):
        attn(q, k, v)
    q32, _, _ = qkv(attn.problem, 1)
    with pytest.raises(TypeError, match="one dtype"):
        attn(q32, k, v)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        attn(q32, [1.0], v)


def test_float64_only_on_cpu_path():
    a = compile(sf.Full(), P(grid=4), backend="interpret")
    q, k, v = qkv(a.problem, 1, torch.float64)
    with pytest.raises(TypeError, match=r"q has dtype torch.float64, expected torch.float32, the dtype"):
        a(q, k, v)
    c = compile(sf.Full(), P(grid=4), backend="cpu")
    assert c(q, k, v).dtype == torch.float64


def test_device_mismatch(attn):
    q, k, v = qkv(attn.problem, 1)
    with pytest.raises(ValueError, match="one device"):
        attn(q, k.to("meta"), v)


def test_triton_backend_on_cpu_tensors_is_refused():
    a = compile(sf.Full(), P(grid=4), backend="triton")
    q, k, v = qkv(a.problem, 1)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        a(q, k, v)


@pytest.mark.parametrize("scale", [float("nan"), "0.1", None.__class__])
def test_bad_scale(attn, scale):
    q, k, v = qkv(attn.problem, 1)
    with pytest.raises(ValueError, match="scale"):
        attn(q, k, v, scale=scale)


def test_bad_source_kind(attn):
    with pytest.raises(ValueError, match="kind"):
        attn.source("bwd")


# -- the generated kernels (skipped until sparseforge.backends.triton exists) ------------------
@needs_kernels
def test_source_generates_without_gpu(attn):
    for kind in ("fwd", "bwd_dq", "bwd_dkdv"):
        src = attn.source(kind)
        assert isinstance(src, str) and "triton" in src


@needs_kernels
def test_interpret_backend_matches_reference():
    pattern, problem = sf.Neighborhood(3) | sf.Sink(2), P((5, 6), heads=2, kv_heads=1)
    a = compile(pattern, problem, backend="interpret", q_tile=(4, 4))
    q, k, v = qkv(problem, 1, requires_grad=True)
    out, lse = a(q, k, v, return_lse=True)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, rl = sf.reference_attention(q64, k64, v64, pattern, problem, return_lse=True)
    want = torch.autograd.grad(ro, (q64, k64, v64), do.double())
    assert rel_err(out, ro) < 1e-4 and rel_err(lse, rl) < 1e-4
    for g, w in zip(grads, want):
        assert rel_err(g, w) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_default_backend_on_cuda_matches_reference():
    pattern = sf.Neighborhood(7, dilation=2)
    problem = sf.Problem(grid=(28, 28), heads=4, head_dim=64, dtype=torch.float16)
    a = compile(pattern, problem)
    q, k, v = (t.cuda() for t in qkv(problem, 2))
    out, lse = a(q, k, v, return_lse=True)
    ref, rl = sf.reference_attention(q.cpu(), k.cpu(), v.cpu(), pattern, problem, return_lse=True)
    assert rel_err(out.cpu(), ref) < 3e-3 and rel_err(lse.cpu(), rl) < 1e-4


def test_interpret_refuses_bf16():
    """Triton 3.9's interpreter multiplies bf16 bit patterns in tl.dot (triton#11584):
    refuse instead of returning garbage."""
    problem = sf.Problem(grid=(8, 8), heads=1, head_dim=16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bf16 cannot run under backend='interpret'"):
        compile(sf.Neighborhood(3), problem, backend="interpret")
    attn = compile(sf.Neighborhood(3), problem, backend="cpu")
    q = torch.randn(1, 1, 64, 16, dtype=torch.bfloat16)
    assert attn(q, q, q).dtype == torch.bfloat16  # the CPU executor runs bf16
