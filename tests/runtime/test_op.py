"""The torch.library ops: one fixed set, names, kernel registry, opcheck, gradcheck and
torch.compile (also with dynamic shapes)."""
from __future__ import annotations

import re

import pytest
import torch

import sparseforge as sf
from sparseforge import compile
from sparseforge.lower.naming import readable_name
from sparseforge.runtime import ops

from ._common import TOL, opcheck_attention, qkv, rand, rel_err


def P(grid, heads=2, head_dim=8, kv_heads=None, dtype=torch.float32):
    return sf.Problem(grid=grid, heads=heads, head_dim=head_dim, dtype=dtype, kv_heads=kv_heads)


# -- names and registry ---------------------------------------------------------------
def test_readable_name():
    attn = compile(sf.Neighborhood(7, dilation=2), sf.Problem(grid=(56, 56), heads=8, head_dim=64,
                                                              dtype=torch.bfloat16))
    assert re.fullmatch(r"na2d_k7_d2_g56x56_h8_d64_bf16_[0-9a-f]{8}", attn.name), attn.name
    assert attn.op is torch.ops.sparseforge.attention


@pytest.mark.parametrize("pattern, grid, prefix", [
    (sf.Neighborhood((3, 5), stride=(1, 2), causal=(True, False)), (9, 10), "na2d_k3x5_s1x2_c1x0_g9x10"),
    (sf.SlidingWindow(4) | sf.Sink(2), 40, "sw_l4_r0_or_sink2_g40"),
    (sf.Causal() & sf.Documents((10, 30)), 40, "causal_and_docs2_g40"),
    (sf.StridedShards(16, 2, 4, causal=False), 64, "s2_b16_l2_v4_bi_g64"),
    (sf.PerHead([sf.Blocks(4), sf.Grid(2), sf.Blocks(4)]), (8, 8), "perhead3_blocks4_grid2_g8x8"),
])
def test_names_are_sanitized(pattern, grid, prefix):
    problem = sf.Problem(grid=grid, heads=3 if "perhead" in prefix else 2, head_dim=16, dtype=torch.float16)
    name = readable_name(pattern, problem, "0123456789abcdef")
    assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
    assert name.startswith(prefix) and name.endswith("_01234567"), name


def test_gqa_in_name_and_long_names_truncated():
    pattern = sf.PerHead([sf.Documents(tuple([1] * 8)), sf.Neighborhood(3), sf.SlidingWindow(1, 0),
                          sf.Sink(1)] + [sf.SlidingWindow(j + 1, j + 2) for j in range(4)])
    problem = P(8, heads=8, kv_heads=2)
    name = readable_name(pattern, problem, "f" * 16)
    assert "_g8_h8_d8_fp32_kv2_ffffffff" in name and len(name) < 130, name
    assert re.fullmatch(r"[a-z][a-z0-9_]*", name)



def test_same_schedule_reuses_kernel_and_other_tiles_get_another():
    pattern, problem = sf.Halo(2, 1), P((6, 6))
    a = compile(pattern, problem)
    b = compile(pattern, problem, backend="cpu")
    c = compile(pattern, problem, q_tile=(2, 2))
    d = compile(pattern, P((12, 10)))
    assert a.name == b.name and a.kernel is b.kernel
    assert c.name != a.name and c.kernel is not a.kernel
    assert d.kernel is a.kernel  # another grid, same code: the same kernel entry
    assert a.op is b.op is c.op is d.op is torch.ops.sparseforge.attention
    assert ops.registered_kernel(a.kernel.key) is a.kernel
    with pytest.raises(ValueError, match="kernel='nope' is not registered"):
        ops.registered_kernel("nope")


def _sparseforge_ops() -> set[str]:
    return {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("sparseforge::")}


FIXED_OPS = {f"sparseforge::{name}" for name in ops.OPS}
assert len(FIXED_OPS) == 4


