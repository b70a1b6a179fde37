"""Padding through compiled attention on the CPU executor: a key padding mask [B, N], per-sample
lengths (right and left padded) and per-sample grids (``sizes``), with and without score
modifiers, forward and every gradient against the float64 reference; NaN stored in padded
tokens never reaches an output or a gradient; padded rows output zeros with LSE -inf;
deterministic gradients; the padding reaches the op as a tensor (no new kernel key); errors
name the argument; the Triton backends refuse padding instead of falling back."""
from __future__ import annotations

import math

import pytest
import torch

import sparseforge as sf
from sparseforge import compile
from sparseforge.dsl.modifiers import check_modifiers, modifier_tensors

from ._common import rand
from .test_modifiers import P, make, run_case, with_grad

F32, F64 = torch.float32, torch.float64


def kpm(batch, n, seed=0, p=0.3):
    """A key padding mask with some padding in every sample and one sample fully real."""
    m = torch.rand(batch, n, generator=torch.Generator().manual_seed(seed)) > p
    m[0] = True
    return m


# -- against the reference ---------------------------------------------------------------------------
CASES = [
    # (id, pattern, problem, q_tile, modifiers, padding)
    ("na2d_mask", sf.Neighborhood(3, dilation=2), P((7, 9)), (4, 4), ("rpb", "softcap", "sinks"),
     {"key_padding_mask": kpm(3, 63)}),
    ("blocks_offset_mask", sf.Blocks(4, offset=(2, 1)), P((8, 7)), (4, 4), ("rpb", "sinks", "hs"),
     {"key_padding_mask": kpm(3, 56, 1)}),
    ("causal_window_gqa_mask", sf.Causal() & sf.SlidingWindow(5), P(37, heads=4, kv_heads=2), (8,),
     ("t5", "alibi", "softcap", "sinks", "hs"), {"key_padding_mask": kpm(3, 37, 2)}),
    ("union_mask_plain", sf.SlidingWindow(3) | sf.Sink(2), P(30), (8,), (), {"key_padding_mask": kpm(3, 30, 3)}),
    ("causal_window_lengths_right", sf.Causal() & sf.SlidingWindow(5), P(37, heads=4, kv_heads=2), (8,),
     ("t5", "alibi", "softcap", "sinks", "hs"), {"lengths": [37, 20, 0]}),
    ("causal_window_lengths_left", sf.Causal() & sf.SlidingWindow(5), P(37, heads=4, kv_heads=2), (8,),
     ("t5", "alibi", "sinks"), {"lengths": [11, 37, 20], "padding_side": "left"}),
    ("na1d_lengths_rpb", sf.Neighborhood(5, dilation=2), P(30), (8,), ("rpb", "sinks"), {"lengths": [30, 12, 17]}),
    ("na1d_lengths_left_rpb", sf.Neighborhood(5, dilation=2), P(30), (8,), ("rpb", "softcap"),
     {"lengths": [12, 30, 17], "padding_side": "left"}),
    ("sliding1d_lengths_plain", sf.SlidingWindow(3, 2), P(29), (8,), (), {"lengths": [5, 29, 13]}),
    ("na2d_sizes", sf.Neighborhood(3), P((7, 9)), (4, 4), ("rpb", "softcap", "sinks", "hs"),
     {"sizes": [[7, 9], [3, 5], [5, 0]]}),
    ("blocks_offset_sizes", sf.Blocks(4, offset=2), P((8, 7)), (4, 4), ("rpb", "sinks"),
     {"sizes": [[6, 7], [8, 5], [6, 7]]}),
    ("perhead_blocks_grid_sizes", sf.PerHead([sf.Blocks(4), sf.Grid(4), sf.Blocks(4), sf.Grid(4)]),
     P((8, 8), heads=4, kv_heads=2), (4, 4), ("rpb", "sinks"), {"sizes": [[8, 8], [4, 8], [8, 4]]}),
    ("halo_sizes_plain", sf.Halo(2, 1), P((6, 7)), (4, 4), (), {"sizes": [[6, 7], [3, 4], [2, 2]]}),
]


