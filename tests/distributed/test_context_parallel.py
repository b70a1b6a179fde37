"""Context parallelism (``sparseforge.distributed``) in spawned gloo process groups on the CPU.

Every rank holds its shard of q, k, v; its output and the gradients of its shard must equal
the single-process float64 reference within ``runtime.check``'s tolerances (and the
single-process CPU executor where a case asks), and the bytes it handed to ``isend`` must
equal what the exchange plan counts. One spawn per world size runs all its cases (process
start-up dominates the cost); a rank that dies mid-step must make the survivors raise
``PeerError`` within the timeout instead of hanging.
"""
from __future__ import annotations

import pytest
import torch

import sparseforge as sf
from sparseforge import distributed as sfd

from ._spawn import spawn

# name -> case (patterns by repr; grids that the ranks do not divide evenly on purpose). Every
# case is checked against the float64 reference; fp32 cases also against the single-process
# CPU executor.
CASES = {
    "window_1d": dict(pattern="SlidingWindow(5, right=3)", grid=[37], heads=2, head_dim=8, dtype="fp32",
                      executor=True),
    "causal_sinks": dict(pattern="Causal() & (SlidingWindow(6) | Sink(3))", grid=[41], heads=4, kv_heads=2,
                         head_dim=8, dtype="fp32", executor=True),
    "causal_sinks_zigzag": dict(pattern="Causal() & (SlidingWindow(6) | Sink(3))", grid=[43], heads=2, head_dim=8,
                                dtype="fp32", layout="zigzag", executor=True),
    "na2d_dilated": dict(pattern="Neighborhood((3, 5), dilation=(2, 1))", grid=[13, 10], heads=2, head_dim=8,
                         dtype="fp32", batch=2, executor=True),
    "na3d_dilated": dict(pattern="Neighborhood((3, 3, 5), dilation=(1, 2, 1))", grid=[9, 6, 10], heads=2,
                         head_dim=8, dtype="fp32", executor=True),
    # a 3-D grid cut in its two slowest dimensions
    "na3d_split": dict(pattern="Neighborhood((3, 3, 5), dilation=(1, 2, 1))", grid=[6, 9, 10], heads=2, head_dim=8,
                       dtype="fp32", split={"2": [1, 2], "4": [2, 2]}, executor=True),
    "na3d_mesh": dict(pattern="Neighborhood((3, 3, 5), dilation=(1, 2, 1))", grid=[6, 9, 10], heads=2, head_dim=8,
                      dtype="fp32", split={"2": [1, 2], "4": [2, 2]}, mesh=True),
    "na3d_dilated_fp64": dict(pattern="Neighborhood((3, 3, 5), dilation=(1, 2, 1))", grid=[8, 6, 10], heads=2,
                              head_dim=8, dtype="fp64"),
    # Full and Causal take the ring ("auto"); Full also point to point
    "full_ring": dict(pattern="Full()", grid=[30], heads=2, head_dim=8, dtype="fp32", executor=True),
    "full_ring_lse_grad": dict(pattern="Full()", grid=[30], heads=2, head_dim=8, dtype="fp32", lse_grad=True),
    "full_p2p": dict(pattern="Full()", grid=[30], heads=2, head_dim=8, dtype="fp32", exchange="p2p"),
    "causal_ring": dict(pattern="Causal()", grid=[29], heads=4, kv_heads=2, head_dim=8, dtype="fp32", batch=2,
                        executor=True),
    "causal_ring_zigzag": dict(pattern="Causal()", grid=[34], heads=2, head_dim=8, dtype="fp32", layout="zigzag",
                               executor=True),
    # a ring that stops short: a window's shards travel only as far as some rank needs them
    "window_ring": dict(pattern="SlidingWindow(9)", grid=[40], heads=2, head_dim=8, dtype="fp32", exchange="ring"),
    # the local compute in chunks of at most 64 query x key elements, made as the executor walks them
    "window_1d_row_chunks": dict(pattern="Causal() & SlidingWindow(6)", grid=[37], heads=2, head_dim=8,
                                 dtype="fp32", chunk_elements=64, exchange="p2p", cache_elements=0),
    "full_ring_row_chunks": dict(pattern="Full()", grid=[30], heads=2, head_dim=8, dtype="fp32", chunk_elements=50,
                                 cache_elements=0, modifiers=["sinks"]),
    "global_tokens": dict(pattern="SlidingWindow(2, right=2) | GlobalTokens((0, 29))", grid=[33], heads=2,
                          head_dim=8, dtype="fp32", executor=True),
    # more families: blocks with an offset, grids, halos, strided shards, strided and causal neighborhoods
    "blocks_offset": dict(pattern="Blocks(4, offset=(2, 1))", grid=[12, 10], heads=2, head_dim=8, dtype="fp32",
                          executor=True),
    "grid_2d": dict(pattern="Grid(3)", grid=[9, 6], heads=2, head_dim=8, dtype="fp32", executor=True),
    "halo_2d": dict(pattern="Halo(block_size=3, halo=1)", grid=[12, 9], heads=2, head_dim=8, dtype="fp32",
                    executor=True),
    "strided_shards": dict(pattern="Causal() & StridedShards(4, 1, 2)", grid=[41], heads=2, head_dim=8, dtype="fp32",
                           executor=True),
    "na2d_strided_causal": dict(pattern="Neighborhood((3, 5), stride=(2, 1), causal=(True, False))", grid=[12, 10],
                                heads=2, head_dim=8, dtype="fp32", executor=True),
    "per_head_mix": dict(pattern="PerHead([Neighborhood((3, 3)), Halo(2, 1)])", grid=[12, 8], heads=2, head_dim=8,
                         dtype="fp32", executor=True),
    # a learned per-head scale: its gradient is summed over the ranks
    "per_head_scale": dict(pattern="Neighborhood((5, 3))", grid=[12, 6], heads=2, head_dim=8, dtype="fp32",
                           scale="per_head"),
    "per_head_scale_ring": dict(pattern="Causal()", grid=[24], heads=2, head_dim=8, dtype="fp32", scale="per_head"),
    # score modifiers, positions on the whole grid; their gradients summed over the ranks
    "llm_modifiers": dict(pattern="Causal() & SlidingWindow(7)", grid=[37], heads=4, kv_heads=2, head_dim=8,
                          dtype="fp32", modifiers=["alibi", "softcap", "sinks"], lse_grad=True),
    "llm_modifiers_ring": dict(pattern="Causal()", grid=[30], heads=2, head_dim=8, dtype="fp32", layout="zigzag",
                               modifiers=["t5", "sinks"]),
    # run-time group ids (packed documents) and padding: the exchange shrinks to the rows of
    # the documents a rank's tokens are in
    "documents": dict(pattern="Grouped()", grid=[40], heads=2, head_dim=8, dtype="fp32", batch=2, groups="documents",
                      modifiers=["sinks"]),
    "documents_window": dict(pattern="Grouped() & Causal() & SlidingWindow(9)", grid=[41], heads=4, kv_heads=2,
                             head_dim=8, dtype="fp32", batch=2, groups="documents", padding="both_sides"),
    "documents_causal_ring": dict(pattern="Grouped(causal=True)", grid=[32], heads=2, head_dim=8, dtype="fp32",
                                  batch=2, groups="documents", exchange="ring", modifiers=["alibi", "sinks"]),
    "padding_window": dict(pattern="SlidingWindow(5, right=2)", grid=[33], heads=2, head_dim=8, dtype="fp32",
                           batch=2, padding="both_sides", modifiers=["sinks"]),
    # 16-bit inputs: K/V and p2p dK/dV travel in bf16, the ring's dK/dV sums in float32
    "causal_sinks_bf16": dict(pattern="Causal() & (SlidingWindow(6) | Sink(3))", grid=[41], heads=4, kv_heads=2,
                              head_dim=16, dtype="bf16", modifiers=["sinks", "alibi"]),
    "full_ring_bf16": dict(pattern="Full()", grid=[30], heads=2, head_dim=16, dtype="bf16"),
    "relative_position_2d": dict(pattern="Neighborhood((3, 5), dilation=(2, 1))", grid=[12, 10], heads=2, head_dim=8,
                                 dtype="fp32", modifiers=["rpb"], scale="per_head"),
}
WORLDS = (2, 4)


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"{w}ranks")
def results(request):
    world = request.param
    names = list(CASES)
    per_rank = spawn(world, "attention_cases", [CASES[n] for n in names], timeout=200)
    for r, res in enumerate(per_rank):
        assert isinstance(res, list), f"rank {r} of {world} failed: {res}"
    return world, {name: [per_rank[r][i] for r in range(world)] for i, name in enumerate(names)}


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_and_gradients_equal_single_process(results, name):
    world, by_case = results
    for rank, res in enumerate(by_case[name]):
        assert {"out", "lse", "dq", "dk", "dv"} <= set(res["errors"])
        for key, err in res["errors"].items():
            base = key.removeprefix("executor_")
            tol = res["tol"][base] * (2 if key.startswith("executor_") else 1)  # both sides within tol of float64
            assert err <= tol, f"{name}, rank {rank} of {world}: {key} row error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("name", list(CASES))
