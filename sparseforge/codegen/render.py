"""Render: TileSchedule -> readable Triton source (Jinja2 templates, StrictUndefined)."""
from __future__ import annotations

import math
import re

import jinja2
import sympy
import torch

from ..dsl.problem import DTYPE_NAMES
from ..lower.paths import path_of
from ..version import __version__
from ..dsl.modifiers import relative_position_flat_index, t5_bucket_steps
from ..lower.decode import KP, NK, QP
from ..lower.families import Symbols, predicate
from .config import KERNELS
from .printer import to_triton
from ..lower.schedule import TileSchedule

#: One generated module per kernel (the dK/dV kernel may run on a schedule of its own tiles).
KINDS = KERNELS
_TEMPLATES = {kind: f"attention_{kind}.py.j2" for kind in KINDS}

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("sparseforge.codegen", "templates"),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


# Run-time segment-id predicate (the segment path, ``lower.paths``): the kernels load the segment ids of
# their query rows (q_seg) and key rows (k_seg); padding rows have id -1 and match nothing.
SEGMENT_PREDICATE = "(q_seg[:, None] == k_seg[None, :]) & (k_seg[None, :] >= 0)"
SEGMENT_PREDICATE_T = "(k_seg[:, None] == q_seg[None, :]) & (k_seg[:, None] >= 0)"
# Causal segments (``ScatteredLayout.causal``): also key row <= query row of the packed sequence.
SEGMENT_CAUSAL = " & (k_tok[None, :] <= q_tok[:, None])"
SEGMENT_CAUSAL_T = " & (k_tok[:, None] <= q_tok[None, :])"


def kernel_name(schedule: TileSchedule) -> str:
    """Prefix of the generated kernel functions: the schedule's readable name."""
    return f"sf_{schedule.name}"


def _side(geom, name: str, suffix: str = "") -> dict:
    """What the rows macro needs for the ``name`` ("q" or "k") tiles of ``geom``; the
    function is ``_{name}_rows{suffix}``."""
    tiles = [d.q_tiles if name == "q" else d.k_tiles for d in geom.dims]
    extents = [d.tq if name == "q" else d.tk for d in geom.dims]
    dims = []
    for i, d in enumerate(geom.dims):
        dims.append(dict(length=d.length, fold=d.fold, padded_group=d.padded_group, tile=extents[i],
                         region=d.region, region_pad=d.region_pad,
                         tiles=tiles[i], tiles_after=math.prod(tiles[i + 1:]), rows_after=math.prod(extents[i + 1:]),
                         stride=geom.strides[i]))
    return dict(name=name, fn=f"_{name}_rows{suffix}", block=math.prod(extents), dims=dims,
                fold_note=f" under fold {geom.fold}" if suffix else "",
                coords=", ".join(f"x{i}" for i in range(len(geom.dims))))


def _row_functions(schedule: TileSchedule) -> tuple[list[dict], list[dict]]:
    """(sides, row_dispatch): the ``_q_rows``/``_k_rows`` functions of the schedule. With
    per-group folds (``schedule.group_geometry``) every distinct fold gets its own pair
    (``_q_rows_f0``, ...) and ``_q_rows(tile, group)`` dispatches on the head group."""
    if schedule.group_geometry is None:
        return [_side(schedule.geometry, "q"), _side(schedule.geometry, "k")], []
    folds = list(dict.fromkeys(schedule.group_folds))   # distinct, in group order
    geoms = {g.fold: g for g in schedule.group_geometry}
    sides, dispatch = [], []
    for name in ("q", "k"):
        variants = []
        for i, fold in enumerate(folds):
            sides.append(_side(geoms[fold], name, f"_f{i}"))
            groups = [g for g, f in enumerate(schedule.group_folds) if f == fold]
            variants.append(dict(fn=sides[-1]["fn"], condition=" | ".join(f"(group == {g})" for g in groups)))
        dispatch.append(dict(name=name, variants=variants, coords=sides[-1]["coords"]))
    return sides, dispatch


