"""A cost model driven by the SASS of each compiled kernel: predicted time, no GPU needed.

Used where no GPU can time the candidates. It ranks configs; every number it gives is a
prediction (named ``predicted_*``, and shown as predicted wherever it is reported), never a
measurement.

Inputs, per kernel:

- ``KernelFeatures`` (``features(report, kernel, schedule)``, from the ahead-of-time compile):
  SASS instructions per warp in one iteration of the FULL and of the PARTIAL tile loop, their
  wgmma shapes and HMMA counts (``backends.sass``), whether ptxas serialized the wgmma,
  registers, shared memory, warps, stages, tile rows;
- ``Workload`` (``workload(schedule, kernel)``, from the schedule the kernel walks: the
  forward CSR for ``fwd``/``bwd_dq``, the inverse CSR of the dK/dV schedule for
  ``bwd_dkdv``): FULL and PARTIAL iterations of every program of one batch element, and the
  bytes the kernel must move to or from HBM.

Per tile loop L (FULL or PARTIAL), in SM clock cycles per iteration of one program::

    issue_L   = instructions_L * num_warps / ISSUE_PER_CLOCK           SM issue slots (4 schedulers)
    tensor_L  = num_warps/4 * sum over its wgmma of (2*M*N*K / mma_flops_per_clock + WGMMA_FIXED_CYCLES)
              | flops_L / (mma_flops_per_clock * legacy_mma_share)      (HMMA: mma.sync; flops_L from
                                                                       FLOPS_PER_PAIR x tile; at full rate
                                                                       for wgmma a loop unrolled away)
              | 0                                                      (no tensor cores: FMAs are in issue_L)
    memory_L  = bytes_L / l2_bytes_per_clock                           tiles streamed in (K, V; dK/dV: Q, dO,
                                                                       LSE, delta)
    busy_L    = max(issue_L on its own max(num_warps, 4) / 4 schedulers, tensor_L), or their sum when ptxas
                serialized the wgmma
    stall_L   = max(0, mem_latency_cycles - (num_stages - 1) * busy_L) load latency the prefetch leaves
    latency_L = busy_L + stall_L                                       one program's iteration, alone
    cost_L(R) = max(issue_L, tensor_L, memory_L, latency_L / R)        SM time per iteration, R resident

and per kernel, with R programs resident per SM (registers, shared memory, warps, blocks)
and P = programs per batch element x batch::

    R_eff    = min(R, ceil(P / sms));  waves = ceil(P / (sms * R_eff))
    wave     = R_eff * (mean FULL its * cost_F + mean PARTIAL its * cost_P)        the SM's throughput
    longest  = max over programs of (FULL its * latency_F + PARTIAL its * latency_P)  no SM runs one faster
    overhead = PROGRAM_LATENCIES * mem_latency_cycles per wave                      prologue loads, epilogue stores
    cycles   = max(waves * wave, longest, hbm_bytes * batch / hbm_bytes_per_clock) + waves * overhead
    predicted_us = cycles / (clock_ghz * 1e3)

Issue, tensor and memory time overlap (max, roofline style); a program's load latency is hidden
by its own prefetch (``num_stages - 1`` iterations ahead) and by the other resident programs,
so one stage is slower wherever latency is not covered. Tables against closed-form bounds,
wgmma against HMMA, 4 against 8 warps all show up through the SASS figures.
Spilling and serialized candidates are pruned by the tuner before ranking; a spill costs
nothing here.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from ..backends.aot import ResourceReport
from ..backends.sass import Loop, SassReport
from ..codegen.config import KERNELS
from ..codegen.render import block_d
from ..lower.schedule import TileSchedule

__all__ = ["KernelFeatures", "LoopPrediction", "Prediction", "TARGETS", "TargetSpec", "Workload", "features",
           "occupancy", "predict", "predict_us", "tile_loops", "workload"]


# ======================================================================================
# Constants: one place, with their sources
# ======================================================================================
@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """What the cost model knows of one GPU (units in the field comments)."""

    name: str
    sms: int
    clock_ghz: float              # SM clock the peak rates below are quoted at
    mma_flops_per_clock: int      # dense 16-bit tensor-core flops per SM per clock (tf32: half)
    l2_bytes_per_clock: int       # sustained L2 -> SM bytes per SM per clock
    hbm_bytes_per_s: float        # DRAM bandwidth of the whole GPU
    registers_per_sm: int         # 32-bit registers
    shared_per_sm: int            # bytes
    shared_per_block: int         # bytes, the most one program may use
    max_warps_per_sm: int
    max_blocks_per_sm: int
    legacy_mma_share: float       # mma.sync (HMMA) throughput as a share of mma_flops_per_clock
    mem_latency_cycles: int       # latency of a tile load (mostly L2 hits), SM clocks

    @property
    def hbm_bytes_per_clock(self) -> float:
        """DRAM bytes per SM clock, whole GPU."""
        return self.hbm_bytes_per_s / (self.clock_ghz * 1e9)


#: Sources. sm_90: NVIDIA H100 SXM5 datasheet / Hopper whitepaper: 132 SMs; dense BF16/FP16
#: 989.4 TFLOPS = 132 SMs x 4096 flop/clk x 1.83 GHz (the clock used here); HBM3 3.35 TB/s;
#: 64K registers, 228 KB shared memory per SM (227 KB per block), 64 warps and 32 blocks per SM
#: (CUDA programming guide, compute capability 9.0). sm_80: A100 SXM4 80 GB datasheet: 108 SMs,
#: 312 TFLOPS dense FP16 = 108 x 2048 x 1.41 GHz, 2.04 TB/s, 164 KB shared (163 KB per block).
#: sm_86 (A6000: 84 SMs, 154.8 TFLOPS FP16 at 1.8 GHz, 768 GB/s), sm_89 (L40S: 142 SMs,
#: 362 TFLOPS FP16 at 2.52 GHz, 864 GB/s): 100 KB shared (99 KB per block), 48 warps.
#: sm_100 (B200: 148 SMs, 2.25 PFLOPS dense BF16 = 148 x 8192 x 1.85 GHz, HBM3e 8 TB/s).
#: Not on any datasheet, estimates: l2_bytes_per_clock (32 B/clk/SM ~ 7.7 TB/s on an H100;
#: microbenchmarks report 5.5-9 TB/s), mem_latency_cycles (L2 hit ~260 clk, HBM ~500-700 clk:
#: tile loads mostly hit L2), legacy_mma_share (mma.sync reaches about half of the wgmma peak
#: on Hopper; it is the native path on sm_8x).
TARGETS: dict[int, TargetSpec] = {
    80: TargetSpec("sm_80 (A100 SXM4)", 108, 1.41, 2048, 32, 2.039e12, 65536, 167936, 166912, 64, 32, 1.0, 500),
    86: TargetSpec("sm_86 (A6000)", 84, 1.80, 1024, 32, 0.768e12, 65536, 102400, 101376, 48, 16, 1.0, 500),
    89: TargetSpec("sm_89 (L40S)", 142, 2.52, 1024, 32, 0.864e12, 65536, 102400, 101376, 48, 24, 1.0, 500),
    90: TargetSpec("sm_90 (H100 SXM5)", 132, 1.83, 4096, 32, 3.35e12, 65536, 233472, 232448, 64, 32, 0.5, 500),
    100: TargetSpec("sm_100 (B200)", 148, 1.85, 8192, 32, 8.0e12, 65536, 233472, 232448, 64, 32, 0.35, 500),
}

#: Warp instructions an SM issues per clock: 4 schedulers, one each (Hopper/Ampere whitepapers).
ISSUE_PER_CLOCK = 4
#: Fixed cycles of one wgmma on top of its flops at peak (estimate: small N shapes lose, so
#: m64n16 runs at 50% and m64n64 at 80% of peak, as CUTLASS's preference for N >= 64 suggests).
WGMMA_FIXED_CYCLES = 8
#: Registers are allocated per warp in units of 256 (CUDA occupancy calculator, sm_80/sm_90).
REGISTER_UNIT = 256
#: Shared memory the driver reserves per resident block (CUDA programming guide, sm_80+).
SHARED_RESERVED_PER_BLOCK = 1024
#: Dependent memory latencies per program outside the tile loop (load Q rows, store results).
PROGRAM_LATENCIES = 2
#: Matmul flops per (query, key, head-dim) element of an iteration: fwd QK^T + PV; dQ
#: recomputes QK^T, dP = dO V^T, dQ += dS K; dK/dV adds dV += P^T dO and dK += dS^T Q.
FLOPS_PER_PAIR = {"fwd": 4, "bwd_dq": 6, "bwd_dkdv": 8}


# ======================================================================================
# Features of a compiled kernel and the work of a schedule
# ======================================================================================
@dataclasses.dataclass(frozen=True)
class KernelFeatures:
    """What the cost model reads from one compiled kernel.

    full / partial: the SASS tile loop that runs once per FULL / PARTIAL iteration (the same
    ``backends.sass.Loop`` for both when one loop runs every tile; None when that loop does
    not exist because the schedule has no such iterations).
    block_m / block_n: query / key tile rows of the schedule the kernel walks; block_d: the
    padded head dim; element_bytes: 2 (fp16/bf16) or 4 (fp32).
    """

    kernel: str
    num_warps: int
    num_stages: int
    registers: int               # per thread
    shared_bytes: int            # per program
    serialized: bool             # ptxas serialized the wgmma (C7510-C7515)
    tensor_core: str             # "wgmma" | "mma" | "tcgen05" | "none" (the PTX's)
    full: Loop | None
    partial: Loop | None
    block_m: int
    block_n: int
    block_d: int
    element_bytes: int
    spills: int = 0              # bytes (pruned by the tuner; not costed)

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {list(KERNELS)}, got {self.kernel!r}")

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("full", "partial")}
        for role in ("full", "partial"):
            lp = getattr(self, role)
            d[role] = None if lp is None else dict(instructions=lp.instructions, wgmma=list(lp.wgmma), hmma=lp.hmma,
                                                   waits=lp.waits)
        return d


@dataclasses.dataclass(frozen=True, eq=False)
class Workload:
    """The work of one kernel on one batch element.

    full, partial: int64 [programs]: FULL / PARTIAL iterations of each program (a query-tile
    row per query head for fwd/bwd_dq; a key-tile row per key/value head for bwd_dkdv, summed
    over the query heads it serves). hbm_bytes: bytes the kernel reads and writes at least
    once (its tensors), the HBM floor.
    """

    kernel: str
    full: np.ndarray
    partial: np.ndarray
    hbm_bytes: int

    def __post_init__(self):
        full = np.asarray(self.full, dtype=np.int64).reshape(-1)
        partial = np.asarray(self.partial, dtype=np.int64).reshape(-1)
        if full.shape != partial.shape or (full < 0).any() or (partial < 0).any():
            raise ValueError(f"full and partial must be non-negative counts of the same length, got "
                             f"{full.shape} and {partial.shape}")
        object.__setattr__(self, "full", full)
        object.__setattr__(self, "partial", partial)

    @property
    def programs(self) -> int:
        return len(self.full)

    @property
    def iterations(self) -> tuple[int, int]:
        """(FULL, PARTIAL) iterations over all programs of one batch element."""
        return int(self.full.sum()), int(self.partial.sum())


def workload(schedule: TileSchedule, kernel: str) -> Workload:
    """The ``Workload`` of ``kernel`` on ``schedule``, the schedule that kernel walks
    (``TritonKernels.schedule_of(kernel)``; for routed attention with representative tables)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {list(KERNELS)}, got {kernel!r}")
    problem = schedule.problem
    head_group = np.asarray(schedule.head_group).reshape(-1, problem.heads)[0]  # per batch element: the first
    csr = schedule.inverse if kernel == "bwd_dkdv" else schedule.forward
    visits = np.diff(csr.ptr, axis=1)[head_group]      # [heads, rows]
    full = np.asarray(csr.full)[head_group]
    partial = visits - full
    if kernel == "bwd_dkdv":  # a program per (key/value head, key tile) walks its query heads
        rep = problem.heads // problem.kv_heads
        full = full.reshape(problem.kv_heads, rep, -1).sum(axis=1)
        partial = partial.reshape(problem.kv_heads, rep, -1).sum(axis=1)
    nbytes = torch.finfo(problem.dtype).bits // 8
    q_side, kv_side = problem.heads * problem.tokens, problem.kv_heads * problem.tokens
    d = problem.head_dim
    tensors = {"fwd": (2 * q_side + 2 * kv_side) * d * nbytes + 4 * q_side,           # Q, O, K, V; LSE
               "bwd_dq": (4 * q_side + 2 * kv_side) * d * nbytes + 8 * q_side,        # Q, O, dO, dQ, K, V; LSE, delta
               "bwd_dkdv": (2 * q_side + 4 * kv_side) * d * nbytes + 8 * q_side}      # Q, dO, K, V, dK, dV; LSE, delta
    return Workload(kernel, full.reshape(-1), partial.reshape(-1), tensors[kernel])