def _fifty_problems():
    """50 different (pattern, problem, call) cases across every path, grid and dtype."""
    cases = []
    for n in (8, 9, 16, 23, 32):
        cases.append((sf.Causal(), P(n), {}))
        cases.append((sf.SlidingWindow(2, 1) | sf.Sink(1), P(n, heads=2, kv_heads=1), {}))
    for grid in ((6, 6), (7, 6), (6, 8), (7, 7), (8, 9)):
        cases.append((sf.Neighborhood(3), P(grid), {}))
        cases.append((sf.Neighborhood(3, dilation=2), P(grid, dtype=torch.float64), {}))
        cases.append((sf.Blocks(2) | sf.GlobalTokens((0,)), P(grid, head_dim=4), {}))
        cases.append((sf.Halo(2, 1), P(grid), {"q_tile": (2, 2)}))
        cases.append((sf.Routed((2, 2), 2), P(grid), {}))
    for d in (3, 4, 5):
        cases.append((sf.Neighborhood((3, 3, 3)), P((d, 4, 4)), {}))
    for w in (2, 3, 4, 5, 6):
        cases.append((sf.Scattered(w), sf.Problem(heads=2, head_dim=8, dtype=torch.float32), {}))
    for n in (10, 12, 14, 17):
        cases.append((sf.Grouped(causal=n % 2 == 0), P(n), {}))
    for n in (20, 24, 28):
        cases.append((sf.StridedShards(4, 1, 2), P(n, heads=2), {}))
    return cases


def test_fifty_problems_register_no_op():
    """Every pattern, problem and config runs through the same ops: compiling and calling
    50 different problems (static, routed, scattered, grouped; 1-D to 3-D; fp32/fp64) leaves
    exactly the fixed four (attention and linear attention, forward and backward) in
    ``torch.ops.sparseforge``."""
    compile(sf.Causal(), P(4))(*qkv(P(4), 1))
    before = _sparseforge_ops()
    assert before == FIXED_OPS
    cases = _fifty_problems()
    assert len(cases) == 50 and len({(repr(p), repr(pr), repr(o)) for p, pr, o in cases}) == 50
    gen = torch.Generator().manual_seed(0)
    for pattern, problem, options in cases:
        attn = compile(pattern, problem, backend="cpu", **options)
        if isinstance(pattern, sf.Scattered):
            coords = torch.cat([torch.zeros(12, 1, dtype=torch.long), torch.randint(0, 9, (12, 2), generator=gen)], 1)
            q = torch.randn(12, 2, 8, generator=gen)
            out = attn(q, q, q, coords=coords)
        elif isinstance(pattern, sf.Grouped):
            q, k, v = qkv(problem, 2, problem.dtype)
            out = attn(q, k, v, groups=torch.randint(-1, 3, (2, problem.tokens), generator=gen))
        else:
            out = attn(*qkv(problem, 2, problem.dtype))
        assert torch.isfinite(out).all()
        assert _sparseforge_ops() == FIXED_OPS, pattern


def test_fingerprint_is_stable_across_builds():
    from sparseforge.lower.schedule import build_schedule

    pattern, problem = sf.Neighborhood(3, dilation=2), P((9, 9))
    f1 = build_schedule(pattern, problem).fingerprint()
    f2 = build_schedule(pattern, problem).fingerprint()
    f3 = build_schedule(pattern, P((9, 9), heads=4)).fingerprint()
    assert f1 == f2 != f3


# -- opcheck / gradcheck ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_opcheck(dtype):
    pattern, problem = sf.Neighborhood(3) | sf.Sink(1), P((4, 5), heads=2, kv_heads=1)
    attn = compile(pattern, problem, backend="cpu", q_tile=(2, 4))
    q, k, v = qkv(problem, 2, dtype, requires_grad=True)
    opcheck_attention(attn, q, k, v, dtype)
    opcheck_attention(attn, *qkv(P((3, 6), heads=2, kv_heads=1), 2, dtype, requires_grad=True), dtype, grid=(3, 6))


def test_opcheck_auto_backend():
    pattern, problem = sf.Causal(), P(12)
    attn = compile(pattern, problem, q_tile=(4,))
    q, k, v = qkv(problem, 1, requires_grad=True)
    args = attn.op_inputs(q, k, v, scale=0.5)
    assert args[-1] == "auto" and args[3] == [] and args[4] == [] and args[5] is None and args[6] == [12]
    torch.library.opcheck(attn.op.default, args)


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


def test_a_second_compile_seeds_the_shared_kernel_with_its_schedule():
    a = compile(sf.Neighborhood(3), P((11, 6), head_dim=12))   # grids no other test uses
    b = compile(sf.Neighborhood(3), P((9, 13), head_dim=12))
    assert b.kernel is a.kernel
    assert a.kernel.at((9, 13)).schedule is b.schedule  # not built a second time
    assert a.kernel.at((11, 6)).schedule is a.schedule


