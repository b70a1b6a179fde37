"""The decode kernel (``backends.decode``), run by the Triton interpreter against the float64
reference: queries at the last Nq positions of each sample's cache (ragged lengths), every
1-D family the kernel takes, GQA, score modifiers, a key padding mask, contiguous and paged
caches (bitwise equal), garbage past the cache never read; patterns whose mask depends on the
sequence length refused by name; and the sm_90 kernels wgmma-only and spill-free (a single
query's GQA group padded to 64 rows)."""
from __future__ import annotations

import pytest
import torch

import sparseforge as sf
from sparseforge.backends.decode import TritonDecode
from sparseforge.dsl.modifiers import check_modifiers, modifier_spec
from sparseforge.dsl.paged import paginate
from sparseforge.lower.decode import DecodeNotSupportedError
from sparseforge.runtime import check

D = 16
PATTERNS = [
    sf.Causal(),
    sf.Causal() & sf.SlidingWindow(20),
    sf.Sink(3) | (sf.Causal() & sf.SlidingWindow(20)),
    sf.SlidingWindow(6, 2),
    sf.StridedShards(8, 2, 4),
    sf.Full(),
]


def reference_rows(q, k, v, n_keys, pattern, heads, kv_heads, scale, modifiers=(), key_valid=None):
    """float64 out [B, H, Nq, D], lse: sample b's queries are the last Nq positions of its
    n_keys[b] keys, i.e. the last Nq rows of self attention over those keys (the contract)."""
    b, _, nq, _ = q.shape
    outs, lses = [], []
    for i in range(b):
        n = int(n_keys[i])
        problem = sf.Problem(grid=n, heads=heads, kv_heads=kv_heads, head_dim=D, dtype=torch.float64)
        q_full = torch.zeros(1, heads, n, D, dtype=torch.float64)
        q_full[:, :, n - nq:] = q[i:i + 1].double()
        extra = {} if key_valid is None else dict(key_padding_mask=key_valid[i:i + 1, :n])
        kk = k[i:i + 1, :, :n].double()
        vv = v[i:i + 1, :, :n].double()
        if key_valid is not None:   # padded keys hold garbage; the reference never reads them either
            kk, vv = (torch.where(key_valid[i:i + 1, None, :n, None], t, 0.0) for t in (kk, vv))
        out, lse = sf.reference_attention(q_full, kk, vv, pattern, problem, scale=scale, modifiers=modifiers,
                                          return_lse=True, **extra)
        outs.append(out[:, :, n - nq:])
        lses.append(lse[:, :, n - nq:])
    return torch.cat(outs), torch.cat(lses)


def make_inputs(batch, heads, kv_heads, nq, n, gen, dtype=torch.float32):
    q = torch.randn(batch, heads, nq, D, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, n, D, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, n, D, generator=gen).to(dtype)
    return q, k, v


def assert_close(out, lse, ref, ref_lse, keys, dtype=torch.float32):
    tol = check.attention_tolerances(dtype, torch.float32, keys, 1, D)
    assert torch.isfinite(out).all()
    assert check.row_error(out, ref) <= tol["out"], check.row_error(out, ref)
    assert check.lse_error(lse, ref_lse) <= tol["lse"], check.lse_error(lse, ref_lse)


@pytest.mark.parametrize("nq", [1, 4, 64])
@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_decode_matches_reference(pattern, nq):
    """Ragged caches (n_keys per sample), GQA, garbage (NaN) past each sample's keys."""
    gen = torch.Generator().manual_seed(nq)
    heads, kv_heads, n = 4, 2, 150
    q, k, v = make_inputs(3, heads, kv_heads, nq, n, gen)
    n_keys = torch.tensor([150, 97, max(nq, 70)], dtype=torch.int32)
    for i, length in enumerate(n_keys.tolist()):
        k[i, :, length:] = float("nan")
        v[i, :, length:] = float("nan")
    dec = TritonDecode(pattern, sf.Problem(grid=1, heads=heads, kv_heads=kv_heads, head_dim=D, dtype=torch.float32),
                       interpret=True)
    out, lse = dec.forward(q, k, v, n_keys, 0.3)
    ref, ref_lse = reference_rows(q, torch.nan_to_num(k), torch.nan_to_num(v), n_keys, pattern, heads, kv_heads, 0.3)
    assert_close(out, lse, ref, ref_lse, n)


