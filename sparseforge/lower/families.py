"""Per-family lowering knowledge: how each pattern family is tiled and predicated.

For every static family this module answers three questions the schedule and the kernel
templates need, each tested against the DSL's exact ``mask``:

- ``span_1d``   (separable families) the keys of query coordinate ``x`` along one
                dimension form the progression ``lo, lo + step, ..., hi``;
- ``fold_1d``   the fold that makes those keys contiguous in tile space (dilation for
                Neighborhood, the period for Grid, 1 otherwise);
- ``predicate`` the mask as a sympy expression over query/key coordinates, flat indices
                and the head (printed into the kernel for partial tiles).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import sympy as sp

from ..dsl import local, sequence
from ..dsl.pattern import Intersection, Pattern, PerHead, Union
from ..dsl.problem import Problem

# Encoding of tile classes; combine a union with max and an intersection with min.
EMPTY, PARTIAL, FULL = 0, 1, 2

SEPARABLE = (local.Neighborhood, local.SlidingWindow, local.Halo, local.Blocks, local.Grid)
# ------------------------------------------------------------------------------------
# Separable families along one dimension
# ------------------------------------------------------------------------------------
def window_1d(leaf, i, group_len, p: dict):
    """Keys of the query at index ``i`` of its fold group, along one dimension: the
    contiguous run ``start..end`` of indices in the same group (``group_len`` long).

    Works on ints, numpy arrays and sympy expressions alike: the schedule evaluates it on
    arrays, the closed-form loop bounds (``lower.bounds``) print it from sympy. ``start``
    and ``end`` never decrease as ``i`` grows (the bounds rely on it; tested)."""
    if isinstance(leaf, local.Neighborhood):
        _, start, end = local.natten_window(i, group_len, p["kernel"], 1, p["stride"], p["causal"])
        return start, end
    if isinstance(leaf, local.SlidingWindow):
        return _max(i - p["left"], 0), _min(i + p["right"], group_len - 1)
    if isinstance(leaf, local.Halo):
        lo = (i // p["block"]) * p["block"] - p["halo"]
        return _max(lo, 0), _min(lo + p["block"] + 2 * p["halo"] - 1, group_len - 1)
    if isinstance(leaf, local.Blocks):
        lo = (i // p["size"]) * p["size"]
        return lo, _min(lo + p["size"] - 1, group_len - 1)
    if isinstance(leaf, local.Grid):
        return 0 * i, 0 * i + group_len - 1  # the fold group is one grid cell's period class
    raise TypeError(f"{type(leaf).__name__} is not separable")


def _max(a, b):
    return sp.Max(a, b) if isinstance(a, sp.Basic) else np.maximum(a, b)


def _min(a, b):
    return sp.Min(a, b) if isinstance(a, sp.Basic) else np.minimum(a, b)


def group_length(length: int, fold: int, group):
    """Positions of fold group ``group`` on a dimension of ``length``: ceil((length - group) / fold)."""
    return (length - group + fold - 1) // fold


def span_1d(leaf, length: int, x: np.ndarray, p: dict) -> tuple[np.ndarray, np.ndarray, int]:
    """Keys of query coordinates ``x`` [n] along one dimension: ``(lo [n], hi [n], step)``,
    the keys being ``lo, lo + step, ..., hi`` (empty where hi < lo)."""
    f = fold_1d(leaf, length, p)
    g = x % f
    start, end = window_1d(leaf, x // f, group_length(length, f, g), p)
    return g + start * f, g + end * f, f


def fold_1d(leaf, length: int, p: dict) -> int:
    """The fold that turns this leaf's key progression into a contiguous run."""
    if isinstance(leaf, local.Neighborhood):
        return p["dilation"]
    if isinstance(leaf, local.Grid):
        return length // p["size"]
    return 1


