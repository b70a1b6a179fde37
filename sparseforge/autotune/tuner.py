"""Autotuning: pick a ``KernelConfig`` for a pattern on a problem, and remember it.

1. Candidates: tile shapes (``space.tile_choices``) x launch parameters per kernel
   (``space.LAUNCHES``).
2. Static pruning, no GPU needed: every candidate kernel is compiled ahead of time for the
   target; those that spill registers, or need more shared memory than one program may
   have, are dropped (with the reason kept for the report).
3. Ranking: on a GPU of the target's generation, survivors are timed with
   ``triton.testing.do_bench`` on random inputs and the winner's numerics are checked
   against the float64 reference before it is accepted. Without one, survivors are ranked
   by ``cost.predict_us`` and the choice is reported as predicted, not measured.
4. The winner goes to the tuning database (``db.TuningDB``); the next ``tune`` of the same
   key returns it without compiling anything.

Routed attention (``dsl.content.Routed``) is tuned too: its tiles are cut from the padded
region (``space.routed_tile_choices``) and its tables come per call from the routes, so the
cost model (and GPU timing) use the tables of balanced routes (``lower.routed.balanced_routes``:
every region routed to topk times). The number of visited tiles does not depend on the routes;
their balance over key tiles (the dK/dV kernel) does, and balanced is the representative case.
Scattered and Grouped patterns are not tuned: their tables depend on the voxel (token)
distribution, known only at call time.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import torch

from ..backends.aot import ResourceReport, parse_target
from ..backends.triton import TritonKernels, rowsum_product
from ..codegen.config import KERNELS, KernelConfig, Launch
from ..dsl.content import Routed
from ..dsl.pattern import Pattern
from ..dsl.problem import DTYPE_NAMES, Problem
from ..lower.paths import ROUTED, path_of
from ..lower.routed import balanced_routes, build_routed_schedule, with_tables
from ..lower.schedule import TileSchedule, build_schedule
from ..lower.tiling import TileGeometry
from . import cost, space
from .db import TuningDB, TuningKey, TuningRecord

#: Default objective: the kernels whose times are summed to rank tile choices.
OBJECTIVES = {"train": KERNELS, "inference": ("fwd",)}


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One kernel under one tile choice and launch: its resources and its score."""

    q_tile: tuple[int, ...]
    k_tile: tuple[int, ...]
    kernel: str
    launch: Launch
    report: ResourceReport | None
    rejected: str | None          # why pruned (None: a survivor)
    predicted_us: float
    measured_ms: float | None = None

    def as_dict(self) -> dict:
        return dict(q_tile=list(self.q_tile), k_tile=list(self.k_tile), kernel=self.kernel,
                    num_warps=self.launch.num_warps, num_stages=self.launch.num_stages,
                    resources=self.report.as_dict() if self.report else None, rejected=self.rejected,
                    predicted_us=None if math.isinf(self.predicted_us) else self.predicted_us,
                    measured_ms=self.measured_ms)


@dataclasses.dataclass(frozen=True)
class TuningResult:
    """The chosen config and how it was chosen.

    measured: True if timed on a GPU (metric in ms), False if predicted by the cost model
              (metric in predicted µs).
    cached:   True if it came from the tuning database without any compiling.
    """

    config: KernelConfig
    target: str
    device_name: str
    measured: bool
    metric: float
    cached: bool
    candidates: tuple[Candidate, ...] = ()
    seconds: float = 0.0

    @property
    def basis(self) -> str:
        return "measured" if self.measured else "predicted by the cost model (no GPU timing)"

    def as_dict(self) -> dict:
        return dict(config=self.config.as_dict(), target=self.target, device_name=self.device_name,
                    measured=self.measured, metric=self.metric, metric_unit="ms" if self.measured else "predicted us",
                    cached=self.cached, seconds=self.seconds, candidates=[c.as_dict() for c in self.candidates])


class TuningError(RuntimeError):
    """No candidate config survived (every one spilled, overflowed or failed numerics)."""


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


def tuning_key(pattern: Pattern, problem: Problem, target: int, device_name: str) -> TuningKey:
    return TuningKey.current(pattern.fingerprint(), repr(problem), DTYPE_NAMES[problem.dtype], device_name,
                             f"sm_{target}")


