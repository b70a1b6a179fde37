"""Lowering of scattered voxel-window attention (SST / DSVT, ``dsl.content.Scattered``).

Grouping (``plan``), on the coordinates' device with torch ops only:

1. window id of every voxel: ``(batch, (c_d + shift_d) // window_d ...)``;
2. a stable lexicographic sort by window id (one stable sort per id column, last column
   first) gives ``order``: packed position -> voxel; voxels of one window are contiguous;
3. segment ids (``seg``, int32 [N_pad]): windows numbered in packed order; the packed
   sequence is padded to ``N_pad``, a multiple of both tiles, with id -1 (matches nothing).

The kernels are the ordinary templates on the packed 1-D sequence ([1, H, N_pad, D]) with
the template's run-time segment-id predicate (``render.SEGMENT_PREDICATE``): a pair is
allowed iff both rows have the same segment id. The op permutes q/k/v into packed order
and scatters outputs and gradients back (``runtime.compiled``).

Tables (built once per plan, ``schedule.CSR`` layout, one schedule group): because windows
are contiguous, the key tiles a query tile visits are one contiguous range — from the tile
holding the first row of its first window to the tile holding the last row of its last
window — and so are the query tiles of a key tile (the relation is symmetric). A pair of
tiles is FULL when both lie inside one window (no padding); FULL tiles are listed first.
Building the index tables needs their total size on the host: one device sync per plan.
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch

from ..dsl.args import expand
from ..dsl.content import Scattered, check_coords
from ..dsl.problem import Problem
from .defaults import default_tile_tokens
from .schedule import CSR, TileSchedule
from .tiling import TileGeometry


@dataclasses.dataclass(frozen=True)
class ScatteredLayout:
    """Static facts of a scattered schedule: row tiles of the packed sequence."""

    block_m: int
    block_n: int
    causal: bool = False  # also require key row <= query row (packed order; ``Grouped(causal=True)``)

    @property
    def multiple(self) -> int:
        """The packed sequence is padded to a multiple of this (both tiles divide it)."""
        return math.lcm(self.block_m, self.block_n)


def scattered_default_tiles(problem: Problem) -> tuple[tuple[int], tuple[int]]:
    q, k = default_tile_tokens(problem)
    return (q,), (k,)


def build_scattered_schedule(pattern: Scattered, problem: Problem, *, q_tile=None, k_tile=None,
                             causal: bool = False) -> TileSchedule:
    """``TileSchedule`` of ``pattern`` on the packed sequence (its ``scattered`` field holds
    the ``ScatteredLayout``; its CSR tables are empty: they come with each plan).

    causal: pairs must also have key row <= query row in packed order. The packing sort is
    stable, so within a segment that is the voxels' (tokens') own order: ``Grouped(causal=True)``."""
    t0 = time.perf_counter()
    if not isinstance(pattern, Scattered):
        raise TypeError(f"pattern must be a sparseforge Scattered, got {pattern!r}")
    q_default, k_default = scattered_default_tiles(problem)
    q_tile = q_default if q_tile is None else tuple(q_tile)
    k_tile = k_default if k_tile is None else tuple(k_tile)
    for name, t in (("q_tile", q_tile), ("k_tile", k_tile)):
        if len(t) != 1 or int(t[0]) < 16 or int(t[0]) & (int(t[0]) - 1):
            raise ValueError(f"{name}={t} must be one power-of-two extent >= 16 (rows of the packed voxel sequence)")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    layout = ScatteredLayout(int(q_tile[0]), int(k_tile[0]), causal)
    geom = TileGeometry.make((layout.multiple,), q_tile, k_tile)
    heads = problem.heads

    def empty(rows):
        return CSR(np.zeros((1, rows + 1), np.int32), np.zeros(0, np.int32), np.zeros((1, rows), np.int32))

    why = "scattered: key tiles come from index tables built per plan from the voxel coordinates"
    return TileSchedule(pattern, problem, geom, np.zeros(heads, np.int32), (0,), empty(geom.n_q_tiles),
                        empty(geom.n_k_tiles), None, why + (", causal within segments" if causal else ""),
                        time.perf_counter() - t0, scattered=layout)


# ------------------------------------------------------------------------------------
# Per-plan grouping and tables
# ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class ScatteredPlan:
    """The grouping of one set of voxel coordinates, reusable across calls (and layers that
    share windows): ``attn(q, k, v, plan=plan)``.

    order:  int64 [N] packed position -> voxel index (voxels sorted by window, stably)
    seg:    int32 [N_pad] segment (window) id of every packed row, -1 for padding
    tables: the kernels' CSR tables by argument name (KV_*, Q_*, HEAD_GROUP [H])
    """

    pattern: Scattered
    layout: ScatteredLayout
    n_voxels: int
    n_pad: int
    n_windows: int
    order: torch.Tensor
    seg: torch.Tensor
    tables: dict

    @property
    def device(self) -> torch.device:
        return self.order.device

    def tensors(self) -> list[torch.Tensor]:
        """What the custom ops take: order, seg, KV_PTR, KV_IDX, KV_FULL, Q_PTR, Q_IDX, Q_FULL."""
        t = self.tables
        return [self.order, self.seg, t["KV_PTR"], t["KV_IDX"], t["KV_FULL"], t["Q_PTR"], t["Q_IDX"], t["Q_FULL"]]

    def __repr__(self) -> str:
        return (f"ScatteredPlan({self.pattern!r}, voxels={self.n_voxels}, windows={self.n_windows}, "
                f"device={self.device})")


TABLE_NAMES = ("order", "seg", "KV_PTR", "KV_IDX", "KV_FULL", "Q_PTR", "Q_IDX", "Q_FULL")


def window_ids(pattern: Scattered, coords: torch.Tensor) -> torch.Tensor:
    """int64 [N, 1 + n] batch then window index per dimension, on coords' device (checked)."""
    nd = coords.shape[1] - 1
    pattern.check_rank(coords)
    ws = torch.tensor(expand("window_size", pattern.window_size, nd), dtype=torch.long, device=coords.device)
    sh = torch.tensor(expand("shift", pattern.shift, nd), dtype=torch.long, device=coords.device)
    c = coords.long()
    return torch.cat([c[:, :1], torch.div(c[:, 1:] + sh, ws, rounding_mode="floor")], dim=1)


