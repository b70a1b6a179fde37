"""SparseAttention: projections around a compiled attention, for grids and sequences."""
from __future__ import annotations

import pytest
import torch

import sparseforge as sf
from sparseforge.nn import SparseAttention

from ._common import TOL, assert_rows_close, module_reference, rel_err


def manual(module: SparseAttention, x: torch.Tensor, grid) -> torch.Tensor:
    """The module's computation written out with the float64 reference attention."""
    b, c = x.shape[0], x.shape[-1]
    n = x[0, ..., 0].numel()
    h, kvh, d = module.heads, module.kv_heads, module.head_dim
    q, k, v = (t.double() for t in module.project(x, grid))
    problem = sf.Problem(grid=grid, heads=h, head_dim=d, dtype=torch.float32, kv_heads=kvh)
    out = sf.reference_attention(q, k, v, module.pattern, problem)
    out = out.transpose(1, 2).reshape(b, n, c).float()
    return module.proj(out).reshape(x.shape)


def _x(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), requires_grad=True)


def test_image_input_grid_inferred():
    torch.manual_seed(0)
    m = SparseAttention(sf.Neighborhood(3, dilation=2), dim=32, heads=4)
    x = _x(2, 7, 9, 32)
    y = m(x)
    assert y.shape == x.shape
    assert rel_err(y, manual(m, x, (7, 9))) < TOL[torch.float32]
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert m.qkv.weight.grad is not None and m.proj.weight.grad is not None
    assert list(m._compiled) == [(2, torch.float32)]
    m(_x(1, 7, 9, 32))  # same grid: nothing new
    x6 = _x(1, 6, 6, 32)
    assert rel_err(m(x6), manual(m, x6, (6, 6))) < TOL[torch.float32]  # new grid: a schedule, not a compile
    assert len(m._compiled) == 1


def test_video_input_gqa():
    torch.manual_seed(1)
    m = SparseAttention(sf.Neighborhood((2, 3, 3)), dim=32, heads=4, kv_heads=2, qkv_bias=False)
    x = _x(1, 3, 4, 5, 32)
    assert m.qkv.bias is None
    assert rel_err(m(x), manual(m, x, (3, 4, 5))) < TOL[torch.float32]


def test_sequence_input():
    torch.manual_seed(2)
    m = SparseAttention(sf.SlidingWindow(3) | sf.Sink(1), dim=16, heads=2)
    x = _x(2, 21, 16)
    y = m(x)
    assert y.shape == x.shape
    assert rel_err(y, manual(m, x, (21,))) < TOL[torch.float32]


def test_sequence_input_with_given_grid():
    torch.manual_seed(3)
    m = SparseAttention(sf.Blocks(2), dim=16, heads=2, grid=(4, 6))
    assert list(m._compiled) == [(2, torch.float32)]  # compiled at construction (2-D grids, fp32)
    x = _x(2, 24, 16)
    assert rel_err(m(x), manual(m, x, (4, 6))) < TOL[torch.float32]
    x2 = _x(2, 4, 6, 16)
    assert m(x2).shape == x2.shape


def test_dtype_argument_and_float64_on_cpu():
    m = SparseAttention(sf.Causal(), dim=8, heads=2, dtype=torch.float64)
    assert m.qkv.weight.dtype == torch.float64
    y = m(torch.randn(1, 5, 8, dtype=torch.float64))
    assert y.dtype == torch.float64


def test_bad_arguments():
    with pytest.raises(ValueError, match="dim must be divisible by heads"):
        SparseAttention(sf.Full(), dim=10, heads=4)
    with pytest.raises(ValueError, match="kv_heads must divide heads"):
        SparseAttention(sf.Full(), dim=12, heads=4, kv_heads=3)
    with pytest.raises(TypeError, match="pattern"):
        SparseAttention("Full()", dim=8, heads=2)
    with pytest.raises(ValueError, match="backend"):
        SparseAttention(sf.Full(), dim=8, heads=2, backend="gpu")
    with pytest.raises(ValueError, match="head_dim=4"):
        SparseAttention(sf.Full(), dim=8, heads=2, grid=(4,), backend="interpret")
    m = SparseAttention(sf.Full(), dim=8, heads=2, grid=(3, 4))
    with pytest.raises(ValueError, match=r"x has 6 channels"):
        m(torch.randn(1, 3, 4, 6))
    with pytest.raises(ValueError, match=r"x has shape \(1, 4, 3, 8\).*grid=\(3, 4\)"):
        m(torch.randn(1, 4, 3, 8))
    with pytest.raises(ValueError, match=r"x must be \[B, N, C\]"):
        m(torch.randn(12, 8))


