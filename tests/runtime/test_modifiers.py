"""Score modifiers through compiled attention on the CPU executor: every modifier (relative
position tables, T5 buckets, ALiBi, softcap, sinks, per-head scale) on several families
(Neighborhood with dilation, Blocks with offset, Grid, Halo, SlidingWindow, Causal &
SlidingWindow, PerHead of Blocks/Grid, GQA), forward and every gradient (q, k, v and each
modifier tensor) against the float64 reference row by row, with tolerances from the dtype and
the reduction length (``runtime.check``); deterministic gradients; the per-pair lookup
against the reference's bias; the compile/call contract and its errors; torch.compile."""
from __future__ import annotations

import json

import pytest
import torch

import sparseforge as sf
from sparseforge import compile
from sparseforge.dsl.modifiers import (bias_lookup, check_modifiers, modifier_spec, modifier_tensors,
                                       modifiers_from_tensors, relative_position_bias_shape)
from sparseforge.runtime import check, ops

from ._common import rand

F32, F64 = torch.float32, torch.float64


def P(grid, heads=2, head_dim=8, kv_heads=None, dtype=F32):
    return sf.Problem(grid=grid, heads=heads, head_dim=head_dim, dtype=dtype, kv_heads=kv_heads)


# -- making modifiers -----------------------------------------------------------------------
def make(kind: str, pattern, problem, gen, dtype=F32):
    """A modifier of ``kind`` (or the per-head scale, kind "hs") with fresh values."""
    h = problem.heads
    if kind == "rpb":
        return sf.RelativePositionBias(rand(relative_position_bias_shape(pattern, problem), dtype, gen))
    if kind == "t5":
        causal = isinstance(pattern, sf.Intersection)   # Causal & ...: the decoder's buckets
        return sf.T5Bias(rand((h, 8), dtype, gen), max_distance=12, bidirectional=not causal)
    if kind == "alibi":
        return sf.ALiBi(sf.ALiBi.geometric_slopes(h).to(dtype))
    if kind == "softcap":
        return sf.Softcap(2.5)
    if kind == "sinks":
        return sf.Sinks(rand((h,), dtype, gen))
    if kind == "hs":
        return (torch.rand(h, generator=gen, dtype=F64) + 0.2).to(dtype)
    raise ValueError(kind)


def with_grad(mods, hs):
    """Leaf copies requiring grad of every modifier tensor (and the head scale)."""
    mods = tuple(m.with_tensors(*(t.detach().clone().requires_grad_() for t in m.tensors())) for m in mods)
    return mods, None if hs is None else hs.detach().clone().requires_grad_()