def _tile_ranges(start: torch.Tensor, end: torch.Tensor, seg: torch.Tensor, n: int, rows: int, cols: int,
                 n_row_tiles: int, causal: str | None = None):
    """For every tile of ``rows`` packed rows: the contiguous range of ``cols``-row tiles it
    visits (lo, count) and its FULL sub-range (full_lo, n_full); start/end [N] are the
    window bounds of every real row.

    causal: None, "query rows" (the rows are queries: only keys at or before the row) or
    "key rows" (the rows are keys: only queries at or after the row)."""
    dev = start.device
    t = torch.arange(n_row_tiles, device=dev)
    first = t * rows
    real = first < n
    r0 = first.clamp_max(max(n - 1, 0))
    r1 = (first + rows - 1).clamp_max(max(n - 1, 0))
    lo = torch.div(start[r0], cols, rounding_mode="floor")
    hi = torch.div(end[r1] - 1, cols, rounding_mode="floor")
    one = real & (first + rows <= n) & (seg[r0] == seg[r1])   # the tile lies inside one window
    flo = torch.div(start[r0] + cols - 1, cols, rounding_mode="floor")
    fhi = torch.div(end[r0], cols, rounding_mode="floor") - 1
    if causal == "query rows":      # keys <= the tile's last row; FULL keys <= its first row
        hi = torch.div(r1, cols, rounding_mode="floor")
        fhi = torch.minimum(fhi, torch.div(first + 1, cols, rounding_mode="floor") - 1)
    elif causal == "key rows":      # queries >= the tile's first row; FULL queries >= its last row
        lo = torch.div(r0, cols, rounding_mode="floor")
        flo = torch.maximum(flo, torch.div(first + rows - 1 + cols - 1, cols, rounding_mode="floor"))
    elif causal is not None:
        raise ValueError(f"causal must be None, 'query rows' or 'key rows', got {causal!r}")
    count = torch.where(real, hi - lo + 1, torch.zeros_like(lo))
    n_full = torch.where(one, (fhi - flo + 1).clamp_min(0), torch.zeros_like(lo))
    flo = torch.where(n_full > 0, flo, hi + 1)
    return lo, count, flo, n_full


def _csr(lo, count, flo, n_full):
    """CSR (ptr [1, R + 1], idx [E], full [1, R], int32) of contiguous ranges, FULL first."""
    dev = lo.device
    ends = torch.cumsum(count, 0)
    ptr = torch.cat([torch.zeros(1, dtype=ends.dtype, device=dev), ends])
    total = int(ends[-1]) if len(ends) else 0  # the one host sync
    row = torch.repeat_interleave(torch.arange(len(count), device=dev), count, output_size=total)
    p = torch.arange(total, device=dev) - ptr[row]
    nf, f0, l0 = n_full[row], flo[row], lo[row]
    pp = p - nf
    before = f0 - l0  # partial tiles below the FULL range
    idx = torch.where(p < nf, f0 + p, torch.where(pp < before, l0 + pp, f0 + nf + (pp - before)))
    # one unread entry past the end: never an empty tensor as a kernel pointer argument
    idx = torch.cat([idx, torch.zeros(1, dtype=idx.dtype, device=dev)])
    return (ptr.view(1, -1).to(torch.int32).contiguous(), idx.to(torch.int32).contiguous(),
            n_full.view(1, -1).to(torch.int32).contiguous())


