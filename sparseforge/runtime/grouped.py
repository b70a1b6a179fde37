"""``compile(Grouped(), problem)``: attention within run-time group ids, on the Scattered kernels.

    attn = compile(Grouped(), Problem(grid=N, heads=H, head_dim=D))      # or Grouped(causal=True)
    out = attn(q, k, v, groups=ids)            # q [B, H, N, D], k/v [B, kv_heads, N, D]
    out, lse = attn(q, k, v, groups=ids, return_lse=True)
    plan = attn.plan(ids)                      # the packing, reusable across calls / layers
    out = attn(q, k, v, plan=plan)

``ids`` is int [B, N] (one grouping for every head) or [B, H, N] (per head); tokens with a
negative id belong to no group: their rows are zeros with LSE = -inf and they are never keys.

Keys that are not the queries (cross attention between two sequences, ``Problem(grid=Nq,
kv_grid=Nk)``, or any call whose k has another length): ``attn(q, k, v, groups=q_ids,
kv_groups=k_ids)`` runs the CPU executor on the exact mask (``runtime.ops``' ``kv_grid``);
``causal=True`` places the queries at the last Nq positions of the keys' sequence.

No kernel of its own: a group is a scattered "window". The tokens with an id >= 0 become
voxels with coordinates ``(b, id)`` (per-head ids: ``(b * H + h, id)``, one head per voxel,
k/v repeated to H heads); ``lower.segments`` sorts them stably by (batch, group, position)
into contiguous segments and the ordinary templates run with the segment-id predicate on a
``Scattered(window_size=1)`` schedule. ``causal=True`` adds key row <= query row of the
packed sequence to that predicate (``ScatteredLayout.causal``): the sort is stable, so inside
a segment the packed order is the token order and that is exactly ``j <= i``. Outputs and
gradients are scattered back by autograd through the gathers.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..codegen.config import KernelConfig
from ..backends.cpu import PADDED
from ..dsl.content import Grouped, check_groups
from ..dsl.modifiers import Sinks
from ..dsl.pattern import Intersection, Pattern
from ..dsl.problem import Problem
from ..dsl.sequence import Causal, Full
from ..lower.paths import SEGMENTS, STATIC
from .compiled import CompiledAttention
from ..dsl.semantics import check_cross
from .inputs import check_qkv, check_return_lse, check_scale, op_backend, padding_input
from .ops import refuse_cross_on, resolve_backend

__all__ = ["GroupedAttention", "GroupedPlan", "GroupedStaticAttention", "split_grouped"]


@dataclasses.dataclass(frozen=True, eq=False)
class GroupedPlan:
    """The packing of one set of group ids, reusable across calls (and layers with the same
    groups): ``attn(q, k, v, plan=attn.plan(ids))``.

    shape:  (B, H or 1, N) of the ids (1: one grouping for every head)
    index:  int64 [M] tensors (b, n) — per-head ids: (b, h, n) — of the M grouped tokens
    inner:  the ``lower.segments.ScatteredPlan`` of their (batch, group) coordinates
    """

    pattern: Grouped
    shape: tuple[int, int, int]
    index: tuple[torch.Tensor, ...]
    inner: object

    @property
    def per_head(self) -> bool:
        return len(self.index) == 3

    @property
    def device(self) -> torch.device:
        return self.index[0].device

    def __repr__(self) -> str:
        return (f"GroupedPlan({self.pattern!r}, shape={self.shape}, tokens={int(self.index[0].numel())}, "
                f"groups={self.inner.n_windows}, device={self.device})")


class GroupedAttention:
    """Attention of a ``Grouped`` pattern on ``problem``: ``attn(q, k, v, groups=ids)``.

    Differentiable with respect to q, k and v (and the LSE). Made by ``compile``.
    """

    def __init__(self, pattern: Grouped, problem: Problem, *, backend=None, q_tile=None, k_tile=None, config=None,
                 modifiers=None, head_scale: bool = False):
        if not isinstance(pattern, Grouped):
            raise TypeError(f"pattern must be a sparseforge Grouped, got {pattern!r}")
        if modifiers is not None and modifiers.biases:
            raise ValueError(f"modifiers {[type(m).__name__ for m in modifiers.biases]} measure token positions, which "
                             f"{pattern!r} packs by group; write Grouped() & Full() (the static kernels with the ids as "
                             "call data keep the positions) to combine them")
        self.pattern = pattern
        self.problem = problem
        self.backend = backend
        #: softcap, sinks and a per-head scale (position-free: they apply in the packed order)
        self.modifiers, self.head_scale = modifiers, head_scale
        self._tiles = dict(q_tile=q_tile, k_tile=k_tile, config=config)
        self._inner_ops: dict[bool, object] = {}
        self._inner(per_head=False)  # compile now: bad tiles/backends fail at compile time

    def __repr__(self) -> str:
        return f"GroupedAttention({self.pattern!r}, {self.problem!r}, backend={self.backend!r})"

    def _inner(self, per_head: bool):
        """The segment op on the packed grouped tokens (per-head ids: one head per voxel)."""
        if per_head not in self._inner_ops:
            p = self.problem
            heads, kv_heads = (1, 1) if per_head else (p.heads, p.kv_heads)
            inner = Problem(heads=heads, kv_heads=kv_heads, head_dim=p.head_dim, dtype=p.dtype)
            config = self._tiles["config"]
            if config is None:
                config = KernelConfig(q_tile=self._tiles["q_tile"], k_tile=self._tiles["k_tile"])
            schedule = SEGMENTS.build(self.pattern, inner, config)
            if per_head and (self.modifiers or self.head_scale):
                raise NotImplementedError(f"{self.pattern!r} with per-head group ids [B, H, N] runs one head per packed "
                                          "token, where per-head sinks and scales do not apply yet; give one grouping "
                                          "[B, N] for every head")
            self._inner_ops[per_head] = CompiledAttention(schedule, self.backend, config, modifiers=self.modifiers,
                                                          head_scale=self.head_scale)
        return self._inner_ops[per_head]

    def plan(self, groups: torch.Tensor) -> GroupedPlan:
        """The packing of group ids ``groups`` (int [B, N] or [B, H, N]; negative = no group),
        built on their device with torch ops: a ``GroupedPlan`` to pass as ``plan=``."""
        p = self.problem
        n = groups.shape[-1] if isinstance(groups, torch.Tensor) and groups.dim() in (2, 3) else p.tokens
        g = check_groups(groups, None, p.heads, n, keep_device=True)  # any sequence length: segments are grid-free
        b, n = g.shape[0], g.shape[2]
        if g.shape[1] == 1:
            index = (g[:, 0] >= 0).nonzero(as_tuple=True)                  # (b, n), in token order
            coords = torch.stack([index[0], g[:, 0][index]], dim=1)
        else:
            index = (g >= 0).nonzero(as_tuple=True)                        # (b, h, n), in token order
            coords = torch.stack([index[0] * p.heads + index[1], g[index]], dim=1)
        inner = self._inner(g.shape[1] != 1).plan(coords)
        return GroupedPlan(self.pattern, (b, g.shape[1], n), tuple(i.contiguous() for i in index), inner)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, groups: torch.Tensor | None = None,
                 plan: GroupedPlan | None = None, scale: float | None = None, return_lse: bool = False,
                 kv_groups: torch.Tensor | None = None, key_padding_mask=None, lengths=None,
                 padding_side: str = "right", modifiers=None):
        """out [B, H, N, D] (and the natural-log LSE [B, H, N], -inf on empty rows) of q, k, v
        and exactly one of ``groups`` (int [B, N] or [B, H, N]) or ``plan`` (``self.plan(groups)``).
        Padding (``key_padding_mask`` bool [B, N], or ``lengths`` [B] with ``padding_side``)
        takes the padded tokens out of every group (with ``groups=``; fold it into the ids
        before ``plan()``).

        ``kv_groups`` (int [B, Nk] or [B, H, Nk]): the keys' ids when the keys are not the
        queries (needed when the problem has a ``kv_grid`` or k's length is not q's);
        ``groups`` are then the queries' ids."""
        p = self.problem
        four_d = all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k))
        if four_d and (kv_groups is not None or p.is_cross or k.shape[2] != q.shape[2]):
            return self._cross(q, k, v, groups, kv_groups, plan, scale, return_lse)
        check_qkv(q, k, v, p, tokens=q.shape[2] if isinstance(q, torch.Tensor) and q.dim() == 4 else None)
        if not self.head_scale:  # else a [H] tensor, checked by the segment op's call
            scale = float(check_scale(scale, p.head_dim))
        check_return_lse(return_lse)
        if (groups is None) == (plan is None):
            raise ValueError(f"{self.pattern!r} needs the group ids: pass exactly one of groups= (int [B, N] or "
                             "[B, H, N]) or plan= (attn.plan(groups))")
        b, h, n, d = q.shape
        real = None   # bool [B, N] real tokens (padding given), else every token is
        if key_padding_mask is not None or lengths is not None:
            if plan is not None:
                raise ValueError("padding with plan=: the plan's packing is fixed; give groups= with the padding, "
                                 "or set the padded tokens' ids to -1 before attn.plan(groups)")
            padding = padding_input(Full(), p, (n,), q, None, key_padding_mask=key_padding_mask, lengths=lengths,
                                    padding_side=padding_side)
            real = _real_tokens(padding, n)
            ids = check_groups(groups, b, h, n, keep_device=True).to(q.device)   # [B, 1 | H, N]
            groups = torch.where(real[:, None, :], ids, -1)
        if plan is None:
            check_groups(groups, b, h, n, keep_device=True)  # the error names q's batch
            plan = self.plan(groups.to(q.device))
        elif not isinstance(plan, GroupedPlan):
            raise TypeError(f"plan must be a GroupedPlan from attn.plan(groups), got {type(plan).__name__}")
        elif plan.pattern != self.pattern or plan.shape[0] != b or plan.shape[2] != n:
            raise ValueError(f"plan was made for {plan.pattern!r} and ids of shape {plan.shape}, not for this op "
                             f"({self.pattern!r}) and q of shape {tuple(q.shape)}; make it with this op's plan()")
        elif plan.device != q.device:
            raise ValueError(f"plan (groups) is on {plan.device} but q is on {q.device}")
        inner = self._inner(plan.per_head)
        if not plan.per_head:
            bi, ni = plan.index
            qv, kv, vv = (t.permute(0, 2, 1, 3)[bi, ni] for t in (q, k, v))  # [M, heads, D]
            out_v, lse_v = inner(qv, kv, vv, plan=plan.inner, scale=scale, modifiers=modifiers, return_lse=True)
            out = q.new_zeros(b, n, h, d).index_put((bi, ni), out_v).permute(0, 2, 1, 3)
            lse = self._empty_lse(lse_v, modifiers, real, b, n, h).index_put((bi, ni), lse_v).permute(0, 2, 1)
        else:
            rep = h // p.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            bi, hi, ni = plan.index
            qv, kv, vv = (t[bi, hi, ni][:, None] for t in (q, k, v))      # [M, 1, D]
            out_v, lse_v = inner(qv, kv, vv, plan=plan.inner, scale=scale, modifiers=modifiers, return_lse=True)
            out = q.new_zeros(b, h, n, d).index_put((bi, hi, ni), out_v[:, 0])
            lse = lse_v.new_full((b, h, n), -math.inf).index_put((bi, hi, ni), lse_v[:, 0])
        out = out.contiguous()
        return (out, lse.contiguous()) if return_lse else out

    @staticmethod
    def _empty_lse(like: torch.Tensor, modifiers, real, b: int, n: int, h: int) -> torch.Tensor:
        """[B, N, H] LSE of the rows no group holds: -inf, or with sinks the head's sink logit
        for a real token in no group (an empty row; padding stays -inf)."""
        sinks = next((m for m in (modifiers or ()) if isinstance(m, Sinks)), None)
        lse = like.new_full((b, n, h), -math.inf)
        if sinks is None:
            return lse
        sink = sinks.logits.to(like)[None, None, :].expand(b, n, h)
        return sink if real is None else torch.where(real[:, :, None], sink, lse)

    def _cross(self, q, k, v, groups, kv_groups, plan, scale, return_lse):
        """A call whose keys are not the queries: the op with ``kv_grid`` and the group ids as
        its tables (the CPU executor on the exact mask)."""
        p = self.problem
        b, h, nq, _ = q.shape
        nk = k.shape[2]
        check_qkv(q, k, v, p, tokens=nq, kv_tokens=nk)
        scale = check_scale(scale, p.head_dim)
        check_return_lse(return_lse)
        if plan is not None:
            raise ValueError("plan= packs one set of tokens; with keys that are not the queries pass groups= (the "
                             "queries' ids) and kv_groups= (the keys') instead")
        if groups is None or kv_groups is None:
            missing = "groups" if groups is None else "kv_groups"
            raise ValueError(f"{self.pattern!r} with keys that are not the queries (Nq={nq}, Nk={nk}) needs groups= "
                             f"(the queries' ids, int [B, Nq] or [B, H, Nq]) and kv_groups= (the keys', [B, Nk] or "
                             f"[B, H, Nk]); {missing} is missing")
        g = check_groups(groups, b, h, nq, keep_device=True)
        kg = check_groups(kv_groups, b, h, nk, keep_device=True, name="kv_groups")
        backend = op_backend(p, self.backend, q)
        which = resolve_backend(backend, q.device)
        if which in ("triton", "interpret"):
            refuse_cross_on(which, repr(self))
        if not torch.compiler.is_compiling():
            call = Problem(grid=int(nq), kv_grid=int(nk), heads=p.heads, head_dim=p.head_dim, dtype=p.dtype,
                           kv_heads=p.kv_heads)
            check_cross(self.pattern, call)
        inner = self._inner(per_head=False)
        out, lse = torch.ops.sparseforge.attention(q.contiguous(), k.contiguous(), v.contiguous(),
                                                   [g.to(q.device).contiguous(), kg.to(q.device).contiguous()], [],
                                                   None, [nq], inner.kernel.key, float(scale), backend, [nk])
        return (out, lse) if return_lse else out


