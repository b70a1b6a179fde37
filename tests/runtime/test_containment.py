"""NaN/Inf containment (DESIGN.md, semantics): a query is never affected by a key it may not
see, nor a key's gradients by a query that may not see it, even when their rows hold NaN or
Inf (padding holds garbage in real batches). The float64 reference and the CPU executor, on
every path (static, routed, scattered voxels, grouped tokens); the kernels' side is in
tests/codegen/test_kernels_interpret.py."""
from __future__ import annotations

import pytest
import torch

import sparseforge as sf
from sparseforge.dsl.semantics import allowed_dot, allowed_sum

from ._containment import NAN, INF, assert_contained, clean_positions, make_cases, run

CASES = make_cases()


@pytest.mark.parametrize("case", list(CASES))
def test_reference_is_contained(case):
    """Untainted outputs and gradients of the poisoned inputs equal those of the clean inputs
    (they depend on no poisoned value); keys nobody sees get dk = dv = 0 exactly; a row that
    sees a key whose v is all NaN is NaN (a key a query sees still propagates)."""
    c = CASES[case]
    clean, poisoned, taint, unseen = c.poisoned(torch.float64)
    ref = c.reference()
    want, got = run(ref, *clean), run(ref, *poisoned)
    assert_contained(got, want, clean_positions(*taint), torch.float64, 1)  # tolerance: 4 float64 eps
    for name in ("dk", "dv"):
        assert (got[name][unseen] == 0).all(), name
    mask = c.mask().expand(c.batch, c.problem.heads, c.tokens, c.tokens)
    b, kvh, t = c.keys[0]  # v all NaN
    group = c.problem.heads // c.problem.kv_heads
    sees = mask[b, kvh * group:(kvh + 1) * group, :, t]   # [group, N]
    rows = got["out"][b, kvh * group:(kvh + 1) * group][sees]
    assert len(rows) and torch.isnan(rows).all()


@pytest.mark.parametrize("case", list(CASES))
def test_cpu_executor_is_contained(case):
    """The CPU executor on poisoned inputs: clean outputs and gradients match the reference
    (per element) and are finite; dk = dv = 0 on keys nobody sees."""
    c = CASES[case]
    _, poisoned, taint, unseen = c.poisoned(torch.float32)
    got, want = run(c.compiled("cpu"), *poisoned), run(c.reference(), *poisoned)
    assert_contained(got, want, clean_positions(*taint), torch.float32, c.tokens)
    for name in ("dk", "dv"):
        assert (got[name][unseen] == 0).all(), name


def test_cpu_executor_plain_products_for_finite_inputs(monkeypatch):
    """Finite inputs keep the plain matmuls (the containment costs one isfinite pass per
    call); only a call with a NaN or Inf takes the contained products."""
    import sparseforge.backends.cpu as cpu
    import sparseforge.dsl.semantics as semantics

    calls = []

    def spy(fn):
        def wrapped(*args):
            calls.append(fn.__name__)
            return fn(*args)
        return wrapped

    for module in (cpu, semantics):
        monkeypatch.setattr(module, "allowed_dot", spy(semantics.allowed_dot))
        monkeypatch.setattr(module, "allowed_sum", spy(semantics.allowed_sum))
    c = CASES["documents_padding"]
    clean, poisoned, _, _ = c.poisoned(torch.float32)
    run(c.compiled("cpu"), *clean)
    assert calls == []
    run(c.compiled("cpu"), *poisoned)
    assert "allowed_dot" in calls and "allowed_sum" in calls


def test_issue_example_one_nan_value_row():
    """Issue 16: a NaN in one value row of a key that 9 queries may see turned 192 of 256
    output rows into NaN; now exactly those 9 rows are NaN, in the reference too."""
    pattern, problem = sf.Neighborhood(3), sf.Problem(grid=(16, 16), heads=1, head_dim=16, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 256, 16, generator=gen) for _ in range(3))
    v[0, 0, 100] = NAN
    sees = sf.dense_mask(pattern, problem)[0, :, 100]
    assert int(sees.sum()) == 9
    cpu = sf.compile(pattern, problem, backend="cpu")
    for out in (cpu(q, k, v), sf.reference_attention(q, k, v, pattern, problem)):
        nan_rows = torch.isnan(out[0, 0]).any(-1)
        assert torch.equal(nan_rows, sees)


