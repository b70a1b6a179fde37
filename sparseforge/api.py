"""``sparseforge.compile`` and ``sparseforge.load``: a pattern (or a build directory) turned
into a callable attention.

    attn = sf.compile(Neighborhood(7, dilation=2), Problem(grid=(56, 56), heads=8, head_dim=64))
    grouped = sf.compile(Grouped(), Problem(grid=N, heads=H, head_dim=D))   # attn(q, k, v, groups=ids)
    lin = sf.compile(Scattered(window_size=(12, 12, 1)), problem, attention="linear",  # ScatterFormer
                     feature_map="elu+1", neighbor_pooling=True)
    attn = sf.load("build/na2d")                                              # sparseforge compile --out
    dec = sf.compile(Causal(), Problem(grid=1, kv_grid=4096, heads=H, head_dim=D))   # decode: dec(q, k, v)
    swin = sf.compile(Blocks(7, offset=3), problem, modifiers=(RelativePositionBias(table),), head_scale=True)

Static, routed and scattered patterns give a ``runtime.compiled.CompiledAttention``;
``Grouped`` a ``runtime.grouped.GroupedAttention`` (on the same segment kernels);
``attention="linear"`` a ``runtime.linear_attention.ScatteredLinearAttention``. Other
content-dependent patterns raise ``UnsupportedPatternError``.
"""
from __future__ import annotations

from .autotune import tune
from .codegen.config import KernelConfig
from .dsl.args import positive_int
from .dsl.content import Grouped, Routed, Scattered
from .dsl.pattern import Pattern
from .dsl.problem import Problem
from .dsl.semantics import check_cross, check_cross_extras, check_pattern_problem
from .lower.paths import path_of
from .runtime.build import load
from .runtime.check import check_numerics
from .runtime.compiled import CompiledAttention, UnsupportedPatternError
from .runtime.grouped import GroupedAttention, GroupedStaticAttention, split_grouped
from .runtime.inputs import check_backend, check_compile_modifiers, check_kernel_options
from .runtime.linear_attention import ScatteredLinearAttention, check_linear_backend
from .runtime.ops import CrossGridsNotImplementedError, decodes, refuse_cross_on

__all__ = ["ATTENTIONS", "compile", "load", "verify_config"]

#: Values of ``compile(..., attention=)``.
ATTENTIONS = ("softmax", "linear")


def verify_config(pattern: Pattern, problem: Problem, config: KernelConfig, device) -> bool:
    """The autotuner's numerics check of a measured config: its kernels against the float64
    reference on ``device`` (``runtime.check``)."""
    return check_numerics(compile(pattern, problem, backend="triton", config=config), device=device).passed