def render(schedule: TileSchedule, kind: str, config=None, name: str | None = None, modifiers: tuple = (),
           padding: bool = False, table_grad: bool = False) -> str:
    """Source of the ``kind`` ("fwd", "bwd_dq" or "bwd_dkdv") kernel module for ``schedule``
    (for "bwd_dkdv", the schedule of the dK/dV tiles, whose inverse tables it reads);
    ``config`` (a resolved ``KernelConfig``) is named in the header; ``name``: the kernels'
    prefix (default ``kernel_name(schedule)``; one name for the modules of one attention);
    ``modifiers``: the score modifiers' spec (``modifier_context``); ``padding``: the kernels
    take a key padding mask (call data, ``KEY_VALID``); ``table_grad``: this kernel adds up the
    bias table's gradient (``DBIAS``; one backward kernel does, ``TritonKernels.table_grad_kernel``)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    prob, geom = schedule.problem, schedule.geometry
    nd = len(geom.dims)
    sym = Symbols.make(nd)
    # The path's template hooks (``lower.paths``): which predicate masks a PARTIAL tile (the
    # pattern's; none: routed tiles never straddle regions; the run-time segment-id compare),
    # and whether the head-group table is per batch element (routed tables per call).
    path = path_of(schedule.pattern)
    segments = path.predicate == "segments"
    causal_segments = segments and schedule.scattered.causal
    pred = predicate(schedule.pattern, prob, sym) if path.predicate == "pattern" else sympy.true

    sides, row_dispatch = _row_functions(schedule)

    def names(q_axis: str, k_axis: str) -> dict:
        out = {sym.qn: f"q_tok{q_axis}", sym.kn: f"k_tok{k_axis}", sym.head: "head"}
        for d in range(nd):
            out[sym.qx[d]] = f"qx{d}{q_axis}"
            out[sym.kx[d]] = f"kx{d}{k_axis}"
        return out

    context = dict(
        version=_version(), pattern=repr(schedule.pattern), problem=repr(prob),
        q_tile=geom.q_tile, k_tile=geom.k_tile,
        fold=geom.fold if schedule.group_geometry is None else f"per head group {list(schedule.group_folds)}",
        n_q_tiles=geom.n_q_tiles, n_k_tiles=geom.n_k_tiles, groups=schedule.groups,
        dtype=DTYPE_NAMES[prob.dtype], head_dim=prob.head_dim, block_d=block_d(prob.head_dim),
        heads=prob.heads, group_stride_b=prob.heads if path.batched_head_groups else 0, kv_group=prob.heads // prob.kv_heads, tokens=0 if segments else prob.tokens,
        sides=sides, row_dispatch=row_dispatch, rows_group=", group" if row_dispatch else "",
        q_coords=", ".join(f"qx{d}" for d in range(nd)), k_coords=", ".join(f"kx{d}" for d in range(nd)),
        kernel_name=name or kernel_name(schedule),
        predicate=(SEGMENT_PREDICATE + SEGMENT_CAUSAL * causal_segments if segments else
                   _bool_tensor(to_triton(pred, names("[:, None]", "[None, :]")), "q_valid[:, None] & k_valid[None, :]")),
        predicate_t=(SEGMENT_PREDICATE_T + SEGMENT_CAUSAL_T * causal_segments if segments else
                     _bool_tensor(to_triton(pred, names("[None, :]", "[:, None]")), "k_valid[:, None] & q_valid[None, :]")),
        segments=segments, lse_stride="n_tokens" if segments else "N_TOKENS",
        padding_only=path.predicate == "none",  # PARTIAL tiles mask padding keys only
        # NaN/Inf containment kernels (``*_fix``): wherever a visited tile may hold a pair the
        # pattern masks (routed tiles mask padding only, which is never loaded)
        contain=path.predicate != "none",
        dot_args=', input_precision="ieee"' if prob.dtype in (torch.float32, torch.float64) else "",
        loop_bounds=schedule.loop_bounds, bounds_reason=schedule.bounds_reason,
        module=kind, launches=_launches(config, (kind,)), mods=modifier_context(modifiers, schedule.pattern, prob), padding=padding,
        table_grad=table_grad,
        # the dK/dV kernel walks the inverse tables: no closed-form key-tile loops
        closed_form=_closed_form_context(schedule) if schedule.bounds is not None and kind != "bwd_dkdv" else None,
    )
    return _tidy(_env.get_template(_TEMPLATES[kind]).render(**context))


#: Score modifiers the generated kernels compute (``dsl.modifiers`` kinds).
KERNEL_MODIFIERS = ("RelativePositionBias", "T5Bias", "ALiBi", "Softcap", "Sinks", "HeadScale")
#: The bias terms read from a learnable table per head (``bias_table``).
TABLE_BIASES = ("RelativePositionBias", "T5Bias")


def modifier_context(spec: tuple, pattern=None, problem=None) -> dict:
    """What the templates need of a modifier spec (``dsl.modifiers.modifier_spec``: one entry
    per modifier, ``(kind, ...)``) for ``pattern`` on ``problem`` (needed by the table biases):
    which modifiers, the softcap, the bias table's index code, a one-line description."""
    kinds = [entry[0] for entry in spec]
    missing = [k for k in kinds if k not in KERNEL_MODIFIERS]
    if missing:
        raise NotImplementedError(f"score modifiers {missing} are not in the generated Triton kernels (they "
                                  f"compute {list(KERNEL_MODIFIERS)}): run them with backend='cpu'")
    tables = [entry for entry in spec if entry[0] in TABLE_BIASES]
    if len(tables) > 1:
        raise NotImplementedError(f"the generated kernels read one bias table, got {[t[0] for t in tables]}: "
                                  "sum them into one table, or run with backend='cpu'")
    table = bias_table(tables[0], pattern, problem) if tables else None
    softcap = next((dict(entry[1:])["cap"] for entry in spec if entry[0] == "Softcap"), None)
    parts = ["per-head scale" if "HeadScale" in kinds else "scale"] + ["* q.k"] + \
        ([f"+ {table['describe']}"] if table else []) + \
        (["- slope_h * |k - q| (ALiBi)"] if "ALiBi" in kinds else []) + \
        ([f"-> {softcap!r} * tanh(s / {softcap!r})"] if softcap is not None else []) + \
        (["; softmax with one sink logit per head"] if "Sinks" in kinds else [])
    return dict(any=bool(spec), head_scale="HeadScale" in kinds, alibi="ALiBi" in kinds, sinks="Sinks" in kinds,
                softcap=softcap, table=table, describe=" ".join(parts))