def test_bytes_sent_equal_the_plan(results, name):
    world, by_case = results
    for rank, res in enumerate(by_case[name]):
        st = res["stats"]
        if res["grouped"] and res["exchange"] == "p2p":
            # the rows of other documents stay home: at most the plan's, in each direction
            assert st["forward_bytes_sent"] <= res["plan_sent"]["forward"], (name, rank)
            assert st["backward_bytes_sent"] <= res["plan_sent"]["backward"], (name, rank)
            assert st["ids_bytes_sent"] > 0, (name, rank)
            continue
        assert st["forward_bytes_sent"] == res["plan_sent"]["forward"], (name, rank)
        assert st["backward_bytes_sent"] == res["plan_sent"]["backward"], (name, rank)
        if res["exchange"] == "p2p":
            assert st["forward_bytes_received"] == res["plan_received"], (name, rank)
            assert st["backward_bytes_received"] == sum(r["stats"]["forward_bytes_sent"] for r in [res]), (name, rank)
    assert sum(r["tokens"] for r in by_case[name]) == sf.Problem(grid=tuple(CASES[name]["grid"])).tokens
    # what all ranks sent is what all ranks received, in each direction
    for d in ("forward", "backward"):
        assert sum(r["stats"][f"{d}_bytes_sent"] for r in by_case[name]) == \
            sum(r["stats"][f"{d}_bytes_received"] for r in by_case[name]), (name, d)


