"""Memory estimates of the tile schedule (``lower.schedule.build_schedule``), checked against
the budget of ``dsl.budget`` before anything is allocated.

The schedule's memory: an int8 [query tiles, key tiles] class matrix per head group (kept
until the CSR is built), the transient arrays of classifying one group (per tile pair: ~1
byte for the separable families, up to ~20 for the flat ones, ~80 for ``StridedShards``,
measured with ``ru_maxrss``), the token tables, and the CSR of the visited tiles (~52
bytes per visited tile for the forward and inverse CSR).
"""
from __future__ import annotations

import math

import numpy as np

from ..dsl.budget import check, format_bytes
from ..dsl.pattern import Intersection, Union
from .families import SEPARABLE

#: Transient bytes per (query tile, key tile) pair while one head group is classified: a
#: separable family's classes come from per-dimension ones; a flat family's from arrays of
#: tile pairs (``FLAT_PAIR_BYTES`` by family name, else the default).
SEPARABLE_PAIR_BYTES = 1
DEFAULT_FLAT_PAIR_BYTES = 24
FLAT_PAIR_BYTES = {"StridedShards": 96}
#: Extra bytes per pair where unions/intersections combine the classes of their parts.
COMBINE_PAIR_BYTES = 2
#: Bytes per padded token of the token tables (q and k, with their temporaries).
TOKEN_BYTES = 96
#: Bytes per visited tile while the forward and inverse CSR are built (indices, sort, tables).
CSR_VISIT_BYTES = 56

ADVICE = "use a smaller grid or larger tiles (q_tile/k_tile)"


def _describe(problem, geom, groups: int) -> str:
    tiles = f"{geom.n_q_tiles} query x {geom.n_k_tiles} key tiles of {geom.block_m}/{geom.block_n} tokens"
    return f"grid {problem.grid}: {tiles}, {groups} head group{'s' if groups != 1 else ''}"


def classify_pair_bytes(pattern) -> int:
    """Transient bytes per tile pair of classifying one head group of ``pattern`` (its
    costliest family, plus the combinators')."""
    per_leaf = max((SEPARABLE_PAIR_BYTES if isinstance(p, SEPARABLE) else
                    FLAT_PAIR_BYTES.get(type(p).__name__, DEFAULT_FLAT_PAIR_BYTES)
                    for p in pattern.walk() if not p.children()), default=SEPARABLE_PAIR_BYTES)
    combined = any(isinstance(p, (Union, Intersection)) for p in pattern.walk())
    return per_leaf + (COMBINE_PAIR_BYTES if combined else 0)


def check_schedule(pattern, problem, geoms, groups: int) -> None:
    """Before classifying: the class matrices, one group's transients and the token tables."""
    geoms = geoms if isinstance(geoms, tuple) else (geoms,)
    geom = geoms[0]
    pairs = geom.n_q_tiles * geom.n_k_tiles
    per_pair = classify_pair_bytes(pattern)
    tokens = sum(math.prod(d.extent for d in g.dims) for g in geoms)
    need = groups * pairs + pairs * per_pair + tokens * TOKEN_BYTES
    check("the tile schedule", need,
          f"{_describe(problem, geom, groups)}; an int8 class matrix of {pairs} tile pairs per group "
          f"plus {per_pair} bytes per pair to classify one", ADVICE)


def check_tables(problem, geom, classes: list[np.ndarray]) -> None:
    """Before the CSR: the class matrices still held plus the CSR of the visited tiles (counted
    only when the worst case, every tile visited, would not fit)."""
    held = sum(c.nbytes for c in classes)
    if not _over(held + held * CSR_VISIT_BYTES):
        return
    visited = sum(int(np.count_nonzero(c)) for c in classes)
    check("the tile schedule's tables", held + visited * CSR_VISIT_BYTES,
          f"{_describe(problem, geom, len(classes))}; {visited} visited tiles at {CSR_VISIT_BYTES} bytes each "
          f"to build the CSR, plus the {format_bytes(held)} class matrices", ADVICE)


def _over(need: int) -> bool:
    from ..dsl.budget import budget

    limit, _ = budget()
    return limit is not None and need > limit
