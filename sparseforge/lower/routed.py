"""Lowering of routed-region attention (BiFormer, ``dsl.content.Routed``).

Tiles are region-aligned (``TileGeometry.make_regions``): every region is padded to a power
of two per dimension and a query or key tile is one region or an aligned part of one, so
routing decides whole key tiles and the mask inside a visited tile is ``True`` (only
padding rows are masked). What is static — which region a query tile belongs to, the key
tiles of each region, which tiles hold padding — is a ``RoutedLayout`` computed once; the
schedule tables themselves depend on the routes and are built per call on the routes'
device with torch ops (``routed_tables``): no Python loop over regions, no host sync.

Tables (the same names and layout as a static schedule's, see ``schedule.CSR``), with one
schedule group per (batch element, routing head): ``G = B * (H if per_head else 1)``,
group of (b, h) = ``HEAD_GROUP[b, h]`` (the kernels read it with ``GROUP_STRIDE_B = H``).
Each row lists FULL tiles (no padding in either tile) first, then PARTIAL ones. Index
tables are sized by the upper bound ``G * query tiles * topk * key tiles per region``;
their tails past the last row's end are never read.
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch

from ..dsl.args import expand
from ..dsl.content import Routed, check_routes
from ..dsl.problem import Problem
from .defaults import default_tile_tokens
from .schedule import CSR, TileSchedule
from .tiling import TileGeometry

# Smallest tile (rows) the kernels take: tl.dot needs 16 along M, N and K.
MIN_TILE_TOKENS = 16


def region_pad(region: tuple[int, ...]) -> tuple[int, ...]:
    """Padded region extents: powers of two, at least ``MIN_TILE_TOKENS`` positions in all
    (the last dimension grows first)."""
    pad = [1 << (int(r) - 1).bit_length() for r in region]
    d = len(pad) - 1
    while math.prod(pad) < MIN_TILE_TOKENS:
        pad[d] *= 2
        d = (d - 1) % len(pad)
    return tuple(pad)


def region_tile(pad: tuple[int, ...], budget: int) -> tuple[int, ...]:
    """The largest power-of-two tile dividing ``pad`` with at most ``budget`` positions,
    cut from the widest dimension first (earlier dimensions on ties)."""
    exps = [int(math.log2(p)) for p in pad]
    while 2 ** sum(exps) > budget:
        d = max(range(len(exps)), key=lambda i: (exps[i], -i))
        exps[d] -= 1
    return tuple(1 << e for e in exps)


def routed_default_tiles(pattern: Routed, problem: Problem) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Default (query, key) tiles: as much of the padded region as the spill-free token
    budgets of ``default_tile_tokens`` allow (a whole 8x8 region is one 64-row query tile)."""
    pad = region_pad(expand("region_size", pattern.region_size, problem.ndim))
    q_tokens, k_tokens = default_tile_tokens(problem)
    return region_tile(pad, q_tokens), region_tile(pad, k_tokens)


@dataclasses.dataclass(frozen=True, eq=False)
class RoutedLayout:
    """Static facts of a region-aligned tiling (numpy arrays)."""

    n_regions: int
    topk: int
    per_head: bool
    q_region: np.ndarray        # int64 [n_q_tiles]: query region of each query tile
    q_padded: np.ndarray        # bool [n_q_tiles]: holds padding rows
    q_empty: np.ndarray         # bool [n_q_tiles]: padding only
    region_k_tiles: np.ndarray  # int64 [R, k_per_region]: key tiles of each region
    k_padded: np.ndarray        # bool [n_k_tiles]
    k_empty: np.ndarray         # bool [n_k_tiles]
    q_tokens: np.ndarray        # int64 [n_q_tiles, block_m]: token of every tile row, -1 for padding
    k_tokens: np.ndarray        # int64 [n_k_tiles, block_n]

    @property
    def k_per_region(self) -> int:
        return int(self.region_k_tiles.shape[1])

    def routing_heads(self, heads: int) -> int:
        return heads if self.per_head else 1

    def device_arrays(self, device) -> dict[str, torch.Tensor]:
        """The arrays as torch tensors on ``device`` (cached)."""
        key = str(device)
        cache = self.__dict__.setdefault("_device_cache", {})
        if key not in cache:
            cache[key] = {name: torch.from_numpy(np.ascontiguousarray(getattr(self, name))).to(device)
                          for name in ("q_region", "q_padded", "q_empty", "region_k_tiles", "k_padded", "k_empty",
                                         "q_tokens", "k_tokens")}
        return cache[key]


def _tile_regions(geom: TileGeometry, side: str) -> np.ndarray:
    """Region index (row-major over regions per dimension) of every tile of ``side``."""
    region = np.zeros(1, dtype=np.int64)
    for d in geom.dims:
        t = d.tq if side == "q" else d.tk
        tiles = d.extent // t
        reg_d = (np.arange(tiles) * t) // d.region_pad
        region = (region[:, None] * d.regions + reg_d[None, :]).reshape(-1)
    return region


