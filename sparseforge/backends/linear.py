"""Scattered voxel-window LINEAR attention (ScatterFormer), as plain torch ops.

For a ``dsl.content.Scattered`` pattern and feature map ``phi`` ("relu": ``relu(x)``,
"elu+1": ``elu(x) + 1``), per window ``g`` and head::

    KV_g = sum_{j in g} phi(k_j)^T v_j      [D, D]
    S_g  = sum_{j in g} phi(k_j)            [D]
    out_i = phi(q_i) KV_g / (phi(q_i) . S_g + 1e-6)     for voxel i in window g

Neighbour pooling (ScatterFormer's cross-window interaction), the exact rule: a window's
id is ``(batch, w_1, ..., w_n)`` with ``w_d = (c_d + shift_d) // window_size_d``. With
``neighbor_pooling=True`` the KV and S of every (non-empty) window are replaced, before
they are applied to the queries, by the sum of the un-pooled KV and S over the windows
``(batch, w_1 + a, w_2 + b, w_3, ...)`` for a, b in {-1, 0, 1} (the window itself
included): the 3 x 3 neighbourhood in the first two window-grid dimensions, same batch
element, same remaining window coordinates; windows holding no voxel (or outside the grid)
contribute nothing. With 1-D coordinates the neighbourhood is the 3 windows w_1 - 1..w_1 + 1.

Implementation: O(N) torch ops on the window grouping (``lower.segments.sort_into_windows``): the
window index of every voxel, ``index_add_`` segment sums, gathers back; neighbour windows
are found by encoding each window id as one int64 (mixed radix) and ``searchsorted`` over
the sorted unique window codes (no Python loop over windows), and pooling is one sparse
[W, W] 0/1 matrix product (``torch.sparse.mm``). Everything runs on the
inputs' device and is differentiable by torch autograd (two small ``autograd.Function``s
of torch ops, each one's backward written with the other, so higher derivatives work too).
The per-window products run as batched matmuls on ``BLOCK``-row blocks of the
window-sorted voxels (every window cut into blocks, the last one zero-padded; block results
summed into their windows), in chunks of blocks, so no per-voxel [H, D, D] tensor is ever
made for all voxels. Memory: KV is W x H x D x D (W non-empty windows), and pooling keeps
a second one. This torch path is what runs on CPU tensors (and float64); CUDA tensors and
``backend="interpret"`` run the fused Triton kernels of ``backends.linear_kernels`` on the
plan's ``chunks`` (every window cut into runs of at most ``CHUNK_ROWS`` window-sorted rows).
"""
from __future__ import annotations

import dataclasses

import torch

from ..dsl.content import Scattered, check_coords
from ..lower.segments import sort_into_windows, window_ids

#: Values of ``compile(..., feature_map=)`` for linear attention.
FEATURE_MAPS = ("relu", "elu+1")
#: Added to the denominator ``phi(q_i) . S_g``.
EPS = 1e-6
#: Largest number of elements of the per-voxel [rows, H, D, D] products made at once.
CHUNK_ELEMENTS = 1 << 24
#: Rows per block of the batched per-window matmuls.
BLOCK = 8
#: Most window-sorted rows one Triton program handles (``backends.linear_kernels``); a window
#: with more rows is cut into several chunks whose results are added atomically.
CHUNK_ROWS = 256


def check_feature_map(feature_map) -> str:
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {list(FEATURE_MAPS)}, got {feature_map!r}")
    return feature_map


