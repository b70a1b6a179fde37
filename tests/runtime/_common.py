"""Helpers shared by the runtime tests: seeded inputs, relative errors, dtype tolerances."""
from __future__ import annotations

import torch

import sparseforge as sf
from sparseforge import compile

# Relative (Frobenius) error allowed against the float64 reference, per input dtype. The
# CPU executor accumulates in fp32 (fp64 for fp64 inputs); the bound is dominated by the
# final rounding of the outputs to the input dtype.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def rand(shape, dtype, gen: torch.Generator, requires_grad: bool = False) -> torch.Tensor:
    """Fresh N(0, 1) values made in float64 then rounded to ``dtype`` (never zeros)."""
    t = torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype)
    return t.requires_grad_(requires_grad)


def qkv(problem: sf.Problem, batch: int = 2, dtype=None, seed: int = 0, requires_grad: bool = False):
    gen = torch.Generator().manual_seed(seed)
    dtype = problem.dtype if dtype is None else dtype
    n, d = problem.tokens, problem.head_dim
    q = rand((batch, problem.heads, n, d), dtype, gen, requires_grad)
    k = rand((batch, problem.kv_heads, n, d), dtype, gen, requires_grad)
    v = rand((batch, problem.kv_heads, n, d), dtype, gen, requires_grad)
    return q, k, v


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, (got.shape, want.shape)
    assert not torch.isnan(got).any(), "NaN in result"
    num = (got - want).norm().item()
    den = want.norm().item()
    return num / den if den > 0 else num


def finite_lse_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative error of two LSEs; -inf entries must coincide."""
    got, want = got.detach().double(), want.detach().double()
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), "LSE = -inf on different rows"
    fin = torch.isfinite(want)
    assert torch.isfinite(got[fin]).all()
    return rel_err(got[fin], want[fin]) if fin.any() else 0.0


def check_executor(pattern, problem: sf.Problem, *, batch=2, dtype=None, q_tile=None, k_tile=None, seed=0,
                   scale=None, tol=None):
    """Run the compiled CPU op and the float64 reference on the same (rounded) inputs;
    compare out, LSE and dq/dk/dv. Returns the errors as a dict."""
    dtype = problem.dtype if dtype is None else dtype
    attn = compile(pattern, problem, backend="cpu", q_tile=q_tile, k_tile=k_tile)
    q, k, v = qkv(problem, batch, dtype, seed, requires_grad=True)
    out, lse = attn(q, k, v, scale=scale, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.shape == q.shape[:3]
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    dout = rand(out.shape, dtype, torch.Generator().manual_seed(seed + 1))
    return assert_gradients_match(
        f"{pattern!r} on {problem!r} ({dtype})", (q, k, v), out, lse, dout,
        lambda q64, k64, v64: sf.reference_attention(q64, k64, v64, pattern, problem, scale=scale, return_lse=True),
        TOL[dtype] if tol is None else tol)


def assert_gradients_match(what: str, inputs, out, lse, dout, reference, bound: float) -> dict[str, float]:
    """Compare ``out``/``lse`` and the gradients of ``(out * dout).sum()`` w.r.t. ``inputs``
    (q, k, v, requiring grad) with ``reference(q64, k64, v64) -> (ref, ref_lse)`` run in
    float64 on the same values. Asserts every relative error <= ``bound``; returns them."""
    dq, dk, dv = torch.autograd.grad(out, inputs, dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in inputs)
    ref, ref_lse = reference(q64, k64, v64)
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    errs = {"out": rel_err(out, ref), "lse": finite_lse_err(lse, ref_lse),
            "dq": rel_err(dq, rq), "dk": rel_err(dk, rk), "dv": rel_err(dv, rv)}
    for name, grad in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert grad.dtype == out.dtype and not torch.isnan(grad).any(), name
    bad = {name: e for name, e in errs.items() if not e <= bound}
    assert not bad, f"{what}: errors {bad} above {bound}; all: {errs}"
    return errs


# Interpreted Triton kernels accumulate in fp32 like the CPU executor, in another order.
KERNEL_TOL = {torch.float32: 2e-5, torch.float16: 5e-3}


def coords_of(n, extent, batch, gen):
    """n voxels: random batch ids, random coordinates below ``extent`` per dimension."""
    cols = [torch.randint(0, batch, (n, 1), generator=gen)]
    cols += [torch.randint(0, e, (n, 1), generator=gen) for e in extent]
    return torch.cat(cols, 1)


def voxel_qkv(problem, n, dtype, seed, requires_grad=True):
    """Voxel-layout q [n, H, D], k and v [n, kv_heads, D]: fresh N(0, 1) values."""
    gen = torch.Generator().manual_seed(seed)
    d = problem.head_dim
    return (rand((n, problem.heads, d), dtype, gen, requires_grad),
            rand((n, problem.kv_heads, d), dtype, gen, requires_grad),
            rand((n, problem.kv_heads, d), dtype, gen, requires_grad))


def empty_rows(pattern, problem) -> torch.Tensor:
    """bool [H, N]: query rows with no visible key."""
    return ~sf.dense_mask(pattern, problem).any(-1)


def inf_to_zero(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


__all__ = ["KERNEL_TOL", "TOL", "assert_gradients_match", "check_executor", "coords_of", "empty_rows",
           "finite_lse_err", "inf_to_zero", "qkv", "rand", "rel_err", "voxel_qkv"]


def opcheck_attention(attn, q, k, v, dtype, *, routes=None, plan=None, grid=None, scale=0.3):
    """``torch.library.opcheck`` of the forward op and of the backward op (with and without
    an LSE gradient) on the inputs ``attn`` gives them for this call. A Scattered plan's
    voxels are packed into window order first (the op's layout)."""
    from sparseforge.lower.segments import pack

    if plan is not None:
        q, k, v = (pack(t, plan.order, plan.n_pad).detach().requires_grad_(t.requires_grad) for t in (q, k, v))
    args = attn.op_inputs(q, k, v, scale=scale, routes=routes, plan=plan, grid=grid)
    torch.library.opcheck(attn.op.default, args)
    out, lse = attn.op.default(*args)
    gen = torch.Generator().manual_seed(3)
    do, dl = rand(out.shape, dtype, gen), rand(lse.shape, lse.dtype, gen)
    q, k, v, out, lse = (t.detach() for t in (q, k, v, out, lse))
    rest = args[3:]
    torch.library.opcheck(attn.backward_op.default, (q, k, v, out, lse, do, dl, *rest))
    torch.library.opcheck(attn.backward_op.default, (q, k, v, out, lse, do, None, *rest))
