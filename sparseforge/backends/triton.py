"""Generated Triton kernels for one TileSchedule: write, load and launch them.

Sources are written under the cache directory (content-addressed, atomically) and loaded
as real modules, because Triton reads a kernel's source through ``inspect``. The
interpreter variant is loaded with ``TRITON_INTERPRET=1`` set only while its decorators
run, so CPU tensors can run the very same kernels without the caller exporting anything.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import math
import sys
from pathlib import Path

import torch

from .. import envvars
from ..dsl.problem import DTYPE_NAMES
from ..atomic import write_atomic
from ..codegen.config import KERNELS, KernelConfig
from ..codegen.render import block_d, kernel_name, render
from ..lower.paths import path_of
from .aot import aot_compile
from ..lower.schedule import TileSchedule

envvars.pin_triton_fp_fusion()


def _language_objects() -> list:
    """The ``triton.language`` modules and classes the interpreter patches while it runs."""
    import triton.language as tl

    return [tl, tl.core, tl.math, tl.standard, tl.core.tensor, tl.core.tensor_descriptor_base]


def _restore_language(snapshot) -> None:
    """Put back every attribute the interpreter replaced. Names it added are kept: its
    cached rewritten functions refer to them (e.g. ``interpreter_semantic``)."""
    for obj, attrs in snapshot:
        for name, value in attrs.items():
            if vars(obj).get(name) is not value:
                setattr(obj, name, value)


#: Largest fp32 temporary (elements) ``rowsum_product`` makes at once.
DELTA_CHUNK_ELEMENTS = 1 << 22


def rowsum_product(dout: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """delta = rowsum(dO * O): fp32 [B, H, N] of dout, out [B, H, N, D], products and sums in
    fp32, a slab of heads at a time, so the fp32 temporaries never grow with the whole
    [B, H, N, D] (the backward's peak memory stays at its outputs)."""
    b, h, n, d = out.shape
    delta = torch.empty(b, h, n, dtype=torch.float32, device=out.device)
    step = max(1, DELTA_CHUNK_ELEMENTS // max(1, b * n * d))
    for i in range(0, h, step):
        delta[:, i:i + step] = (dout[:, i:i + step].float() * out[:, i:i + step].float()).sum(-1)
    return delta


@contextlib.contextmanager
def interpreted_launch():
    """The context an interpreted kernel launch runs in: ``TRITON_INTERPRET`` set for the
    call only, and ``triton.language``'s helpers callable and restored afterwards."""
    with envvars.triton_interpreter(True), _interpretable_library_functions():
        yield


@contextlib.contextmanager
def _interpretable_library_functions():
    """Let interpreted kernels call ``triton.language``'s own ``@jit`` helpers (``tl.max``,
    ``tl.sum``, ...), and leave ``triton.language`` as it was afterwards.

    Those helpers are fixed as compiled functions when ``triton.language`` is first imported
    without ``TRITON_INTERPRET`` (torch imports it early), and a compiled function refuses to
    be called from Python. While an interpreted launch runs, such calls go through an
    interpreted wrapper of the same function instead. The interpreter patches
    ``triton.language`` for every such call and never undoes it (it assumes a process that
    only interprets); a snapshot restores it, or later real compiles in this process would
    meet the patched functions ("Unsupported function referenced")."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    original = JITFunction.__call__
    wrappers: dict[int, InterpretedFunction] = {}
    snapshot = [(obj, dict(vars(obj))) for obj in _language_objects()]

    def call(self, *args, **kwargs):
        if id(self) not in wrappers:
            wrappers[id(self)] = InterpretedFunction(self.fn)
        return wrappers[id(self)](*args, **kwargs)

    JITFunction.__call__ = call
    try:
        yield
    finally:
        JITFunction.__call__ = original
        _restore_language(snapshot)


class TritonKernels:
    """Forward and backward kernels of one schedule, loaded for GPU or interpreter use.

    forward(q, k, v, scale, tables)                  -> out [B, H, N, D], lse [B, H, N] fp32 (natural log)
    backward(q, k, v, out, lse, dout, scale, tables) -> dq, dk, dv

    ``tables``: the index tables by kernel argument name (``lower.paths.Path.kernel_tables``).
    """

    def __init__(self, schedule: TileSchedule, interpret: bool = False, config: KernelConfig | None = None):
        self.schedule = schedule
        self.interpret = interpret
        self.config = (KernelConfig() if config is None else config).resolved(schedule.problem, schedule.pattern)
        self.name = kernel_name(schedule)
        self.path = path_of(schedule.pattern)
        self.sources = {kind: render(schedule, kind, self.config) for kind in ("fwd", "bwd")}
        self._modules: dict[str, object] = {}

    def source(self, kind: str) -> str:
        if kind not in self.sources:
            raise ValueError(f"kind must be one of {sorted(self.sources)}, got {kind!r}")
        return self.sources[kind]

    def source_path(self, kind: str) -> Path:
        digest = hashlib.sha256(self.sources[kind].encode()).hexdigest()[:16]
        return envvars.cache_dir() / "kernels" / self.name / f"{kind}_{digest}.py"

    def module(self, kind: str):
        """The loaded module of ``kind``; written to the cache directory on first use."""
        if kind not in self._modules:
            path = self.source_path(kind)
            if not path.exists() or path.read_text() != self.sources[kind]:
                write_atomic(path, self.sources[kind])
            mod_name = f"sparseforge_generated.{self.name}.{kind}{'_interp' if self.interpret else ''}"
            spec = importlib.util.spec_from_file_location(mod_name, path)
            mod = importlib.util.module_from_spec(spec)
            with envvars.triton_interpreter(self.interpret):
                spec.loader.exec_module(mod)
            sys.modules[mod_name] = mod
            self._modules[kind] = mod
        return self._modules[kind]

    def kernel(self, name: str):
        kind = "fwd" if name.startswith("fwd") else "bwd"
        return getattr(self.module(kind), f"{self.name}_{name}")

    def _launch(self, name: str, grid, *args):
        # Each kernel is followed by its NaN/Inf containment kernel (``<name>_fix``, same
        # arguments; a no-op for finite inputs) where visited tiles may hold masked pairs.
        for n in (name, f"{name}_fix") if self.masks_pairs else (name,):
            if not self.interpret:
                self.kernel(n)[grid](*args, **self._meta(n))
                continue
            # The interpreter also reads TRITON_INTERPRET while running (lazy imports assert it).
            with interpreted_launch():
                self.kernel(n)[grid](*args, **self._meta(n))

    @property
    def masks_pairs(self) -> bool:
        """Whether a visited tile may hold a pair the pattern masks (what the containment
        kernels are for): not on the routed path (padding only, never loaded), nor on a static
        schedule whose visited tiles are all FULL; always for segments (tables per plan)."""
        if self.path.predicate == "none":
            return False
        return self.path.grid_free or self.schedule.full_tiles < self.schedule.visited_tiles

    def constexprs(self) -> dict[str, int]:
        """The compile-time arguments every kernel of the module takes."""
        g = self.schedule.geometry
        return dict(BLOCK_M=g.block_m, BLOCK_N=g.block_n, BLOCK_D=block_d(self.schedule.problem.head_dim))

    def _meta(self, name: str):
        meta = self.constexprs()
        if not self.interpret:
            launch = self.config.launch(name.removesuffix("_fix"))  # <kernel>_fix: as its kernel
            meta.update(num_warps=launch.num_warps, num_stages=launch.num_stages)
        return meta

    # -- launches ----------------------------------------------------------------------
    def _args(self, name: str, tables: dict, **values) -> list:
        """Kernel ``name``'s runtime arguments in signature order, from ``values`` and the
        index ``tables`` by argument name (``lower.paths.Path.kernel_tables``: the schedule's
        own, or built per call; only those the kernel reads are passed)."""
        return [values[a] if a in values else tables[a] for a in self.signature(name)]

    def _n_tiles(self, n: int, side: str) -> int:
        """Query (side "q") or key tiles a launch covers: the schedule's, or for a scattered
        schedule those of the packed sequence of ``n`` rows (a multiple of both tiles)."""
        g = self.schedule.geometry
        if self.path.grid_free:
            return n // (g.block_m if side == "q" else g.block_n)
        return g.n_q_tiles if side == "q" else g.n_k_tiles

    def forward(self, q, k, v, scale: float, tables: dict):
        b, h, n, _ = q.shape
        out = torch.empty_like(q)
        lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
        grid = (self._n_tiles(n, "q"), b * h)
        self._launch("fwd", grid, *self._args(
            "fwd", tables, Q=q, K=k, V=v, O=out, LSE=lse, stride_qb=q.stride(0), stride_qh=q.stride(1),
            stride_kb=k.stride(0), stride_kh=k.stride(1), stride_ob=out.stride(0), stride_oh=out.stride(1),
            qk_scale=scale * math.log2(math.e)))
        return out, lse

    def backward(self, q, k, v, out, lse, dout, scale: float, tables: dict):
        delta = rowsum_product(dout, out)
        dq = self.backward_dq(q, k, v, dout, lse, delta, scale, tables)
        dk, dv = self.backward_dkdv(q, k, v, dout, lse, delta, scale, tables)
        return dq, dk, dv

    def _backward_args(self, q, k, v, dout, lse, delta, scale: float) -> dict:
        return dict(Q=q, K=k, V=v, DO=dout, LSE=lse, DELTA=delta, stride_qb=q.stride(0), stride_qh=q.stride(1),
                    stride_kb=k.stride(0), stride_kh=k.stride(1), sm_scale=scale, qk_scale=scale * math.log2(math.e))

    def backward_dq(self, q, k, v, dout, lse, delta, scale: float, tables: dict):
        """dq [B, H, N, D] (the ``bwd_dq`` kernel alone); delta = rowsum(dO * O) fp32."""
        dq = torch.empty_like(q)
        grid = (self._n_tiles(q.shape[2], "q"), q.shape[0] * q.shape[1])
        self._launch("bwd_dq", grid, *self._args("bwd_dq", tables, DQ=dq, **self._backward_args(q, k, v, dout, lse, delta, scale)))
        return dq

    def backward_dkdv(self, q, k, v, dout, lse, delta, scale: float, tables: dict):
        """dk, dv [B, KVH, N, D] (the ``bwd_dkdv`` kernel alone)."""
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        grid = (self._n_tiles(k.shape[2], "k"), k.shape[0] * k.shape[1])
        self._launch("bwd_dkdv", grid, *self._args("bwd_dkdv", tables, DK=dk, DV=dv,
                                                   **self._backward_args(q, k, v, dout, lse, delta, scale)))
        return dk, dv

    # -- ahead-of-time compile (no GPU needed) -----------------------------------------------
    KERNELS = KERNELS

    def table_arguments(self, name: str) -> list[str]:
        """The schedule tables kernel ``name`` reads: none for forward/dQ kernels with
        closed-form bounds, the forward (or, for dK/dV, inverse) CSR otherwise."""
        if name == "bwd_dkdv":
            return ["Q_PTR", "Q_IDX", "Q_FULL", "HEAD_GROUP"]
        if self.schedule.bounds is not None:
            return []
        return ["KV_PTR", "KV_IDX", "KV_FULL", "HEAD_GROUP"]

    def signature(self, name: str) -> dict[str, str]:
        """Triton type string of every runtime argument of kernel ``name`` (``<kernel>_fix``:
        the same as its kernel's)."""
        name = name.removesuffix("_fix")
        dt = "*" + DTYPE_NAMES[self.schedule.problem.dtype]
        tables = self.table_arguments(name)
        sig: dict[str, str] = {}
        if name == "fwd":
            sig.update(Q=dt, K=dt, V=dt, O=dt, LSE="*fp32")
        else:
            sig.update(Q=dt, K=dt, V=dt, DO=dt, LSE="*fp32", DELTA="*fp32")
            sig.update(DQ=dt) if name == "bwd_dq" else sig.update(DK=dt, DV=dt)
        sig.update({t: "*i32" for t in tables})
        if self.path.grid_free:
            # segment ids of the packed rows and the packed length (a multiple of 16)
            sig.update(SEG="*i32", n_tokens="i32:16")
        strides = ["stride_qb", "stride_qh", "stride_kb", "stride_kh"]
        if name == "fwd":
            strides += ["stride_ob", "stride_oh"]
        sig.update({s: "i32:16" for s in strides})  # what the JIT infers for contiguous tensors
        if name == "fwd":
            sig["qk_scale"] = "fp32"
        else:
            sig.update(sm_scale="fp32", qk_scale="fp32")
        return sig

    def aot(self, name: str, target="sm_90"):
        """Compile kernel ``name`` for ``target`` on the CPU; returns its ResourceReport."""
        if self.interpret:
            raise ValueError("ahead-of-time compile needs TritonKernels(interpret=False)")
        launch = self.config.launch(name.removesuffix("_fix"))
        return aot_compile(self.kernel(name), self.signature(name), self.constexprs(), target=target,
                           num_warps=launch.num_warps, num_stages=launch.num_stages)

