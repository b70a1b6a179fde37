"""Grid-local families: every one is separable, ``mask = AND over dims of mask_d(q_d, k_d)``.

Neighborhood (NATTEN), SlidingWindow, Halo (HaloNet), Blocks and Grid (MaxViT). Each family
gives its 1-D rule per dimension (``allowed_1d``); ``codegen`` lowers the same rules to
tile bounds and is tested against this module.

Across grids (``Problem.kv_grid``) each rule is evaluated on the key grid with the query
placed there (``dsl.problem.placement``: strided queries at ``c * r``, pooled keys at
``c // r``, 1-D decode at the last positions): ``ctx.query_positions``.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import sympy
import torch

from .args import expand, pairwise_le, pairwise_lt, per_dim, per_dim_bool
from .pattern import MaskContext, Pattern
from .problem import Problem


class _Separable(Pattern):
    """A pattern that is the AND over grid dimensions of a 1-D rule."""

    def params(self, problem: Problem) -> list[dict]:
        """Per-dimension parameters (already broadcast to the grid's rank)."""
        raise NotImplementedError

    def allowed_1d(self, length: int, q: torch.Tensor, k: torch.Tensor, **p) -> torch.Tensor:
        """Bool [nq, nk] for coordinates q [nq, 1] and k [1, nk] along one dimension."""
        raise NotImplementedError

    def mask(self, ctx: MaskContext, qi, ki):
        out = None
        qp = ctx.query_positions(qi)
        for d, p in enumerate(self.params(ctx.problem)):
            qd = ctx.grid_coord(qp, d)[:, None]
            kd = ctx.grid_coord(ki, d)[None, :]
            m = self.allowed_1d(ctx.problem.grid[d], qd, kd, **p)
            out = m if out is None else out & m
        return out


# ------------------------------------------------------------------------------------
# Neighborhood attention (NATTEN)
# ------------------------------------------------------------------------------------
def natten_window(q, length: int, kernel: int, dilation: int, stride: int, causal: bool):
    """NATTEN's window of query coordinate(s) ``q`` along one dimension.

    Returns ``(group, start, end)``: the dilation group ``q % dilation`` and the first and
    last visible key in *group coordinates* (key ``k`` is visible iff
    ``k % dilation == group`` and ``start <= k // dilation <= end``). Works on ints, on
    integer tensors/arrays and on sympy expressions alike (``codegen`` prints the latter). The rules (NATTEN's reference mask):

    - the group of length ``L_g = ceil((length - group) / dilation)`` holds the query at
      index ``i = q // dilation``;
    - stride groups of ``stride`` queries share the window of a leader: the group's centre
      ``(i // stride) * stride + stride // 2`` (the last query of the group when causal),
      clamped to ``L_g - 1``;
    - non-causal: ``kernel // 2`` keys left of the leader and ``kernel // 2 + kernel % 2 - 1``
      right of it, the window shifted inward at the borders so it always holds ``kernel`` keys;
    - causal: keys ``leader - kernel + 1 .. i`` (never after the query itself, never shifted).
    """
    group = q % dilation
    i = q // dilation
    group_len = (length - group + dilation - 1) // dilation
    if causal:
        leader = _minimum((i // stride) * stride + stride - 1, group_len - 1)
        return group, _maximum(leader - kernel + 1, 0), i
    leader = _minimum((i // stride) * stride + stride // 2, group_len - 1)
    start = _clamp(leader - kernel // 2, 0, group_len - kernel)
    return group, start, start + kernel - 1


def _maximum(a, b):
    if isinstance(a, torch.Tensor):
        return torch.clamp(a, min=b)
    if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
        return sympy.Max(a, b)
    return np.maximum(a, b)


def _minimum(a, b):
    if isinstance(a, torch.Tensor):
        return torch.minimum(a, b) if isinstance(b, torch.Tensor) else torch.clamp(a, max=b)
    if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
        return sympy.Min(a, b)
    return np.minimum(a, b)


def _clamp(x, lo, hi):
    return _minimum(_maximum(x, lo), hi)


@dataclasses.dataclass(frozen=True, repr=False)
class Neighborhood(_Separable):
    """NATTEN neighborhood attention on a 1-, 2- or 3-D grid.

    kernel_size: keys per dimension each query sees (window shifted inward at borders).
    dilation:    dimension split into ``dilation`` interleaved groups; windows live in a group.
    stride:      groups of ``stride`` queries share one window (generalized NA).
    causal:      per dimension, keys after the query (in its group) are hidden.
    Each is an int/bool or a tuple with one entry per grid dimension.
    """

    kernel_size: int | tuple[int, ...]
    dilation: int | tuple[int, ...] = 1
    stride: int | tuple[int, ...] = 1
    causal: bool | tuple[bool, ...] = False

    def __post_init__(self):
        object.__setattr__(self, "kernel_size", per_dim("kernel_size", self.kernel_size))
        object.__setattr__(self, "dilation", per_dim("dilation", self.dilation))
        object.__setattr__(self, "stride", per_dim("stride", self.stride))
        object.__setattr__(self, "causal", per_dim_bool("causal", self.causal))
        pairwise_le("stride", self.stride, "kernel_size", self.kernel_size)

    def params(self, problem):
        nd = problem.ndim
        ks = expand("kernel_size", self.kernel_size, nd)
        dil = expand("dilation", self.dilation, nd)
        st = expand("stride", self.stride, nd)
        ca = expand("causal", self.causal, nd)
        return [dict(kernel=k, dilation=d, stride=s, causal=c) for k, d, s, c in zip(ks, dil, st, ca)]

    def check(self, problem):
        for d, (length, p) in enumerate(zip(problem.grid, self.params(problem))):
            if p["kernel"] > length:
                raise ValueError(f"kernel_size={self.kernel_size!r} is larger than the grid {problem.grid} "
                                 f"in dimension {d} ({p['kernel']} > {length})")
            if p["kernel"] * p["dilation"] > length:
                raise ValueError(
                    f"kernel_size * dilation must be <= the grid extent, got {p['kernel']} * {p['dilation']} "
                    f"> {length} in dimension {d} (kernel_size={self.kernel_size!r}, dilation={self.dilation!r}, "
                    f"grid={problem.grid})")

    def allowed_1d(self, length, q, k, *, kernel, dilation, stride, causal):
        group, start, end = natten_window(q, length, kernel, dilation, stride, causal)
        kg = k // dilation
        return (k % dilation == group) & (kg >= start) & (kg <= end)


# ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, repr=False)
class SlidingWindow(_Separable):
    """Band truncated at the borders: ``-left <= k_d - q_d <= right`` in every dimension."""

    left: int | tuple[int, ...]
    right: int | tuple[int, ...] = 0

    def __post_init__(self):
        object.__setattr__(self, "left", per_dim("left", self.left, minimum=0))
        object.__setattr__(self, "right", per_dim("right", self.right, minimum=0))

    def params(self, problem):
        nd = problem.ndim
        return [dict(left=a, right=b) for a, b in zip(expand("left", self.left, nd), expand("right", self.right, nd))]

    def check(self, problem):
        self.params(problem)

    def allowed_1d(self, length, q, k, *, left, right):
        diff = k - q
        return (diff >= -left) & (diff <= right)


@dataclasses.dataclass(frozen=True, repr=False)
class Halo(_Separable):
    """HaloNet blocked local attention.

    A query in block ``b = q_d // block_size`` sees keys with
    ``b*block_size - halo <= k_d < (b+1)*block_size + halo`` (truncated at the border).
    """

    block_size: int | tuple[int, ...]
    halo: int | tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "block_size", per_dim("block_size", self.block_size))
        object.__setattr__(self, "halo", per_dim("halo", self.halo, minimum=0))

    def params(self, problem):
        nd = problem.ndim
        return [dict(block=b, halo=h) for b, h in
                zip(expand("block_size", self.block_size, nd), expand("halo", self.halo, nd))]

    def check(self, problem):
        for d, (length, p) in enumerate(zip(problem.grid, self.params(problem))):
            if p["block"] > length:
                raise ValueError(f"block_size={self.block_size!r} is larger than the grid {problem.grid} "
                                 f"in dimension {d}")

    def allowed_1d(self, length, q, k, *, block, halo):
        lo = (q // block) * block - halo
        return (k >= lo) & (k < lo + block + 2 * halo)


@dataclasses.dataclass(frozen=True, repr=False)
class Blocks(_Separable):
    """MaxViT block attention: ``q_d // size == k_d // size`` in every dimension.

    A grid extent that ``size`` does not divide gives a smaller last block.

    offset: windows start at ``offset`` (per dimension, ``0 <= offset < size``): the windows
    are ``[0, s), [s, s + size), [s + size, s + 2 size), ...``, the last one partial — Swin's
    shifted windows (``offset = size // 2``) as one pattern on the original grid, with no
    roll and no mask tensor. In closed form, with ``pad = (size - offset) % size``:
    ``(q_d + pad) // size == (k_d + pad) // size``. ``offset=0`` (the default) is the plain
    partition; an all-zero tuple is stored as 0 (one pattern, one repr, one fingerprint).
    """

    size: int | tuple[int, ...]
    offset: int | tuple[int, ...] = 0

    def __post_init__(self):
        object.__setattr__(self, "size", per_dim("size", self.size))
        offset = per_dim("offset", self.offset, minimum=0)
        if isinstance(offset, tuple) and not any(offset):
            offset = 0
        object.__setattr__(self, "offset", offset)
        pairwise_lt("offset", self.offset, "size", self.size)

    def params(self, problem):
        nd = problem.ndim
        return [dict(size=s, offset=o) for s, o in
                zip(expand("size", self.size, nd), expand("offset", self.offset, nd))]

    def check(self, problem):
        for d, (length, p) in enumerate(zip(problem.grid, self.params(problem))):
            if p["size"] > length:
                raise ValueError(f"size={self.size!r} is larger than the grid {problem.grid} in dimension {d}")

    def allowed_1d(self, length, q, k, *, size, offset=0):
        pad = blocks_pad(size, offset)
        return (q + pad) // size == (k + pad) // size


def blocks_pad(size: int, offset: int) -> int:
    """How far ``Blocks(size, offset)`` shifts coordinates so that its windows start at
    multiples of ``size``: ``(size - offset) % size`` (0 for ``offset=0``)."""
    return (size - offset) % size


@dataclasses.dataclass(frozen=True, repr=False)
class Grid(_Separable):
    """MaxViT grid attention: ``q_d % (S_d // size) == k_d % (S_d // size)``.

    Each token sees ``size`` tokens per dimension spread evenly over the grid; every grid
    extent ``S_d`` must be divisible by ``size``.
    """

    size: int | tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "size", per_dim("size", self.size))

    def params(self, problem):
        return [dict(size=s) for s in expand("size", self.size, problem.ndim)]

    def check(self, problem):
        for d, (length, p) in enumerate(zip(problem.grid, self.params(problem))):
            if length % p["size"]:
                divisors = [s for s in range(1, length + 1) if length % s == 0]
                raise ValueError(
                    f"Grid size={self.size!r} must divide the grid extent {length} in dimension {d} "
                    f"(grid={problem.grid}); sizes that divide it: {divisors}")

    def allowed_1d(self, length, q, k, *, size):
        period = length // size
        return q % period == k % period