def test_allowed_products_brute_force():
    """allowed_dot / allowed_sum against per-pair sums over allowed pairs only (IEEE: the
    non-finite terms of allowed pairs give NaN or the signed Inf), with broadcast batch dims."""
    gen = torch.Generator().manual_seed(3)
    specials = (NAN, INF, -INF, 0.0)
    for trial in range(12):
        a = torch.randn(2, 1, 5, 3, generator=gen, dtype=torch.float64)
        b = torch.randn(1, 3, 6, 3, generator=gen, dtype=torch.float64)
        w = torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64)
        x = torch.randn(1, 3, 6, 4, generator=gen, dtype=torch.float64)
        mask = torch.rand(2, 3, 5, 6, generator=gen) < 0.5 if trial % 2 else torch.rand(5, 6, generator=gen) < 0.5
        for t in (a, b, w, x):
            flat = t.view(-1)
            idx = torch.randint(0, flat.numel(), (trial % 5,), generator=gen)
            flat[idx] = torch.tensor([specials[(trial + i) % 4] for i in range(len(idx))], dtype=t.dtype)
        m = mask.expand(2, 3, 5, 6)
        want_dot = torch.where(m, (a[..., :, None, :] * b[..., None, :, :]).sum(-1), 0)
        terms = torch.where(m[..., None], w[..., None] * x[..., None, :, :], 0)   # [2, 3, 5, 6, 4]
        want_sum = terms.sum(-2)
        for got, want in ((allowed_dot(a, b, mask), want_dot), (allowed_sum(w, x, mask), want_sum)):
            assert torch.equal(torch.isnan(got), torch.isnan(want))
            assert torch.equal(torch.isinf(got), torch.isinf(want))
            assert torch.equal(got[torch.isinf(want)], want[torch.isinf(want)])
            fin = torch.isfinite(want)
            assert torch.allclose(got[fin], want[fin], rtol=1e-13, atol=1e-13)


def test_allowed_products_gradients():
    """Finite inputs: gradcheck (and gradgradcheck). Non-finite ones: a pair the mask excludes
    passes no gradient — the gradient of a row that only excluded pairs touch is exactly 0."""
    gen = torch.Generator().manual_seed(4)
    mask = torch.rand(2, 4, 5, generator=gen) < 0.6
    a, b, w, x = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((2, 4, 3), (2, 5, 3), (2, 4, 5),
                                                                                      (2, 5, 3)))
    for fn, args in ((allowed_dot, (a, b)), (allowed_sum, (w, x))):
        args = tuple(t.clone().requires_grad_() for t in args)
        assert torch.autograd.gradcheck(lambda s, t: fn(s, t, mask), args)
        assert torch.autograd.gradgradcheck(lambda s, t: fn(s, t, mask), args)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[:, 2] = False      # key 2 seen by nobody
    mask[1] = False         # row 1 sees nothing
    b2 = b[0].clone()
    b2[2] = NAN
    a2 = a[0].clone()
    a2[1] = INF
    a2, b2 = a2.requires_grad_(), b2.requires_grad_()
    g = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    g[:, 2] = NAN           # an upstream NaN at excluded pairs goes nowhere either
    s = allowed_dot(a2, b2, mask)
    assert torch.isfinite(s).all() and (s[:, 2] == 0).all() and (s[1] == 0).all()
    s.backward(g)
    assert torch.isfinite(a2.grad).all() and torch.isfinite(b2.grad).all()
    assert (b2.grad[2] == 0).all() and (a2.grad[1] == 0).all()
    w2 = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    w2[:, 2] = NAN
    w2.requires_grad_()
    x2 = b2.detach().clone().requires_grad_()
    o = allowed_sum(w2, x2, mask)
    assert torch.isfinite(o).all() and (o[1] == 0).all()
    gout = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    gout[1] = NAN           # row 1 sees nothing: its NaN gradient reaches no key
    o.backward(gout)
    assert torch.isfinite(x2.grad).all() and (x2.grad[2] == 0).all()
    assert (w2.grad[:, 2] == 0).all() and (w2.grad[1] == 0).all()