def bias_table(entry: tuple, pattern, problem) -> dict:
    """The bias table of spec ``entry`` (RelativePositionBias or T5Bias) as template data:
    ``entries`` per head, and the lines that compute ``bias_idx`` (the entry of every pair of a
    tile: ``index`` with query rows, ``index_t`` with key rows first)."""
    if pattern is None or problem is None:
        raise ValueError(f"{entry[0]} needs the pattern and problem to print its index")
    if entry[0] == "T5Bias":
        params = dict(entry[2:])
        half, exact, steps = t5_bucket_steps(params["bidirectional"], params["num_buckets"], params["max_distance"])

        def index(q, k):
            dist = "tl.abs(rel)" if half else "tl.maximum(-rel, 0)"
            jumps = "".join(f" + (dist >= {t}).to(tl.int32){f' * {j}' if j > 1 else ''}" for t, j in steps)
            return [f"rel = {k} - {q}  # key - query",
                    f"dist = {dist}",
                    f"bias_idx = tl.minimum(dist, {exact}){jumps}  # T5 buckets (transformers' float32 boundaries)"] + \
                ([f"bias_idx += tl.where(rel > 0, {half}, 0)  # keys after the query: the upper half"] if half else [])
        entries = params["num_buckets"]
        describe = (f"T5 bucket bias table[h, bucket(k - q)] ({entries} buckets, max_distance "
                    f"{params['max_distance']}{', bidirectional' if half else ', causal'})")
        return dict(entries=entries, clamp=False, describe=describe, index=index("qx0[:, None]", "kx0[None, :]"),
                    index_t=index("qx0[None, :]", "kx0[:, None]"), index_rows=index("qx0[:, None]", "kx0[None, :]"))
    extents = entry[1][1][1:]  # ("table", shape, dtype): [H, e_1, ..., e_n]
    sym = Symbols.make(problem.ndim)
    per_window = relative_position_flat_index(pattern, problem, sym.qx, sym.kx)

    def index(q_axis, k_axis, head="head"):
        names = {sym.head: head} | {sym.qx[d]: f"qx{d}{q_axis}" for d in range(problem.ndim)} | \
            {sym.kx[d]: f"kx{d}{k_axis}" for d in range(problem.ndim)}
        lines = [f"bias_idx = {to_triton(per_window[0][1], names)}"]
        for heads, flat in per_window[1:]:
            which = " | ".join(f"(head == {h})" for h in heads)
            lines.append(f"bias_idx = tl.where({which}, {to_triton(flat, names)}, bias_idx)")
        return lines
    shape = "x".join(map(str, extents))
    describe = f"relative position bias table[h, {shape}] (offsets in the window's coordinates)"
    return dict(entries=math.prod(extents), clamp=True, describe=describe, index=index("[:, None]", "[None, :]"),
                index_t=index("[None, :]", "[:, None]"), index_rows=index("[:, None]", "[None, :]", "head[:, None]"))


