"""The autotuner without a GPU: static pruning by ahead-of-time compile (spills, serialized
wgmma), ranking by the cost model (labelled predicted), the space (tiles, closed form or
tables, the dK/dV kernel's own tiles), the batch bucket in the key, the tuning database round
trip, and compile(autotune=True). No timing assertions."""
import dataclasses
import math

import pytest
import torch

import sparseforge as sf
from sparseforge.autotune import TuningDB, TuningError, tune
from sparseforge.autotune import cost
from sparseforge.autotune.space import LAUNCHES, dkdv_tile_choices, tile_choices
from sparseforge.autotune.tuner import FORWARD_KERNELS, tuning_key
from sparseforge.lower import build_schedule
from sparseforge.codegen.config import KERNELS, KernelConfig, Launch
from sparseforge.backends.triton import TritonKernels

PATTERN = sf.Neighborhood(3)
PROBLEM = sf.Problem(grid=(8, 8), heads=2, head_dim=16, dtype=torch.float16)
TILES = [((4, 4), (4, 4)), ((4, 8), (4, 4))]
DKDV_TILES = [((4, 4), (4, 8)), ((2, 4), (4, 4))]
ONE_LAUNCH = [Launch(4, 1)]
TWO_LAUNCHES = [Launch(4, 1), Launch(4, 2)]


@pytest.fixture(scope="module", autouse=True)
def compile_once():
    """Each distinct kernel source compiles once per module (tests tune the same candidates
    several times; an ahead-of-time compile takes seconds)."""
    original = TritonKernels.aot
    memo = {}

    def aot(self, name, target="sm_90"):
        launch = self.config.launch(name)
        k = (self.source(name), launch, target)
        if k not in memo:
            memo[k] = original(self, name, target)
        return memo[k]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TritonKernels, "aot", aot)
        yield


@pytest.fixture
def db(tmp_path):
    return TuningDB(tmp_path / "tuning.sqlite3")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, compile_once):
    """One real tuning run (2 tilings x 2 loop bounds x 2 kernels + 2 dK/dV tilings, x 2
    launches: 20 ahead-of-time compiles), shared by the tests below."""
    db = TuningDB(tmp_path_factory.mktemp("db") / "tuning.sqlite3")
    result = tune(PATTERN, PROBLEM, target="sm_90", db=db, tiles=TILES, dkdv_tiles=DKDV_TILES, launches=TWO_LAUNCHES)
    return db, result


def test_without_gpu_the_choice_is_predicted(tuned):
    _, result = tuned
    assert not result.measured and not result.cached
    assert result.basis.startswith("predicted")
    assert result.as_dict()["metric_unit"] == "predicted us" and result.batch == 1
    assert result.device_name == "cost-model sm_90" and result.target == "sm_90"
    assert (result.config.q_tile, result.config.k_tile) in TILES
    assert (result.config.dkdv_q_tile, result.config.dkdv_k_tile) in DKDV_TILES
    assert math.isfinite(result.metric) and result.metric > 0
    assert len(result.candidates) == (len(TILES) * 2 * len(FORWARD_KERNELS) + len(DKDV_TILES)) * len(TWO_LAUNCHES)
    for c in result.candidates:
        assert "predicted_us" in c.as_dict()
        assert (c.closed_form is None) == (c.kernel == "bwd_dkdv")


def _best(result, kernel, q_tile, k_tile, closed_form):
    mine = [c for c in result.candidates if c.kernel == kernel and (c.q_tile, c.k_tile) == (q_tile, k_tile)
            and c.closed_form == closed_form and c.rejected is None]
    return min(mine, key=lambda c: c.predicted_us) if mine else None


def test_winner_has_the_lowest_predicted_total(tuned):
    """Forward + dQ per (tiles, loop bounds) and dK/dV per dK/dV tiling are independent: the
    winner is the best of each, its launches the best of its tiling."""
    _, result = tuned
    forward = {}
    for (q_tile, k_tile), closed in ((t, c) for t in TILES for c in (True, False)):
        best = [_best(result, k, q_tile, k_tile, closed) for k in FORWARD_KERNELS]
        if all(best):
            forward[q_tile, k_tile, closed] = sum(c.predicted_us for c in best)
    backward = {t: _best(result, "bwd_dkdv", *t, None) for t in DKDV_TILES}
    backward = {t: c.predicted_us for t, c in backward.items() if c}
    config = result.config
    assert min(forward, key=forward.get) == (config.q_tile, config.k_tile, config.closed_form)
    assert min(backward, key=backward.get) == (config.dkdv_q_tile, config.dkdv_k_tile)
    assert result.metric == pytest.approx(min(forward.values()) + min(backward.values()))
    for kernel in KERNELS:
        tiles = (config.dkdv_q_tile, config.dkdv_k_tile) if kernel == "bwd_dkdv" else (config.q_tile, config.k_tile)
        closed = None if kernel == "bwd_dkdv" else config.closed_form
        assert config.launch(kernel) == _best(result, kernel, *tiles, closed).launch


