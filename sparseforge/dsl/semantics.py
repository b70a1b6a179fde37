"""Exact semantics: dense masks, the float64 reference attention and pattern statistics.

This module is the oracle every kernel is tested against; it favours obviousness over
speed, but works in query-row chunks so that statistics of large problems fit in memory.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .budget import check_dense_mask, check_mask_rows
from .content import Scattered, check_coords, check_groups
from .pattern import MaskContext, Pattern, as_4d
from .problem import Problem

# Largest number of mask elements materialised at once by the chunked helpers.
CHUNK_ELEMENTS = 1 << 26


def check_pattern_problem(pattern, problem) -> None:
    """TypeError unless ``pattern`` is a Pattern and ``problem`` a Problem."""
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a sparseforge Pattern, got {pattern!r} ({type(pattern).__name__})")
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be a sparseforge Problem, got {problem!r} ({type(problem).__name__})")


def make_context(pattern: Pattern, problem: Problem, *, q=None, k=None, coords=None, routes=None,
                 groups=None) -> MaskContext:
    """Check ``pattern`` against ``problem`` and the run-time inputs; build the mask context."""
    check_pattern_problem(pattern, problem)
    for name, t in (("q", q), ("k", k)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    needs = pattern.inputs_needed()
    grid_free = all(not p.needs_grid for p in pattern.walk() if not p.children())
    if problem.grid is None and not grid_free:
        raise ValueError(f"{pattern!r} is defined on a token grid: give Problem(grid=...)")
    if "coords" in needs:
        if coords is None:
            raise ValueError(f"{pattern!r} needs voxel coordinates: pass coords= (int [N, 1 + ndim], batch first)")
        coords = check_coords(coords)
        for leaf in pattern.walk():
            if hasattr(leaf, "check_rank"):
                leaf.check_rank(coords)
        tokens = coords.shape[0]
        if problem.grid is not None and tokens != problem.tokens:
            raise ValueError(f"coords has {tokens} voxels but the problem grid has {problem.tokens} tokens")
    else:
        tokens = problem.tokens
    pattern.check(problem)
    if "groups" in needs:
        if groups is None:
            raise ValueError(f"{pattern!r} needs group ids: pass groups= (int [B, N] or [B, H, N])")
        batch = q.shape[0] if isinstance(q, torch.Tensor) and q.dim() == 4 else None
        groups = check_groups(groups, batch, problem.heads, tokens)
    q64 = k64 = None
    if "qk" in needs and routes is None:
        if q is None or k is None:
            raise ValueError(f"{pattern!r} routes on content: pass q= and k= ([B, H, N, D]) or routes=")
        _check_routing_qk(q, k, problem, tokens)
        q64, k64 = q.detach().double().cpu(), k.detach().double().cpu()
        if k64.shape[1] != q64.shape[1]:
            k64 = k64.repeat_interleave(q64.shape[1] // k64.shape[1], dim=1)
    elif q is not None:
        q64 = q.detach()
    return MaskContext(problem=problem, tokens=tokens, q=q64, k=k64, coords=coords, routes=routes, groups=groups)


def _check_routing_qk(q: torch.Tensor, k: torch.Tensor, problem: Problem, tokens: int) -> None:
    """q [B, H, N, D] and k [B, kv_heads or H, N, D], floating, for routing on content."""
    for name, t in (("q", q), ("k", k)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, N, D], got {tuple(t.shape)}")
        if t.device.type == "meta":
            raise ValueError(f"{name} is on the meta device, but routing on content for the exact mask "
                             f"(dense_mask, reference_attention) needs its values: pass q and k holding data")
    b, h, n, d = q.shape
    if (h, n) != (problem.heads, tokens):
        raise ValueError(f"q has shape {tuple(q.shape)}, expected [B, H={problem.heads}, N={tokens}, D] "
                         f"for {problem!r}")
    if k.shape[0] != b or k.shape[1] not in (problem.kv_heads, problem.heads) or k.shape[2:] != (n, d):
        raise ValueError(f"k has shape {tuple(k.shape)}, expected [B={b}, kv_heads={problem.kv_heads}, "
                         f"N={tokens}, D={d}] to match q {tuple(q.shape)} for {problem!r}")


def mask_rows(pattern: Pattern, ctx: MaskContext, rows: torch.Tensor) -> torch.Tensor:
    """Bool [B|1, H, len(rows), N]: the mask of the given query rows against every key."""
    keys = torch.arange(ctx.tokens)
    m = as_4d(pattern.mask(ctx, rows, keys))
    return m.expand(m.shape[0], ctx.problem.heads, len(rows), ctx.tokens)


def _row_chunks(ctx: MaskContext):
    per_row = max(1, ctx.problem.heads * ctx.tokens)
    step = max(1, CHUNK_ELEMENTS // per_row)
    for start in range(0, ctx.tokens, step):
        yield torch.arange(start, min(start + step, ctx.tokens))


def dense_mask(pattern: Pattern, problem: Problem, *, q=None, k=None, coords=None, routes=None,
               groups=None) -> torch.Tensor:
    """The exact mask: bool [H, N, N], or [B, H, N, N] for patterns that route on q/k or
    read group ids.

    ``q``/``k`` ([B, H, N, D]) are needed by ``Routed`` (or ``routes``), ``coords`` by
    ``Scattered``, ``groups`` by ``Grouped``; they are ignored by static patterns.
    """
    ctx = make_context(pattern, problem, q=q, k=k, coords=coords, routes=routes, groups=groups)
    check_dense_mask(pattern, ctx, CHUNK_ELEMENTS)
    keys, m = torch.arange(ctx.tokens), None
    for rows in list(_row_chunks(ctx)) or [keys]:  # temporaries a chunk of rows at a time; heads stay shared
        part = as_4d(pattern.mask(ctx, rows, keys))
        if m is None:
            m = torch.empty(*part.shape[:2], ctx.tokens, ctx.tokens, dtype=torch.bool)
        start = int(rows[0]) if len(rows) else 0
        m[:, :, start:start + len(rows)] = part
    m = m.expand(m.shape[0], problem.heads, ctx.tokens, ctx.tokens)
    needs = pattern.inputs_needed()
    if "groups" in needs:
        return m.expand(ctx.groups.shape[0], *m.shape[1:])
    return m if "qk" in needs else m[0]


# ------------------------------------------------------------------------------------
# Reference attention
# ------------------------------------------------------------------------------------
def check_qkv(q, k, v, problem: Problem, *, tokens: int | None = None, names=("q", "k", "v")) -> None:
    """Check q [B, H, N, D], k/v [B, kv_heads, N, D] against ``problem``; errors name the argument."""
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, N, D], got {tuple(t.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    n = problem.tokens if tokens is None else tokens
    b, h, nq, d = q.shape
    expected = {names[0]: (b, problem.heads, n, problem.head_dim),
                names[1]: (b, problem.kv_heads, n, problem.head_dim),
                names[2]: (b, problem.kv_heads, n, problem.head_dim)}
    for name, t in zip(names, (q, k, v)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {expected[name]} "
                             f"[B, {'H' if name == names[0] else 'kv_heads'}, N, D] for {problem!r}")


# ------------------------------------------------------------------------------------
# Products over allowed pairs only: a key a query may not see never reaches it
# ------------------------------------------------------------------------------------
# Elements of one batch of the non-finite corrections below (entries x rows).
CORRECTION_ELEMENTS = 1 << 22


def finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its NaN and +-Inf entries replaced by 0."""
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _flat3(t: torch.Tensor, lead, rows: int, cols: int) -> torch.Tensor:
    """``t`` broadcast to [*lead, rows, cols], as [prod(lead), rows, cols] (a copy if broadcast)."""
    return t.expand(*lead, rows, cols).reshape(-1, rows, cols)


