"""The torch ops: one fixed set for every pattern, problem, shape, config and modifier.

    sparseforge::attention(q, k, v, tables, params, padding?, grid, kernel, scale, backend, kv_grid?=None)
        -> (out, lse)
    sparseforge::attention_backward(q, k, v, out, lse, dout?, dlse?, tables, params, padding?, grid, kernel,
                                    scale, backend, kv_grid?=None) -> (dq, dk, dv, dparams)
    sparseforge::linear_attention(q, k, v, plan, n_windows, feature_map, interpret) -> (out, kv, s)
    sparseforge::linear_attention_backward(q, k, v, out, kv, s, dout, plan, n_windows, feature_map,
                                           interpret) -> (dq, dk, dv)

- q [B, H, N, D], k/v [B, KVH, N, D]; out [B, H, N, D], lse [B, H, N] float32 (float64 for
  float64 inputs, which only the CPU executor takes: gradcheck needs it); with ``kv_grid``
  k/v are [B, KVH, Nk, D] and q, out, lse have the query grid's Nq tokens;
- ``tables``: the per-call index data of the path (``lower.paths``): none for static
  attention, ``[routes]`` for routed attention, a plan's tensors for segments;
- ``params``: the score modifiers' tensors of the call in ``dsl.modifiers.modifier_tensors``
  order (each bias term's tensor, then the sinks' logits, then the per-head scale [H], which
  replaces ``scale``); their structure (kinds, shapes, dtypes, softcap) is the registered
  kernel's ``modifier_spec``. ``dparams`` are their gradients, in the same order (deterministic);
- ``padding``: None, a key padding mask (bool [B, N], True = real token), per-sample boxes
  (int64 [B, 2, ndim]: each sample's first token and extent per grid dimension; its tokens
  form a grid of that extent, on which it is attended alone: ``lengths``/``sizes``), or group
  ids (int32 [B, N], ``Grouped & pattern``; ``backends.cpu.PADDED`` marks padding). Data,
  never part of a key; the CPU executor and the Triton kernels (a variant per kind) take all three;
- ``grid``: the token grid of this call (SymInt[]: under ``torch.compile(dynamic=True)`` it
  stays symbolic, so a new size is no new graph); for segments the packed length (the
  schedule does not depend on it: the tables come with the plan);
- ``kv_grid``: None (the keys share ``grid``), or the keys' grid of this call (SymInt[]?:
  cross attention, decode, pooled keys, strided queries; ``dsl.problem.placement`` places the
  queries on it). Such a call runs the CPU executor on the exact mask's chunks
  (``backends.cpu.mask_chunks``): no schedule is built for it, so a decode step whose Nk
  grows every call builds nothing and registers nothing. ``tables`` is then empty for static
  patterns and ``[groups, kv_groups]`` (int64 [B, 1 or H, Nq] and [.., Nk]) on the segments
  path (``Grouped``); ``padding`` None or a key padding mask over the keys. On the Triton
  backends the forward of a 1-D decode (and of a position-free pattern on any grids) runs the
  decode kernel (``backends.decode``); the rest is refused (``CrossGridsNotImplementedError``);
- ``kernel``: the key of a registered ``Kernel`` — pattern, heads, head dim, dtype, tile
  config, modifier spec: everything that shapes the generated code except the grid. The
  schedule (and its tables, and the Triton kernels specialised to its extents) for each grid is
  built on first use and cached (``Kernel.at``);
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
import math
import re
import threading
from typing import Optional

import torch
from torch import Tensor

from ..backends import cpu, linear_kernels
from ..backends.linear import ScatteredLinearPlan
from ..backends.decode import TritonDecode
from ..backends.triton import TritonKernels
from ..codegen.config import KernelConfig
from ..dsl.content import Grouped
from ..dsl.modifiers import Modifiers, modifier_spec, modifier_template, modifiers_from_tensors
from ..dsl.pattern import Pattern
from ..dsl.problem import DTYPE_NAMES, Problem
from ..dsl.semantics import box_indices, check_cross_extras
from ..lower.paths import SEGMENTS, STATIC, Path, Shape
from ..lower.decode import DecodeNotSupportedError, lower_decode
from ..lower.schedule import TileSchedule

__all__ = ["BACKENDS", "CrossGridsNotImplementedError", "Kernel", "OPS", "register", "registered_kernel",
           "resolve_backend"]


class CrossGridsNotImplementedError(NotImplementedError, ValueError):
    """Keys on a grid of their own (``kv_grid``, Nq != Nk) on a backend that has no kernels for
    them yet (the Triton backends)."""


def refuse_cross_on(backend: str, what: str) -> None:
    """``CrossGridsNotImplementedError`` for ``backend`` ("triton" or "interpret")."""
    raise CrossGridsNotImplementedError(
        f"{what}: queries and keys of different grids (kv_grid: cross attention, pooled keys, strided queries) are "
        f"not implemented on backend={backend!r} (the generated Triton kernels) yet, except the forward of a 1-D "
        "decode or chunked prefill (queries the last Nq of Nk keys) of a pattern whose mask does not depend on the "
        "sequence length (backends.decode); run it on CPU tensors (backend='cpu' or None)")


def decodes(pattern: Pattern, problem: Problem, path_name: str) -> bool:
    """Whether the Triton decode kernel (``backends.decode``) runs the forward of ``problem``
    (with a ``kv_grid``): a static pattern whose mask does not depend on the sequence length
    (``lower_decode``, cached per pattern and heads), on two 1-D grids (queries the last Nq of
    Nk keys) or, for a pattern that reads no query position (Full, Sink: cross attention,
    pooled keys), on any two grids, their tokens flattened."""
    if path_name != STATIC.name:
        return False
    position_free = not pattern.needs_placement()
    if not position_free and (problem.ndim != 1 or len(problem.key_grid) != 1 or problem.tokens > problem.kv_tokens):
        return False
    try:
        lower_decode(pattern, problem.heads, problem.kv_heads)
    except DecodeNotSupportedError:
        return False
    return True

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
    """What the ops run for one key: a pattern on a path with a tile config and a modifier
    spec, at any grid.

    ``at(grid)`` gives the schedule for a grid: the one it was registered with, or a new
    one built (and cached, ``GRIDS_PER_KERNEL`` of them) with the same tiles.
    ``modifiers`` (checked ``dsl.modifiers.Modifiers``; only their structure is kept, as meta
    tensors) and ``head_scale`` (a [H] scale tensor replaces the float scale) say what the
    ops' ``params`` hold: ``self.spec`` (``dsl.modifiers.modifier_spec``) keys the kernel."""

    def __init__(self, path: Path, seed: TileSchedule, config: KernelConfig, modifiers: Modifiers | None = None,
                 head_scale: bool = False):
        self.path = path
        self.pattern: Pattern = seed.pattern
        self.problem: Problem = seed.problem
        self.config = config
        self.template: Modifiers | None = modifier_template(modifiers)
        self.head_scale = head_scale
        self.spec: tuple = modifier_spec(self.template, head_scale)
        self.key = _key(path, seed, config, self.spec)
        scattered = getattr(seed, "scattered", None)
        #: a segments kernel's cross calls are ``Grouped`` (causal as its layout) on group ids
        self._segments_causal = bool(getattr(scattered, "causal", False))
        self._grids: collections.OrderedDict[tuple[int, ...], _AtGrid] = collections.OrderedDict()
        self._grids[self._grid_key(seed.problem.grid)] = _AtGrid(seed)
        self._lock = threading.Lock()
        self._decoders: dict[tuple, TritonDecode] = {}  # (interpret, padding, page size): decode kernels

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

    def triton(self, grid, interpret: bool, padding: bool | str = False) -> TritonKernels:
        """The generated Triton kernels for ``grid`` (rendered and loaded on first use); with
        ``padding`` (True or "mask"; "groups"), the variant that takes a key padding mask (group ids)."""
        padding = "mask" if padding is True else padding
        entry = self.at(grid)
        with self._lock:
            if (interpret, padding) not in entry.triton:
                entry.triton[interpret, padding] = TritonKernels(entry.schedule, interpret=interpret, config=self.config,
                                                                 modifiers=self.spec, padding=padding)
            return entry.triton[interpret, padding]

    # -- the executors behind the ops ----------------------------------------------------
    def unflatten(self, params) -> tuple[Modifiers | None, Tensor | None]:
        """(modifiers holding the call's tensors, per-head scale) of the ops' ``params``."""
        mods, head_scale = modifiers_from_tensors(self.template, params, self.head_scale)
        return mods, head_scale

    def _scores(self, params) -> cpu.Scores | None:
        mods, head_scale = self.unflatten(params)
        if not mods and head_scale is None:
            return None
        return cpu.Scores(self.pattern, mods, head_scale)

    def _call_problem(self, grid) -> Problem:
        return self.problem.with_grid(tuple(int(x) for x in grid))

    def _blocks(self, schedule, tables, q, k, grid, padding):
        """(blocks of chunks for the CPU executor, bool [B, N] real tokens or None)."""
        if padding is None:
            return [cpu.Block(self.path.chunks(schedule, tables, _shape(q, k), q.device))], None
        if padding.dtype == torch.bool:
            return [cpu.Block(self.path.chunks(schedule, tables, _shape(q, k), q.device),
                              key_padding=padding)], padding
        if padding.dtype == torch.int32:  # group ids (Grouped & this pattern; cpu.PADDED: padding)
            return [cpu.Block(self.path.chunks(schedule, tables, _shape(q, k), q.device), groups=padding)], \
                padding != cpu.PADDED
        return self._sample_blocks(tables, q, k, grid, padding)

    def _sample_blocks(self, tables, q, k, grid, boxes):
        """Per-sample grids: the samples with one box (first token, extent) share one schedule
        of their own grid and one block whose rows are those samples' box tokens."""
        groups, real = self._sample_groups(q, grid, boxes)
        blocks = [cpu.Block(self.path.chunks(schedule, tables, Shape(len(samples), q.shape[1], k.shape[1], len(tokens)),
                                             q.device),
                            problem=self.problem.with_grid(extent), samples=samples, tokens=tokens)
                  for extent, schedule, samples, tokens in groups]
        return blocks, real

    def _sample_groups(self, q, grid, boxes):
        """([(extent, its schedule, int64 samples, int64 flat tokens of their box)], bool [B, N]
        real tokens): the samples of each distinct box, in order of first appearance. Reads
        the boxes on the host (one synchronisation per call)."""
        grid = tuple(int(x) for x in grid)
        b, n = q.shape[0], q.shape[2]
        if self.path is not STATIC:
            raise NotImplementedError(f"per-sample grids (lengths=/sizes=) run on static patterns only, not "
                                      f"{self.pattern!r} ({self.path.name} path)")
        if tuple(boxes.shape) != (b, 2, len(grid)):
            raise ValueError(f"padding boxes have shape {list(boxes.shape)}, expected [B={b}, 2, ndim={len(grid)}]")
        real = torch.zeros(b, n, dtype=torch.bool, device=q.device)
        groups: dict[tuple, list[int]] = {}
        for i, (start, extent) in enumerate(boxes.tolist()):
            for d, (s0, e, g) in enumerate(zip(start, extent, grid)):
                if not (0 <= s0 and 0 <= e and s0 + e <= g):
                    raise ValueError(f"padding box of sample {i} starts at {start} with extent {extent}, outside "
                                     f"the grid {grid} (dimension {d})")
            if math.prod(extent) > 0:
                groups.setdefault((tuple(start), tuple(extent)), []).append(i)
        out = []
        for (start, extent), samples in groups.items():
            try:
                schedule = self.at(extent).schedule
            except ValueError as e:
                raise ValueError(f"sample {samples[0]} is a grid of {extent}, on which {e}") from None
            tokens = box_indices(grid, extent)
            offset = sum(s0 * math.prod(grid[d + 1:]) for d, s0 in enumerate(start))
            tokens = (tokens + offset).to(q.device)
            samples = torch.tensor(samples, device=q.device)
            real[samples[:, None], tokens[None, :]] = True
            out.append((extent, schedule, samples, tokens))
        return out, real

    def _triton_by_box(self, which, q, k, v, tables, grid, boxes, run):
        """Per-sample grids on the Triton kernels: each group of samples with one box runs the
        kernels of its own grid on its box's tokens (gathered), ``run(kernels, schedule, qs, ks,
        vs, rows)`` -> tensors scattered back by ``rows`` (samples, tokens)."""
        groups, _ = self._sample_groups(q, grid, boxes)
        for extent, schedule, samples, tokens in groups:
            def box(t):
                return t.index_select(0, samples).index_select(2, tokens).contiguous()
            kernels = self.triton(extent, which == "interpret")
            yield run(kernels, self.path.kernel_tables(schedule, tables, q.device), box), (samples, tokens)

    @staticmethod
    def _scatter(into, rows, value):
        samples, tokens = rows
        into[samples[:, None, None], torch.arange(into.shape[1], device=into.device)[None, :, None],
             tokens[None, None, :]] = value.to(into.dtype)

    # -- keys on a grid of their own ----------------------------------------------------
    def cross_problem(self, grid, kv_grid) -> Problem | None:
        """The problem of a call whose keys have a grid of their own (``kv_grid``), else None
        (a ``kv_grid`` equal to ``grid`` is self attention, except on the segments path, where
        it says the tables are group ids)."""
        if kv_grid is None:
            return None
        grid, kv = tuple(int(x) for x in grid), tuple(int(x) for x in kv_grid)
        if kv == grid and not self.path.grid_free:
            return None
        p = self.problem
        return Problem(grid=grid, kv_grid=kv, heads=p.heads, head_dim=p.head_dim, dtype=p.dtype, kv_heads=p.kv_heads)

    def _cross_blocks(self, problem: Problem, tables, q, k, padding, scores) -> list:
        """The CPU executor's blocks of a call with keys on a grid of their own."""
        nq, nk = problem.tokens, problem.kv_tokens
        if q.shape[2] != nq or k.shape[2] != nk:
            raise ValueError(f"q has {q.shape[2]} tokens and k {k.shape[2]}, but grid={problem.grid} and "
                             f"kv_grid={problem.key_grid} have {nq} and {nk}")
        if scores is not None and scores.biases:
            check_cross_extras(problem, scores.biases)
        shape = Shape(q.shape[0], q.shape[1], k.shape[1], nq)
        if self.path is SEGMENTS:
            if len(tables) != 2:
                raise ValueError(f"a segments kernel with kv_grid takes tables=[groups, kv_groups] (the queries' and "
                                 f"the keys' group ids), got {len(tables)} tensor(s)")
            groups, kv_groups = tables
            chunks = cpu.mask_chunks(Grouped(causal=self._segments_causal), problem, shape, q.device,
                                     groups=groups, kv_groups=kv_groups)
        elif self.path is STATIC:
            if tables:
                raise ValueError(f"a static kernel takes no tables, got {len(tables)}")
            chunks = cpu.mask_chunks(self.pattern, problem, shape, q.device)
        else:
            raise ValueError(f"{self.pattern!r} ({self.path.name} path) is defined on one set of tokens; kv_grid "
                             "is not supported for it")
        return [cpu.cross_block(chunks, problem, padding)]  # padding: None or a key padding mask [B, Nk]

    def decodes(self, problem: Problem) -> bool:
        """Whether the Triton decode kernel runs the forward of ``problem`` (``decodes``)."""
        return decodes(self.pattern, problem, self.path.name)

    def _decode(self, which: str, problem: Problem, q, k, v, tables, params, padding, scale: float):
        """Forward of a call whose queries are the last Nq of Nk keys, on the Triton decode kernel."""
        if tables or not self.decodes(problem):
            refuse_cross_on(which, f"kernel {self.key!r} on {problem!r}")
        mods, head_scale = self.unflatten(params)
        n_keys = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32, device=q.device)
        return self.decoder(which == "interpret", padding is not None).forward(
            q, k, v, n_keys, scale, modifiers=mods or None, head_scale=head_scale, key_valid=padding)

    def decoder(self, interpret: bool, padding: bool = False, page_size: int | None = None) -> TritonDecode:
        """The decode kernel of this kernel's pattern, modifiers and heads (cached): for the
        interpreter or a GPU, with a key padding mask or not, on a contiguous or paged cache."""
        key = (interpret, padding, page_size)
        with self._lock:
            if key not in self._decoders:
                self._decoders[key] = TritonDecode(self.pattern, self.problem, modifiers=self.spec, padding=padding,
                                                   page_size=page_size, interpret=interpret)
            return self._decoders[key]

    def forward(self, q, k, v, tables, params, padding, grid, scale: float, backend: str, kv_grid=None):
        which = resolve_backend(backend, q.device)
        cross = self.cross_problem(grid, kv_grid)
        if cross is not None:
            if which != "cpu":
                return self._decode(which, cross, q, k, v, tables, params, padding, scale)
            scores = self._scores(params)
            blocks = self._cross_blocks(cross, tables, q, k, padding, scores)
            return cpu.attend(q, k, v, blocks, scale, scores=scores, positions=cross)
        schedule = self.at(grid).schedule
        if which == "cpu":
            blocks, real = self._blocks(schedule, tables, q, k, grid, padding)
            return cpu.attend(q, k, v, blocks, scale, scores=self._scores(params), positions=self._call_problem(grid),
                              real=real)
        mods, head_scale = self.unflatten(params)
        if padding is not None and padding.dtype == torch.int64:  # per-sample grids
            out = torch.zeros_like(q)
            lse = torch.full(q.shape[:3], -math.inf, dtype=torch.float32, device=q.device)

            def run(kernels, kernel_tables, box):
                return kernels.forward(box(q), box(k), box(v), scale, kernel_tables, modifiers=mods or None,
                                       head_scale=head_scale)
            for (o, l), rows in self._triton_by_box(which, q, k, v, tables, grid, padding, run):
                self._scatter(out, rows, o)
                self._scatter(lse, rows, l)
            return out, lse
        key_valid = padding   # a key padding mask, group ids (int32) or None
        out, lse = self.triton(grid, which == "interpret", _padding_kind(padding)).forward(
            q, k, v, scale, self.path.kernel_tables(schedule, tables, q.device), modifiers=mods or None,
            head_scale=head_scale, key_valid=key_valid)
        return out, lse.float()

    def backward(self, q, k, v, out, lse, dout, dlse, tables, params, padding, grid, scale: float, backend: str,
                 kv_grid=None):
        which = resolve_backend(backend, q.device)
        cross = self.cross_problem(grid, kv_grid)
        if cross is not None:
            if which != "cpu":
                raise CrossGridsNotImplementedError(
                    f"kernel {self.key!r}: the backward of a call with keys on a grid of their own (kv_grid={cross.key_grid}) "
                    f"is not implemented on backend={which!r}: the decode kernel computes the forward (inference); "
                    "train with Nq != Nk on CPU tensors (backend='cpu' or None)")
            scores = self._scores(params)
            blocks = self._cross_blocks(cross, tables, q, k, padding, scores)
            return cpu.attend_backward(q, k, v, out, lse, dout, blocks, scale, scores=scores, positions=cross,
                                       dlse=dlse)
        schedule = self.at(grid).schedule

        def attend_backward(dout):
            blocks, real = self._blocks(schedule, tables, q, k, grid, padding)
            return cpu.attend_backward(q, k, v, out, lse, dout, blocks, scale, scores=self._scores(params),
                                       positions=self._call_problem(grid), real=real, dlse=dlse)

        if which == "cpu":
            return attend_backward(dout)
        mods, head_scale = self.unflatten(params)
        key_valid = padding if padding is not None and padding.dtype != torch.int64 else None
        if dout is None:
            dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
            grads = tuple(torch.zeros_like(p) for p in params)
        elif padding is not None and key_valid is None:  # per-sample grids: each box's kernels
            dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
            sums = [torch.zeros_like(p, dtype=torch.float64) for p in params]

            def run(kernels, kernel_tables, box):
                return kernels.backward(box(q), box(k), box(v), box(out), box(lse.float()), box(dout), scale,
                                        kernel_tables, modifiers=mods or None, head_scale=head_scale)
            for (gq, gk, gv, g), rows in self._triton_by_box(which, q, k, v, tables, grid, padding, run):
                self._scatter(dq, rows, gq)
                self._scatter(dk, rows, gk)
                self._scatter(dv, rows, gv)
                sums = [s + x.double() for s, x in zip(sums, g)]  # boxes in a fixed order
            grads = tuple(s.to(p.dtype) for s, p in zip(sums, params))
        else:
            dq, dk, dv, grads = self.triton(grid, which == "interpret", _padding_kind(key_valid)).backward(
                q, k, v, out, lse.float(), dout, scale, self.path.kernel_tables(schedule, tables, q.device),
                modifiers=mods or None, head_scale=head_scale, key_valid=key_valid)
        if dlse is not None:
            # The kernels take no LSE gradient; its contribution, dS += P * dlse, comes from
            # the CPU executor's formulas on the same device (only when lse is used).
            cq, ck, _, cg = attend_backward(None)
            dq, dk = (dq.float() + cq.float()).to(q.dtype), (dk.float() + ck.float()).to(k.dtype)
            grads = tuple((g.double() + c.double()).to(g.dtype) for g, c in zip(grads, cg))
        return dq, dk, dv, tuple(grads)

    def __repr__(self) -> str:
        mods = f", modifiers={self.spec}" if self.spec else ""
        return f"Kernel({self.key!r}, {self.pattern!r}, path={self.path.name}{mods})"