def test_the_chosen_config_builds_what_was_costed(tuned):
    """The dK/dV kernel of the chosen config walks its own tiles (or the forward's)."""
    _, result = tuned
    schedule = build_schedule(PATTERN, PROBLEM, q_tile=result.config.q_tile, k_tile=result.config.k_tile,
                              closed_form=result.config.closed_form)
    kernels = TritonKernels(schedule, config=result.config)
    geom = kernels.dkdv_schedule.geometry
    assert (geom.q_tile, geom.k_tile) == (result.config.dkdv_q_tile, result.config.dkdv_k_tile)
    assert schedule.bounds is not None or not result.config.closed_form  # closed form only where it exists


def test_closed_form_and_tables_are_both_tried(tuned):
    _, result = tuned
    for q_tile, k_tile in TILES:
        tried = {c.closed_form for c in result.candidates if (c.q_tile, c.k_tile) == (q_tile, k_tile)
                 and c.kernel == "fwd"}
        assert tried == {True, False}


def test_serialized_or_spilling_candidates_are_never_chosen(monkeypatch, db):
    """Reports of one launch are made to say "serialized" (or to spill) and the cost model to
    predict that launch fastest: it must still never be chosen, for any kernel."""
    bad = Launch(4, 2)
    real_aot, real_predict = TritonKernels.aot, cost.predict
    for flaw in ({"serialized": ("C7515: wgmma.mma_async instructions are serialized (test)",)},
                 {"spill_stores": 64, "spill_loads": 64}):
        def aot(self, name, target="sm_90", flaw=flaw):
            report = real_aot(self, name, target)
            return dataclasses.replace(report, **flaw) if self.config.launch(name) == bad else report

        def predict(f, work, spec, batch=1):
            p = real_predict(f, work, spec, batch)
            return dataclasses.replace(p, predicted_us=p.predicted_us / 100) if f.num_stages == 2 else p
        monkeypatch.setattr(TritonKernels, "aot", aot)
        monkeypatch.setattr(cost, "predict", predict)
        result = tune(PATTERN, PROBLEM, target="sm_90", db=db, tiles=TILES[:1], dkdv_tiles=DKDV_TILES[:1],
                      closed_form=(True,), launches=TWO_LAUNCHES, force=True)
        assert all(result.config.launch(k) != bad for k in KERNELS)
        flawed = [c for c in result.candidates if c.launch == bad]
        assert flawed and all(c.rejected and c.rejected.startswith(("ptxas serializes", "spills")) for c in flawed)


@pytest.mark.parametrize("batch, bucket", [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (64, 64), (1000, 64)])
def test_batch_is_keyed_by_its_bucket(batch, bucket):
    key = tuning_key(PATTERN, PROBLEM, 90, "cost-model sm_90", batch=batch)
    assert key.batch == str(bucket)
    assert key == tuning_key(PATTERN, PROBLEM, 90, "cost-model sm_90", batch=bucket)
    assert (key == tuning_key(PATTERN, PROBLEM, 90, "cost-model sm_90")) == (bucket == 1)


