"""Ahead-of-time compilation of Triton kernels for real CUDA targets, without a GPU.

``aot_compile`` runs Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin) for a
chosen compute capability on the CPU, then runs the ``ptxas`` bundled with Triton once
more with ``-v`` on the PTX to read what Triton does not keep: registers per thread and
spill bytes. The result is a small frozen :class:`ResourceReport` (shared memory,
registers, spills, which tensor-core instructions the PTX uses) plus the PTX itself, so
CPU tests can assert "sm_90 code uses wgmma", "sm_80 code uses mma", "nothing spills".

Nothing is cached here (Triton's own on-disk cache, ``TRITON_CACHE_DIR``, still applies to
the Triton pipeline; the ``ptxas -v`` run is repeated each call and costs tens of ms for
ordinary kernels).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import threading
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .. import envvars
from .sass import analyse, disassemble

# Before Triton reads it: the generated code must not depend on Triton's changing default.
envvars.pin_triton_fp_fusion()

__all__ = ["ResourceReport", "SUPPORTED_TARGETS", "aot_compile", "parse_target", "tensor_core_kind"]

#: Compute capabilities ``aot_compile`` accepts.
SUPPORTED_TARGETS: tuple[int, ...] = (80, 86, 89, 90, 100)

_TARGET_RE = re.compile(r"(?:cuda:)?(?:sm_?)?(\d+)a?", re.IGNORECASE)

# One triton.compile at a time: it may briefly switch the process-wide interpreter knob
# off (see _compile_lock use below). ptxas runs outside the lock, so callers that compile
# from several threads still overlap the ptxas part.
_compile_lock = threading.Lock()


@dataclass(frozen=True)
class ResourceReport:
    """What one compiled kernel needs from the GPU. Frozen and hashable; ``ptx`` is carried
    along but left out of ``repr``, equality and hashing."""

    target: str  # "sm_80", "sm_90", "sm_100", ...
    num_warps: int
    num_stages: int
    shared_bytes: int  # shared memory Triton allocates for the kernel (metadata "shared")
    registers: int  # per thread, from ptxas -v
    spill_stores: int  # bytes, from ptxas -v (summed over every function in the module)
    spill_loads: int  # bytes, from ptxas -v
    tensor_core: str  # "tcgen05" (sm_100), "wgmma" (sm_90), "mma" (mma.sync) or "none"
    ptx: str = field(repr=False, compare=False)
    #: ptxas's "wgmma ... serialized" performance warnings (C7510-C7515, e.g. "C7515: ...
    #: non wgmma instructions defining accumulator registers"); each costs 10-25% silently
    serialized: tuple[str, ...] = ()
    cubin: bytes = field(default=b"", repr=False, compare=False)

    @property
    def spills(self) -> int:
        """Total spill traffic in bytes (stores + loads); 0 means nothing spilled."""
        return self.spill_stores + self.spill_loads

    def sass(self):
        """The ``backends.sass.SassReport`` of the cubin: loops, wgmma/HMMA counts and shapes."""
        return analyse(disassemble(self.cubin))

    def as_dict(self) -> dict[str, Any]:
        """Every field except ``ptx`` and ``cubin``, plus ``spills``; JSON-ready."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("ptx", "cubin")}
        d["spills"] = self.spills
        return d


# --------------------------------------------------------------------------- targets


def parse_target(text: str | int) -> int:
    """``"sm_90"``, ``"sm90"``, ``"sm_90a"``, ``"90"``, ``"cuda:90"`` (or the int ``90``) -> ``90``.

    Raises ``ValueError`` naming the argument for anything else or for an unsupported
    capability (supported: 80, 86, 89, 90, 100).
    """
    expected = (f"one of {', '.join(f'sm_{c}' for c in SUPPORTED_TARGETS)} "
                "(written like 'sm_90', 'sm90', '90' or 'cuda:90')")
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise TypeError(f"target={text!r} ({type(text).__name__}) is not a target: expected {expected}")
    if isinstance(text, int):
        cap = text
    else:
        m = _TARGET_RE.fullmatch(text.strip())
        if m is None:
            raise ValueError(f"target={text!r} is not a CUDA target: expected {expected}")
        cap = int(m.group(1))
    if cap not in SUPPORTED_TARGETS:
        raise ValueError(f"target={text!r} (compute capability {cap}) is not supported: expected {expected}")
    return cap


def _target_name(cap: int) -> str:
    return f"sm_{cap}"


