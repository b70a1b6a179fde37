"""``ContextParallelAttention``: the exchange, overlapped with the compute of each source, as
one autograd Function.

p2p (``plan.recv``: halos, sinks, global tokens):

- forward: one round posts every send (the rows each peer needs) and every receive; the
  rank computes against its own keys while they travel, then each peer's rows in rank order,
  each as soon as it is in, merging by LSE;
- backward: each received source's dQ share and dK/dV rows are computed first; one round
  sends those dK/dV rows home and receives its own rows' dK/dV from the peers that saw them,
  while the rank computes its own keys' share; the owner adds what arrives in rank order.

ring (Full, Causal: ``plan.ring_hops``): at step t rank r holds the shard of rank r - t; one
round per step passes that shard on (if a later rank still needs it) and receives the next,
while r computes against the one it holds. The backward runs the same ring again with, next
to each shard, its dK/dV summed so far (compute dtype): each rank adds its share and passes
both on; the last rank on the way sends the sum home. Nothing but q, k, v, the output and LSE
is kept between forward and backward (p2p also keeps the received rows).

Merges and sums run in a fixed order (own keys first, then by rank or ring step), so results
do not depend on message timing.

Group ids and padding (``Grouped`` patterns, ``key_padding_mask``): the plan is the static
part's; each call all-gathers the ids ([B, N] int64, once), every rank derives the same
``Routes`` from them (of the plan's rows, those in a document of the receiver's tokens), and
the chunks are masked per sample.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools

import torch

from ..dsl.content import Grouped, check_groups
from ..dsl.pattern import Pattern
from ..dsl.sequence import Causal, Full
from ..dsl.problem import Problem
from ..dsl.semantics import check_key_padding_mask
from ..backends.cpu import Scores
from ..dsl.modifiers import Modifiers, check_modifiers, modifier_tensors
from ..runtime.grouped import split_grouped
from .comm import Link, group_timeout
from .local import (CHUNK_ELEMENTS, LocalWork, Source, compute_dtype, merge_into, merge_sinks, sinks_grad,
                    source_backward, source_forward)
from .plan import EXCHANGES, ExchangePlan, choose_exchange, plan_exchange

__all__ = ["ContextParallelAttention", "context_parallel_attention"]


@dataclasses.dataclass(frozen=True, eq=False)
class Routes:
    """The rows that move point to point in one call: ``incoming[p]`` the tokens of peer p this
    rank receives, ``outgoing[p]`` the local rows of its own that peer p receives (peers
    ascending; no empty entries). Every rank derives the same routes from the same inputs."""

    incoming: dict
    outgoing: dict


@dataclasses.dataclass(eq=False)
class _Rank:
    """One rank's side of an attention: the plan, its link, how K/V move and its sources."""

    plan: ExchangePlan
    rank: int
    link: Link
    exchange: str
    sources: dict[int, Source]

    @classmethod
    def build(cls, plan: ExchangePlan, rank: int, link: Link, exchange: str, chunk_elements: int) -> "_Rank":
        work = LocalWork(plan, rank, chunk_elements=chunk_elements)
        return cls(plan, rank, link, exchange, {s: Source(work, s) for s in work.pieces})

    @property
    def world(self) -> int:
        return self.plan.world_size

    def _local_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self.plan.tokens[self.rank], tokens)

    @functools.cached_property
    def static_routes(self) -> Routes:
        """The plan's routes (every call without group ids)."""
        plan, r = self.plan, self.rank
        return Routes({p: plan.recv[r][p] for p in plan.senders(r)},
                      {p: self._local_rows(plan.recv[p][r]) for p in plan.receivers(r)})

    def routes(self, ids: torch.Tensor | None) -> Routes:
        """The routes of a call with group ids ``ids`` int64 [B, N] (None: ``static_routes``):
        of the rows the plan sends, those whose id (in some sample) is the id of one of the
        receiver's tokens there."""
        if ids is None:
            return self.static_routes
        plan, r = self.plan, self.rank

        def kept(receiver: int, owner: int) -> torch.Tensor:
            keys, queries = plan.recv[receiver][owner], plan.tokens[receiver]
            keep = torch.zeros(len(keys), dtype=torch.bool)
            for b in range(ids.shape[0]):
                gq = ids[b, queries]
                gk = ids[b, keys]
                keep |= (gk >= 0) & torch.isin(gk, gq[gq >= 0])
            return keys[keep]

        incoming = {p: t for p in plan.senders(r) if len(t := kept(r, p))}
        outgoing = {p: self._local_rows(t) for p in plan.receivers(r) if len(t := kept(p, r))}
        return Routes(incoming, outgoing)

    def buffer_tokens(self, source: int, routes: Routes) -> torch.Tensor:
        """The tokens of the K/V buffer that ``source``'s keys arrive in."""
        if source == self.rank or self.exchange == "ring":
            return self.plan.tokens[source]
        return routes.incoming[source]

    def ring_owner(self, step: int) -> int:
        return (self.rank - step) % self.world

    def ring_arrives(self, step: int) -> bool:
        """Does the shard of ``ring_owner(step)`` reach this rank (step >= 1)?"""
        return 1 <= step <= self.plan.ring_hops(self.ring_owner(step))