def test_torch_compile_module_fullgraph():
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(4)
    m = SparseAttention(sf.Neighborhood(3), dim=16, heads=2, grid=(5, 6))
    x = _x(2, 5, 6, 16)
    want = m(x)
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    got = cm(x)
    assert rel_err(got, want) < 1e-6
    g = torch.autograd.grad(got.sum(), x)[0]
    w = torch.autograd.grad(want.sum(), x)[0]
    assert rel_err(g, w) < 1e-6
    torch._dynamo.reset()


def test_torch_compile_fullgraph_unseen_grid_is_a_clear_error():
    import torch._dynamo

    torch._dynamo.reset()
    m = SparseAttention(sf.Neighborhood(3), dim=16, heads=2)
    with pytest.raises(Exception) as info:
        torch.compile(m, fullgraph=True, backend="aot_eager")(_x(1, 5, 6, 16))
    chain, e = [], info.value
    while e is not None and len(chain) < 10:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("give SparseAttention(grid=...) or run the module once eagerly" in c for c in chain), chain
    torch._dynamo.reset()


def test_runs_under_cpu_autocast():
    """autocast stays active inside a custom op; the executor must still compute in its
    inputs' dtype (it used to fail writing bf16 results into an fp32 buffer). Output and input
    gradient match the same module under autocast with the float64 reference attention, row
    by row within bf16's tolerance."""
    torch.manual_seed(0)
    m = sf.nn.SparseAttention(sf.Neighborhood(3), dim=32, heads=2, grid=(4, 6))
    x = _x(2, 4, 6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        want, terms = module_reference(m, x, (4, 6))
    assert y.dtype == torch.bfloat16 and want.dtype == torch.bfloat16
    assert_rows_close("y", y, want, torch.bfloat16, terms)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    (gx,), (wx,) = torch.autograd.grad(y, x, dy, retain_graph=True), torch.autograd.grad(want, x, dy)
    assert_rows_close("dx", gx, wx, torch.bfloat16, terms)
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_tiles_pass_through_to_compile():
    m = sf.nn.SparseAttention(sf.Blocks(7), dim=32, heads=2, grid=(28, 28), q_tile=(4, 8), k_tile=(4, 4))
    attn = m.attention((28, 28), torch.float32)
    assert attn.schedule.geometry.q_tile == (4, 8) and attn.schedule.geometry.k_tile == (4, 4)


@pytest.mark.parametrize("pattern, grids", [
    (sf.SlidingWindow(3, 2) | sf.Sink(1), [(20,), (33,), (47,)]),
    (sf.Neighborhood(3, dilation=2), [(6, 7), (9, 8)]),
], ids=["1d_three_lengths", "2d_two_resolutions"])
def test_torch_compile_dynamic_shapes_one_graph_no_new_ops(pattern, grids):
    """fullgraph + dynamic=True: every size runs in the one captured graph (no recompile,
    no graph break), forward and backward match the float64 reference, and the ops in
    torch.ops.sparseforge stay the fixed four."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(5)
    m = SparseAttention(pattern, dim=16, heads=2)
    m(_x(1, *grids[0], 16))  # eager once: compiles the pattern (outside the trace)
    ops_before = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("sparseforge::")}
    cm = torch.compile(m, fullgraph=True, dynamic=True, backend="aot_eager")
    for i, grid in enumerate(grids):
        x = _x(2, *grid, 16, seed=i)
        got = cm(x)
        assert rel_err(got, manual(m, x, grid)) < TOL[torch.float32]
        g = torch.autograd.grad(got.square().sum(), x)[0]
        w = torch.autograd.grad(manual(m, x, grid).square().sum(), x)[0]
        assert rel_err(g, w) < TOL[torch.float32]
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("sparseforge::")} == ops_before == {
        "sparseforge::attention", "sparseforge::attention_backward", "sparseforge::linear_attention",
        "sparseforge::linear_attention_backward"}
    torch._dynamo.reset()


# -- score modifiers as module options ------------------------------------------------------------
def manual_with_modifiers(module: SparseAttention, x: torch.Tensor, grid) -> torch.Tensor:
    """``manual`` with the module's modifiers (their parameters kept differentiable, in float64)."""
    b, c = x.shape[0], x.shape[-1]
    n = x[0, ..., 0].numel()
    q, k, v = (t.double() for t in module.project(x, grid))
    problem = sf.Problem(grid=grid, heads=module.heads, head_dim=module.head_dim, dtype=torch.float32,
                         kv_heads=module.kv_heads)
    mods = tuple(m.with_tensors(*(t.double() for t in m.tensors())) for m in module.modifiers())
    out = sf.reference_attention(q, k, v, module.pattern, problem, modifiers=mods)
    return module.proj(out.transpose(1, 2).reshape(b, n, c).float()).reshape(x.shape)


def test_modifier_options_are_parameters_that_train():
    torch.manual_seed(6)
    m = SparseAttention(sf.Blocks(4, offset=2), dim=32, heads=4, kv_heads=2, grid=(8, 7),
                        relative_position_bias=True, sinks=True, softcap=20.0)
    names = dict(m.named_parameters())
    assert names["relative_position_bias_table"].shape == (4, 7, 7) and names["sinks"].shape == (4,)
    assert 0 < m.relative_position_bias_table.abs().max() < 0.1 and (m.sinks == 0).all()   # trunc_normal, zeros
    assert "relative_position_bias=True, sinks=True, softcap=20.0" in repr(m)
    x = _x(2, 8, 7, 32)
    y = m(x)
    want = manual_with_modifiers(m, x, (8, 7))
    assert rel_err(y, want) < TOL[torch.float32]
    params = (m.relative_position_bias_table, m.sinks, m.qkv.weight)
    got = torch.autograd.grad(y.square().sum(), params)
    ref = torch.autograd.grad(want.square().sum(), params)
    for g, w in zip(got, ref):
        assert rel_err(g, w) < 1e-4 and g.abs().sum() > 0
    # a few steps of training move the modifier parameters and lower the loss
    target = torch.randn(2, 8, 7, 32, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in (m.relative_position_bias_table, m.sinks)]
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = (m(x.detach()) - target).square().mean()
        loss.backward()
        assert m.relative_position_bias_table.grad is not None and m.sinks.grad is not None
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(before[0], m.relative_position_bias_table) and not torch.equal(before[1], m.sinks)
    assert len(m._compiled) == 1


def test_modifier_option_values_and_errors():
    m = SparseAttention(sf.Neighborhood(3, dilation=2), dim=16, heads=2, grid=(7, 9), relative_position_bias="zeros")
    assert m.relative_position_bias_table.shape == (2, 5, 5) and (m.relative_position_bias_table == 0).all()
    assert m.sinks is None and m.softcap is None and m.modifiers()[0].table is m.relative_position_bias_table
    with pytest.raises(ValueError, match=r"relative_position_bias needs grid="):
        SparseAttention(sf.Blocks(4), dim=16, heads=2, relative_position_bias=True)
    with pytest.raises(ValueError, match=r"relative_position_bias must be False, True, 'trunc_normal' or 'zeros'"):
        SparseAttention(sf.Blocks(4), dim=16, heads=2, grid=(8, 8), relative_position_bias="normal")
    with pytest.raises(ValueError, match=r"has no window to measure relative positions"):
        SparseAttention(sf.Causal(), dim=16, heads=2, grid=(8,), relative_position_bias=True)
    with pytest.raises(ValueError, match=r"cap must be a finite float > 0, got -1.0"):
        SparseAttention(sf.Blocks(4), dim=16, heads=2, softcap=-1.0)
    with pytest.raises(TypeError, match=r"sinks must be a bool"):
        SparseAttention(sf.Blocks(4), dim=16, heads=2, sinks=1)


def test_torch_compile_fullgraph_module_with_modifiers():
    """A module with a relative position table, softcap and sinks: one graph, no break; the
    parameters' gradients equal eager ones."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(7)
    m = SparseAttention(sf.Neighborhood(3), dim=16, heads=2, grid=(5, 6), relative_position_bias=True, sinks=True,
                        softcap=5.0)
    x = _x(2, 5, 6, 16)
    want = m(x)
    got = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    assert rel_err(got, want) < 1e-6
    params = (m.relative_position_bias_table, m.sinks)
    for g, w in zip(torch.autograd.grad(got.sum(), params), torch.autograd.grad(want.sum(), params)):
        assert rel_err(g, w) < 1e-6
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    torch._dynamo.reset()


def test_torch_compile_dynamic_sequence_module_with_sinks_and_softcap():
    """fullgraph + dynamic=True: three sequence lengths, one graph, with sinks and softcap."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(8)
    m = SparseAttention(sf.Causal() & sf.SlidingWindow(4), dim=16, heads=2, sinks=True, softcap=10.0)
    with torch.no_grad():
        m.sinks.normal_()
    m(_x(1, 20, 16))  # eager once: compiles the pattern (outside the trace)
    cm = torch.compile(m, fullgraph=True, dynamic=True, backend="aot_eager")
    for i, n in enumerate((20, 33, 47)):
        x = _x(2, n, 16, seed=i)
        got = cm(x)
        want = manual_with_modifiers(m, x, (n,))
        assert rel_err(got, want) < TOL[torch.float32]
        g = torch.autograd.grad(got.square().sum(), m.sinks)[0]
        w = torch.autograd.grad(want.square().sum(), m.sinks)[0]
        assert rel_err(g, w) < 1e-4
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()
