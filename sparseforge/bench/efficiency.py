"""Exact tile efficiency: allowed (query, key) pairs / pairs inside the visited tiles, of our
schedule (default tiles) and of 1-D 128x128 tiles of the row-major sequence (FlexAttention's
BlockMask), with both visited tile counts; for static patterns, routed patterns (the routes
of random q, k) and voxel windows. Counts only, no timing beyond the schedule build.

Each count says how it was made (``method``); a static pattern with no cheap exact method at
a size gives None there (the CPU mode then counts at the scaled size).
"""
from __future__ import annotations

import time

import torch

import sparseforge as sf
from sparseforge.dsl.pattern import Intersection, as_4d
from sparseforge.dsl.semantics import make_context
from sparseforge.lower.schedule import build_schedule

from . import peers
from .cases import Case, Shape, random_qkv, window_side

#: Largest N^2 x head groups for which the 1-D 128x128 baseline is counted from the dense
#: mask (``TileSchedule.one_d_efficiency``, ~4e7 elements/s on one core).
ONE_D_DENSE_BUDGET = 2.5e8
#: Largest N^2 x heads for which allowed pairs are counted from the dense mask directly.
DENSE_COUNT_BUDGET = 5e8
ONE_D_TILE = 128


# ------------------------------------------------------------------------------------
# Static patterns
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


# ------------------------------------------------------------------------------------
# Content-dependent patterns: routed (routes of random q, k), scattered voxel windows
# ------------------------------------------------------------------------------------
def voxel_allowed_pairs(coords: torch.Tensor, pattern: sf.Scattered, heads: int) -> int:
    """Allowed (query, key) pairs, summed over heads: sum over windows of size^2, x heads."""
    sizes = peers.window_groups(coords, window_side(pattern))["sizes"]
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
    sizes = peers.window_groups(coords, window_side(case.pattern))["sizes"].long()
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
