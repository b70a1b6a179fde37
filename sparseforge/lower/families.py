"""Per-family lowering knowledge, one entry per family: how each pattern family is tiled,
classified, predicated and named.

Every family the schedule can lower has a ``Lowering`` entry in ``LOWERINGS`` (keyed by
its DSL class), and everything ``lower/`` and the templates need of a family comes from it:

- separable families (a rule per grid dimension: Neighborhood, SlidingWindow, Halo,
  Blocks, Grid) give ``window`` (the contiguous run of keys of a query inside its fold
  group), ``fold`` (the fold that makes those keys contiguous: dilation, Grid's period, 1)
  and ``predicate_1d`` (the rule along one dimension, in sympy);
- flat families (on the row-major token index: Full, Causal, Sink, GlobalTokens,
  Documents, StridedShards) give ``predicate`` (sympy over flat indices and the head) and
  ``classify`` (FULL / PARTIAL / EMPTY of every tile pair from the tiles' token ranges);
- every family gives ``tag`` (its part of readable names) and ``head_signature`` (heads
  with equal signatures share one tile schedule).

Each answer is tested against the DSL's exact ``mask``. Adding a family is one DSL class and
one entry here. Content-dependent families (Routed, Scattered, Grouped) have tag-only
entries: their tiles come from their paths (``lower.paths``).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import sympy as sp
import torch

from ..dsl import content, local, sequence
from ..dsl.pattern import Intersection, Pattern, PerHead, Union
from ..dsl.problem import Problem

# Encoding of tile classes; combine a union with max and an intersection with min.
EMPTY, PARTIAL, FULL = 0, 1, 2

# Closed-form predicates grow with the number of documents / global-token runs; above this
# the kernels would be unreadable and slow, so lowering refuses (a table-driven mask is a
# later extension).
MAX_PREDICATE_RUNS = 64


def _max(a, b):
    return sp.Max(a, b) if isinstance(a, sp.Basic) else np.maximum(a, b)


def _min(a, b):
    return sp.Min(a, b) if isinstance(a, sp.Basic) else np.minimum(a, b)


def _v(value) -> str:
    """A parameter in a readable name: 7, 7x5 (per dimension), 1/0 for bools."""
    if isinstance(value, (tuple, list)):
        if len(set(value)) == 1:
            return _v(value[0])
        return "x".join(_v(x) for x in value)
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _is_default(value, default) -> bool:
    values = value if isinstance(value, (tuple, list)) else (value,)
    return all(x == default for x in values)


def classes(full, empty) -> np.ndarray:
    """int8 tile classes from boolean FULL and EMPTY conditions (PARTIAL elsewhere)."""
    return np.where(full, FULL, np.where(empty, EMPTY, PARTIAL)).astype(np.int8)


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


@dataclasses.dataclass(frozen=True, eq=False)
class TileTokens:
    """The tokens of every query and key tile (int64 [tiles, rows], -1 for padding) and
    their ranges, what flat families classify from; ``dims`` the grid's tiling."""

    q: np.ndarray
    k: np.ndarray
    dims: tuple

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.k.shape[0]

    def ranges(self):
        """(qmin [Q, 1], qmax [Q, 1], kmin [1, K], kmax [1, K]) of the real (non-padding) tokens."""
        big = np.iinfo(np.int64).max
        return (np.where(self.q >= 0, self.q, big).min(1)[:, None], self.q.max(1)[:, None],
                np.where(self.k >= 0, self.k, big).min(1)[None, :], self.k.max(1)[None, :])


# ------------------------------------------------------------------------------------
# The entries
# ------------------------------------------------------------------------------------
class Lowering:
    """What ``lower/`` knows of one family (see the module docstring)."""

    separable = False

    def tag(self, p: Pattern, ndim: int) -> str:
        return type(p).__name__.lower()

    def head_signature(self, p: Pattern, problem: Problem, head: int):
        return p