def run_case(pattern, problem, kinds, dtype, *, batch=2, seed=0, q_tile=None, k_tile=None, padding=None,
             backend="cpu"):
    """Compile with the modifiers of ``kinds`` and compare the CPU executor (or ``backend``) with
    the float64 reference: out, LSE, dq, dk, dv and every modifier tensor's gradient, row by row.
    Returns the worst error / tolerance ratio per tensor."""
    padding = padding or {}
    gen = torch.Generator().manual_seed(seed)
    built = [make(kind, pattern, problem, gen, dtype) for kind in kinds]
    hs = next((m for m in built if isinstance(m, torch.Tensor)), None)
    mods = tuple(m for m in built if not isinstance(m, torch.Tensor))
    attn = compile(pattern, problem, backend=backend, modifiers=mods, head_scale=hs is not None, q_tile=q_tile,
                   k_tile=k_tile)
    n, d = problem.tokens, problem.head_dim
    q = rand((batch, problem.heads, n, d), dtype, gen, True)
    k = rand((batch, problem.kv_heads, n, d), dtype, gen, True)
    v = rand((batch, problem.kv_heads, n, d), dtype, gen, True)
    mods, hs = with_grad(mods, hs)
    out, lse = attn(q, k, v, modifiers=mods, scale=hs, return_lse=True, **padding)
    assert out.dtype == dtype and lse.dtype == (F64 if dtype == F64 else F32)
    tensors = modifier_tensors(check_modifiers(mods, pattern, problem), hs)
    do = rand(out.shape, dtype, gen)
    dl = torch.where(torch.isfinite(lse), rand(lse.shape, lse.dtype, gen), 0)
    live = torch.isfinite(lse)
    loss = (out * do).sum() + (torch.where(live, lse, 0) * dl).sum()
    grads = torch.autograd.grad(loss, (q, k, v, *tensors))

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    mods64, hs64 = with_grad(tuple(m.with_tensors(*(t.double() for t in m.tensors())) for m in mods),
                             None if hs is None else hs.double())
    ref, ref_lse = sf.reference_attention(q64, k64, v64, pattern, problem, modifiers=mods64, scale=hs64,
                                          return_lse=True, **padding)
    ref_loss = (ref * do.double()).sum() + (torch.where(live, ref_lse, 0) * dl.double()).sum()
    tensors64 = modifier_tensors(check_modifiers(mods64, pattern, problem), hs64)
    want = torch.autograd.grad(ref_loss, (q64, k64, v64, *tensors64))

    keys, queries = check.reductions(pattern, problem)
    tols = check.attention_tolerances(dtype, lse.dtype, keys, queries, d)
    names = ["dq", "dk", "dv"] + [f"d{type(m).__name__}" for m in mods for _ in m.tensors()
                                  if not isinstance(m, sf.Sinks)]
    names += ["dSinks"] * any(isinstance(m, sf.Sinks) for m in mods) + ["dscale"] * (hs is not None)
    # a modifier tensor's entry sums terms over every pair (batch, query, key) that reads it
    pairs = batch * n * keys + d
    tols.update({name: check.tolerance(dtype, pairs) for name in names[3:]})
    errs = {"out": check.row_error(out, ref), "lse": check.lse_error(lse, ref_lse)}
    errs.update({name: check.row_error(g, w) for name, g, w in zip(names, grads, want)})
    for name, g, t in zip(names, grads, (q, k, v, *tensors)):
        assert g.dtype == t.dtype and g.shape == t.shape and torch.isfinite(g).all(), name
    bad = {name: (e, tols[name]) for name, e in errs.items() if not e <= tols[name]}
    assert not bad, f"{pattern!r} {kinds} {dtype}: errors above tolerance {bad}; all {errs}"
    return {name: errs[name] / tols[name] for name in errs}


# -- the sweep ------------------------------------------------------------------------------------
FAMILIES_2D = [
    ("na2d_dilated", sf.Neighborhood(3, dilation=2), P((7, 9)), (4, 4)),
    ("blocks_offset", sf.Blocks(4, offset=(2, 1)), P((8, 7)), (4, 4)),
    ("grid", sf.Grid(3), P((6, 9)), (2, 4)),
    ("halo", sf.Halo(2, 1), P((6, 7)), (4, 4)),
    ("sliding2d", sf.SlidingWindow((1, 2), (2, 1)), P((6, 7)), (2, 4)),
    ("perhead_blocks_grid_gqa", sf.PerHead([sf.Blocks(4), sf.Grid(4), sf.Blocks(4), sf.Grid(4)]),
     P((8, 8), heads=4, kv_heads=2), (4, 4)),
]
FAMILIES_1D = [
    ("causal_window_gqa", sf.Causal() & sf.SlidingWindow(5), P(37, heads=4, kv_heads=2), (8,)),
    ("sliding1d", sf.SlidingWindow(3, 2), P(29), (8,)),
    ("na1d_dilated", sf.Neighborhood(5, dilation=2), P(30), (8,)),
]
SWEEP = [(fid, kind) for fid, *_ in FAMILIES_2D for kind in ("rpb", "softcap", "sinks", "hs")]
SWEEP += [(fid, kind) for fid, *_ in FAMILIES_1D for kind in ("t5", "alibi", "softcap", "sinks", "hs")]
SWEEP += [(fid, "rpb") for fid in ("sliding1d", "na1d_dilated", "causal_window_gqa")]
FAMILY = {c[0]: c[1:] for c in FAMILIES_2D + FAMILIES_1D}
ALL = {fid: ("rpb", "softcap", "sinks", "hs") for fid, *_ in FAMILIES_2D}
ALL.update({fid: ("t5", "alibi", "softcap", "sinks", "hs") for fid, *_ in FAMILIES_1D})
ALL["na1d_dilated"] = ("rpb", "t5", "alibi", "softcap", "sinks", "hs")


@pytest.mark.parametrize("fid, kind", SWEEP, ids=[f"{f}-{k}" for f, k in SWEEP])
def test_each_modifier_fp32(fid, kind):
    pattern, problem, q_tile = FAMILY[fid]
    run_case(pattern, problem, (kind,), F32, q_tile=q_tile)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("fid", list(ALL))
