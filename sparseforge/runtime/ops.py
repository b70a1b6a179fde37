"""The torch ops: one fixed set for every pattern, problem, shape and config.

    sparseforge::attention(q, k, v, tables, grid, kernel, scale, backend) -> (out, lse)
    sparseforge::attention_backward(q, k, v, out, lse, dout?, dlse?, tables, grid, kernel, scale,
                                    backend) -> (dq, dk, dv)
    sparseforge::linear_attention(q, k, v, plan, n_windows, feature_map, interpret) -> (out, kv, s)
    sparseforge::linear_attention_backward(q, k, v, out, kv, s, dout, plan, n_windows, feature_map,
                                           interpret) -> (dq, dk, dv)

- q [B, H, N, D], k/v [B, KVH, N, D]; out [B, H, N, D], lse [B, H, N] float32 (float64 for
  float64 inputs, which only the CPU executor takes: gradcheck needs it);
- ``tables``: the per-call index data of the path (``lower.paths``): none for static
  attention, ``[routes]`` for routed attention, a plan's tensors for segments;
- ``grid``: the token grid of this call (SymInt[]: under ``torch.compile(dynamic=True)`` it
  stays symbolic, so a new size is no new graph); for segments the packed length (the
  schedule does not depend on it: the tables come with the plan);
- ``kernel``: the key of a registered ``Kernel`` — pattern, heads, head dim, dtype, tile
  config: everything that shapes the generated code except the grid. The schedule (and its
  tables, and the Triton kernels specialised to its extents) for each grid is built on
  first use and cached (``Kernel.at``);
- ``backend``: "auto" (CUDA tensors -> generated Triton kernels, others -> CPU executor),
  "triton", "cpu" or "interpret" (the Triton kernels under the interpreter, CPU tensors).

Both are plain ``custom_op``s with explicit fakes (not ``triton_op``), so ``opcheck`` and
fake-tensor tracing work on CPU (DESIGN.md, known pitfalls); the forward's autograd formula
calls the backward op. Registering a kernel adds a dictionary entry, never an op.

The linear-attention pair wraps the Triton kernels of scattered linear attention
(``backends.linear_kernels``, first derivatives); its torch path (``backends.linear``, CPU
and float64) is plain differentiable torch ops and needs no op of its own.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import re
import threading
from typing import Optional

import torch
from torch import Tensor

from ..backends import cpu, linear_kernels
from ..backends.linear import ScatteredLinearPlan
from ..backends.triton import TritonKernels
from ..codegen.config import KernelConfig
from ..dsl.pattern import Pattern
from ..dsl.problem import DTYPE_NAMES, Problem
from ..lower.paths import Path, Shape
from ..lower.schedule import TileSchedule

__all__ = ["BACKENDS", "Kernel", "OPS", "register", "registered_kernel", "resolve_backend"]

NAMESPACE = "sparseforge"
#: Values of the ops' ``backend`` argument.
BACKENDS = ("auto", "triton", "cpu", "interpret")
#: Schedules (with their tables and Triton kernels) kept per registered kernel, least
#: recently used dropped first.
GRIDS_PER_KERNEL = 32


def resolve_backend(backend: str, device: torch.device) -> str:
    """The executor a call on ``device`` runs: ``auto`` -> ``triton`` for CUDA tensors, ``cpu``
    otherwise. Meta tensors (shape propagation) pass for every backend."""
    if backend == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "triton" and device.type not in ("cuda", "meta"):
        raise ValueError(f"tensors are on {device} but backend='triton' needs CUDA tensors; use "
                         "backend='interpret' (Triton interpreter) or backend='cpu' for CPU tensors")
    if backend == "interpret" and device.type not in ("cpu", "meta"):
        raise ValueError(f"tensors are on {device} but backend='interpret' runs on CPU tensors")
    return backend


@dataclasses.dataclass
class _AtGrid:
    """One grid of a kernel: its schedule and, once used, its Triton kernels."""

    schedule: TileSchedule
    triton: dict = dataclasses.field(default_factory=dict)  # interpret (bool) -> TritonKernels


class Kernel:
    """What the ops run for one key: a pattern on a path with a tile config, at any grid.

    ``at(grid)`` gives the schedule for a grid: the one it was registered with, or a new
    one built (and cached, ``GRIDS_PER_KERNEL`` of them) with the same tiles."""

    def __init__(self, path: Path, seed: TileSchedule, config: KernelConfig):
        self.path = path
        self.pattern: Pattern = seed.pattern
        self.problem: Problem = seed.problem
        self.config = config
        self.key = _key(path, seed, config)
        self._grids: collections.OrderedDict[tuple[int, ...], _AtGrid] = collections.OrderedDict()
        self._grids[self._grid_key(seed.problem.grid)] = _AtGrid(seed)
        self._lock = threading.Lock()

    def _grid_key(self, grid) -> tuple[int, ...]:
        return () if self.path.grid_free or grid is None else tuple(int(x) for x in grid)

    def at(self, grid) -> _AtGrid:
        """The schedule (and kernels) of this kernel on ``grid`` (built on first use)."""
        key = self._grid_key(grid)
        with self._lock:
            found = self._grids.get(key)
            if found is not None:
                self._grids.move_to_end(key)
                return found
        ndim = len(self.config.q_tile)
        if len(key) != ndim:
            raise ValueError(f"grid={key} has {len(key)} dimension(s) but this attention was compiled for "
                             f"{ndim}-D grids (tiles {self.config.q_tile}); compile it for this grid")
        problem = dataclasses.replace(self.problem, grid=key)
        found = _AtGrid(self.path.build(self.pattern, problem, self.config))
        with self._lock:
            found = self._grids.setdefault(key, found)
            while len(self._grids) > GRIDS_PER_KERNEL:
                self._grids.popitem(last=False)
        return found

    def add(self, schedule: TileSchedule) -> None:
        """Cache ``schedule`` (built elsewhere with this kernel's config) for its grid."""
        with self._lock:
            self._grids.setdefault(self._grid_key(schedule.problem.grid), _AtGrid(schedule))

    def triton(self, grid, interpret: bool) -> TritonKernels:
        """The generated Triton kernels for ``grid`` (rendered and loaded on first use)."""
        entry = self.at(grid)
        with self._lock:
            if interpret not in entry.triton:
                entry.triton[interpret] = TritonKernels(entry.schedule, interpret=interpret, config=self.config)
            return entry.triton[interpret]

    # -- the executors behind the ops ----------------------------------------------------
    def forward(self, q, k, v, tables, grid, scale: float, backend: str):
        which = resolve_backend(backend, q.device)
        schedule = self.at(grid).schedule
        if which == "cpu":
            return cpu.forward(q, k, v, self.path.chunks(schedule, tables, _shape(q, k), q.device), scale)
        out, lse = self.triton(grid, which == "interpret").forward(
            q, k, v, scale, self.path.kernel_tables(schedule, tables, q.device))
        return out, lse.float()

    def backward(self, q, k, v, out, lse, dout, dlse, tables, grid, scale: float, backend: str):
        which = resolve_backend(backend, q.device)
        schedule = self.at(grid).schedule

        def chunks():
            return self.path.chunks(schedule, tables, _shape(q, k), q.device)

        if which == "cpu":
            return cpu.backward(q, k, v, out, lse, dout, chunks(), scale, dlse=dlse)
        if dout is None:
            dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        else:
            dq, dk, dv, _ = self.triton(grid, which == "interpret").backward(
                q, k, v, out, lse.float(), dout, scale, self.path.kernel_tables(schedule, tables, q.device))
        if dlse is not None:
            # The kernels take no LSE gradient; its contribution, dS += P * dlse, comes from
            # the CPU executor's formulas on the same device (only when lse is used).
            cq, ck, _ = cpu.backward(q, k, v, out, lse, None, chunks(), scale, dlse=dlse)
            dq, dk = (dq.float() + cq.float()).to(q.dtype), (dk.float() + ck.float()).to(k.dtype)
        return dq, dk, dv

    def __repr__(self) -> str:
        return f"Kernel({self.key!r}, {self.pattern!r}, path={self.path.name})"


def _shape(q: Tensor, k: Tensor) -> Shape:
    return Shape(q.shape[0], q.shape[1], k.shape[1], q.shape[2])


def _key(path: Path, seed: TileSchedule, config: KernelConfig) -> str:
    """Readable and unique: the schedule's name without its grid, and a hash of what shapes the
    code (pattern, heads, head dim, dtype, tiles, launches, path and its layout)."""
    p = seed.problem
    content = json.dumps(dict(path=path.name, pattern=seed.pattern.fingerprint(), heads=p.heads,
                              kv_heads=p.kv_heads, head_dim=p.head_dim, dtype=DTYPE_NAMES[p.dtype],
                              config=config.as_dict(), scattered=repr(seed.scattered),
                              grid_dims=None if p.grid is None else len(p.grid)), sort_keys=True)
    digest = hashlib.sha256(content.encode()).hexdigest()[:12]
    stem = re.sub(r"_g[0-9x]+(?=_)", "", seed.name.rsplit("_", 1)[0])
    return f"{stem}_{digest}"


_KERNELS: dict[str, Kernel] = {}
_KERNELS_LOCK = threading.Lock()


def register(path: Path, schedule: TileSchedule, config: KernelConfig) -> Kernel:
    """The registered kernel of ``schedule``'s pattern on ``path`` with ``config`` (the same
    object for the same key; ``schedule`` seeds its grid cache)."""
    new = Kernel(path, schedule, config)
    with _KERNELS_LOCK:
        found = _KERNELS.setdefault(new.key, new)
    if found is not new:
        found.add(schedule)
    return found


def registered_kernel(key: str) -> Kernel:
    """The registered kernel of ``key`` (what the ops' ``kernel`` argument names)."""
    with _KERNELS_LOCK:
        found = _KERNELS.get(key)
    if found is None:
        raise ValueError(f"kernel={key!r} is not registered in this process: make it with sparseforge.compile "
                         "(or sparseforge.load) first")
    return found


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _no_autocast(t: Tensor):
    """The ops compute in their inputs' dtype: an enclosing ``torch.autocast`` (still active
    inside a custom op's implementation) must not recast the executor's matmuls."""
    return torch.autocast(device_type=t.device.type, enabled=False)


# ------------------------------------------------------------------------------------
# The ops
# ------------------------------------------------------------------------------------
@torch.library.custom_op(f"{NAMESPACE}::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, tables: list[Tensor], grid: list[int], kernel: str,
              scale: float, backend: str) -> tuple[Tensor, Tensor]:
    with _no_autocast(q):
        out, lse = registered_kernel(kernel).forward(q, k, v, tables, grid, scale, backend)
    return out.contiguous(), lse.contiguous()


@attention.register_fake
def _attention_fake(q, k, v, tables, grid, kernel, scale, backend):
    b, h, n, _ = q.shape
    return q.new_empty((b, h, n, v.shape[-1])), q.new_empty((b, h, n), dtype=_lse_dtype(q.dtype))


@torch.library.custom_op(f"{NAMESPACE}::attention_backward", mutates_args=())
def attention_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Optional[Tensor],
                       dlse: Optional[Tensor], tables: list[Tensor], grid: list[int], kernel: str, scale: float,
                       backend: str) -> tuple[Tensor, Tensor, Tensor]:
    with _no_autocast(q):
        grads = registered_kernel(kernel).backward(q, k, v, out, lse, dout, dlse, tables, grid, scale, backend)
    return tuple(g.contiguous() for g in grads)


