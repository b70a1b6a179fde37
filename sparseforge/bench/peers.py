"""The peers: the implementations the suite and the memory report compare ours with, their
set-up for a case, and the synthetic voxels of P8/P9. Tensors [B, H, N, D] (grid and
routed problems) or [N, H, D] (voxels, batch id in ``coords[:, 0]``); device-agnostic.

The peers' computations are written from the papers' released code and the problems'
definitions, independently of sparseforge's own code; only the adapters that set a peer up
for a sparseforge pattern (``vectorised_mask_mod``, ``natten_forward``, ``torch_peer``) read
the pattern.

- FlexAttention: ``make_flex`` (``torch.compile`` or eager, see ``FLEX_COMPILE``), with a
  block mask from ``vectorised_mask_mod`` (the pattern's own ``mask`` under vmap) or
  ``dense_mask_mod`` (a dense boolean mask).
- masked SDPA: ``sdpa_mask_bytes``, the memory it needs on CPU.
- NATTEN: ``natten_forward`` (imported when called; not installed: ImportError).
- HaloNet: ``halo_attention_unfold``; MaxViT: ``maxvit_reshape_sdpa``; ``torch_peer`` picks
  the one of a case.
- ``biformer_routing`` / ``biformer_gather_attention``: BiFormer's bi-level routing attention
  as its released ``nchwBRA`` (``BiLevelRoutingAttention_nchw`` + ``regional_routing_attention_torch``):
  region means -> region affinity over all heads' channels -> top-k -> ``torch.gather`` of
  K and V per routed region ([B, H, R, topk, region_tokens, D] copies) -> matmul, softmax,
  matmul.
- ``make_voxels``: a seeded, spatially clustered synthetic voxel set (2-D, a few batch
  elements) whose 12x12 windows hold a variable number of voxels (mean ~50).
- ``window_groups``: window ids, sorted order and sizes of a voxel set (torch ops).
- ``padded_window_sdpa``: SST-style padded windows: every window padded to the largest
  one, a key padding mask, ``scaled_dot_product_attention``.
- ``flex_document_inputs`` / ``flex_document_attention``: FlexAttention with a document
  mask over the voxels sorted by window.
- ``scatter_linear_attention``: ScatterFormer's linear attention per window with
  ``index_add`` segment sums (the relu / elu+1 feature maps, eps 1e-6).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch

import sparseforge as sf
from sparseforge.dsl.pattern import as_4d
from sparseforge.dsl.semantics import make_context

from .cases import HALO, MAXVIT, Case, Shape, scalar
from .messages import log, why

#: Run FlexAttention under torch.compile (False: eager; the tests use it to stay fast).
#: ``make_flex`` and ``runner.run_suite`` read it here: patch ``peers.FLEX_COMPILE``.
FLEX_COMPILE = True
#: The linear attention's denominator guard (ScatterFormer; ``sf.reference_linear_attention``).
LINEAR_EPS = 1e-6


# ------------------------------------------------------------------------------------
# P7: BiFormer gather implementation
# ------------------------------------------------------------------------------------
def _check_regions(grid, region):
    gh, gw = grid
    rh, rw = region
    if gh % rh or gw % rw:
        raise ValueError(f"the gather implementation needs regions {region} that divide the grid {grid} "
                         "(BiFormer pads the input instead; not reimplemented)")
    return gh // rh, gw // rw


def _grid2seq(x: torch.Tensor, grid, region) -> torch.Tensor:
    """[B, H, N, D] (N = gh * gw row-major) -> [B, H, R, region_tokens, D] (BiFormer's
    ``_grid2seq``: a permuted copy, regions row-major, tokens row-major inside)."""
    b, h, _, d = x.shape
    nh, nw = _check_regions(grid, region)
    rh, rw = region
    x = x.view(b, h, nh, rh, nw, rw, d)
    return torch.einsum("bmhpwqd->bmhwpqd", x).reshape(b, h, nh * nw, rh * rw, d)


def _seq2grid(x: torch.Tensor, grid, region) -> torch.Tensor:
    """Inverse of ``_grid2seq``: [B, H, R, region_tokens, D] -> [B, H, N, D]."""
    b, h, _, _, d = x.shape
    nh, nw = _check_regions(grid, region)
    rh, rw = region
    x = x.view(b, h, nh, nw, rh, rw, d)
    return torch.einsum("bmhwpqd->bmhpwqd", x).reshape(b, h, nh * rh * nw * rw, d)


def biformer_routing(q: torch.Tensor, k: torch.Tensor, grid, region, topk: int) -> torch.Tensor:
    """Routes int64 [B, 1, R, topk]: region means of q and k (``avg_pool2d`` over each
    region, detached), affinity = their dot product over all heads' channels together
    (BiFormer's one routing for all heads), the ``topk`` key regions of every query region.
    Computed in the inputs' dtype, as BiFormer does."""
    b, h, _, d = q.shape

    def region_mean(x):  # [B, R, H*D]
        return _grid2seq(x.detach(), grid, region).mean(3).permute(0, 2, 1, 3).reshape(b, -1, h * d)
    affinity = region_mean(q) @ region_mean(k).transpose(-1, -2)   # [B, R, R]
    return torch.topk(affinity, topk, dim=-1).indices[:, None]


def biformer_gather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid, region, topk: int,
                              routes: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """BiFormer's routed attention by gathering: out [B, H, N, D].

    ``routes`` int [B, 1 or H, R, topk] (default: ``biformer_routing``). The gathered K and V
    are [B, H, R, topk, region_tokens, D] copies each, the scores [B, H, R, region_tokens,
    topk * region_tokens] — what the fused kernel avoids."""
    b, h, _, d = q.shape
    if routes is None:
        routes = biformer_routing(q, k, grid, region, topk)
    scale = d ** -0.5 if scale is None else scale
    qs, ks, vs = (_grid2seq(x, grid, region) for x in (q, k, v))   # [B, H, R, T, D]
    n_regions, tokens = qs.shape[2], qs.shape[3]
    index = routes.expand(b, h, n_regions, topk).reshape(b, h, n_regions, topk, 1, 1) \
        .expand(-1, -1, -1, -1, tokens, d)
    # torch.gather does not broadcast: expand K/V over the query regions (a view), then gather
    key_g = torch.gather(ks.view(b, h, 1, n_regions, tokens, d).expand(-1, -1, n_regions, -1, -1, -1), 3, index)
    value_g = torch.gather(vs.view(b, h, 1, n_regions, tokens, d).expand(-1, -1, n_regions, -1, -1, -1), 3, index)
    attn = (qs * scale) @ key_g.flatten(-3, -2).transpose(-1, -2)   # [B, H, R, T, topk*T]
    attn = torch.softmax(attn, dim=-1)
    out = attn @ value_g.flatten(-3, -2)                             # [B, H, R, T, D]
    return _seq2grid(out, grid, region)


def biformer_block_mask_mod(routes: torch.Tensor, grid, region):
    """A FlexAttention ``mask_mod`` of the routed pattern (row-major tokens): query token q
    sees key token k iff k's region is among the routes of q's region (per batch element;
    ``routes`` [B, 1, R, topk], one routing for all heads)."""
    gh, gw = grid
    rh, rw = region
    nh, nw = _check_regions(grid, region)
    dev = routes.device
    tok = torch.arange(gh * gw, device=dev)
    region_of = (tok // gw // rh) * nw + (tok % gw) // rw
    n_regions = nh * nw
    layout = torch.zeros(routes.shape[0], n_regions, n_regions, dtype=torch.bool, device=dev)
    layout.scatter_(-1, routes[:, 0], True)

    def mask_mod(b, h, q_idx, kv_idx):
        return layout[b, region_of[q_idx], region_of[kv_idx]]
    return mask_mod


# ------------------------------------------------------------------------------------
# P8/P9: voxels
# ------------------------------------------------------------------------------------
def make_voxels(n_target: int, *, batch: int = 2, window: int = 12, mean_per_window: float = 50.0,
                occupied_windows: float = 0.6, seed: int = 0) -> torch.Tensor:
    """A synthetic, point-cloud-like voxel set: int64 coords [N, 3] (batch, x, y), N close to
    ``n_target``, in a shuffled order, deterministic for a seed.

    Per batch element a square grid of ``side`` x ``side`` windows (``window`` cells each
    way), sized so that about ``occupied_windows`` of the windows hold voxels. A smooth
    random field (log-normal noise, sigma 1.5, averaged over the 3x3 window neighbourhood: clusters
    span several windows) gives every window an expected count; empty space is the lowest
    ``1 - occupied_windows`` of it; the counts are scaled to a mean of ``mean_per_window``
    and capped at the window's cells; each window's cells are then drawn without
    replacement. Window sizes vary from a few voxels to full windows."""
    gen = torch.Generator().manual_seed(seed)
    cells = window * window
    n_windows = max(1, round(n_target / mean_per_window))
    side = max(1, math.ceil(math.sqrt(n_windows / occupied_windows / batch)))
    noise = (1.5 * torch.randn(batch, 1, side, side, generator=gen, dtype=torch.float64)).exp()
    field = torch.nn.functional.avg_pool2d(noise, 3, stride=1, padding=1, count_include_pad=False)[:, 0]
    flat = field.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat, descending=True)[:n_windows]] = True
    expected = torch.where(keep, flat, torch.zeros_like(flat))
    expected = expected * (n_target / expected.sum())
    for _ in range(20):   # cap at the window's cells, spread the excess over the others
        expected = expected.clamp(max=cells)
        short = n_target - expected.sum()
        free = keep & (expected < cells)
        if short <= 0.5 or not free.any():
            break
        expected[free] += short * expected[free] / expected[free].sum()
    counts = torch.floor(expected).long()
    rest = int(n_target - counts.sum())      # largest remainders get one more voxel
    if rest > 0:
        frac = torch.where(keep & (counts < cells), expected - counts, torch.full_like(expected, -1.0))
        counts[torch.argsort(frac, descending=True)[:rest]] += 1
    rows = []
    for w in torch.nonzero(counts).reshape(-1).tolist():
        b, wy, wx = w // (side * side), (w // side) % side, w % side
        pick = torch.randperm(cells, generator=gen)[: int(counts[w])]
        rows.append(torch.stack([torch.full_like(pick, b), wy * window + pick // window,
                                 wx * window + pick % window], 1))
    coords = torch.cat(rows)
    return coords[torch.randperm(coords.shape[0], generator=gen)]


