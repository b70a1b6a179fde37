"""Combinators and pattern identity, with hypothesis over random pattern trees.

Trees are built from small static leaves on one fixed grid (4 x 5, 2 heads) so every
example costs well under a millisecond to evaluate.
"""
from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparseforge as sf

from ._common import assert_mask_equal

GRID = (4, 5)
N = 20
HEADS = 2
PROBLEM = sf.Problem(grid=GRID, heads=HEADS, head_dim=4)

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def dm(p) -> np.ndarray:
    return sf.dense_mask(p, PROBLEM).numpy()


# ------------------------------------------------------------------------------------
# strategies
# ------------------------------------------------------------------------------------
@st.composite
def neighborhoods(draw):
    ks, ds, ss = [], [], []
    for length in GRID:
        k = draw(st.integers(1, length))
        ks.append(k)
        ds.append(draw(st.integers(1, length // k)))
        ss.append(draw(st.integers(1, k)))
    causal = draw(st.one_of(st.booleans(), st.tuples(st.booleans(), st.booleans())))
    if draw(st.booleans()) and len(set(ks)) == 1 and len(set(ds)) == 1 and len(set(ss)) == 1:
        return sf.Neighborhood(ks[0], dilation=ds[0], stride=ss[0], causal=causal)
    return sf.Neighborhood(tuple(ks), dilation=tuple(ds), stride=tuple(ss), causal=causal)


def int_or_pair(lo, hi):
    return st.one_of(st.integers(lo, hi), st.tuples(st.integers(lo, hi), st.integers(lo, hi)))


@st.composite
def documents(draw):
    cuts = sorted(draw(st.sets(st.integers(1, N - 1), max_size=4)))
    bounds = [0, *cuts, N]
    return sf.Documents([b - a for a, b in zip(bounds, bounds[1:])])


@st.composite
def shards(draw):
    causal = draw(st.booleans())
    local = draw(st.integers(1, 3) if causal else int_or_pair(1, 3))
    return sf.StridedShards(draw(st.integers(1, 5)), local, draw(st.integers(1, 4)),
                            heterogeneous=draw(st.booleans()), dense_heads=draw(st.integers(0, HEADS)),
                            causal=causal)


LEAVES = st.one_of(
    neighborhoods(),
    st.builds(sf.SlidingWindow, int_or_pair(0, 3), int_or_pair(0, 3)),
    st.builds(sf.Halo, st.one_of(st.integers(1, 4), st.tuples(st.integers(1, 4), st.integers(1, 5))), int_or_pair(0, 2)),
    st.builds(sf.Blocks, st.one_of(st.integers(1, 4), st.tuples(st.integers(1, 4), st.integers(1, 5)))),
    st.builds(sf.Grid, st.one_of(st.just(1), st.tuples(st.sampled_from([1, 2, 4]), st.sampled_from([1, 5])))),
    st.just(sf.Full()),
    st.just(sf.Causal()),
    st.builds(sf.Sink, st.integers(1, N)),
    st.builds(sf.GlobalTokens, st.lists(st.integers(0, N - 1), min_size=1, max_size=3, unique=True)),
    documents(),
    shards(),
)


def extend(children):
    return st.one_of(
        st.tuples(children, children).map(lambda ab: ab[0] | ab[1]),
        st.tuples(children, children).map(lambda ab: ab[0] & ab[1]),
        st.lists(children, min_size=HEADS, max_size=HEADS).map(sf.PerHead),
    )


TREES = st.recursive(LEAVES, extend, max_leaves=5)

# A deliberately small universe, so that independently drawn trees are often equal.
SMALL_LEAVES = st.sampled_from([sf.Full(), sf.Causal(), sf.Sink(2), sf.Neighborhood(3), sf.Neighborhood((3, 3)),
                                sf.Neighborhood(3, causal=True), sf.Blocks(2), sf.SlidingWindow(1)])
SMALL_TREES = st.recursive(SMALL_LEAVES, extend, max_leaves=3)


# ------------------------------------------------------------------------------------
# semantics of the combinators
# ------------------------------------------------------------------------------------
@SETTINGS
@given(TREES, TREES)
def test_union_and_intersection_are_elementwise(a, b):
    ma, mb = dm(a), dm(b)
    assert_mask_equal(dm(a | b), ma | mb, f"{a!r} | {b!r}")
    assert_mask_equal(dm(a & b), ma & mb, f"{a!r} & {b!r}")


@SETTINGS
@given(TREES, TREES, TREES)
def test_combinator_algebra(a, b, c):
    """Commutative, associative, distributive on masks (not necessarily on structure)."""
    assert_mask_equal(dm(a | b), dm(b | a))
    assert_mask_equal(dm(a & b), dm(b & a))
    assert_mask_equal(dm((a | b) | c), dm(a | (b | c)))
    assert_mask_equal(dm(a & (b | c)), dm((a & b) | (a & c)))
    assert_mask_equal(dm(a | a), dm(a))
    assert_mask_equal(dm(a & sf.Full()), dm(a))


@SETTINGS
@given(st.lists(TREES, min_size=HEADS, max_size=HEADS))
def test_per_head_stacks_head_masks(parts):
    got = dm(sf.PerHead(parts))
    assert got.shape == (HEADS, N, N)
    for h, p in enumerate(parts):
        assert_mask_equal(got[h], dm(p)[h], f"head {h} of PerHead: {p!r}")


# ------------------------------------------------------------------------------------
# identity: repr, parser, fingerprint, hash, eq, immutability
# ------------------------------------------------------------------------------------
@SETTINGS
@given(TREES)
def test_repr_round_trips_through_the_parser(p):
    text = repr(p)
    q = sf.parse_pattern(text)
    assert q == p
    assert repr(q) == text
    assert q.fingerprint() == p.fingerprint()
    assert hash(q) == hash(p)
    assert sf.parse_pattern("sf." + text if not text.startswith("(") else text) == p
    assert_mask_equal(dm(q), dm(p))


@SETTINGS
@given(TREES)
def test_pickle_and_copy_preserve_identity(p):
    q = pickle.loads(pickle.dumps(p))
    assert q == p and hash(q) == hash(p) and q.fingerprint() == p.fingerprint()


@SETTINGS
@given(SMALL_TREES, SMALL_TREES)
def test_fingerprint_equal_iff_patterns_equal(a, b):
    assert (a == b) == (a.fingerprint() == b.fingerprint()), (a, b)
    assert (a == b) == (repr(a) == repr(b)), (a, b)
    if a == b:
        assert hash(a) == hash(b)
        assert len({a, b}) == 1
        assert {a: 1}[b] == 1
    else:
        assert len({a, b}) == 2


@SETTINGS
@given(TREES, TREES)
def test_fingerprint_equal_iff_patterns_equal_large(a, b):
    assert (a == b) == (a.fingerprint() == b.fingerprint()), (a, b)
    fp = a.fingerprint()
    assert isinstance(fp, str) and len(fp) == 16 and int(fp, 16) >= 0


@SETTINGS
@given(TREES)
def test_bool_raises(p):
    with pytest.raises(TypeError, match="truth value of a pattern"):
        bool(p)
    with pytest.raises(TypeError):
        p and sf.Full()  # noqa: B018
    with pytest.raises(TypeError):
        not p  # noqa: B018


def test_fingerprint_is_stable_and_distinguishes_near_misses():
    assert sf.Neighborhood(7, dilation=2).fingerprint() == sf.Neighborhood(7, dilation=2).fingerprint()
    near = [sf.Neighborhood(7), sf.Neighborhood((7,)), sf.Neighborhood(7, dilation=2), sf.Neighborhood(7, stride=2),
            sf.Neighborhood(7, causal=True), sf.Neighborhood(7, causal=(True,)), sf.Blocks(7), sf.Grid(7),
            sf.Causal(), sf.Full(), sf.Sink(1), sf.Causal() | sf.Full(), sf.Causal() & sf.Full(),
            sf.Full() | sf.Causal(), sf.PerHead([sf.Causal(), sf.Full()]), sf.PerHead([sf.Full(), sf.Causal()]),
            sf.Routed(2, 1), sf.Routed(2, 1, per_head=True), sf.Scattered(2), sf.Scattered(2, shift=1)]
    assert len({p.fingerprint() for p in near}) == len(near)
    assert len(set(near)) == len(near)
    for a in near:
        for b in near:
            assert (a == b) == (a is b)


def test_patterns_are_frozen():
    p = sf.Neighborhood(3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.kernel_size = 5
    u = sf.Causal() | sf.Full()
    with pytest.raises(dataclasses.FrozenInstanceError):
        u.parts = ()
    assert isinstance(sf.PerHead([p, p]).patterns, tuple)
    assert isinstance(sf.Documents([1, 2]).lengths, tuple)


def test_union_and_intersection_flatten():
    a, b, c = sf.Causal(), sf.Sink(1), sf.Full()
    assert (a | b) | c == a | (b | c)
    assert ((a | b) | c).parts == (a, b, c)
    assert ((a & b) & c).parts == (a, b, c)
    assert isinstance((a | b) & c, sf.Intersection)
    assert repr((a | b) & c) == "((Causal() | Sink(1)) & Full())"


def test_per_head_mask_with_many_heads_and_under_vmap():
    """PerHead selects each head's mask elementwise: thousands of heads need no per-head
    tensors, and the mask still evaluates under vmap (FlexAttention's mask_mod does that)."""
    heads = 4096
    p = sf.PerHead([sf.Causal(), sf.Full(), sf.SlidingWindow(1)] * (heads // 4) + [sf.Sink(2)] * (heads // 4))
    problem = sf.Problem(grid=GRID, heads=heads)
    got = sf.dense_mask(p, problem)
    for h in (0, 1, 2, heads - 1):
        assert_mask_equal(got[h].numpy(), dm(p.patterns[h])[0], f"head {h}")
    ctx = sf.dsl.semantics.make_context(p, problem)
    rows = torch.arange(N)
    one = torch.vmap(lambda q: p.mask(ctx, q.reshape(1), rows)[0, :, 0])(rows)     # [N, H, N]
    assert torch.equal(one.permute(1, 0, 2), got)


def test_nested_combinators_built_directly_are_flat():
    """``Union((a, Union((b, c))))`` is ``a | b | c``: one structure, repr, hash and fingerprint,
    and its repr parses back to it (it used to print ``(a | (b | c))``, which parsed to another)."""
    a, b, c = sf.Causal(), sf.Sink(1), sf.Full()
    for cls, op in ((sf.Union, lambda x, y: x | y), (sf.Intersection, lambda x, y: x & y)):
        built = cls((a, cls((b, c))))
        chained = op(op(a, b), c)
        assert built == chained and built.parts == (a, b, c)
        assert repr(built) == repr(chained) and hash(built) == hash(chained)
        assert built.fingerprint() == chained.fingerprint()
        assert sf.parse_pattern(repr(built)) == built
        assert cls([a, b]) == cls((a, b))                     # a list is taken as the tuple
    mixed = sf.Union((a, sf.Intersection((b, c))))          # another combinator stays a part
    assert mixed.parts == (a, sf.Intersection((b, c))) and sf.parse_pattern(repr(mixed)) == mixed


@pytest.mark.parametrize("parts,error,match", [
    ((sf.Causal(),), ValueError, r"Union needs at least two parts, got 1"),
    ((), ValueError, r"Union needs at least two parts, got 0"),
    (sf.Causal(), TypeError, r"Union takes a tuple of patterns, got Causal\(\) \(Causal\)"),
    ((sf.Causal(), 3), TypeError, r"Union parts\[1\] must be a pattern, got 3 \(int\)"),
])
def test_union_parts_are_checked(parts, error, match):
    with pytest.raises(error, match=match):
        sf.Union(parts)


def long_union(n: int) -> sf.Union:
    return sf.Union(tuple(sf.SlidingWindow(i % 50, i // 50) for i in range(n)))


@pytest.mark.parametrize("n", [600, 4000])
def test_long_unions_parse_back(n):
    """The repr of a union of hundreds or thousands of parts parses back (no RecursionError),
    alone and inside other combinators, with the same identity."""
    u = long_union(n)
    for p in (u, sf.Causal() & u, sf.PerHead([u, sf.Full()]), u & sf.Intersection(tuple(u.parts[:n // 2]))):
        text = repr(p)
        q = sf.parse_pattern(text)
        assert q == p and repr(q) == text and hash(q) == hash(p) and q.fingerprint() == p.fingerprint()


def test_long_chains_of_every_operator_parse():
    many = 1000
    assert sf.parse_pattern(" & ".join(["Causal()"] * many)) == sf.Intersection((sf.Causal(),) * many)
    heads = sf.parse_pattern("PerHead(" + " + ".join(["[Full()]", "[Causal()]"] * (many // 2)) + ")")
    assert heads == sf.PerHead([sf.Full(), sf.Causal()] * (many // 2))
    mixed = " | ".join(["Causal() & Sink(2)"] * many)          # '&' operands inside a '|' chain
    assert sf.parse_pattern(mixed) == sf.Union((sf.Intersection((sf.Causal(), sf.Sink(2))),) * many)


@SETTINGS
@given(TREES)
def test_balanced_brackets_keep_the_meaning(p):
    """Every repr still parses to the same pattern when every chain is re-bracketed."""
    from sparseforge.dsl import parse

    text = repr(sf.Union((p, p, p)))
    original = parse.CHAIN_SPLIT
    parse.CHAIN_SPLIT = 1
    try:
        assert sf.parse_pattern(text) == sf.Union((p, p, p))
        assert parse.balance_chains(text) != text
    finally:
        parse.CHAIN_SPLIT = original


@pytest.mark.parametrize("other", [1, True, None, "Causal()", np.ones(3, dtype=bool)])
def test_combining_with_a_non_pattern_raises(other):
    with pytest.raises(TypeError, match="combines two patterns"):
        sf.Causal() | other
    with pytest.raises(TypeError, match="combines two patterns"):
        sf.Causal() & other


def test_parser_accepts_module_prefix_and_list_arithmetic():
    p = sf.parse_pattern("sf.PerHead([sf.Neighborhood(3)] * 2 + [sparseforge.Blocks((2, 5))] * 2)")
    assert p == sf.PerHead([sf.Neighborhood(3)] * 2 + [sf.Blocks((2, 5))] * 2)
    assert sf.parse_pattern("Causal() & (SlidingWindow(4096) | Sink(4))") == \
        sf.Causal() & (sf.SlidingWindow(4096) | sf.Sink(4))
    assert sf.parse_pattern("  Neighborhood(kernel_size=(3, 5), causal=(True, False))  ") == \
        sf.Neighborhood((3, 5), causal=(True, False))


# ------------------------------------------------------------------------------------
# combinators with content-dependent patterns
# ------------------------------------------------------------------------------------
def test_routed_combined_with_static_patterns():
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, HEADS, N, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    routed = sf.Routed((2, 5), 1, per_head=True)
    r = sf.dense_mask(routed, PROBLEM, q=q, k=k).numpy()
    assert r.shape == (2, HEADS, N, N)
    win = dm(sf.SlidingWindow(1, 1))
    got = sf.dense_mask(routed | sf.SlidingWindow(1, 1), PROBLEM, q=q, k=k).numpy()
    assert_mask_equal(got, r | win[None])
    got = sf.dense_mask(sf.Causal() & routed, PROBLEM, q=q, k=k).numpy()
    assert_mask_equal(got, r & dm(sf.Causal())[None])
    # per-head mix: head 0 routed (per-head routing of head 0), head 1 static
    got = sf.dense_mask(sf.PerHead([routed, sf.Blocks(2)]), PROBLEM, q=q, k=k).numpy()
    assert got.shape == (2, HEADS, N, N)
    assert_mask_equal(got[:, 0], r[:, 0])
    assert_mask_equal(got[:, 1], np.broadcast_to(dm(sf.Blocks(2))[1], (2, N, N)))
    got = sf.dense_mask(sf.PerHead([sf.Blocks(2), routed]), PROBLEM, q=q, k=k).numpy()
    assert_mask_equal(got[:, 1], r[:, 1])


def test_scattered_combined():
    coords = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 3, 3], [1, 0, 0], [0, 1, 1]])
    problem = sf.Problem(grid=5, heads=2)  # Causal needs a grid; its N must match the voxels
    sc = sf.dense_mask(sf.Scattered(2), problem, coords=coords).numpy()
    got = sf.dense_mask(sf.Scattered(2) & sf.Causal(), problem, coords=coords).numpy()
    assert_mask_equal(got, sc & np.tril(np.ones((5, 5), dtype=bool))[None])
    got = sf.dense_mask(sf.PerHead([sf.Scattered(2), sf.Scattered(4, shift=1)]), problem, coords=coords).numpy()
    assert_mask_equal(got[0], sc[0])
    assert_mask_equal(got[1], sf.dense_mask(sf.Scattered(4, shift=1), problem, coords=coords).numpy()[1])


def test_inputs_needed_and_is_static():
    assert sf.Neighborhood(3).is_static
    assert (sf.Causal() | sf.Blocks(2)).is_static
    assert (sf.Causal() | sf.Routed(2, 1)).inputs_needed() == {"qk"}
    assert sf.PerHead([sf.Scattered(2), sf.Routed(2, 1)]).inputs_needed() == {"qk", "coords"}
    assert not sf.PerHead([sf.Full(), sf.Scattered(2)]).is_static
