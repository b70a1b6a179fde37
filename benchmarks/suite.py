"""The sparseforge benchmark suite: every problem of the issue, side by side with its peers.

    sparseforge bench --suite --cpu [--only P1,P4] [--json] [--out FILE] [--plot FILE]
    sparseforge bench --suite            # GPU mode: full-size problems on a CUDA device
    python benchmarks/suite.py plot RESULTS.json OUT.png

Problems (B, H, grid, D at full size; the peers of the issue):

| id  | problem                        | B, H, grid, D             | pattern(s)                                  | peers                      |
|-----|--------------------------------|---------------------------|---------------------------------------------|----------------------------|
| P1  | 1-D neighborhood               | 1, 16, 32768, 128         | Neighborhood(2048); Neighborhood(512, dilation=8) | FlexAttention, NATTEN, dense SDPA |
| P2  | causal sliding window          | 1, 32, 16384, 128         | Causal() & SlidingWindow(4096)              | FlexAttention, SDPA        |
| P3  | 2-D neighborhood, large kernel | 1, 24, 256x256, 128       | Neighborhood(80); Neighborhood(80, stride=16) | FlexAttention, NATTEN    |
| P4  | 2-D neighborhood, small kernel | 128, 2, 56x56, 32         | Neighborhood(7); Neighborhood(7, dilation=8) | FlexAttention, NATTEN     |
| P5  | 3-D neighborhood               | 1, 24, 30x48x80, 128      | Neighborhood((18, 24, 24))                  | FlexAttention, NATTEN      |
| P6  | S2 strided shards, causal      | 1, 32, 32768 / 131072, 128 | StridedShards(64, 16, 16)                  | FlexAttention, same layout |
| P7  | routed regions (BiFormer)      | 8, 8, 64x64, 64           | Routed((8, 8), 8): regions 8x8, top-8       | BiFormer gather + matmul, FlexAttention (block mask from the routes per call) |
| P8  | scattered voxel softmax        | 131072 voxels, H 4, D 32  | Scattered((12, 12)): windows 12x12          | padded-window SDPA, FlexAttention (document mask) |
| P9  | scattered linear               | 131072 voxels, H 4, D 32  | Scattered((12, 12)), attention="linear"     | torch index_add scatter reference |
| P10 | HaloNet                        | 32, 4, 64x64, 64          | Halo(8, 3)                                  | FlexAttention, unfold HaloAttention |
| P11 | MaxViT block + grid            | 32, 4, 64x64, 32          | PerHead([Blocks(8)] * 2 + [Grid(8)] * 2)    | reshape + SDPA, FlexAttention |

A problem with two patterns (or sequence lengths) runs as two cases, ``P1`` and ``P1b``;
``--only P1`` selects both. A content-dependent problem without a harness would be reported as
"not runnable: <reason>", never estimated.

Content-dependent problems (harnesses in this file, peers in ``benchmarks/peers.py``, shared
with ``benchmarks/memory.py``):

- P7: random q, k, v; our op routes inside every call (``attn(q, k, v)``); the peers are
  BiFormer's released gather implementation (``nchwBRA``: region means, top-k, ``torch.gather``
  of K/V per routed region, matmul / softmax / matmul) and FlexAttention with a block mask
  built from BiFormer's routes in every call (set-up counted). Allowed pairs, exact: N x topk
  x region tokens per head and batch element (from the routes of random q, k).
- P8: a synthetic, spatially clustered voxel set (``peers.make_voxels``, seeded: 4 batch
  elements, 2-D, 131072 voxels, windows of 12x12 cells holding 24-144 voxels, mean 50; the
  result reports the statistics), q, k, v [N, H, D] in shuffled voxel order. Ours:
  ``attn(q, k, v, coords=coords)`` (grouping in every call) and ``attn(q, k, v, plan=plan)`` (a
  reused plan); peers: every window padded to the largest with a key padding mask and one SDPA,
  and FlexAttention with a document mask over the window-sorted voxels (grouping and block mask
  in every call). Allowed pairs: the sum over windows of size^2, per head.
- P9: P8's voxels with ``sf.compile(..., attention="linear")``; peer: ScatterFormer's
  per-window KV / S sums with ``index_add``. No tiles (tile efficiency not applicable); the
  FLOP model is 4 N H D^2.

CPU mode (``--cpu``) measures what is exact on a CPU:

- tile efficiency (allowed pairs / pairs inside visited tiles) of our default schedule and of
  1-D 128x128 tiles of the row-major sequence (FlexAttention's BlockMask), and both visited
  tile counts, at FULL size where an exact method is cheap, otherwise at the scaled size
  (the result says which and how);
- schedule build time (``build_schedule``) vs ``create_block_mask`` with a vectorised
  ``mask_mod`` (the pattern's own ``mask`` under vmap) for the same mask, at the scaled size;
- cold (empty ``SPARSEFORGE_CACHE_DIR``, first call in the process) and warm (second call)
  ``sf.compile`` time, at the scaled size;
- CPU op time, forward and forward + backward, median of ``--repeat`` runs after one warm-up
  on random fp32 inputs: sf.compile's CPU path, FlexAttention (``torch.compile`` on CPU,
  eager when that fails; FlexAttention has no backward on CPU, reported as such), masked SDPA
  (a dense boolean mask, only when it fits in memory), and the torch peers of P10/P11.

Scaling rule of the CPU mode (full size -> scaled): B -> 1, H -> 2, D -> min(D, 64), and
every grid extent divided by a factor s_d chosen so that N is about 4096 tokens or less;
every *length* of the pattern along that dimension (kernel size, window, neighborhood
stride, block size) is divided by the same s_d, while *counts* (dilation groups, S2's local
blocks and vertical stride, MaxViT's block/grid sizes where the grid is already 64x64) are
kept, so density and tile structure keep their character. The scaled cases (also in each
result's ``scaled`` entry):

    P1  1,2,4096,64   Neighborhood(256)            P1b 1,2,4096,64   Neighborhood(64, dilation=8)
    P2  1,2,4096,64   Causal() & SlidingWindow(1024)
    P3  1,2,64x64,64  Neighborhood(20)             P3b 1,2,64x64,64  Neighborhood(20, stride=4)
    P4  1,2,56x56,32  Neighborhood(7)              P4b 1,2,56x56,32  Neighborhood(7, dilation=8)
    P5  1,2,15x12x20,64  Neighborhood((9, 6, 6))
    P6  1,2,4096,64   StridedShards(8, 16, 16)     P6b 1,2,4096,64   StridedShards(2, 16, 16)
    P7  1,2,64x64,64  Routed((8, 8), 8)            (64x64 is already 4096 tokens: grid, regions, top-k kept)
    P8  4096 voxels (2 batch elements), 2 heads, D 32, Scattered((12, 12))   (windows keep mean ~50 voxels)
    P9  as P8, attention="linear"
    P10 1,2,64x64,64  Halo(8, 3)                   P11 1,2,64x64,32  PerHead([Blocks(8), Grid(8)])

For P7 and P8 the tile efficiency is exact at FULL size (P7: routes of random q, k; P8: the
full voxel set; P8 also gives the padded-window peer's efficiency: allowed pairs / padded
pairs); the set-up steps (``setup``: our per-call route tables or plan vs the peers' routing /
grouping and ``create_block_mask``) replace ``schedule_build``.

GPU mode (no ``--cpu``): full-size problems on CUDA in bf16: forward and forward + backward
time with ``triton.testing.do_bench`` (median, L2 flushed), set-up time (compile / block
mask), peak memory, effective TFLOP/s from the exact allowed-pair count (forward
4 * pairs * D FLOP, backward 2.5x forward), speedup over the best peer and the ratio to
dense SDPA time x density. P7-P9 report set-up steps, times, the extra peak memory of each
call and TFLOP/s (P9: from the FLOP model), with the peers' agreement with ours. A peer
that is not installed is reported as not run, with the
reason. Without a CUDA device it stops with "no CUDA device: use --cpu".
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Callable

import torch

import sparseforge as sf
from sparseforge.cli.build import load_benchmark
from sparseforge.lower.schedule import build_schedule
from sparseforge.dsl.pattern import Intersection, as_4d
from sparseforge.dsl.semantics import make_context

SCHEMA = "sparseforge-bench-suite/1"
#: Largest N^2 x head groups for which the 1-D 128x128 baseline is counted from the dense
#: mask (``TileSchedule.one_d_efficiency``, ~4e7 elements/s on one core).
ONE_D_DENSE_BUDGET = 2.5e8
#: Largest N^2 x heads for which allowed pairs are counted from the dense mask directly.
DENSE_COUNT_BUDGET = 5e8
#: Largest memory (bytes) masked SDPA may need on CPU: the bool mask plus float32 scores.
SDPA_MEMORY_LIMIT = 4 << 30
ONE_D_TILE = 128
#: Run FlexAttention under torch.compile (False: eager; the tests use it to stay fast).
FLEX_COMPILE = True


# ------------------------------------------------------------------------------------
# The problems
# ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    grid: tuple[int, ...] | None
    head_dim: int

    def problem(self, dtype) -> sf.Problem:
        return sf.Problem(grid=self.grid, heads=self.heads, head_dim=self.head_dim, dtype=dtype)

    def as_dict(self) -> dict:
        return dict(batch=self.batch, heads=self.heads, grid=None if self.grid is None else list(self.grid),
                    head_dim=self.head_dim)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str                     # "P1", "P1b": --only matches the problem id (the part before a letter)
    problem: str                # the problem id of the issue: "P1"
    title: str
    pattern: sf.Pattern
    full: Shape
    peers: tuple[str, ...]      # peers of the issue (names in PEERS)
    cpu_pattern: sf.Pattern | None = None   # the scaled pattern (content-dependent cases: the same pattern)
    cpu: Shape | None = None
    voxels: tuple[int, int] | None = None       # voxel problems: (voxels, batch elements of the coords), full
    cpu_voxels: tuple[int, int] | None = None   # and scaled
    attention: str = "softmax"                  # "linear": sf.compile(..., attention="linear")


def _maxvit(heads: int) -> sf.Pattern:
    return sf.PerHead([sf.Blocks(8)] * (heads // 2) + [sf.Grid(8)] * (heads - heads // 2))


FLEX, NATTEN, SDPA, HALO, MAXVIT = "flex_attention", "natten", "sdpa", "halo_unfold", "maxvit_reshape_sdpa"
GATHER, PADDED, SCATTER_LINEAR = "biformer_gather", "padded_window_sdpa", "scatter_linear_torch"
CASES: tuple[Case, ...] = (
    Case("P1", "P1", "1-D neighborhood, window 2048", sf.Neighborhood(2048), Shape(1, 16, (32768,), 128),
         (FLEX, NATTEN, SDPA), sf.Neighborhood(256), Shape(1, 2, (4096,), 64)),
    Case("P1b", "P1", "1-D neighborhood, window 512 dilation 8", sf.Neighborhood(512, dilation=8),
         Shape(1, 16, (32768,), 128), (FLEX, NATTEN, SDPA), sf.Neighborhood(64, dilation=8), Shape(1, 2, (4096,), 64)),
    Case("P2", "P2", "causal sliding window 4096", sf.Causal() & sf.SlidingWindow(4096), Shape(1, 32, (16384,), 128),
         (FLEX, SDPA), sf.Causal() & sf.SlidingWindow(1024), Shape(1, 2, (4096,), 64)),
    Case("P3", "P3", "2-D neighborhood 256x256, kernel 80x80", sf.Neighborhood(80), Shape(1, 24, (256, 256), 128),
         (FLEX, NATTEN), sf.Neighborhood(20), Shape(1, 2, (64, 64), 64)),
    Case("P3b", "P3", "2-D neighborhood 256x256, kernel 80x80 stride 16", sf.Neighborhood(80, stride=16),
         Shape(1, 24, (256, 256), 128), (FLEX, NATTEN), sf.Neighborhood(20, stride=4), Shape(1, 2, (64, 64), 64)),
    Case("P4", "P4", "2-D neighborhood 56x56, kernel 7", sf.Neighborhood(7), Shape(128, 2, (56, 56), 32),
         (FLEX, NATTEN), sf.Neighborhood(7), Shape(1, 2, (56, 56), 32)),
    Case("P4b", "P4", "2-D neighborhood 56x56, kernel 7 dilation 8", sf.Neighborhood(7, dilation=8),
         Shape(128, 2, (56, 56), 32), (FLEX, NATTEN), sf.Neighborhood(7, dilation=8), Shape(1, 2, (56, 56), 32)),
    Case("P5", "P5", "3-D neighborhood 30x48x80, kernel 18x24x24", sf.Neighborhood((18, 24, 24)),
         Shape(1, 24, (30, 48, 80), 128), (FLEX, NATTEN), sf.Neighborhood((9, 6, 6)), Shape(1, 2, (15, 12, 20), 64)),
    Case("P6", "P6", "S2 strided shards causal, 32k", sf.StridedShards(64, 16, 16), Shape(1, 32, (32768,), 128),
         (FLEX,), sf.StridedShards(8, 16, 16), Shape(1, 2, (4096,), 64)),
    Case("P6b", "P6", "S2 strided shards causal, 128k", sf.StridedShards(64, 16, 16), Shape(1, 32, (131072,), 128),
         (FLEX,), sf.StridedShards(2, 16, 16), Shape(1, 2, (4096,), 64)),
    Case("P7", "P7", "routed regions 8x8, top-8 (BiFormer)", sf.Routed((8, 8), 8), Shape(8, 8, (64, 64), 64),
         (GATHER, FLEX), sf.Routed((8, 8), 8), Shape(1, 2, (64, 64), 64)),
    Case("P8", "P8", "scattered voxel softmax, windows 12x12 (SST/DSVT)", sf.Scattered((12, 12)),
         Shape(1, 4, None, 32), (PADDED, FLEX), sf.Scattered((12, 12)), Shape(1, 2, None, 32),
         voxels=(131072, 4), cpu_voxels=(4096, 2)),
    Case("P9", "P9", "scattered linear, windows 12x12 (ScatterFormer)", sf.Scattered((12, 12)),
         Shape(1, 4, None, 32), (SCATTER_LINEAR,), sf.Scattered((12, 12)), Shape(1, 2, None, 32),
         voxels=(131072, 4), cpu_voxels=(4096, 2), attention="linear"),
    Case("P10", "P10", "HaloNet 64x64, block 8 halo 3", sf.Halo(8, 3), Shape(32, 4, (64, 64), 64),
         (FLEX, HALO), sf.Halo(8, 3), Shape(1, 2, (64, 64), 64)),
    Case("P11", "P11", "MaxViT block 8 + grid 8 (per head)", _maxvit(4), Shape(32, 4, (64, 64), 32),
         (MAXVIT, FLEX), _maxvit(2), Shape(1, 2, (64, 64), 32)),
)
PROBLEM_IDS = tuple(dict.fromkeys(c.problem for c in CASES))


def select(only: str | None) -> list[Case]:
    """The cases of the comma-separated problem ids in ``only`` (all when None); a
    ValueError names any unknown id."""
    if not only:
        return list(CASES)
    wanted = [s.strip().upper() for s in only.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in PROBLEM_IDS and w not in {c.id.upper() for c in CASES}]
    if unknown or not wanted:
        raise ValueError(f"unknown problem id(s) {', '.join(unknown) or repr(only)}; known: {', '.join(PROBLEM_IDS)} "
                         f"(or a case such as P1b)")
    return [c for c in CASES if c.problem in wanted or c.id.upper() in wanted]


def has_harness(case: Case) -> bool:
    """Content-dependent cases the suite feeds run-time content: Routed (routes from q and k)
    and Scattered (synthetic voxel coordinates, softmax or linear attention)."""
    return isinstance(case.pattern, sf.Routed) or (isinstance(case.pattern, sf.Scattered) and case.voxels is not None)


def not_runnable_reason(case: Case) -> str | None:
    """Why the case cannot run here, or None. Content-dependent patterns without a harness:
    sf.compile's UnsupportedPatternError, or that the suite has no harness for them."""
    if case.pattern.is_static or has_harness(case):
        return None
    try:
        sf.compile(case.pattern, case.full.problem(torch.float16))
    except sf.UnsupportedPatternError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001
        return f"sf.compile failed: {_why(exc)}"
    return (f"sf.compile accepts {case.pattern!r}, but this suite has no harness for its content-dependent "
            "inputs; nothing is estimated")