def window_groups(coords: torch.Tensor, window) -> dict:
    """The windows of ``coords`` [N, 1 + ndim] (window id ``c // window`` per dim, batch
    first): ``order`` (voxels sorted by window), ``win`` int64 [N] window number of every
    voxel, ``sizes`` [W], ``pos`` [N] rank of every voxel inside its window."""
    nd = coords.shape[1] - 1
    ws = torch.tensor([window] * nd if isinstance(window, int) else list(window), device=coords.device)
    ids = torch.cat([coords[:, :1], coords[:, 1:] // ws], 1)
    _, win, sizes = torch.unique(ids, dim=0, return_inverse=True, return_counts=True)
    order = torch.argsort(win, stable=True)
    starts = torch.cumsum(sizes, 0) - sizes
    pos = torch.empty_like(win)
    pos[order] = torch.arange(coords.shape[0], device=coords.device) - starts[win[order]]
    return dict(order=order, win=win, sizes=sizes, pos=pos)


def padded_window_sdpa(q, k, v, groups: dict, scale: float | None = None) -> torch.Tensor:
    """SST-style padded windows: q, k, v [N, H, D] scattered into [W, H, M, D] (M = the
    largest window), a key padding mask, one batched ``scaled_dot_product_attention``, the
    rows gathered back: out [N, H, D]."""
    win, pos, sizes = groups["win"], groups["pos"], groups["sizes"]
    n_win, m = sizes.shape[0], int(sizes.max())
    h, d = q.shape[1], q.shape[2]

    def pad(x):
        out = x.new_zeros(n_win, m, h, x.shape[-1])
        out[win, pos] = x
        return out.transpose(1, 2)            # [W, H, M, D]
    valid = torch.arange(m, device=q.device)[None, :] < sizes[:, None]   # [W, M]
    out = torch.nn.functional.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=valid[:, None, None, :],
                                                           scale=scale)
    return out.transpose(1, 2)[win, pos].reshape(-1, h, d)


def flex_document_inputs(groups: dict, block: int = 128):
    """(sorted order, padded length, document id per sorted position; -1 for padding)."""
    order, win = groups["order"], groups["win"]
    n = order.shape[0]
    n_pad = -(-n // block) * block
    doc = torch.full((n_pad,), -1, dtype=torch.long, device=order.device)
    doc[:n] = win[order]
    return order, n_pad, doc


def flex_document_attention(q, k, v, groups: dict, flex_fn, create_block_mask, device, scale: float | None = None):
    """FlexAttention over the voxels sorted by window with a document mask (the block mask
    is built here, per call): out [N, H, D]."""
    order, n_pad, doc = flex_document_inputs(groups)
    n = order.shape[0]

    def mask_mod(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]
    bm = create_block_mask(mask_mod, None, None, n_pad, n_pad, device=device)

    def packed(x):
        out = x.new_zeros(1, x.shape[1], n_pad, x.shape[2])
        out[0, :, :n] = x[order].transpose(0, 1)
        return out
    o = flex_fn(packed(q), packed(k), packed(v), block_mask=bm, scale=scale)
    out = torch.empty_like(q)
    out[order] = o[0, :, :n].transpose(0, 1)
    return out


def scatter_linear_attention(q, k, v, groups: dict, feature_map: str = "relu", chunk: int = 8192) -> torch.Tensor:
    """ScatterFormer's scattered linear attention with ``index_add``: per window g and head,
    KV_g = sum_j phi(k_j)^T v_j, S_g = sum_j phi(k_j), out_i = phi(q_i) KV_g / (phi(q_i) . S_g
    + eps); phi = relu or elu + 1. Outer products in chunks of ``chunk`` voxels (bounded
    memory); float32 for half inputs. out [N, H, D]."""
    win, n_win = groups["win"], groups["sizes"].shape[0]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    if feature_map == "relu":
        phi = torch.relu
    elif feature_map == "elu+1":
        def phi(x):
            return torch.nn.functional.elu(x) + 1
    else:
        raise ValueError(f"feature_map must be 'relu' or 'elu+1', got {feature_map!r}")
    fq, fk, vw = phi(q.to(work)), phi(k.to(work)), v.to(work)
    h, d, dv = q.shape[1], q.shape[2], v.shape[2]
    kv = fk.new_zeros(n_win, h, d, dv)
    for start in range(0, q.shape[0], chunk):
        sl = slice(start, start + chunk)
        kv = kv.index_add(0, win[sl], fk[sl, :, :, None] * vw[sl, :, None, :])
    s = fk.new_zeros(n_win, h, d).index_add(0, win, fk)
    num = torch.cat([torch.einsum("nhd,nhde->nhe", fq[start:start + chunk], kv[win[start:start + chunk]])
                     for start in range(0, q.shape[0], chunk)])
    den = (fq * s[win]).sum(-1, keepdim=True) + LINEAR_EPS
    return (num / den).to(q.dtype)


# ------------------------------------------------------------------------------------
# FlexAttention, masked SDPA, NATTEN
# ------------------------------------------------------------------------------------
def make_flex(device: str) -> tuple[Callable, str]:
    """flex_attention under torch.compile (checked by one tiny call), else eager."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if not FLEX_COMPILE:
        def eager_only(*a, **k):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return flex_attention(*a, **k)
        return eager_only, "eager flex_attention (torch.compile switched off: peers.FLEX_COMPILE)"
    compiled = torch.compile(flex_attention, dynamic=False)
    try:
        x = torch.randn(1, 1, 128, 16, device=device)
        bm = create_block_mask(lambda b, h, q, k: q >= k, None, None, 128, 128, device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled(x, x, x, block_mask=bm)
        return compiled, "torch.compile(flex_attention)"
    except Exception as exc:  # noqa: BLE001
        log(f"torch.compile(flex_attention) failed on {device} ({why(exc)}); using eager")

        def eager(*a, **k):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return flex_attention(*a, **k)
        return eager, f"eager flex_attention (torch.compile failed: {why(exc)})"


def vectorised_mask_mod(pattern: sf.Pattern, problem: sf.Problem):
    """A FlexAttention mask_mod that evaluates the pattern's own ``mask`` (vmap-friendly),
    and whether it depends on the head."""
    ctx = make_context(pattern, problem)
    probe = as_4d(pattern.mask(ctx, torch.arange(2), torch.arange(2)))
    per_head = probe.shape[1] > 1

    def mask_mod(b, h, q_idx, kv_idx):
        m = as_4d(pattern.mask(ctx, q_idx.reshape(1), kv_idx.reshape(1)))[0]   # [H|1, 1, 1]
        if per_head:
            return m.index_select(0, h.reshape(1)).reshape(())
        return m.reshape(())
    return mask_mod, per_head


def dense_mask_mod(mask: torch.Tensor):
    """A mask_mod reading a dense [H|1, N, N] boolean mask."""
    if mask.shape[0] > 1:
        return lambda b, h, q_idx, kv_idx: mask[h, q_idx, kv_idx]
    flat = mask[0]
    return lambda b, h, q_idx, kv_idx: flat[q_idx, kv_idx]


def sdpa_mask_bytes(shape: Shape) -> int:
    """Memory masked SDPA needs on CPU: the bool mask [H, N, N] plus float32 scores and
    probabilities [B, H, N, N] (forward) and their gradients (backward)."""
    n = math.prod(shape.grid)
    return shape.heads * n * n + 4 * 4 * shape.batch * shape.heads * n * n


def natten_forward(pattern: sf.Pattern, shape: Shape):  # pragma: no cover - needs NATTEN and CUDA
    """NATTEN's fused neighborhood attention for a plain Neighborhood pattern."""
    import natten  # ImportError: reported as not installed

    try:
        from natten import na1d, na2d, na3d                 # NATTEN >= 0.20
    except ImportError:
        from natten.functional import na1d, na2d, na3d      # older releases
    log(f"  NATTEN {getattr(natten, '__version__', '?')}")

    if not isinstance(pattern, sf.Neighborhood):
        raise ValueError(f"NATTEN runs Neighborhood patterns only, not {pattern!r}")
    fn = {1: na1d, 2: na2d, 3: na3d}[len(shape.grid)]
    p = pattern.params(shape.problem(torch.bfloat16))
    kernel = tuple(d["kernel"] for d in p)
    dilation = tuple(d["dilation"] for d in p)
    stride = tuple(d["stride"] for d in p)

    def run(q, k, v):  # NATTEN takes [B, *grid, H, D]
        def to(x):
            return x.transpose(1, 2).reshape(shape.batch, *shape.grid, shape.heads, shape.head_dim)
        kw = dict(kernel_size=kernel, dilation=dilation)
        if any(s > 1 for s in stride):
            kw["stride"] = stride
        out = fn(to(q), to(k), to(v), **kw)
        return out.reshape(shape.batch, -1, shape.heads, shape.head_dim).transpose(1, 2)
    return run


# ------------------------------------------------------------------------------------
# P10 / P11: HaloNet and MaxViT in plain torch
# ------------------------------------------------------------------------------------
def halo_attention_unfold(q, k, v, grid: tuple[int, int], block: int, halo: int):
    """HaloNet attention with unfold: each block x block query tile attends to its
    (block + 2 halo)^2 neighbourhood of keys; keys in the zero padding are masked, which is
    the truncation at the border of ``Halo(block, halo)``. q, k, v [B, H, N, D]."""
    b, h, n, d = q.shape
    gh, gw = grid
    win = block + 2 * halo

    def windows(x):  # [B, H, N, D] -> [B*H, blocks, win*win, D]
        x = x.reshape(b * h, gh, gw, d).permute(0, 3, 1, 2)
        x = torch.nn.functional.pad(x, (halo, halo, halo, halo))
        x = torch.nn.functional.unfold(x, kernel_size=win, stride=block)    # [BH, D*win*win, blocks]
        return x.reshape(b * h, d, win * win, -1).permute(0, 3, 2, 1)
    ones = torch.nn.functional.pad(torch.ones(1, 1, gh, gw, device=q.device), (halo,) * 4)
    valid = torch.nn.functional.unfold(ones, kernel_size=win, stride=block)[0].T > 0   # [blocks, win*win]
    qb = q.reshape(b * h, gh // block, block, gw // block, block, d).permute(0, 1, 3, 2, 4, 5)
    qb = qb.reshape(b * h, -1, block * block, d)
    out = torch.nn.functional.scaled_dot_product_attention(qb, windows(k), windows(v), attn_mask=valid[:, None, :])
    out = out.reshape(b * h, gh // block, gw // block, block, block, d).permute(0, 1, 3, 2, 4, 5)
    return out.reshape(b, h, n, d)


def maxvit_reshape_sdpa(q, k, v, grid: tuple[int, int], size: int):
    """MaxViT attention by reshaping: the first H/2 heads attend within size x size blocks,
    the others within the size x size grid (tokens strided by S/size), each as plain SDPA."""
    b, h, n, d = q.shape
    gh, gw = grid
    hb = h // 2

    def block_view(x):   # [B, h', N, D] -> [B, h', blocks, size*size, D]
        x = x.reshape(b, x.shape[1], gh // size, size, gw // size, size, d).transpose(3, 4)
        return x.reshape(b, x.shape[1], -1, size * size, d)

    def grid_view(x):    # tokens i*(S/size) + r share the residue r: [B, h', residues, size*size, D]
        x = x.reshape(b, x.shape[1], size, gh // size, size, gw // size, d).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(b, x.shape[1], -1, size * size, d)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ob = sdpa(*(block_view(x[:, :hb]) for x in (q, k, v)))
    og = sdpa(*(grid_view(x[:, hb:]) for x in (q, k, v)))
    ob = ob.reshape(b, hb, gh // size, gw // size, size, size, d).transpose(3, 4).reshape(b, hb, n, d)
    og = og.reshape(b, h - hb, gh // size, gw // size, size, size, d).permute(0, 1, 4, 2, 5, 3, 6)
    return torch.cat([ob, og.reshape(b, h - hb, n, d)], dim=1)


def torch_peer(case: Case, shape: Shape, pattern: sf.Pattern):
    """The plain-torch peer of the case (name, forward(q, k, v)) for ``pattern``, or None."""
    if HALO in case.peers:
        block, halo = scalar(pattern.block_size, "block_size"), scalar(pattern.halo, "halo")
        return HALO, lambda q, k, v: halo_attention_unfold(q, k, v, shape.grid, block, halo)
    if MAXVIT in case.peers:
        size = scalar(pattern.patterns[0].size, "size")
        return MAXVIT, lambda q, k, v: maxvit_reshape_sdpa(q, k, v, shape.grid, size)
    return None