@pytest.mark.parametrize("dtype", [F32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("pattern, problem, q_tile, kinds, padding", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_padding_matches_reference(pattern, problem, q_tile, kinds, padding, dtype):
    run_case(pattern, problem, kinds, dtype, batch=3, q_tile=q_tile, padding=padding)


def test_full_lengths_equal_no_padding():
    """lengths = N everywhere (and sizes = the grid) give exactly the unpadded results."""
    pattern, problem = sf.Causal() & sf.SlidingWindow(4), P(21)
    attn = compile(pattern, problem, backend="cpu", q_tile=(8,))
    gen = torch.Generator().manual_seed(0)
    q = rand((2, 2, 21, 8), F32, gen)
    plain, plain_lse = attn(q, q, q, return_lse=True)
    everything = torch.ones(2, 21, dtype=torch.bool)
    for kw in ({"lengths": [21, 21]}, {"sizes": [[21], [21]]}, {"key_padding_mask": everything}):
        out, lse = attn(q, q, q, return_lse=True, **kw)
        assert torch.equal(out, plain) and torch.equal(lse, plain_lse), kw


# -- NaN in padding -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["na2d_mask", "causal_window_gqa_mask", "causal_window_lengths_left",
                                  "na2d_sizes"])
def test_nan_in_padding_reaches_nothing(case):
    """q, k, v and dout hold NaN at every padded token: every output and gradient stays
    finite, padded rows give zeros (LSE -inf), padded keys get zero dk/dv, and the rest
    matches the float64 reference (which honours the same rule) within tolerance."""
    _, pattern, problem, q_tile, kinds, padding = next(c for c in CASES if c[0] == case)
    b, n = 3, problem.tokens
    if "key_padding_mask" in padding:
        real = padding["key_padding_mask"]
    elif "lengths" in padding:
        lengths = torch.tensor(padding["lengths"])
        pos = torch.arange(n)
        right = padding.get("padding_side", "right") == "right"
        real = pos < lengths[:, None] if right else pos >= n - lengths[:, None]
    else:
        sizes = torch.tensor(padding["sizes"])
        coords = torch.stack(torch.meshgrid(*(torch.arange(g) for g in problem.grid), indexing="ij"), -1).reshape(n, -1)
        real = (coords[None] < sizes[:, None, :]).all(-1)
    gen = torch.Generator().manual_seed(0)
    built = [make(kind, pattern, problem, gen) for kind in kinds]
    hs = next((m for m in built if isinstance(m, torch.Tensor)), None)
    mods = tuple(m for m in built if not isinstance(m, torch.Tensor))
    attn = compile(pattern, problem, backend="cpu", modifiers=mods, head_scale=hs is not None, q_tile=q_tile)
    nan = float("nan")
    q, k, v = (rand((b, h, n, 8), F32, gen) for h in (problem.heads, problem.kv_heads, problem.kv_heads))
    do = rand((b, problem.heads, n, 8), F32, gen)
    for t in (q, k, v, do):
        t.masked_fill_(~real[:, None, :, None], nan)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mods, hs = with_grad(mods, hs)
    out, lse = attn(q, k, v, modifiers=mods, scale=hs, return_lse=True, **padding)
    tensors = modifier_tensors(check_modifiers(mods, pattern, problem), hs)
    grads = torch.autograd.grad(out, (q, k, v, *tensors), do)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    pad = ~real[:, None, :].expand(b, problem.heads, n)
    assert (out[pad] == 0).all() and torch.isneginf(lse[pad]).all() and torch.isfinite(lse[~pad]).all()
    assert (grads[0][pad] == 0).all()
    kpad = ~real[:, None, :].expand(b, problem.kv_heads, n)
    assert (grads[1][kpad] == 0).all() and (grads[2][kpad] == 0).all()
    # the real rows: as the reference on the same poisoned inputs
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    mods64, hs64 = with_grad(tuple(m.with_tensors(*(t.double() for t in m.tensors())) for m in mods),
                             None if hs is None else hs.double())
    ref = sf.reference_attention(q64, k64, v64, pattern, problem, modifiers=mods64, scale=hs64, **padding)
    t64 = modifier_tensors(check_modifiers(mods64, pattern, problem), hs64)
    want = torch.autograd.grad(ref, (q64, k64, v64, *t64), torch.nan_to_num(do.double()))
    assert torch.isfinite(ref).all()
    assert (out.double() - ref).abs().max() < 1e-4
    for g, w in zip(grads, want):
        assert (g.double() - w).abs().max() < 1e-4 * max(1.0, w.abs().max().item())


def test_padded_rows_with_sinks_are_minus_inf_and_real_empty_rows_are_the_sink():
    pattern, problem = sf.Blocks(4) & sf.GlobalTokens((1,)), P(16)
    sinks = torch.tensor([0.5, -1.0])
    attn = compile(pattern, problem, backend="cpu", modifiers=(sf.Sinks(sinks),), q_tile=(4,))
    q = torch.randn(2, 2, 16, 8)
    first = torch.arange(16)[None].expand(2, 16) < torch.tensor([[16], [9]])
    for kw in ({"lengths": [16, 9]}, {"key_padding_mask": first}):
        out, lse = attn(q, q, q, modifiers=(sf.Sinks(sinks),), return_lse=True, **kw)
        ref, ref_lse = sf.reference_attention(q.double(), q.double(), q.double(), pattern, problem,
                                              modifiers=(sf.Sinks(sinks.double()),), return_lse=True, **kw)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), kw
        assert torch.isneginf(lse[1, :, 9:]).all() and (out[1, :, 9:] == 0).all()
        fin = torch.isfinite(ref_lse)
        assert (lse[fin].double() - ref_lse[fin]).abs().max() < 1e-5
        assert (out.double() - ref).abs().max() < 1e-5