def test_every_modifier_together(fid, dtype):
    pattern, problem, q_tile = FAMILY[fid]
    run_case(pattern, problem, ALL[fid], dtype, q_tile=q_tile, seed=1)


#: through the ops on the Triton interpreter: a bias table (relative positions; T5 in 1-D) with
#: every other modifier, the LSE's gradient included (the kernels read one table)
INTERPRETED = {"blocks_offset": ("rpb", "softcap", "sinks", "hs"),
               "perhead_blocks_grid_gqa": ("rpb", "softcap", "sinks", "hs"),
               "na1d_dilated": ("t5", "alibi", "softcap", "sinks", "hs")}


@pytest.mark.parametrize("fid", list(INTERPRETED))
def test_table_biases_on_the_interpreter(fid):
    pattern, problem, q_tile = FAMILY[fid]
    problem = sf.Problem(grid=problem.grid, heads=problem.heads, kv_heads=problem.kv_heads, head_dim=16, dtype=F32)
    run_case(pattern, problem, INTERPRETED[fid], F32, q_tile=q_tile, seed=2, backend="interpret")


def test_empty_rows_with_sinks_have_lse_sink():
    """A row the pattern leaves empty (never visited by a chunk) outputs zeros with LSE = sink."""
    pattern, problem = sf.Blocks(4) & sf.GlobalTokens((1,)), P(19)
    sinks = torch.tensor([0.5, -1.0])
    attn = compile(pattern, problem, backend="cpu", modifiers=(sf.Sinks(sinks),), q_tile=(4,))
    q = torch.randn(1, 2, 19, 8)
    out, lse = attn(q, q, q, modifiers=(sf.Sinks(sinks),), return_lse=True)
    empty = ~sf.dense_mask(pattern, problem).any(-1)
    assert empty.any()
    assert (out[0][empty] == 0).all()
    assert torch.equal(lse[0][empty], sinks[:, None].expand(2, 19)[empty])
    run_case(pattern, problem, ("sinks", "softcap"), F32, q_tile=(4,))


# -- determinism ------------------------------------------------------------------------------------
def test_gradients_are_bitwise_deterministic():
    """Two backward runs give bitwise identical gradients of q, k, v and every modifier tensor
    (fixed chunk order, index_add_ on the CPU, float64 sums; no atomics)."""
    torch.manual_seed(0)
    pattern, problem = sf.Neighborhood(5, dilation=2), P((12, 14), heads=4, kv_heads=2)
    gen = torch.Generator().manual_seed(3)
    mods = (make("rpb", pattern, problem, gen), make("softcap", pattern, problem, gen),
            make("sinks", pattern, problem, gen))
    hs = make("hs", pattern, problem, gen)
    attn = compile(pattern, problem, backend="cpu", modifiers=mods, head_scale=True, q_tile=(4, 8))
    q, k, v = (rand(s, F32, gen) for s in ((2, 4, 168, 8), (2, 2, 168, 8), (2, 2, 168, 8)))
    do = rand((2, 4, 168, 8), F32, gen)

    def grads():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        m, h = with_grad(mods, hs)
        out = attn(*leaves, modifiers=m, scale=h)
        return torch.autograd.grad(out, (*leaves, *modifier_tensors(check_modifiers(m, pattern, problem), h)), do)

    first, second = grads(), grads()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    with torch.inference_mode(False):
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            third = grads()
        finally:
            torch.set_num_threads(threads)
    for a, b in zip(first[3:], third[3:]):   # the modifier sums do not depend on the thread count
        assert torch.equal(a, b)


# -- the per-pair lookup is the reference's bias ------------------------------------------------
@pytest.mark.parametrize("fid", ["na2d_dilated", "blocks_offset", "grid", "halo", "sliding2d",
                                 "perhead_blocks_grid_gqa", "na1d_dilated"])
def test_lookup_is_the_reference_bias(fid):
    pattern, problem, _ = FAMILY[fid]
    gen = torch.Generator().manual_seed(0)
    mods = [make("rpb", pattern, problem, gen)]
    if problem.ndim == 1:
        mods += [make("t5", pattern, problem, gen), make("alibi", pattern, problem, gen)]
    n = problem.tokens
    qi, ki = torch.arange(n), torch.arange(n)
    allowed = sf.dense_mask(pattern, problem)
    head = torch.arange(problem.heads)[:, None, None]
    for mod in mods:
        want = mod.bias(pattern, problem, qi, ki)                                   # [H, N, N]
        index, coef = bias_lookup(mod, pattern, problem, head, qi[None, :, None], ki[None, None, :])
        got = mod.tensors()[0].double().reshape(-1)[index] * (1 if coef is None else coef)
        assert torch.equal(got[allowed], want.expand_as(got)[allowed]), mod
        assert int(index.min()) >= 0 and int(index.max()) < mod.tensors()[0].numel()


