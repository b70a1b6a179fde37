"""Print sympy index expressions as Triton source with Python's (floor) integer semantics.

Triton's ``//`` and ``%`` truncate toward zero; sympy's ``floor`` and ``Mod`` floor. The
printer emits plain ``//``/``%`` only where sympy can prove the dividend non-negative, and
calls the generated ``_floordiv``/``_floormod`` helpers otherwise, so negative window
offsets near borders stay right.
"""
from __future__ import annotations

import sympy as sp
from sympy.printing.str import StrPrinter


class TritonPrinter(StrPrinter):
    """sympy -> Triton expression text. ``names`` maps symbols to source snippets
    (e.g. ``q_x0 -> "qx0[:, None]"``)."""

    def __init__(self, names: dict[sp.Symbol, str]):
        super().__init__()
        self.names = {s: n for s, n in names.items()}

    def _print_Symbol(self, expr):
        if expr in self.names:
            return self.names[expr]
        raise KeyError(f"no kernel variable for symbol {expr}")

    def _print_Integer(self, expr):
        return str(int(expr))

    def _print_Rational(self, expr):
        raise ValueError(f"non-integer constant {expr} in an index expression")

    def _print_floor(self, expr):
        num, den = sp.fraction(sp.together(expr.args[0]))
        if not (den.is_Integer and den > 0):
            raise ValueError(f"cannot print {expr}: divisor {den} is not a positive constant")
        return self._div(num, int(den))

    def _div(self, num, den: int) -> str:
        if den == 1:
            return self._print(num)
        if num.is_nonnegative:
            return f"({self._print(num)} // {den})"
        return f"_floordiv({self._print(num)}, {den})"

    def _print_Mod(self, expr):
        a, b = expr.args
        if not (b.is_Integer and b > 0):
            raise ValueError(f"cannot print {expr}: modulus {b} is not a positive constant")
        if a.is_nonnegative:
            return f"({self._print(a)} % {int(b)})"
        return f"_floormod({self._print(a)}, {int(b)})"

    def _print_Min(self, expr):
        return self._nest("tl.minimum", expr.args)

    def _print_Max(self, expr):
        return self._nest("tl.maximum", expr.args)

    def _nest(self, fn, args):
        out = self._print(args[0])
        for a in args[1:]:
            out = f"{fn}({out}, {self._print(a)})"
        return out

    def _integer_quotient(self, expr) -> str | None:
        """An integer-valued sum or product that sympy wrote with rational coefficients (it
        drops ``floor`` around an argument it proves integral, e.g. ``floor(2*x/2)``) is
        printed as an exact integer division. None when ``expr`` has no denominator."""
        num, den = sp.fraction(sp.together(expr))
        if den == 1:
            return None
        if not (den.is_Integer and den > 0 and expr.is_integer):
            raise ValueError(f"cannot print {expr}: not an integer expression")
        return self._div(num, int(den))

    def _print_Add(self, expr):
        quotient = self._integer_quotient(expr)
        if quotient is not None:
            return quotient
        terms = sorted(expr.as_ordered_terms(), key=lambda t: t.could_extract_minus_sign())
        text = self._print(terms[0])
        for t in terms[1:]:
            text += f" - {self._print(-t)}" if t.could_extract_minus_sign() else f" + {self._print(t)}"
        return f"({text})"

    def _print_Mul(self, expr):
        quotient = self._integer_quotient(expr)
        if quotient is not None:
            return quotient
        coeff, rest = expr.as_coeff_Mul()
        if coeff == -1:
            return f"(-{self._print(rest)})"
        factors = [self._print(f) for f in expr.args]
        return "(" + " * ".join(factors) + ")"

    def _print_Relational(self, expr):
        lhs, rhs = expr.lhs, expr.rhs
        den = sp.fraction(sp.together(lhs - rhs))[1]
        if den != 1:
            # sympy turns ``floor(k/2) >= m`` into ``k/2 >= m``; scale back to integers.
            if not (den.is_Integer and den > 0):
                raise ValueError(f"cannot print {expr}: non-constant denominator {den}")
            lhs, rhs = sp.expand(lhs * den), sp.expand(rhs * den)
        return f"({self._print(lhs)} {expr.rel_op} {self._print(rhs)})"

    def _print_And(self, expr):
        return "(" + " & ".join(self._print(a) for a in expr.args) + ")"

    def _print_Or(self, expr):
        return "(" + " | ".join(self._print(a) for a in expr.args) + ")"

    def _print_Not(self, expr):
        return f"(~{self._print(expr.args[0])})"

    def _print_BooleanTrue(self, expr):
        return "True"

    def _print_BooleanFalse(self, expr):
        return "False"

    def _print_Piecewise(self, expr):
        *init, (last, _) = expr.args
        out = self._print(last)
        for value, cond in reversed(init):
            out = f"tl.where({self._print(cond)}, {self._print(value)}, {out})"
        return out


def to_triton(expr, names: dict[sp.Symbol, str]) -> str:
    """Triton source for ``expr`` with symbols replaced by ``names``."""
    return TritonPrinter(names).doprint(expr)