def split_grouped(pattern) -> tuple[Grouped, Pattern] | None:
    """``(grouped, static)`` when ``pattern`` is ``Grouped(...) & static parts`` (one Grouped,
    every other part static): the static pattern runs with the group ids as call data (a
    pair is allowed iff the static pattern allows it and both tokens share a group; a
    causal Grouped adds ``Causal()``). None for any other pattern."""
    if not isinstance(pattern, Intersection):
        return None
    grouped = [p for p in pattern.parts if isinstance(p, Grouped)]
    rest = [p for p in pattern.parts if not isinstance(p, Grouped)]
    if len(grouped) != 1 or not rest or not all(p.is_static for p in rest):
        return None
    static = rest + ([Causal()] if grouped[0].causal else [])
    return grouped[0], static[0] if len(static) == 1 else Intersection(static)


class GroupedStaticAttention:
    """``Grouped() & pattern`` with a static ``pattern`` (documents packed in one sequence, each
    under a sliding window; windows inside segments of an image): the static pattern's kernels
    with the group ids as call data, so only its own tiles are visited.

        attn = compile(Grouped() & SlidingWindow(256), Problem(grid=N, heads=H, head_dim=D))
        out = attn(q, k, v, groups=ids)                  # ids int [B, N]; negative: no group
        out = attn(q, k, v, groups=ids, key_padding_mask=real)   # or lengths=: padding too

    Runs on the CPU executor (the Triton kernels refuse group ids by name, for now)."""

    def __init__(self, pattern: Pattern, problem: Problem, *, backend=None, q_tile=None, k_tile=None, config=None,
                 modifiers=None, head_scale: bool = False):
        split = split_grouped(pattern)
        if split is None:
            raise ValueError(f"{pattern!r} is not Grouped(...) & static patterns")
        self.declared = pattern
        self.grouped, static = split
        if problem.is_cross:
            raise ValueError(f"{pattern!r} with kv_grid: group ids with a static pattern take one set of tokens")
        config = KernelConfig(q_tile=q_tile, k_tile=k_tile) if config is None else config
        self.inner = CompiledAttention(STATIC.build(static, problem, config), backend, config, modifiers=modifiers,
                                       head_scale=head_scale)
        self.problem, self.backend = problem, backend

    @property
    def pattern(self) -> Pattern:
        return self.declared

    def __repr__(self) -> str:
        return f"GroupedStaticAttention({self.declared!r}, {self.problem!r}, backend={self.backend!r})"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, groups: torch.Tensor, scale=None,
                 return_lse: bool = False, modifiers=None, key_padding_mask=None, lengths=None,
                 padding_side: str = "right", grid=None):
        """out [B, H, N, D] (and the LSE) of q, k, v with ``groups`` int [B, N] (one grouping
        for every head; negative: no group, an empty row: zeros, LSE -inf or the sink); padding
        (``key_padding_mask`` bool [B, N] or ``lengths`` [B], 1-D) removes tokens (zeros, LSE -inf)."""
        check_return_lse(return_lse)
        b, _, n, _ = q.shape
        ids = check_groups(groups, b, self.problem.heads, n, keep_device=True)
        if ids.shape[1] != 1:
            raise NotImplementedError(f"groups of shape {tuple(groups.shape)}: per-head group ids with a static pattern "
                                      f"({self.declared!r}) are not supported; give one grouping [B, N] for every head")
        ids = ids[:, 0].to(device=q.device).clamp_min(-1).to(torch.int32)   # negative: no group (-1)
        args = list(self.inner.op_inputs(q.contiguous(), k.contiguous(), v.contiguous(), scale=scale,
                                         modifiers=modifiers, grid=grid, key_padding_mask=key_padding_mask,
                                         lengths=lengths, padding_side=padding_side))
        padding = args[5]
        if padding is not None:   # the real tokens: a key padding mask, or one box per sample (lengths)
            real = _real_tokens(padding, n)
            ids = torch.where(real, ids, PADDED)
        args[5] = ids.contiguous()
        out, lse = self.inner.op(*args)
        return (out, lse) if return_lse else out


def _real_tokens(padding: torch.Tensor, n: int) -> torch.Tensor:
    """bool [B, N] real tokens of the ops' ``padding`` (``inputs.padding_input``): a key padding
    mask as it is, or the tokens inside each sample's 1-D box (int64 [B, 2, 1]: start, extent)."""
    if padding.dtype == torch.bool:
        return padding
    t = torch.arange(n, device=padding.device)
    start, extent = padding[:, 0, 0, None], padding[:, 1, 0, None]
    return (t >= start) & (t < start + extent)