@attention_backward.register_fake
def _attention_backward_fake(q, k, v, out, lse, dout, dlse, tables, grid, kernel, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, tables, grid, kernel, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *tables)
    ctx.grid, ctx.kernel, ctx.scale, ctx.backend = grid, kernel, scale, backend
    ctx.n_tables = len(tables)
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    none = (None, None, None, [None] * ctx.n_tables, None, None, None, None)
    if dout is None and dlse is None:
        return none
    q, k, v, out, lse, *tables = ctx.saved_tensors
    dq, dk, dv = attention_backward(q, k, v, out, lse, None if dout is None else dout.contiguous(),
                                    None if dlse is None else dlse.contiguous(), tables, ctx.grid, ctx.kernel,
                                    ctx.scale, ctx.backend)
    return (dq, dk, dv) + none[3:]


attention.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------
# Scattered linear attention's kernels (``backends.linear_kernels``): the same idea, own pair
# ------------------------------------------------------------------------------------
@torch.library.custom_op(f"{NAMESPACE}::linear_attention", mutates_args=())
def linear_attention(q: Tensor, k: Tensor, v: Tensor, plan: list[Tensor], n_windows: int, feature_map: str,
                     interpret: bool) -> tuple[Tensor, Tensor, Tensor]:
    """out [N, H, D] of voxels q [N, H, D], k/v [N, kv_heads, D] under a linear-attention plan
    (``ScatteredLinearPlan.tensors()``, ``n_windows`` windows), with the per-window KV and S
    the backward reads."""
    linear_plan = ScatteredLinearPlan.of_tensors(plan, n_windows)
    with _no_autocast(q):
        return linear_kernels.forward(q.contiguous(), k.contiguous(), v.contiguous(), linear_plan, feature_map,
                                      interpret)