class _Call:
    """One call's settings, its tensors in the compute dtype and the per-source executor calls.

    ``mods``: the checked modifiers (or None); the sources see all but the sinks, which join
    the denominator once, after the merge (``merge_sinks``). ``ids``: int64 [B, N] group ids
    of every token (None: no groups, no padding); ``real``: bool [B, N_r] this rank's real
    query rows (None: all)."""

    def __init__(self, side: _Rank, scale, mods: Modifiers | None, head_scale, ids, real):
        self.side, self.scale, self.mods, self.ids, self.real = side, scale, mods, ids, real
        self.routes = side.routes(ids) if side.exchange == "p2p" else None
        self.sinks = None if mods is None or mods.sinks is None else mods.sinks.logits
        per_source = None if mods is None else Modifiers(mods.biases, mods.softcap, None)
        self.head_scale, self.per_source = head_scale, per_source or None
        self.q = None

    def bind(self, q) -> "_Call":
        """Use q (cast to the compute dtype) until ``release``."""
        self.ct, self.d = compute_dtype(q.dtype), q.shape[-1]
        self.q = q.to(self.ct)
        hs = None if self.head_scale is None else self.head_scale.to(self.ct)
        self.scores = None if self.per_source is None and hs is None else \
            Scores(self.side.plan.pattern, self.per_source, hs)
        return self

    def release(self) -> None:
        self.q = None

    def split(self, kv):
        return kv[..., :self.d].to(self.ct), kv[..., self.d:].to(self.ct)

    def chunks(self, source: int, kv):
        return self.side.sources[source].chunks(self.q.shape, kv.shape[1], self.side.buffer_tokens(source, self.routes),
                                                self.q.device, self.ids)

    def forward(self, source: int, kv):
        k, v = self.split(kv)
        return source_forward(self.q, k, v, self.chunks(source, kv), self.scale, self.scores,
                              self.side.plan.problem)

    def backward(self, source: int, kv, out, lse, dout, dlse):
        """(dq, dkv in the compute dtype, modifier grads) of one source's share."""
        k, v = self.split(kv)
        dq, dk, dv, grads = source_backward(self.q, k, v, out, lse, dout, dlse, self.chunks(source, kv),
                                            self.scale, self.scores, self.side.plan.problem)
        return dq, torch.cat([dk, dv], -1), grads


def _empty_result(q, dv: int, ct):
    b, h, n, _ = q.shape
    return q.new_zeros(b, h, n, dv, dtype=ct), q.new_full((b, h, n), float("-inf"), dtype=ct)


def _add(total, part):
    """``total + part`` (a tensor, or tuples elementwise); ``part`` when ``total`` is None."""
    if total is None:
        return part
    return total + part if isinstance(part, torch.Tensor) else tuple(a + b for a, b in zip(total, part))