def _batches(n: int, per_entry: int):
    step = max(1, CORRECTION_ELEMENTS // max(1, per_entry))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def _allowed_dot(a, b, mask):
    """Forward of ``allowed_dot`` (no autograd)."""
    bad_a, bad_b = ~torch.isfinite(a), ~torch.isfinite(b)
    if not (bool(bad_a.any()) or bool(bad_b.any())):
        return torch.where(mask, a @ b.transpose(-1, -2), 0)
    m, n, d = a.shape[-2], b.shape[-2], a.shape[-1]
    lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2], mask.shape[:-2])
    A, B, M = _flat3(a, lead, m, d), _flat3(b, lead, n, d), _flat3(mask, lead, m, n)
    # the finite terms in one product; then each non-finite entry adds its own terms, at
    # allowed pairs only (a term with a non-finite a_id once, the rest with their b_jd)
    S = _flat3(finite_or_zero(a) @ finite_or_zero(b).transpose(-1, -2), lead, m, n).clone()
    finite_a = ~_flat3(bad_a, lead, m, d)
    l, i, dd = (~finite_a).nonzero(as_tuple=True)
    for sl in _batches(len(l), n):
        terms = A[l[sl], i[sl], dd[sl]][:, None] * B[l[sl], :, dd[sl]]                  # [E, n]
        S.index_put_((l[sl], i[sl]), torch.where(M[l[sl], i[sl]], terms, 0), accumulate=True)
    l, j, dd = _flat3(bad_b, lead, n, d).nonzero(as_tuple=True)
    St = S.transpose(1, 2)
    for sl in _batches(len(l), m):
        terms = A[l[sl], :, dd[sl]] * B[l[sl], j[sl], dd[sl]][:, None]                  # [E, m]
        keep = M[l[sl], :, j[sl]] & finite_a[l[sl], :, dd[sl]]
        St.index_put_((l[sl], j[sl]), torch.where(keep, terms, 0), accumulate=True)
    return torch.where(M, S, 0).view(*lead, m, n)


