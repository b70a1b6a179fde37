"""Closed-form loop bounds: the key tiles of a query tile as expressions of its index.

For a single separable family (Neighborhood, SlidingWindow, Halo, Blocks, Grid) whose
keys are contiguous under the tiling's fold, the key tiles a query tile visits form an
N-D box, and the FULL ones a sub-box. Along dimension ``d``, with the query tile at tile
coordinate ``t``:

    g  = t * tq // Lp                 fold group of the tile   (0 when fold = 1)
    ia = t * tq - g * Lp              first query index in the group
    Lg = ceil((L - g) / fold)         positions in the group
    ib = min(ia + tq - 1, Lg - 1)     last valid query index

    first      = (g * Lp + start(ia)) // tk          start, end: ``lowering.window_1d``,
    last       = (g * Lp + end(ib)) // tk            non-decreasing in the query index
    full_first = ceil((g * Lp + start(ib)) / tk)
    full_last  = (g * Lp + end(ia) + 1) // tk - 1

FULL additionally needs every query row and key row of the pair to be real (no padding),
as in the schedule's tables. sympy derives the expressions; ``codegen.printer`` prints
them with floor semantics into the forward and dQ kernels, which then loop over the box
with no index loads. The dK/dV kernel still reads the inverse tables: the inverse of a
clamped window (which query tiles see a key tile) has no closed form derived here.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import sympy as sp

from ..dsl.pattern import Pattern
from ..dsl.problem import Problem
from .families import SEPARABLE, fold_1d, group_length, window_1d
from .tiling import DimTiling, TileGeometry

#: Names of the four bounds per dimension, in the order kernels pass them around.
BOUND_NAMES = ("first", "last", "full_first", "full_last")


def _symbol(name: str) -> sp.Symbol:
    return sp.Symbol(name, integer=True, nonnegative=True)


@dataclasses.dataclass(frozen=True)
class DimBounds:
    """Key-tile bounds along one dimension as sympy expressions.

    ``steps`` are the intermediate assignments (symbol, expression) in order, ending with
    the four bounds (``BOUND_NAMES``); ``has_rows`` / ``padded`` say whether the query
    tile holds any / some padding positions along this dimension.
    """

    dim: DimTiling
    steps: tuple[tuple[sp.Symbol, sp.Expr], ...]
    has_rows: sp.Basic
    padded: sp.Basic

    @property
    def tile(self) -> sp.Symbol:
        """The query tile's coordinate along this dimension (the expressions' input)."""
        return self.steps[0][0]

    def evaluate(self, t: int) -> dict[str, int | bool]:
        """Every bound for tile coordinate ``t`` as Python ints (exact, via sympy)."""
        values: dict = {}
        for sym, expr in self.steps:
            values[sym] = int(expr.subs(values)) if sym is not self.tile else t
        out = {name: values[sym] for name, (sym, _) in zip(BOUND_NAMES, self.steps[-4:])}
        out["has_rows"] = bool(self.has_rows.subs(values))
        out["padded"] = bool(self.padded.subs(values))
        return out


@dataclasses.dataclass(frozen=True)
class ClosedForm:
    """Closed-form key-tile bounds of a schedule, one ``DimBounds`` per grid dimension."""

    dims: tuple[DimBounds, ...]

    def key_tiles(self, q_tile_coords: tuple[int, ...]) -> tuple[set[tuple[int, ...]], set[tuple[int, ...]]]:
        """(visited, full) key tiles, as per-dimension tile coordinates, of the query tile at
        ``q_tile_coords``; what a generated kernel iterates (for tests and reports)."""
        per_dim = [d.evaluate(t) for d, t in zip(self.dims, q_tile_coords)]
        if not all(b["has_rows"] for b in per_dim):
            return set(), set()
        ranges = [range(b["first"], b["last"] + 1) for b in per_dim]
        visited = set(np.ndindex(*(len(r) for r in ranges)))
        visited = {tuple(r[i] for r, i in zip(ranges, idx)) for idx in visited}
        if any(b["padded"] for b in per_dim):
            return visited, set()
        full = {c for c in visited if all(b["full_first"] <= x <= b["full_last"] for b, x in zip(per_dim, c))}
        return visited, full


def derive(pattern: Pattern, problem: Problem, geom: TileGeometry) -> tuple[ClosedForm | None, str]:
    """The closed-form bounds of ``pattern`` under ``geom``, or None and the reason why not."""
    if not isinstance(pattern, SEPARABLE):
        return None, f"{type(pattern).__name__} is not a single separable family"
    dims = []
    for d, (dim, p) in enumerate(zip(geom.dims, pattern.params(problem))):
        natural = fold_1d(pattern, dim.length, p)
        if natural != dim.fold:
            return None, (f"the tiling folds dimension {d} by {dim.fold}, but the keys of {type(pattern).__name__} "
                          f"are contiguous under fold {natural}")
        dims.append(_dim_bounds(pattern, p, dim, d))
    return ClosedForm(tuple(dims)), f"{type(pattern).__name__} windows are monotone intervals in every dimension"


def _dim_bounds(leaf, p: dict, dim: DimTiling, d: int) -> DimBounds:
    t, g, ia, lg, ib = (_symbol(f"{name}{d}") for name in ("qt", "g", "ia", "lg", "ib"))
    tq, tk, lp, f = dim.tq, dim.tk, dim.padded_group, dim.fold
    steps: list[tuple[sp.Symbol, sp.Expr]] = [(t, t)]
    if f == 1:
        base, group_len = 0, dim.length
        steps.append((ia, t * tq))
    else:
        base, group_len = g * lp, lg
        steps += [(g, sp.floor(t * tq / lp)), (ia, t * tq - g * lp), (lg, group_length(dim.length, f, g))]
    steps.append((ib, sp.Min(ia + tq - 1, group_len - 1)))
    start_a, end_a = window_1d(leaf, ia, group_len, p)
    start_b, end_b = window_1d(leaf, ib, group_len, p)
    bounds = (sp.floor((base + start_a) / tk), sp.floor((base + end_b) / tk),
              sp.floor((base + start_b + tk - 1) / tk), sp.floor((base + end_a + 1) / tk) - 1)
    steps += [(_symbol(f"{name}{d}") if name != "full_last" else sp.Symbol(f"{name}{d}", integer=True), b)
              for name, b in zip(BOUND_NAMES, bounds)]
    return DimBounds(dim, tuple(steps), sp.StrictLessThan(ia, group_len), sp.StrictGreaterThan(ia + tq, group_len))