# ------------------------------------------------------------------------------------
# p2p
# ------------------------------------------------------------------------------------
def _p2p_forward(side: _Rank, call: _Call, kv):
    r, routes = side.rank, call.routes
    b, h, _, w = kv.shape
    round_ = side.link.post([(p, kv.index_select(2, rows.to(kv.device))) for p, rows in routes.outgoing.items()],
                            [(p, kv.new_empty(b, h, len(t), w)) for p, t in routes.incoming.items()], "forward")
    acc = call.forward(r, kv) if r in side.sources else None
    received = {}
    for i, p in enumerate(routes.incoming):       # each peer's rows as soon as they are in
        received[p] = side.link.received(round_, i)
        acc = merge_into(acc, call.forward(p, received[p]))
    side.link.wait(round_)
    return acc, received


def _p2p_backward(side: _Rank, call: _Call, kv, out, lse, dout, dlse, received):
    r, routes = side.rank, call.routes
    b, h, _, w = kv.shape
    dq, grads, sends = None, None, []
    for p, rows in received.items():
        dq_p, dkv_p, g = call.backward(p, rows, out, lse, dout, dlse)
        dq, grads = _add(dq, dq_p), _add(grads, g)
        sends.append((p, dkv_p.to(kv.dtype)))
    round_ = side.link.post(sends, [(p, kv.new_empty(b, h, len(rows), w)) for p, rows in routes.outgoing.items()],
                            "backward")
    if r in side.sources:
        dq_r, dkv, g = call.backward(r, kv, out, lse, dout, dlse)
        dq, grads = _add(dq, dq_r), _add(grads, g)
    else:
        dkv = kv.new_zeros(kv.shape, dtype=call.ct)
    for (p, rows), grad in zip(routes.outgoing.items(), side.link.wait(round_)):
        dkv.index_add_(2, rows.to(dkv.device), grad.to(call.ct))
    return dq, dkv, grads


# ------------------------------------------------------------------------------------
# ring
# ------------------------------------------------------------------------------------
def _shard_buffer(side: _Rank, like, owner: int, dtype=None):
    b, h, _, w = like.shape
    return like.new_empty(b, h, len(side.plan.tokens[owner]), w, dtype=dtype)


def _ring_forward(side: _Rank, call: _Call, kv):
    plan, r, world = side.plan, side.rank, side.world
    nxt, prv = (r + 1) % world, (r - 1) % world
    acc, block = None, kv
    for step in range(world):
        owner = side.ring_owner(step)
        sends = [(nxt, block)] if block is not None and step < plan.ring_hops(owner) else []
        recvs = [(prv, _shard_buffer(side, kv, side.ring_owner(step + 1)))] if side.ring_arrives(step + 1) else []
        round_ = side.link.post(sends, recvs, "forward")
        if block is not None and owner in side.sources:
            acc = merge_into(acc, call.forward(owner, block))
        arrived = side.link.wait(round_)
        block = arrived[0] if arrived else None
    return acc


def _ring_backward(side: _Rank, call: _Call, kv, out, lse, dout, dlse):
    """Two rounds a step: (A) the held shard's K/V on to the next rank, the next shard's in;
    (B) after this rank's share, the shard's dK/dV sum on (or home, at its last hop) and the
    next shard's sum in, plus this rank's own sum when its shard's journey ends here."""
    plan, r, world = side.plan, side.rank, side.world
    nxt, prv = (r + 1) % world, (r - 1) % world
    home = plan.ring_hops(r)
    dq, grads, dkv_own = None, None, None
    block, dkv = kv, None
    for step in range(world):
        owner = side.ring_owner(step)
        hops = plan.ring_hops(owner)
        passes_on = block is not None and step < hops
        next_arrives = side.ring_arrives(step + 1)
        next_owner = side.ring_owner(step + 1)
        round_a = side.link.post([(nxt, block)] if passes_on else [],
                                 [(prv, _shard_buffer(side, kv, next_owner))] if next_arrives else [], "backward")
        if block is not None:
            if dkv is None:
                dkv = kv.new_zeros(kv.shape, dtype=call.ct)
            if owner in side.sources:
                dq_s, dkv_s, g = call.backward(owner, block, out, lse, dout, dlse)
                dq, grads, dkv = _add(dq, dq_s), _add(grads, g), dkv + dkv_s
        sends = []
        if block is not None and hops > 0:
            sends.append((nxt if passes_on else owner, dkv))
        elif block is not None:
            dkv_own = dkv                      # nobody else saw this rank's shard
        recvs = [(prv, _shard_buffer(side, kv, next_owner, call.ct))] if next_arrives else []
        if 0 < home == step:                    # this rank's shard's sum comes home this step
            recvs.append(((r + home) % world, _shard_buffer(side, kv, r, call.ct)))
        round_b = side.link.post(sends, recvs, "backward")
        arrived_a = side.link.wait(round_a)
        arrived_b = side.link.wait(round_b)
        block = arrived_a[0] if arrived_a else None
        dkv = arrived_b[0] if next_arrives else None
        if 0 < home == step:
            dkv_own = arrived_b[-1]
    return dq, dkv_own, grads


