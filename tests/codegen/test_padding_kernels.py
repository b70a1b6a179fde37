"""Key padding masks in the generated kernels (interpreter, through ``sf.compile``): padded
tokens are never read — NaN stored in their q, k and v reaches no output and no gradient —
padded query rows output zeros with LSE -inf, and everything else matches the float64
reference, with and without score modifiers, on FULL-only and FULL + PARTIAL schedules."""
from __future__ import annotations

import pytest
import torch

import sparseforge as sf
from sparseforge.dsl.modifiers import relative_position_bias_shape
from sparseforge.runtime import check

CASES = [
    (sf.Causal() & sf.SlidingWindow(6), (40,), 2, 1),
    (sf.Neighborhood(3, dilation=2), (9, 10), 2, 2),
    (sf.Blocks(4), (8, 8), 2, 1),  # every visited tile FULL: the padding still masks
]


@pytest.mark.parametrize("with_modifiers", [False, True], ids=["plain", "modifiers"])
@pytest.mark.parametrize("pattern,grid,heads,kv_heads", CASES, ids=[repr(c[0]) for c in CASES])
def test_key_padding_mask_in_kernels(pattern, grid, heads, kv_heads, with_modifiers):
    gen = torch.Generator().manual_seed(0)
    problem = sf.Problem(grid=grid, heads=heads, kv_heads=kv_heads, head_dim=16, dtype=torch.float32)
    mods = (sf.Softcap(2.0), sf.Sinks(torch.randn(heads, generator=gen))) if with_modifiers else ()
    attn = sf.compile(pattern, problem, backend="interpret", modifiers=mods)
    n = problem.tokens
    real = torch.rand(2, n, generator=gen) > 0.3
    real[1, :] = True  # one sample unpadded
    q = torch.randn(2, heads, n, 16, generator=gen)
    k, v = (torch.randn(2, kv_heads, n, 16, generator=gen) for _ in range(2))
    for t in (q, k, v):
        t[~real[:, None, :, None].expand_as(t)] = float("nan")  # padding holds garbage
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attn(*leaves, return_lse=True, modifiers=mods or None, key_padding_mask=real)
    dout = torch.randn(out.shape, generator=gen)
    out.backward(dout)

    clean = [torch.where(real[:, None, :, None], t, 0.0).double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = sf.reference_attention(*clean, pattern, problem, return_lse=True, modifiers=mods,
                                          key_padding_mask=real)
    ref.backward(dout.double())
    assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in leaves)
    assert torch.all(out[~real[:, None, :, None].expand_as(out)] == 0)
    assert torch.all(lse[~real[:, None, :].expand_as(lse)] == float("-inf"))
    keys, queries = check.reductions(pattern, problem)
    tol = check.attention_tolerances(torch.float32, torch.float32, keys, queries, 16)
    for name, got, want in (("out", out, ref), ("dq", leaves[0].grad, clean[0].grad),
                            ("dk", leaves[1].grad, clean[1].grad), ("dv", leaves[2].grad, clean[2].grad)):
        err = check.row_error(got, want)
        assert err <= tol[name], f"{name}: largest row error {err:.2e} above {tol[name]:.2e}"
    assert check.lse_error(lse, ref_lse) <= tol["lse"]


@pytest.mark.parametrize("pattern,problem", [
    (sf.Neighborhood(7, dilation=2), sf.Problem(grid=(56, 56), heads=8, head_dim=64, dtype=torch.bfloat16)),
    (sf.Causal() & sf.SlidingWindow(1024), sf.Problem(grid=8192, heads=8, head_dim=128, dtype=torch.bfloat16)),
], ids=["na2d", "causal_window"])
@pytest.mark.parametrize("variant", ["mask", "groups"])
def test_sm90_padding_kernels_stay_wgmma_only(pattern, problem, variant):
    """The padding variant (a mask load per key tile, FULL tiles masked too) and the group-ids
    variant (``Grouped & pattern``: an id load per row, a compare per pair) compile for sm_90
    on wgmma only and spill-free, and with the pinned Triton (3.9) unserialized: the older
    ptxas of Triton 3.6 serializes its 2-stage dK/dV (C7515)."""
    from sparseforge.backends.triton import TritonKernels
    from ._spills import allowed_spills, triton_minor
    from sparseforge.codegen.config import default_config
    from sparseforge.lower import build_schedule

    config = default_config(problem, pattern, capability=90)
    schedule = build_schedule(pattern, problem, q_tile=config.q_tile, k_tile=config.k_tile)
    kernels = TritonKernels(schedule, config=config, padding=variant)
    for name in TritonKernels.KERNELS:
        report = kernels.aot(name, "sm_90")
        assert report.tensor_core == "wgmma", (name, report.as_dict())
        ids = f"{variant}-{'na2d' if problem.ndim == 2 else 'causal_window'}"
        assert report.spills <= allowed_spills(ids, name, "sm_90"), (name, report.as_dict())   # 3.9: none
        assert triton_minor() < (3, 9) or not report.serialized, (name, report.as_dict())


