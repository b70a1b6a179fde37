"""``CompiledAttention``: one pattern, on one problem's heads, head dim and dtype, as calls of
the fixed ``sparseforge::attention`` ops (``runtime.ops``).

    attn = sf.compile(Neighborhood(7, dilation=2), Problem(grid=(56, 56), heads=8, head_dim=64))
    out = attn(q, k, v)                        # CUDA -> generated Triton, CPU -> CPU executor
    out, lse = attn(q, k, v, return_lse=True)  # lse: natural log, float32, -inf for empty rows
    out = attn(q2, k2, v2, grid=(64, 80))      # another grid: same op, a schedule built for it

    swin = sf.compile(Blocks(7, offset=3), problem, modifiers=(RelativePositionBias(table),), head_scale=True)
    out = swin(q, k, v, modifiers=(RelativePositionBias(table),), scale=logit_scale)   # [H] scale tensor
    out = attn(q, k, v, key_padding_mask=valid)       # bool [B, N]; or lengths=[B] (1-D), sizes=[B, ndim]

    routed = sf.compile(Routed(region_size=(8, 8), topk=4), Problem(grid=(64, 64), heads=8, head_dim=32))
    out = routed(q, k, v)                      # routing from q and k (detached), as the reference
    out = routed(q, k, v, routes=idx)          # or given: int [B, (H,) R, topk]

    voxels = sf.compile(Scattered(window_size=(12, 12, 1), shift=(6, 6, 0)), Problem(heads=4, head_dim=32))
    out = voxels(q, k, v, coords=coords)       # q, k, v [N_voxels, H, D]; coords int [N, 1 + ndim]
    plan = voxels.plan(coords)                 # the window grouping, reusable across calls/layers
    out = voxels(q, k, v, plan=plan)

Each call passes the path's per-call tables (``lower.paths``: none, the routes, or a plan's
tensors), the modifiers' tensors and per-head scale (``dsl.modifiers.modifier_tensors``), the
padding as a tensor, and the call's grid to the ops; a grid met for the first time gets its schedule
built and cached, never a new op. Scattered voxels are permuted into window order (and back)
around the op with differentiable torch indexing.
"""
from __future__ import annotations

import dataclasses

import torch

from ..codegen.config import KERNELS, KernelConfig
from ..dsl.pattern import Pattern
from ..dsl.problem import Problem
from ..lower.paths import SEGMENTS, path_of
from ..lower.routed import routes_for
from ..lower.segments import ScatteredPlan, pack, plan as make_plan, unpack
from . import ops
from ..backends.cpu import compute_dtype
from ..dsl.modifiers import Modifiers, modifier_tensors
from .inputs import check_backend, check_call_grid, check_call_modifiers, check_call_scale, check_qkv, \
    check_return_lse, check_voxel_qkv, op_backend, padding_input

__all__ = ["CompiledAttention", "SOURCE_KINDS", "UnsupportedPatternError"]

SOURCE_KINDS = KERNELS  # one generated module per kernel: "fwd", "bwd_dq", "bwd_dkdv"


class UnsupportedPatternError(NotImplementedError, ValueError):
    """A pattern that has no compiled kernels yet (content-dependent families)."""


