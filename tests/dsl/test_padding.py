"""Padding and per-sample grids in ``reference_attention``: a key padding mask, per-sample
lengths (right or left padded) and per-sample grids (``sizes``). NaN stored in padding never
reaches an output or a gradient; padded query rows output zeros with LSE = -inf; each sample
equals the sample run alone on its own grid (windows clamped at its own border, checked
against NATTEN's rule written out)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sparseforge as sf

from .test_modifiers import model_attention, natten_mask_and_bias

F64 = torch.float64


def randn(*shape, gen):
    return torch.randn(*shape, generator=gen, dtype=F64)


def qkv(gen, b, h, n, d, kv_heads=None):
    return randn(b, h, n, d, gen=gen), randn(b, kv_heads or h, n, d, gen=gen), randn(b, kv_heads or h, n, d, gen=gen)


def poison(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``t`` [B, H, N, D] with NaN (and one Inf) at every padded token (valid [B, N] False)."""
    out = t.clone()
    pad = ~valid
    out[pad[:, None, :, None].expand_as(out)] = math.nan
    if pad.any():
        b, n = pad.nonzero()[0].tolist()
        out[b, 0, n, 0] = math.inf
    return out


def close(a, b, tol=1e-11):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.equal(torch.isneginf(a), torch.isneginf(b))
    fin = torch.isfinite(b)
    assert torch.isfinite(a[fin]).all()
    if fin.any():
        err = ((a[fin] - b[fin]).abs().max() / b[fin].abs().max().clamp_min(1e-30)).item()
        assert err < tol, err


def alone(q, k, v, b, idx, grid, pattern, problem, **kw):
    """Sample b's real tokens ``idx`` run on their own grid: [H, n, D] out and [H, n] LSE."""
    sub = problem.with_grid(grid)
    out, lse = sf.reference_attention(q[b:b + 1, :, idx], k[b:b + 1, :, idx], v[b:b + 1, :, idx], pattern, sub,
                                      return_lse=True, **kw)
    return out[0], lse[0]


def assert_each_sample_alone(got, lse, inputs, qkv_clean, valid, samples, pattern, problem, **kw):
    """A padded batch's out/LSE: sample b's real tokens ``samples[b] = (idx, grid)`` equal that
    sample run alone on its own grid; padded rows are zeros with LSE -inf; and the gradients
    reaching the (NaN-poisoned) ``inputs`` are finite and zero at every padded token."""
    q, k, v = qkv_clean
    for b, (idx, grid) in enumerate(samples):
        if len(idx):
            o, l = alone(q, k, v, b, idx, grid, pattern, problem, **kw)
            close(got[b][:, idx], o, 1e-13)
            close(lse[b][:, idx], l, 1e-13)
        pad = ~valid[b]
        assert torch.equal(got[b][:, pad], torch.zeros_like(got[b][:, pad]))
        assert torch.isneginf(lse[b][:, pad]).all()
    got.sum().backward()
    for t in inputs:
        assert torch.isfinite(t.grad).all() and (t.grad[(~valid)[:, None, :, None].expand_as(t.grad)] == 0).all()


def box(grid, size) -> torch.Tensor:
    coords = np.array(list(np.ndindex(*grid)))
    keep = np.all(coords < np.array(size), axis=1)
    return torch.from_numpy(np.flatnonzero(keep))


# ------------------------------------------------------------------------------------
# key_padding_mask: the pattern at the tokens' full-grid positions, padded tokens removed
# ------------------------------------------------------------------------------------
KPM = [(sf.Neighborhood(3), (5, 6)), (sf.SlidingWindow(3, 1), (14,)), (sf.Causal(), (12,)),
       (sf.Blocks(3, offset=1) | sf.Sink(1), (11,))]