# --------------------------------------------------------------------------- kernels


def _resolve_kernel(fn: Any):
    """The JITFunction to compile: ``fn`` itself, the function under an autotuner/heuristics
    wrapper (``.fn`` chain), or - for a kernel made while ``TRITON_INTERPRET=1`` was set - a
    fresh JITFunction rebuilt from the InterpretedFunction's Python function (its
    interpreted helpers, reached through globals or closures, are rebuilt too)."""
    from triton.runtime.jit import JITFunction

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every supported triton has it
        InterpretedFunction = ()  # type: ignore[assignment]

    obj = fn
    for _ in range(8):  # Autotuner(Heuristics(JITFunction)) and the like
        if isinstance(obj, JITFunction):
            return obj
        if InterpretedFunction and isinstance(obj, InterpretedFunction):
            return _Reviver(JITFunction, InterpretedFunction).jit(obj)
        inner = getattr(obj, "fn", None)
        if inner is None or inner is obj or isinstance(obj, types.FunctionType):
            break
        obj = inner
    raise TypeError(f"fn={fn!r} ({type(fn).__name__}) is not a Triton kernel: expected a function "
                    "decorated with @triton.jit (a JITFunction, or the InterpretedFunction "
                    "@triton.jit makes under TRITON_INTERPRET=1)")


class _Reviver:
    """Turns InterpretedFunctions back into JITFunctions, sharing one copy of each module's
    globals so helpers that call each other keep pointing at the revived versions. The
    caller's module globals are never modified."""

    def __init__(self, jit_cls, interp_cls):
        self._jit_cls = jit_cls
        self._interp_cls = interp_cls
        self._done: dict[int, Any] = {}  # id(InterpretedFunction) -> JITFunction
        self._globals: dict[int, dict] = {}  # id(original globals) -> patched copy
        self._keep: list[Any] = []  # keep originals alive so ids stay unique

    def jit(self, interp):
        key = id(interp)
        if key in self._done:
            return self._done[key]
        f = interp.fn
        if not isinstance(f, types.FunctionType):
            raise TypeError(f"fn: cannot recover a @triton.jit function from interpreted {interp!r}")
        gkey = id(f.__globals__)
        fresh_globals = gkey not in self._globals
        if fresh_globals:
            self._globals[gkey] = dict(f.__globals__)
        g = self._globals[gkey]
        cells = None
        if f.__closure__:
            cells = tuple(types.CellType(c.cell_contents) if _cell_full(c) else types.CellType()
                          for c in f.__closure__)
        new_f = types.FunctionType(f.__code__, g, f.__name__, f.__defaults__, cells)
        new_f.__kwdefaults__ = f.__kwdefaults__
        new_f.__qualname__ = f.__qualname__
        new_f.__module__ = f.__module__
        new_f.__doc__ = f.__doc__
        new_f.__annotations__ = dict(f.__annotations__)  # tl.constexpr annotations live here
        new_f.__dict__.update(f.__dict__)
        jf = self._jit_cls(new_f, **getattr(interp, "kwargs", {}))
        self._done[key] = jf
        self._keep.append(interp)
        # Fill in references after registering, so recursion through globals terminates.
        if fresh_globals:
            for name, value in list(g.items()):
                if isinstance(value, self._interp_cls):
                    g[name] = self.jit(value)
        for cell in cells or ():
            if _cell_full(cell) and isinstance(cell.cell_contents, self._interp_cls):
                cell.cell_contents = self.jit(cell.cell_contents)
        return jf