def tile_loops(sass: SassReport) -> tuple[Loop, ...]:
    """The tile loops of one of our kernels, in address order (the FULL loop first: the
    templates emit it before the PARTIAL one): the innermost loops holding matrix
    instructions, or, in a kernel without tensor cores (fp32), the innermost loops. Of more
    than two, the two longest."""
    loops = list(sass.mma_loops)
    if not loops:
        loops = [lp for lp in sass.loops
                 if not any(o is not lp and lp.start <= o.start and o.end <= lp.end for o in sass.loops)]
    if len(loops) > 2:
        keep = sorted(sorted(loops, key=lambda lp: -lp.instructions)[:2], key=lambda lp: lp.start)
        loops = keep
    return tuple(loops)


def features(report: ResourceReport, kernel: str, schedule: TileSchedule, sass: SassReport | None = None
             ) -> KernelFeatures:
    """``KernelFeatures`` of ``report`` (an ahead-of-time compile of ``kernel`` walking
    ``schedule``). Two tile loops: FULL then PARTIAL; one: the kind of iteration the schedule
    has (both kinds: one loop runs every tile); none (ptxas unrolled a constant trip count):
    the whole function, shared out over a program's mean iterations, stands for both."""
    sass = report.sass() if sass is None else sass
    loops = tile_loops(sass)
    work = workload(schedule, kernel)
    n_full, n_partial = work.iterations
    if not loops:
        if not sass.instructions:
            raise ValueError(f"{kernel}: no tile loop and no instructions in the SASS of {sass.function!r}")
        per_program = max(1.0, (n_full + n_partial) / max(1, work.programs))
        unrolled = Loop(0, 0, 0, math.ceil(sass.instructions / per_program), (), round(sass.hmma / per_program), 0)
        loops = (unrolled,)
    if len(loops) == 2:
        full, partial = loops
    elif n_full and not n_partial:
        full, partial = loops[0], None
    elif n_partial and not n_full:
        full, partial = None, loops[0]
    else:
        full = partial = loops[0]
    geom = schedule.geometry
    problem = schedule.problem
    return KernelFeatures(kernel=kernel, num_warps=report.num_warps, num_stages=report.num_stages,
                          registers=report.registers, shared_bytes=report.shared_bytes,
                          serialized=bool(report.serialized), tensor_core=report.tensor_core, full=full,
                          partial=partial, block_m=geom.block_m, block_n=geom.block_n,
                          block_d=block_d(problem.head_dim), element_bytes=torch.finfo(problem.dtype).bits // 8,
                          spills=report.spills)


