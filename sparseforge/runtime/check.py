"""Numerics of a compiled attention against the float64 reference, as users (and the
autotuner, before accepting a config) run it: fresh random inputs, the errors of the output,
LSE and the three gradients, and a pass/fail against a tolerance per tensor.

How errors and tolerances are measured (the helpers below are what the tests use too):

- **Per row.** A tensor's error is its largest row error; a row is one vector along the last
  dimension (one query's output or dQ, one key's dK or dV) or one LSE value. A row's error is
  ``||got - want|| / max(||want||, RMS row norm of want)``: relative for ordinary rows, and
  measured against the tensor's typical row where a row is small (an empty query row, a key
  nobody sees), so zero rows need no special case. A single missing key moves its query's row
  by about ``1 / sqrt(keys)`` of the row's norm, which a relative error of the whole tensor
  dilutes by the number of rows (one key in 28 rows ~ 1.6e-3, DESIGN.md "Known pitfalls").
- **From the dtypes and the reduction.** ``tolerance(dtype, terms) = FACTOR * (eps(dtype) +
  eps(acc) * sqrt(terms))``: ``eps`` is a dtype's machine epsilon; ``dtype`` is what the values
  are rounded to (the inputs, the P and dS tiles fed to the tensor cores, the stored result:
  each rounding is relative to its own term, so it adds a few eps(dtype) to a row's relative
  error however long the row's sum); ``acc`` the accumulator (float32, float64 for float64
  inputs), whose rounding errors grow like a random walk over the ``terms`` summed into one
  entry: the keys a query sees (out, dQ, LSE) or the (query, head) rows that see a key (dK,
  dV; all heads of a GQA group sum into one key row), plus head_dim for the dot products that
  make each score (``attention_tolerances``). The LSE is stored in float32 (float64 for
  float64 inputs) and compared at that precision, not at the inputs'.
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch

from ..dsl.problem import DTYPE_NAMES
from ..dsl.semantics import make_context, mask_rows, reference_attention

#: ``c`` in ``tolerance = c * (eps(dtype) + eps(acc) * sqrt(terms))``. Worst rows measured with
#: c = 1: up to ~1.0 for the interpreted Triton kernels (fp16, fp32) and the CPU executor
#: (fp16, bf16), ~1.8 for the CPU executor's fp32 dQ. A typical missing key (a row error of
#: about 1 / sqrt(keys)) fails every output in fp16/fp32, and out, LSE and dV in bf16, where its
#: share of a dQ or dK row is near 4 eps (tests/runtime/test_tolerances.py).
FACTOR = 4.0

OUTPUTS = ("out", "lse", "dq", "dk", "dv")


def machine_eps(dtype: torch.dtype) -> float:
    """The gap between 1 and the next representable number of ``dtype`` (2^-10 for fp16,
    2^-7 for bf16, 2^-23 for fp32, 2^-52 for fp64)."""
    return torch.finfo(dtype).eps


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are accumulated in: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tolerance(dtype: torch.dtype, terms: int, factor: float | None = None) -> float:
    """``factor * (eps(dtype) + eps(acc) * sqrt(terms))`` (``factor`` defaults to ``FACTOR``,
    ``acc`` is ``accumulator(dtype)``): the largest row error (``row_error``) allowed for a
    tensor rounded to ``dtype`` whose entries each accumulate ``terms`` terms."""
    c = FACTOR if factor is None else factor
    return c * (machine_eps(dtype) + machine_eps(accumulator(dtype)) * math.sqrt(max(int(terms), 1)))


def row_errors(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """float64 [rows]: ``||got_r - want_r|| / max(||want_r||, RMS_r ||want_r||, scale_r)`` for
    every row ``r`` (a vector along the last dimension). ``scale`` (one value per row,
    optional) is the size of terms that cancel in the row where the result is a small
    difference of large terms: their rounding errors are what the row's error is measured
    against there. NaN anywhere in ``got`` gives inf; a -inf in either tensor must be matched
    by a -inf in the other (the LSE of an empty row), else that row's error is inf."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        raise ValueError(f"got has shape {tuple(got.shape)}, want has {tuple(want.shape)}")
    width = got.shape[-1] if got.dim() else 1
    got, want = got.reshape(-1, width), want.reshape(-1, width)
    neg_got, neg_want = torch.isneginf(got), torch.isneginf(want)
    bad = (torch.isnan(got) | torch.isposinf(got) | (neg_got != neg_want)).any(-1)
    got = torch.where(neg_want & neg_got, torch.zeros_like(got), got)
    want = torch.where(neg_want, torch.zeros_like(want), want)
    norms = want.norm(dim=-1)
    floor = norms.square().mean().sqrt() if norms.numel() else norms.new_zeros(())
    den = torch.maximum(norms, floor)
    if scale is not None:
        den = torch.maximum(den, scale.detach().double().cpu().reshape(-1))
    num = (got - want).norm(dim=-1)
    err = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), num)
    return torch.where(bad, torch.full_like(err, math.inf), err)