def feature(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    if feature_map == "relu":
        return torch.relu(x)
    if feature_map == "elu+1":
        return torch.nn.functional.elu(x) + 1
    raise ValueError(f"feature_map must be one of {list(FEATURE_MAPS)}, got {feature_map!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class ScatteredLinearPlan:
    """The window grouping of one set of voxel coordinates for linear attention, reusable
    across calls and layers with the same windows: ``lin(q, k, v, plan=lin.plan(coords))``.

    win:       int64 [N] window number of every voxel (windows numbered in sorted id order)
    neighbors: int64 [W, 9] (1-D coords: [W, 3]) the windows pooled into each window, W
               (one past the last window) where a neighbour holds no voxel; None without
               neighbour pooling
    pool_index: int64 [2, E] the present (window, neighbour) pairs (``neighbors`` without
               the absent ones): the nonzeros of the sparse pooling matrix; None without pooling
    slot, block_win, n_blocks: every window cut into ``BLOCK``-row blocks (last one padded):
               int64 [N] the padded row (block * BLOCK + row) of every voxel, int64
               [n_blocks] the window of every block — the batched matmuls' layout
    chunks:    the Triton kernels' layout (``LinearChunks``): windows cut into runs of at
               most ``CHUNK_ROWS`` rows of the window-sorted voxel order
    """

    pattern: Scattered
    neighbor_pooling: bool
    n_voxels: int
    n_windows: int
    win: torch.Tensor
    neighbors: torch.Tensor | None
    pool_index: torch.Tensor | None = None
    slot: torch.Tensor | None = None
    block_win: torch.Tensor | None = None
    n_blocks: int = 0
    chunks: "LinearChunks | None" = None

    @property
    def blocks(self):
        return self.slot, self.block_win, self.n_blocks

    @property
    def device(self) -> torch.device:
        return self.win.device

    def tensors(self) -> list[torch.Tensor]:
        """What the ``sparseforge::linear_attention`` ops take: the kernels' chunk tables
        (order, start, end, win) and, when the plan pools, the pooling pairs."""
        ch = self.chunks
        return [ch.order, ch.start, ch.end, ch.win] + ([self.pool_index] if self.neighbor_pooling else [])

    @classmethod
    def of_tensors(cls, tensors: list[torch.Tensor], n_windows: int) -> "ScatteredLinearPlan":
        """The kernels' view of a plan from ``tensors()`` (what the ops rebuild inside)."""
        order, start, end, win, *pooling = tensors
        chunks = LinearChunks(order, start, end, win, int(start.shape[0]), 0)
        return cls(None, bool(pooling), int(order.shape[0]), n_windows, None, None,
                   pooling[0] if pooling else None, chunks=chunks)

    def __repr__(self) -> str:
        return (f"ScatteredLinearPlan({self.pattern!r}, neighbor_pooling={self.neighbor_pooling}, "
                f"voxels={self.n_voxels}, windows={self.n_windows}, device={self.device})")


@dataclasses.dataclass(frozen=True, eq=False)
class LinearChunks:
    """Every window cut into chunks of at most ``rows`` consecutive rows of the window-sorted
    voxel order (one Triton program per chunk and head).

    order: int32 [N] the voxel at every sorted position (windows contiguous, ascending)
    start, end, win: int32 [n_chunks] sorted positions [start, end) of each chunk and its window
    """

    order: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    win: torch.Tensor
    n_chunks: int
    rows: int


def chunk_windows(order, win_start, win_len, rows: int) -> LinearChunks:
    """``LinearChunks`` of windows w occupying sorted positions [win_start[w], win_start[w] +
    win_len[w]) (int64 [W] each); ``order`` int64 [N] from ``sort_into_windows``."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"chunk_rows must be an int >= 1, got {rows!r}")
    if order.numel() >= 2 ** 31:
        raise ValueError(f"{order.numel()} voxels: the linear-attention kernels index rows with int32 "
                         "(fewer than 2**31 voxels); split the batch")
    dev = order.device
    per = torch.div(win_len + rows - 1, rows, rounding_mode="floor")            # chunks per window
    n_chunks = int(per.sum()) if per.numel() else 0
    win = torch.repeat_interleave(torch.arange(per.numel(), device=dev), per, output_size=n_chunks)
    first = torch.cumsum(per, 0) - per                                           # first chunk of each window
    start = win_start[win] + (torch.arange(n_chunks, device=dev) - first[win]) * rows
    end = torch.minimum(start + rows, (win_start + win_len)[win])
    i32 = torch.int32
    return LinearChunks(order.to(i32).contiguous(), start.to(i32).contiguous(), end.to(i32).contiguous(),
                        win.to(i32).contiguous(), n_chunks, rows)


def neighbor_table(keys: torch.Tensor) -> torch.Tensor:
    """keys int64 [W, 1 + n] distinct window ids sorted lexicographically (``sort_into_windows``'s order);
    returns int64 [W, 3 ** min(n, 2)]: for every window the index of each window of its
    neighbourhood (offsets -1..1 in window dims 1 and 2), W where absent."""
    w_count, cols = keys.shape
    dev = keys.device
    n_pool = min(cols - 1, 2)
    if w_count == 0:
        return torch.zeros(0, 3 ** n_pool, dtype=torch.long, device=dev)
    shifted = keys + 1                      # neighbour coordinates -1 stay non-negative
    radix = shifted.amax(0) + 2             # room for +1 without a carry
    # mixed radix, first column most significant: codes keep the lexicographic order
    strides = [1] * cols
    total = 1
    for c in reversed(range(cols)):
        strides[c] = total
        total *= int(radix[c])
    if total >= 2 ** 62:
        raise ValueError("voxel coordinates span too large a window grid to encode window ids in int64 "
                         f"(radices {radix.tolist()})")
    stride = torch.tensor(strides, dtype=torch.long, device=dev)
    codes = (shifted * stride).sum(1)       # ascending
    offsets = [(a, b) for a in (-1, 0, 1) for b in ((-1, 0, 1) if n_pool == 2 else (0,))]
    out = []
    for a, b in offsets:                    # 9 (or 3) offsets, never a loop over windows
        target = codes + a * strides[1] + (b * strides[2] if n_pool == 2 else 0)
        idx = torch.searchsorted(codes, target).clamp_max(w_count - 1)
        out.append(torch.where(codes[idx] == target, idx, torch.full_like(idx, w_count)))
    return torch.stack(out, 1)


def plan(pattern: Scattered, coords: torch.Tensor, neighbor_pooling: bool,
         chunk_rows: int = CHUNK_ROWS) -> ScatteredLinearPlan:
    """The grouping of ``coords`` (int [N, 1 + ndim], batch first; checked) on their device;
    ``chunk_rows``: the most rows of one window a Triton program takes (``LinearChunks``)."""
    coords = check_coords(coords, keep_device=True)
    n = coords.shape[0]
    pattern.check_rank(coords)
    dev = coords.device
    order, seg, start, end = sort_into_windows(pattern, coords)
    win = torch.empty(n, dtype=torch.long, device=dev)
    win[order] = seg
    n_windows = int(seg[-1]) + 1 if n else 0
    # blocks: every window cut into BLOCK-row pieces (the last one zero-padded)
    pos = torch.arange(n, device=dev)
    first = torch.ones(n, dtype=torch.bool, device=dev)
    if n > 1:
        first[1:] = seg[1:] != seg[:-1]
    per_window = torch.div(end[first] - start[first] + BLOCK - 1, BLOCK, rounding_mode="floor")  # [W]
    offset = torch.cumsum(per_window, 0) - per_window
    n_blocks = int(per_window.sum()) if n else 0
    r = pos - start
    slot_packed = (offset[seg] + torch.div(r, BLOCK, rounding_mode="floor")) * BLOCK + r % BLOCK
    slot = torch.empty(n, dtype=torch.long, device=dev)
    slot[order] = slot_packed
    block_win = torch.repeat_interleave(torch.arange(n_windows, device=dev), per_window, output_size=n_blocks)
    chunks = chunk_windows(order, start[first], end[first] - start[first], chunk_rows)
    neighbors = index = None
    if neighbor_pooling:
        first = torch.ones(n, dtype=torch.bool, device=coords.device)
        if n > 1:
            first[1:] = seg[1:] != seg[:-1]
        keys = window_ids(pattern, coords)[order[first]]  # [W, 1 + n], lexicographically sorted
        neighbors = neighbor_table(keys)
        index = pool_index(neighbors)
    return ScatteredLinearPlan(pattern, bool(neighbor_pooling), n, n_windows, win.contiguous(), neighbors, index,
                               slot.contiguous(), block_win.contiguous(), n_blocks, chunks)


def _chunks(n: int, per_row: int):
    step = max(1, CHUNK_ELEMENTS // max(1, per_row))
    for s in range(0, n, step):
        yield slice(s, min(s + step, n))


def _to_blocks(x, slot, n_blocks):
    """[N, H, D] -> [n_blocks, BLOCK, H, D], zero-padded."""
    out = x.new_zeros(n_blocks * BLOCK, *x.shape[1:])
    out[slot] = x
    return out.view(n_blocks, BLOCK, *x.shape[1:])


def _segment_outer(a, b, blocks, n_windows):
    """M [W, H, Da, Db] = sum over voxels i of window w of a_i^T b_i (a [N, H, Da], b [N, H, Db]):
    one batched matmul per block of rows, block results summed into their windows."""
    slot, block_win, n_blocks = blocks
    h, da, db = a.shape[1], a.shape[2], b.shape[2]
    ab, bb = _to_blocks(a, slot, n_blocks), _to_blocks(b, slot, n_blocks)
    out = a.new_zeros(n_windows, h, da, db)
    for s in _chunks(n_blocks, h * da * db):
        out.index_add_(0, block_win[s], torch.einsum("bthd,bthe->bhde", ab[s], bb[s]))
    return out


def _window_matmul(x, m, blocks):
    """y [N, H, Db] with y_i = x_i M[win_i] (x [N, H, Da], M [W, H, Da, Db])."""
    slot, block_win, n_blocks = blocks
    h, db = x.shape[1], m.shape[3]
    xb = _to_blocks(x, slot, n_blocks)
    out = x.new_empty(n_blocks, BLOCK, h, db)
    for s in _chunks(n_blocks, h * m.shape[2] * db):
        out[s] = torch.einsum("bthd,bhde->bthe", xb[s], m[block_win[s]])
    return out.view(n_blocks * BLOCK, h, db)[slot]


class SegmentOuter(torch.autograd.Function):
    """``_segment_outer`` with its backward written with ``WindowMatmul`` (and vice versa),
    so higher derivatives work. ``blocks``: the plan's (slot, block_win, n_blocks), indices
    only (kept on ctx: they never need gradients)."""

    @staticmethod
    def forward(ctx, a, b, blocks, n_windows):
        ctx.save_for_backward(a, b)
        ctx.blocks = blocks
        return _segment_outer(a, b, blocks, n_windows)

    @staticmethod
    def backward(ctx, dm):
        a, b = ctx.saved_tensors
        da = db = None
        if ctx.needs_input_grad[0]:
            da = WindowMatmul.apply(b, dm.transpose(-1, -2), ctx.blocks)
        if ctx.needs_input_grad[1]:
            db = WindowMatmul.apply(a, dm, ctx.blocks)
        return da, db, None, None


class WindowMatmul(torch.autograd.Function):
    """``_window_matmul``, differentiable in x and M."""

    @staticmethod
    def forward(ctx, x, m, blocks):
        ctx.save_for_backward(x, m)
        ctx.blocks = blocks
        ctx.n_windows = m.shape[0]
        return _window_matmul(x, m, blocks)

    @staticmethod
    def backward(ctx, dy):
        x, m = ctx.saved_tensors
        dx = dm = None
        if ctx.needs_input_grad[0]:
            dx = WindowMatmul.apply(dy, m.transpose(-1, -2), ctx.blocks)
        if ctx.needs_input_grad[1]:
            dm = SegmentOuter.apply(x, dy, ctx.blocks, ctx.n_windows)
        return dx, dm, None


def pool_index(neighbors: torch.Tensor) -> torch.Tensor:
    """int64 [2, E] (window, neighbour) pairs of the present neighbours, in coalesced
    (lexicographic) order: rows ascend, and within a row the offsets ascend in code order."""
    w_count, k = neighbors.shape
    rows = torch.arange(w_count, device=neighbors.device).repeat_interleave(k)
    cols = neighbors.reshape(-1)
    ok = cols < w_count
    return torch.stack([rows[ok], cols[ok]])


def pool(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` [W, ...] over each window's neighbourhood: one sparse [W, W] 0/1 matrix
    (``index``: its nonzeros) times ``x`` flattened; differentiable in ``x``."""
    w_count = x.shape[0]
    if w_count == 0:
        return x.clone()
    ones = torch.ones(index.shape[1], dtype=x.dtype, device=x.device)
    matrix = torch.sparse_coo_tensor(index, ones, (w_count, w_count), is_coalesced=True, check_invariants=False)
    return torch.sparse.mm(matrix, x.reshape(w_count, -1)).view_as(x)


def linear_attention(q, k, v, plan: ScatteredLinearPlan, feature_map: str) -> torch.Tensor:
    """out [N, H, D] from q [N, H, D], k/v [N, H, D] (heads already repeated) in q's dtype;
    computed in float32 for half inputs (float64 stays float64)."""
    dtype = q.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    fq, fk = feature(q.to(work), feature_map), feature(k.to(work), feature_map)
    v = v.to(work)
    win = plan.win
    w = plan.n_windows
    kv = SegmentOuter.apply(fk, v, plan.blocks, w)                                       # [W, H, D, Dv]
    s = fk.new_zeros(w, *fk.shape[1:]).index_add(0, win, fk)                     # [W, H, D]
    if plan.neighbor_pooling:
        kv, s = pool(kv, plan.pool_index), pool(s, plan.pool_index)
    num = WindowMatmul.apply(fq, kv, plan.blocks)                                        # [N, H, Dv]
    den = (fq * s[win]).sum(-1, keepdim=True) + EPS
    return (num / den).to(dtype)