@pytest.mark.parametrize("pattern,grid", KPM, ids=[repr(c[0]) for c in KPM])
def test_key_padding_mask_contains_nan(pattern, grid):
    gen = torch.Generator().manual_seed(len(repr(pattern)))
    problem = sf.Problem(grid=grid, heads=2, head_dim=3, kv_heads=1)
    n = problem.tokens
    valid = torch.rand(3, n, generator=gen) < 0.7
    valid[2] = False                                      # a sample with no real token at all
    q, k, v = qkv(gen, 3, 2, n, 3, kv_heads=1)
    sinks = randn(2, gen=gen)
    mask = sf.dense_mask(pattern, problem)[None] & valid[:, None, None, :] & valid[:, None, :, None]
    want, want_lse = model_attention(q, k, v, mask, scale=0.6, sinks=sinks)
    pad = ~valid[:, None, :]
    want = torch.where(pad[..., None], 0.0, want)
    want_lse = torch.where(pad, -math.inf, want_lse)
    inputs = [poison(t, valid).requires_grad_() for t in (q, k, v)]
    got, lse = sf.reference_attention(*inputs, pattern, problem, scale=0.6, key_padding_mask=valid,
                                      modifiers=(sf.Sinks(sinks),), return_lse=True)
    close(got, want)
    close(lse, want_lse)
    assert torch.equal(got[pad[..., None].expand_as(got)], torch.zeros(int(pad.sum()) * 2 * 3, dtype=F64))
    (got.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
    for t in inputs:
        assert torch.isfinite(t.grad).all()
        assert (t.grad[(~valid)[:, None, :, None].expand_as(t.grad)] == 0).all()


def test_key_padding_mask_keeps_full_grid_positions():
    """Right padding on a shift-invariant pattern (Causal & SlidingWindow) equals lengths; on
    a clamped window (Neighborhood) the mask keeps the full grid's clamping, lengths the sample's."""
    gen = torch.Generator().manual_seed(3)
    problem = sf.Problem(grid=(12,), heads=1, head_dim=4)
    q, k, v = qkv(gen, 2, 1, 12, 4)
    lengths = torch.tensor([12, 7])
    valid = torch.arange(12)[None] < lengths[:, None]
    for pattern, equal in ((sf.SlidingWindow(3), True), (sf.Neighborhood(5), False)):
        a = sf.reference_attention(q, k, v, pattern, problem, key_padding_mask=valid)
        b = sf.reference_attention(q, k, v, pattern, problem, lengths=lengths)
        close(a[0], b[0], 1e-13)
        assert torch.allclose(a[1], b[1], atol=1e-13) == equal


# ------------------------------------------------------------------------------------
# lengths (1-D): each sample is its own sequence
# ------------------------------------------------------------------------------------
LENGTHS = [
    ("natten", sf.Neighborhood(5), [16, 9, 5, 0]),
    ("window_sink", sf.Causal() & (sf.SlidingWindow(3) | sf.Sink(2)), [16, 9, 5, 0]),
    ("blocks_offset", sf.Blocks(4, offset=2), [16, 9, 5, 0]),
    ("documents", sf.Documents((3, 5, 8)) & sf.Causal(), [16, 16, 16, 16]),   # Documents fixes the length
]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pattern,lengths", [c[1:] for c in LENGTHS], ids=[c[0] for c in LENGTHS])
def test_lengths_each_sample_alone(side, pattern, lengths):
    gen = torch.Generator().manual_seed(17 + (side == "left"))
    n = 16
    problem = sf.Problem(grid=(n,), heads=2, head_dim=3)
    q, k, v = qkv(gen, 4, 2, n, 3)
    valid = torch.zeros(4, n, dtype=torch.bool)
    for b, L in enumerate(lengths):
        valid[b, :L] = True
    if side == "left":
        valid = valid.flip(1)
    alibi = sf.ALiBi(torch.tensor([0.5, 0.25], dtype=F64))
    inputs = [poison(t, valid).requires_grad_() for t in (q, k, v)]
    got, lse = sf.reference_attention(*inputs, pattern, problem, lengths=torch.tensor(lengths), padding_side=side,
                                      modifiers=(alibi, sf.Softcap(4.0)), return_lse=True)
    samples = [(torch.nonzero(valid[b]).flatten(), (L,)) for b, L in enumerate(lengths)]
    assert_each_sample_alone(got, lse, inputs, (q, k, v), valid, samples, pattern, problem,
                             modifiers=(alibi, sf.Softcap(4.0)))


def test_left_padded_natten_clamps_at_the_samples_own_border():
    """NATTEN's window, written out, on the sample's own length, placed at the end."""
    gen = torch.Generator().manual_seed(5)
    n, L, kernel = 14, 8, 5
    problem = sf.Problem(grid=(n,), heads=1, head_dim=4)
    q, k, v = qkv(gen, 1, 1, n, 4)
    rpb = randn(1, 2 * kernel - 1, gen=gen)
    got = sf.reference_attention(q, k, v, sf.Neighborhood(kernel), problem, lengths=[L], padding_side="left",
                                 modifiers=(sf.RelativePositionBias(rpb),))
    mask, bias = natten_mask_and_bias((L,), kernel, 1, rpb)
    want, _ = model_attention(q[:, :, n - L:], k[:, :, n - L:], v[:, :, n - L:], mask, scale=0.5, bias=bias)
    close(got[:, :, n - L:], want)
    assert torch.equal(got[:, :, :n - L], torch.zeros(1, 1, n - L, 4, dtype=F64))


def test_lengths_with_groups_slice_the_group_ids():
    gen = torch.Generator().manual_seed(8)
    n = 10
    problem = sf.Problem(grid=(n,), heads=1, head_dim=4)
    q, k, v = qkv(gen, 2, 1, n, 4)
    groups = torch.randint(0, 3, (2, n), generator=gen)
    got = sf.reference_attention(q, k, v, sf.Grouped(), problem, groups=groups, lengths=[10, 6],
                                 padding_side="left")
    want = sf.reference_attention(q[1:, :, 4:], k[1:, :, 4:], v[1:, :, 4:], sf.Grouped(), problem.with_grid((6,)),
                                  groups=groups[1:, 4:])
    close(got[1:, :, 4:], want, 1e-13)


# ------------------------------------------------------------------------------------
# sizes: per-sample grids
# ------------------------------------------------------------------------------------
SIZES = [
    (sf.Neighborhood(3, dilation=2), (8, 9), [[8, 9], [6, 7], [7, 6]]),
    (sf.Neighborhood((3, 5)), (7, 8), [[3, 5], [7, 8], [5, 6]]),
    (sf.Blocks(4, offset=2), (9, 10), [[9, 10], [5, 7], [0, 3]]),
    (sf.Grid(2), (8, 8), [[8, 8], [4, 6], [2, 2]]),
    (sf.Halo(2, 1) & sf.Causal(), (6, 5), [[6, 5], [3, 4], [6, 2]]),
    (sf.Neighborhood((2, 3, 3)), (3, 4, 5), [[3, 4, 5], [2, 3, 4], [3, 3, 3]]),
]


@pytest.mark.parametrize("pattern,grid,sizes", SIZES, ids=[repr(c[0]) for c in SIZES])
def test_sizes_each_sample_alone(pattern, grid, sizes):
    gen = torch.Generator().manual_seed(sum(grid))
    problem = sf.Problem(grid=grid, heads=2, head_dim=3, kv_heads=1)
    n = problem.tokens
    b_ = len(sizes)
    q, k, v = qkv(gen, b_, 2, n, 3, kv_heads=1)
    valid = torch.stack([torch.isin(torch.arange(n), box(grid, s)) for s in sizes])
    mods = ()
    if not isinstance(pattern, sf.Intersection):
        mods = (sf.RelativePositionBias(randn(*sf.relative_position_bias_shape(pattern, problem), gen=gen)),
                sf.Sinks(randn(2, gen=gen)))
    inputs = [poison(t, valid).requires_grad_() for t in (q, k, v)]
    got, lse = sf.reference_attention(*inputs, pattern, problem, sizes=torch.tensor(sizes), modifiers=mods,
                                      return_lse=True)
    samples = [(box(grid, s), tuple(s)) for s in sizes]
    assert_each_sample_alone(got, lse, inputs, (q, k, v), valid, samples, pattern, problem, modifiers=mods)


def test_sizes_natten_written_out():
    """Sample b of a 2-D batch is NATTEN on its own sizes[b] grid (windows shifted inward at
    its own border), with NATTEN's rpb."""
    gen = torch.Generator().manual_seed(9)
    grid, kernel = (8, 9), 3
    problem = sf.Problem(grid=grid, heads=1, head_dim=4)
    q, k, v = qkv(gen, 2, 1, 72, 4)
    rpb = randn(1, 5, 5, gen=gen)
    sizes = [[5, 7], [8, 3]]
    got = sf.reference_attention(q, k, v, sf.Neighborhood(kernel), problem, sizes=sizes,
                                 modifiers=(sf.RelativePositionBias(rpb),))
    for b, s in enumerate(sizes):
        idx = box(grid, s)
        mask, bias = natten_mask_and_bias(tuple(s), kernel, 1, rpb)
        want, _ = model_attention(q[b:b + 1, :, idx], k[b:b + 1, :, idx], v[b:b + 1, :, idx], mask, scale=0.5,
                                  bias=bias)
        close(got[b:b + 1, :, idx], want)


def test_full_sizes_equal_no_padding():
    gen = torch.Generator().manual_seed(10)
    problem = sf.Problem(grid=(5, 6), heads=2, head_dim=3)
    q, k, v = qkv(gen, 2, 2, 30, 3)
    a = sf.reference_attention(q, k, v, sf.Neighborhood(3), problem)
    b = sf.reference_attention(q, k, v, sf.Neighborhood(3), problem, sizes=[[5, 6], [5, 6]])
    c = sf.reference_attention(q, k, v, sf.Neighborhood(3), problem, lengths=None,
                               key_padding_mask=torch.ones(2, 30, dtype=torch.bool))
    close(b, a, 1e-13)
    assert torch.equal(c, a)


def test_routed_per_sample_routes_on_its_own_tokens():
    gen = torch.Generator().manual_seed(12)
    pattern, problem = sf.Routed(2, 2), sf.Problem(grid=(6, 6), heads=1, head_dim=4)
    q, k, v = qkv(gen, 2, 1, 36, 4)
    valid = torch.stack([torch.isin(torch.arange(36), box((6, 6), s)) for s in ([6, 6], [4, 6])])
    got = sf.reference_attention(poison(q, valid), poison(k, valid), poison(v, valid), pattern, problem,
                                 sizes=[[6, 6], [4, 6]])
    idx = box((6, 6), (4, 6))
    o, _ = alone(q, k, v, 1, idx, (4, 6), pattern, problem)
    close(got[1][:, idx], o, 1e-13)
    assert torch.isfinite(got).all()


def test_gradcheck_padding_with_modifiers():
    gen = torch.Generator().manual_seed(13)
    problem = sf.Problem(grid=(3, 4), heads=1, head_dim=2)
    q, k, v = qkv(gen, 2, 1, 12, 2)
    table, sinks, scale = randn(1, 3, 3, gen=gen), randn(1, gen=gen), torch.tensor([0.8], dtype=F64)
    inputs = [t.requires_grad_() for t in (q, k, v, table, sinks, scale)]

    def f(q, k, v, table, sinks, scale):
        return sf.reference_attention(q, k, v, sf.Blocks(2, offset=1), problem, sizes=[[3, 3], [2, 4]], scale=scale,
                                      modifiers=(sf.RelativePositionBias(table), sf.Sinks(sinks), sf.Softcap(1.5)),
                                      return_lse=True)
    assert torch.autograd.gradcheck(lambda *a: tuple(torch.where(torch.isfinite(x), x, 0) for x in f(*a)), inputs)

    def g(q, k, v, sinks):
        return sf.reference_attention(q, k, v, sf.Neighborhood(3), problem.with_grid((12,)), lengths=[12, 7],
                                      padding_side="left", modifiers=(sf.Sinks(sinks),))
    assert torch.autograd.gradcheck(g, [inputs[0], inputs[1], inputs[2], inputs[4]])


# ------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------
P1 = sf.Problem(grid=(8,), heads=1, head_dim=2)
P2 = sf.Problem(grid=(4, 4), heads=1, head_dim=2)


@pytest.mark.parametrize("pattern, problem, kw, exc, match", [
    (sf.Full(), P1, dict(lengths=[8, 3], sizes=[[8], [3]]), ValueError,
     r"give at most one of key_padding_mask, lengths and sizes, got lengths and sizes"),
    (sf.Full(), P1, dict(lengths=[8, 9]), ValueError,
     r"lengths\[1\] must be in \[0, 8\] \(the sequence length\), got 9"),
    (sf.Full(), P1, dict(lengths=[8, -1]), ValueError, r"lengths\[1\] must be in \[0, 8\]"),
    (sf.Full(), P1, dict(lengths=[8]), ValueError, r"lengths has shape \[1\], expected \[2\] \[B=2\]"),
    (sf.Full(), P1, dict(lengths=[8.0, 3.0]), TypeError, r"lengths must hold ints \[B=2\], got \[8\.0, 3\.0\]"),
    (sf.Full(), P1, dict(lengths=torch.tensor([True, False])), TypeError, r"lengths must hold integers, got a "
     r"tensor of torch\.bool"),
    (sf.Full(), P1, dict(lengths=torch.tensor([8, 3], device="meta")), ValueError,
     r"lengths is on meta, but q is on cpu"),
    (sf.Full(), P2, dict(lengths=[16, 3]), ValueError, r"lengths applies to 1-D sequences, but the problem grid is "
     r"\(4, 4\); give sizes= \(\[B, 2\] per-sample grids\) or key_padding_mask="),
    (sf.Full(), P1, dict(lengths=[8, 3], padding_side="middle"), ValueError,
     r"padding_side must be 'right' or 'left', got 'middle'"),
    (sf.Full(), P1, dict(padding_side="left"), ValueError,
     r"padding_side='left' applies to lengths=, which was not given"),
    (sf.Full(), P2, dict(sizes=[[4, 4], [5, 1]]), ValueError,
     r"sizes\[1\]\[0\] must be in \[0, 4\] \(the grid extent\), got 5 \(sizes\[1\]=\[5, 1\], grid=\(4, 4\)\)"),
    (sf.Full(), P2, dict(sizes=[4, 4]), ValueError, r"sizes has shape \[2\], expected \[2, 2\] \[B=2, ndim=2\]"),
    (sf.Neighborhood(3), P2, dict(sizes=[[4, 4], [2, 4]]), ValueError,
     r"sizes\[1\]=\[2, 4\]: sample 1 is a grid of \(2, 4\), on which kernel_size=3 is larger than the grid"),
    (sf.Documents((4, 4)), P1, dict(lengths=[8, 5]), ValueError,
     r"lengths\[1\]=5: sample 1 is a grid of \(5,\), on which Documents lengths add up to 8"),
    (sf.Grid(2), P2, dict(sizes=[[4, 4], [3, 4]]), ValueError,
     r"sizes\[1\]=\[3, 4\]: .* Grid size=2 must divide the grid extent 3"),
    (sf.Full(), P1, dict(key_padding_mask=torch.ones(2, 8)), TypeError,
     r"key_padding_mask must be a bool tensor \(True = real token\), got torch\.float32"),
    (sf.Full(), P1, dict(key_padding_mask=torch.ones(2, 7, dtype=torch.bool)), ValueError,
     r"key_padding_mask has shape \[2, 7\], expected \[B=2, N=8\]"),
    (sf.Full(), P1, dict(key_padding_mask=[[True] * 8] * 2), TypeError,
     r"key_padding_mask must be a bool tensor \[B, N\], got list"),
    (sf.Routed(2, 1), P2, dict(key_padding_mask=torch.ones(2, 16, dtype=torch.bool)), ValueError,
     r"key_padding_mask with Routed\(2, 1\): its routing reads every token's q and k"),
])
def test_padding_errors(pattern, problem, kw, exc, match):
    q = torch.zeros(2, 1, problem.tokens, 2)
    with pytest.raises(exc, match=match):
        sf.reference_attention(q, q, q, pattern, problem, **kw)


def test_voxel_patterns_refuse_padding():
    coords = torch.tensor([[0, 0, 0], [0, 1, 0], [0, 2, 1]])
    q = torch.zeros(3, 1, 2)
    with pytest.raises(ValueError, match=r"sizes needs a token grid, but Scattered\(2\) takes its tokens from coords"):
        sf.reference_attention(q, q, q, sf.Scattered(2), sf.Problem(heads=1, head_dim=2), coords=coords,
                               sizes=[[1, 1]])


def test_routes_with_per_sample_grids_refused():
    pattern, problem = sf.Routed(2, 1), P2
    q = torch.zeros(1, 1, 16, 2)
    routes = torch.zeros(1, 1, 4, 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"routes= with sizes=: routes name regions of the full grid"):
        sf.reference_attention(q, q, q, pattern, problem, routes=routes, sizes=[[2, 2]])