# ------------------------------------------------------------------------------------
# The autograd Function and the module
# ------------------------------------------------------------------------------------
class _ContextParallel(torch.autograd.Function):
    """(q [B, H, N_r, D], k/v [B, KVH, N_r, D], *params) -> (out, lse); ``params`` are
    ``modifier_tensors(mods, head_scale)``: the bias tables/slopes, the sinks, the [H] scale."""

    @staticmethod
    def forward(ctx, call: _Call, q, k, v, *params):
        call.bind(q)
        side = call.side
        kv = torch.cat([k, v], -1)
        received = None
        if side.exchange == "p2p":
            acc, received = _p2p_forward(side, call, kv)
        else:
            acc = _ring_forward(side, call, kv)
        out, lse = acc if acc is not None else _empty_result(q, v.shape[-1], call.ct)
        if call.sinks is not None:
            out, lse = merge_sinks(out, lse, call.sinks, call.real)
        call.release()
        ctx.save_for_backward(q, k, v, out, lse, *params)
        ctx.call, ctx.received = call, received
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *params = ctx.saved_tensors
        call = ctx.call.bind(q)
        side = call.side
        kv = torch.cat([k, v], -1)
        dout = None if dout is None else dout.to(call.ct)
        if side.exchange == "p2p":
            dq, dkv, grads = _p2p_backward(side, call, kv, out, lse, dout, dlse, ctx.received)
        else:
            dq, dkv, grads = _ring_backward(side, call, kv, out, lse, dout, dlse)
        if dq is None:
            dq = torch.zeros_like(call.q)
        # the sources' grads follow call.scores.tensors(): biases..., head scale; the sinks' go between
        grads = list(grads) if grads else [torch.zeros_like(t) for t in (call.scores.tensors() if call.scores else ())]
        if call.sinks is not None:
            grads.insert(len(call.mods.biases), sinks_grad(call.sinks, out, lse, dout, dlse))
        call.release()
        d = q.shape[-1]
        return (None, dq.to(q.dtype), dkv[..., :d].to(k.dtype), dkv[..., d:].to(v.dtype),
                *(g.to(p.dtype) for g, p in zip(grads, params)))


