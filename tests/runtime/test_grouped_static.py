"""``Grouped() & static pattern`` (documents packed in one sequence under a sliding window,
windows inside image segments): the static pattern's schedule with the group ids as call data,
on the CPU executor against the float64 reference — forward, LSE and every gradient, with
padding (key_padding_mask, lengths) folded into the ids, modifiers, GQA; and the Triton
kernels' group-ids variant on the interpreter."""
from __future__ import annotations

import pytest
import torch

import sparseforge as sf
from sparseforge.runtime import check
from sparseforge.runtime.grouped import GroupedStaticAttention, split_grouped

F32 = torch.float32
CASES = [
    ("documents_window", sf.Grouped() & sf.SlidingWindow(4), (37,)),
    ("causal_documents_window", sf.Grouped(causal=True) & sf.SlidingWindow(6), (40,)),
    ("segments_neighborhood", sf.Grouped() & sf.Neighborhood(3), (7, 9)),
]


def assert_matches(pattern, problem, ids, results: dict, lse, ref_lse) -> int:
    """Every tensor of ``results`` (name -> (got, float64 want); out, dq, dk, dv) finite and
    within its row tolerance, and the LSE too (tolerances from the reductions under ``ids``);
    returns the keys a query sees at most."""
    keys, queries = check.reductions(pattern, problem, groups=ids)
    tol = check.attention_tolerances(F32, F32, keys, queries, 16)
    for name, (got, want) in results.items():
        assert torch.isfinite(got).all(), name
        err = check.row_error(got, want)
        assert err <= tol[name], f"{name}: {err:.2e} > {tol[name]:.2e}"
    assert check.lse_error(lse, ref_lse) <= tol["lse"]
    return keys


