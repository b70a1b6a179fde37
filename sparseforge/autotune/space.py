"""The autotuner's config space: tile shapes per grid, loop bounds, launch parameters per kernel.

- ``tile_choices``: (q_tile, k_tile) of the forward and dQ kernels (one schedule);
- ``CLOSED_FORM``: closed-form key-tile bounds or index tables for those two kernels, tried
  both ways where the pattern has closed-form bounds (the PARTIAL walk's runtime div/mod can
  cost more than an index load);
- ``dkdv_tile_choices``: the dK/dV kernel's own tiles on static patterns (keys stationary,
  query tiles streamed); routed attention runs every kernel on one tiling;
- ``LAUNCHES``: ``num_warps`` and ``num_stages``, chosen per kernel.

Tile shapes are N-D boxes of a power-of-two token count, shaped to the grid by
``lower.defaults.default_tile`` (and its transpose on 2-D grids).
"""
from __future__ import annotations

from ..codegen.config import Launch
from ..codegen.render import block_d
from ..dsl.args import expand
from ..dsl.problem import Problem
from ..lower.defaults import default_tile
from ..lower.routed import region_pad, region_tile

#: (query tile tokens, key tile tokens) tried for the forward and dQ kernels, by padded head dim.
TILE_TOKENS = {
    "default": ((128, 64), (64, 64), (128, 32), (64, 32)),
    256: ((64, 32), (32, 32), (64, 16)),
}
#: (streamed query tile tokens, stationary key tile tokens) tried for the dK/dV kernel on
#: static patterns: >= 64 stationary keys give sm_90 wgmma (M = 64 per warpgroup).
DKDV_TILE_TOKENS = {
    "default": ((64, 128), (64, 64), (32, 64)),
    256: ((32, 64), (16, 64), (32, 32)),
}
#: Loop bounds tried for the forward and dQ kernels: closed form (where the pattern has it), tables.
CLOSED_FORM = (True, False)
#: Launch parameters tried for every kernel: 4 warps give 64-row tiles whole-N wgmma shapes,
#: 2-3 stages hide load latency where registers allow, 8 warps / one stage keep the backward
#: kernels' registers per thread low. (The space is what the ahead-of-time compiles cost: 57
#: compiles for a 2-D 16-bit problem, a few minutes on 2 CPU cores, once per problem.)
LAUNCHES = (Launch(4, 3), Launch(8, 2), Launch(8, 1))


def tile_choices(problem: Problem, tokens=None, transposed: bool = False) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(q_tile, k_tile) shapes to try for ``problem``, no duplicates; ``transposed`` adds
    each 2-D shape's transpose (twice the compiles)."""
    if tokens is None:
        tokens = TILE_TOKENS.get(block_d(problem.head_dim), TILE_TOKENS["default"])
    out: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for q_tokens, k_tokens in tokens:
        q, k = default_tile(problem, q_tokens), default_tile(problem, k_tokens)
        variants = [(q, k)]
        if transposed and problem.ndim == 2:
            variants.append((q[::-1], k[::-1]))
        for pair in variants:
            if pair not in out and _fits(problem, pair):
                out.append(pair)
    return out or [(default_tile(problem, tokens[0][0]), default_tile(problem, tokens[0][1]))]


def dkdv_tile_choices(problem: Problem, tokens=None) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(dkdv_q_tile, dkdv_k_tile) shapes to try for the dK/dV kernel of a static pattern on
    ``problem`` (``DKDV_TILE_TOKENS``), no duplicates, none larger than twice the grid."""
    if tokens is None:
        tokens = DKDV_TILE_TOKENS.get(block_d(problem.head_dim), DKDV_TILE_TOKENS["default"])
    return tile_choices(problem, tokens)


def routed_tile_choices(pattern, problem: Problem, tokens=None) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(q_tile, k_tile) shapes for routed attention: the same token budgets, each cut from
    the padded region (``lower.routed.region_tile``), no duplicates."""

    if tokens is None:
        tokens = TILE_TOKENS.get(block_d(problem.head_dim), TILE_TOKENS["default"])
    pad = region_pad(expand("region_size", pattern.region_size, problem.ndim))
    out: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for q_tokens, k_tokens in tokens:
        pair = (region_tile(pad, q_tokens), region_tile(pad, k_tokens))
        if pair not in out:
            out.append(pair)
    return out


def _fits(problem: Problem, pair) -> bool:
    """Tiles no larger than twice the grid along any dimension (more is only padding)."""
    return all(t <= 2 * n for tile in pair for t, n in zip(tile, problem.grid))