def build_routed_schedule(pattern: Routed, problem: Problem, *, q_tile=None, k_tile=None) -> TileSchedule:
    """Region-aligned ``TileSchedule`` of ``pattern`` (its ``routed`` field holds the
    ``RoutedLayout``; its forward/inverse CSR are empty: tables come per call)."""
    t0 = time.perf_counter()
    if not isinstance(pattern, Routed):
        raise TypeError(f"pattern must be a sparseforge Routed, got {pattern!r}")
    if problem.grid is None:
        raise ValueError(f"{pattern!r} is defined on a token grid: give Problem(grid=...)")
    pattern.check(problem)
    region = expand("region_size", pattern.region_size, problem.ndim)
    pad = region_pad(region)
    q_default, k_default = routed_default_tiles(pattern, problem)
    q_tile = q_default if q_tile is None else tuple(q_tile)
    k_tile = k_default if k_tile is None else tuple(k_tile)
    for name, t in (("q_tile", q_tile), ("k_tile", k_tile)):
        if len(t) != problem.ndim:
            raise ValueError(f"{name}={t} must have one entry per grid dimension {problem.grid}")
    geom = TileGeometry.make_regions(problem.grid, region, q_tile, k_tile, pad)

    q_tok, k_tok = geom.token_table("q"), geom.token_table("k")
    k_region = _tile_regions(geom, "k")
    _, n_regions = pattern.regions(problem.grid)
    order = np.argsort(k_region, kind="stable")
    per_region = len(k_region) // n_regions
    layout = RoutedLayout(
        n_regions=n_regions, topk=pattern.topk, per_head=pattern.per_head,
        q_region=_tile_regions(geom, "q"), q_padded=(q_tok < 0).any(1), q_empty=(q_tok < 0).all(1),
        region_k_tiles=order.reshape(n_regions, per_region).astype(np.int64),
        k_padded=(k_tok < 0).any(1), k_empty=(k_tok < 0).all(1), q_tokens=q_tok, k_tokens=k_tok)
    heads = problem.heads
    head_group = (np.arange(heads) if pattern.per_head else np.zeros(heads)).astype(np.int32)
    group_heads = tuple(range(heads)) if pattern.per_head else (0,)

    def empty(rows):
        return CSR(np.zeros((1, rows + 1), np.int32), np.zeros(0, np.int32), np.zeros((1, rows), np.int32))

    return TileSchedule(pattern, problem, geom, head_group, group_heads, empty(geom.n_q_tiles),
                        empty(geom.n_k_tiles), None,
                        "routed: key tiles come from index tables built per call from the routes",
                        time.perf_counter() - t0, routed=layout)


