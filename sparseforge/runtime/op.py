"""One compiled attention as a pair of ``torch.library`` custom ops.

``register(schedule)`` defines, once per schedule fingerprint:

- ``sparseforge::<name>``      (q, k, v, scale, backend) -> (out, lse)
- ``sparseforge::<name>_bwd``  (q, k, v, out, lse, dout?, dlse?, scale, backend) -> (dq, dk, dv)

(routed attention: ``routes`` int64 [B, H|1, R, topk] follows ``v`` in both; the index
tables are built from it on its device per call, ``lower.routed.routed_tables``)

(scattered voxel windows: q, k, v, out are [N, H, D], lse [N, H]; the plan's tensors
``lower.segments.ScatteredPlan.tensors()`` — order, seg and the CSR tables — follow ``v``
as one list in both; the op packs q/k/v into window order [1, H, N_pad, D], runs the
kernels or the CPU executor on the packed sequence, and scatters results back to voxel order)

each with a fake (meta) function, and an autograd formula on the forward op that calls the
backward op. They are plain ``custom_op``s with explicit fakes (not ``triton_op``), so
``opcheck`` and fake-tensor tracing work on CPU (see DESIGN.md, known pitfalls).

``backend`` picks the executor per call: ``"auto"`` (CUDA tensors -> generated Triton
kernels, anything else -> the CPU executor), ``"triton"``, ``"cpu"`` (the schedule-driven
torch executor, any device) or ``"interpret"`` (the generated Triton kernels under the
Triton interpreter, on CPU tensors).

The LSE output is float32 (float64 when the inputs are float64, which only the CPU
executor accepts: gradcheck needs it).
"""
from __future__ import annotations

import dataclasses
import re
import threading
from typing import Any, Optional

import torch
from torch import Tensor

from ..lower.naming import readable_name
from ..dsl.pattern import Pattern
from ..dsl.problem import Problem
from ..backends import cpu

__all__ = ["AttentionOp", "BACKENDS", "op_name", "register", "registered"]

NAMESPACE = "sparseforge"
BACKENDS = ("auto", "triton", "cpu", "interpret")


# ------------------------------------------------------------------------------------
# Names
# ------------------------------------------------------------------------------------
def op_name(pattern: Pattern, problem: Problem, schedule=None, *, fingerprint: str | None = None) -> str:
    """The op name of a schedule (``TileSchedule.name``), or of a pattern and problem with a
    given fingerprint: e.g. ``na2d_k7_d2_g56x56_h8_d64_bf16_1a2b3c4d``."""
    if fingerprint is None:
        if schedule is None:
            raise ValueError("op_name needs a schedule or a fingerprint")
        fingerprint = schedule.fingerprint()
    return readable_name(pattern, problem, fingerprint)


# ------------------------------------------------------------------------------------
# Executors
# ------------------------------------------------------------------------------------
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


