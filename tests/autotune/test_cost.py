"""The SASS-driven cost model (``autotune.cost``): its predictions on hand-built kernel
features (no compile), its reading of schedules, and its reading of real SASS (a few
ahead-of-time compiles). No timing: these are properties of the model."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import sparseforge as sf
from sparseforge.autotune import cost
from sparseforge.autotune.cost import KernelFeatures, Workload
from sparseforge.backends.aot import ResourceReport
from sparseforge.backends.sass import Loop, SassReport
from sparseforge.lower import build_schedule

H100 = cost.TARGETS[90]


def loop(instructions: int, wgmma=("64x64x16",) * 8, hmma: int = 0, start: int = 0, end: int = 100) -> Loop:
    return Loop(start, end, 0, instructions, tuple(wgmma), hmma, 2)


def feats(**changes) -> KernelFeatures:
    base = dict(kernel="fwd", num_warps=4, num_stages=2, registers=128, shared_bytes=32768, serialized=False,
                tensor_core="wgmma", full=loop(300), partial=loop(450), block_m=64, block_n=64, block_d=64,
                element_bytes=2)
    return KernelFeatures(**{**base, **changes})


def work(full: int, partial: int, programs: int, kernel: str = "fwd", hbm_bytes: int = 1 << 20) -> Workload:
    return Workload(kernel, np.full(programs, full), np.full(programs, partial), hbm_bytes)


def us(f: KernelFeatures, w: Workload, batch: int = 1) -> float:
    return cost.predict(f, w, H100, batch).predicted_us


# ------------------------------------------------------------------------------------
# stages, occupancy, serialization
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("programs", [1, 64, 132, 264, 5000])
@pytest.mark.parametrize("instructions", [40, 300, 900])
@pytest.mark.parametrize("registers", [64, 168, 255])
def test_more_stages_never_predicted_slower_when_registers_allow(programs, instructions, registers):
    """Same registers and shared memory (so the same occupancy): each extra stage can only
    hide more load latency."""
    w = work(5, 7, programs)
    times = [us(feats(num_stages=s, registers=registers, full=loop(instructions), partial=loop(instructions + 50)), w)
             for s in (1, 2, 3, 4)]
    assert all(a >= b for a, b in zip(times, times[1:])), times


@pytest.mark.parametrize("kernel", ["fwd", "bwd_dq", "bwd_dkdv"])
def test_one_stage_loses_where_latency_is_exposed(kernel):
    """One program per SM (132 programs, 255 registers x 8 warps): nothing hides a 1-stage
    load, so 2 stages are predicted strictly faster, and the prediction names latency."""
    f = feats(kernel=kernel, num_warps=8, registers=255, full=loop(200), partial=loop(260))
    w = work(6, 6, 132, kernel)
    one, two = cost.predict(dataclasses.replace(f, num_stages=1), w, H100), cost.predict(f, w, H100)
    assert one.occupancy == two.occupancy == 1
    assert two.predicted_us < one.predicted_us
    assert one.bound == "latency"


def test_stages_that_cost_occupancy_can_lose():
    """Stages are not free: when the third stage's shared memory halves the resident
    programs of a latency-bound kernel, it is not predicted faster than two stages with 4
    programs per SM (the model must not just reward stages)."""
    w = work(8, 8, 132 * 4)
    two = feats(num_stages=2, registers=96, shared_bytes=40_000, full=loop(60), partial=loop(80))
    three = dataclasses.replace(two, num_stages=3, shared_bytes=200_000)
    assert cost.occupancy(two, H100) >= 4 and cost.occupancy(three, H100) == 1
    assert us(three, w) > us(two, w)


@pytest.mark.parametrize("registers, warps, shared, want", [
    (128, 4, 32768, 4),        # registers: 65536 / (128 x 128)
    (255, 8, 16384, 1),        # 255 -> 256 per thread: one 8-warp program
    (32, 4, 16384, 13),        # shared memory: 233472 // (16384 + 1024)
    (32, 1, 0, 32),            # blocks per SM
    (32, 16, 0, 4),            # warps: 64 / 16 (and registers: 65536 / (32 x 512))
    (64, 4, 232449, 0),        # more shared memory than one block may have
])
def test_occupancy(registers, warps, shared, want):
    f = feats(registers=registers, num_warps=warps, shared_bytes=shared)
    assert cost.occupancy(f, H100) == want
    if want == 0:
        assert math.isinf(us(f, work(1, 1, 10)))


def test_serialized_wgmma_is_predicted_slower():
    w = work(4, 4, 132)
    assert us(feats(serialized=True), w) > us(feats(), w)


# ------------------------------------------------------------------------------------
# monotone in work, batch
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["fwd", "bwd_dq", "bwd_dkdv"])
@pytest.mark.parametrize("programs", [3, 132, 1000])
@pytest.mark.parametrize("stages", [1, 3])
def test_predictions_are_monotone_in_iteration_counts(kernel, programs, stages):
    f = feats(kernel=kernel, num_stages=stages)
    rng = np.random.default_rng(programs)
    full, partial = rng.integers(0, 20, programs), rng.integers(0, 20, programs)
    base = us(f, Workload(kernel, full, partial, 1 << 16))
    for more_full, more_partial in ((full + 1, partial), (full, partial + 1), (full * 2, partial * 2)):
        assert us(f, Workload(kernel, more_full, more_partial, 1 << 16)) >= base
    one_more = partial.copy()
    one_more[0] += 50  # one program walks 50 more tiles: the longest program grows
    assert us(f, Workload(kernel, full, one_more, 1 << 16)) > base


@pytest.mark.parametrize("programs", [1, 50, 132, 700])
def test_batch_is_programs_and_never_faster(programs):
    f, w = feats(), work(4, 9, programs)
    times = [cost.predict(f, w, H100, b) for b in (1, 2, 3, 4, 8, 64)]
    assert [p.programs for p in times] == [programs * b for b in (1, 2, 3, 4, 8, 64)]
    assert all(a.predicted_us <= b.predicted_us for a, b in zip(times, times[1:]))
    assert all(a.waves <= b.waves for a, b in zip(times, times[1:]))


def test_waves_follow_programs_over_sms():
    f = feats(registers=255, num_warps=8)  # one program per SM
    w = work(4, 4, 132)
    assert cost.predict(f, w, H100, 1).waves == 1 and cost.predict(f, w, H100, 2).waves == 2
    assert us(f, w, 2) > us(f, w, 1)


def test_hbm_roofline():
    """A kernel whose tensors cannot stream in the time of its loops is bound by HBM."""
    w = work(1, 0, 132, hbm_bytes=10 ** 10)
    p = cost.predict(feats(), w, H100)
    assert p.bound == "hbm"
    overhead = cost.PROGRAM_LATENCIES * H100.mem_latency_cycles / (H100.clock_ghz * 1e3)  # one wave
    assert p.predicted_us == pytest.approx(1e10 / H100.hbm_bytes_per_s * 1e6 + overhead)


# ------------------------------------------------------------------------------------
# rankings of hand-built feature sets (the SASS figures of DESIGN.md)
# ------------------------------------------------------------------------------------
def test_tables_beat_a_longer_closed_form_partial_walk():
    """56x56 k7: the closed-form PARTIAL loop has 553 SASS instructions per iteration, the
    table walk 373 (issue 12); on PARTIAL-heavy work tables are predicted faster, and on
    FULL-heavy work the closed form (no index loads in the FULL loop) wins."""
    closed = feats(block_m=128, block_n=32, full=loop(300), partial=loop(553))
    tables = feats(block_m=128, block_n=32, full=loop(340), partial=loop(373))
    partial_heavy, full_heavy = work(1, 12, 2000), work(30, 1, 2000)
    assert us(tables, partial_heavy) < us(closed, partial_heavy)
    assert us(closed, full_heavy) < us(tables, full_heavy)


def test_wgmma_beats_the_same_loop_on_hmma():
    """Tensor-bound (few instructions per iteration): mma.sync runs at half the wgmma rate on
    H100. 64x64 tiles, d64, four products: 16 m64n64k16 per warpgroup."""
    w = work(10, 10, 1000, kernel="bwd_dkdv")
    flops_loop = dict(full=loop(100, wgmma=("64x64x16",) * 16), partial=loop(120, wgmma=("64x64x16",) * 16))
    hmma_loop = dict(full=loop(100, wgmma=(), hmma=64), partial=loop(120, wgmma=(), hmma=64))
    wg = feats(kernel="bwd_dkdv", **flops_loop)
    legacy = feats(kernel="bwd_dkdv", tensor_core="mma", **hmma_loop)
    assert us(wg, w) < us(legacy, w)


def test_whole_n_shapes_with_4_warps_beat_split_n_with_8():
    """A 64-row tile on 8 warps splits N over two warpgroups (m64n32 shapes): the same
    flops in twice as many, smaller wgmma; with the same issue slots it is predicted slower."""
    w = work(10, 10, 2000)
    four = feats(num_warps=4, full=loop(150, wgmma=("64x64x16",) * 8), partial=loop(150, wgmma=("64x64x16",) * 8))
    eight = feats(num_warps=8, full=loop(75, wgmma=("64x32x16",) * 8), partial=loop(75, wgmma=("64x32x16",) * 8))
    assert us(four, w) < us(eight, w)


def test_predicted_fields_say_predicted():
    p = cost.predict(feats(), work(2, 2, 10), H100)
    d = p.as_dict()
    times = [k for k in d if "us" in k.split("_") or "cycles" in k.split("_") or k.endswith("bound")]
    assert times and all(k.startswith("predicted_") for k in times), d
    assert "predicted" in (cost.Prediction.__doc__ or "") and "predicted" in (cost.__doc__ or "")


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="features of 'fwd' with the workload of 'bwd_dq'"):
        cost.predict(feats(), work(1, 1, 1, kernel="bwd_dq"), H100)
    with pytest.raises(ValueError, match="FULL iterations but no FULL loop"):
        cost.predict(feats(full=None), work(1, 1, 1), H100)
    with pytest.raises(ValueError, match="batch must be a positive int"):
        cost.predict(feats(), work(1, 1, 1), H100, 0)


# ------------------------------------------------------------------------------------
# reading schedules and SASS
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("heads, kv_heads", [(2, 2), (4, 2), (4, 1)])
def test_workload_counts_the_schedule(heads, kv_heads):
    problem = sf.Problem(grid=(16, 16), heads=heads, kv_heads=kv_heads, head_dim=32, dtype=torch.float16)
    schedule = build_schedule(sf.Neighborhood(5), problem, q_tile=(8, 8), k_tile=(4, 8))
    g = schedule.geometry
    fwd, dkdv = cost.workload(schedule, "fwd"), cost.workload(schedule, "bwd_dkdv")
    assert fwd.programs == g.n_q_tiles * heads and dkdv.programs == g.n_k_tiles * kv_heads
    for w in (fwd, dkdv, cost.workload(schedule, "bwd_dq")):  # every head's tiles, visited once
        full, partial = w.iterations
        assert (full + partial, full) == (schedule.visited_tiles, schedule.full_tiles)
    assert dkdv.hbm_bytes < cost.workload(schedule, "bwd_dq").hbm_bytes or heads == kv_heads


def _sass(*loops: Loop) -> SassReport:
    return SassReport("k", sum(lp.instructions for lp in loops), 0, 0, tuple(loops))


def _report(**changes) -> ResourceReport:
    base = dict(target="sm_90", num_warps=4, num_stages=2, shared_bytes=16384, registers=128, spill_stores=0,
                spill_loads=0, tensor_core="wgmma", ptx="")
    return ResourceReport(**{**base, **changes})


@pytest.mark.parametrize("has_full, has_partial", [(True, True), (True, False), (False, True)])
def test_tile_loop_roles(has_full, has_partial):
    """Two tile loops: FULL then PARTIAL (the templates' order); one: whichever kind the
    schedule has, or every tile; an outer loop and a loop without matrix instructions are
    not tile loops."""
    pattern = {(True, True): sf.Neighborhood(17), (True, False): sf.Blocks(8),
               (False, True): sf.Neighborhood(9)}[has_full, has_partial]
    problem = sf.Problem(grid=(64,), heads=1, head_dim=32, dtype=torch.float16)
    schedule = build_schedule(pattern, problem, q_tile=(8,), k_tile=(8,))
    full, partial = cost.workload(schedule, "fwd").iterations
    assert (full > 0, partial > 0) == (has_full, has_partial)
    outer = Loop(0, 1000, 0, 900, ("64x32x16",) * 8, 0, 4)
    a, b = loop(100, start=10, end=300), loop(200, start=400, end=900)
    plain = Loop(950, 990, 0, 12, (), 0, 0)
    two = cost.features(_report(), "fwd", schedule, _sass(outer, a, b, plain))
    assert (two.full, two.partial) == (a, b)
    one = cost.features(_report(), "fwd", schedule, _sass(outer, a))
    want = {(True, True): (a, a), (True, False): (a, None), (False, True): (None, a)}[(has_full, has_partial)]
    assert (one.full, one.partial) == want
    with pytest.raises(ValueError, match="no tile loop and no instructions"):
        cost.features(_report(), "fwd", schedule, _sass())


def test_an_unrolled_kernel_is_shared_out_over_its_iterations():
    """ptxas may unroll a constant trip count (tiny tiles): no loop is left, and the whole
    function, divided by a program's mean iterations, stands for one iteration."""
    problem = sf.Problem(grid=(64,), heads=1, head_dim=32, dtype=torch.float16)
    schedule = build_schedule(sf.Neighborhood(17), problem, q_tile=(8,), k_tile=(8,))
    w = cost.workload(schedule, "fwd")
    mean = sum(w.iterations) / w.programs
    sass = SassReport("k", 3000, 0, 48, ())
    f = cost.features(_report(tensor_core="mma"), "fwd", schedule, sass)
    assert f.full == f.partial and f.full.instructions == math.ceil(3000 / mean) and f.full.hmma == round(48 / mean)
    assert math.isfinite(cost.predict(f, w, H100).predicted_us)


def test_fp32_kernels_use_their_innermost_loops():
    """No tensor cores (fp32): the innermost loops are the tile loops."""
    outer = Loop(0, 1000, 0, 900, (), 0, 4)
    a, b = Loop(10, 300, 1, 800, (), 0, 2), Loop(400, 900, 1, 850, (), 0, 2)
    assert cost.tile_loops(_sass(outer, a, b)) == (a, b)


@pytest.fixture(scope="module")
def compiled():
    """Forward and dQ kernels on tables and on closed form, and a dK/dV kernel on its own
    tiles (5 ahead-of-time compiles)."""
    from sparseforge.backends.triton import TritonKernels
    from sparseforge.codegen.config import KernelConfig, Launch

    problem = sf.Problem(grid=(16, 16), heads=2, kv_heads=1, head_dim=32, dtype=torch.float16)
    out = {}
    for closed in (True, False):
        schedule = build_schedule(sf.Neighborhood(5), problem, q_tile=(4, 8), k_tile=(4, 8), closed_form=closed)
        config = KernelConfig((4, 8), (4, 8), closed, dkdv_q_tile=(4, 8), dkdv_k_tile=(8, 8), fwd=Launch(4, 2),
                              bwd_dq=Launch(4, 2), bwd_dkdv=Launch(4, 2))
        kernels = TritonKernels(schedule, config=config)
        for kernel in ("fwd", "bwd_dq") + (("bwd_dkdv",) if closed else ()):
            out[closed, kernel] = kernels.schedule_of(kernel), kernels.aot(kernel, "sm_90")
    return out


@pytest.mark.parametrize("closed, kernel", [(True, "fwd"), (False, "fwd"), (True, "bwd_dq"), (False, "bwd_dq"),
                                            (True, "bwd_dkdv")])
def test_features_agree_with_the_static_report(compiled, closed, kernel):
    """The loops the cost model reads as FULL and PARTIAL are the ones the static report
    maps to the template's FULL and PARTIAL source loops (through line info), and its
    iteration counts are the report's."""
    from sparseforge.bench.static_report import classify_our_loops, our_loop_iterations

    schedule, report = compiled[closed, kernel]
    roles = {c["role"]: c["loop"] for c in classify_our_loops(report, kernel) if c["role"] != "containment"}
    f = cost.features(report, kernel, schedule)
    assert (f.block_m, f.block_n) == ((32, 64) if kernel == "bwd_dkdv" else (32, 32))
    assert f.element_bytes == 2 and f.num_stages == 2
    assert (f.full, f.partial) == (roles.get("full"), roles.get("partial"))
    w = cost.workload(schedule, kernel)
    its = our_loop_iterations(schedule, kernel)
    assert w.iterations == (its["full"], its["partial"])
    p = cost.predict(f, w, H100)
    assert math.isfinite(p.predicted_us) and p.predicted_us > 0
    assert p.predicted_us == pytest.approx(cost.predict_us(schedule, kernel, report, H100))
