"""The tolerances of ``sparseforge.runtime.check`` (used by ``sparseforge check``, the
autotuner's ``verify_config`` and the kernel tests): per row, from the dtype's epsilon and the
reduction length. An exact result rounded to the dtype passes; a result missing ONE
(query, key) pair fails on every output, in bf16 too, where a whole-tensor relative error
dilutes it below the dtype's old flat tolerance (DESIGN.md "Known pitfalls")."""
from __future__ import annotations

import math

import pytest
import torch

import sparseforge as sf
from sparseforge.runtime import check

from ._common import rand

PATTERN = sf.Neighborhood(7)
GRID, HEADS, HEAD_DIM = (28, 28), 2, 64
QUERY = 406  # (14, 14), head 0


def typical_key(q, k, mask) -> int:
    """The key of median score among those QUERY sees (head 0): a typical weight, ~1/49.
    (A key of far smaller weight than its row's rounding noise is beyond any test in bf16.)"""
    keys = mask[0, QUERY].nonzero().flatten()
    scores = (q[0, 0, QUERY].double() @ k[0, 0, keys].double().T)
    return int(keys[scores.argsort()[len(keys) // 2]])


def masked_attention(q, k, v, mask, scale):
    """float64 attention under a bool [H, N, N] mask; empty rows give zeros and LSE = -inf."""
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    return p @ v, lse


def mask_of(problem, q=None, k=None):
    """The pattern's mask; given q and k, short of (QUERY, its typical key) on head 0."""
    mask = sf.dense_mask(PATTERN, problem).clone()
    if q is not None:
        mask[0, QUERY, typical_key(q, k, mask)] = False
    return mask


class RoundedReference:
    """A stand-in for a compiled attention: the float64 attention under the pattern's mask
    (or that mask short of one pair), its outputs and gradients rounded to the problem's
    dtype, as an exact kernel would store them."""

    backend = "cpu"

    def __init__(self, problem, drop: bool):
        self.pattern, self.problem, self.name = PATTERN, problem, f"na_{'drop' if drop else 'exact'}"
        self.drop = drop

    def __call__(self, q, k, v, return_lse=False):
        mask = mask_of(self.problem, q.detach(), k.detach()) if self.drop else mask_of(self.problem)
        out, lse = masked_attention(q.double(), k.double(), v.double(), mask, self.problem.head_dim ** -0.5)
        out = out.to(q.dtype)  # autograd rounds dq/dk/dv to the inputs' dtype on the way back
        return (out, lse.float()) if return_lse else out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_rounding_passes_one_missing_key_fails(dtype):
    problem = sf.Problem(grid=GRID, heads=HEADS, head_dim=HEAD_DIM, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    n = problem.tokens
    q, k, v, dout = (rand((1, HEADS, n, HEAD_DIM), dtype, gen) for _ in range(4))
    keys, queries = check.reductions(PATTERN, problem)
    assert keys == 49 and queries > keys  # a border key is seen by more queries (the window shifts inward)
    tol = check.attention_tolerances(dtype, torch.float32, keys, queries, HEAD_DIM)

    def run(drop):
        inputs = [t.double().requires_grad_() for t in (q, k, v)]
        out, lse = masked_attention(*inputs, mask_of(problem, q, k) if drop else mask_of(problem), HEAD_DIM ** -0.5)
        grads = torch.autograd.grad(out, inputs, dout.double())
        return dict(out=out, lse=lse, dq=grads[0], dk=grads[1], dv=grads[2])

    exact, short = run(False), run(True)

    def err(name, got):
        stored = got.float() if name == "lse" else got.to(dtype)  # what a kernel stores
        return (check.lse_error if name == "lse" else check.row_error)(stored, exact[name])

    # In bf16 (8 bits) a typical key's share of dq and dk rows sits near 4 eps: there the
    # forward outputs and dv carry the verdict; in fp16/fp32 every output does.
    flagged = ("out", "lse", "dv") if dtype == torch.bfloat16 else check.OUTPUTS
    for name in check.OUTPUTS:
        assert err(name, exact[name]) <= tol[name] / 2, name      # rounding alone: well inside
        assert err(name, short[name]) > (tol[name] if name in flagged else 0.5 * tol[name]), name
    if dtype == torch.bfloat16:  # the whole-tensor error of the old check hid it
        assert check.relative_error(short["out"].to(dtype), exact["out"]) < 3e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_check_numerics_fails_a_missing_key_and_its_lse_is_fp32(dtype):
    """check_numerics (sparseforge check, the autotuner's verify) end to end on a stand-in
    attention: exact-then-rounded passes, one pair short fails; the LSE tolerance is float32's."""
    problem = sf.Problem(grid=GRID, heads=HEADS, head_dim=HEAD_DIM, dtype=dtype)
    good = check.check_numerics(RoundedReference(problem, drop=False), device="cpu")
    bad = check.check_numerics(RoundedReference(problem, drop=True), device="cpu")
    assert good.passed, good.errors
    assert not bad.passed and all(bad.errors[n] > bad.tolerances[n] for n in ("out", "lse", "dv")), bad.errors
    assert good.tolerances["lse"] < 1e-4 < good.tolerances["out"]
    assert set(good.as_dict()["tolerances"]) == set(check.OUTPUTS)


def test_row_errors_details():
    want = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.3, 0.4]])
    got = want + torch.tensor([[0.0, 0.5], [0.0, 0.1], [0.0, 0.0]])
    rms = math.sqrt((25 + 0 + 0.25) / 3)
    torch.testing.assert_close(check.row_errors(got, want),
                               torch.tensor([0.5 / 5, 0.1 / rms, 0.0], dtype=torch.float64))
    # a scale per row (cancelling terms) raises a small row's denominator
    assert check.row_errors(got, want, torch.tensor([0.0, 10.0, 0.0]))[1].item() == pytest.approx(0.01)
    nan = got.clone()
    nan[2, 0] = float("nan")
    assert check.row_error(nan, want) == math.inf
    lse = torch.tensor([1.0, -math.inf])
    assert check.lse_error(lse, lse) == 0.0 and check.lse_error(torch.tensor([1.0, 0.0]), lse) == math.inf
    assert check.tolerance(torch.float16, 100, factor=1.0) == pytest.approx(2 ** -10 + 2 ** -23 * 10)