def _padding_kind(padding) -> bool | str:
    """The Triton kernels' variant for the ops' ``padding``: False, "mask" (bool [B, N]) or
    "groups" (int32 group ids [B, N], ``Grouped & pattern``)."""
    if padding is None:
        return False
    return "groups" if padding.dtype == torch.int32 else "mask"


def _shape(q: Tensor, k: Tensor) -> Shape:
    return Shape(q.shape[0], q.shape[1], k.shape[1], q.shape[2])


#: Readable tags of the modifier kinds in kernel keys.
_MODIFIER_TAGS = {"RelativePositionBias": "rpb", "T5Bias": "t5", "ALiBi": "alibi", "Softcap": "cap",
                  "Sinks": "sinks", "HeadScale": "hs"}


def _key(path: Path, seed: TileSchedule, config: KernelConfig, spec: tuple = ()) -> str:
    """Readable and unique: the schedule's name without its grid, and a hash of what shapes the
    code (pattern, heads, head dim, dtype, tiles, launches, path and its layout, and the
    modifier spec when there is one: without modifiers the key is what it always was)."""
    p = seed.problem
    content = dict(path=path.name, pattern=seed.pattern.fingerprint(), heads=p.heads,
                   kv_heads=p.kv_heads, head_dim=p.head_dim, dtype=DTYPE_NAMES[p.dtype],
                   config=config.as_dict(), scattered=repr(seed.scattered),
                   grid_dims=None if p.grid is None else len(p.grid))
    if spec:
        content["modifiers"] = repr(spec)
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]
    stem = re.sub(r"_g[0-9x]+(?=_)", "", seed.name.rsplit("_", 1)[0])
    if spec:
        stem += "_" + "_".join(_MODIFIER_TAGS.get(entry[0], entry[0].lower()) for entry in spec)
    return f"{stem}_{digest}"