def row_error(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """The largest of ``row_errors`` (0.0 for an empty tensor)."""
    errs = row_errors(got, want, scale)
    return errs.max().item() if errs.numel() else 0.0


def lse_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``row_error`` of two LSEs [..., N] with one value per row (-inf rows must coincide)."""
    return row_error(got.unsqueeze(-1), want.unsqueeze(-1))


def reductions(pattern, problem, *, q=None, k=None, coords=None, routes=None, groups=None,
               kv_groups=None) -> tuple[int, int]:
    """(most keys any query sees, most (query, head) rows that see any one key row), from the
    exact mask; the second counts every head of a GQA group, as they all sum into one dK/dV
    row. ``q``/``k``/``routes``/``coords``/``groups``/``kv_groups`` as for ``dense_mask``
    (a problem with a ``kv_grid`` has Nq query rows and Nk key rows)."""
    ctx = make_context(pattern, problem, q=q, k=k, coords=coords, routes=routes, groups=groups, kv_groups=kv_groups)
    n, nk, group = ctx.tokens, ctx.keys, problem.heads // problem.kv_heads
    per_row = max(1, problem.heads * nk)
    step = max(1, (1 << 24) // per_row)
    keys, seen = 0, None
    for start in range(0, n, step):
        m = mask_rows(pattern, ctx, torch.arange(start, min(start + step, n)))  # [B|1, H, rows, N]
        keys = max(keys, int(m.sum(-1).max()) if m.numel() else 0)
        cols = m.sum(2).reshape(m.shape[0], problem.kv_heads, group, nk).sum(2)  # [B|1, kv_heads, Nk]
        seen = cols if seen is None else seen + cols
    return keys, (int(seen.max()) if seen is not None and seen.numel() else 0)


def attention_tolerances(dtype: torch.dtype, lse_dtype: torch.dtype, keys: int, queries: int, head_dim: int,
                         factor: float | None = None) -> dict[str, float]:
    """Tolerances of ``out``, ``lse``, ``dq``, ``dk``, ``dv`` for attention in ``dtype`` (the
    LSE stored in ``lse_dtype``) where a query sees at most ``keys`` keys and a key row is seen
    by at most ``queries`` (query, head) rows."""
    fwd, bwd = keys + head_dim, queries + head_dim
    return {"out": tolerance(dtype, fwd, factor), "lse": tolerance(lse_dtype, fwd, factor),
            "dq": tolerance(dtype, fwd, factor), "dk": tolerance(dtype, bwd, factor),
            "dv": tolerance(dtype, bwd, factor)}


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """Errors per output (``out``, ``lse``, ``dq``, ``dk``, ``dv``: largest row error, see
    the module doc), the tolerance of each, and the verdict."""

    name: str
    backend: str
    device: str
    dtype: str
    batch: int
    errors: dict[str, float]
    tolerances: dict[str, float]
    seconds: float

    @property
    def passed(self) -> bool:
        return all(e <= self.tolerances[name] for name, e in self.errors.items())

    def as_dict(self) -> dict:
        return dict(dataclasses.asdict(self), passed=self.passed)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (NaN anywhere gives inf; -inf LSE entries must
    match). A whole-tensor error: it dilutes a single bad row; ``row_error`` does not."""
    got, want = got.detach().double(), want.detach().double()
    if torch.isnan(got).any():
        return float("inf")
    neg = torch.isneginf(want)
    if not torch.equal(torch.isneginf(got), neg):
        return float("inf")
    got, want = got[~neg], want[~neg]
    den = want.norm().item()
    num = (got - want).norm().item()
    return num / den if den > 0 else num


def check_numerics(attn, *, batch: int = 1, seed: int = 0, device: str | torch.device | None = None,
                   backward: bool = True) -> CheckResult:
    """Run ``attn`` (a ``CompiledAttention``) and the float64 reference on the same random
    inputs (N(0, 1) rounded to the problem's dtype) on ``device`` (default: CUDA if
    available, else CPU) and compare row by row against ``attention_tolerances``."""
    problem = attn.problem
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape):
        return torch.randn(shape, dtype=torch.float64, generator=gen).to(device=device, dtype=problem.dtype)

    n, nk, d = problem.tokens, problem.kv_tokens, problem.head_dim
    q, k, v = rand(batch, problem.heads, n, d), rand(batch, problem.kv_heads, nk, d), rand(batch, problem.kv_heads, nk, d)
    dout = rand(batch, problem.heads, n, d)
    t0 = time.perf_counter()
    inputs = [t.clone().requires_grad_(backward) for t in (q, k, v)]
    out, lse = attn(*inputs, return_lse=True)
    grads = torch.autograd.grad(out, inputs, dout) if backward else ()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0

    ref_inputs = [t.double().requires_grad_(backward) for t in (q, k, v)]
    ref, ref_lse = reference_attention(*ref_inputs, attn.pattern, problem, return_lse=True)
    errors = {"out": row_error(out, ref), "lse": lse_error(lse, ref_lse)}
    if backward:
        ref_grads = torch.autograd.grad(ref, ref_inputs, dout.double())
        errors.update({name: row_error(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
    keys, queries = reductions(attn.pattern, problem, q=q.cpu(), k=k.cpu())
    tolerances = attention_tolerances(problem.dtype, lse.dtype, keys, queries, d)
    which = attn.backend or ("triton" if device.type == "cuda" else "cpu")
    return CheckResult(attn.name, which, str(device), DTYPE_NAMES[problem.dtype], batch, errors,
                       {name: tolerances[name] for name in errors}, seconds)
