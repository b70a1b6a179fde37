"""sparseforge.dsl.paged: the paged KV cache (vLLM / FlashInfer layout), its validation, the
page selection of every 1-D family against brute force from ``dense_mask`` (decode alignment:
the queries are the last Nq positions), gather round trips, and the paged float64 reference
against ``reference_attention`` on the contiguous cache."""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch

import sparseforge as sf
from sparseforge.dsl import paged as P
from sparseforge.dsl.pattern import Pattern

from ._common import dense

HEADS, KV_HEADS = 4, 2
RAGGED = (37, 64, 12, 50)

# valid on every length in RAGGED
RAGGED_PATTERNS = [
    sf.Full(),
    sf.Causal(),
    sf.SlidingWindow(5),
    sf.SlidingWindow(3, 2),
    sf.Sink(3),
    sf.Sink(3) | sf.SlidingWindow(4),
    sf.GlobalTokens((0, 5, 6)),
    sf.StridedShards(4, 2, 3),
    sf.StridedShards(4, (2, 2), 3, causal=False),
    sf.StridedShards(4, 1, 2, dense_heads=1),
    sf.StridedShards(3, 2, 4, heterogeneous=False),
    sf.StridedShards(5, 1, 2) | sf.Sink(2),
    sf.Halo(4, 2),
    sf.Blocks(8),
    sf.Blocks(8, offset=3),
    sf.Neighborhood(5),
    sf.Neighborhood(5, dilation=2),
    sf.Neighborhood(5, stride=2, causal=True),
    sf.Neighborhood(3, dilation=3, causal=True),
    sf.Causal() & sf.SlidingWindow(6, 6),
    (sf.SlidingWindow(8) & sf.StridedShards(4, 1, 2)) | sf.Sink(2),
    sf.SlidingWindow(20) & (sf.Blocks(4) | sf.Sink(1)) & sf.Causal(),
    sf.PerHead([sf.Causal(), sf.SlidingWindow(3), sf.Sink(2) | sf.SlidingWindow(2), sf.StridedShards(4, 2, 3)]),
]
# patterns tied to one length (Documents' lengths add up to it, Grid's size divides it)
UNIFORM = 48
UNIFORM_PATTERNS = [
    sf.Documents((10, 20, 18)),
    sf.Documents((10, 20, 18)) & sf.Causal(),
    sf.Documents((30, 18)) & sf.SlidingWindow(7) | sf.Sink(2),
    sf.Grid(4),
    sf.Grid(6) | sf.Causal(),
]


@functools.lru_cache(maxsize=None)
def brute(pattern, length: int, nq: int) -> np.ndarray:
    """bool [H, nq, L]: the rows of the dense mask of the last nq positions (decode alignment)."""
    return dense(pattern, (length,), heads=HEADS, kv_heads=KV_HEADS)[:, length - nq:]


