"""Lower a 1-D pattern for decode: queries at the last positions of a sequence of run-time length.

The decode kernels (``codegen/templates/attention_decode.py.j2``) take the number of keys at
run time, per sample, so a growing cache compiles nothing new. What they need of the pattern:

- ``predicate``: the exact mask over (query position ``qp``, key position ``kp``) — the
  pattern's own (``lower.families.predicate``), which must not depend on the sequence length
  (checked by printing it for two lengths; Documents, say, does, and is refused);
- ``intervals``: key ranges ``[lo, hi]`` (inclusive, sympy in ``qp`` and the key count ``nk``)
  whose union covers every key some query may see: the loops visit only these (a window of
  4096 over a 1M-token cache reads its window, not the cache). A union gives one range per
  part, an intersection the overlap of its parts' ranges; a family without a closed form gives
  the whole cache (correct, the predicate masks; only slower).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools

import sympy as sp

from ..dsl.pattern import Intersection, Pattern, PerHead, Union
from ..dsl.problem import Problem
from ..dsl.sequence import Causal, Full, Sink, StridedShards
from ..dsl.local import SlidingWindow
from .families import Symbols, predicate

#: the symbols of a decode predicate and its ranges: query position, key position, key count
QP, KP, NK = (sp.Symbol(name, integer=True, nonnegative=True) for name in ("qp", "kp", "nk"))
#: two lengths the predicate is printed for (length-free patterns print the same)
_PROBE_LENGTHS = (1 << 20, (1 << 20) + 37)


class DecodeNotSupportedError(NotImplementedError):
    """A pattern the decode kernels cannot run (its mask depends on the sequence length)."""


@dataclasses.dataclass(frozen=True)
class DecodeLowering:
    """What the decode kernels need of a 1-D pattern (module docstring)."""

    pattern: Pattern
    predicate: sp.Basic
    intervals: tuple[tuple[sp.Expr, sp.Expr], ...]

    @property
    def full(self) -> bool:
        """Every pair is allowed (no predicate to evaluate)."""
        return self.predicate == sp.true


def _ranges(pattern: Pattern) -> list[tuple[sp.Expr, sp.Expr]]:
    """Key ranges covering ``pattern``'s keys, in disjunctive form."""
    if isinstance(pattern, Union):
        return [r for part in pattern.parts for r in _ranges(part)]
    if isinstance(pattern, Intersection):
        out = []
        for combo in itertools.product(*(_ranges(p) for p in pattern.parts)):
            out.append((sp.Max(*(lo for lo, _ in combo)), sp.Min(*(hi for _, hi in combo))))
        return out
    if isinstance(pattern, PerHead):
        return [r for p in dict.fromkeys(pattern.patterns) for r in _ranges(p)]
    if isinstance(pattern, Causal) or (isinstance(pattern, StridedShards) and pattern.causal):
        return [(sp.Integer(0), QP)]
    if isinstance(pattern, Sink):
        return [(sp.Integer(0), sp.Integer(pattern.n - 1))]
    if isinstance(pattern, SlidingWindow):
        (p,) = pattern.params(Problem(grid=1))
        return [(QP - p["left"], QP + p["right"])]
    return [(sp.Integer(0), NK - 1)]  # Full, and families without a closed form: the whole cache


@functools.lru_cache(maxsize=256)
def lower_decode(pattern: Pattern, heads: int, kv_heads: int) -> DecodeLowering:
    """The decode lowering of 1-D ``pattern`` for ``heads`` query heads (cached: every decode
    step asks); DecodeNotSupportedError when its mask depends on the sequence length."""
    sym = Symbols.make(1)
    names = {sym.qx[0]: QP, sym.qn: QP, sym.kx[0]: KP, sym.kn: KP}
    printed = []
    for length in _PROBE_LENGTHS:
        problem = Problem(grid=length, heads=heads, kv_heads=kv_heads, head_dim=16)
        pattern.check(problem)
        printed.append(predicate(pattern, problem, sym).xreplace(names))
    if printed[0] != printed[1]:
        raise DecodeNotSupportedError(
            f"{pattern!r}: its mask depends on the sequence length, which a decode step takes at run time; the "
            "decode kernels run patterns whose mask does not (Causal, SlidingWindow, Sink, StridedShards, Full, "
            "their unions and intersections); run it with backend='cpu'")
    ranges = tuple(dict.fromkeys(_ranges(pattern)))
    if isinstance(pattern, Full) or any(lo == 0 and hi == NK - 1 for lo, hi in ranges):
        ranges = ((sp.Integer(0), NK - 1),)   # one range holds them all
    return DecodeLowering(pattern, printed[0], ranges)