# ======================================================================================
# The model
# ======================================================================================
def occupancy(kernel, spec: TargetSpec) -> int:
    """Programs resident per SM (0: it cannot launch on this target). ``kernel``: anything with
    ``num_warps``, ``registers`` and ``shared_bytes`` (a ``ResourceReport``, ``KernelFeatures``)."""
    warps = kernel.num_warps
    if kernel.shared_bytes > spec.shared_per_block or warps > spec.max_warps_per_sm:
        return 0
    per_warp = math.ceil(max(1, kernel.registers) * 32 / REGISTER_UNIT) * REGISTER_UNIT
    by_regs = spec.registers_per_sm // (per_warp * warps)
    by_shared = spec.shared_per_sm // (kernel.shared_bytes + SHARED_RESERVED_PER_BLOCK)
    return max(0, min(by_regs, by_shared, spec.max_warps_per_sm // warps, spec.max_blocks_per_sm))


@dataclasses.dataclass(frozen=True)
class LoopPrediction:
    """Predicted SM clock cycles per iteration of one tile loop (see the module docstring)."""

    issue: float
    tensor: float
    memory: float
    latency: float               # one program alone: busy + uncovered load latency
    stall: float                 # the load latency its prefetch does not cover

    def cost(self, resident: int) -> float:
        """Predicted SM cycles per iteration with ``resident`` programs sharing the SM."""
        return max(self.issue, self.tensor, self.memory, self.latency / max(1, resident))

    def bound(self, resident: int) -> str:
        terms = dict(issue=self.issue, tensor=self.tensor, memory=self.memory, latency=self.latency / max(1, resident))
        return max(terms, key=terms.get)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """A predicted kernel time (the cost model's, not a measurement).

    predicted_us / predicted_cycles: the predicted time. bound: what limits it ("issue",
    "tensor", "memory", "latency" of the tile loops, "longest program", "hbm"). occupancy:
    programs resident per SM; waves; programs: of the whole launch (batch included).
    loops: predicted cycles per iteration of the FULL and PARTIAL loop.
    """

    predicted_us: float
    predicted_cycles: float
    bound: str
    occupancy: int
    waves: int
    programs: int
    loops: dict = dataclasses.field(default_factory=dict, compare=False)

    def as_dict(self) -> dict:
        return dict(predicted_us=None if math.isinf(self.predicted_us) else self.predicted_us,
                    predicted_cycles=None if math.isinf(self.predicted_cycles) else self.predicted_cycles,
                    predicted_bound=self.bound, occupancy=self.occupancy, waves=self.waves, programs=self.programs,
                    predicted_cycles_per_iteration={k: dataclasses.asdict(v) for k, v in self.loops.items()})


def _loop(f: KernelFeatures, lp: Loop, spec: TargetSpec) -> LoopPrediction:
    warps = f.num_warps
    issue = lp.instructions * warps / ISSUE_PER_CLOCK
    own_issue = lp.instructions * max(warps, ISSUE_PER_CLOCK) / ISSUE_PER_CLOCK  # one program's schedulers
    peak = spec.mma_flops_per_clock / (2 if f.element_bytes == 4 else 1)         # tf32: half rate
    if lp.wgmma:
        tensor = warps / 4 * sum(2 * math.prod(int(x) for x in shape.split("x")) / peak + WGMMA_FIXED_CYCLES
                                 for shape in lp.wgmma)
    elif lp.hmma or f.tensor_core != "none":  # HMMA, or a loop whose shapes were not seen (unrolled)
        flops = FLOPS_PER_PAIR[f.kernel] * f.block_m * f.block_n * f.block_d
        tensor = flops / (peak * (1.0 if f.tensor_core in ("wgmma", "tcgen05") else spec.legacy_mma_share))
    else:
        tensor = 0.0
    if f.kernel == "bwd_dkdv":   # Q and dO tiles, their LSE and delta rows
        nbytes = 2 * f.block_m * f.block_d * f.element_bytes + 8 * f.block_m
    else:                        # K and V tiles
        nbytes = 2 * f.block_n * f.block_d * f.element_bytes
    memory = nbytes / spec.l2_bytes_per_clock
    busy = own_issue + tensor if f.serialized else max(own_issue, tensor)
    stall = max(0.0, spec.mem_latency_cycles - (f.num_stages - 1) * busy)
    return LoopPrediction(issue, tensor, memory, busy + stall, stall)


def predict(f: KernelFeatures, work: Workload, spec: TargetSpec, batch: int = 1) -> Prediction:
    """The predicted time of a kernel with features ``f`` doing ``work`` on ``batch`` batch
    elements on ``spec`` (inf when it cannot be resident on an SM)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if f.kernel != work.kernel:
        raise ValueError(f"features of {f.kernel!r} with the workload of {work.kernel!r}")
    resident = occupancy(f, spec)
    programs = work.programs * batch
    if resident == 0 or programs == 0:
        inf = math.inf if resident == 0 else 0.0
        return Prediction(inf, inf, "cannot launch" if resident == 0 else "empty", resident, 0, programs)
    n_full, n_partial = work.iterations
    loops: dict[str, LoopPrediction] = {}
    for role, count in (("full", n_full), ("partial", n_partial)):
        lp = getattr(f, role)
        if count and lp is None:
            raise ValueError(f"{f.kernel}: {count} {role.upper()} iterations but no {role.upper()} loop")
        if lp is not None and count:
            loops[role] = _loop(f, lp, spec)
    r_eff = min(resident, math.ceil(programs / spec.sms))
    waves = math.ceil(programs / (spec.sms * r_eff))
    mean = {"full": n_full / work.programs, "partial": n_partial / work.programs}
    throughput = r_eff * sum(mean[role] * lp.cost(r_eff) for role, lp in loops.items())
    zero = LoopPrediction(0, 0, 0, 0, 0)
    latency_f, latency_p = loops.get("full", zero).latency, loops.get("partial", zero).latency
    longest = float(np.max(work.full * latency_f + work.partial * latency_p))
    hbm = work.hbm_bytes * batch / spec.hbm_bytes_per_clock
    cycles = max(waves * throughput, longest, hbm) + waves * PROGRAM_LATENCIES * spec.mem_latency_cycles
    if hbm >= max(waves * throughput, longest):
        bound = "hbm"
    elif longest > waves * throughput:
        bound = "longest program"
    else:
        main = max(loops, key=lambda role: mean[role] * loops[role].cost(r_eff))
        bound = loops[main].bound(r_eff)
    return Prediction(cycles / (spec.clock_ghz * 1e3), cycles, bound, resident, waves, programs, loops)


def predict_us(schedule: TileSchedule, kernel: str, report: ResourceReport, spec: TargetSpec, batch: int = 1,
               sass: SassReport | None = None) -> float:
    """Predicted time of ``kernel`` in microseconds on ``batch`` batch elements (inf if it
    cannot launch); ``schedule``: the one the kernel walks."""
    if occupancy(report, spec) == 0:
        return math.inf
    return predict(features(report, kernel, schedule, sass), workload(schedule, kernel), spec, batch).predicted_us
