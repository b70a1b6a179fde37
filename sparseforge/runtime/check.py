"""Numerics of a compiled attention against the float64 reference, as users (and the
autotuner, before accepting a config) run it: fresh random inputs, relative errors of the
output, LSE and the three gradients, and a pass/fail against the dtype's tolerance."""
from __future__ import annotations

import dataclasses
import time

import torch

from ..dsl.problem import DTYPE_NAMES
from ..dsl.semantics import reference_attention

#: Relative (Frobenius) error allowed against the float64 reference, per input dtype: the
#: final rounding of outputs and gradients to the dtype dominates.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """Relative errors per output (``out``, ``lse``, ``dq``, ``dk``, ``dv``) and the verdict."""

    name: str
    backend: str
    device: str
    dtype: str
    batch: int
    errors: dict[str, float]
    tolerance: float
    seconds: float

    @property
    def passed(self) -> bool:
        return all(e <= self.tolerance for e in self.errors.values())

    def as_dict(self) -> dict:
        return dict(dataclasses.asdict(self), passed=self.passed)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (NaN anywhere gives inf; -inf LSE entries must match)."""
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
    available, else CPU) and compare."""
    problem = attn.problem
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape):
        return torch.randn(shape, dtype=torch.float64, generator=gen).to(device=device, dtype=problem.dtype)

    n, d = problem.tokens, problem.head_dim
    q, k, v = rand(batch, problem.heads, n, d), rand(batch, problem.kv_heads, n, d), rand(batch, problem.kv_heads, n, d)
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
    errors = {"out": relative_error(out, ref), "lse": relative_error(lse, ref_lse)}
    if backward:
        ref_grads = torch.autograd.grad(ref, ref_inputs, dout.double())
        errors.update({name: relative_error(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
    which = attn.backend or ("triton" if device.type == "cuda" else "cpu")
    return CheckResult(attn.name, which, str(device), DTYPE_NAMES[problem.dtype], batch, errors,
                       TOLERANCE[problem.dtype], seconds)