class ContextParallelAttention(torch.nn.Module):
    """Attention under ``pattern`` on ``problem``'s token grid, sharded over ``group``.

    ``forward(q, k, v, scale=None, modifiers=None, return_lse=False, groups=None,
    key_padding_mask=None)`` takes this rank's shards (q [B, H, N_r, D], k/v [B, kv_heads, N_r,
    D], the rows ``plan.tokens[rank]`` of the full tensors; or DTensors sharded on dimension 2,
    ``Shard(2)``, over a 1-D mesh of ``group``) and returns this rank's output shard
    [B, H, N_r, D] (and LSE [B, H, N_r], natural log), differentiable in q, k, v, a tensor
    ``scale`` and the modifiers' tensors. ``groups``: int [B, N_r], this rank's group ids
    (``Grouped`` patterns); ``key_padding_mask``: bool [B, N_r], True for real tokens (padded
    rows give zeros and LSE -inf). Every rank of the group must build the module together and
    call it in the same order.

    group:    a ProcessGroup or a DeviceMesh (default: the world); an N-D mesh cuts the N
              leading grid dimensions (``split`` = the mesh's shape);
    layout:   "contiguous" | "zigzag" (``plan_exchange``); DTensors take "contiguous";
    split:    runs of each leading grid dimension, product the world size (``plan_exchange``);
    exchange: "auto" (``choose_exchange``) | "p2p" | "ring";
    scale:    a float or a [H] tensor (default head_dim ** -0.5);
    modifiers: score modifiers (``RelativePositionBias``, ``T5Bias``, ``ALiBi``, ``Softcap``,
              ``Sinks``), positions measured on the whole grid; every rank passes the same
              parameters and gets its share of their gradients (sum them over the group, as
              data parallelism does);
    timeout:  seconds (or a timedelta) each wait may take before ``PeerError``; default the
              group's own timeout;
    chunk_elements: query rows x keys per executor chunk at most (memory of the local compute).
    """

    def __init__(self, pattern: Pattern, problem: Problem, *, group=None, layout: str = "contiguous",
                 split: tuple[int, ...] | None = None, exchange: str = "auto", plan: ExchangePlan | None = None,
                 timeout=None, chunk_elements: int = CHUNK_ELEMENTS):
        super().__init__()
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("ContextParallelAttention needs torch.distributed.init_process_group() first")
        self.group, split = _process_group(group, split)
        self.rank = dist.get_rank(self.group)
        world = dist.get_world_size(self.group)
        self.grouped, static = _static_part(pattern)
        if plan is None:
            plan = plan_exchange(static, problem, world, layout=layout, split=split)
        elif plan.world_size != world or plan.pattern != static or plan.problem != problem:
            raise ValueError(f"plan is for {plan.pattern!r} on {plan.problem!r} over {plan.world_size} ranks; "
                             f"expected {static!r} on {problem!r} over {world}")
        if exchange not in ("auto", *EXCHANGES):
            raise ValueError(f"exchange must be 'auto' or one of {EXCHANGES}, got {exchange!r}")
        if not isinstance(chunk_elements, int) or chunk_elements < 1:
            raise ValueError(f"chunk_elements must be a positive int, got {chunk_elements!r}")
        self.pattern, self.problem, self.plan = pattern, problem, plan
        if exchange == "auto":   # group ids shrink what p2p sends each call; the ring sends whole shards
            exchange = "p2p" if self.grouped is not None else choose_exchange(plan)
        self.exchange = exchange
        if timeout is None:
            timeout = group_timeout(self.group)
        if not isinstance(timeout, datetime.timedelta):
            timeout = datetime.timedelta(seconds=float(timeout))
        self.timeout = timeout
        link = Link(self.group, self.rank, timeout, repr(pattern))
        self.stats = link.stats
        self._side = _Rank.build(plan, self.rank, link, self.exchange, chunk_elements)
        # NCCL wants every rank in a group's first point-to-point batch: start with a collective
        dist.barrier(group=self.group)

    def shard(self, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """This rank's rows of a full tensor (``plan.shard(x, rank)``)."""
        return self.plan.shard(x, self.rank, dim)

    def forward(self, q, k, v, scale=None, modifiers=None, return_lse: bool = False, groups=None,
                key_padding_mask=None):
        (q, k, v, groups, key_padding_mask), mesh = self._local(q, k, v, groups, key_padding_mask)
        self._check(q, k, v)
        head_scale = None
        if scale is None:
            scale = self.problem.head_dim ** -0.5
        elif isinstance(scale, torch.Tensor):
            if scale.shape != (self.problem.heads,):
                raise ValueError(f"scale must be a float or a [H={self.problem.heads}] tensor, got shape "
                                 f"{tuple(scale.shape)}")
            head_scale, scale = scale, 1.0
        mods = check_modifiers(modifiers, self.pattern, self.problem, device=q.device) if modifiers else None
        groups, key_padding_mask = self._check_groups(q, groups, key_padding_mask)
        params = modifier_tensors(mods, head_scale)
        out, lse = _run(self, float(scale), mods or None, head_scale, groups, key_padding_mask, q, k, v, *params)
        if mesh is not None:
            out, lse = _as_dtensor(out, mesh), _as_dtensor(lse, mesh)
        return (out, lse) if return_lse else out

    def _check_groups(self, q, groups, key_padding_mask):
        """(groups int64 [B, N_r] or None, key_padding_mask bool [B, N_r] or None), checked."""
        b, n_r = q.shape[0], q.shape[2]
        if self.grouped is None and groups is not None:
            raise ValueError(f"groups= is for Grouped patterns; {self.pattern!r} takes none")
        if self.grouped is not None and groups is None:
            raise ValueError(f"{self.pattern!r} needs groups=: this rank's group ids, int [B, N_local={n_r}]")
        if groups is not None:
            groups = check_groups(groups, b, self.problem.heads, n_r, keep_device=True)
            if groups.shape[1] != 1:
                raise ValueError(f"groups of shape {tuple(groups.shape)}: per-head group ids are not supported in "
                                 f"context parallelism; give one grouping [B={b}, N_local={n_r}] for every head")
            groups = groups[:, 0]
        if key_padding_mask is not None:
            check_key_padding_mask(key_padding_mask, b, n_r, q.device)
        return groups, key_padding_mask

    def _group_ids(self, groups, key_padding_mask):
        """(ids int64 [B, N] of every token, all ranks' shards gathered; real bool [B, N_r]) of a
        call, or (None, None) without groups and padding. Padding and tokens in no group get
        id -1; a static pattern's real tokens share id 0."""
        if groups is None and key_padding_mask is None:
            return None, None
        local = groups if groups is not None else \
            torch.zeros(key_padding_mask.shape, dtype=torch.long, device=key_padding_mask.device)
        local = local.clamp_min(-1)
        if key_padding_mask is not None:
            local = torch.where(key_padding_mask, local, -1)
        b, n_r = local.shape
        widest = max(len(t) for t in self.plan.tokens)
        padded = torch.full((b, widest), -1, dtype=torch.long, device=local.device)
        padded[:, :n_r] = local
        parts = self._side.link.all_gather(padded, "forward")
        ids = torch.empty(b, self.problem.tokens, dtype=torch.long)
        for p, part in enumerate(parts):
            ids[:, self.plan.tokens[p]] = part[:, :len(self.plan.tokens[p])].cpu()
        return ids, key_padding_mask

    def _check(self, q, k, v):
        p, n_r = self.problem, len(self.plan.tokens[self.rank])
        for name, t, heads in (("q", q, p.heads), ("k", k, p.kv_heads), ("v", v, p.kv_heads)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4 or t.shape[1] != heads or t.shape[2] != n_r or t.shape[0] != q.shape[0]:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected [B, {heads}, N_local={n_r}, D] "
                                 f"on rank {self.rank} of {self.plan.world_size} for {p!r}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        if q.shape[-1] != k.shape[-1]:
            raise ValueError(f"q and k must have one head_dim, got {q.shape[-1]} and {k.shape[-1]}")

    def _local(self, q, k, v, groups, key_padding_mask):
        """Plain local shards of q, k, v, groups and key_padding_mask, and the DTensors' mesh
        (None for plain tensors). Group ids and padding masks [B, N] as DTensors are sharded
        on the tokens, ``Shard(1)``."""
        from torch.distributed.tensor import DTensor, Shard

        per_token = []
        for name, t in (("groups", groups), ("key_padding_mask", key_padding_mask)):
            if isinstance(t, DTensor):
                if tuple(t.placements) != (Shard(1),):
                    raise ValueError(f"{name} is a DTensor with placements {tuple(t.placements)}; expected (Shard(1),)")
                t = t.to_local()
            per_token.append(t)
        is_dt = [isinstance(t, DTensor) for t in (q, k, v)]
        if not any(is_dt):
            return (q, k, v, *per_token), None
        if not all(is_dt):
            raise TypeError("q, k and v must all be DTensors or all plain tensors")
        import torch.distributed as dist

        mesh = q.device_mesh
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.device_mesh != mesh or mesh.ndim != 1 or tuple(t.placements) != (Shard(2),):
                raise ValueError(f"{name} is a DTensor with placements {tuple(t.placements)} on a {mesh.ndim}-D "
                                 f"mesh; expected (Shard(2),) on the 1-D mesh of this attention's group")
        if dist.get_process_group_ranks(mesh.get_group()) != dist.get_process_group_ranks(self.group):
            raise ValueError("the DTensors' mesh is not this attention's process group")
        if self.plan.layout != "contiguous" or len(self.plan.split) > 1:
            raise ValueError(f"DTensor Shard(2) holds contiguous shards; this attention's layout is "
                             f"{self.plan.layout!r} with split={self.plan.split}: build it with layout='contiguous' "
                             f"and no split, or pass plain local tensors")
        local = tuple(t.to_local() for t in (q, k, v))
        n_r = len(self.plan.tokens[self.rank])
        if local[0].shape[2] != n_r:
            raise ValueError(f"q's DTensor shard on rank {self.rank} holds {local[0].shape[2]} tokens, the plan's "
                             f"{n_r}: Shard(2) cuts {self.problem.tokens} tokens as torch.chunk does, the plan along "
                             f"grid dimension 0 (extent {self.problem.grid[0]}); use an extent divisible by "
                             f"{self.plan.world_size} or pass plain local tensors (attn.shard)")
        return (*local, *per_token), mesh


@torch.compiler.disable
def _run(attn: "ContextParallelAttention", scale: float, mods, head_scale, groups, key_padding_mask, q, k, v,
         *params):
    """The exchange and compute, outside any compiled graph (torch.compile breaks the graph
    here and compiles what comes before and after)."""
    ids, real = attn._group_ids(groups, key_padding_mask)  # noqa: SLF001
    call = _Call(attn._side, scale, mods, head_scale, ids, real)  # noqa: SLF001
    return _ContextParallel.apply(call, q, k, v, *params)


def _static_part(pattern: Pattern):
    """(the Grouped part or None, the static pattern the plan is built for): ``Grouped()``
    alone plans as Full (Causal for ``causal=True``), ``Grouped() & static`` as its static part."""
    if isinstance(pattern, Grouped):
        return pattern, Causal() if pattern.causal else Full()
    split = split_grouped(pattern)
    return split if split is not None else (None, pattern)


def _as_dtensor(t: torch.Tensor, mesh):
    from torch.distributed.tensor import DTensor, Shard

    return DTensor.from_local(t, mesh, (Shard(2),), run_check=False)


def _process_group(group, split):
    """(ProcessGroup, split) from ``group``: None (the world), a ProcessGroup, or a DeviceMesh.
    An N-D mesh cuts the N leading grid dimensions, one per mesh dimension (its shape is the
    split); its ranks form a new group in the mesh's row-major order (every rank builds it)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    if group is None:
        return dist.group.WORLD, split
    if not isinstance(group, DeviceMesh):
        return group, split
    if group.ndim == 1:
        return group.get_group(), split
    shape = tuple(group.mesh.shape)
    if split is not None and tuple(split) != shape:
        raise ValueError(f"split={tuple(split)} disagrees with the {group.ndim}-D mesh of shape {shape}; give one")
    return dist.new_group(group.mesh.flatten().tolist()), shape


def context_parallel_attention(q, k, v, pattern: Pattern, problem: Problem, *, group=None, layout: str = "contiguous",
                               split: tuple[int, ...] | None = None, exchange: str = "auto", scale=None,
                               modifiers=None, timeout=None, return_lse: bool = False, groups=None,
                               key_padding_mask=None):
    """One call of ``ContextParallelAttention`` (builds the plan each time: keep a module
    for repeated calls)."""
    attn = ContextParallelAttention(pattern, problem, group=group, layout=layout, split=split, exchange=exchange,
                                    timeout=timeout)
    return attn(q, k, v, scale=scale, modifiers=modifiers, return_lse=return_lse, groups=groups,
                key_padding_mask=key_padding_mask)
