"""Static (no GPU) comparison of our kernels with FlexAttention's own Triton templates on
the suite's static problems: SASS per tile loop, issue slots per allowed (query, key) pair,
registers, spills and ptxas's wgmma serialization warnings, all from ahead-of-time compiles
for sm_90 on the CPU (``backends.aot``, ``backends.sass``).

FlexAttention's kernels are torch's own templates (``torch/_inductor/kernel/flex/templates``:
``flex_attention.py.jinja`` + ``utilities`` + ``common`` for the forward,
``flex_backwards.py.jinja`` + ``utilities`` for the backward), rendered here with Jinja the
way inductor renders them (``select_algorithm.TritonTemplateKernel``): our own small
implementations of the template hooks (``def_kernel``, ``gen_defines``, ``gen_argdefs``,
``size``, ``stride``, ``modification``, ``store_output``) stand in for inductor's, because
inductor cannot lower a graph for a CUDA device on a CPU-only torch. The mask_mod of every
problem is written op by op (the ops its torch expression lowers to: floordiv, remainder,
clamp -> maximum/minimum, comparisons, and/or, where) and printed by inductor's own
``TritonOverrides``, so the inlined mask code is inductor's text for those ops. The
block-sparse metadata are kernel pointer arguments as in inductor (KV_NUM_BLKS, KV_IDX,
FULL_KV_NUM_BLKS, FULL_KV_IDX and the Q_* ones for the backward), and the launch
(BLOCK_M/BLOCK_N, warps, stages) is FlexAttention's default for the head dim and dtype on
an H100 (``CUDAConfigHeuristic`` asked with compute capability 9.0).

Counting (per batch element; both sides scale with the batch alike):

- FlexAttention visits 128x128 blocks of the row-major sequence (its default BlockMask);
  a block is FULL when every pair is allowed (padding rows/keys never are) and PARTIAL when
  some are. The counts are exact: from the dense mask where N^2 is small, per-dimension
  key-run counts for separable families (any size), the block layout for causal S2.
- Ours (``codegen.config.default_config`` for the target's compute capability): each kernel's
  FULL and PARTIAL tile loops run as often as the schedule it walks says
  (``TritonKernels.schedule_of``): fwd and dQ, per query head and query tile, the FULL and
  PARTIAL key tiles of the forward schedule; dK/dV, per key tile and query head of each
  key/value head's group, the FULL (``Q_FULL``) and PARTIAL query tiles of the inverse tables
  of its own schedule (``TritonKernels.dkdv_schedule``: on sm_90 a stationary 128- or 64-key
  tile for 16-bit inputs).
- Issue slots per allowed pair = sum over tile loops of SASS instructions per iteration x
  iterations x num_warps / allowed pairs (``backends.sass.issue_slots_per_pair``).

Numbers here are static figures, not timings: nothing runs on a GPU.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import itertools
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

import sparseforge as sf
from sparseforge.dsl.pattern import Intersection, PerHead, Union, as_4d
from sparseforge.dsl.semantics import make_context
from sparseforge.lower.families import SEPARABLE, head_signature, leaf_for_head

SCHEMA = 2  # 2: one module per kernel; dK/dV on its own schedule, FULL/PARTIAL loops everywhere
#: Our kernel templates (their hash is recorded with every result).
OUR_TEMPLATES = Path(__file__).parents[1] / "codegen" / "templates"
#: FlexAttention's sparse block size (BlockMask default, ``_DEFAULT_SPARSE_BLOCK_SIZE``).
FLEX_BLOCK = 128
#: Largest N^2 x head groups counted from the dense mask.
DENSE_BUDGET = 1.2e9
#: Largest last-dimension extent for which its 1-D mask is tabulated (prefix sums).
PREFIX_TABLE_LIMIT = 4096


# ======================================================================================
# FlexAttention: default launch configs (H100), template rendering, mask_mod code
# ======================================================================================
@dataclasses.dataclass(frozen=True)
class FlexConfig:
    """FlexAttention's launch on sm_90 for one head dim and dtype."""

    fwd_block_m: int
    fwd_block_n: int
    fwd_warps: int
    fwd_stages: int
    block_m1: int  # dK/dV: query rows per step
    block_n1: int  # dK/dV: key rows per program
    block_m2: int  # dQ: query rows per program
    block_n2: int  # dQ: key rows per step
    bwd_warps: int
    bwd_stages: int
    source: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def flex_default_config(head_dim: int, dtype: torch.dtype) -> FlexConfig:
    """FlexAttention's default (not autotuned) forward and backward configs on an H100: torch's
    own ``CUDAConfigHeuristic.get_flex_attn_{fwd,bwd}_configs`` with the device capability
    reported as (9, 0) (this machine has no GPU to ask)."""
    from unittest import mock

    from torch._inductor import config as inductor_config
    from torch._inductor.template_heuristics.triton import CUDAConfigHeuristic

    heuristic = CUDAConfigHeuristic()
    with mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)), \
            mock.patch.object(inductor_config, "max_autotune", False):
        (fwd,) = heuristic.get_flex_attn_fwd_configs(head_dim, dtype)
        (bwd,) = heuristic.get_flex_attn_bwd_configs(head_dim, dtype)
    return FlexConfig(fwd.block_m, fwd.block_n, fwd.num_warps, fwd.num_stages, bwd.block_m1, bwd.block_n1,
                      bwd.block_m2, bwd.block_n2, bwd.num_warps, bwd.num_stages,
                      source="torch._inductor.template_heuristics.triton.CUDAConfigHeuristic, capability (9, 0), "
                             "max_autotune off")


def _flex_template_dir() -> Path:
    import torch._inductor.kernel.flex as flex_pkg

    return Path(flex_pkg.__file__).parent / "templates"


def _load_template(name: str) -> str:
    return (_flex_template_dir() / f"{name}.py.jinja").read_text()


#: Which template files make each kernel (as ``torch/_inductor/kernel/flex/flex_attention.py``).
FLEX_TEMPLATES = {"fwd": ("flex_attention", "utilities", "common"), "bwd": ("flex_backwards", "utilities")}

_IMPORTS = """import triton
import triton.language as tl

from torch._inductor.runtime import triton_helpers
from torch._inductor.runtime.triton_helpers import libdevice, math as tl_math
"""


# --------------------------------------------------------------------------- mask_mod ops
class _Var(str):
    """A name or expression of the printed mask code."""


class _InductorPrinter:
    """An ops handler that prints each op with inductor's ``TritonOverrides`` into
    ``tmpN = <expr>`` lines (common subexpressions printed once), as inductor's CSE does."""

    def __init__(self, counter):
        self.lines: list[str] = []
        self._counter = counter
        self._cache: dict[str, _Var] = {}

    def __getattr__(self, name):
        from torch._inductor.codegen.triton import TritonOverrides

        fn = getattr(TritonOverrides, name)

        def call(*args, **kwargs):
            expr = str(fn(*args, **kwargs))
            if expr not in self._cache:
                var = _Var(f"tmp{next(self._counter)}")
                self.lines.append(f"{var} = {expr}")
                self._cache[expr] = var
            return self._cache[expr]
        return call


