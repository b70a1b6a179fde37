"""The torch.library ops: names, registry, opcheck, gradcheck and torch.compile."""
from __future__ import annotations

import re

import pytest
import torch

import sparseforge as sf
from sparseforge.runtime import compile
from sparseforge.runtime import op as op_mod

from ._common import TOL, qkv, rand, rel_err


def P(grid, heads=2, head_dim=8, kv_heads=None, dtype=torch.float32):
    return sf.Problem(grid=grid, heads=heads, head_dim=head_dim, dtype=dtype, kv_heads=kv_heads)


# -- names and registry ---------------------------------------------------------------
def test_readable_name():
    attn = compile(sf.Neighborhood(7, dilation=2), sf.Problem(grid=(56, 56), heads=8, head_dim=64,
                                                              dtype=torch.bfloat16))
    assert re.fullmatch(r"na2d_k7_d2_g56x56_h8_d64_bf16_[0-9a-f]{8}", attn.name), attn.name
    assert attn.op is getattr(torch.ops.sparseforge, attn.name)


@pytest.mark.parametrize("pattern, grid, prefix", [
    (sf.Neighborhood((3, 5), stride=(1, 2), causal=(True, False)), (9, 10), "na2d_k3x5_s1x2_c1x0_g9x10"),
    (sf.SlidingWindow(4) | sf.Sink(2), 40, "sw_l4_r0_or_sink2_g40"),
    (sf.Causal() & sf.Documents((10, 30)), 40, "causal_and_docs2_g40"),
    (sf.StridedShards(16, 2, 4, causal=False), 64, "s2_b16_l2_v4_bi_g64"),
    (sf.PerHead([sf.Blocks(4), sf.Grid(2), sf.Blocks(4)]), (8, 8), "perhead3_blocks4_grid2_g8x8"),
])
def test_names_are_sanitized(pattern, grid, prefix):
    problem = sf.Problem(grid=grid, heads=3 if "perhead" in prefix else 2, head_dim=16, dtype=torch.float16)
    name = op_mod.op_name(pattern, problem, fingerprint="0123456789abcdef")
    assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
    assert name.startswith(prefix) and name.endswith("_01234567"), name


def test_gqa_in_name_and_long_names_truncated():
    pattern = sf.PerHead([sf.Documents(tuple([1] * 8)), sf.Neighborhood(3), sf.SlidingWindow(1, 0),
                          sf.Sink(1)] + [sf.SlidingWindow(j + 1, j + 2) for j in range(4)])
    problem = P(8, heads=8, kv_heads=2)
    name = op_mod.op_name(pattern, problem, fingerprint="f" * 16)
    assert "_g8_h8_d8_fp32_kv2_ffffffff" in name and len(name) < 130, name
    assert re.fullmatch(r"[a-z][a-z0-9_]*", name)



def test_same_schedule_reuses_op_and_other_tiles_get_another():
    pattern, problem = sf.Halo(2, 1), P((6, 6))
    a = compile(pattern, problem)
    b = compile(pattern, problem, backend="cpu")
    c = compile(pattern, problem, q_tile=(2, 2))
    assert a.name == b.name and a.op is b.op
    assert c.name != a.name
    assert op_mod.registered()[a.name].schedule is a._entry.schedule
    # registering the same name again is harmless; reusing a name for another schedule is refused
    assert op_mod.register(b.schedule, a.name) is a._entry
    with pytest.raises(ValueError, match=f"name='{a.name}' is already the op of another schedule"):
        op_mod.register(c.schedule, a.name)
    with pytest.raises(ValueError, match="name must match"):
        op_mod.register(c.schedule, "Bad-Name")


def test_fingerprint_is_stable_across_builds():
    from sparseforge.lower.schedule import build_schedule

    pattern, problem = sf.Neighborhood(3, dilation=2), P((9, 9))
    f1 = build_schedule(pattern, problem).fingerprint()
    f2 = build_schedule(pattern, problem).fingerprint()
    f3 = build_schedule(pattern, P((9, 9), heads=4)).fingerprint()
    assert f1 == f2 != f3


# -- opcheck / gradcheck ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_opcheck_forward(dtype):
    pattern, problem = sf.Neighborhood(3) | sf.Sink(1), P((4, 5), heads=2, kv_heads=1)
    attn = compile(pattern, problem, backend="cpu", q_tile=(2, 4))
    q, k, v = qkv(problem, 2, dtype, requires_grad=True)
    torch.library.opcheck(attn.op.default, (q, k, v, 0.3, "cpu"))
    torch.library.opcheck(attn.op.default, (q, k, v, 0.3, "auto"))


