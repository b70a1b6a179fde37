"""Tile defaults, in one place: the tile sizes in tokens that compile without spills, and
how a token count becomes an N-D tile of the grid."""
from __future__ import annotations

import math

import torch

from ..dsl.problem import Problem

__all__ = ["default_dkdv_tile_tokens", "default_tile", "default_tile_tokens"]


def default_tile_tokens(problem) -> tuple[int, int]:
    """(query, key) tile sizes in tokens that compile without register spills on sm_80 and
    sm_90 for every kernel (measured by ahead-of-time compiles; tests/codegen/test_aot_kernels.py):
    128 x 32 for 16-bit inputs with 32 < head_dim <= 128 (128 x 64 on 1-D grids: long windows
    keep their tile efficiency with 64 keys, and a 64-key iteration costs ~30% fewer issue slots
    per pair on sm_90; N-D windows are often small, where 64 keys waste more than they save),
    64 x 32 for small or 256 head dims, 32 x 32 for fp32 (no tensor cores, accumulators and
    operands share the registers)."""
    if problem.dtype == torch.float32:
        return 32, 32
    if 32 < problem.head_dim <= 128:
        return (128, 64) if problem.grid is not None and len(problem.grid) == 1 else (128, 32)
    return 64, 32


def default_tile(problem: Problem, block: int = 128) -> tuple[int, ...]:
    """An N-D tile of ``block`` tokens shaped to the grid: 128 -> (128,), (8, 16), (4, 4, 8)."""
    nd = problem.ndim
    if nd == 1:
        return (block,)
    exps = [0] * nd
    total = int(math.log2(block))
    for i in range(total):
        exps[nd - 1 - (i % nd)] += 1  # fill from the last (fastest) dimension
    return tuple(1 << e for e in sorted(exps))


def default_dkdv_tile_tokens(problem, capability: int) -> tuple[tuple[int, int], ...]:
    """(query, key) tile sizes in tokens to try, in order, for the dK/dV kernel's own schedule;
    empty to run it on the forward's tiles (fp32, head_dim 256: its accumulators alone fill
    the registers). sm_90: a stationary key tile of >= 64 rows runs every product on wgmma
    (M = 64 per warpgroup; 32-key tiles fall back to mma.sync): 64 x 128 for head_dim <= 64,
    then 64 x 64 (where 128 keys break a head group's fold), 32 x 64 up to 128 (64 x 128
    spills there on folded grids). sm_80: 64 x 64 for head_dim <= 32, 32 x 64 up to 128 (the
    forward's 128 x 32 spills once the FULL and PARTIAL loops are separate). Measured
    spill-free and, on sm_90, unserialized by ahead-of-time compiles
    (tests/codegen/test_aot_kernels.py)."""
    if problem.dtype == torch.float32 or problem.head_dim > 128:
        return ()
    if capability < 90:
        return ((64, 64),) if problem.head_dim <= 32 else ((32, 64),)
    return ((64, 128), (64, 64)) if problem.head_dim <= 64 else ((32, 64),)
