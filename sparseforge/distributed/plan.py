"""The exchange plan: which tokens each rank holds, and which remote key rows its queries may
see, token-exact, from the tile schedule (no dense mask).

Sharding (``layout=``, ``split=``): tokens are cut along the slowest grid dimension
(dimension 0; a 1-D sequence along its tokens), so every shard is a run of whole rows of
dimension 0, or with ``split=(a, b, ...)`` along the leading dimensions, ``a`` runs of
dimension 0 times ``b`` of dimension 1 ... (ranks in row-major order; a 3-D video split in time
and height exchanges thinner halos than one split in time alone):

- ``"contiguous"`` (default): rank r holds the r-th of ``world_size`` near-equal runs
  (``numpy.array_split`` sizes, in units of one dimension-0 row), a contiguous flat range;
- ``"zigzag"``: dimension 0 is cut into ``2 * world_size`` runs and rank r holds runs r and
  ``2 * world_size - 1 - r`` (concatenated in that order): causal masks then give every rank
  about the same work (``ExchangePlan.work`` counts it exactly).

Either way a rank's tokens are sorted (its rows are the full tensor's rows in order).

What a rank needs (``recv[r][p]``): the key tiles each of r's query tiles visits, every key of
a FULL tile, and the keys of PARTIAL tiles that the pattern's mask allows to at least one of
r's queries in that tile (the mask evaluated on those tiles only); the union over heads. So a
local window gets exactly its halo, ``Sink``/``GlobalTokens`` exactly the sink/global rows from
their owners, and Full/Causal everything (Causal: all earlier tokens).

Two ways to move those rows (``EXCHANGES``; the attention picks one, ``choose_exchange``):

- ``"p2p"``: every rank sends each peer exactly the rows it needs, one message per peer
  (halo exchange; a broadcast of sink and global rows from their owners);
- ``"ring"``: each rank's whole shard travels rank to rank along the ring r -> r+1 -> ...,
  and stops after the last rank on its way that needs any of it (``ring_hops``): Full
  goes all the way round, Causal on a contiguous layout only towards later ranks. A rank
  holds at most three shards at a time, however many it sees.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time

import numpy as np
import torch

from ..dsl.pattern import Pattern, as_4d
from ..dsl.problem import Problem
from ..dsl.semantics import make_context
from ..lower.schedule import TileSchedule, build_schedule

LAYOUTS = ("contiguous", "zigzag")
EXCHANGES = ("p2p", "ring")

__all__ = ["EXCHANGES", "LAYOUTS", "RING_BYTES_RATIO", "ExchangePlan", "brute_force_recv", "choose_exchange",
           "plan_exchange", "schedule_groups", "shard_sizes"]


def shard_sizes(units: int, parts: int) -> list[int]:
    """``numpy.array_split`` sizes: ``units`` cut into ``parts`` near-equal runs, larger first."""
    base, extra = divmod(units, parts)
    return [base + 1] * extra + [base] * (parts - extra)


def _rank_tokens(problem: Problem, world_size: int, layout: str, split: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """The sorted flat tokens of every rank: grid dimension d cut into ``split[d]`` runs
    (zigzag: dimension 0 into 2 * world_size), ranks in row-major order over the runs."""
    grid = problem.grid
    if layout == "zigzag":
        split = (2 * world_size,)
    runs_per_dim = []
    for d, parts in enumerate(split):
        if grid[d] < parts:
            raise ValueError(f"world_size={world_size} with layout={layout!r} and split={split} cuts grid dimension "
                             f"{d} (extent {grid[d]}) into {parts} runs; expected an extent >= {parts}")
        starts = np.concatenate([[0], np.cumsum(shard_sizes(grid[d], parts))])
        runs_per_dim.append([torch.arange(int(starts[i]), int(starts[i + 1])) for i in range(parts)])
    flat = torch.arange(problem.tokens).reshape(grid)

    def block(index: tuple[int, ...]) -> torch.Tensor:
        t = flat
        for d, i in enumerate(index):
            t = t.index_select(d, runs_per_dim[d][i])
        return t.flatten()

    if layout == "zigzag":
        last = 2 * world_size - 1
        return tuple(torch.cat([block((r,)), block((last - r,))]) for r in range(world_size))
    return tuple(block(tuple(int(i) for i in np.unravel_index(r, split))) for r in range(world_size))


def token_owner(tokens: tuple[torch.Tensor, ...], n: int) -> torch.Tensor:
    """int64 [n]: the rank holding each token (``tokens[r]``: rank r's tokens)."""
    owner = torch.empty(n, dtype=torch.long)
    for r, t in enumerate(tokens):
        owner[t] = r
    return owner


# ------------------------------------------------------------------------------------
# The schedule, decoded per head group
# ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ScheduleGroup:
    """One head group's forward schedule as flat tensors.

    heads:   int64 [Hg], the query heads of the group;
    q_table: int64 [nQ, tq] the flat tokens of each query tile (-1: past the grid);
    k_table: int64 [nK, tk] the same for key tiles;
    row:     int64 [E] the query tile of each (query tile, key tile) entry;
    ktile:   int64 [E] its key tile;
    full:    bool [E] FULL (every pair allowed, for every head of the group) or PARTIAL.
    """

    heads: torch.Tensor
    q_table: torch.Tensor
    k_table: torch.Tensor
    row: torch.Tensor
    ktile: torch.Tensor
    full: torch.Tensor


def schedule_groups(sched: TileSchedule) -> list[ScheduleGroup]:
    """Every head group of ``sched`` decoded (``ScheduleGroup``)."""
    head_group = torch.from_numpy(np.asarray(sched.head_group))
    idx_all = torch.from_numpy(np.asarray(sched.forward.idx)).long()
    out = []
    for g in range(sched.groups):
        geom = sched.geometry_of(g)
        ptr = torch.from_numpy(np.asarray(sched.forward.ptr[g])).long()
        n_full = torch.from_numpy(np.asarray(sched.forward.full[g])).long()
        row = torch.repeat_interleave(torch.arange(len(ptr) - 1), ptr[1:] - ptr[:-1])
        full = torch.arange(len(row)) - (ptr[row] - ptr[0]) < n_full[row]
        out.append(ScheduleGroup(torch.nonzero(head_group == g).flatten(), torch.from_numpy(geom.token_table("q")),
                                 torch.from_numpy(geom.token_table("k")), row,
                                 idx_all[int(ptr[0]):int(ptr[-1])], full))
    return out


# ------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class ExchangePlan:
    """Which tokens each rank holds and which remote key rows it receives, token-exact.

    tokens[r]:  int64 [N_r], sorted: the flat (row-major) token indices rank r holds (q, k, v
                and out shards are these rows of the full tensors, in this order).
    recv[r][p]: int64, sorted: the tokens of rank p that rank r's queries may see (empty
                for p == r).
    work[r]:    allowed (query, key) pairs of rank r's queries, summed over query heads
                (None when the plan was built with ``count_work=False``).
    """

    pattern: Pattern
    problem: Problem
    world_size: int
    layout: str
    split: tuple[int, ...]
    tokens: tuple[torch.Tensor, ...]
    recv: tuple[tuple[torch.Tensor, ...], ...]
    work: tuple[int, ...] | None
    build_seconds: float = 0.0

    # -- who needs what ---------------------------------------------------------------
    @functools.cached_property
    def owner(self) -> torch.Tensor:
        """int64 [N]: the rank holding each token."""
        return token_owner(self.tokens, self.problem.tokens)

    def needs(self, rank: int, owner: int) -> bool:
        """Do rank ``rank``'s queries see any key of ``owner`` (always for its own)."""
        return rank == owner or len(self.recv[rank][owner]) > 0

    def senders(self, rank: int) -> list[int]:
        """The peers rank ``rank`` receives rows from, ascending."""
        return [p for p in range(self.world_size) if p != rank and len(self.recv[rank][p])]

    def receivers(self, rank: int) -> list[int]:
        """The peers that receive rows of rank ``rank``, ascending."""
        return [p for p in range(self.world_size) if p != rank and len(self.recv[p][rank])]

    @functools.lru_cache(maxsize=None)
    def ring_hops(self, owner: int) -> int:
        """How far rank ``owner``'s shard travels along the ring (``owner`` -> ``owner`` + 1 ...):
        the ring distance of the farthest rank that needs any of it (0: nobody)."""
        w = self.world_size
        return max((d for d in range(1, w) if self.needs((owner + d) % w, owner)), default=0)

    # -- counts -------------------------------------------------------------------
    def rows_received(self, rank: int) -> int:
        return sum(len(t) for t in self.recv[rank])

    def rows_sent(self, rank: int) -> int:
        return sum(len(self.recv[p][rank]) for p in range(self.world_size))

    def ring_rows(self, rank: int) -> tuple[int, int]:
        """(token rows of the shards rank ``rank`` passes on along the ring, token rows of the
        shards whose journey ends at it): what it sends per ring step summed over a call."""
        w = self.world_size
        passed = final = 0
        for owner in range(w):
            hops, distance = self.ring_hops(owner), (rank - owner) % w
            if distance < hops:
                passed += len(self.tokens[owner])
            elif distance == hops > 0:
                final += len(self.tokens[owner])
        return passed, final

    def row_bytes(self, *, batch: int = 1, kv_heads: int | None = None, head_dim: int | None = None,
                  dtype: torch.dtype | None = None) -> int:
        """Bytes of one token's K and V rows: batch x kv_heads x 2 x head_dim x element size
        (defaults from the problem)."""
        kv_heads = self.problem.kv_heads if kv_heads is None else kv_heads
        head_dim = self.problem.head_dim if head_dim is None else head_dim
        dtype = self.problem.dtype if dtype is None else dtype
        return batch * kv_heads * 2 * head_dim * torch.empty(0, dtype=dtype).element_size()

    def bytes_sent(self, rank: int, *, exchange: str = "p2p", direction: str = "forward", **row_kw) -> int:
        """Bytes rank ``rank`` hands to ``isend`` in one ``direction`` ("forward" | "backward")
        of one call under ``exchange`` ("p2p" | "ring"):

        - p2p forward: the K/V rows each peer needs; backward: the dK/dV of every row it
          received, back to its owner (rows_received(rank) rows; the same dtype);
        - ring forward: every shard it passes on (its own and others', whole); backward: the
          same hops carrying K/V and the dK/dV summed so far in the compute dtype (float32 for
          16-bit inputs), plus, at each shard's last hop, that sum to the shard's owner.
        """
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
        if direction not in ("forward", "backward"):
            raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")
        row = self.row_bytes(**row_kw)
        if exchange == "p2p":
            return (self.rows_sent(rank) if direction == "forward" else self.rows_received(rank)) * row
        passed, final = self.ring_rows(rank)
        if direction == "forward":
            return passed * row
        dtype = row_kw.get("dtype", self.problem.dtype)
        acc = self.row_bytes(**{**row_kw, "dtype": torch.float64 if dtype == torch.float64 else torch.float32})
        return passed * (row + acc) + final * acc

    def bytes_received(self, rank: int, **row_kw) -> int:
        """p2p forward bytes rank ``rank`` receives."""
        return self.rows_received(rank) * self.row_bytes(**row_kw)

    def messages(self, rank: int) -> int:
        """Point-to-point messages rank r sends per p2p exchange (one per peer with rows to send)."""
        return len(self.receivers(rank))

    # -- shards ----------------------------------------------------------------------
    def shard(self, x: torch.Tensor, rank: int, dim: int = 2) -> torch.Tensor:
        """Rank r's rows of a full tensor (tokens along ``dim``; [B, H, N, D] by default)."""
        return x.index_select(dim, self.tokens[rank].to(x.device))

    def unshard(self, parts, dim: int = 2) -> torch.Tensor:
        """The full tensor from every rank's shard (the inverse of ``shard``)."""
        cat = torch.cat(list(parts), dim)
        order = torch.cat(self.tokens)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        return cat.index_select(dim, inverse.to(cat.device))

    def summary(self, **row_kw) -> str:
        lines = [f"exchange plan for {self.pattern!r} on {self.problem!r}: {self.world_size} ranks, "
                 f"layout {self.layout!r}, split {self.split}, built in {self.build_seconds:.2f} s"]
        for r in range(self.world_size):
            lines.append(f"  rank {r}: {len(self.tokens[r])} tokens, receives {self.rows_received(r)} rows "
                         f"from {self.senders(r)}, sends {self.rows_sent(r)} rows "
                         f"({self.bytes_sent(r, **row_kw):,} bytes), work "
                         f"{'-' if self.work is None else format(self.work[r], ',')}")
        return "\n".join(lines)


#: ``choose_exchange`` takes the ring while it moves at most this many times the p2p bytes.
RING_BYTES_RATIO = 1.5


def choose_exchange(plan: ExchangePlan) -> str:
    """"ring" when it moves at most ``RING_BYTES_RATIO`` times the bytes of the exact p2p
    exchange, summed over ranks (Full and contiguous Causal: 1x; zigzag Causal: 4/3x), else
    "p2p" (windows, halos, sinks: the ring would carry shards round to reach ranks behind).
    The ring holds at most three shards at a time; p2p holds every row a rank sees at once."""
    w = plan.world_size
    p2p = sum(plan.rows_sent(r) for r in range(w))
    ring = sum(plan.ring_rows(r)[0] for r in range(w))
    return "ring" if w > 1 and p2p > 0 and ring <= RING_BYTES_RATIO * p2p else "p2p"


def plan_exchange(pattern: Pattern, problem: Problem, world_size: int, *, layout: str = "contiguous",
                  split: tuple[int, ...] | None = None,
                  schedule=None, count_work: bool | None = None) -> ExchangePlan:
    """The token-exact exchange plan of ``pattern`` on ``problem`` over ``world_size`` ranks
    (module docstring). No [N, N] mask is formed (1M tokens take seconds):

    1. per head group, the schedule's FULL (query tile, key tile) pairs mark whole key tiles
       as needed by every rank holding a query of the tile (all their pairs are allowed);
    2. PARTIAL pairs whose key tile is neither marked yet for that rank nor entirely its own
       are decided token by token: the pattern's mask on that rank's queries of the tile
       against the tile's keys, a key needed iff some query (of some head) sees it.

    ``count_work`` (default: for grids up to 65,536 tokens) also evaluates the mask on every
    PARTIAL pair to count ``work`` exactly; otherwise ``work`` is None.
    ``schedule``: a ``TileSchedule`` of this pattern and problem to reuse."""
    t0 = time.perf_counter()
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a sparseforge Pattern, got {type(pattern).__name__}")
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be a sparseforge Problem, got {type(problem).__name__}")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    split = _check_split(split, world_size, layout, problem)
    if problem.is_cross:
        raise ValueError(f"context parallelism takes self attention on one grid; {problem!r} has a kv_grid")
    if problem.grid is None:
        raise ValueError(f"context parallelism shards a token grid: give Problem(grid=...), got {problem!r}")
    if not pattern.is_static:
        raise ValueError(f"{pattern!r} depends on run-time content; the exchange plan needs a static pattern "
                         f"(ContextParallelAttention also takes Grouped() and Grouped() & static patterns; Routed "
                         f"and Scattered are not supported)")
    if count_work is None:
        count_work = problem.tokens <= 1 << 16
    tokens = _rank_tokens(problem, world_size, layout, split)
    n, world = problem.tokens, world_size
    owner = token_owner(tokens, n)
    sched = build_schedule(pattern, problem) if schedule is None else schedule
    ctx = make_context(pattern, problem)
    needed = torch.zeros(world, n, dtype=torch.bool)
    work = [0] * world
    for group in schedule_groups(sched):
        group_heads, q_table, k_table = group.heads, group.q_table, group.k_table
        row, ktile, is_full = group.row, group.ktile, group.full
        n_heads = len(group_heads)
        q_own = torch.where(q_table >= 0, owner[q_table.clamp_min(0)], -1)          # [nQ, tq]
        k_own = torch.where(k_table >= 0, owner[k_table.clamp_min(0)], -1)          # [nK, tk]
        k_count = (k_table >= 0).sum(1)                                             # [nK]
        q_count = torch.stack([(q_own == r).sum(1) for r in range(world)])          # [R, nQ]
        for r in range(world):
            mine = q_count[r, row] > 0
            sel = mine & is_full
            tile_needed = torch.zeros(len(k_table), dtype=torch.bool)
            tile_needed[ktile[sel]] = True
            if count_work:
                work[r] += int((q_count[r, row[sel]] * k_count[ktile[sel]]).sum()) * n_heads
            own_tile = ((k_own == r) | (k_table < 0)).all(1)
            psel = mine & ~is_full
            if not count_work:
                psel &= ~tile_needed[ktile] & ~own_tile[ktile]
            known = needed[r]
            known |= owner == r  # own keys need no message: known from the start
            keys_r = k_table[tile_needed]
            known[keys_r[keys_r >= 0]] = True
            p_rows, p_tiles = row[psel], ktile[psel]
            if len(p_rows) == 0:
                continue
            bounds = torch.searchsorted(p_rows, torch.unique_consecutive(p_rows), right=False).tolist() + [len(p_rows)]
            for a, b in zip(bounds[:-1], bounds[1:]):
                t = int(p_rows[a])
                k_tok = k_table[p_tiles[a:b]].flatten()
                k_tok = k_tok[k_tok >= 0]
                if not count_work:
                    k_tok = k_tok[~known[k_tok]]  # keys decided by an earlier tile need no mask
                    if len(k_tok) == 0:
                        continue
                q_tok = q_table[t][q_own[t] == r]
                m = as_4d(pattern.mask(ctx, q_tok, k_tok))[0]  # [H|1, nq, nk]
                per_head = m.shape[0] > 1
                if per_head:
                    m = m[group_heads]
                seen = m.any(1).any(0)  # by any of r's queries in this tile, any head of the group
                known[k_tok[seen]] = True
                if count_work:
                    work[r] += int(m.sum()) * (1 if per_head else n_heads)
    recv = []
    for r in range(world):
        recv.append(tuple(torch.zeros(0, dtype=torch.long) if p == r else tokens[p][needed[r, tokens[p]]].sort().values
                          for p in range(world)))
    return ExchangePlan(pattern, problem, world_size, layout, split, tokens, tuple(recv),
                        tuple(work) if count_work else None, time.perf_counter() - t0)


def _check_split(split, world_size: int, layout: str, problem: Problem) -> tuple[int, ...]:
    """``split`` (default ``(world_size,)``): runs per leading grid dimension, product world_size."""
    if split is None:
        return (world_size,)
    if not isinstance(split, (tuple, list)) or not split or \
            not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in split):
        raise ValueError(f"split must be a tuple of positive ints (runs of the leading grid dimensions), got {split!r}")
    split = tuple(split)
    if math.prod(split) != world_size:
        raise ValueError(f"split={split} makes {math.prod(split)} shards; expected world_size={world_size}")
    if len(split) > len(problem.grid):
        raise ValueError(f"split={split} cuts {len(split)} grid dimensions; {problem!r} has {len(problem.grid)}")
    if layout == "zigzag" and len(split) > 1:
        raise ValueError(f"layout='zigzag' cuts grid dimension 0 only; got split={split}")
    return split


def brute_force_recv(pattern: Pattern, problem: Problem, plan: ExchangePlan) -> list[list[torch.Tensor]]:
    """``recv`` computed from the dense mask (small problems; for tests)."""
    from ..dsl.semantics import dense_mask

    m = dense_mask(pattern, problem).any(0)  # [N, N] by any head
    out = []
    for r in range(plan.world_size):
        seen = m[plan.tokens[r]].any(0)
        out.append([torch.zeros(0, dtype=torch.long) if p == r else plan.tokens[p][seen[plan.tokens[p]]].sort().values
                    for p in range(plan.world_size)])
    return out