def tune(pattern: Pattern, problem: Problem, *, target=None, db: TuningDB | None = None, measure: bool | None = None,
         objective: str = "train", tiles=None, launches=None, force: bool = False,
         progress: Callable[[str], None] | None = None,
         verify: Callable[[Pattern, Problem, KernelConfig, object], bool] | None = None) -> TuningResult:
    """Choose a KernelConfig for ``pattern`` on ``problem`` (see module docstring).

    target:    "sm_80" | "sm_90" | "sm_100" | ...; None: this machine's GPU, else sm_90.
    db:        the tuning database (default: ``TuningDB()`` under the cache directory).
    measure:   time on the GPU (default: when one of the target's generation is present).
    objective: "train" (forward + both backward kernels) or "inference" (forward only).
    tiles, launches: override the candidate lists of ``space``.
    force:     tune again even if the database has an entry.
    progress:  called as ``progress(text, done, total)`` per candidate compiled (the CLI
               draws a progress bar on stderr).
    verify:    ``verify(pattern, problem, config, device) -> bool``, the numerics check a
               measured config must pass before it is stored (``sparseforge.api.verify_config``
               against the float64 reference); required when measuring, unused by the cost model.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
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
    key = tuning_key(pattern, problem, cap, device_name)
    if not force:
        hit = db.get(key, check=lambda record: check_record(record, pattern, problem))
        if hit is not None:
            return TuningResult(KernelConfig.from_dict(hit.config), f"sm_{cap}", device_name, hit.measured,
                                hit.metric, cached=True, seconds=time.perf_counter() - t0)
    say = progress or (lambda _text, _done=None, _total=None: None)
    spec = cost.TARGETS.get(cap, cost.TARGETS[90])
    kernels_ranked = OBJECTIVES[objective]
    launches = tuple(space.LAUNCHES if launches is None else launches)
    candidates: list[Candidate] = []
    choices = []  # (total score, config, schedule) per tile choice whose kernels all survive
    if tiles is None:
        tiles = space.routed_tile_choices(pattern, problem) if isinstance(pattern, Routed) else \
            space.tile_choices(problem)
    tiles = list(tiles)
    total = len(tiles) * len(KERNELS) * len(launches)
    for q_tile, k_tile in tiles:
        schedule = candidate_schedule(pattern, problem, q_tile, k_tile)
        costed = representative(schedule)
        chosen: dict[str, tuple[float, Launch]] = {}
        for kernel in KERNELS:
            for launch in launches:
                say(f"q{q_tile} k{k_tile} {kernel} {launch.tag()} sm_{cap}", len(candidates), total)
                cand = _static_candidate(schedule, costed, kernel, launch, cap, spec)
                if cand.rejected is None and measure:
                    cand = dataclasses.replace(cand, measured_ms=_time_kernel(schedule, kernel, launch, device))
                candidates.append(cand)
                if cand.rejected is None:
                    score = cand.measured_ms if measure else cand.predicted_us
                    if kernel not in chosen or score < chosen[kernel][0]:
                        chosen[kernel] = (score, launch)
        if len(chosen) == len(KERNELS):
            config = KernelConfig(q_tile, k_tile, True, **{k: chosen[k][1] for k in KERNELS})
            choices.append((sum(chosen[k][0] for k in kernels_ranked), config, schedule))
    for score, config, schedule in sorted(choices, key=lambda c: c[0]):
        if measure and not verify(pattern, problem, config, device):
            say(f"rejected {config.describe()}: numerics outside tolerance")
            continue
        db.put(key, TuningRecord(config=config.as_dict(), measured=measure, metric=score,
                                 kernel_name=schedule.name, notes=f"objective={objective}"))
        return TuningResult(config, f"sm_{cap}", device_name, measure, score, cached=False,
                            candidates=tuple(candidates), seconds=time.perf_counter() - t0)
    reasons = sorted({c.rejected for c in candidates if c.rejected})
    raise TuningError(f"no config for {pattern!r} on {problem!r} survived on sm_{cap}: {'; '.join(reasons[:5])}")


def check_record(record: TuningRecord, pattern: Pattern, problem: Problem) -> None:
    """Raise ValueError/TypeError unless ``record`` holds a config ``tune`` could have stored
    for ``pattern`` on ``problem``: every tile and launch set, tiles valid for the grid (and,
    routed, for the padded region). The database drops a record this refuses."""
    config = KernelConfig.from_dict(record.config)
    if config.q_tile is None or config.k_tile is None or any(config.launch(k) is None for k in KERNELS):
        raise ValueError(f"config {record.config} leaves a tile or a launch unset")
    if isinstance(pattern, Routed):
        build_routed_schedule(pattern, problem, q_tile=config.q_tile, k_tile=config.k_tile)  # cheap: no tables
    else:
        TileGeometry.make(problem.grid, config.q_tile, config.k_tile)


def candidate_schedule(pattern: Pattern, problem: Problem, q_tile, k_tile) -> TileSchedule:
    """The schedule a candidate's tiles give (the one its kernels are compiled from)."""
    if isinstance(pattern, Routed):
        return build_routed_schedule(pattern, problem, q_tile=q_tile, k_tile=k_tile)
    return build_schedule(pattern, problem, q_tile=q_tile, k_tile=k_tile)


