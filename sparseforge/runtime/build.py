"""Build directories of compiled attentions: ``save`` writes one, ``load`` brings it back.

Layout (every file hashed in ``manifest.json``, see ``builddir``)::

    kernels/fwd.py  kernels/bwd.py        the generated Triton sources
    config.json                           the KernelConfig (and how it was chosen)
    schedule.txt                          the schedule summary
    aot/<target>/<kernel>.ptx|.cubin      ahead-of-time artifacts, one set per target
    aot/<target>/resources.json           registers, spills, shared memory per kernel

``load`` verifies the hashes, rebuilds the schedule from the recorded pattern, problem
and config, and refuses the build unless the kernels this installation generates are
byte-identical to the recorded sources (a build from another sparseforge version, or an
edited one, is never run). The op is registered under the build's recorded name.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import triton

from .. import envvars
from ..version import __version__
from ..backends.aot import parse_target
from ..codegen.config import KERNELS, KernelConfig
from ..dsl.parse import parse_pattern
from ..dsl.problem import DTYPE_NAMES, Problem
from ..lower.paths import path_of
from .builddir import BuildIntegrityError, read_build, write_build
from .compiled import CompiledAttention
from .inputs import check_backend
from .ops import refuse_cross_on

__all__ = ["load", "save", "versions"]

SOURCES = {kind: f"kernels/{kind}.py" for kind in KERNELS}
#: The layout of a build: 3 since every kernel has a module of its own (the dK/dV kernel its
#: own tiles); 2 since the ops became one fixed set (builds before it named a torch op of
#: their own, and have no "format").
FORMAT = 3


def versions() -> dict[str, str]:
    """Versions that decide what the kernels compile to (part of every build's manifest)."""
    return dict(sparseforge=__version__, triton=triton.__version__, torch=torch.__version__,
                triton_fp_fusion=envvars.pin_triton_fp_fusion())


def problem_to_dict(problem: Problem) -> dict:
    """The problem as JSON data; ``kv_grid`` only when the keys have a grid of their own (so the
    record of every other problem is what it always was)."""
    out = dict(grid=list(problem.grid) if problem.grid else None, heads=problem.heads, head_dim=problem.head_dim,
               kv_heads=problem.kv_heads, dtype=DTYPE_NAMES[problem.dtype])
    if problem.kv_grid is not None:
        out["kv_grid"] = list(problem.kv_grid)
    return out


def problem_from_dict(data: dict) -> Problem:
    grid, kv_grid = data["grid"], data.get("kv_grid")
    return Problem(grid=tuple(grid) if grid is not None else None, heads=data["heads"], head_dim=data["head_dim"],
                   kv_heads=data["kv_heads"], dtype=data["dtype"],
                   kv_grid=tuple(kv_grid) if kv_grid is not None else None)


def save(attn: CompiledAttention, out_dir, targets=("sm_90",), *, progress=None) -> Path:
    """Write ``attn``'s build directory to ``out_dir`` (atomically; an existing build there is
    replaced, anything else is refused). ``targets``: ahead-of-time targets ("sm_80", ...);
    empty for sources only. Returns the directory."""

    say = progress or (lambda _text, _done=None, _total=None: None)
    if attn.problem.is_cross:
        refuse_cross_on("triton", f"a build directory of {attn!r} (it holds the generated Triton kernels)")
    caps = [parse_target(t) for t in targets]
    kernels = attn.kernels()
    files: dict[str, bytes | str] = {SOURCES[kind]: kernels.source(kind) for kind in SOURCES}
    files["schedule.txt"] = attn.schedule.summary() + "\n"
    tuning = attn.tuning.as_dict() if attn.tuning is not None else None
    if tuning is not None:
        tuning.pop("candidates", None)
    files["config.json"] = json.dumps(dict(config=attn.config.as_dict(), tuning=tuning), indent=2) + "\n"
    for i, cap in enumerate(caps):
        resources = {}
        for j, name in enumerate(KERNELS):
            say(f"ahead-of-time compile of {name} for sm_{cap}", i * len(KERNELS) + j, len(caps) * len(KERNELS))
            report = kernels.aot(name, f"sm_{cap}")
            files[f"aot/sm_{cap}/{name}.ptx"] = report.ptx
            if report.cubin:
                files[f"aot/sm_{cap}/{name}.cubin"] = report.cubin
            resources[name] = report.as_dict()
        files[f"aot/sm_{cap}/resources.json"] = json.dumps(resources, indent=2) + "\n"
    meta = dict(format=FORMAT, name=attn.name, pattern=repr(attn.pattern), problem=problem_to_dict(attn.problem),
                config=attn.config.as_dict(), targets=[f"sm_{c}" for c in caps], versions=versions(),
                schedule_fingerprint=attn.schedule.fingerprint(), loop_bounds=attn.schedule.loop_bounds,
                tile_efficiency=attn.schedule.tile_efficiency)
    return write_build(out_dir, files, meta)


def load(path, *, backend: str | None = None) -> CompiledAttention:
    """The compiled attention of the build directory ``path`` (called through the fixed
    ``torch.ops.sparseforge.attention`` ops). Raises ``BuildIntegrityError`` for a modified or
    incomplete build, or one whose kernels this installation would generate differently."""
    check_backend(backend)
    build = read_build(path)
    meta = build.meta
    if meta.get("format") != FORMAT:
        raise BuildIntegrityError(f"build directory '{build.path}' was made by an older sparseforge (build format "
                                  f"{meta.get('format', 1)}, this one reads {FORMAT}); rebuild it with 'sparseforge compile ... --out {build.path}'")
    try:
        pattern = parse_pattern(meta["pattern"])
        problem = problem_from_dict(meta["problem"])
        config = KernelConfig.from_dict(meta["config"])
        name = meta["name"]
    except (KeyError, TypeError, ValueError) as exc:
        raise BuildIntegrityError(f"build directory '{build.path}': manifest.json meta is not a sparseforge "
                                  f"compile's ({type(exc).__name__}: {exc}); rebuild it with "
                                  f"'sparseforge compile ... --out {build.path}'") from exc
    attn = CompiledAttention(path_of(pattern).build(pattern, problem.on_key_grid(), config), backend, config,
                             build=build, problem=problem if problem.is_cross else None)
    recorded = meta.get("versions", {})
    for kind, rel in SOURCES.items():
        if attn.source(kind) != build.read_text(rel):
            raise BuildIntegrityError(
                f"build directory '{build.path}': {rel} differs from what this installation generates "
                f"(build made with {recorded}, this is {versions()}); rebuild it with "
                f"'sparseforge compile ... --out {build.path}'")
    if attn.name != name:
        raise BuildIntegrityError(f"build directory '{build.path}': recorded op name {name!r} but the schedule "
                                  f"rebuilt here is {attn.name!r}; rebuild it")
    return attn