def _allowed_sum(w, x, mask):
    """Forward of ``allowed_sum`` (no autograd)."""
    w = torch.where(mask, w, 0)
    bad_w, bad_x = ~torch.isfinite(w), ~torch.isfinite(x)
    if not (bool(bad_w.any()) or bool(bad_x.any())):
        return w @ x
    m, n, d = w.shape[-2], x.shape[-2], x.shape[-1]
    lead = torch.broadcast_shapes(w.shape[:-2], x.shape[:-2])
    W, X, M = _flat3(w, lead, m, n), _flat3(x, lead, n, d), _flat3(mask, lead, m, n)
    O = _flat3(finite_or_zero(w) @ finite_or_zero(x), lead, m, d).clone()
    finite_w = ~_flat3(bad_w, lead, m, n)
    l, i, j = (~finite_w).nonzero(as_tuple=True)     # allowed pairs with a non-finite weight
    for sl in _batches(len(l), d):
        O.index_put_((l[sl], i[sl]), W[l[sl], i[sl], j[sl]][:, None] * X[l[sl], j[sl]], accumulate=True)
    l, j, dd = _flat3(bad_x, lead, n, d).nonzero(as_tuple=True)
    Ot = O.transpose(1, 2)
    for sl in _batches(len(l), m):
        terms = W[l[sl], :, j[sl]] * X[l[sl], j[sl], dd[sl]][:, None]                   # [E, m]
        keep = M[l[sl], :, j[sl]] & finite_w[l[sl], :, j[sl]]
        Ot.index_put_((l[sl], dd[sl]), torch.where(keep, terms, 0), accumulate=True)
    return O.view(*lead, m, d)


class _AllowedDot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, mask):
        ctx.save_for_backward(a, b, mask)
        return _allowed_dot(a, b, mask)

    @staticmethod
    def backward(ctx, g):
        a, b, mask = ctx.saved_tensors
        ga = allowed_sum(g, b, mask).sum_to_size(a.shape) if ctx.needs_input_grad[0] else None
        gb = allowed_sum(g.transpose(-1, -2), a, mask.transpose(-1, -2)).sum_to_size(b.shape) \
            if ctx.needs_input_grad[1] else None
        return ga, gb, None


