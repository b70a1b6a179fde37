"""Grouped (run-time group ids): the mask against a brute-force loop, repr/parse, validation."""
from __future__ import annotations

import pytest
import torch

import sparseforge as sf
from sparseforge.dsl.content import check_groups


def brute(groups, heads, causal):
    """bool [B, H, N, N] by a plain loop over (b, h, i, j)."""
    g = groups if groups.dim() == 3 else groups[:, None].expand(-1, heads, -1)
    b, _, n = g.shape
    out = torch.zeros(b, heads, n, n, dtype=torch.bool)
    for bb in range(b):
        for h in range(heads):
            for i in range(n):
                for j in range(n):
                    gi, gj = int(g[bb, h, i]), int(g[bb, h, j])
                    out[bb, h, i, j] = gi >= 0 and gi == gj and (not causal or j <= i)
    return out


def P(n=12, heads=3):
    return sf.Problem(grid=n, heads=heads, head_dim=8)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("per_head", [False, True])
def test_mask_matches_brute_force(causal, per_head):
    gen = torch.Generator().manual_seed(1)
    shape = (2, 3, 12) if per_head else (2, 12)
    groups = torch.randint(-1, 4, shape, generator=gen)
    m = sf.dense_mask(sf.Grouped(causal=causal), P(), groups=groups)
    assert m.shape == (2, 3, 12, 12) and m.dtype == torch.bool
    assert torch.equal(m, brute(groups, 3, causal))


def test_negative_ids_are_empty_rows_and_never_keys():
    groups = torch.tensor([[0, -1, 0, -3, 1, 1]])
    m = sf.dense_mask(sf.Grouped(), P(6, 1), groups=groups)[0, 0]
    assert not m[1].any() and not m[3].any() and not m[:, 1].any() and not m[:, 3].any()
    assert m[0, 2] and m[2, 0] and m[4, 5] and not m[0, 4]
    stats = sf.describe(sf.Grouped(), P(6, 1), groups=groups)
    assert stats.empty_rows == 2


def test_combines_and_per_head_and_int32():
    groups = torch.tensor([[0, 0, 0, 1, 1, 1]], dtype=torch.int32)
    pat = sf.Grouped() & sf.SlidingWindow(1)
    m = sf.dense_mask(pat, P(6, 2), groups=groups)
    want = brute(groups.long(), 2, False) & sf.dense_mask(sf.SlidingWindow(1), P(6, 2))
    assert torch.equal(m, want)
    ph = sf.PerHead([sf.Grouped(), sf.Grouped(causal=True)])
    m = sf.dense_mask(ph, P(6, 2), groups=groups)
    assert torch.equal(m[:, 0], brute(groups, 2, False)[:, 0]) and torch.equal(m[:, 1], brute(groups, 2, True)[:, 1])


@pytest.mark.parametrize("pattern", [sf.Grouped(), sf.Grouped(causal=True), sf.Grouped() | sf.Sink(2),
                                     sf.Causal() & sf.Grouped()])
def test_repr_parse_round_trip(pattern):
    assert sf.parse_pattern(repr(pattern)) == pattern
    assert sf.parse_pattern("sf.Grouped(causal=True)") == sf.Grouped(causal=True)
    assert repr(sf.Grouped()) == "Grouped()"
    assert sf.Grouped().fingerprint() != sf.Grouped(causal=True).fingerprint()
    assert not sf.Grouped().is_static and sf.Grouped().inputs_needed() == {"groups"}


def test_validation_errors_name_groups():
    with pytest.raises(TypeError, match="causal"):
        sf.Grouped(causal=1)
    with pytest.raises(sf.PatternSyntaxError):
        sf.parse_pattern("Grouped(causal=3)")
    with pytest.raises(ValueError, match="groups="):
        sf.dense_mask(sf.Grouped(), P())
    with pytest.raises(TypeError, match="groups must have an integer dtype"):
        sf.dense_mask(sf.Grouped(), P(), groups=torch.zeros(1, 12))
    with pytest.raises(TypeError, match="groups must be an integer tensor"):
        sf.dense_mask(sf.Grouped(), P(), groups=[[0] * 12])
    with pytest.raises(ValueError, match=r"groups must have shape .*got \(1, 11\)"):
        sf.dense_mask(sf.Grouped(), P(), groups=torch.zeros(1, 11, dtype=torch.long))
    with pytest.raises(ValueError, match="groups must have shape"):
        sf.dense_mask(sf.Grouped(), P(), groups=torch.zeros(1, 2, 12, dtype=torch.long))  # 2 heads of 3
    with pytest.raises(ValueError, match="groups must have shape"):
        sf.dense_mask(sf.Grouped(), P(), groups=torch.zeros(12, dtype=torch.long))
    q = torch.zeros(2, 3, 12, 8)
    with pytest.raises(ValueError, match=r"groups must have shape \[B=2"):
        sf.reference_attention(q, q, q, sf.Grouped(), P(), groups=torch.zeros(1, 12, dtype=torch.long))
    assert check_groups(torch.zeros(2, 12, dtype=torch.int16), 2, 3, 12).shape == (2, 1, 12)
    assert check_groups(torch.zeros(2, 3, 12, dtype=torch.int32), None, 3, 12).dtype == torch.int64