def test_padding_gradients_are_bitwise_deterministic():
    pattern, problem = sf.Neighborhood(3, dilation=2), P((9, 10), heads=4, kv_heads=2)
    gen = torch.Generator().manual_seed(0)
    mods = (make("rpb", pattern, problem, gen), make("sinks", pattern, problem, gen))
    attn = compile(pattern, problem, backend="cpu", modifiers=mods, q_tile=(4, 4))
    q, k, v = (rand((3, h, 90, 8), F32, gen) for h in (4, 2, 2))
    do = rand((3, 4, 90, 8), F32, gen)
    for padding in ({"key_padding_mask": kpm(3, 90)}, {"sizes": [[9, 10], [6, 7], [6, 7]]}):
        def grads():
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            m, _ = with_grad(mods, None)
            out = attn(*leaves, modifiers=m, **padding)
            return torch.autograd.grad(out, (*leaves, *(t for x in m for t in x.tensors())), do)
        for a, b in zip(grads(), grads()):
            assert torch.equal(a, b)


# -- the op's inputs ------------------------------------------------------------------------------------
def test_padding_is_a_tensor_input_not_a_key():
    pattern, problem = sf.Causal() & sf.SlidingWindow(4), P(24)
    attn = compile(pattern, problem, backend="cpu")
    q = torch.randn(3, 2, 24, 8)
    plain = attn.op_inputs(q, q, q)
    right = attn.op_inputs(q, q, q, lengths=torch.tensor([24, 5, 0]))
    left = attn.op_inputs(q, q, q, lengths=[24, 5, 0], padding_side="left")
    mask = attn.op_inputs(q, q, q, key_padding_mask=kpm(3, 24))
    sizes = attn.op_inputs(q, q, q, sizes=[[24], [5], [0]])
    assert plain[5] is None and all(a[7] == plain[7] for a in (right, left, mask, sizes))
    assert torch.equal(right[5], torch.tensor([[[0], [24]], [[0], [5]], [[0], [0]]]))
    assert torch.equal(left[5], torch.tensor([[[0], [24]], [[19], [5]], [[24], [0]]]))
    assert torch.equal(sizes[5], right[5]) and mask[5].dtype == torch.bool
    torch.library.opcheck(attn.op.default, right)


def test_torch_compile_fullgraph_with_padding():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pattern, problem = sf.Causal() & sf.SlidingWindow(4), P(24)
    sinks = torch.nn.Parameter(torch.zeros(2))
    attn = compile(pattern, problem, modifiers=(sf.Sinks(sinks),))

    def f(q, lengths, mask):
        a = attn(q, q, q, lengths=lengths, modifiers=(sf.Sinks(sinks),))
        b = attn(q, q, q, key_padding_mask=mask, modifiers=(sf.Sinks(sinks),))
        return a.square().sum() + b.square().sum()

    q = torch.randn(3, 2, 24, 8, requires_grad=True)
    lengths, mask = torch.tensor([24, 7, 0]), kpm(3, 24)
    want = torch.autograd.grad(f(q, lengths, mask), (q, sinks))
    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(q, lengths, mask), (q, sinks))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()


# -- errors ---------------------------------------------------------------------------------------------
Q1 = torch.zeros(2, 2, 24, 8)
Q2 = torch.zeros(2, 2, 42, 8)


def _seq():
    return compile(sf.Causal() & sf.SlidingWindow(4), P(24), backend="cpu")


def _na1d():
    return compile(sf.Neighborhood(5), P(24), backend="cpu")


def _img():
    return compile(sf.Neighborhood(3), P((6, 7)), backend="cpu")


