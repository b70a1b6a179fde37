"""Score modifiers in ``reference_attention`` against brute-force definitions written from
the models: Swin's relative_position_index on (shifted) windows, timm MaxViT's grid windows,
NATTEN's rpb (get_window_start / get_pb_start), timm HaloAttn's rel-to-abs layout, T5's
buckets, ALiBi, Gemma2's softcap, gpt-oss's sinks, Swin V2's per-head logit scale; gradients
of every modifier tensor by gradcheck; containment of NaN; argument errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sparseforge as sf
from sparseforge.dsl.modifiers import relative_position_index

F64 = torch.float64


def randn(*shape, gen):
    return torch.randn(*shape, generator=gen, dtype=F64)


def qkv(gen, b, h, n, d, kv_heads=None):
    return randn(b, h, n, d, gen=gen), randn(b, kv_heads or h, n, d, gen=gen), randn(b, kv_heads or h, n, d, gen=gen)


def model_attention(q, k, v, mask, *, scale, bias=None, softcap=None, sinks=None):
    """Attention as the models write it: scores (+ bias), Gemma2's softcap, an additive mask,
    softmax, or gpt-oss's softmax over [scores, sink] with the sink column dropped."""
    h = q.shape[1]
    k = k.repeat_interleave(h // k.shape[1], 1)
    v = v.repeat_interleave(h // v.shape[1], 1)
    sc = scale.view(1, h, 1, 1) if isinstance(scale, torch.Tensor) else scale
    s = q @ k.transpose(-1, -2) * sc
    if bias is not None:
        s = s + bias
    if softcap is not None:
        s = s / softcap
        s = torch.tanh(s)
        s = s * softcap
    s = s.masked_fill(~mask, -math.inf)
    if sinks is None:
        p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
        lse = torch.logsumexp(s, -1)
    else:
        sk = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], 1)
        combined = torch.cat([s, sk], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        p = torch.softmax(combined, dim=-1)[..., :-1]
        lse = torch.logsumexp(torch.cat([s, sk], dim=-1), -1)
    return p @ v, lse


def close(a, b, tol=1e-11):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    assert err < tol, err


# ------------------------------------------------------------------------------------
# Swin (shifted windows) and MaxViT (timm): relative_position_index is query minus key
# ------------------------------------------------------------------------------------
def swin_relative_position_index(wh: int, ww: int) -> torch.Tensor:
    """Swin's construction: [wh*ww, wh*ww] index into the ((2wh-1)*(2ww-1)) table."""
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = flat[:, :, None] - flat[:, None, :]
    rel = rel.permute(1, 2, 0).contiguous()
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    return rel.sum(-1)


def swin_window_attention(q, k, v, grid, window, shift, table, scale, logit_scale=None):
    """Swin's (shifted) window attention on [B, H, N, D] tokens of ``grid``: roll by -shift,
    window_partition, q.k * scale + table[relative_position_index] + shift mask (-inf for
    tokens of different regions), softmax, window_reverse, roll back. With ``logit_scale``
    (Swin V2): cosine attention, scale = exp(clamp(logit_scale, max=log(100))) per head."""
    b, h, n, d = q.shape
    hg, wg = grid
    w = window

    def to_windows(x):
        x = x.reshape(b, h, hg, wg, -1)
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(2, 3))
        x = x.view(b, h, hg // w, w, wg // w, w, -1).permute(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, h, -1, w * w, x.shape[-1])

    qw, kw, vw = to_windows(q), to_windows(k), to_windows(v)
    if logit_scale is not None:
        qw, kw = F.normalize(qw, dim=-1), F.normalize(kw, dim=-1)
        ls = torch.clamp(logit_scale, max=math.log(100.0)).exp().view(1, h, 1, 1, 1)
        attn = qw @ kw.transpose(-1, -2) * ls
    else:
        attn = qw @ kw.transpose(-1, -2) * scale
    bias = table[swin_relative_position_index(w, w).view(-1)].view(w * w, w * w, -1).permute(2, 0, 1)
    attn = attn + bias[None, :, None]
    if shift:
        img = torch.zeros(hg, wg)
        cnt = 0
        for hs in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
            for ws in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
                img[hs, ws] = cnt
                cnt += 1
        mw = img.view(hg // w, w, wg // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)
        attn_mask = (mw[:, None, :] - mw[:, :, None]) != 0
        attn = attn.masked_fill(attn_mask[None, None], -math.inf)
    out = torch.softmax(attn, -1) @ vw
    out = out.view(b, h, hg // w, wg // w, w, w, d).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, h, hg, wg, d)
    if shift:
        out = torch.roll(out, shifts=(shift, shift), dims=(2, 3))
    return out.reshape(b, h, n, d)


@pytest.mark.parametrize("grid,window,shift", [((8, 8), 4, 0), ((8, 8), 4, 2), ((6, 9), 3, 1)])
def test_swin_relative_position_bias_on_shifted_windows(grid, window, shift):
    gen = torch.Generator().manual_seed(100 + shift)
    h, d = 3, 4
    problem = sf.Problem(grid=grid, heads=h, head_dim=d)
    q, k, v = qkv(gen, 2, h, problem.tokens, d)
    swin_table = randn((2 * window - 1) ** 2, h, gen=gen)
    want = swin_window_attention(q, k, v, grid, window, shift, swin_table, d ** -0.5)
    rpb = sf.RelativePositionBias.from_swin(swin_table, (window, window))
    assert rpb.table.shape == sf.relative_position_bias_shape(sf.Blocks(window, offset=shift), problem)
    got = sf.reference_attention(q, k, v, sf.Blocks(window, offset=shift), problem, modifiers=(rpb,))
    close(got, want)


def test_swin_v2_per_head_logit_scale():
    gen = torch.Generator().manual_seed(7)
    grid, w, h, d = (8, 8), 4, 2, 4
    problem = sf.Problem(grid=grid, heads=h, head_dim=d)
    q, k, v = qkv(gen, 1, h, 64, d)
    table = randn(49, h, gen=gen)
    logit_scale = torch.log(10 * torch.rand(h, generator=gen, dtype=F64) + 1)
    want = swin_window_attention(q, k, v, grid, w, 2, table, None, logit_scale=logit_scale)
    scale = torch.clamp(logit_scale, max=math.log(100.0)).exp()
    got = sf.reference_attention(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, sf.Blocks(w, offset=2), problem,
                                 scale=scale, modifiers=(sf.RelativePositionBias.from_swin(table, w),))
    close(got, want)


def test_maxvit_grid_attention_relative_position_bias():
    """timm's grid_partition: view(B, G, H/G, G, W/G, C).permute(0, 2, 4, 1, 3, 5); windows
    of G x G tokens spread over the grid, biased by RelPosBias (Swin's index)."""
    gen = torch.Generator().manual_seed(11)
    hg, wg, g, h, d = 6, 8, 2, 2, 4
    problem = sf.Problem(grid=(hg, wg), heads=h, head_dim=d)
    q, k, v = qkv(gen, 2, h, hg * wg, d)
    table = randn((2 * g - 1) ** 2, h, gen=gen)

    def part(x):
        x = x.reshape(2, h, g, hg // g, g, wg // g, d).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(2, h, -1, g * g, d)
    attn = part(q) @ part(k).transpose(-1, -2) * d ** -0.5
    bias = table[swin_relative_position_index(g, g).view(-1)].view(g * g, g * g, h).permute(2, 0, 1)
    attn = attn + bias[None, :, None]
    out = torch.softmax(attn, -1) @ part(v)
    out = out.view(2, h, hg // g, wg // g, g, g, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(2, h, hg * wg, d)
    got = sf.reference_attention(q, k, v, sf.Grid(g), problem, modifiers=(sf.RelativePositionBias.from_swin(table, g),))
    close(got, out)


def test_maxvit_block_and_grid_heads_share_one_table_shape():
    pattern = sf.PerHead([sf.Blocks(4), sf.Grid(4)])
    problem = sf.Problem(grid=(8, 8), heads=2, head_dim=4)
    assert sf.relative_position_bias_shape(pattern, problem) == (2, 7, 7)
    gen = torch.Generator().manual_seed(12)
    q, k, v = qkv(gen, 1, 2, 64, 4)
    table = randn(2, 7, 7, gen=gen)
    got = sf.reference_attention(q, k, v, pattern, problem, modifiers=(sf.RelativePositionBias(table),))
    for head, part in enumerate(pattern.patterns):
        one = sf.Problem(grid=(8, 8), heads=1, head_dim=4)
        want = sf.reference_attention(q[:, head:head + 1], k[:, head:head + 1], v[:, head:head + 1], part, one,
                                      modifiers=(sf.RelativePositionBias(table[head:head + 1]),))
        close(got[:, head:head + 1], want, 1e-13)


# ------------------------------------------------------------------------------------
# NATTEN: rpb[h, pi + ki] for key ni + ki * dilation (NATTEN 0.15 CPU naive kernels)
# ------------------------------------------------------------------------------------
def natten_window_start(index, length, kernel, ns, dilation):
    if dilation <= 1:
        return max(index - ns, 0) + (index + ns >= length) * (length - index - ns - 1)
    ni = index - ns * dilation
    if ni < 0:
        return index % dilation
    if index + ns * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * ns * dilation
        return a + imodd - kernel * dilation
    return ni


def natten_pb_start(index, length, kernel, ns, dilation):
    if dilation <= 1:
        return ns + (index < ns) * (ns - index) + (index + ns >= length) * (length - index - 1 - ns)
    if index - ns * dilation < 0:
        return kernel - 1 - index // dilation
    if index + ns * dilation >= length:
        return (length - index - 1) // dilation
    return ns


def natten_mask_and_bias(grid, kernel, dilation, rpb):
    """Dense mask [N, N] and bias [H, N, N] of NATTEN's neighbourhood with rpb (N-D, separable)."""
    coords = list(np.ndindex(*grid))
    n = len(coords)
    per_dim = []
    for length in grid:
        rows = {}
        for i in range(length):
            ni = natten_window_start(i, length, kernel, kernel // 2, dilation)
            pi = natten_pb_start(i, length, kernel, kernel // 2, dilation)
            rows[i] = {ni + ki * dilation: pi + ki for ki in range(kernel)}
        per_dim.append(rows)
    mask = torch.zeros(n, n, dtype=torch.bool)
    bias = torch.zeros(rpb.shape[0], n, n, dtype=rpb.dtype)
    for a, qc in enumerate(coords):
        for b, kc in enumerate(coords):
            idx = [per_dim[d][qc[d]].get(kc[d]) for d in range(len(grid))]
            if all(i is not None for i in idx):
                mask[a, b] = True
                bias[:, a, b] = rpb[(slice(None),) + tuple(idx)]
    return mask, bias


@pytest.mark.parametrize("grid,kernel,dilation", [((11,), 5, 1), ((13,), 3, 3), ((7, 8), 3, 1), ((9, 10), 3, 2),
                                                  ((6, 5), 5, 1)])
def test_natten_rpb_as_is(grid, kernel, dilation):
    gen = torch.Generator().manual_seed(sum(grid) + kernel + dilation)
    h, d = 2, 3
    problem = sf.Problem(grid=grid, heads=h, head_dim=d)
    pattern = sf.Neighborhood(kernel, dilation=dilation)
    rpb = randn(h, *([2 * kernel - 1] * len(grid)), gen=gen)
    assert sf.relative_position_bias_shape(pattern, problem) == tuple(rpb.shape)
    mask, bias = natten_mask_and_bias(grid, kernel, dilation, rpb)
    assert torch.equal(sf.dense_mask(pattern, problem)[0], mask)
    q, k, v = qkv(gen, 2, h, problem.tokens, d)
    want, want_lse = model_attention(q, k, v, mask, scale=d ** -0.5, bias=bias)
    got, lse = sf.reference_attention(q, k, v, pattern, problem, modifiers=(sf.RelativePositionBias(rpb),),
                                      return_lse=True)
    close(got, want)
    close(lse, want_lse)


# ------------------------------------------------------------------------------------
# HaloNet (timm HaloAttn's rel_logits_1d: pad trick from relative to absolute indexing)
# ------------------------------------------------------------------------------------
def timm_rel_to_abs_index(block: int, win: int) -> torch.Tensor:
    """[block, win]: the relative index timm's rel_logits_1d reads for query i of a block and
    key j of the halo window (applied to an index-valued 'logit')."""
    rel_size = 2 * win - 1
    x = torch.arange(rel_size, dtype=F64).repeat(block, 1)[None]
    x_pad = F.pad(x, [0, 1]).flatten(1)
    x_pad = F.pad(x_pad, [0, rel_size - block])
    x_pad = x_pad.reshape(-1, block + 1, rel_size)
    return x_pad[:, :block, win - 1:][0].long()


@pytest.mark.parametrize("grid,block,halo", [((8, 6), 2, 1), ((9,), 3, 2)])
def test_halo_timm_layout(grid, block, halo):
    gen = torch.Generator().manual_seed(block * 10 + halo)
    h, d = 2, 3
    problem = sf.Problem(grid=grid, heads=h, head_dim=d)
    pattern = sf.Halo(block, halo)
    win = block + 2 * halo
    table = randn(h, *([2 * win - 1] * len(grid)), gen=gen)
    assert sf.relative_position_bias_shape(pattern, problem) == tuple(table.shape)
    idx = timm_rel_to_abs_index(block, win)
    coords = list(np.ndindex(*grid))
    n = len(coords)
    mask = sf.dense_mask(pattern, problem)[0]
    bias = torch.zeros(h, n, n, dtype=F64)
    for a, qc in enumerate(coords):
        for b, kc in enumerate(coords):
            if mask[a, b]:
                pos = []
                for dd in range(len(grid)):
                    start = (qc[dd] // block) * block
                    pos.append(idx[qc[dd] - start, kc[dd] - (start - halo)])
                bias[:, a, b] = table[(slice(None),) + tuple(pos)]
    q, k, v = qkv(gen, 1, h, n, d)
    want, _ = model_attention(q, k, v, mask, scale=d ** -0.5, bias=bias)
    got = sf.reference_attention(q, k, v, pattern, problem, modifiers=(sf.RelativePositionBias(table),))
    close(got, want)


def test_sliding_window_table_holds_its_offsets():
    """SASA-style: one entry per offset -left..right, index k - q + left."""
    gen = torch.Generator().manual_seed(3)
    pattern, problem = sf.SlidingWindow(3, 1), sf.Problem(grid=(12,), heads=2, head_dim=4)
    assert sf.relative_position_bias_shape(pattern, problem) == (2, 5)
    table = randn(2, 5, gen=gen)
    i = torch.arange(12)
    rel = i[None, :] - i[:, None]
    mask = (rel >= -3) & (rel <= 1)
    bias = table[:, (rel + 3).clamp(0, 4)]
    q, k, v = qkv(gen, 2, 2, 12, 4)
    want, _ = model_attention(q, k, v, mask, scale=0.5, bias=bias)
    close(sf.reference_attention(q, k, v, pattern, problem, scale=0.5, modifiers=(sf.RelativePositionBias(table),)),
          want)


RANGE_CASES = [
    (sf.Neighborhood(5), (13,)), (sf.Neighborhood(4), (9,)), (sf.Neighborhood(3, dilation=3), (14,)),
    (sf.Neighborhood(5, stride=3), (17,)), (sf.Neighborhood(4, stride=4, causal=True), (15,)),
    (sf.Neighborhood((3, 5), dilation=(2, 1), stride=(1, 2), causal=(True, False)), (9, 11)),
    (sf.Blocks(4, offset=3), (11,)), (sf.Blocks((2, 3), offset=(1, 2)), (5, 7)), (sf.Grid(3), (9, 6)),
    (sf.Halo(3, 2), (11,)), (sf.SlidingWindow(2, 3), (10,)), (sf.Neighborhood(3) & sf.Causal(), (9,)),
    (sf.PerHead([sf.Blocks(3), sf.Grid(3), sf.Neighborhood(3)]), (6, 6)),
]


@pytest.mark.parametrize("pattern,grid", RANGE_CASES, ids=[repr(c[0]) for c in RANGE_CASES])
def test_index_inside_table_at_every_allowed_pair(pattern, grid):
    heads = len(pattern.patterns) if isinstance(pattern, sf.PerHead) else 1
    problem = sf.Problem(grid=grid, heads=heads)
    shape = sf.relative_position_bias_shape(pattern, problem)
    n = problem.tokens
    idx = relative_position_index(pattern, problem, torch.arange(n), torch.arange(n))
    mask = sf.dense_mask(pattern, problem)
    idx = idx.expand(heads, n, n, len(grid))
    for d, extent in enumerate(shape[1:]):
        at = idx[..., d][mask]
        assert at.min() >= 0 and at.max() < extent, (d, at.min(), at.max(), extent)
    # every entry of a Neighborhood/Blocks/Grid table is reachable somewhere (no dead entries)
    if isinstance(pattern, (sf.Blocks, sf.Grid)) or (isinstance(pattern, sf.Neighborhood) and pattern.stride == 1
                                                      and pattern.causal is False):
        for d, extent in enumerate(shape[1:]):
            assert set(idx[..., d][mask].tolist()) == set(range(extent))


# ------------------------------------------------------------------------------------
# T5 buckets, ALiBi, softcap, sinks
# ------------------------------------------------------------------------------------
def t5_bucket_python(rel: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """T5's bucket written out with Python floats (mesh-tensorflow / transformers' rule)."""
    out, n = 0, num_buckets
    if bidirectional:
        n //= 2
        out += n if rel > 0 else 0
        rel = abs(rel)
    else:
        rel = max(-rel, 0)
    exact = n // 2
    if rel < exact:
        return out + rel
    large = exact + int(math.log(rel / exact) / math.log(max_distance / exact) * (n - exact))
    return out + min(large, n - 1)


@pytest.mark.parametrize("bidirectional,num_buckets,max_distance", [
    (True, 32, 128), (False, 32, 128), (True, 8, 20), (False, 10, 40), (True, 33, 64)])
def test_t5_buckets(bidirectional, num_buckets, max_distance):
    rel = torch.arange(-300, 301)
    got = sf.t5_relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    want = torch.tensor([t5_bucket_python(r, bidirectional, num_buckets, max_distance) for r in rel.tolist()])
    assert torch.equal(got, want)
    assert got.min() >= 0 and got.max() < num_buckets


def test_t5_bucket_literals():
    enc = {-1: 1, 0: 0, 1: 17, -7: 7, -8: 8, -16: 10, -127: 15, -128: 15, -1000: 15, 200: 31, 8: 24}
    for r, b in enc.items():
        assert int(sf.t5_relative_position_bucket(torch.tensor(r))) == b, r
    dec = {5: 0, -5: 5, -16: 16, -32: 21, -1000: 31}
    for r, b in dec.items():
        assert int(sf.t5_relative_position_bucket(torch.tensor(r), bidirectional=False)) == b, r


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_bias_attention(bidirectional):
    gen = torch.Generator().manual_seed(int(bidirectional))
    n, h, d = 40, 2, 4
    pattern = sf.Full() if bidirectional else sf.Causal()
    problem = sf.Problem(grid=(n,), heads=h, head_dim=d)
    table = randn(h, 16, gen=gen)
    i = torch.arange(n)
    rel = i[None, :] - i[:, None]       # memory_position - context_position
    buckets = torch.tensor([[t5_bucket_python(r, bidirectional, 16, 24) for r in row] for row in rel.tolist()])
    bias = table.T[buckets].permute(2, 0, 1)   # Embedding(num_buckets, H)(buckets).permute([2, 0, 1])
    q, k, v = qkv(gen, 2, h, n, d)
    want, _ = model_attention(q, k, v, sf.dense_mask(pattern, problem), scale=1.0, bias=bias)
    t5 = sf.T5Bias(table, num_buckets=16, max_distance=24, bidirectional=bidirectional)
    close(sf.reference_attention(q, k, v, pattern, problem, scale=1.0, modifiers=(t5,)), want)


def test_alibi_and_its_causal_forms():
    gen = torch.Generator().manual_seed(5)
    n, h, d = 20, 4, 4
    problem = sf.Problem(grid=(n,), heads=h, head_dim=d)
    slopes = sf.ALiBi.geometric_slopes(h).double()
    assert torch.allclose(slopes, torch.tensor([2.0 ** (-2 * i) for i in range(1, 5)], dtype=F64))
    q, k, v = qkv(gen, 2, h, n, d)
    i = torch.arange(n, dtype=F64)
    for pattern in (sf.Full(), sf.SlidingWindow(5, 2)):
        mask = sf.dense_mask(pattern, problem)
        bias = -slopes[:, None, None] * (i[None, :] - i[:, None]).abs()
        want, _ = model_attention(q, k, v, mask, scale=0.4, bias=bias)
        close(sf.reference_attention(q, k, v, pattern, problem, scale=0.4, modifiers=(sf.ALiBi(slopes),)), want)
    # causal: slope * (j - i) is equal on allowed pairs; BLOOM's slope * j shifts each row by slope * i
    mask = sf.dense_mask(sf.Causal(), problem)
    got, lse = sf.reference_attention(q, k, v, sf.Causal(), problem, scale=0.4, modifiers=(sf.ALiBi(slopes),),
                                      return_lse=True)
    bloom, bloom_lse = model_attention(q, k, v, mask, scale=0.4, bias=slopes[:, None, None] * i[None, None, :])
    close(got, bloom)
    close(lse + slopes[None, :, None] * i, bloom_lse)


def test_softcap_gemma2():
    gen = torch.Generator().manual_seed(9)
    n, h, d = 24, 2, 8
    pattern = sf.SlidingWindow(6)      # Gemma2's local layers: causal sliding window
    problem = sf.Problem(grid=(n,), heads=h, head_dim=d)
    q, k, v = qkv(gen, 2, h, n, d)
    q = q * 6          # scores well into tanh's curve
    want, want_lse = model_attention(q, k, v, sf.dense_mask(pattern, problem), scale=d ** -0.5, softcap=5.0)
    got, lse = sf.reference_attention(q, k, v, pattern, problem, modifiers=(sf.Softcap(5.0),), return_lse=True)
    close(got, want)
    close(lse, want_lse)
    plain = sf.reference_attention(q, k, v, pattern, problem)
    assert (plain - got).abs().max() > 1e-2


def test_sinks_gpt_oss():
    gen = torch.Generator().manual_seed(10)
    n, h, d = 30, 4, 4
    pattern = sf.SlidingWindow(8)
    problem = sf.Problem(grid=(n,), heads=h, head_dim=d, kv_heads=2)
    q, k, v = qkv(gen, 2, h, n, d, kv_heads=2)
    sinks = randn(h, gen=gen) * 2
    want, want_lse = model_attention(q, k, v, sf.dense_mask(pattern, problem), scale=d ** -0.5, sinks=sinks)
    got, lse = sf.reference_attention(q, k, v, pattern, problem, modifiers=(sf.Sinks(sinks),), return_lse=True)
    close(got, want)
    close(lse, want_lse)


def test_sinks_on_empty_rows():
    """A real row the pattern leaves empty: zeros, LSE = sink, finite gradients."""
    pattern, problem = sf.Sink(1) & sf.Blocks(2), sf.Problem(grid=(6,), heads=2, head_dim=3)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (t.requires_grad_() for t in qkv(gen, 1, 2, 6, 3))
    sinks = randn(2, gen=gen).requires_grad_()
    out, lse = sf.reference_attention(q, k, v, pattern, problem, modifiers=(sf.Sinks(sinks),), return_lse=True)
    assert torch.equal(out[:, :, 2:], torch.zeros_like(out[:, :, 2:]))
    assert torch.equal(lse[0, :, 2:], sinks.detach()[:, None].expand(2, 4))
    (out.sum() + lse.sum()).backward()
    for t in (q, k, v, sinks):
        assert torch.isfinite(t.grad).all()


def test_everything_in_order():
    """scale per head -> + RPB + ALiBi + T5 -> softcap -> mask -> softmax with sinks, in one call."""
    gen = torch.Generator().manual_seed(21)
    n, h, d = 16, 2, 4
    pattern = sf.Neighborhood(5) & sf.Causal()
    problem = sf.Problem(grid=(n,), heads=h, head_dim=d)
    q, k, v = qkv(gen, 2, h, n, d)
    scale = torch.tensor([0.3, 0.8], dtype=F64)
    rpb, slopes, t5, sinks = randn(h, 9, gen=gen), torch.tensor([0.25, 0.5], dtype=F64), randn(h, 8, gen=gen), \
        randn(h, gen=gen)
    mask, nbias = natten_mask_and_bias((n,), 5, 1, rpb)
    mask &= torch.tril(torch.ones(n, n, dtype=torch.bool))
    i = torch.arange(n)
    rel = i[None, :] - i[:, None]
    bias = nbias - slopes[:, None, None] * rel.abs() + \
        t5[:, torch.tensor([[t5_bucket_python(r, True, 8, 16) for r in row] for row in rel.tolist()])]
    want, want_lse = model_attention(q, k, v, mask, scale=scale, bias=bias, softcap=2.0, sinks=sinks)
    mods = (sf.Sinks(sinks), sf.Softcap(2.0), sf.RelativePositionBias(rpb), sf.ALiBi(slopes),
            sf.T5Bias(t5, max_distance=16))
    got, lse = sf.reference_attention(q, k, v, pattern, problem, scale=scale, modifiers=mods, return_lse=True)
    close(got, want)
    close(lse, want_lse)


FAMILIES = [
    (sf.Neighborhood(3, dilation=2), (9,)), (sf.Neighborhood((3, 2), stride=(2, 1)), (5, 6)),
    (sf.SlidingWindow(2, 1), (10,)), (sf.Halo(2, 1), (6, 5)), (sf.Blocks(3, offset=1), (7, 5)),
    (sf.Grid(2), (4, 6)), (sf.Blocks(2) & sf.Causal(), (9,)), (sf.PerHead([sf.Blocks(3), sf.Grid(3)]), (6, 6)),
]


@pytest.mark.parametrize("pattern,grid", FAMILIES, ids=[repr(c[0]) for c in FAMILIES])
def test_rpb_softcap_sinks_every_windowed_family(pattern, grid):
    """Composition on every windowed family: the bias read through ``relative_position_index``
    at the allowed pairs, softcapped, masked, softmax with sinks (GQA)."""
    gen = torch.Generator().manual_seed(len(repr(pattern)))
    problem = sf.Problem(grid=grid, heads=2, head_dim=4, kv_heads=1)
    n = problem.tokens
    table = randn(*sf.relative_position_bias_shape(pattern, problem), gen=gen)
    idx = relative_position_index(pattern, problem, torch.arange(n), torch.arange(n)).expand(2, n, n, len(grid))
    mask = sf.dense_mask(pattern, problem)
    safe = torch.where(mask[..., None], idx, 0)
    bias = torch.stack([table[h][tuple(safe[h, ..., dd] for dd in range(len(grid)))] for h in range(2)])
    sinks = randn(2, gen=gen)
    q, k, v = qkv(gen, 2, 2, n, 4, kv_heads=1)
    want, want_lse = model_attention(q, k, v, mask, scale=0.5, bias=bias, softcap=3.0, sinks=sinks)
    got, lse = sf.reference_attention(q, k, v, pattern, problem, scale=0.5, return_lse=True, modifiers=(
        sf.RelativePositionBias(table), sf.Softcap(3.0), sf.Sinks(sinks)))
    close(got, want)
    close(lse, want_lse)


def test_zero_modifiers_change_nothing():
    gen = torch.Generator().manual_seed(2)
    pattern, problem = sf.Neighborhood(3), sf.Problem(grid=(5, 6), heads=2, head_dim=4)
    q, k, v = qkv(gen, 2, 2, 30, 4)
    plain, plain_lse = sf.reference_attention(q, k, v, pattern, problem, return_lse=True)
    mods = (sf.RelativePositionBias(torch.zeros(2, 5, 5, dtype=F64)),
            sf.Sinks(torch.full((2,), -math.inf, dtype=F64)))
    got, lse = sf.reference_attention(q, k, v, pattern, problem, modifiers=mods, return_lse=True,
                                      scale=torch.full((2,), 0.5, dtype=F64))
    assert torch.equal(got, plain) and torch.equal(lse, plain_lse)


# ------------------------------------------------------------------------------------
# Gradients (float64 gradcheck) and containment
# ------------------------------------------------------------------------------------
def test_gradcheck_1d_every_modifier_tensor():
    gen = torch.Generator().manual_seed(31)
    n, h, d = 6, 2, 2
    pattern = sf.Neighborhood(3)
    problem = sf.Problem(grid=(n,), heads=h, head_dim=d)
    q, k, v = qkv(gen, 1, h, n, d)
    inputs = [q, k, v, randn(h, 5, gen=gen), torch.tensor([0.3, 0.7], dtype=F64), randn(h, 8, gen=gen),
              randn(h, gen=gen), torch.tensor([0.6, 1.1], dtype=F64)]
    inputs = [t.requires_grad_() for t in inputs]

    def f(q, k, v, rpb, slopes, t5, sinks, scale):
        mods = (sf.RelativePositionBias(rpb), sf.ALiBi(slopes), sf.T5Bias(t5, max_distance=8), sf.Softcap(1.5),
                sf.Sinks(sinks))
        return sf.reference_attention(q, k, v, pattern, problem, scale=scale, modifiers=mods, return_lse=True)
    assert torch.autograd.gradcheck(f, inputs)


def test_gradcheck_2d_rpb_on_shifted_blocks():
    gen = torch.Generator().manual_seed(32)
    pattern, problem = sf.Blocks(2, offset=1), sf.Problem(grid=(3, 4), heads=1, head_dim=2)
    q, k, v = qkv(gen, 1, 1, 12, 2)
    table = randn(1, 3, 3, gen=gen)
    inputs = [t.requires_grad_() for t in (q, k, v, table)]
    assert torch.autograd.gradcheck(
        lambda q, k, v, t: sf.reference_attention(q, k, v, pattern, problem, modifiers=(sf.RelativePositionBias(t),)),
        inputs)


def test_from_swin_passes_gradients_to_the_swin_table():
    swin = torch.randn(9, 2, dtype=F64, requires_grad=True)
    rpb = sf.RelativePositionBias.from_swin(swin, 2)
    assert rpb.table.shape == (2, 3, 3)
    # Swin index for (q, k) = (q - k + w - 1) flattened; ours at (k - q + w - 1): offset (1, -1) <-> Swin (-1, 1)
    assert rpb.table[1, 2, 0] == swin[0 * 3 + 2, 1]
    rpb.table.sum().backward()
    assert torch.equal(swin.grad, torch.ones_like(swin))


def test_nan_in_unread_table_entries():
    """NaN in table entries no allowed pair reads (Halo's table has entries below
    ``w - block`` that are never used) reaches no output or gradient."""
    gen = torch.Generator().manual_seed(40)
    pattern, problem = sf.Halo(2, 1), sf.Problem(grid=(8,), heads=2, head_dim=3)
    q, k, v = qkv(gen, 1, 2, 8, 3)
    table = randn(2, 7, gen=gen)
    clean = sf.reference_attention(q, k, v, pattern, problem, modifiers=(sf.RelativePositionBias(table),))
    table_nan = table.clone()
    table_nan[:, :2] = math.nan          # w = 4, block = 2: indices 0, 1 are never read
    inputs = [t.requires_grad_() for t in (q, k, v, table_nan)]
    out = sf.reference_attention(*inputs[:3], pattern, problem, modifiers=(sf.RelativePositionBias(inputs[3]),))
    assert torch.equal(out, clean)
    out.sum().backward()
    for t in inputs:
        assert torch.isfinite(t.grad).all()
    assert torch.equal(inputs[3].grad[:, :2], torch.zeros(2, 2, dtype=F64))


def test_nan_in_hidden_keys_with_every_modifier():
    """A NaN/Inf key or value reaches only the queries that see it, with every modifier on."""
    gen = torch.Generator().manual_seed(41)
    pattern, problem = sf.Halo(2, 1), sf.Problem(grid=(8,), heads=2, head_dim=3)
    q, k, v = qkv(gen, 1, 2, 8, 3)
    mods = (sf.RelativePositionBias(randn(2, 7, gen=gen)), sf.ALiBi(torch.tensor([0.1, 0.2], dtype=F64)),
            sf.T5Bias(randn(2, 8, gen=gen), max_distance=6), sf.Softcap(2.0), sf.Sinks(randn(2, gen=gen)))
    clean = sf.reference_attention(q, k, v, pattern, problem, modifiers=mods)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 7], v2[:, :, 7] = math.nan, math.inf      # token 7: only rows 6, 7 (window [5, 9)) see it
    q = q.requires_grad_()
    out = sf.reference_attention(q, k2, v2, pattern, problem, modifiers=mods)
    assert torch.equal(out[:, :, :6], clean[:, :, :6])
    assert torch.isnan(out[:, :, 6:]).all()
    out[:, :, :6].sum().backward()
    assert torch.isfinite(q.grad[:, :, :6]).all()


# ------------------------------------------------------------------------------------
# Values: spec, tensors, repr
# ------------------------------------------------------------------------------------
def test_spec_is_hashable_and_holds_no_data():
    a = sf.RelativePositionBias(torch.randn(2, 13, 13))
    b = sf.RelativePositionBias(torch.randn(2, 13, 13))
    assert a.spec() == b.spec() == ("RelativePositionBias", ("table", (2, 13, 13), "fp32"))
    assert hash(a.spec()) == hash(b.spec())
    assert a.spec() != sf.RelativePositionBias(torch.randn(2, 13, 13, dtype=F64)).spec()
    t5 = sf.T5Bias(torch.zeros(4, 32))
    assert t5.spec() == ("T5Bias", ("table", (4, 32), "fp32"), ("num_buckets", 32), ("max_distance", 128),
                         ("bidirectional", True))
    assert sf.Softcap(30).spec() == ("Softcap", ("cap", 30.0)) and sf.Softcap(30).tensors() == ()
    assert sf.ALiBi(torch.ones(4)).spec() == ("ALiBi", ("slopes", (4,), "fp32"))
    assert sf.Sinks(torch.ones(4)).spec() == ("Sinks", ("logits", (4,), "fp32"))
    for m in (a, t5, sf.Softcap(2.0), sf.ALiBi(torch.ones(4)), sf.Sinks(torch.ones(4))):
        hash(m.spec())
        assert not any(isinstance(x, torch.Tensor) for x in _flatten(m.spec()))
    assert a.tensors()[0] is a.table
    c = a.with_tensors(a.table.double())
    assert c.table.dtype == F64 and c.spec()[1][2] == "fp64"
    assert repr(a) == "RelativePositionBias(table=<fp32 [2, 13, 13] on cpu>)"
    assert repr(sf.Softcap(50)) == "Softcap(cap=50.0)"
    with pytest.raises(dataclasses_error()):
        a.table = None


def dataclasses_error():
    import dataclasses
    return dataclasses.FrozenInstanceError


def _flatten(x):
    if isinstance(x, tuple):
        for y in x:
            yield from _flatten(y)
    else:
        yield x


# ------------------------------------------------------------------------------------
# Bad input: errors name the argument, the value and what was expected
# ------------------------------------------------------------------------------------
P2 = sf.Problem(grid=(8, 8), heads=2, head_dim=4)
P1 = sf.Problem(grid=(16,), heads=2, head_dim=4)


@pytest.mark.parametrize("make, exc, match", [
    (lambda: sf.Softcap(0), ValueError, r"cap must be a finite float > 0, got 0\.0"),
    (lambda: sf.Softcap(-1.0), ValueError, r"cap must be a finite float > 0, got -1\.0"),
    (lambda: sf.Softcap(math.inf), ValueError, r"cap must be a finite float > 0, got inf"),
    (lambda: sf.Softcap("30"), TypeError, r"cap must be a float > 0, got '30' \(str\)"),
    (lambda: sf.Softcap(True), TypeError, r"cap must be a float > 0, got True"),
    (lambda: sf.RelativePositionBias([1, 2]), TypeError, r"table must be a torch\.Tensor, got \[1, 2\] \(list\)"),
    (lambda: sf.RelativePositionBias(torch.zeros(2, 13, dtype=torch.long)), TypeError,
     r"table must have a floating dtype .* got torch\.int64"),
    (lambda: sf.RelativePositionBias(torch.zeros(13)), ValueError, r"table must have shape \[H, e_1, \.\.\., e_n\]"),
    (lambda: sf.ALiBi(torch.ones(2, 2)), ValueError, r"slopes must have 1 dimension, got shape \[2, 2\]"),
    (lambda: sf.Sinks(torch.ones(2, dtype=torch.int32)), TypeError, r"logits must have a floating dtype"),
    (lambda: sf.T5Bias(torch.zeros(2, 32), num_buckets=16), ValueError,
     r"table has shape \[2, 32\], expected \[H, num_buckets=16\]"),
    (lambda: sf.T5Bias(torch.zeros(2, 3)), ValueError, r"num_buckets must be >= 4 \(bidirectional=True\), got 3"),
    (lambda: sf.T5Bias(torch.zeros(2, 32), max_distance=8), ValueError, r"max_distance must be > 8 .* got 8"),
    (lambda: sf.T5Bias(torch.zeros(2, 32), bidirectional=1), TypeError, r"bidirectional must be a bool, got 1"),
])
def test_constructor_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def _call(pattern, problem, modifiers=(), **kw):
    q = torch.zeros(1, problem.heads, problem.tokens, problem.head_dim)
    return sf.reference_attention(q, q, q, pattern, problem, modifiers=modifiers, **kw)


@pytest.mark.parametrize("pattern, problem, modifiers, kw, exc, match", [
    (sf.Neighborhood(7), sf.Problem(grid=(8, 8), heads=2, head_dim=4), (sf.RelativePositionBias(torch.zeros(2, 7, 7)),),
     {}, ValueError, r"modifiers\[0\] \(RelativePositionBias\): table has shape \[2, 7, 7\], expected \[2, 13, 13\] "
     r"for Neighborhood\(7\)"),
    (sf.Blocks(4), P2, (sf.RelativePositionBias(torch.zeros(3, 7, 7)),), {}, ValueError,
     r"table has shape \[3, 7, 7\], expected \[2, 7, 7\]"),
    (sf.Causal(), P1, (sf.RelativePositionBias(torch.zeros(2, 7)),), {}, ValueError,
     r"Causal\(\) has no window to measure relative positions in; .* use T5Bias or ALiBi"),
    (sf.Blocks(4) | sf.Sink(1), P1, (sf.RelativePositionBias(torch.zeros(2, 7)),), {}, ValueError,
     r"is a union with a windowed part; .* \(refused\)"),
    (sf.Blocks(4) & sf.Neighborhood(3), P1, (sf.RelativePositionBias(torch.zeros(2, 7)),), {}, ValueError,
     r"intersects 2 windowed patterns .* ambiguous \(refused\)"),
    (sf.PerHead([sf.Blocks(4), sf.Blocks(2)]), P1, (sf.RelativePositionBias(torch.zeros(2, 7)),), {}, ValueError,
     r"different table extents \[\(3,\), \(7,\)\]"),
    (sf.Full(), P2, (sf.ALiBi(torch.ones(2)),), {}, ValueError,
     r"ALiBi is a 1-D relative position bias, but the problem grid is \(8, 8\)"),
    (sf.Full(), P2, (sf.T5Bias(torch.ones(2, 32)),), {}, ValueError, r"T5Bias is a 1-D relative position bias"),
    (sf.Full(), P1, (sf.ALiBi(torch.ones(3)),), {}, ValueError,
     r"slopes has shape \[3\], expected \[2\] \(\[heads\]\)"),
    (sf.Full(), P1, (sf.Sinks(torch.ones(4)),), {}, ValueError, r"logits has shape \[4\], expected \[2\]"),
    (sf.Full(), P1, (sf.T5Bias(torch.ones(3, 32)),), {}, ValueError, r"table has shape \[3, 32\], expected \[2, 32\]"),
    (sf.Full(), P1, (sf.Softcap(1.0), sf.Softcap(2.0)), {}, ValueError, r"modifiers\[1\]: a second Softcap"),
    (sf.Full(), P1, (sf.Sinks(torch.ones(2)), sf.Sinks(torch.ones(2))), {}, ValueError, r"a second Sinks"),
    (sf.Full(), P1, ("softcap",), {}, TypeError, r"modifiers\[0\] must be a sparseforge modifier .* got 'softcap'"),
    (sf.Full(), P1, 3.0, {}, TypeError, r"modifiers must be a tuple of sparseforge modifiers"),
    (sf.Full(), P1, (sf.Sinks(torch.ones(2, device="meta")),), {}, ValueError,
     r"logits is on meta, but q is on cpu"),
    (sf.Full(), P1, (), dict(scale=torch.ones(3)), ValueError, r"scale has shape \[3\], expected \[2\]"),
    (sf.Full(), P1, (), dict(scale=torch.ones(2, dtype=torch.long)), TypeError, r"scale must have a floating dtype"),
    (sf.Full(), P1, (), dict(scale="0.5"), TypeError, r"scale must be a float or a \[heads\] tensor, got '0\.5'"),
])
def test_application_errors(pattern, problem, modifiers, kw, exc, match):
    with pytest.raises(exc, match=match):
        _call(pattern, problem, modifiers, **kw)


def test_shape_function_errors():
    with pytest.raises(TypeError, match=r"pattern must be a sparseforge Pattern"):
        sf.relative_position_bias_shape("Blocks(7)", P2)
    with pytest.raises(ValueError, match=r"needs a token grid"):
        sf.relative_position_bias_shape(sf.Blocks(7), sf.Problem())
    assert sf.relative_position_bias_shape(sf.Neighborhood(7), sf.Problem(grid=(56, 56), heads=4)) == (4, 13, 13)
    assert sf.relative_position_bias_shape(sf.Blocks(7, offset=3), sf.Problem(grid=(56, 56), heads=4)) == (4, 13, 13)
    assert sf.relative_position_bias_shape(sf.Neighborhood((3, 5, 7), dilation=(1, 2, 1)),
                                           sf.Problem(grid=(8, 16, 16), heads=1)) == (1, 5, 9, 13)
    assert sf.relative_position_bias_shape(sf.Halo(8, 3), sf.Problem(grid=(32, 32), heads=2)) == (2, 27, 27)
    assert sf.relative_position_bias_shape(sf.Grid((2, 4)), sf.Problem(grid=(8, 8), heads=2)) == (2, 3, 7)