@pytest.mark.parametrize("pattern,grid,padding", [
    (sf.Causal() & sf.SlidingWindow(6), (40,), dict(lengths=[40, 23, 9, 23], padding_side="right")),
    (sf.SlidingWindow(5, 3) | sf.Sink(2), (40,), dict(lengths=[31, 40, 12, 31], padding_side="left")),
    (sf.Neighborhood(3, dilation=2), (9, 10), dict(sizes=[[9, 10], [6, 7], [6, 7], [7, 10]])),
], ids=["lengths_right", "lengths_left", "sizes"])
def test_per_sample_grids_in_kernels(pattern, grid, padding):
    """lengths=/sizes=: the samples of each distinct grid run that grid's kernels on their own
    tokens (windows clamped at their own border); padding holds NaN and is never read."""
    gen = torch.Generator().manual_seed(1)
    heads, kv_heads = 2, 1
    problem = sf.Problem(grid=grid, heads=heads, kv_heads=kv_heads, head_dim=16, dtype=torch.float32)
    mods = (sf.Sinks(torch.randn(heads, generator=gen)),)
    attn = sf.compile(pattern, problem, backend="interpret", modifiers=mods)
    n, b = problem.tokens, 4
    q = torch.randn(b, heads, n, 16, generator=gen)
    k, v = (torch.randn(b, kv_heads, n, 16, generator=gen) for _ in range(2))
    ref_out, ref_lse = sf.reference_attention(q.double(), k.double(), v.double(), pattern, problem, return_lse=True,
                                              modifiers=mods, **padding)
    real = torch.isfinite(ref_lse[:, 0])  # [B, N]: padded rows have LSE -inf
    for t in (q, k, v):
        t[~real[:, None, :, None].expand_as(t)] = float("nan")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    sink = mods[0].logits.clone().requires_grad_()
    out, lse = attn(*leaves, return_lse=True, modifiers=(sf.Sinks(sink),), **padding)
    dout = torch.randn(out.shape, generator=gen)
    out.backward(dout)

    clean = [torch.where(real[:, None, :, None], t, 0.0).double().requires_grad_() for t in (q, k, v)]
    ref_sink = mods[0].logits.double().requires_grad_()
    ref = sf.reference_attention(*clean, pattern, problem, modifiers=(sf.Sinks(ref_sink),), **padding)
    ref.backward(dout.double())
    assert torch.all(out[~real[:, None, :, None].expand_as(out)] == 0)
    keys, queries = check.reductions(pattern, problem)
    tol = check.attention_tolerances(torch.float32, torch.float32, keys, queries, 16)
    for name, got, want in (("out", out, ref), ("dq", leaves[0].grad, clean[0].grad),
                            ("dk", leaves[1].grad, clean[1].grad), ("dv", leaves[2].grad, clean[2].grad)):
        assert torch.isfinite(got).all(), name
        err = check.row_error(got, want)
        assert err <= tol[name], f"{name}: largest row error {err:.2e} above {tol[name]:.2e}"
    assert check.lse_error(lse, ref_lse) <= tol["lse"]
    rel = ((sink.grad.double() - ref_sink.grad).abs().max() / ref_sink.grad.abs().max()).item()
    assert rel < 1e-4, rel


@pytest.mark.parametrize("pattern,grid,table", [
    (sf.Neighborhood(3, dilation=2), (9, 10), "rpb"),
    (sf.Causal() & sf.SlidingWindow(6), (40,), "t5"),
], ids=["rpb", "t5"])
def test_bias_table_gradient_ignores_nan_padding(pattern, grid, table):
    """A bias table's gradient (the kernels' fixed-point sums) counts real pairs only: NaN in
    padded q, k, v reaches neither the outputs nor the table's gradient, which matches float64."""
    gen = torch.Generator().manual_seed(2)
    heads = 2
    problem = sf.Problem(grid=grid, heads=heads, kv_heads=1, head_dim=16, dtype=torch.float32)
    shape = relative_position_bias_shape(pattern, problem) if table == "rpb" else (heads, 8)
    values = torch.randn(shape, generator=gen)

    def make(t):
        return sf.RelativePositionBias(t) if table == "rpb" else sf.T5Bias(t, max_distance=12, bidirectional=False)
    attn = sf.compile(pattern, problem, backend="interpret", modifiers=(make(values),))
    n = problem.tokens
    real = torch.rand(2, n, generator=gen) > 0.25
    q = torch.randn(2, heads, n, 16, generator=gen)
    k, v = (torch.randn(2, 1, n, 16, generator=gen) for _ in range(2))
    for t in (q, k, v):
        t[~real[:, None, :, None].expand_as(t)] = float("nan")
    leaf = values.clone().requires_grad_()
    out = attn(q, k, v, modifiers=(make(leaf),), key_padding_mask=real)
    dout = torch.randn(out.shape, generator=gen)
    out.backward(dout)

    clean = [torch.where(real[:, None, :, None], t, 0.0).double() for t in (q, k, v)]
    ref_leaf = values.double().requires_grad_()
    ref = sf.reference_attention(*clean, pattern, problem, modifiers=(make(ref_leaf),), key_padding_mask=real)
    ref.backward(dout.double())
    keys, _ = check.reductions(pattern, problem)
    assert torch.isfinite(out).all() and torch.isfinite(leaf.grad).all()
    err = (leaf.grad.double() - ref_leaf.grad).abs().max().item()
    tol = check.tolerance(torch.float32, 2 * n * keys) * ref_leaf.grad.abs().max().item()
    assert err <= tol and ref_leaf.grad.abs().max().item() > 10 * tol, (err, tol)