class Separable(Lowering):
    """A family whose mask is a rule per grid dimension, all of which must hold."""

    separable = True

    def window(self, i, group_len, p: dict):
        """Keys of the query at index ``i`` of its fold group, along one dimension: the
        contiguous run ``start..end`` of indices in the same group (``group_len`` long).

        Works on ints, numpy arrays and sympy expressions alike: the schedule evaluates it on
        arrays, the closed-form loop bounds (``lower.bounds``) print it from sympy. ``start``
        and ``end`` never decrease as ``i`` grows (the bounds rely on it; tested)."""
        raise NotImplementedError

    def fold(self, length: int, p: dict) -> int:
        """The fold that turns this family's key progression into a contiguous run."""
        return 1

    def predicate_1d(self, length: int, q, k, p: dict):
        """The rule along one dimension of ``length`` as a sympy boolean of coordinates q, k."""
        raise NotImplementedError


class _Neighborhood(Separable):
    def window(self, i, group_len, p):
        _, start, end = local.natten_window(i, group_len, p["kernel"], 1, p["stride"], p["causal"])
        return start, end

    def fold(self, length, p):
        return p["dilation"]

    def predicate_1d(self, length, q, k, p):
        d = p["dilation"]
        group, start, end = local.natten_window(q, length, p["kernel"], d, p["stride"], p["causal"])
        kg = sp.floor(k / d)
        return sp.And(sp.Eq(sp.Mod(k, d), group), kg >= start, kg <= end)

    def tag(self, p, ndim):
        s = f"na{ndim}d_k{_v(p.kernel_size)}"
        if not _is_default(p.dilation, 1):
            s += f"_d{_v(p.dilation)}"
        if not _is_default(p.stride, 1):
            s += f"_s{_v(p.stride)}"
        if not _is_default(p.causal, False):
            s += f"_c{_v(p.causal)}"
        return s


class _SlidingWindow(Separable):
    def window(self, i, group_len, p):
        return _max(i - p["left"], 0), _min(i + p["right"], group_len - 1)

    def predicate_1d(self, length, q, k, p):
        return sp.And(k - q >= -p["left"], k - q <= p["right"])

    def tag(self, p, ndim):
        return f"sw_l{_v(p.left)}_r{_v(p.right)}"