def test_opcheck_backward():
    pattern, problem = sf.Causal(), P(12)
    attn = compile(pattern, problem, backend="cpu", q_tile=(4,))
    q, k, v = qkv(problem, 1)
    out, lse = attn.op.default(q, k, v, 0.5, "cpu")
    gen = torch.Generator().manual_seed(3)
    do, dl = rand(out.shape, torch.float32, gen), rand(lse.shape, torch.float32, gen)
    torch.library.opcheck(attn.backward_op.default, (q, k, v, out, lse, do, dl, 0.5, "cpu"))
    torch.library.opcheck(attn.backward_op.default, (q, k, v, out, lse, do, None, 0.5, "cpu"))


@pytest.mark.parametrize("pattern, problem, q_tile", [
    (sf.Neighborhood(3), P((4, 5), heads=1, head_dim=4), (2, 4)),
    (sf.SlidingWindow(2, 1) | sf.Sink(1), P(9, heads=2, head_dim=4, kv_heads=1), (4,)),
], ids=["na2d", "union_gqa"])
def test_gradcheck_float64(pattern, problem, q_tile):
    """Gradients of out and LSE (every row non-empty, so LSE is finite)."""
    attn = compile(pattern, problem, backend="cpu", q_tile=q_tile)
    q, k, v = qkv(problem, 2, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: attn(q, k, v, return_lse=True), (q, k, v), fast_mode=True)


def test_gradcheck_with_empty_rows():
    pattern, problem = sf.Blocks(2) & sf.GlobalTokens((1,)), P(6, heads=1, head_dim=4)
    attn = compile(pattern, problem, backend="cpu", q_tile=(2,))
    q, k, v = qkv(problem, 1, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: attn(q, k, v), (q, k, v))


# -- torch.compile ------------------------------------------------------------------------------
class TinyModel(torch.nn.Module):
    def __init__(self, attn, dim):
        super().__init__()
        self.attn = attn
        self.lin = torch.nn.Linear(dim, dim)

    def forward(self, q, k, v):
        out, lse = self.attn(self.lin(q), k, v, return_lse=True)
        return out * 2 + 1, lse


def test_torch_compile_fullgraph_no_graph_break():
    import torch._dynamo

    torch._dynamo.reset()
    pattern, problem = sf.Neighborhood(3, dilation=2) | sf.GlobalTokens((0,)), P((6, 7), heads=4, kv_heads=2)
    attn = compile(pattern, problem, q_tile=(2, 4))
    model = TinyModel(attn, problem.head_dim)
    q, k, v = qkv(problem, 2, requires_grad=True)
    eager_out, eager_lse = model(q, k, v)
    eager_grads = torch.autograd.grad(eager_out.sum(), (q, k, v))

    counts = torch._dynamo.utils.counters
    counts.clear()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out, lse = compiled(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert not counts["graph_break"], dict(counts["graph_break"])
    assert rel_err(out, eager_out) < 1e-6 and rel_err(lse, eager_lse) < 1e-6
    for g, w in zip(grads, eager_grads):
        assert rel_err(g, w) < 1e-6

    # the op appears in the captured graph as one node
    explanation = torch._dynamo.explain(model)(q, k, v)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()


def test_meta_tensors_give_shapes():
    attn = compile(sf.Blocks(4), P((8, 8), head_dim=16))
    q = torch.empty(3, 2, 64, 16, device="meta")
    out, lse = attn(q, q, q, return_lse=True)
    assert out.shape == (3, 2, 64, 16) and out.device.type == "meta"
    assert lse.shape == (3, 2, 64) and lse.dtype == torch.float32


def test_op_matches_reference_with_lse_grad_through_compile():
    """Backward through torch.compile with both outputs used (dlse flows)."""
    import torch._dynamo

    torch._dynamo.reset()
    pattern, problem = sf.SlidingWindow(3, 3), P(20)
    attn = compile(pattern, problem, q_tile=(8,))

    def f(q, k, v):
        out, lse = attn(q, k, v, return_lse=True)
        return out.square().sum() + lse.sum()

    q, k, v = qkv(problem, 2, requires_grad=True)
    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, rl = sf.reference_attention(q64, k64, v64, pattern, problem, return_lse=True)
    want = torch.autograd.grad(ro.square().sum() + rl.sum(), (q64, k64, v64))
    for g, w in zip(got, want):
        assert rel_err(g, w) < TOL[torch.float32]
    torch._dynamo.reset()
