"""``reference_attention`` against torch's ``scaled_dot_product_attention`` in float64."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sparseforge as sf
import sparseforge.dsl.semantics as semantics

RTOL = 1e-12


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def randn(*shape, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def qkv(b, h, n, d, kv_heads=None, seed=0, dtype=torch.float64):
    kvh = kv_heads or h
    return (randn(b, h, n, d, seed=seed, dtype=dtype), randn(b, kvh, n, d, seed=seed + 1, dtype=dtype),
            randn(b, kvh, n, d, seed=seed + 2, dtype=dtype))


def sdpa(q, k, v, mask, scale=None):
    """Masked SDPA in float64 (k/v expanded to q's heads)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=scale)


def lse_ref(q, k, mask, scale):
    g = q.shape[1] // k.shape[1]
    s = (q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2)) * scale
    return torch.logsumexp(s.masked_fill(~mask, -math.inf), -1)


STATIC = [
    ("neighborhood_2d", sf.Neighborhood(3, dilation=(1, 2)), (6, 7)),
    ("neighborhood_causal", sf.Neighborhood((3, 4), stride=2, causal=(True, False)), (6, 7)),
    ("sliding_sink", sf.Causal() & (sf.SlidingWindow(5) | sf.Sink(3)), (42,)),
    ("halo", sf.Halo(2, 1), (6, 7)),
    ("maxvit", sf.PerHead([sf.Blocks(2), sf.Grid((3, 1)), sf.Neighborhood(3), sf.Full()]), (6, 7)),
    ("shards", sf.StridedShards(4, 2, 3, dense_heads=1), (42,)),
    ("shards_bidir", sf.StridedShards(5, (1, 2), 2, causal=False), (42,)),
    ("documents", sf.Documents([10, 20, 12]) | sf.GlobalTokens([0, 41]), (42,)),
    ("full", sf.Full(), (3, 2, 7)),
]


@pytest.mark.parametrize("name, pattern, grid", STATIC, ids=[c[0] for c in STATIC])
def test_matches_masked_sdpa(name, pattern, grid):
    n = math.prod(grid)
    b, h, d = 2, 4, 8
    problem = sf.Problem(grid=grid, heads=h, head_dim=d)
    q, k, v = qkv(b, h, n, d, seed=len(name))
    mask = sf.dense_mask(pattern, problem)
    assert mask.any(-1).all(), "these patterns have no empty row"
    out = sf.reference_attention(q, k, v, pattern, problem)
    assert out.dtype == torch.float64 and out.shape == (b, h, n, d)
    assert rel_err(out, sdpa(q, k, v, mask)) < RTOL


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa(kv_heads):
    grid, b, h, d = (5, 6), 2, 4, 8
    pattern = sf.Neighborhood(3) | sf.Sink(2)
    problem = sf.Problem(grid=grid, heads=h, head_dim=d, kv_heads=kv_heads)
    q, k, v = qkv(b, h, 30, d, kv_heads=kv_heads, seed=3)
    mask = sf.dense_mask(pattern, problem)
    out, lse = sf.reference_attention(q, k, v, pattern, problem, return_lse=True)
    assert rel_err(out, sdpa(q, k, v, mask)) < RTOL
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert rel_err(out, want) < RTOL
    assert rel_err(lse, lse_ref(q, k, mask, d ** -0.5)) < RTOL


