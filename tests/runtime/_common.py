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
    # Row by row too, each output against its own dtype (the LSE is float32 for 16-bit inputs),
    # with every key counted as reduced (an upper bound): a single missing key fails here.
    from sparseforge.runtime import check

    n = q64.shape[-2] if q64.dim() == 4 else q64.shape[0]  # [B, H, N, D] or voxels [N, H, D]
    d, group = q64.shape[-1], q64.shape[1] // k64.shape[1]
    tols = check.attention_tolerances(out.dtype, lse.dtype, n, n * group, d)
    rows = {"out": check.row_error(out, ref), "lse": check.lse_error(lse, ref_lse), "dq": check.row_error(dq, rq),
            "dk": check.row_error(dk, rk), "dv": check.row_error(dv, rv)}
    bad = {name: e for name, e in rows.items() if not e <= tols[name]}
    assert not bad, f"{what}: largest row errors {bad} above {tols}"
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


# -- tolerances from the dtype and the reduction (sparseforge.runtime.check) ------------------
def assert_rows_close(what: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, terms: int,
                      scale: torch.Tensor | None = None) -> float:
    """Every row (last dimension) of ``got`` within ``check.tolerance(dtype, terms)`` of
    ``want`` by ``check.row_errors`` (relative per row, small rows against the tensor's RMS
    row, ``scale`` where terms cancel); returns the largest row error."""
    from sparseforge.runtime import check

    assert got.shape == want.shape, (what, tuple(got.shape), tuple(want.shape))
    errs = check.row_errors(got, want, scale)
    tol = check.tolerance(dtype, terms)
    worst = errs.max().item() if errs.numel() else 0.0
    bad = int((errs > tol).sum()) if errs.numel() else 0
    assert bad == 0, f"{what}: {bad} of {errs.numel()} rows above {tol:.2e} (worst {worst:.2e}, {terms} terms, {dtype})"
    return worst


def linear_members(pattern, coords, pooling: bool) -> torch.Tensor:
    """float64 [N, N]: 1 where voxel j's k/v reach voxel i's query in scattered linear
    attention (same window, or a pooled neighbour window), from ``pattern.window_ids`` alone."""
    ids = torch.as_tensor(pattern.window_ids(coords)).long()
    if not pooling:
        return (ids[:, None, :] == ids[None, :, :]).all(-1).double()
    diff = ids[:, None, :] - ids[None, :, :]
    near = 3 if ids.shape[1] > 2 else 2            # (batch, w_1[, w_2]) pooled by +-1 in w_1, w_2
    same = (diff[..., :1] == 0).all(-1) & (diff[..., 1:near].abs() <= 1).all(-1) & (diff[..., near:] == 0).all(-1)
    return same.double()


def linear_cancellation_scales(q, k, v, dout, pattern, coords, feature_map: str, pooling: bool, eps: float = 1e-6):
    """Where linear attention's dq and dk are small differences of large terms, the size of
    those terms, per row (float64 [N, H] for dq, [N, kv_heads] for dk), and the most voxels
    that reach one query (the sums' length). With den_i = phi(q_i) . S_i + eps:
    dq_i = phi'(q_i) (KV_i dout_i - S_i (dout_i . out_i)) / den_i and
    dk_j = phi'(k_j) sum_i (phi(q_i) / den_i) (dout_i . v_j - dout_i . out_i); in a window
    of one voxel (out ~ v) the two terms cancel to ~eps / den, so the kernels' rounding of
    KV, dKV is relative to the terms, not to the result. Plain float64, dense in N."""
    m = linear_members(pattern, coords, pooling)
    q64, k64, v64, g = (t.detach().double().cpu() for t in (q, k, v, dout))
    h, kvh = q64.shape[1], k64.shape[1]
    k64, v64 = (t.repeat_interleave(h // kvh, dim=1) for t in (k64, v64))

    def phi(x):
        return torch.relu(x) if feature_map == "relu" else torch.where(x > 0, x + 1, torch.exp(x))

    def dphi(x):
        return (x > 0).double() if feature_map == "relu" else torch.where(x > 0, torch.ones_like(x), torch.exp(x))

    sq, sk = torch.zeros(q64.shape[:2], dtype=torch.float64), torch.zeros(k64.shape[:2], dtype=torch.float64)
    for head in range(h):
        fq, fk, vv, gg = phi(q64[:, head]), phi(k64[:, head]), v64[:, head], g[:, head]
        s = m @ fk                                          # S_i [N, D]
        den = (fq * s).sum(-1) + eps
        out = ((fq @ fk.T) * m) @ vv / den[:, None]
        gv = (gg.abs() @ vv.abs().T) * m                    # |dout_i| . |v_j| over reachable j
        go = (gg * out).abs().sum(-1)                       # |dout_i| . |out_i|
        t1, t2 = gv @ fk / den[:, None], s * (go / den)[:, None]
        sq[:, head] = ((t1 + t2) * dphi(q64[:, head])).norm(dim=-1)
        a = fq / den[:, None]
        u1, u2 = gv.T @ a, m.T @ (a * go[:, None])
        sk[:, head] = ((u1 + u2) * dphi(k64[:, head])).norm(dim=-1)
    sk = sk.reshape(sk.shape[0], kvh, h // kvh).sum(-1)
    return sq, sk, int(m.sum(-1).max()) if m.numel() else 0


def assert_linear_matches(what: str, got: dict, want: dict, q, k, v, dout, pattern, coords, feature_map: str,
                          pooling: bool, dtype: torch.dtype) -> dict[str, float]:
    """out, dq, dk, dv of scattered linear attention (``got``/``want``: name -> tensor [N, H, D])
    row by row within ``check.tolerance(dtype, terms)``, terms = the voxels reaching a query
    (times the GQA group for dk/dv) + head_dim; dq and dk measured against the cancelling
    terms (``linear_cancellation_scales``). Returns the largest row error per name."""
    sq, sk, reach = linear_cancellation_scales(q, k, v, dout, pattern, coords, feature_map, pooling)
    group, d = q.shape[1] // k.shape[1], q.shape[-1]
    scales = {"dq": sq, "dk": sk}
    terms = {"out": reach + d, "dq": reach + d, "dk": reach * group + d, "dv": reach * group + d}
    return {name: assert_rows_close(f"{what} {name}", got[name], want[name], dtype, terms[name], scales.get(name))
            for name in got}


def module_reference(module, x: torch.Tensor, grid) -> tuple[torch.Tensor, int]:
    """``sf.nn.SparseAttention.forward`` with the float64 reference attention in place of the
    compiled one, its result rounded to the dtype the module's attention gets (projections run
    as in the module, under autocast if active). Returns (output, the most terms summed into
    one output entry: keys per query + head_dim for the attention, + dim for the projection)."""
    import math

    from sparseforge.runtime import check

    b, c = x.shape[0], x.shape[-1]
    n = math.prod(grid)
    h, kvh, d = module.heads, module.kv_heads, module.head_dim
    q, k, v = module.project(x, grid)
    problem = sf.Problem(grid=grid, heads=h, head_dim=d, dtype=q.dtype, kv_heads=kvh)
    with torch.autocast(x.device.type, enabled=False):
        q64, k64, v64 = q.double(), k.double(), v.double()
        out = sf.reference_attention(q64, k64, v64, module.pattern, problem).to(q.dtype)
        keys, _ = check.reductions(module.pattern, problem, q=q64, k=k64)
    out = out.transpose(1, 2).reshape(b, n, c)
    return module.proj(out).reshape(x.shape), keys + d + c
