"""The Triton printer keeps Python's floor semantics for negative operands."""
import numpy as np
import pytest
import sympy as sp

import sparseforge as sf
from sparseforge.lower.families import Symbols, predicate
from sparseforge.codegen.printer import to_triton


class _TL:
    """numpy stand-ins for the tl functions the printer emits, with Triton's truncating
    integer // and % (C semantics), so the printed text is checked as Triton would run it."""

    minimum = staticmethod(np.minimum)
    maximum = staticmethod(np.maximum)
    where = staticmethod(np.where)


class TruncInt(np.ndarray):
    pass


def trunc_div(a, b):
    return np.fix(np.asarray(a) / b).astype(np.int64)


def run_printed(text, env):
    # Rewrite // and % to C semantics (truncation), as Triton computes them.
    import ast

    class CSemantics(ast.NodeTransformer):
        def visit_BinOp(self, node):
            self.generic_visit(node)
            if isinstance(node.op, ast.FloorDiv):
                return ast.Call(ast.Name("_tdiv", ast.Load()), [node.left, node.right], [])
            if isinstance(node.op, ast.Mod):
                return ast.Call(ast.Name("_tmod", ast.Load()), [node.left, node.right], [])
            return node

    tree = ast.fix_missing_locations(CSemantics().visit(ast.parse(text, mode="eval")))

    def tdiv(a, b):
        return trunc_div(a, b)

    def tmod(a, b):
        return np.asarray(a) - trunc_div(a, b) * b

    def floordiv(a, b):  # the generated _floordiv, written with truncating ops
        q = tdiv(a, b)
        return np.where((tmod(a, b) != 0) & (np.asarray(a) < 0), q - 1, q)

    def floormod(a, b):
        r = tmod(a, b)
        return np.where(r < 0, r + b, r)

    scope = dict(env, tl=_TL, _tdiv=tdiv, _tmod=tmod, _floordiv=floordiv, _floormod=floormod)
    return eval(compile(tree, "<printed>", "eval"), scope)


def test_negative_floor_and_mod():
    x = sp.Symbol("x", integer=True)  # may be negative
    values = np.arange(-20, 21)
    for expr in (sp.floor((x - 7) / 3), sp.Mod(x - 5, 4), sp.floor(x / 2) * 2 - x, sp.Max(x - 9, 0) // 4):
        text = to_triton(expr, {x: "x"})
        got = run_printed(text, {"x": values})
        want = np.array([int(expr.subs(x, int(v))) for v in values])
        np.testing.assert_array_equal(got, want, err_msg=f"{expr} printed as {text}")


def test_proven_nonnegative_uses_plain_ops():
    x = sp.Symbol("x", integer=True, nonnegative=True)
    assert to_triton(sp.floor(x / 4), {x: "x"}) == "(x // 4)"
    assert "_floordiv" in to_triton(sp.floor((x - 3) / 4), {x: "x"})


PATTERNS = [
    (sf.Neighborhood(5, dilation=2), (13, 11)),
    (sf.Neighborhood((3, 4), stride=(2, 3), causal=(True, False)), (9, 10)),
    (sf.Neighborhood(4, stride=2), (11,)),
    (sf.Halo(4, 3), (12, 10)),
    (sf.SlidingWindow(3, 1) & sf.Causal(), (20,)),
    (sf.Grid(3) | sf.Blocks((2, 3)), (9, 12)),
    (sf.StridedShards(4, 2, 3, dense_heads=1), (50,)),
    (sf.StridedShards(4, (2, 3), 3, causal=False), (50,)),
    (sf.Documents([3, 9, 8]) | sf.GlobalTokens([0, 1, 2, 10]) | sf.Sink(2), (20,)),
    (sf.PerHead([sf.Neighborhood(3), sf.Full(), sf.Blocks(2), sf.Causal()]), (6, 6)),
]


@pytest.mark.parametrize("pattern,grid", PATTERNS, ids=[repr(p) for p, _ in PATTERNS])
def test_printed_predicate_equals_dense_mask(pattern, grid):
    problem = sf.Problem(grid=grid, heads=4, kv_heads=2)
    s = Symbols.make(len(grid))
    n = problem.tokens
    tok = np.arange(n)
    coords = np.stack(np.unravel_index(tok, grid))
    names = {s.qn: "qn[:, None]", s.kn: "kn[None, :]", s.head: "head"}
    env = {"qn": tok, "kn": tok}
    for d in range(len(grid)):
        names[s.qx[d]], names[s.kx[d]] = f"qx{d}[:, None]", f"kx{d}[None, :]"
        env[f"qx{d}"] = env[f"kx{d}"] = coords[d]
    text = to_triton(predicate(pattern, problem, s), names)
    mask = sf.dense_mask(pattern, problem).numpy()
    for h in range(problem.heads):
        got = np.broadcast_to(run_printed(text, dict(env, head=h)), (n, n))
        np.testing.assert_array_equal(got, mask[h], err_msg=f"head {h}: {text}")


def test_integer_valued_rationals_print_as_exact_division():
    """sympy drops floor() around arguments it proves integral, leaving /2 behind."""
    x = sp.Symbol("x", integer=True)
    expr = sp.floor(sp.Max(0, 4 * sp.floor(x / 4) - 2) / 2)
    assert not isinstance(expr, sp.floor) and "/2" in str(expr)  # what sympy hands the printer
    values = np.arange(-20, 21)
    for e in (expr, sp.floor(sp.Min(15, 4 * sp.floor(x / 4) + 5) / 2 + sp.Rational(1, 2)) - 1):
        text = to_triton(e, {x: "x"})
        got = run_printed(text, {"x": values})
        want = np.array([int(e.subs(x, int(v))) for v in values])
        np.testing.assert_array_equal(got, want, err_msg=f"{e} printed as {text}")


def test_non_integer_expression_is_refused():
    x = sp.Symbol("x", integer=True)
    with pytest.raises(ValueError, match="not an integer expression"):
        to_triton(x / 2, {x: "x"})
