"""Autotuning: pick a ``KernelConfig`` for a pattern on a problem and a batch size, and remember it.

1. Candidates (``space``): for the forward and dQ kernels, tile shapes (``tile_choices``) x
   loop bounds (``CLOSED_FORM``: closed form and tables, where the pattern has closed-form
   bounds) x launch parameters (``LAUNCHES``); for the dK/dV kernel of a static pattern, its
   own tiles (``dkdv_tile_choices``: keys stationary, query tiles streamed) x launches. Routed
   attention runs every kernel on one tiling (its tiles are cut from the padded region,
   ``routed_tile_choices``), so its dK/dV kernel is a candidate of each tiling.
2. Static pruning, no GPU needed: every candidate kernel is compiled ahead of time for the
   target; those that spill registers, whose wgmma ptxas serializes (C7510-C7515), or that
   need more shared memory than one program may have are dropped (with the reason kept).
3. Ranking: on a GPU of the target's generation, survivors are timed with
   ``triton.testing.do_bench`` on random inputs of the batch bucket's size and the winner's
   numerics are checked against the float64 reference before it is accepted. Without one,
   survivors are ranked by the SASS-driven cost model (``cost``: predicted µs for the batch
   bucket) and the choice is reported as predicted, not measured.
4. The winner goes to the tuning database (``db.TuningDB``), keyed with the batch bucket
   (``db.batch_bucket``); the next ``tune`` of the same key returns it without compiling.

The kernels' choices are independent given the tiles they walk, so the search is per kernel:
the best launch per (tiles, bounds) for forward and dQ, the best launch per dK/dV tiling, and
the config is the best combination under the objective.

Routed attention (``dsl.content.Routed``): its tables come per call from the routes, so the
cost model (and GPU timing) use the tables of balanced routes (``lower.routed.balanced_routes``:
every region routed to topk times). The number of visited tiles does not depend on the routes;
their balance over key tiles (the dK/dV kernel) does, and balanced is the representative case.
Scattered and Grouped patterns are not tuned: their tables depend on the voxel (token)
distribution, known only at call time.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable

import torch

from ..backends.aot import ResourceReport, parse_target
from ..backends.triton import TritonKernels
from ..codegen.config import KERNELS, KernelConfig, Launch
from ..dsl.content import Routed
from ..dsl.pattern import Pattern
from ..dsl.problem import DTYPE_NAMES, Problem
from ..lower.paths import ROUTED
from ..lower.routed import balanced_routes, build_routed_schedule, with_tables
from ..lower.schedule import TileSchedule, build_schedule
from ..lower.tiling import TileGeometry
from . import cost, space
from .db import TuningDB, TuningKey, TuningRecord, batch_bucket

#: Default objective: the kernels whose times are summed to rank configs.
OBJECTIVES = {"train": KERNELS, "inference": ("fwd",)}
#: The kernels that walk the forward tiling (and its loop bounds).
FORWARD_KERNELS = ("fwd", "bwd_dq")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One kernel under one tiling, loop-bound choice and launch: its resources and its score.

    q_tile / k_tile: the tiles the kernel walks (the dK/dV tiles for a ``bwd_dkdv`` candidate
    of a static pattern). closed_form: the forward/dQ loop bounds (None for a dK/dV kernel,
    which always walks its inverse tables). predicted_us: the cost model's predicted time for
    the batch bucket (inf if pruned before or unable to launch); prediction: its breakdown.
    """

    q_tile: tuple[int, ...]
    k_tile: tuple[int, ...]
    kernel: str
    launch: Launch
    report: ResourceReport | None
    rejected: str | None          # why pruned (None: a survivor)
    predicted_us: float
    measured_ms: float | None = None
    closed_form: bool | None = None
    prediction: cost.Prediction | None = None

    def as_dict(self) -> dict:
        return dict(q_tile=list(self.q_tile), k_tile=list(self.k_tile), kernel=self.kernel,
                    closed_form=self.closed_form, num_warps=self.launch.num_warps,
                    num_stages=self.launch.num_stages,
                    resources=self.report.as_dict() if self.report else None, rejected=self.rejected,
                    predicted_us=None if math.isinf(self.predicted_us) else self.predicted_us,
                    prediction=self.prediction.as_dict() if self.prediction else None,
                    measured_ms=self.measured_ms)