@pytest.mark.parametrize("make_attn, q, kw, exc, match", [
    (_seq, Q1, {"key_padding_mask": torch.ones(2, 25, dtype=torch.bool)}, ValueError,
     r"key_padding_mask has shape \[2, 25\], expected \[B=2, N=24\]"),
    (_seq, Q1, {"key_padding_mask": torch.ones(2, 24)}, TypeError, r"key_padding_mask must be a bool tensor"),
    (_seq, Q1, {"key_padding_mask": [[True] * 24] * 2}, TypeError, r"key_padding_mask must be a bool tensor"),
    (_seq, Q1, {"key_padding_mask": torch.ones(2, 24, dtype=torch.bool, device="meta")}, ValueError,
     r"key_padding_mask is on meta, but q is on cpu"),
    (_seq, Q1, {"lengths": [24, 25]}, ValueError, r"lengths\[1\] must be in \[0, 24\].*got 25"),
    (_seq, Q1, {"lengths": [-1, 3]}, ValueError, r"lengths\[0\] must be in \[0, 24\].*got -1"),
    (_seq, Q1, {"lengths": [3]}, ValueError, r"lengths has shape \[1\], expected \[2\]"),
    (_seq, Q1, {"lengths": [3.0, 4.0]}, TypeError, r"lengths must hold ints"),
    (_seq, Q1, {"lengths": torch.tensor([True, False])}, TypeError, r"lengths must hold integers"),
    (_seq, Q1, {"lengths": [3, 4], "sizes": [[3], [4]]}, ValueError, r"at most one of key_padding_mask, lengths"),
    (_seq, Q1, {"padding_side": "left"}, ValueError, r"padding_side='left' applies to lengths="),
    (_seq, Q1, {"lengths": [3, 4], "padding_side": "top"}, ValueError, r"padding_side must be 'right' or 'left'"),
    (_na1d, Q1, {"lengths": [24, 3]}, ValueError,
     r"lengths\[1\]=3: the sample is a grid of \(3,\), on which kernel_size=5 is larger"),
    (_img, Q2, {"lengths": [3, 4]}, ValueError, r"lengths applies to 1-D sequences"),
    (_img, Q2, {"sizes": [[6, 8], [1, 1]]}, ValueError, r"sizes\[0\]\[1\] must be in \[0, 7\].*got 8"),
    (_img, Q2, {"sizes": [6, 7]}, ValueError, r"sizes has shape \[2\], expected \[2, 2\]"),
    (_img, Q2, {"sizes": [[6, 7], [2, 7]]}, ValueError, r"sizes\[1\]=\[2, 7\]: the sample is a grid of \(2, 7\)"),
])
def test_padding_errors(make_attn, q, kw, exc, match):
    with pytest.raises(exc, match=match):
        make_attn()(q, q, q, **kw)



def test_content_patterns_refusals():
    routed = compile(sf.Routed(2, 2), P(8), backend="cpu")
    q = torch.zeros(2, 2, 8, 8)
    with pytest.raises(NotImplementedError, match=r"lengths= with Routed.*per-sample routing"):
        routed(q, q, q, lengths=[8, 4])
    with pytest.raises(ValueError, match=r"key_padding_mask with Routed.*routing reads every token"):
        routed(q, q, q, key_padding_mask=torch.ones(2, 8, dtype=torch.bool))
    voxels = compile(sf.Scattered(3), sf.Problem(heads=2, head_dim=8, dtype=F32), backend="cpu")
    coords = torch.zeros(5, 3, dtype=torch.long)
    v = torch.zeros(5, 2, 8)
    with pytest.raises(ValueError, match=r"lengths needs a token grid"):
        voxels(v, v, v, coords=coords, lengths=[5])


def test_routed_with_routes_and_key_padding_mask():
    """Given routes, a key padding mask applies to routed attention too."""
    pattern, problem = sf.Routed(4, 2), P(16)
    attn = compile(pattern, problem, backend="cpu")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (rand((2, 2, 16, 8), F64, gen, True) for _ in range(3))
    routes = torch.tensor([[[0, 1], [1, 2], [2, 3], [3, 0]]] * 2)
    mask = kpm(2, 16, 4)
    out = attn(q, k, v, routes=routes, key_padding_mask=mask)
    ref = sf.reference_attention(q, k, v, pattern, problem, routes=routes, key_padding_mask=mask)
    assert (out - ref).abs().max() < 1e-12
    g = torch.autograd.grad(out.square().sum(), (q, k, v))
    w = torch.autograd.grad(ref.square().sum(), (q, k, v))
    assert max((a - b).abs().max().item() for a, b in zip(g, w)) < 1e-11
    assert math.isfinite(out.sum().item())