@dataclasses.dataclass(eq=False)
class AttentionOp:
    """The ops of one schedule and the executors behind them."""

    name: str
    schedule: Any
    fingerprint: str
    config: Any  # codegen.config.KernelConfig
    fwd: Any = None  # CustomOpDef of the forward op
    bwd: Any = None  # CustomOpDef of the backward op
    _kernels: dict = dataclasses.field(default_factory=dict)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @property
    def op(self):
        """``torch.ops.sparseforge.<name>`` (the forward op's packet)."""
        return getattr(getattr(torch.ops, NAMESPACE), self.name)

    @property
    def backward_op(self):
        return getattr(getattr(torch.ops, NAMESPACE), self.name + "_bwd")

    def kernels(self, interpret: bool):
        """The (cached) ``TritonKernels`` of this schedule."""
        with self._lock:
            if interpret not in self._kernels:
                from ..backends.triton import TritonKernels

                self._kernels[interpret] = TritonKernels(self.schedule, interpret=interpret, config=self.config)
            return self._kernels[interpret]

    @property
    def routed(self) -> bool:
        """Routed attention: the ops take the routes, and the tables are built per call."""
        return getattr(self.schedule, "routed", None) is not None

    @property
    def scattered(self) -> bool:
        """Scattered voxel windows: the ops take the plan's tensors (``lower.segments``)."""
        return getattr(self.schedule, "scattered", None) is not None

    def run_scattered_forward(self, q, k, v, plan, scale: float, backend: str):
        from ..lower.segments import pack, tables_from, unpack

        which = resolve_backend(backend, q.device)
        order, seg = plan[0], plan[1]
        n, n_pad = q.shape[0], seg.shape[0]
        qp, kp, vp = (pack(t, order, n_pad) for t in (q, k, v))
        tables = tables_from(plan, q.shape[1])
        if which == "cpu":
            outp, lsep = cpu.scattered_forward(qp, kp, vp, self.schedule, tables, scale)
        else:
            outp, lsep = self.kernels(which == "interpret").forward(qp, kp, vp, scale, tables=tables)
        return unpack(outp, order, n), unpack(lsep.to(_lse_dtype(q.dtype)), order, n)

    def run_scattered_backward(self, q, k, v, plan, out, lse, dout, dlse, scale: float, backend: str):
        from ..lower.segments import pack, tables_from, unpack

        which = resolve_backend(backend, q.device)
        order, seg = plan[0], plan[1]
        n, n_pad = q.shape[0], seg.shape[0]
        qp, kp, vp, outp = (pack(t, order, n_pad) for t in (q, k, v, out))
        lsep = pack(lse, order, n_pad, fill=float("-inf"))
        doutp = None if dout is None else pack(dout, order, n_pad)
        dlsep = None if dlse is None else pack(dlse, order, n_pad)
        tables = tables_from(plan, q.shape[1])
        if which == "cpu":
            grads = cpu.scattered_backward(qp, kp, vp, outp, lsep, doutp, self.schedule, tables, scale, dlse=dlsep)
        else:
            if doutp is None:
                grads = torch.zeros_like(qp), torch.zeros_like(kp), torch.zeros_like(vp)
            else:
                grads = self.kernels(which == "interpret").backward(qp, kp, vp, outp, lsep.float(), doutp, scale,
                                                                     tables=tables)
            if dlsep is not None:
                # As run_backward: the LSE gradient's share from the torch executor.
                cq, ck, _ = cpu.scattered_backward(qp, kp, vp, outp, lsep, None, self.schedule, tables, scale,
                                                   dlse=dlsep)
                grads = ((grads[0].float() + cq.float()).to(q.dtype), (grads[1].float() + ck.float()).to(k.dtype),
                         grads[2])
        return tuple(unpack(g, order, n) for g in grads)

    def _tables(self, routes):
        if not self.routed:
            return None
        from ..lower.routed import routed_tables
        return routed_tables(self.schedule, routes)

    # -- real implementations ---------------------------------------------------------
    def run_forward(self, q, k, v, scale: float, backend: str, routes=None):
        which = resolve_backend(backend, q.device)
        tables = self._tables(routes)
        if which == "cpu":
            if tables is not None:
                return cpu.routed_forward(q, k, v, self.schedule, tables, scale)
            return cpu.forward(q, k, v, self.schedule, scale)
        out, lse = self.kernels(which == "interpret").forward(
            q, k, v, scale, **({} if tables is None else dict(tables=tables.kernels)))
        return out, lse.float()

    def _cpu_backward(self, q, k, v, out, lse, dout, scale, dlse, tables):
        if tables is not None:
            return cpu.routed_backward(q, k, v, out, lse, dout, self.schedule, tables, scale, dlse=dlse)
        return cpu.backward(q, k, v, out, lse, dout, self.schedule, scale, dlse=dlse)

    def run_backward(self, q, k, v, out, lse, dout, dlse, scale: float, backend: str, routes=None):
        which = resolve_backend(backend, q.device)
        tables = self._tables(routes)
        if which == "cpu":
            return self._cpu_backward(q, k, v, out, lse, dout, scale, dlse, tables)
        if dout is None:
            dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        else:
            dq, dk, dv = self.kernels(which == "interpret").backward(
                q, k, v, out, lse, dout, scale, **({} if tables is None else dict(tables=tables.kernels)))
        if dlse is not None:
            # The kernels take no LSE gradient; its contribution, dS += P * dlse, comes from
            # the schedule-driven torch executor on the same device (only when lse is used).
            cq, ck, _ = self._cpu_backward(q, k, v, out, lse, None, scale, dlse, tables)
            dq, dk = (dq.float() + cq.float()).to(q.dtype), (dk.float() + ck.float()).to(k.dtype)
        return dq, dk, dv