@pytest.mark.parametrize("page_size", [16, 5])
def test_paged_cache_equals_contiguous_bitwise(page_size):
    """Pages in a shuffled order through a block table: the same bits as the contiguous cache."""
    gen = torch.Generator().manual_seed(7)
    pattern = sf.Sink(2) | (sf.Causal() & sf.SlidingWindow(30))
    heads, kv_heads, n = 8, 2, 130
    q, k, v = make_inputs(2, heads, kv_heads, 4, n, gen)
    lengths = torch.tensor([130, 61], dtype=torch.int32)
    cache = paginate(k, v, lengths, page_size, num_pages=40, generator=gen, fill=float("nan"))
    problem = sf.Problem(grid=1, heads=heads, kv_heads=kv_heads, head_dim=D, dtype=torch.float32)
    contiguous = TritonDecode(pattern, problem, interpret=True).forward(q, k, v, lengths, 0.25, n_splits=3)
    paged = TritonDecode(pattern, problem, page_size=page_size, interpret=True).forward(
        q, cache.k_pages, cache.v_pages, cache.cache_lengths, 0.25, block_table=cache.block_table, n_splits=3)
    assert torch.equal(contiguous[0], paged[0]) and torch.equal(contiguous[1], paged[1])
    ref, ref_lse = reference_rows(q, k, v, lengths, pattern, heads, kv_heads, 0.25)
    assert_close(paged[0], paged[1], ref, ref_lse, n)


@pytest.mark.parametrize("kind", ["sinks_softcap_scale", "t5", "alibi"])
def test_decode_with_modifiers(kind):
    gen = torch.Generator().manual_seed(3)
    pattern = sf.Causal() & sf.SlidingWindow(40)
    heads, kv_heads, n = 4, 1, 120
    q, k, v = make_inputs(2, heads, kv_heads, 4, n, gen)
    head_scale = None
    if kind == "sinks_softcap_scale":
        mods = (sf.Softcap(2.0), sf.Sinks(torch.randn(heads, generator=gen)))
        head_scale = 0.2 + 0.2 * torch.rand(heads, generator=gen)
    elif kind == "t5":
        mods = (sf.T5Bias(torch.randn(heads, 8, generator=gen), max_distance=12, bidirectional=False),)
    else:
        mods = (sf.ALiBi(sf.ALiBi.geometric_slopes(heads)),)
    problem = sf.Problem(grid=n, heads=heads, kv_heads=kv_heads, head_dim=D, dtype=torch.float32)
    checked = check_modifiers(mods, pattern, problem)
    dec = TritonDecode(pattern, problem, modifiers=modifier_spec(checked, head_scale is not None), interpret=True)
    n_keys = torch.tensor([120, 77], dtype=torch.int32)
    out, lse = dec.forward(q, k, v, n_keys, 0.25, modifiers=checked, head_scale=head_scale)
    ref, ref_lse = reference_rows(q, k, v, n_keys, pattern, heads, kv_heads,
                                  0.25 if head_scale is None else head_scale.double(), modifiers=mods)
    assert_close(out, lse, ref, ref_lse, n)