def run(pattern, grid, *, padding=None, mods=(), seed=0, heads=4, kv_heads=2):
    gen = torch.Generator().manual_seed(seed)
    problem = sf.Problem(grid=grid, heads=heads, kv_heads=kv_heads, head_dim=16, dtype=F32)
    attn = sf.compile(pattern, problem, backend="cpu", modifiers=mods)
    assert isinstance(attn, GroupedStaticAttention)
    n = problem.tokens
    ids = torch.randint(-1, 3, (2, n), generator=gen)
    q = torch.randn(2, heads, n, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, n, 16, generator=gen, requires_grad=True) for _ in range(2))
    padding = padding or {}
    out, lse = attn(q, k, v, groups=ids, return_lse=True, modifiers=mods or None, **padding)
    dout = torch.randn(out.shape, generator=gen)
    out.backward(dout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = sf.reference_attention(*leaves, pattern, problem, groups=ids, return_lse=True, modifiers=mods,
                                          **padding)
    ref.backward(dout.double())
    assert_matches(pattern, problem, ids, dict(out=(out, ref), dq=(q.grad, leaves[0].grad), dk=(k.grad, leaves[1].grad),
                                               dv=(v.grad, leaves[2].grad)), lse, ref_lse)
    assert (out[(ids < 0)[:, None, :, None].expand_as(out)] == 0).all()   # no group: zeros
    return attn


@pytest.mark.parametrize("name,pattern,grid", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(name, pattern, grid):
    run(pattern, grid)


@pytest.mark.parametrize("padding", [dict(lengths=[30, 37], padding_side="left"), "mask"], ids=["lengths", "mask"])
def test_padding_folds_into_the_ids(padding):
    pattern, grid = CASES[0][1], CASES[0][2]
    if padding == "mask":
        padding = dict(key_padding_mask=torch.rand(2, 37, generator=torch.Generator().manual_seed(4)) > 0.3)
    run(pattern, grid, padding=padding)


def test_with_modifiers():
    run(CASES[1][1], CASES[1][2], mods=(sf.Softcap(3.0), sf.Sinks(torch.randn(4))))


def test_split_and_refusals():
    assert split_grouped(sf.Grouped() & sf.SlidingWindow(4)) == (sf.Grouped(), sf.SlidingWindow(4))
    grouped, static = split_grouped(sf.Grouped(causal=True) & sf.SlidingWindow(4))
    assert static == sf.SlidingWindow(4) & sf.Causal()
    assert split_grouped(sf.Grouped() & sf.Routed((2,), 1)) is None and split_grouped(sf.SlidingWindow(2)) is None
    problem = sf.Problem(grid=16, heads=2, head_dim=16, dtype=F32)
    attn = sf.compile(sf.Grouped() & sf.SlidingWindow(4), problem, backend="cpu")
    q = torch.randn(1, 2, 16, 16)
    with pytest.raises(NotImplementedError, match="per-head group ids"):
        attn(q, q, q, groups=torch.zeros(1, 2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"groups must have shape \[B=1, N=16\]"):
        attn(q, q, q, groups=torch.zeros(1, 15, dtype=torch.long))


@pytest.mark.parametrize("name,pattern,grid", CASES, ids=[c[0] for c in CASES])
def test_triton_kernels_take_group_ids(name, pattern, grid):
    """The interpreter runs the static kernels' group-ids variant: FULL and PARTIAL tiles,
    forward and every gradient, with padding and sinks; NaN in padded tokens never read."""
    gen = torch.Generator().manual_seed(8)
    heads = 2
    problem = sf.Problem(grid=grid, heads=heads, kv_heads=1, head_dim=16, dtype=F32)
    mods = (sf.Sinks(torch.randn(heads, generator=gen)),)
    attn = sf.compile(pattern, problem, backend="interpret", modifiers=mods, q_tile=(4,) * len(grid),
                      k_tile=(4,) * len(grid))
    n = problem.tokens
    ids = torch.randint(-1, 3, (2, n), generator=gen)
    real = torch.rand(2, n, generator=gen) > 0.2
    q = torch.randn(2, heads, n, 16, generator=gen)
    k, v = (torch.randn(2, 1, n, 16, generator=gen) for _ in range(2))
    for t in (q, k, v):
        t[~real[:, None, :, None].expand_as(t)] = float("nan")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attn(*leaves, groups=ids, key_padding_mask=real, modifiers=mods, return_lse=True)
    dout = torch.randn(out.shape, generator=gen)
    out.backward(dout)
    clean = [torch.where(real[:, None, :, None], t, 0.0).double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = sf.reference_attention(*clean, pattern, problem, groups=ids, key_padding_mask=real, modifiers=mods,
                                          return_lse=True)
    ref.backward(dout.double())
    assert_matches(pattern, problem, ids, dict(out=(out, ref), dq=(leaves[0].grad, clean[0].grad),
                                               dk=(leaves[1].grad, clean[1].grad), dv=(leaves[2].grad, clean[2].grad)),
                   lse, ref_lse)


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
def test_grouped_alone_takes_position_free_modifiers(backend):
    """Softcap, sinks and a per-head scale on the segment kernels (Grouped alone): forward, LSE
    and the gradients of q, k, v and every modifier tensor against float64."""
    gen = torch.Generator().manual_seed(9)
    heads, n = 2, 30
    problem = sf.Problem(grid=n, heads=heads, head_dim=16, dtype=F32)
    sinks = torch.randn(heads, generator=gen)
    mods = (sf.Softcap(2.0), sf.Sinks(sinks))
    attn = sf.compile(sf.Grouped(causal=True), problem, backend=backend, modifiers=mods, head_scale=True)
    ids = torch.randint(-1, 3, (2, n), generator=gen)
    q, k, v = (torch.randn(2, heads, n, 16, generator=gen, requires_grad=True) for _ in range(3))
    scale = (0.2 + 0.2 * torch.rand(heads, generator=gen)).requires_grad_()
    sink_leaf = sinks.clone().requires_grad_()
    call_mods = (sf.Softcap(2.0), sf.Sinks(sink_leaf))
    out, lse = attn(q, k, v, groups=ids, modifiers=call_mods, scale=scale, return_lse=True)
    dout = torch.randn(out.shape, generator=gen)
    out.backward(dout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, scale, sinks)]
    ref, ref_lse = sf.reference_attention(*leaves[:3], sf.Grouped(causal=True), problem, groups=ids, scale=leaves[3],
                                          modifiers=(sf.Softcap(2.0), sf.Sinks(leaves[4])), return_lse=True)
    ref.backward(dout.double())
    keys = assert_matches(sf.Grouped(causal=True), problem, ids, dict(
        out=(out, ref), dq=(q.grad, leaves[0].grad), dk=(k.grad, leaves[1].grad), dv=(v.grad, leaves[2].grad)),
        lse, ref_lse)
    for got, want in ((scale.grad, leaves[3].grad), (sink_leaf.grad, leaves[4].grad)):
        t = check.tolerance(F32, 2 * n * keys) * want.abs().max().item()
        assert (got.double() - want).abs().max().item() <= t and want.abs().max().item() > 10 * t
