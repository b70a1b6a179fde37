"""Context parallelism: one attention over a token grid sharded across the ranks of a
``torch.distributed`` process group, with the K/V exchange derived from the pattern.

Each rank holds its shard of q, k, v ``[B, H|kv_heads, N_local, D]`` and gets its shard of the
output; forward and backward (the gradients of its own q, k, v) equal the single-process
attention. Nothing here is approximate: the exchange plan is token-exact and the local
computation is the float attention of ``dsl.semantics.masked_softmax_attention`` over the
keys the rank gathered, with the pattern's exact mask at their global positions.

Sharding (``plan_exchange(..., layout=)``): tokens are cut along the slowest grid
dimension (dimension 0; a 1-D sequence along its tokens), so every shard is a run of whole
rows of dimension 0:

- ``"contiguous"`` (default): rank r holds the r-th of ``world_size`` near-equal runs
  (``numpy.array_split`` sizes, in units of one dimension-0 row), a contiguous flat range;
- ``"zigzag"``: dimension 0 is cut into ``2 * world_size`` runs and rank r holds runs r and
  ``2 * world_size - 1 - r`` (concatenated in that order): causal masks then give every rank
  about the same work (``ExchangePlan.work`` counts it exactly).

The exchange plan (``ExchangePlan``): for every rank r, the key tokens its queries may see,
computed from the tile schedule (``lower.build_schedule``) without a dense mask: the key
tiles each query tile visits, every key of a FULL tile, and the keys of PARTIAL tiles that
the pattern's mask allows to at least one of r's queries in that tile (the mask evaluated on
those tiles only). The union over heads is what r receives (``recv[r][p]``: the tokens of
rank p it needs), so local windows and halos get exactly their halo, ``Sink``/``GlobalTokens``
exactly the sink/global rows from their owners, and Full/Causal everything (Causal: all
earlier tokens) -- an all-gather done with point-to-point messages (no ring, no overlap of
communication with compute in this version).

Communication (``_ExchangeKV``, an autograd Function): forward, every rank ``isend``s to each
peer the rows of ``cat([k, v], -1)`` that peer needs and ``irecv``s what it needs; backward
sends the dK/dV rows of remote keys back to their owners the same way, and each owner adds
them to its own gradient (peers in rank order, deterministic). Bytes per message are
rows x B x kv_heads x 2D x element size, in both directions (``ExchangePlan.bytes_sent``);
``ContextParallelAttention.stats`` counts what was actually handed to ``isend``.

Local compute: this rank's query rows in chunks whose mask holds at most ``CHUNK_ELEMENTS``
entries per head, each the exact masked float attention over the gathered keys (memory bounded
however many keys a rank gathers; the time is that of a dense attention over them).

Failures: every wait has a timeout (``timeout=``, default the process group's own, see
``torch.distributed.init_process_group(timeout=)``). A peer that died or stalled makes the
waiting rank raise ``PeerError`` naming itself, the peer, the phase and the timeout, instead
of hanging.

Usage (one process per rank, after ``torch.distributed.init_process_group``)::

    import sparseforge as sf
    from sparseforge import distributed as sfd

    problem = sf.Problem(grid=(32, 48, 80), heads=8, head_dim=64)
    attn = sfd.ContextParallelAttention(sf.Neighborhood((9, 13, 13)), problem)
    q_l, k_l, v_l = (attn.shard(t) for t in (q, k, v))   # this rank's rows (or build shards directly)
    out_l = attn(q_l, k_l, v_l)          # [B, H, N_local, D], differentiable

What this version does not do: patterns that depend on run-time content (Routed, Scattered,
Grouped), problems with a ``kv_grid``, score modifiers (bias terms, softcap, learned sinks),
padding arguments, overlapping the exchange with compute, a ring for Full/Causal,
torch.compile and DTensor inputs.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import math

import numpy as np
import torch

from .dsl.pattern import Pattern, as_4d
from .dsl.problem import Problem
from .dsl.semantics import CHUNK_ELEMENTS, make_context, masked_softmax_attention
from .lower.schedule import build_schedule

LAYOUTS = ("contiguous", "zigzag")

__all__ = ["LAYOUTS", "CommStats", "ContextParallelAttention", "ExchangePlan", "PeerError",
           "context_parallel_attention", "plan_exchange", "shard_sizes"]


class PeerError(RuntimeError):
    """A peer rank did not answer within the timeout (it died, or is stuck elsewhere)."""


# ------------------------------------------------------------------------------------
# The plan: who holds which tokens, who needs which keys (no process group needed)
# ------------------------------------------------------------------------------------
def shard_sizes(units: int, parts: int) -> list[int]:
    """``numpy.array_split`` sizes: ``units`` cut into ``parts`` near-equal runs, larger first."""
    base, extra = divmod(units, parts)
    return [base + 1] * extra + [base] * (parts - extra)


def _rank_tokens(problem: Problem, world_size: int, layout: str) -> tuple[torch.Tensor, ...]:
    grid = problem.grid
    rows = grid[0]
    row_tokens = math.prod(grid[1:])
    parts = world_size if layout == "contiguous" else 2 * world_size
    if rows < parts:
        raise ValueError(f"world_size={world_size} with layout={layout!r} cuts grid dimension 0 (extent {rows}) "
                         f"into {parts} runs; expected an extent >= {parts}")
    sizes = shard_sizes(rows, parts)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    runs = [torch.arange(int(starts[i]) * row_tokens, int(starts[i + 1]) * row_tokens) for i in range(parts)]
    if layout == "contiguous":
        return tuple(runs)
    return tuple(torch.cat([runs[r], runs[parts - 1 - r]]) for r in range(world_size))


@dataclasses.dataclass(frozen=True, eq=False)
class ExchangePlan:
    """Which tokens each rank holds and which remote key rows it receives, token-exact.

    tokens[r]:  int64 [N_r], the flat (row-major) token indices rank r holds, in its local
                order (q, k, v and out shards are these rows of the full tensors).
    recv[r][p]: int64, sorted: the tokens of rank p that rank r's queries may see (empty
                for p == r); rank p sends exactly these rows to rank r.
    work[r]:    allowed (query, key) pairs of rank r's queries, summed over query heads
                (None when the plan was built with ``count_work=False``).
    """

    pattern: Pattern
    problem: Problem
    world_size: int
    layout: str
    tokens: tuple[torch.Tensor, ...]
    recv: tuple[tuple[torch.Tensor, ...], ...]
    work: tuple[int, ...] | None
    build_seconds: float = 0.0

    # -- counts -------------------------------------------------------------------
    def rows_received(self, rank: int) -> int:
        return sum(len(t) for t in self.recv[rank])

    def rows_sent(self, rank: int) -> int:
        return sum(len(self.recv[p][rank]) for p in range(self.world_size))

    def row_bytes(self, *, batch: int = 1, kv_heads: int | None = None, head_dim: int | None = None,
                  dtype: torch.dtype | None = None) -> int:
        """Bytes of one token's K and V rows: batch x kv_heads x 2 x head_dim x element size
        (defaults from the problem)."""
        kv_heads = self.problem.kv_heads if kv_heads is None else kv_heads
        head_dim = self.problem.head_dim if head_dim is None else head_dim
        dtype = self.problem.dtype if dtype is None else dtype
        return batch * kv_heads * 2 * head_dim * torch.empty(0, dtype=dtype).element_size()

    def bytes_sent(self, rank: int, **row_kw) -> int:
        """Bytes rank r sends in the forward exchange (K and V rows); the backward sends the
        same number of bytes (dK and dV of the same rows, to the same peers, in the other
        direction): rows_received(r) x row_bytes."""
        return self.rows_sent(rank) * self.row_bytes(**row_kw)

    def bytes_received(self, rank: int, **row_kw) -> int:
        return self.rows_received(rank) * self.row_bytes(**row_kw)

    def messages(self, rank: int) -> int:
        """Point-to-point messages rank r sends per exchange (one per peer with rows to send)."""
        return sum(1 for p in range(self.world_size) if len(self.recv[p][rank]))

    # -- per rank index maps ---------------------------------------------------------
    @functools.lru_cache(maxsize=None)
    def keys(self, rank: int) -> torch.Tensor:
        """int64, sorted: the global tokens of the keys rank r attends over (its own tokens and
        every received one)."""
        return torch.cat([self.tokens[rank]] + [t for t in self.recv[rank]]).sort().values

    @functools.lru_cache(maxsize=None)
    def local_index(self, rank: int) -> dict:
        """Index maps of rank r: where its own rows and each peer's received rows sit in
        ``keys(r)``, and which of its local rows each peer receives."""
        keys = self.keys(rank)

        def pos(tokens):
            return torch.searchsorted(keys, tokens)

        order = torch.empty(self.problem.tokens, dtype=torch.long)  # global token -> local row (own tokens)
        order[self.tokens[rank]] = torch.arange(len(self.tokens[rank]))
        return dict(own=pos(self.tokens[rank]),
                    recv={p: pos(t) for p, t in enumerate(self.recv[rank]) if len(t)},
                    send={p: order[self.recv[p][rank]] for p in range(self.world_size) if len(self.recv[p][rank])})

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
                 f"layout {self.layout!r}, built in {self.build_seconds:.2f} s"]
        for r in range(self.world_size):
            lines.append(f"  rank {r}: {len(self.tokens[r])} tokens, receives {self.rows_received(r)} rows "
                         f"from {[p for p in range(self.world_size) if len(self.recv[r][p])]}, sends "
                         f"{self.rows_sent(r)} rows ({self.bytes_sent(r, **row_kw):,} bytes), work {'-' if self.work is None else format(self.work[r], ',')}")
        return "\n".join(lines)


def plan_exchange(pattern: Pattern, problem: Problem, world_size: int, *, layout: str = "contiguous",
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
    import time

    t0 = time.perf_counter()
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a sparseforge Pattern, got {type(pattern).__name__}")
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be a sparseforge Problem, got {type(problem).__name__}")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if problem.is_cross:
        raise ValueError(f"context parallelism takes self attention on one grid; {problem!r} has a kv_grid")
    if problem.grid is None:
        raise ValueError(f"context parallelism shards a token grid: give Problem(grid=...), got {problem!r}")
    if not pattern.is_static:
        raise ValueError(f"{pattern!r} depends on run-time content; the exchange plan needs a static pattern")
    if count_work is None:
        count_work = problem.tokens <= 1 << 16
    tokens = _rank_tokens(problem, world_size, layout)
    n, world = problem.tokens, world_size
    owner = torch.empty(n, dtype=torch.long)
    for r, t in enumerate(tokens):
        owner[t] = r
    sched = build_schedule(pattern, problem) if schedule is None else schedule
    ctx = make_context(pattern, problem)
    needed = torch.zeros(world, n, dtype=torch.bool)
    work = [0] * world
    heads = torch.from_numpy(np.asarray(sched.head_group))
    idx_all = torch.from_numpy(np.asarray(sched.forward.idx)).long()
    for g in range(sched.groups):
        group_heads = torch.nonzero(heads == g).flatten()
        n_heads = len(group_heads)
        geom = sched.geometry_of(g)
        q_table = torch.from_numpy(geom.token_table("q"))
        k_table = torch.from_numpy(geom.token_table("k"))
        q_own = torch.where(q_table >= 0, owner[q_table.clamp_min(0)], -1)          # [nQ, tq]
        k_own = torch.where(k_table >= 0, owner[k_table.clamp_min(0)], -1)          # [nK, tk]
        k_count = (k_table >= 0).sum(1)                                             # [nK]
        q_count = torch.stack([(q_own == r).sum(1) for r in range(world)])          # [R, nQ]
        ptr = torch.from_numpy(np.asarray(sched.forward.ptr[g])).long()
        full = torch.from_numpy(np.asarray(sched.forward.full[g])).long()
        row = torch.repeat_interleave(torch.arange(len(ptr) - 1), ptr[1:] - ptr[:-1])   # q tile of each entry
        ktile = idx_all[int(ptr[0]):int(ptr[-1])]
        is_full = torch.arange(len(row)) - (ptr[row] - ptr[0]) < full[row]
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
    return ExchangePlan(pattern, problem, world_size, layout, tokens, tuple(recv),
                        tuple(work) if count_work else None, time.perf_counter() - t0)


def brute_force_recv(pattern: Pattern, problem: Problem, plan: ExchangePlan) -> list[list[torch.Tensor]]:
    """``recv`` computed from the dense mask (small problems; for tests)."""
    from .dsl.semantics import dense_mask

    m = dense_mask(pattern, problem).any(0)  # [N, N] by any head
    out = []
    for r in range(plan.world_size):
        seen = m[plan.tokens[r]].any(0)
        out.append([torch.zeros(0, dtype=torch.long) if p == r else plan.tokens[p][seen[plan.tokens[p]]].sort().values
                    for p in range(plan.world_size)])
    return out


# ------------------------------------------------------------------------------------
# The exchange, as an autograd Function
# ------------------------------------------------------------------------------------
@dataclasses.dataclass
class CommStats:
    """Bytes and messages this rank handed to ``isend`` / filled by ``irecv``, per direction."""

    forward_bytes_sent: int = 0
    forward_bytes_received: int = 0
    backward_bytes_sent: int = 0
    backward_bytes_received: int = 0
    messages_sent: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, eq=False)
class _Comm:
    plan: ExchangePlan
    rank: int
    group: object
    timeout: datetime.timedelta
    stats: CommStats


def _exchange(comm: _Comm, outgoing: dict, incoming: dict, phase: str) -> None:
    """Post every irecv and isend of one exchange, then wait for all with the timeout.
    ``outgoing``/``incoming``: peer rank (in the group) -> tensor."""
    import torch.distributed as dist

    works = []
    for p, buf in incoming.items():
        works.append((p, "receive from", dist.irecv(buf, group=comm.group, group_src=p)))
    for p, buf in outgoing.items():
        works.append((p, "send to", dist.isend(buf, group=comm.group, group_dst=p)))
        comm.stats.messages_sent += 1
    for p, what, work in works:
        try:
            work.wait(comm.timeout)
        except Exception as e:  # gloo: a timeout or "connection closed by peer"
            raise PeerError(
                f"sparseforge.distributed: rank {comm.rank} could not {what} rank {p} in the {phase} K/V exchange "
                f"of {comm.plan.pattern!r} within {comm.timeout.total_seconds():g} s: the peer process died or is "
                f"stuck ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


class _ExchangeKV(torch.autograd.Function):
    """kv_local [B, Hkv, N_r, 2D] -> kv over ``plan.keys(rank)`` [B, Hkv, M_r, 2D]."""

    @staticmethod
    def forward(ctx, kv, comm):
        plan, rank = comm.plan, comm.rank
        maps = plan.local_index(rank)
        b, h, _, w = kv.shape
        outgoing = {p: kv.index_select(2, idx).contiguous() for p, idx in maps["send"].items()}
        incoming = {p: kv.new_empty(b, h, len(idx), w) for p, idx in maps["recv"].items()}
        _exchange(comm, outgoing, incoming, "forward")
        comm.stats.forward_bytes_sent += sum(t.numel() * t.element_size() for t in outgoing.values())
        comm.stats.forward_bytes_received += sum(t.numel() * t.element_size() for t in incoming.values())
        out = kv.new_empty(b, h, len(plan.keys(rank)), w)
        out[:, :, maps["own"]] = kv
        for p, buf in incoming.items():
            out[:, :, maps["recv"][p]] = buf
        ctx.comm = comm
        ctx.local_shape, ctx.dtype, ctx.device = kv.shape, kv.dtype, kv.device
        return out

    @staticmethod
    def backward(ctx, grad):
        comm = ctx.comm
        maps = comm.plan.local_index(comm.rank)
        b, h, n, w = ctx.local_shape
        if grad is None:
            grad = torch.zeros(b, h, len(comm.plan.keys(comm.rank)), w, dtype=ctx.dtype, device=ctx.device)
        outgoing = {p: grad.index_select(2, pos).contiguous() for p, pos in maps["recv"].items()}
        incoming = {p: grad.new_empty(b, h, len(idx), w) for p, idx in maps["send"].items()}
        _exchange(comm, outgoing, incoming, "backward")
        comm.stats.backward_bytes_sent += sum(t.numel() * t.element_size() for t in outgoing.values())
        comm.stats.backward_bytes_received += sum(t.numel() * t.element_size() for t in incoming.values())
        dkv = grad.index_select(2, maps["own"]).clone()
        for p in sorted(incoming):
            dkv.index_add_(2, maps["send"][p], incoming[p])
        return dkv, None


# ------------------------------------------------------------------------------------
# The user-facing module
# ------------------------------------------------------------------------------------
class ContextParallelAttention(torch.nn.Module):
    """Attention under ``pattern`` on ``problem``'s token grid, sharded over ``group``.

    ``forward(q, k, v, scale=None, return_lse=False)`` takes this rank's shards
    (q [B, H, N_r, D], k/v [B, kv_heads, N_r, D], the rows ``plan.tokens[rank]`` of the full
    tensors) and returns this rank's output shard [B, H, N_r, D] (and LSE [B, H, N_r]).
    Every rank of the group must call it, in the same order. ``scale`` defaults to
    ``head_dim ** -0.5``; a float or a [H] tensor. ``timeout``: seconds (or a timedelta)
    each wait may take before ``PeerError``; default the group's own timeout.
    """

    def __init__(self, pattern: Pattern, problem: Problem, *, group=None, layout: str = "contiguous",
                 plan: ExchangePlan | None = None, timeout=None):
        super().__init__()
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("ContextParallelAttention needs torch.distributed.init_process_group() first")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        world = dist.get_world_size(self.group)
        if plan is None:
            plan = plan_exchange(pattern, problem, world, layout=layout)
        elif plan.world_size != world or plan.pattern != pattern or plan.problem != problem:
            raise ValueError(f"plan is for {plan.pattern!r} on {plan.problem!r} over {plan.world_size} ranks; "
                             f"expected {pattern!r} on {problem!r} over {world}")
        self.pattern, self.problem, self.plan = pattern, problem, plan
        if timeout is None:
            timeout = _group_timeout(self.group)
        if not isinstance(timeout, datetime.timedelta):
            timeout = datetime.timedelta(seconds=float(timeout))
        self.timeout = timeout
        self.stats = CommStats()
        self._mask = None

    def shard(self, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """This rank's rows of a full tensor (``plan.shard(x, rank)``)."""
        return self.plan.shard(x, self.rank, dim)

    def local_mask(self, rows: slice = slice(None)) -> torch.Tensor:
        """Bool [1, H|1, len(rows), M_r]: may this rank's query i (of ``rows``) see gathered key j
        (global positions)."""
        ctx = make_context(self.pattern, self.problem)
        return as_4d(self.pattern.mask(ctx, self.plan.tokens[self.rank][rows], self.plan.keys(self.rank)))

    def _row_chunks(self) -> list[slice]:
        """This rank's query rows in chunks whose mask holds at most ``CHUNK_ELEMENTS`` per head
        (the local compute's memory stays bounded however many keys the rank gathered)."""
        n_r, m_r = len(self.plan.tokens[self.rank]), len(self.plan.keys(self.rank))
        step = max(1, CHUNK_ELEMENTS // max(m_r, 1))
        return [slice(i, min(i + step, n_r)) for i in range(0, n_r, step)] or [slice(0, 0)]

    def forward(self, q, k, v, scale=None, return_lse: bool = False):
        p, n_r = self.problem, len(self.plan.tokens[self.rank])
        for name, t, heads in (("q", q, p.heads), ("k", k, p.kv_heads), ("v", v, p.kv_heads)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4 or t.shape[1] != heads or t.shape[2] != n_r or t.shape[0] != q.shape[0]:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected [B, {heads}, N_local={n_r}, D] "
                                 f"on rank {self.rank} of {self.plan.world_size} for {p!r}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        d = k.shape[-1]
        comm = _Comm(self.plan, self.rank, self.group, self.timeout, self.stats)
        kv = _ExchangeKV.apply(torch.cat([k, v], -1), comm)
        kg, vg = kv[..., :d], kv[..., d:]
        rep = p.heads // p.kv_heads
        if rep > 1:
            kg, vg = kg.repeat_interleave(rep, 1), vg.repeat_interleave(rep, 1)
        if scale is None:
            scale = p.head_dim ** -0.5
        elif isinstance(scale, torch.Tensor):
            scale = scale.to(q.dtype).reshape(1, -1, 1, 1)
        chunks = self._row_chunks()
        if len(chunks) == 1 and self._mask is None:   # one chunk: its mask is kept (the plan is fixed)
            self._mask = self.local_mask()
        parts = [masked_softmax_attention(q[:, :, rows], kg, vg,
                                          (self._mask if len(chunks) == 1 else self.local_mask(rows)).to(q.device),
                                          scale) for rows in chunks]
        out, lse = torch.cat([o for o, _ in parts], dim=2), torch.cat([l for _, l in parts], dim=2)
        return (out, lse) if return_lse else out


def context_parallel_attention(q, k, v, pattern: Pattern, problem: Problem, *, group=None, layout: str = "contiguous",
                               scale=None, timeout=None, return_lse: bool = False):
    """One call of ``ContextParallelAttention`` (builds the plan each time: keep a module
    for repeated calls)."""
    attn = ContextParallelAttention(pattern, problem, group=group, layout=layout, timeout=timeout)
    return attn(q, k, v, scale=scale, return_lse=return_lse)


def _group_timeout(group) -> datetime.timedelta:
    """The timeout ``group`` was created with (``init_process_group(timeout=)``), where the
    backend exposes it; else torch's default for the backend."""
    for device in ("cpu", "cuda"):
        try:
            t = group._get_backend(torch.device(device)).options._timeout  # noqa: SLF001
        except Exception:  # noqa: BLE001 - no such backend on this group, or no options
            continue
        if isinstance(t, datetime.timedelta) and t.total_seconds() > 0:
            return t
    try:
        from torch.distributed.distributed_c10d import _get_default_timeout, _world

        return _get_default_timeout(_world.pg_map.get(group, ("gloo",))[0])
    except Exception:  # noqa: BLE001  # pragma: no cover
        return datetime.timedelta(minutes=30)
