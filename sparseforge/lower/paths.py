"""The three ways attention finds its key tiles, behind one small interface.

A ``Path`` knows, for its kind of pattern:

- ``build(pattern, problem, config)``: the ``TileSchedule`` (per grid for static and routed
  attention, once for segments, whose packed length comes with every plan);
- ``dkdv_schedule(schedule, config)``: the schedule the dK/dV kernel walks (static attention:
  one of the config's dK/dV tiles; the others run every kernel on one tiling);
- ``kernel_tables(schedule, tables, device)``: the generated kernels' index tables by argument
  name, from the per-call ``tables`` the ops receive (none for static attention: its tables
  are the schedule's; the routes for routed attention; a plan's tensors for segments);
- ``chunks(schedule, tables, shape, device)``: the same visiting order as row indices for the
  CPU executor (``backends.cpu``), a chunk of query rows at a time;
- ``template``: the template hooks (``codegen.render``): which predicate masks a PARTIAL tile
  ("pattern": the pattern's own, "none": every visited pair is allowed, "segments": the
  run-time segment-id compare) and whether the head-group table is per batch element.

Paths: ``STATIC`` (patterns without run-time content), ``ROUTED`` (``dsl.content.Routed``:
tables built per call from the routes) and ``SEGMENTS`` (``Scattered`` voxel windows and
``Grouped`` run-time groups, on the packed sequence with segment ids).
"""
from __future__ import annotations

import dataclasses
import threading
import weakref
from collections.abc import Iterator
from typing import ClassVar

import torch

from ..dsl.content import Grouped, Routed, Scattered
from ..dsl.pattern import Pattern, as_4d
from ..dsl.problem import Problem
from ..dsl.semantics import make_context
from .routed import build_routed_schedule, routed_tables
from .schedule import TileSchedule, build_schedule
from .segments import build_scattered_schedule, tables_from

__all__ = ["Chunk", "Path", "ROUTED", "SEGMENTS", "STATIC", "Shape", "path_of"]

# Total bytes of cached PARTIAL-tile masks per static schedule; beyond it masks are recomputed.
MASK_CACHE_BYTES = 256 << 20
# Elements of one segment chunk's gathered scores (heads x query rows x key rows).
SEGMENT_CHUNK_ELEMENTS = 1 << 24


@dataclasses.dataclass(frozen=True)
class Shape:
    """The extents of one call: q [batch, heads, tokens, D], k/v [batch, kv_heads, tokens, D]."""

    batch: int
    heads: int
    kv_heads: int
    tokens: int


@dataclasses.dataclass(frozen=True, eq=False)
class Chunk:
    """Work for the CPU executor: query rows against key rows, with the mask between them.

    q_rows: int64 [..., m] rows of q.reshape(-1, D); -1 marks a padding row (read as row 0,
            never written)
    k_rows: int64 [..., nk] rows of k.reshape(-1, D) (and of v)
    mask:   bool broadcastable to [..., m, nk], or None when every pair is allowed
    q_tokens, k_tokens: int64 [m], [nk], the rows' tokens on the grid the bias terms measure
            (None: a row's token is its index within its (batch, head) block of rows)
    """

    q_rows: torch.Tensor
    k_rows: torch.Tensor
    mask: torch.Tensor | None
    q_tokens: torch.Tensor | None = None
    k_tokens: torch.Tensor | None = None


