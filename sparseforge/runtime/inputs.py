"""Input checks of the runtime, in one place: options at compile time, tensors at call time.
Every error names the argument, the value and what was expected."""
from __future__ import annotations

import math
import numbers

import torch

from ..dsl.problem import DTYPE_NAMES, Problem
from ..dsl.semantics import check_qkv
from ..codegen.config import KernelConfig
from .ops import resolve_backend

__all__ = ["BACKENDS", "TRITON_DTYPES", "TRITON_HEAD_DIMS", "check_backend", "check_call_grid", "check_kernel_options",
           "check_qkv", "check_return_lse", "check_scale", "check_triton_problem", "check_voxel_qkv",
           "op_backend"]

#: Values of ``compile(..., backend=)``.
BACKENDS = (None, "triton", "cpu", "interpret")
#: Head dims the generated Triton kernels support.
TRITON_HEAD_DIMS = (16, 32, 64, 96, 128, 256)
#: Input dtypes the generated Triton kernels support.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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


def check_kernel_options(problem: Problem, backend, config, q_tile, k_tile) -> None:
    """The checks every kernel-backed compile shares: the problem against the backend, and
    config vs q_tile/k_tile."""
    if backend in ("triton", "interpret"):
        check_triton_problem(problem, backend)
    if config is not None and not isinstance(config, KernelConfig):
        raise TypeError(f"config must be a sparseforge KernelConfig, got {config!r}")
    if config is not None and (q_tile is not None or k_tile is not None):
        raise ValueError("give either config or q_tile/k_tile, not both (the config holds the tiles)")


def check_scale(scale, head_dim: int) -> float:
    """The softmax scale of a call: ``scale``, or head_dim ** -0.5 when None."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite real number, got {scale!r}")
    return float(scale)


def check_return_lse(return_lse) -> None:
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")


def op_backend(problem: Problem, backend: str | None, q: torch.Tensor) -> str:
    """Check q's device/dtype against the compile-time ``backend``; the backend string the
    ops receive."""
    dev = q.device
    if dev.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"q is on device {dev}; sparseforge runs on 'cuda' and 'cpu' tensors")
    which = resolve_backend("auto" if backend is None else backend, dev)
    if which == "cpu":
        allowed = (problem.dtype, torch.float64)
    else:
        check_triton_problem(problem, which)
        allowed = (problem.dtype,)
    if q.dtype not in allowed:
        extra = " (or float64 on the CPU path)" if which == "cpu" else ""
        raise TypeError(f"q has dtype {q.dtype}, expected {problem.dtype}{extra}, the dtype of {problem!r}")
    return "auto" if backend is None else backend


def check_call_grid(problem: Problem, grid, q: torch.Tensor) -> tuple:
    """The token grid of a call on q [B, H, N, D]: ``grid`` when given (its product must be
    N), else the problem's grid when it has N tokens, else (N,) for a 1-D problem. Works on
    symbolic sizes (``torch.compile(dynamic=True)``)."""
    ndim = len(problem.grid)
    tokens = q.shape[2]
    if grid is None:
        if tokens == problem.tokens:
            return problem.grid
        if ndim == 1:
            return (tokens,)
        raise ValueError(f"q has shape {tuple(q.shape)}: its {tokens} tokens are not the compiled grid={problem.grid}; "
                         f"pass grid= (a tuple of {ndim} sizes) for a grid of another size")
    if isinstance(grid, (int, torch.SymInt)):
        grid = (grid,)
    grid = tuple(grid)
    if len(grid) != ndim or not all(isinstance(g, (int, torch.SymInt)) and not isinstance(g, bool) for g in grid):
        raise ValueError(f"grid must be a tuple of {ndim} ints (the compiled grid is {problem.grid}), got {grid!r}")
    if math.prod(grid) != tokens:
        raise ValueError(f"grid={grid} has {math.prod(grid)} tokens but q has shape {tuple(q.shape)} ({tokens} tokens)")
    return grid


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