# ------------------------------------------------------------------------------------
# Exact counts: allowed pairs and the 1-D 128x128 baseline
# ------------------------------------------------------------------------------------
def _separable_leaf(pattern):
    from sparseforge.lower.families import SEPARABLE

    return isinstance(pattern, SEPARABLE)


def _spans(leaf, length: int, p: dict):
    """(lo, hi, step) numpy arrays of the keys of every query coordinate along one dimension
    (``lower.families.span_1d``: the keys are lo, lo + step, ..., hi)."""
    import numpy as np

    from sparseforge.lower.families import span_1d

    return span_1d(leaf, length, np.arange(length), p)


def exact_allowed_pairs(pattern: sf.Pattern, problem: sf.Problem) -> tuple[int, str] | None:
    """(allowed pairs summed over heads, method) by a cheap exact method, or None.

    - a separable family: the product over grid dimensions of its 1-D pair counts, each
      the sum of the key-run lengths of ``span_1d``;
    - an intersection of step-1 separable families and Causal on a 1-D grid: the summed
      lengths of the intersected runs;
    - causal StridedShards: from the block layout (full blocks below the diagonal, a
      triangle on it);
    - anything else with N^2 x H <= DENSE_COUNT_BUDGET: the dense mask, row-chunked.
    (tests/benchmarks checks each against ``TileSchedule.allowed_pairs``.)
    """
    import numpy as np

    heads, grid = problem.heads, problem.grid
    if _separable_leaf(pattern):
        total = 1
        for d, p in enumerate(pattern.params(problem)):
            lo, hi, step = _spans(pattern, grid[d], p)
            total *= int(np.maximum((hi - lo) // step + 1, 0).sum())
        return total * heads, "product of per-dimension key-run lengths"
    if isinstance(pattern, Intersection) and len(grid) == 1 and all(
            _separable_leaf(p) or isinstance(p, sf.Causal) for p in pattern.parts):
        lo, hi = np.zeros(grid[0], np.int64), np.arange(grid[0])   # keys 0..q: Causal, or any key below
        if not any(isinstance(part, sf.Causal) for part in pattern.parts):
            hi = np.full(grid[0], grid[0] - 1)
        steps = set()
        for part in pattern.parts:
            if not isinstance(part, sf.Causal):
                plo, phi, step = _spans(part, grid[0], part.params(problem)[0])
                steps.add(step)
                lo, hi = np.maximum(lo, plo), np.minimum(hi, phi)
        if steps <= {1}:
            return int(np.maximum(hi - lo + 1, 0).sum()) * heads, "intersected 1-D key runs"
    if isinstance(pattern, sf.StridedShards) and pattern.causal and len(grid) == 1:
        n, b = grid[0], pattern.block_size
        n_blocks = -(-n // b)
        ids = torch.arange(n_blocks)
        size = torch.full((n_blocks,), b, dtype=torch.int64)
        size[-1] = n - b * (n_blocks - 1)
        layout = pattern.block_mask(problem, ids, ids)                       # [H, nb, nb]
        below = (ids[:, None] > ids[None, :]).to(torch.int64) * size[:, None] * size[None, :]
        diag = torch.diag(size * (size + 1) // 2)
        return int((layout.to(torch.int64) * (below + diag)[None]).sum()), "block layout (causal S2)"
    if problem.tokens ** 2 * heads <= DENSE_COUNT_BUDGET:
        ctx = make_context(pattern, problem)
        keys = torch.arange(problem.tokens)
        total = 0
        for start in range(0, problem.tokens, 1024):
            rows = torch.arange(start, min(start + 1024, problem.tokens))
            m = as_4d(pattern.mask(ctx, rows, keys))
            total += int(m[0].expand(heads, len(rows), problem.tokens).sum())
        return total, "dense mask count"
    return None


def _run_tile(grid: tuple[int, ...], tile: int = ONE_D_TILE) -> tuple[int, ...] | None:
    """The N-D tile that is exactly a run of ``tile`` consecutive row-major tokens, if any."""
    out, left = [], tile
    for extent in reversed(grid):
        if left == 1:
            out.append(1)
        elif extent % left == 0:
            out.append(left)
            left = 1
        elif left % extent == 0:
            out.append(extent)
            left //= extent
        else:
            return None
    return tuple(reversed(out)) if left == 1 else None


def one_d_visited_tiles(pattern: sf.Pattern, problem: sf.Problem, schedule, allowed: int) -> tuple[int, str] | None:
    """Visited 128x128 tiles of the row-major sequence (pairs with at least one allowed
    (q, k)), summed over heads, and the method; None when no method is cheap enough.

    When 128-token runs are N-D tiles of the grid (1-D grids, or a last extent dividing or
    divisible by 128) it is the visited count of our schedule built with those tiles and no
    folding (exact: a tile is skipped only when it holds no allowed pair); otherwise the
    dense count of ``TileSchedule.one_d_efficiency`` when N^2 x groups is small."""
    tile = _run_tile(problem.grid)
    if tile is not None:
        try:
            s = build_schedule(pattern, problem, q_tile=tile, k_tile=tile, fold=(1,) * len(tile))
            return s.visited_tiles, f"schedule with {'x'.join(map(str, tile))} run tiles, no folding"
        except ValueError:
            pass  # e.g. a dilated dimension too long for a dense 1-D classification
    if problem.tokens ** 2 * schedule.groups <= ONE_D_DENSE_BUDGET:
        eff = schedule.one_d_efficiency(ONE_D_TILE)
        return round(allowed / (eff * ONE_D_TILE ** 2)), "dense mask (TileSchedule.one_d_efficiency)"
    return None


# ------------------------------------------------------------------------------------
# Measurements: one function each
# ------------------------------------------------------------------------------------
def measure_tile_efficiency(pattern: sf.Pattern, problem: sf.Problem, size: str) -> dict | None:
    """Ours (default tiles) vs 1-D 128x128 tiles on ``problem``; None if not cheap here."""
    t0 = time.perf_counter()
    s = build_schedule(pattern, problem)
    build_s = time.perf_counter() - t0
    counted = exact_allowed_pairs(pattern, problem)
    if counted is None:
        return None
    allowed, how = counted
    one_d = one_d_visited_tiles(pattern, problem, s, allowed)
    if one_d is None:
        return None
    visited_1d, how_1d = one_d
    g = s.geometry
    ours = allowed / (s.visited_tiles * g.block_m * g.block_n)
    base = allowed / (visited_1d * ONE_D_TILE ** 2)
    return dict(size=size, problem=repr(problem), q_tile=list(g.q_tile), k_tile=list(g.k_tile), fold=list(g.fold),
                allowed_pairs=allowed, density=allowed / (problem.heads * problem.tokens ** 2),
                ours=ours, one_d_128=base, gain_x=ours / base, visited_tiles=s.visited_tiles,
                visited_tiles_1d_128=visited_1d, loop_bounds=s.loop_bounds, schedule_build_s=build_s,
                method=dict(allowed_pairs=how, one_d=how_1d))


def vectorised_mask_mod(pattern: sf.Pattern, problem: sf.Problem):
    """A FlexAttention mask_mod that evaluates the pattern's own ``mask`` (vmap-friendly),
    and whether it depends on the head."""
    ctx = make_context(pattern, problem)
    probe = as_4d(pattern.mask(ctx, torch.arange(2), torch.arange(2)))
    per_head = probe.shape[1] > 1

    def mask_mod(b, h, q_idx, kv_idx):
        m = as_4d(pattern.mask(ctx, q_idx.reshape(1), kv_idx.reshape(1)))[0]   # [H|1, 1, 1]
        if per_head:
            return m.index_select(0, h.reshape(1)).reshape(())
        return m.reshape(())
    return mask_mod, per_head


def dense_mask_mod(mask: torch.Tensor):
    """A mask_mod reading a dense [H|1, N, N] boolean mask."""
    if mask.shape[0] > 1:
        return lambda b, h, q_idx, kv_idx: mask[h, q_idx, kv_idx]
    flat = mask[0]
    return lambda b, h, q_idx, kv_idx: flat[q_idx, kv_idx]


def _times_s(fn: Callable[[], object], repeat: int) -> list[float]:
    """Wall seconds of ``repeat`` calls after one warm-up call."""
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _median_s(fn: Callable[[], object], repeat: int) -> float:
    return statistics.median(_times_s(fn, repeat))


def _timed_ms(fn: Callable[[], object], repeat: int) -> dict:
    """median and min (the min is robust to other processes sharing the CPU) in ms."""
    times = _times_s(fn, repeat)
    return dict(median_ms=statistics.median(times) * 1e3, min_ms=min(times) * 1e3, runs=repeat)


def measure_schedule_build(pattern: sf.Pattern, problem: sf.Problem, repeat: int, device="cpu") -> dict:
    """build_schedule vs FlexAttention's create_block_mask (vectorised mask_mod), seconds."""
    from torch.nn.attention.flex_attention import create_block_mask

    out = dict(problem=repr(problem),
               sparseforge_build_schedule_s=_median_s(lambda: build_schedule(pattern, problem), repeat))
    try:
        mask_mod, per_head = vectorised_mask_mod(pattern, problem)
        h = problem.heads if per_head else None
        out["flex_create_block_mask_s"] = _median_s(
            lambda: create_block_mask(mask_mod, None, h, problem.tokens, problem.tokens, device=device), repeat)
        out["flex_mask_mod"] = "pattern.mask under vmap"
    except Exception as exc:  # noqa: BLE001 - report, do not hide
        out["flex_create_block_mask_s"] = None
        out["flex_error"] = _why(exc)
    return out


@contextlib.contextmanager
def fresh_cache_dir():
    """A temporary, empty SPARSEFORGE_CACHE_DIR for the duration of the block."""
    from sparseforge import envvars

    old = os.environ.get(envvars.CACHE_DIR.name)
    with tempfile.TemporaryDirectory(prefix="sf-bench-cache-") as tmp:
        os.environ[envvars.CACHE_DIR.name] = tmp
        try:
            yield tmp
        finally:
            if old is None:
                os.environ.pop(envvars.CACHE_DIR.name, None)
            else:
                os.environ[envvars.CACHE_DIR.name] = old


def measure_compile(pattern: sf.Pattern, problem: sf.Problem) -> tuple[dict, sf.CompiledAttention]:
    """Cold (empty cache dir, first call in this process) and warm (second call) sf.compile."""
    with fresh_cache_dir():
        t0 = time.perf_counter()
        sf.compile(pattern, problem)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        attn = sf.compile(pattern, problem)
        warm = time.perf_counter() - t0
    return dict(problem=repr(problem), cold_s=cold, warm_s=warm,
                note="cold: empty SPARSEFORGE_CACHE_DIR, first sf.compile of this pattern in the process"), attn


def random_qkv(shape: Shape, dtype, device, requires_grad: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape.grid)
    return tuple(torch.randn((shape.batch, shape.heads, n, shape.head_dim), generator=gen)
                 .to(device, dtype).requires_grad_(requires_grad) for _ in range(3))


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _step(forward: Callable[[], torch.Tensor], backward: bool, grads: tuple[torch.Tensor, ...]):
    def run():
        for t in grads:
            t.grad = None
        out = forward()
        if backward:
            out.float().sum().backward()
        return out
    return run


def make_flex(device: str) -> tuple[Callable, str]:
    """flex_attention under torch.compile (checked by one tiny call), else eager."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if not FLEX_COMPILE:
        def eager_only(*a, **k):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return flex_attention(*a, **k)
        return eager_only, "eager flex_attention (torch.compile switched off: suite.FLEX_COMPILE)"
    compiled = torch.compile(flex_attention, dynamic=False)
    try:
        x = torch.randn(1, 1, 128, 16, device=device)
        bm = create_block_mask(lambda b, h, q, k: q >= k, None, None, 128, 128, device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled(x, x, x, block_mask=bm)
        return compiled, "torch.compile(flex_attention)"
    except Exception as exc:  # noqa: BLE001
        log(f"torch.compile(flex_attention) failed on {device} ({_why(exc)}); using eager")

        def eager(*a, **k):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return flex_attention(*a, **k)
        return eager, f"eager flex_attention (torch.compile failed: {_why(exc)})"


def sdpa_mask_bytes(shape: Shape) -> int:
    """Memory masked SDPA needs on CPU: the bool mask [H, N, N] plus float32 scores and
    probabilities [B, H, N, N] (forward) and their gradients (backward)."""
    n = math.prod(shape.grid)
    return shape.heads * n * n + 4 * 4 * shape.batch * shape.heads * n * n


# -- peers written in plain torch (device-agnostic) ------------------------------------
def halo_attention_unfold(q, k, v, grid: tuple[int, int], block: int, halo: int):
    """HaloNet attention with unfold: each block x block query tile attends to its
    (block + 2 halo)^2 neighbourhood of keys; keys in the zero padding are masked, which is
    the truncation at the border of ``Halo(block, halo)``. q, k, v [B, H, N, D]."""
    b, h, n, d = q.shape
    gh, gw = grid
    win = block + 2 * halo

    def windows(x):  # [B, H, N, D] -> [B*H, blocks, win*win, D]
        x = x.reshape(b * h, gh, gw, d).permute(0, 3, 1, 2)
        x = torch.nn.functional.pad(x, (halo, halo, halo, halo))
        x = torch.nn.functional.unfold(x, kernel_size=win, stride=block)    # [BH, D*win*win, blocks]
        return x.reshape(b * h, d, win * win, -1).permute(0, 3, 2, 1)
    ones = torch.nn.functional.pad(torch.ones(1, 1, gh, gw, device=q.device), (halo,) * 4)
    valid = torch.nn.functional.unfold(ones, kernel_size=win, stride=block)[0].T > 0   # [blocks, win*win]
    qb = q.reshape(b * h, gh // block, block, gw // block, block, d).permute(0, 1, 3, 2, 4, 5)
    qb = qb.reshape(b * h, -1, block * block, d)
    out = torch.nn.functional.scaled_dot_product_attention(qb, windows(k), windows(v), attn_mask=valid[:, None, :])
    out = out.reshape(b * h, gh // block, gw // block, block, block, d).permute(0, 1, 3, 2, 4, 5)
    return out.reshape(b, h, n, d)


def maxvit_reshape_sdpa(q, k, v, grid: tuple[int, int], size: int):
    """MaxViT attention by reshaping: the first H/2 heads attend within size x size blocks,
    the others within the size x size grid (tokens strided by S/size), each as plain SDPA."""
    b, h, n, d = q.shape
    gh, gw = grid
    hb = h // 2

    def block_view(x):   # [B, h', N, D] -> [B, h', blocks, size*size, D]
        x = x.reshape(b, x.shape[1], gh // size, size, gw // size, size, d).transpose(3, 4)
        return x.reshape(b, x.shape[1], -1, size * size, d)

    def grid_view(x):    # tokens i*(S/size) + r share the residue r: [B, h', residues, size*size, D]
        x = x.reshape(b, x.shape[1], size, gh // size, size, gw // size, d).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(b, x.shape[1], -1, size * size, d)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ob = sdpa(*(block_view(x[:, :hb]) for x in (q, k, v)))
    og = sdpa(*(grid_view(x[:, hb:]) for x in (q, k, v)))
    ob = ob.reshape(b, hb, gh // size, gw // size, size, size, d).transpose(3, 4).reshape(b, hb, n, d)
    og = og.reshape(b, h - hb, gh // size, gw // size, size, size, d).permute(0, 1, 4, 2, 5, 3, 6)
    return torch.cat([ob, og.reshape(b, h - hb, n, d)], dim=1)


def _scalar(value, name: str) -> int:
    if isinstance(value, tuple):
        if len(set(value)) != 1:
            raise ValueError(f"the torch peer needs one {name} for every dimension, got {value}")
        value = value[0]
    return value


def torch_peer(case: Case, shape: Shape, pattern: sf.Pattern):
    """The plain-torch peer of the case (name, forward(q, k, v)) for ``pattern``, or None."""
    if HALO in case.peers:
        block, halo = _scalar(pattern.block_size, "block_size"), _scalar(pattern.halo, "halo")
        return HALO, lambda q, k, v: halo_attention_unfold(q, k, v, shape.grid, block, halo)
    if MAXVIT in case.peers:
        size = _scalar(pattern.patterns[0].size, "size")
        return MAXVIT, lambda q, k, v: maxvit_reshape_sdpa(q, k, v, shape.grid, size)
    return None


def measure_cpu_ops(case: Case, attn: sf.CompiledAttention, repeat: int, flex) -> dict:
    """Median seconds of forward and forward + backward on CPU for every method."""
    from torch.nn.attention.flex_attention import create_block_mask

    shape, problem, pattern = case.cpu, attn.problem, attn.pattern
    flex_fn, flex_variant = flex
    results = {}
    mask = None
    for backward in (False, True):
        q, k, v = random_qkv(shape, torch.float32, "cpu", backward)
        methods: dict[str, Callable | str] = {"sparseforge": lambda: attn(q, k, v)}
        try:
            if mask is None:
                mask = sf.dense_mask(pattern, problem)
            heads = problem.heads if mask.shape[0] > 1 else None
            bm = create_block_mask(dense_mask_mod(mask), None, heads, problem.tokens, problem.tokens, device="cpu")
            methods[FLEX] = (lambda: flex_fn(q, k, v, block_mask=bm)) if not backward else \
                "not supported: FlexAttention has no backward on CPU (torch raises NotImplementedError)"
        except Exception as exc:  # noqa: BLE001
            methods[FLEX] = f"failed: {_why(exc)}"
        need = sdpa_mask_bytes(shape)
        if need <= SDPA_MEMORY_LIMIT:
            methods["sdpa_masked"] = lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask[None] if mask is not None else sf.dense_mask(pattern, problem)[None])
        else:
            methods["sdpa_masked"] = f"skipped: mask would need {need / 2 ** 30:.1f} GB"
        peer = torch_peer(case, shape, pattern)
        if peer is not None:
            methods[peer[0]] = (lambda f=peer[1]: f(q, k, v))
        for name, fn in methods.items():
            entry = results.setdefault(name, {})
            key = "forward_backward" if backward else "forward"
            if isinstance(fn, str):
                entry[key] = dict(skipped=fn)
                continue
            log(f"  {case.id}: timing {name} {key.replace('_', ' + ')}")
            try:
                entry[key] = _timed_ms(_step(fn, backward, (q, k, v)), repeat)
            except Exception as exc:  # noqa: BLE001 - a failing method is reported, the rest go on
                entry[key] = dict(skipped=f"failed: {_why(exc)}")
    results[FLEX]["variant"] = flex_variant
    results["sparseforge"]["variant"] = "sf.compile CPU executor"
    return results


def speedups(op_times: dict, ours: str = "sparseforge") -> dict:
    """Per direction: best peer's median / ours (> 1: we are faster) and which peer (names
    starting with ``ours``, such as ``sparseforge_plan``, are ours, not peers)."""
    out = {}
    for key in ("forward", "forward_backward"):
        mine = op_times.get(ours, {}).get(key, {}).get("median_ms")
        peers = {n: t[key]["median_ms"] for n, t in op_times.items()
                 if not n.startswith(ours) and "median_ms" in t.get(key, {})}
        if mine and peers:
            best = min(peers, key=peers.get)
            out[key] = dict(best_peer=best, speedup_x=peers[best] / mine)
    return out


# ------------------------------------------------------------------------------------
# Content-dependent cases: P7 routed (routes from q and k), P8 / P9 scattered voxels
# ------------------------------------------------------------------------------------
peers = load_benchmark("peers")  # the torch peers shared with benchmarks/memory.py
run_info = load_benchmark("run_info")


def _window(pattern: sf.Scattered) -> int:
    return _scalar(pattern.window_size, "window_size")


def voxel_coords(case: Case, size: str) -> torch.Tensor:
    """The case's synthetic voxel set (``peers.make_voxels``, seed 0) at ``size`` "full" or "scaled"."""
    n, batch = case.voxels if size == "full" else case.cpu_voxels
    return peers.make_voxels(n, batch=batch, window=_window(case.pattern))


def voxel_stats(coords: torch.Tensor, pattern: sf.Scattered) -> dict:
    sizes = peers.window_groups(coords, _window(pattern))["sizes"]
    return dict(voxels=int(coords.shape[0]), batch_elements=int(coords[:, 0].max()) + 1, windows=int(sizes.numel()),
                window_voxels=dict(mean=float(sizes.float().mean()), min=int(sizes.min()), max=int(sizes.max()),
                                   median=float(sizes.float().median())),
                generator="benchmarks/peers.py make_voxels(seed=0): 2-D, spatially clustered occupancy")


def voxel_allowed_pairs(coords: torch.Tensor, pattern: sf.Scattered, heads: int) -> int:
    """Allowed (query, key) pairs, summed over heads: sum over windows of size^2, x heads."""
    sizes = peers.window_groups(coords, _window(pattern))["sizes"]
    return int((sizes.long() ** 2).sum()) * heads


def routed_allowed_pairs(pattern: sf.Routed, problem: sf.Problem, routes: torch.Tensor) -> int:
    """Allowed pairs over batch and heads for ``routes`` [B, H|1, R, topk] (distinct per row):
    every query region's tokens x the tokens of its routed key regions (N * topk *
    region_tokens per head when the regions divide the grid)."""
    ids, n_regions = pattern.regions(problem.grid)
    sizes = torch.bincount(ids, minlength=n_regions).long()
    per = (sizes[routes.cpu()].sum(-1) * sizes).sum(-1)     # [B, H|1]
    return int(per.sum()) * (problem.heads if routes.shape[1] == 1 else 1)


def routed_tile_efficiency(case: Case, shape: Shape, size: str, seed: int = 0) -> dict:
    """Tile efficiency of our routed kernels (bf16 default tiles) and of 1-D 128x128 tiles of
    the row-major sequence (FlexAttention's block mask), exact, for the routes of random q, k."""
    from sparseforge.lower.routed import build_routed_schedule, routed_tables, routes_for

    problem = shape.problem(torch.bfloat16)
    pattern = case.pattern
    q, k, _ = random_qkv(shape, torch.float32, "cpu", False, seed)
    routes = routes_for(pattern, problem, q, k)
    t0 = time.perf_counter()
    schedule = build_routed_schedule(pattern, problem)
    tables = routed_tables(schedule, routes)
    build_s = time.perf_counter() - t0
    heads_per_route = 1 if routes.shape[1] > 1 else problem.heads
    visited = int(tables.valid.sum()) * heads_per_route
    allowed = routed_allowed_pairs(pattern, problem, routes)
    ids, n_regions = pattern.regions(problem.grid)
    n = problem.tokens
    blocks = -(-n // ONE_D_TILE)
    member = torch.zeros(blocks, n_regions)
    member[torch.arange(n) // ONE_D_TILE, ids] = 1.0
    layout = torch.zeros(*routes.shape[:2], n_regions, n_regions)
    layout.scatter_(-1, routes, 1.0)
    visited_1d = int(((member @ layout @ member.T) > 0).sum()) * heads_per_route
    g = schedule.geometry
    ours = allowed / (visited * g.block_m * g.block_n)
    base = allowed / (visited_1d * ONE_D_TILE ** 2)
    return dict(size=size, problem=repr(problem), q_tile=list(g.q_tile), k_tile=list(g.k_tile), allowed_pairs=allowed,
                density=allowed / (shape.batch * problem.heads * n * n), ours=ours, one_d_128=base, gain_x=ours / base,
                visited_tiles=visited, visited_tiles_1d_128=visited_1d, schedule_build_s=build_s,
                method=dict(allowed_pairs="region sizes x routed region sizes, routes of random q, k (seed 0)",
                            one_d="region membership of 128-token blocks x routed region layout"))


def voxel_tile_efficiency(case: Case, shape: Shape, coords: torch.Tensor, size: str) -> dict:
    """Tile efficiency of our scattered kernels (bf16 default tiles on the packed sequence),
    of 1-D 128x128 tiles of the window-sorted sequence (FlexAttention's document mask) and
    of the padded-window peer (every window padded to the largest)."""
    problem = shape.problem(torch.bfloat16)
    heads = problem.heads
    attn = sf.compile(case.pattern, problem)
    t0 = time.perf_counter()
    plan = attn.plan(coords)
    build_s = time.perf_counter() - t0
    visited = int(plan.tables["KV_PTR"][0, -1]) * heads
    sizes = peers.window_groups(coords, _window(case.pattern))["sizes"].long()
    allowed = int((sizes ** 2).sum()) * heads
    ends = torch.cumsum(sizes, 0)
    first, last = (ends - sizes) // ONE_D_TILE, (ends - 1) // ONE_D_TILE
    blocks = -(-int(coords.shape[0]) // ONE_D_TILE)
    hit = torch.zeros(blocks, blocks, dtype=torch.bool)
    for a, b in zip(first.tolist(), last.tolist()):
        hit[a:b + 1, a:b + 1] = True
    visited_1d = int(hit.sum()) * heads
    layout = plan.layout
    ours = allowed / (visited * layout.block_m * layout.block_n)
    base = allowed / (visited_1d * ONE_D_TILE ** 2)
    return dict(size=size, problem=repr(problem), q_tile=[layout.block_m], k_tile=[layout.block_n],
                allowed_pairs=allowed, ours=ours, one_d_128=base, gain_x=ours / base, visited_tiles=visited,
                visited_tiles_1d_128=visited_1d,
                padded_window_sdpa=allowed / (heads * sizes.numel() * int(sizes.max()) ** 2),
                schedule_build_s=build_s,
                method=dict(allowed_pairs="sum over windows of size^2, x heads",
                            ours="index-table entries of the plan (KV_PTR) x heads",
                            one_d="128-token blocks spanned by each window of the sorted sequence"))


@dataclasses.dataclass
class ContentRun:
    """One content-dependent case on one device and dtype: its inputs, methods and set-ups."""

    qkv: Callable[[bool], tuple]                  # requires_grad -> (q, k, v)
    methods: Callable[..., dict]                  # (q, k, v) -> name -> forward() or a reason it does not run
    setups: dict                                  # name -> zero-arg set-up step (timed alone)
    info: dict                                    # allowed pairs / flop model, voxel statistics, ...
    attn: object


def content_run(case: Case, shape: Shape, dtype, device: str, flex, size: str) -> ContentRun:
    """Inputs, methods (ours and the peers) and set-up steps of a content-dependent case."""
    import functools

    from torch.nn.attention.flex_attention import create_block_mask

    block_mask = functools.partial(create_block_mask, _compile=device == "cuda")  # no dense N x N mask on CUDA
    flex_fn = flex[0]
    pattern = case.pattern
    problem = shape.problem(dtype)
    gen_seed = 0
    if isinstance(pattern, sf.Routed):
        from sparseforge.lower.routed import routed_tables, routes_for
        from sparseforge.dsl.args import expand

        attn = sf.compile(pattern, problem)
        grid, topk = shape.grid, pattern.topk
        region = tuple(expand("region_size", pattern.region_size, len(grid)))
        n = problem.tokens

        def qkv(requires_grad):
            return random_qkv(shape, dtype, device, requires_grad, gen_seed)

        def flex_forward(q, k, v):
            routes = peers.biformer_routing(q, k, grid, region, topk)
            bm = block_mask(peers.biformer_block_mask_mod(routes, grid, region), q.shape[0], None, n, n, device=device)
            return flex_fn(q, k, v, block_mask=bm)

        def methods(q, k, v):
            return {"sparseforge": lambda: attn(q, k, v),
                    GATHER: lambda: peers.biformer_gather_attention(q, k, v, grid, region, topk),
                    FLEX: lambda: flex_forward(q, k, v)}
        q0, k0, _ = qkv(False)
        routes = routes_for(pattern, problem, q0, k0)
        setups = {"sparseforge_routes_and_tables": lambda: routed_tables(attn.schedule,
                                                                         routes_for(pattern, problem, q0, k0)),
                  "flex_routes_and_create_block_mask": lambda: block_mask(
                      peers.biformer_block_mask_mod(peers.biformer_routing(q0, k0, grid, region, topk), grid, region),
                      shape.batch, None, n, n, device=device)}
        allowed = routed_allowed_pairs(pattern, problem, routes)
        info = dict(allowed_pairs=allowed, density=allowed / (shape.batch * problem.heads * n * n),
                    flop_forward=4 * allowed * shape.head_dim,
                    routing="ours: float64 region means (sparseforge routes_for); the peers: BiFormer's routing in "
                            "the inputs' dtype (benchmarks/peers.py biformer_routing)")
        return ContentRun(qkv, methods, setups, info, attn)

    coords = voxel_coords(case, size).to(device)
    window = _window(pattern)
    n_vox = int(coords.shape[0])
    linear = case.attention == "linear"
    attn = sf.compile(pattern, problem, attention="linear") if linear else sf.compile(pattern, problem)
    plan = attn.plan(coords)

    def qkv(requires_grad):
        gen = torch.Generator().manual_seed(gen_seed)
        return tuple(torch.randn(n_vox, shape.heads, shape.head_dim, generator=gen).to(device, dtype)
                     .requires_grad_(requires_grad) for _ in range(3))

    def methods(q, k, v):
        ours = {"sparseforge": lambda: attn(q, k, v, coords=coords),
                "sparseforge_plan": lambda: attn(q, k, v, plan=plan)}
        if linear:
            return ours | {SCATTER_LINEAR: lambda: peers.scatter_linear_attention(
                q, k, v, peers.window_groups(coords, window))}
        return ours | {PADDED: lambda: peers.padded_window_sdpa(q, k, v, peers.window_groups(coords, window)),
                       FLEX: lambda: peers.flex_document_attention(q, k, v, peers.window_groups(coords, window),
                                                                   flex_fn, block_mask, device)}

    def flex_setup():
        order, n_pad, doc = peers.flex_document_inputs(peers.window_groups(coords, window))
        return block_mask(lambda b, h, qi, ki: doc[qi] == doc[ki], None, None, n_pad, n_pad, device=device)
    setups = {"sparseforge_plan": lambda: attn.plan(coords), "peers_window_grouping": lambda: peers.window_groups(
        coords, window)}
    if not linear:
        setups["flex_grouping_and_create_block_mask"] = flex_setup
    info = voxel_stats(coords.cpu(), pattern)
    if linear:
        d = shape.head_dim
        info["flop_forward_model"] = 4 * n_vox * shape.heads * d * d
        info["flop_model"] = ("4 N H D^2: per head phi(k)^T v summed per window (2 N D^2) and phi(q) KV (2 N D^2); "
                              "no (query, key) pairs in linear attention")
    else:
        allowed = voxel_allowed_pairs(coords.cpu(), pattern, shape.heads)
        info.update(allowed_pairs=allowed, flop_forward=4 * allowed * shape.head_dim)
    return ContentRun(qkv, methods, setups, info, attn)


def numerics_vs_ours(run: ContentRun) -> dict:
    """Max |method - sparseforge| of every method's forward on the run's inputs (fp32)."""
    q, k, v = run.qkv(False)
    out = {}
    with torch.no_grad():
        methods = run.methods(q, k, v)
        ref = methods["sparseforge"]().float()
        for name, fn in methods.items():
            if name != "sparseforge" and not isinstance(fn, str):
                try:
                    out[name] = (fn().float() - ref).abs().max().item()
                except Exception as exc:  # noqa: BLE001
                    out[name] = f"failed: {_why(exc)}"
    return out


def measure_content_compile(case: Case, problem: sf.Problem) -> dict:
    """Cold / warm sf.compile of a content-dependent case (attention="linear" for P9)."""
    kw = dict(attention="linear") if case.attention == "linear" else {}
    with fresh_cache_dir():
        t0 = time.perf_counter()
        sf.compile(case.pattern, problem, **kw)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        sf.compile(case.pattern, problem, **kw)
        warm = time.perf_counter() - t0
    return dict(problem=repr(problem), cold_s=cold, warm_s=warm,
                note="cold: empty SPARSEFORGE_CACHE_DIR, first sf.compile of this pattern in the process")


def run_cpu_content_case(case: Case, repeat: int, flex) -> dict:
    """A content-dependent case in CPU mode: exact tile efficiency at full size (routes of
    random q, k / the synthetic voxels), set-up times, compile, op times at the scaled size."""
    out = dict(scaled=case.cpu.as_dict(), scaled_pattern=repr(case.cpu_pattern))
    if case.voxels is not None:
        out["scaled"]["voxels"], out["scaled"]["voxel_batch_elements"] = case.cpu_voxels
    log(f"{case.id}: tile efficiency")
    if isinstance(case.pattern, sf.Routed):
        out["tile_efficiency"] = routed_tile_efficiency(case, case.full, "full")
    elif case.attention == "linear":
        out["tile_efficiency_note"] = ("not applicable: linear attention visits no (query, key) tiles; its cost is "
                                       "O(N H D^2) segment sums")
    else:
        full_coords = voxel_coords(case, "full")
        out["voxels_full"] = voxel_stats(full_coords, case.pattern)
        out["tile_efficiency"] = voxel_tile_efficiency(case, case.full, full_coords, "full")
    log(f"{case.id}: sf.compile cold / warm")
    out["compile"] = measure_content_compile(case, case.cpu.problem(torch.float32))
    run = content_run(case, case.cpu, torch.float32, "cpu", flex, "scaled")
    out["inputs"] = run.info
    out["max_abs_diff_vs_sparseforge"] = numerics_vs_ours(run)
    log(f"{case.id}: set-up steps")
    out["setup"] = _measure_setups(run, lambda fn: _median_s(fn, repeat))
    no_flex_backward = ("not supported: FlexAttention has no backward on CPU (torch raises "
                        "NotImplementedError)")
    results = _measure_methods(run, lambda step, backward: _timed_ms(step, repeat), case.id,
                               skip=lambda name, backward: no_flex_backward if backward and name == FLEX else None)
    if FLEX in results:
        results[FLEX]["variant"] = flex[1] + "; block mask built in every call (set-up counted)"
    results["sparseforge"]["variant"] = ("sf.compile(attention='linear'): torch segment ops" if case.attention == "linear"
                                         else "sf.compile CPU executor") + "; routing / grouping in every call"
    if "sparseforge_plan" in results:
        results["sparseforge_plan"]["variant"] = "as sparseforge, with a reused plan (attn.plan(coords))"
    out["op_time_cpu"] = results
    out["speedup_vs_best_peer"] = speedups(results)
    return out


def _measure_setups(run, seconds) -> dict:
    """{step + "_s": seconds(fn)} of a content case's set-up steps (or step + "_error": why)."""
    out = {}
    for name, fn in run.setups.items():
        try:
            out[name + "_s"] = seconds(fn)
        except Exception as exc:  # noqa: BLE001 - a failing step is reported, the rest go on
            out[name + "_error"] = _why(exc)
    return out


def _measure_methods(run, measure, case_id: str, skip=lambda name, backward: None) -> dict:
    """{method: {"forward" | "forward_backward": measure(step, backward)}} over a content
    case's methods (ours and the peers); ``skip(name, backward)`` gives a reason to skip, and a
    method that fails is reported as skipped with the reason while the rest go on."""
    results = {}
    for backward in (False, True):
        key = "forward_backward" if backward else "forward"
        q, k, v = run.qkv(backward)
        for name, fn in run.methods(q, k, v).items():
            entry = results.setdefault(name, {})
            why = skip(name, backward)
            if why is not None:
                entry[key] = dict(skipped=why)
                continue
            log(f"  {case_id}: timing {name} {key.replace('_', ' + ')}")
            try:
                entry[key] = measure(_step(fn, backward, (q, k, v)), backward)
            except Exception as exc:  # noqa: BLE001
                entry[key] = dict(skipped=f"failed: {_why(exc)}")
    return results


def run_gpu_content_case(case: Case, flex) -> dict:  # pragma: no cover - needs a CUDA device
    """A content-dependent case at full size, bf16, on CUDA: set-up times, do_bench times,
    peak memory and TFLOP/s from the exact allowed pairs (P9: the flop model)."""
    import triton.testing

    shape = case.full
    run = content_run(case, shape, torch.bfloat16, "cuda", flex, "full")
    flop_fwd = run.info.get("flop_forward", run.info.get("flop_forward_model"))

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def peak(fn) -> int:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    def measure(step, backward) -> dict:
        ms = bench(step)
        flop = flop_fwd * (3.5 if backward else 1.0)
        return dict(median_ms=ms, peak_memory_extra_bytes=peak(step), tflops=flop / (ms * 1e-3) / 1e12)

    setups = _measure_setups(run, lambda fn: bench(fn) * 1e-3)
    results = _measure_methods(run, measure, case.id)
    if FLEX in results:
        results[FLEX]["variant"] = flex[1] + "; block mask built in every call (set-up counted)"
    return dict(op_time_cuda=results, setup=setups, inputs=run.info, numerics=numerics_vs_ours(run),
                allowed_pairs=run.info.get("allowed_pairs"), density=run.info.get("density"),
                tflops_basis="exact allowed pairs: 4 * pairs * D forward, x3.5 forward + backward"
                if "flop_forward" in run.info else run.info.get("flop_model"),
                speedup_vs_best_peer=speedups(results))


# ------------------------------------------------------------------------------------
# Modes
# ------------------------------------------------------------------------------------
def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_cpu_case(case: Case, repeat: int, flex) -> dict:
    if not case.pattern.is_static:
        return run_cpu_content_case(case, repeat, flex)
    scaled = case.cpu.problem(torch.float32)
    out = dict(scaled=case.cpu.as_dict(), scaled_pattern=repr(case.cpu_pattern))
    log(f"{case.id}: tile efficiency")
    # the tiles of the GPU kernels: default config for bf16 at the case's head dim
    eff = measure_tile_efficiency(case.pattern, case.full.problem(torch.bfloat16), "full")
    if eff is None:
        eff = measure_tile_efficiency(case.cpu_pattern, case.cpu.problem(torch.bfloat16), "scaled")
        eff["note"] = "no cheap exact method at full size; computed at the scaled size"
    out["tile_efficiency"] = eff
    log(f"{case.id}: schedule build vs create_block_mask")
    out["schedule_build"] = measure_schedule_build(case.cpu_pattern, scaled, repeat)
    log(f"{case.id}: sf.compile cold / warm")
    out["compile"], attn = measure_compile(case.cpu_pattern, scaled)
    out["op_time_cpu"] = measure_cpu_ops(case, attn, repeat, flex)
    out["speedup_vs_best_peer"] = speedups(out["op_time_cpu"])
    return out


def run_gpu_case(case: Case, flex) -> dict:  # pragma: no cover - needs a CUDA device
    """Full size, bf16, on CUDA: times with do_bench, set-up, peak memory, TFLOP/s."""
    if not case.pattern.is_static:
        return run_gpu_content_case(case, flex)
    import triton.testing
    from torch.nn.attention.flex_attention import create_block_mask

    shape = case.full
    problem = shape.problem(torch.bfloat16)
    counted = exact_allowed_pairs(case.pattern, problem)
    pairs = None if counted is None else counted[0] * shape.batch
    n = problem.tokens
    density = None if pairs is None else pairs / (shape.batch * shape.heads * n * n)
    flex_fn, flex_variant = flex

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def peak(fn) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    setups: dict[str, Callable[[], Callable]] = {}
    setups["sparseforge"] = lambda: (lambda attn: lambda q, k, v: attn(q, k, v))(sf.compile(case.pattern, problem))
    if FLEX in case.peers:
        def flex_setup():
            try:
                mask_mod, per_head = vectorised_mask_mod(case.pattern, problem)
                bm = create_block_mask(mask_mod, None, shape.heads if per_head else None, n, n, device="cuda",
                                       _compile=True)
            except Exception as exc:  # noqa: BLE001 - fall back to a dense mask where it fits
                if shape.heads * n * n > 8 << 30:
                    raise
                log(f"  {case.id}: vectorised mask_mod failed ({_why(exc)}); using a dense mask")
                mask = sf.dense_mask(case.pattern, problem).cuda()
                bm = create_block_mask(dense_mask_mod(mask), None, mask.shape[0] if mask.shape[0] > 1 else None,
                                       n, n, device="cuda")
            return lambda q, k, v: flex_fn(q, k, v, block_mask=bm)
        setups[FLEX] = flex_setup
    if NATTEN in case.peers:
        setups[NATTEN] = lambda: natten_forward(case.pattern, shape)
    peer = torch_peer(case, shape, case.pattern)
    if peer is not None:
        setups[peer[0]] = lambda f=peer[1]: f
    setups["sdpa_dense"] = lambda: torch.nn.functional.scaled_dot_product_attention

    results = {}
    for name, setup in setups.items():
        entry = results.setdefault(name, {})
        try:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn = setup()
            torch.cuda.synchronize()
            entry["setup_ms"] = (time.perf_counter() - t0) * 1e3
        except ImportError as exc:
            entry["not_run"] = f"not installed: {_why(exc)}"
            continue
        except Exception as exc:  # noqa: BLE001
            entry["not_run"] = f"failed: {_why(exc)}"
            continue
        for backward in (False, True):
            key = "forward_backward" if backward else "forward"
            q, k, v = random_qkv(shape, torch.bfloat16, "cuda", backward)
            step = _step(lambda: fn(q, k, v), backward, (q, k, v))
            try:
                ms = bench(step)
                work = shape.batch * shape.heads * n * n if name == "sdpa_dense" else pairs   # dense: every pair
                flop = None if work is None else 4 * work * shape.head_dim * (3.5 if backward else 1.0)
                entry[key] = dict(median_ms=ms, peak_memory_bytes=peak(step),
                                  tflops=None if flop is None else flop / (ms * 1e-3) / 1e12)
            except Exception as exc:  # noqa: BLE001
                entry[key] = dict(skipped=f"failed: {_why(exc)}")
    results.get(FLEX, {})["variant"] = flex_variant
    out = dict(op_time_cuda=results, allowed_pairs=pairs, density=density,
               speedup_vs_best_peer=speedups({k: v for k, v in results.items()
                                              if k != "sdpa_dense" or SDPA in case.peers}))
    for key in ("forward", "forward_backward"):
        mine = results["sparseforge"].get(key, {}).get("median_ms")
        dense = results["sdpa_dense"].get(key, {}).get("median_ms")
        if mine and dense and density:
            out.setdefault("ratio_to_dense_x_density", {})[key] = mine / (dense * density)
    return out


def natten_forward(pattern: sf.Pattern, shape: Shape):  # pragma: no cover - needs NATTEN and CUDA
    """NATTEN's fused neighborhood attention for a plain Neighborhood pattern."""
    import natten  # ImportError: reported as not installed

    try:
        from natten import na1d, na2d, na3d                 # NATTEN >= 0.20
    except ImportError:
        from natten.functional import na1d, na2d, na3d      # older releases
    log(f"  NATTEN {getattr(natten, '__version__', '?')}")

    if not isinstance(pattern, sf.Neighborhood):
        raise ValueError(f"NATTEN runs Neighborhood patterns only, not {pattern!r}")
    fn = {1: na1d, 2: na2d, 3: na3d}[len(shape.grid)]
    p = pattern.params(shape.problem(torch.bfloat16))
    kernel = tuple(d["kernel"] for d in p)
    dilation = tuple(d["dilation"] for d in p)
    stride = tuple(d["stride"] for d in p)

    def run(q, k, v):  # NATTEN takes [B, *grid, H, D]
        def to(x):
            return x.transpose(1, 2).reshape(shape.batch, *shape.grid, shape.heads, shape.head_dim)
        kw = dict(kernel_size=kernel, dilation=dilation)
        if any(s > 1 for s in stride):
            kw["stride"] = stride
        out = fn(to(q), to(k), to(v), **kw)
        return out.reshape(shape.batch, -1, shape.heads, shape.head_dim).transpose(1, 2)
    return run


def metadata(mode: str, repeat: int | None, command: str | None) -> dict:
    return dict(schema=SCHEMA, mode=mode, device=run_info.device_name(mode != "cpu"),
                cpu_threads=torch.get_num_threads(), versions=run_info.versions(), date=run_info.utc_now(),
                command=command or " ".join(sys.argv), repeat=repeat,
                scaling_rule=None if mode != "cpu" else
                "B -> 1, H -> 2, D -> min(D, 64); grid extents / s_d to about 4096 tokens, pattern lengths "
                "(kernel, window, stride, block) / the same s_d, counts (dilation, S2 local blocks and stride) kept",
                time_unit="ms for op times, s for build and compile times")


def run_suite(only: str | None = None, *, cpu: bool = True, repeat: int = 3, command: str | None = None) -> dict:
    """Run the selected cases; the result dict (``meta`` and one entry per case)."""
    cases = select(only)
    if not cpu and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: use --cpu")
    mode = "cpu" if cpu else "cuda"
    flex = None
    rows = []
    t_start, load_start = time.perf_counter(), _load_average()
    for case in cases:
        row = dict(id=case.id, problem=case.problem, title=case.title, pattern=repr(case.pattern),
                   full=case.full.as_dict(), peers=list(case.peers))
        reason = not_runnable_reason(case)
        if reason is not None:
            row.update(status="not runnable", reason=f"not runnable: {reason}")
            log(f"{case.id}: not runnable")
            rows.append(row)
            continue
        if flex is None:
            flex = make_flex("cpu" if cpu else "cuda")
        elif FLEX_COMPILE:
            # A fresh compile cache per case: otherwise the cases' shapes and block masks pile up
            # recompiles until torch.compile hits its recompile limit and silently runs eager.
            torch._dynamo.reset()
        t0 = time.perf_counter()
        try:
            row.update(run_cpu_case(case, repeat, flex) if cpu else run_gpu_case(case, flex))
            row["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - one failing case must not lose the others
            row.update(status="failed", reason=f"failed: {_why(exc)}")
        row["wall_s"] = time.perf_counter() - t0
        log(f"{case.id}: {row['status']} in {row['wall_s']:.1f} s")
        rows.append(row)
    meta = metadata(mode, repeat, command) | dict(wall_s=time.perf_counter() - t_start)
    meta["load_average_1m"] = dict(start=load_start, end=_load_average())   # > cores: timings shared the CPU
    return dict(meta=meta, cases=rows)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


# ------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------
def _ms(entry: dict | None, key: str) -> str:
    e = (entry or {}).get(key, {})
    return f"{e['median_ms']:.1f} ms" if "median_ms" in e else "-"


def table_rows(result: dict) -> list[tuple[str, str]]:
    """(case, one-line summary) for a text table."""
    rows = []
    for c in result["cases"]:
        if c["status"] != "ok":
            rows.append((c["id"], c["reason"]))
            continue
        parts = []
        eff = c.get("tile_efficiency")
        if eff:
            parts.append(f"tile eff {eff['ours']:.3f} vs 1-D {eff['one_d_128']:.3f} ({eff['size']}), "
                         f"visited {eff['visited_tiles']} vs {eff['visited_tiles_1d_128']}")
        b = c.get("schedule_build")
        if b:
            flex_b = b.get("flex_create_block_mask_s")
            parts.append(f"build {b['sparseforge_build_schedule_s'] * 1e3:.1f} ms vs block mask "
                         + (f"{flex_b * 1e3:.1f} ms" if flex_b is not None else "-"))
        setup = c.get("setup")
        if setup:
            parts.append("set-up " + ", ".join(f"{k[:-2]} {v * 1e3:.1f} ms" for k, v in setup.items()
                                                if k.endswith("_s")))
        comp = c.get("compile")
        if comp:
            parts.append(f"compile cold {comp['cold_s'] * 1e3:.0f} ms / warm {comp['warm_s'] * 1e3:.1f} ms")
        ops = c.get("op_time_cpu") or c.get("op_time_cuda") or {}
        parts.append("fwd " + ", ".join(f"{n} {_ms(t, 'forward')}" for n, t in ops.items()))
        parts.append("fwd+bwd " + ", ".join(f"{n} {_ms(t, 'forward_backward')}" for n, t in ops.items()))
        rows.append((c["id"], "; ".join(parts)))
    return rows


def plot(result: dict, out_png: str) -> str:
    """Bar chart of the forward speedup over the best peer (and, for CPU results, tile
    efficiency ours vs 1-D 128x128), one bar per runnable case; written atomically."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparseforge.atomic import write_atomic

    cases = [c for c in result["cases"] if c.get("status") == "ok"]
    ids = [c["id"] for c in cases]
    speed = [c.get("speedup_vs_best_peer", {}).get("forward", {}).get("speedup_x", float("nan")) for c in cases]
    has_eff = any(c.get("tile_efficiency") for c in cases)
    fig, axes = plt.subplots(2 if has_eff else 1, 1, figsize=(max(6, 0.7 * len(ids) + 2), 7 if has_eff else 3.8),
                             squeeze=False)
    ax = axes[0][0]
    ax.bar(ids, speed, color=["tab:green" if s >= 1 else "tab:red" for s in speed])
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_yscale("log")
    meta = result["meta"]
    ax.set_ylabel(f"speedup vs best peer\n(forward, {'CPU op time' if meta['mode'] == 'cpu' else 'CUDA'})")
    ax.set_title(f"sparseforge benchmark suite, {meta['mode']} ({meta['device']})", fontsize=9)
    for x, s in enumerate(speed):
        if math.isfinite(s):
            ax.annotate(f"{s:.2g}x", (x, s), ha="center", va="bottom", fontsize=7)
    if has_eff:
        ax2 = axes[1][0]
        xs = range(len(ids))
        ours = [c.get("tile_efficiency", {}).get("ours", float("nan")) for c in cases]
        base = [c.get("tile_efficiency", {}).get("one_d_128", float("nan")) for c in cases]
        ax2.bar([x - 0.2 for x in xs], ours, width=0.4, label="sparseforge tiles")
        ax2.bar([x + 0.2 for x in xs], base, width=0.4, label="1-D 128x128 tiles")
        scaled = [c.get("tile_efficiency", {}).get("size") == "scaled" for c in cases]
        ax2.set_xticks(list(xs), [i + ("*" if sc else "") for i, sc in zip(ids, scaled)])
        ax2.set_ylim(0, 1.25)  # headroom for the legend above the bars
        ax2.set_ylabel("tile efficiency")
        if any(scaled):
            ax2.set_xlabel("* at the scaled size (no cheap exact method at full size)", fontsize=8)
        ax2.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(out_png, buf.getvalue())
    return out_png


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="sparseforge benchmark suite helpers "
                                             "(run the suite with 'sparseforge bench --suite').")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plot", help="plot RESULTS.json into OUT.png")
    p.add_argument("results")
    p.add_argument("out")
    args = ap.parse_args(argv)
    with open(args.results) as f:
        plot(json.load(f), args.out)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
