"""sparseforge.bench.static_report: FlexAttention's templates rendered and compiled for sm_90
on the CPU next to ours, on one tiny problem end to end, with every count checked against
brute force from ``sf.dense_mask`` (our fwd and dQ over the forward schedule's tiles, our dK/dV
over its own schedule's tiles, walked as its programs walk them); our dK/dV kernel's nested
loops under GQA; the exact block counters against the dense mask on a few patterns (no
compiles)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import sparseforge as sf
from sparseforge.bench import static_report as sr
from sparseforge.backends.triton import TritonKernels
from sparseforge.bench.cases import FLEX, Case, Shape
from sparseforge.codegen.config import default_config
from sparseforge.lower import build_schedule


def _dense_block_counts(mask: torch.Tensor, block: int) -> np.ndarray:
    """[H, nb, nb] allowed pairs per block, straight from a dense [H, N, N] mask."""
    h, n, _ = mask.shape
    nb = -(-n // block)
    m = torch.nn.functional.pad(mask, (0, nb * block - n, 0, nb * block - n))
    return m.reshape(h, nb, block, nb, block).sum(dim=(2, 4)).numpy()


def _flex_loop_iterations(counts: np.ndarray, n: int, rows: int, step: int, transpose: bool) -> dict:
    """FlexAttention's partial/full loop trip counts, program by program."""
    block = sr.FLEX_BLOCK
    out = dict(partial=0, full=0)
    for c in counts:
        c = c.T if transpose else c
        for p in range(-(-n // rows)):
            r = p * rows // block
            for name, m in (("partial", (c[r] > 0) & (c[r] < block * block)), ("full", c[r] == block * block)):
                out[name] += min(int(m.sum()) * (block // step), -(-n // step))
    return out


def _tile_classes(mask: torch.Tensor, q_tile: torch.Tensor, k_tile: torch.Tensor) -> tuple[bool, bool]:
    """(visited, FULL) of one tile pair of one head, from the dense [N, N] mask of that head
    and the pair's token rows (-1: padding; FULL needs no padding on either side)."""
    sub = mask[q_tile.clamp(min=0)][:, k_tile.clamp(min=0)] & (q_tile >= 0)[:, None] & (k_tile >= 0)[None, :]
    return bool(sub.any()), bool(sub.all()) and bool((q_tile >= 0).all() and (k_tile >= 0).all())


def _brute_force_iterations(mask: torch.Tensor, geometry, kernel: str, kv_heads: int) -> dict:
    """FULL and PARTIAL tile-loop iterations of our kernel ``kernel``, its programs walked as
    the kernel walks them over the tiles of ``geometry``: fwd/dQ, a program per (query head,
    query tile) over the key tiles; dK/dV, a program per (key/value head, key tile), for each
    query head of its group over the query tiles."""
    qt, kt = torch.from_numpy(geometry.token_table("q")).long(), torch.from_numpy(geometry.token_table("k")).long()
    heads = mask.shape[0]
    group = heads // kv_heads
    out = dict(full=0, partial=0)

    def visit(h, a, b):
        visited, full = _tile_classes(mask[h], qt[a], kt[b])
        if visited:
            out["full" if full else "partial"] += 1

    if kernel == "bwd_dkdv":
        for kvh in range(kv_heads):
            for b in range(kt.shape[0]):
                for g in range(group):
                    for a in range(qt.shape[0]):
                        visit(kvh * group + g, a, b)
    else:
        for h in range(heads):
            for a in range(qt.shape[0]):
                for b in range(kt.shape[0]):
                    visit(h, a, b)
    return out


@pytest.mark.parametrize("pattern, grid, heads", [
    (sf.Neighborhood(5), (20, 13), 2),
    (sf.Neighborhood((3, 5, 4), dilation=(1, 2, 1)), (6, 10, 12), 1),
    (sf.Neighborhood(40, dilation=8), (1000,), 1),
    (sf.Causal() & sf.SlidingWindow(100), (1000,), 1),
    (sf.StridedShards(32, 4, 4), (1000,), 4),
    (sf.PerHead([sf.Blocks(8), sf.Grid(4)]), (32, 32), 2),
    (sf.Halo(8, 3), (32, 24), 1),
])
def test_block_counts_and_mask_mod_match_the_dense_mask(pattern, grid, heads):
    problem = sf.Problem(grid=grid, heads=heads, head_dim=64, dtype=torch.bfloat16)
    mask = sf.dense_mask(pattern, problem)
    want = _dense_block_counts(mask, sr.FLEX_BLOCK)
    counts = sr.flex_block_counts(pattern, problem)
    reps, weights = sr._head_groups(pattern, problem)
    assert sum(weights) == heads
    for c, h in zip(counts.counts, reps):
        assert np.array_equal(c, want[h])
    assert counts.allowed_pairs == int(mask.sum())
    assert counts.visited_blocks == int((want > 0).sum())
    assert counts.full_blocks == int((want == sr.FLEX_BLOCK ** 2).sum())
    assert sr.check_mask_mod(pattern, problem)


def test_the_long_dimension_path_counts_exactly(monkeypatch):
    monkeypatch.setattr(sr, "PREFIX_TABLE_LIMIT", 8)   # per-query key runs instead of a prefix table
    pattern, problem = sf.Neighborhood(9, dilation=2, stride=4), sf.Problem(grid=(700,), heads=1, head_dim=64)
    assert np.array_equal(sr.flex_block_counts(pattern, problem).counts[0],
                          _dense_block_counts(sf.dense_mask(pattern, problem), sr.FLEX_BLOCK)[0])


def test_mask_mod_check_catches_a_wrong_mask():
    problem = sf.Problem(grid=(16, 16), heads=1, head_dim=64)
    ops = sr._Ops()
    assert sr.check_mask_mod(sf.Neighborhood(5), problem)
    # the flex mask of one pattern is not the dense mask of another
    h, m, n = torch.arange(1)[:, None, None], torch.arange(256)[None, :, None], torch.arange(256)[None, None, :]
    other = sr.mask_mod_expr(ops, sf.Neighborhood(3), problem, h, m, n)
    assert not bool((other == sf.dense_mask(sf.Neighborhood(5), problem)).all())


def test_flex_kernel_is_torch_template_with_inlined_mask_mod():
    problem = sf.Problem(grid=(16, 16), heads=2, head_dim=64, dtype=torch.bfloat16)
    config = sr.flex_default_config(64, torch.bfloat16)
    assert (config.fwd_block_m, config.fwd_block_n, config.fwd_warps) == (128, 128, 4)  # H100 bf16 d64
    src, sig, warps, stages = sr.flex_kernel_source("bwd", sf.Neighborhood(5), problem, 1, config)
    assert "def triton_flex_attention_backward(arg_Q, arg_K" in src and "def bwd_dkdv_block_mn(" in src
    assert "mask_mod_output = tmp" in src and "{{" not in src and "{%" not in src
    assert list(sig)[-1] == "out_ptr0" and sig["arg_Q_IDX"] == "*i32" and sig["arg_Q"] == "*bf16"
    assert (warps, stages) == (config.bwd_warps, config.bwd_stages)


def test_report_of_a_tiny_problem_end_to_end(monkeypatch):
    """One tiny 1-D problem with FULL and PARTIAL tiles on both sides, through ``run``: 5 sm_90
    compiles."""
    pattern, shape = sf.Neighborhood(320), Shape(1, 2, (512,), 32)
    problem = shape.problem(torch.bfloat16)
    case = Case("T1", "T1", "tiny", pattern, shape, (FLEX,), pattern, shape)
    monkeypatch.setattr(sr, "static_cases", lambda only=None: [case])
    result = sr.run()
    meta, (r,) = result["meta"], result["results"]
    assert meta["device"] == "static: AOT sm_90 on CPU" and meta["flex_source"] == "torch template rendered"
    assert meta["versions"]["torch"] == torch.__version__ and meta["summary"]["problems"] == 1
    mask = sf.dense_mask(pattern, problem)
    allowed = int(mask.sum())
    assert r["allowed_pairs"] == allowed and r["flex_mask_mod_check"]["equal"]

    # FlexAttention's blocks and loop trips against brute force from the dense mask
    blocks = _dense_block_counts(mask, sr.FLEX_BLOCK)
    flex = r["flex"]
    assert flex["visited_blocks"] == int((blocks > 0).sum()) > flex["full_blocks"] == int(
        (blocks == sr.FLEX_BLOCK ** 2).sum()) > 0
    cfg, n = flex["config"], problem.tokens
    trips = dict(fwd=_flex_loop_iterations(blocks, n, cfg["fwd_block_m"], cfg["fwd_block_n"], False),
                 dq=_flex_loop_iterations(blocks, n, cfg["block_m2"], cfg["block_n2"], False),
                 dkdv=_flex_loop_iterations(blocks, n, cfg["block_n1"], cfg["block_m1"], True))
    for kind, parts in (("fwd", ("fwd",)), ("bwd", ("dq", "dkdv"))):
        k = flex["kernels"][kind]
        assert sorted((lp["part"], lp["role"]) for lp in k["loops"]) == sorted(
            (p, role) for p in parts for role in ("partial", "full"))
        for lp in k["loops"]:
            assert lp["iterations"] == trips[lp["part"]][lp["role"]] and lp["wgmma"] > 0
        assert k["issue_slots_per_pair"] == pytest.approx(
            sum(lp["instructions"] * lp["iterations"] for lp in k["loops"]) * k["num_warps"] / allowed)

    # ours (sm_90 defaults): every kernel's FULL and PARTIAL loops against brute force over the
    # token tables of the schedule it walks -- fwd and dQ the forward's, dK/dV its own
    config = default_config(problem, pattern, capability=90)
    ours = r["ours"]
    assert (ours["config"]["dkdv_q_tile"], ours["config"]["dkdv_k_tile"]) == (
        list(config.dkdv_q_tile), list(config.dkdv_k_tile)) != (ours["config"]["q_tile"], ours["config"]["k_tile"])
    assert not ours["dkdv"]["shared_tiling"]
    assert ours["config"]["bwd_dkdv"] == dict(num_warps=config.bwd_dkdv.num_warps,
                                              num_stages=config.bwd_dkdv.num_stages)
    geometry = dict(fwd=build_schedule(pattern, problem, q_tile=config.q_tile, k_tile=config.k_tile).geometry,
                    dkdv=build_schedule(pattern, problem, q_tile=config.dkdv_q_tile,
                                        k_tile=config.dkdv_k_tile).geometry)
    assert (ours["dkdv"]["block_m"], ours["dkdv"]["block_n"]) == (geometry["dkdv"].block_m, geometry["dkdv"].block_n)
    assert ours["dkdv"]["block_n"] >= 64  # keys stationary: wgmma's M on sm_90
    want = {name: _brute_force_iterations(mask, geometry["dkdv" if name == "bwd_dkdv" else "fwd"], name,
                                          problem.kv_heads) for name in ("fwd", "bwd_dq", "bwd_dkdv")}
    assert (ours["visited_tiles"], ours["full_tiles"]) == (sum(want["fwd"].values()), want["fwd"]["full"])
    assert (ours["dkdv"]["visited_tiles"], ours["dkdv"]["full_tiles"]) == (
        sum(want["bwd_dkdv"].values()), want["bwd_dkdv"]["full"])
    for name, k in ours["kernels"].items():
        assert 0 < want[name]["full"] and 0 < want[name]["partial"]   # both loops run
        assert sorted(lp["role"] for lp in k["loops"] if lp["counted"]) == ["full", "partial"]
        counted = {lp["role"]: lp["iterations"] for lp in k["loops"] if lp["counted"]}
        assert counted == want[name], name
        assert k["constexprs"]["BLOCK_M"] == k["schedule"]["block_m"]
        assert k["issue_slots_per_pair"] == pytest.approx(
            sum(lp["instructions"] * lp["iterations"] for lp in k["loops"] if lp["counted"]) * k["num_warps"] / allowed)
    dkdv_loops = ours["kernels"]["bwd_dkdv"]["loops"]
    assert all(lp["enclosing"] == ["for g in range(KV_GROUP):"] for lp in dkdv_loops)

    # the ratio and the table
    for kind in ("fwd", "bwd"):
        want = ours["issue_slots_per_pair"][kind] / flex["issue_slots_per_pair"][kind]
        assert r["ratio"][kind] == pytest.approx(want)
        assert r["ratio"][kind] > 0
    assert ours["issue_slots_per_pair"]["bwd"] == pytest.approx(
        ours["kernels"]["bwd_dq"]["issue_slots_per_pair"] + ours["kernels"]["bwd_dkdv"]["issue_slots_per_pair"])
    table = sr.markdown_table(result)
    assert "| T1 |" in table and f"{r['ratio']['fwd']:.3f}" in table


def test_dkdv_loops_nest_in_the_kv_group_and_count_every_query_head():
    """GQA (4 query heads per key/value head): the dK/dV kernel's FULL and PARTIAL loops run
    inside its loop over the group's query heads, charged the inverse tables' tiles of every
    query head (brute force, program by program); one sm_90 compile."""
    pattern = sf.Neighborhood(200)
    problem = sf.Problem(grid=(384,), heads=4, kv_heads=1, head_dim=64, dtype=torch.float16)
    config = default_config(problem, pattern, capability=90)
    tk = TritonKernels(build_schedule(pattern, problem, q_tile=config.q_tile, k_tile=config.k_tile), config=config)
    mask = sf.dense_mask(pattern, problem)
    k = sr._our_kernel(tk, "bwd_dkdv", "sm_90", int(mask.sum()))
    want = _brute_force_iterations(mask, tk.dkdv_schedule.geometry, "bwd_dkdv", problem.kv_heads)
    assert want["full"] > 0 and want["partial"] > 0
    assert sr.our_loop_iterations(tk.dkdv_schedule, "bwd_dkdv") == want
    loops = [lp for lp in k["loops"] if lp["counted"]]
    assert {lp["role"]: lp["iterations"] for lp in loops} == want
    assert all(lp["enclosing"] == ["for g in range(KV_GROUP):"] and lp["depth"] == 1 for lp in loops)
    assert k["schedule"]["walk"] == "inverse tables" and k["schedule"]["block_n"] == config.dkdv_k_tile[0]