def test_an_n_d_mesh_splits_as_its_shape(results):
    world, by_case = results
    assert all(r["split"] == CASES["na3d_mesh"]["split"][str(world)] for r in by_case["na3d_mesh"])


def test_documents_send_less_than_the_plan_of_full(results):
    _, by_case = results
    sent = sum(r["stats"]["forward_bytes_sent"] for r in by_case["documents"])
    planned = sum(r["plan_sent"]["forward"] for r in by_case["documents"])
    assert 0 < sent < planned


def test_auto_exchange_is_the_ring_for_full_and_causal_only(results):
    _, by_case = results
    want = {"full_ring": "ring", "causal_ring": "ring", "causal_ring_zigzag": "ring", "per_head_scale_ring": "ring",
            "window_1d": "p2p", "na3d_dilated": "p2p", "causal_sinks": "p2p", "documents": "p2p"}
    for name, exchange in want.items():
        assert {r["exchange"] for r in by_case[name]} == {exchange}, name


def _rounds(events, phase):
    return [e for e in events if e.endswith(phase) or e.startswith(f"compute {phase}")]


def test_the_exchange_overlaps_the_compute(results):
    """Each rank computes against its own keys after posting a round and before waiting for it
    (p2p), and against the shard it holds between posting a ring step's round and waiting
    for it; the backward likewise."""
    world, by_case = results
    for name in ("window_1d", "na3d_dilated"):
        for rank, res in enumerate(by_case[name]):
            fwd = _rounds(res["events"], "forward")
            assert fwd[:3] == ["post forward", f"compute forward {rank}", "wait forward"], (name, rank, fwd)
            bwd = _rounds(res["events"], "backward")
            own = bwd.index(f"compute backward {rank}")
            assert bwd[own - 1] == "post backward" and bwd[own + 1] == "wait backward", (name, rank, bwd)
            for p in res["senders"]:       # a peer's rows are computed after they arrived
                assert fwd.index(f"compute forward {p}") > fwd.index("wait forward"), (name, rank, fwd)
    for rank, res in enumerate(by_case["full_ring"]):
        fwd = _rounds(res["events"], "forward")
        # every step: post (pass on, receive next), compute the shard at hand, wait
        want = []
        for step in range(world):
            want += ["post forward", f"compute forward {(rank - step) % world}", "wait forward"]
        assert fwd == want, (rank, fwd)