# ------------------------------------------------------------------------------------
# Per-call tables
# ------------------------------------------------------------------------------------
def routes_for(pattern: Routed, problem: Problem, q: torch.Tensor, k: torch.Tensor,
               routes: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [B, H|1, R, topk] routes on q's device: ``routes`` checked (``check_routes``), or
    computed from q and k exactly as ``reference_attention`` does (``Routed.routes``: float64,
    detached, GQA kv heads' region means serving their query heads)."""
    _, n_regions = pattern.regions(problem.grid)
    if routes is not None:
        r = check_routes(routes, q.shape[0], problem.heads, n_regions, pattern.topk)
        if r.device != q.device:
            raise ValueError(f"routes is on {r.device} but q is on {q.device}")
        return r.contiguous()
    with torch.no_grad():
        return pattern.routes(q, k, problem.grid).contiguous()


def _csr_from_entries(rows: torch.Tensor, cols: torch.Tensor, full: torch.Tensor, valid: torch.Tensor,
                      n_groups: int, n_rows: int):
    """CSR tables (ptr [G, n_rows + 1], idx [E], full [G, n_rows], int32) of flat entries
    (row = g * n_rows + r), FULL first per row, on the entries' device without host sync."""
    total = n_groups * n_rows
    dev = rows.device
    row = torch.where(valid, rows, torch.full_like(rows, total))  # invalid -> sentinel row
    key = row * 2 + (~full).long()
    key, order = torch.sort(key, stable=True)
    idx = cols[order].to(torch.int32)
    counts = torch.zeros(total + 1, dtype=torch.long, device=dev).scatter_add_(0, row, torch.ones_like(row))[:total]
    fulls = torch.zeros(total + 1, dtype=torch.long, device=dev).scatter_add_(0, row, (full & valid).long())[:total]
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    ptr = torch.cat([starts.view(n_groups, n_rows), ends.view(n_groups, n_rows)[:, -1:]], dim=1)
    return ptr.to(torch.int32).contiguous(), idx.contiguous(), fulls.view(n_groups, n_rows).to(torch.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class RoutedTables:
    """Per-call tables of a routed schedule on one device.

    kernels: the CSR tables by kernel argument name (KV_*, Q_*, HEAD_GROUP [B, H]).
    tiles:   int64 [G, n_q_tiles, S] key tile of every (group, query tile, slot),
             S = topk * key tiles per region; ``valid`` bool [G, n_q_tiles, S] says which
             slots are visited (duplicate routes and padding-only tiles are not).
    """

    kernels: dict
    tiles: torch.Tensor
    valid: torch.Tensor
    head_group: torch.Tensor  # int64 [B, H]


def routed_tables(schedule: TileSchedule, routes: torch.Tensor) -> RoutedTables:
    """Tables of ``schedule`` (routed) for ``routes`` int64 [B, H|1, R, topk] (checked)."""
    layout: RoutedLayout = schedule.routed
    geom, heads = schedule.geometry, schedule.problem.heads
    dev = routes.device
    a = layout.device_arrays(dev)
    b, hr = routes.shape[0], routes.shape[1]
    if hr == 1 and layout.per_head:
        routes = routes.expand(b, heads, *routes.shape[2:])
        hr = heads
    n_groups = b * hr
    nq, nk = geom.n_q_tiles, geom.n_k_tiles
    r = routes.reshape(n_groups, layout.n_regions, layout.topk)
    topk = layout.topk
    earlier = torch.ones(topk, topk, dtype=torch.bool, device=dev).tril(-1)  # [j, i]: i < j
    dup = ((r[..., :, None] == r[..., None, :]) & earlier).any(-1)           # [G, R, topk]
    rq = r[:, a["q_region"]]                                                  # [G, nq, topk]
    tiles = a["region_k_tiles"][rq]                                           # [G, nq, topk, kpr]
    valid = ~dup[:, a["q_region"]][..., None] & ~a["k_empty"][tiles] & ~a["q_empty"][None, :, None, None]
    full = ~a["q_padded"][None, :, None, None] & ~a["k_padded"][tiles]
    tiles, valid, full = (t.reshape(n_groups, nq, -1) for t in (tiles, valid, full))
    s = tiles.shape[-1]
    g = torch.arange(n_groups, device=dev)[:, None, None]
    qt = torch.arange(nq, device=dev)[None, :, None]
    kv = _csr_from_entries((g * nq + qt).expand(-1, -1, s).reshape(-1), tiles.reshape(-1), full.reshape(-1),
                           valid.reshape(-1), n_groups, nq)
    inv = _csr_from_entries((g * nk + tiles).reshape(-1), qt.expand(n_groups, -1, s).reshape(-1), full.reshape(-1),
                            valid.reshape(-1), n_groups, nk)
    head_group = (torch.arange(b, device=dev)[:, None] * hr
                  + (torch.arange(heads, device=dev)[None, :] if hr > 1 else torch.zeros(1, heads, dtype=torch.long,
                                                                                          device=dev)))
    kernels = dict(KV_PTR=kv[0], KV_IDX=kv[1], KV_FULL=kv[2], Q_PTR=inv[0], Q_IDX=inv[1], Q_FULL=inv[2],
                   HEAD_GROUP=head_group.to(torch.int32).contiguous())
    return RoutedTables(kernels, tiles, valid, head_group)


# ------------------------------------------------------------------------------------
# A representative static schedule (what the autotuner's cost model reads)
# ------------------------------------------------------------------------------------
def balanced_routes(schedule: TileSchedule, batch: int = 1) -> torch.Tensor:
    """int64 [batch, 1, R, topk] routes where query region r routes to regions r, r+1, ...,
    r+topk-1 (mod R): every region is routed to exactly topk times, so the inverse tables
    are as even as the forward ones. The visited-tile count does not depend on the routes
    (topk distinct regions per query tile), only the dK/dV balance does."""
    layout: RoutedLayout = schedule.routed
    r = torch.arange(layout.n_regions)[:, None] + torch.arange(layout.topk)[None, :]
    return (r % layout.n_regions).expand(batch, 1, -1, -1).contiguous()


def with_tables(schedule: TileSchedule, routes: torch.Tensor) -> TileSchedule:
    """``schedule`` (routed) with the tables of one batch element's ``routes`` [1, H|1, R,
    topk] as its static CSR (numpy), so tile statistics and the cost model can read them."""
    if routes.shape[0] != 1:
        raise ValueError(f"with_tables takes the routes of one batch element, got shape {tuple(routes.shape)}")
    t = routed_tables(schedule, routes.cpu()).kernels

    def csr(prefix):
        return CSR(t[f"{prefix}_PTR"].numpy(), t[f"{prefix}_IDX"][:int(t[f"{prefix}_PTR"][-1, -1])].numpy(),
                   t[f"{prefix}_FULL"].numpy())

    head_group = t["HEAD_GROUP"][0].numpy().astype(np.int32)
    groups = int(head_group.max()) + 1
    group_heads = tuple(int(np.flatnonzero(head_group == g)[0]) for g in range(groups))
    return dataclasses.replace(schedule, head_group=head_group, group_heads=group_heads,
                               forward=csr("KV"), inverse=csr("Q"))
