"""The autotuner without a GPU: static pruning by ahead-of-time compile, ranking by the cost
model (labelled predicted), the tuning database round trip, and compile(autotune=True)."""
import dataclasses
import math

import pytest
import torch

import sparseforge as sf
from sparseforge.autotune import TuningDB, TuningError, tune
from sparseforge.autotune import cost
from sparseforge.autotune.space import LAUNCHES, tile_choices
from sparseforge.lower import build_schedule
from sparseforge.codegen.config import KernelConfig, Launch
from sparseforge.backends.triton import TritonKernels

PATTERN = sf.Neighborhood(3)
PROBLEM = sf.Problem(grid=(8, 8), heads=2, head_dim=16, dtype=torch.float16)
TILES = [((4, 4), (4, 4)), ((4, 8), (4, 4))]
ONE_LAUNCH = [Launch(4, 1)]


@pytest.fixture
def db(tmp_path):
    return TuningDB(tmp_path / "tuning.sqlite3")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One real tuning run (12 ahead-of-time compiles), shared by the tests below."""
    db = TuningDB(tmp_path_factory.mktemp("db") / "tuning.sqlite3")
    result = tune(PATTERN, PROBLEM, target="sm_90", db=db, tiles=TILES, launches=ONE_LAUNCH + [Launch(8, 1)])
    return db, result


def test_without_gpu_the_choice_is_predicted(tuned):
    _, result = tuned
    assert not result.measured and not result.cached
    assert result.basis.startswith("predicted")
    assert result.device_name == "cost-model sm_90" and result.target == "sm_90"
    assert (result.config.q_tile, result.config.k_tile) in TILES
    assert math.isfinite(result.metric) and result.metric > 0
    assert len(result.candidates) == len(TILES) * 3 * 2


def test_winner_has_the_lowest_predicted_total(tuned):
    _, result = tuned
    totals = {}
    for q_tile, k_tile in TILES:
        best = {}
        for c in result.candidates:
            if (c.q_tile, c.k_tile) == (q_tile, k_tile) and c.rejected is None:
                best[c.kernel] = min(best.get(c.kernel, math.inf), c.predicted_us)
        if len(best) == 3:
            totals[(q_tile, k_tile)] = sum(best.values())
    assert min(totals, key=totals.get) == (result.config.q_tile, result.config.k_tile)
    assert result.metric == pytest.approx(min(totals.values()))
    for kernel in ("fwd", "bwd_dq", "bwd_dkdv"):
        chosen = result.config.launch(kernel)
        mine = [c for c in result.candidates if c.kernel == kernel and (c.q_tile, c.k_tile) ==
                (result.config.q_tile, result.config.k_tile) and c.rejected is None]
        assert chosen == min(mine, key=lambda c: c.predicted_us).launch


def test_second_tune_comes_from_the_database_without_compiling(tuned, monkeypatch):
    db, first = tuned

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled although the database has the answer")
    monkeypatch.setattr(TritonKernels, "aot", no_compile)
    again = tune(PATTERN, PROBLEM, target="sm_90", db=db)
    assert again.cached and again.config == first.config and again.metric == pytest.approx(first.metric)
    (key, record), = db.entries()
    assert key.target == "sm_90" and key.device_name == "cost-model sm_90" and not record.measured
    assert KernelConfig.from_dict(record.config) == first.config


def test_other_target_is_another_entry(tuned, monkeypatch):
    db, _ = tuned
    calls = []
    original = TritonKernels.aot

    def counting(self, name, target="sm_90"):
        calls.append(target)
        return original(self, name, target)
    monkeypatch.setattr(TritonKernels, "aot", counting)
    result = tune(PATTERN, PROBLEM, target="sm_80", db=db, tiles=TILES[:1], launches=ONE_LAUNCH)
    assert not result.cached and set(calls) == {"sm_80"}
    assert {k.target for k, _ in db.entries()} == {"sm_80", "sm_90"}


def test_spilling_candidates_are_pruned_with_the_reason(db):
    """fp32 attention at 128 x 64 tiles spills in every kernel; 32 x 32 does not."""
    problem = sf.Problem(grid=(56, 56), heads=1, head_dim=64, dtype=torch.float32)
    spilling = ((8, 16), (8, 8))
    result = tune(sf.Neighborhood(7), problem, target="sm_80", db=db,
                  tiles=[spilling, ((4, 8), (4, 8))], launches=[Launch(8, 2)])
    rejected = [c for c in result.candidates if (c.q_tile, c.k_tile) == spilling and c.rejected]
    assert rejected and all(c.rejected.startswith("spills") and c.report.spills > 0 for c in rejected)
    assert (result.config.q_tile, result.config.k_tile) == ((4, 8), (4, 8))


def test_nothing_surviving_is_an_error(db):
    problem = sf.Problem(grid=(56, 56), heads=1, head_dim=64, dtype=torch.float32)
    with pytest.raises(TuningError, match="no config .* survived on sm_80: spills"):
        tune(sf.Neighborhood(7), problem, target="sm_80", db=db, tiles=[((8, 16), (8, 8))],
             launches=[Launch(8, 2)])
    assert len(db) == 0


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(objective="fastest"), ValueError, "objective must be one of"),
    (dict(target="sm_75"), ValueError, "not supported"),
    (dict(measure=True), ValueError, "measure=True needs a CUDA device"),
])
def test_bad_arguments(db, kwargs, error, match):
    if kwargs.get("measure") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(error, match=match):
        tune(PATTERN, PROBLEM, db=db, **{"target": "sm_90", **kwargs})


def test_space_shapes_follow_the_grid():
    assert tile_choices(sf.Problem(grid=(56, 56), heads=1, head_dim=64))[0] == ((8, 16), (8, 8))
    assert all(len(q) == 3 for q, _ in tile_choices(sf.Problem(grid=(8, 16, 16), heads=1, head_dim=64)))
    big = tile_choices(sf.Problem(grid=(4096,), heads=1, head_dim=256))
    assert all(q[0] <= 64 and k[0] <= 32 for q, k in big)  # head dim 256 keeps tiles small
    assert len(LAUNCHES) >= 2


def test_cost_model_prefers_fewer_tiles_and_refuses_what_cannot_launch():
    problem = sf.Problem(grid=(64, 64), heads=4, head_dim=64, dtype=torch.bfloat16)
    small = build_schedule(sf.Neighborhood(7), problem, q_tile=(8, 16), k_tile=(4, 8))
    large = build_schedule(sf.Neighborhood(31), problem, q_tile=(8, 16), k_tile=(4, 8))
    report = TritonKernels(small).aot("fwd", "sm_90")
    spec = cost.TARGETS[90]
    assert cost.predict_us(small, "fwd", report, spec) < cost.predict_us(large, "fwd", report, spec)
    assert cost.occupancy(report, spec) >= 1
    too_big = dataclasses.replace(report, shared_bytes=spec.shared_per_block + 1)
    assert cost.occupancy(too_big, spec) == 0 and math.isinf(cost.predict_us(small, "fwd", too_big, spec))


def test_compile_autotune_uses_the_database(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEFORGE_CACHE_DIR", str(tmp_path))
    first = tune(PATTERN, PROBLEM, target="sm_90", tiles=TILES[:1], launches=ONE_LAUNCH)
    monkeypatch.setattr(TritonKernels, "aot", lambda *a, **k: pytest.fail("recompiled a tuned problem"))
    attn = sf.compile(PATTERN, PROBLEM, autotune=True, target="sm_90")
    assert attn.tuning.cached and attn.config == first.config
    assert attn.schedule.geometry.q_tile == first.config.q_tile
    q, k, v = (torch.randn(1, 2, 64, 16, dtype=torch.float64) for _ in range(3))
    ref = sf.reference_attention(q, k, v, PATTERN, PROBLEM)
    assert ((attn(q, k, v) - ref).norm() / ref.norm()).item() < 1e-10


@pytest.mark.parametrize("kwargs,match", [
    (dict(autotune=True, q_tile=(4, 4)), "autotune=True chooses"),
    (dict(target="sm_90"), "target is the autotuner's target"),
    (dict(config=KernelConfig(), k_tile=(4, 4)), "either config or q_tile/k_tile"),
])
def test_compile_rejects_conflicting_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sf.compile(PATTERN, PROBLEM, **kwargs)


@pytest.mark.gpu
def test_measured_tuning_on_gpu(db):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    result = tune(PATTERN, sf.Problem(grid=(32, 32), heads=2, head_dim=64, dtype=torch.float16), db=db,
                  launches=LAUNCHES[:2])
    assert result.measured and result.metric > 0 and result.basis == "measured"


ROUTED = sf.Routed(8, 2)
ROUTED_PROBLEM = sf.Problem(grid=(16, 24), heads=2, head_dim=32, dtype=torch.float16)


def test_routed_tiles_are_cut_from_the_region():
    from sparseforge.autotune.space import routed_tile_choices

    choices = routed_tile_choices(sf.Routed((6, 8), 2), ROUTED_PROBLEM)
    assert choices and len(set(choices)) == len(choices)
    for q, k in choices:  # region 6x8 pads to 8x8: every tile divides it
        assert all(8 % t == 0 for t in q + k)
    assert ((8, 8), (4, 8)) in choices


def test_routed_cost_reads_the_tables_of_balanced_routes():
    from sparseforge.autotune.tuner import candidate_schedule, representative

    schedule = candidate_schedule(ROUTED, ROUTED_PROBLEM, (8, 8), (4, 8))
    assert schedule.visited_tiles == 0  # its own tables come per call
    costed = representative(schedule)
    # 6 query regions x topk 2 x 2 key tiles per region, one routing for both heads
    assert costed.visited_tiles == 6 * 2 * 2 * 2 and costed.full_tiles == costed.visited_tiles
    per_key_tile = costed.inverse.ptr[0, 1:] - costed.inverse.ptr[0, :-1]
    assert set(per_key_tile.tolist()) == {2}  # balanced: every key tile is visited by 2 query tiles


def test_routed_autotune_compiles_and_matches_the_reference(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEFORGE_CACHE_DIR", str(tmp_path))
    result = tune(ROUTED, ROUTED_PROBLEM, target="sm_90", launches=[Launch(8, 1)])
    assert not result.measured and result.candidates and all(c.rejected is None for c in result.candidates)
    attn = sf.compile(ROUTED, ROUTED_PROBLEM, autotune=True, target="sm_90", backend="cpu")
    assert attn.tuning.cached and attn.config == result.config
    assert attn.schedule.geometry.q_tile == result.config.q_tile
    q, k, v = (torch.randn(1, 2, 16 * 24, 32, dtype=torch.float64) for _ in range(3))
    ref = sf.reference_attention(q, k, v, ROUTED, ROUTED_PROBLEM)
    assert ((attn(q, k, v) - ref).norm() / ref.norm()).item() < 1e-10


@pytest.mark.parametrize("pattern,problem", [
    (sf.Scattered(4), sf.Problem(heads=2, head_dim=16)),
    (sf.Grouped(), sf.Problem(grid=32, heads=2, head_dim=16)),
])
def test_autotune_refused_where_tables_depend_on_call_inputs(pattern, problem):
    with pytest.raises(sf.UnsupportedPatternError, match="known only at call time"):
        sf.compile(pattern, problem, autotune=True)