def test_dtensor_inputs_and_torch_compile():
    case = dict(pattern="Neighborhood((3, 5), dilation=(1, 2))", grid=[8, 10], heads=2, head_dim=8, dtype="fp32")
    res = spawn(2, "dtensor_and_compile", case, timeout=150)
    pattern, problem = sf.parse_pattern(case["pattern"]), sf.Problem(grid=tuple(case["grid"]), heads=2, head_dim=8)
    from sparseforge.runtime import check

    tol = check.attention_tolerances(torch.float32, torch.float32, *check.reductions(pattern, problem), 8)
    for rank, r in enumerate(res):
        assert "exception" not in r and "crashed" not in r, f"rank {rank}: {r}"
        assert r["dtensor_out"], r
        for name, err in r["dtensor_errors"].items():
            assert err <= tol[name], (rank, name, err, tol[name])
        # the compiled function runs the same attention: equal to eager up to the
        # reassociation the compiler may do in the code around it
        for name, err in r["compile_errors"].items():
            assert err <= tol[name], (rank, name, err, tol[name])
        # bad arguments are refused by name
        words = {"exchange": "exchange", "chunk_elements": "chunk_elements", "shape": "N_local",
                 "placements": "Shard(2)", "mixed": "all be DTensors", "groups_unexpected": "groups= is for Grouped",
                 "groups_missing": "needs groups=", "groups_shape": "groups must have shape", "padding_dtype": "key_padding_mask",
                 "scale": "scale"}
        for name, word in words.items():
            assert r["argument_errors"][name] and word in r["argument_errors"][name], (name, r["argument_errors"][name])


@pytest.mark.parametrize("pattern", ["SlidingWindow(4, right=4)", "Full()"], ids=["p2p", "ring"])
def test_a_dead_rank_makes_the_others_raise_not_hang(pattern):
    """p2p: both neighbours of the dead rank name it. On the ring a survivor may instead first
    see the other survivor leave (it raised and exited): either way PeerError, quickly."""
    case = dict(pattern=pattern, grid=[30], heads=2, head_dim=8, dtype="fp32")
    res = spawn(3, "dies_mid_step", dict(case=case, victim=1, timeout=10.0), timeout=90)
    assert "crashed" in res[1] or res[1].get("exception") is None
    for rank in (0, 2):
        assert res[rank].get("raised") == "PeerError", f"rank {rank}: {res[rank]}"
        assert f"rank {rank} could not" in res[rank]["message"], res[rank]["message"]
        if pattern.startswith("SlidingWindow"):
            assert "rank 1" in res[rank]["message"], res[rank]["message"]
        assert res[rank]["seconds"] < 30, res[rank]


def test_a_silent_rank_times_out_with_the_group_timeout():
    """Rank 1 is alive but never joins the second step: the others give up after the process
    group's timeout (3 s here; ContextParallelAttention(timeout=None) takes the group's)."""
    case = dict(pattern="SlidingWindow(4, right=4)", grid=[30], heads=2, head_dim=8, dtype="fp32")
    res = spawn(3, "dies_mid_step", dict(case=case, victim=1, hang=6), timeout=90, pg_timeout=3.0)
    for rank in (0, 2):
        assert res[rank].get("raised") == "PeerError", f"rank {rank}: {res[rank]}"
        assert "within 3 s" in res[rank]["message"], res[rank]["message"]
        assert 2.5 < res[rank]["seconds"] < 20, res[rank]


# ------------------------------------------------------------------------------------
# The plan alone (no process group)
# ------------------------------------------------------------------------------------
PLAN_CASES = [
    (sf.SlidingWindow(5), sf.Problem(grid=64, heads=2)),
    (sf.Causal() & (sf.SlidingWindow(6) | sf.Sink(3)), sf.Problem(grid=61, heads=2)),
    (sf.Neighborhood((3, 5), dilation=(2, 1)), sf.Problem(grid=(12, 10), heads=2)),
    (sf.Neighborhood((3, 3, 5), dilation=(1, 2, 1)), sf.Problem(grid=(8, 6, 10), heads=2)),
    (sf.Full(), sf.Problem(grid=40, heads=2)),
    (sf.PerHead([sf.Neighborhood(3), sf.Halo(4, 1)]), sf.Problem(grid=(12, 8), heads=2)),
    (sf.PerHead([sf.Blocks(4), sf.Grid(4)]), sf.Problem(grid=(16, 8), heads=2)),
    (sf.SlidingWindow(4, 4) | sf.GlobalTokens([0, 37]), sf.Problem(grid=50, heads=2)),
]