def brute_pages(mask: np.ndarray, page_size: int) -> np.ndarray:
    keys = np.flatnonzero(mask.any(axis=(0, 1)))
    return np.unique(keys // page_size)


def make_paged(lengths, page_size, *, kv_heads=KV_HEADS, head_dim=4, dtype=torch.float32, seed=0, fill=0.0):
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    k = torch.randn(len(lengths), kv_heads, n, head_dim, generator=g).to(dtype)
    v = torch.randn(len(lengths), kv_heads, n, head_dim, generator=g).to(dtype)
    extra = 3
    pages = sum(-(-x // page_size) for x in lengths) + extra
    return P.paginate(k, v, lengths, page_size, num_pages=pages, generator=g, fill=fill), k, v


def rows_dense(rows, length: int) -> np.ndarray:
    out = np.zeros((rows.nh * rows.nq, length), bool)
    for r, lo, hi in zip(rows.row, rows.lo, rows.hi):
        assert lo < hi
        out[r, lo:hi] = True
    return out.reshape(rows.nh, rows.nq, length)


# ------------------------------------------------------------------------------------
# Page selection vs brute force
# ------------------------------------------------------------------------------------
def _check_selection(pattern, lengths, nq, page_size):
    paged, _, _ = make_paged(lengths, page_size)
    sel = P.pages_needed(pattern, paged, nq, heads=HEADS)
    counts = P.bytes_read(pattern, paged, nq, heads=HEADS)
    for b, length in enumerate(lengths):
        m = brute(pattern, length, nq)
        want = brute_pages(m, page_size)
        assert sel[b].dtype == torch.int64
        np.testing.assert_array_equal(sel[b].numpy(), want, err_msg=f"{pattern!r} L={length} nq={nq} ps={page_size}")
        assert counts.pages[b] == len(want)
        assert counts.keys[b] == int(m.any(axis=(0, 1)).sum())
        per_kv = m.reshape(KV_HEADS, HEADS // KV_HEADS, nq, length).any(axis=(1, 2)).sum()
        assert counts.kv_head_keys[b] == int(per_kv)
        assert counts.dense_pages[b] == -(-length // page_size)
        # the rows themselves, per head and query, are exact (not only their union)
        ctx = P._sample_context(pattern, length, nq, HEADS, KV_HEADS, 4, torch.float32, "length")
        rows = P._key_rows(pattern, ctx, nq)
        got = np.broadcast_to(rows_dense(rows, length), m.shape)
        np.testing.assert_array_equal(got, m, err_msg=f"rows of {pattern!r} L={length} nq={nq}")


@pytest.mark.parametrize("nq", [1, 4])
@pytest.mark.parametrize("pattern", RAGGED_PATTERNS, ids=repr)
def test_pages_needed_matches_brute_force_ragged(pattern, nq):
    for page_size in (1, 3, 16):
        _check_selection(pattern, RAGGED, nq, page_size)


@pytest.mark.parametrize("nq", [1, 5])
@pytest.mark.parametrize("pattern", UNIFORM_PATTERNS, ids=repr)
def test_pages_needed_matches_brute_force_uniform(pattern, nq):
    for page_size in (1, 16):
        _check_selection(pattern, (UNIFORM, UNIFORM), nq, page_size)


def test_prefill_alignment_is_the_whole_mask():
    """Nq == L: every row of the dense mask (chunked prefill of the whole cache)."""
    for pattern in (sf.SlidingWindow(5) | sf.Sink(2), sf.StridedShards(4, 2, 3)):
        _check_selection(pattern, (12, 9), 9, 4)


def test_visible_keys_by_hand():
    # a window of 4 keys and a sink of 2 over 20 tokens, one query at position 19
    assert P.visible_keys(sf.SlidingWindow(3) | sf.Sink(2), 20, 1).tolist() == [[0, 2], [16, 20]]
    # queries 17..19 of a causal window of 3: keys 14..19
    assert P.visible_keys(sf.SlidingWindow(2), 20, 3).tolist() == [[15, 20]]
    # DKernel: block 4, local 2 blocks, vertical stride 3, 2 kv heads (heads 2: step 1)
    per = P.visible_keys(sf.StridedShards(4, 2, 3), 22, 1, heads=2, per_kv_head=True)
    # query 21 is in block 5; local blocks 4, 5; kv head 0 sees blocks 0, 3; head 1 blocks 2, 5
    assert per[0].tolist() == [[0, 4], [12, 22]]
    assert per[1].tolist() == [[8, 12], [16, 22]]


def test_large_caches_use_intervals():
    """A 1M-token cache: exact pages from intervals (no [Nq, Nk] mask; fast)."""
    n = 1 << 20
    kp = torch.empty(n // 16 + 1, 16, 8, 128, dtype=torch.bfloat16, device="meta")
    table = torch.arange(n // 16 + 1, dtype=torch.int32)[None].repeat(2, 1)
    paged = P.PagedKV(kp, kp, table, torch.tensor([n, n + 5]))
    sel = P.pages_needed(sf.SlidingWindow(4095), paged, 1)
    assert sel[0].tolist() == list(range(n // 16 - 256, n // 16))
    assert sel[1].tolist() == list(range((n + 4 - 4095) // 16, n // 16 + 1))        # 257: one page more
    sel = P.pages_needed(sf.Sink(4) | sf.SlidingWindow(4095), paged, 64)
    assert sel[0].tolist() == [0] + list(range((n - 64 - 4095) // 16, n // 16))
    # DKernel with one shared shard (heterogeneous=False): blocks 0, 8, 16, ... and the 2 local ones
    shards = sf.StridedShards(64, 2, 8, heterogeneous=False)
    counts = P.bytes_read(shards, paged, 1, heads=16)
    qb = (n - 1) // 64
    blocks = set(range(0, qb + 1, 8)) | {qb - 1, qb}
    assert counts.pages[0] == 4 * len(blocks) and counts.keys[0] == 64 * len(blocks)
    assert counts.kv_head_keys[0] == 8 * 64 * len(blocks)
    assert counts.dense_pages == (n // 16, n // 16 + 1)


def test_agrees_with_the_kv_grid_decode_alignment():
    """Where ``Problem`` takes a ``kv_grid`` (queries the last Nq positions of the keys' 1-D
    sequence), its dense mask and reference are this module's rows and reference."""
    if "kv_grid" not in {f.name for f in dataclasses.fields(sf.Problem)}:
        pytest.skip("sf.Problem has no kv_grid yet")
    for pattern in RAGGED_PATTERNS[::2]:
        for length, nq in ((37, 1), (12, 4)):
            problem = sf.Problem(grid=(nq,), kv_grid=(length,), heads=HEADS, kv_heads=KV_HEADS, head_dim=4)
            m = sf.dense_mask(pattern, problem).numpy()
            np.testing.assert_array_equal(np.broadcast_to(m, (HEADS, nq, length)), brute(pattern, length, nq))
    lengths, nq, d = (37, 12), 3, 8
    paged, k, v = make_paged(lengths, 4, head_dim=d, dtype=torch.float64)
    q = torch.randn(2, HEADS, nq, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for pattern in (sf.SlidingWindow(5) | sf.Sink(2), sf.StridedShards(4, 2, 3)):
        out = P.reference_paged_attention(q, paged, pattern)
        for b, length in enumerate(lengths):
            problem = sf.Problem(grid=(nq,), kv_grid=(length,), heads=HEADS, kv_heads=KV_HEADS, head_dim=d,
                                 dtype=torch.float64)
            want = sf.reference_attention(q[b:b + 1], k[b:b + 1, :, :length], v[b:b + 1, :, :length], pattern,
                                          problem)
            torch.testing.assert_close(out[b], want[0], rtol=1e-12, atol=1e-12)


@dataclasses.dataclass(frozen=True, repr=False)
class _EveryThird(Pattern):
    """A family with no interval form in paged.py: key k visible iff k % 3 == 0 or k == q."""

    def mask(self, ctx, qi, ki):
        return (ki[None, :] % 3 == 0) | (ki[None, :] == qi[:, None])


def test_dense_fallback_and_its_limit(monkeypatch):
    pattern = _EveryThird() | sf.SlidingWindow(2)
    paged, _, _ = make_paged((20, 11), 4)
    sel = P.pages_needed(pattern, paged, 2)
    for b, length in enumerate((20, 11)):
        q = np.arange(length - 2, length)[:, None]
        k = np.arange(length)[None, :]
        m = (k % 3 == 0) | (k == q) | ((k - q >= -2) & (k <= q))
        assert sel[b].tolist() == sorted(set((np.flatnonzero(m.any(0)) // 4).tolist()))
    monkeypatch.setattr(P, "DENSE_FALLBACK_ELEMENTS", 30)
    with pytest.raises(ValueError, match=r"_EveryThird\(\) has no interval form.*dense fallback"):
        P.pages_needed(pattern, paged, 2)


# ------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------
def _parts(**over):
    kp = torch.zeros(6, 4, 2, 8)
    parts = dict(k_pages=kp, v_pages=kp.clone(), block_table=torch.tensor([[0, 1, 2], [3, -1, -1]], dtype=torch.int32),
                 cache_lengths=torch.tensor([10, 3]))
    parts.update(over)
    return parts


def test_valid_description_and_unread_entries():
    paged = P.PagedKV(**_parts())
    assert (paged.batch, paged.num_pages, paged.page_size, paged.kv_heads, paged.head_dim, paged.max_pages) == \
        (2, 6, 4, 2, 8, 3)
    assert paged.lengths == (10, 3) and paged.pages_used(0) == 3 and paged.pages_used(1) == 1
    # entries past a sample's pages are never read: anything goes there
    P.PagedKV(**_parts(block_table=torch.tensor([[0, 1, 2], [3, 99, -7]])))
    P.PagedKV(**_parts(cache_lengths=torch.tensor([0, 0]), block_table=torch.full((2, 3), -1)))


@pytest.mark.parametrize("over, exc, match", [
    (dict(k_pages=[1.0]), TypeError, "k_pages must be a torch.Tensor"),
    (dict(k_pages=torch.zeros(6, 4, 2, 8, dtype=torch.int32)), TypeError, "k_pages must have a floating dtype"),
    (dict(k_pages=torch.zeros(6, 4, 16)), ValueError, r"k_pages must have shape \[num_pages, page_size"),
    (dict(v_pages=torch.zeros(6, 4, 2, 4)), ValueError, r"v_pages has shape \[6, 4, 2, 4\], expected \[6, 4, 2, 8\]"),
    (dict(v_pages=torch.zeros(6, 4, 2, 8, dtype=torch.float16)), TypeError, "v_pages must have the dtype"),
    (dict(k_pages=torch.zeros(6, 0, 2, 8), v_pages=torch.zeros(6, 0, 2, 8)), ValueError, "page_size >= 1"),
    (dict(v_pages=torch.zeros(6, 4, 2, 8, device="meta")), ValueError, "v_pages is on meta"),
    (dict(block_table=torch.zeros(2, 3)), TypeError, "block_table must hold integers"),
    (dict(block_table=torch.zeros(6, dtype=torch.int32)), ValueError, r"block_table must have shape \[B, max_pages\]"),
    (dict(block_table="x"), TypeError, "block_table must be a torch.Tensor"),
    (dict(cache_lengths=torch.tensor([10.0, 3.0])), TypeError, "cache_lengths must hold integers"),
    (dict(cache_lengths=torch.tensor([10, 3, 1])), ValueError, r"cache_lengths has shape \[3\], expected \[B=2\]"),
    (dict(cache_lengths=torch.tensor([[10, 3]])), ValueError, r"cache_lengths must have shape \[B\]"),
    (dict(cache_lengths=torch.tensor([10, -1])), ValueError, r"cache_lengths\[1\] must be >= 0, got -1"),
    (dict(cache_lengths=torch.tensor([13, 3])), ValueError,
     r"cache_lengths\[0\]=13 is more than the block table holds: max_pages=3 x page_size=4 = 12"),
    (dict(block_table=torch.tensor([[0, 1, 6], [3, -1, -1]])), ValueError,
     r"block_table\[0, 2\] = 6 is out of range \[0, num_pages=6\)"),
    (dict(block_table=torch.tensor([[0, -1, 2], [3, -1, -1]])), ValueError,
     r"block_table\[0, 1\] = -1 is out of range.*first 3 entries"),
    (dict(block_table=torch.tensor([[0, 1, 2], [-1, -1, -1]])), ValueError, r"block_table\[1, 0\] = -1"),
    (dict(block_table=torch.zeros(2, 3, dtype=torch.long, device="meta")), ValueError, "block_table is on meta"),
])
def test_validation_errors_name_the_argument(over, exc, match):
    with pytest.raises(exc, match=match):
        P.PagedKV(**_parts(**over))


def test_call_errors_name_the_argument():
    paged, _, _ = make_paged((10, 3), 4)
    with pytest.raises(ValueError, match=r"n_queries=4 is more than cache_lengths\[1\]=3.*last n_queries positions"):
        P.pages_needed(sf.Causal(), paged, 4)
    with pytest.raises(ValueError, match="n_queries must be >= 1"):
        P.bytes_read(sf.Causal(), paged, 0)
    with pytest.raises(TypeError, match="n_queries must be an int"):
        P.pages_needed(sf.Causal(), paged, 1.0)
    with pytest.raises(TypeError, match="pattern must be a sparseforge Pattern"):
        P.pages_needed("Causal()", paged, 1)
    with pytest.raises(TypeError, match="paged must be a sparseforge PagedKV"):
        P.pages_needed(sf.Causal(), (1, 2), 1)
    with pytest.raises(ValueError, match=r"cache_lengths\[1\]=3: the sample is a sequence of 3 tokens.*Documents"):
        P.pages_needed(sf.Documents((4, 6)), paged, 1)
    with pytest.raises(ValueError, match=r"cache_lengths\[1\]=3.*Sink n=5"):
        P.pages_needed(sf.Sink(5), paged, 1)
    with pytest.raises(ValueError, match="depends on run-time content"):
        P.pages_needed(sf.Routed(region_size=2, topk=1), paged, 1)
    with pytest.raises(ValueError, match="cache_lengths"):
        P.pages_needed(sf.SlidingWindow((2, 2)), paged, 1)
    with pytest.raises(ValueError, match="heads=3 must be a multiple of the cache's kv_heads=2"):
        P.pages_needed(sf.Causal(), paged, 1, heads=3)
    q = torch.zeros(2, 4, 1, 5)
    with pytest.raises(ValueError, match=r"q has shape \[2, 4, 1, 5\], expected \[B=2, H, Nq >= 1, head_dim=4\]"):
        P.reference_paged_attention(q, paged, sf.Causal())
    with pytest.raises(ValueError, match="heads=3 must be a multiple"):
        P.reference_paged_attention(torch.zeros(2, 3, 1, 4), paged, sf.Causal())
    meta = P.PagedKV(paged.k_pages.to("meta"), paged.v_pages.to("meta"), paged.block_table, paged.cache_lengths)
    with pytest.raises(ValueError, match="k_pages is on the meta device"):
        P.gather(meta)
    with pytest.raises(ValueError, match="max_len must be an int >= the longest cache length 10"):
        P.gather(paged, max_len=9)


# ------------------------------------------------------------------------------------
# gather
# ------------------------------------------------------------------------------------
def test_gather_round_trip_and_gradients():
    lengths = (40, 17, 0, 6)
    paged, k, v = make_paged(lengths, 6, fill=float("nan"))
    gk, gv, ln = P.gather(paged)
    assert ln.tolist() == list(lengths) and gk.shape == (4, KV_HEADS, 40, 4) and gk.is_contiguous()
    for b, n in enumerate(lengths):
        assert torch.equal(gk[b, :, :n], k[b, :, :n]) and torch.equal(gv[b, :, :n], v[b, :, :n])
        assert torch.equal(gk[b, :, n:], torch.zeros_like(gk[b, :, n:]))            # NaN slots never read
        assert torch.equal(gv[b, :, n:], torch.zeros_like(gv[b, :, n:]))
    assert P.gather(paged, max_len=45)[0].shape[2] == 45
    # gradients reach exactly the slots that hold tokens
    kp = paged.k_pages.nan_to_num().requires_grad_()
    paged2 = dataclasses.replace(paged, k_pages=kp, v_pages=paged.v_pages.nan_to_num())
    w = torch.randn(4, KV_HEADS, 40, 4, generator=torch.Generator().manual_seed(1))
    (P.gather(paged2)[0] * w).sum().backward()
    want = torch.zeros_like(kp)
    for b, n in enumerate(lengths):
        for t in range(n):
            want[int(paged.block_table[b, t // 6]), t % 6] = w[b, :, t]
    assert torch.equal(kp.grad, want)


def test_gather_round_trip_page_size_one_and_bf16():
    paged, k, _ = make_paged((5, 9), 1, dtype=torch.bfloat16)
    gk, _, _ = P.gather(paged)
    assert gk.dtype == torch.bfloat16
    assert torch.equal(gk[0, :, :5], k[0, :, :5]) and torch.equal(gk[1], k[1])


# ------------------------------------------------------------------------------------
# The paged reference vs the contiguous one
# ------------------------------------------------------------------------------------
REFERENCE_PATTERNS = [sf.Causal(), sf.SlidingWindow(5) | sf.Sink(2), sf.StridedShards(4, 2, 3),
                      sf.StridedShards(4, (2, 2), 3, causal=False), sf.Neighborhood(5, dilation=2),
                      sf.Causal() & sf.Blocks(8, offset=3), sf.Sink(1) & sf.SlidingWindow(1)]


@pytest.mark.parametrize("nq", [1, 4, 12])
@pytest.mark.parametrize("pattern", REFERENCE_PATTERNS, ids=repr)
def test_paged_reference_equals_contiguous(pattern, nq):
    lengths = RAGGED
    d = 8
    paged, k, v = make_paged(lengths, 16, head_dim=d, dtype=torch.float64, fill=float("nan"))
    g = torch.Generator().manual_seed(2)
    n = max(lengths)
    q_full = torch.randn(len(lengths), HEADS, n, d, generator=g, dtype=torch.float64)
    q = torch.stack([q_full[b, :, L - nq:L] for b, L in enumerate(lengths)])
    scale = torch.tensor([0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    out, lse = P.reference_paged_attention(q, paged, pattern, scale=scale, return_lse=True)
    assert out.dtype == torch.float64 and out.shape == (len(lengths), HEADS, nq, d)
    problem = sf.Problem(grid=(n,), heads=HEADS, head_dim=d, kv_heads=KV_HEADS, dtype=torch.float64)
    want, want_lse = sf.reference_attention(q_full, k, v, pattern, problem, scale=scale, lengths=list(lengths),
                                            return_lse=True)
    for b, L in enumerate(lengths):
        torch.testing.assert_close(out[b], want[b, :, L - nq:L], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse[b], want_lse[b, :, L - nq:L], rtol=1e-12, atol=1e-12)
    assert torch.isfinite(out).all()


def test_paged_reference_gradients_and_containment():
    """Gradients reach the pages exactly as the contiguous reference's reach k/v; a NaN stored in a
    key no query may see (and in unused slots) changes nothing."""
    lengths, nq, d = (37, 12), 3, 4
    pattern = sf.SlidingWindow(6) | sf.Sink(1)
    paged, k, v = make_paged(lengths, 4, head_dim=d, dtype=torch.float64, fill=float("nan"))
    q = torch.randn(2, HEADS, nq, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    clean = P.reference_paged_attention(q, paged, pattern)
    # poison key 10 of sample 0 (invisible: queries 34..36 see keys 0 and 28..36)
    page, slot = int(paged.block_table[0, 10 // 4]), 10 % 4
    kp, vp = paged.k_pages.clone(), paged.v_pages.clone()
    kp[page, slot] = float("nan")
    vp[page, slot] = float("inf")
    poisoned = dataclasses.replace(paged, k_pages=kp, v_pages=vp)
    assert torch.equal(P.reference_paged_attention(q, poisoned, pattern), clean)

    kp = paged.k_pages.clone().requires_grad_()
    out = P.reference_paged_attention(q, dataclasses.replace(paged, k_pages=kp), pattern)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (out * w).sum().backward()
    kc = k.clone().requires_grad_()
    n = max(lengths)
    q_full = torch.zeros(2, HEADS, n, d, dtype=torch.float64)
    for b, L in enumerate(lengths):
        q_full[b, :, L - nq:L] = q[b]
    problem = sf.Problem(grid=(n,), heads=HEADS, head_dim=d, kv_heads=KV_HEADS, dtype=torch.float64)
    want = sf.reference_attention(q_full, kc, v, pattern, problem, lengths=list(lengths))
    w_full = torch.zeros_like(want)
    for b, L in enumerate(lengths):
        w_full[b, :, L - nq:L] = w[b]
    (want * w_full).sum().backward()
    for b, L in enumerate(lengths):
        for t in range(L):
            got = kp.grad[int(paged.block_table[b, t // 4]), t % 4]
            torch.testing.assert_close(got, kc.grad[b, :, t], rtol=1e-12, atol=1e-12)
    assert torch.isfinite(kp.grad).all()


def test_empty_rows_give_zeros():
    # Sink(2) & SlidingWindow(3): the last query (position 9) sees no key
    paged, _, _ = make_paged((10,), 4, dtype=torch.float64)
    q = torch.randn(1, HEADS, 1, 4, dtype=torch.float64)
    out, lse = P.reference_paged_attention(q, paged, sf.Sink(2) & sf.SlidingWindow(3), return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all() and (lse < 0).all()
    assert P.pages_needed(sf.Sink(2) & sf.SlidingWindow(3), paged, 1)[0].tolist() == []