_KERNELS: dict[str, Kernel] = {}
_KERNELS_LOCK = threading.Lock()


def register(path: Path, schedule: TileSchedule, config: KernelConfig, modifiers: Modifiers | None = None,
             head_scale: bool = False) -> Kernel:
    """The registered kernel of ``schedule``'s pattern on ``path`` with ``config`` and the
    structure of ``modifiers``/``head_scale`` (the same object for the same key; ``schedule``
    seeds its grid cache)."""
    new = Kernel(path, schedule, config, modifiers, head_scale)
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
def attention(q: Tensor, k: Tensor, v: Tensor, tables: list[Tensor], params: list[Tensor], padding: Optional[Tensor],
              grid: list[int], kernel: str, scale: float, backend: str,
              kv_grid: Optional[list[int]] = None) -> tuple[Tensor, Tensor]:
    with _no_autocast(q):
        out, lse = registered_kernel(kernel).forward(q, k, v, tables, params, padding, grid, scale, backend,
                                                     kv_grid)
    return out.contiguous(), lse.contiguous()


@attention.register_fake
def _attention_fake(q, k, v, tables, params, padding, grid, kernel, scale, backend, kv_grid=None):
    b, h, n, _ = q.shape
    return q.new_empty((b, h, n, v.shape[-1])), q.new_empty((b, h, n), dtype=_lse_dtype(q.dtype))