class _AllowedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, x, mask):
        ctx.save_for_backward(w, x, mask)
        return _allowed_sum(w, x, mask)

    @staticmethod
    def backward(ctx, g):
        w, x, mask = ctx.saved_tensors
        gw = allowed_dot(g, x, mask).sum_to_size(w.shape) if ctx.needs_input_grad[0] else None
        gx = allowed_sum(w.transpose(-1, -2), g, mask.transpose(-1, -2)).sum_to_size(x.shape) \
            if ctx.needs_input_grad[1] else None
        return gw, gx, None


def _pair_mask(mask, m: int, n: int):
    """None (every pair allowed) or a bool tensor of at least 2 dims broadcastable to [..., m, n]."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor or None, got {mask!r}")
    if mask.dim() == 0 and bool(mask):
        return None
    torch.broadcast_shapes(mask.shape[-2:], (m, n))  # raises unless it broadcasts
    return mask.reshape((1,) * max(0, 2 - mask.dim()) + tuple(mask.shape))


def allowed_dot(a: torch.Tensor, b: torch.Tensor, mask) -> torch.Tensor:
    """[..., m, n]: a_i . b_j (a [..., m, D], b [..., n, D]) where ``mask`` (bool, broadcastable
    to [..., m, n]; None: everywhere) allows the pair, exactly 0 where it does not.

    A row's NaN or Inf reaches only the pairs it is allowed in — a plain matmul would spread a
    non-finite b_j to every a_i (and 0 * NaN is NaN). Exact: finite inputs give the plain
    product, non-finite terms follow IEEE arithmetic at allowed pairs. Differentiable, and the
    gradients are contained the same way (a pair the mask excludes passes no gradient, not even
    a NaN one)."""
    mask = _pair_mask(mask, a.shape[-2], b.shape[-2])
    if mask is None:
        return a @ b.transpose(-1, -2)
    return _AllowedDot.apply(a, b, mask)


def allowed_sum(w: torch.Tensor, x: torch.Tensor, mask) -> torch.Tensor:
    """[..., m, D]: sum_j w_ij x_j (w [..., m, n], x [..., n, D]) over the j that ``mask``
    (bool, broadcastable to [..., m, n]; None: all) allows for row i.

    Neither a weight nor a row of x that the mask excludes contributes, even when it is NaN or
    Inf (a plain matmul multiplies a weight 0 by a NaN x_j into NaN). Exact as ``allowed_dot``;
    differentiable with contained gradients."""
    mask = _pair_mask(mask, w.shape[-2], w.shape[-1])
    if mask is None:
        return w @ x
    return _AllowedSum.apply(w, x, mask)


def masked_softmax_attention(q, k, v, mask, scale, *, contain: bool = True):
    """Attention with a boolean mask; empty rows give zeros and LSE = -inf, never NaN.

    q [..., Nq, D], k/v [..., Nk, D], mask broadcastable to [..., Nq, Nk]. Differentiable.
    Returns (out [..., Nq, D], lse [..., Nq]) with lse in natural log.

    A key a query may not see never affects it, nor its gradients, even when the key's k or
    v (or a masked query's q) hold NaN or Inf (``allowed_dot``/``allowed_sum``); a key it
    sees propagates them. ``contain=False`` uses plain matmuls instead: the same results and
    faster, but only when q, k and v are all finite (callers that checked this).
    """
    if contain:
        s = allowed_dot(q, k, mask) * scale
    else:
        s = (q @ k.transpose(-1, -2)) * scale
    s = torch.where(mask, s, torch.full_like(s, -math.inf))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    p = e / den.clamp_min(torch.finfo(den.dtype).tiny)
    lse = (m + torch.log(den)).squeeze(-1)
    return (allowed_sum(p, v, mask) if contain else p @ v), lse


def reference_attention(q, k, v, pattern: Pattern, problem: Problem, *, scale: float | None = None,
                        coords=None, routes=None, groups=None, return_lse: bool = False):
    """Attention under ``pattern`` in float64: [B, H, N, D] in, float64 [B, H, N, D] out.

    k/v may have ``problem.kv_heads`` heads (GQA). ``scale`` defaults to D**-0.5. With
    ``return_lse`` also returns the natural-log LSE [B, H, N] (-inf for empty rows).
    Voxel patterns also accept [N, H, D] tensors (one batch; ``coords`` carries the batch id).
    ``Grouped`` takes ``groups`` (int [B, N] or [B, H, N]).
    Differentiable with respect to q, k and v.
    """
    check_pattern_problem(pattern, problem)
    voxel_layout = isinstance(q, torch.Tensor) and q.dim() == 3
    if voxel_layout:
        q, k, v = (t.permute(1, 0, 2).unsqueeze(0) if isinstance(t, torch.Tensor) else t for t in (q, k, v))
    ctx = make_context(pattern, problem, q=q, k=k, coords=coords, routes=routes, groups=groups)
    check_qkv(q, k, v, problem, tokens=ctx.tokens)
    if scale is None:
        scale = problem.head_dim ** -0.5
    group = problem.heads // problem.kv_heads
    q64 = q.double()
    k64 = k.double().repeat_interleave(group, dim=1)
    v64 = v.double().repeat_interleave(group, dim=1)
    outs, lses = [], []
    for rows in _row_chunks(ctx):
        m = mask_rows(pattern, ctx, rows).to(q.device)
        o, l = masked_softmax_attention(q64[:, :, rows], k64, v64, m, scale)
        outs.append(o)
        lses.append(l)
    out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
    if voxel_layout:
        out, lse = out[0].permute(1, 0, 2), lse[0].permute(1, 0)
    return (out, lse) if return_lse else out


def reference_linear_attention(q, k, v, pattern, coords, *, feature_map: str = "relu",
                               neighbor_pooling: bool = False, eps: float = 1e-6):
    """Scattered voxel-window linear attention (ScatterFormer) in float64, plainly.

    q [N, H, D], k/v [N, kv_heads, D] (kv heads repeated to H), ``pattern`` a ``Scattered``,
    ``coords`` int [N, 1 + ndim] (batch first). phi = relu (``feature_map="relu"``) or
    elu(x) + 1 (``"elu+1"``). Per window g and head: KV_g = sum_{j in g} phi(k_j)^T v_j,
    S_g = sum_{j in g} phi(k_j), out_i = phi(q_i) KV_g / (phi(q_i) . S_g + eps).
    ``neighbor_pooling``: KV_g and S_g are first replaced by their sums over the windows
    (batch, w_1 + a, w_2 + b, w_3...) for a, b in {-1, 0, 1} (1-D coords: a only) that hold
    voxels. Loops over windows in Python: the oracle, not fast. Differentiable; float64 out.
    """
    if not isinstance(pattern, Scattered):
        raise TypeError(f"pattern must be a sparseforge Scattered, got {pattern!r}")
    if feature_map not in ("relu", "elu+1"):
        raise ValueError(f"feature_map must be one of ['relu', 'elu+1'], got {feature_map!r}")
    coords = check_coords(coords)
    pattern.check_rank(coords)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 3 \
                or t.shape[0] != coords.shape[0]:
            raise ValueError(f"{name} must be a floating tensor [N={coords.shape[0]}, heads, D], "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
    h = q.shape[1]
    if k.shape[1] != v.shape[1] or h % k.shape[1]:
        raise ValueError(f"k/v heads {k.shape[1]}/{v.shape[1]} do not divide q's {h}")

    def phi(x):
        return torch.relu(x) if feature_map == "relu" else torch.where(x > 0, x + 1, torch.exp(x))

    q64 = q.double().cpu()
    k64 = k.double().cpu().repeat_interleave(h // k.shape[1], dim=1)
    v64 = v.double().cpu().repeat_interleave(h // v.shape[1], dim=1)
    fq, fk = phi(q64), phi(k64)
    ids = [tuple(int(x) for x in row) for row in pattern.window_ids(coords)]
    members: dict[tuple, list[int]] = {}
    for i, w in enumerate(ids):
        members.setdefault(w, []).append(i)
    kv, sums = {}, {}
    for w, rows in members.items():
        kv[w] = torch.einsum("nhd,nhe->hde", fk[rows], v64[rows])
        sums[w] = fk[rows].sum(0)
    if neighbor_pooling:
        two = len(ids[0]) > 2 if ids else False
        pooled_kv, pooled_s = {}, {}
        for w in members:
            total_kv, total_s = torch.zeros_like(kv[w]), torch.zeros_like(sums[w])
            for a in (-1, 0, 1):
                for b in ((-1, 0, 1) if two else (0,)):
                    other = list(w)
                    other[1] += a
                    if two:
                        other[2] += b
                    other = tuple(other)
                    if other in members:
                        total_kv = total_kv + kv[other]
                        total_s = total_s + sums[other]
            pooled_kv[w], pooled_s[w] = total_kv, total_s
        kv, sums = pooled_kv, pooled_s
    out = []
    for i, w in enumerate(ids):
        num = torch.einsum("hd,hde->he", fq[i], kv[w])
        den = (fq[i] * sums[w]).sum(-1, keepdim=True) + eps
        out.append(num / den)
    if not out:
        return q64.new_zeros(0, h, v.shape[2]) + 0 * (q64.sum() + k64.sum() + v64.sum())
    return torch.stack(out).to(q.device)


# ------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HeadStats:
    """Figures of one head: density = allowed pairs / N^2; keys per query over rows."""

    head: int
    allowed: int
    density: float
    keys_min: int
    keys_mean: float
    keys_max: int
    empty_rows: int


@dataclasses.dataclass(frozen=True)
class PatternStats:
    """What ``describe`` returns: totals and one ``HeadStats`` per head (batch element 0
    for content-dependent patterns)."""

    pattern: str
    problem: str
    tokens: int
    heads: tuple[HeadStats, ...]

    @property
    def density(self) -> float:
        return sum(h.allowed for h in self.heads) / (len(self.heads) * self.tokens ** 2)

    @property
    def empty_rows(self) -> int:
        return sum(h.empty_rows for h in self.heads)

    def as_dict(self) -> dict:
        return {"pattern": self.pattern, "problem": self.problem, "tokens": self.tokens,
                "density": self.density, "empty_rows": self.empty_rows,
                "heads": [dataclasses.asdict(h) for h in self.heads]}

    def __str__(self) -> str:
        lines = [f"{self.pattern} on {self.problem}: N={self.tokens}, density {self.density:.4g}, "
                 f"empty rows {self.empty_rows}",
                 f"{'head':>4} {'density':>9} {'keys/query min':>15} {'mean':>9} {'max':>7} {'empty rows':>11}"]
        for h in self.heads:
            lines.append(f"{h.head:>4} {h.density:>9.4g} {h.keys_min:>15} {h.keys_mean:>9.2f} "
                         f"{h.keys_max:>7} {h.empty_rows:>11}")
        return "\n".join(lines)


def describe(pattern: Pattern, problem: Problem, *, q=None, k=None, coords=None, routes=None,
             groups=None) -> PatternStats:
    """Density per head, keys per query (min/mean/max) and empty rows, computed exactly."""
    ctx = make_context(pattern, problem, q=q, k=k, coords=coords, routes=routes, groups=groups)
    check_mask_rows("describe", pattern, ctx, CHUNK_ELEMENTS)
    h = problem.heads
    kmin = torch.full((h,), ctx.tokens, dtype=torch.long)
    kmax = torch.zeros(h, dtype=torch.long)
    total = torch.zeros(h, dtype=torch.long)
    empty = torch.zeros(h, dtype=torch.long)
    for rows in _row_chunks(ctx):
        counts = mask_rows(pattern, ctx, rows)[0].sum(-1)  # [H, rows]
        kmin = torch.minimum(kmin, counts.amin(-1))
        kmax = torch.maximum(kmax, counts.amax(-1))
        total += counts.sum(-1)
        empty += (counts == 0).sum(-1)
    n = ctx.tokens
    heads = tuple(HeadStats(i, int(total[i]), int(total[i]) / n ** 2, int(kmin[i]), int(total[i]) / n,
                            int(kmax[i]), int(empty[i])) for i in range(h))
    return PatternStats(repr(pattern), repr(problem), n, heads)