_REGISTRY: dict[str, AttentionOp] = {}
_REGISTRY_LOCK = threading.Lock()


def registered() -> dict[str, AttentionOp]:
    """A copy of the registry: op name -> AttentionOp."""
    with _REGISTRY_LOCK:
        return dict(_REGISTRY)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def register(schedule, name: str | None = None, *, config=None) -> AttentionOp:
    """The ops of ``schedule`` run with kernel ``config`` (``codegen.config.KernelConfig``,
    default settings when None), defined on first use; the same name again returns the
    existing ops (an op name can be registered with torch only once per process)."""
    from ..codegen.config import KernelConfig

    config = KernelConfig() if config is None else config
    tag = config.kernel_tag(schedule.problem, schedule.pattern)
    fingerprint = schedule.fingerprint() + tag
    if name is None:
        name = schedule.name + (f"_{tag}" if tag else "")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"name must match [a-z][a-z0-9_]*, got {name!r}")
    with _REGISTRY_LOCK:
        entry = _REGISTRY.get(name)
        if entry is None:
            entry = AttentionOp(name, schedule, fingerprint, config)
            _define(entry)
            _REGISTRY[name] = entry
        elif entry.fingerprint != fingerprint:
            raise ValueError(f"name={name!r} is already the op of another schedule ({entry.schedule.pattern!r} on "
                             f"{entry.schedule.problem!r}); give a different name")
    return entry


