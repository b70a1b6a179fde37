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
from ..codegen.config import KERNELS, KernelConfig, Launch
from ..codegen.render import KINDS, TABLE_BIASES, block_d, kernel_name, modifier_context, render
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


def source_path(name: str, kind: str, source: str) -> Path:
    """Where generated module ``kind`` of kernels ``name`` is kept: the cache directory, by content."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    return envvars.cache_dir() / "kernels" / name / f"{kind}_{digest}.py"


def load_generated(name: str, kind: str, source: str, interpret: bool, variant: str = ""):
    """Generated module ``kind`` of kernels ``name``, written to the cache directory (atomically,
    on first use) and imported for the GPU or the interpreter (``variant``: a module-name tag)."""
    path = source_path(name, kind, source)
    if not path.exists() or path.read_text() != source:
        write_atomic(path, source)
    mod_name = f"sparseforge_generated.{name}.{kind}{variant}{'_interp' if interpret else ''}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(spec)
    with envvars.triton_interpreter(interpret):
        spec.loader.exec_module(mod)
    sys.modules[mod_name] = mod
    return mod


#: The modifier tensors the kernels take (``codegen.templates`` modifier_arguments), in argument
#: order: (kernel argument, ``codegen.render.modifier_context`` key).
MODIFIER_ARGUMENTS = (("HEAD_SCALE", "head_scale"), ("BIAS_TABLE", "table"), ("SLOPES", "alibi"), ("SINKS", "sinks"))


def modifier_inputs(mods: dict, modifiers, head_scale, device) -> dict:
    """The modifier tensors of a call by kernel argument name (fp32, contiguous), checked against
    ``mods`` (the ``modifier_context`` the kernels were made for)."""
    biases = {type(m).__name__: m for m in (modifiers.biases if modifiers else ())}
    alibi = biases.get("ALiBi")
    table = next((biases[kind] for kind in TABLE_BIASES if kind in biases), None)
    sinks = modifiers.sinks if modifiers else None
    given = dict(head_scale=head_scale is not None, alibi=alibi is not None, sinks=sinks is not None,
                 table=table is not None)
    wanted = {key: bool(mods.get(key)) for key in given}
    if given != wanted or (modifiers and (modifiers.softcap is not None) != (mods["softcap"] is not None)):
        raise ValueError(f"modifiers/head_scale of this call ({given}) do not match the kernels' "
                         f"({wanted}, softcap {mods['softcap']})")

    def f32(t):
        return t.detach().to(device=device, dtype=torch.float32).contiguous()
    out = {}
    if head_scale is not None:
        out["HEAD_SCALE"] = f32(head_scale)
    if table is not None:
        out["BIAS_TABLE"] = f32(table.table).reshape(-1)
    if alibi is not None:
        out["SLOPES"] = f32(alibi.slopes)
    if sinks is not None:
        out["SINKS"] = f32(sinks.logits)
    return out


def fixed_point_scale(v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """fp32 [1]: the power of two that turns every dS of one backward into a 64-bit integer
    whose sums over any set of pairs cannot overflow (the bias table gradient's fixed point).

    sum over a row's keys of |dS| <= |dO| (max |v| + |o|), since dS = P (dO.v - dO.o) and the
    row's P sum to at most 1 (softcap's factor is at most 1); the bound T sums that over every
    row, and the scale is 2^(61 - ceil(log2 T)): each term is a multiple of T 2^-61, about 2^-61
    of the largest sum (fp32 terms summed exactly). Computed on the device (no host sync);
    non-finite rows count 0 (padding and hidden keys may hold garbage)."""
    def norms(t):
        return torch.linalg.vector_norm(t.float(), dim=-1).nan_to_num(0.0, 0.0, 0.0)
    group = out.shape[1] // v.shape[1]
    v_max = norms(v).amax(dim=2).repeat_interleave(group, dim=1)            # [B, H]
    bound = (norms(dout) * (v_max[:, :, None] + norms(out))).double().sum()
    exponent = (61 - torch.ceil(torch.log2(bound.clamp_min(2.0 ** -100)))).clamp(-120, 120)
    return torch.exp2(exponent).float().reshape(1)


class TritonKernels:
    """Forward and backward kernels of one schedule, loaded for GPU or interpreter use.

    forward(q, k, v, scale, tables)                  -> out [B, H, N, D], lse [B, H, N] fp32 (natural log)
    backward(q, k, v, out, lse, dout, scale, tables) -> dq, dk, dv

    ``tables``: the index tables by kernel argument name (``lower.paths.Path.kernel_tables``).
    The dK/dV kernel walks ``dkdv_schedule``: the same schedule, or (static patterns) one of
    the config's dK/dV tiles, whose inverse tables it reads (``Path.dkdv_schedule``).
    One module per kernel (``codegen.render.KINDS``), each with its NaN/Inf containment kernel.
    """

    def __init__(self, schedule: TileSchedule, interpret: bool = False, config: KernelConfig | None = None,
                 modifiers: tuple = (), padding: bool | str = False):
        self.schedule = schedule
        if padding not in (False, True, "mask", "groups"):
            raise ValueError(f"padding must be False, True (a key padding mask), 'mask' or 'groups', got {padding!r}")
        #: a variant whose calls pass a key padding mask ("mask": ``KEY_VALID``) or group ids
        #: ("groups": ``ROW_GROUP``, ``Grouped & pattern``); False: neither
        self.padding = "mask" if padding is True else padding
        self.modifiers = modifiers  # ``dsl.modifiers.modifier_spec``: what the kernels compute beyond scale * q.k
        self.interpret = interpret
        self.config = (KernelConfig() if config is None else config).resolved(schedule.problem, schedule.pattern)
        self.name = kernel_name(schedule)
        self.path = path_of(schedule.pattern)
        self.dkdv_schedule = self.path.dkdv_schedule(schedule, self.config)
        self.mods = modifier_context(modifiers, schedule.pattern, schedule.problem)  # NotImplementedError: not in kernels
        if padding and self.path.grid_free:
            raise ValueError("a key padding mask needs a token grid; segment (voxel) attention has none")
        self.table_grad_kernel = self._table_grad_kernel() if self.mods["table"] else None
        self.sources = {kind: render(self.schedule_of(kind), kind, self.config, self.name, modifiers, self.padding,
                                     table_grad=kind == self.table_grad_kernel) for kind in KINDS}
        self._modules: dict[str, object] = {}

    def _table_grad_kernel(self) -> str:
        """The backward kernel that adds up the bias table's gradient: each visits every allowed
        pair once; the one with fewer pairs per thread per tile (its per-pair atomics hold a
        64-bit address and value each: dQ's 128x64 tiles on 8 warps spill them at head_dim
        128 on sm_90, dK/dV's 32x64 on 4 warps do not), dQ on a tie."""
        def pairs_per_thread(kind):
            g = self.schedule_of(kind).geometry
            return g.block_m * g.block_n / self.config.launch(kind).num_warps
        return "bwd_dkdv" if pairs_per_thread("bwd_dkdv") < pairs_per_thread("bwd_dq") else "bwd_dq"

    def schedule_of(self, name: str) -> TileSchedule:
        """The schedule kernel ``name`` (or its ``_fix``) walks."""
        return self.dkdv_schedule if name.removesuffix("_fix") == "bwd_dkdv" else self.schedule

    def source(self, kind: str) -> str:
        if kind not in self.sources:
            raise ValueError(f"kind must be one of {sorted(self.sources)}, got {kind!r}")
        return self.sources[kind]

    def source_path(self, kind: str) -> Path:
        return source_path(self.name, kind, self.sources[kind])

    def module(self, kind: str):
        """The loaded module of ``kind``; written to the cache directory on first use."""
        if kind not in self._modules:
            self._modules[kind] = load_generated(self.name, kind, self.sources[kind], self.interpret,
                                                 f"_{self.padding}" if self.padding else "")
        return self._modules[kind]

    def kernel(self, name: str):
        return getattr(self.module(name.removesuffix("_fix")), f"{self.name}_{name}")

    def _launch(self, name: str, grid, *args):
        # Each kernel is followed by its NaN/Inf containment kernel (``<name>_fix``, same
        # arguments; a no-op for finite inputs) where visited tiles may hold masked pairs.
        for n in (name, f"{name}_fix") if self.masks_pairs(name) else (name,):
            if not self.interpret:
                self.kernel(n)[grid](*args, **self._meta(n))
                continue
            # The interpreter also reads TRITON_INTERPRET while running (lazy imports assert it).
            with interpreted_launch():
                self.kernel(n)[grid](*args, **self._meta(n))

    def masks_pairs(self, name: str) -> bool:
        """Whether a tile kernel ``name`` visits may hold a pair the pattern masks (what the
        containment kernels are for): not on the routed path (padding only, never loaded), nor
        on a static schedule whose visited tiles are all FULL; always for segments (tables per plan)."""
        if self.path.predicate == "none":
            return False
        if self.padding:
            return True
        schedule = self.schedule_of(name)
        return self.path.grid_free or schedule.full_tiles < schedule.visited_tiles

    def constexprs(self, name: str = "fwd") -> dict[str, int]:
        """The compile-time arguments kernel ``name`` takes: its schedule's tile rows."""
        g = self.schedule_of(name).geometry
        return dict(BLOCK_M=g.block_m, BLOCK_N=g.block_n, BLOCK_D=block_d(self.schedule.problem.head_dim))

    def launch(self, name: str) -> Launch:
        """The launch of kernel ``name`` (``<kernel>_fix``: as its kernel): the config's, but the
        padding variant's dK/dV kernel one stage shallower (its mask loads take the registers
        of a stage: 64x128 tiles with 3 stages spill 32 B on sm_90 otherwise), and the kernel
        that adds up a bias table's gradient on at least 8 warps (its per-pair atomics hold a
        64-bit address and value: at head_dim 128 the 32x64 dK/dV tiles on 4 warps spill)."""
        launch = self.config.launch(name.removesuffix("_fix"))
        if self.padding and name.startswith("bwd_dkdv") and launch.num_stages > 1:
            launch = Launch(launch.num_warps, launch.num_stages - 1)
        if name.removesuffix("_fix") == self.table_grad_kernel and launch.num_warps < 8:
            launch = Launch(8, launch.num_stages)
        return launch

    def _meta(self, name: str):
        meta = self.constexprs(name)
        if not self.interpret:
            launch = self.launch(name)
            meta.update(num_warps=launch.num_warps, num_stages=launch.num_stages)
        return meta

    # -- launches ----------------------------------------------------------------------
    def _args(self, name: str, tables: dict, **values) -> list:
        """Kernel ``name``'s runtime arguments in signature order, from ``values`` and the
        index ``tables`` by argument name (``lower.paths.Path.kernel_tables``: the schedule's
        own, or built per call; only those the kernel reads are passed)."""
        return [values[a] if a in values else tables[a] for a in self.signature(name)]

    def _n_tiles(self, n: int, side: str, name: str = "fwd") -> int:
        """Query (side "q") or key tiles a launch of kernel ``name`` covers: its schedule's,
        or for a scattered schedule those of the packed sequence of ``n`` rows (a multiple of
        both tiles)."""
        g = self.schedule_of(name).geometry
        if self.path.grid_free:
            return n // (g.block_m if side == "q" else g.block_n)
        return g.n_q_tiles if side == "q" else g.n_k_tiles

    def _modifier_inputs(self, modifiers, head_scale, device) -> dict:
        return modifier_inputs(self.mods, modifiers, head_scale, device)

    def forward(self, q, k, v, scale: float, tables: dict, modifiers=None, head_scale=None, key_valid=None):
        """out, lse; ``modifiers`` (``dsl.modifiers.Modifiers``, their tensors) and ``head_scale``
        ([H] scales replacing ``scale``) must match the spec the kernels were made for;
        ``key_valid``: bool [B, N] (True = real token), for the ``padding`` variant only."""
        extra = self._modifier_inputs(modifiers, head_scale, q.device) | self._padding_input(key_valid, q)
        b, h, n, _ = q.shape
        out = torch.empty_like(q)
        lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
        grid = (self._n_tiles(n, "q"), b * h)
        self._launch("fwd", grid, *self._args(
            "fwd", tables, **extra, Q=q, K=k, V=v, O=out, LSE=lse, stride_qb=q.stride(0), stride_qh=q.stride(1),
            stride_kb=k.stride(0), stride_kh=k.stride(1), stride_ob=out.stride(0), stride_oh=out.stride(1),
            qk_scale=scale * math.log2(math.e)))
        return out, lse

    def backward(self, q, k, v, out, lse, dout, scale: float, tables: dict, modifiers=None, head_scale=None,
                 key_valid=None):
        """dq, dk, dv, and the gradients of the modifiers' tensors (``dsl.modifiers.modifier_tensors``
        order; () without modifiers). ``tables``: the forward's; the dK/dV kernel's, when it
        has a schedule of its own (static patterns only), are that schedule's."""
        extra = self._modifier_inputs(modifiers, head_scale, q.device) | self._padding_input(key_valid, q)
        dkdv_tables = tables if self.dkdv_schedule is self.schedule else \
            self.path.kernel_tables(self.dkdv_schedule, [], q.device)
        rows = {name: torch.zeros(lse.shape, dtype=torch.float32, device=q.device)
                for name, on in (("DSCALE_ROWS", self.mods["head_scale"]), ("DSLOPE_ROWS", self.mods["alibi"])) if on}
        table = {}
        if self.mods["table"]:  # the bias table's gradient (added up by ``table_grad_kernel``)
            table = dict(DBIAS=torch.zeros(extra["BIAS_TABLE"].numel(), dtype=torch.int64, device=q.device),
                         BIAS_SCALE=fixed_point_scale(v, out, dout))
        dq_table, dkdv_table = (table, {}) if self.table_grad_kernel == "bwd_dq" else ({}, table)
        dq, delta = self.backward_dq(q, k, v, out, dout, lse, scale, tables, **extra, **rows, **dq_table)
        dk, dv = self.backward_dkdv(q, k, v, dout, lse, delta, scale, dkdv_tables, **extra, **dkdv_table)
        rows.update(table)
        return dq, dk, dv, self._modifier_grads(modifiers, head_scale, lse, delta, rows, dq)

    def _padding_input(self, key_valid, q) -> dict:
        if self.padding == "groups":
            b, _, n, _ = q.shape
            if key_valid is None or key_valid.dtype != torch.int32 or tuple(key_valid.shape) != (b, n):
                raise ValueError(f"the group-ids variant takes int32 ids [B={b}, N={n}] as key_valid, got "
                                 f"{None if key_valid is None else (key_valid.dtype, list(key_valid.shape))}")
            return dict(ROW_GROUP=key_valid.to(q.device).contiguous())
        if (key_valid is not None) != bool(self.padding):
            raise ValueError(f"key_valid {'is required by' if self.padding else 'needs'} the kernels' padding variant "
                             f"(TritonKernels(padding=True)); got {'none' if key_valid is None else 'a mask'}")
        if key_valid is None:
            return {}
        b, _, n, _ = q.shape
        if key_valid.dtype != torch.bool or tuple(key_valid.shape) != (b, n):
            raise ValueError(f"key_valid must be a bool [B={b}, N={n}] tensor, got {key_valid.dtype} "
                             f"{list(key_valid.shape)}")
        return dict(KEY_VALID=key_valid.to(device=q.device, dtype=torch.int8).contiguous())

    def _modifier_grads(self, modifiers, head_scale, lse, delta, rows, dq) -> tuple:
        """Gradients of the modifiers' tensors (``dsl.modifiers.modifier_tensors`` order: the
        biases', the sinks', the per-head scale), each a fixed-order sum over rows of per-row
        partials the dQ kernel stored, or for a bias table the dQ kernel's fixed-point sums
        (integer atomics: exact in any order); bitwise reproducible either way."""
        def over_rows(t):  # [B, H, N] -> [H], in float64 then the parameter's dtype
            return t.double().sum(dim=(0, 2))
        grads = []
        for m in (modifiers.biases if modifiers else ()):
            if type(m).__name__ == "ALiBi":
                grads.append(over_rows(rows["DSLOPE_ROWS"]).to(m.slopes.dtype))
                continue
            dtable = rows["DBIAS"].double().reshape(m.table.shape[0], -1) / rows["BIAS_SCALE"].double()
            # a row with a non-finite dS leaves its head's dQ non-finite: its table gradient is NaN
            finite = torch.isfinite(dq).flatten(2).all(dim=2).all(dim=0)
            grads.append(torch.where(finite[:, None], dtable, math.nan).reshape(m.table.shape).to(m.table.dtype))
        if modifiers and modifiers.sinks is not None:
            sink = modifiers.sinks.logits.detach().double().to(lse.device)
            p_sink = torch.exp(sink[None, :, None] - lse.double())   # the sink's probability per row
            grads.append(over_rows(-p_sink * delta.double()).to(modifiers.sinks.logits.dtype))
        if head_scale is not None:
            grads.append(over_rows(rows["DSCALE_ROWS"]).to(head_scale.dtype))
        return tuple(grads)

    def _backward_args(self, q, k, v, dout, lse, delta, scale: float) -> dict:
        return dict(Q=q, K=k, V=v, DO=dout, LSE=lse, DELTA=delta, stride_qb=q.stride(0), stride_qh=q.stride(1),
                    stride_kb=k.stride(0), stride_kh=k.stride(1), sm_scale=scale, qk_scale=scale * math.log2(math.e))

    def backward_dq(self, q, k, v, out, dout, lse, scale: float, tables: dict, **extra):
        """(dq [B, H, N, D], delta [B, H, N] fp32 = rowsum(dO * O)): the ``bwd_dq`` kernel
        alone, which computes delta in its prologue for the dK/dV kernel."""
        dq = torch.empty_like(q)
        delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
        grid = (self._n_tiles(q.shape[2], "q"), q.shape[0] * q.shape[1])
        self._launch("bwd_dq", grid, *self._args("bwd_dq", tables, **extra, DQ=dq, O=out, stride_ob=out.stride(0),
                                                 stride_oh=out.stride(1),
                                                 **self._backward_args(q, k, v, dout, lse, delta, scale)))
        return dq, delta

    def backward_dkdv(self, q, k, v, dout, lse, delta, scale: float, tables: dict, **extra):
        """dk, dv [B, KVH, N, D] (the ``bwd_dkdv`` kernel alone, on ``dkdv_schedule``'s
        inverse ``tables``); delta from ``backward_dq``."""
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        grid = (self._n_tiles(k.shape[2], "k", "bwd_dkdv"), k.shape[0] * k.shape[1])
        self._launch("bwd_dkdv", grid, *self._args("bwd_dkdv", tables, **extra, DK=dk, DV=dv,
                                                   **self._backward_args(q, k, v, dout, lse, delta, scale)))
        return dk, dv

    # -- ahead-of-time compile (no GPU needed) -----------------------------------------------
    KERNELS = KERNELS

    def table_arguments(self, name: str) -> list[str]:
        """The schedule tables kernel ``name`` reads: the forward CSR (forward and dQ: their
        PARTIAL tiles, and the FULL ones too without closed-form bounds), or, for dK/dV, the
        inverse CSR of its schedule."""
        if name == "bwd_dkdv":
            return ["Q_PTR", "Q_IDX", "Q_FULL", "HEAD_GROUP"]
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
        elif name == "bwd_dq":
            sig.update(Q=dt, K=dt, V=dt, O=dt, DO=dt, LSE="*fp32", DELTA="*fp32", DQ=dt)
        else:
            sig.update(Q=dt, K=dt, V=dt, DO=dt, LSE="*fp32", DELTA="*fp32", DK=dt, DV=dt)
        # the score modifiers' tensors (``codegen.templates`` modifier_arguments, in this order)
        m = self.mods
        sig.update({arg: "*fp32" for arg, key in MODIFIER_ARGUMENTS if m[key]})
        if name == "bwd_dq":
            sig.update({arg: "*fp32" for arg, on in (("DSCALE_ROWS", m["head_scale"]), ("DSLOPE_ROWS", m["alibi"]))
                        if on})
        if name == self.table_grad_kernel:
            sig.update(DBIAS="*i64", BIAS_SCALE="*fp32")
        if self.padding == "groups":
            sig["ROW_GROUP"] = "*i32"
        elif self.padding:
            sig["KEY_VALID"] = "*i8"
        sig.update({t: "*i32" for t in tables})
        if self.path.grid_free:
            # segment ids of the packed rows and the packed length (a multiple of 16)
            sig.update(SEG="*i32", n_tokens="i32:16")
        strides = ["stride_qb", "stride_qh", "stride_kb", "stride_kh"]
        if name in ("fwd", "bwd_dq"):
            strides += ["stride_ob", "stride_oh"]
        sig.update({s: self._stride_type(s) for s in strides})
        if name == "fwd":
            sig["qk_scale"] = "fp32"
        else:
            sig.update(sm_scale="fp32", qk_scale="fp32")
        return sig

    def _stride_type(self, stride: str) -> str:
        """What the JIT infers for ``stride`` of contiguous tensors of the schedule's problem
        (one batch element more or less changes nothing): a multiple of 16 in 32 bits, or a
        64-bit integer from 2^31 on (B*H*N*D passes 2^31 in real use: the kernels compute the
        batch and head offsets in 64 bits either way)."""
        p = self.schedule.problem
        if self.path.grid_free:  # segments: the packed length comes with each call
            return "i32:16"
        rows = p.tokens * p.head_dim
        heads = p.kv_heads if stride.startswith("stride_k") else p.heads
        value = rows * heads if stride.endswith("b") else rows
        return "i64" if value >= 2 ** 31 else "i32:16"

    def aot(self, name: str, target="sm_90"):
        """Compile kernel ``name`` for ``target`` on the CPU; returns its ResourceReport."""
        if self.interpret:
            raise ValueError("ahead-of-time compile needs TritonKernels(interpret=False)")
        launch = self.launch(name)
        return aot_compile(self.kernel(name), self.signature(name), self.constexprs(name), target=target,
                           num_warps=launch.num_warps, num_stages=launch.num_stages)