def test_decode_with_key_padding_mask():
    """A left-padded batch: padded keys (NaN) are never read."""
    gen = torch.Generator().manual_seed(5)
    pattern = sf.Causal() & sf.SlidingWindow(25)
    heads, kv_heads, n = 4, 2, 90
    q, k, v = make_inputs(2, heads, kv_heads, 1, n, gen)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, :33] = False                      # sample 1: 33 pad tokens first
    k[~valid[:, None, :, None].expand_as(k)] = float("nan")
    v[~valid[:, None, :, None].expand_as(v)] = float("nan")
    problem = sf.Problem(grid=1, heads=heads, kv_heads=kv_heads, head_dim=D, dtype=torch.float32)
    n_keys = torch.tensor([n, n], dtype=torch.int32)
    out, lse = TritonDecode(pattern, problem, padding=True, interpret=True).forward(q, k, v, n_keys, 0.25,
                                                                                   key_valid=valid)
    ref, ref_lse = reference_rows(q, k, v, n_keys, pattern, heads, kv_heads, 0.25, key_valid=valid)
    assert_close(out, lse, ref, ref_lse, n)


def test_split_count_changes_only_rounding():
    gen = torch.Generator().manual_seed(9)
    pattern = sf.Causal()
    q, k, v = make_inputs(1, 2, 2, 1, 300, gen)
    n_keys = torch.tensor([300], dtype=torch.int32)
    dec = TritonDecode(pattern, sf.Problem(grid=1, heads=2, head_dim=D, dtype=torch.float32), interpret=True)
    one, many = dec.forward(q, k, v, n_keys, 0.25, n_splits=1), dec.forward(q, k, v, n_keys, 0.25, n_splits=5)
    ref, ref_lse = reference_rows(q, k, v, n_keys, pattern, 2, 2, 0.25)
    for out, lse in (one, many):
        assert_close(out, lse, ref, ref_lse, 300)


def test_length_dependent_pattern_is_refused_by_name():
    problem = sf.Problem(grid=1, heads=2, head_dim=D, dtype=torch.float32)
    with pytest.raises(DecodeNotSupportedError, match=r"Neighborhood.*depends on the sequence length.*backend='cpu'"):
        TritonDecode(sf.Neighborhood(5), problem)


@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "paged"])
@pytest.mark.parametrize("nq", [1, 4, 64])
def test_sm90_decode_kernels_spill_free(nq, page_size):
    """bf16, 32 query heads on 8 key/value heads, head_dim 128 (a Llama-3-8B layer), a sink and
    a 4096 window: one query's GQA group (4 rows) and 64 queries alike run on wgmma (rows padded
    to its M of 64); nothing spills or serializes."""
    pattern = sf.Sink(4) | (sf.Causal() & sf.SlidingWindow(4096))
    problem = sf.Problem(grid=1, heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    report = TritonDecode(pattern, problem, page_size=page_size).aot(nq)
    loops = [lp.instructions for lp in report.sass().loops if lp.has_mma]
    print(f"decode nq={nq} {page_size=}: registers {report.registers}, SASS per key-block iteration {loops}")
    assert report.tensor_core == "wgmma" and report.spills == 0 and not report.serialized, report.as_dict()


@pytest.mark.parametrize("pattern,n_keys,n_queries,rows", [
    (sf.SlidingWindow(4095), 1 << 20, 1, 4096),                   # the window, block-aligned: itself
    (sf.SlidingWindow(4095), (1 << 20) + 5, 1, 4096 + 5),         # straddles one more 64-key block
    (sf.Sink(4) | sf.SlidingWindow(4095), 1 << 20, 1, 64 + 4096), # the sink's block, then the window
    (sf.Causal(), 100, 1, 100),                                   # the whole cache, the last block partial
    # 64 queries, GQA group 4: 4 tiles of 16 queries (64 rows), each its keys' 64-key blocks
    # (block 14 = keys 896..959, block 15 = 960..999): 64 + (64 + 40) + (64 + 40) + 40
    (sf.Causal() & sf.SlidingWindow(10), 1000, 64, 312),
])
def test_keys_read_is_the_kernel_walk(pattern, n_keys, n_queries, rows):
    """The key rows one decode step loads, by hand from the kernel's 64-key blocks."""
    dec = TritonDecode(pattern, sf.Problem(grid=1, heads=4, kv_heads=1, head_dim=D, dtype=torch.float32))
    assert dec.keys_read(n_queries, n_keys) == rows