def test_modifier_tensors_order_and_inverse():
    pattern, problem = sf.SlidingWindow(3, 2), P(20)
    gen = torch.Generator().manual_seed(0)
    rpb, t5, al, cap, sk = (make(kind, pattern, problem, gen) for kind in ("rpb", "t5", "alibi", "softcap", "sinks"))
    hs = make("hs", pattern, problem, gen)
    mods = check_modifiers((sk, t5, cap, rpb, al), pattern, problem)
    flat = modifier_tensors(mods, hs)
    assert [t for t in flat] == [t5.table, rpb.table, al.slopes, sk.logits, hs]
    spec = modifier_spec(mods, True)
    assert spec == (t5.spec(), rpb.spec(), al.spec(), cap.spec(), sk.spec(), ("HeadScale",))
    assert hash(spec) is not None and modifier_spec(None, False) == () and modifier_spec(mods, False) == spec[:-1]
    back, scale = modifiers_from_tensors(mods, flat, True)
    assert scale is hs and modifier_spec(back, True) == spec
    assert [t for t in modifier_tensors(back, scale)] == list(flat)
    with pytest.raises(ValueError, match="params holds 4 tensor"):
        modifiers_from_tensors(mods, flat[:4], True)


# -- compile / call contract ---------------------------------------------------------------------
def _legacy_key(attn) -> str:
    """The kernel key exactly as it was computed before modifiers existed."""
    import hashlib
    import re

    seed, p, config = attn.schedule, attn.problem, attn.config
    content = json.dumps(dict(path=attn.path.name, pattern=seed.pattern.fingerprint(), heads=p.heads,
                              kv_heads=p.kv_heads, head_dim=p.head_dim, dtype="fp32", config=config.as_dict(),
                              scattered=repr(seed.scattered), grid_dims=len(p.grid)), sort_keys=True)
    stem = re.sub(r"_g[0-9x]+(?=_)", "", seed.name.rsplit("_", 1)[0])
    return f"{stem}_{hashlib.sha256(content.encode()).hexdigest()[:12]}"


def test_without_modifiers_nothing_changes(monkeypatch):
    pattern, problem = sf.Neighborhood(3, dilation=2), P((7, 9))
    plain = compile(pattern, problem)
    assert plain.kernel.key == _legacy_key(plain) and plain.kernel.spec == () and plain.modifier_spec == ()
    assert compile(pattern, problem, modifiers=()).kernel is plain.kernel
    assert plain.kernels().modifiers == ()
    gen = torch.Generator().manual_seed(0)
    mods = (make("rpb", pattern, problem, gen),)
    withm = compile(pattern, problem, modifiers=mods)
    assert withm.kernel is not plain.kernel and withm.kernel.key != plain.kernel.key
    assert "_rpb_" in withm.kernel.key and withm.kernel.spec == (mods[0].spec(),)
    # the Triton kernels of an entry are made for its spec (recorded, not rendered here)
    made = []
    monkeypatch.setattr(ops, "TritonKernels", lambda schedule, **kw: made.append(kw) or kw)
    try:
        assert withm.kernels()["modifiers"] == withm.kernel.spec and made[0]["interpret"] is False
    finally:
        withm.kernel.at(problem.grid).triton.clear()   # leave no stand-in in the registry
    # the same structure with other values: the same kernel
    again = compile(pattern, problem, modifiers=(make("rpb", pattern, problem, gen),))
    assert again.kernel is withm.kernel
    assert compile(pattern, problem, head_scale=True).kernel.key.split("_")[-2] == "hs"


