"""Content-dependent families: the mask depends on run-time inputs.

Routed (BiFormer bi-level routing) reads q and k; Scattered (voxel windows) reads voxel
coordinates; Grouped (clusters, packed documents) reads run-time group ids. Their exact
meaning lives here; ``lower.routed`` compiles Routed, ``lower.segments`` compiles
Scattered, and ``runtime.grouped`` runs Grouped on the Scattered kernels.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .args import expand, per_dim, positive_int
from .pattern import MaskContext, Pattern


def region_ids(grid: tuple[int, ...], region: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    """Region index of every token of a row-major ``grid`` cut into ``region`` boxes.

    Returns (ids int64 [N], number of regions R). A ragged last region per dimension
    holds the tokens that are left.
    """
    counts = [math.ceil(s / r) for s, r in zip(grid, region)]
    ids = torch.zeros(math.prod(grid), dtype=torch.long)
    flat = torch.arange(math.prod(grid))
    stride = 1
    rstride = 1
    for d in reversed(range(len(grid))):
        coord = (flat // stride) % grid[d]
        ids += (coord // region[d]) * rstride
        stride *= grid[d]
        rstride *= counts[d]
    return ids, math.prod(counts)


#: Tokens per float64 chunk of the routing's region sums (``Routed.routes``).
ROUTING_CHUNK_TOKENS = 1024


@dataclasses.dataclass(frozen=True, repr=False)
class Routed(Pattern):
    """BiFormer bi-level routing attention.

    The grid is cut into regions of ``region_size`` (ragged last regions allowed). Region
    queries/keys are the means of q/k over each region; their affinity is the dot product
    over all heads' channels together (``per_head=False``, one routing for all heads) or per
    head; each query region keeps its ``topk`` key regions; every query token attends to
    all tokens of its routed regions. Needs ``q`` and ``k`` (or explicit ``routes``).
    """

    needs = frozenset({"qk"})

    region_size: int | tuple[int, ...]
    topk: int
    per_head: bool = False

    def __post_init__(self):
        object.__setattr__(self, "region_size", per_dim("region_size", self.region_size))
        positive_int("topk", self.topk)
        if not isinstance(self.per_head, bool):
            raise TypeError(f"per_head must be a bool, got {self.per_head!r}")

    def regions(self, grid) -> tuple[torch.Tensor, int]:
        return region_ids(grid, expand("region_size", self.region_size, len(grid)))

    def check(self, problem):
        region = expand("region_size", self.region_size, problem.ndim)
        for d, (s, r) in enumerate(zip(problem.grid, region)):
            if r > s:
                raise ValueError(f"region_size={self.region_size!r} is larger than the grid {problem.grid} "
                                 f"in dimension {d}")
        _, n_regions = self.regions(problem.grid)
        if self.topk > n_regions:
            raise ValueError(f"topk={self.topk} is larger than the number of regions {n_regions} "
                             f"(grid {problem.grid} cut into regions of {self.region_size!r})")

    def routes(self, q: torch.Tensor, k: torch.Tensor, grid) -> torch.Tensor:
        """Top-k key regions per query region: int64 [B, H or 1, R, topk], on q's device.

        q: [B, H, N, D], k: [B, H or kv_heads, N, D] (GQA: each kv head's region means serve
        its query heads), any float dtype. Routing is detached, as in BiFormer, and computed
        in float64 from the inputs' values: region sums accumulate ``ROUTING_CHUNK_TOKENS``
        tokens at a time, so no float64 copy of q or k is ever whole (peak memory O(R), not
        O(N), beyond the inputs). On the ``meta`` device it gives meta routes of the right
        shape (shape propagation: no values exist to route on).
        """
        ids, n_regions = self.regions(grid)
        b, h, n, d = q.shape
        counts = torch.bincount(ids, minlength=n_regions).to(device=q.device, dtype=torch.float64)  # static: on CPU
        ids = ids.to(q.device)

        def region_mean(x):  # [B, Hx, N, D] -> float64 [B, R, Hx, D]
            x = x.detach()
            s = torch.zeros(b, n_regions, x.shape[1], d, dtype=torch.float64, device=x.device)
            for a in range(0, n, ROUTING_CHUNK_TOKENS):
                chunk = x[:, :, a:a + ROUTING_CHUNK_TOKENS].permute(0, 2, 1, 3).double()  # [B, c, Hx, D]
                s.index_add_(1, ids[a:a + ROUTING_CHUNK_TOKENS], chunk)
            return s / counts[None, :, None, None]

        qr, kr = region_mean(q), region_mean(k)  # [B, R, H, D], [B, R, Hk, D]
        if kr.shape[2] != h:
            kr = kr.repeat_interleave(h // kr.shape[2], dim=2)
        if self.per_head:
            affinity = torch.einsum("brhd,bshd->bhrs", qr, kr)
        else:
            affinity = torch.einsum("brhd,bshd->brs", qr, kr)[:, None]
        return torch.topk(affinity, self.topk, dim=-1).indices

    def region_layout(self, ctx: MaskContext) -> torch.Tensor:
        """Bool [B, H or 1, R, R]: key region visible to query region."""
        key = ("routed-layout", self)
        if key not in ctx.cache:
            _, n_regions = self.regions(ctx.problem.grid)
            routes = ctx.routes
            if routes is None:
                if ctx.q is None or ctx.k is None:
                    raise ValueError(f"{self!r} routes on content: pass q= and k= (or routes=)")
                routes = self.routes(ctx.q, ctx.k, ctx.problem.grid)
            else:
                routes = check_routes(routes, ctx.q.shape[0] if ctx.q is not None else None,
                                      ctx.problem.heads, n_regions, self.topk)
            if routes.device.type == "meta":
                raise ValueError(f"routes is on the meta device, but the exact mask of {self!r} (dense_mask, "
                                 f"reference_attention) needs its values: pass routes holding data")
            layout = torch.zeros(*routes.shape[:2], n_regions, n_regions, dtype=torch.bool)
            layout.scatter_(-1, routes.cpu(), True)
            ctx.cache[key] = layout
        return ctx.cache[key]

    def mask(self, ctx, qi, ki):
        ids, _ = self.regions(ctx.problem.grid)
        layout = self.region_layout(ctx)
        return layout[:, :, ids[qi]][:, :, :, ids[ki]]


def check_routes(routes: torch.Tensor, batch: int | None, heads: int, n_regions: int, topk: int) -> torch.Tensor:
    """Validate caller-given routes int [B, (H,) R, topk]; returns them as int64 [B, H|1, R, topk].
    Routes on the ``meta`` device (shape propagation) have no values: only their dtype and
    shape are checked."""
    if not isinstance(routes, torch.Tensor) or routes.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"routes must be an int32/int64 tensor [B, (H,) R, topk], got "
                        f"{getattr(routes, 'dtype', type(routes).__name__)}")
    if routes.dim() == 3:
        routes = routes[:, None]
    if routes.dim() != 4 or routes.shape[1] not in (1, heads) or routes.shape[2] != n_regions \
            or routes.shape[3] != topk or (batch is not None and routes.shape[0] != batch):
        raise ValueError(f"routes must have shape [B, (H,) R={n_regions}, topk={topk}], got {tuple(routes.shape)}")
    if routes.numel() and routes.device.type != "meta" and (routes.min() < 0 or routes.max() >= n_regions):
        raise ValueError(f"routes must index regions in [0, {n_regions}), got values in "
                         f"[{int(routes.min())}, {int(routes.max())}]")
    return routes.long()


@dataclasses.dataclass(frozen=True, repr=False)
class Scattered(Pattern):
    """Scattered voxel windows (SST / DSVT / ScatterFormer).

    Voxels with integer coordinates ``[batch, c_1..c_n]`` attend to the voxels of the same
    batch element whose window id ``(c_d + shift_d) // window_size_d`` is equal in every
    dimension. Needs ``coords`` (int [N, 1 + n], non-negative).
    """

    needs = frozenset({"coords"})
    needs_grid = False

    window_size: int | tuple[int, ...]
    shift: int | tuple[int, ...] = 0

    def __post_init__(self):
        object.__setattr__(self, "window_size", per_dim("window_size", self.window_size))
        object.__setattr__(self, "shift", per_dim("shift", self.shift, minimum=0))

    def check_rank(self, coords: torch.Tensor) -> None:
        """window_size and shift must have one entry per coordinate dimension."""
        nd = coords.shape[1] - 1
        expand("window_size", self.window_size, nd)
        expand("shift", self.shift, nd)

    def window_ids(self, coords: torch.Tensor) -> torch.Tensor:
        """int64 [N, 1 + n]: batch then window index per dimension."""
        coords = check_coords(coords)
        nd = coords.shape[1] - 1
        ws = torch.tensor(expand("window_size", self.window_size, nd), dtype=torch.long)
        sh = torch.tensor(expand("shift", self.shift, nd), dtype=torch.long)
        return torch.cat([coords[:, :1], (coords[:, 1:] + sh) // ws], dim=1)

    def mask(self, ctx, qi, ki):
        if ctx.coords is None:
            raise ValueError(f"{self!r} needs voxel coordinates: pass coords= (int [N, 1 + ndim], batch first)")
        key = ("window-ids", self)
        if key not in ctx.cache:
            ctx.cache[key] = self.window_ids(ctx.coords)
        w = ctx.cache[key]
        return (w[qi][:, None, :] == w[ki][None, :, :]).all(-1)


def check_coords(coords, *, keep_device: bool = False) -> torch.Tensor:
    """Validate voxel coordinates: int tensor [N, 1 + ndim] (ndim 1..3), non-negative.
    Returns them as int64 on the CPU (``keep_device``: on their own device)."""
    if not isinstance(coords, torch.Tensor):
        raise TypeError(f"coords must be an integer tensor [N, 1 + ndim], got {type(coords).__name__}")
    if coords.dtype not in (torch.int16, torch.int32, torch.int64, torch.uint8, torch.int8):
        raise TypeError(f"coords must have an integer dtype, got {coords.dtype}")
    if coords.dim() != 2 or not 2 <= coords.shape[1] <= 4:
        raise ValueError(f"coords must have shape [N, 1 + ndim] with ndim in 1..3 (batch first), "
                         f"got {tuple(coords.shape)}")
    if coords.numel() and coords.min() < 0:
        raise ValueError(f"coords must be non-negative, got a minimum of {int(coords.min())}")
    return coords.long() if keep_device else coords.long().cpu()


@dataclasses.dataclass(frozen=True, repr=False)
class Grouped(Pattern):
    """Attention within run-time groups (Routing Transformer clusters, packed documents).

    Query i may attend key j iff ``groups[b, i] == groups[b, j]`` (and ``j <= i`` with
    ``causal=True``). ``groups`` is int [B, N] (one grouping for all heads) or [B, H, N]
    (per head); a negative id puts a token in no group: its row is empty and it is never a
    key. Needs ``groups``.

    Keys that are not the queries (``Problem.kv_grid``): ``groups`` are the queries' ids
    [B, (H,) Nq] and ``kv_groups`` the keys' [B, (H,) Nk]; any pair of sizes without
    ``causal``, which compares positions (``ctx.query_positions``: the last Nq of a 1-D
    sequence).
    """

    needs = frozenset({"groups"})

    causal: bool = False

    def __post_init__(self):
        if not isinstance(self.causal, bool):
            raise TypeError(f"causal must be a bool, got {self.causal!r}")

    def mask(self, ctx, qi, ki):
        if ctx.groups is None:
            raise ValueError(f"{self!r} needs group ids: pass groups= (int [B, N] or [B, H, N])")
        gq, gk = ctx.groups[:, :, qi], ctx.key_groups()[:, :, ki]  # int64 [B, 1|H, n]
        m = (gq[..., :, None] == gk[..., None, :]) & (gq >= 0)[..., :, None]
        if self.causal:
            m = m & (ki[None, :] <= ctx.query_positions(qi)[:, None])
        return m

    def needs_placement(self) -> bool:
        return self.causal


def check_groups(groups, batch: int | None, heads: int, n: int, *, keep_device: bool = False,
                 name: str = "groups") -> torch.Tensor:
    """Validate group ids: int tensor [B, N] or [B, H, N] matching the problem (``batch``
    None: any B). Returns them as int64 [B, 1 or H, N] on the CPU (``keep_device``: on
    their own device). ``name``: the argument errors name (``kv_groups`` for the keys')."""
    if not isinstance(groups, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor [B, N] or [B, H, N], got {type(groups).__name__}")
    if groups.dtype not in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        raise TypeError(f"{name} must have an integer dtype, got {groups.dtype}")
    shape = tuple(groups.shape)
    if groups.dim() == 2:
        groups = groups[:, None]
    if groups.dim() != 3 or groups.shape[1] not in (1, heads) or groups.shape[2] != n \
            or (batch is not None and groups.shape[0] != batch):
        b = "B" if batch is None else f"B={batch}"
        raise ValueError(f"{name} must have shape [{b}, N={n}] or [{b}, H={heads}, N={n}], "
                         f"got {shape}")
    return groups.long() if keep_device else groups.long().cpu()