class Path:
    """The interface (see the module docstring); one instance per kind."""

    name: ClassVar[str]
    #: template hooks: "pattern" | "none" | "segments"
    predicate: ClassVar[str]
    #: the head-group table is [B, H] (tables per call and batch element) rather than [H]
    batched_head_groups: ClassVar[bool] = False
    #: the schedule does not depend on the grid (the packed length comes with the tables)
    grid_free: ClassVar[bool] = False

    def build(self, pattern: Pattern, problem: Problem, config) -> TileSchedule:
        raise NotImplementedError

    def dkdv_schedule(self, schedule: TileSchedule, config) -> TileSchedule:
        """The schedule of the dK/dV kernel under ``config`` (resolved): ``schedule`` itself,
        the only tiling this path has (routed tiles follow the regions; segment plans come
        with their tables)."""
        if not config.shared_tiling:
            raise ValueError(f"{self.name} attention runs every kernel on one tiling: dkdv_q_tile="
                             f"{config.dkdv_q_tile} / dkdv_k_tile={config.dkdv_k_tile} must equal q_tile="
                             f"{config.q_tile} / k_tile={config.k_tile} (or be left unset)")
        return schedule

    def kernel_tables(self, schedule: TileSchedule, tables: list[torch.Tensor], device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def chunks(self, schedule: TileSchedule, tables: list[torch.Tensor], shape: Shape, device) -> Iterator[Chunk]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<path {self.name}>"


# ------------------------------------------------------------------------------------
# Static: the schedule's own tables
# ------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Step:
    """One (schedule group, query tile) with something to visit."""

    heads: torch.Tensor      # int64 [Hg] query heads of the group
    kv_heads: torch.Tensor   # int64 [Hg] their key/value heads
    q_tokens: torch.Tensor   # int64 [nq] query tokens of the tile (padding dropped)
    k_tokens: torch.Tensor   # int64 [nk] tokens of every visited key tile (padding dropped)
    n_full: int              # the first n_full of k_tokens come from FULL tiles
    mask: torch.Tensor | None = None  # bool [1 or Hg, nq, nk]; None: not cached (or all allowed)


class _Steps:
    """The visiting steps of a static schedule and their PARTIAL-tile masks (cached up to
    ``MASK_CACHE_BYTES``, recomputed beyond)."""

    def __init__(self, schedule: TileSchedule):
        self.schedule = schedule
        problem = schedule.problem
        self.ctx = make_context(schedule.pattern, problem)
        rep = problem.heads // problem.kv_heads
        head_group = torch.from_numpy(schedule.head_group.astype("int64"))
        self.steps: list[_Step] = []
        cached = 0
        for g in range(schedule.groups):
            heads = torch.nonzero(head_group == g).flatten()
            if len(heads) == 0:
                continue
            for visit in schedule.visits(g):
                step = _Step(heads, heads // rep, visit.q_tokens, visit.k_tokens, visit.n_full)
                if step.n_full < len(step.k_tokens) and cached < MASK_CACHE_BYTES:
                    step.mask = self.mask(step)
                    cached += step.mask.numel()
                self.steps.append(step)

    def mask(self, step: _Step) -> torch.Tensor | None:
        """bool [1 or Hg, nq, nk]: True on FULL-tile keys, the pattern's exact mask on
        PARTIAL-tile keys. None when every visited tile is FULL."""
        if step.mask is not None:
            return step.mask
        nq, nk = len(step.q_tokens), len(step.k_tokens)
        if step.n_full == nk:
            return None
        part = step.k_tokens[step.n_full:]
        m = as_4d(self.schedule.pattern.mask(self.ctx, step.q_tokens, part))
        if m.shape[0] != 1:
            raise ValueError(f"{self.schedule.pattern!r} has a per-batch mask; the static path takes static "
                             "patterns only")
        m = m[0]  # [1 or H, nq, p]
        if m.shape[0] > 1:
            m = m.index_select(0, step.heads)
            if bool((m == m[:1]).all()):
                m = m[:1]
        m = m.expand(m.shape[0], nq, len(part))
        if step.n_full == 0:
            return m.contiguous()
        ones = torch.ones(m.shape[0], nq, step.n_full, dtype=torch.bool)
        return torch.cat([ones, m], dim=-1)


class _StaticPath(Path):
    name = "static"
    predicate = "pattern"

    def __init__(self):
        self._steps: "weakref.WeakKeyDictionary[TileSchedule, _Steps]" = weakref.WeakKeyDictionary()
        self._tables: "weakref.WeakKeyDictionary[TileSchedule, dict]" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def build(self, pattern, problem, config) -> TileSchedule:
        config = config.resolved(problem)
        return build_schedule(pattern, problem, q_tile=config.q_tile, k_tile=config.k_tile,
                              closed_form=config.closed_form)

    def dkdv_schedule(self, schedule, config) -> TileSchedule:
        """A schedule of the dK/dV tiles (index tables only: that kernel walks the inverse
        tables), or ``schedule`` when they are its tiles."""
        geom = schedule.geometry
        if (config.dkdv_q_tile, config.dkdv_k_tile) == (geom.q_tile, geom.k_tile):
            return schedule
        return build_schedule(schedule.pattern, schedule.problem, q_tile=config.dkdv_q_tile,
                              k_tile=config.dkdv_k_tile, closed_form=False)

    def kernel_tables(self, schedule, tables, device) -> dict[str, torch.Tensor]:
        with self._lock:
            per_device = self._tables.setdefault(schedule, {})
            if device not in per_device:
                per_device[device] = {name: t.to(device) for name, t in schedule.tables().items()}
            return per_device[device]

    def steps(self, schedule: TileSchedule) -> _Steps:
        """The (cached) visiting steps of ``schedule``."""
        with self._lock:
            found = self._steps.get(schedule)
        if found is None:
            found = _Steps(schedule)
            with self._lock:
                found = self._steps.setdefault(schedule, found)
        return found

    def chunks(self, schedule, tables, shape: Shape, device) -> Iterator[Chunk]:
        plan = self.steps(schedule)
        n = shape.tokens
        batch = torch.arange(shape.batch, device=device)[:, None]
        for step in plan.steps:
            heads, kv_heads = step.heads.to(device), step.kv_heads.to(device)
            q_base = (batch * shape.heads + heads[None, :]) * n        # [B, Hg]
            k_base = (batch * shape.kv_heads + kv_heads[None, :]) * n  # [B, Hg]
            mask = plan.mask(step)
            yield Chunk(q_base[..., None] + step.q_tokens.to(device), k_base[..., None] + step.k_tokens.to(device),
                        None if mask is None else mask.to(device))


# ------------------------------------------------------------------------------------
# Routed: tables per call from the routes
# ------------------------------------------------------------------------------------
class _RoutedPath(Path):
    name = "routed"
    predicate = "none"   # tiles never straddle regions: inside a visited tile every pair is allowed
    batched_head_groups = True

    def build(self, pattern, problem, config) -> TileSchedule:
        # Region-aligned tiles: the defaults come from the region, not the grid.
        return build_routed_schedule(pattern, problem, q_tile=config.q_tile, k_tile=config.k_tile)

    def kernel_tables(self, schedule, tables, device) -> dict[str, torch.Tensor]:
        (routes,) = tables
        if routes.shape[0] == 0:  # batch 0: no program runs; any well-formed tables will do
            routes = routes.new_zeros((1, *routes.shape[1:]))
        return routed_tables(schedule, routes).kernels

    def chunks(self, schedule, tables, shape: Shape, device) -> Iterator[Chunk]:
        """A chunk of query tiles at a time, every (batch, head) at once, sized so a gathered
        K (or V) is about as large as q: memory stays O(input) however many routes."""
        (routes,) = tables
        if shape.batch == 0:
            return
        t = routed_tables(schedule, routes)
        a = schedule.routed.device_arrays(device)
        q_tokens, k_tokens = a["q_tokens"], a["k_tokens"]   # [n_q_tiles, bm], [n_k_tiles, bn]; -1 padding
        b, h, kvh, n = shape.batch, shape.heads, shape.kv_heads, shape.tokens
        tiles, valid = t.tiles[t.head_group], t.valid[t.head_group]  # [B, H, nq, S]
        n_q_tiles = q_tokens.shape[0]
        chunk = max(1, n // max(1, tiles.shape[-1] * k_tokens.shape[1]))
        kv_of = torch.arange(h, device=device) // (h // kvh)
        q_base = ((torch.arange(b, device=device)[:, None] * h + torch.arange(h, device=device)) * n)[..., None, None]
        k_base = ((torch.arange(b, device=device)[:, None] * kvh + kv_of[None, :]) * n)[..., None, None]
        for start in range(0, n_q_tiles, chunk):
            sl = slice(start, min(start + chunk, n_q_tiles))
            qtok = q_tokens[sl]                                     # [c, bm]
            ktok = k_tokens[tiles[:, :, sl]]                        # [B, H, c, S, bn]
            kvalid = (ktok >= 0) & valid[:, :, sl, :, None]
            c = qtok.shape[0]
            ktok = ktok.clamp_min(0).reshape(b, h, c, -1)
            kvalid = kvalid.reshape(b, h, c, -1)
            q_rows = torch.where(qtok >= 0, q_base + qtok, torch.full_like(q_base + qtok, -1))  # [B, H, c, bm]
            mask = (qtok >= 0)[None, None, :, :, None] & kvalid[:, :, :, None, :]          # [B, H, c, bm, nk]
            yield Chunk(q_rows, k_base + ktok, mask)


# ------------------------------------------------------------------------------------
# Segments: the packed sequence of a plan, pairs allowed within one segment id
# ------------------------------------------------------------------------------------
class _SegmentPath(Path):
    name = "segments"
    predicate = "segments"
    grid_free = True

    def build(self, pattern, problem, config) -> TileSchedule:
        if isinstance(pattern, Grouped):  # run-time groups: one-voxel "windows" of (batch, group id)
            return build_scattered_schedule(Scattered(window_size=1), problem, q_tile=config.q_tile,
                                            k_tile=config.k_tile, causal=pattern.causal)
        return build_scattered_schedule(pattern, problem, q_tile=config.q_tile, k_tile=config.k_tile)

    def kernel_tables(self, schedule, tables, device) -> dict[str, torch.Tensor]:
        return tables_from(tables, schedule.problem.heads)

    def chunks(self, schedule, tables, shape: Shape, device) -> Iterator[Chunk]:
        """A chunk of query tiles at a time: each query tile's key rows are its visited key
        tiles (``KV_PTR``/``KV_IDX``), the mask is the segment-id compare (padding rows have
        id -1 and match nothing), and key row <= query row for a causal layout."""
        k = tables_from(tables, shape.heads)
        bm, bn = schedule.geometry.block_m, schedule.geometry.block_n
        seg = k["SEG"].long()
        ptr, idx = k["KV_PTR"][0].long(), k["KV_IDX"].long()
        count = ptr[1:] - ptr[:-1]
        nq = len(count)
        s = int(count.max()) if nq else 0
        if s == 0:
            return
        n, h = shape.tokens, shape.heads
        slot = torch.arange(s, device=device)
        valid = slot[None, :] < count[:, None]                                     # [nq, S]
        tiles = idx[(ptr[:-1, None] + slot[None, :]).clamp_max(len(idx) - 1)]      # [nq, S]
        heads = torch.arange(h, device=device)
        q_base = (torch.arange(shape.batch, device=device)[:, None] * h + heads) * n            # [B, H]
        k_base = (torch.arange(shape.batch, device=device)[:, None] * shape.kv_heads
                  + heads // (h // shape.kv_heads)) * n
        chunk = max(1, SEGMENT_CHUNK_ELEMENTS // max(1, shape.batch * h * bm * s * bn))
        for a in range(0, nq, chunk):
            t = torch.arange(a, min(a + chunk, nq), device=device)
            qrows = t[:, None] * bm + torch.arange(bm, device=device)[None, :]                   # [c, bm]
            krows = (tiles[t][:, :, None] * bn + torch.arange(bn, device=device)).reshape(len(t), -1)  # [c, nk]
            kval = valid[t][:, :, None].expand(-1, -1, bn).reshape(len(t), -1)
            kseg = torch.where(kval, seg[krows], torch.full_like(krows, -1))
            mask = (seg[qrows][:, :, None] == kseg[:, None, :]) & (kseg >= 0)[:, None, :]
            if schedule.scattered.causal:
                mask &= krows[:, None, :] <= qrows[:, :, None]
            yield Chunk(q_base[..., None, None] + qrows, k_base[..., None, None] + krows, mask)


STATIC: Path = _StaticPath()
ROUTED: Path = _RoutedPath()
SEGMENTS: Path = _SegmentPath()


def path_of(pattern: Pattern) -> Path:
    """The path that runs ``pattern``: routed, segments (Scattered, Grouped) or static."""
    if isinstance(pattern, Routed):
        return ROUTED
    if isinstance(pattern, (Scattered, Grouped)):
        return SEGMENTS
    return STATIC

