"""A paged KV cache (the vLLM / FlashInfer layout) and which of its pages a sparse decode reads.

Layout, as vLLM and FlashInfer keep it:

- ``k_pages``, ``v_pages``: ``[num_pages, page_size, kv_heads, head_dim]``, one pool for the batch;
- ``block_table``: int ``[B, max_pages]``; entry ``[b, j]`` is the physical page holding sample
  ``b``'s tokens ``j * page_size .. (j + 1) * page_size - 1``;
- ``cache_lengths``: int ``[B]``, the tokens sample ``b`` holds (its first
  ``ceil(cache_lengths[b] / page_size)`` entries of ``block_table`` are read, the rest may be
  anything, e.g. -1).

Semantics (DESIGN.md, "Semantics are the contract"): with ``n_queries`` queries over a sample of
``L = cache_lengths[b]`` keys, the queries are the LAST ``n_queries`` positions
(query ``i`` at position ``i + L - n_queries``: bottom-right alignment, as FlashAttention), and
the pattern is evaluated on the sample's own 1-D sequence of ``L`` tokens, i.e. query ``i`` sees
exactly the keys row ``i + L - n_queries`` of ``dense_mask(pattern, Problem(grid=L))`` allows.

What this module gives:

- ``PagedKV``: the validated description (errors name the argument);
- ``gather``: the contiguous, zero-padded ``[B, kv_heads, max_len, head_dim]`` copy (for references;
  differentiable with respect to the pages);
- ``visible_keys`` / ``pages_needed``: the keys, and the pages, that at least one query may see,
  computed exactly from per-row key intervals (no ``[Nq, Nk]`` mask: a 1M-token cache costs what
  its intervals cost), with a size-limited dense fallback for families without an interval form;
- ``bytes_read``: the K/V bytes of a decode step that reads only those pages, of the allowed keys
  alone, and of a dense paged decode (every page up to the cache length);
- ``reference_paged_attention``: the float64 reference of a decode step over the paged cache.

Interval forms (each tested against ``dense_mask``): Full, Causal, Sink, GlobalTokens, Documents,
SlidingWindow, Halo, Blocks (with offset), Neighborhood (NATTEN's own ``natten_window``, dilation as a
strided set), Grid (strided set), StridedShards (its own ``block_mask`` evaluated on key *blocks*:
``ceil(L / block_size)`` entries per query block and head, then ``k <= q`` when causal), PerHead,
and any union / intersection of them (exact set operations per query row and head). Families that
route on content (Routed, Scattered, Grouped) are refused: their keys depend on run-time values.

Host synchronisation: validating a ``PagedKV`` and selecting pages read the block table and the
lengths on the host (this module is the description and the oracle; a CUDA-graph-capturable
decode kernel computes the same page ranges on the device from the closed forms).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .local import Blocks, Grid, Halo, Neighborhood, SlidingWindow, blocks_pad, natten_window
from .modifiers import check_scale
from .pattern import Intersection, MaskContext, Pattern, PerHead, Union, as_4d
from .problem import DTYPE_NAMES, Problem
from .semantics import make_context, masked_softmax_attention
from .sequence import Causal, Documents, Full, GlobalTokens, Sink, StridedShards

#: Most mask entries (queries x keys x heads) the dense fallback evaluates for one sample, for a
#: family that has no interval form here.
DENSE_FALLBACK_ELEMENTS = 1 << 24
#: Most (head, query block, key block) entries of a StridedShards layout evaluated at once.
BLOCK_LAYOUT_ELEMENTS = 1 << 24

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


# ------------------------------------------------------------------------------------
# The description
# ------------------------------------------------------------------------------------
def _check_tensor(name: str, t, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {what}, got {type(t).__name__}")
    return t


@dataclasses.dataclass(frozen=True, eq=False)
class PagedKV:
    """A paged KV cache: ``k_pages``/``v_pages`` ``[num_pages, page_size, kv_heads, head_dim]``
    (one floating dtype, one device), ``block_table`` int ``[B, max_pages]`` and
    ``cache_lengths`` int ``[B]`` on the pages' device.

    Checked on construction (ValueError/TypeError naming the argument): shapes, dtypes,
    devices, ``0 <= cache_lengths[b] <= max_pages * page_size``, and every block-table entry a
    sample reads (its first ``ceil(cache_lengths[b] / page_size)``) in ``[0, num_pages)``; the
    entries after those are never read and may hold anything (-1 by convention).

    The pages may live on the ``meta`` device (shapes and dtype only, with the tables on any
    device): enough to select pages and count bytes of caches too large to allocate; ``gather``
    and the reference need real pages.
    """

    k_pages: torch.Tensor
    v_pages: torch.Tensor
    block_table: torch.Tensor
    cache_lengths: torch.Tensor

    def __post_init__(self):
        shape_what = "[num_pages, page_size, kv_heads, head_dim]"
        k = _check_tensor("k_pages", self.k_pages, shape_what)
        v = _check_tensor("v_pages", self.v_pages, shape_what)
        bt = _check_tensor("block_table", self.block_table, "(int [B, max_pages])")
        cl = _check_tensor("cache_lengths", self.cache_lengths, "(int [B])")
        for name, t in (("k_pages", k), ("v_pages", v)):
            if not t.is_floating_point():
                raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
            if t.dim() != 4:
                raise ValueError(f"{name} must have shape {shape_what}, got {list(t.shape)}")
        if v.dtype != k.dtype:
            raise TypeError(f"v_pages must have the dtype of k_pages ({k.dtype}), got {v.dtype}")
        if tuple(v.shape) != tuple(k.shape):
            raise ValueError(f"v_pages has shape {list(v.shape)}, expected {list(k.shape)} (the shape of "
                             f"k_pages, {shape_what})")
        for name, size in zip(("page_size", "kv_heads", "head_dim"), k.shape[1:]):
            if size < 1:
                raise ValueError(f"k_pages must have {name} >= 1, got shape {list(k.shape)} {shape_what}")
        if v.device != k.device:
            raise ValueError(f"v_pages is on {v.device}, but k_pages is on {k.device}; expected one device")
        for name, t, rank, what in (("block_table", bt, 2, "[B, max_pages]"), ("cache_lengths", cl, 1, "[B]")):
            if t.dtype not in _INT_DTYPES:
                raise TypeError(f"{name} must hold integers (int32 or int64), got a tensor of {t.dtype}")
            if t.dim() != rank:
                raise ValueError(f"{name} must have shape {what}, got {list(t.shape)}")
        if cl.shape[0] != bt.shape[0]:
            raise ValueError(f"cache_lengths has shape {list(cl.shape)}, expected [B={bt.shape[0]}] (one length per "
                             f"row of block_table, shape {list(bt.shape)})")
        if cl.device != bt.device:
            raise ValueError(f"cache_lengths is on {cl.device}, but block_table is on {bt.device}; expected one device")
        if k.device.type != "meta" and bt.device != k.device:
            raise ValueError(f"block_table is on {bt.device}, but k_pages is on {k.device}; expected one device "
                             "(or pages on the meta device, for counting only)")
        if bt.device.type == "meta":
            raise ValueError("block_table is on the meta device; the page selection needs its values")
        lengths = cl.detach().to("cpu", torch.long)
        cap = bt.shape[1] * self.page_size
        for b, n in enumerate(lengths.tolist()):
            if n < 0:
                raise ValueError(f"cache_lengths[{b}] must be >= 0, got {n}")
            if n > cap:
                raise ValueError(f"cache_lengths[{b}]={n} is more than the block table holds: max_pages="
                                 f"{bt.shape[1]} x page_size={self.page_size} = {cap} tokens")
        used = (lengths + self.page_size - 1) // self.page_size                # pages each sample reads
        table = bt.detach().to("cpu", torch.long)
        read = torch.arange(bt.shape[1])[None, :] < used[:, None]
        bad = read & ((table < 0) | (table >= self.num_pages))
        if bool(bad.any()):
            b, j = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"block_table[{b}, {j}] = {int(table[b, j])} is out of range "
                             f"[0, num_pages={self.num_pages}): sample {b} holds cache_lengths[{b}]={int(lengths[b])} tokens in {int(used[b])} pages of "
                             f"{self.page_size}, so its first {int(used[b])} entries must name pages (the entries "
                             "after them are not read)")
        object.__setattr__(self, "_lengths", tuple(lengths.tolist()))

    # -- shapes ---------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.block_table.shape[0]

    @property
    def num_pages(self) -> int:
        return self.k_pages.shape[0]

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k_pages.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k_pages.shape[3]

    @property
    def max_pages(self) -> int:
        return self.block_table.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.k_pages.dtype

    @property
    def lengths(self) -> tuple[int, ...]:
        """``cache_lengths`` as Python ints (read once, on construction)."""
        return self._lengths

    def pages_used(self, b: int) -> int:
        """Pages sample ``b``'s tokens occupy: ``ceil(cache_lengths[b] / page_size)``."""
        return -(-self._lengths[b] // self.page_size)

    def __repr__(self) -> str:
        return (f"PagedKV(num_pages={self.num_pages}, page_size={self.page_size}, kv_heads={self.kv_heads}, "
                f"head_dim={self.head_dim}, dtype={self.dtype}, batch={self.batch}, max_pages={self.max_pages}, "
                f"device={self.k_pages.device})")


def paginate(k: torch.Tensor, v: torch.Tensor, lengths, page_size: int, *, num_pages: int | None = None,
             generator: torch.Generator | None = None, fill: float = 0.0) -> PagedKV:
    """Lay contiguous ``k``/``v`` ``[B, kv_heads, N, head_dim]`` (sample ``b``'s first
    ``lengths[b]`` tokens real) out in pages of ``page_size``: ``num_pages`` physical pages
    (default: exactly the pages needed), assigned in a random order when ``generator`` is given,
    unused slots and pages filled with ``fill``, block-table entries past a sample's pages -1.
    For tests and examples; the inverse of ``gather``."""
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 4:
            raise ValueError(f"{name} must be a floating tensor [B, kv_heads, N, head_dim], got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if k.shape != v.shape:
        raise ValueError(f"v has shape {list(v.shape)}, expected {list(k.shape)} (the shape of k)")
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
    b_, h, n, d = k.shape
    lengths = [int(x) for x in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
    if len(lengths) != b_ or any(not 0 <= x <= n for x in lengths):
        raise ValueError(f"lengths must be {b_} ints in [0, {n}], got {lengths!r}")
    used = [-(-x // page_size) for x in lengths]
    need = sum(used)
    num_pages = need if num_pages is None else num_pages
    if num_pages < need:
        raise ValueError(f"num_pages={num_pages} is fewer than the {need} pages the lengths {lengths} need")
    order = torch.randperm(num_pages, generator=generator) if generator is not None else torch.arange(num_pages)
    max_pages = max([-(-n // page_size), 1])
    table = torch.full((b_, max_pages), -1, dtype=torch.int32)
    kp = torch.full((num_pages, page_size, h, d), fill, dtype=k.dtype, device=k.device)
    vp = torch.full((num_pages, page_size, h, d), fill, dtype=v.dtype, device=v.device)
    nxt = 0
    for b in range(b_):
        for j in range(used[b]):
            page = int(order[nxt])
            nxt += 1
            table[b, j] = page
            lo, hi = j * page_size, min((j + 1) * page_size, lengths[b])
            kp[page, :hi - lo] = k[b, :, lo:hi].transpose(0, 1)
            vp[page, :hi - lo] = v[b, :, lo:hi].transpose(0, 1)
    return PagedKV(kp, vp, table.to(k.device), torch.tensor(lengths, dtype=torch.int32, device=k.device))


def _check_paged(paged) -> PagedKV:
    if not isinstance(paged, PagedKV):
        raise TypeError(f"paged must be a sparseforge PagedKV, got {type(paged).__name__}")
    return paged


def gather(paged: PagedKV, *, max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(k, v, lengths)``: the cache as contiguous ``[B, kv_heads, max_len, head_dim]`` tensors in
    the pages' dtype (position ``t`` of sample ``b`` read from page ``block_table[b, t // page_size]``,
    slot ``t % page_size``), zero at positions ``>= cache_lengths[b]`` (never read from a page, so
    garbage there stays out), and ``lengths`` int64 ``[B]``. ``max_len`` defaults to the longest
    sample. Differentiable with respect to ``k_pages`` and ``v_pages`` (padding passes no gradient)."""
    paged = _check_paged(paged)
    if paged.k_pages.device.type == "meta":
        raise ValueError("gather reads the pages' values, but k_pages is on the meta device (a description for "
                         "counting only); give pages holding data")
    longest = max(paged.lengths, default=0)
    if max_len is None:
        max_len = longest
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < longest:
        raise ValueError(f"max_len must be an int >= the longest cache length {longest}, got {max_len!r}")
    dev = paged.k_pages.device
    lengths = paged.cache_lengths.to(dev, torch.long)
    b_, h, d = paged.batch, paged.kv_heads, paged.head_dim
    if max_len == 0 or paged.num_pages == 0 or paged.max_pages == 0:
        z = paged.k_pages.new_zeros(b_, h, max_len, d)
        return z, z.clone(), lengths
    pos = torch.arange(max_len, device=dev)
    logical = torch.clamp(pos // paged.page_size, max=paged.max_pages - 1)
    valid = pos[None, :] < lengths[:, None]                                        # [B, max_len]
    page = torch.where(valid, paged.block_table.to(dev, torch.long)[:, logical], 0)
    slot = (pos % paged.page_size)[None, :].expand(b_, max_len)
    out = []
    for pages in (paged.k_pages, paged.v_pages):
        x = pages[page, slot]                                                      # [B, max_len, h, d]
        x = torch.where(valid[:, :, None, None], x, torch.zeros((), dtype=x.dtype, device=dev))
        out.append(x.permute(0, 2, 1, 3).contiguous())
    return out[0], out[1], lengths


# ------------------------------------------------------------------------------------
# Key sets per query row, as disjoint half-open intervals
# ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class _Rows:
    """The keys of ``nh * nq`` rows (row ``h * nq + i``: head ``h``, query ``i``; ``nh`` is 1 when
    every head has the same keys) as half-open intervals ``[lo, hi)``, disjoint within a row and
    not empty (``_cover`` also sorts them by (row, lo) and merges touching ones; nothing relies
    on that order)."""

    nh: int
    nq: int
    row: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    def heads(self, nh: int) -> "_Rows":
        """These rows for ``nh`` heads (a head-independent set repeated)."""
        if self.nh == nh:
            return self
        assert self.nh == 1
        shift = (np.arange(nh, dtype=np.int64) * self.nq)[:, None]
        return _Rows(nh, self.nq, (self.row[None, :] + shift).ravel(), np.tile(self.lo, nh), np.tile(self.hi, nh))


def _i64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.int64)


def _cover(row, lo, hi, need: int = 1):
    """(row, lo, hi) of the points covered by at least ``need`` of the given intervals, per row,
    as sorted, disjoint, non-touching intervals (``need=1``: union; ``need=k`` over k
    normalized sets: intersection)."""
    row, lo, hi = _i64(row), _i64(lo), _i64(hi)
    keep = lo < hi
    row, lo, hi = row[keep], lo[keep], hi[keep]
    if not len(row):
        return row, lo, hi
    r = np.concatenate([row, row])
    p = np.concatenate([lo, hi])
    d = np.concatenate([np.ones(len(lo), np.int64), -np.ones(len(hi), np.int64)])
    base = int(p.min())
    span = int(p.max()) - base + 1
    if int(r.max()) < np.iinfo(np.int64).max // span - 1:
        order = np.argsort(r * span + (p - base), kind="stable")  # (row, position) as one key; runs presorted
    else:
        order = np.lexsort((p, r))
    r, p, d = r[order], p[order], d[order]
    new = np.ones(len(r), bool)
    new[1:] = (r[1:] != r[:-1]) | (p[1:] != p[:-1])
    starts = np.flatnonzero(new)
    d = np.add.reduceat(d, starts)
    r, p = r[starts], p[starts]
    c = np.cumsum(d)                   # coverage on [p[i], p[i + 1]); each row's deltas sum to 0
    seg = (c[:-1] >= need) & (r[:-1] == r[1:])
    sr, slo, shi = r[:-1][seg], p[:-1][seg], p[1:][seg]
    if not len(sr):
        return sr, slo, shi
    first = np.ones(len(sr), bool)
    first[1:] = (sr[1:] != sr[:-1]) | (slo[1:] != shi[:-1])
    idx = np.flatnonzero(first)
    last = np.append(idx[1:], len(sr)) - 1
    return sr[idx], slo[idx], shi[last]


def _make(nh, nq, row, lo, hi) -> _Rows:
    return _Rows(nh, nq, *_cover(row, lo, hi))


def _combine(parts: list[_Rows], intersect: bool) -> _Rows:
    nh = max(p.nh for p in parts)
    parts = [p.heads(nh) for p in parts]
    row, lo, hi = (np.concatenate([getattr(p, f) for p in parts]) for f in ("row", "lo", "hi"))
    return _Rows(nh, parts[0].nq, *_cover(row, lo, hi, need=len(parts) if intersect else 1))


def _ragged(counts: np.ndarray):
    """For ragged groups of ``counts``: (group of each element, index within its group)."""
    counts = _i64(counts)
    group = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    within = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return group, within


def _runs(layout: np.ndarray):
    """Runs of True along the last axis of a bool array [G, n]: (group, start, stop)."""
    g = layout.shape[0]
    padded = np.zeros((g, layout.shape[1] + 2), bool)
    padded[:, 1:-1] = layout
    step = np.diff(padded.astype(np.int8), axis=1)
    gs, start = np.nonzero(step == 1)
    _, stop = np.nonzero(step == -1)
    return gs.astype(np.int64), start.astype(np.int64), stop.astype(np.int64)


def _from_layout(layout: np.ndarray, nq: int, scale: int, length: int) -> _Rows:
    """Rows from a bool layout [nh, nq, n] whose entry j covers keys [j*scale, (j+1)*scale)."""
    nh = layout.shape[0]
    g, start, stop = _runs(layout.reshape(nh * nq, -1))
    return _make(nh, nq, g, start * scale, np.minimum(stop * scale, length))


def _strided(nq: int, first: np.ndarray, step: int, count: np.ndarray) -> _Rows:
    """Row i holds keys first[i] + step * j for j in [0, count[i]) (single keys as intervals)."""
    row, j = _ragged(np.maximum(count, 0))
    k = first[row] + step * j
    return _make(1, nq, row, k, k + 1)


def _rows(leaf: Pattern, ctx: MaskContext, q: np.ndarray, length: int) -> _Rows:
    """The keys of every query position in ``q`` under ``leaf`` on a sequence of ``length``."""
    nq = len(q)
    rows = np.arange(nq, dtype=np.int64)
    zeros, full = np.zeros(nq, np.int64), np.full(nq, length, np.int64)
    problem = ctx.problem
    if isinstance(leaf, (Union, Intersection)):
        return _combine([_rows(p, ctx, q, length) for p in leaf.parts], intersect=isinstance(leaf, Intersection))
    if isinstance(leaf, PerHead):
        per: dict[Pattern, _Rows] = {}
        out = []
        for h, p in enumerate(leaf.patterns):
            if p not in per:
                per[p] = _rows(p, ctx, q, length)
            r = per[p]
            sel = r.row // r.nq == (h if r.nh > 1 else 0)
            out.append((r.row[sel] % nq + h * nq, r.lo[sel], r.hi[sel]))
        return _Rows(problem.heads, nq, *(np.concatenate(x) for x in zip(*out)))
    if type(leaf) is Full:
        return _make(1, nq, rows, zeros, full)
    if type(leaf) is Causal:
        return _make(1, nq, rows, zeros, q + 1)
    if type(leaf) is Sink:
        return _make(1, nq, rows, zeros, np.full(nq, min(leaf.n, length), np.int64))
    if type(leaf) is Documents:
        doc = leaf.document_of(torch.from_numpy(q)).numpy()
        ends = np.cumsum(_i64(leaf.lengths))
        return _make(1, nq, rows, (ends - _i64(leaf.lengths))[doc], ends[doc])
    if type(leaf) is GlobalTokens:
        g = _i64(leaf.indices)
        is_global = np.isin(q, g)
        glob = _make(1, nq, rows, zeros, np.where(is_global, length, 0))
        row, j = _ragged(np.full(nq, len(g)))
        seen = _make(1, nq, row, g[j], g[j] + 1)
        return _combine([glob, seen], intersect=False)
    if type(leaf) is SlidingWindow:
        (p,) = leaf.params(problem)
        return _make(1, nq, rows, np.maximum(q - p["left"], 0), np.minimum(q + p["right"] + 1, length))
    if type(leaf) is Halo:
        (p,) = leaf.params(problem)
        lo = (q // p["block"]) * p["block"] - p["halo"]
        return _make(1, nq, rows, np.maximum(lo, 0), np.minimum(lo + p["block"] + 2 * p["halo"], length))
    if type(leaf) is Blocks:
        (p,) = leaf.params(problem)
        size, pad = p["size"], blocks_pad(p["size"], p["offset"])
        lo = ((q + pad) // size) * size - pad
        return _make(1, nq, rows, np.maximum(lo, 0), np.minimum(lo + size, length))
    if type(leaf) is Neighborhood:
        (p,) = leaf.params(problem)
        group, start, end = natten_window(q, length, p["kernel"], p["dilation"], p["stride"], p["causal"])
        group, start, end = _i64(group), _i64(start), _i64(end)
        if p["dilation"] == 1:
            return _make(1, nq, rows, start, end + 1)
        return _strided(nq, group + p["dilation"] * start, p["dilation"], end - start + 1)
    if type(leaf) is Grid:
        (p,) = leaf.params(problem)
        period = length // p["size"]
        return _strided(nq, q % period, period, np.full(nq, p["size"], np.int64))
    if type(leaf) is StridedShards:
        return _strided_shards(leaf, ctx, q, length)
    return _dense_rows(leaf, ctx, q, length)


def _strided_shards(leaf: StridedShards, ctx: MaskContext, q: np.ndarray, length: int) -> _Rows:
    """StridedShards from its own block layout (``block_mask``) on key blocks, then ``k <= q``."""
    problem, nq, bs = ctx.problem, len(q), leaf.block_size
    nkb = -(-length // bs)
    qb = q // bs
    blocks, inverse = np.unique(qb, return_inverse=True)
    heads = problem.heads
    per_chunk = max(1, BLOCK_LAYOUT_ELEMENTS // max(1, heads * nkb))
    parts = []
    kb = torch.arange(nkb)
    for s in range(0, len(blocks), per_chunk):
        chunk = blocks[s:s + per_chunk]
        nc = len(chunk)
        lay = as_4d(leaf.block_mask(problem, torch.from_numpy(chunk), kb))[0].expand(heads, nc, nkb).numpy()
        g, start, stop = _runs(lay.reshape(heads * nc, nkb))          # runs of each (head, query block)
        counts = np.bincount(g, minlength=heads * nc)
        offsets = np.cumsum(counts) - counts
        sel = np.flatnonzero((inverse >= s) & (inverse < s + nc))     # the queries in this chunk
        h = np.arange(heads, dtype=np.int64)[:, None]
        pair = (h * nc + (inverse[sel] - s)[None, :]).ravel()          # (head, query) -> its block's group
        pair_row = (h * nq + sel[None, :]).ravel()
        which, within = _ragged(counts[pair])
        run = offsets[pair][which] + within
        parts.append((pair_row[which], start[run] * bs, np.minimum(stop[run] * bs, length)))
    row, lo, hi = (np.concatenate(x) for x in zip(*parts))
    if leaf.causal:
        hi = np.minimum(hi, q[row % nq] + 1)
    keep = lo < hi                     # runs of one row are disjoint already: no sort needed here
    return _Rows(heads, nq, row[keep], lo[keep], hi[keep])


def _dense_rows(leaf: Pattern, ctx: MaskContext, q: np.ndarray, length: int) -> _Rows:
    """Any other static family, from its mask: small caches only."""
    entries = len(q) * length * ctx.problem.heads
    if entries > DENSE_FALLBACK_ELEMENTS:
        raise ValueError(f"{leaf!r} has no interval form in sparseforge.dsl.paged, and its dense mask of {len(q)} "
                         f"queries x {length} keys x {ctx.problem.heads} heads ({entries} entries) is more than the "
                         f"{DENSE_FALLBACK_ELEMENTS} the dense fallback evaluates; use fewer queries or a shorter "
                         "cache, or a family with an interval form (Causal, SlidingWindow, Sink, StridedShards, ...)")
    m = as_4d(leaf.mask(ctx, torch.from_numpy(q), torch.arange(length)))
    m = m[0].numpy()                                                                # [1 or H, nq, L]
    return _from_layout(np.ascontiguousarray(m), len(q), 1, length)


# ------------------------------------------------------------------------------------
# Per sample
# ------------------------------------------------------------------------------------
def _check_pattern(pattern) -> Pattern:
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a sparseforge Pattern, got {pattern!r} ({type(pattern).__name__})")
    needs = pattern.inputs_needed()
    if needs or any(not p.needs_grid for p in pattern.walk()):
        raise ValueError(f"pattern {pattern!r} depends on run-time content ({', '.join(sorted(needs)) or 'coords'}); "
                         "a paged decode takes static 1-D patterns (Causal, SlidingWindow, StridedShards, Sink, "
                         "Documents, ... and their unions and intersections)")
    return pattern


def _check_n_queries(n_queries) -> int:
    if isinstance(n_queries, bool) or not isinstance(n_queries, int):
        raise TypeError(f"n_queries must be an int, got {n_queries!r} ({type(n_queries).__name__})")
    if n_queries < 1:
        raise ValueError(f"n_queries must be >= 1, got {n_queries}")
    return n_queries


def _check_heads(heads, kv_heads: int) -> int:
    if heads is None:
        return kv_heads
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be an int >= 1 (the query heads), got {heads!r}")
    if heads % kv_heads:
        raise ValueError(f"heads={heads} must be a multiple of the cache's kv_heads={kv_heads}")
    return heads


def _sample_context(pattern: Pattern, length: int, n_queries: int, heads: int, kv_heads: int, head_dim: int,
                    dtype: torch.dtype, where: str) -> MaskContext:
    """The mask context of one sample's sequence of ``length`` tokens; errors name ``where``."""
    if n_queries > length:
        raise ValueError(f"n_queries={n_queries} is more than {where}={length}: the queries are the last n_queries "
                         "positions of the cache (bottom-right alignment), so it must hold at least n_queries tokens")
    problem = Problem(grid=(length,), heads=heads, head_dim=head_dim,
                      dtype=dtype if dtype in DTYPE_NAMES else torch.float16, kv_heads=kv_heads)
    try:
        return make_context(pattern, problem)
    except ValueError as e:
        raise ValueError(f"{where}={length}: the sample is a sequence of {length} tokens, on which {e}") from None


def _key_rows(pattern: Pattern, ctx: MaskContext, n_queries: int) -> _Rows:
    length = ctx.tokens
    q = np.arange(length - n_queries, length, dtype=np.int64)
    return _rows(pattern, ctx, q, length)


def _union_by(rows: _Rows, key: np.ndarray) -> np.ndarray:
    """[m, 3] (key, lo, hi): the union of the rows' intervals grouped by ``key`` (one per row)."""
    r, lo, hi = _cover(key[rows.row], rows.lo, rows.hi)
    return np.stack([r, lo, hi], axis=1) if len(r) else np.zeros((0, 3), np.int64)


def visible_keys(pattern: Pattern, length: int, n_queries: int, *, heads: int = 1, kv_heads: int | None = None,
                 per_kv_head: bool = False) -> np.ndarray:
    """The keys at least one of the last ``n_queries`` queries of a sequence of ``length`` tokens
    may see under ``pattern`` (any head), as sorted disjoint half-open intervals int64 ``[m, 2]``.

    ``per_kv_head``: a list with one such array per key/value head instead (the keys some query
    head of its group sees). Exact, computed from per-row intervals; see the module docstring.
    """
    pattern = _check_pattern(pattern)
    n_queries = _check_n_queries(n_queries)
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be an int >= 0, got {length!r}")
    kv_heads = heads if kv_heads is None else kv_heads
    if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1:
        raise ValueError(f"kv_heads must be an int >= 1, got {kv_heads!r}")
    heads = _check_heads(heads, kv_heads)
    ctx = _sample_context(pattern, length, n_queries, heads, kv_heads, 64, torch.float16, "length")
    rows = _key_rows(pattern, ctx, n_queries)
    if per_kv_head:
        return _per_kv_head(rows, heads, kv_heads)
    return _union_by(rows, np.zeros(rows.nh * rows.nq, np.int64))[:, 1:]


def _per_kv_head(rows: _Rows, heads: int, kv_heads: int) -> list[np.ndarray]:
    if rows.nh == 1:
        one = _union_by(rows, np.zeros(rows.nq, np.int64))[:, 1:]
        return [one.copy() for _ in range(kv_heads)]
    kv_of_row = np.repeat(np.arange(heads, dtype=np.int64) // (heads // kv_heads), rows.nq)
    u = _union_by(rows, kv_of_row)
    return [u[u[:, 0] == h, 1:] for h in range(kv_heads)]


def _pages_of(intervals: np.ndarray, page_size: int, pages: int) -> np.ndarray:
    """Sorted logical page indices that hold a key of the half-open ``intervals`` [m, 2]."""
    mark = np.zeros(pages + 1, np.int64)
    if len(intervals):
        np.add.at(mark, intervals[:, 0] // page_size, 1)
        np.add.at(mark, (intervals[:, 1] - 1) // page_size + 1, -1)
    return np.flatnonzero(np.cumsum(mark)[:pages] > 0)


def pages_needed(pattern: Pattern, paged: PagedKV, n_queries: int, *, heads: int | None = None) -> list[torch.Tensor]:
    """For each sample ``b``: the sorted logical page indices ``j`` (int64; the physical page is
    ``block_table[b, j]``) that hold at least one key some query (the last ``n_queries``
    positions of its ``cache_lengths[b]`` tokens, any of the ``heads`` query heads, default
    ``kv_heads``) may see under ``pattern`` — exactly, from per-row key intervals.

    A page holds every key/value head of its tokens, so the selection is the union over heads.
    """
    paged = _check_paged(paged)
    pattern = _check_pattern(pattern)
    n_queries = _check_n_queries(n_queries)
    heads = _check_heads(heads, paged.kv_heads)
    out = []
    for b, length in enumerate(paged.lengths):
        ctx = _sample_context(pattern, length, n_queries, heads, paged.kv_heads, paged.head_dim, paged.dtype,
                              f"cache_lengths[{b}]")
        rows = _key_rows(pattern, ctx, n_queries)
        iv = _union_by(rows, np.zeros(rows.nh * rows.nq, np.int64))[:, 1:]
        out.append(torch.from_numpy(_pages_of(iv, paged.page_size, paged.pages_used(b))))
    return out


def physical_pages(paged: PagedKV, selection: list[torch.Tensor]) -> list[torch.Tensor]:
    """The physical page ids (``block_table`` entries) of a ``pages_needed`` selection."""
    table = paged.block_table.detach().to("cpu", torch.long)
    return [table[b, sel] for b, sel in enumerate(selection)]


@dataclasses.dataclass(frozen=True)
class PagedBytes:
    """The K/V bytes of one decode step over a paged cache, per sample and in total.

    pages:        pages read when reading only the selected ones (``pages_needed``);
    keys:         distinct keys some query may see (any head);
    kv_head_keys: the same summed over key/value heads, each head counting the keys some query
                  head of its group sees (``keys * kv_heads`` when every head sees the same keys);
    dense_pages:  pages a dense paged decode reads (every page up to the cache length).
    page_bytes = page_size * kv_heads * head_dim * itemsize * 2 (K and V);
    token_bytes = head_dim * itemsize * 2 (one key of one kv head, K and V).
    """

    pages: tuple[int, ...]
    keys: tuple[int, ...]
    kv_head_keys: tuple[int, ...]
    dense_pages: tuple[int, ...]
    page_bytes: int
    token_bytes: int

    @property
    def selected_bytes(self) -> int:
        """Bytes read by the page selection: pages x page_size x kv_heads x head_dim x itemsize x 2."""
        return sum(self.pages) * self.page_bytes

    @property
    def allowed_bytes(self) -> int:
        """Bytes of the allowed keys alone (per kv head, its own keys)."""
        return sum(self.kv_head_keys) * self.token_bytes

    @property
    def dense_bytes(self) -> int:
        """Bytes of a dense paged decode: every page up to the cache length."""
        return sum(self.dense_pages) * self.page_bytes

    def as_dict(self) -> dict:
        return dict(pages=list(self.pages), keys=list(self.keys), kv_head_keys=list(self.kv_head_keys),
                    dense_pages=list(self.dense_pages), page_bytes=self.page_bytes, token_bytes=self.token_bytes,
                    selected_bytes=self.selected_bytes, allowed_bytes=self.allowed_bytes,
                    dense_bytes=self.dense_bytes)


def bytes_read(pattern: Pattern, paged: PagedKV, n_queries: int, *, heads: int | None = None) -> PagedBytes:
    """Exact K/V byte counts of a decode step of ``n_queries`` queries over ``paged`` under
    ``pattern`` (``PagedBytes``): reading only ``pages_needed``, the allowed keys alone, and a
    dense paged decode. The pages may be on the meta device (only shapes and dtype are read)."""
    paged = _check_paged(paged)
    pattern = _check_pattern(pattern)
    n_queries = _check_n_queries(n_queries)
    heads = _check_heads(heads, paged.kv_heads)
    pages, keys, kv_keys, dense = [], [], [], []
    for b, length in enumerate(paged.lengths):
        ctx = _sample_context(pattern, length, n_queries, heads, paged.kv_heads, paged.head_dim, paged.dtype,
                              f"cache_lengths[{b}]")
        rows = _key_rows(pattern, ctx, n_queries)
        iv = _union_by(rows, np.zeros(rows.nh * rows.nq, np.int64))[:, 1:]
        pages.append(len(_pages_of(iv, paged.page_size, paged.pages_used(b))))
        keys.append(int((iv[:, 1] - iv[:, 0]).sum()))
        kv_keys.append(sum(int((x[:, 1] - x[:, 0]).sum()) for x in _per_kv_head(rows, heads, paged.kv_heads)))
        dense.append(paged.pages_used(b))
    item = paged.k_pages.element_size()
    return PagedBytes(tuple(pages), tuple(keys), tuple(kv_keys), tuple(dense),
                      page_bytes=paged.page_size * paged.kv_heads * paged.head_dim * item * 2,
                      token_bytes=paged.head_dim * item * 2)


# ------------------------------------------------------------------------------------
# The reference
# ------------------------------------------------------------------------------------
def reference_paged_attention(q: torch.Tensor, paged: PagedKV, pattern: Pattern, *, scale=None,
                              return_lse: bool = False):
    """A decode (or chunked-prefill) step over a paged cache, in float64.

    ``q``: ``[B, H, Nq, head_dim]`` (H a multiple of ``kv_heads``, GQA); query ``i`` of sample ``b``
    sits at position ``i + cache_lengths[b] - Nq`` and sees the keys that row of the pattern's
    mask on the sample's own sequence of ``cache_lengths[b]`` tokens allows (bottom-right
    alignment; ``Nq <= cache_lengths[b]``). ``scale``: None (``head_dim ** -0.5``), a float or a
    ``[H]`` tensor. Returns float64 ``[B, H, Nq, head_dim]`` (and the natural-log LSE
    ``[B, H, Nq]``, -inf for a row with no key). Rows the pattern leaves empty give zeros, and a
    key a query may not see never reaches it, not even NaN or Inf stored in the pages.

    The cache is ``gather``-ed and each sample's rows go through ``semantics.masked_softmax_attention``
    (the core of ``reference_attention``) with the mask ``pattern.mask`` gives for positions
    ``L - Nq .. L - 1`` against keys ``0 .. L - 1`` (the bottom rows of the self-attention mask on
    the sample's sequence), computed here rather than by ``reference_attention`` because the
    latter took Nq == Nk only when this was written; where ``Problem(grid=Nq, kv_grid=L)``
    exists the two agree (tested). Score modifiers are not supported here.
    Differentiable with respect to ``q``, ``k_pages`` and ``v_pages``.
    """
    paged = _check_paged(paged)
    pattern = _check_pattern(pattern)
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor [B, H, Nq, head_dim], got {type(q).__name__}")
    if not q.is_floating_point():
        raise TypeError(f"q must have a floating dtype, got {q.dtype}")
    if q.dim() != 4 or q.shape[0] != paged.batch or q.shape[3] != paged.head_dim or q.shape[2] < 1:
        raise ValueError(f"q has shape {list(q.shape)}, expected [B={paged.batch}, H, Nq >= 1, "
                         f"head_dim={paged.head_dim}] for {paged!r}")
    if q.device != paged.k_pages.device:
        raise ValueError(f"q is on {q.device}, but k_pages is on {paged.k_pages.device}; expected one device")
    heads = _check_heads(q.shape[1], paged.kv_heads)
    nq = q.shape[2]
    group = heads // paged.kv_heads
    k, v, _ = gather(paged)
    outs, lses = [], []
    for b, length in enumerate(paged.lengths):
        ctx = _sample_context(pattern, length, nq, heads, paged.kv_heads, paged.head_dim, paged.dtype,
                              f"cache_lengths[{b}]")
        s = _scale(scale, ctx.problem, q.device)
        rows = torch.arange(length - nq, length)
        m = as_4d(pattern.mask(ctx, rows, torch.arange(length)))[0].to(q.device)   # [1 or H, Nq, L]
        kb = k[b, :, :length].double().repeat_interleave(group, dim=0)
        vb = v[b, :, :length].double().repeat_interleave(group, dim=0)
        o, lse = masked_softmax_attention(q[b].double(), kb, vb, m, s)
        outs.append(o)
        lses.append(lse)
    out, lse = torch.stack(outs), torch.stack(lses)
    return (out, lse) if return_lse else out


def _scale(scale, problem: Problem, device):
    s = check_scale(scale, problem, device=device)
    if s is None:
        return problem.head_dim ** -0.5
    if isinstance(s, torch.Tensor):
        return s.double().view(-1, 1, 1)
    return s