@pytest.mark.parametrize("pattern,problem", PLAN_CASES, ids=[repr(p) for p, _ in PLAN_CASES])
@pytest.mark.parametrize("layout", sfd.LAYOUTS)
def test_plan_is_token_exact(pattern, problem, layout):
    """recv equals the dense mask's answer, with and without the pruning of count_work=False,
    and work counts the allowed pairs of each rank's queries exactly."""
    mask = sf.dense_mask(pattern, problem)
    for world in (2, 3, 4):
        for count_work in (True, False):
            plan = sfd.plan_exchange(pattern, problem, world, layout=layout, count_work=count_work)
            want = sfd.brute_force_recv(pattern, problem, plan)
            for r in range(world):
                for p in range(world):
                    assert torch.equal(plan.recv[r][p], want[r][p]), (world, count_work, r, p)
            if count_work:
                assert list(plan.work) == [int(mask[:, plan.tokens[r]].sum()) for r in range(world)]
            assert torch.equal(torch.cat(plan.tokens).sort().values, torch.arange(problem.tokens))


@pytest.mark.parametrize("split", [(2, 2), (1, 4), (4, 1)])
def test_split_plan_is_token_exact(split):
    """Cutting the two slowest dimensions: recv equals the dense mask's answer."""
    pattern, problem = sf.Neighborhood((3, 3, 5), dilation=(1, 2, 1)), sf.Problem(grid=(8, 6, 10), heads=2)
    plan = sfd.plan_exchange(pattern, problem, 4, split=split)
    want = sfd.brute_force_recv(pattern, problem, plan)
    assert all(torch.equal(plan.recv[r][p], want[r][p]) for r in range(4) for p in range(4))
    assert torch.equal(torch.cat(plan.tokens).sort().values, torch.arange(problem.tokens))
    assert all(torch.equal(t, t.sort().values) for t in plan.tokens)


def test_a_split_in_two_dimensions_sends_thinner_halos():
    """A 16x16x8 grid under a 3x3x3 neighborhood over 4 ranks: four slabs along dimension 0
    send 3 boundaries x 2 directions x 128 rows; a 2x2 split sends 2 x 2 x 128 rows plus the
    corner columns."""
    problem = sf.Problem(grid=(16, 16, 8), heads=1)
    slabs = sfd.plan_exchange(sf.Neighborhood(3), problem, 4)
    squares = sfd.plan_exchange(sf.Neighborhood(3), problem, 4, split=(2, 2))
    assert sum(slabs.rows_sent(r) for r in range(4)) == 3 * 2 * 16 * 8
    assert sum(squares.rows_sent(r) for r in range(4)) == 2 * 2 * 16 * 8 + 4 * 8


def test_literal_halo_1d():
    """16 tokens, SlidingWindow(2, right=1), 2 ranks: rank 1 needs tokens 6 and 7, rank 0 token 8."""
    plan = sfd.plan_exchange(sf.SlidingWindow(2, right=1), sf.Problem(grid=16, heads=1, head_dim=4,
                                                                      dtype=torch.float32), 2)
    assert plan.recv[1][0].tolist() == [6, 7] and plan.recv[0][1].tolist() == [8]
    assert plan.bytes_sent(0) == 2 * 1 * 1 * 2 * 4 * 4  # 2 rows x B x kv_heads x (K, V) x D x fp32


