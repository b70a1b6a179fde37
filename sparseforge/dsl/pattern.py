"""The ``Pattern`` base class, the mask-evaluation context and the combinators.

A pattern is an immutable description of which query may attend to which key. Its exact
meaning is ``Pattern.mask``: given flat query indices ``qi`` [nq] and key indices ``ki``
[nk] it returns a bool tensor broadcastable to [B, H, nq, nk] (B only for patterns whose
mask depends on run-time content). Everything else — dense masks, the float64 reference,
tile schedules — is derived from, or tested against, that one method.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch

from .problem import Placement, Problem

# Bump when the meaning of an existing pattern changes: it is part of every fingerprint.
SEMANTICS_VERSION = 1


@dataclasses.dataclass
class MaskContext:
    """What a pattern's mask may read: the problem and the run-time inputs.

    problem: the problem the pattern is evaluated on: self attention on the key grid
             (``Problem.on_key_grid``; the given problem itself when keys share its grid).
    tokens:  Nq, the query rows; ``keys``: Nk, the key columns.
    given:   the problem as given, when its keys have a grid of their own (None otherwise).
    placement: where the queries sit on the key grid (``dsl.problem.placement``); a pattern
             reads query positions only through ``query_positions``.
    q, k:    float64 [B, H, N, D] (k already expanded from kv_heads to heads), for routing.
    coords:  int64 [N, 1 + ndim] voxel coordinates (batch first), for ``Scattered``.
    routes:  int64 [B, H or 1, R, topk] routing given by the caller instead of computed.
    groups:  int64 [B, H or 1, N] group ids (negative: no group), for ``Grouped``;
    kv_groups: the keys' group ids [B, H or 1, Nk] when the keys are not the queries (None:
             ``groups``).
    """

    problem: Problem
    tokens: int
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    coords: torch.Tensor | None = None
    routes: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    cache: dict = dataclasses.field(default_factory=dict)
    kv_tokens: int | None = None
    given: Problem | None = None
    placement: Placement | None = None
    kv_groups: torch.Tensor | None = None

    @property
    def keys(self) -> int:
        """Nk, the number of key tokens (``tokens`` when keys and queries are one set)."""
        return self.tokens if self.kv_tokens is None else self.kv_tokens

    @property
    def aligned(self) -> bool:
        """Whether the queries have a place on the key grid (always, without ``kv_grid``)."""
        return self.placement is None or self.placement.aligned

    def query_positions(self, qi: torch.Tensor) -> torch.Tensor:
        """Flat key-grid positions of the flat query indices ``qi``: ``qi`` itself when keys and
        queries share the grid, else as ``dsl.problem.placement`` places them (ValueError when
        the grids give the queries no place)."""
        if self.placement is None or self.given is None:
            return qi
        return self.placement.positions(qi, self.given.grid, self.given.kv_grid)

    def key_groups(self) -> torch.Tensor | None:
        """The keys' group ids: ``kv_groups``, or ``groups`` when keys are the queries."""
        return self.groups if self.kv_groups is None else self.kv_groups

    def grid_coord(self, idx: torch.Tensor, dim: int) -> torch.Tensor:
        """Coordinate along grid dimension ``dim`` of flat row-major token indices (of the
        key grid; a query's placed position from ``query_positions`` lives there too)."""
        grid = self.problem.grid
        stride = 1
        for s in grid[dim + 1:]:
            stride *= s
        return (idx // stride) % grid[dim]


def as_4d(mask: torch.Tensor) -> torch.Tensor:
    """A mask of rank 2 [nq, nk], 3 [H, nq, nk] or 4 [B, H, nq, nk] as rank 4."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


class Pattern:
    """Base class of every sparsity pattern. Subclasses are frozen dataclasses.

    Class attributes a family sets:
      ``needs``:   run-time inputs its mask reads: subset of {"qk", "coords", "groups"}.
      ``needs_grid``: False for patterns defined on run-time tokens (voxels).
    """

    needs: ClassVar[frozenset[str]] = frozenset()
    #: Every public pattern constructor by name, filled as families subclass Pattern.
    families: ClassVar[dict[str, type["Pattern"]]] = {}
    needs_grid: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__module__.startswith("sparseforge.dsl.") and not cls.__name__.startswith("_"):
            Pattern.families[cls.__name__] = cls

    # -- meaning --------------------------------------------------------------------
    def check(self, problem: Problem) -> None:
        """Raise ValueError if this pattern cannot be applied to ``problem``."""

    def mask(self, ctx: MaskContext, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
        """Bool tensor broadcastable to [B, H, len(qi), len(ki)]: may query qi[a] see key ki[b].

        ``qi`` are query indices (flat on the query grid), ``ki`` key indices (flat on the key
        grid, ``ctx.problem.grid``); a family that reads a query's position takes it from
        ``ctx.query_positions(qi)`` (the same indices when keys and queries share one grid)."""
        raise NotImplementedError

    #: Whether the mask reads query positions (a leaf's; combinators ask their parts). Such a
    #: pattern needs the queries placed on the key grid (``dsl.problem.placement``).
    reads_query_positions: ClassVar[bool] = True

    def needs_placement(self) -> bool:
        """True when some leaf reads query positions (``reads_query_positions``)."""
        kids = self.children()
        if kids:
            return any(c.needs_placement() for c in kids)
        return self.reads_query_positions

    def children(self) -> tuple["Pattern", ...]:
        return ()

    def walk(self) -> Iterable["Pattern"]:
        """This pattern and every pattern below it, depth first."""
        yield self
        for c in self.children():
            yield from c.walk()

    def inputs_needed(self) -> frozenset[str]:
        out: set[str] = set()
        for p in self.walk():
            out |= p.needs
        return frozenset(out)

    @property
    def is_static(self) -> bool:
        """True when the mask is known from shapes alone (no run-time content)."""
        return not self.inputs_needed()

    # -- combinators ----------------------------------------------------------------
    def __or__(self, other: "Pattern") -> "Pattern":
        return Union.of(self, _pattern_operand("|", other))

    def __and__(self, other: "Pattern") -> "Pattern":
        return Intersection.of(self, _pattern_operand("&", other))

    def __bool__(self):
        raise TypeError(
            f"the truth value of a pattern is undefined ({self!r}); combine patterns with "
            "'|' (union) and '&' (intersection), not 'or'/'and'"
        )

    # -- identity -------------------------------------------------------------------
    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required:
                parts.append(_literal(value))
            elif value != f.default:
                parts.append(f"{f.name}={_literal(value)}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def fingerprint(self) -> str:
        """Stable content hash: equal iff the patterns are equal (same repr, same semantics)."""
        text = f"sparseforge-pattern/{SEMANTICS_VERSION}/{self!r}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _literal(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(_literal(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


def _pattern_operand(op: str, other) -> "Pattern":
    if not isinstance(other, Pattern):
        raise TypeError(f"'{op}' combines two patterns, got {other!r} ({type(other).__name__})")
    return other


def _flat_parts(cls: type, parts) -> tuple["Pattern", ...]:
    """``parts`` as a flat tuple: a part of the same combinator gives its own parts in its
    place (``a | (b | c)`` is one union of three), so equal patterns have one structure, one
    repr and one fingerprint however they were built, and the repr parses back to them."""
    if isinstance(parts, list):
        parts = tuple(parts)
    if not isinstance(parts, tuple):
        raise TypeError(f"{cls.__name__} takes a tuple of patterns, got {parts!r} ({type(parts).__name__})")
    flat: list[Pattern] = []
    for i, p in enumerate(parts):
        if not isinstance(p, Pattern):
            raise TypeError(f"{cls.__name__} parts[{i}] must be a pattern, got {p!r} ({type(p).__name__})")
        flat.extend(p.parts if type(p) is cls else (p,))
    if len(flat) < 2:
        raise ValueError(f"{cls.__name__} needs at least two parts, got {len(flat)} ({tuple(flat)!r}); "
                         "a single pattern stands on its own")
    return tuple(flat)


@dataclasses.dataclass(frozen=True, repr=False)
class Union(Pattern):
    """Keys allowed by any of ``parts`` (``a | b``); nested unions are flattened into one."""

    parts: tuple[Pattern, ...]

    def __post_init__(self):
        object.__setattr__(self, "parts", _flat_parts(Union, self.parts))

    @classmethod
    def of(cls, a: Pattern, b: Pattern) -> "Union":
        return cls((a, b))

    def children(self):
        return self.parts

    def check(self, problem):
        for p in self.parts:
            p.check(problem)

    def mask(self, ctx, qi, ki):
        out = as_4d(self.parts[0].mask(ctx, qi, ki))
        for p in self.parts[1:]:
            out = out | as_4d(p.mask(ctx, qi, ki))
        return out

    def __repr__(self):
        return "(" + " | ".join(map(repr, self.parts)) + ")"


@dataclasses.dataclass(frozen=True, repr=False)
class Intersection(Pattern):
    """Keys allowed by all of ``parts`` (``a & b``); nested intersections are flattened into one."""

    parts: tuple[Pattern, ...]

    def __post_init__(self):
        object.__setattr__(self, "parts", _flat_parts(Intersection, self.parts))

    @classmethod
    def of(cls, a: Pattern, b: Pattern) -> "Intersection":
        return cls((a, b))

    def children(self):
        return self.parts

    def check(self, problem):
        for p in self.parts:
            p.check(problem)

    def mask(self, ctx, qi, ki):
        out = as_4d(self.parts[0].mask(ctx, qi, ki))
        for p in self.parts[1:]:
            out = out & as_4d(p.mask(ctx, qi, ki))
        return out

    def __repr__(self):
        return "(" + " & ".join(map(repr, self.parts)) + ")"


@dataclasses.dataclass(frozen=True, repr=False)
class PerHead(Pattern):
    """Head ``h`` uses ``patterns[h]``; the list length must equal ``Problem.heads``."""

    patterns: tuple[Pattern, ...]

    def __init__(self, patterns):
        if isinstance(patterns, Pattern) or not isinstance(patterns, (list, tuple)):
            raise TypeError(f"PerHead takes a list of patterns (one per head), got {patterns!r}")
        if not patterns:
            raise ValueError("PerHead needs at least one pattern, got an empty list")
        for i, p in enumerate(patterns):
            if not isinstance(p, Pattern):
                raise TypeError(f"PerHead patterns[{i}] must be a pattern, got {p!r}")
        object.__setattr__(self, "patterns", tuple(patterns))

    def children(self):
        return self.patterns

    def runs(self) -> list[tuple[Pattern, int]]:
        """Consecutive equal patterns folded: ``[(pattern, heads it covers), ...]``."""
        out: list[tuple[Pattern, int]] = []
        for p in self.patterns:
            if out and out[-1][0] == p:
                out[-1] = (p, out[-1][1] + 1)
            else:
                out.append((p, 1))
        return out

    def check(self, problem):
        if len(self.patterns) != problem.heads:
            raise ValueError(
                f"PerHead has {len(self.patterns)} patterns but the problem has heads={problem.heads}; "
                "give exactly one pattern per head")
        for p in self.patterns:
            p.check(problem)

    def mask(self, ctx, qi, ki):
        # one mask per distinct pattern, selected per head with elementwise ``where`` (no
        # per-head tensors, so thousands of heads stay cheap; no data-dependent ops, so the
        # mask still evaluates under vmap, as FlexAttention's mask_mod does)
        index: dict[Pattern, int] = {}
        which = torch.tensor([index.setdefault(p, len(index)) for p in self.patterns])
        out = None
        for j, p in enumerate(index):
            m = as_4d(p.mask(ctx, qi, ki))
            out = m if out is None else torch.where((which == j).to(m.device)[None, :, None, None], m, out)
        return out.expand(out.shape[0], len(self.patterns), len(qi), len(ki))

    def __repr__(self):
        return "PerHead([" + ", ".join(map(repr, self.patterns)) + "])"


def registry() -> Mapping[str, type[Pattern]]:
    """Every public pattern constructor by name (what the CLI parser accepts): the families
    that subclassed ``Pattern`` (``dsl/__init__`` imports them all), less the combinators
    spelled ``|`` and ``&``."""
    return {name: cls for name, cls in Pattern.families.items() if cls not in (Union, Intersection)}