class _Ops:
    """The few ops a mask_mod lowers to, on two backends: ``torch`` (int64 tensors, to check
    the mask against ``sf.dense_mask``) and ``printer`` (inductor's Triton text)."""

    def __init__(self, printer: _InductorPrinter | None = None):
        self.p = printer

    def _emit(self, name, *args):
        from torch._inductor.virtualized import V

        with V.set_ops_handler(self.p):
            from torch._inductor.virtualized import ops
            return getattr(ops, name)(*args)

    def const(self, v: int):
        return torch.tensor(v, dtype=torch.int64) if self.p is None else self._emit("constant", v, torch.int32)

    def _c(self, x):
        return self.const(x) if isinstance(x, int) else x

    def floordiv(self, a, b):
        b = self._c(b)
        return torch.div(a, b, rounding_mode="floor") if self.p is None else self._emit("floordiv", a, b)

    def mod(self, a, b):  # Python / torch remainder (sign of the divisor)
        b = self._c(b)
        return torch.remainder(a, b) if self.p is None else self._emit("remainder", a, b)

    def add(self, a, b):
        a, b = self._c(a), self._c(b)
        return a + b if self.p is None else self._emit("add", a, b)

    def sub(self, a, b):
        a, b = self._c(a), self._c(b)
        return a - b if self.p is None else self._emit("sub", a, b)

    def mul(self, a, b):
        a, b = self._c(a), self._c(b)
        return a * b if self.p is None else self._emit("mul", a, b)

    def maximum(self, a, b):
        a, b = self._c(a), self._c(b)
        return torch.maximum(a, b) if self.p is None else self._emit("maximum", a, b)

    def minimum(self, a, b):
        a, b = self._c(a), self._c(b)
        return torch.minimum(a, b) if self.p is None else self._emit("minimum", a, b)

    def clamp(self, x, lo, hi):  # torch.clamp lowers to clamp_min then clamp_max
        return self.minimum(self.maximum(x, lo), hi)

    def _cmp(self, name, a, b):
        a, b = self._c(a), self._c(b)
        if self.p is None:
            return getattr(torch, name)(a, b)
        return self._emit(name, a, b)

    def eq(self, a, b):
        return self._cmp("eq", a, b)

    def le(self, a, b):
        return self._cmp("le", a, b)

    def lt(self, a, b):
        return self._cmp("lt", a, b)

    def ge(self, a, b):
        return self._cmp("ge", a, b)

    def and_(self, a, b):
        return a & b if self.p is None else self._emit("and_", a, b)

    def or_(self, a, b):
        return a | b if self.p is None else self._emit("or_", a, b)

    def where(self, c, a, b):
        return torch.where(c, a, b) if self.p is None else self._emit("where", c, a, b)


def _coord(ops: _Ops, idx, grid: tuple[int, ...], d: int):
    """Row-major coordinate ``d`` of flat index ``idx``, as a user writes it
    (``idx // W`` and ``idx % W`` in 2-D)."""
    after = math.prod(grid[d + 1:])
    x = ops.floordiv(idx, after) if after > 1 else idx
    return ops.mod(x, grid[d]) if d > 0 else x


