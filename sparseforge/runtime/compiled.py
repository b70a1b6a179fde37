"""``compile(pattern, problem)``: a pattern turned into a callable attention op.

    attn = compile(Neighborhood(7, dilation=2), Problem(grid=(56, 56), heads=8, head_dim=64))
    out = attn(q, k, v)                        # CUDA -> generated Triton, CPU -> CPU executor
    out, lse = attn(q, k, v, return_lse=True)  # lse: natural log, float32, -inf for empty rows
"""
from __future__ import annotations

import math
import numbers

import torch

from ..dsl.pattern import Pattern
from ..dsl.problem import DTYPE_NAMES, Problem
from ..dsl.semantics import check_pattern_problem, check_qkv
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


def _check_triton_problem(problem: Problem, backend: str) -> None:
    if problem.head_dim not in TRITON_HEAD_DIMS:
        raise ValueError(f"head_dim={problem.head_dim} is not supported by backend={backend!r}; "
                         f"supported head dims: {list(TRITON_HEAD_DIMS)} (backend='cpu' takes any)")
    if problem.dtype not in TRITON_DTYPES:
        raise ValueError(f"dtype={problem.dtype} is not supported by backend={backend!r}; supported: "
                         f"{[DTYPE_NAMES[d] for d in TRITON_DTYPES]} (backend='cpu' takes float64 too)")


def compile(pattern: Pattern, problem: Problem, *, backend: str | None = None, q_tile=None,
            k_tile=None) -> "CompiledAttention":
    """Lower ``pattern`` on ``problem`` to a tile schedule and wrap it as a torch op.

    backend: None (CUDA tensors -> generated Triton kernels, CPU tensors -> the CPU
             executor), "triton", "cpu" or "interpret" (Triton kernels under the Triton
             interpreter, on CPU tensors).
    q_tile, k_tile: tile shapes (one extent per grid dimension); default chosen per grid.
    """
    check_pattern_problem(pattern, problem)
    check_backend(backend)
    if not pattern.is_static:
        raise UnsupportedPatternError(
            f"{pattern!r} depends on run-time content ({', '.join(sorted(pattern.inputs_needed()))}); "
            "compiled kernels for content-dependent patterns come later — use "
            "sparseforge.reference_attention for them meanwhile")
    if problem.grid is None:
        raise ValueError(f"problem has no grid ({problem!r}); compiling a static pattern needs Problem(grid=...)")
    if backend in ("triton", "interpret"):
        _check_triton_problem(problem, backend)
    from ..codegen.schedule import build_schedule

    schedule = build_schedule(pattern, problem, q_tile=q_tile, k_tile=k_tile)
    return CompiledAttention(schedule, backend)


class CompiledAttention:
    """Attention under one pattern on one problem, as a torch custom op.

    Call it with q [B, H, N, D] and k, v [B, kv_heads, N, D]; it returns out [B, H, N, D]
    (and the natural-log LSE [B, H, N] with ``return_lse=True``). Differentiable, and
    traceable by ``torch.compile`` without graph breaks.
    """

    def __init__(self, schedule, backend: str | None = None):
        check_backend(backend)
        self.schedule = schedule
        self.pattern: Pattern = schedule.pattern
        self.problem: Problem = schedule.problem
        self.backend = backend
        self._entry = _op.register(schedule)
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
            _check_triton_problem(problem, which)
            allowed = (problem.dtype,)
        if q.dtype not in allowed:
            extra = " (or float64 on the CPU path)" if which == "cpu" else ""
            raise TypeError(f"q has dtype {q.dtype}, expected {problem.dtype}{extra}, the dtype of {problem!r}")
        return "auto" if backend is None else backend

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                 return_lse: bool = False):
        check_qkv(q, k, v, self.problem)
        op_backend = self._op_backend(q)
        if scale is None:
            scale = self.problem.head_dim ** -0.5
        elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite real number, got {scale!r}")
        if not isinstance(return_lse, bool):
            raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = self._entry.op.default(q, k, v, float(scale), op_backend)
        return (out, lse) if return_lse else out
