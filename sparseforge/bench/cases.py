"""The suite's problems: ``Shape``, ``Case``, every case of the issue (``CASES``), the
selection by problem id, which cases can run here, and their random inputs.

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

``select`` reads ``CASES`` and ``PROBLEM_IDS`` from this module: patch them here.
"""
from __future__ import annotations

import dataclasses
import math

import torch

import sparseforge as sf

from .messages import why


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
    peers: tuple[str, ...]      # peers of the issue (the names below: FLEX, NATTEN, ...)
    cpu_pattern: sf.Pattern | None = None   # the scaled pattern (content-dependent cases: the same pattern)
    cpu: Shape | None = None
    voxels: tuple[int, int] | None = None       # voxel problems: (voxels, batch elements of the coords), full
    cpu_voxels: tuple[int, int] | None = None   # and scaled
    attention: str = "softmax"                  # "linear": sf.compile(..., attention="linear")


def _maxvit(heads: int) -> sf.Pattern:
    return sf.PerHead([sf.Blocks(8)] * (heads // 2) + [sf.Grid(8)] * (heads - heads // 2))


# The peers' names: in Case.peers and as the keys of the op-time results.
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
        return f"sf.compile failed: {why(exc)}"
    return (f"sf.compile accepts {case.pattern!r}, but this suite has no harness for its content-dependent "
            "inputs; nothing is estimated")


def random_qkv(shape: Shape, dtype, device, requires_grad: bool, seed: int = 0):
    """Seeded random q, k, v [B, H, N, D] of a grid case."""
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape.grid)
    return tuple(torch.randn((shape.batch, shape.heads, n, shape.head_dim), generator=gen)
                 .to(device, dtype).requires_grad_(requires_grad) for _ in range(3))


def scalar(value, name: str) -> int:
    """A pattern parameter that is one value for every dimension, as that value."""
    if isinstance(value, tuple):
        if len(set(value)) != 1:
            raise ValueError(f"the torch peer needs one {name} for every dimension, got {value}")
        value = value[0]
    return value


def window_side(pattern: sf.Scattered) -> int:
    """The window side of a Scattered pattern with square windows."""
    return scalar(pattern.window_size, "window_size")