def _natten_1d(ops: _Ops, q, k, length: int, *, kernel, dilation, stride, causal):
    """NATTEN's 1-D rule (``dsl.local.natten_window``) written as a mask_mod."""
    if dilation > 1:
        group, i, kg = ops.mod(q, dilation), ops.floordiv(q, dilation), ops.floordiv(k, dilation)
        group_len = ops.floordiv(ops.sub(length + dilation - 1, group), dilation)
    else:
        group, i, kg, group_len = None, q, k, length
    if stride > 1:
        base = ops.mul(ops.floordiv(i, stride), stride)
        leader = ops.add(base, stride - 1 if causal else stride // 2)
        leader = ops.minimum(leader, ops.sub(group_len, 1) if dilation > 1 else length - 1)
    else:
        leader = i
    if causal:
        start, end = ops.maximum(ops.sub(leader, kernel - 1), 0), i
    else:
        hi = ops.sub(group_len, kernel) if dilation > 1 else length - kernel
        start = ops.clamp(ops.sub(leader, kernel // 2), 0, hi)
        end = ops.add(start, kernel - 1)
    allowed = ops.and_(ops.ge(kg, start), ops.le(kg, end))
    if dilation > 1:
        allowed = ops.and_(ops.eq(ops.mod(k, dilation), group), allowed)
    return allowed


def _separable_1d(ops: _Ops, leaf, q, k, length: int, p: dict):
    if isinstance(leaf, sf.Neighborhood):
        return _natten_1d(ops, q, k, length, **p)
    if isinstance(leaf, sf.SlidingWindow):
        diff = ops.sub(k, q)
        return ops.and_(ops.ge(diff, -p["left"]), ops.le(diff, p["right"]))
    if isinstance(leaf, sf.Halo):
        lo = ops.sub(ops.mul(ops.floordiv(q, p["block"]), p["block"]), p["halo"])
        return ops.and_(ops.ge(k, lo), ops.lt(k, ops.add(lo, p["block"] + 2 * p["halo"])))
    if isinstance(leaf, sf.Blocks):
        return ops.eq(ops.floordiv(q, p["size"]), ops.floordiv(k, p["size"]))
    if isinstance(leaf, sf.Grid):
        period = length // p["size"]
        return ops.eq(ops.mod(q, period), ops.mod(k, period))
    raise NotImplementedError(f"no FlexAttention mask_mod for {leaf!r}")


def mask_mod_expr(ops: _Ops, pattern: sf.Pattern, problem: sf.Problem, h, m, n):
    """The mask_mod of ``pattern`` (query index ``m``, key index ``n``, head ``h``) in ``ops``.
    Supported: the separable families, Causal, StridedShards (causal), and unions,
    intersections and per-head mixes of them."""
    grid = problem.grid
    if isinstance(pattern, SEPARABLE):
        out = None
        for d, p in enumerate(pattern.params(problem)):
            qd, kd = _coord(ops, m, grid, d), _coord(ops, n, grid, d)
            term = _separable_1d(ops, pattern, qd, kd, grid[d], p)
            out = term if out is None else ops.and_(out, term)
        return out
    if isinstance(pattern, sf.Causal):
        return ops.le(n, m)
    if isinstance(pattern, sf.StridedShards) and pattern.causal and not pattern.dense_heads:
        bs = pattern.block_size
        left, right = pattern.local_pair
        qb, kb = ops.floordiv(m, bs), ops.floordiv(n, bs)
        local = ops.and_(ops.lt(ops.sub(qb, kb), left), ops.lt(ops.sub(kb, qb), right))
        kv_head = ops.floordiv(h, problem.heads // problem.kv_heads) if problem.heads != problem.kv_heads else h
        shifted = ops.add(kb, ops.mul(kv_head, pattern.head_step(problem.heads)))
        vertical = ops.eq(ops.mod(shifted, pattern.vertical_stride), 0)
        return ops.and_(ops.or_(local, vertical), ops.le(n, m))
    if isinstance(pattern, (Intersection, Union)):
        parts = [mask_mod_expr(ops, p, problem, h, m, n) for p in pattern.parts]
        join = ops.and_ if isinstance(pattern, Intersection) else ops.or_
        return functools.reduce(join, parts)
    if isinstance(pattern, PerHead):
        runs = pattern.runs()
        if len(runs) == 1:
            return mask_mod_expr(ops, runs[0][0], problem, h, m, n)
        out, end = None, problem.heads
        for p, count in reversed(runs):  # where(h < first_end, first, where(h < ..., ..., last))
            e = mask_mod_expr(ops, p, problem, h, m, n)
            start = end - count
            out = e if out is None else ops.where(ops.lt(h, end), e, out)
            end = start
        return out
    raise NotImplementedError(f"no FlexAttention mask_mod for {pattern!r}")


# --------------------------------------------------------------------------- rendering
class _FlexKernelRender:
    """The template hooks of inductor's ``TritonTemplateKernel`` for one FlexAttention kernel
    with static shapes (contiguous [B, H, N, D] tensors)."""

    def __init__(self, kind: str, pattern, problem, batch: int, options: dict, arg_types: dict,
                 index_dtype: str):
        self.kind, self.pattern, self.problem, self.batch = kind, pattern, problem, batch
        self.options = options
        self.arg_types = arg_types       # argument name -> Triton type, in order (arg_Q, ..., out_ptr0)
        self.index_dtype = index_dtype
        self._tmp = itertools.count()
        self.sizes: dict[str, tuple[int, ...]] = {}

    # sizes and strides of the named inputs
    def add_tensor(self, name: str, shape: tuple[int, ...]):
        self.sizes[name] = tuple(int(s) for s in shape)

    def _strides(self, name):
        shape = self.sizes[name]
        return tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))

    def size(self, name, index):
        v = self.sizes[name][index]
        return f"tl.full([], {v}, dtype=INDEX_DTYPE)" if self.index_dtype == "tl.int64" else str(v)

    def stride(self, name, index=None):
        s = self._strides(name)
        return str(s[index]) if isinstance(index, int) else ", ".join(map(str, s))

    def gen_defines(self):
        lines = [f"{k} : tl.constexpr = {v}" for k, v in self.options.items()]
        lines.append(f"INDEX_DTYPE : tl.constexpr = {self.index_dtype}")
        return "\n".join(lines) + "\n"

    def gen_argdefs(self):
        return ", ".join(self.arg_types)

    @property
    def kernel_name(self):
        return "triton_flex_attention" if self.kind == "fwd" else "triton_flex_attention_backward"

    def def_kernel(self, *names):
        lines = ["@triton.jit", f"def {self.kernel_name}({self.gen_argdefs()}):"]
        lines += ["    " + x for x in self.gen_defines().splitlines()]
        lines += [f"    {n} = arg_{n}" for n in names]
        return "\n".join(lines) + "\n"

    def modification(self, subgraph_number, output_name, mask=None, input_shapes=None, input_dtypes=None,
                     **fixed):
        """Subgraphs: fwd 0 score_mod (identity), 1 mask_mod; bwd 0 score_mod (identity),
        1 joint graph (identity: the gradient passes through), 2 mask_mod, 3 captured-buffer
        gradients (none)."""
        mask_graph = 1 if self.kind == "fwd" else 2
        if subgraph_number == mask_graph:
            printer = _InductorPrinter(self._tmp)
            ops = _Ops(printer)
            out = mask_mod_expr(ops, self.pattern, self.problem, _Var(f"({fixed['h']})"),
                                _Var(f"({fixed['m']})"), _Var(f"({fixed['n']})"))
            return "\n".join(printer.lines + [f"{output_name} = {out}"]) + "\n"
        if subgraph_number == 0:   # identity score_mod
            var = f"tmp{next(self._tmp)}"
            return f"{var} = ({fixed['score']})\n{output_name} = {var}\n"
        if subgraph_number == 1:   # joint graph of the identity score_mod
            var = f"tmp{next(self._tmp)}"
            return f"{var} = ({fixed['grad_score_mod']})\n{output_name} = {var}\n"
        if subgraph_number == 3:   # no captured buffers: nothing to scatter
            return ""
        raise ValueError(f"unexpected subgraph {subgraph_number} in the {self.kind} template")

    def store_output(self, indices, val, mask=None, indent_width=4, val_shape=None, block_indexing=False):
        """``tl.store`` of the template's output (fwd: out [B, H, N, Dv]; bwd: dK [B, Hkv, N, D])
        at the dense strides of its layout, as inductor prints it."""
        shape = self.sizes["OUT"]
        strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
        terms = [f"({i})" if s == 1 else f"{s}*({i})" for i, s in zip(indices, strides)]
        index = " + ".join(reversed(terms))
        pad = " " * indent_width
        return (f"xindex = {index}\n{pad}tl.store(out_ptr0 + (tl.broadcast_to(xindex, [{', '.join(val_shape)}])), "
                f"{val}, {mask})")

    def render(self, source: str) -> str:
        from torch._inductor.codegen.common import KernelTemplate, jinja2_env

        env = jinja2_env()
        env.filters["indent_except_first"] = KernelTemplate.indent_except_first
        template = env.from_string(source)
        hooks = dict(def_kernel=self.def_kernel, size=self.size, stride=self.stride,
                     store_output=self.store_output, modification=self.modification,
                     gen_argdefs=self.gen_argdefs, gen_defines=self.gen_defines)
        return template.render(**hooks, **self.options)


def _int32_ok(numels) -> bool:
    return all(n < 2 ** 31 for n in numels)


def flex_kernel_source(kind: str, pattern: sf.Pattern, problem: sf.Problem, batch: int,
                       config: FlexConfig) -> tuple[str, dict[str, str], int, int]:
    """(module source, signature, num_warps, num_stages) of FlexAttention's ``kind`` ("fwd"
    or "bwd") kernel for ``pattern`` on ``problem`` with ``batch`` batch elements, rendered
    from torch's templates with FlexAttention's default options for training."""
    h, n, d = problem.heads, problem.tokens, problem.head_dim
    hkv = problem.kv_heads
    dt = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[problem.dtype]
    nb = -(-n // FLEX_BLOCK)
    per_head = len({head_signature(pattern, problem, i) for i in range(h)}) > 1
    sh = h if per_head else 1   # BlockMask heads (1: broadcast over heads)
    opts = dict(PRESCALE_QK=False, ROWS_GUARANTEED_SAFE=False, BLOCKS_ARE_CONTIGUOUS=False, WRITE_DQ=True,
                OUTPUT_LOGSUMEXP=True, OUTPUT_MAX=False, FLOAT32_PRECISION="'tf32'",
                IS_DIVISIBLE=n % 128 == 0, SM_SCALE=1.0 / math.sqrt(d), GQA_SHARED_HEADS=h // hkv,
                HAS_FULL_BLOCKS=True, QK_HEAD_DIM=d, QK_HEAD_DIM_ROUNDED=1 << (d - 1).bit_length(),
                V_HEAD_DIM=d, V_HEAD_DIM_ROUNDED=1 << (d - 1).bit_length(),
                SAFE_HEAD_DIM=d & (d - 1) == 0)
    if kind == "fwd":
        opts.update(USE_TMA=False, BLOCK_M=config.fwd_block_m, BLOCK_N=config.fwd_block_n)
        warps, stages = config.fwd_warps, config.fwd_stages
        names = ("Q", "K", "V", "LSE", "MAX", "KV_NUM_BLKS", "KV_IDX", "FULL_KV_NUM_BLKS", "FULL_KV_IDX")
        types = (dt, dt, dt, "*fp32", "*fp32", "*i32", "*i32", "*i32", "*i32")
        out_shape = (batch, h, n, d)
    else:
        opts.update(USE_TMA=False, BLOCK_M1=config.block_m1, BLOCK_N1=config.block_n1, BLOCK_M2=config.block_m2,
                    BLOCK_N2=config.block_n2)
        warps, stages = config.bwd_warps, config.bwd_stages
        names = ("Q", "K", "V", "LSE", "DELTA", "DO", "DQ", "DV", "KV_NUM_BLKS", "KV_IDX", "Q_NUM_BLKS", "Q_IDX",
                 "FULL_KV_NUM_BLKS", "FULL_KV_IDX", "FULL_Q_NUM_BLKS", "FULL_Q_IDX")
        types = (dt, dt, dt, "*fp32", "*fp32", dt, dt, dt) + ("*i32",) * 8
        out_shape = (batch, hkv, n, d)
    opts.update(SPARSE_Q_BLOCK_SIZE=FLEX_BLOCK, SPARSE_KV_BLOCK_SIZE=FLEX_BLOCK)
    shapes = dict(Q=(batch, h, n, d), K=(batch, hkv, n, d), V=(batch, hkv, n, d), DO=(batch, h, n, d),
                  DQ=(batch, h, n, d), DV=(batch, hkv, n, d), LSE=(batch, h, n), MAX=(batch, h, n),
                  DELTA=(batch, h, n), KV_NUM_BLKS=(1, sh, nb), KV_IDX=(1, sh, nb, nb), Q_NUM_BLKS=(1, sh, nb),
                  Q_IDX=(1, sh, nb, nb), FULL_KV_NUM_BLKS=(1, sh, nb), FULL_KV_IDX=(1, sh, nb, nb),
                  FULL_Q_NUM_BLKS=(1, sh, nb), FULL_Q_IDX=(1, sh, nb, nb), OUT=out_shape)
    index_dtype = "tl.int32" if _int32_ok(math.prod(s) for s in shapes.values()) else "tl.int64"
    arg_types = {f"arg_{nm}": ty for nm, ty in zip(names, types)}
    arg_types["out_ptr0"] = dt
    r = _FlexKernelRender(kind, pattern, problem, batch, opts, arg_types, index_dtype)
    for name, shape in shapes.items():
        r.add_tensor(name, shape)
    body = r.render("".join(_load_template(t) for t in FLEX_TEMPLATES[kind]))
    header = (f"# FlexAttention {kind} kernel rendered from torch {torch.__version__}'s templates "
              f"({' + '.join(FLEX_TEMPLATES[kind])}) by sparseforge.bench.static_report\n"
              f"# pattern {pattern!r}, problem {problem!r}, batch {batch}\n")
    return header + _IMPORTS + "\n" + body, arg_types, warps, stages


def _load_module(source: str, tag: str):
    """Write ``source`` under the cache directory (content-addressed) and import it: Triton
    reads a kernel's source through ``inspect``."""
    from sparseforge import envvars
    from sparseforge.atomic import write_atomic

    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    path = envvars.cache_dir() / "flex_static" / f"{tag}_{digest}.py"
    if not path.exists() or path.read_text() != source:
        write_atomic(path, source)
    name = f"sparseforge_flex_static.{tag}_{digest}"
    if name in sys.modules:
        return sys.modules[name], path
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[name] = mod
    return mod, path


def flex_aot(kind: str, pattern, problem, batch: int, config: FlexConfig, target="sm_90"):
    """(ResourceReport, source path) of FlexAttention's ``kind`` kernel compiled for ``target``."""
    from sparseforge.backends.aot import aot_compile

    source, sig, warps, stages = flex_kernel_source(kind, pattern, problem, batch, config)
    mod, path = _load_module(source, f"flex_{kind}")
    kernel = getattr(mod, "triton_flex_attention" if kind == "fwd" else "triton_flex_attention_backward")
    return aot_compile(kernel, sig, {}, target=target, num_warps=warps, num_stages=stages), path


# ======================================================================================
# SASS loops -> source loops (line info), for our kernels and FlexAttention's
# ======================================================================================
_LINE_RE = re.compile(r'^\s*//## File "([^"]+)", line (\d+)')
_ADDR_RE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s")


def sass_lines(cubin: bytes) -> dict[int, tuple[str, int]]:
    """Address -> (source file, line) of every instruction of the cubin's first function,
    from ``nvdisasm -g`` (bundled with Triton; Triton compiles with line info)."""
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.TemporaryDirectory(prefix="sparseforge-lines-") as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([tool, "-g", "-c", path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvdisasm failed (exit {proc.returncode}): {proc.stderr.strip()}")
    out: dict[int, tuple[str, int]] = {}
    current, sections = None, 0
    for line in proc.stdout.splitlines():
        if line.startswith("//--------------------- .text."):
            sections += 1
            if sections > 1:   # the first function only, as backends.sass.parse
                break
        m = _LINE_RE.match(line)
        if m:
            current = (m.group(1), int(m.group(2)))
            continue
        a = _ADDR_RE.match(line)
        if a and current is not None:
            out[int(a.group(1), 16)] = current
    return out


@dataclasses.dataclass(frozen=True)
class _Span:
    """A ``for`` loop of a kernel's source: its lines [first, last] (1-based), header,
    enclosing function and enclosing block headers."""

    first: int
    last: int
    header: str
    function: str
    ancestors: tuple[str, ...]


def _indent(text: str) -> int:
    return len(text) - len(text.lstrip(" "))


def _blocks(source: str, keyword: str) -> list[tuple[int, int, str, tuple[str, ...]]]:
    """(first, last, header, ancestor headers) of every block whose header starts with
    ``keyword`` (``"for "``, ``"if "``, ``"def "``)."""
    lines = source.splitlines()
    out = []
    for i, text in enumerate(lines):
        s = text.strip()
        if not s.startswith(keyword) or not s.endswith(":") and keyword != "def ":
            continue
        ind = _indent(text)
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > ind or lines[j].strip().startswith(")")):
            j += 1
        last = j
        anc, level = [], ind
        for k in range(i - 1, -1, -1):
            t = lines[k]
            if t.strip() and _indent(t) < level and not t.strip().startswith("#"):
                anc.append(t.strip())
                level = _indent(t)
                if level == 0:
                    break
        out.append((i + 1, last, s, tuple(anc)))
    return out


def source_loops(source: str) -> list[_Span]:
    spans = []
    for first, last, header, anc in _blocks(source, "for "):
        fn = next((a for a in anc if a.startswith("def ")), "")
        spans.append(_Span(first, last, header, fn.split("(")[0].removeprefix("def ").strip(), anc))
    return spans


def _loop_source(loop, lines: dict[int, tuple[str, int]]) -> tuple[str, str, list[int]]:
    """(file, its text, source lines of the loop's instructions in that file). The file is
    the one the line info names (the most common), not necessarily the one just written:
    Triton's cache may return a cubin compiled from an earlier file with the same kernel
    text, whose line numbers refer to that file."""
    files: dict[str, int] = {}
    for a, (f, _) in lines.items():
        if loop.start <= a <= loop.end:
            files[f] = files.get(f, 0) + 1
    if not files:
        raise RuntimeError(f"no line info for the SASS loop at {loop.start:#x}")
    path = max(files, key=files.get)
    text = Path(path).read_text()
    return path, text, [ln for a, (f, ln) in lines.items() if loop.start <= a <= loop.end and f == path]


#: The tile loops of our kernels by their source header (``for j in range(...)``): the forward
#: and dQ kernels walk a query tile's FULL then PARTIAL key tiles (closed-form box or forward
#: tables), the dK/dV kernel, per query head of the key/value head's group (``for g in
#: range(KV_GROUP)``), a key tile's FULL then PARTIAL query tiles (inverse tables).
OUR_LOOP_ROLES = {
    "fwd": {"range(full_begin, full_end)": "full", "range(partial_begin, partial_end)": "partial"},
    "bwd_dq": {"range(full_begin, full_end)": "full", "range(partial_begin, partial_end)": "partial"},
    "bwd_dkdv": {"range(0, n_full)": "full", "range(n_full, last - first)": "partial"},
}


def _our_role(kernel: str, span: _Span) -> str | None:
    header = re.sub(r"\s+", " ", span.header)
    for key, role in OUR_LOOP_ROLES[kernel].items():
        if f"in {key}:" in header:
            return role
    return None


def classify_our_loops(report, kernel: str) -> list[dict]:
    """Every tile loop (``SassReport.mma_loops``) of our kernel ``kernel`` ("fwd", "bwd_dq",
    "bwd_dkdv") with its source loop, the source loops around it (``enclosing``: the dK/dV
    kernel's loop over the query heads of a key/value head) and its role: "full" (FULL tiles
    only, no mask), "partial" (PARTIAL tiles, the pattern's predicate), or "containment" (a
    recompute inside a ``_fix`` containment kernel or under ``if polluted``: runs only when a
    stored row came out non-finite; not counted). A tile loop of any other shape is an error:
    the counting below would not know how often it runs."""
    if kernel not in OUR_LOOP_ROLES:
        raise ValueError(f"kernel must be one of {sorted(OUR_LOOP_ROLES)}, got {kernel!r}")
    sass = report.sass()
    lines = sass_lines(report.cubin)
    out = []
    for lp in sass.mma_loops:
        _, text, body = _loop_source(lp, lines)
        spans = source_loops(text)
        votes: dict[_Span, int] = {}
        for ln in body:
            inner = [s for s in spans if s.first <= ln <= s.last]
            if inner:
                best = min(inner, key=lambda s: s.last - s.first)
                votes[best] = votes.get(best, 0) + 1
        if not votes:
            raise RuntimeError(f"SASS loop at {lp.start:#x} of {sass.function} maps to no source loop")
        span = max(votes, key=votes.get)
        if any(a.startswith("if polluted") for a in span.ancestors) or span.function.endswith("_fix"):
            role = "containment"
        else:
            role = _our_role(kernel, span)
            if role is None:
                raise RuntimeError(f"{kernel}: SASS loop at {lp.start:#x} of {sass.function} is the source loop "
                                   f"{span.header!r} (line {span.first}), not one of the tile loops "
                                   f"{sorted(OUR_LOOP_ROLES[kernel])}")
        enclosing = [a for a in reversed(span.ancestors) if a.startswith("for ")]
        out.append(dict(loop=lp, role=role, source_line=span.first, source=span.header, enclosing=enclosing))
    return out


def classify_flex_loops(report) -> list[dict]:
    """Every tile loop of a FlexAttention kernel with its role: kernel part ("fwd", "dq",
    "dkdv", by the template function holding most of its instructions) and "partial" (its body
    runs mask_mod code: lines inside ``if not IS_FULL_BLOCKS``) or "full"."""
    sass = report.sass()
    lines = sass_lines(report.cubin)
    part_of = {"forward_block_mn": "fwd", "forward_inner": "fwd", "bwd_dq_block_mn": "dq", "bwd_dq_inner": "dq",
               "bwd_dkdv_block_mn": "dkdv", "bwd_dkdv_inner": "dkdv"}
    out = []
    for lp in sass.mma_loops:
        _, source, body = _loop_source(lp, lines)
        funcs = _blocks(source, "def ")
        masked = [(a, b) for a, b, h, _ in _blocks(source, "if ") if h.startswith("if not IS_FULL_BLOCKS")]
        votes: dict[str, int] = {}
        for ln in body:
            for a, b, h, _ in funcs:
                if a <= ln <= b:
                    name = h.removeprefix("def ").split("(")[0].strip()
                    if name in part_of:
                        votes[part_of[name]] = votes.get(part_of[name], 0) + 1
        if not votes:
            raise RuntimeError(f"SASS loop at {lp.start:#x} of {sass.function} maps to no template function")
        part = max(votes, key=votes.get)
        partial = any(a <= ln <= b for ln in body for a, b in masked)
        out.append(dict(loop=lp, part=part, role="partial" if partial else "full"))
    return out


def check_mask_mod(pattern: sf.Pattern, problem: sf.Problem, rows_per_chunk: int = 256) -> bool:
    """Whether the FlexAttention mask_mod of ``pattern`` (evaluated with torch) equals
    ``sf.dense_mask`` on ``problem``, compared a slab of query rows at a time."""
    n = problem.tokens
    ctx = make_context(pattern, problem)
    ops = _Ops()
    keys = torch.arange(n)
    h = torch.arange(problem.heads)[:, None, None]
    for start in range(0, n, rows_per_chunk):
        rows = torch.arange(start, min(start + rows_per_chunk, n))
        want = as_4d(pattern.mask(ctx, rows, keys))[0].expand(problem.heads, len(rows), n)
        got = mask_mod_expr(ops, pattern, problem, h, rows[None, :, None], keys[None, None, :])
        if not bool((got.expand(problem.heads, len(rows), n) == want).all()):
            return False
    return True


# ======================================================================================
# Exact counts of FlexAttention's 128x128 blocks (allowed pairs per block, per head group)
# ======================================================================================
@dataclasses.dataclass(frozen=True, eq=False)
class BlockCounts:
    """Allowed pairs of every (query block, key block) of ``block`` tokens, per head group:
    ``counts[g]`` int64 [nb, nb]; ``weights[g]`` heads in group g."""

    counts: tuple[np.ndarray, ...]
    weights: tuple[int, ...]
    tokens: int
    block: int
    methods: tuple[str, ...]

    @property
    def n_blocks(self) -> int:
        return -(-self.tokens // self.block)

    def _sum(self, f) -> int:
        return int(sum(w * int(f(c).sum()) for c, w in zip(self.counts, self.weights)))

    @property
    def allowed_pairs(self) -> int:
        return self._sum(lambda c: c)

    @property
    def full_blocks(self) -> int:
        return self._sum(lambda c: c == self.block * self.block)

    @property
    def visited_blocks(self) -> int:
        return self._sum(lambda c: c > 0)

    def iterations(self, side: str, program_rows: int, step_rows: int) -> dict[str, int]:
        """Inner-loop iterations of FlexAttention's partial and full loops, summed over the
        programs of every head: ``side`` "q" (forward and dQ: a program owns ``program_rows``
        query rows and walks the key blocks of its row of the block mask ``step_rows`` keys at a
        time) or "k" (dK/dV: the transposed walk). Each loop runs ``min(blocks x (block //
        step_rows), cdiv(N, step_rows))`` times, as the templates bound it."""
        n, b = self.tokens, self.block
        programs = np.arange(-(-n // program_rows))
        row = programs * program_rows // b
        cap = -(-n // step_rows)
        out = dict(partial=0, full=0)
        for c, w in zip(self.counts, self.weights):
            full = c == b * b
            partial = (c > 0) & ~full
            axis = 1 if side == "q" else 0
            for name, m in (("partial", partial), ("full", full)):
                per_row = m.sum(axis=axis).astype(np.int64)
                out[name] += w * int(np.minimum(per_row[row] * (b // step_rows), cap).sum())
        return out


def _head_groups(pattern: sf.Pattern, problem: sf.Problem) -> tuple[list[int], list[int]]:
    """(a representative head of each group of identical heads, heads per group)."""
    sig: dict = {}
    reps, weights = [], []
    for h in range(problem.heads):
        s = head_signature(pattern, problem, h)
        if s not in sig:
            sig[s] = len(reps)
            reps.append(h)
            weights.append(0)
        weights[sig[s]] += 1
    return reps, weights


def dense_block_counts(pattern: sf.Pattern, problem: sf.Problem, head: int, block: int = FLEX_BLOCK) -> np.ndarray:
    """int64 [nb, nb] allowed pairs per block of head ``head``, from the dense mask (a block
    row at a time; O(N^2))."""
    n = problem.tokens
    nb = -(-n // block)
    ctx = make_context(pattern, problem)
    keys = torch.arange(n)
    out = np.zeros((nb, nb), np.int64)
    for qb in range(nb):
        rows = torch.arange(qb * block, min((qb + 1) * block, n))
        m = as_4d(pattern.mask(ctx, rows, keys))[0]
        m = m[head if m.shape[0] > 1 else 0]
        m = torch.nn.functional.pad(m, (0, nb * block - n))
        out[qb] = m.reshape(len(rows), nb, block).sum(dim=(0, 2)).numpy()
    return out


def _count_in_runs(lo, hi, step, c, f):
    """Keys lo, lo + step, ..., hi (per query, broadcast) inside [c, f]."""
    lo2, hi2 = np.maximum(lo, c), np.minimum(hi, f)
    ok = hi2 >= lo2
    j0 = np.where(ok, (lo2 - lo + step - 1) // step, 0)
    j1 = np.where(ok, (hi2 - lo) // step, -1)
    return np.maximum(j1 - j0 + 1, 0)


def separable_block_counts(leaf, problem: sf.Problem, block: int = FLEX_BLOCK) -> np.ndarray:
    """int64 [nb, nb] allowed pairs per block for a separable family, exact at any size: every
    block is cut into runs along the last grid dimension ("segments": fixed leading
    coordinates, a range of the last); a segment pair holds (product over leading dimensions
    of the 1-D rule) x (pairs of the last dimension's 1-D rule inside the two ranges), from a
    2-D prefix sum of that rule (or per-query key runs where the last extent is long)."""
    from sparseforge.lower.families import span_1d

    grid, n = problem.grid, problem.tokens
    nb = -(-n // block)
    length = grid[-1]
    params = leaf.params(problem)
    cuts = np.union1d(np.union1d(np.arange(0, n, block), np.arange(0, n, length)), [n])
    starts, ends = cuts[:-1], cuts[1:] - 1
    blk, row = starts // block, starts // length
    a, e = starts % length, ends % length
    lead = []   # leading coordinates of every segment's row
    for d in range(len(grid) - 1):
        lead.append((row // math.prod(grid[d + 1:-1])) % grid[d])
    factor = np.ones((len(starts), len(starts)), np.int64)
    for d, coords in enumerate(lead):
        x = torch.arange(grid[d])
        rule = leaf.allowed_1d(grid[d], x[:, None], x[None, :], **params[d]).numpy()
        factor *= rule[coords[:, None], coords[None, :]]
    qi, ki = np.nonzero(factor)
    if length <= PREFIX_TABLE_LIMIT:
        x = torch.arange(length)
        rule = leaf.allowed_1d(length, x[:, None], x[None, :], **params[-1]).numpy().astype(np.int64)
        pre = np.zeros((length + 1, length + 1), np.int64)
        pre[1:, 1:] = rule.cumsum(0).cumsum(1)
        last = (pre[e[qi] + 1, e[ki] + 1] - pre[a[qi], e[ki] + 1] - pre[e[qi] + 1, a[ki]] + pre[a[qi], a[ki]])
    else:
        lo, hi, step = span_1d(leaf, length, np.arange(length), params[-1])
        last = np.zeros(len(qi), np.int64)
        width = int((e - a).max()) + 1
        offs = np.arange(width)
        for s in range(0, len(qi), 1 << 16):
            q, k = qi[s:s + (1 << 16)], ki[s:s + (1 << 16)]
            xs = a[q][:, None] + offs[None, :]
            valid = xs <= e[q][:, None]
            xs = np.minimum(xs, length - 1)
            cnt = _count_in_runs(lo[xs], hi[xs], step, a[k][:, None], e[k][:, None])
            last[s:s + len(q)] = (cnt * valid).sum(1)
    total = factor[qi, ki] * last
    out = np.zeros(nb * nb, np.int64)
    np.add.at(out, blk[qi] * nb + blk[ki], total)
    return out.reshape(nb, nb)


def strided_shards_block_counts(pattern: sf.StridedShards, problem: sf.Problem, head: int,
                                block: int = FLEX_BLOCK) -> np.ndarray | None:
    """int64 [nb, nb] for causal StridedShards from its block layout (whole pattern blocks
    below the diagonal, triangles on it), or None when its blocks do not tile ``block``."""
    n, bs = problem.tokens, pattern.block_size
    if not pattern.causal or block % bs:
        return None
    nsb = -(-n // bs)
    ids = torch.arange(nsb)
    layout = pattern.block_mask(problem, ids, ids)[head].numpy()
    size = np.full(nsb, bs, np.int64)
    size[-1] = n - bs * (nsb - 1)
    i, j = np.nonzero(layout)
    pairs = np.where(i > j, size[i] * size[j], np.where(i == j, size[i] * (size[i] + 1) // 2, 0))
    nb = -(-n // block)
    out = np.zeros(nb * nb, np.int64)
    np.add.at(out, (i * bs // block) * nb + j * bs // block, pairs)
    return out.reshape(nb, nb)


def flex_block_counts(pattern: sf.Pattern, problem: sf.Problem, block: int = FLEX_BLOCK,
                      dense_budget: float = DENSE_BUDGET) -> BlockCounts:
    """Exact allowed pairs per 128x128 block of FlexAttention's BlockMask, per head group
    (see the module docstring for the methods); a ValueError when none is cheap enough."""
    reps, weights = _head_groups(pattern, problem)
    counts, methods = [], []
    for h in reps:
        leaf = leaf_for_head(pattern, h)
        c = None
        if isinstance(leaf, SEPARABLE):
            c, how = separable_block_counts(leaf, problem, block), "separable: segment pairs of per-dimension rules"
        elif isinstance(leaf, sf.StridedShards):
            c, how = strided_shards_block_counts(leaf, problem, h, block), "block layout (causal S2)"
        if c is None:
            if problem.tokens ** 2 > dense_budget:
                raise ValueError(f"no cheap exact block count for {leaf!r} on {problem!r} "
                                 f"(N^2 = {problem.tokens ** 2:.2e} > {dense_budget:.1e})")
            c, how = dense_block_counts(pattern, problem, h, block), "dense mask"
        counts.append(c)
        methods.append(how)
    return BlockCounts(tuple(counts), tuple(weights), problem.tokens, block, tuple(methods))


# ======================================================================================
# One problem: ours vs FlexAttention
# ======================================================================================
def _loop_dict(lp, role: str, iterations: int | None, warps: int, **extra) -> dict:
    d = lp.as_dict()
    d.pop("start"), d.pop("end")   # depth: SASS loop nesting (dK/dV's tile loops sit in its head loop)
    counted = iterations is not None
    return dict(role=role, **extra, **d, iterations=iterations if counted else 0, counted=counted,
                issue_slots=lp.instructions * (iterations or 0) * warps)


def _kernel_dict(report, loops: list[dict], allowed: int) -> dict:
    sass = report.sass()
    slots = sum(lp["issue_slots"] for lp in loops)
    r = report.as_dict()
    return dict(registers=r["registers"], spills=r["spills"], spill_stores=r["spill_stores"],
                spill_loads=r["spill_loads"], shared_bytes=r["shared_bytes"], num_warps=r["num_warps"],
                num_stages=r["num_stages"], tensor_core=r["tensor_core"], serialized=r["serialized"],
                sass=dict(function=sass.function, instructions=sass.instructions, hgmma=sass.wgmma, hmma=sass.hmma),
                wgmma_only=r["tensor_core"] == "wgmma" and sass.hmma == 0, unserialized=not r["serialized"],
                spill_free=r["spills"] == 0, loops=loops, issue_slots=slots, issue_slots_per_pair=slots / allowed)


def our_loop_iterations(schedule, kernel: str) -> dict[str, int]:
    """Iterations of kernel ``kernel``'s FULL and PARTIAL tile loops on the schedule it walks,
    per batch element, summed over its programs: the forward and dQ kernels run, per query
    head and query tile, the FULL and PARTIAL key tiles of the forward CSR (the closed-form box
    visits the same tiles: tests/codegen/test_bounds.py); the dK/dV kernel runs, per key tile
    and key/value head, for each query head of its group the FULL (``Q_FULL``) and PARTIAL (the
    rest) query tiles of that head's group in the inverse CSR -- each query head once in all."""
    csr = schedule.inverse if kernel == "bwd_dkdv" else schedule.forward
    heads = np.bincount(schedule.head_group, minlength=schedule.groups)  # query heads per schedule group
    visited = np.diff(csr.ptr, axis=1).sum(axis=1)
    full = csr.full.sum(axis=1)
    total, full_total = int((heads * visited).sum()), int((heads * full).sum())
    return dict(full=full_total, partial=total - full_total)


def _schedule_dict(schedule, walk: str, allowed: int) -> dict:
    g = schedule.geometry
    return dict(walk=walk, q_tile=list(g.q_tile), k_tile=list(g.k_tile), fold=list(g.fold),
                group_folds=None if schedule.group_folds is None else [list(f) for f in schedule.group_folds],
                block_m=g.block_m, block_n=g.block_n, n_q_tiles=g.n_q_tiles, n_k_tiles=g.n_k_tiles,
                visited_tiles=schedule.visited_tiles, full_tiles=schedule.full_tiles,
                tile_efficiency=allowed / (schedule.visited_tiles * g.block_m * g.block_n))


def _our_kernel(tk, name: str, target: str, allowed: int) -> dict:
    """SASS figures and issue slots of our kernel ``name``, its loops charged the tile counts of
    the schedule it walks (``TritonKernels.schedule_of``)."""
    report = tk.aot(name, target)
    schedule = tk.schedule_of(name)
    per_role = our_loop_iterations(schedule, name)
    loops, roles = [], []
    for c in classify_our_loops(report, name):
        its = per_role.get(c["role"])  # None for containment: not counted
        roles.append(c["role"])
        loops.append(_loop_dict(c["loop"], c["role"], its, report.num_warps, source_line=c["source_line"],
                                source=c["source"], enclosing=c["enclosing"]))
    counted = [r for r in roles if r != "containment"]
    if len(counted) != len(set(counted)):
        raise RuntimeError(f"{name}: unexpected tile loops {roles} (one FULL and one PARTIAL loop expected)")
    missing = [r for r in ("full", "partial") if per_role[r] and r not in counted]
    if missing:
        raise RuntimeError(f"{name}: tile loops {roles} do not cover the {' and '.join(missing).upper()} tiles "
                           f"({per_role})")
    out = _kernel_dict(report, loops, allowed)
    walk = "inverse tables" if name == "bwd_dkdv" else schedule.loop_bounds
    out["schedule"] = _schedule_dict(schedule, walk, allowed)
    out["constexprs"] = tk.constexprs(name)
    return out


def _flex_kernel(kind: str, pattern, problem, batch: int, config: FlexConfig, counts: BlockCounts,
                 target: str, allowed: int) -> dict:
    report, path = flex_aot(kind, pattern, problem, batch, config, target)
    its = dict(fwd=counts.iterations("q", config.fwd_block_m, config.fwd_block_n),
               dq=counts.iterations("q", config.block_m2, config.block_n2),
               dkdv=counts.iterations("k", config.block_n1, config.block_m1))
    loops, seen = [], []
    for c in classify_flex_loops(report):
        seen.append((c["part"], c["role"]))
        loops.append(_loop_dict(c["loop"], c["role"], its[c["part"]][c["role"]], report.num_warps, part=c["part"]))
    want = [("fwd", "partial"), ("fwd", "full")] if kind == "fwd" else \
        [("dq", "partial"), ("dq", "full"), ("dkdv", "partial"), ("dkdv", "full")]
    if sorted(seen) != sorted(want):
        raise RuntimeError(f"FlexAttention {kind}: tile loops {seen}, expected {want}")
    out = _kernel_dict(report, loops, allowed)
    out["source_file"] = f"$SPARSEFORGE_CACHE_DIR/flex_static/{path.name}"
    if kind == "bwd":
        for part in ("dq", "dkdv"):
            slots = sum(lp["issue_slots"] for lp in loops if lp["part"] == part)
            out[f"{part}_issue_slots_per_pair"] = slots / allowed
    return out


def _capability(target: str) -> int:
    """Compute capability of a CUDA target name: "sm_90" / "sm_90a" -> 90."""
    digits = re.sub(r"\D", "", target)
    if not digits:
        raise ValueError(f"target must be a CUDA target like 'sm_90', got {target!r}")
    return int(digits)


def report_problem(case_id: str, title: str, pattern: sf.Pattern, shape, *, target: str = "sm_90",
                   dtype: torch.dtype = torch.bfloat16, check: tuple | None = None) -> dict:
    """Ours vs FlexAttention on one problem (``shape``: a ``bench.cases.Shape``). ``check``:
    (pattern, problem) on which the FlexAttention mask_mod is compared with ``sf.dense_mask``
    (the full size is too large for a dense mask)."""
    from sparseforge.backends.triton import TritonKernels
    from sparseforge.codegen.config import default_config
    from sparseforge.lower.paths import path_of

    from .efficiency import exact_allowed_pairs

    t0 = time.perf_counter()
    problem = shape.problem(dtype)
    counts = flex_block_counts(pattern, problem)
    allowed = counts.allowed_pairs
    exact = exact_allowed_pairs(pattern, problem)
    if exact is not None and exact[0] != allowed:
        raise RuntimeError(f"{case_id}: allowed pairs {exact[0]} ({exact[1]}) != {allowed} from the block counts")
    config = default_config(problem, pattern, capability=_capability(target))
    schedule = path_of(pattern).build(pattern, problem, config)
    tk = TritonKernels(schedule, config=config)
    g, dkdv = schedule.geometry, tk.dkdv_schedule
    ours = dict(q_tile=list(g.q_tile), k_tile=list(g.k_tile), fold=list(g.fold),
                group_folds=None if schedule.group_folds is None else [list(f) for f in schedule.group_folds],
                block_m=g.block_m, block_n=g.block_n, loop_bounds=schedule.loop_bounds,
                visited_tiles=schedule.visited_tiles, full_tiles=schedule.full_tiles,
                tile_efficiency=allowed / (schedule.visited_tiles * g.block_m * g.block_n),
                dkdv=_schedule_dict(dkdv, "inverse tables", allowed) | dict(shared_tiling=dkdv is schedule),
                config=tk.config.as_dict(), kernels={})
    for name in ("fwd", "bwd_dq", "bwd_dkdv"):
        ours["kernels"][name] = _our_kernel(tk, name, target, allowed)
    k = ours["kernels"]
    ours["issue_slots_per_pair"] = dict(fwd=k["fwd"]["issue_slots_per_pair"],
                                        bwd=k["bwd_dq"]["issue_slots_per_pair"] + k["bwd_dkdv"]["issue_slots_per_pair"])
    fcfg = flex_default_config(problem.head_dim, dtype)
    flex = dict(block=FLEX_BLOCK, visited_blocks=counts.visited_blocks, full_blocks=counts.full_blocks,
                tile_efficiency=allowed / (counts.visited_blocks * FLEX_BLOCK ** 2), config=fcfg.as_dict(),
                count_methods=sorted(set(counts.methods)), kernels={})
    for kind in ("fwd", "bwd"):
        flex["kernels"][kind] = _flex_kernel(kind, pattern, problem, shape.batch, fcfg, counts, target, allowed)
    flex["issue_slots_per_pair"] = {kind: flex["kernels"][kind]["issue_slots_per_pair"] for kind in ("fwd", "bwd")}
    ratio = {kind: ours["issue_slots_per_pair"][kind] / flex["issue_slots_per_pair"][kind] for kind in ("fwd", "bwd")}
    kernels_ok = {name: dict(wgmma_only=k[name]["wgmma_only"], unserialized=k[name]["unserialized"],
                             spill_free=k[name]["spill_free"]) for name in k}
    goal = dict(ratio_fwd_le_0_8=ratio["fwd"] <= 0.8, ratio_bwd_le_0_8=ratio["bwd"] <= 0.8,
                our_kernels=kernels_ok,
                our_kernels_ok=all(all(v.values()) for v in kernels_ok.values()))
    goal["met"] = goal["ratio_fwd_le_0_8"] and goal["ratio_bwd_le_0_8"] and goal["our_kernels_ok"]
    mask_check = None
    if check is not None:
        cp, cprob = check
        mask_check = dict(pattern=repr(cp), problem=repr(cprob), equal=check_mask_mod(cp, cprob))
    return dict(id=case_id, title=title, pattern=repr(pattern), shape=shape.as_dict(), problem=repr(problem),
                tokens=problem.tokens, allowed_pairs=allowed, allowed_pairs_per_batch_element=True,
                allowed_method=exact[1] if exact else "sum of the exact block counts",
                density=allowed / (problem.heads * problem.tokens ** 2), ours=ours, flex=flex, ratio=ratio,
                goal=goal, flex_mask_mod_check=mask_check, seconds=round(time.perf_counter() - t0, 1))


# ======================================================================================
# The suite, the table, the command line
# ======================================================================================
def static_cases(only: str | None = None) -> list:
    """The suite cases with a static pattern (P1-P6, P10, P11), optionally selected."""
    from .cases import select

    return [c for c in select(only) if c.pattern.is_static and c.full.grid is not None and c.attention == "softmax"]


APPROXIMATIONS = (
    "Static figures only: SASS of ahead-of-time sm_90 compiles on a CPU; nothing ran on a GPU. Issue slots "
    "count instructions x warps, not cycles: latency, memory traffic, occupancy and tensor-core throughput "
    "are not in them.",
    "Issue slots per allowed pair count the tile loops only (work outside them, per program, is ignored), "
    "per batch element (both sides scale with the batch alike).",
    "Every kernel of ours runs a FULL-tile loop (no mask) then a PARTIAL-tile loop (the pattern's predicate): "
    "fwd and dQ over the key tiles of a query tile (closed-form box or forward tables), dK/dV, nested in its loop "
    "over the query heads of a key/value head, over the query tiles of a key tile (the inverse tables of its own "
    "schedule). Each loop is charged its schedule's FULL or PARTIAL tile count; a loop the compiler removed (a "
    "range that is empty for every program) is simply absent. The per-head work of dK/dV outside the tile loops "
    "(loading the head's table row) and dQ's delta prologue are not charged.",
    "Our containment kernels (<kernel>_fix, launched after each kernel where visited tiles may hold masked pairs; "
    "they recompute only when a stored row came out non-finite) are not compiled or counted.",
    "FlexAttention's mask_mod is written by hand op by op (the ops its torch expression lowers to) and "
    "printed by inductor's TritonOverrides; real inductor lowering could differ in op order or in "
    "simplifications. It is checked against sf.dense_mask at the suite's CPU size.",
    "FlexAttention's loop iterations: every program walks its block-mask row (or column) "
    "blocks x (128 // step) times, capped at cdiv(N, step), exactly as its templates bound the loops.",
)


def run(only: str | None = None, target: str = "sm_90", progress=None) -> dict:
    from .run_info import device_name, utc_now, versions

    results = []
    for case in static_cases(only):
        if progress:
            progress(f"{case.id}: {case.title} ...")
        check = (case.cpu_pattern, case.cpu.problem(torch.bfloat16)) if case.cpu_pattern is not None else None
        results.append(report_problem(case.id, case.title, case.pattern, case.full, target=target, check=check))
        if progress:
            r = results[-1]
            progress(f"{case.id}: ours/flex fwd {r['ratio']['fwd']:.3f}, bwd {r['ratio']['bwd']:.3f} "
                     f"({r['seconds']} s)")
    meta = dict(schema=SCHEMA, device=f"static: AOT {target} on CPU", compiled_on=device_name(False), target=target,
                dtype="bf16", versions=versions(), date=utc_now(),
                flex_source="torch template rendered",
                flex_templates={k: [f"torch/_inductor/kernel/flex/templates/{t}.py.jinja" for t in v]
                                for k, v in FLEX_TEMPLATES.items()},
                flex_rendering=("torch's Jinja templates rendered with stand-ins for inductor's template hooks "
                                "(def_kernel, gen_defines, gen_argdefs, size, stride, modification, store_output); "
                                "static shapes, contiguous tensors, identity score_mod, default kernel options "
                                "for training (OUTPUT_LOGSUMEXP, no TMA, HAS_FULL_BLOCKS); launch from "
                                "CUDAConfigHeuristic with capability (9, 0)"),
                flex_templates_sha256=_digest(_flex_template_dir() / f"{t}.py.jinja"
                                              for t in sorted(set(itertools.chain(*FLEX_TEMPLATES.values())))),
                our_templates_sha256=_digest(sorted(OUR_TEMPLATES.glob("*.j2"))),
                flex_block=FLEX_BLOCK, approximations=list(APPROXIMATIONS),
                goal="ours <= 0.8x FlexAttention's issue slots per allowed pair, forward and backward; every 16-bit "
                     "sm_90 kernel of ours (fwd, dQ, dK/dV) wgmma-only, unserialized, spill-free")
    meta["summary"] = dict(
        problems=len(results), goal_met=sum(r["goal"]["met"] for r in results),
        ratio_fwd_le_0_8=sum(r["goal"]["ratio_fwd_le_0_8"] for r in results),
        ratio_bwd_le_0_8=sum(r["goal"]["ratio_bwd_le_0_8"] for r in results),
        our_kernels_ok=sum(r["goal"]["our_kernels_ok"] for r in results))
    return dict(meta=meta, results=results)


def _digest(paths) -> str:
    """sha256 over the contents of ``paths`` (to tell which templates produced a result)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]


def markdown_table(result: dict) -> str:
    """One row per problem: issue slots per allowed pair, ours and FlexAttention's, and the ratio."""
    def ok(k):
        return "".join(c if k[key] else "-" for c, key in (("w", "wgmma_only"), ("u", "unserialized"),
                                                          ("s", "spill_free")))

    head = ("| case | ours fwd | flex fwd | ratio fwd | ours bwd (dQ+dK/dV) | flex bwd | ratio bwd | "
            "tile eff ours / flex | ours tiles q x k tokens: fwd+dQ; dK/dV | "
            "ours fwd, dQ, dK/dV (w: wgmma only, u: unserialized, s: spill-free) | "
            "flex fwd, bwd regs / spill bytes | goal |")
    lines = [head, "|" + "---|" * 12]
    for r in result["results"]:
        o, f = r["ours"], r["flex"]
        k = o["kernels"]
        fk = f["kernels"]
        lines.append(
            f"| {r['id']} | {o['issue_slots_per_pair']['fwd']:.4f} | {f['issue_slots_per_pair']['fwd']:.4f} | "
            f"{r['ratio']['fwd']:.3f} | {o['issue_slots_per_pair']['bwd']:.4f} | "
            f"{f['issue_slots_per_pair']['bwd']:.4f} | {r['ratio']['bwd']:.3f} | "
            f"{o['tile_efficiency']:.3f} / {f['tile_efficiency']:.3f} | "
            f"{o['block_m']}x{o['block_n']}; {o['dkdv']['block_m']}x{o['dkdv']['block_n']} | "
            f"{ok(k['fwd'])} {ok(k['bwd_dq'])} {ok(k['bwd_dkdv'])} | "
            f"{fk['fwd']['registers']}/{fk['fwd']['spills']}B, {fk['bwd']['registers']}/{fk['bwd']['spills']}B | "
            f"{'met' if r['goal']['met'] else 'not met'} |")
    return "\n".join(lines)


def main(argv=None):
    import argparse
    import json

    from sparseforge.atomic import write_atomic

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated problem ids (P1,P3) or cases (P1b)")
    ap.add_argument("--target", default="sm_90", help="CUDA target of the ahead-of-time compiles (default sm_90)")
    ap.add_argument("--out", default="benchmarks/results/static_report_sm90.json", help="write the JSON here")
    args = ap.parse_args(argv)
    result = run(args.only, args.target, progress=lambda s: print(s, file=sys.stderr, flush=True))
    result["meta"]["command"] = "python " + " ".join([sys.argv[0]] + list(sys.argv[1:] if argv is None else argv))
    if args.out:
        write_atomic(args.out, json.dumps(result, indent=1) + "\n")
    print(markdown_table(result))
    return result