def test_batch_changes_the_key_and_reaches_the_cost_model(db, monkeypatch):
    seen = []
    real_predict = cost.predict

    def predict(f, work, spec, batch=1):
        seen.append(batch)
        return real_predict(f, work, spec, batch)
    monkeypatch.setattr(cost, "predict", predict)
    small = dict(target="sm_90", db=db, tiles=TILES[:1], dkdv_tiles=[], closed_form=(True,), launches=ONE_LAUNCH)
    one = tune(PATTERN, PROBLEM, batch=1, **small)
    three = tune(PATTERN, PROBLEM, batch=3, **small)
    assert not one.cached and not three.cached and (one.batch, three.batch) == (1, 4)
    assert sorted(set(seen)) == [1, 4]
    assert sorted(k.batch for k, _ in db.entries()) == ["1", "4"]
    assert three.metric >= one.metric
    programs = {(c.kernel, c.launch): c.prediction.programs for c in one.candidates}
    assert {(c.kernel, c.launch): c.prediction.programs // 4 for c in three.candidates} == programs  # x bucket
    seen.clear()
    again = tune(PATTERN, PROBLEM, batch=4, **small)
    assert again.cached and again.batch == 4 and again.config == three.config and not seen
    with pytest.raises(ValueError, match="batch must be >= 1, got 0"):
        tune(PATTERN, PROBLEM, batch=0, **small)


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
    result = tune(PATTERN, PROBLEM, target="sm_80", db=db, tiles=TILES[:1], dkdv_tiles=DKDV_TILES[:1],
                  launches=ONE_LAUNCH)
    assert not result.cached and set(calls) == {"sm_80"}
    assert {k.target for k, _ in db.entries()} == {"sm_80", "sm_90"}


def test_spilling_candidates_are_pruned_with_the_reason(db):
    """fp32 attention at 128 x 64 tiles spills in every kernel; 32 x 32 does not."""
    problem = sf.Problem(grid=(56, 56), heads=1, head_dim=64, dtype=torch.float32)
    spilling = ((8, 16), (8, 8))
    result = tune(sf.Neighborhood(7), problem, target="sm_80", db=db, tiles=[spilling, ((4, 8), (4, 8))],
                  dkdv_tiles=[], closed_form=(True,), launches=[Launch(8, 2)])
    rejected = [c for c in result.candidates if (c.q_tile, c.k_tile) == spilling and c.rejected]
    assert rejected and all(c.rejected.startswith("spills") and c.report.spills > 0 for c in rejected)
    assert (result.config.q_tile, result.config.k_tile) == ((4, 8), (4, 8))


def test_nothing_surviving_is_an_error(db):
    problem = sf.Problem(grid=(56, 56), heads=1, head_dim=64, dtype=torch.float32)
    with pytest.raises(TuningError, match="no config .* survived on sm_80: spills"):
        tune(sf.Neighborhood(7), problem, target="sm_80", db=db, tiles=[((8, 16), (8, 8))], dkdv_tiles=[],
             closed_form=(True,), launches=[Launch(8, 2)])
    assert len(db) == 0


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(objective="fastest"), ValueError, "objective must be one of"),
    (dict(target="sm_75"), ValueError, "not supported"),
    (dict(measure=True), ValueError, "measure=True needs a CUDA device"),
    (dict(closed_form=()), ValueError, "closed_form must be a non-empty sequence of bools"),
    (dict(closed_form=("yes",)), ValueError, "closed_form must be a non-empty sequence of bools"),
    (dict(batch=2.0), TypeError, "batch must be an int"),
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
    assert len(LAUNCHES) >= 2 and {launch.num_stages for launch in LAUNCHES} >= {1, 2, 3}


@pytest.mark.parametrize("grid", [(56, 56), (4096,), (8, 16, 16)])
def test_dkdv_tiles_keep_at_least_64_keys_stationary(grid):
    """dK/dV: >= 64 stationary keys (wgmma's M on sm_90), query tiles streamed, fewer queries
    than keys."""
    problem = sf.Problem(grid=grid, heads=1, head_dim=64, dtype=torch.bfloat16)
    choices = dkdv_tile_choices(problem)
    assert choices and len(set(choices)) == len(choices)
    for q_tile, k_tile in choices:
        assert len(q_tile) == len(k_tile) == len(grid)
        assert math.prod(k_tile) >= 64 and math.prod(q_tile) <= math.prod(k_tile)


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
    first = tune(PATTERN, PROBLEM, target="sm_90", tiles=TILES[:1], dkdv_tiles=DKDV_TILES[:1], closed_form=(True,),
                 launches=ONE_LAUNCH)
    batched = tune(PATTERN, PROBLEM, batch=32, target="sm_90", tiles=TILES[:1], dkdv_tiles=DKDV_TILES[:1],
                   closed_form=(True,), launches=ONE_LAUNCH)
    monkeypatch.setattr(TritonKernels, "aot", lambda *a, **k: pytest.fail("recompiled a tuned problem"))
    attn = sf.compile(PATTERN, PROBLEM, autotune=True, target="sm_90")
    assert attn.tuning.cached and attn.config == first.config
    assert attn.schedule.geometry.q_tile == first.config.q_tile
    q, k, v = (torch.randn(1, 2, 64, 16, dtype=torch.float64) for _ in range(3))
    ref = sf.reference_attention(q, k, v, PATTERN, PROBLEM)
    assert ((attn(q, k, v) - ref).norm() / ref.norm()).item() < 1e-10
    attn = sf.compile(PATTERN, PROBLEM, autotune=True, target="sm_90", batch=20)   # bucket 32: that entry
    assert attn.tuning.cached and attn.tuning.batch == 32 and attn.config == batched.config


@pytest.mark.parametrize("kwargs,match", [
    (dict(autotune=True, q_tile=(4, 4)), "autotune=True chooses"),
    (dict(target="sm_90"), "target is the autotuner's target"),
    (dict(batch=8), "batch=8 is the batch size the autotuner tunes for"),
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
    assert result.config.shared_tiling  # routed: one tiling for every kernel, and no closed form
    assert {c.kernel for c in result.candidates} == set(KERNELS)
    assert {c.closed_form for c in result.candidates} <= {True, None}
    with pytest.raises(ValueError, match="routed attention runs every kernel on one tiling"):
        tune(ROUTED, ROUTED_PROBLEM, target="sm_90", dkdv_tiles=[((8, 8), (8, 8))], force=True)
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
