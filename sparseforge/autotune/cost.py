"""A static cost model: predicted kernel time from the schedule and the compiled resources.

Used where no GPU can time the candidates. It ranks configs; its numbers are predictions
(labelled so everywhere they are shown), not measurements.

Per kernel, a program handles one tile row (a query tile for forward/dQ, a key tile for
dK/dV) and visits that row's tiles. One visited tile pair costs, in SM clock cycles,

    matmul:   flops_per_pair * BM * BN * D / mma_flops_per_clock
    softmax:  BM * BN / exp_per_clock                      (one exp2 per score)
    mask:     BM * BN / alu_per_clock                      (PARTIAL tiles only)
    loads:    BN * D * bytes * operands / l2_bytes_per_clock
    overhead: a fixed TILE_OVERHEAD_CYCLES per visited tile (so tiny tiles do not win for free)

and the kernel takes ``waves * (mean tiles per program) * cycles / efficiency(occupancy)``,
where occupancy (programs resident per SM) comes from the ``ResourceReport``: registers,
shared memory and warps against the SM's limits. Batch size 1 is assumed.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from ..backends.aot import ResourceReport
from ..codegen.render import block_d
from ..lower.schedule import TileSchedule


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """What the cost model knows of a GPU generation (public datasheet figures)."""

    name: str
    sms: int
    clock_ghz: float
    mma_flops_per_clock: int      # dense fp16/bf16 tensor-core flops per SM per clock
    fp32_flops_per_clock: int     # plain fp32 FMA flops per SM per clock (fp32 inputs)
    exp_per_clock: int            # exp2 (MUFU) per SM per clock
    l2_bytes_per_clock: int       # sustained L2 -> SM bytes per SM per clock
    registers_per_sm: int
    shared_per_sm: int            # bytes
    shared_per_block: int         # bytes, the most one program may use
    max_warps_per_sm: int


TARGETS: dict[int, TargetSpec] = {
    80: TargetSpec("sm_80 (A100)", 108, 1.41, 2048, 128, 16, 64, 65536, 167936, 166912, 64),
    86: TargetSpec("sm_86", 84, 1.70, 1024, 256, 16, 64, 65536, 102400, 101376, 48),
    89: TargetSpec("sm_89", 128, 2.50, 1024, 256, 16, 64, 65536, 102400, 101376, 48),
    90: TargetSpec("sm_90 (H100 SXM)", 132, 1.755, 4096, 256, 16, 64, 65536, 233472, 232448, 64),
    100: TargetSpec("sm_100 (B200)", 148, 1.85, 8192, 256, 16, 64, 65536, 233472, 232448, 64),
}

# Matmul flops per (query, key, head-dim) element of a visited tile pair, per kernel:
# fwd QK^T + PV; dQ recomputes QK^T, dP = dO V^T, dQ += dS K; dK/dV adds dV and dK.
FLOPS_PER_PAIR = {"fwd": 4, "bwd_dq": 6, "bwd_dkdv": 8}
# Operands streamed per visited tile (K and V for forward/dQ; Q, dO for dK/dV).
OPERANDS = {"fwd": 2, "bwd_dq": 2, "bwd_dkdv": 2}
MASK_OPS = 8  # integer ops per score to evaluate a typical PARTIAL-tile predicate
TILE_OVERHEAD_CYCLES = 400  # per visited tile: address math, loop control, synchronisation
# mma.sync on Hopper/Blackwell reaches about half of wgmma/tcgen05 throughput.
LEGACY_MMA_SHARE = {90: 0.5, 100: 0.35}


def occupancy(report: ResourceReport, spec: TargetSpec) -> int:
    """Programs resident per SM (0: the kernel cannot launch on this target)."""
    threads = 32 * report.num_warps
    by_regs = spec.registers_per_sm // max(1, report.registers * threads)
    by_shared = spec.shared_per_sm // report.shared_bytes if report.shared_bytes else 32
    by_warps = spec.max_warps_per_sm // report.num_warps
    if report.shared_bytes > spec.shared_per_block:
        return 0
    return max(0, min(by_regs, by_shared, by_warps, 32))


def _efficiency(resident: int) -> float:
    """Share of peak an SM sustains with ``resident`` programs (latency hiding saturates)."""
    return {0: 0.0, 1: 0.55, 2: 0.8}.get(resident, 0.9)


def predict_us(schedule: TileSchedule, kernel: str, report: ResourceReport, spec: TargetSpec) -> float:
    """Predicted time of ``kernel`` in microseconds (inf if it cannot launch)."""
    resident = occupancy(report, spec)
    if resident == 0:
        return math.inf
    problem, geom = schedule.problem, schedule.geometry
    d = block_d(problem.head_dim)
    bm, bn = geom.block_m, geom.block_n
    fp32 = problem.dtype == torch.float32
    nbytes = 4 if fp32 else 2
    mma = spec.fp32_flops_per_clock if fp32 else spec.mma_flops_per_clock
    if not fp32 and report.tensor_core == "mma":
        mma *= LEGACY_MMA_SHARE.get(int(report.target.removeprefix("sm_")), 1.0)
    pair = bm * bn
    cycles_full = (TILE_OVERHEAD_CYCLES + FLOPS_PER_PAIR[kernel] * pair * d / mma + pair / spec.exp_per_clock
                   + OPERANDS[kernel] * bn * d * nbytes / spec.l2_bytes_per_clock)
    cycles_partial = cycles_full + MASK_OPS * pair / (spec.fp32_flops_per_clock / 2)
    if kernel == "bwd_dkdv":  # programs per KV head walk every query head of their group
        csr, programs = schedule.inverse, geom.n_k_tiles * problem.kv_heads
    else:
        csr, programs = schedule.forward, geom.n_q_tiles * problem.heads
    weights = np.bincount(schedule.head_group, minlength=schedule.groups)
    visited = float(np.dot(np.diff(csr.ptr, axis=1).sum(axis=1), weights))
    full = float(np.dot(csr.full.sum(axis=1), weights))
    work = full * cycles_full + (visited - full) * cycles_partial  # cycles, all programs
    # Each wave runs `resident` programs per SM side by side, sharing its throughput.
    resident = min(resident, math.ceil(programs / spec.sms))
    waves = math.ceil(programs / (spec.sms * resident))
    wave_cycles = resident * (work / programs) / _efficiency(resident)
    return waves * wave_cycles / (spec.clock_ghz * 1e3)