def test_call_must_match_the_compiled_spec():
    pattern, problem = sf.Causal() & sf.SlidingWindow(5), P(24)
    gen = torch.Generator().manual_seed(0)
    t5, sk = make("t5", pattern, problem, gen), make("sinks", pattern, problem, gen)
    attn = compile(pattern, problem, backend="cpu", modifiers=(t5, sk))
    q = torch.randn(1, 2, 24, 8)
    attn(q, q, q, modifiers=(t5, sk))
    with pytest.raises(ValueError, match=r"modifiers=.*do not match the compiled ones"):
        attn(q, q, q)
    with pytest.raises(ValueError, match=r"modifiers=.*do not match the compiled ones"):
        attn(q, q, q, modifiers=(sk, t5, sf.Softcap(3.0)))
    with pytest.raises(ValueError, match=r"modifiers=.*do not match.*fp64"):
        attn(q, q, q, modifiers=(t5.with_tensors(t5.table.double()), sk))
    with pytest.raises(ValueError, match=r"modifiers=.*compiled without modifiers"):
        compile(pattern, problem, backend="cpu")(q, q, q, modifiers=(sk,))
    with pytest.raises(ValueError, match=r"modifiers\[0\] \(Sinks\): logits has shape \[3\], expected \[2\]"):
        attn(q, q, q, modifiers=(sf.Sinks(torch.zeros(3)), t5))
    with pytest.raises(ValueError, match=r"table is on meta, but q is on cpu"):
        attn(q, q, q, modifiers=(t5.with_tensors(torch.zeros(2, 8, device="meta")), sk))
    with pytest.raises(TypeError, match=r"modifiers\[0\] must be a sparseforge modifier"):
        attn(q, q, q, modifiers=("bias", sk))


@pytest.mark.parametrize("call, exc, match", [
    (lambda: compile(sf.Blocks(4), P((8, 8)), modifiers=(sf.RelativePositionBias(torch.zeros(2, 7, 6)),)),
     ValueError, r"table has shape \[2, 7, 6\], expected \[2, 7, 7\]"),
    (lambda: compile(sf.Causal(), P(16), modifiers=(sf.RelativePositionBias(torch.zeros(2, 7)),)),
     ValueError, r"has no window to measure relative positions"),
    (lambda: sf.RelativePositionBias(torch.zeros(2, 7, 7, dtype=torch.int64)), TypeError,
     r"table must have a floating"),
    (lambda: sf.Softcap(0.0), ValueError, r"cap must be a finite float > 0, got 0.0"),
    (lambda: sf.Softcap(-2), ValueError, r"cap must be a finite float > 0, got -2"),
    (lambda: compile(sf.Blocks(4), P((8, 8)), modifiers=(sf.ALiBi(torch.ones(2)),)), ValueError,
     r"ALiBi is a 1-D relative position bias"),
    (lambda: compile(sf.Blocks(4), P((8, 8)), head_scale=1), TypeError, r"head_scale must be a bool"),
    (lambda: compile(sf.Grouped(), P(8), modifiers=(sf.ALiBi(torch.ones(2)),)), ValueError,
     r"\['ALiBi'\] measure token positions.*Grouped\(\) & Full\(\)"),
    (lambda: compile(sf.Blocks(4), P((8, 8)), modifiers="x"), TypeError,
     r"modifiers must be a tuple"),
])
def test_compile_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_scale_errors():
    pattern, problem = sf.Blocks(4), P((8, 8))
    q = torch.randn(1, 2, 64, 8)
    plain = compile(pattern, problem, backend="cpu")
    with pytest.raises(ValueError, match=r"scale is a tensor of shape \[2\].*compiled with head_scale=False"):
        plain(q, q, q, scale=torch.ones(2))
    per_head = compile(pattern, problem, backend="cpu", head_scale=True)
    with pytest.raises(ValueError, match=r"scale must be a \[heads=2\] tensor .*got 0.5"):
        per_head(q, q, q, scale=0.5)
    with pytest.raises(ValueError, match=r"scale has shape \[3\], expected \[2\]"):
        per_head(q, q, q, scale=torch.ones(3))
    with pytest.raises(TypeError, match=r"scale must have a floating dtype"):
        per_head(q, q, q, scale=torch.ones(2, dtype=torch.int64))
    out = per_head(q, q, q, scale=torch.full((2,), 0.25, dtype=F64))
    assert torch.allclose(out, plain(q, q, q, scale=0.25), atol=1e-6)


