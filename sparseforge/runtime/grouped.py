"""``compile(Grouped(), problem)``: attention within run-time group ids, on the Scattered kernels.

    attn = compile(Grouped(), Problem(grid=N, heads=H, head_dim=D))
    out = attn(q, k, v, groups=ids)            # q [B, H, N, D], k/v [B, kv_heads, N, D]
    out, lse = attn(q, k, v, groups=ids, return_lse=True)

``ids`` is int [B, N] (one grouping for every head) or [B, H, N] (per head); tokens with a
negative id belong to no group: their rows are zeros with LSE = -inf and they are never keys.

No kernel of its own: a group is a scattered "window". The tokens with an id >= 0 become
voxels with coordinates ``(b, id)`` (per-head ids: ``(b * H + h, id)``, one head per voxel,
k/v repeated to H heads); ``codegen.scattered`` sorts them stably by (batch, group, position)
into contiguous segments and the ordinary templates run with the segment-id predicate
(``runtime.compiled.CompiledAttention`` on a ``Scattered(window_size=1)``). Outputs and
gradients are scattered back by autograd through the gathers. ``causal=True`` is not
compiled yet (the segment predicate is equality only): ``UnsupportedPatternError``.
"""
from __future__ import annotations

import math

import torch

from ..dsl.content import Grouped, Scattered, check_groups
from ..dsl.problem import Problem
from ..dsl.semantics import check_qkv

__all__ = ["GroupedAttention"]


class GroupedAttention:
    """Attention of a ``Grouped`` pattern on ``problem``: ``attn(q, k, v, groups=ids)``.

    Differentiable with respect to q, k and v (and the LSE). Made by ``compile``.
    """

    def __init__(self, pattern: Grouped, problem: Problem, *, backend=None, q_tile=None, k_tile=None, config=None):
        if not isinstance(pattern, Grouped):
            raise TypeError(f"pattern must be a sparseforge Grouped, got {pattern!r}")
        self.pattern = pattern
        self.problem = problem
        self.backend = backend
        self._tiles = dict(q_tile=q_tile, k_tile=k_tile, config=config)
        self._inner_ops: dict[bool, object] = {}
        self._inner(per_head=False)  # compile now: bad tiles/backends fail at compile time

    def __repr__(self) -> str:
        return f"GroupedAttention({self.pattern!r}, {self.problem!r}, backend={self.backend!r})"

    def _inner(self, per_head: bool):
        """The Scattered op on the packed grouped tokens (per-head ids: one head per voxel)."""
        if per_head not in self._inner_ops:
            from .compiled import compile

            p = self.problem
            heads, kv_heads = (1, 1) if per_head else (p.heads, p.kv_heads)
            inner = Problem(heads=heads, kv_heads=kv_heads, head_dim=p.head_dim, dtype=p.dtype)
            self._inner_ops[per_head] = compile(Scattered(window_size=1), inner, backend=self.backend,
                                                **self._tiles)
        return self._inner_ops[per_head]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, groups: torch.Tensor,
                 scale: float | None = None, return_lse: bool = False):
        """out [B, H, N, D] (and the natural-log LSE [B, H, N], -inf on empty rows)."""
        p = self.problem
        check_qkv(q, k, v, p)
        if scale is None:
            scale = p.head_dim ** -0.5
        elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite real number, got {scale!r}")
        if not isinstance(return_lse, bool):
            raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
        b, h, n, d = q.shape
        g = check_groups(groups, b, h, n, keep_device=True).to(q.device)
        per_head = g.shape[1] != 1
        inner = self._inner(per_head)
        if not per_head:
            valid = g[:, 0] >= 0                                   # [B, N]
            bi, ni = valid.nonzero(as_tuple=True)
            coords = torch.stack([bi, g[:, 0][bi, ni]], dim=1)
            qv, kv, vv = (t.permute(0, 2, 1, 3)[bi, ni] for t in (q, k, v))  # [M, heads, D]
            out_v, lse_v = inner(qv, kv, vv, coords=coords, scale=float(scale), return_lse=True)
            out = q.new_zeros(b, n, h, d).index_put((bi, ni), out_v).permute(0, 2, 1, 3)
            lse = lse_v.new_full((b, n, h), -math.inf).index_put((bi, ni), lse_v).permute(0, 2, 1)
        else:
            rep = h // p.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            valid = g >= 0                                         # [B, H, N]
            bi, hi, ni = valid.nonzero(as_tuple=True)
            coords = torch.stack([bi * h + hi, g[bi, hi, ni]], dim=1)
            qv, kv, vv = (t[bi, hi, ni][:, None] for t in (q, k, v))      # [M, 1, D]
            out_v, lse_v = inner(qv, kv, vv, coords=coords, scale=float(scale), return_lse=True)
            out = q.new_zeros(b, h, n, d).index_put((bi, hi, ni), out_v[:, 0])
            lse = lse_v.new_full((b, h, n), -math.inf).index_put((bi, hi, ni), lse_v[:, 0])
        out = out.contiguous()
        return (out, lse.contiguous()) if return_lse else out
