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

import numpy as np
import torch

from .. import envvars
from ..dsl.problem import DTYPE_NAMES
from ..atomic import write_atomic
from .render import block_d, kernel_name, render
from .schedule import TileSchedule

envvars.pin_triton_fp_fusion()


@contextlib.contextmanager
def _interpretable_library_functions():
    """Let interpreted kernels call ``triton.language``'s own ``@jit`` helpers (``tl.max``,
    ``tl.sum``, ...). Those are fixed as compiled functions when ``triton.language`` is first
    imported without ``TRITON_INTERPRET`` (torch imports it early), and a compiled function
    refuses to be called from Python. While an interpreted launch runs, such calls go
    through an interpreted wrapper of the same function instead."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    original = JITFunction.__call__
    wrappers: dict[int, InterpretedFunction] = {}

    def call(self, *args, **kwargs):
        if id(self) not in wrappers:
            wrappers[id(self)] = InterpretedFunction(self.fn)
        return wrappers[id(self)](*args, **kwargs)

    JITFunction.__call__ = call
    try:
        yield
    finally:
        JITFunction.__call__ = original


class TritonKernels:
    """Forward and backward kernels of one schedule, loaded for GPU or interpreter use.

    forward(q, k, v, scale)                      -> out [B, H, N, D], lse [B, H, N] fp32 (natural log)
    backward(q, k, v, out, lse, dout, scale)     -> dq, dk, dv
    """

    def __init__(self, schedule: TileSchedule, interpret: bool = False, num_warps: int = 8, num_stages: int = 2):
        self.schedule = schedule
        self.interpret = interpret
        self.num_warps, self.num_stages = num_warps, num_stages
        self.name = kernel_name(schedule)
        self.sources = {kind: render(schedule, kind) for kind in ("fwd", "bwd")}
        self._modules: dict[str, object] = {}
        self._tables: dict[torch.device, dict[str, torch.Tensor]] = {}

    def source(self, kind: str) -> str:
        if kind not in self.sources:
            raise ValueError(f"kind must be one of {sorted(self.sources)}, got {kind!r}")
        return self.sources[kind]

    def path(self, kind: str) -> Path:
        digest = hashlib.sha256(self.sources[kind].encode()).hexdigest()[:16]
        return envvars.cache_dir() / "kernels" / self.name / f"{kind}_{digest}.py"

    def module(self, kind: str):
        """The loaded module of ``kind``; written to the cache directory on first use."""
        if kind not in self._modules:
            path = self.path(kind)
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
        kind = "fwd" if name == "fwd" else "bwd"
        return getattr(self.module(kind), f"{self.name}_{name}")

    def _launch(self, name: str, grid, *args):
        # The interpreter also reads TRITON_INTERPRET while running (lazy imports assert it).
        if not self.interpret:
            self.kernel(name)[grid](*args, **self._meta())
            return
        with envvars.triton_interpreter(True), _interpretable_library_functions():
            self.kernel(name)[grid](*args, **self._meta())

    def tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        if device not in self._tables:
            s = self.schedule

            def t(a):
                return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)).to(device)
            self._tables[device] = dict(
                kv_ptr=t(s.forward.ptr), kv_idx=t(s.forward.idx), kv_full=t(s.forward.full),
                q_ptr=t(s.inverse.ptr), q_idx=t(s.inverse.idx), q_full=t(s.inverse.full),
                head_group=t(s.head_group))
        return self._tables[device]

    def _meta(self):
        g = self.schedule.geometry
        meta = dict(BLOCK_M=g.block_m, BLOCK_N=g.block_n, BLOCK_D=block_d(self.schedule.problem.head_dim))
        if not self.interpret:
            meta.update(num_warps=self.num_warps, num_stages=self.num_stages)
        return meta

    # -- launches ----------------------------------------------------------------------
    def forward(self, q, k, v, scale: float):
        b, h, n, _ = q.shape
        out = torch.empty_like(q)
        lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
        tb = self.tables(q.device)
        grid = (self.schedule.geometry.n_q_tiles, b * h)
        self._launch(
            "fwd", grid, q, k, v, out, lse, tb["kv_ptr"], tb["kv_idx"], tb["kv_full"], tb["head_group"],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1),
            scale * math.log2(math.e))
        return out, lse

    def backward(self, q, k, v, out, lse, dout, scale: float):
        b, h, n, _ = q.shape
        kvh = k.shape[1]
        delta = (dout.float() * out.float()).sum(-1)  # rowsum(dO * O): [B, H, N] fp32
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        tb = self.tables(q.device)
        qk_scale = scale * math.log2(math.e)
        geom = self.schedule.geometry
        self._launch(
            "bwd_dq", (geom.n_q_tiles, b * h), q, k, v, dout, lse, delta, dq,
            tb["kv_ptr"], tb["kv_idx"], tb["kv_full"], tb["head_group"],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), scale, qk_scale)
        self._launch(
            "bwd_dkdv", (geom.n_k_tiles, b * kvh), q, k, v, dout, lse, delta, dk, dv,
            tb["q_ptr"], tb["q_idx"], tb["q_full"], tb["head_group"],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), scale, qk_scale)
        return dq, dk, dv

    # -- ahead-of-time compile (no GPU needed) -----------------------------------------------
    KERNELS = ("fwd", "bwd_dq", "bwd_dkdv")

    def signature(self, name: str) -> dict[str, str]:
        """Triton type string of every runtime argument of kernel ``name``."""
        dt = "*" + DTYPE_NAMES[self.schedule.problem.dtype]
        tables = ["KV_PTR", "KV_IDX", "KV_FULL"] if name != "bwd_dkdv" else ["Q_PTR", "Q_IDX", "Q_FULL"]
        sig: dict[str, str] = {}
        if name == "fwd":
            sig.update(Q=dt, K=dt, V=dt, O=dt, LSE="*fp32")
        else:
            sig.update(Q=dt, K=dt, V=dt, DO=dt, LSE="*fp32", DELTA="*fp32")
            sig.update(DQ=dt) if name == "bwd_dq" else sig.update(DK=dt, DV=dt)
        sig.update({t: "*i32" for t in tables}, HEAD_GROUP="*i32")
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
        from .aot import aot_compile
        if self.interpret:
            raise ValueError("ahead-of-time compile needs TritonKernels(interpret=False)")
        g = self.schedule.geometry
        meta = dict(BLOCK_M=g.block_m, BLOCK_N=g.block_n, BLOCK_D=block_d(self.schedule.problem.head_dim))
        return aot_compile(self.kernel(name), self.signature(name), meta, target=target,
                           num_warps=self.num_warps, num_stages=self.num_stages)