def representative(schedule: TileSchedule) -> TileSchedule:
    """What the cost model reads: the schedule itself, or for routed attention the schedule
    with the tables of balanced routes (its own tables come per call)."""
    if schedule.routed is None:
        return schedule
    return with_tables(schedule, balanced_routes(schedule))


def _static_candidate(schedule, costed, kernel: str, launch: Launch, cap: int, spec: cost.TargetSpec) -> Candidate:
    """AOT-compile ``kernel`` of ``schedule`` under ``launch``; prune, and predict its time
    from ``costed`` (``representative(schedule)``)."""
    geom = schedule.geometry
    config = KernelConfig(geom.q_tile, geom.k_tile, True, **{kernel: launch})
    try:
        report = TritonKernels(schedule, config=config).aot(kernel, f"sm_{cap}")
    except Exception as exc:  # noqa: BLE001 - a candidate the compiler refuses is pruned, with the reason
        reason = f"does not compile: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        return Candidate(geom.q_tile, geom.k_tile, kernel, launch, None, reason, math.inf)
    rejected = None
    if report.spills:
        rejected = f"spills {report.spills} B of registers"
    elif report.serialized:
        rejected = f"ptxas serializes its wgmma ({report.serialized[0]})"
    elif report.shared_bytes > spec.shared_per_block:
        rejected = f"needs {report.shared_bytes} B of shared memory, more than {spec.shared_per_block}"
    predicted = cost.predict_us(costed, kernel, report, spec)
    if rejected is None and math.isinf(predicted):
        rejected = "cannot be resident on an SM"
    return Candidate(geom.q_tile, geom.k_tile, kernel, launch, report, rejected, predicted)


def _inputs(problem: Problem, device, seed: int = 0, batch: int = 1):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n, d = problem.tokens, problem.head_dim

    def rand(heads):
        return torch.randn((batch, heads, n, d), generator=gen).to(device=device, dtype=problem.dtype)
    return rand(problem.heads), rand(problem.kv_heads), rand(problem.kv_heads), rand(problem.heads)


def _time_kernel(schedule, kernel: str, launch: Launch, device) -> float:  # pragma: no cover - needs a GPU
    """Median ms of one kernel on random inputs (``do_bench`` flushes L2 between runs)."""
    import triton.testing

    geom = schedule.geometry
    kernels = TritonKernels(schedule, config=KernelConfig(geom.q_tile, geom.k_tile, True, **{kernel: launch}))
    q, k, v, dout = _inputs(schedule.problem, device)
    scale = schedule.problem.head_dim ** -0.5
    path = path_of(schedule.pattern)
    routes = [balanced_routes(schedule).to(device)] if path is ROUTED else []  # the tables of balanced routes
    tables = path.kernel_tables(schedule, routes, device)
    out, lse = kernels.forward(q, k, v, scale, tables=tables)
    delta = rowsum_product(dout, out)
    run = {"fwd": lambda: kernels.forward(q, k, v, scale, tables=tables),
           "bwd_dq": lambda: kernels.backward_dq(q, k, v, dout, lse, delta, scale, tables=tables),
           "bwd_dkdv": lambda: kernels.backward_dkdv(q, k, v, dout, lse, delta, scale, tables=tables)}[kernel]
    return float(triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median"))
