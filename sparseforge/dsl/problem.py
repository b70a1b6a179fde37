"""The problem a pattern is applied to: token grids (queries', keys'), heads, head dim, dtype."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .args import positive_int

DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp64": torch.float64, "float64": torch.float64, "double": torch.float64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {torch.float16: "fp16", torch.bfloat16: "bf16",
                                       torch.float32: "fp32", torch.float64: "fp64"}


def as_dtype(value) -> torch.dtype:
    """A torch floating dtype from a dtype or one of the names in ``DTYPES``."""
    if isinstance(value, torch.dtype):
        if value not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {sorted(set(DTYPE_NAMES.values()))}, got {value}")
        return value
    if isinstance(value, str) and value.lower() in DTYPES:
        return DTYPES[value.lower()]
    raise ValueError(f"dtype must be a torch float dtype or one of {sorted(DTYPES)}, got {value!r}")


def as_grid(value, name: str = "grid") -> tuple[int, ...] | None:
    """A token grid: an int (1-D sequence) or a tuple of ints, each >= 1; None for grid-free
    patterns. ``name`` is the argument errors name."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        if not 1 <= len(value) <= 3:
            raise ValueError(f"{name} must have 1, 2 or 3 dimensions, got {tuple(value)!r}")
        return tuple(positive_int(f"{name}[{i}]", v) for i, v in enumerate(value))
    return (positive_int(name, value),)


@dataclass(frozen=True)
class Problem:
    """Shapes an attention problem is compiled for.

    grid:     the queries' token grid (S_1, ..., S_n), N = prod(grid), tokens flattened
              row-major; None for patterns whose tokens come at run time (``Scattered``).
    heads:    query heads H.
    head_dim: D, the per-head channel count of q, k and v.
    dtype:    element type of q, k, v (fp16, bf16, fp32).
    kv_heads: key/value heads (GQA/MQA); must divide ``heads``; default ``heads``.
    kv_grid:  the keys' token grid when it is not ``grid`` (cross attention, decode, pooled
              keys, strided queries); Nk = prod(kv_grid). Default (None, or equal to
              ``grid``, which is stored as None): keys and queries share ``grid``. How a
              query is placed on the key grid (``dsl.semantics.placement``): two 1-D grids
              are one sequence whose last Nq positions are the queries (bottom-right, as
              FlashAttention; Nq <= Nk); N-D grids of one rank with an integer ratio per
              dimension place query coordinate ``q`` at ``q * r`` (keys ``r`` times finer:
              strided queries) or ``q // r`` (keys ``r`` times coarser: pooled keys).
              Patterns that read no query position (Full, Sink, GlobalTokens' keys, Grouped)
              take any pair of grids.
    """

    grid: tuple[int, ...] | None = None
    heads: int = 1
    head_dim: int = 64
    dtype: torch.dtype = torch.float16
    kv_heads: int | None = field(default=None)
    kv_grid: tuple[int, ...] | None = field(default=None)

    def __post_init__(self):
        object.__setattr__(self, "grid", as_grid(self.grid))
        positive_int("heads", self.heads)
        positive_int("head_dim", self.head_dim)
        object.__setattr__(self, "dtype", as_dtype(self.dtype))
        kv = self.heads if self.kv_heads is None else positive_int("kv_heads", self.kv_heads)
        if self.heads % kv:
            raise ValueError(f"kv_heads must divide heads, got kv_heads={kv}, heads={self.heads}")
        object.__setattr__(self, "kv_heads", kv)
        kv_grid = as_grid(self.kv_grid, "kv_grid")
        if kv_grid is not None and self.grid is None:
            raise ValueError(f"kv_grid={kv_grid} needs a query grid: give Problem(grid=..., kv_grid=...) (patterns "
                             "whose tokens come at run time, grid=None, have one set of tokens)")
        # one problem, one repr, one hash: keys on the query grid are the default
        object.__setattr__(self, "kv_grid", None if kv_grid == self.grid else kv_grid)

    @property
    def ndim(self) -> int:
        return 0 if self.grid is None else len(self.grid)

    @property
    def tokens(self) -> int:
        """N, the number of tokens (prod(grid)); needs a grid."""
        if self.grid is None:
            raise ValueError("this Problem has no grid; give Problem(grid=...) for a static pattern")
        return math.prod(self.grid)

    @property
    def q_grid(self) -> tuple[int, ...] | None:
        """The queries' grid (``grid``)."""
        return self.grid

    @property
    def key_grid(self) -> tuple[int, ...] | None:
        """The keys' grid: ``kv_grid``, or ``grid`` when the keys share it."""
        return self.grid if self.kv_grid is None else self.kv_grid

    @property
    def kv_tokens(self) -> int:
        """Nk, the number of key tokens (prod(key_grid)); ``tokens`` when the keys share the grid."""
        return self.tokens if self.kv_grid is None else math.prod(self.kv_grid)

    @property
    def is_cross(self) -> bool:
        """True when the keys live on a grid of their own (``kv_grid`` given and not ``grid``)."""
        return self.kv_grid is not None

    def with_grid(self, grid, kv_grid=None) -> "Problem":
        """This problem on another query grid (and key grid; default: the keys share it)."""
        return Problem(grid=grid, heads=self.heads, head_dim=self.head_dim, dtype=self.dtype,
                       kv_heads=self.kv_heads, kv_grid=kv_grid)

    def on_key_grid(self) -> "Problem":
        """Self attention on the key grid (the problem the pattern is evaluated on, with the
        queries placed on it: ``dsl.semantics.placement``)."""
        return self if self.kv_grid is None else self.with_grid(self.kv_grid)

    def __repr__(self) -> str:
        kv = "" if self.kv_heads == self.heads else f", kv_heads={self.kv_heads}"
        kvg = "" if self.kv_grid is None else f", kv_grid={self.kv_grid}"
        return (f"Problem(grid={self.grid}{kvg}, heads={self.heads}, head_dim={self.head_dim}, "
                f"dtype={DTYPE_NAMES[self.dtype]}{kv})")

    def name(self) -> str:
        """Readable tag for file and op names, e.g. ``g56x56_h8_d64_bf16`` (``g1_kv4096_...``
        when the keys have a grid of their own)."""
        g = "x".join(map(str, self.grid)) if self.grid else "var"
        kv = "" if self.kv_grid is None else "_kv" + "x".join(map(str, self.kv_grid))
        return f"g{g}{kv}_h{self.heads}_d{self.head_dim}_{DTYPE_NAMES[self.dtype]}"