# -- score modifiers and padding: tensors into the same ops --------------------------------------
def _modifier_cases():
    """(pattern, problem, modifiers, head_scale tensor or None, call options) of every kind."""
    gen = torch.Generator().manual_seed(0)
    h = 2
    rpb2 = sf.RelativePositionBias(rand((h, 5, 5), torch.float32, gen, True))
    rpb1 = sf.RelativePositionBias(rand((h, 6), torch.float32, gen, True))
    t5 = sf.T5Bias(rand((h, 8), torch.float32, gen, True), max_distance=12)
    alibi = sf.ALiBi(sf.ALiBi.geometric_slopes(h).requires_grad_())
    sinks = sf.Sinks(rand((h,), torch.float32, gen, True))
    hs = torch.tensor([0.3, 0.5], requires_grad=True)
    return [
        (sf.Neighborhood(3), P((6, 7)), (rpb2,), None, {}),
        (sf.Neighborhood(3), P((6, 7)), (rpb2, sf.Softcap(3.0), sinks), hs, {"sizes": [[6, 7], [4, 5]]}),
        (sf.SlidingWindow(3, 2), P(20), (rpb1, t5, alibi, sinks), None, {"key_padding_mask": torch.rand(2, 20) > 0.2}),
        (sf.Causal() & sf.SlidingWindow(4), P(20, kv_heads=1), (t5, sf.Softcap(2.0)), hs, {"lengths": [20, 9]}),
        (sf.Causal(), P(20), (sinks,), None, {"lengths": [3, 20], "padding_side": "left"}),
        (sf.Routed((2, 2), 2), P((4, 4)), (sf.Softcap(2.0), sinks), hs, {}),
        (sf.Grid(2), P((4, 6)), (sf.RelativePositionBias(rand((h, 3, 3), torch.float32, gen, True)),), None, {}),
    ]


def test_modifiers_and_padding_register_no_op():
    """Compiling and calling with every modifier kind, a per-head scale and every kind of
    padding adds kernel entries (other keys), never an op: the fixed four stay."""
    compile(sf.Causal(), P(4))(*qkv(P(4), 1))
    assert _sparseforge_ops() == FIXED_OPS
    keys = set()
    for pattern, problem, mods, hs, kw in _modifier_cases():
        attn = compile(pattern, problem, backend="cpu", modifiers=mods, head_scale=hs is not None)
        plain = compile(pattern, problem, backend="cpu")
        assert attn.kernel.key != plain.kernel.key and attn.op is plain.op is torch.ops.sparseforge.attention
        keys.add(attn.kernel.key)
        q, k, v = qkv(problem, 2, requires_grad=True)
        out, lse = attn(q, k, v, modifiers=mods, scale=hs, return_lse=True, **kw)
        tensors = [t for m in mods for t in m.tensors()] + ([hs] if hs is not None else [])
        grads = torch.autograd.grad((out.square().sum() + torch.where(torch.isfinite(lse), lse, 0).sum()),
                                    (q, k, v, *tensors))
        assert all(torch.isfinite(g).all() for g in grads)
        assert _sparseforge_ops() == FIXED_OPS, pattern
    assert len(keys) == len(_modifier_cases())


@pytest.mark.parametrize("case", range(7))
def test_opcheck_with_params_and_padding(case):
    """opcheck of both ops with modifier tensors in ``params`` (and padding): schema, fake
    tensors (the list of parameter gradients included) and autograd registration."""
    pattern, problem, mods, hs, kw = _modifier_cases()[case]
    attn = compile(pattern, problem, backend="cpu", modifiers=mods, head_scale=hs is not None)
    q, k, v = qkv(problem, 2, requires_grad=True)
    if isinstance(pattern, sf.Routed):
        from sparseforge.lower.routed import routes_for
        kw = dict(kw, routes=routes_for(pattern, problem, q, k))  # the op's form: [B, H|1, R, topk]
    args = attn.op_inputs(q, k, v, modifiers=mods, scale=hs, **kw)
    assert len(args[4]) == len(mods) - sum(isinstance(m, sf.Softcap) for m in mods) + (hs is not None)
    torch.library.opcheck(attn.op.default, args)
    out, lse = attn.op.default(*args)
    gen = torch.Generator().manual_seed(3)
    do, dl = rand(out.shape, torch.float32, gen), torch.where(torch.isfinite(lse), rand(lse.shape, lse.dtype, gen), 0)
    q, k, v, out, lse = (t.detach() for t in (q, k, v, out, lse))
    rest = (args[3], [p.detach() for p in args[4]], *args[5:])  # the backward op is first-order
    torch.library.opcheck(attn.backward_op.default, (q, k, v, out, lse, do, dl, *rest))
    torch.library.opcheck(attn.backward_op.default, (q, k, v, out, lse, do, None, *rest))
    dq, dk, dv, dparams = attn.backward_op.default(q, k, v, out, lse, do, None, *rest)
    assert [g.shape for g in dparams] == [p.shape for p in args[4]]