@dataclasses.dataclass(frozen=True)
class TuningResult:
    """The chosen config and how it was chosen.

    measured: True if timed on a GPU (metric in ms), False if predicted by the cost model
              (metric in predicted µs).
    cached:   True if it came from the tuning database without any compiling.
    batch:    the batch bucket it was tuned for (``db.batch_bucket`` of the batch asked for).
    """

    config: KernelConfig
    target: str
    device_name: str
    measured: bool
    metric: float
    cached: bool
    candidates: tuple[Candidate, ...] = ()
    seconds: float = 0.0
    batch: int = 1

    @property
    def basis(self) -> str:
        return "measured" if self.measured else "predicted by the cost model (no GPU timing)"

    def as_dict(self) -> dict:
        return dict(config=self.config.as_dict(), target=self.target, device_name=self.device_name,
                    measured=self.measured, metric=self.metric, metric_unit="ms" if self.measured else "predicted us",
                    basis=self.basis, batch_bucket=self.batch, cached=self.cached, seconds=self.seconds,
                    candidates=[c.as_dict() for c in self.candidates])


class TuningError(RuntimeError):
    """No candidate config survived (every one spilled, serialized, overflowed or failed numerics)."""


def _device_for(target: int) -> torch.device | None:
    """A CUDA device of compute capability ``target`` if this process has one."""
    if not torch.cuda.is_available():
        return None
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        if major * 10 + minor == target:
            return torch.device("cuda", i)
    return None


def resolve_target(target) -> int:
    """``target`` as a compute capability; None means this machine's GPU, else sm_90."""
    if target is not None:
        return parse_target(target)
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return major * 10 + minor
    return 90


def tuning_key(pattern: Pattern, problem: Problem, target: int, device_name: str, batch: int = 1) -> TuningKey:
    """The database key of ``pattern`` on ``problem`` at ``batch`` (keyed by its bucket)."""
    return TuningKey.current(pattern.fingerprint(), repr(problem), DTYPE_NAMES[problem.dtype], device_name,
                             f"sm_{target}", batch=batch)


@dataclasses.dataclass
class _Best:
    """The best surviving launch of each kernel on one tiling (score: ms or predicted µs)."""

    q_tile: tuple[int, ...]
    k_tile: tuple[int, ...]
    closed_form: bool | None
    schedule: TileSchedule
    launches: dict = dataclasses.field(default_factory=dict)   # kernel -> (score, Launch)

    def offer(self, cand: Candidate, score: float) -> None:
        if cand.rejected is None and (cand.kernel not in self.launches or score < self.launches[cand.kernel][0]):
            self.launches[cand.kernel] = (score, cand.launch)