def sort_into_windows(pattern: Scattered, coords: torch.Tensor):
    """Window grouping of checked int64 ``coords`` [N, 1 + ndim] with torch ops on their
    device (no host reads): (order [N] packed position -> voxel, seg [N] window number of
    every packed row, start [N] / end [N] the packed rows [start, end) of its window)."""
    dev = coords.device
    n = coords.shape[0]
    w = window_ids(pattern, coords)
    order = torch.arange(n, device=dev)
    for col in reversed(range(w.shape[1])):  # lexicographic: stable sorts, last key first
        _, o = torch.sort(w[order, col], stable=True)
        order = order[o]
    ws = w[order]
    new = torch.ones(n, dtype=torch.bool, device=dev)
    if n > 1:
        new[1:] = (ws[1:] != ws[:-1]).any(1)
    seg_real = torch.cumsum(new.long(), 0) - 1
    pos = torch.arange(n, device=dev)
    start = torch.cummax(torch.where(new, pos, torch.zeros_like(pos)), 0).values
    last = torch.ones(n, dtype=torch.bool, device=dev)
    if n > 1:
        last[:-1] = new[1:]
    end = torch.flip(torch.cummin(torch.flip(torch.where(last, pos + 1, torch.full_like(pos, n)), [0]), 0).values,
                     [0])
    return order, seg_real, start, end


def plan(schedule: TileSchedule, coords: torch.Tensor) -> ScatteredPlan:
    """The grouping and tables of ``coords`` (int [N, 1 + ndim], batch first) for ``schedule``."""
    layout: ScatteredLayout = schedule.scattered
    pattern: Scattered = schedule.pattern
    coords = check_coords(coords, keep_device=True)
    dev = coords.device
    n = coords.shape[0]
    order, seg_real, start, end = sort_into_windows(pattern, coords)
    if n == 0:  # no voxels: one dummy window bound so the range arithmetic has rows to read
        start, end, seg_real = (torch.zeros(1, dtype=torch.long, device=dev), torch.ones(1, dtype=torch.long, device=dev),
                                torch.zeros(1, dtype=torch.long, device=dev))
    m = layout.multiple
    n_pad = max(m, -(-n // m) * m)
    seg = torch.full((n_pad,), -1, dtype=torch.int32, device=dev)
    seg[:n] = seg_real[:n].to(torch.int32)
    bm, bn = layout.block_m, layout.block_n
    causal = layout.causal
    kv = _csr(*_tile_ranges(start, end, seg_real, n, bm, bn, n_pad // bm, "query rows" if causal else None))
    inv = _csr(*_tile_ranges(start, end, seg_real, n, bn, bm, n_pad // bn, "key rows" if causal else None))
    head_group = torch.zeros(schedule.problem.heads, dtype=torch.int32, device=dev)
    tables = dict(KV_PTR=kv[0], KV_IDX=kv[1], KV_FULL=kv[2], Q_PTR=inv[0], Q_IDX=inv[1], Q_FULL=inv[2],
                  HEAD_GROUP=head_group)
    n_windows = int(seg_real[-1]) + 1 if n else 0
    return ScatteredPlan(pattern, layout, n, n_pad, n_windows, order.contiguous(), seg, tables)


def tables_from(tensors, heads: int) -> dict:
    """Kernel tables from the ops' plan tensors (``ScatteredPlan.tensors``)."""
    _, seg, kp, ki, kf, qp, qi, qf = tensors
    return dict(KV_PTR=kp, KV_IDX=ki, KV_FULL=kf, Q_PTR=qp, Q_IDX=qi, Q_FULL=qf,
                HEAD_GROUP=torch.zeros(heads, dtype=torch.int32, device=seg.device), SEG=seg,
                n_tokens=int(seg.shape[0]))


def pack(x: torch.Tensor, order: torch.Tensor, n_pad: int, fill: float = 0.0) -> torch.Tensor:
    """[N, H, ...] voxel layout -> [1, H, N_pad, ...] packed (window order, padded with
    ``fill``), contiguous."""
    n, h = x.shape[:2]
    out = x.new_full((1, h, n_pad, *x.shape[2:]), fill)
    out[0, :, :n] = x[order].movedim(0, 1)
    return out


def unpack(x: torch.Tensor, order: torch.Tensor, n: int) -> torch.Tensor:
    """[1, H, N_pad, ...] packed -> [N, H, ...] voxel layout (inverse of ``pack``)."""
    rows = x[0, :, :n].movedim(1, 0)  # [N, H, ...]
    out = torch.empty_like(rows)
    out[order] = rows
    return out.contiguous()
