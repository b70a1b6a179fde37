"""A rank's own compute: its queries against the keys of one source (itself or one peer) at a
time, from the tile schedule, run by the CPU executor; and the LSE merge of the sources.

The work of rank r is cut by where the keys live. For every head group and every query tile
holding queries of r, the key tiles the schedule visits are split by owner; each (tile,
owner) is a ``Piece``: r's queries of the tile against that owner's keys of those tiles, kept
as tile lists. A call makes them into keys and exact masks a chunk at a time (None when every
key tile is FULL; PARTIAL tiles evaluate the pattern's mask on their own keys only, and keys
no query sees are dropped). So a source's time is that of the pairs its tiles hold, not that
of a dense attention over every gathered key, and its memory that of one chunk.

Attention over the union of the sources is the LSE merge of the attention over each
(``merge_into``), and the backward of each source needs only the merged output and LSE
(``P = exp(S - lse)``, ``delta = rowsum(dO * O)``): that is what lets the exchange overlap the
compute, a source at a time, in both directions.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch

from ..backends.cpu import attend, attend_backward, compute_dtype
from ..dsl.pattern import as_4d
from ..dsl.problem import Problem
from ..dsl.semantics import make_context
from ..lower.paths import Chunk
from ..lower.schedule import build_schedule
from .plan import ExchangePlan, schedule_groups

__all__ = ["CACHE_ELEMENTS", "CHUNK_ELEMENTS", "LocalWork", "Piece", "Source", "compute_dtype", "merge_into",
           "merge_sinks", "sinks_grad", "source_backward", "source_forward"]

#: Query rows x keys of one chunk at most (per head): larger pieces are cut into row runs.
CHUNK_ELEMENTS = 1 << 22
#: A source's chunks are kept between calls while their query x key entries stay under this.
CACHE_ELEMENTS = 1 << 24


@dataclasses.dataclass(frozen=True, eq=False)
class Piece:
    """This rank's queries of one query tile (or of consecutive tiles that visit the same key
    tiles) against one source's keys of some key tiles, described by tiles; its keys and mask
    are made when a call runs (``LocalWork.parts``).

    group:   the schedule's head group;
    queries: int64 [m] rows of this rank's shard;
    full:    int64 key tiles whose every pair is allowed;
    partial: int64 key tiles whose pairs the pattern's mask decides.
    """

    group: int
    queries: torch.Tensor
    full: torch.Tensor
    partial: torch.Tensor


class LocalWork:
    """Rank ``rank``'s work by source (module docstring): ``pieces[s]`` the pieces whose keys
    rank s holds, in schedule order (sources with no allowed pair are absent). Memory goes
    with the tiles visited, not the pairs: keys and masks are made per chunk."""

    def __init__(self, plan: ExchangePlan, rank: int, *, schedule=None, chunk_elements: int = CHUNK_ELEMENTS):
        self.pattern, self.problem = plan.pattern, plan.problem
        sched = build_schedule(self.pattern, self.problem) if schedule is None else schedule
        self.ctx = make_context(self.pattern, self.problem)
        self.groups = schedule_groups(sched)
        self.per_group_heads = sched.groups > 1
        self.chunk_elements = chunk_elements
        self.query_tokens = plan.tokens[rank]
        n, world = self.problem.tokens, plan.world_size
        self.owner = plan.owner
        local_row = torch.full((n,), -1, dtype=torch.long)
        local_row[self.query_tokens] = torch.arange(len(self.query_tokens))
        pieces: dict[int, list[Piece]] = {}
        for gi, group in enumerate(self.groups):
            k_owners = torch.zeros(len(group.k_table), world, dtype=torch.bool)    # [nK, R]: who holds a tile's keys
            valid = group.k_table >= 0
            k_owners[torch.nonzero(valid)[:, 0], self.owner[group.k_table[valid]]] = True
            q_mine = (group.q_table >= 0) & (self.owner[group.q_table.clamp_min(0)] == rank)   # [nQ, tq]
            tiles = torch.nonzero(q_mine.any(1)).flatten()
            bounds = torch.searchsorted(group.row, torch.stack([tiles, tiles + 1]))
            for t, a, b in zip(tiles.tolist(), bounds[0].tolist(), bounds[1].tolist()):
                queries = local_row[group.q_table[t][q_mine[t]]]
                k_tiles, full = group.ktile[a:b], group.full[a:b]
                holders = k_owners[k_tiles]                                            # [E_t, R]
                for s in torch.nonzero(holders.any(0)).flatten().tolist():
                    mine = holders[:, s]
                    piece = Piece(gi, queries, k_tiles[mine & full], k_tiles[mine & ~full])
                    run = pieces.setdefault(s, [])
                    last = run[-1] if run else None
                    if last is not None and last.group == gi and torch.equal(last.full, piece.full) \
                            and torch.equal(last.partial, piece.partial):
                        run[-1] = Piece(gi, torch.cat([last.queries, queries]), last.full, last.partial)
                    else:
                        run.append(piece)
        self.pieces = dict(sorted(pieces.items()))

    def _tile_keys(self, group, tiles: torch.Tensor, source: int) -> torch.Tensor:
        k = group.k_table[tiles].flatten()
        k = k[k >= 0]
        return k[self.owner[k] == source]

    def parts(self, source: int):
        """The pieces of ``source`` made into (heads or None, queries [m], keys [nk], mask
        [Hg|1, m, nk] or None), row runs of at most ``chunk_elements`` query x key entries;
        partial tiles' keys that none of the run's queries sees are dropped."""
        for piece in self.pieces.get(source, ()):
            group = self.groups[piece.group]
            heads = group.heads if self.per_group_heads else None
            k_full = self._tile_keys(group, piece.full, source)
            k_part = self._tile_keys(group, piece.partial, source)
            step = max(1, self.chunk_elements // max(1, len(k_full) + len(k_part)))
            for i in range(0, len(piece.queries), step):
                queries = piece.queries[i:i + step]
                keys, mask = k_full, None
                if len(k_part):
                    m = as_4d(self.pattern.mask(self.ctx, self.query_tokens[queries], k_part))[0]  # [H|1, m, np]
                    if m.shape[0] > 1:
                        m = m[group.heads]
                    seen = m.any(1).any(0)
                    keys, m = torch.cat([k_full, k_part[seen]]), m[..., seen]
                    if not bool(m.all()):
                        mask = torch.cat([torch.ones(m.shape[0], len(queries), len(k_full), dtype=torch.bool), m], -1)
                if len(keys):
                    yield heads, queries, keys, mask

    @functools.lru_cache(maxsize=None)
    def elements(self, source: int) -> int:
        """Query x key entries of ``source``'s pieces (partial tiles counted whole)."""
        total = 0
        for piece in self.pieces.get(source, ()):
            group = self.groups[piece.group]
            tiles = torch.cat([piece.full, piece.partial])
            total += len(piece.queries) * int((group.k_table[tiles] >= 0).sum())
        return total


