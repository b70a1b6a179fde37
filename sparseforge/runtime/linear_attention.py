"""``compile(Scattered(...), problem, attention="linear")``: ScatterFormer's scattered
linear attention. CUDA tensors run the fused Triton kernels of ``backends.linear_kernels``
(``backend="interpret"``: the same kernels under the Triton interpreter, on CPU tensors); CPU
tensors (and float64) run the differentiable torch ops of ``backends.linear``.

    lin = compile(Scattered(window_size=(12, 12, 1)), Problem(heads=4, head_dim=32), attention="linear")
    out = lin(q, k, v, coords=coords)          # q [N, H, D], k/v [N, kv_heads, D]
    plan = lin.plan(coords)                    # reusable across calls / layers
    out = lin(q, k, v, plan=plan)
"""
from __future__ import annotations

import torch

from ..backends.linear import ScatteredLinearPlan, check_feature_map, linear_attention, plan as make_plan
from ..backends.linear_kernels import KERNEL_DTYPES, MAX_HEAD_DIM, check_kernel_inputs
from ..dsl.content import Scattered
from ..dsl.problem import DTYPE_NAMES, Problem
from . import ops
from .inputs import check_voxel_qkv

#: Values of ``backend=`` for attention="linear".
LINEAR_BACKENDS = (None, "cpu", "triton", "interpret")


def check_linear_backend(problem: Problem, backend) -> None:
    """Refuse a backend the problem cannot run on, naming the argument (at compile time)."""
    if backend not in LINEAR_BACKENDS:
        raise ValueError(f"backend must be one of {list(LINEAR_BACKENDS)} for attention='linear', got {backend!r}")
    if backend not in ("triton", "interpret"):
        return
    if backend == "interpret" and problem.dtype == torch.bfloat16:
        # Triton 3.9's interpreter keeps bf16 as uint16 and tl.dot multiplies the raw bit
        # patterns (triton-lang/triton#11584): the results would be silently wrong.
        raise ValueError("dtype=bf16 cannot run under backend='interpret': the Triton interpreter's tl.dot "
                         "multiplies bfloat16 bit patterns (triton-lang/triton#11584); use fp16/fp32 there, "
                         "backend='cpu', or a GPU")
    if problem.dtype not in KERNEL_DTYPES:
        name = DTYPE_NAMES.get(problem.dtype, problem.dtype)
        raise ValueError(f"dtype={name} is not supported by backend={backend!r} for attention='linear'; supported: "
                         f"{[DTYPE_NAMES[d] for d in KERNEL_DTYPES]} (backend='cpu' takes float64 too)")
    if problem.head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim={problem.head_dim} is not supported by backend={backend!r} for "
                         f"attention='linear' (at most {MAX_HEAD_DIM}); backend='cpu' takes any")


