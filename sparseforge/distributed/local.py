"""A rank's own compute: its queries against the keys of one source (itself or one peer) at a
time, from the tile schedule, run by the CPU executor; and the LSE merge of the sources.

The work of rank r is cut by where the keys live. For every head group and every query tile
holding queries of r, the key tiles the schedule visits are split by owner; each (tile,
owner) is a ``Piece``: r's queries of the tile against that owner's keys of those tiles, with
the exact mask (None when every key tile is FULL; PARTIAL tiles evaluate the pattern's mask
on their own keys only, and keys no query of r sees are dropped). So a source's time is that
of the pairs its tiles hold, not that of a dense attention over every gathered key.

Attention over the union of the sources is the LSE merge of the attention over each
(``merge_into``), and the backward of each source needs only the merged output and LSE
(``P = exp(S - lse)``, ``delta = rowsum(dO * O)``): that is what lets the exchange overlap the
compute, a source at a time, in both directions.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..backends.cpu import attend, attend_backward, compute_dtype
from ..dsl.pattern import as_4d
from ..dsl.problem import Problem
from ..dsl.semantics import make_context
from ..lower.paths import Chunk
from ..lower.schedule import build_schedule
from .plan import ExchangePlan, schedule_groups

__all__ = ["CHUNK_ELEMENTS", "Piece", "Source", "compute_dtype", "local_pieces", "merge_into", "merge_sinks",
           "sinks_grad", "source_backward", "source_forward"]

#: Query rows x keys of one piece at most (per head): larger pieces are cut into row runs.
CHUNK_ELEMENTS = 1 << 22


@dataclasses.dataclass(frozen=True, eq=False)
class Piece:
    """Rows of this rank's queries against keys of one source.

    heads:   int64 [Hg] query heads, or None for all heads;
    queries: int64 [m] rows of this rank's shard;
    keys:    int64 [nk] global tokens, all held by the source;
    mask:    bool [Hg|1, m, nk], or None when every pair is allowed.
    """

    heads: torch.Tensor | None
    queries: torch.Tensor
    keys: torch.Tensor
    mask: torch.Tensor | None

    @property
    def elements(self) -> int:
        return len(self.queries) * len(self.keys)


def _cat_masks(a: Piece, b: Piece) -> torch.Tensor | None:
    if a.mask is None and b.mask is None:
        return None
    h = max(1 if p.mask is None else p.mask.shape[0] for p in (a, b))
    parts = [torch.ones(h, len(p.queries), len(p.keys), dtype=torch.bool) if p.mask is None
             else p.mask.expand(h, -1, -1) for p in (a, b)]
    return torch.cat(parts, 1)


def _coalesced(pieces: list[Piece], limit: int) -> list[Piece]:
    """Consecutive pieces of one head group with equal keys joined (queries stacked), then
    every piece cut into row runs of at most ``limit`` elements."""
    out: list[Piece] = []
    for p in pieces:
        last = out[-1] if out else None
        if last is not None and last.heads is p.heads and torch.equal(last.keys, p.keys) \
                and last.elements + p.elements <= limit:
            out[-1] = Piece(p.heads, torch.cat([last.queries, p.queries]), p.keys, _cat_masks(last, p))
        else:
            out.append(p)
    cut = []
    for p in out:
        step = max(1, limit // max(1, len(p.keys)))
        for i in range(0, len(p.queries), step):
            rows = slice(i, i + step)
            cut.append(p if step >= len(p.queries) else
                       Piece(p.heads, p.queries[rows], p.keys, None if p.mask is None else p.mask[:, rows]))
    return cut


def local_pieces(plan: ExchangePlan, rank: int, *, schedule=None,
                 chunk_elements: int = CHUNK_ELEMENTS) -> dict[int, list[Piece]]:
    """Rank ``rank``'s work, by source (module docstring): source rank -> its pieces, in
    schedule order; sources with no allowed pair are absent."""
    pattern, problem = plan.pattern, plan.problem
    sched = build_schedule(pattern, problem) if schedule is None else schedule
    ctx = make_context(pattern, problem)
    n = problem.tokens
    owner = torch.empty(n, dtype=torch.long)
    for r, t in enumerate(plan.tokens):
        owner[t] = r
    local_row = torch.full((n,), -1, dtype=torch.long)
    local_row[plan.tokens[rank]] = torch.arange(len(plan.tokens[rank]))
    by_source: dict[int, list[Piece]] = {}
    for group in schedule_groups(sched):
        heads = None if sched.groups == 1 else group.heads
        q_mine = (group.q_table >= 0) & (owner[group.q_table.clamp_min(0)] == rank)   # [nQ, tq]
        tiles = torch.nonzero(q_mine.any(1)).flatten()
        bounds = torch.searchsorted(group.row, torch.stack([tiles, tiles + 1]))
        for t, a, b in zip(tiles.tolist(), bounds[0].tolist(), bounds[1].tolist()):
            q_tok = group.q_table[t][q_mine[t]]
            k_tiles, full = group.ktile[a:b], group.full[a:b]
            keys = {}
            for kind, sel in (("full", full), ("partial", ~full)):
                k = group.k_table[k_tiles[sel]].flatten()
                keys[kind] = k[k >= 0]
            for s in torch.unique(owner[torch.cat([keys["full"], keys["partial"]])]).tolist():
                k_full = keys["full"][owner[keys["full"]] == s]
                k_part = keys["partial"][owner[keys["partial"]] == s]
                mask = None
                if len(k_part):
                    m = as_4d(pattern.mask(ctx, q_tok, k_part))[0]            # [H|1, m, np]
                    if m.shape[0] > 1:
                        m = m[group.heads]
                    seen = m.any(1).any(0)
                    k_part, m = k_part[seen], m[..., seen]
                    if not bool(m.all()):
                        ones = torch.ones(m.shape[0], len(q_tok), len(k_full), dtype=torch.bool)
                        mask = torch.cat([ones, m], -1)
                k = torch.cat([k_full, k_part])
                if len(k):
                    by_source.setdefault(s, []).append(Piece(heads, local_row[q_tok], k, mask))
    return {s: _coalesced(p, chunk_elements) for s, p in sorted(by_source.items())}


@dataclasses.dataclass(eq=False)
class Source:
    """One source's pieces, made into executor chunks for a buffer of its keys.

    ``query_tokens``: int64 [N_r], the global token of each of this rank's query rows. Chunks
    carry both sides' global tokens: bias terms measure positions on the whole grid."""

    pieces: list[Piece]
    query_tokens: torch.Tensor
    tokens: int                   # of the whole grid
    _cache: dict = dataclasses.field(default_factory=dict)

    def chunks(self, q_shape, kv_heads: int, buffer_tokens: torch.Tensor, device, ids=None) -> list[Chunk]:
        """The pieces as ``Chunk``s of q [B, H, N_r, D] rows (``q_shape``) and rows of a K/V
        buffer [B, kv_heads, M, D] holding the tokens ``buffer_tokens`` (int64 [M]; p2p: the rows
        received, ring: the owner's shard).

        ``ids``: int64 [B, N] group ids of every token this call (negative: no group or
        padding), or None: a pair is then kept only if both tokens share a group, and keys not
        in the buffer are dropped (built per call; without ids, cached per shape)."""
        batch, heads, queries = q_shape[0], q_shape[1], q_shape[2]
        key = (batch, heads, kv_heads, queries, str(device))
        if ids is None and key in self._cache:
            return self._cache[key]
        m = len(buffer_tokens)
        pos = torch.full((self.tokens,), -1, dtype=torch.long)
        pos[buffer_tokens] = torch.arange(m)
        b = torch.arange(batch)[:, None]
        out = []
        for p in self.pieces:
            keys, mask, kpos = p.keys, p.mask, pos[p.keys]
            if ids is not None:
                gq, gk = ids[:, self.query_tokens[p.queries]], ids[:, keys]                # [B, m], [B, nk]
                same = (gq[:, :, None] == gk[:, None, :]) & (gq >= 0)[:, :, None] & (kpos >= 0)
                mask = same[:, None] if mask is None else mask[None] & same[:, None]     # [B, Hg|1, m, nk]
                cols = mask.flatten(0, 2).any(0)
                if not bool(cols.any()):
                    continue
                keys, kpos, mask = keys[cols], kpos[cols], mask[..., cols]
            elif mask is not None:
                mask = mask[None]
            h = torch.arange(heads) if p.heads is None else p.heads
            q_base = (b * heads + h) * queries                                   # [B, Hg]
            k_base = (b * kv_heads + h // (heads // kv_heads)) * m
            out.append(Chunk((q_base[..., None] + p.queries).to(device), (k_base[..., None] + kpos).to(device),
                             None if mask is None else mask.to(device),
                             self.query_tokens[p.queries].to(device), keys.to(device)))
        if ids is None:
            self._cache[key] = out
        return out


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