def _cell_full(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- signature


def _check_type(name: str, ty: str) -> None:
    import triton.language as tl

    try:
        tl.str_to_ty(ty, None)
    except Exception as e:  # KeyError, IndexError, ValueError for malformed strings
        raise ValueError(f"signature[{name!r}]={ty!r} is not a Triton type: expected e.g. '*fp16', "
                         "'*bf16', '*fp32', 'i32', 'i64', 'fp32' or 'constexpr' "
                         f"(optionally with ':16' for a divisibility hint)") from e


def _build_source_args(jf, signature: Mapping[str, str], constexprs: Mapping[str, object],
                       assume_aligned: bool):
    """Validated (signature, constexprs, attrs) for ASTSource, in parameter order."""
    if not isinstance(signature, Mapping):
        raise TypeError(f"signature={signature!r} must be a dict of parameter name -> type string")
    if not isinstance(constexprs, Mapping):
        raise TypeError(f"constexprs={constexprs!r} must be a dict of parameter name -> value")
    params = {p.name: p for p in jf.params}
    kname = jf.__name__
    for arg, mapping in (("signature", signature), ("constexprs", constexprs)):
        unknown = [k for k in mapping if k not in params]
        if unknown:
            raise ValueError(f"{arg} names {unknown}, which are not parameters of kernel {kname!r}: "
                             f"expected names among {list(params)}")

    sig: dict[str, str] = {}
    consts: dict[str, object] = {}
    attrs: dict[tuple[int], list] = {}
    for i, (name, p) in enumerate(params.items()):
        raw = signature.get(name)
        if raw is not None and not isinstance(raw, str):
            raise TypeError(f"signature[{name!r}]={raw!r} must be a type string like '*fp16' or 'i32'")
        ty, _, hint = (raw or "").strip().partition(":")
        ty = ty.strip()
        if name in constexprs:
            if ty not in ("", "constexpr"):
                raise ValueError(f"signature[{name!r}]={raw!r} contradicts constexprs[{name!r}]="
                                 f"{constexprs[name]!r}: expected 'constexpr' (or leave it out of signature)")
            sig[name] = "constexpr"
            consts[name] = constexprs[name]
            continue
        if ty == "constexpr" or (not ty and p.is_constexpr):
            if p.has_default:
                sig[name] = "constexpr"
                consts[name] = p.default
                continue
            raise ValueError(f"constexprs has no value for {name!r}, a constexpr parameter of kernel "
                             f"{kname!r}: expected constexprs[{name!r}] = <value>")
        if not ty:
            raise ValueError(f"signature has no type for parameter {name!r} of kernel {kname!r}: "
                             "expected e.g. '*fp16', 'i32' or 'constexpr'")
        if p.is_constexpr:
            raise ValueError(f"signature[{name!r}]={raw!r}, but {name!r} is annotated tl.constexpr in "
                             f"kernel {kname!r}: expected its value in constexprs")
        _check_type(name, ty)
        sig[name] = ty
        hint = hint.strip()
        if hint:
            if hint != "16":
                raise ValueError(f"signature[{name!r}]={raw!r} has hint {hint!r}: expected ':16' "
                                 "(pass a value of 1 through constexprs instead)")
            attrs[(i, )] = [["tt.divisibility", 16]]
        elif assume_aligned and ty.startswith("*") and not p.do_not_specialize_on_alignment:
            # What the JIT infers for a 16-byte aligned tensor (every fresh torch allocation).
            attrs[(i, )] = [["tt.divisibility", 16]]
    return sig, consts, attrs


# --------------------------------------------------------------------------- ptxas

_ENTRY_RE = re.compile(r"Compiling entry function '([^']+)'")
_REGS_RE = re.compile(r"Used (\d+) registers")
_SPILL_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
#: ptxas warnings that wgmma instructions were serialized (C7510-C7515), with their reason.
_SERIALIZED_RE = re.compile(r"\((C751[0-5])\)[^:\n]*:?\s*([^\n]*)")


def _ptxas_command(cap: int, ptx_path: str, metadata) -> list[str]:
    """The ptxas command Triton's CUDA backend runs (triton/backends/nvidia/compiler.py,
    ``make_cubin``), with the output thrown away. The flags change the allocation
    (``-lineinfo`` alone moves spill counts), so they are mirrored, not simplified."""
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    if knobs.compilation.disable_line_info:
        debug = ["-lineinfo", "-suppress-debug-info"]
    elif knobs.nvidia.disable_ptxas_opt:
        debug = ["-g"]
    else:
        debug = ["-lineinfo"]
    fmad = [] if getattr(metadata, "enable_fp_fusion", True) else ["--fmad=false"]
    no_opt = ["--opt-level", "0"] if knobs.nvidia.disable_ptxas_opt else []
    ptx_options = getattr(metadata, "ptx_options", None)
    extra = ptx_options.split(" ") if ptx_options else []
    return [get_ptxas(cap).path, *debug, *fmad, "-v", *no_opt, "--regAllocOptLevel=2", *extra,
            f"--gpu-name={sm_arch_from_capability(cap)}", ptx_path, "-o", os.devnull]


def _ptxas_resources(cap: int, ptx: str, metadata) -> tuple[int, int, int, tuple[str, ...]]:
    """(registers, spill store bytes, spill load bytes, wgmma serialization warnings) of the
    kernel's entry function."""
    with tempfile.TemporaryDirectory(prefix="sparseforge-aot-") as tmp:
        ptx_path = os.path.join(tmp, "kernel.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        cmd = _ptxas_command(cap, ptx_path, metadata)
        proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed (exit {proc.returncode}) on the PTX Triton produced:\n{log}\n"
                           f"command: {' '.join(cmd)}")
    return (*_parse_ptxas_log(log, getattr(metadata, "name", None)), serialization_warnings(log))


def serialization_warnings(log: str) -> tuple[str, ...]:
    """``"C7515: <reason>"`` for every distinct wgmma serialization warning in a ptxas log."""
    return tuple(dict.fromkeys(f"{code}: {why.strip()}" for code, why in _SERIALIZED_RE.findall(log)))


def _parse_ptxas_log(log: str, entry: str | None = None) -> tuple[int, int, int]:
    """Registers of the entry function (``entry`` or the first one) and spill bytes summed over
    every function ptxas reports (noinline helpers spill on the kernel's behalf)."""
    start = 0
    for m in _ENTRY_RE.finditer(log):
        if entry is None or m.group(1) == entry:
            start = m.end()
            break
    regs = _REGS_RE.search(log, start)
    if regs is None:
        raise RuntimeError(f"could not find 'Used N registers' in the ptxas -v output:\n{log}")
    stores = loads = 0
    for m in _SPILL_RE.finditer(log):
        stores += int(m.group(2))
        loads += int(m.group(3))
    return int(regs.group(1)), stores, loads


# --------------------------------------------------------------------------- PTX scan

_TC_PATTERNS = (
    ("tcgen05", re.compile(r"\btcgen05\.mma\b")),
    ("wgmma", re.compile(r"\bwgmma\.mma_async\b")),
    ("mma", re.compile(r"\bmma\.sync\b")),
)


def tensor_core_kind(ptx: str) -> str:
    """``"tcgen05"`` (Blackwell), ``"wgmma"`` (Hopper), ``"mma"`` (``mma.sync``, Ampere-style)
    or ``"none"``; the newest kind present wins."""
    for kind, pattern in _TC_PATTERNS:
        if pattern.search(ptx):
            return kind
    return "none"


# --------------------------------------------------------------------------- compile


def aot_compile(fn, signature: dict[str, str], constexprs: dict[str, object], *, target: str | int = "sm_90",
                num_warps: int = 4, num_stages: int = 2, assume_aligned: bool = True) -> ResourceReport:
    """Compile a ``@triton.jit`` kernel for ``target`` on the CPU and report its resources.

    ``signature`` maps parameter names to Triton type strings (``"*fp16"``, ``"*bf16"``,
    ``"i32"``, ...), optionally with a ``":16"`` divisibility hint (``"i32:16"``); constexpr
    parameters may be listed as ``"constexpr"`` or left out, and take their values from
    ``constexprs`` (or their defaults). With ``assume_aligned`` (the default) every pointer is
    taken as 16-byte aligned, which is what Triton's JIT infers for fresh torch tensors, so the
    report describes the code that would actually run.
    """
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cap = parse_target(target)
    if isinstance(num_warps, bool) or not isinstance(num_warps, int) or num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"num_warps={num_warps!r} is invalid: expected a power of two from 1 to 32")
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages={num_stages!r} is invalid: expected an int >= 1")

    jf = _resolve_kernel(fn)
    sig, consts, attrs = _build_source_args(jf, signature, constexprs, assume_aligned)
    src = ASTSource(fn=jf, signature=sig, constexprs=consts, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}

    with _compile_lock:
        if knobs.runtime.interpret:
            # Under TRITON_INTERPRET=1 Triton's constexpr functions return raw values; the real
            # compiler needs the compiled semantics, so switch it off for this call only.
            with knobs.runtime.scope():
                knobs.runtime.interpret = False
                compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
        else:
            compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)

    md = compiled.metadata
    ptx = compiled.asm["ptx"]
    registers, spill_stores, spill_loads, serialized = _ptxas_resources(cap, ptx, md)
    return ResourceReport(
        target=_target_name(cap),
        num_warps=int(md.num_warps),
        num_stages=int(md.num_stages),
        shared_bytes=int(md.shared or 0),
        registers=registers,
        spill_stores=spill_stores,
        spill_loads=spill_loads,
        tensor_core=tensor_core_kind(ptx),
        ptx=ptx,
        cubin=bytes(compiled.asm.get("cubin", b"")),
        serialized=serialized,
    )