@pytest.mark.parametrize("scale", [0.05, 1.0, 3.0])
def test_custom_scale_and_lse(scale):
    grid, b, h, d = (24,), 1, 2, 16
    pattern = sf.Causal() & sf.SlidingWindow(6)
    problem = sf.Problem(grid=grid, heads=h, head_dim=d)
    q, k, v = qkv(b, h, 24, d, seed=7)
    mask = sf.dense_mask(pattern, problem)
    out, lse = sf.reference_attention(q, k, v, pattern, problem, scale=scale, return_lse=True)
    assert rel_err(out, sdpa(q, k, v, mask, scale=scale)) < RTOL
    assert lse.shape == (b, h, 24) and lse.dtype == torch.float64
    assert rel_err(lse, lse_ref(q, k, mask, scale)) < RTOL
    # the default scale is head_dim ** -0.5
    out_default = sf.reference_attention(q, k, v, pattern, problem)
    assert rel_err(out_default, sf.reference_attention(q, k, v, pattern, problem, scale=d ** -0.5)) < 1e-15


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_computed_in_float64(dtype):
    grid, b, h, d = (4, 5), 1, 2, 8
    pattern = sf.Halo(2, 1)
    problem = sf.Problem(grid=grid, heads=h, head_dim=d, dtype=dtype)
    q, k, v = qkv(b, h, 20, d, seed=11, dtype=dtype)
    before = q.clone()
    out = sf.reference_attention(q, k, v, pattern, problem)
    assert out.dtype == torch.float64
    assert torch.equal(q, before)
    assert rel_err(out, sdpa(q, k, v, sf.dense_mask(pattern, problem))) < RTOL


def test_gradients_match_sdpa():
    grid, b, h, d = (6, 5), 2, 2, 8
    pattern = sf.Neighborhood(3, dilation=(2, 1)) | sf.Causal()
    problem = sf.Problem(grid=grid, heads=h, head_dim=d, kv_heads=1)
    mask = sf.dense_mask(pattern, problem)
    w = randn(b, h, 30, d, seed=21)
    grads = []
    for fn in (lambda q, k, v: sf.reference_attention(q, k, v, pattern, problem), lambda q, k, v: sdpa(q, k, v, mask)):
        q, k, v = (t.requires_grad_() for t in qkv(b, h, 30, d, kv_heads=1, seed=20))
        (fn(q, k, v) * w).sum().backward()
        grads.append((q.grad, k.grad, v.grad))
    for a, bb in zip(*grads):
        assert rel_err(a, bb) < 1e-10


def test_routed_reference_uses_the_routed_mask():
    grid, b, h, d = (6, 6), 2, 2, 4
    pattern = sf.Routed(3, 2, per_head=True)
    problem = sf.Problem(grid=grid, heads=h, head_dim=d)
    q, k, v = qkv(b, h, 36, d, seed=30)
    mask = sf.dense_mask(pattern, problem, q=q, k=k)
    assert mask.shape == (b, h, 36, 36)
    out = sf.reference_attention(q, k, v, pattern, problem)
    assert rel_err(out, sdpa(q, k, v, mask)) < RTOL
    # the routing is computed from q and k but is not differentiated (BiFormer detaches it)
    q2 = q.clone().requires_grad_()
    sf.reference_attention(q2, k, v, pattern, problem).sum().backward()
    assert torch.isfinite(q2.grad).all()


# ------------------------------------------------------------------------------------
# empty rows
# ------------------------------------------------------------------------------------
EMPTY = [
    # pattern, grid, number of empty rows (per head)
    (sf.Sink(1) & sf.Blocks(2), (6,), 4),                    # rows 2..5 empty
    (sf.Documents([4, 5]) & sf.GlobalTokens([0]), (9,), 5),   # second document empty
    (sf.Sink(1) & sf.GlobalTokens([5]), (6,), 5),            # only (5, 0) allowed
    (sf.SlidingWindow(0, 0) & sf.Grid(2) & sf.Causal() & sf.Sink(1), (2, 4), 7),
]