def choose_fold(pattern: Pattern, problem: Problem) -> tuple[int, ...]:
    """One fold per dimension that suits every separable leaf; 1 where they disagree."""
    folds: list[set[int]] = [set() for _ in problem.grid]
    for leaf in pattern.walk():
        if isinstance(leaf, SEPARABLE):
            for d, p in enumerate(leaf.params(problem)):
                folds[d].add(fold_1d(leaf, problem.grid[d], p))
    return tuple(f.pop() if len(f) == 1 else 1 for f in folds)


# ------------------------------------------------------------------------------------
# Predicates (sympy)
# ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Symbols:
    """The variables a kernel's mask predicate may use: query/key grid coordinates per
    dimension, flat token indices and the query head."""

    qx: tuple[sp.Symbol, ...]
    kx: tuple[sp.Symbol, ...]
    qn: sp.Symbol
    kn: sp.Symbol
    head: sp.Symbol

    @classmethod
    def make(cls, ndim: int) -> "Symbols":
        def nonneg(name):
            return sp.Symbol(name, integer=True, nonnegative=True)
        return cls(tuple(nonneg(f"q_x{d}") for d in range(ndim)), tuple(nonneg(f"k_x{d}") for d in range(ndim)),
                   nonneg("q_n"), nonneg("k_n"), nonneg("head"))


def predicate(pattern: Pattern, problem: Problem, s: Symbols) -> sp.Basic:
    """The mask of ``pattern`` as a sympy boolean over ``s``."""
    if isinstance(pattern, Union):
        return sp.Or(*(predicate(p, problem, s) for p in pattern.parts))
    if isinstance(pattern, Intersection):
        return sp.And(*(predicate(p, problem, s) for p in pattern.parts))
    if isinstance(pattern, PerHead):
        pieces, start = [], 0
        runs = pattern.runs()
        for i, (p, n) in enumerate(runs):
            start += n
            cond = sp.true if i == len(runs) - 1 else s.head < start
            pieces.append((predicate(p, problem, s), cond))
        return pieces[0][0] if len(pieces) == 1 else sp.Piecewise(*pieces)
    if isinstance(pattern, SEPARABLE):
        return sp.And(*(_separable_1d(pattern, problem.grid[d], s.qx[d], s.kx[d], p)
                        for d, p in enumerate(pattern.params(problem))))
    return _flat(pattern, problem, s)


def _separable_1d(leaf, length: int, q, k, p: dict):
    if isinstance(leaf, local.Neighborhood):
        d = p["dilation"]
        group, start, end = local.natten_window(q, length, p["kernel"], d, p["stride"], p["causal"])
        kg = sp.floor(k / d)
        return sp.And(sp.Eq(sp.Mod(k, d), group), kg >= start, kg <= end)
    if isinstance(leaf, local.SlidingWindow):
        return sp.And(k - q >= -p["left"], k - q <= p["right"])
    if isinstance(leaf, local.Halo):
        lo = sp.floor(q / p["block"]) * p["block"] - p["halo"]
        return sp.And(k >= lo, k < lo + p["block"] + 2 * p["halo"])
    if isinstance(leaf, local.Blocks):
        return sp.Eq(sp.floor(q / p["size"]), sp.floor(k / p["size"]))
    if isinstance(leaf, local.Grid):
        period = length // p["size"]
        return sp.Eq(sp.Mod(q, period), sp.Mod(k, period))
    raise TypeError(type(leaf).__name__)


def _intervals(values: tuple[int, ...]) -> list[tuple[int, int]]:
    """Sorted ints as maximal runs [(first, last), ...]."""
    runs: list[tuple[int, int]] = []
    for v in values:
        if runs and runs[-1][1] == v - 1:
            runs[-1] = (runs[-1][0], v)
        else:
            runs.append((v, v))
    return runs


def _in_runs(x, runs):
    return sp.Or(*(sp.And(x >= a, x <= b) if a != b else sp.Eq(x, a) for a, b in runs))