@torch.library.custom_op(f"{NAMESPACE}::attention_backward", mutates_args=())
def attention_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Optional[Tensor],
                       dlse: Optional[Tensor], tables: list[Tensor], params: list[Tensor], padding: Optional[Tensor],
                       grid: list[int], kernel: str, scale: float, backend: str,
                       kv_grid: Optional[list[int]] = None) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    with _no_autocast(q):
        dq, dk, dv, dparams = registered_kernel(kernel).backward(q, k, v, out, lse, dout, dlse, tables, params,
                                                                padding, grid, scale, backend, kv_grid)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), [g.contiguous() for g in dparams]


@attention_backward.register_fake
def _attention_backward_fake(q, k, v, out, lse, dout, dlse, tables, params, padding, grid, kernel, scale, backend,
                             kv_grid=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), [torch.empty_like(p) for p in params]


def _setup_context(ctx, inputs, output):
    q, k, v, tables, params, padding, grid, kernel, scale, backend, *rest = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, padding, *tables, *params)
    ctx.grid, ctx.kernel, ctx.scale, ctx.backend = grid, kernel, scale, backend
    ctx.kv_grid = rest[0] if rest else None
    ctx.n_tables, ctx.n_params = len(tables), len(params)
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    none_tables = [None] * ctx.n_tables
    # padding, grid, kernel, scale, backend (and kv_grid where the call passed it: the gradients
    # have the structure of the arguments as given, which needs_input_grad has)
    rest = (None,) * (len(ctx.needs_input_grad) - 5)
    if dout is None and dlse is None:
        return (None, None, None, none_tables, [None] * ctx.n_params) + rest
    q, k, v, out, lse, padding, *saved = ctx.saved_tensors
    tables, params = saved[:ctx.n_tables], saved[ctx.n_tables:]
    dq, dk, dv, dparams = attention_backward(q, k, v, out, lse, None if dout is None else dout.contiguous(),
                                             None if dlse is None else dlse.contiguous(), tables, params, padding,
                                             ctx.grid, ctx.kernel, ctx.scale, ctx.backend, ctx.kv_grid)
    return (dq, dk, dv, none_tables, list(dparams)) + rest


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
