"""Lowering: Pattern + Problem -> TileSchedule.

For each query tile the schedule lists the key tiles to visit, FULL ones (every pair
allowed: no mask in the kernel) before PARTIAL ones (mask predicate evaluated); EMPTY
tiles are never visited. The inverse lists, per key tile, the query tiles that visit it
(for the dK/dV kernel). Classification is exact for separable families (per-dimension
interval arithmetic, combined over dimensions) and sound for combinations: FULL tiles are
always all-allowed, EMPTY tiles always all-masked.

Cost: per-dimension work is O(tiles_d * candidates * tile); the N-D combination is one
int8 array of [query tiles, key tiles].
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import time

import numpy as np
import torch

from ..dsl.pattern import Intersection, Pattern, PerHead, Union, as_4d
from ..dsl.problem import Problem
from ..dsl.semantics import make_context
from .naming import readable_name
from .bounds import ClosedForm, derive as derive_bounds
from .budget import check_schedule, check_tables
from .defaults import default_tile, default_tile_tokens
from .families import EMPTY, FULL, PARTIAL, SEPARABLE, Flat, TileTokens, choose_fold, classes, head_signature, \
    leaf_for_head, lowering, span_1d
from .tiling import DimTiling, TileGeometry

# Largest folded extent for which a 1-D rule is classified through its dense 1-D mask.
DENSE_1D_LIMIT = 8192


@dataclasses.dataclass(frozen=True)
class CSR:
    """Per schedule group ``g`` and row ``r``: ``idx[ptr[g, r]:ptr[g, r + 1]]`` are the tiles
    to visit, the first ``full[g, r]`` of them FULL. int32 numpy arrays."""

    ptr: np.ndarray   # [G, rows + 1]
    idx: np.ndarray   # [nnz]
    full: np.ndarray  # [G, rows]

    @property
    def visited(self) -> int:
        return int(self.idx.shape[0])

    @property
    def visited_full(self) -> int:
        return int(self.full.sum())


@dataclasses.dataclass(frozen=True, eq=False)
class Visit:
    """One query tile of one head group and the keys its kernel program visits."""

    q_tile: int
    q_tokens: torch.Tensor       # int64 [nq] query tokens (padding dropped)
    k_tokens: torch.Tensor       # int64 [nk] tokens of every visited key tile, FULL tiles' first
    n_full: int                  # the first n_full of k_tokens come from FULL tiles


@dataclasses.dataclass(frozen=True, eq=False)
class TileSchedule:
    """Which (query tile, key tile) pairs a kernel visits, per group of identical heads.

    head_group: int32 [H], the schedule group of each query head.
    forward:    CSR over query tiles (key tiles per query tile).
    inverse:    CSR over key tiles (query tiles per key tile).
    bounds:     the closed-form key-tile bounds (``lower.bounds``) the forward and dQ
                kernels loop over, or None where the kernels read the forward tables;
                ``bounds_reason`` says why. The dK/dV kernel always reads the inverse tables.
    group_geometry: None (every group tiles the grid as ``geometry``), or one geometry per
                group: head groups whose patterns want different folds (``PerHead`` of Blocks
                and Grid) each get their own fold, with the same tiles and tile counts
                (``geometry`` is then group 0's). The kernels pick the rows of a tile by group.
    """

    pattern: Pattern
    problem: Problem
    geometry: TileGeometry
    head_group: np.ndarray
    group_heads: tuple[int, ...]  # a representative head of each group
    forward: CSR
    inverse: CSR
    bounds: ClosedForm | None
    bounds_reason: str
    build_seconds: float
    routed: object = None  # lower.routed.RoutedLayout for routed attention (tables per call)
    scattered: object = None  # lower.segments.ScatteredLayout for voxel windows (tables per call)
    group_geometry: tuple[TileGeometry, ...] | None = None

    def geometry_of(self, group: int) -> TileGeometry:
        """The tiling of head group ``group``."""
        return self.geometry if self.group_geometry is None else self.group_geometry[group]

    @property
    def group_folds(self) -> tuple[tuple[int, ...], ...] | None:
        """The fold of every head group, or None when they share ``geometry``."""
        return None if self.group_geometry is None else tuple(g.fold for g in self.group_geometry)

    def fingerprint(self) -> str:
        """Content hash: pattern, problem, tiling and the tables themselves (equal
        fingerprints mean equal visiting order and classes)."""
        return self._fingerprint

    @functools.cached_property
    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(f"sparseforge-schedule/1/{self.pattern.fingerprint()}/{self.problem!r}/".encode())
        g = self.geometry
        h.update(f"{g.q_tile}/{g.k_tile}/{g.fold}/".encode())
        if self.routed is not None:
            h.update(f"routed/{g.dims!r}/".encode())
        if self.group_geometry is not None:
            h.update(f"group-folds/{self.group_folds}/".encode())
        if self.scattered is not None:
            h.update(f"scattered/{g.dims!r}/".encode())
            if self.scattered.causal:
                h.update(b"causal/")
        for arr in (self.head_group, self.forward.ptr, self.forward.idx, self.forward.full,
                    self.inverse.ptr, self.inverse.idx, self.inverse.full):
            a = np.ascontiguousarray(arr)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def tables(self) -> dict[str, torch.Tensor]:
        """The index tables as int32 CPU tensors by kernel argument name: the forward CSR
        (KV_PTR, KV_IDX, KV_FULL), the inverse CSR (Q_PTR, Q_IDX, Q_FULL) and HEAD_GROUP [H]."""
        def t(a):
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32))
        return dict(KV_PTR=t(self.forward.ptr), KV_IDX=t(self.forward.idx), KV_FULL=t(self.forward.full),
                    Q_PTR=t(self.inverse.ptr), Q_IDX=t(self.inverse.idx), Q_FULL=t(self.inverse.full),
                    HEAD_GROUP=t(self.head_group))

    @property
    def name(self) -> str:
        """Readable unique name for kernels, ops and directories (``lower.naming``)."""
        return readable_name(self.pattern, self.problem, self.fingerprint())

    @property
    def loop_bounds(self) -> str:
        """How the forward and dQ kernels find their key tiles: "closed form" or "index tables"."""
        return "closed form" if self.bounds is not None else "index tables"

    @property
    def groups(self) -> int:
        return len(self.group_heads)

    @property
    def visited_tiles(self) -> int:
        """Visited (query tile, key tile) pairs summed over heads."""
        per_group = np.diff(self.forward.ptr, axis=1).sum(axis=1)
        return int(sum(per_group[g] for g in self.head_group))

    @property
    def full_tiles(self) -> int:
        per_group = self.forward.full.sum(axis=1)
        return int(sum(per_group[g] for g in self.head_group))

    @functools.cached_property
    def allowed_pairs(self) -> int:
        """Allowed (query, key) pairs summed over heads, counted exactly tile by tile."""
        return sum(self._allowed_in_group(g) * int((self.head_group == g).sum()) for g in range(self.groups))

    @property
    def tile_efficiency(self) -> float:
        """Allowed pairs / pairs inside visited tiles (1.0 = no wasted work)."""
        visited_pairs = self.visited_tiles * self.geometry.block_m * self.geometry.block_n
        return self.allowed_pairs / visited_pairs if visited_pairs else 1.0

    def visits(self, group: int):
        """The work of head group ``group``, one ``Visit`` per query tile with key tiles to
        visit (tokens as int64 tensors, padding dropped, FULL tiles' keys first)."""
        geom = self.geometry_of(group)
        q_table = torch.from_numpy(geom.token_table("q"))
        k_table = torch.from_numpy(geom.token_table("k"))
        ptr, full = self.forward.ptr[group], self.forward.full[group]
        idx = torch.from_numpy(self.forward.idx).long()
        for qt in range(geom.n_q_tiles):
            a, b, f = int(ptr[qt]), int(ptr[qt + 1]), int(full[qt])
            q_tokens = q_table[qt][q_table[qt] >= 0]
            if a == b or len(q_tokens) == 0:
                continue
            k = k_table.index_select(0, idx[a:b])  # [tiles, tk]; FULL tiles hold no padding
            valid = k >= 0
            yield Visit(qt, q_tokens, k[valid], int(valid[:f].sum()))

    def _allowed_in_group(self, g: int) -> int:
        head = self.group_heads[g]
        ctx = make_context(self.pattern, self.problem)
        total = 0
        for visit in self.visits(g):
            total += len(visit.q_tokens) * visit.n_full
            if visit.n_full < len(visit.k_tokens):
                m = as_4d(self.pattern.mask(ctx, visit.q_tokens, visit.k_tokens[visit.n_full:]))
                total += int(m[0, head if m.shape[1] > 1 else 0].sum())
        return total

    def one_d_efficiency(self, tile: int = 128) -> float:
        """Tile efficiency of the same pattern cut into 1-D ``tile``-token runs of the
        row-major sequence (what FlexAttention's BlockMask does). Computed from the exact
        mask one query tile at a time: O(N^2 / tile) work, meant for reports, not hot paths."""
        ctx = make_context(self.pattern, self.problem)
        n = self.problem.tokens
        n_tiles = -(-n // tile)
        keys = torch.arange(n)
        pad = n_tiles * tile - n
        visited = 0
        for g in range(self.groups):
            head = self.group_heads[g]
            weight = int((self.head_group == g).sum())
            for t in range(n_tiles):
                rows = torch.arange(t * tile, min((t + 1) * tile, n))
                m = self.pattern.mask(ctx, rows, keys)
                m = m[..., head if m.dim() >= 3 and m.shape[-3] > 1 else 0, :, :] if m.dim() >= 3 else m
                m = torch.nn.functional.pad(m.reshape(len(rows), n), (0, pad))
                visited += weight * int(m.reshape(len(rows), n_tiles, tile).any(-1).any(0).sum())
        return self.allowed_pairs / (visited * tile * tile) if visited else 1.0

    def summary(self) -> str:
        g = self.geometry
        fold = g.fold if self.group_geometry is None else f"per head group {list(self.group_folds)}"
        lines = [
            f"schedule for {self.pattern!r} on {self.problem!r}",
            f"  tiles: query {g.q_tile} x key {g.k_tile}, fold {fold}; {g.n_q_tiles} query tiles, "
            f"{g.n_k_tiles} key tiles, {self.groups} head group(s)",
            f"  visited tile pairs: {self.visited_tiles} ({self.full_tiles} full, "
            f"{self.visited_tiles - self.full_tiles} partial) of {g.n_q_tiles * g.n_k_tiles * self.problem.heads}",
            f"  tile efficiency: {self.tile_efficiency:.4f}",
            f"  loop bounds: {self.loop_bounds} ({self.bounds_reason})",
            f"  built in {self.build_seconds * 1e3:.1f} ms",
        ]
        return "\n".join(lines)


def build_schedule(pattern: Pattern, problem: Problem, *, q_tile=None, k_tile=None, fold=None,
                   closed_form: bool = True) -> TileSchedule:
    """Lower ``pattern`` on ``problem`` to a TileSchedule (see module docstring).

    closed_form: derive closed-form key-tile bounds where the pattern has them (False: the
                 forward and dQ kernels read the index tables, e.g. to compare the two)."""
    t0 = time.perf_counter()
    if not pattern.is_static:
        raise ValueError(f"{pattern!r} depends on run-time content; static schedules need a static pattern")
    make_context(pattern, problem)  # validates pattern against problem
    if q_tile is None:
        # Spill-free defaults per dtype and head dim (codegen.config.default_tile_tokens).
        q_tokens, k_tokens = default_tile_tokens(problem)
        q_tile = default_tile(problem, q_tokens)
        k_tile = default_tile(problem, k_tokens) if k_tile is None else k_tile
    q_tile = tuple(q_tile)
    k_tile = q_tile if k_tile is None else tuple(k_tile)
    head_group, group_heads = _head_groups(pattern, problem)

    group_geometry = None
    if fold is None:
        group_geometry = _group_geometries(pattern, problem, head_group, group_heads, q_tile, k_tile)
    fold = tuple(fold) if fold is not None else choose_fold(pattern, problem)
    geom = TileGeometry.make(problem.grid, q_tile, k_tile, fold) if group_geometry is None else group_geometry[0]
    check_schedule(pattern, problem, geom if group_geometry is None else group_geometry, len(group_heads))  # before allocating

    classifiers: dict = {}
    classes = []
    for g, h in enumerate(group_heads):
        gg = geom if group_geometry is None else group_geometry[g]
        classifier = classifiers.setdefault(gg.fold, _Classifier(problem, gg))
        classes.append(classifier.apply_padding(classifier.pattern(leaf_for_head(pattern, h), h)))
    check_tables(problem, geom, classes)
    forward, inverse = _csr_pair(classes)
    if closed_form:
        bounds, reason = derive_bounds(pattern, problem, geom)
    else:
        bounds, reason = None, "index tables chosen by the kernel config (closed_form=False)"
    return TileSchedule(pattern, problem, geom, head_group, group_heads, forward, inverse, bounds, reason,
                        time.perf_counter() - t0, group_geometry=group_geometry)


def _head_groups(pattern: Pattern, problem: Problem) -> tuple[np.ndarray, tuple[int, ...]]:
    """(int32 [H] schedule group of each query head, a representative head of each group):
    heads with the same pattern signature share a group."""
    signatures: dict = {}
    head_group = np.zeros(problem.heads, dtype=np.int32)
    for h in range(problem.heads):
        head_group[h] = signatures.setdefault(head_signature(pattern, problem, h), len(signatures))
    return head_group, tuple(int(np.argmax(head_group == g)) for g in range(len(signatures)))


def group_folds_kept(pattern: Pattern, problem: Problem, q_tile, k_tile) -> bool:
    """Whether tiles ``q_tile`` x ``k_tile`` let every head group keep the fold its own pattern
    wants (true when all want one fold). Otherwise the schedule falls back to one shared fold,
    and e.g. the Grid heads of a PerHead mix of Blocks and Grid lose most of their tile efficiency."""
    head_group, group_heads = _head_groups(pattern, problem)
    if len({choose_fold(leaf_for_head(pattern, h), problem) for h in group_heads}) == 1:
        return True
    return _group_geometries(pattern, problem, head_group, group_heads, tuple(q_tile), tuple(k_tile)) is not None


def _group_geometries(pattern: Pattern, problem: Problem, head_group, group_heads, q_tile, k_tile):
    """One geometry per head group, each with the fold its own pattern wants, or None when
    they all want the same fold or it cannot be done: the groups must keep the same tile
    counts (one launch grid, one table layout), and the query heads of one key/value head
    must share a fold (the dK/dV kernel loads a key tile once for all of them)."""
    folds = [choose_fold(leaf_for_head(pattern, h), problem) for h in group_heads]
    if len(set(folds)) == 1:
        return None
    geoms = tuple(TileGeometry.make(problem.grid, q_tile, k_tile, f) for f in folds)
    if len({(g.n_q_tiles, g.n_k_tiles) for g in geoms}) > 1:
        return None
    per_kv = problem.heads // problem.kv_heads
    for kv in range(problem.kv_heads):
        if len({folds[head_group[h]] for h in range(kv * per_kv, (kv + 1) * per_kv)}) > 1:
            return None
    return geoms


def _csr_pair(classes: list[np.ndarray]) -> tuple[CSR, CSR]:
    """Forward CSR (rows = query tiles) and inverse CSR (rows = key tiles) of the per-group
    class matrices, FULL entries first in each row, from one scan of each matrix."""
    n_q, n_k = classes[0].shape
    coo = []
    for c in classes:
        r, col = _nonzero_int8(c)
        coo.append((r, col, c[r, col]))
    forward = _csr([(r, col, kind) for r, col, kind in coo], n_q)
    inverse = _csr([(col, r, kind) for r, col, kind in coo], n_k)
    return forward, inverse


def _nonzero_int8(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero`` of a sparse int8 matrix, scanning it 8 bytes at a time: the class
    matrices of long sequences hold ~10^8 entries of which a few 10^5 are visited."""
    rows, cols = c.shape
    if cols % 8 or not c.flags.c_contiguous:
        return np.nonzero(c)
    wr, wc = np.nonzero(c.view(np.uint64))          # words holding a visited tile
    octets = c.reshape(rows, cols // 8, 8)[wr, wc]  # [words, 8]
    hit_word, hit_byte = np.nonzero(octets)
    return wr[hit_word], wc[hit_word] * 8 + hit_byte


def _csr(entries: list[tuple[np.ndarray, np.ndarray, np.ndarray]], rows: int) -> CSR:
    """CSR of per-group (row, column, class) triples; FULL before PARTIAL, then by column."""
    ptr = np.zeros((len(entries), rows + 1), dtype=np.int64)
    full = np.zeros((len(entries), rows), dtype=np.int32)
    idx_parts, offset = [], 0
    for g, (r, col, kind) in enumerate(entries):
        order = np.lexsort((col, kind != FULL, r))
        idx_parts.append(col[order])
        full[g] = np.bincount(r[kind == FULL], minlength=rows)
        ptr[g, 1:] = offset + np.cumsum(np.bincount(r, minlength=rows))
        ptr[g, 0] = offset
        offset += len(r)
    idx = np.concatenate(idx_parts) if idx_parts else np.zeros(0)
    if offset >= 2 ** 31:
        raise ValueError(f"schedule has {offset} visited tiles, more than int32 tables hold")
    return CSR(ptr.astype(np.int32), idx.astype(np.int32), full)


def _contiguous_in_fold(step: int, fold: int, lo, hi) -> bool:
    return step == fold or bool(np.all(hi <= lo))


# ------------------------------------------------------------------------------------
class _Classifier:
    """Tile classes [n_q_tiles, n_k_tiles] (int8 EMPTY/PARTIAL/FULL) of a pattern for one head."""

    def __init__(self, problem: Problem, geom: TileGeometry):
        self.problem, self.geom = problem, geom
        self.q_tok = geom.token_table("q")
        self.k_tok = geom.token_table("k")
        self.tiles = TileTokens(self.q_tok, self.k_tok, geom.dims)

    def pattern(self, p: Pattern, head: int) -> np.ndarray:
        if isinstance(p, Union):
            return functools.reduce(np.maximum, (self.pattern(c, head) for c in p.parts))
        if isinstance(p, Intersection):
            return functools.reduce(np.minimum, (self.pattern(c, head) for c in p.parts))
        if isinstance(p, PerHead):
            return self.pattern(p.patterns[head], head)
        if isinstance(p, SEPARABLE):
            return self.separable(p)
        return self.flat(p, head)

    def apply_padding(self, c: np.ndarray) -> np.ndarray:
        """No FULL tile may hold padding; a tile of padding only is EMPTY."""
        if not (c.flags.writeable and c.dtype == np.int8):
            c = np.array(c, dtype=np.int8)  # shared or read-only (broadcast) results: copy first
        q_pad = np.flatnonzero((self.q_tok < 0).any(1))
        k_pad = np.flatnonzero((self.k_tok < 0).any(1))
        rows = c[q_pad]
        rows[rows == FULL] = PARTIAL
        c[q_pad] = rows
        cols = c[:, k_pad]
        cols[cols == FULL] = PARTIAL
        c[:, k_pad] = cols
        c[(self.q_tok < 0).all(1)] = EMPTY
        c[:, (self.k_tok < 0).all(1)] = EMPTY
        return c

    # -- separable families: per-dimension classes, combined with min ---------------
    def separable(self, leaf) -> np.ndarray:
        per_dim = [_classes_1d(leaf, dim, p) for dim, p in zip(self.geom.dims, leaf.params(self.problem))]
        nd = len(per_dim)
        out = None
        for d, c in enumerate(per_dim):
            shape = [1] * (2 * nd)
            shape[d], shape[nd + d] = c.shape
            c = c.reshape(shape)
            out = c if out is None else np.minimum(out, c)
        return out.reshape(self.geom.n_q_tiles, self.geom.n_k_tiles)

    # -- flat families: from the token ranges of each tile (``lower.families``) ------
    def flat(self, leaf, head: int) -> np.ndarray:
        entry = lowering(leaf)
        if not isinstance(entry, Flat):
            raise ValueError(f"{type(leaf).__name__} has no static tile schedule")
        return entry.classify(leaf, self.tiles, self.problem, head)


def _classes_1d(leaf, dim: DimTiling, p: dict) -> np.ndarray:
    """int8 [q_tiles_d, k_tiles_d]: tile classes of a separable leaf along one dimension."""
    x, valid = dim.coords()
    lo, hi, step = span_1d(leaf, dim.length, x, p)
    if _contiguous_in_fold(step, dim.fold, lo[valid], hi[valid]):
        return _classes_by_interval(dim, x, valid, lo, hi)
    if dim.extent > DENSE_1D_LIMIT:
        raise ValueError(
            f"{leaf!r}: keys along a dimension of {dim.length} are not contiguous under fold {dim.fold}, "
            f"and the dimension is too long ({dim.extent} > {DENSE_1D_LIMIT}) for a dense 1-D classification")
    xt = torch.from_numpy(x)
    m = leaf.allowed_1d(dim.length, xt[:, None], xt[None, :], **p).numpy()
    m &= valid[:, None] & valid[None, :]
    m = m.reshape(dim.q_tiles, dim.tq, dim.k_tiles, dim.tk)
    return classes(m.all(axis=(1, 3)), ~m.any(axis=(1, 3)))


def _classes_by_interval(dim: DimTiling, x, valid, lo, hi) -> np.ndarray:
    """Classes when every query's keys are one contiguous folded run [lo_f, hi_f]."""
    lp, f = dim.padded_group, dim.fold
    g = x % f
    lo_f = np.where(valid & (hi >= lo), g * lp + (lo - g) // f, np.iinfo(np.int64).max // 4)
    hi_f = np.where(valid & (hi >= lo), g * lp + (hi - g) // f, -1)
    lo_t, hi_t = lo_f.reshape(dim.q_tiles, dim.tq), hi_f.reshape(dim.q_tiles, dim.tq)
    all_valid = valid.reshape(dim.q_tiles, dim.tq).all(1)
    first = lo_t.min(1) // dim.tk
    last = hi_t.max(1) // dim.tk
    span = np.maximum(last - first + 1, 0)
    out = np.zeros((dim.q_tiles, dim.k_tiles), np.int8)
    if span.max(initial=0) == 0:
        return out
    kt = first[:, None] + np.arange(span.max())[None, :]           # [qt, cand]
    in_range = np.arange(span.max())[None, :] < span[:, None]
    c, e = kt * dim.tk, kt * dim.tk + dim.tk - 1
    hit = ((lo_t[:, None, :] <= e[..., None]) & (hi_t[:, None, :] >= c[..., None])).any(-1)
    full = all_valid[:, None] & (lo_t.max(1)[:, None] <= c) & (hi_t.min(1)[:, None] >= e)
    cls = np.where(full, FULL, np.where(hit, PARTIAL, EMPTY)).astype(np.int8)
    rows = np.broadcast_to(np.arange(dim.q_tiles)[:, None], kt.shape)
    keep = in_range & (kt >= 0) & (kt < dim.k_tiles)
    out[rows[keep], kt[keep]] = cls[keep]
    return out