@linear_attention.register_fake
def _linear_attention_fake(q, k, v, plan, n_windows, feature_map, interpret):
    bd = linear_kernels.block_d(q.shape[-1])
    kv = q.new_empty((n_windows, k.shape[1], bd, bd), dtype=torch.float32)
    return torch.empty_like(q), kv, q.new_empty((n_windows, k.shape[1], bd), dtype=torch.float32)


@torch.library.custom_op(f"{NAMESPACE}::linear_attention_backward", mutates_args=())
def linear_attention_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, kv: Tensor, s: Tensor, dout: Tensor,
                              plan: list[Tensor], n_windows: int, feature_map: str,
                              interpret: bool) -> tuple[Tensor, Tensor, Tensor]:
    linear_plan = ScatteredLinearPlan.of_tensors(plan, n_windows)
    with _no_autocast(q):
        return linear_kernels.backward(q, k, v, out, kv, s, dout, linear_plan, feature_map, interpret)


@linear_attention_backward.register_fake
def _linear_attention_backward_fake(q, k, v, out, kv, s, dout, plan, n_windows, feature_map, interpret):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _linear_setup_context(ctx, inputs, output):
    q, k, v, plan, n_windows, feature_map, interpret = inputs
    out, kv, s = output
    ctx.save_for_backward(q, k, v, out, kv, s, *plan)
    ctx.n_windows, ctx.feature_map, ctx.interpret = n_windows, feature_map, interpret


def _linear_backward(ctx, dout, _dkv, _ds):
    q, k, v, out, kv, s, *plan = ctx.saved_tensors
    none = ([None] * len(plan), None, None, None)
    if dout is None:
        return (None, None, None) + none
    dq, dk, dv = linear_attention_backward(q, k, v, out, kv, s, dout.contiguous(), plan, ctx.n_windows,
                                           ctx.feature_map, ctx.interpret)
    return (dq, dk, dv) + none


linear_attention.register_autograd(_linear_backward, setup_context=_linear_setup_context)

#: Every op this package registers: the count never grows with patterns, shapes or configs.
OPS = ("attention", "attention_backward", "linear_attention", "linear_attention_backward")