def _no_autocast(t: Tensor):
    """The ops compute in their inputs' dtype: an enclosing ``torch.autocast`` (still active
    inside a custom op's implementation) must not recast the executor's matmuls."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def _define(entry: AttentionOp) -> None:
    if entry.routed:
        return _define_routed(entry)
    if entry.scattered:
        return _define_scattered(entry)
    qual = f"{NAMESPACE}::{entry.name}"

    @torch.library.custom_op(qual, mutates_args=())
    def fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str) -> tuple[Tensor, Tensor]:
        with _no_autocast(q):
            return entry.run_forward(q, k, v, scale, backend)

    @fwd.register_fake
    def _fwd_fake(q, k, v, scale, backend):
        b, h, n, _ = q.shape
        return (q.new_empty((b, h, n, v.shape[-1])), q.new_empty((b, h, n), dtype=_lse_dtype(q.dtype)))

    @torch.library.custom_op(qual + "_bwd", mutates_args=())
    def bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Optional[Tensor],
            dlse: Optional[Tensor], scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
        with _no_autocast(q):
            return tuple(t.contiguous() for t in entry.run_backward(q, k, v, out, lse, dout, dlse, scale, backend))

    @bwd.register_fake
    def _bwd_fake(q, k, v, out, lse, dout, dlse, scale, backend):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        q, k, v, scale, backend = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        ctx.backend = backend
        ctx.set_materialize_grads(False)

    def backward(ctx, dout, dlse):
        if dout is None and dlse is None:
            return None, None, None, None, None
        q, k, v, out, lse = ctx.saved_tensors
        if dout is not None:
            dout = dout.contiguous()
        if dlse is not None:
            dlse = dlse.contiguous()
        dq, dk, dv = bwd(q, k, v, out, lse, dout, dlse, ctx.scale, ctx.backend)
        return dq, dk, dv, None, None

    fwd.register_autograd(backward, setup_context=setup_context)
    entry.fwd, entry.bwd = fwd, bwd


def _define_routed(entry: AttentionOp) -> None:
    """The ops of a routed schedule: as ``_define``'s, with the routes (int64 [B, H|1, R,
    topk], checked by the caller; no gradient) after v."""
    qual = f"{NAMESPACE}::{entry.name}"

    @torch.library.custom_op(qual, mutates_args=())
    def fwd(q: Tensor, k: Tensor, v: Tensor, routes: Tensor, scale: float, backend: str) -> tuple[Tensor, Tensor]:
        with _no_autocast(q):
            return entry.run_forward(q, k, v, scale, backend, routes=routes)

    @fwd.register_fake
    def _fwd_fake(q, k, v, routes, scale, backend):
        b, h, n, _ = q.shape
        return (q.new_empty((b, h, n, v.shape[-1])), q.new_empty((b, h, n), dtype=_lse_dtype(q.dtype)))

    @torch.library.custom_op(qual + "_bwd", mutates_args=())
    def bwd(q: Tensor, k: Tensor, v: Tensor, routes: Tensor, out: Tensor, lse: Tensor, dout: Optional[Tensor],
            dlse: Optional[Tensor], scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
        with _no_autocast(q):
            return tuple(t.contiguous() for t in entry.run_backward(q, k, v, out, lse, dout, dlse, scale, backend,
                                                                    routes=routes))

    @bwd.register_fake
    def _bwd_fake(q, k, v, routes, out, lse, dout, dlse, scale, backend):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        q, k, v, routes, scale, backend = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, routes, out, lse)
        ctx.scale = scale
        ctx.backend = backend
        ctx.set_materialize_grads(False)

    def backward(ctx, dout, dlse):
        if dout is None and dlse is None:
            return None, None, None, None, None, None
        q, k, v, routes, out, lse = ctx.saved_tensors
        if dout is not None:
            dout = dout.contiguous()
        if dlse is not None:
            dlse = dlse.contiguous()
        dq, dk, dv = bwd(q, k, v, routes, out, lse, dout, dlse, ctx.scale, ctx.backend)
        return dq, dk, dv, None, None, None

    fwd.register_autograd(backward, setup_context=setup_context)
    entry.fwd, entry.bwd = fwd, bwd


def _define_scattered(entry: AttentionOp) -> None:
    """The ops of a scattered schedule: q, k, v [N, H|KVH, D] (voxel order), the plan's
    tensors (``ScatteredPlan.tensors()``, no gradient) after v; out [N, H, D], lse [N, H]."""
    qual = f"{NAMESPACE}::{entry.name}"

    @torch.library.custom_op(qual, mutates_args=())
    def fwd(q: Tensor, k: Tensor, v: Tensor, plan: list[Tensor], scale: float, backend: str) -> tuple[Tensor, Tensor]:
        with _no_autocast(q):
            return entry.run_scattered_forward(q, k, v, plan, scale, backend)

    @fwd.register_fake
    def _fwd_fake(q, k, v, plan, scale, backend):
        n, h, _ = q.shape
        return q.new_empty((n, h, v.shape[-1])), q.new_empty((n, h), dtype=_lse_dtype(q.dtype))

    @torch.library.custom_op(qual + "_bwd", mutates_args=())
    def bwd(q: Tensor, k: Tensor, v: Tensor, plan: list[Tensor], out: Tensor, lse: Tensor, dout: Optional[Tensor],
            dlse: Optional[Tensor], scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
        with _no_autocast(q):
            return tuple(t.contiguous() for t in entry.run_scattered_backward(q, k, v, plan, out, lse, dout, dlse,
                                                                               scale, backend))

    @bwd.register_fake
    def _bwd_fake(q, k, v, plan, out, lse, dout, dlse, scale, backend):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        q, k, v, plan, scale, backend = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, *plan)
        ctx.n_plan = len(plan)
        ctx.scale = scale
        ctx.backend = backend
        ctx.set_materialize_grads(False)

    def backward(ctx, dout, dlse):
        if dout is None and dlse is None:
            return None, None, None, [None] * ctx.n_plan, None, None
        q, k, v, out, lse, *plan = ctx.saved_tensors
        if dout is not None:
            dout = dout.contiguous()
        if dlse is not None:
            dlse = dlse.contiguous()
        dq, dk, dv = bwd(q, k, v, plan, out, lse, dout, dlse, ctx.scale, ctx.backend)
        return dq, dk, dv, [None] * len(plan), None, None

    fwd.register_autograd(backward, setup_context=setup_context)
    entry.fwd, entry.bwd = fwd, bwd
