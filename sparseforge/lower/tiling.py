"""Token tiling: how an N-D grid is cut into query/key tiles.

Tiles are N-D boxes in a *folded* coordinate system. Folding by ``f`` along a dimension
lays its ``f`` interleaved groups (``x % f``) one after another, each padded to a multiple
of the tile extent, so a dilated neighborhood (or MaxViT grid attention, which is the same
interleaving) becomes a contiguous window inside one group:

    folded position p = g * Lp + i      with   x = i * f + g,  Lp = roundup(ceil(L / f), lcm(tq, tk))

Positions whose ``x`` falls outside the grid are padding: never loaded, never allowed.

Region padding (routed attention, ``region > 0``) instead pads every run of ``region``
grid positions to ``region_pad`` (a power of two that the tile extents divide), so no tile
straddles two regions:

    position p -> x = (p // P) * r + p % P      valid iff p % P < r and x < L

with ``r = region`` and ``P = region_pad`` (``fold`` is 1 then).
Tokens stay where they are in memory; kernels compute each tile row's token address.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np


def _roundup(a: int, b: int) -> int:
    return -(-a // b) * b


@dataclasses.dataclass(frozen=True)
class DimTiling:
    """Tiling of one grid dimension: extent ``length``, fold ``fold``, tile extents ``tq``/``tk``."""

    length: int
    fold: int
    tq: int
    tk: int
    region: int = 0      # > 0: region padding (routed attention), see the module docstring
    region_pad: int = 0  # P: padded extent of one region (power of two, multiple of tq and tk)

    @property
    def regions(self) -> int:
        """Regions along this dimension, ceil(length / region) (region padding only)."""
        return -(-self.length // self.region)

    @property
    def group_len(self) -> int:
        """Longest dilation group, ceil(length / fold)."""
        return -(-self.length // self.fold)

    @property
    def padded_group(self) -> int:
        """Lp: each group's span in folded positions (multiple of both tile extents)."""
        return _roundup(self.group_len, math.lcm(self.tq, self.tk))

    @property
    def extent(self) -> int:
        """Folded, padded extent fold * Lp (regions * P with region padding)."""
        if self.region:
            return self.regions * self.region_pad
        return self.fold * self.padded_group

    @property
    def q_tiles(self) -> int:
        return self.extent // self.tq

    @property
    def k_tiles(self) -> int:
        return self.extent // self.tk

    def coords(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, valid) for every folded position: grid coordinate [extent] and not-padding [extent]."""
        p = np.arange(self.extent)
        if self.region:
            x = (p // self.region_pad) * self.region + p % self.region_pad
            return x, (p % self.region_pad < self.region) & (x < self.length)
        g, i = p // self.padded_group, p % self.padded_group
        x = i * self.fold + g
        return x, x < self.length


@dataclasses.dataclass(frozen=True)
class TileGeometry:
    """N-D tiling of a token grid. Tiles are numbered row-major over tiles-per-dimension,
    and rows inside a tile row-major over the tile shape."""

    dims: tuple[DimTiling, ...]

    @classmethod
    def make(cls, grid, q_tile, k_tile=None, fold=None) -> "TileGeometry":
        k_tile = q_tile if k_tile is None else k_tile
        fold = (1,) * len(grid) if fold is None else fold
        for name, t in (("q_tile", q_tile), ("k_tile", k_tile), ("fold", fold)):
            if len(t) != len(grid) or any(int(v) < 1 for v in t):
                raise ValueError(f"{name}={tuple(t)} must have one positive entry per grid dimension {tuple(grid)}")
        return cls(tuple(DimTiling(L, f, a, b) for L, f, a, b in zip(grid, fold, q_tile, k_tile)))

    @classmethod
    def make_regions(cls, grid, region, q_tile, k_tile, pad) -> "TileGeometry":
        """Region-aligned tiling: every region padded to ``pad`` (powers of two >= region)
        per dimension, which the query and key tile extents (powers of two) must divide."""
        dims = []
        for d, (L, r, a, b, pad) in enumerate(zip(grid, region, q_tile, k_tile, pad)):
            for name, t in (("q_tile", a), ("k_tile", b)):
                if t < 1 or t & (t - 1) or pad % t:
                    raise ValueError(f"{name}={tuple(q_tile if name == 'q_tile' else k_tile)} must have power-of-two "
                                     f"extents dividing the padded region {pad} in dimension {d} "
                                     f"(region {r}), got {t}")
            dims.append(DimTiling(L, 1, a, b, region=int(r), region_pad=pad))
        return cls(tuple(dims))

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(d.length for d in self.dims)

    @property
    def strides(self) -> tuple[int, ...]:
        """Row-major token strides of the grid: flat index = sum(x_d * strides[d])."""
        return tuple(math.prod(self.grid[i + 1:]) for i in range(len(self.dims)))

    @property
    def q_tile(self) -> tuple[int, ...]:
        return tuple(d.tq for d in self.dims)

    @property
    def k_tile(self) -> tuple[int, ...]:
        return tuple(d.tk for d in self.dims)

    @property
    def fold(self) -> tuple[int, ...]:
        return tuple(d.fold for d in self.dims)

    @property
    def block_m(self) -> int:
        return math.prod(self.q_tile)

    @property
    def block_n(self) -> int:
        return math.prod(self.k_tile)

    @property
    def n_q_tiles(self) -> int:
        return math.prod(d.q_tiles for d in self.dims)

    @property
    def n_k_tiles(self) -> int:
        return math.prod(d.k_tiles for d in self.dims)

    def token_table(self, side: str) -> np.ndarray:
        """int64 [n_tiles, tile_size]: flat token index of every tile row, -1 for padding."""
        per_dim = []
        for d in self.dims:
            t = d.tq if side == "q" else d.tk
            x, valid = d.coords()
            per_dim.append(np.where(valid, x, -1).reshape(-1, t))  # [tiles_d, t_d]
        table = np.zeros((1, 1), dtype=np.int64)
        invalid = np.zeros((1, 1), dtype=bool)
        for xs, s in zip(per_dim, self.strides):
            n, t = xs.shape
            table = (table[:, None, :, None] + np.maximum(xs, 0)[None, :, None, :] * s).reshape(
                table.shape[0] * n, table.shape[1] * t)
            invalid = (invalid[:, None, :, None] | (xs < 0)[None, :, None, :]).reshape(table.shape)
        return np.where(invalid, -1, table)

    def name(self) -> str:
        q = "x".join(map(str, self.q_tile))
        k = "x".join(map(str, self.k_tile))
        f = "" if all(v == 1 for v in self.fold) else "_f" + "x".join(map(str, self.fold))
        if any(d.region for d in self.dims):
            f += "_r" + "x".join(str(d.region) for d in self.dims)
        return f"q{q}_k{k}{f}"
