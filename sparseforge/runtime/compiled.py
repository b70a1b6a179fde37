"""``compile(pattern, problem)``: a pattern turned into a callable attention op.

    attn = compile(Neighborhood(7, dilation=2), Problem(grid=(56, 56), heads=8, head_dim=64))
    out = attn(q, k, v)                        # CUDA -> generated Triton, CPU -> CPU executor
    out, lse = attn(q, k, v, return_lse=True)  # lse: natural log, float32, -inf for empty rows

    routed = compile(Routed(region_size=(8, 8), topk=4), Problem(grid=(64, 64), heads=8, head_dim=32))
    out = routed(q, k, v)                      # routing from q and k (detached), as the reference
    out = routed(q, k, v, routes=idx)          # or given: int [B, (H,) R, topk]

Routed attention (``dsl.content.Routed``) runs region-aligned tiles whose index tables are
built per call from the routes (``codegen.routed``); other content-dependent patterns raise
``UnsupportedPatternError``.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from ..dsl.pattern import Pattern
from ..dsl.problem import DTYPE_NAMES, Problem
from ..dsl.semantics import check_pattern_problem, check_qkv
from ..codegen.config import KernelConfig
from . import op as _op

__all__ = ["BACKENDS", "CompiledAttention", "TRITON_HEAD_DIMS", "UnsupportedPatternError", "compile"]

#: Values of ``compile(..., backend=)``.
BACKENDS = (None, "triton", "cpu", "interpret")
#: Head dims the generated Triton kernels support.
TRITON_HEAD_DIMS = (16, 32, 64, 96, 128, 256)
#: Input dtypes the generated Triton kernels support.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SOURCE_KINDS = ("fwd", "bwd")


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
            config: KernelConfig | None = None, autotune: bool = False, target=None) -> "CompiledAttention":
    """Lower ``pattern`` on ``problem`` to a tile schedule and wrap it as a torch op.

    backend:  None (CUDA tensors -> generated Triton kernels, CPU tensors -> the CPU
              executor), "triton", "cpu" or "interpret" (Triton kernels under the Triton
              interpreter, on CPU tensors).
    q_tile, k_tile: tile shapes (one extent per grid dimension); default chosen per grid.
    config:   a full ``KernelConfig`` (tiles, loop bounds, launches) instead of q_tile/k_tile.
    autotune: take the config from the tuning database, tuning first if it has none
              (``sparseforge.autotune.tune``: timed on a GPU of the target, predicted by the
              cost model otherwise); ``target`` ("sm_80", "sm_90", ...) as in ``tune``.
    """
    check_pattern_problem(pattern, problem)
    check_backend(backend)
    from ..dsl.content import Routed

    routed = isinstance(pattern, Routed)
    if not pattern.is_static and not routed:
        raise UnsupportedPatternError(
            f"{pattern!r} depends on run-time content ({', '.join(sorted(pattern.inputs_needed()))}); "
            "of the content-dependent patterns only a Routed pattern on its own compiles so far — use "
            "sparseforge.reference_attention for the others meanwhile")
    if problem.grid is None:
        raise ValueError(f"problem has no grid ({problem!r}); compiling a static pattern needs Problem(grid=...)")
    if backend in ("triton", "interpret"):
        check_triton_problem(problem, backend)
    if config is not None and not isinstance(config, KernelConfig):
        raise TypeError(f"config must be a sparseforge KernelConfig, got {config!r}")
    if config is not None and (q_tile is not None or k_tile is not None):
        raise ValueError("give either config or q_tile/k_tile, not both (the config holds the tiles)")
    if autotune and (config is not None or q_tile is not None or k_tile is not None):
        raise ValueError("autotune=True chooses the tiles and launches; do not also give config, q_tile or k_tile")
    if target is not None and not autotune:
        raise ValueError("target is the autotuner's target; it needs autotune=True")
    if routed and autotune:
        raise UnsupportedPatternError(f"autotune=True is not supported for {pattern!r} yet; give q_tile/k_tile "
                                      "or a config (tiles must divide the padded region)")
    tuning = None
    if autotune:
        from ..autotune import tune

        tuning = tune(pattern, problem, target=target)
        config = tuning.config
    elif config is None:
        config = KernelConfig(q_tile=q_tile, k_tile=k_tile)
    return CompiledAttention(schedule_for(pattern, problem, config), backend, config, tuning=tuning)


def schedule_for(pattern: Pattern, problem: Problem, config: KernelConfig):
    """The TileSchedule that ``config``'s tiles give ``pattern`` on ``problem`` (what
    ``compile`` and ``load`` both build)."""
    from ..dsl.content import Routed

    if isinstance(pattern, Routed):
        from ..codegen.routed import build_routed_schedule

        # Region-aligned tiles: the defaults come from the region, not the grid.
        return build_routed_schedule(pattern, problem, q_tile=config.q_tile, k_tile=config.k_tile)
    from ..codegen.schedule import build_schedule

    config = config.resolved(problem)
    return build_schedule(pattern, problem, q_tile=config.q_tile, k_tile=config.k_tile,
                          closed_form=config.closed_form)


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

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                 return_lse: bool = False, routes: torch.Tensor | None = None):
        """Attention of q, k, v; ``routes`` (``Routed`` only: int [B, (H,) R, topk]) replaces
        the routing computed from q and k (``dsl.content.check_routes`` checks it)."""
        check_qkv(q, k, v, self.problem)
        op_backend = self._op_backend(q)
        if scale is None:
            scale = self.problem.head_dim ** -0.5
        elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite real number, got {scale!r}")
        if not isinstance(return_lse, bool):
            raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if self._entry.routed:
            from ..codegen.routed import routes_for

            routes = routes_for(self.pattern, self.problem, q, k, routes)
            out, lse = self._entry.op.default(q, k, v, routes, float(scale), op_backend)
            return (out, lse) if return_lse else out
        if routes is not None:
            raise ValueError(f"routes is only for Routed patterns; {self.pattern!r} takes none")
        out, lse = self._entry.op.default(q, k, v, float(scale), op_backend)
        return (out, lse) if return_lse else out