def tune(pattern: Pattern, problem: Problem, *, batch: int = 1, target=None, db: TuningDB | None = None,
         measure: bool | None = None, objective: str = "train", tiles=None, dkdv_tiles=None, closed_form=None,
         launches=None, force: bool = False, progress: Callable[[str], None] | None = None,
         verify: Callable[[Pattern, Problem, KernelConfig, object], bool] | None = None) -> TuningResult:
    """Choose a KernelConfig for ``pattern`` on ``problem`` (see module docstring).

    batch:     the batch size the config is for; tuned (and keyed) by its bucket
               (``db.batch_bucket``: the next power of two, at most 64), which sets the number
               of programs (tiles x heads x batch) the cost model spreads over the SMs.
    target:    "sm_80" | "sm_90" | "sm_100" | ...; None: this machine's GPU, else sm_90.
    db:        the tuning database (default: ``TuningDB()`` under the cache directory).
    measure:   time on the GPU (default: when one of the target's generation is present).
    objective: "train" (forward + both backward kernels) or "inference" (forward only).
    tiles, dkdv_tiles, closed_form, launches: override ``space``'s candidates: (q_tile,
               k_tile) pairs; (dkdv_q_tile, dkdv_k_tile) pairs of a static pattern (an empty
               list: the dK/dV kernel runs on the forward's tiles); loop-bound choices
               (bools); ``Launch`` values.
    force:     tune again even if the database has an entry.
    progress:  called as ``progress(text, done, total)`` per candidate compiled (the CLI
               draws a progress bar on stderr).
    verify:    ``verify(pattern, problem, config, device) -> bool``, the numerics check a
               measured config must pass before it is stored (``sparseforge.api.verify_config``
               against the float64 reference); required when measuring, unused by the cost model.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
    bucket = batch_bucket(batch)
    t0 = time.perf_counter()
    cap = resolve_target(target)
    device = _device_for(cap)
    if measure is None:
        measure = device is not None
    elif measure and device is None:
        raise ValueError(f"measure=True needs a CUDA device of compute capability {cap} (target sm_{cap}); "
                         "this machine has none")
    if measure and verify is None:
        raise ValueError("measure=True needs verify= (the numerics check of a measured config, e.g. "
                         "sparseforge.api.verify_config)")
    device_name = torch.cuda.get_device_name(device) if measure else f"cost-model sm_{cap}"
    db = TuningDB() if db is None else db
    key = tuning_key(pattern, problem, cap, device_name, batch=bucket)
    if not force:
        hit = db.get(key, check=lambda record: check_record(record, pattern, problem))
        if hit is not None:
            return TuningResult(KernelConfig.from_dict(hit.config), f"sm_{cap}", device_name, hit.measured,
                                hit.metric, cached=True, seconds=time.perf_counter() - t0, batch=bucket)
    say = progress or (lambda _text, _done=None, _total=None: None)
    spec = cost.TARGETS.get(cap, cost.TARGETS[90])
    ranked = OBJECTIVES[objective]
    launches = tuple(space.LAUNCHES if launches is None else launches)
    bounds = tuple(space.CLOSED_FORM if closed_form is None else closed_form)
    if not bounds or any(not isinstance(b, bool) for b in bounds):
        raise ValueError(f"closed_form must be a non-empty sequence of bools, got {closed_form!r}")
    routed = isinstance(pattern, Routed)
    if tiles is None:
        tiles = space.routed_tile_choices(pattern, problem) if routed else space.tile_choices(problem)
    tiles = list(tiles)
    if routed:
        if dkdv_tiles:
            raise ValueError("dkdv_tiles: routed attention runs every kernel on one tiling (leave dkdv_tiles unset)")
        dkdv_tiles = []
    dkdv_tiles = list(space.dkdv_tile_choices(problem) if dkdv_tiles is None else dkdv_tiles) if tiles else []
    shared = not dkdv_tiles  # the dK/dV kernel walks each forward tiling
    on_forward = KERNELS if shared else FORWARD_KERNELS
    total = len(tiles) * len(set(bounds)) * len(on_forward) * len(launches) + len(dkdv_tiles) * len(launches)
    candidates: list[Candidate] = []

    def run(kernels: TritonKernels, kernel: str, launch: Launch, closed: bool | None) -> Candidate:
        schedule = kernels.schedule_of(kernel)
        say(f"q{schedule.geometry.q_tile} k{schedule.geometry.k_tile} {kernel} "
            f"{'' if closed is None else ('closed-form ' if closed else 'tables ')}{launch.tag()} sm_{cap}",
            len(candidates), total)
        cand = _static_candidate(kernels, kernel, cap, spec, bucket, closed)
        if cand.rejected is None and measure:
            cand = dataclasses.replace(cand, measured_ms=_time_kernel(kernels, kernel, device, bucket))
        candidates.append(cand)
        return cand

    def score(cand: Candidate) -> float:
        return cand.measured_ms if measure else cand.predicted_us

    forward: list[_Best] = []
    for q_tile, k_tile in tiles:
        no_closed_form = False
        for closed in sorted(set(bounds), reverse=True):  # closed form first
            if not closed and no_closed_form:
                continue  # the pattern has no closed form here: tables were tried as closed_form=True
            schedule = candidate_schedule(pattern, problem, q_tile, k_tile, closed_form=closed)
            no_closed_form = closed and schedule.bounds is None
            best = _Best(q_tile, k_tile, closed, schedule)
            for launch in launches:
                config = KernelConfig(q_tile, k_tile, closed, dkdv_q_tile=q_tile, dkdv_k_tile=k_tile,
                                      **{k: launch for k in KERNELS})
                kernels = TritonKernels(schedule, config=config)
                for kernel in on_forward:
                    best.offer(cand := run(kernels, kernel, launch, None if kernel == "bwd_dkdv" else closed),
                               score(cand))
            if len(best.launches) == len(on_forward):
                forward.append(best)
    backward: list[_Best] = []
    for q_tile, k_tile in dkdv_tiles:
        schedule = build_schedule(pattern, problem, q_tile=q_tile, k_tile=k_tile, closed_form=False)
        best = _Best(q_tile, k_tile, None, schedule)
        for launch in launches:
            config = KernelConfig(q_tile, k_tile, False, dkdv_q_tile=q_tile, dkdv_k_tile=k_tile,
                                  **{k: launch for k in KERNELS})
            best.offer(cand := run(TritonKernels(schedule, config=config), "bwd_dkdv", launch, None), score(cand))
        if best.launches:
            backward.append(best)

    choices = []  # (objective score, score of every kernel, config, kernel name)
    for fwd, dkdv in itertools.product(forward, backward or [None]):
        scores = dict(fwd.launches)
        if dkdv is not None:
            scores["bwd_dkdv"] = dkdv.launches["bwd_dkdv"]
        tiles_kv = (fwd.q_tile, fwd.k_tile) if dkdv is None else (dkdv.q_tile, dkdv.k_tile)
        config = KernelConfig(fwd.q_tile, fwd.k_tile, fwd.closed_form, dkdv_q_tile=tiles_kv[0], dkdv_k_tile=tiles_kv[1],
                              **{k: scores[k][1] for k in KERNELS})
        choices.append((sum(scores[k][0] for k in ranked), sum(s for s, _ in scores.values()), config,
                        fwd.schedule.name))
    if not shared and not backward:
        choices = []
    for metric, _, config, name in sorted(choices, key=lambda c: c[:2]):
        if measure and not verify(pattern, problem, config, device):
            say(f"rejected {config.describe()}: numerics outside tolerance")
            continue
        db.put(key, TuningRecord(config=config.as_dict(), measured=measure, metric=metric, kernel_name=name,
                                 notes=f"objective={objective}; batch bucket {bucket}"
                                       + ("" if measure else "; metric: predicted us")))
        return TuningResult(config, f"sm_{cap}", device_name, measure, metric, cached=False,
                            candidates=tuple(candidates), seconds=time.perf_counter() - t0, batch=bucket)
    reasons = sorted({c.rejected for c in candidates if c.rejected})
    raise TuningError(f"no config for {pattern!r} on {problem!r} survived on sm_{cap}: {'; '.join(reasons[:5])}")


def check_record(record: TuningRecord, pattern: Pattern, problem: Problem) -> None:
    """Raise ValueError/TypeError unless ``record`` holds a config ``tune`` could have stored
    for ``pattern`` on ``problem``: every tile and launch set, tiles valid for the grid (and,
    routed, for the padded region, with one tiling for every kernel). The database drops a
    record this refuses. Records written before the dK/dV kernel had its own tiles (none
    set) are valid: they run on the default dK/dV tiles."""
    config = KernelConfig.from_dict(record.config)
    if config.q_tile is None or config.k_tile is None or any(config.launch(k) is None for k in KERNELS):
        raise ValueError(f"config {record.config} leaves a tile or a launch unset")
    if (config.dkdv_q_tile is None) != (config.dkdv_k_tile is None):
        raise ValueError(f"config {record.config} sets one of dkdv_q_tile/dkdv_k_tile but not the other")
    if isinstance(pattern, Routed):
        if config.dkdv_q_tile is not None and not config.shared_tiling:
            raise ValueError(f"config {record.config}: routed attention runs every kernel on one tiling, but its "
                             "dK/dV tiles differ")
        build_routed_schedule(pattern, problem, q_tile=config.q_tile, k_tile=config.k_tile)  # cheap: no tables
    else:
        TileGeometry.make(problem.grid, config.q_tile, config.k_tile)
        if config.dkdv_q_tile is not None:
            TileGeometry.make(problem.grid, config.dkdv_q_tile, config.dkdv_k_tile)


def candidate_schedule(pattern: Pattern, problem: Problem, q_tile, k_tile, closed_form: bool = True) -> TileSchedule:
    """The schedule a candidate's tiles give (the one its forward and dQ kernels are compiled
    from; routed schedules have no closed form)."""
    if isinstance(pattern, Routed):
        return build_routed_schedule(pattern, problem, q_tile=q_tile, k_tile=k_tile)
    return build_schedule(pattern, problem, q_tile=q_tile, k_tile=k_tile, closed_form=closed_form)


def representative(schedule: TileSchedule) -> TileSchedule:
    """What the cost model reads: the schedule itself, or for routed attention the schedule
    with the tables of balanced routes (its own tables come per call)."""
    if schedule.routed is None:
        return schedule
    return with_tables(schedule, balanced_routes(schedule))


def prune_reason(report: ResourceReport, spec: cost.TargetSpec) -> str | None:
    """Why a compiled kernel is not a candidate (None: it is): spills, serialized wgmma, or
    more shared memory than one program may have."""
    if report.spills:
        return f"spills {report.spills} B of registers"
    if report.serialized:
        return f"ptxas serializes its wgmma ({report.serialized[0]})"
    if report.shared_bytes > spec.shared_per_block:
        return f"needs {report.shared_bytes} B of shared memory, more than {spec.shared_per_block}"
    return None


def _static_candidate(kernels: TritonKernels, kernel: str, cap: int, spec: cost.TargetSpec, batch: int,
                      closed_form: bool | None) -> Candidate:
    """AOT-compile ``kernel`` of ``kernels``; prune it, and predict its time on ``batch``
    batch elements from the schedule it walks (``representative`` of it)."""
    schedule = kernels.schedule_of(kernel)
    geom = schedule.geometry
    launch = kernels.config.launch(kernel)
    try:
        report = kernels.aot(kernel, f"sm_{cap}")
    except Exception as exc:  # noqa: BLE001 - a candidate the compiler refuses is pruned, with the reason
        reason = f"does not compile: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        return Candidate(geom.q_tile, geom.k_tile, kernel, launch, None, reason, math.inf, closed_form=closed_form)
    rejected = prune_reason(report, spec)
    prediction = None
    if cost.occupancy(report, spec) == 0:
        rejected = rejected or "cannot be resident on an SM"
    else:
        costed = representative(schedule)
        prediction = cost.predict(cost.features(report, kernel, costed), cost.workload(costed, kernel), spec, batch)
    predicted = math.inf if prediction is None else prediction.predicted_us
    return Candidate(geom.q_tile, geom.k_tile, kernel, launch, report, rejected, predicted,
                     closed_form=closed_form, prediction=prediction)


def _inputs(problem: Problem, device, seed: int = 0, batch: int = 1):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n, d = problem.tokens, problem.head_dim

    def rand(heads):
        return torch.randn((batch, heads, n, d), generator=gen).to(device=device, dtype=problem.dtype)
    return rand(problem.heads), rand(problem.kv_heads), rand(problem.kv_heads), rand(problem.heads)


def _time_kernel(kernels: TritonKernels, kernel: str, device, batch: int) -> float:  # pragma: no cover - needs a GPU
    """Median ms of one kernel of ``kernels`` on random inputs of ``batch`` batch elements
    (``do_bench`` flushes L2 between runs)."""
    import triton.testing

    schedule = kernels.schedule
    q, k, v, dout = _inputs(schedule.problem, device, batch=batch)
    scale = schedule.problem.head_dim ** -0.5
    path = kernels.path
    routes = [balanced_routes(schedule).to(device)] if path is ROUTED else []  # the tables of balanced routes
    tables = path.kernel_tables(schedule, routes, device)
    out, lse = kernels.forward(q, k, v, scale, tables=tables)
    _, delta = kernels.backward_dq(q, k, v, out, dout, lse, scale, tables=tables)
    dkdv_tables = tables if kernels.dkdv_schedule is schedule else \
        path.kernel_tables(kernels.dkdv_schedule, routes, device)
    run = {"fwd": lambda: kernels.forward(q, k, v, scale, tables=tables),
           "bwd_dq": lambda: kernels.backward_dq(q, k, v, out, dout, lse, scale, tables=tables),
           "bwd_dkdv": lambda: kernels.backward_dkdv(q, k, v, dout, lse, delta, scale, tables=dkdv_tables)}[kernel]
    return float(triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median"))