class _Halo(Separable):
    def window(self, i, group_len, p):
        lo = (i // p["block"]) * p["block"] - p["halo"]
        return _max(lo, 0), _min(lo + p["block"] + 2 * p["halo"] - 1, group_len - 1)

    def predicate_1d(self, length, q, k, p):
        lo = sp.floor(q / p["block"]) * p["block"] - p["halo"]
        return sp.And(k >= lo, k < lo + p["block"] + 2 * p["halo"])

    def tag(self, p, ndim):
        return f"halo_b{_v(p.block_size)}_h{_v(p.halo)}"


class _Blocks(Separable):
    # offset s: windows [0, s), [s, s + size), ...; with pad = (size - s) % size the window of
    # index i is [((i + pad) // size) * size - pad, ... + size - 1], clipped to [0, group_len - 1]
    # (both ends non-decreasing in i). offset 0 keeps the unshifted expressions (same kernels).
    def window(self, i, group_len, p):
        size, pad = p["size"], local.blocks_pad(p["size"], p.get("offset", 0))
        if not pad:
            lo = (i // size) * size
            return lo, _min(lo + size - 1, group_len - 1)
        lo = ((i + pad) // size) * size - pad
        return _max(lo, 0), _min(lo + size - 1, group_len - 1)

    def predicate_1d(self, length, q, k, p):
        size, pad = p["size"], local.blocks_pad(p["size"], p.get("offset", 0))
        if not pad:
            return sp.Eq(sp.floor(q / size), sp.floor(k / size))
        return sp.Eq(sp.floor((q + pad) / size), sp.floor((k + pad) / size))

    def tag(self, p, ndim):
        return f"blocks{_v(p.size)}" + ("" if _is_default(p.offset, 0) else f"_o{_v(p.offset)}")


class _Grid(Separable):
    def window(self, i, group_len, p):
        return 0 * i, 0 * i + group_len - 1  # the fold group is one grid cell's period class

    def fold(self, length, p):
        return length // p["size"]

    def predicate_1d(self, length, q, k, p):
        period = length // p["size"]
        return sp.Eq(sp.Mod(q, period), sp.Mod(k, period))

    def tag(self, p, ndim):
        return f"grid{_v(p.size)}"


class Flat(Lowering):
    """A family on the row-major flat token index."""

    def predicate(self, p: Pattern, problem: Problem, s: Symbols) -> sp.Basic:
        """The mask as a sympy boolean over flat indices ``s.qn``, ``s.kn`` and ``s.head``."""
        raise NotImplementedError

    def classify(self, p: Pattern, tiles: TileTokens, problem: Problem, head: int) -> np.ndarray:
        """int8 [query tiles, key tiles] classes of head ``head`` (broadcastable)."""
        raise NotImplementedError


class _Full(Flat):
    def predicate(self, p, problem, s):
        return sp.true

    def classify(self, p, tiles, problem, head):
        return np.full(tiles.shape, FULL, np.int8)

    def tag(self, p, ndim):
        return "full"


class _Causal(Flat):
    def predicate(self, p, problem, s):
        return s.kn <= s.qn

    def classify(self, p, tiles, problem, head):
        qmin, qmax, kmin, kmax = tiles.ranges()
        return classes(kmax <= qmin, kmin > qmax)

    def tag(self, p, ndim):
        return "causal"


class _Sink(Flat):
    def predicate(self, p, problem, s):
        return s.kn < p.n

    def classify(self, p, tiles, problem, head):
        _, _, kmin, kmax = tiles.ranges()
        return np.broadcast_to(classes(kmax < p.n, kmin >= p.n), tiles.shape)

    def tag(self, p, ndim):
        return f"sink{p.n}"


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


def _check_runs(what: str, n: int):
    if n > MAX_PREDICATE_RUNS:
        raise ValueError(f"{what}: {n} runs is more than the {MAX_PREDICATE_RUNS} a generated kernel "
                         "predicate supports")


class _GlobalTokens(Flat):
    def predicate(self, p, problem, s):
        runs = _intervals(p.indices)
        _check_runs("GlobalTokens indices", len(runs))
        return sp.Or(_in_runs(s.qn, runs), _in_runs(s.kn, runs))

    def classify(self, p, tiles, problem, head):
        q, k = tiles.q, tiles.k
        g = np.array(p.indices)
        qg = (np.isin(q, g) & (q >= 0)).sum(1)[:, None]
        kg = (np.isin(k, g) & (k >= 0)).sum(1)[None, :]
        return classes((qg == (q >= 0).sum(1)[:, None]) | (kg == (k >= 0).sum(1)[None, :]), (qg == 0) & (kg == 0))

    def tag(self, p, ndim):
        return f"global{len(p.indices)}"


class _Documents(Flat):
    def predicate(self, p, problem, s):
        _check_runs("Documents lengths", len(p.lengths))
        ends = np.cumsum(p.lengths).tolist()
        starts = [0] + ends[:-1]
        return sp.Or(*(sp.And(s.qn >= a, s.qn < b, s.kn >= a, s.kn < b) for a, b in zip(starts, ends)))

    def classify(self, p, tiles, problem, head):
        qmin, qmax, kmin, kmax = tiles.ranges()
        ends = np.cumsum(p.lengths)

        def doc(t):
            return np.searchsorted(ends, t, side="right")
        dq0, dq1, dk0, dk1 = doc(qmin), doc(qmax), doc(kmin), doc(kmax)
        return classes((dq0 == dq1) & (dk0 == dk1) & (dq0 == dk0), (dk1 < dq0) | (dk0 > dq1))

    def tag(self, p, ndim):
        return f"docs{len(p.lengths)}"


class _StridedShards(Flat):
    def predicate(self, p, problem, s):
        bs, vs = p.block_size, p.vertical_stride
        qb, kb = sp.floor(s.qn / bs), sp.floor(s.kn / bs)
        left, right = p.local_pair
        group = problem.heads // problem.kv_heads
        kv_head = sp.floor(s.head / group)
        dense = (kv_head >= problem.kv_heads - p.dense_heads) if p.dense_heads else sp.false
        if p.causal:
            local_ = sp.And(qb - kb < left, kb - qb < right)
            vertical = sp.Eq(sp.Mod(kb + kv_head * p.head_step(problem.heads), vs), 0)
            return sp.And(sp.Or(local_, vertical, dense), s.kn <= s.qn)
        lm = sp.Max(qb - kb - left + 1, 0)
        rm = sp.Max(kb - qb - right + 1, 0)
        return sp.Or(sp.Eq(sp.Mod(lm + rm, vs), 0), dense)

    def classify(self, p, tiles, problem, head):
        if len(tiles.dims) != 1 or tiles.dims[0].fold != 1:
            raise ValueError("StridedShards is scheduled on 1-D grids only; give Problem(grid=N)")
        dim = tiles.dims[0]
        cell = math.gcd(dim.tq, dim.tk, p.block_size)
        n_cells = dim.extent // cell
        blocks = np.arange(n_cells) * cell // p.block_size
        block_ids = torch.arange(int(blocks[-1]) + 1)
        layout = p.block_mask(problem, block_ids, block_ids)[head].numpy()
        visible = layout[np.ix_(blocks, blocks)]
        if p.causal:
            i = np.arange(n_cells)
            below = i[:, None] > i[None, :]
            diag = i[:, None] == i[None, :]
            cells = np.where(visible & below, FULL, np.where(visible & diag, PARTIAL if cell > 1 else FULL, EMPTY))
        else:
            cells = np.where(visible, FULL, EMPTY)
        cells = cells.astype(np.int8).reshape(dim.q_tiles, dim.tq // cell, dim.k_tiles, dim.tk // cell)
        lo, hi = cells.min(axis=(1, 3)), cells.max(axis=(1, 3))
        return np.where(lo == FULL, FULL, np.where(hi == EMPTY, EMPTY, PARTIAL)).astype(np.int8)

    def head_signature(self, p, problem, head):
        kv_head = head // (problem.heads // problem.kv_heads)
        if kv_head >= problem.kv_heads - p.dense_heads:
            return (p, "dense")
        if not p.causal:
            return (p,)
        return (p, (kv_head * p.head_step(problem.heads)) % p.vertical_stride)

    def tag(self, p, ndim):
        s = f"s2_b{p.block_size}_l{_v(p.local_blocks)}_v{p.vertical_stride}"
        if p.dense_heads:
            s += f"_dh{p.dense_heads}"
        if not p.heterogeneous:
            s += "_hom"
        if not p.causal:
            s += "_bi"
        return s


class _Scattered(Lowering):
    def tag(self, p, ndim):
        return f"scattered_w{_v(p.window_size)}" + ("" if _is_default(p.shift, 0) else f"_s{_v(p.shift)}")


class _Routed(Lowering):
    def tag(self, p, ndim):
        return f"routed_r{_v(p.region_size)}_k{p.topk}" + ("_ph" if p.per_head else "")


#: The lowering entry of every family, by DSL class.
LOWERINGS: dict[type, Lowering] = {
    local.Neighborhood: _Neighborhood(), local.SlidingWindow: _SlidingWindow(), local.Halo: _Halo(),
    local.Blocks: _Blocks(), local.Grid: _Grid(),
    sequence.Full: _Full(), sequence.Causal: _Causal(), sequence.Sink: _Sink(),
    sequence.GlobalTokens: _GlobalTokens(), sequence.Documents: _Documents(),
    sequence.StridedShards: _StridedShards(),
    content.Scattered: _Scattered(), content.Routed: _Routed(),
}

#: The separable families (a rule per grid dimension).
SEPARABLE = tuple(cls for cls, entry in LOWERINGS.items() if entry.separable)


def lowering(leaf: Pattern) -> Lowering:
    """The entry of ``leaf``'s family (a bare ``Lowering``, naming only, for others)."""
    for cls in type(leaf).__mro__:
        if cls in LOWERINGS:
            return LOWERINGS[cls]
    return Lowering()


# ------------------------------------------------------------------------------------
# Separable families along one dimension
# ------------------------------------------------------------------------------------
def window_1d(leaf, i, group_len, p: dict):
    """``Separable.window`` of ``leaf``'s family."""
    entry = lowering(leaf)
    if not entry.separable:
        raise TypeError(f"{type(leaf).__name__} is not separable")
    return entry.window(i, group_len, p)


def fold_1d(leaf, length: int, p: dict) -> int:
    """The fold that turns this leaf's key progression into a contiguous run."""
    return lowering(leaf).fold(length, p) if lowering(leaf).separable else 1


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


def choose_fold(pattern: Pattern, problem: Problem) -> tuple[int, ...]:
    """One fold per dimension that suits every separable leaf; 1 where they disagree."""
    folds: list[set[int]] = [set() for _ in problem.grid]
    for leaf in pattern.walk():
        if isinstance(leaf, SEPARABLE):
            for d, p in enumerate(leaf.params(problem)):
                folds[d].add(fold_1d(leaf, problem.grid[d], p))
    return tuple(f.pop() if len(f) == 1 else 1 for f in folds)


# ------------------------------------------------------------------------------------
# Predicates (sympy), classes and signatures of whole patterns
# ------------------------------------------------------------------------------------
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
    entry = lowering(pattern)
    if entry.separable:
        return sp.And(*(entry.predicate_1d(problem.grid[d], s.qx[d], s.kx[d], p)
                        for d, p in enumerate(pattern.params(problem))))
    if isinstance(entry, Flat):
        return entry.predicate(pattern, problem, s)
    raise TypeError(f"{type(pattern).__name__} has no static lowering")


def head_signature(pattern: Pattern, problem: Problem, head: int):
    """A hashable value equal for two heads iff their masks are equal by construction."""
    if isinstance(pattern, PerHead):
        return head_signature(pattern.patterns[head], problem, head)
    if isinstance(pattern, (Union, Intersection)):
        return (type(pattern).__name__,) + tuple(head_signature(p, problem, head) for p in pattern.parts)
    return lowering(pattern).head_signature(pattern, problem, head)


def leaf_for_head(pattern: Pattern, head: int) -> Pattern:
    """``pattern`` with every PerHead replaced by the pattern of ``head``."""
    if isinstance(pattern, PerHead):
        return leaf_for_head(pattern.patterns[head], head)
    if isinstance(pattern, Union):
        return Union(tuple(leaf_for_head(p, head) for p in pattern.parts))
    if isinstance(pattern, Intersection):
        return Intersection(tuple(leaf_for_head(p, head) for p in pattern.parts))
    return pattern


def pattern_tag(pattern: Pattern, ndim: int = 1) -> str:
    """A short readable tag of a pattern: ``Neighborhood(7, dilation=2)`` on a 2-D grid ->
    ``na2d_k7_d2``; unions join with ``_or_``, intersections with ``_and_``."""
    if isinstance(pattern, Union):
        return "_or_".join(pattern_tag(c, ndim) for c in pattern.parts)
    if isinstance(pattern, Intersection):
        return "_and_".join(pattern_tag(c, ndim) for c in pattern.parts)
    if isinstance(pattern, PerHead):
        seen: list[str] = []
        for c in pattern.patterns:
            t = pattern_tag(c, ndim)
            if t not in seen:
                seen.append(t)
        return f"perhead{len(pattern.patterns)}_" + "_".join(seen)
    return lowering(pattern).tag(pattern, ndim)