def test_scattered_takes_softcap_sinks_and_head_scale():
    """Position-free modifiers on the segment path (voxels): vs the reference in voxel layout."""
    pattern, problem = sf.Scattered(3), sf.Problem(heads=2, head_dim=8, dtype=F64)
    gen = torch.Generator().manual_seed(0)
    coords = torch.cat([torch.randint(0, 2, (20, 1), generator=gen), torch.randint(0, 6, (20, 2), generator=gen)], 1)
    sinks = torch.randn(2, dtype=F64, generator=gen, requires_grad=True)
    hs = torch.tensor([0.3, 0.6], dtype=F64, requires_grad=True)
    mods = (sf.Softcap(2.0), sf.Sinks(sinks))
    attn = compile(pattern, problem, backend="cpu", modifiers=mods, head_scale=True)
    q, k, v = (torch.randn(20, 2, 8, dtype=F64, generator=gen, requires_grad=True) for _ in range(3))
    out = attn(q, k, v, coords=coords, modifiers=mods, scale=hs)
    ref = sf.reference_attention(q, k, v, pattern, problem, coords=coords, modifiers=mods, scale=hs)
    assert (out - ref).abs().max() < 1e-12
    g = torch.autograd.grad(out.square().sum(), (q, k, v, sinks, hs))
    w = torch.autograd.grad(ref.square().sum(), (q, k, v, sinks, hs))
    for a, b in zip(g, w):
        assert (a - b).abs().max() < 1e-11
    with pytest.raises(ValueError, match="needs a token grid"):
        compile(pattern, problem, modifiers=(sf.RelativePositionBias(torch.zeros(2, 5)),))


def test_gradcheck_float64_every_modifier_tensor():
    pattern, problem = sf.Neighborhood(3), P(10, heads=2, head_dim=4, kv_heads=1)
    gen = torch.Generator().manual_seed(0)
    rpb, t5, sk = (make(kind, pattern, problem, gen, F64) for kind in ("rpb", "t5", "sinks"))
    hs = make("hs", pattern, problem, gen, F64)
    attn = compile(pattern, problem, backend="cpu", q_tile=(4,), modifiers=(rpb, t5, sf.Softcap(2.0), sk),
                   head_scale=True)
    q, k, v = (rand(s, F64, gen, True) for s in ((1, 2, 10, 4), (1, 1, 10, 4), (1, 1, 10, 4)))
    leaves = [t.detach().clone().requires_grad_() for t in (rpb.table, t5.table, sk.logits, hs)]

    def f(q, k, v, table, t5_table, logits, scale):
        mods = (rpb.with_tensors(table), t5.with_tensors(t5_table), sf.Softcap(2.0), sk.with_tensors(logits))
        return attn(q, k, v, modifiers=mods, scale=scale, return_lse=True)
    assert torch.autograd.gradcheck(f, (q, k, v, *leaves), fast_mode=True)


# -- torch.compile ---------------------------------------------------------------------------------
def test_torch_compile_dynamic_one_graph_with_modifiers():
    """fullgraph + dynamic=True over a 1-D attention with T5, ALiBi, softcap, sinks and a
    per-head scale at three lengths: one graph, no break, no new op; values match eager."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pattern, problem = sf.Causal() & sf.SlidingWindow(6), P(24, kv_heads=1)
    gen = torch.Generator().manual_seed(0)
    t5, al, cap, sk = (make(kind, pattern, problem, gen) for kind in ("t5", "alibi", "softcap", "sinks"))
    table, logits = (torch.nn.Parameter(t.clone()) for t in (t5.table, sk.logits))
    hs = torch.nn.Parameter(make("hs", pattern, problem, gen))
    attn = compile(pattern, problem, modifiers=(t5, al, cap, sk), head_scale=True)
    ops_before = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("sparseforge::")}

    def f(q, k, v):
        mods = (sf.T5Bias(table, max_distance=12, bidirectional=False), al, cap, sf.Sinks(logits))
        out, lse = attn(q, k, v, modifiers=mods, scale=hs, return_lse=True)
        return out.square().sum() + lse.sum()

    cf = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for i, n in enumerate((24, 31, 40)):
        g2 = torch.Generator().manual_seed(i)
        q, k, v = (rand(s, F32, g2, True) for s in ((2, 2, n, 8), (2, 1, n, 8), (2, 1, n, 8)))
        got = torch.autograd.grad(cf(q, k, v), (q, k, v, table, logits, hs))
        want = torch.autograd.grad(f(q, k, v), (q, k, v, table, logits, hs))
        for a, b in zip(got, want):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("sparseforge::")} == ops_before
    assert len(ops_before) == len(ops.OPS) == 4
    torch._dynamo.reset()