@dataclasses.dataclass(eq=False)
class Source:
    """One source of a rank's keys, made into executor chunks for a buffer of its keys."""

    work: LocalWork
    source: int
    _cache: dict = dataclasses.field(default_factory=dict)

    def chunks(self, q_shape, kv_heads: int, buffer_tokens: torch.Tensor, device, ids=None):
        """The source's parts as ``Chunk``s of q [B, H, N_r, D] rows (``q_shape``) and rows of a
        K/V buffer [B, kv_heads, M, D] holding the tokens ``buffer_tokens`` (int64 [M]; p2p: the
        rows received, ring: the owner's shard). Chunks carry both sides' global tokens: bias
        terms measure positions on the whole grid.

        ``ids``: int64 [B, N] group ids of every token this call (negative: no group or
        padding), or None. With ids a pair is kept only if both tokens share a group, and keys
        not in the buffer are dropped. Without ids the chunks are kept for the next call of the
        same shape when the source is small (``CACHE_ELEMENTS``); otherwise they are made as
        the executor walks them (a generator: iterate once)."""
        key = (tuple(q_shape[:3]), kv_heads, str(device))
        if ids is None and key in self._cache:
            return self._cache[key]
        made = self._make(q_shape, kv_heads, buffer_tokens, device, ids)
        if ids is None and self.work.elements(self.source) <= CACHE_ELEMENTS:
            made = self._cache[key] = list(made)
        return made

    def _make(self, q_shape, kv_heads, buffer_tokens, device, ids):
        batch, heads, n_r = q_shape[0], q_shape[1], q_shape[2]
        m = len(buffer_tokens)
        pos = torch.full((self.work.problem.tokens,), -1, dtype=torch.long)
        pos[buffer_tokens] = torch.arange(m)
        b = torch.arange(batch)[:, None]
        q_tokens = self.work.query_tokens
        for p_heads, queries, keys, mask in self.work.parts(self.source):
            kpos = pos[keys]
            if ids is not None:
                gq, gk = ids[:, q_tokens[queries]], ids[:, keys]                         # [B, m], [B, nk]
                same = (gq[:, :, None] == gk[:, None, :]) & (gq >= 0)[:, :, None] & (kpos >= 0)
                mask = same[:, None] if mask is None else mask[None] & same[:, None]     # [B, Hg|1, m, nk]
                cols = mask.flatten(0, 2).any(0)
                if not bool(cols.any()):
                    continue
                keys, kpos, mask = keys[cols], kpos[cols], mask[..., cols]
            elif mask is not None:
                mask = mask[None]
            h = torch.arange(heads) if p_heads is None else p_heads
            q_base = (b * heads + h) * n_r                                               # [B, Hg]
            k_base = (b * kv_heads + h // (heads // kv_heads)) * m
            yield Chunk((q_base[..., None] + queries).to(device), (k_base[..., None] + kpos).to(device),
                        None if mask is None else mask.to(device), q_tokens[queries].to(device), keys.to(device))


def source_forward(q, k, v, chunks, scale: float, scores, positions: Problem):
    """(out [B, H, N_r, Dv], lse [B, H, N_r]) of q against one source's k/v buffer over its
    ``chunks``, in the compute dtype; rows that see none of its keys: zeros, LSE -inf.
    ``scores``: the score modifiers but sinks (``merge_sinks`` adds those once, after the
    merge); ``positions``: the whole grid's problem."""
    return attend(q, k, v, chunks, scale, scores=scores, positions=positions)


def source_backward(q, k, v, out, lse, dout, dlse, chunks, scale: float, scores, positions: Problem):
    """(dq, dk, dv, grads of ``scores.tensors()``) of one source's share, given the merged
    ``out``/``lse`` (sinks included)."""
    return attend_backward(q, k, v, out, lse, dout, chunks, scale, scores=scores, positions=positions, dlse=dlse)


def merge_into(acc, part):
    """Fold one source's (out, lse) into the running ``acc`` (None at first): the attention
    over the union of their keys. Rows with LSE -inf on both sides stay zeros / -inf."""
    if acc is None:
        return part
    (o1, l1), (o2, l2) = acc, part
    lse = torch.logaddexp(l1, l2)
    base = torch.where(lse == -math.inf, torch.zeros_like(lse), lse)
    w1, w2 = torch.exp(l1 - base)[..., None], torch.exp(l2 - base)[..., None]
    return o1 * w1 + o2 * w2, lse



def merge_sinks(out, lse, sinks: torch.Tensor, real: torch.Tensor | None = None):
    """Add one sink logit per head [H] to the denominator of the merged (out, lse): a row's
    LSE becomes logaddexp(lse, sink) and its output shrinks by exp(lse - new lse); a row that
    saw no key gets LSE = sink and stays zero (``dsl.modifiers.Sinks``). ``real`` bool [B, N_r]
    (None: all): padded rows keep zeros and LSE -inf."""
    sink = sinks.to(lse.dtype)[None, :, None].expand_as(lse)
    new = torch.logaddexp(lse, sink)
    if real is not None:
        new = torch.where(real[:, None, :], new, lse)
    base = torch.where(new == -math.inf, torch.zeros_like(new), new)     # padded rows: -inf on both sides
    return out * torch.exp(lse - base)[..., None], new


def sinks_grad(sinks: torch.Tensor, out, lse, dout, dlse) -> torch.Tensor:
    """d sink_h = -sum over this rank's rows of head h of exp(sink_h - lse) * delta, with
    delta = rowsum(dO * O) - dLSE (float64 sum); rows with LSE -inf (padding) add nothing."""
    delta = (dout * out).sum(-1) if dout is not None else torch.zeros_like(lse)
    if dlse is not None:
        delta = delta - dlse.to(delta.dtype)
    p = torch.exp(sinks.to(lse.dtype)[None, :, None] - lse)
    terms = torch.where(lse == -math.inf, 0, -(p.double() * delta.double()))
    return terms.sum(dim=(0, 2))