def compile(pattern: Pattern, problem: Problem, *, backend: str | None = None, q_tile=None, k_tile=None,
            config: KernelConfig | None = None, autotune: bool = False, target=None, attention: str = "softmax",
            feature_map: str | None = None, neighbor_pooling: bool | None = None, modifiers=(),
            head_scale: bool = False, batch: int = 1) -> "CompiledAttention | ScatteredLinearAttention | GroupedAttention":
    """Lower ``pattern`` on ``problem`` to a tile schedule and wrap it as calls of the
    ``sparseforge::attention`` ops.

    backend:  None (CUDA tensors -> generated Triton kernels, CPU tensors -> the CPU
              executor), "triton", "cpu" or "interpret" (Triton kernels under the Triton
              interpreter, on CPU tensors).
    q_tile, k_tile: tile shapes (one extent per grid dimension); default chosen per grid.
    config:   a full ``KernelConfig`` (tiles, loop bounds, launches) instead of q_tile/k_tile.
    autotune: take the config from the tuning database, tuning first if it has none
              (``sparseforge.autotune.tune``: timed on a GPU of the target, predicted by the
              cost model otherwise); ``target`` ("sm_80", "sm_90", ...) and ``batch`` (the batch
              size to tune for: its bucket keys the database) as in ``tune``.
    attention: "softmax" (default) or "linear": ScatterFormer's scattered linear attention,
              ``Scattered`` patterns only, returning a ``ScatteredLinearAttention`` (Triton
              kernels on CUDA, torch ops on CPU); ``feature_map`` ("relu" default, or
              "elu+1") and ``neighbor_pooling`` (bool, default False) apply to it only.
    modifiers: score modifiers (``RelativePositionBias``, ``T5Bias``, ``ALiBi``, ``Softcap``,
              ``Sinks``; ``dsl.modifiers``) the calls will pass: only their structure (kinds in
              order, tensor shapes and dtypes, softcap) is compiled in (``modifier_spec``); each
              call passes ``modifiers=`` with its own tensors (e.g. nn.Parameters), which get
              gradients. Static, routed and Scattered patterns (bias terms need a grid).
    head_scale: calls pass ``scale=`` as a [heads] tensor (one scale per query head, e.g.
              Swin V2's logit scale), which gets a gradient.
    Without modifiers and head_scale the compile is exactly what it was (same kernel key).

    A problem with a ``kv_grid`` (keys on a grid of their own: cross attention, decode, pooled
    keys, strided queries; ``dsl.problem.placement``) compiles for the CPU executor: its calls
    take k/v of Nk tokens; the Triton backends and autotuning refuse it
    (``CrossGridsNotImplementedError``, a NotImplementedError). The schedule (and kernel key)
    is the key grid's, which calls whose keys share the queries' grid run.
    """
    check_pattern_problem(pattern, problem)
    check_backend(backend)
    if problem.is_cross:
        _check_cross_compile(pattern, problem, backend=backend, modifiers=modifiers, autotune=autotune,
                             target=target)
    mods = check_compile_modifiers(modifiers, head_scale, pattern, problem)
    if (mods is not None or head_scale) and attention == "linear":
        raise ValueError("modifiers/head_scale are not supported for attention='linear' (give modifiers=() and "
                         "head_scale=False); softmax attention takes them")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {list(ATTENTIONS)}, got {attention!r}")
    if attention == "linear" or feature_map is not None or neighbor_pooling is not None:
        if not isinstance(pattern, Scattered):
            given = "attention='linear'" if attention == "linear" else \
                ("feature_map" if feature_map is not None else "neighbor_pooling")
            raise ValueError(f"{given} is only for Scattered patterns (scattered linear attention), "
                             f"got {pattern!r}")
        if attention != "linear":
            given = "feature_map" if feature_map is not None else "neighbor_pooling"
            raise ValueError(f"{given} is only for attention='linear', got attention={attention!r}")
        return _compile_linear(pattern, problem, backend=backend, q_tile=q_tile, k_tile=k_tile, config=config,
                               autotune=autotune, target=target, feature_map=feature_map,
                               neighbor_pooling=neighbor_pooling)
    if isinstance(pattern, Grouped):
        return _compile_grouped(pattern, problem, backend=backend, q_tile=q_tile, k_tile=k_tile, config=config,
                                autotune=autotune, target=target, modifiers=mods, head_scale=head_scale)
    if split_grouped(pattern) is not None:   # Grouped & static: the static kernels, group ids as call data
        if autotune or target is not None:
            raise UnsupportedPatternError(f"autotune=True is not supported for {pattern!r} yet; give q_tile/k_tile")
        check_kernel_options(problem, backend, config, q_tile, k_tile)
        return GroupedStaticAttention(pattern, problem, backend=backend, q_tile=q_tile, k_tile=k_tile, config=config,
                                      modifiers=mods, head_scale=head_scale)
    scattered = isinstance(pattern, Scattered)
    if not pattern.is_static and not isinstance(pattern, Routed) and not scattered:
        raise UnsupportedPatternError(
            f"{pattern!r} depends on run-time content ({', '.join(sorted(pattern.inputs_needed()))}); "
            "of the content-dependent patterns only a Routed or a Scattered pattern on its own compiles so far "
            "(and a Grouped one) — "
            "use sparseforge.reference_attention for the others meanwhile")
    if scattered:
        _check_voxel_problem(pattern, problem)
    if problem.grid is None and not scattered:
        raise ValueError(f"problem has no grid ({problem!r}); compiling a static pattern needs Problem(grid=...)")
    check_kernel_options(problem, backend, config, q_tile, k_tile)
    if autotune and (config is not None or q_tile is not None or k_tile is not None):
        raise ValueError("autotune=True chooses the tiles and launches; do not also give config, q_tile or k_tile")
    if target is not None and not autotune:
        raise ValueError("target is the autotuner's target; it needs autotune=True")
    if batch != 1 and not autotune:
        raise ValueError(f"batch={batch!r} is the batch size the autotuner tunes for; it needs autotune=True")
    if scattered and autotune:
        raise UnsupportedPatternError(f"autotune=True is not supported for {pattern!r}: its tile tables depend on "
                                      "the voxel coordinates, known only at call time; give q_tile/k_tile or a "
                                      "config")
    tuning = None
    if autotune:
        tuning = tune(pattern, problem, batch=positive_int("batch", batch), target=target, verify=verify_config)
        config = tuning.config
    elif config is None:
        config = KernelConfig(q_tile=q_tile, k_tile=k_tile)
    schedule = path_of(pattern).build(pattern, problem.on_key_grid(), config)
    return CompiledAttention(schedule, backend, config, tuning=tuning, modifiers=mods, head_scale=head_scale,
                             problem=problem if problem.is_cross else None)