# Closed-form predicates grow with the number of documents / global-token runs; above this
# the kernels would be unreadable and slow, so lowering refuses (a table-driven mask is a
# later extension).
MAX_PREDICATE_RUNS = 64


def _flat(leaf, problem: Problem, s: Symbols):
    qn, kn = s.qn, s.kn
    if isinstance(leaf, sequence.Full):
        return sp.true
    if isinstance(leaf, sequence.Causal):
        return kn <= qn
    if isinstance(leaf, sequence.Sink):
        return kn < leaf.n
    if isinstance(leaf, sequence.GlobalTokens):
        runs = _intervals(leaf.indices)
        _check_runs("GlobalTokens indices", len(runs))
        return sp.Or(_in_runs(qn, runs), _in_runs(kn, runs))
    if isinstance(leaf, sequence.Documents):
        _check_runs("Documents lengths", len(leaf.lengths))
        ends = np.cumsum(leaf.lengths).tolist()
        starts = [0] + ends[:-1]
        return sp.Or(*(sp.And(qn >= a, qn < b, kn >= a, kn < b) for a, b in zip(starts, ends)))
    if isinstance(leaf, sequence.StridedShards):
        return _strided_shards(leaf, problem, s)
    raise TypeError(f"{type(leaf).__name__} has no static lowering")


def _check_runs(what: str, n: int):
    if n > MAX_PREDICATE_RUNS:
        raise ValueError(f"{what}: {n} runs is more than the {MAX_PREDICATE_RUNS} a generated kernel "
                         "predicate supports")


def _strided_shards(leaf, problem: Problem, s: Symbols):
    bs, vs = leaf.block_size, leaf.vertical_stride
    qb, kb = sp.floor(s.qn / bs), sp.floor(s.kn / bs)
    left, right = leaf.local_pair
    group = problem.heads // problem.kv_heads
    kv_head = sp.floor(s.head / group)
    dense = (kv_head >= problem.kv_heads - leaf.dense_heads) if leaf.dense_heads else sp.false
    if leaf.causal:
        local_ = sp.And(qb - kb < left, kb - qb < right)
        vertical = sp.Eq(sp.Mod(kb + kv_head * leaf.head_step(problem.heads), vs), 0)
        return sp.And(sp.Or(local_, vertical, dense), s.kn <= s.qn)
    lm = sp.Max(qb - kb - left + 1, 0)
    rm = sp.Max(kb - qb - right + 1, 0)
    return sp.Or(sp.Eq(sp.Mod(lm + rm, vs), 0), dense)


# ------------------------------------------------------------------------------------
# Head signatures: heads with equal signatures share a tile schedule
# ------------------------------------------------------------------------------------
def head_signature(pattern: Pattern, problem: Problem, head: int):
    """A hashable value equal for two heads iff their masks are equal by construction."""
    if isinstance(pattern, PerHead):
        return head_signature(pattern.patterns[head], problem, head)
    if isinstance(pattern, (Union, Intersection)):
        return (type(pattern).__name__,) + tuple(head_signature(p, problem, head) for p in pattern.parts)
    if isinstance(pattern, sequence.StridedShards):
        kv_head = head // (problem.heads // problem.kv_heads)
        if kv_head >= problem.kv_heads - pattern.dense_heads:
            return (pattern, "dense")
        if not pattern.causal:
            return (pattern,)
        return (pattern, (kv_head * pattern.head_step(problem.heads)) % pattern.vertical_stride)
    return pattern


def leaf_for_head(pattern: Pattern, head: int) -> Pattern:
    """``pattern`` with every PerHead replaced by the pattern of ``head``."""
    if isinstance(pattern, PerHead):
        return leaf_for_head(pattern.patterns[head], head)
    if isinstance(pattern, Union):
        return Union(tuple(leaf_for_head(p, head) for p in pattern.parts))
    if isinstance(pattern, Intersection):
        return Intersection(tuple(leaf_for_head(p, head) for p in pattern.parts))
    return pattern