@pytest.mark.parametrize("pattern, grid, empty", EMPTY, ids=[repr(c[0]) for c in EMPTY])
def test_empty_rows_give_zeros_and_minus_inf_lse(pattern, grid, empty):
    n, b, h, d = math.prod(grid), 2, 2, 4
    problem = sf.Problem(grid=grid, heads=h, head_dim=d)
    mask = sf.dense_mask(pattern, problem)
    empty_rows = ~mask.any(-1)  # [H, N]
    assert int(empty_rows[0].sum()) == empty
    q, k, v = (t.requires_grad_() for t in qkv(b, h, n, d, seed=40))
    out, lse = sf.reference_attention(q, k, v, pattern, problem, return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert (out[:, empty_rows] == 0).all()
    assert torch.isneginf(lse[:, empty_rows]).all()
    assert torch.isfinite(lse[:, ~empty_rows]).all()
    # non-empty rows agree with SDPA
    with torch.no_grad():
        want = sdpa(q, k, v, mask)
        rows = ~empty_rows
        assert rel_err(out[:, rows], want[:, rows]) < RTOL
        assert rel_err(lse[:, rows], lse_ref(q, k, mask, d ** -0.5)[:, rows]) < RTOL
    # gradients are finite, also through the LSE, and zero for empty query rows
    w = randn(b, h, n, d, seed=41)
    loss = (out * w).sum() + torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).sum()
    loss.backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[:, empty_rows] == 0).all()
    # large upstream gradients do not overflow into inf/nan either
    q.grad = k.grad = v.grad = None
    out, lse = sf.reference_attention(q, k, v, pattern, problem, return_lse=True)
    (out * 1e30).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_all_rows_empty():
    pattern = sf.Sink(1) & sf.Documents([1, 5]) & sf.SlidingWindow(0, 0) & sf.GlobalTokens([3])
    problem = sf.Problem(grid=6, heads=1, head_dim=4)
    q, k, v = (t.requires_grad_() for t in qkv(1, 1, 6, 4, seed=50))
    out, lse = sf.reference_attention(q, k, v, pattern, problem, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
    out.sum().backward()
    assert all((t.grad == 0).all() for t in (q, k, v))


# ------------------------------------------------------------------------------------
# voxels, chunking
# ------------------------------------------------------------------------------------
def test_scattered_voxel_layout():
    gen = torch.Generator().manual_seed(60)
    n, h, d = 50, 2, 8
    coords = torch.cat([torch.randint(0, 2, (n, 1), generator=gen), torch.randint(0, 8, (n, 3), generator=gen)], 1)
    pattern = sf.Scattered((4, 4, 2), shift=(2, 0, 1))
    problem = sf.Problem(heads=h, head_dim=d)
    q, k, v = (randn(n, h, d, seed=61 + i) for i in range(3))  # [N, H, D]
    out, lse = sf.reference_attention(q, k, v, pattern, problem, coords=coords, return_lse=True)
    assert out.shape == (n, h, d) and lse.shape == (n, h)
    q4, k4, v4 = (t.permute(1, 0, 2)[None] for t in (q, k, v))  # [1, H, N, D]
    out4, lse4 = sf.reference_attention(q4, k4, v4, pattern, problem, coords=coords, return_lse=True)
    assert torch.equal(out, out4[0].permute(1, 0, 2)) and torch.equal(lse, lse4[0].T)
    mask = sf.dense_mask(pattern, problem, coords=coords)
    assert rel_err(out4, sdpa(q4, k4, v4, mask)) < RTOL
    assert rel_err(lse4, lse_ref(q4, k4, mask, d ** -0.5)) < RTOL


def test_chunked_rows_equal_unchunked(monkeypatch):
    grid, b, h, d = (6, 7), 1, 3, 4
    pattern = sf.PerHead([sf.Neighborhood(3), sf.Causal(), sf.StridedShards(4, 2, 3)])
    problem = sf.Problem(grid=grid, heads=h, head_dim=d)
    q, k, v = qkv(b, h, 42, d, seed=70)
    full, lse_full = sf.reference_attention(q, k, v, pattern, problem, return_lse=True)
    stats_full = sf.describe(pattern, problem)
    monkeypatch.setattr(semantics, "CHUNK_ELEMENTS", 5 * h * 42)  # 5 rows per chunk, ragged last
    chunked, lse_chunked = sf.reference_attention(q, k, v, pattern, problem, return_lse=True)
    # matmuls of different shapes may round differently in the last bit
    assert rel_err(chunked, full) < 1e-14 and rel_err(lse_chunked, lse_full) < 1e-14
    assert sf.describe(pattern, problem) == stats_full