class CompiledAttention:
    """Attention under one pattern, as calls of the ``sparseforge::attention`` ops.

    Call it with q [B, H, N, D] and k, v [B, kv_heads, N, D]; it returns out [B, H, N, D]
    (and the natural-log LSE [B, H, N] with ``return_lse=True``). Differentiable, and
    traceable by ``torch.compile`` without graph breaks, also with dynamic shapes.
    """

    def __init__(self, schedule, backend: str | None = None, config: KernelConfig | None = None, *,
                 tuning=None, build=None, modifiers: Modifiers | None = None, head_scale: bool = False):
        check_backend(backend)
        self.schedule = schedule
        self.pattern: Pattern = schedule.pattern
        self.problem: Problem = schedule.problem
        self.backend = backend
        self.path = path_of(self.pattern)
        geom = schedule.geometry  # the schedule's tiles are the ones that run
        self.config = dataclasses.replace((KernelConfig() if config is None else config).resolved(self.problem,
                                                                                                 self.pattern),
                                          q_tile=geom.q_tile, k_tile=geom.k_tile)
        self.tuning = tuning  # autotune.TuningResult when compiled with autotune=True
        self.build = build    # runtime.builddir.Build when loaded from a build directory
        #: the checked modifiers of the compile (their structure is what calls must match)
        self.modifiers: Modifiers | None = modifiers if modifiers else None
        #: calls pass ``scale=`` as a [heads] tensor
        self.head_scale = head_scale
        self.kernel = ops.register(self.path, schedule, self.config, self.modifiers, head_scale)
        tag = self.config.kernel_tag(self.problem, self.pattern)
        #: readable name of this schedule and config (build directories, logs)
        self.name: str = schedule.name + (f"_{tag}" if tag else "")

    @property
    def modifier_spec(self) -> tuple:
        """``dsl.modifiers.modifier_spec`` of the compile (``()`` without modifiers)."""
        return self.kernel.spec

    @property
    def op(self):
        """``torch.ops.sparseforge.attention``: the forward op every compiled attention calls."""
        return torch.ops.sparseforge.attention

    @property
    def backward_op(self):
        return torch.ops.sparseforge.attention_backward

    def source(self, kind: str = "fwd") -> str:
        """The generated Triton source of kernel ``kind``: "fwd", "bwd_dq" or "bwd_dkdv".
        Works without a GPU."""
        if kind not in SOURCE_KINDS:
            raise ValueError(f"kind must be one of {list(SOURCE_KINDS)}, got {kind!r}")
        return self.kernel.triton(self.problem.grid, False).source(kind)

    def kernels(self, interpret: bool = False):
        """The ``backends.triton.TritonKernels`` of the compiled grid."""
        return self.kernel.triton(self.problem.grid, interpret)

    def __repr__(self) -> str:
        return (f"CompiledAttention({self.pattern!r}, {self.problem!r}, backend={self.backend!r}, "
                f"name={self.name!r})")

    # -- calling ------------------------------------------------------------------------
    def plan(self, coords: torch.Tensor) -> ScatteredPlan:
        """The window grouping of voxel ``coords`` (int [N, 1 + ndim], batch first) for a
        ``Scattered`` pattern: a ``lower.segments.ScatteredPlan`` to pass as ``plan=`` to
        calls (and layers with the same windows); built on coords' device with torch ops."""
        if self.path is not SEGMENTS:
            raise ValueError(f"plan() is only for Scattered patterns; {self.pattern!r} takes no coords")
        return make_plan(self.schedule, coords)

    def _check_plan(self, coords, plan) -> ScatteredPlan:
        if (coords is None) == (plan is None):
            raise ValueError(f"{self.pattern!r} needs the voxel coordinates: pass exactly one of coords= "
                             "(int [N, 1 + ndim], batch first) or plan= (attn.plan(coords))")
        if plan is None:
            return self.plan(coords)
        if not isinstance(plan, ScatteredPlan):
            raise TypeError(f"plan must be a ScatteredPlan from attn.plan(coords), got {type(plan).__name__}")
        if plan.pattern != self.pattern or plan.layout != self.schedule.scattered:
            raise ValueError(f"plan was made for {plan.pattern!r} with tiles {plan.layout}, not for this op "
                             f"({self.pattern!r}, {self.schedule.scattered}); make it with this op's plan()")
        return plan

    def op_inputs(self, q, k, v, *, scale=None, routes=None, plan=None, grid=None, modifiers=None,
                  key_padding_mask=None, lengths=None, padding_side: str = "right", sizes=None) -> tuple:
        """The arguments of ``torch.ops.sparseforge.attention`` for this call, checked (q, k,
        v in the op's [B, H, N, D] layout: a Scattered pattern's packed sequence)."""
        backend = op_backend(self.problem, self.backend, q)
        scale = check_call_scale(scale, self.head_scale, self.problem, q.device)
        mods = check_call_modifiers(modifiers, self.modifiers, self.pattern, self.problem, q.device)
        head_scale = None
        if isinstance(scale, torch.Tensor):
            head_scale, scale = scale.to(compute_dtype(q.dtype)).contiguous(), 1.0  # the tensor replaces it
        params = [t.contiguous() for t in modifier_tensors(mods, head_scale)]
        if self.path is SEGMENTS:
            padding_input(self.pattern, self.problem, (plan.n_pad,), q, mods, key_padding_mask=key_padding_mask,
                          lengths=lengths, padding_side=padding_side, sizes=sizes, grid_free=True)
            return (q, k, v, plan.tensors(), params, None, [plan.n_pad], self.kernel.key, scale, backend)
        grid = check_call_grid(self.problem, grid, q)
        padding = padding_input(self.pattern, self.problem, tuple(grid), q, mods, key_padding_mask=key_padding_mask,
                                lengths=lengths, padding_side=padding_side, sizes=sizes, routes=routes,
                                routed=self.path.batched_head_groups)
        tables = [] if routes is None else [routes]
        return (q, k, v, tables, params, padding, list(grid), self.kernel.key, scale, backend)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale=None,
                 return_lse: bool = False, routes: torch.Tensor | None = None, coords: torch.Tensor | None = None,
                 plan=None, grid=None, modifiers=None, key_padding_mask: torch.Tensor | None = None, lengths=None,
                 padding_side: str = "right", sizes=None):
        """Attention of q, k, v.

        scale:  a float (default head_dim ** -0.5), or a [heads] tensor when compiled with
                ``head_scale=True`` (one scale per query head; it receives a gradient).
        modifiers: the score modifiers of this call (``RelativePositionBias``, ``T5Bias``,
                ``ALiBi``, ``Softcap``, ``Sinks``), holding this call's tensors: the same kinds in
                the same order, shapes, dtypes and softcap as compiled (a ValueError otherwise);
                their tensors receive gradients.
        key_padding_mask: bool [B, N], True = real token: pairs with a padded key or query are
                removed (positions stay those of the full grid); padded rows output zeros.
        lengths: ints [B] (1-D grids): sample b is its first (``padding_side="right"``) or last
                (``"left"``) ``lengths[b]`` tokens, attended as a sequence of that length.
        sizes:  ints [B, ndim]: sample b is the leading ``sizes[b]`` box of the grid, attended as
                a grid of that extent (windows clamped at its own border).
                Padding runs on the CPU executor (NotImplementedError on the Triton backends).
        grid:   the token grid of this call when it is not the compiled one (a 1-D problem
                takes it from q's length); the op and kernels stay, the schedule is built
                for the grid on first use.
        routes: ``Routed`` only: int [B, (H,) R, topk], replaces the routing computed from q
                and k (``dsl.content.check_routes`` checks it).
        ``Scattered``: q [N, H, D], k/v [N, kv_heads, D] in voxel order and either ``coords``
        (int [N, 1 + ndim], batch first) or ``plan`` (``self.plan(coords)``); out [N, H, D],
        lse [N, H]."""
        check_return_lse(return_lse)
        extra = dict(modifiers=modifiers, key_padding_mask=key_padding_mask, lengths=lengths,
                     padding_side=padding_side, sizes=sizes)
        if self.path is SEGMENTS:
            if routes is not None:
                raise ValueError(f"routes is only for Routed patterns; {self.pattern!r} takes coords= or plan=")
            if grid is not None:
                raise ValueError(f"grid is not for Scattered patterns (the voxels come with coords); "
                                 f"{self.pattern!r} takes coords= or plan=")
            plan = self._check_plan(coords, plan)
            check_voxel_qkv(q, k, v, self.problem, plan.n_voxels)
            if plan.device != q.device:
                raise ValueError(f"plan (coords) is on {plan.device} but q is on {q.device}")
            packed = [pack(t, plan.order, plan.n_pad) for t in (q, k, v)]
            out, lse = self.op(*self.op_inputs(*packed, scale=scale, plan=plan, **extra))
            out, lse = unpack(out, plan.order, plan.n_voxels), unpack(lse, plan.order, plan.n_voxels)
            return (out, lse) if return_lse else out
        if coords is not None or plan is not None:
            raise ValueError(f"coords= and plan= are only for Scattered patterns; {self.pattern!r} takes neither")
        if not isinstance(q, torch.Tensor) or q.dim() != 4:
            check_qkv(q, k, v, self.problem)  # raises the error that names q
        grid = check_call_grid(self.problem, grid, q)
        check_qkv(q, k, v, self.problem, tokens=q.shape[2])
        if self.path.batched_head_groups:  # routed
            if routes is None and (lengths is not None or sizes is not None or key_padding_mask is not None):
                padding_input(self.pattern, self.problem, tuple(grid), q, None, routed=True, **{
                    name: value for name, value in extra.items() if name != "modifiers"})  # raises its refusal
            problem = self.problem if tuple(grid) == self.problem.grid else dataclasses.replace(self.problem,
                                                                                             grid=tuple(grid))
            routes = routes_for(self.pattern, problem, q, k, routes)
        elif routes is not None:
            raise ValueError(f"routes is only for Routed patterns; {self.pattern!r} takes none")
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = self.op(*self.op_inputs(q, k, v, scale=scale, routes=routes, grid=grid, **extra))
        return (out, lse) if return_lse else out
