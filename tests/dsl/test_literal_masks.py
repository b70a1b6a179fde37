"""Tiny masks written out by hand, one per family (and a few combinations).

Each literal was derived on paper from the rule quoted in the test's docstring (the
family's source: NATTEN, DKernel, HaloNet, MaxViT, BiFormer, ...), not by running the
code. Rows are queries, columns keys; '1' = visible.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import sparseforge as sf

from ._common import assert_mask_equal, dense, lit

# (pattern, grid, heads, literal [H, N, N] or [N, N] for heads == 1)
CASES = {
    # -left <= k - q <= right, truncated at the borders
    "sliding_window_1_2": (sf.SlidingWindow(1, 2), (6,), lit(
        "111000",
        "111100",
        "011110",
        "001111",
        "000111",
        "000011")),
    # NATTEN K=3: window shifted inward at both borders -> always 3 keys
    "neighborhood_k3": (sf.Neighborhood(3), (6,), lit(
        "111000",
        "111000",
        "011100",
        "001110",
        "000111",
        "000111")),
    # NATTEN even K=4: 2 keys left of the query, 1 right
    "neighborhood_k4_even": (sf.Neighborhood(4), (6,), lit(
        "111100",
        "111100",
        "111100",
        "011110",
        "001111",
        "001111")),
    # dilation 2: groups {0,2,4} and {1,3,5}, K=2 (1 left, 0 right) within each group
    "neighborhood_k2_d2": (sf.Neighborhood(2, dilation=2), (6,), lit(
        "101000",
        "010100",
        "101000",
        "010100",
        "001010",
        "000101")),
    # dilation 2 on an odd length: groups of length 3 ({0,2,4}) and 2 ({1,3})
    "neighborhood_k2_d2_uneven": (sf.Neighborhood(2, dilation=2), (5,), lit(
        "10100",
        "01010",
        "10100",
        "01010",
        "00101")),
    # causal: keys q-2..q, no shift at the start
    "neighborhood_k3_causal": (sf.Neighborhood(3, causal=True), (6,), lit(
        "100000",
        "110000",
        "111000",
        "011100",
        "001110",
        "000111")),
    # stride 2: pairs {0,1},{2,3},{4,5} share the window of leader 1, 3, 5 (5 shifted in)
    "neighborhood_k3_s2": (sf.Neighborhood(3, stride=2), (6,), lit(
        "111000",
        "111000",
        "001110",
        "001110",
        "000111",
        "000111")),
    # causal + stride 2: leader = last query of the pair (6 for the partial pair {6});
    # keys leader-2 .. query
    "neighborhood_k3_s2_causal": (sf.Neighborhood(3, stride=2, causal=True), (7,), lit(
        "1000000",
        "1100000",
        "0110000",
        "0111000",
        "0001100",
        "0001110",
        "0000111")),
    # MaxViT block: q // 2 == k // 2, ragged last block
    "blocks_2_ragged": (sf.Blocks(2), (5,), lit(
        "11000",
        "11000",
        "00110",
        "00110",
        "00001")),
    # 2-D blocks (1, 2) on a 2x3 grid: same row and same column pair; ragged last column
    "blocks_2d": (sf.Blocks((1, 2)), (2, 3), lit(
        "110000",
        "110000",
        "001000",
        "000110",
        "000110",
        "000001")),
    # HaloNet block 2, halo 1: block b sees [2b - 1, 2b + 3), truncated
    "halo_2_1": (sf.Halo(2, 1), (6,), lit(
        "111000",
        "111000",
        "011110",
        "011110",
        "000111",
        "000111")),
    # MaxViT grid 2 on 6 tokens: period 6 // 2 = 3, q % 3 == k % 3
    "grid_2": (sf.Grid(2), (6,), lit(
        "100100",
        "010010",
        "001001",
        "100100",
        "010010",
        "001001")),
    "causal": (sf.Causal(), (4,), lit(
        "1000",
        "1100",
        "1110",
        "1111")),
    "full": (sf.Full(), (3,), lit("111", "111", "111")),
    "sink_2": (sf.Sink(2), (5,), lit(*["11000"] * 5)),
    "global_token_1": (sf.GlobalTokens([1]), (4,), lit(
        "0100",
        "1111",
        "0100",
        "0100")),
    "documents_2_3_1": (sf.Documents([2, 3, 1]), (6,), lit(
        "110000",
        "110000",
        "001110",
        "001110",
        "001110",
        "000001")),
    "causal_and_window_or_sink": (sf.Causal() & (sf.SlidingWindow(1) | sf.Sink(1)), (5,), lit(
        "10000",
        "11000",
        "11100",
        "10110",
        "10011")),
    # DKernel causal: block_size 2 (4 blocks), local 1 (own block), vertical stride 2,
    # heterogeneous: step = max(1, 2 // 2) = 1; head 0 keeps key blocks 0, 2, head 1 blocks 1, 3
    "strided_shards_causal": (sf.StridedShards(2, 1, 2), (8,), np.stack([lit(
        "10000000",
        "11000000",
        "11100000",
        "11110000",
        "11001000",
        "11001100",
        "11001110",
        "11001111"), lit(
        "10000000",
        "11000000",
        "00100000",
        "00110000",
        "00111000",
        "00111100",
        "00110010",
        "00110011")])),
    # DKernel bidirectional (relative positions), local (1, 1): |qb - kb| % 2 == 0
    "strided_shards_bidirectional": (sf.StridedShards(2, 1, 2, causal=False), (8,), lit(
        "11001100",
        "11001100",
        "00110011",
        "00110011",
        "11001100",
        "11001100",
        "00110011",
        "00110011")),
    # The two expected block layouts in DKernel's tests/test_utils.py (8 blocks, local 2,
    # vertical stride 3, homogeneous heads); block_size 1 makes token mask == block layout.
    "dkernel_test_utils_causal": (sf.StridedShards(1, 2, 3, heterogeneous=False), (8,), lit(
        "10000000",
        "11000000",
        "11100000",
        "10110000",
        "10011000",
        "10011100",
        "10010110",
        "10010011")),
    "dkernel_test_utils_bidirectional": (
        sf.StridedShards(1, 2, 3, heterogeneous=False, causal=False), (8,), lit(
            "11001001",
            "11100100",
            "01110010",
            "00111001",
            "10011100",
            "01001110",
            "00100111",
            "10010011")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_literal_mask(name):
    pattern, grid, want = CASES[name]
    heads = want.shape[0] if want.ndim == 3 else 1
    got = dense(pattern, grid, heads=heads)
    if want.ndim == 2:
        want = want[None]
    assert_mask_equal(got, want, name)


# Keys seen by ONE query, drawn on the 2-D grid (the picture users reason with).
QUERY_VIEWS = [
    # NATTEN 3x3 at the corner: shifted inward to rows 0-2, cols 0-2
    (sf.Neighborhood(3), (5, 5), (0, 0), lit(
        "11100",
        "11100",
        "11100",
        "00000",
        "00000")),
    # at the right border: rows 1-3, cols shifted to 2-4
    (sf.Neighborhood(3), (5, 5), (2, 4), lit(
        "00000",
        "00111",
        "00111",
        "00111",
        "00000")),
    # dilation 2, K=2: query (1,1) is in the odd group of both dims
    (sf.Neighborhood(2, dilation=2), (5, 5), (1, 1), lit(
        "00000",
        "01010",
        "00000",
        "01010",
        "00000")),
    (sf.Neighborhood(2, dilation=2), (5, 5), (4, 4), lit(
        "00000",
        "00000",
        "00101",
        "00000",
        "00101")),
    # per-dimension kernel and causality: rows causal K=3, cols K=2 (1 left, 0 right)
    (sf.Neighborhood((3, 2), causal=(True, False)), (4, 4), (2, 1), lit(
        "1100",
        "1100",
        "1100",
        "0000")),
    # a 4x6 grid, asymmetric N-D sliding window
    (sf.SlidingWindow(left=(1, 2), right=(0, 1)), (4, 6), (2, 3), lit(
        "000000",
        "011110",
        "011110",
        "000000")),
    # Halo per dimension: block (1, 2), halo (0, 1)
    (sf.Halo((1, 2), (0, 1)), (3, 6), (1, 2), lit(
        "000000",
        "011110",
        "000000")),
    # MaxViT grid (2, 2) on 4x6: periods (2, 3)
    (sf.Grid(2), (4, 6), (1, 1), lit(
        "000000",
        "010010",
        "000000",
        "010010")),
]


@pytest.mark.parametrize("pattern, grid, query, want", QUERY_VIEWS, ids=lambda x: repr(x) if isinstance(x, sf.Pattern) else None)
def test_literal_query_view(pattern, grid, query, want):
    m = dense(pattern, grid)[0]
    flat = int(np.ravel_multi_index(query, grid))
    assert_mask_equal(m[flat].reshape(grid), want, f"{pattern!r} query {query}")


def test_literal_scattered():
    """Window id (c_d + shift_d) // window_d per dim, same batch element required."""
    coords = torch.tensor([[0, 0, 0], [0, 1, 3], [1, 0, 0], [0, 3, 3], [0, 2, 0]])
    # windows with shift (1, 0), size (2, 4): (0,0) (1,0) batch1 (2,0) (1,0)
    got = sf.dense_mask(sf.Scattered((2, 4), shift=(1, 0)), sf.Problem(heads=1), coords=coords)
    assert_mask_equal(got[0].numpy(), lit(
        "10000",
        "01001",
        "00100",
        "00010",
        "01001"))


def test_literal_routed_given_routes():
    """Regions {0,1} and {2,3}; region 0 routed to region 1 and vice versa."""
    routes = torch.tensor([[[1], [0]]])  # [B, R, topk]
    got = sf.dense_mask(sf.Routed(2, 1), sf.Problem(grid=4, heads=1), routes=routes)
    assert got.shape == (1, 1, 4, 4)
    assert_mask_equal(got[0, 0].numpy(), lit("0011", "0011", "1100", "1100"))


def test_literal_routed_from_content():
    """q region means (+1, -1), k region means (-1, +1): region 0 prefers key region 1
    (affinity +1 over -1) and region 1 prefers key region 0."""
    q = torch.tensor([1.0, 1.0, -1.0, -1.0]).reshape(1, 1, 4, 1)
    k = torch.tensor([-1.0, -1.0, 1.0, 1.0]).reshape(1, 1, 4, 1)
    got = sf.dense_mask(sf.Routed(2, 1), sf.Problem(grid=4, heads=1, head_dim=1), q=q, k=k)
    assert_mask_equal(got[0, 0].numpy(), lit("0011", "0011", "1100", "1100"))