def test_ring_hops_and_bytes_by_hand():
    """4 ranks of 8 tokens. Full: every shard goes 3 hops; each rank passes on 3 shards and is
    the last hop of 1. Causal: rank r's shard goes 3 - r hops (to the last rank)."""
    problem = sf.Problem(grid=32, heads=1, kv_heads=1, head_dim=4, dtype=torch.float32)
    row = 1 * 1 * 2 * 4 * 4                                          # B x KVH x (K, V) x D x fp32
    acc = row                                                         # the dK/dV sum travels in fp32 too
    full = sfd.plan_exchange(sf.Full(), problem, 4)
    assert [full.ring_hops(o) for o in range(4)] == [3, 3, 3, 3]
    assert all(full.ring_rows(r) == (24, 8) for r in range(4))
    assert full.bytes_sent(0, exchange="ring") == 24 * row
    assert full.bytes_sent(0, exchange="ring", direction="backward") == 24 * (row + acc) + 8 * acc
    causal = sfd.plan_exchange(sf.Causal(), problem, 4)
    assert [causal.ring_hops(o) for o in range(4)] == [3, 2, 1, 0]
    # rank 1 passes on its own shard and rank 0's; rank 3 passes nothing and ends 3 journeys
    assert causal.ring_rows(1) == (16, 0) and causal.ring_rows(3) == (0, 24)
    assert sfd.choose_exchange(full) == sfd.choose_exchange(causal) == "ring"
    window = sfd.plan_exchange(sf.SlidingWindow(2, right=2), problem, 4)
    assert [window.ring_hops(o) for o in range(4)] == [1, 3, 3, 3]  # a shard's left halo is 3 hops away
    assert sfd.choose_exchange(window) == "p2p"
    with pytest.raises(ValueError, match="exchange"):
        full.bytes_sent(0, exchange="allgather")


def test_shard_and_unshard_round_trip():
    plan = sfd.plan_exchange(sf.Neighborhood(3), sf.Problem(grid=(9, 4), heads=1), 4, layout="zigzag")
    x = torch.randn(1, 1, 36, 2)
    assert torch.equal(plan.unshard([plan.shard(x, r) for r in range(4)]), x)
    # 9 rows in 8 runs of (2, 1, 1, 1, 1, 1, 1, 1) rows; rank r holds runs r and 7 - r
    assert [len(t) for t in plan.tokens] == [12, 8, 8, 8]
    assert plan.tokens[1].tolist() == list(range(8, 12)) + list(range(28, 32))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="world_size"):
        sfd.plan_exchange(sf.Full(), sf.Problem(grid=8), 0)
    with pytest.raises(ValueError, match="layout"):
        sfd.plan_exchange(sf.Full(), sf.Problem(grid=8), 2, layout="ring")
    with pytest.raises(ValueError, match="extent"):
        sfd.plan_exchange(sf.Full(), sf.Problem(grid=(3, 8)), 4)
    with pytest.raises(ValueError, match="split"):
        sfd.plan_exchange(sf.Full(), sf.Problem(grid=(8, 8)), 4, split=(2, 3))
    with pytest.raises(ValueError, match="zigzag"):
        sfd.plan_exchange(sf.Full(), sf.Problem(grid=(8, 8)), 4, layout="zigzag", split=(2, 2))


# ------------------------------------------------------------------------------------
# benchmarks/context_parallel_bytes.py, on a small case checked by hand
# ------------------------------------------------------------------------------------
def test_bytes_benchmark_counts_by_hand():
    import importlib.util
    import pathlib

    script = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "context_parallel_bytes.py"
    spec = importlib.util.spec_from_file_location("context_parallel_bytes_bench", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    setup = dict(bench.SETUP, world_size=4)
    # 4,096 tokens, causal window 256, 4 ranks of 1,024: each rank but the first receives 256 rows
    case = bench.count("small", sf.Causal() & sf.SlidingWindow(256), (4096,), 8, setup)
    row = 1 * 8 * 2 * 128 * 2  # batch x kv_heads x (K, V) x head_dim x bf16
    assert case["token_row_bytes"] == row
    assert [r["ours_forward"] for r in case["ranks"]] == [256 * row] * 3 + [0]
    assert [r["ours_backward"] for r in case["ranks"]] == [0] + [256 * row] * 3
    assert all(r["allgather_forward"] == 3 * 1024 * row for r in case["ranks"])
    assert all(r["ring_backward"] == (3 * 1024 + 4 * 1024) * row for r in case["ranks"])
    # all-gather: 4 ranks x 3,072 rows each way; ours: 3 x 256 each way -> 16x
    assert "all-gather / ours = 16.0x" in bench.table(case)
