"""``CompiledAttention``: one pattern, on one problem's heads, head dim and dtype, as calls of
the fixed ``sparseforge::attention`` ops (``runtime.ops``).

    attn = sf.compile(Neighborhood(7, dilation=2), Problem(grid=(56, 56), heads=8, head_dim=64))
    out = attn(q, k, v)                        # CUDA -> generated Triton, CPU -> CPU executor
    out, lse = attn(q, k, v, return_lse=True)  # lse: natural log, float32, -inf for empty rows
    out = attn(q2, k2, v2, grid=(64, 80))      # another grid: same op, a schedule built for it

    dec = sf.compile(Causal() & SlidingWindow(4096), Problem(grid=1, kv_grid=8192, heads=32, head_dim=128))
    out = dec(q, k_cache, v_cache)             # q [B, H, Nq, D], k/v [B, KVH, Nk, D]: Nq, Nk from the tensors
    pooled = sf.compile(Neighborhood(3), Problem(grid=(56, 56), kv_grid=(7, 7)))   # keys on a grid of their own
    out = pooled(q, k, v, kv_grid=(14, 14))    # another key grid

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

Keys on a grid of their own (``Problem.kv_grid``; 1-D: k's length differs from q's) run the
CPU executor on the exact mask (``runtime.ops``, ``kv_grid`` argument); on the Triton backends
a 1-D decode's forward runs the decode kernel (``attn.paged(q, cache)`` reads a paged cache),
and the rest is refused (``CrossGridsNotImplementedError``).

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
from ..dsl.semantics import check_cross, check_cross_extras, check_key_padding_mask
from .inputs import check_backend, check_call_grid, check_call_kv_grid, check_call_modifiers, check_call_scale, \
    check_qkv, check_return_lse, check_voxel_qkv, op_backend, padding_input
from .ops import refuse_cross_on, resolve_backend
from .paged import paged_attention

__all__ = ["CompiledAttention", "SOURCE_KINDS", "UnsupportedPatternError"]

SOURCE_KINDS = KERNELS  # one generated module per kernel: "fwd", "bwd_dq", "bwd_dkdv"


class UnsupportedPatternError(NotImplementedError, ValueError):
    """A pattern that has no compiled kernels yet (content-dependent families)."""


class CompiledAttention:
    """Attention under one pattern, as calls of the ``sparseforge::attention`` ops.

    Call it with q [B, H, N, D] and k, v [B, kv_heads, N, D]; it returns out [B, H, N, D]
    (and the natural-log LSE [B, H, N] with ``return_lse=True``). Differentiable, and
    traceable by ``torch.compile`` without graph breaks, also with dynamic shapes.

    ``problem`` (default: the schedule's) is the compiled problem; one with a ``kv_grid`` has
    its schedule built on the key grid (``Problem.on_key_grid``), which calls whose keys share
    the queries' grid run.
    """

    def __init__(self, schedule, backend: str | None = None, config: KernelConfig | None = None, *,
                 tuning=None, build=None, modifiers: Modifiers | None = None, head_scale: bool = False,
                 problem: Problem | None = None):
        check_backend(backend)
        self.schedule = schedule
        self.pattern: Pattern = schedule.pattern
        self.problem: Problem = schedule.problem if problem is None else problem
        self.backend = backend
        self.path = path_of(self.pattern)
        geom = schedule.geometry  # the schedule's tiles are the ones that run
        self.config = dataclasses.replace((KernelConfig() if config is None else config).resolved(schedule.problem,
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
        return self.kernel.triton(self.schedule.problem.grid, False).source(kind)

    def kernels(self, interpret: bool = False):
        """The ``backends.triton.TritonKernels`` of the compiled grid."""
        if self.problem.is_cross:
            refuse_cross_on("interpret" if interpret else "triton", repr(self))
        return self.kernel.triton(self.schedule.problem.grid, interpret)

    def paged(self, q: torch.Tensor, cache, *, scale=None, modifiers=None, return_lse: bool = False):
        """Decode over a paged KV cache (``sf.PagedKV``: vLLM/FlashInfer's pages, block table and
        cache lengths): q [B, H, Nq, D] at the last Nq positions of each sample's cache; out
        [B, H, Nq, D] (and the LSE). A GPU reads only the pages holding allowed keys, with no host
        synchronisation (``runtime.paged``)."""
        return paged_attention(self, q, cache, scale=scale, modifiers=modifiers, return_lse=return_lse)

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
                  key_padding_mask=None, lengths=None, padding_side: str = "right", sizes=None,
                  kv_grid=None) -> tuple:
        """The arguments of ``torch.ops.sparseforge.attention`` for this call, checked (q, k,
        v in the op's [B, H, N, D] layout: a Scattered pattern's packed sequence). ``kv_grid``:
        the keys' grid when they have one of their own (``check_call_kv_grid``)."""
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
        if kv_grid is not None:
            self._check_cross_call(q, tuple(grid), tuple(kv_grid), backend, modifiers=modifiers,
                                   key_padding_mask=key_padding_mask, lengths=lengths, sizes=sizes)
            if key_padding_mask is not None:  # over the keys: bool [B, Nk]
                key_padding_mask = check_key_padding_mask(key_padding_mask, q.shape[0], k.shape[2], q.device)
            return (q, k, v, [], params, key_padding_mask, list(grid), self.kernel.key, scale, backend,
                    list(kv_grid))
        padding = padding_input(self.pattern, self.problem, tuple(grid), q, mods, key_padding_mask=key_padding_mask,
                                lengths=lengths, padding_side=padding_side, sizes=sizes, routes=routes,
                                routed=self.path.batched_head_groups)
        tables = [] if routes is None else [routes]
        return (q, k, v, tables, params, padding, list(grid), self.kernel.key, scale, backend)

    def _check_cross_call(self, q, grid: tuple, kv_grid: tuple, backend: str, *, modifiers=None, key_padding_mask=None,
                          lengths=None, sizes=None) -> None:
        """Refuse what a call with keys on ``kv_grid`` does not take: the Triton backends
        (``CrossGridsNotImplementedError``), content routing, bias modifiers, ``lengths``/``sizes``
        (a ``key_padding_mask`` over the keys is taken); and, where
        the sizes are known (outside ``torch.compile`` tracing), a pattern the two grids do not
        define (``dsl.semantics.check_cross``)."""
        which = resolve_backend(backend, q.device)
        if self.path.batched_head_groups:
            raise ValueError(f"{self.pattern!r} routes regions of one grid: k must have q's {q.shape[2]} tokens "
                             f"(keys on a grid of their own, kv_grid={kv_grid}, are not defined for it)")
        if torch.compiler.is_compiling():
            return   # the op refuses what the decode kernel does not run
        p = self.problem
        call = Problem(grid=tuple(int(g) for g in grid), kv_grid=tuple(int(g) for g in kv_grid), heads=p.heads,
                       head_dim=p.head_dim, dtype=p.dtype, kv_heads=p.kv_heads)
        if which in ("triton", "interpret") and not self.kernel.decodes(call):
            refuse_cross_on(which, repr(self))
        if call.is_cross or p.is_cross:
            check_cross_extras(call if call.is_cross else p, modifiers, key_padding_mask=key_padding_mask,
                               lengths=lengths, sizes=sizes)
        if call.is_cross:
            check_cross(self.pattern, call)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale=None,
                 return_lse: bool = False, routes: torch.Tensor | None = None, coords: torch.Tensor | None = None,
                 plan=None, grid=None, modifiers=None, key_padding_mask: torch.Tensor | None = None, lengths=None,
                 padding_side: str = "right", sizes=None, kv_grid=None):
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
        kv_grid: the keys' grid of this call, when k does not have q's grid: default, for a
                1-D problem, k's length (decode and chunked prefill: the queries are the last
                Nq positions of the Nk keys), else the compiled ``kv_grid``. Queries are placed
                on it as ``dsl.problem.placement`` says; k/v are [B, kv_heads, Nk, D]. Runs on
                the CPU executor, and a 1-D decode's forward on the decode kernel (GPU,
                interpreter); bias terms measure on the key grid; ``key_padding_mask`` is then
                bool [B, Nk] over the keys (decode over a left-padded cache: a 1-D query row is
                padding where its key position is), no ``lengths``/``sizes``.
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
        if not isinstance(k, torch.Tensor) or k.dim() != 4:
            check_qkv(q, k, v, self.problem, tokens=q.shape[2])  # raises the error that names k
        grid = check_call_grid(self.problem, grid, q)
        kv_grid = check_call_kv_grid(self.problem, tuple(grid), kv_grid, k)
        if kv_grid is not None and tuple(kv_grid) == tuple(grid):
            kv_grid = None  # keys on the queries' grid (a decode compile's prefill): self attention
        check_qkv(q, k, v, self.problem, tokens=q.shape[2], kv_tokens=q.shape[2] if kv_grid is None else k.shape[2])
        extra["kv_grid"] = kv_grid
        if kv_grid is not None:
            if routes is not None:
                raise ValueError(f"routes is only for Routed patterns on one grid; this call has keys on "
                                 f"kv_grid={tuple(kv_grid)}")
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            out, lse = self.op(*self.op_inputs(q, k, v, scale=scale, grid=grid, **extra))
            return (out, lse) if return_lse else out
        if self.path.batched_head_groups:  # routed
            if routes is None and (lengths is not None or sizes is not None or key_padding_mask is not None):
                padding_input(self.pattern, self.problem, tuple(grid), q, None, routed=True, **{
                    name: value for name, value in extra.items() if name not in ("modifiers", "kv_grid")})  # raises its refusal
            problem = self.problem if tuple(grid) == self.problem.grid else dataclasses.replace(self.problem,
                                                                                             grid=tuple(grid))
            routes = routes_for(self.pattern, problem, q, k, routes)
        elif routes is not None:
            raise ValueError(f"routes is only for Routed patterns; {self.pattern!r} takes none")
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = self.op(*self.op_inputs(q, k, v, scale=scale, routes=routes, grid=grid, **extra))
        return (out, lse) if return_lse else out