def _check_cross_compile(pattern, problem: Problem, *, backend, modifiers, autotune, target) -> None:
    """What a problem with a ``kv_grid`` compiles: the CPU executor, or on the Triton backends a
    1-D decode the decode kernel runs (``runtime.ops.decodes``); no tuning; patterns its two grids
    define (``check_cross``), modifiers the grids define."""
    if backend in ("triton", "interpret") and not decodes(pattern, problem, path_of(pattern).name):
        refuse_cross_on(backend, f"compile({pattern!r}, {problem!r})")
    if autotune or target is not None:
        raise CrossGridsNotImplementedError(
            f"autotune=True with {problem!r}: tuning times the generated Triton kernels, which do not take kv_grid "
            "(keys on a grid of their own) yet; compile without autotune (the CPU executor runs it)")
    check_cross_extras(problem, modifiers)
    check_cross(pattern, problem)


def _check_voxel_problem(pattern, problem: Problem) -> None:
    if problem.grid is not None:
        raise ValueError(f"{pattern!r} takes its voxels from coords at call time: give Problem(grid=None), "
                         f"got grid={problem.grid}")


def _compile_grouped(pattern, problem: Problem, *, backend, q_tile, k_tile, config, autotune, target, modifiers=None,
                     head_scale=False):
    """``compile(Grouped(...), problem)``: checks, then a ``GroupedAttention``."""
    if problem.grid is None:
        raise ValueError(f"{pattern!r} needs the number of tokens: give Problem(grid=N), got {problem!r}")
    if autotune or target is not None:
        raise UnsupportedPatternError(f"autotune=True is not supported for {pattern!r}: its tile tables depend on "
                                      "the group ids, known only at call time; give q_tile/k_tile or a config")
    check_kernel_options(problem, backend, config, q_tile, k_tile)
    return GroupedAttention(pattern, problem, backend=backend, q_tile=q_tile, k_tile=k_tile, config=config,
                            modifiers=modifiers, head_scale=head_scale)


def _compile_linear(pattern, problem: Problem, *, backend, q_tile, k_tile, config, autotune, target, feature_map,
                    neighbor_pooling):
    """``compile(..., attention="linear")``: checks, then a ``ScatteredLinearAttention``."""
    _check_voxel_problem(pattern, problem)
    check_linear_backend(problem, backend)  # None/"cpu": torch ops on CPU; "triton"/"interpret": kernels
    for name, value in (("q_tile", q_tile), ("k_tile", k_tile), ("config", config), ("target", target)):
        if value is not None:
            raise ValueError(f"{name} is not used by attention='linear' (its kernels take no tile config); "
                             "leave it None")
    if autotune:
        raise ValueError("autotune=True is not available for attention='linear' (its kernels have fixed "
                         "launches per head dim)")
    return ScatteredLinearAttention(pattern, problem, backend=backend,
                                    feature_map="relu" if feature_map is None else feature_map,
                                    neighbor_pooling=False if neighbor_pooling is None else neighbor_pooling)