class ScatteredLinearAttention:
    """Scattered voxel-window linear attention of ``pattern`` on ``problem``.

    backend: None (CUDA tensors -> Triton kernels, CPU tensors -> torch ops), "cpu" (torch
    ops, CPU tensors only), "triton" (kernels, CUDA tensors only) or "interpret" (kernels under
    the Triton interpreter, CPU tensors; fp16/fp32). float64 inputs, and head dims above 128
    with backend None, run the torch ops. The kernels' backward is first-order only; the torch
    ops' is not.
    feature_map: "relu" or "elu+1"; neighbor_pooling: sum each window's KV and S over its
    3 x 3 window neighbourhood (exact rule: ``backends.linear``). No softmax, so
    no LSE: ``return_lse=True`` raises, and so does ``scale`` (linear attention has none).
    """

    attention = "linear"

    def __init__(self, pattern: Scattered, problem: Problem, *, feature_map: str = "relu",
                 neighbor_pooling: bool = False, backend: str | None = None):
        if not isinstance(pattern, Scattered):
            raise ValueError(f"attention='linear' is only for Scattered patterns, got {pattern!r}")
        if not isinstance(neighbor_pooling, bool):
            raise TypeError(f"neighbor_pooling must be a bool, got {neighbor_pooling!r}")
        self.pattern = pattern
        self.problem = problem
        self.feature_map = check_feature_map(feature_map)
        self.neighbor_pooling = neighbor_pooling
        check_linear_backend(problem, backend)
        self.backend = backend

    def __repr__(self) -> str:
        return (f"ScatteredLinearAttention({self.pattern!r}, {self.problem!r}, feature_map={self.feature_map!r}, "
                f"neighbor_pooling={self.neighbor_pooling}, backend={self.backend!r})")

    def plan(self, coords):
        """The window grouping (and neighbour table) of voxel ``coords`` (int [N, 1 + ndim],
        batch first): a ``ScatteredLinearPlan`` to pass as ``plan=``."""
        return make_plan(self.pattern, coords, self.neighbor_pooling)

    def __call__(self, q, k, v, *, coords=None, plan=None, return_lse: bool = False, scale=None, routes=None):
        """out [N, H, D] of q [N, H, D], k/v [N, kv_heads, D] (voxel order) and either
        ``coords`` or ``plan`` (``self.plan(coords)``)."""
        if return_lse is not False:
            raise ValueError("return_lse=True is not available for attention='linear': linear attention has no "
                             "softmax and so no log-sum-exp")
        if scale is not None:
            raise ValueError("scale is not used by attention='linear' (no softmax); leave it None")
        if routes is not None:
            raise ValueError(f"routes is only for Routed patterns; {self.pattern!r} takes coords= or plan=")
        if (coords is None) == (plan is None):
            raise ValueError(f"{self.pattern!r} needs the voxel coordinates: pass exactly one of coords= "
                             "(int [N, 1 + ndim], batch first) or plan= (lin.plan(coords))")
        if plan is None:
            plan = self.plan(coords)
        elif not isinstance(plan, ScatteredLinearPlan):
            raise TypeError(f"plan must be a ScatteredLinearPlan from lin.plan(coords), got {type(plan).__name__}")
        elif plan.pattern != self.pattern or plan.neighbor_pooling != self.neighbor_pooling:
            raise ValueError(f"plan was made for {plan.pattern!r} with neighbor_pooling={plan.neighbor_pooling}, "
                             f"not for this op ({self.pattern!r}, neighbor_pooling={self.neighbor_pooling}); "
                             "make it with this op's plan()")
        check_voxel_qkv(q, k, v, self.problem, plan.n_voxels)
        if self.backend in ("cpu", "interpret") and q.device.type != "cpu":
            raise ValueError(f"q is on {q.device} but this op was compiled with backend={self.backend!r} "
                             "(CPU tensors)")
        if self.backend == "triton" and q.device.type != "cuda":
            raise ValueError(f"q is on {q.device} but this op was compiled with backend='triton' (CUDA tensors); "
                             "use backend='interpret' or 'cpu' for CPU tensors")
        if plan.device != q.device:
            raise ValueError(f"plan (coords) is on {plan.device} but q is on {q.device}")
        kernels = self.backend in ("triton", "interpret") or (
            self.backend is None and q.device.type == "cuda" and self.problem.head_dim <= MAX_HEAD_DIM)
        allowed = (self.problem.dtype,) if self.backend in ("triton", "interpret") else (self.problem.dtype,
                                                                                      torch.float64)
        if q.dtype not in allowed:
            want = DTYPE_NAMES.get(self.problem.dtype, self.problem.dtype)
            extra = "" if len(allowed) == 1 else " (or float64)"
            raise TypeError(f"q has dtype {q.dtype}, expected {want}{extra}, the dtype of {self.problem!r}"
                            + (f" (backend={self.backend!r} runs Triton kernels)" if len(allowed) == 1 else ""))
        if kernels and q.dtype != torch.float64:
            interpret = self.backend == "interpret"
            check_kernel_inputs(q, k, v, plan, interpret)
            out, _, _ = ops.linear_attention(q, k, v, plan.tensors(), plan.n_windows, self.feature_map, interpret)
            return out
        group = self.problem.heads // self.problem.kv_heads
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return linear_attention(q, k, v, plan, self.feature_map)
