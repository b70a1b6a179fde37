"""Independent brute-force reference masks, written from the original sources.

Every function returns a numpy ``bool`` array where ``True`` means "query may
attend to key".  Nothing here imports ``sparseforge``; the point is to have a
second, deliberately naive implementation to compare the compiler against.
Queries are looped over in Python; the key test is vectorized per query row.

Multi-dimensional token layouts are always flattened **row-major** (last
dimension fastest), i.e. ``idx = sum_d c_d * prod(shape[d+1:])``.

Verified rules
==============

NATTEN (neighborhood attention, NATTEN >= 0.20 "generalized NA" with stride)
---------------------------------------------------------------------------
Sources read:
  * SHI-Labs/NATTEN  csrc/include/natten/cuda/reference/mask.hpp
    (``get_window_left/right``, ``get_win_start``, ``get_win_end``,
    ``qkv_fix_dilation``, ``NeighborhoodAttentionReferenceMask::apply_mask``)
  * SHI-Labs/NATTEN  src/natten/backends/flex.py  (``get_na_flex_mask`` ->
    ``single_dim_tiling_mask``), same rules written as window-center/leader.
  * SHI-Labs/NATTEN  src/natten/utils/checks.py  (argument constraints).
  * Identical python reference in NVIDIA cosmos-predict2 multi-dim attention
    tests (``multi_dim_mask``), which tests NATTEN against it.

Per dimension, with input length ``L``, kernel ``K``, dilation ``d``, stride
``s``:
  1. Dilation: coordinate ``x`` is split into group ``x % d`` and in-group
     coordinate ``x // d``.  Query and key must be in the same group.  The
     group length is ``L_g = ceil((L - g) / d)`` where g is the *query's*
     group (NATTEN writes it ``L//d + 1 - ((g + d - L%d) // d)``), so groups
     can differ in length by one when ``d`` does not divide ``L``.  Everything
     below is in in-group coordinates ``i = q // d``, ``j = k // d``.
  2. Window split (non-causal): ``left = K // 2``, ``right = K//2 + K%2 - 1``.
     Odd K: left == right == (K-1)/2.  **Even K: left = K/2, right = K/2 - 1**
     (one more key on the LEFT than on the right).
  3. Stride: queries are grouped as ``i // s`` (in in-group coordinates, i.e.
     after dilation), and the whole group uses the window of a "leader":
       - non-causal leader = ``min((i//s)*s + s//2, L_g - 1)`` -- the centre
         query of the group; for even s the RIGHT of the two centre queries.
         For a trailing partial group the leader is the centre of the
         *hypothetical full* group clamped to ``L_g - 1`` (NOT the centre of
         the partial group).
       - causal leader = ``min((i//s)*s + s - 1, L_g - 1)`` -- the LAST query
         of the group (the real last element for a trailing partial group).
  4. Non-causal window: start = ``max(leader - left, 0)``, then if
     ``leader + right >= L_g`` start is shifted to ``L_g - right - 1 - left``
     = ``L_g - K``; end = start + K (exclusive).  Equivalent: centre =
     clamp(leader, left, L_g - 1 - right); keys ``[centre-left, centre+right]``.
     Hence every query sees exactly K keys (in its dilation group) when
     ``L_g >= K``.
  5. Causal window: start = ``max(leader - K + 1, 0)``, end = ``min(i+1, L_g)``
     (exclusive) -- i.e. ``j <= i`` (the QUERY itself, not the leader) and
     ``leader - j < K``.  **No shift at the start of the sequence**: early
     queries see fewer than K keys.  With stride, queries before the leader
     in a group see only ``[leader-K+1, i]`` (fewer keys than the leader).
  6. N-D: the mask is the AND over dimensions of the per-dimension rule
     (``is_neighbor`` ANDs per-dim [start, end) tests and ``is_equal``
     requires identical dilation-group coordinates in every dim; flex.py
     ``functools.reduce(&)``).  Causality, K, s, d may differ per dim.
     So it is separable: ``M[q, k] = AND_d M1d_d[q_d, k_d]`` on row-major
     flattened coordinates.
  7. NATTEN's argument checks (utils/checks.py ``check_kernel_size_arg`` /
     ``check_args_against_input``): K >= 2 (K=1 rejected!), stride >= 1,
     dilation >= 1, ``K * d <= L`` and ``s <= K`` per dim.  These functions do
     not enforce them unless ``strict=True``; the formulas above are simply
     evaluated as written.

DKernel (linxihui/dkernel, local + vertical-stride block sparse, Phi-3-small)
-----------------------------------------------------------------------------
Source: linxihui/dkernel dkernel/utils.py ``get_sparse_attn_mask`` at commit
65cd47ca182a5b94eb0367f02eeb9fe7eb821242 (the version with ``causal`` and
``vert_position_type``; its tests/test_utils.py contains the two expected
block masks reproduced in ``_self_check`` below).  Another stored version
(commit 6410a73f...) lacks bidirectional support but adds
``homo_within_group_head`` (see note at ``dkernel_mask``).
  * ``blocks = ceil(seq_len / block_size)``; block-level layout [H, nb, nb];
    token-level mask = kron(layout, ones(bs, bs))[..., :N, :N] -- i.e. a
    token's block is ``t // block_size`` and a ragged last block is simply
    truncated.  If causal, the token mask is additionally multiplied by
    ``tril(ones(N, N))`` (token-level ``k <= q``).  Non-causal: no token-level
    masking at all.
  * local_blocks: causal -> int L >= 1 turned into ``(L, 1)``; non-causal ->
    int L (>= 0) turned into ``(L, L)``, or a tuple ``(left, right)`` (both
    > 0).  Both counts INCLUDE the current block: local iff
    ``q_blk - k_blk < left and k_blk - q_blk < right``.
  * vert_position_type default: 'absolute' if causal else 'relative'.
  * absolute: ``vert[h, k_blk] = (k_blk + h*step + offset) % vert_stride == 0``
    (k_blk is absolute incl. kv_start_block); layout = vert | local; then
    if causal ``& (q_blk >= k_blk)``.  Vertical columns therefore also apply
    to FUTURE blocks when not causal.
  * relative: ``lm = max(q_blk - k_blk - left + 1, 0)``,
    ``rm = max(k_blk - q_blk - right + 1, 0)``, layout = ``(lm + rm) %
    vert_stride == 0`` (local blocks give lm + rm == 0 so are included).
    NO per-head sliding in relative mode (all sparse heads identical).
  * heterogeneous step: ``head_sliding_step = max(1, int(vert_stride /
    num_heads))`` where num_heads is the Q-head count (1 when homo_head);
    ``head_sliding_offset`` default 0 ("0 means block-0 is always attended
    to at head-0").  The per-pattern index ``h`` is the KV-head index; each
    kv-head pattern is repeated ``num_heads // num_kv_heads`` times.
  * dense heads: the LAST ``num_dense_heads`` kv heads (``h >= num_kv_heads
    - num_dense_heads``) are all-ones before the causal AND.  homo_head
    forbids dense heads (assert).  (In relative mode DKernel's own code would
    crash with dense heads -- vstack of 3-D and 1-D tensors; here they are
    treated as all-ones, the evident intent.)
  * homo_head: DKernel returns a single [1, nb, nb] pattern (offset still
    applies, h = 0); here it is broadcast to ``num_heads`` rows.

BiFormer (rayleizhu/BiFormer, bi-level routing attention)
---------------------------------------------------------
Sources: ops/bra_legacy.py (``TopkRouting``, ``BiLevelRoutingAttention``),
ops/bra_nchw.py (``nchwBRA``), ops/torch/rrsda.py
(``regional_routing_attention_torch``).
  * Region-level q/k = mean of the tokens of each region over ALL channels
    (all heads concatenated: qk_dim = num_heads * head_dim).  nchwBRA uses
    ``avg_pool2d(ceil_mode=True, count_include_pad=False)`` so a ragged last
    region averages only the tokens it actually has (legacy requires
    divisibility, or pads with zeros *before* the qkv linear).
  * Affinity ``A = q_r @ k_r^T`` (region x region); legacy multiplies q by
    ``qk_dim ** -0.5`` before topk (positive scalar -> same ordering), nchw
    applies no scale.  Legacy default ``param_routing=False`` => identity
    embedding.  ``torch.topk(A, k=topk, dim=-1)``; the SAME region graph is
    used by every head (``idx_r.expand(-1, num_heads, ...)``).
  * Token level: a query in region r attends to every key token whose region
    is in topk(r).  (nchw/rrsda zero-pads ragged regions and does NOT mask the
    padded keys -- "TODO: mask padding region"; padded tokens do not exist in
    this mask.)  Region index is row-major over the region grid.
  * Ties: torch.topk does not specify tie order; here we use
    ``np.argsort(-A, kind='stable')`` => among equal affinities the LOWER
    region index wins.
  * ``per_head=True`` is an extension (not in BiFormer): affinity from each
    head's own channels, separate top-k per head.

Simple geometric patterns (definitions given in the brief)
----------------------------------------------------------
  * halo (HaloNet, Vaswani et al. 2021): per dim, query block
    ``b = q_d // bs_d`` sees keys ``k_d in [b*bs_d - halo_d, (b+1)*bs_d +
    halo_d)``; out-of-range (padding) keys simply do not exist. AND over dims.
  * blocks: same ``c_d // size_d`` in every dim.
  * grid (MaxViT): ``q_d % (S_d // size_d) == k_d % (S_d // size_d)``.
  * sliding window: ``-left_d <= k_d - q_d <= right_d`` in every dim
    (inclusive both ends).
  * scattered (sparse voxel windows): same batch id and same
    ``floor((c_d + shift_d) / ws_d)`` in every spatial dim.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence, Tuple, Union

import numpy as np

IntOrSeq = Union[int, Sequence[int]]


# ----------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------


def _tup(x, nd: int, name: str = "arg") -> Tuple:
    if isinstance(x, (int, np.integer, bool, np.bool_)):
        return tuple([x] * nd)
    x = tuple(x)
    if len(x) != nd:
        raise ValueError(f"{name} must have {nd} entries, got {x}")
    return x


def _grid_coords(grid: Sequence[int]) -> np.ndarray:
    """Row-major coordinates, shape [N, ndim] (last dim fastest)."""
    grid = tuple(int(g) for g in grid)
    return np.array(list(itertools.product(*[range(g) for g in grid])), dtype=np.int64).reshape(
        -1, len(grid)
    )


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------
# 1. NATTEN
# ----------------------------------------------------------------------------


def _natten_group_len(length: int, dilation: int, group: int) -> int:
    # NATTEN mask.hpp ``qkv_fix_dilation``: number of positions x in [0, L)
    # with x % d == group.
    padding = 1 - ((group + (dilation - (length % dilation))) // dilation)
    return (length // dilation) + padding


def _natten_win_start_end(i: int, kernel_size: int, stride: int, length: int, causal: bool):
    """[start, end) of the key window for in-group query index i.

    Transcribes NATTEN mask.hpp get_win_start / get_win_end.
    """
    left = kernel_size // 2
    right = kernel_size // 2 + (kernel_size % 2) - 1
    if causal:
        leader = min((i // stride) * stride + stride - 1, length - 1)
        start = max(leader - left - right, 0)  # left + right == K - 1
        end = min(i + 1, length)
    else:
        leader = min((i // stride) * stride + (stride // 2), length - 1)
        start = max(leader - left, 0)
        if leader + right >= length:
            start += length - right - leader - 1
        end = start + kernel_size
    return start, end


def _natten_check(length, kernel_size, dilation, stride):
    if kernel_size < 2:
        raise ValueError("NATTEN requires kernel_size >= 2")
    if stride < 1 or dilation < 1:
        raise ValueError("NATTEN requires stride >= 1 and dilation >= 1")
    if kernel_size * dilation > length:
        raise ValueError("NATTEN requires kernel_size * dilation <= input size")
    if stride > kernel_size:
        raise ValueError("NATTEN requires stride <= kernel_size")


def natten_window_1d(
    length: int,
    kernel_size: int,
    dilation: int = 1,
    stride: int = 1,
    causal: bool = False,
    strict: bool = False,
) -> np.ndarray:
    """NATTEN 1-D neighborhood mask [L, L] (see module docstring)."""
    L, K, d, s = int(length), int(kernel_size), int(dilation), int(stride)
    if strict:
        _natten_check(L, K, d, s)
    keys = np.arange(L)
    k_in = keys // d
    k_grp = keys % d
    out = np.zeros((L, L), dtype=bool)
    for q in range(L):
        i, g = q // d, q % d
        Lg = _natten_group_len(L, d, g)
        start, end = _natten_win_start_end(i, K, s, Lg, causal)
        out[q] = (k_grp == g) & (k_in >= start) & (k_in < end)
    return out


def _natten_window_1d_flex_style(length, kernel_size, dilation=1, stride=1, causal=False):
    """Same rule written as NATTEN's flex.py / cosmos ``multi_dim_mask`` does
    it (leader + clamped window centre).  Used only as a cross-check."""
    L, K, d, s = int(length), int(kernel_size), int(dilation), int(stride)
    out = np.zeros((L, L), dtype=bool)
    for q in range(L):
        for k in range(L):
            qi, ki, qg, kg = q // d, k // d, q % d, k % d
            Lg = (L // d) + 1 - ((qg + (d - (L % d))) // d)
            if causal:
                leader = min((qi // s) * s + s - 1, Lg - 1)
                ok = (qi - ki >= 0) and (leader - ki < K) and qg == kg
            else:
                wl = K // 2
                wr = K // 2 + (K % 2 - 1)
                leader = min((qi // s) * s + (s // 2), Lg - 1)
                centre = min(max(leader, wl), Lg - 1 - wr)
                w0, w1 = centre - ki, ki - centre
                ok = ((0 <= w0 <= wl) or (0 <= w1 <= wr)) and qg == kg
            out[q, k] = ok
    return out


def natten_mask_nd(
    grid: Sequence[int],
    kernel_size: IntOrSeq,
    dilation: IntOrSeq = 1,
    stride: IntOrSeq = 1,
    causal: Union[bool, Sequence[bool]] = False,
    strict: bool = False,
) -> np.ndarray:
    """NATTEN N-D mask [N, N] on the row-major flattened grid.

    Computed per query directly (per-dim window start/end + same dilation
    group in every dim, exactly like NATTEN's NeighborhoodAttentionReferenceMask),
    so it does not *assume* separability; ``_self_check`` verifies it equals
    the AND of 1-D masks.
    """
    grid = tuple(int(g) for g in grid)
    nd = len(grid)
    K = _tup(kernel_size, nd, "kernel_size")
    D = _tup(dilation, nd, "dilation")
    S = _tup(stride, nd, "stride")
    C = _tup(causal, nd, "causal")
    if strict:
        for x, k, d, s in zip(grid, K, D, S):
            _natten_check(x, k, d, s)
    coords = _grid_coords(grid)
    N = coords.shape[0]
    k_in = coords // np.array(D)
    k_grp = coords % np.array(D)
    out = np.zeros((N, N), dtype=bool)
    for q in range(N):
        row = np.ones(N, dtype=bool)
        for dim in range(nd):
            x = int(coords[q, dim])
            i, g = x // D[dim], x % D[dim]
            Lg = _natten_group_len(grid[dim], D[dim], g)
            start, end = _natten_win_start_end(i, K[dim], S[dim], Lg, bool(C[dim]))
            row &= (k_grp[:, dim] == g) & (k_in[:, dim] >= start) & (k_in[:, dim] < end)
        out[q] = row
    return out


# ----------------------------------------------------------------------------
# 2. DKernel local + vertical-stride
# ----------------------------------------------------------------------------


def dkernel_block_layout(
    num_heads: int,
    seq_len: int,
    block_size: int,
    local_blocks: Union[int, Tuple[int, int]],
    vert_stride: int,
    homo_head: bool = False,
    causal: bool = True,
    dense_heads: int = 0,
    num_kv_heads: int = None,
    head_sliding_step: int = None,
    head_sliding_offset: int = 0,
    vert_position_type: str = None,
    q_start_position: int = None,
    kv_start_position: int = None,
) -> np.ndarray:
    """Block layout [H_pat, nb, nb] as DKernel's get_sparse_attn_mask builds it
    (H_pat = 1 if homo_head else num_heads)."""
    if homo_head:
        num_heads = 1
        assert dense_heads == 0, "DKernel: cannot have dense heads with homo_head"
    if vert_position_type is None:
        vert_position_type = "absolute" if causal else "relative"
    assert vert_position_type in ("absolute", "relative")
    num_kv_heads = num_kv_heads or num_heads
    num_sparse_heads = num_kv_heads - dense_heads
    q_per_kv = num_heads // num_kv_heads

    q_start_block = 0
    kv_start_block = 0
    if q_start_position is not None:
        assert q_start_position % block_size == 0
        q_start_block = q_start_position // block_size
    if kv_start_position is not None:
        assert kv_start_position % block_size == 0
        kv_start_block = kv_start_position // block_size

    if causal:
        assert isinstance(local_blocks, int) and local_blocks >= 1
        left, right = local_blocks, 1  # 1 == only the current block on the right
    elif isinstance(local_blocks, int):
        assert local_blocks >= 0
        left, right = local_blocks, local_blocks
    else:
        assert len(local_blocks) == 2 and all(x > 0 for x in local_blocks)
        left, right = int(local_blocks[0]), int(local_blocks[1])

    nb = _cdiv(seq_len, block_size)
    if head_sliding_step is None:
        head_sliding_step = max(1, int(vert_stride / num_heads))

    # pattern per kv head, repeated q_per_kv times (kv-head-major order)
    layout = np.zeros((num_kv_heads * q_per_kv, nb, nb), dtype=bool)
    row = 0
    for h in range(num_kv_heads):
        pat = np.zeros((nb, nb), dtype=bool)
        for qb in range(nb):
            qp = q_start_block + qb
            for kb in range(nb):
                kp = kv_start_block + kb
                if h >= num_sparse_heads:
                    allowed = True
                elif vert_position_type == "absolute":
                    vert = (kp + h * head_sliding_step + head_sliding_offset) % vert_stride == 0
                    local = (qp - kp < left) and (kp - qp < right)
                    allowed = vert or local
                else:  # relative
                    lm = max(qp - kp - left + 1, 0)
                    rm = max(kp - qp - right + 1, 0)
                    allowed = (lm + rm) % vert_stride == 0
                if causal:
                    allowed = allowed and (qp >= kp)
                pat[qb, kb] = allowed
        for _ in range(q_per_kv):
            layout[row] = pat
            row += 1
    return layout


def dkernel_mask(
    num_heads: int,
    seq_len: int,
    block_size: int,
    local_blocks: Union[int, Tuple[int, int]],
    vert_stride: int,
    homo_head: bool = False,
    causal: bool = True,
    dense_heads: int = 0,
    num_kv_heads: int = None,
    head_sliding_step: int = None,
    head_sliding_offset: int = 0,
    vert_position_type: str = None,
) -> np.ndarray:
    """Token-level DKernel mask [num_heads, N, N].

    Note on the other DKernel version (commit 6410a73f, causal-only): there
    ``num_patterns = num_kv_heads if (GQA and homo_within_group_head) else
    num_heads``, ``head_sliding_step = max(1, vert_stride // num_patterns)``
    and the layout has num_patterns rows (not expanded to q heads).  Without
    GQA it is identical to this one.
    """
    layout = dkernel_block_layout(
        num_heads,
        seq_len,
        block_size,
        local_blocks,
        vert_stride,
        homo_head=homo_head,
        causal=causal,
        dense_heads=dense_heads,
        num_kv_heads=num_kv_heads,
        head_sliding_step=head_sliding_step,
        head_sliding_offset=head_sliding_offset,
        vert_position_type=vert_position_type,
    )
    if homo_head:
        layout = np.repeat(layout, num_heads, axis=0)
    N = seq_len
    tok_blk = np.arange(N) // block_size
    out = np.zeros((layout.shape[0], N, N), dtype=bool)
    keys = np.arange(N)
    for h in range(layout.shape[0]):
        for q in range(N):
            r = layout[h, tok_blk[q], tok_blk]
            if causal:
                r = r & (keys <= q)
            out[h, q] = r
    return out


# ----------------------------------------------------------------------------
# 3. BiFormer routing
# ----------------------------------------------------------------------------


def _region_ids(grid: Sequence[int], region_size: Sequence[int]) -> Tuple[np.ndarray, int]:
    coords = _grid_coords(grid)
    nreg = [_cdiv(g, r) for g, r in zip(grid, region_size)]
    rc = coords // np.array(region_size)
    rid = np.zeros(coords.shape[0], dtype=np.int64)
    for d in range(len(grid)):
        rid = rid * nreg[d] + rc[:, d]
    return rid, int(np.prod(nreg))


def biformer_routing_mask(
    q: np.ndarray,
    k: np.ndarray,
    region_size: IntOrSeq,
    grid: Sequence[int],
    topk: int,
    per_head: bool = False,
) -> np.ndarray:
    """BiFormer bi-level routing mask [B, H, N, N] (see module docstring)."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    B, H, N, Dh = q.shape
    grid = tuple(int(g) for g in grid)
    assert int(np.prod(grid)) == N
    rs = _tup(region_size, len(grid), "region_size")
    rid, R = _region_ids(grid, rs)
    assert 1 <= topk <= R

    # region means (ragged regions average only the tokens they contain)
    qr = np.zeros((B, H, R, Dh))
    kr = np.zeros((B, H, R, Dh))
    for r in range(R):
        sel = rid == r
        qr[:, :, r] = q[:, :, sel].mean(axis=2)
        kr[:, :, r] = k[:, :, sel].mean(axis=2)

    out = np.zeros((B, H, N, N), dtype=bool)
    for b in range(B):
        if per_head:
            aff_list = [qr[b, h] @ kr[b, h].T for h in range(H)]
        else:
            # all heads' channels together == sum of per-head dot products
            qc = np.concatenate([qr[b, h] for h in range(H)], axis=-1)
            kc = np.concatenate([kr[b, h] for h in range(H)], axis=-1)
            a = qc @ kc.T
            aff_list = [a] * H
        for h in range(H):
            a = aff_list[h]
            chosen = np.zeros((R, R), dtype=bool)
            for r in range(R):
                order = np.argsort(-a[r], kind="stable")
                chosen[r, order[:topk]] = True
            for t in range(N):
                out[b, h, t] = chosen[rid[t], rid]
    return out


# ----------------------------------------------------------------------------
# 4. simple geometric patterns
# ----------------------------------------------------------------------------


def halo_mask(grid: Sequence[int], block_size: IntOrSeq, halo: IntOrSeq) -> np.ndarray:
    grid = tuple(int(g) for g in grid)
    nd = len(grid)
    bs = _tup(block_size, nd, "block_size")
    ha = _tup(halo, nd, "halo")
    coords = _grid_coords(grid)
    N = coords.shape[0]
    out = np.zeros((N, N), dtype=bool)
    for qi in range(N):
        row = np.ones(N, dtype=bool)
        for d in range(nd):
            b = coords[qi, d] // bs[d]
            lo = b * bs[d] - ha[d]
            hi = (b + 1) * bs[d] + ha[d]
            row &= (coords[:, d] >= lo) & (coords[:, d] < hi)
        out[qi] = row
    return out


def blocks_mask(grid: Sequence[int], size: IntOrSeq) -> np.ndarray:
    grid = tuple(int(g) for g in grid)
    nd = len(grid)
    sz = _tup(size, nd, "size")
    coords = _grid_coords(grid)
    N = coords.shape[0]
    out = np.zeros((N, N), dtype=bool)
    for qi in range(N):
        row = np.ones(N, dtype=bool)
        for d in range(nd):
            row &= (coords[:, d] // sz[d]) == (coords[qi, d] // sz[d])
        out[qi] = row
    return out


def grid_mask(grid: Sequence[int], size: IntOrSeq) -> np.ndarray:
    """MaxViT grid attention: ``size`` is the grid size G per dim; tokens with
    equal ``c_d % (S_d // G_d)`` in every dim attend to each other."""
    grid = tuple(int(g) for g in grid)
    nd = len(grid)
    sz = _tup(size, nd, "size")
    coords = _grid_coords(grid)
    N = coords.shape[0]
    out = np.zeros((N, N), dtype=bool)
    for qi in range(N):
        row = np.ones(N, dtype=bool)
        for d in range(nd):
            period = grid[d] // sz[d]
            row &= (coords[:, d] % period) == (coords[qi, d] % period)
        out[qi] = row
    return out


def sliding_window_mask(grid: Sequence[int], left: IntOrSeq, right: IntOrSeq) -> np.ndarray:
    grid = tuple(int(g) for g in grid)
    nd = len(grid)
    lf = _tup(left, nd, "left")
    rt = _tup(right, nd, "right")
    coords = _grid_coords(grid)
    N = coords.shape[0]
    out = np.zeros((N, N), dtype=bool)
    for qi in range(N):
        row = np.ones(N, dtype=bool)
        for d in range(nd):
            delta = coords[:, d] - coords[qi, d]
            row &= (delta >= -lf[d]) & (delta <= rt[d])
        out[qi] = row
    return out


def scattered_mask(coords: np.ndarray, window_size: IntOrSeq, shift: IntOrSeq = 0) -> np.ndarray:
    """coords: int [N, 1 + ndim], column 0 = batch id."""
    coords = np.asarray(coords, dtype=np.int64)
    N, c = coords.shape
    nd = c - 1
    ws = _tup(window_size, nd, "window_size")
    sh = _tup(shift, nd, "shift")
    win = np.zeros((N, nd), dtype=np.int64)
    for d in range(nd):
        # floor division (np.floor_divide floors for negatives too)
        win[:, d] = np.floor_divide(coords[:, 1 + d] + sh[d], ws[d])
    out = np.zeros((N, N), dtype=bool)
    for qi in range(N):
        row = coords[:, 0] == coords[qi, 0]
        for d in range(nd):
            row &= win[:, d] == win[qi, d]
        out[qi] = row
    return out


# ----------------------------------------------------------------------------
# self check
# ----------------------------------------------------------------------------


def _show(m: np.ndarray) -> str:
    return "\n".join("".join("x" if v else "." for v in r) for r in m)


def _self_check(verbose: bool = True) -> None:
    import time

    # NATTEN: two transcriptions agree
    for L in range(2, 14):
        for K in range(2, L + 1):
            for d in range(1, L // K + 1):
                for s in range(1, K + 1):
                    for c in (False, True):
                        a = natten_window_1d(L, K, d, s, c)
                        b = _natten_window_1d_flex_style(L, K, d, s, c)
                        assert np.array_equal(a, b), (L, K, d, s, c)
                        if not c:
                            # every query sees exactly K keys when valid
                            assert (a.sum(1) == K).all(), (L, K, d, s)
    # even kernel: 2 keys left, 1 right
    m = natten_window_1d(8, 4)
    assert np.flatnonzero(m[4]).tolist() == [2, 3, 4, 5]
    # stride leader (non-causal): L=10, K=3, s=4 -> groups [0..3] leader 2,
    # [4..7] leader 6, [8, 9] leader min(10, 9) = 9
    m = natten_window_1d(10, 3, stride=4)
    assert np.flatnonzero(m[0]).tolist() == [1, 2, 3]
    assert np.flatnonzero(m[5]).tolist() == [5, 6, 7]
    assert np.flatnonzero(m[8]).tolist() == [7, 8, 9]
    # causal: no shift at start, stride leader = last of group
    m = natten_window_1d(8, 3, causal=True)
    assert np.flatnonzero(m[0]).tolist() == [0]
    assert np.flatnonzero(m[5]).tolist() == [3, 4, 5]
    m = natten_window_1d(8, 3, stride=2, causal=True)
    assert np.flatnonzero(m[4]).tolist() == [3, 4]  # leader 5 -> [3, 5]
    assert np.flatnonzero(m[5]).tolist() == [3, 4, 5]
    # N-D separability
    for grid, K, d, s, c in [
        ((5, 6), (3, 4), (1, 1), (1, 2), (False, True)),
        ((7, 5), (3, 2), (2, 2), (3, 1), (True, False)),
        ((3, 4, 5), 2, 1, (1, 2, 2), False),
    ]:
        nd = len(grid)
        Kt, dt, st, ct = (_tup(x, nd) for x in (K, d, s, c))
        ref = natten_mask_nd(grid, K, d, s, c)
        co = _grid_coords(grid)
        sep = np.ones_like(ref)
        for dim in range(nd):
            m1 = natten_window_1d(grid[dim], Kt[dim], dt[dim], st[dim], ct[dim])
            sep &= m1[co[:, dim][:, None], co[:, dim][None, :]]
        assert np.array_equal(ref, sep)

    # DKernel: expected layouts from dkernel tests/test_utils.py
    exp_causal = np.array(
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [1, 0, 1, 1, 0, 0, 0, 0],
            [1, 0, 0, 1, 1, 0, 0, 0],
            [1, 0, 0, 1, 1, 1, 0, 0],
            [1, 0, 0, 1, 0, 1, 1, 0],
            [1, 0, 0, 1, 0, 0, 1, 1],
        ],
        dtype=bool,
    )
    exp_bidir = np.array(
        [
            [1, 1, 0, 0, 1, 0, 0, 1],
            [1, 1, 1, 0, 0, 1, 0, 0],
            [0, 1, 1, 1, 0, 0, 1, 0],
            [0, 0, 1, 1, 1, 0, 0, 1],
            [1, 0, 0, 1, 1, 1, 0, 0],
            [0, 1, 0, 0, 1, 1, 1, 0],
            [0, 0, 1, 0, 0, 1, 1, 1],
            [1, 0, 0, 1, 0, 0, 1, 1],
        ],
        dtype=bool,
    )
    lay = dkernel_block_layout(2, 16, 2, 2, 3, homo_head=True, causal=True)
    assert np.array_equal(lay[0], exp_causal)
    lay = dkernel_block_layout(2, 16, 2, 2, 3, homo_head=True, causal=False)
    assert np.array_equal(lay[0], exp_bidir)
    tok = dkernel_mask(4, 37, 4, 2, 4, causal=True, dense_heads=1)
    assert tok.shape == (4, 37, 37) and tok[3].sum() == 37 * 38 // 2
    assert not np.triu(tok[0], 1).any()

    # BiFormer
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, 30, 4))
    k = rng.standard_normal((2, 3, 30, 4))
    bm = biformer_routing_mask(q, k, (2, 4), (5, 6), 2)
    rid, R = _region_ids((5, 6), (2, 4))
    assert R == 6
    # each query sees exactly the tokens of 2 regions; all heads identical
    assert (bm[:, 0] == bm[:, 2]).all()
    sizes = np.bincount(rid, minlength=R)
    for b in range(2):
        for t in range(30):
            regs = np.unique(rid[bm[b, 0, t]])
            assert len(regs) == 2 and bm[b, 0, t].sum() == sizes[regs].sum()
    # ties: all-equal affinity -> lowest region indices win
    z = np.ones((1, 1, 30, 4))
    bz = biformer_routing_mask(z, z, (2, 4), (5, 6), 2)
    assert set(np.unique(rid[bz[0, 0, 0]]).tolist()) == {0, 1}
    bmh = biformer_routing_mask(q, k, (2, 4), (5, 6), 2, per_head=True)
    assert bmh.shape == (2, 3, 30, 30)

    # geometric
    assert np.array_equal(blocks_mask((4,), 2), halo_mask((4,), 2, 0))
    g = grid_mask((4, 4), 2)
    assert g[0].sum() == 4 and g[0, 2] and g[0, 8] and g[0, 10]
    sw = sliding_window_mask((6,), 1, 2)
    assert np.flatnonzero(sw[3]).tolist() == [2, 3, 4, 5]
    co = np.array([[0, 0, 0], [0, 1, 3], [1, 0, 0], [0, 3, 3]])
    sc = scattered_mask(co, (2, 4), (1, 0))
    # windows: (0,0), (1,0), other batch, (2,0)
    assert sc.tolist()[0] == [True, False, False, False]
    assert sc.tolist()[1] == [False, True, False, False]

    # timing at N = 400
    t0 = time.time()
    natten_mask_nd((20, 20), (5, 4), (2, 1), (2, 3), (False, True))
    halo_mask((20, 20), 4, 2)
    grid_mask((20, 20), 4)
    sliding_window_mask((20, 20), 2, 3)
    scattered_mask(np.concatenate([np.zeros((400, 1), int), _grid_coords((20, 20))], 1), (4, 4), (2, 2))
    dkernel_mask(2, 400, 16, 3, 4)
    t1 = time.time()
    if verbose:
        print("natten 1d L=9 K=4 (even kernel, non-causal):")
        print(_show(natten_window_1d(9, 4)))
        print("natten 1d L=10 K=4 s=3 causal:")
        print(_show(natten_window_1d(10, 4, stride=3, causal=True)))
        print("natten 1d L=10 K=3 d=2:")
        print(_show(natten_window_1d(10, 3, dilation=2)))
        print("dkernel 2 heads N=12 bs=2 local=2 vs=3 causal, head 1:")
        print(_show(dkernel_mask(2, 12, 2, 2, 3)[1]))
        print(f"N=400 batch of masks: {t1 - t0:.2f}s")
        print("all self checks passed")


if __name__ == "__main__":
    _self_check()
