"""``compile(pattern, problem)``: a pattern turned into a callable attention op.

    attn = compile(Neighborhood(7, dilation=2), Problem(grid=(56, 56), heads=8, head_dim=64))
    out = attn(q, k, v)                        # CUDA -> generated Triton, CPU -> CPU executor
    out, lse = attn(q, k, v, return_lse=True)  # lse: natural log, float32, -inf for empty rows

    routed = compile(Routed(region_size=(8, 8), topk=4), Problem(grid=(64, 64), heads=8, head_dim=32))
    out = routed(q, k, v)                      # routing from q and k (detached), as the reference
    out = routed(q, k, v, routes=idx)          # or given: int [B, (H,) R, topk]

    voxels = compile(Scattered(window_size=(12, 12, 1), shift=(6, 6, 0)), Problem(heads=4, head_dim=32))
    out = voxels(q, k, v, coords=coords)       # q, k, v [N_voxels, H, D]; coords int [N, 1 + ndim]
    plan = voxels.plan(coords)                 # the window grouping, reusable across calls/layers
    out = voxels(q, k, v, plan=plan)

    lin = compile(Scattered(window_size=(12, 12, 1)), problem, attention="linear",  # ScatterFormer
                  feature_map="elu+1", neighbor_pooling=True)  # -> runtime.linear_attention.ScatteredLinearAttention
    out = lin(q, k, v, coords=coords)          # or plan=lin.plan(coords); no LSE (no softmax)

Routed attention (``dsl.content.Routed``) runs region-aligned tiles whose index tables are
built per call from the routes (``lower.routed``); scattered voxel windows
(``dsl.content.Scattered``) run on the window-sorted packed sequence with tables built per
plan (``lower.segments``); ``dsl.content.Grouped`` (run-time group ids) runs on those same
scattered kernels (``runtime.grouped.GroupedAttention``: ``attn(q, k, v, groups=ids)``, causal
or not); other content-dependent patterns raise ``UnsupportedPatternError``.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import typing

import torch

from ..dsl.pattern import Pattern
from ..dsl.problem import DTYPE_NAMES, Problem
from ..dsl.semantics import check_pattern_problem, check_qkv
from ..codegen.config import KernelConfig
from . import op as _op

if typing.TYPE_CHECKING:
    from .grouped import GroupedAttention
    from .linear_attention import ScatteredLinearAttention

__all__ = ["BACKENDS", "CompiledAttention", "TRITON_HEAD_DIMS", "UnsupportedPatternError", "compile"]

#: Values of ``compile(..., backend=)``.
BACKENDS = (None, "triton", "cpu", "interpret")
#: Head dims the generated Triton kernels support.
TRITON_HEAD_DIMS = (16, 32, 64, 96, 128, 256)
#: Input dtypes the generated Triton kernels support.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SOURCE_KINDS = ("fwd", "bwd")
#: Values of ``compile(..., attention=)``.
ATTENTIONS = ("softmax", "linear")


class UnsupportedPatternError(NotImplementedError, ValueError):
    """A pattern that has no compiled kernels yet (content-dependent families)."""


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")


def check_triton_problem(problem: Problem, backend: str) -> None:
    """Refuse problems the generated kernels (or the Triton interpreter) cannot run right."""
    if backend == "interpret" and problem.dtype == torch.bfloat16:
        # Triton 3.9's interpreter keeps bf16 as uint16 and tl.dot multiplies the raw bit
        # patterns (triton-lang/triton#11584): the results would be silently wrong.
        raise ValueError("dtype=bf16 cannot run under backend='interpret': the Triton interpreter's tl.dot "
                         "multiplies bfloat16 bit patterns (triton-lang/triton#11584); use fp16/fp32 there, "
                         "backend='cpu', or a GPU")
    if problem.head_dim not in TRITON_HEAD_DIMS:
        raise ValueError(f"head_dim={problem.head_dim} is not supported by backend={backend!r}; "
                         f"supported head dims: {list(TRITON_HEAD_DIMS)} (backend='cpu' takes any)")
    if problem.dtype not in TRITON_DTYPES:
        raise ValueError(f"dtype={problem.dtype} is not supported by backend={backend!r}; supported: "
                         f"{[DTYPE_NAMES[d] for d in TRITON_DTYPES]} (backend='cpu' takes float64 too)")


def compile(pattern: Pattern, problem: Problem, *, backend: str | None = None, q_tile=None, k_tile=None,
            config: KernelConfig | None = None, autotune: bool = False, target=None, attention: str = "softmax",
            feature_map: str | None = None,
            neighbor_pooling: bool | None = None) -> "CompiledAttention | ScatteredLinearAttention | GroupedAttention":
    """Lower ``pattern`` on ``problem`` to a tile schedule and wrap it as a torch op.

    backend:  None (CUDA tensors -> generated Triton kernels, CPU tensors -> the CPU
              executor), "triton", "cpu" or "interpret" (Triton kernels under the Triton
              interpreter, on CPU tensors).
    q_tile, k_tile: tile shapes (one extent per grid dimension); default chosen per grid.
    config:   a full ``KernelConfig`` (tiles, loop bounds, launches) instead of q_tile/k_tile.
    autotune: take the config from the tuning database, tuning first if it has none
              (``sparseforge.autotune.tune``: timed on a GPU of the target, predicted by the
              cost model otherwise); ``target`` ("sm_80", "sm_90", ...) as in ``tune``.
    attention: "softmax" (default) or "linear": ScatterFormer's scattered linear attention,
              ``Scattered`` patterns only, returning a ``runtime.linear_attention.ScatteredLinearAttention``
              (Triton kernels on CUDA, torch ops on CPU); ``feature_map`` ("relu" default, or "elu+1") and
              ``neighbor_pooling`` (bool, default False) apply to it only.
    """
    check_pattern_problem(pattern, problem)
    check_backend(backend)
    from ..dsl.content import Routed, Scattered

    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {list(ATTENTIONS)}, got {attention!r}")
    if attention == "linear" or feature_map is not None or neighbor_pooling is not None:
        if not isinstance(pattern, Scattered):
            given = "attention='linear'" if attention == "linear" else \
                ("feature_map" if feature_map is not None else "neighbor_pooling")
            raise ValueError(f"{given} is only for Scattered patterns (scattered linear attention), "
                             f"got {pattern!r}")
        if attention != "linear":
            given = "feature_map" if feature_map is not None else "neighbor_pooling"
            raise ValueError(f"{given} is only for attention='linear', got attention={attention!r}")
        return compile_linear(pattern, problem, backend=backend, q_tile=q_tile, k_tile=k_tile, config=config,
                              autotune=autotune, target=target, feature_map=feature_map,
                              neighbor_pooling=neighbor_pooling)

    from ..dsl.content import Grouped

    if isinstance(pattern, Grouped):
        return compile_grouped(pattern, problem, backend=backend, q_tile=q_tile, k_tile=k_tile, config=config,
                               autotune=autotune, target=target)
    routed = isinstance(pattern, Routed)
    scattered = isinstance(pattern, Scattered)
    if not pattern.is_static and not routed and not scattered:
        raise UnsupportedPatternError(
            f"{pattern!r} depends on run-time content ({', '.join(sorted(pattern.inputs_needed()))}); "
            "of the content-dependent patterns only a Routed or a Scattered pattern on its own compiles so far "
            "(and a Grouped one) — "
            "use sparseforge.reference_attention for the others meanwhile")
    if scattered:
        _check_voxel_problem(pattern, problem)
    if problem.grid is None and not scattered:
        raise ValueError(f"problem has no grid ({problem!r}); compiling a static pattern needs Problem(grid=...)")
    _check_kernel_options(problem, backend, config, q_tile, k_tile)
    if autotune and (config is not None or q_tile is not None or k_tile is not None):
        raise ValueError("autotune=True chooses the tiles and launches; do not also give config, q_tile or k_tile")
    if target is not None and not autotune:
        raise ValueError("target is the autotuner's target; it needs autotune=True")
    if scattered and autotune:
        raise UnsupportedPatternError(f"autotune=True is not supported for {pattern!r}: its tile tables depend on "
                                      "the voxel coordinates, known only at call time; give q_tile/k_tile or a "
                                      "config")
    tuning = None
    if autotune:
        from ..autotune import tune

        tuning = tune(pattern, problem, target=target)
        config = tuning.config
    elif config is None:
        config = KernelConfig(q_tile=q_tile, k_tile=k_tile)
    return CompiledAttention(schedule_for(pattern, problem, config), backend, config, tuning=tuning)


def _check_kernel_options(problem: Problem, backend, config, q_tile, k_tile) -> None:
    """The checks every kernel-backed compile shares: the problem against the backend, and
    config vs q_tile/k_tile."""
    if backend in ("triton", "interpret"):
        check_triton_problem(problem, backend)
    if config is not None and not isinstance(config, KernelConfig):
        raise TypeError(f"config must be a sparseforge KernelConfig, got {config!r}")
    if config is not None and (q_tile is not None or k_tile is not None):
        raise ValueError("give either config or q_tile/k_tile, not both (the config holds the tiles)")


def _check_voxel_problem(pattern, problem: Problem) -> None:
    if problem.grid is not None:
        raise ValueError(f"{pattern!r} takes its voxels from coords at call time: give Problem(grid=None), "
                         f"got grid={problem.grid}")


def compile_grouped(pattern, problem: Problem, *, backend, q_tile, k_tile, config, autotune, target):
    """``compile(Grouped(...), problem)``: checks, then a ``runtime.grouped.GroupedAttention``."""
    from .grouped import GroupedAttention

    if problem.grid is None:
        raise ValueError(f"{pattern!r} needs the number of tokens: give Problem(grid=N), got {problem!r}")
    if autotune or target is not None:
        raise UnsupportedPatternError(f"autotune=True is not supported for {pattern!r}: its tile tables depend on "
                                      "the group ids, known only at call time; give q_tile/k_tile or a config")
    _check_kernel_options(problem, backend, config, q_tile, k_tile)
    return GroupedAttention(pattern, problem, backend=backend, q_tile=q_tile, k_tile=k_tile, config=config)


def compile_linear(pattern, problem: Problem, *, backend, q_tile, k_tile, config, autotune, target, feature_map,
                   neighbor_pooling):
    """``compile(..., attention="linear")``: checks, then a ``ScatteredLinearAttention``."""
    from .linear_attention import ScatteredLinearAttention, check_linear_backend

    _check_voxel_problem(pattern, problem)
    check_linear_backend(problem, backend)  # None/"cpu": torch ops on CPU; "triton"/"interpret": kernels
    for name, value in (("q_tile", q_tile), ("k_tile", k_tile), ("config", config), ("target", target)):
        if value is not None:
            raise ValueError(f"{name} is not used by attention='linear' (its kernels take no tile config); "
                             "leave it None")
    if autotune:
        raise ValueError("autotune=True is not available for attention='linear' (its kernels have fixed "
                         "launches per head dim)")
    return ScatteredLinearAttention(pattern, problem, backend=backend,
                                    feature_map="relu" if feature_map is None else feature_map,
                                    neighbor_pooling=False if neighbor_pooling is None else neighbor_pooling)


def schedule_for(pattern: Pattern, problem: Problem, config: KernelConfig):
    """The TileSchedule that ``config``'s tiles give ``pattern`` on ``problem`` (what
    ``compile`` and ``load`` both build)."""
    from ..dsl.content import Routed, Scattered

    if isinstance(pattern, Scattered):
        from ..lower.segments import build_scattered_schedule

        return build_scattered_schedule(pattern, problem, q_tile=config.q_tile, k_tile=config.k_tile)
    if isinstance(pattern, Routed):
        from ..lower.routed import build_routed_schedule

        # Region-aligned tiles: the defaults come from the region, not the grid.
        return build_routed_schedule(pattern, problem, q_tile=config.q_tile, k_tile=config.k_tile)
    from ..lower.schedule import build_schedule

    config = config.resolved(problem)
    return build_schedule(pattern, problem, q_tile=config.q_tile, k_tile=config.k_tile,
                          closed_form=config.closed_form)


def check_voxel_qkv(q, k, v, problem: Problem, n_voxels: int) -> None:
    """Check q [N, H, D], k/v [N, kv_heads, D] (voxel layout) against ``problem`` and the N
    voxels of the coordinates; errors name the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape [N_voxels, H, D] (voxel layout), got {tuple(t.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t, heads in (("q", q, problem.heads), ("k", k, problem.kv_heads), ("v", v, problem.kv_heads)):
        expected = (n_voxels, heads, problem.head_dim)
        if tuple(t.shape) != expected:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {expected} [N_voxels (rows of coords), "
                             f"{'H' if name == 'q' else 'kv_heads'}, D] for {problem!r}")


class CompiledAttention:
    """Attention under one pattern on one problem, as a torch custom op.

    Call it with q [B, H, N, D] and k, v [B, kv_heads, N, D]; it returns out [B, H, N, D]
    (and the natural-log LSE [B, H, N] with ``return_lse=True``). Differentiable, and
    traceable by ``torch.compile`` without graph breaks.
    """

    def __init__(self, schedule, backend: str | None = None, config: KernelConfig | None = None, *,
                 tuning=None, build=None):
        check_backend(backend)
        self.schedule = schedule
        self.pattern: Pattern = schedule.pattern
        self.problem: Problem = schedule.problem
        self.backend = backend
        geom = schedule.geometry  # the schedule's tiles are the ones that run
        self.config = dataclasses.replace((KernelConfig() if config is None else config).resolved(self.problem,
                                                                                                 self.pattern),
                                          q_tile=geom.q_tile, k_tile=geom.k_tile)
        self.tuning = tuning  # autotune.TuningResult when compiled with autotune=True
        self.build = build    # runtime.builddir.Build when loaded from a build directory
        self._entry = _op.register(schedule, config=self.config)
        self.name: str = self._entry.name

    @property
    def op(self):
        """``torch.ops.sparseforge.<name>``: (q, k, v, scale, backend) -> (out, lse)."""
        return self._entry.op

    @property
    def backward_op(self):
        return self._entry.backward_op

    def source(self, kind: str = "fwd") -> str:
        """The generated Triton source: ``kind`` is "fwd" or "bwd". Works without a GPU."""
        if kind not in SOURCE_KINDS:
            raise ValueError(f"kind must be one of {list(SOURCE_KINDS)}, got {kind!r}")
        return self._entry.kernels(False).source(kind)

    def __repr__(self) -> str:
        return (f"CompiledAttention({self.pattern!r}, {self.problem!r}, backend={self.backend!r}, "
                f"name={self.name!r})")

    # -- calling ------------------------------------------------------------------------
    def _scale(self, scale, return_lse) -> float:
        if scale is None:
            scale = self.problem.head_dim ** -0.5
        elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite real number, got {scale!r}")
        if not isinstance(return_lse, bool):
            raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
        return scale

    def _op_backend(self, q: torch.Tensor) -> str:
        """Check q's device/dtype against the backend; the backend string the op receives."""
        problem, backend, dev = self.problem, self.backend, q.device
        if dev.type not in ("cpu", "cuda", "meta"):
            raise ValueError(f"q is on device {dev}; sparseforge runs on 'cuda' and 'cpu' tensors")
        which = _op.resolve_backend("auto" if backend is None else backend, dev)
        if which == "cpu":
            allowed = (problem.dtype, torch.float64)
        else:
            check_triton_problem(problem, which)
            allowed = (problem.dtype,)
        if q.dtype not in allowed:
            extra = " (or float64 on the CPU path)" if which == "cpu" else ""
            raise TypeError(f"q has dtype {q.dtype}, expected {problem.dtype}{extra}, the dtype of {problem!r}")
        return "auto" if backend is None else backend

    def plan(self, coords: torch.Tensor):
        """The window grouping of voxel ``coords`` (int [N, 1 + ndim], batch first) for a
        ``Scattered`` pattern: a ``lower.segments.ScatteredPlan`` to pass as ``plan=`` to
        calls (and layers with the same windows); built on coords' device with torch ops."""
        if not self._entry.scattered:
            raise ValueError(f"plan() is only for Scattered patterns; {self.pattern!r} takes no coords")
        from ..lower.segments import plan

        return plan(self.schedule, coords)

    def _call_scattered(self, q, k, v, scale, return_lse, coords, plan):
        from ..lower.segments import ScatteredPlan

        if (coords is None) == (plan is None):
            raise ValueError(f"{self.pattern!r} needs the voxel coordinates: pass exactly one of coords= "
                             "(int [N, 1 + ndim], batch first) or plan= (attn.plan(coords))")
        if plan is None:
            plan = self.plan(coords)
        elif not isinstance(plan, ScatteredPlan):
            raise TypeError(f"plan must be a ScatteredPlan from attn.plan(coords), got {type(plan).__name__}")
        elif plan.pattern != self.pattern or plan.layout != self.schedule.scattered:
            raise ValueError(f"plan was made for {plan.pattern!r} with tiles {plan.layout}, not for this op "
                             f"({self.pattern!r}, {self.schedule.scattered}); make it with this op's plan()")
        check_voxel_qkv(q, k, v, self.problem, plan.n_voxels)
        if plan.device != q.device:
            raise ValueError(f"plan (coords) is on {plan.device} but q is on {q.device}")
        op_backend = self._op_backend(q)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = self._entry.op.default(q, k, v, plan.tensors(), float(scale), op_backend)
        return (out, lse) if return_lse else out

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                 return_lse: bool = False, routes: torch.Tensor | None = None, coords: torch.Tensor | None = None,
                 plan=None):
        """Attention of q, k, v; ``routes`` (``Routed`` only: int [B, (H,) R, topk]) replaces
        the routing computed from q and k (``dsl.content.check_routes`` checks it).

        ``Scattered``: q [N, H, D], k/v [N, kv_heads, D] in voxel order and either ``coords``
        (int [N, 1 + ndim], batch first) or ``plan`` (``self.plan(coords)``); out [N, H, D],
        lse [N, H]."""
        if self._entry.scattered:
            if routes is not None:
                raise ValueError(f"routes is only for Routed patterns; {self.pattern!r} takes coords= or plan=")
            scale = self._scale(scale, return_lse)
            return self._call_scattered(q, k, v, scale, return_lse, coords, plan)
        if coords is not None or plan is not None:
            raise ValueError(f"coords= and plan= are only for Scattered patterns; {self.pattern!r} takes neither")
        check_qkv(q, k, v, self.problem)
        op_backend = self._op_backend(q)
        scale = self._scale(scale, return_lse)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if self._entry.routed:
            from ..lower.routed import routes_for

            routes = routes_for(self.pattern, self.problem, q, k, routes)
            out, lse = self._entry.op.default(q, k, v, routes, float(scale), op_backend)
            return (out, lse) if return_lse else out
        if routes is not None:
            raise ValueError(f"routes is only for Routed patterns; {self.pattern!r} takes none")
        out, lse = self._entry.op.default(q, k, v, float(scale), op_backend)
        return (out, lse) if return_lse else out