def render_decode(lowering, problem, name: str, *, page_size: int | None = None, modifiers: tuple = (),
                  padding: bool = False) -> str:
    """Source of the decode kernel module (``attention_decode.py.j2``) of ``lowering``
    (``lower.decode.DecodeLowering``) for ``problem``'s heads, head dim and dtype (its grid:
    any length, for the bias index); ``page_size``: read K/V from pages through a block table
    (None: contiguous); ``modifiers``: their spec (``modifier_context``; sinks join at the merge);
    ``padding``: the kernel takes a key padding mask (``KEY_VALID``)."""
    sym = Symbols.make(1)
    names = {QP: "qx0[:, None]", KP: "kx0[None, :]", sym.head: "head[:, None]"}
    pred = _bool_tensor(to_triton(lowering.predicate, names), "q_valid[:, None] & k_valid[None, :]")
    ranges = [(to_triton(lo, {QP: "qp", NK: "n_keys"}), to_triton(hi, {QP: "qp", NK: "n_keys"}))
              for lo, hi in lowering.intervals]
    context = dict(
        version=_version(), pattern=repr(lowering.pattern), heads=problem.heads, kv_heads=problem.kv_heads,
        kv_group=problem.heads // problem.kv_heads, head_dim=problem.head_dim, block_d=block_d(problem.head_dim),
        dtype=DTYPE_NAMES[problem.dtype], paged=page_size is not None, page_size=page_size, kernel_name=name,
        padding=padding,
        predicate=pred, ranges=ranges, bounds=", ".join(f"first{j}, end{j}" for j in range(len(ranges))),
        mods=modifier_context(modifiers, lowering.pattern, problem),
        dot_args=', input_precision="ieee"' if problem.dtype in (torch.float32, torch.float64) else "",
    )
    return _tidy(_env.get_template("attention_decode.py.j2").render(**context))


def _tidy(source: str) -> str:
    """PEP 8 blank lines where macros meet: two between top-level definitions, at most one
    inside a function."""
    source = re.sub(r"\n{4,}", "\n\n\n", source)
    return re.sub(r"\n{3,}(?=    )", "\n\n", source)


def _launches(config, kernels) -> str:
    if config is None:
        return "chosen at launch"
    parts = []
    for k in kernels:
        launch = config.launch(k)
        parts.append(f"{k} num_warps={launch.num_warps} num_stages={launch.num_stages}" if launch else f"{k} default")
    return "; ".join(parts)


def _closed_form_context(schedule: TileSchedule) -> dict:
    """What the templates need to print the closed-form FULL key-tile loops (``lower.bounds``):
    the bounds per dimension and the key tile of the box's counters ``c0``, ``c1``, ..."""
    geom, nd = schedule.geometry, len(schedule.geometry.dims)
    dims = []
    for d, (bounds, dim) in enumerate(zip(schedule.bounds.dims, geom.dims)):
        names = {sym: sym.name for sym, _ in bounds.steps}
        after = math.prod(x.q_tiles for x in geom.dims[d + 1:])
        steps = [(sym.name, to_triton(expr, names)) for sym, expr in bounds.steps[1:]]
        dims.append(dict(index=d, tile=bounds.tile.name, tile_coord=f"(q_tile // {after}) % {dim.q_tiles}", steps=steps,
                         has_rows=to_triton(bounds.has_rows, names), padded=to_triton(bounds.padded, names),
                         length=dim.length, fold=dim.fold, k_after=math.prod(x.k_tiles for x in geom.dims[d + 1:])))
    counter_tile = " + ".join(f"c{d['index']}" + (f" * {d['k_after']}" if d["k_after"] != 1 else "") for d in dims)
    return dict(dims=dims, counter_tile=counter_tile,
                bounds=", ".join(f"first{d}, last{d}, full_first{d}, full_last{d}" for d in range(nd)))


def _bool_tensor(text: str, full_shape_expr: str) -> str:
    """A predicate that printed as a Python constant becomes a tensor of the tile's shape."""
    if text == "True":
        return full_shape_expr
    if text == "False":
        return f"~({full_shape_expr})"
    return text


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two >= 16 (the kernels' BLOCK_D; pad lanes are masked)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def _version() -> str:
    return __version__