# ------------------------------------------------------------------------------------
# Where a query sits on the key grid
# ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    """How the queries of a problem are placed on its key grid (``placement``).

    kind:   "same" (keys share the query grid: query i is key position i), "sequence" (two
            1-D grids: query i sits at key position ``i + offset``, ``offset = Nk - Nq``),
            "ratio" (N-D grids of one rank: query coordinate ``c`` sits at ``c * mul // div``
            per dimension) or None (no placement: the grids have no such relation; ``reason``
            says why).
    """

    kind: str | None
    offset: int = 0
    ratios: tuple[tuple[int, int], ...] = ()
    reason: str = ""

    @property
    def aligned(self) -> bool:
        return self.kind is not None

    def positions(self, qi, q_grid: tuple[int, ...], k_grid: tuple[int, ...]):
        """Flat key-grid positions of the flat query indices ``qi`` (an int64 tensor)."""
        if self.kind == "same":
            return qi
        if self.kind == "sequence":
            return qi + self.offset
        if self.kind == "ratio":
            out = torch.zeros_like(qi)
            for d, ((mul, div), qs, ks) in enumerate(zip(self.ratios, q_grid, k_grid)):
                coord = (qi // math.prod(q_grid[d + 1:])) % qs
                out = out * ks + coord * mul // div
            return out
        raise ValueError(f"the queries have no place on the key grid: {self.reason}")


def placement(problem: "Problem") -> Placement:
    """Where ``problem``'s queries sit on its key grid — the rule every pattern that reads
    query positions is evaluated by (on the key grid, as self attention there):

    - no ``kv_grid``: query i is key position i;
    - two 1-D grids: one sequence, the queries are its LAST Nq positions (bottom-right
      alignment, as FlashAttention: decode and chunked prefill): query i sits at
      ``i + Nk - Nq``; needs Nq <= Nk;
    - N-D grids of one rank, per dimension an integer ratio either way: keys ``r = Sk / Sq``
      times finer (strided queries, e.g. HaloNet stride 2) place coordinate ``c`` at
      ``c * r``; keys ``r = Sq / Sk`` times coarser (pooled keys, e.g. PVT, Twins GSA) at
      ``c // r``. A 1-D sequence with such a ratio is written as a (1, N) grid.
    Any other pair of grids has no placement (``Placement.kind`` None, ``reason`` says why):
    only patterns that read no query position apply there."""
    qg, kg = problem.grid, problem.kv_grid
    if kg is None:
        return Placement("same")
    if len(qg) != len(kg):
        return Placement(None, reason=f"grid={qg} and kv_grid={kg} have different numbers of dimensions")
    if len(qg) == 1:
        if qg[0] > kg[0]:
            return Placement(None, reason=f"the 1-D queries are the last Nq positions of the keys' sequence "
                                          f"(bottom-right alignment), which needs Nq <= Nk; got Nq={qg[0]} "
                                          f"(grid) > Nk={kg[0]} (kv_grid)")
        return Placement("sequence", offset=kg[0] - qg[0])
    ratios = []
    for d, (q, k) in enumerate(zip(qg, kg)):
        if k % q == 0:
            ratios.append((k // q, 1))
        elif q % k == 0:
            ratios.append((1, q // k))
        else:
            return Placement(None, reason=f"grid={qg} and kv_grid={kg} have no integer ratio in dimension {d} "
                                          f"({q} queries, {k} keys); one extent must divide the other")
    return Placement("ratio", ratios=tuple(ratios))
