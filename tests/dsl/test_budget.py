"""The memory budget (issue 16, sizes): dense masks, statistics and tile schedules of problems
that would not fit are refused up front with one clear message; what fits is computed in
bounded memory and unchanged."""
from __future__ import annotations


import pytest
import torch

import sparseforge as sf
from sparseforge import envvars
from sparseforge.dsl import budget, semantics
from sparseforge.dsl.budget import MemoryBudgetError
from sparseforge.lower.schedule import build_schedule


@pytest.fixture(autouse=True)
def default_budget(monkeypatch):
    monkeypatch.delenv("SPARSEFORGE_MEMORY_BUDGET", raising=False)


@pytest.mark.parametrize("raw,expected", [
    ("16GiB", 16 << 30), ("512MiB", 512 << 20), ("1.5G", int(1.5 * (1 << 30))), ("2000", 2000), ("2 TB", 2 * 10 ** 12),
    ("unlimited", -1), ("", None),
])
def test_budget_variable_sizes(monkeypatch, raw, expected):
    monkeypatch.setenv("SPARSEFORGE_MEMORY_BUDGET", raw)
    assert envvars.memory_budget() == expected


@pytest.mark.parametrize("raw", ["lots", "-1GiB", "0", "12 parsecs", "1e9"])
def test_bad_budget_variable_names_it(monkeypatch, raw):
    monkeypatch.setenv("SPARSEFORGE_MEMORY_BUDGET", raw)
    with pytest.raises(ValueError, match=f"SPARSEFORGE_MEMORY_BUDGET={raw!r} must be a positive size"):
        envvars.memory_budget()


def test_default_budget_is_a_share_of_the_ram():
    limit, source = budget.budget()
    assert limit == int(budget.physical_memory() * budget.DEFAULT_FRACTION)
    assert "of this machine's" in source and "SPARSEFORGE_MEMORY_BUDGET" in source


@pytest.mark.parametrize("function", [sf.dense_mask, sf.describe])
def test_huge_grid_is_refused_before_allocating(function):
    with pytest.raises(MemoryBudgetError) as info:
        function(sf.Full(), sf.Problem(grid=(100000, 100000)))
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    unit = "PiB" if function is sf.dense_mask else "GiB"   # [1, N, N] kept vs one row at a time
    for needle in (function.__name__, "10000000000 queries", "memory budget", "SPARSEFORGE_MEMORY_BUDGET", unit):
        assert needle in message, (needle, message)


def test_budget_variable_moves_the_limit(monkeypatch):
    problem = sf.Problem(grid=(64, 64), heads=2)
    monkeypatch.setenv("SPARSEFORGE_MEMORY_BUDGET", "4MiB")
    with pytest.raises(MemoryBudgetError, match=r"SPARSEFORGE_MEMORY_BUDGET=4MiB"):
        sf.describe(sf.Neighborhood(3), problem)
    monkeypatch.setenv("SPARSEFORGE_MEMORY_BUDGET", "unlimited")
    assert sf.describe(sf.Neighborhood(3), problem).tokens == 4096


def test_routing_layouts_count(monkeypatch):
    """Routed keeps an R x R layout per head: counted, and named in the message."""
    problem = sf.Problem(grid=(256, 256), heads=4, head_dim=4)
    assert budget.routing_bytes(sf.Routed(1, 1, per_head=True), problem) == 4 * 65536 ** 2 * budget.ROUTING_PAIR_BYTES
    assert budget.routing_bytes(sf.Routed(1, 1) | sf.Causal(), problem) == 65536 ** 2 * budget.ROUTING_PAIR_BYTES
    q = torch.zeros(1, 4, 1, 4).expand(1, 4, 65536, 4)
    with pytest.raises(MemoryBudgetError, match="of routing"):
        sf.describe(sf.Routed(1, 1, per_head=True), problem, q=q, k=q)


PATTERNS = [sf.Neighborhood(3, dilation=2), sf.Causal() & (sf.SlidingWindow(3) | sf.Sink(2)),
            sf.PerHead([sf.Blocks(2), sf.Full(), sf.Blocks(2)]), sf.StridedShards(2, 1, 2)]


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_dense_mask_in_row_chunks_is_exact(monkeypatch, pattern):
    """dense_mask evaluates a chunk of rows at a time (bounded temporaries): same mask."""
    problem = sf.Problem(grid=(6, 8), heads=3)
    ctx = semantics.make_context(pattern, problem)
    whole = semantics.mask_rows(pattern, ctx, torch.arange(48))[0]
    monkeypatch.setattr(semantics, "CHUNK_ELEMENTS", 3 * 48 * 5)      # 5 rows per chunk: 10 chunks
    got = sf.dense_mask(pattern, problem)
    assert got.shape == (3, 48, 48) and torch.equal(got, whole)


def test_dense_mask_stores_a_head_shared_mask_once():
    m = sf.dense_mask(sf.Neighborhood(3), sf.Problem(grid=(8, 8), heads=16))
    assert m.shape == (16, 64, 64) and m.stride(0) == 0


def test_dense_mask_counts_only_the_heads_it_stores(monkeypatch):
    """A head-independent mask is one [N, N]; a per-head one is [H, N, N]: the check says so."""
    problem = sf.Problem(grid=(64, 64), heads=16)
    # 16 MiB per [N, N] kept, plus 1.5 GiB for a chunk of 64M mask entries being evaluated
    assert budget.mask_rows_bytes(16, 4096, 1, semantics.CHUNK_ELEMENTS) < 1552 << 20
    monkeypatch.setenv("SPARSEFORGE_MEMORY_BUDGET", "1700MiB")
    assert sf.dense_mask(sf.Neighborhood(3), problem).shape == (16, 4096, 4096)
    with pytest.raises(MemoryBudgetError, match=r"dense_mask would need .*16 heads x 4096 queries x 4096 keys "
                                                r"\(256\.0 MiB\)"):
        sf.dense_mask(sf.PerHead([sf.Neighborhood(3), sf.Full()] * 8), problem)


def test_schedule_of_a_huge_grid_is_refused_before_allocating():
    with pytest.raises(MemoryBudgetError) as info:
        build_schedule(sf.Full(), sf.Problem(grid=(100000000,), head_dim=64, dtype="fp16"))
    message = str(info.value)
    for needle in ("the tile schedule", "grid (100000000,)", "query x", "key tiles", "TiB", "larger tiles"):
        assert needle in message, (needle, message)


def test_schedule_tables_count_the_visited_tiles(monkeypatch):
    """The CSR is checked on the tiles really visited: a dense pattern is refused where a sparse
    one on the same tiles fits."""
    problem = sf.Problem(grid=(65536,), head_dim=64, dtype="fp16")
    monkeypatch.setenv("SPARSEFORGE_MEMORY_BUDGET", "40MiB")
    with pytest.raises(MemoryBudgetError, match=r"tile schedule's tables.*visited tiles"):
        build_schedule(sf.Full(), problem, q_tile=(128,), k_tile=(32,))
    s = build_schedule(sf.SlidingWindow(64), problem, q_tile=(128,), k_tile=(32,))
    assert 0 < s.visited_tiles < s.geometry.n_q_tiles * s.geometry.n_k_tiles


def test_per_head_estimate_follows_the_costliest_family():
    from sparseforge.lower.budget import classify_pair_bytes

    assert classify_pair_bytes(sf.Neighborhood(3)) < classify_pair_bytes(sf.Causal()) \
        < classify_pair_bytes(sf.StridedShards(2, 1, 2))
    assert classify_pair_bytes(sf.Neighborhood(3) | sf.Causal()) > classify_pair_bytes(sf.Causal())
